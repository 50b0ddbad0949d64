"""An asyncio adapter over paho-mqtt: one connection as an async context manager.

Why not aiomqtt: the uplink must know whether a PUBACK carried a failure reason code (MQTT 5), and the
wristband inputs need paho's manual acknowledgement so an alarm is durable before it is acknowledged.
Both need paho's callbacks directly. The socket is driven from the event loop with paho's external-loop
hooks (``loop_read`` on readable, ``loop_write`` while paho wants to write, ``loop_misc`` every second),
so no extra thread runs; only the blocking TCP/TLS connect goes to a worker thread.

Failures come out as :class:`~edgeagent.kernel.errors.UplinkError` (or its auth subclass), cause kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent.kernel.errors import UplinkAuthError, UplinkError

log = logging.getLogger(__name__)

Protocol = Literal["5", "3.1.1"]
_MISC_INTERVAL_S = 1.0
# CONNACK codes that mean "this broker does not speak the protocol version we asked for".
_V311_UNACCEPTABLE_PROTOCOL = 1
_V5_UNSUPPORTED_PROTOCOL = 0x84
_AUTH_CODES_V311 = {4, 5}
_AUTH_CODES_V5 = {0x86, 0x87, 0x8C}


class ProtocolRefused(UplinkError):
    """The broker refused (or ignored) the MQTT protocol version we asked for."""


class PublishRefused(UplinkError):
    """The broker answered a QoS 1 publish with a failure reason code (MQTT 5); the connection stays up."""

    def __init__(self, message: str, reason_code: int) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class PubackTimeout(UplinkError):
    """No PUBACK arrived in time: the connection is presumed dead (a broker never forgets one)."""


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Incoming:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    response_topic: str | None
    correlation_data: bytes | None


@dataclass(frozen=True, slots=True)
class SessionParams:
    host: str
    port: int
    client_id: str
    protocol: Protocol = "5"
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    # A QoS 1 publish that has no PUBACK after this long fails (the time includes waiting behind the
    # in-flight window): a half-open connection must not hold a sender forever.
    puback_timeout_s: float = 30.0
    username: str | None = None
    password: str | None = None  # resolved secret; never logged
    ssl_context: ssl.SSLContext | None = None
    will: Will | None = None
    max_inflight: int = 64
    manual_ack: bool = False
    # A persistent session: the broker keeps our subscriptions and queues QoS 1 messages while we are away,
    # and re-sends the ones we never acknowledged (with manual_ack: those not yet safely handled).
    persistent: bool = False
    # MQTT 5 CONNECT properties that bound what the broker sends us. Maximum Packet Size: the broker
    # must not send a bigger packet (mosquitto drops such a message for this client), so an oversize
    # publish never reaches our memory. Receive Maximum: at most this many unacknowledged QoS 1
    # messages in flight to us, so a flood waits in the broker, not in our process. Ignored on 3.1.1.
    max_packet_size: int | None = None
    receive_maximum: int | None = None


class MqttSession:
    """One MQTT connection. ``async with MqttSession(params, on_message=...) as s: await s.publish(...)``.

    Not reusable: make a new session for each connection attempt (the owner holds the retry policy).
    ``on_message`` runs on the event loop for every incoming message; with ``manual_ack`` the owner
    calls :meth:`ack` once the message is safely handled.
    """

    def __init__(self, params: SessionParams, on_message: Callable[[Incoming], None] | None = None) -> None:
        self._p = params
        self._on_message_cb = on_message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._connected: asyncio.Future[None] | None = None
        self.disconnected: asyncio.Future[None] | None = None
        self._pending_pub: dict[int, asyncio.Future[None]] = {}
        self._pending_sub: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._misc_handle: asyncio.TimerHandle | None = None
        self._sock: Any = None
        self._tls_alert: str | None = None
        # The broker's Maximum Packet Size from CONNACK (MQTT 5); None: no limit announced.
        self.max_packet_size: int | None = None

    @property
    def protocol(self) -> Protocol:
        return self._p.protocol

    # --- connect / disconnect --------------------------------------------------------------------

    async def __aenter__(self) -> MqttSession:
        loop = self._loop = asyncio.get_running_loop()
        self._connected = loop.create_future()
        self.disconnected = loop.create_future()
        version = MQTTProtocolVersion.MQTTv5 if self._p.protocol == "5" else MQTTProtocolVersion.MQTTv311
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self._p.client_id,
            protocol=version,
            clean_session=(not self._p.persistent) if version == MQTTProtocolVersion.MQTTv311 else None,
            manual_ack=self._p.manual_ack,
        )
        self._client = client
        client.max_inflight_messages_set(self._p.max_inflight)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_log = self._on_log
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        if self._p.username is not None:
            client.username_pw_set(self._p.username, self._p.password)
        if self._p.ssl_context is not None:
            client.tls_set_context(self._p.ssl_context)
        if self._p.will is not None:
            w = self._p.will
            client.will_set(w.topic, w.payload, w.qos, w.retain)
        try:
            await asyncio.wait_for(self._connect(client), self._p.connect_timeout_s)
        except TimeoutError as exc:
            self._teardown()
            raise ProtocolRefused(
                f"{self._where}: no CONNACK within {self._p.connect_timeout_s:g} s "
                f"(broker down, or it ignores MQTT {self._p.protocol})") from exc
        except BaseException:
            self._teardown()
            raise
        self._misc_handle = loop.call_later(_MISC_INTERVAL_S, self._misc)
        return self

    async def _connect(self, client: paho.Client) -> None:
        assert self._connected is not None
        try:
            await asyncio.to_thread(self._blocking_connect, client)
        except ssl.SSLCertVerificationError as exc:
            raise UplinkAuthError(f"{self._where}: TLS certificate not trusted: {exc.verify_message}") from exc
        except ssl.SSLError as exc:
            raise UplinkAuthError(f"{self._where}: TLS handshake failed: {exc.reason or exc}") from exc
        except OSError as exc:
            raise UplinkError(f"{self._where}: cannot connect: {exc.strerror or exc}") from exc
        await self._connected

    def _blocking_connect(self, client: paho.Client) -> None:
        props = None
        if self._p.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
            props.SessionExpiryInterval = 7 * 24 * 3600 if self._p.persistent else 0
            if self._p.max_packet_size is not None:
                props.MaximumPacketSize = self._p.max_packet_size
            if self._p.receive_maximum is not None:
                props.ReceiveMaximum = self._p.receive_maximum
        client.connect(self._p.host, self._p.port, keepalive=self._p.keepalive_s, properties=props,
                       clean_start=(not self._p.persistent) if self._p.protocol == "5"
                       else paho.MQTT_CLEAN_START_FIRST_ONLY)

    @property
    def _where(self) -> str:
        return f"mqtt {self._p.host}:{self._p.port}"

    async def __aexit__(self, exc_type: type[BaseException] | None, *_exc: object) -> None:
        if exc_type is not None:
            # Leaving on an error (or a cancellation): no DISCONNECT, which would tell the broker to
            # discard the Last Will; closing the socket makes it publish the will, so whoever watches
            # the status topic learns that this client is gone.
            self._teardown()
            return
        client = self._client
        try:
            if client is not None and self.disconnected is not None and not self.disconnected.done():
                client.disconnect()
                with contextlib.suppress(TimeoutError, UplinkError):
                    await asyncio.wait_for(asyncio.shield(self.disconnected), 2.0)
        finally:
            self._teardown()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, so the broker publishes the Last Will."""
        self._teardown()

    def _teardown(self) -> None:
        if self._misc_handle is not None:
            self._misc_handle.cancel()
            self._misc_handle = None
        self._remove_socket()
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                client._sock_close()
        err = UplinkError(f"{self._where}: connection closed")
        self._fail_pending(err)
        if self.disconnected is not None and not self.disconnected.done():
            self.disconnected.set_exception(err)
            self.disconnected.exception()  # mark retrieved: nobody may be waiting
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(err)
            self._connected.exception()

    def _fail_pending(self, err: Exception) -> None:
        for fut in list(self._pending_pub.values()) + list(self._pending_sub.values()):
            if not fut.done():
                fut.set_exception(err)
        self._pending_pub.clear()
        self._pending_sub.clear()

    # --- operations ------------------------------------------------------------------------------

    def _require(self) -> paho.Client:
        if self._client is None or self.disconnected is None or self.disconnected.done():
            raise UplinkError(f"{self._where}: not connected")
        return self._client

    def max_payload(self, topic: str) -> int | None:
        """The largest payload a QoS 1 PUBLISH on ``topic`` (no properties) may carry under the broker's
        Maximum Packet Size, or None when the broker announced no limit. A broker closes the connection
        of a client that exceeds it, so the sender must fit its messages beforehand."""
        if self.max_packet_size is None:
            return None
        # Fixed header (1 byte + up to 4 of remaining length), topic (2 + bytes), packet id (2),
        # property length (1, MQTT 5 only; counted always).
        return self.max_packet_size - (1 + 4 + 2 + len(topic.encode()) + 2 + 1)

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                      properties: Properties | None = None) -> None:
        """Publish; for QoS 1 returns once the PUBACK arrived (and, on MQTT 5, reported success).

        Raises PublishRefused for a failure reason code, PubackTimeout when no PUBACK came within
        ``puback_timeout_s``, UplinkError when the connection is gone.
        """
        client = self._require()
        assert self._loop is not None
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise UplinkError(f"{self._where}: publish failed: {paho.error_string(info.rc)}")
        if qos == 0 or info.is_published():
            return
        fut = self._pending_pub.get(info.mid)
        if fut is None:
            fut = self._pending_pub[info.mid] = self._loop.create_future()
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the inner future's outcome when
        # it completes in the same loop step as a cancel (the teardown failing it), losing the
        # CancelledError; a caller catching that UplinkError would then run on through its shutdown.
        try:
            async with asyncio.timeout(self._p.puback_timeout_s):
                await fut
        except TimeoutError as exc:
            if self._pending_pub.get(info.mid) is fut:
                del self._pending_pub[info.mid]
            raise PubackTimeout(f"{self._where}: no PUBACK for a message on {topic!r} within "
                                f"{self._p.puback_timeout_s:g} s") from exc

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        client = self._require()
        assert self._loop is not None
        rc, mid = client.subscribe(topic, qos=qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise UplinkError(f"{self._where}: subscribe failed: {paho.error_string(rc)}")
        fut = self._pending_sub.setdefault(mid, self._loop.create_future())
        async with asyncio.timeout(self._p.connect_timeout_s):  # not wait_for: see publish()
            codes = await fut
        for code in codes:
            if code.is_failure:
                raise UplinkError(f"{self._where}: subscription to {topic!r} refused: {code}")

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge an incoming message (manual-ack sessions only)."""
        if self._client is not None:
            self._client.ack(mid, qos)

    # --- paho callbacks (all on the event loop, except socket open during connect) ---------------

    def _on_connect(self, _c: paho.Client, _u: Any, _flags: Any, rc: ReasonCode,
                    _props: Properties | None = None) -> None:
        fut = self._connected
        if fut is None or fut.done():
            return
        if not rc.is_failure:
            limit = getattr(_props, "MaximumPacketSize", None) if _props is not None else None
            self.max_packet_size = int(limit) if limit else None
            fut.set_result(None)
            return
        value = rc.value
        if (self._p.protocol == "5" and value == _V5_UNSUPPORTED_PROTOCOL) or (
            self._p.protocol == "3.1.1" and value == _V311_UNACCEPTABLE_PROTOCOL
        ):
            fut.set_exception(ProtocolRefused(f"{self._where}: broker refused MQTT {self._p.protocol}: {rc}"))
        elif value in (_AUTH_CODES_V5 if self._p.protocol == "5" else _AUTH_CODES_V311) or value == 0x85:
            fut.set_exception(UplinkAuthError(f"{self._where}: broker refused our credentials: {rc}"))
        else:
            fut.set_exception(UplinkError(f"{self._where}: connection refused: {rc}"))

    def _on_disconnect(self, _c: paho.Client, _u: Any, _flags: Any, rc: ReasonCode,
                       _props: Properties | None = None) -> None:
        err = UplinkError(f"{self._where}: disconnected: {rc}")
        if self._connected is not None and not self._connected.done():
            if self._tls_alert is not None:
                # TLS 1.3 refuses a missing or unaccepted client certificate only after the handshake.
                self._connected.set_exception(UplinkAuthError(
                    f"{self._where}: TLS refused by the broker (client certificate missing or not "
                    f"accepted?): {self._tls_alert}"))
            else:
                # A 3.1.1 broker may answer an MQTT 5 CONNECT by closing the socket.
                self._connected.set_exception(ProtocolRefused(f"{self._where}: closed before CONNACK: {rc}")
                                              if self._p.protocol == "5" else err)
        self._fail_pending(err)
        if self.disconnected is not None and not self.disconnected.done():
            if rc.is_failure or rc.value != 0:
                self.disconnected.set_exception(err)
                self.disconnected.exception()
            else:
                self.disconnected.set_result(None)

    def _on_log(self, _c: paho.Client, _u: Any, level: int, buf: str) -> None:
        # paho reports a failed socket read only here (as text): keep a TLS alert from the broker.
        if level == paho.MQTT_LOG_ERR and "[SSL: " in buf and "alert" in buf.lower():
            self._tls_alert = buf.removeprefix("failed to receive on socket: ")

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, rc: ReasonCode,
                    _props: Properties | None = None) -> None:
        assert self._loop is not None
        fut = self._pending_pub.pop(mid, None)
        # Nobody waits: a QoS 0 message (paho reports it once written) or a PUBACK after the timeout.
        # Never keep a placeholder: a PUBACK cannot beat the registration (both run on this loop, and
        # publish() registers before it yields), and a kept one, one per QoS 0 message, grew the session
        # to 65,535 futures and let a later QoS 1 publish reusing the id return unacknowledged.
        if fut is None or fut.done():
            return
        if rc.is_failure:
            fut.set_exception(PublishRefused(f"{self._where}: broker refused the message: {rc}", rc.value))
        else:
            fut.set_result(None)

    def _on_subscribe(self, _c: paho.Client, _u: Any, mid: int, codes: list[ReasonCode],
                      _props: Properties | None = None) -> None:
        assert self._loop is not None
        fut = self._pending_sub.setdefault(mid, self._loop.create_future())
        if not fut.done():
            fut.set_result(codes)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        incoming = Incoming(
            topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos, retain=bool(msg.retain), mid=msg.mid,
            response_topic=response_topic, correlation_data=correlation,
        )
        if self._on_message_cb is not None:
            try:
                self._on_message_cb(incoming)
            except Exception:
                log.exception("%s: message handler failed on %r", self._where, msg.topic)

    # --- socket plumbing ---------------------------------------------------------------------------

    def _on_socket_open(self, client: paho.Client, _u: Any, sock: Any) -> None:
        # Called from the connect worker thread.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._add_socket, client, sock)

    def _add_socket(self, client: paho.Client, sock: Any) -> None:
        if self._client is not client:
            return
        self._sock = sock
        fileno = sock.fileno() if not isinstance(sock, int) else sock
        assert self._loop is not None
        with contextlib.suppress(OSError):
            raw = sock if isinstance(sock, socket.socket) else None
            if raw is not None:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop.add_reader(fileno, self._readable, client)
        if client.want_write():
            self._loop.add_writer(fileno, self._writable, client)

    def _remove_socket(self) -> None:
        if self._sock is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                fd = self._sock.fileno()
                self._loop.remove_reader(fd)
                self._loop.remove_writer(fd)
        self._sock = None

    def _on_socket_close(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        if self._loop is None:
            return
        if self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._remove_socket()
        else:
            self._loop.call_soon_threadsafe(self._remove_socket)

    def _on_register_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        if self._loop is None or self._sock is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._loop.add_writer(sock.fileno(), self._writable, client)
        else:
            self._loop.call_soon_threadsafe(self._register_write_later, client)

    def _register_write_later(self, client: paho.Client) -> None:
        if self._sock is not None and self._loop is not None and self._client is client:
            self._loop.add_writer(self._sock.fileno(), self._writable, client)

    def _on_unregister_write(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        if self._loop is None or self._sock is None:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_writer(sock.fileno())

    def _readable(self, client: paho.Client) -> None:
        try:
            while True:
                client.loop_read()
                # TLS sockets may hold decoded bytes that select() cannot see.
                sock = self._sock
                if sock is not None and hasattr(sock, "pending") and sock.pending() > 0:
                    continue
                break
        except Exception as exc:  # noqa: BLE001 - a broken socket ends the session
            self._broken(exc)

    def _writable(self, client: paho.Client) -> None:
        try:
            client.loop_write()
        except Exception as exc:  # noqa: BLE001
            self._broken(exc)

    def _misc(self) -> None:
        client = self._client
        if client is None or self._loop is None:
            return
        client.loop_misc()
        self._misc_handle = self._loop.call_later(_MISC_INTERVAL_S, self._misc)

    def _broken(self, exc: BaseException) -> None:
        err = UplinkError(f"{self._where}: connection broken: {exc}")
        self._fail_pending(err)
        if self.disconnected is not None and not self.disconnected.done():
            self.disconnected.set_exception(err)
            self.disconnected.exception()
        self._teardown()


def build_ssl_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """A verifying client TLS context (TLS 1.2+), with a client certificate for mutual TLS."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file is not None:
            ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise UplinkAuthError(f"TLS files unusable: {exc}") from exc
    return ctx
