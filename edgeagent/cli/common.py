"""Shared pieces of the CLI: where the config is, loading it with a friendly error, output helpers, writing
the config file safely, and reading what the running daemon says about itself without trusting it.

Root runs this CLI; the daemon's account can write its state directory. So a file there (``runtime.json``)
is read without following a link and, when root reads it, only if root or the daemon's account owns it; the
health URL in it is used only if it is plain HTTP to a loopback address, and the control socket only if it
is one of the places the daemon puts it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import typer
from rich.console import Console

from edgeagent.capabilities import load_config
from edgeagent.kernel.config.base import is_loopback_host
from edgeagent.kernel.config.schema import Config
from edgeagent.kernel.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/edgeagent/edgeagent.yaml")
NEW_CONFIG_MODE = 0o640  # root writes, the daemon's group reads; nobody else
DAEMON_RUNTIME_DIR = Path("/run/edgeagent")  # RuntimeDirectory= of the systemd unit
DAEMON_USER = "edgeagent"

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def default_config_path() -> Path:
    return Path(os.environ.get("EDGEAGENT_CONFIG", str(DEFAULT_CONFIG)))


ConfigOption = typer.Option(
    None, "--config", "-c", help="config file (default: $EDGEAGENT_CONFIG or /etc/edgeagent/edgeagent.yaml)",
    show_default=False)
JsonOption = typer.Option(False, "--json", help="machine-readable output")


def config_path(path: Path | None) -> Path:
    return path if path is not None else default_config_path()


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def load_or_exit(path: Path | None) -> tuple[Path, Config]:
    p = config_path(path)
    try:
        return p, load_config(p)
    except ConfigError as exc:
        err_console.print("[bold red]config error[/]")
        err_console.print(str(exc), soft_wrap=True, markup=False)
        raise typer.Exit(2) from None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# --- writing the config file -------------------------------------------------------------------------

def read_config_text(path: Path) -> str:
    """The config file's text, refusing a symbolic link (a planted link would make root read, and then
    show or copy, a file of the link's choosing)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link; refusing to follow it (give the real file)") from None
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        data = fh.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def write_config_file(path: Path, text: str, *, like: Path | None = None) -> None:
    """Replace ``path`` with ``text`` atomically, never writing through a link and never loosening it.

    The text goes to a new temporary file of a random name in the same directory (``O_EXCL``: a planted
    link there is never followed), gets the mode and owner of the file it replaces (or of ``like``; a new
    file: ``0640``, the directory's group), is synced and renamed over ``path``. A rename replaces a link
    itself rather than its target; a link already at ``path`` is refused outright, so the installer learns
    about it.
    """
    current = _lstat(path)
    if current is not None and not stat.S_ISREG(current.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(current.st_mode) else "not a regular file"
        raise ConfigError(f"{path} is {kind}; refusing to write through it")
    template = current if like is None else _lstat(like)
    if template is not None and not stat.S_ISREG(template.st_mode):
        template = None
    mode = stat.S_IMODE(template.st_mode) if template is not None else NEW_CONFIG_MODE
    parent = path.parent
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            # Owner first: chown may clear mode bits. Not root: keeping the group may still be allowed.
            with contextlib.suppress(PermissionError):
                if template is not None:
                    os.fchown(fh.fileno(), template.st_uid if os.geteuid() == 0 else -1, template.st_gid)
                else:
                    os.fchown(fh.fileno(), -1, parent.stat().st_gid)
            os.fchmod(fh.fileno(), mode)
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp_name).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp_name).unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself survives power loss
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


# --- what the running daemon says about itself ---------------------------------------------------------

def _trusted_owners(state_dir: Path) -> set[int]:
    owners = {0}
    with contextlib.suppress(ImportError, KeyError):
        import pwd  # noqa: PLC0415 - POSIX only

        owners.add(pwd.getpwnam(DAEMON_USER).pw_uid)
    with contextlib.suppress(OSError):
        owners.add(state_dir.stat().st_uid)  # the account the daemon runs as owns its state directory
    return owners


def read_runtime(state_dir: Path, name: str) -> dict[str, Any]:
    """The daemon's runtime file, or ``{}``: never through a link; as root, only a file root or the
    daemon's account owns (not one any other user could have put there)."""
    try:
        fd = os.open(state_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64 * 1024:
            return {}
        if os.geteuid() == 0 and st.st_uid not in _trusted_owners(state_dir):
            return {}
        try:
            info = json.loads(fh.read())
        except ValueError:
            return {}
    return info if isinstance(info, dict) else {}


def trusted_health_url(url: Any) -> str | None:
    """``url`` if it is plain HTTP to a loopback address with nothing but a port (what the daemon writes),
    else None: the file is writable by the daemon's account, and root must not be sent elsewhere by it
    (``file://``, another host, a local service's path)."""
    if not isinstance(url, str) or len(url) > 200:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if (parts.scheme != "http" or not is_loopback_host(parts.hostname) or port is None
            or parts.username is not None or parts.password is not None
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        return None
    return url.rstrip("/")


def expected_control_sockets(state_dir: Path, environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where the daemon puts its control socket: its runtime directory, else its state directory."""
    from edgeagent.control import SOCKET_NAME  # noqa: PLC0415 - keeps `edgeagent --help` fast

    env = os.environ if environ is None else environ
    dirs = [Path(d) for d in env.get("RUNTIME_DIRECTORY", "").split(":") if d]
    return [d / SOCKET_NAME for d in (*dirs, DAEMON_RUNTIME_DIR, state_dir)]


def trusted_control_socket(path: Any, state_dir: Path, environ: Mapping[str, str] | None = None) -> str | None:
    """``path`` if it is one of the daemon's socket places, a socket (not a link) and, as root, owned by
    root or the daemon's account; else None."""
    if not isinstance(path, str) or Path(path) not in expected_control_sockets(state_dir, environ):
        return None
    st = _lstat(Path(path))
    if st is None or not stat.S_ISSOCK(st.st_mode):
        return None
    if os.geteuid() == 0 and st.st_uid not in _trusted_owners(state_dir):
        return None
    return path
