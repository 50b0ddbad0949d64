"""Camera benchmark: 1, 2, 4 and 8 RTSP cameras through the whole detection pipeline, against a naive loop.

Run from the repository root (needs ffmpeg and Debian's gst-rtsp-server, see tests/rtsp_peer.py)::

    .venv/bin/python bench/camera.py              # 60 s per configuration (~20 min in all)
    .venv/bin/python bench/camera.py --quick      # 15 s per configuration (~7 min)
    .venv/bin/python bench/camera.py --soak       # plus 10 minutes at 4 cameras: RSS slope
    .venv/bin/python bench/camera.py --cams 4 --clips busy --seconds 30   # one configuration
    .venv/bin/python bench/camera.py --soak-only --soak-minutes 30 --mem-detail   # a long soak; per minute also
        # glibc's heap in use and free-but-kept, pymalloc blocks, tasks, threads, full GC collections
    .venv/bin/python bench/camera.py --soak-only --tracemalloc 10 --mem-at 5,20,36   # what grew between those
        # minutes, by traceback, and the live objects by type (slow: for finding a leak, not for figures)

What runs. The cameras are a real RTSP server on loopback (``tests/rtsp_peer.py``: gst-rtsp-server fed by
``ffmpeg -re``, one mount per camera, 10 fps, H.264 768x576, GOP 10), serving either the **busy** clip (the
campus path with walkers, ``vtest.avi``) or the **quiet** clip (its background as a still scene with sensor
noise and a slow brightness ramp). Every configuration (clip x camera count) runs twice, one after the other,
each on a fresh server, so both see the same part of the clip (the feeders start at the clip's first frame):

* **pipeline**: what the daemon runs (``drivers/camera/service.py``): per camera an ``RtspSource`` with
  ``decode_fps`` = the detection rate (5) and a ``CameraPipeline`` (motion gating on the luma plane in the
  reader thread, BGR only on detector ticks, keyframes-only decoding while the scene is quiet, model-size
  regions with synchronized re-checks, the shared detector, tracker, a zone and a line as in the demo, events
  into a recording sink; no evidence store unless ``--evidence``), all cameras in this ONE asyncio process
  sharing ONE ``InferenceEngine`` (one worker process, the ``cameras`` section's defaults: CPU, 2 threads,
  queue of 8);
* **naive**: per camera an ``RtspSource`` that converts every frame (10 fps) to BGR, and at every detection
  tick (every other frame, 5 fps) the same engine on the whole frame (one whole-frame region), the same
  class / score (per class) / size filter, and the same ``Tracker``: no gating of any kind.

Measured in a window of ``--seconds`` after a warm-up (every camera ticking, then ``--warmup`` seconds):

* CPU: this process's CPU time (``time.process_time``, all threads: loop, RTSP readers, ``to_thread``
  pool, the engine's dispatcher) plus the engine's worker process's utime + stime from ``/proc``; reported as
  CPU-seconds per camera-minute and as cores, with a per-thread breakdown (where the CPU goes). The RTSP
  server and its ffmpeg feeders stand in for the cameras and are not counted (printed apart, with the rest
  of the machine's load); the figures include the lag ticker's own cost (below; printed at start);
* detection ticks per camera per second, inferences and regions, frames skipped (source queue overflow +
  engine refusals);
* frame-to-event latency (``CameraPipeline.stats.frame_to_event_ms``: the event stored minus the frame's
  decode time), pooled over the cameras of a configuration;
* event-loop lag: a task sleeping 10 ms at a time records how late it wakes;
* backlog: frames waiting (the sources' consumer queues + the engine's queue), sampled every second; the
  growth is the mean of the last 5 samples minus the mean of the first 5; and the age of the frames the
  pipeline takes (decode → processing) in the first and the last 10 s;
* memory: VmHWM of this process + the worker (reset through ``/proc/PID/clear_refs`` at the window's start),
  VmRSS sampled every second; ``--soak`` fits the anonymous RSS (RssAnon: heaps, not shared libraries the
  kernel may drop) after a 2-minute warm-up;
* person tracks: a track is counted when it is confirmed and spans at least ~3 detection ticks
  (last seen - first seen >= 1.5 tick intervals), the same rule for both loops. Tracks are **matched, not
  just counted**: every frame the loops take is located in the clip (the stream is the clip's own H.264,
  decoded bit-exactly, so a 32x24 subsample of the frame identifies its index), and a naive person track is
  *found* when a confirmed pipeline person track of the same camera overlaps it (IoU >= 0.3, at a clip frame
  within one frame of the naive tick) on at least two of its ticks (one, when it has one tick in range).
  Naive tracks are compared only when at least 80% of their ticks fall on clip frames the pipeline phase
  also saw. Counting alone would let a missed walker and a spurious track cancel out. The recall is over the
  naive tracks that **move** (the centre gets half a box height from its first position): on the busy clip
  the naive loop's tracks that never move are mostly two traffic cones and a stone it scores 0.42-0.47 as
  "person" (min_score 0.4), which the pipeline rarely looks at (nothing moves there), and a few people
  standing still (0.53-0.74), which it finds (looked at frame by frame in a replay of the whole clip); they
  are counted and printed apart (``with the static ones``), so nothing is hidden.

Headline figures (the RESULT line): ``cams4_cpu_cores`` is the pipeline on the busy clip at 4 cameras;
``busy_cpu_ratio_vs_naive``, ``busy_track_recall`` and ``quiet_cpu_ratio_vs_naive`` pool the camera counts
at which the naive loop kept up (ran at least 95% of its detection ticks): above that the machine starves
it, its CPU is capped by the two cores and its tracks fragment, and it is no baseline. ``event_p99_ms``
and ``loop_lag_p99_ms`` are the worst pipeline configuration's; ``cams8_backlog_growth`` the busy clip's at
8 cameras; ``peak_rss_mb`` the largest of the pipeline's. The output ends with one RESULT line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import av  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402

from edgeagent.drivers.camera.config import CameraDevice, CamerasConfig  # noqa: E402
from edgeagent.drivers.camera.evidence import EvidenceStore  # noqa: E402
from edgeagent.drivers.camera.pipeline import CameraPipeline, keep_detections  # noqa: E402
from edgeagent.drivers.camera.rtsp import Frame, RtspSource, luma_view  # noqa: E402
from edgeagent.drivers.camera.tracker import Tracker  # noqa: E402
from edgeagent.kernel.runtime import allocator  # noqa: E402
from edgeagent.models.engine import InferenceEngine  # noqa: E402
from edgeagent.models.manifest import load_manifests  # noqa: E402
from edgeagent.models.types import Box, Detection, EngineBusy, InferenceError  # noqa: E402
from tests.rtsp_peer import CLIP_FPS, RtspServer, busy_clip, quiet_clip  # noqa: E402

MODEL = "nanodet"
DETECT_FPS = 5.0
CLASSES = ["person"]
MIN_SPAN_S = 1.5 / DETECT_FPS  # "at least ~3 ticks": 3 ticks span 2 intervals, 2 ticks only 1
MATCH_IOU = 0.3
THUMB_STEP = 24  # 768x576 -> 32x24 subsample: identifies a clip frame
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

TARGET_CAMS4_CORES = 1.0
TARGET_BUSY_RATIO = 0.5
TARGET_RECALL = 0.98
TARGET_QUIET_RATIO = 0.1
TARGET_EVENT_P99_MS = 500.0
TARGET_LAG_P99_MS = 20.0
TARGET_BACKLOG_GROWTH = 1.0  # frames; the queues are bounded, so the skip rate is printed beside it
TARGET_RSS_SLOPE_MB_H = 6.0  # ~1 MB over a 10-minute soak: what 10 minutes can resolve above noise
AGE_TICKS = round(10 * DETECT_FPS)  # ~10 s of ticks per camera for the frame-age figures
KEPT_UP = 0.95  # share of the detection ticks a loop must run to count as sustaining 5 fps

# The demo camera's zone and line (edgeagent/demo.py), so rules and their events are part of the cost.
ZONES = [{"name": "lawn", "points": [[0.0, 0.62], [1.0, 0.62], [1.0, 1.0], [0.0, 1.0]], "classes": ["person"]}]
LINES = [{"name": "middle", "a": [0.05, 0.55], "b": [0.95, 0.55], "a_to_b": "south", "b_to_a": "north",
          "classes": ["person"]}]


# --- /proc --------------------------------------------------------------------------------------------------

def proc_cpu_s(pid: int | str = "self") -> float:
    """utime + stime of a process (all its threads), seconds; NaN when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    rest = text[text.rindex(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_status_kb(pid: int | str = "self") -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def reset_hwm(pid: int | str = "self") -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_busy_s() -> tuple[float, float]:
    """(busy CPU-seconds of the whole machine, wall-clock stamp) from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    guest = sum(ticks[8:10]) if len(ticks) > 9 else 0  # already inside user/nice
    return (sum(ticks) - idle - guest) / CLK_TCK, time.monotonic()


def thread_group(name: str) -> str:
    if name == "MainThread":
        return "event loop (main thread)"
    if name.startswith("rtsp-"):
        return "RTSP read + decode threads"
    if name.startswith("asyncio"):
        return "to_thread pool (motion)"
    if name.startswith("edgeagent-inference"):
        return "engine dispatcher thread"
    return "other threads"


def thread_cpu_s() -> dict[int, tuple[str, float]]:
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[int, tuple[str, float]] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        tid = int(task.name)
        rest = text[text.rindex(")") + 2:].split()
        out[tid] = (names.get(tid, "?"), (int(rest[11]) + int(rest[12])) / CLK_TCK)
    return out


def thread_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    groups: dict[str, float] = defaultdict(float)
    for tid, (name, cpu) in after.items():
        groups[thread_group(name)] += cpu - before.get(tid, (name, 0.0))[1]
    return dict(groups)


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def check(value: float, ok: bool) -> str:
    """PASS/FAIL, or "(no data)" when the figure could not be measured in this run (NaN)."""
    return "(no data)" if math.isnan(value) else verdict(ok)


def source_state() -> str:
    """The commit measured, and whether the product code differs from it (others edit it concurrently)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False,
                              capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "edgeagent", "drivers",
                                "models"], check=False, capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "commit unknown"
    return f"commit {head or 'unknown'}" + (" + uncommitted product changes" if dirty else "")


# --- clip frame index ---------------------------------------------------------------------------------------

def thumb(gray: np.ndarray) -> bytes:
    """The subsample of a frame's luma plane (the decoder's own Y: no conversion needed to locate a frame)."""
    return np.ascontiguousarray(gray[::THUMB_STEP, ::THUMB_STEP]).tobytes()


class ClipIndex:
    """Where in the clip a decoded frame is: exact subsample bytes first, the nearest subsample otherwise."""

    def __init__(self, clip: Path) -> None:
        self.exact: dict[bytes, int] = {}
        thumbs: list[np.ndarray] = []
        with av.open(str(clip)) as c:
            stream = c.streams.video[0]
            stream.codec_context.thread_count = 1
            for i, frame in enumerate(c.decode(stream)):
                luma = luma_view(frame)
                assert luma is not None, "the clip must be YUV"
                small = np.ascontiguousarray(luma[0][::THUMB_STEP, ::THUMB_STEP])
                self.exact.setdefault(small.tobytes(), i)
                thumbs.append(small.astype(np.int16).ravel())
        self.thumbs = np.stack(thumbs)
        self.frames = len(thumbs)
        self.nearest_used = 0

    def locate(self, key: bytes | int) -> int:
        if isinstance(key, int):
            return key
        hit = self.exact.get(key)
        if hit is not None:
            return hit
        self.nearest_used += 1
        probe = np.frombuffer(key, dtype=np.uint8).astype(np.int16)
        if probe.size != self.thumbs.shape[1]:
            return -1
        return int(np.abs(self.thumbs - probe).sum(axis=1).argmin())


# --- recording ---------------------------------------------------------------------------------------------

TrackRow = tuple[int, Box, bool, float, float]  # id, box, matched this tick, first_seen_s, last_seen_s


@dataclass(slots=True)
class Tick:
    t: float
    key: bytes | int  # the clip frame, or the frame's subsample when no clip frame matched exactly
    tracks: list[TrackRow]


@dataclass
class CamRecord:
    ticks: list[Tick] = field(default_factory=list)
    # frame age (ms) when the loop takes a frame: the window's first ticks, and a ring of its last ones
    ages_first: list[float] = field(default_factory=list)
    ages_last: deque[float] = field(default_factory=lambda: deque(maxlen=AGE_TICKS))
    first_tick: float | None = None
    busy: int = 0  # naive: engine refusals
    errors: int = 0
    runs: int = 0  # naive: inferences done
    due: int = 0  # naive: detection ticks due
    keep_ticks: bool = True  # False in the soak: nothing to compare, and the RSS must not grow by our lists
    index: ClipIndex | None = None

    def age(self, ms: float) -> None:
        if len(self.ages_first) < AGE_TICKS:
            self.ages_first.append(ms)
        self.ages_last.append(ms)

    def tick(self, now: float, frame: Frame, tracks: list[TrackRow]) -> None:
        if not self.keep_ticks:
            return
        assert frame.gray is not None
        key = thumb(frame.gray)
        # Located now (a dict look-up): an int per tick instead of the subsample's bytes.
        pos = self.index.exact.get(key) if self.index is not None else None
        self.ticks.append(Tick(now, key if pos is None else pos, tracks))


class BenchSink:
    """What CameraPipeline calls (emit, emit_telemetry); counts the events by type (their latency is the
    pipeline's own ``frame_to_event_ms``)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.telemetry = 0

    async def emit(self, type_name: str, device_id: str, data: Any, attachments: tuple[Any, ...] = ()) -> None:
        self.counts[type_name] += 1

    def emit_telemetry(self, type_name: str, device_id: str, data: Any) -> None:
        self.telemetry += 1


class RecordingSource:
    """The RtspSource as ``CameraPipeline.run`` sees it, plus a record of each tick's tracks: the code after
    ``yield`` runs when the pipeline asks for the next frame, i.e. once it has processed this one."""

    def __init__(self, source: RtspSource, pipeline: CameraPipeline, rec: CamRecord, recording: Callable[[], bool]
                 ) -> None:
        self._source = source
        self._pipeline = pipeline
        self._rec = rec
        self._recording = recording
        self.analyzers = source.analyzers  # the pipeline's motion runs in the reader thread, as in the daemon
        self.set_idle = source.set_idle  # and it makes the source decode keyframes only in a quiet scene

    async def frames(self, *, newest: bool = False) -> AsyncIterator[Frame]:
        async for frame in self._source.frames(newest=newest):
            now = time.monotonic()
            if self._rec.first_tick is None:
                self._rec.first_tick = now
            on = self._recording()
            if on:
                self._rec.age((now - frame.mono_s) * 1000)
            yield frame
            if on:
                self._rec.tick(now, frame, [
                    (t.id, t.box, t.matched, t.first_seen_s, t.last_seen_s)
                    for t in self._pipeline.tracks if t.label == "person"])

    def stats(self) -> dict[str, Any]:
        return self._source.stats()


def camera_config(i: int, url: str) -> CameraDevice:
    return CameraDevice.model_validate({
        "type": "camera", "id": f"cam{i}", "rtsp": {"detect_url": url},
        "detect": {"fps": DETECT_FPS, "classes": CLASSES}, "zones": ZONES, "lines": LINES})


def keep(cam: CameraDevice, raw: Sequence[Detection], w: int, h: int) -> list[Detection]:
    """The pipeline's own filter (classes, min score per class, min area), for the naive loop."""
    return keep_detections(cam, raw, w, h)


async def naive_camera(cam: CameraDevice, engine: InferenceEngine, source: RtspSource, rec: CamRecord,
                       recording: Callable[[], bool]) -> None:
    """Every frame decoded and converted (the source has no decode_fps), the whole frame to the detector at
    every detection tick, the tracker on the result."""
    tracker = Tracker()
    last: float | None = None
    frame_dt = 1.0 / CLIP_FPS
    async for frame in source.frames():
        now = time.monotonic()
        if rec.first_tick is None:
            rec.first_tick = now
        t = frame.pts_s if frame.pts_s is not None else frame.mono_s
        # The same tick rule as RtspSource's decode_fps: a frame is due 1/fps after the last one taken.
        if last is not None and t >= last and t - last < 1.0 / DETECT_FPS - 0.5 * frame_dt:
            continue
        last = t
        on = recording()
        if on:
            rec.due += 1
            rec.age((now - frame.mono_s) * 1000)
        h, w = frame.image.shape[:2]
        try:
            raw = await engine.detect_regions(MODEL, frame.image, [(0.0, 0.0, float(w), float(h))], camera=cam.id)
        except EngineBusy:
            rec.busy += on
            continue
        except InferenceError:
            rec.errors += on
            continue
        update = tracker.update(keep(cam, raw, w, h), now)
        if on:
            rec.runs += 1
            rec.tick(now, frame, [
                (tr.id, tr.box, tr.matched, tr.first_seen_s, tr.last_seen_s)
                for tr in update.tracks if tr.label == "person"])


class LagHist:
    """Event-loop lateness in 0.05 ms bins up to 250 ms (later ones in the last bin, the maximum kept apart):
    fixed memory, so a 10-minute soak at 100 samples/s does not grow the RSS it measures."""

    BIN_MS = 0.05
    BINS = 5000

    def __init__(self) -> None:
        self.counts = np.zeros(self.BINS, dtype=np.int64)
        self.counts[:] = 0  # touch the pages now
        self.n = 0
        self.max = float("nan")

    def add(self, ms: float) -> None:
        self.counts[min(self.BINS - 1, max(0, int(ms / self.BIN_MS)))] += 1
        self.n += 1
        self.max = ms if not self.max >= ms else self.max

    def pct(self, q: float) -> float:
        if not self.n:
            return float("nan")
        rank = max(1, math.ceil(q / 100 * self.n))
        k = int(np.searchsorted(np.cumsum(self.counts), rank))
        return min((k + 1) * self.BIN_MS, self.max)


async def lag_ticker(out: LagHist, interval: float = 0.01) -> None:
    while True:
        t0 = time.monotonic()
        await asyncio.sleep(interval)
        out.add((time.monotonic() - t0 - interval) * 1000)


async def ticker_cost(seconds: float = 3.0, rounds: int = 3) -> float:
    """CPU share of one core the 10 ms lag ticker costs on an otherwise idle loop (median of ``rounds`` paired
    idle/ticking intervals, on the process clock). Printed, not subtracted: on this VM a wake-up costs 50-150 us
    depending on the machine's load, and less on a loop that other work keeps awake, so no one figure is right
    for every window. Both loops carry the ticker, so the CPU ratios lean against the pipeline, not for it."""
    shares: list[float] = []
    for _ in range(rounds):
        c0 = time.process_time()
        await asyncio.sleep(seconds)
        idle = time.process_time() - c0
        task = asyncio.create_task(lag_ticker(LagHist()))
        c0 = time.process_time()
        await asyncio.sleep(seconds)
        busy = time.process_time() - c0
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        shares.append(max(0.0, busy - idle) / seconds)
    return statistics.median(shares)


@functools.cache
def libc() -> ctypes.CDLL | None:
    """glibc, loaded once: a CDLL made per call is cyclic garbage (a new function-pointer type each time),
    which the soak's memory figures would count."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def malloc_trim() -> None:
    """Give freed heap back to the OS between phases, so one phase's peak RSS does not carry the last one's."""
    with contextlib.suppress(AttributeError):
        if (lib := libc()) is not None:
            lib.malloc_trim(0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo_mb() -> tuple[float, float]:
    """glibc's heap (every arena): (bytes in use by malloc's callers incl. mmapped blocks, bytes free but kept),
    MB. In use growing is something allocating and holding; free-but-kept growing is the allocator (arenas,
    fragmentation), not a leak. NaN when glibc lacks mallinfo2 (< 2.33)."""
    try:
        fn = libc().mallinfo2  # type: ignore[union-attr]
    except AttributeError:
        return float("nan"), float("nan")
    fn.restype = _MallInfo2
    m = fn()
    return (m.uordblks + m.hblkhd) / 2**20, m.fordblks / 2**20


@dataclass
class MemSample:
    """One soak sample of where this process's memory is (``--mem-detail``)."""
    t: float
    malloc_used_mb: float  # glibc heap in use (Python's large objects, numpy buffers, FFmpeg, onnxruntime)
    malloc_free_mb: float  # glibc heap free but not given back
    py_blocks: int  # pymalloc blocks in use (Python's small objects), sys.getallocatedblocks()
    traced_mb: float  # tracemalloc's current total (NaN without --tracemalloc)
    tasks: int  # asyncio tasks alive
    threads: int
    full_gcs: int  # the cyclic collector's full (generation 2) collections so far


class MemProbe:
    """Where the soak's memory goes, for telling a leak from the allocator settling: per-sample heap figures
    (``MemSample``), and at chosen minutes a tracemalloc comparison (by traceback, against the first chosen
    minute) and a count of live GC-tracked objects by type (against the same minute), printed as they come."""

    def __init__(self, at_s: Sequence[float], frames: int, trim_every_s: float = 0.0) -> None:
        self.at_s = sorted(at_s)
        self.frames = frames
        self.trim_every_s = trim_every_s
        self.samples: list[MemSample] = []
        self._base: tracemalloc.Snapshot | None = None
        self._base_types: Counter[str] | None = None
        self._base_t = 0.0
        self._next_trim = trim_every_s

    def start(self) -> None:
        if self.frames:
            tracemalloc.start(self.frames)

    def stop(self) -> None:
        if self.frames:
            tracemalloc.stop()
        self._base = None

    def sample(self, t: float) -> None:
        used, free = mallinfo_mb()
        traced = tracemalloc.get_traced_memory()[0] / 2**20 if tracemalloc.is_tracing() else float("nan")
        self.samples.append(MemSample(t, used, free, sys.getallocatedblocks(), traced, len(asyncio.all_tasks()),
                                      threading.active_count(), gc.get_stats()[2]["collections"]))
        if self.trim_every_s and t >= self._next_trim:
            malloc_trim()
            self._next_trim += self.trim_every_s
        while self.at_s and t >= self.at_s[0]:
            self.at_s.pop(0)
            self._look(t)

    @staticmethod
    def _name(o: object) -> str:
        return f"{type(o).__module__}.{type(o).__qualname__}"

    def _garbage(self, t: float) -> None:
        """What a full collection finds unreachable now (cyclic garbage waiting for the collector), by type,
        and the numpy buffers it holds alive (counted once per buffer)."""
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            found = list(gc.garbage)
            gc.garbage.clear()
        finally:
            gc.set_debug(0)
        kinds = Counter(self._name(o) for o in found)
        # Arrays are not tracked by the collector, so they are not in the garbage list themselves: count the
        # ones the garbage refers to (a frame's image, a coroutine frame's locals), each buffer once.
        bases: dict[int, int] = {}
        for o in found:
            for r in [o, *gc.get_referents(o)]:
                if isinstance(r, np.ndarray):
                    base = r
                    while isinstance(base.base, np.ndarray):
                        base = base.base
                    bases[id(base)] = base.nbytes
        print(f"[mem] minute {t / 60:.1f}: the full collection found {len(found)} unreachable objects "
              f"({len(bases)} numpy buffers, {sum(bases.values()) / 2**20:.1f} MB); full collections so far "
              f"{gc.get_stats()[2]['collections']}; by type:", flush=True)
        for k, n in kinds.most_common(12):
            print(f"[mem]   {n:>8d}  {k}")
        del found

    def _types(self, t: float) -> Counter[str]:
        self._garbage(t)
        return Counter(self._name(o) for o in gc.get_objects())

    def _look(self, t: float) -> None:
        types = self._types(t)
        snap = None
        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot().filter_traces([
                tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib*"),
                tracemalloc.Filter(False, "<unknown>")])
        if self._base_types is None:
            self._base, self._base_types, self._base_t = snap, types, t
            total = sum(types.values())
            print(f"[mem] minute {t / 60:.1f}: {total} GC-tracked objects; the base for later comparisons", flush=True)
            return
        span = f"minute {self._base_t / 60:.1f} -> {t / 60:.1f}"
        grown = sorted(((n - self._base_types.get(k, 0), k, n) for k, n in types.items()), reverse=True)
        print(f"[mem] {span}: GC-tracked objects {sum(self._base_types.values())} -> {sum(types.values())}; "
              "the types that grew most (change, now):", flush=True)
        for d, k, n in grown[:15]:
            if d > 0:
                print(f"[mem]   {d:+8d} {n:>8d}  {k}")
        if snap is not None and self._base is not None:
            stats = snap.compare_to(self._base, "traceback")
            before = sum(x.size for x in self._base.statistics("filename")) / 2**20
            after = sum(x.size for x in snap.statistics("filename")) / 2**20
            print(f"[mem] {span}: tracemalloc total {before:.2f} -> {after:.2f} MB; the tracebacks that grew most:",
                  flush=True)
            # compare_to sorts by the size of the change either way: a shrinking buffer would hide the growth.
            for st in sorted((x for x in stats if x.size_diff > 0), key=lambda x: -x.size_diff)[:12]:
                print(f"[mem]   {st.size_diff / 1024:+9.1f} KiB {st.count_diff:+7d} blocks (now {st.size / 1024:.1f} "
                      f"KiB, {st.count} blocks)")
                for line in st.traceback.format(limit=self.frames)[-2 * min(self.frames, 8):]:
                    print(f"[mem]       {line}")
            by_line = snap.compare_to(self._base, "lineno")
            print(f"[mem] {span}: by line:")
            for st in by_line[:15]:
                print(f"[mem]   {st.size_diff / 1024:+9.1f} KiB {st.count_diff:+7d}  {st.traceback[0]}")
        sys.stdout.flush()


# --- one phase -----------------------------------------------------------------------------------------------

@dataclass
class Phase:
    mode: str  # pipeline | naive
    clip: str  # busy | quiet
    cams: int
    seconds: float = 0.0
    cpu_self: float = 0.0
    cpu_worker: float = 0.0
    cpu_cameras: float = 0.0  # RTSP server + feeders (not counted)
    cpu_machine: float = 0.0
    threads: dict[str, float] = field(default_factory=dict)
    ticks: int = 0
    detector_runs: int = 0
    regions: int = 0
    quiet_ticks: int = 0
    skipped_busy: int = 0
    skipped_error: int = 0
    dropped: int = 0
    decoded: int = 0
    delivered: int = 0
    reconnects: int = 0
    events: dict[str, int] = field(default_factory=dict)
    event_ms: list[float] = field(default_factory=list)
    lag: LagHist = field(default_factory=LagHist)
    waiting: list[float] = field(default_factory=list)
    # (t, RSS MB, anonymous RSS MB, anonymous here, anonymous in the worker), here + worker
    rss_samples: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    hwm_mb: float = float("nan")
    engine_refused: int = 0
    engine_stale: int = 0
    idle_skipped: int = 0  # packets not decoded while the source was idle (keyframes only)
    engine_ms_p50: float | None = None
    engine_compute_p50: float | None = None
    records: list[CamRecord] = field(default_factory=list)
    worker_restarted: bool = False
    loadavg: str = ""
    hwm_split: tuple[float, float] = (float("nan"), float("nan"))  # this process, the worker (MB)
    mem: MemProbe | None = None  # --mem-detail (soak only)

    @property
    def total_cpu(self) -> float:
        return self.cpu_self + self.cpu_worker

    @property
    def cpu_per_cam_min(self) -> float:
        return self.total_cpu / (self.cams * self.seconds / 60) if self.seconds else float("nan")

    @property
    def cores(self) -> float:
        return self.total_cpu / self.seconds if self.seconds else float("nan")

    @property
    def expected_ticks(self) -> float:
        return self.cams * self.seconds * DETECT_FPS

    @property
    def detect_runs_done(self) -> int:
        """Detection ticks that ran (pipeline: every tick not skipped, quiet ones included)."""
        if self.mode == "pipeline":
            return self.ticks - self.skipped_busy - self.skipped_error
        return sum(r.runs for r in self.records)

    @property
    def kept_up(self) -> bool:
        return self.detect_runs_done >= KEPT_UP * self.expected_ticks

    @property
    def skipped(self) -> int:
        busy = self.skipped_busy if self.mode == "pipeline" else sum(r.busy for r in self.records)
        return self.dropped + busy

    @property
    def backlog_growth(self) -> float:
        if len(self.waiting) < 2:
            return float("nan")
        k = min(5, len(self.waiting) // 2)
        return statistics.fmean(self.waiting[-k:]) - statistics.fmean(self.waiting[:k])

    def age_ms(self, first: bool) -> float:
        """Median frame age over every camera's first (or last) ~10 s of ticks in the window."""
        sel = [a for r in self.records for a in (r.ages_first if first else r.ages_last)]
        return statistics.median(sel) if sel else float("nan")


async def wait_until(pred: Callable[[], bool], timeout_s: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(step)
    return pred()


async def run_phase(mode: str, clip_name: str, clip: Path, cams: int, seconds: float, warmup: float,
                    engine: InferenceEngine, evidence_dir: Path | None, index: ClipIndex,
                    *, keep_ticks: bool = True, rss_every: float = 1.0, probe: MemProbe | None = None) -> Phase:
    malloc_trim()
    ph = Phase(mode=mode, clip=clip_name, cams=cams)
    ph.loadavg = Path("/proc/loadavg").read_text().split(" ")[0]
    server = RtspServer(clip, mounts=cams)
    await asyncio.to_thread(server.__enter__)
    recording = False

    def is_recording() -> bool:
        return recording

    sink = BenchSink()
    tasks: list[asyncio.Task[Any]] = []
    pipelines: list[CameraPipeline] = []
    evidence = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            if evidence_dir is not None:
                evidence = await stack.enter_async_context(EvidenceStore(
                    evidence_dir / f"{mode}-{clip_name}-{cams}", max_bytes=500_000_000, retention_s=3600))
            sources: list[RtspSource] = []
            for i, url in enumerate(server.urls):
                cam = camera_config(i, url)
                rec = CamRecord(keep_ticks=keep_ticks, index=index)
                ph.records.append(rec)
                # The daemon's source settings (service.py), decode_fps only for the pipeline.
                src = RtspSource(url, name=cam.id, open_timeout_s=cam.rtsp.open_timeout_s,
                                 freeze_after_s=cam.rtsp.frozen_after_s,
                                 decode_fps=cam.detect.fps if mode == "pipeline" else None,
                                 # the naive loop converts every frame to BGR as it is decoded
                                 bgr_on_demand=mode == "pipeline")
                await stack.enter_async_context(src)
                sources.append(src)
                if mode == "pipeline":
                    # BenchSink has the two methods CameraPipeline calls, not the whole EventSink.
                    pipe = CameraPipeline(cam, detector=engine, model=MODEL, input_size=416,
                                          sink=sink,  # type: ignore[arg-type]
                                          evidence=evidence)
                    pipelines.append(pipe)
                    tasks.append(asyncio.create_task(pipe.run(RecordingSource(src, pipe, rec, is_recording))))
                else:
                    tasks.append(asyncio.create_task(naive_camera(cam, engine, src, rec, is_recording)))
            if not await wait_until(lambda: all(r.first_tick is not None for r in ph.records), 30.0):
                late = [i for i, r in enumerate(ph.records) if r.first_tick is None]
                raise RuntimeError(f"{mode}/{clip_name}/{cams}: no frame from cameras {late} within 30 s")
            await asyncio.sleep(warmup)

            # --- the window ---
            def pipe_sum(key: str) -> int:
                return sum(getattr(p.stats, key) for p in pipelines)

            def src_stats(src: RtspSource) -> dict[str, Any]:
                # RtspSource.stats() iterates a deque the reader thread appends to, without a lock, and can
                # raise "deque mutated during iteration" (seen under tracemalloc): try again.
                for _ in range(5):
                    try:
                        return src.stats()
                    except RuntimeError:
                        continue
                return src.stats()

            def src_sum(key: str) -> int:
                return sum(int(src_stats(s)[key]) for s in sources)

            def waiting() -> float:
                return float(src_sum("queue_depth") + int(engine.stats()["queue_depth"]))

            worker_pid = engine.stats()["worker_pid"]
            cam_pids = [p.pid for p in [server.server, *server.feeders] if p is not None]
            keys = ("ticks", "detector_runs", "regions", "quiet_ticks", "skipped_busy", "skipped_error", "events")
            p0 = {k: pipe_sum(k) for k in keys}
            s0 = {k: src_sum(k) for k in ("dropped", "decoded", "delivered", "reconnects", "idle_skipped")}
            e0 = engine.stats()
            events_before = [p.stats.events for p in pipelines]
            hwm_ok = reset_hwm() and (worker_pid is None or reset_hwm(worker_pid))
            lag = LagHist()
            ticker = asyncio.create_task(lag_ticker(lag))
            ev0 = dict(sink.counts)
            recording = True
            th0 = thread_cpu_s()
            c0, w0 = time.process_time(), proc_cpu_s(worker_pid) if worker_pid else 0.0
            k0 = sum(proc_cpu_s(p) for p in cam_pids)
            m0, t0 = machine_busy_s()
            rss_max = 0.0
            next_sample = t0
            ph.mem = probe
            if probe is not None:
                probe.start()
            while True:
                now = time.monotonic()
                if now - t0 >= seconds:
                    break
                if now >= next_sample:
                    ph.waiting.append(waiting())
                    me, wk = proc_status_kb(), proc_status_kb(worker_pid) if worker_pid else {}
                    rss = (me.get("VmRSS", 0) + wk.get("VmRSS", 0)) / 1024
                    anon = (me.get("RssAnon", 0) + wk.get("RssAnon", 0)) / 1024
                    ph.rss_samples.append((now - t0, rss, anon, me.get("RssAnon", 0) / 1024,
                                           wk.get("RssAnon", 0) / 1024))
                    rss_max = max(rss_max, rss)
                    if probe is not None:
                        probe.sample(now - t0)
                    next_sample += rss_every
                await asyncio.sleep(max(0.0, min(next_sample, t0 + seconds) - time.monotonic()))
            m1, t1 = machine_busy_s()
            c1 = time.process_time()
            w1 = proc_cpu_s(worker_pid) if worker_pid else 0.0
            k1 = sum(proc_cpu_s(p) for p in cam_pids)
            th1 = thread_cpu_s()
            recording = False
            if probe is not None:
                probe.stop()
            ph.waiting.append(waiting())
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            e1 = engine.stats()
            ph.seconds = t1 - t0
            ph.cpu_self = c1 - c0
            ph.cpu_worker = w1 - w0
            ph.worker_restarted = e1["worker_pid"] != worker_pid
            ph.cpu_cameras = k1 - k0
            ph.cpu_machine = m1 - m0
            ph.threads = thread_delta(th0, th1)
            ph.lag = lag
            me, wk = proc_status_kb(), proc_status_kb(worker_pid) if worker_pid else {}
            hwm = (me.get("VmHWM", 0) + wk.get("VmHWM", 0)) / 1024
            ph.hwm_mb = hwm if hwm_ok else rss_max
            ph.hwm_split = (me.get("VmHWM", 0) / 1024, wk.get("VmHWM", 0) / 1024)
            for k in keys[:-1]:
                setattr(ph, k, pipe_sum(k) - p0[k])
            ph.dropped = src_sum("dropped") - s0["dropped"]
            ph.decoded = src_sum("decoded") - s0["decoded"]
            ph.delivered = src_sum("delivered") - s0["delivered"]
            ph.reconnects = src_sum("reconnects") - s0["reconnects"]
            ph.engine_refused = int(e1["refused"]) - int(e0["refused"])
            ph.engine_stale = int(e1.get("stale", 0)) - int(e0.get("stale", 0))
            ph.idle_skipped = src_sum("idle_skipped") - s0["idle_skipped"]
            model = e1["models"].get(MODEL, {})
            ph.engine_ms_p50, ph.engine_compute_p50 = model.get("p50_ms"), model.get("compute_p50_ms")
            ph.events = {k: v - ev0.get(k, 0) for k, v in sink.counts.items() if v - ev0.get(k, 0)}
            for p, before in zip(pipelines, events_before, strict=True):
                # The latencies of the events stored in the window: the newest of the stats' window.
                n = p.stats.events - before
                ph.event_ms.extend(list(p.stats.frame_to_event_ms)[-n:] if n > 0 else [])
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.to_thread(server.close)
    return ph


# --- tracks and matching -------------------------------------------------------------------------------------

@dataclass
class TrackSeen:
    first_seen: float = math.inf
    last_seen: float = -math.inf
    boxes: dict[int, list[Box]] = field(default_factory=dict)  # clip frame -> boxes (any tick)
    matched_at: dict[int, Box] = field(default_factory=dict)  # clip frame -> detector box (matched ticks)

    @property
    def span_s(self) -> float:
        return self.last_seen - self.first_seen


def tracks_of(rec: CamRecord, index: ClipIndex) -> tuple[dict[int, TrackSeen], set[int]]:
    """The person tracks of one camera by id, in clip frames; and the clip frames this loop saw."""
    out: dict[int, TrackSeen] = {}
    seen: set[int] = set()
    for tick in rec.ticks:
        pos = index.locate(tick.key)
        if pos < 0:
            continue
        seen.add(pos)
        for tid, box, matched, first, last in tick.tracks:
            tr = out.setdefault(tid, TrackSeen())
            tr.first_seen = min(tr.first_seen, first)
            tr.last_seen = max(tr.last_seen, last)
            tr.boxes.setdefault(pos, []).append(box)
            if matched:
                tr.matched_at[pos] = box
    return out, seen


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Recall:
    naive: int = 0  # naive person tracks that count (confirmed, >= ~3 ticks)
    comparable: int = 0  # of them, on clip frames the pipeline phase also saw, that moved
    found: int = 0
    static: int = 0  # comparable naive tracks that never moved (see moved())
    static_found: int = 0
    pipeline: int = 0  # pipeline person tracks that count
    pipeline_unmatched: int = 0  # counted pipeline tracks no naive track overlaps (on comparable frames)
    delays: list[float] = field(default_factory=list)  # pipeline's first box - naive's, clip frames

    def add(self, other: Recall) -> None:
        for k in ("naive", "comparable", "found", "static", "static_found", "pipeline", "pipeline_unmatched"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.delays.extend(other.delays)

    @property
    def recall(self) -> float:
        return self.found / self.comparable if self.comparable else float("nan")

    @property
    def recall_all(self) -> float:
        n = self.comparable + self.static
        return (self.found + self.static_found) / n if n else float("nan")


def moved(track: TrackSeen) -> bool:
    """The track's centre got at least half its height away from where it was first detected: something that
    walked. On the busy clip the naive loop's person tracks that never move are mostly two traffic cones and a
    stone it calls "person" at 0.42-0.47 (min_score is 0.4), and a few people standing; counted apart."""
    pos = sorted(track.matched_at)
    if len(pos) < 2:
        return False
    b0 = track.matched_at[pos[0]]
    c0 = ((b0[0] + b0[2]) / 2, (b0[1] + b0[3]) / 2)
    height = statistics.median(b[3] - b[1] for b in track.matched_at.values())
    return any(math.hypot((b[0] + b[2]) / 2 - c0[0], (b[1] + b[3]) / 2 - c0[1]) >= 0.5 * height
               for b in track.matched_at.values())


def overlaps(a: TrackSeen, b: TrackSeen, frames: dict[int, Box]) -> list[int]:
    """The clip frames of ``frames`` (clip frame -> box of ``a``) where ``b`` has a box within one frame with
    IoU >= 0.3."""
    return [pos for pos, box in frames.items()
            if any(iou(box, other) >= MATCH_IOU for d in (-1, 0, 1) for other in b.boxes.get(pos + d, ()))]


def compare(pipe: Phase, naive: Phase, index: ClipIndex) -> Recall:
    out = Recall()
    for prec, nrec in zip(pipe.records, naive.records, strict=True):
        ptracks, pseen = tracks_of(prec, index)
        ntracks, nseen = tracks_of(nrec, index)
        near_p = {p + d for p in pseen for d in (-1, 0, 1)}
        near_n = {p + d for p in nseen for d in (-1, 0, 1)}
        counted_p = {i: t for i, t in ptracks.items() if t.span_s >= MIN_SPAN_S}
        out.pipeline += len(counted_p)
        for nt in ntracks.values():
            if nt.span_s < MIN_SPAN_S or not nt.matched_at:
                continue
            out.naive += 1
            in_range = {p: b for p, b in nt.matched_at.items() if p in near_p}
            if len(in_range) < 0.8 * len(nt.matched_at):
                continue
            need = min(2, len(in_range))
            hits = [h for pt in ptracks.values() if len(h := overlaps(nt, pt, in_range)) >= need]
            if not moved(nt):
                out.static += 1
                out.static_found += bool(hits)
                continue
            out.comparable += 1
            if hits:
                out.found += 1
                out.delays.append(min(min(h) for h in hits) - min(in_range))
        for pt in counted_p.values():
            frames = {p: bs[0] for p, bs in pt.boxes.items() if p in near_n}
            if len(frames) < 0.8 * len(pt.boxes):
                continue
            if not any(len(overlaps(pt, nt, frames)) >= min(2, len(frames)) for nt in ntracks.values()):
                out.pipeline_unmatched += 1
    return out


# --- report --------------------------------------------------------------------------------------------------

def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def regions_per_run(ph: Phase) -> float:
    if ph.mode != "pipeline":
        return 1.0
    return ph.regions / ph.detector_runs if ph.detector_runs else float("nan")


def phase_line(ph: Phase) -> str:
    return (f"{ph.clip:<5} {ph.cams:>4}  {ph.mode:<8} {ph.cpu_per_cam_min:>8.2f} {ph.cores:>6.2f} "
            f"{ph.detect_runs_done / max(1e-9, ph.cams * ph.seconds):>6.2f} "
            f"{(ph.detector_runs if ph.mode == 'pipeline' else ph.detect_runs_done) / max(1e-9, ph.seconds):>7.1f} "
            f"{regions_per_run(ph):>6.2f} "
            f"{ph.dropped:>6} {ph.skipped - ph.dropped:>6} {fmt(pct(ph.event_ms, 99), '.0f'):>7} "
            f"{fmt(ph.lag.pct(99)):>7} {fmt(ph.backlog_growth, '+.1f'):>6} {ph.hwm_mb:>7.0f}")


HEADER = ("clip  cams  mode     cpu s/    cores  ticks/  infer/  reg/   frames skip   f2e     lag     backl  peak\n"
          "                       cam-min         cam/s   s       infer  drop   busy   p99 ms  p99 ms  grow   RSS MB")


def detail(ph: Phase) -> list[str]:
    groups = ", ".join(f"{k} {v / ph.seconds * 100:.1f}%" for k, v in sorted(ph.threads.items(), key=lambda x: -x[1])
                       if v > 0.005)
    lines = [f"  {ph.clip}/{ph.cams}/{ph.mode}: {ph.seconds:.0f} s window, load average {ph.loadavg} at start; "
             f"CPU {ph.cpu_self / ph.seconds * 100:.1f}% here + worker {ph.cpu_worker / ph.seconds * 100:.1f}% "
             f"(of one core){'; the worker was restarted' if ph.worker_restarted else ''}; peak RSS "
             f"{ph.hwm_split[0]:.0f} MB here + {ph.hwm_split[1]:.0f} MB worker",
             f"    here by thread: {groups}",
             f"    machine busy {ph.cpu_machine / ph.seconds * 100:.0f}% of one core: cameras (gst + ffmpeg, not "
             f"counted) {ph.cpu_cameras / ph.seconds * 100:.0f}%, everything else "
             f"{(ph.cpu_machine - ph.total_cpu - ph.cpu_cameras) / ph.seconds * 100:.0f}%",
             f"    frames decoded {ph.decoded}, handed out {ph.delivered} (BGR: "
             f"{'every one' if ph.mode == 'naive' else 'on detector ticks only'}), not decoded while idle "
             f"{ph.idle_skipped}, dropped {ph.dropped}, reconnects "
             f"{ph.reconnects}; engine p50 {fmt(ph.engine_ms_p50)} ms (compute {fmt(ph.engine_compute_p50)} ms), "
             f"refused {ph.engine_refused}, stale {ph.engine_stale}; frame age when taken p50 first 10 s "
             f"{fmt(ph.age_ms(True))} ms, "
             f"last 10 s {fmt(ph.age_ms(False))} ms"]
    if ph.mode == "pipeline":
        lines.append(f"    ticks {ph.ticks} (quiet {ph.quiet_ticks}, busy {ph.skipped_busy}, "
                     f"error {ph.skipped_error}), "
                     f"detector runs {ph.detector_runs}, regions {ph.regions}; events "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(ph.events.items())) or 'none'}; "
                     f"f2e n {len(ph.event_ms)} p50 {fmt(pct(ph.event_ms, 50), '.0f')} "
                     f"max {fmt(max(ph.event_ms) if ph.event_ms else None, '.0f')} ms; "
                     f"lag p50 {fmt(ph.lag.pct(50))} max {fmt(ph.lag.max)} ms")
    else:
        r = sum(x.runs for x in ph.records)
        lines.append(f"    detection ticks due {sum(x.due for x in ph.records)}, ran {r}, refused "
                     f"{sum(x.busy for x in ph.records)}; lag p99 {fmt(ph.lag.pct(99))} ms")
    return lines


def rss_slope(samples: Sequence[tuple[float, ...]], after_s: float, which: int) -> float:
    """Least-squares slope in MB/h of sample[which] after ``after_s``."""
    pts = [(t, s[which]) for s in samples if (t := s[0]) >= after_s]
    if len(pts) < 3:
        return float("nan")
    xs = [p[0] / 3600 for p in pts]
    ys = [p[1] for p in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


def report(args: argparse.Namespace, phases: list[Phase], soak: Phase | None,
           indexes: dict[str, ClipIndex]) -> str:
    print("\n== per configuration (CPU: this process + the inference worker) ==")
    print(HEADER)
    for ph in [*phases, *([soak] if soak else [])]:
        print(phase_line(ph) + ("  (soak)" if ph is soak else ""))
    print("\n== details ==")
    for ph in [*phases, *([soak] if soak else [])]:
        print("\n".join(detail(ph)))
    if soak is not None:
        print("\n== soak: RSS per minute (median of the samples; MB) ==")
        mem = soak.mem
        print("  minute  RSS here + worker  anonymous (here + worker)  anonymous here  anonymous worker"
              + ("  malloc used  malloc free  pymalloc blocks  traced MB  tasks  threads" if mem else ""))
        for minute in range(math.ceil(soak.seconds / 60)):
            sel = [x for x in soak.rss_samples if minute * 60 <= x[0] < (minute + 1) * 60]
            if sel:
                line = (f"  {minute:>6}  {statistics.median(x[1] for x in sel):>17.1f}  "
                        f"{statistics.median(x[2] for x in sel):>25.1f}  "
                        f"{statistics.median(x[3] for x in sel):>14.1f}  {statistics.median(x[4] for x in sel):>16.1f}")
                ms = [m for m in mem.samples if minute * 60 <= m.t < (minute + 1) * 60] if mem else []
                if ms:
                    line += (f"  {statistics.median(m.malloc_used_mb for m in ms):>11.1f}  "
                             f"{statistics.median(m.malloc_free_mb for m in ms):>11.1f}  "
                             f"{statistics.median(m.py_blocks for m in ms):>15.0f}  "
                             f"{statistics.median(m.traced_mb for m in ms):>9.2f}  "
                             f"{max(m.tasks for m in ms):>5d}  {max(m.threads for m in ms):>7d}")
                print(line)

    by = {(p.mode, p.clip, p.cams): p for p in phases}
    print("\n== person tracks (confirmed, >= ~3 ticks; naive tracks matched by a pipeline track) ==")
    pooled: dict[str, Recall] = {"busy": Recall(), "quiet": Recall()}
    ratio_cpu: dict[str, list[float]] = {"busy": [0.0, 0.0], "quiet": [0.0, 0.0]}
    used: dict[str, list[int]] = {"busy": [], "quiet": []}
    for (mode, clip, n), pipe in sorted(by.items(), key=lambda x: (x[0][1], x[0][2])):
        naive = by.get(("naive", clip, n))
        if mode != "pipeline" or naive is None:
            continue
        rc = compare(pipe, naive, indexes[clip])
        ratio = pipe.cpu_per_cam_min / naive.cpu_per_cam_min if naive.cpu_per_cam_min else float("nan")
        note = "" if naive.kept_up else "  (naive did not keep up: not pooled)"
        delay = statistics.median(rc.delays) / CLIP_FPS if rc.delays else float("nan")
        print(f"  {clip:<5} {n} cams: naive {rc.naive}; on common frames {rc.comparable} moving, found "
              f"{rc.found} -> recall {fmt(rc.recall, '.3f')}, and {rc.static} static, found {rc.static_found} "
              f"(all: {fmt(rc.recall_all, '.3f')}); pipeline {rc.pipeline} ({rc.pipeline_unmatched} without a "
              f"naive match); first pipeline box after the naive's: median {fmt(delay, '.2f')} s; "
              f"CPU ratio {ratio:.3f}{note}")
        if naive.kept_up:
            pooled[clip].add(rc)
            ratio_cpu[clip][0] += pipe.total_cpu
            ratio_cpu[clip][1] += naive.total_cpu
            used[clip].append(n)
    for clip, idx in indexes.items():
        if idx.nearest_used:
            print(f"  ({clip}: {idx.nearest_used} frames located by the nearest subsample, not exactly)")

    def ratio_of(clip: str) -> float:
        a, b = ratio_cpu[clip]
        return a / b if b else float("nan")

    busy_ratio, quiet_ratio = ratio_of("busy"), ratio_of("quiet")
    recall = pooled["busy"].recall
    pipes = [p for p in phases if p.mode == "pipeline"]
    c4 = by.get(("pipeline", "busy", 4))
    c8 = by.get(("pipeline", "busy", 8))
    cams4 = c4.cores if c4 else float("nan")
    ev_p99 = max((pct(p.event_ms, 99) for p in pipes if p.event_ms), default=float("nan"))
    ev_p99_4 = max((pct(p.event_ms, 99) for p in pipes if p.event_ms and p.cams <= 4), default=float("nan"))
    lag_p99 = max((p.lag.pct(99) for p in pipes if p.lag.n), default=float("nan"))
    backlog = c8.backlog_growth if c8 else float("nan")
    peak = max((p.hwm_mb for p in [*pipes, *([soak] if soak else [])]), default=float("nan"))

    print("\n== targets (pooled over " + "; ".join(f"{c}: {', '.join(map(str, used[c])) or 'none'} cams"
                                                 for c in used) + " where the naive loop kept up) ==")
    if c4:
        print(f"  {verdict(cams4 <= TARGET_CAMS4_CORES and c4.kept_up)}  4 cameras at 5 detection fps within one "
              f"core: {cams4:.2f} cores on the busy clip, {c4.detect_runs_done / (4 * c4.seconds):.2f} detection "
              f"ticks/s per camera run")
    else:
        print("  (not run)  4 cameras within one core")
    print(f"  {check(busy_ratio, busy_ratio <= TARGET_BUSY_RATIO)}  busy clip CPU <= {TARGET_BUSY_RATIO}x the naive "
          f"loop's: {busy_ratio:.3f}x")
    print(f"  {check(recall, recall >= TARGET_RECALL)}  busy clip >= {TARGET_RECALL:.0%} of the naive loop's person "
          f"tracks that move: {fmt(recall, '.3f')} ({pooled['busy'].found} of {pooled['busy'].comparable}; "
          f"with the static ones {fmt(pooled['busy'].recall_all, '.3f')}: {pooled['busy'].static_found} of "
          f"{pooled['busy'].static} static found)")
    print(f"  {check(quiet_ratio, quiet_ratio <= TARGET_QUIET_RATIO)}  quiet clip CPU <= {TARGET_QUIET_RATIO}x the "
          f"naive loop's: {quiet_ratio:.3f}x")
    print(f"  {check(ev_p99, ev_p99 < TARGET_EVENT_P99_MS)}  frame-to-event p99 < {TARGET_EVENT_P99_MS:.0f} ms (worst "
          f"configuration): {fmt(ev_p99, '.0f')} ms; at up to 4 cameras {fmt(ev_p99_4, '.0f')} ms")
    print(f"  {check(lag_p99, lag_p99 < TARGET_LAG_P99_MS)}  event-loop lag p99 < {TARGET_LAG_P99_MS:.0f} ms (worst "
          f"configuration): {fmt(lag_p99)} ms")
    if c8:
        skip = c8.skipped / max(1.0, c8.expected_ticks)
        print(f"  {verdict(backlog <= TARGET_BACKLOG_GROWTH)}  8 cameras without a growing backlog: "
              f"{backlog:+.1f} frames waiting (end - start); beside it: {c8.skipped} frames skipped "
              f"({skip:.1%} of the ticks due), {c8.detect_runs_done / (8 * c8.seconds):.2f} ticks/s per camera, "
              f"frame age p50 {fmt(c8.age_ms(True))} -> {fmt(c8.age_ms(False))} ms")
    else:
        print("  (not run)  8 cameras without a growing backlog")
    if soak is not None:
        anon = rss_slope(soak.rss_samples, args.soak_warmup_s, 2)
        whole = rss_slope(soak.rss_samples, args.soak_warmup_s, 1)
        after = [x for x in soak.rss_samples if x[0] >= args.soak_warmup_s] or soak.rss_samples
        first, last = after[0], after[-1]
        spread = max(x[2] for x in after) - min(x[2] for x in after)
        # A leak grows; memory handed back (a fall) is not one, and is printed as it is.
        print(f"  {verdict(anon < TARGET_RSS_SLOPE_MB_H)}  RSS flat over {soak.seconds / 60:.0f} minutes at 4 "
              f"cameras: anonymous RSS (here + worker) {first[2]:.1f} -> {last[2]:.1f} MB (range {spread:.1f} MB), "
              f"slope {anon:+.2f} MB/h "
              f"after {args.soak_warmup_s / 60:.0f} min (target < {TARGET_RSS_SLOPE_MB_H:g}); whole RSS "
              f"{first[1]:.1f} -> {last[1]:.1f} MB ({whole:+.2f} MB/h); soak CPU {soak.cores:.2f} cores, "
              f"f2e p99 {fmt(pct(soak.event_ms, 99), '.0f')} ms, lag p99 {fmt(soak.lag.pct(99))} ms")
    else:
        print("  (not run)  RSS flat over 10 minutes: --soak")
    return (f"RESULT cams4_cpu_cores={cams4:.2f} busy_cpu_ratio_vs_naive={busy_ratio:.3f} "
            f"busy_track_recall={recall:.3f} quiet_cpu_ratio_vs_naive={quiet_ratio:.3f} "
            f"event_p99_ms={ev_p99:.0f} loop_lag_p99_ms={lag_p99:.1f} cams8_backlog_growth={backlog:.1f} "
            f"peak_rss_mb={peak:.0f}")


# --- main ----------------------------------------------------------------------------------------------------

async def amain(args: argparse.Namespace, clips: dict[str, Path], indexes: dict[str, ClipIndex]
                ) -> tuple[list[Phase], Phase | None]:
    section = CamerasConfig()
    manifests = load_manifests()
    engine = InferenceEngine({MODEL: manifests[MODEL]}, provider=section.provider, threads=section.threads,
                             queue_size=section.queue_size, stuck_after_s=section.stuck_after_s)
    evidence_dir = Path(tempfile.mkdtemp(prefix="edgeagent-bench-camera-")) if args.evidence else None
    phases: list[Phase] = []
    soak: Phase | None = None
    try:
        async with engine:
            # Load the model before the first window (the first request loads it, ~0.3 s).
            await engine.infer(MODEL, [np.zeros((576, 768, 3), np.uint8)])
            share = await ticker_cost()
            print(f"the 10 ms lag ticker costs {share * 100:.2f}% of a core on an idle loop (included in the figures "
                  f"of both loops, not taken off)")
            print(f"engine worker pid {engine.stats()['worker_pid']}, providers "
                  f"{','.join(engine.stats()['providers'])}, threads {section.threads}, queue {section.queue_size}",
                  flush=True)
            total = len(args.clip_list) * len(args.cam_list) * (1 if args.no_naive else 2)
            k = 0
            for clip in args.clip_list:
                for n in args.cam_list:
                    for mode in ("pipeline",) if args.no_naive else ("pipeline", "naive"):
                        k += 1
                        print(f"[{k}/{total}] {clip} clip, {n} camera(s), {mode}: {args.seconds:g} s ...", flush=True)
                        ph = await run_phase(mode, clip, clips[clip], n, args.seconds, args.warmup, engine,
                                             evidence_dir, indexes[clip])
                        phases.append(ph)
                        print(HEADER.splitlines()[0] + "\n" + phase_line(ph), flush=True)
            if args.soak:
                print(f"[soak] busy clip, 4 cameras, pipeline: {args.soak_minutes:g} min ...", flush=True)
                probe = None
                if args.mem_detail or args.tracemalloc or args.mem_at or args.trim_every:
                    probe = MemProbe([float(x) * 60 for x in args.mem_at.split(",") if x], args.tracemalloc,
                                     args.trim_every * 60)
                soak = await run_phase("pipeline", "busy", clips["busy"], 4, args.soak_minutes * 60, args.warmup,
                                       engine, evidence_dir, indexes["busy"], keep_ticks=False,
                                       rss_every=5.0, probe=probe)
                print(HEADER.splitlines()[0] + "\n" + phase_line(soak), flush=True)
    finally:
        if evidence_dir is not None:
            shutil.rmtree(evidence_dir, ignore_errors=True)
    return phases, soak


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, PyAV {av.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, OpenCV {cv2.__version__}, numpy {np.__version__}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="15 s per configuration")
    ap.add_argument("--seconds", type=float, help="window per configuration (default 60, quick 15)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds after every camera ticked (default 3)")
    ap.add_argument("--cams", default="1,2,4,8", help="camera counts (default 1,2,4,8)")
    ap.add_argument("--clips", default="busy,quiet", help="clips (default busy,quiet)")
    ap.add_argument("--no-naive", action="store_true", help="only the pipeline (no ratios, no recall)")
    ap.add_argument("--soak", action="store_true", help="then 10 minutes at 4 cameras (busy): RSS slope")
    ap.add_argument("--soak-only", action="store_true", help="only the soak")
    ap.add_argument("--soak-minutes", type=float, default=10.0)
    ap.add_argument("--soak-warmup-s", type=float, default=120.0, help="RSS fitted after this (default 120)")
    ap.add_argument("--evidence", action="store_true", help="pipelines keep snapshots (JPEG) in a temp dir")
    ap.add_argument("--mem-detail", action="store_true",
                    help="soak: per minute also glibc's heap in use / free, pymalloc blocks, tasks, threads")
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                    help="soak: trace Python allocations with this many frames (implies --mem-detail)")
    ap.add_argument("--mem-at", default="", metavar="MINUTES",
                    help="soak: at these minutes (e.g. 5,20,40) count live objects by type and, with --tracemalloc, "
                         "compare allocations by traceback, each against the first")
    ap.add_argument("--trim-every", type=float, default=0.0, metavar="MINUTES",
                    help="soak: malloc_trim(0) this often (does freed heap go back? an allocator-settling test)")
    args = ap.parse_args()
    args.seconds = args.seconds or (15.0 if args.quick else 60.0)
    args.cam_list = [int(x) for x in args.cams.split(",") if x]
    args.clip_list = [x for x in args.clips.split(",") if x]
    if args.soak_only:
        args.soak, args.cam_list = True, []
    if set(args.clip_list) - {"busy", "quiet"}:
        ap.error("--clips: busy and/or quiet")

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # glibc's allocator as the daemon sets it (edgeagent run, the systemd unit), unless the environment chose.
    applied = allocator.tune()
    chosen = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"allocator: {', '.join(f'{k}={v}' for k, v in {**chosen, **applied}.items()) or 'glibc defaults'}"
          f"{' (set here as the daemon does)' if applied else ''}", flush=True)
    print(f"edgeagent {source_state()}; {datetime.now().isoformat(timespec='seconds')}; {machine()}; "
          f"load average {Path('/proc/loadavg').read_text().strip()}", flush=True)
    clips = {"busy": busy_clip(), "quiet": quiet_clip()}
    indexes = {name: ClipIndex(path) for name, path in clips.items()}
    print(f"clips: busy {indexes['busy'].frames} frames, quiet {indexes['quiet'].frames} frames at {CLIP_FPS} fps; "
          f"{args.seconds:g} s per configuration after {args.warmup:g} s of warm-up; cameras "
          f"{','.join(map(str, args.cam_list)) or '-'}; clips {','.join(args.clip_list)}", flush=True)
    result = "RESULT (none: the run failed)"
    try:
        phases, soak = asyncio.run(amain(args, clips, indexes))
        result = report(args, phases, soak, indexes)
    finally:
        print(result, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
