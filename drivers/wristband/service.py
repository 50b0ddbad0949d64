"""Wristband inputs: the box's local MQTT broker → decoders → per-resident rules → alarms.

* Messages are taken with paho's manual acknowledgement: a message is acknowledged only after every
  alarm it raised is durable (events committed, alarm state saved) — an alarm cannot be lost between
  the broker and the outbox. The session is persistent (a client id unique to the install, kept in the
  state directory; clean start off), so the broker re-sends what was not acknowledged and keeps what
  arrives while the daemon restarts.
* Bounded before read: MQTT 5 with a Maximum Packet Size (``MAX_PACKET_BYTES``, from the decoders' own
  limit) in CONNECT, so the broker never sends a bigger message (mosquitto drops it for us); one that
  arrives anyway is dropped and counted before decoding. Receive Maximum (``RECEIVE_MAXIMUM``) keeps a
  flood in the broker's queue rather than ours. ``mqtts://`` is TLS (port 8883 unless given).
* Connections: ``main`` (inputs without ``gateways``, the panels' acks, the guard-room topic) and one
  per BLE gateway listed under an input's ``gateways``, subscribing only that gateway's topics: a
  gateway that floods fills its own connection's window at the broker, not everyone's.
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
* Messages go through one fair queue (:class:`_FairQueue`: a bounded lane per source, served
  round-robin) to one consumer. Overflow policy: a message whose readings raise nothing (vitals) is
  dropped, acknowledged and counted; one that carries an SOS or a fall is queued beyond its lane's bound
  up to ``MAX_QUEUED`` in all, past which the biggest lane (the flooder) loses its oldest. A flood of
  presses from one band folds into its one alarm at microseconds a press ([fold off the disk]).
* Guard-room acknowledgements carry identity and scope: a panel publishes on ``<ack_topic>/<account>``
  (the broker's ACL lets it write only that), is recorded as ``caller: panel:<account>`` next to the
  guard it names, and can only acknowledge; a resolve from a panel and anything on the bare
  ``ack_topic`` are refused and counted. ``by`` is checked like every other (printable, 64 characters).
* Decoding a payload (at most 64 KiB, JSON or hex) takes well under a millisecond, so it runs on the
  loop; a thread hop would only add latency to the alarm path.
* Guard-room panels get every alarm change on ``guard_topic`` (retained per alarm) and acknowledge on
  ``ack_topic/<account>``. Changes are queued, never published under the alarm lock: one pending state per alarm id
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
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from edgeagent.drivers.wristband import decoders
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
from edgeagent.drivers.wristband.kinds import AlarmKind
from edgeagent.kernel.alarms.engine import (
    MAX_BY_CHARS,
    Alarm,
    AlarmError,
    AlarmInputError,
    AlarmState,
    check_text,
)
from edgeagent.kernel.alarms.runtime import AlarmRuntime
from edgeagent.kernel.errors import OutboxError, UplinkError
from edgeagent.kernel.pipeline.event_types import WRISTBAND_VITALS
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.kernel.runtime import metrics
from edgeagent.kernel.runtime.backoff import OutageBackoff, full_jitter
from edgeagent.transport.mqtt import Incoming, MqttSession, SessionParams, build_ssl_context

log = logging.getLogger(__name__)

MAX_QUEUED = 10_000  # messages waiting for the consumer, all sources together
MAX_PER_SOURCE = 64  # per source (topic) before its overflow policy applies
MAX_SOURCES = 4096  # distinct sources with a lane of their own; more share one lane
MAX_PAYLOAD_BYTES = decoders.MAX_PAYLOAD_BYTES
#: The largest packet the broker may send us (MQTT 5 CONNECT Maximum Packet Size): the decoders' payload
#: limit plus room for the topic and properties. The shipped broker's max_packet_size is the same figure.
MAX_PACKET_BYTES = MAX_PAYLOAD_BYTES + 1024
#: Unacknowledged QoS 1 messages the broker may have in flight to one connection (MQTT 5 Receive
#: Maximum): a flood waits in the broker's queue for that connection, not in this process.
RECEIVE_MAXIMUM = 64
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


@dataclass(eq=False)
class _Link:
    """One connection to the local broker: ``main`` (the panels' acks, the guard-room topic, inputs without
    ``gateways``) or one BLE gateway's own (only that gateway's topics)."""

    name: str
    client_id: str
    routes: list[tuple[str, str]]  # (topic filter, decoder name)
    acks: bool = False
    session: MqttSession | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    resync: asyncio.Event = field(default_factory=asyncio.Event)
    resync_streak: int = 0  # leave the session so the broker re-sends what was not acknowledged
    down_since: float | None = None


@dataclass(eq=False, slots=True)
class _Queued:
    msg: Incoming
    session: MqttSession  # the session that received it: the only one its packet id means anything on
    link: _Link
    alarm: bool | None = None  # carries an SOS or a fall; worked out only when an overflow policy needs it


class _FairQueue:
    """Messages waiting for the consumer, one lane per source (a topic: a wristband, or a gateway for the
    advertisement format), served round-robin: a source that floods waits behind its own messages only,
    so another resident's SOS is next after at most one message of each other busy source.

    Bounds and overflow policy: a lane holds ``per_source`` messages; past that, its oldest message that
    carries no alarm is dropped (the caller acknowledges and counts it), or the new one if it carries
    none. Alarm-carrying messages are admitted beyond the lane's bound up to ``max_total`` in all; past
    that the largest lane (the flooder) loses its oldest message. Sources past ``max_sources`` share a lane.
    """

    OTHER = "\x00other"

    def __init__(self, carries_alarm: Callable[[_Queued], bool], *, per_source: int = MAX_PER_SOURCE,
                 max_sources: int = MAX_SOURCES, max_total: int = MAX_QUEUED) -> None:
        self._carries_alarm = carries_alarm
        self._per_source, self._max_sources, self._max_total = per_source, max_sources, max_total
        self._lanes: OrderedDict[str, deque[_Queued]] = OrderedDict()
        self._size = 0
        self._ready = asyncio.Event()

    def qsize(self) -> int:
        return self._size

    def _alarm(self, item: _Queued) -> bool:
        if item.alarm is None:
            item.alarm = self._carries_alarm(item)
        return item.alarm

    def put(self, source: str, item: _Queued) -> tuple[_Queued | None, str]:
        """Queue ``item``; returns a dropped message (to acknowledge) and why, or (None, "")."""
        if source not in self._lanes and len(self._lanes) >= self._max_sources:
            source = self.OTHER
        lane = self._lanes.get(source)
        if lane is None:
            lane = self._lanes[source] = deque()
        dropped: _Queued | None = None
        why = ""
        if len(lane) >= self._per_source:
            victim = next((i for _, i in zip(range(self._per_source), lane, strict=False) if not self._alarm(i)),
                          None)
            if victim is not None:
                lane.remove(victim)
                self._size -= 1
                dropped, why = victim, "dropped:queue_full"
            elif not self._alarm(item):
                return item, "dropped:queue_full"
        if dropped is None and self._size >= self._max_total:
            largest = max(self._lanes.values(), key=len)
            dropped, why = largest.popleft(), "dropped:flood"
            self._size -= 1
        lane.append(item)
        self._size += 1
        self._ready.set()
        return dropped, why

    async def get(self) -> _Queued:
        while not self._size:
            self._ready.clear()
            await self._ready.wait()
        while True:
            key, lane = next(iter(self._lanes.items()))
            if lane:
                break
            del self._lanes[key]  # emptied by an overflow drop
        item = lane.popleft()
        self._size -= 1
        if lane:
            self._lanes.move_to_end(key)
        else:
            del self._lanes[key]
        return item


@dataclass
class _BandState:
    last_seen_mono: float
    zone: str | None = None
    no_signal_raised: bool = False


class WristbandService:
    def __init__(self, cfg: WristbandsConfig, sink: EventSink, alarms: AlarmRuntime, *, client_id: str) -> None:
        """``client_id``: this install's own (:func:`~edgeagent.drivers.wristband.capability.client_id_for`);
        a gateway's connection adds ``-<gateway id>`` to it."""
        self._cfg = cfg
        self._sink = sink
        self._alarms = alarms
        self._client_id = client_id
        self._residents: dict[str, ResidentConfig] = {d: r for r in cfg.residents for d in r.devices}
        self._main = _Link("main", client_id, [], acks=True)
        by_gateway: dict[str, _Link] = {}
        for inp in cfg.inputs:
            if inp.gateways is None:
                for topic in inp.topics or SUBSCRIPTIONS[inp.decoder]:
                    self._main.routes.append((topic, inp.decoder))
                continue
            for gw in inp.gateways:
                link = by_gateway.setdefault(gw, _Link(gw, f"{client_id}-{gw}", []))
                link.routes.extend((_for_gateway(t, gw), inp.decoder) for t in SUBSCRIPTIONS[inp.decoder])
        self._links = [self._main, *by_gateway.values()]
        self._routes = [r for link in self._links for r in link.routes]
        self._queue = _FairQueue(self._carries_alarm)
        self._dedup = Deduplicator()
        self._bands: dict[str, _BandState] = {}
        self.counters: Counter[str] = Counter()
        self._unknown_logged: set[str] = set()
        self.connected = asyncio.Event()  # every connection is up
        self._panel: OrderedDict[str, Alarm] = OrderedDict()
        self._panel_wake = asyncio.Event()
        self._panel_failing = False
        alarms.serve_locally(GUARD_ROOM_TARGET, f"the guard-room topic {cfg.guard_topic!r}")

    # --- the local broker ----------------------------------------------------------------------------

    def _params(self, link: _Link) -> SessionParams:
        url = urlsplit(self._cfg.broker)
        tls = url.scheme == "mqtts"
        ssl_context = None
        if tls:
            t = self._cfg.tls
            ssl_context = build_ssl_context(
                str(t.ca_file) if t and t.ca_file else None, str(t.cert_file) if t and t.cert_file else None,
                str(t.key_file) if t and t.key_file else None)
        password = self._cfg.password.resolve().get_secret_value() if self._cfg.password else None
        # MQTT 5, for the CONNECT properties that bound what the broker sends us (see MAX_PACKET_BYTES).
        return SessionParams(host=url.hostname or "127.0.0.1", port=url.port or (8883 if tls else 1883),
                             client_id=link.client_id, protocol="5", keepalive_s=30, connect_timeout_s=5,
                             username=self._cfg.username, password=password, ssl_context=ssl_context,
                             manual_ack=True, persistent=True, max_packet_size=MAX_PACKET_BYTES,
                             receive_maximum=RECEIVE_MAXIMUM)

    async def run(self) -> None:
        """The input's tasks; returns only by cancellation, raises when one of them ends. Supervised."""
        tasks = [asyncio.create_task(self._connection(link), name=f"wristband-broker-{link.name}")
                 for link in self._links]
        tasks += [asyncio.create_task(self._consume(), name="wristband-consumer"),
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

    def _open(self, link: _Link) -> MqttSession:
        # The callback names its own session (a local, not a loop variable): a late message of an old
        # session must never be taken for one of the current session.
        session = MqttSession(self._params(link), on_message=lambda msg: self._on_message(msg, session, link))
        return session

    def _update_connected(self) -> None:
        if all(link.connected.is_set() for link in self._links):
            self.connected.set()
        else:
            self.connected.clear()

    async def _connection(self, link: _Link) -> None:
        """Connection owner: (re)connects with backoff, subscribes, logs down and up once each."""
        backoff = OutageBackoff(first_max_s=0.5, short_cap_s=4.0, long_cap_s=30.0)
        while True:
            try:
                async with self._open(link) as session:
                    # Current from CONNACK on: the broker re-sends unacknowledged messages before SUBACK.
                    link.session = session
                    for topic, _decoder in link.routes:
                        await session.subscribe(topic, qos=1)
                    if link.acks:
                        # A panel writes only <ack_topic>/<its account> (the broker's ACL); the bare topic is
                        # subscribed only to refuse and count what still arrives there.
                        await session.subscribe(f"{self._cfg.ack_topic}/+", qos=1)
                        try:
                            await session.subscribe(self._cfg.ack_topic, qos=1)
                        except UplinkError as exc:
                            # A broker whose ACL does not let us read it: then nothing arrives there to count.
                            _pass_cancellation(exc)
                            log.debug("wristbands: not subscribed to the bare ack topic: %s", exc)
                    link.connected.set()
                    self._update_connected()
                    backoff.reset()
                    if link.down_since is None:
                        log.info("wristbands: %s listening on %s (%d topics)", link.name, self._cfg.broker,
                                 len(link.routes))
                    else:
                        log.warning("wristbands: %s: local broker %s is back after %.0f s", link.name,
                                    self._cfg.broker, time.monotonic() - link.down_since)
                        link.down_since = None
                    if link is self._main:
                        self._requeue_active()
                    assert session.disconnected is not None
                    resync: asyncio.Future[Any] = asyncio.ensure_future(link.resync.wait())
                    lost: asyncio.Future[Any] = session.disconnected
                    try:
                        await asyncio.wait([lost, resync], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        resync.cancel()
                    if link.resync.is_set():
                        link.resync.clear()
                        self.counters["resyncs"] += 1
                        log.warning("wristbands: %s: leaving the session so the broker delivers the "
                                    "unacknowledged message(s) again", link.name)
                        # Backs off while storing keeps failing (a full disk), instead of spinning.
                        await asyncio.sleep(full_jitter(link.resync_streak, 0.5, 30.0))
                        link.resync_streak += 1
                    else:
                        self._went_down(link, session.disconnected.exception() or "connection lost")
            except UplinkError as exc:
                self._went_down(link, exc)
            finally:
                link.session = None
                link.connected.clear()
                self._update_connected()
            age = 0.0 if link.down_since is None else time.monotonic() - link.down_since
            await asyncio.sleep(backoff.next_delay(age))

    def _went_down(self, link: _Link, why: object) -> None:
        self.counters["broker_failures"] += 1
        if link.down_since is None:
            link.down_since = time.monotonic()
            log.warning("wristbands: %s: local broker %s unreachable: %s (retrying; logged again when it is "
                        "back)", link.name, self._cfg.broker, why)
        else:
            log.debug("wristbands: %s: local broker still unreachable: %s", link.name, why)

    def _reject(self, code: str) -> None:
        self.counters[f"rejected:{code}"] += 1
        metrics.WRISTBAND_REJECTED.labels(code).inc()

    def _on_message(self, msg: Incoming, session: MqttSession, link: _Link) -> None:
        item = _Queued(msg, session, link)
        if len(msg.payload) > MAX_PAYLOAD_BYTES:
            # The broker should not have sent it (our Maximum Packet Size); dropped before any decoding.
            self._reject("too_large")
            self._ack(item)
            return
        dropped, why = self._queue.put(f"{link.name} {msg.topic}", item)
        if dropped is not None:
            self.counters[why] += 1
            self._ack(dropped)

    def _carries_alarm(self, item: _Queued) -> bool:
        msg = item.msg
        decoder = next((d for f, d in item.link.routes if _matches(f, msg.topic)), None)
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
        if item.session is not item.link.session:
            # [ack on the receiving session] the broker re-sends it on the current session.
            self.counters["ack_skipped:old_session"] += 1
            return
        item.session.ack(item.msg.mid, item.msg.qos)
        item.link.resync_streak = 0

    async def _consume(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._handle(item)
            except OutboxError as exc:
                _pass_cancellation(exc)
                # [durable before ack] not stored: no ack; the broker delivers it again on the next session.
                self.counters["not_acked:not_durable"] += 1
                log.error("wristbands: a message on %s raised an alarm that was not stored (%s); left "
                          "unacknowledged for the broker to deliver again", item.msg.topic, exc)
                item.link.resync.set()
                continue
            except Exception as exc:
                _pass_cancellation(exc)
                self.counters["errors"] += 1
                log.exception("wristbands: handling a message on %s failed", item.msg.topic)
            # [durable before ack] alarms raised by this message are committed by now (a press folded
            # into an alarm already raised: see [fold off the disk] in the alarm runtime).
            self._ack(item)

    async def _handle(self, item: _Queued) -> None:
        msg = item.msg
        if item.link.acks and (msg.topic == self._cfg.ack_topic or msg.topic.startswith(f"{self._cfg.ack_topic}/")):
            await self._guard_ack(msg.topic, msg.payload)
            return
        decoder = next((d for f, d in item.link.routes if _matches(f, msg.topic)), None)
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
        for it in items:
            if isinstance(it, Rejected):
                self._reject(it.code)
            elif isinstance(it, GatewayStatus):
                self.counters["gateway_status"] += 1
            elif isinstance(it, Reading):
                await self._reading(it)

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

    async def _guard_ack(self, topic: str, payload: bytes) -> None:
        """A guard-room panel's acknowledgement on ``<ack_topic>/<panel>``. The broker's ACL lets a panel
        write only the topic that names its own account, so the last level is who sent it. A panel can
        acknowledge, never resolve (that needs the CLI, the console or a signed platform command)."""
        panel = topic[len(self._cfg.ack_topic) + 1:] if topic != self._cfg.ack_topic else ""
        if not panel:
            self.counters["rejected:ack_without_panel"] += 1
            log.warning("guard-room acknowledgement on %s refused: panels acknowledge on %s/<their account>",
                        self._cfg.ack_topic, self._cfg.ack_topic)
            return
        try:
            caller = check_text("panel", f"panel:{panel}", MAX_BY_CHARS)
            doc = orjson.loads(payload)
            alarm_id = str(doc["alarm_id"])
            by = doc.get("by") or panel
            action = doc.get("action") or "ack"
        except AlarmInputError as exc:
            self.counters["rejected:guard_ack"] += 1
            log.warning("guard-room acknowledgement refused: %s", exc)
            return
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            self.counters["rejected:guard_ack"] += 1
            log.warning("guard-room acknowledgement from %s not understood: %s", caller, exc)
            return
        if not isinstance(by, str) or not isinstance(action, str):
            self.counters["rejected:guard_ack"] += 1
            log.warning("guard-room acknowledgement from %s not understood: by and action must be text", caller)
            return
        if action != "ack":
            self.counters["rejected:panel_resolve" if action == "resolve" else "rejected:guard_ack"] += 1
            log.warning("guard-room %s of %s from %s refused: a panel can only acknowledge", action[:20],
                        alarm_id[:64], caller)
            return
        try:
            await self._alarms.ack(alarm_id, by, "local_mqtt", caller=caller)
        except AlarmInputError as exc:
            self.counters["rejected:guard_ack"] += 1
            log.warning("guard-room acknowledgement from %s refused: %s", caller, exc)
        except AlarmError as exc:
            log.warning("guard-room acknowledgement of %s from %s refused: %s", alarm_id[:64], caller, exc)

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
            session = self._main.session
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
        doc = {"alarm_id": alarm.id, "kind": alarm.kind, "state": alarm.state.value,
               "resident_id": alarm.resident_id, "place": alarm.place, "device_id": alarm.device_id,
               "count": alarm.count,
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
        """The main connection's session (guard-room topic, notifier topics), None while it is down."""
        return self._main.session

    def snapshot(self) -> Mapping[str, Any]:
        return {"broker": self._cfg.broker, "connected": self.connected.is_set(),
                "connections": {link.name: link.connected.is_set() for link in self._links},
                "bands_seen": len(self._bands), "queue": self._queue.qsize(), "panel_pending": len(self._panel),
                "counters": dict(self.counters)}


def _for_gateway(topic_filter: str, gateway: str) -> str:
    """A decoder's subscription narrowed to one BLE gateway: its gateway level (the second) named."""
    parts = topic_filter.split("/")
    if len(parts) < 2 or parts[1] != "+":
        raise ValueError(f"{topic_filter!r} has no gateway level to narrow")
    parts[1] = gateway
    return "/".join(parts)


def _matches(topic_filter: str, topic: str) -> bool:
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)
