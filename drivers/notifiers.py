"""Alarm notifiers that work with the internet down, and the hub that fans messages out to them.

Three notifiers implement :class:`edgeagent.kernel.alarms.notify.Notifier` (config in
:mod:`edgeagent.kernel.alarms.notify_config`):

- :class:`MqttNotifier`: JSON on a topic of the box's local broker (a guard-room panel subscribes);
- :class:`WebhookNotifier`: the same JSON POSTed over HTTP(S), optionally HMAC-signed;
- :class:`SmsModemNotifier`: an SMS through a GSM/LTE modem spoken to with AT commands on a serial port.

The JSON, for the topic and the webhook::

    {"alarm_id": "01J...", "level": 0, "level_name": "guard_room", "kind": "new", "severity": "critical",
     "title": "ALARM [critical]: SOS button pressed, resident r-12", "text": "...", "target": "guard_room",
     "at": "2026-05-01T08:00:00.123Z"}

``kind`` is the message kind (new, repeat, escalated); ``at`` is when this notifier built the request (the
:class:`~edgeagent.kernel.alarms.notify.Message` carries no time of its own; its text says when the alarm was raised).

Failures come out as :class:`~edgeagent.kernel.alarms.notify.NotifyError`, cause kept; ``permanent`` says that a retry
cannot help (a 4xx answer, a number the network rejects, a wrong SIM PIN).

:class:`NotifierHub` is what the alarm runtime calls. ``hub.notify(targets, message)`` returns at once: every
(notifier, target) pair becomes a *delivery*, a task of its own, so a modem that takes 20 s to time out never
delays the alarm path::

    notify(targets, message) ──► one delivery per notifier serving each target (its own task)
                                   │ waits for a slot of its notifier (SMS: 1 at a time, webhook: 4, mqtt: 8)
                                   ▼
                                 send ──► ok: delivered
                                   │ transient NotifyError: wait retry_base_s * 2**(n-1) * [0.5, 1], try again,
                                   │   at most ``attempts`` tries, none started after ``retry_window_s``
                                   ▼ permanent NotifyError, or tries used up: failed (logged, counted)

Overflow policy: at most ``max_pending`` deliveries are in the hub (waiting, backing off or sending). A delivery
that arrives when it is full evicts the oldest *repeat* that is not sending at that moment (cancelled, counted
in ``stats.dropped_repeats``); if there is none, an arriving repeat is itself dropped and counted. A "new" or
"escalated" message is never dropped: it is admitted beyond the bound (counted in ``stats.over_bound``), since
the number of alarms bounds it and a repeat will follow an unacknowledged alarm anyway.

Logging: a phone number shows only its last 4 digits, message bodies never show at info level or above, and a
webhook URL shows without its query string.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

import aiohttp
import orjson
import serial  # type: ignore[import-untyped]  # pyserial ships no type hints

from edgeagent.kernel.alarms.engine import MessageKind
from edgeagent.kernel.alarms.notify import Message, Notifier, NotifyError
from edgeagent.kernel.alarms.notify_config import (
    MqttNotifierConfig,
    SmsNotifierConfig,
    WebhookNotifierConfig,
)
from edgeagent.kernel.errors import ConfigError, UplinkError

log = logging.getLogger(__name__)

Now = Callable[[], datetime]
AnyNotifierConfig = MqttNotifierConfig | WebhookNotifierConfig | SmsNotifierConfig


def _utcnow() -> datetime:
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


# --- MQTT ---------------------------------------------------------------------------------------------

class Publish(Protocol):
    """How the MQTT notifier reaches the local broker; :meth:`MqttSession.publish
    <edgeagent.transport.mqtt.MqttSession.publish>` fits. It raises UplinkError (or OSError) when it cannot."""

    def __call__(self, topic: str, payload: bytes, qos: int = ..., retain: bool = ...) -> Awaitable[None]: ...


class MqttNotifier:
    """Publishes the alarm JSON to ``cfg.topic`` (``{target}`` filled in) on the box's own broker, which
    works with the internet down. The owner of the broker connection reconnects; while it is down,
    ``publish`` raises and the send fails transiently."""

    concurrency: ClassVar[int] = 8

    def __init__(self, publish: Publish, cfg: MqttNotifierConfig, *, name: str = "mqtt", now: Now = _utcnow) -> None:
        self._publish = publish
        self._cfg = cfg
        self.name = name
        self._now = now

    async def send(self, target: str, message: Message) -> None:
        if target not in self._cfg.targets:
            raise NotifyError(target, f"{self.name}: does not serve this target", permanent=True)
        topic = self._cfg.topic_for(target)
        body = payload(target, message, self._now())
        try:
            async with asyncio.timeout(self._cfg.timeout_s):
                await self._publish(topic, body, qos=self._cfg.qos, retain=self._cfg.retain)
        except TimeoutError as exc:
            raise NotifyError(target, f"{self.name}: no acknowledgement for {topic!r} within "
                                      f"{self._cfg.timeout_s:g} s") from exc
        except (UplinkError, OSError) as exc:
            raise NotifyError(target, f"{self.name}: publish to {topic!r} failed: {exc}") from exc
        log.debug("%s: published alarm %s (%s) to %s", self.name, message.alarm_id, message.kind, topic)


# --- webhook ------------------------------------------------------------------------------------------

SIGNATURE_HEADER: Final = "X-Edgeagent-Signature"
_RETRYABLE_4XX: Final = frozenset({408, 425, 429})


def signature(key: bytes, body: bytes) -> str:
    """The value of the ``X-Edgeagent-Signature`` header: ``sha256=`` and the hex HMAC-SHA256 of the body.
    A receiver recomputes it over the raw body it got and compares with :func:`hmac.compare_digest`."""
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


class WebhookNotifier:
    """POSTs the alarm JSON. 2xx: delivered. 408/425/429, 5xx, timeouts and connection errors: transient.
    Any other answer (4xx, and 3xx since redirects are not followed) and TLS verification failures:
    permanent. Secrets are resolved here, at construction, so a missing one fails at start-up.
    One :class:`aiohttp.ClientSession`, made on first use; :meth:`aclose` closes it."""

    concurrency: ClassVar[int] = 4

    def __init__(self, cfg: WebhookNotifierConfig, *, name: str = "webhook",
                 environ: Mapping[str, str] | None = None, now: Now = _utcnow) -> None:
        self._cfg = cfg
        self.name = name
        self._now = now
        self._key = cfg.secret.resolve(environ).get_secret_value().encode() if cfg.secret is not None else None
        self._authorization = (cfg.authorization.resolve(environ).get_secret_value()
                               if cfg.authorization is not None else None)
        parts = urlsplit(cfg.url)
        self._where = f"{parts.scheme}://{parts.netloc}{parts.path}"  # no query: it may hold a token
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._cfg.timeout_s))
        return self._session

    async def send(self, target: str, message: Message) -> None:
        if target not in self._cfg.targets:
            raise NotifyError(target, f"{self.name}: does not serve this target", permanent=True)
        body = payload(target, message, self._now())
        headers = dict(self._cfg.headers)
        headers["Content-Type"] = "application/json"
        if self._key is not None:
            headers[SIGNATURE_HEADER] = signature(self._key, body)
        if self._authorization is not None:
            headers["Authorization"] = self._authorization
        try:
            async with self._client().post(self._cfg.url, data=body, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                await resp.read()  # let the connection be reused
        except TimeoutError as exc:
            raise NotifyError(target, f"{self.name}: no answer from {self._where} within "
                                      f"{self._cfg.timeout_s:g} s") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise NotifyError(target, f"{self.name}: TLS certificate of {self._where} not trusted: "
                                      f"{exc.certificate_error}", permanent=True) from exc
        except aiohttp.ClientError as exc:
            raise NotifyError(target, f"{self.name}: POST {self._where} failed: "
                                      f"{exc.__class__.__name__}: {exc}") from exc
        if 200 <= status < 300:
            log.debug("%s: alarm %s (%s) to %s: HTTP %d", self.name, message.alarm_id, message.kind, target, status)
            return
        if status >= 500 or status in _RETRYABLE_4XX:
            raise NotifyError(target, f"{self.name}: {self._where} answered HTTP {status}")
        hint = " (redirects are not followed: fix the URL)" if 300 <= status < 400 else ""
        raise NotifyError(target, f"{self.name}: {self._where} refused it with HTTP {status}{hint}", permanent=True)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- SMS over AT commands -----------------------------------------------------------------------------

CTRL_Z: Final = b"\x1a"
ESC: Final = b"\x1b"
UCS2_MAX_CHARS: Final = 70
_GSM_EXTENSION: Final = frozenset("[]{}~^|\\")  # two septets each in GSM 03.38 (escape + character)
_COMMAND_TIMEOUT_S: Final = 5.0
_READ_SLICE_S: Final = 0.05  # how often a blocked read looks at the abort flag
_WRITE_TIMEOUT_S: Final = 2.0

# +CMS ERROR codes (3GPP TS 27.005 3.2.5, TS 24.011 cause values) that retrying cannot fix: the network or
# the SMSC rejects this destination, or the SIM/modem setup is wrong. Anything else is retried.
CMS_PERMANENT: Final[dict[int, str]] = {
    1: "unassigned number",
    8: "operator determined barring",
    10: "call barred",
    21: "short message transfer rejected",
    28: "unidentified subscriber",
    29: "facility rejected",
    30: "unknown subscriber",
    50: "requested facility not subscribed",
    96: "invalid mandatory information",
    304: "invalid PDU mode parameter",
    305: "invalid text mode parameter",
    310: "SIM not inserted",
    311: "SIM PIN required",
    312: "PH-SIM PIN required",
    313: "SIM failure",
    315: "SIM wrong",
    316: "SIM PUK required",
    330: "SMSC address unknown",
}
CMS_TRANSIENT: Final[dict[int, str]] = {
    27: "destination out of service",
    38: "network out of order",
    41: "temporary failure",
    42: "congestion",
    47: "resources unavailable",
    314: "SIM busy",
    331: "no network service",
    332: "network timeout",
}
# +CME ERROR codes (TS 27.007 9.2.1) around the SIM: only "SIM busy" is worth another try.
_CME_TRANSIENT: Final = frozenset({14})


@dataclass(frozen=True, slots=True)
class SmsText:
    """One SMS, ready for text mode: the character set, the data coding scheme for ``AT+CSMP`` and the
    bytes typed after the ``>`` prompt (without the closing Ctrl-Z)."""

    charset: Literal["IRA", "UCS2"]
    dcs: int
    body: bytes
    chars: int

    def address(self, number: str) -> str:
        """The number as ``AT+CMGS`` wants it: in UCS2 mode string parameters are hex UCS2 too."""
        return _ucs2_hex(number) if self.charset == "UCS2" else number


def _ucs2_hex(text: str) -> str:
    return text.encode("utf-16-be").hex().upper()


def _septets(text: str) -> int:
    return sum(2 if c in _GSM_EXTENSION else 1 for c in text)


def encode_sms(text: str, max_chars: int = 160) -> SmsText:
    """Fit ``text`` into one text-mode SMS (pure).

    Control characters other than line feeds become spaces (Ctrl-Z would end the message, ESC cancel it).
    Plain ASCII goes as GSM 7-bit through the IRA character set: at most ``max_chars`` septets, where
    ``[]{}~^|\\`` count two; a backquote, which GSM lacks, becomes an apostrophe. Anything else goes as UCS2,
    at most ``min(max_chars, 70)`` UTF-16 units. Too long: cut, ending in "..." (GSM) or "…" (UCS2).
    """
    text = text.replace("\r\n", "\n").replace("…", "...")
    text = "".join(c if c == "\n" or (ord(c) >= 0x20 and ord(c) != 0x7F) else " " for c in text)
    if text.isascii():
        text = text.replace("`", "'")
        if _septets(text) > max_chars:
            cut = text[:max_chars]
            while cut and _septets(cut.rstrip()) + 3 > max_chars:
                cut = cut[:-1]
            text = cut.rstrip() + "..."
        return SmsText("IRA", 0, text.encode("ascii"), len(text))
    limit = min(max_chars, UCS2_MAX_CHARS)
    units = len(text.encode("utf-16-be")) // 2
    if units > limit:
        cut = text[:limit]
        while cut and len(cut.rstrip().encode("utf-16-be")) // 2 + 1 > limit:
            cut = cut[:-1]
        text = cut.rstrip() + "…"
        units = len(text.encode("utf-16-be")) // 2
    return SmsText("UCS2", 8, _ucs2_hex(text).encode("ascii"), units)


class _Port(Protocol):
    """The part of :class:`serial.Serial` the AT link uses."""

    timeout: float | None

    @property
    def in_waiting(self) -> int: ...
    def read(self, size: int = 1) -> bytes: ...
    def write(self, data: bytes) -> int | None: ...
    def flush(self) -> None: ...
    def reset_input_buffer(self) -> None: ...


class _AtFailure(Exception):
    """The modem answered a command with ERROR, +CMS ERROR or +CME ERROR."""

    def __init__(self, command: str, line: str) -> None:
        super().__init__(line)
        self.command = command
        self.line = line


class _AtSilence(Exception):
    """No final answer in time."""

    def __init__(self, command: str, waited_s: float) -> None:
        super().__init__(command)
        self.command = command
        self.waited_s = waited_s


class _AtAborted(Exception):
    """The send was cancelled or the notifier closed while the dialogue ran."""


class _AtLink:
    """One AT dialogue on an open port (blocking: runs in a worker thread). Lines end in CR and/or LF;
    echoed commands and unsolicited result codes (RING, +CMTI: ...) between them are skipped."""

    def __init__(self, port: _Port, abort: Callable[[], bool]) -> None:
        self._port = port
        self._abort = abort
        self._buf = bytearray()
        # Set from AT+CMGS until Ctrl-Z: the modem may be taking text, which only ESC (or Ctrl-Z) ends.
        self.in_text_input = False

    def write(self, data: bytes) -> None:
        self._port.write(data)
        self._port.flush()

    def command(self, cmd: str, timeout_s: float, *, shown: str | None = None) -> list[str]:
        """Send ``cmd``; return the lines before OK, raise _AtFailure on an error result."""
        self.write(cmd.encode("ascii") + b"\r")
        return self.result(cmd, time.monotonic() + timeout_s, shown=shown or cmd)

    def result(self, echo: str | None, deadline: float, *, shown: str) -> list[str]:
        info: list[str] = []
        while True:
            line = self._line(deadline, shown)
            if line == echo:
                continue
            if line == "OK":
                return info
            if line == "ERROR" or line.startswith(("+CMS ERROR:", "+CME ERROR:")):
                raise _AtFailure(shown, line)
            info.append(line)

    def wait_prompt(self, deadline: float, *, shown: str) -> None:
        """Wait for the ``> `` prompt after AT+CMGS (it ends in no line break)."""
        while True:
            while bytes(self._buf[:1]) in (b"\r", b"\n"):
                del self._buf[:1]
            if self._buf.startswith(b">"):
                del self._buf[:1]
                return
            end = self._line_end()
            if end >= 0:
                line = self._take(end)
                if line == "ERROR" or line.startswith(("+CMS ERROR:", "+CME ERROR:")):
                    raise _AtFailure(shown, line)
                continue  # echo or an unsolicited result code
            self._fill(deadline, shown)

    def _line_end(self) -> int:
        ends = [i for i in (self._buf.find(b"\r"), self._buf.find(b"\n")) if i >= 0]
        return min(ends) if ends else -1

    def _take(self, end: int) -> str:
        raw = bytes(self._buf[:end])
        del self._buf[:end + 1]
        return raw.decode("ascii", "replace").strip()

    def _line(self, deadline: float, shown: str) -> str:
        while True:
            end = self._line_end()
            while end >= 0:
                line = self._take(end)
                if line:
                    return line
                end = self._line_end()
            self._fill(deadline, shown)

    def _fill(self, deadline: float, shown: str) -> None:
        if self._abort():
            raise _AtAborted
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _AtSilence(shown, 0.0)
        self._port.timeout = min(_READ_SLICE_S, remaining)
        self._buf += self._port.read(max(1, self._port.in_waiting))


class SmsModemNotifier:
    """SMS through a GSM/LTE modem's AT port, in text mode, one SMS at a time.

    The dialogue for one SMS (``cfg.timeout_s`` for the network's answer, at most 5 s for each other step)::

        AT                      → OK            (echo tolerated)
        ATE0                    → OK            (no echo from here on)
        AT+CPIN?                → +CPIN: READY  (SIM PIN: AT+CPIN="<pin>" → OK, only if 'pin' is set and
                                                 no PIN was rejected since start; anything else: permanent)
        AT+CMGF=1               → OK            (text mode)
        AT+CSCS="IRA"|"UCS2"    → OK            (see :func:`encode_sms`)
        AT+CSMP=17,167,0,0|8    → OK            (SMS-SUBMIT, validity 24 h, data coding 7-bit or UCS2)
        AT+CMGS="<number>"      → "> "          (the number hex-encoded in UCS2 mode)
        <text> Ctrl-Z           → +CMGS: <ref>, OK

    ``+CMS ERROR`` codes in :data:`CMS_PERMANENT` (a number the network rejects, no SIM, no SMSC) are
    permanent; other errors, silence and a port that will not open are transient. When it stops waiting
    between AT+CMGS and Ctrl-Z (timeout, cancellation) it sends ESC so the modem leaves text input. Silence
    after Ctrl-Z is transient too, though the network may still deliver that SMS: a retry can then send it
    twice (at least once, never lost).

    The port is opened for each SMS and closed after it, exclusively (pyserial's ``exclusive``, a flock),
    so no other program talks over the dialogue: a USB modem that re-enumerated, or a modem left in an odd
    state, is met afresh by the next SMS, and nothing holds the device between alarms. Opening costs a
    few milliseconds. The blocking dialogue runs
    in a worker thread; an :class:`asyncio.Lock` queues sends without tying up threads, a thread lock keeps
    the port to one dialogue even when a cancelled send's thread is still winding down (it checks an abort
    flag every 50 ms).
    """

    concurrency: ClassVar[int] = 1

    def __init__(self, cfg: SmsNotifierConfig, *, name: str = "sms",
                 environ: Mapping[str, str] | None = None) -> None:
        self._cfg = cfg
        self.name = name
        self._pin = cfg.pin.resolve(environ).get_secret_value() if cfg.pin is not None else None
        self._pin_rejected = False
        self._lock = asyncio.Lock()
        self._port_lock = threading.Lock()
        self._closed = threading.Event()
        self.sent = 0

    async def send(self, target: str, message: Message) -> None:
        number = self._cfg.numbers.get(target)
        if number is None:
            raise NotifyError(target, f"{self.name}: no phone number for this target", permanent=True)
        if self._closed.is_set():
            raise NotifyError(target, f"{self.name}: closed")
        sms = encode_sms(message.plain(), self._cfg.max_chars)
        async with self._lock:
            abort = threading.Event()
            try:
                ref = await asyncio.to_thread(self._send_blocking, target, number, sms, abort)
            except asyncio.CancelledError:
                abort.set()  # the worker thread stops within one read slice
                raise
        self.sent += 1
        log.info("%s: SMS for alarm %s (%s) sent to %s (target %s, %s, %d chars, ref %s)", self.name,
                 message.alarm_id, message.kind, mask_number(number), target, sms.charset, sms.chars, ref)

    def _send_blocking(self, target: str, number: str, sms: SmsText, abort: threading.Event) -> str:
        masked = mask_number(number)
        with self._port_lock:
            if self._closed.is_set() or abort.is_set():
                raise NotifyError(target, f"{self.name}: cancelled before the modem was opened")
            try:
                port = serial.Serial(self._cfg.serial_port, self._cfg.baudrate, timeout=_READ_SLICE_S,
                                     write_timeout=_WRITE_TIMEOUT_S, exclusive=True)
            except (serial.SerialException, OSError) as exc:
                raise NotifyError(target, f"{self.name}: cannot open {self._cfg.serial_port}: {exc}") from exc
            link = _AtLink(port, lambda: abort.is_set() or self._closed.is_set())
            try:
                port.reset_input_buffer()  # unsolicited result codes since the last SMS
                return self._dialogue(link, target, number, sms)
            except _AtSilence as exc:
                raise NotifyError(target, f"{self.name}: the modem did not answer {exc.command} in time "
                                          f"(SMS to {masked})") from exc
            except _AtAborted as exc:
                raise NotifyError(target, f"{self.name}: SMS to {masked} abandoned (cancelled or closing)") from exc
            except _AtFailure as exc:
                raise self._refusal(target, masked, exc) from exc
            except (serial.SerialException, OSError) as exc:
                raise NotifyError(target, f"{self.name}: serial I/O on {self._cfg.serial_port} failed: "
                                          f"{exc}") from exc
            finally:
                if link.in_text_input:
                    with contextlib.suppress(serial.SerialException, OSError):
                        link.write(ESC)  # leave text input, so the next AT is not typed into an SMS
                with contextlib.suppress(serial.SerialException, OSError):
                    port.close()

    def _dialogue(self, link: _AtLink, target: str, number: str, sms: SmsText) -> str:
        step_s = min(_COMMAND_TIMEOUT_S, self._cfg.timeout_s)
        link.command("AT", step_s)
        link.command("ATE0", step_s)
        self._unlock(link, target, step_s)
        link.command("AT+CMGF=1", step_s)
        link.command(f'AT+CSCS="{sms.charset}"', step_s)
        link.command(f"AT+CSMP=17,167,0,{sms.dcs}", step_s)
        cmgs = f'AT+CMGS="{sms.address(number)}"'
        shown = f'AT+CMGS="{mask_number(number)}"'
        log.debug("%s: %s", self.name, shown)
        link.in_text_input = True
        link.write(cmgs.encode("ascii") + b"\r")
        link.wait_prompt(time.monotonic() + step_s, shown=shown)
        link.write(sms.body + CTRL_Z)
        link.in_text_input = False
        info = link.result(None, time.monotonic() + self._cfg.timeout_s, shown="the SMS text")
        refs = [line.split(":", 1)[1].strip() for line in info if line.startswith("+CMGS:")]
        if not refs:
            raise NotifyError(target, f"{self.name}: the modem said OK but gave no +CMGS reference "
                                      f"(SMS to {mask_number(number)})")
        return refs[0]

    def _unlock(self, link: _AtLink, target: str, step_s: float) -> None:
        try:
            lines = link.command("AT+CPIN?", step_s)
        except _AtFailure as exc:
            transient = _error_code(exc.line) in _CME_TRANSIENT
            raise NotifyError(target, f"{self.name}: SIM not usable: {exc.line}", permanent=not transient) from exc
        state = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("+CPIN:")), "")
        if state == "READY":
            return
        if state != "SIM PIN":
            raise NotifyError(target, f"{self.name}: SIM not ready ({state or 'no +CPIN answer'}); "
                                      "it needs attention on site", permanent=True)
        if self._pin is None:
            raise NotifyError(target, f"{self.name}: the SIM asks for a PIN; set 'pin' in the config",
                              permanent=True)
        if self._pin_rejected:
            raise NotifyError(target, f"{self.name}: the SIM PIN was rejected before; not entering it again "
                                      "(fix 'pin' and restart)", permanent=True)
        try:
            link.command(f'AT+CPIN="{self._pin}"', step_s, shown='AT+CPIN="****"')
        except _AtFailure as exc:
            self._pin_rejected = True  # three wrong tries lock the SIM (PUK): never try again on our own
            raise NotifyError(target, f"{self.name}: the SIM rejected the PIN ({exc.line})", permanent=True) from exc
        log.info("%s: SIM PIN entered", self.name)

    def _refusal(self, target: str, masked: str, exc: _AtFailure) -> NotifyError:
        code = _error_code(exc.line)
        if exc.line.startswith("+CMS ERROR:") and code is not None:
            if code in CMS_PERMANENT:
                return NotifyError(target, f"{self.name}: SMS to {masked} refused: {exc.line} "
                                           f"({CMS_PERMANENT[code]})", permanent=True)
            meaning = f" ({CMS_TRANSIENT[code]})" if code in CMS_TRANSIENT else ""
            return NotifyError(target, f"{self.name}: SMS to {masked} failed: {exc.line}{meaning}")
        return NotifyError(target, f"{self.name}: {exc.command} failed: {exc.line} (SMS to {masked})")

    async def aclose(self) -> None:
        """Stop: a dialogue still running gives up within one read slice; waits (2 s at most) for it."""
        self._closed.set()
        await asyncio.to_thread(self._wait_idle, 2.0)

    def _wait_idle(self, timeout_s: float) -> None:
        if self._port_lock.acquire(timeout=timeout_s):
            self._port_lock.release()


def _error_code(line: str) -> int | None:
    _, _, rest = line.partition(":")
    rest = rest.strip()
    return int(rest) if rest.isdigit() else None


# --- the hub ------------------------------------------------------------------------------------------

@runtime_checkable
class _Closeable(Protocol):
    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one delivery (one notifier, one target, one message) ended."""

    notifier: str
    target: str
    alarm_id: str
    kind: MessageKind
    result: Literal["delivered", "failed", "dropped"]
    attempts: int
    error: NotifyError | None = None


@dataclass(slots=True)
class HubStats:
    deliveries: int = 0       # (notifier, target) pairs handed to the hub
    delivered: int = 0
    failed: int = 0           # gave up: a permanent error, or the tries used up
    retries: int = 0
    dropped_repeats: int = 0  # overflow policy
    over_bound: int = 0       # new/escalated admitted beyond max_pending
    unrouted: int = 0         # targets no notifier serves


@dataclass(slots=True)
class _Lane:
    notifier: Notifier
    slots: asyncio.Semaphore


@dataclass(eq=False, slots=True)
class _Delivery:
    notifier: str
    target: str
    message: Message
    attempts: int = 0
    sending: bool = False
    finished: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class NotifierHub:
    """Routes messages to the notifiers serving each target, each delivery in its own task, with retries
    and a bounded number of pending deliveries (see the module docstring for the policy).

    ``async with NotifierHub.from_config(section, publish=...) as hub: hub.notify(targets, message)``.
    On leaving, deliveries get ``drain_s`` to finish, the rest are cancelled, then notifiers are closed.
    ``on_outcome`` is called on the event loop for every delivery that ends (delivered, failed, dropped).
    """

    def __init__(self, *, max_pending: int = 64, attempts: int = 3, retry_base_s: float = 5.0,
                 retry_window_s: float = 60.0, drain_s: float = 5.0,
                 on_outcome: Callable[[Outcome], None] | None = None, rng: random.Random | None = None) -> None:
        if max_pending < 1 or attempts < 1:
            raise ValueError("max_pending and attempts must be at least 1")
        self._max_pending = max_pending
        self._attempts = attempts
        self._retry_base_s = retry_base_s
        self._retry_window_s = retry_window_s
        self._drain_s = drain_s
        self._on_outcome = on_outcome
        self._rng = rng or random.Random()
        self._lanes: dict[str, _Lane] = {}
        self._routes: dict[str, list[str]] = {}
        self._pending: dict[_Delivery, None] = {}  # insertion-ordered: oldest first
        self._closed = False
        self.stats = HubStats()

    @classmethod
    def from_config(cls, section: Mapping[str, AnyNotifierConfig], *, publish: Publish | None = None,
                    environ: Mapping[str, str] | None = None, **hub_options: Any) -> NotifierHub:
        """Build every notifier of the ``notifiers`` section (:data:`NOTIFIER_TYPES`) and route its targets.
        ``publish`` reaches the local broker (needed only with an mqtt notifier); secrets are resolved now,
        so a missing one raises :class:`~edgeagent.kernel.errors.SecretError` before anything runs."""
        hub = cls(**hub_options)
        for name, cfg in section.items():
            build = NOTIFIER_TYPES[cfg.type]
            notifier, concurrency = build(name, cfg, publish, environ)
            hub.add(name, notifier, cfg.served_targets, concurrency=concurrency)
        return hub

    def add(self, name: str, notifier: Notifier, targets: Iterable[str], *, concurrency: int = 1) -> None:
        """Register ``notifier`` for ``targets``; at most ``concurrency`` of its sends run at once."""
        if name in self._lanes:
            raise ValueError(f"notifier {name!r} is added twice")
        self._lanes[name] = _Lane(notifier, asyncio.Semaphore(concurrency))
        for target in targets:
            self._routes.setdefault(target, []).append(name)

    @property
    def targets(self) -> dict[str, tuple[str, ...]]:
        return {t: tuple(n) for t, n in self._routes.items()}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def notify(self, targets: Iterable[str], message: Message) -> int:
        """Start delivering ``message`` to every notifier serving each target; returns at once with the number
        of deliveries started. Call on the event loop. Raises NotifyError once the hub is closed."""
        if self._closed:
            raise NotifyError(",".join(targets), "the notifier hub is closed")
        loop = asyncio.get_running_loop()
        started = 0
        for target in dict.fromkeys(targets):
            names = self._routes.get(target)
            if not names:
                self.stats.unrouted += 1
                log.error("notify: no notifier serves target %r (alarm %s); check the notifiers section",
                          target, message.alarm_id)
                continue
            for name in names:
                d = _Delivery(name, target, message)
                self.stats.deliveries += 1
                if not self._admit(d):
                    continue
                d.task = loop.create_task(self._run(d), name=f"notify:{name}:{target}:{message.alarm_id}")
                started += 1
        return started

    def _admit(self, d: _Delivery) -> bool:
        if len(self._pending) < self._max_pending:
            self._pending[d] = None
            return True
        victim = next((x for x in self._pending if x.message.kind == "repeat" and not x.sending), None)
        if victim is not None:
            self._drop(victim)
            self._pending[d] = None
            return True
        if d.message.kind == "repeat":
            self._drop(d)
            return False
        self.stats.over_bound += 1
        log.warning("notify %s → %s: %d deliveries pending; admitting %s alarm %s beyond the bound",
                    d.notifier, d.target, len(self._pending), d.message.kind, d.message.alarm_id)
        self._pending[d] = None
        return True

    def _drop(self, d: _Delivery) -> None:
        self._pending.pop(d, None)
        d.finished = True
        if d.task is not None:
            d.task.cancel()
        self.stats.dropped_repeats += 1
        log.info("notify %s → %s: repeat for alarm %s dropped (%d deliveries pending)",
                 d.notifier, d.target, d.message.alarm_id, len(self._pending))
        self._report(d, "dropped", None)

    async def _run(self, d: _Delivery) -> None:
        lane = self._lanes[d.notifier]
        loop = asyncio.get_running_loop()
        first = loop.time()
        try:
            while True:
                error: NotifyError | None = None
                async with lane.slots:
                    d.sending = True
                    d.attempts += 1
                    try:
                        await lane.notifier.send(d.target, d.message)
                    except NotifyError as exc:
                        error = exc
                    except Exception as exc:  # a faulty notifier must not take the alarm path down
                        log.exception("notify %s → %s: unexpected error", d.notifier, d.target)
                        error = NotifyError(d.target, f"{d.notifier}: unexpected {exc.__class__.__name__}: {exc}")
                        error.__cause__ = exc
                    finally:
                        d.sending = False
                if error is None:
                    self.stats.delivered += 1
                    log.info("notify %s → %s: alarm %s (%s) delivered%s", d.notifier, d.target, d.message.alarm_id,
                             d.message.kind, f" on try {d.attempts}" if d.attempts > 1 else "")
                    self._finish(d, "delivered", None)
                    return
                delay = self._retry_base_s * 2 ** (d.attempts - 1) * self._rng.uniform(0.5, 1.0)
                give_up = (error.permanent or d.attempts >= self._attempts
                           or loop.time() + delay - first > self._retry_window_s)
                if give_up:
                    self.stats.failed += 1
                    why = "permanent" if error.permanent else f"gave up after {d.attempts} tries"
                    log.error("notify %s → %s: alarm %s (%s) not delivered (%s): %s", d.notifier, d.target,
                              d.message.alarm_id, d.message.kind, why, error.reason)
                    self._finish(d, "failed", error)
                    return
                self.stats.retries += 1
                log.warning("notify %s → %s: try %d failed, again in %.1f s: %s", d.notifier, d.target,
                            d.attempts, delay, error.reason)
                await asyncio.sleep(delay)
        finally:
            self._pending.pop(d, None)

    def _finish(self, d: _Delivery, result: Literal["delivered", "failed"], error: NotifyError | None) -> None:
        if d.finished:
            return
        d.finished = True
        self._pending.pop(d, None)
        self._report(d, result, error)

    def _report(self, d: _Delivery, result: Literal["delivered", "failed", "dropped"],
                error: NotifyError | None) -> None:
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(Outcome(d.notifier, d.target, d.message.alarm_id, d.message.kind, result,
                                     d.attempts, error))
        except Exception:  # an observer's bug must not stop deliveries
            log.exception("notify: on_outcome callback failed")

    def snapshot(self) -> dict[str, Any]:
        """Counters and queue depths for ``diagnose`` and metrics (no message content)."""
        per_notifier: dict[str, int] = dict.fromkeys(self._lanes, 0)
        for d in self._pending:
            per_notifier[d.notifier] += 1
        return {"stats": asdict(self.stats), "pending": len(self._pending), "pending_by_notifier": per_notifier,
                "targets": self.targets}

    async def __aenter__(self) -> NotifierHub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop intake, give pending deliveries ``drain_s`` to finish, cancel the rest, close the notifiers."""
        if self._closed:
            return
        self._closed = True
        tasks = [d.task for d in self._pending if d.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._drain_s)
            for task in late:
                task.cancel()
            if late:
                log.warning("notify: %d deliveries still pending at shutdown were cancelled", len(late))
                await asyncio.gather(*late, return_exceptions=True)
        for lane in self._lanes.values():
            if isinstance(lane.notifier, _Closeable):
                await lane.notifier.aclose()


# --- registry -----------------------------------------------------------------------------------------

Builder = Callable[[str, Any, Publish | None, Mapping[str, str] | None], tuple[Notifier, int]]


def _build_mqtt(name: str, cfg: MqttNotifierConfig, publish: Publish | None,
                _environ: Mapping[str, str] | None) -> tuple[Notifier, int]:
    if publish is None:
        raise ConfigError(f"notifiers.{name}: an mqtt notifier needs the local broker, and none is configured")
    return MqttNotifier(publish, cfg, name=name), MqttNotifier.concurrency


def _build_webhook(name: str, cfg: WebhookNotifierConfig, _publish: Publish | None,
                   environ: Mapping[str, str] | None) -> tuple[Notifier, int]:
    return WebhookNotifier(cfg, name=name, environ=environ), WebhookNotifier.concurrency


def _build_sms(name: str, cfg: SmsNotifierConfig, _publish: Publish | None,
               environ: Mapping[str, str] | None) -> tuple[Notifier, int]:
    return SmsModemNotifier(cfg, name=name, environ=environ), SmsModemNotifier.concurrency


NOTIFIER_TYPES: Final[dict[str, Builder]] = {
    "mqtt": _build_mqtt,
    "webhook": _build_webhook,
    "sms": _build_sms,
}
