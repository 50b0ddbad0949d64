"""The inference engine: a site's own model through a manifest and no code; the watchdog kills a stuck
inference and the next request works; a full queue refuses at once; a dead worker is replaced; the event
loop keeps running while inference runs; providers; requests waiting together are batched.

The models here are real ONNX files built with onnx.helper: a "fire" detector whose output is a fixed
YOLO tensor, and one that never finishes (a Loop of 10^9 matrix products)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeagent.models.engine import InferenceEngine, _Request
from edgeagent.models.manifest import ModelManifest, file_sha256, load_manifests, parse_manifest
from edgeagent.models.types import EngineBusy, InferenceError, InferenceTimeout, ModelError
from tests.media import image

SHIPPED = load_manifests()
FIRE_YAML = """\
name: {name}
file: {file}
sha256: {sha}
licence: proprietary (test)
source: built by tests/test_models_engine.py with onnx.helper
task: detect
input: {{width: 64, height: 64, layout: NCHW, dtype: float32, colour: RGB, scale: 0.00392156862745098,
        resize: letterbox}}
decoder: yolo
decoder_params: {params}
labels: {labels}
thresholds: {{score: 0.4, nms_iou: 0.5}}
max_batch: 1
"""


def site_manifest(labels: list[str], params: Mapping[str, Any] | None = None, *, name: str = "fire",
                  file: str = "fire.onnx", folder: Path | None = None) -> ModelManifest:
    """A site's manifest for a YOLO-style model (the sha256 is the file's when it exists)."""
    path = (folder or Path("/nonexistent")) / file
    sha = file_sha256(path) if path.is_file() else "ab" * 32
    text = FIRE_YAML.format(name=name, file=file, sha=sha, labels="[" + ", ".join(labels) + "]",
                            params="{" + ", ".join(f"{k}: {str(v).lower()}" for k, v in (params or {}).items()) + "}")
    if folder is not None:
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return parse_manifest(text, (folder or Path("/nonexistent")) / f"{name}.yaml")


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _constant_output_graph(value: np.ndarray, name: str, extra_nodes: list[onnx.NodeProto] | None = None,
                           extra_inits: list[onnx.TensorProto] | None = None, scalar: str = "IM"
                           ) -> onnx.GraphProto:
    """output0 = value + 0 * (a scalar computed from the input), so the output depends on the input."""
    nodes = [helper.make_node("ReduceMean", ["images"], ["IM"], keepdims=0),
             *(extra_nodes or []),
             helper.make_node("Mul", [scalar, "ZERO"], ["Z"]),
             helper.make_node("Add", ["VALUE", "Z"], ["output0"])]
    inits = [*(extra_inits or []), numpy_helper.from_array(value.astype(np.float32), "VALUE"),
             numpy_helper.from_array(np.array(0.0, np.float32), "ZERO")]
    return helper.make_graph(nodes, name, [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
                             [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(value.shape))], inits)


# Three boxes in input pixels (centre x, centre y, width, height) with scores for (fire, smoke).
BOXES = np.array([[32, 32, 16, 8], [16, 40, 8, 8], [50, 10, 6, 6]], dtype=np.float32)
SCORES = np.array([[0.9, 0.1], [0.05, 0.6], [0.1, 0.2]], dtype=np.float32)


def fire_model(folder: Path, fmt: str) -> Path:
    """A fire-and-smoke detector with a fixed YOLOv8 ([1, 4+C, N]) or YOLOv5 ([1, N, 5+C]) output."""
    if fmt == "v8":
        value = np.concatenate([BOXES, SCORES], axis=1).T[None]  # [1, 6, 3]
    else:
        obj = np.ones((3, 1), np.float32)
        value = np.concatenate([BOXES, obj, SCORES], axis=1)[None]  # [1, 3, 7]
    path = folder / "fire.onnx"
    _save(_constant_output_graph(value, "fire"), path)
    return path


def slow_model(folder: Path) -> Path:
    """A model that never finishes in any useful time: a Loop of 10^9 products of 256x256 matrices."""
    n = 256
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_in", "W"], ["y"]), helper.make_node("Tanh", ["y"], ["x_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [n, n])])
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(10**9, np.int64), "M"), numpy_helper.from_array(np.array(True), "C"),
             numpy_helper.from_array(rng.random((n, n), dtype=np.float32) * 0.01, "W"),
             numpy_helper.from_array(np.ones((n, n), np.float32), "X0")]
    nodes = [helper.make_node("Loop", ["M", "C", "X0"], ["XF"], body=body),
             helper.make_node("ReduceSum", ["XF"], ["S"], keepdims=0),
             helper.make_node("Add", ["S", "IM"], ["S2"])]
    path = folder / "slow.onnx"
    _save(_constant_output_graph(np.zeros((1, 6, 1), np.float32), "slow", nodes, inits, scalar="S2"), path)
    return path


@contextlib.asynccontextmanager
async def ticking() -> AsyncIterator[Callable[[], int]]:
    """A task that counts loop turns of 5 ms: it only advances while the loop is free."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(tick())
    try:
        yield lambda: ticks
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("fmt", ["v8", "v5"])
async def test_site_model_by_manifest_without_code(tmp_path: Path, fmt: str) -> None:
    fire_model(tmp_path, fmt)
    site_manifest(["fire", "smoke"], {"format": fmt}, folder=tmp_path)
    manifests = load_manifests([tmp_path])  # shipped models plus the site's
    assert "fire" in manifests and "nanodet" in manifests
    # a 128x64 image letterboxed into 64x64: scale 0.5, 16 px of padding above and below
    img = np.full((64, 128, 3), 90, np.uint8)
    async with InferenceEngine({"fire": manifests["fire"]}) as engine:
        [found] = await engine.infer("fire", [img], camera="roof")
    found.sort(key=lambda d: -d.score)
    assert [(d.label, round(d.score, 3)) for d in found] == [("fire", 0.9), ("smoke", 0.6)]
    # fire: centre (32, 32) 16x8 in the input -> x 24..40, y 28..36 -> original (x / 0.5, (y - 16) / 0.5)
    np.testing.assert_allclose(found[0].box, (48, 24, 80, 40), atol=1e-4)
    np.testing.assert_allclose(found[1].box, (24, 40, 40, 56), atol=1e-4)
    assert found[0].class_id == 0 and found[1].class_id == 1 and found[0].model == "fire"


async def test_watchdog_restarts_a_stuck_inference_and_a_full_queue_refuses(tmp_path: Path) -> None:
    slow_model(tmp_path)
    slow = site_manifest(["fire", "smoke"], name="slow", file="slow.onnx", folder=tmp_path)
    small = np.zeros((32, 32, 3), np.uint8)
    dog = image("dog.jpg")
    engine = InferenceEngine({"slow": slow, "nanodet": SHIPPED["nanodet"]}, queue_size=1, stuck_after_s=1.0,
                             load_timeout_s=1.0)
    async with engine, ticking() as ticks:
        first_pid = engine.stats()["worker_pid"]
        stuck = asyncio.create_task(engine.infer("slow", [small], camera="cam1"))
        await wait_until(lambda: engine.stats()["in_flight"] == 1 and engine.stats()["queue_depth"] == 0,
                         "the slow request to be in flight")
        waiting = asyncio.create_task(engine.infer("nanodet", [dog], camera="cam2"))
        await wait_until(lambda: engine.stats()["queue_depth"] == 1, "the second request to queue")
        # the queue holds 1: a third request is refused at once, and counted
        with pytest.raises(EngineBusy):
            await engine.infer("nanodet", [dog], camera="cam3")
        before = ticks()
        with pytest.raises(InferenceTimeout, match="slow: no answer within"):
            await asyncio.wait_for(stuck, 30)  # fails here if the watchdog never fires
        assert ticks() - before >= 10  # the loop kept running while the worker was stuck
        # the queued request runs on the new worker
        [found] = await waiting
        assert "bicycle" in {d.label for d in found}
        stats = engine.stats()
        assert stats["timeouts"] == 1 and stats["restarts"] == 1 and stats["refused"] == 1
        assert stats["models"]["slow"]["timeouts"] == 1 and stats["models"]["nanodet"]["requests"] == 1
        assert stats["cameras"]["cam3"] == {"requests": 1, "refused": 1, "stale": 0}
        assert stats["worker_pid"] != first_pid
        # and the next request works too
        [again] = await engine.infer("nanodet", [dog])
        assert "bicycle" in {d.label for d in again}


async def test_a_request_whose_turn_comes_too_late_is_refused_as_stale_and_counted(tmp_path: Path) -> None:
    slow_model(tmp_path)
    slow = site_manifest(["fire", "smoke"], name="slow", file="slow.onnx", folder=tmp_path)
    small = np.zeros((32, 32, 3), np.uint8)
    dog = image("dog.jpg")
    engine = InferenceEngine({"slow": slow, "nanodet": SHIPPED["nanodet"]}, queue_size=4, stuck_after_s=1.0,
                             load_timeout_s=1.0)

    refused: list[str] = []
    held: list[str] = []

    async def refused_late() -> None:
        """A camera's request worth 0.3 s; it must be refused, and the error must not lead back to the request:
        a refused request's error once held it (its traceback, infer's frame, the request, its future, the
        error: a cycle) and with it the camera's ~2 MB frame until the next full garbage collection."""
        try:
            await engine.infer("nanodet", [dog.copy()], camera="cam2", max_wait_s=0.3)
        except EngineBusy as exc:
            refused.append(str(exc))
            tb = exc.__traceback__
            while tb is not None:
                held.extend(f"{tb.tb_frame.f_code.co_name}.{name}" for name, value in tb.tb_frame.f_locals.items()
                            if isinstance(value, _Request))
                tb = tb.tb_next

    async with engine:
        stuck = asyncio.create_task(engine.infer("slow", [small], camera="cam1"))
        await wait_until(lambda: engine.stats()["in_flight"] == 1, "the slow request to be in flight")
        # Both wait behind the stuck one (over a second): the one worth 0.3 s is not run, the other is.
        late = asyncio.create_task(refused_late())
        patient = asyncio.create_task(engine.infer("nanodet", [dog], camera="cam3"))
        with pytest.raises(InferenceTimeout):
            await asyncio.wait_for(stuck, 30)
        await late
        assert len(refused) == 1 and "stale" in refused[0], refused
        assert held == [], held
        [found] = await patient
        assert "bicycle" in {d.label for d in found}
        stats = engine.stats()
        assert stats["stale"] == 1 and stats["refused"] == 0
        assert stats["cameras"]["cam2"] == {"requests": 1, "refused": 0, "stale": 1}
        assert stats["models"]["nanodet"]["requests"] == 1  # the stale one never reached the worker
        # A request served in time is unaffected by its bound.
        [again] = await engine.infer("nanodet", [dog], camera="cam2", max_wait_s=5.0)
        assert "bicycle" in {d.label for d in again} and engine.stats()["stale"] == 1
        with pytest.raises(ValueError):
            await engine.infer("nanodet", [dog], max_wait_s=0.0)


async def test_the_loop_runs_while_inference_runs() -> None:
    frames = [image("dog.jpg")] * 3
    async with InferenceEngine({"nanodet": SHIPPED["nanodet"]}) as engine, ticking() as ticks:
        await engine.infer("nanodet", frames[:1])  # the model loads
        for _ in range(3):
            before = ticks()
            await engine.infer("nanodet", frames)
            assert ticks() > before


async def test_a_dead_worker_is_replaced() -> None:
    dog = image("dog.jpg")
    async with InferenceEngine({"nanodet": SHIPPED["nanodet"]}) as engine:
        await engine.infer("nanodet", [dog])
        pid = engine.stats()["worker_pid"]
        os.kill(pid, signal.SIGKILL)  # the engine's own child, by its id

        def dead() -> bool:
            with contextlib.suppress(FileNotFoundError):
                return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
            return True

        await wait_until(dead, "the worker to die")
        with pytest.raises(InferenceError, match="died"):
            await engine.infer("nanodet", [dog])
        [found] = await engine.infer("nanodet", [dog])
        assert "bicycle" in {d.label for d in found}
        stats = engine.stats()
        assert stats["crashes"] == 1 and stats["restarts"] == 1 and stats["worker_pid"] != pid


async def test_providers() -> None:
    with pytest.raises(ModelError, match="unknown execution provider 'warpdrive'"):
        InferenceEngine(SHIPPED, provider="warpdrive")
    absent = InferenceEngine({"nanodet": SHIPPED["nanodet"]}, provider="cuda")
    with pytest.raises(ModelError, match=r"'cuda' \(CUDAExecutionProvider\) is not available.*CPUExecutionProvider"):
        await absent.__aenter__()
    async with InferenceEngine({"nanodet": SHIPPED["nanodet"]}, provider="auto", threads=1) as engine:
        assert engine.stats()["providers"] == ["CPUExecutionProvider"]
        [found] = await engine.infer("nanodet", [image("motorcycle_left.png")])
        assert found[0].label == "motorcycle"


async def test_engine_start_verifies_every_model(tmp_path: Path) -> None:
    (tmp_path / "nanodet.onnx").symlink_to(SHIPPED["nanodet"].path)
    text = SHIPPED["nanodet"].manifest_path.read_text(encoding="utf-8")  # type: ignore[union-attr]
    (tmp_path / "nanodet.yaml").write_text(text.replace(SHIPPED["nanodet"].sha256, "cd" * 32), encoding="utf-8")
    altered = load_manifests([tmp_path], shipped=False)
    with pytest.raises(ModelError, match=r"nanodet\.yaml: model 'nanodet': nanodet\.onnx has sha256 e4a37951d0479dc1"):
        async with InferenceEngine(altered):
            pass


async def test_a_model_that_does_not_fit_its_manifest_fails_its_requests(tmp_path: Path) -> None:
    # The plate reader's graph takes 32 rows; a manifest saying 48 is refused at its first use, each time.
    reader = SHIPPED["clp_v2_c_rec"]
    (tmp_path / reader.path.name).symlink_to(reader.path)
    (tmp_path / "clp_dict.txt").symlink_to(reader.path.parent / "clp_dict.txt")
    text = reader.manifest_path.read_text(encoding="utf-8")  # type: ignore[union-attr]
    (tmp_path / "clp_v2_c_rec.yaml").write_text(text.replace("height: 32", "height: 48"), encoding="utf-8")
    wrong = load_manifests([tmp_path], shipped=False)
    async with InferenceEngine(wrong) as engine:
        for _ in range(2):
            with pytest.raises(InferenceError, match=r"does not match its manifest.*the manifest says 128x48"):
                await engine.infer("clp_v2_c_rec", [image("dog.jpg")])
        assert engine.stats()["models"]["clp_v2_c_rec"]["errors"] == 2


async def test_requests_waiting_together_are_batched() -> None:
    frames = [image("dog.jpg")] * 8
    face = image("astronaut.png")
    async with InferenceEngine({"nanodet": SHIPPED["nanodet"], "centerface": SHIPPED["centerface"]}) as engine:
        [alone] = await engine.infer("centerface", [face])
        # the worker is busy with 8 NanoDet runs while four cameras ask for faces
        busy = asyncio.create_task(engine.infer("nanodet", frames))
        await wait_until(lambda: engine.stats()["in_flight"] == 1, "nanodet to run")
        faces = await asyncio.gather(*(engine.infer("centerface", [face], camera=f"cam{k}") for k in range(4)))
        await busy
        stats = engine.stats()["models"]["centerface"]
        assert stats["requests"] == 5 and stats["batches"] < 5
        for [found] in faces:
            assert len(found) == 1
            np.testing.assert_allclose(found[0].box, alone[0].box, atol=1.0)


async def test_request_errors_and_cancellation() -> None:
    engine = InferenceEngine({"nanodet": SHIPPED["nanodet"]})
    with pytest.raises(InferenceError, match="not running"):
        await engine.infer("nanodet", [image("dog.jpg")])
    async with engine:
        with pytest.raises(ModelError, match="no model 'yolo9'"):
            await engine.infer("yolo9", [image("dog.jpg")])
        with pytest.raises(InferenceError, match="expected uint8"):
            await engine.infer("nanodet", [np.zeros((10, 10, 3), np.float32)])
        assert await engine.infer("nanodet", []) == []
        cancelled = asyncio.create_task(engine.infer("nanodet", [image("dog.jpg")]))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        [found] = await engine.infer("nanodet", [image("dog.jpg")])
        assert "bicycle" in {d.label for d in found}
        stats = engine.stats()
        assert stats["models"]["nanodet"]["p50_ms"] > 0 and stats["models"]["nanodet"]["p99_ms"] > 0
        assert stats["queue_depth"] == 0 and stats["refused"] == 0
    assert engine.stats()["running"] is False


def _rss_anon_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


async def test_a_dynamic_model_run_at_many_sizes_does_not_grow_the_worker() -> None:
    # The cameras run NanoDet at each region's own size: the worker must not keep something per size seen.
    # (onnxruntime's per-shape memory plans grew it ~17 MB over these 100 sizes.)
    img = image("dog.jpg")
    sizes = [(w, h) for h in range(128, 417, 32) for w in range(128, 417, 32)]
    async with InferenceEngine({"nanodet": SHIPPED["nanodet"]}) as engine:
        await engine.infer("nanodet", [img], sizes=[(416, 416)])  # the arena at its largest
        pid = engine._worker.pid  # type: ignore[union-attr]
        before = _rss_anon_mb(pid)
        for size in sizes:
            await engine.infer("nanodet", [img], sizes=[size])
        grown = _rss_anon_mb(pid) - before
    assert grown < 6.0, f"the worker grew {grown:.1f} MB over {len(sizes)} input sizes"
