"""A broker with a small Maximum Packet Size (mosquitto ``max_packet_size 65536``) and a backlog of
100k events of mixed sizes: every event that fits arrives, an event too big for any message goes to
the dead letters, and no class is blocked (before: 512 KiB batches, the broker dropped the connection
at the first one, and the same batch was leased and sent again forever)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from edgeagent.kernel.pipeline.events import Event, EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from tests.helpers import running_uplink, wait_until
from tests.peers import Collector, Mosquitto

TOTAL = 100_000
MAX_PACKET = 65536


def mixed_events(factory: EventFactory, rng: random.Random) -> tuple[list[Event], set[int]]:
    """Mostly small events, some of a few KiB, some of 20-60 KiB (a few fill a message alone), and three
    of 70 KiB that no message under the limit can carry. Returns the events and the indexes of those."""
    events: list[Event] = []
    too_big: set[int] = set()
    for i in range(TOTAL):
        r = rng.random()
        if i in (1_000, 50_000, 99_000):
            too_big.add(i)
            events.append(factory.make("device.offline", f"dev-{i}", {"reason": "x" * 70_000}))
        elif r < 0.003:
            events.append(factory.make("device.offline", f"dev-{i}", {"reason": "y" * rng.randint(20_000, 60_000)}))
        elif r < 0.05:
            events.append(factory.make("device.fault", f"dev-{i}", {
                "task": "t", "error": "z" * rng.randint(1_000, 4_000), "restarts": 5}))
        elif r < 0.35:
            # Telemetry, one series each (nothing coalesces: every event must arrive).
            events.append(factory.make("sensor.reading", f"s-{i}", {"metric": "t", "value": i, "unit": "degC"}))
        elif r < 0.36:
            events.append(factory.make("panic.pressed", f"btn-{i}", {"location": "lobby"}))
        else:
            events.append(factory.make("contact.changed", f"door-{i}", {"state": "open", "contact": "door"}))
    return events, too_big


async def test_backlog_under_a_small_max_packet_size_is_delivered_whole(
        tmp_path: Path, factory: EventFactory) -> None:
    broker = Mosquitto(tmp_path / "broker")
    with broker.conf.open("a") as f:
        f.write(f"max_packet_size {MAX_PACKET}\n")
    ob = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await ob.open()
    try:
        events, too_big = mixed_events(factory, random.Random(11))
        seqs: list[int] = []
        for i in range(0, TOTAL, 2000):
            seqs += await ob.put_many(events[i:i + 2000])
        lost = {seqs[i] for i in too_big}
        expected = set(seqs) - lost
        broker.start()
        col = Collector(broker.port).start()
        try:
            began = time.monotonic()
            # The uplink sends from this outbox, not a second one on the same file (refused now: it
            # kept its own counters, so stats() here said 1,045 unsent alarms and no dead letters).
            async with running_uplink(tmp_path, broker.url, outbox=ob) as (_ob, up):
                done = await wait_until(lambda: len(set(col.seqs())) >= len(expected), timeout_s=90)
                took = time.monotonic() - began
                snapshot = up.snapshot()
                # PUBACKs arrive a moment after the subscriber has the messages.
                for _ in range(200):
                    unsent = await ob.query(lambda conn: conn.execute(
                        "SELECT COUNT(*) FROM outbox WHERE sent_ms IS NULL").fetchone()[0])
                    if unsent == 0:
                        break
                    await asyncio.sleep(0.05)
            got = set(col.seqs())
            assert done, f"received {len(got)} of {len(expected)}; uplink {snapshot}"
            assert got == expected
            print(f"{len(expected)} events delivered in {took:.1f} s")
            # The broker never had to drop us: one connection did it all.
            assert up.connect_attempts == {"5": 1}, up.connect_attempts
            dead = await ob.dead_letters()
            assert {d.seq for d in dead} == lost
            assert all("maximum packet size" in d.reason for d in dead)
            # Every row is either sent (its PUBACK came) or a dead letter: nothing left to block a class.
            assert unsent == 0
            stats = await ob.stats()
            assert {label: c.unsent for label, c in stats.classes.items()} == {
                "alarm": 0, "event": 0, "telemetry": 0}
            assert stats.dead_lettered_total == stats.dead_letters == len(lost)
        finally:
            col.stop()
    finally:
        await ob.close()
        broker.stop()
