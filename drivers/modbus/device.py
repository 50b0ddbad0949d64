"""One Modbus device driven by its profile: polls its block reads on the bus, turns values into
telemetry (on change beyond a deadband, and at least every ``max_interval_s``) and events (the
profile's triggers), and runs the profile's commands with command priority.

The per-point logic (:class:`PointTracker`) is pure: value + time in, what to emit out; the device
class does the I/O around it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgeagent.drivers.modbus.codec import CodecError
from edgeagent.drivers.modbus.plan import ReadBlock
from edgeagent.drivers.modbus.profile_model import OnChange, OnEdge, OnState, OnThreshold, Pause, Point, Profile
from edgeagent.kernel.errors import DeviceProtocolError, DeviceUnavailable
from edgeagent.kernel.pipeline.event_types import SENSOR_READING, SensorReading
from edgeagent.kernel.pipeline.events import EventData

log = logging.getLogger(__name__)

Value = bool | int | float | str | dict[str, bool]


@dataclass(frozen=True, slots=True)
class Emit:
    """Something to raise for a point: an event of ``type`` with ``data``."""

    type: str
    data: dict[str, Any]


@dataclass(slots=True)
class _PointState:
    value: Value | None = None
    reported: float | None = None  # last value sent as telemetry
    reported_at: float | None = None
    armed: dict[int, bool] = field(default_factory=dict)  # threshold trigger index -> armed


class PointTracker:
    """Pure per-point state: decides telemetry and events from successive readings."""

    def __init__(self) -> None:
        self._state: dict[str, _PointState] = {}

    def value(self, name: str) -> Value | None:
        st = self._state.get(name)
        return None if st is None else st.value

    def update(self, point: Point, value: Value, now: float) -> tuple[float | None, list[Emit]]:
        """Returns (telemetry value to report or None, events to raise)."""
        st = self._state.setdefault(point.name, _PointState())
        previous = st.value
        st.value = value
        events: list[Emit] = []
        for index, trig in enumerate(point.events):
            emit = self._trigger(point, st, index, trig, previous, value)
            if emit is not None:
                events.append(emit)
        return self._telemetry(point, st, value, now), events

    def _base(self, point: Point, trig: Any, value: Value, previous: Value | None, kind: str) -> dict[str, Any]:
        data: dict[str, Any] = {"point": point.name, "value": value, "trigger": kind}
        if point.port is not None:
            data["port"] = point.port
        if previous is not None:
            data["previous"] = previous
        if point.unit:
            data["unit"] = point.unit
        return data

    def _trigger(self, point: Point, st: _PointState, index: int, trig: Any, previous: Value | None,
                 value: Value) -> Emit | None:
        if isinstance(trig, OnChange):
            if previous is not None and previous != value:
                return Emit(trig.event, self._base(point, trig, value, previous, "change"))
            return None
        if isinstance(trig, OnEdge):
            now_b = _bit(value, trig.bit)
            was_b = None if previous is None else _bit(previous, trig.bit)
            if was_b is None or now_b is None or was_b == now_b:
                return None
            if (trig.on == "rising") == now_b:
                return Emit(trig.event, self._base(point, trig, value, previous, trig.on))
            return None
        if isinstance(trig, OnState):
            if previous is None or previous == value:
                return None
            entered = value == trig.state and trig.on == "enter"
            left = previous == trig.state and trig.on == "leave"
            if entered or left:
                return Emit(trig.event, self._base(point, trig, value, previous, trig.on))
            return None
        if isinstance(trig, OnThreshold):
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                return None
            armed = st.armed.get(index, True)
            crossed = value > trig.threshold if trig.on == "above" else value < trig.threshold
            rearm = (value < trig.threshold - trig.hysteresis if trig.on == "above"
                     else value > trig.threshold + trig.hysteresis)
            if armed and crossed:
                st.armed[index] = False
                data = self._base(point, trig, value, previous, trig.on)
                data["threshold"] = trig.threshold
                return Emit(trig.event, data)
            if not armed and rearm:
                st.armed[index] = True
            return None
        return None

    def heartbeat_at(self, point: Point) -> float:
        """When an unchanged reading of ``point`` would next be reported (its ``max_interval_s`` since the last
        report): ``inf`` if it has no heartbeat, ``-inf`` if it has one and nothing was reported yet."""
        tel = point.telemetry
        if tel is None or tel.max_interval_s is None:
            return math.inf
        st = self._state.get(point.name)
        if st is None or st.reported_at is None:
            return -math.inf
        return st.reported_at + tel.max_interval_s

    @staticmethod
    def _telemetry(point: Point, st: _PointState, value: Value, now: float) -> float | None:
        tel = point.telemetry
        if tel is None or isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        due = st.reported is None or st.reported_at is None
        if not due:
            assert st.reported is not None and st.reported_at is not None
            moved = abs(value - st.reported)
            due = moved > tel.deadband if tel.deadband > 0 else moved > 0
            if not due and tel.max_interval_s is not None:
                due = now - st.reported_at >= tel.max_interval_s
        if due:
            st.reported = float(value)
            st.reported_at = now
            return float(value)
        return None


def _bit(value: Value | None, bit: str | None) -> bool | None:
    if bit is not None:
        return value.get(bit) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    return None


@dataclass(slots=True)
class _BlockMemo:
    block: ReadBlock[Point]
    spans: tuple[tuple[Point, str, int, int], ...]  # (point, its name, first word, end) in the block's answer
    words: list[int] | None = None  # the whole answer when every point of it was last settled
    due: float = -math.inf  # the earliest heartbeat among its points then


class Bus(Protocol):
    """What a device needs of its bus (drivers/modbus/bus.py's ModbusBus)."""

    async def read(self, unit: int, table: Any, address: int, count: int, *, priority: Any = ...) -> list[Any]: ...

    async def write(self, unit: int, table: Any, address: int, values: list[Any], *, priority: Any = ...) -> None: ...


class Sink(Protocol):
    async def emit(self, type_name: str, device_id: str, data: Mapping[str, Any]) -> Any: ...

    def emit_telemetry(self, type_name: str, device_id: str, data: Mapping[str, Any] | EventData) -> None: ...


ValueListener = Callable[[Point, Value, Value | None], Awaitable[None]]


class ModbusDevice:
    """Polls one unit id on a bus according to its profile."""

    def __init__(self, device_id: str, unit: int, profile: Profile, bus: Bus, sink: Sink, *,
                 poll_interval_s: float | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.device_id = device_id
        self.unit = unit
        self.profile = profile
        self._bus = bus
        self._sink = sink
        self._now = monotonic
        self.tracker = PointTracker()
        plan = profile.read_plan()
        # A device-level poll interval overrides the profile's defaults (per-register ones stay faster).
        self._blocks: list[tuple[ReadBlock[Point], float]] = [
            (b, min(b.poll_interval_s, poll_interval_s) if poll_interval_s else b.poll_interval_s) for b in plan]
        self._listeners: list[ValueListener] = []
        # Per point: the words it had when last decoded, and when its heartbeat falls due. A point whose words
        # did not move decodes to the same value, so (with no listener to tell) it raises no event and no
        # telemetry beyond its heartbeat: most registers of most polls stop there. Decoding and tracking every
        # register of every poll were the largest part of the daemon's own polling CPU (bench/RESULTS.md).
        self._last: dict[str, tuple[list[int], float]] = {}
        # Per block: its points' word spans, worked out once, and its whole answer when last settled.
        self._memos: dict[int, _BlockMemo] = {}
        self.last_poll_at: float | None = None
        self.last_error: str | None = None
        self.polls = 0
        self.poll_failures = 0

    def listen(self, listener: ValueListener) -> None:
        """Called for every decoded value, before events are emitted (local rules hook in here)."""
        self._listeners.append(listener)

    def value(self, name: str) -> Value | None:
        return self.tracker.value(name)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_due = [loop.time() for _ in self._blocks]
        if not self._blocks:
            await asyncio.Event().wait()
        while True:
            i = min(range(len(self._blocks)), key=next_due.__getitem__)
            delay = next_due[i] - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            block, interval = self._blocks[i]
            # Schedule from the due time, not from now, so polls do not drift; skip missed slots.
            next_due[i] += interval
            if next_due[i] < loop.time():
                next_due[i] = loop.time() + interval
            await self.poll_block(block)

    async def poll_block(self, block: ReadBlock[Point]) -> None:
        try:
            words = list(map(int, await self._bus.read(self.unit, block.table, block.address, block.count)))
            if len(words) < block.count:
                block.split(words)  # raises CodecError naming the short answer
        except (DeviceUnavailable, DeviceProtocolError, CodecError) as exc:
            # The bus reports offline/online transitions once each; here only count and remember.
            self.poll_failures += 1
            self.last_error = str(exc)
            return
        self.polls += 1
        now = self._now()
        self.last_poll_at = now
        last = self._last
        listening = bool(self._listeners)
        tracker = self.tracker
        memo = self._memo(block)
        if not listening and memo.words == words and now < memo.due:
            return  # not one word moved and no heartbeat is due: the common poll of a quiet device
        due = math.inf
        for point, name, start, stop in memo.spans:
            point_words = words[start:stop]
            # Unchanged words give the same value: no trigger can fire (each compares with the previous value,
            # and a threshold's arming is settled by the first reading of a value), only a heartbeat can be
            # due. Listeners (local safety rules) still see every reading.
            seen = last.get(name)
            if seen is not None and not listening and seen[0] == point_words and now < seen[1]:
                due = min(due, seen[1])
                continue
            try:
                value = point.decode(point_words)
            except CodecError as exc:
                last.pop(name, None)
                due = -math.inf  # this point has no settled words: the whole-block shortcut must not apply
                log.warning("%s: %s: cannot decode %s: %s", self.device_id, name, point_words, exc)
                continue
            previous = tracker.value(name)
            for listener in self._listeners:
                await listener(point, value, previous)
            telemetry, events = tracker.update(point, value, now)
            heartbeat_at = tracker.heartbeat_at(point)
            last[name] = (point_words, heartbeat_at)
            due = min(due, heartbeat_at)
            if telemetry is not None:
                metric = name if point.port is not None else point.metric
                # Built without validation: a str, a float and a str by construction here.
                reading = SensorReading.model_construct(metric=metric, value=telemetry, unit=point.unit or "")
                self._sink.emit_telemetry(SENSOR_READING.name, self.device_id, reading)
            for ev in events:
                await self._sink.emit(ev.type, self.device_id, ev.data)
        # Every point's words are now settled in self._last (skipped, decoded, or dropped with due -inf).
        memo.words, memo.due = words, due

    def _memo(self, block: ReadBlock[Point]) -> _BlockMemo:
        memo = self._memos.get(id(block))
        if memo is not None and memo.block is block:
            return memo
        if len(self._memos) >= 256:  # callers passing fresh blocks each time (tests, tools) stay bounded
            self._memos.clear()
        memo = self._memos[id(block)] = _BlockMemo(block, tuple((s.item, s.item.name, s.start, s.stop)
                                                                for s in block.slices))
        return memo

    async def command(self, name: str, args: Mapping[str, object] | None = None, *,
                      priority: Any = None) -> list[dict[str, Any]]:
        """Run a profile command: its writes go out ahead of polls. Raises CommandError / Device*."""
        steps = self.profile.command(name, args)
        done: list[dict[str, Any]] = []
        for step in steps:
            if isinstance(step, Pause):
                await asyncio.sleep(step.seconds)
                continue
            values: list[Any] = ([bool(w) for w in step.words] if step.table == "coil" else list(step.words))
            if priority is None:
                await self._bus.write(self.unit, step.table, step.address, values)
            else:
                await self._bus.write(self.unit, step.table, step.address, values, priority=priority)
            done.append({"point": step.point.name, "value": step.value})
        return done
