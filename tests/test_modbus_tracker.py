"""The pure per-point logic: telemetry on deadband/heartbeat, and every kind of event trigger."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.modbus.device import PointTracker
from edgeagent.drivers.modbus.profile import Point, shipped_profile

CHARGER = shipped_profile("ebike-charger-8port")
GATE = shipped_profile("barrier-gate-generic")


def temp(port: int = 3) -> Point:
    return CHARGER.point(f"port{port}_temperature")


def test_telemetry_on_deadband_and_heartbeat() -> None:
    p = temp()
    assert p.telemetry is not None and p.telemetry.deadband == 0.5 and p.telemetry.max_interval_s == 300
    t = PointTracker()
    assert t.update(p, 30.0, 0)[0] == 30.0  # first reading is reported
    assert t.update(p, 30.4, 1)[0] is None  # within the deadband
    assert t.update(p, 30.6, 2)[0] == 30.6  # beyond it, relative to the last report
    assert t.update(p, 30.6, 200)[0] is None
    assert t.update(p, 30.6, 302.0)[0] == 30.6  # heartbeat


def test_threshold_fires_once_and_rearms_after_hysteresis() -> None:
    p = temp()  # above 65 with hysteresis 5
    t = PointTracker()
    fired = [t.update(p, v, i)[1] for i, v in enumerate([60, 66, 70, 64, 61, 59, 66])]
    kinds = [[e.type for e in f] for f in fired]
    assert kinds == [[], ["charger.port_over_temperature"], [], [], [], [], ["charger.port_over_temperature"]]
    ev = fired[1][0].data
    assert ev == {"point": "port3_temperature", "port": 3, "value": 66, "previous": 60, "unit": "degC",
                  "trigger": "above", "threshold": 65.0}


def test_first_reading_above_threshold_fires() -> None:
    t = PointTracker()
    _tel, events = t.update(temp(), 80.0, 0)
    assert [e.type for e in events] == ["charger.port_over_temperature"]


def test_state_enter_and_change_events_and_no_event_on_first_reading() -> None:
    state = GATE.point("state")
    t = PointTracker()
    assert t.update(state, "closed", 0)[1] == []
    types = [e.type for e in t.update(state, "open", 1)[1]]
    assert types == ["gate.state_changed", "gate.opened"]
    types = [e.type for e in t.update(state, "held", 2)[1]]
    assert types == ["gate.state_changed", "gate.held"]


def test_rising_and_falling_edges_and_bits() -> None:
    loop = GATE.point("vehicle_present")
    t = PointTracker()
    t.update(loop, False, 0)
    assert [e.type for e in t.update(loop, True, 1)[1]] == ["gate.vehicle_present"]
    assert [e.type for e in t.update(loop, True, 2)[1]] == []
    assert [e.type for e in t.update(loop, False, 3)[1]] == ["gate.vehicle_left"]
    faults = CHARGER.point("port1_faults")
    t.update(faults, {"over_current": False, "over_temperature": False, "relay_welded": False, "no_load": False,
                      "overload_cutoff": False}, 0)
    got = t.update(faults, {"over_current": False, "over_temperature": False, "relay_welded": True,
                            "no_load": False, "overload_cutoff": False}, 1)[1]
    assert {e.type for e in got} == {"charger.port_faults_changed", "charger.port_relay_welded"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=-40, max_value=150, allow_nan=False), min_size=1, max_size=60))
def test_over_temperature_alarms_alternate_with_recovery(values: list[float]) -> None:
    """Never two alarms without the value having come back below threshold - hysteresis in between."""
    p = temp()
    t = PointTracker()
    armed = True
    for i, v in enumerate(values):
        _tel, events = t.update(p, v, i)
        fired = any(e.type == "charger.port_over_temperature" for e in events)
        assert fired == (armed and v > 65)
        if fired:
            armed = False
        elif not armed and v < 60:
            armed = True
