"""Faults the daemon must survive honestly: the state database failing for a while (an SD card
fault) must not leave an active SOS without repeats and escalation; a fault it cannot get past ends
the daemon in order with a non-zero exit, for systemd to restart it."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from edgeagent.app import Daemon
from tests.helpers import running_daemon, wait_until
from tests.test_daemon import make_config


def _alarm_config(tmp_path: Path, **supervisor: float) -> Any:
    return make_config(
        tmp_path, devices=[],
        supervisor={"restart_intensity": 2, "restart_window_s": 30, "backoff_cap_s": 0.05, "shutdown_timeout_s": 15,
                    "critical_unhealthy_after_s": 1, "stable_after_s": 2, **supervisor},
        alarms={"levels": [{"name": "guard_room", "targets": ["guard_room"]},
                           {"name": "grid_worker", "targets": ["grid_worker"]},
                           {"name": "family", "targets": ["family"]}],
                "policies": {"sos": {"severity": "critical", "repeat_s": 0.5, "escalate_after_s": [4, 8]}}})


def _break_database(daemon: Daemon) -> list[bool]:
    """Every group commit fails with a disk I/O error while the returned flag is set."""
    broken = [True]
    real = daemon.outbox._transaction

    def transaction(*args: Any, **kw: Any) -> Any:
        if broken[0]:
            raise sqlite3.OperationalError("disk I/O error")
        return real(*args, **kw)

    daemon.outbox._transaction = transaction  # type: ignore[method-assign]  # the fault, injected
    return broken


async def test_active_sos_repeats_and_escalates_after_a_database_fault(tmp_path: Path) -> None:
    daemon = Daemon(_alarm_config(tmp_path, critical_give_up_after_s=120))
    seen: list[tuple[str, dict[str, Any]]] = []
    daemon.sink.observe(lambda e, _s: seen.append((e.type, dict(e.data))))
    async with running_daemon(daemon) as run:
        await daemon.alarms.raise_("sos", "r-1", "band-1", {"presses": 1})
        assert await wait_until(lambda: any(t == "alarm.raised" for t, _ in seen), 5)
        broken = _break_database(daemon)
        await asyncio.sleep(3)  # the fault lasts longer than the repeat period, several times over
        fault_seen = len(seen)
        broken[0] = False
        # The SOS is still served: its repeats reach the notifier hub (no notifier is configured, so
        # the hub counts each as unrouted) and it escalates to the next level, durably.
        hub = daemon.notifiers
        assert hub is not None
        handed = hub.stats.unrouted
        assert await wait_until(lambda: hub.stats.unrouted >= handed + 2, 10)
        assert await wait_until(lambda: any(t == "alarm.escalated" for t, _ in seen[fault_seen:]), 15), \
            [t for t, _ in seen]
        assert await wait_until(lambda: daemon.healthy()[0], 10), daemon.healthy()
        tasks = {t["name"]: t["state"] for t in daemon.supervisor.snapshot()}  # type: ignore[union-attr]
        assert tasks["alarms"] == "running"
        assert not run.task.done()


async def test_a_fault_that_does_not_clear_ends_the_daemon_non_zero(tmp_path: Path) -> None:
    daemon = Daemon(_alarm_config(tmp_path, critical_give_up_after_s=3))
    async with running_daemon(daemon, exit_code=1) as run:
        await daemon.alarms.raise_("sos", "r-1", "band-1", {"presses": 1})
        _break_database(daemon)
        # Health turns false once a critical task has been failing for critical_unhealthy_after_s...
        assert await wait_until(lambda: not daemon.healthy()[0], 10)
        assert "critical task" in daemon.healthy()[1]
        # ...and the daemon ends by itself, in order, with a non-zero exit code for systemd.
        assert await asyncio.wait_for(asyncio.shield(run.task), 30) == 1


async def test_a_failing_heartbeat_never_takes_the_daemon_down(tmp_path: Path) -> None:
    from edgeagent.kernel.runtime import heartbeat as heartbeat_module

    daemon = Daemon(make_config(tmp_path))
    calls = [0]

    async def slow_stats() -> Any:
        calls[0] += 1
        raise TimeoutError  # what asyncio.wait_for raises when stats() takes longer than its bound

    saved = heartbeat_module.STATS_EVERY_BEATS
    heartbeat_module.STATS_EVERY_BEATS = 1
    try:
        async with running_daemon(daemon) as run:
            daemon.outbox.stats = slow_stats  # type: ignore[method-assign]  # the fault, injected
            assert await wait_until(lambda: calls[0] >= 3, 10)
            before = len(run.seen)
            assert await wait_until(lambda: len(run.seen) > before + 5, 5), "intake stopped"
            assert not run.task.done()
            assert daemon.heartbeat is not None and daemon.heartbeat.progress.failed_beats >= 3
    finally:
        heartbeat_module.STATS_EVERY_BEATS = saved
    assert run.of("gateway.stopped")  # an orderly stop, not a crash


async def test_drivers_run_again_after_a_full_disk_and_their_faults_are_reported(
        tmp_path: Path, small_disk: Path) -> None:
    cfg = make_config(
        tmp_path, state_dir=str(small_disk / "state"), outbox={"min_free_mb": 0, "history_mb": 0},
        supervisor={"restart_intensity": 2, "restart_window_s": 30, "backoff_cap_s": 0.05, "shutdown_timeout_s": 15,
                    "retry_failed_after_s": 1.0},
        # Panic buttons raise alarm-class events, which are never evicted to make room: they fill the disk.
        devices=[{"type": "sim.panic", "id": "btn-1", "mean_interval_s": 0.002},
                 {"type": "sim.panic", "id": "btn-2", "mean_interval_s": 0.002}])
    daemon = Daemon(cfg)
    seen: list[tuple[str, str]] = []
    daemon.sink.observe(lambda e, _s: seen.append((e.type, e.device_id)))
    filler = small_disk / "filler"
    try:
        await _full_disk_then_room(daemon, seen, filler)
    finally:
        with contextlib.suppress(FileNotFoundError):
            filler.unlink()


async def _full_disk_then_room(daemon: Daemon, seen: list[tuple[str, str]], filler: Path) -> None:
    async with running_daemon(daemon):
        assert await wait_until(lambda: {d for t, d in seen if t == "panic.pressed"} == {"btn-1", "btn-2"}, 5)
        # The disk fills up (another process's log, say) and stays full for a while; what the outbox
        # frees for itself (its reserve file) is taken too.
        # Unbuffered: a full disk refuses the write itself, never a flush when the file is closed.
        with filler.open("wb", buffering=0) as f:
            for _ in range(20):
                with contextlib.suppress(OSError):
                    while f.write(b"\0" * (1 << 16)):
                        pass
                await asyncio.sleep(0.2)
        sup = daemon.supervisor
        assert sup is not None
        assert await wait_until(lambda: all(sup.tasks[f"device:btn-{i}"].state == "failed" for i in (1, 2)), 20)
        assert sup.pending_reports >= 1 or all(t != "device.fault" for t, _ in seen)
        await asyncio.sleep(3)  # full for longer than retry_failed_after_s: the retries fail too
        filler.unlink()
        mark = len(seen)
        # Every driver runs again, and each one's fault is reported once the outbox can take it.
        assert await wait_until(
            lambda: {d for t, d in seen[mark:] if t == "panic.pressed"} == {"btn-1", "btn-2"}, 20), seen[mark:]
        assert await wait_until(lambda: {d for t, d in seen if t == "device.fault"} == {"btn-1", "btn-2"}, 30)
        assert all(sup.tasks[f"device:btn-{i}"].state == "running" for i in (1, 2))
        assert daemon.healthy()[0], daemon.healthy()
