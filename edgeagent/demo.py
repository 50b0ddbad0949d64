"""``edgeagent demo``: the real daemon on a generated config with simulated devices.

Without ``--broker`` it starts a private mosquitto on a free loopback port (when mosquitto is
installed) to stand in for the district platform; otherwise the events stay in the outbox. A
simulated platform subscribes to the gateway's topics and sends it a signed command, and a replay of
it, so the whole path is visible: device → event → outbox → MQTT → platform → command → audit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from rich.console import Console

from edgeagent.app import Daemon
from edgeagent.capabilities import Config
from edgeagent.drivers import sim as sim_package
from edgeagent.drivers.camera.rules.plate_list import PlateList, plates_path
from edgeagent.drivers.modbus.profile import shipped_profile
from edgeagent.drivers.modbus.sim import ProfileSimulator, gate_mechanics
from edgeagent.kernel.errors import UplinkError
from edgeagent.kernel.pipeline.commands import sign_command
from edgeagent.kernel.pipeline.events import Event
from edgeagent.kernel.runtime.logsetup import setup_logging
from edgeagent.transport.mqtt import Incoming, MqttSession, ProtocolRefused, SessionParams

SITE = "demo-site"
GATEWAY = "demo-gw"
KEY_ID = "demo-platform"
_COLORS = {"alarm": "bold red", "event": "cyan", "telemetry": "dim"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateBroker:
    """A throw-away mosquitto on loopback standing in for the platform's broker."""

    def __init__(self, workdir: Path) -> None:
        self.exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists()
                                                 else None)
        self.port = _free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def available(self) -> bool:
        return self.exe is not None

    def start(self) -> str:
        assert self.exe is not None
        conf = self.workdir / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"{user}listener {self.port} 127.0.0.1\nallow_anonymous true\nlog_dest none\n")
        self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=subprocess.DEVNULL,  # noqa: S603 - our own file
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return f"mqtt://127.0.0.1:{self.port}"
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("the private mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self.proc = None


MEDIA = Path(sim_package.__file__).resolve().parent / "media"
DEMO_CLIP = MEDIA / "pedestrians.mp4"
# Synthetic scenes (tests/synth_scenes.py, see media/PROVENANCE.md): a resident's car then a visitor's at the
# gate; a motorcycle (standing in for an e-bike) wheeled into a lift car.
GATE_CLIP = MEDIA / "gate.mp4"
LIFT_CLIP = MEDIA / "lift.mp4"
RESIDENT_PLATE = "京AF0236"
GATE_LANE = [[0.1, 0.45], [0.9, 0.45], [0.95, 1.0], [0.05, 1.0]]
LIFT_FLOOR = [[0.05, 0.55], [0.8, 0.55], [0.8, 1.0], [0.05, 1.0]]


def demo_config_data(workdir: Path, broker: str | None, public_key: Path, modbus_port: int,
                     local: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "version": 1, "site_id": SITE, "gateway_id": GATEWAY, "state_dir": str(workdir / "state"),
        "log_level": "warning", "health": {"port": 0},
        # The demo trusts the host clock. A real box asks the kernel ('auto'), and until NTP has
        # synchronised it marks event times and refuses commands, whose expiry it cannot check.
        "clock": {"sync": "synced"},
        "commands": {"public_keys": {KEY_ID: str(public_key)}},
        "devices": [
            {"type": "sim.sensor", "id": "shed-a-temp", "metric": "temperature", "unit": "degC",
             "base": 24, "amplitude": 6, "interval_s": 1},
            {"type": "sim.sensor", "id": "shed-a-hum", "metric": "humidity", "unit": "%",
             "base": 60, "amplitude": 10, "interval_s": 2},
            {"type": "sim.contact", "id": "gate-room-door", "contact": "door", "mean_interval_s": 3},
            {"type": "sim.panic", "id": "guard-room-panic", "location": "guard-room", "mean_interval_s": 8},
            # Modbus devices on a simulated pymodbus server (see ModbusDemo): the compound's car gate,
            # an e-bike charging station in shed A, and the guard room's relay module.
            {"type": "modbus.gate", "id": "car-gate", "bus": "lan", "unit_id": 1, "poll_interval_s": 0.25},
            {"type": "modbus.charger", "id": "shed-a-charger", "bus": "lan", "unit_id": 2, "poll_interval_s": 0.5},
            {"type": "modbus.relay", "id": "guard-io", "bus": "lan", "unit_id": 3,
             "channels": {"1": "siren", "2": "strobe", "3": "lift2_door_hold", "4": "lift2_voice"},
             "poll_interval_s": 1},
            # A camera over the campus path, playing a real pedestrian clip through the whole pipeline
            # (motion gating, the shared detector, tracking): people entering the lawn zone and crossing
            # the path's middle line, each an event with a snapshot kept on the box.
            {"type": "camera", "id": "cam-path", "name": "Campus path",
             "rtsp": {"detect_url": DEMO_CLIP.as_uri()},
             "detect": {"fps": 5, "classes": ["person", "bicycle", "car"]},
             "zones": [{"name": "lawn", "points": [[0.0, 0.62], [1.0, 0.62], [1.0, 1.0], [0.0, 1.0]],
                        "classes": ["person"], "loiter_s": 20}],
             "lines": [{"name": "middle", "a": [0.05, 0.55], "b": [0.95, 0.55], "a_to_b": "south",
                        "b_to_a": "north", "classes": ["person"]}]},
            # The car gate's camera: plates read and voted per vehicle; a resident's opens the Modbus gate,
            # a visitor's is a gate.visitor event for the guard room.
            {"type": "camera", "id": "cam-gate", "name": "Car gate", "rtsp": {"detect_url": GATE_CLIP.as_uri()},
             "detect": {"fps": 5, "classes": ["car"], "min_score": 0.3, "objects_events": False},
             "snapshots_from": "detect", "zones": [{"name": "lane", "points": GATE_LANE}],
             "gate": {"zone": "lane", "open": "car-gate"}},
            # A lift car's camera: an e-bike wheeled in holds the doors and starts the voice message (relay
            # channels 3 and 4 of the guard room's module) and raises an alarm until it is wheeled out.
            {"type": "camera", "id": "cam-lift2", "name": "Building 3 lift 2",
             "rtsp": {"detect_url": LIFT_CLIP.as_uri()},
             "detect": {"fps": 5, "classes": ["person"], "objects_events": False}, "snapshots_from": "detect",
             "zones": [{"name": "car", "points": LIFT_FLOOR}],
             "ebike_lift": {"zone": "car", "door_hold": "lift2_door_hold", "announce": "lift2_voice"}},
        ],
        "modbus": {"buses": {"lan": {"kind": "tcp", "host": "127.0.0.1", "port": modbus_port}}},
    }
    if broker is not None:
        # A short connect timeout: against a broker that speaks only MQTT 3.1.1 the first (MQTT 5)
        # attempt goes unanswered, and the demo is short.
        data["uplink"] = {"broker": broker, "retry": {"first_max_s": 0.5, "short_cap_s": 2},
                          "flush_on_stop_s": 5, "connect_timeout_s": 3}
    if local is not None:
        # Two residents' wristbands, heard by a BLE gateway that publishes JSON to the box's broker.
        data["wristbands"] = {
            "broker": local, "inputs": [{"decoder": "ble-json"}], "zones": {"gw-bldg3": "inside"},
            "residents": [
                {"id": "r-0012", "name": "Wang Ayi", "room": "3-2-501", "devices": [BAND_WANG]},
                {"id": "r-0031", "name": "Li Shushu", "room": "3-1-202", "devices": [BAND_LI]},
            ],
        }
        # The grid worker's and the family's phones, stood in for by topics on the box's broker: every level of
        # the escalation ladder reaches someone, as a site's config must.
        data["notifiers"] = {"phones": {"type": "mqtt", "topic": "demo/phones/{target}",
                                        "targets": ["grid_worker", "family"]}}
    return data


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, float) for v in value):
        return "[" + ",".join(f"{v:.2f}" for v in value) + "]"
    return str(value)


BAND_WANG = "c0ffee000012"
BAND_LI = "c0ffee000031"


class Wristbands:
    """The BLE gateway in building 3, simulated: it publishes wristband readings to the box's broker."""

    def __init__(self, broker: str) -> None:
        parts = urlsplit(broker)
        self.params = SessionParams(host=parts.hostname or "127.0.0.1", port=parts.port or 1883,
                                    client_id=f"ble-gw-bldg3-{uuid.uuid4().hex[:6]}", protocol="3.1.1")
        self.seq = 0

    async def send(self, band: str, event: str, **fields: Any) -> None:
        self.seq += 1
        doc = {"event": event, "hr": 76, "spo2": 97, "bat": 64, "worn": True, "seq": self.seq, **fields}
        async with MqttSession(self.params) as s:
            await s.publish(f"iot/gw-bldg3/{band}/data", orjson.dumps(doc), qos=1)


class ModbusDemo:
    """The demo's Modbus devices: a real pymodbus server simulating the gate, the charger and the relay
    module, and the script that drives them (a car arrives, a charging port overheats)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.sim = ProfileSimulator({1: shipped_profile("barrier-gate-generic"),
                                     2: shipped_profile("ebike-charger-8port"),
                                     3: shipped_profile("relay-io-8ch")}, port=self.port)
        self.sim[1].on_write.append(gate_mechanics)
        charger = self.sim[2]
        charger.set("station_enable", True)
        charger.set("mains_voltage", 229.8)
        charger.set("cabinet_temperature", 24.0)
        for port, (current, temp) in {1: (1.8, 33.0), 3: (2.1, 49.0)}.items():
            charger.set(f"port{port}_relay", True)
            charger.set(f"port{port}_state", "charging")
            charger.set(f"port{port}_current", current)
            charger.set(f"port{port}_voltage", 48.2)
            charger.set(f"port{port}_power", round(current * 48.2))
            charger.set(f"port{port}_temperature", temp)

    async def heat_up(self, console: Console, port: int = 3) -> None:
        """A battery pack fault: the socket of ``port`` heats up 6 degC a second until it is cut."""
        charger = self.sim[2]
        console.print(f"  [bold yellow]shed A[/] → port {port}'s socket starts overheating")
        temp = float(charger.get(f"port{port}_temperature"))  # type: ignore[arg-type]
        while charger.get(f"port{port}_relay") and temp < 90:
            temp += 4.0
            charger.set(f"port{port}_temperature", temp)
            await asyncio.sleep(0.5)
        if not charger.get(f"port{port}_relay"):
            charger.set(f"port{port}_current", 0.0)
            charger.set(f"port{port}_power", 0)
            charger.set(f"port{port}_state", "locked_out")
            console.print(f"  [bold yellow]shed A[/] → port {port}'s relay was opened by the gateway at "
                          f"{temp:.1f} degC")


class Platform:
    """The district platform, simulated: counts what arrives and sends signed commands."""

    def __init__(self, console: Console, broker: str, key: Ed25519PrivateKey) -> None:
        parts = urlsplit(broker)
        self.console = console
        self.key = key
        self.params = SessionParams(host=parts.hostname or "127.0.0.1", port=parts.port or 1883,
                                    client_id=f"demo-platform-{uuid.uuid4().hex[:8]}")
        self.base = f"edgeagent/v1/{SITE}/{GATEWAY}"
        self.received: Counter[str] = Counter()
        self.seen_ids: set[str] = set()
        self.session: MqttSession | None = None

    def on_message(self, msg: Incoming) -> None:
        if "/events/" in msg.topic:
            for env in orjson.loads(msg.payload)["events"]:
                # At-least-once delivery: a platform counts each event id once (re-sends carry the same id).
                if env["id"] not in self.seen_ids:
                    self.seen_ids.add(env["id"])
                    self.received[env["priority"]] += 1
        elif msg.topic.endswith("/cmd/res"):
            res = orjson.loads(msg.payload)
            mark = "[green]executed[/]" if res["ok"] else f"[red]{res['status']}[/] ({res['error']['code']})"
            self.console.print(f"  [bold magenta]platform[/] ← command {res['command_id']}: {mark}")
        elif msg.topic.endswith("/status"):
            st = orjson.loads(msg.payload)
            self.console.print(f"  [bold magenta]platform[/] ← gateway is {st['state']} ({st['reason']})")

    async def run(self, ready: asyncio.Event) -> None:
        # A broker given with --broker may speak only MQTT 3.1.1 and leave an MQTT 5 CONNECT unanswered:
        # ask for 5 with a short timeout, then 3.1.1, as the gateway's uplink does.
        try:
            await self._listen(replace(self.params, protocol="5", connect_timeout_s=3), ready)
        except ProtocolRefused:
            await self._listen(replace(self.params, protocol="3.1.1"), ready)

    async def _listen(self, params: SessionParams, ready: asyncio.Event) -> None:
        async with MqttSession(params, on_message=self.on_message) as s:
            self.session = s
            try:
                await s.subscribe(f"{self.base}/#", qos=1)
                ready.set()
                await asyncio.Event().wait()
            finally:
                self.session = None

    async def send_ping(self, nonce: str | None = None) -> tuple[str, str]:
        return await self.send("gateway.ping", {}, nonce=nonce)

    async def send(self, command: str, args: dict[str, Any], nonce: str | None = None) -> tuple[str, str]:
        if self.session is None:
            raise UplinkError("the simulated platform is not connected to the broker")
        now = datetime.now(UTC)
        cmd_id = f"cmd-{uuid.uuid4().hex[:6]}"
        nonce = nonce or uuid.uuid4().hex
        body = {"id": cmd_id, "site_id": SITE, "gateway_id": GATEWAY, "command": command, "args": args,
                "issued_at": now.isoformat(), "expires_at": (now + timedelta(seconds=60)).isoformat(),
                "nonce": nonce, "issuer": "demo-operator"}
        await self.session.publish(f"{self.base}/cmd/req", sign_command(self.key, KEY_ID, body), qos=1)
        return cmd_id, nonce


def run_demo(seconds: float, broker: str | None) -> int:
    console = Console(highlight=False)
    setup_logging("warning")
    with tempfile.TemporaryDirectory(prefix="edgeagent-demo-") as tmp:
        work = Path(tmp)
        # The box's own broker (wristbands' BLE gateways publish to it); also the platform's stand-in.
        private: PrivateBroker | None = PrivateBroker(work)
        local = None
        if private is not None and private.available:
            local = private.start()
        else:
            private = None
        if broker is None:
            broker = local
            if local is not None:
                console.print(f"[bold]edgeagent demo[/]: a private mosquitto on {local} stands in for the "
                              "district platform and the box's own broker")
            else:
                console.print("[bold]edgeagent demo[/]: mosquitto is not installed, so there is no platform "
                              "broker and no wristbands; events stay in the outbox (install mosquitto or pass "
                              "--broker)")
        else:
            console.print(f"[bold]edgeagent demo[/]: forwarding to {broker}")
        try:
            return asyncio.run(_demo(console, work, seconds, broker, local or broker))
        finally:
            if private is not None:
                private.stop()


async def _demo(console: Console, work: Path, seconds: float, broker: str | None, local: str | None) -> int:
    key = Ed25519PrivateKey.generate()
    pub = work / "platform.pub"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    modbus = ModbusDemo()
    await modbus.sim.start()
    data = demo_config_data(work, broker, pub, modbus.port, local)
    config_file = work / "edgeagent.yaml"
    config_file.write_text(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())  # JSON is YAML too
    # The residents' plate list (what `edgeagent plates add` writes): one resident's car.
    with PlateList(plates_path(Path(data["state_dir"]))) as plates:
        plates.add(RESIDENT_PLATE, ref="3-1-502", reason="resident")
    daemon = Daemon(Config.model_validate(data))
    bands = Wristbands(local) if local is not None else None
    accepted: Counter[str] = Counter()
    rows: set[int] = set()

    def show(event: Event, seq: int) -> None:
        # Counted by outbox row: a reading coalesced into a waiting one (backlog) shares its row and seq,
        # and the platform receives that row once.
        if seq not in rows:
            rows.add(seq)
            accepted[event.priority.label] += 1
        data = " ".join(f"{k}={_short(v)}" for k, v in event.data.items() if v is not None and v != [])
        if event.attachments:
            data += " " + " ".join(f"{a.kind}={a.sha256[:12]}" for a in event.attachments)
        color = _COLORS[event.priority.label]
        console.print(f"[{color}]#{seq:<5} {event.priority.label:<9} {event.type:<30} {event.device_id:<16} "
                      f"{data}[/]", soft_wrap=True)

    daemon.sink.observe(show)
    stop = asyncio.Event()
    platform = Platform(console, broker, key) if broker else None
    platform_task = None
    runner: asyncio.Task[int] | None = None
    try:
        if platform is not None:
            # The platform listens before the gateway starts, so it sees gateway.started too.
            ready = asyncio.Event()
            platform_task = asyncio.create_task(platform.run(ready))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ready.wait(), 5)
        runner = asyncio.create_task(daemon.run(shutdown_trigger=stop.wait))
        await asyncio.wait_for(daemon.ready.wait(), 20)
        if daemon.uplink is not None:
            # The script's commands need the gateway listening; a busy machine can take a moment.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(daemon.uplink.subscribed.wait(), 15)
        console.print(f"gateway {GATEWAY} ready: outbox in {daemon.outbox.path}, health on "
                      f"{daemon.health.url if daemon.health else '-'}; running {seconds:g} s (Ctrl-C stops)\n")
        await _script(console, platform, modbus, bands, config_file, daemon, seconds)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    except UplinkError as exc:
        console.print(f"[red]platform connection failed: {exc}[/]")
    finally:
        stop.set()
        if runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner, 30)
        if platform_task is not None:
            await asyncio.sleep(0.3)  # let the last acknowledgements arrive
            platform_task.cancel()
            with contextlib.suppress(BaseException):
                await platform_task
        await modbus.sim.stop()
    console.print("\n[bold]summary[/]: accepted " + ", ".join(f"{v} {k}" for k, v in sorted(accepted.items())))
    if platform is not None:
        console.print("  the platform received " + ", ".join(
            f"{v} {k}" for k, v in sorted(platform.received.items())))
    console.print("  (the demo's config and outbox lived in a temporary directory, now removed)")
    return 0


async def _script(console: Console, platform: Platform | None, modbus: ModbusDemo, bands: Wristbands | None,
                  config_file: Path, daemon: Daemon, seconds: float) -> None:
    """What happens in the compound during the demo, at fixed times from the start."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    steps: list[tuple[float, str]] = [(0, "cameras"), (2, "car"), (4, "ping"), (5, "heat"), (8, "sos"), (9, "fall"),
                                      (11, "ack")]
    heat: asyncio.Task[None] | None = None
    door = False
    try:
        while loop.time() - start < seconds:
            await asyncio.sleep(min(0.25, max(0.0, seconds - (loop.time() - start))))
            if bool(modbus.sim[3].get("ch3_relay")) != door:
                door = not door
                what = "ON: the doors are held open, the voice message plays" if door else "off: the doors may close"
                console.print(f"  [bold yellow]lift 2[/] → door hold relay {what}")
            while steps and loop.time() - start >= steps[0][0]:
                _, step = steps.pop(0)
                if step == "cameras":
                    console.print("  [bold yellow]car gate camera[/] → a resident's car (京A·F0236, in the plate list) "
                                  "drives up, then a visitor's (苏E·5A2B8)")
                    console.print("  [bold yellow]lift 2 camera[/] → someone wheels an e-bike into the lift car")
                elif step == "car":
                    console.print("  [bold yellow]car gate[/] → a visitor called the guard room, which opens the gate "
                                  "remotely (through the platform)")
                    modbus.sim[1].set("vehicle_present", True)
                    if platform is not None:
                        cmd_id, _ = await platform.send("gate.open", {"device_id": "car-gate", "reason": "visitor"})
                        console.print(f"  [bold magenta]platform[/] → signed gate.open {cmd_id} (reason: visitor)")
                elif step == "ping" and platform is not None:
                    cmd_id, nonce = await platform.send_ping()
                    console.print(f"  [bold magenta]platform[/] → signed gateway.ping {cmd_id}")
                    await asyncio.sleep(0.5)
                    await platform.send_ping(nonce=nonce)
                    console.print("  [bold magenta]platform[/] → the same command replayed (must be refused)")
                elif step == "heat":
                    heat = loop.create_task(modbus.heat_up(console))
                elif step == "sos" and bands is not None:
                    console.print("  [bold yellow]building 3[/] → resident r-0012 presses SOS on her wristband")
                    for _ in range(3):  # pressed three times: one alarm, count 3
                        await bands.send(BAND_WANG, "sos")
                elif step == "fall" and bands is not None:
                    console.print("  [bold yellow]building 3[/] → resident r-0031's wristband detects a fall")
                    await bands.send(BAND_LI, "fall", hr=104)
                elif step == "ack" and bands is not None:
                    await _ack_from_cli(console, config_file, daemon, modbus)
    finally:
        if heat is not None:
            heat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heat


async def _ack_from_cli(console: Console, config_file: Path, daemon: Daemon, modbus: ModbusDemo) -> None:
    """The guard acknowledges each alarm with the real CLI, through the daemon's control socket."""
    siren = "on" if modbus.sim[3].get("ch1_relay") else "off"
    console.print(f"  [bold yellow]guard room[/] → siren is {siren}; guard Li acknowledges from the CLI")
    for alarm in daemon.alarms.engine.active():
        if alarm.acknowledged or alarm.kind == "ebike_in_lift":  # the lift lets go by itself as the bike leaves
            continue
        cmd = [sys.executable, "-m", "edgeagent", "alarms", "ack", alarm.id, "--by", "guard Li",
               "--config", str(config_file)]
        console.print(f"  $ edgeagent alarms ack {alarm.id} --by 'guard Li'")
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        console.print("    " + out.decode().strip(), markup=False)
    await asyncio.sleep(0.5)
    siren = "on" if modbus.sim[3].get("ch1_relay") else "off"
    console.print(f"  [bold yellow]guard room[/] → siren is {siren}")
