"""``edgeagent plates add|remove|list|import``: the residents' plate list the car gate opens for.

The list is ``plates.db`` in the daemon's state directory (found from the config, as the daemon finds it);
the daemon reads it on every vehicle, so a change here applies to the next car without a restart. Residents'
plates are personal data: the list stays on this box.

Dates: ``2025-06-30`` or ``2025-06-30 18:00`` (``/`` works too), in the box's timezone unless ``--tz`` names
another (``Asia/Shanghai``) or the value carries an offset. A date alone for ``--until`` includes that day.
CSV columns (header line required, any order; ``plate`` required): ``plate,ref,valid_from,valid_until,reason``.
"""

from __future__ import annotations

import getpass
import os
import sqlite3
from datetime import UTC, datetime, time, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.table import Table

from edgeagent.cli.common import ConfigOption, JsonOption, console, fail, load_or_exit, print_json

if TYPE_CHECKING:
    from edgeagent.drivers.camera.rules.plate_list import PlateList
    from edgeagent.drivers.camera.rules.plates import PlateEntry

app = typer.Typer(no_args_is_help=True,
                  help="The residents' plate list the car gate opens for (kept on this box only).")

TzOption = typer.Option(None, "--tz", help="timezone of dates without an offset (default: the box's), e.g. "
                        "Asia/Shanghai or +08:00")
CsvArgument = typer.Argument(..., help="CSV with a header line: plate,ref,valid_from,valid_until,reason")
ByOption = typer.Option(None, "--by", help="who makes the change (default: the user running the command)")


def plate_list(config: Path | None) -> PlateList:
    """The plate list in the config's state directory; exits with the reason when it cannot be opened."""
    from edgeagent.app import state_dir_for  # noqa: PLC0415 - keeps `edgeagent --help` fast
    from edgeagent.drivers.camera.rules.plate_list import PlateList, PlateListError, plates_path  # noqa: PLC0415

    _, cfg = load_or_exit(config)
    path = plates_path(state_dir_for(cfg))
    try:
        return PlateList(path)
    except (PlateListError, OSError, sqlite3.Error) as exc:
        fail(f"cannot open the plate list {escape(str(path))}: {escape(str(exc))}")


def _tz(value: str | None) -> tzinfo | None:
    if not value:
        return None
    from datetime import timezone  # noqa: PLC0415
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # noqa: PLC0415

    text = value.strip()
    if text[:1] in "+-" and len(text) == 6 and text[3] == ":":
        try:
            sign = 1 if text[0] == "+" else -1
            return timezone(sign * timedelta(hours=int(text[1:3]), minutes=int(text[4:6])))
        except ValueError:
            pass
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        fail(f"--tz {escape(value)}: not a timezone (Asia/Shanghai, or an offset like +08:00)")


def _by(value: str | None) -> str:
    if value:
        return value
    return os.environ.get("SUDO_USER") or getpass.getuser()


def _from_text(when: datetime | None) -> str:
    """A start at local midnight as its date, else date and time."""
    if when is None:
        return ""
    local = when.astimezone()
    return local.strftime("%Y-%m-%d") if local.time() == time(0) else local.strftime("%Y-%m-%d %H:%M")


def _until_text(when: datetime | None) -> str:
    """An end at local midnight as the last day it is valid (as it was given), else the moment it ends."""
    if when is None:
        return ""
    local = when.astimezone()
    if local.time() == time(0):
        return (local - timedelta(days=1)).strftime("%Y-%m-%d")
    return local.strftime("%Y-%m-%d %H:%M")


def entry_row(entry: PlateEntry, at: datetime) -> dict[str, Any]:
    return {"plate": entry.plate, "ref": entry.ref, "reason": entry.reason,
            "valid_from": None if entry.valid_from is None else entry.valid_from.isoformat(),
            "valid_until": None if entry.valid_until is None else entry.valid_until.isoformat(),
            "status": entry.validity(at), "added_by": entry.added_by,
            "added_at": None if entry.added_at is None else entry.added_at.isoformat()}


def _describe(entry: PlateEntry) -> str:
    parts = [entry.reason]
    if entry.ref:
        parts.append(f"ref {entry.ref}")
    if entry.valid_from is not None:
        parts.append(f"from {_from_text(entry.valid_from)}")
    if entry.valid_until is not None:
        parts.append(f"until {_until_text(entry.valid_until)}")
    return escape(", ".join(parts))


@app.command("add")
def add_cmd(
    plate: str = typer.Argument(..., help="the plate, e.g. 京A·F0236 (spaces, dots and case do not matter)"),
    ref: str = typer.Option("", "--ref", help="the resident or unit, e.g. 3-1-502"),
    reason: str = typer.Option("resident", "--reason", help="resident, staff, delivery contract, ..."),
    valid_from: str | None = typer.Option(None, "--from", help="first day (or time) it opens the gate"),
    valid_until: str | None = typer.Option(None, "--until", help="last day it opens the gate (a time: until then)"),
    by: str | None = ByOption,
    tz: str | None = TzOption,
    config: Path | None = ConfigOption,
) -> None:
    """Add a plate (or update it if it is on the list)."""
    from edgeagent.drivers.camera.rules.plate_list import PlateListError, parse_when  # noqa: PLC0415

    zone = _tz(tz)
    with plate_list(config) as plates:
        try:
            entry, new = plates.add(plate, ref=ref, reason=reason, valid_from=parse_when(valid_from, tz=zone),
                                    valid_until=parse_when(valid_until, end=True, tz=zone), added_by=_by(by))
        except PlateListError as exc:
            fail(escape(str(exc)))
    console.print(f"{'added' if new else 'updated'} {entry.plate}: {_describe(entry)}", soft_wrap=True)


@app.command("remove")
def remove_cmd(plate: str = typer.Argument(..., help="the plate to remove"),
               config: Path | None = ConfigOption) -> None:
    """Remove a plate (exit 1 if it is not on the list)."""
    from edgeagent.drivers.camera.rules.plates import normalize_plate  # noqa: PLC0415

    with plate_list(config) as plates:
        removed = plates.remove(plate)
    if not removed:
        fail(f"{escape(normalize_plate(plate) or plate)} is not on the plate list")
    console.print(f"removed {escape(normalize_plate(plate))}")


@app.command("list")
def list_cmd(config: Path | None = ConfigOption, as_json: bool = JsonOption,
             valid_only: bool = typer.Option(False, "--valid", help="only the plates that open the gate now")
             ) -> None:
    """Every plate on the list, with its validity now."""
    now = datetime.now(UTC)
    with plate_list(config) as plates:
        entries = [e for e in plates.entries() if not valid_only or e.validity(now) == "valid"]
    if as_json:
        print_json([entry_row(e, now) for e in entries])
        return
    t = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("plate", "ref", "reason", "from", "until", "now", "added by", "added"):
        t.add_column(col, no_wrap=col in ("plate", "from", "until", "now"))
    style = {"valid": "green", "expired": "red", "not_yet_valid": "yellow"}
    for e in entries:
        state = e.validity(now)
        t.add_row(e.plate, escape(e.ref), escape(e.reason), _from_text(e.valid_from), _until_text(e.valid_until),
                  f"[{style[state]}]{state.replace('_', ' ')}[/]", escape(e.added_by), _from_text(e.added_at)[:10])
    console.print(t)
    console.print(f"{len(entries)} plate(s)")


@app.command("import")
def import_cmd(
    csv_file: Path = CsvArgument,
    replace: bool = typer.Option(False, "--replace", help="the file is the whole list: remove plates not in it"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check the file and count, write nothing"),
    by: str | None = ByOption,
    tz: str | None = TzOption,
    config: Path | None = ConfigOption,
) -> None:
    """Import plates from a CSV file: every row or none (a bad row is reported with its line number)."""
    from edgeagent.drivers.camera.rules.plate_list import PlateListError  # noqa: PLC0415

    zone = _tz(tz)
    with plate_list(config) as plates:
        try:
            result = plates.import_csv(csv_file, added_by=_by(by), replace=replace, tz=zone, dry_run=dry_run)
        except PlateListError as exc:
            fail(escape(str(exc)))
        total = plates.count()
    verb = "would import" if dry_run else "imported"
    removed = f", {result.removed} removed" if replace else ""
    console.print(f"{verb} {result.rows} row(s) from {escape(str(csv_file))}: {result.added} added, "
                  f"{result.updated} updated{removed}; {total} plate(s) on the list{' now' if dry_run else ''}",
                  soft_wrap=True)
