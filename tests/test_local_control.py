"""The CLI acting on the running daemon through the control socket: gate, charger lockout, outputs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgeagent.app import Daemon
from edgeagent.capabilities import load_config
from edgeagent.drivers.modbus.profile import shipped_profile
from edgeagent.drivers.modbus.sim import ProfileSimulator, gate_mechanics
from tests.helpers import wait_until
from tests.peers import free_port


def write_config(path: Path, state: Path, port: int) -> None:
    path.write_text(f"""\
version: 1
site_id: site-1
gateway_id: gw-1
state_dir: {state}
clock: {{sync: synced}}
health: {{enabled: false}}
modbus:
  buses:
    lan: {{kind: tcp, host: 127.0.0.1, port: {port}, timeout_s: 0.3}}
devices:
  - {{type: modbus.gate, id: car-gate, bus: lan, unit_id: 1, poll_interval_s: 0.1}}
  - {{type: modbus.charger, id: shed-a, bus: lan, unit_id: 2, poll_interval_s: 0.2}}
  - {{type: modbus.relay, id: guard-io, bus: lan, unit_id: 3, channels: {{1: siren}}}}
""")


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeagent", *args, "--config", str(cfg)], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "COLUMNS": "200"})


async def test_gate_charger_and_output_from_the_cli(tmp_path: Path) -> None:
    port = free_port()
    sim = ProfileSimulator({1: shipped_profile("barrier-gate-generic"), 2: shipped_profile("ebike-charger-8port"),
                            3: shipped_profile("relay-io-8ch")}, port=port)
    sim[1].on_write.append(gate_mechanics)
    ch = sim[2]
    ch.set("port5_relay", True)
    ch.set("port5_current", 4.6)  # over current from the start
    cfg_path = tmp_path / "edgeagent.yaml"
    write_config(cfg_path, tmp_path / "state", port)
    async with sim:
        daemon = Daemon(load_config(cfg_path), config_dir=tmp_path)
        seen: list[Any] = []
        daemon.sink.observe(lambda e, _s: seen.append(e))
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(shutdown_trigger=stop.wait))
        try:
            await asyncio.wait_for(daemon.ready.wait(), 15)
            r = await asyncio.to_thread(cli, cfg_path, "gate", "open", "car-gate", "--reason", "visitor",
                                        "--note", "京A·F0236")
            assert r.returncode == 0, r.stderr
            assert ("open_trigger", True) in sim[1].writes
            audit = next(e for e in seen if e.type == "gate.commanded")
            assert audit.data["via"] == "cli" and audit.data["reason"] == "visitor"
            assert audit.data["by"].endswith(f"({os.getuid()})")
            assert await wait_until(lambda: ch.get("port5_relay") is False, 5)
            r = await asyncio.to_thread(cli, cfg_path, "charger", "reset", "shed-a", "--port", "5")
            assert r.returncode == 1 and "still" in r.stderr.lower(), r.stderr  # the hazard is present
            ch.set("port5_current", 0.0)
            await asyncio.sleep(0.6)
            r = await asyncio.to_thread(cli, cfg_path, "charger", "reset", "shed-a", "--port", "5")
            assert r.returncode == 0, r.stderr
            assert await wait_until(lambda: any(e.type == "charger.lockout.reset" for e in seen), 5)
            r = await asyncio.to_thread(cli, cfg_path, "output", "set", "siren", "pulse", "--seconds", "0.3")
            assert r.returncode == 0, r.stderr
            # On, then off by itself 0.3 s later (the CLI may return after the pulse already ended).
            assert ("ch1_relay", True) in sim[3].writes
            assert await wait_until(lambda: ("ch1_relay", False) in sim[3].writes, 5)
            assert sim[3].get("ch1_relay") is False
            r = await asyncio.to_thread(cli, cfg_path, "gate", "open", "no-such-gate")
            assert r.returncode == 1 and "no gate 'no-such-gate'" in r.stderr
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    r = cli(cfg_path, "gate", "open", "car-gate")
    assert r.returncode == 1 and "not running" in r.stderr
