"""The lift-blocker rule core (EbikeLiftRule): hand-built track sequences with a simulated clock, random
sequences (hypothesis) against its safety invariants, and the real detector and tracker on a synthetic lift
car with the real motorcycle photo (and the real person photo) pasted in."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.camera.rules.ebike import (
    Announce,
    EbikeAction,
    EbikeLiftRule,
    EbikeLiftSpec,
    HoldDoor,
    RaiseAlarm,
    ResolveAlarm,
)
from edgeagent.drivers.camera.tracker import Track, Tracker
from edgeagent.models.manifest import load_manifest
from edgeagent.models.preprocess import prepare
from edgeagent.models.registry import get_decoder
from edgeagent.models.types import Box, Detection
from tests.media import MODELS, image

W, H = 640, 480
FPS = 5  # detection ticks a second, as the camera pipeline runs; tick i is at i / FPS seconds (exact)
# The car's floor: the lower half of the frame, narrowing towards the back wall.
ZONE = ((0.1, 0.5), (0.9, 0.5), (1.0, 1.0), (0.0, 1.0))
SPEC = EbikeLiftSpec(zone=ZONE, max_hold_s=10.0, alarm_timeout_s=30.0, rearm_s=8.0)

BIKE: Box = (170.0, 250.0, 470.0, 450.0)  # 300 x 200: 19.5% of the frame, half its width, 1.5:1
BIKE_BESIDE: Box = (20.0, 270.0, 300.0, 455.0)  # a second bike's place (IoU .26 with BIKE)
AT_DOOR: Box = (380.0, 60.0, 600.0, 215.0)  # on the landing seen through the door: bottom above the floor
PRAM: Box = (300.0, 280.0, 350.0, 450.0)  # small (2.8%) and narrow (.29): a pram or a person misread
PERSON: Box = (260.0, 120.0, 380.0, 460.0)


def track(tid: int, box: Box, t: float, *, label: str = "motorcycle", score: float = 0.8, matched: bool = True,
          stationary: bool = False) -> Track:
    return Track(id=tid, label=label, box=box, score=score, max_score=score, hits=5, first_seen_s=0.0,
                 last_seen_s=t, confirmed=True, stationary=stationary, matched=matched, velocity=(0.0, 0.0),
                 history=(), detection=Detection(label, score, box))


Scene = Callable[[int, float], list[Track]]
A = TypeVar("A", HoldDoor, Announce, RaiseAlarm, ResolveAlarm)


def run(rule: EbikeLiftRule, scene: Scene, ticks: range) -> list[tuple[int, list[EbikeAction]]]:
    """Feed ``scene(i, t)``'s tracks at tick i; the ticks that returned actions, with them."""
    out = []
    for i in ticks:
        actions = rule.update(scene(i, i / FPS), W, H, i / FPS)
        if actions:
            out.append((i, actions))
    return out


def of(kind: type[A], found: Sequence[tuple[int, list[EbikeAction]]]) -> list[tuple[int, A]]:
    """The actions of one kind, with their ticks."""
    return [(i, a) for i, actions in found for a in actions if isinstance(a, kind)]


# --- confirmation --------------------------------------------------------------------------------------


def test_motorcycle_entering_confirms_once_and_releases_when_it_leaves() -> None:
    def scene(i: int, t: float) -> list[Track]:
        if i == 0:
            return [track(1, AT_DOOR, t)]  # seen on the landing first: outside the car
        if i <= 15:
            return [track(1, BIKE, t)]  # in the car from tick 1 (0.2 s) to tick 15 (3.0 s)
        if i == 16:
            return [track(1, AT_DOOR, t)]  # wheeled out
        return []  # gone

    rule = EbikeLiftRule(SPEC)
    found = run(rule, scene, range(40))
    # tick 1 is the first good observation; dwell 0.6 s and 3 of 5 good: confirmed on tick 4 (0.8 s), the
    # 4th good observation, with the door first, in one update.
    assert found[0] == (4, [HoldDoor(True, "confirmed"), Announce(True, "confirmed"),
                            RaiseAlarm(1, "motorcycle", 0.8, BIKE, since_s=0.2, at_s=0.8)])
    # last seen in the car at tick 15 (3.0 s); clear_s 2 s later (tick 25) everything is released
    assert found[1:] == [(25, [HoldDoor(False, "left"), Announce(False, "left"), ResolveAlarm("left", 1, 5.0)])]
    assert not rule.alarm_open and rule.stats()["alarms"] == 1 and rule.stats()["left"] == 1


def test_a_gap_shorter_than_clear_s_does_not_release() -> None:
    # Hidden by people (coasting, then not passed at all): seen last at 1.8 s, again at 3.6 s; one hold.
    def scene(i: int, t: float) -> list[Track]:
        if 10 <= i < 14:
            return [track(1, BIKE, t, matched=False)]
        if 14 <= i < 18:
            return []
        return [track(1, BIKE, t)] if i < 40 else []

    found = run(EbikeLiftRule(SPEC), scene, range(60))
    assert [(i, a.on) for i, a in of(HoldDoor, found)] == [(3, True), (49, False)]  # 7.8 s + clear_s
    assert len(of(RaiseAlarm, found)) == 1


def test_observations_count_not_ticks() -> None:
    # The pipeline looks at a standing object every other tick: unmatched ticks neither help nor hurt.
    scene: Scene = lambda i, t: [track(1, BIKE, t, matched=i % 2 == 0)]  # noqa: E731
    found = run(EbikeLiftRule(SPEC), scene, range(20))
    # good observations at ticks 0, 2, 4: 3 good and 0.8 s >= dwell on tick 4
    assert [(i, type(a)) for i, a in of(RaiseAlarm, found)] == [(4, RaiseAlarm)]


def test_a_person_pushing_a_bike_triggers_on_the_bike() -> None:
    def scene(i: int, t: float) -> list[Track]:
        return [track(7, PERSON, t, label="person", score=0.9), track(8, BIKE, t, label="bicycle", score=0.6)]

    found = run(EbikeLiftRule(SPEC), scene, range(10))
    raised = of(RaiseAlarm, found)
    assert len(raised) == 1 and raised[0][1] == RaiseAlarm(8, "bicycle", 0.6, BIKE, since_s=0.0, at_s=0.6)


def test_people_alone_never_trigger() -> None:
    def scene(i: int, t: float) -> list[Track]:  # two people standing and shuffling about for a minute
        dx = 20.0 * np.sin(i / 7.0)
        return [track(1, (PERSON[0] + dx, *PERSON[1:]), t, label="person", score=0.95),
                track(2, (60.0, 100.0, 200.0, 470.0), t, label="person", score=0.9, stationary=i > 25)]

    rule = EbikeLiftRule(SPEC)
    assert run(rule, scene, range(300)) == []
    assert rule.stats()["tracks"] == 0  # people are not even followed


@pytest.mark.parametrize(("box", "score", "why"), [
    (PRAM, 0.9, "pram-sized and narrow"),
    ((280.0, 330.0, 380.0, 450.0), 0.9, "pram-sized, bike-like aspect (3.9% of the frame)"),
    ((290.0, 130.0, 370.0, 450.0), 0.9, "big enough, but a sliver (w/h .25)"),
    ((20.0, 400.0, 620.0, 450.0), 0.9, "big enough, but a flat strip (w/h 12)"),
    (BIKE, 0.4, "bike-sized, score below min_score"),
    (AT_DOOR, 0.9, "bike-sized, on the landing (outside the car zone)"),
])
def test_implausible_bicycles_never_trigger(box: Box, score: float, why: str) -> None:
    rule = EbikeLiftRule(SPEC)
    scene: Scene = lambda i, t: [track(1, box, t, label="bicycle", score=score)]  # noqa: E731
    assert run(rule, scene, range(100)) == [], why
    # the same track with the bike's box and score confirms: the gate under test is the one that held it
    rule = EbikeLiftRule(SPEC)
    good: Scene = lambda i, t: [track(1, BIKE, t, label="bicycle", score=0.9)]  # noqa: E731
    assert len(of(RaiseAlarm, run(rule, good, range(10)))) == 1


def test_flickers_never_trigger() -> None:
    # A detector flicker: a bike-like track seen on one tick, gone the next (every 2 s a new one), then one
    # seen on 3 ticks: each fails the consistency or the dwell.
    def scene(i: int, t: float) -> list[Track]:
        if i < 100:
            return [track(100 + i, BIKE, t)] if i % 10 == 0 else []
        return [track(500, BIKE, t)] if i < 103 else []

    rule = EbikeLiftRule(SPEC)
    assert run(rule, scene, range(120)) == []


def test_inconsistent_track_does_not_trigger_until_it_is_consistent() -> None:
    # Good one observation in three (a pram read as a big bicycle now and then): never 3 of the last 5.
    def scene(i: int, t: float) -> list[Track]:
        return [track(1, BIKE if i % 3 == 0 else PRAM, t, label="bicycle")] if i < 60 else [track(1, BIKE, t)]

    rule = EbikeLiftRule(replace(SPEC, classes=frozenset({"bicycle", "motorcycle"})))
    found = run(rule, scene, range(70))
    # from tick 60 on every observation is good: 3 of 5 on tick 61 or 62 (tick 60 itself was good)
    assert [i for i, _ in of(RaiseAlarm, found)] == [61]


def test_site_class() -> None:
    scene: Scene = lambda i, t: [track(1, BIKE, t, label="e-bike")]  # noqa: E731
    assert run(EbikeLiftRule(SPEC), scene, range(20)) == []
    found = run(EbikeLiftRule(replace(SPEC, site_class="e-bike")), scene, range(20))
    assert [(i, a.label) for i, a in of(RaiseAlarm, found)] == [(3, "e-bike")]


# --- timeouts and release ------------------------------------------------------------------------------


def test_max_hold_releases_the_door_and_keeps_the_alarm() -> None:
    # The bike stays 20 s (stationary after 5 s, re-checked every 5 s as the pipeline does), a second bike
    # comes in at 15 s, both gone from 20 s.
    def scene(i: int, t: float) -> list[Track]:
        if i >= 100:
            return []
        stationary = i >= 25
        tracks = [track(1, BIKE, t, matched=not stationary or i % 25 == 0, stationary=stationary)]
        if i >= 75:
            tracks.append(track(2, BIKE_BESIDE, t))
        return tracks

    rule = EbikeLiftRule(SPEC)
    found = run(rule, scene, range(130))
    # raised at tick 3 (0.6 s); door released 10 s later (tick 53) alone: the alarm stays open, announcing
    assert [(i, a) for i, a in of(HoldDoor, found)] == [(3, HoldDoor(True, "confirmed")),
                                                       (53, HoldDoor(False, "max_hold"))]
    assert found[1] == (53, [HoldDoor(False, "max_hold")])
    # the second bike joined the open alarm: no second alarm, no second hold; both gone at 20 s: 'left'
    assert found[2:] == [(109, [Announce(False, "left"), ResolveAlarm("left", 1, 21.8)])]  # 19.8 s + clear_s
    assert rule.stats()["max_hold"] == 1


def test_timers_run_without_frames() -> None:
    # The camera stops delivering after the alarm: tick() at next_deadline_s() releases the door in time,
    # then resolves the alarm as 'timeout'.
    rule = EbikeLiftRule(SPEC)
    run(rule, lambda i, t: [track(1, BIKE, t)], range(4))
    assert rule.door_held and rule.next_deadline_s() == pytest.approx(0.6 + 10.0)
    deadline = rule.next_deadline_s()
    assert deadline is not None
    assert rule.tick(deadline - 0.01) == []
    assert rule.tick(deadline) == [HoldDoor(False, "max_hold")]
    assert rule.alarm_open and rule.announcing and not rule.door_held
    deadline = rule.next_deadline_s()
    assert deadline == pytest.approx(0.6 + 30.0)
    assert rule.tick(deadline) == [Announce(False, "timeout"), ResolveAlarm("timeout", 1, deadline)]
    assert rule.next_deadline_s() is None and rule.tick(deadline + 100) == []


def test_alarm_timeout_suppresses_the_standing_bike_until_it_leaves() -> None:
    def scene(i: int, t: float) -> list[Track]:
        if i < 250:  # stands 50 s; the tracker loses it at 40 s and finds it again as track 2
            return [track(1 if i < 200 else 2, BIKE, t)]
        if i < 280:
            return []  # gone 6 s
        return [track(3, AT_DOOR if i == 280 else BIKE, t)]  # a new arrival through the door

    rule = EbikeLiftRule(SPEC)
    found = run(rule, scene, range(300))
    assert [(i, a) for i, a in of(ResolveAlarm, found)] == [(153, ResolveAlarm("timeout", 1, 30.6))]
    assert [(i, a.track_id) for i, a in of(RaiseAlarm, found)] == [(3, 1), (284, 3)]
    assert rule.stats()["suppressed_confirmations"] > 0  # tracks 1 and 2 were confirmable and held back


def test_guard_release_rearms_after_the_delay() -> None:
    rule = EbikeLiftRule(SPEC)
    run(rule, lambda i, t: [track(1, BIKE, t)], range(10))
    assert rule.release(2.0, "guard-7") == [HoldDoor(False, "guard_release"), Announce(False, "guard_release"),
                                            ResolveAlarm("guard_release", 1, 2.0, "guard-7")]
    assert rule.release(2.0, "guard-7") == []  # nothing open any more

    def scene(i: int, t: float) -> list[Track]:  # the same bike stays; re-found as track 2 at 5 s
        return [track(1 if i < 25 else 2, BIKE, t)]

    found = run(rule, scene, range(10, 80))
    # suppressed for rearm_s (8 s): the first observation at or after 10.0 s raises again, for track 2
    assert [(i, a.track_id) for i, a in of(RaiseAlarm, found)] == [(50, 2)]


def test_guard_release_does_not_hold_back_a_new_arrival() -> None:
    rule = EbikeLiftRule(SPEC)
    run(rule, lambda i, t: [track(1, BIKE, t)], range(10))
    rule.release(2.0, "guard-7")

    def scene(i: int, t: float) -> list[Track]:
        tracks = [track(1, BIKE, t)]
        if i >= 15:  # 3.0 s: a second bike comes in through the door and stops beside the first
            tracks.append(track(2, AT_DOOR if i == 15 else BIKE_BESIDE, t, label="bicycle"))
        return tracks

    found = run(rule, scene, range(10, 30))
    assert [(i, a.track_id) for i, a in of(RaiseAlarm, found)] == [(19, 2)]


def test_spec_is_checked() -> None:
    bads: list[dict[str, Any]] = [
        {"zone": ((0.0, 0.0), (1.0, 0.0))}, {"zone": ((0.0, 0.0), (1.5, 0.0), (0.0, 1.0))}, {"min_good": 6},
        {"min_good": 0}, {"min_aspect": 2.0, "max_aspect": 1.0}, {"alarm_timeout_s": 5.0}, {"max_hold_s": 0.0},
        {"dwell_s": float("nan")}, {"classes": frozenset()}, {"same_object_iou": 0.0}]
    for bad in bads:
        with pytest.raises(ValueError):
            replace(SPEC, **bad)
    rule = EbikeLiftRule(SPEC)
    rule.update([], W, H, 5.0)
    with pytest.raises(ValueError, match="back"):
        rule.update([], W, H, 4.0)
    with pytest.raises(ValueError):
        rule.update([], 0, H, 6.0)


# --- random sequences ----------------------------------------------------------------------------------

PLACES: list[Box] = [BIKE, BIKE_BESIDE, AT_DOOR, PRAM, PERSON]
LABELS = {1: "motorcycle", 2: "bicycle", 3: "bicycle", 4: "person"}  # one label per id, as the tracker gives
INSIDE = {BIKE, BIKE_BESIDE, PRAM, PERSON}  # bottom-centres on the car floor
EPS = 1e-6  # the rule's time resolution

seen_track = st.tuples(st.sampled_from(sorted(LABELS)), st.sampled_from(range(len(PLACES))), st.booleans(),
                       st.booleans(), st.sampled_from([0.3, 0.6, 0.9]))
# A step holds a scene for `repeat` ticks `dt` apart (so presences last), or a guard presses release.
step: st.SearchStrategy[tuple[str, float, int, list[Any]]] = st.one_of(
    st.tuples(st.just("update"), st.sampled_from([0.2, 0.2, 0.4, 1.0, 3.0]), st.integers(1, 40),
              st.lists(seen_track, max_size=3, unique_by=lambda s: s[0])),
    st.tuples(st.just("release"), st.sampled_from([0.0, 0.5]), st.just(1), st.just([])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, min_size=1, max_size=40))
def test_random_sequences_keep_the_safety_invariants(steps: list[tuple[str, float, int, list[Any]]]) -> None:
    """The caller ticks the rule at each deadline between frames. Never: a hold without an alarm in the same
    update, a hold longer than max_hold_s, a second hold or alarm before the first ended, an alarm for a bike
    of a presence that was timed out or released by a guard (before rearm_s) while it has not been gone for
    clear_s."""
    spec = replace(SPEC, dwell_s=0.4, max_hold_s=6.0, alarm_timeout_s=14.0, rearm_s=5.0)
    rule = EbikeLiftRule(spec)
    now = 0.0  # a sum of float steps, as a monotonic clock's readings are; the rule counts to the microsecond
    held_since: float | None = None
    open_alarm = False
    in_episode: set[int] = set()  # bikes seen in the car during the open alarm
    held_back: list[tuple[set[int], float | None, list[float]]] = []  # ids, until, [last seen in the car]

    def check(actions: list[EbikeAction], at: float, from_update: bool) -> None:
        nonlocal held_since, open_alarm, in_episode
        kinds = [type(a) for a in actions]
        for a in actions:
            if isinstance(a, HoldDoor):
                if a.on:
                    assert held_since is None and from_update and RaiseAlarm in kinds, "a hold without an alarm"
                    held_since = at
                else:
                    assert held_since is not None, "release of a door not held"
                    assert at - held_since <= spec.max_hold_s + EPS, "door held too long"
                    held_since = None
            elif isinstance(a, RaiseAlarm):
                assert not open_alarm, "a second alarm while one is open"
                assert not any(a.track_id in ids for ids, _, _ in held_back), "the same presence raised twice"
                open_alarm = True
                in_episode = {a.track_id}
            elif isinstance(a, ResolveAlarm):
                assert open_alarm
                open_alarm = False
                if a.reason != "left":
                    until = at + spec.rearm_s if a.reason == "guard_release" else None
                    held_back.append((set(in_episode), until, [at]))
        if held_since is not None:
            assert at - held_since <= spec.max_hold_s + EPS

    for kind, dt, repeat, seen in steps:
        for _ in range(repeat):
            now += dt
            while (deadline := rule.next_deadline_s()) is not None and deadline <= now:
                check(rule.tick(deadline), deadline, False)
                after = rule.next_deadline_s()
                assert after is None or after > deadline, "a deadline that tick() does not consume"
            if kind == "release":
                check(rule.release(now, "guard"), now, False)
                continue
            tracks = [track(tid, PLACES[p], now, label=LABELS[tid], matched=m, stationary=s, score=sc)
                      for tid, p, m, s, sc in seen]
            in_car = {t.id for t in tracks
                      if t.label != "person" and t.box in INSIDE and (t.matched or t.stationary)}
            for ids, _, last in held_back:
                if ids & in_car:
                    last[0] = now
            held_back[:] = [(ids, until, last) for ids, until, last in held_back
                            if not ((until is not None and now >= until - EPS) or now - last[0] >= spec.clear_s - EPS)]
            check(rule.update(tracks, W, H, now), now, True)
            if open_alarm:
                in_episode |= in_car


# --- the real detector on a synthetic lift car -----------------------------------------------------------

CAR = EbikeLiftSpec(zone=((0.15, 0.5), (0.85, 0.5), (1.0, 1.0), (0.0, 1.0)))


@pytest.fixture(scope="module")
def detect() -> Callable[[np.ndarray], list[Detection]]:
    """NanoDet in this process (the engine runs the same preprocessing and decoder in its worker)."""
    manifest = load_manifest(MODELS / "nanodet.yaml")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(MODELS / "nanodet.onnx"), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    decode = get_decoder("nanodet")

    def run_it(frame: np.ndarray) -> list[Detection]:
        tensor, meta = prepare([frame], manifest)
        return decode(dict(zip(names, session.run(None, {session.get_inputs()[0].name: tensor}), strict=True)),
                      meta, manifest)[0]

    return run_it


def lift_car() -> np.ndarray:
    """A lift car seen from a ceiling corner: brushed grey walls with panel seams, a handrail, a darker floor,
    the landing door's steel frame on the right-hand wall (bikes come in from the right)."""
    rng = np.random.default_rng(11)
    img = np.full((H, W, 3), 168, np.uint8)
    img[:, :, 0] = 172  # a slightly cool steel grey
    cv2.fillConvexPoly(img, np.array([[0, H], [W, H], [544, 240], [96, 240]]), (118, 120, 124))
    for x in (200, 320, 440):  # back wall seams
        cv2.line(img, (x, 0), (x, 240), (146, 146, 150), 2)
    cv2.line(img, (96, 0), (96, 240), (120, 120, 124), 3)  # the corners
    cv2.line(img, (544, 0), (544, 240), (120, 120, 124), 3)
    cv2.line(img, (110, 170), (530, 170), (95, 95, 98), 5)  # handrail
    door = np.array([[560, 20], [640, 0], [640, 400], [560, 280]])  # the door frame, in perspective
    cv2.polylines(img, [door], isClosed=True, color=(60, 60, 64), thickness=9)
    cv2.fillConvexPoly(img, np.array([[20, 60], [70, 70], [70, 150], [20, 150]]), (90, 92, 96))  # button panel
    noise = rng.normal(0.0, 3.0, img.shape)
    return np.clip(img.astype(np.float64) + noise, 0, 255).astype(np.uint8)


@functools.cache
def cutout(name: str, rect: tuple[int, int, int, int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """The object inside ``rect`` (x, y, w, h) of a media photo, separated from its background with GrabCut,
    cropped to the rectangle and scaled to ``width``: (pixels, mask)."""
    photo = image(name)
    mask = np.zeros(photo.shape[:2], np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(photo, mask, rect, bgd, fgd, 5, cv2.GC_INIT_WITH_RECT)
    fg = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8)
    x, y, w, h = rect
    height = round(h * width / w)
    pixels = cv2.resize(photo[y:y + h, x:x + w], (width, height), interpolation=cv2.INTER_AREA)
    return np.asarray(pixels, np.uint8), cv2.resize(fg[y:y + h, x:x + w], (width, height),
                                                    interpolation=cv2.INTER_NEAREST)


def paste(frame: np.ndarray, obj: tuple[np.ndarray, np.ndarray], left: int, bottom: int) -> None:
    pixels, mask = obj
    h, w = mask.shape
    x0, x1 = max(0, left), min(W, left + w)
    if x1 <= x0:
        return
    region = frame[bottom - h:bottom, x0:x1]
    keep = mask[:, x0 - left:x1 - left, None] > 0
    frame[bottom - h:bottom, x0:x1] = np.where(keep, pixels[:, x0 - left:x1 - left], region)


def comes_in_stays_leaves(n_in: int = 8, n_stay: int = 12, n_out: int = 8, n_after: int = 14) -> Iterator[int]:
    """An object's left edge per tick: in from the right-hand door to x=150, stays, back out the door;
    then the empty car (-10000: not in the frame)."""
    for k in range(n_in):
        yield W - 60 - k * (W - 60 - 150) // (n_in - 1)
    for _ in range(n_stay):
        yield 150
    for k in range(1, n_out + 1):
        yield 150 + k * 75
    for _ in range(n_after):
        yield -10_000


def drive(detect: Callable[[np.ndarray], list[Detection]], objects: list[tuple[tuple[np.ndarray, np.ndarray], int]]
          ) -> tuple[list[tuple[int, list[EbikeAction]]], set[str]]:
    """Each object (cutout, bottom row) moves as comes_in_stays_leaves; the frames go through the detector,
    the tracker and the rule at 5 fps. Returns the rule's actions by tick and the labels of confirmed
    tracks."""
    car = lift_car()
    tracker, rule = Tracker(), EbikeLiftRule(CAR)
    found: list[tuple[int, list[EbikeAction]]] = []
    labels: set[str] = set()
    for i, left in enumerate(comes_in_stays_leaves()):
        frame = car.copy()
        for k, (obj, bottom) in enumerate(objects):
            paste(frame, obj, left + 40 * k, bottom)
        now = i / FPS
        update = tracker.update(detect(frame), now)
        labels |= {t.label for t in update.tracks}
        actions = rule.update(update.tracks, W, H, now)
        if actions:
            found.append((i, actions))
    return found, labels


MOTORCYCLE_RECT = (95, 70, 590, 360)  # motorcycle_left.png (741 x 500): the motorcycle, wheels to mirrors
PERSON_RECT = (180, 92, 105, 290)  # person.jpg: the person, hat to boots


def test_real_motorcycle_in_a_lift_car_triggers_once_and_releases(
        detect: Callable[[np.ndarray], list[Detection]]) -> None:
    found, labels = drive(detect, [(cutout("motorcycle_left.png", MOTORCYCLE_RECT, 360), 470)])
    assert "motorcycle" in labels
    raised = of(RaiseAlarm, found)
    assert len(raised) == 1 and raised[0][1].label in CAR.labels
    tick, actions = found[0]
    assert [type(a) for a in actions] == [HoldDoor, Announce, RaiseAlarm] and tick < 8 + 12  # while it stands
    resolved = of(ResolveAlarm, found)
    assert [a.reason for _, a in resolved] == ["left"]
    assert resolved[0][0] >= 8 + 12  # after it began to leave
    assert [(a.on, a.reason) for _, a in of(HoldDoor, found)] == [(True, "confirmed"), (False, "left")]


def test_real_person_alone_in_a_lift_car_does_not_trigger(detect: Callable[[np.ndarray], list[Detection]]) -> None:
    found, labels = drive(detect, [(cutout("person.jpg", PERSON_RECT, 120), 470)])
    assert "person" in labels  # the detector saw the person: the rule had something to refuse
    assert found == []


def test_real_person_pushing_the_motorcycle_triggers(detect: Callable[[np.ndarray], list[Detection]]) -> None:
    found, labels = drive(detect, [(cutout("person.jpg", PERSON_RECT, 115), 440),
                                   (cutout("motorcycle_left.png", MOTORCYCLE_RECT, 360), 472)])
    assert {"person", "motorcycle"} <= labels
    assert len(of(RaiseAlarm, found)) == 1 and len(of(ResolveAlarm, found)) == 1
