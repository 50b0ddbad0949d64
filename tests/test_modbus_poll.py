"""ModbusDevice.poll_block skips points whose words did not move (the polling-cost fix of issue 7). The skip
must be invisible: for any sequence of answers and times, the telemetry and events that come out are exactly
those of decoding and tracking every point of every poll."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.modbus.device import ModbusDevice, PointTracker
from edgeagent.drivers.modbus.profile import Point, Profile, ReadBlock, shipped_profile
from edgeagent.kernel.pipeline.event_types import REGISTRY, SENSOR_READING
from edgeagent.kernel.pipeline.events import EventData, EventFactory
from edgeagent.kernel.runtime.clock import Clock as WallClock

PROFILES = [shipped_profile(m) for m in ("barrier-gate-generic", "ebike-charger-8port", "relay-io-8ch")]


class ScriptedBus:
    """Answers each read with the next scripted words (a real device's answers, without the wire)."""

    def __init__(self) -> None:
        self.answer: list[int] = []

    async def read(self, unit: int, table: Any, address: int, count: int, *, priority: Any = None) -> list[Any]:
        return list(self.answer[:count])

    async def write(self, unit: int, table: Any, address: int, values: list[Any], *, priority: Any = None) -> None:
        raise AssertionError("no writes here")


class RecordingSink:
    """Builds each event as the daemon's sink does (so the data must fit its schema) and records it."""

    def __init__(self) -> None:
        self.factory = EventFactory(REGISTRY, "site-1", "gw-1", WallClock(mode="synced"))
        self.out: list[tuple[str, dict[str, Any]]] = []

    async def emit(self, type_name: str, device_id: str, data: Mapping[str, Any]) -> Any:
        self.out.append((type_name, dict(self.factory.make(type_name, device_id, data).data)))

    def emit_telemetry(self, type_name: str, device_id: str, data: Mapping[str, Any] | EventData) -> None:
        self.out.append((type_name, dict(self.factory.make(type_name, device_id, data).data)))


def reference(block: ReadBlock[Point], polls: Sequence[tuple[list[int], float]]) -> list[tuple[str, dict[str, Any]]]:
    """What every point of every poll, decoded and tracked, gives (the behaviour before the skip)."""
    tracker, out = PointTracker(), []
    for words, now in polls:
        for point, point_words in block.split(words):
            try:
                value = point.decode(point_words)
            except ValueError:
                continue
            telemetry, events = tracker.update(point, value, now)
            if telemetry is not None:
                metric = point.name if point.port is not None else point.metric
                out.append((SENSOR_READING.name, {"metric": metric, "value": telemetry, "unit": point.unit or ""}))
            out.extend((ev.type, ev.data) for ev in events)
    return out


def run_device(profile: Profile, block: ReadBlock[Point], polls: Sequence[tuple[list[int], float]]
               ) -> list[tuple[str, dict[str, Any]]]:
    bus, sink = ScriptedBus(), RecordingSink()
    clock = [0.0]
    device = ModbusDevice("dev-1", 1, profile, bus, sink, monotonic=lambda: clock[0])

    async def go() -> None:
        for words, now in polls:
            bus.answer, clock[0] = words, now
            await device.poll_block(block)

    asyncio.run(go())
    return list(sink.out)


@st.composite
def scripts(draw: st.DrawFn) -> tuple[Profile, ReadBlock[Point], list[tuple[list[int], float]]]:
    profile = draw(st.sampled_from(PROFILES))
    block = draw(st.sampled_from(profile.read_plan()))
    top = 1 if block.table in ("coil", "discrete_input") else 0xFFFF
    # Few distinct words, so values repeat often (the case the skip is for), plus any word now and then.
    word = st.one_of(st.sampled_from([0, 1, 2, 650, 700, 0x8000, top]), st.integers(0, top)).map(lambda w: min(w, top))
    n = draw(st.integers(1, 12))
    first = draw(st.lists(word, min_size=block.count, max_size=block.count))
    polls, words, now = [], first, 0.0
    for _ in range(n):
        # Each poll changes a few words of the previous answer, and time moves on by up to ten minutes,
        # so heartbeats (max_interval_s) fall due now and then.
        for _ in range(draw(st.integers(0, 3))):
            words = list(words)
            words[draw(st.integers(0, block.count - 1))] = draw(word)
        now += draw(st.sampled_from([0.5, 1.0, 30.0, 299.0, 301.0, 600.0]))
        polls.append((list(words), now))
    return profile, block, polls


@settings(max_examples=300, deadline=None)
@given(scripts())
def test_skipping_unchanged_words_changes_nothing_that_comes_out(case: Any) -> None:
    profile, block, polls = case
    assert run_device(profile, block, polls) == reference(block, polls)


def test_unchanged_poll_emits_only_heartbeats() -> None:
    charger = shipped_profile("ebike-charger-8port")
    block = next(b for b in charger.read_plan() if any(s.item.key == "temperature" for s in b.slices))
    words = [300] * block.count
    polls = [(words, 0.0), (words, 1.0), (words, 2.0)]
    out = run_device(charger, block, polls)
    first = reference(block, polls[:1])
    assert out[:len(first)] == first and first, "the first poll reports what it read"
    assert out[len(first):] == [], "unchanged words, no heartbeat due: nothing more"
    # 301 s later the temperatures' heartbeat (max_interval_s 300) is due: reported again, as before.
    later = run_device(charger, block, [*polls, (words, 302.0)])
    assert later[len(first):] == reference(block, [*polls, (words, 302.0)])[len(first):]
    assert any(str(d.get("metric")).endswith("_temperature") for _t, d in later[len(first):])
