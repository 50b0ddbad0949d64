"""Property tests: whatever bytes arrive on the command topic, the verifier answers with a rejection
(or a result) and never raises, and nothing runs without a valid signature."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.kernel.pipeline.commands import (
    COMMAND_ERROR_CODES,
    CommandResult,
    CommandRouter,
    CommandService,
    CommandSpec,
    sign_command,
)

KEY = Ed25519PrivateKey.generate()
RAN: list[Any] = []


def service() -> CommandService:
    router = CommandRouter()

    async def handler(args: Any) -> dict[str, Any]:
        RAN.append(args)
        return {"ok": True}

    router.register(CommandSpec("gate.open", handler))
    seen: set[str] = set()

    async def claim(nonce: str, _exp: int) -> bool:
        if nonce in seen:
            return False
        seen.add(nonce)
        return True

    async def audit(_r: CommandResult) -> None:
        return None

    return CommandService(site_id="s", gateway_id="g", keys={"k": KEY.public_key()}, router=router,
                          claim_nonce=claim, now=lambda: datetime.now(UTC), clock_synced=lambda: True,
                          audit=audit)


def handle(payload: bytes) -> CommandResult:
    return asyncio.run(service().handle(payload))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_are_rejected_with_a_code(payload: bytes) -> None:
    RAN.clear()
    r = handle(payload)
    assert r.status == "rejected" and not r.ok
    assert r.error_code in COMMAND_ERROR_CODES
    assert not RAN


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_is_rejected_with_a_code(value: Any) -> None:
    RAN.clear()
    r = handle(orjson.dumps(value))
    assert r.status == "rejected" and r.error_code in COMMAND_ERROR_CODES
    assert not RAN


@settings(max_examples=200, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["id", "site_id", "gateway_id", "command", "args", "issued_at",
                                             "expires_at", "nonce", "issuer", "extra"]), json_values, max_size=10))
def test_signed_garbage_bodies_never_run_unless_valid(body: dict[str, Any]) -> None:
    RAN.clear()
    r = handle(sign_command(KEY, "k", body))
    if r.ok:
        assert body.get("command") == "gate.open" and RAN
    else:
        assert r.error_code in COMMAND_ERROR_CODES and not RAN


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=63), st.integers(min_value=1, max_value=255))
def test_any_bit_flip_in_the_signature_is_refused(index: int, flip: int) -> None:
    now = datetime.now(UTC)
    body = {"id": "c1", "site_id": "s", "gateway_id": "g", "command": "gate.open", "args": {},
            "issued_at": now.isoformat(), "expires_at": (now + timedelta(seconds=60)).isoformat(),
            "nonce": "n" * 20, "issuer": "ops"}
    req = orjson.loads(sign_command(KEY, "k", body))
    sig = bytearray(base64.b64decode(req["sig"]))
    sig[index] ^= flip
    req["sig"] = base64.b64encode(bytes(sig)).decode()
    RAN.clear()
    r = handle(orjson.dumps(req))
    assert r.error_code == "bad_signature" and not RAN
