"""Evidence kept on the box: snapshots (a JPEG with the boxes drawn) and clips, referenced from events by sha256.

Layout and policies:

* **Content-addressed.** A file is named by the sha256 of its bytes: ``<root>/snapshots/<sha256>.jpg`` and
  ``<root>/clips/<sha256>.mp4`` (or ``.mkv``/``.ts``, the container the clip writer chose). An event carries
  the hash in an :class:`~edgeagent.kernel.pipeline.events.Attachment`; the bytes stay here until the platform
  asks for them (``camera.upload_evidence``, :mod:`edgeagent.drivers.camera.upload`). The same bytes saved
  twice are one file with two event references.
* **Index.** ``<root>/index.sqlite3`` records camera, kind, created time (wall clock, seconds since the
  epoch), size and the event ids that reference each file (at most ``MAX_REFS`` each). The files are the
  truth: at open, rows without a file are dropped and files without a row are adopted (camera unknown,
  created = the file's mtime), so a lost or damaged index costs only metadata. A damaged index is moved
  aside and rebuilt from the files.
* **Atomic writes.** Bytes go to a ``.tmp-*`` name in the destination folder, are fsynced, then renamed
  over the final name, and the folder is fsynced; a crash leaves at most a ``.tmp-*`` file, which no reader
  ever sees and which the next open deletes (counted: ``tmp_cleaned``).
* **Size cap.** Snapshots and clips together stay under ``max_bytes``: after each save the oldest files
  (by creation) are deleted until the total fits (counted: ``evicted``). A single file larger than the cap is
  refused (:class:`EvidenceTooLarge`).
* **Retention.** :meth:`EvidenceStore.prune` deletes files created more than ``retention_s`` before ``now``
  (counted: ``expired``); the capability calls it periodically. Times are wall-clock because they must
  survive restarts; a clock moved back only keeps files longer.
* **Full disk.** A write failing with ENOSPC/EDQUOT evicts this store's oldest files to make room for the
  new one and retries once; if that is not enough, :class:`EvidenceDiskFull` is raised (counted:
  ``disk_full`` and ``failed``). Every save failure raises an :class:`EvidenceError` and never returns
  None: the caller emits its event **without** the attachment (the event matters more than the picture).
* **Off the loop.** Drawing, redaction, JPEG encoding, hashing, file writes, renames, unlinks and the
  index all run in a worker thread (``asyncio.to_thread``); state shared with the loop is guarded by one
  lock. Snapshots are encoded one at a time (the box has two cores and inference needs them); at most
  ``max_pending`` more wait, and beyond that :class:`EvidenceBusy` is raised at once (counted: ``busy``).
  Per-camera rate limits (one snapshot per track per N s) are the pipeline's business.
* **Privacy.** Evidence kept on the box is stored as seen (unblurred), unless ``save_snapshot`` is given a
  ``redact`` callable, which is then applied before encoding and nothing unblurred is kept (for sites that
  may not keep faces at all). What leaves the box goes through the uploader's own redactor when one is
  configured (:class:`~edgeagent.drivers.camera.upload.Uploader`), so the face blur runs only for the rare
  snapshot the platform asks for, not for every event. Files are created mode 0600 in 0700 folders.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import cv2
import numpy as np
import numpy.typing as npt
import orjson

from edgeagent.kernel.errors import EdgeagentError
from edgeagent.kernel.pipeline.events import Attachment
from edgeagent.models.types import Detection

log = logging.getLogger(__name__)

Image = npt.NDArray[np.uint8]
Point = tuple[float, float]
Redactor = Callable[[Image], Image]
AsyncRedactor = Callable[[Image], Awaitable[Image]]
Kind = Literal["snapshot", "clip"]

TMP_PREFIX: Final = ".tmp-"
INDEX_NAME: Final = "index.sqlite3"
MAX_REFS: Final = 64  # event ids remembered per file; an identical frame referenced more often keeps the first
SNAPSHOT_TYPE: Final = "image/jpeg"
CLIP_TYPES: Final[Mapping[str, str]] = {".mp4": "video/mp4", ".mkv": "video/x-matroska", ".ts": "video/mp2t"}
_MEDIA_TYPES: Final[Mapping[str, str]] = {".jpg": SNAPSHOT_TYPE, **CLIP_TYPES}
_DIRS: Final[Mapping[Kind, str]] = {"snapshot": "snapshots", "clip": "clips"}
_NAME_RE: Final = re.compile(r"^([0-9a-f]{64})(\.[a-z0-9]{1,4})$")
_SHA_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_CHUNK: Final = 1 << 20
_DISK_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


class EvidenceError(EdgeagentError):
    """Evidence could not be kept (or found). The caller goes on without it: an event is still emitted,
    only without its attachment."""


class EvidenceDiskFull(EvidenceError):
    """The disk is full even after this store evicted its oldest files to make room."""


class EvidenceTooLarge(EvidenceError):
    """One file is larger than the store's whole size cap."""


class EvidenceBusy(EvidenceError):
    """Too many snapshots are already waiting to be encoded; this one was refused at once (counted)."""


@dataclass(slots=True)
class EvidenceEntry:
    """One kept file, as the index records it."""

    sha256: str
    kind: Kind
    ext: str
    camera: str
    created: float
    size_bytes: int
    event_ids: list[str] = field(default_factory=list)

    @property
    def media_type(self) -> str:
        return _MEDIA_TYPES.get(self.ext, "application/octet-stream")

    @property
    def name(self) -> str:
        return f"{self.sha256}{self.ext}"

    def attachment(self) -> Attachment:
        return Attachment(kind=self.kind, sha256=self.sha256, media_type=self.media_type,
                          size_bytes=self.size_bytes)


# --- drawing -------------------------------------------------------------------------------------------------

# BGR, chosen to stay distinct from each other and readable with black or white text.
_PALETTE: Final = ((56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207),
                   (10, 249, 72), (23, 204, 146), (134, 219, 61), (211, 188, 0), (255, 194, 0),
                   (255, 115, 100), (236, 24, 0), (255, 56, 132), (133, 0, 82), (255, 56, 203))
_ZONE_BGR: Final = (0, 215, 255)
_LINE_BGR: Final = (255, 255, 0)
_FONT: Final = cv2.FONT_HERSHEY_SIMPLEX


def _colour(label: str) -> tuple[int, int, int]:
    # crc32, not hash(): the colour of a class must not change between runs.
    return _PALETTE[zlib.crc32(label.encode("utf-8")) % len(_PALETTE)]


def _ink(bgr: tuple[int, int, int]) -> tuple[int, int, int]:
    b, g, r = bgr
    return (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 140 else (255, 255, 255)


def _ascii(text: str) -> str:
    # OpenCV's Hershey fonts have no CJK glyphs (a plate's 京 would be drawn as '?' anyway); say so explicitly.
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)


def caption(det: Detection) -> str:
    """The label drawn above a box: ``#<track> <label> <text> <score>%`` (track and text when present)."""
    parts: list[str] = []
    track = det.extra.get("track_id")
    if track is not None and np.isfinite(track):
        parts.append(f"#{int(track)}")
    parts.append(det.label)
    if det.text:
        parts.append(det.text)
    parts.append(f"{det.score:.0%}" if np.isfinite(det.score) else "?")
    return _ascii(" ".join(parts))


def _as_bgr(image: npt.NDArray[Any]) -> Image:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise EvidenceError("an image must be a uint8 numpy array (BGR, HxWx3)")
    if image.ndim == 2:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    if image.ndim == 3 and image.shape[2] == 3:
        return image.copy()
    if image.ndim == 3 and image.shape[2] == 4:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGRA2BGR), dtype=np.uint8)
    raise EvidenceError(f"an image must be HxW or HxWx3 (got shape {image.shape})")


def _label(out: Image, text: str, x: int, y: int, bgr: tuple[int, int, int], scale: float, thick: int,
           *, above: bool = True) -> None:
    """Text on a filled plate of the box's colour, kept inside the image so it is never cut off."""
    h, w = out.shape[:2]
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
    pad = max(2, thick + 1)
    ph = th + base + 2 * pad
    top = y - ph if above and y - ph >= 0 else y
    top = min(max(0, top), max(0, h - ph))
    left = min(max(0, x), max(0, w - tw - 2 * pad))
    cv2.rectangle(out, (left, top), (left + tw + 2 * pad, top + ph), bgr, cv2.FILLED)
    cv2.putText(out, text, (left + pad, top + pad + th), _FONT, scale, _ink(bgr), thick, cv2.LINE_AA)


def _px(p: Point, w: int, h: int) -> tuple[int, int] | None:
    x, y = float(p[0]), float(p[1])
    if not (np.isfinite(x) and np.isfinite(y)):
        return None
    return round(min(max(x, -1.0), 2.0) * (w - 1)), round(min(max(y, -1.0), 2.0) * (h - 1))


def draw_boxes(image: npt.NDArray[Any], detections: Sequence[Detection] = (), *,
               zones: Mapping[str, Sequence[Point]] | None = None,
               lines: Mapping[str, tuple[Point, Point]] | None = None,
               captions: Sequence[str] | None = None) -> Image:
    """A copy of ``image`` (BGR; grey and BGRA are converted) with the detections, zones and lines drawn.

    ``detections`` are in the image's pixels (scale them with :meth:`Detection.shifted` when the snapshot
    comes from another stream than the detection did). ``zones`` (name → polygon) and ``lines``
    (name → (a, b), drawn as an arrow from a to b) are **normalized** to the frame (0..1 of its width and
    height), as the camera config writes them. ``captions`` replaces the default :func:`caption` per
    detection. Line widths and text scale with the image, so labels stay legible from 576p to 4K. The input
    is never modified. Non-finite coordinates are skipped.
    """
    out = _as_bgr(image)
    h, w = out.shape[:2]
    scale = min(1.6, max(0.45, h / 900))
    thick = max(1, round(scale * 1.6))
    box_thick = max(2, round(h / 360))
    for name, points in (zones or {}).items():
        pts = [p for p in (_px(pt, w, h) for pt in points) if p is not None]
        if len(pts) < 2:
            continue
        cv2.polylines(out, [np.array(pts, dtype=np.int32)], True, _ZONE_BGR, box_thick, cv2.LINE_AA)
        _label(out, _ascii(name), pts[0][0], pts[0][1], _ZONE_BGR, scale * 0.8, thick, above=False)
    for name, (a, b) in (lines or {}).items():
        pa, pb = _px(a, w, h), _px(b, w, h)
        if pa is None or pb is None:
            continue
        cv2.arrowedLine(out, pa, pb, _LINE_BGR, box_thick, cv2.LINE_AA, tipLength=0.04)
        _label(out, _ascii(name), pa[0], pa[1], _LINE_BGR, scale * 0.8, thick, above=False)
    for i, det in enumerate(detections):
        x1, y1, x2, y2 = (float(v) for v in det.box)
        if not all(np.isfinite(v) for v in (x1, y1, x2, y2)):
            continue
        p1 = (round(min(max(x1, 0.0), w - 1.0)), round(min(max(y1, 0.0), h - 1.0)))
        p2 = (round(min(max(x2, 0.0), w - 1.0)), round(min(max(y2, 0.0), h - 1.0)))
        bgr = _colour(det.label)
        cv2.rectangle(out, p1, p2, bgr, box_thick, cv2.LINE_AA)
        for px, py, ps in det.points:
            if np.isfinite(px) and np.isfinite(py) and ps > 0.3:
                cv2.circle(out, (round(float(px)), round(float(py))), box_thick + 1, bgr, cv2.FILLED, cv2.LINE_AA)
        text = _ascii(captions[i]) if captions is not None and i < len(captions) else caption(det)
        _label(out, text, p1[0], p1[1], bgr, scale, thick)
    return out


def apply_redactor(redact: Redactor, image: Image) -> Image:
    """The redactor's output, checked; whatever it raises becomes an :class:`EvidenceError` so the event still
    goes out (without a picture that could not be blurred)."""
    try:
        out = redact(image)
    except Exception as exc:
        raise EvidenceError(f"the redactor failed: {type(exc).__name__}: {exc}") from exc
    return _redacted(out)


async def apply_async_redactor(redact: AsyncRedactor, image: Image) -> Image:
    """:func:`apply_redactor` for a coroutine redactor (one that awaits the inference engine)."""
    try:
        out = await redact(image)
    except Exception as exc:
        raise EvidenceError(f"the redactor failed: {type(exc).__name__}: {exc}") from exc
    return _redacted(out)


def in_thread(redact: Redactor) -> AsyncRedactor:
    """A synchronous redactor as a coroutine one, run in a worker thread."""

    async def run(image: Image) -> Image:
        return await asyncio.to_thread(redact, image)

    return run


def _redacted(out: object) -> Image:
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3:
        raise EvidenceError("the redactor did not return a uint8 BGR image")
    return out


def encode_jpeg(image: npt.NDArray[Any], quality: int) -> npt.NDArray[np.uint8]:
    """JPEG bytes (as a uint8 array, no copy) of a BGR image. Blocking: call it from a thread."""
    ok, buf = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise EvidenceError("JPEG encoding failed")
    return np.asarray(buf, dtype=np.uint8).reshape(-1)


# --- the store -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Counters:
    saved: int = 0
    deduplicated: int = 0
    evicted: int = 0
    expired: int = 0
    failed: int = 0
    disk_full: int = 0
    busy: int = 0
    tmp_cleaned: int = 0
    index_errors: int = 0
    bytes_written: int = 0


class EvidenceStore:
    """Snapshots and clips on the box (policies in the module docstring). ``async with`` it, or call
    :meth:`open` and :meth:`aclose`. ``get`` and ``entry`` are cheap and safe on the loop."""

    def __init__(self, root: Path, *, max_bytes: int, retention_s: float, jpeg_quality: int = 85,
                 max_pending: int = 8, clock: Callable[[], float] = time.time) -> None:
        if max_bytes <= 0 or retention_s <= 0 or not 1 <= jpeg_quality <= 100 or max_pending < 0:
            raise ValueError("max_bytes and retention_s must be > 0, jpeg_quality 1..100, max_pending >= 0")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.retention_s = float(retention_s)
        self.jpeg_quality = int(jpeg_quality)
        self._max_pending = max_pending
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, EvidenceEntry] = {}  # oldest first: eviction takes from the front
        self._total = 0
        self._db: sqlite3.Connection | None = None
        self._encode = asyncio.Semaphore(1)
        self._opening = asyncio.Lock()
        self._waiting = 0
        self.counters = _Counters()

    # --- life cycle ---

    async def __aenter__(self) -> EvidenceStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Create the folders, delete leftover temporary files, load and reconcile the index, enforce the cap.
        Call it at start: until then :meth:`get` knows no file. Saving and pruning open the store themselves
        if nobody did (so a wiring slip costs the index's first answers, not every snapshot)."""
        async with self._opening:
            if self._db is None:
                try:
                    await asyncio.to_thread(self._open)
                except (OSError, sqlite3.Error) as exc:
                    raise EvidenceError(f"cannot open the evidence store in {self.root}: {exc}") from exc

    async def aclose(self) -> None:
        if self._db is not None:
            await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _open(self) -> None:
        with self._lock:
            for kind in ("snapshot", "clip"):
                d = self._dir(kind)
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
                for p in d.iterdir():
                    if p.name.startswith(TMP_PREFIX):
                        with contextlib.suppress(FileNotFoundError):
                            p.unlink()
                        self.counters.tmp_cleaned += 1
            if self.counters.tmp_cleaned:
                log.warning("evidence: removed %d unfinished file(s) left by an interrupted write",
                            self.counters.tmp_cleaned)
            self._db = self._connect()
            rows = self._load_rows()
            found = self._scan_files()
            entries: list[EvidenceEntry] = []
            stale: list[str] = []
            for sha, entry in rows.items():
                on_disk = found.pop(sha, None)
                if on_disk is None or on_disk[0] != entry.kind or on_disk[1] != entry.ext:
                    stale.append(sha)
                    continue
                entry.size_bytes = on_disk[2]
                entries.append(entry)
            for sha, (kind, ext, size, mtime) in found.items():
                entry = EvidenceEntry(sha, kind, ext, "", mtime, size)
                entries.append(entry)
                self._index_put(entry)
            if stale:
                self._index_delete(stale)
            if found:
                log.info("evidence: adopted %d file(s) missing from the index", len(found))
            entries.sort(key=lambda e: e.created)
            self._entries = {e.sha256: e for e in entries}
            self._total = sum(e.size_bytes for e in entries)
            self._enforce_cap(keep=None)

    def _connect(self) -> sqlite3.Connection:
        path = self.root / INDEX_NAME
        try:
            return self._schema(sqlite3.connect(path, check_same_thread=False, isolation_level=None))
        except sqlite3.DatabaseError as exc:
            aside = path.with_name(f"{INDEX_NAME}.damaged-{int(time.time())}")
            log.warning("evidence: index %s is damaged (%s); moved to %s and rebuilt from the files", path, exc,
                        aside.name)
            with contextlib.suppress(FileNotFoundError):
                path.rename(aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{path}{suffix}").unlink()
            return self._schema(sqlite3.connect(path, check_same_thread=False, isolation_level=None))

    @staticmethod
    def _schema(db: sqlite3.Connection) -> sqlite3.Connection:
        try:
            # The files are the truth and are fsynced themselves; the index may lose its last rows on a
            # power cut (they are adopted back at open), so it need not fsync every commit.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS evidence (sha256 TEXT PRIMARY KEY, kind TEXT NOT NULL, "
                       "ext TEXT NOT NULL, camera TEXT NOT NULL, created REAL NOT NULL, size INTEGER NOT NULL, "
                       "event_ids TEXT NOT NULL DEFAULT '[]')")
            db.execute("SELECT count(*) FROM evidence").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _load_rows(self) -> dict[str, EvidenceEntry]:
        assert self._db is not None
        rows: dict[str, EvidenceEntry] = {}
        try:
            cur = self._db.execute("SELECT sha256, kind, ext, camera, created, size, event_ids FROM evidence")
            for sha, kind, ext, camera, created, size, refs in cur:
                if kind not in _DIRS or not isinstance(sha, str) or not _SHA_RE.match(sha):
                    continue
                try:
                    ids = [str(i) for i in orjson.loads(refs)][:MAX_REFS]
                except (orjson.JSONDecodeError, TypeError):
                    ids = []
                rows[sha] = EvidenceEntry(sha, kind, str(ext), str(camera), float(created), int(size), ids)
        except sqlite3.DatabaseError as exc:
            self.counters.index_errors += 1
            log.warning("evidence: cannot read the index (%s); rebuilding it from the files", exc)
        return rows

    def _scan_files(self) -> dict[str, tuple[Kind, str, int, float]]:
        found: dict[str, tuple[Kind, str, int, float]] = {}
        for kind in ("snapshot", "clip"):
            for p in self._dir(kind).iterdir():
                m = _NAME_RE.match(p.name)
                if m is None or (kind == "snapshot" and m[2] != ".jpg") or (kind == "clip" and m[2] not in CLIP_TYPES):
                    continue
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                found[m[1]] = (kind, m[2], st.st_size, st.st_mtime)
        return found

    # --- queries (on the loop) ---

    def get(self, sha256: str) -> Path | None:
        """The file with these bytes, or None when it was never kept or is already evicted or expired."""
        entry = self._entries.get(sha256)  # one dict lookup: atomic, no lock needed
        return None if entry is None else self._path(entry)

    def entry(self, sha256: str) -> EvidenceEntry | None:
        return self._entries.get(sha256)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {"files": len(self._entries), "bytes": self._total, "max_bytes": self.max_bytes,
                "retention_s": self.retention_s, "saved": c.saved, "deduplicated": c.deduplicated,
                "evicted": c.evicted, "expired": c.expired, "failed": c.failed, "disk_full": c.disk_full,
                "busy": c.busy, "tmp_cleaned": c.tmp_cleaned, "index_errors": c.index_errors,
                "bytes_written": c.bytes_written, "encode_waiting": self._waiting}

    def _dir(self, kind: Kind) -> Path:
        return self.root / _DIRS[kind]

    def _path(self, entry: EvidenceEntry) -> Path:
        return self._dir(entry.kind) / entry.name

    # --- saving ---

    async def save_snapshot(self, camera: str, image: npt.NDArray[Any], detections: Sequence[Detection] = (), *,
                            zones: Mapping[str, Sequence[Point]] | None = None,
                            lines: Mapping[str, tuple[Point, Point]] | None = None,
                            redact: Redactor | None = None, event_id: str | None = None) -> Attachment:
        """Draw the boxes, redact (when given), encode a JPEG and keep it; all off the loop.

        ``image`` is read in a worker thread: do not modify it until this returns (decoded frames are fresh
        arrays, so the pipeline need not copy). Raises :class:`EvidenceError` (a subclass says which
        failure); the caller then emits its event without the attachment.
        """
        await self._ensure_open()
        if self._waiting >= self._max_pending + 1:
            self.counters.busy += 1
            raise EvidenceBusy(f"{camera}: {self._waiting} snapshots already waiting to be encoded; not kept")
        self._waiting += 1
        try:
            async with self._encode:
                return await asyncio.to_thread(self._save_snapshot, camera, image, detections, zones, lines,
                                               redact, event_id)
        finally:
            self._waiting -= 1

    def _save_snapshot(self, camera: str, image: npt.NDArray[Any], detections: Sequence[Detection],
                       zones: Mapping[str, Sequence[Point]] | None, lines: Mapping[str, tuple[Point, Point]] | None,
                       redact: Redactor | None, event_id: str | None) -> Attachment:
        try:
            picture: npt.NDArray[Any] = image
            if redact is not None:
                picture = apply_redactor(redact, _as_bgr(image))
            try:
                drawn = draw_boxes(picture, detections, zones=zones, lines=lines)
                jpeg = encode_jpeg(drawn, self.jpeg_quality)
            except cv2.error as exc:
                raise EvidenceError(f"{camera}: cannot draw or encode the snapshot: {exc}") from exc
            sha = hashlib.sha256(jpeg.data).hexdigest()
            entry = self._keep(sha, "snapshot", ".jpg", camera, event_id, lambda final: _write_atomic(final, jpeg),
                               int(jpeg.nbytes))
        except EvidenceError:
            self.counters.failed += 1
            raise
        return entry.attachment()

    async def add_clip(self, path: Path, camera: str, *, event_id: str | None = None) -> Attachment:
        """Move a finished clip into the store (the source path is gone afterwards, also when the same bytes
        were already kept). Its suffix names the container: one of ``CLIP_TYPES``."""
        await self._ensure_open()
        return await asyncio.to_thread(self._add_clip, Path(path), camera, event_id)

    def _add_clip(self, src: Path, camera: str, event_id: str | None) -> Attachment:
        ext = src.suffix.lower()
        if ext not in CLIP_TYPES:
            self.counters.failed += 1
            raise EvidenceError(f"{src.name}: a clip must be one of {', '.join(CLIP_TYPES)}")
        try:
            try:
                with src.open("rb") as f:
                    # The clip writer may not have flushed it to disk: a rename of unsynced data can leave an
                    # empty file after a power cut.
                    os.fsync(f.fileno())
                    digest = hashlib.sha256()
                    size = 0
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
            except OSError as exc:
                raise EvidenceError(f"cannot read the clip {src}: {exc.strerror}") from exc
            sha = digest.hexdigest()
            entry = self._keep(sha, "clip", ext, camera, event_id, lambda final: _move_in(src, final), size)
            with contextlib.suppress(FileNotFoundError):
                src.unlink()  # already kept (a duplicate): the source is not needed any more
        except EvidenceError:
            self.counters.failed += 1
            raise
        return entry.attachment()

    def _keep(self, sha: str, kind: Kind, ext: str, camera: str, event_id: str | None,
              write: Callable[[Path], None], size: int) -> EvidenceEntry:
        """Write (unless these bytes are already kept), index, and enforce the cap. In a worker thread."""
        if size > self.max_bytes:
            raise EvidenceTooLarge(f"{camera}: a {kind} of {size} bytes is larger than the whole evidence cap "
                                   f"({self.max_bytes} bytes)")
        with self._lock:
            known = self._entries.get(sha)
            if known is not None:
                self.counters.deduplicated += 1
                self._add_ref(known, event_id)
                return known
        entry = EvidenceEntry(sha, kind, ext, camera, self._clock(), size, [event_id] if event_id else [])
        final = self._path(entry)
        try:
            write(final)
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise EvidenceError(f"{camera}: cannot write {final}: {exc.strerror}") from exc
            with self._lock:
                freed = self._evict_oldest(size * 2, reason="disk full")
            if not freed:
                self.counters.disk_full += 1
                raise EvidenceDiskFull(f"{camera}: disk full; {kind} not kept (nothing left to evict)") from exc
            try:
                write(final)
            except OSError as again:
                if again.errno in _DISK_FULL:
                    self.counters.disk_full += 1
                    raise EvidenceDiskFull(f"{camera}: disk full even after evicting {freed} bytes of older "
                                           f"evidence; {kind} not kept") from again
                raise EvidenceError(f"{camera}: cannot write {final}: {again.strerror}") from again
        with self._lock:
            if self._db is None:
                # Closed while writing (shutdown): keep the file; the next open adopts it.
                raise EvidenceError("the evidence store is closed")
            raced = self._entries.get(sha)
            if raced is not None:
                self._add_ref(raced, event_id)
                return raced
            self._entries[sha] = entry
            self._total += size
            self.counters.saved += 1
            self.counters.bytes_written += size
            self._index_put(entry)
            self._enforce_cap(keep=sha)
        return entry

    def _add_ref(self, entry: EvidenceEntry, event_id: str | None) -> None:
        if event_id and event_id not in entry.event_ids and len(entry.event_ids) < MAX_REFS:
            entry.event_ids.append(event_id)
            self._index_put(entry)

    async def add_reference(self, sha256: str, event_id: str) -> bool:
        """Record that an event refers to a kept file (events get their id after the attachment exists).
        False when the file is not kept (any more)."""
        await self._ensure_open()

        def run() -> bool:
            with self._lock:
                entry = self._entries.get(sha256)
                if entry is None:
                    return False
                self._add_ref(entry, event_id)
                return True

        return await asyncio.to_thread(run)

    # --- deleting ---

    async def prune(self, now: float | None = None) -> int:
        """Delete files created more than ``retention_s`` before ``now`` (wall clock); returns how many."""
        await self._ensure_open()
        at = self._clock() if now is None else now
        return await asyncio.to_thread(self._prune, at)

    def _prune(self, now: float) -> int:
        cutoff = now - self.retention_s
        with self._lock:
            old = [e for e in self._entries.values() if e.created < cutoff]
            self._remove(old)
            self.counters.expired += len(old)
        if old:
            log.info("evidence: %d file(s) older than %g days deleted", len(old), self.retention_s / 86_400)
        return len(old)

    def _enforce_cap(self, keep: str | None) -> None:
        excess = self._total - self.max_bytes
        if excess > 0:
            self._evict_oldest(excess, reason="size cap", keep=keep)

    def _evict_oldest(self, need: int, *, reason: str, keep: str | None = None) -> int:
        """Delete the oldest files until ``need`` bytes are freed (caller holds the lock); returns bytes freed."""
        victims: list[EvidenceEntry] = []
        freed = 0
        for entry in self._entries.values():
            if freed >= need:
                break
            if entry.sha256 == keep:
                continue
            victims.append(entry)
            freed += entry.size_bytes
        self._remove(victims)
        self.counters.evicted += len(victims)
        if victims:
            log.info("evidence: evicted %d oldest file(s), %d bytes (%s)", len(victims), freed, reason)
        return freed

    def _remove(self, entries: Iterable[EvidenceEntry]) -> None:
        gone: list[str] = []
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                self._path(entry).unlink()
            if self._entries.pop(entry.sha256, None) is not None:
                self._total -= entry.size_bytes
            gone.append(entry.sha256)
        if gone:
            self._index_delete(gone)

    # --- index (caller holds the lock) ---

    def _index_put(self, e: EvidenceEntry) -> None:
        if self._db is None:
            return
        try:
            self._db.execute(
                "INSERT INTO evidence (sha256, kind, ext, camera, created, size, event_ids) VALUES (?,?,?,?,?,?,?) "
                "ON CONFLICT(sha256) DO UPDATE SET event_ids=excluded.event_ids",
                (e.sha256, e.kind, e.ext, e.camera, e.created, e.size_bytes, orjson.dumps(e.event_ids).decode()))
        except sqlite3.Error as exc:
            # The file is kept and fsynced; only its metadata is at risk (adopted back at the next open).
            self.counters.index_errors += 1
            log.warning("evidence: index not updated for %s: %s", e.sha256[:12], exc)

    def _index_delete(self, shas: Sequence[str]) -> None:
        if self._db is None:
            return
        try:
            self._db.executemany("DELETE FROM evidence WHERE sha256 = ?", [(s,) for s in shas])
        except sqlite3.Error as exc:
            self.counters.index_errors += 1
            log.warning("evidence: index not updated (%d deletions): %s", len(shas), exc)

    async def _ensure_open(self) -> None:
        if self._db is None:
            await self.open()


# --- files -----------------------------------------------------------------------------------------------------


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(final: Path) -> Path:
    return final.with_name(f"{TMP_PREFIX}{secrets.token_hex(8)}{final.suffix}")


def _write_atomic(final: Path, data: npt.NDArray[np.uint8] | bytes) -> None:
    """tmp + fsync + rename + fsync(folder): readers see the whole file or nothing."""
    tmp = _tmp_name(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = (data.data if isinstance(data, np.ndarray) else memoryview(data)).cast("B")
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.close(fd)
    try:
        tmp.replace(final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)


def _move_in(src: Path, final: Path) -> None:
    """A rename when the clip is on the same filesystem (the source was fsynced); a copy through a temporary
    name otherwise (the source is removed by the caller)."""
    try:
        src.replace(final)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    else:
        final.chmod(0o600)
        _fsync_dir(final.parent)
        return
    tmp = _tmp_name(final)
    try:
        with src.open("rb") as fin, open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600),
                                         "wb") as fout:
            shutil.copyfileobj(fin, fout, _CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        tmp.replace(final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)
