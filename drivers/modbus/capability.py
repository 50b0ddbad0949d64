"""Modbus as a capability: buses from ``modbus.buses``, gates, chargers, relay modules and generic
devices from ``devices``; their cloud commands, relay channels as named outputs, the gate and
charger local actions, and the installer's checks (cross-checks, ``device add`` probe, ``doctor``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeagent.drivers.modbus.charger import CHARGER_ALARM_KINDS
from edgeagent.drivers.modbus.config import (
    DEVICE_CLASSES,
    ModbusDeviceBase,
    ModbusSection,
)
from edgeagent.drivers.modbus.probe import probe_device
from edgeagent.kernel.capability import (
    RULE_CALLER,
    Capability,
    CapabilityContext,
    CapabilitySpec,
    DoctorCheck,
    LocalAction,
    TaskSpec,
    validate_args,
)
from edgeagent.kernel.config.schema import CoreConfig, DeviceBase, Issue
from edgeagent.kernel.pipeline.commands import CommandSpec
from edgeagent.kernel.runtime.outputs import Output

if TYPE_CHECKING:  # the CLI reads the spec; pymodbus loads only when the capability is built
    from edgeagent.drivers.modbus.service import ModbusService


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalGateArgs(_Args):
    device_id: str
    command: Literal["open", "close", "hold_open", "release"] = "open"
    reason: Literal["plate_match", "guard_room", "cloud_command", "visitor"] = "guard_room"
    note: str | None = Field(default=None, max_length=200)


class LocalResetArgs(_Args):
    device_id: str
    port: int | None = Field(default=None, ge=1, le=64)


class ModbusCapability(Capability):
    name = "modbus"

    def __init__(self, service: ModbusService, device_ids: Sequence[str]) -> None:
        self.service = service
        self._device_ids = list(device_ids)

    async def __aenter__(self) -> ModbusCapability:
        await self.service.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.service.__aexit__(*exc)

    def claimed_devices(self) -> Sequence[str]:
        return self._device_ids

    def tasks(self) -> Sequence[TaskSpec]:
        return [TaskSpec(name, run) for name, run in self.service.driver_tasks()]

    def commands(self) -> Sequence[CommandSpec]:
        return self.service.command_specs()

    def outputs(self) -> Mapping[str, Output]:
        return self.service.output_map()

    def local_actions(self) -> Mapping[str, LocalAction]:
        service = self.service

        async def gate(args: Mapping[str, Any], who: str) -> Mapping[str, Any]:
            a = validate_args(LocalGateArgs, args)
            # a rule on the box (a plate match), a guard in the console ('console:<user>'), or a person at the CLI
            via = "local" if who.startswith(RULE_CALLER) else "console" if who.startswith("console:") else "cli"
            return await service.gate(a.device_id, a.command, reason=a.reason, by=who, via=via, note=a.note)

        async def charger_reset(args: Mapping[str, Any], who: str) -> Mapping[str, Any]:
            a = validate_args(LocalResetArgs, args)
            return await service.reset_lockout(a.device_id, a.port, by=who, via="cli")

        return {"gate": gate, "charger-reset": charger_reset}

    def status(self) -> Any:
        return self.service.snapshot()


def _build(section: ModbusSection | None, devices: Sequence[DeviceBase], ctx: CapabilityContext
           ) -> Capability | None:
    from edgeagent.drivers.modbus.service import ModbusService  # noqa: PLC0415

    mine = [d for d in devices if isinstance(d, ModbusDeviceBase) and d.enabled]
    if not mine:
        return None
    # Resolves every device profile now: a bad one is a config error before anything starts.
    service = ModbusService(section.buses if section is not None else {}, mine, ctx.sink, state=ctx.state,
                            config_dir=ctx.config_dir, alarms=ctx.alarms)
    return ModbusCapability(service, [d.id for d in mine])


def _cross_checks(section: ModbusSection | None, _devices: Sequence[DeviceBase], cfg: CoreConfig) -> list[Issue]:
    buses = section.buses if section is not None else {}
    issues: list[Issue] = []
    units: dict[tuple[str, int], str] = {}
    for i, dev in enumerate(cfg.devices):
        if not isinstance(dev, ModbusDeviceBase):
            continue
        if dev.bus not in buses:
            known = ", ".join(sorted(buses)) or "none defined"
            issues.append((("devices", i, "bus"), f"no bus {dev.bus!r} under modbus.buses (known: {known})"))
        elif (dev.bus, dev.unit_id) in units:
            issues.append((("devices", i, "unit_id"), f"unit id {dev.unit_id} on bus {dev.bus!r} is already "
                           f"device {units[(dev.bus, dev.unit_id)]!r}"))
        units.setdefault((dev.bus, dev.unit_id), dev.id)
    return issues


def _doctor(section: ModbusSection | None, cfg: CoreConfig) -> list[DoctorCheck]:
    """Serial lines present and usable, profiles loadable: what an installer gets wrong first."""
    from edgeagent.drivers.modbus.service import resolve_profile  # noqa: PLC0415
    from edgeagent.kernel.errors import ConfigError  # noqa: PLC0415

    checks: list[DoctorCheck] = []
    devices = [d for d in cfg.devices if isinstance(d, ModbusDeviceBase) and d.enabled]
    if section is None or not section.buses:
        return [DoctorCheck("modbus", "skip", "no Modbus buses configured")] if not devices else []
    for bus_id, bus in sorted(section.buses.items()):
        if bus.kind != "rtu" or bus.serial_port is None:
            continue
        port = Path(bus.serial_port)
        if not port.exists():
            checks.append(DoctorCheck(f"modbus bus {bus_id}", "fail",
                                      f"{port} does not exist (adapter unplugged, or the name changed: "
                                      "ls /dev/serial/by-id/)"))
        elif not os.access(port, os.R_OK | os.W_OK):
            checks.append(DoctorCheck(f"modbus bus {bus_id}", "warn",
                                      f"{port} is not read/writable by this user (the service runs in 'dialout')"))
        else:
            checks.append(DoctorCheck(f"modbus bus {bus_id}", "ok", f"{port} present"))
    bad = []
    for dev in devices:
        try:
            resolve_profile(dev.profile, None)
        except ConfigError as exc:
            bad.append(f"{dev.id}: {exc}")
    if bad:
        checks.append(DoctorCheck("modbus profiles", "fail", "; ".join(bad)))
    elif devices:
        checks.append(DoctorCheck("modbus profiles", "ok", f"{len(devices)} device profile(s) load"))
    return checks


SPEC: CapabilitySpec[ModbusSection] = CapabilitySpec(
    name="modbus", build=_build, section="modbus", section_model=ModbusSection,
    device_types=DEVICE_CLASSES, cross_checks=_cross_checks,
    probes=dict.fromkeys(("modbus.gate", "modbus.charger", "modbus.relay", "modbus.device"), probe_device),
    doctor=_doctor, alarm_kinds=CHARGER_ALARM_KINDS)
