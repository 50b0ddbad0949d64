"""Simulated Modbus devices for the demo, tests and benchmarks: a real pymodbus server (TCP, or RTU on a
serial port/pty) whose registers follow a device profile.

The simulator keeps its own register image per unit id; pymodbus's access hook copies the image
into the server's memory before every request and records writes back into it, so the test or demo
can ``set`` a value by point name (encoded as the profile says) and see what the gateway wrote with
``get``. Writes can trigger scripted behaviour (``on_write``), e.g. a gate arm that moves after an
open command.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pymodbus import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edgeagent.drivers.modbus.profile import Point, PointValue, Profile

log = logging.getLogger(__name__)

_FC_TABLE = {1: "coil", 5: "coil", 15: "coil", 2: "discrete_input", 3: "holding", 6: "holding", 16: "holding",
             22: "holding", 23: "holding", 4: "input"}
_BITS = ("coil", "discrete_input")
WriteHook = Callable[["SimulatedDevice", Point, PointValue], None]


@dataclass
class SimulatedDevice:
    """One unit id's register image, addressed by the profile's point names."""

    unit: int
    profile: Profile
    image: dict[str, list[int]] = field(default_factory=dict)
    on_write: list[WriteHook] = field(default_factory=list)
    silent: bool = False  # answer nothing (a dead slave)
    reads: int = 0
    writes: list[tuple[str, PointValue]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for table in ("coil", "discrete_input", "holding", "input"):
            top = max((p.end + 1 for p in self.profile.points() if p.table == table), default=1)
            self.image[table] = [0] * (top + 16)

    def set(self, name: str, value: PointValue) -> None:
        point = self.profile.point(name)
        words = point.encode(value)
        self.image[point.table][point.address:point.address + len(words)] = words

    def get(self, name: str) -> PointValue:
        point = self.profile.point(name)
        return point.decode(self.image[point.table][point.address:point.address + point.count])

    def _written(self, table: str, address: int, values: list[int]) -> None:
        image = self.image[table]
        for i, v in enumerate(values):
            if 0 <= address + i < len(image):
                image[address + i] = int(v)
        for point in self.profile.points():
            if point.table == table and point.address <= address + len(values) - 1 and point.end >= address:
                value = self.get(point.name)
                self.writes.append((point.name, value))
                for hook in self.on_write:
                    hook(self, point, value)

    def sim_device(self) -> SimDevice:
        def bits(table: str) -> list[SimData]:
            n = (len(self.image[table]) + 15) // 16 * 16
            return [SimData(0, values=[False] * n, datatype=DataType.BITS)]

        def regs(table: str) -> list[SimData]:
            return [SimData(0, values=[0] * len(self.image[table]), datatype=DataType.REGISTERS)]

        return SimDevice(id=self.unit, use_bit_addressing=True, action=self._action,
                         simdata=(bits("coil"), bits("discrete_input"), regs("holding"), regs("input")))

    async def _action(self, fc: int, _start: int, address: int, _count: int, registers: list[int],
                      set_values: list[int] | list[bool] | None) -> Any:
        table = _FC_TABLE.get(fc)
        if table is None:
            return None
        image = self.image[table]
        # Present the image to pymodbus: packed 16 bits per register for the bit tables.
        if table in _BITS:
            for r in range(len(registers)):
                word = 0
                for b in range(16):
                    i = r * 16 + b
                    if i < len(image) and image[i]:
                        word |= 1 << b
                registers[r] = word
        else:
            registers[: len(image)] = image[: len(registers)]
        if set_values is not None:
            self._written(table, address, [int(v) for v in set_values])
        else:
            self.reads += 1
        return None


class ProfileSimulator:
    """A pymodbus server for several simulated units; ``async with`` starts and stops it."""

    def __init__(self, devices: dict[int, Profile], *, host: str = "127.0.0.1", port: int = 0,
                 serial_port: str | None = None, framer: FramerType | None = None, baudrate: int = 9600) -> None:
        self.devices = {unit: SimulatedDevice(unit, profile) for unit, profile in devices.items()}
        self._host = host
        self._port = port
        self._serial = serial_port
        self._framer = framer
        self._baud = baudrate
        self._server: ModbusTcpServer | ModbusSerialServer | None = None

    def __getitem__(self, unit: int) -> SimulatedDevice:
        return self.devices[unit]

    async def __aenter__(self) -> ProfileSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _trace(self, sending: bool, data: bytes) -> bytes:
        # A silent unit: drop the reply so the client times out (the third unknown-unit behaviour).
        if sending and data and len(data) > 7:
            unit = data[6] if self._serial is None and self._framer in (None, FramerType.SOCKET) else data[0]
            dev = self.devices.get(unit)
            if dev is not None and dev.silent:
                return b""
        return data

    async def start(self) -> None:
        sims = [d.sim_device() for d in self.devices.values()]
        if self._serial is not None:
            self._server = ModbusSerialServer(sims, port=self._serial, framer=self._framer or FramerType.RTU,
                                              baudrate=self._baud, trace_packet=self._trace)
        else:
            self._server = ModbusTcpServer(sims, address=(self._host, self._port),
                                           framer=self._framer or FramerType.SOCKET, trace_packet=self._trace)
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None


def gate_mechanics(dev: SimulatedDevice, point: Point, value: PointValue, *, travel_s: float = 0.2) -> None:
    """A barrier gate controller's behaviour: a trigger starts the arm moving, it arrives ``travel_s``
    later and the controller clears the trigger coil (never within the write itself, whose echo must
    match the request)."""
    loop = asyncio.get_running_loop()
    if not value and point.name.endswith("_trigger"):
        return
    if point.name == "open_trigger":
        dev.set("state", "opening")

        def arrive_open() -> None:
            dev.set("state", "held" if dev.get("mode") == "hold_open" else "open")
            dev.set("position", 100)
            dev.set("open_trigger", False)

        loop.call_later(travel_s, arrive_open)
    elif point.name == "close_trigger":
        if dev.get("vehicle_present"):
            loop.call_later(0.01, dev.set, "close_trigger", False)
            return  # the loop sees a vehicle: the controller refuses to close
        dev.set("state", "closing")

        def arrive_closed() -> None:
            dev.set("state", "closed")
            dev.set("position", 0)
            dev.set("close_trigger", False)

        loop.call_later(travel_s, arrive_closed)
    elif point.name == "mode" and value == "auto" and dev.get("state") == "held":
        dev.set("state", "open")
