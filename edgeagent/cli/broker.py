"""``edgeagent broker``: set up the box's own mosquitto (the one wristband gateways, guard-room panels and
the daemon use) and manage its accounts. What goes into the files is decided in
:mod:`edgeagent.drivers.broker.files`; this module reads and writes them, hashes passwords with Debian's
``mosquitto_passwd`` and tells a running broker to reload.

Passwords never appear on a command line (``mosquitto_passwd -b`` would put them in ``ps`` output): the
plain ``user:password`` line goes into a 0600 file in a private temporary directory, ``mosquitto_passwd -U``
hashes it in place, and only the hashed line is kept.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import grp
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeagent.cli.common import ConfigOption, JsonOption, config_path, fail, print_json
from edgeagent.drivers.broker import files as bf
from edgeagent.drivers.broker.files import BrokerPaths, Client, Directive, Finding, Topics

# Paths, fingerprints and passwords must stay on one line each, to be copied whole.
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(no_args_is_help=True, help="The box's own MQTT broker (mosquitto) and its accounts.")

RootOption = typer.Option(None, "--root", help="work on the files under DIR instead of / (tests, a look at the "
                                               "result); paths written into the config are under DIR too",
                          show_default=False)
SanOption = typer.Option([], "--san", help="another name or address for the certificate (repeatable)")
BROKER_USER = "mosquitto"
# Single-valued mosquitto options that Debian's mosquitto.conf may already set: a second value is an error.
_SINGLE_VALUED = frozenset({"persistence_location", "pid_file", "persistence_file"})
PASSWD_TIMEOUT_S = 30.0


# --- files -----------------------------------------------------------------------------------------------

def _real(paths: BrokerPaths) -> bool:
    return paths.root == Path("/")


def _owner(paths: BrokerPaths, user: str) -> tuple[int, int] | None:
    """uid/gid to give a file on a real install (None under --root, or when the user does not exist)."""
    if not _real(paths):
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    try:
        gid = grp.getgrnam(user).gr_gid
    except KeyError:
        gid = pw.pw_gid
    return pw.pw_uid, gid


def mkdirs(directory: Path, mode: int) -> None:
    """Create ``directory`` and missing parents with ``mode`` whatever the umask (mosquitto, not root,
    must be able to reach its key in /etc/mosquitto/certs); existing ones are left as they are."""
    missing: list[Path] = []
    p = directory
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=mode)
        d.chmod(mode)


def write_file(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> bool:
    """Write ``data`` atomically with ``mode`` (and owner) from the first byte; False if it was already so."""
    with contextlib.suppress(OSError):
        st = path.stat()
        if (path.read_bytes() == data and st.st_mode & 0o777 == mode
                and (owner is None or (st.st_uid, st.st_gid) == owner)):
            return False
    mkdirs(path.parent, 0o755)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        if owner is not None:
            os.fchown(fd, *owner)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    return True


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def mosquitto_passwd() -> str:
    exe = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(exe).exists():
        fail("mosquitto_passwd not found: install Debian's mosquitto first (apt-get install mosquitto)")
    return exe


def hash_line(user: str, password: str) -> str:
    """The password-file line for ``user``, hashed by ``mosquitto_passwd -U`` (PBKDF2-SHA512)."""
    exe = mosquitto_passwd()
    with tempfile.TemporaryDirectory(prefix="edgeagent-passwd-") as tmp:  # 0700: ours alone
        plain = Path(tmp) / "passwd"
        fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, f"{user}:{password}\n".encode())
        finally:
            os.close(fd)
        try:
            subprocess.run([exe, "-U", str(plain)],  # noqa: S603 - fixed program, our own temp file
                           check=True, capture_output=True, timeout=PASSWD_TIMEOUT_S)
        except subprocess.CalledProcessError as exc:
            # Its output never holds the password (it names the file); still, keep it short.
            fail(f"mosquitto_passwd -U failed (exit {exc.returncode}): {exc.stderr.decode(errors='replace')[:200]}")
        line = plain.read_text(encoding="utf-8").strip()
    if not line.startswith(f"{user}:$") or "\n" in line:
        fail("mosquitto_passwd -U did not produce a hashed line")
    return line


def new_password() -> str:
    # 24 random bytes: 192 bits, URL-safe so it survives any device's web form.
    return secrets.token_urlsafe(24)


# --- the effective mosquitto config ----------------------------------------------------------------------

def _in_root(paths: BrokerPaths, value: str) -> Path:
    p = Path(value)
    if _real(paths) or not p.is_absolute() or p.is_relative_to(paths.root):
        return p
    return paths.under(value)


def read_config(paths: BrokerPaths) -> tuple[list[Directive], list[str]]:
    """Every directive mosquitto reads, in its order: the main file, and each ``include_dir``'s ``*.conf``
    (sorted, as mosquitto does) where it is named. Also the files that could not be read."""
    out: list[Directive] = []
    problems: list[str] = []

    def load(path: Path, depth: int) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror or exc}")
            return
        for d in bf.parse_conf(text, str(path)):
            if d.key == "include_dir" and d.args and depth < 2:
                directory = _in_root(paths, d.args[0])
                with contextlib.suppress(OSError):
                    for f in sorted(directory.glob("*.conf")):
                        load(f, depth + 1)
            else:
                out.append(d)

    load(paths.main_conf, 0)
    return out, problems


def included(paths: BrokerPaths) -> bool:
    """Whether the main config reads our drop-in's directory."""
    for d in bf.parse_conf(_read(paths.main_conf), str(paths.main_conf)):
        if d.key == "include_dir" and d.args and _in_root(paths, d.args[0]) == paths.conf.parent:
            return True
    return False


def audit(paths: BrokerPaths) -> tuple[list[Finding], list[Directive]]:
    directives, problems = read_config(paths)
    findings = [Finding("fail", f"cannot read {p}") for p in problems]
    if not problems:
        findings += bf.audit(directives, exists=lambda f: _in_root(paths, f).exists())
        if paths.conf.exists() and not included(paths):
            findings.append(Finding("fail", f"{paths.main_conf} has no 'include_dir {paths.conf.parent}': "
                                            f"mosquitto never reads {paths.conf}"))
    return findings, directives


# --- running broker --------------------------------------------------------------------------------------

def _systemctl() -> str | None:
    """systemctl's path when systemd runs this machine (sd_booted(3)'s test)."""
    exe = shutil.which("systemctl")
    return exe if exe is not None and Path("/run/systemd/system").is_dir() else None


def _broker_pid(directives: list[Directive], paths: BrokerPaths) -> int | None:
    pid_files = [d.args[0] for d in directives if d.key == "pid_file" and d.args]
    if not pid_files:
        return None
    try:
        pid = int(_in_root(paths, pid_files[-1]).read_text(encoding="ascii").strip())
        comm = Path(f"/proc/{pid}/comm").read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        return None
    return pid if comm == "mosquitto" else None


def reload_broker(paths: BrokerPaths) -> str:
    """SIGHUP: mosquitto re-reads its password file and ACL (not its listeners)."""
    directives, _ = read_config(paths)
    pid = _broker_pid(directives, paths)
    if pid is not None:
        os.kill(pid, signal.SIGHUP)
        return f"mosquitto (pid {pid}) reloaded its accounts and ACL"
    systemctl = _systemctl()
    if _real(paths) and systemctl and subprocess.run(  # noqa: S603 - fixed arguments
            [systemctl, "is-active", "--quiet", "mosquitto"], check=False, timeout=30).returncode == 0:
        subprocess.run([systemctl, "kill", "-s", "HUP", "mosquitto"], check=True, timeout=30)  # noqa: S603
        return "mosquitto reloaded its accounts and ACL"
    return "mosquitto is not running: it reads the accounts when it starts"


def restart_broker(paths: BrokerPaths) -> str:
    """Listeners change only on a restart."""
    systemctl = _systemctl()
    if _real(paths) and systemctl:
        subprocess.run([systemctl, "enable", "--quiet", "mosquitto"], check=False, timeout=60)  # noqa: S603
        done = subprocess.run([systemctl, "restart", "mosquitto"], check=False, timeout=60)  # noqa: S603
        if done.returncode == 0:
            return "mosquitto restarted on the new config"
        return "mosquitto did not restart: see 'journalctl -u mosquitto'"
    return f"restart mosquitto to apply the new config (mosquitto -c {paths.main_conf})"


# --- the edgeagent config's topics ---------------------------------------------------------------------

def _config_file(config: Path | None, paths: BrokerPaths) -> Path:
    """--config, else the config of the install the files belong to (under --root DIR: DIR's)."""
    if config is None and not _real(paths):
        return paths.under("/etc/edgeagent/edgeagent.yaml")
    return config_path(config)


def topics_from_config(path: Path) -> tuple[Topics, str]:
    """The ACL's topics from the edgeagent config, and where they came from."""
    from edgeagent.capabilities import load_config  # noqa: PLC0415 - keeps `edgeagent broker --help` fast
    from edgeagent.drivers.wristband.decoders import SUBSCRIPTIONS  # noqa: PLC0415
    from edgeagent.kernel.errors import ConfigError  # noqa: PLC0415

    every_input = tuple(t for subs in SUBSCRIPTIONS.values() for t in subs)
    if not path.exists():
        return Topics(inputs=every_input), f"defaults ({path} does not exist)"
    try:
        cfg: Any = load_config(path)
    except ConfigError as exc:
        fail(f"{path} is not valid, so its topics are unknown:\n{exc}", 2)
    notifier_topics = tuple(n.topic for n in cfg.notifiers.values() if getattr(n, "type", None) == "mqtt")
    wb = getattr(cfg, "wristbands", None)
    if wb is None:
        return Topics(inputs=every_input, notifier_topics=notifier_topics), f"{path} (no wristbands: defaults)"
    inputs = tuple(t for inp in wb.inputs for t in (inp.topics or SUBSCRIPTIONS[inp.decoder]))
    return Topics(inputs=inputs, guard_topic=wb.guard_topic, ack_topic=wb.ack_topic,
                  notifier_topics=notifier_topics), str(path)


# --- certificates ----------------------------------------------------------------------------------------

def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _load_key(path: Path) -> rsa.RSAPrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key if isinstance(key, rsa.RSAPrivateKey) else None


def ensure_certs(paths: BrokerPaths, names: list[str], now: dt.datetime) -> tuple[x509.Certificate, list[str]]:
    """The CA (made once, kept: devices pin it) and a server certificate naming ``names`` (re-issued when
    a name is missing or it nears its end). Returns the CA and what was done."""
    done: list[str] = []
    ca_key, ca_cert = _load_key(paths.ca_key), _load_cert(paths.ca_cert)
    if ca_key is None or ca_cert is None or ca_cert.public_key() != ca_key.public_key():
        ca_key = bf.new_key()
        ca_cert = bf.make_ca(ca_key, names[0], now)
        # Only root reads the CA key (mosquitto never needs it): it signs the next server certificate.
        write_file(paths.ca_key, bf.key_pem(ca_key), 0o600)
        write_file(paths.ca_cert, bf.cert_pem(ca_cert), 0o644)
        done.append(f"made a CA ({paths.ca_cert})")
    server, server_key = _load_cert(paths.lan_cert), _load_key(paths.lan_key)
    if (server is None or server_key is None or server.public_key() != server_key.public_key()
            or not bf.server_cert_current(server, ca_cert, names, now)):
        server_key = bf.new_key()
        server = bf.make_server_cert(ca_key, ca_cert, server_key, names, now)
        write_file(paths.lan_key, bf.key_pem(server_key), 0o600, _owner(paths, BROKER_USER))
        write_file(paths.lan_cert, bf.cert_pem(server), 0o644)
        done.append(f"issued the LAN certificate for {', '.join(names)}")
    return ca_cert, done


def box_names(lan_address: str | None, extra: list[str]) -> list[str]:
    host = socket.gethostname()
    names = [host, f"{host}.local", "localhost", "127.0.0.1"]
    if lan_address and lan_address not in {"0.0.0.0", "::"}:  # noqa: S104 - compared, not bound
        names.insert(0, lan_address)
    return list(dict.fromkeys([*names, *extra]))


# --- accounts --------------------------------------------------------------------------------------------

def _clients(paths: BrokerPaths) -> list[Client]:
    return bf.parse_acl_clients(_read(paths.acl))


def write_accounts(paths: BrokerPaths, clients: list[Client], topics: Topics,
                   passwd_text: str) -> bool:
    owner = _owner(paths, BROKER_USER)
    changed = write_file(paths.passwd, passwd_text.encode(), 0o600, owner)
    changed |= write_file(paths.acl, bf.render_acl(clients, topics).encode(), 0o600, owner)
    return changed


def _need_root(paths: BrokerPaths) -> None:
    if _real(paths) and os.geteuid() != 0:
        fail("the broker's files belong to root: run with sudo (or --root DIR to try it out)")


# --- commands --------------------------------------------------------------------------------------------

@app.command()
def setup(
    root: Path | None = RootOption,
    lan_address: str | None = typer.Option(None, "--lan-address", help="the LAN address the TLS listener binds "
                                           "(default: every interface); also named in the certificate"),
    lan_port: int = typer.Option(bf.LAN_PORT, "--lan-port", min=1, max=65535),
    local_port: int = typer.Option(bf.LOCAL_PORT, "--local-port", min=1, max=65535,
                                   help="the plain loopback listener (the daemon and local tools)"),
    san: list[str] = SanOption,
    config: Path | None = ConfigOption,
) -> None:
    """Set up the local mosquitto: config, TLS certificate, the daemon's account, the ACL. Idempotent."""
    paths = BrokerPaths(root.resolve() if root else Path("/"))
    _need_root(paths)
    mosquitto_passwd()
    cfg_path = _config_file(config, paths)
    topics, source = topics_from_config(cfg_path)
    now = dt.datetime.now(dt.UTC)
    ca, done = ensure_certs(paths, box_names(lan_address, san), now)
    # The daemon's password: kept once made (the daemon reads it as a systemd credential).
    cred = _read(paths.credential).strip()
    passwd_text = _read(paths.passwd)
    if not cred:
        cred = new_password()
        mkdirs(paths.credential.parent.parent, 0o755)
        mkdirs(paths.credential.parent, 0o700)
        write_file(paths.credential, (cred + "\n").encode(), 0o600)
        done.append(f"made the daemon's password ({paths.credential})")
        passwd_text = bf.passwd_set(passwd_text, bf.DAEMON_USER, hash_line(bf.DAEMON_USER, cred))
    elif bf.DAEMON_USER not in bf.passwd_users(passwd_text):
        passwd_text = bf.passwd_set(passwd_text, bf.DAEMON_USER, hash_line(bf.DAEMON_USER, cred))
    clients = [c for c in _clients(paths) if c.role != "daemon"] + [Client(bf.DAEMON_USER, "daemon")]
    accounts_changed = write_accounts(paths, clients, topics, passwd_text)
    main = bf.parse_conf(_read(paths.main_conf), str(paths.main_conf))
    set_elsewhere = frozenset(d.key for d in main if d.key in _SINGLE_VALUED)
    opts = bf.ConfOptions(paths, local_port=local_port, lan_port=lan_port, lan_address=lan_address,
                          set_elsewhere=set_elsewhere)
    if "persistence_location" not in set_elsewhere and not paths.persistence_dir.exists():
        paths.persistence_dir.mkdir(parents=True, mode=0o750)
        if (owner := _owner(paths, BROKER_USER)) is not None:
            os.chown(paths.persistence_dir, *owner)
    conf_changed = write_file(paths.conf, bf.render_conf(opts).encode(), 0o644)
    for line in done:
        console.print(f"  {escape(line)}")
    console.print(f"wrote {paths.conf}, {paths.passwd}, {paths.acl} (topics from {escape(source)})"
                  if conf_changed or accounts_changed else "the broker's files were already up to date")
    if conf_changed:
        console.print(escape(restart_broker(paths)))
    elif accounts_changed:
        console.print(escape(reload_broker(paths)))
    findings, _ = audit(paths)
    for f in findings:
        err_console.print(f"[{'bold red' if f.severity == 'fail' else 'yellow'}]{f.severity}:[/] {escape(f.text)}",
                          soft_wrap=True)
    console.print(f"\nLAN listener: port {lan_port} on {lan_address or 'every interface'}, TLS; devices trust "
                  f"the CA {paths.ca_cert}\n  CA SHA-256 fingerprint {bf.fingerprint(ca)}")
    console.print(
        "\nThe daemon logs in as 'edgeagent' on the loopback listener. In the edgeagent config:\n"
        f"  wristbands:\n    broker: mqtt://127.0.0.1:{local_port}\n    username: {bf.DAEMON_USER}\n"
        "    password: {credential: local-mqtt-password}\n"
        f"(the password is in {paths.credential}, 0600 root; systemd hands it to the daemon)", markup=False)
    if any(f.severity == "fail" for f in findings):
        raise typer.Exit(1)


def _lan_endpoint(paths: BrokerPaths) -> tuple[str, int]:
    """The LAN listener's address (or the box's name) and port, from our drop-in."""
    directives = bf.parse_conf(_read(paths.conf), str(paths.conf))
    host, port = f"{socket.gethostname()}.local", bf.LAN_PORT
    for i, d in enumerate(directives):
        if d.key == "listener" and any(x.key == "certfile" for x in directives[i + 1:]):
            port = int(d.args[0])
            if len(d.args) > 1:
                host = d.args[1]
    return host, port


@app.command("add-client")
def add_client(
    name: str = typer.Argument(..., help="the account: a BLE gateway's id (its topics carry it), a panel's name"),
    role: str = typer.Option(..., "--role", help="ble-gateway, lora or panel"),
    new_password_: bool = typer.Option(False, "--new-password", help="the account exists: give it a new password"),
    root: Path | None = RootOption,
    config: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Create a device's or panel's account and print what to enter on it (the password is shown once)."""
    paths = BrokerPaths(root.resolve() if root else Path("/"))
    _need_root(paths)
    try:
        bf.check_name(name)
    except ValueError as exc:
        fail(str(exc), 2)
    if role not in bf.CLIENT_ROLES:
        fail(f"--role must be one of {', '.join(bf.CLIENT_ROLES)}", 2)
    if name == bf.DAEMON_USER:
        fail(f"{name!r} is the daemon's own account (edgeagent broker setup manages it)", 2)
    if not paths.conf.exists():
        fail(f"{paths.conf} does not exist: run 'edgeagent broker setup' first")
    topics, _ = topics_from_config(_config_file(config, paths))
    clients = _clients(paths)
    passwd_text = _read(paths.passwd)
    existing = next((c for c in clients if c.name == name), None)
    if existing is not None and not new_password_:
        fail(f"{name!r} exists (role {existing.role}); --new-password gives it a new one, "
             f"'edgeagent broker remove {name}' deletes it")
    if existing is None and name in bf.passwd_users(passwd_text):
        fail(f"{name!r} is in {paths.passwd} but not an edgeagent account; choose another name")
    client = Client(name, role)  # narrowed to a Role by the check against CLIENT_ROLES above
    password = new_password()
    passwd_text = bf.passwd_set(passwd_text, name, hash_line(name, password))
    clients = [c for c in clients if c.name != name] + [client]
    write_accounts(paths, clients, topics, passwd_text)
    reloaded = reload_broker(paths)
    host, port = _lan_endpoint(paths)
    ca = _load_cert(paths.ca_cert)
    info: dict[str, Any] = {"host": host, "port": port, "tls": True, "ca_certificate": str(paths.ca_cert),
            "ca_sha256": bf.fingerprint(ca) if ca else None, "username": name, "password": password,
            "client_id": f"{name} (any id unique to this device)", "role": role,
            "may_publish": bf.publishes(client, topics), "may_read": bf.reads(client, topics),
            "broker": reloaded}
    if as_json:
        print_json(info)
        return
    console.print(f"account {name!r} ({role}) created; {reloaded}.\nEnter on the device:", markup=False)
    for label, value in (("host", host), ("port", str(port)), ("TLS", "on (MQTT over TLS, TLS 1.2 or newer)"),
                         ("CA certificate", f"{paths.ca_cert} (copy it to the device)"),
                         ("CA SHA-256", info["ca_sha256"] or "?"), ("username", name),
                         ("password", f"{password}   (shown once: note it now)"),
                         ("may publish", ", ".join(info["may_publish"])),
                         ("may read", ", ".join(info["may_read"]) or "-")):
        console.print(f"  {label:<15} {value}", markup=False)


@app.command("list")
def list_clients(root: Path | None = RootOption, as_json: bool = JsonOption,
                 config: Path | None = ConfigOption) -> None:
    """The broker's accounts, their roles and what they may publish."""
    paths = BrokerPaths(root.resolve() if root else Path("/"))
    topics, _ = topics_from_config(_config_file(config, paths))
    users = set(bf.passwd_users(_read(paths.passwd)))
    clients = _clients(paths)
    rows: list[dict[str, Any]] = [
        {"name": c.name, "role": c.role, "password": c.name in users, "may_publish": bf.publishes(c, topics)}
        for c in clients]
    # Accounts someone added by hand: they can log in, and the ACL gives them nothing.
    rows += [{"name": u, "role": None, "password": True, "may_publish": []}
             for u in sorted(users - {c.name for c in clients})]
    if as_json:
        print_json(rows)
        return
    t = Table(title=f"accounts of the local broker ({paths.passwd})", title_justify="left")
    for col in ("name", "role", "password", "may publish"):
        t.add_column(col)
    for r in rows:
        t.add_row(escape(str(r["name"])), escape(str(r["role"] or "(not ours: no access)")),
                  "yes" if r["password"] else "[red]missing[/]", escape(", ".join(r["may_publish"])))
    console.print(t)


@app.command("remove")
def remove_client(name: str = typer.Argument(...), root: Path | None = RootOption,
                  config: Path | None = ConfigOption) -> None:
    """Delete an account: on the reload mosquitto drops its connection, and it can no longer log in."""
    paths = BrokerPaths(root.resolve() if root else Path("/"))
    _need_root(paths)
    if name == bf.DAEMON_USER:
        fail(f"{name!r} is the daemon's own account; it stays", 2)
    clients = _clients(paths)
    passwd_text = _read(paths.passwd)
    if name not in {c.name for c in clients} and name not in bf.passwd_users(passwd_text):
        fail(f"no account {name!r}")
    topics, _ = topics_from_config(_config_file(config, paths))
    write_accounts(paths, [c for c in clients if c.name != name], topics, bf.passwd_remove(passwd_text, name))
    console.print(f"removed {name!r}; {reload_broker(paths)}", markup=False)
