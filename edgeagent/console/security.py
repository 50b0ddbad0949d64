"""Sessions, CSRF tokens, the login limit and the response headers of the console.

* **Sessions** live in memory only (a restart logs everyone out, which is the safe failure): a random
  256-bit token in a ``__Host-`` cookie (Secure, HttpOnly, SameSite=Strict, Path=/), an idle timeout and an
  absolute lifetime. At most ``MAX_SESSIONS``; beyond that the least recently used one is ended (counted).
* **CSRF**: every state-changing request carries the session's own CSRF token in a header (the page's
  script reads it from ``/api/session``; another site can neither read it nor set the header without a
  CORS preflight, which the console never grants) *and* an ``Origin`` that is the console's own. A form
  posted from another site therefore fails twice: wrong Origin, no token.
* **Login limit**: failures are counted per client address and per user name over ``LOGIN_WINDOW_S``;
  ``LOGIN_MAX_FAILURES`` in the window and further attempts are refused (429) until the oldest failure
  leaves the window. The tables are bounded (``MAX_TRACKED``; the oldest key is forgotten, counted).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Final

from edgeagent.console.accounts import Role

COOKIE: Final = "__Host-edgeagent-console"
IDLE_TIMEOUT_S: Final = 12 * 3600.0  # a guard's shift
MAX_AGE_S: Final = 24 * 3600.0
MAX_SESSIONS: Final = 256
LOGIN_WINDOW_S: Final = 300.0
LOGIN_MAX_FAILURES: Final = 5
MAX_TRACKED: Final = 4096

CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
              "connect-src 'self'; media-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
              "form-action 'self'; frame-ancestors 'none'")
HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


@dataclass(slots=True)
class Session:
    token: str
    user: str
    role: Role
    csrf: str
    created: float
    seen: float
    remote: str = ""
    credential: str = ""  # the account's stored hash at login: a new password ends the session


class Sessions:
    def __init__(self, *, idle_s: float = IDLE_TIMEOUT_S, max_age_s: float = MAX_AGE_S,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self._by_token: OrderedDict[str, Session] = OrderedDict()
        self._idle_s = idle_s
        self._max_age_s = max_age_s
        self._max = max_sessions
        self.evicted = 0

    def create(self, user: str, role: Role, remote: str, credential: str = "") -> Session:
        now = time.monotonic()
        s = Session(secrets.token_urlsafe(32), user, role, secrets.token_urlsafe(32), now, now, remote, credential)
        self._by_token[s.token] = s
        while len(self._by_token) > self._max:
            self._by_token.popitem(last=False)
            self.evicted += 1
        return s

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        s = self._by_token.get(token)
        if s is None:
            return None
        now = time.monotonic()
        if now - s.seen > self._idle_s or now - s.created > self._max_age_s:
            del self._by_token[token]
            return None
        s.seen = now
        self._by_token.move_to_end(token)
        return s

    def end(self, token: str) -> None:
        self._by_token.pop(token, None)

    def end_user(self, user: str) -> int:
        """End every session of ``user`` (an account removed or its role changed)."""
        gone = [t for t, s in self._by_token.items() if s.user == user]
        for t in gone:
            del self._by_token[t]
        return len(gone)

    def active(self) -> list[Session]:
        return list(self._by_token.values())

    def __len__(self) -> int:
        return len(self._by_token)


class LoginLimiter:
    """Failures per key (``ip:ADDR``, ``user:NAME``) in a sliding window."""

    def __init__(self, *, window_s: float = LOGIN_WINDOW_S, max_failures: int = LOGIN_MAX_FAILURES,
                 max_tracked: int = MAX_TRACKED) -> None:
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._window_s = window_s
        self._max = max_failures
        self._max_tracked = max_tracked
        self.refused = 0
        self.forgotten = 0

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures.get(key)
        if q is None:
            return deque()
        while q and now - q[0] > self._window_s:
            q.popleft()
        if not q:
            del self._failures[key]
        return q

    def retry_after(self, keys: list[str]) -> float:
        """Seconds until a login may be tried for these keys (0: now)."""
        now = time.monotonic()
        wait = 0.0
        for key in keys:
            q = self._recent(key, now)
            if len(q) >= self._max:
                wait = max(wait, self._window_s - (now - q[0]))
        if wait > 0:
            self.refused += 1
        return wait

    def failed(self, keys: list[str]) -> None:
        now = time.monotonic()
        for key in keys:
            q = self._failures.setdefault(key, deque(maxlen=self._max))
            q.append(now)
            self._failures.move_to_end(key)
        while len(self._failures) > self._max_tracked:
            self._failures.popitem(last=False)
            self.forgotten += 1

    def succeeded(self, keys: list[str]) -> None:
        for key in keys:
            self._failures.pop(key, None)
