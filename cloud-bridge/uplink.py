"""The edge side of the cloud bridge: outbox → MQTT (QoS 1) → PUBACK → rows marked sent.

* Rows leave the outbox only after their PUBACK; in-flight is never "sent" (see outbox [3]).
* Several events of one priority class travel in one MQTT message (the contract's batch message),
  with a bounded window of unacknowledged messages.
* The drain starts as soon as a connection is up, not when new traffic arrives.
* Messages fit the broker's Maximum Packet Size (MQTT 5 CONNACK). A batch the broker refuses is sent
  again in halves; a single event it refuses (or one too big for it) goes to the outbox's dead letters,
  so it cannot block its class, nor the classes below it, forever.
* Reconnect: exponential backoff with full jitter, short cap early in an outage (see OutageBackoff). The
  backoff starts over only once a connection has stayed up ``stable_after_s``: a connection dropped
  right after CONNACK (another box with our client id, a refused publish) backs off like an outage.
* MQTT 5 first; a broker that refuses it (or never answers) is retried at once with 3.1.1, and
  remembered: later reconnects to that broker start with 3.1.1 (MQTT 5 is tried again after ``v5_retry_s``).
* Retained online/offline status on ``.../status``, with a Last Will for a lost connection. A failing
  uplink closes its socket without DISCONNECT, so the broker publishes the will.
* Signed commands on ``.../cmd/req``, answered on ``.../cmd/res`` (or an MQTT 5 response topic under it).
  Command tasks belong to the uplink, not to one connection: a drop does not cancel a command half-way,
  and an answer that could not be sent goes out on the next connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.kernel.config.schema import UplinkConfig
from edgeagent.kernel.errors import SecretError, UplinkAuthError, UplinkError
from edgeagent.kernel.pipeline.commands import CommandService
from edgeagent.kernel.pipeline.events import Priority, utc_ms
from edgeagent.kernel.pipeline.outbox import Batch, Outbox
from edgeagent.kernel.runtime import metrics
from edgeagent.kernel.runtime.backoff import OutageBackoff
from edgeagent.transport.mqtt import (
    Incoming,
    MqttSession,
    Protocol,
    ProtocolRefused,
    PublishRefused,
    SessionParams,
    Will,
    build_ssl_context,
)

log = logging.getLogger(__name__)

UplinkState = Literal["disabled", "connecting", "connected", "disconnected", "auth_failed"]

_BATCH_HEAD = b'{"v":1,"events":['
_BATCH_TAIL = b"]}"
# PUBACK reason codes that are about the topic or the session, not about the message: halving the
# batch or dead-lettering its events would not help (and a not-authorised topic would dead-letter a
# whole class). Not authorised, topic name invalid, packet id in use, quota exceeded.
_NOT_ABOUT_THE_MESSAGE = frozenset({0x87, 0x90, 0x91, 0x97})


@dataclass(frozen=True, slots=True)
class _Reply:
    """A command's answer, kept until a connection takes it."""

    topic: str
    payload: bytes
    correlation_data: bytes | None
    command_id: str | None
    qos: int = 1


@dataclass(frozen=True, slots=True)
class Topics:
    base: str

    @classmethod
    def of(cls, prefix: str, site_id: str, gateway_id: str) -> Topics:
        return cls(f"{prefix}/{site_id}/{gateway_id}")

    def events(self, priority: Priority) -> str:
        return f"{self.base}/events/{priority.label}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def cmd_req(self) -> str:
        return f"{self.base}/cmd/req"

    @property
    def cmd_res(self) -> str:
        return f"{self.base}/cmd/res"


def batch_payload(batch: Batch) -> bytes:
    """The contract's batch message: ``{"v":1,"events":[...]}`` built from stored envelopes."""
    return _BATCH_HEAD + b",".join(batch.payloads) + _BATCH_TAIL


def _message_size(payload_bytes: int, n: int) -> int:
    return len(_BATCH_HEAD) + payload_bytes + max(0, n - 1) + len(_BATCH_TAIL)


def _fit(batch: Batch, limit: int) -> Iterator[Batch]:
    """Split a batch, in order, into runs whose batch message is at most ``limit`` bytes (a single
    event that is bigger on its own is a run of one)."""
    start, size = 0, 0
    for i, p in enumerate(batch.payloads):
        if i > start and _message_size(size + len(p), i + 1 - start) > limit:
            yield _part(batch, start, i)
            start, size = i, 0
        size += len(p)
    yield _part(batch, start, len(batch))


def _part(batch: Batch, start: int, end: int) -> Batch:
    return Batch(batch.priority, batch.seqs[start:end], batch.payloads[start:end])


class Uplink:
    """Owns the connection to the cloud broker. Run :meth:`run` as a supervised task."""

    def __init__(
        self,
        cfg: UplinkConfig,
        *,
        site_id: str,
        gateway_id: str,
        outbox: Outbox,
        version: str,
        commands: CommandService | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        stable_after_s: float = 30.0,
        v5_retry_s: float = 3600.0,
        max_command_tasks: int = 256,
        max_unanswered: int = 256,
    ) -> None:
        self._cfg = cfg
        self._site_id = site_id
        self._gateway_id = gateway_id
        self._outbox = outbox
        self._version = version
        self._commands = commands
        self._now = now
        self.topics = Topics.of(cfg.topic_prefix, site_id, gateway_id)
        self.state: UplinkState = "disconnected"
        self.protocol: Protocol | None = None
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self.last_publish_mono: float | None = None
        self.published_events = 0
        self._session: MqttSession | None = None
        self._stopping = asyncio.Event()
        self._drain_deadline: float | None = None
        self._idle = asyncio.Event()
        self._backoff = OutageBackoff(
            first_max_s=cfg.retry.first_max_s, short_cap_s=cfg.retry.short_cap_s,
            long_cap_s=cfg.retry.long_cap_s, short_window_s=cfg.retry.short_window_s)
        # A connection must stay up this long before the backoff starts over (see run()).
        self._stable_after_s = stable_after_s
        self._last_logged_error: str | None = None
        # 'auto' protocol: (broker URL, monotonic time) of the last time MQTT 5 was refused there and
        # 3.1.1 then worked. Kept for the life of this object; a different broker URL does not match.
        self._v5_retry_s = v5_retry_s
        self._speaks_311: tuple[str, float] | None = None
        self._fell_back = False
        self.connect_attempts: Counter[str] = Counter()
        # Command tasks outlive connections; bounded, overflow dropped unread and counted.
        self._cmd_tasks: set[asyncio.Task[None]] = set()
        self._max_command_tasks = max_command_tasks
        self.commands_dropped = 0
        # Answers not yet delivered, for the next connection. Bounded; overflow drops the oldest, counted.
        self._unanswered: deque[_Reply] = deque()
        self._max_unanswered = max_unanswered
        self.answers_dropped = 0
        self.dead_lettered_events = 0
        # Set while connected with the command topic subscribed (commands can be received).
        self.subscribed = asyncio.Event()
        self._inflight = 0

    # --- public ------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        return {
            "state": self.state,
            "broker": f"{self._cfg.host}:{self._cfg.port}",
            "tls": self._cfg.uses_tls,
            "protocol": self.protocol,
            "connected_for_s": None if self.connected_since is None
            else round(time.monotonic() - self.connected_since, 1),
            "last_error": self.last_error,
            "published_events": self.published_events,
            "inflight_batches": self._inflight,
            "dead_lettered_events": self.dead_lettered_events,
            "unanswered_commands": len(self._unanswered),
        }

    async def stop(self, drain_s: float) -> None:
        """Stop: keep sending what is queued for up to ``drain_s``, then say offline and disconnect."""
        self._drain_deadline = time.monotonic() + drain_s
        self._stopping.set()

    async def run(self) -> None:
        """Connect, drain, reconnect; returns only after :meth:`stop`."""
        # The outage clock and the backoff restart only after a stable connection (see below).
        outage_started = time.monotonic()
        protocol = self._first_protocol()
        while not self._stopping.is_set():
            # A refused login stays the reported state through the retries (it is what an installer must fix,
            # and a status read between two attempts must not say "connecting"), until a connection succeeds or
            # an attempt fails for another reason.
            if self.state != "auth_failed":
                self.state = "connecting"
            self.connect_attempts[protocol] += 1
            try:
                await self._connect_and_pump(protocol)
            except ProtocolRefused as exc:
                if self._cfg.protocol == "auto" and protocol == "5":
                    log.warning("uplink: %s; retrying with MQTT 3.1.1", exc)
                    protocol = "3.1.1"
                    self._fell_back = True
                    continue
                self._failed("protocol", exc)
                self.state = "disconnected"
                if self._cfg.protocol == "auto":
                    self._speaks_311 = None  # neither answered: what we knew no longer holds
                protocol = self._first_protocol()
            except UplinkAuthError as exc:
                self._failed("auth", exc)
                self.state = "auth_failed"
            except (UplinkError, SecretError) as exc:
                self._failed("connection", exc)
                self.state = "disconnected"
                # A 3.1.1 attempt that failed without ever connecting, on a broker not known to need
                # 3.1.1, says nothing about the protocol: start from MQTT 5 again.
                protocol = self._first_protocol()
            finally:
                self._fell_back = False
                metrics.UPLINK_CONNECTED.set(0)
                if self.connected_since is not None:
                    if time.monotonic() - self.connected_since >= self._stable_after_s:
                        # Only a connection that held proves the broker takes us: the next drop is a
                        # new outage. One dropped sooner (a twin with our client id, a publish the
                        # broker refuses) continues the outage, its backoff and its logged error.
                        self._backoff.reset()
                        outage_started = time.monotonic()
                        self._last_logged_error = None
                    self.connected_since = None
                # [3] every publish task has ended, so acks are queued before this reset.
                with contextlib.suppress(Exception):
                    await self._outbox.reset_leases()
            if self._stopping.is_set():
                break
            delay = self._backoff.next_delay(time.monotonic() - outage_started)
            if self.state != "auth_failed":
                self.state = "disconnected"
            log.debug("uplink: reconnecting in %.2f s", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        self.state = "disconnected"
        await self._end_commands()

    def _first_protocol(self) -> Protocol:
        """The protocol to open a connection with: pinned, else what this broker was found to speak."""
        if self._cfg.protocol != "auto":
            return self._cfg.protocol
        known = self._speaks_311
        if known is not None and known[0] == self._cfg.broker and time.monotonic() - known[1] < self._v5_retry_s:
            return "3.1.1"
        return "5"

    def _learn(self, protocol: Protocol) -> None:
        if self._cfg.protocol != "auto":
            return
        if protocol == "5":
            self._speaks_311 = None
        elif self._fell_back or self._speaks_311 is None:
            # MQTT 5 was refused just now and 3.1.1 works: start with 3.1.1 until MQTT 5 is due again.
            self._speaks_311 = (self._cfg.broker, time.monotonic())

    # --- connection --------------------------------------------------------------------------------

    def _failed(self, kind: str, exc: BaseException) -> None:
        metrics.UPLINK_FAILURES.labels(kind).inc()
        msg = str(exc)
        if msg != self._last_logged_error:
            # Log once per change, not once per retry (nor once per short-lived connection).
            log.error("uplink: %s", msg)
            self._last_logged_error = msg
        self.last_error = msg

    def _params(self, protocol: Protocol) -> SessionParams:
        will = Will(self.topics.status, self._status_payload("offline", "connection lost"), qos=1, retain=True)
        return session_params(self._cfg, protocol=protocol,
                              client_id=self._cfg.client_id or f"edgeagent-{self._site_id}-{self._gateway_id}",
                              will=will)

    def _status_payload(self, state: str, reason: str) -> bytes:
        return orjson.dumps({
            "v": 1, "state": state, "reason": reason, "site_id": self._site_id, "gateway_id": self._gateway_id,
            "version": self._version, "at": utc_ms(self._now()),
        })

    async def _connect_and_pump(self, protocol: Protocol) -> None:
        params = self._params(protocol)
        session = MqttSession(params, on_message=self._on_message)
        async with session:
            self._session = session
            self.protocol = protocol
            self.state = "connected"
            self.connected_since = time.monotonic()
            self.last_error = None
            self._learn(protocol)
            metrics.UPLINK_CONNECTED.set(1)
            metrics.UPLINK_CONNECTS.inc()
            log.info("uplink: connected to %s:%d (MQTT %s%s)", self._cfg.host, self._cfg.port, protocol,
                     ", TLS" if params.ssl_context else "")
            try:
                await session.publish(self.topics.status, self._status_payload("online", "connected"),
                                      qos=1, retain=True)
                if self._commands is not None:
                    await session.subscribe(self.topics.cmd_req, qos=1)
                self.subscribed.set()
                await self._answer_backlog(session)
                await self._pump(session)
                if self._stopping.is_set():
                    await self._settle_commands(session)
                    with contextlib.suppress(UplinkError, TimeoutError):
                        await asyncio.wait_for(session.publish(
                            self.topics.status, self._status_payload("offline", "shutdown"), qos=1, retain=True),
                            2.0)
            finally:
                # Command tasks keep running: they answer through the next connection.
                self.subscribed.clear()
                self._session = None

    async def _pump(self, session: MqttSession) -> None:
        """Lease → publish → ack, with at most ``max_inflight_batches`` unacknowledged messages."""
        window = asyncio.Semaphore(self._cfg.max_inflight_batches)
        disconnected = session.disconnected
        assert disconnected is not None
        failure: list[BaseException] = []
        async with asyncio.TaskGroup() as tg:
            while True:
                if disconnected.done() or failure:
                    break
                if self._stopping.is_set() and self._drain_expired():
                    break
                await _first(window.acquire(), disconnected)
                if disconnected.done():
                    break
                batch = await self._outbox.lease(self._cfg.batch_max_events, self._lease_bytes(session))
                if batch is None:
                    window.release()
                    self._outbox.changed.clear()
                    batch = await self._outbox.lease(self._cfg.batch_max_events, self._lease_bytes(session))
                    if batch is None:
                        if self._stopping.is_set() and self._inflight == 0:
                            break  # drained
                        await _first(self._outbox.changed.wait(), disconnected, self._stopping.wait(),
                                     self._idle.wait(), within_s=self._wait_budget())
                        continue
                    await window.acquire()
                self._inflight += 1
                tg.create_task(self._send(session, batch, window, failure))
        if disconnected.done() and not self._stopping.is_set():
            exc = disconnected.exception()
            raise exc if isinstance(exc, UplinkError) else UplinkError("disconnected")
        if failure and not self._stopping.is_set():
            raise failure[0]

    def _drain_expired(self) -> bool:
        return self._drain_deadline is not None and time.monotonic() >= self._drain_deadline

    def _wait_budget(self) -> float | None:
        if self._drain_deadline is None:
            return None
        return max(0.0, self._drain_deadline - time.monotonic())

    def _lease_bytes(self, session: MqttSession) -> int:
        """Payload bytes a lease may take so that its batch message fits the broker's packet limit."""
        limits = [session.max_payload(self.topics.events(p)) for p in Priority]
        fitting = [lim for lim in limits if lim is not None]
        if not fitting:
            return self._cfg.batch_max_bytes
        room = min(fitting) - len(_BATCH_HEAD) - len(_BATCH_TAIL) - (self._cfg.batch_max_events - 1)
        return max(1, min(self._cfg.batch_max_bytes, room))

    async def _send(self, session: MqttSession, batch: Batch, window: asyncio.Semaphore,
                    failure: list[BaseException]) -> None:
        try:
            await self._deliver(session, batch)
        except UplinkError as exc:
            failure.append(exc)
            self._idle.set()
        finally:
            self._inflight -= 1
            window.release()
            if self._inflight == 0:
                self._idle.set()
                self._idle.clear()

    async def _deliver(self, session: MqttSession, batch: Batch) -> None:
        """Publish a batch and ack it; split what the broker cannot take, dead-letter single events it
        never will. Raises UplinkError when the connection (not the message) is the problem."""
        topic = self.topics.events(batch.priority)
        payload = batch_payload(batch)
        limit = session.max_payload(topic)
        if limit is not None and len(payload) > limit:
            if len(batch) == 1:
                await self._dead_letter(batch, f"{len(payload)} bytes, more than the broker's maximum packet "
                                               f"size ({session.max_packet_size} bytes)")
                return
            # All parts are handed to the client before any PUBACK is awaited, so they leave in seq
            # order as the whole batch would have.
            outcomes = await asyncio.gather(*(self._deliver(session, part) for part in _fit(batch, limit)),
                                            return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            return
        try:
            await session.publish(topic, payload, qos=1)
        except PublishRefused as exc:
            if exc.reason_code in _NOT_ABOUT_THE_MESSAGE:
                raise
            if len(batch) == 1:
                await self._dead_letter(batch, str(exc))
                return
            log.warning("uplink: the broker refused a batch of %d %s events (%s); sending it in halves",
                        len(batch), batch.priority.label, exc)
            half = len(batch) // 2
            await self._deliver(session, _part(batch, 0, half))
            await self._deliver(session, _part(batch, half, len(batch)))
            return
        # [3] queue the ack before anything can run between PUBACK and here.
        ack = self._outbox.ack_nowait(batch)
        ack.add_done_callback(_log_ack_failure)
        n = len(batch)
        self.published_events += n
        self.last_publish_mono = time.monotonic()
        metrics.EVENTS_PUBLISHED.labels(batch.priority.label).inc(n)
        metrics.BATCHES_PUBLISHED.inc()

    async def _dead_letter(self, batch: Batch, reason: str) -> None:
        # The payload is never logged: it may carry residents' data.
        log.error("uplink: giving up on the %s-class event seq %d: %s (kept in the outbox's dead letters)",
                  batch.priority.label, batch.seqs[0], reason)
        self.dead_lettered_events += await self._outbox.dead_letter(batch.seqs, reason)

    # --- commands ----------------------------------------------------------------------------------

    def _on_message(self, msg: Incoming) -> None:
        if msg.topic != self.topics.cmd_req or self._commands is None:
            return
        if len(self._cmd_tasks) >= self._max_command_tasks:
            # Overflow policy: a flood beyond the bound is dropped unread and counted (the command
            # service's summary audit includes it); the platform retries what it does not hear back on.
            self.commands_dropped += 1
            metrics.COMMANDS.labels("dropped").inc()
            self._commands.note_dropped()
            return
        task = asyncio.get_running_loop().create_task(self._run_command(msg), name="command")
        self._cmd_tasks.add(task)
        task.add_done_callback(self._cmd_tasks.discard)

    async def _run_command(self, msg: Incoming) -> None:
        assert self._commands is not None
        result = await self._commands.handle(msg.payload)
        metrics.COMMANDS.labels(result.status).inc()
        topic = self.topics.cmd_res
        wanted = msg.response_topic
        # Only the default topic or one under it (".../cmd/result" is not), never a wildcard filter.
        if wanted and (wanted == topic or wanted.startswith(topic + "/")) and not {"+", "#"} & set(wanted):
            topic = wanted
        # A request whose signature did not verify is answered at QoS 0 (best effort, not kept for
        # the next connection): a flood of them then costs no PUBACK round trip each, and the
        # bounded set of command tasks stays free for real commands.
        reply = _Reply(topic, result.to_json(self._now()), msg.correlation_data, result.command_id,
                       qos=1 if result.verified else 0)
        await self._answer(reply)

    async def _answer(self, reply: _Reply) -> None:
        session = self._session
        if session is not None:
            try:
                await self._publish_reply(session, reply)
            except PublishRefused as exc:
                log.warning("command %s: the broker refused the answer: %s", reply.command_id, exc)
                return
            except UplinkError as exc:
                if reply.qos == 0:
                    return
                log.warning("command %s: answer not delivered (%s); sending it on the next connection",
                            reply.command_id, exc)
            else:
                return
        elif reply.qos == 0:
            return  # best effort only (see _run_command)
        else:
            log.info("command %s: no connection; answering on the next one", reply.command_id)
        if len(self._unanswered) >= self._max_unanswered:
            dropped = self._unanswered.popleft()
            self.answers_dropped += 1
            log.warning("command %s: too many answers waiting for a connection; this one is dropped",
                        dropped.command_id)
        self._unanswered.append(reply)

    async def _publish_reply(self, session: MqttSession, reply: _Reply) -> None:
        props = None
        if session.protocol == "5" and reply.correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = reply.correlation_data
        await session.publish(reply.topic, reply.payload, qos=reply.qos, properties=props)

    async def _answer_backlog(self, session: MqttSession) -> None:
        """Send answers that an earlier connection could not; a connection failure leaves them queued."""
        while self._unanswered:
            reply = self._unanswered[0]
            try:
                await self._publish_reply(session, reply)
            except PublishRefused as exc:
                log.warning("command %s: the broker refused the answer: %s", reply.command_id, exc)
            if self._unanswered and self._unanswered[0] is reply:
                self._unanswered.popleft()

    async def _settle_commands(self, session: MqttSession) -> None:
        """Stopping: let running commands finish within the drain time and answer them."""
        if self._cmd_tasks:
            budget = self._wait_budget()
            await asyncio.wait(set(self._cmd_tasks), timeout=max(1.0, budget or 0.0))
        with contextlib.suppress(UplinkError):
            await self._answer_backlog(session)

    async def _end_commands(self) -> None:
        """The uplink stops: what still runs is cancelled (each is audited as interrupted)."""
        for task in list(self._cmd_tasks):
            task.cancel()
        if self._cmd_tasks:
            await asyncio.gather(*self._cmd_tasks, return_exceptions=True)
        if self._commands is not None:
            await self._commands.flush_audits()


def session_params(cfg: UplinkConfig, *, protocol: Protocol, client_id: str, will: Will | None) -> SessionParams:
    """Connection parameters from the config, resolving secrets (raises SecretError / UplinkAuthError)."""
    password = cfg.password.resolve().get_secret_value() if cfg.password is not None else None
    ctx = None
    if cfg.uses_tls:
        tls = cfg.tls
        ctx = build_ssl_context(
            str(tls.ca_file) if tls is not None and tls.ca_file is not None else None,
            str(tls.cert_file) if tls is not None and tls.cert_file is not None else None,
            str(tls.key.path_for()) if tls is not None and tls.key is not None else None,
        )
    return SessionParams(
        host=cfg.host, port=cfg.port, client_id=client_id, protocol=protocol, keepalive_s=cfg.keepalive_s,
        connect_timeout_s=cfg.connect_timeout_s, username=cfg.username, password=password, ssl_context=ctx,
        will=will, max_inflight=cfg.max_inflight_batches + 8,
    )


async def probe(cfg: UplinkConfig, client_id: str) -> Protocol:
    """Connect once (MQTT 5, then 3.1.1 if allowed) and disconnect; returns the protocol that worked.

    For ``edgeagent doctor``: raises UplinkError / UplinkAuthError / SecretError with a plain message.
    """
    protocols: list[Protocol] = ["3.1.1"] if cfg.protocol == "3.1.1" else ["5"]
    if cfg.protocol == "auto":
        protocols.append("3.1.1")
    last: UplinkError | None = None
    for protocol in protocols:
        try:
            async with MqttSession(session_params(cfg, protocol=protocol, client_id=client_id, will=None)):
                return protocol
        except ProtocolRefused as exc:
            last = exc
    assert last is not None
    raise last


def _log_ack_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("outbox: marking a batch sent failed: %s (it will be sent again)", fut.exception())


async def _first(*aws: Awaitable[Any], within_s: float | None = None) -> None:
    """Wait until the first of several awaitables/futures completes; cancel the ones we created."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t, a in zip(tasks, aws, strict=True):
            if t is not a and not t.done():
                t.cancel()
