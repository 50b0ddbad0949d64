"""Commands from the cloud: verified before they run, answered always, audited always.

Wire form of a request (see ``cloud-bridge/contract/schemas/command-request.json``)::

    {"v": 1, "kid": "platform-2026", "body": "<JSON text>", "sig": "<base64 Ed25519 signature>"}

The signature covers the UTF-8 bytes of ``SIGNING_PREFIX + body``. Signing the exact body text (not a
re-serialisation of parsed JSON) leaves no canonicalisation ambiguity. Checks, in order: size, shape,
known key, signature, target gateway, clock synchronised, not yet valid / expired / TTL too long, the
command exists and its arguments fit, then the nonce is recorded durably (replays are refused even
after a restart). Only then does the handler run.

The clock may be moved back (a bad NTP source, a hand-set date, an attacker on the box's network time).
Nonces are therefore kept by the command's signed issue time, never by this box's clock: with
``claim_command`` (the outbox's :meth:`~edgeagent.kernel.pipeline.outbox.Outbox.claim_command`) a durable
floor, the newest issue time seen minus the horizon (``max_ttl_s + clock_skew_s``), refuses older
commands as expired, and only nonces below that floor are ever purged. No legitimate command falls below
it: one issued at ``t`` is accepted only before ``t + max_ttl_s``, and no command accepted by then can
claim an issue time beyond that moment plus ``clock_skew_s``.

Every outcome is audited, in a ``finally``: a run cut short (the daemon stopping) is audited as failed.
Rejections of requests whose signature did not verify are the one exception to "one audit each": anyone
who can publish on the command topic can send them by the thousand, and each audit is an event in the
outbox that could push real events out. Those get at most ``unverified_audits_per_window`` audits per
window, then one summary audit with the count; verified commands are always audited one by one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeagent.kernel.errors import CommandRejected, ConfigError

log = logging.getLogger(__name__)

SIGNING_PREFIX = b"edgeagent-cmd-v1\n"
MAX_COMMAND_BYTES = 16 * 1024
# Stable error codes of rejected or failed commands (the contract lists them).
COMMAND_ERROR_CODES = (
    "malformed", "too_large", "bad_signature", "unknown_key", "expired", "not_yet_valid",
    "ttl_too_long", "replay", "wrong_gateway", "unknown_command", "bad_args", "clock_unsynced",
    "busy", "failed",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CommandRequest(_Strict):
    v: Literal[1]
    kid: str = Field(min_length=1, max_length=64)
    body: str = Field(min_length=2)
    sig: str = Field(min_length=1, max_length=200)


class CommandBody(_Strict):
    id: str = Field(min_length=1, max_length=64)
    site_id: str
    gateway_id: str
    command: str = Field(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
    args: dict[str, Any] = Field(default_factory=dict)
    issued_at: datetime
    expires_at: datetime
    nonce: str = Field(min_length=16, max_length=128)
    issuer: str = Field(min_length=1, max_length=128)


@dataclass(frozen=True, slots=True)
class CommandResult:
    command_id: str | None
    ok: bool
    status: Literal["executed", "failed", "rejected"]
    result: Mapping[str, Any] | None
    error_code: str | None
    error_message: str | None
    command: str | None = None
    issuer: str | None = None
    # False when the request's signature never verified: anyone on the broker could have sent it.
    verified: bool = True

    def to_json(self, now: datetime) -> bytes:
        error = None if self.error_code is None else {"code": self.error_code, "message": self.error_message}
        return orjson.dumps({
            "v": 1, "command_id": self.command_id, "ok": self.ok, "status": self.status,
            "result": None if self.result is None else dict(self.result), "error": error,
            "at": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
        })


Handler = Callable[[Mapping[str, Any]], Awaitable[Mapping[str, Any]]]
# (nonce, issued_ms, horizon_ms) -> "claimed" | "replay" | "stale": see Outbox.claim_command.
ClaimCommand = Callable[[str, int, int], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str
    handler: Handler
    args_model: type[BaseModel] | None = None
    description: str = ""


class CommandRouter:
    """Explicit registry of the commands this gateway runs. Capabilities register theirs at wiring."""

    def __init__(self) -> None:
        self._specs: dict[str, CommandSpec] = {}

    def register(self, spec: CommandSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"command {spec.name!r} registered twice")
        self._specs[spec.name] = spec

    def get(self, name: str) -> CommandSpec | None:
        return self._specs.get(name)

    def names(self) -> list[str]:
        return sorted(self._specs)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file or a file holding the raw 32 bytes in base64."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the command public key: {exc.strerror}") from exc
    try:
        if b"BEGIN PUBLIC KEY" in data:
            key = load_pem_public_key(data)
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"{path}: not an Ed25519 public key")
            return key
        raw = base64.b64decode(data.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error) as exc:
        raise ConfigError(f"{path}: not an Ed25519 public key (PEM or base64 of 32 bytes)") from exc


@dataclass(slots=True)
class _Progress:
    """What one request's verification has established so far (for the audit of an interrupted run)."""

    body: CommandBody | None = None
    signed: bool = False


class CommandService:
    """Verifies and runs commands. Transport-free: the bridge hands it bytes and publishes the result."""

    def __init__(
        self,
        *,
        site_id: str,
        gateway_id: str,
        keys: Mapping[str, Ed25519PublicKey],
        router: CommandRouter,
        claim_nonce: Callable[[str, int], Awaitable[bool]] | None = None,
        now: Callable[[], datetime],
        clock_synced: Callable[[], bool],
        audit: Callable[[CommandResult], Awaitable[None]],
        max_ttl_s: int = 600,
        clock_skew_s: int = 30,
        max_concurrent: int = 4,
        unverified_audits_per_window: int = 20,
        unverified_window_s: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
        claim_command: ClaimCommand | None = None,
    ) -> None:
        """``claim_command(nonce, issued_ms, horizon_ms)`` (preferred) keeps nonces by issue time and survives
        a clock moved back; ``claim_nonce(nonce, keep_until_ms)`` is the older store, purged by wall-clock
        time, which a clock moved back defeats once the nonce is gone. One of the two is required."""
        if claim_command is None and claim_nonce is None:
            raise ValueError("CommandService needs claim_command (or the older claim_nonce)")
        self._site_id = site_id
        self._gateway_id = gateway_id
        self._keys = dict(keys)
        self._router = router
        self._claim_nonce = claim_nonce
        self._claim_command = claim_command
        self._now = now
        self._clock_synced = clock_synced
        self._audit = audit
        self._max_ttl = timedelta(seconds=max_ttl_s)
        self._skew = timedelta(seconds=clock_skew_s)
        self._slots = asyncio.Semaphore(max_concurrent)
        self._busy = 0
        self._max_concurrent = max_concurrent
        self.rejected_total = 0
        self.executed_total = 0
        self.failed_total = 0
        # Audits of unverified rejections: a fixed window, its budget, and what was left unaudited.
        self._unverified_budget = unverified_audits_per_window
        self._window_s = unverified_window_s
        self._monotonic = monotonic
        self._window_start = monotonic()
        self._window_audits = 0
        self.unaudited_total = 0
        self._unaudited: Counter[str] = Counter()
        self._unaudited_since: datetime | None = None
        self._summary_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def handle(self, payload: bytes) -> CommandResult:
        """Verify and run one request. Never raises for bad input: every outcome is a result.

        The audit is written in ``finally``, so a run cancelled half-way (the gate may have moved) is
        audited too; it is shielded, so the cancellation that ends the run cannot cancel its audit.
        """
        progress = _Progress()
        result: CommandResult | None = None
        try:
            if self._busy >= self._max_concurrent * 4:
                # Overflow policy: beyond 4x the concurrency, refuse at once rather than queue without bound.
                self.rejected_total += 1
                result = CommandResult(None, False, "rejected", None, "busy",
                                       "too many commands in progress; retry later", verified=False)
                return result
            self._busy += 1
            try:
                async with self._slots:
                    result = await self._handle(payload, progress)
            finally:
                self._busy -= 1
            return result
        finally:
            if result is None:
                self.failed_total += 1
                b = progress.body
                result = CommandResult(
                    b.id if b else None, False, "failed", None, "failed",
                    "interrupted before it finished (the gateway was stopping); its effect is unknown",
                    b.command if b else None, b.issuer if b else None, verified=progress.signed)
            await asyncio.shield(self._record(result))

    async def _record(self, result: CommandResult) -> None:
        if result.verified or result.status != "rejected":
            if result.status == "rejected":
                log.warning("command %s rejected: %s (%s)", result.command_id or "?", result.error_code,
                            result.error_message)
            await self._audit(result)
            return
        now = self._monotonic()
        if now - self._window_start >= self._window_s:
            self._window_start = now
            self._window_audits = 0
        if self._window_audits < self._unverified_budget:
            self._window_audits += 1
            log.warning("command %s rejected: %s (%s)", result.command_id or "?", result.error_code,
                        result.error_message)
            await self._audit(result)
            return
        self._leave_unaudited(result.error_code or "rejected")

    def note_dropped(self) -> None:
        """The transport dropped a request unread (its own bound was reached): counted in the summary."""
        self._leave_unaudited("dropped")

    def _leave_unaudited(self, code: str) -> None:
        if not self._unaudited:
            self._unaudited_since = self._now()
            log.warning("commands: unverified requests keep arriving; their rejections are summarised once "
                        "per %g s instead of being audited one by one", self._window_s)
        self._unaudited[code] += 1
        self.unaudited_total += 1
        if self._summary_timer is None:
            loop = asyncio.get_running_loop()
            due = max(0.0, self._window_start + self._window_s - self._monotonic())
            self._summary_timer = loop.call_later(due, self._summary_due)

    def _summary_due(self) -> None:
        self._summary_timer = None
        task = asyncio.get_running_loop().create_task(self._audit_summary(), name="command-audit-summary")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _audit_summary(self) -> None:
        if not self._unaudited:
            return
        counts, self._unaudited = self._unaudited, Counter()
        since = self._unaudited_since
        n = sum(counts.values())
        detail = ", ".join(f"{code} {k}" for code, k in counts.most_common())
        at = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if since is not None else "?"
        log.warning("commands: %d unverified requests rejected since %s without an audit each (%s)", n, at, detail)
        await self._audit(CommandResult(
            None, False, "rejected", None, "rate_limited",
            f"{n} unverified requests rejected since {at} without an audit each ({detail})"))

    async def flush_audits(self) -> None:
        """Write the pending summary now (the daemon is stopping); the service stays usable."""
        if self._summary_timer is not None:
            self._summary_timer.cancel()
            self._summary_timer = None
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._audit_summary()

    async def _handle(self, payload: bytes, progress: _Progress) -> CommandResult:
        body: CommandBody | None = None
        try:
            body = self._verify_signature(payload, progress)
            progress.body = body
            spec = await self._authorise(body)
            args = self._check_args(spec, body)
        except CommandRejected as exc:
            self.rejected_total += 1
            return CommandResult(body.id if body else None, False, "rejected", None, exc.code, exc.message,
                                 body.command if body else None, body.issuer if body else None,
                                 verified=progress.signed)
        try:
            result = await spec.handler(args)
        except CommandRejected as exc:
            self.failed_total += 1
            return CommandResult(body.id, False, "failed", None, exc.code, exc.message, body.command, body.issuer)
        except Exception as exc:
            self.failed_total += 1
            log.exception("command %s (%s) failed", body.id, body.command)
            return CommandResult(body.id, False, "failed", None, "failed", f"{type(exc).__name__}: {exc}",
                                 body.command, body.issuer)
        self.executed_total += 1
        log.info("command %s (%s) from %s executed", body.id, body.command, body.issuer)
        return CommandResult(body.id, True, "executed", result, None, None, body.command, body.issuer)

    def _verify_signature(self, payload: bytes, progress: _Progress) -> CommandBody:
        if len(payload) > MAX_COMMAND_BYTES:
            raise CommandRejected("too_large", f"command is {len(payload)} bytes; the limit is {MAX_COMMAND_BYTES}")
        try:
            req = CommandRequest.model_validate_json(payload)
        except ValidationError as exc:
            raise CommandRejected("malformed", f"not a command request: {_first_error(exc)}") from None
        key = self._keys.get(req.kid)
        if key is None:
            raise CommandRejected("unknown_key", f"no platform key {req.kid!r} is configured")
        try:
            sig = base64.b64decode(req.sig, validate=True)
        except (binascii.Error, ValueError):
            raise CommandRejected("bad_signature", "signature is not base64") from None
        try:
            key.verify(sig, SIGNING_PREFIX + req.body.encode("utf-8"))
        except InvalidSignature:
            raise CommandRejected("bad_signature", "signature does not verify") from None
        progress.signed = True
        try:
            return CommandBody.model_validate_json(req.body)
        except ValidationError as exc:
            raise CommandRejected("malformed", f"command body: {_first_error(exc)}") from None

    async def _authorise(self, body: CommandBody) -> CommandSpec:
        if body.gateway_id != self._gateway_id or body.site_id != self._site_id:
            raise CommandRejected("wrong_gateway", f"command is for {body.site_id}/{body.gateway_id}")
        if not self._clock_synced():
            raise CommandRejected("clock_unsynced", "the gateway clock is not synchronised; cannot check expiry")
        now = self._now()
        issued, expires = _aware(body.issued_at), _aware(body.expires_at)
        if issued - self._skew > now:
            raise CommandRejected("not_yet_valid", "issued_at is in the future")
        if expires <= now:
            raise CommandRejected("expired", "the command has expired")
        if expires - issued > self._max_ttl:
            raise CommandRejected("ttl_too_long", f"validity exceeds {int(self._max_ttl.total_seconds())} s")
        spec = self._router.get(body.command)
        if spec is None:
            raise CommandRejected("unknown_command", f"this gateway has no command {body.command!r}")
        if self._claim_command is not None:
            horizon = self._max_ttl + self._skew
            outcome = await self._claim_command(body.nonce, _ms(issued), _ms_span(horizon))
            if outcome == "stale":
                raise CommandRejected(
                    "expired", f"issued more than {int(horizon.total_seconds())} s before a command this gateway "
                    "already accepted; refused whatever this box's clock says (was it moved back?)")
            if outcome != "claimed":
                raise CommandRejected("replay", "this nonce was used before")
            return spec
        assert self._claim_nonce is not None
        keep_until_ms = int((expires + self._skew).timestamp() * 1000)
        if not await self._claim_nonce(body.nonce, keep_until_ms):
            raise CommandRejected("replay", "this nonce was used before")
        return spec

    @staticmethod
    def _check_args(spec: CommandSpec, body: CommandBody) -> Mapping[str, Any]:
        if spec.args_model is None:
            if body.args:
                raise CommandRejected("bad_args", f"{spec.name} takes no arguments")
            return {}
        try:
            return spec.args_model.model_validate(body.args).model_dump()
        except ValidationError as exc:
            raise CommandRejected("bad_args", _first_error(exc)) from None


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _ms_span(span: timedelta) -> int:
    return int(span.total_seconds() * 1000)


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(document)"
    return f"{loc}: {err['msg']}"


def sign_command(private_key: Any, kid: str, body: Mapping[str, Any]) -> bytes:
    """Build a signed request (the platform's side; used by tests, the demo and 'edgeagent' tooling)."""
    text = orjson.dumps(dict(body), option=orjson.OPT_PASSTHROUGH_DATETIME, default=str).decode()
    sig = private_key.sign(SIGNING_PREFIX + text.encode("utf-8"))
    return orjson.dumps({"v": 1, "kid": kid, "body": text, "sig": base64.b64encode(sig).decode()})
