"""One camera's pipeline (motion gating, regions, the shared NanoDet worker, tracker, zones) on the pedestrian
clip, frame by frame with the clip's own clock: which ticks run the detector, and what becomes of the tracks.

The clip is run once per module (a real engine, NanoDet on CPU): its first 40 s at the detection rate (5 fps,
every other frame), then 20 s of the scene's empty background (the median of the clip's frames)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from edgeagent.drivers.camera.config import CameraDevice
from edgeagent.drivers.camera.pipeline import CameraPipeline
from edgeagent.models.engine import InferenceEngine
from edgeagent.models.manifest import load_manifests

CLIP = Path(__file__).resolve().parents[1] / "drivers" / "sim" / "media" / "pedestrians.mp4"
CLIP_FPS = 10.0
DETECT_FPS = 5.0
CLIP_S = 40.0
EMPTY_S = 20.0


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
    states_max: int = 0  # the tracker's live states (tentative included), the most at any tick
    tracks_after_empty: list[Any] = field(default_factory=list)
    states_after_empty: int = -1
    end_s: float = 0.0
    person_ids: set[int] = field(default_factory=set)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    telemetry: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


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


async def run_clip() -> ClipRun:
    out = ClipRun()
    clock = [0.0]
    sink = RecordingSink()
    empty = background()
    async with InferenceEngine(load_manifests(), threads=2) as engine:
        pipe = CameraPipeline(camera(), detector=engine, model="nanodet", input_size=416,
                              sink=sink, evidence=None, clock=lambda: clock[0])  # type: ignore[arg-type]
        seq = 0

        async def tick(image: np.ndarray) -> None:
            nonlocal seq
            seq += 1
            clock[0] = seq / DETECT_FPS
            await pipe.process(ClipFrame(image, seq, clock[0]))
            out.states_max = max(out.states_max, len(pipe._tracker))
            out.person_ids.update(t.id for t in pipe.tracks if t.label == "person")

        for image in clip_frames(CLIP_S):
            await tick(image)
        out.clip_ticks = pipe.stats.ticks
        out.clip_runs = pipe.stats.detector_runs
        for _ in range(round(EMPTY_S * DETECT_FPS)):
            await tick(empty)
        out.ticks = pipe.stats.ticks
        out.tracks_after_empty = list(pipe.tracks)
        out.end_s = clock[0]
        out.states_after_empty = len(pipe._tracker)
        out.stats = pipe.stats.as_dict()
        await asyncio.sleep(0)  # let the event tasks finish
        while pipe._pending:
            await asyncio.gather(*pipe._pending, return_exceptions=True)
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
    occupancy = [d["counts"] for name, d in clip_run.telemetry if name == "camera.zone.occupancy"]
    assert occupancy and sum(occupancy[-1].values()) <= len(left), (occupancy[-3:], left)
