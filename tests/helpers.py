from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from edgeagent.app import Daemon
from edgeagent.cli import app as cli_app
from edgeagent.cloud_bridge.uplink import Uplink
from edgeagent.kernel.config.schema import UplinkConfig
from edgeagent.kernel.pipeline.events import Event
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig


def uplink_config(url: str, **kw: Any) -> UplinkConfig:
    data: dict[str, Any] = {"broker": url, "retry": {"first_max_s": 0.2, "short_cap_s": 0.5},
                            "connect_timeout_s": 3}
    data.update(kw)
    return UplinkConfig.model_validate(data)


@contextlib.asynccontextmanager
async def running_uplink(tmp: Path, url: str, outbox: Outbox | None = None, **kw: Any
                         ) -> AsyncIterator[tuple[Outbox, Uplink]]:
    own = outbox is None
    ob = outbox or Outbox(OutboxConfig(tmp / "outbox.db"))
    if own:
        await ob.open()
    up = Uplink(uplink_config(url, **kw), site_id="site-1", gateway_id="gw-1", outbox=ob, version="test")
    task = asyncio.create_task(up.run())
    try:
        yield ob, up
    finally:
        await up.stop(drain_s=0)
        try:
            await asyncio.wait_for(task, 10)
        finally:
            if own:
                await ob.close()


async def wait_until(predicate: Any, timeout_s: float = 20.0, interval_s: float = 0.02) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval_s)
    return bool(predicate())


@dataclass
class RunningDaemon:
    daemon: Daemon
    task: asyncio.Task[int]
    seen: list[Event] = field(default_factory=list)  # every durable event, in order

    def of(self, type_name: str, device_id: str | None = None) -> list[Event]:
        return [e for e in self.seen if e.type == type_name and (device_id is None or e.device_id == device_id)]


@contextlib.asynccontextmanager
async def running_daemon(daemon: Daemon, *, ready_s: float = 15.0, stop_s: float = 30.0,
                         exit_code: int | None = 0) -> AsyncIterator[RunningDaemon]:
    """The daemon running in this loop until the block ends; then an orderly stop, whose exit code must be
    ``exit_code`` (None: not checked). Durable events are collected in ``.seen``."""
    seen: list[Event] = []
    daemon.sink.observe(lambda e, _s: seen.append(e))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(shutdown_trigger=stop.wait))
    ready = asyncio.create_task(daemon.ready.wait())
    try:
        done, _ = await asyncio.wait({ready, task}, timeout=ready_s, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
            raise AssertionError(f"the daemon stopped during start-up (exit code {task.result()})")
        if not done:
            raise TimeoutError(f"the daemon was not ready within {ready_s} s")
        yield RunningDaemon(daemon, task, seen)
    finally:
        ready.cancel()
        stop.set()
        code = await asyncio.wait_for(task, stop_s)
    if exit_code is not None:
        assert code == exit_code, f"exit code {code}"


def cli(*args: str | Path) -> Any:
    """The ``edgeagent`` command in this process (typer's runner); unexpected exceptions are raised."""
    result = CliRunner().invoke(cli_app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def starter_config(tmp_path: Path) -> Path:
    """``edgeagent init`` for site s1 / gateway g1 with its state in tmp_path (a closed broker port)."""
    path = tmp_path / "c.yaml"
    r = cli("init", "--site-id", "s1", "--gateway-id", "g1", "--broker", "mqtt://127.0.0.1:1",
            "--state-dir", tmp_path / "state", "--config", path)
    assert r.exit_code == 0, r.output
    return path


def config_head(state: Path, *, site_id: str = "site-1", gateway_id: str = "gw-1",
                health: str = "{enabled: false}") -> str:
    """The first lines of a test's config file: ids, ``state_dir``, the clock trusted as synced (event times
    are the wall clock's, whatever the test machine's time sync says) and the health endpoint (off, or
    ``{port: 0}`` for an ephemeral port). The rest of the file follows it as top-level sections."""
    return (f"version: 1\nsite_id: {site_id}\ngateway_id: {gateway_id}\nstate_dir: {state}\n"
            f"clock: {{sync: synced}}\nhealth: {health}\n")


def camera_doc(tmp_path: Path, devices: str, *, evidence: str = "", cameras: str = "") -> str:
    """The config the camera tests run the daemon with: site s, gateway g, health on an ephemeral port, evidence
    under ``tmp_path/evidence``. ``devices``: the items of the ``devices:`` list, indented; ``evidence``: more
    keys of ``cameras.evidence`` ("clip_pre_s: 2, ..."); ``cameras``: more lines of ``cameras:``, indented."""
    more = f", {evidence}" if evidence else ""
    return (config_head(tmp_path / "state", site_id="s", gateway_id="g", health="{port: 0}")
            + f"cameras:\n  evidence: {{dir: {tmp_path / 'evidence'}{more}}}\n{cameras}devices:\n{devices}")
