"""The residents' plate list: the plates the car gate opens for, with validity dates and a reason.

Residents' plates are personal data: this list stays on the box. It is never sent to the platform and
never logged; an event carries a plate only where the event needs it (a gate decision).

Storage: a small SQLite file in the daemon's state directory (``plates.db``, :data:`PLATES_FILE`) in WAL
mode, so the daemon reads (one primary-key lookup per vehicle track) while ``edgeagent plates`` writes, neither
waiting for the other; a writer waits up to ``busy_timeout_s`` for another writer. Every change is one
transaction: an import lands whole or not at all.

Policies:

* **Plates** are normalized (:func:`~edgeagent.drivers.camera.rules.plates.normalize_plate`: full-width to
  half-width, upper case, no spaces, dots or dashes, the province character kept) and must then have a
  mainland plate's format (``plate_format_ok``); one plate is one entry, so adding a plate again updates it.
* **Times** are stored in UTC. ``valid_from`` is inclusive and ``valid_until`` exclusive; a date without a
  time means the start of that day for ``valid_from`` and the end of that day for ``valid_until`` (a contract
  "until 2025-06-30" includes the 30th), in the timezone given (the box's local one by default).
* **Cap**: at most ``max_entries`` plates (default 20 000, far above a compound's car count; a runaway
  import is refused before it writes).
* **CSV import** (:data:`CSV_COLUMNS`): a header line naming the columns, in any order; ``plate`` is required,
  the others optional (``reason`` defaults to ``resident``). UTF-8 (with or without a BOM) or, failing that,
  GB 18030 (what Chinese Excel writes). Empty lines and lines whose first cell starts with ``#`` are skipped.
  Every row is checked first; any bad row fails the import with every bad row's line number, and nothing
  is written. A plate twice in one file is an error (which one was meant?); a plate already in the list is
  updated. ``replace=True`` also removes the plates not in the file (the file is the whole list).
* **Files**: created ``0640`` and, when root (the CLI) creates them, owned like the state directory (the
  daemon's account), so the daemon can open what the installer made. A symbolic link in place of the
  database is refused.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from types import TracebackType
from typing import Final

from edgeagent.drivers.camera.rules.plates import PlateEntry, normalize_plate
from edgeagent.models.decoders.plates import plate_format_ok

PLATES_FILE: Final = "plates.db"
DEFAULT_MAX_ENTRIES: Final = 20_000
CSV_COLUMNS: Final = ("plate", "ref", "valid_from", "valid_until", "reason")
MAX_TEXT: Final = 200  # ref, reason, added_by
MAX_ERRORS_SHOWN: Final = 20
FILE_MODE: Final = 0o640
_SCHEMA_VERSION: Final = 1


class PlateListError(ValueError):
    """Input the list refuses (a bad plate, date or CSV row; the list full). The message says what and where."""


@dataclass(frozen=True, slots=True)
class ImportResult:
    added: int
    updated: int
    removed: int
    rows: int


def plates_path(state_dir: Path) -> Path:
    return state_dir / PLATES_FILE


def local_tz() -> tzinfo:
    """The box's timezone now (a fixed offset: right for China, an approximation across a DST change)."""
    found = datetime.now(UTC).astimezone().tzinfo
    return found if found is not None else UTC


def parse_plate(text: str) -> str:
    """``text`` normalized, or PlateListError saying why it is not a plate."""
    plate = normalize_plate(text)
    if not plate:
        raise PlateListError(f"plate {text!r} is empty")
    if plate_format_ok(plate):
        return plate
    hint = ""
    if any(c in plate[1:] for c in "IO"):
        hint = " (plates never use the letters I and O: did you mean 1 and 0?)"
    elif len(plate) not in (7, 8):
        hint = f" ({len(plate)} characters; a plate has 7, or 8 for new-energy plates)"
    elif not ("\u4e00" <= plate[0] <= "\u9fff"):
        hint = " (it must start with the province character, e.g. 京 or 粤)"
    raise PlateListError(f"{text!r} is not a mainland Chinese plate{hint}")


def parse_when(text: str | None, *, end: bool = False, tz: tzinfo | None = None) -> datetime | None:
    """A date (``2025-06-30``, ``2025/06/30``) or date and time (``2025-06-30 18:00``, ISO 8601 with an
    offset) as an aware UTC datetime; None for an empty value. A date alone is the start of that day, or with
    ``end`` the start of the next day (``valid_until`` is exclusive). Without an offset, ``tz`` (default the
    box's) applies."""
    if text is None or not text.strip():
        return None
    raw = text.strip().replace("/", "-")
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise PlateListError(f"{text!r} is not a date (2025-06-30) or a date and time (2025-06-30 18:00)") from None
    date_only = len(raw) == 10 and "T" not in raw and " " not in raw
    if date_only and end:
        parsed += timedelta(days=1)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz or local_tz())
    return parsed.astimezone(UTC)


def _clean_text(what: str, value: str | None, default: str = "") -> str:
    value = (value or "").strip() or default
    if len(value) > MAX_TEXT:
        raise PlateListError(f"{what} is longer than {MAX_TEXT} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise PlateListError(f"{what} contains control characters")
    return value


def _check_window(valid_from: datetime | None, valid_until: datetime | None) -> None:
    for what, when in (("valid_from", valid_from), ("valid_until", valid_until)):
        if when is not None and when.tzinfo is None:
            raise PlateListError(f"{what} must carry a timezone")
    if valid_from is not None and valid_until is not None and valid_until <= valid_from:
        raise PlateListError(f"valid_until ({valid_until.isoformat()}) is not after valid_from "
                             f"({valid_from.isoformat()})")


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(UTC).isoformat(timespec="seconds")


def _when(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text).astimezone(UTC)


class PlateList:
    """The list in ``path`` (created if missing). Thread-safe: one connection behind a lock. Use as a
    context manager, or ``close()``."""

    def __init__(self, path: Path, *, max_entries: int = DEFAULT_MAX_ENTRIES, busy_timeout_s: float = 5.0) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.path = path
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._create_file(path)
        self._conn = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None,
                                     check_same_thread=False)
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    @staticmethod
    def _create_file(path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISREG(st.st_mode):
                kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                raise PlateListError(f"{path} is {kind}; refusing to open it as the plate list")
            return
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except FileExistsError:
            return  # another process made it first
        try:
            os.fchmod(fd, FILE_MODE)  # whatever the umask
            if os.geteuid() == 0:
                # root (the CLI) makes it for the daemon: owned like the state directory; SQLite gives its
                # -wal and -shm files the database's owner when root creates them
                parent = path.parent.stat()
                os.fchown(fd, parent.st_uid, parent.st_gid)
        finally:
            os.close(fd)

    def _migrate(self) -> None:
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise PlateListError(f"{self.path} was written by a newer edgeagent (schema {version})")
            conn.execute("""CREATE TABLE IF NOT EXISTS plates (
                                plate TEXT PRIMARY KEY,
                                ref TEXT NOT NULL DEFAULT '',
                                reason TEXT NOT NULL DEFAULT 'resident',
                                valid_from TEXT,
                                valid_until TEXT,
                                added_by TEXT NOT NULL DEFAULT '',
                                added_at TEXT NOT NULL
                            ) WITHOUT ROWID""")
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> PlateList:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # --- reading ----------------------------------------------------------------------------------------

    def find(self, plate: str) -> PlateEntry | None:
        """The entry for ``plate`` (any spelling), valid or not."""
        key = normalize_plate(plate)
        with self._lock:
            row = self._conn.execute("SELECT * FROM plates WHERE plate = ?", (key,)).fetchone()
        return None if row is None else self._entry(row)

    def lookup(self, plate: str, at: datetime) -> PlateEntry | None:
        """The entry for ``plate`` if it is valid at ``at`` (aware), else None."""
        entry = self.find(plate)
        return entry if entry is not None and entry.validity(at) == "valid" else None

    def entries(self) -> list[PlateEntry]:
        """Every entry, by plate."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM plates ORDER BY plate").fetchall()
        return [self._entry(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM plates").fetchone()[0])

    @staticmethod
    def _entry(row: Sequence[str | None]) -> PlateEntry:
        plate, ref, reason, valid_from, valid_until, added_by, added_at = row
        return PlateEntry(plate=str(plate), ref=str(ref), reason=str(reason), valid_from=_when(valid_from),
                          valid_until=_when(valid_until), added_by=str(added_by), added_at=_when(added_at))

    # --- writing ----------------------------------------------------------------------------------------

    def add(self, plate: str, *, ref: str = "", reason: str = "resident", valid_from: datetime | None = None,
            valid_until: datetime | None = None, added_by: str = "", now: datetime | None = None
            ) -> tuple[PlateEntry, bool]:
        """Add ``plate``, or update it if it is there; returns the entry and whether it is new."""
        entry = self._make(plate, ref, reason, valid_from, valid_until, added_by, now)
        with self._write() as conn:
            new = conn.execute("SELECT 1 FROM plates WHERE plate = ?", (entry.plate,)).fetchone() is None
            if new and int(conn.execute("SELECT count(*) FROM plates").fetchone()[0]) >= self.max_entries:
                raise PlateListError(f"the plate list is full ({self.max_entries} plates)")
            self._upsert(conn, entry)
        return entry, new

    def remove(self, plate: str) -> bool:
        """Remove ``plate`` (any spelling); False if it was not there."""
        key = normalize_plate(plate)
        with self._write() as conn:
            return conn.execute("DELETE FROM plates WHERE plate = ?", (key,)).rowcount > 0

    def import_csv(self, source: Path | str | bytes, *, added_by: str = "", replace: bool = False,
                   tz: tzinfo | None = None, now: datetime | None = None, dry_run: bool = False) -> ImportResult:
        """Import a CSV (a path, its bytes, or its text): all rows or none; PlateListError naming every bad
        row's line. ``dry_run`` checks and counts without writing."""
        name, text = self._csv_text(source)
        entries = self._parse_csv(name, text, added_by=added_by, tz=tz, now=now)
        with self._write() as conn:
            existing = {str(r[0]) for r in conn.execute("SELECT plate FROM plates")}
            keys = {e.plate for e in entries}
            final = len(keys) if replace else len(existing | keys)
            if final > self.max_entries:
                raise PlateListError(f"{name}: the list would hold {final} plates, more than its cap of "
                                     f"{self.max_entries}; nothing imported")
            updated = len(keys & existing)
            gone = existing - keys if replace else set()
            if not dry_run:
                for entry in entries:
                    self._upsert(conn, entry)
                conn.executemany("DELETE FROM plates WHERE plate = ?", [(p,) for p in sorted(gone)])
        return ImportResult(added=len(keys) - updated, updated=updated, removed=len(gone), rows=len(entries))

    def _make(self, plate: str, ref: str, reason: str, valid_from: datetime | None, valid_until: datetime | None,
              added_by: str, now: datetime | None) -> PlateEntry:
        _check_window(valid_from, valid_until)
        return PlateEntry(plate=parse_plate(plate), ref=_clean_text("ref", ref),
                          reason=_clean_text("reason", reason, "resident"),
                          valid_from=None if valid_from is None else valid_from.astimezone(UTC),
                          valid_until=None if valid_until is None else valid_until.astimezone(UTC),
                          added_by=_clean_text("added_by", added_by),
                          added_at=(now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0))

    @staticmethod
    def _upsert(conn: sqlite3.Connection, e: PlateEntry) -> None:
        conn.execute("""INSERT INTO plates (plate, ref, reason, valid_from, valid_until, added_by, added_at)
                        VALUES (?, ?, ?, ?, ?, ?, ?)
                        ON CONFLICT (plate) DO UPDATE SET ref = excluded.ref, reason = excluded.reason,
                            valid_from = excluded.valid_from, valid_until = excluded.valid_until,
                            added_by = excluded.added_by, added_at = excluded.added_at""",
                     (e.plate, e.ref, e.reason, _iso(e.valid_from), _iso(e.valid_until), e.added_by,
                      _iso(e.added_at)))

    # --- CSV --------------------------------------------------------------------------------------------

    @staticmethod
    def _csv_text(source: Path | str | bytes) -> tuple[str, str]:
        if isinstance(source, Path):
            try:
                data = source.read_bytes()
            except OSError as exc:
                raise PlateListError(f"{source}: cannot read: {exc.strerror}") from None
            name = str(source)
        elif isinstance(source, bytes):
            data, name = source, "CSV"
        else:
            return "CSV", source.removeprefix("\ufeff")
        if data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8):]
        try:
            return name, data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        try:
            return name, data.decode("gb18030")
        except UnicodeDecodeError as exc:
            raise PlateListError(f"{name}: neither UTF-8 nor GB 18030 text (byte {exc.start})") from None

    def _parse_csv(self, name: str, text: str, *, added_by: str, tz: tzinfo | None,
                   now: datetime | None) -> list[PlateEntry]:
        reader = csv.reader(io.StringIO(text, newline=""))
        header: list[str] | None = None
        errors: list[str] = []
        seen: dict[str, int] = {}
        entries: list[PlateEntry] = []
        try:
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
                    continue
                if header is None:
                    header = [c.strip().lower() for c in row]
                    unknown = [c for c in header if c not in CSV_COLUMNS]
                    if unknown or "plate" not in header or len(set(header)) != len(header):
                        raise PlateListError(
                            f"{name} line {line}: the header must name the columns, 'plate' required, each once, "
                            f"from {', '.join(CSV_COLUMNS)}; got {', '.join(row)}")
                    continue
                if len(row) > len(header):
                    errors.append(f"line {line}: {len(row)} cells, the header has {len(header)}")
                    continue
                cells = dict(zip(header, (c.strip() for c in row), strict=False))
                try:
                    entry = self._make(cells.get("plate", ""), cells.get("ref", ""), cells.get("reason", ""),
                                       parse_when(cells.get("valid_from"), tz=tz),
                                       parse_when(cells.get("valid_until"), end=True, tz=tz), added_by, now)
                except PlateListError as exc:
                    errors.append(f"line {line}: {exc}")
                    continue
                if entry.plate in seen:
                    errors.append(f"line {line}: plate {entry.plate} is also on line {seen[entry.plate]}")
                    continue
                seen[entry.plate] = line
                entries.append(entry)
        except csv.Error as exc:
            errors.append(f"line {reader.line_num}: {exc}")
        if header is None:
            raise PlateListError(f"{name}: no header line (columns: {', '.join(CSV_COLUMNS)})")
        if errors:
            shown = errors[:MAX_ERRORS_SHOWN]
            more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
            raise PlateListError(f"{name}: {len(errors)} bad row(s), nothing imported:\n  "
                                 + "\n  ".join(shown) + more)
        return entries
