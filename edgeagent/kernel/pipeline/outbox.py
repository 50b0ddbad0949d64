"""Durable, prioritised outbox: SQLite in WAL mode, owned by one database thread.

Every database operation (append, lease, ack, evict, nonce claims, clock correction) runs on a single
thread that takes all operations queued since its last cycle, executes them in one transaction and
commits once (group commit: one fsync per cycle, not per event, to spare SD cards). Futures of a
cycle are resolved only after its commit, so:

* [1] an event counts as accepted only once it is durable;
* [2] a lease only ever returns committed rows, so nothing leaves the box that a crash could lose;
* [3] acks for rows whose PUBACK arrived are queued before any later reset of the lease cursors,
  so a reconnect never re-sends an acknowledged event.

Operations of one group commit are isolated from each other (a SAVEPOINT each): one that fails is
rolled back alone and fails only its own future, so a bad key-value write cannot cost an alarm.
[4] The in-memory counters (rows, bytes, oldest unsent per class, history, dead letters) change in
step with the rows inside the same transaction, are restored with them on a rollback, and are
recounted once at open; ``stats()`` reads them and never scans the table.

Rows stay in the table after they are sent (``sent_ms`` set), as local history for
``edgeagent events list``; history is trimmed to its own cap and is the first thing freed under
disk pressure. Leases are in memory only: after a crash every unsent row is simply unsent again.

Priority classes (see :class:`~edgeagent.kernel.pipeline.events.Priority`): leases take the highest class
that has rows; within a class rows leave in ``seq`` order. Over the backlog cap, telemetry is
evicted first, then ordinary events; alarms and pinned rows never are.

[5] A row that was ever leased may have reached the platform, which de-duplicates by ``id``: it is
never changed afterwards. Each class keeps a high-water mark of leased ``seq`` (in ``meta``, so it
survives a restart, unlike the lease cursors); coalescing and clock correction touch only rows above
it. Rows are appended in ``seq`` order and leases go in ``seq`` order, so every row at or below the
mark may have been published and every row above it has not.

Dead letters: the uplink gives up on rows the broker refuses for good (a message it will never take)
with :meth:`Outbox.dead_letter`, passing the ``Batch.seqs`` (all or some) of a lease. Those rows move
to the ``dead_letters`` table in the same transaction:

* [6] they leave the sendable set at once: never leased again, never coalesced into, not counted
  in the backlog (so not in the cap's eviction accounting), and acking them later is a no-op;
* they keep their ``seq``, ``id`` and payload on disk for inspection (:meth:`Outbox.dead_letters`),
  up to ``dead_letter_bytes`` (oldest dropped first), and are freed after sent history when the disk
  is full;
* ``dead_lettered_total`` counts them (persisted); the platform sees their ``seq`` as a gap.

[7] One Outbox per database file, enforced with a lock file (see ``_take_lock``): the counters,
cursors and ``next_seq`` above are this object's, valid only while nobody else writes the rows.

[8] Nonces of signed commands (:meth:`Outbox.claim_command`) are kept by their signed issue time, not by
this box's clock: a floor (the newest issue time seen minus the command horizon, in ``kv``) only rises;
commands issued below it are refused and only nonces below it are purged, in the same transaction.

[9] Durability ``full`` fsyncs every group commit that accepts something (events, nonces, state, dead
letters). A cycle of nothing but the uplink's leases and acks commits without an fsync: lost to a power
cut, those rows are sent again (at least once; the platform de-duplicates by id).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import orjson

from edgeagent.kernel.errors import OutboxClosedError, OutboxCorruptError, OutboxError, OutboxFullError
from edgeagent.kernel.pipeline.events import Event, Priority

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY,
    id         TEXT    NOT NULL,
    prio       INTEGER NOT NULL,
    type       TEXT    NOT NULL,
    device_id  TEXT    NOT NULL,
    ckey       TEXT,
    pinned     INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    unsynced   INTEGER NOT NULL DEFAULT 0,
    mono_ns    INTEGER,
    boot_id    TEXT,
    coalesced  INTEGER NOT NULL DEFAULT 1,
    size       INTEGER NOT NULL,
    payload    BLOB    NOT NULL,
    sent_ms    INTEGER
);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq        INTEGER PRIMARY KEY,
    id         TEXT    NOT NULL,
    prio       INTEGER NOT NULL,
    type       TEXT    NOT NULL,
    device_id  TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    dead_ms    INTEGER NOT NULL,
    reason     TEXT    NOT NULL,
    size       INTEGER NOT NULL,
    payload    BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox(prio, seq) WHERE sent_ms IS NULL;
CREATE INDEX IF NOT EXISTS outbox_ckey ON outbox(ckey) WHERE sent_ms IS NULL AND ckey IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_created ON outbox(created_ms);
-- Small in normal operation (only rows stamped before clock sync): clock correction works in slices
-- along it instead of scanning the table.
CREATE INDEX IF NOT EXISTS outbox_unsynced ON outbox(boot_id, seq) WHERE unsynced=1;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, expires_ms INTEGER NOT NULL);
-- Nonces of commands kept by issue time (claim_command): purged only below the floor, see [8].
CREATE TABLE IF NOT EXISTS command_nonces (nonce TEXT PRIMARY KEY, issued_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Per-row bookkeeping in SQLite beyond the payload (keys, index entries); used for the cap.
_ROW_OVERHEAD_BYTES = 120
_DISK_CHECK_INTERVAL_S = 1.0
_HOUSEKEEPING_INTERVAL_S = 5.0
_FREE_STEP_ROWS = 500
_TRIM_SLICE_ROWS = 4000
_TRIM_AGAIN_S = 0.05
_FREE_MAX_STEPS = 200
# Rows per clock-correction transaction: a payload rewrite each, so slices keep one commit short and
# let intake and the uplink through between them.
CLOCK_SLICE_ROWS = 500
# kv key of the issue-time floor of signed commands [8]: refused below it, nonces purged below it.
COMMAND_FLOOR_KEY = "commands.issued_floor_ms"
ClaimOutcome = Literal["claimed", "replay", "stale"]
_REASON_MAX_CHARS = 500
# The longest ``IN (...)`` list in one statement: under the 999 variables of SQLite before 3.32, with
# room for a statement's other parameters.
_IN_LIST_MAX = 900


def _in_lists(seqs: Sequence[int]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """``seqs`` as (placeholders, parameters) for ``seq IN (...)``, at most _IN_LIST_MAX at a time, each
    list padded to a power of two (or _IN_LIST_MAX) by repeating its last seq, which IN ignores.

    SQLite compiles one statement per distinct SQL text and the connection keeps the last 128. With
    exactly one placeholder per row, every batch size ever acknowledged got its own statement (about
    36 kB for 500 rows): the cache and its churn grew the daemon's memory for hours, most after an
    outage (bench/soak.py; tests/test_outbox_memory.py). Padded, a query has at most 11 texts.
    """
    for i in range(0, len(seqs), _IN_LIST_MAX):
        chunk = tuple(seqs[i:i + _IN_LIST_MAX])
        width = min(_IN_LIST_MAX, 1 << (len(chunk) - 1).bit_length())
        yield ",".join("?" * width), chunk + (chunk[-1],) * (width - len(chunk))


# The disk reserve is scaled to the free space at hand (a quarter at most); below this it is not worth
# a file (it would not cover one WAL checkpoint).
_RESERVE_MIN_BYTES = 256 * 1024
_RESERVE_FRACTION = 4


@dataclass(frozen=True, slots=True)
class Batch:
    """A leased run of rows of one priority class, in ``seq`` order."""

    priority: Priority
    seqs: tuple[int, ...]
    payloads: tuple[bytes, ...]

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.payloads)


@dataclass(frozen=True, slots=True)
class ClassStats:
    unsent: int
    unsent_bytes: int
    oldest_unsent_age_s: float | None


@dataclass(frozen=True, slots=True)
class OutboxStats:
    classes: dict[str, ClassStats]
    history_rows: int
    next_seq: int
    evicted_total: int
    coalesced_total: int
    intake_dropped_total: int
    commits_total: int
    db_bytes: int
    last_commit_age_s: float | None
    dead_lettered_total: int = 0
    dead_letters: int = 0  # rows kept in the dead-letter table now


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A row the uplink gave up on (see :meth:`Outbox.dead_letter`), as kept for inspection."""

    seq: int
    id: str
    priority: Priority
    type: str
    device_id: str
    created_ms: int
    dead_ms: int
    reason: str
    payload: bytes


@dataclass(slots=True)
class EvictionReport:
    telemetry: int = 0
    event: int = 0
    first_seq: int | None = None
    last_seq: int | None = None

    def add(self, prio: int, seqs: Sequence[int]) -> None:
        if not seqs:
            return
        if prio == Priority.TELEMETRY:
            self.telemetry += len(seqs)
        else:
            self.event += len(seqs)
        lo, hi = min(seqs), max(seqs)
        self.first_seq = lo if self.first_seq is None else min(self.first_seq, lo)
        self.last_seq = hi if self.last_seq is None else max(self.last_seq, hi)

    def __bool__(self) -> bool:
        return bool(self.telemetry or self.event)

    def merge(self, other: EvictionReport) -> None:
        """Add another report's counts and widen the seq range to cover both."""
        self.telemetry += other.telemetry
        self.event += other.event
        for seq in (other.first_seq, other.last_seq):
            if seq is not None:
                self.first_seq = seq if self.first_seq is None else min(self.first_seq, seq)
                self.last_seq = seq if self.last_seq is None else max(self.last_seq, seq)

    def copy(self) -> EvictionReport:
        return EvictionReport(self.telemetry, self.event, self.first_seq, self.last_seq)


# What one outbox.dead_lettered report lists at most; first_seq..last_seq and count cover the rest.
DEAD_SEQS_LISTED = 100
DEAD_TYPES_LISTED = 20
DEAD_REASON_CHARS = 200


@dataclass(slots=True)
class DeadLetterReport:
    """Rows dead-lettered (by one commit, or pending a report): bounded, whatever the burst.

    ``seqs`` holds the lowest ``DEAD_SEQS_LISTED`` of them in order, ``types`` the first
    ``DEAD_TYPES_LISTED`` distinct types seen, ``reason`` the latest reason (truncated)."""

    count: int = 0
    alarms: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    seqs: list[int] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    reason: str = ""

    def add(self, seq: int, prio: int, type_: str, reason: str) -> None:
        self.count += 1
        if prio == Priority.ALARM:
            self.alarms += 1
        self.first_seq = seq if self.first_seq is None else min(self.first_seq, seq)
        self.last_seq = seq if self.last_seq is None else max(self.last_seq, seq)
        # The lowest DEAD_SEQS_LISTED seqs, sorted, whatever order they come in (so merge can keep it).
        if len(self.seqs) < DEAD_SEQS_LISTED:
            bisect.insort(self.seqs, seq)
        elif seq < self.seqs[-1] and seq not in self.seqs:
            bisect.insort(self.seqs, seq)
            self.seqs.pop()
        if type_ not in self.types and len(self.types) < DEAD_TYPES_LISTED:
            self.types.append(type_)
        self.reason = reason[:DEAD_REASON_CHARS]

    def merge(self, later: DeadLetterReport) -> None:
        """Add a later report: counts add up, the range widens, the lists fill up to their bounds in
        seq order, and the later reason wins."""
        if not later:
            return
        self.count += later.count
        self.alarms += later.alarms
        for seq in (later.first_seq, later.last_seq):
            if seq is not None:
                self.first_seq = seq if self.first_seq is None else min(self.first_seq, seq)
                self.last_seq = seq if self.last_seq is None else max(self.last_seq, seq)
        # Each list holds the lowest seqs of its own rows, so the lowest of all rows are among them.
        self.seqs = sorted(set(self.seqs) | set(later.seqs))[:DEAD_SEQS_LISTED]
        for t in later.types:
            if t not in self.types and len(self.types) < DEAD_TYPES_LISTED:
                self.types.append(t)
        self.reason = later.reason  # set by its latest add (it is not empty)

    def copy(self) -> DeadLetterReport:
        return DeadLetterReport(self.count, self.alarms, self.first_seq, self.last_seq, list(self.seqs),
                                list(self.types), self.reason)

    def __bool__(self) -> bool:
        return self.count > 0


# --- operations sent to the database thread -------------------------------------------------------

@dataclass(slots=True)
class _Op:
    future: asyncio.Future[Any] | None


@dataclass(slots=True)
class _Append(_Op):
    events: Sequence[Event]


@dataclass(slots=True)
class _Lease(_Op):
    max_events: int
    max_bytes: int


@dataclass(slots=True)
class _Ack(_Op):
    seqs: Sequence[int]


@dataclass(slots=True)
class _ResetLeases(_Op):
    pass


@dataclass(slots=True)
class _Barrier(_Op):
    pass


@dataclass(slots=True)
class _Stats(_Op):
    pass


@dataclass(slots=True)
class _ClaimNonce(_Op):
    nonce: str
    expires_ms: int
    now_ms: int


@dataclass(slots=True)
class _ClaimCommand(_Op):
    nonce: str
    issued_ms: int
    horizon_ms: int


@dataclass(slots=True)
class _DeadLetter(_Op):
    seqs: Sequence[int]
    reason: str


@dataclass(slots=True)
class _CorrectClock(_Op):
    boot_id: str
    to_wall: Callable[[int], str]
    after_seq: int
    limit: int


@dataclass(slots=True)
class _CountSentUnsynced(_Op):
    boot_id: str


@dataclass(slots=True)
class _FreeSpace(_Op):
    pass


@dataclass(slots=True)
class _Query(_Op):
    fn: Callable[[sqlite3.Connection], Any]


# [9] Operations that only do the uplink's bookkeeping: a cycle of nothing else commits without an fsync.
_RELAXED_OPS = (_Lease, _Ack, _Stats, _Barrier, _ResetLeases)


_STOP = object()
# What the database thread hands back to the loop for one future: (future, value, error).
_Result = tuple[asyncio.Future[Any], Any, BaseException | None]


@dataclass
class OutboxConfig:
    path: Path
    cap_bytes: int = 256 * 1024 * 1024
    history_bytes: int = 16 * 1024 * 1024
    min_free_bytes: int = 64 * 1024 * 1024
    durability: str = "full"  # "full": fsync each group commit; "normal": survives a crash of the process
    max_pending_events: int = 50_000
    max_cycle_ops: int = 20_000
    # A database that fails its integrity check: "fail" raises; "quarantine" moves it aside (kept for
    # forensics) and starts a new one, so local alarms keep working. The seq then restarts at 1 and
    # `quarantined` says so (the daemon reports it in gateway.started).
    on_corrupt: str = "fail"
    # Ballast file beside the database, given up when the disk is full (see _recover_from_full_disk).
    # The most it may be: on a small or nearly full disk it is scaled down (see _reserve_target).
    reserve_bytes: int = 4 * 1024 * 1024
    # Rows the uplink dead-lettered are kept up to this size for inspection (oldest dropped first).
    dead_letter_bytes: int = 4 * 1024 * 1024


class Outbox:
    """The durable queue between event producers and the uplink. Use as an async context manager."""

    def __init__(
        self,
        config: OutboxConfig,
        *,
        on_evicted: Callable[[EvictionReport, int], None] | None = None,
        on_dead_lettered: Callable[[DeadLetterReport, int], None] | None = None,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._cfg = config
        self._on_evicted = on_evicted
        # Called on the loop after each commit that dead-lettered rows, with them and the total; before
        # the dead_letter() call that moved them returns.
        self._on_dead_lettered = on_dead_lettered
        self._now_ms = now_ms
        self._ops: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = True
        self._fatal: BaseException | None = None
        # Asyncio side. [bounded intake] pending counts events queued but not yet committed.
        self._pending_events = 0
        self._space = asyncio.Event()
        self._space.set()
        self.changed = asyncio.Event()  # set when new rows are committed or leases reset
        self.intake_dropped_total = 0
        self.recovered_unsent = 0
        self.quarantined: Path | None = None
        # Database-thread state (touched only by that thread after open).
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None  # [7]
        self._next_seq = 1
        self._cursor: dict[int, int] = {p.value: 0 for p in Priority}
        self._unsent_bytes: dict[int, int] = {p.value: 0 for p in Priority}
        self._unsent_rows: dict[int, int] = {p.value: 0 for p in Priority}
        self._history_bytes = 0
        self._history_rows = 0
        # [4] (seq, created_ms) of the oldest unsent row per class; classes in _oldest_dirty lost theirs
        # this transaction and are looked up again (one index seek) before it commits.
        self._oldest: dict[int, tuple[int, int] | None] = {p.value: None for p in Priority}
        self._oldest_dirty: set[int] = set()
        # [5] highest seq ever leased per class, persisted in meta.
        self._leased_hwm: dict[int, int] = {p.value: 0 for p in Priority}
        self._dead_rows = 0
        self._dead_bytes = 0
        self._dead_lettered_total = 0
        # Rows dead-lettered in the transaction under way; part of the snapshot, so a rollback forgets
        # them, and handed to on_dead_lettered only once committed.
        self._dead_report = DeadLetterReport()
        self._evicted_total = 0
        self._coalesced_total = 0
        self._commits_total = 0
        self._last_commit_mono: float | None = None
        # Monotonic time of the first failed group commit since the last good one (None: writes work).
        # Read by the daemon's storage watch: a database that keeps failing is a critical fault.
        self.write_failing_since: float | None = None
        self._disk_free = 1 << 62
        self._disk_checked = 0.0
        self._housekeeping_at = 0.0  # monotonic time of the next housekeeping
        # Size of the reserve file given up on a full disk (0 while it is in place or never made): it is
        # made again only once four times that is free.
        self._reserve_released = 0

    # --- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Outbox:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="outbox-db", daemon=True)
        self._closed = False
        self._thread.start()
        try:
            await ready
        except BaseException:
            self._closed = True
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ops.put(_STOP)
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)

    @property
    def path(self) -> Path:
        return self._cfg.path

    @property
    def alive(self) -> bool:
        return not self._closed and self._thread is not None and self._thread.is_alive()

    @property
    def pending_events(self) -> int:
        return self._pending_events

    # --- producer API ------------------------------------------------------------------------------

    async def put(self, event: Event) -> int:
        """Make one event durable; returns its ``seq``. Waits while intake is full (backpressure)."""
        seqs = await self.put_many((event,))
        return seqs[0]

    async def put_many(self, events: Sequence[Event]) -> list[int]:
        """Make events durable in one group commit; returns their ``seq`` numbers in order.

        Overflow policy of the intake (bounded at ``max_pending_events``): alarms are always
        admitted; other events wait for room (backpressure on the producer).
        """
        if not events:
            return []
        while (
            self._pending_events >= self._cfg.max_pending_events
            and not all(e.priority is Priority.ALARM for e in events)
        ):
            self._space.clear()
            await self._space.wait()
        fut = self._submit(_Append(None, events), n_events=len(events))
        result: list[int] = await fut
        return result

    def offer_telemetry(self, event: Event) -> asyncio.Future[list[int]] | None:
        """Queue telemetry without waiting; when intake is full it is dropped and counted.

        For drivers that must never wait on the disk: the newest reading replaces it soon anyway.
        """
        if self._pending_events >= self._cfg.max_pending_events:
            self.intake_dropped_total += 1
            return None
        fut: asyncio.Future[list[int]] = self._submit(_Append(None, (event,)), n_events=1)
        return fut

    def offer_telemetry_many(self, events: Sequence[Event]) -> asyncio.Future[list[int]] | None:
        """Like :meth:`offer_telemetry` for several readings as one operation (one future, one wake-up of
        the database thread). When intake is full the whole batch is dropped and counted."""
        if self._pending_events + len(events) > self._cfg.max_pending_events:
            self.intake_dropped_total += len(events)
            return None
        fut: asyncio.Future[list[int]] = self._submit(_Append(None, tuple(events)), n_events=len(events))
        return fut

    # --- uplink API --------------------------------------------------------------------------------

    async def lease(self, max_events: int, max_bytes: int) -> Batch | None:
        """The next committed unsent rows of the highest priority class that has any, or None."""
        result: Batch | None = await self._submit(_Lease(None, max_events, max_bytes))
        return result

    def ack_nowait(self, batch: Batch) -> asyncio.Future[None]:
        """Mark a batch sent (its PUBACK arrived). Queued at once, before any later reset [3]."""
        return self._submit(_Ack(None, batch.seqs))

    async def dead_letter(self, seqs: Sequence[int], reason: str) -> int:
        """Give up on leased rows the broker will never take (``Batch.seqs``, all or some of them).

        They move to the dead-letter table in one transaction [6] and no longer hold back their class.
        Returns how many rows moved; seqs already sent, dead-lettered or unknown are ignored. The other
        rows of the batch stay leased: ack them, or reset the leases to send them again.
        """
        result: int = await self._submit(_DeadLetter(None, tuple(seqs), reason[:_REASON_MAX_CHARS]))
        return result

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The most recently dead-lettered rows (at most ``limit``), in ``seq`` order."""
        result: list[DeadLetter] = await self.query(lambda conn: read_dead_letters(conn, limit))
        return result

    async def reset_leases(self) -> None:
        """Forget in-flight leases (the connection dropped): their rows will be leased again."""
        await self._submit(_ResetLeases(None))

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        await self._submit(_Barrier(None))

    async def stats(self) -> OutboxStats:
        result: OutboxStats = await self._submit(_Stats(None))
        return result

    async def claim_nonce(self, nonce: str, expires_ms: int) -> bool:
        """Record a command nonce durably; False if it was seen before (a replay)."""
        result: bool = await self._submit(_ClaimNonce(None, nonce, expires_ms, self._now_ms()))
        return result

    async def claim_command(self, nonce: str, issued_ms: int, horizon_ms: int) -> ClaimOutcome:
        """Record a verified command's nonce durably, judged by issue times, never by this box's clock [8].

        ``"stale"``: issued before the floor (the newest issue time seen minus ``horizon_ms``), so it is refused
        whether or not its nonce is still kept; ``"replay"``: the nonce is kept; ``"claimed"``: first use.
        """
        result: ClaimOutcome = await self._submit(_ClaimCommand(None, nonce, issued_ms, horizon_ms))
        return result

    async def correct_clock(self, boot_id: str, to_wall: Callable[[int], str], *,
                            slice_rows: int = CLOCK_SLICE_ROWS) -> tuple[int, int]:
        """Rewrite times of unsent events of ``boot_id`` stamped before clock sync.

        Works in transactions of ``slice_rows`` rows, other operations running between them. Rows that
        were ever leased are left as they are [5] and counted as sent. Returns (corrected, already_sent).
        """
        corrected = 0
        after = 0
        while True:
            n, last = await self._submit(_CorrectClock(None, boot_id, to_wall, after, slice_rows))
            corrected += n
            if last is None:
                break
            after = last
        sent: int = await self._submit(_CountSentUnsynced(None, boot_id))
        return corrected, sent

    async def kv_get(self, key: str) -> Any:
        """Local state kept beside the events (lockouts, alarm state): JSON, committed like events."""
        row = await self.query(lambda c: c.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone())
        return None if row is None else orjson.loads(row[0])

    async def kv_put(self, key: str, value: Any) -> None:
        text = orjson.dumps(value).decode()
        await self.query(lambda c: c.execute("INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)", (key, text)))

    async def query(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run a read-only function on the database thread (for status and history)."""
        return await self._submit(_Query(None, fn))

    # --- asyncio <-> thread plumbing ---------------------------------------------------------------

    def _submit(self, op: _Op, n_events: int = 0) -> asyncio.Future[Any]:
        if self._closed or self._loop is None:
            raise OutboxClosedError("outbox is closed")
        if self._fatal is not None:
            raise OutboxError(f"outbox database thread failed: {self._fatal}") from self._fatal
        if self._thread is not None and not self._thread.is_alive():
            raise OutboxError("outbox database thread is not running")
        fut = self._loop.create_future()
        op.future = fut
        if n_events:
            self._pending_events += n_events
            fut.add_done_callback(lambda _f: self._release(n_events))
        self._ops.put(op)
        return fut

    def _release(self, n_events: int) -> None:
        self._pending_events -= n_events
        if self._pending_events < self._cfg.max_pending_events:
            self._space.set()

    def _deliver(self, results: list[_Result],
                 changed: bool, evicted: EvictionReport | None) -> None:
        for fut, value, exc in results:
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)
        if changed:
            self.changed.set()
        if evicted and self._on_evicted is not None:
            self._on_evicted(evicted, self._evicted_total)

    # --- database thread ---------------------------------------------------------------------------

    def _run(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            self._take_lock()
            self._open_db()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting open()
            self._drop_lock()
            loop.call_soon_threadsafe(_set_exc_if_pending, ready, exc)
            return
        loop.call_soon_threadsafe(_set_result_if_pending, ready, None)
        try:
            self._serve(loop)
        except BaseException as exc:
            log.exception("outbox database thread failed")
            self._fatal = exc
            self._fail_queued(loop, exc)
        finally:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA optimize")
                self._conn.close()
                self._conn = None
            self._drop_lock()

    def _take_lock(self) -> None:
        """[7] Hold an exclusive flock on ``<db>.lock`` while open: one Outbox per database.

        The counters [4], the lease cursors and ``next_seq`` live in this object, so a second Outbox
        on the same file would hand out the same seqs and keep counters that never see the other's
        acks and dead letters (a test reading stats from the instance that did not send saw 1,045
        unsent alarms and no dead letters where the rows said none and three). flock, not a POSIX
        lock: it is per open file, so it also refuses a second instance in the same process, and the
        kernel drops it when the process dies, so a killed daemon leaves nothing stale. Readers
        (``edgeagent events``) open the database read-only and never take it."""
        path = self._cfg.path
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(path.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            raise OutboxError(f"{lock}: cannot create the outbox lock file: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            except OSError:
                holder = "unknown"
            os.close(fd)
            who = "this process" if holder == str(os.getpid()) else f"pid {holder}"
            raise OutboxError(
                f"{path}: the outbox is already open (by {who}); only one outbox may use a database: "
                "is another edgeagent running with this state directory?") from exc
        # Who holds it, for the message above; informational, so a full disk does not stop the open.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _drop_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _fail_queued(self, loop: asyncio.AbstractEventLoop, exc: BaseException) -> None:
        results: list[_Result] = []
        while True:
            try:
                op = self._ops.get_nowait()
            except queue.Empty:
                break
            if op is not _STOP and op.future is not None:
                results.append((op.future, None, OutboxError(f"outbox failed: {exc}")))
        if results:
            loop.call_soon_threadsafe(self._deliver, results, False, None)

    def _open_db(self) -> None:
        try:
            self._open_db_once()
        except OutboxCorruptError:
            if self._cfg.on_corrupt != "quarantine":
                raise
            path = self._cfg.path
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            target = path.with_name(f"{path.name}.corrupt-{stamp}")
            for suffix in ("", "-wal", "-shm"):
                src = path.with_name(path.name + suffix)
                if src.exists():
                    src.replace(target.with_name(target.name + suffix))
            log.error("%s failed its integrity check; moved to %s and started a new outbox", path, target)
            self.quarantined = target
            self._open_db_once()

    def _open_db_once(self) -> None:
        path = self._cfg.path
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise OutboxError(f"{path}: cannot open the outbox: {exc}") from exc
        try:
            self._prepare(conn, path)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if "not a database" in str(exc) or "malformed" in str(exc):
                raise OutboxCorruptError(f"{path}: the outbox database is corrupt: {exc}") from exc
            raise OutboxError(f"{path}: cannot open the outbox: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._last_commit_mono = time.monotonic()

    def _prepare(self, conn: sqlite3.Connection, path: Path) -> None:
        # auto_vacuum must be chosen before the first table exists; harmless afterwards.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OutboxError(f"{path}: cannot switch SQLite to WAL mode (got {mode!r})")
        sync = "FULL" if self._cfg.durability == "full" else "NORMAL"
        conn.execute(f"PRAGMA synchronous={sync}")
        conn.execute("PRAGMA busy_timeout=5000")
        # After a checkpoint the WAL file is cut back to this size instead of staying at its peak.
        conn.execute("PRAGMA journal_size_limit=4194304")
        # Checkpoint every ~1 MB of WAL: keeps the WAL well inside the disk reserve (below), so that
        # on a full disk a checkpoint can still move it into the database and truncate it.
        conn.execute("PRAGMA wal_autocheckpoint=256")
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise OutboxCorruptError(f"{path}: the outbox database failed its integrity check: {check}")
        conn.executescript(_SCHEMA)
        conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                     (SCHEMA_VERSION,))
        conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('next_seq', 1)")
        conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('evicted_total', 0)")
        conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('dead_lettered_total', 0)")
        for prio in Priority:
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, 0)", (_hwm_key(prio.value),))
        version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OutboxError(
                f"{path}: outbox schema {version} is newer than this edgeagent ({SCHEMA_VERSION})")
        stored_next = conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()[0]
        max_seq = conn.execute(
            "SELECT MAX(COALESCE((SELECT MAX(seq) FROM outbox), 0), COALESCE((SELECT MAX(seq) FROM dead_letters), 0))"
        ).fetchone()[0]
        self._next_seq = max(stored_next, max_seq + 1)
        self._evicted_total = conn.execute(
            "SELECT value FROM meta WHERE key='evicted_total'").fetchone()[0]
        self._dead_lettered_total = conn.execute(
            "SELECT value FROM meta WHERE key='dead_lettered_total'").fetchone()[0]
        for prio in Priority:
            self._leased_hwm[prio.value] = conn.execute(
                "SELECT value FROM meta WHERE key=?", (_hwm_key(prio.value),)).fetchone()[0]
        self._recount(conn)
        self.recovered_unsent = sum(self._unsent_rows.values())

    def _recount(self, conn: sqlite3.Connection) -> None:
        """[4] The counters from the rows themselves: once at open (one pass over the table)."""
        self._unsent_rows = {p.value: 0 for p in Priority}
        self._unsent_bytes = {p.value: 0 for p in Priority}
        for prio, n, nbytes in conn.execute(
            "SELECT prio, COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE sent_ms IS NULL GROUP BY prio"
        ):
            self._unsent_rows[prio] = n
            self._unsent_bytes[prio] = nbytes
        self._history_rows, self._history_bytes = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE sent_ms IS NOT NULL").fetchone()
        self._dead_rows, self._dead_bytes = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM dead_letters").fetchone()
        self._oldest_dirty = {p.value for p in Priority}
        self._refresh_oldest(conn)

    def _refresh_oldest(self, conn: sqlite3.Connection) -> None:
        """Look up the oldest unsent row of the classes that lost theirs (an index seek each)."""
        for prio in self._oldest_dirty:
            row = conn.execute(
                "SELECT seq, created_ms FROM outbox WHERE sent_ms IS NULL AND prio=? ORDER BY seq LIMIT 1",
                (prio,)).fetchone()
            self._oldest[prio] = None if row is None else (int(row[0]), int(row[1]))
        self._oldest_dirty = set()

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        conn = self._conn
        assert conn is not None
        stop = False
        while not stop:
            first = self._ops.get()
            if first is _STOP:
                break
            ops = [first]
            while len(ops) < self._cfg.max_cycle_ops:
                try:
                    nxt = self._ops.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                ops.append(nxt)
            self._cycle(loop, conn, ops)
        # Anything submitted after STOP (should not happen: _closed is set first) is failed.
        self._fail_queued(loop, OutboxClosedError("outbox closed"))

    def _cycle(self, loop: asyncio.AbstractEventLoop, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        evicted = EvictionReport()
        if self._reserve_spent() and any(isinstance(op, _Append) for op in ops):
            ops = self._admit_on_low_disk(loop, conn, ops, evicted)
            if not ops:
                return
        # [9] A cycle of only leases and acks (the uplink's bookkeeping) needs no fsync: if power fails
        # before a later commit makes it durable, those rows are simply sent again (at least once, and
        # the platform de-duplicates by id). Everything that accepts an event or a command stays FULL.
        relaxed = self._cfg.durability == "full" and all(isinstance(op, _RELAXED_OPS) for op in ops)
        if relaxed:
            conn.execute("PRAGMA synchronous=NORMAL")
        try:
            results, changed = self._transaction(conn, ops, evicted)
        except sqlite3.Error as exc:
            if _is_disk_full(exc):
                self._recover_from_full_disk(loop, conn, ops, evicted)
                return
            self._fail(loop, ops, OutboxError(f"outbox write failed: {exc}"))
            return
        except Exception as exc:  # noqa: BLE001 - any failure fails this cycle's ops, never the thread
            self._fail(loop, ops, OutboxError(f"outbox write failed: {exc}"))
            return
        finally:
            if relaxed:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA synchronous=FULL")
        loop.call_soon_threadsafe(self._deliver, results, changed, evicted if evicted else None)

    def _transaction(self, conn: sqlite3.Connection, ops: Sequence[_Op], evicted: EvictionReport,
                     housekeeping: bool = True) -> tuple[list[_Result], bool]:
        """Apply ops in one transaction and commit; on failure roll back state and re-raise."""
        state = self._snapshot()
        report_before = evicted.copy()
        seq_before, evicted_before = self._next_seq, self._evicted_total
        dead_before, hwm_before = self._dead_lettered_total, dict(self._leased_hwm)
        results: list[_Result] = []
        changed = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in ops:
                try:
                    value = self._apply_isolated(conn, op, evicted)
                except _OpFailed as failed:
                    if op.future is not None:
                        results.append((op.future, None, failed.error))
                    continue
                changed = changed or isinstance(op, _Append | _ResetLeases | _DeadLetter)
                if op.future is not None:
                    results.append((op.future, value, None))
            if housekeeping:
                self._maybe_evict(conn, evicted)
                self._maybe_housekeep(conn)
            if self._next_seq != seq_before:
                conn.execute("UPDATE meta SET value=? WHERE key='next_seq'", (self._next_seq,))
            if self._evicted_total != evicted_before:
                conn.execute("UPDATE meta SET value=? WHERE key='evicted_total'", (self._evicted_total,))
            if self._dead_lettered_total != dead_before:
                conn.execute("UPDATE meta SET value=? WHERE key='dead_lettered_total'",
                             (self._dead_lettered_total,))
            for prio, hwm in self._leased_hwm.items():
                if hwm != hwm_before[prio]:
                    conn.execute("UPDATE meta SET value=? WHERE key=?", (hwm, _hwm_key(prio)))
            self._refresh_oldest(conn)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._restore(state)
            _reset_report(evicted, report_before)  # rows evicted in a rolled-back transaction are still there
            raise
        dead, self._dead_report = self._dead_report, DeadLetterReport()
        if dead and self._on_dead_lettered is not None and self._loop is not None:
            # Queued before this cycle's results, so the report is pending before dead_letter() returns.
            self._loop.call_soon_threadsafe(self._on_dead_lettered, dead, self._dead_lettered_total)
        self._commits_total += 1
        self._last_commit_mono = time.monotonic()
        self.write_failing_since = None
        return results, changed

    def _apply_isolated(self, conn: sqlite3.Connection, op: _Op, evicted: EvictionReport) -> Any:
        """Apply one operation inside its own SAVEPOINT. If it fails, only its writes and counter
        changes are undone and _OpFailed carries the error for its future; the group goes on. A full
        disk or a transaction SQLite has already abandoned is raised to fail the group as a whole."""
        state = self._snapshot()
        report = evicted.copy()
        conn.execute("SAVEPOINT op")
        try:
            value = self._apply(conn, op, evicted)
        except Exception as exc:
            if (isinstance(exc, sqlite3.Error) and _is_disk_full(exc)) or not conn.in_transaction:
                raise
            try:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
            except sqlite3.Error:
                raise exc from None
            self._restore(state)
            evicted.telemetry, evicted.event = report.telemetry, report.event
            evicted.first_seq, evicted.last_seq = report.first_seq, report.last_seq
            log.warning("outbox: %s failed and was rolled back alone: %s", type(op).__name__.lstrip("_"), exc)
            err = OutboxError(f"outbox operation failed: {exc}")
            err.__cause__ = exc
            raise _OpFailed(err) from exc
        conn.execute("RELEASE op")
        return value

    def _fail(self, loop: asyncio.AbstractEventLoop, ops: Sequence[_Op], err: BaseException,
              evicted: EvictionReport | None = None) -> None:
        # A full disk refusing new events is the outbox working as designed (it still commits acks and
        # frees space); any other failed group commit means the database cannot be written.
        if self.write_failing_since is None and not isinstance(err, OutboxFullError):
            self.write_failing_since = time.monotonic()
        results: list[_Result] = [(op.future, None, err) for op in ops if op.future is not None]
        loop.call_soon_threadsafe(self._deliver, results, False, evicted if evicted else None)

    def _recover_from_full_disk(
        self, loop: asyncio.AbstractEventLoop, conn: sqlite3.Connection, ops: list[_Op],
        evicted: EvictionReport | None = None,
    ) -> None:
        """SQLITE_FULL. Free space, in this order: the reserve file, the WAL, sent history, evictable
        rows; then retry. If appends still do not fit they are refused (OutboxFullError) while leases
        and acks still go through, so the backlog can drain and make room."""
        log.error("disk full while writing the outbox; freeing the reserve, history and evictable rows")
        self._release_reserve()
        # Evictions this cycle already committed (before the failed transaction) are reported with these.
        evicted = evicted.copy() if evicted is not None else EvictionReport()
        self._free_space(conn, evicted)
        try:
            results, changed = self._transaction(conn, ops, evicted, housekeeping=False)
        except sqlite3.Error as exc:
            appends = [op for op in ops if isinstance(op, _Append)]
            others = [op for op in ops if not isinstance(op, _Append)]
            self._fail(loop, appends, OutboxFullError(f"disk full: event not accepted ({exc})"), evicted)
            if not others:
                return
            try:
                results, changed = self._transaction(conn, others, EvictionReport(), housekeeping=False)
            except sqlite3.Error as exc2:
                self._fail(loop, others, OutboxError(f"outbox write failed on a full disk: {exc2}"))
                return
            loop.call_soon_threadsafe(self._deliver, results, changed, None)
            return
        loop.call_soon_threadsafe(self._deliver, results, changed, evicted if evicted else None)

    def _free_space(self, conn: sqlite3.Connection, evicted: EvictionReport) -> None:
        """Shrink the WAL, drop sent history and evictable rows, and give freed pages back to the disk,
        in small steps (each step's WAL must fit on the full disk) until a reserve's worth is free."""
        for _ in range(_FREE_MAX_STEPS):
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            before = self._history_bytes + self._dead_bytes + sum(self._unsent_bytes.values())
            with contextlib.suppress(sqlite3.Error):
                self._transaction(conn, [_FreeSpace(None)], evicted, housekeeping=False)
            with contextlib.suppress(sqlite3.Error):
                conn.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page only
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._disk_checked = 0.0
            self._effective_cap()
            freed_nothing = self._history_bytes + self._dead_bytes + sum(self._unsent_bytes.values()) >= before
            if freed_nothing or self._disk_free >= 2 * max(self._reserve_released, _RESERVE_MIN_BYTES):
                return

    def _reserve_spent(self) -> bool:
        """True while the disk reserve is given up and free space has not come back above it.

        A reserve never made (a disk too small for one) is not spent: that would refuse every event
        on a disk that still has room (SQLITE_FULL handling covers a disk that then fills)."""
        if not self._reserve_released or self._reserve_path().exists():
            return False
        self._disk_checked = 0.0  # refresh now: this decides whether events are refused
        self._effective_cap()
        return self._disk_free < self._reserve_released * 2

    def _admit_on_low_disk(self, loop: asyncio.AbstractEventLoop, conn: sqlite3.Connection,
                           ops: list[_Op], evicted: EvictionReport) -> list[_Op]:
        """The reserve is spent: make room (history, then evictable rows, handing pages back to the
        file system) and admit new events only while a reserve's worth of disk stays free for marking
        events sent. Returns the ops that may proceed."""
        self._free_space(conn, evicted)
        self._disk_checked = 0.0
        self._effective_cap()
        if self._disk_free >= self._reserve_released:
            return ops
        appends = [op for op in ops if isinstance(op, _Append)]
        # The evictions made so far are committed: hand over a copy and start afresh, so that the rest of
        # this cycle neither reports them twice nor changes the object the event loop is reading.
        self._fail(loop, appends, OutboxFullError(
            "disk full: event not accepted (nothing evictable is left; the last free space is kept for "
            "sending what the outbox holds)"), evicted.copy())
        _reset_report(evicted, EvictionReport())
        return [op for op in ops if not isinstance(op, _Append)]

    def _reserve_path(self) -> Path:
        return self._cfg.path.with_name(self._cfg.path.name + ".reserve")

    def _release_reserve(self) -> None:
        path = self._reserve_path()
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            self._reserve_released = max(self._reserve_released, size)
            log.warning("outbox: released the %d-byte disk reserve", size)

    def _ensure_reserve(self) -> None:
        """Keep a ballast file so that, when the disk fills, deleting it leaves room to mark events sent.

        Its size is what the disk can spare: ``reserve_bytes`` at most and a quarter of the free space
        at most, so that a nearly full state filesystem still opens and takes events (a fixed 4 MiB
        refused every event with 3 MB free). After a release it comes back, at the size given up,
        only once four times that is free again."""
        path = self._reserve_path()
        if self._cfg.reserve_bytes <= 0 or path.exists():
            return
        if self._reserve_released:
            size = self._reserve_released
            if self._disk_free < size * _RESERVE_FRACTION:
                return
        else:
            size = min(self._cfg.reserve_bytes, self._disk_free // _RESERVE_FRACTION)
            if size < _RESERVE_MIN_BYTES:
                return
        try:
            with open(path, "wb") as fh:
                fh.write(b"\0" * size)  # real blocks, not a sparse hole
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()
            return
        self._reserve_released = 0

    def _snapshot(self) -> tuple[Any, ...]:
        return (self._next_seq, dict(self._cursor), dict(self._unsent_bytes), dict(self._unsent_rows),
                self._history_bytes, self._history_rows, self._evicted_total, self._coalesced_total,
                dict(self._oldest), set(self._oldest_dirty), dict(self._leased_hwm), self._dead_rows,
                self._dead_bytes, self._dead_lettered_total, self._dead_report.copy())

    def _restore(self, s: tuple[Any, ...]) -> None:
        (self._next_seq, self._cursor, self._unsent_bytes, self._unsent_rows,
         self._history_bytes, self._history_rows, self._evicted_total, self._coalesced_total,
         self._oldest, self._oldest_dirty, self._leased_hwm, self._dead_rows,
         self._dead_bytes, self._dead_lettered_total, self._dead_report) = s
        self._dead_report = self._dead_report.copy()  # the snapshot may be restored more than once

    def _apply(self, conn: sqlite3.Connection, op: _Op, evicted: EvictionReport) -> Any:
        if isinstance(op, _Append):
            return self._append(conn, op.events)
        if isinstance(op, _Lease):
            return self._lease(conn, op.max_events, op.max_bytes)
        if isinstance(op, _Ack):
            return self._ack(conn, op.seqs)
        if isinstance(op, _ResetLeases):
            self._cursor = {p.value: 0 for p in Priority}
            return None
        if isinstance(op, _Barrier):
            return None
        if isinstance(op, _Stats):
            return self._stats(conn)
        if isinstance(op, _ClaimNonce):
            conn.execute("DELETE FROM nonces WHERE expires_ms < ?", (op.now_ms,))
            cur = conn.execute("INSERT OR IGNORE INTO nonces(nonce, expires_ms) VALUES (?, ?)",
                               (op.nonce, op.expires_ms))
            return cur.rowcount == 1
        if isinstance(op, _ClaimCommand):
            return _claim_command(conn, op.nonce, op.issued_ms, op.horizon_ms)
        if isinstance(op, _DeadLetter):
            return self._dead_letter(conn, op.seqs, op.reason)
        if isinstance(op, _CorrectClock):
            return self._correct_clock(conn, op.boot_id, op.to_wall, op.after_seq, op.limit)
        if isinstance(op, _CountSentUnsynced):
            return self._count_sent_unsynced(conn, op.boot_id)
        if isinstance(op, _Query):
            return op.fn(conn)
        if isinstance(op, _FreeSpace):
            # One small step; _free_space repeats it with checkpoints in between.
            if (self._trim_history(conn, keep_bytes=0, max_rows=_FREE_STEP_ROWS) == 0
                    and self._trim_dead_letters(conn, keep_bytes=0, max_rows=_FREE_STEP_ROWS) == 0):
                self._evict(conn, max(1, sum(self._unsent_bytes.values()) // 10), evicted,
                            max_rows=_FREE_STEP_ROWS)
            return None
        raise OutboxError(f"unknown outbox operation {op!r}")

    def _append(self, conn: sqlite3.Connection, events: Iterable[Event]) -> list[int]:
        seqs: list[int] = []
        rows: list[tuple[Any, ...]] = []
        for ev in events:
            prio = ev.priority.value
            if ev.coalesce_key is not None:
                seq = self._coalesce(conn, ev)
                if seq is not None:
                    seqs.append(seq)
                    continue
            seq = self._next_seq
            self._next_seq += 1
            payload = ev.to_json(seq)
            size = len(payload) + _ROW_OVERHEAD_BYTES
            stamp = ev.stamp
            created_ms = int(stamp.wall.timestamp() * 1000)
            rows.append((seq, ev.id, prio, ev.type, ev.device_id, ev.coalesce_key, int(ev.pinned),
                         created_ms, int(not stamp.synced), stamp.monotonic_ns,
                         stamp.boot_id, size, payload))
            self._unsent_bytes[prio] += size
            self._unsent_rows[prio] += 1
            if self._oldest[prio] is None and prio not in self._oldest_dirty:
                self._oldest[prio] = (seq, created_ms)  # [4] the class was empty: this is its oldest
            seqs.append(seq)
        if rows:
            conn.executemany(
                "INSERT INTO outbox(seq, id, prio, type, device_id, ckey, pinned, created_ms, unsynced,"
                " mono_ns, boot_id, size, payload) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
        return seqs

    def _coalesce(self, conn: sqlite3.Connection, ev: Event) -> int | None:
        """Fold telemetry into the unsent, never leased row of the same series, if there is one.

        The row keeps its ``seq`` and ``id`` (so the cloud sees no gap) and takes the newest value
        and time; ``coalesced`` counts the readings folded into it. [5] Only rows above the class's
        leased high-water mark qualify: the lease cursor alone is not enough, since a reset (or a
        restart) rewinds it over rows that may already be on the platform.
        """
        prio = ev.priority.value
        row = conn.execute(
            "SELECT seq, id, coalesced, size FROM outbox WHERE ckey=? AND sent_ms IS NULL AND seq>?"
            " ORDER BY seq DESC LIMIT 1",
            (ev.coalesce_key, max(self._cursor[prio], self._leased_hwm[prio])),
        ).fetchone()
        if row is None:
            return None
        seq, row_id, count, old_size = row
        env = ev.envelope(seq)
        env["id"] = row_id
        env["coalesced"] = count + 1
        payload = orjson.dumps(env)
        size = len(payload) + _ROW_OVERHEAD_BYTES
        stamp = ev.stamp
        conn.execute(
            "UPDATE outbox SET payload=?, size=?, coalesced=?, created_ms=?, unsynced=?, mono_ns=?,"
            " boot_id=? WHERE seq=?",
            (payload, size, count + 1, int(stamp.wall.timestamp() * 1000), int(not stamp.synced),
             stamp.monotonic_ns, stamp.boot_id, seq),
        )
        self._unsent_bytes[prio] += size - old_size
        self._coalesced_total += 1
        oldest = self._oldest[prio]
        if oldest is not None and oldest[0] == seq:
            self._oldest_dirty.add(prio)  # its time moved forward
        return int(seq)

    def _lease(self, conn: sqlite3.Connection, max_events: int, max_bytes: int) -> Batch | None:
        for prio in Priority:
            if self._unsent_rows[prio.value] == 0:
                continue
            rows = conn.execute(
                "SELECT seq, payload FROM outbox WHERE sent_ms IS NULL AND prio=? AND seq>?"
                " ORDER BY seq LIMIT ?",
                (prio.value, self._cursor[prio.value], max_events),
            ).fetchall()
            if not rows:
                continue
            seqs: list[int] = []
            payloads: list[bytes] = []
            total = 0
            for seq, payload in rows:
                if payloads and total + len(payload) > max_bytes:
                    break
                seqs.append(seq)
                payloads.append(payload)
                total += len(payload)
            self._cursor[prio.value] = seqs[-1]
            # [5] committed with the lease, before the batch is handed to the uplink [2].
            self._leased_hwm[prio.value] = max(self._leased_hwm[prio.value], seqs[-1])
            return Batch(prio, tuple(seqs), tuple(payloads))
        return None

    def _ack(self, conn: sqlite3.Connection, seqs: Sequence[int]) -> None:
        now = self._now_ms()
        done = self._unsent_counts(conn, seqs)
        conn.executemany("UPDATE outbox SET sent_ms=? WHERE seq=? AND sent_ms IS NULL",
                         [(now, s) for s in seqs])
        for prio, n, nbytes in done:
            self._unsent_rows[prio] -= n
            self._unsent_bytes[prio] -= nbytes
            self._history_bytes += nbytes
            self._history_rows += n
            self._oldest_dirty.add(prio)

    def _dead_letter(self, conn: sqlite3.Connection, seqs: Sequence[int], reason: str) -> int:
        """[6] Move the still-unsent rows among ``seqs`` to the dead-letter table."""
        now = self._now_ms()
        moved = 0
        for marks, chunk in _in_lists(seqs):
            rows = conn.execute(
                f"SELECT seq, prio, type, size FROM outbox WHERE sent_ms IS NULL AND seq IN ({marks})"  # noqa: S608 - placeholders only
                " ORDER BY seq", chunk).fetchall()
            if not rows:
                continue
            copy = (
                "INSERT INTO dead_letters(seq, id, prio, type, device_id, created_ms, dead_ms, reason, size,"  # noqa: S608 - placeholders only
                " payload) SELECT seq, id, prio, type, device_id, created_ms, ?, ?, size, payload FROM outbox"
                f" WHERE sent_ms IS NULL AND seq IN ({marks})")
            conn.execute(copy, (now, reason, *chunk))
            conn.execute(f"DELETE FROM outbox WHERE sent_ms IS NULL AND seq IN ({marks})", chunk)  # noqa: S608
            for seq, prio, type_, size in rows:
                self._dead_report.add(seq, prio, type_, reason)
                self._unsent_rows[prio] -= 1
                self._unsent_bytes[prio] -= size
                self._dead_bytes += size
                self._oldest_dirty.add(prio)
            self._dead_rows += len(rows)
            moved += len(rows)
        self._dead_lettered_total += moved
        if moved:
            log.warning("outbox: %d events dead-lettered: %s", moved, reason)
            if self._dead_bytes > self._cfg.dead_letter_bytes:
                self._trim_dead_letters(conn, keep_bytes=self._cfg.dead_letter_bytes)
        return moved

    def _trim_dead_letters(self, conn: sqlite3.Connection, keep_bytes: int, max_rows: int = 1 << 62) -> int:
        """Drop the oldest dead letters down to ``keep_bytes`` (at most ``max_rows`` now)."""
        freed = 0
        while self._dead_bytes > keep_bytes and max_rows > 0:
            rows = conn.execute("SELECT seq, size FROM dead_letters ORDER BY seq LIMIT ?",
                                (min(2000, max_rows),)).fetchall()
            max_rows -= len(rows)
            if not rows:
                self._dead_bytes = self._dead_rows = 0
                break
            victims = []
            for seq, size in rows:
                victims.append((seq,))
                self._dead_bytes -= size
                freed += size
                if self._dead_bytes <= keep_bytes:
                    break
            conn.executemany("DELETE FROM dead_letters WHERE seq=?", victims)
            self._dead_rows -= len(victims)
        return freed

    @staticmethod
    def _unsent_counts(conn: sqlite3.Connection, seqs: Sequence[int]) -> list[tuple[int, int, int]]:
        """(prio, rows, bytes) of the still-unsent rows among ``seqs``; chunked under SQLite's limit."""
        totals: dict[int, list[int]] = {}
        for marks, chunk in _in_lists(seqs):
            for prio, n, nbytes in conn.execute(
                f"SELECT prio, COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE sent_ms IS NULL"  # noqa: S608 - placeholders only
                f" AND seq IN ({marks}) GROUP BY prio",
                chunk,
            ):
                t = totals.setdefault(prio, [0, 0])
                t[0] += n
                t[1] += nbytes
        return [(p, t[0], t[1]) for p, t in totals.items()]

    def _effective_cap(self) -> int:
        """The backlog cap, lowered when the disk's free space falls under its reserve."""
        now = time.monotonic()
        if now - self._disk_checked >= _DISK_CHECK_INTERVAL_S:
            self._disk_checked = now
            try:
                st = os.statvfs(self._cfg.path.parent)
                self._disk_free = st.f_bavail * st.f_frsize
            except OSError:
                self._disk_free = 1 << 62
        cap = self._cfg.cap_bytes
        shortfall = self._cfg.min_free_bytes - self._disk_free
        if shortfall > 0:
            cap = max(0, min(cap, sum(self._unsent_bytes.values()) - shortfall))
        return cap

    def _maybe_evict(self, conn: sqlite3.Connection, evicted: EvictionReport) -> None:
        cap = self._effective_cap()
        if self._disk_free < self._cfg.min_free_bytes and self._history_bytes:
            # Low disk: sent history goes before any unsent event.
            self._trim_history(conn, keep_bytes=0)
        over = sum(self._unsent_bytes.values()) - cap
        if over > 0:
            self._evict(conn, over, evicted)

    def _evict(self, conn: sqlite3.Connection, need_bytes: int, evicted: EvictionReport,
               max_rows: int = 1 << 62) -> None:
        for prio in (Priority.TELEMETRY, Priority.EVENT):
            while need_bytes > 0 and self._unsent_rows[prio.value] > 0 and max_rows > 0:
                rows = conn.execute(
                    "SELECT seq, size FROM outbox WHERE sent_ms IS NULL AND prio=? AND seq>? AND pinned=0"
                    " ORDER BY seq LIMIT ?",
                    (prio.value, self._cursor[prio.value], min(500, max_rows)),
                ).fetchall()
                max_rows -= len(rows)
                if not rows:
                    break
                victims: list[int] = []
                for seq, size in rows:
                    victims.append(seq)
                    need_bytes -= size
                    self._unsent_bytes[prio.value] -= size
                    if need_bytes <= 0:
                        break
                conn.executemany("DELETE FROM outbox WHERE seq=?", [(s,) for s in victims])
                self._unsent_rows[prio.value] -= len(victims)
                self._oldest_dirty.add(prio.value)
                self._evicted_total += len(victims)
                evicted.add(prio.value, victims)
            if need_bytes <= 0:
                return

    def _trim_history(self, conn: sqlite3.Connection, keep_bytes: int, max_rows: int = 1 << 62) -> int:
        """Delete the oldest sent rows down to ``keep_bytes`` (at most ``max_rows`` in this transaction:
        a delete writes every page it touches to the WAL, which must fit on the disk)."""
        freed = 0
        while self._history_bytes > keep_bytes and max_rows > 0:
            rows = conn.execute("SELECT seq, size FROM outbox WHERE sent_ms IS NOT NULL ORDER BY seq LIMIT ?",
                                (min(2000, max_rows),)).fetchall()
            max_rows -= len(rows)
            if not rows:
                self._history_bytes = self._history_rows = 0
                break
            victims = []
            for seq, size in rows:
                victims.append((seq,))
                self._history_bytes -= size
                freed += size
                if self._history_bytes <= keep_bytes:
                    break
            conn.executemany("DELETE FROM outbox WHERE seq=?", victims)
            self._history_rows -= len(victims)
        return freed

    def _maybe_housekeep(self, conn: sqlite3.Connection) -> None:
        now = time.monotonic()
        if now < self._housekeeping_at:
            return
        self._housekeeping_at = now + _HOUSEKEEPING_INTERVAL_S
        self._ensure_reserve()
        if self._history_bytes > self._cfg.history_bytes:
            # Trim in slices: deleting 100k rows at once stalls intake and sending for half a second
            # (measured in bench/uplink.py). Come back soon while there is more to trim.
            self._trim_history(conn, keep_bytes=self._cfg.history_bytes * 3 // 4, max_rows=_TRIM_SLICE_ROWS)
            if self._history_bytes > self._cfg.history_bytes * 3 // 4:
                self._housekeeping_at = now + _TRIM_AGAIN_S

    def _stats(self, conn: sqlite3.Connection) -> OutboxStats:
        """[4] From the counters; the only SQL reads the database header (its size)."""
        now = self._now_ms()
        classes: dict[str, ClassStats] = {}
        for prio in Priority:
            oldest = self._oldest[prio.value]
            age = None if oldest is None else max(0.0, (now - oldest[1]) / 1000)
            classes[prio.label] = ClassStats(self._unsent_rows[prio.value], self._unsent_bytes[prio.value], age)
        page_count = conn.execute("PRAGMA page_count").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        last = None if self._last_commit_mono is None else time.monotonic() - self._last_commit_mono
        return OutboxStats(classes, self._history_rows, self._next_seq, self._evicted_total, self._coalesced_total,
                           self.intake_dropped_total, self._commits_total, page_count * page_size, last,
                           self._dead_lettered_total, self._dead_rows)

    def _correct_clock(self, conn: sqlite3.Connection, boot_id: str, to_wall: Callable[[int], str],
                       after_seq: int, limit: int) -> tuple[int, int | None]:
        """One slice: up to ``limit`` unsynced rows of ``boot_id`` above ``after_seq``. Returns (rows
        corrected, the seq to continue after, or None when this was the last slice)."""
        rows = conn.execute(
            "SELECT seq, prio, payload, mono_ns, size FROM outbox"
            " WHERE boot_id=? AND unsynced=1 AND seq>? AND sent_ms IS NULL ORDER BY seq LIMIT ?",
            (boot_id, after_seq, limit),
        ).fetchall()
        corrected = 0
        for seq, prio, payload, mono_ns, old_size in rows:
            if seq <= self._leased_hwm[prio]:
                continue  # [5] may be on the platform as it is; gateway.clock.synced covers it
            env = orjson.loads(payload)
            wall = to_wall(mono_ns)
            env["occurred_at"] = wall
            env["clock_synced"] = True
            env.setdefault("clock", {})["corrected"] = True
            new = orjson.dumps(env)
            size = len(new) + _ROW_OVERHEAD_BYTES
            created_ms = _parse_utc_ms(wall)
            conn.execute("UPDATE outbox SET payload=?, size=?, unsynced=0, created_ms=? WHERE seq=?",
                         (new, size, created_ms, seq))
            self._unsent_bytes[prio] += size - old_size
            oldest = self._oldest[prio]
            if oldest is not None and oldest[0] == seq:
                self._oldest[prio] = (seq, created_ms)
            corrected += 1
        last = int(rows[-1][0]) if len(rows) == limit else None
        return corrected, last

    def _count_sent_unsynced(self, conn: sqlite3.Connection, boot_id: str) -> int:
        """Rows of ``boot_id`` with uncorrected times that were sent or may have been [5]."""
        hwm = self._leased_hwm
        row = conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE boot_id=? AND unsynced=1 AND (sent_ms IS NOT NULL"
            " OR (prio=? AND seq<=?) OR (prio=? AND seq<=?) OR (prio=? AND seq<=?))",
            (boot_id, *(x for p in Priority for x in (p.value, hwm[p.value]))),
        ).fetchone()
        return int(row[0])


def read_dead_letters(conn: sqlite3.Connection, limit: int = 100) -> list[DeadLetter]:
    """The newest ``limit`` dead letters, in ``seq`` order, from any connection to an outbox database
    (the outbox's own, or the CLI's read-only one while the daemon runs). A database from before the
    table existed has none."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='dead_letters'").fetchone() is None:
        return []
    rows = conn.execute(
        "SELECT seq, id, prio, type, device_id, created_ms, dead_ms, reason, payload FROM dead_letters"
        " ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
    return [DeadLetter(r[0], r[1], Priority(r[2]), r[3], r[4], r[5], r[6], r[7], bytes(r[8]))
            for r in reversed(rows)]


class _OpFailed(Exception):
    """One operation of a group commit failed and was rolled back alone; ``error`` goes to its future."""

    def __init__(self, error: OutboxError) -> None:
        super().__init__(str(error))
        self.error = error


def _reset_report(report: EvictionReport, to: EvictionReport) -> None:
    report.telemetry, report.event, report.first_seq, report.last_seq = (
        to.telemetry, to.event, to.first_seq, to.last_seq)


def _hwm_key(prio: int) -> str:
    return f"leased_hwm_{prio}"


def _parse_utc_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def _is_disk_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "full" in str(exc).lower()


def _claim_command(conn: sqlite3.Connection, nonce: str, issued_ms: int, horizon_ms: int) -> ClaimOutcome:
    """[8] The floor only rises, and the refusal and the purge use the same floor in one transaction: a
    nonce is deleted only once its command would be refused as stale anyway. Moving this box's clock
    (back or forth) changes neither, so a command run once cannot be run again by rolling the clock back
    until its nonce was purged. Nonces the older wall-clock path (``nonces``) still keeps count too."""
    row = conn.execute("SELECT value FROM kv WHERE key=?", (COMMAND_FLOOR_KEY,)).fetchone()
    floor = int(orjson.loads(row[0])) if row is not None else None
    if floor is not None and issued_ms < floor:
        return "stale"
    if conn.execute("SELECT 1 FROM nonces WHERE nonce=?", (nonce,)).fetchone() is not None:
        return "replay"
    cur = conn.execute("INSERT OR IGNORE INTO command_nonces(nonce, issued_ms) VALUES (?, ?)", (nonce, issued_ms))
    if cur.rowcount != 1:
        return "replay"
    new_floor = issued_ms - horizon_ms
    if floor is None or new_floor > floor:
        conn.execute("INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)", (COMMAND_FLOOR_KEY, str(new_floor)))
        conn.execute("DELETE FROM command_nonces WHERE issued_ms < ?", (new_floor,))
    return "claimed"


def _set_result_if_pending(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exc_if_pending(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)

