"""The uplink against a broker that keeps going away: nothing lost, duplicates only re-sends."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from pathlib import Path

from edgeagent.kernel.pipeline.events import EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from tests.helpers import running_uplink, wait_until
from tests.peers import Collector, Mosquitto


async def test_broker_restarted_20_times_during_10000_events_no_gap(
        tmp_path: Path, factory: EventFactory) -> None:
    broker = Mosquitto(tmp_path / "broker", persistence=True)
    broker.start()
    col = Collector(broker.port, persistent=True).start()
    total = 10_000
    restarts = 20
    try:
        async with running_uplink(tmp_path, broker.url, batch_max_events=50, max_inflight_batches=4) as (ob, up):
            acked: set[int] = set()
            real_ack = ob.ack_nowait

            def spy(batch):  # type: ignore[no-untyped-def]
                acked.update(batch.seqs)
                return real_ack(batch)

            ob.ack_nowait = spy  # type: ignore[method-assign]

            async def produce() -> None:
                for i in range(total):
                    kind = i % 10
                    if kind == 0:
                        ev = factory.make("panic.pressed", "btn-1", {"location": "guard-room"})
                    elif kind < 4:
                        ev = factory.make("sensor.reading", f"t-{i % 7}",
                                          {"metric": f"m{i}", "value": i, "unit": "degC"})
                    else:
                        ev = factory.make("contact.changed", "door-1", {"state": "open", "contact": "door"})
                    await ob.put(ev)
                    if i % 50 == 0:
                        await asyncio.sleep(0.08)

            async def chaos() -> None:
                rng = random.Random(7)
                for _ in range(restarts):
                    await asyncio.sleep(rng.uniform(0.2, 0.6))
                    await asyncio.to_thread(broker.restart)

            await asyncio.gather(produce(), chaos())
            assert await wait_until(lambda: len(set(col.seqs())) >= total, timeout_s=60), \
                f"received {len(set(col.seqs()))} of {total}"
            connects = up.snapshot()
        by_seq: dict[int, set[str]] = defaultdict(set)
        for e in col.events:
            by_seq[int(e["seq"])].add(str(e["id"]))  # type: ignore[call-overload]
        assert sorted(by_seq) == list(range(1, total + 1)), "a seq is missing"
        assert all(len(ids) == 1 for ids in by_seq.values()), "one seq arrived under two ids"
        duplicates = len(col.events) - total
        # Only unacknowledged batches are re-sent: at most the in-flight window per restart.
        assert duplicates <= restarts * 4 * 50, duplicates
        assert connects["state"] == "connected"
    finally:
        col.stop()
        broker.stop()


async def test_backlog_drains_on_connect_without_new_traffic(tmp_path: Path, factory: EventFactory) -> None:
    """Events queued while the broker is down go out as soon as it is back, with no new event to push them."""
    broker = Mosquitto(tmp_path / "broker")
    ob = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await ob.open()
    try:
        async with running_uplink(tmp_path, broker.url, outbox=ob):
            for _ in range(300):
                await ob.put(factory.make("contact.changed", "door-1", {"state": "open", "contact": "door"}))
            broker.start()
            col = Collector(broker.port).start()
            try:
                assert await wait_until(lambda: len(set(col.seqs())) >= 300, timeout_s=15)
            finally:
                col.stop()
    finally:
        await ob.close()
        broker.stop()


async def test_alarm_raised_offline_arrives_before_backlog(tmp_path: Path, factory: EventFactory) -> None:
    broker = Mosquitto(tmp_path / "broker")
    ob = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await ob.open()
    try:
        for i in range(3000):
            await ob.put(factory.make("sensor.reading", f"s-{i}", {"metric": "t", "value": i, "unit": "degC"}))
        for _ in range(2000):
            await ob.put(factory.make("contact.changed", "door-1", {"state": "open", "contact": "door"}))
        alarm = factory.make("panic.pressed", "btn-1", {"location": "lobby"})
        alarm_seq = await ob.put(alarm)
        broker.start()
        col = Collector(broker.port).start()
        try:
            async with running_uplink(tmp_path, broker.url, outbox=ob, batch_max_events=100):
                assert await wait_until(lambda: len(set(col.seqs())) >= 5001, timeout_s=30)
            order = col.seqs()
            assert order[0] == alarm_seq, "the alarm was not the first event after reconnect"
            # Then ordinary events before telemetry, each class in seq order.
            events = [s for s in order if 3001 <= s <= 5000]
            telemetry = [s for s in order if s <= 3000]
            assert events == sorted(events) and telemetry == sorted(telemetry)
            assert order.index(events[-1]) < order.index(telemetry[0])
        finally:
            col.stop()
    finally:
        await ob.close()
        broker.stop()


async def test_reconnects_within_5s_of_broker_return_after_a_short_outage(
        tmp_path: Path, factory: EventFactory) -> None:
    """Default retry settings: 50 s outage, then the broker returns; connected again within 5 s."""
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    ob = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await ob.open()
    try:
        from edgeagent.cloud_bridge.uplink import Uplink
        from tests.helpers import uplink_config

        cfg = uplink_config(broker.url, retry={})  # the shipped defaults
        up = Uplink(cfg, site_id="site-1", gateway_id="gw-1", outbox=ob, version="t")
        task = asyncio.create_task(up.run())
        try:
            assert await wait_until(lambda: up.state == "connected", 10)
            broker.stop()
            await asyncio.sleep(50)
            assert up.state != "connected"
            broker.start()
            back = time.monotonic()
            assert await wait_until(lambda: up.state == "connected", 10)
            took = time.monotonic() - back
            assert took <= 5.0, f"reconnected {took:.1f} s after the broker returned"
        finally:
            await up.stop(0)
            await asyncio.wait_for(task, 10)
    finally:
        await ob.close()
        broker.stop()


def test_backoff_spreads_reconnects() -> None:
    """Full jitter: many gateways dropped together do not retry in lockstep, and caps hold."""
    from edgeagent.kernel.runtime.backoff import OutageBackoff

    firsts = []
    later = []
    for seed in range(500):
        b = OutageBackoff(rng=random.Random(seed))
        firsts.append(b.next_delay(0))
        for _ in range(6):
            d = b.next_delay(10)
        later.append(d)
        long = b.next_delay(3600)
        assert 0 <= long <= 60
    assert max(firsts) <= 1.0 and max(later) <= 4.0
    # Spread: the 500 first retries are not bunched (roughly uniform over [0, 1]).
    buckets = [sum(1 for f in firsts if i / 10 <= f < (i + 1) / 10) for i in range(10)]
    assert min(buckets) > 20, buckets
    assert len({round(x, 3) for x in later}) > 400


