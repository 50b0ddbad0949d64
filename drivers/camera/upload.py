"""Evidence leaves the box only on request: the platform's signed ``camera.upload_evidence`` command names a
kept snapshot or clip by sha256 and gives a presigned HTTPS PUT URL; the box PUTs the file there.

Arguments (:class:`UploadEvidenceArgs`): ``sha256``; ``url``, an ``https://`` URL (its query string usually
carries the signature); ``headers``, optional, only names the object stores sign (``Content-Type``,
``Content-MD5``, ``Cache-Control``, ``Content-Disposition``, ``Content-Encoding``, ``Content-Language``,
``Expires`` and the ``x-amz-``, ``x-oss-``, ``x-cos-``, ``x-obs-``, ``x-goog-``, ``x-ms-`` families);
``expires_at``, optional, when the URL stops working. The answer: ``{sha256, kind, bytes, status,
elapsed_ms, attempts}`` (plus ``redacted`` and ``uploaded_sha256`` when the bytes were blurred on the way).

Policies:

* **Where to.** https only; no user info, no fragment, printable ASCII only (the URL is sent exactly as
  given, never re-quoted, so a signature over it stays valid). A host that is, or resolves to, a loopback,
  private, link-local, shared, reserved, multicast or unspecified address is refused (the box must not be
  turned into a way into the compound's LAN or the cloud's metadata service) unless
  ``allow_private_hosts`` is set (a platform on the LAN, tests). Names are checked again when they are
  resolved, just before connecting, so DNS cannot swap in a private address after the check. Numeric host
  forms (``2130706433``, ``0x7f.1``) are read as IPv4 addresses, as browsers do. Redirects are not followed.
* **TLS** is verified against the system's CAs, or the configured ``ca_file`` only.
* **Streaming.** The file is streamed from disk (aiohttp reads it in its executor), with ``Content-Length``
  set (object stores refuse chunked PUTs) and ``Content-Type`` the file's media type unless the platform
  signed another.
* **Concurrency.** ``max_concurrent`` uploads at a time (1 by default: the uplink of a compound is often a
  few Mbit/s, shared with alarms); ``max_waiting`` more (1 by default) wait in arrival order; beyond that the
  command is refused at once with ``busy`` (counted) and the platform asks again later. The bound is small on
  purpose: the command service runs each handler inside one of its few concurrency slots, and an upload
  holds its slot for as long as it runs, so uploads must never fill the slots a gate command needs. An
  upload whose URL expires while it waits gives up.
* **Retries.** 5xx, 408, 425, 429, timeouts and connection errors are retried ``retries`` times with
  exponential backoff (equal jitter; ``Retry-After`` honoured up to ``backoff_max_s``), never past
  ``expires_at``. Other 4xx, 3xx and TLS failures are final: retrying cannot help.
* **Secrets.** The query string (the signature) and header values are never logged nor put in an answer or
  an error: the URL appears as ``https://host[:port]/path``; an error body is reduced to its ``<Code>``.
* **Privacy.** Evidence on the box is kept unblurred (see :mod:`edgeagent.drivers.camera.evidence`). With a
  ``redact`` coroutine configured (:meth:`~edgeagent.drivers.camera.privacy.FaceBlur.redact`, awaited on the
  loop: it waits for the inference engine; decoding and encoding run in a worker thread), a snapshot is
  decoded, redacted and re-encoded before it leaves, so the uploaded bytes differ from the kept file
  (``uploaded_sha256`` in the answer). A redactor that fails refuses the upload (``failed``): nothing
  unblurred is sent. A clip cannot be redacted without re-encoding video, which this box does not do: with
  a redactor configured, clips are refused unless ``upload_unredacted_clips`` is set (a site that has
  decided faces in clips may leave).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import random
import re
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, Literal, Protocol
from urllib.parse import urlsplit

import aiohttp
import cv2
import numpy as np
import numpy.typing as npt
from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver
from pydantic import BaseModel, ConfigDict, Field, field_validator
from yarl import URL

from edgeagent.drivers.camera.evidence import (
    AsyncRedactor,
    EvidenceEntry,
    EvidenceError,
    EvidenceStore,
    apply_async_redactor,
    encode_jpeg,
)
from edgeagent.kernel.errors import CommandRejected, ConfigError, EdgeagentError
from edgeagent.kernel.pipeline.commands import CommandSpec

log = logging.getLogger(__name__)

UPLOAD_COMMAND: Final = "camera.upload_evidence"
EVIDENCE_UPLOADED: Final = "camera.evidence.uploaded"
MAX_URL_CHARS: Final = 4096  # presigned URLs with a session token run to about 2 KB
MAX_HEADERS: Final = 16
MAX_HEADER_VALUE_CHARS: Final = 1024
ALLOWED_HEADERS: Final = frozenset({"content-type", "content-md5", "content-disposition", "content-encoding",
                                    "content-language", "cache-control", "expires"})
ALLOWED_HEADER_PREFIXES: Final = ("x-amz-", "x-oss-", "x-cos-", "x-obs-", "x-goog-", "x-ms-")
_RETRYABLE_STATUS: Final = frozenset({408, 425, 429})
_URL_CHARS_RE: Final = re.compile(r"^[\x21-\x7e]+$")
_LABEL_RE: Final = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_TOKEN_RE: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
_VALUE_RE: Final = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")
_S3_CODE_RE: Final = re.compile(rb"<Code>([A-Za-z0-9._-]{1,64})</Code>")
_REDACTED: Final = "<redacted>"

Code = Literal["bad_args", "busy", "failed"]


class UploadRefused(ValueError):
    """A URL or header this box will not use. The message never contains the query string."""


class UploadError(EdgeagentError):
    """An upload that did not happen. ``code`` is one of the command contract's codes (``bad_args``,
    ``busy``, ``failed``); the message names the host and path, never the signature."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code: Code = code
        self.message = message


# --- validation (pure) --------------------------------------------------------------------------------------


def where(url: str) -> str:
    """``scheme://host[:port]/path``: the form of an upload URL fit for logs, answers and errors."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    path = parts.path if _URL_CHARS_RE.match(parts.path or "/") else "/<path>"
    return f"{parts.scheme}://{host}{f':{port}' if port is not None else ''}{path}"


def _ipv4_from_name(host: str) -> ipaddress.IPv4Address | None:
    """The address a numeric host such as ``127.1`` or ``0x7f000001`` means (as browsers read it), else None.
    A name whose last label is numeric is an address (WHATWG URL): it is never a real domain."""
    last = host.rstrip(".").rsplit(".", 1)[-1]
    if not last or not (last.isdigit() or last.lower().startswith("0x")):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
    except OSError:
        raise UploadRefused(f"the upload host {host[:64]!r} is neither a name nor an address") from None


def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, *, allow_private_hosts: bool) -> bool:
    """Global unicast only; with ``allow_private_hosts`` also loopback, private and link-local. Unspecified,
    multicast and reserved addresses never."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return False
    if allow_private_hosts:
        return True
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local)


def check_upload_url(url: object, *, allow_private_hosts: bool = False) -> str:
    """The URL unchanged when the box may PUT to it, else :class:`UploadRefused` saying why.
    Never raises anything else, whatever it is given."""
    if not isinstance(url, str):
        raise UploadRefused("the upload URL must be a string")
    if len(url) > MAX_URL_CHARS:
        raise UploadRefused(f"the upload URL is longer than {MAX_URL_CHARS} characters")
    if not _URL_CHARS_RE.match(url) or "\\" in url:
        raise UploadRefused("the upload URL must be printable ASCII without spaces or backslashes "
                            "(percent-encode the rest)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UploadRefused("the upload URL cannot be parsed") from None
    if parts.scheme.lower() != "https":
        scheme = parts.scheme.lower() if re.fullmatch(r"[a-z][a-z0-9+.-]{0,15}", parts.scheme.lower()) else "?"
        raise UploadRefused(f"only https upload URLs are accepted (got {scheme}://)")
    if "@" in parts.netloc:
        raise UploadRefused("the upload URL must not carry user info (user:password@)")
    if parts.fragment or url.endswith("#"):
        raise UploadRefused("the upload URL must not have a fragment")
    if port == 0:
        raise UploadRefused("the upload URL's port must not be 0")
    host = parts.hostname
    if not host:
        raise UploadRefused("the upload URL has no host")
    literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    if "[" in parts.netloc:
        try:
            literal = ipaddress.IPv6Address(host)
        except ValueError:
            raise UploadRefused("the upload URL's bracketed host is not an IPv6 address") from None
    else:
        try:
            literal = ipaddress.IPv4Address(host)
        except ValueError:
            literal = _ipv4_from_name(host)
    if literal is not None:
        if not address_allowed(literal, allow_private_hosts=allow_private_hosts):
            raise UploadRefused(f"the upload host {literal} is a loopback, private, link-local or otherwise "
                                "non-public address (allow_private_upload_hosts is off)")
        return url
    name = host.rstrip(".")
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL_RE.match(label) for label in labels):
        raise UploadRefused(f"the upload host {host[:64]!r} is not a valid host name")
    if not allow_private_hosts and (name.lower() == "localhost" or name.lower().endswith(".localhost")):
        raise UploadRefused(f"the upload host {name!r} is this box (allow_private_upload_hosts is off)")
    return url


def check_upload_headers(headers: object) -> dict[str, str]:
    """The headers to send when all are allowed (names in :data:`ALLOWED_HEADERS` or with a prefix in
    :data:`ALLOWED_HEADER_PREFIXES`, values printable ASCII without line breaks), else :class:`UploadRefused`.
    Values are never quoted in the message (a session token may be among them)."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise UploadRefused("upload headers must be an object of names to strings")
    if len(headers) > MAX_HEADERS:
        raise UploadRefused(f"at most {MAX_HEADERS} upload headers")
    out: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in headers.items():
        if not isinstance(name, str) or not _TOKEN_RE.match(name):
            raise UploadRefused("an upload header name is not a valid HTTP token")
        low = name.lower()
        if low not in ALLOWED_HEADERS and not low.startswith(ALLOWED_HEADER_PREFIXES):
            raise UploadRefused(f"upload header {name!r} is not allowed (allowed: {', '.join(sorted(ALLOWED_HEADERS))}"
                                f" and {', '.join(p + '*' for p in ALLOWED_HEADER_PREFIXES)})")
        if low in seen:
            raise UploadRefused(f"upload header {name!r} is given twice")
        if not isinstance(value, str) or len(value) > MAX_HEADER_VALUE_CHARS or not _VALUE_RE.match(value):
            raise UploadRefused(f"upload header {name!r}: the value must be 1 to {MAX_HEADER_VALUE_CHARS} "
                                "printable ASCII characters")
        seen.add(low)
        out[name] = value
    return out


class UploadEvidenceArgs(BaseModel):
    """Arguments of ``camera.upload_evidence``. The URL's shape is checked here; whether its host may be a
    private address depends on the box's config and is checked when the command runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the attachment's sha256, as in the event")
    url: str = Field(min_length=9, max_length=MAX_URL_CHARS, description="a presigned HTTPS PUT URL")
    headers: dict[str, str] = Field(default_factory=dict, description="headers the URL was signed with")
    expires_at: datetime | None = Field(default=None, description="when the URL stops working")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_upload_url(v, allow_private_hosts=True)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        return check_upload_headers(v)


# --- the uploader -------------------------------------------------------------------------------------------


class PrivateAddressError(OSError):
    """A name resolved to an address uploads may not go to."""


class _PublicOnlyResolver(ThreadedResolver):
    """Checks every address a name resolves to, at connect time, so the check cannot be raced by DNS."""

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        found = await super().resolve(host, port, family)
        for item in found:
            try:
                ip = ipaddress.ip_address(item["host"])
            except ValueError:
                raise PrivateAddressError(f"{host} resolved to something that is not an address") from None
            if not address_allowed(ip, allow_private_hosts=False):
                raise PrivateAddressError(f"{host} resolves to {ip}, a non-public address "
                                          "(allow_private_upload_hosts is off)")
        return found


@dataclass(frozen=True, slots=True)
class UploadResult:
    sha256: str
    kind: str
    bytes: int
    status: int
    elapsed_ms: float
    attempts: int
    uploaded_sha256: str | None = None  # set when the bytes were redacted on the way out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256, "kind": self.kind, "bytes": self.bytes, "status": self.status,
                               "elapsed_ms": self.elapsed_ms, "attempts": self.attempts}
        if self.uploaded_sha256 is not None:
            out |= {"redacted": True, "uploaded_sha256": self.uploaded_sha256}
        return out


class _Transient(Exception):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class _Counters:
    uploaded: int = 0
    failed: int = 0
    refused: int = 0
    busy: int = 0
    retries: int = 0
    bytes: int = 0


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Uploader:
    """PUTs kept evidence to presigned URLs (policies in the module docstring). No connection is kept
    between uploads (they are rare), so there is nothing to close."""

    def __init__(self, *, ca_file: Path | None = None, allow_private_hosts: bool = False, max_concurrent: int = 1,
                 max_waiting: int = 1, connect_timeout_s: float = 15.0, read_timeout_s: float = 60.0,
                 total_timeout_s: float = 1800.0, retries: int = 3, backoff_s: float = 2.0,
                 backoff_max_s: float = 60.0, max_upload_bytes: int = 1 << 30, redact: AsyncRedactor | None = None,
                 upload_unredacted_clips: bool = False, jpeg_quality: int | None = None,
                 now: Callable[[], datetime] = _utcnow) -> None:
        """``ca_file`` is read here (at wiring), so a missing or bad file is a :class:`ConfigError` at start."""
        if not 1 <= max_concurrent <= 4 or max_waiting < 0 or retries < 0:
            raise ValueError("max_concurrent 1..4, max_waiting >= 0, retries >= 0")
        try:
            self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{ca_file}: cannot load the CA file for evidence uploads: {exc}") from exc
        self.allow_private_hosts = allow_private_hosts
        self.max_concurrent = max_concurrent
        self.max_waiting = max_waiting
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_upload_bytes = max_upload_bytes
        self._timeout = aiohttp.ClientTimeout(total=total_timeout_s, connect=connect_timeout_s,
                                              sock_read=read_timeout_s)
        self._read_timeout_s = read_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._redact = redact
        self._unredacted_clips = upload_unredacted_clips
        self._jpeg_quality = jpeg_quality
        self._now = now
        self._slots = asyncio.Semaphore(max_concurrent)
        self._active = 0
        self._waiting = 0
        self.counters = _Counters()

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {"active": self._active, "waiting": self._waiting, "uploaded": c.uploaded, "failed": c.failed,
                "refused": c.refused, "busy": c.busy, "retries": c.retries, "bytes": c.bytes}

    async def upload(self, store: EvidenceStore, sha256: str, url: str, *, headers: Mapping[str, str] | None = None,
                     expires_at: datetime | None = None) -> UploadResult:
        """PUT one kept file to ``url``. Raises :class:`UploadError` (bad_args, busy or failed), logged once."""
        try:
            return await self._upload(store, sha256, url, headers, expires_at)
        except UploadError as exc:
            log.warning("evidence %s…: not uploaded (%s): %s", str(sha256)[:12], exc.code, exc.message)
            raise

    async def _upload(self, store: EvidenceStore, sha256: str, url: str, headers: Mapping[str, str] | None,
                      expires_at: datetime | None) -> UploadResult:
        try:
            check_upload_url(url, allow_private_hosts=self.allow_private_hosts)
            extra = check_upload_headers(headers)
        except UploadRefused as exc:
            self.counters.refused += 1
            raise UploadError("bad_args", str(exc)) from None
        deadline = None if expires_at is None else (
            expires_at if expires_at.tzinfo is not None else expires_at.replace(tzinfo=UTC))
        if deadline is not None and deadline <= self._now():
            self.counters.refused += 1
            raise UploadError("bad_args", f"the upload URL expired at {deadline.isoformat()}")
        entry = store.entry(sha256)
        path = store.get(sha256)
        if entry is None or path is None:
            self.counters.refused += 1
            raise UploadError("bad_args", f"no evidence {sha256[:16]}… on this gateway (never kept, or already "
                                          "evicted or expired)")
        if entry.size_bytes > self.max_upload_bytes:
            self.counters.refused += 1
            raise UploadError("failed", f"{entry.kind} {sha256[:16]}… is {entry.size_bytes} bytes; uploads are "
                                        f"capped at {self.max_upload_bytes}")
        if entry.kind == "clip" and self._redact is not None and not self._unredacted_clips:
            self.counters.refused += 1
            raise UploadError("failed", "clips cannot be redacted on this box and face redaction is configured; "
                                        "set upload_unredacted_clips to let clips leave unblurred")
        if self._active + self._waiting >= self.max_concurrent + self.max_waiting:
            self.counters.busy += 1
            raise UploadError("busy", f"{self._active} uploads running and {self._waiting} waiting; retry later")
        self._waiting += 1
        queued = True
        try:
            async with self._slots:
                self._waiting -= 1
                queued = False
                if deadline is not None and deadline <= self._now():
                    self.counters.failed += 1
                    raise UploadError("failed", "the upload URL expired while the upload waited its turn")
                self._active += 1
                try:
                    return await self._run(store, entry, path, url, extra, deadline)
                finally:
                    self._active -= 1
        finally:
            if queued:
                self._waiting -= 1

    async def _run(self, store: EvidenceStore, entry: EvidenceEntry, path: Path, url: str,
                   extra: Mapping[str, str], deadline: datetime | None) -> UploadResult:
        target = where(url)
        started = time.monotonic()
        body: bytes | None = None
        uploaded_sha: str | None = None
        if entry.kind == "snapshot" and self._redact is not None:
            quality = self._jpeg_quality or store.jpeg_quality
            try:
                image = await asyncio.to_thread(_decode_kept, path)
                redacted = await apply_async_redactor(self._redact, image)
                body = await asyncio.to_thread(lambda: encode_jpeg(redacted, quality).tobytes())
            except (EvidenceError, OSError, cv2.error) as exc:
                self.counters.failed += 1
                raise UploadError("failed", f"snapshot {entry.sha256[:16]}… could not be redacted: {exc}") from exc
            uploaded_sha = hashlib.sha256(body).hexdigest()
        size = len(body) if body is not None else entry.size_bytes
        headers = {"Content-Type": entry.media_type, "User-Agent": "edgeagent-evidence"}
        for name, value in extra.items():
            if name.lower() == "content-type":
                headers.pop("Content-Type")
            headers[name] = value
        headers["Content-Length"] = str(size)
        attempt = 0
        while True:
            attempt += 1
            try:
                status = await self._attempt(url, path, body, headers, size)
            except _Transient as exc:
                last, retry_after = exc.message, exc.retry_after_s
            except UploadError:
                self.counters.failed += 1
                raise
            else:
                elapsed_ms = round((time.monotonic() - started) * 1000, 1)
                self.counters.uploaded += 1
                self.counters.bytes += size
                log.info("evidence %s…: %d bytes uploaded to %s in %.0f ms (HTTP %d, %d attempt(s))",
                         entry.sha256[:12], size, target, elapsed_ms, status, attempt)
                return UploadResult(entry.sha256, entry.kind, size, status, elapsed_ms, attempt, uploaded_sha)
            if attempt > self.retries:
                self.counters.failed += 1
                raise UploadError("failed", f"{last} (gave up after {attempt} attempts)")
            cap = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
            delay = cap / 2 + random.uniform(0, cap / 2)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.backoff_max_s))
            if deadline is not None and (deadline - self._now()).total_seconds() <= delay:
                self.counters.failed += 1
                raise UploadError("failed", f"{last}; the upload URL expires before another attempt "
                                            f"(gave up after {attempt} attempts)")
            self.counters.retries += 1
            log.warning("evidence %s…: %s; retrying in %.1f s (attempt %d of %d)", entry.sha256[:12], last, delay,
                        attempt + 1, self.retries + 1)
            await asyncio.sleep(delay)

    async def _attempt(self, url: str, path: Path, body: bytes | None, headers: Mapping[str, str],
                       size: int) -> int:
        """One PUT. Returns a 2xx status; raises _Transient (worth another attempt) or UploadError (final)."""
        target = where(url)
        stream = None if body is not None else await _open_kept(path, size)
        resolver = None if self.allow_private_hosts else _PublicOnlyResolver()
        connector = aiohttp.TCPConnector(ssl=self._ssl, resolver=resolver, limit=1)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=self._timeout, auto_decompress=False,
                                      skip_auto_headers=("Content-Type",)) as session,
                # encoded=True: sent byte for byte as signed; yarl must not re-quote the signature.
                session.put(URL(url, encoded=True), data=stream if body is None else body, headers=dict(headers),
                            allow_redirects=False) as resp,
            ):
                status = resp.status
                if 200 <= status < 300:
                    return status
                text = await resp.content.read(4096)
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except aiohttp.ClientConnectorCertificateError as exc:
            raise UploadError("failed", f"the TLS certificate of {target} is not trusted: "
                                        f"{_scrub(str(exc.certificate_error), url)}") from None
        except aiohttp.ClientSSLError as exc:
            raise UploadError("failed", f"TLS with {target} failed: {_scrub(str(exc), url)}") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, PrivateAddressError):
                raise UploadError("bad_args", f"{target}: {exc.os_error}") from None
            raise _Transient(f"cannot connect to {target}: {_scrub(str(exc.os_error), url)}") from None
        except aiohttp.ConnectionTimeoutError:
            raise _Transient(f"no connection to {target} within {self._connect_timeout_s:g} s") from None
        except aiohttp.SocketTimeoutError:
            raise _Transient(f"no answer from {target} within {self._read_timeout_s:g} s") from None
        except TimeoutError:
            raise _Transient(f"the upload to {target} took longer than {self._timeout.total:g} s") from None
        except aiohttp.ClientError as exc:
            raise _Transient(f"PUT {target} failed: {type(exc).__name__}: {_scrub(str(exc), url)}") from None
        finally:
            if stream is not None:
                await asyncio.to_thread(stream.close)
            await connector.close()
        detail = _error_code(text)
        if status >= 500 or status in _RETRYABLE_STATUS:
            raise _Transient(f"{target} answered HTTP {status}{detail}", retry_after)
        hint = " (redirects are not followed)" if 300 <= status < 400 else ""
        raise UploadError("failed", f"{target} refused the upload with HTTP {status}{detail}{hint}")


async def _open_kept(path: Path, size: int) -> IO[bytes]:
    """The kept file, opened for one attempt (a retry reads it again from the start)."""
    try:
        stream = await asyncio.to_thread(path.open, "rb")
    except OSError as exc:
        raise UploadError("failed", f"{path.name[:16]}… is no longer kept ({exc.strerror})") from exc
    st = await asyncio.to_thread(lambda: stream.seek(0, 2))
    if st != size:
        await asyncio.to_thread(stream.close)
        raise UploadError("failed", f"{path.name[:16]}… changed size on disk ({st} != {size})")
    await asyncio.to_thread(stream.seek, 0)
    return stream


def _decode_kept(path: Path) -> npt.NDArray[np.uint8]:
    """A kept snapshot's pixels (uint8 BGR). In a worker thread."""
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise EvidenceError(f"{path.name[:16]}… does not decode as a JPEG")
    return np.asarray(image, dtype=np.uint8)


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


def _error_code(body: bytes) -> str:
    """The ``<Code>`` of an object store's XML error, the only part of the body worth keeping: the rest
    (S3's StringToSign, CanonicalRequest) echoes the request and may carry signed values."""
    m = _S3_CODE_RE.search(body)
    return f" ({m[1].decode('ascii')})" if m else ""


def _scrub(text: str, url: str) -> str:
    """aiohttp quotes the URL in a few errors: remove every form of it, then its query and fragment."""
    parts = urlsplit(url)
    for secret in (url, parts.query, parts.fragment):
        if secret:
            text = text.replace(secret, _REDACTED)
    return text[:300]


# --- the command --------------------------------------------------------------------------------------------


class EventEmitter(Protocol):
    """What the command needs from the event sink (:class:`~edgeagent.kernel.pipeline.sink.EventSink`)."""

    async def emit(self, type_name: str, device_id: str, data: Mapping[str, Any]) -> Any: ...


def upload_command(store: EvidenceStore, uploader: Uploader, sink: EventEmitter | None = None) -> CommandSpec:
    """``camera.upload_evidence`` for the command router. With a ``sink``, a successful upload is also
    recorded as a ``camera.evidence.uploaded`` event (device: the camera that kept it); an event that cannot
    be stored is logged, the upload still answers as done."""

    async def handle(args: Mapping[str, Any]) -> Mapping[str, Any]:
        a = UploadEvidenceArgs.model_validate(dict(args))
        try:
            result = await uploader.upload(store, a.sha256, a.url, headers=a.headers, expires_at=a.expires_at)
        except UploadError as exc:
            raise CommandRejected(exc.code, exc.message) from None
        entry = store.entry(a.sha256)
        if sink is not None:
            device = (entry.camera if entry is not None else "") or "evidence"
            data = {"sha256": result.sha256, "kind": result.kind, "size_bytes": result.bytes,
                    "status": result.status, "elapsed_ms": result.elapsed_ms}
            try:
                await sink.emit(EVIDENCE_UPLOADED, device, data)
            except (EdgeagentError, ValueError) as exc:
                log.warning("%s: evidence %s… uploaded, but its event was not stored: %s", device,
                            result.sha256[:12], exc)
        return result.to_dict()

    return CommandSpec(UPLOAD_COMMAND, handle, UploadEvidenceArgs,
                       "upload a kept snapshot or clip (by sha256) to a presigned HTTPS PUT URL")

