"""Benchmark of the community video rules (issue 10): the e-bike lift blocker, the car gate's plates, objects
thrown from height.

**E-bike** (the real daemon): 4 lift car cameras, each a mount of the RTSP peer looping a synthetic lift clip
(tests/synth_scenes.py: a motorcycle wheeled in, standing, wheeled out, the car empty for 3 s), through the
whole pipeline (stream, motion, the shared NanoDet worker, tracker, EbikeRunner); each car's relay module is a
unit of a real pymodbus server (the shipped ``relay-io-8ch`` profile) on one Modbus TCP line. A probe observer,
called on the same tick right after the e-bike rule, records the confirming frame (its decode time) and the
moment the rule asked for the door hold; the server's write hook records when the relay coil was written. The
figure is confirming frame (decoded) -> relay written, p50/p99 over every episode (``ebike_relay_p99_ms``),
with the rule's decision -> written beside it. Target: p99 under 1 s with the 4 cameras running.

**Plates** (GateRunner, the shared engine with the shipped plate detector and reader): N synthetic plates
(tests/synth_plates.py, random wear: blur up to 1.6 px, perspective up to 0.25, low light up to 0.7, dirt up
to 0.35, 100-160 px wide) on the car photo, half of them in the residents' list (SQLite, valid now), driven by
4 gate cameras at once (4 GateRunners, one lane each) at 5 frames a second in real time through the real
tracker, one vehicle after another per lane. A listed plate opens the lane's barrier (a named output); any other
plate is a ``gate.visitor`` event. Figures: the read rate (the decision carries the right plate: a visitor
event with the true text, or an open for a listed car), wrong opens (an open for a car not on the list: target
zero) and the decision latency from the vehicle's first frame in the zone (p50/p99 over every decision; opens and
visitors apart: a visitor waits ``visitor_wait_s`` = 2 s for more reads by design).

**Thrown objects** (ThrownRunner's frame path, the luma crop of the façade's ROI into the detector): synthetic
façade sequences (tests/synth_facade.py) at 15 and 25 fps, each an object dropped or tossed from a random
window among random distractors (birds straight/undulating/gliding/swooping, leaves, rain, insects, a person
at a window), and distractor-only sequences for false alarms. Recall counts an alarm in the right (floor,
column) cell; every other alarm is false; false alarms per hour are over the distractor-only hours plus the
throw sequences' time. Baseline in the same run: the same sequences subsampled to 5 fps (Frigate's detection
rate), recall at 5 fps and the full-rate/5 fps ratio. Alarm latency: release -> decision on the synthetic
clock, plus decision -> alarm raised with its clip (clip_post_s 2 s, the clip written, the evidence kept, the
alarm stored) measured live on the RTSP peer serving a throw at 25 fps into the real alarm runtime; the
RESULT's ``thrown_alarm_p99_s`` is the sum of the two p99s (an upper bound of the p99 of the sum).

Run from the repository root::

    .venv/bin/python bench/rules.py            # ~11 min: e-bike 90 s, 200 plates, 60+40 façade sequences
    .venv/bin/python bench/rules.py --quick    # ~3.5 min: e-bike 40 s, 48 plates, 16+8 sequences

The output ends with exactly one line::

    RESULT ebike_relay_p99_ms=N plates_total=N plate_read_rate=R wrong_opens=N gate_decision_p99_ms=N
    thrown_recall=R thrown_false_per_hour=R thrown_alarm_p99_s=R

(on one line). A part that fails prints its error and puts -1 in its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgeagent.drivers.camera.luma import LumaFrame  # noqa: E402
from edgeagent.drivers.camera.rules.thrown import ThrownParams  # noqa: E402 - after the repo root is on sys.path
from edgeagent.drivers.camera.rules.thrown_runner import ThrownRunner, ThrownSettings, crop_spec  # noqa: E402


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def fmt_ms(values: Sequence[float]) -> str:
    if not values:
        return "none"
    return (f"n={len(values)} p50={pct(values, 50) * 1000:.0f} ms p90={pct(values, 90) * 1000:.0f} ms "
            f"p99={pct(values, 99) * 1000:.0f} ms max={max(values) * 1000:.0f} ms")


def _models(engine_stats: dict[str, Any]) -> str:
    return "; ".join(f"{name} {m['requests']} requests p50 {m['p50_ms']} ms p99 {m['p99_ms']} ms"
                     for name, m in engine_stats.get("models", {}).items())


# ============================================================================================== e-bike


@dataclass
class EbikeProbe:
    """A pipeline observer after the e-bike rule: when the rule starts holding the door on this tick."""

    runner: Any
    confirms: list[tuple[float, float]] = field(default_factory=list)  # (frame decoded, rule asked), monotonic
    _held: bool = False

    def on_tick(self, frame: Any, tracks: Any, ended: Any, now: float) -> None:
        held = bool(self.runner.ebike.core.door_held)
        if held and not self._held:
            self.confirms.append((float(frame.mono_s), time.monotonic()))
        self._held = held


def lift_clip(workdir: Path) -> Path:
    """The lift scene as MPEG-TS for the RTSP peer (it loops TS cleanly): the bike in and out, 3 s empty."""
    from tests import synth_scenes

    mp4 = workdir / "lift.mp4"
    synth_scenes.write_clip(synth_scenes.lift_frames("motorcycle", empty_s=3.0), mp4)
    ts = workdir / "lift.ts"
    subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(mp4),
                    "-c", "copy", "-bsf:v", "h264_mp4toannexb", "-f", "mpegts", str(ts)], check=True)
    return ts


async def bench_ebike(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from edgeagent.app import Daemon
    from edgeagent.capabilities import Config
    from edgeagent.drivers.modbus.profile import shipped_profile
    from edgeagent.drivers.modbus.sim import ProfileSimulator
    from tests import synth_scenes
    from tests.helpers import running_daemon
    from tests.peers import free_port
    from tests.rtsp_peer import RtspServer

    cams = 4
    clip = lift_clip(workdir)
    relay = shipped_profile("relay-io-8ch")
    port = free_port()
    writes: list[tuple[int, float]] = []  # (unit, monotonic) of door relay writes to on

    def hook(dev: Any, point: Any, value: Any) -> None:
        if point.name == "ch1_relay" and value is True:
            writes.append((dev.unit, time.monotonic()))

    sim = ProfileSimulator(dict.fromkeys(range(1, cams + 1), relay), port=port)
    for u in range(1, cams + 1):
        sim[u].on_write.append(hook)
    with RtspServer(clip, mounts=cams) as server:
        devices: list[dict[str, Any]] = []
        for i in range(cams):
            devices.append({"type": "modbus.relay", "id": f"lift{i}-io", "bus": "lan", "unit_id": i + 1,
                            "poll_interval_s": 1.0, "channels": {1: f"door{i}", 2: f"voice{i}"}})
            devices.append({"type": "camera", "id": f"lift{i}", "rtsp": {"detect_url": server.url_for(i)},
                            "detect": {"fps": 5, "classes": ["person"]}, "snapshots_from": "detect",
                            "zones": [{"name": "car", "points": [list(p) for p in synth_scenes.LIFT_FLOOR]}],
                            "ebike_lift": {"zone": "car", "door_hold": f"door{i}", "announce": f"voice{i}",
                                           "clear_s": 1.0, "rearm_s": 0.0}})
        cfg = Config.model_validate({
            "version": 1, "site_id": "bench", "gateway_id": "gw-bench", "state_dir": str(workdir / "state"),
            "clock": {"sync": "synced"}, "health": {"enabled": False},
            "modbus": {"buses": {"lan": {"kind": "tcp", "host": "127.0.0.1", "port": port, "timeout_s": 0.5}}},
            "cameras": {"privacy": {"enabled": False}, "evidence": {"dir": str(workdir / "evidence")}},
            "devices": devices})
        async with sim:
            daemon = Daemon(cfg)
            async with running_daemon(daemon, exit_code=None):
                service: Any = daemon.capability("cameras").service  # type: ignore[union-attr]
                probes = []
                for i in range(cams):
                    runner = service.runners[f"lift{i}"]
                    probe = EbikeProbe(runner)
                    runner.pipeline.observers.append(probe)
                    probes.append(probe)
                print(f"e-bike: {cams} lift cameras on the RTSP peer, relays on one Modbus TCP line; "
                      f"running {args.ebike_s:.0f} s ...", flush=True)
                await asyncio.sleep(args.ebike_s)
                engine = service.engine.stats()
                pipes = [service.runners[f"lift{i}"].pipeline.snapshot_state() for i in range(cams)]
                counts = [service.runners[f"lift{i}"].ebike.stats() for i in range(cams)]
    frame_to_write: list[float] = []
    decide_to_write: list[float] = []
    unmatched = 0
    for i, probe in enumerate(probes):
        unit_writes = sorted(t for u, t in writes if u == i + 1)
        for frame_s, asked_s in probe.confirms:
            after = [t for t in unit_writes if t >= asked_s - 0.001]
            if not after or after[0] - asked_s > 5.0:
                unmatched += 1
                continue
            frame_to_write.append(after[0] - frame_s)
            decide_to_write.append(after[0] - asked_s)
    print(f"  episodes confirmed: {sum(len(p.confirms) for p in probes)} ({unmatched} without a relay write)")
    print(f"  confirming frame (decoded) -> relay written: {fmt_ms(frame_to_write)}")
    print(f"  rule decision -> relay written:              {fmt_ms(decide_to_write)}")
    print(f"  pipelines: ticks {[p['ticks'] for p in pipes]}, detector runs {[p['detector_runs'] for p in pipes]}, "
          f"skipped busy {[p['skipped_busy'] for p in pipes]}")
    print(f"  engine: refused {engine.get('refused')}, per model {_models(engine)}")
    print(f"  rule counts: {[{k: c[k] for k in ('holds', 'releases', 'alarms_raised') if k in c} for c in counts]}")
    p99 = pct(frame_to_write, 99) * 1000 if frame_to_write else -1.0
    print(f"  p99 {p99:.0f} ms: {'PASS' if 0 <= p99 < 1000 else 'FAIL'} (target under 1000 ms)")
    return {"ebike_relay_p99_ms": p99, "episodes": len(frame_to_write), "unmatched": unmatched}


# ============================================================================================== plates


@dataclass
class RecordingOutput:
    """A lane's barrier: when it was told to open (what the plate rule drives)."""

    lane: int
    log: list[tuple[int, float]]

    async def set(self, on: bool) -> None:
        if on:
            self.log.append((self.lane, time.monotonic()))


@dataclass(frozen=True)
class Tick:
    image: np.ndarray
    seq: int
    mono_s: float


async def bench_plates(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from edgeagent.drivers.camera.config import CameraDevice
    from edgeagent.drivers.camera.evidence import EvidenceStore
    from edgeagent.drivers.camera.rules.gate_runner import GateRunner
    from edgeagent.drivers.camera.rules.plate_list import PlateList
    from edgeagent.drivers.camera.tracker import Tracker
    from edgeagent.kernel.pipeline.event_types import REGISTRY
    from edgeagent.kernel.pipeline.events import EventFactory
    from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
    from edgeagent.kernel.pipeline.sink import EventSink
    from edgeagent.kernel.runtime.clock import Clock
    from edgeagent.kernel.runtime.outputs import Outputs
    from edgeagent.models.engine import InferenceEngine
    from edgeagent.models.manifest import load_manifests
    from edgeagent.models.types import Detection
    from tests import synth_plates as sp

    lanes = 4
    n = args.plates
    rng = np.random.default_rng(args.seed)
    texts: list[str] = []
    while len(texts) < n:
        t = sp.random_plate(rng, "blue" if rng.random() < 0.7 else "green")
        if t not in texts:
            texts.append(t)
    resident = [i % 2 == 0 for i in range(n)]
    levels = [float(rng.uniform(0.0, 1.0)) for _ in range(n)]  # from clean to the hardest wear
    wears = [sp.random_wear(rng, level=lv) for lv in levels]
    started = time.perf_counter()
    cars = await asyncio.gather(*(asyncio.to_thread(sp.car_with_plate, t, w, np.random.default_rng(k))
                                  for k, (t, w) in enumerate(zip(texts, wears, strict=True))))
    print(f"plates: {n} synthetic plates rendered in {time.perf_counter() - started:.1f} s "
          f"({sum(resident)} residents); {lanes} gate cameras at 5 fps, real time ...", flush=True)

    plates = PlateList(workdir / "plates.db")
    for t, r in zip(texts, resident, strict=True):
        if r:
            plates.add(t, ref="bench", reason="resident")
    def gate_camera(lane: int) -> CameraDevice:
        return CameraDevice.model_validate({
            "type": "camera", "id": f"gate{lane}", "rtsp": {"detect_url": "rtsp://127.0.0.1/none"},
            "zones": [{"name": "lane", "points": [[0, 0], [1, 0], [1, 1], [0, 1]]}],
            "gate": {"zone": "lane", "open": f"barrier{lane}"}})

    rule = gate_camera(0).gate
    assert rule is not None
    models = {rule.plate_detector, rule.plate_reader, *([rule.second_opinion] if rule.second_opinion else [])}
    manifests = {k: v for k, v in load_manifests().items() if k in models}
    print(f"  the gate rule's models (its defaults): {', '.join(sorted(models))}")
    outbox = Outbox(OutboxConfig(workdir / "plates-outbox.db"))
    await outbox.open()
    clock = Clock(mode="synced")
    sink = EventSink(EventFactory(REGISTRY, "bench", "gw-bench", clock), outbox)
    visitors: list[tuple[str, str, float]] = []  # (camera, plate, monotonic)
    reasons: dict[str, int] = {}

    def on_event(e: Any, _seq: int) -> None:
        if e.type == "gate.visitor":
            visitors.append((e.device_id, str(e.data.get("plate")), time.monotonic()))
            reasons[str(e.data.get("reason"))] = reasons.get(str(e.data.get("reason")), 0) + 1

    sink.observe(on_event)
    opens: list[tuple[int, float]] = []
    outputs = Outputs()
    for lane in range(lanes):
        outputs.register(f"barrier{lane}", RecordingOutput(lane, opens))
    results: list[dict[str, Any]] = []
    lane_stats: list[dict[str, Any]] = []
    h, w = cars[0].image.shape[:2]

    def approach(image: np.ndarray, k: int, noise: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
        """Frame k of the car driving up: 70 % of the photo's size growing to 105 % over 3 s, centred."""
        import cv2

        scale = 0.7 + 0.35 * min(1.0, k / 15)
        sw, sh = round(w * scale), round(h * scale)
        small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
        canvas = np.full_like(image, 96)
        x0, y0 = (w - sw) // 2, (h - sh) // 2
        sx0, sy0 = max(0, -x0), max(0, -y0)
        dx0, dy0 = max(0, x0), max(0, y0)
        cw, ch = min(w - dx0, sw - sx0), min(h - dy0, sh - sy0)
        canvas[dy0:dy0 + ch, dx0:dx0 + cw] = small[sy0:sy0 + ch, sx0:sx0 + cw]
        frame = np.clip(canvas.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        return frame, (float(max(0, x0)), float(max(0, y0)), float(min(w, x0 + sw)), float(min(h, y0 + sh)))

    async with InferenceEngine(manifests, threads=2) as engine, \
            EvidenceStore(workdir / "plates-evidence", max_bytes=10**9, retention_s=3600) as evidence:

        async def lane_run(lane: int) -> None:
            cam = gate_camera(lane)
            assert cam.gate is not None
            runner = GateRunner(cam, cam.gate, engine=engine, sink=sink, evidence=evidence, lookup=plates.find,
                                actions={}, outputs=outputs, wall=lambda: datetime.now(UTC))
            worker = asyncio.create_task(runner.run())
            tracker = Tracker()
            seq = 0
            frame_rng = np.random.default_rng(1000 + lane)
            noise_bank = [frame_rng.normal(0, 2.0, (h, w, 3)).astype(np.int16) for _ in range(4)]
            try:
                for k in range(lane, n, lanes):
                    image = cars[k].image
                    before = (runner.counts["opens"], runner.counts["visitors"], runner.counts["undecided"])
                    n_open, n_vis = len([o for o in opens if o[0] == lane]), \
                        len([v for v in visitors if v[0] == f"gate{lane}"])
                    entered = time.monotonic()
                    decision: tuple[str, float, str | None] | None = None
                    frame_no = 0
                    while time.monotonic() - entered < 20.0:
                        tick_start = time.monotonic()
                        noisy, box = approach(image, frame_no, noise_bank[frame_no % len(noise_bank)])
                        frame_no += 1
                        seq += 1
                        update = tracker.update([Detection("car", 0.9, box)], tick_start)
                        runner.on_tick(Tick(noisy, seq, tick_start), update.tracks, update.ended, tick_start)
                        lane_opens = [o for o in opens if o[0] == lane][n_open:]
                        lane_vis = [v for v in visitors if v[0] == f"gate{lane}"][n_vis:]
                        if lane_opens:
                            decision = ("open", lane_opens[0][1], None)
                        elif lane_vis:
                            decision = ("visitor", lane_vis[0][2], lane_vis[0][1])
                        elif runner.counts["undecided"] > before[2]:
                            decision = ("undecided", time.monotonic(), None)
                        if decision is not None:
                            break
                        await asyncio.sleep(max(0.0, 0.2 - (time.monotonic() - tick_start)))
                    results.append({"text": texts[k], "resident": resident[k], "decision": decision, "level": levels[k],
                                    "latency_s": None if decision is None else decision[1] - entered})
                    # the car drives on; the next one comes 3.4 s later (the tracker ends a lost track after
                    # 1.5 s and the gate waits 1.5 s more for a successor before it ends the vehicle)
                    for _ in range(17):
                        now = time.monotonic()
                        update = tracker.update([], now)
                        seq += 1
                        runner.on_tick(Tick(image, seq, now), update.tracks, update.ended, now)
                        await asyncio.sleep(0.2)
            finally:
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)
                await runner.aclose()
                lane_stats.append(runner.stats())

        started = time.perf_counter()
        await asyncio.gather(*(lane_run(lane) for lane in range(lanes)))
        took = time.perf_counter() - started
        engine_stats = engine.stats()
    await outbox.close()
    plates.close()
    right = wrong_opens = undecided = 0
    lat_all: list[float] = []
    lat_open: list[float] = []
    lat_visitor: list[float] = []
    for r in results:
        d = r["decision"]
        if d is None:
            undecided += 1
            continue
        kind, _, plate = d
        lat_all.append(r["latency_s"])
        if kind == "open":
            lat_open.append(r["latency_s"])
            if r["resident"]:
                right += 1
            else:
                wrong_opens += 1
        elif kind == "visitor":
            lat_visitor.append(r["latency_s"])
            if plate == r["text"]:
                right += 1
        else:
            undecided += 1
    total = len(results)
    rate = right / total if total else 0.0
    opened_residents = sum(1 for r in results if r["resident"] and r["decision"] and r["decision"][0] == "open")
    print(f"  {total} vehicles in {took:.0f} s; decisions: {len(lat_open)} opens, {len(lat_visitor)} visitor events, "
          f"{undecided} undecided or none")
    print(f"  read rate (the decision carries the right plate): {rate:.3f} ({right}/{total}); residents let in: "
          f"{opened_residents}/{sum(resident[:total])}")
    print(f"  wrong opens: {wrong_opens} (target 0)")
    print(f"  decision latency from the first frame in the zone: all {fmt_ms(lat_all)}")
    print(f"    opens    {fmt_ms(lat_open)}")
    print(f"    visitors {fmt_ms(lat_visitor)} (visitor_wait_s 2 s by design)")
    print(f"  engine: refused {engine_stats.get('refused')}, per model {_models(engine_stats)}")
    misread = [(r["text"], r["decision"][2]) for r in results
               if r["decision"] and r["decision"][0] == "visitor" and r["decision"][2] != r["text"]]
    if misread:
        print(f"  visitor misreads (true, read), first 8: {misread[:8]}")
    print(f"  visitor reasons: {reasons}")
    keys = ("reads", "reads_with_plate", "undecided", "handovers", "visitor_repeats", "reads_busy", "reads_failed",
            "ops_dropped")
    print(f"  gate runners: {({k: sum(int(st.get(k, 0)) for st in lane_stats) for k in keys})}")
    for lo, hi in ((0.0, 0.34), (0.34, 0.67), (0.67, 1.01)):
        sub = [r for r in results if lo <= r["level"] < hi]
        ok = sum(1 for r in sub if r["decision"] and (
            (r["decision"][0] == "open" and r["resident"]) or (r["decision"][0] == "visitor"
                                                              and r["decision"][2] == r["text"])))
        fast = [r["latency_s"] for r in sub if r["latency_s"] is not None]
        print(f"  wear level {lo:.2f}-{min(hi, 1.0):.2f}: {len(sub)} plates, read rate {ok / max(1, len(sub)):.3f}, "
              f"decision p50 {pct(fast, 50) * 1000:.0f} ms")
    return {"plates_total": total, "plate_read_rate": rate, "wrong_opens": wrong_opens,
            "gate_decision_p99_ms": pct(lat_all, 99) * 1000 if lat_all else -1.0}


# ============================================================================================== thrown


def _distractors(rng: np.random.Generator, fps: float, *, many: bool) -> list[Any]:
    from tests.synth_facade import bird, insect, leaf, person_at_window, rain

    pool: list[list[Any]] = [
        [bird("straight")], [bird("undulating", start_after_s=float(rng.uniform(0, 3)))],
        [bird("glide", start_after_s=float(rng.uniform(0, 3)))],
        [bird("swoop", start_after_s=float(rng.uniform(0, 3)))],
        [leaf(), leaf(start_after_s=float(rng.uniform(0.5, 3)))], [rain(int(rng.integers(40, 160)), fps)],
        [insect(start_after_s=float(rng.uniform(0, 2)))],
        [person_at_window(int(rng.integers(2, 13)), int(rng.integers(1, 7)))]]
    k = len(pool) if many else int(rng.integers(2, 5))
    picks = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
    return [a for i in picks for a in pool[int(i)]]


def _fall_s(floor: int, floor_height_m: float = 3.0) -> float:
    return math.sqrt(2 * floor * floor_height_m / 9.81)


@dataclass
class ThrownRun:
    alarms: list[Any]
    frames: int
    seconds: float
    release_s: float | None
    cell: tuple[int, int] | None


def run_sequence(seq: Any, scene: Any, *, every: int = 1) -> ThrownRun:
    """The sequence through ThrownRunner's frame path (grey luma crop of the ROI), every ``every``-th frame."""
    settings = ThrownSettings(spec=scene.spec(), params=ThrownParams(), place="bench")
    runner = ThrownRunner("bench", settings, alarms=None, evidence=None)  # type: ignore[arg-type]
    x1, y1, x2, y2 = crop_spec(settings.spec, scene.width, scene.height)[1]  # the crop the tap cuts
    alarms: list[Any] = []
    frames = 0
    for k, (frame, t) in enumerate(seq.frames()):
        if k % every:
            continue
        grey = frame if frame.ndim == 2 else frame.mean(axis=2).astype(np.uint8)
        lf = LumaFrame(np.ascontiguousarray(grey[y1:y2, x1:x2]), x1, y1, scene.width, scene.height, k, t, t)
        alarms += runner.feed(lf)
        frames += 1
    expected = seq.expected
    return ThrownRun(alarms, frames, seq.duration_s, expected[0].release_s if expected else None,
                     expected[0].cell if expected else None)


def score(runs: Sequence[ThrownRun]) -> tuple[int, int, int, list[float]]:
    """(throws, found, false alarms, release -> decision seconds)."""
    throws = found = false = 0
    latency: list[float] = []
    for r in runs:
        hit = False
        if r.cell is not None:
            throws += 1
        for a in r.alarms:
            if not hit and r.cell is not None and a.origin_cell == r.cell and r.release_s is not None \
                    and a.decided_s >= r.release_s:
                hit = True
                found += 1
                latency.append(a.decided_s - r.release_s)
            else:
                false += 1
    return throws, found, false, latency


async def thrown_live(args: argparse.Namespace, workdir: Path) -> list[float]:
    """Decision -> alarm raised with its clip, live: a throw at 25 fps on the RTSP peer into the real runtime."""
    from edgeagent.drivers.camera.evidence import EvidenceStore
    from edgeagent.drivers.camera.rtsp import RtspSource
    from edgeagent.drivers.camera.rules.alarm_kinds import CAMERA_RULE_ALARM_KINDS
    from edgeagent.kernel.alarms.engine import AlarmConfig, AlarmEngine
    from edgeagent.kernel.alarms.runtime import AlarmRuntime
    from edgeagent.kernel.pipeline.event_types import REGISTRY
    from edgeagent.kernel.pipeline.events import EventFactory
    from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
    from edgeagent.kernel.pipeline.sink import EventSink
    from edgeagent.kernel.runtime.clock import Clock
    from edgeagent.kernel.runtime.outputs import Outputs
    from tests.facade_video import encode
    from tests.rtsp_peer import RtspServer
    from tests.synth_facade import Scene, SynthSequence, falling_object

    scene = Scene()
    clip = encode(SynthSequence(scene, [falling_object(9, 3, release_after_s=2.0)], duration_s=5.0, fps=25.0,
                                seed=4), workdir / "throw.ts")
    outbox = Outbox(OutboxConfig(workdir / "thrown-outbox.db"))
    await outbox.open()
    clock = Clock(mode="synced")
    sink = EventSink(EventFactory(REGISTRY, "bench", "gw-bench", clock), outbox)
    # the alarm folds every 5 s repeat into one (same place): a short fold window makes each throw a new alarm
    cfg = AlarmConfig(kinds={k.name: k for k in CAMERA_RULE_ALARM_KINDS}, fold_window_s=1.0)
    alarms = AlarmRuntime(AlarmEngine(cfg), sink=sink, state=outbox, outputs=Outputs(), notifiers=None, clock=clock)
    settings = ThrownSettings(spec=scene.spec(), params=ThrownParams(), place="bench façade")
    try:
        async with EvidenceStore(workdir / "thrown-evidence", max_bytes=10**9, retention_s=3600) as evidence:
            runner = ThrownRunner("facade", settings, alarms=alarms, evidence=evidence)
            with RtspServer(clip) as server:
                source = RtspSource(server.url, name="facade", decode_fps=5.0)
                tap = runner.attach(source)
                async with source:
                    task = asyncio.create_task(runner.run(source))
                    await asyncio.sleep(args.thrown_live_s)
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            st = runner.stats()
            st["tap"] = tap.stats()
    finally:
        await outbox.close()
    overhead = [d for _, _, d in runner.raised]
    print(f"  live (RTSP peer, 25 fps, {args.thrown_live_s:.0f} s): {st['raised']} alarms raised, clips {st['clips']}, "
          f"frames {st['frames']} (tap {st['tap']}), detector {st['frame_ms_p50']} ms p50 / {st['frame_ms_p99']} ms "
          f"p99 a frame")
    print(f"  decision -> alarm raised with its clip: {fmt_ms(overhead)}")
    return overhead


async def bench_thrown(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from tests.synth_facade import Scene, SynthSequence, falling_object

    rng = np.random.default_rng(args.seed + 7)
    scene = Scene()
    throw_seqs = []
    meta: list[str] = []
    for i in range(args.throws):
        fps = 25.0 if i % 2 == 0 else 15.0
        floor, column = int(rng.integers(2, scene.floors + 1)), int(rng.integers(1, scene.columns + 1))
        obj = falling_object(floor, column, release_after_s=float(rng.uniform(1.5, 3.0)),
                             vx_m_s=float(rng.uniform(-1.0, 1.0)), vy_m_s=float(rng.uniform(-1.0, 0.5)),
                             size_px=float(rng.uniform(3.0, 6.0)), grey=int(rng.choice([25, 60, 120, 235])))
        actors = [obj, *_distractors(rng, fps, many=i % 4 == 0)]
        meta.append(f"floor {floor} col {column} {fps:.0f} fps vx {obj.vx_m_s:+.1f} vy {obj.vy_m_s:+.1f} "
                    f"{obj.size_px:.1f} px grey {obj.grey} with {', '.join(type(a).__name__ for a in actors[1:])}")
        throw_seqs.append(SynthSequence(scene, actors, duration_s=obj.release_after_s + _fall_s(floor) + 1.0,
                                        fps=fps, seed=int(rng.integers(2**31))))
    quiet_seqs = []
    for i in range(args.quiet):
        fps = 25.0 if i % 2 == 0 else 15.0
        quiet_seqs.append(SynthSequence(scene, _distractors(rng, fps, many=i % 3 == 0), duration_s=args.quiet_s,
                                        fps=fps, seed=int(rng.integers(2**31))))
    print(f"thrown objects: {len(throw_seqs)} throw sequences, {len(quiet_seqs)} x {args.quiet_s:.0f} s with "
          "distractors only (15 and 25 fps) ...", flush=True)
    started = time.perf_counter()
    full = [await asyncio.to_thread(run_sequence, s, scene) for s in throw_seqs]
    quiet = [await asyncio.to_thread(run_sequence, s, scene) for s in quiet_seqs]
    # baseline: the same throws seen at 5 fps (every 5th frame at 25 fps, every 3rd at 15)
    five = [await asyncio.to_thread(run_sequence, s, scene, every=round(s.fps / 5)) for s in throw_seqs]
    took = time.perf_counter() - started
    throws, found, false_t, latency = score(full)
    _, _, false_q, _ = score(quiet)
    _, found5, false5, _ = score(five)
    hours = (sum(r.seconds for r in full) + sum(r.seconds for r in quiet)) / 3600.0
    recall = found / throws if throws else 0.0
    recall5 = found5 / throws if throws else 0.0
    false_per_hour = (false_t + false_q) / hours if hours else 0.0
    frames = sum(r.frames for r in full) + sum(r.frames for r in quiet)
    print(f"  {frames} frames in {took:.0f} s (rendering included)")
    ratio = recall / recall5 if recall5 else float("inf")
    print(f"  recall at full rate: {recall:.3f} ({found}/{throws}); at 5 fps (baseline): {recall5:.3f} "
          f"({found5}/{throws}); ratio {ratio:.1f}x")
    print(f"  false alarms: {false_t} in throw sequences + {false_q} in distractor-only = "
          f"{false_per_hour:.2f} per hour over {hours * 60:.1f} min of video (5 fps baseline: {false5} in the throws)")
    print(f"  release -> decision: {fmt_ms(latency)}")
    for r, m in zip(full, meta, strict=True):
        if not any(a.origin_cell == r.cell for a in r.alarms):
            print(f"    missed: {m}; alarms {[a.origin_cell for a in r.alarms]}")
    overhead = await thrown_live(args, workdir)
    p99 = (pct(latency, 99) + pct(overhead, 99)) if latency and overhead else -1.0
    print(f"  alarm latency p99 (release -> decision p99 + decision -> raised p99): {p99:.2f} s (target under 10 s)")
    return {"thrown_recall": recall, "thrown_false_per_hour": false_per_hour, "thrown_alarm_p99_s": p99,
            "thrown_recall_5fps": recall5}


# ============================================================================================== main


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"ebike_relay_p99_ms": -1.0, "plates_total": 0, "plate_read_rate": -1.0, "wrong_opens": -1,
                           "gate_decision_p99_ms": -1.0, "thrown_recall": -1.0, "thrown_false_per_hour": -1.0,
                           "thrown_alarm_p99_s": -1.0}
    workdir = Path(tempfile.mkdtemp(prefix="bench-rules-"))
    try:
        for name, part in (("ebike", bench_ebike), ("plates", bench_plates), ("thrown", bench_thrown)):
            if name not in args.parts:
                continue
            started = time.perf_counter()
            try:
                out.update(await part(args, workdir))
            except Exception:  # one part failing still reports the others
                print(f"{name}: FAILED")
                traceback.print_exc()
            print(f"  ({name}: {time.perf_counter() - started:.0f} s)\n", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter: e-bike 40 s, 48 plates, 16+8 façade sequences")
    ap.add_argument("--parts", nargs="+", default=["ebike", "plates", "thrown"], choices=["ebike", "plates", "thrown"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plates", type=int, default=0, help="plates to drive (default 200, --quick 48)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    args.ebike_s = 40.0 if args.quick else 90.0
    args.plates = args.plates or (48 if args.quick else 200)
    args.throws = 16 if args.quick else 60
    args.quiet = 8 if args.quick else 40
    args.quiet_s = 20.0 if args.quick else 30.0
    args.thrown_live_s = 15.0 if args.quick else 30.0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"bench/rules.py {'--quick ' if args.quick else ''}on {os.cpu_count()} cores, "
          f"{datetime.now(UTC).isoformat(timespec='seconds')}\n", flush=True)
    result = "RESULT (none: the run failed)"
    try:
        r = asyncio.run(amain(args))
        result = (f"RESULT ebike_relay_p99_ms={r['ebike_relay_p99_ms']:.0f} plates_total={r['plates_total']} "
                  f"plate_read_rate={r['plate_read_rate']:.3f} wrong_opens={r['wrong_opens']} "
                  f"gate_decision_p99_ms={r['gate_decision_p99_ms']:.0f} thrown_recall={r['thrown_recall']:.3f} "
                  f"thrown_false_per_hour={r['thrown_false_per_hour']:.2f} "
                  f"thrown_alarm_p99_s={r['thrown_alarm_p99_s']:.2f}")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
