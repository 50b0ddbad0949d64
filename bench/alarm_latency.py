"""Alarm latency benchmark: wristband SOS on the local broker → siren coil written on a Modbus relay module.

Run from the repository root::

    .venv/bin/python bench/alarm_latency.py            # 1,000 alarms idle, with a CPU burner, with a flood
    .venv/bin/python bench/alarm_latency.py --quick    # 200 + 200 + 200
    .venv/bin/python bench/alarm_latency.py --trace    # also time the stages inside the daemon

The setup of tests/test_wristband_e2e.py, with the daemon in its own process:

* a private mosquitto on a free loopback port is the box's local broker (the wristband input);
* the cloud broker is down for the whole run: the uplink points at 127.0.0.1:9, where nothing listens;
* the daemon runs as ``python -m edgeagent run --config ...`` in a **separate process** (its own
  interpreter, GIL and CPU accounting): it is what is measured;
* this process is the helper: a pymodbus relay module simulator (ProfileSimulator, unit 3, channel 1 =
  siren, channel 2 = strobe) and a BLE gateway publishing ``iot/gw-north/{band}/data`` with
  ``{"event": "sos", ...}`` (paho, QoS 1), plus a guard-room panel subscribed to the daemon's alarm topic.

One measured alarm: the siren must be OFF (simulator image) → ``t0 = time.time()`` right before the SOS
publish → the simulator's ``on_write`` hook stamps ``time.time()`` when the gateway's write of coil
``ch1_relay = 1`` arrives at the server → the guard-room topic names the new alarm → the helper resolves
it on the ack topic (``{"action": "resolve"}``) → the daemon switches the siren off → the guard-room topic
says "resolved" (the daemon is done with the alarm) → the next SOS comes ``--gap`` after that and at least
``--interval`` after the previous SOS. Alarms are resolved as the CLI does, through the daemon's
control socket (a guard-room panel may only acknowledge). Every SOS therefore raises a NEW alarm that
switches the siren on from off, on an otherwise idle daemon. The bands of ``--residents`` residents take
turns. Both stamps come from this one process (same clock), so latency = server-side coil write − publish.
``--back-to-back --interval 0`` instead publishes the next SOS as soon as the siren is off, while the
daemon is still finishing the previous alarm.

The gateway and the panel are two MQTT clients, as on a site: the gateway's socket carries only its own
PUBLISHes, so paho's missing TCP_NODELAY cannot hold an SOS behind an unacknowledged PUBACK of the
panel's (that artefact once cost 40 ms per alarm here). The broker keeps mosquitto's defaults
(``set_tcp_nodelay false``) unless ``--broker-nodelay``.

Three phases against the same daemon: idle, then with a CPU burner beside it (``--burn-cores``, default
core 0: one busy process per listed core, each pinned with ``sched_setaffinity`` to its core, running a
tight numeric loop; the stand-in for a camera pipeline), then idle again while one more wristband floods
SOS presses at full speed through its own gateway (``--one-connection``: through the one wildcard
connection). The output ends with one ``RESULT ...`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.peers import Mosquitto, free_port  # noqa: E402 - after the repo root is on sys.path

TARGET_P99_MS = 50.0
UNIT = 3
SIREN_POINT = "ch1_relay"
GATEWAY = "gw-north"
GUARD_TOPIC = "edgeagent/local/alarms"
ACK_TOPIC = f"{GUARD_TOPIC}/ack"
PANEL = "bench-panel"  # the panel's account: it acknowledges on ACK_TOPIC/PANEL
FLOOD_GATEWAY = "gw-flood"
FLOOD_WINDOW = 200  # publishes in flight at most: the flood is as fast as the broker takes it, memory bounded
FLOOD_SCRIPT = """
import collections, sys
import paho.mqtt.client as mqtt
port, client_id, topic = int(sys.argv[1]), sys.argv[2], sys.argv[3]
line, window = sys.argv[4].encode(), int(sys.argv[5])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
c.max_inflight_messages_set(window)
c.connect("127.0.0.1", port)
c.loop_start()
pending = collections.deque()
while True:
    pending.append(c.publish(topic, line, qos=1))
    if len(pending) >= window:
        pending.popleft().wait_for_publish(10)
"""
FLOOD_BAND = "f100d0000001"
FLOOD_LINE = '{"event": "sos", "worn": true}'
SIREN_TIMEOUT_S = 2.0  # an SOS with no siren write within this is counted as missed

BURNER = """\
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
x = 1.0
while True:
    for _ in range(1_000_000):
        x = x * 1.0000001 + 0.5
        if x > 1e12:
            x = 1.0
"""

# The daemon with its stages timed: wraps a few methods, then runs the real CLI. Only with --trace.
TRACED_DAEMON = """\
import atexit, sys, time
import orjson
cfg, out = sys.argv[1], sys.argv[2]
from edgeagent.drivers.wristband import service as ws
from edgeagent.kernel.alarms import runtime as ar
rows = []
now = time.time

def _seq(msg):
    if msg.topic.endswith("/data"):
        try:
            return orjson.loads(msg.payload).get("seq")
        except Exception:
            return None
    return None

orig_on_message = ws.WristbandService._on_message
def _on_message(self, msg, *a):
    rows.append(("recv", now(), _seq(msg)))
    return orig_on_message(self, msg, *a)
ws.WristbandService._on_message = _on_message

orig_handle = ws.WristbandService._handle
async def _handle(self, item):
    rows.append(("handle", now(), _seq(item.msg)))
    try:
        return await orig_handle(self, item)
    finally:
        rows.append(("handled", now(), None))
ws.WristbandService._handle = _handle

orig_raise = ar.AlarmRuntime.raise_
async def _raise(self, *a, **k):
    rows.append(("raise", now(), None))
    try:
        return await orig_raise(self, *a, **k)
    finally:
        rows.append(("raise_done", now(), None))
ar.AlarmRuntime.raise_ = _raise

# Outputs switch in background lanes (the alarm path only requests them): time the lane's write.
from edgeagent.kernel.runtime import outputs as _outputs
orig_apply = _outputs.Outputs._apply
async def _apply(self, name, lane, req):
    tag = f"{name}:{'on' if req.on else 'off'}"
    rows.append(("switch", now(), tag))
    try:
        return await orig_apply(self, name, lane, req)
    finally:
        rows.append(("switch_done", now(), tag))
_outputs.Outputs._apply = _apply

# Finer stages (rows only; the analysis below uses the ones above).
from edgeagent.kernel.pipeline import sink as _sink
from edgeagent.kernel.pipeline import outbox as _outbox
from edgeagent.transport import mqtt as _mqtt
def _wrap(cls, name, tag):
    orig = getattr(cls, name)
    async def wrapper(self, *a, **k):
        rows.append((tag, now(), a[0] if a and isinstance(a[0], str) else None))
        try:
            return await orig(self, *a, **k)
        finally:
            rows.append((tag + "_done", now(), None))
    setattr(cls, name, wrapper)
_wrap(_sink.EventSink, "emit", "emit")
_wrap(_outbox.Outbox, "kv_put", "kv_put")
_wrap(_mqtt.MqttSession, "publish", "mqtt_publish")
orig_ack = _mqtt.MqttSession.ack
def _ack(self, mid, qos):
    rows.append(("mqtt_ack", now(), mid))
    return orig_ack(self, mid, qos)
_mqtt.MqttSession.ack = _ack

import gc
gc.callbacks.append(lambda phase, info: rows.append(("gc_" + phase, now(), info["generation"])))

# MQTT keepalive pings (the broker's PINGRESP is a small packet that Nagle can hold the next one behind).
import paho.mqtt.client as _paho
orig_ping = _paho.Client._send_pingreq
def _send_pingreq(self):
    rows.append(("ping", now(), self._client_id.decode(errors="replace")))
    return orig_ping(self)
_paho.Client._send_pingreq = _send_pingreq

# Event-loop stalls: a task that sleeps 1 ms and notes every wake-up more than 3 ms late.
import asyncio
from edgeagent import app as _app
orig_start = _app.Daemon._start
async def _start(self, tg):
    await orig_start(self, tg)
    async def watch():
        while not self._stop.is_set():
            t = now()
            await asyncio.sleep(0.001)
            late = now() - t - 0.001
            if late > 0.003:
                rows.append(("stall", t + 0.001, late))
    tg.create_task(watch(), name="bench-stall-watch")
_app.Daemon._start = _start

def _dump():
    with open(out, "w") as f:
        for r in rows:
            f.write(orjson.dumps(r).decode() + "\\n")
atexit.register(_dump)

from edgeagent.cli import main
sys.argv = ["edgeagent", "run", "--config", cfg]
main()
"""


# --- processes -------------------------------------------------------------------------------------------

def stop_process(proc: subprocess.Popen[Any] | None, timeout_s: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the daemon's config --------------------------------------------------------------------------------

def band_id(i: int) -> str:
    return f"a0b0c0{i:06x}"


def write_config(path: Path, state: Path, local_port: int, modbus_port: int, residents: int,
                 per_gateway: bool = True) -> None:
    res = "\n".join(f'    - {{id: r-{i:04d}, name: Resident {i}, room: 3-{i // 100}-{i % 100:02d}, '
                    f'devices: ["{band_id(i)}"]}}' for i in range(residents))
    res += f'\n    - {{id: r-flood, name: Flooding band, room: 9-9-999, devices: ["{FLOOD_BAND}"]}}'
    gateways = f", gateways: [{GATEWAY}, {FLOOD_GATEWAY}]" if per_gateway else ""
    path.write_text(f"""\
version: 1
site_id: site-bench
gateway_id: gw-bench
state_dir: {state}
log_level: warning
clock: {{sync: synced}}
health: {{enabled: false}}
uplink:   # the cloud is down for the whole run: nothing listens here
  broker: mqtt://127.0.0.1:9
modbus:
  buses:
    lan: {{kind: tcp, host: 127.0.0.1, port: {modbus_port}}}
devices:
  - {{type: modbus.relay, id: guard-io, bus: lan, unit_id: {UNIT}, channels: {{1: siren, 2: strobe}}}}
wristbands:
  broker: mqtt://127.0.0.1:{local_port}
  inputs:
    - {{decoder: ble-json{gateways}}}
  zones: {{{GATEWAY}: inside}}
  residents:
{res}
alarms:
  levels:
    - {{name: guard_room, targets: [guard_room]}}
    - {{name: grid_worker, targets: [grid_worker]}}
notifiers:   # the guard room's panel topic on the box's broker (works with the internet down)
  guard_room_panel: {{type: mqtt, topic: "compound/guard-room/alarms/{{target}}", targets: [guard_room, grid_worker]}}
""")


# --- CPU accounting --------------------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle, total


def busy_others(exclude: set[int]) -> list[str]:
    """Other processes that used CPU recently (ps), to note a noisy machine."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu", "--no-headers"], capture_output=True,
                             text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.splitlines()[:8]:
        parts = line.split(None, 2)
        if len(parts) == 3 and int(parts[0]) not in exclude and float(parts[1]) >= 5.0:
            rows.append(f"{parts[2]} (pid {parts[0]}, {parts[1]}% CPU)")
    return rows


# --- the helper: relay simulator, BLE gateway, guard-room panel -----------------------------------------------

@dataclass
class Sample:
    i: int
    band: str
    seq: int
    t_pub: float
    t_on: float | None = None
    alarm_id: str | None = None
    t_guard: float | None = None
    t_resolve: float | None = None
    t_off: float | None = None
    t_done: float | None = None
    t_puback: float | None = None  # the broker's PUBACK of the SOS reached the gateway client

    @property
    def latency_ms(self) -> float | None:
        return None if self.t_on is None else (self.t_on - self.t_pub) * 1000


@dataclass
class Phase:
    name: str
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    daemon_cpu_s: float = 0.0
    machine_busy: float = 0.0  # of all cores, 0..1
    burners_cpu_s: float = 0.0
    others: list[str] = field(default_factory=list)
    siren_stuck: int = 0
    flood_rate: float = 0.0  # presses/s folded into the flooding band's alarm (flood phase)
    flood_count: int = 0


class Helper:
    """The BLE gateway (publishes SOS only), the guard-room panel (subscribes to the alarm topic, resolves
    alarms) and the relay module's write hook, in this process. Two MQTT clients, as on a real site: the
    gateway's socket then carries nothing but its own PUBLISHes, so the publish hop is not held back by
    Nagle's algorithm behind an unacknowledged PUBACK of the panel's. The panel sets TCP_NODELAY (it only
    paces the run)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sim: Any, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.loop = loop
        self.sim = sim
        self._siren: asyncio.Queue[tuple[float, bool]] = asyncio.Queue()
        self._guard: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
        sim[UNIT].on_write.append(self._on_write)
        self.siren_writes = 0
        self.guard_messages = 0
        subscribed = threading.Event()
        panel = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"guard-panel-{os.getpid()}")
        panel.on_connect = lambda cl, *_a: cl.subscribe(f"{GUARD_TOPIC}/+", qos=1)
        panel.on_subscribe = lambda *_a: subscribed.set()
        panel.on_message = self._on_message
        panel.on_socket_open = self._nodelay
        panel.connect("127.0.0.1", port, keepalive=30)
        panel.loop_start()
        gw = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"ble-{GATEWAY}-{os.getpid()}")
        self._pubacks: dict[int, float] = {}
        gw.on_publish = self._on_publish
        gw.connect("127.0.0.1", port, keepalive=30)
        gw.loop_start()
        deadline = time.monotonic() + 10
        while not gw.is_connected():
            if time.monotonic() > deadline:
                raise RuntimeError("the BLE gateway client could not connect")
            time.sleep(0.01)
        if not subscribed.wait(10):
            raise RuntimeError("the guard-room panel could not subscribe")
        self.panel = panel
        self.gw = gw
        self.seq = 0
        self.vitals_sent = 0
        self.control_path: str | None = None
        self._vitals_stop = threading.Event()
        self._vitals_thread: threading.Thread | None = None

    def start_vitals(self, rate: float, residents: int) -> None:
        """Background readings (no alarm) from the residents' bands over the same gateway connection."""
        if rate <= 0:
            return

        def run() -> None:
            interval = 1.0 / rate
            nxt = time.monotonic()
            k = 0
            while not self._vitals_stop.is_set():
                band = band_id(k % residents)
                payload = json.dumps({"event": "none", "hr": 70 + k % 10, "spo2": 97, "bat": 80, "worn": True,
                                      "rssi": -60, "seq": 10_000_000 + k}).encode()
                self.gw.publish(f"iot/{GATEWAY}/{band}/data", payload, qos=1)
                self.vitals_sent += 1
                k += 1
                nxt += interval
                self._vitals_stop.wait(max(0.0, nxt - time.monotonic()))

        self._vitals_thread = threading.Thread(target=run, name="vitals", daemon=True)
        self._vitals_thread.start()

    @staticmethod
    def _nodelay(_c: Any, _u: Any, sock: Any) -> None:
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self._vitals_stop.set()
        if self._vitals_thread is not None:
            self._vitals_thread.join(5)
        for c in (self.gw, self.panel):
            c.disconnect()
            c.loop_stop()

    # Runs in the simulator (this loop) when the gateway's write request reaches the server.
    def _on_write(self, _dev: Any, point: Any, value: Any) -> None:
        if point.name == SIREN_POINT:
            t = time.time()
            self.siren_writes += 1
            self._siren.put_nowait((t, bool(value)))

    # Runs in the panel's paho network thread.
    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        t = time.time()
        if msg.topic.startswith(ACK_TOPIC) or not msg.payload:
            return
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        self.guard_messages += 1
        self.loop.call_soon_threadsafe(self._guard.put_nowait, (t, doc))

    def _on_publish(self, _c: Any, _u: Any, mid: int, *_a: Any) -> None:
        self._pubacks[mid] = time.time()

    def puback(self, mid: int) -> float | None:
        return self._pubacks.pop(mid, None)

    def publish_sos(self, band: str) -> tuple[int, float, int]:
        self.seq += 1
        payload = json.dumps({"event": "sos", "hr": 88, "spo2": 97, "bat": 80, "worn": True, "rssi": -60,
                              "seq": self.seq}).encode()
        topic = f"iot/{GATEWAY}/{band}/data"
        t = time.time()
        info = self.gw.publish(topic, payload, qos=1)
        return self.seq, t, info.mid

    def resolve(self, alarm_id: str) -> float:
        """A panel may only acknowledge: resolve as the CLI does, through the daemon's control socket (in
        a thread, so the run goes on at once as it did with a publish)."""
        t = time.time()
        threading.Thread(target=self.control, args=("alarm", {"alarm_id": alarm_id, "action": "resolve",
                                                               "by": "bench"}), daemon=True).start()
        return t

    def acknowledge(self, alarm_id: str) -> None:
        """As a guard-room panel does: on its own ack topic."""
        self.panel.publish(f"{ACK_TOPIC}/{PANEL}", json.dumps({"alarm_id": alarm_id, "by": "bench"}).encode(),
                           qos=1)

    def control(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        import http.client

        if self.control_path is None:
            raise RuntimeError("the daemon's control socket is not known yet")
        conn = http.client.HTTPConnection("localhost", timeout=15)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.control_path)
        conn.sock = sock
        try:
            conn.request("POST", f"/{action}", body=json.dumps(args), headers={"Content-Type": "application/json"})
            body: dict[str, Any] = json.loads(conn.getresponse().read() or b"{}")
        finally:
            conn.close()
        return body

    def siren_on(self) -> bool:
        return bool(self.sim[UNIT].get(SIREN_POINT))

    async def siren_event(self, want: bool, timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                t, on = await asyncio.wait_for(self._siren.get(), left)
            except TimeoutError:
                return None
            if on == want:
                return t

    async def guard_state(self, want: Any, timeout_s: float) -> tuple[dict[str, Any], float] | None:
        """The next guard-room message for which ``want(doc)`` holds."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                t, doc = await asyncio.wait_for(self._guard.get(), left)
            except TimeoutError:
                return None
            if want(doc):
                return doc, t

    def drain(self) -> None:
        for q in (self._siren, self._guard):
            while not q.empty():
                q.get_nowait()


async def one_alarm(h: Helper, i: int, band: str, known: set[str], *, wait_resolved: bool = True) -> Sample:
    """Publish one SOS with the siren off; time the siren write; resolve the alarm, wait for the siren to go off
    and (unless told not to) for the guard-room message that the alarm is resolved, i.e. the daemon is done."""
    h.drain()
    seq, t_pub, mid = h.publish_sos(band)
    s = Sample(i, band, seq, t_pub)
    s.t_on = await h.siren_event(True, SIREN_TIMEOUT_S)
    s.t_puback = h.puback(mid)
    got = await h.guard_state(lambda d: d.get("kind") == "sos" and d.get("state") in ("raised", "notified")
                              and str(d.get("alarm_id")) not in known, 5.0 if s.t_on is not None else 1.0)
    if got is not None:
        s.alarm_id, s.t_guard = str(got[0]["alarm_id"]), got[1]
        known.add(s.alarm_id)
        s.t_resolve = h.resolve(s.alarm_id)
        s.t_off = await h.siren_event(False, 5.0)
        if wait_resolved:
            done = await h.guard_state(lambda d: d.get("alarm_id") == s.alarm_id and d.get("state") == "resolved", 5.0)
            s.t_done = None if done is None else done[1]
    return s


async def ensure_siren_off(h: Helper, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while h.siren_on():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def run_phase(h: Helper, name: str, n: int, args: argparse.Namespace, daemon_pid: int,
                    burners: list[subprocess.Popen[bytes]], known: set[str]) -> Phase:
    ph = Phase(name)
    ph.others = busy_others({os.getpid(), daemon_pid, *(b.pid for b in burners)})
    cpu0 = proc_cpu_s(daemon_pid)
    b0 = sum(proc_cpu_s(b.pid) for b in burners)
    m0 = machine_cpu()
    t0 = time.monotonic()
    next_at = time.monotonic()
    progress_every = max(1, n // 10)
    for i in range(n):
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if not await ensure_siren_off(h):
            ph.siren_stuck += 1
            print(f"    siren still on before alarm {i}; skipped", flush=True)
            next_at = time.monotonic() + args.interval
            continue
        started = time.monotonic()
        s = await one_alarm(h, i, band_id(i % args.residents), known, wait_resolved=not args.back_to_back)
        ph.samples.append(s)
        # The next SOS: --interval after this one, and at least --gap after the daemon finished this alarm.
        next_at = max(started + args.interval, time.monotonic() + (0 if args.back_to_back else args.gap))
        if (i + 1) % progress_every == 0:
            lat = sorted(x.latency_ms for x in ph.samples if x.latency_ms is not None)
            print(f"    {i + 1:5d}/{n}: p50 {pct(lat, 50):6.1f} ms  p99 {pct(lat, 99):6.1f} ms  "
                  f"max {pct(lat, 100):6.1f} ms", flush=True)
    ph.wall_s = time.monotonic() - t0
    ph.daemon_cpu_s = proc_cpu_s(daemon_pid) - cpu0
    ph.burners_cpu_s = sum(proc_cpu_s(b.pid) for b in burners) - b0
    m1 = machine_cpu()
    ph.machine_busy = (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
    return ph


# --- analysis ------------------------------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def summarize(ph: Phase, ncores: int) -> tuple[dict[str, float], list[str]]:
    lat = sorted(s.latency_ms for s in ph.samples if s.latency_ms is not None)
    missed = [s for s in ph.samples if s.t_on is None]
    no_alarm = sum(1 for s in ph.samples if s.alarm_id is None)
    guard = sorted((s.t_guard - s.t_on) * 1000 for s in ph.samples if s.t_guard and s.t_on)
    off = sorted((s.t_off - s.t_resolve) * 1000 for s in ph.samples if s.t_off and s.t_resolve)
    done = sorted((s.t_done - s.t_off) * 1000 for s in ph.samples if s.t_done and s.t_off)
    over = sum(1 for v in lat if v > TARGET_P99_MS)
    worst = sorted((s for s in ph.samples if s.latency_ms is not None), key=lambda s: -(s.latency_ms or 0))[:5]
    lines = [
        f"== {ph.name} ==",
        f"  SOS published {len(ph.samples):,}; siren switched on {len(lat):,}; missed (no siren write within "
        f"{SIREN_TIMEOUT_S:g} s) {len(missed):,}; new alarm on the guard topic {len(ph.samples) - no_alarm:,}; "
        f"siren still on before an SOS {ph.siren_stuck}",
        f"  SOS publish -> siren coil write: p50 {pct(lat, 50):.2f} ms  p90 {pct(lat, 90):.2f} ms  "
        f"p99 {pct(lat, 99):.2f} ms  p99.9 {pct(lat, 99.9):.2f} ms  max {pct(lat, 100):.2f} ms  "
        f"(min {pct(lat, 0):.2f} ms; {over} over {TARGET_P99_MS:g} ms)",
        f"  worst: {', '.join(f'#{s.i} {s.latency_ms:.1f} ms' for s in worst)}",
        f"  siren write -> guard-room topic (alarm durable): p50 {pct(guard, 50):.1f} ms  p99 {pct(guard, 99):.1f} ms"
        f"  max {pct(guard, 100):.1f} ms",
        f"  resolve publish -> siren off write: p50 {pct(off, 50):.1f} ms  p99 {pct(off, 99):.1f} ms  "
        f"max {pct(off, 100):.1f} ms",
        f"  siren off write -> guard-room topic 'resolved': p50 {pct(done, 50):.1f} ms  p99 {pct(done, 99):.1f} ms  "
        f"max {pct(done, 100):.1f} ms",
        f"  {ph.wall_s:.1f} s; daemon CPU {ph.daemon_cpu_s:.2f} s ({ph.daemon_cpu_s / ph.wall_s * 100:.0f}% of one "
        f"core); burners {ph.burners_cpu_s / ph.wall_s * 100:.0f}% of one core; whole machine "
        f"{ph.machine_busy * 100:.0f}% busy of {ncores} cores",
    ]
    if ph.others:
        lines.append(f"  other busy processes at the start: {'; '.join(ph.others)}")
    return {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": pct(lat, 100), "missed": len(missed),
            "raised": len(lat)}, lines


def analyze_trace(path: Path, phases: list[Phase]) -> list[str]:
    """Stage times inside the daemon, for SOS messages (joined by seq), from the traced daemon's rows."""
    import orjson

    if not path.exists():
        return [f"  (no trace file at {path})"]
    rows = [orjson.loads(line) for line in path.read_text().splitlines() if line]
    by_seq: dict[int, dict[str, float]] = {}
    cur: dict[str, float] | None = None
    for kind, t, arg in rows:
        if kind == "recv" and arg is not None:
            by_seq.setdefault(arg, {})["recv"] = t
        elif kind == "handle":
            cur = by_seq.setdefault(arg, {}) if arg is not None else None
            if cur is not None:
                cur["handle"] = t
        elif cur is not None:
            if kind == "raise" and "raise" not in cur:
                cur["raise"] = t
            elif kind == "switch" and arg == "siren:on" and "switch" not in cur:
                cur["switch"] = t
            elif kind == "switch_done" and arg == "siren:on" and "switch_done" not in cur:
                cur["switch_done"] = t
            elif kind == "switch_done" and arg == "strobe:on" and "strobe_done" not in cur:
                cur["strobe_done"] = t
            elif kind == "raise_done" and "raise_done" not in cur:
                cur["raise_done"] = t
            elif kind == "handled":
                cur["handled"] = t
                cur = None
    stalls = [(t, late) for kind, t, late in rows if kind == "stall"]
    pings = [(t, who) for kind, t, who in rows if kind == "ping"]
    gcs: list[tuple[float, float, int]] = []  # (start, end, generation) of the daemon's garbage collections
    gc_start: tuple[float, int] | None = None
    for kind, t, arg in rows:
        if kind == "gc_start":
            gc_start = (t, arg)
        elif kind == "gc_stop" and gc_start is not None:
            gcs.append((gc_start[0], t, gc_start[1]))
            gc_start = None
    out = []
    for ph in phases:
        t_lo, t_hi = ph.samples[0].t_pub if ph.samples else 0.0, (ph.samples[-1].t_pub + 1.0) if ph.samples else 0.0
        for gen in (0, 1, 2):
            pauses = sorted((e - b) * 1000 for b, e, g in gcs if g == gen and t_lo <= b <= t_hi)
            if pauses:
                out.append(f"  {ph.name}: daemon gen-{gen} garbage collections: {len(pauses)}, "
                           f"pause p50 {pct(pauses, 50):.2f} ms, max {pct(pauses, 100):.2f} ms")
        stages: dict[str, list[float]] = {k: [] for k in (
            "publish -> daemon reads it", "read -> consumer takes it", "consumer -> raise_", "raise_ -> siren switch",
            "siren switch -> coil write at server", "coil write -> switch returns", "siren on -> strobe on",
            "outputs on -> durable (events + state)", "total (publish -> coil write)")}
        for s in ph.samples:
            d = by_seq.get(s.seq)
            if not d or s.t_on is None or not all(k in d for k in ("recv", "handle", "raise", "switch", "switch_done")):
                continue
            stages["publish -> daemon reads it"].append(d["recv"] - s.t_pub)
            stages["read -> consumer takes it"].append(d["handle"] - d["recv"])
            stages["consumer -> raise_"].append(d["raise"] - d["handle"])
            stages["raise_ -> siren switch"].append(d["switch"] - d["raise"])
            stages["siren switch -> coil write at server"].append(s.t_on - d["switch"])
            stages["coil write -> switch returns"].append(d["switch_done"] - s.t_on)
            if "strobe_done" in d:
                stages["siren on -> strobe on"].append(d["strobe_done"] - d["switch_done"])
                if "raise_done" in d:
                    stages["outputs on -> durable (events + state)"].append(d["raise_done"] - d["strobe_done"])
            stages["total (publish -> coil write)"].append(s.t_on - s.t_pub)
        n = len(stages["total (publish -> coil write)"])
        out.append(f"  {ph.name}: {n} SOS traced (ms)")
        for name, vals in stages.items():
            v = sorted(x * 1000 for x in vals)
            out.append(f"    {name:40s} p50 {pct(v, 50):7.2f}  p90 {pct(v, 90):7.2f}  p99 {pct(v, 99):7.2f}  "
                       f"max {pct(v, 100):7.2f}")
        # The slowest alarms, stage by stage.
        worst = sorted((s for s in ph.samples if s.t_on is not None and s.seq in by_seq),
                       key=lambda s: -(s.latency_ms or 0))[:5]
        for s in worst:
            d = by_seq[s.seq]
            if s.t_on is None or not all(k in d for k in ("recv", "handle", "raise", "switch")):
                continue
            parts = [("broker/read", d["recv"] - s.t_pub), ("queue", d["handle"] - d["recv"]),
                     ("decode/rules", d["raise"] - d["handle"]), ("engine", d["switch"] - d["raise"]),
                     ("modbus", s.t_on - d["switch"])]
            overlap = [(e - b, g) for b, e, g in gcs if b < s.t_on and e > s.t_pub]
            gc_note = "".join(f"; a gen-{g} GC of {dur * 1000:.1f} ms ran meanwhile" for dur, g in overlap)
            if s.t_puback is not None:
                gc_note += f"; broker's PUBACK at +{(s.t_puback - s.t_pub) * 1000:.1f}"
            gc_note += "".join(f"; the daemon's client {who} sent a keepalive PINGREQ at {(t - s.t_pub) * 1000:+.1f}"
                               for t, who in pings if s.t_pub - 0.05 < t < s.t_on)
            gc_note += "".join(f"; daemon loop stalled {late * 1000:.1f} ms at +{(t - s.t_pub) * 1000:.1f}"
                               for t, late in stalls if s.t_pub - 0.05 < t < s.t_on)
            out.append(f"    slow #{s.i}: {s.latency_ms:.1f} ms = "
                       + " + ".join(f"{name} {v * 1000:.1f}" for name, v in parts) + gc_note)
    return out


def retained_states(port: int, wait_s: float = 1.0) -> dict[str, str]:
    """What a guard-room panel connecting now is told: the retained message per alarm topic (state)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    got: dict[str, str] = {}
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"late-panel-{os.getpid()}")

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if msg.retain and msg.payload and not msg.topic.startswith(ACK_TOPIC):
            with contextlib.suppress(ValueError):
                got[msg.topic] = str(json.loads(msg.payload).get("state"))

    c.on_connect = lambda cl, *_a: cl.subscribe(f"{GUARD_TOPIC}/+", qos=1)
    c.on_message = on_message
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    time.sleep(wait_s)
    c.disconnect()
    c.loop_stop()
    return got


def outbox_counts(db: Path) -> dict[str, int]:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT type, COUNT(*) FROM outbox WHERE type LIKE 'alarm.%' GROUP BY type").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        return {"error": 0, str(exc): 0}
    return {str(t): int(n) for t, n in rows}


def source_state() -> str:
    """The commit measured, and whether the product code differs from it (others edit it concurrently)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False,
                              capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "edgeagent", "drivers",
                                "cloud-bridge"], check=False, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "commit unknown"
    changed = [line[3:] for line in dirty.splitlines()]
    return f"commit {head or 'unknown'}" + (f" + uncommitted product changes ({', '.join(changed)})" if changed else "")


# --- main -------------------------------------------------------------------------------------------------

async def amain(args: argparse.Namespace, workdir: Path, broker: Mosquitto) -> tuple[list[Phase], dict[str, int]]:
    from edgeagent.drivers.modbus.profile import shipped_profile
    from edgeagent.drivers.modbus.sim import ProfileSimulator

    modbus_port = free_port()
    cfg = workdir / "edgeagent.yaml"
    state = workdir / "state"
    write_config(cfg, state, broker.port, modbus_port, args.residents, per_gateway=not args.one_connection)
    sim = ProfileSimulator({UNIT: shipped_profile("relay-io-8ch")}, port=modbus_port)
    await sim.start()
    loop = asyncio.get_running_loop()
    helper = Helper(loop, sim, broker.port)
    daemon_log = open(workdir / "daemon.log", "ab")  # noqa: SIM115
    trace_file = workdir / "trace.jsonl"
    cmd = ([sys.executable, "-c", TRACED_DAEMON, str(cfg), str(trace_file)] if args.trace
           else [sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)])
    daemon = subprocess.Popen(cmd, cwd=ROOT, stdout=daemon_log, stderr=daemon_log)
    burners: list[subprocess.Popen[bytes]] = []
    phases: list[Phase] = []
    retained: dict[str, str] = {}
    known: set[str] = set()
    try:
        # Warm-up: SOS once a second until the daemon is connected and sounds the siren, then a few more.
        print(f"daemon pid {daemon.pid} ({'traced' if args.trace else 'python -m edgeagent run'}); "
              f"waiting for it to sound the siren ...", flush=True)
        deadline = time.monotonic() + 30
        while True:
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited ({daemon.returncode}): see {workdir / 'daemon.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon did not sound the siren within 30 s")
            if helper.control_path is None and (state / "runtime.json").exists():
                with contextlib.suppress(ValueError, OSError):
                    helper.control_path = json.loads((state / "runtime.json").read_text())["control_socket"]
            if helper.control_path is None:
                await asyncio.sleep(0.2)
                continue
            s = await one_alarm(helper, -1, band_id(0), known)
            if s.t_on is not None and s.t_off is not None:
                break
            await asyncio.sleep(1.0)
        for _ in range(args.warmup):
            await ensure_siren_off(helper)
            await one_alarm(helper, -1, band_id(1 % args.residents), known)
            await asyncio.sleep(args.interval)
        helper.start_vitals(args.vitals_per_s, args.residents)
        await asyncio.sleep(1.0)
        spacing = (" (back to back)" if args.back_to_back
                   else f" and {args.gap * 1000:.0f} ms after the previous one is done")
        print(f"[1/2] {args.n:,} SOS alarms, at least {args.interval * 1000:.0f} ms apart{spacing}"
              f"{f', {args.vitals_per_s:g} background readings/s' if args.vitals_per_s else ''}"
              f", machine otherwise as it is "
              f"(load average {Path('/proc/loadavg').read_text().split()[0]}) ...", flush=True)
        phases.append(await run_phase(helper, "idle", args.n, args, daemon.pid, [], known))
        for core in args.burn_cores:
            burners.append(subprocess.Popen([sys.executable, "-c", BURNER, str(core)]))
        await asyncio.sleep(2.0)  # let the burners spin up
        print(f"[2/2] {args.n:,} SOS alarms with {len(burners)} busy process(es) pinned to core(s) "
              f"{','.join(map(str, args.burn_cores))} ...", flush=True)
        phases.append(await run_phase(helper, f"loaded ({len(burners)} busy process(es) pinned to core(s) "
                                      f"{','.join(map(str, args.burn_cores))})", args.n, args, daemon.pid, burners,
                                      known))
        for b in burners:
            stop_process(b, 5)
        burners.clear()
        phases.append(await flood_phase(helper, args, broker.port, daemon.pid, known))
        await asyncio.sleep(0.5)  # let the daemon finish the last alarm's resolve
        retained = await asyncio.to_thread(retained_states, broker.port)
    finally:
        for b in burners:
            stop_process(b, 5)
        # A request cut off by the daemon's shutdown makes pymodbus log an error with a frame dump.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        stop_process(daemon, 30)
        daemon_log.close()
        helper.close()
        await sim.stop()
    counts = outbox_counts(state / "outbox.db")
    counts["_siren_writes"] = helper.siren_writes
    counts["_guard_messages"] = helper.guard_messages
    counts["_vitals_sent"] = helper.vitals_sent
    counts["_retained"] = len(retained)
    counts["_retained_active"] = sum(1 for st in retained.values() if st in ("raised", "notified", "escalated"))
    return phases, counts


async def flood_phase(h: Helper, args: argparse.Namespace, port: int, daemon_pid: int, known: set[str]) -> Phase:
    """The idle phase again while one wristband floods SOS presses at full speed (a paho publisher with a
    bounded window, QoS 1, through its own gateway unless --one-connection): its alarm is acknowledged from
    the panel first, so its presses only fold (count) and the siren stays the measured residents' own."""
    how = "its own gateway connection" if not args.one_connection else "the one wildcard connection"
    print(f"[3/3] {args.n:,} SOS alarms while one wristband floods SOS presses at full speed ({how}) ...",
          flush=True)
    # A paho publisher in its own process, as fast as the broker acknowledges, with at most FLOOD_WINDOW
    # publishes in flight (``yes | mosquitto_pub -l`` queued stdin without bound: 16 GB in a minute).
    flooder = subprocess.Popen([sys.executable, "-c", FLOOD_SCRIPT, str(port), f"ble-{FLOOD_GATEWAY}-{os.getpid()}",
                                f"iot/{FLOOD_GATEWAY}/{FLOOD_BAND}/data", FLOOD_LINE, str(FLOOD_WINDOW)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        got = await h.guard_state(lambda d: d.get("resident_id") == "r-flood", 30.0)
        if got is None:
            raise RuntimeError("the flooding band's alarm was not raised within 30 s")
        flood_id = str(got[0]["alarm_id"])
        known.add(flood_id)
        h.acknowledge(flood_id)
        if not await ensure_siren_off(h, 10.0):
            raise RuntimeError("the siren stayed on after the flood's alarm was acknowledged")
        await asyncio.sleep(0.5)

        def flood_count() -> int:
            alarms = h.control("alarms", {}).get("result", {}).get("alarms", [])
            return next((int(a["count"]) for a in alarms if a["id"] == flood_id), 0)

        c0, t0 = await asyncio.to_thread(flood_count), time.monotonic()
        ph = await run_phase(h, f"flood (one wristband at full speed, {how})", args.n, args, daemon_pid, [],
                             known)
        c1, t1 = await asyncio.to_thread(flood_count), time.monotonic()
        ph.flood_rate = (c1 - c0) / max(1e-9, t1 - t0)
        ph.flood_count = c1
        print(f"    the flood: {c1 - c0:,} presses folded into its one alarm during the phase "
              f"({ph.flood_rate:,.0f}/s; count {c1:,})", flush=True)
        return ph
    finally:
        stop_process(flooder, 5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 alarms per phase instead of 1,000")
    ap.add_argument("-n", type=int, help="alarms per phase (default 1000, quick 200)")
    ap.add_argument("--interval", type=float, default=0.08,
                    help="at least this many seconds from one SOS to the next (default 0.08)")
    ap.add_argument("--gap", type=float, default=0.05,
                    help="and at least this long after the daemon has finished the previous alarm (default 0.05)")
    ap.add_argument("--back-to-back", action="store_true",
                    help="publish the next SOS as soon as the siren is off, without waiting for the daemon to "
                         "finish resolving the previous alarm (shows head-of-line blocking in its consumer)")
    ap.add_argument("--vitals-per-s", type=float, default=0,
                    help="background readings (no alarm) per second from the residents' bands over the same "
                         "gateway connection, during both phases (default 0)")
    ap.add_argument("--broker-nodelay", action="store_true",
                    help="run the local mosquitto with set_tcp_nodelay true (default: mosquitto's default, false)")
    ap.add_argument("--residents", type=int, default=100, help="residents, one band each, taking turns (default 100)")
    ap.add_argument("--warmup", type=int, default=10, help="alarms before measuring (default 10)")
    ap.add_argument("--burn-cores", default="0",
                    help="cores to burn in the loaded phase, one busy process each (default 0; '0,1' burns both)")
    ap.add_argument("--trace", action="store_true",
                    help="run the daemon with its stages timed (wrapped methods) and print where the time goes")
    ap.add_argument("--workdir", help="where the broker, config and daemon state go (default: a fresh temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--one-connection", action="store_true",
                    help="no 'gateways' in the config: the flood shares the one wildcard connection")
    args = ap.parse_args()
    args.n = args.n or (200 if args.quick else 1000)
    args.burn_cores = [int(c) for c in str(args.burn_cores).split(",") if c != ""]
    ncores = os.cpu_count() or 1
    if any(c >= ncores for c in args.burn_cores):
        ap.error(f"--burn-cores: this machine has cores 0..{ncores - 1}")

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    own_dir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgeagent-alarm-bench-"))
    broker = Mosquitto(workdir / "broker")
    if args.broker_nodelay:
        with broker.conf.open("a") as f:
            f.write("set_tcp_nodelay true\n")
    broker.start()
    nodelay = "true" if args.broker_nodelay else "false (default)"
    print(f"edgeagent {source_state()}; local broker mosquitto on 127.0.0.1:{broker.port} (set_tcp_nodelay "
          f"{nodelay}), cloud broker down (127.0.0.1:9); helper pid {os.getpid()}; {ncores} cores; "
          f"work dir {workdir}", flush=True)
    try:
        phases, counts = asyncio.run(amain(args, workdir, broker))
    finally:
        broker.stop()
    results = []
    print()
    for ph in phases:
        r, lines = summarize(ph, ncores)
        results.append(r)
        print("\n".join(lines))
    print(f"  daemon's outbox after the run (cloud down, so all unsent): "
          f"{', '.join(f'{k} {v:,}' for k, v in sorted(counts.items()) if not k.startswith('_'))}; "
          f"siren coil writes seen {counts['_siren_writes']:,}, guard-room messages {counts['_guard_messages']:,}, "
          f"background readings sent {counts['_vitals_sent']:,}")
    print(f"  a guard-room panel connecting after the run is given {counts['_retained']:,} retained alarm states on "
          f"{GUARD_TOPIC}/+, {counts['_retained_active']:,} of them 'raised'/'notified'/'escalated' "
          f"(every alarm was resolved)")
    if args.trace:
        print("\n== where the time goes inside the daemon (traced run) ==")
        print("\n".join(analyze_trace(workdir / "trace.jsonl", phases)))
    idle, loaded, flood = results
    print("\n== target ==")
    for name, r in (("idle", idle), ("loaded", loaded), ("flood", flood)):
        ok = r["p99"] < TARGET_P99_MS and r["missed"] == 0
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: p99 {r['p99']:.1f} ms < {TARGET_P99_MS:g} ms, "
              f"{r['missed']} missed")
    if own_dir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"RESULT p50_ms={idle['p50']:.1f} p99_ms={idle['p99']:.1f} max_ms={idle['max']:.1f} "
          f"loaded_p99_ms={loaded['p99']:.1f} loaded_max_ms={loaded['max']:.1f} "
          f"flood_p99_ms={flood['p99']:.1f} flood_max_ms={flood['max']:.1f} "
          f"flood_presses_per_s={phases[2].flood_rate:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
