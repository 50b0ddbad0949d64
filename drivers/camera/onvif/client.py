"""One ONVIF camera: a typed async wrapper over onvif-zeep-async (module ``onvif``).

What it gives: device information, the camera's clock offset, media profiles (Media2 when the camera has
it, else Media1) with their RTSP and snapshot URIs, the choice of a detection sub-stream and a recording
main stream (:func:`choose_streams`, pure), a JPEG snapshot with a size cap, PTZ presets as actions, and
the DeviceIO relay outputs as named outputs.

Policies:

- Errors are translated here, at the edge, into three types (cause kept): :class:`CameraUnavailable`
  (no connection, timeout), :class:`CameraAuthError` (credentials refused, including the WS-Security
  "not authorized" a camera answers when its clock is 5 s or more off ours, with a hint saying so) and
  :class:`CameraProtocolError` (a SOAP fault or an answer we cannot use; ``fault`` and ``http_status``
  say which). Nothing returns None to mean failure.
- Authentication (``auth``): ``"auto"`` (default) sends a WS-Security UsernameToken (PasswordDigest) on
  every SOAP call, as the library does, and also answers an HTTP Digest challenge when the camera sends
  one (a 401 with ``WWW-Authenticate: Digest``); ``"ws-security"`` sends only the UsernameToken; ``"digest"``
  sends no WS-Security header and relies on HTTP Digest alone. The library itself only does WS-Security
  on SOAP calls (HTTP Digest only for snapshots); the HTTP Digest part is ours: every service of a camera
  posts through one aiohttp session of ours that carries aiohttp's ``DigestAuthMiddleware``.
- Clock: the library measures the offset from an unauthenticated GetSystemDateAndTime (whole seconds)
  and, with ``apply_clock_offset`` (default), adds it to every UsernameToken's Created time; the same
  offset (:attr:`OnvifCamera.clock_offset`, camera minus ours) corrects event times. Without it a camera
  5 s+ off refuses every call.
- Secrets: the password is never in a message, a log line or ``repr``; URLs are logged through
  :func:`redact_url`. The library logs whole SOAP envelopes (UsernameToken digests included) at DEBUG:
  its transport logger is held at INFO here. Importing ``onvif`` calls ``logging.basicConfig`` (a root
  handler at INFO in whichever process imports it first): the import below undoes that; and its camera
  constructor deletes ``http_proxy``/``https_proxy`` from the process environment: they are put back.
- Timeouts: ``connect_timeout_s`` bounds the whole connect sequence, ``request_timeout_s`` each call.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import datetime as dt
import hashlib
import importlib
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import zeep.exceptions
from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type information

from edgeagent.kernel.errors import DeviceProtocolError, DeviceUnavailable, EdgeagentError


def _import_onvif() -> Any:
    """Import the library without its import-time ``logging.basicConfig`` taking over the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    module = importlib.import_module("onvif")
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    return module


_onvif = _import_onvif()
_onvif_exceptions = importlib.import_module("onvif.exceptions")
ONVIFCamera: Any = _onvif.ONVIFCamera
ONVIFError: type[Exception] = _onvif_exceptions.ONVIFError
ONVIFAuthError: type[Exception] = _onvif_exceptions.ONVIFAuthError
ONVIFTimeoutError: type[Exception] = _onvif_exceptions.ONVIFTimeoutError
# Whole envelopes (WS-Security digests and nonces) are logged at DEBUG by these.
for _name in ("onvif.zeep_aiohttp", "zeep.transports", "zeep.wsdl.bindings.soap"):
    logging.getLogger(_name).setLevel(max(logging.getLogger(_name).level, logging.INFO))

log = logging.getLogger(__name__)

AuthMode = Literal["auto", "ws-security", "digest"]

NS_DEVICE = "http://www.onvif.org/ver10/device/wsdl"
NS_MEDIA1 = "http://www.onvif.org/ver10/media/wsdl"
NS_MEDIA2 = "http://www.onvif.org/ver20/media/wsdl"
NS_EVENTS = "http://www.onvif.org/ver10/events/wsdl"
NS_DEVICEIO = "http://www.onvif.org/ver10/deviceIO/wsdl"
NS_PTZ = "http://www.onvif.org/ver20/ptz/wsdl"
_SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
_WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
_WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
_PW_DIGEST = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordDigest"
_B64 = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-soap-message-security-1.0#Base64Binary"
_XML_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
_CLOCK_TOLERANCE_S = 5.0
_SNAPSHOT_CHUNK = 64 * 1024


# ------------------------------------------------------------------------------------------ errors

class CameraError(EdgeagentError):
    """Base of the camera boundary's errors."""


class CameraUnavailable(CameraError, DeviceUnavailable):
    """The camera cannot be reached or does not answer in time."""


class CameraAuthError(CameraError):
    """The camera refused our credentials (retrying will not help until they or its clock are fixed)."""


@dataclass(frozen=True, slots=True)
class FaultInfo:
    """A SOAP fault as the camera sent it (code and subcodes are local names, e.g. 'NotAuthorized')."""

    code: str
    subcodes: tuple[str, ...]
    reason: str

    def names(self) -> str:
        return " ".join((self.code, *self.subcodes, self.reason)).lower()


class CameraProtocolError(CameraError, DeviceProtocolError):
    """The camera answered something we cannot use: a SOAP fault, an HTTP error, malformed XML."""

    def __init__(self, message: str, *, fault: FaultInfo | None = None, http_status: int | None = None) -> None:
        super().__init__(message)
        self.fault = fault
        self.http_status = http_status


def redact_url(url: str) -> str:
    """'rtsp://user:pw@host/x' -> 'rtsp://user:***@host/x' (for logs and messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None and "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


# The HTTP status of the last response seen by the current task (set by our session's middleware):
# zeep turns a non-XML error page into an AttributeError, and the status is what tells a 401 from a 500.
_last_status: contextvars.ContextVar[int | None] = contextvars.ContextVar("onvif_last_status", default=None)


async def _status_middleware(req: aiohttp.ClientRequest,
                             handler: Callable[[aiohttp.ClientRequest], Awaitable[aiohttp.ClientResponse]]
                             ) -> aiohttp.ClientResponse:
    resp = await handler(req)
    _last_status.set(resp.status)
    return resp


def _fault_info(fault: zeep.exceptions.Fault) -> FaultInfo:
    def local(q: Any) -> str:
        text = str(getattr(q, "localname", None) or q or "")
        return text.rsplit("}", 1)[-1].rsplit(":", 1)[-1]

    subcodes = tuple(local(s) for s in (fault.subcodes or ()))
    return FaultInfo(code=local(fault.code), subcodes=subcodes, reason=str(fault.message or "")[:300])


def _is_auth_fault(info: FaultInfo) -> bool:
    names = info.names()
    return any(k in names for k in ("notauthorized", "not authorized", "unauthorized", "authority failure",
                                    "authentication", "failedauthentication", "invalidsecurity"))


def translate_error(exc: BaseException, what: str, *, camera: str, timeout_s: float | None = None,
                    clock_hint: str = "") -> CameraError:
    """Library/transport exception -> one of our three types. ``what`` names the call for the message."""
    inner: BaseException = exc
    while isinstance(inner, ONVIFError) and inner.__cause__ is not None and inner.__cause__ is not inner:
        inner = inner.__cause__
    status = _last_status.get()
    prefix = f"{camera}: {what}"
    if isinstance(inner, CameraError):
        return inner
    if isinstance(inner, ONVIFAuthError) or status in (401, 403):
        return CameraAuthError(f"{prefix}: the camera refused the credentials (HTTP {status or 401}){clock_hint}")
    if isinstance(inner, TimeoutError | ONVIFTimeoutError | aiohttp.ServerTimeoutError):
        limit = f" within {timeout_s:g} s" if timeout_s else ""
        return CameraUnavailable(f"{prefix}: no answer{limit}")
    if isinstance(inner, aiohttp.ClientConnectionError | ConnectionError | OSError):
        return CameraUnavailable(f"{prefix}: cannot connect ({type(inner).__name__}: {_short(inner)})")
    if isinstance(inner, zeep.exceptions.Fault) and not inner.code and not inner.subcodes and status:
        # zeep's "Unknown fault occured": an HTTP error whose body is no SOAP fault (an HTML error page).
        return CameraProtocolError(f"{prefix}: HTTP {status} without a SOAP fault", http_status=status)
    if isinstance(inner, zeep.exceptions.Fault):
        info = _fault_info(inner)
        if _is_auth_fault(info):
            return CameraAuthError(f"{prefix}: the camera refused the credentials ({info.reason or info.code})"
                                   f"{clock_hint}")
        detail = "/".join(info.subcodes) or info.code
        return CameraProtocolError(f"{prefix}: SOAP fault {detail}: {info.reason}", fault=info, http_status=status)
    if isinstance(inner, zeep.exceptions.TransportError):
        code = inner.status_code or status
        if code in (401, 403):
            return CameraAuthError(f"{prefix}: the camera refused the credentials (HTTP {code}){clock_hint}")
        return CameraProtocolError(f"{prefix}: HTTP {code}", http_status=code)
    if status is not None and status >= 400:
        return CameraProtocolError(f"{prefix}: HTTP {status} with an unreadable body", http_status=status)
    return CameraProtocolError(f"{prefix}: unexpected answer ({type(inner).__name__}: {_short(inner)})",
                               http_status=status)


def _short(exc: BaseException) -> str:
    return str(exc).replace("\n", " ")[:200]


# Everything the library, zeep, lxml and aiohttp raise on a bad exchange; anything else is our bug.
_CALL_ERRORS: tuple[type[BaseException], ...] = (
    ONVIFError, zeep.exceptions.Error, aiohttp.ClientError, OSError, TimeoutError, etree.LxmlError,
    AttributeError, TypeError, KeyError, IndexError, ValueError,
)


# ------------------------------------------------------------------------------------------ types

@dataclass(frozen=True, slots=True)
class DeviceInfo:
    manufacturer: str
    model: str
    firmware: str
    serial: str
    hardware_id: str = ""


@dataclass(frozen=True, slots=True)
class StreamProfile:
    """A media profile with its video encoder settings and URIs (None when the camera gave none)."""

    token: str
    name: str
    media: Literal[1, 2]
    encoding: str  # H264, H265, JPEG, MPEG4 ...
    width: int
    height: int
    fps: float | None = None
    bitrate_kbps: int | None = None
    video_source: str | None = None  # VideoSourceConfiguration token (events name it)
    ptz: bool = False
    stream_uri: str | None = None
    snapshot_uri: str | None = None

    @property
    def area(self) -> int:
        return self.width * self.height


class StreamChoice(NamedTuple):
    detect: StreamProfile
    record: StreamProfile


@dataclass(frozen=True, slots=True)
class PtzPreset:
    token: str
    name: str


@dataclass(frozen=True, slots=True)
class RelayOutput:
    token: str
    name: str  # the configured name, or the token when none is configured
    mode: str  # Monostable (pulses for delay_s) or Bistable
    delay_s: float | None
    idle_state: str  # open or closed


_CODEC_RANK = {"H264": 0, "H265": 1, "HEVC": 1, "MPEG4": 2, "JPEG": 3, "MJPEG": 3}


def choose_streams(profiles: Sequence[StreamProfile], *, detect_min_width: int = 640,
                   detect_token: str | None = None, record_token: str | None = None) -> StreamChoice:
    """Pick the detection sub-stream and the recording main stream.

    detect: the configured profile (``detect_token``), else the smallest profile at least
    ``detect_min_width`` wide (decoding is the hidden cost, paid on every frame), ties to the cheaper codec;
    when none is that wide, the widest.
    record: the configured profile (``record_token``), else the largest H.264/H.265 profile (clips are cut
    from its packets without re-encoding), else the largest of any codec. Ties resolve by token, so the
    answer does not depend on the order the camera listed its profiles in.
    """
    video = [p for p in profiles if p.width > 0 and p.height > 0]
    if not video:
        raise CameraProtocolError("the camera reports no video profile with a resolution")

    def by_token(token: str, role: str) -> StreamProfile:
        for p in profiles:
            if p.token == token:
                return p
        raise CameraProtocolError(f"{role} profile {token!r} is not on the camera "
                                  f"(it has: {', '.join(sorted(q.token for q in profiles))})")

    def codec(p: StreamProfile) -> int:
        return _CODEC_RANK.get(p.encoding.upper(), 4)

    if detect_token is not None:
        detect = by_token(detect_token, "detect")
    else:
        wide = [p for p in video if p.width >= detect_min_width]
        if wide:
            detect = min(wide, key=lambda p: (p.area, codec(p), p.token))
        else:
            detect = min(video, key=lambda p: (-p.area, codec(p), p.token))
    if record_token is not None:
        record = by_token(record_token, "record")
    else:
        h26x = [p for p in video if p.encoding.upper() in ("H264", "H265", "HEVC")] or video
        record = min(h26x, key=lambda p: (-p.area, -(p.fps or 0.0), codec(p), p.token))
    return StreamChoice(detect=detect, record=record)


# ------------------------------------------------------------------------------------------ camera

def _get(obj: Any, *path: str) -> Any:
    for name in path:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    return obj


def _str(value: Any, limit: int = 200) -> str:
    return "" if value is None else str(value).strip()[:limit]


def _int(value: Any) -> int:
    try:
        return int(float(str(value)))
    except (TypeError, ValueError, OverflowError):
        return 0


def _float(value: Any) -> float | None:
    try:
        f = float(str(value))
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


_DURATION = re.compile(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?")


def _duration_s(value: Any) -> float | None:
    """xs:duration (PT2S, PT1M30S) or a timedelta -> seconds."""
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    m = _DURATION.fullmatch(_str(value))
    if m is None or not any(m.groups()):
        return None
    d, h, mi, sec = m.groups()
    return int(d or 0) * 86400 + int(h or 0) * 3600 + int(mi or 0) * 60 + float(sec or 0)


def _local(tag: Any) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _child(el: Any, name: str) -> Any:
    if el is None:
        return None
    for c in el.iterchildren():
        if _local(c.tag) == name:
            return c
    return None


def _child_text(el: Any, *path: str) -> str:
    for name in path:
        el = _child(el, name)
    return "" if el is None else (el.text or "").strip()[:500]


class OnvifCamera:
    """One camera over ONVIF. ``async with OnvifCamera(...) as cam:`` connects (device info, clock offset,
    services, profiles and URIs) and closes its HTTP sessions on exit. Reusable, not re-entrant."""

    def __init__(self, host: str, port: int = 80, username: str = "", password: str = "", *, name: str = "",
                 auth: AuthMode = "auto", apply_clock_offset: bool = True, connect_timeout_s: float = 10.0,
                 request_timeout_s: float = 10.0, snapshot_max_bytes: int = 8_000_000,
                 relay_names: Mapping[str, str] | None = None) -> None:
        self.host, self.port = host, int(port)
        self.name = name or f"{host}:{port}"
        self.username = username
        self._password = password
        self.auth: AuthMode = auth
        self.apply_clock_offset = apply_clock_offset
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self.snapshot_max_bytes = snapshot_max_bytes
        self.relay_names = dict(relay_names or {})  # name -> relay token
        self.device_info: DeviceInfo | None = None
        self.clock_offset = dt.timedelta(0)  # camera minus ours; zero until measured
        self.clock_offset_measured: dt.timedelta | None = None
        self.services: dict[str, str] = {}  # namespace -> XAddr
        self.profiles: list[StreamProfile] = []
        self.connect_s: float | None = None
        self._cam: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._presets: dict[str, list[PtzPreset]] = {}

    def __repr__(self) -> str:
        return f"OnvifCamera({self.name!r}, user={self.username!r}, auth={self.auth!r})"

    # ---- lifecycle
    async def __aenter__(self) -> OnvifCamera:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._cam is not None

    async def connect(self) -> None:
        """Connect and read what the camera is: raises CameraUnavailable, CameraAuthError or
        CameraProtocolError (test before configure: nothing is kept when it fails)."""
        await self.close()
        started = time.monotonic()
        self._session = self._make_session()
        self._cam = self._make_camera()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                try:
                    await self._cam.update_xaddrs()
                except _CALL_ERRORS as exc:
                    raise translate_error(exc, "connect", camera=self.name, timeout_s=self.connect_timeout_s,
                                          clock_hint=await self._clock_hint()) from exc
                self.services = dict(self._cam.xaddrs)
                diff = self._cam.dt_diff
                if isinstance(diff, dt.timedelta):
                    self.clock_offset = self.clock_offset_measured = diff
                self.device_info = await self.get_device_info()
                if not self.apply_clock_offset:
                    self.clock_offset_measured = await self._measure_offset()
                self.profiles = await self.get_profiles()
        except TimeoutError as exc:
            await self.close()
            raise CameraUnavailable(f"{self.name}: connect: no answer within {self.connect_timeout_s:g} s") from exc
        except BaseException:
            await self.close()
            raise
        self.connect_s = time.monotonic() - started
        offset = self.clock_offset_measured
        log.info("%s: connected in %.2f s (%s %s, firmware %s; clock offset %s s; %d profiles)", self.name,
                 self.connect_s, self.device_info.manufacturer if self.device_info else "?",
                 self.device_info.model if self.device_info else "?",
                 self.device_info.firmware if self.device_info else "?",
                 "?" if offset is None else f"{offset.total_seconds():+.0f}", len(self.profiles))

    async def refresh(self) -> list[StreamProfile]:
        """Reconnect from scratch (after a camera reboot): clock offset, services, profiles and URIs."""
        await self.connect()
        self._presets.clear()
        return list(self.profiles)

    async def close(self) -> None:
        cam, session = self._cam, self._session
        self._cam = self._session = None
        if cam is not None:
            try:
                await cam.close()
            except _CALL_ERRORS as exc:
                log.debug("%s: closing the ONVIF client: %s", self.name, _short(exc))
        if session is not None:
            await session.close()

    def _make_session(self) -> aiohttp.ClientSession:
        middlewares: list[Any] = [_status_middleware]
        if self.auth in ("auto", "digest"):
            middlewares.append(aiohttp.DigestAuthMiddleware(self.username, self._password, preemptive=True))
        timeout = aiohttp.ClientTimeout(total=None, connect=self.request_timeout_s)
        return aiohttp.ClientSession(middlewares=tuple(middlewares), timeout=timeout)

    def _make_camera(self) -> Any:
        owner = self

        class _Camera(ONVIFCamera):  # type: ignore[misc]  # the library is untyped (Any base)
            async def create_onvif_service(self, name: str, port_type: str | None = None,
                                           read_timeout: int | None = None, write_timeout: int | None = None
                                           ) -> Any:
                service = await super().create_onvif_service(name, port_type, read_timeout, write_timeout)
                owner._adapt(service)
                return service

        # The library's constructor deletes http_proxy/https_proxy from the whole process's environment.
        saved = {k: os.environ[k] for k in ("http_proxy", "https_proxy") if k in os.environ}
        try:
            return _Camera(self.host, self.port, self.username, self._password, adjust_time=self.apply_clock_offset)
        finally:
            os.environ.update(saved)

    def _adapt(self, service: Any) -> None:
        """Route a library service through our session (HTTP Digest, status capture); drop WS-Security
        in digest-only mode. ``transport.session`` is the public attribute of the library's transport."""
        if self._session is not None and service.transport.session is not self._session:
            service.transport.session = self._session
        if self.auth == "digest":
            service.ws_client = service.ws_client_authless

    # ---- calls
    async def _service(self, name: str) -> Any:
        if self._cam is None:
            raise CameraUnavailable(f"{self.name}: not connected")
        try:
            return await self._cam.create_onvif_service(name)
        except _CALL_ERRORS as exc:
            raise translate_error(exc, f"{name} service", camera=self.name) from exc

    async def call(self, service: str, operation: str, params: Mapping[str, Any] | None = None, *,
                   timeout_s: float | None = None) -> Any:
        """One SOAP operation on a library service (``"devicemgmt"``, ``"media"``, ``"ptz"``, ...),
        translated errors, bounded time."""
        svc = await self._service(service)
        limit = timeout_s or self.request_timeout_s
        _last_status.set(None)
        try:
            async with asyncio.timeout(limit):
                return await getattr(svc, operation)(dict(params) if params is not None else None)
        except _CALL_ERRORS as exc:
            raise translate_error(exc, operation, camera=self.name, timeout_s=limit,
                                  clock_hint=await self._clock_hint(exc)) from exc

    async def _measure_offset(self) -> dt.timedelta | None:
        """Camera clock minus ours from an unauthenticated GetSystemDateAndTime (None if unavailable)."""
        if self._cam is None:
            return None
        try:
            async with asyncio.timeout(self.request_timeout_s):
                svc = await self._cam.create_devicemgmt_service()
                t0 = dt.datetime.now(dt.UTC)
                answer = await svc.authless_GetSystemDateAndTime()
                t1 = dt.datetime.now(dt.UTC)
        except _CALL_ERRORS:
            return None
        utc = _get(answer, "UTCDateTime")
        try:
            cam = dt.datetime(_int(_get(utc, "Date", "Year")), _int(_get(utc, "Date", "Month")),
                              _int(_get(utc, "Date", "Day")), _int(_get(utc, "Time", "Hour")),
                              _int(_get(utc, "Time", "Minute")), _int(_get(utc, "Time", "Second")), tzinfo=dt.UTC)
        except ValueError:
            return None
        # The camera reports whole seconds: its true time is on average half a second later.
        return cam + dt.timedelta(seconds=0.5) - (t0 + (t1 - t0) / 2)

    async def _clock_hint(self, exc: BaseException | None = None) -> str:
        """For an auth failure: say so when the camera's clock is far enough off to explain it."""
        if exc is not None:
            inner: BaseException = exc
            while isinstance(inner, ONVIFError) and inner.__cause__ is not None:
                inner = inner.__cause__
            is_auth = (isinstance(inner, zeep.exceptions.Fault) and _is_auth_fault(_fault_info(inner))) or \
                _last_status.get() in (401, 403) or isinstance(inner, ONVIFAuthError)
            if not is_auth:
                return ""
        status = _last_status.get()
        offset = await self._measure_offset()
        _last_status.set(status)
        if offset is None:
            return ""
        self.clock_offset_measured = offset
        seconds = offset.total_seconds()
        if abs(seconds) < _CLOCK_TOLERANCE_S:
            return ""
        side = "ahead of" if seconds > 0 else "behind"
        if self.apply_clock_offset:
            return (f" (the camera's clock is {abs(seconds):.0f} s {side} this box's; that offset was applied to "
                    "the WS-Security timestamps, so the credentials are the likely cause)")
        return (f" (hint: the camera's clock is {abs(seconds):.0f} s {side} this box's and WS-Security timestamps "
                f"more than ~{_CLOCK_TOLERANCE_S:.0f} s off are refused: enable apply_clock_offset or fix the "
                "camera's NTP)")

    # ---- device
    async def get_device_info(self) -> DeviceInfo:
        r = await self.call("devicemgmt", "GetDeviceInformation")
        return DeviceInfo(manufacturer=_str(_get(r, "Manufacturer")), model=_str(_get(r, "Model")),
                          firmware=_str(_get(r, "FirmwareVersion")), serial=_str(_get(r, "SerialNumber")),
                          hardware_id=_str(_get(r, "HardwareId")))

    # ---- media
    async def get_profiles(self, *, with_uris: bool = True) -> list[StreamProfile]:
        """Media2 profiles when the camera has Media2 (it describes H.265), else Media1; with URIs."""
        profiles: list[StreamProfile] = []
        if NS_MEDIA2 in self.services:
            try:
                profiles = await self._media2_profiles()
            except CameraProtocolError as exc:
                log.info("%s: Media2 GetProfiles failed (%s); using Media1", self.name, exc)
        if not profiles and NS_MEDIA1 in self.services:
            answer = await self.call("media", "GetProfiles")
            profiles = [self._media1_profile(p) for p in (answer or [])]
        if with_uris:
            profiles = [await self._with_uris(p) for p in profiles]
        return profiles

    @staticmethod
    def _media1_profile(p: Any) -> StreamProfile:
        enc = _get(p, "VideoEncoderConfiguration")
        return StreamProfile(
            token=_str(_get(p, "token")), name=_str(_get(p, "Name")), media=1,
            encoding=_str(_get(enc, "Encoding")) or "?", width=_int(_get(enc, "Resolution", "Width")),
            height=_int(_get(enc, "Resolution", "Height")), fps=_float(_get(enc, "RateControl", "FrameRateLimit")),
            bitrate_kbps=_int(_get(enc, "RateControl", "BitrateLimit")) or None,
            video_source=_str(_get(p, "VideoSourceConfiguration", "token")) or None,
            ptz=_get(p, "PTZConfiguration") is not None)

    async def _media2_profiles(self) -> list[StreamProfile]:
        body = await self.raw_call(self.services[NS_MEDIA2], NS_MEDIA2, "GetProfiles", {"Type": "All"})
        out = []
        for el in body.iterchildren():
            if _local(el.tag) != "Profiles":
                continue
            conf = _child(el, "Configurations")
            enc = _child(conf, "VideoEncoder")
            src = _child(conf, "VideoSource")
            out.append(StreamProfile(
                token=_str(el.get("token")), name=_child_text(el, "Name"), media=2,
                encoding=_child_text(enc, "Encoding") or "?", width=_int(_child_text(enc, "Resolution", "Width")),
                height=_int(_child_text(enc, "Resolution", "Height")),
                fps=_float(_child_text(enc, "RateControl", "FrameRateLimit")),
                bitrate_kbps=_int(_child_text(enc, "RateControl", "BitrateLimit")) or None,
                video_source=_str(src.get("token")) if src is not None else None,
                ptz=_child(conf, "PTZ") is not None))
        return out

    async def _with_uris(self, p: StreamProfile) -> StreamProfile:
        stream = snapshot = None
        try:
            stream = await self.get_stream_uri(p)
        except CameraProtocolError as exc:
            log.info("%s: no stream URI for profile %s: %s", self.name, p.token, exc)
        try:
            snapshot = await self.get_snapshot_uri(p)
        except CameraProtocolError as exc:
            log.debug("%s: no snapshot URI for profile %s: %s", self.name, p.token, exc)
        return replace(p, stream_uri=stream, snapshot_uri=snapshot)

    async def get_stream_uri(self, profile: StreamProfile) -> str:
        """RTSP URI of a profile, asking for RTP over RTSP (TCP interleaved)."""
        if profile.media == 2:
            body = await self.raw_call(self.services[NS_MEDIA2], NS_MEDIA2, "GetStreamUri",
                                       {"Protocol": "RTSP", "ProfileToken": profile.token})
            uri = _child_text(body, "Uri")
        else:
            r = await self.call("media", "GetStreamUri", {
                "StreamSetup": {"Stream": "RTP-Unicast", "Transport": {"Protocol": "RTSP"}},
                "ProfileToken": profile.token})
            uri = _str(_get(r, "Uri"), 2000)
        if not uri:
            raise CameraProtocolError(f"{self.name}: GetStreamUri({profile.token}) gave no URI")
        return uri

    async def get_snapshot_uri(self, profile: StreamProfile) -> str:
        if profile.media == 2:
            body = await self.raw_call(self.services[NS_MEDIA2], NS_MEDIA2, "GetSnapshotUri",
                                       {"ProfileToken": profile.token})
            uri = _child_text(body, "Uri")
        else:
            r = await self.call("media", "GetSnapshotUri", {"ProfileToken": profile.token})
            uri = _str(_get(r, "Uri"), 2000)
        if not uri:
            raise CameraProtocolError(f"{self.name}: GetSnapshotUri({profile.token}) gave no URI")
        return uri

    def streams(self, *, detect_min_width: int = 640, detect_token: str | None = None,
                record_token: str | None = None) -> StreamChoice:
        return choose_streams(self.profiles, detect_min_width=detect_min_width, detect_token=detect_token,
                              record_token=record_token)

    async def snapshot(self, profile: StreamProfile | None = None, *, max_bytes: int | None = None) -> bytes:
        """A JPEG from the snapshot URI of ``profile`` (default: the recording main stream), over HTTP
        with Digest (answered by the session) or Basic (retried once on a Basic challenge); at most
        ``max_bytes`` (default ``snapshot_max_bytes``) or CameraProtocolError."""
        if profile is None:
            candidates = [p for p in self.profiles if p.snapshot_uri]
            if not candidates:
                raise CameraProtocolError(f"{self.name}: the camera offers no snapshot URI")
            profile = max(candidates, key=lambda p: p.area)
        uri = profile.snapshot_uri or await self.get_snapshot_uri(profile)
        cap = max_bytes or self.snapshot_max_bytes
        if self._session is None:
            raise CameraUnavailable(f"{self.name}: not connected")
        try:
            async with asyncio.timeout(self.request_timeout_s):
                data = await self._fetch(uri, cap, basic=False)
                if data is None:
                    data = await self._fetch(uri, cap, basic=True)
                if data is None:
                    raise CameraAuthError(f"{self.name}: snapshot {redact_url(uri)}: credentials refused")
        except CameraError:
            raise
        except TimeoutError as exc:
            raise CameraUnavailable(f"{self.name}: snapshot: no answer within {self.request_timeout_s:g} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise CameraUnavailable(f"{self.name}: snapshot {redact_url(uri)}: {type(exc).__name__}") from exc
        if not data.startswith(b"\xff\xd8"):
            raise CameraProtocolError(f"{self.name}: snapshot {redact_url(uri)} is not a JPEG")
        return data

    async def _fetch(self, uri: str, cap: int, *, basic: bool) -> bytes | None:
        """Body of a GET, or None on 401 (so the caller can retry with Basic)."""
        assert self._session is not None
        headers = {}
        if basic:
            token = base64.b64encode(f"{self.username}:{self._password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        async with self._session.get(uri, headers=headers, allow_redirects=False) as resp:
            if resp.status == 401:
                return None
            if resp.status != 200:
                raise CameraProtocolError(f"{self.name}: snapshot {redact_url(uri)}: HTTP {resp.status}",
                                          http_status=resp.status)
            if resp.content_length is not None and resp.content_length > cap:
                raise CameraProtocolError(f"{self.name}: snapshot of {resp.content_length} bytes exceeds the "
                                          f"{cap}-byte cap")
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(_SNAPSHOT_CHUNK):
                size += len(chunk)
                if size > cap:
                    raise CameraProtocolError(f"{self.name}: snapshot exceeds the {cap}-byte cap")
                chunks.append(chunk)
            return b"".join(chunks)

    # ---- raw SOAP (Media2: the library ships no Media2 WSDL)
    def _security_header(self) -> Any:
        sec = etree.Element(f"{{{_WSSE}}}Security", nsmap={"wsse": _WSSE, "wsu": _WSU})
        sec.set(f"{{{_SOAP12}}}mustUnderstand", "true")
        token = etree.SubElement(sec, f"{{{_WSSE}}}UsernameToken")
        nonce = os.urandom(16)
        now = dt.datetime.now(dt.UTC) + (self.clock_offset if self.apply_clock_offset else dt.timedelta(0))
        created = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
        # The UsernameToken profile defines PasswordDigest with SHA-1.
        digest = base64.b64encode(hashlib.sha1(nonce + created.encode() + self._password.encode()).digest())  # noqa: S324
        etree.SubElement(token, f"{{{_WSSE}}}Username").text = self.username
        pw = etree.SubElement(token, f"{{{_WSSE}}}Password", Type=_PW_DIGEST)
        pw.text = digest.decode()
        etree.SubElement(token, f"{{{_WSSE}}}Nonce", EncodingType=_B64).text = base64.b64encode(nonce).decode()
        etree.SubElement(token, f"{{{_WSU}}}Created").text = created
        return sec

    async def raw_call(self, url: str, namespace: str, operation: str, params: Mapping[str, str]) -> Any:
        """A SOAP 1.2 call built here (flat string parameters); returns the response element of the Body."""
        if self._session is None:
            raise CameraUnavailable(f"{self.name}: not connected")
        env = etree.Element(f"{{{_SOAP12}}}Envelope", nsmap={"s": _SOAP12, "m": namespace})
        header = etree.SubElement(env, f"{{{_SOAP12}}}Header")
        if self.auth != "digest":
            header.append(self._security_header())
        op = etree.SubElement(etree.SubElement(env, f"{{{_SOAP12}}}Body"), f"{{{namespace}}}{operation}")
        for key, value in params.items():
            etree.SubElement(op, f"{{{namespace}}}{key}").text = value
        payload = etree.tostring(env, xml_declaration=True, encoding="utf-8")
        ctype = f'application/soap+xml; charset=utf-8; action="{namespace}/{operation}"'
        _last_status.set(None)
        try:
            async with asyncio.timeout(self.request_timeout_s):
                async with self._session.post(url, data=payload, headers={"Content-Type": ctype}) as resp:
                    status = resp.status
                    content = await resp.content.read(4_000_000)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise translate_error(exc, operation, camera=self.name, timeout_s=self.request_timeout_s) from exc
        if status in (401, 403):
            raise CameraAuthError(f"{self.name}: {operation}: the camera refused the credentials (HTTP {status})"
                                  f"{await self._clock_hint()}")
        try:
            root = etree.fromstring(content, _XML_PARSER)
        except etree.XMLSyntaxError as exc:
            raise CameraProtocolError(f"{self.name}: {operation}: HTTP {status}, not XML", http_status=status) from exc
        body = _child(root, "Body")
        answer = next(iter(body.iterchildren()), None) if body is not None else None
        if answer is None:
            raise CameraProtocolError(f"{self.name}: {operation}: empty SOAP body", http_status=status)
        if _local(answer.tag) == "Fault":
            code = _child(answer, "Code")
            sub = _child(code, "Subcode")
            info = FaultInfo(code=_child_text(code, "Value").rsplit(":", 1)[-1],
                             subcodes=(_child_text(sub, "Value").rsplit(":", 1)[-1],) if sub is not None else (),
                             reason=_child_text(answer, "Reason", "Text")[:300])
            if _is_auth_fault(info):
                raise CameraAuthError(f"{self.name}: {operation}: the camera refused the credentials ({info.reason})"
                                      f"{await self._clock_hint()}")
            raise CameraProtocolError(f"{self.name}: {operation}: SOAP fault {'/'.join(info.subcodes) or info.code}"
                                      f": {info.reason}", fault=info, http_status=status)
        return answer

    # ---- PTZ presets (actions)
    async def ptz_presets(self, profile: StreamProfile | None = None) -> list[PtzPreset]:
        token = self._ptz_profile(profile)
        answer = await self.call("ptz", "GetPresets", {"ProfileToken": token})
        presets = [PtzPreset(token=_str(_get(p, "token")), name=_str(_get(p, "Name")))
                   for p in (answer or [])]
        self._presets[token] = presets
        return presets

    async def goto_preset(self, preset: str, profile: StreamProfile | None = None) -> PtzPreset:
        """Move to a preset given by name or token."""
        token = self._ptz_profile(profile)
        presets = self._presets.get(token) or await self.ptz_presets(profile)
        match = next((p for p in presets if preset in (p.token, p.name)), None)
        if match is None:
            raise CameraProtocolError(f"{self.name}: no PTZ preset {preset!r} "
                                      f"(it has: {', '.join(p.name or p.token for p in presets) or 'none'})")
        await self.call("ptz", "GotoPreset", {"ProfileToken": token, "PresetToken": match.token})
        return match

    def _ptz_profile(self, profile: StreamProfile | None) -> str:
        if profile is not None:
            return profile.token
        with_ptz = [p for p in self.profiles if p.ptz] or self.profiles
        if not with_ptz:
            raise CameraProtocolError(f"{self.name}: no media profile to drive PTZ with")
        return max(with_ptz, key=lambda p: p.area).token

    # ---- relay outputs (named outputs)
    async def relay_outputs(self) -> list[RelayOutput]:
        service = "deviceio" if NS_DEVICEIO in self.services else "devicemgmt"
        answer = await self.call(service, "GetRelayOutputs")
        names = {token: name for name, token in self.relay_names.items()}
        out = []
        for r in answer or []:
            token = _str(_get(r, "token"))
            props = _get(r, "Properties")
            out.append(RelayOutput(token=token, name=names.get(token, token), mode=_str(_get(props, "Mode")),
                                   delay_s=_duration_s(_get(props, "DelayTime")),
                                   idle_state=_str(_get(props, "IdleState"))))
        return out

    async def set_relay(self, output: str, active: bool) -> None:
        """Drive a relay output by its configured name or its token (active = energised)."""
        token = self.relay_names.get(output, output)
        service = "deviceio" if NS_DEVICEIO in self.services else "devicemgmt"
        await self.call(service, "SetRelayOutputState",
                        {"RelayOutputToken": token, "LogicalState": "active" if active else "inactive"})
        log.info("%s: relay %s set %s", self.name, output, "active" if active else "inactive")

    # ---- events plumbing (used by events.PullPointEvents)
    async def events_service(self) -> Any:
        if NS_EVENTS not in self.services:
            raise CameraProtocolError(f"{self.name}: the camera has no event service")
        return await self._service("events")

    async def subscription_services(self, address: str) -> tuple[Any, Any]:
        """(pull service, subscription manager service) bound to a subscription's address."""
        if self._cam is None:
            raise CameraUnavailable(f"{self.name}: not connected")
        self._cam.xaddrs[f"{NS_EVENTS}/PullPointSubscription"] = address
        try:
            pull = await self._cam.create_pullpoint_service()
            manager = await self._cam.create_subscription_service("PullPointSubscription")
        except _CALL_ERRORS as exc:
            raise translate_error(exc, "subscription services", camera=self.name) from exc
        return pull, manager

    async def call_on(self, svc: Any, operation: str, params: Mapping[str, Any] | None = None, *,
                      timeout_s: float | None = None) -> Any:
        """One operation on a service object from :meth:`subscription_services`."""
        limit = timeout_s or self.request_timeout_s
        _last_status.set(None)
        try:
            async with asyncio.timeout(limit):
                return await getattr(svc, operation)(dict(params) if params is not None else None)
        except _CALL_ERRORS as exc:
            raise translate_error(exc, operation, camera=self.name, timeout_s=limit,
                                  clock_hint=await self._clock_hint(exc)) from exc
