"""Charging-shed safety, the I/O shell: :class:`ChargerSafety` attaches the pure rule core
(:class:`~edgeagent.drivers.modbus.charger_rules.ChargerRules`, where the rules are listed) to a
:class:`~edgeagent.drivers.modbus.device.ModbusDevice` as a value listener. A cut is written with command
priority from inside the listener, before the poller emits anything; the events follow from a background
reporter, so a slow (durable) event store never delays the next cut. Lockouts are saved through a
:class:`StateStore` and survive restarts.

A hazard cut-off (a port or the station cut and locked out, or a locked-out one found switched on again) is
also a **place alarm** of kind ``charger_cutoff`` through the shared alarm service, about the charger's place
(its configured name, else its id): the guard room sees it among the live alarms, it repeats and escalates
until acknowledged, and the site may give it outputs (``alarms.policies.charger_cutoff.outputs``: a shed
siren). Further cut-offs of the same charger within the fold window count into it. Clearing the last lockout
of the charger resolves it (``via: auto``, the reset's who and how in the note). A full-battery cut is no
alarm.

The rule core's public names are re-exported here (``from edgeagent.drivers.modbus.charger import ...``
keeps working for them).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from edgeagent.drivers.modbus.charger_rules import (
    CUT_ACTIONS,
    VIAS,
    Action,
    ChargerRules,
    CutPort,
    CutStation,
    EnforceLockout,
    FullCut,
    LockoutReset,
    PortView,
    ResetRefused,
    SafetyLimits,
    SessionEnded,
    SessionStarted,
    Via,
)
from edgeagent.drivers.modbus.device import Value, ValueListener
from edgeagent.drivers.modbus.profile_model import Point, Profile
from edgeagent.kernel.alarms.kinds import AlarmKindSpec, KindPolicy
from edgeagent.kernel.pipeline.event_types import (
    CHARGER_LOCKOUT_RESET,
    CHARGER_PORT_CUTOFF,
    CHARGER_PORT_FULL_CUTOFF,
    CHARGER_STATION_CUTOFF,
    CHARGING_SESSION_ENDED,
    CHARGING_SESSION_STARTED,
    AlarmDetail,
)

log = logging.getLogger(__name__)

__all__ = [
    "CHARGER_ALARM_KINDS",
    "CHARGER_CUTOFF",
    "Action",
    "ChargerDevice",
    "ChargerRules",
    "ChargerSafety",
    "CutPort",
    "CutStation",
    "EnforceLockout",
    "FullCut",
    "LockoutReset",
    "MemoryStateStore",
    "PortView",
    "ResetRefused",
    "SafetyLimits",
    "SessionEnded",
    "SessionStarted",
    "StateStore",
    "Via",
]

CHARGER_CUTOFF: Final = "charger_cutoff"
#: Declared in the Modbus capability's spec. Critical (a fire risk), no output of its own (a site names its
#: shed siren in alarms.policies), reminders every 2 min, the grid worker after 10 min.
CHARGER_ALARM_KINDS: Final = (
    AlarmKindSpec(CHARGER_CUTOFF, "Charger cut off for a hazard",
                  KindPolicy("critical", repeat_s=120, escalate_after_s=(600,)), subject="place"),
)

# --- the I/O shell -----------------------------------------------------------------------------------

class Alarms(Protocol):
    """What charger safety uses of the shared alarm service (``CapabilityContext.alarms``)."""

    async def raise_(self, kind: str, subject: str, device_id: str,
                     details: Mapping[str, AlarmDetail] | None = None, *, place: bool = False) -> Any: ...

    def active(self, kind: str | None = None, subject: str | None = None) -> Sequence[Any]: ...

    async def resolve(self, alarm_id: str, by: str, via: str, note: str | None = None) -> Any: ...


class ChargerDevice(Protocol):
    """What the safety shell uses of a :class:`~edgeagent.drivers.modbus.device.ModbusDevice`."""

    @property
    def device_id(self) -> str: ...

    @property
    def profile(self) -> Profile: ...

    def listen(self, listener: ValueListener) -> None: ...

    async def command(self, name: str, args: Mapping[str, object] | None = None, *,
                      priority: Any = None) -> list[dict[str, Any]]: ...


class EventSink(Protocol):
    async def emit(self, type_name: str, device_id: str, data: Mapping[str, Any]) -> Any: ...


class StateStore(Protocol):
    """Where the lockouts are kept across restarts (the lead's SQLite table)."""

    async def load(self) -> Mapping[str, Any] | None: ...

    async def save(self, state: Mapping[str, Any]) -> None: ...


class MemoryStateStore:
    """A :class:`StateStore` in memory (tests, and a station configured without persistence)."""

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        self.state: Mapping[str, Any] | None = state
        self.saves = 0

    async def load(self) -> Mapping[str, Any] | None:
        return self.state

    async def save(self, state: Mapping[str, Any]) -> None:
        self.state = state
        self.saves += 1


_REQUIRED_COMMANDS: Final = ("port_off", "station_off", "reset_lockout")
_UNSET: Final[Any] = object()


def _command_priority() -> Any:
    """The bus's COMMAND priority, imported late so this module does not need the bus to exist."""
    try:
        from edgeagent.drivers.modbus.bus import Priority  # noqa: PLC0415
    except ImportError:  # pragma: no cover - the bus module is not there yet
        return None
    return Priority.COMMAND


@dataclass(slots=True)
class _Report:
    type_name: str | None  # None: only save the state
    data: dict[str, Any] = field(default_factory=dict)
    alarm: bool = False  # also raise the charger_cutoff place alarm


class ChargerSafety:
    """Runs :class:`ChargerRules` on a charger's readings: cuts at once, then reports.

    Registers a value listener on ``device``. On a cut the profile command (``port_off`` /
    ``station_off``) is written with command priority before the listener returns, that is before the
    poller emits the reading's own events; the alarm (with ``reaction_ms``, from the reading's arrival to
    the write done) and the session events go to ``sink`` from a background reporter, in order, and the
    lockouts to ``state_store``. A failed cut write is reported (``cut_error``) and retried at the next
    reading, since the port stays locked out and still reads on.

    ``monotonic`` must be the device's clock: the arrival of a reading is the device's ``last_poll_at``.
    """

    def __init__(self, device: ChargerDevice, limits: SafetyLimits | None, sink: EventSink,
                 state_store: StateStore, *, priority: Any = _UNSET,
                 monotonic: Callable[[], float] = time.monotonic,
                 rules: ChargerRules | None = None, alarms: Alarms | None = None,
                 place: str | None = None) -> None:
        profile = device.profile
        missing = [c for c in _REQUIRED_COMMANDS if c not in profile.commands]
        if missing:
            raise ValueError(f"{device.device_id}: profile {profile.model!r} lacks the command(s) "
                             f"{', '.join(missing)} that charger safety needs")
        ports = profile.ports
        self.device = device
        self.rules = rules or ChargerRules(limits, ports=None if ports is None else ports.count,
                                           prefix="port" if ports is None else ports.prefix)
        self._sink = sink
        self._alarms = alarms
        self.place = place or device.device_id
        self._store = state_store
        self._priority = _command_priority() if priority is _UNSET else priority
        self._now = monotonic
        self._restored = False
        self._restore_lock = asyncio.Lock()
        self._saved_version = self.rules.state_version
        self._reports: collections.deque[_Report] = collections.deque()
        self._reporter: asyncio.Task[None] | None = None
        self.cuts = 0
        self.cut_failures = 0
        self.report_failures = 0
        self.alarm_failures = 0
        self.last_reaction_ms: float | None = None
        device.listen(self._on_value)

    # --- public --------------------------------------------------------------------------------------

    async def restore(self) -> None:
        """Load the saved lockouts (done by the first reading at the latest). A state that cannot be read
        is logged and the rules start empty: protection goes on, from the readings."""
        async with self._restore_lock:
            if self._restored:
                return
            self._restored = True
            try:
                saved = await self._store.load()
                if saved is not None:
                    self.rules.import_state(saved)
            except Exception:
                log.exception("%s: charger lockouts could not be restored; starting without them",
                              self.device.device_id)
            self._saved_version = self.rules.state_version
            locked = self.rules.locked_ports()
            if locked or self.rules.station_locked_out:
                log.warning("%s: restored lockouts: station %s, ports %s", self.device.device_id,
                            self.rules.station_lockout_reason or "not locked", locked or "none")

    async def reset_lockout(self, port: int | None, by: str, via: Via) -> LockoutReset:
        """Clear a lockout (None: the station's) and report ``charger.lockout.reset``. For a port the
        charger's ``reset_lockout`` is written first; nothing is switched on (the resident re-plugs, the
        operator switches the station on). Raises :class:`ResetRefused` while the hazard is present, and
        the device's errors if the write fails (the lockout then stays)."""
        if not by.strip():
            raise ValueError("reset: 'by' must name who clears the lockout")
        if via not in VIAS:
            raise ValueError(f"reset: via must be one of {', '.join(VIAS)} (got {via!r})")
        await self.restore()
        self.rules.check_reset(port)
        if port is not None:
            await self.device.command("reset_lockout", {"port": port}, priority=self._priority)
        action = self.rules.reset(port, by, via)
        self._queue([action])
        await self.drain()
        return action

    async def drain(self) -> None:
        """Wait until every queued report is emitted and the state saved."""
        while self._reporter is not None and not self._reporter.done():
            await asyncio.shield(self._reporter)

    async def aclose(self) -> None:
        await self.drain()

    # --- the listener --------------------------------------------------------------------------------

    def _arrival(self) -> float:
        now = self._now()
        polled = getattr(self.device, "last_poll_at", None)
        if isinstance(polled, int | float) and not isinstance(polled, bool) and 0 <= now - polled < 60:
            return float(polled)
        return now

    async def _on_value(self, point: Point, value: Value, previous: Value | None) -> None:
        arrived = self._arrival()
        if not self._restored:
            await self.restore()
        actions = self.rules.feed(point.name, value, arrived)
        if actions:
            await self._act(actions, arrived)

    async def _act(self, actions: list[Action], arrived: float) -> None:
        outcomes: dict[int, tuple[float | None, str | None]] = {}
        for i, action in enumerate(actions):  # every cut first, in order
            if isinstance(action, CUT_ACTIONS):
                outcomes[i] = await self._cut(action, arrived)
        self._queue(actions, outcomes)

    async def _cut(self, action: CutPort | CutStation | EnforceLockout | FullCut,
                   arrived: float) -> tuple[float | None, str | None]:
        steps: list[tuple[str, dict[str, object] | None]]
        if isinstance(action, CutStation):
            steps = [("station_off", None)]
            if action.port is not None:
                steps.append(("port_off", {"port": action.port}))
        elif isinstance(action, EnforceLockout) and action.port is None:
            steps = [("station_off", None)]
        else:
            steps = [("port_off", {"port": action.port})]
        reaction: float | None = None
        error: str | None = None
        for i, (name, args) in enumerate(steps):
            try:
                await self.device.command(name, args, priority=self._priority)
            except Exception as exc:
                if i == 0:
                    error = f"{type(exc).__name__}: {exc}"
                log.exception("%s: %s %s failed", self.device.device_id, name, args or "")
                continue
            if i == 0:
                reaction = max(0.0, (self._now() - arrived) * 1000.0)
        self.cuts += 1
        if error is not None:
            self.cut_failures += 1
        else:
            self.last_reaction_ms = reaction
        log.warning("%s: %s (%s)", self.device.device_id, action,
                    f"cut in {reaction:.1f} ms" if reaction is not None else f"cut FAILED: {error}")
        return (None if reaction is None else round(reaction, 3)), error

    # --- reporting -----------------------------------------------------------------------------------

    def _queue(self, actions: list[Action],
               outcomes: Mapping[int, tuple[float | None, str | None]] | None = None) -> None:
        for i, action in enumerate(actions):
            reaction, error = (outcomes or {}).get(i, (None, None))
            report = _to_report(action, reaction, error)
            if report is not None:
                self._reports.append(report)
        if self.rules.state_version != self._saved_version:
            self._reports.append(_Report(None))
        if self._reports and (self._reporter is None or self._reporter.done()):
            self._reporter = asyncio.get_running_loop().create_task(
                self._report_all(), name=f"charger-safety-report:{self.device.device_id}")

    async def _report_all(self) -> None:
        while self._reports:
            report = self._reports.popleft()
            try:
                if report.type_name is None:
                    version = self.rules.state_version
                    if version != self._saved_version:
                        await self._store.save(self.rules.export_state())
                        self._saved_version = version
                else:
                    await self._sink.emit(report.type_name, self.device.device_id, report.data)
            except Exception:
                self.report_failures += 1
                log.exception("%s: charger safety could not %s", self.device.device_id,
                              "save its state" if report.type_name is None else f"emit {report.type_name}")
            if self._alarms is not None and report.type_name is not None:
                try:
                    await self._alarm(report)
                except Exception:
                    # AlarmNotDurable included: the alarm ran locally (guard room, outputs) but is not stored.
                    self.alarm_failures += 1
                    log.exception("%s: charger cut-off alarm for %s not raised or resolved", self.device.device_id,
                                  self.place)

    async def _alarm(self, report: _Report) -> None:
        assert self._alarms is not None
        if report.alarm:
            details = {k: v for k, v in report.data.items()
                       if k in ("port", "reason", "value", "limit", "unit", "reaction_ms", "cut_error")
                       and isinstance(v, bool | int | float | str)}
            await self._alarms.raise_(CHARGER_CUTOFF, self.place, self.device.device_id, details, place=True)
        elif report.type_name == CHARGER_LOCKOUT_RESET.name and not self.rules.locked_ports() \
                and not self.rules.station_locked_out:
            note = "".join(ch if ch.isprintable() else "?"
                           for ch in f"lockouts cleared by {report.data.get('by')} via {report.data.get('via')}")
            for alarm in self._alarms.active(CHARGER_CUTOFF, self.place):
                if alarm.device_id == self.device.device_id:
                    await self._alarms.resolve(alarm.id, self.device.device_id, "auto", note[:500])


def _to_report(action: Action, reaction_ms: float | None, error: str | None) -> _Report | None:
    cut = {"reaction_ms": reaction_ms, "cut_error": error}
    if isinstance(action, CutPort):
        return _Report(CHARGER_PORT_CUTOFF.name, {"port": action.port, "reason": action.reason,
                                                  "value": action.value, "limit": action.limit,
                                                  "unit": action.unit, **cut}, alarm=True)
    if isinstance(action, CutStation):
        return _Report(CHARGER_STATION_CUTOFF.name, {"reason": action.reason, "port": action.port,
                                                     "value": action.value, "limit": action.limit,
                                                     "unit": action.unit, **cut}, alarm=True)
    if isinstance(action, EnforceLockout):
        if not action.report:
            return None
        if action.port is None:
            return _Report(CHARGER_STATION_CUTOFF.name, {"reason": "lockout_enforced", **cut}, alarm=True)
        return _Report(CHARGER_PORT_CUTOFF.name, {"port": action.port, "reason": "lockout_enforced", **cut},
                       alarm=True)
    if isinstance(action, FullCut):
        return _Report(CHARGER_PORT_FULL_CUTOFF.name, {
            "port": action.port, "session_id": action.session_id, "current_a": action.current_a,
            "limit_a": action.limit_a, "after_s": round(action.after_s, 3), **cut})
    if isinstance(action, SessionStarted):
        return _Report(CHARGING_SESSION_STARTED.name, {"port": action.port, "session_id": action.session_id,
                                                       "energy_kwh_at_start": action.energy_kwh_at_start})
    if isinstance(action, SessionEnded):
        return _Report(CHARGING_SESSION_ENDED.name, {"port": action.port, "session_id": action.session_id,
                                                     "energy_kwh": action.energy_kwh,
                                                     "duration_s": action.duration_s, "reason": action.reason})
    if isinstance(action, LockoutReset):
        return _Report(CHARGER_LOCKOUT_RESET.name, {"port": action.port, "by": action.by, "via": action.via,
                                                    "cleared_reason": action.cleared_reason})
    return None
