"""The outbox's bookkeeping under stress: dead letters, rows already published, isolated failures in a
group commit, counters that match the rows, clock correction in slices and after a restart."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.kernel.errors import OutboxError
from edgeagent.kernel.pipeline.clock_fix import ClockFixer
from edgeagent.kernel.pipeline.event_types import REGISTRY
from edgeagent.kernel.pipeline.events import Event, EventFactory, Priority, utc_ms
from edgeagent.kernel.pipeline.evictions import EvictionReporter
from edgeagent.kernel.pipeline.outbox import (
    DEAD_REASON_CHARS,
    DEAD_SEQS_LISTED,
    DEAD_TYPES_LISTED,
    Batch,
    DeadLetterReport,
    Outbox,
    OutboxConfig,
)
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.kernel.runtime.clock import Clock


def contact(f: EventFactory, dev: str = "door-1") -> Event:
    return f.make("contact.changed", dev, {"state": "open", "contact": "door"})


def reading(f: EventFactory, dev: str, metric: str, value: float) -> Event:
    return f.make("sensor.reading", dev, {"metric": metric, "value": value, "unit": "degC"})


def alarm(f: EventFactory, where: str = "hall") -> Event:
    return f.make("panic.pressed", "b1", {"location": where})


# --- dead letters ------------------------------------------------------------------------------------

async def test_dead_lettered_row_leaves_the_sendable_set_and_stays_listable(
        tmp_path: Path, factory: EventFactory) -> None:
    cfg = OutboxConfig(tmp_path / "o.db")
    async with Outbox(cfg) as ob:
        await ob.put_many([contact(factory, f"d{i}") for i in range(3)])
        batch = await ob.lease(10, 1 << 20)
        assert batch is not None and batch.seqs == (1, 2, 3)
        # The broker refuses the message; the uplink gives up on seq 2 alone and sends the rest again.
        assert await ob.dead_letter([2], "broker refused: payload format invalid") == 1
        assert await ob.dead_letter([2, 99], "again") == 0  # already dead, unknown: ignored
        await ob.reset_leases()
        again = await ob.lease(10, 1 << 20)
        assert again is not None and again.seqs == (1, 3)
        ob.ack_nowait(Batch(again.priority, (1, 2, 3), again.payloads))  # acking a dead row is a no-op
        await ob.put(contact(factory, "d3"))
        nxt = await ob.lease(10, 1 << 20)
        assert nxt is not None and nxt.seqs == (4,), "the dead row blocked its class"
        ob.ack_nowait(nxt)
        stats = await ob.stats()
        dead = await ob.dead_letters(10)
    assert stats.dead_lettered_total == 1 and stats.dead_letters == 1
    assert stats.classes["event"].unsent == 0 and stats.classes["event"].unsent_bytes == 0
    assert [(d.seq, d.priority, d.type, d.device_id) for d in dead] == [(2, Priority.EVENT, "contact.changed", "d1")]
    assert dead[0].reason == "broker refused: payload format invalid"
    assert orjson.loads(dead[0].payload)["seq"] == 2
    # Durable: a restart neither sends it again nor forgets it, and seq goes on past it.
    async with Outbox(cfg) as ob:
        assert await ob.lease(10, 1 << 20) is None
        stats = await ob.stats()
        assert stats.dead_lettered_total == 1 and stats.dead_letters == 1
        assert await ob.put(contact(factory)) == 5


async def test_dead_letters_are_kept_only_up_to_their_cap(tmp_path: Path, factory: EventFactory) -> None:
    async with Outbox(OutboxConfig(tmp_path / "o.db", dead_letter_bytes=3_000)) as ob:
        await ob.put_many([contact(factory, f"d{i}") for i in range(40)])
        batch = await ob.lease(100, 1 << 20)
        assert batch is not None
        assert await ob.dead_letter(batch.seqs, "refused") == 40
        stats = await ob.stats()
        kept = await ob.dead_letters(100)
    assert stats.dead_lettered_total == 40
    assert 0 < stats.dead_letters == len(kept) < 40
    assert [d.seq for d in kept] == list(range(41 - len(kept), 41)), "not the newest that were kept"


async def test_dead_letters_are_reported_to_the_platform_with_their_seqs(
        tmp_path: Path, factory: EventFactory) -> None:
    sinks: list[EventSink] = []
    reporter = EvictionReporter(lambda *a: sinks[0].emit(*a),  # noqa: PLW0108 - no sink before the outbox
                                gateway_id="gw-1", cap_bytes=1 << 20,
                                min_interval_s=0.01, retry_s=0.05)
    cfg = OutboxConfig(tmp_path / "o.db")
    async with Outbox(cfg, on_dead_lettered=reporter.on_dead_lettered) as ob:
        sinks.append(EventSink(factory, ob))
        await ob.put_many([alarm(factory), contact(factory, "d1"), contact(factory, "d2"),
                           reading(factory, "s1", "t", 1), contact(factory, "d3")])
        first = await ob.lease(1, 1 << 20)
        rest = await ob.lease(10, 1 << 20)
        assert first is not None and rest is not None and rest.seqs == (2, 3, 5)
        assert await ob.dead_letter(first.seqs, "refused: alarm too big") == 1
        assert await ob.dead_letter([5, 3], "x" * 1000) == 2
        # Pending as soon as dead_letter() returned: a crash of the reporter task later cannot lose it.
        pending = reporter.pending_dead_letters
        assert (pending.count, pending.alarms, pending.seqs) == (3, 1, [1, 3, 5])
        assert await reporter.flush()
        assert not reporter.pending_dead_letters and reporter.dead_reported_total == 3
        ob.ack_nowait(Batch(rest.priority, (2,), rest.payloads[:1]))
        out = await ob.lease(10, 1 << 20)
    assert out is not None
    envs = [orjson.loads(p) for p in out.payloads]
    assert [e["type"] for e in envs] == ["outbox.dead_lettered"]
    REGISTRY.get("outbox.dead_lettered").data_model.model_validate(envs[0]["data"])
    assert envs[0]["data"] == {
        "count": 3, "alarms": 1, "first_seq": 1, "last_seq": 5, "seqs": [1, 3, 5],
        "types": ["panic.pressed", "contact.changed"], "reason": "x" * 200, "total_dead_lettered": 3}
    assert envs[0]["seq"] == 6


dead_rows = st.lists(
    st.tuples(st.integers(1, 10**9), st.sampled_from([p.value for p in Priority]),
              st.sampled_from([f"type.{i}" for i in range(30)]), st.text(min_size=1, max_size=300)),
    unique_by=lambda r: r[0], max_size=300)


@given(dead_rows, st.data())
@settings(max_examples=200, deadline=None)
def test_dead_letter_reports_merged_in_any_split_equal_one_report(
        rows: list[tuple[int, int, str, str]], data: st.DataObject) -> None:
    """However the rows fall into commits and pending reports, the one reported says the same: the
    lowest 100 seqs in order, the first 20 types, the latest reason; counts and range over all."""
    whole = DeadLetterReport()
    for r in rows:
        whole.add(*r)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(rows)), max_size=6)))
    merged = DeadLetterReport()
    for a, b in itertools.pairwise([0, *cuts, len(rows)]):
        part = DeadLetterReport()
        for r in rows[a:b]:
            part.add(*r)
        merged.merge(part.copy())
    assert merged == whole
    assert whole.count == len(rows) and whole.alarms == sum(1 for r in rows if r[1] == Priority.ALARM)
    assert whole.seqs == sorted(r[0] for r in rows)[:DEAD_SEQS_LISTED]
    assert whole.types == list(dict.fromkeys(r[2] for r in rows))[:DEAD_TYPES_LISTED]
    assert whole.reason == (rows[-1][3][:DEAD_REASON_CHARS] if rows else "")
    if rows:
        assert (whole.first_seq, whole.last_seq) == (min(r[0] for r in rows), max(r[0] for r in rows))


# --- one outbox per database ---------------------------------------------------------------------

OPEN_AGAIN = """
import asyncio, sys
from pathlib import Path
from edgeagent.kernel.errors import OutboxError
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig

async def main():
    try:
        async with Outbox(OutboxConfig(Path(sys.argv[1]))):
            print("opened")
    except OutboxError as exc:
        print(exc)
asyncio.run(main())
"""


async def test_a_second_outbox_on_the_same_database_is_refused(tmp_path: Path, factory: EventFactory) -> None:
    """Two Outbox objects on one file keep two sets of counters and seqs: the one that did not send
    said 5 unsent alarms and no dead letters where the rows said none unsent and one dead letter."""
    cfg = OutboxConfig(tmp_path / "o.db")
    async with Outbox(cfg) as ob:
        await ob.put_many([alarm(factory) for _ in range(5)])
        with pytest.raises(OutboxError, match=r"already open \(by this process\)"):
            async with Outbox(cfg):
                pass
        other = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", OPEN_AGAIN, str(cfg.path)],
                                        capture_output=True, text=True, timeout=60, check=True)
        assert f"already open (by pid {os.getpid()})" in other.stdout, other.stdout + other.stderr
        batch = await ob.lease(10, 1 << 20)
        assert batch is not None
        ob.ack_nowait(batch)
        stats = await ob.stats()
        assert stats.classes["alarm"].unsent == 0
    # Closing gives the database up: the next daemon opens it, and finds what the first one left.
    async with Outbox(cfg) as ob:
        assert (await ob.stats()).history_rows == 5
    assert "opened" in (await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", OPEN_AGAIN, str(cfg.path)], capture_output=True, text=True,
        timeout=60, check=True)).stdout


# --- coalescing never touches a row that may be on the platform ------------------------------------

async def test_no_coalescing_into_a_row_published_before_a_reconnect(tmp_path: Path, factory: EventFactory) -> None:
    async with Outbox(OutboxConfig(tmp_path / "o.db")) as ob:
        await ob.put(reading(factory, "s1", "t", 1))
        first = await ob.lease(10, 1 << 20)
        assert first is not None  # published; the connection drops before its PUBACK
        await ob.reset_leases()
        await ob.put(reading(factory, "s1", "t", 2))
        second = await ob.lease(10, 1 << 20)
    assert second is not None
    sent = [orjson.loads(p) for p in first.payloads + second.payloads]
    by_id: dict[str, set[bytes]] = {}
    for env in sent:
        by_id.setdefault(env["id"], set()).add(orjson.dumps(env["data"]))
    assert all(len(v) == 1 for v in by_id.values()), "one id went out with two different values"
    assert [e["data"]["value"] for e in sent] == [1, 1, 2]


async def test_no_coalescing_into_a_row_published_before_a_restart(tmp_path: Path, factory: EventFactory) -> None:
    cfg = OutboxConfig(tmp_path / "o.db")
    async with Outbox(cfg) as ob:
        await ob.put(reading(factory, "s1", "t", 1))
        first = await ob.lease(10, 1 << 20)
        assert first is not None  # published; the daemon dies before the PUBACK
    async with Outbox(cfg) as ob:
        seq = await ob.put(reading(factory, "s1", "t", 2))
        again = await ob.lease(10, 1 << 20)
        # Readings arriving while nothing was ever leased still coalesce.
        await ob.put(reading(factory, "s1", "t", 3))
        await ob.put(reading(factory, "s1", "t", 4))
        stats = await ob.stats()
    assert seq == 2
    assert again is not None and [orjson.loads(p)["data"]["value"] for p in again.payloads] == [1, 2]
    assert stats.classes["telemetry"].unsent == 3 and stats.coalesced_total == 1


# --- one failing operation does not fail its group ------------------------------------------------

async def test_a_failing_operation_fails_alone_and_the_alarm_in_its_group_commits(
        tmp_path: Path, factory: EventFactory) -> None:
    cfg = OutboxConfig(tmp_path / "o.db")
    async with Outbox(cfg) as ob:
        gate = threading.Event()
        # Hold the database thread so that everything below lands in one group commit.
        held = asyncio.ensure_future(ob.query(lambda _c: gate.wait(10)))
        before = asyncio.ensure_future(ob.put(contact(factory)))
        bad = asyncio.ensure_future(ob.query(
            lambda c: c.execute("INSERT INTO kv(key, value) VALUES ('lockout', NULL)")))  # NOT NULL fails
        siren = asyncio.ensure_future(ob.put(alarm(factory)))
        await asyncio.sleep(0)  # each task has queued its operation (nothing awaits before that)
        gate.set()
        await held
        with pytest.raises(OutboxError, match="NOT NULL"):
            await bad
        assert await before == 1
        assert await siren == 2, "the alarm was lost with the failing operation, or seq has a gap"
        stats = await ob.stats()
        assert stats.classes["alarm"].unsent == 1 and stats.classes["event"].unsent == 1
    con = sqlite3.connect(cfg.path)
    try:
        assert con.execute("SELECT COUNT(*) FROM outbox WHERE prio=0").fetchone()[0] == 1
        assert con.execute("SELECT COUNT(*) FROM kv").fetchone()[0] == 0
    finally:
        con.close()


async def test_a_failing_operation_leaves_no_partial_writes(tmp_path: Path, factory: EventFactory) -> None:
    def half_then_fail(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO kv(key, value) VALUES ('a', '1')")
        raise RuntimeError("failed after one write")

    async with Outbox(OutboxConfig(tmp_path / "o.db")) as ob:
        with pytest.raises(OutboxError, match="failed after one write"):
            await ob.query(half_then_fail)
        await ob.kv_put("b", 2)
        assert await ob.kv_get("a") is None
        assert await ob.kv_get("b") == 2


# --- counters -------------------------------------------------------------------------------------

def recount(c: sqlite3.Connection, now_ms: int) -> dict[str, Any]:
    """What stats() must say, from the rows themselves."""
    out: dict[str, Any] = {}
    for p in Priority:
        n, nbytes = c.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE sent_ms IS NULL AND prio=?",
                              (p.value,)).fetchone()
        row = c.execute("SELECT created_ms FROM outbox WHERE sent_ms IS NULL AND prio=? ORDER BY seq LIMIT 1",
                        (p.value,)).fetchone()
        out[p.label] = (n, nbytes, None if row is None else max(0.0, (now_ms - row[0]) / 1000))
    out["history"] = c.execute("SELECT COUNT(*) FROM outbox WHERE sent_ms IS NOT NULL").fetchone()[0]
    out["dead"] = c.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    return out


def said(stats: Any) -> dict[str, Any]:
    out: dict[str, Any] = {label: (c.unsent, c.unsent_bytes, c.oldest_unsent_age_s)
                           for label, c in stats.classes.items()}
    out["history"] = stats.history_rows
    out["dead"] = stats.dead_letters
    return out


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_stats_equal_a_recount_after_random_operations(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    wall = [1_790_000_000.0]
    synced = [False]
    clock = Clock("auto", wall=lambda: wall[0], monotonic_ns=lambda: int(wall[0] * 1e9),
                  sync_probe=lambda: synced[0], boot_id="boot-r")
    f = EventFactory(REGISTRY, "site-1", "gw-1", clock)
    now = 1_790_000_500_000
    leases: list[Batch] = []
    async with Outbox(OutboxConfig(tmp_path / "o.db", cap_bytes=6_000), now_ms=lambda: now) as ob:
        for step in range(400):
            wall[0] += rnd.random()
            op = rnd.random()
            if op < 0.35:
                await ob.put(reading(f, f"s{rnd.randrange(4)}", rnd.choice("th"), rnd.random()))
            elif op < 0.55:
                await ob.put(contact(f, f"d{rnd.randrange(5)}"))
            elif op < 0.62:
                await ob.put(alarm(f, f"r{step}"))
            elif op < 0.75:
                b = await ob.lease(rnd.randrange(1, 6), 1 << 20)
                if b is not None:
                    leases.append(b)
            elif op < 0.85 and leases:
                await ob.ack_nowait(leases.pop(rnd.randrange(len(leases))))
            elif op < 0.9 and leases:
                b = leases.pop(rnd.randrange(len(leases)))
                await ob.dead_letter(rnd.sample(b.seqs, rnd.randrange(1, len(b) + 1)), "refused")
            elif op < 0.95:
                await ob.reset_leases()
                leases.clear()
            elif not synced[0]:
                synced[0] = True
                clock.poll()
                await ob.correct_clock("boot-r", lambda m: utc_ms(clock.corrected_wall(m)), slice_rows=7)
            if step % 20 == 0:
                assert said(await ob.stats()) == await ob.query(lambda c: recount(c, now)), f"step {step}"
        stats = await ob.stats()
        assert said(stats) == await ob.query(lambda c: recount(c, now))
    assert stats.evicted_total > 0 and stats.coalesced_total > 0 and stats.dead_lettered_total > 0
    # And the recount at open agrees with what the counters had become.
    async with Outbox(OutboxConfig(tmp_path / "o.db", cap_bytes=6_000), now_ms=lambda: now) as ob:
        assert said(await ob.stats()) == said(stats)


async def test_stats_do_not_read_the_event_table(tmp_path: Path, factory: EventFactory) -> None:
    statements: list[str] = []
    async with Outbox(OutboxConfig(tmp_path / "o.db")) as ob:
        await ob.put_many([contact(factory) for _ in range(50)])
        b = await ob.lease(20, 1 << 20)
        assert b is not None
        ob.ack_nowait(b)
        await ob.flush()
        await ob.query(lambda c: c.set_trace_callback(statements.append))
        stats = await ob.stats()
        await ob.query(lambda c: c.set_trace_callback(None))
    assert stats.history_rows == 20 and stats.classes["event"].unsent == 30
    assert statements, "the trace saw nothing"
    scans = [s for s in statements if "from outbox" in s.lower()]
    assert not scans, f"stats() read the table: {scans}"


# --- clock correction -----------------------------------------------------------------------------

def unsynced_clock(boot_id: str, synced: list[bool], wall: list[float], mono: list[int]) -> Clock:
    return Clock("auto", wall=lambda: wall[0], monotonic_ns=lambda: mono[0], sync_probe=lambda: synced[0],
                 boot_id=boot_id)


async def test_clock_correction_works_in_slices_and_leaves_leased_rows_alone(tmp_path: Path) -> None:
    wall, mono, synced = [1_000.0], [5_000_000_000], [False]
    clock = unsynced_clock("boot-a", synced, wall, mono)
    f = EventFactory(REGISTRY, "site-1", "gw-1", clock)
    async with Outbox(OutboxConfig(tmp_path / "o.db")) as ob:
        await ob.put_many([contact(f, f"d{i}") for i in range(1200)])
        in_flight = await ob.lease(10, 1 << 20)
        assert in_flight is not None
        mono[0] += 3_000_000_000
        wall[0], synced[0] = 1_790_000_000.0, True
        assert clock.poll()
        before = (await ob.stats()).commits_total
        corrected, sent = await ob.correct_clock("boot-a", lambda m: utc_ms(clock.corrected_wall(m)),
                                                 slice_rows=500)
        after = (await ob.stats()).commits_total
        await ob.reset_leases()
        out = []
        while (b := await ob.lease(1000, 1 << 30)) is not None:
            out.extend(orjson.loads(p) for p in b.payloads)
            ob.ack_nowait(b)
        await ob.flush()
        stats = await ob.stats()
    assert (corrected, sent) == (1190, 10)
    assert after - before >= 4, "the correction ran as one transaction"  # 3 slices + the count + stats
    assert [e["clock_synced"] for e in out[:10]] == [False] * 10, "a row already leased was rewritten"
    assert all(e["clock_synced"] and e["clock"]["corrected"] for e in out[10:])
    assert str(out[10]["occurred_at"]).startswith("2026-")
    # The oldest unsent age no longer dates from 1970 once times are corrected.
    assert stats.classes["event"].oldest_unsent_age_s is None


async def test_restart_after_sync_corrects_this_boots_unsynced_rows_once(tmp_path: Path) -> None:
    wall, mono, synced = [1_000.0], [5_000_000_000], [False]
    cfg = OutboxConfig(tmp_path / "o.db")
    before = unsynced_clock("boot-b", synced, wall, mono)
    async with Outbox(cfg) as ob:
        await ob.put_many([contact(EventFactory(REGISTRY, "site-1", "gw-1", before), f"d{i}") for i in range(3)])
        sent = await ob.lease(1, 1 << 20)
        assert sent is not None
        ob.ack_nowait(sent)
        await ob.flush()
    # NTP synced while the daemon was down; it starts again in the same boot with a synced clock.
    mono[0] += 60_000_000_000
    wall[0], synced[0] = 1_790_000_000.0, True

    async def start() -> list[Event]:
        clock = unsynced_clock("boot-b", synced, wall, mono)
        assert clock.synced
        seen: list[Event] = []
        async with Outbox(cfg) as ob:
            sink = EventSink(EventFactory(REGISTRY, "site-1", "gw-1", clock), ob)
            sink.observe(lambda e, _s: seen.append(e))
            await asyncio.wait_for(ClockFixer(clock, ob, sink.emit, gateway_id="gw-1", poll_s=0.01).run(), 10)
        return seen

    first = await start()
    assert [e.type for e in first] == ["gateway.clock.synced"]
    assert first[0].data["corrected_unsent"] == 2 and first[0].data["sent_uncorrected"] == 1
    con = sqlite3.connect(cfg.path)
    try:
        rows = [orjson.loads(p) for (p,) in con.execute("SELECT payload FROM outbox WHERE seq IN (2, 3)")]
    finally:
        con.close()
    assert all(r["clock_synced"] and r["clock"]["corrected"] for r in rows)
    assert all(str(r["occurred_at"]).startswith("2026-") for r in rows)
    # Another restart in the same boot: nothing left to correct, already reported.
    assert await start() == []


async def test_clock_fixer_corrects_on_the_transition(tmp_path: Path) -> None:
    wall, mono, synced = [1_000.0], [5_000_000_000], [False]
    clock = unsynced_clock("boot-c", synced, wall, mono)
    f = EventFactory(REGISTRY, "site-1", "gw-1", clock)
    seen: list[Event] = []
    async with Outbox(OutboxConfig(tmp_path / "o.db")) as ob:
        sink = EventSink(f, ob)
        sink.observe(lambda e, _s: seen.append(e))
        await ob.put(contact(f))
        task = asyncio.create_task(ClockFixer(clock, ob, sink.emit, gateway_id="gw-1", poll_s=0.01).run())
        await asyncio.sleep(0.05)
        assert not task.done() and not seen
        mono[0] += 1_000_000_000
        wall[0], synced[0] = 1_790_000_000.0, True
        await asyncio.wait_for(task, 10)
        out = await ob.lease(10, 1 << 20)
    assert out is not None
    envs = [orjson.loads(p) for p in out.payloads]
    assert [e["type"] for e in envs] == ["contact.changed", "gateway.clock.synced"]
    assert envs[0]["clock_synced"] is True and envs[0]["clock"]["corrected"] is True
    assert envs[1]["data"]["corrected_unsent"] == 1 and envs[1]["data"]["boot_id"] == "boot-c"


def split(b: Batch, rnd: random.Random) -> list[Batch]:
    """A lease cut into runs, in order, as the uplink cuts one the broker cannot take whole."""
    cuts = sorted(rnd.sample(range(1, len(b)), rnd.randrange(len(b)))) if len(b) > 1 else []
    bounds = [0, *cuts, len(b)]
    return [Batch(b.priority, b.seqs[i:j], b.payloads[i:j]) for i, j in itertools.pairwise(bounds)]


async def send_through_another_outbox(cfg: OutboxConfig) -> None:
    other = Outbox(cfg)
    try:
        await other.open()
    except OutboxError:
        return
    try:
        if (b := await other.lease(5, 1 << 20)) is not None:
            await other.dead_letter(b.seqs[:1], "too big")
            other.ack_nowait(b)
        await other.flush()
    finally:
        await other.close()


@pytest.mark.parametrize("seed", range(8))
async def test_counters_survive_split_leases_partial_acks_and_dead_letters(tmp_path: Path, seed: int) -> None:
    """Lease → split → ack some parts → dead-letter one event of a part → ack the rest of it (the whole
    part, dead seq included) → reset → restart, in random order: the counters equal a recount after
    every step, and dead_lettered_total is what dead_letter() returned, across restarts too."""
    rnd = random.Random(1000 + seed)
    f = EventFactory(REGISTRY, "site-1", "gw-1", Clock(mode="synced"))
    now = 1_790_000_500_000
    cfg = OutboxConfig(tmp_path / "o.db", cap_bytes=40_000, durability="normal")
    in_flight: list[Batch] = []
    dead_total = 0
    ob = Outbox(cfg, now_ms=lambda: now)
    await ob.open()
    try:
        for step in range(300):
            op = rnd.random()
            if op < 0.3:
                makers = [lambda: alarm(f, f"r{step}"), lambda: contact(f, f"d{rnd.randrange(6)}"),
                          lambda: reading(f, f"s{rnd.randrange(3)}", "t", rnd.random())]
                await ob.put_many([rnd.choice(makers)() for _ in range(rnd.randrange(1, 6))])
            elif op < 0.45:
                b = await ob.lease(rnd.randrange(1, 12), rnd.choice([400, 1 << 20]))
                if b is not None:
                    in_flight.extend(split(b, rnd))
            elif op < 0.6 and in_flight:
                ob.ack_nowait(in_flight.pop(rnd.randrange(len(in_flight))))  # not awaited: [3] orders it
            elif op < 0.75 and in_flight:
                part = in_flight.pop(rnd.randrange(len(in_flight)))
                victim = rnd.choice(part.seqs)
                dead_total += await ob.dead_letter([victim], "too big")
                if rnd.random() < 0.7:
                    ob.ack_nowait(part)  # the rest of the part, its dead seq too (a no-op for that one)
                else:
                    in_flight.append(part)  # acked, dead-lettered again or forgotten later
            elif op < 0.8 and in_flight:
                part = in_flight.pop(rnd.randrange(len(in_flight)))
                dead_total += await ob.dead_letter(part.seqs, "refused")
                ob.ack_nowait(part)  # a late PUBACK for rows already dead: ignored
            elif op < 0.9:
                await ob.reset_leases()
                in_flight.clear()
            elif op < 0.93:
                # What test_uplink_packet_size once did: a second Outbox on the file doing the sending
                # (its acks and dead letters never reached this one's counters). It must be refused.
                await send_through_another_outbox(cfg)
            elif op < 0.97:
                await ob.close()
                ob = Outbox(cfg, now_ms=lambda: now)
                await ob.open()
                in_flight.clear()
            await ob.flush()
            stats = await ob.stats()
            assert said(stats) == await ob.query(lambda c: recount(c, now)), f"seed {seed} step {step}"
            assert stats.dead_lettered_total == dead_total, f"seed {seed} step {step}"
        stored = await ob.query(lambda c: c.execute(
            "SELECT value FROM meta WHERE key='dead_lettered_total'").fetchone()[0])
        assert stored == dead_total > 0
    finally:
        await ob.close()


async def test_the_daemon_reports_its_dead_letters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeagent.app import Daemon
    from edgeagent.capabilities import Config
    from edgeagent.kernel.pipeline import evictions
    from tests.helpers import wait_until

    monkeypatch.setattr(evictions, "EVICTION_REPORT_MIN_S", 0.05)
    # No uplink configured: nothing but this test leases.
    daemon = Daemon(Config.model_validate({
        "version": 1, "site_id": "site-1", "gateway_id": "gw-1", "state_dir": str(tmp_path / "state"),
        "clock": {"sync": "synced"}, "health": {"port": 0}, "devices": []}))
    seen: list[Event] = []
    daemon.sink.observe(lambda e, _s: seen.append(e))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(shutdown_trigger=stop.wait))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 15)
        seq = await daemon.outbox.put(contact(daemon.factory, "door-9"))
        batch = await daemon.outbox.lease(100, 1 << 30)
        assert batch is not None and seq in batch.seqs
        assert await daemon.outbox.dead_letter([seq], "refused") == 1
        assert await wait_until(lambda: any(e.type == "outbox.dead_lettered" for e in seen), 15)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    report = next(e for e in seen if e.type == "outbox.dead_lettered")
    assert report.data["seqs"] == [seq] and report.data["types"] == ["contact.changed"]
    assert report.data["total_dead_lettered"] == 1
