"""Wristband alarms end to end with the cloud link down: a real local mosquitto (the box's broker), the
daemon, and a pymodbus relay module whose channel 1 is the guard room's siren."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.app import Daemon
from edgeagent.capabilities import load_config
from edgeagent.drivers.modbus.profile import shipped_profile
from edgeagent.drivers.modbus.sim import ProfileSimulator
from tests.helpers import config_head, wait_until
from tests.peers import Collector, Mosquitto, free_port

BAND = "aabbccddeeff"
LORA = "0102030405060708"


def write_config(path: Path, state: Path, local_port: int, modbus_port: int) -> None:
    path.write_text(config_head(state) + f"""\
uplink:   # the cloud is down for the whole test: nothing listens here
  broker: mqtt://127.0.0.1:9
  retry: {{first_max_s: 0.2, short_cap_s: 0.5}}
modbus:
  buses:
    lan: {{kind: tcp, host: 127.0.0.1, port: {modbus_port}, timeout_s: 0.3}}
devices:
  - {{type: modbus.relay, id: guard-io, bus: lan, unit_id: 3, channels: {{1: siren, 2: strobe}},
     poll_interval_s: 0.2}}
wristbands:
  broker: mqtt://127.0.0.1:{local_port}
  inputs:
    - {{decoder: ble-json}}
    - {{decoder: chirpstack-v4}}
  zones: {{gw-north: inside, gw-street: outside}}
  residents:
    - {{id: r-0012, name: Wang Ayi, room: 3-2-501, devices: ["{BAND}", "{LORA}"], heart_rate_high: 120}}
notifiers:
  guard-panel: {{type: mqtt, topic: "compound/notify/{{target}}", targets: [guard_room]}}
alarms:
  levels:
    - {{name: guard_room, targets: [guard_room]}}
    - {{name: grid_worker, targets: [grid_worker]}}
""")


class Band:
    """A BLE gateway publishing for a wristband on the local broker."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="ble-gw-north")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.seq = 0

    def send(self, event: str = "none", **fields: Any) -> None:
        self.seq += 1
        doc = {"event": event, "hr": 72, "spo2": 97, "bat": 80, "worn": True, "seq": self.seq, **fields}
        self.client.publish(f"iot/gw-north/{BAND}/data", json.dumps(doc), qos=1).wait_for_publish(5)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@asynccontextmanager
async def running(cfg_path: Path) -> AsyncIterator[tuple[Daemon, list[Any]]]:
    daemon = Daemon(load_config(cfg_path), config_dir=cfg_path.parent)
    seen: list[Any] = []
    daemon.sink.observe(lambda e, _s: seen.append(e))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(shutdown_trigger=stop.wait))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 15)
        assert daemon.wristbands is not None
        await asyncio.wait_for(daemon.wristbands.connected.wait(), 10)
        yield daemon, seen
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def of(seen: list[Any], t: str) -> list[Any]:
    return [e for e in seen if e.type == t]


async def test_sos_with_cloud_down_storm_restart_and_acks(tmp_path: Path, broker: Mosquitto) -> None:
    modbus_port = free_port()
    sim = ProfileSimulator({3: shipped_profile("relay-io-8ch")}, port=modbus_port)
    cfg = tmp_path / "edgeagent.yaml"
    write_config(cfg, tmp_path / "state", broker.port, modbus_port)
    guard = Collector(broker.port, topic="edgeagent/local/alarms/#").start()
    notified = Collector(broker.port, topic="compound/notify/#").start()
    band = Band(broker.port)
    try:
        async with sim, running(cfg) as (daemon, seen):
            # A storm: 100 SOS presses in 2 s fold into one alarm with count 100.
            for _ in range(100):
                await asyncio.to_thread(band.send, "sos")
                await asyncio.sleep(0.02)
            assert await wait_until(lambda: daemon.alarms.engine.active()
                                    and daemon.alarms.engine.active()[0].count == 100, 15)
            alarm = daemon.alarms.engine.active()[0]
            assert alarm.kind == "sos" and alarm.resident_id == "r-0012"
            assert len(of(seen, "alarm.raised")) == 1
            raised = of(seen, "alarm.raised")[0]
            assert raised.priority.label == "alarm" and "Wang" not in json.dumps(dict(raised.data))
            # The siren sounds (relay channel 1) and the guard-room panel topic has it.
            assert await wait_until(lambda: sim[3].get("ch1_relay") is True, 5)
            assert await asyncio.to_thread(guard.wait_for, lambda c: any(
                t.endswith(alarm.id) and json.loads(p)["state"] in ("raised", "notified")
                for t, p, _r in c.messages), 5)
            # The guard room's notifier (MQTT on the box's broker) got the new alarm.
            assert await asyncio.to_thread(notified.wait_for, lambda c: any(
                t == "compound/notify/guard_room" and alarm.id in p.decode() for t, p, _r in c.messages), 5)
            # The cloud link is down: the events wait in the outbox, nothing is lost.
            st = await daemon.status()
            assert st["uplink"]["state"] != "connected" and st["outbox"]["classes"]["alarm"]["unsent"] >= 2
            # ChirpStack: three gateways heard the same uplink (fCnt 7): one reading, two duplicates.
            data = base64.b64encode(bytes([0b0100, 130, 96, 70])).decode()  # worn, hr 130, spo2 96, 70 %
            for gw in range(3):
                up = {"deviceInfo": {"devEui": LORA}, "fCnt": 7, "fPort": 10, "data": data,
                      "rxInfo": [{"gatewayId": f"00800000a000000{gw}", "rssi": -90 - gw, "snr": 5.0}]}
                await asyncio.to_thread(band.publish, f"application/app1/device/{LORA}/event/up", orjson.dumps(up))
            assert await wait_until(lambda: daemon.wristbands.counters["duplicates"] == 2, 5)  # type: ignore[union-attr]
            assert await wait_until(lambda: any(a.kind == "heart_rate_high"
                                                for a in daemon.alarms.engine.active()), 5)
        # Restart in the middle of the alarm (after raised, before acknowledged).
        sim[3].set("ch1_relay", False)
        async with sim, running(cfg) as (daemon, seen):
            kinds = {a.kind for a in daemon.alarms.engine.active()}
            assert {"sos", "heart_rate_high"} <= kinds, kinds
            assert await wait_until(lambda: sim[3].get("ch1_relay") is True, 5), "siren not back after restart"
            sos = next(a for a in daemon.alarms.engine.active() if a.kind == "sos")
            hr = next(a for a in daemon.alarms.engine.active() if a.kind == "heart_rate_high")
            # Acknowledge the SOS from the guard room's panel (local MQTT)...
            # (on its own ack topic, <ack_topic>/<its broker account>, the only one the ACL lets it write)
            await asyncio.to_thread(band.publish, "edgeagent/local/alarms/ack/panel-1",
                                    orjson.dumps({"alarm_id": sos.id, "by": "guard Li"}))
            assert await wait_until(lambda: of(seen, "alarm.acknowledged"), 5)
            ack = of(seen, "alarm.acknowledged")[0].data
            assert ack["by"] == "guard Li" and ack["via"] == "local_mqtt" and ack["caller"] == "panel:panel-1"
            # ... and the heart-rate alarm from the CLI.
            r = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "edgeagent", "alarms", "ack", hr.id, "--config", str(cfg)],
                capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "200"})
            assert r.returncode == 0, r.stderr
            assert await wait_until(lambda: len(of(seen, "alarm.acknowledged")) == 2, 5)
            assert of(seen, "alarm.acknowledged")[-1].data["via"] == "cli"
            # Every alarm acknowledged: the siren goes off.
            assert await wait_until(lambda: sim[3].get("ch1_relay") is False, 5)
            # Resolve from the cloud (the handler a verified signed command reaches).
            spec = daemon.router.get("alarm.handle")
            assert spec is not None and spec.args_model is not None
            await spec.handler(spec.args_model.model_validate(
                {"alarm_id": sos.id, "action": "resolve", "by": "operator 7", "note": "false alarm"}).model_dump())
            assert of(seen, "alarm.resolved")[-1].data["via"] == "cloud"
            assert all(a.id != sos.id for a in daemon.alarms.engine.active())
    finally:
        band.close()
        guard.stop()
        notified.stop()


async def test_malformed_wristband_payloads_are_counted_not_fatal(tmp_path: Path, broker: Mosquitto) -> None:
    modbus_port = free_port()
    cfg = tmp_path / "edgeagent.yaml"
    write_config(cfg, tmp_path / "state", broker.port, modbus_port)
    band = Band(broker.port)
    try:
        async with ProfileSimulator({3: shipped_profile("relay-io-8ch")}, port=modbus_port), \
                running(cfg) as (daemon, seen):
            for payload in (b"not json", b"{}", b'{"hr": "fast"}', b'{"hr": 900}', b"\xff\xfe"):
                await asyncio.to_thread(band.publish, f"iot/gw-north/{BAND}/data", payload)
            await asyncio.to_thread(band.publish, f"application/x/device/{LORA}/event/up", b'{"fPort": 10}')
            await asyncio.to_thread(band.send, "fall")
            assert await wait_until(lambda: of(seen, "alarm.raised"), 5)
            assert any(a.kind == "fall" for a in daemon.alarms.engine.active())
            counters = daemon.wristbands.counters  # type: ignore[union-attr]
            assert sum(v for k, v in counters.items() if k.startswith("rejected:")) >= 4, counters
    finally:
        band.close()


async def test_sos_sent_while_the_daemon_is_down_is_handled_after_it_starts(tmp_path: Path,
                                                                             broker: Mosquitto) -> None:
    """The local broker keeps the wristband input's session: nothing pressed during a restart is lost."""
    modbus_port = free_port()
    cfg = tmp_path / "edgeagent.yaml"
    write_config(cfg, tmp_path / "state", broker.port, modbus_port)
    band = Band(broker.port)
    try:
        async with ProfileSimulator({3: shipped_profile("relay-io-8ch")}, port=modbus_port):
            async with running(cfg) as (daemon, _seen):
                assert not daemon.alarms.engine.active()
            await asyncio.to_thread(band.send, "sos")  # the daemon is down (restarting)
            async with running(cfg) as (daemon, seen):
                assert await wait_until(lambda: of(seen, "alarm.raised"), 10), "the SOS sent while down was lost"
                assert daemon.alarms.engine.active()[0].kind == "sos"
    finally:
        band.close()
