"""Falls in common areas, running: a camera pipeline's person tracks → MoveNet poses on their crops → the
temporal fall head → :class:`~edgeagent.drivers.camera.rules.falls.FallRule` → a ``video_fall`` alarm with a
snapshot through the shared alarm lifecycle.

:class:`FallObserver` is a pipeline :class:`~edgeagent.drivers.camera.pipeline.TickObserver`: on each
detection tick (5 a second by default) it picks the confirmed person tracks inside the configured zones (or
anywhere without zones), at most ``max_people``, the largest first. Tracks the detector did not look at this
tick are posed too, around their predicted box, and placed by their pose (see ``POSE_MIN_SCORE``): the
pipeline re-checks a still person only every few seconds and a fall outruns the tracker, so without this the
rule would go without poses exactly when it needs them (seen on a streamed fall: no alarm). The picked tracks
go to **one** job of its own: the crops are cut in a worker thread, MoveNet runs on them through the
shared inference engine (one request, the engine splits it into its batch), the rule is updated, and the
windows it offers go to the fall head in one request. While that job runs, later ticks are skipped and
counted (``ticks_busy``): at most one job per camera is in flight, so a slow engine costs fall readings, never
memory or the loop. An engine that refuses (its queue is full) or fails skips that reading (counted); the
rule then still sees the tick's tracks without poses.

The head runs at its own rate: :meth:`FallRule.windows_ready` hands a window out again only when its newest
pose is ``head_every_s`` newer (FallSpec); poses are taken at the tick rate, up to ``pose_fps``.

A confirmed fall (once per episode) raises ``video_fall`` about the configured place (``falls.place``,
default the camera's name). The kind escalates on the site's main ladder, the resident escalation the
wristbands use (``alarms.policies.video_fall`` may name another); where the site links the area to a resident
(``falls.resident``: a resident living alone on that landing), the alarm's details name them
(``resident_id``) for the guard room. The snapshot is the tick's frame with the
person's box drawn. A person up again (``'recovered'``) is logged and counted; the alarm stays for a person
to acknowledge and resolve (nothing here silences an alarm).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import cv2
import numpy as np

from edgeagent.drivers.camera.evidence import EvidenceStore
from edgeagent.drivers.camera.rules.falls import FallCleared, FallConfirmed, FallEvent, FallRule, FallSpec
from edgeagent.drivers.camera.tracker import Track
from edgeagent.kernel.pipeline.events import Attachment
from edgeagent.models.decoders import pose as pose_mod
from edgeagent.models.types import Box, Detection, EngineBusy, InferenceError, box_iou

log = logging.getLogger(__name__)

ALARM_KIND = "video_fall"
# A track the detector did not look at this tick is coasting: its box is the tracker's prediction. The pipeline
# re-checks a still person only every few seconds, and a fall is too quick for the tracker (the box turns from
# tall to wide in half a second, the prediction drifts on with the old velocity): a coasting person would give
# the fall rule no poses just when they matter, and its 4 s window restarts after a 1 s gap. So the pose model
# is run on coasting person tracks too, on a crop padded around the prediction; a pose found there that overlaps
# this track more than any other person track (``POSE_MIN_SCORE`` at least) places the person: the track is
# passed to the rule as seen this tick, with a box around the pose (the keypoints' box grown by POSE_BOX_GROW).
POSE_MIN_SCORE = 0.3
POSE_BOX_GROW = (0.1, 0.05)
FALLEN_LABELS = ("normal", "descending", "fallen", "recovering")


class AlarmRaiser(Protocol):
    async def raise_(self, kind: str, subject: str, device_id: str, details: Mapping[str, Any] | None = None, *,
                     place: bool = False, attachments: Sequence[Attachment] = ()) -> Any: ...


class Engine(Protocol):
    async def infer(self, model: str, images: Sequence[np.ndarray], *, camera: str = "") -> list[list[Detection]]: ...


class FrameLike(Protocol):
    @property
    def image(self) -> np.ndarray: ...

    @property
    def mono_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class FallSettings:
    """One camera's fall settings (from its ``falls:`` config). ``zones``: normalized polygons (none: the
    whole frame); ``place``: the alarm's subject; ``resident``: a linked resident's id, in its details."""

    spec: FallSpec
    place: str
    resident: str | None = None
    zones: tuple[tuple[tuple[float, float], ...], ...] = ()
    pose_model: str = "movenet-multipose"
    head_model: str = "nfd-fall"
    pose_fps: float = 8.0
    max_people: int = 6


def in_zones(box: Box, zones: Sequence[Sequence[tuple[float, float]]], w: int, h: int) -> bool:
    """Whether the box's bottom centre (where a person stands or lies) is inside one of the normalized zones."""
    if not zones:
        return True
    x = (box[0] + box[2]) / 2.0
    y = box[3]
    for poly in zones:
        pts = np.array([(px * w, py * h) for px, py in poly], dtype=np.float32)
        if cv2.pointPolygonTest(pts, (float(x), float(y)), False) >= 0:
            return True
    return False



def _size(frame: FrameLike) -> tuple[int, int]:
    """The frame's width and height without touching ``image`` on the loop where the frame can tell (a
    source's frames may convert to BGR on first access)."""
    w, h = getattr(frame, "width", None), getattr(frame, "height", None)
    if isinstance(w, int) and isinstance(h, int):
        return w, h
    shape = frame.image.shape
    return int(shape[1]), int(shape[0])


def _crops(image: np.ndarray, boxes: Sequence[Box]) -> list[tuple[np.ndarray, pose_mod.PoseCrop]]:
    return [pose_mod.pose_crop(image, b) for b in boxes]


class FallObserver:
    """Falls for one camera's pipeline (see the module docstring)."""

    def __init__(self, camera_id: str, settings: FallSettings, *, engine: Engine, alarms: AlarmRaiser,
                 evidence: EvidenceStore | None) -> None:
        self.camera_id = camera_id
        self.settings = settings
        self.rule = FallRule(settings.spec)
        self._engine = engine
        self._alarms = alarms
        self._evidence = evidence
        self._job: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_pose_s = -1e9
        self.counts = dict.fromkeys((
            "ticks", "ticks_busy", "poses", "pose_requests", "pose_busy", "pose_errors", "pose_placed",
            "head_requests", "head_busy", "head_errors", "falls", "recovered", "raised", "raise_failed",
            "job_errors"), 0)
        self.raised: list[Any] = []  # the last alarms raised (bounded)
        self.events: list[FallEvent] = []  # the last rule events (bounded)

    # -- TickObserver

    def on_tick(self, frame: FrameLike, tracks: Sequence[Track], ended: Sequence[Track], now: float) -> None:
        del ended  # the rule takes a person not passed as ended
        self.counts["ticks"] += 1
        if self._job is not None and not self._job.done():
            self.counts["ticks_busy"] += 1
            return
        w, h = _size(frame)
        s = self.settings
        people = [t for t in tracks if t.confirmed and t.label == s.spec.person_label]
        wanted: list[Track] = []
        if now - self._last_pose_s >= 1.0 / s.pose_fps - 1e-6:
            wanted = [t for t in people if in_zones(t.box, s.zones, w, h)]
            wanted = sorted(wanted, key=lambda t: -(t.box[2] - t.box[0]) * (t.box[3] - t.box[1]))[:s.max_people]
        if not wanted:
            self._handle(self.rule.update(people, {}, w, h, now), frame, now)
            return
        self._last_pose_s = now
        self._job = asyncio.get_running_loop().create_task(self._pose_tick(frame, people, wanted, w, h, now),
                                                           name=f"{self.camera_id}:falls")

    # -- the job

    async def _pose_tick(self, frame: FrameLike, people: list[Track], wanted: list[Track], w: int, h: int,
                         now: float) -> None:
        try:
            poses, seen = await self._poses(frame, wanted, people, now)
            people = [seen.get(t.id, t) for t in people]
            events = self.rule.update(people, poses, w, h, now)
            ready = self.rule.windows_ready()
            if ready:
                events += await self._head(ready, now)
            self._handle(events, frame, now)
        except Exception:
            self.counts["job_errors"] += 1
            log.exception("%s: fall reading failed", self.camera_id)

    async def _poses(self, frame: FrameLike, wanted: list[Track], others: list[Track], now: float
                     ) -> tuple[dict[int, np.ndarray], dict[int, Track]]:
        """Poses by track id, and the coasting tracks the pose model placed (passed to the rule as seen this
        tick: see ``POSE_MIN_SCORE``); ``others``: every person track (a pose closer to another is not this
        one's)."""
        boxes = [t.detection.box if t.matched else t.box for t in wanted]
        crops = await asyncio.to_thread(lambda: _crops(frame.image, boxes))
        self.counts["pose_requests"] += 1
        try:
            found = await self._engine.infer(self.settings.pose_model, [c for c, _ in crops], camera=self.camera_id)
        except EngineBusy:
            self.counts["pose_busy"] += 1
            return {}, {}
        except InferenceError as exc:
            self.counts["pose_errors"] += 1
            log.debug("%s: pose skipped: %s", self.camera_id, exc)
            return {}, {}
        poses: dict[int, np.ndarray] = {}
        seen: dict[int, Track] = {}
        for t, box, (_, where), dets in zip(wanted, boxes, crops, found, strict=True):
            best = pose_mod.best_pose([where.to_frame(d) for d in dets], box)
            if best is None or len(best.points) != pose_mod.N_KEYPOINTS:
                continue
            if not (t.matched or t.stationary):
                own = box_iou(best.box, t.box)
                if best.score < POSE_MIN_SCORE or own <= 0.0 or any(
                        box_iou(best.box, o.box) > own for o in others if o.id != t.id):
                    continue  # someone else's pose, or no one: the rule's handover decides
                x1, y1, x2, y2 = best.box
                gx, gy = (x2 - x1) * POSE_BOX_GROW[0], (y2 - y1) * POSE_BOX_GROW[1]
                placed = (max(0.0, x1 - gx), max(0.0, y1 - gy), x2 + gx, y2 + gy)
                seen[t.id] = replace(t, matched=True, last_seen_s=now, box=placed, detection=Detection(
                    label=t.label, score=float(best.score), box=placed, model=self.settings.pose_model))
                self.counts["pose_placed"] += 1
            poses[t.id] = pose_mod.keypoints_array(best)
        self.counts["poses"] += len(poses)
        return poses, seen

    async def _head(self, ready: list[tuple[int, np.ndarray]], now: float) -> list[FallEvent]:
        self.counts["head_requests"] += 1
        try:
            found = await self._engine.infer(self.settings.head_model, [f for _, f in ready], camera=self.camera_id)
        except EngineBusy:
            self.counts["head_busy"] += 1
            return []
        except InferenceError as exc:
            self.counts["head_errors"] += 1
            log.debug("%s: fall head skipped: %s", self.camera_id, exc)
            return []
        events: list[FallEvent] = []
        for (tid, _), dets in zip(ready, found, strict=True):
            if not dets:
                continue
            extra = dets[0].extra
            probs = [float(extra.get(name, 0.0)) for name in FALLEN_LABELS]
            events += self.rule.on_probabilities(tid, probs, now)
        return events

    # -- decisions

    def _handle(self, events: list[FallEvent], frame: FrameLike, now: float) -> None:
        for ev in events:
            self.events.append(ev)
            del self.events[:-32]
            if isinstance(ev, FallConfirmed):
                self.counts["falls"] += 1
                task = asyncio.get_running_loop().create_task(self._raise(ev, frame))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(ev, FallCleared):
                if ev.reason == "recovered":
                    self.counts["recovered"] += 1
                log.info("%s: fall of track %d ended (%s after %.1f s)", self.camera_id, ev.track_id, ev.reason,
                         ev.fallen_s)

    async def _raise(self, ev: FallConfirmed, frame: FrameLike) -> None:
        w, h = _size(frame)
        x1, y1, x2, y2 = ev.box
        details: dict[str, Any] = {
            "track_id": ev.track_id, "fallen": round(ev.probs[2], 3),
            "box": f"{x1 / w:.3f},{y1 / h:.3f},{x2 / w:.3f},{y2 / h:.3f}",
            "fallen_for_s": round(ev.at_s - ev.since_s, 2), "seen_to_raise_s": 0.0}
        attachments: tuple[Attachment, ...] = ()
        if self._evidence is not None:
            det = Detection(label="fallen", score=float(ev.probs[2]), box=ev.box, model=self.settings.head_model)
            try:
                image = await asyncio.to_thread(lambda: frame.image)  # converted off the loop if not yet
                attachments = (await self._evidence.save_snapshot(self.camera_id, image, [det]),)
            except Exception as exc:  # noqa: BLE001 - the alarm goes without its snapshot
                details["snapshot"] = f"not kept: {type(exc).__name__}"
        if self.settings.resident is not None:
            details["resident_id"] = self.settings.resident
        details["seen_to_raise_s"] = round(max(0.0, time.monotonic() - frame.mono_s), 3)
        try:
            alarm = await self._alarms.raise_(ALARM_KIND, self.settings.place, self.camera_id, details,
                                              place=True, attachments=attachments)
        except Exception:
            self.counts["raise_failed"] += 1
            log.exception("%s: the video_fall alarm could not be raised", self.camera_id)
            return
        self.counts["raised"] += 1
        self.raised.append(alarm)
        del self.raised[:-16]
        log.warning("%s: a fall (track %d, fallen %.2f) at %s", self.camera_id, ev.track_id, ev.probs[2],
                    self.settings.place)

    async def idle(self) -> None:
        """Until the current job is done (tests and the benchmark step ticks with it)."""
        if self._job is not None and not self._job.done():
            await asyncio.wait([self._job])

    async def aclose(self) -> None:
        """Wait for the job and the alarms being raised (the pipeline is stopping)."""
        pending = [t for t in (self._job, *self._tasks) if t is not None and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=5.0)

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "rule": self.rule.stats(), "falling": self.rule.falling()}
