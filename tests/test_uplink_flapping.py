"""Two gateways configured with the same client id keep taking the connection from each other. Each
connection is dropped right after CONNACK; the backoff must not start over each time (before: a
reconnect about once a second per box, forever, with an ERROR each time)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson

from edgeagent.cloud_bridge.uplink import Uplink
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from tests.helpers import uplink_config
from tests.peers import Collector, Mosquitto

STATUS = "edgeagent/v1/site-1/gw-1/status"
RUN_S = 25.0


async def test_two_gateways_sharing_a_client_id_reconnect_only_a_few_times_a_minute(
        tmp_path: Path, broker: Mosquitto) -> None:
    col = Collector(broker.port, topic=STATUS).start()
    # The shipped backoff, except that the short-cap window of an outage (60 s) is cut to 5 s so that
    # a 25 s test sees the long cap. The stable period stays at its default (30 s), longer than the test:
    # no connection here can count as stable.
    cfg = uplink_config(broker.url, client_id="twin-box",
                        retry={"first_max_s": 1, "short_cap_s": 4, "long_cap_s": 60, "short_window_s": 5})
    outboxes = [Outbox(OutboxConfig(tmp_path / f"outbox-{i}.db")) for i in range(2)]
    for ob in outboxes:
        await ob.open()
    ups = [Uplink(cfg, site_id="site-1", gateway_id="gw-1", outbox=ob, version="t") for ob in outboxes]
    tasks = [asyncio.create_task(up.run()) for up in ups]
    onlines: list[float] = []

    def count_onlines() -> None:
        with col._lock:
            n = sum(1 for t, p, _r in col.messages if t == STATUS and orjson.loads(p)["state"] == "online")
        while len(onlines) < n:
            onlines.append(time.monotonic())

    try:
        start = time.monotonic()
        while time.monotonic() - start < RUN_S:
            count_onlines()
            await asyncio.sleep(0.1)
        count_onlines()
        late = [t for t in onlines if t - start >= 5]
        # In the long-cap regime a box waits 0-60 s (30 s on average) between attempts: for the two
        # boxes over these 20 s, a handful at most. With the backoff reset on every CONNACK: dozens.
        assert len(late) <= 8, f"{len(late)} connections in 20 s ({len(onlines)} in all)"
        assert len(onlines) >= 2  # both did connect
    finally:
        for up in ups:
            await up.stop(0)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        for ob in outboxes:
            await ob.close()
        col.stop()
