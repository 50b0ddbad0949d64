"""Charging-shed safety: the pure rule core (ChargerRules) and its I/O shell (ChargerSafety) on fake and
profile-driven devices. End-to-end runs against a real Modbus server live elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.modbus.bus import Priority as BusPriority
from edgeagent.drivers.modbus.charger import ChargerSafety, MemoryStateStore
from edgeagent.drivers.modbus.charger_rules import (
    Action,
    ChargerRules,
    CutPort,
    CutStation,
    EnforceLockout,
    FullCut,
    LockoutReset,
    ResetRefused,
    SafetyLimits,
    SessionEnded,
    SessionStarted,
)
from edgeagent.drivers.modbus.device import ModbusDevice
from edgeagent.drivers.modbus.profile import Profile, shipped_profile
from edgeagent.kernel.errors import DeviceUnavailable
from edgeagent.kernel.pipeline.event_types import REGISTRY
from edgeagent.kernel.pipeline.events import EventFactory, Priority
from edgeagent.kernel.runtime.clock import Clock as WallClock

CHARGER = shipped_profile("ebike-charger-8port")
LIMITS = SafetyLimits()
NO_FAULTS = {"over_current": False, "over_temperature": False, "relay_welded": False, "no_load": False,
             "overload_cutoff": False}


def ids() -> Iterator[str]:
    return (f"S{n}" for n in itertools.count(1))


def rules(limits: SafetyLimits = LIMITS) -> ChargerRules:
    it = ids()
    return ChargerRules(limits, ports=8, new_session_id=lambda: next(it))


def charging(r: ChargerRules, port: int = 3, *, t: float = 0.0, energy: float = 100.0) -> list[Action]:
    """A port switched on that starts drawing 2 A: a session."""
    r.feed(f"port{port}_energy", energy, t)
    r.feed(f"port{port}_relay", True, t)
    return r.feed(f"port{port}_current", 2.0, t)


# --- hazards -------------------------------------------------------------------------------------------

def test_over_current_cuts_the_port_once_and_locks_it_out() -> None:
    r = rules()
    r.feed("port3_relay", True, 0)
    assert r.feed("port3_current", 3.5, 1) == [SessionStarted(3, "S1", None)]  # at the limit: fine
    assert r.feed("port3_current", 3.6, 2) == [CutPort(3, "over_current", 3.6, 3.5, "A"),
                                               SessionEnded(3, "S1", 0.0, 1.0, "cutoff")]
    assert r.view(3).locked_out and r.view(3).relay_on is False and r.view(3).lockout_reason == "over_current"
    assert r.feed("port3_current", 3.9, 3) == []  # already locked out: no second cut
    assert r.locked_ports() == [3]
    assert r.feed("port4_current", 1.0, 3) != []  # other ports go on (a session starts there)
    assert not r.view(4).locked_out


def test_over_temperature_cuts_the_port_and_ends_its_session() -> None:
    r = rules()
    assert charging(r) == [SessionStarted(3, "S1", 100.0)]
    assert r.feed("port3_temperature", 65.0, 10) == []
    assert r.feed("port3_temperature", 66.2, 20) == [
        CutPort(3, "over_temperature", 66.2, 65.0, "degC"),
        SessionEnded(3, "S1", 0.0, 20.0, "cutoff"),
    ]
    assert r.view(3).session_id is None and r.view(3).locked_out


def test_charger_fault_bits_cut_without_a_value() -> None:
    r = rules()
    assert r.feed("port2_faults", NO_FAULTS, 0) == []
    assert r.feed("port2_faults", {**NO_FAULTS, "over_temperature": True}, 1) == [
        CutPort(2, "over_temperature", None, None, None)]
    assert r.feed("port5_faults", {**NO_FAULTS, "overload_cutoff": True}, 1) == [
        CutPort(5, "over_current", None, None, None)]
    assert r.feed("port2_faults", {**NO_FAULTS, "over_temperature": True}, 2) == []


def test_smoke_cuts_the_station_and_ends_every_session() -> None:
    r = rules()
    charging(r, 1)
    charging(r, 2)
    assert r.feed("smoke", False, 5) == []
    assert r.feed("smoke", True, 6) == [
        CutStation("smoke", value=True),
        SessionEnded(1, "S1", 0.0, 6.0, "cutoff"),
        SessionEnded(2, "S2", 0.0, 6.0, "cutoff"),
    ]
    assert r.station_locked_out and r.station_lockout_reason == "smoke" and r.station_enabled is False
    assert r.feed("smoke", True, 7) == []  # once
    assert r.feed("port1_current", 2.0, 8) == []  # no session while the station is cut


def test_smoke_bit_of_station_alarms_counts_too_and_cut_on_smoke_can_be_off() -> None:
    r = rules()
    alarms = {"over_temperature": False, "smoke": True, "mains_fault": False, "meter_fault": False, "rcd_trip": False}
    assert r.feed("station_alarms", alarms, 0) == [CutStation("smoke", value=True)]
    quiet = rules(SafetyLimits(cut_on_smoke=False))
    assert quiet.feed("smoke", True, 0) == []
    assert not quiet.station_locked_out


def test_welded_relay_cuts_the_station_and_locks_the_port() -> None:
    r = rules()
    charging(r, 2)
    acts = r.feed("port2_faults", {**NO_FAULTS, "relay_welded": True}, 3)
    assert acts == [CutStation("relay_welded", port=2, value=True), SessionEnded(2, "S1", 0.0, 3.0, "cutoff")]
    assert r.station_locked_out and r.view(2).locked_out and r.view(2).lockout_reason == "relay_welded"
    assert r.feed("port2_faults", {**NO_FAULTS, "relay_welded": True}, 4) == []


def test_locked_out_port_switched_on_again_is_cut_again() -> None:
    r = rules()
    r.feed("port3_relay", True, 0)
    r.feed("port3_temperature", 80.0, 1)
    assert r.feed("port3_relay", False, 2) == []  # the cut took
    # Someone switches it on (a card, the charger's own logic): cut again, and report it.
    assert r.feed("port3_relay", True, 100) == [EnforceLockout(3, "over_temperature", report=True)]
    assert r.view(3).relay_on is False
    # Still on at the next reading: retried, not reported again ...
    assert r.feed("port3_relay", True, 101) == [EnforceLockout(3, "over_temperature", report=False)]
    # ... and once cut_verify_s has passed, the port relay cannot be trusted: the station is cut.
    assert r.feed("port3_relay", True, 110) == [CutStation("cut_failed", port=3, value=True),
                                                EnforceLockout(3, "over_temperature", report=False)]
    assert r.station_locked_out


def test_cut_port_still_drawing_current_cuts_the_station() -> None:
    r = rules()
    r.feed("port6_current", 3.8, 0)
    assert r.feed("port6_current", 3.8, 5) == []  # the meter may lag the cut
    assert r.feed("port6_current", 0.1, 12) == []  # below full_current_a: noise, not a load
    assert r.feed("port6_current", 1.2, 13) == [CutStation("cut_failed", port=6, value=1.2, limit=0.15, unit="A")]


def test_locked_out_station_switched_on_is_cut_again() -> None:
    r = rules()
    r.feed("smoke", True, 0)
    assert r.feed("station_enable", False, 1) == []
    assert r.feed("station_enable", True, 50) == [EnforceLockout(None, "smoke", report=True)]
    assert r.station_enabled is False


# --- full batteries and sessions ---------------------------------------------------------------------------

def test_full_battery_is_cut_after_full_after_s_without_lockout() -> None:
    r = rules()
    charging(r, 4)
    t = 600.0
    assert r.feed("port4_current", 0.12, t) == []
    assert r.feed("port4_current", 0.20, t + 900) == []  # back above: the timer starts over
    assert r.feed("port4_current", 0.10, t + 1000) == []
    assert r.feed("port4_current", 0.10, t + 1000 + 1799) == []
    acts = r.feed("port4_current", 0.09, t + 1000 + 1800)
    assert acts == [FullCut(4, "S1", 0.09, 0.15, 1800.0), SessionEnded(4, "S1", 0.0, 3400.0, "full")]
    assert not r.view(4).locked_out and r.view(4).relay_on is False
    # Switched on again with a new battery: a new session, no lockout in the way.
    r.feed("port4_relay", True, 4000)
    assert r.feed("port4_current", 1.5, 4001) == [SessionStarted(4, "S2", 100.0)]


def test_session_ends_unplugged_after_no_current_for_a_while() -> None:
    r = rules()
    charging(r, 1)
    assert r.feed("port1_current", 0.0, 10) == []
    assert r.feed("port1_current", 0.01, 129) == []
    assert r.feed("port1_current", 0.0, 130) == [SessionEnded(1, "S1", 0.0, 130.0, "unplugged")]
    assert r.feed("port1_current", 0.0, 131) == []


def test_session_energy_is_the_counter_delta_across_reset_and_wrap() -> None:
    r = rules()
    assert charging(r, 3, energy=100.0) == [SessionStarted(3, "S1", 100.0)]
    for t, kwh in ((5, 100.2), (10, 100.5), (15, 0.1), (20, 0.3)):  # charger restarted: counter from 0
        r.feed("port3_energy", kwh, t)
    r.feed("port3_state", "charging", 20)
    (ended,) = r.feed("port3_relay", False, 25)
    assert isinstance(ended, SessionEnded)
    assert ended.reason == "switched_off" and ended.duration_s == 25.0
    assert ended.energy_kwh == pytest.approx(0.5 + 0.3)

    wrap = 2**32 * 0.001
    r.feed("port5_energy", wrap - 0.2, 0)
    r.feed("port5_relay", True, 0)
    r.feed("port5_current", 2.0, 0)
    r.feed("port5_energy", 0.3, 5)  # the u32 counter wrapped
    r.feed("port5_state", "full", 6)
    (ended,) = r.feed("port5_relay", False, 7)
    assert isinstance(ended, SessionEnded)
    assert ended.reason == "full" and ended.energy_kwh == pytest.approx(0.5)


def test_session_without_an_energy_reading_yet_starts_from_the_first_one() -> None:
    r = rules()
    r.feed("port2_relay", True, 0)
    assert r.feed("port2_current", 1.0, 0) == [SessionStarted(2, "S1", None)]
    r.feed("port2_energy", 50.0, 3)
    r.feed("port2_energy", 50.4, 8)
    (ended,) = r.feed("station_enable", False, 9)
    assert ended == SessionEnded(2, "S1", 0.4, 9.0, "station_off")


def test_no_session_while_the_relay_is_off() -> None:
    r = rules()
    r.feed("port7_relay", False, 0)
    assert r.feed("port7_current", 1.0, 1) == []


# --- persistence and resets --------------------------------------------------------------------------------

def test_lockouts_and_sessions_survive_export_and_import() -> None:
    r = rules()
    charging(r, 1, energy=10.0)
    r.feed("port1_energy", 10.25, 100)
    r.feed("port3_temperature", 90.0, 100)
    r.feed("smoke", False, 100)
    saved = json.loads(json.dumps(r.export_state()))
    assert saved["port_lockouts"] == {"3": {"reason": "over_temperature", "value": 90.0, "limit": 65.0}}
    assert saved["station_lockout"] is None

    after = rules()
    after.import_state(saved)
    assert after.locked_ports() == [3]
    # The port was left on while the gateway was down: the first reading cuts it (and says so).
    assert after.feed("port3_relay", True, 5000.0) == [EnforceLockout(3, "over_temperature", report=True)]
    # The charging session goes on: energy from the counter, duration without the downtime.
    after.feed("port1_energy", 10.75, 5001.0)
    after.feed("port1_current", 2.0, 5001.0)
    (ended,) = after.feed("port1_relay", False, 5010.0)
    assert isinstance(ended, SessionEnded)
    assert ended.session_id == "S1" and ended.reason == "switched_off"
    assert ended.energy_kwh == pytest.approx(0.75) and ended.duration_s == pytest.approx(100 + 10)


def test_restored_session_found_switched_off_ends_as_unknown() -> None:
    r = rules()
    charging(r, 2)
    after = rules()
    after.import_state(r.export_state())
    (ended,) = after.feed("port2_relay", False, 1.0)
    assert isinstance(ended, SessionEnded) and ended.reason == "unknown"


def test_station_lockout_survives_restart() -> None:
    r = rules()
    r.feed("smoke", True, 0)
    after = rules()
    after.import_state(r.export_state())
    assert after.station_locked_out and after.station_lockout_reason == "smoke"
    assert after.feed("smoke", True, 1) == []  # no second alarm for the same lockout
    assert after.feed("station_enable", True, 1) == [EnforceLockout(None, "smoke", report=True)]


@pytest.mark.parametrize("bad", [{"v": 2}, {"port_lockouts": {"9": {"reason": "x"}}}, {"extra": 1},
                                 {"port_lockouts": {"1": {"reason": ""}}}])
def test_import_rejects_unusable_state(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="cannot be restored"):
        rules().import_state(bad)


def test_reset_refused_while_the_port_is_still_hot() -> None:
    r = rules()
    r.feed("port3_temperature", 72.0, 0)
    r.feed("smoke", False, 0)
    with pytest.raises(ResetRefused, match=r"temperature 72 degC is still above 60 degC"):
        r.reset(3, "guard", "cli")
    r.feed("port3_temperature", 61.0, 60)  # below the limit, not below the hysteresis
    with pytest.raises(ResetRefused, match="still above"):
        r.reset(3, "guard", "cli")
    assert r.locked_ports() == [3]
    r.feed("port3_temperature", 55.0, 120)
    assert r.reset(3, "guard", "cli") == LockoutReset(3, "guard", "cli", "over_temperature")
    assert r.locked_ports() == [] and r.export_state()["port_lockouts"] == {}
    with pytest.raises(ResetRefused, match="not locked out"):
        r.reset(3, "guard", "cli")
    # Reset does not switch anything on; the next over-limit reading cuts again.
    assert r.view(3).relay_on is False
    assert r.feed("port3_temperature", 70.0, 130) == [CutPort(3, "over_temperature", 70.0, 65.0, "degC")]


def test_reset_refused_while_smoke_or_unknown() -> None:
    r = rules()
    r.feed("smoke", True, 0)
    r.feed("port1_temperature", 90.0, 0)
    with pytest.raises(ResetRefused, match="smoke is still detected"):
        r.reset(None, "guard", "local")
    r.feed("port1_temperature", 30.0, 1)
    with pytest.raises(ResetRefused, match="port 1 lockout not cleared: smoke"):
        r.reset(1, "guard", "local")
    r.feed("smoke", False, 2)
    assert r.reset(None, "guard", "local") == LockoutReset(None, "guard", "local", "smoke")
    assert not r.station_locked_out

    fresh = rules()
    fresh.import_state({"port_lockouts": {"4": {"reason": "over_current"}}, "station_lockout": {"reason": "smoke"}})
    with pytest.raises(ResetRefused, match="not been read yet"):
        fresh.reset(4, "guard", "cloud")
    with pytest.raises(ResetRefused, match="not been read yet"):
        fresh.reset(None, "guard", "cloud")
    with pytest.raises(ResetRefused, match="no port 9"):
        fresh.reset(9, "guard", "cloud")
    with pytest.raises(ValueError, match="via"):
        fresh.reset(4, "guard", "phone")  # type: ignore[arg-type]


def test_reset_refused_while_a_relay_is_welded() -> None:
    r = rules()
    r.feed("smoke", False, 0)
    r.feed("port2_temperature", 30.0, 0)
    r.feed("port2_faults", {**NO_FAULTS, "relay_welded": True}, 0)
    for port in (None, 2):
        with pytest.raises(ResetRefused, match="welded"):
            r.reset(port, "tech", "local")
    r.feed("port2_faults", NO_FAULTS, 10)
    r.reset(None, "tech", "local")
    r.reset(2, "tech", "local")


def test_device_own_lockout_can_be_reset() -> None:
    r = rules()
    r.feed("smoke", False, 0)
    r.feed("port5_temperature", 30.0, 0)
    r.feed("port5_state", "locked_out", 0)  # the charger locked the port out itself
    assert r.reset(5, "tech", "cloud") == LockoutReset(5, "tech", "cloud", None)


def test_safety_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="full_after_s"):
        SafetyLimits(full_after_s=0)
    with pytest.raises(ValueError, match="idle_current_a < full_current_a < max_current_a"):
        SafetyLimits(full_current_a=5.0)


def test_points_the_rules_do_not_use_are_ignored() -> None:
    r = rules()
    assert r.feed("mains_voltage", 230.0, 0) == []
    assert r.feed("port3_voltage", 230.0, 0) == []
    assert r.feed("port9_temperature", 99.0, 0) == []  # no such port on an 8-port station
    assert r.feed("port3_temperature", "garbage", 0) == []
    assert r.feed("port3_temperature", float("nan"), 0) == []


# --- properties ---------------------------------------------------------------------------------------------

PORTS = (1, 2, 3)
_faults = st.fixed_dictionaries({k: st.booleans() for k in NO_FAULTS})
_port_reading = st.tuples(
    st.sampled_from(PORTS),
    st.one_of(
        st.tuples(st.just("relay"), st.booleans()),
        st.tuples(st.just("current"), st.floats(0, 6, allow_nan=False)),
        st.tuples(st.just("current"), st.sampled_from([0.0, 0.04, 0.1, 2.0, 3.5, 3.51])),
        st.tuples(st.just("temperature"), st.floats(-10, 100, allow_nan=False)),
        st.tuples(st.just("energy"), st.floats(0, 2**32 * 0.001, allow_nan=False)),
        st.tuples(st.just("faults"), _faults),
        st.tuples(st.just("state"), st.sampled_from(["idle", "charging", "full", "fault", "locked_out"])),
    ),
).map(lambda r: (f"port{r[0]}_{r[1][0]}", r[1][1]))
_station_reading = st.one_of(
    st.tuples(st.just("smoke"), st.booleans()),
    st.tuples(st.just("station_enable"), st.booleans()),
)
_step = st.one_of(
    st.tuples(st.just("read"), st.one_of(_port_reading, _port_reading, _port_reading, _station_reading)),
    st.tuples(st.just("reset"), st.sampled_from([None, *PORTS])),
    st.tuples(st.just("restart"), st.none()),
)


def _over_limit(name: str, value: Any) -> bool:
    if name.endswith("_current"):
        return bool(value > LIMITS.max_current_a)
    if name.endswith("_temperature"):
        return bool(value > LIMITS.max_temperature_c)
    return False


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(_step, st.floats(0, 900, allow_nan=False)), max_size=80))
def test_locked_ports_never_on_and_each_over_limit_reading_cuts_exactly_once(
        steps: list[tuple[tuple[str, Any], float]]) -> None:
    r = rules()
    now = 0.0
    for (kind, arg), dt in steps:
        now += dt
        if kind == "reset":
            with contextlib.suppress(ResetRefused):
                r.reset(arg, "prop", "cli")
        elif kind == "restart":
            after = rules()
            after.import_state(json.loads(json.dumps(r.export_state())))
            assert after.locked_ports() == r.locked_ports()
            assert after.station_locked_out == r.station_locked_out
            r = after
        else:
            name, value = arg
            port = int(name[4]) if name.startswith("port") else None
            was_locked = port is not None and r.view(port).locked_out
            acts = r.feed(name, value, now)
            cuts = [a for a in acts if isinstance(a, CutPort)]
            assert all(c.port == port for c in cuts)
            if _over_limit(name, value):
                assert len(cuts) == (0 if was_locked else 1)
                assert port is not None and r.view(port).locked_out
            elif not name.endswith("_faults"):
                assert cuts == []
            for a in acts:
                if isinstance(a, SessionEnded):
                    assert a.energy_kwh >= 0 and a.duration_s >= 0
            cut_positions = [i for i, a in enumerate(acts) if isinstance(a, CutPort | CutStation | FullCut)]
            reports = [i for i, a in enumerate(acts) if isinstance(a, SessionEnded | SessionStarted)]
            assert not cut_positions or not reports or max(cut_positions) < min(reports)  # cuts come first
        for p in PORTS:
            v = r.view(p)
            if v.locked_out:
                assert v.relay_on is not True, f"port {p} locked out but on"
                assert v.session_id is None
        if r.station_locked_out:
            assert r.station_enabled is not True


# --- the I/O shell -----------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Log:
    entries: list[tuple[str, Any]] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return [k for k, _ in self.entries]


class FakeDevice:
    """The small interface ChargerSafety uses: listen, command, device_id, profile, last_poll_at."""

    def __init__(self, log: Log, clock: Clock, *, write_s: float = 0.025, profile: Profile = CHARGER) -> None:
        self.device_id = "shed-1"
        self.profile = profile
        self.log = log
        self.clock = clock
        self.write_s = write_s
        self.fail: Exception | None = None
        self.listeners: list[Any] = []
        self.last_poll_at: float | None = None
        self.priorities: list[Any] = []

    def listen(self, listener: Any) -> None:
        self.listeners.append(listener)

    async def command(self, name: str, args: Mapping[str, object] | None = None, *,
                      priority: Any = None) -> list[dict[str, Any]]:
        self.profile.command(name, args)  # a bad name or argument fails as it would on the real device
        self.priorities.append(priority)
        await asyncio.sleep(0)
        self.clock.t += self.write_s  # the write takes this long on the bus
        if self.fail is not None:
            raise self.fail
        self.log.entries.append(("write", (name, dict(args or {}))))
        return []

    async def reading(self, name: str, value: Any) -> None:
        """A poll delivered ``value`` for point ``name`` now."""
        self.last_poll_at = self.clock.t
        point = self.profile.point(name)
        for listener in self.listeners:
            await listener(point, value, None)


class FakeSink:
    """Records events, validating each against the registry as the real sink does; can be held."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.factory = EventFactory(REGISTRY, "site-1", "gw-1", WallClock(mode="synced"))
        self.gate = asyncio.Event()
        self.gate.set()

    async def emit(self, type_name: str, device_id: str, data: Mapping[str, Any]) -> Any:
        await self.gate.wait()
        event = self.factory.make(type_name, device_id, data)
        self.log.entries.append(("event", (type_name, dict(data))))
        return event

    def emit_telemetry(self, type_name: str, device_id: str, data: Mapping[str, Any]) -> None:
        self.factory.make(type_name, device_id, data)

    def events(self, type_name: str | None = None) -> list[dict[str, Any]]:
        return [v[1] for k, v in self.log.entries if k == "event" and (type_name is None or v[0] == type_name)]


@pytest.fixture
def shell() -> tuple[ChargerSafety, FakeDevice, FakeSink, MemoryStateStore, Log]:
    log, clock = Log(), Clock()
    device, sink, store = FakeDevice(log, clock), FakeSink(log), MemoryStateStore()
    it = ids()
    safety = ChargerSafety(device, LIMITS, sink, store, monotonic=clock,
                           rules=ChargerRules(LIMITS, ports=8, new_session_id=lambda: next(it)))
    return safety, device, sink, store, log


Shell = tuple[ChargerSafety, FakeDevice, FakeSink, MemoryStateStore, Log]


async def test_cut_is_written_before_the_alarm_and_reaction_time_recorded(shell: Shell) -> None:
    safety, device, sink, store, log = shell
    await device.reading("port3_temperature", 71.5)
    await safety.drain()
    assert log.entries[0] == ("write", ("port_off", {"port": 3}))
    assert log.entries[1][0] == "event"
    (alarm,) = sink.events("charger.port.cutoff")
    assert alarm == {"port": 3, "reason": "over_temperature", "value": 71.5, "limit": 65.0, "unit": "degC",
                     "reaction_ms": pytest.approx(25.0), "cut_error": None}
    assert REGISTRY.get("charger.port.cutoff").priority is Priority.ALARM
    assert device.priorities == [BusPriority.COMMAND]
    assert safety.last_reaction_ms == pytest.approx(25.0)
    assert store.state is not None and "3" in store.state["port_lockouts"]


async def test_cut_does_not_wait_for_the_event_store(shell: Shell) -> None:
    safety, device, sink, _store, log = shell
    sink.gate.clear()  # the outbox is slow (an SD card fsync)
    await device.reading("port3_current", 3.9)
    await device.reading("port5_temperature", 80.0)
    # Both cuts are on the wire although no event is durable yet.
    assert log.kinds() == ["write", "write"]
    sink.gate.set()
    await safety.drain()
    assert log.kinds() == ["write", "write", "event", "event"]
    assert [e["port"] for e in sink.events("charger.port.cutoff")] == [3, 5]


async def test_reaction_counts_from_the_poll_not_from_the_listener(shell: Shell) -> None:
    safety, device, sink, _store, _log = shell
    device.last_poll_at = device.clock.t
    device.clock.t += 0.1  # earlier points of the same block took 100 ms
    await device.listeners[0](CHARGER.point("port2_current"), 4.0, None)
    await safety.drain()
    (alarm,) = sink.events("charger.port.cutoff")
    assert alarm["reaction_ms"] == pytest.approx(125.0)


async def test_smoke_cuts_the_station_then_reports_sessions(shell: Shell) -> None:
    safety, device, sink, _store, log = shell
    await device.reading("port1_relay", True)
    await device.reading("port1_current", 2.0)
    await device.reading("smoke", True)
    await safety.drain()
    assert ("write", ("station_off", {})) in log.entries
    kinds = [(k, v[0]) for k, v in log.entries]
    assert kinds == [("event", "charging.session.started"), ("write", "station_off"),
                     ("event", "charger.station.cutoff"), ("event", "charging.session.ended")]
    (ended,) = sink.events("charging.session.ended")
    assert ended["reason"] == "cutoff" and ended["session_id"] == "S1"


async def test_locked_out_station_switched_on_is_cut_again_and_reported(shell: Shell) -> None:
    safety, device, sink, _store, log = shell
    await device.reading("smoke", True)
    await device.reading("station_enable", False)
    await device.reading("station_enable", True)  # someone closed the contactor by hand
    await device.reading("station_enable", True)  # still: a retry, not a second report
    await safety.drain()
    assert [v for k, v in log.entries if k == "write"] == [("station_off", {})] * 3
    assert [e["reason"] for e in sink.events("charger.station.cutoff")] == ["smoke", "lockout_enforced"]


async def test_welded_relay_opens_the_station_and_the_port(shell: Shell) -> None:
    safety, device, sink, _store, log = shell
    await device.reading("port4_faults", {**NO_FAULTS, "relay_welded": True})
    await safety.drain()
    assert [v for k, v in log.entries if k == "write"] == [("station_off", {}), ("port_off", {"port": 4})]
    (alarm,) = sink.events("charger.station.cutoff")
    assert alarm["reason"] == "relay_welded" and alarm["port"] == 4


async def test_failed_cut_is_reported_and_retried(shell: Shell) -> None:
    safety, device, sink, _store, log = shell
    device.fail = DeviceUnavailable("no answer from unit 1")
    await device.reading("port3_temperature", 90.0)
    await safety.drain()
    (alarm,) = sink.events("charger.port.cutoff")
    assert alarm["reaction_ms"] is None and "no answer" in alarm["cut_error"]
    assert safety.cut_failures == 1
    device.fail = None
    await device.reading("port3_relay", True)  # still on: cut again, at once
    await safety.drain()
    assert log.entries[-1] == ("write", ("port_off", {"port": 3}))
    assert len(sink.events("charger.port.cutoff")) == 1  # a retry, not a new alarm


async def test_full_battery_cut_and_session_events(shell: Shell) -> None:
    safety, device, sink, _store, log = shell
    await device.reading("port6_energy", 12.0)
    await device.reading("port6_relay", True)
    await device.reading("port6_current", 1.8)
    device.clock.t += 600
    await device.reading("port6_energy", 12.4)
    await device.reading("port6_current", 0.1)
    device.clock.t += 1800
    await device.reading("port6_current", 0.1)
    await safety.drain()
    assert ("write", ("port_off", {"port": 6})) in log.entries
    (full,) = sink.events("charger.port.full_cutoff")
    assert full["after_s"] == pytest.approx(1800.0) and full["session_id"] == "S1"
    (started,) = sink.events("charging.session.started")
    (ended,) = sink.events("charging.session.ended")
    assert started["energy_kwh_at_start"] == 12.0
    assert ended["reason"] == "full" and ended["energy_kwh"] == pytest.approx(0.4)
    assert not safety.rules.view(6).locked_out


async def test_reset_lockout_writes_reset_only_and_reports(shell: Shell) -> None:
    safety, device, sink, store, log = shell
    await device.reading("smoke", False)
    await device.reading("port2_temperature", 75.0)
    await safety.drain()
    with pytest.raises(ResetRefused, match="still above"):
        await safety.reset_lockout(2, "guard-desk", "cloud")
    assert [v[0] for k, v in log.entries if k == "write"] == ["port_off"]  # nothing written for the refusal
    await device.reading("port2_temperature", 40.0)
    action = await safety.reset_lockout(2, "guard-desk", "cloud")
    assert action == LockoutReset(2, "guard-desk", "cloud", "over_temperature")
    writes = [v for k, v in log.entries if k == "write"]
    assert writes == [("port_off", {"port": 2}), ("reset_lockout", {"port": 2})]  # no port_on
    assert sink.events("charger.lockout.reset") == [
        {"port": 2, "by": "guard-desk", "via": "cloud", "cleared_reason": "over_temperature"}]
    assert store.state is not None and store.state["port_lockouts"] == {}


async def test_lockout_survives_a_restart_of_the_shell(shell: Shell) -> None:
    safety, device, _sink, store, _log = shell
    await device.reading("port7_current", 4.2)
    await safety.drain()
    # A new process: same store, same device.
    log2, clock2 = Log(), Clock()
    device2, sink2 = FakeDevice(log2, clock2), FakeSink(log2)
    safety2 = ChargerSafety(device2, LIMITS, sink2, store, monotonic=clock2)
    await device2.reading("port7_relay", True)
    await safety2.drain()
    assert log2.entries[0] == ("write", ("port_off", {"port": 7}))
    (alarm,) = sink2.events("charger.port.cutoff")
    assert alarm["reason"] == "lockout_enforced" and alarm["port"] == 7


async def test_unreadable_saved_state_does_not_stop_protection() -> None:
    log, clock = Log(), Clock()
    device, sink = FakeDevice(log, clock), FakeSink(log)
    safety = ChargerSafety(device, None, sink, MemoryStateStore({"v": 99}), monotonic=clock)
    await device.reading("port1_temperature", 99.0)
    await safety.drain()
    assert log.entries[0] == ("write", ("port_off", {"port": 1}))


def test_profile_without_the_commands_is_refused() -> None:
    gate = shipped_profile("barrier-gate-generic")
    log = Log()
    with pytest.raises(ValueError, match="lacks the command"):
        ChargerSafety(FakeDevice(log, Clock(), profile=gate), LIMITS, FakeSink(log), MemoryStateStore())


# --- on a profile-driven ModbusDevice (fake bus) --------------------------------------------------------------

class FakeBus:
    """Serves the profile's registers from a dict; records writes."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.words: dict[tuple[str, int], int] = {}

    def set(self, name: str, value: Any) -> None:
        point = CHARGER.point(name)
        for i, w in enumerate(point.encode(value)):
            self.words[(point.table, point.address + i)] = w

    async def read(self, unit: int, table: Any, address: int, count: int, *, priority: Any = None) -> list[Any]:
        words = [self.words.get((table, a), 0) for a in range(address, address + count)]
        return [bool(w) for w in words] if table in ("coil", "discrete_input") else words

    async def write(self, unit: int, table: Any, address: int, values: list[Any], *, priority: Any = None) -> None:
        self.log.entries.append(("bus-write", (table, address, values, priority)))
        for i, v in enumerate(values):
            self.words[(table, address + i)] = int(v)


async def test_on_a_modbus_device_the_cut_precedes_the_devices_own_alarm() -> None:
    log = Log()
    bus, sink = FakeBus(log), FakeSink(log)
    device = ModbusDevice("shed-1", 1, CHARGER, bus, sink)
    safety = ChargerSafety(device, LIMITS, sink, MemoryStateStore())
    for block in CHARGER.read_plan():
        await device.poll_block(block)  # a first poll: nothing wrong
    bus.set("port3_relay", True)
    bus.set("port3_temperature", 70.0)
    for block in CHARGER.read_plan():
        await device.poll_block(block)
    await safety.drain()
    relay = CHARGER.point("port3_relay")
    writes = [v for k, v in log.entries if k == "bus-write"]
    assert writes == [("coil", relay.address, [False], BusPriority.COMMAND)]
    order = [k if k == "bus-write" else v[0] for k, v in log.entries]
    assert order.index("bus-write") < order.index("charger.port_over_temperature")
    assert order.index("bus-write") < order.index("charger.port.cutoff")
    (alarm,) = sink.events("charger.port.cutoff")
    assert alarm["reaction_ms"] is not None and alarm["reaction_ms"] >= 0
