"""What the notifiers share: the JSON body of the MQTT and webhook notifiers, and masking phone numbers.

The JSON, for the topic and the webhook::

    {"alarm_id": "01J...", "level": 0, "level_name": "guard_room", "kind": "new", "severity": "critical",
     "title": "ALARM [critical]: SOS button pressed, resident r-12", "text": "...", "target": "guard_room",
     "at": "2026-05-01T08:00:00.123Z"}

``kind`` is the message kind (new, repeat, escalated); ``at`` is when this notifier built the request (the
:class:`~edgeagent.kernel.alarms.notify.Message` carries no time of its own; its text says when the alarm was raised).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime

import orjson

from edgeagent.kernel.alarms.notify import Message

Now = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def payload(target: str, message: Message, at: datetime) -> bytes:
    """The JSON body of the MQTT and webhook notifiers."""
    return orjson.dumps({
        "alarm_id": message.alarm_id,
        "level": message.level,
        "level_name": message.level_name,
        "kind": message.kind,
        "severity": message.severity,
        "title": message.title,
        "text": message.text,
        "target": target,
        "at": at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    })


def mask_number(number: str) -> str:
    """``+8613800138000`` → ``*********8000``: enough to tell numbers apart in a log, not to dial one."""
    digits = re.sub(r"\D", "", number)
    return "*" * max(0, len(digits) - 4) + digits[-4:]

