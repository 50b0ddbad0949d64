"""ONVIF notification messages -> typed :class:`CameraEvent`.

A PullMessages answer carries ``wsnt:NotificationMessage`` items::

    NotificationMessage
      Topic   (text)        tns1:RuleEngine/CellMotionDetector/Motion
      Message
        tt:Message  @UtcTime="2026-05-01T10:00:00Z" @PropertyOperation="Changed"
          Source / SimpleItem @Name @Value ...   (VideoSourceConfigurationToken, Rule, InputToken, ...)
          Data   / SimpleItem @Name @Value ...   (IsMotion=true, State=false, LogicalState=true, ...)

The same message arrives in several shapes: the zeep object the library returns (attributes, the
``_value_1`` of an ``xsd:any``), a plain mapping of that shape, or an lxml element when zeep could not
resolve the type. :func:`normalize_notification` first flattens any of them into a neutral tree of dicts,
lists and strings (bounded in depth, item count and string length), then reads that tree.

Policies:
- Never raises: a malformed message gives ``None`` (nothing usable: no topic) or a ``CameraEvent`` of
  kind ``other``; it is a codec at the edge of an untrusted device.
- Every string is capped (:data:`MAX_STR`), at most :data:`MAX_ITEMS` source/data items are kept, nesting
  deeper than :data:`MAX_DEPTH` is cut.
- Topics are classified by their path with namespace prefixes dropped per segment, so vendor variants
  (``tns1:VideoSource/tnsaxis:...``, ``tns1:RuleEngine/MyRuleDetector/...``) land in the same kinds.
- ``utc_time`` is the camera's UtcTime corrected by the measured clock offset (camera minus ours), so
  events from a camera whose clock runs 30 s ahead are stamped with our time; a missing or unreadable
  UtcTime gives ``now``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

EventKind = Literal["motion", "tamper", "line_crossed", "digital_input", "relay", "other"]
Operation = Literal["initialized", "changed", "deleted"]

MAX_STR = 256
MAX_TOPIC = 512
MAX_ITEMS = 32
MAX_DEPTH = 12

_TRUE = frozenset({"true", "1", "active", "on", "yes", "high"})
_FALSE = frozenset({"false", "0", "inactive", "off", "no", "low"})
# Data item names that carry the state, in the order they are trusted.
_STATE_KEYS = ("ismotion", "istamper", "logicalstate", "state", "active", "motion", "alarm", "level", "value")
_RULE_KEYS = ("Rule", "RuleName", "rule")
_LATEST_YEAR = 2200


@dataclass(frozen=True, slots=True)
class CameraEvent:
    """One event from a camera, clock-corrected and typed.

    ``active`` is the state for property events (motion on/off, input high/low) and ``None`` for pulses
    (a line crossing) or when the camera gave no readable state. ``operation`` is the ONVIF
    PropertyOperation: ``initialized`` items come once per new subscription and describe the current
    state, not a change (rules should not fire alarms on them).
    """

    kind: EventKind
    active: bool | None
    source: dict[str, str]
    rule: str | None
    topic: str
    utc_time: dt.datetime
    data: dict[str, str] = field(default_factory=dict)
    operation: Operation | None = None


def _cap(text: str, limit: int = MAX_STR) -> str:
    return text if len(text) <= limit else text[:limit]


def _local(name: Any) -> str:
    """Local name of an lxml tag ('{ns}Name' -> 'Name'); non-strings (comments, PIs) -> ''."""
    if not isinstance(name, str):
        return ""
    return name.rsplit("}", 1)[-1]


def _is_element(obj: Any) -> bool:
    return hasattr(obj, "tag") and hasattr(obj, "attrib") and hasattr(obj, "iterchildren")


def _plain(obj: Any, depth: int = 0) -> Any:
    """Flatten zeep objects, lxml elements, mappings and sequences into dicts/lists/strings."""
    if depth > MAX_DEPTH or obj is None:
        return None
    if isinstance(obj, str):
        return _cap(obj)
    if isinstance(obj, bytes | bytearray):
        return _cap(bytes(obj[:MAX_STR]).decode("utf-8", "replace"))
    if isinstance(obj, dt.date):  # zeep gives xs:dateTime as datetime
        return obj.isoformat()
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, int | float):
        return _cap(str(obj))
    if _is_element(obj):
        return _element(obj, depth)
    values = getattr(obj, "__values__", None)  # zeep CompoundValue keeps its fields here
    if isinstance(values, Mapping):
        obj = values
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for i, (key, value) in enumerate(obj.items()):
            if i >= MAX_ITEMS:
                break
            out[_cap(str(key), 64)] = _plain(value, depth + 1)
        return out
    if isinstance(obj, list | tuple):
        return [_plain(x, depth + 1) for x in obj[:MAX_ITEMS]]
    return None


def _element(el: Any, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, (key, value) in enumerate(el.attrib.items()):
        if i >= MAX_ITEMS:
            break
        out["@" + _cap(_local(key), 64)] = _cap(str(value))
    text = el.text
    if isinstance(text, str) and text.strip():
        out["#text"] = _cap(text.strip())
    for i, child in enumerate(el.iterchildren()):
        if i >= MAX_ITEMS:
            break
        name = _local(child.tag)
        if not name:
            continue
        value = _plain(child, depth + 1)
        if name in out:
            existing = out[name]
            if isinstance(existing, list):
                existing.append(value)
            else:
                out[name] = [existing, value]
        else:
            out[name] = value
    return out


def _field(node: Any, *names: str) -> Any:
    """First present field among names, as attribute ('@Name') or element/attribute-less key."""
    if not isinstance(node, dict):
        return None
    for name in names:
        for key in (name, "@" + name):
            if key in node and node[key] is not None:
                return node[key]
    return None


def _text(node: Any) -> str | None:
    if isinstance(node, str):
        return node
    if isinstance(node, dict):
        for key in ("_value_1", "#text", "value", "Value"):
            inner = node.get(key)
            if isinstance(inner, str):
                return inner
    return None


def _items(node: Any) -> dict[str, str]:
    """SimpleItem list (Name/Value pairs) of a Source or Data node."""
    raw = _field(node, "SimpleItem")
    if raw is None:
        return {}
    entries = raw if isinstance(raw, list) else [raw]
    out: dict[str, str] = {}
    for entry in entries:
        if len(out) >= MAX_ITEMS:
            break
        name = _field(entry, "Name")
        value = _field(entry, "Value")
        if isinstance(name, str) and name and isinstance(value, str):
            out[_cap(name, 64)] = _cap(value)
    return out


def _message_body(msg: Any) -> Any:
    """The tt:Message node inside wsnt:Message (zeep puts it under _value_1, lxml under 'Message')."""
    node = _field(msg, "Message")
    for _ in range(3):
        if not isinstance(node, dict):
            return None
        if any(k in node for k in ("Data", "Source", "@UtcTime", "UtcTime", "@PropertyOperation",
                                   "PropertyOperation")):
            return node
        inner = node.get("_value_1")
        node = inner if inner is not None else node.get("Message")
    return None


_PREFIX = re.compile(r"^[^:/]*:")


def topic_path(topic: str) -> str:
    """'tns1:RuleEngine/tnsaxis:Foo/Bar' -> 'RuleEngine/Foo/Bar' (namespace prefixes dropped)."""
    return "/".join(_PREFIX.sub("", seg) for seg in topic.strip().split("/"))


def classify(topic: str) -> EventKind:
    path = topic_path(topic).lower()
    segments = path.split("/")
    if "tamper" in path or "globalscenechange" in path or "imagetoo" in path:
        return "tamper"
    if "linedetector" in path or "linecross" in path or "tripwire" in path or segments[-1] == "crossed":
        return "line_crossed"
    if "relay" in path or "outputport" in path or "digitaloutput" in path:
        return "relay"
    if "digitalinput" in path or "inputport" in path or path.endswith("io/port") or "virtualinput" in path:
        return "digital_input"
    if "motion" in path or "vmd" in segments or any(s.startswith("vmd") for s in segments):
        return "motion"
    return "other"


def parse_bool(value: str) -> bool | None:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    return None


def _state(data: Mapping[str, str]) -> bool | None:
    lowered = {k.lower(): v for k, v in data.items()}
    for key in _STATE_KEYS:
        if key in lowered:
            state = parse_bool(lowered[key])
            if state is not None:
                return state
    if len(data) == 1:
        return parse_bool(next(iter(data.values())))
    return None


def parse_utc(text: str) -> dt.datetime | None:
    """ISO 8601 date-time as aware UTC; naive means UTC (ONVIF's UtcTime); None when unreadable."""
    value = text.strip()
    if not value or len(value) > 64:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    try:
        return parsed.astimezone(dt.UTC)
    except (OverflowError, ValueError):
        return None


def _corrected(raw: Any, clock_offset: dt.timedelta, now: dt.datetime) -> dt.datetime:
    if not isinstance(raw, str):
        return now
    parsed = parse_utc(raw)
    if parsed is None:
        return now
    try:
        corrected = parsed - clock_offset
    except OverflowError:
        return now
    if not 2000 <= corrected.year <= _LATEST_YEAR:
        return now
    return corrected


def _operation(raw: Any) -> Operation | None:
    if not isinstance(raw, str):
        return None
    v = raw.strip().lower()
    if v == "initialized":
        return "initialized"
    if v == "changed":
        return "changed"
    if v == "deleted":
        return "deleted"
    return None


def normalize_notification(msg: Any, *, clock_offset: dt.timedelta = dt.timedelta(0),
                           now: dt.datetime | None = None) -> CameraEvent | None:
    """One NotificationMessage (zeep object, mapping or lxml element) -> CameraEvent, or None when it
    has no topic. ``clock_offset`` is the camera's clock minus ours."""
    now = now if now is not None else dt.datetime.now(dt.UTC)
    try:
        tree = _plain(msg)
        topic_raw = _text(_field(tree, "Topic"))
        if topic_raw is None or not topic_raw.strip():
            return None
        topic = _cap(topic_raw.strip(), MAX_TOPIC)
        body = _message_body(tree)
        source = _items(_field(body, "Source"))
        data = _items(_field(body, "Data"))
        kind = classify(topic)
        active = None if kind == "line_crossed" else _state(data)
        rule = next((source[k] for k in _RULE_KEYS if k in source),
                    next((data[k] for k in _RULE_KEYS if k in data), None))
        return CameraEvent(kind=kind, active=active, source=source, rule=rule, topic=topic,
                           utc_time=_corrected(_field(body, "UtcTime"), clock_offset, now), data=data,
                           operation=_operation(_field(body, "PropertyOperation")))
    except (RecursionError, MemoryError):  # a pathological object graph: drop the message, keep running
        return None
