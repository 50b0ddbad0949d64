"""Charging-shed safety, the pure rule core: what to cut, lock out and report, from readings and the clock.

The I/O shell that attaches these rules to a polled device (:class:`ChargerSafety`) is
:mod:`edgeagent.drivers.modbus.charger`, which re-exports this module's public names.

Two layers, as for the point tracker:

* :class:`ChargerRules` is the pure rule core. It is fed ``(point name, value, monotonic time)`` for the
  values of an ``ebike-charger-8port``-like profile and returns :data:`Action` s; it does no I/O and
  keeps the per-port model (lockouts, relay as commanded, sessions, low-current timers). Its lockouts
  and open sessions are exported as JSON-able data (:meth:`ChargerRules.export_state`) so they survive
  a restart.
* :class:`ChargerSafety` attaches the core to a :class:`~edgeagent.drivers.modbus.device.ModbusDevice`
  as a value listener. A cut is written with command priority from inside the listener, before the
  poller emits anything; the events follow from a background reporter, so a slow (durable) event store
  never delays the next cut.

Rules (limits in :class:`SafetyLimits`):

* a port current above ``max_current_a`` or temperature above ``max_temperature_c`` (or the charger's
  own over-current / over-temperature / overload fault bit) cuts that port and locks it out;
* the smoke input (or the smoke bit of ``station_alarms``) opens the station's main contactor and locks
  the station out, when ``cut_on_smoke``;
* a port reporting ``relay_welded`` cannot be opened: the station is cut and locked out, and so is the port;
* a locked-out port (station) found switched on again is cut again; if it still reads on, or a cut
  port still draws current, ``cut_verify_s`` after the cut, the station is cut (``cut_failed``);
* a session starts when a port with its relay on draws more than ``idle_current_a``; it ends when the
  relay opens, when no current flows for ``unplugged_after_s``, on a cut, or when the station opens;
  its energy is the sum of the energy counter's increments (a counter reset or wrap never counts
  negative);
* a session whose current stays below ``full_current_a`` for ``full_after_s`` is a full battery left on
  charge: the port is cut, without a lockout.

A lockout is cleared only by :meth:`ChargerRules.reset` (:meth:`ChargerSafety.reset_lockout`), which
refuses while the hazard is still there (temperature above ``max_temperature_c -
temperature_hysteresis_c``, current above the limit, smoke, a welded relay) or not known.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ulid import ULID

from edgeagent.drivers.modbus.device import Value
from edgeagent.kernel.pipeline.event_types import (
    PortCutReason,
    SessionEndReason,
    StationCutReason,
)

log = logging.getLogger(__name__)

Via = Literal["cloud", "cli", "local"]
VIAS: Final[tuple[str, ...]] = get_args(Via)
ENERGY_WRAP_KWH: Final = 2**32 * 0.001  # the profile's u32 Wh counter, in kWh
STATE_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class SafetyLimits:
    """Limits of the charging-shed rules (to move into the kernel config as ``ChargerSafetyConfig``)."""

    max_current_a: float = 3.5
    max_temperature_c: float = 65.0
    cut_on_smoke: bool = True
    full_current_a: float = 0.15  # below this a charging battery counts as full ...
    full_after_s: float = 1800.0  # ... after this long: the port is cut (no lockout)
    temperature_hysteresis_c: float = 5.0  # a lockout may be reset below max_temperature_c minus this
    idle_current_a: float = 0.05  # above this (relay on) a session starts; at or below, nothing is drawn
    unplugged_after_s: float = 120.0  # no current for this long ends a session as unplugged
    cut_verify_s: float = 10.0  # a cut port still on / drawing current this long after the cut: cut the station

    def __post_init__(self) -> None:
        for name in ("max_current_a", "max_temperature_c", "full_current_a", "full_after_s", "idle_current_a",
                     "unplugged_after_s", "cut_verify_s"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"SafetyLimits.{name} must be a positive number (got {v!r})")
        if not (math.isfinite(self.temperature_hysteresis_c) and self.temperature_hysteresis_c >= 0):
            raise ValueError("SafetyLimits.temperature_hysteresis_c must be 0 or more")
        if not self.idle_current_a < self.full_current_a < self.max_current_a:
            raise ValueError("SafetyLimits: need idle_current_a < full_current_a < max_current_a "
                             f"(got {self.idle_current_a}, {self.full_current_a}, {self.max_current_a})")


# --- actions ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CutPort:
    """Switch the port off now (``port_off``); the port is locked out."""

    port: int
    reason: PortCutReason
    value: float | None
    limit: float | None
    unit: str | None


@dataclass(frozen=True, slots=True)
class CutStation:
    """Open the main contactor now (``station_off``); the station is locked out. ``port``: the port whose
    fault caused it, which is switched off as well (it is locked out too)."""

    reason: StationCutReason
    port: int | None = None
    value: float | bool | None = None
    limit: float | None = None
    unit: str | None = None


@dataclass(frozen=True, slots=True)
class EnforceLockout:
    """A locked-out port (``port=None``: the station) reads switched on: cut it again. ``report``: it was off
    (or not known) before, so someone switched it on; further readings of the same episode are retried
    cuts, not reported again."""

    port: int | None
    lockout_reason: str
    report: bool = True


@dataclass(frozen=True, slots=True)
class FullCut:
    """Switch the port off: the battery is full (not a lockout)."""

    port: int
    session_id: str
    current_a: float
    limit_a: float
    after_s: float


@dataclass(frozen=True, slots=True)
class SessionStarted:
    port: int
    session_id: str
    energy_kwh_at_start: float | None


@dataclass(frozen=True, slots=True)
class SessionEnded:
    port: int
    session_id: str
    energy_kwh: float
    duration_s: float
    reason: SessionEndReason


@dataclass(frozen=True, slots=True)
class LockoutReset:
    port: int | None
    by: str
    via: Via
    cleared_reason: str | None


Action = CutPort | CutStation | EnforceLockout | FullCut | SessionStarted | SessionEnded | LockoutReset
CUT_ACTIONS: Final = (CutPort, CutStation, EnforceLockout, FullCut)


class ResetRefused(ValueError):
    """A lockout cannot be cleared now: nothing is locked out, or the hazard is still there (or unknown)."""


# --- persisted state ---------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _LockoutState(_Strict):
    reason: str = Field(min_length=1)
    value: float | bool | None = None
    limit: float | None = None


class _SessionState(_Strict):
    session_id: str = Field(min_length=1)
    energy_kwh: float = Field(ge=0, allow_inf_nan=False)
    last_counter_kwh: float | None = Field(default=None, allow_inf_nan=False)
    elapsed_s: float = Field(ge=0, allow_inf_nan=False)


class _State(_Strict):
    v: Literal[1] = STATE_VERSION
    station_lockout: _LockoutState | None = None
    port_lockouts: dict[int, _LockoutState] = Field(default_factory=dict)
    sessions: dict[int, _SessionState] = Field(default_factory=dict)


# --- the pure rule core ------------------------------------------------------------------------------

@dataclass(slots=True)
class _Lockout:
    reason: str
    value: float | bool | None = None
    limit: float | None = None
    cut_at: float | None = None  # monotonic time of the last cut written for it (None: not since restart)
    confirmed_off: bool = False  # the relay (contactor) has read off since that cut


@dataclass(slots=True)
class _Session:
    session_id: str
    started_at: float | None  # None: restored from a saved state, anchored at the next reading
    elapsed_before_s: float = 0.0  # duration counted before a restart
    energy_kwh: float = 0.0
    last_counter_kwh: float | None = None
    low_since: float | None = None  # current below full_current_a since
    idle_since: float | None = None  # current at or below idle_current_a since
    restored: bool = False


@dataclass(slots=True)
class _Port:
    relay_on: bool | None = None  # as last read, or as commanded since
    current_a: float | None = None
    temperature_c: float | None = None
    energy_kwh: float | None = None
    state: str | None = None
    welded: bool = False
    lockout: _Lockout | None = None
    session: _Session | None = None


@dataclass(frozen=True, slots=True)
class PortView:
    """What the core believes of a port (for status pages and tests)."""

    port: int
    relay_on: bool | None
    locked_out: bool
    lockout_reason: str | None
    session_id: str | None
    current_a: float | None
    temperature_c: float | None


_FAULT_CUTS: Final[dict[str, PortCutReason]] = {
    "over_current": "over_current",
    "overload_cutoff": "over_current",
    "over_temperature": "over_temperature",
}


def _number(value: Value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _flag(value: Value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    return None


def _new_session_id() -> str:
    return str(ULID())


@dataclass(slots=True)
class _Station:
    enabled: bool | None = None
    smoke: bool | None = None  # the smoke input
    alarm_smoke: bool | None = None  # the smoke bit of station_alarms
    lockout: _Lockout | None = None

    @property
    def smoke_present(self) -> bool:
        return bool(self.smoke) or bool(self.alarm_smoke)


class ChargerRules:
    """The charging-shed rules, pure: readings and time in, actions out. Not thread-safe; one per station.

    ``ports``: the station's port count (readings and resets of other ports are refused/ignored); None
    accepts any port number. ``prefix``: per-port point names are PREFIX<n>_<key>, as the profile's
    ``ports.prefix`` expands them.
    """

    def __init__(self, limits: SafetyLimits | None = None, *, ports: int | None = None, prefix: str = "port",
                 new_session_id: Callable[[], str] = _new_session_id,
                 energy_wrap_kwh: float | None = ENERGY_WRAP_KWH, max_energy_step_kwh: float = 50.0) -> None:
        self.limits = limits or SafetyLimits()
        self.port_count = ports
        self._name_re = re.compile(rf"^{re.escape(prefix)}([1-9][0-9]*)_([a-z0-9_]+)$")
        self._new_id = new_session_id
        self._wrap = energy_wrap_kwh
        self._max_step = max_energy_step_kwh
        self._ports: dict[int, _Port] = {}
        self._station = _Station()
        self._now: float | None = None  # latest time seen
        self.state_version = 0  # bumped whenever what export_state() returns changed in substance

    # --- queries -------------------------------------------------------------------------------------

    @property
    def station_locked_out(self) -> bool:
        return self._station.lockout is not None

    @property
    def station_lockout_reason(self) -> str | None:
        return None if self._station.lockout is None else self._station.lockout.reason

    @property
    def station_enabled(self) -> bool | None:
        return self._station.enabled

    def locked_ports(self) -> list[int]:
        return sorted(n for n, p in self._ports.items() if p.lockout is not None)

    def view(self, port: int) -> PortView:
        p = self._ports.get(port, _Port())
        return PortView(port=port, relay_on=p.relay_on, locked_out=p.lockout is not None,
                        lockout_reason=None if p.lockout is None else p.lockout.reason,
                        session_id=None if p.session is None else p.session.session_id,
                        current_a=p.current_a, temperature_c=p.temperature_c)

    # --- readings ------------------------------------------------------------------------------------

    def feed(self, name: str, value: Value, now: float) -> list[Action]:
        """One decoded value of the point ``name`` read at monotonic time ``now``: the actions it calls for,
        cuts first. Points the rules do not use give ``[]``."""
        self._now = now if self._now is None else max(self._now, now)
        self._anchor_restored(now)
        m = self._name_re.match(name)
        if m is not None:
            port = int(m.group(1))
            if self.port_count is not None and port > self.port_count:
                return []
            return self._feed_port(port, m.group(2), value, now)
        return self._feed_station(name, value, now)

    def _port(self, port: int) -> _Port:
        p = self._ports.get(port)
        if p is None:
            p = self._ports[port] = _Port()
        return p

    def _feed_port(self, port: int, key: str, value: Value, now: float) -> list[Action]:
        p = self._port(port)
        if key == "relay":
            on = _flag(value)
            return [] if on is None else self._on_relay(port, p, on, now)
        if key == "current":
            amps = _number(value)
            return [] if amps is None else self._on_current(port, p, amps, now)
        if key == "temperature":
            temp = _number(value)
            if temp is None:
                return []
            p.temperature_c = temp
            if temp > self.limits.max_temperature_c:
                return self._cut_port(port, p, "over_temperature", temp, self.limits.max_temperature_c, "degC", now)
            return []
        if key == "energy":
            kwh = _number(value)
            if kwh is not None:
                self._on_energy(p, kwh)
            return []
        if key == "faults":
            return self._on_faults(port, p, value, now) if isinstance(value, dict) else []
        if key == "state":
            if isinstance(value, str):
                p.state = value
            return []
        return []

    def _feed_station(self, name: str, value: Value, now: float) -> list[Action]:
        st = self._station
        if name == "smoke":
            on = _flag(value)
            if on is None:
                return []
            st.smoke = on
            return self._on_smoke(on, now)
        if name == "station_alarms":
            if not isinstance(value, dict):
                return []
            st.alarm_smoke = bool(value.get("smoke", False))
            return self._on_smoke(st.alarm_smoke, now)
        if name == "station_enable":
            on = _flag(value)
            return [] if on is None else self._on_station_enable(on, now)
        return []

    # --- rules ---------------------------------------------------------------------------------------

    def _on_relay(self, port: int, p: _Port, on: bool, now: float) -> list[Action]:
        lock = p.lockout
        if lock is not None:
            p.relay_on = False  # read off, or cut again below
            if not on:
                lock.confirmed_off = True
                return []
            # A locked-out port reads switched on: someone switched it on, or the cut did not take.
            enforce = self._enforce(port, lock, now)
            if not enforce.report and lock.cut_at is not None and now - lock.cut_at >= self.limits.cut_verify_s:
                return [*self._cut_failed(port, True, None, None, now), enforce]
            return [enforce]
        p.relay_on = on
        s = p.session
        if s is None:
            return []
        if on:
            s.restored = False
            return []
        reason: SessionEndReason = ("unknown" if s.restored else "full" if p.state == "full" else
                                    "cutoff" if p.state in ("fault", "locked_out") else "switched_off")
        return [self._end_session(port, p, reason, now)]

    @staticmethod
    def _enforce(port: int | None, lock: _Lockout, now: float) -> EnforceLockout:
        """Cut a locked-out port (station) that reads on: a new episode if it had read off since the last
        cut (or nothing is known since a restart), else a retry of the same one."""
        new_episode = lock.cut_at is None or lock.confirmed_off
        if new_episode:
            lock.cut_at = now
        lock.confirmed_off = False
        return EnforceLockout(port, lock.reason, report=new_episode)

    def _on_current(self, port: int, p: _Port, amps: float, now: float) -> list[Action]:
        lim = self.limits
        p.current_a = amps
        if amps > lim.max_current_a and p.lockout is None:
            return self._cut_port(port, p, "over_current", amps, lim.max_current_a, "A", now)
        lock = p.lockout
        if lock is not None:
            if lock.cut_at is None:
                lock.cut_at = now  # restored lockout: the verification window starts at the first reading
            elif amps > lim.full_current_a and now - lock.cut_at >= lim.cut_verify_s:
                return self._cut_failed(port, amps, lim.full_current_a, "A", now)
            return []
        if self._station.lockout is not None or self._station.enabled is False:
            return []
        s = p.session
        if s is None:
            if amps > lim.idle_current_a and p.relay_on is not False:
                return [self._start_session(port, p, now)]
            return []
        if amps > lim.idle_current_a:
            s.restored = False
        # A session: full battery (low current for long) and unplugged (no current for a while).
        s.low_since = (s.low_since if s.low_since is not None else now) if amps < lim.full_current_a else None
        s.idle_since = (s.idle_since if s.idle_since is not None else now) if amps <= lim.idle_current_a else None
        if s.low_since is not None and now - s.low_since >= lim.full_after_s:
            full = FullCut(port, s.session_id, amps, lim.full_current_a, now - s.low_since)
            p.relay_on = False
            return [full, self._end_session(port, p, "full", now)]
        if s.idle_since is not None and now - s.idle_since >= lim.unplugged_after_s:
            return [self._end_session(port, p, "unplugged", now)]
        return []

    def _on_energy(self, p: _Port, kwh: float) -> None:
        s = p.session
        if s is not None:
            if s.last_counter_kwh is not None:
                s.energy_kwh += self._energy_delta(s.last_counter_kwh, kwh)
            s.last_counter_kwh = kwh
        p.energy_kwh = kwh

    def _energy_delta(self, previous: float, current: float) -> float:
        """Counter increment, never negative: a wrap of the counter counts across it; any other drop is a
        counter reset (the charger restarted), whose new value is what was counted since."""
        if current >= previous:
            return current - previous
        if self._wrap is not None:
            across = self._wrap - previous + current
            if 0 <= across <= self._max_step:
                return across
        return max(current, 0.0)

    def _on_faults(self, port: int, p: _Port, bits: Mapping[str, bool], now: float) -> list[Action]:
        actions: list[Action] = []
        p.welded = bool(bits.get("relay_welded", False))
        if p.welded:
            if p.lockout is None:
                p.lockout = _Lockout("relay_welded", cut_at=now)
                p.relay_on = False
                self.state_version += 1
                if p.session is not None:
                    actions.append(self._end_session(port, p, "cutoff", now))
            if self._station.lockout is None:
                actions[:0] = self._cut_station("relay_welded", now, port=port, value=True)
            return actions
        for bit, reason in _FAULT_CUTS.items():
            if bits.get(bit) and p.lockout is None:
                return self._cut_port(port, p, reason, None, None, None, now)
        return []

    def _on_smoke(self, on: bool, now: float) -> list[Action]:
        if on and self.limits.cut_on_smoke and self._station.lockout is None:
            return self._cut_station("smoke", now, value=True)
        return []

    def _on_station_enable(self, on: bool, now: float) -> list[Action]:
        st = self._station
        lock = st.lockout
        if lock is not None:
            if not on:
                st.enabled = False
                lock.confirmed_off = True
                return []
            st.enabled = False  # cut again
            return [self._enforce(None, lock, now)]
        st.enabled = on
        if not on:
            return [self._end_session(n, p, "station_off", now) for n, p in sorted(self._ports.items())
                    if p.session is not None]
        return []

    # --- effects on the model ----------------------------------------------------------------------------

    def _cut_port(self, port: int, p: _Port, reason: PortCutReason, value: float | None, limit: float | None,
                  unit: str | None, now: float) -> list[Action]:
        if p.lockout is not None:
            return []
        p.lockout = _Lockout(reason, value, limit, cut_at=now)
        p.relay_on = False
        self.state_version += 1
        actions: list[Action] = [CutPort(port, reason, value, limit, unit)]
        if p.session is not None:
            actions.append(self._end_session(port, p, "cutoff", now))
        return actions

    def _cut_station(self, reason: StationCutReason, now: float, *, port: int | None = None,
                     value: float | bool | None = None, limit: float | None = None,
                     unit: str | None = None) -> list[Action]:
        st = self._station
        st.lockout = _Lockout(reason, value, limit, cut_at=now)
        st.enabled = False
        self.state_version += 1
        actions: list[Action] = [CutStation(reason, port, value, limit, unit)]
        actions += [self._end_session(n, p, "cutoff", now) for n, p in sorted(self._ports.items())
                    if p.session is not None]
        return actions

    def _cut_failed(self, port: int, value: float | bool, limit: float | None, unit: str | None,
                    now: float) -> list[Action]:
        if self._station.lockout is not None:
            return []
        return self._cut_station("cut_failed", now, port=port, value=value, limit=limit, unit=unit)

    def _start_session(self, port: int, p: _Port, now: float) -> SessionStarted:
        s = _Session(self._new_id(), started_at=now, last_counter_kwh=p.energy_kwh)
        p.session = s
        self.state_version += 1
        return SessionStarted(port, s.session_id, p.energy_kwh)

    def _end_session(self, port: int, p: _Port, reason: SessionEndReason, now: float) -> SessionEnded:
        s = p.session
        assert s is not None
        p.session = None
        self.state_version += 1
        return SessionEnded(port, s.session_id, round(s.energy_kwh, 6), round(self._duration(s, now), 3), reason)

    def _duration(self, s: _Session, now: float) -> float:
        running = 0.0 if s.started_at is None else max(0.0, now - s.started_at)
        return s.elapsed_before_s + running

    def _anchor_restored(self, now: float) -> None:
        for p in self._ports.values():
            if p.session is not None and p.session.started_at is None:
                p.session.started_at = now

    # --- resets --------------------------------------------------------------------------------------

    def check_reset(self, port: int | None) -> None:
        """Raise :class:`ResetRefused` unless the lockout of ``port`` (None: the station) may be cleared."""
        lim = self.limits
        st = self._station
        if port is None:
            if st.lockout is None:
                raise ResetRefused("the station is not locked out")
            if st.smoke is None:
                raise ResetRefused("station lockout not cleared: the smoke input has not been read yet")
            if st.smoke_present:
                raise ResetRefused("station lockout not cleared: smoke is still detected")
            welded = [n for n, p in sorted(self._ports.items()) if p.welded]
            if welded:
                raise ResetRefused("station lockout not cleared: the relay of port "
                                   f"{', '.join(map(str, welded))} still reports welded contacts")
            return
        if port < 1 or (self.port_count is not None and port > self.port_count):
            limit = f"1 .. {self.port_count}" if self.port_count is not None else "1 or more"
            raise ResetRefused(f"no port {port} (ports are {limit})")
        p = self._ports.get(port)
        if p is None or (p.lockout is None and p.state != "locked_out"):
            raise ResetRefused(f"port {port} is not locked out")
        if st.smoke_present:
            raise ResetRefused(f"port {port} lockout not cleared: smoke is still detected")
        if p.welded:
            raise ResetRefused(f"port {port} lockout not cleared: its relay still reports welded contacts")
        below = lim.max_temperature_c - lim.temperature_hysteresis_c
        if p.temperature_c is None:
            raise ResetRefused(f"port {port} lockout not cleared: its temperature has not been read yet")
        if p.temperature_c > below:
            raise ResetRefused(f"port {port} lockout not cleared: temperature {p.temperature_c:g} degC is still "
                               f"above {below:g} degC (limit {lim.max_temperature_c:g} - "
                               f"{lim.temperature_hysteresis_c:g})")
        if p.current_a is not None and p.current_a > lim.max_current_a:
            raise ResetRefused(f"port {port} lockout not cleared: current {p.current_a:g} A is still above "
                               f"{lim.max_current_a:g} A")

    def reset(self, port: int | None, by: str, via: Via) -> LockoutReset:
        """Clear the lockout of ``port`` (None: the station); raises :class:`ResetRefused` while the hazard is
        present. Nothing is switched on: the port stays off until it is switched on again (re-plugged)."""
        if not by.strip():
            raise ValueError("reset: 'by' must name who clears the lockout")
        if via not in VIAS:
            raise ValueError(f"reset: via must be one of {', '.join(VIAS)} (got {via!r})")
        self.check_reset(port)
        if port is None:
            cleared = self._station.lockout
            self._station.lockout = None
        else:
            p = self._port(port)
            cleared = p.lockout
            p.lockout = None
        self.state_version += 1
        return LockoutReset(port, by, via, None if cleared is None else cleared.reason)

    # --- persistence -------------------------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """Lockouts and open sessions, as JSON-able data for :meth:`import_state` after a restart."""
        now = self._now
        sessions: dict[int, _SessionState] = {}
        for n, p in sorted(self._ports.items()):
            s = p.session
            if s is not None:
                elapsed = s.elapsed_before_s if now is None else self._duration(s, now)
                sessions[n] = _SessionState(session_id=s.session_id, energy_kwh=s.energy_kwh,
                                            last_counter_kwh=s.last_counter_kwh, elapsed_s=elapsed)
        lockouts = {n: _LockoutState(reason=p.lockout.reason, value=p.lockout.value, limit=p.lockout.limit)
                    for n, p in sorted(self._ports.items()) if p.lockout is not None}
        sl = self._station.lockout
        state = _State(station_lockout=None if sl is None else _LockoutState(reason=sl.reason, value=sl.value,
                                                                             limit=sl.limit),
                       port_lockouts=lockouts, sessions=sessions)
        return state.model_dump(mode="json")

    def import_state(self, data: Mapping[str, Any]) -> None:
        """Restore what :meth:`export_state` gave (before the first reading). Lockouts replace the current
        ones; a restored session goes on (its duration excludes the time the gateway was down) or ends as
        ``unknown`` if its port is found switched off. Raises ValueError for data it cannot use."""
        try:
            state = _State.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"charger safety state cannot be restored: {exc}") from None
        bad = [n for n in (*state.port_lockouts, *state.sessions)
               if n < 1 or (self.port_count is not None and n > self.port_count)]
        if bad:
            raise ValueError(f"charger safety state cannot be restored: no port {bad[0]}")
        sl = state.station_lockout
        self._station.lockout = None if sl is None else _Lockout(sl.reason, sl.value, sl.limit)
        for p in self._ports.values():
            p.lockout = None
            p.session = None
        for n, lk in state.port_lockouts.items():
            p = self._port(n)
            p.lockout = _Lockout(lk.reason, lk.value, lk.limit)
            if p.relay_on:
                p.relay_on = None  # not commanded off yet: the next reading cuts it
        for n, ss in state.sessions.items():
            p = self._port(n)
            if p.lockout is not None:
                continue
            p.session = _Session(ss.session_id, started_at=None, elapsed_before_s=ss.elapsed_s,
                                 energy_kwh=ss.energy_kwh, last_counter_kwh=ss.last_counter_kwh, restored=True)
        if self._now is not None:
            self._anchor_restored(self._now)
        self.state_version += 1
