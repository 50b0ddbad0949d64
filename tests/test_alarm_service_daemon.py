"""The alarm lifecycle as a daemon service for a capability that is not the wristbands: a test capability
declares a place kind in its spec alone, raises it with a snapshot; the siren on a real pymodbus relay module
switches on, the guard acknowledges through the CLI (the local ``alarm`` action over the control socket), the
siren goes off, and the alarm.* events reach a real mosquitto (the uplink) with ``place`` set."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgeagent.app import Daemon
from edgeagent.capabilities import CAPABILITIES, assemble
from edgeagent.drivers.modbus.profile import shipped_profile
from edgeagent.drivers.modbus.sim import ProfileSimulator
from edgeagent.kernel.alarms.engine import Alarm
from edgeagent.kernel.alarms.kinds import AlarmKindSpec, KindPolicy
from edgeagent.kernel.capability import Capability, CapabilityContext, CapabilitySpec
from edgeagent.kernel.config.schema import DeviceBase, load_config
from edgeagent.kernel.pipeline.events import Attachment
from tests.helpers import config_head, running_daemon, wait_until
from tests.peers import Collector, Mosquitto, free_port

KIND = "test_lift_ebike"
SNAP = Attachment("snapshot", "cd" * 32, "image/jpeg", 51_200)


class Lifts(Capability):
    """A rule of a capability other than the wristbands: it only raises its own place alarm."""

    name = "test-lifts"

    def __init__(self, ctx: CapabilityContext) -> None:
        self.ctx = ctx

    async def seen_ebike(self, car: str, camera: str) -> Alarm:
        return await self.ctx.alarms.raise_(KIND, car, camera, {"label": "motorcycle", "score": 0.88}, place=True,
                                            attachments=[SNAP])


built: list[Lifts] = []


def _build(_section: None, _devices: Sequence[DeviceBase], ctx: CapabilityContext) -> Capability:
    built.append(Lifts(ctx))
    return built[-1]


LIFTS: CapabilitySpec[Any] = CapabilitySpec(
    name="test-lifts", build=_build,
    alarm_kinds=(AlarmKindSpec(KIND, "E-bike in a lift car (test)", subject="place",
                               policy=KindPolicy("high", ("siren",), repeat_s=60, escalate_after_s=(300,))),))
SPECS = (*CAPABILITIES, LIFTS)


def write_config(path: Path, state: Path, broker_port: int, modbus_port: int) -> None:
    path.write_text(config_head(state) + f"""\
uplink: {{broker: "mqtt://127.0.0.1:{broker_port}", retry: {{first_max_s: 0.2, short_cap_s: 0.5}}}}
modbus:
  buses:
    lan: {{kind: tcp, host: 127.0.0.1, port: {modbus_port}, timeout_s: 0.3}}
devices:
  - {{type: modbus.relay, id: guard-io, bus: lan, unit_id: 3, channels: {{1: siren}}, poll_interval_s: 0.2}}
""")


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeagent", *args, "--config", str(cfg)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "250"})


async def test_a_capabilitys_place_alarm_sounds_is_acknowledged_locally_and_reaches_the_cloud(
        tmp_path: Path, broker: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    modbus_port = free_port()
    sim = ProfileSimulator({3: shipped_profile("relay-io-8ch")}, port=modbus_port)
    cfg_path = tmp_path / "edgeagent.yaml"
    write_config(cfg_path, tmp_path / "state", broker.port, modbus_port)
    cloud = Collector(broker.port, topic="edgeagent/#").start()
    try:
        async with sim:
            daemon = Daemon(load_config(cfg_path, assemble(SPECS)), config_dir=tmp_path, capabilities=SPECS)
            lifts = built[-1]
            async with running_daemon(daemon) as run:
                alarm = await lifts.seen_ebike("lift-2 car", "cam-lift2")
                again = await lifts.seen_ebike("lift-2 car", "cam-lift2")  # the same bike, seen again: folds
                assert again.id == alarm.id and again.count == 2
                assert (alarm.place, alarm.resident_id, alarm.kind) == ("lift-2 car", None, KIND)
                # No wristbands and no notifiers: the site is still told that nobody is notified.
                unserved = [r.getMessage() for r in caplog.records
                            if "alarm targets with no notifier" in r.getMessage()]
                assert unserved and "test-lifts" in unserved[0] and "guard_room" in unserved[0], unserved
                assert await wait_until(lambda: sim[3].get("ch1_relay") is True, 5), "siren not switched on"

                listed = await asyncio.to_thread(cli, cfg_path, "alarms", "list")
                assert listed.returncode == 0, listed.stderr
                assert "place lift-2 car" in listed.stdout and KIND in listed.stdout and "cam-lift2" in listed.stdout
                assert "snapshot cdcdcdcdcdcd" in listed.stdout, listed.stdout

                acked = await asyncio.to_thread(cli, cfg_path, "alarms", "ack", alarm.id, "--by", "guard-7")
                assert acked.returncode == 0, acked.stderr
                assert await wait_until(lambda: sim[3].get("ch1_relay") is False, 5), "siren still on after ack"
                # The capability's own rule closes it when the bike has left.
                await lifts.ctx.alarms.resolve(alarm.id, "lift-rule", "rule", "the e-bike left the car")
                assert daemon.alarms.active(KIND) == []
                local = [e for e in run.seen if e.type.startswith("alarm.")]
                assert [e.type for e in local] == ["alarm.raised", "alarm.notified", "alarm.acknowledged",
                                                   "alarm.resolved"]

                def arrived(c: Collector) -> bool:
                    return sum(1 for e in c.events if str(e["type"]).startswith("alarm.")) == 4

                assert await asyncio.to_thread(cloud.wait_for, arrived, 20), [e["type"] for e in cloud.events]
        alarms = [e for e in cloud.events if str(e["type"]).startswith("alarm.")]
        for e in alarms:
            data: Any = e["data"]
            assert data["place"] == "lift-2 car" and "resident_id" not in data and data["kind"] == KIND
            assert e["priority"] == "alarm" and e["device_id"] == "cam-lift2"
        raised, _notified, ack, resolved = alarms
        assert raised["attachments"] == [SNAP.to_dict()]
        assert (ack["data"]["by"], ack["data"]["via"]) == ("guard-7", "cli")  # type: ignore[index]
        assert str(ack["data"]["caller"]).endswith(f"({os.getuid()})")  # type: ignore[index]
        assert (resolved["data"]["by"], resolved["data"]["via"]) == ("lift-rule", "rule")  # type: ignore[index]
        assert orjson.dumps(alarms)  # JSON as it travelled
    finally:
        cloud.stop()
