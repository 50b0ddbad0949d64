"""A unit already known to be offline costs its healthy neighbours on the same line (almost) nothing: when its
backoff runs out it gets one short try, no retries (issue 7, item 13). Before, each such probe went out with
every retry at the full timeout, and a neighbour lost 12-24% of its polls (here, with frequent probes, more).

Poll counts, not timings: a neighbour polled in a loop for a fixed window does within a few percent as many
polls with a dead unit on the line as without one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from edgeagent.drivers.modbus.bus import ModbusBus
from edgeagent.kernel.errors import DeviceUnavailable
from tests.test_modbus_bus import Line, _no_leaked_tasks, free_port, rtu_config, rtu_server, tcp_config, tcp_server

__all__ = ["_no_leaked_tasks"]  # the no-leaked-tasks check of the bus tests runs here too

DEAD = 2  # the servers here have units 1 and 2
WINDOW_S = 4.0
# Offline after 2 failures; then a probe every 1-2 s (backoff 0.5 s doubling, capped at 2 s, jitter 0.5-1).
# Each unanswered try waits 0.3 s, and a healthy unit answers within milliseconds.
SETTINGS = {"timeout_s": 0.3, "retries": 2, "offline_after_failures": 2, "backoff_base_s": 0.5,
            "backoff_cap_s": 2.0}


async def neighbour_polls(bus: ModbusBus, *, with_dead_unit: bool) -> int:
    """Polls of unit 1 completed in WINDOW_S while (optionally) unit DEAD is polled as often as it is let."""
    stop = asyncio.Event()
    done = 0

    async def neighbour() -> None:
        nonlocal done
        while not stop.is_set():
            await bus.read(1, "holding", 0, 8)
            done += 1
            await asyncio.sleep(0.02)

    async def dead() -> None:
        while not stop.is_set():
            with pytest.raises(DeviceUnavailable):
                await bus.read(DEAD, "holding", 0, 8)
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(neighbour())]
    if with_dead_unit:
        tasks.append(asyncio.create_task(dead()))
    await asyncio.sleep(WINDOW_S)
    stop.set()
    await asyncio.gather(*tasks)
    return done


async def make_offline(bus: ModbusBus, line: Line, *, answered_before: bool = True) -> None:
    """DEAD answers (if ``answered_before``: the bus learns how fast it is), then falls silent until offline."""
    if answered_before:
        await bus.read(DEAD, "holding", 0, 8)
    line.silent_units.add(DEAD)
    deadline = time.monotonic() + 20
    while bus.unit_health(DEAD).online is not False:
        assert time.monotonic() < deadline, "the dead unit never went offline"
        with pytest.raises(DeviceUnavailable):
            await bus.read(DEAD, "holding", 0, 8)
        await asyncio.sleep(0.02)


async def compare(bus: ModbusBus, line: Line) -> None:
    alone = await neighbour_polls(bus, with_dead_unit=False)
    await make_offline(bus, line)
    frames_before = line.count(DEAD)
    beside_dead = await neighbour_polls(bus, with_dead_unit=True)
    frames = line.count(DEAD) - frames_before
    # The dead unit was probed (its backoff ran out during the window), and stayed offline.
    assert frames >= 1, "no probe in the window: the comparison would prove nothing"
    assert bus.unit_health(DEAD).online is False
    assert beside_dead >= 0.85 * alone, (alone, beside_dead, frames)


@pytest.fixture
async def tcp_bus() -> AsyncIterator[tuple[ModbusBus, Line]]:
    line = Line()
    port = free_port()
    async with tcp_server(line, port), ModbusBus(tcp_config(port, **SETTINGS)) as bus:
        yield bus, line


async def test_offline_unit_costs_its_tcp_neighbour_almost_nothing(tcp_bus: tuple[ModbusBus, Line]) -> None:
    await compare(*tcp_bus)


async def test_offline_unit_costs_its_rtu_neighbour_almost_nothing(pty_pair: tuple[str, str]) -> None:
    line = Line()
    async with rtu_server(line, pty_pair[0]), ModbusBus(rtu_config(pty_pair[1], **SETTINGS)) as bus:
        await compare(bus, line)


async def test_a_unit_that_never_answered_is_probed_with_the_full_timeout(tcp_bus: tuple[ModbusBus, Line]) -> None:
    """Nothing is known of how slow it is, so a short probe could keep a slow unit offline for ever."""
    bus, line = tcp_bus
    await make_offline(bus, line, answered_before=False)
    loop = asyncio.get_running_loop()
    health = bus.unit_health(DEAD)
    while health.backoff_until > loop.time():
        await asyncio.sleep(0.05)
    with pytest.raises(DeviceUnavailable, match=r"no answer within 0\.3 s \(1 try\)"):
        await bus.read(DEAD, "holding", 0, 8)
