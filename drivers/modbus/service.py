"""Modbus wiring: buses from ``modbus.buses``, devices from ``devices`` (gates, chargers, relay modules,
generic), their commands in the command router, their outputs as actions for local rules.

The app (the composition root) builds one :class:`ModbusService` from the config; this module turns
the Modbus part of the config into running objects and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from edgeagent.drivers.modbus.bus import ModbusBus, Priority
from edgeagent.drivers.modbus.charger import Alarms, ChargerSafety
from edgeagent.drivers.modbus.charger_rules import ResetRefused, SafetyLimits
from edgeagent.drivers.modbus.config import (
    ModbusBusConfig,
    ModbusChargerConfig,
    ModbusDeviceBase,
    ModbusGateConfig,
    ModbusRelayConfig,
)
from edgeagent.drivers.modbus.device import ModbusDevice
from edgeagent.drivers.modbus.profile import CommandError, Profile, ProfileError, load_profile, shipped_profiles
from edgeagent.kernel.errors import CommandRejected, ConfigError, DeviceProtocolError, DeviceUnavailable
from edgeagent.kernel.pipeline.commands import CommandRouter, CommandSpec
from edgeagent.kernel.pipeline.event_types import DEVICE_OFFLINE, DEVICE_ONLINE, GATE_COMMANDED, REGISTRY
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.kernel.runtime.outputs import Outputs

log = logging.getLogger(__name__)


def resolve_profile(name: str, base: Path | None = None) -> Profile:
    """A shipped model name, or a path to a profile file (relative to the config file's folder)."""
    if "/" in name or name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_absolute() and base is not None:
            path = base / path
        return load_profile(path)
    shipped = shipped_profiles()
    if name not in shipped:
        raise ConfigError(f"no shipped device profile {name!r} (shipped: {', '.join(sorted(shipped))}); "
                          "give a path to a profile file for other models")
    return shipped[name]


@dataclass
class DeviceEntry:
    cfg: ModbusDeviceBase
    device: ModbusDevice
    bus_id: str
    online: bool | None = None
    since: float | None = None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GateOpenArgs(_Strict):
    device_id: str
    reason: Literal["plate_match", "guard_room", "cloud_command", "visitor"] = "cloud_command"
    note: str | None = Field(default=None, max_length=200)


class GateArgs(_Strict):
    device_id: str
    note: str | None = Field(default=None, max_length=200)


class DeviceCommandArgs(_Strict):
    device_id: str
    command: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    args: dict[str, Any] = Field(default_factory=dict)


class RelayOutput:
    """One relay channel as an :class:`~edgeagent.kernel.runtime.outputs.Output`."""

    def __init__(self, service: ModbusService, device_id: str, channel: int) -> None:
        self._service = service
        self.device_id = device_id
        self.channel = channel

    async def set(self, on: bool) -> None:
        await self._service.run_command(self.device_id, "on" if on else "off", {"channel": self.channel})


class KeyValueStore(Protocol):
    async def kv_get(self, key: str) -> Any: ...

    async def kv_put(self, key: str, value: Any) -> None: ...


class _KeyedState:
    """One key of the daemon's durable local state, as a charger safety StateStore."""

    def __init__(self, store: KeyValueStore, key: str) -> None:
        self._store = store
        self._key = key

    async def load(self) -> Mapping[str, Any] | None:
        value = await self._store.kv_get(self._key)
        return value if isinstance(value, dict) else None

    async def save(self, state: Mapping[str, Any]) -> None:
        await self._store.kv_put(self._key, dict(state))


class ChargerResetArgs(_Strict):
    device_id: str
    port: int | None = Field(default=None, ge=1, le=64, description="none: the station's lockout")


class ModbusService:
    """Owns the buses and devices; use as an async context manager around the daemon's run."""

    def __init__(self, buses: Mapping[str, ModbusBusConfig], devices: Sequence[ModbusDeviceBase], sink: EventSink, *,
                 state: KeyValueStore | None = None, config_dir: Path | None = None,
                 alarms: Alarms | None = None) -> None:
        self._bus_cfgs = dict(buses)
        self._alarms = alarms  # charger cut-offs are place alarms (see drivers/modbus/charger.py)
        self._devices = [d for d in devices if d.enabled]
        self._sink = sink
        self._state = state
        self.safety: dict[str, ChargerSafety] = {}
        self._stack = contextlib.AsyncExitStack()
        self.buses: dict[str, ModbusBus] = {}
        self.devices: dict[str, DeviceEntry] = {}
        self._by_unit: dict[tuple[str, int], str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._profiles: dict[str, Profile] = {}
        for dev in self._devices:
            if dev.enabled:
                profile = self._profile(dev, config_dir)
                unknown = sorted(t for t in profile.event_types() if t not in REGISTRY)
                if unknown:
                    raise ConfigError(f"device {dev.id!r}: profile {profile.model!r} raises event types that are "
                                      f"not in the event registry: {', '.join(unknown)}")
                self._profiles[dev.id] = profile

    def _profile(self, dev: ModbusDeviceBase, config_dir: Path | None) -> Profile:
        try:
            return resolve_profile(dev.profile, config_dir)
        except ProfileError as exc:
            raise ConfigError(f"device {dev.id!r}: {exc}") from exc

    @property
    def enabled(self) -> bool:
        return bool(self._profiles)

    async def __aenter__(self) -> ModbusService:
        needed = {d.bus for d in self._devices if d.id in self._profiles}
        for bus_id in sorted(needed):
            bus_cfg = self._bus_cfgs[bus_id]
            if bus_cfg.name is None:
                bus_cfg = bus_cfg.model_copy(update={"name": bus_id})
            bus = ModbusBus(bus_cfg, on_state_change=self._state_callback(bus_id))
            self.buses[bus_id] = await self._stack.enter_async_context(bus)
        for dev in self._devices:
            if dev.id not in self._profiles:
                continue
            device = ModbusDevice(dev.id, dev.unit_id, self._profiles[dev.id], self.buses[dev.bus], self._sink,
                                  poll_interval_s=dev.poll_interval_s)
            self.devices[dev.id] = DeviceEntry(dev, device, dev.bus)
            self._by_unit[(dev.bus, dev.unit_id)] = dev.id
            if isinstance(dev, ModbusChargerConfig):
                # Local cut-offs: they act on the poll's readings, without the cloud.
                store = _KeyedState(self._state, f"charger:{dev.id}") if self._state is not None else None
                if store is None:
                    raise ConfigError(f"device {dev.id!r}: charger safety needs the durable state store")
                safety = ChargerSafety(device, SafetyLimits(**dev.safety.model_dump()), self._sink, store,
                                       priority=Priority.COMMAND, alarms=self._alarms, place=dev.name or dev.id)
                self.safety[dev.id] = safety
        return self

    async def __aexit__(self, *exc: object) -> None:
        for safety in self.safety.values():
            await safety.aclose()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stack.aclose()

    def driver_tasks(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        return [(f"device:{dev_id}", entry.device.run) for dev_id, entry in self.devices.items()]

    # --- online/offline, once per transition -----------------------------------------------------

    def _state_callback(self, bus_id: str) -> Callable[[int, bool, str], None]:
        def changed(unit: int, online: bool, reason: str) -> None:
            dev_id = self._by_unit.get((bus_id, unit))
            if dev_id is None:
                return
            entry = self.devices[dev_id]
            if entry.online is None and online:
                entry.online, entry.since = True, time.monotonic()
                return  # the first answer is not news
            entry.online, entry.since = online, time.monotonic()
            etype = DEVICE_ONLINE if online else DEVICE_OFFLINE
            data = {"reason": reason} if reason or not online else {}
            if not online and not reason:
                data = {"reason": "no answer"}
            task = asyncio.get_running_loop().create_task(self._sink.emit(etype.name, dev_id, data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return changed

    # --- commands --------------------------------------------------------------------------------

    def command_specs(self) -> list[CommandSpec]:
        specs = [CommandSpec("gate.open", self._gate_open, GateOpenArgs,
                             "raise a barrier gate's arm once, with a reason (audited)")]
        for name, profile_cmd in (("gate.close", "close"), ("gate.hold_open", "hold_open"),
                                  ("gate.release", "release")):
            specs.append(CommandSpec(name, self._gate_simple(profile_cmd), GateArgs, f"gate: {profile_cmd}"))
        specs.append(CommandSpec("device.command", self._device_command, DeviceCommandArgs,
                                 "run a named command of a Modbus device's profile"))
        specs.append(CommandSpec("charger.reset_lockout", self._reset_lockout, ChargerResetArgs,
                                 "clear a charger port's (or the station's) safety lockout"))
        return specs

    def register_commands(self, router: CommandRouter) -> None:
        for spec in self.command_specs():
            router.register(spec)

    async def reset_lockout(self, device_id: str, port: int | None, *, by: str,
                            via: Literal["cloud", "cli", "local"]) -> dict[str, Any]:
        safety = self.safety.get(device_id)
        if safety is None:
            raise CommandRejected("bad_args", f"no charger {device_id!r} on this gateway")
        try:
            await safety.reset_lockout(port, by, via)
        except ResetRefused as exc:
            raise CommandRejected("failed", str(exc)) from exc
        except (DeviceUnavailable, DeviceProtocolError) as exc:
            raise CommandRejected("failed", f"{device_id}: {exc}") from exc
        return {"device_id": device_id, "port": port, "reset": True}

    async def _reset_lockout(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        return await self.reset_lockout(args["device_id"], args.get("port"), by="platform", via="cloud")

    def _entry(self, device_id: str, kind: type[ModbusDeviceBase] | None = None) -> DeviceEntry:
        entry = self.devices.get(device_id)
        if entry is None or (kind is not None and not isinstance(entry.cfg, kind)):
            what = "gate" if kind is ModbusGateConfig else "Modbus device"
            raise CommandRejected("bad_args", f"no {what} {device_id!r} on this gateway")
        return entry

    async def run_command(self, device_id: str, command: str, args: Mapping[str, Any] | None = None
                          ) -> list[dict[str, Any]]:
        """A profile command on a device, ahead of polls. Raises CommandRejected with a stable code."""
        entry = self._entry(device_id)
        try:
            return await entry.device.command(command, args, priority=Priority.COMMAND)
        except CommandError as exc:
            raise CommandRejected("bad_args", str(exc)) from exc
        except DeviceUnavailable as exc:
            raise CommandRejected("failed", f"{device_id}: device unavailable: {exc}") from exc
        except DeviceProtocolError as exc:
            raise CommandRejected("failed", f"{device_id}: device refused: {exc}") from exc

    async def gate(self, device_id: str, command: str, *, reason: str, by: str, via: str,
                   note: str | None = None) -> dict[str, Any]:
        """Gate commands from any source (cloud, CLI, plate match): run, then audit as an event."""
        self._entry(device_id, ModbusGateConfig)
        started = time.monotonic()
        outcome, error = "executed", None
        try:
            await self.run_command(device_id, command)
        except CommandRejected as exc:
            outcome, error = "failed", exc.message
            raise
        finally:
            data: dict[str, Any] = {"command": command, "reason": reason, "by": by, "via": via, "outcome": outcome,
                                    "latency_ms": round((time.monotonic() - started) * 1000, 1)}
            if note:
                data["note"] = note
            if error:
                data["error"] = error
            await self._sink.emit(GATE_COMMANDED.name, device_id, data)
        return {"device_id": device_id, "command": command, "latency_ms": data["latency_ms"]}

    async def _gate_open(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        return await self.gate(args["device_id"], "open", reason=args["reason"], by="platform", via="cloud",
                               note=args.get("note"))

    def _gate_simple(self, command: str) -> Callable[[Mapping[str, Any]], Awaitable[Mapping[str, Any]]]:
        async def run(args: Mapping[str, Any]) -> Mapping[str, Any]:
            return await self.gate(args["device_id"], command, reason="cloud_command", by="platform", via="cloud",
                                   note=args.get("note"))
        return run

    async def _device_command(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        if isinstance(self._entry(args["device_id"]).cfg, ModbusGateConfig):
            raise CommandRejected("bad_args", "gates take gate.* commands (audited with a reason)")
        done = await self.run_command(args["device_id"], args["command"], args["args"])
        return {"device_id": args["device_id"], "command": args["command"], "writes": done}

    # --- relay outputs as actions for local rules --------------------------------------------------

    def output_map(self) -> dict[str, RelayOutput]:
        """Each named relay channel becomes an output local rules can drive ('siren', 'strobe', ...),
        also reachable as '<device id>.<name>'; the first relay module naming a channel owns the bare name."""
        found: dict[str, RelayOutput] = {}
        for dev_id, entry in self.devices.items():
            if isinstance(entry.cfg, ModbusRelayConfig):
                for channel, name in entry.cfg.channels.items():
                    out = RelayOutput(self, dev_id, channel)
                    found[f"{dev_id}.{name}"] = out
                    found.setdefault(name, out)
        return found

    def register_outputs(self, outputs: Outputs) -> None:
        for name, out in self.output_map().items():
            if name not in outputs:
                outputs.register(name, out)

    def snapshot(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        rows = []
        for dev_id, entry in self.devices.items():
            dev = entry.device
            rows.append({
                "id": dev_id, "type": entry.cfg.type, "bus": entry.bus_id,  # type: ignore[attr-defined]
                "unit_id": entry.cfg.unit_id, "profile": dev.profile.model,
                "online": entry.online, "polls": dev.polls, "poll_failures": dev.poll_failures,
                "last_poll_age_s": None if dev.last_poll_at is None else round(now - dev.last_poll_at, 1),
                "last_error": dev.last_error,
            })
        return rows

    def chargers(self) -> list[tuple[str, ModbusChargerConfig, ModbusDevice]]:
        return [(d, e.cfg, e.device) for d, e in self.devices.items() if isinstance(e.cfg, ModbusChargerConfig)]
