"""Local HTTP endpoint: ``/healthz`` (200 or 503), Prometheus ``/metrics`` and ``/status`` (JSON for
``edgeagent status``). Bound to 127.0.0.1 by default: it is for the box, not the LAN.

Any local user can reach it (no credentials on loopback), so ``/status`` says nothing about residents:
keys naming a resident (ids, names, rooms) are dropped wherever they occur. Who has an alarm is for root
and the edgeagent group, through the control socket (``edgeagent alarms list``).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgeagent.kernel.runtime.metrics import REGISTRY


class StatusSource(Protocol):
    """What the endpoint asks of the daemon."""

    def healthy(self) -> tuple[bool, str]: ...

    async def status(self) -> dict[str, Any]: ...

log = logging.getLogger(__name__)

# Keys that identify a resident, at any depth of the status; dropped from /status (see the docstring).
PERSONAL_KEYS = frozenset({"resident_id", "resident_ids", "resident", "residents", "resident_name", "names",
                           "room"})


def public_status(node: Any) -> Any:
    """The status without anything that names a resident (a copy; the daemon's own is left as it is)."""
    if isinstance(node, dict):
        return {k: public_status(v) for k, v in node.items() if k not in PERSONAL_KEYS}
    if isinstance(node, list | tuple):
        return [public_status(v) for v in node]
    return node


class HealthServer:
    def __init__(self, host: str, port: int, daemon: StatusSource) -> None:
        self._host = host
        self._port = port
        self._daemon = daemon
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            log.error("health endpoint cannot listen on %s:%d: %s (continuing without it)",
                      self._host, self._port, exc.strerror)
            return
        self._runner = runner
        # aiohttp exposes the bound port (for port 0) only on its server object.
        sockets = getattr(site._server, "sockets", None) or []
        port = int(sockets[0].getsockname()[1]) if sockets else self._port
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.url = f"http://{host}:{port}"
        log.info("health endpoint on %s", self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _req: web.Request) -> web.Response:
        ok, why = self._daemon.healthy()
        return web.json_response({"ok": ok, "detail": why}, status=200 if ok else 503)

    async def _metrics(self, _req: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, _req: web.Request) -> web.Response:
        return web.json_response(public_status(await self._daemon.status()))
