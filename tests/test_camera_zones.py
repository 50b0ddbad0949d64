"""Zones and lines (pure core) on synthetic tracks with a controlled clock."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.camera.tracker import Track
from edgeagent.drivers.camera.zones import LineSpec, RuleHit, ZoneRules, ZoneSpec
from edgeagent.models.types import Detection

FW, FH = 1000, 1000  # normalized coordinates x 1000: easy to read
TICK_S = 0.2
BOX_W, BOX_H = 40.0, 100.0  # edge margin and line dead-band: 10% of the height = 10 px


def trk(tid: int, x: float, y: float, *, label: str = "person", score: float = 0.8, matched: bool = True,
        w: float = BOX_W, h: float = BOX_H, stationary: bool = False) -> Track:
    """A confirmed track whose anchor (bottom-centre of the box) is at (x, y) in frame pixels."""
    box = (x - w / 2, y - h, x + w / 2, y)
    return Track(id=tid, label=label, box=box, score=score, max_score=score, hits=5, first_seen_s=0.0,
                 last_seen_s=0.0, confirmed=True, stationary=stationary, matched=matched, velocity=(0.0, 0.0),
                 history=(), detection=Detection(label=label, score=score, box=box))


SQUARE = ZoneSpec(name="lobby", points=((0.3, 0.3), (0.7, 0.3), (0.7, 0.7), (0.3, 0.7)))
GATE = LineSpec(name="gate", a=(0.2, 0.5), b=(0.8, 0.5), names=("in", "out"))


def play(rules: ZoneRules, steps: list[list[Track]], *, start_s: float = 0.0) -> list[RuleHit]:
    hits: list[RuleHit] = []
    for i, tracks in enumerate(steps):
        hits += rules.update(tracks, FW, FH, start_s + i * TICK_S)
    return hits


def kinds(hits: list[RuleHit], kind: str) -> list[RuleHit]:
    return [h for h in hits if h.kind == kind]


def walk(tid: int, x0: float, y0: float, x1: float, y1: float, n: int, **kw: Any) -> list[Track]:
    return [trk(tid, x0 + (x1 - x0) * i / (n - 1), y0 + (y1 - y0) * i / (n - 1), **kw) for i in range(n)]


# -- zones ------------------------------------------------------------------------------------------------


def test_a_straight_walk_through_a_zone_enters_once_and_leaves_once() -> None:
    rules = ZoneRules([SQUARE])
    hits = play(rules, [[t] for t in walk(7, 100, 500, 900, 500, 41)])
    enters, leaves = kinds(hits, "zone_enter"), kinds(hits, "zone_leave")
    assert [(h.name, h.track_id, h.label) for h in enters] == [("lobby", 7, "person")]
    assert [(h.track_id, h.reason) for h in leaves] == [(7, None)]
    assert enters[0].occupancy == 1 and enters[0].counts == (("person", 1),)
    assert leaves[0].occupancy == 0 and leaves[0].counts == ()
    # x from 100 by 20 px per step: 320 (10 px inside, the margin) at step 11; out by 10 px (710) at step 31
    # and again at 32: two observations to leave.
    assert enters[0].at_s == pytest.approx(11 * TICK_S)
    assert leaves[0].at_s == pytest.approx(32 * TICK_S)
    assert leaves[0].dwell_s == pytest.approx(21 * TICK_S)
    assert [(h.label, h.count) for h in kinds(hits, "zone_occupancy")] == [("person", 1), ("person", 0)]
    assert rules.occupancy("lobby") == {}


def test_a_track_jittering_on_the_edge_enters_at_most_once() -> None:
    rules = ZoneRules([SQUARE])
    # Anchor around the left edge x = 300, +-15 px: inside by 10 px now and then, never outside by 10 px
    # twice in a row once it is in.
    xs = [300 + d for d in (15, -5, 12, -8, 14, -9, 11, 9, -6, 15, -9, 13) * 5]
    hits = play(rules, [[trk(1, x, 500)] for x in xs])
    assert len(kinds(hits, "zone_enter")) == 1
    assert kinds(hits, "zone_leave") == []


def test_one_outlier_outside_is_not_a_leave() -> None:
    rules = ZoneRules([SQUARE])
    ys = [500.0] * 5 + [900.0] + [500.0] * 5
    hits = play(rules, [[trk(1, 500, y)] for y in ys])
    assert [h.kind for h in hits if h.kind != "zone_occupancy"] == ["zone_enter"]


def test_loiter_fires_once_per_stay() -> None:
    zone = ZoneSpec(name="lobby", points=SQUARE.points, loiter_s=10.0)
    rules = ZoneRules([zone])
    inside = [[trk(3, 500, 500, matched=i % 10 == 0, stationary=i > 20)] for i in range(150)]  # 30 s inside
    out = [[trk(3, 900, 900)] for _ in range(5)]
    again = [[trk(3, 500, 500)] for _ in range(70)]  # 14 s
    hits = play(rules, inside + out + again)
    loiters = kinds(hits, "zone_loiter")
    assert len(loiters) == 2
    assert loiters[0].at_s == pytest.approx(10.0) and loiters[0].dwell_s == pytest.approx(10.0)
    assert loiters[1].dwell_s == pytest.approx(10.0)
    assert [h.kind for h in hits if h.kind != "zone_occupancy"] == [
        "zone_enter", "zone_loiter", "zone_leave", "zone_enter", "zone_loiter"]


def test_a_track_that_ends_inside_leaves_as_lost() -> None:
    rules = ZoneRules([SQUARE])
    play(rules, [[trk(1, 500, 500), trk(2, 450, 450)]] * 3)
    assert rules.zones_of(1) == {"lobby"} and rules.occupancy("lobby") == {"person": 2}
    hits = rules.update([trk(2, 450, 450)], FW, FH, 1.0)  # 1 is no longer passed
    (leave,) = kinds(hits, "zone_leave")
    assert (leave.track_id, leave.reason, leave.occupancy) == (1, "lost", 1)
    assert leave.box == trk(1, 500, 500).box and leave.dwell_s == pytest.approx(1.0)
    hits = rules.update([trk(2, 450, 450)], FW, FH, 1.2, ended=[trk(2, 450, 450)])  # ended, though still passed
    assert [(h.track_id, h.reason) for h in kinds(hits, "zone_leave")] == [(2, "lost")]
    assert rules.zones_of(2) == frozenset() and rules.occupancy("lobby") == {}


def test_coasting_tracks_do_not_move_the_state() -> None:
    rules = ZoneRules([SQUARE])
    play(rules, [[trk(1, 500, 500)]])
    hits = play(rules, [[trk(1, 900, 900, matched=False)]] * 10, start_s=1.0)
    assert hits == [] and rules.zones_of(1) == {"lobby"}


def test_a_concave_zone() -> None:
    # A "U": the notch between the arms (x 400..600, y 200..600) is outside.
    u_zone = ZoneSpec(name="u", points=((0.2, 0.2), (0.4, 0.2), (0.4, 0.6), (0.6, 0.6), (0.6, 0.2), (0.8, 0.2),
                                        (0.8, 0.8), (0.2, 0.8)))
    rules = ZoneRules([u_zone])
    through_notch = play(rules, [[t] for t in walk(1, 500, 100, 500, 560, 24)])
    assert kinds(through_notch, "zone_enter") == []
    through_arm = play(rules, [[t] for t in walk(2, 300, 100, 300, 500, 21)], start_s=10.0)
    assert [h.track_id for h in kinds(through_arm, "zone_enter")] == [2]
    below = play(rules, [[t] for t in walk(3, 500, 650, 500, 700, 3)], start_s=20.0)
    assert [h.track_id for h in kinds(below, "zone_enter")] == [3]


def test_zone_filters_gate_entering_but_never_leaving() -> None:
    zone = ZoneSpec(name="bay", points=SQUARE.points, classes=frozenset({"car"}), min_score=0.5, min_area_frac=0.01)
    rules = ZoneRules([zone])
    big: dict[str, Any] = {"w": 120.0, "h": 100.0}  # 12000 px2 = 1.2% of the frame
    assert play(rules, [[trk(1, 500, 500, label="person", **big)]] * 3) == []
    assert play(rules, [[trk(2, 500, 500, label="car", score=0.4, **big)]] * 3) == []
    assert play(rules, [[trk(3, 500, 500, label="car")]] * 3) == []  # 40x100: 0.4% of the frame
    hits = play(rules, [[trk(4, 500, 500, label="car", **big)]] * 3)
    assert [h.kind for h in hits] == ["zone_enter", "zone_occupancy"]
    # Now it shrinks (drives away from the camera) and leaves: the leave is still reported.
    hits = play(rules, [[trk(4, 900, 900, label="car", w=10, h=10)]] * 3, start_s=5.0)
    assert [h.kind for h in hits] == ["zone_leave", "zone_occupancy"]


def test_occupancy_per_class() -> None:
    rules = ZoneRules([SQUARE])
    hits = rules.update([trk(1, 500, 500), trk(2, 450, 500), trk(3, 400, 450, label="car", w=80, h=60)], FW, FH, 0)
    occ = kinds(hits, "zone_occupancy")
    assert [(h.label, h.count) for h in occ] == [("car", 1), ("person", 2)]
    assert occ[0].counts == (("car", 1), ("person", 2)) and occ[0].occupancy == 3
    assert [h.occupancy for h in kinds(hits, "zone_enter")] == [1, 2, 3]  # as each one came in, by id
    assert rules.update([trk(1, 500, 500), trk(2, 450, 500), trk(3, 400, 450, label="car", w=80, h=60)],
                        FW, FH, 0.2) == []


# -- lines ------------------------------------------------------------------------------------------------


def test_crossing_a_to_b_counts_in_and_back_counts_out() -> None:
    rules = ZoneRules(lines=[GATE])
    down = play(rules, [[t] for t in walk(1, 500, 300, 500, 700, 21)])  # moving down: left to right of a->b
    assert [(h.name, h.direction, h.count, h.counts) for h in down] == [("gate", "in", 1, (("in", 1), ("out", 0)))]
    up = play(rules, [[t] for t in walk(1, 520, 700, 520, 300, 21)], start_s=10.0)
    assert [(h.direction, h.count, h.counts) for h in up] == [("out", 1, (("in", 1), ("out", 1)))]
    assert rules.line_counts("gate") == {"in": 1, "out": 1}


def test_passing_beside_the_end_of_the_segment_does_not_count() -> None:
    rules = ZoneRules(lines=[GATE])  # from x 200 to x 800
    assert play(rules, [[t] for t in walk(1, 850, 300, 850, 700, 21)]) == []
    assert play(rules, [[t] for t in walk(2, 150, 700, 150, 300, 21)], start_s=10.0) == []
    # Diagonal path that crosses the line's extension just past the end at b.
    assert play(rules, [[t] for t in walk(3, 760, 300, 900, 700, 21)], start_s=20.0) == []
    assert rules.line_counts("gate") == {"in": 0, "out": 0}


def test_same_direction_again_without_crossing_back_counts_once() -> None:
    rules = ZoneRules(lines=[GATE])
    path = (walk(1, 500, 300, 500, 700, 11) + walk(1, 500, 700, 900, 700, 11)  # cross, then around the end
            + walk(1, 900, 700, 900, 300, 11) + walk(1, 900, 300, 500, 300, 11) + walk(1, 500, 300, 500, 700, 11))
    hits = play(rules, [[t] for t in path])
    assert [h.direction for h in hits] == ["in"]


def test_jitter_on_the_line_is_not_a_crossing() -> None:
    rules = ZoneRules(lines=[GATE])
    ys = [500 + d for d in (8, -7, 9, -9, 3, -8, 9, -6) * 6]  # within the 10 px dead-band
    assert play(rules, [[trk(1, 500, y)] for y in [300.0, *ys]]) == []


def test_line_filters_and_coasting() -> None:
    line = LineSpec(name="gate", a=GATE.a, b=GATE.b, classes=frozenset({"car"}), min_score=0.6, names=("in", "out"))
    rules = ZoneRules(lines=[line])
    assert play(rules, [[t] for t in walk(1, 500, 300, 500, 700, 11)]) == []  # a person
    assert play(rules, [[t] for t in walk(2, 500, 300, 500, 700, 11, label="car", score=0.5)], start_s=5) == []
    assert play(rules, [[t] for t in walk(3, 500, 300, 500, 700, 11, label="car", matched=False)], start_s=9) == []
    hits = play(rules, [[t] for t in walk(4, 500, 300, 500, 700, 11, label="car")], start_s=13)
    assert [(h.track_id, h.direction) for h in hits] == [(4, "in")]


def test_specs_are_validated() -> None:
    with pytest.raises(ValueError, match="at least 3 points"):
        ZoneSpec(name="z", points=((0.1, 0.1), (0.2, 0.2)))
    with pytest.raises(ValueError, match=r"0\.\.1"):
        ZoneSpec(name="z", points=((0.1, 0.1), (1.2, 0.2), (0.3, 0.3)))
    with pytest.raises(ValueError, match="same point"):
        LineSpec(name="l", a=(0.5, 0.5), b=(0.5, 0.5))
    with pytest.raises(ValueError, match="unique"):
        ZoneRules([SQUARE, SQUARE])
    with pytest.raises(KeyError):
        ZoneRules([SQUARE]).occupancy("nope")


# -- properties -------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(lo=st.floats(-19.5, 0.0), offsets=st.lists(st.floats(0.0, 19.5), min_size=1, max_size=60),
       edge=st.sampled_from(["left", "top", "right", "bottom"]))
def test_any_path_inside_the_hysteresis_band_enters_at_most_once_and_never_leaves(
        lo: float, offsets: list[float], edge: str) -> None:
    # The band is 2 x 10 px wide; any path within 19.5 px of depth cannot be both 10 px in and 10 px out.
    rules = ZoneRules([SQUARE])
    steps = []
    for off in offsets:
        depth = lo + off  # positive = inside
        x, y = {"left": (300 + depth, 500.0), "right": (700 - depth, 500.0), "top": (500.0, 300 + depth),
                "bottom": (500.0, 700 - depth)}[edge]
        steps.append([trk(1, x, y)])
    hits = play(rules, steps)
    assert len(kinds(hits, "zone_enter")) <= 1
    assert kinds(hits, "zone_leave") == []


POINT = st.tuples(st.floats(0, 1000), st.floats(0, 1000))


@settings(max_examples=200, deadline=None)
@given(paths=st.lists(st.lists(st.tuples(POINT, st.booleans()), min_size=1, max_size=25), min_size=1, max_size=4),
       ends=st.lists(st.integers(0, 30), min_size=4, max_size=4))
def test_random_tracks_keep_zone_and_line_bookkeeping_consistent(
        paths: list[list[tuple[tuple[float, float], bool]]], ends: list[int]) -> None:
    zone = ZoneSpec(name="z", points=((0.2, 0.2), (0.5, 0.1), (0.8, 0.2), (0.5, 0.5), (0.8, 0.8), (0.2, 0.8)),
                    loiter_s=1.0)
    rules = ZoneRules([zone], [GATE])
    state: dict[int, str] = {}
    loitered: Counter[int] = Counter()
    last_dir: dict[int, str] = {}
    steps = max(len(p) for p in paths) + 3
    for i in range(steps):
        tracks = [trk(tid + 1, *path[min(i, len(path) - 1)][0], matched=path[min(i, len(path) - 1)][1])
                  for tid, path in enumerate(paths) if i < ends[tid] + 1]
        hits = rules.update(tracks, FW, FH, i * TICK_S)
        for h in hits:
            if h.kind == "zone_enter":
                assert state.get(h.track_id) != "in"
                state[h.track_id] = "in"
                loitered[h.track_id] = 0
            elif h.kind == "zone_leave":
                assert state.get(h.track_id) == "in"
                state[h.track_id] = "out"
            elif h.kind == "zone_loiter":
                assert state.get(h.track_id) == "in" and h.dwell_s is not None and h.dwell_s >= 1.0
                loitered[h.track_id] += 1
                assert loitered[h.track_id] == 1
            elif h.kind == "line_cross":
                assert h.direction in ("in", "out") and last_dir.get(h.track_id) != h.direction
                last_dir[h.track_id] = h.direction
        inside = sum(1 for s in state.values() if s == "in")
        assert sum(rules.occupancy("z").values()) == inside
        counts = rules.line_counts("gate")
        assert abs(counts["in"] - counts["out"]) <= len(paths)
    # Every track ends: whoever was inside leaves as lost, nobody is left inside.
    hits = rules.update([], FW, FH, steps * TICK_S)
    assert sorted(h.track_id for h in hits if h.kind == "zone_leave") == sorted(
        tid for tid, s in state.items() if s == "in")
    assert all(h.reason == "lost" for h in hits if h.kind == "zone_leave")
    assert rules.occupancy("z") == {}


def test_redrawn_rules_keep_the_state_of_what_was_not_redrawn() -> None:
    # An installer adds a zone and redraws another from the console while people stand in them: the unchanged
    # zone keeps who is inside (no second enter), the line keeps its counts, the redrawn and new zones start
    # empty (those inside them enter at the next update).
    hall = ZoneSpec(name="hall", points=((0.0, 0.0), (0.25, 0.0), (0.25, 1.0), (0.0, 1.0)))
    rules = ZoneRules([SQUARE, hall], [GATE])
    play(rules, [[t] for t in walk(1, 500, 300, 500, 700, 21)])  # crosses the gate line into the lobby
    assert rules.line_counts("gate") == {"in": 1, "out": 0}
    standing = [trk(1, 500, 650), trk(2, 100, 500)]
    play(rules, [standing, standing], start_s=10.0)
    assert rules.occupancy("lobby") == {"person": 1} and rules.occupancy("hall") == {"person": 1}

    wider_hall = ZoneSpec(name="hall", points=((0.0, 0.0), (0.3, 0.0), (0.3, 1.0), (0.0, 1.0)))
    porch = ZoneSpec(name="porch", points=((0.4, 0.6), (0.6, 0.6), (0.6, 0.8), (0.4, 0.8)))
    redrawn = rules.with_specs([SQUARE, wider_hall, porch], [GATE])
    assert redrawn.occupancy("lobby") == {"person": 1} and redrawn.line_counts("gate")["in"] == 1
    assert redrawn.occupancy("hall") == {} and redrawn.occupancy("porch") == {}
    hits = redrawn.update(standing, FW, FH, 11.0)
    assert sorted((h.name, h.track_id) for h in kinds(hits, "zone_enter")) == [("hall", 2), ("porch", 1)]
    # A zone left out is gone; the rest carries on.
    fewer = redrawn.with_specs([SQUARE], [])
    assert fewer.occupancy("lobby") == {"person": 1}
    with pytest.raises(KeyError):
        fewer.occupancy("hall")
    with pytest.raises(KeyError):
        fewer.line_counts("gate")
