"""Notifications about alarms: what a notifier is given (:class:`Message`) and what it must do.

A :class:`Notifier` delivers one message to one target (a guard-room MQTT topic, a webhook, an SMS
modem, ...); which notifier serves which target name is configuration, resolved by the runtime. The
message is built from the engine's :class:`~edgeagent.kernel.alarms.engine.Notify` action by
:func:`message_for`, a pure function: it names the resident only when the engine put the name on the
action (``AlarmConfig.message_names``); otherwise it carries the resident's id only. A place alarm names
its place and the device (camera, charger) that raised it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from edgeagent.kernel.alarms.engine import MessageKind, Notify
from edgeagent.kernel.errors import EdgeagentError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class NotifyError(EdgeagentError):
    """A notification could not be delivered. ``permanent``: retrying will not help (a bad number,
    a refused credential) rather than a busy modem or an unreachable host."""

    def __init__(self, target: str, reason: str, *, permanent: bool = False) -> None:
        super().__init__(f"notify {target}: {reason}")
        self.target = target
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class Message:
    """One notification, transport-free."""

    title: str
    text: str
    alarm_id: str
    level: int
    level_name: str
    kind: MessageKind
    severity: str

    def plain(self, max_chars: int | None = None) -> str:
        """Title, blank line, text; cut to ``max_chars`` (with an ellipsis) for short channels such as SMS."""
        out = f"{self.title}\n\n{self.text}"
        if max_chars is not None and len(out) > max_chars:
            if max_chars < 1:
                raise ValueError("max_chars must be at least 1")
            out = out[: max_chars - 1].rstrip() + "…"
        return out


class Notifier(Protocol):
    """Delivers messages to targets it knows. Raises :class:`NotifyError` (cause kept) when it cannot;
    the alarm engine's repeats are the retry of last resort."""

    async def send(self, target: str, message: Message) -> None: ...


def _clean(text: str) -> str:
    """One line, without control characters (a name from config must not forge message lines)."""
    return _CONTROL.sub(" ", text).strip()


def message_for(notify: Notify) -> Message:
    """The message for a :class:`~edgeagent.kernel.alarms.engine.Notify` action (pure)."""
    alarm = notify.alarm
    label = _clean(notify.label or alarm.kind)
    label = label[:1].upper() + label[1:]
    if alarm.place is not None:
        who = f"at {_clean(alarm.place)}"
        source = f"device {_clean(alarm.device_id)}"
    else:
        who = f"resident {_clean(alarm.resident_id or '')}"
        if notify.name:
            who += f" ({_clean(notify.name)})"
        source = f"wristband {_clean(alarm.device_id)}"
    if notify.message_kind == "new":
        prefix = "ALARM"
    elif notify.message_kind == "repeat":
        prefix = f"REMINDER {notify.alarm.notifications}"
    else:
        prefix = f"ESCALATED to {notify.level_name}"
    title = f"{prefix} [{notify.severity}]: {label}, {who}"

    waited_s = max(0.0, notify.at.mono_s - alarm.first_raised.mono_s)
    lines = [
        f"{label}: {who}, {source}.",
        f"Raised {alarm.first_raised.wall:%Y-%m-%d %H:%M:%S} UTC, not acknowledged for {_duration(waited_s)}.",
    ]
    if alarm.count > 1:
        lines.append(f"Raised {alarm.count} times.")
    if alarm.details:
        lines.append("Readings: " + ", ".join(f"{_clean(k)}={_clean(str(v))}" for k, v in alarm.details.items()))
    lines.append(f"Level {notify.level} ({notify.level_name}).")
    lines.append(f"Acknowledge: edgeagent alarms ack {alarm.id}")
    return Message(title=title, text="\n".join(lines), alarm_id=alarm.id, level=notify.level,
                   level_name=notify.level_name, kind=notify.message_kind, severity=notify.severity)


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s % 60 else f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"
