"""Test before configure: a real read of a Modbus device with the settings an installer gave, and the
wording installers see for what went wrong (shared by ``device add`` / ``modbus add`` and the other
``edgeagent modbus`` tools)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from edgeagent.drivers.modbus.config import ModbusBusConfig, ModbusDeviceBase
from edgeagent.kernel.errors import ConfigError, DeviceProtocolError, DeviceUnavailable

if TYPE_CHECKING:  # the CLI imports this module; pymodbus loads only when a probe runs
    from edgeagent.drivers.modbus.bus import ModbusBus
    from edgeagent.drivers.modbus.profile import PointValue, Profile
    from edgeagent.kernel.capability import ProbeContext
    from edgeagent.kernel.config.schema import DeviceBase

# A gateway's "path unavailable" / "target failed to respond": nobody is there behind it.
GATEWAY_CODES = frozenset({0x0A, 0x0B})


def unavailable_text(bus: ModbusBus, unit: int, exc: Exception) -> str:
    """'cannot connect ...' when the link is down, else 'no answer from unit N ...'."""
    detail = str(exc).removeprefix(f"{bus.name}: ")
    if not bus.connected:
        detail = detail.removeprefix("cannot connect: ")
        if detail.startswith("connection lost"):
            detail = ("it closed the connection when asked (not a Modbus server, or a converter that takes one "
                      "client at a time)")
        return f"cannot connect to {bus.name}: {detail}"
    return f"no answer from unit {unit} on {bus.name} ({detail.removeprefix(f'unit {unit} ')})"


def exception_text(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    name = getattr(exc, "code_name", "")
    return f"exception 0x{code:02X} ({name})" if isinstance(code, int) else str(exc)


def show(value: PointValue | None, unit: str | None = None) -> str:
    """A decoded value as an installer reads it."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        on = [name for name, flag in value.items() if flag]
        return ",".join(on) if on else "none"
    text = str(value)
    return f"{text} {unit}" if unit else text


async def probe_unit(cfg: ModbusBusConfig, unit: int, profile: Profile) -> str:
    """Read the profile's first block from ``unit``. Returns what it read; raises DeviceUnavailable
    ("cannot connect ...", "no answer from unit N ...") or DeviceProtocolError ("unsupported device ...")."""
    from edgeagent.drivers.modbus.bus import ExceptionResponseError, ModbusBus, Priority  # noqa: PLC0415
    from edgeagent.drivers.modbus.codec import CodecError  # noqa: PLC0415

    plan = profile.read_plan()
    if not plan:
        return f"{profile.model} has no register to read; the device was not tested"
    block = plan[0]
    span = f"{block.table} {block.address}+{block.count}"
    async with ModbusBus(cfg) as bus:
        started = time.perf_counter()
        try:
            words = await bus.read(unit, block.table, block.address, block.count, priority=Priority.COMMAND)
        except ExceptionResponseError as exc:
            if exc.code in GATEWAY_CODES:
                raise DeviceUnavailable(f"no answer from unit {unit} on {bus.name} (the gateway answered "
                                        f"{exception_text(exc)})") from exc
            raise DeviceProtocolError(f"unsupported device: {exception_text(exc)} at {span} from unit {unit}; "
                                      f"is it a {profile.model}?") from exc
        except DeviceProtocolError as exc:
            raise DeviceProtocolError(f"unsupported device: {exc}") from exc
        except DeviceUnavailable as exc:
            raise DeviceUnavailable(unavailable_text(bus, unit, exc)) from exc
        latency_ms = (time.perf_counter() - started) * 1000
    try:
        shown = [f"{s.item.name}={show(s.item.decode(part), s.item.unit)}"
                 for s, (_item, part) in zip(block.slices, block.split([int(w) for w in words]), strict=True)]
    except CodecError as exc:
        raise DeviceProtocolError(f"unsupported device: {span} from unit {unit}: {exc}") from exc
    more = f", ... ({len(shown)} values)" if len(shown) > 4 else ""
    return (f"unit {unit} on {bus.name} answered {span} in {latency_ms:.1f} ms as {profile.model}: "
            f"{', '.join(shown[:4])}{more}")


def probe_device(device: DeviceBase, ctx: ProbeContext) -> str | None:
    """The ``device add`` probe of every Modbus device type: a real read on the configured bus."""
    from edgeagent.drivers.modbus.capability import SPEC  # noqa: PLC0415 - the spec imports this module
    from edgeagent.drivers.modbus.service import resolve_profile  # noqa: PLC0415

    section = SPEC.section_of(ctx.config)
    if not isinstance(device, ModbusDeviceBase) or section is None or device.bus not in section.buses:
        raise ConfigError("a Modbus device is tested with its bus from the config file (edgeagent device add)")
    bus_cfg = section.buses[device.bus]
    if bus_cfg.name is None:
        bus_cfg = bus_cfg.model_copy(update={"name": device.bus})
    profile = resolve_profile(device.profile, ctx.path.parent)
    return asyncio.run(probe_unit(bus_cfg, device.unit_id, profile))
