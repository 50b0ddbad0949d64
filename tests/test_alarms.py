"""The wristband alarm engine (edgeagent.kernel.alarms.engine): lifecycle, folding, repeats, escalation, restart.

Pure engine, so every test drives it with a fake clock and exact times; nothing sleeps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeagent.drivers.wristband.kinds import WRISTBAND_ALARM_KINDS, AlarmKind
from edgeagent.kernel.alarms.engine import (
    Action,
    Alarm,
    AlarmConfig,
    AlarmEngine,
    AlarmImportError,
    AlarmInputError,
    AlarmKindSpec,
    AlarmState,
    AlarmStateError,
    Emit,
    EscalationLevel,
    Instant,
    KindPolicy,
    Notify,
    Persist,
    SetOutput,
    UnknownAlarmError,
)
from edgeagent.kernel.alarms.notify import Message, NotifyError, message_for
from edgeagent.kernel.pipeline.events import EventFactory, Priority

T0_WALL = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
KINDS = {k.name: k for k in WRISTBAND_ALARM_KINDS}


def cfg(**kw: Any) -> AlarmConfig:
    """An engine config with the wristband's kinds (the engine itself knows none)."""
    return AlarmConfig(**{"kinds": KINDS, **kw})


class FakeClock:
    """Wall and monotonic time that move only when told; ``restart`` starts a new process's clock."""

    def __init__(self, mono_base: float = 1000.0) -> None:
        self.wall = T0_WALL
        self.mono = mono_base

    def now(self) -> Instant:
        return Instant(self.wall, self.mono)

    def advance(self, seconds: float) -> Instant:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds
        return self.now()

    def at(self, t: float) -> Instant:
        """Move to ``t`` seconds after the start (wall time); monotonic time moves with it."""
        return self.advance(t - self.t)

    @property
    def t(self) -> float:
        return (self.wall - T0_WALL).total_seconds()

    def restart(self, downtime_s: float, mono_base: float = 7.5) -> Instant:
        """The process dies and a new one starts ``downtime_s`` later (monotonic time of another epoch)."""
        self.wall += timedelta(seconds=downtime_s)
        self.mono = mono_base
        return self.now()


def notifies(actions: Iterable[Action]) -> list[Notify]:
    return [a for a in actions if isinstance(a, Notify)]


def emits(actions: Iterable[Action], event_type: str | None = None) -> list[Emit]:
    return [a for a in actions if isinstance(a, Emit) and event_type in (None, a.event_type)]


def outputs(actions: Iterable[Action]) -> list[SetOutput]:
    return [a for a in actions if isinstance(a, SetOutput)]


def persisted(actions: Iterable[Action]) -> list[Alarm]:
    return [a.alarm for a in actions if isinstance(a, Persist)]


def run_ticks(engine: AlarmEngine, clock: FakeClock, until: float, step: float = 0.5) -> list[tuple[float, Action]]:
    """Tick every ``step`` s up to ``until`` (seconds since the start); actions with the time they came."""
    out: list[tuple[float, Action]] = []
    while clock.t + step <= until + 1e-9:
        now = clock.advance(step)
        out += [(round(clock.t, 3), a) for a in engine.tick(now)]
    return out


def notify_log(timed: Sequence[tuple[float, Action]]) -> list[tuple[float, str, int, tuple[str, ...]]]:
    return [(t, a.message_kind, a.level, a.targets) for t, a in timed if isinstance(a, Notify)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine() -> AlarmEngine:
    return AlarmEngine(cfg())


# --- raise and fold --------------------------------------------------------------------------------

def test_new_alarm_sounds_siren_emits_and_notifies_at_once(engine: AlarmEngine, clock: FakeClock,
                                                          factory: EventFactory) -> None:
    actions = engine.raise_(AlarmKind.SOS, "res-1", "wb-1", clock.now(), {"battery": 80})
    assert [type(a).__name__ for a in actions] == [
        "SetOutput", "SetOutput", "Emit", "Persist", "Notify", "Emit", "Persist"]
    assert outputs(actions) == [SetOutput("siren", True), SetOutput("strobe", True)]
    assert [e.event_type for e in emits(actions)] == ["alarm.raised", "alarm.notified"]
    (notify,) = notifies(actions)
    assert (notify.message_kind, notify.level, notify.level_name, notify.targets) == (
        "new", 0, "guard_room", ("guard_room",))
    first, second = persisted(actions)
    assert first.state is AlarmState.RAISED and second.state is AlarmState.NOTIFIED
    alarm = engine.get(first.id)
    assert alarm == second == notify.alarm
    assert alarm.first_raised == alarm.last_raised == clock.now()
    assert alarm.next_notify_at == clock.now().at_mono(clock.mono + 30)
    assert dict(alarm.details) == {"battery": 80}
    # Every emitted event is a valid alarm-priority event of the registry.
    for e in emits(actions):
        event = factory.make(e.event_type, e.device_id, e.data)
        assert event.priority is Priority.ALARM
        assert event.data["alarm_id"] == alarm.id
        assert "name" not in event.data


def test_storm_of_100_sos_in_2_s_is_one_alarm_with_count_100(engine: AlarmEngine, clock: FakeClock) -> None:
    actions: list[Action] = []
    for i in range(100):
        actions += engine.raise_("sos", "res-1", f"wb-{i % 2}", clock.at(i * 0.02))
    (alarm,) = engine.active()
    assert alarm.count == 100
    assert alarm.device_id == "wb-0"
    assert alarm.last_raised.mono_s == pytest.approx(alarm.first_raised.mono_s + 1.98)
    assert len(emits(actions, "alarm.raised")) == 1
    assert len(emits(actions, "alarm.notified")) == 1
    assert len(notifies(actions)) == 1
    assert len(outputs(actions)) == 2  # siren and strobe, once
    assert persisted(actions)[-1].count == 100  # every fold is persisted: a restart keeps the count
    # The count travels with the later events.
    acked = engine.ack(alarm.id, "guard-1", "cli", clock.at(10))
    assert emits(acked, "alarm.acknowledged")[0].data.model_dump()["count"] == 100


def test_different_residents_and_kinds_do_not_fold(engine: AlarmEngine, clock: FakeClock) -> None:
    engine.raise_("sos", "res-1", "wb-1", clock.now())
    engine.raise_("sos", "res-2", "wb-2", clock.advance(1))
    engine.raise_("fall", "res-1", "wb-1", clock.advance(1))
    engine.raise_("sos", "res-1", "wb-1", clock.advance(1))
    got = sorted((a.resident_id, a.kind, a.count) for a in engine.active())
    assert got == [("res-1", "fall", 1), ("res-1", "sos", 2), ("res-2", "sos", 1)]


def test_fold_window_slides_from_the_last_raise_and_then_a_new_alarm_starts(clock: FakeClock) -> None:
    engine = AlarmEngine(cfg(fold_window_s=120))
    engine.raise_("sos", "res-1", "wb-1", clock.at(0))
    engine.raise_("sos", "res-1", "wb-1", clock.at(120))  # exactly at the window's end: folds
    engine.raise_("sos", "res-1", "wb-1", clock.at(200))  # 80 s after the last raise: folds
    assert [a.count for a in engine.active()] == [3]
    actions = engine.raise_("sos", "res-1", "wb-1", clock.at(320.5))  # 120.5 s after the last: a new alarm
    assert len(emits(actions, "alarm.raised")) == 1
    assert [a.count for a in engine.active()] == [3, 1]
    # The newest alarm is the one that folds from now on.
    engine.raise_("sos", "res-1", "wb-1", clock.at(321))
    assert [a.count for a in engine.active()] == [3, 2]


def test_raise_into_an_acknowledged_alarm_counts_without_notifying(engine: AlarmEngine, clock: FakeClock) -> None:
    (alarm_id,) = {a.alarm.id for a in notifies(engine.raise_("sos", "res-1", "wb-1", clock.now()))}
    engine.ack(alarm_id, "guard-1", "cli", clock.advance(5))
    actions = engine.raise_("sos", "res-1", "wb-1", clock.advance(5))
    assert [type(a) for a in actions] == [Persist]
    assert engine.get(alarm_id).count == 2
    assert engine.get(alarm_id).state is AlarmState.ACKNOWLEDGED


def test_bad_raise_arguments_are_refused_before_anything_changes(engine: AlarmEngine, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="unknown alarm kind 'earthquake'"):
        engine.raise_("earthquake", "res-1", "wb-1", clock.now())
    with pytest.raises(ValueError, match="'sos' is about a resident"):
        engine.raise_("sos", "lift-2 car", "cam-1", clock.now(), place=True)
    with pytest.raises(ValueError, match="must not be empty"):
        engine.raise_("sos", "", "wb-1", clock.now())
    with pytest.raises(TypeError, match="alarm details"):
        engine.raise_("sos", "res-1", "wb-1", clock.now(), {"x": [1]})  # type: ignore[dict-item]  # on purpose
    with pytest.raises(ValueError, match="finite"):
        engine.raise_("sos", "res-1", "wb-1", clock.now(), {"hr": float("nan")})
    assert engine.active() == []


# --- repeat and escalation -------------------------------------------------------------------------

QUIET = KindPolicy("high", repeat_s=30)  # no outputs, no escalation


def test_repeats_every_n_seconds_until_acknowledged(clock: FakeClock) -> None:
    engine = AlarmEngine(cfg(policies={AlarmKind.SOS: QUIET}))
    alarm_id = notifies(engine.raise_("sos", "res-1", "wb-1", clock.now()))[0].alarm.id
    timed = run_ticks(engine, clock, until=100)
    assert notify_log(timed) == [(t, "repeat", 0, ("guard_room",)) for t in (30.0, 60.0, 90.0)]
    assert emits(a for _, a in timed) == []  # repeats are not transitions
    engine.ack(alarm_id, "guard-1", "local_mqtt", clock.at(100.25))
    assert notifies(a for _, a in run_ticks(engine, clock, until=2000, step=7)) == []
    assert engine.next_deadline() is None


def test_escalation_through_the_levels_at_exact_times(engine: AlarmEngine, clock: FakeClock) -> None:
    # Default SOS policy: repeat every 30 s, level 1 at 120 s, level 2 at 300 s after the raise.
    raised = engine.raise_("sos", "res-1", "wb-1", clock.now())
    alarm_id = persisted(raised)[0].id
    assert engine.next_deadline() == clock.mono + 30
    timed = run_ticks(engine, clock, until=400)
    g, gw, fam = ("guard_room",), ("guard_room", "grid_worker"), ("guard_room", "grid_worker", "family")
    assert notify_log(timed) == [
        (30.0, "repeat", 0, g), (60.0, "repeat", 0, g), (90.0, "repeat", 0, g),
        (120.0, "escalated", 1, gw),
        (150.0, "repeat", 1, gw), (180.0, "repeat", 1, gw), (210.0, "repeat", 1, gw), (240.0, "repeat", 1, gw),
        (270.0, "repeat", 1, gw),
        (300.0, "escalated", 2, fam),
        (330.0, "repeat", 2, fam), (360.0, "repeat", 2, fam), (390.0, "repeat", 2, fam),
    ]
    escalated = [(t, a.data.model_dump()) for t, a in timed if isinstance(a, Emit)]
    assert [(t, d["level"], d["level_name"], d["after_s"]) for t, d in escalated] == [
        (120.0, 1, "grid_worker", 120.0), (300.0, 2, "family", 300.0)]
    assert all(a.event_type == "alarm.escalated" for _, a in timed if isinstance(a, Emit))
    # The top of the ladder: repeats go on, no more escalation.
    assert engine.get(alarm_id).level == 2
    assert engine.next_deadline() == pytest.approx(clock.mono - clock.t + 420)


def test_a_late_tick_escalates_once_to_the_level_due_without_a_burst(engine: AlarmEngine, clock: FakeClock) -> None:
    engine.raise_("fall", "res-1", "wb-1", clock.now())
    actions = engine.tick(clock.at(310))  # the loop was stuck: levels 1 and 2 and nine repeats are overdue
    (notify,) = notifies(actions)
    assert (notify.message_kind, notify.level) == ("escalated", 2)
    assert [e.data.model_dump()["level"] for e in emits(actions, "alarm.escalated")] == [1, 2]
    # Back on the grid of the last escalation: 300 + 30.
    assert notify_log(run_ticks(engine, clock, until=340)) == [
        (330.0, "repeat", 2, ("guard_room", "grid_worker", "family"))]


def test_a_late_repeat_keeps_the_grid_when_it_can(clock: FakeClock) -> None:
    engine = AlarmEngine(cfg(policies={AlarmKind.SOS: QUIET}))
    engine.raise_("sos", "res-1", "wb-1", clock.now())
    assert len(notifies(engine.tick(clock.at(31)))) == 1  # 1 s late
    assert engine.active()[0].next_notify_at == clock.now().at_mono(clock.mono + 29)  # due at 60, not 61
    assert len(notifies(engine.tick(clock.at(200)))) == 1  # several rounds late: one notification
    assert engine.active()[0].next_notify_at == clock.now().at_mono(clock.mono + 30)


def test_a_shorter_ladder_and_a_kind_that_never_escalates(clock: FakeClock) -> None:
    config = cfg(policies={AlarmKind.REMOVED: KindPolicy("medium", repeat_s=100, escalate_after_s=(150,)),
                           AlarmKind.LOW_BATTERY: KindPolicy("low", repeat_s=100)})
    engine = AlarmEngine(config)
    engine.raise_("removed", "res-1", "wb-1", clock.now())
    engine.raise_("low_battery", "res-1", "wb-1", clock.now())
    log = notify_log(run_ticks(engine, clock, until=1000, step=10))
    removed = [(t, k, lv) for t, k, lv, _ in log if lv > 0 or k == "escalated"]
    assert removed[0] == (150.0, "escalated", 1)
    assert max(lv for _, _, lv, _ in log) == 1  # grid worker at most: family is never called
    assert sum(1 for _, k, _, _ in log if k == "escalated") == 1


# --- acknowledge and resolve -----------------------------------------------------------------------

@pytest.mark.parametrize(("via", "by"), [("cli", "guard-zhang"), ("local_mqtt", "panel-guard-room"),
                                         ("cloud", "platform:ops-7")])
def test_ack_from_each_source_records_who_when_via_stops_repeats_and_siren(
        engine: AlarmEngine, clock: FakeClock, via: str, by: str) -> None:
    alarm_id = persisted(engine.raise_("sos", "res-1", "wb-1", clock.now()))[0].id
    run_ticks(engine, clock, until=130)  # escalated to level 1 meanwhile
    actions = engine.ack(alarm_id, by, via, clock.at(131.5))
    assert outputs(actions) == [SetOutput("siren", False), SetOutput("strobe", False)]
    (emit,) = emits(actions)
    data = emit.data.model_dump()
    assert emit.event_type == "alarm.acknowledged"
    assert (data["by"], data["via"], data["level"], data["notifications"], data["response_s"]) == (
        by, via, 1, 5, 131.5)
    alarm = engine.get(alarm_id)
    assert (alarm.state, alarm.acknowledged_by, alarm.acknowledged_via, alarm.acknowledged_at) == (
        AlarmState.ACKNOWLEDGED, by, via, clock.now())
    assert alarm.next_notify_at is None
    assert persisted(actions) == [alarm]
    later = [a for _, a in run_ticks(engine, clock, until=1000, step=3)]
    assert later == []  # no repeats, no escalation
    with pytest.raises(AlarmStateError, match=f"already acknowledged by {by} via {via}"):
        engine.ack(alarm_id, "someone-else", "cli", clock.now())


def test_ack_arguments_are_checked(engine: AlarmEngine, clock: FakeClock) -> None:
    alarm_id = persisted(engine.raise_("sos", "res-1", "wb-1", clock.now()))[0].id
    with pytest.raises(UnknownAlarmError):
        engine.ack("01J9Z8Y7X6W5V4T3S2R1Q0PNMK", "guard-1", "cli", clock.now())
    with pytest.raises(ValueError, match="via must be one of cli, local_mqtt, cloud"):
        engine.ack(alarm_id, "guard-1", "sms", clock.now())
    with pytest.raises(AlarmInputError, match="by must not be empty"):
        engine.ack(alarm_id, "", "cli", clock.now())
    assert engine.get(alarm_id).state is AlarmState.NOTIFIED


BAD_TEXT = [
    ("g" * 65, "65 characters long; at most 64"),
    ("guard\x1b[2J\x1b[31mALL CLEAR", "U+001B at position 6"),  # terminal escape codes
    ("guard\u202eevil", "U+202E"),  # a bidi override reorders what `alarms list` shows
    ("guard\u2066x\u2069", "U+2066"),  # bidi isolate
    ("guard\u200bx", "U+200B"),  # zero-width space
    ("line\nbreak", "U+000A"),
    ("   ", "must not be empty"),
]


@pytest.mark.parametrize(("by", "reason"), BAD_TEXT)
def test_ack_and_resolve_refuse_by_that_is_too_long_or_not_printable(engine: AlarmEngine, clock: FakeClock,
                                                                      by: str, reason: str) -> None:
    alarm_id = persisted(engine.raise_("sos", "res-1", "wb-1", clock.now()))[0].id
    with pytest.raises(AlarmInputError, match=reason.replace("+", r"\+")):
        engine.ack(alarm_id, by, "local_mqtt", clock.now())
    with pytest.raises(AlarmInputError, match=reason.replace("+", r"\+")):
        engine.resolve(alarm_id, by, "cli", clock.now())
    with pytest.raises(AlarmInputError, match="caller"):
        engine.ack(alarm_id, "guard-1", "cli", clock.now(), caller=by)
    # Refused means nothing recorded: the alarm is as it was.
    assert engine.get(alarm_id).state is AlarmState.NOTIFIED and engine.get(alarm_id).acknowledged_by is None


def test_resolve_refuses_a_long_note_and_records_a_printable_one_with_its_caller(engine: AlarmEngine,
                                                                                  clock: FakeClock) -> None:
    alarm_id = persisted(engine.raise_("sos", "res-1", "wb-1", clock.now()))[0].id
    with pytest.raises(AlarmInputError, match="note is 60000 characters long; at most 500"):
        engine.resolve(alarm_id, "guard-1", "cli", clock.now(), "x" * 60_000)
    with pytest.raises(AlarmInputError, match="U\\+0007"):
        engine.resolve(alarm_id, "guard-1", "cli", clock.now(), "bell\a")
    assert engine.get(alarm_id).state is AlarmState.NOTIFIED
    note = "老人在 3 号楼摔倒，已送医 — résolu ✓" + "." * 470
    actions = engine.resolve(alarm_id, "王保安", "cli", clock.now(), note, caller="root (0)")
    emit = next(a for a in actions if isinstance(a, Emit))
    data = emit.data.model_dump()
    assert (data["by"], data["caller"], data["note"]) == ("王保安", "root (0)", note)


def test_outputs_stay_on_while_another_unacknowledged_alarm_needs_them(engine: AlarmEngine,
                                                                       clock: FakeClock) -> None:
    sos = persisted(engine.raise_("sos", "res-1", "wb-1", clock.now()))[0].id
    spo2 = persisted(engine.raise_("spo2_low", "res-2", "wb-2", clock.advance(1)))[0].id  # strobe only
    assert outputs(engine.ack(sos, "guard-1", "cli", clock.advance(1))) == [SetOutput("siren", False)]
    assert outputs(engine.ack(spo2, "guard-1", "cli", clock.advance(1))) == [SetOutput("strobe", False)]


def test_resolve_after_ack(engine: AlarmEngine, clock: FakeClock) -> None:
    alarm_id = persisted(engine.raise_("fall", "res-1", "wb-1", clock.now()))[0].id
    engine.ack(alarm_id, "guard-1", "local_mqtt", clock.at(40))
    actions = engine.resolve(alarm_id, "guard-1", "cli", clock.at(600), note="helped up, no injury")
    assert outputs(actions) == []  # already off since the ack
    (emit,) = emits(actions)
    data = emit.data.model_dump(exclude_none=True)
    assert emit.event_type == "alarm.resolved"
    assert {k: data[k] for k in ("by", "via", "note", "acknowledged", "notifications", "duration_s")} == {
        "by": "guard-1", "via": "cli", "note": "helped up, no injury", "acknowledged": True,
        "notifications": 1, "duration_s": 600.0}
    (final,) = persisted(actions)
    assert final.state is AlarmState.RESOLVED
    assert (final.resolved_by, final.resolved_via, final.resolved_at) == ("guard-1", "cli", clock.now())
    assert engine.active() == []
    with pytest.raises(UnknownAlarmError):
        engine.resolve(alarm_id, "guard-1", "cli", clock.now())
    # A new raise after the resolution is a new alarm.
    assert len(emits(engine.raise_("fall", "res-1", "wb-1", clock.advance(1)), "alarm.raised")) == 1


def test_resolve_without_ack_switches_outputs_off(engine: AlarmEngine, clock: FakeClock) -> None:
    alarm_id = persisted(engine.raise_("sos", "res-1", "wb-1", clock.now()))[0].id
    actions = engine.resolve(alarm_id, "platform:ops-7", "cloud", clock.at(20), note=None)
    assert outputs(actions) == [SetOutput("siren", False), SetOutput("strobe", False)]
    assert emits(actions)[0].data.model_dump()["acknowledged"] is False
    assert run_ticks(engine, clock, until=500, step=10) == []


# --- restart ---------------------------------------------------------------------------------------

def _store(store: dict[str, Any], actions: Iterable[Action]) -> None:
    """What the runtime does with Persist: the latest JSON snapshot per alarm, resolved ones dropped."""
    for alarm in persisted(actions):
        if alarm.active:
            store[alarm.id] = orjson.loads(orjson.dumps(alarm.to_json()))
        else:
            store.pop(alarm.id, None)


@pytest.mark.parametrize("source", ["export", "snapshots"])
def test_restart_between_raise_and_ack_continues_notifications_on_time(clock: FakeClock, source: str) -> None:
    engine = AlarmEngine(cfg())
    store: dict[str, Any] = {}
    _store(store, engine.raise_("sos", "res-1", "wb-1", clock.now()))
    for _ in range(3):
        _store(store, engine.raise_("sos", "res-1", "wb-1", clock.advance(1)))
    _store(store, [a for _, a in run_ticks(engine, clock, until=75)])  # repeats at 30 and 60
    saved = orjson.loads(orjson.dumps(engine.export())) if source == "export" else {
        "v": 1, "alarms": list(store.values())}

    # SIGKILL at 75 s; the new process starts 10 s later, its monotonic clock from another epoch.
    now = clock.restart(downtime_s=10, mono_base=7.5)
    assert clock.t == 85
    engine = AlarmEngine(cfg())
    actions = engine.import_(saved, now)
    assert outputs(actions) == [SetOutput("siren", True), SetOutput("strobe", True)]  # re-asserted
    assert notifies(actions) == []  # nothing due yet: the next round is at 90 s
    (alarm,) = engine.active()
    assert (alarm.state, alarm.count, alarm.notifications) == (AlarmState.NOTIFIED, 4, 3)
    assert alarm.first_raised.mono_s == pytest.approx(7.5 - 85)
    assert engine.next_deadline() == pytest.approx(7.5 + 5)

    timed = run_ticks(engine, clock, until=200)
    assert notify_log(timed) == [
        (90.0, "repeat", 0, ("guard_room",)),
        (120.0, "escalated", 1, ("guard_room", "grid_worker")),
        (150.0, "repeat", 1, ("guard_room", "grid_worker")),
        (180.0, "repeat", 1, ("guard_room", "grid_worker")),
    ]
    # The alarm keeps its id and history; the ack works in the new process.
    acked = engine.ack(alarm.id, "guard-1", "cli", clock.at(181))
    assert emits(acked)[0].data.model_dump()["response_s"] == pytest.approx(181)
    assert notifies(a for _, a in run_ticks(engine, clock, until=400, step=5)) == []


def test_restart_right_after_the_raise_still_sends_the_first_notification(clock: FakeClock) -> None:
    engine = AlarmEngine(cfg())
    actions = engine.raise_("sos", "res-1", "wb-1", clock.now())
    # Killed after the raise was made durable, before the notification went out.
    raised_only = actions[: actions.index(persisted_action(actions)) + 1]
    store: dict[str, Any] = {}
    _store(store, raised_only)
    engine = AlarmEngine(cfg())
    actions = engine.import_({"v": 1, "alarms": list(store.values())}, clock.restart(downtime_s=3))
    (notify,) = notifies(actions)
    assert notify.message_kind == "new"
    assert [e.event_type for e in emits(actions)] == ["alarm.notified"]
    assert engine.active()[0].state is AlarmState.NOTIFIED


def persisted_action(actions: Sequence[Action]) -> Persist:
    return next(a for a in actions if isinstance(a, Persist))


def test_restart_after_a_long_outage_notifies_and_escalates_at_once(clock: FakeClock) -> None:
    engine = AlarmEngine(cfg())
    engine.raise_("sos", "res-1", "wb-1", clock.now())
    saved = engine.export()
    engine = AlarmEngine(cfg())
    actions = engine.import_(saved, clock.restart(downtime_s=200))
    (notify,) = notifies(actions)
    assert (notify.message_kind, notify.level) == ("escalated", 1)


def test_wall_clock_going_back_over_a_restart_delays_nothing_beyond_one_round(clock: FakeClock) -> None:
    engine = AlarmEngine(cfg(policies={AlarmKind.SOS: QUIET}))
    engine.raise_("sos", "res-1", "wb-1", clock.now())
    saved = engine.export()
    now = clock.restart(downtime_s=-3600)  # an RTC-less box booted with an old clock
    engine = AlarmEngine(cfg(policies={AlarmKind.SOS: QUIET}))
    engine.import_(saved, now)
    (alarm,) = engine.active()
    assert alarm.next_notify_at is not None
    assert alarm.next_notify_at.mono_s == now.mono_s + 30
    assert alarm.first_raised.mono_s <= now.mono_s


def test_import_is_all_or_nothing(clock: FakeClock) -> None:
    engine = AlarmEngine(cfg())
    engine.raise_("sos", "res-1", "wb-1", clock.now())
    engine.raise_("fall", "res-2", "wb-2", clock.now())
    saved = orjson.loads(orjson.dumps(engine.export()))
    broken = {"v": 1, "alarms": [saved["alarms"][0], {**saved["alarms"][1], "state": "exploded"}]}
    fresh = AlarmEngine(cfg())
    bad: Any
    for bad in (broken, {"v": 2, "alarms": []}, {"alarms": []}, [], None):
        with pytest.raises(AlarmImportError):
            fresh.import_(bad, clock.now())
        assert fresh.active() == []
    fresh.import_(saved, clock.now())
    with pytest.raises(AlarmImportError, match="already active"):
        fresh.import_(saved, clock.now())
    assert len(fresh.active()) == 2
    with pytest.raises(AlarmImportError):
        Alarm.from_json({"id": "x"})


# --- privacy and messages --------------------------------------------------------------------------

NAMES = {"res-1": "Wang Li"}


@pytest.mark.parametrize(("include_names", "message_names"), [(False, False), (True, False), (False, True)])
def test_names_only_where_enabled(clock: FakeClock, include_names: bool, message_names: bool) -> None:
    engine = AlarmEngine(cfg(include_names=include_names, message_names=message_names),
                         names=NAMES.get)
    actions = engine.raise_("sos", "res-1", "wb-1", clock.now())
    actions += engine.raise_("fall", "res-9", "wb-9", clock.now())  # no name known
    for e in emits(actions):
        data = e.data.model_dump(exclude_none=True)
        assert data.get("name") == ("Wang Li" if include_names and data["resident_id"] == "res-1" else None)
    for n in notifies(actions):
        text = message_for(n).plain()
        assert ("Wang Li" in text) == (message_names and n.alarm.resident_id == "res-1")
        assert n.alarm.resident_id in text


def test_message_rendering(clock: FakeClock) -> None:
    engine = AlarmEngine(cfg(message_names=True), names={"res-1": "Wang\nLi\x1b[31m"}.get)
    for i in range(3):
        engine.raise_("heart_rate_high", "res-1", "wb-1", clock.advance(i), {"heart_rate": 142, "threshold": 120})
    (notify,) = notifies(engine.tick(clock.at(303)))
    msg = message_for(notify)
    assert msg == Message(title=msg.title, text=msg.text, alarm_id=notify.alarm.id, level=1,
                          level_name="grid_worker", kind="escalated", severity="high")
    assert msg.title == "ESCALATED to grid_worker [high]: Heart rate too high, resident res-1 (Wang Li [31m)"
    assert msg.text.splitlines() == [
        "Heart rate too high: resident res-1 (Wang Li [31m), wristband wb-1.",
        "Raised 2025-03-01 08:00:00 UTC, not acknowledged for 5 min 3 s.",
        "Raised 3 times.",
        "Readings: heart_rate=142, threshold=120",
        "Level 1 (grid_worker).",
        f"Acknowledge: edgeagent alarms ack {notify.alarm.id}",
    ]
    assert msg.plain().startswith(msg.title + "\n\n")
    short = msg.plain(max_chars=70)
    assert len(short) <= 70
    assert short.endswith("…")
    err = NotifyError("sms:+8613800000000", "modem busy")
    assert (str(err), err.permanent) == ("notify sms:+8613800000000: modem busy", False)


# --- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "match"), [
    (lambda: KindPolicy("urgent"), "severity"),  # type: ignore[arg-type]  # an invalid severity on purpose
    (lambda: KindPolicy("high", repeat_s=0), "repeat_s"),
    (lambda: KindPolicy("high", escalate_after_s=(300, 120)), "strictly increasing"),
    (lambda: KindPolicy("high", outputs=("",)), "output names"),
    (lambda: EscalationLevel("guard_room", ()), "at least one"),
    (lambda: cfg(levels=()), "at least one escalation level"),
    (lambda: cfg(fold_window_s=-1), "fold_window_s"),
    (lambda: cfg(levels=(EscalationLevel("a", ("x",)), EscalationLevel("a", ("y",)))), "unique"),
    (lambda: cfg(levels=(EscalationLevel("guard_room", ("guard_room",)),),
                         policies={AlarmKind.SOS: KindPolicy("critical", escalate_after_s=(60,))}), "only 0 levels"),
])
def test_config_is_validated(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_pulsed_outputs_pulse_again_on_every_round(clock: FakeClock) -> None:
    engine = AlarmEngine(cfg(output_pulse_s=10))
    assert outputs(engine.raise_("sos", "res-1", "wb-1", clock.now())) == [
        SetOutput("siren", True, 10), SetOutput("strobe", True, 10)]
    assert outputs(engine.tick(clock.at(30))) == [SetOutput("siren", True, 10), SetOutput("strobe", True, 10)]


def test_instant_needs_an_aware_wall_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Instant(datetime(2025, 1, 1), 1.0)
    with pytest.raises(ValueError, match="finite"):
        Instant(T0_WALL, float("inf"))


# --- property: any sequence of operations keeps the invariants --------------------------------------

# A place kind next to the wristband's (as a camera declares one): its own outputs, partly shared with SOS,
# and its own ladder. "res-1" is also used as a place name: a place alarm never folds into a resident's.
LIFT = AlarmKindSpec("lift_blocked", "E-bike in a lift car (test)",
                     KindPolicy("high", ("door_hold", "siren"), repeat_s=25, escalate_after_s=(40,),
                                ladder="guard_then_manager"), subject="place")
PROP_CONFIG = AlarmConfig(
    kinds={**KINDS, LIFT.name: LIFT},
    ladders={"guard_then_manager": (EscalationLevel("guard_room", ("guard_room",)),
                                    EscalationLevel("manager", ("manager",)))},
    policies={
        AlarmKind.SOS: KindPolicy("critical", ("siren", "strobe"), repeat_s=30, escalate_after_s=(60, 150)),
        AlarmKind.FALL: KindPolicy("critical", ("strobe",), repeat_s=20, escalate_after_s=(50,)),
        AlarmKind.LOW_BATTERY: KindPolicy("low", repeat_s=45, fold_window_s=200),
    },
    fold_window_s=120,
)
PROP_KINDS = [AlarmKind.SOS, AlarmKind.FALL, AlarmKind.LOW_BATTERY, LIFT.name]
VIAS = ["cli", "local_mqtt", "cloud", "auto", "rule"]
DT = st.one_of(st.sampled_from([0.0, 0.01, 1.0, 19.99, 20.0, 30.0, 50.0, 60.0, 120.0, 150.0, 400.0]),
               st.floats(min_value=0, max_value=1000, allow_nan=False))
OPS = st.lists(st.one_of(
    st.tuples(st.just("raise"), st.sampled_from(["res-1", "res-2", "lift-1 car"]), st.sampled_from(PROP_KINDS), DT),
    st.tuples(st.just("ack"), st.integers(0, 6), st.sampled_from(VIAS), DT),
    st.tuples(st.just("resolve"), st.integers(0, 6), st.sampled_from(VIAS), DT),
    st.tuples(st.just("tick"), DT),
    st.tuples(st.just("restart"), DT),
), max_size=50)

EVENT_ORDER = {"alarm.raised": 0, "alarm.notified": 1, "alarm.escalated": 2, "alarm.acknowledged": 3,
               "alarm.resolved": 4}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_any_sequence_of_operations_keeps_the_invariants(ops: list[tuple[Any, ...]], factory: EventFactory) -> None:
    clock = FakeClock()
    engine = AlarmEngine(PROP_CONFIG)
    log: list[Action] = []
    ids: list[str] = []  # every alarm ever raised, in order
    raises = 0
    raised_about: Counter[tuple[str, str, bool]] = Counter()  # raises by (kind, subject, about a place)

    for op in ops:
        clock.advance(op[-1])
        now = clock.now()
        before = engine.export()
        try:
            if op[0] == "raise":
                place = op[2] == LIFT.name
                actions = engine.raise_(op[2], op[1], ("cam-" if place else "wb-") + op[1], now, place=place)
                raises += 1
                raised_about[op[2], op[1], place] += 1
            elif op[0] in ("ack", "resolve"):
                if not ids:
                    continue
                alarm_id = ids[op[1] % len(ids)]
                if op[0] == "ack":
                    actions = engine.ack(alarm_id, "guard-1", op[2], now)
                else:
                    actions = engine.resolve(alarm_id, "guard-1", op[2], now, note="checked")
            elif op[0] == "tick":
                actions = engine.tick(now)
            else:
                saved = orjson.loads(orjson.dumps(engine.export()))
                now = clock.restart(op[-1], mono_base=clock.mono % 97)
                engine = AlarmEngine(PROP_CONFIG)
                actions = engine.import_(saved, now)
        except (UnknownAlarmError, AlarmStateError):
            assert engine.export() == before  # a refused operation changes nothing
            continue
        for alarm in persisted(actions):
            if alarm.id not in ids:
                ids.append(alarm.id)
        log += actions
        # Nothing due is left behind by an operation (each one runs what is due, or is a raise/ack/resolve).
        deadline = engine.next_deadline()
        if op[0] in ("tick", "restart"):
            assert deadline is None or deadline > now.mono_s

    _check_invariants(log, engine, raises, factory)
    # Folding keys on (kind, subject): each alarm's count is raises about its own subject only.
    latest = {a.alarm.id: a.alarm for a in log if isinstance(a, Persist)}
    per_subject: Counter[tuple[str, str, bool]] = Counter()
    for alarm in latest.values():
        per_subject[alarm.kind, alarm.subject, alarm.about_place] += alarm.count
    assert per_subject == raised_about


def _check_invariants(log: list[Action], engine: AlarmEngine, raises: int, factory: EventFactory) -> None:
    latest: dict[str, Alarm] = {}
    events: dict[str, list[tuple[int, Emit]]] = {}
    notified: Counter[str] = Counter()
    closed_at: dict[str, int] = {}  # index of the ack or resolve event
    for i, action in enumerate(log):
        if isinstance(action, Persist):
            a = action.alarm
            prev = latest.get(a.id)
            if prev is not None:  # states only move forward; counters never go back
                assert a.state.rank >= prev.state.rank
                assert a.level >= prev.level
                assert a.count >= prev.count
                assert a.notifications >= prev.notifications
            latest[a.id] = a
        elif isinstance(action, Emit):
            data = factory.make(action.event_type, action.device_id, action.data).data  # fits the contract
            alarm_id = data["alarm_id"]
            # Exactly one subject on the wire: a place, or a resident.
            assert ("place" in data) != ("resident_id" in data)
            assert ("place" in data) == (data["kind"] == LIFT.name)
            events.setdefault(alarm_id, []).append((i, action))
            if action.event_type in ("alarm.acknowledged", "alarm.resolved"):
                closed_at.setdefault(alarm_id, i)
        elif isinstance(action, Notify):
            assert action.alarm.id not in closed_at, "notified after ack/resolve"
            assert action.targets
            notified[action.alarm.id] += 1

    # Counts add up: every raise is in exactly one alarm's count.
    assert sum(a.count for a in latest.values()) == raises
    for alarm_id, alarm in latest.items():
        types = [e.event_type for _, e in events.get(alarm_id, [])]
        # Every transition emitted exactly once, in order.
        assert types == sorted(types, key=EVENT_ORDER.__getitem__)
        assert types.count("alarm.raised") == 1
        assert types.count("alarm.notified") == (1 if alarm.notifications else 0)
        assert [e.data.model_dump()["level"] for _, e in events[alarm_id] if e.event_type == "alarm.escalated"] == \
            list(range(1, alarm.level + 1))
        assert types.count("alarm.acknowledged") == (1 if alarm.acknowledged else 0)
        assert types.count("alarm.resolved") == (1 if alarm.state is AlarmState.RESOLVED else 0)
        assert notified[alarm_id] == alarm.notifications
        if alarm.active:  # the engine holds the last persisted snapshot (times re-based after a restart)
            held = engine.get(alarm_id)
            assert (held.state, held.count, held.level, held.notifications, held.first_raised.wall) == (
                alarm.state, alarm.count, alarm.level, alarm.notifications, alarm.first_raised.wall)
        else:
            assert alarm_id not in {a.id for a in engine.active()}
    assert {a.id for a in engine.active()} == {a.id for a in latest.values() if a.active}

    # Outputs end on exactly when an unacknowledged alarm needs them.
    state: dict[str, bool] = {}
    for action in log:
        if isinstance(action, SetOutput):
            state[action.name] = action.on
    needed = {name for a in engine.active() if a.state.unacknowledged
              for name in PROP_CONFIG.policy(a.kind).outputs}
    assert {name for name, on in state.items() if on} == needed
