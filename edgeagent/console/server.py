"""The guard-room console: an HTTPS web app the daemon serves for the guard room and the installer.

What it offers, all from the box (no CDN; the internet may be down):

* ``GET /api/state``: a snapshot any screen starts from: active alarms (resident or place, time open,
  level, snapshot), every capability's ``status()``, devices, the uplink and its backlog, cameras with
  their zones and lines, recent gate events, recent events;
* ``GET /api/events``: server-sent events from the daemon's own event stream (:mod:`edgeagent.console.feed`)
  and the alarm runtime's changes;
* actions, each audited as a ``console.audit`` event naming the user: acknowledge and resolve an alarm
  (the CLI's own local action, ``via=console``, the user as ``by``), open a gate (the gate's local action,
  the user as the caller), draw a zone or line on a camera and save it to the config file (through the
  installer tools the CLI provides: the same comment-keeping editor, validated before writing), run the
  installer's checks (``doctor``).

Who may do what (:mod:`edgeagent.console.accounts`): viewers see; guards also acknowledge, resolve and open
the gate; installers also configure. Every state-changing request needs a session, its CSRF token and the
console's own Origin (:mod:`edgeagent.console.security`). Nothing here blocks the loop: password hashing,
snapshots' base64, file reads and the installer's tools run in threads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final, Protocol

import orjson
from aiohttp import web

from edgeagent.console import tls
from edgeagent.console.accounts import (
    HASH_CONCURRENCY,
    Account,
    AccountError,
    AccountStore,
    dummy_hash,
    verify_password,
)
from edgeagent.console.feed import Feed
from edgeagent.console.metrics import ConsoleCollector
from edgeagent.console.security import (
    COOKIE,
    HEADERS,
    LoginLimiter,
    Session,
    Sessions,
    credential_digest,
    write_sessions_file,
)
from edgeagent.kernel.alarms.engine import Alarm
from edgeagent.kernel.alarms.runtime import AlarmRuntime
from edgeagent.kernel.capability import LocalAction
from edgeagent.kernel.config.console import ConsoleConfig
from edgeagent.kernel.errors import CommandRejected, OutboxError
from edgeagent.kernel.local_actions import alarm_action
from edgeagent.kernel.pipeline.events import utc_ms
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.kernel.runtime import metrics

log = logging.getLogger(__name__)
UNKNOWN_NAME: Final = "(not an account)"

AUDIT_EVENT: Final = "console.audit"
USERS_PATH: Final = Path("console") / "users.json"
TLS_DIR: Final = Path("console") / "tls"
SESSIONS_PATH: Final = Path("console") / "sessions.json"
SESSIONS_SAVE_S: Final = 1.0  # a login or logout is on disk within about this
# A session's last use is written at most this often (and at stop): the live feed uses the sessions every few
# seconds, and an SD card must not be written every second for a figure the 12 h idle timeout barely needs.
SESSIONS_SEEN_SAVE_S: Final = 300.0
SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}$")
STATIC_FILES: Final = {"app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html"}
SNAPSHOT_CACHE_S: Final = 0.5  # several screens asking for one camera within this share one JPEG
KEEPALIVE_S: Final = 15.0
RECENT_EVENTS: Final = 100
RECENT_GATE_EVENTS: Final = 30
DOCTOR_TIMEOUT_S: Final = 90.0
DEVICE_TEST_TIMEOUT_S: Final = 30.0
MAX_BODY_BYTES: Final = 64 * 1024
GATE_PULSE_S: Final = 1.0  # a barrier opened through an output: one pulse, as its own button would
SESSION: Final = web.RequestKey("session", Session)


class ConsoleTools(Protocol):
    """What the console needs from the CLI layer, which knows the config file and the installer's commands (the
    comment-keeping editor, doctor's checks, the residents' plate list); given by whoever starts the daemon
    (``edgeagent run``). Each runs in a worker thread."""

    def save_shape(self, camera_id: str, kind: str, shape: Mapping[str, Any]) -> dict[str, Any]:
        """Add or replace a zone (``kind`` 'zone') or line ('line') of a camera in the config file, keeping its
        comments; the whole config is validated first. Raises ValueError with the reason."""
        ...

    def doctor(self) -> dict[str, Any]: ...

    def plates(self) -> list[dict[str, Any]]:
        """The residents' plate list (plate, ref, reason, valid_from, valid_until)."""
        ...

    def device_test(self, device_id: str) -> dict[str, Any]:
        """The device's test before configure (``device add``'s probe): {ok, detail}; ValueError when it has none."""
        ...


@dataclass(frozen=True)
class ConsoleContext:
    """What the daemon gives the console."""

    site_id: str
    gateway_id: str
    state_dir: Path
    sink: EventSink
    alarms: AlarmRuntime
    actions: Mapping[str, LocalAction]
    status: Callable[[], Awaitable[dict[str, Any]]]
    devices: Sequence[Any] = ()  # the config's device entries (cameras' zones and lines, gates)
    names: Mapping[str, str] = field(default_factory=dict)  # resident id -> display name
    evidence_dirs: Sequence[Path] = ()  # where snapshots referenced by events are kept (<dir>/snapshots/<sha>.jpg)
    tools: ConsoleTools | None = None


def _ms(dt: datetime | None) -> str | None:
    return None if dt is None else utc_ms(dt)


def alarm_card(al: Alarm, names: Mapping[str, str], snapshot: str | None, now: datetime) -> dict[str, Any]:
    """One alarm as the console shows it: resident or place (whichever the alarm has), time open, level."""
    place = getattr(al, "place", None)
    kind = getattr(al.kind, "value", al.kind)
    resident = al.resident_id or None
    return {
        "id": al.id, "kind": str(kind), "state": str(getattr(al.state, "value", al.state)),
        "resident_id": resident, "place": place, "name": names.get(resident) if resident else None,
        "device_id": al.device_id, "count": al.count, "level": al.level, "raised_at": _ms(al.first_raised.wall),
        "open_s": round(max(0.0, (now - al.first_raised.wall).total_seconds()), 1),
        "acknowledged": al.acknowledged, "acknowledged_by": al.acknowledged_by,
        "acknowledged_via": al.acknowledged_via, "snapshot": snapshot,
        "details": dict(al.details),
    }


def _shape_of(item: Any, kind: str) -> dict[str, Any]:
    if kind == "zone":
        return {"name": item.name, "points": [list(p) for p in item.points]}
    return {"name": item.name, "a": list(item.a), "b": list(item.b), "a_to_b": item.a_to_b, "b_to_a": item.b_to_a}


def cameras_of(devices: Sequence[Any]) -> list[dict[str, Any]]:
    """Devices with zones or lines (cameras), read generically: the console knows no capability by name."""
    out = []
    for dev in devices:
        if getattr(dev, "type", None) != "camera" or not getattr(dev, "enabled", True):
            continue
        out.append({"id": dev.id, "name": getattr(dev, "name", None),
                    "zones": [_shape_of(z, "zone") for z in getattr(dev, "zones", ())],
                    "lines": [_shape_of(ln, "line") for ln in getattr(dev, "lines", ())]})
    return out


def gates_of(devices: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"id": d.id, "name": getattr(d, "name", None)} for d in devices
            if str(getattr(d, "type", "")).endswith(".gate") and getattr(d, "enabled", True)]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, default=str), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"ok": False, "error": {"code": code, "message": message}}, status)


class ConsoleServer:
    def __init__(self, cfg: ConsoleConfig, ctx: ConsoleContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.accounts = AccountStore(ctx.state_dir / USERS_PATH)
        self.sessions = Sessions(idle_s=cfg.session_idle_s)
        self.limiter = LoginLimiter()
        self.feed = Feed()
        self._hashing = asyncio.Semaphore(HASH_CONCURRENCY)
        self._alarm_action = alarm_action(ctx.alarms, "console")
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self._gate_events: deque[dict[str, Any]] = deque(maxlen=RECENT_GATE_EVENTS)
        self._snapshots: dict[tuple[str, bool], tuple[float, bytes]] = {}
        self._snapshot_locks: dict[str, asyncio.Lock] = {}
        self._shapes: dict[str, dict[str, Any]] = {}  # zones/lines saved since start (shown; applied where it can be)
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task[Any]] = set()
        self._saver: asyncio.Task[None] | None = None
        self.sessions_save_failed = 0
        self.url: str | None = None
        self.fingerprint: str | None = None
        self.audit_failed = 0
        self._alarm_version = 0  # bumped on every alarm change pushed to the screens
        self._epoch = secrets.token_hex(8)  # this run's: versions restart at 0 with the daemon
        self._collector: ConsoleCollector | None = None
        self._static = {name: resources.files("edgeagent.console").joinpath("static", name).read_bytes()
                        for name in STATIC_FILES}
        # Revalidated on every load (no-cache) but sent again only when changed: an ETag per file.
        self._etags = {name: '"' + hashlib.sha256(body).hexdigest()[:16] + '"' for name, body in self._static.items()}

    # --- lifecycle ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._guard])
        r = app.router
        r.add_get("/", self._index)
        r.add_get("/static/{name}", self._static_file)
        r.add_post("/api/login", self._login)
        r.add_post("/api/logout", self._logout)
        r.add_get("/api/session", self._session)
        r.add_get("/api/state", self._state)
        r.add_get("/api/events", self._events)
        r.add_post("/api/alarms/{alarm_id}/{action}", self._alarm)
        r.add_post("/api/gates/{device_id}/open", self._gate_open)
        r.add_get("/api/cameras/{camera_id}/snapshot", self._camera_snapshot)
        r.add_get("/api/evidence/{sha256}", self._evidence)
        r.add_get("/api/plates", self._plates)
        r.add_post("/api/cameras/{camera_id}/shapes", self._save_shape)
        r.add_get("/api/doctor", self._doctor)
        r.add_post("/api/devices/{device_id}/test", self._device_test)
        return app

    async def start(self) -> None:
        self.ctx.sink.observe(self._on_event)
        self.ctx.alarms.listen(self._on_alarm)
        try:
            cert, key = await asyncio.to_thread(self._certificate)
            ssl_ctx = await asyncio.to_thread(tls.server_context, cert, key)
        except (OSError, ValueError) as exc:  # (ssl.SSLError is an OSError) the alarms must run without a console
            log.error("console not started: its certificate cannot be used: %s", exc)
            return
        try:
            kept, dropped = await asyncio.to_thread(self.sessions.load, self.ctx.state_dir / SESSIONS_PATH)
            if kept or dropped:
                log.info("console: %d session(s) carried over from the last run, %d expired", kept, dropped)
        except ValueError as exc:
            log.warning("console: sessions of the last run not carried over (everyone logs in again): %s", exc)
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.host, self.cfg.port, ssl_context=ssl_ctx)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            log.error("console cannot listen on %s:%d: %s (continuing without it)", self.cfg.host, self.cfg.port,
                      exc.strerror)
            return
        self._runner = runner
        self._saver = asyncio.create_task(self._keep_sessions(), name="console-sessions")
        self._collector = ConsoleCollector(self.stats)
        metrics.REGISTRY.register(self._collector)
        sockets = getattr(site._server, "sockets", None) or []  # the bound port, for port 0
        port = int(sockets[0].getsockname()[1]) if sockets else self.cfg.port
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        self.url = f"https://{host}:{port}"
        try:
            users = len(await asyncio.to_thread(self.accounts.load))
        except AccountError as exc:
            log.error("console accounts: %s", exc)
            users = 0
        log.info("console on %s (certificate SHA-256 %s); %d account(s)%s", self.url, self.fingerprint, users,
                 "" if users else ": add one with 'edgeagent console add-user NAME --role guard'")

    def _certificate(self) -> tuple[Path, Path]:
        t = self.cfg.tls
        if t.cert_file is not None and t.key_file is not None:
            cert, key = t.cert_file, t.key_file
        else:
            cert, key, made = tls.ensure_certificate(self.ctx.state_dir / TLS_DIR, self.ctx.gateway_id,
                                                     [self.cfg.host, *t.hosts])
            if made:
                log.info("console: made a self-signed certificate in %s", cert.parent)
        self.fingerprint = tls.fingerprint(cert)
        return cert, key

    def stats(self) -> dict[str, Any]:
        return {**self.feed.stats(), "sessions": len(self.sessions), "sessions_evicted": self.sessions.evicted,
                "sessions_save_failed": self.sessions_save_failed, "logins_refused": self.limiter.refused,
                "audit_failed": self.audit_failed}

    async def _keep_sessions(self) -> None:
        """Write the sessions to the state directory when they changed, at most every SESSIONS_SAVE_S."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(SESSIONS_SAVE_S)
            if self.sessions.changed or (self.sessions.touched and time.monotonic() - last >= SESSIONS_SEEN_SAVE_S):
                await self._save_sessions()
                last = time.monotonic()

    async def _save_sessions(self) -> None:
        if not (self.sessions.changed or self.sessions.touched):
            return
        data = self.sessions.dump()  # on the loop: the table changes only here
        try:
            await asyncio.to_thread(write_sessions_file, self.ctx.state_dir / SESSIONS_PATH, data)
        except OSError as exc:
            self.sessions.changed = True  # tried again at the next turn
            self.sessions_save_failed += 1
            if self.sessions_save_failed == 1:
                log.warning("console: sessions not saved (a restart would log everyone out): %s", exc)

    async def stop(self) -> None:
        if self._saver is not None:
            self._saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._saver
            self._saver = None
            await self._save_sessions()
        if self._collector is not None:
            with contextlib.suppress(KeyError):
                metrics.REGISTRY.unregister(self._collector)
            self._collector = None
        for task in list(self._streams):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- the feed ------------------------------------------------------------------------------------

    def _on_event(self, event: Any, seq: int) -> None:
        self.feed.on_event(event, seq)
        if event.priority.label == "telemetry":
            return
        row = {"id": event.id, "type": event.type, "device_id": event.device_id,
               "occurred_at": utc_ms(event.stamp.wall), "data": dict(event.data),
               "attachments": [a.to_dict() for a in event.attachments]}
        self._recent.append(row)
        if event.type.startswith("gate."):
            self._gate_events.append(row)

    async def _on_alarm(self, _alarm: Alarm) -> None:
        # The whole active list (small): a screen renders it as it comes, without asking again.
        self._alarm_version += 1
        self.feed.broadcast("alarms", {"epoch": self._epoch, "version": self._alarm_version,
                                       "alarms": self._alarm_cards()})

    def _alarm_cards(self) -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        return [alarm_card(al, self.ctx.names, self.feed.alarm_snapshots.get(al.id), now)
                for al in self.ctx.alarms.engine.active()]

    # --- guard: headers, sessions, CSRF and Origin -----------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        refused = self._refuse(request)
        if refused is not None:
            resp: web.StreamResponse = refused
        else:
            try:
                resp = await handler(request)
            except web.HTTPException as exc:  # answered here so that it gets the headers too
                resp = web.Response(status=exc.status, text=exc.text, headers={
                    k: v for k, v in exc.headers.items() if k.lower() not in ("content-length", "content-type")})
        for k, v in HEADERS.items():
            resp.headers.setdefault(k, v)
        resp.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return resp

    def _refuse(self, request: web.Request) -> web.Response | None:
        path = request.path
        if request.method not in ("GET", "HEAD", "POST"):
            return _error(405, "method", "not allowed")
        if request.method == "POST":
            origin = request.headers.get("Origin")
            if origin != f"https://{request.host}":
                log.warning("console: %s %s refused: Origin %r is not the console's own", request.method, path,
                            origin)
                return _error(403, "origin", "cross-site request refused")
            if request.content_type != "application/json":
                return _error(415, "content_type", "JSON only")
        if not path.startswith("/api/") or path == "/api/login":
            return None
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            return _error(401, "login", "log in first")
        request[SESSION] = session
        if request.method == "POST" and not hmac.compare_digest(
                request.headers.get("X-CSRF-Token", "").encode(), session.csrf.encode()):
            return _error(403, "csrf", "missing or wrong CSRF token")
        return None

    @staticmethod
    def _me(request: web.Request) -> Session:
        return request[SESSION]

    async def _account(self, session: Session) -> Account | None:
        """The session's account as the file says now (read in a thread; cached by the file's mtime): a removed
        account, a changed role or a new password counts at once. None: gone or changed, the session ended."""
        try:
            account = await asyncio.to_thread(self.accounts.get, session.user)
        except AccountError as exc:
            log.error("console accounts: %s", exc)
            return None
        if account is None or account.role != session.role or credential_digest(account.hash) != session.credential:
            self.sessions.end(session.token)
            return None
        return account

    async def _allowed(self, session: Session, permission: str) -> bool:
        account = await self._account(session)
        return account is not None and account.may(permission)

    async def _audit(self, session: Session | None, action: str, target: str, outcome: str,
                     detail: str | None = None, *, user: str | None = None, remote: str = "") -> None:
        data = {"user": user if user is not None else (session.user if session else "?"),
                "role": session.role if session else None, "action": action, "target": target[:128],
                "outcome": outcome, "detail": (detail or None) and detail[:300],
                "remote": (session.remote if session else remote)[:64] or None}
        try:
            await self.ctx.sink.emit(AUDIT_EVENT, self.ctx.gateway_id, data)
        except (OutboxError, KeyError, ValueError) as exc:
            self.audit_failed += 1
            log.error("console audit of %s by %s not stored: %s", action, data["user"], exc)

    # --- pages ---------------------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        return self._asset(request, "index.html")

    async def _static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES or name == "index.html":
            raise web.HTTPNotFound
        return self._asset(request, name)

    def _asset(self, request: web.Request, name: str) -> web.Response:
        headers = {"Cache-Control": "no-cache", "ETag": self._etags[name]}
        if request.headers.get("If-None-Match") == self._etags[name]:
            return web.Response(status=304, headers=headers)
        return web.Response(body=self._static[name], content_type=STATIC_FILES[name], charset="utf-8",
                            headers=headers)

    # --- login ---------------------------------------------------------------------------------------

    async def _login(self, request: web.Request) -> web.Response:
        remote = request.remote or "?"
        try:
            body = await request.json()
            user, password = str(body["user"])[:64], str(body["password"])[:256]
        except (ValueError, KeyError, TypeError):
            return _error(400, "malformed", "user and password expected")
        keys = [f"ip:{remote}", f"user:{user}"]
        try:
            account = await asyncio.to_thread(self.accounts.get, user)
        except AccountError as exc:
            log.error("console accounts: %s", exc)
            return _error(503, "accounts", "the accounts file is unreadable")
        # A name that is no account is not put in the audit event: people type their password into the name
        # field, and the event goes to the platform.
        shown = user if account is not None else UNKNOWN_NAME
        wait = self.limiter.retry_after(keys)
        if wait > 0:
            await self._audit(None, "login", shown, "refused", "too many failed logins", user=shown, remote=remote)
            return web.Response(status=429, body=orjson.dumps({"ok": False, "error": {
                "code": "rate_limited", "message": f"too many failed logins; try again in {wait:.0f} s"}}),
                content_type="application/json", headers={"Retry-After": str(int(wait) + 1)})
        async with self._hashing:  # the hash (and the decoy's, made once) in a thread, never on the loop
            ok = await asyncio.to_thread(_check_password, password, account)
        if account is None or not ok:
            self.limiter.failed(keys)
            await self._audit(None, "login", shown, "refused", "wrong user or password", user=shown, remote=remote)
            return _error(401, "login", "wrong user or password")
        self.limiter.succeeded([f"user:{user}"])
        session = self.sessions.create(account.name, account.role, remote, account.hash)
        await self._audit(session, "login", account.name, "ok")
        resp = _json(self._session_json(session, account))
        resp.set_cookie(COOKIE, session.token, secure=True, httponly=True, samesite="Strict", path="/")
        return resp

    def _session_json(self, s: Session, account: Account) -> dict[str, Any]:
        perms = sorted(p for p in ("alarm", "gate", "configure") if account.may(p))
        return {"ok": True, "user": s.user, "role": s.role, "csrf": s.csrf, "perms": perms,
                "site_id": self.ctx.site_id, "gateway_id": self.ctx.gateway_id}

    async def _logout(self, request: web.Request) -> web.Response:
        s = self._me(request)
        self.sessions.end(s.token)
        await self._audit(s, "logout", s.user, "ok")
        resp = _json({"ok": True})
        resp.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
        return resp

    async def _session(self, request: web.Request) -> web.Response:
        s = self._me(request)
        account = await self._account(s)
        if account is None:
            return _error(401, "login", "log in again")
        return _json(self._session_json(s, account))

    # --- state and feed ------------------------------------------------------------------------------

    async def state(self) -> dict[str, Any]:
        st = await self.ctx.status()
        caps = {name: st.get(name) for name in st.get("capabilities", [])}
        uplink = st.get("uplink") or {}
        return {
            "server_time": utc_ms(datetime.now(UTC)), "site_id": self.ctx.site_id, "gateway_id": self.ctx.gateway_id,
            "healthy": st.get("healthy"), "health_detail": st.get("health_detail"),
            # With its version (no await between the two): a screen keeps whichever of this and a push is newer.
            "alarms": self._alarm_cards(), "alarms_version": self._alarm_version, "epoch": self._epoch,
            "uplink": {k: uplink.get(k) for k in ("state", "broker", "last_error", "published_events")},
            "outbox": st.get("outbox", {}).get("classes", {}),
            "tasks": [t for t in st.get("tasks", []) if t.get("state") not in ("running", "done")],
            "devices": st.get("devices") or [],
            "outputs": st.get("outputs"),
            "cameras": [c | self._shapes.get(c["id"], {}) for c in cameras_of(self.ctx.devices)],
            "config_devices": [{"id": d.id, "type": getattr(d, "type", "?")} for d in self.ctx.devices],
            "camera_status": _camera_status(caps.get("cameras")),
            "gates": gates_of(self.ctx.devices),
            "gate_events": list(self._gate_events),
            "recent": list(self._recent)[-30:],
            "capabilities": caps,
            "feed": self.stats(),
        }

    async def _state(self, request: web.Request) -> web.Response:
        if await self._account(self._me(request)) is None:  # screens of a removed account stop seeing
            return _error(401, "login", "log in again")
        return _json(await self.state())

    async def _events(self, request: web.Request) -> web.StreamResponse:
        s = self._me(request)
        client = self.feed.connect(s.user)
        if client is None:
            return _error(503, "busy", "too many screens connected")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no", **HEADERS})
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        try:
            await resp.prepare(request)
            # The active alarms right away: a screen draws its cards before its full state arrives.
            hello = orjson.dumps({"epoch": self._epoch, "version": self._alarm_version,
                                  "alarms": self._alarm_cards()}, default=str)
            await resp.write(b"retry: 2000\nevent: hello\ndata: " + hello + b"\n\n")
            while True:
                get = asyncio.ensure_future(client.queue.get())
                dropped = asyncio.ensure_future(client.dropped.wait())
                done, _ = await asyncio.wait({get, dropped}, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                if dropped not in done:
                    dropped.cancel()
                if dropped in done:
                    break  # fell behind: the page reconnects and reloads the state
                if get in done:
                    await resp.write(get.result())
                    client.sent += 1
                else:
                    await resp.write(b": keepalive\n\n")
                if self.sessions.get(s.token) is None:
                    break  # logged out or expired
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.feed.disconnect(client)
            if task is not None:
                self._streams.discard(task)
        return resp

    # --- actions -------------------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="the body is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="a JSON object expected")
        return body

    async def _alarm(self, request: web.Request) -> web.Response:
        s = self._me(request)
        alarm_id, action = request.match_info["alarm_id"], request.match_info["action"]
        if action not in ("ack", "resolve"):
            raise web.HTTPNotFound
        if not await self._allowed(s, "alarm"):
            await self._audit(s, f"alarm.{action}", alarm_id, "refused", f"role {s.role} may not")
            return _error(403, "forbidden", "your role may not acknowledge or resolve alarms")
        body = await self._body(request)
        args: dict[str, Any] = {"alarm_id": alarm_id, "action": action, "by": s.user}
        if action == "resolve" and body.get("note"):
            args["note"] = str(body["note"])
        try:
            result = await self._alarm_action(args, f"console:{s.user}")
        except CommandRejected as exc:
            await self._audit(s, f"alarm.{action}", alarm_id, "failed", exc.message)
            return _error(409 if exc.code == "failed" else 400, exc.code, exc.message)
        await self._audit(s, f"alarm.{action}", alarm_id, "ok")
        return _json({"ok": True, "result": dict(result)})

    async def _gate_open(self, request: web.Request) -> web.Response:
        s = self._me(request)
        device_id = request.match_info["device_id"]
        if not await self._allowed(s, "gate"):
            await self._audit(s, "gate.open", device_id, "refused", f"role {s.role} may not")
            return _error(403, "forbidden", "your role may not open the gate")
        body = await self._body(request)
        reason = body.get("reason") if body.get("reason") in ("visitor", "guard_room") else "guard_room"
        note = str(body.get("note") or "")[:200] or None
        gate_ids = {g["id"] for g in gates_of(self.ctx.devices)}
        # A gate camera may open the barrier through a named output (its own relay) instead of a gate device.
        output = self.ctx.actions.get("output") if device_id not in gate_ids else None
        action = self.ctx.actions.get("gate") if device_id in gate_ids else output
        if action is None:
            return _error(404, "no_gate", f"no gate {device_id!r} on this box")
        args: dict[str, Any] = ({"device_id": device_id, "command": "open", "reason": reason, "note": note}
                                if action is not output else {"name": device_id, "action": "pulse",
                                                              "seconds": GATE_PULSE_S})
        try:
            result = await action(args, f"console:{s.user}")
        except CommandRejected as exc:
            await self._audit(s, "gate.open", device_id, "failed", exc.message)
            return _error(409 if exc.code == "failed" else 400, exc.code, exc.message)
        await self._audit(s, "gate.open", device_id, "ok", note)
        return _json({"ok": True, "result": dict(result)})

    async def _camera_snapshot(self, request: web.Request) -> web.Response:
        camera_id = request.match_info["camera_id"]
        boxes = request.query.get("boxes", "1") == "1"
        action = self.ctx.actions.get("camera.snapshot")
        if action is None or camera_id not in {c["id"] for c in cameras_of(self.ctx.devices)}:
            return _error(404, "no_camera", "no such camera")  # (the cache and its locks: configured cameras only)
        key = (camera_id, boxes)
        lock = self._snapshot_locks.setdefault(camera_id, asyncio.Lock())
        async with lock:
            cached = self._snapshots.get(key)
            if cached is None or time.monotonic() - cached[0] > SNAPSHOT_CACHE_S:
                try:
                    result = await action({"camera": camera_id, "boxes": boxes}, f"console:{self._me(request).user}")
                    jpeg = await asyncio.to_thread(base64.b64decode, str(result["jpeg_b64"]))
                except CommandRejected as exc:
                    return _error(409 if exc.code == "failed" else 404, exc.code, exc.message)
                except (KeyError, binascii.Error):
                    return _error(502, "snapshot", "the camera gave no picture")
                cached = (time.monotonic(), jpeg)
                self._snapshots[key] = cached
        return web.Response(body=cached[1], content_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def _evidence(self, request: web.Request) -> web.Response:
        sha = request.match_info["sha256"].removesuffix(".jpg")
        if not SHA256_RE.match(sha):
            raise web.HTTPNotFound

        def read() -> bytes | None:
            for root in self.ctx.evidence_dirs:
                with contextlib.suppress(OSError):
                    return (root / "snapshots" / f"{sha}.jpg").read_bytes()
            return None

        data = await asyncio.to_thread(read)
        if data is None:
            raise web.HTTPNotFound
        return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def _plates(self, _request: web.Request) -> web.Response:
        if self.ctx.tools is None:
            return _json({"ok": True, "plates": [], "available": False})
        try:
            plates = await asyncio.to_thread(self.ctx.tools.plates)
        except Exception as exc:  # noqa: BLE001 - a damaged list is shown as such, not as a server error
            return _error(503, "plates", f"the plate list cannot be read: {exc}")
        return _json({"ok": True, "plates": plates, "available": True})

    async def _save_shape(self, request: web.Request) -> web.Response:
        s = self._me(request)
        camera_id = request.match_info["camera_id"]
        if not await self._allowed(s, "configure"):
            await self._audit(s, "config.shape", camera_id, "refused", f"role {s.role} may not")
            return _error(403, "forbidden", "only an installer may change the configuration")
        if self.ctx.tools is None:
            return _error(503, "no_editor", "this daemon was started without the config editor (use 'edgeagent run')")
        body = await self._body(request)
        kind = body.get("kind")
        shape = body.get("shape")
        if kind not in ("zone", "line") or not isinstance(shape, dict):
            return _error(400, "bad_args", "kind (zone or line) and shape expected")
        name = str(shape.get("name", ""))[:64]
        try:
            result = await asyncio.to_thread(self.ctx.tools.save_shape, camera_id, kind, shape)
        except ValueError as exc:
            await self._audit(s, f"config.{kind}", f"{camera_id}/{name}", "failed", str(exc))
            return _error(400, "invalid", str(exc))
        shapes = result.get("camera")
        if isinstance(shapes, dict):
            self._shapes[camera_id] = shapes
            # Applied to the running camera at once where it can be (a camera without a community rule);
            # otherwise the note says a restart applies it.
            apply = self.ctx.actions.get("camera.shapes")
            if apply is not None:
                try:
                    await apply({"camera": camera_id, "zones": shapes.get("zones", []),
                                 "lines": shapes.get("lines", [])}, f"console:{s.user}")
                    result |= {"note": "applied now", "note_code": "applied", "applied": True}
                except CommandRejected as exc:
                    result |= {"note": f"restart the daemon to apply ({exc.message})", "applied": False}
        await self._audit(s, f"config.{kind}", f"{camera_id}/{name}", "ok",
                          "applied now" if result.get("applied") else "applies at the next start")
        return _json({"ok": True, **result})

    async def _doctor(self, request: web.Request) -> web.Response:
        s = self._me(request)
        if not await self._allowed(s, "configure"):
            return _error(403, "forbidden", "only an installer may run the checks")
        if self.ctx.tools is None:
            return _error(503, "no_tools", "this daemon was started without the installer's tools")
        try:
            report = await asyncio.wait_for(asyncio.to_thread(self.ctx.tools.doctor), DOCTOR_TIMEOUT_S)
        except TimeoutError:
            return _error(504, "timeout", f"the checks took longer than {DOCTOR_TIMEOUT_S:.0f} s")
        await self._audit(s, "doctor", self.ctx.gateway_id, "ok")
        return _json({"ok": True, **report})


    async def _device_test(self, request: web.Request) -> web.Response:
        s = self._me(request)
        device_id = request.match_info["device_id"]
        if not await self._allowed(s, "configure"):
            await self._audit(s, "device.test", device_id, "refused", f"role {s.role} may not")
            return _error(403, "forbidden", "only an installer may run a device's test")
        if self.ctx.tools is None:
            return _error(503, "no_tools", "this daemon was started without the installer's tools")
        try:
            result = await asyncio.wait_for(asyncio.to_thread(self.ctx.tools.device_test, device_id),
                                            DEVICE_TEST_TIMEOUT_S)
        except ValueError as exc:
            await self._audit(s, "device.test", device_id, "failed", str(exc))
            return _error(400, "no_test", str(exc))
        except TimeoutError:
            result = {"device": device_id, "ok": False, "detail": f"no answer within {DEVICE_TEST_TIMEOUT_S:.0f} s"}
        await self._audit(s, "device.test", device_id, "ok" if result.get("ok") else "failed",
                          str(result.get("detail") or ""))
        return _json({"ok": True, **result})


def _check_password(password: str, account: Account | None) -> bool:
    """Hash the attempt even for an unknown name (against a decoy), so the time taken does not tell names apart."""
    return verify_password(password, account.hash if account is not None else dummy_hash()) and account is not None


def _camera_status(cams: Any) -> dict[str, Any]:
    """Per camera: online and its stream's error, from the cameras capability's status (if it runs)."""
    if not isinstance(cams, dict):
        return {}
    out = {}
    for cid, st in (cams.get("cameras") or {}).items():
        if isinstance(st, dict):
            pipe = st.get("pipeline") or {}
            out[cid] = {"online": st.get("online"), "error": st.get("error"), "tracks": pipe.get("tracks")}
    return out
