"""``edgeagent console``: the guard-room console's accounts and certificate, and the tools the daemon's console
uses from the CLI layer (the config file's comment-keeping editor, doctor's checks, the plate list). The module
is not called ``console``: that name is the CLI's output object in ``edgeagent.cli``.

Accounts live in the daemon's state directory (``console/users.json``, 0600, owned like the state directory);
a running daemon sees a new or removed account at once. Roles: viewer (sees), guard (also acknowledges alarms
and opens the gate), installer (also draws zones and lines and runs the checks).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from edgeagent.cli.common import ConfigOption, JsonOption, config_path, console, fail, load_or_exit, print_json
from edgeagent.console.accounts import ROLES, AccountError, AccountStore, check_password
from edgeagent.console.server import TLS_DIR, USERS_PATH
from edgeagent.kernel.config.schema import parse_yaml
from edgeagent.kernel.errors import ConfigError

app = typer.Typer(no_args_is_help=True, help="The guard-room console: accounts and certificate.")


def _store(config: Path | None) -> AccountStore:
    from edgeagent.app import state_dir_for  # noqa: PLC0415 - keeps `edgeagent --help` fast

    _, cfg = load_or_exit(config)
    return AccountStore(state_dir_for(cfg) / USERS_PATH)


def _read_password(password_file: Path | None) -> str:
    if password_file is not None:
        try:
            return password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            fail(escape(f"cannot read {password_file}: {exc.strerror}"))
    env = os.environ.get("EDGEAGENT_CONSOLE_PASSWORD")
    if env:
        return env
    password: str = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    return password


@app.command("add-user")
def add_user(name: str = typer.Argument(..., help="the login name, e.g. guard-li"),
             role: str = typer.Option(..., "--role", help=f"one of: {', '.join(ROLES)}"),
             password_file: Path | None = typer.Option(  # noqa: B008
                 None, "--password-file", help="read the password from this file (else $EDGEAGENT_CONSOLE_PASSWORD, "
                 "else asked twice)"),
             replace: bool = typer.Option(False, "--replace", help="set a new password or role for an existing user"),
             config: Path | None = ConfigOption) -> None:
    """Add a console account (the password is stored as a scrypt hash, never in clear)."""
    store = _store(config)
    password = _read_password(password_file)
    try:
        check_password(password)
        account = store.add(name, role, password, replace=replace)
    except AccountError as exc:
        fail(escape(str(exc)))
    console.print(f"{'updated' if replace else 'added'} [bold]{escape(account.name)}[/] ({account.role}) in "
                  f"{escape(str(store.path))}")


@app.command("list-users")
def list_users(config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """The console's accounts and their roles."""
    store = _store(config)
    try:
        users = store.load()
    except AccountError as exc:
        fail(escape(str(exc)))
    rows = [{"name": a.name, "role": a.role} for a in sorted(users.values(), key=lambda a: a.name)]
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no console accounts; add one with [bold]edgeagent console add-user NAME --role guard[/]")
        return
    t = Table(box=None, header_style="bold", pad_edge=False)
    t.add_column("user")
    t.add_column("role")
    for r in rows:
        t.add_row(escape(r["name"]), r["role"])
    console.print(t)


@app.command("remove-user")
def remove_user(name: str = typer.Argument(...), config: Path | None = ConfigOption) -> None:
    """Remove a console account (its open sessions end at their next request)."""
    store = _store(config)
    try:
        store.remove(name)
    except AccountError as exc:
        fail(escape(str(exc)))
    console.print(f"removed {escape(name)}")


@app.command("enable")
def enable(host: str = typer.Option(..., "--host", help="the box's address on the guard room's network (127.0.0.1: "
                                    "this box only)"),
           port: int = typer.Option(8443, "--port", min=1, max=65535),
           config: Path | None = ConfigOption) -> None:
    """Turn the console on (or move it) in the config file, keeping its comments; the self-signed certificate is
    made again if it does not name this address. Restart the daemon to apply."""
    import ipaddress  # noqa: PLC0415

    from edgeagent.capabilities import validate_doc  # noqa: PLC0415
    from edgeagent.cli.config_edit import dump, last_slot, put_lines, take_lines, write_atomically  # noqa: PLC0415

    path = config_path(config)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        fail(escape(f"{host!r} is not an IP address (the address of the box the guard room's browsers open)"))
    try:
        old_text = path.read_text(encoding="utf-8")
        doc = parse_yaml(old_text, path)
    except (OSError, ConfigError) as exc:
        fail(escape(f"cannot read {path}: {exc}"))
    section = doc.get("console")
    if isinstance(section, CommentedMap):
        section["host"] = host
        section["port"] = port
        section.pop("enabled", None)
    else:
        after = take_lines(last_slot(doc))  # comment lines at the end of the file stay at the end
        entry = CommentedMap()
        entry["host"] = host
        entry["port"] = port
        doc["console"] = entry
        put_lines(last_slot(doc), after)
    new_text = dump(doc)
    try:
        cfg = validate_doc(parse_yaml(new_text, path), path)
        write_atomically(path, new_text, old_text)
    except (OSError, ConfigError) as exc:
        fail(escape(f"{path} left unchanged: {exc}"))
    console.print(f"console on https://{host}:{port} in {escape(str(path))}")
    _certificate_for(cfg, host)
    console.print("[dim]restart the daemon to apply: systemctl restart edgeagent[/]")


def _certificate_for(cfg: Any, host: str) -> None:
    """The self-signed certificate, made again when it does not name ``host`` (a supplied one is left alone)."""
    import ipaddress  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415

    from edgeagent.app import state_dir_for  # noqa: PLC0415
    from edgeagent.console import tls  # noqa: PLC0415

    tls_cfg = cfg.console.tls
    if tls_cfg.cert_file is not None:
        return
    folder = state_dir_for(cfg) / TLS_DIR
    cert_path = folder / tls.CERT_FILE
    if cert_path.is_file():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if ipaddress.ip_address(host) in san.get_values_for_type(x509.IPAddress):
                return
        except (OSError, ValueError, x509.ExtensionNotFound):
            pass
    if folder.parent.parent.is_dir():  # the state directory exists (else the daemon makes it at first start)
        cert_path, _ = tls.make_self_signed(folder, cfg.gateway_id, [host, *tls_cfg.hosts])
        console.print(f"made a self-signed certificate for {escape(host)}: SHA-256 {tls.fingerprint(cert_path)}",
                      soft_wrap=True)


@app.command("cert")
def cert(config: Path | None = ConfigOption) -> None:
    """Make the console's self-signed certificate now (the installer does) and print its fingerprint, to compare
    with what the browser shows."""
    from edgeagent.app import state_dir_for  # noqa: PLC0415
    from edgeagent.console import tls  # noqa: PLC0415

    _, cfg = load_or_exit(config)
    section = getattr(cfg, "console", None)
    host = getattr(section, "host", "127.0.0.1")
    tls_cfg = getattr(section, "tls", None)
    if tls_cfg is not None and tls_cfg.cert_file is not None:
        cert_path = tls_cfg.cert_file
    else:
        extra = list(getattr(tls_cfg, "hosts", []) or [])
        cert_path, _, made = tls.ensure_certificate(state_dir_for(cfg) / TLS_DIR, cfg.gateway_id, [host, *extra])
        if made:
            console.print(f"made a self-signed certificate in {escape(str(cert_path.parent))}")
    try:
        console.print(f"{escape(str(cert_path))}\nSHA-256 {tls.fingerprint(cert_path)}", soft_wrap=True)
    except (OSError, ValueError) as exc:
        fail(escape(f"cannot read {cert_path}: {exc}"))


# --- the installer's tools, for the console running inside the daemon ---------------------------------------

def _flow(items: list[Any]) -> CommentedSeq:
    seq = CommentedSeq(items)
    seq.fa.set_flow_style()
    return seq


def _point(value: Any) -> CommentedSeq:
    if not (isinstance(value, list | tuple) and len(value) == 2):
        raise ValueError("a point is [x, y]")
    try:
        x, y = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        raise ValueError("a point's coordinates are numbers") from None
    return _flow([round(x, 4), round(y, 4)])


class ConfigTools:
    """:class:`edgeagent.console.ConsoleTools` on the config file at ``path``: zones and lines are written with
    the comment-keeping editor of ``edgeagent device`` (the same comment moves, the whole config validated
    before anything is written, an atomic replace that refuses when the file changed meanwhile)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save_shape(self, camera_id: str, kind: str, shape: Mapping[str, Any]) -> dict[str, Any]:
        from edgeagent.capabilities import validate_doc  # noqa: PLC0415
        from edgeagent.cli.config_edit import dump, last_slot, put_lines, take_lines, write_atomically  # noqa: PLC0415
        from edgeagent.kernel.config.yamlerr import to_builtin  # noqa: PLC0415

        if kind not in ("zone", "line"):
            raise ValueError("kind is zone or line")
        name = shape.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("the shape needs a name")
        entry = CommentedMap()
        entry["name"] = name
        if kind == "zone":
            points = shape.get("points")
            if not isinstance(points, list):
                raise ValueError("a zone needs its points")
            entry["points"] = _flow([_point(p) for p in points])
        else:
            entry["a"] = _point(shape.get("a"))
            entry["b"] = _point(shape.get("b"))
        try:
            old_text = self.path.read_text(encoding="utf-8")
            doc = parse_yaml(old_text, self.path)
        except (OSError, ConfigError) as exc:
            raise ValueError(f"cannot read {self.path}: {exc}") from None
        devices = doc.get("devices")
        dev = next((d for d in devices or () if isinstance(d, CommentedMap) and str(d.get("id")) == camera_id
                    and d.get("type") == "camera"), None)
        if dev is None:
            raise ValueError(f"no camera {camera_id!r} in {self.path}")
        key = "zones" if kind == "zone" else "lines"
        existing = dev.get(key)
        # Comment lines that follow the device (or its list) stay after it: moved around the append.
        after_dev = take_lines(last_slot(dev))
        if isinstance(existing, CommentedSeq) and len(existing) > 0:
            same = next((i for i, z in enumerate(existing) if isinstance(z, dict) and z.get("name") == name), None)
            if same is not None:  # redrawn: new coordinates, its other settings (classes, loiter_s) kept
                for k, v in entry.items():
                    existing[same][k] = v
            else:
                if existing[0] is not None and isinstance(existing[0], CommentedMap) and \
                        existing[0].fa.flow_style():
                    entry.fa.set_flow_style()
                after_list = take_lines(last_slot(existing))
                existing.append(entry)
                put_lines(last_slot(existing), after_list)
        else:
            seq = CommentedSeq([entry])
            if dev.fa.flow_style():
                entry.fa.set_flow_style()
            else:
                seq.fa.set_block_style()
            dev[key] = seq
        put_lines(last_slot(dev), after_dev)
        new_text = dump(doc)
        try:
            reread = parse_yaml(new_text, self.path)
            cfg = validate_doc(reread, self.path)
        except ConfigError as exc:
            raise ValueError(f"not saved, the config would not be valid:\n{exc}") from None
        if to_builtin(reread) != to_builtin(doc):
            raise ValueError("not saved: the edited YAML does not read back the same")
        try:
            write_atomically(self.path, new_text, old_text)
        except (OSError, ConfigError) as exc:
            raise ValueError(f"cannot write {self.path}: {exc}") from None
        cam = next(d for d in cfg.devices if d.id == camera_id)
        # The camera's zones and lines as the file now has them, every setting (the console applies them to the
        # running camera with its "camera.shapes" action, and redraws them).
        return {"path": str(self.path), "note": "restart the daemon to apply", "note_code": "restart",
                "camera": {"zones": [z.model_dump(mode="json") for z in getattr(cam, "zones", ())],
                           "lines": [ln.model_dump(mode="json") for ln in getattr(cam, "lines", ())]}}

    def doctor(self) -> dict[str, Any]:
        from edgeagent.cli.support import doctor_report, run_checks  # noqa: PLC0415

        checks, _ = run_checks(self.path)
        return doctor_report(self.path, checks)

    def device_test(self, device_id: str) -> dict[str, Any]:
        """The device's ``device add`` probe (test before configure) against the config file's settings. A device on
        a serial line is not probed: the running daemon owns that line (its live state is on the devices page)."""
        from edgeagent.capabilities import PROBES, load_config  # noqa: PLC0415
        from edgeagent.kernel.capability import ProbeContext  # noqa: PLC0415
        from edgeagent.kernel.errors import EdgeagentError  # noqa: PLC0415

        cfg = load_config(self.path)
        dev = next((d for d in cfg.devices if d.id == device_id), None)
        if dev is None:
            raise ValueError(f"no device {device_id!r} in {self.path}")
        kind = str(getattr(dev, "type", "?"))
        probe = PROBES.get(kind)
        if probe is None:
            raise ValueError(f"devices of type {kind} have no test")
        bus = getattr(dev, "bus", None)
        buses = getattr(getattr(cfg, "modbus", None), "buses", None) or {}
        if bus in buses and buses[bus].kind == "rtu":
            raise ValueError(f"{device_id} is on the serial line {bus}, which the running daemon owns: see its live "
                             "state on the devices page (or stop the daemon and use 'edgeagent modbus read')")
        try:
            detail = probe(dev, ProbeContext(cfg, self.path))
        except (EdgeagentError, OSError, TimeoutError) as exc:
            return {"device": device_id, "ok": False, "detail": str(exc)}
        return {"device": device_id, "ok": True, "detail": detail or "answers"}

    def plates(self) -> list[dict[str, Any]]:
        from edgeagent.app import state_dir_for  # noqa: PLC0415
        from edgeagent.capabilities import load_config  # noqa: PLC0415
        from edgeagent.drivers.camera.rules.plate_list import PlateList, plates_path  # noqa: PLC0415

        path = plates_path(state_dir_for(load_config(self.path)))
        if not path.exists():
            return []
        with PlateList(path) as plates:
            return [{"plate": e.plate, "ref": e.ref, "reason": e.reason,
                     "valid_from": e.valid_from.isoformat() if e.valid_from else None,
                     "valid_until": e.valid_until.isoformat() if e.valid_until else None} for e in plates.entries()]


def config_tools(config: Path | None) -> ConfigTools:
    return ConfigTools(config_path(config))
