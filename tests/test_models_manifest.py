"""Model manifests: the shipped ones load and verify; a wrong sha256, a missing file, a broken manifest give a
clear, located ModelError; site folders override by name. Preprocessing on any image size places the image
where its PreMeta says."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.models.manifest import (
    SHIPPED_DIR,
    ImageInput,
    file_sha256,
    list_models,
    load_manifest,
    load_manifests,
    parse_manifest,
    verify,
    verify_models,
)
from edgeagent.models.preprocess import fit, prepare, preprocess_images
from edgeagent.models.types import InferenceError, ModelError
from tests.media import MODELS

SHIPPED = {"nanodet", "centerface", "clp_det", "clp_v2_c_rec", "movenet-multipose", "nfd-fall", "ppocr_rec"}
NANODET_YAML = (MODELS / "nanodet.yaml").read_text(encoding="utf-8")
GOOD_SHA = "e4a37951d0479dc15e327618ef529745c7096917f9cfa8b0c2d4a5f854e1f200"


def _site(tmp_path: Path, text: str, name: str = "site.yaml", model: str = "nanodet.onnx") -> Path:
    """A site folder holding one manifest and a link to a shipped model file."""
    tmp_path.mkdir(exist_ok=True)
    link = tmp_path / model
    if not link.exists():
        link.symlink_to(MODELS / model)
    (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def test_shipped_manifests_load_and_verify() -> None:
    manifests = load_manifests()
    assert set(manifests) == SHIPPED
    for m in manifests.values():
        verify(m)
        assert m.path.parent == SHIPPED_DIR
        assert m.path.is_file()
    assert manifests["nanodet"].labels_list[:4] == ("person", "bicycle", "car", "motorcycle")
    assert len(manifests["nanodet"].labels_list) == 80
    assert len(manifests["clp_v2_c_rec"].labels_list) == 72  # the reader's dictionary, from its file
    # the converted CenterFace: its manifest says what was changed, with the new hash
    cf = manifests["centerface"]
    assert cf.conversion is not None and "update_model_dims" in cf.conversion
    assert cf.sha256 == file_sha256(cf.path)
    assert "09189deaaf8646c5" in cf.source  # the original file's hash, as published
    assert all(m.int8 is None for m in manifests.values())  # no int8 variant ships


def test_list_and_verify_rows() -> None:
    rows = {r["name"]: r for r in list_models()}
    assert set(rows) == SHIPPED
    assert rows["nanodet"]["input"] == "416x416 or any /32 NCHW float32 BGR stretch"
    assert rows["nanodet"]["labels"] == 80 and rows["nanodet"]["shipped"] is True
    assert rows["centerface"]["input"].startswith("up to 640x640 /32")
    assert rows["nfd-fall"]["input"] == "tensor 32x60 float32"
    results = verify_models()
    assert {name for name, _ok, _detail in results} == SHIPPED
    assert all(ok for _name, ok, _detail in results), results


def test_wrong_sha256_names_the_manifest_and_says_what_to_do(tmp_path: Path) -> None:
    wrong = "ab" * 32
    site = _site(tmp_path, NANODET_YAML.replace(GOOD_SHA, wrong), "nanodet.yaml")
    m = load_manifest(site / "nanodet.yaml")
    with pytest.raises(ModelError) as err:
        verify(m)
    msg = str(err.value)
    assert str(site / "nanodet.yaml") in msg and "'nanodet'" in msg
    assert "abababababababab..." in msg and "e4a37951d0479dc1..." in msg  # expected and actual prefixes
    assert f"sha256: {GOOD_SHA}" in msg and "restore" in msg
    # verify_models reports it and carries on with the rest
    results = {name: (ok, detail) for name, ok, detail in verify_models([site])}
    assert results["nanodet"][0] is False and "abababababababab..." in results["nanodet"][1]
    assert results["centerface"][0] is True


def test_missing_model_file(tmp_path: Path) -> None:
    (tmp_path / "ghost.yaml").write_text(NANODET_YAML.replace("name: nanodet", "name: ghost")
                                         .replace("file: nanodet.onnx", "file: ghost.onnx"), encoding="utf-8")
    m = load_manifest(tmp_path / "ghost.yaml")
    with pytest.raises(ModelError, match=r"ghost\.yaml: model 'ghost': the file .*ghost\.onnx does not exist"):
        verify(m)


def test_missing_manifest_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such manifest file"):
        load_manifest(tmp_path / "nope.yaml")
    with pytest.raises(ModelError, match="model folder does not exist"):
        load_manifests([tmp_path / "nope"])


@pytest.mark.parametrize(("edit", "expected"), [
    (("task: detect", "task: [detect"), r"fire\.yaml:12:\d+: not valid YAML"),
    (("  layout: NCHW", "  layuot: NCHW"), r"fire\.yaml:17:3: input\.layuot: unknown key \(did you mean 'layout'\?"),
    (("layout: NCHW", "layout: NCWH"), r"fire\.yaml:17:3: input\.layout: 'NCWH' is not one of"),
    (("width: 416", "width: wide"), r"fire\.yaml:13:3: input\.width: .*valid integer"),
    (("width: 416", "width: 0"), r"fire\.yaml:13:3: input\.width: must be at least 1"),
    (("resize: stretch ", "scale: 0.5\n  resize: stretch "), r"fire\.yaml:22:3: input\.scale: give std or scale"),
    (("dtype: float32", "dtype: int32"), r"fire\.yaml:18:3: input\.dtype: a int32 input takes raw pixels"),
    (("decoder: nanodet", "decoder: nanodett"), r"fire\.yaml:23:1: decoder: unknown decoder 'nanodett'"),
    (("reg_max: 10", "reg_maxx: 10"), r"fire\.yaml:26:3: decoder_params\.reg_maxx: unknown key \(did you mean"),
    ((f"sha256: {GOOD_SHA}", "sha256: e4a3"), r"fire\.yaml:4:1: sha256: 'e4a3' is not a sha256"),
    ((f"sha256: {GOOD_SHA}\n", ""), r"fire\.yaml:1:1: sha256: required key is missing"),
    (("nms_iou: 0.5", "nms_iou: 1.5"), r"fire\.yaml:\d+:3: thresholds\.nms_iou: must be at most 1"),
    (("max_batch: 1 ", "max_batch: 0 "), r"fire\.yaml:\d+:1: max_batch: must be at least 1"),
    (("labels: [person,", "labels: {file: nope.txt}\nxlabels: [person,"), r"fire\.yaml:\d+:1: xlabels: unknown key"),
    (("file: nanodet.onnx", "file: /etc/nanodet.onnx"), r"fire\.yaml:3:1: file: .* must be relative"),
])
def test_broken_manifest_is_a_located_error(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    text = NANODET_YAML.replace(*edit)
    assert text != NANODET_YAML
    with pytest.raises(ModelError, match=expected):
        parse_manifest(text, tmp_path / "fire.yaml")


def test_labels_file_missing_is_located(tmp_path: Path) -> None:
    text = NANODET_YAML.split("labels:")[0] + "labels: {file: nope.txt}\nmax_batch: 1\n"
    with pytest.raises(ModelError, match=r"fire\.yaml:\d+:\d+: labels\.file: no such file .*nope\.txt"):
        parse_manifest(text, tmp_path / "fire.yaml")


def test_empty_and_non_mapping_manifests(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="the manifest is empty"):
        parse_manifest("# nothing here\n", tmp_path / "a.yaml")
    with pytest.raises(ModelError, match=r"a\.yaml:1:1: the top level must be a mapping"):
        parse_manifest("- nanodet\n", tmp_path / "a.yaml")


def test_site_folder_overrides_by_name_and_adds(tmp_path: Path) -> None:
    site = _site(tmp_path / "site", NANODET_YAML.replace("score: 0.35", "score: 0.6"), "nanodet.yaml")
    (site / "extra.yaml").write_text(NANODET_YAML.replace("name: nanodet", "name: nanodet-site"), encoding="utf-8")
    manifests = load_manifests([site])
    assert manifests["nanodet"].thresholds.score == 0.6
    assert manifests["nanodet"].path == site / "nanodet.onnx"
    assert manifests["nanodet-site"].path == site / "nanodet.onnx"
    assert set(manifests) == SHIPPED | {"nanodet-site"}
    assert load_manifests([site], shipped=False).keys() == {"nanodet", "nanodet-site"}
    # two manifests of one name in one folder: refused
    (site / "again.yaml").write_text(NANODET_YAML, encoding="utf-8")
    with pytest.raises(ModelError, match="also defined in"):
        load_manifests([site])


def test_verify_models_reports_a_broken_manifest_by_file(tmp_path: Path) -> None:
    site = _site(tmp_path, NANODET_YAML.replace("layout: NCHW", "layout: NCWH"), "broken.yaml")
    results = verify_models([site])
    broken = [r for r in results if r[0] == "broken.yaml"]
    assert broken and broken[0][1] is False and "input.layout" in broken[0][2]
    assert sum(1 for r in results if r[1]) == len(SHIPPED)


def test_manifest_survives_pickling() -> None:
    """The engine sends manifests to its worker process: the resolved path and labels must travel."""
    import pickle

    m = load_manifests()["clp_v2_c_rec"]
    back = pickle.loads(pickle.dumps(m, protocol=5))
    assert back.path == m.path and back.labels_list == m.labels_list and back.where == m.where


def test_shipped_dir_copy_is_self_contained(tmp_path: Path) -> None:
    """A manifest's file and labels resolve against its own folder, wherever that is."""
    for name in ("clp_v2_c_rec.yaml", "clp_dict.txt"):
        shutil.copy(MODELS / name, tmp_path / name)
    (tmp_path / "clp_v2_c_rec.onnx").symlink_to(MODELS / "clp_v2_c_rec.onnx")
    m = load_manifest(tmp_path / "clp_v2_c_rec.yaml")
    verify(m)
    assert m.path == tmp_path.resolve() / "clp_v2_c_rec.onnx"


# --- preprocessing --------------------------------------------------------------------------------------

def _spec(**kw: object) -> ImageInput:
    base: dict[str, object] = {"width": 416, "height": 416}
    base.update(kw)
    return ImageInput.model_validate(base)


def test_preprocess_values_layout_colour_normalization() -> None:
    # one 2x1 image: a blue pixel then a red one (BGR)
    img = np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8)
    spec = _spec(width=2, height=1, colour="RGB", mean=[10.0, 20.0, 30.0], std=[2.0, 4.0, 5.0], resize="stretch")
    x, meta = preprocess_images([img], spec)
    assert x.shape == (1, 3, 1, 2) and x.dtype == np.float32
    # RGB order: channel 0 is red
    assert x[0, :, 0, 0].tolist() == [(0 - 10) / 2, (0 - 20) / 4, (255 - 30) / 5]
    assert x[0, :, 0, 1].tolist() == [(255 - 10) / 2, (0 - 20) / 4, (0 - 30) / 5]
    assert meta.items[0].scale_x == 1.0 and meta.items[0].pad_x == 0.0
    nhwc, _ = preprocess_images([img], _spec(width=2, height=1, layout="NHWC", dtype="int32", resize="stretch"))
    assert nhwc.shape == (1, 1, 2, 3) and nhwc.dtype == np.int32 and nhwc[0, 0, 0].tolist() == [255, 0, 0]
    scaled, _ = preprocess_images([img], _spec(width=2, height=1, scale=1 / 255, resize="stretch"))
    assert scaled[0, 0, 0, 0] == pytest.approx(1.0)


def test_preprocess_refuses_unusable_images() -> None:
    spec = _spec()
    for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8), np.zeros((4, 4, 2), np.uint8)):
        with pytest.raises(InferenceError):
            preprocess_images([bad], spec)
    grey, _ = preprocess_images([np.full((8, 8), 7, np.uint8)], spec)  # grey is taken as BGR
    assert grey.shape == (1, 3, 416, 416)
    with pytest.raises(InferenceError, match="sample must have shape"):
        prepare([np.zeros((31, 60), np.float32)], load_manifests()["nfd-fall"])


SPECS = [
    _spec(),  # letterbox 416
    _spec(width=320, height=192, resize="stretch"),
    _spec(width=640, height=640, dynamic=True, multiple_of=32, colour="RGB", pad_value=0),
    _spec(width=256, height=256, layout="NHWC", dtype="int32", pad_value=0),
]


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 4000), h=st.integers(1, 3000), which=st.integers(0, len(SPECS) - 1))
def test_preprocess_any_size_places_the_image_where_meta_says(w: int, h: int, which: int) -> None:
    spec = SPECS[which]
    img = np.full((h, w, 3), 200, dtype=np.uint8)
    x, meta = preprocess_images([img], spec)
    item = meta.items[0]
    assert (item.orig_w, item.orig_h) == (w, h)
    if spec.dynamic:
        assert meta.input_w % spec.multiple_of == 0 and meta.input_h % spec.multiple_of == 0
        assert meta.input_w <= spec.width and meta.input_h <= spec.height
    else:
        assert (meta.input_w, meta.input_h) == (spec.width, spec.height)
    hw = x.shape[2:4] if spec.layout == "NCHW" else x.shape[1:3]
    assert tuple(hw) == (meta.input_h, meta.input_w)
    # the image's corners map into the input and back to themselves
    corners = np.array([[0.0, 0.0, float(w), float(h)]])
    into = corners.copy()
    into[:, 0::2] = corners[:, 0::2] * item.scale_x + item.pad_x
    into[:, 1::2] = corners[:, 1::2] * item.scale_y + item.pad_y
    assert 0 <= into[0, 0] < into[0, 2] <= meta.input_w + 1e-6
    assert 0 <= into[0, 1] < into[0, 3] <= meta.input_h + 1e-6
    np.testing.assert_allclose(item.boxes_to_original(into), corners, atol=1e-6)
    # the pixel at the centre of the placed image is the image's, outside it the padding
    plane = x[0, 0] if spec.layout == "NCHW" else x[0, ..., 0]
    cy, cx = int((into[0, 1] + into[0, 3]) / 2), int((into[0, 0] + into[0, 2]) / 2)
    assert plane[min(cy, meta.input_h - 1), min(cx, meta.input_w - 1)] == 200
    if into[0, 2] < meta.input_w - 1:
        assert plane[cy, meta.input_w - 1] == spec.pad_value
    if into[0, 3] < meta.input_h - 1:
        assert plane[meta.input_h - 1, cx] == spec.pad_value


def test_dynamic_batch_shares_one_canvas() -> None:
    spec = SPECS[2]
    a, b = np.zeros((100, 300, 3), np.uint8), np.zeros((500, 200, 3), np.uint8)
    x, meta = preprocess_images([a, b], spec)
    sizes = [fit(spec, im.shape[1], im.shape[0])[:2] for im in (a, b)]
    assert (meta.input_w, meta.input_h) == (max(s[0] for s in sizes), max(s[1] for s in sizes))
    assert x.shape == (2, 3, meta.input_h, meta.input_w)
    assert all(item.pad_x == 0 and item.pad_y == 0 for item in meta.items)
