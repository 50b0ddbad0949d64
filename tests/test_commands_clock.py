"""Signed commands and a clock moved back (issue 8 item 5).

Before: nonces were purged by wall-clock time, so once a gate.open had expired and its nonce was gone,
moving the clock back 20 minutes made the captured request valid again and the gate opened a second
time. Now nonces are kept by signed issue time against a durable floor in the outbox; the service is
driven with its ``now`` callable and a real outbox (whose own clock is driven the same way).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeagent.kernel.pipeline.commands import CommandResult, CommandRouter, CommandService, CommandSpec
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig

SITE, GATEWAY = "site-1", "gw-1"
PREFIX = b"edgeagent-cmd-v1\n"  # the documented signing context
KEY = Ed25519PrivateKey.generate()
T0 = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
MAX_TTL_S, SKEW_S = 600, 30


class Wall:
    """The box's wall clock, moved by the test; the outbox reads the same clock in ms."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at

    def now_ms(self) -> int:
        return int(self.at.timestamp() * 1000)


def request(command: str, issued: datetime, ttl_s: float = 120) -> bytes:
    body = {"id": f"cmd-{secrets.token_hex(6)}", "site_id": SITE, "gateway_id": GATEWAY, "command": command,
            "args": {}, "issued_at": issued.isoformat(), "expires_at": (issued + timedelta(seconds=ttl_s)).isoformat(),
            "nonce": secrets.token_hex(16), "issuer": "platform-test"}
    text = orjson.dumps(body).decode()
    sig = base64.b64encode(KEY.sign(PREFIX + text.encode())).decode()
    return orjson.dumps({"v": 1, "kid": "k1", "body": text, "sig": sig})


class Gate:
    def __init__(self) -> None:
        self.opened = 0

    async def open(self, _args: Mapping[str, Any]) -> Mapping[str, Any]:
        self.opened += 1
        return {"opened": True}


def build(outbox: Outbox, wall: Wall, gate: Gate) -> CommandService:
    router = CommandRouter()
    router.register(CommandSpec("gate.open", gate.open))
    router.register(CommandSpec("gateway.ping", _pong))

    async def audit(_r: CommandResult) -> None:
        return None

    return CommandService(site_id=SITE, gateway_id=GATEWAY, keys={"k1": KEY.public_key()}, router=router,
                          claim_command=outbox.claim_command, now=wall.now, clock_synced=lambda: True,
                          audit=audit, max_ttl_s=MAX_TTL_S, clock_skew_s=SKEW_S)


async def _pong(_args: Mapping[str, Any]) -> Mapping[str, Any]:
    return {"pong": True}


@pytest.mark.parametrize("later_command", [True, False], ids=["newer-command-seen", "nothing-since"])
async def test_captured_command_replayed_after_the_clock_moves_back_is_refused(
        tmp_path: Path, later_command: bool) -> None:
    wall = Wall(T0 + timedelta(seconds=1))
    gate = Gate()
    captured = request("gate.open", T0)
    async with Outbox(OutboxConfig(tmp_path / "outbox.db"), now_ms=wall.now_ms) as ob:
        svc = build(ob, wall, gate)
        first = await svc.handle(captured)
        assert first.status == "executed" and gate.opened == 1

        # 20 minutes on: the gate.open has long expired; the platform may have sent something since.
        wall.at = T0 + timedelta(minutes=20)
        if later_command:
            ping = await svc.handle(request("gateway.ping", wall.at - timedelta(seconds=1)))
            assert ping.status == "executed"
        assert (await svc.handle(captured)).error_code == "expired"  # the clock is right: plainly too old

        # The clock is moved back 20 minutes: the captured request looks valid again.
        wall.at = T0 + timedelta(seconds=2)
        again = await svc.handle(captured)
        assert again.status == "rejected", again
        assert again.error_code == ("expired" if later_command else "replay")
        assert gate.opened == 1

    # Durable: a restart (still with the clock moved back) refuses it too.
    async with Outbox(OutboxConfig(tmp_path / "outbox.db"), now_ms=wall.now_ms) as ob:
        svc = build(ob, wall, gate)
        after_restart = await svc.handle(captured)
        assert after_restart.status == "rejected" and after_restart.error_code in ("expired", "replay")
    assert gate.opened == 1


async def test_commands_within_the_horizon_of_the_newest_one_still_run(tmp_path: Path) -> None:
    """The floor refuses nothing a consistent platform could send: an older command still inside its
    validity runs after a newer one, and its own replay is a replay."""
    wall = Wall(T0)
    gate = Gate()
    async with Outbox(OutboxConfig(tmp_path / "outbox.db"), now_ms=wall.now_ms) as ob:
        svc = build(ob, wall, gate)
        newest = await svc.handle(request("gateway.ping", T0 + timedelta(seconds=SKEW_S)))  # platform clock ahead
        assert newest.status == "executed"
        # Issued almost a full TTL ago, arriving just before it expires: still inside the horizon.
        slow = request("gate.open", T0 - timedelta(seconds=MAX_TTL_S - 1), ttl_s=MAX_TTL_S)
        assert (await svc.handle(slow)).status == "executed"
        assert (await svc.handle(slow)).error_code == "replay"
    assert gate.opened == 1


async def test_nonces_below_the_floor_are_purged(tmp_path: Path) -> None:
    """The nonce table does not grow without bound: a nonce goes once a newer command lifts the floor past
    its issue time (and the replay of its command is then refused by the floor instead)."""
    wall = Wall(T0)
    gate = Gate()
    async with Outbox(OutboxConfig(tmp_path / "outbox.db"), now_ms=wall.now_ms) as ob:
        svc = build(ob, wall, gate)
        for minute in range(0, 60, 5):
            wall.at = T0 + timedelta(minutes=minute)
            assert (await svc.handle(request("gateway.ping", wall.at))).status == "executed"
        kept = await ob.query(lambda c: c.execute("SELECT COUNT(*) FROM command_nonces").fetchone()[0])
    # The horizon is 630 s: the commands of the last ~10.5 minutes (55, 50 and 45) are kept.
    assert kept == 3
