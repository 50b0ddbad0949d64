"""Configuration of the alarm notifiers: which notifier reaches which target, and how.

Escalation levels (``alarms.levels``) name *targets* (``guard_room``, ``grid_worker``, ``family_li``): who is
to be told. The ``notifiers`` section names *notifiers* (one broker topic, one webhook, one GSM modem) and,
for each, the targets it serves. A target may be served by several notifiers (the guard room gets the panel
topic and the webhook); every one of them gets every message for that target. An SMS notifier serves the
targets it has a phone number for, one number per target (a family with two phones is two targets, so a
retry to one never sends a duplicate to the other)::

    notifiers:
      guard_room_panel:                      # a topic on the box's own broker: works with the internet down
        type: mqtt
        topic: compound/guard-room/alarms/{target}
        targets: [guard_room]
      property_office:
        type: webhook
        url: http://192.168.10.5:8080/hooks/edgeagent
        secret: {credential: notify-webhook-hmac}    # X-Edgeagent-Signature: sha256=<hex> over the body
        targets: [guard_room, grid_worker]
      gsm_modem:
        type: sms
        serial_port: /dev/serial/by-id/usb-Quectel_EC25-if02-port0
        pin: {credential: sim-pin}
        numbers:
          grid_worker: "+8613800138000"
          family_li: "+8613900139000"

SMS is sent in text mode (``AT+CMGF=1``), one SMS per message, no concatenation. Text that is plain ASCII goes
as GSM 7-bit (``AT+CSCS="IRA"``, up to ``max_chars``, at most 160 septets; ``[]{}~^|\\`` count two).
Anything else, Chinese included, goes as UCS2 (``AT+CSCS="UCS2"``, ``AT+CSMP=17,167,0,8``, number and text
hex-encoded), which fits 70 characters in one SMS: a longer message is cut with "...". Longer Chinese
text needs PDU mode with concatenation headers, which this does not do.

Pure models, no I/O: the implementations live in ``edgeagent.drivers.notifiers``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from edgeagent.kernel.config.base import SecretRef, Strict

NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
E164_PATTERN: Final = r"^\+[1-9][0-9]{6,14}$"
# Headers edgeagent sets itself, or that would carry a secret in clear text in the config file.
_RESERVED_HEADERS: Final = frozenset({"content-type", "content-length", "host", "x-edgeagent-signature",
                                      "authorization", "proxy-authorization", "cookie"})
_TOKEN_RE: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

TargetName = Annotated[str, Field(pattern=NAME_PATTERN, description="a target named by the escalation levels")]


def _by_reference(value: Any) -> Any:
    if isinstance(value, str | int | float):
        raise ValueError(  # noqa: TRY004 - pydantic reports ValueError as a validation error
            "secrets may not be written in the config file; "
            "use {credential: NAME}, {file: PATH} or {env: NAME}")
    return value


def _unique(targets: tuple[str, ...]) -> tuple[str, ...]:
    dupes = sorted({t for t in targets if targets.count(t) > 1})
    if dupes:
        raise ValueError(f"target listed twice: {', '.join(dupes)}")
    return targets


class MqttNotifierConfig(Strict):
    """A message on a topic of the box's local broker (a guard-room panel or display subscribes to it).
    The payload is JSON: alarm_id, level, level_name, kind, severity, title, text, target, at."""

    type: Literal["mqtt"]
    topic: str = Field(min_length=1, max_length=256,
                       description="topic; '{target}' is replaced by the target name, e.g. compound/alarms/{target}")
    targets: tuple[TargetName, ...] = Field(min_length=1, description="targets this topic serves")
    qos: Literal[0, 1, 2] = 1
    retain: bool = Field(default=False, description="retain the last message (a panel that reconnects sees it)")
    timeout_s: float = Field(default=5, gt=0, le=60, description="wait this long for the broker's acknowledgement")

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        fields = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
        if fields - {"target"}:
            raise ValueError(f"the topic may only use '{{target}}' (got {sorted(fields - {'target'})})")
        if "+" in v or "#" in v or v.startswith("$"):
            raise ValueError("a topic to publish to has no wildcards ('+', '#') and does not start with '$'")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _unique(v)

    @property
    def served_targets(self) -> tuple[str, ...]:
        return self.targets

    def topic_for(self, target: str) -> str:
        return self.topic.replace("{target}", target)


class WebhookNotifierConfig(Strict):
    """An HTTP POST of the same JSON as the MQTT notifier. 2xx is delivered; 408, 429, 5xx, timeouts and
    connection errors are retried; any other status is a permanent failure (redirects are not followed)."""

    type: Literal["webhook"]
    url: str = Field(description="http:// or https:// URL the JSON is POSTed to")
    targets: tuple[TargetName, ...] = Field(min_length=1, description="targets this webhook serves")
    timeout_s: float = Field(default=5, gt=0, le=120, description="whole request, connect to response")
    secret: SecretRef | None = Field(
        default=None, description="HMAC-SHA256 key by reference; the request then carries "
        "'X-Edgeagent-Signature: sha256=<hex of HMAC over the body>'")
    authorization: SecretRef | None = Field(
        default=None, description="value of the Authorization header by reference, e.g. a file holding "
        "'Bearer <token>'")
    headers: dict[str, str] = Field(default_factory=dict, description="extra request headers (no secrets)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{v!r} is not an http:// or https:// URL")
        if parts.username or parts.password:
            raise ValueError("put no credentials in the URL; use 'authorization' by reference")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"{v!r} has an invalid port") from exc
        return v

    @field_validator("secret", "authorization", mode="before")
    @classmethod
    def _secret_ref(cls, v: Any) -> Any:
        return _by_reference(v)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _TOKEN_RE.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by edgeagent or carries a secret; "
                                 "use 'secret' or 'authorization' by reference")
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"header {name!r}: a value may not contain line breaks")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _unique(v)

    @property
    def served_targets(self) -> tuple[str, ...]:
        return self.targets


class SmsNotifierConfig(Strict):
    """SMS through a GSM/LTE modem on a serial port, in AT text mode (see the module docstring for the
    character sets). The port is opened for each SMS and closed after it, locked against other programs
    (keep ModemManager off it). It serves exactly the targets listed under ``numbers``."""

    type: Literal["sms"]
    serial_port: str = Field(min_length=1, description="the modem's AT port, e.g. /dev/serial/by-id/...-if02-port0")
    baudrate: int = Field(default=115200, ge=1200, le=4_000_000)
    numbers: dict[TargetName, Annotated[str, Field(pattern=E164_PATTERN)]] = Field(
        min_length=1, description="phone number per target, E.164 with the country code (+8613800138000)")
    max_chars: int = Field(default=160, ge=10, le=160,
                           description="GSM 7-bit characters per SMS; UCS2 (Chinese) text is cut at 70")
    timeout_s: float = Field(default=20, gt=0, le=300,
                             description="wait this long for the network to accept the SMS (+CMGS); each "
                             "other AT command waits the smaller of this and 5 s")
    pin: SecretRef | None = Field(
        default=None, description="SIM PIN by reference, entered when the SIM asks; a rejected PIN is never "
        "entered again until restart (three wrong tries lock the SIM)")

    @model_validator(mode="before")
    @classmethod
    def _no_targets_key(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "targets" in data:
            raise ValueError("an sms notifier serves the targets under 'numbers' (target: phone number); "
                             "remove 'targets'")
        return data

    @field_validator("pin", mode="before")
    @classmethod
    def _pin_ref(cls, v: Any) -> Any:
        return _by_reference(v)

    @property
    def served_targets(self) -> tuple[str, ...]:
        return tuple(self.numbers)


NotifierConfig = Annotated[MqttNotifierConfig | WebhookNotifierConfig | SmsNotifierConfig,
                           Field(discriminator="type")]
NotifiersSection = dict[Annotated[str, Field(pattern=NAME_PATTERN)], NotifierConfig]

NOTIFIER_CONFIG_TYPES: Final[dict[str, type[MqttNotifierConfig | WebhookNotifierConfig | SmsNotifierConfig]]] = {
    "mqtt": MqttNotifierConfig,
    "webhook": WebhookNotifierConfig,
    "sms": SmsNotifierConfig,
}


def routes(section: Mapping[str, MqttNotifierConfig | WebhookNotifierConfig | SmsNotifierConfig]
           ) -> dict[str, tuple[str, ...]]:
    """Target name → names of the notifiers serving it, in the section's order."""
    out: dict[str, list[str]] = {}
    for name, cfg in section.items():
        for target in cfg.served_targets:
            out.setdefault(target, []).append(name)
    return {t: tuple(names) for t, names in out.items()}


def unserved(section: Mapping[str, MqttNotifierConfig | WebhookNotifierConfig | SmsNotifierConfig],
             targets: Iterable[str]) -> list[str]:
    """The targets (e.g. every target of the escalation levels) that no notifier serves, in order, once each.
    A config cross-check reports these: a level that calls a target nobody reaches is a silent alarm."""
    served = routes(section)
    return [t for t in dict.fromkeys(targets) if t not in served]
