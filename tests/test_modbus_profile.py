"""Modbus device profiles: the shipped ones load and expand, broken ones are reported at the right line,
commands encode their writes, and the block planner stays within the protocol's limits."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.modbus.codec import CodecError
from edgeagent.drivers.modbus.profile import (
    BIT_TABLES,
    TABLES,
    CommandError,
    Pause,
    Profile,
    ProfileError,
    ReadBlock,
    Table,
    Write,
    load_profile,
    parse_profile,
    plan_reads,
    shipped_profile,
    shipped_profiles,
)
from edgeagent.kernel.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parents[1] / "drivers" / "modbus" / "profiles"
EVENT_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


# --- shipped profiles ----------------------------------------------------------------------------------

def test_every_shipped_profile_loads_and_is_named_after_its_file() -> None:
    profiles = shipped_profiles()
    assert set(profiles) == {"barrier-gate-generic", "ebike-charger-8port", "relay-io-8ch"}
    files = sorted(PROFILES_DIR.glob("*.yaml"))
    assert [f.stem for f in files] == sorted(profiles)
    for f in files:
        prof = load_profile(f)
        assert prof == profiles[f.stem]
        assert prof.points() and all(EVENT_RE.match(t) for t in prof.event_types())
        for block in prof.read_plan():
            assert block.count <= (2000 if block.table in BIT_TABLES else 125)


def test_charger_expands_to_eight_ports() -> None:
    prof = shipped_profile("ebike-charger-8port")
    names = {p.name for p in prof.points()}
    for key in ("state", "voltage", "current", "power", "energy", "temperature", "relay"):
        assert {f"port{k}_{key}" for k in range(1, 9)} <= names
    assert "port9_state" not in names and {"smoke", "cabinet_temperature", "mains_voltage"} <= names
    v8 = prof.point("port8_voltage")
    assert (v8.table, v8.address, v8.port, v8.key, v8.unit) == ("input", 101 + 7 * 16, 8, "voltage", "V")
    assert prof.point("port8_relay").address == 7 and prof.point("port3_current_limit").address == 212
    energy = prof.point("port2_energy")
    assert energy.count == 2 and energy.decode([0x0001, 0x86A0]) == 100.0
    temp = prof.point("port1_temperature")
    assert temp.decode([0xFF38]) == -20.0 and temp.spec.type == "i16"
    state = prof.point("port5_state")
    assert state.decode([1]) == "charging" and state.decode([4]) == "locked_out" and state.decode([9]) == "unknown:9"
    assert prof.point("smoke").table == "discrete_input" and prof.point("smoke").decode([1]) is True
    assert prof.point("port1_faults").decode([0b100]) == {
        "over_current": False, "over_temperature": False, "relay_welded": True, "no_load": False,
        "overload_cutoff": False}
    assert "charger.smoke_detected" in prof.event_types()


def test_gate_and_relay_profiles() -> None:
    gate = shipped_profile("barrier-gate-generic")
    assert gate.point("state").decode([5]) == "fault"
    assert gate.point("vehicle_present").table == "discrete_input"
    assert gate.defaults.unit_id == 1
    relay = shipped_profile("relay-io-8ch")
    assert [p.name for p in relay.points()][:2] == ["ch1_relay", "ch2_relay"]
    assert [(b.table, b.address, b.count) for b in relay.read_plan()] == [("coil", 0, 8), ("discrete_input", 0, 8)]
    with pytest.raises(ProfileError, match="no shipped Modbus profile 'toaster'"):
        shipped_profile("toaster")


# --- commands ----------------------------------------------------------------------------------------

def test_commands_encode_their_writes() -> None:
    charger = shipped_profile("ebike-charger-8port")
    steps = charger.command("set_current_limit", {"port": 3, "amps": 2.5})
    assert len(steps) == 1 and isinstance(steps[0], Write)
    assert (steps[0].table, steps[0].address, steps[0].words) == ("holding", 212, (25,))
    (off,) = charger.command("port_off", {"port": 8})
    assert isinstance(off, Write) and (off.table, off.address, off.words) == ("coil", 7, (0,))
    (cut,) = charger.command("station_off")
    assert isinstance(cut, Write) and (cut.address, cut.words) == (16, (0,))
    (reset,) = charger.command("reset_lockout", {"port": 1})
    assert isinstance(reset, Write) and (reset.table, reset.address, reset.words) == ("holding", 200, (1,))

    gate = shipped_profile("barrier-gate-generic")
    hold = gate.command("hold_open")
    assert [(s.table, s.address, s.words) for s in hold if isinstance(s, Write)] == [
        ("holding", 10, (1,)), ("coil", 0, (1,))]
    (opening,) = gate.command("open")
    assert isinstance(opening, Write) and (opening.table, opening.address, opening.words) == ("coil", 0, (1,))

    relay = shipped_profile("relay-io-8ch")
    on, pause, off2 = relay.command("pulse", {"channel": 4})
    assert isinstance(on, Write) and isinstance(off2, Write) and on.address == off2.address == 3
    assert on.words == (1,) and off2.words == (0,) and pause == Pause(0.5)
    assert relay.command("pulse", {"channel": 4, "duration_s": 2})[1] == Pause(2.0)
    assert len(relay.command("all_off")) == 8


@pytest.mark.parametrize(("name", "args", "fragment"), [
    ("port_on", {}, "needs argument 'port'"),
    ("port_on", {"port": 9}, "must be within 1 .. 8"),
    ("port_on", {"port": 0}, "must be within 1 .. 8"),
    ("port_on", {"port": 1.5}, "whole number"),
    ("port_on", {"port": True}, "must be a number"),
    ("port_on", {"port": 1, "colour": "red"}, "takes no argument 'colour'"),
    ("set_current_limit", {"port": 1, "amps": 5}, "must be within 0.5 .. 4.0"),
    ("set_current_limit", {"port": 1, "amps": float("nan")}, "must be a number"),
    ("self_destruct", {}, "has no command 'self_destruct'"),
])
def test_bad_command_arguments(name: str, args: dict[str, object], fragment: str) -> None:
    with pytest.raises(CommandError, match=re.escape(fragment)):
        shipped_profile("ebike-charger-8port").command(name, args)


def test_point_encode_refuses_unknown_state() -> None:
    mode = shipped_profile("barrier-gate-generic").point("mode")
    assert mode.encode("hold_closed") == [2]
    with pytest.raises(CodecError, match="not a state"):
        mode.encode("sideways")


# --- broken profiles: located errors -----------------------------------------------------------------

BASE = """\
model: test-device
vendor: Test
description: A device for tests
ports:
  count: 4
  stride: {holding: 10, coil: 1}
registers:
  - name: level
    table: holding
    address: 0
    type: u32
    scale: 0.1
  - name: mode
    table: holding
    address: 2
    states: {0: auto, 1: manual}
    writable: true
  - name: relay
    table: coil
    address: 0
    per_port: true
    writable: true
  - name: temp
    table: holding
    address: 100
    type: i16
    per_port: true
    events:
      - {on: above, threshold: 60, event: test.too_hot}
commands:
  manual:
    steps:
      - {write: mode, value: manual}
  switch:
    args:
      port: {type: port}
    steps:
      - {write: relay, value: true}
      - {pause_s: 1}
"""


def line_of(text: str, needle: str, nth: int = 1) -> int:
    hits = [i for i, ln in enumerate(text.splitlines(), 1) if needle in ln]
    return hits[nth - 1]


def test_base_profile_is_valid() -> None:
    prof = parse_profile(BASE, "t.yaml")
    assert len(prof.points()) == 2 + 4 + 4
    assert prof.point("port4_temp").address == 130


# (name, broken text, needle locating the expected line, fragment of the message)
BROKEN: list[tuple[str, str, str | tuple[str, int], str]] = [
    ("overlap", BASE.replace("address: 2\n", "address: 1\n"), "address: 1",
     "holding 1 ('mode') overlaps 'level' (registers[0], holding 0)"),
    ("per-port overlap after expansion",
     BASE.replace("address: 2\n", "address: 32\n").replace("address: 100", "address: 2"), "address: 2",
     "holding 32 ('port4_temp') overlaps 'mode' (registers[1], holding 32)"),
    ("coil with a register type", BASE.replace("    table: coil\n", "    table: coil\n    type: u16\n"), "type: u16",
     "a coil holds one bit: its type can only be bool (got u16)"),
    ("unknown key", BASE.replace("scale: 0.1", "scael: 0.1"), "scael",
     "registers[0].scael: unknown key (did you mean 'scale'?"),
    ("unknown key in a trigger", BASE.replace("threshold: 60,", "threshold: 60, hysterisis: 2,"), "hysterisis",
     "did you mean 'hysteresis'?"),
    ("unknown key in a step", BASE.replace("{pause_s: 1}", "{pause_s: 1, pause_ms: 3}"), "pause_ms",
     "unknown key (did you mean 'pause_s'?"),
    ("duplicate name", BASE.replace("name: mode", "name: level"), ("name: level", 2), "name 'level' is used twice"),
    ("name clash after expansion", BASE.replace("name: mode", "name: port2_relay"), "name: relay",
     "name 'port2_relay' is used twice (also registers[1], holding 2)"),
    ("past the last address", BASE.replace("address: 0\n    type: u32", "address: 65535\n    type: u32"),
     "address: 65535", "runs past address 65535"),
    ("writable discrete input", BASE.replace("table: coil", "table: discrete_input"), ("writable: true", 2),
     "cannot be written"),
    ("missing stride", BASE.replace("stride: {holding: 10, coil: 1}", "stride: {holding: 10}"), "stride:",
     "no stride for table 'coil'"),
    ("per_port without ports", BASE.replace("ports:\n  count: 4\n  stride: {holding: 10, coil: 1}\n", ""),
     "per_port: true", "per_port needs a 'ports' section"),
    ("bad table", BASE.replace("table: coil", "table: coils"), "table: coils", "'coils' is not one of"),
    ("bad type", BASE.replace("type: u32", "type: u24"), "type: u24", "'u24' is not one of"),
    ("name not snake_case", BASE.replace("name: mode", "name: Mode"), "name: Mode", "not a snake_case name"),
    ("rising on a number", BASE.replace("on: above, threshold: 60", "on: rising"), "on: rising",
     "'rising' needs a bool or a bit of a bit field"),
    ("unknown trigger", BASE.replace("on: above, threshold: 60", "on: sideways"), "on: sideways",
     "cannot be 'sideways'"),
    ("event type not dotted", BASE.replace("event: test.too_hot", "event: TooHot"), "TooHot", "is not an event type"),
    ("states on a float", BASE.replace("    states:", "    type: f32\n    states:"), "states:",
     "'states' needs an integer"),
    ("scale zero", BASE.replace("scale: 0.1", "scale: 0"), "scale: 0", "scale cannot be 0"),
    ("write to unknown register", BASE.replace("{write: mode, value: manual}", "{write: moed, value: manual}"),
     "write: moed", "no register named 'moed'"),
    ("write to read-only register", BASE.replace("{write: mode, value: manual}", "{write: level, value: 1}"),
     "write: level", "register 'level' is not writable"),
    ("unknown state value", BASE.replace("{write: mode, value: manual}", "{write: mode, value: manuel}"),
     "value: manuel", "'manuel' is not a state"),
    ("value out of range", BASE.replace("{write: mode, value: manual}", "{write: mode, value: -1}"),
     "value: -1", "does not fit u16"),
    ("per-port write without a port argument", BASE.replace("    args:\n      port: {type: port}\n", ""),
     "write: relay", "needs an argument of type port"),
    ("unknown argument", BASE.replace("{write: relay, value: true}", "{write: relay, value: {arg: state}}"),
     "arg: state", "no argument 'state'"),
    ("not a step", BASE.replace("{pause_s: 1}", "{sleep: 1}"), "sleep: 1", "a step is {write"),
    ("pause too long", BASE.replace("{pause_s: 1}", "{pause_s: 600}"), "pause_s: 600", "at most 60"),
    ("command without steps", BASE.replace(
        "    steps:\n      - {write: mode, value: manual}\n", "    steps: []\n"), "steps: []", "at least 1"),
    ("bad stride", BASE.replace("stride: {holding: 10, coil: 1}", "stride: 0"), "stride: 0", "whole number 1 .. 65535"),
    ("missing model", BASE.replace("model: test-device\n", ""), "vendor", "model: required key is missing"),
]


@pytest.mark.parametrize(("name", "text", "needle", "fragment"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_profiles_are_located(tmp_path: Path, name: str, text: str, needle: str | tuple[str, int],
                                     fragment: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    msg = str(info.value)
    assert fragment in msg, msg
    line = 1 if name == "missing model" else line_of(text, *needle) if isinstance(needle, tuple) \
        else line_of(text, needle)
    assert any(ln.startswith(f"{path}:{line}:") for ln in msg.splitlines()), msg
    assert isinstance(info.value, ConfigError)
    for ln in msg.splitlines():
        assert re.match(rf"^{re.escape(str(path))}:\d+:\d+: \S+: ", ln), ln


def test_overlap_is_reported_once_per_definition() -> None:
    # u32 per port with a holding stride of 1: every port overlaps the next one; one report, not three.
    text = BASE.replace("stride: {holding: 10, coil: 1}", "stride: 1").replace("type: i16\n", "type: u32\n")
    with pytest.raises(ProfileError) as info:
        parse_profile(text, "t.yaml")
    msg = str(info.value)
    assert msg.count("overlaps") == 1 and "('port2_temp') overlaps 'port1_temp'" in msg, msg


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "the profile is empty"),
    ("# only a comment\n", "the profile is empty"),
    ("model: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("model: x\nmodel: y\nvendor: v\n", "not valid YAML"),
])
def test_unparseable_files(text: str, fragment: str) -> None:
    with pytest.raises(ProfileError, match=re.escape(fragment)):
        parse_profile(text, "p.yaml")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no such file"):
        load_profile(tmp_path / "nope.yaml")


def test_direct_validation_raises_validation_error() -> None:
    from pydantic import ValidationError

    from edgeagent.kernel.config.schema import parse_yaml
    from edgeagent.kernel.config.yamlerr import to_builtin

    data = to_builtin(parse_yaml(BASE.replace("address: 2\n", "address: 1\n"), "t"))
    with pytest.raises(ValidationError, match="overlaps"):
        Profile.model_validate(data)


# --- the read planner ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reg:
    name: str
    table: Table
    address: int
    count: int = 1
    poll_interval_s: float = 1.0


def blocks_of(plan: list[ReadBlock[Reg]]) -> list[tuple[str, int, int, list[str]]]:
    return [(b.table, b.address, b.count, [s.item.name for s in b.slices]) for b in plan]


def test_planner_exact_cases() -> None:
    regs = [Reg("a", "holding", 0), Reg("b", "holding", 1, 2), Reg("c", "holding", 3)]
    assert blocks_of(plan_reads(regs)) == [("holding", 0, 4, ["a", "b", "c"])]
    # A gap of 8 unused registers merges; 9 does not.
    assert blocks_of(plan_reads([Reg("a", "input", 0), Reg("b", "input", 9)])) == [("input", 0, 10, ["a", "b"])]
    assert len(plan_reads([Reg("a", "input", 0), Reg("b", "input", 10)])) == 2
    assert len(plan_reads([Reg("a", "input", 0), Reg("b", "input", 2)], max_gap=0)) == 2
    # Different tables or intervals never merge.
    assert len(plan_reads([Reg("a", "input", 0), Reg("b", "holding", 1)])) == 2
    assert len(plan_reads([Reg("a", "input", 0), Reg("b", "input", 1, poll_interval_s=5)])) == 2
    # Protocol limits: 126 registers are two reads, a u32 is never split across reads.
    plan = plan_reads([Reg(f"r{i}", "holding", i) for i in range(126)])
    assert [(b.address, b.count) for b in plan] == [(0, 125), (125, 1)]
    plan = plan_reads([Reg(f"r{i}", "holding", 2 * i, 2) for i in range(63)])
    assert [(b.address, b.count) for b in plan] == [(0, 124), (124, 2)]
    plan = plan_reads([Reg(f"c{i}", "coil", i) for i in range(2001)])
    assert [(b.address, b.count) for b in plan] == [(0, 2000), (2000, 1)]
    plan = plan_reads([Reg(f"r{i}", "holding", i) for i in range(10)], max_regs=4)
    assert [b.count for b in plan] == [4, 4, 2]
    # Order: by interval, then table, then address.
    plan = plan_reads([Reg("z", "holding", 5, poll_interval_s=10), Reg("y", "coil", 3), Reg("x", "holding", 0)])
    assert blocks_of(plan) == [("coil", 3, 1, ["y"]), ("holding", 0, 1, ["x"]), ("holding", 5, 1, ["z"])]
    assert plan_reads([]) == []


def test_block_split_hands_each_register_its_words() -> None:
    (block,) = plan_reads([Reg("a", "holding", 10), Reg("b", "holding", 12, 2)])
    assert block.split([1, 2, 3, 4]) == [(Reg("a", "holding", 10), [1]), (Reg("b", "holding", 12, 2), [3, 4])]
    with pytest.raises(CodecError):
        block.split([1, 2])


def test_planner_rejects_impossible_limits() -> None:
    with pytest.raises(ValueError, match="max_regs"):
        plan_reads([], max_regs=126)
    with pytest.raises(ValueError, match="max_bits"):
        plan_reads([], max_bits=0)
    with pytest.raises(ValueError, match="cannot be read"):
        plan_reads([Reg("big", "holding", 0, 4)], max_regs=2)
    with pytest.raises(ValueError, match="cannot be read"):
        plan_reads([Reg("end", "holding", 65535, 2)])


@st.composite
def register_sets(draw: st.DrawFn) -> list[Reg]:
    regs = []
    for i in range(draw(st.integers(0, 60))):
        table = draw(st.sampled_from(TABLES))
        count = 1 if table in BIT_TABLES else draw(st.sampled_from([1, 1, 2, 4]))
        address = draw(st.integers(0, 65536 - count) | st.integers(0, 300))
        interval = draw(st.sampled_from([0.5, 1.0, 5.0]))
        regs.append(Reg(f"r{i}", table, address, count, interval))
    return regs


@settings(max_examples=300)
@given(register_sets(), st.integers(1, 125), st.integers(1, 2000), st.integers(0, 20))
def test_planner_properties(regs: list[Reg], max_regs: int, max_bits: int, max_gap: int) -> None:
    max_regs = max(max_regs, 4)
    before = list(regs)
    plan = plan_reads(regs, max_regs=max_regs, max_bits=max_bits, max_gap=max_gap)
    assert regs == before  # pure
    seen: list[str] = []
    for b in plan:
        limit = max_bits if b.table in BIT_TABLES else max_regs
        assert 1 <= b.count <= limit and b.address + b.count <= 65536
        assert b.slices and b.slices[0].start == 0  # starts at a register
        assert max(s.stop for s in b.slices) == b.count  # ends at one
        for s in b.slices:
            r = s.item
            assert r.table == b.table and r.poll_interval_s == b.poll_interval_s  # never mixes
            assert s.start == r.address - b.address and s.start >= 0 and s.stop <= b.count  # covers it
            seen.append(r.name)
    assert sorted(seen) == sorted(r.name for r in regs)  # every register exactly once
    # Greedy is tight: the first register of the next block of a group could not have joined the previous one.
    for prev, nxt in itertools.pairwise(plan):
        if (prev.table, prev.poll_interval_s) != (nxt.table, nxt.poll_interval_s):
            continue
        first = nxt.slices[0].item
        limit = max_bits if prev.table in BIT_TABLES else max_regs
        prev_stop = prev.address + prev.count
        assert first.address - prev_stop > max_gap or \
            max(prev_stop, first.address + first.count) - prev.address > limit


TWO_TABLES: list[Table] = ["holding", "coil"]


@settings(max_examples=100)
@given(st.lists(st.tuples(st.sampled_from(TWO_TABLES), st.integers(0, 500)), max_size=40, unique=True))
def test_adjacent_registers_always_merge(spots: list[tuple[Table, int]]) -> None:
    regs = [Reg(f"r{i}", t, a) for i, (t, a) in enumerate(spots)]
    plan = plan_reads(regs, max_gap=0)
    for table in ("holding", "coil"):
        addresses = sorted({a for t, a in spots if t == table})
        runs = sum(1 for i, a in enumerate(addresses) if i == 0 or a != addresses[i - 1] + 1)
        assert sum(1 for b in plan if b.table == table) == runs  # one read per contiguous run (all < 125)
