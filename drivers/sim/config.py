"""Config of the simulated devices (demo and tests)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgeagent.kernel.config.schema import DeviceBase


class SimSensorConfig(DeviceBase):
    type: Literal["sim.sensor"]
    metric: str = Field(default="temperature", pattern=r"^[a-z][a-z0-9_]*$")
    unit: str = "degC"
    base: float = 25.0
    amplitude: float = Field(default=5.0, ge=0)
    interval_s: float = Field(default=1.0, gt=0, le=86_400)


class SimContactConfig(DeviceBase):
    type: Literal["sim.contact"]
    contact: str = "door"
    mean_interval_s: float = Field(default=5.0, gt=0)


class SimPanicConfig(DeviceBase):
    type: Literal["sim.panic"]
    location: str = "guard-room"
    mean_interval_s: float = Field(default=30.0, gt=0)
