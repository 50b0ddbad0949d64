"""Synthetic façade sequences (tests/synth_facade.py) as H.264 video, for the RTSP peer and the benchmark.

The frames are encoded as a camera would send them: H.264 High, yuv420p, no B-frames, a keyframe a second,
in MPEG-TS (what the RTSP peer loops; see tests/rtsp_peer.py). ``crf`` 18 keeps a 3-4 px object visible;
cameras at their usual bitrates sit near it for a static wall.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from tests.synth_facade import SynthSequence


def encode(seq: SynthSequence, path: Path, *, crf: int = 18) -> Path:
    """Write ``seq`` (grey or BGR frames) to ``path`` (.ts) at its frame rate; returns ``path``."""
    fps = Fraction(seq.fps).limit_denominator(1000)
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = seq.scene.width, seq.scene.height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "bf": "0", "g": str(round(seq.fps)),
                          "keyint_min": str(round(seq.fps)), "sc_threshold": "0"}
        for k, (frame, _) in enumerate(seq.frames()):
            fmt = "gray" if frame.ndim == 2 else "bgr24"
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=fmt)
            vf.pts = k
            vf.time_base = 1 / fps
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    tmp.replace(path)
    return path
