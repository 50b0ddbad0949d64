"""``edgeagent``: the installer's and the service's command line."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from edgeagent import __version__
from edgeagent.capabilities import validate_doc
from edgeagent.cli.common import (
    ConfigOption,
    JsonOption,
    config_path,
    console,
    err_console,
    fail,
    load_or_exit,
    print_json,
    read_config_text,
    read_runtime,
    trusted_health_url,
    write_config_file,
)
from edgeagent.cli.starter import starter_config
from edgeagent.kernel.config.schema import CONFIG_VERSION, migrate, parse_yaml, redacted, yaml_rt
from edgeagent.kernel.errors import ConfigError
from edgeagent.kernel.runtime import allocator
from edgeagent.kernel.runtime.logsetup import setup_logging

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="edgeagent: the edge gateway of a residential compound.")
config_app = typer.Typer(no_args_is_help=True, help="Check, show and migrate the config file.")
app.add_typer(config_app, name="config")


def _version_cb(value: bool) -> None:
    if value:
        console.print(f"edgeagent {__version__}")
        raise typer.Exit


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_cb, is_eager=True,
                                       help="print the version")) -> None:
    del version


@app.command()
def init(
    site_id: str = typer.Option(..., "--site-id", help="the compound's id on the platform"),
    gateway_id: str = typer.Option(..., "--gateway-id", help="this box's id within the site"),
    broker: str = typer.Option("mqtts://platform.example:8883", "--broker", help="the platform's MQTT broker"),
    state_dir: str = typer.Option("/var/lib/edgeagent", "--state-dir"),
    config: Path | None = ConfigOption,
    force: bool = typer.Option(False, "--force", help="overwrite an existing file"),
) -> None:
    """Write a commented starter config for a site."""
    path = config_path(config)
    if path.is_symlink():
        fail(f"{path} is a symbolic link; refusing to write through it")
    if path.exists() and not force:
        fail(f"{path} exists; use --force to overwrite it")
    text = starter_config(site_id, gateway_id, broker, state_dir, with_auth=broker.startswith("mqtts"))
    try:
        validate_doc(parse_yaml(text, path), path)
    except ConfigError as exc:
        fail(f"these values do not make a valid config:\n{exc}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_config_file(path, text)
    except (ConfigError, OSError) as exc:
        fail(escape(str(exc)))
    console.print(f"wrote {path}; check it with [bold]edgeagent config validate --config {path}[/]")


@config_app.command("validate")
def config_validate(
    config: Path | None = ConfigOption,
    strict: bool = typer.Option(False, "--strict",
                                help="files the config refers to (secrets, TLS, keys) must exist: an error, not a "
                                "warning (doctor and the installer check this way)"),
) -> None:
    """Validate the config file; errors name the line and the key. Missing referenced files are warnings."""
    from edgeagent.cli.support import missing_files  # noqa: PLC0415

    path, cfg = load_or_exit(config)
    missing = missing_files(cfg)
    for line in missing:
        err_console.print(f"{'error' if strict else 'warning'}: {escape(line)}", soft_wrap=True)
    if missing and strict:
        fail(f"{path}: {len(missing)} referenced file(s) missing", 1)
    note = f"; {len(missing)} referenced file(s) missing" if missing else ""
    console.print(f"{path}: valid (site {cfg.site_id}, gateway {cfg.gateway_id}, {len(cfg.devices)} devices){note}",
                  soft_wrap=True)


@config_app.command("show")
def config_show(config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """Print the effective config (defaults filled in) with secrets hidden."""
    _, cfg = load_or_exit(config)
    data = redacted(cfg)
    if as_json:
        print_json(data)
        return
    import io  # noqa: PLC0415 - only this command needs it

    buf = io.StringIO()
    yaml_rt().dump(data, buf)
    console.print(buf.getvalue(), markup=False, end="")


@config_app.command("migrate")
def config_migrate(config: Path | None = ConfigOption,
                   dry_run: bool = typer.Option(False, "--dry-run", help="show what would change")) -> None:
    """Bring an older config file to the current version, keeping its comments."""
    import io  # noqa: PLC0415

    path = config_path(config)
    try:
        original = read_config_text(path)
        doc = parse_yaml(original, path)
        passed = migrate(doc)
    except (ConfigError, OSError) as exc:
        fail(str(exc))
    if not passed:
        console.print(f"{path} is already at version {CONFIG_VERSION}")
        return
    buf = io.StringIO()
    yaml_rt().dump(doc, buf)
    if dry_run:
        console.print(buf.getvalue(), markup=False)
        return
    try:
        validate_doc(parse_yaml(buf.getvalue(), path), path)
    except ConfigError as exc:
        fail(f"the migrated config does not validate; file left unchanged:\n{exc}")
    backup = path.with_name(path.name + f".v{passed[0] - 1}.bak")
    try:
        write_config_file(backup, original, like=path)  # as closed as the config it copies
        write_config_file(path, buf.getvalue())
    except (ConfigError, OSError) as exc:
        fail(escape(str(exc)))
    console.print(f"migrated {path} to version {passed[-1]} (backup in {backup})")


@app.command()
def run(
    config: Path | None = ConfigOption,
    echo_events: bool = typer.Option(False, "--echo-events",
                                     help="print each event as a JSON line once it is durable"),
) -> None:
    """Run the daemon (what systemd starts)."""
    from edgeagent.app import Daemon, echo_to  # noqa: PLC0415 - keeps `edgeagent --help` fast
    from edgeagent.cli.console_cmd import ConfigTools  # noqa: PLC0415

    path, cfg = load_or_exit(config)
    setup_logging(cfg.log_level)
    allocator.tune()  # before any thread starts (the systemd unit sets the same through the environment)
    try:
        daemon = Daemon(cfg, config_dir=path.parent, console_tools=ConfigTools(path))
        if echo_events:
            daemon.sink.observe(echo_to(sys.stdout))
        code = asyncio.run(daemon.run())
    except ConfigError as exc:
        fail(str(exc), 2)
    if code:
        # A critical task could not recover: a non-zero exit has systemd restart the daemon.
        raise typer.Exit(code)


@app.command()
def demo(
    seconds: float = typer.Option(20.0, "--seconds", help="how long to run"),
    broker: str | None = typer.Option(None, "--broker", help="forward events to this broker (mqtt://HOST:PORT)"),
) -> None:
    """Run the real daemon on simulated devices and print events as they flow."""
    from edgeagent.demo import run_demo  # noqa: PLC0415

    allocator.tune()
    raise typer.Exit(run_demo(seconds=seconds, broker=broker))


def fetch_status(url: str, timeout_s: float = 3.0) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/status", timeout=timeout_s) as resp:  # noqa: S310 - local URL from our runtime file
        data: dict[str, Any] = json.loads(resp.read())
        return data


def health_url_for(cfg_path: Path | None) -> str:
    from edgeagent.app import RUNTIME_FILE, state_dir_for  # noqa: PLC0415

    _, cfg = load_or_exit(cfg_path)
    # The runtime file is the daemon account's to write: only a loopback HTTP URL from it is used.
    url = trusted_health_url(read_runtime(state_dir_for(cfg), RUNTIME_FILE).get("health_url"))
    if url is not None:
        return url
    host = f"[{cfg.health.host}]" if ":" in cfg.health.host else cfg.health.host
    return f"http://{host}:{cfg.health.port}"


@app.command()
def status(config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """Uplink, outbox depth per class, oldest unsent event and drivers, from the running daemon."""
    url = health_url_for(config)
    try:
        st = fetch_status(url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        fail(f"the daemon does not answer on {url} ({getattr(exc, 'reason', exc)}); is it running? "
             "(systemctl status edgeagent)")
    if as_json:
        print_json(st)
        return
    up = st["uplink"]
    console.print(f"[bold]edgeagent {st['version']}[/]  site {st['site_id']}  gateway {st['gateway_id']}  "
                  f"pid {st['pid']}  up {st['uptime_s']:.0f} s  "
                  f"{'[green]healthy[/]' if st['healthy'] else '[red]UNHEALTHY[/]: ' + st['health_detail']}")
    clock = "[green]synchronised[/]" if st["clock_synced"] else "[yellow]not synchronised[/]"
    console.print(f"clock {clock}   loop lag {st['loop_lag_ms']} ms")
    state = up.get("state")
    color = {"connected": "green", "disabled": "dim"}.get(str(state), "red")
    line = f"uplink [{color}]{state}[/]"
    if state != "disabled":
        line += f" to {up['broker']} (MQTT {up.get('protocol') or '-'}{', TLS' if up.get('tls') else ''})"
        line += f", {up['published_events']} events sent"
        if up.get("last_error"):
            line += f"\n  last error: {up['last_error']}"
    console.print(line, soft_wrap=True)
    ob = st["outbox"]
    t = Table(title=f"outbox ({ob['db_bytes'] / 1e6:.1f} MB, next seq {ob['next_seq']}, "
                    f"evicted {ob['evicted_total']})", title_justify="left")
    t.add_column("class")
    t.add_column("unsent", justify="right")
    t.add_column("bytes", justify="right")
    t.add_column("oldest unsent", justify="right")
    for name, c in ob["classes"].items():
        age = c["oldest_unsent_age_s"]
        t.add_row(name, str(c["unsent"]), str(c["unsent_bytes"]), "-" if age is None else f"{age:.0f} s")
    console.print(t)
    dt = Table(title="tasks", title_justify="left")
    for col in ("name", "state", "restarts", "last error"):
        dt.add_column(col)
    for task in st["tasks"]:
        color = {"running": "green", "failed": "red", "backoff": "yellow"}.get(task["state"], "white")
        dt.add_row(task["name"], f"[{color}]{task['state']}[/]", str(task["restarts"]), task["last_error"] or "")
    console.print(dt)
    if st.get("devices"):
        console.print(devices_table(st["devices"]))


def devices_table(rows: list[dict[str, Any]]) -> Table:
    """The daemon's field devices: online, how fresh their last poll is, and what went wrong last."""
    t = Table(title="devices", title_justify="left")
    for col, justify in (("id", "left"), ("type", "left"), ("bus/unit", "left"), ("online", "left"),
                         ("last poll", "right"), ("polls/failures", "right"), ("last error", "left")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for d in rows:
        online = d.get("online")
        state = "[dim]unknown[/]" if online is None else "[green]online[/]" if online else "[red]offline[/]"
        age = d.get("last_poll_age_s")
        failures = d.get("poll_failures") or 0
        t.add_row(escape(str(d.get("id", "?"))), escape(str(d.get("type", ""))),
                  escape(f"{d.get('bus', '-')}/{d.get('unit_id', '-')}"), state,
                  "never" if age is None else f"{age:.1f} s ago",
                  f"{d.get('polls', 0)}/" + (f"[red]{failures}[/]" if failures else "0"),
                  escape(str(d.get("last_error") or "")))
    return t


def _register_subcommands() -> None:
    from edgeagent.cli import (  # noqa: PLC0415
        broker,
        camera,
        devices,
        events,
        local,
        modbus,
        models,
        plates,
        support,
    )
    from edgeagent.cli.console_cmd import app as console_app  # noqa: PLC0415

    app.add_typer(events.app, name="events")
    app.add_typer(devices.app, name="device")
    app.add_typer(modbus.app, name="modbus")
    app.command("doctor")(support.doctor)
    app.add_typer(local.gate_app, name="gate")
    app.add_typer(local.charger_app, name="charger")
    app.add_typer(local.output_app, name="output")
    app.add_typer(local.alarms_app, name="alarms")
    app.command("diagnose")(support.diagnose)
    app.add_typer(broker.app, name="broker")
    app.add_typer(camera.app, name="camera")
    app.add_typer(models.app, name="models")
    app.add_typer(plates.app, name="plates")
    app.add_typer(console_app, name="console")


_register_subcommands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise SystemExit(130) from None
