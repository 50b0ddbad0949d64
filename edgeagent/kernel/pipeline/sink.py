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
# Telemetry gathers this long (or this many readings) before it goes to the outbox as one operation.
TELEMETRY_LINGER_S = 0.02
TELEMETRY_BATCH = 1000


class EventSink:
    def __init__(self, factory: EventFactory, outbox: Outbox) -> None:
        self.factory = factory
        self._outbox = outbox
        self._observers: list[Observer] = []
        self._telemetry: list[Event] = []
        self._telemetry_timer: asyncio.TimerHandle | None = None

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
        """Fire and forget for telemetry: never waits. Readings gather for up to ``TELEMETRY_LINGER_S``
        (or ``TELEMETRY_BATCH`` readings) and go to the outbox as one operation: one wake-up of its
        thread and one future per batch instead of per reading, and polls of many devices share a commit.
        Overflow policy: if the outbox's intake is full, the batch is dropped and counted."""
        self._telemetry.append(self.factory.make(type_name, device_id, data))
        if len(self._telemetry) >= TELEMETRY_BATCH:
            self.flush_telemetry()
        elif self._telemetry_timer is None:
            self._telemetry_timer = asyncio.get_running_loop().call_later(TELEMETRY_LINGER_S, self.flush_telemetry)

    def flush_telemetry(self) -> None:
        """Hand the gathered readings to the outbox now (called on a timer, and before an orderly stop)."""
        if self._telemetry_timer is not None:
            self._telemetry_timer.cancel()
            self._telemetry_timer = None
        events, self._telemetry = self._telemetry, []
        if not events:
            return
        try:
            fut = self._outbox.offer_telemetry_many(events)
        except OutboxError as exc:  # closed or its thread gone: runs on a timer, so count it here
            metrics.EVENTS_REJECTED.labels("telemetry", type(exc).__name__).inc(len(events))
            log.warning("%d telemetry readings not stored: %s", len(events), exc)
            return
        if fut is None:
            metrics.EVENTS_REJECTED.labels("telemetry", "intake_full").inc(len(events))
            return
        fut.add_done_callback(lambda f: self._telemetry_done(events, f))

    def _telemetry_done(self, events: list[Event], fut: asyncio.Future[list[int]]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            metrics.EVENTS_REJECTED.labels("telemetry", type(exc).__name__).inc(len(events))
            log.warning("%d telemetry readings not stored (first from %s): %s", len(events), events[0].device_id,
                        exc)
            return
        for event, seq in zip(events, fut.result(), strict=True):
            self._accepted(event, seq)

    def _accepted(self, event: Event, seq: int) -> None:
        metrics.EVENTS_ACCEPTED.labels(event.priority.label).inc()
        for obs in self._observers:
            try:
                obs(event, seq)
            except Exception:
                log.exception("event observer failed")
