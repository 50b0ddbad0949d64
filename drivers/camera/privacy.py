"""Faces blurred in every picture that leaves the box: CenterFace through the shared inference engine, at two
scales, and an irreversible blur of every face it finds.

Evidence on the box is kept as seen; when the platform asks for a snapshot (``camera.upload_evidence``) the
uploader passes the decoded picture through :meth:`FaceBlur.redact` and sends what comes back. The same
redactor can run when a snapshot is saved, for sites that may not keep faces at all.

Policies:

* **Whole pictures only.** :meth:`FaceBlur.redact` returns the whole picture with its faces blurred, nothing
  else: no face crop, landmark or embedding is ever made for sending. :meth:`FaceBlur.faces` gives the face
  boxes for local use (tests, counters); they belong in no event and no answer.
* **Fail closed.** A detector that cannot run (the engine stopped, its worker down or stuck, its queue full
  for longer than ``busy_wait_s``, a broken model, an unusable picture) raises :class:`RedactionError` and no
  picture comes back, so the upload is refused: the uploader turns any redactor failure into a ``failed``
  answer and sends nothing. The unblurred input is never handed back to "degrade gracefully".
* **Two scales.** CenterFace runs once on the whole picture (the engine fits it within the manifest's input,
  640 px, each side rounded up to 32) for the large faces and, when the picture is more than 1.25 tiles
  long, on overlapping tiles of ``tile_px`` each magnified to the input (1.43x at the default 448 px) for the
  small far faces a camera over a path sees (6 to 11 px wide at 768x576: on 8 frames of the pedestrian clip
  the whole picture gives 5 faces, the tiles 22). A face too large for a tile is found by the whole-picture
  pass; the tiles overlap by at least 1.5 times the smallest face that pass finds (about 12 px of model
  input), so every face is whole in one of the two. The images go to the engine in requests of the model's
  ``max_batch`` (8), one after another, so camera frames queue between them, not behind a whole redaction.
  Cost on the 2-core development box (CPU provider, 2 threads), in the engine worker's CPU time per
  redaction: 80 ms at 512x512 (1 image), 410 ms at 768x576 (5), 1.7 s at 1920x1080 (19); wall time, with
  the box loaded by other work (load 9 to 10), 0.16, 0.85 and 3.3 s. Uploads are rare and wait for the
  network anyway; a site with 1080p cameras and little CPU can raise ``tile_px``.
* **Threshold.** Privacy wants recall: a blurred patch of wall costs nothing, a missed face leaks. The shipped
  ``centerface`` manifest keeps faces from 0.5; far faces score 0.25 to 0.75. :func:`privacy_manifest` makes a
  copy of it named :data:`PRIVACY_MODEL` keeping faces from 0.3, to give the engine beside the shipped one;
  :class:`FaceBlur` refuses a model whose manifest drops faces it was asked to keep.
* **Irreversible.** Each face box, enlarged by ``margin`` of its size on every side, is reduced to a coarse
  grid of cell means (``cells`` across its longer side, each cell at least 3 px) and drawn back from that grid
  only: ``pixelate`` as blocks softened by a gaussian of half a cell, ``gaussian`` as a smooth bilinear surface
  blurred by a gaussian of one cell. Both are functions of the grid alone, so at most ``cells`` x ``cells``
  colours of a face leave the box and no deconvolution brings back what the grid never held (a plain
  gaussian blur can be partly undone). With the default margin the face itself spans about 4 to 5 cells.
  Pixels outside the enlarged boxes are untouched. The margin (0.4) is wide because CenterFace boxes run from
  brow to chin (hair and ears lie outside) and because the hard edge of a patch drawn through a face's
  surroundings can itself look like a face: on the astronaut, margins of 0.25 and 0.3 left a false face on
  the helmet ring at the patch's edge (0.35, 0.56); from 0.35 nothing scored 0.1 or more. A face a few pixels
  wide stays findable as a head-shaped blob after blurring (CenterFace at that size sees a head on
  shoulders, not features); what it held is gone all the same.
* **Off the loop.** Inference runs in the engine's worker process; blurring and copying in a worker thread.
  :meth:`FaceBlur.redact` is a coroutine on the loop that owns the engine. For callers that run a synchronous
  redactor in a worker thread (today's :class:`~edgeagent.drivers.camera.upload.Uploader` and
  :meth:`~edgeagent.drivers.camera.evidence.EvidenceStore.save_snapshot`), :meth:`FaceBlur.threadsafe` gives
  one that submits the coroutine to that loop and waits, with a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import cv2
import numpy as np
import numpy.typing as npt

from edgeagent.drivers.camera.evidence import EvidenceError, Redactor
from edgeagent.models.engine import InferenceEngine, merge_region_detections
from edgeagent.models.manifest import ImageInput, ModelManifest, Thresholds
from edgeagent.models.types import Detection, EngineBusy, InferenceError, ModelError

__all__ = ["PRIVACY_MODEL", "BlurMethod", "FaceBlur", "RedactionError", "blur_boxes", "enlarge", "privacy_manifest",
           "tile_grid"]

Image = npt.NDArray[np.uint8]
IntBox = tuple[int, int, int, int]
BlurMethod = Literal["pixelate", "gaussian"]

PRIVACY_MODEL: Final = "centerface-privacy"
DEFAULT_MIN_SCORE: Final = 0.3
# The smallest face CenterFace finds reliably, in model-input pixels (its heatmap has a stride of 4; below
# about 3 cells a face is noise). The tiles' overlap is kept at 1.5 times what that is in picture pixels at
# the whole-picture pass's scale, so a face cut by a tile edge is large enough for that pass.
_MIN_FACE_INPUT_PX: Final = 12.0
_BUSY_RETRY_S: Final = 0.1
# A cell of the blur grid is at least this wide: on a face a few pixels wide, 8 cells across would be the
# face's own pixels again.
_MIN_CELL_PX: Final = 3.0
_TILE_GAIN: Final = 1.25


class RedactionError(EvidenceError):
    """The faces of a picture could not be found or blurred; nothing was returned, so nothing may leave."""


def privacy_manifest(base: ModelManifest, *, min_score: float = DEFAULT_MIN_SCORE,
                     name: str = PRIVACY_MODEL) -> ModelManifest:
    """A copy of the CenterFace manifest (same file, same checks) named ``name`` that keeps faces from
    ``min_score``, to register in the engine beside the shipped one (which other users keep at its own
    threshold)."""
    if base.task != "face":
        raise ModelError(f"{base.where}: a {base.task!r} model cannot find faces for the privacy blur")
    if not 0.0 < min_score <= 1.0:
        raise ValueError(f"min_score must be in (0, 1], not {min_score}")
    thresholds = Thresholds(score=min_score, nms_iou=base.thresholds.nms_iou)
    return base.model_copy(update={"name": name, "thresholds": thresholds})


def tile_grid(width: int, height: int, tile: int, overlap: int) -> list[IntBox]:
    """Tiles of at most ``tile`` x ``tile`` covering a ``width`` x ``height`` picture, evenly spaced, each
    overlapping its neighbours by at least ``overlap`` (a side no longer than ``tile`` is one span)."""
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise ValueError(f"tile must be at least 1 and overlap in [0, tile) (got {tile}, {overlap})")

    def spans(n: int) -> list[tuple[int, int]]:
        if n <= tile:
            return [(0, n)]
        count = math.ceil((n - overlap) / (tile - overlap))
        step = (n - tile) / (count - 1)
        return [(round(i * step), round(i * step) + tile) for i in range(count)]

    return [(x1, y1, x2, y2) for y1, y2 in spans(height) for x1, x2 in spans(width)]


def enlarge(box: tuple[float, float, float, float], margin: float, width: int, height: int) -> IntBox | None:
    """The box grown by ``margin`` of its width and height on each side (at least one pixel), rounded
    outwards to whole pixels and clipped to the picture; None when nothing of it is in the picture."""
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box):
        return None
    mx = max(1.0, (x2 - x1) * margin)
    my = max(1.0, (y2 - y1) * margin)
    ix1, iy1 = max(0, math.floor(x1 - mx)), max(0, math.floor(y1 - my))
    ix2, iy2 = min(width, math.ceil(x2 + mx)), min(height, math.ceil(y2 + my))
    if ix2 <= ix1 or iy2 <= iy1:
        return None
    return ix1, iy1, ix2, iy2


def _blur_patch(patch: Image, method: BlurMethod, cells: int) -> Image:
    """The patch drawn back from a grid of cell means only (``cells`` across its longer side)."""
    h, w = patch.shape[:2]
    cell = max(_MIN_CELL_PX, max(w, h) / cells)
    gw, gh = max(1, round(w / cell)), max(1, round(h / cell))
    grid = cv2.resize(patch, (gw, gh), interpolation=cv2.INTER_AREA)
    if method == "pixelate":
        out = cv2.resize(grid, (w, h), interpolation=cv2.INTER_NEAREST)
        sigma = cell / 2
    else:
        out = cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)
        sigma = cell
    if sigma >= 0.5:
        # BORDER_REPLICATE: the blur reads only the patch (which is the grid now), never the unblurred
        # face pixels beside it nor the picture around it.
        out = cv2.GaussianBlur(out, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)
    return np.asarray(out, dtype=np.uint8)


def blur_boxes(image: Image, boxes: Sequence[IntBox], *, method: BlurMethod = "pixelate", cells: int = 8) -> Image:
    """A copy of ``image`` (uint8 BGR) with each box replaced by its irreversible blur (see the module
    docstring). Overlapping boxes are blurred one after another, each from what the previous left."""
    if method not in ("pixelate", "gaussian"):
        raise ValueError(f"unknown blur method {method!r} (pixelate or gaussian)")
    if cells < 1:
        raise ValueError("cells must be at least 1")
    out = image.copy()
    for x1, y1, x2, y2 in boxes:
        # Read the output, not the original: where boxes overlap, the later blur then grids what is already
        # a grid, and no unblurred pixel of the earlier face can be drawn back in.
        out[y1:y2, x1:x2] = _blur_patch(np.ascontiguousarray(out[y1:y2, x1:x2]), method, cells)
    return out


def _check_image(image: object) -> Image:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 \
            or image.shape[0] < 1 or image.shape[1] < 1:
        what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise RedactionError(f"cannot redact: expected a uint8 BGR HxWx3 picture, got {what}")
    return image


@dataclass(slots=True)
class _Counters:
    redacted: int = 0
    faces: int = 0
    failed: int = 0
    busy_retries: int = 0
    last_ms: float | None = None


class FaceBlur:
    """Finds faces with CenterFace through ``engine`` and blurs them (policies in the module docstring).

    ``model``: the engine's face model, whose manifest must keep faces from ``min_score`` (register
    :func:`privacy_manifest`); ``min_score``: faces scoring this or more are blurred; ``margin``: each box is
    grown by this share of its size on every side; ``method``: ``pixelate`` or ``gaussian``; ``cells``: grid
    cells across a face box's longer side; ``tile_px``: side of the tiles of the second pass (smaller finds
    smaller faces, at the cost of more tiles); ``tile_overlap_px``: their least overlap; ``busy_wait_s``: how
    long a redaction keeps asking an engine whose queue is full before it fails.
    """

    def __init__(self, engine: InferenceEngine, *, model: str = PRIVACY_MODEL, min_score: float = DEFAULT_MIN_SCORE,
                 margin: float = 0.4, method: BlurMethod = "pixelate", cells: int = 8, tile_px: int = 448,
                 tile_overlap_px: int = 96, busy_wait_s: float = 5.0) -> None:
        manifest = engine.models.get(model)
        if manifest is None:
            raise ModelError(f"no face model {model!r} in the inference engine (it has: "
                             f"{', '.join(sorted(engine.models))}); register privacy_manifest(...) under that name")
        if manifest.task != "face" or not isinstance(manifest.input, ImageInput):
            raise ModelError(f"{manifest.where}: a {manifest.task!r} model cannot find faces for the privacy blur")
        if not 0.0 < min_score <= 1.0:
            raise ValueError(f"min_score must be in (0, 1], not {min_score}")
        if manifest.thresholds.score > min_score:
            raise ModelError(f"{manifest.where}: the manifest drops faces below {manifest.thresholds.score}, "
                             f"the privacy blur must see them from {min_score}; give the engine "
                             f"privacy_manifest(manifest, min_score={min_score})")
        if not 0.0 <= margin <= 2.0:
            raise ValueError(f"margin must be in [0, 2], not {margin}")
        if method not in ("pixelate", "gaussian"):
            raise ValueError(f"unknown blur method {method!r} (pixelate or gaussian)")
        if not 2 <= cells <= 64:
            raise ValueError(f"cells must be in [2, 64], not {cells}")
        if tile_px < 32 or not 0 <= tile_overlap_px < tile_px // 2 or busy_wait_s < 0:
            raise ValueError("tile_px at least 32, tile_overlap_px in [0, tile_px / 2), busy_wait_s >= 0")
        self._engine = engine
        self.model = model
        self.min_score = min_score
        self.margin = margin
        self.method: BlurMethod = method
        self.cells = cells
        self.tile_px = tile_px
        self.tile_overlap_px = tile_overlap_px
        self.busy_wait_s = busy_wait_s
        self._input_w, self._input_h = manifest.input.width, manifest.input.height
        self._nms_iou = manifest.thresholds.nms_iou
        self._batch = manifest.max_batch
        self.counters = _Counters()

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {"redacted": c.redacted, "faces": c.faces, "failed": c.failed, "busy_retries": c.busy_retries,
                "last_ms": c.last_ms}

    def tiles(self, width: int, height: int) -> list[IntBox]:
        """The second pass's tiles for a picture of this size; none when the tiles would not magnify it at
        least ``_TILE_GAIN`` times more than the whole-picture pass does (a picture up to 560 px at the
        default 448 px tiles), as the tiles' cost would buy little."""
        if max(width, height) <= self.tile_px * _TILE_GAIN:
            return []
        whole_scale = min(self._input_w / width, self._input_h / height)
        overlap = max(self.tile_overlap_px, math.ceil(1.5 * _MIN_FACE_INPUT_PX / whole_scale))
        return tile_grid(width, height, self.tile_px, min(overlap, self.tile_px // 2))

    async def faces(self, image: Image, *, tiles: bool = True) -> list[Detection]:
        """The faces of ``image`` (both passes, duplicates merged) scoring ``min_score`` or more, in its pixels.
        Raises :class:`RedactionError` when the detector cannot run. For local use only (see the module
        docstring)."""
        _every, merged = await self._detect(image, tiles)
        return merged

    async def _detect(self, image: Image, tiles: bool) -> tuple[list[Detection], list[Detection]]:
        """(every detection of both passes, the same with duplicates merged), in ``image``'s pixels."""
        image = _check_image(image)
        h, w = image.shape[:2]
        regions = self.tiles(w, h) if tiles else []
        crops = [image[y1:y2, x1:x2] for x1, y1, x2, y2 in regions]
        found = await self._infer([image, *crops])
        per_region = [[d for d in found[0] if d.score >= self.min_score]]
        per_region += [[d.shifted(x1, y1) for d in dets if d.score >= self.min_score]
                       for dets, (x1, y1, _x2, _y2) in zip(found[1:], regions, strict=True)]
        merged = merge_region_detections(per_region, [(0, 0, w, h), *regions], w, h, self._nms_iou)
        return [d for dets in per_region for d in dets], merged

    async def _infer(self, images: list[Image]) -> list[list[Detection]]:
        # One request per model batch rather than one for all: the cameras' requests queue between them, so a
        # large picture's tiles delay a camera's frame by one batch at most, never by the whole redaction.
        found: list[list[Detection]] = []
        for start in range(0, len(images), self._batch):
            found.extend(await self._infer_batch(images[start:start + self._batch]))
        return found

    async def _infer_batch(self, images: list[Image]) -> list[list[Detection]]:
        give_up = time.monotonic() + self.busy_wait_s
        while True:
            try:
                found = await self._engine.infer(self.model, images, camera="privacy")
            except EngineBusy as exc:
                # The cameras' frames fill the queue in bursts; an upload is rare and may wait a little.
                if time.monotonic() + _BUSY_RETRY_S > give_up:
                    raise RedactionError(f"face detection refused: the inference engine stayed busy for "
                                         f"{self.busy_wait_s:g} s ({exc}); nothing was sent") from exc
                self.counters.busy_retries += 1
                await asyncio.sleep(_BUSY_RETRY_S)
                continue
            except (InferenceError, ModelError) as exc:
                raise RedactionError(f"face detection failed, nothing was sent: {exc}") from exc
            if len(found) != len(images):
                raise RedactionError(f"face detection gave {len(found)} results for {len(images)} images")
            return found

    async def redact(self, image: Image) -> Image:
        """A copy of ``image`` (uint8 BGR HxWx3) with every face found blurred; the input is not changed.
        Raises :class:`RedactionError` (and returns nothing) when the faces could not be found or blurred."""
        started = time.perf_counter()
        try:
            every, merged = await self._detect(image, tiles=True)
            h, w = image.shape[:2]
            # Every detection, not only the merged ones: a duplicate a tile saw a little larger or shifted
            # widens the blur, and blurring twice costs nothing.
            boxes = [b for b in (enlarge(d.box, self.margin, w, h) for d in every) if b is not None]
            out = await asyncio.to_thread(blur_boxes, image, boxes, method=self.method, cells=self.cells)
        except RedactionError:
            self.counters.failed += 1
            raise
        except Exception as exc:
            # Whatever else went wrong (a cv2 error, memory), the caller gets one kind of failure to refuse on.
            self.counters.failed += 1
            raise RedactionError(f"the faces could not be blurred, nothing was sent: {type(exc).__name__}: "
                                 f"{exc}") from exc
        c = self.counters
        c.redacted += 1
        c.faces += len(merged)
        c.last_ms = round((time.perf_counter() - started) * 1000.0, 1)
        return out

    def threadsafe(self, loop: asyncio.AbstractEventLoop | None = None, *, timeout_s: float = 120.0) -> Redactor:
        """A synchronous redactor for a worker thread: it runs :meth:`redact` on ``loop`` (by default the
        running loop of the caller of this method, the one that owns the engine) and waits at most
        ``timeout_s``. Called on that loop's own thread it refuses (it would wait for itself forever).
        Every failure is a :class:`RedactionError`."""
        target = loop if loop is not None else asyncio.get_running_loop()

        def redact(image: Image) -> Image:
            try:
                running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is target:
                raise RedactionError("the thread-safe redactor was called on its own event loop; await "
                                     "FaceBlur.redact there instead")
            if target.is_closed():
                raise RedactionError("the event loop that runs face detection is closed; nothing was sent")
            coro = self.redact(image)
            try:
                future = asyncio.run_coroutine_threadsafe(coro, target)
            except RuntimeError as exc:  # the loop closed between the check and the call
                coro.close()
                raise RedactionError(f"face detection could not be started: {exc}") from exc
            try:
                return future.result(timeout_s)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise RedactionError(f"face detection took longer than {timeout_s:g} s; nothing was sent") from None
            except concurrent.futures.CancelledError:
                raise RedactionError("face detection was cancelled (the gateway is stopping); nothing was "
                                     "sent") from None
            except RedactionError:
                raise
            except Exception as exc:
                raise RedactionError(f"face detection failed, nothing was sent: {type(exc).__name__}: "
                                     f"{exc}") from exc

        return redact

