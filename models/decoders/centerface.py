"""CenterFace outputs → faces with 5 landmarks.

Four maps at a quarter of the input size (``[B, C, H/4, W/4]``): a face-centre heatmap (C=1, sigmoid already
applied), the box size as ``log(size / 4)`` (C=2: height, width), the centre's sub-cell offset (C=2: y, x)
and five landmarks (C=10: y, x pairs, as fractions of the box height and width from its top-left corner).
The scale and offset maps both have two channels, so the four are named in ``decoder_params.outputs``
(default: the model's output order heatmap, scale, offset, landmarks). Each cell above the score threshold is
a face; NMS over all faces. Labels: ``face``; points: eyes, nose, mouth corners as ``(x, y, cell score)``.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgeagent.models.decoders import BoxDecoder, finite_detections, nms, require_outputs
from edgeagent.models.manifest import ModelManifest
from edgeagent.models.preprocess import PreMeta
from edgeagent.models.types import Detection, ModelError

__all__ = ["CenterFaceOutputs", "CenterFaceParams", "decode"]

_STRIDE = 4


class CenterFaceOutputs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    heatmap: str
    scale: str
    offset: str
    landmarks: str


class CenterFaceParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    outputs: CenterFaceOutputs | None = Field(default=None, description="output names; default: model order")
    max_detections: int = Field(default=200, ge=1)


class _CenterFace(BoxDecoder[CenterFaceParams]):
    params_model = CenterFaceParams

    def _decode(self, outputs: dict[str, np.ndarray], meta: PreMeta, manifest: ModelManifest, params: CenterFaceParams
                ) -> list[list[Detection]]:
        arrays = require_outputs(outputs, manifest, 4)
        if params.outputs is None:
            heat, scale, offset, lms = arrays
        else:
            names = params.outputs
            try:
                heat, scale, offset, lms = (np.asarray(outputs[n]) for n in
                                            (names.heatmap, names.scale, names.offset, names.landmarks))
            except KeyError as exc:
                raise ModelError(f"{manifest.where}: the model has no output {exc.args[0]!r} "
                                 f"(it has {list(outputs)})") from None
        batch = len(meta.items)
        for arr, channels, what in ((heat, 1, "heatmap"), (scale, 2, "scale"), (offset, 2, "offset"),
                                    (lms, 10, "landmarks")):
            if arr.ndim != 4 or arr.shape[0] != batch or arr.shape[1] != channels or arr.shape[2:] != heat.shape[2:]:
                raise ModelError(f"{manifest.where}: CenterFace {what} output has shape {arr.shape}, expected "
                                 f"[{batch}, {channels}, h, w] with h, w as the heatmap's {heat.shape[2:]}")
        thr = manifest.thresholds.score
        results: list[list[Detection]] = []
        for b, item in enumerate(meta.items):
            ys, xs = np.nonzero(heat[b, 0] > thr)
            if ys.size == 0:
                results.append([])
                continue
            score = heat[b, 0, ys, xs].astype(np.float64)
            h = np.exp(scale[b, 0, ys, xs].astype(np.float64)) * _STRIDE
            w = np.exp(scale[b, 1, ys, xs].astype(np.float64)) * _STRIDE
            cy = (ys + offset[b, 0, ys, xs] + 0.5) * _STRIDE
            cx = (xs + offset[b, 1, ys, xs] + 0.5) * _STRIDE
            x1, y1 = cx - w / 2, cy - h / 2
            boxes = np.stack([x1, y1, x1 + w, y1 + h], axis=1)
            lm = lms[b][:, ys, xs].T.reshape(-1, 5, 2).astype(np.float64)  # (y, x) fractions per point
            points = np.empty((ys.size, 5, 3), dtype=np.float64)
            points[..., 0] = x1[:, None] + lm[..., 1] * w[:, None]
            points[..., 1] = y1[:, None] + lm[..., 0] * h[:, None]
            points[..., 2] = score[:, None]
            finite = np.isfinite(boxes).all(axis=1) & np.isfinite(points).reshape(ys.size, -1).all(axis=1)
            boxes, score, points = boxes[finite], score[finite], points[finite]
            keep = nms(boxes, score, manifest.thresholds.nms_iou, max_keep=params.max_detections)
            results.append(finite_detections(boxes[keep], score[keep], np.zeros(keep.size, dtype=np.int64), item,
                                             manifest, points[keep]))
        return results


decode = _CenterFace()
