"""Reports the outbox's evictions and dead letters to the platform (``outbox.evicted``,
``outbox.dead_lettered``), none lost: both are gaps in ``seq`` the platform must be told about.

The outbox calls :meth:`EvictionReporter.on_evicted` and :meth:`EvictionReporter.on_dead_lettered`
(its ``on_evicted`` and ``on_dead_lettered`` callbacks, on the event loop) after every commit that
evicted or dead-lettered rows. The reporter adds them to what is pending and a supervised task
(:meth:`EvictionReporter.run`) reports the pending counts and seqs at most every ``min_interval_s``,
so a burst becomes one event of each type.

[1] Evictions happen when the disk or the cap is tight, exactly when the report itself may be refused
(``OutboxFullError`` on a full disk). Pending counts are given up only once the report carrying them
is committed; a refused report goes back to pending, merged with whatever was evicted meanwhile, and
is tried again after ``retry_s``. So the platform learns about every gap in ``seq``, late at worst.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from edgeagent.kernel.errors import OutboxError
from edgeagent.kernel.pipeline.event_types import OUTBOX_DEAD_LETTERED, OUTBOX_EVICTED
from edgeagent.kernel.pipeline.outbox import DeadLetterReport, EvictionReport

log = logging.getLogger(__name__)

EVICTION_REPORT_MIN_S = 5.0
EVICTION_RETRY_S = 5.0

# What reports are emitted through: EventSink.emit (type name, device id, data) → durable event.
Emit = Callable[[str, str, Mapping[str, Any]], Awaitable[object]]


class EvictionReporter:
    """Holds evictions and dead letters not yet reported and reports them; see the module docstring."""

    def __init__(
        self,
        emit: Emit,
        *,
        gateway_id: str,
        cap_bytes: int,
        min_interval_s: float = EVICTION_REPORT_MIN_S,
        retry_s: float = EVICTION_RETRY_S,
    ) -> None:
        self._emit = emit
        self._gateway_id = gateway_id
        self._cap_bytes = cap_bytes
        self._min_interval_s = min_interval_s
        self._retry_s = retry_s
        self._pending = EvictionReport()
        self._total = 0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one report in flight: run() and flush() never both take pending
        self.reported_total = 0  # evicted rows whose report is committed
        self.failed_reports = 0  # attempts refused by the outbox (retried), of either type
        self._pending_dead = DeadLetterReport()
        self._dead_total = 0
        self.dead_reported_total = 0  # dead-lettered rows whose report is committed

    @property
    def pending(self) -> EvictionReport:
        """A copy of what is evicted but not yet reported."""
        return self._pending.copy()

    @property
    def pending_dead_letters(self) -> DeadLetterReport:
        """A copy of what is dead-lettered but not yet reported."""
        return self._pending_dead.copy()

    def on_dead_lettered(self, report: DeadLetterReport, total: int) -> None:
        """The outbox's ``on_dead_lettered`` callback: never blocks, only records and wakes :meth:`run`."""
        self._pending_dead.merge(report)
        self._dead_total = max(self._dead_total, total)
        self._wake.set()

    def on_evicted(self, report: EvictionReport, total: int) -> None:
        """The outbox's ``on_evicted`` callback: never blocks, only records and wakes :meth:`run`."""
        self._pending.merge(report)
        self._total = max(self._total, total)
        self._wake.set()  # logged once per report, not once per commit: evictions come in bursts

    async def run(self) -> None:
        """Report what is pending, at most every ``min_interval_s``; runs until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Let a burst of evictions gather into one report.
            await asyncio.sleep(self._min_interval_s)
            if not await self._report_once():
                # [1] still pending: try again later even if nothing new is evicted.
                await asyncio.sleep(self._retry_s)
                self._wake.set()

    async def flush(self) -> bool:
        """Report what is pending now (orderly stop). True when nothing is left pending."""
        return await self._report_once()

    async def _report_once(self) -> bool:
        async with self._lock:
            # Each report stands alone: a refused one does not hold the other back.
            evictions_done = await self._report_evictions()
            dead_done = await self._report_dead_letters()
            return evictions_done and dead_done

    async def _report_dead_letters(self) -> bool:
        if not self._pending_dead:
            return True
        sending, self._pending_dead = self._pending_dead, DeadLetterReport()
        try:
            await self._emit(OUTBOX_DEAD_LETTERED.name, self._gateway_id, {
                "count": sending.count, "alarms": sending.alarms,
                "first_seq": sending.first_seq or 0, "last_seq": sending.last_seq or 0,
                "seqs": sending.seqs, "types": sending.types, "reason": sending.reason,
                "total_dead_lettered": self._dead_total})
        except OutboxError as exc:
            # [1] keep it, merged with what was dead-lettered while this attempt was in flight.
            sending.merge(self._pending_dead)
            self._pending_dead = sending
            self.failed_reports += 1
            log.warning("outbox: dead-letter report not stored (%s); %d events stay pending", exc, sending.count)
            return False
        except BaseException:
            sending.merge(self._pending_dead)
            self._pending_dead = sending
            raise
        self.dead_reported_total += sending.count
        log.warning("outbox: reported %d dead-lettered events (seq %s to %s)",
                    sending.count, sending.first_seq, sending.last_seq)
        return not self._pending_dead

    async def _report_evictions(self) -> bool:
        if not self._pending:
            return True
        sending, self._pending = self._pending, EvictionReport()
        try:
            await self._emit(OUTBOX_EVICTED.name, self._gateway_id, {
                "evicted_telemetry": sending.telemetry, "evicted_event": sending.event,
                "first_seq": sending.first_seq or 0, "last_seq": sending.last_seq or 0,
                "total_evicted": self._total, "cap_bytes": self._cap_bytes})
        except OutboxError as exc:
            # [1] keep it: merged back with what was evicted while this attempt was in flight.
            sending.merge(self._pending)
            self._pending = sending
            self.failed_reports += 1
            log.warning("outbox: eviction report not stored (%s); %d telemetry and %d events stay pending",
                        exc, sending.telemetry, sending.event)
            return False
        except BaseException:
            # Cancelled mid-emit (or a bug): the counts must not vanish with this task.
            sending.merge(self._pending)
            self._pending = sending
            raise
        self.reported_total += sending.telemetry + sending.event
        log.warning("outbox over its cap: evicted %d telemetry and %d events (seq %s to %s)",
                    sending.telemetry, sending.event, sending.first_seq, sending.last_seq)
        return not self._pending
