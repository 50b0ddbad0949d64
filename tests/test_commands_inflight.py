"""A command in flight when the cloud connection drops: it completes, is audited, and is answered once
the gateway is back (before: the drop cancelled it half-way, unaudited and unanswered)."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.cloud_bridge.uplink import Uplink
from edgeagent.kernel.pipeline.commands import CommandResult, CommandRouter, CommandService, CommandSpec
from edgeagent.kernel.pipeline.events import EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from tests.helpers import uplink_config, wait_until
from tests.peers import Collector, Mosquitto

SITE, GATEWAY = "site-1", "gw-1"
BASE = f"edgeagent/v1/{SITE}/{GATEWAY}"
PREFIX = b"edgeagent-cmd-v1\n"  # the documented signing context


def signed(key: Ed25519PrivateKey, command: str, **over: Any) -> tuple[str, bytes]:
    now = datetime.now(UTC)
    body = {"id": f"cmd-{secrets.token_hex(6)}", "site_id": SITE, "gateway_id": GATEWAY, "command": command,
            "args": {}, "issued_at": (now - timedelta(seconds=1)).isoformat(),
            "expires_at": (now + timedelta(seconds=120)).isoformat(), "nonce": secrets.token_hex(16),
            "issuer": "test-platform", **over}
    text = orjson.dumps(body).decode()
    sig = base64.b64encode(key.sign(PREFIX + text.encode())).decode()
    return body["id"], orjson.dumps({"v": 1, "kid": "k1", "body": text, "sig": sig})


def publish(port: int, topic: str, payloads: list[bytes]) -> None:
    """The platform sends requests (QoS 1, waits for each PUBACK): a plain paho client, its own thread."""
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5,
                    client_id=f"platform-pub-{time.monotonic_ns()}")
    c.connect("127.0.0.1", port, keepalive=10)
    c.loop_start()
    try:
        infos = [c.publish(topic, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


def audit_into(outbox: Outbox, factory: EventFactory) -> Any:
    async def audit(result: CommandResult) -> None:
        await outbox.put(factory.make("command.audit", GATEWAY, {
            "command_id": result.command_id or "?", "command": result.command or "?", "outcome": result.status,
            "error": None if result.error_code is None else f"{result.error_code}: {result.error_message}",
            "issuer": result.issuer}))
    return audit


def service(outbox: Outbox, factory: EventFactory, router: CommandRouter, key: Ed25519PrivateKey,
            **kw: Any) -> CommandService:
    return CommandService(site_id=SITE, gateway_id=GATEWAY, keys={"k1": key.public_key()}, router=router,
                          claim_nonce=outbox.claim_nonce, now=lambda: datetime.now(UTC), clock_synced=lambda: True,
                          audit=audit_into(outbox, factory), **kw)


def answers(col: Collector, command_id: str) -> list[dict[str, Any]]:
    with col._lock:
        msgs = [orjson.loads(p) for t, p, _r in col.messages if t.startswith(f"{BASE}/cmd/res")]
    return [m for m in msgs if m.get("command_id") == command_id]


def audits(col: Collector, command_id: str) -> list[dict[str, Any]]:
    with col._lock:
        return [e["data"] for e in col.events  # type: ignore[misc]
                if e["type"] == "command.audit" and e["data"]["command_id"] == command_id]  # type: ignore[index]


async def test_command_in_flight_when_the_broker_drops_is_audited_and_answered_after_reconnect(
        tmp_path: Path, factory: EventFactory) -> None:
    broker = Mosquitto(tmp_path / "broker", persistence=True)
    broker.start()
    # A persistent platform session: what the gateway sends while it reconnects is kept for it.
    col = Collector(broker.port, topic=f"{BASE}/#", persistent=True).start()
    key = Ed25519PrivateKey.generate()
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(_args: Mapping[str, Any]) -> Mapping[str, Any]:
        # Stands for a gate that takes a while to move: the broker goes away meanwhile.
        started.set()
        await release.wait()
        return {"moved": True}

    router = CommandRouter()
    router.register(CommandSpec("test.slow_gate", slow))
    ob = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await ob.open()
    up = Uplink(uplink_config(broker.url), site_id=SITE, gateway_id=GATEWAY, outbox=ob, version="t",
                commands=service(ob, factory, router, key))
    task = asyncio.create_task(up.run())
    try:
        assert await wait_until(up.subscribed.is_set, 10)
        cmd_id, payload = signed(key, "test.slow_gate")
        await asyncio.to_thread(publish, broker.port, f"{BASE}/cmd/req", [payload])
        assert await wait_until(started.is_set, 10)
        await asyncio.to_thread(broker.stop)
        assert await wait_until(lambda: up.state != "connected", 10)
        release.set()  # the gate finishes moving while the gateway is offline
        await asyncio.sleep(0.3)
        await asyncio.to_thread(broker.start)
        assert await wait_until(lambda: answers(col, cmd_id), 20), "the command was never answered"
        [answer] = answers(col, cmd_id)
        assert (answer["ok"], answer["status"], answer["result"]) == (True, "executed", {"moved": True})
        assert await wait_until(lambda: audits(col, cmd_id), 20), "the command was never audited"
        [audit] = audits(col, cmd_id)
        assert (audit["command"], audit["outcome"], audit["issuer"]) == ("test.slow_gate", "executed",
                                                                        "test-platform")
        # The platform's retry of the same request is a replay, refused; the first answer stands.
        await asyncio.to_thread(publish, broker.port, f"{BASE}/cmd/req", [payload])
        assert await wait_until(lambda: len(answers(col, cmd_id)) == 2, 10)
        assert answers(col, cmd_id)[1]["error"]["code"] == "replay"
    finally:
        await up.stop(0)
        await asyncio.wait_for(task, 10)
        await ob.close()
        col.stop()
        broker.stop()


async def test_command_cut_short_by_a_stop_is_audited_as_interrupted(
        tmp_path: Path, broker: Mosquitto, factory: EventFactory) -> None:
    key = Ed25519PrivateKey.generate()
    started = asyncio.Event()

    async def stuck(_args: Mapping[str, Any]) -> Mapping[str, Any]:
        started.set()
        await asyncio.Event().wait()  # never finishes on its own
        return {}

    router = CommandRouter()
    router.register(CommandSpec("test.stuck", stuck))
    ob = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await ob.open()
    up = Uplink(uplink_config(broker.url), site_id=SITE, gateway_id=GATEWAY, outbox=ob, version="t",
                commands=service(ob, factory, router, key))
    task = asyncio.create_task(up.run())
    try:
        assert await wait_until(up.subscribed.is_set, 10)
        cmd_id, payload = signed(key, "test.stuck")
        await asyncio.to_thread(publish, broker.port, f"{BASE}/cmd/req", [payload])
        assert await wait_until(started.is_set, 10)
    finally:
        await up.stop(0)
        await asyncio.wait_for(task, 10)
    try:
        rows = await ob.query(lambda conn: conn.execute(
            "SELECT payload FROM outbox WHERE type='command.audit'").fetchall())
        data = [orjson.loads(r[0])["data"] for r in rows]
        assert [(d["command_id"], d["outcome"]) for d in data] == [(cmd_id, "failed")], data
        assert "interrupted" in data[0]["error"]
    finally:
        await ob.close()
