"""Named outputs (siren, strobe, door hold) that local rules drive, whatever device carries them.

A relay channel on a Modbus module is one kind; the wristband alarms and camera rules only know the
name. Timed activations are owned here: ``pulse`` switches on, and a task switches off after the
duration (cancelled and restarted when the output is pulsed again, so the latest request wins).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

log = logging.getLogger(__name__)


class Output(Protocol):
    async def set(self, on: bool) -> None: ...


class Outputs:
    def __init__(self) -> None:
        self._outputs: dict[str, Output] = {}
        self._timers: dict[str, asyncio.Task[None]] = {}

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

    async def close(self) -> None:
        for task in self._timers.values():
            task.cancel()
        for task in list(self._timers.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._timers.clear()
