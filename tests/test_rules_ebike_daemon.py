"""The e-bike lift blocker in the running daemon: a lift car camera (the demo's clip, played through the real
stream reader, detector and tracker) and the car's relay module on a real pymodbus server. The motorcycle
wheeled into the car holds the door and announces (relay writes), raises one ``ebike_in_lift`` alarm about the
car with a snapshot, and lets go when it is wheeled out; a guard's acknowledgement releases the lift; a person
alone never triggers it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.app import Daemon
from edgeagent.capabilities import Config
from edgeagent.drivers.modbus.profile import shipped_profile
from edgeagent.drivers.modbus.sim import ProfileSimulator
from tests import synth_scenes
from tests.helpers import running_daemon, wait_until
from tests.peers import free_port

RELAY = shipped_profile("relay-io-8ch")
LIFT_CLIP = Path(__file__).resolve().parents[1] / "drivers" / "sim" / "media" / "lift.mp4"
DOOR = ("ch1_relay", True)
DOOR_OFF = ("ch1_relay", False)
VOICE = ("ch2_relay", True)


@pytest.fixture(scope="module")
def person_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lift") / "person.mp4"
    synth_scenes.write_clip(synth_scenes.lift_frames("person", move_s=2.5), path)  # a walk, not a dash
    return path


def config(tmp_path: Path, port: int, clip: Path, **rule: Any) -> Config:
    return Config.model_validate({
        "version": 1, "site_id": "site-1", "gateway_id": "gw-1", "state_dir": str(tmp_path / "state"),
        "clock": {"sync": "synced"}, "health": {"enabled": False},
        "modbus": {"buses": {"lan": {"kind": "tcp", "host": "127.0.0.1", "port": port, "timeout_s": 0.3,
                                     "backoff_base_s": 0.1, "backoff_cap_s": 0.3, "reconnect_cap_s": 0.3}}},
        "cameras": {"privacy": {"enabled": False}},
        "devices": [
            {"type": "modbus.relay", "id": "lift-io", "bus": "lan", "unit_id": 3, "poll_interval_s": 0.2,
             "channels": {1: "door_hold", 2: "announce"}},
            {"type": "camera", "id": "lift-2", "name": "Building 3 lift 2", "rtsp": {"detect_url": clip.as_uri()},
             "detect": {"fps": 5, "classes": ["person"]}, "snapshots_from": "detect",
             "zones": [{"name": "car", "points": [list(p) for p in synth_scenes.LIFT_FLOOR]}],
             "ebike_lift": {"zone": "car", "door_hold": "door_hold", "announce": "announce", **rule}},
        ],
    })


class Relay(ProfileSimulator):
    """The lift's relay module (unit 3) on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        super().__init__({3: RELAY}, port=self.port)


@pytest.fixture
def relay() -> Iterator[Relay]:
    yield Relay()


def released(relay: Relay) -> bool:
    """The door hold went off after it was held (the runner also switches it off once at start)."""
    writes = relay[3].writes
    return DOOR in writes and DOOR_OFF in writes[writes.index(DOOR):]


def _alarms(run: Any, kind: str = "alarm.raised") -> list[Any]:
    return [e for e in run.of(kind) if e.data.get("kind") == "ebike_in_lift"]


async def test_motorcycle_in_the_car_holds_the_door_once_and_releases_when_it_leaves(
        tmp_path: Path, relay: Relay) -> None:
    async with relay:
        daemon = Daemon(config(tmp_path, relay.port, LIFT_CLIP))
        async with running_daemon(daemon) as run:
            assert await wait_until(lambda: DOOR in relay[3].writes, 15), relay[3].writes
            assert await wait_until(lambda: VOICE in relay[3].writes, 10)
            ebike = daemon.capability("cameras").service.runners["lift-2"].ebike  # type: ignore[union-attr]
            assert ebike.core.door_held
            assert await wait_until(lambda: _alarms(run), 10)
            raised = _alarms(run)[0]
            assert raised.data["place"] == "Building 3 lift 2" and raised.device_id == "lift-2"
            assert raised.data["details"]["label"] == "motorcycle"
            assert raised.attachments and raised.attachments[0].kind == "snapshot"
            # wheeled out: the door and the voice go off, the alarm resolves as seen leaving
            assert await wait_until(lambda: released(relay), 15), relay[3].writes
            assert ("ch2_relay", False) in relay[3].writes[relay[3].writes.index(DOOR):]
            assert await wait_until(lambda: _alarms(run, "alarm.resolved"), 10)
            resolved = _alarms(run, "alarm.resolved")[0]
            assert resolved.data["via"] == "auto" and resolved.data["alarm_id"] == raised.data["alarm_id"]
            assert len(_alarms(run)) == 1 and relay[3].writes.count(DOOR) == 1  # once, not once a frame
            assert ebike.counts["alarm_failures"] == 0


@pytest.mark.parametrize("action", ["ack", "resolve"])
async def test_a_guard_acknowledging_the_alarm_releases_the_lift(tmp_path: Path, relay: Relay, action: str) -> None:
    async with relay:
        daemon = Daemon(config(tmp_path, relay.port, LIFT_CLIP))
        async with running_daemon(daemon) as run:
            assert await wait_until(lambda: _alarms(run), 20)
            alarm_id = _alarms(run)[0].data["alarm_id"]
            if action == "ack":
                await daemon.alarms.ack(alarm_id, "guard Li", "cli")
            else:
                await daemon.alarms.resolve(alarm_id, "guard Li", "cli", "took the bike out myself")
            assert await wait_until(lambda: released(relay), 10), relay[3].writes
            assert await wait_until(lambda: _alarms(run, "alarm.resolved"), 10)
            resolved = _alarms(run, "alarm.resolved")[0]
            assert resolved.data["by"] == "guard Li" and resolved.data["alarm_id"] == alarm_id
            ebike = daemon.capability("cameras").service.runners["lift-2"].ebike  # type: ignore[union-attr]
            assert ebike.counts["guard_releases"] == 1 and not ebike.core.door_held
            assert ebike.counts["alarm_failures"] == 0  # a resolved alarm is not resolved twice


async def test_a_person_alone_never_holds_the_door(tmp_path: Path, relay: Relay, person_clip: Path) -> None:
    async with relay:
        daemon = Daemon(config(tmp_path, relay.port, person_clip))
        async with running_daemon(daemon) as run:
            cams = daemon.capability("cameras").service  # type: ignore[union-attr]
            # the whole clip: in, standing in the car, out
            assert await wait_until(lambda: cams.runners["lift-2"].pipeline.stats.ticks >= 50, 25)
            people = [e for e in run.of("camera.object", "lift-2") if e.data["label"] == "person"]
            assert people, "the person was not even seen: the test would prove nothing"
            assert DOOR not in relay[3].writes and not _alarms(run)


async def test_the_door_is_never_held_past_max_hold(tmp_path: Path, relay: Relay) -> None:
    """Fire safety: the door lets go after max_hold_s although the bike still stands there; the alarm stays open
    (the bike is still in the car) until it is seen to leave."""
    async with relay:
        daemon = Daemon(config(tmp_path, relay.port, LIFT_CLIP, max_hold_s=1.0))
        async with running_daemon(daemon) as run:
            assert await wait_until(lambda: DOOR in relay[3].writes, 15), relay[3].writes
            ebike = daemon.capability("cameras").service.runners["lift-2"].ebike  # type: ignore[union-attr]
            assert await wait_until(lambda: released(relay), 10), relay[3].writes
            assert ebike.core.alarm_open and ebike.core.stats()["max_hold"] == 1
            assert ebike.core.stats()["left"] == 0  # the bike was still there when the door let go
            assert not _alarms(run, "alarm.resolved")
            assert await wait_until(lambda: _alarms(run, "alarm.resolved"), 15)  # then wheeled out
            assert relay[3].writes.count(DOOR) == 1  # not held again in the same episode


async def test_after_a_restart_the_door_is_let_go_and_a_stale_alarm_resolved(tmp_path: Path, relay: Relay) -> None:
    """A daemon killed while the door was held: the relay module keeps the door held, and the alarm is restored.
    The next start switches the door off, and the restored alarm, with no bike seen since, is resolved."""
    staying = tmp_path / "staying.mp4"  # the bike stays: its alarm is open when the first daemon stops
    synth_scenes.write_clip(synth_scenes.lift_frames("motorcycle", stay_s=10), staying)
    async with relay:
        first = Daemon(config(tmp_path, relay.port, staying))
        async with running_daemon(first) as run:
            assert await wait_until(lambda: _alarms(run), 20)
            alarm_id = _alarms(run)[0].data["alarm_id"]
        relay[3].set("ch1_relay", True)  # as the crash left it
        relay[3].writes.clear()
        empty = tmp_path / "empty.mp4"
        synth_scenes.write_clip(synth_scenes.lift_frames("motorcycle", stay_s=0, move_s=0, empty_s=1), empty)
        second = Daemon(config(tmp_path, relay.port, empty))
        ebike = second.capability("cameras").service.runners["lift-2"].ebike  # type: ignore[union-attr]
        ebike.restored_grace_s = 3.0  # the stream is back and sees no bike well within it
        async with running_daemon(second) as run2:
            # Restored: still open, or (on a slow start, the 3 s grace already over) resolved below by its id.
            assert [a.id for a in second.alarms.active("ebike_in_lift")] in ([alarm_id], [])
            assert await wait_until(lambda: DOOR_OFF in relay[3].writes, 10), relay[3].writes
            assert not relay[3].get("ch1_relay")
            assert await wait_until(lambda: _alarms(run2, "alarm.resolved"), 10)
            resolved = _alarms(run2, "alarm.resolved")[0].data
            assert resolved["alarm_id"] == alarm_id and resolved["via"] == "auto"
            assert await wait_until(lambda: ebike.counts["alarms_resolved"] == 1, 5)  # counted once resolve returns
