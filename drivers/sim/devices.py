"""Simulated devices for the demo and tests: a sensor (telemetry), a door contact (events) and a panic
button (alarms). They use the same EventSink as real drivers, so they exercise the whole spine."""

from __future__ import annotations

import asyncio
import math
import random
import time

from edgeagent.drivers.sim.config import SimContactConfig, SimPanicConfig, SimSensorConfig
from edgeagent.kernel.pipeline.event_types import CONTACT_CHANGED, PANIC_PRESSED, SENSOR_READING
from edgeagent.kernel.pipeline.sink import EventSink


class SimSensor:
    def __init__(self, cfg: SimSensorConfig, sink: EventSink) -> None:
        self.cfg = cfg
        self._sink = sink
        self._rng = random.Random(cfg.id)

    async def run(self) -> None:
        period = 120.0
        while True:
            phase = (time.monotonic() % period) / period
            value = self.cfg.base + self.cfg.amplitude * math.sin(2 * math.pi * phase) + self._rng.gauss(0, 0.1)
            self._sink.emit_telemetry(SENSOR_READING.name, self.cfg.id,
                                      {"metric": self.cfg.metric, "value": round(value, 2), "unit": self.cfg.unit})
            await asyncio.sleep(self.cfg.interval_s)


class SimContact:
    def __init__(self, cfg: SimContactConfig, sink: EventSink) -> None:
        self.cfg = cfg
        self._sink = sink
        self._rng = random.Random(cfg.id)

    async def run(self) -> None:
        state = "closed"
        while True:
            await asyncio.sleep(self._rng.expovariate(1 / self.cfg.mean_interval_s))
            state = "open" if state == "closed" else "closed"
            await self._sink.emit(CONTACT_CHANGED.name, self.cfg.id, {"state": state, "contact": self.cfg.contact})


class SimPanic:
    def __init__(self, cfg: SimPanicConfig, sink: EventSink) -> None:
        self.cfg = cfg
        self._sink = sink
        self._rng = random.Random(cfg.id)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._rng.expovariate(1 / self.cfg.mean_interval_s))
            await self._sink.emit(PANIC_PRESSED.name, self.cfg.id, {"location": self.cfg.location, "presses": 1})
