"""``/status`` on the health port is open to every local user: it must not say who the residents are
(issue 8 item 6; before, each active alarm listed its resident's id)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

from edgeagent.health import HealthServer

RESIDENT = "res-0042"


class Source:
    """What the daemon hands the endpoint: the shape of ``Daemon.status()``, with residents in it."""

    def healthy(self) -> tuple[bool, str]:
        return True, "ok"

    async def status(self) -> dict[str, Any]:
        return {
            "version": "test", "site_id": "s1", "gateway_id": "g1", "healthy": True,
            "tasks": [{"name": "wristbands", "state": "running", "restarts": 0, "last_error": None}],
            "alarms": [{"id": "01J0", "kind": "sos", "state": "raised", "resident_id": RESIDENT, "count": 3,
                        "level": 0}],
            "wristbands": {"connected": True, "residents": [{"id": RESIDENT, "name": "Wang Ayi", "room": "3-2-501"}]},
        }


async def test_status_lists_no_residents() -> None:
    server = HealthServer("127.0.0.1", 0, Source())
    await server.start()
    try:
        assert server.url is not None
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"{server.url}/status", timeout=5).read())
    finally:
        await server.stop()
    status = json.loads(body)
    for word in (RESIDENT, "Wang", "3-2-501"):
        assert word.encode() not in body, word
    # Everything else is still there: the alarm itself, the tasks, the input's state.
    assert status["alarms"] == [{"id": "01J0", "kind": "sos", "state": "raised", "count": 3, "level": 0}]
    assert status["tasks"][0]["name"] == "wristbands" and status["wristbands"] == {"connected": True}
