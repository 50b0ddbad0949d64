from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from edgeagent.kernel.pipeline.events import EventFactory
from tests.helpers import running_uplink, wait_until
from tests.peers import Collector, Mosquitto


async def test_events_reach_the_broker_in_order_and_rows_are_marked_sent(
        tmp_path: Path, broker: Mosquitto, factory: EventFactory) -> None:
    col = Collector(broker.port).start()
    try:
        async with running_uplink(tmp_path, broker.url) as (ob, up):
            for i in range(50):
                await ob.put(factory.make("contact.changed", f"door-{i % 3}", {"state": "open", "contact": "door"}))
            assert await wait_until(lambda: len(col.seqs()) >= 50)
            # PUBACKs arrive a moment after the subscriber has the messages.
            for _ in range(100):
                stats = await ob.stats()
                if stats.classes["event"].unsent == 0:
                    break
                await asyncio.sleep(0.05)
        seqs = col.seqs()
        assert seqs == sorted(seqs)
        assert set(seqs) == set(range(1, 51))
        assert stats.classes["event"].unsent == 0
        status = [orjson.loads(p) for t, p, _r in col.messages if t.endswith("/status")]
        assert status[0]["state"] == "online"
        assert up.protocol == "5"
    finally:
        col.stop()
