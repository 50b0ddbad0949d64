"""The wristband input and the alarm runtime around it, against a real local mosquitto and a real outbox:
alarms never wait on a dead output, durable before acknowledged (also when storing fails), acks only on
the session that received the message, a no-signal ticker that survives errors, a down broker logged once.

The wiring is the daemon's (input → alarm runtime → outbox, guard-room topic on the same broker), built
here directly so each failure switch (an output that never answers, an outbox that refuses) is named.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.app import alarm_kinds
from edgeagent.drivers.wristband.config import WristbandsConfig
from edgeagent.drivers.wristband.kinds import AlarmKind
from edgeagent.drivers.wristband.service import WristbandInputError, WristbandService
from edgeagent.kernel.alarms.engine import AlarmConfig, AlarmEngine
from edgeagent.kernel.alarms.notify import Message
from edgeagent.kernel.alarms.runtime import AlarmNotDurable, AlarmRuntime
from edgeagent.kernel.errors import OutboxError
from edgeagent.kernel.pipeline.event_types import REGISTRY
from edgeagent.kernel.pipeline.events import Event, EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.kernel.runtime import metrics
from edgeagent.kernel.runtime.clock import Clock
from edgeagent.kernel.runtime.outputs import Outputs
from tests.helpers import wait_until
from tests.peers import Collector, Mosquitto

BAND_A = "aabbccddee01"
BAND_B = "aabbccddee02"
SVC_LOG = "edgeagent.drivers.wristband.service"

ENGINE_CONFIG = AlarmConfig(kinds=alarm_kinds())  # every capability's kinds, as the daemon has them


class HangingOutput:
    """A relay channel whose link is down: ``set`` never answers until the test lets it go."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0
        self.returned_at: float | None = None

    async def set(self, on: bool) -> None:
        self.calls += 1
        await self.release.wait()
        self.returned_at = time.monotonic()


class FlakyOutbox:
    """The real outbox with failure switches: ``fail_puts`` alarm events and ``fail_kv`` state saves
    raise OutboxError (as a full disk does), each switch counting down to zero; :meth:`block` holds the
    events of some wristbands (a slow disk) until blocked no more."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.fail_puts = 0
        self.fail_kv = 0
        self._blocked: set[str] = set()
        self._changed = asyncio.Event()

    def block(self, *devices: str) -> None:
        self._blocked = set(devices)
        self._changed.set()
        self._changed = asyncio.Event()

    async def put(self, event: Event) -> int:
        while event.device_id in self._blocked:
            await self._changed.wait()
        if self.fail_puts and event.priority.label == "alarm":
            self.fail_puts -= 1
            raise OutboxError("disk full (test switch)")
        return await self.outbox.put(event)

    def offer_telemetry(self, event: Event) -> Any:
        return self.outbox.offer_telemetry(event)

    async def kv_get(self, key: str) -> Any:
        return await self.outbox.kv_get(key)

    async def kv_put(self, key: str, value: Any) -> None:
        if self.fail_kv:
            self.fail_kv -= 1
            raise OutboxError("disk full (test switch)")
        await self.outbox.kv_put(key, value)


@dataclass
class Notes:
    """What the notifier hub was handed (the runtime's dispatcher)."""

    sent: list[tuple[tuple[str, ...], Message]] = field(default_factory=list)
    elsewhere: dict[str, str] = field(default_factory=dict)

    def notify(self, targets: tuple[str, ...], message: Message) -> int:
        self.sent.append((targets, message))
        return len(targets)

    def serve_elsewhere(self, target: str, by: str) -> None:
        self.elsewhere[target] = by


@dataclass
class Rig:
    service: WristbandService
    alarms: AlarmRuntime
    outputs: Outputs
    store: FlakyOutbox
    notes: Notes
    durable: list[tuple[float, Event]]
    task: asyncio.Task[None]

    def alarm_events(self, type_name: str = "alarm.raised") -> list[Event]:
        return [e for _t, e in self.durable if e.type == type_name]


def config(port: int, **kw: Any) -> WristbandsConfig:
    return WristbandsConfig.model_validate({
        "broker": f"mqtt://127.0.0.1:{port}", "inputs": [{"decoder": "ble-json"}],
        "residents": [{"id": "r-1", "devices": [BAND_A]}, {"id": "r-2", "devices": [BAND_B]}], **kw})


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, port: int, *, outputs: Outputs | None = None, client_id: str | None = None,
              **cfg: Any) -> AsyncIterator[Rig]:
    outbox = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await outbox.open()
    store = FlakyOutbox(outbox)
    clock = Clock(mode="synced")
    sink = EventSink(EventFactory(REGISTRY, "site-1", "gw-1", clock), store)  # type: ignore[arg-type]
    durable: list[tuple[float, Event]] = []
    sink.observe(lambda e, _seq: durable.append((time.monotonic(), e)))
    outs = outputs or Outputs()
    notes = Notes()
    alarms = AlarmRuntime(AlarmEngine(ENGINE_CONFIG), sink=sink, state=store, outputs=outs, notifiers=notes,
                          clock=clock)
    service = WristbandService(config(port, **cfg), sink, alarms,
                               client_id=client_id or f"edgeagent-test-{time.monotonic_ns()}")
    alarms.listen(service.publish_change)
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.connected.wait(), 10)
        yield Rig(service, alarms, outs, store, notes, durable, task)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await outs.close()
        await outbox.close()


class Gateway:
    """A BLE gateway publishing wristband JSON to the local broker (paho, its own thread)."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"ble-gw-{time.monotonic_ns()}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, band: str, event: str = "none", **fields: Any) -> float:
        doc = {"event": event, "worn": True, **fields}
        sent = time.monotonic()
        self.client.publish(f"iot/gw-1/{band}/data", json.dumps(doc), qos=1).wait_for_publish(5)
        return sent

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def gateway(port: int) -> Any:
    gw = Gateway(port)
    try:
        yield gw
    finally:
        gw.close()


async def until(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    assert await wait_until(predicate, timeout_s), "condition not reached in time"


# --- item 4: nothing on the alarm path waits on an output ------------------------------------------------

async def test_sos_is_durable_and_told_while_the_siren_relay_does_not_answer(tmp_path: Path,
                                                                            broker: Mosquitto) -> None:
    siren, strobe = HangingOutput(), HangingOutput()
    outputs = Outputs(timeout_s=30.0)  # longer than the test: the write is still hanging when we look
    outputs.register("siren", siren)
    outputs.register("strobe", strobe)
    guard = Collector(broker.port, topic="edgeagent/local/alarms/#").start()
    try:
        async with rig(tmp_path, broker.port, outputs=outputs) as r:
            with gateway(broker.port) as gw:
                sent = await asyncio.to_thread(gw.send, BAND_A, "sos")
                await until(r.alarm_events)
                alarm = r.alarms.engine.active()[0]
                told = await asyncio.to_thread(guard.wait_for, lambda c: any(
                    t.endswith(alarm.id) for t, _p, _r in c.messages), 10)
                told_at = time.monotonic()
                assert told, "the guard-room topic was not told"
                # Both happened while the siren's write was still hanging (it has not returned at all).
                assert siren.calls == 1 and strobe.calls == 1
                assert siren.returned_at is None and strobe.returned_at is None
                assert r.notes.sent and r.notes.sent[0][1].kind == "new"
                durable_at = r.durable[[e.type for _t, e in r.durable].index("alarm.raised")][0]
                logging.getLogger(__name__).warning(
                    "SOS with a dead siren relay: durable %.1f ms, guard topic told %.1f ms after the press",
                    (durable_at - sent) * 1000, (told_at - sent) * 1000)
                # A second alarm does not queue behind the hanging write either.
                await asyncio.to_thread(gw.send, BAND_B, "fall")
                await until(lambda: len(r.alarm_events()) == 2)
                assert siren.returned_at is None
                siren.release.set()
                strobe.release.set()
                await asyncio.wait_for(outputs.settled(), 5)
    finally:
        guard.stop()


async def test_outputs_in_the_background_latest_wins_timeout_logged_once_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent.kernel.runtime.outputs")
    siren = HangingOutput()
    outputs = Outputs(timeout_s=0.05)
    outputs.register("siren", siren)
    outputs.request("siren", True)
    outputs.request("siren", False)  # replaces the first before it starts: latest wins
    outputs.request("siren", True)
    await asyncio.wait_for(outputs.settled(), 5)
    assert siren.calls == 1 and outputs.superseded["siren"] == 2 and outputs.failures["siren"] == 1
    for _ in range(3):
        outputs.request("siren", True)
        await asyncio.wait_for(outputs.settled(), 5)
    assert outputs.failures["siren"] == 4
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "no answer within" in errors[0].getMessage()
    siren.release.set()  # the link is back
    outputs.request("siren", False)
    await asyncio.wait_for(outputs.settled(), 5)
    assert any("works again" in r.getMessage() for r in caplog.records)
    assert outputs.snapshot()["failing"] == []
    await outputs.close()


async def test_a_failed_state_save_still_notifies_and_reports_not_durable(tmp_path: Path, factory: EventFactory,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await outbox.open()
    try:
        store = FlakyOutbox(outbox)
        store.fail_kv = 1
        notes = Notes()
        alarms = AlarmRuntime(AlarmEngine(ENGINE_CONFIG), sink=EventSink(factory, store),  # type: ignore[arg-type]
                              state=store, outputs=Outputs(), notifiers=notes, clock=Clock(mode="synced"))
        with pytest.raises(AlarmNotDurable):
            await alarms.raise_(AlarmKind.SOS, "r-1", BAND_A)
        assert [m.kind for _t, m in notes.sent] == ["new"], "the guard room was not told"
        assert alarms.not_durable == 1
        assert any("state not saved" in r.getMessage() for r in caplog.records)
        # The next operation saves the state again.
        await alarms.raise_(AlarmKind.FALL, "r-1", BAND_A)
        assert await outbox.kv_get("alarms")
    finally:
        await outbox.close()


# --- item 8: durable before ack, acks on the right session, robust loops, quiet reconnects --------------

async def test_a_message_whose_alarm_was_not_stored_is_not_acked_and_comes_again(tmp_path: Path,
                                                                                broker: Mosquitto) -> None:
    async with rig(tmp_path, broker.port) as r:
        r.store.fail_puts = 1  # the first alarm event is refused (a full disk)
        with gateway(broker.port) as gw:
            await asyncio.to_thread(gw.send, BAND_A, "sos")
            # Not acknowledged: the input leaves the session and the broker delivers the message again;
            # handling it again stores the alarm event that was refused the first time.
            await until(lambda: r.service.counters["not_acked:not_durable"] == 1)
            await until(r.alarm_events)
            assert r.service.counters["resyncs"] == 1
            await until(lambda: r.alarms.engine.active()[0].count == 2)
            assert r.alarms.unstored == 0 and len(r.alarm_events()) == 1


async def test_an_ack_goes_only_to_the_session_that_received_the_message(tmp_path: Path,
                                                                        broker: Mosquitto) -> None:
    """Packet ids are per session. A message handled after a reconnect must not be acked on the new
    session, where its id names another message: that one would be acked unhandled, and lost."""
    async with rig(tmp_path, broker.port) as r:
        r.store.block(BAND_A)  # message 1's alarm waits for the disk: the consumer is busy with it
        with gateway(broker.port) as gw:
            await asyncio.to_thread(gw.send, BAND_A, "sos")
        await until(lambda: r.service._queue.qsize() == 0 and r.alarms.raised_total == 1)
        # The broker restarts and forgets the session: the next message gets packet id 1 again.
        await asyncio.to_thread(broker.restart)
        await until(lambda: r.service.counters["broker_failures"] >= 1 and r.service.connected.is_set())
        with gateway(broker.port) as gw:
            await asyncio.to_thread(gw.send, BAND_B, "sos")
        await until(lambda: r.service._queue.qsize() == 1)
        # Message 1 is stored and handled; message 2 (band B) then waits for the disk in its turn.
        r.store.block(BAND_B)
        await until(lambda: len(r.alarm_events()) == 1 and r.alarms.raised_total == 2)
        # The connection drops before message 2 is stored: it must come again (it was never acknowledged).
        session = r.service.session
        assert session is not None
        session.abort()
        await until(lambda: r.service.counters["broker_failures"] >= 2 and r.service.connected.is_set())
        r.store.block()
        await until(lambda: len(r.alarm_events()) == 2)
        assert await wait_until(lambda: any(a.resident_id == "r-2" and a.count == 2
                                            for a in r.alarms.engine.active()), 5), \
            "message 2 was acknowledged on the new session before it was handled, and lost"
        assert r.service.counters["ack_skipped:old_session"] >= 1


async def test_no_signal_detection_survives_a_failed_round(tmp_path: Path, broker: Mosquitto) -> None:
    async with rig(tmp_path, broker.port, no_signal_after_s=0.4) as r:
        r.store.fail_kv = 1  # the first no-signal alarm's state save fails
        with gateway(broker.port) as gw:
            await asyncio.to_thread(gw.send, BAND_A)
            await until(lambda: r.service.counters["readings"] == 1)
            await asyncio.to_thread(gw.send, BAND_B)
            await until(lambda: r.service.counters["readings"] == 2)
        await until(lambda: len(r.alarm_events()) >= 2)
        silent = {e.data["resident_id"] for e in r.alarm_events() if e.data["kind"] == "no_signal"}
        assert silent == {"r-1", "r-2"}
        assert r.service.counters["errors:no_signal"] == 1
        assert not r.task.done()


async def test_a_down_broker_is_logged_once_down_and_once_back(tmp_path: Path, broker: Mosquitto,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=SVC_LOG)
    async with rig(tmp_path, broker.port) as r:
        caplog.clear()
        broker.stop()
        await until(lambda: r.service.counters["broker_failures"] >= 4, 30)
        broker.start()
        await until(r.service.connected.is_set, 30)
        lines = [rec.getMessage() for rec in caplog.records if rec.name == SVC_LOG and rec.levelno >= logging.INFO]
        assert len([m for m in lines if "unreachable" in m]) == 1, lines
        assert len([m for m in lines if "is back after" in m]) == 1, lines


async def test_rejected_payloads_are_prometheus_counters_by_reason(tmp_path: Path, broker: Mosquitto) -> None:
    def count(reason: str) -> float:
        return metrics.REGISTRY.get_sample_value("edgeagent_wristband_rejected_total", {"reason": reason}) or 0.0

    deep = b'{"hr": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    before_json, before_deep = count("not_json"), count("too_deep")
    async with rig(tmp_path, broker.port) as r:
        with gateway(broker.port) as gw:
            for payload in (b"not json", deep):
                await asyncio.to_thread(lambda p=payload: gw.client.publish(
                    f"iot/gw-1/{BAND_A}/data", p, qos=1).wait_for_publish(5))
            await asyncio.to_thread(gw.send, BAND_A, "sos")
            await until(r.alarm_events)
    assert count("not_json") == before_json + 1 and count("too_deep") == before_deep + 1
    assert r.service.counters["rejected:too_deep"] == 1 and r.service.counters["errors"] == 0


async def test_the_guard_room_target_is_served_by_the_guard_topic(tmp_path: Path, broker: Mosquitto) -> None:
    async with rig(tmp_path, broker.port) as r:
        assert "guard_room" in r.notes.elsewhere


async def test_a_task_that_ends_ends_run_with_an_exception_the_supervisor_sees(tmp_path: Path,
                                                                              broker: Mosquitto) -> None:
    """The broker password cannot be read (a missing secret file): the connection task ends, and run()
    ends with it, cause kept, instead of the input living on deaf (the other loops cancelled)."""
    outbox = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await outbox.open()
    try:
        clock = Clock(mode="synced")
        sink = EventSink(EventFactory(REGISTRY, "site-1", "gw-1", clock), outbox)
        alarms = AlarmRuntime(AlarmEngine(ENGINE_CONFIG), sink=sink, state=outbox, outputs=Outputs(), notifiers=None,
                              clock=clock)
        cfg = config(broker.port, username="edge", password={"file": str(tmp_path / "missing-secret")})
        service = WristbandService(cfg, sink, alarms, client_id="edgeagent-test-secret")
        with pytest.raises(WristbandInputError) as info:
            await asyncio.wait_for(service.run(), 10)
        assert "wristband-broker" in str(info.value) and info.value.__cause__ is not None
        assert all(t.get_name() != "wristband-consumer" for t in asyncio.all_tasks())
    finally:
        await outbox.close()
