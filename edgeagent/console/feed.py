"""The console's live feed: the daemon's own event stream, fanned out to every connected screen.

The feed observes the event sink (an event is seen once it is durable, as the platform would see it) and the
alarm runtime's change listener (acknowledgements, escalations and folds change a card without a new event
type being needed). Each message is serialized once and put on each client's queue.

Overflow policy: a client's queue holds ``CLIENT_QUEUE`` messages; a client that falls that far behind
(a phone on a bad Wi-Fi, a tab in the background) is dropped, counted in ``dropped_clients``, and its page
reconnects and reloads the state snapshot, so it misses nothing that matters. Telemetry is not forwarded
(it is the bulk of the stream and the state snapshot shows the latest values); it is counted in
``skipped_telemetry``. At most ``MAX_CLIENTS`` streams at once; more are refused (counted).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from edgeagent.kernel.pipeline.events import Event, Priority, utc_ms

log = logging.getLogger(__name__)

CLIENT_QUEUE: Final = 256
MAX_CLIENTS: Final = 32
# Snapshots referenced by alarm events, remembered per alarm for its card (bounded: oldest forgotten).
MAX_ALARM_SNAPSHOTS: Final = 1024


@dataclass(slots=True, eq=False)  # by identity: a set member
class Client:
    user: str
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(CLIENT_QUEUE))
    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0


def event_json(event: Event, seq: int) -> dict[str, Any]:
    return {"seq": seq, "id": event.id, "type": event.type, "priority": event.priority.label,
            "device_id": event.device_id, "occurred_at": utc_ms(event.stamp.wall), "data": dict(event.data),
            "attachments": [a.to_dict() for a in event.attachments]}


class Feed:
    def __init__(self) -> None:
        self._clients: set[Client] = set()
        self.dropped_clients = 0
        self.refused_clients = 0
        self.skipped_telemetry = 0
        self.messages = 0
        # alarm id -> sha256 of the snapshot its events referenced (camera alarms)
        self.alarm_snapshots: dict[str, str] = {}
        self.listeners: list[Callable[[Event], None]] = []

    def connect(self, user: str) -> Client | None:
        if len(self._clients) >= MAX_CLIENTS:
            self.refused_clients += 1
            return None
        client = Client(user)
        self._clients.add(client)
        return client

    def disconnect(self, client: Client) -> None:
        self._clients.discard(client)

    @property
    def clients(self) -> int:
        return len(self._clients)

    def broadcast(self, kind: str, payload: Any) -> None:
        """Put one message on every client's queue (never waits)."""
        if not self._clients:
            return
        body = orjson.dumps(payload, default=str)
        msg = b"event: " + kind.encode() + b"\ndata: " + body + b"\n\n"
        self.messages += 1
        for client in list(self._clients):
            try:
                client.queue.put_nowait(msg)
            except asyncio.QueueFull:
                # Dropped, not blocked: a slow screen must not hold the others (its page reconnects).
                self._clients.discard(client)
                client.dropped.set()
                self.dropped_clients += 1
                log.warning("console: a screen of %s fell %d messages behind and was dropped", client.user,
                            CLIENT_QUEUE)

    def on_event(self, event: Event, seq: int) -> None:
        """Sink observer: runs on the loop for every durable event."""
        if event.priority is Priority.TELEMETRY:
            self.skipped_telemetry += 1
            return
        alarm_id = event.data.get("alarm_id") if event.type.startswith("alarm.") else None
        if isinstance(alarm_id, str):
            snap = next((a.sha256 for a in event.attachments if a.media_type == "image/jpeg"), None)
            if snap is not None:
                self.alarm_snapshots[alarm_id] = snap
                while len(self.alarm_snapshots) > MAX_ALARM_SNAPSHOTS:
                    del self.alarm_snapshots[next(iter(self.alarm_snapshots))]
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("console: event listener failed")
        self.broadcast("event", event_json(event, seq))

    def stats(self) -> dict[str, int]:
        return {"clients": len(self._clients), "dropped_clients": self.dropped_clients,
                "refused_clients": self.refused_clients, "skipped_telemetry": self.skipped_telemetry,
                "messages": self.messages}
