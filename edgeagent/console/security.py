"""Sessions, CSRF tokens, the login limit and the response headers of the console.

* **Sessions**: a random 256-bit token in a ``__Host-`` cookie (Secure, HttpOnly, SameSite=Strict, Path=/), an
  idle timeout and an absolute lifetime. At most ``MAX_SESSIONS``; beyond that the least recently used one is
  ended (counted). They outlive a daemon restart (a guard must not be logged out by the watchdog's restart or an
  installer's config change in the middle of an alarm): :meth:`Sessions.save` writes them to the state
  directory (mode 0600, atomically) and :meth:`Sessions.load` reads them back. The file holds nothing a cookie
  can be made from: each session is keyed by the SHA-256 of its token, its CSRF token is derived from the token
  (HMAC), and the account's password hash is kept as a digest (a new password still ends the session). Times
  are stored on the wall clock; a session whose times lie in the future (the clock went back) or past its
  limits is dropped, and an unreadable file means everyone logs in again, never a daemon that does not start.
* **CSRF**: every state-changing request carries the session's own CSRF token in a header (the page's
  script reads it from ``/api/session``; another site can neither read it nor set the header without a
  CORS preflight, which the console never grants) *and* an ``Origin`` that is the console's own. A form
  posted from another site therefore fails twice: wrong Origin, no token.
* **Login limit**: failures are counted per client address and per user name over ``LOGIN_WINDOW_S``;
  ``LOGIN_MAX_FAILURES`` in the window and further attempts are refused (429) until the oldest failure
  leaves the window. The tables are bounded (``MAX_TRACKED``; the oldest key is forgotten, counted).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast, get_args

from edgeagent.console.accounts import Role
from edgeagent.console.tls import write_atomically

COOKIE: Final = "__Host-edgeagent-console"
IDLE_TIMEOUT_S: Final = 12 * 3600.0  # a guard's shift
MAX_AGE_S: Final = 24 * 3600.0
MAX_SESSIONS: Final = 256
LOGIN_WINDOW_S: Final = 300.0
LOGIN_MAX_FAILURES: Final = 5
MAX_TRACKED: Final = 4096
SESSIONS_FILE_VERSION: Final = 1

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


def token_key(token: str) -> str:
    """What a session is known by in memory and on disk: the SHA-256 of its cookie's token."""
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_of(token: str) -> str:
    """The session's CSRF token, derived from its cookie's token (nothing to store; another site has neither)."""
    return hmac.new(token.encode(), b"edgeagent-console-csrf", hashlib.sha256).hexdigest()


def credential_digest(stored_hash: str) -> str:
    """What a session remembers of its account's password hash (a new password ends the session)."""
    return hashlib.sha256(stored_hash.encode()).hexdigest()


@dataclass(slots=True)
class Session:
    token: str  # "" for a session read back from the file until its cookie is presented again
    user: str
    role: Role
    csrf: str
    created: float  # time.monotonic()
    seen: float
    remote: str = ""
    credential: str = ""  # credential_digest() of the account's stored hash at login


class Sessions:
    def __init__(self, *, idle_s: float = IDLE_TIMEOUT_S, max_age_s: float = MAX_AGE_S,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self._by_key: OrderedDict[str, Session] = OrderedDict()
        self._idle_s = idle_s
        self._max_age_s = max_age_s
        self._max = max_sessions
        self.evicted = 0
        self.changed = False  # since the last dump(): a session made or ended
        self.touched = False  # since the last dump(): a session used (its idle time restarts)

    def create(self, user: str, role: Role, remote: str, credential: str = "") -> Session:
        now = time.monotonic()
        token = secrets.token_urlsafe(32)
        s = Session(token, user, role, csrf_of(token), now, now, remote,
                    credential_digest(credential) if credential else "")
        self._by_key[token_key(token)] = s
        while len(self._by_key) > self._max:
            self._by_key.popitem(last=False)
            self.evicted += 1
        self.changed = True
        return s

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        key = token_key(token)
        s = self._by_key.get(key)
        if s is None:
            return None
        now = time.monotonic()
        if now - s.seen > self._idle_s or now - s.created > self._max_age_s:
            del self._by_key[key]
            self.changed = True
            return None
        if not s.token:  # read back from the file: its cookie came back
            s.token, s.csrf = token, csrf_of(token)
        s.seen = now
        self._by_key.move_to_end(key)
        self.touched = True
        return s

    def end(self, token: str) -> None:
        if token and self._by_key.pop(token_key(token), None) is not None:
            self.changed = True

    def end_user(self, user: str) -> int:
        """End every session of ``user`` (an account removed or its role changed)."""
        gone = [k for k, s in self._by_key.items() if s.user == user]
        for k in gone:
            del self._by_key[k]
        self.changed = self.changed or bool(gone)
        return len(gone)

    def active(self) -> list[Session]:
        return list(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)

    # --- across restarts -----------------------------------------------------------------------------

    def dump(self) -> bytes:
        """The sessions as the file keeps them (no token, no CSRF token, no password hash), oldest use first;
        clears :attr:`changed` and :attr:`touched`."""
        mono, wall = time.monotonic(), time.time()
        records = [{"key": k, "user": s.user, "role": s.role, "remote": s.remote, "credential": s.credential,
                    "created": round(wall - (mono - s.created), 3), "seen": round(wall - (mono - s.seen), 3)}
                   for k, s in self._by_key.items()]
        self.changed = self.touched = False
        return json.dumps({"version": SESSIONS_FILE_VERSION, "sessions": records}, indent=1).encode()

    def save(self, path: Path) -> None:
        """Write :meth:`dump` to ``path`` (blocking; the server dumps on its loop and writes in a thread)."""
        write_sessions_file(path, self.dump())

    def load(self, path: Path) -> tuple[int, int]:
        """Add the sessions kept in ``path`` that are still within their limits; (kept, dropped). A missing file
        is (0, 0); a file that cannot be read as one raises ValueError (the caller starts without them)."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return 0, 0
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc}") from None
        try:
            doc = json.loads(raw)
            records = doc["sessions"] if isinstance(doc, dict) and doc.get("version") == SESSIONS_FILE_VERSION \
                else None
        except (ValueError, UnicodeDecodeError, KeyError):
            records = None
        if not isinstance(records, list):
            raise ValueError(f"{path}: not a sessions file of version {SESSIONS_FILE_VERSION}")  # noqa: TRY004
        mono, wall = time.monotonic(), time.time()
        kept = dropped = 0
        for rec in records[-self._max:]:
            s = _session_of(rec, mono, wall, self._idle_s, self._max_age_s)
            if s is None:
                dropped += 1
                continue
            key, session = s
            self._by_key[key] = session
            kept += 1
        dropped += max(0, len(records) - self._max)
        return kept, dropped


def write_sessions_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, mode 0600 (its directory made 0700 when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomically(path, data, 0o600)


def _session_of(rec: Any, mono: float, wall: float, idle_s: float, max_age_s: float) -> tuple[str, Session] | None:
    """A stored record as a session, or None when it is malformed, expired or dated in the future."""
    if not isinstance(rec, dict):
        return None
    key, user, role, remote, credential = (rec.get(k) for k in ("key", "user", "role", "remote", "credential"))
    created, seen = rec.get("created"), rec.get("seen")
    if not (isinstance(key, str) and len(key) == 64 and all(c in "0123456789abcdef" for c in key)
            and isinstance(user, str) and user and role in get_args(Role)
            and isinstance(remote, str) and isinstance(credential, str)
            and isinstance(created, int | float) and isinstance(seen, int | float)
            and not isinstance(created, bool) and not isinstance(seen, bool)):
        return None
    created_age, seen_age = wall - float(created), wall - float(seen)
    if not (0 <= seen_age <= created_age) or seen_age > idle_s or created_age > max_age_s:
        return None  # expired, or the clock went back (a time in the future): log in again
    return key, Session("", user, cast("Role", role), "", mono - created_age, mono - seen_age, remote[:64],
                        credential)


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
