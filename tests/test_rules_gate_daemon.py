"""The car gate in the running daemon: a gate camera playing synthetic plates (the demo's clip, through the real
stream reader, detector, tracker, plate detector and reader on the shared engine) and the barrier on a real
pymodbus server. A resident's car opens the gate (the open trigger written, audited as a plate match by the box
itself, the plate in no event); a visitor's raises gate.visitor with its plate and a snapshot and opens nothing;
a resident whose entry has expired is a visitor too."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edgeagent.app import Daemon
from edgeagent.capabilities import Config
from edgeagent.drivers.camera.rules.plate_list import PlateList, plates_path
from edgeagent.drivers.modbus.profile import shipped_profile
from edgeagent.drivers.modbus.sim import ProfileSimulator, gate_mechanics
from edgeagent.kernel.errors import ConfigError
from tests import synth_scenes
from tests.helpers import running_daemon, wait_until
from tests.peers import free_port

GATE = shipped_profile("barrier-gate-generic")
GATE_CLIP = Path(__file__).resolve().parents[1] / "drivers" / "sim" / "media" / "gate.mp4"
OPEN = ("open_trigger", True)
RESIDENT, VISITOR = synth_scenes.RESIDENT_PLATE, synth_scenes.VISITOR_PLATE


class Barrier(ProfileSimulator):
    """The car gate (unit 1) on a free loopback port, its arm moving when triggered."""

    def __init__(self) -> None:
        self.port = free_port()
        super().__init__({1: GATE}, port=self.port)
        self[1].on_write.append(gate_mechanics)
        self[1].set("state", "closed")


@pytest.fixture
def barrier() -> Iterator[Barrier]:
    yield Barrier()


@pytest.fixture(scope="module")
def resident_only_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gate") / "resident.mp4"
    synth_scenes.write_clip(synth_scenes.gate_frames((RESIDENT,), empty_s=0.6), path)
    return path


def config(tmp_path: Path, port: int, clip: Path) -> Config:
    return Config.model_validate({
        "version": 1, "site_id": "site-1", "gateway_id": "gw-1", "state_dir": str(tmp_path / "state"),
        "clock": {"sync": "synced"}, "health": {"enabled": False},
        "modbus": {"buses": {"lan": {"kind": "tcp", "host": "127.0.0.1", "port": port, "timeout_s": 0.3,
                                     "backoff_base_s": 0.1, "backoff_cap_s": 0.3, "reconnect_cap_s": 0.3}}},
        "cameras": {"privacy": {"enabled": False}},
        "devices": [
            {"type": "modbus.gate", "id": "car-gate", "bus": "lan", "unit_id": 1, "poll_interval_s": 0.2},
            {"type": "camera", "id": "gate-cam", "rtsp": {"detect_url": clip.as_uri()}, "snapshots_from": "detect",
             "detect": {"fps": 5, "classes": ["person"], "min_score": 0.3},
             "zones": [{"name": "lane", "points": [list(p) for p in synth_scenes.GATE_LANE]}],
             "gate": {"zone": "lane", "open": "car-gate"}},
        ],
    })


def listed(tmp_path: Path, **validity: Any) -> None:
    with PlateList(plates_path(tmp_path / "state")) as plates:
        plates.add(RESIDENT, ref="3-1-502", reason="resident", **validity)


def _plates_in(events: list[Any]) -> str:
    return " ".join(str(e.data) for e in events)


async def test_a_resident_opens_the_gate_and_a_visitor_is_announced(tmp_path: Path, barrier: Barrier) -> None:
    listed(tmp_path)
    async with barrier:
        daemon = Daemon(config(tmp_path, barrier.port, GATE_CLIP))
        async with running_daemon(daemon) as run:
            gate = daemon.capability("cameras").service.runners["gate-cam"].gate  # type: ignore[union-attr]
            assert await wait_until(lambda: run.of("gate.commanded", "car-gate"), 15), str(
                (gate.stats(), [(e.type, e.data) for e in run.seen if e.type.startswith(("camera.", "gate."))]))
            audit = run.of("gate.commanded", "car-gate")[0].data
            assert (audit["command"], audit["reason"], audit["via"], audit["outcome"]) == \
                ("open", "plate_match", "local", "executed")
            assert audit["by"].startswith("rule:plate:gate-cam#")
            assert OPEN in barrier[1].writes
            assert await wait_until(lambda: run.of("gate.opened", "car-gate"), 5)
            # then the visitor: announced with the plate and a snapshot, the gate left alone
            assert await wait_until(lambda: run.of("gate.visitor", "gate-cam"), 15), (
                str((gate.stats(), [(e.type, e.data) for e in run.seen if e.type.startswith("camera.")])))
            visitor = run.of("gate.visitor", "gate-cam")[0]
            assert visitor.data["plate"] == VISITOR and visitor.data["reason"] == "not_in_list"
            assert visitor.data["confidence"] >= 0.8
            assert visitor.attachments and visitor.attachments[0].kind == "snapshot"
            assert barrier[1].writes.count(OPEN) == 1 and len(run.of("gate.commanded")) == 1
            # the resident's plate is in no event
            assert RESIDENT not in _plates_in(run.seen)
            assert gate.counts["opens"] == 1 and gate.counts["open_failed"] == 0
            assert gate.counts["second_opinions"] > 0  # the general text reader read the crops too
            assert gate.stats()["decision_ms_p99"] is not None and gate.stats()["reads_in_flight"] <= 2


async def test_an_expired_entry_does_not_open(tmp_path: Path, barrier: Barrier, resident_only_clip: Path) -> None:
    now = datetime.now(UTC)
    listed(tmp_path, valid_from=now - timedelta(days=30), valid_until=now - timedelta(days=1))
    async with barrier:
        daemon = Daemon(config(tmp_path, barrier.port, resident_only_clip))
        async with running_daemon(daemon) as run:
            gate = daemon.capability("cameras").service.runners["gate-cam"].gate  # type: ignore[union-attr]
            assert await wait_until(lambda: run.of("gate.visitor", "gate-cam"), 15), (
                str((gate.stats(), [(e.type, e.data) for e in run.seen if e.type.startswith("camera.")])))
            visitor = run.of("gate.visitor", "gate-cam")[0].data
            assert visitor["plate"] == RESIDENT and visitor["reason"] == "entry_expired"
            assert OPEN not in barrier[1].writes and not run.of("gate.commanded")


def _check(cam: dict[str, Any], *extra: dict[str, Any]) -> list[str]:
    cfg = Config.model_validate({
        "version": 1, "site_id": "s", "gateway_id": "g", "state_dir": "/tmp/unused",
        "modbus": {"buses": {"lan": {"kind": "tcp", "host": "127.0.0.1", "port": 502}}},
        "devices": [{"type": "camera", "id": "cam", "rtsp": {"detect_url": "file:///clip.mp4"},
                     "zones": [{"name": "lane", "points": [[0, 0], [1, 0], [1, 1]]}], **cam}, *extra]})
    return [f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in cfg.cross_checks()]


def test_rule_config_names_what_is_wrong() -> None:
    relay = {"type": "modbus.relay", "id": "lift-io", "bus": "lan", "unit_id": 3, "channels": {1: "door_hold"}}
    gate = {"type": "modbus.gate", "id": "car-gate", "bus": "lan", "unit_id": 1}
    assert _check({"gate": {"zone": "lane", "open": "car-gate"}}, gate) == []
    assert _check({"gate": {"zone": "lane", "open": "lift-io.door_hold"}}, relay) == []  # an output opens it
    (issue,) = _check({"gate": {"zone": "lane", "open": "north-gate"}}, gate)
    assert issue.startswith("devices.0.gate.open: 'north-gate' is neither a Modbus gate (gates: car-gate)")
    (issue,) = _check({"gate": {"zone": "lane", "open": "car-gate", "second_opinion": "no-such-ocr"}}, gate)
    assert "devices.0.gate.second_opinion: no model manifest 'no-such-ocr'" in issue
    (issue,) = _check({"ebike_lift": {"zone": "lane", "door_hold": "door_hld"}}, relay)
    assert issue.startswith("devices.0.ebike_lift.door_hold: no output 'door_hld'") and "lift-io.door_hold" in issue
    with pytest.raises(ValueError, match=r"gate\.zone: no zone 'gate-lane' on this camera \(zones: lane\)"):
        _check({"gate": {"zone": "gate-lane", "open": "car-gate"}}, gate)
    # the classes a rule needs are tracked even when detect.classes leaves them out
    cfg = Config.model_validate({
        "version": 1, "site_id": "s", "gateway_id": "g", "state_dir": "/tmp/unused",
        "devices": [{"type": "camera", "id": "cam", "rtsp": {"detect_url": "file:///clip.mp4"},
                     "detect": {"classes": ["person"]}, "zones": [{"name": "car", "points": [[0, 0], [1, 0], [1, 1]]}],
                     "ebike_lift": {"zone": "car", "door_hold": "x"}}]})
    assert cfg.devices[0].detect.classes == ["person", "bicycle", "motorcycle"]  # type: ignore[attr-defined]


async def test_the_cameras_own_relay_opens_and_its_call_button_rings(tmp_path: Path, resident_only_clip: Path) -> None:
    """A plate camera that opens the barrier itself (its ONVIF relay, the project's SOAP peer) and whose
    digital input is the driver's call button."""
    from tests.onvif_peer import OnvifFixture

    listed(tmp_path)
    secret = tmp_path / "cam.pass"
    secret.write_text("s3cret-pw")
    async with OnvifFixture() as fixture:
        cfg = Config.model_validate({
            "version": 1, "site_id": "site-1", "gateway_id": "gw-1", "state_dir": str(tmp_path / "state"),
            "clock": {"sync": "synced"}, "health": {"enabled": False}, "cameras": {"privacy": {"enabled": False}},
            "devices": [
                {"type": "camera", "id": "gate-cam", "username": "admin", "password": {"file": str(secret)},
                 "onvif": {"host": "127.0.0.1", "port": fixture.port, "inputs": {"DigitalInputToken_1": "call_button"},
                           "relays": {"barrier": "RelayOutputToken_1"}},
                 "rtsp": {"detect_url": resident_only_clip.as_uri()}, "snapshots_from": "detect",
                 "detect": {"fps": 5, "min_score": 0.3},
                 "zones": [{"name": "lane", "points": [list(p) for p in synth_scenes.GATE_LANE]}],
                 "gate": {"zone": "lane", "open": "gate-cam.barrier", "relay_pulse_s": 0.3}}]})
        daemon = Daemon(cfg)
        async with running_daemon(daemon) as run:
            assert await wait_until(lambda: run.of("gate.commanded", "gate-cam"), 15)
            audit = run.of("gate.commanded", "gate-cam")[0].data
            assert (audit["reason"], audit["via"], audit["outcome"]) == ("plate_match", "local", "executed")
            assert "output gate-cam.barrier" in audit["note"]
            assert ("RelayOutputToken_1", "active") in fixture.relay_log
            assert await wait_until(lambda: ("RelayOutputToken_1", "inactive") in fixture.relay_log, 5)  # a pulse
            runner = daemon.capability("cameras").service.runners["gate-cam"]  # type: ignore[union-attr]
            assert await wait_until(lambda: runner.onvif is not None and fixture.calls["PullMessages"] >= 1, 15)
            fixture.push_digital_input(True)
            assert await wait_until(lambda: run.of("gate.call", "gate-cam"), 10)
            assert run.of("gate.call", "gate-cam")[0].data == {"gate": "gate-cam.barrier", "source": "camera",
                                                               "zone": "lane"}


async def test_a_gate_model_that_cannot_run_refuses_the_start_naming_the_setting(tmp_path: Path) -> None:
    """The site's ppocr_rec (the gate's second opinion) has lost its model file: the daemon does not start (rather
    than failing every plate read once running), and says which camera's setting needs it."""
    site = tmp_path / "site-models"
    site.mkdir()
    manifest = (Path(__file__).resolve().parents[1] / "models" / "ppocr_rec.yaml").read_text()
    labels = Path(__file__).resolve().parents[1] / "models" / "ppocr_keys.txt"
    (site / "ppocr_rec.yaml").write_text(manifest.replace("{file: ppocr_keys.txt}", f"{{file: {labels}}}"))
    cfg = config(tmp_path, free_port(), GATE_CLIP).model_dump(mode="json", exclude_unset=True)
    cfg["cameras"]["model_dirs"] = [str(site)]
    assert Config.model_validate(cfg).cross_checks() == []  # the manifest is there: only its file is missing
    with pytest.raises(ConfigError, match=r"camera gate-cam: gate\.second_opinion names model 'ppocr_rec', "
                                          r"which cannot run: .*ppocr_rec\.onnx does not exist"):
        async with running_daemon(Daemon(Config.model_validate(cfg)), exit_code=None):
            pass
