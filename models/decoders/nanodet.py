"""NanoDet (GFL head) outputs → detections.

Per stride ``s`` (8, 16, 32) the model gives two tensors over its ``gw x gh`` grid of cells (row-major,
``gw = ceil(input_w / s)``)::

    scores [B, gw*gh, C]            class scores, sigmoid already applied
    boxes  [B, gw*gh, 4*(reg_max+1)] per side (left, top, right, bottom) reg_max+1 bins: softmax over the bins,
                                     expectation x s = distance from the cell centre ((x+0.5)s, (y+0.5)s)

Output names are not meaningful (the converted file calls them ``Identity:0`` .. ``Identity_5:0`` in no useful
order), so tensors are told apart by shape: the last axis (C or 4*(reg_max+1)) and the cell count of each
stride. Every (cell, class) above the score threshold is a candidate; then class-wise NMS.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgeagent.models.decoders import BoxDecoder, finite_detections, nms, require_outputs, softmax
from edgeagent.models.manifest import ModelManifest
from edgeagent.models.preprocess import PreMeta
from edgeagent.models.types import Detection, ModelError

__all__ = ["NanoDetParams", "decode"]


class NanoDetParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    strides: list[int] = Field(default=[8, 16, 32], min_length=1, max_length=8)
    reg_max: int = Field(default=10, ge=1, le=64, description="bins per side minus one")
    max_candidates: int = Field(default=1000, ge=1, description="best candidates kept before NMS")
    max_detections: int = Field(default=100, ge=1)


class _NanoDet(BoxDecoder[NanoDetParams]):
    params_model = NanoDetParams

    def _decode(self, outputs: dict[str, np.ndarray], meta: PreMeta, manifest: ModelManifest, params: NanoDetParams
                ) -> list[list[Detection]]:
        arrays = require_outputs(outputs, manifest, 2 * len(params.strides))
        n_cls = len(manifest.labels_list)
        n_reg = 4 * (params.reg_max + 1)
        if n_cls == n_reg:
            raise ModelError(f"{manifest.where}: {n_cls} labels and {n_reg} box bins cannot be told apart")
        levels = self._pair(arrays, params, meta, n_cls, n_reg, manifest)
        thr = manifest.thresholds.score
        results: list[list[Detection]] = []
        for b, item in enumerate(meta.items):
            boxes_l, scores_l, cls_l = [], [], []
            for stride, gw, scores, reg in levels:
                s = scores[b]
                cell, cls = np.nonzero(s > thr)  # NaN compares false: dropped here
                if cell.size == 0:
                    continue
                if cell.size > params.max_candidates:
                    best = np.argpartition(-s[cell, cls], params.max_candidates - 1)[:params.max_candidates]
                    cell, cls = cell[best], cls[best]
                bins = softmax(reg[b][cell].reshape(-1, 4, params.reg_max + 1).astype(np.float64), axis=2)
                dist = bins @ np.arange(params.reg_max + 1, dtype=np.float64) * stride
                cx = (cell % gw + 0.5) * stride
                cy = (cell // gw + 0.5) * stride
                boxes_l.append(np.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], 1))
                scores_l.append(s[cell, cls].astype(np.float64))
                cls_l.append(cls)
            if not boxes_l:
                results.append([])
                continue
            boxes, scores_all, classes = np.concatenate(boxes_l), np.concatenate(scores_l), np.concatenate(cls_l)
            finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores_all)
            boxes, scores_all, classes = boxes[finite], scores_all[finite], classes[finite]
            if boxes.shape[0] > params.max_candidates:
                best = np.argpartition(-scores_all, params.max_candidates - 1)[:params.max_candidates]
                boxes, scores_all, classes = boxes[best], scores_all[best], classes[best]
            keep = nms(boxes, scores_all, manifest.thresholds.nms_iou, classes=classes,
                       max_keep=params.max_detections)
            results.append(finite_detections(boxes[keep], scores_all[keep], classes[keep], item, manifest))
        return results

    @staticmethod
    def _pair(arrays: list[np.ndarray], params: NanoDetParams, meta: PreMeta, n_cls: int, n_reg: int,
              manifest: ModelManifest) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        """(stride, grid width, scores [B,N,C], boxes [B,N,4(r+1)]) per stride, found by shape."""
        batch = len(meta.items)
        by_key: dict[tuple[int, int], np.ndarray] = {}
        for a in arrays:
            if a.ndim != 3 or a.shape[0] != batch or a.shape[2] not in (n_cls, n_reg):
                raise ModelError(f"{manifest.where}: NanoDet output of shape {a.shape} is neither "
                                 f"[{batch}, cells, {n_cls}] scores nor [{batch}, cells, {n_reg}] boxes")
            by_key[(a.shape[1], a.shape[2])] = a
        levels = []
        for stride in params.strides:
            gw, gh = math.ceil(meta.input_w / stride), math.ceil(meta.input_h / stride)
            scores, reg = by_key.get((gw * gh, n_cls)), by_key.get((gw * gh, n_reg))
            if scores is None or reg is None:
                raise ModelError(f"{manifest.where}: no NanoDet output pair for stride {stride} ({gw}x{gh} cells "
                                 f"at input {meta.input_w}x{meta.input_h}); outputs: {[a.shape for a in arrays]}")
            levels.append((stride, gw, scores, reg))
        return levels


decode = _NanoDet()
