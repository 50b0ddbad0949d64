"""The car gate in the running daemon: the I/O shell around :class:`~edgeagent.drivers.camera.rules.plates.PlateGate`.

A :class:`GateRunner` follows one gate camera's tracks (a pipeline ``TickObserver``). For every vehicle track
whose box's bottom-centre is in the gate zone it reads the plate every ``read_every_s``: the vehicle's box
(with a margin) goes to the plate detector, the best plate is warped flat (in a thread) and read by the plate
reader, and, where the site configures one, by a general text reader as a second opinion, all through the
shared inference engine. The reads are voted per track into one decision:

* ``open`` (a listed plate, valid now): the gate opens at once, through the Modbus gate's ``gate`` local
  action (its ``gate.commanded`` audit: reason ``plate_match``, by ``rule:plate:<camera>#<track>``, via
  ``local``) or by pulsing a named output (the camera's own relay), audited here with the same event;
* ``visitor`` (any other plate, or a listed one out of its dates, or reads not sure enough to open): a
  ``gate.visitor`` event with the plate, its confidence and a snapshot for the guard room, which opens
  remotely if it wants to (the driver's call button is a ``gate.call`` event); the same plate again within
  ``VISITOR_REPEAT_S`` (one car the tracker split into two tracks) is counted, not announced again;
* ``undecided`` (no plate read at all): counted and logged; the call button is the driver's way in.

A vehicle is its track, except that a track lost for a moment (the detector missed the car for a few frames
and the tracker started a new track where it stood) is handed over: a new vehicle track overlapping, within
``HANDOVER_S``, the last box of an undecided vehicle that left continues that vehicle's votes (counted in
``handovers``). A decided vehicle is never continued, so the next car in the lane gets its own decision.

One open per car: a track split that the handover cannot join (the car was already decided, or the detector
lost it for longer than ``HANDOVER_S``, as it does when the box is loaded and frames come slowly) gives the same
car a second track and a second decision. A plate that opened this gate within :meth:`GateRunner.reopen_window_s`
(``IN_LANE_AFTER_OPEN_S`` plus the rule's ``decide_after_s``: the car can still be in the lane, and a second
track of it is decided at the latest that long after it starts) is therefore not commanded again, and not
announced as a visitor either (a worse read of the same car); it is counted in ``open_repeats`` and logged.
The key is the plate, not the resident: a resident's second car has its own plate and opens for itself. A car
that backed out of the lane and came back within the window is not opened again by the box (the arm, raised for
it moments ago, usually still is; if not, the call button rings the guard room); after the window it opens as
any arrival. An open that failed is forgotten at once, so the car's next track tries again.

Privacy: a resident's plate leaves the box in no event (the open's audit names the track, not the plate, and
the plate list is never sent); only visitors' plates are in events, because the guard room needs them.

Bounds and policies (each with a counter in :meth:`GateRunner.stats`):

* at most ``MAX_READS_IN_FLIGHT`` plate reads per camera at once; a track due while they run waits for the
  next tick (``reads_deferred``); the engine refusing a request (its queue full) skips that read
  (``reads_busy``); a read that fails (a model the engine does not have, an inference error or timeout, a
  crop that cannot be warped, anything else) skips it too: counted in ``reads_failed`` and per reason in
  ``read_failures``, logged once when reads start failing and once when they work again (not per tick), and
  never the end of the runner: no read means no vote, so a failing reader can delay a decision (to
  ``decide_after_s``: undecided) but never make one. The second opinion failing is counted the same way
  (``second_opinion_failed``, ``second_opinion_failures``) and the plate reader's read still votes;
* the voting core runs on one worker task fed by a queue of ``MAX_OPS`` operations (the residents' list is a
  SQLite lookup: done in a thread, never on the loop). When the queue is full the operation is dropped and
  counted (``ops_dropped``): a dropped track start or end is made good by the voter's ``decide_after_s``
  timeout, a dropped read is one frame's vote fewer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol

import numpy as np

from edgeagent.drivers.camera.config import CameraDevice, GateRuleConfig
from edgeagent.drivers.camera.rules.plates import GateDecision, PlateGate, PlateObservation, PlateVoteConfig
from edgeagent.drivers.camera.tracker import Track
from edgeagent.kernel.capability import RULE_CALLER, LocalAction
from edgeagent.kernel.errors import CommandRejected
from edgeagent.kernel.pipeline.event_types import GATE_CALL, GATE_COMMANDED, GATE_VISITOR
from edgeagent.kernel.pipeline.events import Attachment
from edgeagent.kernel.runtime.outputs import Outputs
from edgeagent.models.types import Box, Detection, EngineBusy, InferenceError, InferenceTimeout, ModelError, box_iou

log = logging.getLogger(__name__)

MAX_READS_IN_FLIGHT: Final = 2
MAX_OPS: Final = 256
CROP_MARGIN: Final = 0.08  # of the vehicle box, each side: the plate sits at its lower edge
OPEN_TIMEOUT_S: Final = 5.0
IN_LANE_AFTER_OPEN_S: Final = 20.0  # after an open: the arm rising (a few s) and the car driving through
VISITOR_REPEAT_S: Final = 60.0  # the same visitor plate again within this is not announced again (counted)
MAX_ANNOUNCED: Final = 256
LATENCY_WINDOW: Final = 256
HANDOVER_S: Final = 1.5  # a vehicle track lost this long is ended; a new one where it was within it takes over
HANDOVER_IOU: Final = 0.3


class Engine(Protocol):
    async def infer(self, model: str, images: Sequence[np.ndarray], *, camera: str = "") -> list[list[Detection]]: ...


class Sink(Protocol):
    async def emit(self, type_name: str, device_id: str, data: Any,
                   attachments: tuple[Attachment, ...] = ()) -> Any: ...


class Evidence(Protocol):
    async def save_snapshot(self, camera: str, image: np.ndarray, detections: Sequence[Detection]) -> Attachment: ...


class FrameLike(Protocol):
    @property
    def image(self) -> np.ndarray: ...


def vote_config(rule: GateRuleConfig) -> PlateVoteConfig:
    return PlateVoteConfig(
        min_read_confidence=rule.min_read_confidence, min_confidence=rule.min_confidence,
        min_province_confidence=rule.min_province_confidence, min_frames=rule.min_frames,
        min_agreement=rule.min_agreement, visitor_wait_s=rule.visitor_wait_s, decide_after_s=rule.decide_after_s,
        second_opinion_weight=rule.second_opinion_weight)


def inside(points: Sequence[tuple[float, float]], box: Box, w: int, h: int) -> bool:
    """Even-odd test of the box's bottom-centre (the wheels on the ground) against a normalized polygon."""
    px, py = (box[0] + box[2]) / 2.0 / w, box[3] / h
    if not (math.isfinite(px) and math.isfinite(py)):
        return False
    hit = False
    for (x1, y1), (x2, y2) in zip(points, [*points[1:], points[0]], strict=True):
        if (y1 > py) != (y2 > py) and px < x1 + (py - y1) * (x2 - x1) / (y2 - y1):
            hit = not hit
    return hit


@dataclass(slots=True)
class _Episode:
    """One reader's failures: how many in a row now (0: it works), and by reason since the start."""

    run: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _TrackState:
    last_read_s: float = -1e9
    reading: bool = False
    decided: bool = False  # its decision is taken: no more reads
    ended: bool = False
    gone_s: float | None = None  # when it was last missed from the zone (a successor may take over)
    image: np.ndarray | None = None  # the frame of the last read, for the decision's snapshot
    box: Box = (0.0, 0.0, 0.0, 0.0)
    label: str = ""
    score: float = 0.0


class GateRunner:
    """One gate camera's plate rule (see the module docstring). ``lookup`` is the residents' list
    (``PlateList.find``); ``actions`` the daemon's local actions (filled when it starts), ``outputs`` its
    named outputs; ``wall`` the wall clock (aware) for the entries' validity."""

    def __init__(self, cam: CameraDevice, rule: GateRuleConfig, *, engine: Engine, sink: Sink,
                 evidence: Evidence | None, lookup: Callable[[str], Any], actions: Mapping[str, LocalAction],
                 outputs: Outputs, wall: Callable[[], datetime], clock: Callable[[], float] = time.monotonic) -> None:
        self.cam = cam
        self.rule = rule
        self._engine = engine
        self._sink = sink
        self._evidence = evidence
        self._actions = actions
        self._outputs = outputs
        self._wall = wall
        self._clock = clock
        self._zone = next(tuple(z.points) for z in cam.zones if z.name == rule.zone)
        self._classes = frozenset(rule.classes)
        self._gate = PlateGate(vote_config(rule), lookup)
        self._tracks: dict[int, _TrackState] = {}
        self._in_flight = 0
        self._ops: asyncio.Queue[tuple[str, int, float, PlateObservation | None, PlateObservation | None]] = \
            asyncio.Queue(MAX_OPS)
        self._tasks: set[asyncio.Task[None]] = set()
        self.decision_s: deque[float] = deque(maxlen=LATENCY_WINDOW)  # from a track's first frame in the zone
        self._alias: dict[int, int] = {}  # a successor track's id -> the vehicle's first track id
        self._announced: dict[str, float] = {}  # visitor plate -> when it was last announced (monotonic)
        self._opened: dict[str, float] = {}  # plate -> when this gate was commanded open for it (monotonic)
        self.counts: dict[str, int] = dict.fromkeys(
            ("reads", "reads_with_plate", "second_opinions", "second_opinion_failed", "reads_deferred",
             "reads_busy", "reads_failed", "ops_dropped", "visitor_repeats", "opens", "open_failed", "visitors",
             "undecided", "calls", "events_failed", "handovers", "open_repeats", "task_errors"), 0)
        self._failing: dict[str, _Episode] = {"plate read": _Episode(), "second opinion": _Episode()}

    # --- the pipeline's tick (on the loop: returns at once) ------------------------------------------------

    def on_tick(self, frame: FrameLike, tracks: Sequence[Track], ended: Sequence[Track], now: float) -> None:
        image = frame.image
        h, w = image.shape[:2]
        present: set[int] = set()
        for t in tracks:
            if not t.confirmed or t.label not in self._classes or not inside(self._zone, t.box, w, h):
                continue
            vid = self._alias.get(t.id, t.id)  # the vehicle: its first track's id
            st = self._tracks.get(vid)
            if st is None:
                vid, st = self._handover(t)
            present.add(vid)
            st.gone_s = None
            st.box, st.label, st.score = t.box, t.label, float(t.score)
            # Every tick, matched or not: the pipeline re-detects a car waiting at the barrier only every few
            # seconds, and its last box is where it stands (a box a little off still holds the plate).
            if st.decided or st.reading or now - st.last_read_s < self.rule.read_every_s:
                continue
            if self._in_flight >= MAX_READS_IN_FLIGHT:
                self.counts["reads_deferred"] += 1
                continue
            st.reading, st.last_read_s = True, now
            self._in_flight += 1
            self._spawn(self._read(vid, image, t.box, now))
        if len(self._tracks) > 4 * MAX_OPS // 8:  # ends lost to a full queue: forget the oldest ended tracks
            for tid in [k for k, v in self._tracks.items() if v.ended and not v.reading][:8]:
                del self._tracks[tid]
        for vid, st in self._tracks.items():
            if vid in present or st.ended:
                continue
            if st.gone_s is None:
                st.gone_s = now  # gone from the zone, or its track lost: wait a moment for a successor
            elif now - st.gone_s >= HANDOVER_S:
                st.ended = True
                if not st.reading:
                    self._op("end", vid, now)
        self._op("tick", 0, now)

    def _handover(self, t: Track) -> tuple[int, _TrackState]:
        """A new vehicle track: the same vehicle as one lost a moment ago where it now is (the tracker split it
        when the detector missed it for a few frames), or a new one. Its reads then vote with the first
        track's, still one decision per vehicle."""
        for vid, st in self._tracks.items():
            # Never to a decided vehicle: the next car in the lane must get a decision of its own (and a car
            # mixed into another's votes can only make them disagree, never open for either).
            if st.gone_s is not None and not st.ended and not st.decided and box_iou(st.box, t.box) >= HANDOVER_IOU:
                self._alias[t.id] = vid
                self.counts["handovers"] += 1
                return vid, st
        st = self._tracks[t.id] = _TrackState()
        self._op("start", t.id, self._clock())
        return t.id, st

    # --- plate reads ---------------------------------------------------------------------------------------

    async def _read(self, track_id: int, image: np.ndarray, box: Box, tick_s: float) -> None:
        read: PlateObservation | None = None
        second: PlateObservation | None = None
        try:
            read, second = await self._read_plate(image, box)
            self.counts["reads"] += 1
            self._worked("plate read")
        except EngineBusy:
            self.counts["reads_busy"] += 1
        except Exception as exc:  # noqa: BLE001 - a failed read is one vote fewer, never the runner's end
            self.counts["reads_failed"] += 1
            self._failed("plate read", exc)
        finally:
            self._in_flight -= 1
            st = self._tracks.get(track_id)
            if st is not None:
                st.reading = False
                if read is not None:
                    st.image = image
        if second is not None:
            self.counts["second_opinions"] += 1
        if read is not None or second is not None:
            self.counts["reads_with_plate"] += 1
            self._op("read", track_id, tick_s, read, second)
        st = self._tracks.get(track_id)
        if st is not None and st.ended:
            self._op("end", track_id, self._clock())

    async def _read_plate(self, image: np.ndarray, box: Box) -> tuple[PlateObservation | None,
                                                                      PlateObservation | None]:
        from edgeagent.models.decoders.plates import warp_plate  # noqa: PLC0415 - cv2 only where cameras run

        crop = await asyncio.to_thread(vehicle_crop, image, box)  # a copy of up to a frame: off the loop
        if crop is None:
            return None, None
        found = (await self._engine.infer(self.rule.plate_detector, [crop], camera=self.cam.id))[0]
        plates = [d for d in found if d.points is not None and len(d.points) == 4]
        if not plates:
            return None, None
        best = max(plates, key=lambda d: d.score)
        corners = np.asarray([(p[0], p[1]) for p in best.points or ()], np.float32)
        flat = await asyncio.to_thread(warp_plate, crop, corners)
        models = [self.rule.plate_reader] + ([self.rule.second_opinion] if self.rule.second_opinion else [])
        results = await asyncio.gather(*(self._engine.infer(m, [flat], camera=self.cam.id) for m in models),
                                       return_exceptions=True)
        first, *rest = results
        if isinstance(first, BaseException):
            raise first  # the plate reader's failure is the read's
        second: PlateObservation | None = None
        other = rest[0] if rest else None
        if isinstance(other, BaseException):
            if not isinstance(other, Exception):
                raise other  # cancelled
            if not isinstance(other, EngineBusy):
                self.counts["second_opinion_failed"] += 1  # the plate reader's read still votes
                self._failed("second opinion", other)
        elif other is not None:
            second = _observation(other[0])
            self._worked("second opinion")
        return _observation(first[0]), second

    def _failed(self, what: str, exc: Exception) -> None:
        """Count a failed read by reason; log the first of an episode (until one works), not every one."""
        reason = _failure_reason(exc)
        ep = self._failing[what]
        ep.reasons[reason] = ep.reasons.get(reason, 0) + 1
        ep.run += 1
        if ep.run == 1:
            log.warning("%s: %s failed (%s: %s); further failures are counted in status (%s), not logged, until "
                        "one works", self.cam.id, what, reason, str(exc)[:300],
                        "read_failures" if what == "plate read" else "second_opinion_failures")
        else:
            log.debug("%s: %s failed again (%s): %s", self.cam.id, what, reason, exc)

    def _worked(self, what: str) -> None:
        ep = self._failing[what]
        if ep.run:
            log.warning("%s: %s works again after %d failure(s)", self.cam.id, what, ep.run)
            ep.run = 0

    # --- the voting core, on its worker --------------------------------------------------------------------

    def _op(self, kind: str, track_id: int, now: float, read: PlateObservation | None = None,
            second: PlateObservation | None = None) -> None:
        try:
            self._ops.put_nowait((kind, track_id, now, read, second))
        except asyncio.QueueFull:
            self.counts["ops_dropped"] += 1

    async def run(self) -> None:
        """The voting worker (a task for the camera's lifetime)."""
        try:
            while True:
                kind, track_id, now, read, second = await self._ops.get()
                at = self._wall()
                gate = self._gate
                if kind == "tick":
                    if not gate.active():
                        continue
                    decisions = await asyncio.to_thread(gate.tick, now, at)  # a timeout looks the plate up
                elif kind == "start":
                    decisions = await asyncio.to_thread(gate.feed, track_id, now, at)
                elif kind == "read":
                    decisions = await asyncio.to_thread(gate.feed, track_id, now, at, read, second)
                else:
                    decisions = await asyncio.to_thread(gate.end, track_id, now, at)
                for d in decisions:
                    st = self._tracks.get(d.track_id)
                    if st is not None:
                        st.decided = True
                    self._spawn(self._act(d, st))
                if kind == "end":
                    st = self._tracks.get(track_id)
                    if st is not None and st.ended and not st.reading:
                        del self._tracks[track_id]
                        for alias in [k for k, v in self._alias.items() if v == track_id]:
                            del self._alias[alias]
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- decisions -----------------------------------------------------------------------------------------

    def reopen_window_s(self) -> float:
        """How long after an open the same plate is taken for the same car (see the module docstring)."""
        return IN_LANE_AFTER_OPEN_S + self.rule.decide_after_s

    def _opened_recently(self, plate: str, now: float) -> float | None:
        """Seconds since this gate opened for ``plate``, when within the window; else None."""
        at = self._opened.get(plate)
        return None if at is None or now - at >= self.reopen_window_s() else now - at

    async def _act(self, d: GateDecision, st: _TrackState | None) -> None:
        self.decision_s.append(d.latency_s)
        if d.plate is not None and d.decision != "undecided":
            # [1] Runs before the first await of this task, and the decisions' tasks start in order: an open
            # is recorded before the next decision is looked at.
            ago = self._opened_recently(d.plate, self._clock())
            if ago is not None:
                self.counts["open_repeats"] += 1
                log.info("%s: vehicle track %d (%s) is the car this gate opened for %.1f s ago (a split track, "
                         "or the car back): not commanded again", self.cam.id, d.track_id, d.decision, ago)
                return
        if d.decision == "open":
            await self._open(d)
        elif d.decision == "visitor":
            await self._visitor(d, st)
        else:
            self.counts["undecided"] += 1
            log.info("%s: vehicle track %d left no readable plate (%s)", self.cam.id, d.track_id, d.reason)

    async def _open(self, d: GateDecision) -> None:
        """Open for a listed plate. Nothing here names the plate: the audit names the camera and track."""
        target = self.rule.open
        who = f"{RULE_CALLER}plate:{self.cam.id}#{d.track_id}"
        note = f"camera {self.cam.id} track {d.track_id}"
        self.counts["opens"] += 1
        plate = d.plate or ""  # an open is always for a voted plate
        opened_at = self._opened[plate] = self._clock()  # [1] before any await
        for old in [p for p, at in self._opened.items() if opened_at - at >= self.reopen_window_s()]:
            del self._opened[old]
        while len(self._opened) > MAX_ANNOUNCED:
            self._opened.pop(next(iter(self._opened)))
        if not await self._command_open(d, target, who, note) and self._opened.get(plate) == opened_at:
            del self._opened[plate]  # the car's next track tries again

    async def _command_open(self, d: GateDecision, target: str, who: str, note: str) -> bool:
        if target in self._outputs:
            return await self._pulse_open(target, who, note)
        action = self._actions.get("gate")
        if action is None:
            self.counts["open_failed"] += 1
            log.error("%s: a listed plate is at the gate but %r is neither an output nor a gate this box runs",
                      self.cam.id, target)
            return False
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                await action({"device_id": target, "command": "open", "reason": "plate_match", "note": note}, who)
        except (CommandRejected, TimeoutError) as exc:
            # The gate's capability audits its own failure (gate.commanded outcome failed).
            self.counts["open_failed"] += 1
            log.warning("%s: opening %s for track %d failed: %s", self.cam.id, target, d.track_id, exc)
            return False
        return True

    async def _pulse_open(self, output: str, who: str, note: str) -> bool:
        started = time.monotonic()
        outcome, error = "executed", None
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                await self._outputs.pulse(output, self.rule.relay_pulse_s)
        except Exception as exc:  # noqa: BLE001 - any device failure is audited as a failed open
            outcome, error = "failed", f"{type(exc).__name__}: {exc}"[:200]
            self.counts["open_failed"] += 1
            log.warning("%s: pulsing %s to open failed: %s", self.cam.id, output, error)
        data: dict[str, Any] = {"command": "open", "reason": "plate_match", "by": who, "via": "local",
                                "outcome": outcome, "latency_ms": round((time.monotonic() - started) * 1000, 1),
                                "note": f"{note}, output {output}"}
        if error:
            data["error"] = error
        await self._emit(GATE_COMMANDED.name, data)
        return error is None

    async def _visitor(self, d: GateDecision, st: _TrackState | None) -> None:
        now = self._clock()
        if d.plate is not None:
            # One car the tracker split into two tracks (it stopped behind another, it turned) is one visitor.
            last = self._announced.get(d.plate)
            self._announced[d.plate] = now
            if len(self._announced) > MAX_ANNOUNCED:
                self._announced.pop(next(iter(self._announced)))
            if last is not None and now - last < VISITOR_REPEAT_S:
                self.counts["visitor_repeats"] += 1
                return
        self.counts["visitors"] += 1
        atts: tuple[Attachment, ...] = ()
        if st is not None and st.image is not None and self._evidence is not None and self.cam.snapshots:
            det = Detection(label=st.label or "car", score=st.score, box=st.box, model="")
            try:
                atts = (await self._evidence.save_snapshot(self.cam.id, st.image, [det]),)
            except Exception as exc:  # noqa: BLE001 - the event goes without its snapshot
                log.warning("%s: visitor snapshot not kept: %s", self.cam.id, exc)
        await self._emit(GATE_VISITOR.name, {
            "plate": d.plate, "confidence": round(float(d.confidence), 3), "agreement": round(float(d.agreement), 3),
            "reason": d.reason, "track_id": d.track_id, "zone": self.rule.zone, "reads": d.reads, "votes": d.votes,
            "gate": self.rule.open}, atts)

    async def call_button(self, active: bool | None, source: str) -> None:
        """The driver pressed the gate's call button: the guard console rings (``gate.call``)."""
        if active is False:
            return
        self.counts["calls"] += 1
        await self._emit(GATE_CALL.name, {"gate": self.rule.open, "source": source, "zone": self.rule.zone})

    async def _emit(self, type_name: str, data: dict[str, Any], atts: tuple[Attachment, ...] = ()) -> None:
        try:
            await self._sink.emit(type_name, self.cam.id, data, atts)
        except Exception as exc:  # noqa: BLE001 - the outbox refusing one event must not stop the gate
            self.counts["events_failed"] += 1
            log.warning("%s: %s not stored: %s", self.cam.id, type_name, exc)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """Reads and decisions handle their own failures; one that still escapes is logged, not lost."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.counts["task_errors"] += 1
            log.error("%s: a gate task failed: %r", self.cam.id, exc, exc_info=exc)

    def stats(self) -> dict[str, Any]:
        p99 = round(float(np.percentile(np.fromiter(self.decision_s, float), 99)) * 1000) if self.decision_s else None
        return {**self.counts, "decision_ms_p99": p99, "tracks": len(self._tracks), "voting": len(self._gate.active()),
                "opened_recently": sum(1 for at in self._opened.values()
                                       if self._clock() - at < self.reopen_window_s()),
                "reads_in_flight": self._in_flight, "ops_queued": self._ops.qsize(), "evicted": self._gate.evicted,
                "read_failures": dict(self._failing["plate read"].reasons),
                "second_opinion_failures": dict(self._failing["second opinion"].reasons),
                "reads_failing": self._failing["plate read"].run > 0}

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)


def vehicle_crop(image: np.ndarray, box: Box) -> np.ndarray | None:
    """The vehicle's box grown by CROP_MARGIN each side, clipped to the frame, as its own array (None when
    nearly empty)."""
    h, w = image.shape[:2]
    mx, my = (box[2] - box[0]) * CROP_MARGIN, (box[3] - box[1]) * CROP_MARGIN
    x1, y1 = max(0, int(box[0] - mx)), max(0, int(box[1] - my))
    x2, y2 = min(w, int(box[2] + mx) + 1), min(h, int(box[3] + my) + 1)
    if x2 - x1 < 16 or y2 - y1 < 16:
        return None
    return np.ascontiguousarray(image[y1:y2, x1:x2])



def _failure_reason(exc: Exception) -> str:
    """The status key for a failed read."""
    if isinstance(exc, ModelError):
        return "model"  # a model the engine does not have or cannot load: a config or install fault
    if isinstance(exc, InferenceTimeout):
        return "timeout"
    if isinstance(exc, InferenceError):
        return "inference"
    if isinstance(exc, ValueError):
        return "bad_input"
    return "error"


def _observation(found: Sequence[Detection]) -> PlateObservation | None:
    best = max((d for d in found if d.text), key=lambda d: d.score, default=None)
    return None if best is None else PlateObservation.from_detection(best)
