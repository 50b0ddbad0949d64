"""Falls and thrown objects wired to the real pieces: the alarm lifecycle (AlarmRuntime over a real outbox),
the evidence store, the shared inference engine with the shipped MoveNet and fall head, and for thrown objects
the real RTSP peer serving a synthetic façade as H.264 at 25 fps through the camera's RtspSource.

Falls: person.jpg toppled about the ankles (the whole picture turned, as the pose of a person falling
sideways), stood still, or carried across the frame, at 5 detection ticks a second through the real tracker
on a simulated clock; every tick's job is awaited, so the rule sees what a camera would at that rate.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest

from edgeagent.app import Daemon
from edgeagent.capabilities import Config
from edgeagent.drivers.camera.evidence import EvidenceStore
from edgeagent.drivers.camera.luma import LumaFrame
from edgeagent.drivers.camera.rtsp import RtspSource
from edgeagent.drivers.camera.rules.alarm_kinds import CAMERA_RULE_ALARM_KINDS
from edgeagent.drivers.camera.rules.fall_runner import FallObserver, FallSettings
from edgeagent.drivers.camera.rules.falls import FallSpec
from edgeagent.drivers.camera.rules.thrown import ThrownParams
from edgeagent.drivers.camera.rules.thrown_runner import ThrownRunner, ThrownSettings, alarm_place, crop_spec
from edgeagent.drivers.camera.tracker import Tracker
from edgeagent.kernel.alarms.engine import AlarmConfig, AlarmEngine
from edgeagent.kernel.alarms.runtime import AlarmRuntime
from edgeagent.kernel.config.schema import parse_yaml, validate_doc
from edgeagent.kernel.pipeline.event_types import REGISTRY
from edgeagent.kernel.pipeline.events import Event, EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.kernel.runtime.clock import Clock
from edgeagent.kernel.runtime.outputs import Outputs
from edgeagent.models.engine import InferenceEngine
from edgeagent.models.manifest import load_manifests
from edgeagent.models.types import Box, Detection
from tests.facade_video import encode
from tests.helpers import camera_doc, running_daemon, wait_until
from tests.media import image
from tests.rtsp_peer import RtspServer
from tests.synth_facade import Scene, SynthSequence, falling_object

PERSON_BOX = (188.0, 98.0, 278.0, 375.0)  # the person in person.jpg
ANKLES = (233.0, 370.0)
FPS = 5.0


@dataclass
class Rig:
    alarms: AlarmRuntime
    evidence: EvidenceStore
    events: list[Event] = field(default_factory=list)

    def raised(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.type == "alarm.raised" and e.data.get("kind") == kind]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    outbox = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await outbox.open()
    clock = Clock(mode="synced")
    sink = EventSink(EventFactory(REGISTRY, "site-1", "gw-1", clock), outbox)
    cfg = AlarmConfig(kinds={k.name: k for k in CAMERA_RULE_ALARM_KINDS})
    alarms = AlarmRuntime(AlarmEngine(cfg), sink=sink, state=outbox, outputs=Outputs(), notifiers=None, clock=clock)
    try:
        async with EvidenceStore(tmp_path / "evidence", max_bytes=50_000_000, retention_s=86_400) as store:
            r = Rig(alarms, store)
            sink.observe(lambda e, _seq: r.events.append(e))
            yield r
    finally:
        await outbox.close()


# --- thrown objects over RTSP -------------------------------------------------------------------------------

SCENE = Scene()  # 640x360, 12 floors x 6 columns, looking up


@pytest.fixture(scope="module")
def facade_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 s at 25 fps: an object dropped from the window of floor 9, column 3 at 2 s (the peer loops it)."""
    seq = SynthSequence(SCENE, [falling_object(9, 3, release_after_s=2.0)], duration_s=5.0, fps=25.0, seed=4)
    return encode(seq, tmp_path_factory.mktemp("facade") / "throw.ts")


async def test_a_throw_on_the_stream_raises_one_thrown_object_alarm_with_its_window_and_a_clip(
        rig: Rig, facade_clip: Path) -> None:
    settings = ThrownSettings(spec=SCENE.spec(), params=ThrownParams(), place="block 3 south", clip_pre_s=3.0,
                              clip_post_s=1.0)
    runner = ThrownRunner("facade-1", settings, alarms=rig.alarms, evidence=rig.evidence)
    with RtspServer(facade_clip) as server:
        source = RtspSource(server.url, name="facade-1", decode_fps=5.0)
        tap = runner.attach(source)
        async with source:
            task = asyncio.create_task(runner.run(source))
            try:
                assert await wait_until(lambda: rig.raised("thrown_object"), timeout_s=40.0), runner.stats()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            bgr_frames = source.delivered
    raised = rig.raised("thrown_object")
    why = str([(e.data, [a.media_type for a in e.attachments]) for e in raised])
    assert len(raised) == 1, why
    event = raised[0]
    d = event.data
    assert d["place"] == "block 3 south, floor 9 window 3" and event.device_id == "facade-1"
    details = d["details"]
    assert (details["floor"], details["column"]) == (9, 3)
    points = [tuple(map(float, p.split(","))) for p in details["trajectory"].split(";")]
    assert len(points) >= 8 and all(b[0] > a[0] for a, b in itertools.pairwise(points))
    assert points[-1][2] - points[0][2] >= 0.04  # more than a floor down the picture
    assert 0.4 <= details["accel_g"] <= 1.6
    kinds = sorted(a.media_type for a in event.attachments)
    assert kinds == ["image/jpeg", "video/mp4"], why
    # Full rate: the tap saw every frame (25 a second), the detection path 5 of them.
    assert tap.delivered >= 4 * bgr_frames > 0
    assert runner.counts["clips"] == 1 and runner.counts["raised"] >= 1
    assert tap.stats()["errors"] == 0


def test_jittered_stamps_still_put_the_throw_at_its_window(facade_clip: Path) -> None:
    """The clip's frames fed as the tap gives them, their stream stamps moved by up to a frame (sd 20 ms: a relay
    re-stamping on arrival, as the RTSP peer does under load), the detector starting at different points of the
    clip (the release seen whole, or in its first second, when it is blind): every throw is found and put at
    floor 9, window 3. With the stamps as they came, a third were missed and some put a floor off."""
    with av.open(str(facade_clip)) as container:
        greys = [f.to_ndarray(format="gray") for f in container.decode(video=0)]
    _, (x1, y1, x2, y2) = crop_spec(SCENE.spec(), SCENE.width, SCENE.height)
    rng = np.random.default_rng(5)
    cells = []
    for start in (10, 30, 36, 50) * 3:
        runner = ThrownRunner("facade-1", ThrownSettings(spec=SCENE.spec(), params=ThrownParams(), place="p"),
                              alarms=None, evidence=None)  # type: ignore[arg-type]  # feed() raises nothing
        found: list[Any] = []
        stamp = -1.0
        for k in range(start, start + 2 * len(greys)):
            stamp = max(stamp + 1e-3, k / 25.0 + float(np.clip(rng.normal(0.0, 0.02), -0.04, 0.04)))  # in order
            frame = LumaFrame(greys[k % len(greys)][y1:y2, x1:x2].copy(), x1, y1, SCENE.width, SCENE.height, k,
                              stamp, 100.0 + k / 25.0)
            found += runner.feed(frame)
            if found:
                break
        cells.append(found[0].origin_cell if found else None)
        assert runner.counts["reanchors"] == 0
    assert cells == [(9, 3)] * 12


def test_the_alarm_place_names_the_window_within_the_lifecycle_limit() -> None:
    assert alarm_place("block 3 south", (9, 3)) == "block 3 south, floor 9 window 3"
    assert alarm_place("block 3 south", None) == "block 3 south"
    long = alarm_place("x" * 80, (12, 6))
    assert len(long) == 64 and long.endswith(", floor 12 window 6")


def test_the_facade_moves_into_its_region_of_interest_and_back() -> None:
    spec = SCENE.spec()
    moved, (x1, y1, x2, y2) = crop_spec(spec, SCENE.width, SCENE.height)
    full, crop = spec.grid(SCENE.width, SCENE.height), moved.grid(x2 - x1, y2 - y1)
    for floor, column in [(1, 1), (12, 6), (9, 3), (5, 4)]:
        x, y = full.cell_centre_px(floor, column)
        assert crop.cell_of(x - x1, y - y1) == (floor, column)


# --- falls through the shared engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return image("person.jpg")


def ease(x: float) -> float:
    x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


def topples(t: float) -> np.ndarray:
    """Rotation+translation (2x3) of the picture at t: falls sideways about the ankles at 4.5 s in 0.5 s."""
    return cv2.getRotationMatrix2D(ANKLES, -math.degrees(1.45 * ease((t - 4.5) / 0.5)), 1.0)


def stands(t: float) -> np.ndarray:
    return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def walks(t: float) -> np.ndarray:
    return np.array([[1.0, 0.0, 120.0 * math.sin(2 * math.pi * t / 8.0)], [0.0, 1.0, 0.0]])


@dataclass(frozen=True)
class Tick:
    image: np.ndarray
    seq: int
    mono_s: float


def moved_box(m: np.ndarray) -> Box:
    x1, y1, x2, y2 = PERSON_BOX
    c = np.array([[x1, y1, 1.0], [x2, y1, 1.0], [x2, y2, 1.0], [x1, y2, 1.0]]) @ m.T
    return float(c[:, 0].min()), float(c[:, 1].min()), float(c[:, 0].max()), float(c[:, 1].max())


@pytest.fixture
async def engine() -> AsyncIterator[InferenceEngine]:
    manifests = load_manifests()
    wanted = {k: v for k, v in manifests.items() if k in ("movenet-multipose", "nfd-fall")}
    async with InferenceEngine(wanted, threads=1) as e:
        yield e


async def follow(rig: Rig, engine: InferenceEngine, photo: np.ndarray, motion: Callable[[float], np.ndarray],
                 seconds: float) -> FallObserver:
    observer = FallObserver("lobby-1", FallSettings(spec=FallSpec(), place="building 3 lobby", resident="res-7"),
                            engine=engine, alarms=rig.alarms, evidence=rig.evidence)
    tracker = Tracker()
    h, w = photo.shape[:2]
    for k in range(int(seconds * FPS) + 1):
        t = k / FPS
        m = motion(t)
        frame = cv2.warpAffine(photo, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
        update = tracker.update([Detection("person", 0.8, moved_box(m))], t)
        observer.on_tick(Tick(frame, k, t), update.tracks, update.ended, t)
        await observer.idle()
    await observer.aclose()
    return observer


async def test_a_fall_raises_video_fall_once_with_a_snapshot(rig: Rig, engine: InferenceEngine,
                                                             photo: np.ndarray) -> None:
    observer = await follow(rig, engine, photo, topples, 8.0)
    (event,) = rig.raised("video_fall")
    assert event.data["place"] == "building 3 lobby" and event.device_id == "lobby-1"
    details: dict[str, Any] = event.data["details"]
    assert details["fallen"] >= 0.7 and details["resident_id"] == "res-7"
    assert [a.media_type for a in event.attachments] == ["image/jpeg"]
    assert observer.counts["falls"] == 1 and observer.counts["poses"] >= 30 and observer.counts["head_requests"] > 0
    assert observer.counts["pose_busy"] == observer.counts["job_errors"] == 0


@pytest.mark.parametrize("motion", [stands, walks], ids=["stands", "walks"])
async def test_standing_and_walking_raise_nothing(rig: Rig, engine: InferenceEngine, photo: np.ndarray,
                                                  motion: Callable[[float], np.ndarray]) -> None:
    observer = await follow(rig, engine, photo, motion, 8.0)
    assert rig.raised("video_fall") == []
    assert observer.counts["poses"] >= 30 and observer.rule.stats()["head_windows"] >= 10


# --- in the daemon ------------------------------------------------------------------------------------------


async def test_the_daemon_runs_a_facade_camera_into_a_thrown_object_alarm(tmp_path: Path, facade_clip: Path) -> None:
    """Config to alarm: a camera with ``thrown:`` (the scene's quad) and ``falls:`` in the real daemon; the
    throw on the stream becomes one durable alarm.raised (place, window, clip), the fall observer runs."""
    q = SCENE.quad
    with RtspServer(facade_clip) as server:
        text = camera_doc(tmp_path, f"""  - type: camera
    id: facade-south
    name: block 3 south
    rtsp: {{detect_url: "{server.url}"}}
    detect: {{fps: 5}}
    falls: {{}}
    thrown:
      quad: [{list(q[0])}, {list(q[1])}, {list(q[2])}, {list(q[3])}]
      floors: {SCENE.floors}
      columns: {SCENE.columns}
      clip_post_s: 1.0
""")
        daemon = Daemon(validate_doc(parse_yaml(text, "c.yaml"), "c.yaml", Config))
        async with running_daemon(daemon) as run:
            assert await wait_until(lambda: run.of("alarm.raised", "facade-south"), 40.0)
            cap: Any = daemon.capability("cameras")
            status = cap.status()["cameras"]["facade-south"]
    raised = run.of("alarm.raised", "facade-south")
    why = str([(e.data, [a.media_type for a in e.attachments]) for e in raised])
    (event,) = raised[:1]
    assert event.data["kind"] == "thrown_object" and event.data["place"] == "block 3 south, floor 9 window 3", why
    assert (event.data["details"]["floor"], event.data["details"]["column"]) == (9, 3), why
    assert "video/mp4" in [a.media_type for a in event.attachments], why
    assert len(raised) == 1, why
    rules = status["rules"]
    assert rules["thrown"]["frames"] > 0 and rules["falls"]["ticks"] > 0


def person_clip(path: Path, photo: np.ndarray, motion: Callable[[float], np.ndarray], seconds: float) -> Path:
    """person.jpg moved by ``motion`` as a 10 fps H.264 TS clip (what a camera would stream)."""
    h, w = photo.shape[:2]
    with av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast", "bf": "0", "g": "10"}
        for k in range(int(seconds * 10)):
            frame = cv2.warpAffine(photo, motion(k / 10), (w, h), borderMode=cv2.BORDER_REPLICATE)
            vf = av.VideoFrame.from_ndarray(frame, format="bgr24")
            vf.pts, vf.time_base = k, Fraction(1, 10)
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def topples_late(t: float) -> np.ndarray:
    """Stands 7 s (the fall head's 4 s window fills, whenever the stream was joined), falls sideways in 0.5 s, lies."""
    return cv2.getRotationMatrix2D(ANKLES, -math.degrees(1.45 * ease((t - 7.0) / 0.5)), 1.0)


async def test_the_daemon_raises_video_fall_from_a_camera_streaming_a_fall(tmp_path: Path, photo: np.ndarray) -> None:
    """Video to alarm through the whole pipeline (stream, motion, NanoDet, tracker, MoveNet on person crops, the
    fall head): a camera whose person falls raises one video_fall about its place, with a snapshot and the
    linked resident. (Standing and walking are the tick-level tests above: the same observer, the same models.)"""
    fall = person_clip(tmp_path / "fall.ts", photo, topples_late, 11.0)
    text = camera_doc(tmp_path, f"""  - type: camera
    id: lobby
    name: building 3 lobby
    rtsp: {{detect_url: "{fall.as_uri()}"}}
    detect: {{fps: 5, classes: [person]}}
    snapshots_from: detect
    falls: {{resident: res-7}}
""", cameras="  privacy: {enabled: false}\n")
    daemon = Daemon(validate_doc(parse_yaml(text, "c.yaml"), "c.yaml", Config))
    async with running_daemon(daemon) as run:
        cap: Any = daemon.capability("cameras")
        assert await wait_until(lambda: run.of("alarm.raised", "lobby"), 30.0), str(cap.status()["cameras"]["lobby"])
    (event,) = run.of("alarm.raised", "lobby")
    assert event.data["kind"] == "video_fall" and event.data["place"] == "building 3 lobby"
    assert event.data["details"]["resident_id"] == "res-7" and event.data["details"]["fallen"] >= 0.7
    assert [a.media_type for a in event.attachments] == ["image/jpeg"]
