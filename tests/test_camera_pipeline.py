"""One camera's pipeline (motion gating, regions, the shared NanoDet worker, tracker, zones) on the pedestrian
clip, frame by frame with the clip's own clock: which ticks run the detector, and what becomes of the tracks.

The clip is run once per module (a real engine, NanoDet on CPU): its first 40 s at the detection rate (5 fps,
every other frame), then 20 s of the scene's empty background (the median of the clip's frames), then the clip's
first 2 s again; and the same
40 s through the naive loop (the whole frame to the detector at every tick, the same tracker), the reference
for the person tracks the pipeline must find."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest

from edgeagent.drivers.camera.config import CameraDevice
from edgeagent.drivers.camera.pipeline import IDLE_AFTER_S, CameraPipeline, keep_detections
from edgeagent.drivers.camera.tracker import Tracker
from edgeagent.models.engine import InferenceEngine
from edgeagent.models.manifest import load_manifests
from edgeagent.models.types import Box

CLIP = Path(__file__).resolve().parents[1] / "drivers" / "sim" / "media" / "pedestrians.mp4"
CLIP_FPS = 10.0
DETECT_FPS = 5.0
CLIP_S = 40.0
EMPTY_S = 20.0
AGAIN_S = 2.0


@dataclass(frozen=True)
class ClipFrame:
    image: np.ndarray
    seq: int
    mono_s: float


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.telemetry: list[tuple[str, dict[str, Any]]] = []

    async def emit(self, type_name: str, device_id: str, data: Any, attachments: tuple[Any, ...] = ()) -> None:
        self.events.append((type_name, dict(data)))

    def emit_telemetry(self, type_name: str, device_id: str, data: Any) -> None:
        self.telemetry.append((type_name, dict(data)))


@dataclass
class ClipRun:
    ticks: int = 0
    clip_ticks: int = 0
    clip_runs: int = 0  # detector runs during the clip
    clip_px: int = 0  # the detector's input pixels during the clip
    states_max: int = 0  # the tracker's live states (tentative included), the most at any tick
    tracks_after_empty: list[Any] = field(default_factory=list)
    states_after_empty: int = -1
    end_s: float = 0.0
    person_ids: set[int] = field(default_factory=set)
    # Per clip tick: the confirmed person tracks (id, box, moved from where they were first seen).
    per_tick: list[list[tuple[int, Box]]] = field(default_factory=list)
    naive_per_tick: list[list[tuple[int, Box]]] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    telemetry: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    idle_calls: list[tuple[str, int, bool]] = field(default_factory=list)  # (phase, tick, idle)
    first_again: int = 0
    telemetry_after_empty: int = 0


def clip_frames(seconds: float) -> Iterator[np.ndarray]:
    """BGR frames of the clip at the detection rate, decoded as they are needed (not held)."""
    with av.open(str(CLIP)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i >= seconds * CLIP_FPS:
                return
            if i % round(CLIP_FPS / DETECT_FPS) == 0:
                yield frame.to_ndarray(format="bgr24")


def background() -> np.ndarray:
    """The empty scene: the per-pixel median of frames spread over the whole clip (walkers never stay)."""
    with av.open(str(CLIP)) as container:
        frames = [f.to_ndarray(format="bgr24") for i, f in enumerate(container.decode(video=0)) if i % 20 == 0]
    return np.median(np.stack(frames), axis=0).astype(np.uint8)


def camera() -> CameraDevice:
    return CameraDevice.model_validate({
        "type": "camera", "id": "cam-path", "rtsp": {"detect_url": "rtsp://127.0.0.1:1/x"},
        "detect": {"fps": DETECT_FPS, "classes": ["person"]},
        "zones": [{"name": "path", "points": [[0.0, 0.4], [1.0, 0.4], [1.0, 1.0], [0.0, 1.0]]}]})


class ClipSource:
    """The clip's first CLIP_S, then EMPTY_S of the empty scene, then AGAIN_S of the clip, at the detection rate
    with the clip's own clock; records each tick's tracks and the pipeline's idle requests."""

    def __init__(self, out: ClipRun, clock: list[float], empty: np.ndarray, sink: RecordingSink) -> None:
        self.out, self.clock, self.empty, self.sink = out, clock, empty, sink
        self.pipe: CameraPipeline | None = None
        self.seq = 0
        self.phase = ""

    def set_idle(self, idle: bool) -> None:
        self.out.idle_calls.append((self.phase, self.seq, idle))

    async def frames(self, *, newest: bool = False) -> AsyncIterator[ClipFrame]:
        out, pipe = self.out, self.pipe
        assert pipe is not None
        phases = [("clip", clip_frames(CLIP_S)), ("empty", itertools.repeat(self.empty, round(EMPTY_S * DETECT_FPS))),
                  ("again", clip_frames(AGAIN_S))]
        for phase, images in phases:
            self.phase = phase
            if phase == "again":
                out.first_again = self.seq + 1
            for image in images:
                self.seq += 1
                self.clock[0] = self.seq / DETECT_FPS
                yield ClipFrame(image, self.seq, self.clock[0])
                if phase == "clip":
                    out.states_max = max(out.states_max, len(pipe._tracker))
                    out.person_ids.update(t.id for t in pipe.tracks if t.label == "person")
                    out.per_tick.append([(t.id, t.box) for t in pipe.tracks if t.label == "person"])
            if phase == "clip":
                out.clip_ticks = pipe.stats.ticks
                out.clip_runs = pipe.stats.detector_runs
                out.clip_px = pipe.stats.input_px
            elif phase == "empty":
                out.tracks_after_empty = list(pipe.tracks)
                out.end_s = self.clock[0]
                out.states_after_empty = len(pipe._tracker)
                out.telemetry_after_empty = len(self.sink.telemetry)

    def stats(self) -> dict[str, Any]:
        return {}


async def run_clip() -> ClipRun:
    out = ClipRun()
    clock = [0.0]
    sink = RecordingSink()
    source = ClipSource(out, clock, background(), sink)
    async with InferenceEngine(load_manifests(), threads=2) as engine:
        pipe = CameraPipeline(camera(), detector=engine, model="nanodet", input_size=416,
                              sink=sink, evidence=None, clock=lambda: clock[0])  # type: ignore[arg-type]
        source.pipe = pipe
        await pipe.run(source)
        out.ticks = pipe.stats.ticks
        out.stats = pipe.stats.as_dict()
        naive = Tracker()
        for k, image in enumerate(clip_frames(CLIP_S), start=1):
            raw = await engine.detect_regions("nanodet", image, [(0.0, 0.0, 768.0, 576.0)])
            update = naive.update(keep_detections(pipe.cam, raw, 768, 576), k / DETECT_FPS)
            out.naive_per_tick.append([(t.id, t.box) for t in update.tracks])
    out.events, out.telemetry = sink.events, sink.telemetry
    return out


@pytest.fixture(scope="module")
def clip_run() -> ClipRun:
    return asyncio.run(run_clip())


def test_tracks_that_leave_the_frame_end_and_the_empty_scene_holds_none(clip_run: ClipRun) -> None:
    # Walkers leave the frame all through the clip; a track whose prediction coasts off the frame used to
    # live for ever (no region ever contains it). After 20 s of the empty scene nothing is left.
    assert len(clip_run.person_ids) >= 10, clip_run.stats
    # What is left was seen lately and lies inside the frame (a static false "person" on the empty scene).
    left = clip_run.tracks_after_empty
    assert all(clip_run.end_s - t.last_seen_s <= 6.0 for t in left), left
    assert all(0 <= t.centre[0] <= 768 and 0 <= t.centre[1] <= 576 for t in left), left
    assert clip_run.states_after_empty == len(left)
    # ... and the zone's occupancy falls back to those with them.
    occupancy = [d["counts"] for name, d in clip_run.telemetry[:clip_run.telemetry_after_empty]
                 if name == "camera.zone.occupancy"]
    assert occupancy and sum(occupancy[-1].values()) <= len(left), (occupancy[-3:], left)


def _by_track(per_tick: list[list[tuple[int, Box]]]) -> dict[int, dict[int, Box]]:
    out: dict[int, dict[int, Box]] = {}
    for k, tracks in enumerate(per_tick):
        for tid, box in tracks:
            out.setdefault(tid, {})[k] = box
    return out


def _iou(a: Box, b: Box) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def moving_naive_tracks_found(run: ClipRun) -> tuple[int, int]:
    """(found, of) the naive loop's person tracks that move (over 3+ ticks, the centre gets half a box height
    from where it started: walkers, not the cones it calls "person"): found when a pipeline track overlaps
    it (IoU >= 0.3) on at least two of the same ticks (the benchmark's rule)."""
    pipe = _by_track(run.per_tick)
    found = total = 0
    for ticks in _by_track(run.naive_per_tick).values():
        if len(ticks) < 3:
            continue
        b0 = ticks[min(ticks)]
        c0 = ((b0[0] + b0[2]) / 2, (b0[1] + b0[3]) / 2)
        if not any(np.hypot((b[0] + b[2]) / 2 - c0[0], (b[1] + b[3]) / 2 - c0[1]) >= 0.5 * (b0[3] - b0[1])
                   for b in ticks.values()):
            continue
        total += 1
        found += any(sum(1 for k, b in ticks.items() if k in seen and _iou(b, seen[k]) >= 0.3) >= 2
                     for seen in pipe.values())
    return found, total


def test_rechecks_are_synchronized_halving_the_detector_runs_with_every_walker_found(clip_run: ClipRun) -> None:
    # Every track that needs a look goes into one run every other tick; in between only new motion runs
    # the detector. Each track on its own schedule ran it at 96% of the ticks (192 of these 200).
    assert clip_run.clip_runs <= 0.7 * clip_run.clip_ticks, clip_run.stats
    found, total = moving_naive_tracks_found(clip_run)
    assert total >= 10 and found == total


def test_regions_are_tight_rectangles_costing_a_fraction_of_whole_frames(clip_run: ClipRun) -> None:
    # The dynamic NanoDet costs what its input's pixels cost. Model-size squares fitted to 416x416 cost a whole
    # frame's run each time the detector runs (0.52 of the naive loop's inference on this clip); rectangles
    # around what must be looked at, at detect.scale 0.75, cost about 0.3 of it with every walker found.
    naive_px = clip_run.clip_ticks * 416 * 416
    assert clip_run.clip_px < 0.45 * naive_px, (clip_run.clip_px / naive_px, clip_run.stats)
    assert clip_run.stats["input_px_per_run"] < 0.7 * 416 * 416
    found, total = moving_naive_tracks_found(clip_run)
    assert total >= 10 and found == total
    # ... and tracks hold together as well as before (17 person ids for the naive loop's 14 walkers).
    assert len(clip_run.person_ids) <= 20, clip_run.person_ids


def test_a_person_needs_a_higher_score_than_the_cones_and_stones_of_the_empty_scene() -> None:
    # On the empty scene, in the crops the pipeline sends, NanoDet calls a cone "person" at 0.4-0.5; the
    # default person floor (detect.class_min_score, 0.5) drops it, while the walkers (0.58-0.81 in the
    # clip's first seconds) stay.
    async def detect() -> tuple[list[Any], list[Any]]:
        crops = [(0.0, 0.0, 416.0, 416.0), (352.0, 0.0, 768.0, 416.0), (0.0, 160.0, 416.0, 576.0),
                 (352.0, 160.0, 768.0, 576.0)]
        async with InferenceEngine(load_manifests(), threads=2) as engine:
            empty = await engine.detect_regions("nanodet", background(), crops)
            walkers = await engine.detect_regions("nanodet", next(clip_frames(1.0)), crops)
        return empty, walkers

    empty, walkers = asyncio.run(detect())
    cam = camera()
    no_floor = cam.model_copy(update={"detect": cam.detect.model_copy(update={"class_min_score": {}})})
    assert [d for d in keep_detections(no_floor, empty, 768, 576) if d.label == "person"], empty
    assert [d for d in keep_detections(cam, empty, 768, 576) if d.label == "person"] == []
    kept = [d for d in keep_detections(cam, walkers, 768, 576) if d.label == "person"]
    assert len(kept) >= 3 and kept == [d for d in keep_detections(no_floor, walkers, 768, 576) if d.score >= 0.5]


def test_a_quiet_scene_idles_the_source_and_the_first_motion_wakes_it(clip_run: ClipRun) -> None:
    # Keyframes only after IDLE_AFTER_S with nothing moving and no track (during the empty scene, once the
    # last tracks ended), full decoding again at the first tick where the walkers are back.
    idle_on = [(phase, tick) for phase, tick, idle in clip_run.idle_calls if idle]
    idle_off = [(phase, tick) for phase, tick, idle in clip_run.idle_calls if not idle]
    assert [p for p, _ in idle_on] == ["empty"] and clip_run.stats["idle_spells"] == 1, clip_run.idle_calls
    assert idle_on[0][1] >= clip_run.clip_ticks + IDLE_AFTER_S * DETECT_FPS
    assert idle_off == [("again", clip_run.first_again)], clip_run.idle_calls


def _spied_run(cam: CameraDevice, frame_at: Callable[[float], np.ndarray], ticks: int) -> dict[str, Any]:
    """``frame_at(t)`` at 5 fps for ``ticks`` ticks through the pipeline with NanoDet: the person tracks after
    each tick (time, tracks) and where the detector looked (time, regions)."""
    clock = [0.0]
    tracks: list[tuple[float, list[Any]]] = []
    looked: list[tuple[float, list[Box]]] = []

    class Source:
        async def frames(self, *, newest: bool = False) -> AsyncIterator[ClipFrame]:
            for k in range(ticks):
                clock[0] = k / DETECT_FPS
                yield ClipFrame(frame_at(clock[0]), k + 1, clock[0])
                tracks.append((clock[0], [t for t in pipe.tracks if t.label == "person"]))

        def stats(self) -> dict[str, Any]:
            return {}

    async def run() -> None:
        async with InferenceEngine({"nanodet": load_manifests()["nanodet"]}, threads=2) as engine:
            nonlocal pipe
            real = engine.detect_regions

            async def detect_regions(model: str, frame: np.ndarray, regions: list[Box], **kw: Any) -> Any:
                looked.append((clock[0], list(regions)))
                return await real(model, frame, regions, **kw)

            pipe = CameraPipeline(cam, detector=engine, model="nanodet", input_size=416, sink=RecordingSink(),
                                  evidence=None, clock=lambda: clock[0])  # type: ignore[arg-type]
            pipe._detector = type("Spy", (), {"detect_regions": staticmethod(detect_regions)})()
            await pipe.run(Source())

    pipe: Any = None
    asyncio.run(run())
    return {"tracks": tracks, "runs": pipe.stats.detector_runs, "looked": looked}


def _topple_run(cam: CameraDevice) -> dict[str, Any]:
    """person.jpg standing 7 s, falling sideways in 0.5 s, lying 3.5 s, at 5 fps through the pipeline: the
    ticks at which a person track was seen lying (box wider than tall) and where the detector looked."""
    from tests.media import image
    from tests.test_rules_runners import topples_late

    photo = image("person.jpg")
    seen = _spied_run(cam, lambda t: cv2.warpAffine(photo, topples_late(t), (photo.shape[1], photo.shape[0]),
                                                    borderMode=cv2.BORDER_REPLICATE), 55)
    seen["lying"] = [t for t, tracks in seen["tracks"] for tr in tracks
                     if tr.box[2] - tr.box[0] > tr.box[3] - tr.box[1]]
    return seen


def test_a_falls_camera_sees_the_person_who_fell() -> None:
    # The falls rule needs the person on the floor tracked. A camera with a rule keeps model-size squares:
    # NanoDet scores this lying person 0.55 there and 0.39-0.61 in tight rectangles around them (under the
    # person minimum of 0.5 in most), where only the falling person's coasting track would carry the fall.
    falls = CameraDevice.model_validate({"type": "camera", "id": "lobby", "rtsp": {"detect_url": "rtsp://127.0.0.1:1/x"},
                                         "detect": {"fps": DETECT_FPS, "classes": ["person"]}, "falls": {}})
    seen = _topple_run(falls)
    assert seen["lying"] and min(seen["lying"]) <= 10.0, seen  # fell at 7.0-7.5 s


def test_a_track_the_detector_lost_is_searched_for_around_where_it_was() -> None:
    # Without a rule the camera looks in tight rectangles. The person standing still is stirred by the fall's
    # motion and then missed (lying, they no longer look like the standing box): the search grows by a body
    # length, so the floor where they lie (x 217-507, y 204-416) is looked at within a second of the fall, not
    # only when the motion background gives up on them (9.6 s without the search).
    plain = CameraDevice.model_validate({"type": "camera", "id": "lobby", "rtsp": {"detect_url": "rtsp://127.0.0.1:1/x"},
                                         "detect": {"fps": DETECT_FPS, "classes": ["person"]}})
    seen = _topple_run(plain)
    floor = (217.0, 204.0, 507.0, 416.0)
    found = [t for t, regions in seen["looked"] if t >= 7.5 and any(
        r[0] <= floor[0] and r[1] <= floor[1] and r[2] >= floor[2] and r[3] >= floor[3] for r in regions)]
    assert found and min(found) <= 8.5, seen["looked"][-20:]


def test_no_search_box_for_a_walker_who_left_the_frame() -> None:
    # A person (cut from person.jpg) walks right at 120 px/s on a plain background and leaves the frame at
    # 6.6 s. The detector misses them at the edge (5.8 s) and their track coasts out. A missed track is
    # searched for in a box grown by its length, but not once its predicted centre is outside the frame
    # (from 6.2 s): before, the grown box at the edge spanned the frame's whole height at each re-check
    # until the track ended (4 runs, 182-288 x 576 px), looking at pixels where nothing can be.
    from tests.media import image

    walker = image("person.jpg")[80:400, 160:305]

    def frame_at(t: float) -> np.ndarray:
        canvas = np.full((576, 768, 3), 110, np.uint8)
        x = int(100 + 120 * max(0.0, t - 1.0))
        if x < 768:
            canvas[150:150 + walker.shape[0], x:min(768, x + walker.shape[1])] = walker[:, :768 - x]
        return canvas

    plain = CameraDevice.model_validate({"type": "camera", "id": "path", "rtsp": {"detect_url": "rtsp://127.0.0.1:1/x"},
                                         "detect": {"fps": DETECT_FPS, "classes": ["person"]}})
    seen = _spied_run(plain, frame_at, 50)
    # The walker was tracked to the edge, then their track coasted with its centre outside the frame.
    assert any(t >= 5.0 and tracks for t, tracks in seen["tracks"]), seen["tracks"]
    out = [t for t, tracks in seen["tracks"] if any(tr.centre[0] > 768 for tr in tracks)]
    assert out and min(out) <= 6.4, seen["tracks"]
    late = [(t, r) for t, regions in seen["looked"] if t >= min(out) for r in regions]
    assert late, seen["looked"]  # the motion of leaving is still looked at ...
    assert not [(t, r) for t, r in late if r[1] <= 0 and r[3] >= 576], late  # ... but no body-length search box
