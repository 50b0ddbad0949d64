"""The read planner: a device's polled registers coalesced into as few block reads as the protocol allows
(pure; a :class:`~edgeagent.drivers.modbus.profile_model.Point` is one kind of register it plans for)."""

from __future__ import annotations

import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, Literal, Protocol, TypeVar

from edgeagent.drivers.modbus.codec import CodecError

Table = Literal["coil", "discrete_input", "holding", "input"]
TABLES: Final[tuple[Table, ...]] = typing.get_args(Table)
BIT_TABLES: Final[frozenset[str]] = frozenset({"coil", "discrete_input"})
MAX_READ_REGISTERS: Final = 125  # FC 3/4: at most 125 registers per request
MAX_READ_BITS: Final = 2000  # FC 1/2: at most 2000 bits per request


# --- the read planner --------------------------------------------------------------------------------

class Readable(Protocol):
    """What the planner needs of a register (a :class:`Point` is one)."""

    @property
    def table(self) -> Table: ...
    @property
    def address(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def poll_interval_s(self) -> float: ...


R = TypeVar("R", bound=Readable)


@dataclass(frozen=True, slots=True)
class Slice(Generic[R]):
    """Where one register's words sit in a block: ``words[start:start + item.count]``."""

    item: R
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.item.count


@dataclass(frozen=True, slots=True)
class ReadBlock(Generic[R]):
    """One read request: ``count`` registers (or bits) of ``table`` from ``address``."""

    table: Table
    address: int
    count: int
    poll_interval_s: float
    slices: tuple[Slice[R], ...]

    def split(self, words: Sequence[int]) -> list[tuple[R, Sequence[int]]]:
        """Each register's words out of the block's answer. Raises :class:`CodecError` on a short answer."""
        if len(words) < self.count:
            raise CodecError(f"{self.table} {self.address}+{self.count}: the device answered {len(words)} values")
        return [(s.item, words[s.start:s.stop]) for s in self.slices]


def plan_reads(registers: Iterable[R], *, max_regs: int = MAX_READ_REGISTERS, max_bits: int = MAX_READ_BITS,
               max_gap: int = 8) -> list[ReadBlock[R]]:
    """Coalesce registers into block reads.

    Registers merge only with others of the same table and the same poll interval. Within a group, in
    address order, a register joins the current block when at most ``max_gap`` unused addresses lie
    between them and the block stays within ``max_regs`` (holding/input, protocol limit 125) or
    ``max_bits`` (coils/discrete inputs, protocol limit 2000); the gap is counted in the table's own
    units. Blocks come out ordered by poll interval, table, then address. Pure: the input is not changed.
    """
    if not 1 <= max_regs <= MAX_READ_REGISTERS:
        raise ValueError(f"max_regs must be 1 .. {MAX_READ_REGISTERS} (got {max_regs})")
    if not 1 <= max_bits <= MAX_READ_BITS:
        raise ValueError(f"max_bits must be 1 .. {MAX_READ_BITS} (got {max_bits})")
    if max_gap < 0:
        raise ValueError(f"max_gap cannot be negative (got {max_gap})")
    groups: dict[tuple[float, int], list[R]] = {}
    for reg in registers:
        limit = max_bits if reg.table in BIT_TABLES else max_regs
        if reg.count < 1 or reg.count > limit or reg.address < 0 or reg.address + reg.count > 65536:
            raise ValueError(f"{reg.table} {reg.address} (+{reg.count}) cannot be read within the limits")
        groups.setdefault((reg.poll_interval_s, TABLES.index(reg.table)), []).append(reg)
    blocks: list[ReadBlock[R]] = []
    for (interval, table_index), regs in sorted(groups.items(), key=lambda kv: kv[0]):
        table = TABLES[table_index]
        limit = max_bits if table in BIT_TABLES else max_regs
        regs.sort(key=lambda r: (r.address, r.count))
        start, stop, members = regs[0].address, regs[0].address + regs[0].count, [regs[0]]
        for reg in regs[1:]:
            new_stop = max(stop, reg.address + reg.count)
            if reg.address - stop <= max_gap and new_stop - start <= limit:
                stop = new_stop
                members.append(reg)
                continue
            blocks.append(_block(table, start, stop, interval, members))
            start, stop, members = reg.address, reg.address + reg.count, [reg]
        blocks.append(_block(table, start, stop, interval, members))
    return blocks


def _block(table: Table, start: int, stop: int, interval: float, members: list[R]) -> ReadBlock[R]:
    return ReadBlock(table, start, stop - start, interval, tuple(Slice(m, m.address - start) for m in members))
