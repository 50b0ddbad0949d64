"""One camera's detection pipeline: frames → motion → model-size regions → the shared detector → tracker →
zones and lines → events with evidence.

Cost model (why it is shaped like this): decoding is paid on every frame whatever happens next, so the
source decodes only at the detection rate; motion runs in the source's reader thread on the decoder's luma
plane, downscaled to a ~100 px grey image (a few tenths of a millisecond, no colour conversion); the frame is
converted to BGR only on a tick where the detector runs. The detector, the expensive part, sees only
regions around motion and around the tracks it must follow, all of them in one run every other tick
(synchronized re-checks), and a track that has stood still for a while is re-checked only every
``RECHECK_STATIONARY_S``. A quiet scene therefore costs a decode and a motion pass per tick and no inference.
A detector with a dynamic input (the shipped NanoDet) costs what the pixels it is given cost, so its regions
are tight rectangles (:func:`propose_rects`) run at ``detect.scale``, and a track that changed shape or was
lost is searched for in a wider box; a fixed-size detector, and any camera with a community rule (tuned on
them), is given model-size squares (:func:`propose_regions`), each costing a whole run.

Inference runs in the engine's own worker, BGR conversion and fallback motion in a worker thread; the loop only
routes results. Frames are perishable: the pipeline takes the newest frame the source has (older queued ones
are dropped and counted there); when the engine refuses a request (its queue is full, or its turn came more
than STALE_AFTER_S late) this tick is skipped and counted, the next frame is newer anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edgeagent.drivers.camera.config import CameraDevice
from edgeagent.drivers.camera.evidence import EvidenceError, EvidenceStore
from edgeagent.drivers.camera.motion import MotionDetector
from edgeagent.drivers.camera.regions import propose_rects, propose_regions
from edgeagent.drivers.camera.tracker import Track, Tracker
from edgeagent.drivers.camera.zones import LineSpec, RuleHit, ZoneRules, ZoneSpec
from edgeagent.kernel.pipeline.event_types import (
    CAMERA_CLIP,
    CAMERA_LINE_CROSSED,
    CAMERA_OBJECT,
    CAMERA_ZONE,
    CAMERA_ZONE_OCCUPANCY,
)
from edgeagent.kernel.pipeline.events import Attachment
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.models.engine import scaled_input
from edgeagent.models.manifest import ImageInput
from edgeagent.models.types import Box, Detection, EngineBusy, InferenceError

log = logging.getLogger(__name__)

SNAPSHOT_MIN_INTERVAL_S = 0.2  # at most five new snapshots a second per camera
RECHECK_STATIONARY_S = 5.0
MOVING_RECHECK_S = 0.35  # confirmed moving tracks are looked at about every other tick at 5 fps
FULL_PASS_S = 30.0
MAX_PENDING_CLIPS = 2  # per camera; more events in the window share the pending clips' video (counted)
MERGE_SCALE = 2.0  # regions merge when the objects shrink at most 2x in the detector's input (one inference)
# The least side of a region, in the detector's input pixels, for a dynamic-input detector: context around a
# small object (NanoDet's coarsest cells are 32 px). On the busy clip (replay, 200 ticks at 5 fps, scale 0.75)
# 128 found the naive loop's 14 of 14 walkers with the same ids and events as 416 px squares, at 0.28x the
# naive loop's inference CPU (squares at their own size: 0.50x; squares fitted to 416: 0.61x).
MIN_INPUT_SIDE = 128
LATENCY_WINDOW = 512
# A detection request not started within this is refused by the engine (stale, counted there) and the tick
# skipped: the next frame is already waiting, an answer about this one would only make events late.
STALE_AFTER_S = 0.3
MOTION_THRESHOLD = 25  # grey levels (MotionDetector's default), full range
MOTION_ALPHA = 0.1  # the background's learning rate per detection tick (MotionDetector's default)
# After this long with nothing moving and no track, the source decodes keyframes only (RtspSource.set_idle):
# decoding every frame is most of a quiet camera's cost. The first motion ends it; what appears while idle is
# seen at the next keyframe (up to one GOP later: 1-2 s on most cameras).
IDLE_AFTER_S = 5.0
MOTION_KEPT = 8  # motion results waiting for their frame's tick (older ones: the frame was dropped)


class FrameLike(Protocol):
    @property
    def image(self) -> np.ndarray: ...

    @property
    def seq(self) -> int: ...

    @property
    def mono_s(self) -> float: ...


class FrameSource(Protocol):
    def frames(self, *, newest: bool = ...) -> AsyncIterator[Any]: ...

    def stats(self) -> dict[str, Any]: ...


class TickObserver(Protocol):
    """Something that follows a camera's tracks tick by tick (the community rules: plates, e-bikes, falls).
    Called on the loop after the tracker, once per detection tick, with every current track and the tracks
    that ended this tick. It must return at once: heavy work (a plate read, a pose) goes to the engine or a
    thread from a task of its own, bounded by the observer.

    ``frame.image`` is converted to BGR (off the loop) before the observers are called, unless every observer
    has ``needs_image = False`` (one that converts it itself, off the loop, only when it needs it): a frame from
    the source carries only its luma plane until something asks for BGR."""

    def on_tick(self, frame: FrameLike, tracks: Sequence[Track], ended: Sequence[Track], now: float) -> None: ...


class Detector(Protocol):
    async def detect_regions(self, model: str, frame: np.ndarray, regions: Sequence[Box], *,
                             camera: str = "", max_wait_s: float | None = None,
                             scale: float | None = None) -> list[Detection]: ...


@dataclass
class PipelineStats:
    ticks: int = 0
    detector_runs: int = 0
    regions: int = 0
    input_px: int = 0  # the detector's input pixels over all its runs (what inference costs, in proportion)
    skipped_busy: int = 0
    skipped_error: int = 0
    quiet_ticks: int = 0
    events: int = 0
    events_failed: int = 0
    snapshots: int = 0
    snapshots_skipped: int = 0
    clips: int = 0
    clips_skipped: int = 0
    observer_errors: int = 0
    idle_spells: int = 0  # times the source was asked to decode keyframes only (a quiet scene)
    motion_here: int = 0  # ticks whose motion was computed by process (the source did not analyze the frame)
    detector_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    frame_to_event_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    last_detections: list[Detection] = field(default_factory=list)
    last_tick_mono_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        def pct(values: deque[float], q: float) -> float | None:
            return round(float(np.percentile(np.fromiter(values, float), q)), 1) if values else None
        return {
            "ticks": self.ticks, "detector_runs": self.detector_runs, "regions": self.regions,
            "input_px_per_run": round(self.input_px / self.detector_runs) if self.detector_runs else None,
            "skipped_busy": self.skipped_busy, "skipped_error": self.skipped_error,
            "quiet_ticks": self.quiet_ticks, "events": self.events, "events_failed": self.events_failed,
            "snapshots": self.snapshots, "snapshots_skipped": self.snapshots_skipped,
            "clips": self.clips, "clips_skipped": self.clips_skipped, "observer_errors": self.observer_errors,
            "motion_here": self.motion_here, "idle_spells": self.idle_spells,
            "detector_ms_p50": pct(self.detector_ms, 50), "detector_ms_p99": pct(self.detector_ms, 99),
            "frame_to_event_ms_p99": pct(self.frame_to_event_ms, 99),
        }


def keep_detections(cam: CameraDevice, raw: Sequence[Detection], w: int, h: int) -> list[Detection]:
    """The camera's filter: its classes, ``min_score`` raised per label by ``class_min_score``, ``min_area``."""
    detect = cam.detect
    min_area = detect.min_area * w * h
    classes = set(detect.classes)
    floor = {label: max(detect.min_score, score) for label, score in detect.class_min_score.items()}
    return [d for d in raw if d.label in classes and d.score >= floor.get(d.label, detect.min_score)
            and d.area >= min_area]


def norm_box(box: Box, w: int, h: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (round(min(max(x1 / w, 0.0), 1.0), 4), round(min(max(y1 / h, 0.0), 1.0), 4),
            round(min(max(x2 / w, 0.0), 1.0), 4), round(min(max(y2 / h, 0.0), 1.0), 4))


def zone_specs(cam: CameraDevice) -> tuple[list[ZoneSpec], list[LineSpec]]:
    default_classes = frozenset(cam.detect.classes)
    zones = [ZoneSpec(name=z.name, points=tuple(z.points),
                      classes=frozenset(z.classes) if z.classes is not None else default_classes,
                      min_score=z.min_score if z.min_score is not None else cam.detect.min_score,
                      min_area_frac=z.min_area, loiter_s=z.loiter_s)
             for z in cam.zones]
    lines = [LineSpec(name=ln.name, a=ln.a, b=ln.b,
                      classes=frozenset(ln.classes) if ln.classes is not None else default_classes,
                      min_score=ln.min_score if ln.min_score is not None else cam.detect.min_score,
                      min_area_frac=ln.min_area, names=(ln.a_to_b, ln.b_to_a))
             for ln in cam.lines]
    return zones, lines


class CameraPipeline:
    """Runs one camera's frames through detection and rules; emits events. ``run`` consumes the source until
    it ends or the task is cancelled; the source owns reconnecting."""

    def __init__(self, cam: CameraDevice, *, detector: Detector, model: str, input_size: int,
                 sink: EventSink, evidence: EvidenceStore | None, clock: Callable[[], float] = time.monotonic,
                 redact: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.cam = cam
        self._detector = detector
        self._model = model
        self._size = input_size
        self._sink = sink
        self._evidence = evidence
        self._clock = clock
        self._redact = redact
        self._classes = frozenset(cam.detect.classes)
        models = getattr(detector, "models", None)
        spec = getattr(models.get(model), "input", None) if isinstance(models, Mapping) else None
        self._spec = spec if isinstance(spec, ImageInput) else None
        # Tight rectangles at detect.scale need a dynamic-input detector, and are not used on a camera whose
        # detections drive a rule (gate, e-bike, falls): those rules were tuned and measured on model-size
        # squares, and NanoDet's score for what they look for moves with the crop (a person lying on the floor:
        # 0.39-0.61 in rectangles around them, 0.55 in the squares).
        self._rects = self._spec is not None and self._spec.dynamic and not cam.has_rules
        # A dynamic-input detector is given rectangles around what it must look at, at the camera's scale:
        # each at least MIN_INPUT_SIDE input pixels a side (in frame pixels: divided by the scale).
        self._scale = cam.detect.scale if self._rects else None
        self._min_side = math.ceil(MIN_INPUT_SIDE / cam.detect.scale)
        # A track nothing has seen for three stationary re-check periods is gone, whatever was looked at.
        self._tracker = Tracker(max_unseen_s=3 * RECHECK_STATIONARY_S)
        zones, lines = zone_specs(cam)
        self._rules = ZoneRules(zones, lines)
        self._motion: MotionDetector | None = None
        self._motion_key: tuple[int, int, bool] | None = None
        self._motion_lock = threading.Lock()  # _motion_done
        self._motion_calc_lock = threading.Lock()  # the detector (reader thread, or process' fallback)
        self._motion_done: dict[int, list[Box]] = {}  # frame seq -> motion boxes, from analyze()
        self._frame_size: tuple[int, int] | None = None
        self._motion_last_s: float | None = None
        self._set_idle: Callable[[bool], None] | None = None
        self._idle = False
        self._quiet_since: float | None = None
        self._last_snapshot_s = -1e9
        self._last_full_s = -1e9
        self._last_run_s = -1e9  # the detector's last run on this camera, and its regions
        self._last_regions: list[Box] = []
        self._snap_cache: dict[int, asyncio.Future[Attachment]] = {}
        self._source: FrameSource | None = None
        # The main stream's packet buffer when the camera has one (clips at full resolution); else the
        # detection stream's.
        self.clip_source: Any = None
        # The camera's own main-stream snapshot (ONVIF), tried before the detection frame for evidence.
        self.main_snapshot: Callable[[], Awaitable[np.ndarray | None]] | None = None
        self._clips_pending = 0
        self.clip_pre_s = 5.0
        self.clip_post_s = 5.0
        self.clip_max_bytes = 8_000_000
        self._pending: set[asyncio.Task[None]] = set()
        self.stats = PipelineStats()
        self.latest_frame: FrameLike | None = None
        self.tracks: list[Track] = []
        # Followers of the tracks (see TickObserver); one failing is logged and counted, never stops the camera.
        self.observers: list[TickObserver] = []

    # --- the loop ------------------------------------------------------------------------------------

    def set_shapes(self, cam: CameraDevice) -> None:
        """Apply ``cam``'s zones and lines now (an installer saved them from the console); the rest of ``cam`` is
        this camera's as it runs. Unchanged zones and lines keep their state (see ZoneRules.with_specs)."""
        updated = self.cam.model_copy(update={"zones": cam.zones, "lines": cam.lines})
        self._rules = self._rules.with_specs(*zone_specs(updated))  # (raises on duplicate names: nothing changed)
        self.cam = updated

    async def run(self, source: FrameSource) -> None:
        self._source = source
        # Motion gating in the source's reader thread, on the decoder's luma plane, when the source offers it
        # (RtspSource.analyzers): no BGR conversion and no thread hop for a frame the detector does not need.
        analyzers: list[Callable[[Any], None]] | None = getattr(source, "analyzers", None)
        if analyzers is not None:
            analyzers.append(self.analyze)
        self._set_idle = getattr(source, "set_idle", None)
        try:
            # The newest frame each time (older queued ones dropped, counted by the source): a tick acts on
            # the present, and under load the older of two queued frames is a tick (200 ms) older.
            async for frame in source.frames(newest=True):
                await self.process(frame)
        finally:
            if analyzers is not None and self.analyze in analyzers:
                analyzers.remove(self.analyze)
            if self._set_idle is not None and self._idle:
                self._set_idle(False)
            self._set_idle, self._idle = None, False
            for task in list(self._pending):
                task.cancel()
            if self._pending:
                await asyncio.gather(*self._pending, return_exceptions=True)

    def analyze(self, frame: FrameLike) -> None:
        """Motion on ``frame`` (any thread; the source's reader calls it before queueing the frame): kept for
        :meth:`process`, which otherwise computes it itself."""
        boxes = self._motion_of(frame)
        with self._motion_lock:
            self._motion_done[frame.seq] = boxes
            while len(self._motion_done) > MOTION_KEPT:
                self._motion_done.pop(next(iter(self._motion_done)))

    def _motion_of(self, frame: FrameLike) -> list[Box]:
        w, h = _size_of(frame)
        gray: np.ndarray | None = getattr(frame, "gray", None)
        use_gray = gray is not None
        with self._motion_calc_lock:
            key = (w, h, use_gray and not getattr(frame, "gray_full_range", True))
            if self._motion is None or self._motion_key != key:
                # Video-range luma (16-235) shows a change of 25 grey levels as about 21.
                threshold = round(MOTION_THRESHOLD * 219 / 255) if key[2] else MOTION_THRESHOLD
                self._motion = MotionDetector(w, h, threshold=threshold, alpha=MOTION_ALPHA)
                self._motion_key = key
            motion = self._motion
            # Frames further apart than a tick (keyframes only, while idle): the background learns as much
            # per second as at the detection rate, so a slow lighting change stays below the threshold.
            t = frame.mono_s
            dt = t - self._motion_last_s if self._motion_last_s is not None else 0.0
            self._motion_last_s = t
            ticks = dt * self.cam.detect.fps
            motion.alpha = 1.0 - (1.0 - MOTION_ALPHA) ** ticks if ticks > 1.5 else MOTION_ALPHA
            return motion.update(gray if gray is not None else frame.image)

    async def process(self, frame: FrameLike) -> list[RuleHit]:
        """One detection tick on one frame."""
        self.latest_frame = frame
        self.stats.ticks += 1
        w, h = _size_of(frame)
        self._frame_size = (w, h)
        with self._motion_lock:
            moving = self._motion_done.pop(frame.seq, None)
        if moving is None:
            moving = await asyncio.to_thread(self._motion_of, frame)
            self.stats.motion_here += 1
        now = self._clock()
        # What the detector looks at this tick (the whole point of the gating):
        # - motion not explained by a confirmed track (something new, or a track the tracker lost hold of);
        # - the tracks it must follow: tentative ones (they must confirm or die quickly), confirmed moving
        #   ones (the tracker predicts them in between: a walking person moves a few pixels per tick), any
        #   whose last look failed, and stationary ones every RECHECK_STATIONARY_S or when motion stirs them;
        # - the whole frame every FULL_PASS_S, so that what was already there when the stream started (a
        #   parked car, a person standing still) is found although it never moved.
        # Re-checks are synchronized: every track that needs a look goes into the same run, at most every
        # MOVING_RECHECK_S (every other tick at 5 fps); in between the detector runs only for motion outside
        # the last run's regions (something new), and then takes the due tracks along. Checking each track on
        # its own schedule let the tracks fall out of phase, so that some track was due at almost every tick
        # (96% of the busy clip's ticks ran the detector; synchronized, ~55%, the same walkers found).
        full = now - self._last_full_s >= FULL_PASS_S
        if full:
            regions: list[Box] = [(0.0, 0.0, float(w), float(h))]
            self._last_full_s = now
        else:
            fresh = [m for m in moving if not any(_explains(t.box, m) for t in self.tracks)]
            recheck = now - self._last_run_s >= MOVING_RECHECK_S
            if not recheck:
                fresh = [m for m in fresh if not any(_centre_in(m, r) for r in self._last_regions)]
            due = self._tracker.due_for_detection(now, RECHECK_STATIONARY_S, 0.0) if (recheck or fresh) else []
            if recheck and self._rects:
                # Where a track may be now that its box no longer says: a track that stood still and is
                # stirred by motion is that object changing shape (a person standing up or falling, a car's
                # door opening), and a track the detector missed has moved or changed by an unknown amount.
                # Both are searched for in a box grown by their length on each side (a person who falls lies
                # within a body length of where they stood), a lost one gradually (over its first second).
                due = due + [_grown(t.box, 1.0) for t in self.tracks if t.stationary
                             and any(_explains(t.box, m) for m in moving)]
                # A missed track whose predicted centre has left the frame is walking out of it: nothing is
                # searched for there (its box at the edge cost ~1.5 s of pixels per walker leaving).
                due = due + [_grown(t.box, min(1.0, now - t.last_seen_s)) for t in self.tracks
                             if t.missed_since_s is not None and 0 <= t.centre[0] <= w and 0 <= t.centre[1] <= h]
            if not (fresh or due):
                regions = []
            elif self._rects:
                regions = propose_rects(fresh, due, w, h, self._min_side)
            else:
                regions = propose_regions(fresh, due, w, h, self._size, max_merge_scale=MERGE_SCALE)
        detections: list[Detection] = []
        if regions:
            started = time.perf_counter()
            # BGR only now, off the loop (a frame from the source converts on first access).
            image = frame.image if getattr(frame, "image_ready", True) else await asyncio.to_thread(_image_of, frame)
            try:
                raw = await self._detector.detect_regions(self._model, image, regions, camera=self.cam.id,
                                                          max_wait_s=STALE_AFTER_S, scale=self._scale)
            except EngineBusy:
                self.stats.skipped_busy += 1
                return []
            except InferenceError as exc:
                self.stats.skipped_error += 1
                log.debug("%s: detection skipped: %s", self.cam.id, exc)
                return []
            self.stats.detector_ms.append((time.perf_counter() - started) * 1000)
            self.stats.detector_runs += 1
            self._last_run_s = now
            self._last_regions = regions
            self.stats.regions += len(regions)
            self.stats.input_px += self._input_px(regions)
            detections = self._filter(raw, w, h)
        else:
            self.stats.quiet_ticks += 1
        update = self._tracker.update(detections, now, covered=regions, frame_size=(w, h))
        self.tracks = list(update.tracks)
        self._idle_check(bool(moving) or len(self._tracker) > 0, now)
        self.stats.last_detections = detections
        self.stats.last_tick_mono_s = now
        hits = self._rules.update(self.tracks, w, h, now, ended=update.ended)
        if update.new and self.cam.detect.objects_events:
            for t in update.new:
                self._spawn(self._object_event(frame, t, w, h))
        for hit in hits:
            self._spawn(self._rule_event(frame, hit, w, h))
        if not getattr(frame, "image_ready", True) and any(getattr(o, "needs_image", True) for o in self.observers):
            await asyncio.to_thread(_image_of, frame)  # BGR for the observers, converted off the loop
        for observer in self.observers:
            try:
                observer.on_tick(frame, self.tracks, update.ended, now)
            except Exception:
                self.stats.observer_errors += 1
                log.exception("%s: %s failed on a tick", self.cam.id, type(observer).__name__)
        return hits

    def _input_px(self, regions: Sequence[Box]) -> int:
        spec = self._spec
        if spec is None:
            return 0
        if not self._rects:
            return spec.width * spec.height * len(regions)
        total = 0
        for x1, y1, x2, y2 in regions:
            iw, ih = scaled_input(spec, max(1, round(x2 - x1)), max(1, round(y2 - y1)), self.cam.detect.scale)
            total += iw * ih
        return total

    def _idle_check(self, busy: bool, now: float) -> None:
        """Keyframes only after IDLE_AFTER_S with nothing moving and no track; full decoding at the first
        motion (or track)."""
        if busy:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = now
        idle = self._quiet_since is not None and now - self._quiet_since >= IDLE_AFTER_S
        if idle != self._idle and self._set_idle is not None:
            self._set_idle(idle)
            self._idle = idle
            if idle:
                self.stats.idle_spells += 1

    def _filter(self, raw: Sequence[Detection], w: int, h: int) -> list[Detection]:
        return keep_detections(self.cam, raw, w, h)

    # --- events --------------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _snapshot(self, frame: FrameLike, detections: Sequence[Detection]) -> tuple[Attachment, ...]:
        """One JPEG per frame, with every current track drawn; events of the same frame share it. New
        snapshots at most every SNAPSHOT_MIN_INTERVAL_S per camera (a crowd must not turn into a JPEG storm);
        an event past that limit goes without one (counted)."""
        if self._evidence is None or not self.cam.snapshots:
            return ()
        cached = self._snap_cache.get(frame.seq)
        if cached is None:
            now = self._clock()
            if now - self._last_snapshot_s < SNAPSHOT_MIN_INTERVAL_S:
                self.stats.snapshots_skipped += 1
                return ()
            self._last_snapshot_s = now
            drawn = [Detection(label=t.label, score=t.score, box=t.box, model=self._model,
                               extra={"track_id": float(t.id)}) for t in self.tracks]
            cached = asyncio.ensure_future(self._save_snapshot(frame, drawn or list(detections)))
            self._snap_cache[frame.seq] = cached
            while len(self._snap_cache) > 4:
                self._snap_cache.pop(next(iter(self._snap_cache)))
        try:
            att = await asyncio.shield(cached)
        except EvidenceError as exc:
            self.stats.snapshots_skipped += 1
            log.warning("%s: snapshot not kept: %s", self.cam.id, exc)
            return ()
        self.stats.snapshots += 1
        return (att,)

    async def _save_snapshot(self, frame: FrameLike, detections: list[Detection]) -> Attachment:
        assert self._evidence is not None
        image = frame.image if getattr(frame, "image_ready", True) else await asyncio.to_thread(_image_of, frame)
        if self.main_snapshot is not None:
            main = await self.main_snapshot()
            if main is not None and main.ndim == 3:
                # The boxes are in the detection frame's pixels; the main stream shows the same picture larger.
                sx = main.shape[1] / image.shape[1]
                sy = main.shape[0] / image.shape[0]
                detections = [d.shifted(0.0, 0.0, sx, sy) for d in detections]
                image = main
        return await self._evidence.save_snapshot(self.cam.id, image, detections)

    async def _emit(self, frame: FrameLike, type_name: str, data: dict[str, Any],
                    attachments: tuple[Attachment, ...] = (), *, clip: bool = False) -> None:
        try:
            event = await self._sink.emit(type_name, self.cam.id, data, attachments)
        except Exception as exc:  # noqa: BLE001 - the outbox refusing one event must not stop the camera
            self.stats.events_failed += 1
            log.warning("%s: %s not stored: %s", self.cam.id, type_name, exc)
            return
        self.stats.events += 1
        self.stats.frame_to_event_ms.append((time.monotonic() - frame.mono_s) * 1000)
        if clip and self.cam.clips and self._evidence is not None:
            if self._clips_pending >= MAX_PENDING_CLIPS:
                self.stats.clips_skipped += 1
            else:
                self._clips_pending += 1
                self._spawn(self._clip(str(getattr(event, "id", "")), frame.mono_s))

    async def _clip(self, event_id: str, at_mono_s: float) -> None:
        """A clip from the stream's encoded-packet buffer, pre seconds before the event to post after it, not
        re-encoded, kept as evidence and announced by a camera.clip event pointing at the event."""
        from edgeagent.drivers.camera.clips import ClipError, write_clip  # noqa: PLC0415

        try:
            await asyncio.sleep(max(0.0, at_mono_s + self.clip_post_s - time.monotonic()))
            packets: list[Any] = []
            for src in (self.clip_source, self._source):
                packets_since = getattr(src, "packets_since", None)
                if packets_since is not None:
                    packets = packets_since(at_mono_s - self.clip_pre_s, at_mono_s + self.clip_post_s)
                if packets:
                    break
            if self._evidence is None:
                return
            if not packets:
                self.stats.clips_skipped += 1
                log.warning("%s: clip for %s not kept: no video buffered around the event", self.cam.id, event_id)
                return
            tmp = self._evidence.root / f".clip-{self.cam.id}-{event_id}.mp4"
            try:
                info = await asyncio.to_thread(write_clip, packets, tmp, max_bytes=self.clip_max_bytes)
                att = await self._evidence.add_clip(tmp, self.cam.id, event_id=event_id)
            except (ClipError, EvidenceError, OSError) as exc:
                self.stats.clips_skipped += 1
                log.warning("%s: clip for %s not kept: %s", self.cam.id, event_id, exc)
                with contextlib.suppress(OSError):
                    tmp.unlink()
                return
            self.stats.clips += 1
            await self._sink.emit(CAMERA_CLIP.name, self.cam.id, {
                "for_event": event_id, "pre_s": round(max(0.0, at_mono_s - info.start_mono_s), 2),
                "duration_s": round(info.duration_s, 2), "frames": info.frames, "codec": info.codec[:32],
                "truncated": info.truncated}, (att,))
        except Exception as exc:  # noqa: BLE001 - evidence is best effort; the event itself is stored
            log.warning("%s: clip for %s failed: %s", self.cam.id, event_id, exc)
        finally:
            self._clips_pending -= 1

    def _zones_of(self, track: Track) -> list[str]:
        return sorted(self._rules.zones_of(track.id))

    async def _object_event(self, frame: FrameLike, t: Track, w: int, h: int) -> None:
        det = Detection(label=t.label, score=t.score, box=t.box, model=self._model)
        atts = await self._snapshot(frame, [det])
        await self._emit(frame, CAMERA_OBJECT.name, {
            "track_id": t.id, "label": t.label, "score": round(float(t.max_score), 3),
            "box": norm_box(t.box, w, h), "model": self._model, "zones": self._zones_of(t)}, atts)

    async def _rule_event(self, frame: FrameLike, hit: RuleHit, w: int, h: int) -> None:
        if hit.kind == "zone_occupancy":
            with contextlib.suppress(Exception):
                self._sink.emit_telemetry(CAMERA_ZONE_OCCUPANCY.name, self.cam.id,
                                          {"zone": hit.name, "counts": dict(hit.counts)})
            return
        box = hit.box if hit.box is not None else (0.0, 0.0, 0.0, 0.0)
        det = Detection(label=hit.label, score=hit.score, box=box, model=self._model)
        if hit.kind == "line_cross":
            atts = await self._snapshot(frame, [det])
            await self._emit(frame, CAMERA_LINE_CROSSED.name, {
                "line": hit.name, "direction": hit.direction, "track_id": hit.track_id, "label": hit.label,
                "score": round(float(hit.score), 3), "counts": dict(hit.counts), "source": "edge"}, atts, clip=True)
            return
        kind = hit.kind.removeprefix("zone_")
        atts = await self._snapshot(frame, [det]) if kind != "leave" else ()
        await self._emit(frame, CAMERA_ZONE.name, {
            "zone": hit.name, "kind": kind, "track_id": hit.track_id, "label": hit.label,
            "score": round(float(hit.score), 3), "box": norm_box(box, w, h),
            "occupancy": int(hit.occupancy), "dwell_s": None if hit.dwell_s is None else round(hit.dwell_s, 1),
            "reason": hit.reason}, atts, clip=kind != "leave")

    def snapshot_state(self) -> dict[str, Any]:
        return {**self.stats.as_dict(), "tracks": len(self.tracks),
                "stationary": sum(1 for t in self.tracks if t.stationary)}



def _size_of(frame: FrameLike) -> tuple[int, int]:
    w, h = getattr(frame, "width", None), getattr(frame, "height", None)
    if isinstance(w, int) and isinstance(h, int):
        return w, h
    ih, iw = frame.image.shape[:2]
    return int(iw), int(ih)


def _image_of(frame: FrameLike) -> np.ndarray:
    return frame.image


def _centre_in(box: Box, region: Box) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


def _explains(track_box: Box, motion: Box) -> bool:
    """A motion box is explained by a track when its centre lies in the track's box grown by half its size
    (the track has moved a little since it was last detected)."""
    x1, y1, x2, y2 = track_box
    gw, gh = (x2 - x1) * 0.5, (y2 - y1) * 0.5
    cx, cy = (motion[0] + motion[2]) / 2, (motion[1] + motion[3]) / 2
    return x1 - gw <= cx <= x2 + gw and y1 - gh <= cy <= y2 + gh


def _grown(box: Box, lengths: float) -> Box:
    """``box`` grown on every side by ``lengths`` times its longer side."""
    x1, y1, x2, y2 = box
    m = max(x2 - x1, y2 - y1) * lengths
    return x1 - m, y1 - m, x2 + m, y2 + m
