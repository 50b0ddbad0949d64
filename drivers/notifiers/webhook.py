"""The webhook notifier: the alarm JSON (:func:`~edgeagent.drivers.notifiers.common.payload`) POSTed over
HTTP(S), optionally HMAC-signed; a webhook URL is logged without its user info and query string.

The signature (with ``secret`` configured) is one header::

    X-Edgeagent-Signature: t=1777622400,kid=notify-webhook-hmac,v1=5f1c...e9 (64 hex digits)

* ``t``: when the request was signed, in whole seconds since the Unix epoch (UTC);
* ``kid``: which key signed it, so a receiver can hold the old and the new key while rotating: the name of
  the secret reference (the credential's or environment variable's name, or the key file's name);
* ``v1``: hex HMAC-SHA256, under that key, of the ASCII decimal ``t``, a full stop, then the raw body bytes
  (``b"1777622400." + body``).

A receiver looks the key up by ``kid``, recomputes ``v1`` over the body exactly as received and compares
with :func:`hmac.compare_digest`; it refuses a ``t`` more than a few minutes from its own clock (stale) and
a ``v1`` it has already accepted within that window (a replay). :func:`verify_signature` does exactly
this and is what a Python receiver can copy.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Mapping
from typing import ClassVar, Final
from urllib.parse import urlsplit

import aiohttp

from edgeagent.drivers.notifiers.common import Now, payload, utcnow
from edgeagent.kernel.alarms.notify import Message, NotifyError
from edgeagent.kernel.alarms.notify_config import WebhookNotifierConfig
from edgeagent.kernel.config.base import SecretRef, redact_url

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-Edgeagent-Signature"
_RETRYABLE_4XX: Final = frozenset({408, 425, 429})


SIGNATURE_TOLERANCE_S: Final = 300
_SIGNATURE_RE: Final = re.compile(r"^t=(?P<t>[0-9]{1,12}),kid=(?P<kid>[A-Za-z0-9_.:-]{1,128}),v1=(?P<v1>[0-9a-f]{64})$")


def signature(key: bytes, body: bytes, *, timestamp: int, key_id: str) -> str:
    """The value of the ``X-Edgeagent-Signature`` header (format in the module docstring)."""
    mac = hmac.new(key, f"{timestamp}.".encode("ascii") + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},kid={key_id},v1={mac}"


def verify_signature(header: str, keys: Mapping[str, bytes], body: bytes, *, now_s: float,
                     tolerance_s: float = SIGNATURE_TOLERANCE_S) -> tuple[str, int]:
    """The receiver's side: (kid, t) of a header that verifies, else :class:`ValueError` saying why.
    Replays within the tolerance are for the receiver to refuse (remember the ``v1`` values it accepted)."""
    m = _SIGNATURE_RE.match(header.strip())
    if m is None:
        raise ValueError("not an X-Edgeagent-Signature header (t=...,kid=...,v1=...)")
    kid, t = m["kid"], int(m["t"])
    key = keys.get(kid)
    if key is None:
        raise ValueError(f"unknown key id {kid!r}")
    want = hmac.new(key, f"{t}.".encode("ascii") + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, m["v1"]):
        raise ValueError("signature does not verify")
    if abs(now_s - t) > tolerance_s:
        raise ValueError(f"signed {now_s - t:+.0f} s from now: stale")
    return kid, t


def key_id_of(ref: SecretRef) -> str:
    """The key id a secret reference gives: its credential or variable name, or the key file's name."""
    name = ref.credential or ref.env or (ref.file.name if ref.file is not None else "")
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", name)[:128] or "key"


class WebhookNotifier:
    """POSTs the alarm JSON. 2xx: delivered. 408/425/429, 5xx, timeouts and connection errors: transient.
    Any other answer (4xx, and 3xx since redirects are not followed) and TLS verification failures:
    permanent. Secrets are resolved here, at construction, so a missing one fails at start-up.
    One :class:`aiohttp.ClientSession`, made on first use; :meth:`aclose` closes it."""

    concurrency: ClassVar[int] = 4

    def __init__(self, cfg: WebhookNotifierConfig, *, name: str = "webhook",
                 environ: Mapping[str, str] | None = None, now: Now = utcnow, key_id: str | None = None) -> None:
        self._cfg = cfg
        self.name = name
        self._now = now
        self._key = cfg.secret.resolve(environ).get_secret_value().encode() if cfg.secret is not None else None
        self.key_id = key_id or (key_id_of(cfg.secret) if cfg.secret is not None else None)
        self._authorization = (cfg.authorization.resolve(environ).get_secret_value()
                               if cfg.authorization is not None else None)
        parts = urlsplit(cfg.url)
        # Neither user info nor the query: either may hold a token.
        host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
        self._where = f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._cfg.timeout_s))
        return self._session

    async def send(self, target: str, message: Message) -> None:
        if target not in self._cfg.targets:
            raise NotifyError(target, f"{self.name}: does not serve this target", permanent=True)
        at = self._now()
        body = payload(target, message, at)
        headers = dict(self._cfg.headers)
        headers["Content-Type"] = "application/json"
        if self._key is not None and self.key_id is not None:
            headers[SIGNATURE_HEADER] = signature(self._key, body, timestamp=int(at.timestamp()), key_id=self.key_id)
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
                                      f"{exc.__class__.__name__}: {self._clean(str(exc))}") from exc
        if 200 <= status < 300:
            log.debug("%s: alarm %s (%s) to %s: HTTP %d", self.name, message.alarm_id, message.kind, target, status)
            return
        if status >= 500 or status in _RETRYABLE_4XX:
            raise NotifyError(target, f"{self.name}: {self._where} answered HTTP {status}")
        hint = " (redirects are not followed: fix the URL)" if 300 <= status < 400 else ""
        raise NotifyError(target, f"{self.name}: {self._where} refused it with HTTP {status}{hint}", permanent=True)

    def _clean(self, text: str) -> str:
        """aiohttp quotes the URL in some errors (InvalidURL, ...): show it as it is logged."""
        url = self._cfg.url
        for form in (url, url.split("#", 1)[0], redact_url(url)):
            text = text.replace(form, self._where)
        query = urlsplit(url).query
        return text.replace(query, "<redacted>") if query else text

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

