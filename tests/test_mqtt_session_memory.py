"""MqttSession over a long session: what paho reports for QoS 0 messages must not be kept.

paho calls ``on_publish`` for a QoS 0 message once it is written, and nobody waits for it. The session
used to keep such a report as a completed future, "a PUBACK that arrived before publish() registered"
(which cannot happen: a PUBACK is read on the loop, after publish() has registered): one future per
QoS 0 message, up to 65,535 per session, and once the message ids wrapped, a QoS 1 publish reusing
such an id returned at once, as if acknowledged, with no PUBACK (the uplink then marks its events
sent). The uplink answers unverified commands at QoS 0, so a flood of them reaches this.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal

import pytest

from edgeagent.transport.mqtt import MqttSession, PubackTimeout, SessionParams
from tests.peers import Mosquitto


def live_futures() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, asyncio.Future))


async def test_qos0_publishes_keep_nothing(broker: Mosquitto) -> None:
    async with MqttSession(SessionParams("127.0.0.1", broker.port, "qos0-count")) as s:
        await s.publish("t/warm", b"x", qos=1)
        before = live_futures()
        for _ in range(2000):
            await s.publish("t/x", b"x", qos=0)
        await s.publish("t/sync", b"x", qos=1)  # written after every QoS 0 one: their reports are in
        after = live_futures()
    assert after - before < 50, f"{after - before} futures kept for 2,000 QoS 0 messages"


async def test_qos1_after_the_ids_wrapped_still_waits_for_its_puback(broker: Mosquitto) -> None:
    params = SessionParams("127.0.0.1", broker.port, "qos0-wrap", puback_timeout_s=1.0)
    async with MqttSession(params) as s:
        # Every message id once (paho numbers QoS 0 messages too), so the next QoS 1 one reuses one.
        for i in range(65_535):
            await s.publish("t/x", b"x", qos=0)
            if i % 4096 == 0:
                await asyncio.sleep(0)  # let the loop write
        await s.publish("t/sync", b"x", qos=1)
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGSTOP)  # the broker can acknowledge nothing now
        try:
            with pytest.raises(PubackTimeout):  # no PUBACK, so no success
                await s.publish("t/x", b"must wait", qos=1)
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
