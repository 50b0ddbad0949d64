"""The command channel end to end: a platform client → mosquitto → a real Daemon → answer + audit.

Every request gets an answer on ``.../cmd/res`` (or its MQTT 5 response topic under it) and a
``command.audit`` event; a rejected one never stops the daemon. Requests are signed here by hand from
the documented wire form, not with the product's own signing helper.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.app import Daemon
from edgeagent.capabilities import Config
from edgeagent.cloud_bridge import contract
from edgeagent.kernel.pipeline.commands import SIGNING_PREFIX
from tests.helpers import running_daemon, wait_until
from tests.peers import Mosquitto

SITE, GATEWAY = "site-1", "gw-1"
BASE = f"edgeagent/v1/{SITE}/{GATEWAY}"
REQ = f"{BASE}/cmd/req"
RES = f"{BASE}/cmd/res"
# The documented signing context (cloud-bridge/contract: the signature covers this prefix + body).
PREFIX = b"edgeagent-cmd-v1\n"
WAIT_S = 5.0


def test_signing_prefix_is_the_documented_one() -> None:
    assert SIGNING_PREFIX == PREFIX
    assert PREFIX.decode() == contract.COMMAND_SIGNATURE_CONTEXT


# --- the platform side ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    correlation: bytes | None


@dataclass
class Platform:
    """The cloud: publishes requests, and records every message on the broker (paho, own thread)."""

    port: int
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _subscribed: threading.Event = field(default_factory=threading.Event)
    _client: paho.Client | None = None

    def start(self) -> Platform:
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5,
                        client_id=f"platform-{time.monotonic_ns()}")
        c.on_connect = lambda cl, *_a: cl.subscribe("#", qos=1)
        c.on_subscribe = lambda *_a: self._subscribed.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", self.port, keepalive=10)
        c.loop_start()
        self._client = c
        if not self._subscribed.wait(WAIT_S):
            self.stop()
            raise TimeoutError("platform client did not subscribe")
        return self

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        with self._lock:
            self.received.append(Received(msg.topic, bytes(msg.payload), corr))

    def send(self, payload: bytes, *, response_topic: str | None = None, correlation: bytes | None = None
             ) -> None:
        assert self._client is not None
        props = None
        if response_topic is not None or correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        info = self._client.publish(REQ, payload, qos=1, properties=props)
        assert info.rc == paho.MQTT_ERR_SUCCESS

    def replies(self) -> list[Received]:
        with self._lock:
            return [m for m in self.received if m.topic == RES or m.topic.startswith(RES + "/")]

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.received if m.topic == topic]

    def events(self, type_name: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            batches = [m.payload for m in self.received if m.topic.startswith(f"{BASE}/events/")]
        evs = [e for b in batches for e in orjson.loads(b)["events"]]
        return [e for e in evs if type_name is None or e["type"] == type_name]

    def audits(self) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events("command.audit")]


# --- signed requests -------------------------------------------------------------------------------

def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def body(**over: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    b: dict[str, Any] = {
        "id": f"cmd-{secrets.token_hex(6)}", "site_id": SITE, "gateway_id": GATEWAY,
        "command": "gateway.ping", "args": {},
        "issued_at": iso(now - timedelta(seconds=1)), "expires_at": iso(now + timedelta(seconds=60)),
        "nonce": secrets.token_hex(16), "issuer": "test-platform"}
    b.update(over)
    return b


def request(key: Ed25519PrivateKey, b: dict[str, Any], kid: str = "k1") -> dict[str, Any]:
    text = orjson.dumps(b).decode()
    sig = base64.b64encode(key.sign(PREFIX + text.encode())).decode()
    return {"v": 1, "kid": kid, "body": text, "sig": sig}


def signed(key: Ed25519PrivateKey, b: dict[str, Any], kid: str = "k1") -> bytes:
    return orjson.dumps(request(key, b, kid))


# --- the gateway side ------------------------------------------------------------------------------

@dataclass
class Setup:
    tmp: Path
    broker: Mosquitto
    key: Ed25519PrivateKey
    pub_file: Path

    def config(self, **over: Any) -> Config:
        data: dict[str, Any] = {
            "version": 1, "site_id": SITE, "gateway_id": GATEWAY, "state_dir": str(self.tmp / "state"),
            "clock": {"sync": "synced"},
            "uplink": {"broker": self.broker.url, "retry": {"first_max_s": 0.1, "short_cap_s": 0.3},
                       "flush_on_stop_s": 2},
            "commands": {"public_keys": {"k1": str(self.pub_file)}},
            "health": {"port": 0},
        }
        data.update(over)
        return Config.model_validate(data)


@pytest.fixture
def setup(tmp_path: Path, broker: Mosquitto) -> Setup:
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "platform-k1.pub.pem"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return Setup(tmp_path, broker, key, pub)


@pytest.fixture
def platform(broker: Mosquitto) -> Iterator[Platform]:
    p = Platform(broker.port).start()
    try:
        yield p
    finally:
        p.stop()


@contextlib.asynccontextmanager
async def daemon_with_platform(cfg: Config, platform: Platform) -> AsyncIterator[Daemon]:
    """A Daemon running in this loop, connected and subscribed to its command topic."""
    started_before = len(platform.events("gateway.started"))
    async with running_daemon(Daemon(cfg), ready_s=WAIT_S) as run:
        daemon = run.daemon
        assert await wait_until(lambda: daemon.uplink is not None and daemon.uplink.state == "connected",
                                WAIT_S), daemon.uplink.snapshot() if daemon.uplink else "no uplink"
        # The uplink subscribes to cmd/req before it sends anything: once this run's
        # gateway.started has arrived, commands will be heard.
        assert await wait_until(lambda: len(platform.events("gateway.started")) > started_before, WAIT_S)
        yield daemon
        assert not run.task.done(), "the daemon stopped on its own"


async def call(platform: Platform, payload: bytes, **props: Any) -> tuple[Received, dict[str, Any]]:
    """Send one request and wait for its answer (requests go one at a time, so the next reply is ours)."""
    n = len(platform.replies())
    platform.send(payload, **props)
    assert await wait_until(lambda: len(platform.replies()) > n, WAIT_S), "no answer to the command"
    replies = platform.replies()
    assert len(replies) == n + 1, [r.payload for r in replies[n:]]
    reply = replies[n]
    result = orjson.loads(reply.payload)
    contract.validate_command_result(result)
    return reply, result


async def wait_audit(platform: Platform, command_id: str, outcome: str, code: str | None = None,
                     seen: int = 0) -> dict[str, Any]:
    """The ``seen``+1-th audit event for ``command_id`` with this outcome (and error code)."""

    def matching() -> list[dict[str, Any]]:
        return [a for a in platform.audits() if a["command_id"] == command_id and a["outcome"] == outcome
                and (code is None or str(a.get("error") or "").startswith(f"{code}:"))]

    assert await wait_until(lambda: len(matching()) > seen, WAIT_S), \
        f"no audit {outcome}/{code} for {command_id}; got {platform.audits()}"
    return matching()[seen]


async def ping_ok(platform: Platform, key: Ed25519PrivateKey, **props: Any
                  ) -> tuple[Received, dict[str, Any]]:
    b = body()
    contract.validate_command_request(request(key, b))
    reply, result = await call(platform, signed(key, b), **props)
    assert result["ok"] is True, result
    assert result["status"] == "executed"
    assert result["command_id"] == b["id"]
    assert result["error"] is None
    assert result["result"]["pong"] is True
    audit = await wait_audit(platform, b["id"], "executed")
    assert audit["command"] == "gateway.ping"
    assert audit["issuer"] == "test-platform"
    assert audit.get("error") is None
    return reply, result


# --- tests ------------------------------------------------------------------------------------------

async def test_signed_ping_is_executed_answered_and_audited(setup: Setup, platform: Platform) -> None:
    async with daemon_with_platform(setup.config(), platform) as daemon:
        reply, _ = await ping_ok(platform, setup.key)
        assert reply.topic == RES
        audit_event = platform.events("command.audit")[0]
        contract.validate_envelope(audit_event)
        assert audit_event["site_id"] == SITE and audit_event["gateway_id"] == GATEWAY
        assert daemon.uplink is not None and daemon.uplink.protocol == "5"


def _other_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _oversized(key: Ed25519PrivateKey) -> tuple[bytes, str | None]:
    b = body(args={"pad": "x" * (17 * 1024)})
    payload = signed(key, b)
    assert len(payload) > 16 * 1024
    return payload, None  # the size is checked before anything is read


def _unsigned(key: Ed25519PrivateKey) -> tuple[bytes, str | None]:
    req = request(key, body())
    del req["sig"]
    return orjson.dumps(req), None


# Each case builds (payload, command id the gateway can know or None) from the platform key.
REJECTIONS: dict[str, tuple[str, Any]] = {
    "malformed_json": ("malformed", lambda k: (b'{"v": 1, "kid": "k1", "body": "{\\"id\\"', None)),
    "not_json_bytes": ("malformed", lambda k: (b"\x00\xff\xfe\x80 binary \xc3\x28", None)),
    "unsigned": ("malformed", _unsigned),
    "empty_signature": ("malformed", lambda k: (orjson.dumps({**request(k, body()), "sig": ""}), None)),
    "signature_not_base64": ("bad_signature",
                             lambda k: (orjson.dumps({**request(k, body()), "sig": "not base64!"}), None)),
    "signed_by_another_key": ("bad_signature", lambda k: (signed(_other_key(), body()), None)),
    "body_changed_after_signing": ("bad_signature", lambda k: (orjson.dumps(
        {**request(k, body()), "body": orjson.dumps(body(command="gateway.status")).decode()}), None)),
    "unknown_kid": ("unknown_key", lambda k: (signed(k, body(), kid="k9"), None)),
    "wrong_gateway": ("wrong_gateway", lambda k: _with_id(k, body(gateway_id="gw-2"))),
    "wrong_site": ("wrong_gateway", lambda k: _with_id(k, body(site_id="site-2"))),
    "expired": ("expired", lambda k: _with_id(k, body(
        issued_at=iso(datetime.now(UTC) - timedelta(seconds=120)),
        expires_at=iso(datetime.now(UTC) - timedelta(seconds=60))))),
    "issued_in_the_future": ("not_yet_valid", lambda k: _with_id(k, body(
        issued_at=iso(datetime.now(UTC) + timedelta(seconds=300)),
        expires_at=iso(datetime.now(UTC) + timedelta(seconds=360))))),
    "ttl_too_long": ("ttl_too_long", lambda k: _with_id(k, body(
        expires_at=iso(datetime.now(UTC) + timedelta(hours=1))))),
    "unknown_command": ("unknown_command", lambda k: _with_id(k, body(command="gateway.self_destruct"))),
    "bad_args": ("bad_args", lambda k: _with_id(k, body(args={"count": 3}))),
    "oversized": ("too_large", _oversized),
    # Signed, but the body does not fit the schema: its id is not trusted either.
    "body_not_a_command": ("malformed", lambda k: (signed(k, body(nonce="short")), None)),
}


def _with_id(key: Ed25519PrivateKey, b: dict[str, Any]) -> tuple[bytes, str | None]:
    return signed(key, b), b["id"]


@pytest.mark.parametrize("case", list(REJECTIONS))
async def test_bad_command_is_rejected_answered_audited_and_daemon_keeps_running(
        setup: Setup, platform: Platform, case: str) -> None:
    code, build = REJECTIONS[case]
    payload, known_id = build(setup.key)
    async with daemon_with_platform(setup.config(), platform) as daemon:
        _, result = await call(platform, payload)
        assert result["ok"] is False, result
        assert result["status"] == "rejected"
        assert result["error"]["code"] == code, result
        assert result["error"]["message"]
        assert result["result"] is None
        assert result["command_id"] == known_id
        await wait_audit(platform, known_id or "?", "rejected", code)
        # Still running and still answering.
        await ping_ok(platform, setup.key)
        assert daemon.uplink is not None and daemon.uplink.state == "connected"


async def test_every_rejection_in_a_burst_then_ping(setup: Setup, platform: Platform) -> None:
    """All the bad requests back to back, without waiting for answers: each is answered once."""
    # Up to 16 at once are queued (4x max_concurrent); beyond that "busy" would be a fair answer.
    cases = [(code, *build(setup.key)) for code, build in list(REJECTIONS.values())[:12]]
    async with daemon_with_platform(setup.config(), platform):
        for _code, payload, _id in cases:
            platform.send(payload)
        assert await wait_until(lambda: len(platform.replies()) >= len(cases), WAIT_S)
        results = [orjson.loads(r.payload) for r in platform.replies()]
        assert sorted(r["error"]["code"] for r in results) == sorted(code for code, _p, _i in cases)
        assert all(r["status"] == "rejected" for r in results)
        assert await wait_until(
            lambda: len([a for a in platform.audits() if a["outcome"] == "rejected"]) >= len(cases), WAIT_S)
        await ping_ok(platform, setup.key)


async def test_same_nonce_twice_is_a_replay(setup: Setup, platform: Platform) -> None:
    async with daemon_with_platform(setup.config(), platform):
        first = body()
        payload = signed(setup.key, first)
        _, result = await call(platform, payload)
        assert result["status"] == "executed"
        # The very same bytes again.
        _, result = await call(platform, payload)
        assert (result["status"], result["error"]["code"]) == ("rejected", "replay")
        assert result["command_id"] == first["id"]
        await wait_audit(platform, first["id"], "rejected", "replay")
        # A new command id, freshly signed, reusing the nonce.
        again = body(nonce=first["nonce"])
        _, result = await call(platform, signed(setup.key, again))
        assert (result["command_id"], result["error"]["code"]) == (again["id"], "replay")
        await ping_ok(platform, setup.key)


async def test_replay_protection_survives_a_restart(setup: Setup, platform: Platform) -> None:
    cfg = setup.config()
    first = body()
    payload = signed(setup.key, first)
    async with daemon_with_platform(cfg, platform):
        _, result = await call(platform, payload)
        assert result["status"] == "executed"
    async with daemon_with_platform(cfg, platform):
        _, result = await call(platform, payload)
        assert (result["status"], result["error"]["code"]) == ("rejected", "replay"), result
        await wait_audit(platform, first["id"], "rejected", "replay")
        await ping_ok(platform, setup.key)
    assert len(platform.events("gateway.started")) == 2


async def test_response_topic_and_correlation_data_are_honoured(setup: Setup, platform: Platform) -> None:
    async with daemon_with_platform(setup.config(), platform):
        reply, _ = await ping_ok(platform, setup.key, response_topic=f"{RES}/req-42",
                                 correlation=b"corr-\x00\x01")
        assert reply.topic == f"{RES}/req-42"
        assert reply.correlation == b"corr-\x00\x01"
        # A rejected command is answered on the response topic too.
        _, result = await call(platform, signed(setup.key, body(command="nope.nope")),
                               response_topic=f"{RES}/req-43", correlation=b"c43")
        assert platform.replies()[-1].topic == f"{RES}/req-43"
        assert platform.replies()[-1].correlation == b"c43"
        assert result["error"]["code"] == "unknown_command"
        # Without a response topic, correlation data still comes back, on the default topic.
        reply, _ = await ping_ok(platform, setup.key, correlation=b"only-corr")
        assert (reply.topic, reply.correlation) == (RES, b"only-corr")


@pytest.mark.parametrize("outside", [
    "platform/replies/gw-1",
    f"edgeagent/v1/{SITE}/gw-2/cmd/res",
    f"{BASE}/status",
    f"{BASE}/cmd/res-elsewhere",
    f"{BASE}/cmd/result",
    f"{RES}/+",
    f"{RES}/#",
])
async def test_response_topic_outside_cmd_res_is_ignored(setup: Setup, platform: Platform, outside: str
                                                         ) -> None:
    async with daemon_with_platform(setup.config(), platform):
        reply, _ = await ping_ok(platform, setup.key, response_topic=outside, correlation=b"c1")
        assert reply.topic == RES
        assert reply.correlation == b"c1"
        await asyncio.sleep(0.1)
        assert not [m for m in platform.on(outside) if b"command_id" in m.payload]


async def test_unsynchronised_clock_rejects_commands(setup: Setup, platform: Platform) -> None:
    async with daemon_with_platform(setup.config(clock={"sync": "unsynced"}), platform) as daemon:
        assert not daemon.clock.synced
        b = body()
        _, result = await call(platform, signed(setup.key, b))
        assert (result["status"], result["error"]["code"]) == ("rejected", "clock_unsynced"), result
        assert result["command_id"] == b["id"]
        audit = await wait_audit(platform, b["id"], "rejected", "clock_unsynced")
        assert audit["command"] == "gateway.ping"
        # Not consumed: once the clock is trusted, the same command runs.
        daemon.clock.mark_synced()
        _, result = await call(platform, signed(setup.key, b))
        assert result["status"] == "executed", result


async def test_gateway_status_command_returns_the_snapshot(setup: Setup, platform: Platform) -> None:
    async with daemon_with_platform(setup.config(), platform):
        b = body(command="gateway.status")
        _, result = await call(platform, signed(setup.key, b))
        assert result["status"] == "executed", result
        assert result["result"]["gateway_id"] == GATEWAY
        assert result["result"]["uplink"]["state"] == "connected"
        await wait_audit(platform, b["id"], "executed")
