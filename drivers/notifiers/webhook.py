"""The webhook notifier: the alarm JSON (:func:`~edgeagent.drivers.notifiers.common.payload`) POSTed over
HTTP(S), optionally HMAC-signed; a webhook URL is logged without its query string."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping
from typing import ClassVar, Final
from urllib.parse import urlsplit

import aiohttp

from edgeagent.drivers.notifiers.common import Now, payload, utcnow
from edgeagent.kernel.alarms.notify import Message, NotifyError
from edgeagent.kernel.alarms.notify_config import WebhookNotifierConfig

log = logging.getLogger(__name__)

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
                 environ: Mapping[str, str] | None = None, now: Now = utcnow) -> None:
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

