"""The heartbeat: loop lag, outbox progress, gauges, and the systemd watchdog, sent only while the
daemon is healthy. It never takes the daemon down: a failing beat (a slow ``stats()``, an outbox
error) is logged and counted, and the next beat runs as usual."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from edgeagent.kernel.pipeline.outbox import OutboxStats
from edgeagent.kernel.runtime import metrics

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
STATS_EVERY_BEATS = 5
STATS_TIMEOUT_S = 10.0
# The outbox is judged stuck when events wait and nothing was committed for this long.
COMMIT_STALL_S = 30.0
LOOP_LAG_LIMIT_S = 5.0


class OutboxView(Protocol):
    @property
    def alive(self) -> bool: ...

    @property
    def pending_events(self) -> int: ...

    async def stats(self) -> OutboxStats: ...


class Watchdog(Protocol):
    def watchdog(self) -> None: ...


@dataclass
class Progress:
    """What the watchdog judges liveness by."""

    loop_lag_s: float = 0.0
    last_beat: float = 0.0
    failed_beats: int = 0


class Heartbeat:
    def __init__(self, outbox: OutboxView, watchdog: Watchdog, problems: Callable[[], str | None],
                 *, period_s: float = HEARTBEAT_S) -> None:
        self._outbox = outbox
        self._watchdog = watchdog
        self._problems = problems
        self._period_s = period_s
        self.progress = Progress()
        self.last_stats: OutboxStats | None = None
        self._beats = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self._period_s)
            lag = max(0.0, loop.time() - t0 - self._period_s)
            self.progress.loop_lag_s = lag
            self.progress.last_beat = time.monotonic()
            metrics.LOOP_LAG.set(lag)
            self._beats += 1
            try:
                await self._beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the heartbeat reports trouble, it is not trouble itself
                self.progress.failed_beats += 1
                if self.progress.failed_beats in (1, 10) or self.progress.failed_beats % 100 == 0:
                    log.warning("heartbeat: %s: %s (%d failed beats)", type(exc).__name__, exc,
                                self.progress.failed_beats)

    async def _beat(self) -> None:
        if self._beats % STATS_EVERY_BEATS == 0 or self.last_stats is None:
            try:
                self.last_stats = await asyncio.wait_for(self._outbox.stats(), STATS_TIMEOUT_S)
            finally:
                # Even when stats fail, the watchdog decision below must still be taken.
                self._decide()
            export_gauges(self.last_stats)
            return
        self._decide()

    def _decide(self) -> None:
        healthy, why = self.healthy()
        if healthy:
            self._watchdog.watchdog()
        elif self._beats % 10 == 0:
            log.error("watchdog withheld: %s", why)

    def healthy(self) -> tuple[bool, str]:
        if not self._outbox.alive:
            return False, "outbox database thread is not running"
        if self.progress.loop_lag_s > LOOP_LAG_LIMIT_S:
            return False, f"event loop lagging {self.progress.loop_lag_s:.1f} s"
        stats = self.last_stats
        if (stats is not None and self._outbox.pending_events > 0 and stats.last_commit_age_s is not None
                and stats.last_commit_age_s > COMMIT_STALL_S):
            return False, f"no outbox commit for {stats.last_commit_age_s:.0f} s with events waiting"
        if self.progress.last_beat and time.monotonic() - self.progress.last_beat > 10 * self._period_s:
            return False, "heartbeat stalled"
        problem = self._problems()
        if problem is not None:
            return False, problem
        return True, "ok"


def export_gauges(stats: OutboxStats) -> None:
    for label, cs in stats.classes.items():
        metrics.OUTBOX_UNSENT.labels(label).set(cs.unsent)
        metrics.OUTBOX_UNSENT_BYTES.labels(label).set(cs.unsent_bytes)
        metrics.OUTBOX_OLDEST_AGE.labels(label).set(cs.oldest_unsent_age_s or 0)
    metrics.OUTBOX_EVICTED.set(stats.evicted_total)
