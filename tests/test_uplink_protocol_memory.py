"""Once a broker turned out to speak only MQTT 3.1.1, reconnects to it start with 3.1.1: before, every
reconnect after an outage waited out a full connect timeout on an unanswered MQTT 5 CONNECT first."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from edgeagent.kernel.pipeline.events import EventFactory
from tests.helpers import running_uplink, wait_until
from tests.peers import Amqtt, Collector, free_port


class ConnectSpy:
    """A TCP relay in front of the broker that records the protocol level of every CONNECT (4 is
    MQTT 3.1.1, 5 is MQTT 5) and can go away and come back, as a broker outage looks to a client."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.levels: list[int] = []
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._conns):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._conns.add(up_w)
        first = await reader.read(4096)
        # CONNECT: fixed header, remaining length (1-4 bytes), then "\0\4MQTT" and the level byte.
        at = first.find(b"\x00\x04MQTT")
        if first[:1] == b"\x10" and at > 0 and len(first) > at + 6:
            self.levels.append(first[at + 6])
        up_w.write(first)
        for src, dst in ((reader, up_w), (up_r, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.close()


async def test_reconnects_to_an_mqtt311_broker_start_with_311(tmp_path: Path, factory: EventFactory) -> None:
    with Amqtt(tmp_path / "amqtt") as broker:
        spy = ConnectSpy(broker.port)
        await spy.start()
        col = Collector(broker.port, mqtt311=True).start()
        try:
            async with running_uplink(tmp_path, f"mqtt://127.0.0.1:{spy.port}", connect_timeout_s=2) as (ob, up):
                assert await wait_until(lambda: up.state == "connected", 20)
                assert up.protocol == "3.1.1"
                assert spy.levels == [5, 4], spy.levels  # MQTT 5 unanswered, then 3.1.1
                for outage in range(2):
                    await spy.stop()
                    # The uplink notices, and at least one reconnect is refused while the broker is away.
                    assert await wait_until(lambda: "cannot connect" in (up.last_error or ""), 20), up.last_error
                    await spy.start()
                    assert await wait_until(lambda: up.state == "connected", 20), up.snapshot()
                    await ob.put(factory.make("contact.changed", "door-1", {"state": "open", "contact": "door"}))
                    assert await wait_until(lambda n=outage: len(set(col.seqs())) >= n + 1, 20)
                # After the first fallback, never MQTT 5 again (it is retried only after v5_retry_s).
                assert spy.levels[2:] and set(spy.levels[2:]) == {4}, spy.levels
        finally:
            col.stop()
            await spy.stop()
