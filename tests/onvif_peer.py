"""ONVIF peers for the camera tests.

1. :class:`OnvifFixture`: the project's own SOAP camera (aiohttp on 127.0.0.1, a free port), written from
   the ONVIF WSDLs for what no package serves: the device service (GetDeviceInformation,
   GetSystemDateAndTime with a configurable clock skew, GetServices/GetCapabilities pointing at its own
   services), Media1 and Media2 (profiles, stream and snapshot URIs, a JPEG), DeviceIO relays, PTZ presets
   and PullPoint events (CreatePullPointSubscription, long-poll PullMessages, Renew, Unsubscribe), with
   named failure switches (:class:`Switches`). WS-Security UsernameToken digests are verified for real
   against its own (skewed) clock; HTTP Digest guards the paths in ``Switches.digest_paths``.
2. :class:`IpycamPeer`: ipycam, a pure-Python virtual ONVIF camera from PyPI, run as a separate process
   from its own venv (``.venv-peers``; its opencv-python GUI build must not meet the project's headless
   one). ``python -m tests.onvif_peer --ensure-venv`` creates that venv (``./dev test`` calls it).
3. :class:`SilentServer`: a TCP socket that accepts and never answers.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import itertools
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from aiohttp import web
from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type information

REPO = Path(__file__).resolve().parents[1]
PEERS_VENV = Path(os.environ.get("EDGEAGENT_PEERS_VENV", REPO / ".venv-peers"))
IPYCAM_REQUIREMENT = "ipycam==1.3.0"

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "tds": "http://www.onvif.org/ver10/device/wsdl",
    "trt": "http://www.onvif.org/ver10/media/wsdl",
    "tr2": "http://www.onvif.org/ver20/media/wsdl",
    "tt": "http://www.onvif.org/ver10/schema",
    "tev": "http://www.onvif.org/ver10/events/wsdl",
    "wsnt": "http://docs.oasis-open.org/wsn/b-2",
    "wsa": "http://www.w3.org/2005/08/addressing",
    "tmd": "http://www.onvif.org/ver10/deviceIO/wsdl",
    "tptz": "http://www.onvif.org/ver20/ptz/wsdl",
    "ter": "http://www.onvif.org/ver10/error",
    "tns1": "http://www.onvif.org/ver10/topics",
    "wsrf-rw": "http://docs.oasis-open.org/wsrf/rw-2",
    "wsntw": "http://docs.oasis-open.org/wsn/bw-2",
}
_XMLNS = " ".join(f'xmlns:{k}="{v}"' for k, v in NS.items())
WSSE_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
PRE_AUTH = frozenset({"GetSystemDateAndTime", "GetServices", "GetCapabilities", "GetServiceCapabilities"})
MAX_SKEW_S = 5.0  # cameras reject a UsernameToken whose Created is 5 s+ off their clock
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_duration_s(text: str) -> float:
    """xs:duration subset cameras use: PT60S, PT1M, PT1H2M3.5S."""
    m = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:([\d.]+)S)?)?", text.strip())
    if not m:
        raise ValueError(text)
    d, h, mi, s = m.groups()
    return int(d or 0) * 86400 + int(h or 0) * 3600 + int(mi or 0) * 60 + float(s or 0)


def make_jpeg(width: int = 64, height: int = 48) -> bytes:
    import cv2
    import numpy as np

    img = np.zeros((height, width, 3), np.uint8)
    img[:, :, 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return bytes(buf)


@dataclass
class Profile:
    token: str
    name: str
    width: int
    height: int
    fps: int
    encoding: str = "H264"
    media2_only: bool = False  # H.265 cannot be described by Media1


DEFAULT_PROFILES = [
    Profile("main", "MainStream", 1920, 1080, 25),
    Profile("sub", "SubStream", 640, 360, 12),
    Profile("third", "ThirdStream", 320, 240, 5),
    Profile("main265", "MainH265", 2560, 1440, 20, encoding="H265", media2_only=True),
]


@dataclass
class Switches:
    """Named failure switches; tests flip them between calls."""

    username: str = "admin"
    password: str = "s3cret-pw"
    clock_skew_s: float = 0.0
    max_subscriptions: int | None = None
    fault_next_pull: bool = False
    http500_on_create: int = 0  # answer that many CreatePullPointSubscription with a bare HTTP 500
    renew_supported: bool = True
    drop_all_on_unsubscribe: bool = False
    media2: bool = True
    deviceio: bool = True
    events: bool = True
    digest_paths: set[str] = field(default_factory=lambda: {"/onvif/deviceio_service", "/snapshot"})
    digest_everywhere: bool = False  # an HTTP-Digest-only camera: every path, no WS-Security needed
    down: bool = False  # every request: connection dropped without an answer
    snapshot: bytes = b""
    stream_uri: str | None = None  # what GetStreamUri answers (a real RTSP server's URL), else a made-up one
    stream_uris: dict[str, str] = field(default_factory=dict)  # per profile token, before stream_uri
    profiles: list[Profile] = field(default_factory=lambda: list(DEFAULT_PROFILES))


@dataclass
class Subscription:
    id: int
    expires: dt.datetime  # on the camera's clock
    queue: list[str] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class SoapFault(Exception):
    def __init__(self, subcode: str, reason: str, *, code: str = "s:Sender", status: int = 400) -> None:
        super().__init__(reason)
        self.subcode, self.reason, self.code, self.status = subcode, reason, code, status


class OnvifFixture:
    """A SOAP camera on 127.0.0.1 with switches. Use as ``async with OnvifFixture() as cam:``."""

    def __init__(self, switches: Switches | None = None) -> None:
        self.sw = switches or Switches()
        if not self.sw.snapshot:
            self.sw.snapshot = make_jpeg()
        self.calls: Counter[str] = Counter()
        self.call_times: dict[str, list[float]] = {}  # operation -> time.monotonic() of each call
        self.subs: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self.boot_time = self.now()
        self.boots = 1
        self.relays: dict[str, str] = {"RelayOutputToken_1": "inactive", "RelayOutputToken_2": "inactive"}
        self.relay_log: list[tuple[str, str]] = []
        self.presets = {"1": "Gate", "2": "Parking"}
        self.preset_log: list[tuple[str, str]] = []
        self.wsse_failures = 0
        self.digest_failures = 0
        self._nonces: set[str] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- lifecycle
    async def __aenter__(self) -> OnvifFixture:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/onvif/{service}", self._soap)
        app.router.add_post("/onvif/subscription/{id}", self._soap)
        app.router.add_get("/snapshot/{token}", self._snapshot)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sub in self.subs.values():
            sub.wake.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def now(self) -> dt.datetime:
        """The camera's clock (ours plus the skew)."""
        return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.sw.clock_skew_s)

    # ---- scenario controls
    def reboot(self) -> None:
        """Every subscription gone (their addresses now stale), uptime reset."""
        for sub in self.subs.values():
            sub.wake.set()
        self.subs.clear()
        # LastReboot is reported to the second: a reboot within the same second still reads as a new one.
        self.boot_time = max(self.now(), self.boot_time + dt.timedelta(seconds=1))
        self.boots += 1

    def push(self, topic: str, *, source: dict[str, str] | None = None, data: dict[str, str] | None = None,
             operation: str = "Changed", utc: dt.datetime | None = None) -> int:
        """Queue a notification on every live subscription; returns how many got it."""
        msg = self._notification(topic, source or {}, data or {}, operation, utc or self.now())
        live = self._live()
        for sub in live:
            sub.queue.append(msg)
            sub.wake.set()
        return len(live)

    def push_motion(self, active: bool, *, token: str = "VideoSourceConfig_1") -> int:
        return self.push("tns1:RuleEngine/CellMotionDetector/Motion",
                         source={"VideoSourceConfigurationToken": token,
                                 "VideoAnalyticsConfigurationToken": "VideoAnalyticsToken",
                                 "Rule": "MyMotionDetectorRule"},
                         data={"IsMotion": "true" if active else "false"})

    def push_tamper(self, active: bool) -> int:
        return self.push("tns1:RuleEngine/TamperDetector/Tamper",
                         source={"VideoSourceConfigurationToken": "VideoSourceConfig_1",
                                 "VideoAnalyticsConfigurationToken": "VideoAnalyticsToken",
                                 "Rule": "MyTamperDetectorRule"},
                         data={"IsTamper": "true" if active else "false"})

    def push_line_crossed(self, rule: str = "GateLine", object_id: str = "17") -> int:
        return self.push("tns1:RuleEngine/LineDetector/Crossed",
                         source={"VideoSourceConfigurationToken": "VideoSourceConfig_1",
                                 "VideoAnalyticsConfigurationToken": "VideoAnalyticsToken", "Rule": rule},
                         data={"ObjectId": object_id})

    def push_digital_input(self, active: bool, token: str = "DigitalInputToken_1") -> int:
        return self.push("tns1:Device/Trigger/DigitalInput", source={"InputToken": token},
                         data={"LogicalState": "true" if active else "false"})

    def _live(self) -> list[Subscription]:
        now = self.now()
        for sid in [sid for sid, s in self.subs.items() if s.expires <= now]:
            self.subs.pop(sid).wake.set()
        return list(self.subs.values())

    # ---- XML
    @staticmethod
    def _notification(topic: str, source: dict[str, str], data: dict[str, str], operation: str,
                      utc: dt.datetime) -> str:
        def items(d: dict[str, str]) -> str:
            return "".join(f"<tt:SimpleItem Name={quoteattr(k)} Value={quoteattr(v)}/>" for k, v in d.items())

        return ("<wsnt:NotificationMessage>"
                '<wsnt:Topic Dialect="http://www.onvif.org/ver10/tev/topicExpression/ConcreteSet">'
                f"{escape(topic)}</wsnt:Topic><wsnt:Message>"
                f'<tt:Message UtcTime="{iso(utc)}" PropertyOperation="{operation}">'
                f"<tt:Source>{items(source)}</tt:Source><tt:Data>{items(data)}</tt:Data>"
                "</tt:Message></wsnt:Message></wsnt:NotificationMessage>")

    @staticmethod
    def envelope(body: str) -> str:
        return (f'<?xml version="1.0" encoding="UTF-8"?><s:Envelope {_XMLNS}><s:Body>{body}</s:Body>'
                "</s:Envelope>")

    def _fault_response(self, f: SoapFault) -> web.Response:
        body = (f"<s:Fault><s:Code><s:Value>{f.code}</s:Value><s:Subcode><s:Value>{f.subcode}</s:Value>"
                f"</s:Subcode></s:Code><s:Reason><s:Text xml:lang=\"en\">{escape(f.reason)}</s:Text></s:Reason>"
                "</s:Fault>")
        return web.Response(status=f.status, text=self.envelope(body), content_type="application/soap+xml")

    # ---- auth
    def _check_wsse(self, header: Any) -> None:
        token = None if header is None else header.find(f"{{{WSSE_NS}}}Security/{{{WSSE_NS}}}UsernameToken")
        if token is None:
            raise SoapFault("ter:NotAuthorized", "Sender not Authorized")
        user = token.findtext(f"{{{WSSE_NS}}}Username") or ""
        pw_el = token.find(f"{{{WSSE_NS}}}Password")
        nonce = token.findtext(f"{{{WSSE_NS}}}Nonce") or ""
        created = token.findtext(f"{{{WSU_NS}}}Created") or ""
        if pw_el is None or not hmac.compare_digest(user, self.sw.username):
            self.wsse_failures += 1
            raise SoapFault("ter:NotAuthorized", "Sender not Authorized")
        if "PasswordText" in pw_el.get("Type", ""):
            ok = hmac.compare_digest(pw_el.text or "", self.sw.password)
        else:
            try:
                when = dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
                raw_nonce = base64.b64decode(nonce, validate=True)
            except ValueError:
                ok = False
            else:
                if when.tzinfo is None:
                    when = when.replace(tzinfo=dt.UTC)
                fresh = abs((when - self.now()).total_seconds()) <= MAX_SKEW_S
                replay = nonce in self._nonces
                self._nonces.add(nonce)
                expected = base64.b64encode(hashlib.sha1(
                    raw_nonce + created.encode() + self.sw.password.encode()).digest()).decode()
                ok = fresh and not replay and hmac.compare_digest(expected, pw_el.text or "")
        if not ok:
            self.wsse_failures += 1
            raise SoapFault("ter:NotAuthorized", "Sender not Authorized")

    def _digest_required(self, path: str) -> bool:
        return self.sw.digest_everywhere or any(path.startswith(p) for p in self.sw.digest_paths)

    def _check_digest(self, request: web.Request) -> web.Response | None:
        """RFC 7616 Digest (MD5, qop=auth); None when the request is authorized."""
        header = request.headers.get("Authorization", "")
        if header.startswith("Digest "):
            params = dict(re.findall(r'(\w+)="?([^",]*)"?', header[7:]))
            ha1 = hashlib.md5(f"{self.sw.username}:fixture:{self.sw.password}".encode()).hexdigest()
            ha2 = hashlib.md5(f"{request.method}:{params.get('uri', '')}".encode()).hexdigest()
            want = hashlib.md5(":".join([ha1, params.get("nonce", ""), params.get("nc", ""),
                                         params.get("cnonce", ""), params.get("qop", ""), ha2]).encode()
                               ).hexdigest()
            if params.get("username") == self.sw.username and hmac.compare_digest(want, params.get("response", "")):
                return None
            self.digest_failures += 1
        challenge = f'Digest realm="fixture", qop="auth", nonce="{secrets.token_hex(16)}", algorithm=MD5'
        return web.Response(status=401, text="Unauthorized", headers={"WWW-Authenticate": challenge})

    # ---- HTTP handlers
    async def _drop(self, request: web.Request) -> web.Response:
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # the connection is gone; aiohttp drops the handler

    async def _snapshot(self, request: web.Request) -> web.StreamResponse:
        if self.sw.down:
            return await self._drop(request)
        self.calls["snapshot"] += 1
        if self._digest_required("/snapshot") and (denied := self._check_digest(request)) is not None:
            return denied
        return web.Response(body=self.sw.snapshot, content_type="image/jpeg")

    async def _soap(self, request: web.Request) -> web.StreamResponse:
        if self.sw.down:
            return await self._drop(request)
        raw = await request.read()
        try:
            root = etree.fromstring(raw, _PARSER)
        except etree.XMLSyntaxError:
            return web.Response(status=400, text="bad xml")
        body = root.find(f"{{{NS['s']}}}Body")
        header = root.find(f"{{{NS['s']}}}Header")
        if body is None or len(body) == 0:
            return web.Response(status=400, text="no body")
        op_el = body[0]
        op = etree.QName(op_el).localname
        self.calls[op] += 1
        self.call_times.setdefault(op, []).append(time.monotonic())
        path = request.path
        try:
            if self._digest_required(path):
                if (denied := self._check_digest(request)) is not None:
                    return denied
            elif op not in PRE_AUTH or (header is not None and header.find(f"{{{WSSE_NS}}}Security") is not None):
                self._check_wsse(header)
            if op == "CreatePullPointSubscription" and self.sw.http500_on_create > 0:
                self.sw.http500_on_create -= 1
                return web.Response(status=500, text="<html>500 Internal Server Error</html>",
                                    content_type="text/html")
            handler = getattr(self, f"op_{op}", None)
            if handler is None:
                raise SoapFault("ter:ActionNotSupported", f"{op} is not supported", code="s:Receiver",
                                status=500)
            result = await handler(op_el, request)
        except SoapFault as f:
            return self._fault_response(f)
        return web.Response(text=self.envelope(result), content_type="application/soap+xml")

    @staticmethod
    def _arg(el: Any, name: str) -> str | None:
        for child in el.iter():
            if isinstance(child.tag, str) and etree.QName(child).localname == name:
                return (child.text or "").strip()
        return None

    # ---- device service
    async def op_GetSystemDateAndTime(self, el: Any, req: web.Request) -> str:
        t = self.now()
        return ("<tds:GetSystemDateAndTimeResponse><tds:SystemDateAndTime>"
                "<tt:DateTimeType>NTP</tt:DateTimeType><tt:DaylightSavings>false</tt:DaylightSavings>"
                "<tt:TimeZone><tt:TZ>CST-8</tt:TZ></tt:TimeZone><tt:UTCDateTime>"
                f"<tt:Time><tt:Hour>{t.hour}</tt:Hour><tt:Minute>{t.minute}</tt:Minute>"
                f"<tt:Second>{t.second}</tt:Second></tt:Time>"
                f"<tt:Date><tt:Year>{t.year}</tt:Year><tt:Month>{t.month}</tt:Month><tt:Day>{t.day}</tt:Day>"
                "</tt:Date></tt:UTCDateTime></tds:SystemDateAndTime></tds:GetSystemDateAndTimeResponse>")

    async def op_GetDeviceInformation(self, el: Any, req: web.Request) -> str:
        return ("<tds:GetDeviceInformationResponse><tds:Manufacturer>Fixture</tds:Manufacturer>"
                "<tds:Model>FX-100</tds:Model><tds:FirmwareVersion>V5.7.3 build 260101</tds:FirmwareVersion>"
                f"<tds:SerialNumber>FX100-{self.port}</tds:SerialNumber><tds:HardwareId>88</tds:HardwareId>"
                "</tds:GetDeviceInformationResponse>")

    def _services(self) -> list[tuple[str, str]]:
        out = [(NS["tds"], "device_service"), (NS["trt"], "media_service"), (NS["tptz"], "ptz_service")]
        if self.sw.media2:
            out.append((NS["tr2"], "media2_service"))
        if self.sw.events:
            out.append((NS["tev"], "event_service"))
        if self.sw.deviceio:
            out.append((NS["tmd"], "deviceio_service"))
        return out

    async def op_GetServices(self, el: Any, req: web.Request) -> str:
        items = "".join(f"<tds:Service><tds:Namespace>{ns}</tds:Namespace><tds:XAddr>{self.base}/onvif/{path}"
                        "</tds:XAddr><tds:Version><tt:Major>2</tt:Major><tt:Minor>60</tt:Minor></tds:Version>"
                        "</tds:Service>" for ns, path in self._services())
        return f"<tds:GetServicesResponse>{items}</tds:GetServicesResponse>"

    async def op_GetCapabilities(self, el: Any, req: web.Request) -> str:
        b = self.base
        events = (f"<tt:Events><tt:XAddr>{b}/onvif/event_service</tt:XAddr><tt:WSSubscriptionPolicySupport>false"
                  "</tt:WSSubscriptionPolicySupport><tt:WSPullPointSupport>true</tt:WSPullPointSupport>"
                  "<tt:WSPausableSubscriptionManagerInterfaceSupport>false"
                  "</tt:WSPausableSubscriptionManagerInterfaceSupport></tt:Events>") if self.sw.events else ""
        return ("<tds:GetCapabilitiesResponse><tds:Capabilities>"
                f"<tt:Device><tt:XAddr>{b}/onvif/device_service</tt:XAddr></tt:Device>{events}"
                f"<tt:Media><tt:XAddr>{b}/onvif/media_service</tt:XAddr></tt:Media>"
                f"<tt:PTZ><tt:XAddr>{b}/onvif/ptz_service</tt:XAddr></tt:PTZ>"
                "</tds:Capabilities></tds:GetCapabilitiesResponse>")

    async def op_GetRelayOutputs(self, el: Any, req: web.Request) -> str:
        items = "".join(f'<tds:RelayOutputs token="{t}"><tt:Properties><tt:Mode>Monostable</tt:Mode>'
                        "<tt:DelayTime>PT2S</tt:DelayTime><tt:IdleState>open</tt:IdleState></tt:Properties>"
                        "</tds:RelayOutputs>" for t in self.relays)
        return f"<tds:GetRelayOutputsResponse>{items}</tds:GetRelayOutputsResponse>"

    async def op_SetRelayOutputState(self, el: Any, req: web.Request) -> str:
        token, state = self._arg(el, "RelayOutputToken"), self._arg(el, "LogicalState")
        if token not in self.relays or state not in ("active", "inactive"):
            raise SoapFault("ter:InvalidArgVal", "unknown relay or state")
        self.relays[token] = state
        self.relay_log.append((token, state))
        return "<tds:SetRelayOutputStateResponse/>"

    # ---- media 1 and 2
    def _media1_profile(self, p: Profile) -> str:
        return (f'<trt:Profiles token="{p.token}" fixed="true"><tt:Name>{p.name}</tt:Name>'
                '<tt:VideoSourceConfiguration token="VideoSourceConfig_1"><tt:Name>VSC</tt:Name>'
                "<tt:UseCount>4</tt:UseCount><tt:SourceToken>VideoSource_1</tt:SourceToken>"
                '<tt:Bounds x="0" y="0" width="2560" height="1440"/></tt:VideoSourceConfiguration>'
                f'<tt:VideoEncoderConfiguration token="enc_{p.token}"><tt:Name>enc</tt:Name>'
                f"<tt:UseCount>1</tt:UseCount><tt:Encoding>{p.encoding}</tt:Encoding>"
                f"<tt:Resolution><tt:Width>{p.width}</tt:Width><tt:Height>{p.height}</tt:Height></tt:Resolution>"
                "<tt:Quality>4</tt:Quality><tt:RateControl>"
                f"<tt:FrameRateLimit>{p.fps}</tt:FrameRateLimit><tt:EncodingInterval>1</tt:EncodingInterval>"
                "<tt:BitrateLimit>2048</tt:BitrateLimit></tt:RateControl></tt:VideoEncoderConfiguration>"
                '<tt:PTZConfiguration token="ptz0"><tt:Name>ptz</tt:Name><tt:UseCount>4</tt:UseCount>'
                "<tt:NodeToken>node0</tt:NodeToken></tt:PTZConfiguration></trt:Profiles>")

    def _media2_profile(self, p: Profile) -> str:
        return (f'<tr2:Profiles token="{p.token}" fixed="true"><tr2:Name>{p.name}</tr2:Name><tr2:Configurations>'
                '<tr2:VideoSource token="VideoSourceConfig_1"><tt:Name>VSC</tt:Name><tt:UseCount>4</tt:UseCount>'
                '<tt:SourceToken>VideoSource_1</tt:SourceToken><tt:Bounds x="0" y="0" width="2560" height="1440"/>'
                f'</tr2:VideoSource><tr2:VideoEncoder token="enc_{p.token}" GovLength="50" Profile="Main">'
                f"<tt:Name>enc</tt:Name><tt:UseCount>1</tt:UseCount><tt:Encoding>{p.encoding}</tt:Encoding>"
                f"<tt:Resolution><tt:Width>{p.width}</tt:Width><tt:Height>{p.height}</tt:Height></tt:Resolution>"
                f'<tt:RateControl ConstantBitRate="false"><tt:FrameRateLimit>{p.fps}</tt:FrameRateLimit>'
                "<tt:BitrateLimit>4096</tt:BitrateLimit></tt:RateControl><tt:Quality>4</tt:Quality>"
                '</tr2:VideoEncoder><tr2:PTZ token="ptz0"><tt:Name>ptz</tt:Name><tt:UseCount>4</tt:UseCount>'
                "<tt:NodeToken>node0</tt:NodeToken></tr2:PTZ></tr2:Configurations></tr2:Profiles>")

    def _profile(self, token: str | None, media2: bool) -> Profile:
        for p in self.sw.profiles:
            if p.token == token and (media2 or not p.media2_only):
                return p
        raise SoapFault("ter:NoProfile", "no such profile")

    async def op_GetProfiles(self, el: Any, req: web.Request) -> str:
        if req.path.endswith("media2_service"):
            items = "".join(self._media2_profile(p) for p in self.sw.profiles)
            return f"<tr2:GetProfilesResponse>{items}</tr2:GetProfilesResponse>"
        items = "".join(self._media1_profile(p) for p in self.sw.profiles if not p.media2_only)
        return f"<trt:GetProfilesResponse>{items}</trt:GetProfilesResponse>"

    async def op_GetStreamUri(self, el: Any, req: web.Request) -> str:
        media2 = req.path.endswith("media2_service")
        p = self._profile(self._arg(el, "ProfileToken"), media2)
        uri = (self.sw.stream_uris.get(p.token) or self.sw.stream_uri
               or f"rtsp://127.0.0.1:{self.port + 1}/Streaming/{p.token}?boot={self.boots}")
        if media2:
            return f"<tr2:GetStreamUriResponse><tr2:Uri>{escape(uri)}</tr2:Uri></tr2:GetStreamUriResponse>"
        return (f"<trt:GetStreamUriResponse><trt:MediaUri><tt:Uri>{escape(uri)}</tt:Uri>"
                "<tt:InvalidAfterConnect>false</tt:InvalidAfterConnect><tt:InvalidAfterReboot>true"
                "</tt:InvalidAfterReboot><tt:Timeout>PT0S</tt:Timeout></trt:MediaUri></trt:GetStreamUriResponse>")

    async def op_GetSnapshotUri(self, el: Any, req: web.Request) -> str:
        media2 = req.path.endswith("media2_service")
        p = self._profile(self._arg(el, "ProfileToken"), media2)
        uri = f"{self.base}/snapshot/{p.token}.jpg"
        if media2:
            return f"<tr2:GetSnapshotUriResponse><tr2:Uri>{uri}</tr2:Uri></tr2:GetSnapshotUriResponse>"
        return (f"<trt:GetSnapshotUriResponse><trt:MediaUri><tt:Uri>{uri}</tt:Uri>"
                "<tt:InvalidAfterConnect>false</tt:InvalidAfterConnect><tt:InvalidAfterReboot>false"
                "</tt:InvalidAfterReboot><tt:Timeout>PT0S</tt:Timeout></trt:MediaUri></trt:GetSnapshotUriResponse>")

    # ---- PTZ
    async def op_GetPresets(self, el: Any, req: web.Request) -> str:
        items = "".join(f'<tptz:Preset token="{t}"><tt:Name>{n}</tt:Name></tptz:Preset>'
                        for t, n in self.presets.items())
        return f"<tptz:GetPresetsResponse>{items}</tptz:GetPresetsResponse>"

    async def op_GotoPreset(self, el: Any, req: web.Request) -> str:
        token = self._arg(el, "PresetToken") or ""
        if token not in self.presets:
            raise SoapFault("ter:NoToken", "no such preset")
        self.preset_log.append((self._arg(el, "ProfileToken") or "", token))
        return "<tptz:GotoPresetResponse/>"

    # ---- events
    def _termination(self, el: Any, default_s: float = 60.0) -> dt.datetime:
        raw = self._arg(el, "InitialTerminationTime") or self._arg(el, "TerminationTime")
        now = self.now()
        if not raw:
            return now + dt.timedelta(seconds=default_s)
        if raw.startswith("P"):
            return now + dt.timedelta(seconds=parse_duration_s(raw))
        return dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))

    async def op_CreatePullPointSubscription(self, el: Any, req: web.Request) -> str:
        live = self._live()
        if self.sw.max_subscriptions is not None and len(live) >= self.sw.max_subscriptions:
            raise SoapFault("wsntw:SubscribeCreationFailedFault", "Maximum number of subscriptions reached",
                            code="s:Receiver", status=500)
        sub = Subscription(next(self._ids), self._termination(el))
        self.subs[sub.id] = sub
        # A new subscription first reports the current state of properties (ONVIF: Initialized).
        sub.queue.append(self._notification("tns1:Monitoring/OperatingTime/LastReboot", {},
                                            {"Status": iso(self.boot_time)}, "Initialized", self.now()))
        now = self.now()
        return ("<tev:CreatePullPointSubscriptionResponse><tev:SubscriptionReference>"
                f"<wsa:Address>{self.base}/onvif/subscription/{sub.id}</wsa:Address></tev:SubscriptionReference>"
                f"<wsnt:CurrentTime>{iso(now)}</wsnt:CurrentTime>"
                f"<wsnt:TerminationTime>{iso(sub.expires)}</wsnt:TerminationTime>"
                "</tev:CreatePullPointSubscriptionResponse>")

    def _sub(self, req: web.Request) -> Subscription:
        sid = int(req.match_info.get("id", "0") or 0)
        self._live()
        sub = self.subs.get(sid)
        if sub is None:
            raise SoapFault("wsrf-rw:ResourceUnknownFault", "unknown subscription", code="s:Sender")
        return sub

    async def op_PullMessages(self, el: Any, req: web.Request) -> str:
        sub = self._sub(req)
        if self.sw.fault_next_pull:
            self.sw.fault_next_pull = False
            raise SoapFault("ter:Action", "internal error in the event engine", code="s:Receiver", status=500)
        timeout_s = parse_duration_s(self._arg(el, "Timeout") or "PT1S")
        limit = int(self._arg(el, "MessageLimit") or "100")
        if not sub.queue:
            sub.wake.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(sub.wake.wait(), timeout_s)
            if sub.id not in self.subs:  # rebooted or expired while waiting
                raise SoapFault("wsrf-rw:ResourceUnknownFault", "unknown subscription", code="s:Sender")
        out, sub.queue[:] = sub.queue[:limit], sub.queue[limit:]
        now = self.now()
        return (f"<tev:PullMessagesResponse><tev:CurrentTime>{iso(now)}</tev:CurrentTime>"
                f"<tev:TerminationTime>{iso(sub.expires)}</tev:TerminationTime>{''.join(out)}"
                "</tev:PullMessagesResponse>")

    async def op_Renew(self, el: Any, req: web.Request) -> str:
        if not self.sw.renew_supported:
            raise SoapFault("ter:ActionNotSupported", "Renew is not supported", code="s:Receiver", status=500)
        sub = self._sub(req)
        sub.expires = self._termination(el)
        return (f"<wsnt:RenewResponse><wsnt:TerminationTime>{iso(sub.expires)}</wsnt:TerminationTime>"
                f"<wsnt:CurrentTime>{iso(self.now())}</wsnt:CurrentTime></wsnt:RenewResponse>")

    async def op_Unsubscribe(self, el: Any, req: web.Request) -> str:
        sub = self._sub(req)
        if self.sw.drop_all_on_unsubscribe:
            for s in self.subs.values():
                s.wake.set()
            self.subs.clear()
        else:
            self.subs.pop(sub.id, None)
            sub.wake.set()
        return "<wsnt:UnsubscribeResponse/>"

    async def op_SetSynchronizationPoint(self, el: Any, req: web.Request) -> str:
        return "<tev:SetSynchronizationPointResponse/>"


class SilentServer:
    """Accepts TCP connections and never says a word: a camera that hangs."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0
        self.accepted = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        while await reader.read(65536):
            pass

    async def __aenter__(self) -> SilentServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()


# ---------------------------------------------------------------------------------------------- ipycam

def ensure_peers_venv(venv: Path = PEERS_VENV) -> Path:
    """Create ``venv`` with ipycam if it is missing; returns its python. Raises RuntimeError with the
    reason when it cannot (no network to the package index, no venv module)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import ipycam, sys; sys.exit(0)"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python
    # sys.executable may itself be a venv's python: venv then builds on its base interpreter.
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", IPYCAM_REQUIREMENT]]
    if python.exists():
        steps = steps[1:]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"cannot prepare the ONVIF peers venv {venv} ({' '.join(cmd[:4])} ...): "
                               f"{(r.stderr or r.stdout).strip()[-800:]}")
    if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
        raise RuntimeError(f"{venv}: ipycam installed but does not import")
    return python


# Run inside .venv-peers. ipycam binds every interface and the fixed WS-Discovery port 3702, multicasts
# Hello/Bye on the default interface, starts ffmpeg encoders and probes for go2rtc on fixed ports; the
# launcher keeps its HTTP server on 127.0.0.1, its discovery socket on the port it is given (bound to all
# addresses, joined to the group on 127.0.0.1), silences Hello/Bye, keeps to the MJPEG path (no RTSP
# encoding: the RTSP tests have their own server) and feeds it frames so its snapshot has an image.
_IPYCAM_LAUNCHER = r"""
import sys, time, threading, socketserver
import numpy as np
import ipycam, ipycam.camera as cammod, ipycam.discovery as discmod
from ipycam import CameraConfig, IPCamera

http_port, ws_port, user, password = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]

class LoopbackServer(cammod.ReusableThreadingTCPServer):
    def __init__(self, addr, handler):
        super().__init__(("127.0.0.1", addr[1]), handler)

cammod.ReusableThreadingTCPServer = LoopbackServer
cammod.is_native_rtsp_available = lambda: False
cammod.is_webrtc_available = lambda: False
cammod.check_go2rtc_running = lambda *a, **k: False
cammod.check_rtsp_port_available = lambda *a, **k: False
discmod.WSDiscoveryServer.MULTICAST_PORT = ws_port
discmod.WSDiscoveryServer._send_announcement = lambda self, action: None  # its Hello/Bye would leave via eth0

cfg = CameraConfig(name="ipycam-peer", local_ip="127.0.0.1", onvif_port=http_port, rtsp_port=http_port + 1,
                   main_width=1280, main_height=720, main_fps=5, sub_width=640, sub_height=360, sub_fps=5,
                   show_timestamp=False, username=user, password=password)
cfg._config_path = "/nonexistent/ipycam.json"
cam = IPCamera(cfg)
if not cam.start():
    sys.exit(3)
frame = np.zeros((720, 1280, 3), np.uint8)
frame[:, :, 2] = 200
print("READY", flush=True)
try:
    while True:
        cam.stream(frame)
        time.sleep(0.2)
except KeyboardInterrupt:
    pass
finally:
    cam.stop()
"""


class IpycamPeer:
    """ipycam in its own process (from .venv-peers) on 127.0.0.1: ONVIF+HTTP on ``port``, WS-Discovery on
    ``discovery_port`` (UDP, also joined to 239.255.255.250 on the loopback interface)."""

    def __init__(self, *, username: str = "admin", password: str = "ipycam-pw") -> None:
        self.username, self.password = username, password
        self.port = free_port()
        self.discovery_port = free_udp_port()
        self._proc: subprocess.Popen[str] | None = None
        self.log: Path | None = None

    def __enter__(self) -> IpycamPeer:
        python = ensure_peers_venv()
        # Its log goes to a file, not a pipe: nothing has to drain it while it runs.
        log = self.log = Path(tempfile.mkstemp(prefix="ipycam-", suffix=".log")[1])
        with log.open("w") as out:
            self._proc = subprocess.Popen(
                [str(python), "-c", _IPYCAM_LAUNCHER, str(self.port), str(self.discovery_port), self.username,
                 self.password], stdout=out, stderr=subprocess.STDOUT, text=True, cwd=tempfile.gettempdir())
        deadline = time.monotonic() + 30
        while "READY" not in log.read_text():
            if self._proc.poll() is not None:
                raise RuntimeError(f"ipycam exited with {self._proc.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("ipycam did not start within 30 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        if self.log is not None:
            self.log.unlink(missing_ok=True)


@contextmanager
def ipycam_peer() -> Iterator[IpycamPeer]:
    with IpycamPeer() as peer:
        yield peer


if __name__ == "__main__":
    if sys.argv[1:] == ["--ensure-venv"]:
        try:
            print(ensure_peers_venv())
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
    else:
        print("usage: python -m tests.onvif_peer --ensure-venv", file=sys.stderr)
        sys.exit(2)
