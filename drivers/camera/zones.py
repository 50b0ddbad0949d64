"""Zones and lines per camera: enter, leave, loiter and occupancy counts; directional line crossings.

A pure core: confirmed track snapshots (:class:`~edgeagent.drivers.camera.tracker.Track`), the frame size and
the time in, :class:`RuleHit` s out. Zones and lines are given in normalized coordinates (0..1 of the frame's
width and height) so the detection sub-stream and the main stream share them; they are scaled to the frame
size passed with each update.

Policies:

* **Anchor**: a track is where its box's **bottom-centre** is: the feet of a person, the wheels of a car, the
  point that touches the ground plane the zones are drawn on. A box's centre would put a tall person's
  position a metre above the ground and let a car in the next lane "enter" a parking bay.
* **Inside** is the even-odd rule (concave and self-touching polygons work as drawn).
* **Hysteresis**: entering needs the anchor inside the polygon by at least a margin, leaving needs it
  outside by at least the margin, for ``enter_updates`` / ``leave_updates`` consecutive observed updates.
  The margin is ``edge_margin_frac`` of the box's height (a detector's box jitter grows with the object),
  at least ``edge_margin_px``. A track jittering on an edge therefore enters at most once and does not
  leave until it really goes.
* **Observed**: only a track matched by a detection in this update moves the state (a coasting track's box
  is a prediction; a stationary one does not move). Dwell and loiter run on the clock for every live track.
* **Filters** (``classes``, ``min_score`` against the track's best score, ``min_area_frac`` of the frame
  area against its current box) gate entering and counting a line crossing; leaving is judged by position
  alone, so a track that entered always leaves.
* **Loiter** fires once per stay, ``loiter_s`` after the stay began.
* **Occupancy**: the tracks inside, per class, reported (one hit per class) whenever a class's count changes.
* **Track end**: pass every live confirmed track at every update; a track that was inside a zone and is no
  longer passed leaves with ``reason='lost'``.
* **Lines** are segments, not infinite lines. The side of the anchor is the sign of the cross product of
  ``b - a`` and ``anchor - a``, with a dead-band of ``line_deadband_frac`` of the box height (at least
  ``line_deadband_px``) where the side is unknown. A crossing is a change of known side whose path (from the
  last point on the old side to the first on the new one) cuts the segment between ``a`` and ``b``; passing
  beside an end is not a crossing. ``names[0]`` (a_to_b) is a crossing from the left of the directed
  segment a->b to its right **as seen on the screen** (for a->b pointing right, that is moving down the
  image); ``names[1]`` the other way. A track is counted at most once per direction until it is counted
  crossing back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from edgeagent.drivers.camera.tracker import Track
from edgeagent.models.types import Box

_F = npt.NDArray[np.float64]
Point = tuple[float, float]
RuleKind = Literal["zone_enter", "zone_leave", "zone_loiter", "zone_occupancy", "line_cross"]


def _check_point(what: str, p: Sequence[float]) -> Point:
    if len(p) != 2 or not all(math.isfinite(v) and -1e-9 <= v <= 1 + 1e-9 for v in p):
        raise ValueError(f"{what}: a point must be [x, y] with both in 0..1 (normalized), got {list(p)}")
    return float(p[0]), float(p[1])


@dataclass(frozen=True, slots=True)
class ZoneSpec:
    """A polygon zone. ``points`` normalized (0..1); ``classes`` None means every class."""

    name: str
    points: tuple[Point, ...]
    classes: frozenset[str] | None = None
    min_score: float = 0.0
    min_area_frac: float = 0.0
    loiter_s: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a zone needs a name")
        pts = tuple(_check_point(f"zone {self.name!r}", p) for p in self.points)
        if len(pts) < 3:
            raise ValueError(f"zone {self.name!r}: a polygon needs at least 3 points, got {len(pts)}")
        if self.loiter_s is not None and self.loiter_s <= 0:
            raise ValueError(f"zone {self.name!r}: loiter_s must be positive, got {self.loiter_s}")
        object.__setattr__(self, "points", pts)


@dataclass(frozen=True, slots=True)
class LineSpec:
    """A directed segment from ``a`` to ``b`` (normalized); ``names``: (a_to_b name, b_to_a name)."""

    name: str
    a: Point
    b: Point
    classes: frozenset[str] | None = None
    min_score: float = 0.0
    min_area_frac: float = 0.0
    names: tuple[str, str] = ("a_to_b", "b_to_a")

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a line needs a name")
        a, b = _check_point(f"line {self.name!r}", self.a), _check_point(f"line {self.name!r}", self.b)
        if a == b:
            raise ValueError(f"line {self.name!r}: a and b are the same point")
        if len(self.names) != 2 or self.names[0] == self.names[1] or not all(self.names):
            raise ValueError(f"line {self.name!r}: names must be two different direction names, got {self.names}")
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)


@dataclass(frozen=True, slots=True)
class RuleHit:
    """One thing a zone or line saw.

    ``count``: for ``zone_occupancy`` the tracks of ``label`` now inside, for ``line_cross`` the total in
    ``direction``; ``counts``: the zone's occupancy per class after this hit, or the line's totals per
    direction; ``occupancy``: for zone hits, all tracks inside the zone after this hit. ``dwell_s``: time
    inside, for leave and loiter. ``reason``: ``'lost'`` for a leave caused by the track ending (``box`` and
    ``score`` are then the track's last known). ``track_id`` and ``box`` are None for occupancy hits only.
    """

    kind: RuleKind
    name: str
    at_s: float
    track_id: int | None = None
    label: str = ""
    score: float = 0.0
    box: Box | None = None
    direction: str | None = None
    count: int = 0
    counts: tuple[tuple[str, int], ...] = ()
    dwell_s: float | None = None
    reason: str | None = None
    occupancy: int = 0


@dataclass(slots=True)
class _Stay:
    label: str
    score: float
    box: Box
    inside: bool = False
    streak: int = 0
    streak_since_s: float = 0.0
    entered_s: float = 0.0
    loitered: bool = False


@dataclass(slots=True)
class _LineTrack:
    side: int = 0
    point: Point = (0.0, 0.0)
    last_counted: str | None = None


@dataclass(slots=True)
class _ZoneState:
    spec: ZoneSpec
    stays: dict[int, _Stay] = field(default_factory=dict)
    occupancy: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _LineState:
    spec: LineSpec
    tracks: dict[int, _LineTrack] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)


class ZoneRules:
    """The zones and lines of one camera. See the module docstring for the policies."""

    def __init__(
        self,
        zones: Sequence[ZoneSpec] = (),
        lines: Sequence[LineSpec] = (),
        *,
        enter_updates: int = 1,
        leave_updates: int = 2,
        edge_margin_frac: float = 0.1,
        edge_margin_px: float = 2.0,
        line_deadband_frac: float = 0.1,
        line_deadband_px: float = 2.0,
    ) -> None:
        names = [z.name for z in zones]
        if len(set(names)) != len(names):
            raise ValueError(f"zone names must be unique: {names}")
        line_names = [ln.name for ln in lines]
        if len(set(line_names)) != len(line_names):
            raise ValueError(f"line names must be unique: {line_names}")
        if enter_updates < 1 or leave_updates < 1:
            raise ValueError("enter_updates and leave_updates must be at least 1")
        self._zones = [_ZoneState(z) for z in zones]
        self._lines = [_LineState(ln, totals=dict.fromkeys(ln.names, 0)) for ln in lines]
        self._enter_updates, self._leave_updates = enter_updates, leave_updates
        self._edge_margin_frac, self._edge_margin_px = edge_margin_frac, edge_margin_px
        self._line_deadband_frac, self._line_deadband_px = line_deadband_frac, line_deadband_px
        self._scaled_for: tuple[int, int] | None = None
        self._polygons: list[_F] = []
        self._segments: list[tuple[Point, Point]] = []

    def with_specs(self, zones: Sequence[ZoneSpec], lines: Sequence[LineSpec]) -> ZoneRules:
        """New rules with these zones and lines (an installer redrew some), the same policies: a zone or line whose
        spec is unchanged keeps its state (who is inside, loiter timers, crossing totals); a new or redrawn one
        starts empty, so the tracks already inside a redrawn zone enter it at the next update."""
        out = ZoneRules(zones, lines, enter_updates=self._enter_updates, leave_updates=self._leave_updates,
                        edge_margin_frac=self._edge_margin_frac, edge_margin_px=self._edge_margin_px,
                        line_deadband_frac=self._line_deadband_frac, line_deadband_px=self._line_deadband_px)
        old_zones = {z.spec: z for z in self._zones}
        old_lines = {ln.spec: ln for ln in self._lines}
        out._zones = [old_zones.get(z.spec, z) for z in out._zones]
        out._lines = [old_lines.get(ln.spec, ln) for ln in out._lines]
        return out

    def occupancy(self, zone: str) -> dict[str, int]:
        """Tracks inside ``zone`` per class (classes with none left out)."""
        for z in self._zones:
            if z.spec.name == zone:
                return _inside_counts(z)
        raise KeyError(zone)

    def zones_of(self, track_id: int) -> frozenset[str]:
        """The zones a track is inside of (as debounced), for an event that wants to say where it is."""
        return frozenset(z.spec.name for z in self._zones if (s := z.stays.get(track_id)) is not None and s.inside)

    def line_counts(self, line: str) -> dict[str, int]:
        """Crossings of ``line`` per direction name since the start."""
        for ln in self._lines:
            if ln.spec.name == line:
                return dict(ln.totals)
        raise KeyError(line)

    def update(self, tracks: Sequence[Track], frame_w: int, frame_h: int, now_s: float, *,
               ended: Sequence[Track] = ()) -> list[RuleHit]:
        """Every live confirmed track of this update (tentative ones are ignored) -> what zones and lines saw.

        ``ended``: the tracks the tracker ended in this update (optional: a track that stops being passed is
        taken as ended anyway)."""
        if frame_w <= 0 or frame_h <= 0:
            raise ValueError(f"frame size must be positive, got {frame_w}x{frame_h}")
        self._scale(frame_w, frame_h)
        ended_ids = {t.id for t in ended}
        live = sorted((t for t in tracks if t.confirmed and t.id not in ended_ids), key=lambda t: t.id)
        frame_area = float(frame_w * frame_h)
        anchors = np.array([((t.box[0] + t.box[2]) / 2.0, t.box[3]) for t in live], dtype=np.float64).reshape(-1, 2)
        heights = np.array([max(0.0, t.box[3] - t.box[1]) for t in live], dtype=np.float64)
        margins = np.maximum(self._edge_margin_px, self._edge_margin_frac * heights)
        hits: list[RuleHit] = []
        live_ids = {t.id for t in live}
        for zone, poly in zip(self._zones, self._polygons, strict=True):
            inside = _inside_even_odd(anchors, poly)
            dist = _distance_to_edges(anchors, poly)
            deep_in = inside & (dist >= margins)
            deep_out = ~inside & (dist >= margins)
            self._zone_update(zone, live, deep_in.tolist(), deep_out.tolist(), frame_area, now_s, hits)
            for tid in sorted(set(zone.stays) - live_ids):
                stay = zone.stays.pop(tid)
                if stay.inside:
                    hits.append(_zone_hit(zone, "zone_leave", now_s, tid, stay, dwell_s=now_s - stay.entered_s,
                                          reason="lost"))
            self._occupancy(zone, now_s, hits)
        bands = np.maximum(self._line_deadband_px, self._line_deadband_frac * heights).tolist()
        for line, segment in zip(self._lines, self._segments, strict=True):
            self._line_update(line, segment, live, anchors, bands, frame_area, now_s, hits)
            for tid in set(line.tracks) - live_ids:
                del line.tracks[tid]
        return hits

    # -- internals --------------------------------------------------------------------------------------

    def _scale(self, frame_w: int, frame_h: int) -> None:
        if self._scaled_for == (frame_w, frame_h):
            return
        size = np.array([frame_w, frame_h], dtype=np.float64)
        self._polygons = [np.array(z.spec.points, dtype=np.float64) * size for z in self._zones]
        self._segments = [((ln.spec.a[0] * frame_w, ln.spec.a[1] * frame_h),
                           (ln.spec.b[0] * frame_w, ln.spec.b[1] * frame_h)) for ln in self._lines]
        self._scaled_for = (frame_w, frame_h)

    def _zone_update(self, zone: _ZoneState, live: list[Track], deep_in: list[bool], deep_out: list[bool],
                     frame_area: float, now_s: float, hits: list[RuleHit]) -> None:
        spec = zone.spec
        for t, is_in, is_out in zip(live, deep_in, deep_out, strict=True):
            stay = zone.stays.get(t.id)
            if t.matched:
                if stay is not None:
                    stay.score, stay.box = t.max_score, t.box
                if stay is None or not stay.inside:
                    candidate = is_in and _passes(spec.classes, spec.min_score, spec.min_area_frac, t, frame_area)
                    if candidate and stay is None:
                        stay = zone.stays[t.id] = _Stay(label=t.label, score=t.max_score, box=t.box)
                    if stay is not None:
                        _advance(stay, candidate, now_s)
                        if stay.streak >= self._enter_updates:
                            stay.inside, stay.streak, stay.loitered = True, 0, False
                            stay.entered_s = stay.streak_since_s
                            hits.append(_zone_hit(zone, "zone_enter", now_s, t.id, stay))
                        elif stay.streak == 0:
                            del zone.stays[t.id]
                            stay = None
                else:
                    _advance(stay, is_out, now_s)
                    if stay.streak >= self._leave_updates:
                        del zone.stays[t.id]
                        hits.append(_zone_hit(zone, "zone_leave", now_s, t.id, stay, dwell_s=now_s - stay.entered_s))
                        stay = None
            if (stay is not None and stay.inside and spec.loiter_s is not None and not stay.loitered
                    and now_s - stay.entered_s >= spec.loiter_s):
                stay.loitered = True
                hits.append(_zone_hit(zone, "zone_loiter", now_s, t.id, stay, dwell_s=now_s - stay.entered_s))

    def _occupancy(self, zone: _ZoneState, now_s: float, hits: list[RuleHit]) -> None:
        now = _inside_counts(zone)
        changed = sorted(c for c in set(now) | set(zone.occupancy) if now.get(c, 0) != zone.occupancy.get(c, 0))
        if not changed:
            return
        zone.occupancy = now
        counts = tuple(now.items())
        total = sum(now.values())
        for label in changed:
            hits.append(RuleHit("zone_occupancy", zone.spec.name, now_s, label=label, count=now.get(label, 0),
                                counts=counts, occupancy=total))

    def _line_update(self, line: _LineState, segment: tuple[Point, Point], live: list[Track], anchors: _F,
                     bands: list[float], frame_area: float, now_s: float, hits: list[RuleHit]) -> None:
        spec = line.spec
        (ax, ay), (bx, by) = segment
        dx, dy = bx - ax, by - ay
        length = math.hypot(dx, dy)
        # Signed distance from the infinite line; positive = right of a->b on the screen (y points down).
        signed = ((dx * (anchors[:, 1] - ay) - dy * (anchors[:, 0] - ax)) / length).tolist()
        points = anchors.tolist()
        for t, d, band, p in zip(live, signed, bands, points, strict=True):
            if not t.matched:
                continue
            side = 1 if d > band else -1 if d < -band else 0
            if side == 0:
                continue
            state = line.tracks.get(t.id)
            if state is None:
                line.tracks[t.id] = _LineTrack(side=side, point=(p[0], p[1]))
                continue
            if side == state.side:
                state.point = (p[0], p[1])
                continue
            through = _cuts_segment(state.point, (p[0], p[1]), (ax, ay), (bx, by))
            state.side, state.point = side, (p[0], p[1])
            if not through or not _passes(spec.classes, spec.min_score, spec.min_area_frac, t, frame_area):
                continue
            direction = spec.names[0] if side > 0 else spec.names[1]
            if state.last_counted == direction:
                continue
            state.last_counted = direction
            line.totals[direction] += 1
            hits.append(RuleHit("line_cross", spec.name, now_s, track_id=t.id, label=t.label, score=t.max_score,
                                box=t.box, direction=direction, count=line.totals[direction],
                                counts=tuple((n, line.totals[n]) for n in spec.names)))


def _advance(stay: _Stay, candidate: bool, now_s: float) -> None:
    if candidate:
        if stay.streak == 0:
            stay.streak_since_s = now_s
        stay.streak += 1
    else:
        stay.streak = 0


def _inside_counts(zone: _ZoneState) -> dict[str, int]:
    counts: dict[str, int] = {}
    for stay in zone.stays.values():
        if stay.inside:
            counts[stay.label] = counts.get(stay.label, 0) + 1
    return dict(sorted(counts.items()))


def _zone_hit(zone: _ZoneState, kind: RuleKind, now_s: float, track_id: int, stay: _Stay, *,
              dwell_s: float | None = None, reason: str | None = None) -> RuleHit:
    """A hit on a zone with the zone's occupancy as it is now (after this track's change)."""
    counts = _inside_counts(zone)
    return RuleHit(kind, zone.spec.name, now_s, track_id=track_id, label=stay.label, score=stay.score, box=stay.box,
                   counts=tuple(counts.items()), occupancy=sum(counts.values()), dwell_s=dwell_s, reason=reason)


def _passes(classes: frozenset[str] | None, min_score: float, min_area_frac: float, t: Track,
            frame_area: float) -> bool:
    if classes is not None and t.label not in classes:
        return False
    if t.max_score < min_score:
        return False
    area = max(0.0, t.box[2] - t.box[0]) * max(0.0, t.box[3] - t.box[1])
    return area >= min_area_frac * frame_area


def _inside_even_odd(points: _F, poly: _F) -> npt.NDArray[np.bool_]:
    """Even-odd rule for every point (n, 2) against one polygon (m, 2): a ray to +x crosses an odd number of
    edges. Edges are half-open in y, so a vertex on the ray is counted once."""
    if len(points) == 0:
        return np.zeros(0, dtype=bool)
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    px, py = points[:, 0:1], points[:, 1:2]
    straddles = (y1[None, :] > py) != (y2[None, :] > py)
    dy = np.where(y2 == y1, 1.0, y2 - y1)
    x_cross = x1[None, :] + (py - y1[None, :]) * ((x2 - x1) / dy)[None, :]
    crossings = np.count_nonzero(straddles & (px < x_cross), axis=1)
    return np.asarray(crossings % 2 == 1, dtype=bool)


def _distance_to_edges(points: _F, poly: _F) -> _F:
    """Distance from every point (n, 2) to the polygon's boundary (the nearest edge)."""
    if len(points) == 0:
        return np.zeros(0, dtype=np.float64)
    a = poly
    b = np.roll(poly, -1, axis=0)
    ab = b - a
    len2 = np.maximum((ab * ab).sum(axis=1), 1e-12)
    ap = points[:, None, :] - a[None, :, :]
    u = np.clip((ap * ab[None, :, :]).sum(axis=2) / len2[None, :], 0.0, 1.0)
    nearest = a[None, :, :] + u[:, :, None] * ab[None, :, :]
    d = np.hypot(points[:, None, 0] - nearest[:, :, 0], points[:, None, 1] - nearest[:, :, 1])
    return np.asarray(d.min(axis=1), dtype=np.float64)


def _cuts_segment(p0: Point, p1: Point, a: Point, b: Point) -> bool:
    """Whether the path p0->p1, whose ends lie on opposite sides of the line through a and b, crosses that
    line between a and b (inclusive)."""
    rx, ry = p1[0] - p0[0], p1[1] - p0[1]
    denom = (b[0] - a[0]) * ry - (b[1] - a[1]) * rx
    if denom == 0:
        return False
    u = ((p0[0] - a[0]) * ry - (p0[1] - a[1]) * rx) / denom
    return 0.0 <= u <= 1.0


__all__ = ["LineSpec", "RuleHit", "RuleKind", "ZoneRules", "ZoneSpec"]
