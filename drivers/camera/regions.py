"""Region proposal: which model-size squares of a frame go to the detector this tick.

A pure function. The detector is run on crops around what moved and around what is being tracked, not on
the whole frame: a 416 px crop of a 768x576 frame keeps people at full resolution (a whole frame resized
to 416 halves them) and a quiet scene sends nothing at all.

Policy:

* every box (motion or tracked) is clipped to the frame and grown by ``margin_frac`` of its size on each side
  (a tracked object moves between ticks; a motion box lags its object);
* a region is a square of side ``size`` (the model's input), or larger when what it must hold is larger
  (the engine resizes the crop to the model, so the object still fits whole); it is centred on what it
  holds and then **shifted**, never shrunk, to lie inside the frame. Where the side exceeds a frame
  dimension the region spans that whole dimension (the only case where it is not square); a frame smaller
  than ``size`` gives the whole frame;
* two groups are merged into one region when one region no larger than the bigger of the two, or than
  ``max_merge_scale`` x ``size``, can hold both (with the default 1.0 no object loses resolution by a merge;
  2.0 accepts halving it to save an inference, which suits a sub-stream whose objects are large for the
  model), or when their squares overlap by at least ``merge_overlap`` of the smaller one (two crops would
  mostly infer the same pixels); merging repeats until nothing merges;
* the result is sorted (top to bottom, left to right): the same boxes in any order give the same regions;
* more than ``max_regions`` regions cost more than one inference on a bigger crop: one region holding all
  of them is returned instead (the whole frame only when what moves spans it; a busy half of the frame
  still keeps more resolution than the whole frame resized).

Guarantees (property-tested): every input box, clipped to the frame, lies inside at least one region; every
region lies inside the frame; there are at most ``max_regions`` regions; coordinates are whole pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from edgeagent.models.types import Box

_IntBox = tuple[int, int, int, int]


def propose_regions(
    motion_boxes: Sequence[Box],
    tracked_boxes: Sequence[Box],
    frame_w: int,
    frame_h: int,
    size: int,
    *,
    max_regions: int = 4,
    margin_frac: float = 0.1,
    merge_overlap: float = 0.5,
    max_merge_scale: float = 1.0,
) -> list[Box]:
    """Regions (``x1, y1, x2, y2`` in frame pixels, whole numbers) covering the motion and tracked boxes.

    No boxes (or none inside the frame) give no regions."""
    if frame_w <= 0 or frame_h <= 0 or size <= 0:
        raise ValueError(f"frame {frame_w}x{frame_h} and region size {size} must be positive")
    if max_regions < 1:
        raise ValueError(f"max_regions must be at least 1, got {max_regions}")
    groups = sorted(
        g for g in (_grown(b, frame_w, frame_h, margin_frac) for b in (*motion_boxes, *tracked_boxes))
        if g is not None)
    if not groups:
        return []
    whole: Box = (0.0, 0.0, float(frame_w), float(frame_h))
    if frame_w <= size and frame_h <= size:
        return [whole]
    merged = _merge(groups, frame_w, frame_h, size, merge_overlap, max(size, math.floor(size * max_merge_scale)))
    if len(merged) > max_regions:
        everything = merged[0]
        for g in merged[1:]:
            everything = _union(everything, g)
        x1, y1, x2, y2 = _square(everything, frame_w, frame_h, size)
        return [(float(x1), float(y1), float(x2), float(y2))]
    regions = sorted({_square(g, frame_w, frame_h, size) for g in merged})
    # Two groups can map to squares where one contains the other (both pushed against the same corner).
    kept = [r for r in regions if not any(o != r and _contains(o, r) for o in regions)]
    kept.sort(key=lambda r: (r[1], r[0], r[3], r[2]))
    return [(float(x1), float(y1), float(x2), float(y2)) for x1, y1, x2, y2 in kept]


def _grown(box: Sequence[float], frame_w: int, frame_h: int, margin_frac: float) -> _IntBox | None:
    """The box clipped to the frame, grown by the margin, clipped again, rounded outwards to whole pixels."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    x1, x2 = max(0.0, x1), min(float(frame_w), x2)
    y1, y2 = max(0.0, y1), min(float(frame_h), y2)
    if x2 <= x1 or y2 <= y1:
        return None
    mx, my = (x2 - x1) * margin_frac, (y2 - y1) * margin_frac
    return (max(0, math.floor(x1 - mx)), max(0, math.floor(y1 - my)),
            min(frame_w, math.ceil(x2 + mx)), min(frame_h, math.ceil(y2 + my)))


def _side(group: _IntBox, size: int) -> int:
    return max(size, group[2] - group[0], group[3] - group[1])


def _square(group: _IntBox, frame_w: int, frame_h: int, size: int) -> _IntBox:
    side = _side(group, size)
    x1, x2 = _place(group[0], group[2], side, frame_w)
    y1, y2 = _place(group[1], group[3], side, frame_h)
    return x1, y1, x2, y2


def _place(lo: int, hi: int, side: int, limit: int) -> tuple[int, int]:
    """An interval of length ``side`` holding ``[lo, hi]``, centred on it, shifted inside ``[0, limit]``."""
    if side >= limit:
        return 0, limit
    start = lo - (side - (hi - lo)) // 2
    start = min(max(start, 0), limit - side)
    return start, start + side


def _union(a: _IntBox, b: _IntBox) -> _IntBox:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def _contains(outer: _IntBox, inner: _IntBox) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def _overlap_of_smaller(a: _IntBox, b: _IntBox) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller if smaller > 0 else 0.0


def _mergeable(a: _IntBox, b: _IntBox, frame_w: int, frame_h: int, size: int, merge_overlap: float,
               merge_side: int) -> bool:
    if _side(_union(a, b), size) <= max(_side(a, size), _side(b, size), merge_side):
        return True
    return _overlap_of_smaller(_square(a, frame_w, frame_h, size), _square(b, frame_w, frame_h, size)) >= merge_overlap


def _merge(groups: list[_IntBox], frame_w: int, frame_h: int, size: int, merge_overlap: float,
           merge_side: int) -> list[_IntBox]:
    """Greedy agglomeration in a fixed order until no pair merges (inputs are few: quadratic is fine)."""
    out: list[_IntBox] = []
    for g in groups:
        current = g
        merged = True
        while merged:
            merged = False
            for i, other in enumerate(out):
                if _mergeable(current, other, frame_w, frame_h, size, merge_overlap, merge_side):
                    current = _union(current, other)
                    del out[i]
                    merged = True
                    break
        out.append(current)
    return out


def propose_rects(
    motion_boxes: Sequence[Box],
    tracked_boxes: Sequence[Box],
    frame_w: int,
    frame_h: int,
    min_side: int,
    *,
    max_regions: int = 4,
    margin_frac: float = 0.1,
    slack_px: int = 0,
) -> list[Box]:
    """Regions for a detector with a dynamic input, whose cost follows the pixels it is given (NanoDet's time
    is close to proportional to its input's area, with no fixed cost per run worth counting).

    Each box is grown as in :func:`propose_regions` and held by a rectangle of at least ``min_side`` on each
    side (context around a small object; centred, shifted inside the frame; a frame side shorter than
    ``min_side`` is taken whole). Two rectangles merge when the one holding both has no more pixels than the
    two together plus ``slack_px`` (one inside another always does, so does a pair sharing a whole side;
    distant ones stay apart), until nothing merges; over ``max_regions``, the pair whose merge adds the fewest
    pixels merges, and free merges are looked for again.
    Sorted top to bottom, left to right.

    Guarantees (property-tested): every input box, clipped to the frame, lies inside at least one region; every
    region lies inside the frame and is at least ``min(min_side, frame side)`` on each side; at most
    ``max_regions``; whole pixels; within ``max_regions``, the regions' total area is never more than the sum
    of the separate rectangles' plus ``slack_px`` per merge."""
    if frame_w <= 0 or frame_h <= 0 or min_side <= 0:
        raise ValueError(f"frame {frame_w}x{frame_h} and min_side {min_side} must be positive")
    if max_regions < 1:
        raise ValueError(f"max_regions must be at least 1, got {max_regions}")
    rects = sorted(
        _rect(g, frame_w, frame_h, min_side)
        for g in (_grown(b, frame_w, frame_h, margin_frac) for b in (*motion_boxes, *tracked_boxes)) if g is not None)
    if not rects:
        return []

    def area(r: _IntBox) -> int:
        return (r[2] - r[0]) * (r[3] - r[1])

    def added(i: int, j: int) -> int:
        """Pixels a merge of rects i and j adds to running them apart (negative: it saves some)."""
        return area(_union(rects[i], rects[j])) - area(rects[i]) - area(rects[j])

    # Free merges first (overlapping, touching or containing rectangles: one run costs no more pixels), then,
    # while there are too many, the cheapest merge, and free merges again (a merged rectangle can now hold
    # another). Inputs are few: the quadratic search is fine.
    while True:
        pairs = [(i, j) for i in range(len(rects)) for j in range(i + 1, len(rects))]
        free = next(((i, j) for i, j in pairs if added(i, j) <= slack_px), None)
        if free is None and len(rects) <= max_regions:
            break
        i, j = free if free is not None else min(pairs, key=lambda ij: added(*ij))
        rects[i] = _union(rects[i], rects[j])
        del rects[j]
    rects.sort(key=lambda r: (r[1], r[0], r[3], r[2]))
    return [(float(x1), float(y1), float(x2), float(y2)) for x1, y1, x2, y2 in rects]


def _rect(group: _IntBox, frame_w: int, frame_h: int, min_side: int) -> _IntBox:
    x1, x2 = _place(group[0], group[2], max(min_side, group[2] - group[0]), frame_w)
    y1, y2 = _place(group[1], group[3], max(min_side, group[3] - group[1]), frame_h)
    return x1, y1, x2, y2


__all__ = ["propose_rects", "propose_regions"]
