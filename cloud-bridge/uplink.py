"""The edge side of the cloud bridge: outbox → MQTT (QoS 1) → PUBACK → rows marked sent.

* Rows leave the outbox only after their PUBACK; in-flight is never "sent" (see outbox [3]).
* Several events of one priority class travel in one MQTT message (the contract's batch message),
  with a bounded window of unacknowledged messages.
* The drain starts as soon as a connection is up, not when new traffic arrives.
* Reconnect: exponential backoff with full jitter, short cap early in an outage (see OutageBackoff).
* MQTT 5 first; a broker that refuses it (or never answers) is retried at once with 3.1.1.
* Retained online/offline status on ``.../status``, with a Last Will for a lost connection.
* Signed commands on ``.../cmd/req``, answered on ``.../cmd/res`` (or an MQTT 5 response topic under it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
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
    SessionParams,
    Will,
    build_ssl_context,
)

log = logging.getLogger(__name__)

UplinkState = Literal["disabled", "connecting", "connected", "disconnected", "auth_failed"]


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
    return b'{"v":1,"events":[' + b",".join(batch.payloads) + b"]}"


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
        self._cmd_tasks: set[asyncio.Task[None]] = set()
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
        }

    async def stop(self, drain_s: float) -> None:
        """Stop: keep sending what is queued for up to ``drain_s``, then say offline and disconnect."""
        self._drain_deadline = time.monotonic() + drain_s
        self._stopping.set()

    async def run(self) -> None:
        """Connect, drain, reconnect; returns only after :meth:`stop`."""
        outage_started = time.monotonic()
        protocol: Protocol = "3.1.1" if self._cfg.protocol == "3.1.1" else "5"
        while not self._stopping.is_set():
            self.state = "connecting"
            try:
                await self._connect_and_pump(protocol)
            except ProtocolRefused as exc:
                if self._cfg.protocol == "auto" and protocol == "5":
                    log.warning("uplink: %s; retrying with MQTT 3.1.1", exc)
                    protocol = "3.1.1"
                    continue
                self._failed("protocol", exc)
                if self._cfg.protocol == "auto":
                    protocol = "5"  # neither answered: next time start from 5 again
            except UplinkAuthError as exc:
                self._failed("auth", exc)
                self.state = "auth_failed"
            except (UplinkError, SecretError) as exc:
                self._failed("connection", exc)
                if self._cfg.protocol == "auto" and protocol == "3.1.1" and self.connected_since is None:
                    # 3.1.1 did not work either: the silence was not about the protocol. Try 5 again.
                    protocol = "5"
            finally:
                metrics.UPLINK_CONNECTED.set(0)
                if self.connected_since is not None:
                    outage_started = time.monotonic()
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

    # --- connection --------------------------------------------------------------------------------

    def _failed(self, kind: str, exc: BaseException) -> None:
        metrics.UPLINK_FAILURES.labels(kind).inc()
        msg = str(exc)
        if msg != self.last_error:
            # Log once per change, not once per retry.
            log.error("uplink: %s", msg)
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
            self._backoff.reset()
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
                await self._pump(session)
                if self._stopping.is_set():
                    with contextlib.suppress(UplinkError, TimeoutError):
                        await asyncio.wait_for(session.publish(
                            self.topics.status, self._status_payload("offline", "shutdown"), qos=1, retain=True),
                            2.0)
            finally:
                self.subscribed.clear()
                self._session = None
                for task in list(self._cmd_tasks):
                    task.cancel()
                if self._cmd_tasks:
                    await asyncio.gather(*self._cmd_tasks, return_exceptions=True)

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
                batch = await self._outbox.lease(self._cfg.batch_max_events, self._cfg.batch_max_bytes)
                if batch is None:
                    window.release()
                    self._outbox.changed.clear()
                    batch = await self._outbox.lease(self._cfg.batch_max_events, self._cfg.batch_max_bytes)
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

    async def _send(self, session: MqttSession, batch: Batch, window: asyncio.Semaphore,
                    failure: list[BaseException]) -> None:
        try:
            await session.publish(self.topics.events(batch.priority), batch_payload(batch), qos=1)
            # [3] queue the ack before anything can run between PUBACK and here.
            ack = self._outbox.ack_nowait(batch)
            ack.add_done_callback(_log_ack_failure)
            n = len(batch)
            self.published_events += n
            self.last_publish_mono = time.monotonic()
            metrics.EVENTS_PUBLISHED.labels(batch.priority.label).inc(n)
            metrics.BATCHES_PUBLISHED.inc()
        except UplinkError as exc:
            failure.append(exc)
            self._idle.set()
        finally:
            self._inflight -= 1
            window.release()
            if self._inflight == 0:
                self._idle.set()
                self._idle.clear()

    # --- commands ----------------------------------------------------------------------------------

    def _on_message(self, msg: Incoming) -> None:
        if msg.topic != self.topics.cmd_req or self._commands is None:
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
        props = None
        if self.protocol == "5" and msg.correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = msg.correlation_data
        session = self._session
        if session is None:
            log.warning("command %s: no connection to answer on", result.command_id)
            return
        try:
            await session.publish(topic, result.to_json(self._now()), qos=1, properties=props)
        except UplinkError as exc:
            log.warning("command %s: answer not delivered: %s", result.command_id, exc)


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
