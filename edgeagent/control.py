"""The local control socket: how the installer's and the guard room's CLI moves things on a running
daemon (open a gate, reset a charger lockout, test a siren).

A Unix socket, mode 0660, in the runtime directory: only root and the daemon's own group can
connect, which is the authentication for local commands; the caller's user (from SO_PEERCRED) is
recorded as who did it, in the same audit events the cloud's signed commands produce.
"""

from __future__ import annotations

import contextlib
import logging
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from edgeagent.kernel.errors import CommandRejected

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
Handler = Callable[[Mapping[str, Any], str], Awaitable[Mapping[str, Any]]]


def peer_user(request: web.Request) -> str:
    """``name(uid)`` of the process on the other end of the Unix socket."""
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is None:
        return "unknown"
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", raw)
    except (AttributeError, OSError):
        return "unknown"
    try:
        return f"{pwd.getpwuid(uid).pw_name}({uid})"
    except KeyError:
        return f"uid {uid}"


class ControlServer:
    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self._handlers = dict(handlers)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/{action}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a killed daemon
        site = web.UnixSite(runner, str(self.path))
        try:
            await site.start()
            self.path.chmod(0o660)
        except OSError as exc:
            await runner.cleanup()
            log.error("control socket %s unavailable: %s (local commands disabled)", self.path, exc.strerror)
            return
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _handle(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        handler = self._handlers.get(action)
        if handler is None:
            return _error(404, "unknown_command", f"no local action {action!r} "
                          f"(known: {', '.join(sorted(self._handlers))})")
        try:
            args = await request.json()
        except ValueError:
            return _error(400, "malformed", "the request body is not JSON")
        if not isinstance(args, dict):
            return _error(400, "malformed", "the request body must be a JSON object")
        who = peer_user(request)
        try:
            result = await handler(args, who)
        except CommandRejected as exc:
            return _error(409 if exc.code == "failed" else 400, exc.code, exc.message)
        log.info("local %s by %s: %s", action, who, dict(result))
        return web.json_response({"ok": True, "result": dict(result)})


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"ok": False, "error": {"code": code, "message": message}}, status=status)
