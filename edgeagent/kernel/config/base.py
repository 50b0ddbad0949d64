"""Config building blocks shared by every config module: the strict base model and secret references.

Secrets never sit in a config file: a secret field takes ``{credential: NAME}`` (a systemd credential,
read from ``$CREDENTIALS_DIRECTORY``), ``{file: PATH}`` or ``{env: NAME}``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from edgeagent.kernel.errors import SecretError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


# --- secrets ------------------------------------------------------------------------------------

class SecretRef(Strict):
    """Where a secret lives. Exactly one of the three keys."""

    credential: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.-]+$",
        description="name of a systemd credential (LoadCredential=NAME:PATH in the unit)")
    file: Path | None = Field(default=None, description="path of a file holding only the secret")
    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                            description="environment variable holding the secret")

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        given = [k for k in ("credential", "file", "env") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a secret reference needs exactly one of 'credential', 'file' or 'env'")
        return self

    def describe(self) -> str:
        if self.credential is not None:
            return f"credential {self.credential!r}"
        if self.file is not None:
            return f"file {str(self.file)!r}"
        return f"environment variable {self.env!r}"

    def resolve(self, environ: Mapping[str, str] | None = None) -> SecretStr:
        env = os.environ if environ is None else environ
        try:
            if self.credential is not None:
                cred_dir = env.get("CREDENTIALS_DIRECTORY")
                if not cred_dir:
                    raise SecretError(
                        f"secret {self.describe()}: no $CREDENTIALS_DIRECTORY (not started by systemd with "
                        "LoadCredential=); use {file: PATH} when running by hand")
                text = (Path(cred_dir) / self.credential).read_text(encoding="utf-8")
            elif self.file is not None:
                text = self.file.read_text(encoding="utf-8")
            else:
                assert self.env is not None
                if self.env not in env:
                    raise SecretError(f"secret {self.describe()} is not set")
                text = env[self.env]
        except OSError as exc:
            raise SecretError(f"secret {self.describe()} cannot be read: {exc.strerror}") from exc
        value = text.rstrip("\r\n")
        if not value:
            raise SecretError(f"secret {self.describe()} is empty")
        return SecretStr(value)

    def path_for(self, environ: Mapping[str, str] | None = None) -> Path:
        """A file path holding the secret (for libraries that want a path, like ssl)."""
        env = os.environ if environ is None else environ
        path: Path | None = None
        if self.file is not None:
            path = self.file
        elif self.credential is not None and env.get("CREDENTIALS_DIRECTORY"):
            path = Path(env["CREDENTIALS_DIRECTORY"]) / self.credential
        if path is None:
            raise SecretError(f"secret {self.describe()} must be a file or a credential here")
        # The systemd unit falls back to a blank credential when the file is absent: say so plainly.
        self.resolve(env)
        return path


def _no_clear_secret(value: Any) -> Any:
    if isinstance(value, str | int | float):
        raise ValueError(  # noqa: TRY004 - pydantic reports ValueError as a validation error
            "secrets may not be written in the config file; "
            "use {credential: NAME}, {file: PATH} or {env: NAME}")
    return value


SecretField = Annotated[SecretRef, Field(description="secret by reference")]


# --- URLs ----------------------------------------------------------------------------------------------

REDACTED = "<redacted>"


def redact_url(url: str) -> str:
    """A URL fit to show or log: user info, every query value and the fragment replaced by ``<redacted>``.
    Webhook receivers often take their token in the query (``?token=...``); the keys stay so that a support
    ticket still shows which parameters were set. Not a URL: returned unchanged. The placeholder has one
    length whatever it hides."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = (f"{REDACTED}@" if parts.username is not None or parts.password is not None else "") + host
    netloc += f":{port}" if port is not None else ""
    # A bare item (``?abc123``) may be the token itself: it goes too.
    query = "&".join(f"{pair.partition('=')[0]}={REDACTED}" if "=" in pair else REDACTED
                     for pair in parts.query.split("&") if pair)
    fragment = REDACTED if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def url_secrets(url: str) -> list[str]:
    """The parts of a URL :func:`redact_url` hides (user info and query values), to scrub them elsewhere."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = [v for v in (parts.username, parts.password) if v]
    found += [v or k for k, v in parse_qsl(parts.query, keep_blank_values=True) if v or k]
    if parts.fragment:
        found.append(parts.fragment)
    return found


def is_loopback_host(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves the box."""
    if not host:
        return False
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
