"""RTSP ingest: one session per camera, read and decoded in its own thread, shared by everything in the box.

Cameras refuse extra RTSP sessions, so a camera has exactly one :class:`RtspSource`; the detector pipeline,
snapshot grabs and the clip recorder all read from it (``frames()`` per consumer, ``latest()``,
``packets_since()``).

**Library: PyAV, chosen by measurement** (``bench/decode.py``; loopback gst-rtsp-server, the campus clip as
H.264 768x576 10 fps GOP 10, this shared 2-core box, OpenCV 5.1 vs PyAV 18.1 on FFmpeg 8; two runs):

=====================================  ======================  ======================================
                                       OpenCV (CAP_FFMPEG)     PyAV
=====================================  ======================  ======================================
CPU per frame, live, to BGR, 1 thread  2.5-3.0 ms              2.9-3.3 ms (decode alone 2.2-2.6 ms)
CPU per frame, from the file           1.9-2.1 ms              2.2-2.4 ms (decode alone 1.6-1.8 ms)
open to first frame                    0.8-1.0 s               0.9 s (both mostly wait for a keyframe)
encoded packets for clips              no: raw mode gives      yes: each demuxed packet, with pts and
                                       packets *instead of*    keyframe flag, is what we also decode
                                       frames: a second
                                       session per camera
freeze noticed (3 s read timeout)      9.1 s                   6.0 s (library); 3.0 s by our watchdog
loop lag p99, 4 streams decoding       2.9-3.3 ms              1.8-2.4 ms
=====================================  ======================  ======================================

This module's ``RtspSource`` on 4 cameras: 3.1 ms CPU per frame with every frame converted, 2.7 ms at
``decode_fps=5`` (half converted), loop lag p99 2.0 ms. PyAV costs 10-15% more CPU per frame *converted to
BGR* and less than OpenCV for a frame it only decodes: frames a consumer does not need at its
``decode_fps`` are never converted (``to_ndarray`` is a quarter of the cost). Decisively, it gives the encoded
packets of the very session that decodes, which evidence clips need without re-encoding and without a second
session the camera would refuse; and its open and read timeouts are per container (``timeout=(open_s,
read_s)``, an interrupt callback), where OpenCV's take process-wide environment options
(``OPENCV_FFMPEG_CAPTURE_OPTIONS``, which also drop its TCP default when set). The GIL: PyAV releases it in
``av_read_frame``, in the decoder and in swscale (its interrupt callback takes it briefly every ~100 ms while
a read waits), so reader threads leave the loop alone, as the lag figures show. Figures vary with load:
rerun the bench before changing this.

Policies:

* **Transport and timeouts.** RTSP over TCP (no UDP loss on a busy LAN, one port through NAT), a small probe
  (``analyzeduration`` 0.2 s, ``probesize`` 100 kB: open in ~0.3 s plus the wait for a keyframe instead of
  1.2 s or, with the default probe, 3.6 s). ``open_timeout_s`` bounds connecting and probing each; reads are
  bounded by ``min(read_timeout_s, freeze_after_s)``.
* **Freeze watchdog (our own).** FFmpeg's RTP depacketizer holds back the last frame until the next one
  starts, so an interrupted read first *returns* that frame and only the next read fails: the library alone
  notices a freeze after twice its timeout. The reader therefore treats a read that took the whole timeout as
  a freeze (the stream was silent that long), and separately reopens when packets arrive but nothing has
  decoded for ``freeze_after_s`` (garbage, or a stream of undecodable packets). A freeze is noticed
  ``freeze_after_s`` (3 s) after the last frame, as against about 90 s with OpenCV's defaults.
* **Reconnect** after any failure with jittered exponential backoff (``backoff_initial_s`` doubling up to
  ``backoff_max_s``, each delay drawn from [d/2, d]); the backoff resets once a session has streamed for
  ``stable_after_s``. Reconnects are counted (and per last hour) in ``stats()``.
* **Stale frames flushed after open.** What was buffered while opening (the probe's packets, a server's
  backlog) arrives in a burst; those frames are decoded (later frames reference them) but not handed out,
  until a read has to wait for the network (we are at the live edge) or ``flush_max_s`` passed.
* **Frame queues.** Each consumer of ``frames()`` has its own queue of ``queue_frames`` (2) frames; when full
  the oldest is dropped and counted (per consumer and in total): frames are perishable, the newest matters.
  The reader wakes the loop at most once per batch (one pending ``call_soon_threadsafe``), so a stalled loop
  cannot pile up callbacks or frames.
* **Decode rate.** Every packet of an H.264/H.265 stream is decoded (P-frames reference their
  predecessors; a camera stream rarely has the non-reference B-frames whose decoding ``skip_frame='NONREF'``
  skips, which is set when ``decode_fps`` is lower than the stream's), but only frames needed for
  ``decode_fps`` are converted to BGR arrays; the rest are counted as skipped. ``keyframes_only`` sends only
  keyframes to the decoder: decoding itself is skipped, at one frame per GOP. ``set_idle(True)`` does the same
  for a while (the pipeline's quiet scene: decoding every frame is most of its cost); ``set_idle(False)``
  resumes at once, mid-GOP too: the packets since the keyframe (kept, up to ``GOP_KEEP_MAX``) are decoded in
  one burst, so the next frame handed out is the current one.
* **Full-rate grey taps** (``luma_tap()``, see :mod:`edgeagent.drivers.camera.luma`): every decoded frame's
  luma inside a region, for a consumer that needs the full rate; registering one turns off the ``NONREF`` skip.
* **Errors never crash the reader.** Decoder errors are counted and the packet skipped (FFmpeg's H.264
  decoder raises only for broken headers and parameter sets; damage inside a slice it conceals, and such
  frames, flagged corrupt, are handed out and counted as ``corrupt_frames``); anything else ends the session
  with a reason and a reconnect.
* **State.** ``on_state(online, reason)`` is called on the loop thread once per transition (the first frame
  after an open → online; a failure → offline with a reason such as ``connection refused`` or ``frozen: no
  data for 3.0 s``); the first state known is reported too.
* **Secrets.** The URL's password never reaches logs, reasons or stats: reasons are built from the error's
  kind, never from the library's message (which embeds the URL), and URLs are shown through
  :func:`redact_url`.
* **Pre-event packet buffer.** Encoded packets (bytes, pts/dts, keyframe flag, time base, the session's stream
  parameters) of the last ``packet_buffer_s`` seconds, grouped by GOP and bounded by ``packet_buffer_bytes``:
  the oldest GOPs go first (counted); a packet before the first keyframe of a session is useless and not
  kept. ``clips.py`` turns them into MP4 files without re-encoding.
* **Files.** ``loop_file=True`` plays a local recording (``file:`` URL or a path) in real time, looping
  (the demo's camera): packets are paced by their timestamps; the end of the file reopens it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import av
import av.error
import numpy as np

from edgeagent.drivers.camera.luma import LumaTap, Region

log = logging.getLogger(__name__)

RTSP_OPTIONS: Final[Mapping[str, str]] = {
    "rtsp_transport": "tcp",
    "analyzeduration": "200000",  # µs
    "probesize": "100000",  # bytes
}
LIVE_EDGE_WAIT_S: Final = 0.02  # a read that waited this long found no buffered data: we are live
FPS_WINDOW_S: Final = 5.0
HOUR_S: Final = 3600.0
GOP_KEEP_MAX: Final = 300  # packets of the current GOP kept to resume decoding after an idle spell
SIZE_CHANGE_AFTER: Final = 10  # frames in a row of another picture size: a real change, not damage

StateCallback = Callable[[bool, str], None]


def redact_url(url: str) -> str:
    """``rtsp://user:***@host:port/path`` (the password, and any query, never shown)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{parts.username or ''}:***@{host}", parts.path, "", ""))


def _endpoint(url: str) -> str:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.hostname or '?'}:{port or 554}"


def backoff_s(attempt: int, initial_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """The wait before reconnect number ``attempt`` (0 first): ``initial_s`` doubling per attempt up to
    ``max_s``, drawn from [d/2, d] so that cameras that failed together do not retry together."""
    cap = min(max_s, initial_s * (2 ** min(attempt, 30)))
    return (rng or random).uniform(cap / 2, cap)


class Frame:
    """A decoded frame handed to consumers.

    ``image`` (uint8 BGR HxWx3) is shared between consumers and read-only ([1]): copy it (or use a function
    that returns a copy, as ``evidence.draw_boxes`` does) to draw on it. From a source with
    ``bgr_on_demand`` it is converted from the decoder's picture on first access (1-3 ms at 768x576, in the
    thread that asks first, once: touch it from a worker thread, not the loop) and then kept.

    ``gray``: the decoder's luma (Y) plane as a read-only HxW uint8 view, no conversion, when the picture is
    YUV (``None`` otherwise); ``gray_full_range`` says whether it spans 0-255 (JPEG range) or 16-235 (video
    range: a difference of 25 grey levels in BGR is about 21 there). ``seq`` counts decoded frames per source
    (gaps: frames skipped, flushed or dropped), ``pts_s`` is stream time, ``mono_s`` ``time.monotonic()``
    when decoded.
    """

    __slots__ = ("_av", "_image", "_lock", "gray", "gray_full_range", "height", "mono_s", "pts_s", "seq", "width")

    def __init__(self, image: np.ndarray | None = None, seq: int = 0, pts_s: float | None = None,
                 mono_s: float = 0.0, *, av_frame: av.VideoFrame | None = None, gray: np.ndarray | None = None,
                 gray_full_range: bool = True) -> None:
        if image is None and av_frame is None:
            raise ValueError("a Frame needs an image or a decoded picture")
        self._image = image
        self._av = av_frame if image is None else None
        self._lock = threading.Lock() if image is None else None
        self.seq = seq
        self.pts_s = pts_s
        self.mono_s = mono_s
        if image is not None:
            self.height, self.width = int(image.shape[0]), int(image.shape[1])
        else:
            assert av_frame is not None
            self.width, self.height = int(av_frame.width), int(av_frame.height)
        self.gray = gray
        self.gray_full_range = gray_full_range

    @property
    def image_ready(self) -> bool:
        """Whether ``image`` is already converted (reading it then costs nothing)."""
        return self._image is not None

    @property
    def image(self) -> np.ndarray:
        image = self._image
        if image is not None:
            return image
        assert self._lock is not None
        with self._lock:
            if self._image is None:
                assert self._av is not None
                converted = self._av.to_ndarray(format="bgr24")
                converted.flags.writeable = False  # one array for every consumer: [1] nobody draws on it
                self._image = converted
                self._av = None  # the decoder's picture is no longer needed (gray, a view, keeps its plane)
            return self._image

    def __repr__(self) -> str:
        return f"Frame(seq={self.seq}, {self.width}x{self.height}, pts_s={self.pts_s}, mono_s={self.mono_s:.3f})"


def luma_view(frame: av.VideoFrame) -> tuple[np.ndarray, bool] | None:
    """The Y plane of a YUV picture as a read-only numpy view (no copy), and whether it is full range."""
    name = frame.format.name
    if not (name.startswith(("yuv", "nv")) or name == "gray"):
        return None
    plane = frame.planes[0]
    view = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)[
        :frame.height, :frame.width]
    view.flags.writeable = False
    return view, name.startswith("yuvj") or name == "gray" or getattr(frame, "color_range", 0) == 2


@dataclass(frozen=True, slots=True)
class StreamParams:
    """What a muxer needs to write a session's packets without decoding them."""

    codec: str  # FFmpeg codec name: "h264", "hevc", ...
    width: int
    height: int
    time_base: Fraction
    extradata: bytes  # the SDP's parameter sets (Annex B for RTSP H.264/H.265), may be empty
    fps: float | None
    session: int  # increments on every open; packets of different sessions do not mix in one clip


@dataclass(frozen=True, slots=True)
class EncodedPacket:
    data: bytes
    pts: int | None  # in time_base units
    dts: int | None
    keyframe: bool
    time_base: Fraction
    mono_s: float  # when it arrived (for the burst after an open: placed back by its pts)
    params: StreamParams

    @property
    def session(self) -> int:
        return self.params.session


@dataclass(slots=True)
class _Gop:
    packets: list[EncodedPacket]
    nbytes: int

    @property
    def start_mono(self) -> float:
        return self.packets[0].mono_s

    @property
    def session(self) -> int:
        return self.packets[0].session


class PacketBuffer:
    """Encoded packets of the last ``max_s`` seconds, whole GOPs, at most ``max_bytes`` (thread-safe).

    Kept so that a keyframe at or before ``newest - max_s`` is always there. Over the byte cap the oldest GOPs
    are dropped (``dropped_gops``); a single GOP larger than the cap is dropped whole, and packets up to the
    next keyframe with it (``skipped_no_keyframe``): a GOP without its keyframe cannot be decoded.
    """

    def __init__(self, max_s: float, max_bytes: int) -> None:
        if max_s <= 0 or max_bytes <= 0:
            raise ValueError("packet buffer: max_s and max_bytes must be positive")
        self.max_s = max_s
        self.max_bytes = max_bytes
        self._gops: deque[_Gop] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self.expired_gops = 0
        self.dropped_gops = 0
        self.dropped_bytes = 0
        self.skipped_no_keyframe = 0
        self._accepting = False  # the newest GOP is whole so far: a non-keyframe may extend it

    def add(self, packet: EncodedPacket) -> None:
        with self._lock:
            last = self._gops[-1] if self._gops else None
            if packet.keyframe:
                self._gops.append(_Gop([packet], len(packet.data)))
                self._accepting = True
            elif self._accepting and last is not None and last.session == packet.session:
                last.packets.append(packet)
                last.nbytes += len(packet.data)
            else:
                self.skipped_no_keyframe += 1
                return
            self._bytes += len(packet.data)
            self._trim(packet.mono_s)

    def _trim(self, newest_mono: float) -> None:
        while len(self._gops) >= 2 and self._gops[1].start_mono <= newest_mono - self.max_s:
            self._bytes -= self._gops.popleft().nbytes
            self.expired_gops += 1
        while self._bytes > self.max_bytes and self._gops:
            gop = self._gops.popleft()
            self._bytes -= gop.nbytes
            self.dropped_gops += 1
            self.dropped_bytes += gop.nbytes
            if not self._gops:
                self._accepting = False  # the current GOP went: later packets wait for the next keyframe

    def clear(self) -> None:
        with self._lock:
            self._gops.clear()
            self._bytes = 0
            self._accepting = False

    def since(self, start_mono: float, until_mono: float | None = None) -> list[EncodedPacket]:
        """Packets from the keyframe at or before ``start_mono`` (or the session's first keyframe, when its
        session began later) up to ``until_mono``, all of ONE session: the one holding the newest packet at
        or before ``until_mono`` (timestamps and parameters restart with every session)."""
        with self._lock:
            gops = [g for g in self._gops if until_mono is None or g.start_mono <= until_mono]
            if not gops:
                return []
            session = gops[-1].session
            same = [g for g in gops if g.session == session]
            first = 0
            for i, g in enumerate(same):
                if g.start_mono <= start_mono:
                    first = i
            out: list[EncodedPacket] = []
            for g in same[first:]:
                out.extend(p for p in g.packets if until_mono is None or p.mono_s <= until_mono)
            return out

    def newest_mono(self) -> float | None:
        with self._lock:
            return self._gops[-1].packets[-1].mono_s if self._gops else None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            span = (self._gops[-1].packets[-1].mono_s - self._gops[0].start_mono) if self._gops else 0.0
            return {"bytes": self._bytes, "gops": len(self._gops), "span_s": round(span, 2),
                    "packets": sum(len(g.packets) for g in self._gops), "dropped_gops": self.dropped_gops,
                    "dropped_bytes": self.dropped_bytes, "expired_gops": self.expired_gops,
                    "skipped_no_keyframe": self.skipped_no_keyframe}


@dataclass(eq=False, slots=True)
class _Consumer:
    queue: deque[Frame] = field(default_factory=deque)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: int = 0


class _SessionEnd(Exception):
    def __init__(self, reason: str, *, eof: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.eof = eof


class RtspSource:
    """One camera stream (policies in the module docstring). ``async with`` it; it is not re-entrant."""

    def __init__(self, url: str, *, name: str, open_timeout_s: float = 5.0, read_timeout_s: float = 3.0,
                 freeze_after_s: float = 3.0, queue_frames: int = 2, packet_buffer_s: float = 10.0,
                 packet_buffer_bytes: int = 8_000_000, decode: bool = True, decode_fps: float | None = None,
                 keyframes_only: bool = False, loop_file: bool = False, on_state: StateCallback | None = None,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0, stable_after_s: float = 30.0,
                 flush_max_s: float = 2.0, decoder_threads: int = 1, bgr_on_demand: bool = True,
                 options: Mapping[str, str] | None = None) -> None:
        if queue_frames < 1:
            raise ValueError("queue_frames must be at least 1")
        if min(open_timeout_s, read_timeout_s, freeze_after_s) <= 0:
            raise ValueError("timeouts must be positive")
        if decode_fps is not None and decode_fps <= 0:
            raise ValueError("decode_fps must be positive")
        self.url = url
        self.name = name
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = min(read_timeout_s, freeze_after_s)
        self.freeze_after_s = freeze_after_s
        self.queue_frames = queue_frames
        self.decode = decode
        self.decode_fps = decode_fps
        self.keyframes_only = keyframes_only
        self.loop_file = loop_file
        self.on_state = on_state
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stable_after_s = stable_after_s
        self.flush_max_s = flush_max_s
        self.decoder_threads = decoder_threads
        self.bgr_on_demand = bgr_on_demand
        # Called in the reader thread with each frame before it is queued (motion gating runs there, on the
        # luma plane, off the loop). Must be quick; an exception is logged once and counted.
        self.analyzers: list[Callable[[Frame], None]] = []
        self.analyzer_errors = 0
        self._idle = False  # set_idle(): decode only keyframes until something moves
        self.idle_spells = 0
        self.idle_skipped = 0  # packets not decoded while idle
        self.idle_caught_up = 0  # packets decoded after an idle spell to resume mid-GOP
        scheme = urlsplit(url).scheme.lower()
        self._is_rtsp = scheme in ("rtsp", "rtsps")
        self._options = {**(RTSP_OPTIONS if self._is_rtsp else {}), **(options or {})}
        self.packets = PacketBuffer(packet_buffer_s, packet_buffer_bytes)
        self.params: StreamParams | None = None

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._consumers: list[_Consumer] = []
        self._luma_taps: list[LumaTap] = []
        self._wake_pending = False
        self._latest: Frame | None = None
        self._online: bool | None = None
        self._closed = False
        self.error: str | None = None

        # Counters, written by the reader thread only (ints: a reader on the loop sees whole values).
        self._seq = 0
        self.decoded = 0
        self.delivered = 0
        self.skipped = 0
        self.dropped = 0
        self.stale_flushed = 0
        self.decode_errors = 0
        self.corrupt_frames = 0
        self.reconnects = 0
        self.freezes = 0
        self.sessions = 0
        self.open_s: float | None = None
        self._reconnect_times: deque[float] = deque()
        self._packet_times: deque[float] = deque(maxlen=64)
        self._last_frame_mono: float | None = None
        self._streaming_since: float | None = None  # the current session's start, for the backoff reset

    # --- life cycle ---------------------------------------------------------------------------------------

    async def __aenter__(self) -> RtspSource:
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: RtspSource is not re-entrant")
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"rtsp-{self.name}", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        self._stop.set()
        self._closed = True
        with self._lock:
            for c in self._consumers:
                c.event.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            # The reader checks the stop flag between packets; in the worst case it is inside an open or a
            # read and the library's own timeout ends that.
            limit = 2 * self.open_timeout_s + self.read_timeout_s + 2.0
            await asyncio.to_thread(thread.join, limit)
            if thread.is_alive():
                log.warning("%s: the RTSP reader did not stop within %.0f s", self.name, limit)

    # --- consumers -----------------------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        return bool(self._online)

    def latest(self) -> Frame | None:
        return self._latest

    async def frames(self, *, newest: bool = False) -> AsyncIterator[Frame]:
        """The frames as they come, for one consumer: its own queue of ``queue_frames``, oldest dropped when
        it lags. ``newest``: take only the newest queued frame, dropping (and counting) the older ones, for a
        consumer that must act on the present (the detection pipeline: under load the older of two queued
        frames is a tick older). Ends when the source closes."""
        if self._thread is None and not self._closed:
            raise RuntimeError(f"{self.name}: frames() needs the source started (async with)")
        consumer = _Consumer()
        with self._lock:
            self._consumers.append(consumer)
        try:
            while True:
                with self._lock:
                    if newest:
                        while len(consumer.queue) > 1:
                            consumer.queue.popleft()
                            consumer.dropped += 1
                            self.dropped += 1
                    frame = consumer.queue.popleft() if consumer.queue else None
                if frame is not None:
                    yield frame
                    continue
                if self._closed:
                    return
                consumer.event.clear()
                with self._lock:
                    if consumer.queue:
                        continue
                await consumer.event.wait()
        finally:
            with self._lock:
                self._consumers.remove(consumer)

    def luma_tap(self, region: Callable[[int, int], Region], *, max_frames: int = 25) -> LumaTap:
        """A full-rate grey consumer (:mod:`edgeagent.drivers.camera.luma`); register it before ``async with``."""
        tap = LumaTap(region, max_frames=max_frames, name=self.name)
        with self._lock:
            self._luma_taps.append(tap)
        return tap

    def remove_luma_tap(self, tap: LumaTap) -> None:
        with self._lock:
            if tap in self._luma_taps:
                self._luma_taps.remove(tap)
        tap.close()

    def set_idle(self, idle: bool) -> None:
        """Idle: decode only keyframes (one picture per GOP) until called with False, for a consumer whose scene
        is quiet (the detection pipeline). Leaving it mid-GOP decodes the GOP's packets so far at once, so the
        next frame handed out is the current one. Ignored while a luma tap needs every frame; clips are not
        affected (packets are always buffered)."""
        self._idle = idle

    def packets_since(self, mono_s: float, until_mono_s: float | None = None) -> list[EncodedPacket]:
        """Encoded packets for a clip, from the keyframe at or before ``mono_s`` (see ``PacketBuffer.since``)."""
        return self.packets.since(mono_s, until_mono_s)

    def newest_packet_mono(self) -> float | None:
        return self.packets.newest_mono()

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        times = [t for t in list(self._packet_times) if now - t <= FPS_WINDOW_S]
        fps_in = (len(times) - 1) / (times[-1] - times[0]) if len(times) >= 2 and times[-1] > times[0] else 0.0
        hour = [t for t in list(self._reconnect_times) if now - t <= HOUR_S]
        with self._lock:
            depth = max((len(c.queue) for c in self._consumers), default=0)
            consumers = len(self._consumers)
        last = self._last_frame_mono
        return {
            "url": redact_url(self.url), "online": self._online, "error": self.error,
            "fps_in": round(fps_in, 2), "decoded": self.decoded, "delivered": self.delivered,
            "skipped": self.skipped, "dropped": self.dropped, "stale_flushed": self.stale_flushed,
            "decode_errors": self.decode_errors, "corrupt_frames": self.corrupt_frames,
            "analyzer_errors": self.analyzer_errors, "idle": self._idle, "idle_spells": self.idle_spells,
            "idle_skipped": self.idle_skipped, "idle_caught_up": self.idle_caught_up,
            "reconnects": self.reconnects,
            "reconnects_last_hour": len(hour), "freezes": self.freezes, "sessions": self.sessions,
            "open_s": None if self.open_s is None else round(self.open_s, 3),
            "last_frame_age_s": None if last is None else round(now - last, 3),
            "queue_depth": depth, "consumers": consumers, "packet_buffer": self.packets.stats(),
            "luma_taps": [t.stats() for t in list(self._luma_taps)],
        }

    # --- loop-side state -----------------------------------------------------------------------------------

    def _call_on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            loop.call_soon_threadsafe(fn, *args)

    def _set_state(self, online: bool, reason: str) -> None:
        if self._closed:
            return
        self.error = None if online else reason
        if self._online is online:
            return
        first = self._online is None
        self._online = online
        if online:
            log.info("%s: stream online (%s) %s", self.name, reason, redact_url(self.url))
        elif first:
            log.warning("%s: stream not available: %s (%s)", self.name, reason, redact_url(self.url))
        else:
            log.warning("%s: stream offline: %s (%s)", self.name, reason, redact_url(self.url))
        if self.on_state is not None:
            try:
                self.on_state(online, reason)
            except Exception:
                log.exception("%s: the stream state callback failed", self.name)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
            for c in self._consumers:
                c.event.set()

    def _publish(self, frame: Frame) -> None:
        with self._lock:
            self._latest = frame
            for c in self._consumers:
                if len(c.queue) >= self.queue_frames:
                    c.queue.popleft()
                    c.dropped += 1
                    self.dropped += 1
                c.queue.append(frame)
            wake = bool(self._consumers) and not self._wake_pending
            if wake:
                self._wake_pending = True
        if wake:
            self._call_on_loop(self._wake)

    # --- the reader thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        first = True
        replay = False
        while not self._stop.is_set():
            if not first and not replay:
                self.reconnects += 1
                now = time.monotonic()
                self._reconnect_times.append(now)
                while self._reconnect_times and now - self._reconnect_times[0] > HOUR_S:
                    self._reconnect_times.popleft()
            first = False
            replay = False
            self._streaming_since = None
            try:
                self._session()
            except _SessionEnd as end:
                since = self._streaming_since
                if end.eof and self.loop_file and since is not None and time.monotonic() - since >= 0.5:
                    # A recording played to its end: start it again at once, no reconnect. (One that ends
                    # at once, empty or unreadable, goes through the backoff like any failure.)
                    replay = True
                    continue
                if not self._stop.is_set():  # an open cut short by close() is not news
                    self._call_on_loop(self._set_state, False, end.reason)
                log.debug("%s: session ended: %s", self.name, end.reason)
            except Exception as exc:  # the reader must survive anything: report and reconnect
                reason = f"internal error: {type(exc).__name__}"
                log.exception("%s: RTSP reader error", self.name)
                if not self._stop.is_set():
                    self._call_on_loop(self._set_state, False, reason)
            if self._stop.is_set():
                break
            since = self._streaming_since
            if since is not None and time.monotonic() - since >= self.stable_after_s:
                attempt = 0
            delay = backoff_s(attempt, self.backoff_initial_s, self.backoff_max_s)
            attempt += 1
            self._stop.wait(delay)

    def _describe(self, exc: BaseException, phase: str, timeout_s: float) -> str:
        # Never str(exc): FFmpeg's messages carry the URL, password included.
        if isinstance(exc, av.error.ExitError):
            return f"{phase} timed out after {timeout_s:g} s"
        if isinstance(exc, av.error.HTTPUnauthorizedError):
            return f"{phase} refused: 401 Unauthorized (wrong username or password)"
        if isinstance(exc, av.error.HTTPForbiddenError):
            return f"{phase} refused: 403 Forbidden"
        if isinstance(exc, av.error.HTTPNotFoundError):
            return f"{phase} failed: 404 Not Found (no stream at this path)"
        if isinstance(exc, av.error.ConnectionRefusedError):
            return f"connection refused: nothing listens on {_endpoint(self.url)}"
        if isinstance(exc, av.error.FFmpegError | OSError):
            return f"{phase} failed: {exc.strerror or type(exc).__name__}"
        return f"{phase} failed: {type(exc).__name__}"

    def _open(self) -> av.container.InputContainer:
        target = self.url
        if not self._is_rtsp and target.startswith("file:"):
            target = urlsplit(target).path
        started = time.monotonic()
        try:
            return av.open(target, options=dict(self._options),
                           timeout=(self.open_timeout_s, self.read_timeout_s))
        except (av.error.FFmpegError, OSError) as exc:
            # A server that accepts the connection and never answers makes FFmpeg give up with "invalid
            # data" once the timeout interrupts it: by the clock, that is no answer, not bad data.
            if (self._is_rtsp and isinstance(exc, av.error.InvalidDataError)
                    and time.monotonic() - started >= 0.9 * self.open_timeout_s):
                raise _SessionEnd(f"open timed out after {self.open_timeout_s:g} s: {_endpoint(self.url)} accepted "
                                  "the connection but did not answer") from exc
            raise _SessionEnd(self._describe(exc, "open", self.open_timeout_s)) from exc

    def _session(self) -> None:
        """One session: open, then stream until something ends it (always by raising _SessionEnd)."""
        t0 = time.monotonic()
        container = self._open()
        try:
            self._stream(container, t0)
        finally:
            with contextlib.suppress(Exception):  # a dead server cannot spoil the close
                container.close()

    def _stream(self, container: av.container.InputContainer, t_open: float) -> None:
        if not container.streams.video:
            raise _SessionEnd("no video stream in this URL")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        ctx.thread_count = self.decoder_threads
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        if self.keyframes_only:
            ctx.skip_frame = "NONKEY"
        elif self.decode_fps is not None and (fps is None or self.decode_fps < fps) and not self._luma_taps:
            ctx.skip_frame = "NONREF"
        self.sessions += 1
        time_base = stream.time_base or Fraction(1, 90000)
        params = StreamParams(codec=ctx.name, width=ctx.width, height=ctx.height, time_base=time_base,
                              extradata=bytes(ctx.extradata or b""), fps=fps, session=self.sessions)
        self.params = params
        self.open_s = time.monotonic() - t_open
        log.debug("%s: opened in %.2f s: %s %dx%d", self.name, self.open_s, params.codec, params.width,
                  params.height)

        tb = float(time_base)
        live = not self._is_rtsp  # files need no flush: they are paced instead
        flush_until = time.monotonic() + self.flush_max_s
        held: list[tuple[bytes, int | None, int | None, bool]] = []  # burst packets, stamped once live
        announced = False
        last_progress = time.monotonic()
        last_emit_pts: float | None = None
        size_seen: tuple[int, int] | None = None
        odd_sizes = 0
        frame_dt = 1.0 / fps if fps else 0.1
        undecodable_after_s = self.freeze_after_s if not self.keyframes_only else max(self.freeze_after_s, 10.0)
        pace_anchor: tuple[float, float] | None = None  # (mono, pts_s) for files
        session_errors = 0
        gop: list[av.Packet[Any]] | None = None
        idling = False

        self._streaming_since = time.monotonic()
        demux = container.demux(stream)
        while not self._stop.is_set():
            t_read = time.monotonic()
            try:
                packet = next(demux)
            except StopIteration:
                raise _SessionEnd("the stream ended (the server closed it)", eof=True) from None
            except (av.error.FFmpegError, OSError) as exc:
                if isinstance(exc, av.error.ExitError):
                    self.freezes += 1
                    raise _SessionEnd(f"frozen: no data for {time.monotonic() - last_progress:.1f} s") from exc
                raise _SessionEnd(self._describe(exc, "read", self.read_timeout_s)) from exc
            if packet.size == 0:
                continue
            if not self._is_rtsp and packet.pts is not None:
                pace_anchor = self._pace(packet.pts * tb, pace_anchor)
            now = time.monotonic()
            waited = now - t_read
            if self._is_rtsp and waited >= self.read_timeout_s - 0.05:
                # The interrupted read handed out the frame RTP was holding back: the camera went silent.
                self.freezes += 1
                raise _SessionEnd(f"frozen: no data for {waited:.1f} s")
            self._packet_times.append(now)
            pts, dts = packet.pts, packet.dts
            data = bytes(packet)

            if not live and (waited >= LIVE_EDGE_WAIT_S or now >= flush_until):
                live = True
                anchor_pts = pts
                for h_data, h_pts, h_dts, h_key in held:
                    # Burst packets arrived together: place them back in time by their timestamps.
                    back = (anchor_pts - h_pts) * tb if anchor_pts is not None and h_pts is not None else 0.0
                    self.packets.add(EncodedPacket(h_data, h_pts, h_dts, h_key, time_base,
                                                   now - max(0.0, back), params))
                held.clear()
            if live:
                self.packets.add(EncodedPacket(data, pts, dts, packet.is_keyframe, time_base, now, params))
            else:
                held.append((data, pts, dts, packet.is_keyframe))

            if not self.decode:
                last_progress = now
                self._last_frame_mono = now
                if not announced:
                    announced = True
                    self._call_on_loop(self._set_state, True, f"streaming, opened in {self.open_s:.2f} s")
                continue

            # The current GOP's packets, to catch up when an idle spell ends mid-GOP (bounded: a stream with
            # a very long GOP waits for its next keyframe instead).
            if packet.is_keyframe:
                gop = [packet]
            elif gop is not None and len(gop) < GOP_KEEP_MAX:
                gop.append(packet)
            else:
                gop = None
            idle = self._idle and not self.keyframes_only and not self._luma_taps
            to_decode: list[av.Packet[Any]] = []
            if self.keyframes_only or idle:
                if idle and not idling:
                    idling = True
                    self.idle_spells += 1
                if packet.is_keyframe:
                    to_decode = [packet]
                elif idle:
                    self.idle_skipped += 1
            elif idling and not packet.is_keyframe:
                # Back from an idle spell mid-GOP: decode the packets since its keyframe (the decoder holds
                # that keyframe) so that this packet decodes now, not at the next keyframe.
                if gop is None:
                    self.idle_skipped += 1  # the GOP was too long to keep: wait for the next keyframe
                else:
                    idling = False
                    self.idle_caught_up += len(gop) - 2
                    to_decode = gop[1:]
            else:
                idling = False
                to_decode = [packet]
            frames: list[av.VideoFrame] = []
            for k, pkt in enumerate(to_decode):
                try:
                    out_frames = ctx.decode(pkt)
                except av.error.FFmpegError as exc:
                    self.decode_errors += 1
                    session_errors += 1
                    level = logging.WARNING if session_errors == 1 else logging.DEBUG
                    log.log(level, "%s: decoder error (%s), packet skipped (%d this session)", self.name,
                            exc.strerror or type(exc).__name__, session_errors)
                    continue
                if k < len(to_decode) - 1:  # catching up: decoded for the reference, not handed out
                    self.decoded += len(out_frames)
                    self.skipped += len(out_frames)
                    continue
                frames = out_frames
            for frame in frames:
                self.decoded += 1
                if frame.is_corrupt:  # damage the decoder concealed: still a usable picture, counted
                    self.corrupt_frames += 1
                # A damaged parameter set can yield a picture of another size: consumers (motion, tracks,
                # zones) rely on one size per session, so such frames are dropped and counted; a size that
                # persists is a real change (the camera was reconfigured): the session reopens on it.
                size = (frame.width, frame.height)
                if size_seen is None:
                    size_seen = size
                elif size != size_seen:
                    self.corrupt_frames += 1
                    odd_sizes += 1
                    if odd_sizes >= SIZE_CHANGE_AFTER:
                        raise _SessionEnd(f"picture size changed from {size_seen[0]}x{size_seen[1]} to "
                                          f"{size[0]}x{size[1]}: reopening")
                    continue
                else:
                    odd_sizes = 0
                self._seq += 1
                last_progress = now
                self._last_frame_mono = now
                if not live:
                    self.stale_flushed += 1
                    continue
                pts_s = float(frame.pts * tb) if frame.pts is not None else None
                if self._luma_taps:
                    self._feed_taps(frame, pts_s)
                if self.decode_fps is not None:
                    t = pts_s if pts_s is not None else now
                    if last_emit_pts is not None and t >= last_emit_pts and \
                            t - last_emit_pts < 1.0 / self.decode_fps - 0.5 * frame_dt:
                        self.skipped += 1
                        continue
                    last_emit_pts = t
                luma = luma_view(frame)
                gray, full_range = luma if luma is not None else (None, True)
                if self.bgr_on_demand:
                    out = Frame(seq=self._seq, pts_s=pts_s, mono_s=time.monotonic(), av_frame=frame, gray=gray,
                                gray_full_range=full_range)
                else:
                    image = frame.to_ndarray(format="bgr24")
                    image.flags.writeable = False  # one array for every consumer: [1] nobody draws on it
                    out = Frame(image, self._seq, pts_s, time.monotonic(), gray=gray, gray_full_range=full_range)
                self.delivered += 1
                for analyze in list(self.analyzers):
                    try:
                        analyze(out)
                    except Exception:
                        self.analyzer_errors += 1
                        if self.analyzer_errors == 1:
                            log.exception("%s: a frame analyzer failed", self.name)
                self._publish(out)
                if not announced:
                    announced = True
                    self._call_on_loop(self._set_state, True, f"streaming, opened in {self.open_s:.2f} s")
            if now - last_progress > (undecodable_after_s if not idling else max(self.freeze_after_s, 10.0)):
                self.freezes += 1
                raise _SessionEnd(f"frozen: packets but no decodable frame for {now - last_progress:.1f} s")

    def _feed_taps(self, frame: av.VideoFrame, pts_s: float | None) -> None:
        with self._lock:
            taps = list(self._luma_taps)
        for tap in taps:
            tap.feed(frame, self._seq, pts_s)

    def _pace(self, pts_s: float, anchor: tuple[float, float] | None) -> tuple[float, float]:
        """Sleep until a file's packet is due in real time; re-anchor on a jump (a loop, a gap)."""
        now = time.monotonic()
        if anchor is None:
            return (now, pts_s)
        due = anchor[0] + (pts_s - anchor[1])
        if due < now - 1.0 or due > now + 5.0:
            return (now, pts_s)
        if due > now:
            self._stop.wait(due - now)
        return anchor
