"""Commands that act on the running daemon through its local control socket: open a gate from the
guard room, reset a charger's safety lockout, test a siren. The daemon records the calling user."""

from __future__ import annotations

import enum
import http.client
import json
import socket
import unicodedata
from pathlib import Path
from typing import Any

import rich.markup
import typer

from edgeagent.cli.common import (
    ConfigOption,
    JsonOption,
    console,
    fail,
    load_or_exit,
    print_json,
    read_runtime,
    trusted_control_socket,
)

gate_app = typer.Typer(no_args_is_help=True, help="Barrier gates on the running daemon (audited).")
charger_app = typer.Typer(no_args_is_help=True, help="E-bike charging stations on the running daemon.")
output_app = typer.Typer(no_args_is_help=True, help="Named outputs (siren, strobe, door hold) for testing.")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def control_socket(config: Path | None) -> str:
    from edgeagent.app import RUNTIME_FILE, state_dir_for  # noqa: PLC0415 - keeps `edgeagent --help` fast

    _, cfg = load_or_exit(config)
    state_dir = state_dir_for(cfg)
    runtime = state_dir / RUNTIME_FILE
    info = read_runtime(state_dir, RUNTIME_FILE)
    if not info:
        fail(f"the daemon is not running (no usable {runtime}); start it with: systemctl start edgeagent")
    named = info.get("control_socket")
    if not named:
        fail("the running daemon has no control socket")
    # Root's CLI must not be steered by a file the daemon's account (or anyone else) could write.
    path = trusted_control_socket(named, state_dir)
    if path is None:
        fail(f"{runtime} names a control socket that is not one of the daemon's own ({named}); not connecting")
    return path


def call(config: Path | None, action: str, args: dict[str, Any], timeout_s: float = 15.0) -> dict[str, Any]:
    path = control_socket(config)
    conn = _UnixConnection(path, timeout_s)
    try:
        conn.request("POST", f"/{action}", body=json.dumps(args), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read() or b"{}")
    except PermissionError:
        fail(f"not allowed to use {path}: run as root or as a member of the edgeagent group")
    except (OSError, ValueError) as exc:
        fail(f"the daemon does not answer on {path}: {exc}")
    finally:
        conn.close()
    if not body.get("ok"):
        err = body.get("error") or {}
        fail(f"{err.get('code', 'error')}: {err.get('message', 'refused')}")
    result: dict[str, Any] = body.get("result") or {}
    return result


class GateCommand(enum.StrEnum):
    open = "open"
    close = "close"
    hold_open = "hold-open"
    release = "release"


class Reason(enum.StrEnum):
    guard_room = "guard_room"
    visitor = "visitor"
    plate_match = "plate_match"


@gate_app.callback(invoke_without_command=False)
def _gate() -> None:
    """Barrier gates."""


def _gate_cmd(command: str) -> Any:
    def run(device_id: str = typer.Argument(..., help="the gate's device id"),
            reason: Reason = typer.Option(Reason.guard_room, "--reason", help="why (kept in the audit event)"),  # noqa: B008
            note: str | None = typer.Option(None, "--note", help="free text for the audit, e.g. a plate"),
            config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
        result = call(config, "gate", {"device_id": device_id, "command": command.replace("-", "_"),
                                       "reason": reason.value, "note": note})
        if as_json:
            print_json(result)
        else:
            console.print(f"gate {device_id}: {command} sent ({result.get('latency_ms', '?')} ms)")
    run.__doc__ = f"{command.replace('-', ' ').capitalize()} the gate (recorded with your user name and the reason)."
    return run


for _cmd in GateCommand:
    gate_app.command(_cmd.value)(_gate_cmd(_cmd.value))


@charger_app.command("reset")
def charger_reset(device_id: str = typer.Argument(..., help="the charging station's device id"),
                  port: int | None = typer.Option(None, "--port", min=1, help="the port; omit for the station"),
                  config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """Clear a safety lockout once the hazard is gone (refused while it is still present)."""
    result = call(config, "charger-reset", {"device_id": device_id, "port": port})
    if as_json:
        print_json(result)
    else:
        where = f"port {port}" if port else "the station"
        console.print(f"charger {device_id}: lockout of {where} reset; switch it on again when ready")


class OutputAction(enum.StrEnum):
    on = "on"
    off = "off"
    pulse = "pulse"


@output_app.command("set")
def output_set(name: str = typer.Argument(..., help="output name, e.g. siren"),
               action: OutputAction = typer.Argument(..., help="on, off or pulse"),  # noqa: B008
               seconds: float = typer.Option(5.0, "--seconds", min=0.05, help="pulse length"),
               config: Path | None = ConfigOption) -> None:
    """Switch a named output (to test a siren or strobe from the guard room)."""
    call(config, "output", {"name": name, "action": action.value, "seconds": seconds})
    console.print(f"output {name}: {action.value}" + (f" for {seconds:g} s" if action is OutputAction.pulse else ""))


alarms_app = typer.Typer(no_args_is_help=True, help="Alarms on the running daemon (residents' and places').")


@alarms_app.command("list")
def alarms_list(config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """Active alarms, oldest first."""
    alarms = call(config, "alarms", {}).get("alarms", [])
    if as_json:
        print_json(alarms)
        return
    if not alarms:
        console.print("no active alarms")
        return
    from rich.table import Table  # noqa: PLC0415

    t = Table(title=f"{len(alarms)} active alarm(s)", title_justify="left")
    for col in ("id", "kind", "state", "about", "device", "count", "level", "raised (UTC)", "acknowledged by",
                "evidence"):
        t.add_column(col)
    for a in alarms:
        color = "red" if a["state"] in ("raised", "notified") else "yellow"
        # A place alarm (a lift car, a charging shed) names its place; a resident alarm the resident's id.
        about = f"place {_shown(a['place'])}" if a.get("place") else f"resident {_shown(a.get('resident_id'))}"
        evidence = ", ".join(f"{_shown(att.get('kind'))} {_shown(att.get('sha256'))[:12]}"
                             for att in a.get("attachments") or ())
        t.add_row(_shown(a["id"]), _shown(a["kind"]), f"[{color}]{_shown(a['state'])}[/]", about,
                  _shown(a["device_id"]), str(a["count"]), str(a["level"]), _shown(a["first_raised"]["wall"])[:19],
                  _shown(a.get("acknowledged_by")), evidence)
    console.print(t)


@alarms_app.command("ack")
def alarms_ack(alarm_id: str = typer.Argument(..., help="the alarm's id (see 'edgeagent alarms list')"),
               by: str | None = typer.Option(None, "--by", help="who is taking it on (default: your user)"),
               config: Path | None = ConfigOption) -> None:
    """Acknowledge: someone is on the way. Repeats and escalation stop, the siren goes off."""
    result = call(config, "alarm", {"alarm_id": alarm_id, "action": "ack", "by": by})
    _report(alarm_id, "acknowledged", result)


@alarms_app.command("resolve")
def alarms_resolve(alarm_id: str = typer.Argument(..., help="the alarm's id"),
                   note: str | None = typer.Option(None, "--note", help="what happened"),
                   by: str | None = typer.Option(None, "--by", help="who (default: your user)"),
                   config: Path | None = ConfigOption) -> None:
    """Close the alarm, with a note for the record."""
    result = call(config, "alarm", {"alarm_id": alarm_id, "action": "resolve", "by": by, "note": note})
    _report(alarm_id, "resolved", result)


def _report(alarm_id: str, done: str, result: dict[str, Any]) -> None:
    by, caller = _shown(result.get("by")), _shown(result.get("caller"))
    who = by if not caller or caller == by else f"{by} (sent by {caller})"
    if result.get("stored") is False:
        # It took effect (siren off, notifications stopped) but its record is not on disk yet.
        console.print(f"alarm {_shown(alarm_id)} {done} by {who}, not yet stored: the daemon cannot write to "
                      "its disk (see its log); it stores the record as soon as it can")
        return
    console.print(f"alarm {_shown(alarm_id)} {done} by {who}")


def _shown(value: object) -> str:
    """Text from the daemon, safe for a terminal: control and format characters (escape codes, bidi
    overrides) as '?', rich markup escaped. Alarms saved before by/note were checked may hold them."""
    if value is None:
        return ""
    text = "".join("?" if unicodedata.category(ch)[0] == "C" else ch for ch in str(value))
    return rich.markup.escape(text)
