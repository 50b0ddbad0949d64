"""MoveNet multipose: the square crop around a person box it is run on, and its decoder
(``movenet_multipose``).

The model takes ``1 x H x W x 3`` int32 RGB 0..255 (H and W multiples of 32; 256 is used) and returns
``[1, 6, 56]``: for up to 6 people 17 keypoints as (y, x, score), a box (ymin, xmin, ymax, xmax) and a pose
score, coordinates normalized to the input. Keypoints are COCO-17 (``KEYPOINT_NAMES``).

Policy: run it on person boxes from the detector, not on the whole frame. At 256 x 256 a whole 768 x 576
frame leaves a far pedestrian 20 pixels tall and MoveNet misses them (field notes); a square crop around
the box padded by ``DEFAULT_PAD`` of its longer side on each side gives the model a person filling most of
its input (on person.jpg 16 of 17 keypoints above 0.3 at pads from 0.1 to 0.3). The crop keeps the aspect
(a square of the box's longer side); where it runs past the frame it is black.

Two ways to run it, with one decoder:

- ``pose_input(frame, box)`` gives the input tensor and a ``PreMeta`` that maps the model's coordinates
  straight to *frame* pixels;
- through the engine, ``pose_crop(frame, box)`` gives the 256 x 256 BGR crop to pass as the image and a
  ``PoseCrop`` whose ``to_frame`` moves the engine's detections (in crop pixels) into the frame.

Detections: label ``person_pose`` (the manifest's first label), score the pose score, box the model's box,
``points`` the 17 keypoints as (x, y, score), all clipped to the image. Rows below the manifest's score
threshold, with non-finite values or an empty box are dropped; outputs of the wrong shape raise ModelError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import cv2
import numpy as np
import numpy.typing as npt

from edgeagent.models.preprocess import ItemMeta, PreMeta
from edgeagent.models.types import Box, Detection, ModelError, box_iou

if TYPE_CHECKING:
    from edgeagent.models.manifest import ModelManifest

KEYPOINT_NAMES: Final = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)
N_KEYPOINTS: Final = 17
ROW_LENGTH: Final = 56  # 17 x (y, x, score) + box (4) + score
MOVENET_SIZE: Final = 256
DEFAULT_PAD: Final = 0.2
DEFAULT_MIN_SCORE: Final = 0.2
POSE_LABEL: Final = "person_pose"


@dataclass(frozen=True, slots=True)
class PoseCrop:
    """Where a pose crop came from: the square ``side`` x ``side`` at ``(x0, y0)`` in the frame, resized to
    ``size`` x ``size``."""

    x0: float
    y0: float
    side: float
    size: int
    frame_w: int
    frame_h: int

    @property
    def scale(self) -> float:
        """Crop pixels per frame pixel."""
        return self.size / self.side

    def item_meta(self) -> ItemMeta:
        """The placement ``input = frame * scale + pad`` the decoder undoes."""
        s = self.scale
        return ItemMeta(self.frame_w, self.frame_h, s, s, -self.x0 * s, -self.y0 * s)

    def to_frame(self, detection: Detection) -> Detection:
        """A detection in crop pixels moved into the frame (box and keypoints clipped to it)."""
        inv = 1.0 / self.scale
        moved = detection.shifted(self.x0, self.y0, inv, inv)
        x1, y1, x2, y2 = moved.box
        w, h = float(self.frame_w), float(self.frame_h)
        return Detection(
            label=moved.label, score=moved.score, class_id=moved.class_id, text=moved.text, model=moved.model,
            box=(min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h)),
            points=tuple((min(max(x, 0.0), w), min(max(y, 0.0), h), s) for x, y, s in moved.points),
            extra=dict(moved.extra))


def pose_square(box: Box, *, pad: float = DEFAULT_PAD) -> tuple[float, float, float]:
    """``(x0, y0, side)``: the square centred on ``box`` with side the box's longer side times
    ``1 + 2 * pad``."""
    x1, y1, x2, y2 = box
    if not all(np.isfinite(box)) or x2 <= x1 or y2 <= y1:
        raise ValueError(f"a person box needs x1 < x2 and y1 < y2, got {box}")
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * pad)
    return (x1 + x2 - side) / 2.0, (y1 + y2 - side) / 2.0, side


def pose_crop(image_bgr: npt.NDArray[np.uint8], box: Box, *, size: int = MOVENET_SIZE, pad: float = DEFAULT_PAD
              ) -> tuple[npt.NDArray[np.uint8], PoseCrop]:
    """The ``size`` x ``size`` BGR crop around a person ``box`` (frame pixels) and where it came from."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.shape[0] == 0 or image_bgr.shape[1] == 0:
        raise ValueError(f"expected an HxWx3 BGR image, got shape {image_bgr.shape}")
    x0, y0, side = pose_square(box, pad=pad)
    crop = PoseCrop(x0, y0, side, size, image_bgr.shape[1], image_bgr.shape[0])
    s = crop.scale
    affine = np.asarray([[s, 0.0, -x0 * s], [0.0, s, -y0 * s]], dtype=np.float64)
    # One affine warp crops, pads and resizes at once; INTER_AREA would be kinder to big boxes but
    # warpAffine does not take it, and the boxes here are mostly smaller than the crop.
    pixels = cv2.warpAffine(image_bgr, affine, (size, size), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return np.asarray(pixels, dtype=np.uint8), crop


def pose_input(image_bgr: npt.NDArray[np.uint8], box: Box, *, size: int = MOVENET_SIZE, pad: float = DEFAULT_PAD
               ) -> tuple[npt.NDArray[np.int32], PreMeta]:
    """The model input (``1 x size x size x 3`` int32 RGB) for the person in ``box`` and the ``PreMeta``
    with which the decoder returns keypoints in the frame's pixels."""
    pixels, crop = pose_crop(image_bgr, box, size=size, pad=pad)
    tensor = np.ascontiguousarray(pixels[None, :, :, ::-1].astype(np.int32))
    return tensor, PreMeta(size, size, (crop.item_meta(),))


def decode_movenet(output: npt.ArrayLike, meta: PreMeta, *, min_score: float = DEFAULT_MIN_SCORE,
                   label: str = POSE_LABEL, model: str = "") -> list[list[Detection]]:
    """Decode ``[B, people, 56]`` rows into poses in each original image's pixels, best first."""
    rows = np.asarray(output, dtype=np.float64)
    if rows.ndim != 3 or rows.shape[2] != ROW_LENGTH:
        raise ModelError(f"movenet_multipose: output shape {rows.shape}, expected [B, people, {ROW_LENGTH}]")
    if rows.shape[0] != len(meta):
        raise ModelError(f"movenet_multipose: {rows.shape[0]} results for a batch of {len(meta)}")
    out: list[list[Detection]] = []
    scale = np.asarray([meta.input_w, meta.input_h], dtype=np.float64)
    for batch_rows, item in zip(rows, meta.items, strict=True):
        with np.errstate(invalid="ignore"):
            usable = np.isfinite(batch_rows).all(axis=1) & (batch_rows[:, 55] >= min_score)
        picked = batch_rows[usable]
        picked = picked[np.argsort(-picked[:, 55], kind="stable")]
        kp = picked[:, :51].reshape(-1, N_KEYPOINTS, 3)
        xy = item.points_to_original(kp[:, :, 1::-1] * scale)  # (y, x) -> (x, y), input pixels -> original
        kp_scores = np.clip(kp[:, :, 2], 0.0, 1.0)
        boxes = item.boxes_to_original(picked[:, [52, 51, 54, 53]] * np.tile(scale, 2))
        found: list[Detection] = []
        for box, points, scores, score in zip(boxes.tolist(), xy.tolist(), kp_scores.tolist(),
                                              np.clip(picked[:, 55], 0.0, 1.0).tolist(), strict=True):
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            found.append(Detection(label=label, score=float(score), box=(box[0], box[1], box[2], box[3]),
                                   model=model,
                                   points=tuple((p[0], p[1], s) for p, s in zip(points, scores, strict=True))))
        out.append(found)
    return out


def decode_movenet_multipose(outputs: dict[str, np.ndarray], meta: PreMeta, manifest: ModelManifest
                             ) -> list[list[Detection]]:
    """The ``movenet_multipose`` decoder (registry): poses above the manifest's score threshold."""
    if len(outputs) != 1:
        raise ModelError(f"{manifest.where}: MoveNet multipose has one output, got {sorted(outputs)}")
    return decode_movenet(next(iter(outputs.values())), meta, min_score=manifest.thresholds.score,
                          label=manifest.label(0), model=manifest.name)


def best_pose(poses: Sequence[Detection], box: Box) -> Detection | None:
    """The pose that belongs to the person in ``box``: the one whose box overlaps it most (IoU), None when
    none overlaps. A padded crop often holds a neighbour too."""
    best: Detection | None = None
    best_iou = 0.0
    for pose in poses:
        iou = box_iou(pose.box, box)
        if iou > best_iou:
            best, best_iou = pose, iou
    return best


def keypoints_array(pose: Detection) -> npt.NDArray[np.float32]:
    """A pose's keypoints as a ``[17, 3]`` (x, y, score) array."""
    points = np.asarray(pose.points, dtype=np.float32)
    if points.shape != (N_KEYPOINTS, 3):
        raise ValueError(f"a pose has 17 (x, y, score) keypoints, got shape {points.shape}")
    return points

