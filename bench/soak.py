"""Soak benchmark: the real daemon under a steady mixed load for a long time; does its memory stay flat?

Run from the repository root::

    .venv/bin/python bench/soak.py                      # 60 minutes
    .venv/bin/python bench/soak.py --minutes 15 --tracemalloc 120   # where the memory goes (diagnosis)

The daemon runs as ``python -m edgeagent run --config ...`` in its **own process** (what is measured).
This process holds the peers, set up like bench/alarm_latency.py and bench/modbus.py:

* a private mosquitto as the cloud platform's broker (persistence on, so the platform subscriber's
  session survives the outages) and another as the box's local broker (wristbands, guard room);
* a pymodbus ``ProfileSimulator`` with a barrier gate (unit 1), an 8-port e-bike charger (unit 2) and a
  relay module (unit 3), polled by the daemon at 1 Hz; the charger's currents and temperatures move
  every second, the gate's loop detector every 30 s;
* 100 simulated sensors inside the daemon (``sim.sensor``, 1 s): 100 telemetry events/s;
* a BLE gateway publishing vitals from ``--residents`` bands (one reading per band every 5 s);
* every 2 minutes an SOS (the guard-room panel resolves it on the ack topic) and, offset by a minute, a
  signed ``gate.open`` from the platform (its result is awaited on ``cmd/res``);
* a cloud outage of ``--outage-s`` (default 30 s: the platform broker stopped, then restarted) every
  ``--outage-every-min`` minutes, the first one ``--first-outage-min`` in;
* the platform subscriber counts every event's ``seq`` (gaps = seqs missing between 1 and the highest
  seen, after the daemon stopped and flushed).

Every ``--sample-s`` seconds it reads the daemon's RSS, anonymous memory, open fds and threads from
/proc. The RSS slope is a least-squares fit over the samples after ``--warmup-min`` minutes (start-up,
the SQLite page cache and the allocator's arenas filling up). With ``--tracemalloc N`` the daemon
runs under tracemalloc (12 frames) and dumps a snapshot every N seconds; the bench then prints the
allocations that grew between the first snapshot after warm-up and the last, by traceback. That
daemon is slower and bigger; its RSS figures are not the product's.

The output ends with exactly one line:
``RESULT rss_slope_mb_per_h=R rss_start_mb=N rss_end_mb=N fds_growth=N gaps=N``
(start = first sample after warm-up, end = last sample). The ``rss_*`` figures are the daemon's
resident *anonymous* memory (RssAnon: its heaps and stacks, what a leak grows). The file-backed part of
the RSS (shared libraries' pages) is the kernel's to drop and page in again: on the shared bench machine
it fell by 18 MB in the middle of a run when the page cache was dropped, which would make any fitted
slope meaningless. Both are printed above the RESULT line, and every sample is written to
``samples.csv`` in the work directory (``--keep``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.alarm_latency import band_id, proc_cpu_s, stop_process  # noqa: E402 - after sys.path
from tests.peers import Mosquitto, free_port  # noqa: E402

SITE = "site-soak"
GATEWAY = "gw-soak"
BLE_GW = "gw-north"
BASE = f"edgeagent/v1/{SITE}/{GATEWAY}"
GUARD_TOPIC = "edgeagent/local/alarms"
ACK_TOPIC = f"{GUARD_TOPIC}/ack"
GATE_UNIT, CHARGER_UNIT, RELAY_UNIT = 1, 2, 3
TARGET_MB_PER_H = 1.0
PAGE = os.sysconf("SC_PAGE_SIZE")

# The daemon under tracemalloc: a thread dumps a snapshot every N seconds (it holds the GIL while it
# copies the traces, a pause the diagnosis run accepts), then the real CLI runs.
TRACED_DAEMON = """\
import os, sys, threading, time, tracemalloc
cfg, outdir, every = sys.argv[1], sys.argv[2], float(sys.argv[3])
tracemalloc.start(12)

def snapper():
    i = 0
    while True:
        time.sleep(every)
        snap = tracemalloc.take_snapshot()
        tmp = os.path.join(outdir, f"snap-{i:04d}.tmp")
        snap.dump(tmp)
        os.replace(tmp, os.path.join(outdir, f"snap-{i:04d}.tm"))
        del snap  # else it is alive (and traced) while the next one is taken
        i += 1

threading.Thread(target=snapper, name="soak-tracemalloc", daemon=True).start()
from edgeagent.cli import main
sys.argv = ["edgeagent", "run", "--config", cfg]
main()
"""

# The daemon with its memory taken apart, without tracemalloc's cost: every N seconds a thread writes
# one JSON line with glibc's malloc figures (mallinfo2: bytes in use, free inside the arenas, mmapped
# chunks), SQLite's own allocator total (sqlite3_memory_used, from the libsqlite3 that _sqlite3 links),
# CPython's allocated block count, and the RSS. Growth then lands on one of: Python objects, SQLite,
# other C allocations, or free-but-kept memory (fragmentation, arenas).
PROBED_DAEMON = """\
import ctypes, ctypes.util, json, os, sys, threading, time
cfg, out, every = sys.argv[1], sys.argv[2], float(sys.argv[3])

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
import _sqlite3
sqlite = None
with open("/proc/self/maps") as f:
    for line in f:
        if "libsqlite3" in line:
            sqlite = ctypes.CDLL(line.split()[-1])
            break
if sqlite is not None:
    sqlite.sqlite3_memory_used.restype = ctypes.c_int64

def probe():
    with open(out, "a") as f:
        while True:
            mi = libc.mallinfo2()
            rss = anon = 0
            with open("/proc/self/status") as st:
                for line in st:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon = int(line.split()[1]) * 1024
            f.write(json.dumps({"t": time.monotonic(), "rss": rss, "anon": anon,
                                "malloc_in_use": mi.uordblks + mi.hblkhd, "malloc_free": mi.fordblks,
                                "malloc_arena": mi.arena, "malloc_mmapped": mi.hblkhd,
                                "sqlite": sqlite.sqlite3_memory_used() if sqlite is not None else -1,
                                "py_blocks": sys.getallocatedblocks(),
                                "threads": threading.active_count()}) + "\\n")
            f.flush()
            time.sleep(every)

threading.Thread(target=probe, name="soak-probe", daemon=True).start()
from edgeagent.cli import main
sys.argv = ["edgeagent", "run", "--config", cfg]
main()
"""


# --- the daemon's config --------------------------------------------------------------------------------

def snapshot_tree(rev: str, dest: Path) -> Path:
    """The package as committed at ``rev``, laid out as installed (drivers/ as edgeagent/drivers, ...), so
    that a long run measures that commit while others keep editing the working tree. Returns the
    directory to put first on ``sys.path`` / ``PYTHONPATH`` (it wins over the editable install's finder,
    which sits at the end of ``sys.meta_path``)."""
    raw = dest / "git"
    raw.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "edgeagent", "drivers", "cloud-bridge",
                              "models"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(raw)], input=archive, check=True)
    site = dest / "site"
    site.mkdir()
    (raw / "edgeagent").rename(site / "edgeagent")
    for folder, name in (("drivers", "drivers"), ("cloud-bridge", "cloud_bridge"), ("models", "models")):
        if (raw / folder).exists():
            (raw / folder).rename(site / "edgeagent" / name)
    return site


def write_config(path: Path, state: Path, cloud_port: int, local_port: int, modbus_port: int, pub: Path,
                 args: argparse.Namespace) -> None:
    res = "\n".join(f'    - {{id: r-{i:04d}, name: Resident {i}, room: 1-{i:02d}, devices: ["{band_id(i)}"]}}'
                    for i in range(args.residents))
    sensors = "\n".join(f"  - {{type: sim.sensor, id: sensor-{i:03d}, interval_s: {args.sensor_interval_s}}}"
                        for i in range(args.sensors))
    path.write_text(f"""\
version: 1
site_id: {SITE}
gateway_id: {GATEWAY}
state_dir: {state}
log_level: warning
clock: {{sync: synced}}
health: {{enabled: false}}
uplink:
  broker: mqtt://127.0.0.1:{cloud_port}
  retry: {{first_max_s: 0.5, short_cap_s: 2}}
commands:
  public_keys: {{k1: {pub}}}
modbus:
  buses:
    lan: {{kind: tcp, host: 127.0.0.1, port: {modbus_port}}}
devices:
  - {{type: modbus.gate, id: car-gate, bus: lan, unit_id: {GATE_UNIT}, poll_interval_s: 1}}
  - {{type: modbus.charger, id: shed-a, bus: lan, unit_id: {CHARGER_UNIT}, poll_interval_s: 1}}
  - {{type: modbus.relay, id: guard-io, bus: lan, unit_id: {RELAY_UNIT}, poll_interval_s: 1,
      channels: {{1: siren, 2: strobe}}}}
{sensors}
wristbands:
  broker: mqtt://127.0.0.1:{local_port}
  inputs:
    - {{decoder: ble-json}}
  zones: {{{BLE_GW}: inside}}
  residents:
{res}
alarms:
  levels:
    - {{name: guard_room, targets: [guard_room]}}
notifiers:
  guard_room_panel: {{type: mqtt, topic: "compound/guard-room/alarms/{{target}}", targets: [guard_room]}}
""")


# --- /proc sampling ---------------------------------------------------------------------------------------

@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mb: float
    anon_mb: float
    fds: int
    threads: int
    received: int


def read_sample(pid: int, t: float, received: int) -> Sample | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    vals = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "Threads"):
            vals[key] = int(rest.split()[0])
    return Sample(t, vals.get("VmRSS", 0) / 1024, vals.get("RssAnon", 0) / 1024, fds, vals.get("Threads", 0),
                  received)


def slope_per_h(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (seconds), per hour."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return float("nan")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx * 3600


# --- the platform: subscriber and signed commands ---------------------------------------------------------

@dataclass
class Platform:
    """The cloud side on the platform broker: a persistent-session subscriber that marks every seq (a
    bitmap, so an hour at 100 events/s costs a few hundred kB here) and sends signed commands."""

    port: int
    key: Any
    seen: bytearray = field(default_factory=bytearray)
    received: int = 0
    duplicates: int = 0
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: Any = None
    _subscribed: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Platform:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 7200  # the outages must not end the session (and lose its queue)
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5,
                        client_id=f"soak-platform-{os.getpid()}")
        c.on_connect = lambda cl, *_a: cl.subscribe([(f"{BASE}/events/#", 1), (f"{BASE}/cmd/res", 1)])
        c.on_subscribe = lambda *_a: self._subscribed.set()
        c.on_message = self._on_message
        c.reconnect_delay_set(0.2, 1.0)
        c.connect_async("127.0.0.1", self.port, keepalive=10, clean_start=False, properties=props)
        c.loop_start()
        self._client = c
        if not self._subscribed.wait(10):
            raise RuntimeError("the platform subscriber could not subscribe")
        return self

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        import orjson

        doc = orjson.loads(msg.payload)
        with self._lock:
            if msg.topic.endswith("/cmd/res"):
                self.results[str(doc.get("command_id"))] = doc
                return
            for e in doc["events"]:
                s = int(e["seq"])
                if s >= len(self.seen):
                    self.seen.extend(bytes(max(s + 1 - len(self.seen), 65536)))
                if self.seen[s]:
                    self.duplicates += 1
                else:
                    self.seen[s] = 1
                    self.received += 1

    def gaps(self) -> tuple[int, int]:
        """(seqs missing between 1 and the highest seen, the highest seen)."""
        with self._lock:
            top = max((i for i in range(len(self.seen) - 1, 0, -1) if self.seen[i]), default=0)
            return top - sum(self.seen[1:top + 1]), top

    def send_command(self, command: str, args: dict[str, Any]) -> str | None:
        from edgeagent.kernel.pipeline.commands import sign_command

        if not self._client.is_connected():
            return None
        now = datetime.now(UTC)
        cid = f"soak-{secrets.token_hex(6)}"
        body = {"id": cid, "site_id": SITE, "gateway_id": GATEWAY, "command": command, "args": args,
                "issued_at": now.isoformat().replace("+00:00", "Z"),
                "expires_at": (now + timedelta(seconds=60)).isoformat().replace("+00:00", "Z"),
                "nonce": secrets.token_hex(16), "issuer": "soak-platform"}
        self._client.publish(f"{BASE}/cmd/req", sign_command(self.key, "k1", body), qos=1)
        return cid

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()


# --- the box's side: BLE gateway and guard-room panel on the local broker --------------------------------

class LocalSide:
    def __init__(self, port: int, residents: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.residents = residents
        self.vitals_sent = 0
        self.guard: dict[str, str] = {}  # alarm id -> last state seen on the guard-room topic
        self._lock = threading.Lock()
        self._stop = threading.Event()
        subscribed = threading.Event()
        panel = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"soak-panel-{os.getpid()}")
        panel.on_connect = lambda cl, *_a: cl.subscribe(f"{GUARD_TOPIC}/+", qos=1)
        panel.on_subscribe = lambda *_a: subscribed.set()
        panel.on_message = self._on_guard
        panel.connect("127.0.0.1", port, keepalive=30)
        panel.loop_start()
        gw = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"soak-ble-{os.getpid()}")
        gw.connect("127.0.0.1", port, keepalive=30)
        gw.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the guard-room panel could not subscribe")
        self.panel, self.gw = panel, gw
        self.seq = 0
        self._thread = threading.Thread(target=self._vitals, name="soak-vitals", daemon=True)

    def _on_guard(self, _c: Any, _u: Any, msg: Any) -> None:
        if msg.topic == ACK_TOPIC or not msg.payload:
            return
        with contextlib.suppress(ValueError):
            doc = json.loads(msg.payload)
            with self._lock:
                # Only the latest state per alarm: the dict grows by one entry per SOS (30 an hour).
                self.guard[str(doc.get("alarm_id"))] = str(doc.get("state"))

    def _vitals(self) -> None:
        interval = 5.0 / max(1, self.residents)  # each band every 5 s
        nxt = time.monotonic()
        k = 0
        while not self._stop.is_set():
            self.publish(band_id(k % self.residents), "none", 70 + k % 10)
            self.vitals_sent += 1
            k += 1
            nxt += interval
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def publish(self, band: str, event: str, hr: int = 88) -> None:
        self.seq += 1
        payload = json.dumps({"event": event, "hr": hr, "spo2": 97, "bat": 80, "worn": True, "rssi": -60,
                              "seq": self.seq}).encode()
        self.gw.publish(f"iot/{BLE_GW}/{band}/data", payload, qos=1)

    def active_sos(self, known: set[str]) -> str | None:
        with self._lock:
            for aid, st in self.guard.items():
                if aid not in known and st in ("raised", "notified", "escalated"):
                    return aid
        return None

    def resolve(self, alarm_id: str) -> None:
        self.panel.publish(ACK_TOPIC, json.dumps({"alarm_id": alarm_id, "action": "resolve",
                                                  "by": "soak"}).encode(), qos=1)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for c in (self.gw, self.panel):
            c.disconnect()
            c.loop_stop()


# --- the run -------------------------------------------------------------------------------------------------

@dataclass
class Counts:
    sos_sent: int = 0
    sos_resolved: int = 0
    gate_sent: int = 0
    gate_ok: int = 0
    outages: int = 0


async def move_devices(sim: Any, stop: asyncio.Event) -> None:
    """The charger's ports draw current and warm up and down; a car reaches the gate every 30 s."""
    charger, gate = sim[CHARGER_UNIT], sim[GATE_UNIT]
    for p in range(1, 9):
        charger.set(f"port{p}_voltage", 230.0)
    k = 0
    while not stop.is_set():
        for p in range(1, 9):
            charger.set(f"port{p}_current", round(1.0 + 0.1 * ((k + p) % 10), 2))
            charger.set(f"port{p}_temperature", round(30.0 + (k + p) % 7, 1))
        if k % 30 == 0:
            gate.set("vehicle_present", (k // 30) % 2 == 0)
        k += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def sos_and_gate(local: LocalSide, platform: Platform, counts: Counts, stop: asyncio.Event,
                       period_s: float) -> None:
    """Every period: an SOS, resolved by the guard room once raised; half a period later a signed gate.open."""
    known: set[str] = set()
    k = 0
    while not stop.is_set():
        local.publish(band_id(k % local.residents), "sos")
        counts.sos_sent += 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not stop.is_set():
            aid = local.active_sos(known)
            if aid is not None:
                known.add(aid)
                local.resolve(aid)
                counts.sos_resolved += 1
                break
            await asyncio.sleep(0.1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period_s / 2)
        if stop.is_set():
            break
        if platform.send_command("gate.open", {"device_id": "car-gate", "reason": "visitor"}) is not None:
            counts.gate_sent += 1
        k += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period_s / 2)


async def outages(cloud: Mosquitto, counts: Counts, stop: asyncio.Event, first_s: float, every_s: float,
                  outage_s: float, t0: float) -> None:
    nxt = t0 + first_s
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, nxt - time.monotonic()))
        if stop.is_set():
            return
        await asyncio.to_thread(cloud.stop)
        counts.outages += 1
        print(f"  {time.monotonic() - t0:7.0f} s  cloud broker down for {outage_s:.0f} s", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), outage_s)
        await asyncio.to_thread(cloud.start)
        nxt += every_s


def outbox_unsent(db: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM outbox WHERE sent_ms IS NULL").fetchone()[0])
    except sqlite3.Error:
        return -1


def probe_report(path: Path, warm_s: float) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    if len(rows) < 3:
        return ["  (too few probe lines)"]
    t0 = rows[0]["t"]
    warm = [r for r in rows if r["t"] - t0 >= warm_s] or rows[-2:]
    xs = [r["t"] for r in warm]
    lines = []
    for key, label, scale in (("rss", "RSS", 1 << 20), ("anon", "anonymous RSS", 1 << 20),
                              ("malloc_in_use", "malloc: in use", 1 << 20),
                              ("malloc_free", "malloc: free, kept in the arenas", 1 << 20),
                              ("malloc_arena", "malloc: arena bytes (brk + thread arenas)", 1 << 20),
                              ("malloc_mmapped", "malloc: large chunks (mmap)", 1 << 20),
                              ("sqlite", "SQLite allocator", 1 << 20),
                              ("py_blocks", "CPython allocated blocks (thousands)", 1000),
                              ("threads", "threads", 1)):
        ys = [r[key] / scale for r in warm]
        lines.append(f"  {label:44s} {rows[0][key] / scale:9.2f} -> {warm[0][key] / scale:9.2f} -> "
                     f"{warm[-1][key] / scale:9.2f}   {slope_per_h(xs, ys):+8.2f} /h after warm-up")
    return lines


def tracemalloc_report(snaps: list[Path], warm_s: float, every_s: float, top: int) -> list[str]:
    import tracemalloc

    if len(snaps) < 2:
        return ["  (fewer than two snapshots)"]
    first_i = min(len(snaps) - 2, max(0, int(warm_s // every_s) - 1))
    a = tracemalloc.Snapshot.load(str(snaps[first_i]))
    b = tracemalloc.Snapshot.load(str(snaps[-1]))
    hours = (len(snaps) - 1 - first_i) * every_s / 3600
    filters = [tracemalloc.Filter(False, tracemalloc.__file__),
               tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    a, b = a.filter_traces(filters), b.filter_traces(filters)
    total_a = sum(s.size for s in a.statistics("filename"))
    total_b = sum(s.size for s in b.statistics("filename"))
    lines = [f"  traced Python memory {total_a / 1e6:.2f} MB (snapshot {first_i}) -> {total_b / 1e6:.2f} MB "
             f"(snapshot {len(snaps) - 1}), {(total_b - total_a) / 1e6 / hours:+.2f} MB/h over {hours * 60:.0f} min"]
    lines.append("  grew most, by line:")
    for st in b.compare_to(a, "lineno")[:top]:
        if st.size_diff <= 0:
            break
        lines.append(f"    {st.size_diff / 1024:+9.1f} kB {st.count_diff:+7d} blocks  {st.traceback[0]}")
    lines.append("  grew most, by traceback (innermost last):")
    for st in b.compare_to(a, "traceback")[:top]:
        if st.size_diff <= 0:
            break
        lines.append(f"    {st.size_diff / 1024:+9.1f} kB {st.count_diff:+7d} blocks")
        lines.extend(f"        {fr}" for fr in list(st.traceback)[-8:])
    return lines


async def amain(args: argparse.Namespace, workdir: Path, cloud: Mosquitto, local_broker: Mosquitto
                ) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgeagent.drivers.modbus.profile import shipped_profile
    from edgeagent.drivers.modbus.sim import ProfileSimulator, gate_mechanics

    key = Ed25519PrivateKey.generate()
    pub = workdir / "platform-k1.pub.pem"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    modbus_port = free_port()
    sim = ProfileSimulator({GATE_UNIT: shipped_profile("barrier-gate-generic"),
                            CHARGER_UNIT: shipped_profile("ebike-charger-8port"),
                            RELAY_UNIT: shipped_profile("relay-io-8ch")}, port=modbus_port)
    sim[GATE_UNIT].on_write.append(gate_mechanics)
    await sim.start()
    cfg = workdir / "edgeagent.yaml"
    state = workdir / "state"
    write_config(cfg, state, cloud.port, local_broker.port, modbus_port, pub, args)
    platform = Platform(cloud.port, key).start()
    local = LocalSide(local_broker.port, args.residents)
    snapdir = workdir / "tracemalloc"
    if args.tracemalloc:
        snapdir.mkdir(exist_ok=True)
        cmd = [sys.executable, "-c", TRACED_DAEMON, str(cfg), str(snapdir), str(args.tracemalloc)]
    elif args.probe:
        cmd = [sys.executable, "-c", PROBED_DAEMON, str(cfg), str(workdir / "probe.jsonl"), str(args.probe)]
    else:
        cmd = [sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)]
    env = dict(os.environ)
    if args.site is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(args.site), env.get("PYTHONPATH")) if p)
    daemon_log = open(workdir / "daemon.log", "ab")  # noqa: SIM115 - closed in finally
    # Not the repository as the working directory: "-c" and "-m" put it first on sys.path, ahead of --from-git.
    daemon = subprocess.Popen(cmd, cwd=workdir, stdout=daemon_log, stderr=daemon_log, env=env)
    samples: list[Sample] = []
    counts = Counts()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        deadline = time.monotonic() + 60
        while platform.received == 0:  # gateway.started reached the platform: the daemon is up
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited ({daemon.returncode}): see {workdir / 'daemon.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError("no event from the daemon within 60 s")
            await asyncio.sleep(0.2)
        t0 = time.monotonic()
        cpu0 = proc_cpu_s(daemon.pid)
        local._thread.start()
        tasks = [asyncio.create_task(move_devices(sim, stop)),
                 asyncio.create_task(sos_and_gate(local, platform, counts, stop, args.command_period_s)),
                 asyncio.create_task(outages(cloud, counts, stop, args.first_outage_min * 60,
                                             args.outage_every_min * 60, args.outage_s, t0))]
        end = t0 + args.minutes * 60
        next_print = t0
        while time.monotonic() < end:
            if daemon.poll() is not None:
                raise RuntimeError(f"daemon exited ({daemon.returncode}): see {workdir / 'daemon.log'}")
            s = read_sample(daemon.pid, time.monotonic() - t0, platform.received)
            if s is not None:
                samples.append(s)
                if time.monotonic() >= next_print:
                    print(f"  {s.t:7.0f} s  rss {s.rss_mb:6.1f} MB  anon {s.anon_mb:6.1f} MB  fds {s.fds:3d}  "
                          f"threads {s.threads:2d}  events at the platform {s.received:,}", flush=True)
                    next_print += args.print_every_min * 60
            await asyncio.sleep(min(args.sample_s, max(0.0, end - time.monotonic())) or 0.01)
        cpu_s = proc_cpu_s(daemon.pid) - cpu0
        wall_s = time.monotonic() - t0
        stop.set()
        await asyncio.gather(*tasks)
        if cloud.proc is None:
            cloud.start()
        await asyncio.sleep(5)
        counts.gate_ok = sum(1 for res in list(platform.results.values()) if res.get("ok"))
        local.close()
        # Let the last events reach the platform, then stop the daemon (it flushes what is left).
        await asyncio.sleep(5)
        stop_process(daemon, 60)
        await asyncio.sleep(3)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        stop_process(daemon, 30)
        daemon_log.close()
        local.close()
        platform.stop()
        await sim.stop()
    gaps, top = platform.gaps()
    return {"samples": samples, "counts": counts, "gaps": gaps, "top_seq": top, "received": platform.received,
            "duplicates": platform.duplicates, "unsent": outbox_unsent(state / "outbox.db"), "cpu_s": cpu_s,
            "wall_s": wall_s, "vitals": local.vitals_sent,
            "snaps": sorted(snapdir.glob("snap-*.tm")) if args.tracemalloc else []}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60, help="how long the load runs (default 60)")
    ap.add_argument("--warmup-min", type=float, default=10,
                    help="the RSS slope is fitted after this many minutes (default 10)")
    ap.add_argument("--sensors", type=int, default=100, help="simulated sensors in the daemon (default 100)")
    ap.add_argument("--sensor-interval-s", type=float, default=1.0, help="their reading interval (default 1)")
    ap.add_argument("--residents", type=int, default=50, help="wristbands, each reporting every 5 s (default 50)")
    ap.add_argument("--command-period-s", type=float, default=120,
                    help="an SOS and a signed gate.open every this many seconds (default 120)")
    ap.add_argument("--first-outage-min", type=float, default=12, help="first 30 s cloud outage (default 12)")
    ap.add_argument("--outage-every-min", type=float, default=20, help="then one every ... minutes (default 20)")
    ap.add_argument("--outage-s", type=float, default=30, help="how long each cloud outage lasts (default 30)")
    ap.add_argument("--sample-s", type=float, default=10, help="/proc sampling interval (default 10)")
    ap.add_argument("--print-every-min", type=float, default=5, help="progress lines (default every 5 min)")
    ap.add_argument("--tracemalloc", type=float, default=0, metavar="N",
                    help="run the daemon under tracemalloc, a snapshot every N seconds, and report the growth")
    ap.add_argument("--probe", type=float, default=0, metavar="N",
                    help="run the daemon with a thread that records glibc malloc, SQLite and CPython memory "
                         "figures every N seconds, and report the slope of each")
    ap.add_argument("--top", type=int, default=12, help="lines of the tracemalloc report (default 12)")
    ap.add_argument("--from-git", metavar="REV",
                    help="run the code committed at REV (e.g. HEAD), not the working tree (which others may be "
                         "editing during an hour-long run)")
    ap.add_argument("--workdir", help="where brokers, config and state go (default: a fresh temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    own_dir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgeagent-soak-"))
    args.site = None
    if args.from_git:
        args.site = snapshot_tree(args.from_git, workdir / "src")
        sys.path.insert(0, str(args.site))  # this process's simulator and signing come from it too
    cloud = Mosquitto(workdir / "cloud", persistence=True)
    local_broker = Mosquitto(workdir / "local")
    cloud.start()
    local_broker.start()
    print(f"soak: {args.minutes:g} min, {args.sensors} sensors every {args.sensor_interval_s:g} s, "
          f"{args.residents} bands every 5 s, gate/charger/relay at 1 Hz, SOS and gate.open every "
          f"{args.command_period_s:g} s, a {args.outage_s:g} s cloud outage at {args.first_outage_min:g} min and every "
          f"{args.outage_every_min:g} min; slope after {args.warmup_min:g} min"
          f"{f'; tracemalloc every {args.tracemalloc:g} s' if args.tracemalloc else ''}; "
          f"code {'at ' + args.from_git if args.from_git else 'of the working tree'}; work dir {workdir}",
          flush=True)
    try:
        r = asyncio.run(amain(args, workdir, cloud, local_broker))
    finally:
        cloud.stop()
        local_broker.stop()
    samples: list[Sample] = r["samples"]
    warm = [s for s in samples if s.t >= args.warmup_min * 60] or samples[-2:]
    rss_slope = slope_per_h([s.t for s in warm], [s.rss_mb for s in warm])
    slope = slope_per_h([s.t for s in warm], [s.anon_mb for s in warm])
    with (workdir / "samples.csv").open("w") as f:
        f.write("t_s,rss_mb,anon_mb,fds,threads,received\n")
        f.writelines(f"{s.t:.1f},{s.rss_mb:.2f},{s.anon_mb:.2f},{s.fds},{s.threads},{s.received}\n" for s in samples)
    c: Counts = r["counts"]
    print(f"\n== {r['wall_s'] / 60:.1f} min, daemon CPU {r['cpu_s'] / r['wall_s'] * 100:.1f}% of a core ==")
    print(f"  RSS {samples[0].rss_mb:.1f} MB at the start, {warm[0].rss_mb:.1f} MB after warm-up, "
          f"{warm[-1].rss_mb:.1f} MB at the end (max {max(s.rss_mb for s in samples):.1f}); fitted after warm-up "
          f"{rss_slope:+.2f} MB/h")
    print(f"  anonymous RSS {samples[0].anon_mb:.1f} MB at the start, {warm[0].anon_mb:.1f} MB after warm-up, "
          f"{warm[-1].anon_mb:.1f} MB at the end (max {max(s.anon_mb for s in samples):.1f}); fitted after warm-up "
          f"{slope:+.2f} MB/h")
    print(f"  fds {samples[0].fds} -> {samples[-1].fds}, threads {samples[0].threads} -> {samples[-1].threads}")
    print(f"  platform: {r['received']:,} events, highest seq {r['top_seq']:,}, gaps {r['gaps']}, "
          f"duplicates {r['duplicates']:,}; unsent in the outbox after stop {r['unsent']}")
    print(f"  SOS {c.sos_sent} sent / {c.sos_resolved} resolved by the guard room; gate.open {c.gate_sent} sent / "
          f"{c.gate_ok} ok; {c.outages} cloud outages; {r['vitals']:,} band readings")
    if args.tracemalloc:
        print("\n== tracemalloc (daemon) ==")
        print("\n".join(tracemalloc_report(r["snaps"], args.warmup_min * 60, args.tracemalloc, args.top)))
    if args.probe:
        print("\n== where the memory is (daemon, --probe) ==")
        print("\n".join(probe_report(workdir / "probe.jsonl", args.warmup_min * 60)))
    ok = slope < TARGET_MB_PER_H and r["gaps"] == 0
    print(f"\n  {'PASS' if ok else 'FAIL'}  anonymous RSS slope {slope:+.2f} MB/h < {TARGET_MB_PER_H:g} MB/h, "
          f"{r['gaps']} gaps")
    if own_dir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"RESULT rss_slope_mb_per_h={slope:.2f} rss_start_mb={warm[0].anon_mb:.1f} rss_end_mb={warm[-1].anon_mb:.1f} "
          f"fds_growth={samples[-1].fds - warm[0].fds} gaps={r['gaps']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
