"""Detection on real models and real images, through the engine (its worker process) as the cameras use it:
the bicycle, dog and truck in dog.jpg, the motorcycle, people in the pedestrian clip, exactly one face on the
astronaut; regions of a frame find the people the whole frame finds. And the decoders on random outputs:
detections inside the image, or ModelError, nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.models.engine import InferenceEngine, _check_sizes, scaled_input
from edgeagent.models.manifest import ImageInput, ModelManifest, load_manifests
from edgeagent.models.preprocess import ItemMeta, PreMeta, fit
from edgeagent.models.registry import get_decoder
from edgeagent.models.types import Box, Detection, InferenceError, ModelError
from tests.media import clip_frames, image

MANIFESTS = load_manifests()
# 4 model-size (416) squares over a 768x576 frame, overlapping by 64 px
REGIONS: list[Box] = [(0, 0, 416, 416), (352, 0, 768, 416), (0, 160, 416, 576), (352, 160, 768, 576)]
CLIP_FRAMES = [0, 100, 200, 300, 400, 500, 600, 700]


@pytest.fixture(scope="module")
def engine() -> Iterator[InferenceEngine]:
    """One engine for the module. Each test runs on its own loop: the engine keeps no loop of its own (a
    request's answer goes to the loop that asked)."""
    eng = InferenceEngine({n: MANIFESTS[n] for n in ("nanodet", "centerface")}, stuck_after_s=60)
    asyncio.run(eng.__aenter__())
    try:
        yield eng
    finally:
        asyncio.run(eng.__aexit__(None, None, None))


def _iou(a: Box, b: Box) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _inside(d: Detection, w: int, h: int) -> bool:
    x1, y1, x2, y2 = d.box
    return 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


async def test_dog_jpg_bicycle_truck_dog(engine: InferenceEngine) -> None:
    img = image("dog.jpg")
    [found] = await engine.infer("nanodet", [img], camera="test")
    best: dict[str, tuple[float, Detection]] = {}
    for d in found:
        assert _inside(d, img.shape[1], img.shape[0]) and d.model == "nanodet"
        if d.score > best.get(d.label, (0.0, d))[0]:
            best[d.label] = (d.score, d)
    assert {"bicycle", "truck", "dog"} <= set(best)
    assert best["bicycle"][0] > 0.6
    # where they are: the bicycle across the middle, the truck top right, the dog bottom left
    bx, tr, dg = best["bicycle"][1], best["truck"][1], best["dog"][1]
    assert _iou(bx.box, (122, 129, 570, 424)) > 0.8
    assert tr.box[0] > img.shape[1] / 2 and tr.box[3] < img.shape[0] / 2
    assert dg.box[0] < img.shape[1] / 2 and dg.box[3] > img.shape[0] / 2


async def test_motorcycle(engine: InferenceEngine) -> None:
    img = image("motorcycle_left.png")
    [found] = await engine.infer("nanodet", [img])
    top = max(found, key=lambda d: d.score)
    assert top.label == "motorcycle" and top.score > 0.6
    assert top.area > 0.4 * img.shape[0] * img.shape[1]  # the motorcycle fills the picture


async def test_people_in_the_clip(engine: InferenceEngine) -> None:
    frames = clip_frames(CLIP_FRAMES[:4])
    found = await engine.infer("nanodet", frames)  # several images in one request
    assert len(found) == len(frames)
    for dets in found:
        people = [d for d in dets if d.label == "person" and d.score >= 0.5]
        assert len(people) >= 3
        assert all(_inside(d, 768, 576) for d in dets)


async def test_astronaut_has_exactly_one_face(engine: InferenceEngine) -> None:
    img = image("astronaut.png")
    [faces] = await engine.infer("centerface", [img])
    assert len(faces) == 1
    face = faces[0]
    assert face.label == "face" and face.score > 0.8 and len(face.points) == 5
    x1, y1, x2, y2 = face.box
    assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y, _s in face.points)
    (lex, ley, _), (rex, rey, _), _nose, (lmx, lmy, _), (rmx, rmy, _) = face.points
    assert lex < rex and lmx < rmx and max(ley, rey) < min(lmy, rmy)  # eyes above the mouth, left of right
    # no face on a picture without one
    [none] = await engine.infer("centerface", [image("dog.jpg")])
    assert none == []


async def test_a_batch_gives_what_single_runs_give(engine: InferenceEngine) -> None:
    """CenterFace batches (max_batch 8): images of different sizes share one padded canvas and still map
    back to their own pixels exactly as when run alone."""
    img = image("astronaut.png")
    crops = [img, np.ascontiguousarray(img[20:340, 100:420]), np.ascontiguousarray(img[:300, 120:])]
    together = await engine.infer("centerface", crops)
    alone = [(await engine.infer("centerface", [c]))[0] for c in crops]
    for t, a in zip(together, alone, strict=True):
        assert len(t) == len(a) == 1
        np.testing.assert_allclose(t[0].box, a[0].box, atol=1.0)
        assert t[0].score == pytest.approx(a[0].score, abs=0.02)


async def test_regions_find_the_people_the_whole_frame_finds(engine: InferenceEngine) -> None:
    for frame in clip_frames(CLIP_FRAMES):
        [whole] = await engine.infer("nanodet", [frame])
        from_regions = await engine.detect_regions("nanodet", frame, REGIONS, camera="cam1")
        covered = [d for d in whole if d.label == "person" and d.score >= 0.5 and any(
            d.box[0] >= r[0] and d.box[1] >= r[1] and d.box[2] <= r[2] and d.box[3] <= r[3] for r in REGIONS)]
        assert covered
        people = [d for d in from_regions if d.label == "person"]
        for d in covered:
            assert max(_iou(d.box, p.box) for p in people) >= 0.5, d
        # what overlapping regions both saw is reported once
        for i, a in enumerate(from_regions):
            assert _inside(a, 768, 576)
            for b in from_regions[i + 1:]:
                assert a.label != b.label or _iou(a.box, b.box) <= 0.5


async def test_regions_are_clipped_and_empty_ones_skipped(engine: InferenceEngine) -> None:
    frame = clip_frames([200])[0]
    # past the frame's edges, negative, empty, not finite: clipped or skipped, never an error
    odd: list[Box] = [(-100, -50, 300, 300), (700, 500, 900, 800), (10, 10, 10, 300), (float("nan"), 0, 5, 5)]
    found = await engine.detect_regions("nanodet", frame, odd)
    assert all(_inside(d, 768, 576) for d in found)
    assert await engine.detect_regions("nanodet", frame, []) == []


# --- decoders on random outputs ------------------------------------------------------------------------

def _values(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    if kind == "normal":
        a = rng.normal(0, 3, shape)
    elif kind == "unit":
        a = rng.random(shape)
    elif kind == "huge":
        a = rng.normal(0, 1e30, shape)
    else:
        a = rng.random(shape)
        mask = rng.random(shape) < 0.2
        a[mask] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[kind]
    return a.astype(np.float32)


def _shape(rng: np.random.Generator, right: tuple[int, ...], wrong: bool) -> tuple[int, ...]:
    if not wrong:
        return right
    dims = list(right)
    if rng.random() < 0.3 and len(dims) > 1:
        dims.pop(int(rng.integers(len(dims))))
    else:
        k = int(rng.integers(len(dims)))
        dims[k] = int(rng.integers(0, 7))
    return tuple(dims)


def _expected_shapes(m: ModelManifest, batch: int, iw: int, ih: int) -> dict[str, tuple[int, ...]]:
    if m.decoder == "nanodet":
        out: dict[str, tuple[int, ...]] = {}
        for k, s in enumerate((8, 16, 32)):
            cells = -(-iw // s) * -(-ih // s)
            out[f"cls{k}"] = (batch, cells, 80)
            out[f"box{k}"] = (batch, cells, 44)
        return out
    return {"537": (batch, 1, ih // 4, iw // 4), "538": (batch, 2, ih // 4, iw // 4),
            "539": (batch, 2, ih // 4, iw // 4), "540": (batch, 10, ih // 4, iw // 4)}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), model=st.sampled_from(["nanodet", "centerface"]),
       kind=st.sampled_from(["normal", "unit", "huge", "nan", "inf", "-inf"]), batch=st.integers(1, 3),
       wrong=st.sampled_from([False, False, True]), w=st.integers(1, 3000), h=st.integers(1, 3000))
def test_decoders_on_random_outputs_stay_inside_or_raise_model_error(
        seed: int, model: str, kind: str, batch: int, wrong: bool, w: int, h: int) -> None:
    rng = np.random.default_rng(seed)
    m = MANIFESTS[model]
    spec = m.input
    assert isinstance(spec, ImageInput)
    iw, ih, item = fit(spec, w, h)
    meta = PreMeta(iw, ih, (item,) * batch)
    outputs = {name: _values(rng, _shape(rng, shape, wrong and rng.random() < 0.5), kind)
               for name, shape in _expected_shapes(m, batch, iw, ih).items()}
    try:
        found = get_decoder(m.decoder)(outputs, meta, m)
    except ModelError:
        return
    assert len(found) == batch
    for dets in found:
        for d in dets:
            assert _inside(d, w, h), d
            assert np.isfinite(d.score)
            assert all(0 <= x <= w and 0 <= y <= h for x, y, _s in d.points)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["normal", "unit", "huge", "nan", "inf"]),
       layout=st.sampled_from(["v5", "v8", "v8t", "random"]), n=st.integers(0, 50), n_cls=st.integers(1, 4),
       labels=st.integers(1, 4), w=st.integers(1, 3000), h=st.integers(1, 3000),
       sig=st.booleans(), norm=st.booleans())
def test_yolo_decoder_on_random_outputs(seed: int, kind: str, layout: str, n: int, n_cls: int, labels: int,
                                        w: int, h: int, sig: bool, norm: bool) -> None:
    from tests.test_models_engine import site_manifest

    rng = np.random.default_rng(seed)
    m = site_manifest(labels=[f"c{k}" for k in range(labels)], params={"sigmoid": sig, "normalized": norm})
    shape = {"v5": (1, n, 5 + n_cls), "v8": (1, 4 + n_cls, n), "v8t": (1, n, 4 + n_cls),
             "random": tuple(int(v) for v in rng.integers(0, 9, int(rng.integers(1, 5))))}[layout]
    out = _values(rng, shape, kind)
    if kind == "unit":
        out *= 64
    meta = PreMeta(64, 64, (ItemMeta(w, h, 64 / w, 64 / h, 0.0, 0.0),))
    try:
        found = get_decoder("yolo")({"output0": out}, meta, m)
    except ModelError:
        return
    assert len(found) == 1
    assert all(_inside(d, w, h) and np.isfinite(d.score) for d in found[0])


async def test_regions_at_a_scale_find_the_people_found_at_full_size(engine: InferenceEngine) -> None:
    """The camera pipeline's crops run at ``detect.scale`` on the dynamic NanoDet: smaller inputs (cheaper in
    proportion), boxes still in frame pixels, and the people found at full size found again."""
    regions: list[Box] = [(100, 60, 420, 400), (300, 200, 768, 576)]
    assert [scaled_input(MANIFESTS["nanodet"].input, int(r[2] - r[0]), int(r[3] - r[1]), 0.75)  # type: ignore[arg-type]
            for r in regions] == [(256, 256), (352, 288)]
    kept = total = 0
    for frame in clip_frames(CLIP_FRAMES):
        full = await engine.detect_regions("nanodet", frame, regions, scale=1.0)
        scaled = await engine.detect_regions("nanodet", frame, regions, scale=0.75)
        assert all(_inside(d, 768, 576) for d in scaled)
        people = [d for d in scaled if d.label == "person"]
        for d in (d for d in full if d.label == "person" and d.score >= 0.5):
            total += 1
            kept += bool(people) and max(_iou(d.box, p.box) for p in people) >= 0.5
    assert total >= 20 and kept >= 0.95 * total, (kept, total)


async def test_input_sizes_asked_for(engine: InferenceEngine) -> None:
    img = image("dog.jpg")  # 768x576
    [at_416] = await engine.infer("nanodet", [img], sizes=[(416, 320)])
    bike = max((d for d in at_416 if d.label == "bicycle"), key=lambda d: d.score)
    assert _iou(bike.box, (122, 129, 570, 424)) > 0.7  # in the image's pixels, not the input's
    for wrong in ([(300, 224)], [(320, 224), (320, 224)], [(0, 32)]):
        with pytest.raises(InferenceError, match="input size"):
            await engine.infer("nanodet", [img], sizes=wrong)
    reader = MANIFESTS["clp_v2_c_rec"]  # fixed 32 rows: it cannot be run at another size
    with pytest.raises(InferenceError, match="takes one input size"):
        _check_sizes([(128, 64)], 1, reader)
    assert _check_sizes([None], 1, reader) is None


@settings(max_examples=300, deadline=None)
@given(w=st.integers(1, 4000), h=st.integers(1, 3000), scale=st.floats(0.05, 1.0))
def test_scaled_input_follows_the_crop_and_never_exceeds_the_model(w: int, h: int, scale: float) -> None:
    spec = MANIFESTS["nanodet"].input
    assert isinstance(spec, ImageInput)
    iw, ih = scaled_input(spec, w, h, scale)
    m = spec.multiple_of
    assert iw % m == 0 and ih % m == 0 and iw >= m and ih >= m
    tw, th = w * scale, h * scale
    if tw * th <= spec.width * spec.height:  # within the budget: each side rounded to the nearest multiple
        assert abs(iw - tw) <= m / 2 + 1e-9 or iw == m
        assert abs(ih - th) <= m / 2 + 1e-9 or ih == m
    else:  # shrunk to the model's pixels, aspect kept (up to rounding)
        assert (iw - m / 2) * (ih - m / 2) <= spec.width * spec.height + 1e-6
    with pytest.raises(ValueError, match="scale"):
        scaled_input(spec, w, h, 0.0)
