"""The published cloud contract (cloud-bridge/contract/) matches what the code emits."""

from __future__ import annotations

import base64
import copy
import enum
import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from jsonschema import ValidationError
from pydantic import BaseModel
from referencing import Registry, Resource
from ruamel.yaml import YAML

from edgeagent.cloud_bridge import contract
from edgeagent.kernel.pipeline.event_types import REGISTRY, PointEvent
from edgeagent.kernel.pipeline.events import (
    Attachment,
    EventData,
    EventFactory,
    EventRegistry,
    EventType,
    Priority,
)
from edgeagent.kernel.runtime.clock import Clock, SyncMode

SITE, GATEWAY = "site-1", "gw-1"

# One valid ``data`` per registered type. A new type without an example fails
# test_examples_cover_every_registered_type and the per-type tests.
EXAMPLES: dict[str, dict[str, Any]] = {
    "command.audit": {"command_id": "cmd-0001", "command": "gate.open", "outcome": "rejected",
                      "error": "replay", "issuer": "guard-desk"},
    "contact.changed": {"state": "open", "contact": "door"},
    "device.fault": {"task": "modbus-meter-1", "error": "TimeoutError: no answer", "restarts": 5},
    "device.offline": {"reason": "no answer for 30 s"},
    "device.online": {"reason": "answered a poll"},
    "gateway.clock.synced": {"boot_id": "2f0e5f3c-6f7c-4c1a-9c43-7f1c3f1b5f0a", "monotonic_ms": 123_456,
                             "wall_at_sync": "2025-01-01T12:00:00.000Z", "corrected_unsent": 3,
                             "sent_uncorrected": 1},
    "gateway.started": {"version": "0.1.0", "boot_id": "2f0e5f3c-6f7c-4c1a-9c43-7f1c3f1b5f0a",
                        "recovered_unsent": 0},
    "gateway.stopped": {"reason": "SIGTERM", "unsent": 12},
    "outbox.evicted": {"evicted_telemetry": 40, "evicted_event": 2, "first_seq": 100, "last_seq": 141,
                       "total_evicted": 42, "cap_bytes": 268_435_456},
    "outbox.dead_lettered": {"count": 2, "alarms": 0, "first_seq": 1000, "last_seq": 50000, "seqs": [1000, 50000],
                             "types": ["device.offline"], "reason": "70212 bytes, more than the broker's maximum "
                             "packet size (65536 bytes)", "total_dead_lettered": 3},
    "panic.pressed": {"location": "guard-room", "presses": 2},
    "sensor.reading": {"metric": "temperature", "value": 21.5, "unit": "degC"},
    "charger.port.cutoff": {"port": 3, "reason": "over_temperature", "value": 71.5, "limit": 65.0, "unit": "degC",
                            "reaction_ms": 42.7, "cut_error": None},
    "charger.station.cutoff": {"reason": "smoke", "port": None, "value": True, "limit": None, "unit": None,
                               "reaction_ms": 38.1, "cut_error": None},
    "charger.lockout.reset": {"port": 3, "by": "guard-desk", "via": "cli", "cleared_reason": "over_temperature"},
    "charging.session.started": {"port": 3, "session_id": "01J9Z8Y7X6W5V4T3S2R1Q0PNMK",
                                 "energy_kwh_at_start": 1234.567},
    "charging.session.ended": {"port": 3, "session_id": "01J9Z8Y7X6W5V4T3S2R1Q0PNMK", "energy_kwh": 0.842,
                               "duration_s": 7260.0, "reason": "full"},
    "charger.port.full_cutoff": {"port": 3, "session_id": "01J9Z8Y7X6W5V4T3S2R1Q0PNMK", "current_a": 0.08,
                                 "limit_a": 0.15, "after_s": 1800.0, "reaction_ms": 35.0, "cut_error": None},
    "wristband.vitals": {"resident_id": "r-0012", "zone": "inside", "heart_rate_bpm": 72, "spo2_pct": 97,
                         "battery_pct": 81, "worn": True, "rssi_dbm": -67},
    "gate.commanded": {"command": "open", "reason": "visitor", "by": "guard-desk", "via": "cli",
                       "outcome": "executed", "latency_ms": 12.5},
    "gate.visitor": {"plate": "苏E5A2B8", "confidence": 0.97, "agreement": 1.0, "reason": "not_in_list",
                     "track_id": 12, "zone": "lane", "reads": 6, "votes": 6, "gate": "car-gate"},
    "gate.call": {"gate": "car-gate", "source": "camera", "zone": "lane"},
    # a place alarm (a camera's, with its snapshot in the envelope's attachments) and resident alarms
    "alarm.raised": {"alarm_id": "01J9Z8Y7X6W5V4T3S2R1Q0PNMK", "kind": "ebike_in_lift", "severity": "high",
                     "place": "lift-2 car", "device_id": "cam-lift2", "count": 1, "level": 0,
                     "raised_at": "2025-01-01T12:00:00.000Z", "details": {"label": "motorcycle", "score": 0.87}},
    "alarm.notified": {"alarm_id": "01J9Z8Y7X6W5V4T3S2R1Q0PNMK", "kind": "sos", "severity": "critical",
                       "resident_id": "res-0042", "device_id": "wb-1", "count": 3, "level": 0,
                       "raised_at": "2025-01-01T12:00:00.000Z", "level_name": "guard_room",
                       "targets": ["guard_room"]},
    "alarm.escalated": {"alarm_id": "01J9Z8Y7X6W5V4T3S2R1Q0PNMK", "kind": "fall", "severity": "critical",
                        "resident_id": "res-0042", "device_id": "wb-1", "count": 1, "level": 1,
                        "raised_at": "2025-01-01T12:00:00.000Z", "level_name": "grid_worker",
                        "targets": ["guard_room", "grid_worker"], "after_s": 120.0},
    "alarm.acknowledged": {"alarm_id": "01J9Z8Y7X6W5V4T3S2R1Q0PNMK", "kind": "sos", "severity": "critical",
                           "resident_id": "res-0042", "device_id": "wb-1", "name": "Wang Li", "count": 100,
                           "level": 1, "raised_at": "2025-01-01T12:00:00.000Z", "by": "guard-desk",
                           "via": "local_mqtt", "notifications": 6, "response_s": 151.3},
    "alarm.resolved": {"alarm_id": "01J9Z8Y7X6W5V4T3S2R1Q0PNMK", "kind": "sos", "severity": "critical",
                       "resident_id": "res-0042", "device_id": "wb-1", "count": 100, "level": 1,
                       "raised_at": "2025-01-01T12:00:00.000Z", "by": "platform-ops", "via": "cloud",
                       "note": "pressed by mistake", "acknowledged": True, "notifications": 6,
                       "duration_s": 900.0},
    # cameras: as drivers/camera/pipeline.py and service.py emit them
    "camera.object": {"track_id": 17, "label": "person", "score": 0.83, "box": (0.41, 0.3, 0.47, 0.52),
                      "model": "nanodet", "zones": ["lawn"]},
    "camera.zone": {"zone": "lawn", "kind": "leave", "track_id": 17, "label": "person", "score": 0.8,
                    "box": (0.41, 0.3, 0.47, 0.52), "occupancy": 0, "dwell_s": 12.5, "reason": "lost"},
    "camera.zone.occupancy": {"zone": "lawn", "counts": {"person": 2, "bicycle": 1}},
    "camera.line.crossed": {"line": "gate", "direction": "in", "track_id": 17, "label": "car", "score": 0.9,
                            "counts": {"in": 12, "out": 9}, "source": "edge"},
    "camera.motion": {"active": True, "source": {"VideoSourceConfigurationToken": "vsc1"},
                      "topic": "tns1:RuleEngine/CellMotionDetector/Motion", "camera_time": "2025-01-01T12:00:00+00:00"},
    "camera.tamper": {"active": True, "source": {}, "topic": "tns1:RuleEngine/TamperDetector/Tamper",
                      "camera_time": None},
    "camera.input": {"active": True, "source": {"InputToken": "DI1"}, "topic": "tns1:Device/Trigger/DigitalInput",
                     "camera_time": "2025-01-01T12:00:00+00:00", "input": "call_button"},
    "camera.evidence.uploaded": {"sha256": "ab" * 32, "kind": "snapshot", "size_bytes": 48213, "status": 200,
                                 "elapsed_ms": 310.0},
    "camera.clip": {"for_event": "01J9Z8Y7X6W5V4T3S2R1Q0PNMK", "pre_s": 4.6, "duration_s": 9.8, "frames": 98,
                    "codec": "h264", "truncated": False},
    "console.audit": {"user": "guard-li", "role": "guard", "action": "alarm.ack",
                      "target": "01J9Z8Y7X6W5V4T3S2R1Q0PNMK", "outcome": "ok", "detail": None,
                      "remote": "192.168.1.20"},
}
# Device-point types share one schema (PointEvent); each gets this example, so a new one is covered.
POINT_EXAMPLE = {"point": "port3_temperature", "port": 3, "value": 71.5, "previous": 64.0, "unit": "degC",
                 "trigger": "above", "threshold": 65.0}
for _t in REGISTRY:
    if _t.data_model is PointEvent:
        EXAMPLES.setdefault(_t.name, POINT_EXAMPLE)

REGISTERED = [t.name for t in REGISTRY]
SNAPSHOT = Attachment(kind="snapshot", sha256="ab" * 32, media_type="image/jpeg", size_bytes=48_213)


def make_envelope(type_name: str, *, mode: SyncMode = "synced", seq: int = 7,
                  attachments: tuple[Attachment, ...] = ()) -> dict[str, Any]:
    factory = EventFactory(REGISTRY, SITE, GATEWAY, Clock(mode=mode))
    event = factory.make(type_name, "dev-1", EXAMPLES[type_name], attachments)
    return event.envelope(seq)


def is_valid_everywhere(envelope: dict[str, Any], type_name: str) -> bool:
    """Valid against the type's own schema file, and as a one-event batch message."""
    own: bool = contract.validator_for(type_name).is_valid(envelope)
    batch_validator = contract.schema_validator(contract.BATCH_SCHEMA_FILE)
    batch: bool = batch_validator.is_valid({"v": 1, "events": [envelope]})
    assert own == batch, f"type schema says {own}, batch schema says {batch}"
    return own


# --- every registered type, as the code emits it ------------------------------------------------

def test_examples_cover_every_registered_type() -> None:
    assert set(EXAMPLES) == set(REGISTERED)


ALARM_TYPES = [t for t in REGISTERED if t.startswith("alarm.")]


@pytest.mark.parametrize("type_name", ALARM_TYPES)
def test_an_alarm_is_about_exactly_one_resident_or_place(type_name: str) -> None:
    env = make_envelope(type_name, attachments=(SNAPSHOT,) if type_name == "alarm.raised" else ())
    assert is_valid_everywhere(env, type_name)
    data = env["data"]
    subject = {k: data.pop(k) for k in ("place", "resident_id") if k in data}
    assert len(subject) == 1
    swapped = {"resident_id": "res-0042"} if "place" in subject else {"place": "shed north"}
    assert is_valid_everywhere({**env, "data": {**data, **swapped}}, type_name)
    assert not is_valid_everywhere({**env, "data": data}, type_name)  # neither
    assert not is_valid_everywhere({**env, "data": {**data, **subject, **swapped}}, type_name)  # both
    assert not is_valid_everywhere({**env, "data": {**data, **subject, "kind": "Fire!"}}, type_name)


def test_every_registered_type_has_a_schema_file() -> None:
    files = {p.name for p in (contract.CONTRACT_DIR / "schemas").glob("*.json")}
    missing = {contract.schema_file_for(name) for name in REGISTERED} - files
    assert not missing


@pytest.mark.parametrize("mode", ["synced", "unsynced"])
@pytest.mark.parametrize("type_name", REGISTERED)
def test_real_envelope_validates(type_name: str, mode: SyncMode) -> None:
    env = make_envelope(type_name, mode=mode)
    assert ("clock" in env) == (mode == "unsynced")
    contract.validator_for(type_name).validate(env)
    contract.validate_envelope(env)
    contract.validate_batch({"v": 1, "events": [env]})


@pytest.mark.parametrize("type_name", REGISTERED)
def test_envelope_with_attachment_validates(type_name: str) -> None:
    env = make_envelope(type_name, attachments=(SNAPSHOT,))
    assert env["attachments"] == [SNAPSHOT.to_dict()]
    contract.validate_envelope(env)


@pytest.mark.parametrize("type_name", REGISTERED)
def test_data_schema_is_the_pydantic_schema(type_name: str) -> None:
    et = REGISTRY.get(type_name)
    schema = json.loads((contract.CONTRACT_DIR / "schemas" / contract.schema_file_for(type_name)).read_text())
    pydantic_schema = et.data_model.model_json_schema()
    if "$defs" not in pydantic_schema:
        assert schema["properties"]["data"] == pydantic_schema
    assert schema["properties"]["type"]["const"] == type_name
    assert schema["properties"]["priority"]["const"] == et.priority.label
    assert schema["additionalProperties"] is False


def test_batch_of_several_events_of_one_class_validates() -> None:
    events = [make_envelope("contact.changed", seq=10), make_envelope("device.offline", seq=11),
              make_envelope("gateway.started", mode="unsynced", seq=12)]
    contract.validate_batch({"v": 1, "events": events})


def test_coalesced_telemetry_validates() -> None:
    env = make_envelope("sensor.reading")
    env["coalesced"] = 3
    contract.validate_envelope(env)
    contract.validate_batch({"v": 1, "events": [env]})


def test_corrected_clock_validates() -> None:
    # What the outbox makes of an unsynced event when the clock synchronises before it is sent.
    env = make_envelope("panic.pressed", mode="unsynced")
    env["clock_synced"] = True
    env["clock"]["corrected"] = True
    contract.validate_envelope(env)


# --- what must not validate ---------------------------------------------------------------------

def _mutate(env: dict[str, Any], how: str) -> None:
    if how == "wrong type const":
        env["type"] = "gateway.stopped"
    elif how == "missing id":
        del env["id"]
    elif how == "extra envelope key":
        env["extra"] = 1
    elif how == "bad data field":
        env["data"]["recovered_unsent"] = -1
    elif how == "data field of wrong type":
        env["data"]["version"] = 1
    elif how == "missing data field":
        del env["data"]["boot_id"]
    elif how == "unknown data field":
        env["data"]["colour"] = "red"
    elif how == "id not a ULID":
        env["id"] = "01J9Z8Y7X6W5V4T3S2R1Q0PNMU"  # 'U' is not in the ULID alphabet
    elif how == "seq zero":
        env["seq"] = 0
    elif how == "wrong version":
        env["v"] = 2
    elif how == "wrong priority":
        env["priority"] = "alarm"
    elif how == "occurred_at without ms":
        env["occurred_at"] = "2025-01-01T12:00:00Z"
    elif how == "occurred_at not UTC":
        env["occurred_at"] = "2025-01-01T12:00:00.000+02:00"
    elif how == "occurred_at impossible date":
        env["occurred_at"] = "2025-02-30T12:00:00.000Z"
    elif how == "empty device_id":
        env["device_id"] = ""
    elif how == "gateway_id with wildcard":
        env["gateway_id"] = "gw+1"
    elif how == "unsynced without clock":
        env["clock_synced"] = False
    elif how == "coalesced on an event":
        env["coalesced"] = 2
    elif how == "bad attachment hash":
        env["attachments"] = [{**SNAPSHOT.to_dict(), "sha256": "xyz"}]
    elif how == "attachment extra key":
        env["attachments"] = [{**SNAPSHOT.to_dict(), "url": "http://x"}]
    else:  # pragma: no cover - a typo in the parameter list
        raise AssertionError(how)


MUTATIONS = [
    "wrong type const", "missing id", "extra envelope key", "bad data field", "data field of wrong type",
    "missing data field", "unknown data field", "id not a ULID", "seq zero", "wrong version",
    "wrong priority", "occurred_at without ms", "occurred_at not UTC", "occurred_at impossible date",
    "empty device_id", "gateway_id with wildcard", "unsynced without clock", "coalesced on an event",
    "bad attachment hash", "attachment extra key",
]


@pytest.mark.parametrize("how", MUTATIONS)
def test_invalid_envelope_is_rejected(how: str) -> None:
    env = make_envelope("gateway.started")
    assert is_valid_everywhere(env, "gateway.started")
    _mutate(env, how)
    assert not is_valid_everywhere(env, "gateway.started")
    with pytest.raises(ValidationError):
        contract.validate_envelope(env)


def test_coalesced_must_be_at_least_two() -> None:
    env = make_envelope("sensor.reading")
    env["coalesced"] = 1
    assert not is_valid_everywhere(env, "sensor.reading")


def test_unknown_type_is_rejected() -> None:
    env = make_envelope("gateway.started")
    for name in ("no.such.type", "batch", "status", 7):
        env["type"] = name
        with pytest.raises(ValidationError, match="unknown event type"):
            contract.validate_envelope(env)


@pytest.mark.parametrize("events", [
    [],
    "mixed classes",
])
def test_invalid_batch_is_rejected(events: Any) -> None:
    if events == "mixed classes":
        events = [make_envelope("panic.pressed", seq=1), make_envelope("contact.changed", seq=2)]
        # each event on its own is fine
        for env in events:
            contract.validate_envelope(env)
    with pytest.raises(ValidationError):
        contract.validate_batch({"v": 1, "events": events})


def test_batch_rejects_extra_keys_and_wrong_version() -> None:
    env = make_envelope("contact.changed")
    with pytest.raises(ValidationError):
        contract.validate_batch({"v": 1, "events": [env], "extra": True})
    with pytest.raises(ValidationError):
        contract.validate_batch({"v": 2, "events": [env]})


# --- the outbox's stored wire form (coalescing and clock correction) ----------------------------

async def test_outbox_payloads_validate(tmp_path: Path) -> None:
    from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig

    clock = Clock(mode="unsynced", boot_id="boot-a")
    factory = EventFactory(REGISTRY, SITE, GATEWAY, clock)
    reading = EXAMPLES["sensor.reading"]
    async with Outbox(OutboxConfig(path=tmp_path / "outbox.db")) as outbox:
        await outbox.put(factory.make("panic.pressed", "button-1", EXAMPLES["panic.pressed"]))
        for value in (20.0, 20.5, 21.0):
            await outbox.put(factory.make("sensor.reading", "meter-1", {**reading, "value": value}))
        await outbox.put(factory.make("contact.changed", "door-1", EXAMPLES["contact.changed"]))
        await outbox.correct_clock("boot-a", lambda _mono_ns: "2025-01-01T12:00:00.000Z")
        await outbox.put(factory.make("contact.changed", "door-2", EXAMPLES["contact.changed"]))

        seen: dict[str, list[dict[str, Any]]] = {}
        while (batch := await outbox.lease(100, 1 << 20)) is not None:
            events = [orjson.loads(p) for p in batch.payloads]
            contract.validate_batch({"v": 1, "events": events})
            seen[batch.priority.label] = events
            await outbox.ack_nowait(batch)

    assert [e["type"] for e in seen["alarm"]] == ["panic.pressed"]
    assert seen["alarm"][0]["clock"]["corrected"] is True
    (telemetry,) = seen["telemetry"]
    assert telemetry["coalesced"] == 3
    assert telemetry["data"]["value"] == 21.0
    assert [e["clock_synced"] for e in seen["event"]] == [True, False]


# --- nested pydantic models: their $defs must resolve inside the envelope ------------------------

class _Kind(enum.StrEnum):
    GATE = "gate"
    FENCE = "fence"


class _Point(BaseModel):
    x: float
    y: float


class _Node(BaseModel):
    name: str
    children: list[_Node] = []


class _ZoneData(EventData):
    kind: _Kind
    corners: list[_Point]
    tree: _Node


def test_nested_data_models_are_inlined(tmp_path: Path) -> None:
    registry = EventRegistry()
    registry.register(EventType("test.zone", Priority.EVENT, _ZoneData, "A zone with nested models."))
    assert contract.write_contract(tmp_path, registry)
    schema = json.loads((tmp_path / "schemas" / "test.zone.json").read_text())
    assert {"data._Kind", "data._Point", "data._Node"} <= set(schema["$defs"])
    assert "$defs" not in schema["properties"]["data"]

    factory = EventFactory(registry, SITE, GATEWAY, Clock(mode="synced"))
    data = {"kind": "gate", "corners": [{"x": 0, "y": 0}, {"x": 1, "y": 2}],
            "tree": {"name": "root", "children": [{"name": "leaf"}]}}
    env = factory.make("test.zone", "zone-1", data).envelope(1)
    contract.validate_envelope(env, tmp_path)
    contract.validate_batch({"v": 1, "events": [env]}, tmp_path)

    bad = copy.deepcopy(env)
    bad["data"]["tree"]["children"][0]["name"] = 5
    with pytest.raises(ValidationError):
        contract.validate_envelope(bad, tmp_path)
    bad = copy.deepcopy(env)
    bad["data"]["kind"] = "wall"
    with pytest.raises(ValidationError):
        contract.validate_envelope(bad, tmp_path)


# --- generated files are current and deterministic ----------------------------------------------

def test_committed_contract_is_current() -> None:
    assert contract.stale_files() == []
    assert contract.main(["--check"]) == 0


def test_generation_is_deterministic() -> None:
    assert contract.render_contract() == contract.render_contract()


def test_check_names_stale_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert contract.main(["--write", "--dir", str(tmp_path)]) == 0
    assert contract.main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "schemas" / "status.json").write_text("{}\n")
    (tmp_path / "schemas" / "gone.type.json").write_text("{}\n")
    (tmp_path / "asyncapi.yaml").unlink()
    capsys.readouterr()
    assert contract.main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    for name in ("schemas/status.json", "schemas/gone.type.json", "asyncapi.yaml"):
        assert name in err
    assert contract.stale_files(tmp_path) == ["asyncapi.yaml", "schemas/gone.type.json",
                                              "schemas/status.json"]
    assert contract.main(["--write", "--dir", str(tmp_path)]) == 0
    assert contract.stale_files(tmp_path) == []
    assert not (tmp_path / "schemas" / "gone.type.json").exists()


# --- status and commands ------------------------------------------------------------------------

STATUS = {"v": 1, "state": "online", "reason": "connected", "site_id": SITE, "gateway_id": GATEWAY,
          "version": "0.1.0", "at": "2025-01-01T12:00:00.000Z"}


def test_status_and_will_validate() -> None:
    contract.validate_status(STATUS)
    contract.validate_status({**STATUS, "state": "offline", "reason": "connection lost"})
    for bad in ({**STATUS, "state": "away"}, {**STATUS, "at": "yesterday"}, {**STATUS, "x": 1},
                {k: v for k, v in STATUS.items() if k != "version"}):
        with pytest.raises(ValidationError):
            contract.validate_status(bad)


def _signed_request(body: dict[str, Any]) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    text = json.dumps(body)
    sig = Ed25519PrivateKey.generate().sign((contract.COMMAND_SIGNATURE_CONTEXT + text).encode("utf-8"))
    return {"v": 1, "kid": "platform-1", "body": text, "sig": base64.b64encode(sig).decode("ascii")}


BODY = {"id": "cmd-0001", "site_id": SITE, "gateway_id": GATEWAY, "command": "gate.open",
        "args": {"gate": "main"}, "issued_at": "2025-01-01T12:00:00Z",
        "expires_at": "2025-01-01T12:01:00+00:00", "nonce": "0123456789abcdef", "issuer": "guard-desk"}


def test_command_request_validates() -> None:
    contract.validate_command_request(_signed_request(BODY))


@pytest.mark.parametrize(("field", "value"), [
    ("command", "open"), ("nonce", "short"), ("id", ""), ("id", "x" * 65), ("expires_at", "soon"),
    ("args", []), ("extra", 1),
])
def test_bad_command_body_is_rejected(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        contract.validate_command_request(_signed_request({**BODY, field: value}))


def test_bad_command_request_is_rejected() -> None:
    good = _signed_request(BODY)
    for bad in ({**good, "sig": "not base64!"}, {**good, "sig": good["sig"][:-4]}, {**good, "v": 2},
                {k: v for k, v in good.items() if k != "kid"}, {**good, "body": "{not json"}):
        with pytest.raises(ValidationError):
            contract.validate_command_request(bad)


def test_command_results() -> None:
    ok = {"v": 1, "command_id": "cmd-0001", "ok": True, "status": "executed", "result": {"opened": True},
          "error": None, "at": "2025-01-01T12:00:00.412Z"}
    contract.validate_command_result(ok)
    for code in contract.COMMAND_ERROR_CODES:
        contract.validate_command_result({**ok, "command_id": None, "ok": False, "status": "rejected",
                                          "result": None, "error": {"code": code, "message": "no"}})
    for bad in ({**ok, "status": "failed"}, {**ok, "error": {"code": "busy", "message": "busy"}},
                {**ok, "ok": False}, {**ok, "ok": False, "status": "rejected",
                                       "error": {"code": "nope", "message": "?"}},
                {**ok, "result": []}, {k: v for k, v in ok.items() if k != "at"}):
        with pytest.raises(ValidationError):
            contract.validate_command_result(bad)


# --- the AsyncAPI document ----------------------------------------------------------------------

ASYNCAPI_PATH = contract.CONTRACT_DIR / contract.ASYNCAPI_FILE


def _asyncapi() -> dict[str, Any]:
    doc = YAML(typ="safe").load(ASYNCAPI_PATH.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _pointer(doc: Any, fragment: str) -> Any:
    node = doc
    for raw in [p for p in fragment.split("/") if p]:
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def test_asyncapi_document_shape() -> None:
    doc = _asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    addresses = {name: ch["address"] for name, ch in doc["channels"].items()}
    assert addresses == {
        "events": "{prefix}/{site_id}/{gateway_id}/events/{priority}",
        "status": "{prefix}/{site_id}/{gateway_id}/status",
        "commandRequests": "{prefix}/{site_id}/{gateway_id}/cmd/req",
        "commandResults": "{prefix}/{site_id}/{gateway_id}/cmd/res",
    }
    params = doc["components"]["parameters"]
    assert params["prefix"]["default"] == "edgeagent/v1"
    assert params["priority"]["enum"] == [p.label for p in Priority]
    for name, channel in doc["channels"].items():
        in_address = {p.strip("{}") for p in channel["address"].split("/") if p.startswith("{")}
        assert set(channel["parameters"]) == in_address, name
    ops = doc["operations"]
    assert ops["sendStatus"]["bindings"]["mqtt"] == {"qos": 1, "retain": True, "bindingVersion": "0.2.0"}
    assert ops["receiveCommands"]["action"] == "receive"
    assert all(op["bindings"]["mqtt"]["qos"] == 1 for op in ops.values())
    # Every registered type is listed in the schema catalogue.
    assert set(REGISTERED) <= set(doc["components"]["schemas"])


def test_every_asyncapi_ref_resolves() -> None:
    doc = _asyncapi()
    refs = _refs(doc)
    assert len(refs) > 20
    for ref in refs:
        target, _, fragment = ref.partition("#")
        if target:
            path = ASYNCAPI_PATH.parent / target
            assert path.is_file(), ref
            resolved = _pointer(json.loads(path.read_text(encoding="utf-8")), fragment)
        else:
            resolved = _pointer(doc, fragment)
        assert resolved is not None, ref


def test_every_schema_ref_resolves() -> None:
    # jsonschema resolves lazily, so a dangling $ref in an unused branch would go unnoticed.
    schemas = [json.loads(p.read_text(encoding="utf-8"))
               for p in sorted((contract.CONTRACT_DIR / "schemas").glob("*.json"))]
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas)
    n = 0
    for schema in schemas:
        resolver = registry.resolver(base_uri=schema["$id"])
        for ref in _refs(schema):
            assert resolver.lookup(ref).contents is not None, (schema["$id"], ref)
            n += 1
    assert n > len(REGISTERED)


def test_asyncapi_examples_fit_their_payload_schemas() -> None:
    doc = _asyncapi()
    checks = {"status.json": contract.validate_status,
              "command-request.json": contract.validate_command_request,  # body checked as well
              "command-result.json": contract.validate_command_result}
    n = 0
    for message in doc["components"]["messages"].values():
        file_name = message["payload"]["$ref"].rsplit("/", 1)[-1]
        for example in message.get("examples", []):
            checks[file_name](example["payload"])
            n += 1
    assert n >= 5
