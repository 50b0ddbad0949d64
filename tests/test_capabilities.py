"""The capability interface: a new capability plugs in through its spec alone (config section, device
types, tasks, commands, outputs, local actions, status, probes, doctor), and every configured device is
claimed by exactly one running capability or the config is refused."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import Field

from edgeagent.app import Daemon
from edgeagent.capabilities import CAPABILITIES, DEVICE_TYPES, PROBES, assemble
from edgeagent.kernel.capability import (
    Capability,
    CapabilityContext,
    CapabilitySpec,
    DoctorCheck,
    LocalAction,
    TaskSpec,
)
from edgeagent.kernel.config.base import Strict
from edgeagent.kernel.config.schema import DeviceBase, parse_yaml, validate_doc
from edgeagent.kernel.errors import ConfigError
from edgeagent.kernel.pipeline.commands import CommandSpec
from edgeagent.kernel.pipeline.event_types import CONTACT_CHANGED
from tests.helpers import config_head, running_daemon, wait_until


class CameraSection(Strict):
    detector: str = "nanodet"


class CameraConfig(DeviceBase):
    type: Literal["test.camera"]
    url: str = Field(pattern=r"^rtsp://")


class Lamp:
    def __init__(self) -> None:
        self.states: list[bool] = []

    async def set(self, on: bool) -> None:
        self.states.append(on)


class Cameras(Capability):
    name = "test-cameras"

    def __init__(self, section: CameraSection, devices: Sequence[DeviceBase], ctx: CapabilityContext) -> None:
        self.section = section
        self.devices = [d for d in devices if d.enabled]
        self.ctx = ctx
        self.lamp = Lamp()
        self.entered = self.exited = False
        self.frames = 0

    async def __aenter__(self) -> Cameras:
        self.entered = True
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.exited = True

    def claimed_devices(self) -> Sequence[str]:
        return [d.id for d in self.devices]

    def tasks(self) -> Sequence[TaskSpec]:
        async def ingest() -> None:
            while True:
                self.frames += 1
                await self.ctx.sink.emit(CONTACT_CHANGED.name, self.devices[0].id, {"state": "open",
                                                                                   "contact": "motion"})
                await asyncio.sleep(0.05)
        return [TaskSpec(f"device:{self.devices[0].id}", ingest)]

    def commands(self) -> Sequence[CommandSpec]:
        async def snapshot(_args: Mapping[str, Any]) -> Mapping[str, Any]:
            return {"frames": self.frames}
        return [CommandSpec("camera.snapshot", snapshot, description="a snapshot")]

    def outputs(self) -> Mapping[str, Any]:
        return {"camera_relay": self.lamp}

    def local_actions(self) -> Mapping[str, LocalAction]:
        async def frames(_args: Mapping[str, Any], who: str) -> Mapping[str, Any]:
            return {"frames": self.frames, "by": who}
        return {"camera-frames": frames}

    def status(self) -> Any:
        return {"detector": self.section.detector, "frames": self.frames}


built: list[Cameras] = []


def _build(section: CameraSection | None, devices: Sequence[DeviceBase], ctx: CapabilityContext) -> Capability | None:
    if not devices:
        return None
    cap = Cameras(section or CameraSection(), devices, ctx)
    built.append(cap)
    return cap


CAMERAS: CapabilitySpec[CameraSection] = CapabilitySpec(
    name="test-cameras", build=_build, section="test_cameras", section_model=CameraSection,
    device_types=(CameraConfig,),
    probes={"test.camera": lambda dev, ctx: "ok"},
    doctor=lambda section, cfg: [DoctorCheck("cameras", "ok", "fine")])
SPECS = (*CAPABILITIES, CAMERAS)
Model = assemble(SPECS)


def _doc(tmp_path: Path, devices: str, extra: str = "") -> str:
    return config_head(tmp_path / "state", site_id="s", gateway_id="g", health="{port: 0}") + f"""\
{extra}
devices:
{devices}
"""


def test_registry_is_the_only_list() -> None:
    assert {"sim.sensor", "modbus.gate", "modbus.charger", "modbus.relay", "modbus.device"} <= set(DEVICE_TYPES)
    assert set(PROBES) == {"modbus.gate", "modbus.charger", "modbus.relay", "modbus.device"}
    assert "test.camera" not in DEVICE_TYPES and "test.camera" in Model.device_types()


def test_new_section_and_device_types_validate_with_located_errors(tmp_path: Path) -> None:
    text = _doc(tmp_path, "  - {type: test.camera, id: cam-1, url: rtsp://10.0.0.5/sub}", "test_cameras: {detector: x}")
    cfg = validate_doc(parse_yaml(text, "c.yaml"), "c.yaml", Model)
    assert CAMERAS.section_of(cfg) == CameraSection(detector="x")
    assert [d.id for d in CAMERAS.devices_of(cfg)] == ["cam-1"]
    bad = _doc(tmp_path, "  - {type: test.camera, id: cam-1, url: http://x}")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+:\d+: devices\[0\]\.url"):
        validate_doc(parse_yaml(bad, "c.yaml"), "c.yaml", Model)
    typo = _doc(tmp_path, "  - {type: test.camera, id: cam-1, url: rtsp://x}", "test_cameras: {detektor: x}")
    with pytest.raises(ConfigError, match="did you mean 'detector'"):
        validate_doc(parse_yaml(typo, "c.yaml"), "c.yaml", Model)


def test_two_capabilities_cannot_claim_one_device_type() -> None:
    twin: CapabilitySpec[CameraSection] = CapabilitySpec(name="twin", build=_build, device_types=(CameraConfig,))
    with pytest.raises(TypeError, match="claimed by both 'test-cameras' and 'twin'"):
        assemble((*SPECS, twin))


async def test_a_new_capability_runs_through_its_spec_alone(tmp_path: Path) -> None:
    text = _doc(tmp_path, "  - {type: test.camera, id: cam-1, url: rtsp://10.0.0.5/sub}\n"
                          "  - {type: sim.sensor, id: t-1, interval_s: 0.05}")
    cfg = validate_doc(parse_yaml(text, "c.yaml"), "c.yaml", Model)
    built.clear()
    daemon = Daemon(cfg, capabilities=SPECS)
    async with running_daemon(daemon):
        cam = built[0]
        assert cam.entered and not cam.exited
        assert await wait_until(lambda: cam.frames >= 3, 5)
        assert "camera.snapshot" in daemon.router.names()
        assert "camera_relay" in daemon.outputs
        await daemon.outputs.set("camera_relay", True)
        assert cam.lamp.states == [True]
        actions = daemon._local_actions()
        assert await actions["camera-frames"]({}, "installer") == {"frames": cam.frames, "by": "installer"}
        st = await daemon.status()
        assert st["test-cameras"]["detector"] == "nanodet" and "test-cameras" in st["capabilities"]
        assert {t["name"] for t in st["tasks"]} >= {"device:cam-1", "device:t-1"}
    assert cam.exited


def test_a_device_no_running_capability_claims_is_refused(tmp_path: Path) -> None:
    def lazy(section: CameraSection | None, devices: Sequence[DeviceBase], ctx: CapabilityContext) -> None:
        return None  # built nothing: its devices would silently do nothing

    idle: CapabilitySpec[CameraSection] = CapabilitySpec(
        name="test-cameras", build=lazy, section="test_cameras", section_model=CameraSection,
        device_types=(CameraConfig,))
    specs = (*CAPABILITIES, idle)
    text = _doc(tmp_path, "  - {type: sim.sensor, id: t-1}\n  - {type: test.camera, id: cam-9, url: rtsp://x}\n"
                          "  - {type: test.camera, id: cam-off, url: rtsp://x, enabled: false}")
    cfg = validate_doc(parse_yaml(text, "c.yaml"), "c.yaml", assemble(specs))
    with pytest.raises(ConfigError, match=r"devices\[1\] \(cam-9, type test.camera\): no capability runs") as e:
        Daemon(cfg, capabilities=specs)
    assert "cam-off" not in str(e.value)
