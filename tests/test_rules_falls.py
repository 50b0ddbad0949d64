"""The fall rule core (FallRule): pose time series built from person.jpg's real MoveNet keypoints, through
the real tracker (on boxes around the keypoints), FallWindow and the real temporal fall head, on a simulated
clock; and the rule's own gates on hand-made poses and probabilities.

The motions are synthetic (no package ships a video of a fall), written here: the photo's skeleton toppled
sideways about the ankles, got up again, walked to and fro, sat down, bent over, squatted, with a little
keypoint noise, at camera detection rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.camera.rules.falls import FallCleared, FallConfirmed, FallEvent, FallRule, FallSpec
from edgeagent.drivers.camera.tracker import Track, Tracker
from edgeagent.models.decoders import fall, pose
from edgeagent.models.types import Box, Detection
from tests.media import MODELS, image

W, H = 640, 424  # person.jpg's size: the skeleton stays in its own pixels
PERSON_BOX = (188.0, 98.0, 278.0, 375.0)  # the person in person.jpg, hat to boots
FALL_AT = 5.0  # every fall starts here
Motion = Callable[[float], np.ndarray]
Head = Callable[[np.ndarray], np.ndarray]


def _session(name: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(MODELS / name), sess_options=options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def skeleton() -> np.ndarray:
    """person.jpg's keypoints as MoveNet finds them on the person's box (frame pixels, x, y, score)."""
    tensor, meta = pose.pose_input(image("person.jpg"), PERSON_BOX)
    found = pose.decode_movenet(_session("movenet-multipose.onnx").run(None, {"input": tensor})[0], meta)[0]
    best = pose.best_pose(found, PERSON_BOX)
    assert best is not None
    kp = pose.keypoints_array(best).astype(np.float64)
    assert (kp[:, 2] >= 0.2).sum() >= 12
    return kp


@pytest.fixture(scope="module")
def head() -> Head:
    session = _session("nfd-fall.onnx")
    return lambda x: fall.fall_probabilities(session.run(None, {"pose_history": x.astype(np.float32)})[0])


# --- motions ----------------------------------------------------------------------------------------------


def ease(x: float) -> float:
    """0 before 0, 1 after 1, a smooth S between."""
    x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


def turned(kp: np.ndarray, angle: float, about: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
    out = kp.copy()
    c, s = math.cos(angle), math.sin(angle)
    out[rows, :2] = (kp[rows, :2] - about) @ np.asarray([[c, s], [-s, c]]) + about
    return out


def motions(base: np.ndarray) -> dict[str, Motion]:
    height = float(base[[15, 16], 1].mean() - base[0, 1])
    ankles = base[[15, 16], :2].mean(axis=0)
    hips = base[[11, 12], :2].mean(axis=0)
    thigh = float(np.linalg.norm(base[[13, 14], :2].mean(axis=0) - hips))

    def falls(t: float) -> np.ndarray:  # topples sideways about the ankles in 0.5 s and stays down
        return turned(base, 1.45 * ease((t - FALL_AT) / 0.5), ankles)

    def falls_and_gets_up(t: float) -> np.ndarray:  # ... lies 3.5 s, gets up over 1.5 s from 9 s
        return turned(base, 1.45 * (ease((t - FALL_AT) / 0.5) - ease((t - 9.0) / 1.5)), ankles)

    def stands(t: float) -> np.ndarray:
        return base.copy()

    def walks(t: float) -> np.ndarray:  # a stride a second, to and fro across the frame (up to .33 heights/s)
        k = base.copy()
        g = math.sin(2 * math.pi * t)
        k[[13, 15], 0] += 0.07 * height * g
        k[[14, 16], 0] -= 0.07 * height * g
        k[15, 1] -= 0.04 * height * max(0.0, g)
        k[16, 1] -= 0.04 * height * max(0.0, -g)
        k[[7, 9], 0] -= 0.05 * height * g
        k[[8, 10], 0] += 0.05 * height * g
        k[:, 0] += 150.0 * math.sin(2 * math.pi * t / 12.0)
        return k

    def sits_down(t: float) -> np.ndarray:  # onto a seat over 2 s from 4 s: the hips drop most of a thigh
        p = ease((t - 4.0) / 2.0)
        k = base.copy()
        k[:13, 1] += 0.85 * thigh * p
        k[[13, 14], 1] -= 0.15 * thigh * p
        return k

    def bends_over(t: float) -> np.ndarray:  # 75 degrees forward at the hips over 1.5 s from 4 s, stays bent
        return turned(base, -1.3 * ease((t - 4.0) / 1.5), hips, slice(0, 11))

    def squats(t: float) -> np.ndarray:  # down to tie a shoe (almost half a height) for 3 s
        p = ease((t - 4.0) / 1.0) - ease((t - 8.0) / 1.0)
        k = base.copy()
        k[:13, 1] += 0.45 * height * p
        k[[13, 14], 1] += 0.22 * height * p
        k[[13, 14], 0] += np.asarray([-0.1, 0.1]) * height * p
        return k

    return {"falls": falls, "falls_and_gets_up": falls_and_gets_up, "stands": stands, "walks": walks,
            "sits_down": sits_down, "bends_over": bends_over, "squats": squats}


def box_around(kp: np.ndarray) -> Box:
    """A detector-like person box: the keypoints' extent, a little margin."""
    (x1, y1), (x2, y2) = kp[:, :2].min(axis=0), kp[:, :2].max(axis=0)
    mx, my = 0.1 * (x2 - x1) + 4.0, 0.05 * (y2 - y1) + 4.0
    return float(x1 - mx), float(y1 - my), float(x2 + mx), float(y2 + my)


def follow(head: Head, motion: Motion, *, fps: float = 5.0, seconds: float = 14.0, spec: FallSpec | None = None,
           until: float | None = None) -> tuple[list[tuple[float, FallEvent]], FallRule]:
    """A camera's detection ticks: the person's box through the real tracker, the pose of every matched or
    stationary person track into the rule, the windows it offers through the head. ``until``: the person
    leaves the picture then. Returns the events with their tick times, and the rule."""
    rng = np.random.default_rng(7)
    tracker, rule = Tracker(), FallRule(spec or FallSpec())
    out: list[tuple[float, FallEvent]] = []
    for i in range(int(seconds * fps) + 1):
        t = i / fps
        kp = motion(t)
        kp[:, :2] += rng.normal(0.0, 1.0, (17, 2))  # ~0.4% of the person's height
        seen = [] if until is not None and t >= until else [Detection("person", 0.8, box_around(kp))]
        update = tracker.update(seen, t)
        poses = {tr.id: kp for tr in update.tracks if tr.matched or tr.stationary}
        events = rule.update(update.tracks, poses, W, H, t)
        ready = rule.windows_ready()
        if ready:
            probs = head(np.stack([f for _, f in ready]))
            for (tid, _), p in zip(ready, probs, strict=True):
                events += rule.on_probabilities(tid, p, t)
        out += [(t, e) for e in events]
    return out, rule


# --- on the real head --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [5.0, 10.0])
def test_a_fall_confirms_once_and_getting_up_clears_it(head: Head, skeleton: np.ndarray, fps: float) -> None:
    # Seen at 5 fps: confirmed at 6.4 s (1.4 s after the fall began; fallen .98, counted since 6.0 s), the
    # person's track split twice by the tracker (fall, getting up) and handed over; cleared at 12.0 s, 2 s
    # after being up enough (four fifths of the height) again at ~10 s. At 10 fps: 6.3 s and 11.9 s; at
    # 25 fps 6.32 s and 11.84 s (no split there: the steps between frames are small enough for the tracker).
    events, rule = follow(head, motions(skeleton)["falls_and_gets_up"], fps=fps)
    kinds = [type(e) for _, e in events]
    assert kinds == [FallConfirmed, FallCleared]
    (t_fall, confirmed), (t_up, cleared) = events
    assert isinstance(confirmed, FallConfirmed) and isinstance(cleared, FallCleared)
    assert FALL_AT < confirmed.since_s <= confirmed.at_s == t_fall
    assert t_fall - FALL_AT <= 2.0  # well inside the ~3 s the fall stays in the head's window
    assert confirmed.probs[fall.FALL_CLASSES.index("fallen")] >= 0.7
    x1, y1, x2, y2 = confirmed.box
    assert x2 - x1 > y2 - y1  # the box of the person lying
    # up again (four fifths of the height, taller than wide) from about 9.8 s, upright at 10.5 s
    assert cleared.reason == "recovered" and 9.0 + FallSpec().recover_s <= t_up <= 10.5 + FallSpec().recover_s
    assert rule.stats()["handovers"] >= 1 and rule.falling() == []


def test_lying_on_stays_confirmed_once(head: Head, skeleton: np.ndarray) -> None:
    # After 4 s lying still the head reads "normal" again (it keys on the transition): nothing more happens.
    events, rule = follow(head, motions(skeleton)["falls"], seconds=20.0)
    assert [type(e) for _, e in events] == [FallConfirmed]
    assert len(rule.falling()) == 1


def test_the_person_leaving_the_picture_ends_the_episode(head: Head, skeleton: np.ndarray) -> None:
    events, _ = follow(head, motions(skeleton)["falls"], seconds=14.0, until=10.0)
    assert [type(e) for _, e in events] == [FallConfirmed, FallCleared]
    cleared = events[1][1]
    assert isinstance(cleared, FallCleared) and cleared.reason == "track_ended"


@pytest.mark.parametrize("name", ["stands", "walks", "sits_down", "bends_over", "squats"])
def test_everyday_motions_never_confirm(head: Head, skeleton: np.ndarray, name: str) -> None:
    # Seen (highest fallen / descending over every head run): stands .01/.03, walks .03/.31, sits down
    # .01/.03, bends over .02/.98 ("descending" is no fall signal), squats .01/.03.
    events, rule = follow(head, motions(skeleton)[name])
    assert events == []
    assert rule.stats()["head_windows"] >= 40  # the head did run on them: 5 a second once windows were full


def test_without_the_handover_the_tracker_split_loses_the_fall(head: Head, skeleton: np.ndarray) -> None:
    # Why the handover exists: the tracker will not match a box whose width or height changes more than
    # twofold, so the falling person's track coasts and a new one starts for the person lying, whose own
    # window holds only lying still (the head reads "normal").
    events, rule = follow(head, motions(skeleton)["falls"], spec=FallSpec(handover_s=0.0))
    assert events == [] and rule.stats()["handovers"] == 0


# --- the rule's own gates, on hand-made poses and probabilities -------------------------------------------

UPRIGHT = np.column_stack([np.full(17, 300.0) + np.tile([-20.0, 20.0], 9)[:17], np.linspace(100.0, 380.0, 17),
                           np.full(17, 0.9)])  # 280 px tall, 40 px wide
LYING = np.column_stack([np.linspace(160.0, 440.0, 17), np.full(17, 360.0) + np.tile([-15.0, 15.0], 9)[:17],
                         np.full(17, 0.9)])  # 280 px wide, 30 px tall
SITTING_UP = np.column_stack([np.full(17, 300.0) + np.tile([-30.0, 30.0], 9)[:17], np.linspace(220.0, 360.0, 17),
                              np.full(17, 0.9)])  # 140 px tall, 60 px wide: half the standing height


def person(tid: int, box: Box, t: float, *, matched: bool = True, stationary: bool = False,
           label: str = "person", first_seen: float = 0.0, last_seen: float | None = None) -> Track:
    seen = t if matched else first_seen if last_seen is None else last_seen
    return Track(id=tid, label=label, box=box, score=0.8, max_score=0.8, hits=3, first_seen_s=first_seen,
                 last_seen_s=seen, confirmed=True, stationary=stationary,
                 matched=matched, velocity=(0.0, 0.0), history=(), detection=Detection(label, 0.8, box))


def probs(fallen: float, descending: float = 0.0) -> list[float]:
    return [1.0 - fallen - descending, descending, fallen, 0.0]


def lying_rule(spec: FallSpec | None = None) -> FallRule:
    """A rule following person 1, who stood for 2 s and now lies (poses pushed at 5 fps)."""
    rule = FallRule(spec or FallSpec())
    for i in range(16):
        t = i / 5
        rule.update([person(1, box_around(UPRIGHT if t < 2.0 else LYING), t)],
                    {1: UPRIGHT if t < 2.0 else LYING}, W, H, t)
    return rule


def test_m_of_n_high_outputs_confirm() -> None:
    rule = lying_rule()
    assert rule.on_probabilities(1, probs(0.9), 3.0) == []
    assert rule.on_probabilities(1, probs(0.2), 3.2) == []
    assert rule.on_probabilities(1, probs(0.9), 3.4) == []
    [confirmed] = rule.on_probabilities(1, probs(0.8), 3.6)  # 3 of the last 4 (of 5), over 0.6 s
    assert isinstance(confirmed, FallConfirmed) and confirmed.since_s == 3.0 and confirmed.at_s == 3.6
    assert rule.on_probabilities(1, probs(0.99), 3.8) == []  # once per episode
    assert rule.stats()["confirmed"] == 1


def test_high_outputs_too_far_apart_do_not_confirm() -> None:
    rule = lying_rule()
    outs = [0.9, 0.1, 0.1, 0.9, 0.1, 0.1, 0.9, 0.1, 0.1, 0.9]  # never 3 within 5 outputs
    assert all(rule.on_probabilities(1, probs(p), 3.0 + 0.2 * k) == [] for k, p in enumerate(outs))


def test_a_burst_of_outputs_does_not_stand_in_for_time() -> None:
    rule = lying_rule()
    for k in range(4):  # four high outputs 0.1 s apart: 0.3 s only from the 4th
        events = rule.on_probabilities(1, probs(0.9), 3.0 + 0.1 * k)
        assert (events != []) == (k == 3)


def test_descending_is_not_a_fall() -> None:
    rule = lying_rule()
    assert all(rule.on_probabilities(1, probs(0.05, descending=0.94), 3.0 + 0.2 * k) == [] for k in range(10))


def test_high_outputs_for_a_person_still_up_do_not_confirm() -> None:
    rule = FallRule()
    for i in range(16):
        rule.update([person(1, box_around(UPRIGHT), i / 5)], {1: UPRIGHT}, W, H, i / 5)
    assert all(rule.on_probabilities(1, probs(0.95), 3.2 + 0.2 * k) == [] for k in range(8))
    # the same outputs once the person lies: confirmed on the next one
    rule.update([person(1, box_around(LYING), 5.0)], {1: LYING}, W, H, 5.0)
    assert [type(e) for e in rule.on_probabilities(1, probs(0.95), 5.0)] == [FallConfirmed]


def test_recovery_needs_recover_s_up() -> None:
    rule = lying_rule()
    for k in range(3):
        rule.on_probabilities(1, probs(0.9), 3.0 + 0.2 * k)
    assert rule.falling() == [1]
    # up for 1 s, down again, sitting up on the floor for 3 s (taller than wide, but half the standing
    # height), then up for good from 8.0 s
    phases = [(UPRIGHT, 5), (LYING, 2), (SITTING_UP, 15), (UPRIGHT, 15)]
    got: list[tuple[float, FallEvent]] = []
    k = 0
    for kp, ticks in phases:
        for _ in range(ticks):
            k += 1
            t = 3.4 + 0.2 * k
            got += [(t, e) for e in rule.update([person(1, box_around(kp), t)], {1: kp}, W, H, t)]
    assert len(got) == 1 and isinstance(got[0][1], FallCleared) and got[0][1].reason == "recovered"
    assert got[0][0] == pytest.approx(3.4 + 0.2 * 23 + 2.0)  # up for good from 8.0 s
    assert rule.falling() == []


def test_windows_are_offered_at_the_head_rate() -> None:
    rule = FallRule()
    offered: list[float] = []
    for i in range(251):  # 10 s of poses at 25 fps
        t = i / 25
        rule.update([person(1, box_around(UPRIGHT), t)], {1: UPRIGHT + np.asarray([2.0 * t, 0.0, 0.0])}, W, H, t)
        offered += [t for _ in rule.windows_ready()]
    assert offered[0] >= (fall.FALL_FRAMES - 1) / fall.FALL_FPS - 1e-9  # not before the window holds 4 s
    gaps = np.diff(offered)
    assert (gaps >= FallSpec().head_every_s - 1e-6).all() and (gaps <= FallSpec().head_every_s + 0.04 + 1e-6).all()
    assert rule.stats()["head_windows"] == len(offered)


def test_people_are_capped() -> None:
    rule = FallRule(FallSpec(max_people=3))
    boxes = [(40.0 + 110 * k, 100.0, 120.0 + 110 * k, 380.0) for k in range(5)]
    rule.update([person(k + 1, boxes[k], 0.0) for k in range(3)], {}, W, H, 0.0)
    # person 1 falls and is confirmed; then 4 and 5 arrive: the oldest others (2, then 3) are dropped
    for i in range(1, 16):
        t = i / 5
        rule.update([person(k + 1, boxes[k], t) for k in range(3)], {1: LYING, 2: UPRIGHT, 3: UPRIGHT}, W, H, t)
    for k in range(3):
        rule.on_probabilities(1, probs(0.9), 3.0 + 0.2 * k)
    assert rule.falling() == [1]
    rule.update([person(k + 1, boxes[k], 4.0, first_seen=4.0 if k >= 3 else 0.0) for k in range(5)], {}, W, H, 4.0)
    assert rule.stats()["people"] == 3 and rule.stats()["dropped"] == 2 and rule.falling() == [1]


def test_what_the_rule_ignores_or_counts() -> None:
    rule = FallRule()
    box = box_around(UPRIGHT)
    few = UPRIGHT.copy()
    few[6:, 2] = 0.05  # 6 keypoints seen: pushed; 5 would not be
    fewer = UPRIGHT.copy()
    fewer[5:, 2] = 0.05
    rule.update([person(1, box, 0.0), person(2, box, 0.0, label="dog")], {1: few, 2: UPRIGHT}, W, H, 0.0)
    rule.update([person(1, box, 0.2)], {1: fewer}, W, H, 0.2)
    rule.update([person(1, box, 0.4)], {1: np.zeros((16, 3))}, W, H, 0.4)
    rule.update([person(1, box, 0.6)], {1: np.full((17, 3), np.nan)}, W, H, 0.6)
    rule.update([person(1, box, 0.8, matched=False)], {1: UPRIGHT}, W, H, 0.8)  # coasting: a predicted box
    stats = rule.stats()
    assert stats["people"] == 1 and stats["poor_poses"] == 1 and stats["bad_poses"] == 2
    assert stats["coasting_poses"] == 1
    assert rule.on_probabilities(99, probs(0.9), 1.0) == [] and rule.stats()["late_outputs"] == 1
    with pytest.raises(ValueError):
        rule.on_probabilities(1, [0.5, 0.5], 1.0)
    with pytest.raises(ValueError):
        rule.on_probabilities(1, [np.nan, 0.0, 1.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="back"):
        rule.update([], {}, W, H, 0.5)
    bads: list[dict[str, Any]] = [{"min_high": 6}, {"threshold": 0.0}, {"low_share": 0.9}, {"max_people": 0},
                                  {"recover_s": -1.0}, {"reference": "box"}]
    for bad in bads:
        with pytest.raises(ValueError):
            FallSpec(**bad)


def test_a_stationary_person_never_hands_over_their_fall() -> None:
    # A helper kneels beside a person lying still (stationary, not re-detected this tick): the helper's new
    # track must not take over the fall.
    rule = lying_rule()
    for k in range(3):
        rule.on_probabilities(1, probs(0.9), 3.0 + 0.2 * k)
    lying_box = box_around(LYING)
    helper_box = (lying_box[0] + 60, 200.0, lying_box[0] + 160, 380.0)
    rule.update([person(1, lying_box, 4.0, matched=False, stationary=True, last_seen=3.8),
                 person(2, helper_box, 4.0, first_seen=3.9)], {}, W, H, 4.0)
    assert rule.falling() == [1] and rule.stats()["handovers"] == 0
    # the same helper beside a track that merely coasts (the tracker split it) takes the state over
    rule = lying_rule()
    for k in range(3):
        rule.on_probabilities(1, probs(0.9), 3.0 + 0.2 * k)
    rule.update([person(1, lying_box, 4.0, matched=False, last_seen=3.8),
                 person(2, helper_box, 4.0, first_seen=3.9)], {}, W, H, 4.0)
    assert rule.falling() == [2] and rule.stats()["handovers"] == 1


# --- random sequences ----------------------------------------------------------------------------------

op = st.tuples(st.sampled_from([0.1, 0.2, 0.2, 0.5, 1.5]),  # dt
               st.lists(st.tuples(st.integers(1, 6), st.sampled_from(["up", "lying", "none"]), st.booleans(),
                                  st.booleans()), max_size=4, unique_by=lambda x: x[0]),
               st.lists(st.floats(0.0, 1.0), max_size=3))


@settings(max_examples=150, deadline=None)
@given(st.lists(op, min_size=1, max_size=60))
def test_random_sequences_keep_the_episode_invariants(ops: list[tuple[float, list[tuple[int, str, bool, bool]],
                                                                      list[float]]]) -> None:
    """People appear, coast, vanish, stand and lie; the head answers anything. Never more than max_people
    followed, never a second confirmation while an episode is open, never a clear without an episode."""
    spec = FallSpec(max_people=3, handover_s=0.5)
    rule = FallRule(spec)
    now = 0.0
    confirmations = clears = 0
    first_seen: dict[int, float] = {}
    for dt, people, fallen in ops:
        now += dt
        tracks, poses = [], {}
        for tid, shape, matched, stationary in people:
            kp = UPRIGHT if shape == "up" else LYING
            first_seen.setdefault(tid, now)
            tracks.append(person(tid, box_around(kp) if shape != "none" else (0.0, 0.0, 50.0, 50.0), now,
                                 matched=matched, stationary=stationary, first_seen=first_seen[tid]))
            if shape != "none":
                poses[tid] = kp + np.asarray([now, 0.0, 0.0])
        before = set(rule.falling())
        events = rule.update(tracks, poses, W, H, now)
        ready = rule.windows_ready()
        for (tid, features), p in zip(ready, fallen, strict=False):
            assert features.shape == (32, 60) and np.isfinite(features).all()
            events += rule.on_probabilities(tid, probs(p), now)
        confirmed = [e.track_id for e in events if isinstance(e, FallConfirmed)]
        assert len(confirmed) == len(set(confirmed)) and not set(confirmed) & before
        assert rule.stats()["people"] + rule.stats()["ended"] <= spec.max_people
        assert set(rule.falling()) <= {t.id for t in tracks}
        confirmations += len(confirmed)
        clears += sum(isinstance(e, FallCleared) for e in events)
        assert clears <= confirmations and confirmations - clears >= len(rule.falling())
