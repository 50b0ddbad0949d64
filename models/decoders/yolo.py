"""Generic YOLO outputs → detections, so a site brings its own detector (fire and smoke, an e-bike class) with a
manifest and no code.

Two layouts, ``C`` = number of labels, boxes as centre x, centre y, width, height in input pixels::

    v5  [B, N, 5 + C]   box, objectness, C class scores       score = objectness x class score
    v8  [B, 4 + C, N]   box, C class scores (no objectness)    score = class score
        (or transposed, [B, N, 4 + C])

``format: auto`` (default) tells them apart by which axis has ``4 + C`` or ``5 + C`` entries (an ambiguous
shape is an error asking for ``format``). ``box: xyxy`` for exports that give corners, ``normalized: true``
for coordinates in 0..1 of the input, ``sigmoid: true`` for raw logits. The first output is used unless
``output`` names one. Each box keeps its best class; class-wise NMS (``agnostic_nms: true`` for one NMS over
all classes).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgeagent.models.decoders import BoxDecoder, finite_detections, nms, require_outputs, sigmoid
from edgeagent.models.manifest import ModelManifest
from edgeagent.models.preprocess import PreMeta
from edgeagent.models.types import Detection, ModelError

__all__ = ["YoloParams", "decode"]


class YoloParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    format: Literal["auto", "v5", "v8"] = "auto"
    output: str | None = Field(default=None, description="the output to read; default: the first")
    box: Literal["cxcywh", "xyxy"] = "cxcywh"
    normalized: bool = False
    sigmoid: bool = False
    agnostic_nms: bool = False
    max_candidates: int = Field(default=3000, ge=1)
    max_detections: int = Field(default=300, ge=1)


def _rows(a: np.ndarray, params: YoloParams, n_cls: int, manifest: ModelManifest) -> tuple[np.ndarray, bool]:
    """``[B, N, K]`` rows and whether they carry an objectness column."""
    if a.ndim != 3:
        raise ModelError(f"{manifest.where}: a YOLO output is [batch, boxes, values] or [batch, values, boxes], "
                         f"not of shape {a.shape}")
    v5, v8 = 5 + n_cls, 4 + n_cls
    fmt = params.format
    if fmt == "v5":
        if a.shape[2] != v5:
            raise ModelError(f"{manifest.where}: a v5 output is [B, N, {v5}] for {n_cls} labels, not {a.shape}")
        return a, True
    if fmt == "v8":
        if a.shape[1] == v8:
            return a.transpose(0, 2, 1), False
        if a.shape[2] == v8:
            return a, False
        raise ModelError(f"{manifest.where}: a v8 output is [B, {v8}, N] for {n_cls} labels, not {a.shape}")
    candidates = []
    if a.shape[1] == v8:
        candidates.append((a.transpose(0, 2, 1), False))
    if a.shape[2] == v5:
        candidates.append((a, True))
    if a.shape[2] == v8:
        candidates.append((a, False))
    if len(candidates) != 1:
        what = "fits neither" if not candidates else "fits more than one of"
        raise ModelError(f"{manifest.where}: YOLO output shape {a.shape} {what} v5 [B, N, {v5}] and v8 "
                         f"[B, {v8}, N] for {n_cls} labels; check the labels or set decoder_params.format")
    return candidates[0]


class _Yolo(BoxDecoder[YoloParams]):
    params_model = YoloParams

    def _decode(self, outputs: dict[str, np.ndarray], meta: PreMeta, manifest: ModelManifest, params: YoloParams
                ) -> list[list[Detection]]:
        arrays = require_outputs(outputs, manifest)
        if not arrays:
            raise ModelError(f"{manifest.where}: the model gave no output")
        if params.output is None:
            a = arrays[0]
        elif params.output in outputs:
            a = np.asarray(outputs[params.output])
        else:
            raise ModelError(f"{manifest.where}: the model has no output {params.output!r} (it has {list(outputs)})")
        n_cls = len(manifest.labels_list)
        rows, has_obj = _rows(a, params, n_cls, manifest)
        if rows.shape[0] != len(meta.items):
            raise ModelError(f"{manifest.where}: output batch {rows.shape[0]} for {len(meta.items)} images")
        thr = manifest.thresholds.score
        results: list[list[Detection]] = []
        for b, item in enumerate(meta.items):
            r = rows[b].astype(np.float64)
            cls_scores = r[:, 5:] if has_obj else r[:, 4:]
            if params.sigmoid:
                cls_scores = sigmoid(cls_scores)
            if has_obj:
                obj = sigmoid(r[:, 4]) if params.sigmoid else r[:, 4]
                cls_scores = cls_scores * obj[:, None]
            if cls_scores.shape[0] == 0:
                results.append([])
                continue
            cls_scores = np.where(np.isfinite(cls_scores), cls_scores, -np.inf)
            best = np.argmax(cls_scores, axis=1)
            score = cls_scores[np.arange(best.size), best]
            keep = np.flatnonzero(score > thr)
            if keep.size > params.max_candidates:
                keep = keep[np.argpartition(-score[keep], params.max_candidates - 1)[:params.max_candidates]]
            box = r[keep, :4]
            if params.normalized:
                box = box * np.asarray([meta.input_w, meta.input_h, meta.input_w, meta.input_h], dtype=np.float64)
            if params.box == "cxcywh":
                box = np.stack([box[:, 0] - box[:, 2] / 2, box[:, 1] - box[:, 3] / 2,
                                box[:, 0] + box[:, 2] / 2, box[:, 1] + box[:, 3] / 2], axis=1)
            score_k, cls_k = score[keep], best[keep]
            finite = np.isfinite(box).all(axis=1)
            box, score_k, cls_k = box[finite], score_k[finite], cls_k[finite]
            kept = nms(box, score_k, manifest.thresholds.nms_iou,
                       classes=None if params.agnostic_nms else cls_k, max_keep=params.max_detections)
            results.append(finite_detections(box[kept], score_k[kept], cls_k[kept], item, manifest))
        return results


decode = _Yolo()
