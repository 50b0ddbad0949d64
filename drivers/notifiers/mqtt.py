"""The guard-room notifier: the alarm JSON (:func:`~edgeagent.drivers.notifiers.common.payload`) on a topic of
the box's own MQTT broker, which works with the internet down."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import ClassVar, Protocol

from edgeagent.drivers.notifiers.common import Now, payload, utcnow
from edgeagent.kernel.alarms.notify import Message, NotifyError
from edgeagent.kernel.alarms.notify_config import MqttNotifierConfig
from edgeagent.kernel.errors import UplinkError

log = logging.getLogger(__name__)


class Publish(Protocol):
    """How the MQTT notifier reaches the local broker; :meth:`MqttSession.publish
    <edgeagent.transport.mqtt.MqttSession.publish>` fits. It raises UplinkError (or OSError) when it cannot."""

    def __call__(self, topic: str, payload: bytes, qos: int = ..., retain: bool = ...) -> Awaitable[None]: ...


class MqttNotifier:
    """Publishes the alarm JSON to ``cfg.topic`` (``{target}`` filled in) on the box's own broker, which
    works with the internet down. The owner of the broker connection reconnects; while it is down,
    ``publish`` raises and the send fails transiently."""

    concurrency: ClassVar[int] = 8

    def __init__(self, publish: Publish, cfg: MqttNotifierConfig, *, name: str = "mqtt", now: Now = utcnow) -> None:
        self._publish = publish
        self._cfg = cfg
        self.name = name
        self._now = now

    async def send(self, target: str, message: Message) -> None:
        if target not in self._cfg.targets:
            raise NotifyError(target, f"{self.name}: does not serve this target", permanent=True)
        topic = self._cfg.topic_for(target)
        body = payload(target, message, self._now())
        try:
            async with asyncio.timeout(self._cfg.timeout_s):
                await self._publish(topic, body, qos=self._cfg.qos, retain=self._cfg.retain)
        except TimeoutError as exc:
            raise NotifyError(target, f"{self.name}: no acknowledgement for {topic!r} within "
                                      f"{self._cfg.timeout_s:g} s") from exc
        except (UplinkError, OSError) as exc:
            raise NotifyError(target, f"{self.name}: publish to {topic!r} failed: {exc}") from exc
        log.debug("%s: published alarm %s (%s) to %s", self.name, message.alarm_id, message.kind, topic)

