"""Objects thrown from height (高空抛物): the pure detection core for a façade camera looking up.

A pure core: every decoded frame (grey or BGR, uint8) and its monotonic time in, :class:`ThrownAlarm` s out.
No I/O, no clock, no threads; the daemon feeds it at the camera's full frame rate (10-25 fps) and turns an
alarm into an event with a clip.

Why full rate: an object dropped from the 10th floor reaches the ground in about 2.4 s and crosses a floor in a
tenth of a second near the bottom; at the 5 fps of the detection path it would be a handful of unrelated
points. Nothing here runs a model: the object is a few pixels, unknown in kind (a bottle, a brick, a knife).
What tells it apart is **physics**: once released, it falls with the acceleration of gravity.

Per frame (the 2-core development box, quiet, with a falling object and a bird in view): 1.6 ms at the
median (p99 4.7 ms) for a 1280x720 grey region of interest, 1.9 ms from BGR, 0.4 ms with ``downscale=2``;
0.5 ms for 640x360; heavy rain (150 streaks a frame) 3.5 ms and 2.1 ms. Nearly all of it is the OpenCV calls
of steps 2 and 3. At 25 fps a 1280x720 façade costs about 4 % of one core:

1. **Region of interest**: the façade's quad's bounding box grown by ``roi_margin`` (objects fall below the
   lowest floor in view and are thrown out sideways), or the spec's explicit ``roi``; a numpy view, no copy.
2. **Background subtraction**: grey (BGR is converted), an optional integer downscale, a 3x3 box blur, the
   absolute difference against a running-average background, thresholded at ``threshold`` grey levels. A
   running average, not OpenCV's MOG2 (present in OpenCV 5.1): MOG2 costs 22 ms per 1280x720 grey frame here
   (36 ms on BGR), ten times the whole path, and its strength (multimodal backgrounds: swaying trees,
   flicker) matters little on a wall. The background learns with a time constant of ``background_s``
   seconds (so the frame rate does not change it) and **selectively**: pixels that are foreground in this
   frame (grown by ``protect_px``) are not learned, except on every ``absorb_every``-th frame. Without that, an
   object that moves a pixel or less per frame (the first tenths of a second of a fall, near the top of a
   tall façade) leaves a comet tail of half-learned background that joins it to where it was held, and its
   centroid lags; an object held out of a window for a second leaves a ghost where it rested. Something that
   really stays (a window opened, a light switched on) is still absorbed, ``absorb_every`` times slower.
   For ``warmup_s`` after a start or a recalibration the detector is blind (counted in ``warmup_frames``):
   it learns everything with a time constant of a quarter of that, so that what the first frame held (a rain
   streak, a bird) does not stay as a ghost. When more than ``recalibrate_frac`` of the region changes at
   once (lights, infrared switch, the camera moved), the background is reset to the frame, tracks end and
   the warm-up starts again (counted in ``recalibrations``).
3. **Blobs**: the outer contours of the changed pixels (``cv2.findContours`` costs 0.1 ms on 1280x720 where
   ``connectedComponentsWithStats`` costs 3-5 ms), kept when their pixel count is within
   ``min_blob_px..max_blob_px``; the centroid is the changed pixels' centroid.
4. **Tracks**: each track predicts its next position with a constant-acceleration alpha-beta-gamma filter
   whose acceleration is clipped to twice the largest accepted one (at the façade's largest scale): a blob
   jittering in place at 25 fps would otherwise build an acceleration that throws the prediction across the
   frame after a short gap, where it catches anything. Blobs are assigned to tracks greedily, nearest first,
   within a gate of ``gate_px`` plus ``gate_step_frac`` of the predicted step (a one-point track, with no
   velocity yet, gates at ``max_speed_px_s``; tracks of three points or more choose first). A blob left
   over starts a track.
5. **Classification** of every track that has moved: see below. An alarm is decided on the frame the evidence
   becomes sufficient, once per track.

What tells a throw from the rest
--------------------------------

Every point is mapped, through the perspective transform of the façade quad, onto the **façade plane in
metres** (``floor_height_m`` per floor, ``column_width_m`` per column). There the vertical position of a
falling object is ``v(t) = v0 + b t + a t^2 / 2`` with ``a`` the acceleration of gravity whatever the
perspective (a camera looking up compresses the upper floors: in image pixels the same fall accelerates more
near the bottom). The fit is on the track's **fall**: walking back from the last point while each earlier
point is no lower (within 1.5 px; one-frame spikes of the centroid, a rain streak merged into the blob, are
smoothed out by a 3-point median first) gives the descending tail, and in it the last point within 1.5 px of
its highest one is where the object left its rest (held out of a window) or the top of its flight (thrown
up). Points at rest before it would bias ``a`` down; a blob jittering in place and then one unrelated blob
has a tail of two or three points. The fit leaves out up to ``max_outliers`` points whose leave-one-out
residual exceeds ``outlier_px``. A track alarms when, on its fall (up to ``max_lead_trim`` leading points may
be dropped, for the frames where the object was still merged with the hand or the ghost of where it rested):

* it has at least ``min_points`` points and has descended at least ``min_fall_floors`` floors (from its
  highest point to its last one); a person moving at a window never leaves the window's cell;
* the least-squares fit of ``v(t)`` gives ``a`` within ``accel_band_g`` x 9.81 m/s² (default 0.4..1.6 g: a
  real object is slowed by drag, and one thrown off a balcony, in front of the façade plane, looks up to
  ~20 % faster through perspective). Leaves and paper drift down at a near-constant 0.5-2 m/s (``a`` ~ 0);
  rain streaks fall at constant speed (``a`` ~ 0); a bird gliding down keeps its speed, one pulling up
  decelerates (``a`` < 0);
* the band holds not only ``a`` but ``a`` +- ``accel_sigmas`` standard errors of the fit: a short or noisy
  track cannot decide. This matters most high on the façade, where a floor is a dozen pixels and a pixel of
  centroid wobble (a bird's wing beat, aliased by the frame rate into a slow swing) is a tenth of a metre;
* the fitted horizontal acceleration is at most ``max_horizontal_g`` g (a thrown object keeps its horizontal
  speed; a leaf swings, an insect or a bird changes course);
* the fit explains the observed points to within ``max_residual_px`` pixels RMS in the image (the fitted
  points are mapped back into the image): a flapping, undulating or erratic path does not fit a parabola;
* the fit without the last point predicts the last point within ``max_predict_px``: a fit carried by one or
  two far points is not a trajectory;
* nothing the track did just before its fall (the trimmed points and the three before) was higher than the
  fitted release point: a released object was held there or rose to it, while a bird whose aliased wingbeat
  slowed its descent for a moment, then sped it up again, came from above;
* all of this still holds ``confirm_frames`` track points after it first held (passing need not be on
  consecutive frames).

Each of these is re-checked on every frame a candidate track grows, so that the alarm comes on the first
frame the evidence suffices; the ``accel_sigmas`` interval (with its centroid-noise floor,
``min_centroid_px``) and the confirmation are what keep these repeated looks from finding, sooner or later,
a lucky stretch in a bird's path. Birds were the hardest distractor here: at 10 fps a wingbeat near 10 Hz
is aliased into a slow swing of the centroid that, over the 0.8 s of a one-storey fall, can look exactly
like a fall from rest.

What it cannot tell: a bird that drops off a ledge and dives with folded wings for more than a floor looks
like a falling object; a very light object (a plastic bag, a sheet of paper) falls with ``a`` far below g and
is rejected like a leaf; an object falling behind another moving object may be lost for a few frames (a gap
up to ``max_gap_s`` is bridged). Fits are on the façade plane: an object falling well in front of it (thrown
far out) has its acceleration and origin scaled by perspective.

Rain mode: heavy rain gives dozens of short, thin, near-vertical streaks per frame. When a frame has at least
``rain_blobs`` blobs, the detector is in rain mode for ``rain_hold_s``: streak-shaped blobs (taller than
``streak_aspect`` times their width, at most ``streak_max_width_px`` wide) start no new tracks, so rain does
not fill the track table while a real object, which starts slow and compact, still starts its track; tracks
already running may take any blob. Rain streaks that are tracked fall at constant speed and never alarm.

Origin: the release point is where the fitted vertical velocity is zero (``t* = -b / a``) when that time is at
or before the fall's first point (the object was dropped, or thrown down, and first seen some frames after
release: hidden by a balcony, the colour of the glass behind it, merged with the hand). The first sighting is
always lower than the release point; for the common case, dropped or tossed sideways, the zero-velocity point
*is* the release point, found even when the first metre or two of the fall were not seen. The backtrack is
limited to ``max_backtrack_s`` (an object thrown down hard would otherwise be put floors too high; one thrown
down at ``w`` m/s is put ``w^2 / 2g`` high, 0.1 m at 1.5 m/s). An object thrown upward is fitted from the top
of its flight, which is then its origin: ``w^2 / 2g`` above the hand, 0.2 m at 2 m/s, within the window's
cell unless thrown hard from near its top. When ``t*`` comes out after the first point (noise on an object
that started at rest) the first point is the origin. The origin is reported in frame pixels and as a
``(floor, column)`` cell of the façade grid (``None`` when outside the quad).

Bounded memory (caps, and what is dropped, each counted in :meth:`ThrownObjectDetector.stats`):

* at most ``max_tracks`` tracks. A blob that needs a new track when the table is full evicts the track seen
  longest ago that was not updated this frame, preferring one that is not currently accelerating downward;
  when every track was updated this frame, the blob is dropped (``blobs_untracked``);
* at most ``max_points`` points per track (the oldest are dropped, ``points_dropped``): 160 points is 6.4 s at
  25 fps, longer than any fall in view. A track older than ``max_track_s`` ends (``tracks_expired``);
* at most ``max_blobs`` blobs per frame are considered (the largest first); the rest are dropped
  (``blobs_dropped``), which also bounds the cost of a frame. A blizzard of more blobs than that can hide a
  small object (400 by default; the heaviest synthetic rain, 150 streaks, gives ~100);
* at most ``max_recent_alarms`` recent alarms are kept for de-duplication: a new track whose first point lies
  within ``dedupe_px`` of where a recent alarm's fit puts its object at that time (within ``dedupe_s``) is
  the same object picked up again after a lost frame, and does not alarm twice (``alarms_deduped``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

G_M_S2 = 9.81
_F = npt.NDArray[np.float64]
Point = tuple[float, float]
OriginFrom = Literal["zero_velocity", "first_point"]


# --------------------------------------------------------------------------------------------- configuration


def _finite(what: str, value: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class FacadeSpec:
    """Where the façade is in the frame and how it is divided into floors and windows.

    * ``quad``: the four corners of the façade's window grid in the frame, in this order: **top-left,
      top-right, bottom-right, bottom-left** as seen in the image (top = the highest floor in view). The top
      edge of the top floor and the bottom edge of the lowest floor in view, the left edge of the leftmost
      column and the right edge of the rightmost one. Normalized (0..1 of the frame's width and height, the
      same convention as the camera's zones, slightly outside allowed for a façade that leaves the frame,
      -0.5..1.5) when ``normalized`` (default), frame pixels otherwise.
    * ``floors``, ``columns``: the grid's rows and columns (at least 1 each).
    * ``bottom_floor``: the floor number of the lowest row in view (default 1: the ground floor is 1, as
      floors are counted in China); the top row is ``bottom_floor + floors - 1``. Columns are numbered 1..N
      from the left as seen by the camera.
    * ``floor_height_m`` (default 3.0 m, a Chinese residential storey is 2.8-3.0 m): the scale that turns
      pixels into metres, hence the expected acceleration of a falling object.
    * ``column_width_m`` (default 3.0 m): only scales the horizontal-acceleration check; approximate is fine.
    * ``roi``: ``(x1, y1, x2, y2)`` of the part of the frame to watch (same units as ``quad``); default: the
      quad's bounding box grown by ``roi_margin`` (default 0.15) of its width and height on every side, so
      objects thrown out sideways and falling below the lowest floor in view stay in sight.
    """

    quad: tuple[Point, Point, Point, Point]
    floors: int
    columns: int
    bottom_floor: int = 1
    floor_height_m: float = 3.0
    column_width_m: float = 3.0
    normalized: bool = True
    roi: tuple[float, float, float, float] | None = None
    roi_margin: float = 0.15

    def __post_init__(self) -> None:
        if len(self.quad) != 4:
            raise ValueError(f"quad needs 4 corners (top-left, top-right, bottom-right, bottom-left), "
                             f"got {len(self.quad)}")
        pts: list[Point] = []
        for name, p in zip(("top-left", "top-right", "bottom-right", "bottom-left"), self.quad, strict=True):
            if len(p) != 2:
                raise ValueError(f"quad {name} corner must be [x, y], got {p!r}")
            x, y = _finite(f"quad {name} x", p[0]), _finite(f"quad {name} y", p[1])
            if self.normalized and not (-0.5 <= x <= 1.5 and -0.5 <= y <= 1.5):
                raise ValueError(f"quad {name} corner {list(p)} is not normalized (0..1 of the frame); "
                                 "for frame pixels set normalized=False")
            pts.append((x, y))
        tl, tr, br, bl = pts
        if not (tl[0] < tr[0] and bl[0] < br[0]):
            raise ValueError("quad: the right corners must be right of the left ones (order: top-left, "
                             "top-right, bottom-right, bottom-left)")
        if not (tl[1] < bl[1] and tr[1] < br[1]):
            raise ValueError("quad: the bottom corners must be below the top ones (order: top-left, "
                             "top-right, bottom-right, bottom-left)")
        crosses = []
        for i in range(4):
            (ax, ay), (bx, by), (cx, cy) = pts[i], pts[(i + 1) % 4], pts[(i + 2) % 4]
            crosses.append((bx - ax) * (cy - by) - (by - ay) * (cx - bx))
        if not (all(c > 0 for c in crosses) or all(c < 0 for c in crosses)):
            raise ValueError(f"quad {pts} is not a convex quadrilateral in the order top-left, top-right, "
                             "bottom-right, bottom-left")
        if not isinstance(self.floors, int) or isinstance(self.floors, bool) or not 1 <= self.floors <= 300:
            raise ValueError(f"floors must be an integer 1..300, got {self.floors!r}")
        if not isinstance(self.columns, int) or isinstance(self.columns, bool) or not 1 <= self.columns <= 500:
            raise ValueError(f"columns must be an integer 1..500, got {self.columns!r}")
        if (not isinstance(self.bottom_floor, int) or isinstance(self.bottom_floor, bool)
                or not -20 <= self.bottom_floor <= 300):
            raise ValueError(f"bottom_floor must be an integer -20..300, got {self.bottom_floor!r}")
        if not 0.5 <= _finite("floor_height_m", self.floor_height_m) <= 20.0:
            raise ValueError(f"floor_height_m must be 0.5..20 m, got {self.floor_height_m}")
        if not 0.1 <= _finite("column_width_m", self.column_width_m) <= 50.0:
            raise ValueError(f"column_width_m must be 0.1..50 m, got {self.column_width_m}")
        if not 0.0 <= _finite("roi_margin", self.roi_margin) <= 2.0:
            raise ValueError(f"roi_margin must be 0..2 (a fraction of the quad's size), got {self.roi_margin}")
        if self.roi is not None:
            if len(self.roi) != 4:
                raise ValueError(f"roi must be (x1, y1, x2, y2), got {self.roi!r}")
            x1, y1, x2, y2 = (_finite("roi", v) for v in self.roi)
            if not (x1 < x2 and y1 < y2):
                raise ValueError(f"roi must have x1 < x2 and y1 < y2, got {self.roi!r}")

    def grid(self, frame_w: int, frame_h: int) -> FacadeGrid:
        """The façade's mapping for frames of this size."""
        return FacadeGrid(self, frame_w, frame_h)


class FacadeGrid:
    """The façade quad of a :class:`FacadeSpec` in one frame size: image pixels <-> façade metres <-> cells.

    Façade metres: ``u`` across from the quad's left edge, ``v`` **down** from its top edge (so a falling
    object's ``v`` grows, like an image row)."""

    def __init__(self, spec: FacadeSpec, frame_w: int, frame_h: int) -> None:
        if frame_w < 8 or frame_h < 8:
            raise ValueError(f"frame size {frame_w}x{frame_h} is too small")
        self.spec = spec
        self.frame_w, self.frame_h = frame_w, frame_h
        sx, sy = (float(frame_w), float(frame_h)) if spec.normalized else (1.0, 1.0)
        quad = np.array([(x * sx, y * sy) for x, y in spec.quad], dtype=np.float32)
        self.quad_px = quad
        self.width_m = spec.columns * spec.column_width_m
        self.height_m = spec.floors * spec.floor_height_m
        dst = np.array([(0, 0), (self.width_m, 0), (self.width_m, self.height_m), (0, self.height_m)],
                       dtype=np.float32)
        self._to_m: _F = np.asarray(cv2.getPerspectiveTransform(quad, dst), dtype=np.float64)
        self._to_px: _F = np.asarray(np.linalg.inv(self._to_m), dtype=np.float64)
        # The smallest floor in the image: below two pixels per floor no origin can be told apart.
        left_h = float(np.hypot(*(quad[3] - quad[0]))) / spec.floors
        right_h = float(np.hypot(*(quad[2] - quad[1]))) / spec.floors
        if min(left_h, right_h) < 2.0:
            raise ValueError(f"the façade quad gives {min(left_h, right_h):.1f} px per floor in a "
                             f"{frame_w}x{frame_h} frame: at least 2 px per floor are needed")
        # Mean pixels per metre down the façade's centre line: sizes the first-step gate and the report.
        self.px_per_m = float(np.hypot(*((quad[2] + quad[3]) / 2 - (quad[0] + quad[1]) / 2))) / self.height_m
        corners = [(0.0, self.height_m), (self.width_m / 2, self.height_m), (self.width_m, self.height_m),
                   (0.0, 0.0), (self.width_m, 0.0)]
        self.max_px_per_m = max(self.px_per_m_at(u, v) for u, v in corners)
        if spec.roi is None:
            x1, y1 = quad.min(axis=0)
            x2, y2 = quad.max(axis=0)
            mx, my = (x2 - x1) * spec.roi_margin, (y2 - y1) * spec.roi_margin
            box = (x1 - mx, y1 - my, x2 + mx, y2 + my)
        else:
            box = (spec.roi[0] * sx, spec.roi[1] * sy, spec.roi[2] * sx, spec.roi[3] * sy)
        rx1, ry1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
        rx2, ry2 = min(frame_w, math.ceil(box[2])), min(frame_h, math.ceil(box[3]))
        if rx2 - rx1 < 8 or ry2 - ry1 < 8:
            raise ValueError(f"the region of interest {box} has almost no pixels inside the {frame_w}x{frame_h} "
                             "frame")
        self.roi: tuple[int, int, int, int] = (rx1, ry1, rx2, ry2)

    def to_m(self, points_px: _F) -> _F:
        """``(N, 2)`` image pixels -> ``(N, 2)`` façade metres ``(u, v)``."""
        if len(points_px) == 0:
            return np.zeros((0, 2), dtype=np.float64)
        out = cv2.perspectiveTransform(np.asarray(points_px, dtype=np.float64).reshape(-1, 1, 2), self._to_m)
        return np.asarray(out, dtype=np.float64).reshape(-1, 2)

    def to_px(self, points_m: _F) -> _F:
        """``(N, 2)`` façade metres -> ``(N, 2)`` image pixels."""
        if len(points_m) == 0:
            return np.zeros((0, 2), dtype=np.float64)
        out = cv2.perspectiveTransform(np.asarray(points_m, dtype=np.float64).reshape(-1, 1, 2), self._to_px)
        return np.asarray(out, dtype=np.float64).reshape(-1, 2)

    def px_per_m_at(self, u_m: float, v_m: float) -> float:
        """Image pixels per metre of height on the façade at a façade point (perspective changes it)."""
        ends = self.to_px(np.array([[u_m, v_m - 0.5], [u_m, v_m + 0.5]], dtype=np.float64))
        return max(1e-6, float(np.hypot(*(ends[1] - ends[0]))))

    def px_per_m_many(self, points_m: _F) -> _F:
        """:meth:`px_per_m_at` for ``(N, 2)`` façade points at once."""
        pts = np.asarray(points_m, dtype=np.float64)
        half = np.array([0.0, 0.5])
        ends = self.to_px(np.vstack([pts - half, pts + half]))
        n = len(pts)
        return np.asarray(np.maximum(1e-6, np.hypot(*(ends[n:] - ends[:n]).T)), dtype=np.float64)

    def cell_of_m(self, u_m: float, v_m: float) -> tuple[int, int] | None:
        """``(floor, column)`` of a façade point, ``None`` outside the grid."""
        if not (0.0 <= u_m < self.width_m and 0.0 <= v_m < self.height_m):
            return None
        row_from_top = int(v_m // self.spec.floor_height_m)
        column = int(u_m // self.spec.column_width_m) + 1
        return self.spec.bottom_floor + self.spec.floors - 1 - row_from_top, column

    def cell_of(self, x_px: float, y_px: float) -> tuple[int, int] | None:
        """``(floor, column)`` of an image point, ``None`` outside the quad."""
        u, v = self.to_m(np.array([[x_px, y_px]], dtype=np.float64))[0]
        return self.cell_of_m(float(u), float(v))

    def cell_centre_px(self, floor: int, column: int) -> Point:
        """The image point at the centre of a cell (for tests, drawing and installers)."""
        row_from_top = self.spec.bottom_floor + self.spec.floors - 1 - floor
        if not (0 <= row_from_top < self.spec.floors and 1 <= column <= self.spec.columns):
            raise ValueError(f"cell (floor {floor}, column {column}) is not on the façade")
        u = (column - 0.5) * self.spec.column_width_m
        v = (row_from_top + 0.5) * self.spec.floor_height_m
        x, y = self.to_px(np.array([[u, v]], dtype=np.float64))[0]
        return float(x), float(y)


@dataclass(frozen=True, slots=True)
class ThrownParams:
    """Tuning of :class:`ThrownObjectDetector`; the defaults suit a 640x360 to 1280x720 façade view at
    10-25 fps with 20-60 px per floor. Units in the names; pixels are full-resolution frame pixels."""

    downscale: int = 1
    """Integer factor the region of interest is shrunk by (area averaging) before subtraction. 1 keeps objects
    of 3-4 px visible; 2 halves the cost on a 1080p view where objects are bigger."""
    blur_px: int = 1
    """Box-blur radius before differencing: removes pixel noise and compression speckle (0 = none)."""
    threshold: int = 18
    """Grey levels of difference from the background that count as change: about 6 sigma of a good camera's
    daytime noise after the blur; lower finds fainter objects and more noise."""
    background_s: float = 2.0
    """Time constant of the background, in seconds: a slow change (clouds, dusk, a shadow moving) is
    followed within a few seconds and stays under the threshold."""
    warmup_s: float = 1.0
    """Blind time after a start or a recalibration while the background is built (see the docstring)."""
    protect_px: int = 2
    """Foreground pixels, grown by this many pixels (the anti-aliased rim of an object), are not learned."""
    absorb_every: int = 8
    """On every n-th frame the whole region is learned, foreground included, so that a lasting change is
    absorbed (n times slower than the rest of the background) instead of being foreground for ever."""
    recalibrate_frac: float = 0.25
    """More than this fraction of the region changed at once: lights, infrared switch, camera moved; the
    background restarts from this frame."""
    min_blob_px: int = 3
    """Smallest blob, in changed pixels: a 2x2 object after the blur; smaller is noise."""
    max_blob_px: int = 2500
    """Largest blob, in changed pixels: a 50x50 patch; larger is a person, a curtain, a moving shadow."""
    max_blobs: int = 400
    """Blobs considered per frame (largest first); bounds the cost of a frame of heavy rain or snow."""
    rain_blobs: int = 25
    """A frame with at least this many blobs puts the detector in rain mode (see the module's docstring)."""
    rain_hold_s: float = 2.0
    """Rain mode lasts this long after the last frame that had ``rain_blobs`` blobs."""
    streak_aspect: float = 3.0
    """In rain mode, a blob at least this many times taller than wide ..."""
    streak_max_width_px: int = 3
    """... and at most this wide is a rain streak: it starts no track."""
    max_tracks: int = 48
    """Tracks kept at once (cap; see the eviction policy in the module's docstring)."""
    max_points: int = 160
    """Points kept per track (the oldest are dropped): 6.4 s at 25 fps, longer than a fall in view."""
    max_gap_s: float = 0.35
    """A track not seen for longer ends: bridges an object hidden by a balcony slab for a few frames."""
    max_track_s: float = 12.0
    """A track older than this ends (a flicker or a ghost would otherwise hold a slot for ever)."""
    gate_px: float = 6.0
    """Association gate around a track's predicted position, in pixels: centroid noise plus blob shape change."""
    gate_step_frac: float = 0.35
    """Added to the gate, as a fraction of the predicted step: faster objects blur and jitter more."""
    max_speed_px_s: float = 1500.0
    """Gate for a track's second point (no velocity known yet), in pixels per second: a track first seen at
    speed (after an occlusion, thrown down) must still catch its next point."""
    min_points: int = 8
    """Points a track needs before it can be judged: three make a parabola, eight leave enough to measure its
    error; a fall of one floor from rest already spans eight frames at 10 fps."""
    min_fall_floors: float = 1.0
    """Descent, in floors, a track needs before it can alarm: 0.78 s after a release from rest with 3 m
    floors. The main guard against a hand or a person at a window; lower it and latency drops with
    confidence."""
    accel_band_g: tuple[float, float] = (0.4, 1.6)
    """Accepted downward acceleration on the façade plane, in g: drag slows real objects, perspective makes
    objects falling in front of the façade look faster."""
    max_horizontal_g: float = 0.4
    """Largest fitted horizontal acceleration, in g: a thrown object keeps its horizontal speed."""
    max_residual_px: float = 2.5
    """Largest RMS distance, in image pixels, between the track and its fitted parabola."""
    max_predict_px: float = 6.0
    """The fit without the last point must predict the last point within this many pixels."""
    accel_sigmas: float = 3.0
    """The fitted acceleration +- this many standard errors must lie inside ``accel_band_g``: three, not two,
    because the test is repeated on every frame of a track's life."""
    max_outliers: int = 2
    """Points a fit may leave out (see ``_fit``): a rain streak merged into the object's blob for a frame."""
    outlier_px: float = 3.0
    """A point farther than this from the first fit, in image pixels, may be left out."""
    min_centroid_px: float = 0.5
    """Centroid noise, in pixels, that the acceleration's standard error assumes at least (see ``_fit``)."""
    confirm_frames: int = 2
    """The alarm waits until the fit passes again at least this many track points after it first passed,
    with those points in it: a stretch of a bird's path that happened to look like a fall rarely still does
    with more of the path. Costs 0.2 s at 10 fps, 0.08 s at 25. Passing need not be on consecutive frames:
    one rain streak merged into the object's blob makes one frame fail."""
    max_lead_trim: int = 2
    """Leading points the fit may drop (the object still merged with the hand or its ghost)."""
    max_backtrack_s: float = 1.0
    """How far back in time the origin may be extrapolated to the zero-velocity point: a track picked up late
    (the object hidden by a balcony at first) still finds its floor; an object thrown down at ``w`` m/s is
    put ``w^2 / 2g`` too high (0.5 m at 3 m/s) up to ``w`` x this / 2."""
    dedupe_s: float = 5.0
    """How long an alarm's fit is kept to recognise the same object picked up by a new track."""
    dedupe_px: float = 30.0
    """How close, in pixels, a new track's first point must be to a recent alarm's fitted path."""
    max_recent_alarms: int = 16
    """Recent alarms kept for de-duplication (cap; the oldest is dropped)."""

    def __post_init__(self) -> None:
        ints = {"downscale": (self.downscale, 1, 8), "blur_px": (self.blur_px, 0, 5),
                "threshold": (self.threshold, 1, 254), "min_blob_px": (self.min_blob_px, 1, 10**6),
                "max_blob_px": (self.max_blob_px, 1, 10**7), "max_blobs": (self.max_blobs, 1, 10**5),
                "rain_blobs": (self.rain_blobs, 1, 10**5), "streak_max_width_px": (self.streak_max_width_px, 1, 100),
                "max_tracks": (self.max_tracks, 1, 10**4), "max_points": (self.max_points, 8, 10**5),
                "min_points": (self.min_points, 4, 10**4), "max_lead_trim": (self.max_lead_trim, 0, 100),
                "confirm_frames": (self.confirm_frames, 0, 100), "max_outliers": (self.max_outliers, 0, 100),
                "max_recent_alarms": (self.max_recent_alarms, 1, 10**4),
                "protect_px": (self.protect_px, 0, 20), "absorb_every": (self.absorb_every, 1, 10**4)}
        for name, (value, least, most) in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
                raise ValueError(f"{name} must be an integer {least}..{most}, got {value!r}")
        if self.min_blob_px > self.max_blob_px:
            raise ValueError(f"min_blob_px {self.min_blob_px} is above max_blob_px {self.max_blob_px}")
        if self.min_points > self.max_points:
            raise ValueError(f"min_points {self.min_points} is above max_points {self.max_points}")
        positive: dict[str, float] = {
            "rain_hold_s": self.rain_hold_s, "streak_aspect": self.streak_aspect, "max_gap_s": self.max_gap_s,
            "warmup_s": self.warmup_s, "max_track_s": self.max_track_s, "gate_px": self.gate_px,
            "max_speed_px_s": self.max_speed_px_s, "min_fall_floors": self.min_fall_floors,
            "max_horizontal_g": self.max_horizontal_g, "max_residual_px": self.max_residual_px,
            "max_predict_px": self.max_predict_px, "dedupe_px": self.dedupe_px,
            "min_centroid_px": self.min_centroid_px, "outlier_px": self.outlier_px}
        for name, number in positive.items():
            if _finite(name, number) <= 0:
                raise ValueError(f"{name} must be positive, got {number}")
        non_negative: dict[str, float] = {
            "accel_sigmas": self.accel_sigmas, "gate_step_frac": self.gate_step_frac,
            "max_backtrack_s": self.max_backtrack_s, "dedupe_s": self.dedupe_s}
        for name, number in non_negative.items():
            if _finite(name, number) < 0:
                raise ValueError(f"{name} must not be negative, got {number}")
        if not 0.01 <= _finite("background_s", self.background_s) <= 3600.0:
            raise ValueError(f"background_s must be 0.01..3600 s, got {self.background_s}")
        if not 0.0 < _finite("recalibrate_frac", self.recalibrate_frac) <= 1.0:
            raise ValueError(f"recalibrate_frac must be in (0, 1], got {self.recalibrate_frac}")
        low, high = (_finite("accel_band_g", v) for v in self.accel_band_g)
        if not 0.0 < low < high:
            raise ValueError(f"accel_band_g must be (low, high) with 0 < low < high, got {self.accel_band_g}")


# --------------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class ThrownFit:
    """The parabola fitted to an alarm's track.

    ``accel_m_s2`` / ``accel_g``: downward acceleration on the façade plane; ``accel_px_s2``: the same fit's
    acceleration converted with the façade's mean pixels per metre (what a reviewer sees on the image, about);
    ``horizontal_m_s2``: fitted horizontal acceleration; ``residual_px``: RMS distance in image pixels between
    the points and the fit; ``accel_se_m_s2``: standard error of the acceleration, ``accel_rel_se`` the same
    relative to it; ``points``:
    points used; ``fall_m``: descent observed from the highest fitted point to the last."""

    accel_m_s2: float
    accel_g: float
    accel_px_s2: float
    horizontal_m_s2: float
    residual_px: float
    accel_se_m_s2: float
    accel_rel_se: float
    points: int
    fall_m: float


@dataclass(frozen=True, slots=True)
class ThrownAlarm:
    """An object falling from the façade, decided once per track.

    ``trajectory``: the track's points ``(t, x, y)`` (monotonic seconds, frame pixels) up to the decision;
    ``origin_px``: the release point in frame pixels (see the module's docstring for how it is chosen);
    ``origin_cell``: its ``(floor, column)`` on the façade grid, ``None`` outside the quad; ``origin_from``:
    ``"zero_velocity"`` (extrapolated to the fit's zero-velocity point) or ``"first_point"``;
    ``confidence``: 0..1, how squarely the fit sits inside the thresholds (for ranking and review, not a
    second threshold); ``first_seen_s``/``decided_s``: the track's first point and the frame that decided."""

    track_id: int
    trajectory: tuple[tuple[float, float, float], ...]
    origin_px: Point
    origin_cell: tuple[int, int] | None
    origin_from: OriginFrom
    fit: ThrownFit
    confidence: float
    first_seen_s: float
    decided_s: float

    @property
    def latency_s(self) -> float:
        """From the first sighting to the decision."""
        return self.decided_s - self.first_seen_s


# --------------------------------------------------------------------------------------------- tracks

# alpha-beta-gamma gains: fast enough to follow an object that starts at rest and accelerates at g, stable
# (inside 0 < alpha < 2, 0 < beta < 4 - 2 alpha, 0 < gamma < 4 alpha beta / (2 - alpha)).
_ALPHA, _BETA, _GAMMA = 0.6, 0.5, 0.05
# A point this close (in image pixels) to a track's highest point is still at rest: centroid jitter.
_REST_TOL_PX = 1.5


@dataclass(slots=True)
class _Track:
    id: int
    points: deque[tuple[float, float, float, float, float]]  # t, x, y (frame px), u, v (façade m)
    x: float
    y: float
    vx: float = 0.0
    vy: float = 0.0
    ax: float = 0.0
    ay: float = 0.0
    last_t: float = 0.0
    first_t: float = 0.0
    n: int = 1
    decided: bool = False
    first_pass_n: int = 0  # the track's update count when its fit first passed
    min_v: float = field(default=math.inf)

    def predict(self, t: float) -> tuple[float, float, float]:
        """Predicted position at ``t`` and the predicted step length (pixels)."""
        dt = t - self.last_t
        px = self.x + self.vx * dt + 0.5 * self.ax * dt * dt
        py = self.y + self.vy * dt + 0.5 * self.ay * dt * dt
        return px, py, math.hypot(px - self.x, py - self.y)

    def update(self, t: float, x: float, y: float, max_accel_px_s2: float) -> None:
        dt = t - self.last_t
        if self.n == 1:
            self.vx, self.vy = (x - self.x) / dt, (y - self.y) / dt
            self.x, self.y = x, y
        else:
            px, py, _ = self.predict(t)
            rx, ry = x - px, y - py
            self.vx += self.ax * dt + _BETA * rx / dt
            self.vy += self.ay * dt + _BETA * ry / dt
            # Clipped to what a falling object can do: the jitter of a blob that stands still, seen at 25 fps,
            # would otherwise make an acceleration that sends a prediction across the frame after a gap.
            lim = max_accel_px_s2
            self.ax = min(lim, max(-lim, self.ax + 2.0 * _GAMMA * rx / (dt * dt)))
            self.ay = min(lim, max(-lim, self.ay + 2.0 * _GAMMA * ry / (dt * dt)))
            self.x, self.y = px + _ALPHA * rx, py + _ALPHA * ry
        self.last_t = t
        self.n += 1

    @property
    def falling(self) -> bool:
        """Currently moving and accelerating down the image: worth keeping when the table is full."""
        return self.n >= 3 and self.vy > 0 and self.ay > 0


@dataclass(frozen=True, slots=True)
class _Recent:
    decided_s: float
    t0: float
    coef: _F  # (3, 2): rows 1, t, t^2/2; columns u, v (façade metres)


# --------------------------------------------------------------------------------------------- detector


class ThrownObjectDetector:
    """Full-rate detector of objects falling from a façade: ``update(frame, now_s)`` for every frame.

    ``frame``: uint8 grey (H x W) or BGR (H x W x 3), the whole camera frame (the region of interest is cut
    here); ``now_s``: monotonic seconds, strictly increasing. Returns the alarms decided on this frame
    (usually none). A frame of another size re-maps the façade and restarts the background (counted).
    """

    def __init__(self, spec: FacadeSpec, params: ThrownParams | None = None) -> None:
        self.spec = spec
        self.params = params or ThrownParams()
        self.grid: FacadeGrid | None = None
        self._background: npt.NDArray[np.float32] | None = None
        self._background_u8: npt.NDArray[np.uint8] | None = None
        self._tracks: list[_Track] = []
        self._recent: deque[_Recent] = deque(maxlen=self.params.max_recent_alarms)
        self._next_id = 1
        self._last_t: float | None = None
        self._rain_until = -math.inf
        self._blur = (2 * self.params.blur_px + 1, 2 * self.params.blur_px + 1)
        pp = self.params.protect_px
        self._protect: npt.NDArray[np.uint8] | None = (
            np.asarray(cv2.getStructuringElement(cv2.MORPH_RECT, (2 * pp + 1, 2 * pp + 1)), dtype=np.uint8)
            if pp > 0 else None)
        self._learned = 0
        self._background_t0 = 0.0
        self._max_accel_px_s2 = 0.0
        self._counts: dict[str, int] = dict.fromkeys((
            "frames", "warmup_frames", "recalibrations", "reconfigurations", "blobs", "blobs_dropped",
            "blobs_untracked", "streaks_ignored", "rain_frames", "tracks_started", "tracks_ended", "tracks_evicted",
            "tracks_expired", "points_dropped", "fits", "alarms", "alarms_deduped"), 0)

    # -- public

    def update(self, frame: npt.NDArray[np.uint8], now_s: float) -> list[ThrownAlarm]:
        """Feed one frame; the alarms decided on it."""
        if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] != 3):
            raise ValueError(f"expected a uint8 grey or BGR frame, got {frame.dtype} {frame.shape}")
        if not math.isfinite(now_s):
            raise ValueError(f"now_s must be finite, got {now_s}")
        if self._last_t is not None and now_s <= self._last_t:
            raise ValueError(f"frame times must increase: {now_s} after {self._last_t}")
        h, w = frame.shape[:2]
        if self.grid is None or (w, h) != (self.grid.frame_w, self.grid.frame_h):
            if self.grid is not None:
                self._counts["reconfigurations"] += 1
            self.grid = self.spec.grid(w, h)
            # Twice the fastest acceleration accepted, at the largest scale on the façade (its bottom).
            self._max_accel_px_s2 = 2.0 * self.params.accel_band_g[1] * G_M_S2 * self.grid.max_px_per_m
            self._reset_scene()
        self._counts["frames"] += 1
        dt = 0.0 if self._last_t is None else now_s - self._last_t
        self._last_t = now_s
        blobs = self._blobs(frame, self.grid, now_s, dt)
        alarms: list[ThrownAlarm] = []
        if blobs is not None:
            alarms = self._track(blobs, now_s, self.grid)
        return alarms

    def stats(self) -> dict[str, int | bool]:
        """Counters (see the module's docstring for the caps they count) and the current state's size."""
        out: dict[str, int | bool] = dict(self._counts)
        out["tracks"] = len(self._tracks)
        out["track_points"] = sum(len(t.points) for t in self._tracks)
        out["recent_alarms"] = len(self._recent)
        out["rain_mode"] = self._last_t is not None and self._last_t < self._rain_until
        return out

    @property
    def roi(self) -> tuple[int, int, int, int] | None:
        """The watched region ``(x1, y1, x2, y2)`` in frame pixels (known after the first frame)."""
        return None if self.grid is None else self.grid.roi

    # -- background subtraction

    def _reset_scene(self) -> None:
        self._background = None
        self._background_u8 = None
        self._end_all()

    def _end_all(self) -> None:
        self._counts["tracks_ended"] += len(self._tracks)
        self._tracks.clear()

    def _blobs(self, frame: npt.NDArray[np.uint8], grid: FacadeGrid, now_s: float, dt: float) -> _F | None:
        """Blobs of this frame as rows ``(x, y, w, h, pixels, u, v)`` (frame px, façade m), largest first;
        ``None`` when the frame only (re)started the background."""
        p = self.params
        x1, y1, x2, y2 = grid.roi
        view = frame[y1:y2, x1:x2]
        gray = cv2.cvtColor(view, cv2.COLOR_BGR2GRAY) if view.ndim == 3 else view
        f = p.downscale
        if f > 1:
            sh, sw = gray.shape[0] // f, gray.shape[1] // f
            gray = cv2.resize(gray[: sh * f, : sw * f], (sw, sh), interpolation=cv2.INTER_AREA)
        if p.blur_px > 0:
            gray = cv2.blur(gray, self._blur)
        gray = np.asarray(gray, dtype=np.uint8)
        if self._background is None or self._background_u8 is None:
            self._background = gray.astype(np.float32)
            self._background_u8 = gray.copy()
            self._background_t0 = now_s
            return None
        if now_s - self._background_t0 < p.warmup_s:
            # Warming up: learn everything, fast, and report nothing (whatever the first frame held must not
            # stay as a ghost).
            cv2.accumulateWeighted(gray, self._background, 1.0 - math.exp(-4.0 * dt / p.warmup_s))
            self._background_u8 = np.asarray(cv2.convertScaleAbs(self._background), dtype=np.uint8)
            self._counts["warmup_frames"] += 1
            return None
        diff = cv2.absdiff(gray, self._background_u8)
        _, mask = cv2.threshold(diff, p.threshold, 255, cv2.THRESH_BINARY)
        changed = cv2.countNonZero(mask)
        if changed > p.recalibrate_frac * mask.size:
            self._counts["recalibrations"] += 1
            self._background = gray.astype(np.float32)
            self._background_u8 = gray.copy()
            self._background_t0 = now_s
            self._end_all()
            return None
        alpha = 1.0 - math.exp(-min(dt, p.background_s) / p.background_s)
        self._learned += 1
        if changed == 0 or self._learned % p.absorb_every == 0:
            cv2.accumulateWeighted(gray, self._background, alpha)
        else:
            grown = cv2.dilate(mask, self._protect) if self._protect is not None else mask
            cv2.accumulateWeighted(gray, self._background, alpha, mask=cv2.bitwise_not(grown))
        self._background_u8 = np.asarray(cv2.convertScaleAbs(self._background), dtype=np.uint8)
        if changed == 0:
            return np.zeros((0, 7), dtype=np.float64)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        rects = np.array([cv2.boundingRect(c) for c in contours], dtype=np.int64).reshape(-1, 4)
        # Bounding-box area bounds the pixel count from above: drop the hopeless ones before measuring.
        scale2 = f * f
        min_px = max(1.0, p.min_blob_px / scale2)
        keep = rects[:, 2] * rects[:, 3] >= min_px
        rects = rects[keep]
        rows: list[tuple[float, float, float, float, float]] = []
        for bx, by, bw, bh in rects.tolist():
            m = cv2.moments(mask[by:by + bh, bx:bx + bw], binaryImage=True)
            pixels = m["m00"]
            if pixels < min_px or pixels * scale2 > p.max_blob_px:
                continue
            cx, cy = bx + m["m10"] / pixels + 0.5, by + m["m01"] / pixels + 0.5
            rows.append((x1 + cx * f, y1 + cy * f, float(bw * f), float(bh * f), float(pixels * scale2)))
        self._counts["blobs"] += len(rows)
        if not rows:
            return np.zeros((0, 7), dtype=np.float64)
        arr = np.array(rows, dtype=np.float64)
        if len(arr) > p.max_blobs:
            self._counts["blobs_dropped"] += len(arr) - p.max_blobs
            arr = arr[np.argsort(-arr[:, 4], kind="stable")[: p.max_blobs]]
        return np.hstack([arr, grid.to_m(arr[:, :2])])

    # -- tracking

    def _track(self, blobs: _F, now: float, grid: FacadeGrid) -> list[ThrownAlarm]:
        p = self.params
        if len(blobs) >= p.rain_blobs:
            self._rain_until = now + p.rain_hold_s
        rain = now < self._rain_until
        if rain:
            self._counts["rain_frames"] += 1
        # End tracks not seen for too long, or too old (a ghost or a flicker would hold a slot for ever).
        alive: list[_Track] = []
        for tr in self._tracks:
            if now - tr.last_t > p.max_gap_s:
                self._counts["tracks_ended"] += 1
            elif now - tr.first_t > p.max_track_s:
                self._counts["tracks_expired"] += 1
                self._counts["tracks_ended"] += 1
            else:
                alive.append(tr)
        self._tracks = alive
        n_blobs = len(blobs)
        assigned = np.zeros(n_blobs, dtype=bool)
        updated: list[_Track] = []
        if self._tracks and n_blobs:
            preds = np.empty((len(self._tracks), 2), dtype=np.float64)
            gates = np.empty(len(self._tracks), dtype=np.float64)
            for i, tr in enumerate(self._tracks):
                px, py, step = tr.predict(now)
                preds[i] = (px, py)
                if tr.n == 1:
                    gates[i] = p.gate_px + p.max_speed_px_s * (now - tr.last_t)
                else:
                    gates[i] = p.gate_px + p.gate_step_frac * step
            d = np.hypot(preds[:, None, 0] - blobs[None, :, 0], preds[:, None, 1] - blobs[None, :, 1])
            ti, bi = np.nonzero(d <= gates[:, None])
            if len(ti):
                # Tracks with a velocity (three points or more) choose first, nearest pair first: a fresh
                # track, gated wide, must not take the next point of an object already being followed.
                young = np.array([self._tracks[i].n < 3 for i in ti.tolist()])
                order = np.lexsort((d[ti, bi], young))
                track_done = np.zeros(len(self._tracks), dtype=bool)
                for k in order.tolist():
                    a, b = int(ti[k]), int(bi[k])
                    if track_done[a] or assigned[b]:
                        continue
                    track_done[a] = assigned[b] = True
                    tr = self._tracks[a]
                    self._add_point(tr, now, blobs[b])
                    updated.append(tr)
        updated_ids = {tr.id for tr in updated}
        for b in np.flatnonzero(~assigned).tolist():
            row = blobs[b]
            if rain and row[2] <= p.streak_max_width_px and row[3] >= p.streak_aspect * row[2]:
                self._counts["streaks_ignored"] += 1
                continue
            if len(self._tracks) >= p.max_tracks and not self._evict(updated_ids):
                self._counts["blobs_untracked"] += 1
                continue
            tr = _Track(id=self._next_id, points=deque(maxlen=p.max_points), x=float(row[0]), y=float(row[1]),
                        last_t=now, first_t=now)
            tr.points.append((now, float(row[0]), float(row[1]), float(row[5]), float(row[6])))
            tr.min_v = float(row[6])
            self._next_id += 1
            self._tracks.append(tr)
            updated_ids.add(tr.id)
            self._counts["tracks_started"] += 1
        alarms: list[ThrownAlarm] = []
        min_fall_m = p.min_fall_floors * self.spec.floor_height_m
        for tr in updated:
            if tr.decided or len(tr.points) < p.min_points or tr.points[-1][4] - tr.min_v < min_fall_m:
                continue
            alarm = self._judge(tr, now, grid)
            if alarm is not None:
                alarms.append(alarm)
        return alarms

    def _add_point(self, tr: _Track, now: float, row: _F) -> None:
        if len(tr.points) == tr.points.maxlen:
            self._counts["points_dropped"] += 1
        tr.update(now, float(row[0]), float(row[1]), self._max_accel_px_s2)
        tr.points.append((now, float(row[0]), float(row[1]), float(row[5]), float(row[6])))
        tr.min_v = min(tr.min_v, float(row[6]))

    def _evict(self, keep_ids: set[int]) -> bool:
        candidates = [t for t in self._tracks if t.id not in keep_ids]
        if not candidates:
            return False
        victim = min(candidates, key=lambda t: (t.falling, t.last_t))
        self._tracks.remove(victim)
        self._counts["tracks_evicted"] += 1
        self._counts["tracks_ended"] += 1
        return True

    # -- classification

    def _judge(self, tr: _Track, now: float, grid: FacadeGrid) -> ThrownAlarm | None:
        p = self.params
        pts = np.array(tr.points, dtype=np.float64)
        min_fall_m = p.min_fall_floors * self.spec.floor_height_m
        self._counts["fits"] += 1
        start = _fall_start(pts, grid)
        for trim in range(p.max_lead_trim + 1):
            sub = pts[start + trim:]
            if len(sub) < p.min_points or sub[-1, 4] - sub[:, 4].min() < min_fall_m:
                return None
            fit = _fit(sub, grid, p)
            if fit is None:
                continue
            coef, thrown_fit = fit
            if not self._passes(thrown_fit) or not self._predicts_last(sub, grid):
                continue
            origin_m, origin_from = self._origin(sub, coef)
            # The points just before the fit (the trimmed ones and the last few before the fall): further
            # back a track may have followed something else (a bird, before it lost it to this object).
            if not _nothing_above(pts[max(0, start - 3): start + trim], float(origin_m[1]), grid):
                continue
            if tr.first_pass_n == 0:
                tr.first_pass_n = tr.n
            if tr.n - tr.first_pass_n < p.confirm_frames:
                return None
            tr.decided = True
            t0 = float(sub[0, 0])
            if self._duplicate(t0, sub[0, 1:3], grid):
                self._counts["alarms_deduped"] += 1
                return None
            self._recent.append(_Recent(decided_s=now, t0=t0, coef=coef))
            origin_px = grid.to_px(origin_m.reshape(1, 2))[0]
            self._counts["alarms"] += 1
            return ThrownAlarm(
                track_id=tr.id,
                trajectory=tuple((float(t), float(x), float(y)) for t, x, y in pts[:, :3].tolist()),
                origin_px=(float(origin_px[0]), float(origin_px[1])),
                origin_cell=grid.cell_of_m(float(origin_m[0]), float(origin_m[1])),
                origin_from=origin_from, fit=thrown_fit, confidence=self._confidence(thrown_fit),
                first_seen_s=float(pts[0, 0]), decided_s=now)
        return None

    def _passes(self, fit: ThrownFit) -> bool:
        p = self.params
        low, high = p.accel_band_g
        spread = p.accel_sigmas * fit.accel_se_m_s2 / G_M_S2
        return (low <= fit.accel_g - spread and fit.accel_g + spread <= high
                and abs(fit.horizontal_m_s2) <= p.max_horizontal_g * G_M_S2
                and fit.residual_px <= p.max_residual_px)

    def _predicts_last(self, sub: _F, grid: FacadeGrid) -> bool:
        """The parabola through all points but the last must predict the last one: a fit carried by one far
        point (a blob jittering in place, then one unrelated blob after a gap) fails this."""
        held = _fit(sub[:-1], grid, self.params)
        if held is None:
            return False
        dt = float(sub[-1, 0] - sub[0, 0])
        where_m = np.array([1.0, dt, 0.5 * dt * dt]) @ held[0]
        where_px = grid.to_px(where_m.reshape(1, 2))[0]
        return float(np.hypot(*(where_px - sub[-1, 1:3]))) <= self.params.max_predict_px

    def _confidence(self, fit: ThrownFit) -> float:
        """How far inside the thresholds the fit sits: 1 for an acceleration known exactly at the band's middle
        with a perfect fit, 0 for an interval touching the band's edge."""
        p = self.params
        low, high = p.accel_band_g
        spread = p.accel_sigmas * fit.accel_se_m_s2 / G_M_S2
        margin = min(fit.accel_g - spread - low, high - fit.accel_g - spread) / ((high - low) / 2)
        fit_q = 1.0 - fit.residual_px / p.max_residual_px
        return float(min(1.0, max(0.0, math.sqrt(max(0.0, margin)) * (0.5 + 0.5 * fit_q))))

    def _duplicate(self, t0: float, first_px: _F, grid: FacadeGrid) -> bool:
        p = self.params
        for r in self._recent:
            if t0 - r.decided_s > p.dedupe_s or t0 < r.t0:
                continue
            dt = t0 - r.t0
            where_m = np.array([1.0, dt, 0.5 * dt * dt]) @ r.coef
            where_px = grid.to_px(where_m.reshape(1, 2))[0]
            if float(np.hypot(*(where_px - first_px))) <= p.dedupe_px:
                return True
        return False

    def _origin(self, sub: _F, coef: _F) -> tuple[_F, OriginFrom]:
        b, a = float(coef[1, 1]), float(coef[2, 1])
        t_star = -b / a
        if t_star <= 0.0:
            tb = max(t_star, -self.params.max_backtrack_s)
            return np.array([1.0, tb, 0.5 * tb * tb]) @ coef, "zero_velocity"
        return sub[0, 3:5].copy(), "first_point"


def _fall_start(pts: _F, grid: FacadeGrid) -> int:
    """Index of the point the fall is fitted from.

    A fall is a descent that never goes back up: walking back from the last point while each earlier point
    is no lower (within ``_REST_TOL_PX`` pixels, in metres at that point) gives the descending tail; a blob
    jittering in place, then one far blob, has a tail of two or three points. In that tail, the last point
    within the tolerance of its highest one is where the object left its rest (held out, on a sill) or its
    apex (thrown upward): the points at rest before it would bias the fitted acceleration down.
    """
    # One point pulled up by a rain streak merged into the blob must neither end the descent nor become its
    # top: inner points are de-spiked, the last one is taken no higher than the one before.
    v = _despiked(pts[:, 4])
    if len(v) >= 2:
        v[-1] = max(v[-1], v[-2])
    tol = _REST_TOL_PX / grid.px_per_m_many(pts[:, 3:5])
    i = len(pts) - 1
    while i > 0 and v[i - 1] <= v[i] + tol[i]:
        i -= 1
    top = int(i + np.argmin(v[i:]))
    return top + int(np.flatnonzero(v[top:] <= v[top] + tol[top])[-1])


def _nothing_above(before: _F, origin_v_m: float, grid: FacadeGrid) -> bool:
    """No point the track had just before its fall was higher than the release point (within 3 px; single
    points pulled up by a merged rain streak do not count): a released object was held there, or rose to it. A
    bird
    whose aliased wingbeat slowed its descent for a moment, and then sped it up again, was higher before its
    "release"."""
    if len(before) == 0:
        return True
    tol = 2 * _REST_TOL_PX / grid.px_per_m_many(before[:, 3:5])
    return bool(np.all(_despiked(before[:, 4]) >= origin_v_m - tol))


def _despiked(v: _F) -> _F:
    """``v`` with each inner value replaced by the median of it and its two neighbours: a one-frame jump of
    the centroid (a rain streak merged into the blob) goes, a real change of course stays."""
    out = v.copy()
    if len(v) >= 3:
        out[1:-1] = np.median(np.stack([v[:-2], v[1:-1], v[2:]]), axis=0)
    return out


def _fit(sub: _F, grid: FacadeGrid, params: ThrownParams) -> tuple[_F, ThrownFit] | None:
    """Least-squares ``u(t)``, ``v(t)`` parabolas on façade metres (``t`` from the first point of ``sub``);
    ``None`` when degenerate.

    Outliers: after a first fit, up to ``max_outliers`` points farther than ``outlier_px`` from it in the image
    (the worst first) are left out and the fit is made again. A rain streak crossing the object merges into its
    blob and moves the centroid by a few pixels for one frame; one such point would otherwise fail a true fall.

    The acceleration's standard error comes from the residuals, but never below what a centroid noise of
    ``min_centroid_px`` (in metres at each point) gives: eight residuals can be small by chance, or smooth (a
    wingbeat aliased by the frame rate bends a bird's path slowly), and then they would vouch for a precision
    the pixels cannot have."""
    t = sub[:, 0] - sub[0, 0]
    design = np.column_stack([np.ones_like(t), t, 0.5 * t * t])
    keep = np.ones(len(sub), dtype=bool)
    for attempt in range(2):
        n = int(keep.sum())
        if n <= 3:
            return None
        coef, _res, rank, _sv = np.linalg.lstsq(design[keep], sub[keep, 3:5], rcond=None)
        if rank < 3:
            return None
        fitted = design @ coef
        off_px = np.hypot(*(grid.to_px(fitted) - sub[:, 1:3]).T)
        if attempt == 1 or params.max_outliers == 0:
            break
        # Judged by the leave-one-out residual (the residual over 1 - leverage): a wrong first or last point
        # pulls the parabola towards itself and hides in an ordinary residual.
        kept = design[keep]
        leverage = np.einsum("ij,jk,ik->i", kept, np.linalg.inv(kept.T @ kept), kept)
        scale = np.ones(len(sub))
        scale[keep] = 1.0 / np.maximum(1e-3, 1.0 - leverage)
        loo_px = off_px * scale
        worst = np.argsort(-loo_px)[: params.max_outliers]
        worst = worst[loo_px[worst] > params.outlier_px]
        if len(worst) == 0:
            break
        keep[worst] = False
    used = sub[keep]
    rss_v = float(np.sum((used[:, 4] - fitted[keep, 1]) ** 2))
    cov = np.linalg.inv(design[keep].T @ design[keep])
    noise_m2 = float(np.mean((params.min_centroid_px / grid.px_per_m_many(used[:, 3:5])) ** 2))
    se_a = math.sqrt(max(rss_v / (n - 3), noise_m2) * float(cov[2, 2]))
    accel = float(coef[2, 1])
    residual_px = float(np.sqrt(np.mean(off_px[keep] ** 2)))
    rel_se = se_a / accel if accel > 0 else math.inf
    return coef, ThrownFit(
        accel_m_s2=accel, accel_g=accel / G_M_S2, accel_px_s2=accel * grid.px_per_m,
        horizontal_m_s2=float(coef[2, 0]), residual_px=residual_px, accel_se_m_s2=se_a, accel_rel_se=rel_se,
        points=n, fall_m=float(used[-1, 4] - used[:, 4].min()))


__all__ = ["G_M_S2", "FacadeGrid", "FacadeSpec", "ThrownAlarm", "ThrownFit", "ThrownObjectDetector",
           "ThrownParams"]
