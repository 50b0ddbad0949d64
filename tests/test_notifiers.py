"""Alarm notifiers against real peers: an HTTP server on loopback (webhook), a fake GSM modem on a socat
pty pair (SMS over AT commands), a private mosquitto (guard-room topic); and the hub's fan-out, retries
and bounded pending deliveries."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import serial  # type: ignore[import-untyped]  # pyserial ships no type hints
from aiohttp import web
from pydantic import TypeAdapter, ValidationError
from ruamel.yaml import YAML

import edgeagent.kernel.alarms.notify_config as notify_config
from edgeagent.drivers.notifiers import (
    SIGNATURE_HEADER,
    MqttNotifier,
    NotifierHub,
    Outcome,
    SmsModemNotifier,
    WebhookNotifier,
    encode_sms,
    key_id_of,
    mask_number,
    signature,
    verify_signature,
)
from edgeagent.kernel.alarms.engine import MessageKind
from edgeagent.kernel.alarms.notify import Message, NotifyError
from edgeagent.kernel.alarms.notify_config import (
    MqttNotifierConfig,
    NotifiersSection,
    SmsNotifierConfig,
    WebhookNotifierConfig,
    routes,
    unserved,
)
from edgeagent.kernel.config.schema import SecretRef
from edgeagent.kernel.errors import ConfigError, SecretError
from edgeagent.transport.mqtt import MqttSession, SessionParams
from tests.peers import Collector, Mosquitto, free_port

SECTION = TypeAdapter(NotifiersSection)
NUMBER = "+8613800138000"


def message(kind: MessageKind = "new", alarm_id: str = "A1", *, text: str | None = None,
            title: str | None = None) -> Message:
    return Message(
        title=title or "ALARM [critical]: Fall detected, resident r-7",
        text=text or ("Fall detected: resident r-7, wristband wb-7.\nRaised 2026-05-01 08:00:00 UTC, "
                      "not acknowledged for 0 s.\nLevel 0 (guard_room).\nAcknowledge: edgeagent alarms ack A1"),
        alarm_id=alarm_id, level=0, level_name="guard_room", kind=kind, severity="critical")


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# --- config -------------------------------------------------------------------------------------------

def test_the_docstring_example_is_a_valid_section() -> None:
    doc = notify_config.__doc__ or ""
    block = doc.split("::\n", 1)[1].split("\n\n", 1)[0]
    loaded = YAML(typ="safe").load("\n".join(line[4:] for line in block.splitlines()))
    section = SECTION.validate_python(loaded["notifiers"])
    assert isinstance(section["guard_room_panel"], MqttNotifierConfig)
    assert isinstance(section["property_office"], WebhookNotifierConfig)
    assert isinstance(section["gsm_modem"], SmsNotifierConfig)
    assert routes(section) == {"guard_room": ("guard_room_panel", "property_office"),
                               "grid_worker": ("property_office", "gsm_modem"), "family_li": ("gsm_modem",)}
    assert unserved(section, ["guard_room", "grid_worker", "family", "guard_room"]) == ["family"]
    assert section["guard_room_panel"].topic_for("guard_room") == "compound/guard-room/alarms/guard_room"


@pytest.mark.parametrize(("entry", "fragment"), [
    ({"type": "mqtt", "topic": "a/{room}", "targets": ["g"]}, "may only use '{target}'"),
    ({"type": "mqtt", "topic": "a/#", "targets": ["g"]}, "no wildcards"),
    ({"type": "mqtt", "topic": "a/{target}", "targets": ["g", "g"]}, "target listed twice"),
    ({"type": "mqtt", "topic": "a/{target}", "targets": []}, "at least 1"),
    ({"type": "webhook", "url": "ftp://x/y", "targets": ["g"]}, "is not an http:// or https:// URL"),
    ({"type": "webhook", "url": "https://u:p@x/y", "targets": ["g"]}, "put no credentials in the URL"),
    ({"type": "webhook", "url": "https://x/y", "targets": ["g"], "secret": "hunter2"}, "may not be written"),
    ({"type": "webhook", "url": "https://x/y", "targets": ["g"], "headers": {"Authorization": "Bearer x"}},
     "carries a secret"),
    ({"type": "webhook", "url": "https://x/y", "targets": ["g"], "headers": {"X-A": "b\r\nX-B: c"}}, "line breaks"),
    ({"type": "sms", "serial_port": "/dev/ttyUSB2", "numbers": {"g": "13800138000"}}, "should match pattern"),
    ({"type": "sms", "serial_port": "/dev/ttyUSB2", "numbers": {"g": NUMBER}, "targets": ["g"]},
     "serves the targets under 'numbers'"),
    ({"type": "sms", "serial_port": "/dev/ttyUSB2", "numbers": {"g": NUMBER}, "pin": 1234}, "may not be written"),
    ({"type": "sms", "serial_port": "/dev/ttyUSB2", "numbers": {"g": NUMBER}, "max_chars": 300}, "160"),
    ({"type": "pager", "targets": ["g"]}, "does not match any of the expected tags"),
])
def test_bad_notifier_config_is_refused(entry: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(fragment)):
        SECTION.validate_python({"n1": entry})


# --- webhook ------------------------------------------------------------------------------------------

@dataclass
class Hook:
    """A webhook receiver on loopback that checks the HMAC signature itself, with a script of answers:
    an int is a status, a float is a delay (in seconds) before answering 200."""

    key: bytes | None = None
    key_id: str = "webhook-hmac"
    script: list[int | float] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes, str]] = field(default_factory=list)
    url: str = ""
    tolerance_s: float = 300.0
    seen: set[str] = field(default_factory=set)
    refusals: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body, request.query_string))
        if self.key is not None:
            why = self.refuse(request.headers.get(SIGNATURE_HEADER, ""), body)
            if why:
                self.refusals.append(why)
                return web.Response(status=401, text=why)
        action = self.script.pop(0) if self.script else 200
        if isinstance(action, float):
            await asyncio.sleep(action)
            action = 200
        if 300 <= action < 400:
            return web.Response(status=action, headers={"Location": "http://127.0.0.1:1/elsewhere"})
        return web.Response(status=action, text="thanks")

    def refuse(self, header: str, body: bytes) -> str | None:
        """The receiver's checks, written from the documented header format (not the product's helper):
        ``t=<unix s>,kid=<key id>,v1=<hex HMAC-SHA256 over "<t>." + body>``."""
        fields = dict(part.partition("=")[::2] for part in header.split(","))
        if set(fields) != {"t", "kid", "v1"} or not fields["t"].isdigit():
            return "bad signature header"
        if fields["kid"] != self.key_id:
            return "unknown key id"
        assert self.key is not None
        want = hmac.new(self.key, fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(fields["v1"], want):
            return "bad signature"
        if abs(time.time() - int(fields["t"])) > self.tolerance_s:
            return "stale"
        if fields["v1"] in self.seen:
            return "replayed"
        self.seen.add(fields["v1"])
        return None


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    h = Hook()
    app = web.Application()
    app.router.add_post("/hooks/alarm", h.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    h.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/alarm?token=abc123"
    yield h
    await runner.cleanup()


def webhook_cfg(url: str, **kw: Any) -> WebhookNotifierConfig:
    return WebhookNotifierConfig.model_validate({"type": "webhook", "url": url,
                                                 "targets": ["guard_room", "grid_worker"], **kw})


@pytest.fixture
def hmac_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook-hmac"
    path.write_text("s3cret-key\n")
    return path


async def test_webhook_posts_signed_json(hook: Hook, hmac_file: Path) -> None:
    hook.key = b"s3cret-key"
    cfg = webhook_cfg(hook.url, secret={"file": str(hmac_file)}, headers={"X-Compound": "c-7"})
    n = WebhookNotifier(cfg, name="office")
    try:
        await n.send("grid_worker", message("escalated", "A9"))
    finally:
        await n.aclose()
    assert len(hook.requests) == 1
    headers, body, query = hook.requests[0]
    assert query == "token=abc123"
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Compound"] == "c-7"
    t = orjson.loads(body)["at"]
    header = headers[SIGNATURE_HEADER]
    assert header.startswith("t=") and ",kid=webhook-hmac,v1=" in header
    assert abs(int(header[2:header.index(",")]) - time.time()) < 60
    assert t.endswith("Z") and not hook.refusals
    doc = orjson.loads(body)
    assert doc["alarm_id"] == "A9"
    assert doc["kind"] == "escalated"
    assert doc["target"] == "grid_worker"
    assert doc["severity"] == "critical"
    assert (doc["level"], doc["level_name"]) == (0, "guard_room")
    assert doc["title"].startswith("ALARM [critical]")
    assert "wristband wb-7" in doc["text"]
    assert doc["at"].endswith("Z")


async def test_webhook_signature_lets_the_receiver_refuse_stale_and_replayed_calls(hook: Hook) -> None:
    """The signature carries its time and key id (issue 8 item 4; before: ``sha256=<hex>`` over the body
    alone, so a captured call verified for ever)."""
    import aiohttp

    hook.key = b"k-2026-0123456789"
    hook.key_id = "HOOK_KEY_2026"  # the key id is the name of the secret reference
    cfg = webhook_cfg(hook.url, secret={"env": "HOOK_KEY_2026"})
    environ = {"HOOK_KEY_2026": "k-2026-0123456789"}
    n = WebhookNotifier(cfg, environ=environ)
    late = WebhookNotifier(cfg, environ=environ, now=lambda: datetime.now(UTC) - timedelta(minutes=10))
    try:
        await n.send("guard_room", message())
        assert not hook.refusals
        with pytest.raises(NotifyError, match="HTTP 401"):
            await late.send("guard_room", message())
        assert hook.refusals == ["stale"]
    finally:
        await n.aclose()
        await late.aclose()
    # A captured call sent again, byte for byte, is a replay.
    headers, body, _ = hook.requests[0]
    async with aiohttp.ClientSession() as session, session.post(
            hook.url, data=body, headers={SIGNATURE_HEADER: headers[SIGNATURE_HEADER]}) as resp:
        assert resp.status == 401
    assert hook.refusals == ["stale", "replayed"]
    # The timestamp is signed: moving it forward breaks the signature.
    sig = headers[SIGNATURE_HEADER]
    forged = f"t={int(sig[2:sig.index(',')]) + 60}" + sig[sig.index(","):]
    assert hook.refuse(forged, body) == "bad signature"


def test_signature_helpers_round_trip() -> None:
    keys = {"a": b"key-a-0123456789", "b": b"key-b-0123456789"}
    header = signature(keys["b"], b'{"x":1}', timestamp=1_777_622_400, key_id="b")
    assert verify_signature(header, keys, b'{"x":1}', now_s=1_777_622_400 + 10) == ("b", 1_777_622_400)
    for bad_body, now_s, words in ((b'{"x":2}', 1_777_622_400, "does not verify"),
                                   (b'{"x":1}', 1_777_622_400 + 301, "stale")):
        with pytest.raises(ValueError, match=words):
            verify_signature(header, keys, bad_body, now_s=now_s)
    with pytest.raises(ValueError, match="unknown key id"):
        verify_signature(header, {"a": keys["a"]}, b'{"x":1}', now_s=1_777_622_400)
    assert key_id_of(SecretRef(file=Path("/etc/edgeagent/credentials/webhook hmac"))) == "webhook_hmac"


async def test_webhook_wrong_key_is_a_permanent_failure(hook: Hook, tmp_path: Path) -> None:
    hook.key = b"the-receivers-key"
    other = tmp_path / "other"
    other.write_text("not-the-same")
    n = WebhookNotifier(webhook_cfg(hook.url, secret={"file": str(other)}))
    try:
        with pytest.raises(NotifyError) as info:
            await n.send("guard_room", message())
    finally:
        await n.aclose()
    assert info.value.permanent
    assert "HTTP 401" in info.value.reason
    assert "abc123" not in str(info.value)  # the query string may hold a token


@pytest.mark.parametrize(("status", "permanent"), [
    (400, True), (404, True), (410, True), (301, True), (408, False), (429, False), (500, False), (503, False)])
async def test_webhook_status_classes(hook: Hook, status: int, permanent: bool) -> None:
    hook.script = [status]
    n = WebhookNotifier(webhook_cfg(hook.url))
    try:
        with pytest.raises(NotifyError) as info:
            await n.send("guard_room", message())
    finally:
        await n.aclose()
    assert info.value.permanent is permanent
    assert f"HTTP {status}" in info.value.reason
    assert len(hook.requests) == 1  # a redirect is not followed


async def test_webhook_timeout_and_refused_are_transient(hook: Hook) -> None:
    hook.script = [0.5]
    n = WebhookNotifier(webhook_cfg(hook.url, timeout_s=0.2))
    started = time.monotonic()
    try:
        with pytest.raises(NotifyError) as info:
            await n.send("guard_room", message())
    finally:
        await n.aclose()
    assert not info.value.permanent
    assert "within 0.2 s" in info.value.reason
    assert time.monotonic() - started < 0.8

    n = WebhookNotifier(webhook_cfg(f"http://127.0.0.1:{free_port()}/x"))
    try:
        with pytest.raises(NotifyError) as info:
            await n.send("guard_room", message())
    finally:
        await n.aclose()
    assert not info.value.permanent


async def test_webhook_missing_secret_fails_at_construction(tmp_path: Path) -> None:
    cfg = webhook_cfg("http://127.0.0.1:9/x", secret={"file": str(tmp_path / "absent")})
    with pytest.raises(SecretError, match="cannot be read"):
        WebhookNotifier(cfg)


# --- SMS: a fake modem on a pty -----------------------------------------------------------------------

class FakeModem(threading.Thread):
    """The far end of a pty pair answering like a GSM modem (echo on until ATE0). Switches:
    ``pin`` (the SIM asks for it), ``cms_error`` (answer the SMS text with +CMS ERROR: n), ``silent``
    (answer nothing at all), ``no_prompt`` (no "> " after AT+CMGS), ``urc`` (an unsolicited code before
    answers), ``delay_s`` (before answering the text)."""

    def __init__(self, path: str) -> None:
        super().__init__(name="fake-modem", daemon=True)
        self.port = serial.Serial(path, 115200, timeout=0.02)
        self.log: list[str] = []    # commands as received, and "<ESC>" for an escape
        self.texts: list[bytes] = []
        self.charset = "IRA"
        self.pin: str | None = None
        self.cms_error: int | None = None
        self.silent = False
        self.no_prompt = False
        self.urc = False
        self.delay_s = 0.0
        self._echo = True
        self._ref = 16
        self._stop_flag = threading.Event()

    def commands(self) -> list[str]:
        return [c for c in self.log if c != "<ESC>"]

    def decoded_texts(self) -> list[str]:
        return [bytes.fromhex(t.decode()).decode("utf-16-be") if all(c in b"0123456789ABCDEF" for c in t) and t
                else t.decode() for t in self.texts]

    def _say(self, text: str) -> None:
        self.port.write(text.encode())

    def run(self) -> None:
        buf = bytearray()
        in_text = False
        while not self._stop_flag.is_set():
            buf += self.port.read(512)
            while True:
                if in_text:
                    z, esc = buf.find(b"\x1a"), buf.find(b"\x1b")
                    if esc >= 0 and (z < 0 or esc < z):
                        del buf[:esc + 1]
                        self.log.append("<ESC>")
                        in_text = False
                        continue
                    if z < 0:
                        break
                    self.texts.append(bytes(buf[:z]))
                    del buf[:z + 1]
                    in_text = False
                    self._answer_text()
                    continue
                while b"\x1b" in buf:
                    del buf[buf.index(b"\x1b")]
                    self.log.append("<ESC>")
                end = buf.find(b"\r")
                if end < 0:
                    break
                line = buf[:end].decode().strip()
                del buf[:end + 1]
                if line:
                    self.log.append(line)
                    in_text = self._answer(line)

    def _answer(self, cmd: str) -> bool:
        if self._echo:
            self._say(cmd + "\r")
        if self.silent:
            return False
        if self.urc:
            self._say('\r\n+CMTI: "SM",3\r\n\r\nRING\r\n')
        ok, err = "\r\nOK\r\n", "\r\nERROR\r\n"
        if cmd == "AT":
            self._say(ok)
        elif cmd == "ATE0":
            self._echo = False
            self._say(ok)
        elif cmd == "AT+CPIN?":
            self._say(f"\r\n+CPIN: {'SIM PIN' if self.pin else 'READY'}\r\n" + ok)
        elif cmd.startswith("AT+CPIN="):
            if self.pin and cmd == f'AT+CPIN="{self.pin}"':
                self.pin = None
                self._say(ok)
            else:
                self._say("\r\n+CME ERROR: 16\r\n")
        elif cmd in ("AT+CMGF=1", "AT+CSMP=17,167,0,0", "AT+CSMP=17,167,0,8"):
            self._say(ok)
        elif cmd.startswith("AT+CSCS="):
            self.charset = cmd.split("=", 1)[1].strip('"')
            self._say(ok)
        elif cmd.startswith("AT+CMGS="):
            if self.no_prompt:
                return True  # takes text, but never says so
            self._say("\r\n> ")
            return True
        else:
            self._say(err)
        return False

    def _answer_text(self) -> None:
        if self.silent:
            return
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.cms_error is not None:
            self._say(f"\r\n+CMS ERROR: {self.cms_error}\r\n")
            return
        self._ref += 1
        self._say(f"\r\n+CMGS: {self._ref}\r\n\r\nOK\r\n")

    def stop(self) -> None:
        self._stop_flag.set()
        self.join(5)
        self.port.close()


@pytest.fixture
def modem(pty_pair: tuple[str, str]) -> Iterator[tuple[FakeModem, str]]:
    server_end, client_end = pty_pair
    fake = FakeModem(server_end)
    fake.start()
    try:
        yield fake, client_end
    finally:
        fake.stop()
        assert not fake.is_alive()


def sms_cfg(port: str, **kw: Any) -> SmsNotifierConfig:
    return SmsNotifierConfig.model_validate({"type": "sms", "serial_port": port,
                                             "numbers": {"grid_worker": NUMBER, "family_li": "+8613900139000"},
                                             **kw})


SETUP = ["AT", "ATE0", "AT+CPIN?", "AT+CMGF=1"]


async def test_sms_ascii_dialogue(modem: tuple[FakeModem, str]) -> None:
    fake, port = modem
    n = SmsModemNotifier(sms_cfg(port), name="gsm")
    msg = message()
    await n.send("grid_worker", msg)
    await n.aclose()
    assert fake.log == [*SETUP, 'AT+CSCS="IRA"', "AT+CSMP=17,167,0,0", f'AT+CMGS="{NUMBER}"']
    want = msg.plain()
    assert len(want) > 160
    # "[" and "]" of the title take two septets each: 155 characters and "..." fill the 160.
    assert fake.decoded_texts() == [want[:155].rstrip() + "..."]
    assert n.sent == 1


async def test_sms_chinese_goes_as_ucs2(modem: tuple[FakeModem, str]) -> None:
    fake, port = modem
    n = SmsModemNotifier(sms_cfg(port))
    short = message(title="紧急: 跌倒", text="住户 r-7 (张伟) 在 3 号楼跌倒, 请立即前往。")
    long = message(title="紧急: 跌倒", text="住户 r-7 (张伟) 在 3 号楼跌倒。" * 10)
    await n.send("family_li", short)
    await n.send("family_li", long)
    await n.aclose()
    number_hex = "+8613900139000".encode("utf-16-be").hex().upper()
    one = [*SETUP, 'AT+CSCS="UCS2"', "AT+CSMP=17,167,0,8", f'AT+CMGS="{number_hex}"']
    assert fake.log == one + one
    texts = fake.decoded_texts()
    assert texts[0] == short.plain()
    assert len(texts[1]) == 70
    assert texts[1].endswith("…")
    assert long.plain().startswith(texts[1][:-1])


async def test_sms_modem_quirks_are_tolerated(modem: tuple[FakeModem, str]) -> None:
    """Echo before ATE0, unsolicited codes between answers, a slow network answer."""
    fake, port = modem
    fake.urc = True
    fake.delay_s = 0.3
    n = SmsModemNotifier(sms_cfg(port))
    await n.send("grid_worker", message())
    await n.aclose()
    assert fake.commands()[-1] == f'AT+CMGS="{NUMBER}"'
    assert len(fake.texts) == 1


async def test_sms_enters_the_pin_once_and_never_a_rejected_one(modem: tuple[FakeModem, str], tmp_path: Path) -> None:
    fake, port = modem
    pin_file = tmp_path / "pin"
    pin_file.write_text("1234\n")
    fake.pin = "1234"
    n = SmsModemNotifier(sms_cfg(port, pin={"file": str(pin_file)}))
    await n.send("grid_worker", message())
    assert fake.log[:4] == ["AT", "ATE0", "AT+CPIN?", 'AT+CPIN="1234"']
    assert len(fake.texts) == 1

    fake.log.clear()
    fake.pin = "9999"  # the SIM was swapped: our PIN is now wrong
    for _ in range(2):
        with pytest.raises(NotifyError) as info:
            await n.send("grid_worker", message())
        assert info.value.permanent
    await n.aclose()
    assert fake.log.count('AT+CPIN="1234"') == 1  # entered once, then never again
    assert "rejected before" in info.value.reason


async def test_sms_cms_errors(modem: tuple[FakeModem, str]) -> None:
    fake, port = modem
    n = SmsModemNotifier(sms_cfg(port))
    fake.cms_error = 21
    with pytest.raises(NotifyError) as info:
        await n.send("grid_worker", message())
    assert info.value.permanent
    assert "+CMS ERROR: 21 (short message transfer rejected)" in info.value.reason
    assert NUMBER not in str(info.value)
    assert "*8000" in info.value.reason

    fake.cms_error = 332
    with pytest.raises(NotifyError) as info:
        await n.send("grid_worker", message())
    assert not info.value.permanent
    assert "network timeout" in info.value.reason
    await n.aclose()
    assert "<ESC>" not in fake.log  # the modem had the whole text: nothing to cancel


async def test_sms_silent_modem_is_transient(modem: tuple[FakeModem, str]) -> None:
    fake, port = modem
    fake.silent = True
    n = SmsModemNotifier(sms_cfg(port, timeout_s=0.4))
    started = time.monotonic()
    with pytest.raises(NotifyError) as info:
        await n.send("grid_worker", message())
    await n.aclose()
    assert not info.value.permanent
    assert "did not answer AT in time" in info.value.reason
    assert time.monotonic() - started < 2


async def test_sms_missing_prompt_is_cancelled_with_escape(modem: tuple[FakeModem, str]) -> None:
    fake, port = modem
    fake.no_prompt = True
    n = SmsModemNotifier(sms_cfg(port, timeout_s=0.4))
    with pytest.raises(NotifyError) as info:
        await n.send("grid_worker", message())
    assert not info.value.permanent
    assert 'AT+CMGS="*********8000"' in info.value.reason
    await until(lambda: "<ESC>" in fake.log)
    assert fake.texts == []
    # The modem is usable again at once.
    fake.no_prompt = False
    fake.log.clear()
    await n.send("grid_worker", message())
    await n.aclose()
    assert fake.commands()[0] == "AT"
    assert len(fake.texts) == 1


async def test_sms_one_at_a_time(modem: tuple[FakeModem, str]) -> None:
    fake, port = modem
    n = SmsModemNotifier(sms_cfg(port))
    await asyncio.gather(n.send("grid_worker", message(alarm_id="A1")),
                         n.send("family_li", message(alarm_id="A2")),
                         n.send("grid_worker", message(alarm_id="A3")))
    await n.aclose()
    assert len(fake.texts) == 3
    blocks = [fake.log[i:i + 7] for i in range(0, len(fake.log), 7)]
    assert len(blocks) == 3
    for block in blocks:  # never interleaved
        assert block[:6] == [*SETUP, 'AT+CSCS="IRA"', "AT+CSMP=17,167,0,0"]
        assert block[6].startswith("AT+CMGS=")


async def test_sms_cancel_stops_the_dialogue(modem: tuple[FakeModem, str]) -> None:
    fake, port = modem
    fake.silent = True
    n = SmsModemNotifier(sms_cfg(port, timeout_s=30))
    task = asyncio.create_task(n.send("grid_worker", message()))
    await until(lambda: "AT" in fake.log)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.monotonic()
    await n.aclose()
    assert time.monotonic() - started < 1.0
    with pytest.raises(NotifyError):
        await n.send("grid_worker", message())


async def test_sms_unknown_target_and_missing_port(tmp_path: Path) -> None:
    n = SmsModemNotifier(sms_cfg(str(tmp_path / "ttyUSB9")))
    with pytest.raises(NotifyError) as info:
        await n.send("guard_room", message())
    assert info.value.permanent
    with pytest.raises(NotifyError) as info:
        await n.send("grid_worker", message())
    assert not info.value.permanent
    assert "cannot open" in info.value.reason
    await n.aclose()


async def test_sms_logs_mask_numbers_and_keep_bodies_out(modem: tuple[FakeModem, str],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    fake, port = modem
    caplog.set_level(logging.DEBUG, logger="edgeagent.drivers.notifiers")
    n = SmsModemNotifier(sms_cfg(port))
    hub = NotifierHub(retry_base_s=0.01)
    hub.add("gsm", n, ["grid_worker"], concurrency=1)
    msg = message()
    async with hub:
        hub.notify(["grid_worker"], msg)
        await until(lambda: hub.stats.delivered == 1)
        fake.cms_error = 21
        hub.notify(["grid_worker"], msg)
        await until(lambda: hub.stats.failed == 1)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "*********8000" in text
    assert NUMBER not in text and "13800138000" not in text
    assert "wristband wb-7" not in text and msg.title not in text


def test_encode_sms() -> None:
    sms = encode_sms("a`b\x1ac\x1bd\r\ne\t…", 160)
    assert (sms.charset, sms.dcs, sms.body) == ("IRA", 0, b"a'b c d\ne ...")
    # [ ] count as two septets each: 78 brackets fill 156 septets, then "a" and "..." fit.
    sms = encode_sms("[]" * 39 + "abcdef", 160)
    assert sms.body == b"[]" * 39 + b"a..."
    assert encode_sms("x" * 160).body == b"x" * 160
    sms = encode_sms("报警" * 40, 160)
    assert (sms.charset, sms.dcs, sms.chars) == ("UCS2", 8, 70)
    assert bytes.fromhex(sms.body.decode()).decode("utf-16-be") == "报警" * 34 + "报…"
    assert sms.address("+86139") == "002B00380036003100330039"
    assert mask_number("+8613800138000") == "*********8000"


# --- MQTT: the guard-room topic on a real mosquitto ---------------------------------------------------

async def test_mqtt_notifier_publishes_to_the_guard_room_topic(broker: Mosquitto) -> None:
    collector = await asyncio.to_thread(Collector(broker.port, topic="compound/guard-room/#").start)
    try:
        cfg = MqttNotifierConfig(type="mqtt", topic="compound/guard-room/{target}", targets=("guard_room",),
                                 timeout_s=1)
        async with MqttSession(SessionParams(host="127.0.0.1", port=broker.port, client_id="gw-notify")) as s:
            n = MqttNotifier(s.publish, cfg, name="panel")
            await n.send("guard_room", message("repeat", "A5"))
            assert await asyncio.to_thread(collector.wait_for, lambda c: c.messages, 5)
            with pytest.raises(NotifyError) as info:
                await n.send("family", message())
            assert info.value.permanent
            broker.kill()
            with pytest.raises(NotifyError) as info:
                await n.send("guard_room", message())
            assert not info.value.permanent
    finally:
        await asyncio.to_thread(collector.stop)
    topic, body, retained = collector.messages[0]
    assert topic == "compound/guard-room/guard_room"
    assert not retained
    doc = orjson.loads(body)
    assert (doc["alarm_id"], doc["kind"], doc["target"]) == ("A5", "repeat", "guard_room")
    assert doc["title"].startswith("ALARM")


# --- the hub ------------------------------------------------------------------------------------------

class Scripted:
    """An in-memory notifier: records calls, raises scripted errors, optionally waits for a gate."""

    def __init__(self, results: list[Exception | None] | None = None, gate: asyncio.Event | None = None) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.results = list(results or [])
        self.gate = gate
        self.closed = False

    async def send(self, target: str, message: Message) -> None:
        self.calls.append((target, message.alarm_id, message.kind))
        if self.gate is not None:
            await self.gate.wait()
        result = self.results.pop(0) if self.results else None
        if result is not None:
            raise result

    async def aclose(self) -> None:
        self.closed = True


def transient(target: str = "t") -> NotifyError:
    return NotifyError(target, "busy")


def hub_with(outcomes: list[Outcome], **kw: Any) -> NotifierHub:
    return NotifierHub(retry_base_s=0.01, on_outcome=outcomes.append, rng=random.Random(1), **kw)


async def test_a_target_served_elsewhere_is_no_error_and_an_unserved_one_is_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """The demo's own config logged an ERROR for every alarm: the guard room is told by the wristband
    input's guard-room topic, outside the hub."""
    caplog.set_level(logging.DEBUG, logger="edgeagent.drivers.notifiers")
    async with hub_with([]) as hub:
        hub.serve_elsewhere("guard_room", "the guard-room topic")
        for alarm_id in ("A1", "A2", "A3"):
            assert hub.notify(["guard_room", "family"], message(alarm_id=alarm_id)) == 0
        assert hub.stats.served_elsewhere == 3 and hub.stats.unrouted == 3
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "'family'" in errors[0], errors


async def test_hub_fans_out_to_every_notifier_of_a_target() -> None:
    outcomes: list[Outcome] = []
    panel, office, gsm = Scripted(), Scripted(), Scripted(gate=asyncio.Event())
    async with hub_with(outcomes) as hub:
        hub.add("panel", panel, ["guard_room"])
        hub.add("office", office, ["guard_room", "grid_worker"])
        hub.add("gsm", gsm, ["grid_worker", "family"])
        started = time.monotonic()
        assert hub.notify(["guard_room", "grid_worker", "nobody", "guard_room"], message()) == 4
        assert time.monotonic() - started < 0.05  # returns at once, though the modem hangs
        await until(lambda: len(outcomes) == 3)  # everything but the hanging modem is through
        assert hub.stats.unrouted == 1
        assert panel.calls == [("guard_room", "A1", "new")]
        assert sorted(office.calls) == [("grid_worker", "A1", "new"), ("guard_room", "A1", "new")]
        assert hub.pending == 1
        assert hub.snapshot()["pending_by_notifier"] == {"panel": 0, "office": 0, "gsm": 1}
        assert gsm.gate is not None
        gsm.gate.set()
        await until(lambda: len(outcomes) == 4)
    assert gsm.calls == [("grid_worker", "A1", "new")]
    assert {o.result for o in outcomes} == {"delivered"}
    assert panel.closed and office.closed and gsm.closed


async def test_hub_retries_transient_failures_with_bounded_tries() -> None:
    outcomes: list[Outcome] = []
    flaky = Scripted([transient(), transient(), None])
    broken = Scripted([transient()] * 5)
    refused = Scripted([NotifyError("t", "bad number", permanent=True)])
    buggy = Scripted([RuntimeError("oops"), None])
    async with hub_with(outcomes, attempts=3) as hub:
        for name, n in [("flaky", flaky), ("broken", broken), ("refused", refused), ("buggy", buggy)]:
            hub.add(name, n, [name])
        hub.notify(["flaky", "broken", "refused", "buggy"], message())
        await until(lambda: len(outcomes) == 4)
    by = {o.notifier: o for o in outcomes}
    assert (by["flaky"].result, by["flaky"].attempts) == ("delivered", 3)
    assert (by["broken"].result, by["broken"].attempts) == ("failed", 3)
    assert len(broken.calls) == 3
    assert (by["refused"].result, by["refused"].attempts) == ("failed", 1)
    assert by["refused"].error is not None and by["refused"].error.permanent
    assert (by["buggy"].result, by["buggy"].attempts) == ("delivered", 2)
    assert hub.stats.retries == 2 + 2 + 1
    assert (hub.stats.delivered, hub.stats.failed) == (2, 2)


async def test_hub_gives_up_at_the_retry_window() -> None:
    outcomes: list[Outcome] = []
    n = Scripted([transient()] * 5)
    async with NotifierHub(retry_base_s=1.0, retry_window_s=0.3, on_outcome=outcomes.append) as hub:
        hub.add("n", n, ["t"])
        hub.notify(["t"], message())
        await until(lambda: len(outcomes) == 1, timeout_s=1)
    assert (outcomes[0].result, outcomes[0].attempts) == ("failed", 1)


async def test_hub_bounds_pending_and_drops_only_repeats() -> None:
    outcomes: list[Outcome] = []
    gate = asyncio.Event()
    gsm = Scripted(gate=gate)
    async with hub_with(outcomes, max_pending=3) as hub:
        hub.add("gsm", gsm, ["family"], concurrency=1)
        hub.notify(["family"], message("new", "N1"))
        await until(lambda: len(gsm.calls) == 1)  # N1 is sending: the modem hangs
        hub.notify(["family"], message("repeat", "R1"))
        hub.notify(["family"], message("repeat", "R2"))
        assert hub.pending == 3
        hub.notify(["family"], message("repeat", "R3"))  # full: the oldest waiting repeat, R1, goes
        hub.notify(["family"], message("escalated", "E1"))  # R2 goes
        hub.notify(["family"], message("new", "N2"))  # R3 goes
        hub.notify(["family"], message("repeat", "R4"))  # nothing to evict: R4 itself is dropped
        hub.notify(["family"], message("escalated", "E2"))  # never dropped: admitted beyond the bound
        assert hub.pending == 4
        assert hub.stats.dropped_repeats == 4
        assert hub.stats.over_bound == 1
        gate.set()
        await until(lambda: hub.pending == 0)
    assert [c[1] for c in gsm.calls] == ["N1", "E1", "N2", "E2"]
    dropped = [o.alarm_id for o in outcomes if o.result == "dropped"]
    assert dropped == ["R1", "R2", "R3", "R4"]
    assert sorted(o.alarm_id for o in outcomes if o.result == "delivered") == ["E1", "E2", "N1", "N2"]


async def test_hub_close_drains_then_cancels() -> None:
    outcomes: list[Outcome] = []
    fast, stuck = Scripted(), Scripted(gate=asyncio.Event())
    hub = hub_with(outcomes, drain_s=0.2)
    hub.add("fast", fast, ["t"])
    hub.add("stuck", stuck, ["t"])
    hub.notify(["t"], message())
    started = time.monotonic()
    await hub.aclose()
    assert time.monotonic() - started < 1
    assert [o.notifier for o in outcomes] == ["fast"]
    assert hub.pending == 0
    assert fast.closed and stuck.closed
    with pytest.raises(NotifyError, match="closed"):
        hub.notify(["t"], message())


# --- all together, from config --------------------------------------------------------------------------

async def test_hub_from_config_against_real_peers(broker: Mosquitto, hook: Hook, modem: tuple[FakeModem, str],
                                                  hmac_file: Path) -> None:
    fake, port = modem
    hook.key = b"s3cret-key"
    hook.script = [500]  # the first POST fails: retried
    section = SECTION.validate_python({
        "panel": {"type": "mqtt", "topic": "compound/guard-room/{target}", "targets": ["guard_room"]},
        "office": {"type": "webhook", "url": hook.url, "secret": {"file": str(hmac_file)},
                   "targets": ["guard_room", "grid_worker"]},
        "gsm": {"type": "sms", "serial_port": port, "numbers": {"grid_worker": NUMBER}},
    })
    assert isinstance(section["office"].secret, SecretRef)  # type: ignore[union-attr]
    outcomes: list[Outcome] = []
    collector = await asyncio.to_thread(Collector(broker.port, topic="compound/guard-room/#").start)
    try:
        async with MqttSession(SessionParams(host="127.0.0.1", port=broker.port, client_id="gw-hub")) as s:
            hub = NotifierHub.from_config(section, publish=s.publish, retry_base_s=0.05, on_outcome=outcomes.append)
            async with hub:
                assert hub.targets == {"guard_room": ("panel", "office"), "grid_worker": ("office", "gsm")}
                assert hub.notify(["guard_room", "grid_worker"], message("escalated", "A7")) == 4
                await until(lambda: len(outcomes) == 4, timeout_s=10)
        assert await asyncio.to_thread(collector.wait_for, lambda c: c.messages, 5)
    finally:
        await asyncio.to_thread(collector.stop)
    assert {(o.notifier, o.target, o.result) for o in outcomes} == {
        ("panel", "guard_room", "delivered"), ("office", "guard_room", "delivered"),
        ("office", "grid_worker", "delivered"), ("gsm", "grid_worker", "delivered")}
    assert sum(o.attempts for o in outcomes if o.notifier == "office") == 3  # one 500, then both through
    assert sorted(orjson.loads(b)["target"] for _, b, _ in hook.requests[1:]) == ["grid_worker", "guard_room"]
    assert collector.messages[0][0] == "compound/guard-room/guard_room"
    assert fake.commands()[-1] == f'AT+CMGS="{NUMBER}"'
    assert fake.decoded_texts()[0].startswith("ALARM [critical]")


def test_mqtt_notifier_needs_a_broker() -> None:
    section = SECTION.validate_python({"panel": {"type": "mqtt", "topic": "x/{target}", "targets": ["g"]}})
    with pytest.raises(ConfigError, match="needs the local broker"):
        NotifierHub.from_config(section)
