"""Named outputs (siren, strobe, door hold) that local rules drive, whatever device carries them.

A relay channel on a Modbus module is one kind; the wristband alarms and camera rules only know the
name. Timed activations are owned here: ``pulse`` switches on, and a task switches off after the
duration (cancelled and restarted when the output is pulsed again, so the latest request wins).

Two ways to drive an output:

* ``await set(...)`` / ``await pulse(...)``: the caller waits for the device (the CLI's ``output set``).
* ``request(...)``: returns at once; the alarm path uses it, so a relay module whose link is down (a
  Modbus timeout of seconds) never holds up making an alarm durable or telling anyone. Each output has
  one background lane holding one pending request: a newer request replaces an older one that has not
  started (latest request wins; counted in ``superseded``), so the lane is bounded at one request. Each
  write is bounded by ``timeout_s``. A failing output is logged once when it starts failing and once
  when it works again; every failure is counted (``failures``) per output.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


class Output(Protocol):
    async def set(self, on: bool) -> None: ...


DEFAULT_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class _Request:
    on: bool
    pulse_s: float | None


@dataclass(eq=False, slots=True)
class _Lane:
    """One output's background writer: at most one pending request (latest wins) and one running write."""

    pending: _Request | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    busy: bool = False
    failing: bool = False
    task: asyncio.Task[None] | None = None


class Outputs:
    def __init__(self, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._outputs: dict[str, Output] = {}
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._timeout_s = timeout_s
        self._lanes: dict[str, _Lane] = {}
        self._settled = asyncio.Event()
        self._settled.set()
        self.failures: Counter[str] = Counter()
        self.superseded: Counter[str] = Counter()

    def register(self, name: str, output: Output) -> None:
        if name in self._outputs:
            raise ValueError(f"output {name!r} registered twice")
        self._outputs[name] = output

    def __contains__(self, name: object) -> bool:
        return name in self._outputs

    def names(self) -> list[str]:
        return sorted(self._outputs)

    def _get(self, name: str) -> Output:
        try:
            return self._outputs[name]
        except KeyError:
            raise KeyError(f"no output {name!r} (known: {', '.join(self.names()) or 'none'})") from None

    async def set(self, name: str, on: bool) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        await self._get(name).set(on)

    async def pulse(self, name: str, seconds: float) -> None:
        """On now, off after ``seconds`` (without holding the caller)."""
        await self.set(name, True)
        self._timers[name] = asyncio.get_running_loop().create_task(self._off_later(name, seconds))

    async def _off_later(self, name: str, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._timers.pop(name, None)
        try:
            await self._outputs[name].set(False)
        except Exception:
            log.exception("output %s: switching off after %.1f s failed", name, seconds)

    # --- background lanes (the alarm path) -------------------------------------------------------------

    def request(self, name: str, on: bool, pulse_s: float | None = None) -> None:
        """Switch ``name`` in the background (``pulse_s``: on, then off after that long); returns at once.
        Raises KeyError for an unknown output. Call on the event loop."""
        self._get(name)
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = _Lane()
        if lane.pending is not None:
            self.superseded[name] += 1
        lane.pending = _Request(on, pulse_s if on else None)
        lane.wake.set()
        self._settled.clear()
        if lane.task is None or lane.task.done():
            lane.task = asyncio.get_running_loop().create_task(self._drive(name, lane), name=f"output:{name}")

    async def settled(self) -> None:
        """Wait until every requested switch has been tried (succeeded, failed or timed out)."""
        await self._settled.wait()

    def snapshot(self) -> dict[str, object]:
        return {"failing": sorted(n for n, lane in self._lanes.items() if lane.failing),
                "failures": dict(self.failures), "superseded": dict(self.superseded)}

    async def _drive(self, name: str, lane: _Lane) -> None:
        while True:
            await lane.wake.wait()
            lane.wake.clear()
            req, lane.pending = lane.pending, None
            if req is None:
                continue
            lane.busy = True
            try:
                await self._apply(name, lane, req)
            finally:
                lane.busy = False
                self._check_settled()

    async def _apply(self, name: str, lane: _Lane, req: _Request) -> None:
        state = "on" if req.on else "off"
        try:
            async with asyncio.timeout(self._timeout_s):
                if req.pulse_s is not None:
                    await self.pulse(name, req.pulse_s)
                else:
                    await self.set(name, req.on)
        except Exception as exc:  # a dead output must not end its lane; the next request retries
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A driver's wait_for (Python 3.11) can turn our cancellation into its own error: stop anyway.
                raise asyncio.CancelledError from exc
            self.failures[name] += 1
            why = f"no answer within {self._timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
            if not lane.failing:
                lane.failing = True
                log.error("output %s: could not be switched %s: %s (logged once until it works again)",
                          name, state, why)
            else:
                log.debug("output %s: still failing (%s): %s", name, state, why)
            return
        if lane.failing:
            lane.failing = False
            log.warning("output %s: works again (switched %s after %d failures)", name, state, self.failures[name])

    def _check_settled(self) -> None:
        if all(lane.pending is None and not lane.busy for lane in self._lanes.values()):
            self._settled.set()

    async def close(self) -> None:
        lanes = [lane.task for lane in self._lanes.values() if lane.task is not None]
        for task in lanes:
            task.cancel()
        for task in lanes:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._lanes.clear()
        self._settled.set()
        for task in self._timers.values():
            task.cancel()
        for task in list(self._timers.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._timers.clear()
