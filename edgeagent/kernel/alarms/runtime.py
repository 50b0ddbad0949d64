"""Runs the pure :class:`~edgeagent.kernel.alarms.engine.AlarmEngine`: carries out its actions, persists its
state, ticks it on time, and takes acknowledgements from any source.

Order of effects for every operation (raise, tick, ack, resolve):

1. outputs (siren, strobe) switch at once: people on site hear it first;
2. events are made durable, then the engine state is saved (``kv_put``), in one await each;
3. notifications go to the notifier hub, which sends them in the background (a slow SMS modem
   never delays the next alarm).

A caller that must not lose an alarm (the wristband input acknowledging its MQTT message) awaits
:meth:`raise_`: when it returns, the alarm's events and state are durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from edgeagent.kernel.alarms.engine import (
    Action,
    Alarm,
    AlarmEngine,
    AlarmError,
    AlarmKind,
    Emit,
    Instant,
    Notify,
    Persist,
    SetOutput,
    WallMonoClock,
)
from edgeagent.kernel.alarms.notify import Message, message_for
from edgeagent.kernel.errors import OutboxError
from edgeagent.kernel.runtime.outputs import Outputs

log = logging.getLogger(__name__)

STATE_KEY = "alarms"
_IDLE_TICK_S = 1.0


class Sink(Protocol):
    async def emit(self, type_name: str, device_id: str, data: Any) -> Any: ...


class KeyValue(Protocol):
    async def kv_get(self, key: str) -> Any: ...

    async def kv_put(self, key: str, value: Any) -> None: ...


class Dispatch(Protocol):
    def notify(self, targets: tuple[str, ...], message: Message) -> int: ...


class AlarmRuntime:
    def __init__(self, engine: AlarmEngine, *, sink: Sink, state: KeyValue, outputs: Outputs,
                 notifiers: Dispatch | None, clock: WallMonoClock) -> None:
        self.engine = engine
        self._sink = sink
        self._state = state
        self._outputs = outputs
        self._notifiers = notifiers
        self._clock = clock
        self._listeners: list[Callable[[Alarm], Awaitable[None]]] = []
        self._lock = asyncio.Lock()  # one operation at a time: the engine is not re-entrant
        self._wake = asyncio.Event()
        self._missing_outputs: set[str] = set()
        self.raised_total = 0

    def listen(self, listener: Callable[[Alarm], Awaitable[None]]) -> None:
        """Called with every changed alarm (guard-room panels)."""
        self._listeners.append(listener)

    def set_notifiers(self, notifiers: Dispatch) -> None:
        self._notifiers = notifiers

    def now(self) -> Instant:
        return Instant.of(self._clock)

    async def restore(self) -> int:
        """Bring back alarms active before a restart (or a SIGKILL): sirens on, notifications resume."""
        data = await self._state.kv_get(STATE_KEY)
        if not data:
            return 0
        async with self._lock:
            try:
                actions = self.engine.import_(data, self.now())
            except AlarmError as exc:
                log.error("saved alarms could not be restored: %s", exc)
                return 0
            await self._carry_out(actions)
        n = len(self.engine.active())
        if n:
            log.warning("restored %d active alarm(s) from before the restart", n)
        return n

    async def raise_(self, kind: AlarmKind | str, resident_id: str, device_id: str,
                     details: Mapping[str, Any] | None = None) -> None:
        async with self._lock:
            actions = self.engine.raise_(kind, resident_id, device_id, self.now(), details)
            self.raised_total += 1
            await self._carry_out(actions)
        self._wake.set()

    async def ack(self, alarm_id: str, by: str, via: str) -> Alarm:
        async with self._lock:
            actions = self.engine.ack(alarm_id, by, via, self.now())
            await self._carry_out(actions)
            return self.engine.get(alarm_id)

    async def resolve(self, alarm_id: str, by: str, via: str, note: str | None = None) -> None:
        async with self._lock:
            actions = self.engine.resolve(alarm_id, by, via, self.now(), note)
            await self._carry_out(actions)

    async def run(self) -> None:
        """Ticks the engine when something is due (repeats, escalations)."""
        while True:
            deadline = self.engine.next_deadline()
            now = self.now().mono_s
            wait = _IDLE_TICK_S if deadline is None else max(0.0, min(_IDLE_TICK_S, deadline - now))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            async with self._lock:
                actions = self.engine.tick(self.now())
                if actions:
                    await self._carry_out(actions)

    async def _carry_out(self, actions: list[Action]) -> None:
        outputs = [a for a in actions if isinstance(a, SetOutput)]
        for out in outputs:
            await self._switch(out)
        for emit in (a for a in actions if isinstance(a, Emit)):
            try:
                await self._sink.emit(emit.event_type, emit.device_id, emit.data)
            except OutboxError as exc:
                # The alarm still runs locally (siren, notifications); the cloud misses this record.
                log.error("alarm event %s not stored: %s", emit.event_type, exc)
        if any(isinstance(a, Persist) for a in actions):
            # Folded raises each produce a snapshot; the engine's export is the latest of all of them.
            await self._state.kv_put(STATE_KEY, self.engine.export())
        for note in (a for a in actions if isinstance(a, Notify)):
            if self._notifiers is not None:
                try:
                    self._notifiers.notify(note.targets, message_for(note))
                except Exception:
                    log.exception("alarm %s: handing the notification over failed", note.alarm.id)
        changed = {a.alarm.id: a.alarm for a in actions if isinstance(a, Persist)}
        for alarm in changed.values():
            for listener in self._listeners:
                try:
                    await listener(alarm)
                except Exception:
                    log.exception("alarm %s: change listener failed", alarm.id)

    async def _switch(self, action: SetOutput) -> None:
        if action.name not in self._outputs:
            if action.name not in self._missing_outputs:
                self._missing_outputs.add(action.name)
                log.warning("alarm output %r is not configured (name a relay channel %r)", action.name, action.name)
            return
        try:
            if action.on and action.pulse_s is not None:
                await self._outputs.pulse(action.name, action.pulse_s)
            else:
                await self._outputs.set(action.name, action.on)
        except Exception as exc:  # noqa: BLE001 - a dead relay must not stop the alarm's other effects
            log.error("alarm output %s could not be switched %s: %s", action.name, "on" if action.on else "off",
                      exc)
