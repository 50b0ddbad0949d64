"""Corrects event times stamped before the clock was synchronised, and tells the platform.

A box without an RTC starts with a wrong wall clock; events made then carry ``clock_synced: false``,
the boot id and the monotonic time. Once the kernel reports the clock synchronised:

* unsent events of this boot are rewritten with their true time (the outbox does it in slices, so
  intake and the uplink keep moving during a large backlog);
* ``gateway.clock.synced`` tells the platform how to correct the events already sent:
  ``occurred_at = wall_at_sync - (monotonic_ms - event.clock.monotonic_ms)``.

[1] This also runs at start-up: a daemon restarted after NTP synced, in the same boot, finds rows of
this boot stamped before the sync that nobody corrected (the previous process stopped first). The
transition is not seen again (the clock is synced from the first look), so the start is the only
chance. The outbox's key-value store remembers the boot already reported, so restarts within one
boot do not repeat the event when there is nothing left to correct.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from edgeagent.kernel.errors import OutboxError
from edgeagent.kernel.pipeline.event_types import CLOCK_SYNCED
from edgeagent.kernel.pipeline.events import utc_ms
from edgeagent.kernel.pipeline.outbox import CLOCK_SLICE_ROWS, Outbox
from edgeagent.kernel.runtime.clock import Clock

log = logging.getLogger(__name__)

CLOCK_POLL_S = 10.0
# kv key: the boot id whose gateway.clock.synced is committed.
REPORTED_BOOT_KEY = "outbox.clock_synced_boot"

Emit = Callable[[str, str, Mapping[str, Any]], Awaitable[object]]


class ClockFixer:
    """Run :meth:`run` as a supervised task; it returns once this boot's times are corrected."""

    def __init__(
        self,
        clock: Clock,
        outbox: Outbox,
        emit: Emit,
        *,
        gateway_id: str,
        poll_s: float = CLOCK_POLL_S,
        slice_rows: int = CLOCK_SLICE_ROWS,
    ) -> None:
        self._clock = clock
        self._outbox = outbox
        self._emit = emit
        self._gateway_id = gateway_id
        self._poll_s = poll_s
        self._slice_rows = slice_rows
        self.corrected_total = 0

    async def run(self) -> None:
        at_start = self._clock.synced  # [1]
        pending = at_start
        while True:
            if not pending and self._clock.poll():
                pending = True  # the transition: Clock.poll() reports it only once, so it is kept here
            if pending:
                try:
                    await self._fix(at_start=at_start)
                except OutboxError as exc:
                    log.warning("clock synchronised, but correcting event times failed (retrying): %s", exc)
                else:
                    return  # the clock stays synchronised for the rest of this boot
            await asyncio.sleep(self._poll_s)

    async def _fix(self, *, at_start: bool) -> None:
        clock = self._clock
        # One instant for both, so the platform's formula holds for every event of this boot.
        now_mono = clock.monotonic_ns()
        wall = clock.now()
        corrected, sent = await self._outbox.correct_clock(
            clock.boot_id, lambda mono: utc_ms(clock.corrected_wall(mono)), slice_rows=self._slice_rows)
        self.corrected_total += corrected
        if at_start and corrected == 0 and (
                sent == 0 or await self._outbox.kv_get(REPORTED_BOOT_KEY) == clock.boot_id):
            return  # nothing of this boot left to correct, or already reported
        log.info("clock synchronised; corrected %d unsent event times (%d were sent uncorrected)", corrected, sent)
        await self._emit(CLOCK_SYNCED.name, self._gateway_id, {
            "boot_id": clock.boot_id, "monotonic_ms": now_mono // 1_000_000, "wall_at_sync": utc_ms(wall),
            "corrected_unsent": corrected, "sent_uncorrected": sent})
        await self._outbox.kv_put(REPORTED_BOOT_KEY, clock.boot_id)
