"""The daemon as a whole: readiness and watchdog, health endpoint, supervision, shutdown, dead uplink."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edgeagent.app import Daemon
from edgeagent.capabilities import Config
from edgeagent.kernel.runtime.clock import Clock
from edgeagent.kernel.runtime.sdnotify import Notifier
from tests.helpers import running_daemon, wait_until
from tests.peers import Collector, Mosquitto


def make_config(tmp_path: Path, broker_url: str | None = None, **extra: Any) -> Config:
    data: dict[str, Any] = {
        "version": 1, "site_id": "site-1", "gateway_id": "gw-1", "state_dir": str(tmp_path / "state"),
        "clock": {"sync": "synced"}, "health": {"port": 0},
        "supervisor": {"restart_intensity": 2, "restart_window_s": 30, "backoff_cap_s": 0.05,
                       "shutdown_timeout_s": 15},
        "devices": [
            {"type": "sim.sensor", "id": "temp-1", "interval_s": 0.05},
            {"type": "sim.contact", "id": "door-1", "mean_interval_s": 0.05},
        ],
    }
    if broker_url:
        data["uplink"] = {"broker": broker_url, "retry": {"first_max_s": 0.1, "short_cap_s": 0.3},
                          "flush_on_stop_s": 5, "connect_timeout_s": 2}
    data.update(extra)
    return Config.model_validate(data)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages


async def test_ready_watchdog_stopping_and_health_endpoint(tmp_path: Path) -> None:
    ns = NotifySocket(tmp_path / "notify.sock")
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"})
    daemon = Daemon(make_config(tmp_path), notifier=notifier)
    try:
        async with running_daemon(daemon):
            assert "READY=1" in ns.drain()
            assert daemon.health is not None and daemon.health.url
            base = daemon.health.url
            await asyncio.sleep(2.5)
            assert "WATCHDOG=1" in ns.drain()
            code, body = await asyncio.to_thread(get, f"{base}/healthz")
            assert code == 200 and json.loads(body)["ok"] is True
            code, body = await asyncio.to_thread(get, f"{base}/metrics")
            assert code == 200 and b'edgeagent_events_accepted_total{priority="telemetry"}' in body
            code, body = await asyncio.to_thread(get, f"{base}/status")
            st = json.loads(body)
            assert st["uplink"]["state"] == "disabled"
            assert {t["name"] for t in st["tasks"]} == {"device:temp-1", "device:door-1", "alarms", "storage",
                                                        "heartbeat", "evictions", "clock"}
            assert st["outbox"]["classes"]["event"]["unsent"] > 0
            runtime = json.loads((tmp_path / "state" / "runtime.json").read_text())
            assert runtime["health_url"] == base
        assert "STOPPING=1" in ns.drain()
        assert not (tmp_path / "state" / "runtime.json").exists()
    finally:
        ns.sock.close()


async def test_watchdog_is_withheld_when_the_outbox_dies(tmp_path: Path) -> None:
    ns = NotifySocket(tmp_path / "notify.sock")
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"})
    daemon = Daemon(make_config(tmp_path, devices=[]), notifier=notifier)
    try:
        async with running_daemon(daemon):
            await asyncio.sleep(1.5)
            ns.drain()
            ns.messages.clear()
            # The database thread dies: no more progress can be made.
            from edgeagent.kernel.pipeline import outbox as outbox_module

            daemon.outbox._ops.put(outbox_module._STOP)
            await asyncio.sleep(2.5)
            assert "WATCHDOG=1" not in ns.drain()
            assert daemon.healthy() == (False, "outbox database thread is not running")
    finally:
        ns.sock.close()


async def test_failing_driver_is_restarted_then_reported_while_others_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = []

    class Broken:
        def __init__(self, cfg: Any, sink: Any) -> None:
            self.cfg = cfg

        async def run(self) -> None:
            attempts.append(time.monotonic())
            raise ConnectionError("RS-485 adapter unplugged")

    import edgeagent.drivers.sim.capability as sim_capability

    monkeypatch.setattr(sim_capability, "SimContact", Broken)
    daemon = Daemon(make_config(tmp_path))
    seen: list[tuple[str, str, dict[str, Any]]] = []
    daemon.sink.observe(lambda e, _s: seen.append((e.type, e.device_id, dict(e.data))))
    async with running_daemon(daemon):
        assert await wait_until(lambda: any(t == "device.fault" for t, _d, _x in seen), 10)
        readings_before = sum(1 for t, *_ in seen if t == "sensor.reading")
        await asyncio.sleep(0.5)
        readings_after = sum(1 for t, *_ in seen if t == "sensor.reading")
        st = await daemon.status()
    fault = next(x for t, d, x in seen if t == "device.fault")
    assert fault["task"] == "device:door-1" and "unplugged" in fault["error"]
    assert len(attempts) == 3  # first run + 2 restarts (intensity 2), then given up
    assert readings_after > readings_before, "the healthy driver stopped too"
    states = {t["name"]: t["state"] for t in st["tasks"]}
    assert states["device:door-1"] == "failed" and states["device:temp-1"] == "running"


async def test_dead_uplink_never_stalls_drivers_and_shutdown_is_bounded(tmp_path: Path) -> None:
    # Nothing listens on this port: the broker is down for the whole test.
    daemon = Daemon(make_config(tmp_path, "mqtt://127.0.0.1:9", devices=[
        {"type": "sim.contact", "id": "door-1", "mean_interval_s": 0.01}]))
    accepted: list[float] = []
    daemon.sink.observe(lambda _e, _s: accepted.append(time.monotonic()))
    t0 = time.monotonic()
    async with running_daemon(daemon):
        await asyncio.sleep(2.0)
        st = await daemon.status()
        stop_at = time.monotonic()
    stopped_in = time.monotonic() - stop_at
    assert st["uplink"]["state"] in ("connecting", "disconnected")
    assert "127.0.0.1:9" in (st["uplink"]["last_error"] or "")
    in_window = [a for a in accepted if t0 + 0.5 < a < t0 + 2.0]
    assert len(in_window) > 50, "events stopped flowing while the uplink was down"
    assert stopped_in < 10, f"shutdown took {stopped_in:.1f} s with the broker down"


async def test_orderly_shutdown_flushes_and_says_offline(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        col = Collector(broker.port).start()
        try:
            daemon = Daemon(make_config(tmp_path, broker.url))
            async with running_daemon(daemon):
                assert await wait_until(lambda: daemon.uplink is not None and daemon.uplink.state == "connected")
                await asyncio.sleep(1.0)
            stats_types = [e["type"] for e in col.events]
            assert await asyncio.to_thread(col.wait_for, lambda c: any(
                e["type"] == "gateway.stopped" for e in c.events), 5), stats_types[-5:]
            statuses = [json.loads(p) for t, p, _r in col.messages if t.endswith("/status")]
            assert statuses[0]["state"] == "online" and statuses[-1] == {**statuses[-1], "state": "offline",
                                                                         "reason": "shutdown"}
            # Everything accepted was sent before the daemon exited.
            from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig

            async with Outbox(OutboxConfig(tmp_path / "state" / "outbox.db")) as ob:
                stats = await ob.stats()
            assert sum(c.unsent for c in stats.classes.values()) == 0
            seqs = sorted({int(e["seq"]) for e in col.events})  # type: ignore[call-overload]
            assert seqs == list(range(1, seqs[-1] + 1))
        finally:
            col.stop()


async def test_events_before_clock_sync_are_marked_then_corrected(tmp_path: Path) -> None:
    synced = [False]
    clock = Clock("auto", sync_probe=lambda: synced[0])
    daemon = Daemon(make_config(tmp_path, clock={"sync": "auto"}, devices=[
        {"type": "sim.contact", "id": "door-1", "mean_interval_s": 0.05}]), clock=clock)
    from edgeagent.kernel.pipeline import clock_fix

    clock_fix.CLOCK_POLL_S, saved = 0.5, clock_fix.CLOCK_POLL_S
    seen: list[Any] = []
    daemon.sink.observe(lambda e, s: seen.append((e, s)))
    try:
        async with running_daemon(daemon):
            assert await wait_until(lambda: len(seen) > 5, 5)
            assert not seen[1][0].stamp.synced
            synced[0] = True
            assert await wait_until(lambda: any(e.type == "gateway.clock.synced" for e, _ in seen), 10)
    finally:
        clock_fix.CLOCK_POLL_S = saved
    report = next(e for e, _ in seen if e.type == "gateway.clock.synced")
    assert report.data["corrected_unsent"] >= 5
    import sqlite3

    con = sqlite3.connect(tmp_path / "state" / "outbox.db")
    try:
        rows = [json.loads(p) for (p,) in con.execute("SELECT payload FROM outbox ORDER BY seq LIMIT 5")]
    finally:
        con.close()
    assert all(r["clock_synced"] and r["clock"]["corrected"] for r in rows)


async def test_backlog_over_cap_evicts_and_reports_it_never_alarms(tmp_path: Path) -> None:
    from edgeagent.kernel.pipeline import evictions

    evictions.EVICTION_REPORT_MIN_S, saved = 0.2, evictions.EVICTION_REPORT_MIN_S
    cfg = make_config(tmp_path, outbox={"cap_mb": 0.05, "min_free_mb": 0}, devices=[
        *[{"type": "sim.sensor", "id": f"t{i}", "interval_s": 0.02} for i in range(20)],
        {"type": "sim.contact", "id": "door-1", "mean_interval_s": 0.005},
        {"type": "sim.panic", "id": "btn-1", "mean_interval_s": 0.02},
    ])
    daemon = Daemon(cfg)
    seen: list[Any] = []
    daemon.sink.observe(lambda e, _s: seen.append(e))
    try:
        async with running_daemon(daemon):
            assert await wait_until(lambda: any(e.type == "outbox.evicted" for e in seen), 15)
            st = await daemon.status()
    finally:
        evictions.EVICTION_REPORT_MIN_S = saved
    alarms = sum(1 for e in seen if e.type == "panic.pressed")
    assert st["outbox"]["classes"]["alarm"]["unsent"] == alarms, "an alarm was evicted"
    report = next(e for e in seen if e.type == "outbox.evicted")
    assert report.data["evicted_telemetry"] + report.data["evicted_event"] > 0
    assert st["outbox"]["evicted_total"] >= report.data["total_evicted"] > 0
    if report.data["evicted_event"]:
        assert report.data["evicted_telemetry"] > 0, "events evicted before telemetry"


async def test_status_command_reads_the_running_daemon(tmp_path: Path) -> None:
    import subprocess
    import sys

    from edgeagent.capabilities import load_config

    cfg_path = tmp_path / "edgeagent.yaml"
    cfg_path.write_text(f"""\
version: 1
site_id: site-1
gateway_id: gw-1
state_dir: {tmp_path / "state"}
clock: {{sync: synced}}
uplink: {{broker: "mqtt://127.0.0.1:9", retry: {{first_max_s: 0.1, short_cap_s: 0.2}}}}
health: {{port: 0}}
devices:
  - {{type: sim.contact, id: door-1, mean_interval_s: 0.2}}
""")
    daemon = Daemon(load_config(cfg_path))

    def status(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgeagent", "status", "--config", str(cfg_path), *extra],
                              capture_output=True, text=True, timeout=30, env={"COLUMNS": "120"})

    async with running_daemon(daemon):
        await asyncio.sleep(1.5)
        as_json = await asyncio.to_thread(status, "--json")
        table = await asyncio.to_thread(status)
    assert as_json.returncode == 0, as_json.stderr
    st = json.loads(as_json.stdout)
    assert st["gateway_id"] == "gw-1" and st["uplink"]["state"] in ("connecting", "disconnected")
    assert st["outbox"]["classes"]["event"]["unsent"] >= 1
    assert st["outbox"]["classes"]["event"]["oldest_unsent_age_s"] is not None
    assert [t["name"] for t in st["tasks"]] == ["uplink", "device:door-1", "alarms", "storage", "evictions", "clock",
                                                  "heartbeat"]
    assert table.returncode == 0 and "device:door-1" in table.stdout and "oldest unsent" in table.stdout
    stopped = await asyncio.to_thread(status)
    assert stopped.returncode == 1 and "is it running?" in stopped.stderr


async def test_runtime_file_is_never_written_through_a_planted_link(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim.conf"
    victim.write_text("keep me\n")
    (state / "runtime.tmp").symlink_to(victim)  # the old fixed temporary name
    daemon = Daemon(make_config(tmp_path, devices=[]))
    async with running_daemon(daemon):
        info = json.loads((state / "runtime.json").read_text())
        assert info["pid"] > 0
    assert victim.read_text() == "keep me\n"
