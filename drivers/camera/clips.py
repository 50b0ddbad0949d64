"""Evidence clips from a camera's pre-event packet buffer: MP4 files remuxed without re-encoding.

Policies:

* **No re-encoding.** The camera's encoded packets go into the file as they came (no decoder, no encoder: a
  10 s clip takes milliseconds of CPU). H.264/H.265 from RTSP is Annex B; MP4 stores the same NAL units
  length-prefixed, which the muxer does: every NAL unit in the file is byte-identical to the camera's.
* **From a keyframe.** A clip starts at the keyframe at or before ``event - pre_s`` (packets before it are
  dropped: they cannot be decoded). When that keyframe does not carry its parameter sets in-band (SPS/PPS,
  and VPS for H.265) the session's parameter sets from the SDP are put in front of it, the only bytes a clip
  adds; the muxer takes its ``avcC``/``hvcC`` from them.
* **One session.** Packets after a reconnect have restarted timestamps and maybe other parameters: a clip
  stops at the first packet of another session (``PacketBuffer.since`` already picks one session).
* **Timestamps** are rebased to start at 0; a missing pts (FFmpeg's RTSP demuxer leaves the first one empty)
  is filled from its neighbours at the stream's frame interval; dts is kept strictly increasing.
* **Bounded.** At most ``max_bytes`` of packet data per clip; past it the clip ends early (``truncated``).
* **Atomic.** Written under a temporary name in the target directory, fsynced, renamed: a reader never sees
  half a clip, a crash leaves at most a temporary file.
* **MP4 rather than MPEG-TS**: phones and browsers (the platform shows clips) play and seek MP4; ``faststart``
  puts the index first so playback starts before the download ends. TS's advantage, surviving a crash in
  mid-write, does not matter for a short clip written whole and renamed.

:class:`ClipRecorder` takes an event time, waits until the buffer holds the post-event window (or a grace
period passed: a camera that went offline gives a shorter clip), then writes in a worker thread, never on the
loop; at most ``max_pending`` clips are in progress per recorder, more are refused (:class:`ClipBusy`,
counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import av
import av.error

from edgeagent.drivers.camera.rtsp import EncodedPacket, StreamParams

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 50_000_000


class ClipError(Exception):
    """No clip could be written: no packets, no keyframe, or the muxer failed (the message says which)."""


class ClipBusy(ClipError):
    """Too many clips in progress for this camera; this one was refused (counted)."""


@dataclass(frozen=True, slots=True)
class ClipInfo:
    path: Path
    sha256: str
    bytes: int
    frames: int
    duration_s: float
    start_mono_s: float  # arrival time of the first packet (the keyframe)
    end_mono_s: float
    codec: str
    truncated: bool  # ended early at max_bytes


def _start_code_nals(data: bytes) -> list[bytes]:
    """NAL units of an Annex B buffer (start codes and trailing zero bytes removed)."""
    out: list[bytes] = []
    i, n = 0, len(data)
    starts: list[int] = []
    while i + 3 <= n:
        if data[i] == 0 and data[i + 1] == 0 and data[i + 2] == 1:
            starts.append(i + 3)
            i += 3
        else:
            i += 1
    for k, s in enumerate(starts):
        end = starts[k + 1] - 3 if k + 1 < len(starts) else n
        out.append(data[s:end].rstrip(b"\x00"))
    return [nal for nal in out if nal]


def _is_annexb(data: bytes) -> bool:
    return data.startswith((b"\x00\x00\x01", b"\x00\x00\x00\x01"))


def _has_parameter_sets(codec: str, data: bytes) -> bool:
    for nal in _start_code_nals(data):
        if codec == "h264" and nal[0] & 0x1F == 7:  # SPS
            return True
        if codec == "hevc" and (nal[0] >> 1) & 0x3F in (32, 33):  # VPS, SPS
            return True
    return False


def _frame_interval(pts: Sequence[int | None], params: StreamParams) -> int:
    """The typical pts step, from the packets themselves, else the stream's frame rate."""
    known = [p for p in pts if p is not None]
    steps = [b - a for a, b in itertools.pairwise(known) if b > a]
    if steps:
        return max(1, round(statistics.median(steps)))
    fps = params.fps or 10.0
    return max(1, round(1 / (fps * params.time_base)))


def _fill_pts(pts: list[int | None], step: int) -> list[int]:
    first = next((i for i, p in enumerate(pts) if p is not None), None)
    if first is None:
        return [i * step for i in range(len(pts))]
    out: list[int] = [0] * len(pts)
    anchor = pts[first]
    assert anchor is not None  # found just above
    for i in range(first, -1, -1):
        out[i] = anchor - (first - i) * step
    for i in range(first + 1, len(pts)):
        p = pts[i]
        out[i] = p if p is not None else out[i - 1] + step
    return out


def write_clip(packets: Sequence[EncodedPacket], path: Path, *, params: StreamParams | None = None,
               max_bytes: int = DEFAULT_MAX_BYTES) -> ClipInfo:
    """Remux ``packets`` (from a keyframe, one session) into an MP4 at ``path`` without re-encoding.

    Blocking (file I/O): call it from a worker thread. Raises :class:`ClipError`.
    """
    start = next((i for i, p in enumerate(packets) if p.keyframe), None)
    if start is None:
        raise ClipError(f"no keyframe among {len(packets)} packets: nothing decodable to write")
    params = params or packets[start].params
    chosen: list[EncodedPacket] = []
    total = 0
    truncated = False
    for p in packets[start:]:
        if p.params.session != params.session:
            break
        if chosen and total + len(p.data) > max_bytes:
            truncated = True
            break
        chosen.append(p)
        total += len(p.data)

    step = _frame_interval([p.pts for p in chosen], params)
    pts = _fill_pts([p.pts for p in chosen], step)
    dts_in = [p.dts if p.dts is not None else pts[i] for i, p in enumerate(chosen)]
    dts: list[int] = []
    for d in dts_in:
        dts.append(d if not dts or d > dts[-1] else dts[-1] + 1)
    base = min(pts[0], dts[0])

    first_data = chosen[0].data
    if params.codec in ("h264", "hevc") and _is_annexb(params.extradata) and _is_annexb(first_data) \
            and not _has_parameter_sets(params.codec, first_data):
        first_data = params.extradata + first_data

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out:
            rate = Fraction(params.fps).limit_denominator(1001) if params.fps else None
            stream = out.add_mux_stream(params.codec, rate=rate, width=params.width, height=params.height)
            stream.time_base = params.time_base
            for i, p in enumerate(chosen):
                packet = av.Packet(first_data if i == 0 else p.data)
                packet.pts = pts[i] - base
                packet.dts = dts[i] - base
                packet.duration = (pts[i + 1] - pts[i]) if i + 1 < len(chosen) and pts[i + 1] > pts[i] else step
                packet.time_base = params.time_base
                packet.is_keyframe = p.keyframe
                packet.stream = stream
                out.mux(packet)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        tmp.replace(path)
    except (av.error.FFmpegError, ValueError) as exc:
        # The library's message names the temporary path only; no secret can be in it.
        raise ClipError(f"{path.name}: the muxer refused the packets: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)
    duration = (max(pts) - min(pts) + step) * float(params.time_base)
    return ClipInfo(path=path, sha256=digest, bytes=path.stat().st_size, frames=len(chosen),
                    duration_s=duration, start_mono_s=chosen[0].mono_s, end_mono_s=chosen[-1].mono_s,
                    codec=params.codec, truncated=truncated)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class PacketSource(Protocol):
    def packets_since(self, mono_s: float, until_mono_s: float | None = None) -> list[EncodedPacket]: ...

    def newest_packet_mono(self) -> float | None: ...


class ClipRecorder:
    """Clips around events for one camera (policies in the module docstring)."""

    def __init__(self, source: PacketSource, *, pre_s: float = 5.0, post_s: float = 5.0,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_pending: int = 4, grace_s: float = 3.0,
                 poll_s: float = 0.1) -> None:
        if pre_s < 0 or post_s < 0:
            raise ValueError("pre_s and post_s must not be negative")
        self.source = source
        self.pre_s = pre_s
        self.post_s = post_s
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.pending = 0
        self.written = 0
        self.refused = 0
        self.failed = 0
        self.truncated = 0

    async def record(self, event_mono_s: float, path: Path) -> ClipInfo:
        """Wait for the post-event window, then write the clip ``[event - pre_s, event + post_s]`` to ``path``
        off the loop. Raises ClipBusy at once when ``max_pending`` clips are in progress, ClipError when no
        clip can be made."""
        if self.pending >= self.max_pending:
            self.refused += 1
            raise ClipBusy(f"{self.pending} clips in progress; this one is refused")
        self.pending += 1
        try:
            end = event_mono_s + self.post_s
            deadline = end + self.grace_s
            while True:
                newest = self.source.newest_packet_mono()
                now = time.monotonic()
                if (newest is not None and newest >= end) or now >= deadline:
                    break
                # The buffer fills at the camera's frame rate: check again after the window should be in,
                # then every poll_s within the grace period.
                await asyncio.sleep(max(self.poll_s, end - now))
            packets = self.source.packets_since(event_mono_s - self.pre_s, end)
            if not packets:
                self.failed += 1
                raise ClipError("no buffered video around the event (camera offline?)")
            try:
                info = await asyncio.to_thread(write_clip, packets, path, max_bytes=self.max_bytes)
            except ClipError:
                self.failed += 1
                raise
            self.written += 1
            self.truncated += int(info.truncated)
            return info
        finally:
            self.pending -= 1

    def stats(self) -> dict[str, Any]:
        return {"pending": self.pending, "written": self.written, "refused": self.refused,
                "failed": self.failed, "truncated": self.truncated}
