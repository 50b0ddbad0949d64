"""The SMS notifier: an SMS through a GSM/LTE modem spoken to with AT commands on a serial port (text mode,
one SMS per message). A phone number is logged only by its last 4 digits, a message body never at info level."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final, Literal, Protocol

import serial  # type: ignore[import-untyped]  # pyserial ships no type hints

from edgeagent.drivers.notifiers.common import mask_number
from edgeagent.kernel.alarms.notify import Message, NotifyError
from edgeagent.kernel.alarms.notify_config import SmsNotifierConfig

log = logging.getLogger(__name__)

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

