"""Motion gating and region proposal (pure cores) on the real pedestrian clip and on synthetic scenes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.camera.motion import MotionDetector
from edgeagent.drivers.camera.regions import propose_rects, propose_regions

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
CLIP = MEDIA / "vtest.avi"
W, H = 768, 576


@pytest.fixture(scope="module")
def clip_frames() -> list[np.ndarray]:
    if not CLIP.exists():
        pytest.fail(f"test clip missing: {CLIP} (../shared/media beside the repository)")
    cap = cv2.VideoCapture(str(CLIP))
    frames: list[np.ndarray] = []
    try:
        while len(frames) < 300:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        cap.release()
    assert len(frames) == 300
    assert frames[0].shape == (H, W, 3)
    return frames


def _mask(boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        m[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = True
    return m


def _quiet_sequence(still: np.ndarray, n: int, *, noise_sigma: float, ramp_per_frame: float,
                    seed: int = 7) -> list[np.ndarray]:
    """A still scene with fresh sensor noise on every frame and a slow brightness ramp."""
    rng = np.random.default_rng(seed)
    base = still.astype(np.float32)
    return [np.clip(base + rng.normal(0.0, noise_sigma, base.shape) + i * ramp_per_frame, 0, 255).astype(np.uint8)
            for i in range(n)]


def test_clip_motion_covers_what_moves_and_little_else(clip_frames: list[np.ndarray]) -> None:
    md = MotionDetector(W, H)
    assert md.small_size == (128, 96) and md.factor == 6
    moved_total = covered_total = 0
    worst = 1.0
    areas: list[float] = []
    prev = None
    for i, frame in enumerate(clip_frames):
        boxes = md.update(frame)
        gray = cv2.GaussianBlur(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), (5, 5), 0)
        if prev is not None and i >= 20:  # the running average has learnt the scene by then
            # What clearly changed since the last frame at full resolution (specks opened away): the walkers.
            moved = cv2.morphologyEx((cv2.absdiff(gray, prev) > 40).astype(np.uint8), cv2.MORPH_OPEN,
                                     np.ones((3, 3), np.uint8)).astype(bool)
            covered = _mask(boxes)
            moved_total += int(moved.sum())
            covered_total += int((moved & covered).sum())
            if moved.sum() > 200:
                worst = min(worst, float((moved & covered).sum() / moved.sum()))
            areas.append(float(covered.mean()))
            assert boxes, f"frame {i}: people walk in every frame of the clip, no motion reported"
            for x1, y1, x2, y2 in boxes:
                assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
        prev = gray
    assert moved_total > 100_000
    assert covered_total / moved_total >= 0.97
    assert worst >= 0.7
    # Gating is only worth it if the boxes stay small: a few walkers cover a small part of the frame.
    assert float(np.mean(areas)) < 0.2
    assert max(areas) < 0.35
    assert md.recalibrations == 0


def test_still_frame_repeated_gives_no_motion(clip_frames: list[np.ndarray]) -> None:
    md = MotionDetector(W, H)
    assert all(md.update(clip_frames[0]) == [] for _ in range(20))
    assert md.last_changed_frac == 0.0


def test_noise_and_slow_lighting_ramp_give_no_motion(clip_frames: list[np.ndarray]) -> None:
    # 30 s at 10 fps: sensor noise sigma 4 and a ramp of 4 grey levels per second (dusk, clouds): 120 levels.
    md = MotionDetector(W, H)
    seq = _quiet_sequence(clip_frames[0], 300, noise_sigma=4.0, ramp_per_frame=0.4)
    found = [(i, b) for i, frame in enumerate(seq) if (b := md.update(frame))]
    assert found == []
    assert md.recalibrations == 0


def test_a_small_mover_on_the_noisy_scene_is_found(clip_frames: list[np.ndarray]) -> None:
    # The same quiet scene with a 30x60 px dark figure walking across: the detector is not simply blind.
    md = MotionDetector(W, H)
    seq = _quiet_sequence(clip_frames[0], 60, noise_sigma=4.0, ramp_per_frame=0.4)
    hits = 0
    for i, frame in enumerate(seq):
        x = 100 + 8 * i
        frame[400:460, x:x + 30] = (20, 20, 20)
        boxes = md.update(frame)
        if i < 2:
            continue
        near = [b for b in boxes if b[0] <= x + 30 and b[2] >= x and b[1] <= 460 and b[3] >= 400]
        if near:
            hits += 1
            x1, y1, x2, y2 = near[0]
            assert x1 <= x and x2 >= x + 30 and y1 <= 400 and y2 >= 460, (i, near[0])
            assert (x2 - x1) * (y2 - y1) < 0.05 * W * H
    assert hits == 58


@pytest.mark.parametrize("change", ["brighter", "darker", "infrared"])
def test_sudden_full_frame_change_recalibrates_without_a_giant_box(clip_frames: list[np.ndarray],
                                                                   change: str) -> None:
    md = MotionDetector(W, H)
    for frame in clip_frames[:30]:
        md.update(frame)
    before = md.recalibrations

    def changed(frame: np.ndarray) -> np.ndarray:
        if change == "brighter":
            return np.clip(frame.astype(np.int16) + 70, 0, 255).astype(np.uint8)
        if change == "darker":
            return (frame.astype(np.float32) * 0.4).astype(np.uint8)
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)  # a camera switching to infrared: grey, inverted-ish
        return cv2.cvtColor(255 - grey, cv2.COLOR_GRAY2BGR)

    assert md.update(changed(clip_frames[30])) == []
    assert md.recalibrations == before + 1
    # After the reset the scene is learnt again: the walkers are found, no box spans most of the frame.
    for frame in clip_frames[31:60]:
        boxes = md.update(changed(frame))
        assert all((b[2] - b[0]) * (b[3] - b[1]) < 0.4 * W * H for b in boxes)
    assert md.update(changed(clip_frames[60]))
    assert md.recalibrations == before + 1


def test_roi_reports_only_inside_and_in_frame_pixels(clip_frames: list[np.ndarray]) -> None:
    roi = (96, 120, 576, 420)
    md = MotionDetector(W, H, roi=roi, height=100)
    ref = MotionDetector(roi[2] - roi[0], roi[3] - roi[1], height=100)
    assert md.factor == 3 and md.small_size == (160, 100)
    seen = 0
    for frame in clip_frames[:150]:
        boxes = md.update(frame)
        crop = np.ascontiguousarray(frame[roi[1]:roi[3], roi[0]:roi[2]])
        expected = [(x1 + roi[0], y1 + roi[1], x2 + roi[0], y2 + roi[1]) for x1, y1, x2, y2 in ref.update(crop)]
        assert boxes == expected  # same result as cropping first: the view changes nothing but the offset
        for x1, y1, x2, y2 in boxes:
            assert roi[0] <= x1 < x2 <= roi[2] and roi[1] <= y1 < y2 <= roi[3]
        seen += len(boxes)
    assert seen > 0


def test_roi_at_full_resolution_and_clipping() -> None:
    md = MotionDetector(W, H, roi=(700, 500, 900, 700), height=1000)
    assert md.roi == (700, 500, 768, 576) and md.factor == 1 and md.small_size == (68, 76)
    with pytest.raises(ValueError, match="no pixels"):
        MotionDetector(W, H, roi=(800, 0, 900, 10))


def test_gray_small_path_matches_the_frame_path(clip_frames: list[np.ndarray]) -> None:
    a, b = MotionDetector(W, H), MotionDetector(W, H)
    for frame in clip_frames[:60]:
        assert a.update(frame) == b.update_gray_small(b.downscale(frame))
    with pytest.raises(ValueError, match="128x96"):
        b.update_gray_small(np.zeros((10, 10), np.uint8))


def test_a_new_frame_size_reconfigures_and_reports_nothing_for_that_frame(clip_frames: list[np.ndarray]) -> None:
    md = MotionDetector(W, H)
    md.update(clip_frames[0])
    small = cv2.resize(clip_frames[1], (384, 288))
    assert md.update(small) == []
    assert md.reconfigurations == 1 and (md.frame_w, md.frame_h) == (384, 288)
    assert md.small_size == (128, 96) and md.factor == 3


# -- regions -------------------------------------------------------------------------------------------------


def _inside(inner: tuple[float, ...], outer: tuple[float, ...]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def _covered(motion: list[tuple[float, float, float, float]], tracked: list[tuple[float, float, float, float]],
             fw: int, fh: int, regions: list[tuple[float, float, float, float]]) -> list[tuple[float, ...]]:
    """Every box, clipped to the frame, lies in a region (no region when no box is in the frame); the boxes
    in the frame, clipped."""
    clipped = [(max(0.0, b[0]), max(0.0, b[1]), min(float(fw), b[2]), min(float(fh), b[3]))
               for b in (*motion, *tracked)]
    inside_frame = [c for c in clipped if c[2] > c[0] and c[3] > c[1]]
    assert bool(regions) == bool(inside_frame)
    for c in inside_frame:
        assert any(_inside(c, r) for r in regions), (c, regions)
    return inside_frame


def test_regions_model_size_shifted_inside_the_frame() -> None:
    assert propose_regions([], [], W, H, 416) == []
    # Near the bottom-right corner: shifted, not shrunk.
    assert propose_regions([(700, 500, 760, 570)], [], W, H, 416) == [(352.0, 160.0, 768.0, 576.0)]
    # Centred on what it holds when there is room.
    assert propose_regions([(300, 200, 340, 280)], [], W, H, 416) == [(112.0, 32.0, 528.0, 448.0)]
    # A frame smaller than the model: the whole frame.
    assert propose_regions([(10, 10, 20, 20)], [], 320, 240, 416) == [(0.0, 0.0, 320.0, 240.0)]


def test_regions_merge_when_one_square_holds_both_and_split_when_far() -> None:
    assert propose_regions([(100, 100, 150, 200)], [(250, 150, 300, 260)], W, H, 416) == [(0.0, 0.0, 416.0, 416.0)]
    far = propose_regions([(10, 10, 60, 100)], [(700, 470, 760, 570)], W, H, 416)
    assert far == [(0.0, 0.0, 416.0, 416.0), (352.0, 160.0, 768.0, 576.0)]


def test_regions_grow_for_a_big_object_and_span_the_frame_where_it_must() -> None:
    (r,) = propose_regions([], [(100, 50, 500, 350)], W, H, 416)
    assert r == (60.0, 0.0, 540.0, 480.0)  # 400 px wide + 10% margins: a 480 px square, the engine resizes
    (tall,) = propose_regions([], [(100, 50, 600, 400)], W, H, 416)
    assert tall == (50.0, 0.0, 650.0, 576.0)  # 600 px needed, the frame has 576 lines: all of them
    (wide,) = propose_regions([(0, 100, 760, 200)], [], W, H, 416)
    assert wide == (0.0, 0.0, 768.0, 576.0)


def test_regions_merge_further_when_a_downscale_is_accepted() -> None:
    people = [(40.0, 100.0, 90.0, 220.0), (650.0, 300.0, 700.0, 420.0)]
    assert len(propose_regions(people, [], W, H, 416)) == 2
    assert propose_regions(people, [], W, H, 416, max_merge_scale=2.0) == [(35.0, 0.0, 705.0, 576.0)]
    far_apart_1080p = [(40.0, 100.0, 90.0, 220.0), (1800.0, 900.0, 1850.0, 1020.0)]
    assert len(propose_regions(far_apart_1080p, [], 1920, 1080, 416, max_merge_scale=2.0)) == 2


def test_regions_too_many_fall_back_to_one_region_holding_all() -> None:
    boxes = [(x, y, x + 20, y + 20) for x in (0.0, 1800.0) for y in (0.0, 1000.0)] + [(900.0, 500.0, 920.0, 520.0)]
    assert len(propose_regions(boxes, [], 1920, 1080, 416, max_regions=5)) == 5
    assert propose_regions(boxes, [], 1920, 1080, 416, max_regions=4) == [(0.0, 0.0, 1822.0, 1080.0)]
    # Three walkers in the lower left of a 1080p frame: one 822 px square there, not the whole frame.
    walkers = [(100.0, 600.0, 160.0, 760.0), (500.0, 700.0, 560.0, 860.0), (850.0, 850.0, 910.0, 1010.0)]
    assert len(propose_regions(walkers, [], 1920, 1080, 416, max_regions=3)) == 3
    (one,) = propose_regions(walkers, [], 1920, 1080, 416, max_regions=1)
    assert one == (94.0, 258.0, 916.0, 1080.0) and all(_inside(w, one) for w in walkers)


def test_regions_ignore_boxes_outside_the_frame_and_clip_the_rest() -> None:
    assert propose_regions([(-50, -50, -10, -10), (900, 10, 950, 40)], [], W, H, 416) == []
    (r,) = propose_regions([(-30, -30, 40, 60)], [], W, H, 416)
    assert r == (0.0, 0.0, 416.0, 416.0)


BOXES = st.lists(
    st.tuples(st.floats(-100, 2000), st.floats(-100, 1200), st.floats(1, 900), st.floats(1, 700)).map(
        lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3])),
    max_size=12)


@settings(max_examples=300, deadline=None)
@given(motion=BOXES, tracked=BOXES, frame=st.sampled_from([(768, 576), (1920, 1080), (640, 360), (320, 240)]),
       size=st.sampled_from([320, 416, 640]), max_regions=st.integers(1, 6), scale=st.sampled_from([1.0, 1.5, 2.0]))
def test_regions_properties(motion: list[tuple[float, float, float, float]],
                            tracked: list[tuple[float, float, float, float]], frame: tuple[int, int], size: int,
                            max_regions: int, scale: float) -> None:
    fw, fh = frame
    regions = propose_regions(motion, tracked, fw, fh, size, max_regions=max_regions, max_merge_scale=scale)
    assert len(regions) <= max_regions
    for x1, y1, x2, y2 in regions:
        assert 0 <= x1 < x2 <= fw and 0 <= y1 < y2 <= fh
        assert all(float(v).is_integer() for v in (x1, y1, x2, y2))
        w, h = x2 - x1, y2 - y1
        # Square of at least the model size, unless a frame dimension is what limits it.
        assert w >= min(size, fw) and h >= min(size, fh)
        if w < fw and h < fh:
            assert w == h
    _covered(motion, tracked, fw, fh, regions)
    # The order of the inputs does not matter.
    assert propose_regions(list(reversed(tracked)), list(reversed(motion)), fw, fh, size,
                           max_regions=max_regions, max_merge_scale=scale) == regions


def test_rects_hold_what_moves_tightly_and_merge_only_when_it_saves_pixels() -> None:
    # One walker (60x150) in a 768x576 frame: a rectangle of its grown box, at least 171 px a side (128 input
    # pixels at scale 0.75), not a 416 px square.
    (r,) = propose_rects([(300, 200, 360, 350)], [], W, H, 171)
    assert r == (245.0, 185.0, 416.0, 365.0)
    # Two walkers side by side: one rectangle (fewer pixels than two); two at opposite corners: two.
    (pair,) = propose_rects([(300, 200, 360, 350)], [(370, 210, 430, 360)], W, H, 171)
    assert pair[0] <= 300 and pair[2] >= 430 and (pair[2] - pair[0]) * (pair[3] - pair[1]) < 2 * 171 * 180
    assert len(propose_rects([(10, 10, 60, 150)], [(700, 420, 760, 570)], W, H, 171)) == 2
    # A small frame is taken whole on its short side; nothing in the frame, nothing to look at.
    assert propose_rects([(10, 10, 20, 20)], [], 320, 120, 171) == [(0.0, 0.0, 171.0, 120.0)]
    assert propose_rects([(-50, -50, -10, -10)], [], W, H, 171) == []
    # Over max_regions, the cheapest merges happen first: three corners and a centre, at most two regions.
    corners = [(0, 0, 40, 80), (728, 0, 768, 80), (0, 496, 40, 576), (728, 496, 768, 576)]
    assert len(propose_rects(corners, [], W, H, 171, max_regions=2)) <= 2


@settings(max_examples=300, deadline=None)
@given(motion=BOXES, tracked=BOXES, frame=st.sampled_from([(768, 576), (1920, 1080), (640, 360), (320, 240)]),
       min_side=st.sampled_from([64, 171, 320, 700]), max_regions=st.integers(1, 6))
def test_rects_properties(motion: list[tuple[float, float, float, float]],
                          tracked: list[tuple[float, float, float, float]], frame: tuple[int, int], min_side: int,
                          max_regions: int) -> None:
    fw, fh = frame
    regions = propose_rects(motion, tracked, fw, fh, min_side, max_regions=max_regions)
    assert len(regions) <= max_regions
    for x1, y1, x2, y2 in regions:
        assert 0 <= x1 < x2 <= fw and 0 <= y1 < y2 <= fh
        assert all(float(v).is_integer() for v in (x1, y1, x2, y2))
        assert x2 - x1 >= min(min_side, fw) and y2 - y1 >= min(min_side, fh)
    inside_frame = _covered(motion, tracked, fw, fh, regions)
    # No region holds another (it would be looked at twice), and when nothing had to be forced together the
    # regions cost no more pixels than one rectangle per box would.
    for a in regions:
        assert not any(b != a and _inside(b, a) for b in regions), regions
    one_each = propose_rects(motion, tracked, fw, fh, min_side, max_regions=10_000)
    if len(one_each) <= max_regions:
        assert regions == one_each
    alone = [propose_rects([c], [], fw, fh, min_side)[0] for c in inside_frame]
    if len(one_each) <= max_regions:
        assert sum((r[2] - r[0]) * (r[3] - r[1]) for r in regions) <= sum(
            (r[2] - r[0]) * (r[3] - r[1]) for r in alone)
    assert propose_rects(list(reversed(tracked)), list(reversed(motion)), fw, fh, min_side,
                         max_regions=max_regions) == regions
