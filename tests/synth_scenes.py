"""Synthetic camera scenes for the car gate and the e-bike lift rule: the demo's clips and the daemon tests'.

* :func:`gate_frames`: a gate camera over an empty lane; a car (the car photo of ``licenseplate_motion.jpg``
  with a synthetic plate from :mod:`tests.synth_plates`) drives up to the barrier growing from 60 % to 95 % of
  its photo size (its plate from about 85 to 135 px wide), waits, and drives on through; then the next car.
* :func:`lift_frames`: a lift car seen from a ceiling corner (steel walls, a darker floor, the open door on the
  right); something is wheeled in through the door, stands on the floor and is wheeled out: the motorcycle of
  ``motorcycle_left.png`` (an e-bike stand-in: Chinese e-bikes are step-through mopeds, read as motorcycles)
  or, for the negative case, the person of ``person.jpg``.

The clips are written as H.264 MP4 with ffmpeg (``write_clip``), at 10 frames a second. The demo's are committed
in ``drivers/sim/media`` (so no Pillow or font is needed at run time); make them again with::

    .venv/bin/python -m tests.synth_scenes drivers/sim/media

Everything is drawn with OpenCV and NumPy from fixed inputs, so the frames are the same on every machine with
the same font (the plates need Debian's ``fonts-wqy-zenhei``).
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt

from tests import synth_plates as sp
from tests.media import image as media_image

Image = npt.NDArray[np.uint8]

FPS: Final = 10
# 4:4:4: the plates are white on blue, and halving the colour resolution (4:2:0) costs the reader its province
# character (scores 0.5-0.9 instead of 0.95-1)
PIX_FMT: Final = "yuv444p"
GATE_SIZE: Final = (960, 720)  # width, height
LIFT_SIZE: Final = (960, 720)
RESIDENT_PLATE: Final = "京AF0236"
VISITOR_PLATE: Final = "苏E5A2B8"
# The lift car's floor as the camera sees it (normalized), for the rule's zone: the door's view of the
# landing (the right edge) is left out.
LIFT_FLOOR: Final = ((0.05, 0.55), (0.80, 0.55), (0.80, 1.0), (0.05, 1.0))
# The lane in front of the barrier (normalized), for the gate's zone.
GATE_LANE: Final = ((0.1, 0.45), (0.9, 0.45), (0.95, 1.0), (0.05, 1.0))


def _road(size: tuple[int, int]) -> Image:
    w, h = size
    ramp = np.linspace(0, 60, h, dtype=np.float32)[:, None, None]
    bg = (np.asarray((90, 95, 100), np.float32)[None, None, :] + ramp).repeat(w, axis=1).astype(np.uint8)
    cv2.line(bg, (0, int(h * 0.35)), (w, int(h * 0.35)), (210, 210, 210), 3)  # the barrier's stop line
    cv2.rectangle(bg, (0, int(h * 0.12)), (int(w * 0.08), int(h * 0.35)), (70, 70, 80), -1)  # the guard booth
    return bg


def _paste(scene: Image, thing: Image, scale: float, cx: float, bottom: float) -> Image:
    """``thing`` resized by ``scale`` with its bottom-centre at (cx, bottom) (normalized), clipped to the frame."""
    out = scene.copy()
    h, w = out.shape[:2]
    t = cv2.resize(thing, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    th, tw = t.shape[:2]
    x, y = int(cx * w - tw / 2), int(bottom * h - th)
    x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + tw), min(h, y + th)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = t[y0 - y:y1 - y, x0 - x:x1 - x]
    return out


def gate_frames(plates: Sequence[str] = (RESIDENT_PLATE, VISITOR_PLATE), *, empty_s: float = 1.0,
                approach_s: float = 2.5, wait_s: float = 2.0, exit_s: float = 1.2, gap_s: float = 1.0
                ) -> Iterator[Image]:
    """Each car in turn drives up to the barrier, waits, and drives on through it (the guard opens for the
    visitor); the lane is empty ``empty_s`` before the first and after the last, ``gap_s`` between two."""
    road = _road(GATE_SIZE)
    for n_car, text in enumerate(plates):
        car = sp.car_with_plate(text, sp.Wear(), np.random.default_rng(0)).image
        for _ in range(int((gap_s if n_car else empty_s) * FPS)):
            yield road
        n = int(approach_s * FPS)
        for i in range(n):
            f = i / max(1, n - 1)
            yield _paste(road, car, 0.6 + 0.35 * f, 0.5, 0.82 + 0.13 * f)
        for _ in range(int(wait_s * FPS)):
            yield _paste(road, car, 0.95, 0.5, 0.95)
        for i in range(n_exit := int(exit_s * FPS)):  # through the barrier and away (a car never vanishes)
            f = (i + 1) / n_exit
            yield _paste(road, car, 0.95 - 0.5 * f, 0.5, 0.95 - 0.6 * f)
    for _ in range(int(empty_s * FPS)):
        yield road


def _lift() -> Image:
    w, h = LIFT_SIZE
    car = np.zeros((h, w, 3), np.uint8)
    ramp = np.linspace(150, 185, w, dtype=np.float32)[None, :, None]
    car[:] = ramp.repeat(h, axis=0).astype(np.uint8)  # brushed steel walls
    for x in range(0, int(w * 0.8), 120):
        cv2.line(car, (x, 0), (x, int(h * 0.55)), (120, 124, 128), 2)  # wall panels
    cv2.rectangle(car, (0, int(h * 0.55)), (w, h), (70, 66, 62), -1)  # the floor
    cv2.rectangle(car, (int(w * 0.82), int(h * 0.05)), (w, h), (95, 110, 120), -1)  # the open door (landing)
    cv2.rectangle(car, (int(w * 0.05), int(h * 0.12)), (int(w * 0.12), int(h * 0.3)), (40, 40, 40), -1)  # panel
    return car


def _motorcycle() -> Image:
    return np.ascontiguousarray(media_image("motorcycle_left.png")[74:453, 105:687])  # where the detector boxes it


def _person() -> Image:
    return np.ascontiguousarray(media_image("person.jpg")[95:380, 180:285])


def lift_frames(what: str = "motorcycle", *, empty_s: float = 0.6, move_s: float = 1.2,
                stay_s: float = 3.0) -> Iterator[Image]:
    """``what`` ("motorcycle" or "person") is wheeled in through the door, stands, and is wheeled out."""
    lift = _lift()
    thing, scale, stand_x = ((_motorcycle(), 0.85, 0.42) if what == "motorcycle"
                             else (_person(), 1.4, 0.45))
    for _ in range(int(empty_s * FPS)):
        yield lift
    n = int(move_s * FPS)
    for i in range(n):
        yield _paste(lift, thing, scale, 1.15 - (1.15 - stand_x) * i / max(1, n - 1), 0.93)
    for _ in range(int(stay_s * FPS)):
        yield _paste(lift, thing, scale, stand_x, 0.93)
    for i in range(n):
        yield _paste(lift, thing, scale, stand_x + (1.15 - stand_x) * (i + 1) / n, 0.93)
    for _ in range(int(2 * empty_s * FPS)):
        yield lift


def write_clip(frames: Iterator[Image], path: Path, *, crf: int = 18) -> int:
    """H.264 MP4 at FPS frames a second (ffmpeg, a key frame a second, fast start); returns the frame count."""
    first = next(frames)
    h, w = first.shape[:2]
    cmd = ["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{w}x{h}",
           "-r", str(FPS), "-i", "-", "-c:v", "libx264", "-preset", "slow", "-crf", str(crf), "-g", str(FPS),
           "-pix_fmt", PIX_FMT, "-an", "-movflags", "+faststart", str(path)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    count = 0
    for frame in (first, *frames):
        proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        count += 1
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError(f"ffmpeg failed writing {path}")
    return count


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write the demo's gate and lift clips")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print("gate.mp4:", write_clip(gate_frames(), args.out_dir / "gate.mp4"), "frames")
    print("lift.mp4:", write_clip(lift_frames("motorcycle"), args.out_dir / "lift.mp4"), "frames")


if __name__ == "__main__":
    _main()
