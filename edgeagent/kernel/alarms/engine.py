"""Alarms of every capability (wristbands, cameras, chargers): the lifecycle and escalation core.

:class:`AlarmEngine` is pure: it is fed operations with the time (:class:`Instant`, wall and monotonic)
and returns :data:`Action` s, in the order they are to be carried out. It does no I/O, never reads a
clock and never sleeps; a runtime around it executes the actions (outputs, notifiers, the event sink,
the outbox's ``kv_put``) and calls :meth:`AlarmEngine.tick` at :meth:`AlarmEngine.next_deadline`.

One alarm's life::

    raised ──► notified ──► acknowledged ──► resolved
                  │  ▲          ▲
                  ▼  │          │      (resolved may also follow raised/notified directly)
               escalated (level 1, 2, ...) ─┘

* **raise**: a new alarm switches its kind's outputs on (siren, strobe, a lift's door hold), is
  ``alarm.raised`` (with the raise's evidence attachments, e.g. a snapshot), and is notified at once to
  the first level of its kind's ladder (``Notify(..., "new")``, ``alarm.notified``). A raise of the same
  kind about the same subject (a resident, or a place) within the fold window (measured from the alarm's
  last raise, so a continuing storm keeps folding) while that alarm is active only counts: a storm of 100
  presses is one alarm with ``count == 100`` and one ``alarm.raised``.
* **tick**: until acknowledged, an alarm is notified again every ``repeat_s`` (``"repeat"``); at
  ``escalate_after_s[i]`` after its first raise it reaches level ``i + 1`` (``alarm.escalated``,
  ``"escalated"``), after which repeats go to that level and every level below it. A late tick sends
  one notification, never the rounds it missed; the repeat grid is kept when it can be.
* **ack**: records who, when and via what (``cli``, ``local_mqtt``, ``cloud``, or the capability's own
  ``auto``/``rule``); notifications and
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

Kinds: the engine knows no kind of its own. :class:`AlarmConfig.kinds` holds the kinds the capabilities
declared (:mod:`edgeagent.kernel.alarms.kinds`); raising any other kind is a ValueError, and so is a
resident kind raised about a place or the other way round.

Privacy: events carry the resident's id; the name (from the ``names`` lookup the engine is given) only
when ``AlarmConfig.include_names`` is set, and notifications name the resident only when
``AlarmConfig.message_names`` is set.
"""

from __future__ import annotations

import enum
import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol, cast, get_args

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from ulid import ULID

from edgeagent.kernel.alarms.kinds import (
    SEVERITIES,
    SIREN,
    STROBE,
    AlarmKindSpec,
    KindPolicy,
    _positive,
    known_list,
)
from edgeagent.kernel.errors import EdgeagentError
from edgeagent.kernel.pipeline.event_types import (
    ALARM_ACKNOWLEDGED,
    ALARM_ESCALATED,
    ALARM_NOTIFIED,
    ALARM_PLACE_PATTERN,
    ALARM_RAISED,
    ALARM_RESOLVED,
    AlarmAcknowledged,
    AlarmDetail,
    AlarmEscalated,
    AlarmNotified,
    AlarmRaised,
    AlarmResolved,
    AlarmSeverity,
    AlarmVia,
)
from edgeagent.kernel.pipeline.events import Attachment, EventData, utc_ms

__all__ = ["SEVERITIES", "SIREN", "STROBE", "AlarmKindSpec", "KindPolicy"]  # re-exported for callers

STATE_VERSION: Final = 1
_PLACE_RE: Final = re.compile(ALARM_PLACE_PATTERN)
VIAS: Final[tuple[str, ...]] = get_args(AlarmVia)
MAX_ATTACHMENTS: Final = 8  # evidence references per raise (they are references, not bytes)

MessageKind = Literal["new", "repeat", "escalated"]


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
    kind: str
    resident_id: str | None  # a resident alarm's subject (None for a place alarm)
    device_id: str  # the device that raised it first (a wristband, a camera, a charger)
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
    place: str | None = None  # a place alarm's subject (None for a resident alarm)
    attachments: tuple[Attachment, ...] = ()  # evidence of the first raise (snapshot references)

    @property
    def subject(self) -> str:
        """The resident's id, or the place's name."""
        return self.place if self.place is not None else self.resident_id or ""

    @property
    def about_place(self) -> bool:
        return self.place is not None

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
    label: str = ""  # the kind's description, for people (AlarmKindSpec.description)


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
    attachments: tuple[Attachment, ...] = ()  # into the envelope (alarm.raised: the evidence)


@dataclass(frozen=True, slots=True)
class Persist:
    """Store this snapshot of the alarm (the latest one wins). A resolved alarm need not be restored."""

    alarm: Alarm


Action = Notify | SetOutput | Emit | Persist


# --- configuration ---------------------------------------------------------------------------------

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


DEFAULT_LEVELS: Final = (
    EscalationLevel("guard_room", ("guard_room",)),
    EscalationLevel("grid_worker", ("grid_worker",)),
    EscalationLevel("family", ("family",)),
)

@dataclass(frozen=True, slots=True)
class AlarmConfig:
    """The alarm engine's settings (from the kernel config's ``alarms:`` and the capabilities' kinds).

    ``kinds``: every kind that may be raised, as the capabilities declared them (by name).
    ``policies``: the site's replacements of kinds' shipped policies; a kind not listed uses its spec's.
    A shipped ladder stops at the top level there is; a listed policy with more escalation times than
    its ladder has levels above the first is an error.
    ``levels``: the main escalation ladder (the resident escalation: guard room, grid worker, family);
    ``ladders``: other ladders by name, which a policy picks with ``ladder`` (e.g. the guard room only,
    for a lift alarm); a place kind whose policy names none uses the main ladder.
    ``output_pulse_s``: None keeps outputs on until acknowledged; a number pulses them for that long on
    the raise and again on every repeat and escalation (for sites that may not sound a siren for long).
    """

    levels: tuple[EscalationLevel, ...] = DEFAULT_LEVELS
    kinds: Mapping[str, AlarmKindSpec] = field(default_factory=dict)
    policies: Mapping[str, KindPolicy] = field(default_factory=dict)
    ladders: Mapping[str, tuple[EscalationLevel, ...]] = field(default_factory=dict)
    fold_window_s: float = 120.0
    output_pulse_s: float | None = None
    include_names: bool = False  # names in events (to the cloud)
    message_names: bool = False  # names in notifications

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        object.__setattr__(self, "kinds", MappingProxyType(dict(self.kinds)))
        object.__setattr__(self, "policies", MappingProxyType({str(k): v for k, v in self.policies.items()}))
        object.__setattr__(self, "ladders", MappingProxyType({k: tuple(v) for k, v in self.ladders.items()}))
        for ladder_name, ladder in (("levels", self.levels), *((f"ladders.{k}", v) for k, v in self.ladders.items())):
            if not ladder:
                raise ValueError(f"AlarmConfig.{ladder_name} needs at least one escalation level")
            names = [lv.name for lv in ladder]
            if len(set(names)) != len(names):
                raise ValueError(f"AlarmConfig.{ladder_name}: level names must be unique (got {names})")
        _positive("AlarmConfig", "fold_window_s", self.fold_window_s)
        if self.output_pulse_s is not None:
            _positive("AlarmConfig", "output_pulse_s", self.output_pulse_s)
        for name, spec in self.kinds.items():
            if name != spec.name:
                raise ValueError(f"AlarmConfig.kinds[{name!r}] holds the spec of {spec.name!r}")
            self._ladder_of(name, spec.policy)
        for kind, policy in self.policies.items():
            if kind not in self.kinds:
                raise ValueError(f"AlarmConfig.policies: unknown alarm kind {kind!r} "
                                 f"(known: {known_list(self.kinds)})")
            ladder = self._ladder_of(kind, policy)
            if len(policy.escalate_after_s) > len(ladder) - 1:
                raise ValueError(f"AlarmConfig.policies[{kind}]: {len(policy.escalate_after_s)} escalation times "
                                 f"but only {len(ladder) - 1} levels above the first")

    def _ladder_of(self, kind: str, policy: KindPolicy) -> tuple[EscalationLevel, ...]:
        if policy.ladder is None:
            return self.levels
        try:
            return self.ladders[policy.ladder]
        except KeyError:
            raise ValueError(f"alarm kind {kind!r}: unknown escalation ladder {policy.ladder!r} (ladders: "
                             f"{', '.join(sorted(self.ladders)) or 'none besides levels'})") from None

    def spec(self, kind: str) -> AlarmKindSpec:
        """The kind's spec; ValueError for a kind no capability declared."""
        try:
            return self.kinds[kind]
        except KeyError:
            raise ValueError(f"unknown alarm kind {kind!r} (known: {known_list(self.kinds)})") from None

    def policy(self, kind: str) -> KindPolicy:
        return self.policies.get(kind) or self.spec(kind).policy

    def ladder(self, kind: str) -> tuple[EscalationLevel, ...]:
        """The escalation ladder of ``kind``."""
        return self._ladder_of(kind, self.policy(kind))

    def targets(self, level: int, kind: str | None = None) -> tuple[str, ...]:
        """Targets notified at ``level`` of ``kind``'s ladder (None: the main ladder): its own and every
        lower level's, each once, lowest level first."""
        seen: dict[str, None] = {}
        for lv in (self.levels if kind is None else self.ladder(kind))[: level + 1]:
            seen.update(dict.fromkeys(lv.targets))
        return tuple(seen)

    def all_targets(self) -> set[str]:
        """Every target of every ladder (for the start-up check of unserved targets)."""
        return {t for ladder in (self.levels, *self.ladders.values()) for lv in ladder for t in lv.targets}


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
        self.not_restored: list[Alarm] = []  # by the last import_: of kinds no capability declares

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
        kind: str,
        subject: str,
        device_id: str,
        now: Instant,
        details: Mapping[str, AlarmDetail] | None = None,
        *,
        place: bool = False,
        attachments: Sequence[Attachment] = (),
    ) -> list[Action]:
        """A detector saw ``kind`` about ``subject`` (a resident's id, or with ``place`` a place's name): a
        new alarm, or a repeat folded into the active one of the same kind and subject. A folded raise
        keeps the first raise's details and attachments. ValueError for a kind no capability declared, a
        subject of the wrong sort for the kind, or empty names; TypeError for bad details/attachments."""
        kind = str(kind)
        spec = self._cfg.spec(kind)
        if spec.place != place:
            raise ValueError(f"alarm kind {kind!r} is about a {spec.subject}: raise it with "
                             f"place={spec.place}")
        if not subject or not device_id:
            raise ValueError("raise_: subject and device_id must not be empty")
        if place and not _PLACE_RE.match(subject):
            raise ValueError(f"raise_: place {subject!r} must be 1-64 printable characters")
        detail_map = _check_details(details)
        evidence = _check_attachments(attachments)
        policy = self._cfg.policy(kind)
        window_s = policy.fold_window_s if policy.fold_window_s is not None else self._cfg.fold_window_s

        folds_into = self._fold_target(subject, place, kind)
        if folds_into is not None and now.mono_s - folds_into.last_raised.mono_s <= window_s:
            folded = self._put(replace(folds_into, count=folds_into.count + 1, last_raised=now))
            return [Persist(folded)]

        alarm = self._put(Alarm(
            id=self._new_id(now), kind=kind, resident_id=None if place else subject, device_id=device_id,
            state=AlarmState.RAISED, first_raised=now, last_raised=now, next_notify_at=now, details=detail_map,
            place=subject if place else None, attachments=evidence))
        actions: list[Action] = [SetOutput(name, True, self._cfg.output_pulse_s) for name in policy.outputs]
        actions.append(replace(self._emit(ALARM_RAISED.name, alarm, AlarmRaised, details=dict(detail_map)),
                               attachments=evidence))
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
        any saved alarm is unreadable, or already known, nothing is imported. An alarm of a kind no capability
        declares any more (a capability removed by an upgrade) is left out, so it cannot keep the others (a
        resident's SOS) from coming back; it is listed in :attr:`not_restored` for the runtime to report.
        """
        try:
            saved = _Saved.model_validate(data)
        except ValidationError as exc:
            raise AlarmImportError(f"saved alarm state is not readable: {exc}") from exc
        restored: list[Alarm] = []
        unknown: list[Alarm] = []
        for alarm in saved.alarms:
            if not alarm.active:
                continue  # a resolved snapshot: nothing left to do for it
            if alarm.kind not in self._cfg.kinds:
                unknown.append(alarm)
                continue
            if (alarm.place is None) == (alarm.resident_id is None):
                raise AlarmImportError(f"alarm {alarm.id} must be about exactly one resident or place")
            if alarm.id in self._alarms or any(a.id == alarm.id for a in restored):
                raise AlarmImportError(f"alarm {alarm.id} is already active")
            restored.append(self._rebased(alarm, now))
        restored.sort(key=lambda a: a.first_raised.mono_s)
        self.not_restored = unknown
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

    def _fold_target(self, subject: str, place: bool, kind: str) -> Alarm | None:
        candidates = [a for a in self._alarms.values()
                      if a.kind == kind and a.about_place == place and a.subject == subject]
        return max(candidates, key=lambda a: a.last_raised.mono_s, default=None)

    def _escalation_due_at(self, alarm: Alarm) -> float | None:
        times = self._cfg.policy(alarm.kind).escalate_after_s
        if alarm.level + 1 >= len(self._cfg.ladder(alarm.kind)) or alarm.level >= len(times):
            return None
        return alarm.first_raised.mono_s + times[alarm.level]

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
                    ALARM_ESCALATED.name, at_level, AlarmEscalated,
                    level_name=self._cfg.ladder(alarm.kind)[at_level.level].name,
                    targets=list(self._cfg.targets(at_level.level, alarm.kind)),
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
        return Notify(alarm=alarm, level=alarm.level, level_name=self._cfg.ladder(alarm.kind)[alarm.level].name,
                      targets=self._cfg.targets(alarm.level, alarm.kind), message_kind=kind,
                      severity=self._cfg.policy(alarm.kind).severity, at=now,
                      name=self._name(alarm.resident_id) if self._cfg.message_names else None,
                      label=self._cfg.spec(alarm.kind).description)

    def _name(self, resident_id: str | None) -> str | None:
        if resident_id is None or self._names is None:
            return None  # a place alarm names its place; names are residents' only
        return self._names(resident_id) or None

    def _emit(self, event_type: str, alarm: Alarm, model: type[EventData], **extra: Any) -> Emit:
        data: dict[str, Any] = {
            "alarm_id": alarm.id, "kind": alarm.kind, "severity": self._cfg.policy(alarm.kind).severity,
            "device_id": alarm.device_id, "count": alarm.count,
            "level": alarm.level, "raised_at": utc_ms(alarm.first_raised.wall),
        }
        if alarm.place is not None:
            data["place"] = alarm.place
        else:
            data["resident_id"] = alarm.resident_id
        if self._cfg.include_names and alarm.place is None:
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


def _check_attachments(attachments: Sequence[Attachment]) -> tuple[Attachment, ...]:
    out = tuple(attachments)
    if len(out) > MAX_ATTACHMENTS:
        raise ValueError(f"an alarm keeps at most {MAX_ATTACHMENTS} attachments (got {len(out)})")
    for att in out:
        if not isinstance(att, Attachment):
            raise TypeError(f"alarm attachments must be Attachment references (got {type(att).__name__})")
    return out


def _check_details(details: Mapping[str, AlarmDetail] | None) -> dict[str, AlarmDetail]:
    out: dict[str, AlarmDetail] = {}
    for key, value in (details or {}).items():
        if not isinstance(key, str) or not isinstance(value, bool | int | float | str):
            raise TypeError(f"alarm details must map names to bool, int, float or str (got {key!r}: {value!r})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"alarm detail {key!r} is not a finite number ({value!r})")
        out[key] = value
    return out
