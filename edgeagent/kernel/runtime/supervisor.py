"""Supervision of named tasks under one TaskGroup root, honest about what is down.

Two kinds of task:

* **Ordinary** (one device's poller, a simulated device): restarted with jittered backoff when it
  fails; after ``intensity`` failures within ``window_s`` it is *given up*: marked failed and
  reported through ``on_give_up`` (a ``device.fault`` event), while the rest of the daemon keeps
  running. A given-up task is not abandoned: it is started again every ``retry_failed_after_s``
  (a disk full for a minute, a bus adapter replugged), and a report that could not be stored
  (``on_give_up`` raised) is kept and retried until it is.
* **Critical** (the uplink, the alarm ticker, inputs that raise alarms): the compound is not
  protected while one is down. It is restarted with a short backoff (at most
  ``critical_backoff_cap_s``); :meth:`Supervisor.problem` reports it, so health and the systemd
  watchdog turn false, once it has been failing for ``critical_unhealthy_after_s``; if it is still
  failing after ``critical_give_up_after_s`` it cannot recover here, and ``on_critical_failure``
  is called: the daemon stops in order and exits non-zero so that systemd restarts it.

"Failing" means: failed and not yet run for ``stable_after_s`` since. ``CancelledError`` always
passes through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from edgeagent.kernel.runtime import metrics
from edgeagent.kernel.runtime.backoff import full_jitter

log = logging.getLogger(__name__)

TaskState = Literal["starting", "running", "backoff", "failed", "stopped", "done"]
Clock = Callable[[], float]


@dataclass
class TaskInfo:
    name: str
    critical: bool = False
    state: TaskState = "starting"
    restarts: int = 0
    last_error: str | None = None
    started_at: float | None = None
    # First failure since the task last ran stably; None while it is healthy.
    failing_since: float | None = None
    gave_up_at: float | None = None
    # A device.fault went out (or is pending) for the current fault episode: one report until it recovers.
    fault_reported: bool = False
    failures: deque[float] = field(default_factory=deque)

    def snapshot(self, now: float | None = None) -> dict[str, object]:
        now = time.monotonic() if now is None else now
        return {"name": self.name, "state": self.state, "critical": self.critical, "restarts": self.restarts,
                "last_error": self.last_error,
                "up_for_s": None if self.started_at is None or self.state != "running"
                else round(now - self.started_at, 1),
                "failing_for_s": None if self.failing_since is None else round(now - self.failing_since, 1)}


@dataclass(frozen=True, slots=True)
class SupervisionPolicy:
    intensity: int = 5
    window_s: float = 60.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    retry_failed_after_s: float = 300.0
    stable_after_s: float = 30.0
    critical_backoff_cap_s: float = 5.0
    critical_unhealthy_after_s: float = 10.0
    critical_give_up_after_s: float = 60.0
    report_retry_s: float = 10.0


def describe(exc: BaseException) -> str:
    """'Type: message' of the error itself, looking inside the groups a TaskGroup raises."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


class Supervisor:
    """Runs named coroutine factories in a TaskGroup owned by the caller."""

    def __init__(
        self,
        tg: asyncio.TaskGroup,
        *,
        intensity: int = 5,
        window_s: float = 60.0,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        policy: SupervisionPolicy | None = None,
        on_give_up: Callable[[TaskInfo], Awaitable[None]] | None = None,
        on_critical_failure: Callable[[TaskInfo], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Clock = time.monotonic,
    ) -> None:
        self._tg = tg
        self.policy = policy or SupervisionPolicy(intensity=intensity, window_s=window_s,
                                                  backoff_base_s=backoff_base_s, backoff_cap_s=backoff_cap_s)
        self._on_give_up = on_give_up
        self._on_critical_failure = on_critical_failure
        self._sleep = sleep
        self._clock = clock
        self.tasks: dict[str, TaskInfo] = {}
        self._handles: dict[str, asyncio.Task[None]] = {}
        # Bounded; overflow drops the oldest (counted in reports_dropped): one report per task is what matters.
        self._pending_reports: deque[TaskInfo] = deque(maxlen=256)
        self.reports_dropped = 0
        self._reporter: asyncio.Task[None] | None = None

    def start(self, name: str, factory: Callable[[], Awaitable[None]], *, restart: bool = True,
              critical: bool = False) -> None:
        if name in self.tasks:
            raise ValueError(f"task {name!r} already supervised")
        info = self.tasks[name] = TaskInfo(name, critical=critical)
        self._handles[name] = self._tg.create_task(self._supervise(info, factory, restart), name=name)

    async def stop(self, name: str) -> None:
        task = self._handles.get(name)
        if task is None or task.done():
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        self.tasks[name].state = "stopped"

    async def stop_all(self, names: list[str] | None = None) -> None:
        for name in list(names if names is not None else self._handles):
            await self.stop(name)
        if names is None and self._reporter is not None:
            self._reporter.cancel()
            self._reporter = None

    async def wait(self, name: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a task to end by itself; True if it did."""
        task = self._handles.get(name)
        if task is None:
            return True
        done, _ = await asyncio.wait([task], timeout=timeout_s)
        return bool(done)

    def snapshot(self) -> list[dict[str, object]]:
        now = self._clock()
        return [t.snapshot(now) for t in self.tasks.values()]

    def problem(self) -> str | None:
        """Why the daemon is not healthy on account of its critical tasks, or None."""
        now = self._clock()
        for info in self.tasks.values():
            if not info.critical:
                continue
            if info.state == "failed":
                return f"critical task {info.name} failed: {info.last_error}"
            if (info.state == "running" and info.started_at is not None
                    and now - info.started_at >= self.policy.stable_after_s):
                info.failing_since = None  # it has run stably since its last failure: recovered
            if (info.failing_since is not None
                    and now - info.failing_since > self.policy.critical_unhealthy_after_s):
                return (f"critical task {info.name} failing for {now - info.failing_since:.0f} s "
                        f"({info.state}): {info.last_error}")
        return None

    @property
    def pending_reports(self) -> int:
        return len(self._pending_reports)

    # --- the loop around one task -------------------------------------------------------------------

    async def _supervise(self, info: TaskInfo, factory: Callable[[], Awaitable[None]], restart: bool) -> None:
        p = self.policy
        while True:
            info.state = "running"
            info.started_at = self._clock()
            metrics.TASK_FAILED.labels(info.name).set(0)
            try:
                await factory()
            except asyncio.CancelledError:
                info.state = "stopped"
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of a supervised task is handled here
                info.last_error = describe(exc)
                now = self._clock()
                if now - info.started_at >= p.stable_after_s:
                    info.failing_since = None  # it had recovered; this is a new fault
                    info.fault_reported = False
                if info.failing_since is None:
                    info.failing_since = now
                info.failures.append(now)
                while info.failures and now - info.failures[0] > p.window_s:
                    info.failures.popleft()
                if info.critical:
                    if not restart or now - info.failing_since >= p.critical_give_up_after_s:
                        self._give_up_critical(info)
                        return
                    delay = full_jitter(len(info.failures), p.backoff_base_s, p.critical_backoff_cap_s)
                elif not restart or len(info.failures) > p.intensity:
                    await self._give_up(info)
                    if not restart:
                        return
                    # Not for good: a disk full for a minute or an adapter replugged must not leave
                    # a device unserved until someone restarts the box.
                    await self._sleep(p.retry_failed_after_s)
                    info.failures.clear()
                    info.restarts += 1
                    log.info("%s: trying again after giving up %.0f s ago", info.name, p.retry_failed_after_s)
                    continue
                else:
                    delay = full_jitter(len(info.failures), p.backoff_base_s, p.backoff_cap_s)
                info.state = "backoff"
                info.restarts += 1
                metrics.TASK_RESTARTS.labels(info.name).inc()
                log.warning("%s: failed (%s); restart %d in %.1f s", info.name, info.last_error,
                            info.restarts, delay)
                await self._sleep(delay)
                continue
            info.state = "done"
            info.failing_since = None
            return

    def _give_up_critical(self, info: TaskInfo) -> None:
        info.state = "failed"
        info.gave_up_at = self._clock()
        metrics.TASK_FAILED.labels(info.name).set(1)
        failing = 0.0 if info.failing_since is None else info.gave_up_at - info.failing_since
        log.critical("%s: critical task failing for %.0f s, cannot recover here: %s", info.name, failing,
                     info.last_error)
        if self._on_critical_failure is not None:
            self._on_critical_failure(info)

    async def _give_up(self, info: TaskInfo) -> None:
        info.state = "failed"
        info.gave_up_at = self._clock()
        metrics.TASK_FAILED.labels(info.name).set(1)
        log.error("%s: failed %d times within %.0f s; giving up for %.0f s: %s", info.name, len(info.failures),
                  self.policy.window_s, self.policy.retry_failed_after_s, info.last_error)
        if self._on_give_up is None or info.fault_reported:
            return  # retried on the slow schedule and given up again: the fault was reported already
        info.fault_reported = True
        snapshot = TaskInfo(info.name, info.critical, "failed", info.restarts, info.last_error)
        try:
            await self._on_give_up(snapshot)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - kept and retried: the report must reach the platform
            log.warning("%s: the fault report could not be stored (%s); retrying", info.name, exc)
            if len(self._pending_reports) == self._pending_reports.maxlen:
                self.reports_dropped += 1
            self._pending_reports.append(snapshot)
            if self._reporter is None or self._reporter.done():
                self._reporter = self._tg.create_task(self._retry_reports(), name="supervisor-reports")

    async def _retry_reports(self) -> None:
        assert self._on_give_up is not None
        while self._pending_reports:
            await self._sleep(self.policy.report_retry_s)
            while self._pending_reports:
                info = self._pending_reports[0]
                try:
                    await self._on_give_up(info)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - still failing: try again later
                    log.debug("%s: fault report still not stored: %s", info.name, exc)
                    break
                self._pending_reports.popleft()
                log.info("%s: fault report stored (late)", info.name)
