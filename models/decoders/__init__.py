"""Decoders: a model's raw output tensors → :class:`~edgeagent.models.types.Detection` lists. One module per
model family; the registry (``edgeagent.models.registry``) names them. This package holds what they share:
vectorised NMS, and turning arrays of boxes into detections that are always inside the image.

Every decoder keeps the registry's contract: boxes inside the original image, or :class:`ModelError` when the
outputs do not fit the manifest; non-finite values (a broken model) are dropped, never passed on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Generic, TypeVar, cast

import numpy as np
from pydantic import BaseModel, ValidationError

from edgeagent.models.manifest import ModelManifest
from edgeagent.models.preprocess import ItemMeta, PreMeta
from edgeagent.models.types import Detection, ModelError

__all__ = ["BoxDecoder", "finite_detections", "nms", "parse_params", "require_outputs", "sigmoid", "softmax"]

P = TypeVar("P", bound=BaseModel)


def parse_params(manifest: ModelManifest, model: type[P]) -> P:
    """The manifest's ``decoder_params`` as ``model`` (already checked when the manifest was read, so a
    failure here means a manifest built in code)."""
    try:
        return model.model_validate(manifest.decoder_params)
    except ValidationError as exc:
        raise ModelError(f"{manifest.where}: decoder_params: {exc.errors(include_url=False)[0]['msg']}") from None


class BoxDecoder(Generic[P]):
    """A decoder with typed ``decoder_params``: the registry reads :attr:`params_model` to check a manifest's
    params when it is loaded; each call parses them and decodes with NumPy's floating-point warnings off (a
    broken model's inf and NaN are filtered out by the decoder, not warned about)."""

    params_model: ClassVar[type[BaseModel]]

    def __call__(self, outputs: dict[str, np.ndarray], meta: PreMeta, manifest: ModelManifest
                 ) -> list[list[Detection]]:
        params = cast(P, parse_params(manifest, self.params_model))
        with np.errstate(all="ignore"):
            return self._decode(outputs, meta, manifest, params)

    def _decode(self, outputs: dict[str, np.ndarray], meta: PreMeta, manifest: ModelManifest, params: P
                ) -> list[list[Detection]]:
        raise NotImplementedError


def require_outputs(outputs: Mapping[str, np.ndarray], manifest: ModelManifest, count: int | None = None
                    ) -> list[np.ndarray]:
    """The output arrays in order, as float arrays; :class:`ModelError` if there are not ``count`` of them."""
    arrays = [np.asarray(a) for a in outputs.values()]
    if count is not None and len(arrays) != count:
        raise ModelError(f"{manifest.where}: decoder {manifest.decoder!r} expects {count} outputs, "
                         f"the model gave {len(arrays)}")
    for name, a in zip(outputs, arrays, strict=True):
        if a.dtype.kind not in "biuf":
            raise ModelError(f"{manifest.where}: output {name!r} is {a.dtype}, not numbers")
    return arrays


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(1.0 / (1.0 + np.exp(-x)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        shifted = x - np.max(x, axis=axis, keepdims=True)
        e = np.exp(shifted)
        return np.asarray(e / np.sum(e, axis=axis, keepdims=True))


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, *, classes: np.ndarray | None = None,
        max_keep: int | None = None) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best first. With ``classes``, a box only
    suppresses boxes of its own class (boxes of different classes are moved apart so they cannot overlap)."""
    n = boxes.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    b = boxes.astype(np.float64, copy=True)
    if classes is not None:
        span = float(np.max(b) - np.min(b)) + 1.0
        b += (classes.astype(np.float64) * span)[:, None]
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = np.maximum(0.0, x2 - x1) * np.maximum(0.0, y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    limit = n if max_keep is None else max_keep
    while order.size and len(keep) < limit:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        union = areas[i] + areas[rest] - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            overlap = np.where(union > 0, inter / union, 0.0)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def finite_detections(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, item: ItemMeta,
                      manifest: ModelManifest, points: np.ndarray | None = None) -> list[Detection]:
    """Detections from boxes in MODEL INPUT pixels: mapped to the original image, clipped to it; rows with a
    non-finite value or an empty box after clipping are dropped. ``points``: ``[N, K, 3]`` x, y, score in input
    pixels (or None)."""
    if boxes.shape[0] == 0:
        return []
    ok = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
    if points is not None:
        ok &= np.isfinite(points.reshape(points.shape[0], -1)).all(axis=1)
    mapped = item.boxes_to_original(np.where(ok[:, None], boxes, 0.0))
    ok &= (mapped[:, 2] > mapped[:, 0]) & (mapped[:, 3] > mapped[:, 1])
    pts = item.points_to_original(np.where(ok[:, None, None], points[..., :2], 0.0)) if points is not None else None
    out = []
    for k in np.flatnonzero(ok):
        cid = int(class_ids[k])
        kp: tuple[tuple[float, float, float], ...] = ()
        if pts is not None and points is not None:
            kp = tuple((float(x), float(y), float(s)) for (x, y), s in zip(pts[k], points[k, :, 2], strict=True))
        x1, y1, x2, y2 = (float(v) for v in mapped[k])
        out.append(Detection(label=manifest.label(cid), score=float(scores[k]), box=(x1, y1, x2, y2),
                             class_id=cid, points=kp, model=manifest.name))
    return out
