"""Which library decodes the cameras' RTSP streams: OpenCV's FFmpeg backend or PyAV, by measurement.

Run from the repository root (about 2 minutes; needs ffmpeg and Debian's gst-rtsp-server, see
tests/rtsp_peer.py)::

    .venv/bin/python bench/decode.py
    .venv/bin/python bench/decode.py --seconds 5 --skip-freeze     # a quick look
    .venv/bin/python bench/decode.py --opencv-defaults             # also OpenCV without timeouts (~90 s)

Both libraries read the same loopback RTSP stream (the campus clip as H.264 768x576, 10 fps, GOP 10,
served by gst-rtsp-server over TCP) and are measured on:

1. **open time**: from the call to the first decoded frame, and how many frames arrive in a burst right after
   (stale frames buffered during the open);
2. **CPU per decoded frame**: process CPU time (all threads) over a window of live streaming divided by
   frames; for OpenCV ``read()`` (decode + BGR conversion), for PyAV decode + ``to_ndarray('bgr24')`` and
   decode alone (what a source pays for frames it does not hand out), single-threaded and with the
   library's default threading; plus the same from the file at full speed (pure decode cost, no network);
3. **encoded packets**: whether the library gives the encoded packets (for clips without re-encoding) from the
   same session that decodes;
4. **freeze**: the feeder is stopped (SIGSTOP) while the connection stays open; time until the library
   reports it, with a 3 s read timeout configured (and, with ``--opencv-defaults``, OpenCV's defaults);
5. **GIL**: asyncio loop lag (a 5 ms ticker's lateness, p50/p99/max) while 4 streams decode in threads.

Ends with one ``RESULT ...`` line; the choice and its reasons are written into drivers/camera/rtsp.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Must be set before cv2 opens anything: setting it at all drops OpenCV's TCP default (field notes).
os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "rtsp_transport;tcp|analyzeduration;200000|probesize;100000"

import av  # noqa: E402
import cv2  # noqa: E402

from edgeagent.drivers.camera.rtsp import RtspSource  # noqa: E402
from tests.rtsp_peer import RtspServer, busy_clip  # noqa: E402

PYAV_OPTIONS = {"rtsp_transport": "tcp", "analyzeduration": "200000", "probesize": "100000"}
READ_TIMEOUT_S = 3.0
OPEN_TIMEOUT_S = 5.0


def cpu() -> float:
    return time.process_time()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# --- readers: each returns a callable that yields one frame per call (None at the end) -------------------

class OpenCvReader:
    def __init__(self, url: str, *, threads: int | None = None, timeouts: bool = True) -> None:
        params: list[int] = []
        if timeouts:
            params += [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(OPEN_TIMEOUT_S * 1000),
                       cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(READ_TIMEOUT_S * 1000)]
        if threads is not None:
            params += [cv2.CAP_PROP_N_THREADS, threads]
        self.cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
        if not self.cap.isOpened():
            raise RuntimeError(f"OpenCV cannot open {url}")

    def read(self) -> bool:
        ok, _img = self.cap.read()
        return bool(ok)

    def close(self) -> None:
        self.cap.release()


class PyAvReader:
    def __init__(self, url: str, *, threads: int | None = 1, convert: bool = True) -> None:
        self.c = av.open(url, options=PYAV_OPTIONS if url.startswith("rtsp") else {},
                         timeout=(OPEN_TIMEOUT_S, READ_TIMEOUT_S))
        self.s = self.c.streams.video[0]
        if threads is not None:
            self.s.codec_context.thread_count = threads
        self.convert = convert
        self.packets = 0
        self._demux = self.c.demux(self.s)
        self._pending: list[av.VideoFrame] = []

    def read(self) -> bool:
        while not self._pending:
            try:
                packet = next(self._demux)
            except StopIteration:
                return False
            self.packets += 1
            self._pending = list(packet.decode())
        frame = self._pending.pop(0)
        if self.convert:
            frame.to_ndarray(format="bgr24")
        return True

    def close(self) -> None:
        self.c.close()


Factory = Callable[[str], Any]


@dataclass
class OpenFigures:
    open_s: list[float] = field(default_factory=list)
    burst: list[int] = field(default_factory=list)


def measure_open(factory: Factory, url: str, tries: int) -> OpenFigures:
    """Open time to the first frame, and frames that then come in a burst (less than 20 ms apart)."""
    out = OpenFigures()
    for _ in range(tries):
        t0 = time.monotonic()
        r = factory(url)
        try:
            r.read()
            out.open_s.append(time.monotonic() - t0)
            burst = 0
            while True:
                t = time.monotonic()
                if not r.read():
                    break
                if time.monotonic() - t > 0.02:
                    break
                burst += 1
            out.burst.append(burst)
        finally:
            r.close()
    return out


def measure_cpu(factory: Factory, url: str, seconds: float) -> float:
    """CPU ms per frame over ``seconds`` of live streaming, after a 1 s warm-up (the open burst excluded)."""
    r = factory(url)
    try:
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:
            r.read()
        c0, n = cpu(), 0
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            if not r.read():
                break
            n += 1
        return (cpu() - c0) * 1000 / max(1, n)
    finally:
        r.close()


def measure_file(factory: Factory, path: Path, frames: int) -> float:
    r = factory(str(path))
    try:
        c0, n = cpu(), 0
        while n < frames and r.read():
            n += 1
        return (cpu() - c0) * 1000 / max(1, n)
    finally:
        r.close()


def measure_freeze(factory: Factory, server: RtspServer, limit_s: float) -> float:
    """Seconds from SIGSTOP of the feeder until the library reports an error or end of stream."""
    r = factory(server.url)
    result: list[float] = []
    try:
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:
            r.read()
        stopped = time.monotonic()
        server.freeze()

        def wait() -> None:
            try:
                while r.read() and time.monotonic() - stopped < limit_s:
                    pass
            except Exception:  # the library's way of saying the read timed out
                pass
            result.append(time.monotonic() - stopped)

        t = threading.Thread(target=wait, name="bench-freeze")
        t.start()
        t.join(limit_s + 5)
        return result[0] if result else float("inf")
    finally:
        server.resume()
        r.close()


async def loop_lag(factory: Factory, urls: list[str], seconds: float) -> tuple[float, float, float, int]:
    """A 5 ms ticker's lateness (ms) while len(urls) streams decode in threads; also frames decoded."""
    stop = threading.Event()
    counts = [0] * len(urls)

    def decode(i: int, url: str) -> None:
        r = factory(url)
        try:
            while not stop.is_set() and r.read():
                counts[i] += 1
        finally:
            r.close()

    threads = [threading.Thread(target=decode, args=(i, u), name=f"bench-dec{i}") for i, u in enumerate(urls)]
    for t in threads:
        t.start()
    await asyncio.sleep(1.5)  # past the opens
    lags: list[float] = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        t = time.monotonic()
        await asyncio.sleep(0.005)
        lags.append((time.monotonic() - t - 0.005) * 1000)
    stop.set()
    for t in threads:
        await asyncio.to_thread(t.join)
    return statistics.median(lags), pct(lags, 0.99), max(lags), sum(counts)


async def sources_lag(urls: list[str], seconds: float, decode_fps: float | None) -> dict[str, float]:
    """The product's RtspSource on each URL, one consumer each: loop lag, CPU per delivered frame."""
    async with contextlib.AsyncExitStack() as stack:
        sources = [await stack.enter_async_context(RtspSource(u, name=f"b{i}", decode_fps=decode_fps))
                   for i, u in enumerate(urls)]
        delivered = [0] * len(sources)

        async def consume(i: int, src: RtspSource) -> None:
            async for _ in src.frames():
                delivered[i] += 1

        tasks = [asyncio.create_task(consume(i, s)) for i, s in enumerate(sources)]
        while not all(s.online for s in sources):
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        c0, d0 = cpu(), [s.decoded for s in sources]
        n0 = sum(delivered)
        lags: list[float] = []
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            t = time.monotonic()
            await asyncio.sleep(0.005)
            lags.append((time.monotonic() - t - 0.005) * 1000)
        used = cpu() - c0
        decoded = sum(s.decoded for s in sources) - sum(d0)
        n = sum(delivered) - n0
        for t in tasks:
            t.cancel()
    return {"lag_p50": statistics.median(lags), "lag_p99": pct(lags, 0.99), "lag_max": max(lags),
            "cpu_ms_per_decoded": used * 1000 / max(1, decoded), "delivered": n, "decoded": decoded}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="live window per CPU measurement")
    ap.add_argument("--opens", type=int, default=3, help="opens per library for the open time")
    ap.add_argument("--skip-freeze", action="store_true")
    ap.add_argument("--opencv-defaults", action="store_true", help="also freeze OpenCV without timeouts")
    args = ap.parse_args()

    clip = busy_clip()
    print(f"clip {clip.name}; OpenCV {cv2.__version__}, PyAV {av.__version__} "
          f"(FFmpeg {av.library_versions['libavcodec']}); {os.cpu_count()} CPUs; "
          f"load {os.getloadavg()[0]:.2f}")

    readers: dict[str, Factory] = {
        "opencv": OpenCvReader,
        "opencv-1thread": lambda u: OpenCvReader(u, threads=1),
        "pyav-1thread-bgr": lambda u: PyAvReader(u, threads=1),
        "pyav-1thread-decode-only": lambda u: PyAvReader(u, threads=1, convert=False),
        "pyav-default-threads-bgr": lambda u: PyAvReader(u, threads=None),
    }
    figures: dict[str, Any] = {}
    with RtspServer(clip, mounts=4) as server:
        print("\n== open time (call → first frame) and frames bursting in right after the open")
        for name in ("opencv", "pyav-1thread-bgr"):
            o = measure_open(readers[name], server.url, args.opens)
            figures[f"{name}.open_s"] = statistics.median(o.open_s)
            figures[f"{name}.burst"] = statistics.median(o.burst)
            print(f"{name:28s} open {statistics.median(o.open_s) * 1000:7.0f} ms (runs: "
                  f"{', '.join(f'{x * 1000:.0f}' for x in o.open_s)})  burst {o.burst} frames")

        print(f"\n== CPU per decoded frame, live RTSP, {args.seconds:g} s window (10 fps)")
        for name, factory in readers.items():
            ms = measure_cpu(factory, server.url, args.seconds)
            figures[f"{name}.cpu_ms"] = ms
            print(f"{name:28s} {ms:6.2f} ms CPU/frame ({ms * 10 / 10:.1f}% of a core per 10 fps camera)")

        print("\n== CPU per decoded frame, the TS file at full speed (no network, no pacing)")
        for name in ("opencv-1thread", "pyav-1thread-bgr", "pyav-1thread-decode-only"):
            ms = measure_file(readers[name], clip, 400)
            figures[f"{name}.file_ms"] = ms
            print(f"{name:28s} {ms:6.2f} ms CPU/frame")

        print("\n== encoded packets from the decoding session")
        raw = cv2.VideoCapture(server.url, cv2.CAP_FFMPEG, [cv2.CAP_PROP_FORMAT, -1])
        ok, pkt = raw.read()
        raw.release()
        print(f"opencv: raw mode (CAP_PROP_FORMAT=-1) gives packets ({ok}, {0 if pkt is None else pkt.size} bytes) "
              "INSTEAD of frames, no pts, on a separate session: a second session per camera")
        r = PyAvReader(server.url)
        try:
            r.read()
            pk = next(r.c.demux(r.s))
            print(f"pyav: every demuxed packet (bytes, pts {pk.pts}, keyframe {pk.is_keyframe}, time_base "
                  f"{pk.time_base}) is then decoded by the same session")
        finally:
            r.close()
        figures["opencv.packets"] = 0
        figures["pyav.packets"] = 1

        if not args.skip_freeze:
            print(f"\n== freeze: feeder stopped, connection open; read timeout {READ_TIMEOUT_S:g} s configured")
            for name in ("opencv", "pyav-1thread-bgr"):
                s = measure_freeze(readers[name], server, 30.0)
                figures[f"{name}.freeze_s"] = s
                print(f"{name:28s} noticed after {s:5.1f} s")
            print("   (PyAV: the first interrupted read returns the frame RTP was holding back, the next one "
                  "raises: 2x the timeout; the source's own watchdog reopens at freeze_after_s)")
            if args.opencv_defaults:
                s = measure_freeze(lambda u: OpenCvReader(u, timeouts=False), server, 120.0)
                figures["opencv-defaults.freeze_s"] = s
                print(f"{'opencv (no timeouts)':28s} noticed after {s:5.1f} s")

        print("\n== asyncio loop lag (5 ms ticker) while 4 streams decode in threads (to BGR)")
        base = asyncio.run(loop_lag(PyAvReader, [], args.seconds / 2))
        print(f"{'no decoding':28s} p50 {base[0]:5.2f} ms  p99 {base[1]:5.2f} ms  max {base[2]:5.2f} ms")
        for name in ("opencv-1thread", "pyav-1thread-bgr"):
            p50, p99, mx, n = asyncio.run(loop_lag(readers[name], server.urls, args.seconds))
            figures[f"{name}.lag_p99_ms"] = p99
            print(f"{name:28s} p50 {p50:5.2f} ms  p99 {p99:5.2f} ms  max {mx:5.2f} ms  ({n} frames)")

        print("\n== the product's RtspSource, 4 cameras, one consumer each (reader threads, queues, packet buffer)")
        for fps in (None, 5.0):
            r = asyncio.run(sources_lag(server.urls, args.seconds, fps))
            figures[f"source.{fps}"] = r
            print(f"{'decode_fps=' + str(fps):28s} {r['cpu_ms_per_decoded']:5.2f} ms CPU per decoded frame, "
                  f"{r['delivered']}/{r['decoded']} delivered; loop lag p50 {r['lag_p50']:.2f} ms "
                  f"p99 {r['lag_p99']:.2f} ms max {r['lag_max']:.2f} ms")

    # PyAV unless it costs clearly more CPU: only it gives packets and frames from the one session a camera
    # allows, and clips need the packets.
    ratio = figures["pyav-1thread-bgr.cpu_ms"] / max(1e-9, figures["opencv-1thread.cpu_ms"])
    choice = "pyav" if figures["pyav.packets"] and ratio <= 1.5 else "opencv"
    print(f"PyAV/OpenCV CPU per frame: {ratio:.2f}; choice: {choice}")
    print(f"\nRESULT choice={choice} opencv_cpu_ms_per_frame={figures['opencv-1thread.cpu_ms']:.2f} "
          f"pyav_cpu_ms_per_frame={figures['pyav-1thread-bgr.cpu_ms']:.2f} "
          f"pyav_decode_only_cpu_ms_per_frame={figures['pyav-1thread-decode-only.cpu_ms']:.2f} "
          f"opencv_open_ms={figures['opencv.open_s'] * 1000:.0f} "
          f"pyav_open_ms={figures['pyav-1thread-bgr.open_s'] * 1000:.0f} "
          f"opencv_freeze_s={figures.get('opencv.freeze_s', float('nan')):.1f} "
          f"pyav_freeze_s={figures.get('pyav-1thread-bgr.freeze_s', float('nan')):.1f} "
          f"opencv_packets={figures['opencv.packets']} pyav_packets={figures['pyav.packets']} "
          f"opencv_lag_p99_ms={figures['opencv-1thread.lag_p99_ms']:.2f} "
          f"pyav_lag_p99_ms={figures['pyav-1thread-bgr.lag_p99_ms']:.2f} "
          f"source4_cpu_ms_per_frame={figures['source.None']['cpu_ms_per_decoded']:.2f} "
          f"source4_fps5_cpu_ms_per_frame={figures['source.5.0']['cpu_ms_per_decoded']:.2f} "
          f"source4_lag_p99_ms={figures['source.None']['lag_p99']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
