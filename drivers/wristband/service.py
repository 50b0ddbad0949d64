"""Wristband inputs: the box's local MQTT broker → decoders → per-resident rules → alarms.

* Messages are taken with paho's manual acknowledgement: a message is acknowledged only after every
  alarm it raised is durable (events committed, alarm state saved) — an alarm cannot be lost between
  the broker and the outbox. The session is persistent (fixed client id, clean session off), so the
  broker re-sends what was not acknowledged and keeps what arrives while the daemon restarts.
* "Durable before ack" has two more halves. A message whose alarm could not be stored (an OutboxError,
  e.g. a full disk) is *not* acknowledged: the input leaves the session (after a backoff) and the broker
  delivers it again on the next one. And an acknowledgement goes only to the session that received the
  message (packet ids are per session: on a newer one the same id may name another, unhandled, message);
  one received before a reconnect is simply delivered again by the broker, and de-duplicated or folded.
* Tasks: the connection owner, the consumer, the no-signal ticker and the guard-room publisher run under
  :meth:`run`. An error in one round of a loop is logged, counted and the loop goes on; a task that ends
  anyway ends ``run()`` with an exception, so the supervisor sees it (and restarts the input).
* A broker that is down is logged once when it goes down and once when it is back; reconnects back off
  (full jitter, ``OutageBackoff``).
* Messages go through one bounded queue (``MAX_QUEUED``) to one consumer, in order. Overflow policy:
  a message whose readings raise nothing (vitals) is dropped, acknowledged and counted; a message that
  carries an SOS or a fall is always queued (they are rare and must not be dropped).
* Decoding a payload (at most 64 KiB, JSON or hex) takes well under a millisecond, so it runs on the
  loop; a thread hop would only add latency to the alarm path.
* Guard-room panels get every alarm change on ``guard_topic`` (retained per alarm) and acknowledge on
  ``ack_topic``. Changes are queued, never published under the alarm lock: one pending state per alarm id
  (a newer state replaces an older one not yet published; counted ``panel:superseded``), at most
  ``MAX_PANEL_PENDING`` alarms. Overflow policy: the oldest pending update that is not a newly raised
  alarm is dropped (``panel:dropped``); a newly raised alarm is never dropped and is admitted beyond the
  bound (``panel:over_bound``). On every (re)connect all active alarms are queued again, which also heals
  a dropped update. Each publish waits at most ``PANEL_PUBLISH_TIMEOUT_S`` for its PUBACK.
  The guard-room topic is how the ``guard_room`` notifier target is told (:data:`GUARD_ROOM_TARGET`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from edgeagent.drivers.wristband.config import ResidentConfig, WristbandsConfig
from edgeagent.drivers.wristband.decoders import (
    DECODERS,
    SUBSCRIPTIONS,
    DecodeError,
    Deduplicator,
    GatewayStatus,
    Reading,
    Rejected,
)
from edgeagent.kernel.alarms.engine import Alarm, AlarmError, AlarmKind, AlarmState
from edgeagent.kernel.alarms.runtime import AlarmRuntime
from edgeagent.kernel.errors import OutboxError, UplinkError
from edgeagent.kernel.pipeline.event_types import WRISTBAND_VITALS
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.kernel.runtime import metrics
from edgeagent.kernel.runtime.backoff import OutageBackoff, full_jitter
from edgeagent.transport.mqtt import Incoming, MqttSession, SessionParams

log = logging.getLogger(__name__)

MAX_QUEUED = 10_000
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_PANEL_PENDING = 1024
PANEL_PUBLISH_TIMEOUT_S = 5.0
PANEL_RETRY_S = 1.0
#: The notifier target the guard-room topic serves (the first escalation level of the default ladder).
GUARD_ROOM_TARGET = "guard_room"


def _pass_cancellation(exc: BaseException) -> None:
    """Re-raise a cancellation that arrived as another exception. On Python 3.11, ``asyncio.wait_for``
    (the transport's PUBACK wait) returns the inner future's outcome when it completes in the same loop
    step as the cancel (a connection torn down by the same shutdown): the CancelledError is lost and a
    loop that catches the UplinkError would run on, holding the shutdown forever (seen in the e2e test)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


class WristbandInputError(RuntimeError):
    """One of the input's tasks ended; ``run()`` ends with this so the supervisor restarts the input."""


@dataclass(frozen=True, slots=True)
class _Queued:
    msg: Incoming
    session: MqttSession  # the session that received it: the only one its packet id means anything on


@dataclass
class _BandState:
    last_seen_mono: float
    zone: str | None = None
    no_signal_raised: bool = False


class WristbandService:
    def __init__(self, cfg: WristbandsConfig, sink: EventSink, alarms: AlarmRuntime, *, client_id: str) -> None:
        self._cfg = cfg
        self._sink = sink
        self._alarms = alarms
        self._client_id = client_id
        self._residents: dict[str, ResidentConfig] = {d: r for r in cfg.residents for d in r.devices}
        self._routes: list[tuple[str, str]] = []  # (topic filter, decoder name)
        for inp in cfg.inputs:
            for topic in inp.topics or SUBSCRIPTIONS[inp.decoder]:
                self._routes.append((topic, inp.decoder))
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue(MAX_QUEUED)
        self._overflow: set[asyncio.Task[None]] = set()  # SOS/fall puts waiting beyond the bound
        self._dedup = Deduplicator()
        self._bands: dict[str, _BandState] = {}
        self._session: MqttSession | None = None
        self.counters: Counter[str] = Counter()
        self._unknown_logged: set[str] = set()
        self.connected = asyncio.Event()
        self._down_since: float | None = None
        self._resync = asyncio.Event()
        self._resync_streak = 0  # leave the session so the broker re-sends what was not acknowledged
        self._panel: OrderedDict[str, Alarm] = OrderedDict()
        self._panel_wake = asyncio.Event()
        self._panel_failing = False
        alarms.serve_locally(GUARD_ROOM_TARGET, f"the guard-room topic {cfg.guard_topic!r}")

    # --- the local broker ----------------------------------------------------------------------------

    def _params(self) -> SessionParams:
        url = urlsplit(self._cfg.broker)
        password = self._cfg.password.resolve().get_secret_value() if self._cfg.password else None
        return SessionParams(host=url.hostname or "127.0.0.1", port=url.port or 1883, client_id=self._client_id,
                             protocol="3.1.1", keepalive_s=30, connect_timeout_s=5, username=self._cfg.username,
                             password=password, manual_ack=True, persistent=True)

    async def run(self) -> None:
        """The input's tasks; returns only by cancellation, raises when one of them ends. Supervised."""
        tasks = [asyncio.create_task(self._connection(), name="wristband-broker"),
                 asyncio.create_task(self._consume(), name="wristband-consumer"),
                 asyncio.create_task(self._watch_signal(), name="wristband-no-signal"),
                 asyncio.create_task(self._publish_panel(), name="wristband-panel")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            ended = done.pop()
            cause = ended.exception()
            raise WristbandInputError(f"wristbands: task {ended.get_name()} ended: {cause!r}") from cause
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _open(self) -> MqttSession:
        # The callback names its own session (a local, not a loop variable): a late message of an old
        # session must never be taken for one of the current session.
        session = MqttSession(self._params(), on_message=lambda msg: self._on_message(msg, session))
        return session

    async def _connection(self) -> None:
        """Connection owner: (re)connects with backoff, subscribes, logs down and up once each."""
        backoff = OutageBackoff(first_max_s=0.5, short_cap_s=4.0, long_cap_s=30.0)
        while True:
            try:
                async with self._open() as session:
                    # Current from CONNACK on: the broker re-sends unacknowledged messages before SUBACK.
                    self._session = session
                    for topic, _decoder in self._routes:
                        await session.subscribe(topic, qos=1)
                    await session.subscribe(self._cfg.ack_topic, qos=1)
                    self.connected.set()
                    backoff.reset()
                    if self._down_since is None:
                        log.info("wristbands: listening on %s (%d topics)", self._cfg.broker, len(self._routes))
                    else:
                        log.warning("wristbands: local broker %s is back after %.0f s", self._cfg.broker,
                                    time.monotonic() - self._down_since)
                        self._down_since = None
                    self._requeue_active()
                    assert session.disconnected is not None
                    resync: asyncio.Future[Any] = asyncio.ensure_future(self._resync.wait())
                    lost: asyncio.Future[Any] = session.disconnected
                    try:
                        await asyncio.wait([lost, resync], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        resync.cancel()
                    if self._resync.is_set():
                        self._resync.clear()
                        self.counters["resyncs"] += 1
                        log.warning("wristbands: leaving the session so the broker delivers the unacknowledged "
                                    "message(s) again")
                        # Backs off while storing keeps failing (a full disk), instead of spinning.
                        await asyncio.sleep(full_jitter(self._resync_streak, 0.5, 30.0))
                        self._resync_streak += 1
                    else:
                        self._went_down(session.disconnected.exception() or "connection lost")
            except UplinkError as exc:
                self._went_down(exc)
            finally:
                self._session = None
                self.connected.clear()
            age = 0.0 if self._down_since is None else time.monotonic() - self._down_since
            await asyncio.sleep(backoff.next_delay(age))

    def _went_down(self, why: object) -> None:
        self.counters["broker_failures"] += 1
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("wristbands: local broker %s unreachable: %s (retrying; logged again when it is back)",
                        self._cfg.broker, why)
        else:
            log.debug("wristbands: local broker still unreachable: %s", why)

    def _reject(self, code: str) -> None:
        self.counters[f"rejected:{code}"] += 1
        metrics.WRISTBAND_REJECTED.labels(code).inc()

    def _on_message(self, msg: Incoming, session: MqttSession) -> None:
        item = _Queued(msg, session)
        if len(msg.payload) > MAX_PAYLOAD_BYTES:
            self._reject("too_large")
            self._ack(item)
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            if self._carries_alarm(msg):
                # Overflow policy: never drop an SOS/fall; let it wait beyond the bound.
                task = asyncio.get_running_loop().create_task(self._queue.put(item))
                self._overflow.add(task)
                task.add_done_callback(self._overflow.discard)
                return
            self.counters["dropped:queue_full"] += 1
            self._ack(item)

    def _carries_alarm(self, msg: Incoming) -> bool:
        decoder = next((d for f, d in self._routes if _matches(f, msg.topic)), None)
        if decoder is None:
            return False
        try:
            items = DECODERS[decoder](msg.topic, msg.payload, time.time())
        except Exception:  # noqa: BLE001 - counted when the consumer decodes it again
            return False
        return any(isinstance(i, Reading) and (i.sos or i.fall) for i in items)

    def _ack(self, item: _Queued) -> None:
        if item.msg.qos == 0:
            return
        if item.session is not self._session:
            # [ack on the receiving session] the broker re-sends it on the current session.
            self.counters["ack_skipped:old_session"] += 1
            return
        item.session.ack(item.msg.mid, item.msg.qos)
        self._resync_streak = 0

    async def _consume(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._handle(item.msg)
            except OutboxError as exc:
                _pass_cancellation(exc)
                # [durable before ack] not stored: no ack; the broker delivers it again on the next session.
                self.counters["not_acked:not_durable"] += 1
                log.error("wristbands: a message on %s raised an alarm that was not stored (%s); left "
                          "unacknowledged for the broker to deliver again", item.msg.topic, exc)
                self._resync.set()
                continue
            except Exception as exc:
                _pass_cancellation(exc)
                self.counters["errors"] += 1
                log.exception("wristbands: handling a message on %s failed", item.msg.topic)
            # [durable before ack] alarms raised by this message are committed by now.
            self._ack(item)

    async def _handle(self, msg: Incoming) -> None:
        if msg.topic == self._cfg.ack_topic:
            await self._guard_ack(msg.payload)
            return
        decoder = next((d for f, d in self._routes if _matches(f, msg.topic)), None)
        if decoder is None:
            return
        try:
            items = DECODERS[decoder](msg.topic, msg.payload, time.time())
        except DecodeError as exc:
            self._reject(exc.code)
            return
        except Exception:  # a decoder bug: counted as a bad payload, never the end of the input
            self._reject("decoder_error")
            log.exception("wristbands: decoder %s failed on a message on %s", decoder, msg.topic)
            return
        for item in items:
            if isinstance(item, Rejected):
                self._reject(item.code)
            elif isinstance(item, GatewayStatus):
                self.counters["gateway_status"] += 1
            elif isinstance(item, Reading):
                await self._reading(item)

    # --- rules -----------------------------------------------------------------------------------------

    async def _reading(self, r: Reading) -> None:
        if r.dedup_key is not None and not self._dedup.admit(r.device, r.dedup_key, time.monotonic()):
            self.counters["duplicates"] += 1
            return
        resident = self._residents.get(r.device)
        if resident is None:
            self.counters["unknown_device"] += 1
            if r.device not in self._unknown_logged and len(self._unknown_logged) < 1000:
                self._unknown_logged.add(r.device)
                log.info("wristbands: readings from unknown band %s (not assigned to a resident)", r.device)
            return
        self.counters["readings"] += 1
        band = self._bands.setdefault(r.device, _BandState(time.monotonic()))
        band.last_seen_mono = time.monotonic()
        band.no_signal_raised = False
        if r.gateway_zone is not None:
            band.zone = self._cfg.zones.get(r.gateway_zone, band.zone)
        for kind, details in self._alarm_kinds(resident, r, band):
            await self._alarms.raise_(kind, resident.id, r.device, details)
        vitals = {k: v for k, v in (("heart_rate_bpm", r.heart_rate_bpm), ("spo2_pct", r.spo2_pct),
                                    ("battery_pct", r.battery_pct), ("worn", r.worn), ("rssi_dbm", r.rssi_dbm))
                  if v is not None}
        if vitals:
            self._sink.emit_telemetry(WRISTBAND_VITALS.name, r.device,
                                      {"resident_id": resident.id, "zone": band.zone, **vitals})

    @staticmethod
    def _alarm_kinds(res: ResidentConfig, r: Reading, band: _BandState) -> list[tuple[AlarmKind, dict[str, Any]]]:
        out: list[tuple[AlarmKind, dict[str, Any]]] = []
        if r.sos:
            out.append((AlarmKind.SOS, {}))
        if r.fall:
            out.append((AlarmKind.FALL, {}))
        if r.heart_rate_bpm is not None:
            if r.heart_rate_bpm > res.heart_rate_high:
                out.append((AlarmKind.HEART_RATE_HIGH, {"heart_rate_bpm": r.heart_rate_bpm}))
            elif r.heart_rate_bpm < res.heart_rate_low:
                out.append((AlarmKind.HEART_RATE_LOW, {"heart_rate_bpm": r.heart_rate_bpm}))
        if r.spo2_pct is not None and r.spo2_pct < res.spo2_low:
            out.append((AlarmKind.SPO2_LOW, {"spo2_pct": r.spo2_pct}))
        if r.worn is False:
            out.append((AlarmKind.REMOVED, {}))
        if r.battery_pct is not None and r.battery_pct < res.low_battery_pct:
            out.append((AlarmKind.LOW_BATTERY, {"battery_pct": r.battery_pct}))
        if band.zone == "outside":
            out.append((AlarmKind.LEFT_COMPOUND, {"zone": band.zone}))
        return out

    async def _watch_signal(self) -> None:
        """``no_signal``: a band not heard for ``no_signal_after_s`` (once per silence)."""
        period_s = min(10.0, self._cfg.no_signal_after_s / 4)
        while True:
            await asyncio.sleep(period_s)
            try:
                await self._signal_round()
            except Exception as exc:
                _pass_cancellation(exc)
                # One bad round must not end no-signal detection for the life of the process.
                self.counters["errors:no_signal"] += 1
                log.exception("wristbands: no-signal check failed; next round in %.1f s", period_s)

    async def _signal_round(self) -> None:
        now = time.monotonic()
        for device, band in list(self._bands.items()):
            if band.no_signal_raised or now - band.last_seen_mono <= self._cfg.no_signal_after_s:
                continue
            resident = self._residents.get(device)
            band.no_signal_raised = True
            if resident is None:
                continue
            try:
                await self._alarms.raise_(AlarmKind.NO_SIGNAL, resident.id, device,
                                          {"silent_s": round(now - band.last_seen_mono)})
            except OutboxError as exc:
                _pass_cancellation(exc)
                band.no_signal_raised = False  # not stored: the next round tries again (it folds)
                self.counters["errors:no_signal"] += 1
                log.error("wristbands: no-signal alarm for %s not stored: %s", device, exc)

    # --- the guard room ------------------------------------------------------------------------------

    async def _guard_ack(self, payload: bytes) -> None:
        try:
            doc = orjson.loads(payload)
            alarm_id = str(doc["alarm_id"])
            by = str(doc.get("by") or "guard-room panel")
            action = str(doc.get("action") or "ack")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            self.counters["rejected:guard_ack"] += 1
            log.warning("guard-room acknowledgement not understood: %s", exc)
            return
        try:
            if action == "resolve":
                await self._alarms.resolve(alarm_id, by, "local_mqtt", doc.get("note"))
            else:
                await self._alarms.ack(alarm_id, by, "local_mqtt")
        except AlarmError as exc:
            log.warning("guard-room %s of %s refused: %s", action, alarm_id, exc)

    async def publish_change(self, alarm: Alarm) -> None:
        """Every alarm change, for guard-room panels (an alarm-runtime listener): only queues, never waits."""
        self._queue_panel(alarm)

    def _queue_panel(self, alarm: Alarm) -> None:
        if alarm.id in self._panel:
            self.counters["panel:superseded"] += 1
            self._panel[alarm.id] = alarm  # latest state wins, keeping its place in line
        else:
            if len(self._panel) >= MAX_PANEL_PENDING:
                victim = next((k for k, a in self._panel.items() if a.state is not AlarmState.RAISED), None)
                if victim is not None:
                    del self._panel[victim]
                    self.counters["panel:dropped"] += 1
                else:
                    self.counters["panel:over_bound"] += 1
            self._panel[alarm.id] = alarm
        self._panel_wake.set()

    def _requeue_active(self) -> None:
        """After a (re)connect: a broker that restarted without persistence lost the retained states."""
        for alarm in self._alarms.engine.active():
            if alarm.id not in self._panel:
                self._queue_panel(alarm)

    async def _publish_panel(self) -> None:
        while True:
            await self._panel_wake.wait()
            self._panel_wake.clear()
            try:
                await self._drain_panel()
            except Exception as exc:
                _pass_cancellation(exc)
                self.counters["errors:panel"] += 1
                log.exception("wristbands: guard-room publisher failed; continuing")
                await asyncio.sleep(PANEL_RETRY_S)
                self._panel_wake.set()

    async def _drain_panel(self) -> None:
        while self._panel:
            session = self._session
            if session is None:
                return  # the next connection wakes this up (it queues every active alarm)
            alarm_id, alarm = next(iter(self._panel.items()))
            del self._panel[alarm_id]
            try:
                await self._publish_one(session, alarm)
            except (UplinkError, TimeoutError) as exc:
                _pass_cancellation(exc)
                self.counters["panel:failed"] += 1
                if alarm_id not in self._panel:  # put it back first in line, unless a newer state came
                    self._panel[alarm_id] = alarm
                    self._panel.move_to_end(alarm_id, last=False)
                if not self._panel_failing:
                    self._panel_failing = True
                    log.warning("guard-room topic not updated for %s: %s (retrying; logged once until it "
                                "works)", alarm_id, exc or "no PUBACK in time")
                await asyncio.sleep(PANEL_RETRY_S)
                continue
            if self._panel_failing:
                self._panel_failing = False
                log.warning("guard-room topic: publishing works again")

    async def _publish_one(self, session: MqttSession, alarm: Alarm) -> None:
        doc = {"alarm_id": alarm.id, "kind": alarm.kind.value, "state": alarm.state.value,
               "resident_id": alarm.resident_id, "device_id": alarm.device_id, "count": alarm.count,
               "level": alarm.level, "raised_at": alarm.first_raised.wall.isoformat(),
               "acknowledged_by": alarm.acknowledged_by}
        topic = f"{self._cfg.guard_topic}/{alarm.id}"
        async with asyncio.timeout(PANEL_PUBLISH_TIMEOUT_S):
            await session.publish(topic, orjson.dumps(doc), qos=1, retain=alarm.active)
            if not alarm.active:
                # Clear the retained state, so a panel connecting later does not see a closed alarm as open.
                await session.publish(topic, b"", qos=1, retain=True)

    @property
    def session(self) -> MqttSession | None:
        return self._session

    def snapshot(self) -> Mapping[str, Any]:
        return {"broker": self._cfg.broker, "connected": self.connected.is_set(), "bands_seen": len(self._bands),
                "queue": self._queue.qsize(), "panel_pending": len(self._panel), "counters": dict(self.counters)}


def _matches(topic_filter: str, topic: str) -> bool:
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)
