"""A full disk: the outbox frees what it may (history, telemetry, events), refuses clearly when only
alarms are left, never corrupts, and works again once space returns; the evictions it made are all
reported once there is room; a nearly full disk still opens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.kernel.errors import OutboxFullError
from edgeagent.kernel.pipeline.events import EventFactory
from edgeagent.kernel.pipeline.evictions import EvictionReporter
from edgeagent.kernel.pipeline.outbox import EvictionReport, Outbox, OutboxConfig
from edgeagent.kernel.pipeline.sink import EventSink
from tests.helpers import wait_until


async def test_full_disk_evicts_then_refuses_alarms_clearly_without_corruption(
        small_disk: Path, factory: EventFactory) -> None:
    path = small_disk / "o.db"
    cfg = OutboxConfig(path, cap_bytes=1 << 40, min_free_bytes=0)
    async with Outbox(cfg) as ob:
        for i in range(4000):
            await ob.put(factory.make("sensor.reading", f"s{i}", {"metric": "t", "value": i, "unit": "degC"}))
        accepted_alarms = 0
        with pytest.raises(OutboxFullError, match="disk full"):
            for i in range(200_000):
                await ob.put(factory.make("panic.pressed", "b1", {"location": f"room {i:06d} " + "x" * 200}))
                accepted_alarms += 1
        stats = await ob.stats()
        assert stats.classes["alarm"].unsent == accepted_alarms
        assert stats.classes["telemetry"].unsent < 4000, "telemetry was not evicted to make room for alarms"
        assert stats.evicted_total > 0
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT COUNT(*) FROM outbox WHERE prio=0").fetchone()[0] == accepted_alarms
    finally:
        con.close()
    # Space returns (alarms sent and history trimmed): the outbox accepts again.
    async with Outbox(OutboxConfig(path, cap_bytes=1 << 40, min_free_bytes=0, history_bytes=0)) as ob:
        while (b := await ob.lease(500, 1 << 30)) is not None:
            ob.ack_nowait(b)
        await ob.flush()
        # The outbox trims its own sent history to make room; no manual clean-up.
        seq = await ob.put(factory.make("panic.pressed", "b1", {"location": "after"}))
        assert seq > accepted_alarms
        stats = await ob.stats()
        assert stats.classes["alarm"].unsent == 1


def mount_tmpfs(mnt: Path, size: str) -> None:
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.fail(f"this test mounts a {size} tmpfs and needs root (CAP_SYS_ADMIN): {r.stderr.strip()}")


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def nearly_full_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB file system with about 3 MB left, as on a state partition someone filled with logs."""
    mnt = tmp_path / "disk"
    mount_tmpfs(mnt, "8m")
    try:
        (mnt / "filler").write_bytes(b"\1" * (free_bytes(mnt) - 3 * 1024 * 1024))
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_outbox_opens_and_accepts_events_with_3_mb_free(nearly_full_disk: Path, factory: EventFactory) -> None:
    free_before = free_bytes(nearly_full_disk)
    assert 2_500_000 < free_before <= 3 * 1024 * 1024
    path = nearly_full_disk / "outbox.db"
    async with Outbox(OutboxConfig(path)) as ob:  # the daemon's defaults: 4 MiB reserve, 64 MiB min free
        assert await ob.put(factory.make("gateway.started", "gw-1", {
            "version": "t", "boot_id": "b", "recovered_unsent": 0, "outbox_reset": False})) == 1
        seqs = await ob.put_many([factory.make("panic.pressed", "b1", {"location": f"l{i}"}) for i in range(50)])
        stats = await ob.stats()
    assert seqs == list(range(2, 52))
    assert stats.classes["alarm"].unsent == 50
    reserve = path.with_name(path.name + ".reserve")
    # Scaled to what the disk has (a quarter of it at most), not the fixed 4 MiB.
    assert reserve.exists() and 0 < reserve.stat().st_size <= free_before // 4


async def test_every_eviction_is_reported_once_a_full_disk_has_room_again(
        small_disk: Path, factory: EventFactory) -> None:
    path = small_disk / "o.db"
    cfg = OutboxConfig(path, cap_bytes=1 << 40, min_free_bytes=0)
    evicted: list[EvictionReport] = []
    reports: list[dict[str, int]] = []

    reporter: EvictionReporter | None = None

    def on_evicted(report: EvictionReport, total: int) -> None:
        evicted.append(report.copy())
        assert reporter is not None
        reporter.on_evicted(report, total)

    async with Outbox(cfg, on_evicted=on_evicted) as ob:
        sink = EventSink(factory, ob)
        sink.observe(lambda e, _s: reports.append(dict(e.data)) if e.type == "outbox.evicted" else None)
        reporter = EvictionReporter(sink.emit, gateway_id="gw-1", cap_bytes=cfg.cap_bytes,
                                    min_interval_s=0.01, retry_s=0.05)
        for i in range(4000):
            await ob.put(factory.make("sensor.reading", f"s{i}", {"metric": "t", "value": i, "unit": "degC"}))
        with pytest.raises(OutboxFullError):
            for i in range(200_000):
                await ob.put(factory.make("panic.pressed", "b1", {"location": f"room {i:06d} " + "x" * 200}))
        assert evicted, "the disk filled without evicting anything"
        # The disk is full: the report cannot be written now, and must not be lost.
        assert await reporter.flush() is False
        assert reporter.failed_reports == 1 and reporter.pending
        task = asyncio.create_task(reporter.run())
        try:
            # The alarms go out (PUBACK), so their rows become history the outbox may free.
            while (b := await ob.lease(500, 1 << 30)) is not None:
                ob.ack_nowait(b)
            await ob.flush()
            assert await wait_until(lambda: not reporter.pending, 30), "the pending report was never written"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        stats = await ob.stats()
    assert sum(r["evicted_telemetry"] + r["evicted_event"] for r in reports) == stats.evicted_total > 0
    assert reporter.reported_total == stats.evicted_total
    lo = min(r.first_seq for r in evicted if r.first_seq is not None)
    hi = max(r.last_seq for r in evicted if r.last_seq is not None)
    assert min(r["first_seq"] for r in reports) == lo and max(r["last_seq"] for r in reports) == hi


async def test_a_dead_letter_report_refused_on_a_full_disk_is_written_once_there_is_room(
        small_disk: Path, factory: EventFactory) -> None:
    path = small_disk / "o.db"
    cfg = OutboxConfig(path, cap_bytes=1 << 40, min_free_bytes=0)
    sinks: list[EventSink] = []
    reporter = EvictionReporter(lambda *a: sinks[0].emit(*a),  # noqa: PLW0108 - no sink before the outbox
                                gateway_id="gw-1", cap_bytes=cfg.cap_bytes,
                                min_interval_s=0.01, retry_s=0.05)
    reports: list[dict[str, object]] = []
    async with Outbox(cfg, on_dead_lettered=reporter.on_dead_lettered) as ob:
        sink = EventSink(factory, ob)
        sinks.append(sink)
        sink.observe(lambda e, _s: reports.append(dict(e.data)) if e.type == "outbox.dead_lettered" else None)
        seqs = await ob.put_many([factory.make("device.offline", f"dev-{i}", {"reason": "y" * 70_000})
                                  for i in range(3)])
        batch = await ob.lease(10, 1 << 30)
        assert batch is not None and list(batch.seqs) == seqs
        assert await ob.dead_letter(batch.seqs, "70 KiB, more than the broker's maximum packet size") == 3
        with pytest.raises(OutboxFullError):
            for i in range(200_000):
                await ob.put(factory.make("panic.pressed", "b1", {"location": f"room {i:06d} " + "x" * 200}))
        # The disk is full: the report cannot be written now, and must not be lost.
        assert await reporter.flush() is False
        assert reporter.failed_reports == 1 and reporter.pending_dead_letters.seqs == seqs
        task = asyncio.create_task(reporter.run())
        try:
            # The alarms go out (PUBACK), so their rows become history the outbox may free.
            while (b := await ob.lease(500, 1 << 30)) is not None:
                ob.ack_nowait(b)
            await ob.flush()
            assert await wait_until(lambda: not reporter.pending_dead_letters, 30), "never written"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        stats = await ob.stats()
    assert reports == [{"count": 3, "alarms": 0, "first_seq": seqs[0], "last_seq": seqs[-1], "seqs": seqs,
                        "types": ["device.offline"], "reason": "70 KiB, more than the broker's maximum packet size",
                        "total_dead_lettered": 3}]
    assert stats.dead_lettered_total == reporter.dead_reported_total == 3
