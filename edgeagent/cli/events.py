"""``edgeagent events``: the local event history, read straight from the outbox database.

Everything here opens the database read-only, so it works while the daemon runs and when it is
stopped, and never changes what the daemon will send.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from edgeagent.cli.common import (
    ConfigOption,
    JsonOption,
    console,
    err_console,
    fail,
    load_or_exit,
    print_json,
)
from edgeagent.kernel.config.schema import Config
from edgeagent.kernel.pipeline.events import Priority
from edgeagent.kernel.pipeline.outbox import DeadLetter, read_dead_letters

app = typer.Typer(no_args_is_help=True,
                  help="Show events kept in the local outbox (sent history, the unsent backlog, dead letters).")

OUTBOX_FILE = "outbox.db"
POLL_S = 0.5
_TAIL_BATCH = 500
_PRIO_STYLE = {"alarm": "bold red", "event": "white", "telemetry": "dim"}
_SINCE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


class NoOutboxError(Exception):
    """The outbox database does not exist (yet)."""


def outbox_path(cfg: Config) -> Path:
    from edgeagent.app import state_dir_for  # noqa: PLC0415 - keeps the CLI's start-up light

    return state_dir_for(cfg) / OUTBOX_FILE


def open_outbox_ro(path: Path) -> sqlite3.Connection:
    """Open the outbox database read-only; raises :class:`NoOutboxError` when there is none.

    While the daemon has the database open, its ``-wal`` and ``-shm`` files exist and a read-only
    connection shares them. With no ``-wal`` file no writer is active: the database is then opened
    as immutable, so nothing is created next to it (a ``-shm`` file created by root would keep the
    daemon, which runs as its own user, from opening its outbox).
    """
    if not path.is_file():
        raise NoOutboxError(f"no outbox yet at {path}; has the daemon run?")
    wal = path.with_name(path.name + "-wal")
    params = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?{params}", uri=True, timeout=5.0,
                           isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


@contextlib.contextmanager
def outbox_ro(path: Path) -> Iterator[sqlite3.Connection]:
    conn = open_outbox_ro(path)
    try:
        yield conn
    finally:
        conn.close()


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``1h``, ``2d``, ``1w`` ago, or an ISO-8601 time (UTC unless it names an offset)."""
    now = now or datetime.now(UTC)
    m = _SINCE_RE.match(text)
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNITS_S[m.group(2)])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: expected an age like 30m, 1h, 2d or an ISO-8601 time like 2026-03-01T08:00",
            param_hint="'--since'") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Row:
    seq: int
    prio: int
    type: str
    device_id: str
    created_ms: int
    sent_ms: int | None
    envelope: dict[str, Any]

    @classmethod
    def from_db(cls, r: sqlite3.Row) -> Row:
        try:
            env = json.loads(r["payload"])
            if not isinstance(env, dict):
                raise TypeError("not an object")  # noqa: TRY301 - handled right below
        except (ValueError, TypeError) as exc:
            env = {"seq": r["seq"], "type": r["type"], "device_id": r["device_id"],
                   "error": f"undecodable payload: {exc}"}
        return cls(r["seq"], r["prio"], r["type"], r["device_id"], r["created_ms"], r["sent_ms"], env)

    @property
    def priority(self) -> str:
        try:
            return Priority(self.prio).label
        except ValueError:
            return str(self.prio)

    def to_json(self) -> dict[str, Any]:
        """The envelope as sent, plus ``_sent_at`` (null while unsent), which is local only."""
        out = dict(self.envelope)
        out["_sent_at"] = None if self.sent_ms is None else _iso(self.sent_ms)
        return out


def _iso(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _type_clause(prefix: str) -> tuple[str, list[Any]]:
    """``contact`` matches ``contact.changed``; ``gateway.clock`` matches ``gateway.clock.synced``.

    A prefix ending in a dot matches by plain string prefix.
    """
    like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    if prefix.endswith("."):
        return "type LIKE ? ESCAPE '\\'", [like + "%"]
    return "(type = ? OR type LIKE ? ESCAPE '\\')", [prefix, like + ".%"]


_COLUMNS = "seq, prio, type, device_id, created_ms, sent_ms, payload"


def query_events(conn: sqlite3.Connection, *, since: datetime | None = None, type_prefix: str | None = None,
                 device: str | None = None, unsent: bool = False, limit: int = 100) -> list[Row]:
    """The newest ``limit`` rows matching the filters, oldest first."""
    where: list[str] = []
    args: list[Any] = []
    if since is not None:
        where.append("created_ms >= ?")
        args.append(int(since.timestamp() * 1000))
    if type_prefix:
        clause, targs = _type_clause(type_prefix)
        where.append(clause)
        args.extend(targs)
    if device:
        where.append("device_id = ?")
        args.append(device)
    if unsent:
        where.append("sent_ms IS NULL")
    sql = f"SELECT {_COLUMNS} FROM outbox"  # noqa: S608 - only fixed clauses are joined in
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq DESC LIMIT ?"
    args.append(limit)
    rows = [Row.from_db(r) for r in conn.execute(sql, args)]
    rows.reverse()
    return rows


def summarize(data: Any, max_len: int = 60) -> str:
    """``state=open contact=door``: the event's data on one short line."""
    if not isinstance(data, Mapping):
        text = json.dumps(data, separators=(",", ":"), default=str)
    else:
        parts = []
        for k, v in data.items():
            if v is None:
                continue
            val = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), default=str)
            parts.append(f"{k}={val}")
        text = " ".join(parts)
    return text if len(text) <= max_len else text[: max_len - 1] + "…"


def _when(row: Row, this_year: int | None = None) -> str:
    """Occurred-at in UTC to the second, the year only when it is not this one; ``?`` marks a time
    stamped before the clock was synchronised."""
    occurred = str(row.envelope.get("occurred_at") or _iso(row.created_ms))
    text = occurred[:19].replace("T", " ")
    if this_year is not None and text[:4] == str(this_year):
        text = text[5:]
    return text + ("?" if row.envelope.get("clock_synced") is False else "")


def _table(rows: list[Row], width: int) -> Table:
    """Sized to ``width`` (80 columns and up): the data summary is cut to the room that is left."""
    year = datetime.now(UTC).year
    cells = [(str(r.seq), _when(r, year), r.priority, r.type[:24], r.device_id[:16],
              "sent" if r.sent_ms is not None else "unsent") for r in rows]
    fixed = sum(max(len(h), *(len(c[i]) for c in cells)) + 1
                for i, h in enumerate(("seq", "UTC", "prio", "type", "device", "sent")))
    room = max(12, width - fixed - 1)
    t = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1, 0, 0))
    t.add_column("seq", justify="right", no_wrap=True)
    t.add_column("UTC", no_wrap=True)
    t.add_column("prio", no_wrap=True)
    t.add_column("type", no_wrap=True)
    t.add_column("device", no_wrap=True)
    t.add_column("sent", no_wrap=True)
    t.add_column("data", overflow="ellipsis", no_wrap=True)
    for r, (seq, when, prio, typ, dev, sent) in zip(rows, cells, strict=True):
        t.add_row(seq, when, f"[{_PRIO_STYLE.get(prio, 'white')}]{prio}[/]", escape(typ), escape(dev),
                  sent if sent == "sent" else f"[yellow]{sent}[/]",
                  escape(summarize(r.envelope.get("data", r.envelope.get("error")), room)))
    return t


def _line(r: Row) -> str:
    prio = r.priority
    sent = "" if r.sent_ms is None else " (sent)"
    return (f"{r.seq:>6} {_when(r)} [{_PRIO_STYLE.get(prio, 'white')}]{prio:<9}[/] {escape(r.type)} "
            f"{escape(r.device_id)} {escape(summarize(r.envelope.get('data', r.envelope.get('error'))))}"
            f"{sent}")


def _db_for(config: Path | None) -> Path:
    _, cfg = load_or_exit(config)
    return outbox_path(cfg)


@app.command("list")
def list_events(
    *,
    config: Path | None = ConfigOption,
    since: str | None = typer.Option(None, "--since", metavar="AGE|TIME",
                                     help="only events since 30m, 1h, 2d ago or an ISO-8601 time (UTC)"),
    type_prefix: str | None = typer.Option(None, "--type", metavar="PREFIX",
                                           help="only these types, e.g. 'contact' or 'gateway.clock'"),
    device: str | None = typer.Option(None, "--device", metavar="ID", help="only this device"),
    unsent: bool = typer.Option(False, "--unsent", help="only events not yet sent"),
    limit: int = typer.Option(100, "--limit", min=1, help="show at most the newest N"),
    as_json: bool = JsonOption,
) -> None:
    """List recent events, oldest first (--json: an array of full envelopes)."""
    since_dt = parse_since(since) if since is not None else None
    path = _db_for(config)
    try:
        with outbox_ro(path) as conn:
            rows = query_events(conn, since=since_dt, type_prefix=type_prefix, device=device, unsent=unsent,
                                limit=limit)
    except NoOutboxError as exc:
        fail(escape(str(exc)))
    except sqlite3.Error as exc:
        fail(escape(f"cannot read the outbox {path}: {exc}"))
    if as_json:
        print_json([r.to_json() for r in rows])
        return
    if not rows:
        console.print("no events match")
        return
    console.print(f"[dim]{len(rows)} events from {escape(str(path))}, oldest first[/]")
    console.print(_table(rows, console.width))
    if len(rows) == limit:
        console.print(f"[dim](the newest {limit}; use --limit or --since to see others)[/]")


@app.command("tail")
def tail_events(
    config: Path | None = ConfigOption,
    type_prefix: str | None = typer.Option(None, "--type", metavar="PREFIX", help="only these types"),
    as_json: bool = JsonOption,
    from_seq: int | None = typer.Option(None, "--from-seq", min=1, metavar="N",
                                        help="start at this seq instead of after the newest event"),
    max_seconds: float | None = typer.Option(None, "--max-seconds", hidden=True, min=0,
                                             help="stop after this long (for tests)"),
) -> None:
    """Follow new events as the daemon stores them, one line each (--json: JSON lines). Ctrl-C stops."""
    path = _db_for(config)
    # Ctrl-C must stop it even when started from a context that ignores SIGINT (a background job, CI).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    try:
        with outbox_ro(path) as conn:
            last = from_seq - 1 if from_seq is not None else _max_seq(conn)
        if not as_json:
            err_console.print(f"[dim]following {escape(str(path))} after seq {last}; Ctrl-C stops[/]")
        while True:
            # Each poll opens afresh: a stopped daemon's database is opened immutable, and that
            # connection would never see rows written after the daemon starts again.
            with outbox_ro(path) as conn:
                rows, last = _poll(conn, last, type_prefix)
            for r in rows:
                if as_json:
                    sys.stdout.write(json.dumps(r.to_json(), default=str) + "\n")
                else:
                    console.print(_line(r), soft_wrap=True)
            if rows and as_json:
                sys.stdout.flush()
            if len(rows) >= _TAIL_BATCH:
                continue
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                time.sleep(min(POLL_S, left))
            else:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        return
    except BrokenPipeError:  # `edgeagent events tail | head`
        _quiet_stdout()
        return
    except NoOutboxError as exc:
        fail(escape(str(exc)))
    except sqlite3.Error as exc:
        fail(escape(f"cannot read the outbox {path}: {exc}"))


def dead_letter_json(d: DeadLetter) -> dict[str, Any]:
    """A dead letter for ``--json``: where and why it stopped, and the envelope it would have sent."""
    try:
        envelope: Any = json.loads(d.payload)
    except ValueError as exc:
        envelope = {"error": f"undecodable payload: {exc}"}
    return {"seq": d.seq, "id": d.id, "priority": d.priority.label, "type": d.type, "device_id": d.device_id,
            "created_at": _iso(d.created_ms), "dead_at": _iso(d.dead_ms), "reason": d.reason,
            "payload_bytes": len(d.payload), "envelope": envelope}


@app.command("dead-letters")
def dead_letters(
    *,
    config: Path | None = ConfigOption,
    limit: int = typer.Option(100, "--limit", min=1, help="show at most the newest N"),
    as_json: bool = JsonOption,
) -> None:
    """List events the broker refused for good (too big for it, say): set aside, never sent, kept here
    for inspection and reported to the platform as outbox.dead_lettered (--json: with their envelopes)."""
    path = _db_for(config)
    try:
        with outbox_ro(path) as conn:
            dead = read_dead_letters(conn, limit)
    except NoOutboxError as exc:
        fail(escape(str(exc)))
    except sqlite3.Error as exc:
        fail(escape(f"cannot read the outbox {path}: {exc}"))
    if as_json:
        print_json([dead_letter_json(d) for d in dead])
        return
    if not dead:
        console.print("no dead letters")
        return
    console.print(f"[dim]{len(dead)} dead letters from {escape(str(path))}, oldest first[/]")
    console.print(_dead_table(dead, console.width))
    if len(dead) == limit:
        console.print(f"[dim](the newest {limit}; use --limit to see more)[/]")


def _dead_table(dead: list[DeadLetter], width: int) -> Table:
    """The fixed columns whole; the reason, what the reader came for, wraps in the room left."""
    cells = [(str(d.seq), _iso(d.dead_ms)[:19].replace("T", " "), d.priority.label, d.type[:24],
              d.device_id[:16], str(len(d.payload))) for d in dead]
    heads = ("seq", "set aside (UTC)", "prio", "type", "device", "bytes")
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    t = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1, 0, 0))
    for i, (head, w) in enumerate(zip(heads, widths, strict=True)):
        t.add_column(head, justify="right" if i in (0, 5) else "left", no_wrap=True, min_width=w)
    t.add_column("reason", overflow="fold", min_width=max(12, width - sum(w + 1 for w in widths) - 1))
    for d, (seq, when, prio, typ, dev, size) in zip(dead, cells, strict=True):
        t.add_row(seq, when, f"[{_PRIO_STYLE.get(prio, 'white')}]{prio}[/]", escape(typ), escape(dev), size,
                  escape(d.reason))
    return t


def _quiet_stdout() -> None:
    """The reader of our output went away: send what is still buffered nowhere, quietly."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _max_seq(conn: sqlite3.Connection) -> int:
    value = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0]
    return int(value)


def _poll(conn: sqlite3.Connection, last: int, type_prefix: str | None) -> tuple[list[Row], int]:
    """Rows after ``last`` (matching the type), and the seq to continue after, from one snapshot."""
    where, args = "seq > ?", [last]
    if type_prefix:
        clause, targs = _type_clause(type_prefix)
        where += " AND " + clause
        args.extend(targs)
    conn.execute("BEGIN")
    try:
        found = conn.execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE {where} ORDER BY seq LIMIT ?",  # noqa: S608 - fixed clauses
            [*args, _TAIL_BATCH]).fetchall()
        newest = _max_seq(conn)
    finally:
        conn.execute("COMMIT")
    rows = [Row.from_db(r) for r in found]
    if len(rows) >= _TAIL_BATCH:
        return rows, rows[-1].seq
    # Rows of other types are skipped for good, so the next poll starts after them.
    return rows, max(last, newest)
