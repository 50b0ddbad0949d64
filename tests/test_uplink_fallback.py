"""MQTT 5 first, MQTT 3.1.1 when the broker does not speak 5 (amqtt never answers an MQTT 5 CONNECT)."""

from __future__ import annotations

from pathlib import Path

from edgeagent.kernel.pipeline.events import EventFactory
from tests.helpers import running_uplink, wait_until
from tests.peers import Amqtt, Collector


async def test_falls_back_to_311_when_the_broker_ignores_mqtt5(tmp_path: Path, factory: EventFactory) -> None:
    with Amqtt(tmp_path / "amqtt") as broker:
        col = Collector(broker.port, mqtt311=True).start()
        try:
            async with running_uplink(tmp_path, broker.url, connect_timeout_s=2) as (ob, up):
                for _ in range(20):
                    await ob.put(factory.make("contact.changed", "door-1", {"state": "open", "contact": "door"}))
                assert await wait_until(lambda: len(set(col.seqs())) >= 20, timeout_s=30)
                assert up.protocol == "3.1.1"
        finally:
            col.stop()


async def test_pinned_mqtt5_does_not_fall_back(tmp_path: Path) -> None:
    with Amqtt(tmp_path / "amqtt") as broker:
        async with running_uplink(tmp_path, broker.url, connect_timeout_s=1, protocol="5") as (_ob, up):
            assert await wait_until(lambda: up.last_error is not None, timeout_s=10)
            assert up.state != "connected"
            assert "MQTT 5" in (up.last_error or "")
