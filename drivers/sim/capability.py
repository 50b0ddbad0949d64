"""The simulated devices as a capability: one supervised task per enabled device."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from pydantic import BaseModel

from edgeagent.drivers.sim.config import SimContactConfig, SimPanicConfig, SimSensorConfig
from edgeagent.drivers.sim.devices import SimContact, SimPanic, SimSensor
from edgeagent.kernel.capability import Capability, CapabilityContext, CapabilitySpec, TaskSpec
from edgeagent.kernel.config.schema import DeviceBase


class SimCapability(Capability):
    name = "sim"

    def __init__(self, devices: Sequence[DeviceBase], ctx: CapabilityContext) -> None:
        self._runs: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        for dev in devices:
            if not dev.enabled:
                continue
            if isinstance(dev, SimSensorConfig):
                self._runs.append((dev.id, SimSensor(dev, ctx.sink).run))
            elif isinstance(dev, SimContactConfig):
                self._runs.append((dev.id, SimContact(dev, ctx.sink).run))
            elif isinstance(dev, SimPanicConfig):
                self._runs.append((dev.id, SimPanic(dev, ctx.sink).run))

    def claimed_devices(self) -> Sequence[str]:
        return [dev_id for dev_id, _ in self._runs]

    def tasks(self) -> Sequence[TaskSpec]:
        return [TaskSpec(f"device:{dev_id}", run) for dev_id, run in self._runs]


def _build(_section: BaseModel | None, devices: Sequence[DeviceBase], ctx: CapabilityContext) -> Capability | None:
    return SimCapability(devices, ctx) if any(d.enabled for d in devices) else None


SPEC: CapabilitySpec[BaseModel] = CapabilitySpec(
    name="sim", build=_build, device_types=(SimSensorConfig, SimContactConfig, SimPanicConfig))
