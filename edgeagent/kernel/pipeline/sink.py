"""The one way capabilities emit events: build (validated) → outbox (durable) → observers.

Observers (the demo's printer, later the local rules) see an event only once it is durable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from edgeagent.kernel.errors import OutboxError
from edgeagent.kernel.pipeline.events import Attachment, Event, EventData, EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox
from edgeagent.kernel.runtime import metrics

log = logging.getLogger(__name__)

Observer = Callable[[Event, int], None]


class EventSink:
    def __init__(self, factory: EventFactory, outbox: Outbox) -> None:
        self.factory = factory
        self._outbox = outbox
        self._observers: list[Observer] = []

    def observe(self, observer: Observer) -> None:
        self._observers.append(observer)

    async def emit(self, type_name: str, device_id: str, data: Mapping[str, Any] | EventData,
                   attachments: tuple[Attachment, ...] = ()) -> Event:
        """Build and make durable; returns once the event is committed (raises OutboxError if not)."""
        event = self.factory.make(type_name, device_id, data, attachments)
        try:
            seq = await self._outbox.put(event)
        except OutboxError as exc:
            metrics.EVENTS_REJECTED.labels(event.priority.label, type(exc).__name__).inc()
            raise
        self._accepted(event, seq)
        return event

    def emit_telemetry(self, type_name: str, device_id: str, data: Mapping[str, Any] | EventData) -> None:
        """Fire and forget for telemetry: never waits; if intake is full the reading is dropped and counted."""
        event = self.factory.make(type_name, device_id, data)
        fut = self._outbox.offer_telemetry(event)
        if fut is None:
            metrics.EVENTS_REJECTED.labels(event.priority.label, "intake_full").inc()
            return
        fut.add_done_callback(lambda f: self._telemetry_done(event, f))

    def _telemetry_done(self, event: Event, fut: asyncio.Future[list[int]]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            metrics.EVENTS_REJECTED.labels(event.priority.label, type(exc).__name__).inc()
            log.warning("%s: telemetry not stored: %s", event.device_id, exc)
            return
        self._accepted(event, fut.result()[0])

    def _accepted(self, event: Event, seq: int) -> None:
        metrics.EVENTS_ACCEPTED.labels(event.priority.label).inc()
        for obs in self._observers:
            try:
                obs(event, seq)
            except Exception:
                log.exception("event observer failed")
