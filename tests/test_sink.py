"""The sink's telemetry batches: gathered, stored as one operation, and never an error on a timer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edgeagent.kernel.pipeline.events import EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from edgeagent.kernel.pipeline.sink import TELEMETRY_LINGER_S, EventSink
from edgeagent.kernel.runtime import metrics


def _rejected(reason: str) -> float:
    return metrics.EVENTS_REJECTED.labels("telemetry", reason)._value.get()


async def test_readings_go_in_one_batch_and_a_closed_outbox_is_counted(tmp_path: Path,
                                                                       factory: EventFactory) -> None:
    outbox = Outbox(OutboxConfig(tmp_path / "o.db"))
    await outbox.open()
    sink = EventSink(factory, outbox)
    seen: list[int] = []
    sink.observe(lambda _e, seq: seen.append(seq))
    for i in range(5):
        sink.emit_telemetry("sensor.reading", f"t{i}", {"metric": "temperature", "value": i, "unit": "degC"})
    assert seen == []  # gathered, not yet handed over
    await asyncio.sleep(TELEMETRY_LINGER_S * 5)
    assert sorted(seen) == [1, 2, 3, 4, 5]
    await outbox.close()
    before = _rejected("OutboxClosedError")
    sink.emit_telemetry("sensor.reading", "t9", {"metric": "temperature", "value": 9, "unit": "degC"})
    sink.flush_telemetry()  # what the timer does: must not raise into the loop
    assert _rejected("OutboxClosedError") == before + 1
