"""Elderly residents' wristband alarms: the lifecycle and escalation core.

:class:`AlarmEngine` is pure: it is fed operations with the time (:class:`Instant`, wall and monotonic)
and returns :data:`Action` s, in the order they are to be carried out. It does no I/O, never reads a
clock and never sleeps; a runtime around it executes the actions (outputs, notifiers, the event sink,
the outbox's ``kv_put``) and calls :meth:`AlarmEngine.tick` at :meth:`AlarmEngine.next_deadline`.

One alarm's life::

    raised ──► notified ──► acknowledged ──► resolved
                  │  ▲          ▲
                  ▼  │          │      (resolved may also follow raised/notified directly)
               escalated (level 1, 2, ...) ─┘

* **raise**: a new alarm switches its kind's outputs on (siren, strobe), is ``alarm.raised``, and is
  notified at once to the first level's targets (``Notify(..., "new")``, ``alarm.notified``). A raise of
  the same kind for the same resident within the fold window (measured from the alarm's last raise, so
  a continuing storm keeps folding) while that alarm is active only counts: a storm of 100 presses is
  one alarm with ``count == 100`` and one ``alarm.raised``.
* **tick**: until acknowledged, an alarm is notified again every ``repeat_s`` (``"repeat"``); at
  ``escalate_after_s[i]`` after its first raise it reaches level ``i + 1`` (``alarm.escalated``,
  ``"escalated"``), after which repeats go to that level and every level below it. A late tick sends
  one notification, never the rounds it missed; the repeat grid is kept when it can be.
* **ack**: records who, when and via what (``cli``, ``local_mqtt``, ``cloud``); notifications and
  escalation stop; an output is switched off once no unacknowledged alarm needs it any more.
* **resolve**: closes the alarm (acknowledged or not); it leaves the engine.

Every state change is one :class:`Emit` (an alarm-priority event), exactly once, and one
:class:`Persist` of the alarm's snapshot (the latest snapshot of an alarm wins; a resolved one need not
be restored). Notifications are at least once: a :class:`Notify` comes before the :class:`Persist` that
records it, so a crash between them repeats it rather than losing it; "notified" means the notification
was handed to the runtime, whose notifiers report their own failures.

Restart: :meth:`AlarmEngine.export` (or the persisted snapshots) and :meth:`AlarmEngine.import_` carry
the active alarms over a crash. Monotonic times do not survive a reboot, so every time is kept as an
:class:`Instant` and re-based on the new process's monotonic clock from wall-clock deltas; a next
notification is never put further away than one repeat interval, so a wall clock that went backwards
over the restart delays nothing by more than that.

Privacy: events carry the resident's id; the name (from the ``names`` lookup the engine is given) only
when ``AlarmConfig.include_names`` is set, and notifications name the resident only when
``AlarmConfig.message_names`` is set.
"""

from __future__ import annotations

import enum
import math
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol, cast, get_args

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from ulid import ULID

from edgeagent.kernel.errors import EdgeagentError
from edgeagent.kernel.pipeline.event_types import (
    ALARM_ACKNOWLEDGED,
    ALARM_ESCALATED,
    ALARM_NOTIFIED,
    ALARM_RAISED,
    ALARM_RESOLVED,
    AlarmAcknowledged,
    AlarmDetail,
    AlarmEscalated,
    AlarmKindName,
    AlarmNotified,
    AlarmRaised,
    AlarmResolved,
    AlarmSeverity,
    AlarmVia,
)
from edgeagent.kernel.pipeline.events import EventData, utc_ms

STATE_VERSION: Final = 1
VIAS: Final[tuple[str, ...]] = get_args(AlarmVia)
SEVERITIES: Final[tuple[str, ...]] = get_args(AlarmSeverity)
SIREN: Final = "siren"
STROBE: Final = "strobe"

MessageKind = Literal["new", "repeat", "escalated"]


class AlarmKind(enum.StrEnum):
    SOS = "sos"
    FALL = "fall"
    HEART_RATE_HIGH = "heart_rate_high"
    HEART_RATE_LOW = "heart_rate_low"
    SPO2_LOW = "spo2_low"
    REMOVED = "removed"
    LOW_BATTERY = "low_battery"
    NO_SIGNAL = "no_signal"
    LEFT_COMPOUND = "left_compound"


if {k.value for k in AlarmKind} != set(get_args(AlarmKindName)):  # pragma: no cover - caught at import
    raise RuntimeError("AlarmKind and event_types.AlarmKindName list different kinds")


class AlarmState(enum.StrEnum):
    """Where an alarm is in its life. States only move forward (:attr:`rank`); escalation is the level."""

    RAISED = "raised"
    NOTIFIED = "notified"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"

    @property
    def rank(self) -> int:
        return _STATE_ORDER.index(self)

    @property
    def active(self) -> bool:
        return self is not AlarmState.RESOLVED

    @property
    def unacknowledged(self) -> bool:
        """Still calling for attention: notifications repeat, escalation runs, outputs stay on."""
        return self in (AlarmState.RAISED, AlarmState.NOTIFIED)


_STATE_ORDER: Final = tuple(AlarmState)


class AlarmError(EdgeagentError):
    """An alarm operation cannot be carried out. The message is for the operator who asked."""


class UnknownAlarmError(AlarmError):
    """No active alarm has this id (it never existed or was resolved)."""


class AlarmStateError(AlarmError):
    """The alarm is not in a state that allows the operation (e.g. acknowledged twice)."""


class AlarmImportError(AlarmError):
    """Saved alarm state cannot be restored. Nothing was imported."""


class AlarmInputError(AlarmError):
    """A ``by``, ``note`` or ``caller`` that cannot be recorded (too long, or not printable text)."""


#: Limits on the free text an acknowledgement or resolution carries, wherever it comes from (panel, CLI,
#: platform). Alarm events are never evicted, and ``alarms list`` prints these to a guard's terminal.
MAX_BY_CHARS: Final = 64
MAX_NOTE_CHARS: Final = 500
# Unicode categories refused: controls (ESC and the C1 range reach a terminal), format characters (bidi
# overrides and isolates reorder what is shown; zero-width ones hide text), surrogates, private use,
# unassigned, and line/paragraph separators. Plain spaces and any script's letters are fine.
_REFUSED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def check_text(name: str, value: str, max_chars: int) -> str:
    """``value`` if it is at most ``max_chars`` printable characters and not blank; else AlarmInputError
    saying why (the message goes back to whoever sent it)."""
    if not isinstance(value, str):
        raise AlarmInputError(f"{name} must be text")
    if len(value) > max_chars:
        raise AlarmInputError(f"{name} is {len(value)} characters long; at most {max_chars} are kept")
    if not value.strip():
        raise AlarmInputError(f"{name} must not be empty")
    for pos, ch in enumerate(value):
        if unicodedata.category(ch) in _REFUSED_CATEGORIES:
            raise AlarmInputError(f"{name} contains a control or formatting character (U+{ord(ch):04X} at "
                                  f"position {pos + 1}); only printable text is accepted")
    return value


# --- time ------------------------------------------------------------------------------------------

class WallMonoClock(Protocol):
    """What :meth:`Instant.of` needs (:class:`edgeagent.kernel.runtime.clock.Clock` is one)."""

    def now(self) -> datetime: ...

    def monotonic_ns(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Instant:
    """A moment: wall time (aware, for people and for re-basing after a restart) and the monotonic time
    (seconds, for every interval within one process)."""

    wall: datetime
    mono_s: float

    def __post_init__(self) -> None:
        if self.wall.tzinfo is None:
            raise ValueError("Instant.wall must be timezone-aware")
        object.__setattr__(self, "wall", self.wall.astimezone(UTC))
        if not math.isfinite(self.mono_s):
            raise ValueError(f"Instant.mono_s must be finite (got {self.mono_s!r})")

    @classmethod
    def of(cls, clock: WallMonoClock) -> Instant:
        return cls(clock.now(), clock.monotonic_ns() / 1e9)

    def at_mono(self, mono_s: float) -> Instant:
        """The instant at another monotonic time, its wall time derived from this one's."""
        return Instant(self.wall + timedelta(seconds=mono_s - self.mono_s), mono_s)

    def rebased(self, now: Instant) -> Instant:
        """This (saved) instant on ``now``'s monotonic clock, placed by the wall-clock distance."""
        return Instant(self.wall, now.mono_s + (self.wall - now.wall).total_seconds())


# --- the alarm record ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Alarm:
    """One alarm, as a snapshot: the engine replaces it on every change, so actions carry what was true."""

    id: str
    kind: AlarmKind
    resident_id: str
    device_id: str  # the wristband that raised it first
    state: AlarmState
    first_raised: Instant
    last_raised: Instant
    count: int = 1  # raises folded into it, the first included
    level: int = 0  # escalation level reached
    notifications: int = 0  # notification rounds handed out
    next_notify_at: Instant | None = None  # None once acknowledged or resolved
    acknowledged_by: str | None = None
    acknowledged_at: Instant | None = None
    acknowledged_via: AlarmVia | None = None
    resolved_by: str | None = None
    resolved_at: Instant | None = None
    resolved_via: AlarmVia | None = None
    note: str | None = None
    details: Mapping[str, AlarmDetail] = field(default_factory=dict, hash=False)

    @property
    def active(self) -> bool:
        return self.state.active

    @property
    def acknowledged(self) -> bool:
        return self.acknowledged_at is not None

    def to_json(self) -> dict[str, Any]:
        """JSON-able form, as :meth:`AlarmEngine.export` lists it (for ``Outbox.kv_put``)."""
        out: dict[str, Any] = _ALARM_ADAPTER.dump_python(self, mode="json")
        return out

    @classmethod
    def from_json(cls, data: Any) -> Alarm:
        try:
            return _ALARM_ADAPTER.validate_python(data)
        except ValidationError as exc:
            raise AlarmImportError(f"saved alarm is not readable: {exc}") from exc


_ALARM_ADAPTER: Final = TypeAdapter(Alarm)


class _Saved(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v: Literal[1]
    alarms: list[Alarm]


# --- actions ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Notify:
    """Send a notification about ``alarm`` to each of ``targets`` (notifier target names)."""

    alarm: Alarm
    level: int
    level_name: str
    targets: tuple[str, ...]
    message_kind: MessageKind
    severity: AlarmSeverity
    at: Instant
    name: str | None = None  # the resident's name, only when AlarmConfig.message_names


@dataclass(frozen=True, slots=True)
class SetOutput:
    """Switch a named output (see :class:`edgeagent.kernel.runtime.outputs.Outputs`). With ``pulse_s`` (and
    ``on``) it switches itself off after that long (``Outputs.pulse``)."""

    name: str
    on: bool
    pulse_s: float | None = None


@dataclass(frozen=True, slots=True)
class Emit:
    """Emit an (alarm-priority) event through the sink: ``sink.emit(event_type, device_id, data)``."""

    event_type: str
    device_id: str
    data: EventData


@dataclass(frozen=True, slots=True)
class Persist:
    """Store this snapshot of the alarm (the latest one wins). A resolved alarm need not be restored."""

    alarm: Alarm


Action = Notify | SetOutput | Emit | Persist


# --- configuration ---------------------------------------------------------------------------------

def _positive(owner: str, name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}.{name} must be a positive number (got {value!r})")


@dataclass(frozen=True, slots=True)
class EscalationLevel:
    """One rung of the ladder: a name (for people and events) and the notifier targets it calls."""

    name: str
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.name:
            raise ValueError("EscalationLevel.name must not be empty")
        if not self.targets or not all(self.targets):
            raise ValueError(f"escalation level {self.name!r} needs at least one (non-empty) target")


@dataclass(frozen=True, slots=True)
class KindPolicy:
    """How one kind of alarm is handled.

    ``outputs``: outputs switched on while it is unacknowledged (``("siren", "strobe")`` sounds the siren).
    ``repeat_s``: notify again this often until acknowledged.
    ``escalate_after_s``: times after the first raise at which levels 1, 2, ... are reached (strictly
    increasing; fewer entries than levels stops the ladder early; empty: the first level only).
    ``fold_window_s``: overrides :attr:`AlarmConfig.fold_window_s` for this kind.
    """

    severity: AlarmSeverity
    outputs: tuple[str, ...] = ()
    repeat_s: float = 60.0
    escalate_after_s: tuple[float, ...] = ()
    fold_window_s: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "escalate_after_s", tuple(self.escalate_after_s))
        if self.severity not in SEVERITIES:
            raise ValueError(f"KindPolicy.severity must be one of {', '.join(SEVERITIES)} (got {self.severity!r})")
        _positive("KindPolicy", "repeat_s", self.repeat_s)
        if self.fold_window_s is not None:
            _positive("KindPolicy", "fold_window_s", self.fold_window_s)
        for t in self.escalate_after_s:
            _positive("KindPolicy", "escalate_after_s", t)
        if any(b <= a for a, b in zip(self.escalate_after_s, self.escalate_after_s[1:], strict=False)):
            raise ValueError(f"KindPolicy.escalate_after_s must be strictly increasing (got {self.escalate_after_s})")
        if not all(self.outputs):
            raise ValueError("KindPolicy.outputs: output names must not be empty")

    @property
    def sounds_siren(self) -> bool:
        return SIREN in self.outputs


DEFAULT_LEVELS: Final = (
    EscalationLevel("guard_room", ("guard_room",)),
    EscalationLevel("grid_worker", ("grid_worker",)),
    EscalationLevel("family", ("family",)),
)

_LOUD: Final = (SIREN, STROBE)
DEFAULT_POLICIES: Final[Mapping[AlarmKind, KindPolicy]] = MappingProxyType({
    AlarmKind.SOS: KindPolicy("critical", _LOUD, repeat_s=30, escalate_after_s=(120, 300)),
    AlarmKind.FALL: KindPolicy("critical", _LOUD, repeat_s=30, escalate_after_s=(120, 300)),
    AlarmKind.HEART_RATE_HIGH: KindPolicy("high", (STROBE,), repeat_s=60, escalate_after_s=(300, 900)),
    AlarmKind.HEART_RATE_LOW: KindPolicy("high", (STROBE,), repeat_s=60, escalate_after_s=(300, 900)),
    AlarmKind.SPO2_LOW: KindPolicy("high", (STROBE,), repeat_s=60, escalate_after_s=(300, 900)),
    AlarmKind.LEFT_COMPOUND: KindPolicy("high", (STROBE,), repeat_s=120, escalate_after_s=(600, 1800)),
    AlarmKind.REMOVED: KindPolicy("medium", repeat_s=600, escalate_after_s=(1800,)),
    AlarmKind.NO_SIGNAL: KindPolicy("medium", repeat_s=900, escalate_after_s=(3600,)),
    AlarmKind.LOW_BATTERY: KindPolicy("low", repeat_s=3600, fold_window_s=12 * 3600.0),
})


@dataclass(frozen=True, slots=True)
class AlarmConfig:
    """The alarm engine's settings (to move into the kernel config as ``alarms:``).

    ``policies`` need not list every kind: a missing one uses :data:`DEFAULT_POLICIES` (whose ladders stop
    at the top configured level; a listed policy with more escalation times than levels is an error).
    ``output_pulse_s``: None keeps outputs on until acknowledged; a number pulses them for that long on
    the raise and again on every repeat and escalation (for sites that may not sound a siren for long).
    """

    levels: tuple[EscalationLevel, ...] = DEFAULT_LEVELS
    policies: Mapping[AlarmKind, KindPolicy] = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    fold_window_s: float = 120.0
    output_pulse_s: float | None = None
    include_names: bool = False  # names in events (to the cloud)
    message_names: bool = False  # names in notifications

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        if not self.levels:
            raise ValueError("AlarmConfig.levels needs at least one escalation level")
        names = [lv.name for lv in self.levels]
        if len(set(names)) != len(names):
            raise ValueError(f"AlarmConfig.levels: level names must be unique (got {names})")
        _positive("AlarmConfig", "fold_window_s", self.fold_window_s)
        if self.output_pulse_s is not None:
            _positive("AlarmConfig", "output_pulse_s", self.output_pulse_s)
        for kind, policy in self.policies.items():
            AlarmKind(kind)
            if len(policy.escalate_after_s) > len(self.levels) - 1:
                raise ValueError(f"AlarmConfig.policies[{kind}]: {len(policy.escalate_after_s)} escalation times "
                                 f"but only {len(self.levels) - 1} levels above the first")

    def policy(self, kind: AlarmKind) -> KindPolicy:
        return self.policies.get(kind) or DEFAULT_POLICIES[kind]

    def targets(self, level: int) -> tuple[str, ...]:
        """Targets notified at ``level``: its own and every lower level's, each once, lowest level first."""
        seen: dict[str, None] = {}
        for lv in self.levels[: level + 1]:
            seen.update(dict.fromkeys(lv.targets))
        return tuple(seen)


def _ulid_at(now: Instant) -> str:
    return str(ULID.from_datetime(now.wall))


# --- the engine ------------------------------------------------------------------------------------

class AlarmEngine:
    """Pure alarm lifecycle: operations in, actions out (see the module docstring)."""

    def __init__(
        self,
        config: AlarmConfig | None = None,
        *,
        names: Callable[[str], str | None] | None = None,
        new_id: Callable[[Instant], str] = _ulid_at,
    ) -> None:
        self._cfg = config or AlarmConfig()
        self._names = names
        self._new_id = new_id
        self._alarms: dict[str, Alarm] = {}  # active alarms by id, in the order they were raised

    @property
    def config(self) -> AlarmConfig:
        return self._cfg

    # --- queries -------------------------------------------------------------------------------------

    def get(self, alarm_id: str) -> Alarm:
        try:
            return self._alarms[alarm_id]
        except KeyError:
            raise UnknownAlarmError(f"no active alarm {alarm_id!r}") from None

    def active(self) -> list[Alarm]:
        """Active alarms, oldest first."""
        return list(self._alarms.values())

    def next_deadline(self) -> float | None:
        """Monotonic time at which :meth:`tick` has something to do; None when nothing is pending."""
        times: list[float] = []
        for a in self._alarms.values():
            if a.state is AlarmState.RAISED:
                times.append(a.first_raised.mono_s)
            elif a.state.unacknowledged:
                if a.next_notify_at is not None:
                    times.append(a.next_notify_at.mono_s)
                esc = self._escalation_due_at(a)
                if esc is not None:
                    times.append(esc)
        return min(times, default=None)

    # --- operations ----------------------------------------------------------------------------------

    def raise_(
        self,
        kind: AlarmKind | str,
        resident_id: str,
        device_id: str,
        now: Instant,
        details: Mapping[str, AlarmDetail] | None = None,
    ) -> list[Action]:
        """A detector saw ``kind`` for a resident: a new alarm, or a repeat folded into the active one."""
        kind = AlarmKind(kind)
        if not resident_id or not device_id:
            raise ValueError("raise_: resident_id and device_id must not be empty")
        detail_map = _check_details(details)
        policy = self._cfg.policy(kind)
        window_s = policy.fold_window_s if policy.fold_window_s is not None else self._cfg.fold_window_s

        folds_into = self._fold_target(resident_id, kind)
        if folds_into is not None and now.mono_s - folds_into.last_raised.mono_s <= window_s:
            folded = self._put(replace(folds_into, count=folds_into.count + 1, last_raised=now))
            return [Persist(folded)]

        alarm = self._put(Alarm(
            id=self._new_id(now), kind=kind, resident_id=resident_id, device_id=device_id,
            state=AlarmState.RAISED, first_raised=now, last_raised=now, next_notify_at=now, details=detail_map))
        actions: list[Action] = [SetOutput(name, True, self._cfg.output_pulse_s) for name in policy.outputs]
        actions.append(self._emit(ALARM_RAISED.name, alarm, AlarmRaised, details=dict(detail_map)))
        actions.append(Persist(alarm))
        actions.extend(self._due(alarm, now))
        return actions

    def tick(self, now: Instant) -> list[Action]:
        """Repeat notifications and escalate what is due at ``now``."""
        actions: list[Action] = []
        for alarm in list(self._alarms.values()):
            actions.extend(self._due(alarm, now))
        return actions

    def ack(self, alarm_id: str, by: str, via: AlarmVia | str, now: Instant,
            caller: str | None = None) -> list[Action]:
        """Someone has taken the alarm on: notifications and escalation stop, the siren goes off.
        ``by`` is who says they took it on; ``caller`` the authenticated account that said so (a local
        user, ``panel:<id>``), recorded next to it. AlarmInputError for text that cannot be recorded."""
        checked_via = _check_via(via)
        check_text("by", by, MAX_BY_CHARS)
        if caller is not None:
            check_text("caller", caller, MAX_BY_CHARS)
        alarm = self.get(alarm_id)
        if alarm.state is not AlarmState.RAISED and alarm.state is not AlarmState.NOTIFIED:
            raise AlarmStateError(
                f"alarm {alarm_id} was already acknowledged by {alarm.acknowledged_by} via {alarm.acknowledged_via}")
        acked = self._put(replace(alarm, state=AlarmState.ACKNOWLEDGED, acknowledged_by=by, acknowledged_at=now,
                                  acknowledged_via=checked_via, next_notify_at=None))
        actions: list[Action] = self._outputs_off(acked)
        actions.append(self._emit(ALARM_ACKNOWLEDGED.name, acked, AlarmAcknowledged, by=by, via=checked_via,
                                  caller=caller, notifications=acked.notifications,
                                  response_s=max(0.0, now.mono_s - acked.first_raised.mono_s)))
        actions.append(Persist(acked))
        return actions

    def resolve(self, alarm_id: str, by: str, via: AlarmVia | str, now: Instant,
                note: str | None = None, caller: str | None = None) -> list[Action]:
        """Close the alarm, acknowledged or not; it leaves the engine. ``by`` and ``caller`` as for
        :meth:`ack`; AlarmInputError for text that cannot be recorded."""
        checked_via = _check_via(via)
        check_text("by", by, MAX_BY_CHARS)
        if caller is not None:
            check_text("caller", caller, MAX_BY_CHARS)
        if note:
            check_text("note", note, MAX_NOTE_CHARS)
        alarm = self.get(alarm_id)
        resolved = replace(alarm, state=AlarmState.RESOLVED, resolved_by=by, resolved_at=now,
                           resolved_via=checked_via, note=note or None, next_notify_at=None)
        del self._alarms[alarm_id]
        actions: list[Action] = self._outputs_off(resolved) if alarm.state.unacknowledged else []
        actions.append(self._emit(ALARM_RESOLVED.name, resolved, AlarmResolved, by=by, via=checked_via,
                                  caller=caller, note=resolved.note, acknowledged=resolved.acknowledged,
                                  notifications=resolved.notifications,
                                  duration_s=max(0.0, now.mono_s - resolved.first_raised.mono_s)))
        actions.append(Persist(resolved))
        return actions

    # --- persistence ---------------------------------------------------------------------------------

    def export(self) -> dict[str, Any]:
        """The active alarms as JSON-able data, for :meth:`import_` in a later process."""
        return {"v": STATE_VERSION, "alarms": [a.to_json() for a in self._alarms.values()]}

    def import_(self, data: Any, now: Instant) -> list[Action]:
        """Restore saved alarms (from :meth:`export`, or ``{"v": 1, "alarms": [snapshot, ...]}`` built from
        persisted snapshots) into this engine, re-based on ``now``.

        Returns what is to be done at once: outputs of unacknowledged alarms switched on again (the relay
        may have lost its state with the box), then whatever :meth:`tick` finds due. All or nothing: if
        any saved alarm is unreadable, or already known, nothing is imported.
        """
        try:
            saved = _Saved.model_validate(data)
        except ValidationError as exc:
            raise AlarmImportError(f"saved alarm state is not readable: {exc}") from exc
        restored: list[Alarm] = []
        for alarm in saved.alarms:
            if not alarm.active:
                continue  # a resolved snapshot: nothing left to do for it
            if alarm.id in self._alarms or any(a.id == alarm.id for a in restored):
                raise AlarmImportError(f"alarm {alarm.id} is already active")
            restored.append(self._rebased(alarm, now))
        restored.sort(key=lambda a: a.first_raised.mono_s)
        outputs: dict[str, None] = {}
        for alarm in restored:
            self._put(alarm)
            if alarm.state.unacknowledged:
                outputs.update(dict.fromkeys(self._cfg.policy(alarm.kind).outputs))
        actions: list[Action] = [SetOutput(name, True, self._cfg.output_pulse_s) for name in outputs]
        actions.extend(self.tick(now))
        return actions

    def _rebased(self, alarm: Alarm, now: Instant) -> Alarm:
        def past(i: Instant) -> Instant:
            r = i.rebased(now)
            return r if r.mono_s <= now.mono_s else Instant(i.wall, now.mono_s)

        def opt_past(i: Instant | None) -> Instant | None:
            return None if i is None else past(i)

        next_notify = alarm.next_notify_at
        if next_notify is not None:
            latest = now.mono_s + self._cfg.policy(alarm.kind).repeat_s
            next_notify = next_notify.rebased(now)
            if next_notify.mono_s > latest:
                next_notify = now.at_mono(latest)
        return replace(alarm, first_raised=past(alarm.first_raised), last_raised=past(alarm.last_raised),
                       acknowledged_at=opt_past(alarm.acknowledged_at), next_notify_at=next_notify)

    # --- internals -----------------------------------------------------------------------------------

    def _put(self, alarm: Alarm) -> Alarm:
        self._alarms[alarm.id] = alarm
        return alarm

    def _fold_target(self, resident_id: str, kind: AlarmKind) -> Alarm | None:
        candidates = [a for a in self._alarms.values() if a.resident_id == resident_id and a.kind is kind]
        return max(candidates, key=lambda a: a.last_raised.mono_s, default=None)

    def _escalation_due_at(self, alarm: Alarm) -> float | None:
        ladder = self._cfg.policy(alarm.kind).escalate_after_s
        if alarm.level + 1 >= len(self._cfg.levels) or alarm.level >= len(ladder):
            return None
        return alarm.first_raised.mono_s + ladder[alarm.level]

    def _due(self, alarm: Alarm, now: Instant) -> list[Action]:
        if not alarm.state.unacknowledged:
            return []
        policy = self._cfg.policy(alarm.kind)
        actions: list[Action] = []
        if alarm.state is AlarmState.RAISED:
            alarm = self._put(replace(alarm, state=AlarmState.NOTIFIED, notifications=alarm.notifications + 1,
                                      next_notify_at=now.at_mono(now.mono_s + policy.repeat_s)))
            notify = self._notify(alarm, "new", now)
            actions += [notify, self._emit(ALARM_NOTIFIED.name, alarm, AlarmNotified, level_name=notify.level_name,
                                           targets=list(notify.targets)), Persist(alarm)]

        reached: list[Alarm] = []
        last_due: float | None = None
        while (due := self._escalation_due_at(alarm)) is not None and now.mono_s >= due:
            alarm = replace(alarm, level=alarm.level + 1)
            reached.append(alarm)
            last_due = due
        if last_due is not None:
            alarm = self._put(replace(alarm, notifications=alarm.notifications + 1,
                                      next_notify_at=now.at_mono(_next_round(last_due, now, policy.repeat_s))))
            actions += self._pulses(policy)
            actions.append(self._notify(alarm, "escalated", now))
            for at_level in reached:
                actions.append(self._emit(
                    ALARM_ESCALATED.name, at_level, AlarmEscalated, level_name=self._cfg.levels[at_level.level].name,
                    targets=list(self._cfg.targets(at_level.level)),
                    after_s=max(0.0, now.mono_s - alarm.first_raised.mono_s)))
            actions.append(Persist(alarm))
        elif alarm.next_notify_at is not None and now.mono_s >= alarm.next_notify_at.mono_s:
            next_at = _next_round(alarm.next_notify_at.mono_s, now, policy.repeat_s)
            alarm = self._put(replace(alarm, notifications=alarm.notifications + 1,
                                      next_notify_at=now.at_mono(next_at)))
            actions += self._pulses(policy)
            actions += [self._notify(alarm, "repeat", now), Persist(alarm)]
        return actions

    def _pulses(self, policy: KindPolicy) -> list[Action]:
        if self._cfg.output_pulse_s is None:
            return []  # outputs stay on from the raise until acknowledged
        return [SetOutput(name, True, self._cfg.output_pulse_s) for name in policy.outputs]

    def _outputs_off(self, alarm: Alarm) -> list[Action]:
        still_needed: set[str] = set()
        for other in self._alarms.values():
            if other.id != alarm.id and other.state.unacknowledged:
                still_needed.update(self._cfg.policy(other.kind).outputs)
        return [SetOutput(name, False) for name in self._cfg.policy(alarm.kind).outputs if name not in still_needed]

    def _notify(self, alarm: Alarm, kind: MessageKind, now: Instant) -> Notify:
        return Notify(alarm=alarm, level=alarm.level, level_name=self._cfg.levels[alarm.level].name,
                      targets=self._cfg.targets(alarm.level), message_kind=kind,
                      severity=self._cfg.policy(alarm.kind).severity, at=now,
                      name=self._name(alarm.resident_id) if self._cfg.message_names else None)

    def _name(self, resident_id: str) -> str | None:
        return None if self._names is None else self._names(resident_id) or None

    def _emit(self, event_type: str, alarm: Alarm, model: type[EventData], **extra: Any) -> Emit:
        data: dict[str, Any] = {
            "alarm_id": alarm.id, "kind": alarm.kind.value, "severity": self._cfg.policy(alarm.kind).severity,
            "resident_id": alarm.resident_id, "device_id": alarm.device_id, "count": alarm.count,
            "level": alarm.level, "raised_at": utc_ms(alarm.first_raised.wall),
        }
        if self._cfg.include_names:
            data["name"] = self._name(alarm.resident_id)
        return Emit(event_type, alarm.device_id, model.model_validate({**data, **extra}))


def _next_round(due_s: float, now: Instant, period_s: float) -> float:
    """Next notification after a round due at ``due_s``: on the grid, unless the tick was so late that
    the grid point has passed too (then one period from now, never a burst of missed rounds)."""
    nxt = due_s + period_s
    return nxt if nxt > now.mono_s else now.mono_s + period_s


def _check_via(via: str) -> AlarmVia:
    if via not in VIAS:
        raise ValueError(f"via must be one of {', '.join(VIAS)} (got {via!r})")
    return cast(AlarmVia, via)


def _check_details(details: Mapping[str, AlarmDetail] | None) -> dict[str, AlarmDetail]:
    out: dict[str, AlarmDetail] = {}
    for key, value in (details or {}).items():
        if not isinstance(key, str) or not isinstance(value, bool | int | float | str):
            raise TypeError(f"alarm details must map names to bool, int, float or str (got {key!r}: {value!r})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"alarm detail {key!r} is not a finite number ({value!r})")
        out[key] = value
    return out
