"""Chinese licence plates: the plate detector's decoder (``clp_det``), the perspective warp into the
reader's crop, the reader's CTC decoder (``ctc_plate``) and the plate format check.

The detector is RetinaFace-shaped: for each prior (anchor) it gives a box offset ``loc`` [4], a softmax
``conf`` [2] (index 1 is "plate") and four corner offsets ``landms`` [8], all relative to priors built from
the *model input's* height and width (so the decoder needs the input size, not only the outputs). Corners
come out in the model's own order, kept as is everywhere in edgeagent: bottom-right, bottom-left, top-left,
top-right (``PLATE_CORNER_ORDER``); ``warp_plate`` expects that order (any other order and the reader
returns an empty string).

The reader is a CRNN with a CTC head over 72 symbols: for every 4 input columns one softmax row over
73 classes, index 0 the CTC blank and index ``i`` the symbol on line ``i - 1`` of ``clp_dict.txt``.
Policies:

- Character confidence: the highest probability over the run of frames that produced the character.
- Plate confidence: the *minimum* of the character confidences, not the mean. A plate read is used to
  match an allow-list, where one wrong character is as bad as seven, so the read is only as trustworthy as
  its weakest character; the mean of seven characters hides one doubtful character (one at .6 among six
  at .99 still averages .93, above any threshold one would set on the mean). The mean is kept in ``extra``.
- Detector defaults: score 0.5, NMS IoU 0.4; boxes and corners are clipped to the image and detections
  with an empty box after clipping are dropped, so whatever the model outputs, what comes back lies inside
  the image. Outputs of the wrong shape raise ``ModelError``.

Everything here is pure numpy (cv2 only for the warp); running the models is the engine's business.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import cv2
import numpy as np
import numpy.typing as npt

from edgeagent.models.types import Detection, ModelError

if TYPE_CHECKING:
    from edgeagent.models.manifest import ModelManifest
    from edgeagent.models.preprocess import PreMeta

FloatArray = npt.NDArray[np.float32]

CLP_MIN_SIZES: Final = ((24, 48), (96, 192), (384, 768))
CLP_STEPS: Final = (8, 16, 32)
CLP_VARIANCES: Final = (0.1, 0.2)
CLP_MEAN_BGR: Final = (104.0, 117.0, 123.0)
PLATE_CORNER_ORDER: Final = ("bottom_right", "bottom_left", "top_left", "top_right")
PLATE_LABEL: Final = "plate"
PLATE_TEXT_LABEL: Final = "plate_text"

PLATE_HEIGHT: Final = 32
# Measured: warps of the synthetic plates with their corners jittered (40 draws each, 5 cases) were read
# right most often at widths 120-128 (192-194 of 200), against 174 at 96 and 172 at 256; the reader
# emits one CTC row per 4 columns, so 128 gives 32 rows for at most 8 characters.
PLATE_WIDTH: Final = 128

DEFAULT_MIN_SCORE: Final = 0.5
DEFAULT_NMS_IOU: Final = 0.4
DEFAULT_MAX_PLATES: Final = 50
# exp() of a box size offset larger than this overflows nothing and already means a box 7 times the
# frame: anything beyond is noise from a broken model, clipped instead of overflowing to inf.
_MAX_LOG_SCALE: Final = 10.0

_PROVINCES: Final = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
_LETTER: Final = "A-HJ-NP-Z"  # plates never use I or O (read as 1 and 0)
_ALNUM: Final = f"{_LETTER}0-9"
_SPECIAL_SUFFIX: Final = "学警挂港澳领"
# GA 36-2018: ordinary plates province + issuing-office letter + 5 alphanumerics; special-use plates end
# in one of _SPECIAL_SUFFIX after 4; new-energy plates have 6 after the letter, small cars D or F first
# then a letter or digit and 4 digits, large vehicles 5 digits then D or F.
_PLATE_RE: Final = re.compile(
    rf"[{_PROVINCES}][{_LETTER}]"
    rf"(?:[{_ALNUM}]{{5}}|[{_ALNUM}]{{4}}[{_SPECIAL_SUFFIX}]|[DF][{_ALNUM}][0-9]{{4}}|[0-9]{{5}}[DF])"
)


@dataclass(frozen=True, slots=True)
class PlateRead:
    """What the reader read from one crop. ``char_scores`` has one entry per character of ``text``;
    ``confidence`` is their minimum (0.0 for an empty read)."""

    text: str
    confidence: float
    char_scores: tuple[float, ...]

    @property
    def mean_confidence(self) -> float:
        return float(np.mean(self.char_scores)) if self.char_scores else 0.0


@dataclass(frozen=True, slots=True)
class PlateBoxes:
    """Decoded detector output for one image, in that image's pixels, best first."""

    boxes: FloatArray  # [K, 4] x1, y1, x2, y2
    corners: FloatArray  # [K, 4, 2] x, y in PLATE_CORNER_ORDER
    scores: FloatArray  # [K]


# --- detector -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def clp_priors(height: int, width: int) -> FloatArray:
    """The detector's priors for a ``height`` x ``width`` input: [N, 4] centre x, centre y, width,
    height, normalized to the input. Order: per stride, per cell row-major, per min size (the order the
    model's outputs follow). Cached and read-only: cameras keep one input size."""
    if height <= 0 or width <= 0:
        raise ModelError(f"clp_det: input size {width}x{height} is empty")
    parts: list[FloatArray] = []
    for sizes, step in zip(CLP_MIN_SIZES, CLP_STEPS, strict=True):
        rows, cols = -(-height // step), -(-width // step)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step / height, (np.arange(cols) + 0.5) * step / width,
                             indexing="ij")
        n_sizes = len(sizes)
        grid = np.empty((rows, cols, n_sizes, 4), dtype=np.float32)
        grid[..., 0] = cx[..., None]
        grid[..., 1] = cy[..., None]
        grid[..., 2] = np.asarray(sizes, dtype=np.float32) / width
        grid[..., 3] = np.asarray(sizes, dtype=np.float32) / height
        parts.append(grid.reshape(-1, 4))
    priors = np.concatenate(parts)
    priors.setflags(write=False)
    return priors


def clp_det_input(image_bgr: npt.NDArray[np.uint8]) -> FloatArray:
    """The detector's input for one BGR image at its own size: 1x3xHxW float32, BGR minus the means.
    (The engine's preprocessing does the same from the manifest; this serves tests and tools.)"""
    _check_image(image_bgr)
    planar = image_bgr.astype(np.float32) - np.asarray(CLP_MEAN_BGR, dtype=np.float32)
    return np.ascontiguousarray(planar.transpose(2, 0, 1)[None])


def split_clp_outputs(outputs: Mapping[str, np.ndarray]) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``loc`` [B,N,4], ``conf`` [B,N,2], ``landms`` [B,N,8] told apart by their last dimension (names
    differ between exports), checked to agree on B and N."""
    by_width: dict[int, FloatArray] = {}
    for name, value in outputs.items():
        array = np.asarray(value)
        if array.ndim != 3 or array.shape[2] not in (2, 4, 8) or array.shape[2] in by_width:
            raise ModelError(f"clp_det: unexpected output {name!r} of shape {array.shape}; "
                             "expected loc [B,N,4], conf [B,N,2] and landms [B,N,8]")
        by_width[array.shape[2]] = array.astype(np.float32, copy=False)
    if set(by_width) != {2, 4, 8}:
        raise ModelError(f"clp_det: outputs {sorted(outputs)} lack one of loc, conf, landms")
    loc, conf, landms = by_width[4], by_width[2], by_width[8]
    if not (loc.shape[:2] == conf.shape[:2] == landms.shape[:2]):
        raise ModelError(f"clp_det: outputs disagree on batch or prior count: loc {loc.shape}, "
                         f"conf {conf.shape}, landms {landms.shape}")
    return loc, conf, landms


def decode_clp_arrays(loc: FloatArray, conf: FloatArray, landms: FloatArray, input_h: int, input_w: int, *,
                      min_score: float = DEFAULT_MIN_SCORE, nms_iou: float = DEFAULT_NMS_IOU,
                      max_plates: int = DEFAULT_MAX_PLATES) -> list[PlateBoxes]:
    """Decode one batch of detector outputs into plates in *model input* pixels (clipped to the input),
    one ``PlateBoxes`` per batch item."""
    priors = clp_priors(input_h, input_w)
    if loc.shape[1] != priors.shape[0]:
        raise ModelError(f"clp_det: {loc.shape[1]} priors in the outputs, {priors.shape[0]} expected for a "
                         f"{input_w}x{input_h} input")
    centre, size = priors[:, :2], priors[:, 2:]
    scale = np.asarray([input_w, input_h], dtype=np.float32)
    results: list[PlateBoxes] = []
    for b in range(loc.shape[0]):
        scores = conf[b, :, 1]
        with np.errstate(invalid="ignore"):
            # NaN compares False and +inf is no probability: both dropped (a score is a softmax output, <= 1)
            candidates = np.flatnonzero((scores >= min_score) & np.isfinite(scores))
        offsets = loc[b, candidates]
        with np.errstate(over="ignore", invalid="ignore"):
            c = centre[candidates] + offsets[:, :2] * CLP_VARIANCES[0] * size[candidates]
            wh = size[candidates] * np.exp(np.clip(offsets[:, 2:] * CLP_VARIANCES[1], -_MAX_LOG_SCALE,
                                                   _MAX_LOG_SCALE))
            boxes = np.concatenate([(c - wh / 2) * scale, (c + wh / 2) * scale], axis=1)
            corners = (centre[candidates, None, :]
                       + landms[b, candidates].reshape(-1, 4, 2) * CLP_VARIANCES[0] * size[candidates, None, :]
                       ) * scale
        finite = np.isfinite(boxes).all(axis=1) & np.isfinite(corners).all(axis=(1, 2))
        boxes, corners, kept_scores = boxes[finite], corners[finite], scores[candidates][finite]
        boxes = _clip_boxes(boxes, input_w, input_h)
        corners = _clip_points(corners, input_w, input_h)
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, corners, kept_scores = boxes[nonempty], corners[nonempty], kept_scores[nonempty]
        keep = nms(boxes, kept_scores, nms_iou)[:max_plates]
        results.append(PlateBoxes(boxes=boxes[keep].astype(np.float32), corners=corners[keep].astype(np.float32),
                                  scores=kept_scores[keep].astype(np.float32)))
    return results


def plate_detections(plates: PlateBoxes, *, model: str = "", label: str = PLATE_LABEL) -> list[Detection]:
    """``Detection``s from decoded plates: the 4 corners as points, each carrying the plate's score."""
    out: list[Detection] = []
    for box, quad, score in zip(plates.boxes.tolist(), plates.corners.tolist(), plates.scores.tolist(),
                                strict=True):
        out.append(Detection(label=label, score=float(score), box=(box[0], box[1], box[2], box[3]), model=model,
                             points=tuple((float(x), float(y), float(score)) for x, y in quad)))
    return out


def nms(boxes: FloatArray, scores: FloatArray, iou_threshold: float) -> npt.NDArray[np.intp]:
    """Greedy non-maximum suppression; indices of the kept boxes, best score first."""
    order = np.argsort(-scores, kind="stable")
    if order.size == 0:
        return order
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        iw = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0)
        ih = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0)
        inter = iw * ih
        union = areas[i] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.intp)


# --- warp -----------------------------------------------------------------------------------------------


def warp_plate(image_bgr: npt.NDArray[np.uint8], corners: npt.ArrayLike, *, width: int = PLATE_WIDTH,
               height: int = PLATE_HEIGHT) -> npt.NDArray[np.uint8]:
    """The plate quadrilateral ``corners`` (4 x (x, y), in PLATE_CORNER_ORDER, image pixels) warped
    upright into a ``height`` x ``width`` BGR crop for the reader. Pixels outside the image repeat the
    border. Raises ValueError for corners that are not 4 finite points spanning an area."""
    _check_image(image_bgr)
    quad = np.asarray(corners, dtype=np.float64)
    if quad.ndim == 2 and quad.shape[1] == 3:
        quad = quad[:, :2]  # Detection.points carry a score
    if quad.shape != (4, 2) or not np.isfinite(quad).all():
        raise ValueError(f"plate corners must be 4 finite (x, y) points, got shape {quad.shape}")
    x, y = quad[:, 0], quad[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    if area < 1.0:
        raise ValueError("plate corners span no area")
    target = np.asarray([[width - 1, height - 1], [0, height - 1], [0, 0], [width - 1, 0]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(quad.astype(np.float32), target)
    warped = cv2.warpPerspective(image_bgr, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REPLICATE)
    return np.asarray(warped, dtype=np.uint8)


def image_corners(image: np.ndarray) -> FloatArray:
    """The whole image as a plate quadrilateral (for crops that already are a plate)."""
    h, w = image.shape[:2]
    return np.asarray([[w - 1, h - 1], [0, h - 1], [0, 0], [w - 1, 0]], dtype=np.float32)


# --- reader ---------------------------------------------------------------------------------------------


def plate_reader_input(crops: Sequence[npt.NDArray[np.uint8]], *, width: int = PLATE_WIDTH) -> FloatArray:
    """The reader's input for BGR crops: Bx3x32xW float32 RGB, ``(x/255 - 0.5) / 0.5``; crops of another
    size are resized to 32 x ``width`` first."""
    planes: list[FloatArray] = []
    for crop in crops:
        _check_image(crop)
        sized = crop if crop.shape[:2] == (PLATE_HEIGHT, width) else cv2.resize(
            crop, (width, PLATE_HEIGHT), interpolation=cv2.INTER_LINEAR)
        rgb = sized[:, :, ::-1].astype(np.float32)
        planes.append((rgb / 127.5 - 1.0).transpose(2, 0, 1))
    if not planes:
        return np.zeros((0, 3, PLATE_HEIGHT, width), dtype=np.float32)
    return np.ascontiguousarray(np.stack(planes))


def load_charset(path: Path) -> tuple[str, ...]:
    """The reader's symbols, one a line (line i is CTC class i + 1)."""
    symbols = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not symbols:
        raise ModelError(f"{path}: the plate reader's dictionary is empty")
    return symbols


def ctc_greedy_decode(probs: npt.ArrayLike, charset: Sequence[str]) -> list[PlateRead]:
    """Greedy CTC over [B, T, C] (or one [T, C]) class probabilities, C = len(charset) + 1 with class 0
    the blank: the best class per row, repeats merged, blanks dropped. Raises ModelError for a wrong
    class count or non-finite values."""
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3 or p.shape[2] != len(charset) + 1:
        raise ModelError(f"ctc_plate: output shape {p.shape}, expected [B, T, {len(charset) + 1}]")
    if not np.isfinite(p).all():
        raise ModelError("ctc_plate: the reader returned non-finite values")
    batch, steps, _ = p.shape
    if steps == 0:
        return [PlateRead("", 0.0, ()) for _ in range(batch)]
    best = p.argmax(axis=2)
    best_p = np.clip(np.take_along_axis(p, best[..., None], axis=2)[..., 0], 0.0, 1.0)
    # Runs of one class; a run boundary at every row start so runs never span two batch items.
    starts = np.ones_like(best, dtype=bool)
    starts[:, 1:] = best[:, 1:] != best[:, :-1]
    flat_starts = np.flatnonzero(starts.ravel())
    run_label = best.ravel()[flat_starts]
    run_score = np.maximum.reduceat(best_p.ravel(), flat_starts)
    run_row = flat_starts // steps
    symbol = run_label != 0
    reads: list[PlateRead] = []
    for b in range(batch):
        mask = symbol & (run_row == b)
        labels = run_label[mask]
        scores = tuple(float(s) for s in run_score[mask])
        text = "".join(charset[int(i) - 1] for i in labels)
        reads.append(PlateRead(text, min(scores) if scores else 0.0, scores))
    return reads


def plate_format_ok(text: str) -> bool:
    """Whether ``text`` has the shape of a mainland Chinese plate: province character, issuing-office
    letter, then 5 alphanumerics (ordinary), 4 and a special-use character (学 警 挂 港 澳 领), or 6 for
    new-energy plates (D/F first on small cars, last on large vehicles). Letters I and O never occur."""
    return _PLATE_RE.fullmatch(text) is not None


def read_detections(reads: Sequence[PlateRead], sizes: Sequence[tuple[int, int]], *, model: str = "",
                    label: str = PLATE_TEXT_LABEL) -> list[list[Detection]]:
    """One list per crop: a ``Detection`` spanning the crop (``sizes`` are width, height) with the text,
    the minimum character confidence as score and the mean, the format check and each character's score
    (``char_score_<i>``) in ``extra``; empty when nothing was read."""
    out: list[list[Detection]] = []
    for read, (w, h) in zip(reads, sizes, strict=True):
        if not read.text:
            out.append([])
            continue
        # Every character's score too (char_score_0, ...): the gate's vote weighs each position on its own.
        extra = {"mean_char_score": read.mean_confidence, "format_ok": float(plate_format_ok(read.text)),
                 **{f"char_score_{i}": float(c) for i, c in enumerate(read.char_scores)}}
        out.append([Detection(label=label, score=read.confidence, box=(0.0, 0.0, float(w), float(h)), model=model,
                              text=read.text, extra=extra)])
    return out


# --- registry adapters (edgeagent.models.registry: "clp_det", "ctc_plate") --------------------------------


def decode_clp_det(outputs: dict[str, np.ndarray], meta: PreMeta, manifest: ModelManifest) -> list[list[Detection]]:
    """The ``clp_det`` decoder: plates with their 4 corners (PLATE_CORNER_ORDER) in each original image's
    pixels; the manifest's ``thresholds`` give the score and NMS IoU, its first label the plate label."""
    loc, conf, landms = split_clp_outputs(outputs)
    if loc.shape[0] != len(meta):
        raise ModelError(f"{manifest.where}: {loc.shape[0]} results for a batch of {len(meta)}")
    decoded = decode_clp_arrays(loc, conf, landms, meta.input_h, meta.input_w, min_score=manifest.thresholds.score,
                                nms_iou=manifest.thresholds.nms_iou)
    out: list[list[Detection]] = []
    for plates_in, item in zip(decoded, meta.items, strict=True):
        boxes = item.boxes_to_original(plates_in.boxes).astype(np.float32)
        corners = item.points_to_original(plates_in.corners).astype(np.float32)
        # Mapping back can flatten a box that lay in the letterbox padding: drop it as the clip above does.
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        mapped = PlateBoxes(boxes=boxes[nonempty], corners=corners[nonempty], scores=plates_in.scores[nonempty])
        out.append(plate_detections(mapped, model=manifest.name, label=manifest.label(0)))
    return out


def decode_ctc_plate(outputs: dict[str, np.ndarray], meta: PreMeta, manifest: ModelManifest
                     ) -> list[list[Detection]]:
    """The ``ctc_plate`` decoder: per crop, one detection spanning it with the text read (none when
    nothing was read). The manifest's labels are the reader's symbols (``clp_dict.txt``, class i + 1)."""
    if len(outputs) != 1:
        raise ModelError(f"{manifest.where}: the plate reader has one output, got {sorted(outputs)}")
    probs = next(iter(outputs.values()))
    reads = ctc_greedy_decode(probs, manifest.labels_list)
    if len(reads) != len(meta):
        raise ModelError(f"{manifest.where}: {len(reads)} results for a batch of {len(meta)}")
    return read_detections(reads, [(item.orig_w, item.orig_h) for item in meta.items], model=manifest.name)


# --- pipeline -------------------------------------------------------------------------------------------

RunModel = Callable[[FloatArray], Sequence[np.ndarray] | Mapping[str, np.ndarray]]


def read_plates(run_detector: RunModel, run_reader: RunModel, image_bgr: npt.NDArray[np.uint8],
                charset: Sequence[str], *, min_score: float = DEFAULT_MIN_SCORE, nms_iou: float = DEFAULT_NMS_IOU,
                model: str = "clp") -> list[Detection]:
    """Find and read every plate in one BGR image. ``run_detector`` / ``run_reader`` take the model's
    input tensor and return its outputs (as onnxruntime's ``run`` or the engine would); the detector
    runs at the image's own size. Each plate comes back with its corners, the detector's score,
    ``text`` (None when the reader read nothing) and the read's confidence in ``extra["text_score"]``."""
    h, w = image_bgr.shape[:2]
    det_out = run_detector(clp_det_input(image_bgr))
    named = det_out if isinstance(det_out, Mapping) else {str(i): a for i, a in enumerate(det_out)}
    plates = decode_clp_arrays(*split_clp_outputs(named), h, w, min_score=min_score, nms_iou=nms_iou)[0]
    detections = plate_detections(plates, model=model)
    if not detections:
        return []
    crops = [warp_plate(image_bgr, quad) for quad in plates.corners]
    rec_out = run_reader(plate_reader_input(crops))
    probs = next(iter(rec_out.values())) if isinstance(rec_out, Mapping) else rec_out[0]
    reads = ctc_greedy_decode(probs, charset)
    out: list[Detection] = []
    for det, read in zip(detections, reads, strict=True):
        out.append(Detection(label=det.label, score=det.score, box=det.box, points=det.points, model=model,
                             text=read.text or None,
                             extra={"text_score": read.confidence, "format_ok": float(plate_format_ok(read.text))}))
    return out


# --- helpers --------------------------------------------------------------------------------------------


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected an HxWx3 BGR image, got shape {image.shape}")


def _clip_boxes(boxes: FloatArray, w: float, h: float) -> FloatArray:
    out = np.empty_like(boxes)
    out[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0.0, w)
    out[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0.0, h)
    return out


def _clip_points(points: FloatArray, w: float, h: float) -> FloatArray:
    out = np.empty_like(points)
    out[..., 0] = np.clip(points[..., 0], 0.0, w)
    out[..., 1] = np.clip(points[..., 1], 0.0, h)
    return out
