"""Uplink benchmark: source → Outbox (durable, fsync per group commit) → Uplink → mosquitto → subscriber.

Run from the repository root::

    .venv/bin/python bench/uplink.py            # full run (~1-2 min)
    .venv/bin/python bench/uplink.py --quick    # short run (~30 s)

Three measurements against one private mosquitto on a free loopback port, with the subscriber in a
separate process (its own interpreter and GIL) that counts events and stamps their receipt time:

1. bare: a plain paho-mqtt QoS 1 publisher, one event envelope per MQTT message, no outbox;
2. whole path: several producers make events (EventFactory.make) and ``await outbox.put_many`` them in
   chunks at full speed for a fixed time, while the Uplink ships them in batch messages; every event is
   committed with fsync before ``put_many`` returns, and the Uplink only ever leases committed rows;
3. drain: a backlog is put into the outbox while the Uplink is not running, then the Uplink starts while
   a producer keeps adding new events at a modest rate; the backlog drain rate is measured from the
   moment the connection is up until the subscriber has received the last backlog event.

Creation times are kept per ``seq`` on the producer side and joined with the subscriber's receipt times
after the run (wall clock, one machine). Peak RSS is the benchmark/gateway process's ``ru_maxrss``.
The output ends with one ``RESULT ...`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.peers import Mosquitto  # noqa: E402 - after the repo root is on sys.path

# Slots in the shared counter array written by the subscriber process.
C_BARE, C_TPUT, C_DRAIN, C_DRAIN_BACKLOG, C_DUP = range(5)
GW_TPUT = "gw-tput"
GW_DRAIN = "gw-drain"
SITE = "bench"
BARE_TOPIC = "bench/bare/events"

TARGET_EPS = 20_000
TARGET_RATIO = 0.5
TARGET_DRAIN = 10_000
THINGSBOARD_REF = 1_400  # ThingsBoard IoT Gateway 3.8.5, messages/s, same machine kind


# --- broker ------------------------------------------------------------------------------------------

# The broker: the tests' private mosquitto on a free loopback port (tests/peers.py).

# --- subscriber process -----------------------------------------------------------------------------

def subscriber_main(port: int, conn: Any, counters: Any, backlog_max: Any) -> None:
    """Runs in its own process: subscribe, count, stamp receipt times; dump them on request."""
    import orjson
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    bare_times = array("d")
    seqs: dict[str, array[int]] = {GW_TPUT: array("q"), GW_DRAIN: array("q")}
    times: dict[str, array[float]] = {GW_TPUT: array("d"), GW_DRAIN: array("d")}
    subscribed = threading.Event()
    now = time.time

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        t = now()
        topic = msg.topic
        if topic == BARE_TOPIC:
            bare_times.append(t)
            counters[C_BARE] += 1
            return
        gw = topic.split("/")[3]
        events = orjson.loads(msg.payload)["events"]
        s_arr = seqs[gw]
        t_arr = times[gw]
        limit = backlog_max.value
        n_backlog = 0
        for e in events:
            s = e["seq"]
            s_arr.append(s)
            t_arr.append(t)
            if s <= limit:
                n_backlog += 1
        if gw == GW_TPUT:
            counters[C_TPUT] += len(events)
        else:
            counters[C_DRAIN] += len(events)
            counters[C_DRAIN_BACKLOG] += n_backlog

    def on_connect(c: Any, *_a: Any) -> None:
        c.subscribe([(BARE_TOPIC, 1), (f"edgeagent/v1/{SITE}/+/events/#", 1)])

    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}",
                         protocol=paho.MQTTv311, clean_session=True)
    client.max_inflight_messages_set(0)
    client.on_connect = on_connect
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    if not subscribed.wait(10):
        conn.send("subscribe timeout")
        return
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd == "dump":
            conn.send({
                "bare_times": bare_times.tobytes(),
                "seqs": {k: v.tobytes() for k, v in seqs.items()},
                "times": {k: v.tobytes() for k, v in times.items()},
            })
        elif cmd == "stop":
            break
    client.loop_stop()
    client.disconnect()


# --- helpers ------------------------------------------------------------------------------------------

def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


async def wait_counter(counters: Any, idx: int, target: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if counters[idx] >= target:
            return True
        await asyncio.sleep(0.005)
    return counters[idx] >= target


@dataclass
class CreatedLog:
    """Creation wall time per seq, stored as runs (first_seq, n, t): put_many returns contiguous seqs."""

    runs: list[tuple[int, int, float]] = field(default_factory=list)

    def add(self, seqs: list[int], t: float) -> None:
        if seqs and seqs[-1] - seqs[0] == len(seqs) - 1:
            self.runs.append((seqs[0], len(seqs), t))
        else:  # not expected (no coalescing for this type), but be exact if it happens
            self.runs.extend((s, 1, t) for s in seqs)

    def created_map(self, lo: int = 0, hi: int = 1 << 62) -> dict[int, float]:
        out: dict[int, float] = {}
        for first, n, t in self.runs:
            for s in range(max(first, lo), min(first + n, hi + 1)):
                out[s] = t
        return out

    @property
    def count(self) -> int:
        return sum(n for _f, n, _t in self.runs)


def uplink_cfg(url: str, batch_max_events: int, max_inflight_batches: int) -> Any:
    from edgeagent.kernel.config.schema import UplinkConfig

    return UplinkConfig.model_validate({
        "broker": url,
        "batch_max_events": batch_max_events,
        "max_inflight_batches": max_inflight_batches,
        "retry": {"first_max_s": 0.2, "short_cap_s": 0.5},
        "connect_timeout_s": 5,
    })


async def wait_connected(up: Any, task: asyncio.Task[None], timeout_s: float = 10.0) -> float:
    """Wall time of the connection (from the uplink's monotonic connected_since)."""
    deadline = time.monotonic() + timeout_s
    while up.connected_since is None:
        if task.done():
            task.result()
            raise RuntimeError("uplink task ended before connecting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"uplink did not connect: {up.last_error}")
        await asyncio.sleep(0.001)
    return time.time() - (time.monotonic() - up.connected_since)


# --- phase 1: bare paho publisher ----------------------------------------------------------------------

def run_bare(port: int, n: int, counters: Any, factory: Any, max_inflight: int) -> dict[str, Any]:
    """A plain paho QoS 1 publisher, one envelope per message, no outbox.

    Single-threaded (the client's own ``loop()`` drives the socket; no second thread contending for the
    GIL), keeping at most ``max_inflight`` messages unacknowledged. This was the fastest plain-paho
    variant we measured (a loop_start() thread plus a semaphore was 10-40% slower).
    """
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    # A pool of real envelopes, built before timing starts (so this measures the publisher alone).
    pool = [factory.make("contact.changed", f"plc-0-reg-{i}", {"state": "open", "contact": "door"}).to_json(i + 1)
            for i in range(1000)]
    acked = [0]

    def on_publish(*_a: Any) -> None:
        acked[0] += 1

    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-bare-{max_inflight}",
                         protocol=paho.MQTTv5)
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port, keepalive=60)
    deadline = time.monotonic() + 10
    while not client.is_connected():
        client.loop(0.01)
        if time.monotonic() > deadline:
            raise RuntimeError("bare publisher did not connect")
    base = counters[C_BARE]
    publish = client.publish
    i = 0
    t0 = time.time()
    deadline = time.monotonic() + 300
    while acked[0] < n and time.monotonic() < deadline:
        while i < n and i - acked[0] < max_inflight:
            publish(BARE_TOPIC, pool[i % 1000], qos=1)
            i += 1
        client.loop(0.01)
    t_acked = time.time()
    deadline = time.monotonic() + 60
    while counters[C_BARE] - base < n and time.monotonic() < deadline:
        time.sleep(0.002)
    client.disconnect()
    client.loop(0.1)
    return {"inflight": max_inflight, "n": n, "t0": t0, "t_acked": t_acked, "acked": acked[0],
            "base": base, "received": counters[C_BARE] - base}


# --- phase 2: whole path --------------------------------------------------------------------------------

async def producer_full_speed(ob: Any, factory: Any, pid: int, chunk: int, stop: asyncio.Event,
                              created: CreatedLog) -> None:
    data = {"state": "open", "contact": "door"}
    devices = [f"plc-{pid}-reg-{i}" for i in range(chunk)]
    make = factory.make
    while not stop.is_set():
        t = time.time()
        events = [make("contact.changed", dev, data) for dev in devices]
        seqs = await ob.put_many(events)
        created.add(seqs, t)


async def run_whole_path(url: str, workdir: Path, counters: Any, args: argparse.Namespace,
                         factory_cls: Any) -> dict[str, Any]:
    from edgeagent.cloud_bridge.uplink import Uplink
    from edgeagent.kernel.pipeline.event_types import REGISTRY
    from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
    from edgeagent.kernel.runtime.clock import Clock

    factory = factory_cls(REGISTRY, SITE, GW_TPUT, Clock(mode="synced"))
    ob = Outbox(OutboxConfig(workdir / "tput.db", durability="full"))
    await ob.open()
    up = Uplink(uplink_cfg(url, args.batch_max_events, args.max_inflight_batches),
                site_id=SITE, gateway_id=GW_TPUT, outbox=ob, version="bench")
    task = asyncio.create_task(up.run(), name="uplink")
    await wait_connected(up, task)
    created = CreatedLog()
    stop = asyncio.Event()
    stats0 = await ob.stats()
    cpu0 = time.process_time()
    t_start = time.time()
    producers = [asyncio.create_task(producer_full_speed(ob, factory, p, args.chunk, stop, created))
                 for p in range(args.producers)]
    await asyncio.sleep(args.duration)
    stop.set()
    t_end = time.time()
    await asyncio.gather(*producers)
    cpu_window = time.process_time() - cpu0
    t_produced_end = time.time()
    total = created.count
    # Let the uplink finish what was committed (for the latency of every created event).
    ok = await wait_counter(counters, C_TPUT, total, timeout_s=max(60.0, args.duration * 6))
    t_all = time.time()
    stats1 = await ob.stats()  # only now: its history COUNT(*) must not delay the acks being measured
    await up.stop(drain_s=0)
    await asyncio.wait_for(task, 15)
    await ob.close()
    return {"t_start": t_start, "t_end": t_end, "t_produced_end": t_produced_end, "t_all": t_all,
            "created": created, "total": total, "all_received": ok, "received": counters[C_TPUT],
            "commits": stats1.commits_total - stats0.commits_total, "cpu_s": cpu_window,
            "rss_mb": rss_mb()}


# --- phase 3: drain ----------------------------------------------------------------------------------------

async def producer_paced(ob: Any, factory: Any, rate: float, stop: asyncio.Event, created: CreatedLog) -> None:
    data = {"state": "closed", "contact": "cabinet"}
    per_tick = max(1, round(rate / 100))  # 100 ticks/s
    interval = per_tick / rate
    loop = asyncio.get_running_loop()
    nxt = loop.time()
    i = 0
    while not stop.is_set():
        t = time.time()
        events = [factory.make("contact.changed", f"live-{(i + k) % 500}", data) for k in range(per_tick)]
        i += per_tick
        seqs = await ob.put_many(events)
        created.add(seqs, t)
        nxt += interval
        delay = nxt - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)


async def run_drain(url: str, workdir: Path, counters: Any, backlog_max: Any, args: argparse.Namespace,
                    factory_cls: Any) -> dict[str, Any]:
    from edgeagent.cloud_bridge.uplink import Uplink
    from edgeagent.kernel.pipeline.event_types import REGISTRY
    from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
    from edgeagent.kernel.runtime.clock import Clock

    factory = factory_cls(REGISTRY, SITE, GW_DRAIN, Clock(mode="synced"))
    ob = Outbox(OutboxConfig(workdir / "drain.db", durability="full"))
    await ob.open()
    # Fill the backlog with the uplink not running (broker up).
    fill_created = CreatedLog()
    t_fill = time.time()
    data = {"state": "open", "contact": "door"}
    remaining = args.backlog

    async def filler(pid: int) -> None:
        nonlocal remaining
        while remaining > 0:
            n = min(1000, remaining)
            remaining -= n
            t = time.time()
            seqs = await ob.put_many([factory.make("contact.changed", f"old-{pid}-{k}", data) for k in range(n)])
            fill_created.add(seqs, t)

    await asyncio.gather(*(filler(p) for p in range(4)))
    fill_s = time.time() - t_fill
    st = await ob.stats()
    backlog = sum(c.unsent for c in st.classes.values())
    last_backlog_seq = st.next_seq - 1
    backlog_max.value = last_backlog_seq
    # Start the live producer first, then the uplink.
    live = CreatedLog()
    stop = asyncio.Event()
    prod = asyncio.create_task(producer_paced(ob, factory, args.drain_rate, stop, live))
    await asyncio.sleep(0.5)
    up = Uplink(uplink_cfg(url, args.batch_max_events, args.max_inflight_batches),
                site_id=SITE, gateway_id=GW_DRAIN, outbox=ob, version="bench")
    task = asyncio.create_task(up.run(), name="uplink-drain")
    t_connect = await wait_connected(up, task)
    ok = await wait_counter(counters, C_DRAIN_BACKLOG, backlog, timeout_s=max(120.0, backlog / 1000))
    t_backlog_done_poll = time.time()
    # Keep the live producer a little longer, to see new events flow once the backlog is gone.
    await asyncio.sleep(1.0)
    stop.set()
    await prod
    live_total = live.count
    ok_live = await wait_counter(counters, C_DRAIN, backlog + live_total, timeout_s=30)
    await up.stop(drain_s=0)
    await asyncio.wait_for(task, 15)
    await ob.close()
    return {"fill_s": fill_s, "backlog": backlog, "last_backlog_seq": last_backlog_seq, "t_connect": t_connect,
            "backlog_received": ok, "t_backlog_done_poll": t_backlog_done_poll, "live": live,
            "live_total": live_total, "live_received": ok_live, "rss_mb": rss_mb()}


# --- analysis -------------------------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _arr(kind: str, raw: bytes) -> array[Any]:
    a = array(kind)
    a.frombytes(raw)
    return a


def analyze_bare(runs: list[dict[str, Any]], bare_times: array[float]) -> tuple[float, list[str]]:
    lines = ["== bare paho publisher (QoS 1, one envelope per message, no outbox, single thread) =="]
    best = 0.0
    for b in runs:
        ts = bare_times[b["base"]:b["base"] + b["received"]]
        last = max(ts) if len(ts) else float("nan")
        eps = b["received"] / (last - b["t0"]) if len(ts) else 0.0
        best = max(best, eps)
        lines.append(
            f"  max_inflight {b['inflight']:5d}: {b['n']:,} sent, {b['acked']:,} acked "
            f"({b['acked'] / (b['t_acked'] - b['t0']):,.0f}/s), {b['received']:,} received in "
            f"{last - b['t0']:.2f} s -> {eps:,.0f} events/s")
    lines.append(f"  bare_events_per_s (best setting): {best:,.0f}")
    return best, lines


def analyze_path(tput: dict[str, Any], seqs: array[int], times: array[float], args: argparse.Namespace
                 ) -> tuple[dict[str, float], list[str]]:
    created = tput["created"].created_map()
    recv: dict[int, float] = {}
    dups = 0
    for s, t in zip(seqs, times, strict=True):
        if s in recv:
            dups += 1
        else:
            recv[s] = t
    t_start, t_end = tput["t_start"], tput["t_end"]
    window = t_end - t_start
    in_window = sum(1 for t in recv.values() if t_start <= t <= t_end)
    mid = t_start + window / 2
    second_half = sum(1 for t in recv.values() if mid <= t <= t_end)
    eps = in_window / window
    eps_second_half = second_half / (t_end - mid)
    produced_eps = tput["total"] / (tput["t_produced_end"] - t_start)
    lat = sorted((recv[s] - c) * 1000 for s, c in created.items() if s in recv)
    missing = sum(1 for s in created if s not in recv)
    p50, p99 = pct(lat, 50), pct(lat, 99)
    n_sec = max(1, round(window))
    by_sec: list[list[float]] = [[] for _ in range(n_sec)]
    for s, c in created.items():
        if s in recv and 0 <= int(c - t_start) < n_sec:
            by_sec[int(c - t_start)].append((recv[s] - c) * 1000)
    recv_sec = [0] * n_sec
    for t in recv.values():
        if 0 <= int(t - t_start) < n_sec:
            recv_sec[int(t - t_start)] += 1
    timeline = []
    for k in range(n_sec):
        ls = sorted(by_sec[k])
        timeline.append(f"    {k:3d}s  created {len(ls):7,}  received {recv_sec[k]:7,}  "
                        f"latency p50 {pct(ls, 50):6.1f} ms  p99 {pct(ls, 99):6.1f} ms  max {pct(ls, 100):6.1f} ms")
    lines = [
        "== whole path: producers -> Outbox (fsync per group commit) -> Uplink -> mosquitto -> subscriber ==",
        f"  window                     : {window:.2f} s, {args.producers} producers x put_many({args.chunk}); "
        f"uplink batch_max_events={args.batch_max_events}, max_inflight_batches={args.max_inflight_batches}",
        f"  events created (durable)   : {tput['total']:,} ({produced_eps:,.0f}/s), "
        f"{tput['commits']:,} group commits ({tput['total'] / max(1, tput['commits']):.0f} events/commit)",
        f"  received within window     : {in_window:,} -> {eps:,.0f} events/s "
        f"(second half of the window: {eps_second_half:,.0f}/s)",
        f"  not yet received at window end: {tput['total'] - in_window:,}",
        f"  all created events received afterwards: {tput['all_received']} (missing {missing}, duplicates {dups})",
        f"  creation->receipt latency  : p50 {p50:.1f} ms, p90 {pct(lat, 90):.1f} ms, p99 {p99:.1f} ms, "
        f"max {pct(lat, 100):.1f} ms",
        "  per second of the window (latency by creation second):",
        *timeline,
        f"  gateway process CPU in window: {tput['cpu_s']:.1f} s ({tput['cpu_s'] / window * 100:.0f}% of one core)",
    ]
    return {"eps": eps, "p50": p50, "p99": p99}, lines


def analyze_drain(drain: dict[str, Any], seqs: array[int], times: array[float], args: argparse.Namespace
                  ) -> tuple[dict[str, float], list[str]]:
    last_b = drain["last_backlog_seq"]
    b_seen: set[int] = set()
    t_b_last = float("-inf")
    live_recv: dict[int, float] = {}
    for s, t in zip(seqs, times, strict=True):
        if s <= last_b:
            b_seen.add(s)
            t_b_last = max(t_b_last, t)
        elif s not in live_recv:
            live_recv[s] = t
    drain_s = t_b_last - drain["t_connect"]
    complete = len(b_seen) == drain["backlog"]
    drain_eps = drain["backlog"] / drain_s if complete and drain_s > 0 else 0.0
    live_created = drain["live"].created_map(lo=last_b + 1)
    live_during = [c for c in live_created.values() if drain["t_connect"] <= c <= t_b_last]
    live_rate = len(live_during) / drain_s if drain_s > 0 else 0.0
    live_lat = sorted((live_recv[s] - c) * 1000 for s, c in live_created.items() if s in live_recv)
    lines = [
        "== drain: backlog put while the uplink is stopped, then the uplink starts while new events flow ==",
        f"  backlog                    : {drain['backlog']:,} events (filled in {drain['fill_s']:.1f} s, "
        f"{drain['backlog'] / drain['fill_s']:,.0f}/s durable intake with no uplink running)",
        f"  connect -> last backlog event received: {drain_s:.2f} s; all received: {complete} "
        f"({len(b_seen):,} unique)",
        f"  drain_events_per_s         : {drain_eps:,.0f}",
        f"  new events during the drain: {len(live_during):,} ({live_rate:,.0f}/s, asked {args.drain_rate:g}/s); "
        f"all {drain['live_total']:,} received: {drain['live_received']}",
        f"  new events' latency        : p50 {pct(live_lat, 50):.0f} ms, p99 {pct(live_lat, 99):.0f} ms "
        "(same priority class as the backlog, so they queue behind it in seq order)",
    ]
    return {"eps": drain_eps, "live_rate": live_rate}, lines


def report(args: argparse.Namespace, r: dict[str, Any]) -> str:
    dump = r["dump"]
    bare_eps, bare_lines = analyze_bare(r["bare"], _arr("d", dump["bare_times"]))
    path, path_lines = analyze_path(r["tput"], _arr("q", dump["seqs"][GW_TPUT]), _arr("d", dump["times"][GW_TPUT]),
                                    args)
    drain, drain_lines = analyze_drain(r["drain"], _arr("q", dump["seqs"][GW_DRAIN]),
                                       _arr("d", dump["times"][GW_DRAIN]), args)
    peak = r["peak_rss_mb"]
    eps = path["eps"]
    ratio = eps / bare_eps if bare_eps else 0.0
    lines = [
        "", *bare_lines, "", *path_lines, "", *drain_lines, "",
        f"== peak RSS of the gateway process: {peak:.1f} MB (after bare {r['rss_bare']:.1f}, "
        f"after whole path {r['tput']['rss_mb']:.1f}, after drain {r['drain']['rss_mb']:.1f}) ==",
        "",
        "== targets ==",
        f"  {verdict(eps >= TARGET_EPS)}  events_per_s {eps:,.0f} >= {TARGET_EPS:,} "
        "(every event fsync-committed before put_many returns, and only committed rows are leased)",
        f"  {verdict(ratio >= TARGET_RATIO)}  ratio_vs_bare {ratio:.2f} >= {TARGET_RATIO}",
        f"  {verdict(drain['eps'] >= TARGET_DRAIN)}  drain_events_per_s {drain['eps']:,.0f} >= {TARGET_DRAIN:,} "
        f"while new events keep flowing ({drain['live_rate']:,.0f}/s)",
        f"  reference: ThingsBoard IoT Gateway 3.8.5 forwarded at most ~{THINGSBOARD_REF:,} messages/s on this "
        f"machine kind; the whole path here is {eps / THINGSBOARD_REF:.1f}x that",
    ]
    print("\n".join(lines))
    return (f"RESULT events_per_s={eps:.0f} bare_events_per_s={bare_eps:.0f} ratio_vs_bare={ratio:.2f} "
            f"drain_events_per_s={drain['eps']:.0f} p50_ms={path['p50']:.0f} p99_ms={path['p99']:.0f} "
            f"peak_rss_mb={peak:.0f}")


# --- main -----------------------------------------------------------------------------------------------------

async def amain(args: argparse.Namespace, url: str, port: int, counters: Any, backlog_max: Any,
                conn: Any) -> dict[str, Any]:
    from edgeagent.kernel.pipeline.event_types import REGISTRY
    from edgeagent.kernel.pipeline.events import EventFactory
    from edgeagent.kernel.runtime.clock import Clock

    workdir = Path(args.workdir)
    out: dict[str, Any] = {"bare": []}
    factory = EventFactory(REGISTRY, SITE, "gw-bare", Clock(mode="synced"))
    for inflight in args.bare_inflight:
        print(f"[1/3] bare paho publisher: {args.bare_n:,} events, QoS 1, one per message, "
              f"max_inflight {inflight} ...", flush=True)
        out["bare"].append(await asyncio.to_thread(run_bare, port, args.bare_n, counters, factory, inflight))
    out["rss_bare"] = rss_mb()
    print(f"[2/3] whole path: {args.producers} producers x put_many({args.chunk}) for {args.duration:g} s, "
          f"durability=full, batch_max_events={args.batch_max_events}, "
          f"max_inflight_batches={args.max_inflight_batches} ...", flush=True)
    out["tput"] = await run_whole_path(url, workdir, counters, args, EventFactory)
    print(f"[3/3] drain: backlog {args.backlog:,} events, then the uplink starts with {args.drain_rate:g} "
          "new events/s ...", flush=True)
    out["drain"] = await run_drain(url, workdir, counters, backlog_max, args, EventFactory)
    out["peak_rss_mb"] = rss_mb()
    conn.send("dump")
    out["dump"] = conn.recv()
    return out


def source_state() -> str:
    """The commit measured, and whether the product code differs from it (others edit it concurrently)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False,
                              capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "edgeagent", "cloud-bridge"],
                               check=False, capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "commit unknown"
    return f"commit {head or 'unknown'}" + (" + uncommitted product changes" if dirty else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run: 5 s whole path, 50k backlog")
    ap.add_argument("--duration", type=float, help="whole-path window in seconds (default 20, quick 5)")
    ap.add_argument("--bare-n", type=int, help="events per bare run (default 100000, quick 30000)")
    ap.add_argument("--bare-inflight", default="20,100,1000",
                    help="bare publisher max in-flight settings to try; the best is the baseline (default 20,100,1000)")
    ap.add_argument("--backlog", type=int, help="drain backlog (default 200000, quick 50000)")
    ap.add_argument("--drain-rate", type=float, default=1000, help="new events/s during the drain (default 1000)")
    ap.add_argument("--producers", type=int, default=4, help="concurrent producers (default 4)")
    ap.add_argument("--chunk", type=int, default=100, help="events per put_many, i.e. one driver poll (default 100)")
    ap.add_argument("--batch-max-events", type=int, default=1000,
                    help="UplinkConfig.batch_max_events (default 1000; the product default is 500, see RESULTS.md)")
    ap.add_argument("--max-inflight-batches", type=int, default=8,
                    help="UplinkConfig.max_inflight_batches (default 8)")
    ap.add_argument("--workdir", help="where the broker and outbox files go (default: a fresh temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    args.duration = args.duration or (5.0 if args.quick else 20.0)
    args.bare_n = args.bare_n or (30_000 if args.quick else 100_000)
    args.bare_inflight = [int(x) for x in str(args.bare_inflight).split(",") if x]
    args.backlog = args.backlog or (50_000 if args.quick else 200_000)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    own_dir = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="edgeagent-bench-")
    workdir = Path(args.workdir)
    ctx = mp.get_context("spawn")
    counters = ctx.RawArray("q", 5)
    backlog_max = ctx.RawValue("q", 0)
    broker = Mosquitto(workdir / "broker")
    broker.start()
    parent_conn, child_conn = ctx.Pipe()
    sub = ctx.Process(target=subscriber_main, args=(broker.port, child_conn, counters, backlog_max),
                      name="bench-subscriber", daemon=True)
    try:
        sub.start()
        if not parent_conn.poll(15) or parent_conn.recv() != "ready":
            raise RuntimeError("subscriber did not start")
        print(f"edgeagent {source_state()}; mosquitto on 127.0.0.1:{broker.port}, subscriber pid {sub.pid}, "
              f"gateway pid {os.getpid()}, work dir {workdir}", flush=True)
        r = asyncio.run(amain(args, broker.url, broker.port, counters, backlog_max, parent_conn))
        result = report(args, r)
    finally:
        with contextlib.suppress(Exception):
            parent_conn.send("stop")
        sub.join(5)
        if sub.is_alive():
            sub.terminate()
            sub.join(5)
        broker.stop()
        if own_dir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(result, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
