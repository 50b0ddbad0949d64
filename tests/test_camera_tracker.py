"""The multi-object tracker (pure core) on synthetic detections with a controlled clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.camera.tracker import Track, Tracker, TrackUpdate
from edgeagent.models.types import Box, Detection

TICK_S = 0.2  # 5 detection frames per second, as the pipeline runs


def det(x: float, y: float, *, label: str = "person", w: float = 40.0, h: float = 100.0,
        score: float = 0.8) -> Detection:
    """A detection whose box's top-left corner is (x, y)."""
    return Detection(label=label, score=score, box=(x, y, x + w, y + h))


def run(tracker: Tracker, frames: list[list[Detection]], *, start_s: float = 0.0) -> list[TrackUpdate]:
    return [tracker.update(dets, start_s + i * TICK_S) for i, dets in enumerate(frames)]


def by_id(update: TrackUpdate) -> dict[int, Track]:
    return {t.id: t for t in update.tracks}


@pytest.mark.parametrize("dy", [0.0, 12.0, -30.0])
@pytest.mark.parametrize("shuffle", [False, True])
def test_two_objects_crossing_paths_keep_their_ids(dy: float, shuffle: bool) -> None:
    # A walks right, B walks left along (almost) the same row: their boxes overlap completely mid-way.
    rnd = random.Random(5)
    tracker = Tracker()
    frames = []
    for i in range(40):
        pair = [det(100 + 15 * i, 300), det(685 - 15 * i, 300 + dy)]
        if shuffle:
            rnd.shuffle(pair)
        frames.append(pair)
    updates = run(tracker, frames)
    first = by_id(updates[1])
    assert len(first) == 2
    a_id = next(tid for tid, t in first.items() if t.box[0] < 300)
    b_id = next(tid for tid, t in first.items() if t.box[0] > 300)
    for i, u in enumerate(updates[1:], start=1):
        tracks = by_id(u)
        assert set(tracks) == {a_id, b_id}, i
        assert tracks[a_id].box[0] == pytest.approx(100 + 15 * i)
        assert tracks[b_id].box[0] == pytest.approx(685 - 15 * i)
    assert sum(len(u.new) for u in updates) == 2
    assert tracks[a_id].velocity[0] == pytest.approx(75.0, rel=0.01)
    assert tracks[b_id].velocity[0] == pytest.approx(-75.0, rel=0.01)


def test_crossing_at_an_angle_with_a_missed_frame_at_the_crossing() -> None:
    # The detector sees only one of the two where they overlap (NMS merged them): the other coasts through.
    tracker = Tracker()
    frames = []
    for i in range(30):
        a, b = det(100 + 20 * i, 100 + 12 * i), det(100 + 20 * i, 448 - 12 * i)
        frames.append([a] if i == 14 else [a, b])
    updates = run(tracker, frames)
    ids = sorted(by_id(updates[2]))
    top = min(ids, key=lambda tid: by_id(updates[2])[tid].box[1])
    last = by_id(updates[-1])
    assert sorted(last) == ids
    assert last[top].box[1] == pytest.approx(100 + 12 * 29)  # the one that started at the top is now low
    assert sum(len(u.new) for u in updates) == 2 and not any(u.ended for u in updates)


def test_a_one_frame_flicker_never_becomes_a_track() -> None:
    tracker = Tracker(min_hits=2, confirm_window_s=1.0)
    u = tracker.update([det(300, 300)], 0.0)
    assert u.new == () and u.tracks == () and len(u.tentative) == 1 and u.tentative[0].id == 0
    for i in range(1, 20):
        u = tracker.update([], i * TICK_S)
        assert u.new == () and u.tracks == ()
    assert u.tentative == () and len(tracker) == 0


def test_flickers_in_ever_new_places_never_confirm() -> None:
    tracker = Tracker(min_hits=2)
    for i in range(50):
        u = tracker.update([det(40 + (i % 5) * 150, 20 + (i // 5 % 5) * 110)], i * TICK_S)
        assert u.new == () and u.tracks == ()


def test_confirmation_needs_min_hits_within_the_window() -> None:
    tracker = Tracker(min_hits=3, confirm_window_s=1.0)
    assert tracker.update([det(300, 300)], 0.0).new == ()
    assert tracker.update([det(302, 300)], 0.2).new == ()
    (t,) = tracker.update([det(304, 300)], 0.4).new
    assert t.id == 1 and t.confirmed and t.hits == 3 and t.first_seen_s == 0.0 and t.last_seen_s == 0.4


def test_missed_frames_within_max_age_keep_the_id_and_coast_on_the_prediction() -> None:
    tracker = Tracker(max_age_s=1.5)
    frames = [[det(100 + 10 * i, 200)] for i in range(10)]
    frames += [[] for _ in range(6)]  # 1.2 s unseen
    frames += [[det(100 + 10 * i, 200)] for i in range(16, 25)]
    updates = run(tracker, frames)
    assert sum(len(u.new) for u in updates) == 1
    assert not any(u.ended for u in updates)
    coasting = by_id(updates[13])[1]
    assert not coasting.matched and coasting.box[0] == pytest.approx(100 + 10 * 13, abs=1.0)
    assert by_id(updates[-1])[1].matched and by_id(updates[-1])[1].hits == 19


def test_a_track_unseen_longer_than_max_age_ends_once_and_comes_back_with_a_new_id() -> None:
    tracker = Tracker(max_age_s=1.0)
    frames = [[det(100, 200)] for _ in range(5)] + [[] for _ in range(10)] + [[det(100, 200)] for _ in range(3)]
    updates = run(tracker, frames)
    ended = [(i, t.id) for i, u in enumerate(updates) for t in u.ended]
    assert ended == [(10, 1)]  # last seen at 0.8 s, not found at 1.0 s, still not found 1.0 s later
    new = [(i, t.id) for i, u in enumerate(updates) for t in u.new]
    assert new == [(1, 1), (16, 2)]


def test_labels_never_match_each_other() -> None:
    tracker = Tracker()
    frames = [[det(100, 100, label="person"), det(100, 100, label="car", w=40, h=100)] for _ in range(3)]
    updates = run(tracker, frames)
    labels = {t.id: t.label for t in updates[-1].tracks}
    assert sorted(labels.values()) == ["car", "person"]
    # The car leaves; a person appears exactly where it was: a new person track, never the car's id.
    car_id = next(tid for tid, lab in labels.items() if lab == "car")
    frames = [[det(100, 100, label="person"), det(100, 100, label="person", w=42, h=98)]] * 3
    later = run(tracker, frames, start_s=1.0)
    for u in later:
        for t in u.tracks:
            assert t.id != car_id or t.label == "car"
    # The second person is taken as a duplicate of the first (same box) and starts no track.
    assert [t.label for t in later[-1].tracks if t.matched] == ["person"]


def test_ids_are_monotonic_from_first_id() -> None:
    tracker = Tracker(first_id=41)
    new_ids = []
    t = 0.0
    for k in range(5):
        for _ in range(3):
            new_ids += [tr.id for tr in tracker.update([det(50 + 120 * k, 100)], t).new]
            t += TICK_S
        t += 5.0  # gone long enough to end
        tracker.update([], t)
    assert new_ids == [41, 42, 43, 44, 45]
    assert tracker.next_id == 46


def test_stationary_track_is_not_redetected_every_tick_and_never_expires_unchecked() -> None:
    tracker = Tracker(stationary_after_s=3.0, max_age_s=1.0)
    t = 0.0
    for _ in range(20):  # 4 s still
        u = tracker.update([det(300, 200)], t)
        t += TICK_S
    (parked,) = u.tracks
    assert parked.stationary and parked.velocity == (0.0, 0.0)
    assert tracker.due_for_detection(t, recheck_every_s=5.0) == []
    # A minute with no detection run on it (the pipeline skipped it: covered nowhere near): still there.
    for _ in range(300):
        u = tracker.update([], t, covered=[(0, 0, 100, 100)])
        t += TICK_S
        assert [x.id for x in u.tracks] == [parked.id] and not u.ended
    assert tracker.due_for_detection(t, recheck_every_s=5.0) == [(300.0, 200.0, 340.0, 300.0)]
    # The re-check finds it: kept, not due again for 5 s.
    u = tracker.update([det(301, 200)], t, covered=[(100, 0, 516, 416)])
    assert u.tracks[0].stationary and u.tracks[0].matched
    assert tracker.due_for_detection(t + 1.0, recheck_every_s=5.0) == []
    # It drives away: the check finds nothing; it is due at every tick until found or ended.
    t += 5.0
    u = tracker.update([], t, covered=[(100, 0, 516, 416)])
    assert [x.id for x in u.tracks] == [parked.id]
    assert tracker.due_for_detection(t + TICK_S, recheck_every_s=5.0) != []
    ended_at = None
    for _ in range(10):
        t += TICK_S
        u = tracker.update([], t, covered=[(100, 0, 516, 416)])
        if u.ended:
            ended_at = t
            break
    assert ended_at is not None and [x.id for x in u.ended] == [parked.id]


def test_a_stationary_track_that_moves_again_is_no_longer_stationary() -> None:
    tracker = Tracker(stationary_after_s=2.0)
    frames = [[det(300, 200)] for _ in range(15)] + [[det(300 + 25 * i, 200)] for i in range(1, 6)]
    updates = run(tracker, frames)
    assert updates[14].tracks[0].stationary
    assert not updates[-1].tracks[0].stationary and updates[-1].tracks[0].velocity[0] > 50
    assert {t.id for u in updates for t in u.tracks} == {1}


def test_small_jitter_still_becomes_stationary_but_slow_drift_does_not() -> None:
    rnd = random.Random(3)
    jitter = Tracker(stationary_after_s=2.0)
    frames = [[det(300 + rnd.uniform(-2, 2), 200 + rnd.uniform(-2, 2))] for _ in range(20)]
    assert run(jitter, frames)[-1].tracks[0].stationary
    drift = Tracker(stationary_after_s=2.0)
    assert not any(t.stationary for u in run(drift, [[det(300 + 3 * i, 200)] for i in range(40)]) for t in u.tracks)


def test_score_keeps_the_last_and_the_best() -> None:
    tracker = Tracker()
    run(tracker, [[det(100, 100, score=s)] for s in (0.5, 0.9, 0.6)])
    (t,) = tracker.tracks(1.0)
    assert t.score == 0.6 and t.max_score == 0.9 and t.detection.score == 0.6
    assert len(t.history) == 3 and t.history[0] == (0.0, 120.0, 150.0)


def test_time_going_back_is_refused_and_nan_boxes_are_ignored() -> None:
    tracker = Tracker()
    tracker.update([det(1, 1)], 5.0)
    with pytest.raises(ValueError, match="time went back"):
        tracker.update([], 4.0)
    nan = Detection(label="person", score=0.9, box=(float("nan"), 0.0, 10.0, 10.0))
    u = tracker.update([nan, det(1, 1)], 5.2)
    assert [t.id for t in u.new] == [1]


def test_twenty_objects_on_a_grid_keep_their_ids() -> None:
    tracker = Tracker()
    rnd = random.Random(11)
    starts = [(60 + 140 * (k % 5), 40 + 130 * (k // 5), rnd.uniform(-20, 20), rnd.uniform(-20, 20)) for k in range(20)]
    frames = [[det(x + vx * i * TICK_S, y + vy * i * TICK_S) for x, y, vx, vy in starts] for i in range(50)]
    updates = run(tracker, frames)
    assert sum(len(u.new) for u in updates) == 20
    assert all(len(u.tracks) == 20 for u in updates[1:])
    assert not any(u.ended for u in updates)


# -- properties ------------------------------------------------------------------------------------------------


DETS = st.lists(
    st.tuples(st.sampled_from(["person", "car"]), st.floats(0, 300), st.floats(0, 300), st.floats(1, 120),
              st.floats(1, 120), st.floats(0.05, 1.0)).map(
        lambda t: Detection(label=t[0], score=t[5], box=(t[1], t[2], t[1] + t[3], t[2] + t[4]))),
    max_size=6)
COVERED = st.none() | st.lists(
    st.tuples(st.floats(0, 300), st.floats(0, 300), st.floats(10, 400)).map(
        lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[2])), max_size=3)


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(st.tuples(DETS, st.floats(0.0, 2.0), COVERED), max_size=40),
       min_hits=st.integers(1, 3), stationary_after_s=st.floats(0.5, 5.0))
def test_random_detection_sequences(frames: list[tuple[list[Detection], float, list[Box] | None]], min_hits: int,
                                    stationary_after_s: float) -> None:
    tracker = Tracker(min_hits=min_hits, stationary_after_s=stationary_after_s)
    now = 0.0
    announced: dict[int, str] = {}
    ended: set[int] = set()
    last_new = 0
    for dets, dt, covered in frames:
        now += dt
        u = tracker.update(dets, now, covered=covered)
        for t in u.new:
            assert t.id not in announced, "a track is announced once"
            assert t.id > last_new, "ids grow"
            assert t.confirmed and t.hits >= min_hits
            last_new = t.id
            announced[t.id] = t.label
        for t in u.ended:
            assert t.id in announced and t.id not in ended, "only announced tracks end, once"
            ended.add(t.id)
        live = [t.id for t in u.tracks]
        assert len(live) == len(set(live)) and live == sorted(live)
        for t in u.tracks:
            assert t.id in announced and t.id not in ended and announced[t.id] == t.label
            assert t.first_seen_s <= t.last_seen_s <= now and t.max_score >= t.score
        assert all(t.id == 0 and not t.confirmed for t in u.tentative)
        # Every detection matched this tick is used once: matched tracks never outnumber the detections.
        assert sum(1 for t in (*u.tracks, *u.tentative) if t.matched) <= len(dets)
        tracker.due_for_detection(now, 5.0)


@settings(max_examples=100, deadline=None)
@given(cells=st.lists(st.integers(0, 15), min_size=1, max_size=30, unique=True),
       size=st.floats(5, 60), dts=st.lists(st.floats(0.01, 1.0), min_size=30, max_size=30))
def test_detections_never_repeated_never_confirm(cells: list[int], size: float, dts: list[float]) -> None:
    # Each frame shows one object in a grid cell no other frame uses: every one of them is a flicker.
    tracker = Tracker(min_hits=2)
    now = 0.0
    for cell, dt in zip(cells, dts, strict=False):
        now += dt
        x, y = 300.0 * (cell % 4), 300.0 * (cell // 4)
        u = tracker.update([det(x, y, w=size, h=size)], now)
        assert u.new == () and u.tracks == ()


def test_a_track_that_leaves_the_frame_ends_although_no_region_covers_it() -> None:
    # A walker leaves at the right edge; the pipeline's regions (only where something moves) never contain
    # the prediction beyond the edge. With the frame size it ends max_age_s after leaving; without it, it
    # would coast on for ever (the benchmark's soak leak).
    size = (768, 576)
    tracker = Tracker(max_age_s=1.5)
    t = 0.0
    for i in range(20):
        x = 500 + 12 * i
        tracker.update([det(x, 200)], t, covered=[(300.0, 0.0, 768.0, 416.0)], frame_size=size)
        t += TICK_S
    (walker,) = tracker.tracks(t)
    ended = []
    for _ in range(60):  # 12 s of nothing there, the detector running elsewhere
        u = tracker.update([], t, covered=[(0.0, 0.0, 100.0, 100.0)], frame_size=size)
        ended.extend(u.ended)
        t += TICK_S
        # The prediction beyond the edge is not sent to the detector either.
        assert all(b[0] < 768 for b in tracker.due_for_detection(t, 5.0, 0.35))
    assert [x.id for x in ended] == [walker.id] and len(tracker) == 0
    assert ended[0].last_seen_s < t - 10.0


def test_the_unseen_backstop_ends_a_track_nothing_ever_looks_at() -> None:
    tracker = Tracker(max_unseen_s=15.0, stationary_after_s=2.0)
    t = 0.0
    for _ in range(20):
        tracker.update([det(300, 200)], t)
        t += TICK_S
    assert len(tracker.tracks(t)) == 1
    last_seen = t - TICK_S
    ended_at = None
    while t < 30.0 and ended_at is None:
        u = tracker.update([], t, covered=[])  # every tick skipped (engine busy): never looked at
        if u.ended:
            ended_at = t
        t += TICK_S
    assert ended_at is not None and ended_at - last_seen == pytest.approx(15.0, abs=TICK_S + 1e-6)
    with pytest.raises(ValueError):
        Tracker(max_unseen_s=1.0, max_age_s=1.5)
