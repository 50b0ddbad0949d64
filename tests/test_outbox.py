"""The outbox on its own: durability, order, priorities, coalescing, the cap, eviction, clock correction."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from edgeagent.kernel.errors import OutboxClosedError, OutboxCorruptError
from edgeagent.kernel.pipeline.event_types import REGISTRY
from edgeagent.kernel.pipeline.events import EventFactory, Priority
from edgeagent.kernel.pipeline.outbox import EvictionReport, Outbox, OutboxConfig
from edgeagent.kernel.runtime.clock import Clock


def contact(f: EventFactory, dev: str = "door-1") -> object:
    return f.make("contact.changed", dev, {"state": "open", "contact": "door"})


def reading(f: EventFactory, dev: str, metric: str, value: float) -> object:
    return f.make("sensor.reading", dev, {"metric": metric, "value": value, "unit": "degC"})


async def drain(ob: Outbox, n: int = 1000) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    while (batch := await ob.lease(n, 10_000_000)) is not None:
        out.extend(orjson.loads(p) for p in batch.payloads)
        ob.ack_nowait(batch)
    await ob.flush()
    return out


async def test_seq_is_monotonic_and_survives_restart(tmp_path: Path, factory: EventFactory) -> None:
    async with Outbox(OutboxConfig(tmp_path / "o.db")) as ob:
        seqs = [await ob.put(contact(factory)) for _ in range(5)]  # type: ignore[arg-type]
        await drain(ob)
    assert seqs == [1, 2, 3, 4, 5]
    # History trimmed to nothing: seq must still continue, not restart from the highest row left.
    async with Outbox(OutboxConfig(tmp_path / "o.db", history_bytes=0)) as ob:
        more = await ob.put_many([contact(factory) for _ in range(3)])  # type: ignore[misc]
    assert more == [6, 7, 8]


async def test_lease_order_alarm_then_event_then_telemetry_and_in_class_order(
        tmp_path: Path, factory: EventFactory) -> None:
    async with Outbox(OutboxConfig(tmp_path / "o.db")) as ob:
        await ob.put(reading(factory, "s1", "t", 1))  # type: ignore[arg-type]
        await ob.put(contact(factory))  # type: ignore[arg-type]
        await ob.put(factory.make("panic.pressed", "b1", {"location": "x"}))
        await ob.put(contact(factory, "door-2"))  # type: ignore[arg-type]
        out = await drain(ob, n=1)
    assert [e["priority"] for e in out] == ["alarm", "event", "event", "telemetry"]
    assert [e["seq"] for e in out] == [3, 2, 4, 1]


async def test_unacked_lease_is_sent_again_after_reset_acked_is_not(tmp_path: Path, factory: EventFactory) -> None:
    async with Outbox(OutboxConfig(tmp_path / "o.db")) as ob:
        await ob.put_many([contact(factory) for _ in range(10)])  # type: ignore[misc]
        first = await ob.lease(4, 1_000_000)
        second = await ob.lease(4, 1_000_000)
        assert first is not None and second is not None
        ob.ack_nowait(first)
        await ob.reset_leases()  # the connection dropped with `second` in flight
        again = await ob.lease(100, 1_000_000)
        assert again is not None
        assert again.seqs == tuple(range(5, 11))


async def test_telemetry_coalesces_per_device_and_metric_while_backlogged(
        tmp_path: Path, factory: EventFactory) -> None:
    async with Outbox(OutboxConfig(tmp_path / "o.db")) as ob:
        for v in range(5):
            await ob.put(reading(factory, "s1", "temperature", v))  # type: ignore[arg-type]
            await ob.put(reading(factory, "s1", "humidity", 50 + v))  # type: ignore[arg-type]
            await ob.put(reading(factory, "s2", "temperature", 100 + v))  # type: ignore[arg-type]
        stats = await ob.stats()
        out = await drain(ob)
    assert stats.classes["telemetry"].unsent == 3
    assert stats.coalesced_total == 12
    latest = {(e["device_id"], e["data"]["metric"]): e for e in out}  # type: ignore[index]
    assert latest[("s1", "temperature")]["data"]["value"] == 4  # type: ignore[index]
    assert latest[("s2", "temperature")]["data"]["value"] == 104  # type: ignore[index]
    assert all(e["coalesced"] == 5 for e in out)
    assert [e["seq"] for e in out] == [1, 2, 3]


async def test_no_coalescing_into_a_row_in_flight(tmp_path: Path, factory: EventFactory) -> None:
    async with Outbox(OutboxConfig(tmp_path / "o.db")) as ob:
        await ob.put(reading(factory, "s1", "t", 1))  # type: ignore[arg-type]
        leased = await ob.lease(10, 1_000_000)
        assert leased is not None
        await ob.put(reading(factory, "s1", "t", 2))  # type: ignore[arg-type]
        ob.ack_nowait(leased)
        rest = await drain(ob)
    assert [e["data"]["value"] for e in rest] == [2]  # type: ignore[index]
    assert orjson.loads(leased.payloads[0])["data"]["value"] == 1


async def test_cap_evicts_telemetry_first_then_events_never_alarms_and_reports(
        tmp_path: Path, factory: EventFactory) -> None:
    reports: list[EvictionReport] = []
    cfg = OutboxConfig(tmp_path / "o.db", cap_bytes=200_000)
    async with Outbox(cfg, on_evicted=lambda r, _t: reports.append(r)) as ob:
        for i in range(400):
            await ob.put(factory.make("panic.pressed", "b1", {"location": f"l{i}"}))
        for i in range(600):
            await ob.put(reading(factory, f"s{i}", "t", i))  # type: ignore[arg-type]
        for _ in range(400):
            await ob.put(contact(factory))  # type: ignore[arg-type]
        stats = await ob.stats()
    assert stats.classes["alarm"].unsent == 400, "an alarm was evicted"
    total = sum(c.unsent_bytes for c in stats.classes.values())
    assert total <= cfg.cap_bytes
    evicted_t = sum(r.telemetry for r in reports)
    evicted_e = sum(r.event for r in reports)
    assert evicted_t == 600 - stats.classes["telemetry"].unsent
    assert evicted_t > 0
    # Events are evicted only once no telemetry is left.
    if evicted_e:
        assert stats.classes["telemetry"].unsent == 0
    assert stats.evicted_total == evicted_t + evicted_e


async def test_alarms_are_admitted_beyond_the_cap(tmp_path: Path, factory: EventFactory) -> None:
    async with Outbox(OutboxConfig(tmp_path / "o.db", cap_bytes=10_000)) as ob:
        for i in range(200):
            await ob.put(factory.make("panic.pressed", "b1", {"location": f"l{i}"}))
        stats = await ob.stats()
    assert stats.classes["alarm"].unsent == 200
    assert stats.classes["alarm"].unsent_bytes > 10_000


async def test_clock_correction_rewrites_unsent_unsynced_times(tmp_path: Path) -> None:
    wall = [1_000.0]  # 1970: a Pi without RTC before NTP
    mono = [5_000_000_000]
    synced = [False]
    clock = Clock("auto", wall=lambda: wall[0], monotonic_ns=lambda: mono[0], sync_probe=lambda: synced[0],
                  boot_id="boot-a")
    f = EventFactory(REGISTRY, "site-1", "gw-1", clock)
    async with Outbox(OutboxConfig(tmp_path / "o.db")) as ob:
        await ob.put(f.make("contact.changed", "d", {"state": "open", "contact": "door"}))
        mono[0] += 2_000_000_000
        sent = await ob.lease(10, 1_000_000)
        assert sent is not None
        ob.ack_nowait(sent)
        await ob.put(f.make("contact.changed", "d", {"state": "closed", "contact": "door"}))
        # NTP steps the clock to 2026 three seconds later.
        mono[0] += 3_000_000_000
        wall[0] = 1_790_000_000.0
        synced[0] = True
        assert clock.poll()
        from edgeagent.kernel.pipeline.events import utc_ms

        corrected, already_sent = await ob.correct_clock("boot-a", lambda m: utc_ms(clock.corrected_wall(m)))
        out = await drain(ob)
    assert (corrected, already_sent) == (1, 1)
    env = out[0]
    assert env["clock_synced"] is True and env["clock"]["corrected"] is True  # type: ignore[index]
    # occurred 3 s before the sync moment.
    assert env["occurred_at"] == "2026-09-21T13:19:57.000Z" or str(env["occurred_at"]).startswith("2026-")
    from datetime import datetime

    t = datetime.fromisoformat(str(env["occurred_at"]).replace("Z", "+00:00")).timestamp()
    assert abs(t - (1_790_000_000.0 - 3.0)) < 0.01
    unsynced_first = orjson.loads(sent.payloads[0])
    assert unsynced_first["clock_synced"] is False and unsynced_first["clock"]["boot_id"] == "boot-a"


async def test_closed_outbox_refuses_clearly(tmp_path: Path, factory: EventFactory) -> None:
    ob = Outbox(OutboxConfig(tmp_path / "o.db"))
    await ob.open()
    await ob.close()
    with pytest.raises(OutboxClosedError):
        await ob.put(contact(factory))  # type: ignore[arg-type]


async def test_corrupt_database_is_a_clear_error_or_quarantined(tmp_path: Path, factory: EventFactory) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not a sqlite database" * 100)
    with pytest.raises(OutboxCorruptError, match=r"o\.db.*corrupt"):
        async with Outbox(OutboxConfig(path)):
            pass
    ob = Outbox(OutboxConfig(path, on_corrupt="quarantine"))
    async with ob:
        assert await ob.put(contact(factory)) == 1  # type: ignore[arg-type]
    assert ob.quarantined is not None and ob.quarantined.read_bytes().startswith(b"this is not")


async def test_intake_is_bounded_with_backpressure_and_telemetry_drop(tmp_path: Path, factory: EventFactory) -> None:
    async with Outbox(OutboxConfig(tmp_path / "o.db", max_pending_events=10)) as ob:
        futs = [ob.offer_telemetry(reading(factory, f"s{i}", "t", i)) for i in range(25)]  # type: ignore[arg-type]
        dropped = sum(1 for f in futs if f is None)
        await asyncio.gather(*[f for f in futs if f is not None])
        assert dropped == 15
        assert ob.intake_dropped_total == 15
        # Events wait instead of being dropped.
        results = await asyncio.gather(*[ob.put(contact(factory)) for _ in range(40)])  # type: ignore[arg-type]
        assert len(set(results)) == 40


WRITER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from edgeagent.kernel.runtime.clock import Clock
    from edgeagent.kernel.pipeline.event_types import REGISTRY
    from edgeagent.kernel.pipeline.events import EventFactory
    from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig

    async def main():
        f = EventFactory(REGISTRY, "s", "g", Clock(mode="synced"))
        async with Outbox(OutboxConfig(Path(sys.argv[1]))) as ob:
            i = 0
            while True:
                evs = [f.make("contact.changed", f"d{i}-{k}", {"state": "open", "contact": "door"})
                       for k in range(20)]
                seqs = await ob.put_many(evs)
                # Reported only after the commit: these ids are "accepted".
                sys.stdout.write("".join(f"{e.id}\\n" for e in evs))
                sys.stdout.flush()
                i += 1
    asyncio.run(main())
""")


def test_sigkill_mid_write_loses_no_committed_event_and_no_corruption(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    accepted: set[str] = set()
    for round_ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        lines = []
        # Kill at a different point each round, mid-stream.
        for _ in range(200 + 137 * round_):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait()
        complete = [ln for ln in (b"".join(lines) + rest).split(b"\n") if len(ln) == 26]
        accepted.update(x.decode() for x in complete)
        con = sqlite3.connect(db)
        try:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = {r[0] for r in con.execute("SELECT id FROM outbox")}
            seqs = [r[0] for r in con.execute("SELECT seq FROM outbox ORDER BY seq")]
        finally:
            con.close()
        missing = accepted - stored
        assert not missing, f"round {round_}: {len(missing)} accepted events lost"
        assert seqs == list(range(1, len(seqs) + 1)), "seq has a gap"
    assert len(accepted) > 2000


def test_priority_labels_are_the_contract_names() -> None:
    assert [p.label for p in Priority] == ["alarm", "event", "telemetry"]
