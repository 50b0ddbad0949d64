"""Objects thrown from height: the detection core on synthetic façade sequences (tests/synth_facade.py).

What is checked: a falling object alarms exactly once, soon after release, with its window's cell; birds,
leaves, rain, an insect and a person at a window never alarm on their own, and do not hide a falling object
among them; state stays under its caps through 10,000 frames of rain; a bad façade spec is refused with a
message that says what is wrong. Latency is asserted in simulated time (frame times), never wall clock.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.camera.rules.thrown import (
    G_M_S2,
    FacadeSpec,
    ThrownAlarm,
    ThrownObjectDetector,
    ThrownParams,
)
from tests.synth_facade import (
    Actor,
    RunResult,
    Scene,
    SynthSequence,
    bird,
    falling_object,
    insect,
    leaf,
    person_at_window,
    rain,
    run,
)

SCENE = Scene()  # 640x360, 12 floors x 6 columns, looking up
# Time to fall one storey from rest: the least time any alarm can take after a release (min_fall_floors = 1).
ONE_FLOOR_S = math.sqrt(2 * SCENE.floor_height_m / G_M_S2)
# Frames an alarm may take beyond that: first sighting, the deciding frame and one of slack, plus the
# confirmation frames.
SLACK_FRAMES = 3 + ThrownParams().confirm_frames
# Time the acceleration may need, beyond that, to be known to +-accel_sigmas standard errors: for the
# smallest (3 px) objects at 25 fps the centroid noise leaves it a frame or two short after one storey
# (CI found 1.00 s against a 0.98 s bound; 150 random cases all came in at least 0.05 s under it).
FIT_SLACK_S = 0.1


def _run(actors: list[Actor], *, duration_s: float, fps: float = 15.0, seed: int = 0, scene: Scene = SCENE,
         params: ThrownParams | None = None) -> tuple[SynthSequence, RunResult]:
    seq = SynthSequence(scene, actors, duration_s=duration_s, fps=fps, seed=seed)
    detector = ThrownObjectDetector(scene.spec(), params)
    return seq, run(detector, seq)


def _fall_duration_s(floor: int, scene: Scene = SCENE) -> float:
    """Long enough for an object from ``floor`` to leave the bottom of the view."""
    height_m = (floor - scene.bottom_floor + 1.5) * scene.floor_height_m
    return math.sqrt(2 * height_m / G_M_S2) + 0.4


def _latency_bound_s(vy_m_s: float, fps: float) -> float:
    """Release to decision, at most: the rise of an object thrown upward and back to its release height
    (2 |vy| / g), the one-storey fall, ``SLACK_FRAMES`` and ``FIT_SLACK_S``."""
    rise = 2 * max(0.0, -vy_m_s) / G_M_S2
    return rise + ONE_FLOOR_S + SLACK_FRAMES / fps + FIT_SLACK_S


def _check_alarm_shape(alarm: ThrownAlarm, params: ThrownParams) -> None:
    times = [p[0] for p in alarm.trajectory]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert alarm.first_seen_s == times[0] <= alarm.decided_s == times[-1]
    assert alarm.fit.points >= params.min_points
    low, high = params.accel_band_g
    assert low <= alarm.fit.accel_g <= high
    assert alarm.fit.residual_px <= params.max_residual_px
    assert alarm.fit.fall_m >= params.min_fall_floors * SCENE.floor_height_m
    assert 0.0 <= alarm.confidence <= 1.0
    assert alarm.origin_from in ("zero_velocity", "first_point")


# --------------------------------------------------------------------------------------------- falling objects


@pytest.mark.parametrize(("fps", "floor", "column", "grey"), [
    (10.0, 9, 3, 25), (15.0, 5, 1, 230), (25.0, 12, 6, 25), (15.0, 3, 4, 25)])
def test_a_dropped_object_alarms_once_with_its_window(fps: float, floor: int, column: int, grey: int) -> None:
    obj = falling_object(floor, column, release_after_s=1.5, grey=grey)
    seq, res = _run([obj], duration_s=1.5 + _fall_duration_s(floor), fps=fps, seed=floor)
    (truth,) = seq.expected
    assert len(res.alarms) == 1, res.stats
    k, alarm = res.alarms[0]
    assert alarm.origin_cell == (floor, column)
    assert truth.release_s is not None
    # Decided within the one-storey fall plus SLACK_FRAMES of the release, counted in frames.
    assert k - (truth.release_s - seq.t0) * fps <= (ONE_FLOOR_S * fps) + SLACK_FRAMES
    assert alarm.decided_s - truth.release_s >= ONE_FLOOR_S - 1.0 / fps  # not before a storey was fallen
    _check_alarm_shape(alarm, ThrownParams())
    # The release point is found by going back to zero velocity: within a quarter storey of the truth.
    grid = SCENE.grid()
    u0 = (column - 0.5) * SCENE.column_width_m
    v0 = (SCENE.top_floor - floor + 0.58) * SCENE.floor_height_m
    (u, v), = grid.to_m(np.array([alarm.origin_px]))
    assert alarm.origin_from == "zero_velocity"
    assert abs(v - v0) < 0.25 * SCENE.floor_height_m and abs(u - u0) < 0.25 * SCENE.column_width_m


def test_a_colour_frame_works_as_a_grey_one() -> None:
    scene = Scene(color=True)
    _, res = _run([falling_object(8, 2, release_after_s=1.5)], duration_s=1.5 + _fall_duration_s(8),
                  scene=scene)
    assert [a.origin_cell for _, a in res.alarms] == [(8, 2)]


@settings(max_examples=15, deadline=None)
@given(floor=st.integers(3, 12), column=st.integers(1, 6), fps=st.sampled_from([10.0, 15.0, 25.0]),
       vx=st.floats(-2.0, 2.0), vy=st.floats(-2.0, 1.5), hold_s=st.sampled_from([0.0, 0.6, 1.5]),
       grey=st.sampled_from([20, 235]), size_px=st.floats(3.0, 6.0),
       offset=st.tuples(st.floats(-0.6, 0.6), st.floats(-0.4, 0.3)), seed=st.integers(0, 2**16))
def test_any_release_cell_speed_and_look_gives_one_alarm_in_the_right_cell(
        floor: int, column: int, fps: float, vx: float, vy: float, hold_s: float, grey: int, size_px: float,
        offset: tuple[float, float], seed: int) -> None:
    """Released from anywhere in a window (floors 3 and up: from the two lowest floors in view the object
    falls out of sight before it has fallen far enough to judge), tossed sideways at up to 2 m/s, thrown up
    at up to 2 m/s or down at 1.5 m/s, held out first or not, dark or light (seen against wall and glass),
    3-6 px."""
    obj = falling_object(floor, column, release_after_s=1.2 + hold_s, vx_m_s=vx, vy_m_s=vy, hold_s=hold_s,
                         grey=grey, size_px=size_px, offset_m=offset)
    rise_s = 2 * max(0.0, -vy) / G_M_S2
    seq, res = _run([obj], duration_s=1.2 + hold_s + rise_s + _fall_duration_s(floor), fps=fps, seed=seed)
    (truth,) = seq.expected
    assert [a.origin_cell for _, a in res.alarms] == [(floor, column)], res.stats
    alarm = res.alarms[0][1]
    assert truth.release_s is not None
    assert alarm.decided_s - truth.release_s <= _latency_bound_s(vy, fps)
    _check_alarm_shape(alarm, ThrownParams())


def test_an_object_the_colour_of_the_glass_is_found_once_it_is_in_front_of_the_wall() -> None:
    """Grey 60 released in front of dark glass (grey 60-95; the window's centre is its white mullion, hence
    the offset) is invisible until it falls below the window: it is picked up late, and the fit, taken back
    to zero velocity, still names its window."""
    obj = falling_object(3, 2, release_after_s=1.2, grey=60, size_px=3.0, offset_m=(0.5, 0.0))
    seq, res = _run([obj], duration_s=1.2 + _fall_duration_s(3), fps=10.0)
    assert [a.origin_cell for _, a in res.alarms] == [(3, 2)]
    alarm = res.alarms[0][1]
    release_s = seq.expected[0].release_s
    assert release_s is not None
    assert alarm.first_seen_s - release_s >= 0.2  # really picked up late
    assert alarm.decided_s - release_s <= ONE_FLOOR_S + 0.4 + SLACK_FRAMES / 10.0


def test_an_object_slowed_by_drag_still_alarms_and_a_light_one_does_not() -> None:
    """The band is 0.4..1.6 g: a heavy object slowed by drag (0.7 g) alarms; a sheet of paper or a bag
    (0.2 g) is told from a leaf by nothing, and does not (a documented limit)."""
    _, res = _run([falling_object(10, 2, release_after_s=1.5, g_factor=0.7)], duration_s=4.5)
    assert [a.origin_cell for _, a in res.alarms] == [(10, 2)]
    assert 0.5 < res.alarms[0][1].fit.accel_g < 0.9
    _, res = _run([falling_object(10, 2, release_after_s=1.5, g_factor=0.2)], duration_s=6.0)
    assert res.alarms == []
    assert res.stats["fits"] > 0  # it was seen and judged, not missed


def test_a_release_hidden_by_a_balcony_is_traced_back_to_its_window() -> None:
    """First seen 0.6 s after release (a storey and a half lower): the fit, taken back to zero velocity,
    still names the window it came from."""
    obj = falling_object(11, 4, release_after_s=1.5, hidden_s=((-1.0, 0.6),))
    _, res = _run([obj], duration_s=5.0, fps=15.0)
    assert len(res.alarms) == 1
    alarm = res.alarms[0][1]
    assert alarm.origin_cell == (11, 4)
    assert alarm.origin_from == "zero_velocity"
    assert alarm.trajectory[0][0] >= 1000.0 + 1.5 + 0.6


def test_an_object_lost_for_a_while_and_found_again_alarms_once() -> None:
    """Hidden for 0.5 s after the alarm (longer than max_gap_s): a new track picks it up and would alarm
    again; it is recognised as the same object on the same parabola."""
    obj = falling_object(12, 3, release_after_s=1.5, hidden_s=((1.1, 1.6),))
    _, res = _run([obj], duration_s=5.0, fps=15.0)
    assert [a.origin_cell for _, a in res.alarms] == [(12, 3)]
    assert res.stats["alarms_deduped"] == 1


def test_two_objects_from_two_windows_give_two_alarms() -> None:
    objs: list[Actor] = [falling_object(11, 2, release_after_s=1.5), falling_object(7, 5, release_after_s=2.0)]
    _, res = _run(objs, duration_s=5.0)
    assert sorted(a.origin_cell for _, a in res.alarms if a.origin_cell) == [(7, 5), (11, 2)]
    assert len(res.alarms) == 2


# --------------------------------------------------------------------------------------------- distractors


def _distractor(kind: str, rng: np.random.Generator, fps: float) -> list[Actor]:
    if kind.startswith("bird:"):
        return [bird(kind.split(":")[1]), bird(kind.split(":")[1], start_after_s=2.5)]  # type: ignore[arg-type]
    if kind == "leaves":
        return [leaf(), leaf(start_after_s=1.0), leaf(start_after_s=2.0)]
    if kind == "rain":
        return [rain(int(rng.integers(40, 160)), fps)]
    if kind == "insect":
        return [insect(), insect(start_after_s=2.0)]
    assert kind == "person"
    return [person_at_window(int(rng.integers(2, 13)), int(rng.integers(1, 7)))]


KINDS = ["bird:straight", "bird:undulating", "bird:glide", "bird:swoop", "leaves", "rain", "insect", "person"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("seed", "fps"), [(1, 10.0), (2, 15.0), (3, 25.0)])
def test_a_distractor_alone_never_alarms(kind: str, seed: int, fps: float) -> None:
    actors = _distractor(kind, np.random.default_rng(seed), fps)
    _, res = _run(actors, duration_s=6.0, fps=fps, seed=seed)
    assert res.alarms == [], [(a.origin_cell, a.fit) for _, a in res.alarms]
    # It was there to be seen: blobs were found and tracked (a "no alarm" from a blind detector proves nothing).
    assert res.stats["blobs"] > 0 and res.stats["tracks_started"] > 0
    if kind == "rain":
        assert res.stats["rain_frames"] > 0 and res.stats["streaks_ignored"] > 0
    if kind in ("bird:glide", "bird:swoop", "leaves"):
        assert res.stats["fits"] > 0  # they fell a storey or more and were judged


@settings(max_examples=16, deadline=None)
@given(kind=st.sampled_from(["bird:glide", "bird:undulating", "bird:swoop", "leaves"]),
       seed=st.integers(0, 2**16), fps=st.sampled_from([10.0, 15.0, 25.0]))
def test_descending_distractors_from_any_seed_never_alarm(kind: str, seed: int, fps: float) -> None:
    """The ones that come down (gliding and swooping birds, undulating flight, leaves) over random seeds."""
    _, res = _run(_distractor(kind, np.random.default_rng(seed), fps), duration_s=5.0, fps=fps, seed=seed)
    assert res.alarms == [], [(a.origin_cell, a.fit) for _, a in res.alarms]


@pytest.mark.parametrize(("seed", "fps", "floor", "column"), [
    (11, 10.0, 10, 2), (12, 15.0, 6, 5), (13, 25.0, 12, 1), (14, 15.0, 4, 3)])
def test_a_falling_object_among_every_distractor_alarms_once_in_its_cell(
        seed: int, fps: float, floor: int, column: int) -> None:
    rng = np.random.default_rng(seed)
    actors: list[Actor] = [
        falling_object(floor, column, release_after_s=2.5, vx_m_s=float(rng.uniform(-1, 1))),
        rain(80, fps), bird("straight"), bird("glide", start_after_s=1.5), bird("undulating", start_after_s=2.0),
        leaf(), leaf(start_after_s=1.5), insect(), person_at_window(int(rng.integers(2, 13)), 1 + column % 6)]
    seq, res = _run(actors, duration_s=2.5 + _fall_duration_s(floor), fps=fps, seed=seed)
    assert [a.origin_cell for _, a in res.alarms] == [(floor, column)], res.stats
    release_s = seq.expected[0].release_s
    assert release_s is not None
    # Rain streaks crossing the object perturb its centroid: the fit needs a few more frames to be sure than
    # in a clear view, still well within the 10 s the issue allows.
    assert res.alarms[0][1].decided_s - release_s <= ONE_FLOOR_S + 1.0


# --------------------------------------------------------------------------------------------- bounded state


def test_ten_thousand_frames_of_rain_stay_under_the_caps() -> None:
    """Small caps, so that every one of them is reached; the state is checked after every frame. The
    frames are 200 rendered ones fed in a loop (rain is stationary noise; rendering 10,000 would dominate)."""
    scene = Scene(width=320, height=180)
    params = ThrownParams(max_tracks=12, max_points=12, min_points=6, max_blobs=30, max_recent_alarms=2)
    seq = SynthSequence(scene, [rain(60, 15.0), leaf(duration_s=30.0)], duration_s=200 / 15.0, seed=5)
    frames = [f for f, _ in seq.frames()]
    detector = ThrownObjectDetector(scene.spec(), params)
    worst = {"tracks": 0, "track_points": 0, "recent_alarms": 0}
    for k in range(10_000):
        detector.update(frames[k % len(frames)], 1000.0 + k / 15.0)
        stats = detector.stats()
        for key, value in worst.items():
            worst[key] = max(value, int(stats[key]))
    stats = detector.stats()
    assert worst["tracks"] <= params.max_tracks
    assert worst["track_points"] <= params.max_tracks * params.max_points
    assert worst["recent_alarms"] <= params.max_recent_alarms
    # The caps were reached, and what they dropped was counted.
    assert worst["tracks"] == params.max_tracks
    assert stats["tracks_evicted"] > 0 and stats["blobs_dropped"] > 0 and stats["points_dropped"] > 0
    assert stats["frames"] == 10_000 and stats["alarms"] == 0


def test_a_track_that_lives_long_keeps_only_its_last_points() -> None:
    params = ThrownParams(max_points=20)
    seq = SynthSequence(SCENE, [person_at_window(7, 3, duration_s=8.0)], duration_s=8.0, fps=15.0)
    detector = ThrownObjectDetector(SCENE.spec(), params)
    res = run(detector, seq)
    assert res.stats["points_dropped"] > 0
    assert 0 < int(res.stats["track_points"]) <= 20 * int(res.stats["tracks"])


# --------------------------------------------------------------------------------------------- frames and scene


def test_a_lighting_change_restarts_the_background_without_alarms() -> None:
    seq = SynthSequence(SCENE, [], duration_s=4.0, seed=3)
    detector = ThrownObjectDetector(SCENE.spec())
    alarms: list[ThrownAlarm] = []
    for k, (frame, t) in enumerate(seq.frames()):
        image = frame if k < 30 else np.asarray(np.clip(frame.astype(np.int16) - 60, 0, 255), dtype=np.uint8)
        alarms += detector.update(image, t)
    assert alarms == []
    assert detector.stats()["recalibrations"] == 1


def test_a_new_frame_size_remaps_the_facade() -> None:
    """Normalized quads follow the frame size: the same object in a 960x540 stream is found in its cell."""
    detector = ThrownObjectDetector(SCENE.spec())
    seq_small = SynthSequence(SCENE, [], duration_s=1.0)
    t = 0.0
    for frame, t in seq_small.frames():
        detector.update(frame, t)
    big = Scene(width=960, height=540)
    seq_big = SynthSequence(big, [falling_object(9, 4, release_after_s=1.5)], duration_s=4.5, t0=t + 1.0)
    alarms = [a for frame, tb in seq_big.frames() for a in detector.update(frame, tb)]
    assert detector.stats()["reconfigurations"] == 1
    assert [a.origin_cell for a in alarms] == [(9, 4)]
    assert detector.roi is not None and detector.roi[2] <= 960


@pytest.mark.parametrize(("frame", "match"), [
    (np.zeros((360, 640), dtype=np.float32), "uint8"),
    (np.zeros((360, 640, 4), dtype=np.uint8), "grey or BGR"),
    (np.zeros((360,), dtype=np.uint8), "grey or BGR")])
def test_a_frame_that_is_not_an_image_is_refused(frame: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ThrownObjectDetector(SCENE.spec()).update(frame, 1.0)


def test_frame_times_must_increase() -> None:
    detector = ThrownObjectDetector(SCENE.spec())
    frame = np.zeros((360, 640), dtype=np.uint8)
    detector.update(frame, 5.0)
    with pytest.raises(ValueError, match="increase"):
        detector.update(frame, 5.0)
    with pytest.raises(ValueError, match="finite"):
        detector.update(frame, math.nan)


# --------------------------------------------------------------------------------------------- the façade grid


def test_every_cell_centre_maps_back_to_its_cell() -> None:
    scene = Scene(bottom_floor=3, floors=9, columns=5)
    grid = scene.grid()
    for floor in range(3, 12):
        for column in range(1, 6):
            assert grid.cell_of(*grid.cell_centre_px(floor, column)) == (floor, column)
    # The bottom-left corner region is the lowest floor's first column; outside the quad is no cell.
    x, y = grid.quad_px[3]
    assert grid.cell_of(float(x) + 2, float(y) - 2) == (3, 1)
    assert grid.cell_of(float(x) - 5, float(y) + 5) is None
    with pytest.raises(ValueError, match="not on the façade"):
        grid.cell_centre_px(12, 1)


def test_a_quad_in_pixels_maps_like_the_normalized_one() -> None:
    norm = SCENE.spec()
    pixels = FacadeSpec(quad=tuple((x * 640, y * 360) for x, y in SCENE.quad),  # type: ignore[arg-type]
                        floors=SCENE.floors, columns=SCENE.columns, normalized=False)
    a, b = norm.grid(640, 360), pixels.grid(640, 360)
    for xy in [(320.0, 180.0), (250.0, 40.0), (500.0, 300.0)]:
        assert a.cell_of(*xy) == b.cell_of(*xy)
    assert a.roi == b.roi


GOOD: dict[str, Any] = {"quad": ((0.3, 0.1), (0.7, 0.1), (0.8, 0.9), (0.2, 0.9)), "floors": 10, "columns": 4}


@pytest.mark.parametrize(("change", "match"), [
    ({"quad": ((0.3, 0.1), (0.7, 0.1), (0.8, 0.9))}, "4 corners"),
    ({"quad": ((0.7, 0.1), (0.3, 0.1), (0.2, 0.9), (0.8, 0.9))}, "right corners must be right"),
    ({"quad": ((0.2, 0.9), (0.8, 0.9), (0.7, 0.1), (0.3, 0.1))}, "bottom corners must be below"),
    ({"quad": ((0.3, 0.1), (0.7, 0.1), (0.2, 0.9), (0.8, 0.9))}, "right corners must be right"),
    ({"quad": ((0.1, 0.1), (0.9, 0.1), (0.8, 0.9), (0.5, 0.2))}, "not a convex"),
    ({"quad": ((30, 10), (70, 10), (80, 90), (20, 90))}, "normalized=False"),
    ({"quad": ((0.3, math.nan), (0.7, 0.1), (0.8, 0.9), (0.2, 0.9))}, "finite"),
    ({"floors": 0}, "floors must be an integer"),
    ({"floors": 2.5}, "floors must be an integer"),
    ({"columns": True}, "columns must be an integer"),
    ({"bottom_floor": "1"}, "bottom_floor must be an integer"),
    ({"floor_height_m": -3.0}, "floor_height_m"),
    ({"column_width_m": math.inf}, "column_width_m must be a finite number"),
    ({"roi": (0.5, 0.5, 0.4, 0.9)}, "x1 < x2"),
    ({"roi_margin": -0.1}, "roi_margin")])
def test_a_bad_facade_spec_says_what_is_wrong(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FacadeSpec(**(GOOD | change))


def test_a_facade_too_small_in_the_frame_is_refused() -> None:
    spec = FacadeSpec(**(GOOD | {"floors": 200}))
    with pytest.raises(ValueError, match="px per floor"):
        spec.grid(640, 360)
    with pytest.raises(ValueError, match="almost no pixels"):
        FacadeSpec(**(GOOD | {"roi": (1.2, 1.2, 1.4, 1.4)})).grid(640, 360)


@pytest.mark.parametrize(("change", "match"), [
    ({"min_blob_px": 50, "max_blob_px": 10}, "above max_blob_px"),
    ({"accel_band_g": (1.6, 0.4)}, "accel_band_g"),
    ({"min_points": 3}, "min_points must be an integer"),
    ({"max_tracks": 0}, "max_tracks"),
    ({"background_s": 0.0}, "background_s"),
    ({"gate_px": -1.0}, "gate_px must be positive"),
    ({"accel_sigmas": -1.0}, "accel_sigmas must not be negative")])
def test_bad_tuning_says_what_is_wrong(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ThrownParams(**change)
