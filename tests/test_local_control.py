"""The CLI acting on the running daemon through the control socket: gate, charger lockout, outputs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from edgeagent.app import Daemon, alarm_kinds
from edgeagent.capabilities import load_config
from edgeagent.drivers.modbus.profile import shipped_profile
from edgeagent.drivers.modbus.sim import ProfileSimulator, gate_mechanics
from edgeagent.kernel.alarms.engine import AlarmConfig, AlarmEngine
from edgeagent.kernel.alarms.runtime import AlarmRuntime
from edgeagent.kernel.errors import CommandRejected, OutboxError
from edgeagent.kernel.local_actions import alarm_command, core_local_actions
from edgeagent.kernel.pipeline.event_types import REGISTRY
from edgeagent.kernel.pipeline.events import EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.kernel.runtime.clock import Clock
from edgeagent.kernel.runtime.outputs import Outputs
from tests.helpers import config_head, wait_until
from tests.peers import free_port

ENGINE_CONFIG = AlarmConfig(kinds=alarm_kinds())  # every capability's kinds, as the daemon has them


def write_config(path: Path, state: Path, port: int) -> None:
    path.write_text(config_head(state) + f"""\
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


# --- issue 8 item 2: ack/resolve text is bounded, --by is recorded next to the real caller -------------

def write_alarm_config(path: Path, state: Path) -> None:
    path.write_text(config_head(state))


async def test_alarm_ack_and_resolve_from_the_cli_record_by_next_to_the_caller_and_refuse_bad_text(
        tmp_path: Path) -> None:
    cfg_path = tmp_path / "edgeagent.yaml"
    write_alarm_config(cfg_path, tmp_path / "state")
    daemon = Daemon(load_config(cfg_path), config_dir=tmp_path)
    seen: list[Any] = []
    daemon.sink.observe(lambda e, _s: seen.append(e))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(shutdown_trigger=stop.wait))
    me = f"({os.getuid()})"
    try:
        await asyncio.wait_for(daemon.ready.wait(), 15)
        await daemon.alarms.raise_("sos", "r-1", "aabbccddee01")
        alarm_id = daemon.alarms.engine.active()[0].id
        # Refused with the reason, exit 1, nothing stored: escape codes, a bidi override, too long.
        for by, reason in (("\x1b[2J\x1b[31mALL CLEAR", "U+001B"), ("guard\u202eevil", "U+202E"),
                           ("g" * 65, "at most 64")):
            r = await asyncio.to_thread(cli, cfg_path, "alarms", "ack", alarm_id, "--by", by)
            assert r.returncode == 1 and reason in r.stderr and "bad_args" in r.stderr, r.stderr
        r = await asyncio.to_thread(cli, cfg_path, "alarms", "resolve", alarm_id, "--note", "x" * 60_000)
        assert r.returncode == 1 and "note is 60000 characters long; at most 500" in r.stderr, r.stderr
        assert daemon.alarms.engine.get(alarm_id).state.unacknowledged
        assert not any(e.type in ("alarm.acknowledged", "alarm.resolved") for e in seen)
        # --by names who took it on; the calling user is recorded next to it, not replaced by it.
        r = await asyncio.to_thread(cli, cfg_path, "alarms", "ack", alarm_id, "--by", "王保安")
        assert r.returncode == 0, r.stderr
        assert "acknowledged by 王保安 (sent by" in r.stdout and me in r.stdout, r.stdout
        r = await asyncio.to_thread(cli, cfg_path, "alarms", "resolve", alarm_id, "--note", "false alarm")
        assert r.returncode == 0, r.stderr
        acked = next(e for e in seen if e.type == "alarm.acknowledged")
        resolved = next(e for e in seen if e.type == "alarm.resolved")
        assert acked.data["by"] == "王保安" and acked.data["caller"].endswith(me)
        assert resolved.data["by"].endswith(me) and resolved.data["caller"] == resolved.data["by"]
        assert resolved.data["note"] == "false alarm"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


class RefusingState:
    """The real outbox, except that saving state fails (a full disk) while the switch is on."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.refuse = False

    async def kv_get(self, key: str) -> Any:
        return await self.outbox.kv_get(key)

    async def kv_put(self, key: str, value: Any) -> None:
        if self.refuse:
            raise OutboxError("disk full (test switch)")
        await self.outbox.kv_put(key, value)


async def test_an_ack_that_took_effect_but_was_not_stored_is_answered_not_raised(tmp_path: Path) -> None:
    """AlarmNotDurable from ack/resolve: the siren is off, so the CLI and the platform are told
    'acknowledged, not yet stored' instead of an internal error."""
    outbox = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await outbox.open()
    try:
        clock = Clock(mode="synced")
        state = RefusingState(outbox)
        alarms = AlarmRuntime(AlarmEngine(ENGINE_CONFIG),
                              sink=EventSink(EventFactory(REGISTRY, "s", "gw-1", clock), outbox), state=state,
                              outputs=Outputs(), notifiers=None, clock=clock)
        local = core_local_actions(Outputs(), alarms)["alarm"]
        cloud = alarm_command(alarms)
        await alarms.raise_("sos", "r-1", "aabbccddee01")
        await alarms.raise_("fall", "r-2", "aabbccddee02")
        sos, fall = (a.id for a in alarms.engine.active())
        state.refuse = True
        out = await local({"alarm_id": sos, "action": "ack", "by": "guard-7"}, "root(0)")
        assert out["stored"] is False and out["message"] == "acknowledged, not yet stored"
        assert out["by"] == "guard-7" and out["caller"] == "root(0)"
        assert cloud.args_model is not None
        args = cloud.args_model.model_validate({"alarm_id": fall, "action": "resolve", "by": "op-1"}).model_dump()
        out = await cloud.handler(args)
        assert out["stored"] is False and out["message"] == "resolved, not yet stored"
        assert [a.id for a in alarms.engine.active()] == [sos]  # both took effect
        # The platform's operator name is checked like the others.
        with pytest.raises(ValidationError, match="U\\+001B"):
            cloud.args_model.model_validate({"alarm_id": sos, "by": "op\x1b]0;pwned\x07"})
        with pytest.raises(CommandRejected, match="at most 500"):
            await local({"alarm_id": sos, "action": "resolve", "note": "n" * 501}, "root(0)")
    finally:
        await outbox.close()
