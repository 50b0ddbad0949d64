"""A full disk: the outbox frees what it may (history, telemetry, events), refuses clearly when only
alarms are left, never corrupts, and works again once space returns."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.kernel.errors import OutboxFullError
from edgeagent.kernel.pipeline.events import EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.fail(f"this test mounts a 24 MB tmpfs and needs root (CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


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
