"""A failing uplink must not say goodbye: a clean DISCONNECT makes the broker drop the Last Will, and the
platform would go on showing the gateway online. Also: a publish whose PUBACK never comes fails."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import orjson
import pytest

from edgeagent.kernel.errors import OutboxClosedError, UplinkError
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from edgeagent.transport.mqtt import MqttSession, SessionParams
from tests.helpers import running_uplink, uplink_config, wait_until
from tests.peers import Collector, Mosquitto

STATUS = "edgeagent/v1/site-1/gw-1/status"


def states(col: Collector) -> list[tuple[str, str]]:
    with col._lock:
        docs = [orjson.loads(p) for t, p, _r in col.messages if t == STATUS]
    return [(d["state"], d["reason"]) for d in docs]


async def test_uplink_task_failing_lets_the_broker_publish_the_will(tmp_path: Path, broker: Mosquitto) -> None:
    from edgeagent.cloud_bridge.uplink import Uplink

    col = Collector(broker.port, topic=STATUS).start()
    ob = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await ob.open()
    up = Uplink(uplink_config(broker.url), site_id="site-1", gateway_id="gw-1", outbox=ob, version="t")
    task = asyncio.create_task(up.run())
    try:
        assert await wait_until(lambda: ("online", "connected") in states(col), 10)
        # The outbox goes away under the running uplink (its database thread stopped): the uplink's
        # next lease fails and the task ends with that error.
        await ob.close()
        ob.changed.set()
        with pytest.raises(Exception) as failed:  # which exception: checked just below
            await asyncio.wait_for(task, 10)
        inner = failed.value.exceptions if isinstance(failed.value, ExceptionGroup) else (failed.value,)
        assert any(isinstance(e, OutboxClosedError) for e in inner), failed.value
        assert await wait_until(lambda: ("offline", "connection lost") in states(col), 10), states(col)
    finally:
        if not task.done():
            task.cancel()
        col.stop()


async def test_uplink_task_cancelled_lets_the_broker_publish_the_will(tmp_path: Path, broker: Mosquitto) -> None:
    from edgeagent.cloud_bridge.uplink import Uplink

    col = Collector(broker.port, topic=STATUS).start()
    ob = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await ob.open()
    up = Uplink(uplink_config(broker.url), site_id="site-1", gateway_id="gw-1", outbox=ob, version="t")
    task = asyncio.create_task(up.run())
    try:
        assert await wait_until(lambda: ("online", "connected") in states(col), 10)
        # What a supervisor does to a task that does not stop in time.
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_until(lambda: ("offline", "connection lost") in states(col), 10), states(col)
    finally:
        await ob.close()
        col.stop()


async def test_stopping_says_offline_and_disconnects_cleanly(tmp_path: Path, broker: Mosquitto) -> None:
    col = Collector(broker.port, topic=STATUS).start()
    try:
        async with running_uplink(tmp_path, broker.url):
            assert await wait_until(lambda: ("online", "connected") in states(col), 10)
        assert await wait_until(lambda: ("offline", "shutdown") in states(col), 10)
        await asyncio.sleep(0.5)
        assert ("offline", "connection lost") not in states(col)
    finally:
        col.stop()


async def test_publish_without_puback_times_out(broker: Mosquitto) -> None:
    params = SessionParams(host="127.0.0.1", port=broker.port, client_id="puback-test", puback_timeout_s=1)
    async with MqttSession(params) as s:
        await s.publish("t/ok", b"1", qos=1)
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)  # the broker hangs: the TCP connection stays open
        try:
            # The outer bound only keeps a hanging publish from hanging the suite.
            with pytest.raises(UplinkError, match="no PUBACK"):
                await asyncio.wait_for(s.publish("t/lost", b"2", qos=1), 20)
        finally:
            broker.proc.send_signal(signal.SIGCONT)
