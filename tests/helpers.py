from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from edgeagent.cloud_bridge.uplink import Uplink
from edgeagent.kernel.config.schema import UplinkConfig
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
