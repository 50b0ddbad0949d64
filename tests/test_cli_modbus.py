"""``edgeagent modbus``: scan, read, write, profiles and add (test before configure), against a real pymodbus
server simulating device profiles (drivers/modbus/sim.py), run on its own event loop in a background thread."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from edgeagent.capabilities import load_config
from edgeagent.cli import app, devices_table
from edgeagent.drivers.modbus.profile import Profile, shipped_profile
from edgeagent.drivers.modbus.sim import ProfileSimulator
from tests.peers import free_port

GATE = shipped_profile("barrier-gate-generic")
CHARGER = shipped_profile("ebike-charger-8port")
RELAY = shipped_profile("relay-io-8ch")
USER_COMMENT = "# site note from the installer: keep me exactly as I am"
EOF_COMMENT = "# end-of-file note: also keep me"


class SimThread:
    """A ProfileSimulator serving on 127.0.0.1 from a thread of its own, so the CLI (which runs its own
    asyncio loop) can be invoked synchronously from the test."""

    def __init__(self, devices: dict[int, Profile]) -> None:
        self.port = free_port()
        self.sim = ProfileSimulator(devices, port=self.port)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="modbus-sim", daemon=True)

    def _serve(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported by __enter__
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with self.sim:
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> SimThread:
        self._thread.start()
        assert self._ready.wait(10), "simulator did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive()


@pytest.fixture
def sim() -> Iterator[SimThread]:
    """Units 1 gate, 2 charger, 3 relay module; 4 and 5 are dead slaves (silent on the wire)."""
    with SimThread({1: GATE, 2: CHARGER, 3: RELAY, 4: RELAY, 5: GATE}) as s:
        s.sim[4].silent = True
        s.sim[5].silent = True
        yield s


def cli(*args: str | Path | int, input: str | None = None) -> Any:
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def at(s: SimThread) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(s.port), "--timeout", "0.2"]


@pytest.fixture
def commented_cfg(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    r = cli("init", "--site-id", "s1", "--gateway-id", "g1", "--broker", "mqtt://127.0.0.1:1",
            "--state-dir", tmp_path / "state", "--config", path)
    assert r.exit_code == 0, r.output
    text = path.read_text().replace("log_level: info\n", f"log_level: info\n{USER_COMMENT}\n")
    path.write_text(text + EOF_COMMENT + "\n")
    return path


# --- scan -----------------------------------------------------------------------------------------------

def test_scan_finds_exactly_the_units_that_answer(sim: SimThread) -> None:
    r = cli("modbus", "scan", *at(sim), "--units", "1-5", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["units"]
    assert [row["unit"] for row in rows] == [1, 2, 3, 4, 5]
    assert [row["unit"] for row in rows if row["answered"]] == [1, 2, 3]
    assert all(row["latency_ms"] is not None for row in rows if row["answered"])

    sim.sim[2].silent = True  # the charger dies
    r = cli("modbus", "scan", *at(sim), "--units", "1-3,5")
    assert r.exit_code == 0, r.output
    assert "2 of 4 unit ids answered" in r.stdout
    r = cli("modbus", "scan", *at(sim), "--units", "2,3", "--json")
    assert [(u["unit"], u["answered"], u["how"]) for u in json.loads(r.stdout)["units"]] == [
        (2, False, "silent"), (3, True, "holding 0 = 0 (0x0000)")]


def test_scan_counts_an_exception_response_as_a_device(sim: SimThread) -> None:
    # pymodbus answers an id it does not serve with exception 0x04: somebody is there, and says so.
    r = cli("modbus", "scan", *at(sim), "--units", "9", "--json")
    assert r.exit_code == 0, r.output
    [row] = json.loads(r.stdout)["units"]
    assert row["answered"] is True and row["exception_code"] == 0x04
    assert "server device failure" in row["how"]


def test_scan_warns_when_the_server_answers_for_every_unit_id() -> None:
    # pymodbus' device 0 stands for every unit id: 247 "devices" that are one.
    with SimThread({0: GATE}) as any_id:
        r = cli("modbus", "scan", *at(any_id), "--units", "1-247")
        assert r.exit_code == 0, r.output
        assert "247 of 247 unit ids answered" in r.stdout
        out = " ".join(r.stdout.split())
        assert "warning: unit 248, an id no device can have, answered too" in out
        assert "answers for any unit id" in out and "ONE device" in out
        r = cli("modbus", "scan", *at(any_id), "--units", "1-3", "--json")
        doc = json.loads(r.stdout)
        assert doc["answers_any_unit_id"] is True and "unit 248" in doc["warning"]


def test_scan_warns_on_a_long_run_of_identical_answers() -> None:
    # Unit 248 scanned too, and refused with an exception (no data: no canary warning); ten ids in a row give
    # the same data, which is what one device answering for many ids looks like.
    with SimThread(dict.fromkeys(range(10, 20), GATE)) as same:
        r = cli("modbus", "scan", *at(same), "--units", "10-19,248", "--json")
        doc = json.loads(r.stdout)
        assert [u["unit"] for u in doc["units"] if u["value"] is not None] == list(range(10, 20))
        assert doc["units"][-1]["exception_code"] == 0x04
        assert doc["answers_any_unit_id"] is True
        assert doc["warning"].startswith("10 consecutive unit ids answered with exactly the same data")


def test_scan_of_a_normal_bus_warns_of_nothing(sim: SimThread) -> None:
    r = cli("modbus", "scan", *at(sim), "--units", "1-5", "--json")
    doc = json.loads(r.stdout)
    assert doc["answers_any_unit_id"] is False and doc["warning"] is None
    r = cli("modbus", "scan", *at(sim), "--units", "1-5")
    assert "warning" not in r.stdout


def test_scan_says_cannot_connect_when_nothing_listens() -> None:
    r = cli("modbus", "scan", "--host", "127.0.0.1", "--port", free_port(), "--units", "1-3")
    assert r.exit_code == 1
    assert "cannot connect to tcp 127.0.0.1" in r.stderr


# --- read -----------------------------------------------------------------------------------------------

def test_read_decodes_profile_points_and_raw_registers(sim: SimThread) -> None:
    sim.sim[2].set("port3_temperature", 41.5)
    sim.sim[2].set("port3_state", "charging")
    r = cli("modbus", "read", *at(sim), "--unit", 2, "--profile", "ebike-charger-8port",
            "--point", "port3_temperature", "--point", "state", "--json")
    assert r.exit_code == 0, r.output
    points = json.loads(r.stdout)["points"]
    assert points["port3_temperature"] == {"value": 41.5, "unit": "degC", "port": 3, "key": "temperature",
                                           "table": "input", "address": 138}
    assert points["port3_state"]["value"] == "charging" and points["port1_state"]["value"] == "idle"
    assert len(points) == 9  # the temperature, and the state of each of the 8 ports

    r = cli("modbus", "read", *at(sim), "-u", 2, "-p", "ebike-charger-8port")  # every point, grouped per port
    assert r.exit_code == 0, r.output
    assert "per port" in r.stdout and "temperature (degC)" in r.stdout and "41.5" in r.stdout
    assert "cabinet_temperature" in r.stdout

    r = cli("modbus", "read", *at(sim), "-u", 2, "--table", "input", "--address", 138, "--type", "i16",
            "--scale", "0.1")
    assert r.exit_code == 0, r.output
    assert "0x019F" in r.stdout and "41.5" in r.stdout
    r = cli("modbus", "read", *at(sim), "-u", 2, "--table", "input", "--address", 137, "--count", 3, "--json")
    assert json.loads(r.stdout)["words"] == [0, 415, 0]


def test_read_reports_silence_and_exceptions(sim: SimThread) -> None:
    r = cli("modbus", "read", *at(sim), "-u", 4, "--address", 0)
    assert r.exit_code == 1
    assert "no answer from unit 4" in r.stderr
    r = cli("modbus", "read", *at(sim), "-u", 1, "--table", "holding", "--address", 900)
    assert r.exit_code == 1
    assert "exception 0x02 (illegal data address)" in r.stderr


# --- write ----------------------------------------------------------------------------------------------

def test_write_asks_first_then_writes_and_reads_back(sim: SimThread) -> None:
    gate = sim.sim[1]
    r = cli("modbus", "write", *at(sim), "-u", 1, "--table", "holding", "--address", 11, "--value", 45, input="n\n")
    assert r.exit_code == 1
    assert "nothing written" in r.stderr and gate.get("auto_close_s") == 0 and gate.writes == []

    r = cli("modbus", "write", *at(sim), "-u", 1, "--table", "holding", "--address", 11, "--value", 45, "--yes")
    assert r.exit_code == 0, r.output
    assert gate.get("auto_close_s") == 45
    assert "0x002D" in r.stdout and "read back: 45" in r.stdout

    r = cli("modbus", "write", *at(sim), "-u", 1, "-p", "barrier-gate-generic", "--point", "mode",
            "--value", "hold_open", "--yes", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["read_back"] == "hold_open" and gate.get("mode") == "hold_open"

    r = cli("modbus", "write", *at(sim), "-u", 3, "--table", "coil", "--address", 2, "--value", "on", "-y")
    assert r.exit_code == 0, r.output
    assert sim.sim[3].get("ch3_relay") is True and "read back: true" in r.stdout


# --- profiles -------------------------------------------------------------------------------------------

def test_profiles_lists_the_shipped_models() -> None:
    r = cli("modbus", "profiles", "--json")
    assert r.exit_code == 0, r.output
    listed = {p["model"]: p for p in json.loads(r.stdout)}
    assert set(listed) == {"barrier-gate-generic", "ebike-charger-8port", "relay-io-8ch"}
    assert "open" in listed["barrier-gate-generic"]["commands"] and listed["ebike-charger-8port"]["ports"] == 8
    assert all(p["description"] for p in listed.values())
    r = cli("modbus", "profiles", "ebike-charger-8port")
    assert r.exit_code == 0 and "set_current_limit" in r.stdout and "port1_temperature" in r.stdout


# --- add: test before configure ---------------------------------------------------------------------------

def test_add_tests_the_unit_before_writing_the_config(sim: SimThread, commented_cfg: Path) -> None:
    r = cli("modbus", "bus", "add", "lan", "--kind", "tcp", "--host", "127.0.0.1", "--port", sim.port,
            "--timeout", "0.2", "-c", commented_cfg)
    assert r.exit_code == 0, r.output
    r = cli("modbus", "bus", "add", "dead", "--kind", "tcp", "--host", "127.0.0.1", "--port", free_port(),
            "-c", commented_cfg)
    assert r.exit_code == 0, r.output
    text = commented_cfg.read_text()
    assert USER_COMMENT in text and text.endswith(EOF_COMMENT + "\n")
    assert text.index("modbus:") < text.index("# Devices on this gateway") < text.index("devices: []")
    before = commented_cfg.read_bytes()

    r = cli("modbus", "add", "gate", "--id", "car-gate", "--bus", "lan", "--unit", 5, "-c", commented_cfg)
    assert r.exit_code == 1
    assert "no answer from unit 5" in r.stderr
    assert commented_cfg.read_bytes() == before

    r = cli("modbus", "add", "relay", "--id", "io", "--bus", "dead", "--unit", 1, "-c", commented_cfg)
    assert r.exit_code == 1
    assert "cannot connect" in r.stderr
    assert commented_cfg.read_bytes() == before

    r = cli("modbus", "add", "charger", "--id", "shed", "--bus", "lan", "--unit", 9, "-c", commented_cfg)
    assert r.exit_code == 1
    assert "unsupported device: exception 0x04" in r.stderr
    assert commented_cfg.read_bytes() == before

    r = cli("modbus", "add", "gate", "--id", "car-gate", "--bus", "lan", "--unit", 1, "--name", "North gate",
            "--set", "poll_interval_s=0.5", "-c", commented_cfg)
    assert r.exit_code == 0, r.output
    assert "unit 1 on lan answered" in r.stdout and "added modbus.gate device" in r.stdout
    lines = commented_cfg.read_text().splitlines()
    start = lines.index("devices:")
    assert lines[start:] == [
        "devices:",
        "  - type: modbus.gate",
        "    id: car-gate",
        "    name: North gate",
        "    bus: lan",
        "    unit_id: 1",
        "    poll_interval_s: 0.5",
        EOF_COMMENT,
    ]
    assert USER_COMMENT in lines
    cfg = load_config(commented_cfg)
    [gate] = cfg.devices
    assert (gate.type, gate.bus, gate.unit_id, gate.profile) == ("modbus.gate", "lan", 1,  # type: ignore[union-attr]
                                                               "barrier-gate-generic")


def test_device_add_probes_modbus_types_too(sim: SimThread, commented_cfg: Path) -> None:
    r = cli("modbus", "bus", "add", "lan", "--kind", "tcp", "--host", "127.0.0.1", "--port", sim.port,
            "--timeout", "0.2", "-c", commented_cfg)
    assert r.exit_code == 0, r.output
    before = commented_cfg.read_bytes()
    r = cli("device", "add", "modbus.relay", "--id", "io", "--set", "bus=lan", "--set", "unit_id=4",
            "-c", commented_cfg)
    assert r.exit_code == 1
    assert "no answer from unit 4" in r.stderr and "--no-probe" in r.stderr
    assert commented_cfg.read_bytes() == before
    r = cli("device", "add", "modbus.relay", "--id", "io", "--set", "bus=lan", "--set", "unit_id=3",
            "-c", commented_cfg)
    assert r.exit_code == 0, r.output
    assert "relay-io-8ch" in r.stdout
    assert [d.id for d in load_config(commented_cfg).devices] == ["io"]


# --- status ---------------------------------------------------------------------------------------------

def test_status_devices_table_shows_online_state_and_last_error() -> None:
    rows = [
        {"id": "car-gate", "type": "modbus.gate", "bus": "lan", "unit_id": 1, "profile": "barrier-gate-generic",
         "online": True, "polls": 120, "poll_failures": 0, "last_poll_age_s": 0.4, "last_error": None},
        {"id": "shed-a", "type": "modbus.charger", "bus": "shed", "unit_id": 2, "profile": "ebike-charger-8port",
         "online": False, "polls": 30, "poll_failures": 7, "last_poll_age_s": 12.0,
         "last_error": "no answer within 1 s"},
        {"id": "io", "type": "modbus.relay", "bus": "lan", "unit_id": 3, "profile": "relay-io-8ch",
         "online": None, "polls": 0, "poll_failures": 0, "last_poll_age_s": None, "last_error": ""},
    ]
    out = Console(width=160, record=True)
    out.print(devices_table(rows))
    text = out.export_text()
    assert "lan/1" in text and "online" in text and "offline" in text and "unknown" in text
    assert "0.4 s ago" in text and "never" in text and "30/7" in text and "no answer within 1 s" in text
