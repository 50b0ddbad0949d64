"""Wristband inputs: the box's local MQTT broker → decoders → per-resident rules → alarms.

* Messages are taken with paho's manual acknowledgement: a message is acknowledged only after every
  alarm it raised is durable (events committed, alarm state saved) — an alarm cannot be lost between
  the broker and the outbox. The session is persistent (fixed client id, clean session off), so the
  broker re-sends what was not acknowledged and keeps what arrives while the daemon restarts.
* Messages go through one bounded queue (``MAX_QUEUED``) to one consumer, in order. Overflow policy:
  a message whose readings raise nothing (vitals) is dropped, acknowledged and counted; a message that
  carries an SOS or a fall is always queued (they are rare and must not be dropped).
* Decoding a payload (at most 64 KiB, JSON or hex) takes well under a millisecond, so it runs on the
  loop; a thread hop would only add latency to the alarm path.
* Guard-room panels get every alarm change on ``guard_topic`` and acknowledge on ``ack_topic``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from edgeagent.drivers.wristband.decoders import (
    DECODERS,
    SUBSCRIPTIONS,
    DecodeError,
    Deduplicator,
    GatewayStatus,
    Reading,
    Rejected,
)
from edgeagent.kernel.alarms.engine import Alarm, AlarmError, AlarmKind
from edgeagent.kernel.alarms.runtime import AlarmRuntime
from edgeagent.drivers.wristband.config import ResidentConfig, WristbandsConfig
from edgeagent.kernel.errors import UplinkError
from edgeagent.kernel.pipeline.event_types import WRISTBAND_VITALS
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.transport.mqtt import Incoming, MqttSession, SessionParams

log = logging.getLogger(__name__)

MAX_QUEUED = 10_000
MAX_PAYLOAD_BYTES = 64 * 1024
_RECONNECT_S = 1.0


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
        self._queue: asyncio.Queue[Incoming] = asyncio.Queue(MAX_QUEUED)
        self._dedup = Deduplicator()
        self._bands: dict[str, _BandState] = {}
        self._session: MqttSession | None = None
        self.counters: Counter[str] = Counter()
        self._unknown_logged: set[str] = set()
        self.connected = asyncio.Event()

    # --- the local broker ----------------------------------------------------------------------------

    def _params(self) -> SessionParams:
        url = urlsplit(self._cfg.broker)
        password = self._cfg.password.resolve().get_secret_value() if self._cfg.password else None
        return SessionParams(host=url.hostname or "127.0.0.1", port=url.port or 1883, client_id=self._client_id,
                             protocol="3.1.1", keepalive_s=30, connect_timeout_s=5, username=self._cfg.username,
                             password=password, manual_ack=True, persistent=True)

    async def run(self) -> None:
        """Connection owner: (re)connects, subscribes, and runs the consumer. Supervised."""
        consumer = asyncio.create_task(self._consume(), name="wristband-consumer")
        ticker = asyncio.create_task(self._watch_signal(), name="wristband-no-signal")
        try:
            while True:
                try:
                    async with MqttSession(self._params(), on_message=self._on_message) as session:
                        self._session = session
                        for topic, _decoder in self._routes:
                            await session.subscribe(topic, qos=1)
                        await session.subscribe(self._cfg.ack_topic, qos=1)
                        self.connected.set()
                        log.info("wristbands: listening on %s (%d topics)", self._cfg.broker, len(self._routes))
                        assert session.disconnected is not None
                        await asyncio.shield(session.disconnected)
                except UplinkError as exc:
                    self.counters["broker_failures"] += 1
                    log.warning("wristbands: local broker: %s", exc)
                finally:
                    self._session = None
                    self.connected.clear()
                await asyncio.sleep(_RECONNECT_S)
        finally:
            consumer.cancel()
            ticker.cancel()
            await asyncio.gather(consumer, ticker, return_exceptions=True)

    def _on_message(self, msg: Incoming) -> None:
        if len(msg.payload) > MAX_PAYLOAD_BYTES:
            self.counters["rejected:too_large"] += 1
            self._ack(msg)
            return
        try:
            self._queue.put_nowait(msg)
        except asyncio.QueueFull:
            if self._carries_alarm(msg):
                # Overflow policy: never drop an SOS/fall; let it wait beyond the bound.
                asyncio.get_running_loop().create_task(self._queue.put(msg))
                return
            self.counters["dropped:queue_full"] += 1
            self._ack(msg)

    def _carries_alarm(self, msg: Incoming) -> bool:
        decoder = next((d for f, d in self._routes if _matches(f, msg.topic)), None)
        if decoder is None:
            return False
        try:
            items = DECODERS[decoder](msg.topic, msg.payload, time.time())
        except DecodeError:
            return False
        return any(isinstance(i, Reading) and (i.sos or i.fall) for i in items)

    def _ack(self, msg: Incoming) -> None:
        if self._session is not None and msg.qos > 0:
            self._session.ack(msg.mid, msg.qos)

    async def _consume(self) -> None:
        while True:
            msg = await self._queue.get()
            try:
                await self._handle(msg)
            except Exception:
                self.counters["errors"] += 1
                log.exception("wristbands: handling a message on %s failed", msg.topic)
            # [durable before ack] alarms raised by this message are committed by now.
            self._ack(msg)

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
            self.counters[f"rejected:{exc.code}"] += 1
            return
        for item in items:
            if isinstance(item, Rejected):
                self.counters[f"rejected:{item.code}"] += 1
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
        while True:
            await asyncio.sleep(min(10.0, self._cfg.no_signal_after_s / 4))
            now = time.monotonic()
            for device, band in list(self._bands.items()):
                if not band.no_signal_raised and now - band.last_seen_mono > self._cfg.no_signal_after_s:
                    band.no_signal_raised = True
                    resident = self._residents.get(device)
                    if resident is not None:
                        await self._alarms.raise_(AlarmKind.NO_SIGNAL, resident.id, device,
                                                  {"silent_s": round(now - band.last_seen_mono)})

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
        """Every alarm change, for guard-room panels on the local broker (retained per alarm)."""
        session = self._session
        if session is None:
            return
        doc = {"alarm_id": alarm.id, "kind": alarm.kind.value, "state": alarm.state.value,
               "resident_id": alarm.resident_id, "device_id": alarm.device_id, "count": alarm.count,
               "level": alarm.level, "raised_at": alarm.first_raised.wall.isoformat(),
               "acknowledged_by": alarm.acknowledged_by}
        topic = f"{self._cfg.guard_topic}/{alarm.id}"
        try:
            await session.publish(topic, orjson.dumps(doc), qos=1, retain=alarm.active)
            if not alarm.active:
                # Clear the retained state, so a panel connecting later does not see a closed alarm as open.
                await session.publish(topic, b"", qos=1, retain=True)
        except UplinkError as exc:
            log.warning("guard-room topic not updated for %s: %s", alarm.id, exc)

    @property
    def session(self) -> MqttSession | None:
        return self._session

    def snapshot(self) -> Mapping[str, Any]:
        return {"broker": self._cfg.broker, "connected": self.connected.is_set(), "bands_seen": len(self._bands),
                "queue": self._queue.qsize(), "counters": dict(self.counters)}


def _matches(topic_filter: str, topic: str) -> bool:
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)
