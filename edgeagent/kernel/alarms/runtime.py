"""Runs the pure :class:`~edgeagent.kernel.alarms.engine.AlarmEngine`: carries out its actions, persists its
state, ticks it on time, and takes acknowledgements from any source.

Order of effects for every operation (raise, tick, ack, resolve), all under one lock (the engine is not
re-entrant), none of them waiting on a device:

1. outputs (siren, strobe) are *requested*: :meth:`Outputs.request
   <edgeagent.kernel.runtime.outputs.Outputs.request>` returns at once and a background lane per output
   switches it, bounded by a timeout, latest request winning. A relay module whose link is down (seconds
   per Modbus timeout) therefore never delays the alarm's durability, its notifications or later alarms;
2. events are made durable, then the engine state is saved (``kv_put``), in one await each. A failure of
   either is logged and does not stop step 3: people must be told even when the disk is full. An event
   that could not be stored is kept (at most ``MAX_UNSTORED``; beyond that the oldest is dropped, logged
   and counted in ``unstored_dropped``) and stored again first by the next operation or tick;
3. notifications go to the notifier hub, which sends them in the background (a slow SMS modem never
   delays the next alarm), and change listeners (the guard-room topic) are told; a listener only queues
   (each is bounded by ``LISTENER_TIMEOUT_S`` in case one does not).

A caller that must not lose an alarm (the wristband input acknowledging its MQTT message) awaits
:meth:`raise_`: when it returns, the alarm's events and state are durable; when they could not be made
durable it raises :class:`AlarmNotDurable` (an OutboxError) *after* steps 1 and 3 ran, so the caller can
leave its message unacknowledged for the broker to deliver again. A press that only folds into an alarm
already raised (and stored) changes nothing but its count, which the ticker saves within ``_IDLE_TICK_S``
together with every other fold since ([fold off the disk]): a crash in between loses a count, never an alarm.

Targets served outside the notifier hub (the guard room, told through the wristband input's guard-room
topic) are declared with :meth:`serve_locally`, so the hub does not report them as unserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from edgeagent.kernel.alarms.engine import (
    Action,
    Alarm,
    AlarmEngine,
    AlarmError,
    Emit,
    Instant,
    Notify,
    Persist,
    SetOutput,
    WallMonoClock,
)
from edgeagent.kernel.alarms.notify import Message, message_for
from edgeagent.kernel.errors import OutboxError
from edgeagent.kernel.pipeline.event_types import AlarmDetail
from edgeagent.kernel.pipeline.events import Attachment
from edgeagent.kernel.runtime.outputs import Outputs

log = logging.getLogger(__name__)

STATE_KEY = "alarms"
_IDLE_TICK_S = 1.0
LISTENER_TIMEOUT_S = 1.0
MAX_UNSTORED = 10_000


class AlarmNotDurable(OutboxError):
    """The alarm ran locally (outputs, notifications) but its events or state were not stored."""


class Sink(Protocol):
    async def emit(self, type_name: str, device_id: str, data: Any,
                   attachments: tuple[Attachment, ...] = ()) -> Any: ...


class KeyValue(Protocol):
    async def kv_get(self, key: str) -> Any: ...

    async def kv_put(self, key: str, value: Any) -> None: ...


class Dispatch(Protocol):
    def notify(self, targets: tuple[str, ...], message: Message) -> int: ...


class LocalTargets(Protocol):
    """A dispatcher that can be told a target is served outside it (:meth:`NotifierHub.serve_elsewhere`)."""

    def serve_elsewhere(self, target: str, by: str) -> None: ...


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
        self._local_targets: dict[str, str] = {}
        self.raised_total = 0
        self.not_durable = 0  # operations whose events or state could not be stored
        self._unstored: list[Emit] = []  # alarm events not stored yet, oldest first
        self._state_dirty = False  # the engine changed since the last state save
        self.unstored_dropped = 0

    def listen(self, listener: Callable[[Alarm], Awaitable[None]]) -> None:
        """Called with every changed alarm (guard-room panels)."""
        self._listeners.append(listener)

    def set_notifiers(self, notifiers: Dispatch) -> None:
        self._notifiers = notifiers
        self._tell_local_targets()

    def serve_locally(self, target: str, by: str) -> None:
        """``target`` is told by ``by`` (e.g. the guard-room topic), outside the notifier hub."""
        self._local_targets[target] = by
        self._tell_local_targets()

    @property
    def local_targets(self) -> dict[str, str]:
        """Targets served outside the notifier hub, and by what (for the start-up check of unserved targets)."""
        return dict(self._local_targets)

    def _tell_local_targets(self) -> None:
        serve = getattr(self._notifiers, "serve_elsewhere", None)
        if serve is not None:
            for target, by in self._local_targets.items():
                serve(target, by)

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
            with contextlib.suppress(AlarmNotDurable):  # logged; the restored alarms sound and notify anyway
                await self._carry_out(actions)
        for lost in self.engine.not_restored:
            log.error("saved alarm %s (%s about %s, raised %s) not restored: no capability declares the kind "
                      "%r any more", lost.id, lost.kind, lost.subject, lost.first_raised.wall.isoformat(), lost.kind)
        n = len(self.engine.active())
        if n:
            log.warning("restored %d active alarm(s) from before the restart", n)
        return n

    async def raise_(self, kind: str, subject: str, device_id: str,
                     details: Mapping[str, AlarmDetail] | None = None, *, place: bool = False,
                     attachments: Sequence[Attachment] = ()) -> Alarm:
        """Raise ``kind`` (declared by a capability) about ``subject``: a resident's id, or with ``place``
        the place's name (``"lift-2 car"``); ``device_id`` is the device that saw it; ``attachments`` are
        evidence references (a snapshot kept at the edge) that go into ``alarm.raised``. Returns the
        alarm, new or the active one it folded into, as it stands after the raise.

        ValueError/TypeError (nothing changed) for an undeclared kind, a subject of the wrong sort, bad
        details; AlarmNotDurable after the alarm ran locally but was not stored (see the module doc)."""
        async with self._lock:
            actions = self.engine.raise_(kind, subject, device_id, self.now(), details, place=place,
                                         attachments=attachments)
            self.raised_total += 1
            alarm_id = next(a.alarm.id for a in actions if isinstance(a, Persist))
            try:
                # [fold off the disk] A press folded into an alarm already raised changes only its count:
                # the alarm itself is durable, so its state is saved by the ticker within _IDLE_TICK_S
                # (one save for a whole storm) instead of once per press. A wristband flooding presses
                # therefore costs microseconds each and cannot hold the lock from another resident's SOS.
                fold_only = all(isinstance(a, Persist) for a in actions)
                await self._carry_out(actions, defer_state=fold_only)
            finally:
                self._wake.set()  # its repeats and escalations are due whether or not it was stored
            return self.engine.get(alarm_id)

    def active(self, kind: str | None = None, subject: str | None = None) -> list[Alarm]:
        """Active alarms, oldest first; only of ``kind`` and about ``subject`` (a resident id or a place)
        when given. A capability finds its own alarms here after a restart (their ids are not its to keep)."""
        return [a for a in self.engine.active()
                if (kind is None or a.kind == kind) and (subject is None or a.subject == subject)]

    async def ack(self, alarm_id: str, by: str, via: str, caller: str | None = None) -> Alarm:
        """Raises AlarmNotDurable when the acknowledgement took effect but was not stored, AlarmError
        (AlarmInputError for a bad ``by``/``caller``) when it did not take effect."""
        async with self._lock:
            actions = self.engine.ack(alarm_id, by, via, self.now(), caller)
            await self._carry_out(actions)
            return self.engine.get(alarm_id)

    async def resolve(self, alarm_id: str, by: str, via: str, note: str | None = None,
                      caller: str | None = None) -> None:
        """As :meth:`ack`."""
        async with self._lock:
            actions = self.engine.resolve(alarm_id, by, via, self.now(), note, caller)
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
                if actions or self._unstored or self._state_dirty:
                    # Logged where it failed; a repeat that could not be stored must not end the ticking.
                    with contextlib.suppress(AlarmNotDurable):
                        await self._carry_out(actions)

    async def _carry_out(self, actions: list[Action], *, defer_state: bool = False) -> None:
        """Raises AlarmNotDurable at the end if an event or the state could not be stored. ``defer_state``:
        leave the state save to the next tick ([fold off the disk])."""
        for out in (a for a in actions if isinstance(a, SetOutput)):
            self._switch(out)
        failures: list[str] = []
        # Events an earlier operation could not store go first, so the platform sees them in order.
        emits, self._unstored = [*self._unstored, *(a for a in actions if isinstance(a, Emit))], []
        for emit in emits:
            if self._unstored:  # the outbox refused the one before: keep the order, do not try the rest now
                self._keep_unstored(emit)
                continue
            try:
                if emit.attachments:
                    await self._sink.emit(emit.event_type, emit.device_id, emit.data, emit.attachments)
                else:
                    await self._sink.emit(emit.event_type, emit.device_id, emit.data)
            except OutboxError as exc:
                # The alarm still runs locally (siren, notifications); the caller learns it is not durable.
                log.error("alarm event %s not stored (kept to store again): %s", emit.event_type, exc)
                failures.append(f"event {emit.event_type}: {exc}")
                self._keep_unstored(emit)
        if any(isinstance(a, Persist) for a in actions):
            self._state_dirty = True
        if self._state_dirty and not defer_state:
            # Folded raises each produce a snapshot; the engine's export is the latest of all of them.
            try:
                await self._state.kv_put(STATE_KEY, self.engine.export())
                self._state_dirty = False
            except Exception as exc:  # noqa: BLE001 - an unsaved state must not keep anyone from being told
                log.error("alarm state not saved (notifications go out anyway): %s", exc)
                failures.append(f"state: {exc}")
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
                    async with asyncio.timeout(LISTENER_TIMEOUT_S):
                        await listener(alarm)
                except Exception:
                    log.exception("alarm %s: change listener failed", alarm.id)
        if failures or self._unstored:
            self.not_durable += 1
            raise AlarmNotDurable("; ".join(failures) or f"{len(self._unstored)} alarm events wait to be stored")

    def _keep_unstored(self, emit: Emit) -> None:
        if len(self._unstored) >= MAX_UNSTORED:
            dropped = self._unstored.pop(0)
            self.unstored_dropped += 1
            log.error("alarm event %s dropped: %d events wait for the outbox already", dropped.event_type,
                      MAX_UNSTORED)
        self._unstored.append(emit)

    @property
    def unstored(self) -> int:
        return len(self._unstored)

    def _switch(self, action: SetOutput) -> None:
        if action.name not in self._outputs:
            if action.name not in self._missing_outputs:
                self._missing_outputs.add(action.name)
                log.warning("alarm output %r is not configured (name a relay channel %r)", action.name, action.name)
            return
        # [outputs off the lock] the lane switches it in the background, with its own timeout and logging.
        self._outputs.request(action.name, action.on, action.pulse_s)
