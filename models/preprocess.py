"""Turn the caller's images into a model's input tensor, as its manifest says, and remember how (``PreMeta``)
so decoders can map what the model saw back to the caller's pixels.

Images are uint8 BGR ``HxWx3`` (a grey ``HxW`` or a BGRA ``HxWx4`` is converted); anything else is an
:class:`InferenceError` (the caller skips that tick). Resizing is bilinear. For a batch of a dynamic model the
images are scaled one by one and share one canvas (the largest rounded size in the batch), each at the
top-left corner, so the mapping back stays a scale and an offset per image.

The mapping, for each image: ``input_x = original_x * scale_x + pad_x`` (the same for y).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from edgeagent.models.manifest import ImageInput, ModelManifest, TensorInput
from edgeagent.models.types import InferenceError

__all__ = ["ItemMeta", "PreMeta", "check_image", "fit", "prepare", "preprocess_images", "preprocess_tensors"]

_DTYPES = {"float32": np.float32, "int32": np.int32, "uint8": np.uint8}


@dataclass(frozen=True, slots=True)
class ItemMeta:
    """How one image was placed in the model input: ``input = original * scale + pad`` on each axis."""

    orig_w: int
    orig_h: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """``[N, 4]`` x1, y1, x2, y2 in input pixels → original pixels, clipped to the image."""
        out = np.empty((boxes.shape[0], 4), dtype=np.float64)
        out[:, 0::2] = (boxes[:, 0::2] - self.pad_x) / self.scale_x
        out[:, 1::2] = (boxes[:, 1::2] - self.pad_y) / self.scale_y
        np.clip(out[:, 0::2], 0.0, float(self.orig_w), out=out[:, 0::2])
        np.clip(out[:, 1::2], 0.0, float(self.orig_h), out=out[:, 1::2])
        return out

    def points_to_original(self, xy: np.ndarray) -> np.ndarray:
        """``[..., 2]`` x, y in input pixels → original pixels, clipped to the image."""
        out = np.empty(xy.shape, dtype=np.float64)
        out[..., 0] = np.clip((xy[..., 0] - self.pad_x) / self.scale_x, 0.0, float(self.orig_w))
        out[..., 1] = np.clip((xy[..., 1] - self.pad_y) / self.scale_y, 0.0, float(self.orig_h))
        return out


@dataclass(frozen=True, slots=True)
class PreMeta:
    """The input size the model was run at and, per batch item, how its image was placed. For a tensor input
    the sizes are 0 and each item's mapping is the identity."""

    input_w: int
    input_h: int
    items: tuple[ItemMeta, ...]

    def __len__(self) -> int:
        return len(self.items)


def check_image(image: object) -> np.ndarray:
    """The image as uint8 BGR ``HxWx3``; :class:`InferenceError` if it cannot be one."""
    if not isinstance(image, np.ndarray):
        raise InferenceError(f"an image must be a numpy array, not {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InferenceError(f"an image must be uint8, not {image.dtype}")
    if image.ndim == 2 and image.size:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] < 1 or image.shape[1] < 1:
        raise InferenceError(f"an image must be HxWx3 (BGR), not of shape {image.shape}")
    if image.shape[2] == 4:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGRA2BGR))
    return image


def fit(spec: ImageInput, w: int, h: int, size: tuple[int, int] | None = None) -> tuple[int, int, ItemMeta]:
    """(input width, input height, placement) for one ``w`` x ``h`` image. For a dynamic input the size is
    this image's own; a batch uses the largest. ``size``, for a dynamic input only, is the input size the
    caller asked for (each side a multiple of ``multiple_of``): the image is stretched to exactly that."""
    if size is not None and spec.dynamic:
        sw, sh = size
        m = spec.multiple_of
        if sw < m or sh < m or sw % m or sh % m:
            raise InferenceError(f"an input size of {sw}x{sh} is not made of multiples of {m}")
        return sw, sh, ItemMeta(w, h, sw / w, sh / h, 0.0, 0.0)
    if spec.dynamic and spec.resize != "stretch":
        s = min(spec.width / w, spec.height / h, math.inf if spec.upscale else 1.0)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        m = spec.multiple_of
        iw, ih = math.ceil(nw / m) * m, math.ceil(nh / m) * m
        return iw, ih, ItemMeta(w, h, nw / w, nh / h, 0.0, 0.0)
    if spec.resize == "stretch":
        return spec.width, spec.height, ItemMeta(w, h, spec.width / w, spec.height / h, 0.0, 0.0)
    s = min(spec.width / w, spec.height / h, math.inf if spec.upscale else 1.0)
    nw, nh = min(spec.width, max(1, round(w * s))), min(spec.height, max(1, round(h * s)))
    pad_x, pad_y = (spec.width - nw) // 2, (spec.height - nh) // 2
    return spec.width, spec.height, ItemMeta(w, h, nw / w, nh / h, float(pad_x), float(pad_y))


def preprocess_images(images: Sequence[np.ndarray], spec: ImageInput,
                      sizes: Sequence[tuple[int, int] | None] | None = None) -> tuple[np.ndarray, PreMeta]:
    """The batch tensor for ``images`` and how each was placed (``sizes``: see :func:`fit`)."""
    if not images:
        raise InferenceError("no images to run")
    if sizes is not None and len(sizes) != len(images):
        raise InferenceError(f"{len(sizes)} input sizes for {len(images)} images")
    checked = [check_image(im) for im in images]
    fits = [fit(spec, im.shape[1], im.shape[0], sizes[k] if sizes is not None else None)
            for k, im in enumerate(checked)]
    in_w, in_h = max(f[0] for f in fits), max(f[1] for f in fits)
    canvas = np.full((len(checked), in_h, in_w, 3), spec.pad_value, dtype=np.uint8)
    for k, (im, (_w, _h, meta)) in enumerate(zip(checked, fits, strict=True)):
        nw = max(1, round(meta.orig_w * meta.scale_x))
        nh = max(1, round(meta.orig_h * meta.scale_y))
        x0, y0 = int(meta.pad_x), int(meta.pad_y)
        resized = im if (nw, nh) == (im.shape[1], im.shape[0]) else cv2.resize(
            im, (nw, nh), interpolation=cv2.INTER_LINEAR)
        canvas[k, y0:y0 + nh, x0:x0 + nw] = resized
    if spec.colour == "RGB":
        canvas = canvas[..., ::-1]
    batch: np.ndarray
    if spec.dtype == "float32":
        batch = canvas.astype(np.float32)
        if any(spec.mean):
            batch -= np.asarray(spec.mean, dtype=np.float32)
        divisor = spec.divisor
        if divisor != (1.0, 1.0, 1.0):
            batch *= np.asarray([1.0 / d for d in divisor], dtype=np.float32)
    else:
        batch = canvas.astype(_DTYPES[spec.dtype])
    if spec.layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch), PreMeta(in_w, in_h, tuple(f[2] for f in fits))


def preprocess_tensors(items: Sequence[np.ndarray], spec: TensorInput) -> tuple[np.ndarray, PreMeta]:
    """Stack samples of ``spec.shape`` into a batch (a sample of the wrong shape: :class:`InferenceError`)."""
    if not items:
        raise InferenceError("no samples to run")
    arrays = [np.asarray(a) for a in items]
    first = arrays[0].shape
    for a in arrays:
        if a.ndim != len(spec.shape) or any(d not in (-1, n) for d, n in zip(spec.shape, a.shape, strict=True)):
            raise InferenceError(f"a sample must have shape {spec.shape} (-1: any), not {a.shape}")
        if a.shape != first:
            raise InferenceError(f"samples of one batch must share a shape ({first} and {a.shape})")
        if a.dtype.kind not in "biuf":
            raise InferenceError(f"a sample must be numeric, not {a.dtype}")
    batch = np.ascontiguousarray(np.stack(arrays).astype(_DTYPES[spec.dtype], copy=False))
    identity = ItemMeta(0, 0, 1.0, 1.0, 0.0, 0.0)
    return batch, PreMeta(0, 0, (identity,) * len(arrays))


def prepare(items: Sequence[np.ndarray], manifest: ModelManifest,
            sizes: Sequence[tuple[int, int] | None] | None = None) -> tuple[np.ndarray, PreMeta]:
    """The input tensor for a batch, by the manifest's input kind (``sizes``: images only, see :func:`fit`)."""
    spec = manifest.input
    if isinstance(spec, TensorInput):
        return preprocess_tensors(items, spec)
    return preprocess_images(items, spec, sizes)
