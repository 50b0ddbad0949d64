"""Full-rate grey taps on a camera's RTSP session (see :class:`LumaTap`).

A consumer that needs every frame (the thrown-object path: a falling object crosses a floor in a tenth of a
second) registers a tap on the camera's one :class:`~edgeagent.drivers.camera.rtsp.RtspSource`
(``source.luma_tap(region)``, before the session opens: a tap turns off the decoder's ``NONREF`` skip). For
each decoded frame, converted to BGR for the detection path or not, the reader thread hands the tap the
decoder's picture; the tap copies its luma plane (Y: grey as the stream carries it, video range) inside its
region: no colour conversion, no swscale, a memory copy of the region (~0.05 ms for 640x360). Its queue holds
``max_frames``; when full the oldest is dropped and counted. It is read from the consumer's own thread
(``get``), so a heavy consumer never holds the reader or the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

log = logging.getLogger(__name__)

Region = tuple[int, int, int, int]
# Pixel formats whose first plane is the luma, one byte per pixel.
_LUMA_FIRST: Final = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv440p",
                                "yuvj440p", "yuv411p", "yuv410p", "nv12", "nv21", "nv16", "gray"})


@dataclass(frozen=True, slots=True)
class LumaFrame:
    """A full-rate grey crop: the frame's luma plane inside the tap's region, copied. ``x0, y0``: the region's
    top-left in the frame; ``frame_w, frame_h``: the whole frame's size; ``seq``, ``pts_s``, ``mono_s`` as the
    source's frames."""

    luma: np.ndarray  # uint8 HxW, the region only
    x0: int
    y0: int
    frame_w: int
    frame_h: int
    seq: int
    pts_s: float | None
    mono_s: float


def luma_region(frame: Any, region: Region) -> np.ndarray:
    """A decoded picture's (PyAV VideoFrame) luma inside ``region`` (x1, y1, x2, y2), copied: from the
    decoder's Y plane where the format has one (no conversion), else through a grey conversion."""
    x1, y1, x2, y2 = region
    if frame.format.name in _LUMA_FIRST:
        plane = frame.planes[0]
        rows = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)
        return np.array(rows[y1:y2, x1:x2], dtype=np.uint8, copy=True)
    grey = np.asarray(frame.to_ndarray(format="gray"), dtype=np.uint8)
    return np.array(grey[y1:y2, x1:x2], dtype=np.uint8, copy=True)


class LumaTap:
    """A full-rate consumer's bounded queue of :class:`LumaFrame` (see the module docstring), thread-safe.
    ``region(frame_w, frame_h)`` gives the crop for a picture size (asked once per size)."""

    def __init__(self, region: Callable[[int, int], Region], *, max_frames: int = 25, name: str = "") -> None:
        if max_frames < 1:
            raise ValueError("max_frames must be at least 1")
        self.name = name
        self._region_of = region
        self._region: tuple[tuple[int, int], Region] | None = None
        self.max_frames = max_frames
        self._queue: deque[LumaFrame] = deque()
        self._cond = threading.Condition()
        self.closed = False
        self.delivered = 0
        self.dropped = 0
        self.errors = 0

    def region(self, w: int, h: int) -> Region:
        if self._region is None or self._region[0] != (w, h):
            x1, y1, x2, y2 = (int(v) for v in self._region_of(w, h))
            x1, y1 = min(max(0, x1), w - 1), min(max(0, y1), h - 1)
            self._region = ((w, h), (x1, y1, max(x1 + 1, min(w, x2)), max(y1 + 1, min(h, y2))))
        return self._region[1]

    def feed(self, frame: Any, seq: int, pts_s: float | None) -> None:
        """A decoded picture (called by the source's reader thread for every frame). Never raises: a failure
        (a bad region) is counted and logged once."""
        try:
            w, h = int(frame.width), int(frame.height)
            region = self.region(w, h)
            crop = luma_region(frame, region)
        except Exception:
            self.errors += 1
            if self.errors == 1:
                log.exception("%s: a luma tap failed", self.name)
            return
        self.put(LumaFrame(crop, region[0], region[1], w, h, seq, pts_s, time.monotonic()))

    def put(self, frame: LumaFrame) -> None:
        with self._cond:
            if len(self._queue) >= self.max_frames:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(frame)
            self.delivered += 1
            self._cond.notify()

    def get(self, timeout_s: float | None = None) -> LumaFrame | None:
        """The oldest frame waiting; None after ``timeout_s`` without one or once closed."""
        with self._cond:
            if not self._queue and not self.closed:
                self._cond.wait(timeout_s)
            return self._queue.popleft() if self._queue else None

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cond:
            depth = len(self._queue)
        return {"delivered": self.delivered, "dropped": self.dropped, "errors": self.errors, "depth": depth}
