"""The Chinese plate detector and reader decoders on the shipped models and real images, and their
contracts on arbitrary model outputs (hypothesis)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgeagent.models.decoders import plates
from edgeagent.models.manifest import load_manifest
from edgeagent.models.types import ModelError
from tests.media import MODELS
from tests.media import image as _image

CHARSET = plates.load_charset(MODELS / "clp_dict.txt")


def _session(name: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(MODELS / name), sess_options=options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def detector() -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    session = _session("clp_det.onnx")
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(None, {input_name: x}), strict=True))

    return run


@pytest.fixture(scope="module")
def reader() -> Callable[[np.ndarray], list[Any]]:
    session = _session("clp_v2_c_rec.onnx")
    input_name = session.get_inputs()[0].name
    return lambda x: session.run(None, {input_name: x})


# --- real images ----------------------------------------------------------------------------------------


def test_car_plate_found_and_read(detector: Any, reader: Any) -> None:
    image = _image("synth_car_with_plate.png")
    found = plates.read_plates(detector, reader, image, CHARSET)
    assert len(found) == 1
    plate = found[0]
    assert plate.label == "plate"
    assert 0.85 <= plate.score <= 1.0
    # the blue plate sits at about x 224-364, y 240-281 in this image
    x1, y1, x2, y2 = plate.box
    assert abs(x1 - 224) < 8 and abs(x2 - 364) < 8 and abs(y1 - 240) < 8 and abs(y2 - 281) < 8
    assert len(plate.points) == 4
    br, bl, tl, tr = ((x, y) for x, y, _ in plate.points)
    assert br[0] > bl[0] and tr[0] > tl[0] and bl[1] > tl[1] and br[1] > tr[1]  # the documented order
    assert plate.text == "京AF0236"
    assert plate.extra["text_score"] > 0.9
    assert plates.plate_format_ok(plate.text)


@pytest.mark.parametrize(("name", "text"), [("synth_plate_jingA.png", "京AF0236"),
                                            ("synth_plate_yueB.png", "粤B12345")])
def test_plate_images_read_through_whole_image_warp(reader: Any, name: str, text: str) -> None:
    image = _image(name)
    crop = plates.warp_plate(image, plates.image_corners(image))
    assert crop.shape == (plates.PLATE_HEIGHT, plates.PLATE_WIDTH, 3)
    (read,) = plates.ctc_greedy_decode(reader(plates.plate_reader_input([crop]))[0], CHARSET)
    assert read.text == text
    assert read.confidence > 0.9
    assert len(read.char_scores) == len(text)
    assert read.confidence == min(read.char_scores)


@pytest.mark.parametrize(("name", "text"), [("synth_plate_jingA.png", "京AF0236"),
                                            ("synth_plate_yueB.png", "粤B12345")])
def test_plate_images_through_detector(detector: Any, reader: Any, name: str, text: str) -> None:
    # A plate filling the whole image is unusual for the detector; seen here it finds it (.98 and .96)
    # with corners just inside the blue field, and the reader still reads it right.
    found = plates.read_plates(detector, reader, _image(name), CHARSET)
    assert len(found) == 1
    assert found[0].score > 0.9
    assert found[0].text == text


def test_no_plate_in_dog_photo(detector: Any, reader: Any) -> None:
    assert plates.read_plates(detector, reader, _image("dog.jpg"), CHARSET) == []


def test_corner_order_matters(detector: Any, reader: Any) -> None:
    image = _image("synth_car_with_plate.png")
    (plate,) = plates.read_plates(detector, reader, image, CHARSET)
    quad = np.asarray([(x, y) for x, y, _ in plate.points], dtype=np.float32)
    right = plates.warp_plate(image, quad)
    mirrored = plates.warp_plate(image, quad[[1, 0, 3, 2]])  # left and right swapped
    reads = plates.ctc_greedy_decode(reader(plates.plate_reader_input([right, mirrored]))[0], CHARSET)
    assert reads[0].text == "京AF0236"
    assert reads[1].text != "京AF0236"


def test_batched_reads_match_single_reads(reader: Any) -> None:
    crops = [plates.warp_plate(image, plates.image_corners(image))
             for image in (_image("synth_plate_jingA.png"), _image("synth_plate_yueB.png"))]
    batched = plates.ctc_greedy_decode(reader(plates.plate_reader_input(crops))[0], CHARSET)
    single = [plates.ctc_greedy_decode(reader(plates.plate_reader_input([c]))[0], CHARSET)[0] for c in crops]
    assert [r.text for r in batched] == [r.text for r in single] == ["京AF0236", "粤B12345"]


def test_warp_rejects_bad_corners() -> None:
    image = np.zeros((40, 60, 3), np.uint8)
    with pytest.raises(ValueError, match="4 finite"):
        plates.warp_plate(image, [[0, 0], [1, 1]])
    with pytest.raises(ValueError, match="4 finite"):
        plates.warp_plate(image, [[0, 0], [1, 1], [2, np.nan], [3, 3]])
    with pytest.raises(ValueError, match="no area"):
        plates.warp_plate(image, [[0, 0], [10, 10], [20, 20], [30, 30]])


# --- format ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["京AF0236", "粤B12345", "沪C8888Z", "京AD12345", "粤BFA1234", "粤B12345D",
                                  "川A1234学", "粤Z1234港", "京A1234警"])
def test_plate_format_accepts(text: str) -> None:
    assert plates.plate_format_ok(text)


@pytest.mark.parametrize("text", ["", "京", "京AF023", "京AG02367", "京IF0236", "京AO0236", "AA12345",
                                  "京1F0236", "京AX12345", "粤B1234D5", "学A12345", "京AF0236 ", "京A12学34"])
def test_plate_format_rejects(text: str) -> None:
    assert not plates.plate_format_ok(text)


# --- CTC ------------------------------------------------------------------------------------------------


def _reference_ctc(probs: np.ndarray) -> tuple[str, list[float]]:
    """A plain loop over rows, for comparison."""
    text, scores, prev = "", [], -1
    for row in probs:
        k = int(np.argmax(row))
        if k != prev and k != 0:
            text += CHARSET[k - 1]
            scores.append(float(row[k]))
        elif k == prev and k != 0:
            scores[-1] = max(scores[-1], float(row[k]))
        prev = k
    return text, scores


@settings(max_examples=150, deadline=None)
@given(data=st.data(), batch=st.integers(1, 3), steps=st.integers(0, 40), peaked=st.booleans())
def test_ctc_decode_random_probabilities(data: st.DataObject, batch: int, steps: int, peaked: bool) -> None:
    logits = data.draw(hnp.arrays(np.float32, (batch, steps, len(CHARSET) + 1),
                                  elements=st.floats(-8, 8, width=32)))
    if peaked:  # long runs of one class, as a real reader gives
        logits = np.repeat(logits[:, ::4], 4, axis=1)[:, :steps] * 3
    probs = np.exp(logits - logits.max(axis=2, keepdims=True)) if steps else logits
    if steps:
        probs /= probs.sum(axis=2, keepdims=True)
    reads = plates.ctc_greedy_decode(probs, CHARSET)
    assert len(reads) == batch
    for read, rows in zip(reads, probs, strict=True):
        text, scores = _reference_ctc(rows)
        assert read.text == text
        assert np.allclose(read.char_scores, scores)
        assert len(read.text) <= steps
        assert 0.0 <= read.confidence <= 1.0
        assert read.confidence == (min(read.char_scores) if read.char_scores else 0.0)


def test_ctc_decode_rejects_wrong_class_count_and_nan() -> None:
    with pytest.raises(ModelError, match="expected"):
        plates.ctc_greedy_decode(np.zeros((1, 10, 50), np.float32), CHARSET)
    with pytest.raises(ModelError, match="expected"):
        plates.ctc_greedy_decode(np.zeros((1, 2, 10, 73), np.float32), CHARSET)
    bad = np.full((1, 10, 73), np.nan, np.float32)
    with pytest.raises(ModelError, match="non-finite"):
        plates.ctc_greedy_decode(bad, CHARSET)


# --- detector outputs -----------------------------------------------------------------------------------

_floats = st.floats(width=32, allow_nan=True, allow_infinity=True)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), h=st.integers(1, 72), w=st.integers(1, 72), batch=st.integers(1, 2),
       min_score=st.floats(0.0, 1.0))
def test_detector_random_outputs_stay_inside_the_image(data: st.DataObject, h: int, w: int, batch: int,
                                                       min_score: float) -> None:
    n = plates.clp_priors(h, w).shape[0]
    loc = data.draw(hnp.arrays(np.float32, (batch, n, 4), elements=_floats))
    conf = data.draw(hnp.arrays(np.float32, (batch, n, 2), elements=st.floats(0, 1, width=32) | _floats))
    landms = data.draw(hnp.arrays(np.float32, (batch, n, 8), elements=_floats))
    results = plates.decode_clp_arrays(*plates.split_clp_outputs({"a": landms, "b": conf, "c": loc}), h, w,
                                       min_score=min_score)
    assert len(results) == batch
    for found in results:
        boxes, corners, scores = found.boxes, found.corners, found.scores
        assert boxes.shape[0] == corners.shape[0] == scores.shape[0]
        assert np.isfinite(boxes).all() and np.isfinite(corners).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 0] < boxes[:, 2]).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all() and (boxes[:, 1] < boxes[:, 3]).all()
        assert (corners[..., 0] >= 0).all() and (corners[..., 0] <= w).all()
        assert (corners[..., 1] >= 0).all() and (corners[..., 1] <= h).all()
        assert (scores >= min_score).all()
        assert (np.diff(scores) <= 0).all()  # best first
        for det in plates.plate_detections(found):
            assert 0 <= det.box[0] < det.box[2] <= w and 0 <= det.box[1] < det.box[3] <= h


@settings(max_examples=60, deadline=None)
@given(data=st.data(), h=st.integers(1, 64), w=st.integers(1, 64))
def test_detector_wrong_shapes_raise_model_error(data: st.DataObject, h: int, w: int) -> None:
    n = plates.clp_priors(h, w).shape[0]
    shapes = data.draw(st.sampled_from([
        {"loc": (1, n + 1, 4), "conf": (1, n + 1, 2), "landms": (1, n + 1, 8)},  # another input size
        {"loc": (1, n, 4), "conf": (1, n, 2)},  # an output missing
        {"loc": (1, n, 4), "conf": (1, n, 3), "landms": (1, n, 8)},
        {"loc": (1, n, 4), "conf": (1, n - 1, 2), "landms": (1, n, 8)},
        {"loc": (1, n, 4), "conf": (2, n, 2), "landms": (1, n, 8)},
        {"loc": (n, 4), "conf": (n, 2), "landms": (n, 8)},
        {"loc": (1, n, 4), "conf": (1, n, 2), "landms": (1, n, 8), "extra": (1, n, 4)},
    ]))
    outputs = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    with pytest.raises(ModelError):
        plates.decode_clp_arrays(*plates.split_clp_outputs(outputs), h, w)


def test_nms_keeps_best_of_overlapping() -> None:
    boxes = np.asarray([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    scores = np.asarray([0.6, 0.9, 0.7], np.float32)
    assert plates.nms(boxes, scores, 0.4).tolist() == [1, 2]


# --- through the registry, as the engine calls them ----------------------------------------------------


def test_registry_decoders_on_real_images() -> None:
    from edgeagent.models.preprocess import prepare
    from edgeagent.models.registry import get_decoder

    det_manifest = load_manifest(MODELS / "clp_det.yaml")  # the shipped manifests
    rec_manifest = load_manifest(MODELS / "clp_v2_c_rec.yaml")
    det, rec = _session("clp_det.onnx"), _session("clp_v2_c_rec.onnx")
    car, dog = _image("synth_car_with_plate.png"), _image("dog.jpg")
    # a batch of two images of different sizes (the car scaled up to fit 640, the dog down)
    tensor, meta = prepare([car, dog], det_manifest)
    outputs = dict(zip([o.name for o in det.get_outputs()], det.run(None, {"image": tensor}), strict=True))
    found = get_decoder("clp_det")(outputs, meta, det_manifest)
    assert len(found) == 2 and found[1] == []
    (plate,) = found[0]
    assert plate.score > 0.85 and plate.model == det_manifest.name
    x1, y1, x2, y2 = plate.box
    assert abs(x1 - 224) < 8 and abs(x2 - 364) < 8 and abs(y1 - 240) < 8 and abs(y2 - 281) < 8

    crops = [plates.warp_plate(car, plate.points)] + [
        plates.warp_plate(im, plates.image_corners(im))
        for im in (_image("synth_plate_jingA.png"), _image("synth_plate_yueB.png"))]
    tensor, meta = prepare(crops, rec_manifest)
    outputs = dict(zip([o.name for o in rec.get_outputs()], rec.run(None, {"x": tensor}), strict=True))
    reads = get_decoder("ctc_plate")(outputs, meta, rec_manifest)
    assert [r[0].text for r in reads] == ["京AF0236", "京AF0236", "粤B12345"]
    for (read,) in reads:
        assert read.label == "plate_text" and read.score > 0.9 and read.extra["format_ok"] == 1.0
        assert read.box == (0.0, 0.0, float(plates.PLATE_WIDTH), float(plates.PLATE_HEIGHT))


def test_registry_decoders_reject_a_batch_mismatch() -> None:
    from edgeagent.models.preprocess import prepare

    det_manifest = load_manifest(MODELS / "clp_det.yaml")
    image = np.zeros((64, 64, 3), np.uint8)
    _, meta = prepare([image, image], det_manifest)
    n = plates.clp_priors(meta.input_h, meta.input_w).shape[0]
    outputs = {"loc": np.zeros((1, n, 4), np.float32), "conf": np.zeros((1, n, 2), np.float32),
               "landms": np.zeros((1, n, 8), np.float32)}
    with pytest.raises(ModelError, match="batch of 2"):
        plates.decode_clp_det(outputs, meta, det_manifest)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), w=st.integers(1, 3000), h=st.integers(1, 3000))
def test_registry_detector_random_outputs_inside_the_original_image(data: st.DataObject, w: int, h: int) -> None:
    from edgeagent.models.preprocess import ItemMeta, PreMeta

    manifest = load_manifest(MODELS / "clp_det.yaml")
    in_w, in_h = 64, 32  # a small letterboxed input keeps the draw small; the mapping is what is tested
    s = min(in_w / w, in_h / h)
    meta = PreMeta(in_w, in_h, (ItemMeta(w, h, s, s, (in_w - w * s) / 2, (in_h - h * s) / 2),))
    n = plates.clp_priors(in_h, in_w).shape[0]
    outputs = {name: data.draw(hnp.arrays(np.float32, (1, n, k), elements=_floats))
               for name, k in (("loc", 4), ("conf", 2), ("landms", 8))}
    (found,) = plates.decode_clp_det(outputs, meta, manifest)
    for det in found:
        assert 0 <= det.box[0] < det.box[2] <= w and 0 <= det.box[1] < det.box[3] <= h
        assert all(0 <= x <= w and 0 <= y <= h for x, y, _ in det.points)
