"""Event envelope v1: the one shape every capability's events take on their way to the cloud.

An :class:`Event` is frozen and typed. Its ``type`` names an entry of the registry in
:mod:`edgeagent.kernel.pipeline.event_types`, which fixes the priority class and the schema of ``data``.
``seq`` is not part of the frozen event: the outbox assigns it when the event becomes durable
(see :class:`edgeagent.kernel.pipeline.outbox.Outbox`), so it is gap-free per gateway and survives restarts.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError
from ulid import ULID

ENVELOPE_VERSION = 1
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


class Priority(enum.IntEnum):
    """Priority classes. Lower value leaves the outbox first and is evicted last."""

    ALARM = 0  # never evicted, never coalesced
    EVENT = 1
    TELEMETRY = 2  # coalesced per (device, metric) while backlogged, evicted first

    @property
    def label(self) -> str:
        return self.name.lower()


class EventData(BaseModel):
    """Base for every event type's ``data`` schema. Unknown keys are a programming error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EventTypeError(ValueError):
    """An event was built with an unknown type or with data that does not fit its schema."""


@dataclass(frozen=True, slots=True)
class EventType:
    """A registry entry: the dotted name, its priority class and the schema of its data."""

    name: str
    priority: Priority
    data_model: type[EventData]
    description: str
    # For telemetry: the data field whose value, with the device id, names the series that coalesces.
    coalesce_field: str | None = None
    # Pinned events are exempt from eviction although they are not alarms (the eviction report itself).
    pinned: bool = False

    def __post_init__(self) -> None:
        if not _TYPE_RE.match(self.name):
            raise EventTypeError(f"event type {self.name!r} is not a dotted lower-case name")
        if self.coalesce_field is not None and self.priority is not Priority.TELEMETRY:
            raise EventTypeError(f"{self.name}: only telemetry may coalesce")


class EventRegistry:
    """An explicit registry: every type the code can emit is listed, so the contract is complete."""

    def __init__(self) -> None:
        self._types: dict[str, EventType] = {}

    def register(self, event_type: EventType) -> EventType:
        if event_type.name in self._types:
            raise EventTypeError(f"event type {event_type.name!r} registered twice")
        self._types[event_type.name] = event_type
        return event_type

    def get(self, name: str) -> EventType:
        try:
            return self._types[name]
        except KeyError:
            raise EventTypeError(f"unknown event type {name!r}") from None

    def __iter__(self) -> Iterator[EventType]:
        return iter(sorted(self._types.values(), key=lambda t: t.name))

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __len__(self) -> int:
        return len(self._types)


def utc_ms(dt: datetime) -> str:
    """RFC 3339 UTC with millisecond precision, the only time format in the contract."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class Attachment:
    """A reference to something kept at the edge (a snapshot, a clip), never the bytes themselves."""

    kind: str
    sha256: str
    media_type: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "sha256": self.sha256, "media_type": self.media_type,
                "size_bytes": self.size_bytes}


@dataclass(frozen=True, slots=True)
class ClockStamp:
    """When an event happened: wall time plus what is needed to correct it later.

    A Pi has no real-time clock; until NTP has synchronised the clock the wall time may be off by
    years. Such stamps are marked ``synced=False`` and carry the monotonic time and boot id, from
    which the outbox rewrites ``occurred_at`` once the clock is synchronised.
    """

    wall: datetime
    monotonic_ns: int
    boot_id: str
    synced: bool


@dataclass(frozen=True, slots=True)
class Event:
    """One normalized event (envelope v1). Build with :meth:`EventFactory.make`."""

    VERSION: ClassVar[int] = ENVELOPE_VERSION

    id: str
    type: str
    priority: Priority
    site_id: str
    gateway_id: str
    device_id: str
    stamp: ClockStamp
    data: Mapping[str, Any]
    attachments: tuple[Attachment, ...] = ()
    coalesce_key: str | None = field(default=None, compare=False)
    pinned: bool = field(default=False, compare=False)

    def envelope(self, seq: int) -> dict[str, Any]:
        """The wire form. ``seq`` comes from the outbox."""
        env: dict[str, Any] = {
            "v": ENVELOPE_VERSION,
            "id": self.id,
            "seq": seq,
            "type": self.type,
            "priority": self.priority.label,
            "site_id": self.site_id,
            "gateway_id": self.gateway_id,
            "device_id": self.device_id,
            "occurred_at": utc_ms(self.stamp.wall),
            "clock_synced": self.stamp.synced,
            "data": dict(self.data),
            "attachments": [a.to_dict() for a in self.attachments],
        }
        if not self.stamp.synced:
            env["clock"] = {"boot_id": self.stamp.boot_id, "monotonic_ms": self.stamp.monotonic_ns // 1_000_000}
        return env

    def to_json(self, seq: int) -> bytes:
        return orjson.dumps(self.envelope(seq))


class EventFactory:
    """Builds events for one gateway, validating data against the registry's schema."""

    def __init__(self, registry: EventRegistry, site_id: str, gateway_id: str, clock: ClockLike) -> None:
        self._registry = registry
        self._site_id = site_id
        self._gateway_id = gateway_id
        self._clock = clock

    @property
    def registry(self) -> EventRegistry:
        return self._registry

    def make(
        self,
        type_name: str,
        device_id: str,
        data: Mapping[str, Any] | EventData,
        attachments: tuple[Attachment, ...] = (),
    ) -> Event:
        et = self._registry.get(type_name)
        if isinstance(data, EventData):
            if not isinstance(data, et.data_model):
                raise EventTypeError(f"{type_name}: data must be {et.data_model.__name__}")
            model = data
        else:
            try:
                model = et.data_model.model_validate(data)
            except ValidationError as exc:
                raise EventTypeError(f"{type_name}: data does not fit its schema: {exc}") from exc
        dumped = model.model_dump(mode="json", exclude_none=True)
        coalesce_key = None
        if et.coalesce_field is not None:
            coalesce_key = f"{device_id}\x1f{dumped.get(et.coalesce_field)}"
        return Event(
            id=str(ULID()),
            type=type_name,
            priority=et.priority,
            site_id=self._site_id,
            gateway_id=self._gateway_id,
            device_id=device_id,
            stamp=self._clock.stamp(),
            data=dumped,
            attachments=attachments,
            coalesce_key=coalesce_key,
            pinned=et.pinned,
        )


class ClockLike(Protocol):
    """What the event factory needs from a clock (see :mod:`edgeagent.kernel.runtime.clock`)."""

    def stamp(self) -> ClockStamp: ...
