"""``edgeagent doctor`` (is this box set up right?) and ``edgeagent diagnose`` (an archive for support).

Both read only: the config, the outbox database (opened read-only), the runtime file and the local
health endpoint of a running daemon. Secret values are resolved to check them and to scrub them
from the diagnose archive; they are never printed or written.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import importlib
import importlib.metadata
import io
import json
import os
import platform
import re
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import typer
from pydantic import BaseModel
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from edgeagent import __version__
from edgeagent.capabilities import doctor_checks, load_config
from edgeagent.cli.common import (
    ConfigOption,
    JsonOption,
    config_path,
    console,
    err_console,
    fail,
    print_json,
    read_runtime,
    trusted_health_url,
)
from edgeagent.cli.events import NoOutboxError, outbox_path, outbox_ro
from edgeagent.kernel.config.base import SecretRef, is_loopback_host, url_secrets
from edgeagent.kernel.config.schema import Config, redacted
from edgeagent.kernel.errors import ConfigError, EdgeagentError, SecretError, UplinkAuthError
from edgeagent.kernel.pipeline.events import Priority
from edgeagent.kernel.runtime.clock import kernel_clock_synced

Status = Literal["ok", "warn", "fail", "skip"]
_STYLE: dict[str, str] = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
# Where systemd keeps the credentials of the running service (readable by root).
SERVICE_CREDENTIALS = Path("/run/credentials/edgeagent.service")
CERT_WARN_DAYS = 30
HTTP_TIMEOUT_S = 3.0
PACKAGES = ("paho-mqtt", "pydantic", "pydantic-core", "cryptography", "aiohttp", "ruamel.yaml",
            "orjson", "python-ulid", "prometheus-client", "typer", "rich", "pymodbus", "pyserial", "numpy",
            "onnxruntime", "opencv-python-headless", "av", "onvif-zeep-async", "zeep")
REDACTED = b"<redacted>"
# A secret shorter than this is replaced only where it stands as a whole value (a quoted string, the value
# after '='), never inside other text: replacing a 3-character secret everywhere it occurs ("c<redacted>fig")
# would show where it was, and so what it is.
SHORT_SECRET_CHARS = 8
# Query values shorter than this are parameters (?v=2), not tokens: scrubbing them only mangles the bundle.
URL_TOKEN_MIN_CHARS = 6


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status, "detail": self.detail}


# --- secrets ---------------------------------------------------------------------------------------

def secret_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to resolve secrets in: by hand, the running service's credentials if readable."""
    env = dict(os.environ if environ is None else environ)
    if not env.get("CREDENTIALS_DIRECTORY") and os.access(SERVICE_CREDENTIALS, os.R_OK | os.X_OK):
        env["CREDENTIALS_DIRECTORY"] = str(SERVICE_CREDENTIALS)
    return env


@contextlib.contextmanager
def _credentials_from(env: Mapping[str, str]) -> Iterator[None]:
    """Make ``$CREDENTIALS_DIRECTORY`` of ``env`` visible to code that reads os.environ itself."""
    key = "CREDENTIALS_DIRECTORY"
    old = os.environ.get(key)
    if env.get(key) and old != env[key]:
        os.environ[key] = env[key]
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def secret_refs(node: Any, where: str = "") -> list[tuple[str, SecretRef]]:
    """Every secret reference in the config, with its dotted place (``uplink.password``)."""
    if isinstance(node, SecretRef):
        return [(where, node)]
    out: list[tuple[str, SecretRef]] = []
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            out += secret_refs(getattr(node, name), f"{where}.{name}" if where else name)
    elif isinstance(node, list | tuple):
        for i, item in enumerate(node):
            out += secret_refs(item, f"{where}[{i}]")
    elif isinstance(node, dict):
        for k, item in node.items():
            out += secret_refs(item, f"{where}.{k}" if where else str(k))
    return out


def missing_files(cfg: Config) -> list[str]:
    """Files the config refers to that are not there (or not readable): secret files, TLS files and the
    platform's public keys. Each line names the key and the path, never a secret's value."""
    wanted: list[tuple[str, Path]] = [(f"{where} (secret file)", ref.file) for where, ref in secret_refs(cfg)
                                      if ref.file is not None]
    up = cfg.uplink
    if up is not None and up.tls is not None:
        wanted += [(f"uplink.tls.{name}", path) for name, path in (("ca_file", up.tls.ca_file),
                                                                    ("cert_file", up.tls.cert_file)) if path]
    if cfg.commands.enabled:
        wanted += [(f"commands.public_keys.{kid}", path) for kid, path in sorted(cfg.commands.public_keys.items())]
    out = []
    for where, path in wanted:
        if not path.exists():
            out.append(f"{where}: {path} does not exist")
        elif not os.access(path, os.R_OK):
            out.append(f"{where}: {path} is not readable by this user")
    return out


def config_urls(node: Any, where: str = "") -> list[tuple[str, str, BaseModel]]:
    """Every ``url`` and ``broker`` in the config: (dotted place, URL, the section holding it)."""
    out: list[tuple[str, str, BaseModel]] = []
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            value = getattr(node, name)
            place = f"{where}.{name}" if where else name
            if name in ("url", "broker") and isinstance(value, str):
                out.append((place, value, node))
            else:
                out += config_urls(value, place)
    elif isinstance(node, list | tuple):
        for i, item in enumerate(node):
            out += config_urls(item, f"{where}[{i}]")
    elif isinstance(node, dict):
        for k, item in node.items():
            out += config_urls(item, f"{where}.{k}" if where else str(k))
    return out


def resolvable_secrets(cfg: Config, env: Mapping[str, str]) -> list[str]:
    """The values of every secret that resolves here, and tokens in configured URLs (to scrub them;
    never to show them)."""
    values = []
    for _, ref in secret_refs(cfg):
        with contextlib.suppress(SecretError):
            values.append(ref.resolve(env).get_secret_value())
    for _, url, _ in config_urls(cfg):
        values += [v for v in url_secrets(url) if len(v) >= URL_TOKEN_MIN_CHARS]
    return values


def _forms(s: str) -> set[bytes]:
    forms = {s, json.dumps(s)[1:-1], json.dumps(s, ensure_ascii=False)[1:-1], repr(s)[1:-1]}
    return {f.encode("utf-8") for f in forms if f}


def _needles(secrets: Iterable[str]) -> list[bytes]:
    """The byte strings a secret may appear as in collected text: as is, JSON- or repr-escaped, and
    the long lines of a multi-line secret (a PEM key) one by one. Short secrets are not needles (see
    :data:`SHORT_SECRET_CHARS`)."""
    found: set[bytes] = set()
    for s in secrets:
        if len(s) < SHORT_SECRET_CHARS:
            continue
        forms = {s, json.dumps(s)[1:-1], json.dumps(s, ensure_ascii=False)[1:-1], repr(s)[1:-1]}
        forms.update(line.strip() for line in s.splitlines() if len(line.strip()) >= 16)
        found.update(f.encode("utf-8") for f in forms if f)
    return sorted(found, key=len, reverse=True)


def _whole_values(secrets: Iterable[str]) -> re.Pattern[bytes] | None:
    """Short secrets where they stand as a whole value: between quotes, or after '=' up to a separator."""
    forms = sorted({f for s in secrets if s and len(s) < SHORT_SECRET_CHARS for f in _forms(s)},
                   key=len, reverse=True)
    if not forms:
        return None
    alt = b"(?:" + b"|".join(re.escape(f) for f in forms) + b")"
    quoted = rb'(?<=")' + alt + rb'(?=")|' + rb"(?<=')" + alt + rb"(?=')"
    assigned = rb"(?<==)" + alt + rb"""(?=[\s&;,"')\]}]|$)"""
    return re.compile(quoted + rb"|" + assigned, re.MULTILINE)


def scrub(data: bytes, secrets: Iterable[str]) -> bytes:
    """Every secret replaced by one fixed placeholder: long ones wherever they occur, short ones only as
    whole values (see :data:`SHORT_SECRET_CHARS`)."""
    secrets = list(secrets)
    for needle in _needles(secrets):
        data = data.replace(needle, REDACTED)
    pattern = _whole_values(secrets)
    return data if pattern is None else pattern.sub(REDACTED, data)


def _scrub_text(text: str, secrets: list[str]) -> str:
    return scrub(text.encode("utf-8"), secrets).decode("utf-8", "replace") if secrets else text


# --- the checks ------------------------------------------------------------------------------------

def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _owner(path: Path) -> str:
    try:
        import pwd  # noqa: PLC0415 - POSIX only

        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (ImportError, KeyError, OSError):
        return "?"


def _whoami() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def check_state_dir(cfg: Config) -> list[Check]:
    from edgeagent.app import state_dir_for  # noqa: PLC0415

    d = state_dir_for(cfg)
    out: list[Check] = []
    if d.is_dir():
        if os.access(d, os.W_OK | os.X_OK):
            out.append(Check("state dir", "ok", f"{d} is writable (owner {_owner(d)})"))
        else:
            out.append(Check("state dir", "warn",
                             f"{d} is not writable by {_whoami()} (owner {_owner(d)}); the service's user "
                             "must be able to write it"))
    elif d.exists():
        out.append(Check("state dir", "fail", f"{d} exists but is not a directory"))
    else:
        parent = _nearest_existing(d)
        if os.access(parent, os.W_OK | os.X_OK):
            out.append(Check("state dir", "ok", f"{d} does not exist yet; it is created at first start"))
        else:
            out.append(Check("state dir", "warn",
                             f"{d} does not exist and {_whoami()} cannot create it in {parent}; under "
                             "systemd, StateDirectory= creates it"))
    base = _nearest_existing(d)
    free_mb = shutil.disk_usage(base).free / (1024 * 1024)
    min_mb = cfg.outbox.min_free_mb
    detail = (f"{free_mb:,.0f} MB free on {base} (keeps {min_mb:g} MB free; "
              f"backlog cap {cfg.outbox.cap_mb:g} MB)")
    if free_mb < min_mb:
        out.append(Check("disk space", "fail", detail + "; the outbox will refuse events"))
    elif free_mb < 2 * min_mb:
        out.append(Check("disk space", "warn", detail + "; little room left for a backlog"))
    else:
        out.append(Check("disk space", "ok", detail))
    return out


def _iso_ms(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def outbox_summary(conn: sqlite3.Connection, path: Path) -> dict[str, Any]:
    """Unsent counts per class, the oldest unsent time, next seq: from a read-only connection."""
    classes: dict[str, dict[str, Any]] = {
        p.label: {"unsent": 0, "unsent_bytes": 0, "oldest_unsent_created": None} for p in Priority}
    for prio, n, nbytes, oldest in conn.execute(
        "SELECT prio, COUNT(*), COALESCE(SUM(size), 0), MIN(created_ms) FROM outbox "
        "WHERE sent_ms IS NULL GROUP BY prio"
    ):
        label = Priority(prio).label if prio in Priority._value2member_map_ else str(prio)
        classes[label] = {"unsent": n, "unsent_bytes": nbytes, "oldest_unsent_created": _iso_ms(oldest)}
    max_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0]
    meta: dict[str, int] = {}
    with contextlib.suppress(sqlite3.Error):
        meta = {str(k): int(v) for k, v in conn.execute("SELECT key, value FROM meta")}
    history = conn.execute("SELECT COUNT(*) FROM outbox WHERE sent_ms IS NOT NULL").fetchone()[0]
    return {
        "path": str(path),
        "db_bytes": path.stat().st_size,
        "next_seq": max(meta.get("next_seq", 1), max_seq + 1),
        "history_rows": history,
        "evicted_total": meta.get("evicted_total"),
        "schema_version": meta.get("schema_version"),
        "classes": classes,
    }


def check_outbox(cfg: Config) -> Check:
    path = outbox_path(cfg)
    try:
        with outbox_ro(path) as conn:
            problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                return Check("outbox", "fail", f"{path} fails its integrity check: {'; '.join(problems[:3])}")
            s = outbox_summary(conn, path)
    except NoOutboxError:
        return Check("outbox", "ok", f"none yet at {path}; the daemon creates it at first start")
    except sqlite3.Error as exc:
        return Check("outbox", "fail", f"{path} cannot be read: {exc}")
    unsent = ", ".join(f"{k} {v['unsent']}" for k, v in s["classes"].items())
    return Check("outbox", "ok", f"integrity ok; unsent: {unsent}; next seq {s['next_seq']}; "
                                 f"{s['db_bytes'] / 1e6:.1f} MB")


def check_clock(cfg: Config) -> Check:
    if kernel_clock_synced():
        return Check("clock", "ok", "synchronised (the kernel reports NTP sync)")
    detail = ("not synchronised: events are stamped as unsynced and corrected later; check NTP "
              "(timedatectl timesync-status)")
    if cfg.clock.sync == "synced":
        detail += "; note: the config trusts the clock anyway (clock.sync: synced)"
    return Check("clock", "warn", detail)


def check_secrets(cfg: Config, env: Mapping[str, str]) -> list[Check]:
    refs = secret_refs(cfg)
    if not refs:
        return [Check("secrets", "ok", "none configured")]
    out: list[Check] = []
    for where, ref in refs:
        name = f"secret {where}"
        try:
            ref.resolve(env)
        except SecretError as exc:
            if ref.credential is not None and not env.get("CREDENTIALS_DIRECTORY"):
                out.append(Check(name, "warn", f"{ref.describe()} is only visible to the service "
                                               "(LoadCredential=); cannot check it from here"))
            else:
                out.append(Check(name, "fail", str(exc)))
        else:
            if len(ref.resolve(env).get_secret_value()) < SHORT_SECRET_CHARS:
                out.append(Check(name, "warn", f"{ref.describe()} resolves but is shorter than "
                                               f"{SHORT_SECRET_CHARS} characters: easy to guess"))
            else:
                out.append(Check(name, "ok", f"{ref.describe()} resolves"))
    return out


_CLEAR_SCHEMES = {"mqtt": "mqtts", "http": "https", "ws": "wss"}
# Fields that travel to the server named by the URL beside them (an HMAC key, a TLS key never do).
_SENT_SECRETS = ("password", "authorization", "token")
_TOKEN_KEY = re.compile(r"token|key|secret|sig|auth|pass", re.IGNORECASE)


def check_plaintext(cfg: Config) -> list[Check]:
    """Passwords, bearer tokens and URL tokens that would cross the network in clear text."""
    out: list[Check] = []
    for where, url, section in config_urls(cfg):
        parts = urlsplit(url)
        if parts.scheme not in _CLEAR_SCHEMES or getattr(section, "tls", None) is not None:
            continue
        sent = [name for name in _SENT_SECRETS if getattr(section, name, None) is not None]
        if parts.password or parts.username:
            sent.append("user info in the URL")
        if any(_TOKEN_KEY.search(key) for key, _ in _query_pairs(parts.query)):
            sent.append("a token in the URL's query")
        if not sent:
            continue
        if is_loopback_host(parts.hostname):
            out.append(Check(f"clear text {where}", "ok", f"{where}: {', '.join(sent)} over {parts.scheme}:// stays on "
                                                 "this box (loopback)"))
            continue
        allowed = " (allowed by uplink.allow_plaintext)" if getattr(section, "allow_plaintext", False) else ""
        out.append(Check(f"clear text {where}", "warn",
                         f"{where}: {', '.join(sent)} would cross the network in clear text over "
                         f"{parts.scheme}://{parts.hostname}{allowed}; use {_CLEAR_SCHEMES[parts.scheme]}://"))
    return out


def _query_pairs(query: str) -> list[tuple[str, str]]:
    return [(p.partition("=")[0], p.partition("=")[2]) for p in query.split("&") if p]


def _cert_dates(cert: Any) -> tuple[datetime, datetime]:
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def check_tls(cfg: Config, env: Mapping[str, str], now: datetime | None = None) -> list[Check]:
    from cryptography import x509  # noqa: PLC0415 - only here
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    up = cfg.uplink
    if up is None or not up.enabled:
        return []
    if not up.uses_tls:
        return [Check("tls", "skip", f"not used ({up.broker} is plain MQTT)")]
    now = now or datetime.now(UTC)
    tls = up.tls
    out: list[Check] = []
    if tls is None or tls.ca_file is None:
        out.append(Check("tls ca", "ok", "the system's CA store"))
    else:
        try:
            cas = x509.load_pem_x509_certificates(tls.ca_file.read_bytes())
        except OSError as exc:
            out.append(Check("tls ca", "fail", f"{tls.ca_file}: cannot read: {exc.strerror}"))
        except ValueError as exc:
            out.append(Check("tls ca", "fail", f"{tls.ca_file}: not PEM certificates ({exc})"))
        else:
            expired = [c for c in cas if _cert_dates(c)[1] < now]
            detail = f"{tls.ca_file}: {len(cas)} certificate(s)"
            if expired:
                out.append(Check("tls ca", "warn", detail + f", {len(expired)} expired"))
            else:
                out.append(Check("tls ca", "ok", detail))
    if tls is None or tls.cert_file is None:
        return out
    cert = None
    try:
        cert = x509.load_pem_x509_certificate(tls.cert_file.read_bytes())
    except OSError as exc:
        out.append(Check("tls client cert", "fail", f"{tls.cert_file}: cannot read: {exc.strerror}"))
    except ValueError as exc:
        out.append(Check("tls client cert", "fail", f"{tls.cert_file}: not a PEM certificate ({exc})"))
    else:
        start, end = _cert_dates(cert)
        days = (end - now).total_seconds() / 86_400
        subject = cert.subject.rfc4514_string()
        if end < now:
            out.append(Check("tls client cert", "fail", f"{subject}: expired on {end:%Y-%m-%d}"))
        elif start > now:
            out.append(Check("tls client cert", "fail",
                             f"{subject}: not valid before {start:%Y-%m-%d} (is the clock right?)"))
        elif days < CERT_WARN_DAYS:
            out.append(Check("tls client cert", "warn",
                             f"{subject}: expires {end:%Y-%m-%d}, in {days:.0f} days; renew it"))
        else:
            out.append(Check("tls client cert", "ok",
                             f"{subject}: valid until {end:%Y-%m-%d} ({days:.0f} days)"))
    if tls.key is None:
        return out
    try:
        key_path = tls.key.path_for(env)
        data = key_path.read_bytes()
    except SecretError as exc:
        out.append(Check("tls client key", "fail", str(exc)))
        return out
    except OSError as exc:
        out.append(Check("tls client key", "fail", f"{tls.key.describe()} cannot be read: {exc.strerror}"))
        return out
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        out.append(Check("tls client key", "fail",
                         f"{tls.key.describe()} is encrypted with a passphrase; give an unencrypted key and "
                         "protect the file instead"))
        return out
    except ValueError:
        out.append(Check("tls client key", "fail", f"{tls.key.describe()} is not a PEM private key"))
        return out
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    what = tls.key.describe()
    if cert is None:
        out.append(Check("tls client key", "ok", f"{what} loads"))
    elif key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        out.append(Check("tls client key", "fail", f"{what} does not match the client certificate"))
    else:
        out.append(Check("tls client key", "ok", f"{what} loads and matches the certificate"))
    return out


def check_command_keys(cfg: Config) -> Check:
    from edgeagent.kernel.pipeline.commands import load_public_key  # noqa: PLC0415

    if not cfg.commands.enabled:
        return Check("command keys", "skip", "commands are disabled")
    keys = cfg.commands.public_keys
    if not keys:
        return Check("command keys", "warn",
                     "no platform public keys: every command from the cloud is rejected")
    errors = []
    for kid, path in sorted(keys.items()):
        try:
            load_public_key(path)
        except ConfigError as exc:
            errors.append(f"{kid}: {exc}")
    if errors:
        return Check("command keys", "fail", "; ".join(errors))
    return Check("command keys", "ok", f"{len(keys)} key(s) load: {', '.join(sorted(keys))}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _config_health_url(cfg: Config) -> str | None:
    if not cfg.health.enabled or cfg.health.port == 0:
        return None
    host = cfg.health.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104 - a client
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{cfg.health.port}"


def daemon_endpoint(cfg: Config) -> tuple[int | None, str | None]:
    """(pid, health URL) of the daemon from its runtime file; the configured URL as a fallback."""
    from edgeagent.app import RUNTIME_FILE, state_dir_for  # noqa: PLC0415

    pid: int | None = None
    info = read_runtime(state_dir_for(cfg), RUNTIME_FILE)
    with contextlib.suppress(ValueError, TypeError):
        pid = int(info["pid"]) if info.get("pid") is not None else None
    # The runtime file is the daemon account's to write: only a loopback HTTP URL from it is used.
    url = trusted_health_url(info.get("health_url"))
    return pid, url or _config_health_url(cfg)


def http_get_json(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> tuple[int, Any]:
    """(status, JSON body) of a GET on the local health endpoint; HTTP errors return their status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - local URL
            return int(resp.status), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"null")
        except ValueError:
            return exc.code, body.decode("utf-8", "replace")


def check_daemon(cfg: Config) -> tuple[Check, bool]:
    """The check, and whether a daemon seems to be running."""
    pid, url = daemon_endpoint(cfg)
    if pid is not None and not _pid_alive(pid):
        return Check("daemon", "warn", f"not running (stale runtime file of pid {pid})"), False
    who = f"pid {pid}" if pid is not None else "a daemon"
    if url is None:
        if pid is not None:
            return Check("daemon", "ok", f"running ({who}); its health endpoint is disabled"), True
        return Check("daemon", "warn", "not running (no runtime file; health endpoint disabled)"), False
    try:
        code, body = http_get_json(f"{url}/healthz")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if pid is not None:
            return Check("daemon", "fail", f"{who} is alive but {url} does not answer ({reason})"), True
        return Check("daemon", "warn", f"not running (nothing answers on {url}); "
                                       "systemctl status edgeagent"), False
    detail = body.get("detail") if isinstance(body, dict) else body
    if code == 200:
        return Check("daemon", "ok", f"running ({who}), healthy at {url}"), True
    return Check("daemon", "fail", f"running ({who}) but unhealthy (HTTP {code}): {detail}"), True


def check_cameras_live(cfg: Config, running: bool) -> list[Check]:
    """Each camera's stream as the running daemon sees it: online, frames arriving, reconnects, detector
    latency (issue 9: camera health in doctor, from the same figures as status and /metrics)."""
    cams = [d for d in cfg.devices if getattr(d, "type", None) == "camera" and d.enabled]
    if not cams:
        return []
    _, url = daemon_endpoint(cfg)
    if not running or url is None:
        return [Check("camera streams", "skip", "the daemon is not running: no live figures")]
    try:
        code, body = http_get_json(f"{url}/status")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return [Check("camera streams", "warn", f"cannot read {url}/status: {getattr(exc, 'reason', exc)}")]
    section = body.get("cameras") if isinstance(body, dict) and code == 200 else None
    live = section.get("cameras") if isinstance(section, dict) else None
    checks: list[Check] = []
    for cam in cams:
        st = live.get(cam.id) if isinstance(live, dict) else None
        if not isinstance(st, dict):
            checks.append(Check(f"camera {cam.id}", "warn", "the daemon reports nothing for it yet"))
            continue
        stream = st.get("stream") or {}
        pipe = st.get("pipeline") or {}
        figures = (f"{stream.get('fps_in', 0)} fps in, {stream.get('decoded', 0)} decoded, "
                   f"{stream.get('skipped', 0)} skipped, {stream.get('dropped', 0)} dropped, "
                   f"{stream.get('reconnects_last_hour', 0)} reconnects in the last hour, "
                   f"detector p99 {pipe.get('detector_ms_p99')} ms")
        if st.get("online") is True:
            flapping = (stream.get("reconnects_last_hour") or 0) >= 6
            checks.append(Check(f"camera {cam.id}", "warn" if flapping else "ok", f"online: {figures}"))
        else:
            why = st.get("error") or stream.get("error") or "no frame yet"
            checks.append(Check(f"camera {cam.id}", "fail", f"offline: {why}; {figures}"))
    return checks


def check_local_broker(cfg: Config, root: Path = Path("/")) -> Check:
    """The box's own mosquitto, read from its config files: no anonymous access, a password file, an ACL,
    per_listener_settings handled, TLS on every listener that is not loopback (issue 8)."""
    from edgeagent.cli.broker import audit as audit_broker  # noqa: PLC0415
    from edgeagent.drivers.broker.files import BrokerPaths  # noqa: PLC0415

    wb = getattr(cfg, "wristbands", None)
    if wb is None or not wb.enabled:
        return Check("local broker", "skip", "no wristbands: the box's own broker is not used")
    host = urlsplit(wb.broker).hostname or ""
    if host not in {"127.0.0.1", "::1", "localhost"}:
        return Check("local broker", "skip", f"wristbands use the broker at {host}; check its config there")
    paths = BrokerPaths(root)
    if not paths.main_conf.exists():
        return Check("local broker", "fail", f"no {paths.main_conf}: install mosquitto (apt-get install "
                                             "mosquitto), then run 'edgeagent broker setup'")
    findings, _ = audit_broker(paths)
    fails = [f.text for f in findings if f.severity == "fail"]
    warns = [f.text for f in findings if f.severity == "warn"]
    if fails:
        return Check("local broker", "fail", "; ".join(fails + warns) + " (edgeagent broker setup fixes this)")
    if warns:
        return Check("local broker", "warn", "; ".join(warns))
    return Check("local broker", "ok", "no anonymous access, an account per client and an ACL; the LAN "
                                       "listener uses TLS")


def check_broker(cfg: Config, env: Mapping[str, str], daemon_running: bool) -> Check:
    up = cfg.uplink
    if up is None:
        return Check("broker", "skip", "no uplink configured")
    if not up.enabled:
        return Check("broker", "skip", "the uplink is disabled")
    client_id = up.client_id or f"edgeagent-{cfg.site_id}-{cfg.gateway_id}"
    if daemon_running:
        # The broker would drop the daemon's own session for a second client with its id.
        client_id += "-doctor"
    uplink = importlib.import_module("edgeagent.cloud_bridge.uplink")
    limit = up.connect_timeout_s * 2 + 2  # MQTT 5, then perhaps 3.1.1
    try:
        with _credentials_from(env):
            protocol = asyncio.run(asyncio.wait_for(uplink.probe(up, client_id), timeout=limit))
    except UplinkAuthError as exc:
        return Check("broker", "fail", f"{up.broker} refused our credentials: {exc}")
    except SecretError as exc:
        if env.get("CREDENTIALS_DIRECTORY") or not any(r.credential for _, r in secret_refs(up)):
            return Check("broker", "fail", str(exc))
        # The service's credential is out of reach by hand: at least see that the broker answers.
        try:
            socket.create_connection((up.host, up.port), timeout=up.connect_timeout_s).close()
        except OSError as oexc:
            return Check("broker", "fail", f"{up.host}:{up.port}: cannot connect: {oexc.strerror or oexc}")
        return Check("broker", "warn", f"{up.host}:{up.port} accepts connections; login not tested: {exc}")
    except TimeoutError:
        return Check("broker", "fail", f"{up.broker}: no answer within {limit:g} s")
    except (EdgeagentError, OSError, ssl.SSLError) as exc:
        return Check("broker", "fail", str(exc) or type(exc).__name__)
    tls = " over TLS" if up.uses_tls else ""
    return Check("broker", "ok", f"connected to {up.broker} with MQTT {protocol}{tls} as {client_id}")


def run_checks(path: Path, env: Mapping[str, str] | None = None,
               on_step: Callable[[str], None] | None = None) -> tuple[list[Check], Config | None]:
    """All checks, in order; each one reports its own failure and none stops the others."""
    env = secret_environ() if env is None else env
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return [Check("config", "fail", str(exc))], None
    checks = [Check("config", "ok", f"{path} is valid (site {cfg.site_id}, gateway {cfg.gateway_id}, "
                                    f"{len(cfg.devices)} devices)")]
    running = False

    def daemon() -> list[Check]:
        nonlocal running
        check, running = check_daemon(cfg)
        return [check]

    steps: list[tuple[str, Callable[[], list[Check]]]] = [
        ("state dir", lambda: check_state_dir(cfg)),
        ("outbox", lambda: [check_outbox(cfg)]),
        ("clock", lambda: [check_clock(cfg)]),
        ("secrets", lambda: check_secrets(cfg, env)),
        ("clear text", lambda: check_plaintext(cfg)),
        ("tls", lambda: check_tls(cfg, env)),
        ("command keys", lambda: [check_command_keys(cfg)]),
        ("daemon", daemon),
        ("broker", lambda: [check_broker(cfg, env, running)]),
        ("local broker", lambda: [check_local_broker(cfg)]),
        ("capabilities", lambda: [Check(c.name, c.status, c.detail) for c in doctor_checks(cfg)]),
        ("cameras", lambda: check_cameras_live(cfg, running)),
    ]
    for name, step in steps:
        if on_step is not None:
            on_step(name)
        try:
            checks += step()
        except Exception as exc:  # noqa: BLE001 - a broken check is reported, the others still run
            checks.append(Check(name, "fail", f"the check itself failed: {type(exc).__name__}: {exc}"))
    secrets = resolvable_secrets(cfg, env)
    return [Check(c.name, c.status, _scrub_text(c.detail, secrets)) for c in checks], cfg


def doctor_report(path: Path, checks: list[Check]) -> dict[str, Any]:
    counts = {s: sum(1 for c in checks if c.status == s) for s in ("ok", "warn", "fail", "skip")}
    return {"config": str(path), "ok": counts["fail"] == 0, "summary": counts,
            "checks": [c.to_json() for c in checks]}


# --- doctor ----------------------------------------------------------------------------------------

def doctor(config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """Check the config, state dir, disk, outbox, clock, secrets, TLS files, keys, daemon and broker."""
    path = config_path(config)
    if as_json:
        checks, _ = run_checks(path)
    else:
        with err_console.status("checking...") as status:
            checks, _ = run_checks(path, on_step=lambda name: status.update(f"checking {name}..."))
    report = doctor_report(path, checks)
    if as_json:
        print_json(report)
    else:
        t = Table(box=None, header_style="bold", pad_edge=False)
        t.add_column("check", no_wrap=True)
        t.add_column("result", no_wrap=True)
        t.add_column("detail", ratio=1, overflow="fold")
        for c in checks:
            t.add_row(escape(c.name), f"[{_STYLE[c.status]}]{c.status}[/]", escape(c.detail))
        console.print(t)
        n = report["summary"]
        console.print(f"{n['ok']} ok, {n['warn']} warnings, {n['fail']} failed"
                      + ("" if report["ok"] else "  [bold red]not ready[/]"))
    if not report["ok"]:
        raise typer.Exit(1)


# --- diagnose --------------------------------------------------------------------------------------

def versions() -> dict[str, Any]:
    pkgs: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            pkgs[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pkgs[name] = None
    os_release: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep and key in ("PRETTY_NAME", "ID", "VERSION_ID"):
                os_release[key] = value.strip().strip('"')
    return {
        "edgeagent": __version__,
        "python": sys.version,
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "os_release": os_release,
        "sqlite": sqlite3.sqlite_version,
        "openssl": ssl.OPENSSL_VERSION,
        "packages": pkgs,
    }


def daemon_status(cfg: Config | None) -> dict[str, Any]:
    if cfg is None:
        return {"error": "no valid config, so no daemon address"}
    _, url = daemon_endpoint(cfg)
    if url is None:
        return {"error": "the health endpoint is disabled"}
    try:
        code, body = http_get_json(f"{url}/status")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"error": f"the daemon does not answer on {url}: {getattr(exc, 'reason', exc)}"}
    if code != 200 or not isinstance(body, dict):
        return {"error": f"HTTP {code} from {url}/status", "body": body}
    return body


def outbox_report(cfg: Config | None) -> dict[str, Any]:
    if cfg is None:
        return {"error": "no valid config, so no outbox path"}
    path = outbox_path(cfg)
    try:
        with outbox_ro(path) as conn:
            return outbox_summary(conn, path)
    except (NoOutboxError, sqlite3.Error, OSError) as exc:
        return {"error": str(exc), "path": str(path)}


def journal() -> str:
    exe = shutil.which("journalctl")
    if exe is None:
        return "journalctl is not available on this system; no journal collected.\n"
    try:
        res = subprocess.run([exe, "-u", "edgeagent", "-n", "1000", "--no-pager"],  # noqa: S603 - fixed args
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"journalctl failed: {exc}\n"
    text = res.stdout
    if res.returncode != 0 or res.stderr.strip():
        text += f"\n[journalctl exit {res.returncode}] {res.stderr}"
    return text


def _jsonb(data: Any) -> bytes:
    return (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8")


def write_archive(out: Path, files: Mapping[str, bytes]) -> None:
    """A .tar.gz readable only by its owner, written via a temp file and renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w:gz") as tar:
                now = time.time()
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mtime = int(now)
                    info.mode = 0o600
                    tar.addfile(info, io.BytesIO(data))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def diagnose(
    config: Path | None = ConfigOption,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o",
        help="archive path or directory (default: edgeagent-diagnose-GATEWAY-TIME.tar.gz here)")] = None,
) -> None:
    """Collect config (secrets hidden), versions, doctor, status, outbox and journal into a .tar.gz."""
    path = config_path(config)
    env = secret_environ()
    files: dict[str, bytes] = {}
    state: dict[str, Any] = {"cfg": None}

    def collect_config() -> None:
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            files["config.redacted.json"] = _jsonb({"path": str(path), "error": str(exc)})
            return
        state["cfg"] = cfg
        files["config.redacted.json"] = _jsonb(redacted(cfg))

    def collect_doctor() -> None:
        checks, _ = run_checks(path, env)
        files["doctor.json"] = _jsonb(doctor_report(path, checks))

    steps: list[tuple[str, str, Callable[[], None]]] = [
        ("config", "config.redacted.json", collect_config),
        ("versions", "versions.json", lambda: files.update({"versions.json": _jsonb(versions())})),
        ("doctor checks", "doctor.json", collect_doctor),
        ("daemon status", "status.json",
         lambda: files.update({"status.json": _jsonb(daemon_status(state["cfg"]))})),
        ("outbox", "outbox.json", lambda: files.update({"outbox.json": _jsonb(outbox_report(state["cfg"]))})),
        ("journal", "journal.txt", lambda: files.update({"journal.txt": journal().encode("utf-8")})),
    ]
    with Progress(TextColumn("{task.description:<24}"), BarColumn(bar_width=30), TaskProgressColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task("collecting", total=len(steps) + 1)
        for label, member, step in steps:
            progress.update(task, description=f"collecting {label}")
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - the archive is most useful when things are broken
                files[member] = _jsonb({"error": f"collecting {label} failed: {type(exc).__name__}: {exc}"})
            progress.advance(task)
        progress.update(task, description="writing the archive")
        cfg: Config | None = state["cfg"]
        # Defence in depth: nothing above should contain a secret; scrub every one that resolves anyway.
        secrets = resolvable_secrets(cfg, env) if cfg is not None else []
        scrubbed = {name: scrub(data, secrets) for name, data in files.items()}
        gateway = cfg.gateway_id if cfg is not None else "unknown"
        name = f"edgeagent-diagnose-{gateway}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.tar.gz"
        out = Path.cwd() / name if output is None else (output / name if output.is_dir() else output)
        try:
            write_archive(out, scrubbed)
        except OSError as exc:
            fail(escape(f"cannot write {out}: {exc}"))
        progress.advance(task)
    console.print(f"wrote {escape(str(out))}", soft_wrap=True)
    console.print("[dim]it holds no secret values; check it before sending it anyway[/]")
