"""A flood of garbage on the command topic cannot flood the outbox with audits: unverified rejections
are audited up to a budget, then summarised; a verified command in the middle is audited as always."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeagent.cloud_bridge.uplink import Uplink
from edgeagent.kernel.pipeline.commands import CommandRouter, CommandSpec
from edgeagent.kernel.pipeline.events import EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from tests.helpers import uplink_config, wait_until
from tests.peers import Mosquitto
from tests.test_commands_inflight import BASE, GATEWAY, SITE, publish, service, signed

FLOOD = 10_000


async def audit_rows(ob: Outbox) -> list[dict[str, Any]]:
    rows = await ob.query(lambda conn: conn.execute(
        "SELECT payload FROM outbox WHERE type='command.audit' ORDER BY seq").fetchall())
    return [orjson.loads(r[0])["data"] for r in rows]


async def test_garbage_flood_is_summarised_and_a_verified_command_is_still_audited(
        tmp_path: Path, broker: Mosquitto, factory: EventFactory) -> None:
    key = Ed25519PrivateKey.generate()
    router = CommandRouter()

    async def ping(_args: Any) -> dict[str, bool]:
        return {"pong": True}

    router.register(CommandSpec("gateway.ping", ping))
    ob = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await ob.open()
    svc = service(ob, factory, router, key)
    up = Uplink(uplink_config(broker.url), site_id=SITE, gateway_id=GATEWAY, outbox=ob, version="t", commands=svc)
    task = asyncio.create_task(up.run())
    try:
        assert await wait_until(up.subscribed.is_set, 10)
        garbage = [b"\x00garbage %d" % i if i % 3 else orjson.dumps({"v": 1, "kid": "k9", "body": "{}", "sig": "x"})
                   for i in range(FLOOD)]
        cmd_id, ping_req = signed(key, "gateway.ping")
        half = FLOOD // 2
        await asyncio.to_thread(publish, broker.port, f"{BASE}/cmd/req", [*garbage[:half], ping_req, *garbage[half:]])

        def handled() -> int:
            return svc.rejected_total + svc.executed_total + getattr(up, "commands_dropped", 0)

        assert await wait_until(lambda: handled() >= FLOOD + 1, 60), f"{handled()} of {FLOOD + 1} handled"
    finally:
        await up.stop(0)
        await asyncio.wait_for(task, 10)  # a stopping uplink writes the pending summary
    try:
        audits = await audit_rows(ob)
        verified = [a for a in audits if a["command_id"] == cmd_id]
        assert [(a["command"], a["outcome"]) for a in verified] == [("gateway.ping", "executed")]
        single = [a for a in audits if a["command_id"] == "?" and not a.get("error", "").startswith("rate_limited:")]
        summaries = [a for a in audits if a.get("error", "").startswith("rate_limited:")]
        assert len(single) <= 20, f"{len(single)} audits for unverified requests"
        assert len(summaries) == 1, summaries
        # The summary accounts for every unverified request that got no audit of its own.
        counted = int(summaries[0]["error"].split()[1])
        assert counted + len(single) == FLOOD, (counted, len(single))
        assert len(audits) == len(single) + 1 + 1
    finally:
        await ob.close()
