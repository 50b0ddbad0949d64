"""Modbus end to end: the daemon polls a real pymodbus server simulating a gate, a charger and a relay
module; events, telemetry, commands, outputs and offline/online transitions come out as the contract
says."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from edgeagent.app import Daemon
from edgeagent.capabilities import Config
from edgeagent.drivers.modbus.profile import shipped_profile
from edgeagent.drivers.modbus.sim import ProfileSimulator, gate_mechanics
from tests.helpers import running_daemon, wait_until
from tests.peers import free_port

GATE = shipped_profile("barrier-gate-generic")
CHARGER = shipped_profile("ebike-charger-8port")
RELAY = shipped_profile("relay-io-8ch")


def config(tmp_path: Path, port: int) -> Config:
    return Config.model_validate({
        "version": 1, "site_id": "site-1", "gateway_id": "gw-1", "state_dir": str(tmp_path / "state"),
        "clock": {"sync": "synced"}, "health": {"enabled": False},
        "modbus": {"buses": {"lan": {"kind": "tcp", "host": "127.0.0.1", "port": port, "timeout_s": 0.3,
                                     "backoff_base_s": 0.1, "backoff_cap_s": 0.3, "reconnect_cap_s": 0.3}}},
        "devices": [
            {"type": "modbus.gate", "id": "car-gate", "bus": "lan", "unit_id": 1, "poll_interval_s": 0.1},
            {"type": "modbus.charger", "id": "shed-a", "bus": "lan", "unit_id": 2, "poll_interval_s": 0.2},
            {"type": "modbus.relay", "id": "guard-io", "bus": "lan", "unit_id": 3, "channels": {1: "siren"},
             "poll_interval_s": 0.1},
        ],
    })


def of(seen: list[Any], type_name: str, device: str | None = None) -> list[Any]:
    return [e for e in seen if e.type == type_name and (device is None or e.device_id == device)]


async def test_gate_charger_relay_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    sim = ProfileSimulator({1: GATE, 2: CHARGER, 3: RELAY}, port=port)
    sim[1].on_write.append(gate_mechanics)
    sim[1].set("state", "closed")
    sim[2].set("port3_temperature", 31.0)
    async with sim:
        daemon = Daemon(config(tmp_path, port))
        async with running_daemon(daemon) as run_seen:
            seen = run_seen.seen
            # Telemetry: the first reading of every value with a telemetry rule is reported.
            assert await wait_until(lambda: any(e.data.get("metric") == "port3_temperature"
                                                for e in of(seen, "sensor.reading", "shed-a")), 10)
            # A vehicle arrives at the gate: an event from the loop detector's rising edge.
            assert await wait_until(lambda: daemon.modbus.devices["car-gate"].device.polls >= 3, 10)
            sim[1].set("vehicle_present", True)
            assert await wait_until(lambda: of(seen, "gate.vehicle_present", "car-gate"), 5)
            # The platform opens the gate (the command handler a verified cloud command reaches).
            spec = daemon.router.get("gate.open")
            assert spec is not None and spec.args_model is not None
            args = spec.args_model.model_validate({"device_id": "car-gate", "reason": "visitor"}).model_dump()
            result = await spec.handler(args)
            assert result["command"] == "open"
            assert ("open_trigger", True) in sim[1].writes
            assert await wait_until(lambda: of(seen, "gate.opened", "car-gate"), 5)
            audit = of(seen, "gate.commanded", "car-gate")[0].data
            assert audit["reason"] == "visitor" and audit["via"] == "cloud" and audit["outcome"] == "executed"
            # Telemetry on change beyond the deadband (0.5 degC), not on every poll.
            before = len([e for e in of(seen, "sensor.reading", "shed-a") if e.data["metric"] == "port3_temperature"])
            sim[2].set("port3_temperature", 31.2)
            await asyncio.sleep(0.8)
            same = len([e for e in of(seen, "sensor.reading", "shed-a") if e.data["metric"] == "port3_temperature"])
            sim[2].set("port3_temperature", 33.0)
            assert await wait_until(lambda: any(e.data.get("value") == 33.0 for e in of(seen, "sensor.reading")), 5)
            assert same == before
            # A relay output as an action for local rules: a siren pulse.
            await daemon.outputs.pulse("siren", 0.3)
            assert ("ch1_relay", True) in sim[3].writes
            assert await wait_until(lambda: ("ch1_relay", False) in sim[3].writes, 5)
            st = await daemon.status()
            rows = {d["id"]: d for d in st["devices"]}
            assert rows["car-gate"]["polls"] > 5 and rows["shed-a"]["profile"] == "ebike-charger-8port"
    assert not of(seen, "device.offline")


async def test_dead_device_goes_offline_once_and_back_online(tmp_path: Path) -> None:
    port = free_port()
    sim = ProfileSimulator({1: GATE, 2: CHARGER, 3: RELAY}, port=port)
    await sim.start()
    try:
        daemon = Daemon(config(tmp_path, port))
        async with running_daemon(daemon) as run_seen:
            seen = run_seen.seen
            assert await wait_until(lambda: daemon.modbus.devices["car-gate"].device.polls > 3, 10)
            sim[2].silent = True  # the charger stops answering; the others on the same bus do not
            assert await wait_until(lambda: of(seen, "device.offline", "shed-a"), 10)
            polls = daemon.modbus.devices["car-gate"].device.polls
            await asyncio.sleep(1.0)
            assert daemon.modbus.devices["car-gate"].device.polls > polls + 5, "a dead neighbour slowed the gate"
            sim[2].silent = False
            assert await wait_until(lambda: of(seen, "device.online", "shed-a"), 10)
            await asyncio.sleep(0.5)
        assert len(of(seen, "device.offline", "shed-a")) == 1
        assert len(of(seen, "device.online", "shed-a")) == 1
        assert not of(seen, "device.offline", "car-gate")
    finally:
        await sim.stop()


async def test_unknown_profile_or_bus_is_a_config_error(tmp_path: Path) -> None:
    import pytest

    from edgeagent.capabilities import validate_doc
    from edgeagent.kernel.config.schema import parse_yaml
    from edgeagent.kernel.errors import ConfigError

    cfg = config(tmp_path, 1).model_dump(mode="json")
    cfg["devices"][0]["profile"] = "no-such-gate"
    with pytest.raises(ConfigError, match="no shipped device profile 'no-such-gate'"):
        Daemon(Config.model_validate(cfg))
    text = "version: 1\nsite_id: s\ngateway_id: g\ndevices:\n  - {type: modbus.gate, id: g1, bus: x, unit_id: 1}\n"
    with pytest.raises(ConfigError, match=r"c.yaml:5:\d+: devices\[0\].bus: no bus 'x'"):
        validate_doc(parse_yaml(text, "c.yaml"), "c.yaml")


async def test_charger_overheat_cut_lockout_survives_restart_and_reset(tmp_path: Path) -> None:
    port = free_port()
    sim = ProfileSimulator({1: GATE, 2: CHARGER, 3: RELAY}, port=port)
    ch = sim[2]
    ch.set("station_enable", True)
    ch.set("port3_relay", True)
    ch.set("port3_current", 1.2)
    ch.set("port3_temperature", 40.0)
    ch.set("port3_state", "charging")
    async with sim:
        daemon = Daemon(config(tmp_path, port))
        async with running_daemon(daemon) as run_seen:
            seen = run_seen.seen
            assert await wait_until(lambda: of(seen, "charging.session.started", "shed-a"), 10)
            ch.set("port3_temperature", 71.5)  # the socket overheats
            assert await wait_until(lambda: ch.get("port3_relay") is False, 5), "the port was not cut"
            assert await wait_until(lambda: of(seen, "charger.port.cutoff", "shed-a"), 5)
            cut = of(seen, "charger.port.cutoff", "shed-a")[0]
            assert cut.priority.label == "alarm"
            assert cut.data["port"] == 3 and cut.data["reason"] == "over_temperature"
            # Measured from the poll that showed the heat to the write done: the target is 200 ms.
            assert cut.data["reaction_ms"] is not None
            reaction_ms = cut.data["reaction_ms"]
            # Someone switches the port back on while it is locked out: cut again.
            ch.set("port3_relay", True)
            assert await wait_until(lambda: ch.get("port3_relay") is False, 5)
            spec = daemon.router.get("charger.reset_lockout")
            assert spec is not None and spec.args_model is not None
            args = spec.args_model.model_validate({"device_id": "shed-a", "port": 3}).model_dump()
            from edgeagent.kernel.errors import CommandRejected

            try:
                await spec.handler(args)
                raise AssertionError("reset accepted while the port is still hot")
            except CommandRejected as exc:
                assert exc.code == "failed"
        # Restart: the lockout is still there (durable), so switching the port on is cut again.
        ch.set("port3_relay", True)
        daemon2 = Daemon(config(tmp_path, port))
        async with running_daemon(daemon2) as run_seen2:
            seen2 = run_seen2.seen
            assert await wait_until(lambda: ch.get("port3_relay") is False, 5), "lockout lost across restart"
            ch.set("port3_temperature", 35.0)
            await asyncio.sleep(0.6)
            spec = daemon2.router.get("charger.reset_lockout")
            assert spec is not None and spec.args_model is not None
            await spec.handler(spec.args_model.model_validate({"device_id": "shed-a", "port": 3}).model_dump())
            assert await wait_until(lambda: of(seen2, "charger.lockout.reset", "shed-a"), 5)
            ch.set("port3_relay", True)
            await asyncio.sleep(0.8)
            assert ch.get("port3_relay") is True, "a reset port was cut again"
            # Smoke in the shed: the whole station is cut.
            ch.set("smoke", True)
            assert await wait_until(lambda: ch.get("station_enable") is False, 5)
            assert await wait_until(lambda: of(seen2, "charger.station.cutoff", "shed-a"), 5)
    assert reaction_ms < 1000


async def test_gate_and_charger_over_rtu_on_a_serial_line(tmp_path: Path, pty_pair: tuple[str, str]) -> None:
    """The same profiles over Modbus RTU: a pymodbus serial server on one end of a socat pty pair."""
    from pymodbus import FramerType

    server_end, bus_end = pty_pair
    sim = ProfileSimulator({1: GATE, 2: CHARGER}, serial_port=server_end, framer=FramerType.RTU, baudrate=115200)
    sim[1].on_write.append(gate_mechanics)
    sim[2].set("port2_relay", True)
    sim[2].set("port2_current", 1.0)
    sim[2].set("port2_temperature", 30.0)
    cfg = Config.model_validate({
        "version": 1, "site_id": "site-1", "gateway_id": "gw-1", "state_dir": str(tmp_path / "state"),
        "clock": {"sync": "synced"}, "health": {"enabled": False},
        "modbus": {"buses": {"shed-485": {"kind": "rtu", "serial_port": bus_end, "baudrate": 115200,
                                          "timeout_s": 0.3}}},
        "devices": [
            {"type": "modbus.gate", "id": "car-gate", "bus": "shed-485", "unit_id": 1, "poll_interval_s": 0.2},
            {"type": "modbus.charger", "id": "shed-a", "bus": "shed-485", "unit_id": 2, "poll_interval_s": 0.3},
        ],
    })
    async with sim:
        daemon = Daemon(cfg)
        async with running_daemon(daemon) as run_seen:
            seen = run_seen.seen
            gate = daemon.modbus.devices["car-gate"].device
            assert await wait_until(lambda: gate.polls >= 3, 10)  # the loop's first state is known
            sim[1].set("vehicle_present", True)
            assert await wait_until(lambda: of(seen, "gate.vehicle_present", "car-gate"), 10)
            await daemon.modbus.gate("car-gate", "open", reason="plate_match", by="plate:京AF0236", via="local")
            assert await wait_until(lambda: of(seen, "gate.opened", "car-gate"), 10)
            sim[2].set("port2_temperature", 80.0)
            assert await wait_until(lambda: sim[2].get("port2_relay") is False, 10)
            assert await wait_until(lambda: of(seen, "charger.port.cutoff", "shed-a"), 5)
        assert not of(seen, "device.offline")
