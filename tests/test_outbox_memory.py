"""The outbox's memory over months: what it keeps must not grow with the variety of what it has seen.

SQLite compiles every distinct SQL text into a prepared statement, and Python's sqlite3 keeps the last
128 of them per connection. A statement with an ``IN (?, ?, ...)`` list of N placeholders is a program
of a few opcodes per placeholder (about 36 kB for 500), so a query built with one placeholder per
acknowledged row makes one statement per batch size ever seen: the cache fills with up to 128 large
programs over hours (each new batch size appears rarely, and an outage's backlog brings the large ones
at once), and the churn fragments the database thread's malloc arena. bench/soak.py measured this as
the daemon's steady RSS growth.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from edgeagent.kernel.pipeline.events import EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig

_IN_LIST = re.compile(r"\bIN \(([^()]*)\)")


def in_list_lengths(statements: list[str]) -> set[int]:
    """Lengths of the ``IN (...)`` lists in the (expanded) statements: one prepared statement each."""
    return {m.group(1).count(",") + 1 for sql in statements for m in _IN_LIST.finditer(sql)}


async def test_acking_batches_of_many_sizes_prepares_few_statements(tmp_path: Path, factory: EventFactory) -> None:
    sizes = list(range(1, 61))  # 60 different batch sizes, 1,830 events
    executed: list[str] = []
    async with Outbox(OutboxConfig(tmp_path / "o.db")) as ob:
        await ob.put_many([factory.make("contact.changed", f"door-{i}", {"state": "open", "contact": "door"})
                           for i in range(sum(sizes))])

        def trace(conn: sqlite3.Connection) -> None:
            conn.set_trace_callback(executed.append)  # runs on the database thread, which calls it

        await ob.query(trace)
        for n in sizes:
            batch = await ob.lease(n, 10_000_000)
            assert batch is not None and len(batch) == n
            await ob.ack_nowait(batch)
        await ob.query(lambda conn: conn.set_trace_callback(None))
        stats = await ob.stats()
    lengths = in_list_lengths(executed)
    assert lengths, "the ack path no longer uses an IN list: rewrite this test for what it uses now"
    # Sizes rounded up to a few buckets (powers of two): at most 7 statements for 1 .. 60, not 60.
    assert len(lengths) <= 7, sorted(lengths)
    # And the padding changed nothing: every row was marked sent exactly once.
    assert sum(c.unsent for c in stats.classes.values()) == 0
    assert stats.history_rows == sum(sizes)


async def test_dead_lettering_batches_of_many_sizes_prepares_few_statements(
        tmp_path: Path, factory: EventFactory) -> None:
    sizes = list(range(1, 31))
    executed: list[str] = []
    async with Outbox(OutboxConfig(tmp_path / "o.db")) as ob:
        await ob.put_many([factory.make("contact.changed", f"door-{i}", {"state": "open", "contact": "door"})
                           for i in range(sum(sizes))])
        await ob.query(lambda conn: conn.set_trace_callback(executed.append))
        moved = 0
        for n in sizes:
            batch = await ob.lease(n, 10_000_000)
            assert batch is not None
            moved += await ob.dead_letter(batch.seqs, "test: the broker refuses these")
        await ob.query(lambda conn: conn.set_trace_callback(None))
        letters = await ob.dead_letters(limit=10_000)
    assert moved == sum(sizes) == len(letters)
    assert len({d.seq for d in letters}) == moved
    assert len(in_list_lengths(executed)) <= 6, sorted(in_list_lengths(executed))
