"""The full-rate grey tap (drivers/camera/luma.py): the crop is the decoder's luma plane inside the region,
whatever region a consumer asks for; the queue is bounded, oldest dropped and counted."""

from __future__ import annotations

import threading

import av
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.camera.luma import LumaFrame, LumaTap, luma_region


def yuv_frame(w: int, h: int, seed: int) -> av.VideoFrame:
    rng = np.random.default_rng(seed)
    bgr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return av.VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format="yuv420p")


@settings(max_examples=60, deadline=None)
@given(w=st.integers(8, 96).map(lambda v: v * 2), h=st.integers(8, 64).map(lambda v: v * 2),
       region=st.tuples(*[st.integers(-200, 400)] * 4), seed=st.integers(0, 2**16))
def test_any_region_gives_a_crop_of_the_luma_plane_inside_the_frame(w: int, h: int,
                                                                     region: tuple[int, int, int, int],
                                                                     seed: int) -> None:
    tap = LumaTap(lambda fw, fh: region, max_frames=2)
    frame = yuv_frame(w, h, seed)
    tap.feed(frame, 1, 0.04)
    got = tap.get(0)
    assert got is not None and tap.errors == 0
    x1, y1 = got.x0, got.y0
    assert 0 <= x1 < w and 0 <= y1 < h and (got.frame_w, got.frame_h) == (w, h)
    ch, cw = got.luma.shape
    assert cw >= 1 and ch >= 1 and x1 + cw <= w and y1 + ch <= h
    planar = frame.to_ndarray()  # yuv420p: the first h rows are the Y plane
    assert np.array_equal(got.luma, planar[:h, :w][y1:y1 + ch, x1:x1 + cw])
    assert got.luma.flags.owndata  # a copy: the decoder reuses its buffers


def test_a_failing_region_is_counted_not_raised() -> None:
    def broken(w: int, h: int) -> tuple[int, int, int, int]:
        raise RuntimeError("bad façade")

    tap = LumaTap(broken)
    tap.feed(yuv_frame(32, 32, 1), 1, None)
    assert tap.errors == 1 and tap.get(0) is None


def test_the_queue_keeps_the_newest_frames_and_counts_the_dropped() -> None:
    tap = LumaTap(lambda w, h: (0, 0, w, h), max_frames=3)
    for k in range(10):
        tap.put(LumaFrame(np.zeros((2, 2), np.uint8), 0, 0, 2, 2, k, None, float(k)))
    assert tap.stats() == {"delivered": 10, "dropped": 7, "errors": 0, "depth": 3}
    assert [f.seq for f in (tap.get(0), tap.get(0), tap.get(0))] == [7, 8, 9]  # type: ignore[union-attr]


def test_close_wakes_a_waiting_consumer() -> None:
    tap = LumaTap(lambda w, h: (0, 0, w, h))
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(tap.get(30.0)))
    t.start()
    tap.close()
    t.join(5.0)
    assert not t.is_alive() and got == [None]


def test_a_picture_without_a_luma_plane_is_converted_to_grey() -> None:
    rng = np.random.default_rng(3)
    bgr = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    frame = av.VideoFrame.from_ndarray(bgr, format="bgr24")
    crop = luma_region(frame, (4, 2, 30, 20))
    assert crop.shape == (18, 26)
    assert np.array_equal(crop, frame.to_ndarray(format="gray")[2:20, 4:30])
