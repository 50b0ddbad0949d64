"""Synthetic façade sequences for the thrown-object detector: a still façade seen from below, plus actors.

Used by ``tests/test_rules_thrown.py`` and meant for ``bench/rules.py`` (recall, false alarms per hour,
latency). Everything is drawn with OpenCV from a seed, so a sequence is reproducible frame for frame.

The scene: a façade of ``floors`` x ``columns`` window cells drawn flat (wall, slab lines, windows with
frames, some lit), warped by a perspective transform onto the frame's quad (top narrower than the bottom, as
a camera looking up sees it: the upper floors are also shorter), over a sky gradient, with Gaussian sensor
noise on every frame. The same quad, as a :class:`FacadeSpec`, is what the detector is given, and actors that
live on the façade (a falling object, a bird, a leaf, a person at a window) move in **façade metres** mapped
through the same transform, so gravity is exactly 9.81 m/s² on the façade plane and the perspective in the
image is real. Actors near the lens (rain streaks, an insect) move in image pixels.

Actors (each a factory returning an :class:`Actor`; each has a :class:`Truth`):

* :func:`falling_object`: a small dark or light object (a few px) held at a window of cell ``(floor,
  column)`` for ``hold_s`` and then released with an initial velocity, falling with ``g`` (motion-blurred over
  ``exposure_s``): the only actor that should alarm;
* :func:`bird`: ``straight`` (sideways or upward), ``undulating`` (sinusoidal flight), ``glide`` (descending
  at constant speed), ``swoop`` (diving then pulling up: decelerating), with flapping wings;
* :func:`leaf`: drifting down at a near-constant slow speed with a sideways swing, flickering as it turns;
* :func:`rain`: many short, fast, thin near-vertical bright streaks at constant speed, each alive a few frames;
* :func:`insect`: a large, blurred, low-contrast blob near the lens with an erratic path;
* :func:`person_at_window`: a figure appearing in one window cell, swaying, with a hand moving up and down.

:class:`SynthSequence` yields ``(frame, t)`` (uint8 grey or BGR, monotonic-like seconds from ``t0``) and
carries the truths; :func:`run` feeds a detector and returns the alarms with their frame indexes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from edgeagent.drivers.camera.rules.thrown import G_M_S2, FacadeGrid, FacadeSpec, ThrownAlarm, ThrownObjectDetector

Image = npt.NDArray[np.uint8]
Rng = np.random.Generator
_SHIFT = 4  # cv2 drawing with 1/16 px precision
_ONE = 1 << _SHIFT


@dataclass(frozen=True, slots=True)
class Scene:
    """The camera and the façade. ``quad`` is normalized (top-left, top-right, bottom-right, bottom-left)."""

    width: int = 640
    height: int = 360
    floors: int = 12
    columns: int = 6
    bottom_floor: int = 1
    floor_height_m: float = 3.0
    column_width_m: float = 3.0
    quad: tuple[tuple[float, float], ...] = ((0.33, 0.05), (0.67, 0.05), (0.85, 0.86), (0.15, 0.86))
    noise_sigma: float = 3.0
    color: bool = False
    texture_seed: int = 7

    def spec(self, **overrides: Any) -> FacadeSpec:
        """The :class:`FacadeSpec` describing this scene (what an installer would configure)."""
        q = self.quad
        kwargs: dict[str, Any] = {
            "quad": (q[0], q[1], q[2], q[3]), "floors": self.floors, "columns": self.columns,
            "bottom_floor": self.bottom_floor, "floor_height_m": self.floor_height_m,
            "column_width_m": self.column_width_m}
        kwargs.update(overrides)
        return FacadeSpec(**kwargs)

    def grid(self) -> FacadeGrid:
        return _grid(self)

    @property
    def top_floor(self) -> int:
        return self.bottom_floor + self.floors - 1


@lru_cache(maxsize=16)
def _grid(scene: Scene) -> FacadeGrid:
    return scene.spec().grid(scene.width, scene.height)


@lru_cache(maxsize=8)
def _background(scene: Scene) -> Image:
    """The still scene (sky and façade), BGR."""
    rng = np.random.default_rng(scene.texture_seed)
    h, w = scene.height, scene.width
    sky = np.empty((h, w, 3), dtype=np.uint8)
    ramp = np.linspace(0.0, 1.0, h)[:, None]
    for c, (top, bottom) in enumerate(((205, 235), (190, 225), (170, 215))):
        sky[:, :, c] = (top + (bottom - top) * ramp).astype(np.uint8)
    # The façade drawn flat, 24 px per metre, then warped onto the quad.
    ppm = 24
    fw, fh = int(scene.columns * scene.column_width_m * ppm), int(scene.floors * scene.floor_height_m * ppm)
    flat = np.empty((fh, fw, 3), dtype=np.uint8)
    flat[:] = (168, 180, 192)  # light beige wall
    flat = np.clip(flat.astype(np.int16) + rng.normal(0, 4, (fh, fw, 1)).astype(np.int16), 0, 255).astype(np.uint8)
    cw, ch = scene.column_width_m * ppm, scene.floor_height_m * ppm
    for r in range(scene.floors):
        y0 = int(r * ch)
        cv2.rectangle(flat, (0, y0), (fw, y0 + max(2, int(0.12 * ch))), (140, 150, 160), -1)  # slab
        for c in range(scene.columns):
            x0 = int(c * cw)
            wx1, wx2 = int(x0 + 0.22 * cw), int(x0 + 0.78 * cw)
            wy1, wy2 = int(y0 + 0.3 * ch), int(y0 + 0.85 * ch)
            lit = rng.random() < 0.2
            glass = (150, 190, 205) if lit else tuple(int(v) for v in rng.integers(60, 95, 3))
            cv2.rectangle(flat, (wx1, wy1), (wx2, wy2), glass, -1)
            cv2.rectangle(flat, (wx1, wy1), (wx2, wy2), (215, 215, 215), 2)
            cv2.line(flat, ((wx1 + wx2) // 2, wy1), ((wx1 + wx2) // 2, wy2), (215, 215, 215), 2)
    grid = scene.grid()
    src = np.array([(0, 0), (fw, 0), (fw, fh), (0, fh)], dtype=np.float32)
    warp = cv2.getPerspectiveTransform(src, grid.quad_px)
    out = cv2.warpPerspective(flat, warp, (w, h), dst=sky, borderMode=cv2.BORDER_TRANSPARENT)
    return np.asarray(out, dtype=np.uint8)


# --------------------------------------------------------------------------------------------- actors


@dataclass(frozen=True, slots=True)
class Truth:
    """What an actor is. ``should_alarm``: only a falling object; ``cell``: its release cell; ``release_s``:
    the absolute time of release (the sequence's ``t0`` included)."""

    kind: str
    should_alarm: bool
    cell: tuple[int, int] | None = None
    release_s: float | None = None


class Actor(Protocol):
    truth_kind: str

    def reset(self, rng: Rng, scene: Scene, t0: float) -> Truth:
        """Start (again) from the beginning; the actor's truth for a sequence starting at ``t0``."""

    def draw(self, img: Image, t: float) -> None:
        """Draw the actor at ``t`` seconds from the sequence's start."""


def _shade(img: Image, grey: int) -> tuple[int, int, int] | int:
    return (grey, grey, grey) if img.ndim == 3 else grey


def _fixed(x: float) -> int:
    return round(x * _ONE)


def _dot(img: Image, x: float, y: float, diameter: float, grey: int) -> None:
    cv2.circle(img, (_fixed(x), _fixed(y)), max(1, _fixed(diameter / 2)), _shade(img, grey), -1, cv2.LINE_AA,
               _SHIFT)


def _streak(img: Image, a: tuple[float, float], b: tuple[float, float], thickness: float, grey: int) -> None:
    if math.hypot(b[0] - a[0], b[1] - a[1]) < 0.75:
        _dot(img, (a[0] + b[0]) / 2, (a[1] + b[1]) / 2, thickness, grey)
        return
    cv2.line(img, (_fixed(a[0]), _fixed(a[1])), (_fixed(b[0]), _fixed(b[1])), _shade(img, grey),
             max(1, round(thickness)), cv2.LINE_AA, _SHIFT)


def _px(grid: FacadeGrid, u: float, v: float) -> tuple[float, float]:
    x, y = grid.to_px(np.array([[u, v]], dtype=np.float64))[0]
    return float(x), float(y)


@dataclass(slots=True)
class FallingObject:
    """A small object released at a window: see :func:`falling_object`."""

    floor: int
    column: int
    release_after_s: float = 1.0
    vx_m_s: float = 0.0
    vy_m_s: float = 0.0  # positive: thrown down; negative: thrown up
    size_px: float = 4.0
    grey: int = 30
    hold_s: float = 0.0
    exposure_s: float = 0.01
    offset_m: tuple[float, float] = (0.0, 0.0)  # from the window's centre, (across, down)
    g_factor: float = 1.0  # below 1: drag
    hidden_s: tuple[tuple[float, float], ...] = ()  # (from, to) after release: behind a balcony, not drawn
    truth_kind: str = "falling_object"
    _grid: FacadeGrid | None = field(default=None, repr=False)
    _u0: float = 0.0
    _v0: float = 0.0

    def reset(self, rng: Rng, scene: Scene, t0: float) -> Truth:
        grid = scene.grid()
        row_from_top = scene.top_floor - self.floor
        if not (0 <= row_from_top < scene.floors and 1 <= self.column <= scene.columns):
            raise ValueError(f"cell ({self.floor}, {self.column}) is not on the façade")
        self._grid = grid
        # The window's centre (the windows span 0.3..0.85 of the floor's height from its top).
        self._u0 = (self.column - 0.5) * scene.column_width_m + self.offset_m[0]
        self._v0 = (row_from_top + 0.58) * scene.floor_height_m + self.offset_m[1]
        return Truth(self.truth_kind, True, (self.floor, self.column), t0 + self.release_after_s)

    def position_m(self, t: float) -> tuple[float, float] | None:
        """Façade metres at ``t`` (from the sequence's start), ``None`` before it is held out."""
        tau = t - self.release_after_s
        if tau < -self.hold_s:
            return None
        tau = max(0.0, tau)
        return (self._u0 + self.vx_m_s * tau,
                self._v0 + self.vy_m_s * tau + 0.5 * G_M_S2 * self.g_factor * tau * tau)

    def draw(self, img: Image, t: float) -> None:
        assert self._grid is not None
        tau = t - self.release_after_s
        if any(start <= tau < end for start, end in self.hidden_s):
            return
        a = self.position_m(t - self.exposure_s / 2)
        b = self.position_m(t + self.exposure_s / 2)
        if b is None:
            return
        if a is None:
            a = b
        pa, pb = _px(self._grid, *a), _px(self._grid, *b)
        if pa[1] > img.shape[0] + 20:
            return
        _streak(img, pa, pb, self.size_px, self.grey)


def falling_object(floor: int, column: int, **kw: Any) -> FallingObject:
    """A small object released from the window of ``(floor, column)``; keyword arguments as
    :class:`FallingObject` (``release_after_s``, ``vx_m_s``, ``vy_m_s``, ``size_px``, ``grey``, ``hold_s``,
    ``exposure_s``, ``offset_m``, ``g_factor``, ``hidden_s``)."""
    return FallingObject(floor, column, **kw)


BirdKind = Literal["straight", "undulating", "glide", "swoop"]


@dataclass(slots=True)
class Bird:
    """A bird crossing the view: see :func:`bird`."""

    kind: BirdKind
    start_after_s: float = 0.3
    duration_s: float = 4.0
    truth_kind: str = "bird"
    _grid: FacadeGrid | None = field(default=None, repr=False)
    _p0: tuple[float, float] = (0.0, 0.0)
    _vel: tuple[float, float] = (0.0, 0.0)
    _amp: float = 0.0
    _freq: float = 0.0
    _decel: float = 0.0
    _flap_hz: float = 6.0
    _size: float = 6.0
    _grey: int = 40

    def reset(self, rng: Rng, scene: Scene, t0: float) -> Truth:
        self._grid = scene.grid()
        width_m, height_m = scene.columns * scene.column_width_m, scene.floors * scene.floor_height_m
        direction = 1.0 if rng.random() < 0.5 else -1.0
        speed = float(rng.uniform(6.0, 14.0))
        u0 = -2.0 if direction > 0 else width_m + 2.0
        v0 = float(rng.uniform(0.1, 0.7)) * height_m
        self._amp, self._freq, self._decel = 0.0, 0.0, 0.0
        if self.kind == "straight":
            climb = float(rng.uniform(0.0, 0.5)) * speed  # level or climbing (v decreases = up)
            self._vel = (direction * speed, -climb)
        elif self.kind == "undulating":
            self._vel = (direction * speed, float(rng.uniform(-1.0, 1.0)))
            self._amp, self._freq = float(rng.uniform(0.3, 1.2)), float(rng.uniform(0.8, 2.5))
        elif self.kind == "glide":
            angle = math.radians(float(rng.uniform(20.0, 60.0)))
            v0 = float(rng.uniform(0.05, 0.35)) * height_m
            self._vel = (direction * speed * math.cos(angle), speed * math.sin(angle))
        else:  # swoop: dives steeply, then pulls up (decelerating descent)
            v0 = float(rng.uniform(0.05, 0.3)) * height_m
            down = float(rng.uniform(8.0, 14.0))
            self._vel = (direction * float(rng.uniform(3.0, 8.0)), down)
            self._decel = float(rng.uniform(6.0, 12.0))  # m/s² upward
        self._p0 = (u0, v0)
        self._flap_hz = float(rng.uniform(4.0, 9.0))
        self._size = float(rng.uniform(4.0, 9.0))
        self._grey = int(rng.integers(25, 70))
        return Truth(self.truth_kind, False)

    def draw(self, img: Image, t: float) -> None:
        assert self._grid is not None
        tau = t - self.start_after_s
        if not 0.0 <= tau <= self.duration_s:
            return
        u = self._p0[0] + self._vel[0] * tau
        v = self._p0[1] + self._vel[1] * tau - 0.5 * self._decel * tau * tau
        if self._amp:
            v += self._amp * math.sin(2 * math.pi * self._freq * tau)
        x, y = _px(self._grid, u, v)
        flap = math.sin(2 * math.pi * self._flap_hz * tau)
        _dot(img, x, y, self._size * 0.6, self._grey)
        span = self._size * (0.8 + 0.5 * abs(flap))
        tip_dy = -flap * self._size * 0.6
        _streak(img, (x - span, y + tip_dy), (x, y), 1.5, self._grey)
        _streak(img, (x, y), (x + span, y + tip_dy), 1.5, self._grey)


def bird(kind: BirdKind, **kw: Any) -> Bird:
    """A bird: ``straight`` (sideways or climbing), ``undulating``, ``glide`` (down at constant speed),
    ``swoop`` (dive and pull-up). Speed, height, direction, size and flapping come from the sequence's seed."""
    return Bird(kind, **kw)


@dataclass(slots=True)
class Leaf:
    """A leaf drifting down: see :func:`leaf`."""

    start_after_s: float = 0.3
    duration_s: float = 8.0
    truth_kind: str = "leaf"
    _grid: FacadeGrid | None = field(default=None, repr=False)
    _p0: tuple[float, float] = (0.0, 0.0)
    _fall: float = 1.0
    _drift: float = 0.0
    _amp: float = 0.5
    _freq: float = 0.5
    _phase: float = 0.0
    _size: float = 4.0
    _grey: int = 60

    def reset(self, rng: Rng, scene: Scene, t0: float) -> Truth:
        self._grid = scene.grid()
        width_m, height_m = scene.columns * scene.column_width_m, scene.floors * scene.floor_height_m
        self._p0 = (float(rng.uniform(0.1, 0.9)) * width_m, float(rng.uniform(0.0, 0.4)) * height_m)
        self._fall = float(rng.uniform(0.5, 2.0))  # m/s terminal
        self._drift = float(rng.uniform(-0.8, 0.8))
        self._amp, self._freq = float(rng.uniform(0.3, 1.2)), float(rng.uniform(0.3, 1.0))
        self._phase = float(rng.uniform(0, 2 * math.pi))
        self._size = float(rng.uniform(3.0, 6.0))
        self._grey = int(rng.integers(40, 110))
        return Truth(self.truth_kind, False)

    def draw(self, img: Image, t: float) -> None:
        assert self._grid is not None
        tau = t - self.start_after_s
        if not 0.0 <= tau <= self.duration_s:
            return
        # From rest to its terminal speed in a tenth of a second (a leaf's drag is huge).
        tc = 0.1
        fall = self._fall * (tau - tc * (1 - math.exp(-tau / tc)))
        swing = self._amp * math.sin(2 * math.pi * self._freq * tau + self._phase)
        u = self._p0[0] + self._drift * tau + swing
        v = self._p0[1] + fall + 0.25 * self._amp * abs(math.cos(2 * math.pi * self._freq * tau + self._phase))
        x, y = _px(self._grid, u, v)
        turn = 0.5 + 0.5 * abs(math.sin(2 * math.pi * 1.7 * self._freq * tau))
        _dot(img, x, y, self._size * (0.6 + 0.4 * turn), self._grey)


def leaf(**kw: Any) -> Leaf:
    """A leaf drifting down at 0.5-2 m/s with a sideways swing (from the seed)."""
    return Leaf(**kw)


@dataclass(slots=True)
class Rain:
    """Rain streaks near the lens: see :func:`rain`."""

    drops_per_frame: int = 80
    fps: float = 15.0
    exposure_s: float = 1 / 60
    truth_kind: str = "rain"
    _rng: Rng | None = field(default=None, repr=False)
    _drops: list[list[float]] = field(default_factory=list)  # x, y, vx, vy, frames_left, grey
    _w: int = 0
    _h: int = 0
    _last_t: float | None = None

    def reset(self, rng: Rng, scene: Scene, t0: float) -> Truth:
        self._rng = rng
        self._drops = []
        self._w, self._h = scene.width, scene.height
        self._last_t = None
        return Truth(self.truth_kind, False)

    def _spawn(self) -> list[float]:
        assert self._rng is not None
        r = self._rng
        return [float(r.uniform(0, self._w)), float(r.uniform(-0.1, 1.0)) * self._h,
                float(r.uniform(-60, 60)), float(r.uniform(700, 1600)), float(r.integers(2, 6)),
                float(r.integers(35, 70))]

    def draw(self, img: Image, t: float) -> None:
        dt = 1.0 / self.fps if self._last_t is None else t - self._last_t
        self._last_t = t
        alive = []
        for d in self._drops:
            d[0] += d[2] * dt
            d[1] += d[3] * dt
            d[4] -= 1
            if d[4] > 0 and d[1] < self._h + 40:
                alive.append(d)
        while len(alive) < self.drops_per_frame:
            alive.append(self._spawn())
        self._drops = alive
        overlay = np.zeros(img.shape[:2], dtype=np.uint8)
        for x, y, vx, vy, _, grey in self._drops:
            half = self.exposure_s / 2
            _streak(overlay, (x - vx * half, y - vy * half), (x + vx * half, y + vy * half), 1.0, int(grey))
        if img.ndim == 3:
            cv2.add(img, cv2.cvtColor(overlay, cv2.COLOR_GRAY2BGR), dst=img)
        else:
            cv2.add(img, overlay, dst=img)


def rain(drops_per_frame: int = 80, fps: float = 15.0, **kw: Any) -> Rain:
    """Rain: ``drops_per_frame`` bright thin streaks (700-1600 px/s, nearly vertical, constant speed, each
    alive 2-5 frames), pass the sequence's ``fps`` so streaks move the right distance per frame."""
    return Rain(drops_per_frame, fps, **kw)


@dataclass(slots=True)
class Insect:
    """An insect near the lens: see :func:`insect`."""

    start_after_s: float = 0.3
    duration_s: float = 6.0
    truth_kind: str = "insect"
    _rng: Rng | None = field(default=None, repr=False)
    _pos: list[float] = field(default_factory=lambda: [0.0, 0.0])
    _vel: list[float] = field(default_factory=lambda: [0.0, 0.0])
    _home: tuple[float, float] = (0.0, 0.0)
    _radius: float = 8.0
    _grey: int = 60
    _last_t: float | None = None
    _w: int = 0
    _h: int = 0

    def reset(self, rng: Rng, scene: Scene, t0: float) -> Truth:
        self._rng = rng
        self._w, self._h = scene.width, scene.height
        self._home = (float(rng.uniform(0.2, 0.8)) * scene.width, float(rng.uniform(0.2, 0.8)) * scene.height)
        self._pos = list(self._home)
        self._vel = [0.0, 0.0]
        self._radius = float(rng.uniform(5.0, 12.0))
        self._grey = int(rng.integers(40, 90))
        self._last_t = None
        return Truth(self.truth_kind, False)

    def draw(self, img: Image, t: float) -> None:
        assert self._rng is not None
        tau = t - self.start_after_s
        if not 0.0 <= tau <= self.duration_s:
            self._last_t = None
            return
        dt = 0.0 if self._last_t is None else t - self._last_t
        self._last_t = t
        # Erratic: random kicks of up to a few thousand px/s², pulled back towards its home (a lamp, a web).
        kick = self._rng.normal(0.0, 2500.0, 2) * math.sqrt(max(dt, 1e-6)) * 10
        for i in range(2):
            self._vel[i] += (kick[i] - 4.0 * (self._pos[i] - self._home[i])) * dt
            self._vel[i] *= 0.9
            self._pos[i] += self._vel[i] * dt
        x, y, r = self._pos[0], self._pos[1], self._radius
        x1, y1 = max(0, int(x - 3 * r)), max(0, int(y - 3 * r))
        x2, y2 = min(self._w, int(x + 3 * r) + 1), min(self._h, int(y + 3 * r) + 1)
        if x2 <= x1 or y2 <= y1:
            return
        patch = img[y1:y2, x1:x2]
        blob = np.zeros(patch.shape[:2], dtype=np.float32)
        cv2.circle(blob, (_fixed(x - x1), _fixed(y - y1)), _fixed(r), 1.0, -1, cv2.LINE_AA, _SHIFT)
        alpha = 0.6 * np.asarray(cv2.GaussianBlur(blob, (0, 0), r / 2), dtype=np.float32)
        if patch.ndim == 3:
            alpha = alpha[:, :, None]
        patch[:] = (patch * (1 - alpha) + self._grey * alpha).astype(np.uint8)


def insect(**kw: Any) -> Insect:
    """An insect near the lens: a blurred 10-24 px blob on an erratic path around one spot."""
    return Insect(**kw)


@dataclass(slots=True)
class PersonAtWindow:
    """A figure at a window: see :func:`person_at_window`."""

    floor: int
    column: int
    start_after_s: float = 0.5
    duration_s: float = 6.0
    truth_kind: str = "person_at_window"
    _grid: FacadeGrid | None = field(default=None, repr=False)
    _u: float = 0.0
    _v: float = 0.0
    _cw: float = 3.0
    _ch: float = 3.0
    _sway_hz: float = 0.3
    _hand_hz: float = 1.0
    _grey: int = 50

    def reset(self, rng: Rng, scene: Scene, t0: float) -> Truth:
        self._grid = scene.grid()
        row_from_top = scene.top_floor - self.floor
        if not (0 <= row_from_top < scene.floors and 1 <= self.column <= scene.columns):
            raise ValueError(f"cell ({self.floor}, {self.column}) is not on the façade")
        self._cw, self._ch = scene.column_width_m, scene.floor_height_m
        self._u = (self.column - 0.5) * self._cw
        self._v = (row_from_top + 0.55) * self._ch
        self._sway_hz = float(rng.uniform(0.2, 0.6))
        self._hand_hz = float(rng.uniform(0.6, 1.5))
        self._grey = int(rng.integers(30, 80))
        return Truth(self.truth_kind, False, (self.floor, self.column))

    def draw(self, img: Image, t: float) -> None:
        assert self._grid is not None
        tau = t - self.start_after_s
        if not 0.0 <= tau <= self.duration_s:
            return
        sway = 0.15 * self._cw * math.sin(2 * math.pi * self._sway_hz * tau)
        u = self._u + sway
        head = _px(self._grid, u, self._v - 0.12 * self._ch)
        body_top, body_bottom = _px(self._grid, u, self._v), _px(self._grid, u, self._v + 0.25 * self._ch)
        floor_px = abs(_px(self._grid, u, self._v + self._ch)[1] - _px(self._grid, u, self._v)[1])
        _dot(img, head[0], head[1], 0.18 * floor_px, self._grey)
        _streak(img, body_top, body_bottom, 0.22 * floor_px, self._grey)
        # A hand shaking something out of the window: down and up by a third of the storey, inside the cell.
        hand_v = self._v + 0.05 * self._ch + 0.3 * self._ch * (0.5 - 0.5 * math.cos(2 * math.pi * self._hand_hz * tau))
        hand = _px(self._grid, u + 0.25 * self._cw, hand_v)
        _dot(img, hand[0], hand[1], max(3.0, 0.08 * floor_px), self._grey)


def person_at_window(floor: int, column: int, **kw: Any) -> PersonAtWindow:
    """A figure appearing in the window of ``(floor, column)``, swaying, a hand moving down and up inside the
    cell (shaking out a cloth), never leaving it."""
    return PersonAtWindow(floor, column, **kw)


# --------------------------------------------------------------------------------------------- sequences


@dataclass(slots=True)
class SynthSequence:
    """Frames of ``scene`` with ``actors``, ``duration_s`` long at ``fps``, from ``seed``.

    :meth:`frames` yields ``(frame, t)`` with ``t = t0 + k / fps``; iterate again for the same frames.
    :attr:`truths` is filled by :meth:`frames` (one per actor, in order)."""

    scene: Scene
    actors: Sequence[Actor]
    duration_s: float
    fps: float = 15.0
    seed: int = 0
    t0: float = 1000.0
    truths: list[Truth] = field(default_factory=list)

    @property
    def frame_count(self) -> int:
        return round(self.duration_s * self.fps)

    def frames(self) -> Iterator[tuple[Image, float]]:
        root = np.random.default_rng(self.seed)
        self.truths = [a.reset(np.random.default_rng(root.integers(2**63)), self.scene, self.t0)
                       for a in self.actors]
        background = _background(self.scene)
        if not self.scene.color:
            background = np.asarray(cv2.cvtColor(background, cv2.COLOR_BGR2GRAY), dtype=np.uint8)
        noise = _noise_bank(self.scene.height, self.scene.width, self.scene.noise_sigma, self.seed)
        for k in range(self.frame_count):
            t = k / self.fps
            img = background.copy()
            for a in self.actors:
                a.draw(img, t)
            n = noise[int(root.integers(len(noise)))]
            if img.ndim == 3:
                out = cv2.add(img.astype(np.int16), cv2.merge([n, n, n]))
            else:
                out = cv2.add(img.astype(np.int16), n)
            yield np.asarray(np.clip(out, 0, 255), dtype=np.uint8), self.t0 + t

    @property
    def expected(self) -> list[Truth]:
        """The truths that should alarm (after :meth:`frames` has run)."""
        return [t for t in self.truths if t.should_alarm]


def _noise_bank(h: int, w: int, sigma: float, seed: int, size: int = 12) -> list[npt.NDArray[np.int16]]:
    rng = np.random.default_rng(seed + 1_000_003)
    return [np.asarray(np.round(rng.normal(0.0, sigma, (h, w))), dtype=np.int16) for _ in range(size)]


@dataclass(frozen=True, slots=True)
class RunResult:
    """Alarms of one run with the index of the frame that decided each, and the frames fed."""

    alarms: list[tuple[int, ThrownAlarm]]
    frames: int
    stats: dict[str, int | bool]


def run(detector: ThrownObjectDetector, seq: SynthSequence,
        on_frame: Callable[[int, ThrownObjectDetector], None] | None = None) -> RunResult:
    """Feed every frame of ``seq`` to ``detector``; ``on_frame(k, detector)`` after each (for state checks)."""
    alarms: list[tuple[int, ThrownAlarm]] = []
    k = -1
    for k, (frame, t) in enumerate(seq.frames()):
        alarms.extend((k, a) for a in detector.update(frame, t))
        if on_frame is not None:
            on_frame(k, detector)
    return RunResult(alarms, k + 1, detector.stats())


def frame_index(seq: SynthSequence, t: float) -> float:
    """The (fractional) frame index of absolute time ``t`` in ``seq``."""
    return (t - seq.t0) * seq.fps
