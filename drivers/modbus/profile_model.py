"""Device profiles as data: what a Modbus device model holds where, and what its commands write.

A profile is a YAML file, one per device model (shipped ones live in ``profiles/`` next to this
module)::

    model: relay-io-8ch            # the name configs refer to
    vendor: Generic
    description: ...
    defaults: {word_order: big, byte_order: big, poll_interval_s: 1.0, unit_id: 1}
    reads: {max_regs: 125, max_bits: 2000, max_gap: 8}   # per-device read limits (optional)
    ports: {count: 8, stride: 1, prefix: ch}              # optional: repeated channels
    registers:
      - name: relay                # snake_case; per-port registers become ch1_relay .. ch8_relay
        table: coil                # coil | discrete_input | holding | input
        address: 0                 # 0-based protocol address, see below
        per_port: true             # port k sits at address + (k - 1) * stride
        writable: true
        events: [{on: change, event: io.relay_changed}]
    commands:
      pulse:
        args: {channel: {type: port}, duration_s: {type: float, default: 0.5, min: 0.05, max: 30}}
        steps:
          - {write: relay, value: true}
          - {pause_s: {arg: duration_s}}
          - {write: relay, value: false}

Addresses are the 0-based numbers carried in the request PDU, not the 1-based "register numbers" of
many manuals: holding register 40001 is ``table: holding, address: 0``; input register 30011 is
``table: input, address: 10``; discrete input 10001 and coil 00001 are address 0 of their tables.

This module is the profile model: its sections as pydantic models, the expanded view (:class:`Point`,
one per register after port expansion) and the cross-register checks. Loading a file, with each problem
located at its line, is :mod:`edgeagent.drivers.modbus.profile` (which also re-exports this module's
public names); the read planner is :mod:`edgeagent.drivers.modbus.plan`.

Every check that spans registers (overlaps, names after port expansion, commands naming registers)
runs when the profile is validated and raises :class:`ProfileIssues`, each problem with its location,
which the loader turns into ``file:line:col`` messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import (
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    field_validator,
    model_validator,
)

from edgeagent.drivers.modbus.codec import (
    INTEGER_TYPES,
    NUMERIC_TYPES,
    ByteOrder,
    CodecError,
    Value,
    ValueSpec,
    ValueType,
    WordOrder,
    decode,
    encode,
    raw_range,
)
from edgeagent.drivers.modbus.plan import (
    BIT_TABLES,
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    TABLES,
    ReadBlock,
    Table,
    plan_reads,
)
from edgeagent.kernel.config.base import Strict
from edgeagent.kernel.config.yamlerr import LocatedIssues
from edgeagent.kernel.errors import ConfigError

WRITABLE_TABLES: Final[frozenset[str]] = frozenset({"coil", "holding"})
MAX_PAUSE_S: Final = 60.0

_NAME_RE = r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$"
_EVENT_RE = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$"  # as edgeagent.kernel.pipeline.events requires
Name = Annotated[str, Field(pattern=_NAME_RE, max_length=64)]
EventName = Annotated[str, Field(pattern=_EVENT_RE, max_length=96, description="event type, e.g. gate.state_changed")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
PointValue = Value | str  # a state name, for registers with 'states'
Loc = tuple[int | str, ...]


class ProfileError(ConfigError):
    """A profile file is missing, unreadable or invalid. The message names file, line and key."""


class CommandError(ValueError):
    """A command is unknown, or its arguments are missing, unknown or out of range."""


class ProfileIssues(LocatedIssues):
    """Several located problems found by one validator; the loader reports each at its own place."""


# --- sections -------------------------------------------------------------------------------------

class Defaults(Strict):
    word_order: WordOrder = Field(default="big", description="which register of a multi-register value holds "
                                  "the high word: big = the first (ABCD), little = the last (CDAB)")
    byte_order: ByteOrder = Field(default="big", description="byte order within each register (big = Modbus)")
    poll_interval_s: float = Field(default=1.0, gt=0, le=86_400)
    unit_id: int | None = Field(default=None, ge=0, le=255,
                                description="factory unit id (slave address); the device config may override it")


class ReadLimits(Strict):
    max_regs: int = Field(default=MAX_READ_REGISTERS, ge=1, le=MAX_READ_REGISTERS,
                          description="registers per read; some devices accept fewer than the protocol's 125")
    max_bits: int = Field(default=MAX_READ_BITS, ge=1, le=MAX_READ_BITS)
    max_gap: int = Field(default=8, ge=0, le=MAX_READ_REGISTERS - 1,
                         description="unused addresses a read may span to join neighbours; 0 for devices that "
                         "answer 'illegal data address' for unmapped ones")


class Ports(Strict):
    """Repeated channels: a register marked ``per_port`` is defined once for port 1 and repeated."""

    count: int = Field(ge=1, le=64)
    stride: int | dict[Table, int] = Field(
        description="addresses between port k and port k+1: one number for every table, or one per table")
    prefix: str = Field(default="port", pattern=r"^[a-z][a-z0-9]*$",
                        description="expanded names are PREFIX1_NAME .. PREFIXn_NAME")

    @field_validator("stride", mode="before")
    @classmethod
    def _stride(cls, v: Any) -> Any:
        values = v.values() if isinstance(v, Mapping) else [v]
        for n in values:
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 65535:
                raise ValueError(f"a stride is a whole number 1 .. 65535 (got {n!r})")
        return v

    def stride_for(self, table: Table) -> int | None:
        if isinstance(self.stride, int):
            return self.stride
        return self.stride.get(table)

    def name(self, port: int, key: str) -> str:
        return f"{self.prefix}{port}_{key}"


class Telemetry(Strict):
    """Report the value as telemetry when it moved by more than ``deadband`` (absolute, in the scaled
    unit) since the last report, and at least every ``max_interval_s`` (a heartbeat) if set."""

    metric: Name | None = Field(default=None, description="metric name; the register's name if unset")
    deadband: FiniteFloat = Field(default=0.0, ge=0)
    max_interval_s: float | None = Field(default=None, gt=0, le=86_400)


class _Trigger(Strict):
    event: EventName


class OnChange(_Trigger):
    """Any change of the value (of the state name, for registers with states)."""

    on: Literal["change"]


class OnEdge(_Trigger):
    """A bool going true (rising) or false (falling); for a bit field, the named ``bit`` of it."""

    on: Literal["rising", "falling"]
    bit: Name | None = None


class OnState(_Trigger):
    """Entering or leaving one state of a register with ``states``."""

    on: Literal["enter", "leave"]
    state: Name


class OnThreshold(_Trigger):
    """Once when the value goes above (below) ``threshold``; re-armed when it has come back past
    ``threshold - hysteresis`` (``threshold + hysteresis``)."""

    on: Literal["above", "below"]
    threshold: FiniteFloat
    hysteresis: FiniteFloat = Field(default=0.0, ge=0)


EventTrigger = Annotated[OnChange | OnEdge | OnState | OnThreshold, Field(discriminator="on")]


class RegisterDef(Strict):
    """One value as the profile writes it (before port expansion and defaults)."""

    name: Name
    description: str | None = None
    table: Table
    address: int = Field(ge=0, le=65535, description="0-based protocol address (40001 is holding 0)")
    type: ValueType | None = Field(default=None, description="bool for coils and discrete inputs, u16 otherwise")
    word_order: WordOrder | None = None
    byte_order: ByteOrder | None = None
    scale: FiniteFloat = Field(default=1.0, description="value = raw * scale + offset")
    offset: FiniteFloat = 0.0
    unit: str | None = Field(default=None, max_length=16)
    bits: dict[Name, Annotated[int, Field(ge=0, le=15)]] | None = Field(
        default=None, description="type bits: bit name -> bit index (0 = least significant)")
    states: dict[int, Name] | None = Field(default=None, description="raw value -> state name")
    poll: bool = Field(default=True, description="false for write-only registers")
    poll_interval_s: float | None = Field(default=None, gt=0, le=86_400)
    telemetry: Telemetry | None = None
    events: list[EventTrigger] = Field(default_factory=list)
    writable: bool = False
    per_port: bool = False

    @property
    def value_type(self) -> ValueType:
        if self.type is not None:
            return self.type
        return "bool" if self.table in BIT_TABLES else "u16"

    @model_validator(mode="after")
    def _consistent(self) -> RegisterDef:
        issues: list[tuple[Loc, str]] = []
        vt = self.value_type
        if self.table in BIT_TABLES:
            if vt != "bool":
                issues.append((("type",), f"a {self.table} holds one bit: its type can only be bool (got {vt})"))
            for key in ("word_order", "byte_order", "bits", "states"):
                if getattr(self, key) is not None:
                    issues.append(((key,), f"a {self.table} has no {key}"))
        if self.writable and self.table not in WRITABLE_TABLES:
            issues.append((("writable",), f"a {self.table} cannot be written (only coils and holding registers)"))
        if vt not in NUMERIC_TYPES and (self.scale != 1 or self.offset != 0):
            issues.append((("scale" if self.scale != 1 else "offset",), f"type {vt} takes no scale or offset"))
        if self.scale == 0:
            issues.append((("scale",), "scale cannot be 0"))
        if vt == "bits" and not self.bits:
            issues.append((("bits",), "type bits needs 'bits': a map of bit names to bit indices 0 .. 15"))
        if self.bits is not None:
            if vt != "bits":
                issues.append((("bits",), f"'bits' belongs to type bits (this register is {vt})"))
            seen: dict[int, str] = {}
            for bname, index in self.bits.items():
                if index in seen:
                    issues.append((("bits", bname), f"bit {index} is already named {seen[index]!r}"))
                seen[index] = bname
        if self.states is not None:
            issues.extend(self._check_states(vt))
        if self.telemetry is not None and (vt == "bits" or self.states is not None):
            issues.append((("telemetry",), "bit fields and state registers report through 'events', not telemetry"))
        for i, trig in enumerate(self.events):
            issues.extend((("events", i, *loc), msg) for loc, msg in self._check_trigger(trig, vt))
        if issues:
            raise ProfileIssues(issues)
        return self

    def _check_states(self, vt: ValueType) -> list[tuple[Loc, str]]:
        assert self.states is not None
        if vt not in INTEGER_TYPES or self.scale != 1 or self.offset != 0:
            return [(("states",), "'states' needs an integer type without scale or offset")]
        out: list[tuple[Loc, str]] = []
        lo, hi = raw_range(vt)
        names: set[str] = set()
        for raw, sname in self.states.items():
            if not lo <= raw <= hi:
                out.append((("states", str(raw)), f"{raw} does not fit {vt} ({lo} .. {hi})"))
            if sname in names:
                out.append((("states", str(raw)), f"state name {sname!r} is used twice"))
            names.add(sname)
        return out

    def _check_trigger(self, trig: OnChange | OnEdge | OnState | OnThreshold, vt: ValueType) -> list[tuple[Loc, str]]:
        if isinstance(trig, OnEdge):
            if vt == "bits":
                if trig.bit is None:
                    return [(("on",), f"'{trig.on}' on a bit field needs 'bit' (one of: {', '.join(self.bits or {})})")]
                if trig.bit not in (self.bits or {}):
                    return [(("bit",), f"no bit named {trig.bit!r} (known: {', '.join(self.bits or {})})")]
            elif vt != "bool":
                return [(("on",), f"'{trig.on}' needs a bool or a bit of a bit field (this register is {vt})")]
            elif trig.bit is not None:
                return [(("bit",), "'bit' belongs to bit fields")]
        elif isinstance(trig, OnState):
            if self.states is None:
                return [(("on",), f"'{trig.on}' needs 'states' on the register")]
            if trig.state not in self.states.values():
                return [(("state",), f"no state named {trig.state!r} (known: {', '.join(self.states.values())})")]
        elif isinstance(trig, OnThreshold) and (vt not in NUMERIC_TYPES or self.states is not None):
            return [(("on",), f"'{trig.on}' needs a numeric register without states (this register is {vt})")]
        return []


class ArgDef(Strict):
    type: Literal["port", "int", "float", "bool"] = Field(
        description="'port' picks the port of per-port registers, 1 .. ports.count")
    description: str | None = None
    min: FiniteFloat | None = None
    max: FiniteFloat | None = None
    default: bool | int | float | None = None


class ArgRef(Strict):
    arg: Name


def _ref_or_literal(v: Any) -> str:
    return "arg_ref" if isinstance(v, Mapping | ArgRef) else "literal"


# {arg: NAME} or a literal; the discriminator keeps a bad value to one error instead of one per member.
Scalar = bool | int | float | str
ValueOrRef = Annotated[
    Annotated[ArgRef, Tag("arg_ref")] | Annotated[Scalar, Tag("literal")],
    Discriminator(_ref_or_literal),
]
SecondsOrRef = Annotated[
    Annotated[ArgRef, Tag("arg_ref")] | Annotated[float, Field(gt=0, le=MAX_PAUSE_S), Tag("literal")],
    Discriminator(_ref_or_literal),
]


class WriteStep(Strict):
    write: Name = Field(description="register to write: a name as written (per-port ones take the port "
                        "argument) or an expanded one such as port3_relay")
    value: ValueOrRef = Field(description="a number, true/false, a state name, or {arg: NAME} for a command argument")

    @field_validator("value", mode="before")
    @classmethod
    def _value(cls, v: Any) -> Any:
        if isinstance(v, Mapping | ArgRef | bool | int | float | str):
            return v
        raise ValueError(f"a value is a number, true/false, a state name or {{arg: NAME}} (got {type(v).__name__})")


class PauseStep(Strict):
    pause_s: SecondsOrRef = Field(description=f"seconds (at most {MAX_PAUSE_S:g}), or {{arg: NAME}}")

    @field_validator("pause_s", mode="before")
    @classmethod
    def _pause(cls, v: Any) -> Any:
        if isinstance(v, Mapping | ArgRef) or (isinstance(v, int | float) and not isinstance(v, bool)):
            return v
        raise ValueError(f"a pause is a number of seconds or {{arg: NAME}} (got {v!r})")


def _step_kind(v: Any) -> str | None:
    if isinstance(v, Mapping):
        return "write_step" if "write" in v else "pause_step" if "pause_s" in v else None
    if isinstance(v, WriteStep):
        return "write_step"
    return "pause_step" if isinstance(v, PauseStep) else None


Step = Annotated[
    Annotated[WriteStep, Tag("write_step")] | Annotated[PauseStep, Tag("pause_step")],
    Discriminator(_step_kind, custom_error_type="step_kind",
                  custom_error_message="a step is {write: REGISTER, value: VALUE} or {pause_s: SECONDS}"),
]


class CommandDef(Strict):
    description: str | None = None
    args: dict[Name, ArgDef] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)

    @property
    def port_arg(self) -> str | None:
        return next((name for name, a in self.args.items() if a.type == "port"), None)


# --- the expanded view ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Point:
    """One register after port expansion and defaults: everything a poller or writer needs."""

    name: str  # port3_voltage
    key: str  # voltage: the name as the profile writes it
    port: int | None
    table: Table
    address: int
    spec: ValueSpec
    poll: bool
    poll_interval_s: float
    writable: bool
    unit: str | None = None
    description: str | None = None
    telemetry: Telemetry | None = None
    events: tuple[OnChange | OnEdge | OnState | OnThreshold, ...] = ()
    states: tuple[tuple[int, str], ...] = ()

    @property
    def count(self) -> int:
        """Registers (or bits) the point occupies."""
        return self.spec.count

    @property
    def end(self) -> int:
        """Last address occupied (inclusive)."""
        return self.address + self.count - 1

    @property
    def metric(self) -> str:
        return self.telemetry.metric if self.telemetry is not None and self.telemetry.metric else self.key

    def decode(self, words: Sequence[int]) -> PointValue:
        """Words as read -> the value; a state register gives its state name (``unknown:N`` if unmapped)."""
        value = decode(words, self.spec)
        if self.states and isinstance(value, int) and not isinstance(value, bool):
            return dict(self.states).get(value, f"unknown:{value}")
        return value

    def encode(self, value: PointValue) -> list[int]:
        """The value (a state name, for state registers) -> words to write. Raises :class:`CodecError`."""
        if isinstance(value, str):
            by_name = {name: raw for raw, name in self.states}
            if value not in by_name:
                known = f" (known: {', '.join(by_name)})" if by_name else ""
                raise CodecError(f"{self.name}: {value!r} is not a state of this register{known}")
            value = by_name[value]
        return encode(value, self.spec)


@dataclass(frozen=True, slots=True)
class Write:
    """A command step: write ``words`` at the point's table and address (one bit 0/1 for a coil)."""

    point: Point
    value: PointValue
    words: tuple[int, ...]

    @property
    def table(self) -> Table:
        return self.point.table

    @property
    def address(self) -> int:
        return self.point.address


@dataclass(frozen=True, slots=True)
class Pause:
    seconds: float


class Profile(Strict):
    """A device model: its registers, how to read them, and its commands."""

    model: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="model name configs refer to")
    vendor: str = Field(min_length=1)
    description: str = Field(min_length=1)
    defaults: Defaults = Defaults()
    reads: ReadLimits = ReadLimits()
    ports: Ports | None = None
    registers: list[RegisterDef] = Field(min_length=1)
    commands: dict[Name, CommandDef] = Field(default_factory=dict)

    _points: tuple[Point, ...] = PrivateAttr(default=())
    _by_name: Mapping[str, Point] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _cross_checks(self) -> Profile:
        issues: list[tuple[Loc, str]] = []
        expanded = _expand(self, issues)
        _check_layout(expanded, issues)
        self._points = tuple(p for _i, p in expanded)
        self._by_name = {p.name: p for p in self._points}
        _check_commands(self, issues)
        if issues:
            raise ProfileIssues(issues)
        return self

    # -- the expanded view --

    def points(self) -> tuple[Point, ...]:
        """Every register after port expansion, in profile order (port by port for per-port ones)."""
        return self._points

    def point(self, name: str) -> Point:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.model}: no register named {name!r}") from None

    def read_plan(self) -> list[ReadBlock[Point]]:
        """Block reads for every polled point, within this profile's read limits."""
        return plan_reads([p for p in self._points if p.poll], max_regs=self.reads.max_regs,
                          max_bits=self.reads.max_bits, max_gap=self.reads.max_gap)

    def event_types(self) -> frozenset[str]:
        """Every event type the profile can raise (for checking against the event registry)."""
        return frozenset(t.event for r in self.registers for t in r.events)

    # -- commands --

    def command(self, name: str, args: Mapping[str, object] | None = None) -> tuple[Write | Pause, ...]:
        """The writes and pauses of a command, with encoded words. Raises :class:`CommandError`."""
        cmd = self.commands.get(name)
        if cmd is None:
            raise CommandError(f"{self.model} has no command {name!r} (known: {', '.join(self.commands) or 'none'})")
        given = dict(args or {})
        unknown = sorted(set(given) - set(cmd.args))
        if unknown:
            raise CommandError(f"command {name!r} takes no argument {unknown[0]!r} "
                               f"(takes: {', '.join(cmd.args) or 'none'})")
        values: dict[str, bool | int | float] = {}
        for aname, adef in cmd.args.items():
            if aname in given:
                values[aname] = _coerce_arg(aname, adef, given[aname], self.ports)
            elif adef.default is not None:
                values[aname] = adef.default
            else:
                raise CommandError(f"command {name!r} needs argument {aname!r}")
        port_arg = cmd.port_arg
        port = int(values[port_arg]) if port_arg is not None else None
        out: list[Write | Pause] = []
        for step in cmd.steps:
            if isinstance(step, PauseStep):
                seconds = float(values[step.pause_s.arg]) if isinstance(step.pause_s, ArgRef) else step.pause_s
                if not 0 < seconds <= MAX_PAUSE_S:
                    raise CommandError(f"command {name!r}: a pause must be more than 0 and at most {MAX_PAUSE_S:g} s")
                out.append(Pause(seconds))
                continue
            point = self._target(step.write, port)
            assert point is not None  # [1] checked when the profile was validated
            value: PointValue = values[step.value.arg] if isinstance(step.value, ArgRef) else step.value
            try:
                words = point.encode(value)
            except CodecError as exc:
                raise CommandError(f"command {name!r}: {point.name}: {exc}") from exc
            out.append(Write(point, value, tuple(words)))
        return tuple(out)

    def _target(self, register: str, port: int | None) -> Point | None:
        """The point a write step names: a per-port register at ``port``, or any point by name."""
        per_port = next((r for r in self.registers if r.name == register and r.per_port), None)
        if per_port is not None:
            if port is None or self.ports is None:
                return None
            return self._by_name.get(self.ports.name(port, register))
        return self._by_name.get(register)


def _coerce_arg(name: str, adef: ArgDef, value: object, ports: Ports | None) -> bool | int | float:
    if adef.type == "bool":
        if not isinstance(value, bool):
            raise CommandError(f"argument {name!r} must be true or false (got {value!r})")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CommandError(f"argument {name!r} must be a number (got {value!r})")
    number: int | float = value
    lo, hi = adef.min, adef.max
    if adef.type in ("port", "int"):
        if isinstance(value, float):
            if not value.is_integer():
                raise CommandError(f"argument {name!r} must be a whole number (got {value!r})")
            number = int(value)
    else:
        number = float(value)
    if adef.type == "port":
        lo, hi = 1, ports.count if ports is not None else 0
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        bounds = f"{lo if lo is not None else '-inf'} .. {hi if hi is not None else 'inf'}"
        raise CommandError(f"argument {name!r} must be within {bounds} (got {value!r})")
    return number


# --- cross-register checks (each problem located at the register or step it concerns) ---------------

def _expand(profile: Profile, issues: list[tuple[Loc, str]]) -> list[tuple[int, Point]]:
    out: list[tuple[int, Point]] = []
    d = profile.defaults
    for i, reg in enumerate(profile.registers):
        vt = reg.value_type
        try:
            spec = ValueSpec(vt, reg.word_order or d.word_order, reg.byte_order or d.byte_order,
                             reg.scale, reg.offset, tuple((reg.bits or {}).items()))
        except CodecError as exc:  # already reported by the register's own checks
            issues.append((("registers", i), str(exc)))
            continue
        common: dict[str, Any] = {
            "key": reg.name, "table": reg.table, "spec": spec, "poll": reg.poll,
            "poll_interval_s": reg.poll_interval_s or d.poll_interval_s,
            "writable": reg.writable, "unit": reg.unit, "description": reg.description,
            "telemetry": reg.telemetry, "events": tuple(reg.events),
            "states": tuple(sorted((reg.states or {}).items())),
        }
        if not reg.per_port:
            out.append((i, Point(name=reg.name, port=None, address=reg.address, **common)))
            continue
        if profile.ports is None:
            issues.append((("registers", i, "per_port"), "per_port needs a 'ports' section (count and stride)"))
            continue
        stride = profile.ports.stride_for(reg.table)
        if stride is None:
            issues.append((("ports", "stride"), f"no stride for table {reg.table!r}, used by per-port register "
                           f"{reg.name!r} (registers[{i}])"))
            continue
        for port in range(1, profile.ports.count + 1):
            out.append((i, Point(name=profile.ports.name(port, reg.name), port=port,
                                 address=reg.address + (port - 1) * stride, **common)))
    return out


def _where(i: int, p: Point) -> str:
    port = f", port {p.port}" if p.port is not None else ""
    return f"registers[{i}]{port}, {p.table} {p.address}"


def _span(p: Point) -> str:
    return f"{p.table} {p.address}" if p.count == 1 else f"{p.table} {p.address}..{p.end}"


def _check_layout(expanded: list[tuple[int, Point]], issues: list[tuple[Loc, str]]) -> None:
    seen: dict[str, tuple[int, Point]] = {}
    for i, p in expanded:
        if p.name in seen:
            j, q = seen[p.name]
            issues.append((("registers", i, "name"), f"name {p.name!r} is used twice (also {_where(j, q)})"))
        else:
            seen[p.name] = (i, p)
    in_range: list[tuple[int, Point]] = []
    for i, p in expanded:
        if p.end > 65535:
            port = f" (port {p.port})" if p.port is not None else ""
            issues.append((("registers", i, "address"),
                           f"{p.name}{port}: a {p.spec.type} at {p.address} runs past address 65535"))
        else:
            in_range.append((i, p))
    # Overlaps: sweep each table in address order, remembering the point that reaches furthest.
    in_range.sort(key=lambda ip: (TABLES.index(ip[1].table), ip[1].address, ip[0]))
    reach: tuple[int, Point] | None = None
    reported: set[int] = set()
    for i, p in in_range:
        if reach is not None and reach[1].table == p.table and p.address <= reach[1].end:
            j, q = reach
            if i not in reported:  # one report per definition (not eight, for a per-port clash)
                reported.add(i)
                issues.append((("registers", i, "address"),
                               f"{_span(p)} ({p.name!r}) overlaps {q.name!r} ({_where(j, q)})"))
        if reach is None or reach[1].table != p.table or p.end > reach[1].end:
            reach = (i, p)


def _check_commands(profile: Profile, issues: list[tuple[Loc, str]]) -> None:
    for cname, cmd in profile.commands.items():
        base: Loc = ("commands", cname)
        port_args = [a for a, d in cmd.args.items() if d.type == "port"]
        if port_args and profile.ports is None:
            issues.append(((*base, "args", port_args[0], "type"), "a 'port' argument needs a 'ports' section"))
        if len(port_args) > 1:
            issues.append(((*base, "args", port_args[1], "type"), "a command takes at most one 'port' argument"))
        for aname, adef in cmd.args.items():
            if adef.min is not None and adef.max is not None and adef.min > adef.max:
                issues.append(((*base, "args", aname, "min"), "min is larger than max"))
            if adef.default is not None:
                try:
                    _coerce_arg(aname, adef, adef.default, profile.ports)
                except CommandError as exc:
                    issues.append(((*base, "args", aname, "default"), str(exc)))
            if adef.type == "port" and adef.default is not None:
                issues.append(((*base, "args", aname, "default"), "a port argument has no default"))
        port = 1 if cmd.port_arg is not None else None
        for si, step in enumerate(cmd.steps):
            sloc: Loc = (*base, "steps", si)
            if isinstance(step, PauseStep):
                if isinstance(step.pause_s, ArgRef):
                    ref = cmd.args.get(step.pause_s.arg)
                    if ref is None:
                        issues.append(((*sloc, "pause_s"), f"no argument {step.pause_s.arg!r} in this command"))
                    elif ref.type not in ("int", "float"):
                        issues.append(((*sloc, "pause_s"), f"argument {step.pause_s.arg!r} is not a number"))
                continue
            point = profile._target(step.write, port)  # [1]
            if point is None:
                per_port = any(r.name == step.write and r.per_port for r in profile.registers)
                if not per_port:
                    issues.append(((*sloc, "write"), f"no register named {step.write!r}"))
                elif cmd.port_arg is None:
                    issues.append(((*sloc, "write"), f"{step.write!r} is a per-port register: the command needs "
                                   "an argument of type port"))
                continue  # else the register could not be expanded: reported there
            if not point.writable:
                issues.append(((*sloc, "write"), f"register {step.write!r} is not writable (set 'writable: true' "
                               "if the device accepts writes there)"))
            if isinstance(step.value, ArgRef):
                ref = cmd.args.get(step.value.arg)
                if ref is None:
                    issues.append(((*sloc, "value"), f"no argument {step.value.arg!r} in this command"))
                elif (ref.type == "bool") != (point.spec.type == "bool") or point.spec.type == "bits":
                    issues.append(((*sloc, "value"), f"argument {step.value.arg!r} ({ref.type}) cannot be written "
                                   f"to {step.write!r} ({point.spec.type})"))
            else:
                try:
                    point.encode(step.value)
                except CodecError as exc:
                    issues.append(((*sloc, "value"), str(exc)))
