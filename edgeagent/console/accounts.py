"""The console's local accounts: a name, a role and a scrypt hash of the password, in one JSON file.

The file lives in the daemon's state directory (``console/users.json``), mode 0600, and is written only by
``edgeagent console add-user`` / ``remove-user`` (root); the daemon reads it and notices a change by its
modification time, so an account added on a running box works at once. Passwords are never stored or
logged: scrypt (RFC 7914) with a random 16-byte salt per account, compared in constant time. Hashing takes
tens of milliseconds on purpose, so the daemon runs it in a thread and at most ``HASH_CONCURRENCY`` at a
time (a flood of logins cannot take both cores from the alarms).

Roles: ``viewer`` sees everything; ``guard`` also acknowledges and resolves alarms and opens the gate;
``installer`` also edits zones and lines and runs the installer's checks.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

Role = Literal["viewer", "guard", "installer"]
ROLES: Final[tuple[Role, ...]] = ("viewer", "guard", "installer")
# What each role may do beyond seeing.
PERMISSIONS: Final[dict[Role, frozenset[str]]] = {
    "viewer": frozenset(),
    "guard": frozenset({"alarm", "gate"}),
    "installer": frozenset({"alarm", "gate", "configure"}),
}
USERS_FILE = "users.json"
NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 256
# scrypt cost: n=2**14, r=8 takes 16 MiB and ~40 ms on a Pi 4 core (OWASP's floor is n=2**17 with r=8 p=1
# for servers; a box that must keep its second core for inference takes the lower cost with a login limit).
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
HASH_CONCURRENCY: Final = 1


class AccountError(ValueError):
    """A bad name, role or password, or an unreadable accounts file."""


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    role: Role
    hash: str  # scrypt$n$r$p$salt$digest (base64)

    def may(self, permission: str) -> bool:
        return permission in PERMISSIONS[self.role]


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    check_password(password)
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; False for anything malformed (never raises on input)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt" or len(password) > MAX_PASSWORD_CHARS:
            return False
        want = base64.b64decode(digest, validate=True)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt, validate=True), n=int(n),
                             r=int(r), p=int(p), maxmem=64 * 1024 * 1024, dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


# A hash of a random password: compared against when the name is unknown, so a wrong name costs as long as a
# wrong password and the answer's time does not tell which names exist.
_DUMMY_HASH: str | None = None


def dummy_hash() -> str:
    global _DUMMY_HASH  # noqa: PLW0603 - computed once, on first use, off the import path
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_urlsafe(16))
    return _DUMMY_HASH


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise AccountError(f"{name!r}: a user name is 1-32 letters, digits, '.', '_' or '-', starting with a "
                           "letter or digit")
    return name


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise AccountError(f"role {role!r}: one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> None:
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise AccountError(f"a password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters")


class AccountStore:
    """The accounts file. Reading is cheap and cached by modification time; writing is atomic (a new file
    renamed over the old one, mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: tuple[tuple[int, int], dict[str, Account]] | None = None

    def load(self) -> dict[str, Account]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        key = (st.st_mtime_ns, st.st_size)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            users = {u["name"]: Account(check_name(u["name"]), check_role(u["role"]), str(u["hash"]))
                     for u in doc["users"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AccountError(f"{self.path}: not a readable accounts file ({exc})") from exc
        self._cache = (key, users)
        return users

    def get(self, name: str) -> Account | None:
        return self.load().get(name)

    def add(self, name: str, role: str, password: str, *, replace: bool = False) -> Account:
        users = dict(self.load())
        check_name(name)
        if name in users and not replace:
            raise AccountError(f"user {name!r} exists (use --replace to set a new password or role)")
        account = Account(name, check_role(role), hash_password(password))
        users[name] = account
        self._write(users)
        return account

    def remove(self, name: str) -> None:
        users = dict(self.load())
        if name not in users:
            raise AccountError(f"no user {name!r}")
        del users[name]
        self._write(users)

    def _make_dir(self) -> None:
        folder = self.path.parent
        if folder.is_dir():
            return
        folder.mkdir(parents=True, mode=0o700)
        st = folder.parent.stat()
        with contextlib.suppress(PermissionError):
            os.chown(folder, st.st_uid, st.st_gid)

    def _write(self, users: dict[str, Account]) -> None:
        self._make_dir()
        doc: dict[str, Any] = {"v": 1, "users": [{"name": a.name, "role": a.role, "hash": a.hash}
                                                 for a in sorted(users.values(), key=lambda a: a.name)]}
        current = None
        with contextlib.suppress(FileNotFoundError):
            current = os.lstat(self.path)
        if current is not None and not stat.S_ISREG(current.st_mode):
            raise AccountError(f"{self.path} is not a regular file; refusing to write through it")
        # Root runs the CLI, the daemon's account reads the file: it belongs to whoever owns the state directory.
        owner = current or self.path.parent.parent.stat()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                os.fchmod(fh.fileno(), 0o600)
                with contextlib.suppress(PermissionError):
                    os.fchown(fh.fileno(), owner.st_uid, owner.st_gid)
                fh.write(json.dumps(doc, indent=1))
                fh.flush()
                os.fsync(fh.fileno())
            Path(tmp).replace(self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
            raise
        self._cache = None
