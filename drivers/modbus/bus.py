"""One Modbus bus behind our own async API: a serial RS-485 line, or one TCP connection to a Modbus server
or to a gateway/DTU with many unit ids behind it. pymodbus (pinned) stays inside this module.

A bus is one conversation, so one owner task talks on it, one frame at a time::

    read()/write() callers                      owner task (one per bus)
      COMMAND ──► commands deque (not capped) ─┐
                                               ├─► take: all commands first ─► wait the inter-frame gap
      POLL ────► polls deque (max_pending_polls)┘         ─► one request/response ─► translate ─► caller's future
                  │ full → BusBusy (counted)
                  │ unit backed off → DeviceUnavailable at once, nothing sent

Overflow policy: a poll beyond ``max_pending_polls`` waiting polls is refused with :class:`BusBusy` and
counted in ``stats.refused_polls`` (the poller tries again next cycle, its reading is simply late). A command
is never refused for lack of room: cut-offs and gate openings must go out, and callers await each command,
so the lane is bounded by the number of callers; its depth shows in ``stats.queue_depth``.

Health per unit id: a request that gets no answer, a garbled answer or a gateway exception (0x0A/0x0B) counts
as a failure. After each failure the unit is backed off, ``backoff_base_s * 2**(n-1)`` capped at
``backoff_cap_s``, times a random factor in [0.5, 1]; while it lasts, its polls fail at once with
DeviceUnavailable and never reach the wire, so a dead charger cannot slow its neighbours on the line. A command
to a backed-off unit is still sent, once, without retries. Once a unit is offline, the poll that goes out when its
backoff has run out is a probe: one try, no retries, and a timeout cut to three times the unit's slowest answer
(plus the frames' time on the wire, at least 50 ms, at most ``timeout_s``). ``offline_after_failures`` failures in
a row make the unit offline and the first good answer brings it back; ``on_state_change(unit, online, reason)``
is called once per change (the first verdict on a unit counts as a change) and the bus logs each change once.

Errors, translated here with the cause kept:

- no answer within ``timeout_s`` (after ``retries`` more tries), link down or cannot connect → DeviceUnavailable
- an exception response → :class:`ExceptionResponseError` (a DeviceProtocolError) with ``.code``
- an answer of the wrong length, function or echo, or undecodable bytes → DeviceProtocolError

Unknown unit ids: servers answer in one of three ways, and each lands somewhere defined. pymodbus itself (and
many gateways) send an exception (0x04 from pymodbus 3.16's simulator, 0x0B from proper gateways): a protocol
error with its code. A silent server times out: DeviceUnavailable, and the unit is backed off. A server that
answers for any unit id cannot be told apart at this layer; only the device profile can (an identity register
that must hold a known value).

The owner reconnects: after a lost link (or ``drop_after_silent`` unanswered frames in a row on TCP, which is
how a half-open 4G link shows) the next request reconnects, with full-jitter backoff between failed attempts
up to ``reconnect_cap_s``; polls fail at once while waiting, commands always try. pymodbus' own reconnect task
is switched off (``reconnect_delay=0``) so only one place reconnects; its delay doubled up to 300 s by default.

Nothing here blocks the loop: the pymodbus clients are asyncio, and opening a serial port is a few
non-blocking system calls (pyserial opens with O_NONBLOCK and takes its lock with LOCK_NB).

pymodbus 3.16.1 details this module relies on (pinned in pyproject.toml):
- its response timeout and its connect timeout are one parameter; we enforce both ourselves with
  ``asyncio.timeout`` and give pymodbus a larger backstop, so its own retry/"close after retries+3 silent
  requests" path never runs;
- it does not fail a pending request when the link drops: that request runs into our timeout;
- ``connect()`` returns False and logs instead of raising; we wrap its transport factory to keep the reason
  (refused, no such device) for our error messages;
- an RTU frame with a bad CRC is dropped silently (so line noise shows as a timeout), and a frame for
  another unit id is skipped.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.pdu import ModbusPDU

from edgeagent.drivers.modbus.config import ModbusBusConfig as BusConfig
from edgeagent.kernel.errors import DeviceProtocolError, DeviceUnavailable, EdgeagentError
from edgeagent.kernel.runtime.backoff import full_jitter

log = logging.getLogger(__name__)

Table = Literal["coil", "discrete_input", "holding", "input"]
WritableTable = Literal["coil", "holding"]
BitTable = Literal["coil", "discrete_input"]
RegisterTable = Literal["holding", "input"]
StateCallback = Callable[[int, bool, str], None]

# Modbus application protocol limits (V1.1b3, sections 6.1-6.12).
_MAX_READ = {"coil": 2000, "discrete_input": 2000, "holding": 125, "input": 125}
_MAX_WRITE = {"coil": 1968, "holding": 123}
_READ_FC = {"coil": 0x01, "discrete_input": 0x02, "holding": 0x03, "input": 0x04}
_EXCEPTION_NAMES = {
    0x01: "illegal function",
    0x02: "illegal data address",
    0x03: "illegal data value",
    0x04: "server device failure",
    0x05: "acknowledge",
    0x06: "server device busy",
    0x08: "memory parity error",
    0x0A: "gateway path unavailable",
    0x0B: "gateway target device failed to respond",
}
# The least an offline unit's single probe waits, whatever its answers took before (loopback answers in
# microseconds; a real device's firmware may pause for tens of milliseconds now and then).
_PROBE_FLOOR_S = 0.05
# A gateway saying its target is unreachable is the device being down, not the device talking back.
_GATEWAY_CODES = frozenset({0x0A, 0x0B})


class Priority(enum.IntEnum):
    """Lower goes first. Commands (writes, urgent reads) always go out before queued polls."""

    COMMAND = 0
    POLL = 1


class BusBusy(DeviceUnavailable):
    """A poll was refused because ``max_pending_polls`` polls already wait. Nothing was sent; the unit's
    health is unchanged. Poll again next cycle."""


class ExceptionResponseError(DeviceProtocolError):
    """The device (or a gateway in front of it) answered with a Modbus exception response."""

    def __init__(self, message: str, *, unit: int, function_code: int, code: int) -> None:
        super().__init__(message)
        self.unit = unit
        self.function_code = function_code
        self.code = code

    @property
    def code_name(self) -> str:
        return _EXCEPTION_NAMES.get(self.code, "unknown exception")


class _LinkDown(DeviceUnavailable):
    """Not connected (or cannot connect): says nothing about the unit itself, so it is not backed off."""


class _BackedOff(DeviceUnavailable):
    """A poll refused while its unit is backed off; nothing was sent."""


class _NoAnswer(DeviceUnavailable):
    """Every try timed out."""


@dataclass(slots=True)
class UnitHealth:
    """What the bus knows about one unit id. ``online`` is None until the first verdict."""

    unit: int
    online: bool | None = None
    requests: int = 0
    wire_attempts: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    exception_responses: int = 0
    backoff_until: float = 0.0
    last_error: str = ""
    changed_at: float = 0.0
    slowest_answer_s: float = 0.0  # the longest request → answer time seen from this unit
    probes: int = 0  # single short tries sent while it was offline


@dataclass(slots=True)
class BusStats:
    """Counters kept on the bus (read them; the bus writes them)."""

    requests: int = 0          # read()/write() calls
    succeeded: int = 0
    failed: int = 0            # every failed call, including refused and fast-failed ones
    refused_polls: int = 0     # BusBusy: the poll lane was full
    fast_failed: int = 0       # answered at once without the wire (unit backed off, or link down and waiting)
    wire_attempts: int = 0     # frames sent
    exception_responses: int = 0
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    queue_depth: int = 0       # requests waiting now (both lanes)
    max_queue_depth: int = 0
    last_latency_s: float | None = None  # request sent → answer decoded, for the last answered request
    units: dict[int, UnitHealth] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _Request:
    op: Literal["read", "write"]
    unit: int
    table: Table
    address: int
    count: int
    values: tuple[int, ...]
    priority: Priority
    multiple: bool
    future: asyncio.Future[list[int] | list[bool] | None]

    def describe(self) -> str:
        span = f"{self.address}" if self.count == 1 else f"{self.address}+{self.count}"
        return f"{self.op} {self.table} {span}"


class ModbusBus:
    """``async with ModbusBus(cfg) as bus: regs = await bus.read(1, "holding", 0, 4)``.

    Reusable, not re-entrant. Entering makes one connection attempt and does not fail if the bus is down:
    requests then fail with DeviceUnavailable carrying the reason, and the owner keeps reconnecting.
    """

    def __init__(self, cfg: BusConfig, *, on_state_change: StateCallback | None = None,
                 rng: random.Random | None = None, probe_floor_s: float = _PROBE_FLOOR_S) -> None:
        self.cfg = cfg
        self.name = cfg.label
        self.stats = BusStats()
        self._on_state_change = on_state_change
        self._rng = rng or random.Random()
        self._timeout_s = cfg.response_timeout_s
        self._gap_s = cfg.frame_gap_s
        self._probe_floor_s = probe_floor_s
        self._commands: deque[_Request] = deque()
        self._polls: deque[_Request] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._quiet_until = 0.0
        self._link_up: bool | None = None
        self._link_error = ""
        self._connect_failures = 0
        self._next_connect_at = 0.0
        self._silent_in_row = 0

    # --- public API ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    @property
    def queue_depth(self) -> int:
        return len(self._commands) + len(self._polls)

    def unit_health(self, unit: int) -> UnitHealth:
        return self._unit(unit)

    @overload
    async def read(self, unit: int, table: BitTable, address: int, count: int, *,
                   priority: Priority = ...) -> list[bool]: ...

    @overload
    async def read(self, unit: int, table: RegisterTable, address: int, count: int, *,
                   priority: Priority = ...) -> list[int]: ...

    async def read(self, unit: int, table: Table, address: int, count: int, *,
                   priority: Priority = Priority.POLL) -> list[int] | list[bool]:
        """Read ``count`` coils/inputs (as bools) or registers (as ints 0..65535) from ``address`` (0-based)."""
        if table not in _MAX_READ:
            raise ValueError(f"unknown table {table!r}")
        _check_unit(unit, low=0 if self.cfg.kind == "tcp" else 1)
        _check_span(address, count, _MAX_READ[table])
        result = await self._submit(_Request("read", unit, table, address, count, (), priority, False,
                                             self._new_future()))
        assert result is not None  # reads always produce values
        return result

    async def write(self, unit: int, table: WritableTable, address: int, values: list[int] | list[bool], *,
                    priority: Priority = Priority.COMMAND, multiple: bool = False) -> None:
        """Write coils (bools) or holding registers (ints 0..65535) from ``address``.

        One value goes out as function 5 or 6, several as 15 or 16; ``multiple=True`` forces 15/16 for the
        devices that only implement those. On an RTU bus unit 0 is a broadcast: nobody answers, the bus just
        keeps quiet for ``broadcast_turnaround_s`` afterwards.
        """
        if table not in _MAX_WRITE:
            raise ValueError(f"cannot write to table {table!r} (only 'coil' and 'holding')")
        _check_unit(unit, low=0)
        _check_span(address, len(values), _MAX_WRITE[table])
        words: tuple[int, ...]
        if table == "coil":
            if not all(isinstance(v, bool) or v in (0, 1) for v in values):
                raise ValueError("coil values must be booleans")
            words = tuple(int(bool(v)) for v in values)
        else:
            if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0xFFFF for v in values):
                raise ValueError("register values must be ints 0..65535")
            words = tuple(int(v) for v in values)
        await self._submit(_Request("write", unit, table, address, len(words), words, priority, multiple,
                                    self._new_future()))

    # --- context manager -------------------------------------------------------------------------

    async def __aenter__(self) -> ModbusBus:
        if self._task is not None:
            raise RuntimeError(f"{self.name}: bus already open (not re-entrant)")
        self._loop = asyncio.get_running_loop()
        self._client = self._make_client()
        try:
            await self._connect()
        except BaseException:
            self._close_client()
            raise
        self._task = asyncio.create_task(self._run(), name=f"modbus-bus {self.name}")
        self._task.add_done_callback(self._owner_done)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        try:
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        finally:
            self._fail_waiting(lambda: DeviceUnavailable(f"{self.name}: bus closed"))
            self._close_client()

    # --- intake ----------------------------------------------------------------------------------

    def _new_future(self) -> asyncio.Future[list[int] | list[bool] | None]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, req: _Request) -> list[int] | list[bool] | None:
        if self._task is None or self._task.done():
            raise DeviceUnavailable(f"{self.name}: bus is not open")
        health = self._unit(req.unit)
        self.stats.requests += 1
        health.requests += 1
        if req.priority is Priority.POLL:
            try:
                self._refuse_if_backed_off(req, health)
            except _BackedOff:
                self.stats.failed += 1
                raise
            if len(self._polls) >= self.cfg.max_pending_polls:
                self.stats.refused_polls += 1
                self.stats.failed += 1
                raise BusBusy(f"{self.name}: {len(self._polls)} polls already waiting; "
                              f"unit {req.unit} {req.describe()} refused")
            self._polls.append(req)
        else:
            self._commands.append(req)
        self._depth_changed()
        self._wakeup.set()
        return await req.future

    def _refuse_if_backed_off(self, req: _Request, health: UnitHealth) -> None:
        wait_s = health.backoff_until - self._now()
        if wait_s > 0:
            self.stats.fast_failed += 1
            raise _BackedOff(f"{self.name}: unit {req.unit} backed off for {wait_s:.1f} s after "
                             f"{health.consecutive_failures} failures ({health.last_error}); {req.describe()} not sent")

    def _depth_changed(self) -> None:
        depth = self.queue_depth
        self.stats.queue_depth = depth
        self.stats.max_queue_depth = max(self.stats.max_queue_depth, depth)

    def _fail_waiting(self, make_error: Callable[[], Exception]) -> None:
        while self._commands or self._polls:
            req = self._commands.popleft() if self._commands else self._polls.popleft()
            if not req.future.done():
                req.future.set_exception(make_error())
        self._depth_changed()

    # --- the owner task --------------------------------------------------------------------------

    async def _take(self) -> _Request:
        while not (self._commands or self._polls):
            self._wakeup.clear()
            await self._wakeup.wait()
        req = self._commands.popleft() if self._commands else self._polls.popleft()
        self._depth_changed()
        return req

    async def _run(self) -> None:
        while True:
            req = await self._take()
            if req.future.done():  # the caller gave up while it waited
                continue
            try:
                result = await self._serve(req)
            except asyncio.CancelledError:
                if not req.future.done():
                    req.future.set_exception(DeviceUnavailable(f"{self.name}: bus closed"))
                raise
            except Exception as exc:
                self.stats.failed += 1
                if not isinstance(exc, EdgeagentError):
                    log.exception("%s: unit %d %s failed unexpectedly", self.name, req.unit, req.describe())
                if not req.future.done():
                    req.future.set_exception(exc)
            else:
                self.stats.succeeded += 1
                if not req.future.done():
                    req.future.set_result(result)

    def _owner_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: owner task died", self.name, exc_info=task.exception())
        self._fail_waiting(lambda: DeviceUnavailable(f"{self.name}: bus closed"))

    async def _serve(self, req: _Request) -> list[int] | list[bool] | None:
        health = self._unit(req.unit)
        backed_off = health.backoff_until > self._now()
        if backed_off and req.priority is Priority.POLL:
            self._refuse_if_backed_off(req, health)  # raises: it went into backoff while this poll waited
        broadcast = req.unit == 0 and self.cfg.rtu_framing
        # A unit known to be offline gets one short try per backoff period: no retries, and a timeout cut to
        # what its own answers have taken, so a dead charger costs its healthy neighbours one brief silence
        # per period instead of (1 + retries) full timeouts.
        probing = health.online is False and not broadcast
        timeout_s = self._probe_timeout(req, health) if probing else self._timeout_s
        if probing:
            health.probes += 1
        try:
            await self._ensure_connected(req)
            result = await self._exchange(req, tries=1 if backed_off or probing else 1 + self.cfg.retries,
                                          broadcast=broadcast, timeout_s=timeout_s)
        except ExceptionResponseError as exc:
            self.stats.exception_responses += 1
            health.exception_responses += 1
            if exc.code in _GATEWAY_CODES:
                self._unit_failed(health, str(exc), backoff=True)
            else:
                self._unit_answered(health)  # it is alive; the request was wrong
            raise
        except _LinkDown as exc:
            self._unit_failed(health, str(exc), backoff=False)
            raise
        except (DeviceUnavailable, DeviceProtocolError) as exc:
            self._unit_failed(health, str(exc), backoff=True)
            raise
        if not broadcast:
            self._unit_answered(health)
        return result

    def _probe_timeout(self, req: _Request, health: UnitHealth) -> float:
        """The wait for an offline unit's one try: three times its slowest answer so far, plus the frames' time
        on the wire, at least ``probe_floor_s``; never more than the normal timeout, which is also what a unit
        that has never answered gets (nothing is known of how slow it is)."""
        if health.slowest_answer_s <= 0:
            return self._timeout_s
        wire_s = 0.0
        if self.cfg.rtu_framing:
            answer = 5 + (2 * req.count if req.table in ("holding", "input") else (req.count + 7) // 8)
            wire_s = (8 + answer) * self.cfg.char_time_s if req.op == "read" else 16 * self.cfg.char_time_s
        return min(self._timeout_s, max(self._probe_floor_s, 3 * health.slowest_answer_s) + wire_s)

    async def _exchange(self, req: _Request, *, tries: int, broadcast: bool,
                        timeout_s: float | None = None) -> list[int] | list[bool] | None:
        health = self._unit(req.unit)
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        for attempt in range(1, tries + 1):
            wait_s = self._quiet_until - self._now()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            client = self._client
            if client is None or not client.connected:
                raise _LinkDown(f"{self.name}: connection lost ({self._link_error or 'closed'})")
            self.stats.wire_attempts += 1
            health.wire_attempts += 1
            started = self._now()
            try:
                async with asyncio.timeout(timeout_s):
                    pdu = await self._send(client, req, broadcast)
            except TimeoutError:
                self._quiet_until = self._now() + self._gap_s
                self._unanswered()
                # A poll gives up its remaining tries to a waiting command: commands never wait behind
                # more than one unanswered frame.
                if attempt < tries and not (req.priority is Priority.POLL and self._commands):
                    log.debug("%s: unit %d %s: no answer, try %d of %d", self.name, req.unit, req.describe(),
                              attempt, tries)
                    continue
                raise _NoAnswer(f"{self.name}: unit {req.unit} {req.describe()}: no answer within "
                                f"{timeout_s:g} s ({tries} {'try' if tries == 1 else 'tries'})") from None
            except ConnectionException as exc:
                raise _LinkDown(f"{self.name}: not connected: {exc}") from exc
            except ModbusException as exc:
                self._quiet_until = self._now() + self._gap_s
                self._silent_in_row = 0
                raise DeviceProtocolError(f"{self.name}: unit {req.unit} {req.describe()}: bad answer: {exc}") from exc
            except OSError as exc:
                raise _LinkDown(f"{self.name}: link error: {exc}") from exc
            if broadcast:
                self._quiet_until = self._now() + max(self._gap_s, self.cfg.broadcast_turnaround_s)
                return None
            self._quiet_until = self._now() + self._gap_s
            self._silent_in_row = 0
            latency_s = self._now() - started
            self.stats.last_latency_s = latency_s
            health.slowest_answer_s = max(health.slowest_answer_s, latency_s)
            return self._check(req, pdu)
        raise AssertionError("unreachable: tries >= 1")

    def _send(self, client: AsyncModbusTcpClient | AsyncModbusSerialClient, req: _Request,
              broadcast: bool) -> Awaitable[ModbusPDU]:
        # pymodbus keeps the lists it is given inside its PDUs: always hand it fresh ones.
        unit, address = req.unit, req.address
        if req.op == "read":
            if req.table == "coil":
                return client.read_coils(address, count=req.count, device_id=unit)
            if req.table == "discrete_input":
                return client.read_discrete_inputs(address, count=req.count, device_id=unit)
            if req.table == "holding":
                return client.read_holding_registers(address, count=req.count, device_id=unit)
            return client.read_input_registers(address, count=req.count, device_id=unit)
        single = req.count == 1 and not req.multiple
        if req.table == "coil":
            if single:
                return client.write_coil(address, bool(req.values[0]), device_id=unit, no_response_expected=broadcast)
            return client.write_coils(address, [bool(v) for v in req.values], device_id=unit,
                                      no_response_expected=broadcast)
        if single:
            return client.write_register(address, req.values[0], device_id=unit, no_response_expected=broadcast)
        return client.write_registers(address, list(req.values), device_id=unit, no_response_expected=broadcast)

    def _check(self, req: _Request, pdu: ModbusPDU) -> list[int] | list[bool] | None:
        """Turn an answer into values, or raise: an exception response, or an answer that does not fit."""
        where = f"{self.name}: unit {req.unit} {req.describe()}"
        expected_fc = self._function_code(req)
        if pdu.isError():
            code = pdu.exception_code
            name = _EXCEPTION_NAMES.get(code, "unknown exception")
            raise ExceptionResponseError(f"{where}: exception 0x{code:02X} ({name})", unit=req.unit,
                                         function_code=expected_fc, code=code)
        if pdu.function_code != expected_fc:
            raise DeviceProtocolError(f"{where}: answer has function {pdu.function_code}, expected {expected_fc}")
        if req.op == "read":
            if req.table in ("coil", "discrete_input"):
                bits = list(pdu.bits)
                if len(bits) != 8 * math.ceil(req.count / 8):
                    raise DeviceProtocolError(f"{where}: answer has {len(bits)} bits, expected {req.count}")
                return [bool(b) for b in bits[:req.count]]
            registers = list(pdu.registers)
            if len(registers) != req.count:
                raise DeviceProtocolError(f"{where}: answer has {len(registers)} registers, expected {req.count}")
            return registers
        if expected_fc in (0x05, 0x06):
            echoed = [int(b) for b in pdu.bits[:1]] if expected_fc == 0x05 else list(pdu.registers[:1])
            if pdu.address != req.address or echoed != [req.values[0]]:
                raise DeviceProtocolError(f"{where}: echo is address {pdu.address} value {echoed}, "
                                          f"expected {req.address} {req.values[0]}")
        elif pdu.address != req.address or pdu.count != req.count:
            raise DeviceProtocolError(f"{where}: echo is address {pdu.address} count {pdu.count}")
        return None

    @staticmethod
    def _function_code(req: _Request) -> int:
        if req.op == "read":
            return _READ_FC[req.table]
        single = req.count == 1 and not req.multiple
        if req.table == "coil":
            return 0x05 if single else 0x0F
        return 0x06 if single else 0x10

    # --- health ----------------------------------------------------------------------------------

    def _unit(self, unit: int) -> UnitHealth:
        health = self.stats.units.get(unit)
        if health is None:
            health = self.stats.units[unit] = UnitHealth(unit)
        return health

    def _unit_answered(self, health: UnitHealth) -> None:
        health.consecutive_failures = 0
        health.backoff_until = 0.0
        if health.online is not True:
            if health.online is False:
                reason = f"answering again after {self._now() - health.changed_at:.1f} s"
                log.info("%s: unit %d back online (%s)", self.name, health.unit, reason)
            else:
                reason = "answering"
                log.info("%s: unit %d online", self.name, health.unit)
            self._set_online(health, True, reason)

    def _unit_failed(self, health: UnitHealth, reason: str, *, backoff: bool) -> None:
        health.failures += 1
        health.consecutive_failures += 1
        health.last_error = reason
        if backoff:
            exponent = min(health.consecutive_failures - 1, 30)
            ceiling = min(self.cfg.backoff_cap_s, self.cfg.backoff_base_s * 2 ** exponent)
            health.backoff_until = self._now() + ceiling * self._rng.uniform(0.5, 1.0)
        if health.online is not False and health.consecutive_failures >= self.cfg.offline_after_failures:
            log.warning("%s: unit %d offline after %d failures: %s", self.name, health.unit,
                        health.consecutive_failures, reason)
            self._set_online(health, False, reason)

    def _set_online(self, health: UnitHealth, online: bool, reason: str) -> None:
        health.online = online
        health.changed_at = self._now()
        if self._on_state_change is None:
            return
        try:
            self._on_state_change(health.unit, online, reason)
        except Exception:
            log.exception("%s: unit %d state callback failed", self.name, health.unit)

    # --- the link --------------------------------------------------------------------------------

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        cfg = self.cfg
        # A backstop only: our own asyncio.timeout() fires first, see the module docstring.
        backstop_s = max(self._timeout_s, cfg.connect_timeout_s) + 1.0
        client: AsyncModbusTcpClient | AsyncModbusSerialClient
        if cfg.kind == "rtu":
            assert cfg.serial_port is not None  # checked by BusConfig
            client = AsyncModbusSerialClient(
                cfg.serial_port, framer=FramerType.RTU, baudrate=cfg.baudrate, bytesize=cfg.bytesize,
                parity=cfg.parity, stopbits=cfg.stopbits, name=self.name, reconnect_delay=0,
                timeout=backstop_s, retries=0, trace_connect=self._on_link)
        else:
            assert cfg.host is not None  # checked by BusConfig
            client = AsyncModbusTcpClient(
                cfg.host, port=cfg.port, framer=FramerType.RTU if cfg.kind == "rtu_over_tcp" else FramerType.SOCKET,
                name=self.name, reconnect_delay=0, timeout=backstop_s, retries=0, trace_connect=self._on_link)
        self._keep_connect_errors(client)
        return client

    def _keep_connect_errors(self, client: AsyncModbusTcpClient | AsyncModbusSerialClient) -> None:
        """pymodbus' connect() logs the reason and returns False; keep the reason for our messages."""
        create = client.ctx.call_create

        async def create_keeping_error() -> Any:
            try:
                return await create()
            except OSError as exc:
                self._link_error = str(exc) or type(exc).__name__
                raise

        client.ctx.call_create = create_keeping_error

    def _on_link(self, up: bool) -> None:
        """pymodbus' connect hook: True once connected, False when the link drops (not on our own close)."""
        if not up and self._link_up:
            self.stats.disconnects += 1
            self._link_error = "connection lost"
            self._link_up = False
            log.warning("%s: connection lost", self.name)

    async def _ensure_connected(self, req: _Request) -> None:
        if self.connected:
            return
        wait_s = self._next_connect_at - self._now()
        if req.priority is Priority.POLL and wait_s > 0:
            self.stats.fast_failed += 1
            raise _LinkDown(f"{self.name}: not connected ({self._link_error}); next try in {wait_s:.1f} s")
        if not await self._connect():
            raise _LinkDown(f"{self.name}: cannot connect: {self._link_error}")

    async def _connect(self) -> bool:
        client = self._client
        assert client is not None
        client.close()  # drop what is left of the previous link before opening a new one
        self._link_error = ""
        try:
            async with asyncio.timeout(self.cfg.connect_timeout_s):
                ok = await client.connect()
        except TimeoutError:
            ok = False
            self._link_error = f"no connection within {self.cfg.connect_timeout_s:g} s"
        if ok:
            self.stats.connects += 1
            self._connect_failures = 0
            self._next_connect_at = 0.0
            self._silent_in_row = 0
            self._quiet_until = self._now() + self._gap_s
            if self._link_up is False:
                log.info("%s: connected again", self.name)
            else:
                log.info("%s: connected", self.name)
            self._link_up = True
            return True
        self._link_error = self._link_error or "connection failed"
        self.stats.connect_failures += 1
        delay_s = full_jitter(self._connect_failures, self.cfg.reconnect_base_s, self.cfg.reconnect_cap_s, self._rng)
        self._connect_failures += 1
        self._next_connect_at = self._now() + delay_s
        if self._link_up is not False:
            log.warning("%s: cannot connect: %s (retrying with backoff, logged once)", self.name, self._link_error)
            self._link_up = False
        return False

    def _unanswered(self) -> None:
        """A frame went unanswered. On TCP many in a row, across all units, mean the link is dead without
        having been closed (a 4G converter that lost its uplink): drop it so the next request reconnects."""
        self._silent_in_row += 1
        if self.cfg.kind == "rtu":
            return
        if self._silent_in_row >= self.cfg.drop_after_silent and self._client is not None:
            log.warning("%s: %d frames in a row unanswered; reconnecting", self.name, self._silent_in_row)
            self._silent_in_row = 0
            self._link_error = "link silent"
            self._link_up = False
            self.stats.disconnects += 1
            self._client.close()

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._link_up = None

    def _now(self) -> float:
        loop = self._loop or asyncio.get_running_loop()
        return loop.time()


def _check_unit(unit: int, *, low: int) -> None:
    """Unit 0 is the broadcast address on a serial line (writes only) and an ordinary id on Modbus TCP."""
    if not isinstance(unit, int) or not low <= unit <= 255:
        raise ValueError(f"unit id must be {low}..255 (got {unit!r})")


def _check_span(address: int, count: int, max_count: int) -> None:
    if not 0 <= address <= 0xFFFF:
        raise ValueError(f"address must be 0..65535 (got {address})")
    if not 1 <= count <= max_count:
        raise ValueError(f"count must be 1..{max_count} (got {count})")
    if address + count > 0x10000:
        raise ValueError(f"address {address} + count {count} runs past 65535")


__all__ = [
    "BusBusy",
    "BusConfig",
    "BusStats",
    "ExceptionResponseError",
    "ModbusBus",
    "Priority",
    "Table",
    "UnitHealth",
    "WritableTable",
]
