"""``edgeagent modbus``: find, read, write and add Modbus devices from the installer's laptop or the box.

Every command that talks to a device takes its target as a bus of the config file (``--bus ID``) or as
an ad-hoc address: ``--host H [--port 502] [--rtu-over-tcp]`` or ``--serial /dev/ttyUSB0 [--baud ...]``.
They talk through the daemon's own bus code (one request at a time, its timeouts and error translation),
so what works here works in the daemon. A serial line has one master: stop the daemon
(``systemctl stop edgeagent``) before using a line it polls.

``add`` tests before it configures: it reads the profile's first block from the unit and writes the
config file only when the device answers as that profile expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from ruamel.yaml.comments import CommentedMap

from edgeagent.capabilities import DEVICE_TYPES
from edgeagent.cli import config_edit, devices
from edgeagent.cli.common import (
    ConfigOption,
    JsonOption,
    config_path,
    console,
    err_console,
    fail,
    load_or_exit,
    print_json,
)
from edgeagent.drivers.modbus.capability import SPEC as MODBUS
from edgeagent.drivers.modbus.config import ModbusBusConfig, ModbusDeviceBase
from edgeagent.drivers.modbus.probe import GATEWAY_CODES as _GATEWAY_CODES
from edgeagent.drivers.modbus.probe import exception_text as _exception_text
from edgeagent.drivers.modbus.probe import show
from edgeagent.drivers.modbus.probe import unavailable_text as _unavailable
from edgeagent.kernel.config.schema import Config
from edgeagent.kernel.errors import ConfigError, DeviceProtocolError, DeviceUnavailable, EdgeagentError

if TYPE_CHECKING:
    from edgeagent.drivers.modbus.bus import ModbusBus
    from edgeagent.drivers.modbus.codec import Value, ValueSpec
    from edgeagent.drivers.modbus.profile import Point, PointValue, Profile
    from edgeagent.drivers.modbus.profile import Table as TableLiteral

app = typer.Typer(no_args_is_help=True, help="Find, read, write and add Modbus devices (gates, chargers, relays).")
bus_app = typer.Typer(no_args_is_help=True, help="List and add Modbus buses in the config file.")
app.add_typer(bus_app, name="bus")

T = TypeVar("T")

_SCAN_TIMEOUT_S = {"tcp": 0.3, "rtu": 0.3, "rtu_over_tcp": 1.0}
# Unit id 248 is reserved (Modbus over serial line V1.02, 2.2): no device can have it, so an answer with data
# there means the server ignores the unit id and every "found" id is the same device.
_CANARY_UNIT = 248
# This many ids in a row giving the very same data is one device answering for all of them, not a bus of
# identical devices that all happen to hold the same value (and the scan says so, rather than staying silent).
_SAME_ANSWER_RUN = 8
_MAX_REGISTERS = 125
_MAX_BITS = 2000
_BIT_TABLES = ("coil", "discrete_input")


class TableName(enum.StrEnum):
    coil = "coil"
    discrete_input = "discrete_input"
    holding = "holding"
    input = "input"


class WritableTableName(enum.StrEnum):
    coil = "coil"
    holding = "holding"


class TypeName(enum.StrEnum):
    bool = "bool"
    u16 = "u16"
    i16 = "i16"
    u32 = "u32"
    i32 = "i32"
    u64 = "u64"
    i64 = "i64"
    f32 = "f32"
    f64 = "f64"


class Order(enum.StrEnum):
    big = "big"
    little = "little"


class Parity(enum.StrEnum):
    N = "N"
    E = "E"
    O = "O"  # noqa: E741 - the parity letter installers know


class Kind(enum.StrEnum):
    gate = "gate"
    charger = "charger"
    relay = "relay"
    device = "device"


class BusKind(enum.StrEnum):
    tcp = "tcp"
    rtu = "rtu"
    rtu_over_tcp = "rtu_over_tcp"


# --- the target: a configured bus or an ad-hoc address -----------------------------------------------

_TARGET = "Target (one of --bus, --host, --serial)"
BusOption = typer.Option(None, "--bus", help="a bus under modbus.buses in the config file", rich_help_panel=_TARGET)
HostOption = typer.Option(None, "--host", help="Modbus TCP server, or a TCP converter with --rtu-over-tcp",
                          rich_help_panel=_TARGET)
PortOption = typer.Option(502, "--port", min=1, max=65535, help="TCP port", rich_help_panel=_TARGET)
RtuOverTcpOption = typer.Option(False, "--rtu-over-tcp", help="RTU frames through a TCP converter/DTU",
                                rich_help_panel=_TARGET)
SerialOption = typer.Option(None, "--serial", metavar="DEVICE", help="serial line, e.g. /dev/ttyUSB0",
                            rich_help_panel=_TARGET)
BaudOption = typer.Option(9600, "--baud", help="serial speed", rich_help_panel=_TARGET)
ParityOption = typer.Option(Parity.N, "--parity", case_sensitive=False, help="serial parity",
                            rich_help_panel=_TARGET)
StopbitsOption = typer.Option(1, "--stopbits", min=1, max=2, help="serial stop bits", rich_help_panel=_TARGET)
TimeoutOption = typer.Option(None, "--timeout", min=0.01, max=30.0, metavar="SECONDS",
                             help="wait this long for an answer (default: the bus's own)", rich_help_panel=_TARGET)
UnitOption = typer.Option(..., "--unit", "-u", min=0, max=255, help="unit (slave) id")
WordOrderOption = typer.Option(Order.big, "--word-order", help="big: first register is the high word (ABCD)")
ByteOrderOption = typer.Option(Order.big, "--byte-order", help="byte order within a register (big = Modbus)")
ScaleOption = typer.Option(1.0, "--scale", help="value = raw * scale")
ProfileOption = typer.Option(None, "--profile", "-p", metavar="MODEL",
                             help="a shipped device model ('edgeagent modbus profiles') or a profile file")


@dataclass(frozen=True, slots=True)
class Target:
    bus: ModbusBusConfig
    base: Path  # where relative profile paths are looked up


def target(*, bus: str | None, host: str | None, port: int, rtu_over_tcp: bool, serial: str | None, baud: int,
           parity: Parity, stopbits: int, timeout: float | None, config: Path | None) -> Target:
    """The bus to talk on, from ``--bus`` (the config file) or an ad-hoc address."""
    given = [name for name, v in (("--bus", bus), ("--host", host), ("--serial", serial)) if v]
    if len(given) != 1:
        fail("give the target as exactly one of --bus ID, --host HOST or --serial DEVICE"
             + (f" (got {', '.join(given)})" if given else ""))
    update: dict[str, Any] = {} if timeout is None else {"timeout_s": timeout}
    if bus:
        path, cfg = load_or_exit(config)
        buses = _buses(cfg)
        if bus not in buses:
            known = ", ".join(sorted(buses)) or "none; add one with 'edgeagent modbus bus add'"
            fail(escape(f"no bus {bus!r} under modbus.buses in {path} (buses: {known})"))
        bus_cfg = buses[bus]
        if bus_cfg.name is None:
            update["name"] = bus
        return Target(bus_cfg.model_copy(update=update), path.parent)
    raw: dict[str, Any]
    if host:
        raw = {"kind": "rtu_over_tcp" if rtu_over_tcp else "tcp", "host": host, "port": port}
    else:
        raw = {"kind": "rtu", "serial_port": serial}
    raw |= {"baudrate": baud, "parity": parity.value, "stopbits": stopbits} | update
    return Target(_bus_config(raw), Path.cwd())


def _bus_config(raw: dict[str, Any]) -> ModbusBusConfig:
    try:
        return ModbusBusConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'bus'}: {e['msg']}" for e in exc.errors())
        fail(escape(f"invalid bus settings: {problems}"))


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """The bus logs state changes for the daemon's journal; here the command reports them itself."""
    loggers = [logging.getLogger(n) for n in ("edgeagent.drivers.modbus", "pymodbus")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _buses(cfg: Config) -> dict[str, ModbusBusConfig]:
    section = MODBUS.section_of(cfg)
    return dict(section.buses) if section is not None else {}


def _run(coro: Coroutine[Any, Any, T]) -> T:
    with _quiet_logs():
        return asyncio.run(coro)


def _open_bus(cfg: ModbusBusConfig) -> ModbusBus:
    from edgeagent.drivers.modbus.bus import ModbusBus  # noqa: PLC0415 - keeps `edgeagent --help` fast

    return ModbusBus(cfg)


def _load_profile(name: str, base: Path) -> Profile:
    from edgeagent.drivers.modbus.service import resolve_profile  # noqa: PLC0415

    try:
        return resolve_profile(name, base)
    except ConfigError as exc:
        fail(escape(str(exc)))


def _spec(value_type: TypeName | None, table: str, word_order: Order, byte_order: Order, scale: float) -> ValueSpec:
    from edgeagent.drivers.modbus.codec import CodecError, ValueSpec  # noqa: PLC0415

    vt = value_type.value if value_type is not None else ("bool" if table in _BIT_TABLES else "u16")
    if table in _BIT_TABLES and vt != "bool":
        fail(f"a {table} holds one bit: --type can only be bool")
    try:
        return ValueSpec(vt, word_order.value, byte_order.value, scale)  # type: ignore[arg-type]
    except CodecError as exc:
        fail(escape(str(exc)))


def _plain(value: PointValue | None) -> Any:
    """JSON-safe (NaN and infinities as text)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# --- scan ---------------------------------------------------------------------------------------------

def parse_units(text: str, *, low: int = 1, high: int = 247) -> list[int]:
    """``1-247``, ``1,3,10-12``: unit ids in the order given, each once."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        first, sep, last = part.partition("-")
        try:
            lo, hi = int(first), int(last) if sep else int(first)
        except ValueError:
            raise typer.BadParameter(f"{part!r}: expected N or N-M", param_hint="'--units'") from None
        if not low <= lo <= hi <= high:
            raise typer.BadParameter(f"{part!r}: unit ids are {low}..{high}, low to high", param_hint="'--units'")
        out.extend(u for u in range(lo, hi + 1) if u not in out)
    if not out:
        raise typer.BadParameter("no unit ids given", param_hint="'--units'")
    return out


async def _scan(cfg: ModbusBusConfig, units: list[int], table: str, address: int,
                progress: Progress | None) -> tuple[list[dict[str, Any]], str | None]:
    """Each id's row, and a warning when the server evidently answers for any unit id (else None)."""
    rows: list[dict[str, Any]] = []
    task = progress.add_task("scanning", total=len(units)) if progress is not None else None
    async with _open_bus(cfg) as bus:
        for unit in units:
            if progress is not None and task is not None:
                progress.update(task, description=f"unit {unit}")
            rows.append(await _scan_one(bus, unit, table, address))
            if progress is not None and task is not None:
                progress.advance(task)
        canary = next((r for r in rows if r["unit"] == _CANARY_UNIT), None)
        if canary is None and any(r["value"] is not None for r in rows):
            canary = await _scan_one(bus, _CANARY_UNIT, table, address)
    return rows, _any_unit_warning(rows, canary)


async def _scan_one(bus: ModbusBus, unit: int, table: str, address: int) -> dict[str, Any]:
    from edgeagent.drivers.modbus.bus import ExceptionResponseError, Priority  # noqa: PLC0415

    row: dict[str, Any] = {"unit": unit, "answered": False, "how": "silent", "exception_code": None,
                           "latency_ms": None, "value": None}
    started = time.perf_counter()
    try:
        values = await bus.read(unit, table, address, 1, priority=Priority.COMMAND)  # type: ignore[call-overload]
    except ExceptionResponseError as exc:
        row["exception_code"] = exc.code
        row["how"] = _exception_text(exc)
        # A gateway saying its target did not respond: nobody is at that id.
        row["answered"] = exc.code not in _GATEWAY_CODES
    except DeviceProtocolError as exc:
        row["answered"] = True
        row["how"] = f"garbled answer ({str(exc).rpartition(': ')[2]})"
    except DeviceUnavailable as exc:
        if not bus.connected:
            fail(escape(_unavailable(bus, unit, exc)))
    else:
        row["answered"] = True
        word = int(values[0])
        row["value"] = word
        row["how"] = f"{table} {address} = {word}" + ("" if table in _BIT_TABLES else f" (0x{word:04X})")
    if row["answered"]:
        row["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return row


def _any_unit_warning(rows: list[dict[str, Any]], canary: dict[str, Any] | None) -> str | None:
    """Why the answers look like one server answering for every unit id, or None."""
    found = sum(1 for r in rows if r["answered"])
    if canary is not None and canary["value"] is not None:
        return (f"unit {_CANARY_UNIT}, an id no device can have, answered too ({canary['how']}): this server "
                f"answers for any unit id, so the {found} ids found are most likely ONE device (a device or "
                "gateway that ignores the unit id, or a simulator). Configure one unit id for it; do not add "
                "a device per id.")
    run, longest, previous = 0, 0, None
    for r in sorted(rows, key=lambda r: r["unit"]):
        same = r["value"] is not None and previous is not None and r["value"] == previous["value"] \
            and r["unit"] == previous["unit"] + 1
        run = run + 1 if same else (1 if r["value"] is not None else 0)
        longest = max(longest, run)
        previous = r
    if longest >= _SAME_ANSWER_RUN:
        return (f"{longest} consecutive unit ids answered with exactly the same data: probably one device or "
                f"gateway answering for every unit id rather than {longest} devices. Check a few with "
                "'edgeagent modbus read --unit N' (an identity or serial-number register tells them apart).")
    return None


@app.command("scan")
def scan(
    units: str = typer.Option("1-247", "--units", help="unit ids to try, e.g. 1-247 or 1,2,10-20"),
    table: Annotated[TableName, typer.Option("--table", help="table of the register read at each id")] = (
        TableName.holding),
    address: int = typer.Option(0, "--address", min=0, max=65535, help="0-based address of that register"),
    show_all: bool = typer.Option(False, "--all", help="list the silent ids too"),
    as_json: bool = JsonOption,
    bus: str | None = BusOption, host: str | None = HostOption, port: int = PortOption,
    rtu_over_tcp: bool = RtuOverTcpOption, serial: str | None = SerialOption, baud: int = BaudOption,
    parity: Parity = ParityOption, stopbits: int = StopbitsOption, timeout: float | None = TimeoutOption,
    config: Path | None = ConfigOption,
) -> None:
    """Find which unit ids answer on a bus: one register read at each id, one id at a time.

    An exception response means a device is there (it answered, only not with data); silence means
    nothing is, and so does a gateway's "target failed to respond" (0x0A/0x0B). Each id waits at most
    0.3 s (1 s over RTU-over-TCP) unless --timeout says otherwise; nothing is retried.
    """
    tgt = target(bus=bus, host=host, port=port, rtu_over_tcp=rtu_over_tcp, serial=serial, baud=baud,
                 parity=parity, stopbits=stopbits, timeout=timeout, config=config)
    ids = parse_units(units, high=255 if tgt.bus.kind == "tcp" else 247)
    # Short waits, no retries, and no reconnecting after a run of silent ids (they are expected here).
    cfg = tgt.bus.model_copy(update={
        "timeout_s": timeout or min(tgt.bus.response_timeout_s, _SCAN_TIMEOUT_S[tgt.bus.kind]),
        "retries": 0, "drop_after_silent": 1000})
    err_console.print(f"scanning {len(ids)} unit ids on {escape(cfg.label)} ({table.value} {address}, "
                      f"{cfg.response_timeout_s:g} s per silent id)")
    progress = Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=err_console, transient=True)
    with progress:
        rows, warning = _run(_scan(cfg, ids, table.value, address, progress))
    found = [r for r in rows if r["answered"]]
    if as_json:
        print_json({"bus": cfg.label, "table": table.value, "address": address, "units": rows,
                    "answers_any_unit_id": warning is not None, "warning": warning})
        return
    suspect = " [bold yellow](probably one device answering for every id: see the warning below)[/]" if warning else ""
    t = Table(title=f"{len(found)} of {len(rows)} unit ids answered on {escape(cfg.label)}{suspect}",
              title_justify="left")
    for col, justify in (("unit", "right"), ("answered", "left"), ("how", "left"), ("latency ms", "right")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows if show_all else found:
        t.add_row(str(r["unit"]), "[green]yes[/]" if r["answered"] else "[dim]no[/]", escape(r["how"]),
                  "-" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}")
    console.print(t)
    by_code: dict[int, int] = {}
    for r in found:
        if r["exception_code"] is not None:
            by_code[r["exception_code"]] = by_code.get(r["exception_code"], 0) + 1
    if warning is not None:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    for code, n in by_code.items():
        if n >= 3:
            console.print(f"[yellow]note:[/] {n} ids answered with exception 0x{code:02X}: some servers (pymodbus, "
                          "some gateways) answer so for ids with no device behind them; check one with "
                          "'edgeagent modbus read'", soft_wrap=True)


# --- read ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _OneShot:
    """A point to read once (the read planner's view: one group, whatever its poll interval)."""

    point: Point
    table: TableLiteral
    address: int
    count: int
    poll_interval_s: float = 0.0


def _select(profile: Profile, names: Sequence[str]) -> list[Point]:
    if not names:
        return [p for p in profile.points() if p.poll]
    out: list[Point] = []
    for name in names:
        matched = [p for p in profile.points() if p.name == name] or [p for p in profile.points() if p.key == name]
        if not matched:
            known = ", ".join(dict.fromkeys(p.key for p in profile.points()))
            fail(escape(f"{profile.model} has no point {name!r} (points: {known}; per-port ones also as "
                        "PREFIXn_NAME, e.g. port3_temperature)"))
        out.extend(p for p in matched if p not in out)
    return out


async def _read_points(cfg: ModbusBusConfig, unit: int, profile: Profile, points: list[Point]
                       ) -> tuple[dict[str, PointValue], list[str]]:
    from edgeagent.drivers.modbus.bus import ExceptionResponseError, Priority  # noqa: PLC0415
    from edgeagent.drivers.modbus.codec import CodecError  # noqa: PLC0415
    from edgeagent.drivers.modbus.profile import plan_reads  # noqa: PLC0415

    plan = plan_reads([_OneShot(p, p.table, p.address, p.count) for p in points], max_regs=profile.reads.max_regs,
                      max_bits=profile.reads.max_bits, max_gap=profile.reads.max_gap)
    values: dict[str, PointValue] = {}
    errors: list[str] = []
    unanswered: list[str] = []
    async with _open_bus(cfg) as bus:
        for block in plan:
            span = f"{block.table} {block.address}+{block.count}"
            try:
                words = await bus.read(unit, block.table, block.address, block.count, priority=Priority.COMMAND)
            except ExceptionResponseError as exc:
                errors.append(f"{span}: {_exception_text(exc)}")
                continue
            except DeviceProtocolError as exc:
                errors.append(f"{span}: {exc}")
                continue
            except DeviceUnavailable as exc:
                if not bus.connected:
                    fail(escape(_unavailable(bus, unit, exc)))
                unanswered.append(_unavailable(bus, unit, exc))
                continue
            ints = [int(w) for w in words]
            try:
                for item, part in block.split(ints):
                    values[item.point.name] = item.point.decode(part)
            except CodecError as exc:
                errors.append(f"{span}: {exc}")
        if unanswered and not values and not errors:
            fail(escape(unanswered[0]))
    return values, errors + unanswered


def _profile_tables(profile: Profile, unit: int, points: list[Point], values: dict[str, PointValue]) -> None:
    station = [p for p in points if p.port is None]
    if station:
        t = Table(title=f"{escape(profile.model)} at unit {unit}", title_justify="left")
        for col in ("point", "value", "register"):
            t.add_column(col)
        for p in station:
            t.add_row(escape(p.name), escape(show(values.get(p.name), p.unit)), f"{p.table} {p.address}")
        console.print(t)
    ported = [p for p in points if p.port is not None]
    if not ported:
        return
    ports = sorted({p.port for p in ported if p.port is not None})
    keys = list(dict.fromkeys(p.key for p in ported))
    by = {(p.key, p.port): p for p in ported}
    prefix = profile.ports.prefix if profile.ports is not None else "port"
    console.print(f"[italic]{escape(profile.model)} at unit {unit}, per {prefix}[/]", soft_wrap=True)
    t = Table(box=None, pad_edge=False, collapse_padding=True, header_style="bold underline")
    t.add_column("point", no_wrap=True)
    for port in ports:
        t.add_column(str(port), justify="right")
    for key in keys:
        first = next(p for p in ported if p.key == key)
        cells = []
        for port in ports:
            cell = by.get((key, port))
            cells.append("" if cell is None else escape(show(values.get(cell.name))))
        t.add_row(escape(f"{key} ({first.unit})" if first.unit else key), *cells)
    console.print(t)


def _raw_table(table: str, address: int, words: list[int], spec: ValueSpec | None) -> list[dict[str, Any]]:
    from edgeagent.drivers.modbus.codec import CodecError, decode  # noqa: PLC0415

    rows: list[dict[str, Any]] = []
    width = spec.count if spec is not None else 1
    for i in range(0, len(words), width):
        part = words[i:i + width]
        row: dict[str, Any] = {"address": address + i, "words": part}
        if table not in _BIT_TABLES:
            row["hex"] = [f"0x{w:04X}" for w in part]
        if spec is not None:
            try:
                row["value"] = _plain(decode(part, spec))
            except CodecError as exc:
                row["value"] = None
                row["error"] = str(exc)
        rows.append(row)
    return rows


@app.command("read")
def read(
    unit: int = UnitOption,
    table: Annotated[TableName, typer.Option("--table", help="raw read: which table")] = TableName.holding,
    address: int | None = typer.Option(None, "--address", min=0, max=65535, help="raw read: 0-based address"),
    count: int = typer.Option(1, "--count", min=1, help="raw read: how many values (registers, bits, or values "
                              "of --type)"),
    value_type: Annotated[TypeName | None, typer.Option("--type", help="raw read: decode as this type")] = None,
    word_order: Order = WordOrderOption, byte_order: Order = ByteOrderOption, scale: float = ScaleOption,
    profile_name: str | None = ProfileOption,
    point_names: Annotated[list[str] | None, typer.Option(
        "--point", metavar="NAME", help="with --profile: only this point (port3_temperature, or temperature for "
        "every port); repeat for more")] = None,
    as_json: bool = JsonOption,
    bus: str | None = BusOption, host: str | None = HostOption, port: int = PortOption,
    rtu_over_tcp: bool = RtuOverTcpOption, serial: str | None = SerialOption, baud: int = BaudOption,
    parity: Parity = ParityOption, stopbits: int = StopbitsOption, timeout: float | None = TimeoutOption,
    config: Path | None = ConfigOption,
) -> None:
    """Read registers raw (--table/--address/--count, with hex) or decoded by a device profile (--profile)."""
    tgt = target(bus=bus, host=host, port=port, rtu_over_tcp=rtu_over_tcp, serial=serial, baud=baud,
                 parity=parity, stopbits=stopbits, timeout=timeout, config=config)
    if unit == 0 and tgt.bus.kind != "tcp":
        fail("unit 0 is the broadcast address of a serial line: it is written to, never read")
    if profile_name is not None:
        if address is not None:
            fail("give either --profile (decoded points) or --address (raw registers), not both")
        profile = _load_profile(profile_name, tgt.base)
        points = _select(profile, point_names or [])
        values, errors = _run(_read_points(tgt.bus, unit, profile, points))
        if as_json:
            print_json({
                "unit": unit, "profile": profile.model,
                "points": {p.name: {"value": _plain(values.get(p.name)), "unit": p.unit, "port": p.port, "key": p.key,
                                    "table": p.table, "address": p.address} for p in points if p.name in values},
                "errors": errors,
            })
        else:
            _profile_tables(profile, unit, [p for p in points if p.name in values], values)
            for e in errors:
                err_console.print(f"[red]{escape(e)}[/]", soft_wrap=True)
        if errors:
            raise typer.Exit(1)
        return
    if point_names:
        fail("--point needs --profile")
    if address is None:
        fail("give --address (and --table, --count) for a raw read, or --profile MODEL for decoded points")
    spec = _spec(value_type, table.value, word_order, byte_order, scale) if value_type is not None or scale != 1 \
        else None
    total = count * (spec.count if spec is not None else 1)
    limit = _MAX_BITS if table.value in _BIT_TABLES else _MAX_REGISTERS
    if total > limit or address + total > 0x10000:
        fail(f"one read takes at most {limit} {'bits' if limit == _MAX_BITS else 'registers'} within 0..65535 "
             f"(asked for {total} from {address})")
    words = _run(_read_raw(tgt.bus, unit, table.value, address, total))
    rows = _raw_table(table.value, address, words, spec)
    if as_json:
        print_json({"unit": unit, "table": table.value, "address": address, "type": spec.type if spec else None,
                    "words": words, "values": rows})
        return
    t = Table(title=f"unit {unit} {table.value} {address}+{total}"
                    + (f" as {spec.describe()}" if spec is not None else ""), title_justify="left")
    t.add_column("address", justify="right")
    if table.value in _BIT_TABLES:
        t.add_column("bit", justify="right")
    else:
        t.add_column("registers", justify="right")
        t.add_column("hex", justify="right")
    if spec is not None:
        t.add_column("value", justify="right")
    for r in rows:
        cells = [str(r["address"])]
        if table.value in _BIT_TABLES:
            cells.append(" ".join(str(w) for w in r["words"]))
        else:
            cells += [" ".join(str(w) for w in r["words"]), " ".join(r["hex"])]
        if spec is not None:
            cells.append(escape(r.get("error") or show(r["value"])))
        t.add_row(*cells)
    console.print(t)


async def _read_raw(cfg: ModbusBusConfig, unit: int, table: str, address: int, count: int) -> list[int]:
    from edgeagent.drivers.modbus.bus import ExceptionResponseError, Priority  # noqa: PLC0415

    async with _open_bus(cfg) as bus:
        try:
            words = await bus.read(unit, table, address, count, priority=Priority.COMMAND)  # type: ignore[call-overload]
        except ExceptionResponseError as exc:
            fail(escape(f"unit {unit} answered {table} {address}+{count} with {_exception_text(exc)}"))
        except DeviceUnavailable as exc:
            fail(escape(_unavailable(bus, unit, exc)))
        except DeviceProtocolError as exc:
            fail(escape(str(exc)))
        except ValueError as exc:
            fail(escape(str(exc)))
    return [int(w) for w in words]


# --- write --------------------------------------------------------------------------------------------

def parse_value(text: str, *, want_bool: bool = False, states: Sequence[str] = ()) -> Value | str:
    """What --value says: a state name, true/false/on/off, an integer (0x.. too) or a decimal number."""
    word = text.strip()
    if word in states:
        return word
    lowered = word.lower()
    if lowered in ("true", "on", "yes") or (want_bool and lowered == "1"):
        return True
    if lowered in ("false", "off", "no") or (want_bool and lowered == "0"):
        return False
    try:
        return int(word, 0)
    except ValueError:
        pass
    try:
        return float(word)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number, true/false"
                                 + (f" or one of {', '.join(states)}" if states else ""),
                                 param_hint="'--value'") from None


@dataclass(frozen=True, slots=True)
class _Write:
    table: str
    address: int
    value: PointValue
    words: list[int]
    spec: ValueSpec
    point: Point | None = None

    def decode(self, words: Sequence[int]) -> PointValue:
        from edgeagent.drivers.modbus.codec import decode  # noqa: PLC0415

        return self.point.decode(words) if self.point is not None else decode(words, self.spec)

    def describe(self) -> str:
        what = f"{self.point.name} ({self.table} {self.address})" if self.point else f"{self.table} {self.address}"
        regs = "" if self.table in _BIT_TABLES else f" = registers {' '.join(f'0x{w:04X}' for w in self.words)}"
        return f"{what} := {show(self.value, self.point.unit if self.point else None)}{regs}"


def _plan_write(table: WritableTableName, address: int | None, value_text: str, value_type: TypeName | None,
                word_order: Order, byte_order: Order, scale: float, profile: Profile | None,
                point_name: str | None) -> _Write:
    from edgeagent.drivers.modbus.codec import CodecError, encode  # noqa: PLC0415

    if profile is not None:
        if point_name is None or address is not None:
            fail("with --profile, name the register with --point (and no --address)")
        try:
            point = profile.point(point_name)
        except KeyError as exc:
            fail(escape(str(exc.args[0])))
        if not point.writable:
            fail(escape(f"{profile.model}: {point.name} is not writable"))
        value = parse_value(value_text, want_bool=point.spec.type == "bool", states=[n for _, n in point.states])
        try:
            words = point.encode(value)
        except CodecError as exc:
            fail(escape(str(exc)))
        return _Write(point.table, point.address, value, words, point.spec, point)
    if point_name is not None:
        fail("--point needs --profile")
    if address is None:
        fail("give --address (and --table) of the register or coil to write")
    spec = _spec(value_type, table.value, word_order, byte_order, scale)
    raw = parse_value(value_text, want_bool=spec.type == "bool")
    try:
        if isinstance(raw, str):
            raise CodecError(f"{raw!r} is not a number")  # noqa: TRY301 - reported as one codec error below
        words = encode(raw, spec)
    except CodecError as exc:
        fail(escape(f"cannot write {value_text!r} as {spec.describe()}: {exc}"))
    return _Write(table.value, address, raw, words, spec)


async def _write(cfg: ModbusBusConfig, unit: int, plan: _Write, multiple: bool
                 ) -> tuple[PointValue | None, str | None]:
    """Write, then read back: (the value read back, or None and why not)."""
    from edgeagent.drivers.modbus.bus import ExceptionResponseError, Priority  # noqa: PLC0415
    from edgeagent.drivers.modbus.codec import CodecError  # noqa: PLC0415

    values: list[int] | list[bool] = [bool(w) for w in plan.words] if plan.table == "coil" else list(plan.words)
    async with _open_bus(cfg) as bus:
        try:
            await bus.write(unit, plan.table, plan.address, values, priority=Priority.COMMAND,  # type: ignore[arg-type]
                            multiple=multiple)
        except ExceptionResponseError as exc:
            fail(escape(f"unit {unit} refused the write: {_exception_text(exc)}"))
        except DeviceUnavailable as exc:
            fail(escape(_unavailable(bus, unit, exc) + "; the write may or may not have been applied"))
        except DeviceProtocolError as exc:
            fail(escape(f"{exc}; the write may or may not have been applied"))
        if unit == 0 and cfg.kind != "tcp":
            return None, "a broadcast: no device answers, nothing to read back"
        try:
            back = await bus.read(unit, plan.table, plan.address, len(plan.words),  # type: ignore[call-overload]
                                  priority=Priority.COMMAND)
            return plan.decode([int(w) for w in back]), None
        except (EdgeagentError, CodecError) as exc:
            return None, f"cannot read back: {str(exc).removeprefix(f'{bus.name}: ')}"


@app.command("write")
def write(
    unit: int = UnitOption,
    table: Annotated[WritableTableName, typer.Option("--table", help="coil or holding register")] = (
        WritableTableName.holding),
    address: int | None = typer.Option(None, "--address", min=0, max=65535, help="0-based address"),
    value_text: str = typer.Option(..., "--value", metavar="VALUE",
                                   help="a number (0x.. too), true/false, or a state name with --profile"),
    value_type: Annotated[TypeName | None, typer.Option(
        "--type", help="encode as this type (default u16, bool for coils)")] = None,
    word_order: Order = WordOrderOption, byte_order: Order = ByteOrderOption, scale: float = ScaleOption,
    profile_name: str | None = ProfileOption,
    point_name: str | None = typer.Option(None, "--point", metavar="NAME", help="with --profile: the register"),
    multiple: bool = typer.Option(False, "--multiple", help="use function 15/16 even for one value"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
    as_json: bool = JsonOption,
    bus: str | None = BusOption, host: str | None = HostOption, port: int = PortOption,
    rtu_over_tcp: bool = RtuOverTcpOption, serial: str | None = SerialOption, baud: int = BaudOption,
    parity: Parity = ParityOption, stopbits: int = StopbitsOption, timeout: float | None = TimeoutOption,
    config: Path | None = ConfigOption,
) -> None:
    """Write a coil or holding register(s), then read it back. Asks first: this can move gates and relays."""
    tgt = target(bus=bus, host=host, port=port, rtu_over_tcp=rtu_over_tcp, serial=serial, baud=baud,
                 parity=parity, stopbits=stopbits, timeout=timeout, config=config)
    profile = _load_profile(profile_name, tgt.base) if profile_name is not None else None
    plan = _plan_write(table, address, value_text, value_type, word_order, byte_order, scale, profile, point_name)
    where = f"unit {unit} on {tgt.bus.label}"
    if not yes and not typer.confirm(f"write {plan.describe()} to {where}? this may move physical equipment",
                                     err=True):
        err_console.print("nothing written")
        raise typer.Exit(1)
    back, why = _run(_write(tgt.bus, unit, plan, multiple))
    if as_json:
        print_json({"unit": unit, "table": plan.table, "address": plan.address, "value": _plain(plan.value),
                    "words": plan.words, "read_back": _plain(back), "read_back_error": why})
        return
    console.print(f"wrote {escape(plan.describe())} to {escape(where)}", soft_wrap=True)
    if why is not None:
        console.print(f"[yellow]{escape(why)}[/]", soft_wrap=True)
        return
    note = "" if back == plan.value else " [yellow](differs: the device changed or refused it)[/]"
    console.print(f"read back: {escape(show(back, plan.point.unit if plan.point else None))}{note}")


# --- profiles -----------------------------------------------------------------------------------------

@app.command("profiles")
def profiles(
    model: str | None = typer.Argument(None, help="show this model's registers and commands"),
    as_json: bool = JsonOption,
) -> None:
    """The device models shipped with edgeagent (what --profile and the config's 'profile' accept)."""
    from edgeagent.drivers.modbus.profile import ProfileError, shipped_profile, shipped_profiles  # noqa: PLC0415

    if model is not None:
        try:
            prof = shipped_profile(model)
        except ProfileError as exc:
            fail(escape(str(exc)))
        _profile_detail(prof, as_json)
        return
    rows: list[dict[str, Any]] = [{"model": p.model, "vendor": p.vendor, "description": p.description,
             "ports": p.ports.count if p.ports is not None else 0, "points": len(p.points()),
             "default_unit_id": p.defaults.unit_id, "commands": list(p.commands)}
            for p in shipped_profiles().values()]
    if as_json:
        print_json(rows)
        return
    t = Table(title=f"{len(rows)} shipped device models", title_justify="left")
    for col in ("model", "ports", "description", "commands"):
        t.add_column(col, ratio=2 if col in ("description", "commands") else None)
    for r in rows:
        t.add_row(escape(r["model"]), str(r["ports"] or "-"), escape(r["description"]),
                  escape(", ".join(r["commands"])))
    console.print(t)


def _profile_detail(prof: Profile, as_json: bool) -> None:
    regs: list[dict[str, Any]] = [
        {"name": p.name, "table": p.table, "address": p.address, "type": p.spec.describe(), "unit": p.unit,
         "writable": p.writable, "polled": p.poll, "states": dict(p.states) or None}
        for p in prof.points() if p.port in (None, 1)]
    cmds: dict[str, dict[str, Any]] = {name: {"description": c.description, "args": list(c.args)}
                                       for name, c in prof.commands.items()}
    if as_json:
        print_json({"model": prof.model, "vendor": prof.vendor, "description": prof.description,
                    "ports": prof.ports.count if prof.ports else 0, "registers": regs, "commands": cmds})
        return
    console.print(f"[bold]{escape(prof.model)}[/] ({escape(prof.vendor)}): {escape(prof.description)}")
    if prof.ports is not None:
        console.print(f"{prof.ports.count} ports; per-port registers are shown for port 1")
    t = Table(title="registers", title_justify="left")
    for col in ("name", "register", "type", "unit", "access"):
        t.add_column(col)
    for r in regs:
        access = "read/write" if r["writable"] else "read" if r["polled"] else "write-only"
        t.add_row(escape(r["name"]), f"{r['table']} {r['address']}", escape(r["type"]), escape(r["unit"] or ""), access)
    console.print(t)
    c = Table(title="commands", title_justify="left")
    for col in ("command", "arguments", "description"):
        c.add_column(col)
    for name, cmd in cmds.items():
        c.add_row(escape(name), escape(", ".join(cmd["args"])), escape(cmd["description"] or ""))
    console.print(c)


# --- add (test before configure) ----------------------------------------------------------------------

_OWN_OPTIONS = {"bus": "--bus", "unit_id": "--unit", "profile": "--profile"}


@app.command("add")
def add(
    kind: Annotated[Kind, typer.Argument(help="gate, charger, relay, or device (any model, needs --profile)")],
    *,
    dev_id: str = typer.Option(..., "--id", help="device id, unique on this gateway"),
    bus: str = typer.Option(..., "--bus", help="a bus under modbus.buses in the config file"),
    unit: int = typer.Option(..., "--unit", "-u", min=1, max=247, help="the device's unit (slave) id"),
    profile_name: str | None = typer.Option(None, "--profile", "-p", metavar="MODEL",
                                            help="device model or profile file (default: the kind's generic model)"),
    name: str | None = typer.Option(None, "--name", help="human label, local only"),
    settings: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="another setting, e.g. poll_interval_s=2; repeat for more")] = None,
    no_probe: bool = typer.Option(False, "--no-probe", help="add without testing (the device is not installed yet)"),
    config: Path | None = ConfigOption,
) -> None:
    """Test a device on its bus, then add it to the config file (comments and layout are kept).

    Reads the profile's first register block from the unit; writes nothing when the bus cannot be
    reached, the unit does not answer, or it answers as a different device would.
    """
    dev_type = f"modbus.{kind.value}"
    model = DEVICE_TYPES[dev_type]
    values = devices.parse_set(settings or [], model)
    for key, option in _OWN_OPTIONS.items():
        if key in values:
            raise typer.BadParameter(f"{key!r} is given with {option}", param_hint="'--set'")
    if profile_name is None and kind is Kind.device:
        fail("a generic Modbus device needs --profile MODEL (see 'edgeagent modbus profiles') or a profile file")
    path = config_path(config)
    if profile_name is not None:
        _load_profile(profile_name, path.parent)  # a wrong model name is told as such, not as a dead device
    own: dict[str, Any] = {"bus": bus, "unit_id": unit}
    if profile_name is not None:
        own["profile"] = profile_name
    devices.add_to_config(path, dev_type, dev_id, own | values, name=name, probe=not no_probe)


# --- buses in the config file ------------------------------------------------------------------------

@bus_app.command("list")
def bus_list(config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """The Modbus buses of the config file and the devices on each."""
    path, cfg = load_or_exit(config)
    rows: list[dict[str, Any]] = []
    for bus_id, b in _buses(cfg).items():
        on = [d for d in cfg.devices if isinstance(d, ModbusDeviceBase) and d.bus == bus_id]
        rows.append({"id": bus_id, "kind": b.kind, "address": b.label if b.name is None else b.model_copy(
            update={"name": None}).label, "timeout_s": b.response_timeout_s,
            "devices": [f"{d.id}@{d.unit_id}" for d in on]})
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print(f"no Modbus buses in {escape(str(path))}; add one with [bold]edgeagent modbus bus add ID "
                      "--kind tcp --host HOST[/]")
        return
    t = Table(title=f"{len(rows)} Modbus buses in {escape(str(path))}", title_justify="left")
    for col in ("id", "address", "timeout", "devices (id@unit)"):
        t.add_column(col)
    for r in rows:
        t.add_row(escape(r["id"]), escape(r["address"]), f"{r['timeout_s']:.3g} s", escape(", ".join(r["devices"])))
    console.print(t)


@bus_app.command("add")
def bus_add(
    bus_id: str = typer.Argument(..., metavar="ID", help="bus id devices refer to, e.g. shed-485"),
    *,
    kind: Annotated[BusKind, typer.Option("--kind", help="tcp, rtu (serial line) or rtu_over_tcp (converter/DTU)")],
    host: str | None = typer.Option(None, "--host", help="tcp, rtu_over_tcp: address"),
    port: int | None = typer.Option(None, "--port", min=1, max=65535, help="tcp, rtu_over_tcp: port (502)"),
    serial_port: str | None = typer.Option(None, "--serial", metavar="DEVICE", help="rtu: e.g. /dev/ttyUSB0"),
    baud: int | None = typer.Option(None, "--baud", help="serial speed (9600)"),
    parity: Annotated[Parity | None, typer.Option("--parity", case_sensitive=False, help="serial parity (N)")] = None,
    stopbits: int | None = typer.Option(None, "--stopbits", min=1, max=2, help="serial stop bits (1)"),
    timeout: float | None = typer.Option(None, "--timeout", metavar="SECONDS", help="answer timeout"),
    name: str | None = typer.Option(None, "--name", help="label for logs"),
    config: Path | None = ConfigOption,
) -> None:
    """Add a bus under modbus.buses in the config file (comments and layout are kept)."""
    entry = CommentedMap()
    entry["kind"] = kind.value
    for key, value in (("name", name), ("host", host), ("port", port), ("serial_port", serial_port),
                       ("baudrate", baud), ("parity", parity.value if parity else None), ("stopbits", stopbits),
                       ("timeout_s", timeout)):
        if value is not None:
            entry[key] = value
    _bus_config(dict(entry))  # a plain message for a bad combination, before touching the file
    path = config_path(config)
    old_text, doc = devices.load_doc(path)
    modbus = doc.get("modbus")
    if modbus is None:
        buses = CommentedMap()
        buses[bus_id] = entry
        section = CommentedMap()
        section["buses"] = buses
        _insert_section(doc, "modbus", section)
    elif not isinstance(modbus, CommentedMap):
        fail(escape(f"{path}: 'modbus' is not a section of keys; fix it by hand"))
    else:
        buses = modbus.get("buses")
        if isinstance(buses, CommentedMap) and bus_id in buses:
            fail(escape(f"a bus {bus_id!r} is already in {path}; pick another id"))
        if isinstance(buses, CommentedMap) and config_edit.is_block(buses):
            after = config_edit.take_lines(config_edit.last_slot(buses))
            buses[bus_id] = entry
            config_edit.put_lines(config_edit.last_slot(buses), after)
        else:
            # Missing, null or `buses: {}`: a block in its place; comment lines after it stay after it.
            new = CommentedMap()
            new[bus_id] = entry
            after = config_edit.take_lines((modbus, "buses", 2)) if "buses" in modbus else ""
            modbus["buses"] = new
            config_edit.put_lines(config_edit.last_slot(new), after)
    new_text, _ = devices.validate_edit(path, doc)
    devices.commit_edit(path, old_text, new_text, f"added Modbus bus [bold]{escape(bus_id)}[/] to {escape(str(path))}")


def _insert_section(doc: CommentedMap, key: str, value: CommentedMap) -> None:
    """A new top-level section just before ``devices`` (or at the end). The comment lines that introduced
    what follows go below the new section, with it, so they keep introducing the same thing."""
    keys = list(doc.keys())
    at = keys.index("devices") if "devices" in keys else len(keys)
    if at == 0:
        doc.insert(0, key, value)
        return
    prev = keys[at - 1]
    slot = (config_edit.last_slot(doc[prev]) if config_edit.is_block(doc[prev]) else None) or (doc, prev, 2)
    intro = config_edit.take_lines(slot)
    doc.insert(at, key, value)
    config_edit.put_lines(slot, "\n# Modbus buses: serial lines and TCP links to devices or converters "
                                "(edgeagent modbus bus add).\n")
    config_edit.put_lines(config_edit.last_slot(value), intro)
