"""Supervision of named tasks under one TaskGroup root.

Each supervised task (a driver, the uplink) is restarted with jittered backoff when it fails; after
``intensity`` failures within ``window_s`` it is given up, marked failed, reported through
``on_give_up`` (a ``device.fault`` event), and the rest of the daemon keeps running.
``CancelledError`` always passes through.
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


@dataclass
class TaskInfo:
    name: str
    state: TaskState = "starting"
    restarts: int = 0
    last_error: str | None = None
    started_at: float | None = None
    failures: deque[float] = field(default_factory=deque)

    def snapshot(self) -> dict[str, object]:
        return {"name": self.name, "state": self.state, "restarts": self.restarts, "last_error": self.last_error,
                "up_for_s": None if self.started_at is None or self.state != "running"
                else round(time.monotonic() - self.started_at, 1)}


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
        on_give_up: Callable[[TaskInfo], Awaitable[None]] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._tg = tg
        self._intensity = intensity
        self._window_s = window_s
        self._base = backoff_base_s
        self._cap = backoff_cap_s
        self._on_give_up = on_give_up
        self._sleep = sleep
        self.tasks: dict[str, TaskInfo] = {}
        self._handles: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, factory: Callable[[], Awaitable[None]], *, restart: bool = True) -> None:
        if name in self.tasks:
            raise ValueError(f"task {name!r} already supervised")
        info = self.tasks[name] = TaskInfo(name)
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

    async def wait(self, name: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a task to end by itself; True if it did."""
        task = self._handles.get(name)
        if task is None:
            return True
        done, _ = await asyncio.wait([task], timeout=timeout_s)
        return bool(done)

    def snapshot(self) -> list[dict[str, object]]:
        return [t.snapshot() for t in self.tasks.values()]

    async def _supervise(self, info: TaskInfo, factory: Callable[[], Awaitable[None]], restart: bool) -> None:
        while True:
            info.state = "running"
            info.started_at = time.monotonic()
            try:
                await factory()
            except asyncio.CancelledError:
                info.state = "stopped"
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of a supervised task is handled here
                info.last_error = f"{type(exc).__name__}: {exc}"
                now = time.monotonic()
                info.failures.append(now)
                while info.failures and now - info.failures[0] > self._window_s:
                    info.failures.popleft()
                if not restart or len(info.failures) > self._intensity:
                    info.state = "failed"
                    metrics.TASK_FAILED.labels(info.name).set(1)
                    log.error("%s: failed %d times within %.0f s; giving up: %s", info.name,
                              len(info.failures), self._window_s, info.last_error)
                    if self._on_give_up is not None:
                        try:
                            await self._on_give_up(info)
                        except Exception:
                            log.exception("%s: reporting the fault failed", info.name)
                    return
                delay = full_jitter(len(info.failures), self._base, self._cap)
                info.state = "backoff"
                info.restarts += 1
                metrics.TASK_RESTARTS.labels(info.name).inc()
                log.warning("%s: failed (%s); restart %d in %.1f s", info.name, info.last_error,
                            info.restarts, delay)
                await self._sleep(delay)
                continue
            info.state = "done"
            return
