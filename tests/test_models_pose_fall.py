"""MoveNet multipose on a person box of a real photo, and the temporal fall head on pose time series built
from that photo's real keypoints.

The motions are synthetic (no package ships a video of a fall): person.jpg's skeleton, as MoveNet found it,
rotated, dropped or moved over time, with a little keypoint noise, fed at camera rates and resampled by
``FallWindow``. What the head did with each (probabilities normal / descending / fallen / recovering) is
written beside the assertions; the assertions hold the requirement (falls read fallen, the rest does not),
not whatever the model happened to say.
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
from hypothesis.extra import numpy as hnp

from edgeagent.models.decoders import fall, pose
from edgeagent.models.manifest import load_manifest
from edgeagent.models.preprocess import ItemMeta, PreMeta
from edgeagent.models.types import ModelError
from tests.media import MODELS, image

# The person in person.jpg (640x424), drawn by eye around the whole body (hat to boots).
PERSON_BOX = (188.0, 98.0, 278.0, 375.0)
NORMAL, DESCENDING, FALLEN, RECOVERING = range(4)


def _session(name: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(MODELS / name), sess_options=options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def movenet() -> ort.InferenceSession:
    return _session("movenet-multipose.onnx")


@pytest.fixture(scope="module")
def head() -> Callable[[np.ndarray], np.ndarray]:
    session = _session("nfd-fall.onnx")
    assert [i.name for i in session.get_inputs()] == ["pose_history"]
    assert session.get_inputs()[0].shape == ["people", 32, 60]
    assert session.get_outputs()[0].shape == ["people", 4]
    return lambda x: fall.fall_probabilities(session.run(None, {"pose_history": x})[0])


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return image("person.jpg")


@pytest.fixture(scope="module")
def skeleton(movenet: ort.InferenceSession, photo: np.ndarray) -> np.ndarray:
    tensor, meta = pose.pose_input(photo, PERSON_BOX)
    found = pose.decode_movenet(movenet.run(None, {"input": tensor})[0], meta)[0]
    best = pose.best_pose(found, PERSON_BOX)
    assert best is not None
    return pose.keypoints_array(best).astype(np.float64)


# --- MoveNet --------------------------------------------------------------------------------------------


def test_pose_on_person_box(skeleton: np.ndarray) -> None:
    confident = skeleton[:, 2] > 0.3
    assert confident.sum() >= 12  # seen: 16 of 17 (the left wrist .24)
    x1, y1, x2, y2 = PERSON_BOX
    margin = 0.05 * (y2 - y1)
    xs, ys = skeleton[confident, 0], skeleton[confident, 1]
    assert (xs >= x1 - margin).all() and (xs <= x2 + margin).all()
    assert (ys >= y1 - margin).all() and (ys <= y2 + margin).all()
    # head above shoulders above hips above knees above ankles (the photo is upright)
    nose, shoulders, hips, knees, ankles = (skeleton[list(i), 1].mean() for i in ([0], [5, 6], [11, 12], [13, 14],
                                                                                [15, 16]))
    assert nose < shoulders < hips < knees < ankles


def test_engine_path_crop_maps_back_like_pose_input(movenet: ort.InferenceSession, photo: np.ndarray,
                                                    skeleton: np.ndarray) -> None:
    """Through the engine the crop is the image: the decoder returns crop pixels and PoseCrop.to_frame
    moves them; the result must match pose_input's direct mapping."""
    from edgeagent.models.preprocess import prepare
    from edgeagent.models.registry import get_decoder

    manifest = load_manifest(MODELS / "movenet-multipose.yaml")
    crop, where = pose.pose_crop(photo, PERSON_BOX)
    tensor, meta = prepare([crop], manifest)
    assert tensor.shape == (1, 256, 256, 3) and tensor.dtype == np.int32
    found = get_decoder("movenet_multipose")({"output_0": movenet.run(None, {"input": tensor})[0]}, meta, manifest)
    best = pose.best_pose([where.to_frame(d) for d in found[0]], PERSON_BOX)
    assert best is not None and best.label == "person_pose" and best.model == manifest.name
    assert np.allclose(pose.keypoints_array(best), skeleton, atol=0.5)


def test_whole_frame_letterbox_maps_back(movenet: ort.InferenceSession, photo: np.ndarray) -> None:
    """The whole photo letterboxed by the engine's preprocessing (pad above and below): the person's pose
    lands on the person (seen: box 188-275 x 99-375, 16 keypoints above 0.3)."""
    from edgeagent.models.preprocess import prepare
    from edgeagent.models.registry import get_decoder

    manifest = load_manifest(MODELS / "movenet-multipose.yaml")
    tensor, meta = prepare([photo], manifest)
    assert meta.items[0].pad_y > 0
    found = get_decoder("movenet_multipose")({"output_0": movenet.run(None, {"input": tensor})[0]}, meta, manifest)
    best = pose.best_pose(found[0], PERSON_BOX)
    assert best is not None
    x1, y1, x2, y2 = best.box
    assert abs(x1 - PERSON_BOX[0]) < 10 and abs(y1 - PERSON_BOX[1]) < 10
    assert abs(x2 - PERSON_BOX[2]) < 10 and abs(y2 - PERSON_BOX[3]) < 10
    assert (pose.keypoints_array(best)[:, 2] > 0.3).sum() >= 12


def test_crop_beyond_the_frame_edge(movenet: ort.InferenceSession, photo: np.ndarray) -> None:
    # A box at the corner: the square runs past the frame (black there); whatever comes back lies inside.
    tensor, meta = pose.pose_input(photo, (0.0, 0.0, 60.0, 200.0))
    for det in pose.decode_movenet(movenet.run(None, {"input": tensor})[0], meta, min_score=0.0)[0]:
        assert 0 <= det.box[0] < det.box[2] <= 640 and 0 <= det.box[1] < det.box[3] <= 424
        assert all(0 <= x <= 640 and 0 <= y <= 424 for x, y, _ in det.points)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), people=st.integers(1, 8), w=st.integers(1, 2000), h=st.integers(1, 2000),
       min_score=st.floats(0, 1))
def test_movenet_random_outputs_stay_inside_the_image(data: st.DataObject, people: int, w: int, h: int,
                                                      min_score: float) -> None:
    rows = data.draw(hnp.arrays(np.float32, (1, people, 56), elements=st.floats(width=32, allow_nan=True,
                                                                                  allow_infinity=True)))
    s = 256 / max(w, h)
    meta = PreMeta(256, 256, (ItemMeta(w, h, s, s, (256 - w * s) / 2, (256 - h * s) / 2),))
    (found,) = pose.decode_movenet(rows, meta, min_score=min_score)
    for det in found:
        assert 0 <= det.box[0] < det.box[2] <= w and 0 <= det.box[1] < det.box[3] <= h
        assert len(det.points) == 17
        assert all(0 <= x <= w and 0 <= y <= h and 0 <= sc <= 1 for x, y, sc in det.points)
        assert min_score <= det.score <= 1


@pytest.mark.parametrize("shape", [(1, 6, 55), (6, 56), (2, 6, 56), (1, 6, 17, 3)])
def test_movenet_wrong_shapes_raise_model_error(shape: tuple[int, ...]) -> None:
    meta = PreMeta(256, 256, (ItemMeta(256, 256, 1.0, 1.0, 0.0, 0.0),))
    with pytest.raises(ModelError):
        pose.decode_movenet(np.zeros(shape, np.float32), meta)


def test_pose_square_rejects_empty_box() -> None:
    with pytest.raises(ValueError, match="x1 < x2"):
        pose.pose_square((10.0, 10.0, 10.0, 50.0))


# --- fall features and window --------------------------------------------------------------------------


def test_features_layout_on_a_known_pose() -> None:
    kp = np.zeros((17, 3), np.float32)
    kp[:, 0] = np.linspace(0.4, 0.6, 17)
    kp[:, 1] = np.linspace(0.2, 0.8, 17)
    kp[:, 2] = 0.9
    kp[0, 2] = 0.1  # counts for the box (>= .05), not for the visible share (< .15)
    f = fall.pose_features(kp[None])[0]
    # box: x .4-.6 padded by max(.02, .2*.08=.016) -> .38-.62; y .2-.8 padded by max(.02, .03) -> .17-.83
    assert np.allclose(f[51:56], [0.5, 0.5, 0.24, 0.66, 0.24 / 0.66], atol=1e-6)
    assert np.isclose(f[0], (0.4 - 0.5) / 0.24) and np.isclose(f[1], (0.2 - 0.5) / 0.66)
    assert np.allclose(f[34:51], kp[:, 2])
    assert np.allclose(f[56:59], [kp[[5, 6], 1].mean(), kp[[11, 12], 1].mean(), kp[[15, 16], 1].mean()])
    assert np.isclose(f[59], 16 / 17)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, (3, 17, 3), elements=st.floats(0, 1, width=32)))
def test_features_bounded(poses: np.ndarray) -> None:
    f = fall.pose_features(poses)
    assert f.shape == (3, 60) and np.isfinite(f).all()
    assert (np.abs(f[:, :34]) <= 2).all() and (f[:, 53:55] >= 1e-4).all() and (f[:, 55] <= 5).all()


def test_window_resamples_to_8_fps() -> None:
    window = fall.FallWindow(100, 100, reference="frame")
    kp = np.zeros((17, 3))
    kp[:, 2] = 1.0
    added = []
    for i in range(21):  # 5 fps for 4 s, x moving 10 px a second
        kp[:, 0] = 10.0 * i / 5
        added.append(window.push(kp, i / 5))
    assert sum(added) == 33 and window.ready and window.frames == 32  # grid 0 .. 4.0 s, the oldest dropped
    xs = window.poses()[:, 0, 0] * 100
    assert np.allclose(xs, 10.0 * (np.arange(1, 33) / 8), atol=1e-4)  # interpolated positions on the grid
    assert window.push(kp, 4.0) == 0 and window.ignored == 1  # not later than the last
    assert window.push(kp, 5.5) == 1 and window.resets == 1 and window.frames == 1  # a 1.5 s gap restarts


def test_window_features_pad_a_young_window() -> None:
    window = fall.FallWindow(640, 480)
    with pytest.raises(ValueError, match="no pose"):
        fall.fall_features(window)
    kp = np.column_stack([np.linspace(100, 120, 17), np.linspace(100, 300, 17), np.ones(17)])
    window.push(kp, 0.0)
    window.push(kp + np.asarray([0.0, 10.0, 0.0]), 0.25)
    f = fall.fall_features(window)
    assert f.shape == (32, 60) and not window.ready
    assert np.array_equal(f[0], f[29]) and not np.array_equal(f[30], f[31])
    # the person reference: a square 200/0.6 px centred on the first pose
    x1, y1, x2, y2 = window.reference
    assert np.isclose(x2 - x1, 200 / 0.6) and np.isclose(y2 - y1, 200 / 0.6)
    assert np.isclose((x1 + x2) / 2, 110) and np.isclose((y1 + y2) / 2, 200)


def test_window_rejects_bad_poses() -> None:
    window = fall.FallWindow(640, 480)
    with pytest.raises(ValueError):
        window.push(np.zeros((16, 3)), 0.0)
    with pytest.raises(ValueError):
        window.push(np.full((17, 3), np.nan), 0.0)
    with pytest.raises(ValueError):
        fall.FallWindow(640, 480, reference=(10.0, 10.0, 5.0, 20.0))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.floats(0.001, 2.0), st.floats(-50, 700), st.floats(-50, 500)), min_size=1,
                max_size=60))
def test_window_bounded_and_in_range(steps: list[tuple[float, float, float]]) -> None:
    window = fall.FallWindow(640, 480)
    t = 0.0
    for dt, x, y in steps:
        t += dt
        kp = np.column_stack([x + np.arange(17), y + 3 * np.arange(17), np.full(17, 0.8)])
        window.push(kp, t)
        assert 1 <= window.frames <= 32
        poses = window.poses()
        assert ((poses[..., :2] >= 0) & (poses[..., :2] <= 1)).all()
    assert fall.fall_features(window).shape == (32, 60)


def test_head_decoder_through_registry() -> None:
    from edgeagent.models.preprocess import prepare
    from edgeagent.models.registry import get_decoder

    manifest = load_manifest(MODELS / "nfd-fall.yaml")
    logits = np.asarray([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 1.0]], np.float32)
    _, meta = prepare([np.zeros((32, 60), np.float32)] * 2, manifest)
    found = get_decoder("fall_head")({"state_logits": logits}, meta, manifest)
    assert [d[0].label for d in found] == ["normal", "fallen"]
    assert found[1][0].class_id == FALLEN and math.isclose(sum(found[1][0].extra.values()), 1.0, rel_tol=1e-5)
    with pytest.raises(ModelError):
        get_decoder("fall_head")({"state_logits": logits[:1]}, meta, manifest)
    with pytest.raises(ModelError):
        get_decoder("fall_head")({"state_logits": np.zeros((2, 3), np.float32)}, meta, manifest)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(0, 4), st.integers(0, 6)),
                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_head_probabilities_or_model_error(logits: np.ndarray) -> None:
    try:
        probs = fall.fall_probabilities(logits)
    except ModelError:
        assert logits.shape[1] != 4 or not np.isfinite(logits).all()
        return
    assert probs.shape == logits.shape and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


# --- the head on motions ------------------------------------------------------------------------------


def _smooth(x: float) -> float:
    x = min(max(x, 0.0), 1.0)
    return x * x * (3 - 2 * x)


def _rotate(kp: np.ndarray, angle: float, pivot: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
    out = kp.copy()
    c, s = math.cos(angle), math.sin(angle)
    out[rows, :2] = (kp[rows, :2] - pivot) @ np.asarray([[c, -s], [s, c]]).T + pivot
    return out


Motion = Callable[[float], np.ndarray]


def _motions(base: np.ndarray) -> dict[str, Motion]:
    height = float(base[[15, 16], 1].mean() - base[0, 1])
    ankles, hips = base[[15, 16], :2].mean(axis=0), base[[11, 12], :2].mean(axis=0)
    thigh = float(np.linalg.norm(base[[13, 14], :2].mean(axis=0) - hips))

    def fall_(t: float) -> np.ndarray:  # stands 5 s, then topples sideways about the ankles in 0.5 s
        return _rotate(base, 1.45 * _smooth((t - 5.0) / 0.5), ankles)

    def still(t: float) -> np.ndarray:
        return base.copy()

    def walk(t: float) -> np.ndarray:  # one stride a second, legs and arms alternate, 0.3 heights a second
        k = base.copy()
        g = math.sin(2 * math.pi * t)
        k[[13, 15], 0] += g * 0.07 * height
        k[[14, 16], 0] -= g * 0.07 * height
        k[15, 1] -= max(0.0, g) * 0.04 * height
        k[16, 1] -= max(0.0, -g) * 0.04 * height
        k[[7, 9], 0] -= g * 0.05 * height
        k[[8, 10], 0] += g * 0.05 * height
        k[:, 0] += 0.3 * height * (t - 4.0)
        return k

    def sit(t: float) -> np.ndarray:  # sits down over 2 s from t = 4 s: hips drop most of a thigh
        p = _smooth((t - 4.0) / 2.0)
        k = base.copy()
        k[:13, 1] += p * thigh * 0.85
        k[[13, 14], 1] -= p * thigh * 0.15
        k[[13, 14], 0] += np.asarray([-1.0, 1.0]) * p * 0.03 * height
        return k

    def bend(t: float) -> np.ndarray:  # bends forward 75 degrees at the hips over 1.5 s from t = 4 s, stays
        return _rotate(base, -1.3 * _smooth((t - 4.0) / 1.5), hips, slice(0, 11))

    return {"fall": fall_, "still": still, "walk": walk, "sit": sit, "bend": bend}


def _trace(head: Callable[[np.ndarray], np.ndarray], motion: Motion, *, fps: float, seconds: float,
           scale: float = 1.0, reference: Any = "person") -> list[tuple[float, np.ndarray]]:
    """Feed ``motion`` at ``fps`` with 0.4% of body height of keypoint noise; the head's probabilities at
    every push once the window is full. ``scale`` shrinks the person about a point near the frame's foot."""
    rng = np.random.default_rng(7)
    window = fall.FallWindow(640, 424, reference=reference)
    out = []
    for i in range(int(seconds * fps) + 1):
        t = i / fps
        kp = motion(t)
        kp[:, :2] = (kp[:, :2] - [233.0, 360.0]) * scale + [320.0, 380.0]
        kp[:, :2] += rng.normal(0, 0.004 * 236 * scale, (17, 2))
        window.push(kp, t)
        if window.ready:
            out.append((t, head(fall.fall_features(window)[None])[0]))
    return out


@pytest.mark.parametrize("fps", [5.0, 10.0, 25.0])
def test_fall_reads_descending_then_fallen(head: Any, skeleton: np.ndarray, fps: float) -> None:
    # Seen at 10 fps: normal .96 until the fall starts at 5.0 s; descending .98 at 5.2-5.4 s; fallen .63 at
    # 5.8 s, .85 at 6.0 s, .96 and more from 6.2 s on. The same within .02 at 5 and 25 fps.
    trace = _trace(head, _motions(skeleton)["fall"], fps=fps, seconds=8.0)
    before = [p for t, p in trace if t < 5.0]
    after = [(t, p) for t, p in trace if t >= 5.0]
    assert before and all(p[NORMAL] > 0.8 for p in before)
    first_descending = next(t for t, p in after if p[DESCENDING] > 0.5)
    first_fallen = next(t for t, p in after if p[FALLEN] > 0.5)
    assert first_descending < first_fallen <= 6.5
    assert all(p[FALLEN] > 0.9 for t, p in after if t >= 6.5)


@pytest.mark.parametrize("name", ["still", "walk", "sit", "bend"])
def test_everyday_motions_never_read_fallen(head: Any, skeleton: np.ndarray, name: str) -> None:
    # Seen (max over every full window, 3.9 s to 8 s; fallen / descending):
    #   still .01 / .03; sit .01 / .03;
    #   walk  .02 / .94 (.70 normalized by the frame): walking sideways reads "descending";
    #   bend  .03 / .98: bending over and staying bent reads "descending" (.59 still at the end).
    # So "descending" alone is no fall signal on this head; "fallen" is the one to act on.
    trace = _trace(head, _motions(skeleton)[name], fps=10.0, seconds=8.0)
    assert trace
    assert max(p[FALLEN] for _, p in trace) < 0.1


@pytest.mark.parametrize("scale", [0.3, 0.15])
def test_far_person_fall_needs_the_person_reference(head: Any, skeleton: np.ndarray, scale: float) -> None:
    # A person 17% / 8% of the frame high. Seen: normalized by the frame, the fall peaks at fallen .60 / .08;
    # with the person square (the default) .98 either way, as for a near person.
    motions = _motions(skeleton)
    person = _trace(head, motions["fall"], fps=10.0, seconds=8.0, scale=scale)
    assert max(p[FALLEN] for _, p in person) > 0.9
    assert person[-1][1][FALLEN] > 0.9
    framed = _trace(head, motions["fall"], fps=10.0, seconds=8.0, scale=scale, reference="frame")
    assert max(p[FALLEN] for _, p in framed) < 0.9  # the reason for the default
    still = _trace(head, motions["still"], fps=10.0, seconds=8.0, scale=scale)
    assert max(p[FALLEN] for _, p in still) < 0.1
