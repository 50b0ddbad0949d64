"""ModbusBus against real pymodbus servers: Modbus TCP on loopback, RTU over a socat pty pair, and RTU
frames over TCP. Failures come from named switches on the server (:class:`Line`), not from mocks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edgeagent.drivers.modbus.bus import BusBusy, BusConfig, ExceptionResponseError, ModbusBus, Priority
from edgeagent.kernel.errors import DeviceProtocolError, DeviceUnavailable
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

BAUD = 115200  # a pty ignores it; it sets the inter-frame gap (1.75 ms above 19200 baud)
JUNK = bytes.fromhex("ff00a55a13370d0a7e7e0102")


# --- servers and their failure switches ---------------------------------------------------------------


@dataclass
class Line:
    """Failure switches of one pymodbus server, and what it saw. Set a switch, make a request."""

    silent_units: set[int] = field(default_factory=set)      # requests decoded, never answered
    gateway_dead_units: set[int] = field(default_factory=set)  # answered with exception 0x0B, as a gateway does
    junk_replies: int = 0      # the next N replies go out as junk bytes instead
    short_replies: int = 0     # the next N register replies carry one register too few, in a valid frame
    delay_s: float = 0.0       # each request takes this long in the device
    received: list[tuple[int, int]] = field(default_factory=list)  # (unit, function code) per request decoded
    _drop_next: bool = False

    def trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.received.append((pdu.dev_id, pdu.function_code))
            return pdu
        self._drop_next = pdu.dev_id in self.silent_units
        if pdu.dev_id in self.gateway_dead_units:
            return ExceptionResponse(pdu.function_code & 0x7F, ExcCodes.GATEWAY_NO_RESPONSE, device_id=pdu.dev_id,
                                     transaction=pdu.transaction_id)
        if self.short_replies and pdu.function_code in (3, 4) and len(pdu.registers) > 1:
            self.short_replies -= 1
            pdu.registers = list(pdu.registers)[:-1]
        return pdu

    def trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            return data
        if self._drop_next:
            self._drop_next = False
            return b""
        if self.junk_replies:
            self.junk_replies -= 1
            return JUNK
        return data

    async def action(self, _fc: int, _start: int, _address: int, _count: int, _regs: list[int],
                     _values: list[int] | list[bool] | None) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)

    def count(self, unit: int) -> int:
        return sum(1 for u, _ in self.received if u == unit)


def holding(unit: int) -> list[int]:
    return [unit * 100 + i for i in range(20)]


def inputs(unit: int) -> list[int]:
    return [unit * 100 + 50 + i for i in range(20)]


def coils(unit: int) -> list[bool]:
    return [(i + unit) % 3 == 0 for i in range(32)]


def discretes(unit: int) -> list[bool]:
    return [(i + unit) % 2 == 0 for i in range(32)]


def device(unit: int, line: Line) -> SimDevice:
    """Coils and discrete inputs 0..31, holding and input registers 0..19; 20 and up are illegal addresses."""
    return SimDevice(id=unit, action=line.action, simdata=(
        [SimData(0, values=coils(unit), datatype=DataType.BITS)],
        [SimData(0, values=discretes(unit), datatype=DataType.BITS)],
        [SimData(0, values=holding(unit), datatype=DataType.REGISTERS)],
        [SimData(0, values=inputs(unit), datatype=DataType.REGISTERS)],
    ))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_tcp(line: Line, port: int, *, units: tuple[int, ...] = (1, 2),
                    framer: FramerType = FramerType.SOCKET) -> ModbusTcpServer:
    server = ModbusTcpServer([device(u, line) for u in units], address=("127.0.0.1", port), framer=framer,
                             trace_pdu=line.trace_pdu, trace_packet=line.trace_packet)
    await server.serve_forever(background=True)
    return server


async def stop(server: ModbusTcpServer | ModbusSerialServer) -> None:
    await server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus leaves shutdown() unannotated


@contextlib.asynccontextmanager
async def tcp_server(line: Line, port: int, *, units: tuple[int, ...] = (1, 2),
                     framer: FramerType = FramerType.SOCKET) -> AsyncIterator[ModbusTcpServer]:
    server = await start_tcp(line, port, units=units, framer=framer)
    try:
        yield server
    finally:
        await stop(server)


@contextlib.asynccontextmanager
async def rtu_server(line: Line, port: str, *, broadcast: bool = False) -> AsyncIterator[ModbusSerialServer]:
    server = ModbusSerialServer([device(1, line), device(2, line)], port=port, framer=FramerType.RTU,
                                baudrate=BAUD, broadcast_enable=broadcast,
                                trace_pdu=line.trace_pdu, trace_packet=line.trace_packet)
    await server.serve_forever(background=True)
    try:
        yield server
    finally:
        await stop(server)


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    yield
    me = asyncio.current_task()
    left: list[asyncio.Task[object]] = []
    for _ in range(50):
        left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if not left:
            break
        await asyncio.sleep(0.02)
    assert not left, f"tasks left running: {[t.get_name() for t in left]}"


def rtu_config(port: str, **kw: object) -> BusConfig:
    return BusConfig.model_validate({"kind": "rtu", "serial_port": port, "baudrate": BAUD, "timeout_s": 0.2, **kw})


def tcp_config(port: int, **kw: object) -> BusConfig:
    return BusConfig.model_validate({"kind": "tcp", "host": "127.0.0.1", "port": port, "timeout_s": 0.3, **kw})


@contextlib.asynccontextmanager
async def served_bus(kind: str, tmp: tuple[str, str] | None, line: Line, **kw: object
                     ) -> AsyncIterator[ModbusBus]:
    """A bus of ``kind`` on a fresh server with units 1 and 2."""
    if kind == "rtu":
        assert tmp is not None
        async with rtu_server(line, tmp[0]), ModbusBus(rtu_config(tmp[1], **kw)) as bus:
            yield bus
        return
    port = free_port()
    framer = FramerType.RTU if kind == "rtu_over_tcp" else FramerType.SOCKET
    cfg = BusConfig.model_validate({"kind": kind, "host": "127.0.0.1", "port": port, "timeout_s": 0.3, **kw})
    async with tcp_server(line, port, framer=framer), ModbusBus(cfg) as bus:
        yield bus


# --- configuration --------------------------------------------------------------------------------------


def test_config_gap_timeout_and_validation() -> None:
    slow = BusConfig(kind="rtu", serial_port="/dev/ttyUSB0", baudrate=9600)
    assert slow.frame_gap_s == pytest.approx(3.5 * 10 / 9600)  # 8N1: 10 bits a character
    assert BusConfig(kind="rtu", serial_port="/dev/x", baudrate=9600, parity="E").frame_gap_s == pytest.approx(
        3.5 * 11 / 9600)
    assert BusConfig(kind="rtu", serial_port="/dev/x", baudrate=38400).frame_gap_s == pytest.approx(0.00175)
    assert BusConfig(kind="rtu", serial_port="/dev/x", inter_frame_gap_s=0.01).frame_gap_s == 0.01
    assert BusConfig(kind="tcp", host="h").frame_gap_s == 0.0
    assert BusConfig(kind="rtu_over_tcp", host="h", baudrate=9600).frame_gap_s == pytest.approx(3.5 * 10 / 9600)
    assert slow.response_timeout_s >= 0.5
    assert BusConfig(kind="rtu", serial_port="/dev/x", baudrate=1200).response_timeout_s > 4
    assert BusConfig(kind="tcp", host="h").response_timeout_s == 1.0
    assert BusConfig(kind="tcp", host="10.0.0.5", port=8899).label == "tcp 10.0.0.5:8899"
    with pytest.raises(ValueError, match="serial_port"):
        BusConfig(kind="rtu")
    with pytest.raises(ValueError, match="needs 'host'"):
        BusConfig(kind="rtu_over_tcp")
    with pytest.raises(ValueError, match="serial_port"):
        BusConfig(kind="tcp", host="h", serial_port="/dev/x")


# --- the four tables, both writes -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "rtu", "rtu_over_tcp"])
async def test_read_and_write_all_tables(kind: str, request: pytest.FixtureRequest) -> None:
    ptys = request.getfixturevalue("pty_pair") if kind == "rtu" else None
    line = Line()
    async with served_bus(kind, ptys, line) as bus:
        for unit in (1, 2):
            assert await bus.read(unit, "coil", 0, 10) == coils(unit)[:10]
            assert await bus.read(unit, "discrete_input", 3, 17) == discretes(unit)[3:20]
            assert await bus.read(unit, "holding", 0, 20) == holding(unit)
            assert await bus.read(unit, "input", 5, 3) == inputs(unit)[5:8]

        await bus.write(1, "coil", 4, [True])                       # function 5
        await bus.write(1, "coil", 8, [True, False, True])          # function 15
        await bus.write(2, "holding", 2, [0xBEEF])                  # function 6
        await bus.write(2, "holding", 10, [1, 2, 3])                # function 16
        await bus.write(2, "holding", 0, [7], multiple=True)        # function 16 for one register
        bits = await bus.read(1, "coil", 0, 12)
        assert bits[4] is True and bits[8:11] == [True, False, True]
        assert await bus.read(2, "holding", 0, 13) == [7, 201, 0xBEEF, *holding(2)[3:10], 1, 2, 3]
        assert await bus.read(1, "holding", 0, 3) == holding(1)[:3]  # the other unit is untouched

        assert {fc for _, fc in line.received} >= {1, 2, 3, 4, 5, 6, 15, 16}
        assert bus.stats.failed == 0
        assert bus.unit_health(1).online is True and bus.unit_health(2).online is True
        assert bus.stats.last_latency_s is not None

        with pytest.raises(ValueError, match="register values"):
            await bus.write(1, "holding", 0, [70000])
        with pytest.raises(ValueError, match="count"):
            await bus.read(1, "holding", 0, 126)


async def test_inter_frame_gap_is_kept_between_rtu_frames(pty_pair: tuple[str, str]) -> None:
    async with rtu_server(Line(), pty_pair[0]), ModbusBus(rtu_config(pty_pair[1], inter_frame_gap_s=0.05)) as bus:
        await bus.read(1, "holding", 0, 1)
        started = time.monotonic()
        for _ in range(5):
            await bus.read(1, "holding", 0, 1)
        assert time.monotonic() - started >= 5 * 0.05


async def test_rtu_broadcast_write_reaches_every_unit(pty_pair: tuple[str, str]) -> None:
    async with rtu_server(Line(), pty_pair[0], broadcast=True), \
            ModbusBus(rtu_config(pty_pair[1], broadcast_turnaround_s=0.05)) as bus:
        await bus.write(0, "holding", 3, [777])
        assert await bus.read(1, "holding", 3, 1) == [777]
        assert await bus.read(2, "holding", 3, 1) == [777]
        assert 0 not in bus.stats.units or bus.unit_health(0).online is None  # nobody answers a broadcast


# --- commands before polls; the poll lane's bound -------------------------------------------------------


async def test_command_goes_out_ahead_of_queued_polls(pty_pair: tuple[str, str]) -> None:
    line = Line(delay_s=0.02)
    async with rtu_server(line, pty_pair[0]), ModbusBus(rtu_config(pty_pair[1])) as bus:
        polls = [asyncio.create_task(bus.read(1 + i % 2, "holding", 0, 4)) for i in range(20)]
        assert await wait_until(lambda: len(line.received) >= 1, timeout_s=5, interval_s=0.002)
        assert bus.queue_depth >= 15  # the bus is saturated with polls
        await bus.write(1, "coil", 0, [True])
        write_at = line.received.index((1, 5))
        done, _ = await asyncio.wait(polls, timeout=10)
        assert len(done) == 20 and all(t.exception() is None for t in polls)
        # Only the poll(s) already on the wire went before the command; every other poll came after it.
        assert write_at <= 2, line.received
        assert len(line.received) - write_at - 1 >= 18


async def test_poll_lane_bound_refuses_with_busbusy_while_commands_pass() -> None:
    port = free_port()
    line = Line(delay_s=0.01)
    async with tcp_server(line, port), ModbusBus(tcp_config(port, max_pending_polls=5)) as bus:
        polls = [asyncio.create_task(bus.read(1, "holding", 0, 1)) for _ in range(20)]
        commands = [asyncio.create_task(bus.write(2, "holding", 0, [i], priority=Priority.COMMAND))
                    for i in range(10)]
        await asyncio.wait([*polls, *commands], timeout=10)
        refused = [t for t in polls if isinstance(t.exception(), BusBusy)]
        answered = [t for t in polls if t.exception() is None]
        assert len(refused) + len(answered) == 20
        assert len(refused) >= 20 - 5 - 1  # at most one poll taken by the owner before the lane filled
        assert bus.stats.refused_polls == len(refused)
        assert all(t.exception() is None for t in commands)  # commands are never refused
        assert bus.stats.max_queue_depth <= 5 + 10
        assert bus.queue_depth == 0
        # A refused poll never reached the device and says nothing about its health.
        assert bus.unit_health(1).failures == 0 and bus.unit_health(1).online is True
        assert line.count(1) == len(answered)


# --- a silent unit on a shared line ---------------------------------------------------------------------


async def test_silent_unit_is_backed_off_and_does_not_hold_up_its_neighbours(pty_pair: tuple[str, str]) -> None:
    line = Line(silent_units={9})  # the server has units 1 and 2 only; 9 is never answered
    changes: list[tuple[int, bool]] = []
    cfg = rtu_config(pty_pair[1], timeout_s=0.15, retries=1, backoff_base_s=1.0)
    timeout_per_request = 0.15 * 2
    async with rtu_server(line, pty_pair[0]), \
            ModbusBus(cfg, on_state_change=lambda u, online, _r: changes.append((u, online))) as bus:
        latencies: dict[int, list[float]] = {1: [], 2: []}
        fast_failures = 0
        stop = asyncio.Event()

        async def poller(unit: int) -> None:
            nonlocal fast_failures
            while not stop.is_set():
                started = time.monotonic()
                try:
                    await bus.read(unit, "holding", 0, 2)
                except DeviceUnavailable:
                    assert unit == 9
                    if time.monotonic() - started < 0.01:
                        fast_failures += 1
                else:
                    latencies[unit].append(time.monotonic() - started)
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(poller(u)) for u in (1, 2, 9)]
        await asyncio.sleep(2.5)
        stop.set()
        await asyncio.wait(tasks, timeout=5)
        for t in tasks:
            assert t.done() and t.exception() is None

        # Unit 9: a few failed requests (two frames each), then backoff; without it the line would carry
        # about 2.5 / 0.3 = 8 requests (16 frames) for it.
        assert line.count(9) <= 6, line.count(9)
        assert fast_failures >= 20
        health9 = bus.unit_health(9)
        assert health9.online is False and health9.consecutive_failures >= 2
        # Its neighbours kept going: never more than one unanswered request (its tries) ahead of them.
        for unit in (1, 2):
            assert len(latencies[unit]) >= 30, (unit, len(latencies[unit]))
            assert max(latencies[unit]) < timeout_per_request + 0.25, (unit, max(latencies[unit]))
        assert changes.count((9, False)) == 1 and (9, True) not in changes
        assert changes.count((1, True)) == 1 and (1, False) not in changes
        assert changes.count((2, True)) == 1 and (2, False) not in changes

        # A command to the backed-off unit is still sent, once, without retries.
        loop = asyncio.get_running_loop()
        if health9.backoff_until <= loop.time():
            with pytest.raises(DeviceUnavailable):
                await bus.read(9, "holding", 0, 1)
        assert health9.backoff_until > loop.time()
        before = line.count(9)
        with pytest.raises(DeviceUnavailable, match="no answer"):
            await bus.write(9, "coil", 0, [False])
        assert line.count(9) == before + 1
        # A poll to it now fails at once, without the wire.
        with pytest.raises(DeviceUnavailable, match="backed off"):
            await bus.read(9, "holding", 0, 1)
        assert line.count(9) == before + 1


# --- exception responses and unknown unit ids -----------------------------------------------------------


async def test_exception_responses_are_protocol_errors_with_their_code() -> None:
    port = free_port()
    line = Line(gateway_dead_units={3})
    changes: list[tuple[int, bool]] = []
    cfg = tcp_config(port, backoff_base_s=0.05, backoff_cap_s=0.1)
    async with tcp_server(line, port, units=(1, 2, 3)), \
            ModbusBus(cfg, on_state_change=lambda u, online, _r: changes.append((u, online))) as bus:
        assert await bus.read(1, "holding", 0, 1) == [100]
        with pytest.raises(ExceptionResponseError) as caught:
            await bus.read(1, "holding", 18, 4)  # 20 and 21 do not exist
        assert caught.value.code == 0x02 and caught.value.code_name == "illegal data address"
        assert isinstance(caught.value, DeviceProtocolError)
        with pytest.raises(ExceptionResponseError) as caught:
            await bus.write(1, "holding", 25, [1])
        assert caught.value.code == 0x02 and caught.value.function_code == 0x06

        # An unknown unit id: pymodbus 3.16 answers "server device failure".
        with pytest.raises(ExceptionResponseError) as caught:
            await bus.read(9, "holding", 0, 1)
        assert caught.value.code == 0x04

        # The daemon keeps going, and a device that answers with an exception is alive.
        assert await bus.read(1, "holding", 0, 2) == [100, 101]
        assert bus.unit_health(1).online is True and bus.unit_health(1).exception_responses == 2

        # A gateway whose target does not answer (0x0B) is the device being down: backed off, then offline.
        for _ in range(2):
            with pytest.raises(ExceptionResponseError) as caught:
                await bus.read(3, "holding", 0, 1)
            assert caught.value.code == 0x0B
            with pytest.raises(DeviceUnavailable, match="backed off"):
                await bus.read(3, "holding", 0, 1)
            await asyncio.sleep(0.12)
        assert bus.unit_health(3).online is False
        assert bus.stats.exception_responses == 5
        assert (1, False) not in changes and (3, False) in changes


async def test_a_server_that_answers_any_unit_id_cannot_be_told_apart() -> None:
    """The third behaviour: unit 0 in pymodbus' simulator stands for every unit id. The bus reads happily;
    only a device profile (an identity register with a known value) can catch a wrong unit id."""
    port = free_port()
    async with tcp_server(Line(), port, units=(0,)), ModbusBus(tcp_config(port)) as bus:
        assert await bus.read(77, "holding", 0, 2) == holding(0)[:2]
        assert bus.unit_health(77).online is True


# --- the link: restart, refused, missing device ---------------------------------------------------------


async def test_server_restart_gives_unavailable_then_recovery_with_one_transition_each_way() -> None:
    port = free_port()
    line = Line()
    changes: list[tuple[int, bool, str]] = []
    cfg = tcp_config(port, retries=0, reconnect_base_s=0.1, reconnect_cap_s=0.3)
    server = await start_tcp(line, port)
    try:
        async with ModbusBus(cfg, on_state_change=lambda u, online, r: changes.append((u, online, r))) as bus:
            assert await bus.read(1, "holding", 0, 1) == [100]
            await stop(server)

            failures: list[DeviceUnavailable] = []
            for _ in range(100):
                try:
                    await bus.read(1, "holding", 0, 1)
                except DeviceUnavailable as exc:
                    failures.append(exc)
                if bus.unit_health(1).online is False:
                    break
                await asyncio.sleep(0.02)
            assert bus.unit_health(1).online is False
            assert not bus.connected and bus.stats.disconnects == 1

            # Down for a while: polls keep failing, without more transitions.
            for _ in range(10):
                with pytest.raises(DeviceUnavailable):
                    await bus.read(1, "holding", 0, 1)
                await asyncio.sleep(0.03)

            server = await start_tcp(line, port)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while True:
                try:
                    assert await bus.read(1, "holding", 0, 1) == [100]
                    break
                except DeviceUnavailable:
                    assert loop.time() < deadline, "no recovery within 5 s of the server's return"
                    await asyncio.sleep(0.05)
            for _ in range(5):
                assert await bus.read(1, "holding", 0, 1) == [100]
            assert bus.connected and bus.stats.connects == 2
    finally:
        await stop(server)
    assert [(u, online) for u, online, _ in changes] == [(1, True), (1, False), (1, True)]
    assert "answering again" in changes[-1][2]


async def test_cannot_connect_says_why_and_keeps_trying(tmp_path: Path) -> None:
    port = free_port()
    cfg = tcp_config(port, reconnect_base_s=0.05, reconnect_cap_s=0.2)
    async with ModbusBus(cfg) as bus:  # entering does not fail: the owner keeps reconnecting
        assert not bus.connected
        with pytest.raises(DeviceUnavailable, match=r"refused|Connect call failed"):
            await bus.read(1, "holding", 0, 1)
        async with tcp_server(Line(), port):
            deadline = asyncio.get_running_loop().time() + 3
            while True:
                try:
                    assert await bus.read(1, "holding", 0, 1) == [100]
                    break
                except DeviceUnavailable:
                    assert asyncio.get_running_loop().time() < deadline, "no reconnect within 3 s"
                    await asyncio.sleep(0.05)

    async with ModbusBus(rtu_config(str(tmp_path / "ttyNONE"))) as bus:
        with pytest.raises(DeviceUnavailable, match="No such file"):
            await bus.read(1, "holding", 0, 1)
        # A command does not wait for the reconnect delay: it tries to open the port again at once.
        with pytest.raises(DeviceUnavailable, match="cannot connect"):
            await bus.write(1, "coil", 0, [True])
        assert bus.stats.connect_failures >= 2


# --- garbage on the line --------------------------------------------------------------------------------


async def test_garbage_on_the_rtu_line_then_normal_operation(pty_pair: tuple[str, str]) -> None:
    server_end, bus_end = pty_pair
    line = Line()
    cfg = rtu_config(bus_end, timeout_s=0.15, retries=0, backoff_base_s=0.05, backoff_cap_s=0.1)
    async with rtu_server(line, server_end), ModbusBus(cfg) as bus:
        assert await bus.read(1, "holding", 0, 4) == holding(1)[:4]

        line.junk_replies = 1  # junk instead of the answer: the CRC fails, it is dropped, nothing came
        with pytest.raises(DeviceUnavailable, match="no answer"):
            await bus.read(1, "holding", 0, 4)
        await asyncio.sleep(0.12)  # the unit's backoff

        line.short_replies = 1  # a well-formed answer with one register missing
        with pytest.raises(DeviceProtocolError, match="3 registers, expected 4"):
            await bus.read(1, "holding", 0, 4)
        await asyncio.sleep(0.12)

        # Raw junk straight into the line, towards the bus and towards the server.
        for end in (server_end, bus_end):
            fd = os.open(end, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                os.write(fd, JUNK * 4)
            finally:
                os.close(fd)
        await asyncio.sleep(0.05)

        # At most a couple of requests are lost while the receivers resynchronise; then it is all normal.
        lost = 0
        while True:
            try:
                assert await bus.read(2, "input", 0, 3) == inputs(2)[:3]
                break
            except (DeviceUnavailable, DeviceProtocolError):
                lost += 1
                assert lost <= 2
                await asyncio.sleep(0.12)
        for unit in (1, 2, 1, 2, 1, 2):
            assert await bus.read(unit, "holding", 0, 4) == holding(unit)[:4]
        await bus.write(1, "holding", 0, [5])
        assert await bus.read(1, "holding", 0, 1) == [5]
        assert bus.unit_health(1).online is True and bus.unit_health(2).online is True
