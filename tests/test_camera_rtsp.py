"""RTSP ingest and clips against a real RTSP server (gst-rtsp-server on loopback, tests/rtsp_peer.py) serving
the campus clip as H.264 768x576 at 10 fps: frames flow, consumers share one session, slow consumers drop
(counted), decoding stays off the loop, the stream comes back after the server is killed and after it
freezes, unreachable URLs and wrong paths give clear reasons without the password, corrupt data does not
crash, and a clip written from the packet buffer is the camera's own bytes."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import random
import statistics
import subprocess
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from urllib.parse import quote

import av
import pytest

from edgeagent.drivers.camera.clips import ClipBusy, ClipRecorder, write_clip
from edgeagent.drivers.camera.rtsp import (
    EncodedPacket,
    Frame,
    PacketBuffer,
    RtspSource,
    StreamParams,
    backoff_s,
    redact_url,
)
from tests.helpers import wait_until
from tests.peers import free_port
from tests.rtsp_peer import FFMPEG, PeerUnavailable, RtspServer, busy_clip

WIDTH, HEIGHT = 768, 576
FAST = {"backoff_initial_s": 0.2, "backoff_max_s": 1.0}
USER, PASSWORD = "viewer", "p@ss:w%rd/1"  # needs percent-encoding in a URL


def corrupt_copy(src: Path, dst: Path, *, every: int = 3, hits: int = 30, seed: int = 7) -> Path:
    """The TS with random bytes written over the start of every ``every``-th video frame (the TS packet that
    opens its PES, past the PES header: NAL and slice headers, parameter sets), as from a flaky camera or
    link. Such frames do not decode at all (FFmpeg conceals damage inside a slice, not in its header)."""
    data = bytearray(src.read_bytes())
    rng = random.Random(seed)
    count = 0
    for off in range(0, len(data) - 187, 188):
        pid = ((data[off + 1] & 0x1F) << 8) | data[off + 2]
        if pid != 0x100 or not data[off + 1] & 0x40:
            continue
        count += 1
        if count % every == 0:
            for _ in range(hits):
                data[off + rng.randrange(24, 188)] = rng.randrange(256)
    dst.write_bytes(data)
    return dst


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RtspServer]:
    """One server for the module: /cam0 the clip, /cam1 a corrupted copy, /cam2 the clip behind Digest auth.
    Tests that kill or freeze it restore it before they end."""
    try:
        busy = busy_clip()
        bad = corrupt_copy(busy, tmp_path_factory.mktemp("media") / "corrupt.ts")
        with RtspServer([busy, bad], mounts=3, workdir=tmp_path_factory.mktemp("rtsp"),
                        credentials={2: (USER, PASSWORD)}) as s:
            yield s
    except PeerUnavailable as exc:
        pytest.fail(str(exc))


class States:
    def __init__(self) -> None:
        self.seen: list[tuple[bool, str]] = []
        self.at: list[float] = []

    def __call__(self, online: bool, reason: str) -> None:
        self.seen.append((online, reason))
        self.at.append(time.monotonic())

    @property
    def flags(self) -> list[bool]:
        return [o for o, _ in self.seen]


async def take(source: RtspSource, n: int, timeout_s: float = 20.0) -> list[Frame]:
    out: list[Frame] = []

    async def run() -> None:
        async for f in source.frames():
            out.append(f)
            if len(out) >= n:
                return

    await asyncio.wait_for(run(), timeout_s)
    return out


async def test_frames_flow(server: RtspServer) -> None:
    states = States()
    async with RtspSource(server.url, name="cam0", on_state=states, **FAST) as src:
        frames = await take(src, 12)
        assert all(f.image.shape == (HEIGHT, WIDTH, 3) and f.image.dtype.name == "uint8" for f in frames)
        assert not frames[0].image.flags.writeable  # shared by every consumer
        seqs = [f.seq for f in frames]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        pts = [f.pts_s for f in frames if f.pts_s is not None]
        assert len(pts) >= 10 and pts == sorted(pts)
        assert src.online and states.flags[-1] is True
        latest = src.latest()
        assert latest is not None and latest.seq >= frames[-1].seq
        st = src.stats()
        assert st["decoded"] >= 12 and st["delivered"] >= 12 and st["fps_in"] > 0
        # What the probe buffered while opening came in a burst: decoded (references) but not handed out.
        assert st["stale_flushed"] >= 1 and frames[0].seq > st["stale_flushed"]
        assert st["sessions"] >= 1 and st["error"] is None and st["open_s"] is not None
        assert st["packet_buffer"]["packets"] > 0
        assert src.params is not None and (src.params.codec, src.params.width, src.params.height) == \
            ("h264", WIDTH, HEIGHT)
        print(f"\nopen {st['open_s']} s, stale frames flushed after open: {st['stale_flushed']}")
    assert not src.online or src.stats()["consumers"] == 0


async def test_consumers_share_one_session(server: RtspServer) -> None:
    """The detector and a snapshot grab read the same session: one open, frames to both."""
    async with RtspSource(server.url, name="cam0", **FAST) as src:
        a, b = await asyncio.gather(take(src, 8), take(src, 8))
        assert len(a) == len(b) == 8
        assert {f.seq for f in a} & {f.seq for f in b}  # the same decoded frames, not two decodes
        assert src.stats()["sessions"] == 1
        assert src.latest() is not None


async def test_slow_consumer_drops_oldest_and_counts(server: RtspServer) -> None:
    async with RtspSource(server.url, name="cam0", queue_frames=2, **FAST) as src:
        it = src.frames().__aiter__()
        first = await asyncio.wait_for(it.__anext__(), 20)
        # The consumer now holds still while frames keep coming: its queue stays at 2, the rest dropped.
        assert await wait_until(lambda: src.stats()["dropped"] >= 5, 20)
        assert src.stats()["queue_depth"] <= 2
        nxt = await asyncio.wait_for(it.__anext__(), 5)
        after = await asyncio.wait_for(it.__anext__(), 5)
        assert nxt.seq - first.seq > 5  # the oldest went, the newest stayed
        assert after.seq > nxt.seq
        await it.aclose()


async def test_decode_fps_converts_only_needed_frames(server: RtspServer) -> None:
    async with RtspSource(server.url, name="cam0", decode_fps=2.5, **FAST) as src:
        frames = await take(src, 6)
        gaps = [b.pts_s - a.pts_s for a, b in itertools.pairwise(frames)
                if a.pts_s is not None and b.pts_s is not None]
        st = src.stats()
        # 10 fps in, 2.5 out: about three of four decoded frames are never converted to BGR.
        assert st["skipped"] >= 2 * (st["delivered"] - 1)
        assert gaps and min(gaps) >= 0.3
        print(f"\ndecode_fps=2.5: pts gaps {[round(g, 2) for g in gaps]}, stats decoded={st['decoded']} "
              f"delivered={st['delivered']} skipped={st['skipped']}")


async def test_keyframes_only_skips_decoding(server: RtspServer) -> None:
    async with RtspSource(server.url, name="cam0", keyframes_only=True, **FAST) as src:
        frames = await take(src, 3)
        st = src.stats()
        assert len(frames) == 3
        # GOP 10: one decoded frame per ten packets (the decoder never saw the others).
        assert st["decoded"] * 5 <= st["packet_buffer"]["packets"] + 10


async def test_decoding_is_off_the_loop(server: RtspServer) -> None:
    """Frames keep being decoded while the loop is blocked, and the loop keeps ticking while two streams
    decode (lag figures printed)."""
    async with RtspSource(server.url_for(0), name="cam0", **FAST) as a, \
            RtspSource(server.url_for(1), name="cam1", **FAST) as b:
        await take(a, 2)
        await take(b, 2)
        before = a.stats()["decoded"]
        time.sleep(1.0)  # deliberately blocks the loop
        assert a.stats()["decoded"] >= before + 3  # decoded by the reader thread meanwhile

        lags: list[float] = []
        ticks_between = []
        frames_seen = 0

        async def ticker() -> None:
            while True:
                t = time.monotonic()
                await asyncio.sleep(0.005)
                lags.append(time.monotonic() - t - 0.005)

        task = asyncio.create_task(ticker())
        try:
            async for _ in a.frames():
                ticks_between.append(len(lags))
                frames_seen += 1
                if frames_seen >= 20:
                    break
        finally:
            task.cancel()
        steps = [y - x for x, y in itertools.pairwise(ticks_between)]
        assert sum(1 for s in steps if s > 0) >= len(steps) // 2  # the loop ran between frames
        lags.sort()
        print(f"\nloop lag with 2 streams decoding: p50 {statistics.median(lags) * 1000:.2f} ms, "
              f"p99 {lags[int(0.99 * (len(lags) - 1))] * 1000:.2f} ms, max {lags[-1] * 1000:.2f} ms")


async def test_kill_and_restart_reconnects(server: RtspServer) -> None:
    states = States()
    async with RtspSource(server.url, name="cam0", on_state=states, **FAST) as src:
        await take(src, 3)
        try:
            server.kill()
            assert await wait_until(lambda: not src.online, 10)
            assert await wait_until(lambda: src.stats()["reconnects"] >= 3, 15)  # retries while it is down
            down_reason = src.stats()["error"]
        finally:
            server.restart()
        assert await wait_until(lambda: src.online, 20)
        last = src.latest()
        frames = await take(src, 3)
        assert last is not None and frames[-1].seq > last.seq
        # Once per transition, however many retries (a first open may meet the server's 503 right after the
        # previous test's session closed: count from the first online).
        assert states.flags[states.flags.index(True):] == [True, False, True]
        assert down_reason
        print(f"\nkilled: {states.seen[1][1]!r}; while down: {down_reason!r}; "
              f"reconnects {src.stats()['reconnects']}")


async def test_freeze_detected_and_recovers(server: RtspServer) -> None:
    states = States()
    async with RtspSource(server.url, name="cam0", on_state=states, freeze_after_s=3.0, **FAST) as src:
        await take(src, 3)
        t0 = time.monotonic()
        try:
            server.freeze()  # feeder stopped: the RTSP connection stays open, nothing arrives
            assert await wait_until(lambda: not src.online, 10)
            noticed = states.at[-1] - t0
        finally:
            server.resume()
        assert states.seen[-1][1].startswith("frozen")
        assert src.stats()["freezes"] >= 1
        assert noticed < 10
        assert await wait_until(lambda: src.online, 30)
        recovered = time.monotonic() - t0
        await take(src, 3)
        print(f"\nfreeze noticed after {noticed:.2f} s ({states.seen[-2][1]!r}); online again {recovered:.1f} s "
              f"after the freeze began")


async def test_unreachable_port_is_offline_with_reason_and_retries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent")
    url = f"rtsp://admin:s3cret-pw@127.0.0.1:{free_port()}/cam0"
    states = States()
    async with RtspSource(url, name="gate", on_state=states, **FAST) as src:
        assert await wait_until(lambda: src.stats()["reconnects"] >= 2, 15)
        assert states.seen and states.seen[0][0] is False
        reason = states.seen[0][1]
        assert "connection refused" in reason
        assert len(states.seen) == 1  # one offline report, not one per retry
        st = src.stats()
        assert "s3cret" not in repr(st) and st["url"].startswith("rtsp://admin:***@127.0.0.1:")
    assert "s3cret" not in caplog.text and "s3cret" not in reason
    assert "connection refused" in caplog.text


async def test_wrong_path_reason(server: RtspServer) -> None:
    states = States()
    url = server.url_for(0, userinfo="viewer:hunter2").replace("/cam0", "/no-such-stream")
    async with RtspSource(url, name="cam-x", on_state=states, **FAST) as src:
        assert await wait_until(lambda: bool(states.seen), 10)
        assert not src.online
    online, reason = states.seen[0]
    assert online is False and "404" in reason and "hunter2" not in reason


async def test_wrong_credentials_reason_and_right_ones_stream(server: RtspServer) -> None:
    states = States()
    wrong = server.url_for(2, userinfo=f"{USER}:not-{quote(PASSWORD, safe='')}")
    async with RtspSource(wrong, name="cam2", on_state=states, **FAST) as src:
        assert await wait_until(lambda: bool(states.seen), 10)
        assert not src.online
    online, reason = states.seen[0]
    assert online is False and "401" in reason and "password" in reason and "not-p" not in reason
    right = server.url_for(2, userinfo=f"{USER}:{quote(PASSWORD, safe='')}")
    async with RtspSource(right, name="cam2", **FAST) as src:
        frames = await take(src, 2)
        assert frames[-1].image.shape == (HEIGHT, WIDTH, 3)
        assert "w%25rd" not in repr(src.stats()) and PASSWORD not in repr(src.stats())


async def test_hung_server_open_times_out_then_recovers(server: RtspServer) -> None:
    """The server process stopped: the kernel still accepts connections, nothing answers. The freeze is
    noticed, the reopen times out with a clear reason, and the stream comes back when the server does."""
    states = States()
    async with RtspSource(server.url, name="cam0", on_state=states, open_timeout_s=1.0, freeze_after_s=1.5,
                          **FAST) as src:
        await take(src, 2)
        try:
            server.freeze(server=True)
            assert await wait_until(lambda: "open timed out" in (src.stats()["error"] or ""), 15)
            hung_reason = src.stats()["error"]
        finally:
            server.resume()
        assert await wait_until(lambda: src.online, 30)
        await take(src, 2)
    reasons = [r for o, r in states.seen if not o]
    assert reasons[0].startswith("frozen")
    print(f"\nhung server: {reasons[0]!r}, then {hung_reason!r}")


async def test_corrupt_stream_does_not_crash(server: RtspServer) -> None:
    states = States()
    async with RtspSource(server.url_for(1), name="cam1", on_state=states, **FAST) as src:
        frames = await take(src, 20, timeout_s=30)
        st = src.stats()
        assert len(frames) == 20 and all(f.image.shape == (HEIGHT, WIDTH, 3) for f in frames)
        assert src.online and states.flags[-1] is True
        print(f"\ncorrupt stream: decoded {st['decoded']}, decoder errors {st['decode_errors']}, "
              f"concealed {st['corrupt_frames']}, sessions {st['sessions']}")


async def test_undecodable_stream_counts_errors_and_reopens(tmp_path: Path) -> None:
    """Every frame's headers broken: each packet is a decoder error (counted, skipped); with packets but no
    frame for freeze_after_s the source reports it and opens again; nothing crashes."""
    short = tmp_path / "short.ts"
    r = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i", str(busy_clip()), "-t", "3",
                        "-c", "copy", str(short)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    garbage = corrupt_copy(short, tmp_path / "garbage.ts", every=1)
    states = States()
    async with RtspSource(f"file://{garbage}", name="bad", loop_file=True, freeze_after_s=1.0,
                          on_state=states, **FAST) as src:
        assert await wait_until(lambda: bool(states.seen), 15)
        assert await wait_until(lambda: src.stats()["decode_errors"] >= 5, 15)
        st = src.stats()
    assert states.seen[0] == (False, states.seen[0][1]) and "no decodable frame" in states.seen[0][1]
    assert st["delivered"] == 0 and st["freezes"] >= 1
    print(f"\nundecodable: {states.seen[0][1]!r}, decoder errors {st['decode_errors']}")


async def test_clip_from_packet_buffer_is_the_cameras_bytes(server: RtspServer, tmp_path: Path) -> None:
    async with RtspSource(server.url, name="cam0", packet_buffer_s=10.0, **FAST) as src:
        await take(src, 1)
        assert await wait_until(lambda: src.stats()["packet_buffer"]["span_s"] >= 2.5, 20)
        event = time.monotonic()
        recorder = ClipRecorder(src, pre_s=2.0, post_s=1.0, max_pending=1)
        path = tmp_path / "clips" / "event.mp4"
        task = asyncio.create_task(recorder.record(event, path))
        await asyncio.sleep(0)
        with pytest.raises(ClipBusy):  # one at a time for this recorder; the next is refused, counted
            await recorder.record(event, tmp_path / "other.mp4")
        info = await task
        buffered = src.packets_since(event - 2.0, event + 1.0)
    assert recorder.stats()["written"] == 1 and recorder.stats()["refused"] == 1
    assert info.path == path and path.exists() and not list(path.parent.glob(".*.tmp"))
    assert info.codec == "h264" and not info.truncated
    assert abs(info.duration_s - 3.0) <= 1.1  # ±1 GOP (keyframe every second) plus a frame

    with av.open(str(path)) as clip:
        stream = clip.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert (stream.codec_context.width, stream.codec_context.height) == (WIDTH, HEIGHT)
        packets = [p for p in clip.demux(stream) if p.size]
        assert packets[0].is_keyframe
        decoded = sum(len(stream.codec_context.decode(p)) for p in packets)
        decoded += len(stream.codec_context.decode(None))
        file_nals = [length_prefixed_nals(bytes(p)) for p in packets]
    assert len(packets) == info.frames == decoded
    # Not re-encoded: the clip holds the buffered packets' NAL units, byte for byte, in order.
    assert buffered[0].keyframe and len(buffered) == len(packets)
    assert file_nals == [annexb_nals(p.data) for p in buffered]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256
    print(f"\nclip: {info.frames} frames, {info.duration_s:.2f} s, {info.bytes} bytes")


async def test_clip_adds_parameter_sets_when_the_keyframe_lacks_them(server: RtspServer, tmp_path: Path) -> None:
    async with RtspSource(server.url, name="cam0", **FAST) as src:
        await take(src, 1)
        assert await wait_until(lambda: src.stats()["packet_buffer"]["gops"] >= 2, 20)
        packets = src.packets_since(0.0)
    params = packets[0].params
    assert params.extradata  # from the SDP's sprop-parameter-sets
    # A camera that sends SPS/PPS only in the SDP: strip them from the keyframes.
    stripped = [EncodedPacket(b"".join(b"\x00\x00\x00\x01" + n for n in annexb_nals(p.data)
                                       if n[0] & 0x1F not in (7, 8)),
                              p.pts, p.dts, p.keyframe, p.time_base, p.mono_s, p.params) for p in packets]
    info = write_clip(stripped, tmp_path / "no-sps.mp4")
    with av.open(str(info.path)) as clip:
        frames = list(clip.decode(clip.streams.video[0]))
    assert len(frames) == info.frames == len(packets)
    assert (frames[0].width, frames[0].height) == (WIDTH, HEIGHT)


async def test_clip_bounded_in_bytes(server: RtspServer, tmp_path: Path) -> None:
    async with RtspSource(server.url, name="cam0", **FAST) as src:
        await take(src, 1)
        assert await wait_until(lambda: src.stats()["packet_buffer"]["gops"] >= 3, 20)
        packets = src.packets_since(0.0)
    limit = sum(len(p.data) for p in packets) // 2
    info = write_clip(packets, tmp_path / "small.mp4", max_bytes=limit)
    assert info.truncated and 0 < info.frames < len(packets)
    assert sum(len(p.data) for p in packets[: info.frames]) <= limit


async def test_file_source_plays_in_real_time_and_loops(tmp_path: Path) -> None:
    short = tmp_path / "short.ts"
    r = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i", str(busy_clip()), "-t", "1.5",
                        "-c", "copy", str(short)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    states = States()
    async with RtspSource(f"file://{short}", name="demo", loop_file=True, on_state=states) as src:
        t0 = time.monotonic()
        frames = await take(src, 25)
        elapsed = time.monotonic() - t0
        assert src.stats()["sessions"] >= 2  # played past its 1.5 s end: opened again
        assert states.flags == [True]  # looping is not going offline
        assert elapsed >= 1.5  # paced by timestamps, not read as fast as possible
        assert all(f.image.shape == (HEIGHT, WIDTH, 3) for f in frames)


# --- the packet buffer's bounds, on synthetic packets -----------------------------------------------------

PARAMS = StreamParams("h264", 64, 48, Fraction(1, 90000), b"", 10.0, session=1)


def pkt(i: int, *, key: bool, size: int = 100, session: StreamParams = PARAMS) -> EncodedPacket:
    return EncodedPacket(bytes(size), i * 9000, i * 9000, key, Fraction(1, 90000), 1000.0 + i * 0.1, session)


def test_packet_buffer_keeps_whole_gops_in_time_and_bytes() -> None:
    buf = PacketBuffer(max_s=2.0, max_bytes=10_000_000)
    buf.add(pkt(0, key=False))  # before any keyframe: useless, not kept
    for i in range(1, 60):
        buf.add(pkt(i, key=i % 10 == 1))
    st = buf.stats()
    assert st["skipped_no_keyframe"] == 1
    # newest at 1005.9: the keyframe at or before 1003.9 (packet 31 at 1003.1) is the oldest kept
    got = buf.since(0.0)
    assert got[0].keyframe and got[0].mono_s == pytest.approx(1003.1)
    assert st["expired_gops"] == 3 and st["dropped_gops"] == 0
    window = buf.since(1004.5, 1005.0)
    assert window[0].mono_s == pytest.approx(1004.1) and window[-1].mono_s == pytest.approx(1005.0)

    small = PacketBuffer(max_s=60.0, max_bytes=2500)  # room for two GOPs of 10 x 100 bytes
    for i in range(1, 41):
        small.add(pkt(i, key=i % 10 == 1))
    assert small.stats()["dropped_gops"] == 2 and small.stats()["bytes"] <= 2500
    assert small.since(0.0)[0].mono_s == pytest.approx(1002.1)

    huge = PacketBuffer(max_s=60.0, max_bytes=500)  # one GOP alone is over the cap: dropped whole
    for i in range(1, 9):
        huge.add(pkt(i, key=i == 1))
    assert huge.stats()["dropped_gops"] == 1 and huge.stats()["skipped_no_keyframe"] >= 1
    assert all(p.keyframe for p in huge.since(0.0)[:1])


def test_packet_buffer_one_session_per_clip() -> None:
    buf = PacketBuffer(max_s=60.0, max_bytes=10_000_000)
    second = StreamParams("h264", 64, 48, Fraction(1, 90000), b"", 10.0, session=2)
    for i in range(1, 21):
        buf.add(pkt(i, key=i % 10 == 1))
    for i in range(25, 45):
        buf.add(pkt(i, key=i % 10 == 5, session=second))
    got = buf.since(1000.0, 1010.0)
    assert {p.session for p in got} == {2} and got[0].keyframe
    early = buf.since(1000.0, 1001.5)
    assert {p.session for p in early} == {1}


def test_backoff_doubles_jittered_and_capped() -> None:
    rng = random.Random(1)
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (5, 16.0), (6, 30.0), (40, 30.0)]:
        delays = [backoff_s(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert cap / 2 <= min(delays) and max(delays) <= cap
        assert max(delays) - min(delays) > cap / 4  # jittered, not one value for every camera


def test_redact_url() -> None:
    assert redact_url("rtsp://admin:pa55@10.0.0.5:554/Streaming/101?token=x") == \
        "rtsp://admin:***@10.0.0.5:554/Streaming/101"
    assert redact_url("rtsp://10.0.0.5/live") == "rtsp://10.0.0.5/live"


# --- NAL units of both packet forms, to compare the clip with the buffer ------------------------------------

def annexb_nals(data: bytes) -> list[bytes]:
    nals: list[bytes] = []
    i, starts = 0, []
    while i + 3 <= len(data):
        if data[i:i + 3] == b"\x00\x00\x01":
            starts.append(i + 3)
            i += 3
        else:
            i += 1
    for k, s in enumerate(starts):
        end = starts[k + 1] - 3 if k + 1 < len(starts) else len(data)
        nals.append(data[s:end].rstrip(b"\x00"))
    return [n for n in nals if n]


def length_prefixed_nals(data: bytes) -> list[bytes]:
    nals, i = [], 0
    while i + 4 <= len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        nals.append(data[i + 4:i + 4 + n].rstrip(b"\x00"))
        i += 4 + n
    return nals


async def test_frames_carry_the_luma_plane_and_convert_to_bgr_only_when_asked(server: RtspServer) -> None:
    import cv2
    import numpy as np

    async with RtspSource(server.url, name="cam0", decode_fps=5, **FAST) as src:
        frames = await take(src, 6)
    assert all(not f.image_ready and f.gray is not None for f in frames)
    f = frames[-1]
    assert (f.width, f.height) == (WIDTH, HEIGHT) and f.gray is not None and f.gray.shape == (HEIGHT, WIDTH)
    assert not f.gray.flags.writeable and not f.gray_full_range  # yuv420p: video range
    image = f.image  # converted now, once, and kept
    assert f.image_ready and f.image is image and image.shape == (HEIGHT, WIDTH, 3) and not image.flags.writeable
    # The luma is the picture's grey: video range (16-235) against OpenCV's full-range grey of the BGR.
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float64)
    luma_full = (f.gray.astype(np.float64) - 16.0) * 255.0 / 219.0
    assert float(np.mean(np.abs(grey - luma_full))) < 3.0
    # A source that converts every frame at once (the benchmark's naive loop) still can.
    async with RtspSource(server.url, name="cam0", bgr_on_demand=False, **FAST) as src:
        eager = await take(src, 3)
    assert all(x.image_ready for x in eager)


async def test_the_pipeline_gates_on_the_luma_in_the_reader_and_converts_only_for_the_detector(
        server: RtspServer) -> None:
    from typing import Any

    from edgeagent.drivers.camera.config import CameraDevice
    from edgeagent.drivers.camera.pipeline import CameraPipeline
    from edgeagent.models.engine import InferenceEngine
    from edgeagent.models.manifest import load_manifests

    class Sink:
        async def emit(self, *args: Any) -> None:
            return None

        def emit_telemetry(self, *args: Any) -> None:
            return None

    seen: list[Frame] = []

    class Watcher:
        def __init__(self, *, needs_image: bool) -> None:
            self.needs_image = needs_image
            self.ready: list[bool] = []

        def on_tick(self, frame: Any, tracks: Any, ended: Any, now: float) -> None:
            self.ready.append(frame.image_ready)

    class Recorded:
        """The source as the pipeline sees it, keeping each frame it was given."""

        def __init__(self, src: RtspSource) -> None:
            self.src = src
            self.analyzers = src.analyzers

        async def frames(self, *, newest: bool = False) -> Any:
            async for frame in self.src.frames(newest=newest):
                seen.append(frame)
                yield frame

        def stats(self) -> dict[str, Any]:
            return self.src.stats()

    cam = CameraDevice.model_validate({"type": "camera", "id": "cam0", "rtsp": {"detect_url": server.url},
                                       "detect": {"fps": 5, "classes": ["person"]}})
    async with InferenceEngine(load_manifests(), threads=2) as engine, \
            RtspSource(server.url, name="cam0", decode_fps=5, **FAST) as src:
        pipe = CameraPipeline(cam, detector=engine, model="nanodet", input_size=416,
                              sink=Sink(), evidence=None)  # type: ignore[arg-type]
        lazy, eager = Watcher(needs_image=False), Watcher(needs_image=True)
        pipe.observers.append(lazy)
        task = asyncio.create_task(pipe.run(Recorded(src)))
        try:
            assert await wait_until(lambda: pipe.stats.ticks >= 40, 30)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert pipe.analyze not in src.analyzers  # the pipeline leaves with its analyzer
        first_stats = dict(pipe.stats.as_dict(), motion_here=pipe.stats.motion_here)
        # An observer that needs the picture gets it converted (off the loop) on every tick.
        pipe.observers.append(eager)
        task = asyncio.create_task(pipe.run(src))
        try:
            assert await wait_until(lambda: len(eager.ready) >= 10, 30)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert all(eager.ready) and len(lazy.ready) > len(eager.ready)
    assert not all(lazy.ready[:40])  # alone, the lazy observer saw unconverted frames on quiet ticks
    st = first_stats
    assert st["motion_here"] == 0  # every tick's motion came from the reader thread
    assert 0 < st["detector_runs"] < st["ticks"]
    attempted = st["detector_runs"] + st["skipped_busy"] + st["skipped_error"]
    # BGR only for the frames the detector ran on (the last may still be in flight at cancel).
    assert attempted <= sum(f.image_ready for f in seen) <= attempted + 1


async def test_idle_decodes_keyframes_only_and_resumes_mid_gop_at_once(server: RtspServer) -> None:
    async with RtspSource(server.url, name="cam0", decode_fps=5, **FAST) as src:
        it = src.frames().__aiter__()
        await asyncio.wait_for(it.__anext__(), 20)
        src.set_idle(True)
        # Up to three frames decoded before the reader saw the request may still come (two queued, one read).
        idle = [await asyncio.wait_for(it.__anext__(), 5) for _ in range(6)]
        st = src.stats()
        assert st["idle"] and st["idle_spells"] == 1 and st["idle_skipped"] > 0
        # One picture per GOP (the clip's GOP is 10 frames at 10 fps): the last ones are a second apart.
        pts = [f.pts_s for f in idle[-3:]]
        assert all(p is not None for p in pts)
        assert [b - a for a, b in itertools.pairwise(pts)] == [pytest.approx(1.0, abs=0.05)] * 2  # type: ignore[operator]
        src.set_idle(False)
        after = [await asyncio.wait_for(it.__anext__(), 5) for _ in range(6)]
        # Back at the detection rate at once: the first frame comes from the same GOP (its packets so far were
        # decoded in one burst), not a second later at the next keyframe.
        first, last_idle = after[0].pts_s, idle[-1].pts_s
        assert first is not None and last_idle is not None and first - last_idle < 0.95
        gaps = [b.pts_s - a.pts_s for a, b in itertools.pairwise(after[-4:])]  # type: ignore[operator]
        assert gaps == [pytest.approx(0.2, abs=0.05)] * 3
        assert not src.stats()["idle"]
        await it.aclose()


async def test_a_newest_consumer_takes_the_newest_queued_frame_and_counts_the_rest(server: RtspServer) -> None:
    async with RtspSource(server.url, name="cam0", queue_frames=3, **FAST) as src:
        plain = src.frames().__aiter__()
        fresh = src.frames(newest=True).__aiter__()
        await asyncio.wait_for(plain.__anext__(), 20)
        await asyncio.wait_for(fresh.__anext__(), 20)
        assert await wait_until(lambda: src.stats()["queue_depth"] >= 3, 20)  # both hold still: queues fill
        dropped = src.stats()["dropped"]
        a = await asyncio.wait_for(plain.__anext__(), 5)
        f = await asyncio.wait_for(fresh.__anext__(), 5)
        assert f.seq > a.seq  # the plain consumer takes the oldest of its queue, the other the newest
        assert src.stats()["dropped"] > dropped  # what it passed over is counted as dropped
        await plain.aclose()
        await fresh.aclose()
