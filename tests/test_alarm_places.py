"""The alarm lifecycle as a service for any capability: kinds declared by capabilities, place alarms, evidence
attachments, per-kind ladders, ``auto``/``rule`` resolutions, restart. Pure engine with a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgeagent.app import alarm_config, alarm_kinds
from edgeagent.capabilities import CAPABILITIES, validate_doc
from edgeagent.cloud_bridge import contract
from edgeagent.drivers.modbus.charger import ChargerSafety, MemoryStateStore
from edgeagent.drivers.wristband.kinds import WRISTBAND_ALARM_KINDS
from edgeagent.kernel.alarms.engine import (
    AlarmConfig,
    AlarmEngine,
    AlarmImportError,
    AlarmState,
    EscalationLevel,
    SetOutput,
)
from edgeagent.kernel.alarms.kinds import AlarmKindSpec, KindPolicy, collect_kinds
from edgeagent.kernel.alarms.notify import message_for
from edgeagent.kernel.alarms.runtime import AlarmRuntime
from edgeagent.kernel.config.schema import parse_yaml
from edgeagent.kernel.errors import ConfigError
from edgeagent.kernel.local_actions import alarm_command, core_local_actions
from edgeagent.kernel.pipeline.event_types import DOCUMENTED_ALARM_KINDS, REGISTRY
from edgeagent.kernel.pipeline.events import Attachment, EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.kernel.runtime.clock import Clock as WallClock
from edgeagent.kernel.runtime.outputs import Outputs
from tests.test_alarms import FakeClock, emits, notifies, outputs
from tests.test_charger_rules import LIMITS, Clock, FakeDevice, FakeSink, Log

LIFT = AlarmKindSpec("lift_blocked", "E-bike in a lift car", subject="place", policy=KindPolicy(
    "high", ("lift2_door_hold", "siren"), repeat_s=30, escalate_after_s=(60,), ladder="lift"))
SHED = AlarmKindSpec("shed_fire", "Charging shed fire risk", subject="place", policy=KindPolicy(
    "critical", ("siren",), repeat_s=20, escalate_after_s=(40, 100)))  # the main (resident) ladder
KINDS = {k.name: k for k in (*WRISTBAND_ALARM_KINDS, LIFT, SHED)}
LADDERS = {"lift": (EscalationLevel("guard_room", ("guard_room",)), EscalationLevel("lift_company", ("lift_co",)))}
SNAP = Attachment("snapshot", "ab" * 32, "image/jpeg", 48_213)


def engine_for(**kw: Any) -> AlarmEngine:
    return AlarmEngine(AlarmConfig(**{"kinds": KINDS, "ladders": LADDERS, **kw}))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_place_alarm_carries_its_place_device_and_evidence(clock: FakeClock, factory: EventFactory) -> None:
    engine = engine_for()
    actions = engine.raise_("lift_blocked", "lift-2 car", "cam-lift2", clock.now(), {"confidence": 0.91},
                            place=True, attachments=[SNAP])
    assert outputs(actions) == [SetOutput("lift2_door_hold", True), SetOutput("siren", True)]
    (alarm,) = engine.active()
    assert (alarm.place, alarm.resident_id, alarm.subject, alarm.about_place) == (
        "lift-2 car", None, "lift-2 car", True)
    assert alarm.attachments == (SNAP,)
    raised, notified = emits(actions)
    assert raised.attachments == (SNAP,) and notified.attachments == ()
    # The events fit the published contract: place set, no resident_id, the snapshot in the envelope.
    for e in (raised, notified):
        event = factory.make(e.event_type, e.device_id, e.data, e.attachments)
        env = orjson.loads(event.to_json(1))
        contract.validate_envelope(env)
        assert env["data"]["place"] == "lift-2 car" and "resident_id" not in env["data"]
        assert env["device_id"] == "cam-lift2"
    assert orjson.loads(factory.make(raised.event_type, raised.device_id, raised.data, raised.attachments)
                        .to_json(1))["attachments"] == [SNAP.to_dict()]
    # Its own ladder: the guard room first; the message names the place and the camera.
    (note,) = notifies(actions)
    assert (note.level_name, note.targets, note.label) == ("guard_room", ("guard_room",), "E-bike in a lift car")
    msg = message_for(note)
    assert msg.title == "ALARM [high]: E-bike in a lift car, at lift-2 car"
    assert "device cam-lift2" in msg.text and "resident" not in msg.text and "confidence=0.91" in msg.text


def test_folding_keys_on_kind_and_subject(clock: FakeClock) -> None:
    engine = engine_for()
    engine.raise_("lift_blocked", "lift-2 car", "cam-a", clock.now(), place=True, attachments=[SNAP])
    engine.raise_("lift_blocked", "lift-2 car", "cam-b", clock.advance(5), place=True)  # folds (same place)
    engine.raise_("lift_blocked", "lift-3 car", "cam-c", clock.advance(1), place=True)  # another place
    engine.raise_("shed_fire", "lift-2 car", "charger-1", clock.advance(1), place=True)  # another kind
    engine.raise_("sos", "lift-2 car", "wb-1", clock.advance(1))  # a resident who happens to share the name
    got = sorted((a.kind, a.subject, a.about_place, a.count, a.device_id) for a in engine.active())
    assert got == [("lift_blocked", "lift-2 car", True, 2, "cam-a"), ("lift_blocked", "lift-3 car", True, 1, "cam-c"),
                   ("shed_fire", "lift-2 car", True, 1, "charger-1"), ("sos", "lift-2 car", False, 1, "wb-1")]
    first = next(a for a in engine.active() if a.device_id == "cam-a")
    assert first.attachments == (SNAP,)  # the first raise's evidence stays


def test_ladders_per_kind_escalate_and_stop_at_their_top(clock: FakeClock) -> None:
    engine = engine_for()
    engine.raise_("lift_blocked", "lift-2 car", "cam-a", clock.now(), place=True)
    engine.raise_("shed_fire", "shed-north", "charger-1", clock.now(), place=True)
    seen: list[tuple[str, str, int, tuple[str, ...]]] = []
    for _ in range(300):
        seen += [(n.alarm.kind, n.message_kind, n.level, n.targets) for n in notifies(engine.tick(clock.advance(1)))]
    escalations = [s for s in seen if s[1] == "escalated"]
    # The lift's own two-level ladder; the shed's on the main (resident) ladder, linked as a site would link
    # a video fall to the wristbands' escalation.
    assert escalations == [("shed_fire", "escalated", 1, ("guard_room", "grid_worker")),
                           ("lift_blocked", "escalated", 1, ("guard_room", "lift_co")),
                           ("shed_fire", "escalated", 2, ("guard_room", "grid_worker", "family"))]


def test_ack_by_a_guard_and_resolve_by_the_rule_are_recorded_and_switch_outputs_off(clock: FakeClock) -> None:
    engine = engine_for()
    engine.raise_("lift_blocked", "lift-2 car", "cam-a", clock.now(), place=True)
    engine.raise_("shed_fire", "shed-north", "charger-1", clock.now(), place=True)
    lift, shed = engine.active()
    acked = engine.ack(lift.id, "guard-7", "cli", clock.advance(12), caller="root(0)")
    # The door hold goes; the siren stays for the shed's unacknowledged alarm.
    assert outputs(acked) == [SetOutput("lift2_door_hold", False)]
    (ev,) = emits(acked)
    assert ev.data.model_dump(exclude_none=True)["place"] == "lift-2 car"
    resolved = engine.resolve(lift.id, "ebike-rule", "rule", clock.advance(30), note="the e-bike left the car")
    (ev,) = emits(resolved, "alarm.resolved")
    data = ev.data.model_dump()
    assert (data["via"], data["by"], data["acknowledged"], data["place"]) == ("rule", "ebike-rule", True, "lift-2 car")
    auto = engine.resolve(shed.id, "charger-1", "auto", clock.advance(1))
    assert outputs(auto) == [SetOutput("siren", False)]
    assert engine.active() == []


def test_place_alarms_survive_a_restart_with_their_kind_place_and_evidence(clock: FakeClock) -> None:
    engine = engine_for()
    engine.raise_("lift_blocked", "lift-2 car", "cam-a", clock.now(), {"dwell_s": 3.5}, place=True,
                  attachments=[SNAP])
    engine.tick(clock.advance(45))  # a repeat went out
    saved = orjson.loads(orjson.dumps(engine.export()))
    now = clock.restart(20)
    fresh = engine_for()
    actions = fresh.import_(saved, now)
    (alarm,) = fresh.active()
    assert (alarm.kind, alarm.place, alarm.resident_id, alarm.attachments) == (
        "lift_blocked", "lift-2 car", None, (SNAP,))
    assert dict(alarm.details) == {"dwell_s": 3.5}
    # The door hold and siren come back (a relay may have lost its state with the box); escalation is due.
    assert outputs(actions)[:2] == [SetOutput("lift2_door_hold", True), SetOutput("siren", True)]
    assert [n.message_kind for n in notifies(actions)] == ["escalated"]
    # A later process whose capabilities no longer declare the kind leaves that alarm out (and says so), but
    # a resident's SOS saved with it still comes back.
    fresh.raise_("sos", "r-1", "wb-1", now)
    both = orjson.loads(orjson.dumps(fresh.export()))
    later = AlarmEngine(AlarmConfig(kinds={k.name: k for k in WRISTBAND_ALARM_KINDS}))
    later.import_(both, clock.restart(5))
    assert [a.kind for a in later.active()] == ["sos"]
    assert [(a.kind, a.place) for a in later.not_restored] == [("lift_blocked", "lift-2 car")]
    with pytest.raises(AlarmImportError, match="exactly one resident or place"):
        broken = {**both, "alarms": [{**both["alarms"][0], "resident_id": "r-9"}]}
        AlarmEngine(AlarmConfig(kinds=KINDS, ladders=LADDERS)).import_(broken, now)


def test_wrong_subjects_and_bad_evidence_are_refused_before_anything_changes(clock: FakeClock) -> None:
    engine = engine_for()
    with pytest.raises(ValueError, match="'lift_blocked' is about a place"):
        engine.raise_("lift_blocked", "lift-2 car", "cam-a", clock.now())
    with pytest.raises(ValueError, match="'sos' is about a resident"):
        engine.raise_("sos", "lift-2 car", "cam-a", clock.now(), place=True)
    with pytest.raises(ValueError, match="printable"):
        engine.raise_("lift_blocked", "lift\x1b[2J", "cam-a", clock.now(), place=True)
    with pytest.raises(ValueError, match="printable"):
        engine.raise_("lift_blocked", "x" * 65, "cam-a", clock.now(), place=True)
    with pytest.raises(TypeError, match="Attachment"):
        engine.raise_("lift_blocked", "lift-2 car", "cam-a", clock.now(), place=True,
                      attachments=[{"sha256": "x"}])  # type: ignore[list-item]  # not an Attachment, on purpose
    with pytest.raises(ValueError, match="at most 8"):
        engine.raise_("lift_blocked", "lift-2 car", "cam-a", clock.now(), place=True, attachments=[SNAP] * 9)
    assert engine.active() == []


@pytest.mark.parametrize(("make", "match"), [
    (lambda: AlarmKindSpec("Lift-Blocked", "x", KindPolicy("high")), "must match"),
    (lambda: AlarmKindSpec("lift", "two\nlines", KindPolicy("high")), "one non-empty line"),
    (lambda: AlarmKindSpec("lift", "x", KindPolicy("high"), subject="thing"), "resident' or 'place"),  # type: ignore[arg-type]  # on purpose
    (lambda: collect_kinds([("cameras", [LIFT]), ("lifts", [LIFT])]), "declared by both 'cameras' and 'lifts'"),
    (lambda: AlarmConfig(kinds=KINDS, ladders=LADDERS, policies={"earthquake": KindPolicy("high")}),
     "unknown alarm kind 'earthquake'"),
    (lambda: AlarmConfig(kinds=KINDS), "unknown escalation ladder 'lift'"),
    (lambda: AlarmConfig(kinds=KINDS, ladders=LADDERS, policies={"lift_blocked": KindPolicy(
        "high", escalate_after_s=(10, 20, 30))}), "only 2 levels"),
    (lambda: AlarmConfig(kinds=KINDS, ladders=LADDERS, policies={"lift_blocked": KindPolicy(
        "high", escalate_after_s=(10, 20), ladder="lift")}), "only 1 levels"),
    (lambda: AlarmConfig(kinds=KINDS, ladders={**LADDERS, "empty": ()}), "ladders.empty needs at least one"),
])
def test_kinds_and_their_config_are_validated(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


CONFIG = """version: 1
site_id: s
gateway_id: g
alarms:
  ladders:
    guard_only: [{name: guard_room, targets: [guard_room]}]
  policies:
"""


def test_site_policies_override_any_capabilitys_kind_and_unknown_kinds_are_located_errors(tmp_path: Path) -> None:
    path = tmp_path / "edgeagent.yaml"
    good = CONFIG + "    charger_cutoff: {severity: critical, outputs: [shed_siren], ladder: guard_only}\n" \
                    "    sos: {severity: critical, outputs: [siren], repeat_s: 15}\n"
    cfg = validate_doc(parse_yaml(good, path), path)
    config = alarm_config(cfg)
    assert config.policy("charger_cutoff") == KindPolicy("critical", ("shed_siren",), ladder="guard_only")
    assert config.ladder("charger_cutoff") == (EscalationLevel("guard_room", ("guard_room",)),)
    assert config.policy("sos").repeat_s == 15
    assert config.policy("fall").sounds_siren  # not listed: the wristband's shipped policy

    bad = CONFIG + "    earthquake: {severity: high}\n    sos: {severity: high, ladder: nowhere}\n"
    with pytest.raises(ConfigError) as err:
        validate_doc(parse_yaml(bad, path), path)
    text = str(err.value)
    assert "edgeagent.yaml:8:5" in text and "unknown alarm kind 'earthquake'" in text and "charger_cutoff" in text
    assert "alarms.policies.sos.ladder" in text and "no escalation ladder 'nowhere'" in text
    # The daemon checks again against the capabilities it runs (a config loaded with another model).
    with pytest.raises(ConfigError, match=r"alarms\.policies\.charger_cutoff: unknown alarm kind"):
        alarm_config(cfg, [spec for spec in CAPABILITIES if spec.name != "modbus"])
    with pytest.raises(ConfigError, match="declared by both 'wristbands' and 'wristbands'"):
        alarm_config(cfg, [*CAPABILITIES, next(spec for spec in CAPABILITIES if spec.name == "wristbands")])
    with pytest.raises(ConfigError, match=r"alarms.policies.Bad-Kind: .*must match"):
        validate_doc(parse_yaml(CONFIG + "    Bad-Kind: {severity: high}\n", path), path)


def test_every_declared_kind_is_documented_in_the_contract() -> None:
    declared = alarm_kinds(CAPABILITIES)
    assert {"sos", "charger_cutoff"} <= set(declared)
    for name, spec in declared.items():
        assert name in DOCUMENTED_ALARM_KINDS, f"{name} is not listed in event_types.DOCUMENTED_ALARM_KINDS"
        assert DOCUMENTED_ALARM_KINDS[name][0] == spec.subject, name
    schema = orjson.loads((contract.CONTRACT_DIR / "schemas" / "alarm.raised.json").read_bytes())
    described = schema["properties"]["data"]["properties"]["kind"]["description"]
    assert all(f"{name} ({subject})" in described for name, (subject, _) in DOCUMENTED_ALARM_KINDS.items())


def test_an_alarm_with_both_or_neither_subject_does_not_fit_the_contract(clock: FakeClock,
                                                                        factory: EventFactory) -> None:
    engine = engine_for()
    (raised, _) = emits(engine.raise_("shed_fire", "shed-north", "charger-1", clock.now(), place=True))
    env = orjson.loads(factory.make(raised.event_type, raised.device_id, raised.data).to_json(1))
    validator = contract.validator_for("alarm.raised")
    validator.validate(env)
    data = env["data"]
    for broken in ({**data, "resident_id": "r-1"}, {k: v for k, v in data.items() if k != "place"},
                   {**data, "kind": "Lift-Blocked"}, {**data, "place": "a\u001bb"}):
        assert list(validator.iter_errors({**env, "data": broken})), broken
    with pytest.raises(ValueError, match="exactly one of resident_id and place"):
        type(raised.data).model_validate({**data, "resident_id": "r-1"})


# --- a charger cut-off is a place alarm of the Modbus capability ------------------------------------

async def test_charger_cutoffs_raise_one_place_alarm_resolved_when_the_last_lockout_clears(tmp_path: Path) -> None:
    outbox = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await outbox.open()
    try:
        wall = WallClock(mode="synced")
        alarms = AlarmRuntime(AlarmEngine(alarm_config(validate_doc(parse_yaml(
            "version: 1\nsite_id: s\ngateway_id: g\n", tmp_path / "e.yaml"), tmp_path / "e.yaml"))),
            sink=EventSink(EventFactory(REGISTRY, "s", "g", wall), outbox), state=outbox, outputs=Outputs(),
            notifiers=None, clock=wall)
        log = Log()
        clock = Clock()
        device, sink = FakeDevice(log, clock), FakeSink(log)
        safety = ChargerSafety(device, LIMITS, sink, MemoryStateStore(), monotonic=clock, alarms=alarms,
                               place="shed north")
        await device.reading("smoke", False)
        await device.reading("port3_temperature", 71.5)
        await device.reading("port5_current", 3.9)
        await safety.drain()
        (alarm,) = alarms.active("charger_cutoff", "shed north")
        assert (alarm.place, alarm.device_id, alarm.count, alarm.state) == ("shed north", "shed-1", 2,
                                                                           AlarmState.NOTIFIED)
        assert dict(alarm.details) == {"port": 3, "reason": "over_temperature", "value": 71.5, "limit": 65.0,
                                       "unit": "degC", "reaction_ms": pytest.approx(25.0)}
        assert len(sink.events("charger.port.cutoff")) == 2  # the events stay as they were
        await device.reading("port3_temperature", 40.0)
        await device.reading("port5_current", 0.0)
        await device.reading("port5_temperature", 30.0)
        await safety.reset_lockout(3, "guard-desk", "cli")
        assert alarms.active("charger_cutoff")  # port 5 is still locked out
        await safety.reset_lockout(5, "guard-desk", "cloud")
        assert alarms.active("charger_cutoff") == [] and safety.alarm_failures == 0
        types = [(e["type"], e["data"].get("place"), e["data"].get("via")) for e in await _all_events(outbox)]
        assert types == [("alarm.raised", "shed north", None), ("alarm.notified", "shed north", None),
                         ("alarm.resolved", "shed north", "auto")]
    finally:
        await outbox.close()


async def _all_events(outbox: Any) -> list[dict[str, Any]]:
    batch = await outbox.lease(100, 1 << 20)
    return [] if batch is None else [orjson.loads(p) for p in batch.payloads]


async def test_local_action_and_signed_command_handle_a_place_alarm(tmp_path: Path) -> None:
    """The CLI's ``alarm`` action and the platform's ``alarm.handle`` are kind-blind: a place alarm is
    acknowledged and resolved through them like an SOS, with who and how recorded."""
    outbox = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await outbox.open()
    try:
        wall = WallClock(mode="synced")
        outs = Outputs()
        siren = Lamp()
        outs.register("siren", siren)
        alarms = AlarmRuntime(AlarmEngine(AlarmConfig(kinds=KINDS, ladders=LADDERS)),
                              sink=EventSink(EventFactory(REGISTRY, "s", "g", wall), outbox), state=outbox,
                              outputs=outs, notifiers=None, clock=wall)
        shed = await alarms.raise_("shed_fire", "shed-north", "charger-1", place=True)
        listed = await core_local_actions(outs, alarms)["alarms"]({}, "root(0)")
        assert [(a["kind"], a["place"], a["resident_id"]) for a in listed["alarms"]] == [
            ("shed_fire", "shed-north", None)]
        out = await core_local_actions(outs, alarms)["alarm"]({"alarm_id": shed.id, "by": "guard-7"}, "root(0)")
        assert out["stored"] is True and alarms.active()[0].acknowledged_via == "cli"
        cloud = alarm_command(alarms)
        out = await cloud.handler({"alarm_id": shed.id, "action": "resolve", "by": "op-1", "note": "checked"})
        assert out["stored"] is True and alarms.active() == []
        for _ in range(250):  # the output lane switches in the background
            if siren.states[-1:] == [False]:
                break
            await asyncio.sleep(0.02)
        assert siren.states == [True, False]
        kinds = [(e["type"], e["data"]["place"], e["data"].get("via")) for e in await _all_events(outbox)]
        assert kinds == [("alarm.raised", "shed-north", None), ("alarm.notified", "shed-north", None),
                         ("alarm.acknowledged", "shed-north", "cli"), ("alarm.resolved", "shed-north", "cloud")]
    finally:
        await outbox.close()


class Lamp:
    def __init__(self) -> None:
        self.states: list[bool] = []

    async def set(self, on: bool) -> None:
        self.states.append(on)
