"""Multi-object tracking: one track, with a stable id, per object appearance, so that rules see appearances and
not frames.

A pure core: detections and the time in, track snapshots and appear/end events out. One :class:`Tracker` per
camera; ids are per tracker, monotonic from ``first_id`` (pass the last id + 1 after a restart to never reuse
one), and given when a track is **confirmed**, so the ids users see have no gaps from flickers.

Motion model: a constant-velocity alpha-beta filter on the box centre (the size follows the detections with
an exponential average). The prediction is what association compares against, so two people whose paths cross
keep their ids as long as they keep their speeds. A track's reported ``box`` is the detector's last box when
matched this update (what the model saw is what evidence should show), the predicted box while coasting.

Association, per label (a person never matches a car), in two stages: confirmed tracks first, then tentative
ones, so a fresh flicker cannot take a confirmed object's detection. The cost of a pair is ``(1 - IoU) +
centre distance / track size`` (size = mean of the predicted box's width and height); pairs farther than
``max_distance`` track sizes or with a width or height ratio beyond ``max_size_ratio`` are impossible.
Matching is **greedy on the cost matrix** (cheapest pair first): with gated costs the matrices are small and
mostly diagonal, greedy equals the optimum whenever each object's best match is mutual, and where it does not
(two objects competing for two detections with crossed, near-equal costs) neither assignment is reliably
right; scipy is not a dependency and a hand-written Hungarian solver would be code to prove for no measurable
gain. A detection left over that overlaps a matched one of its label (IoU >= ``duplicate_iou``) is taken as
a duplicate and does not start a track.

Lifecycle:

* **tentative**: a new detection; confirmed once it has ``min_hits`` hits within ``confirm_window_s`` (with
  ``min_hits >= 2`` a one-frame flicker never confirms); dropped when ``confirm_window_s`` passes without a hit;
* **confirmed**: reported once in :attr:`TrackUpdate.new` (the "appeared" event) and then in every update's
  :attr:`TrackUpdate.tracks`;
* **coasting**: a confirmed track that was looked for and not found keeps its predicted box; it ends (reported
  once in :attr:`TrackUpdate.ended`) when it has been looked for and not found for ``max_age_s``: from the
  first failed look after its last match to a failed look at least ``max_age_s`` later;
* **stationary**: a confirmed track whose centre stayed within ``stationary_frac`` of its size of one point
  for ``stationary_after_s``. Its velocity is zeroed and the pipeline stops sending it to the detector every
  tick (:meth:`Tracker.due_for_detection` lists it again every ``recheck_every_s``).

"Looked for" is explicit: :meth:`Tracker.update` takes ``covered``, the regions the detector ran on this tick
(``None`` = the whole frame). A track whose predicted centre lies outside every covered region was not
looked for: nothing counts against it. **A stationary track is therefore never expired by not being
re-detected**; it ends only when looks spanning ``max_age_s`` all fail to find it (after a failed check it is
due again at every tick until found or ended). Skipping a detection tick entirely (the engine was busy) is
``covered=[]``.

Leaving the frame: with ``frame_size`` given to :meth:`Tracker.update`, a track whose predicted centre lies
outside the frame counts as looked for and not found, whatever was covered (nothing can see it there), so a
walker who leaves ends ``max_age_s`` after leaving. Without this no region ever contains such a prediction and
the track would coast forever (found by the camera benchmark's soak: ~0.17 such tracks per busy camera-second,
unbounded memory and per-tick work, and zone occupancies that never fall). As a backstop ``max_unseen_s``
(``None``: off) ends any confirmed track not matched for that long, looked for or not; the pipeline sets it to
three stationary re-check periods.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgeagent.models.types import Box, Detection

_F = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Track:
    """A snapshot of one track after an update (the tracker's state goes on changing; this does not).

    ``id`` is 0 while tentative. ``score`` is the last matched detection's, ``max_score`` the best so far.
    ``velocity`` is the centre's, in pixels per second. ``history`` holds the last centres as
    ``(time_s, x, y)``, oldest first. ``matched`` says whether a detection was matched in this update.
    """

    id: int
    label: str
    box: Box
    score: float
    max_score: float
    hits: int
    first_seen_s: float
    last_seen_s: float
    confirmed: bool
    stationary: bool
    matched: bool
    velocity: tuple[float, float]
    history: tuple[tuple[float, float, float], ...]
    detection: Detection
    missed_since_s: float | None = None  # looked for and not found since then (coasting); None: found last time

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0

    @property
    def seen_for_s(self) -> float:
        return self.last_seen_s - self.first_seen_s


@dataclass(frozen=True, slots=True)
class TrackUpdate:
    """What one update changed. ``tracks``: every live confirmed track (sorted by id, coasting and stationary
    ones included); ``new``: tracks confirmed in this update (one per appearance); ``ended``: tracks removed
    in this update (their last snapshot); ``tentative``: tracks not confirmed yet."""

    tracks: tuple[Track, ...]
    new: tuple[Track, ...]
    ended: tuple[Track, ...]
    tentative: tuple[Track, ...]


class _State:
    """The mutable state of one track."""

    __slots__ = (
        "anchor",
        "anchor_since_s",
        "confirmed",
        "cx",
        "cy",
        "detection",
        "first_seen_s",
        "h",
        "history",
        "hit_times",
        "hits",
        "id",
        "label",
        "last_checked_s",
        "last_seen_s",
        "matched",
        "max_score",
        "miss_since_s",
        "score",
        "stationary",
        "t",
        "vx",
        "vy",
        "w",
    )

    def __init__(self, det: Detection, now_s: float, history_len: int) -> None:
        x1, y1, x2, y2 = det.box
        self.id = 0
        self.label = det.label
        self.cx, self.cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
        self.w, self.h = max(x2 - x1, 1e-3), max(y2 - y1, 1e-3)
        self.vx = self.vy = 0.0
        self.t = now_s
        self.detection = det
        self.score = self.max_score = det.score
        self.hits = 1
        self.hit_times: deque[float] = deque([now_s], maxlen=64)
        self.first_seen_s = self.last_seen_s = now_s
        self.last_checked_s = now_s
        self.miss_since_s: float | None = None
        self.confirmed = False
        self.stationary = False
        self.matched = True
        self.anchor = (self.cx, self.cy)
        self.anchor_since_s = now_s
        self.history: deque[tuple[float, float, float]] = deque([(now_s, self.cx, self.cy)], maxlen=history_len)

    def predicted(self, now_s: float) -> Box:
        dt = max(0.0, now_s - self.t)
        cx, cy = self.cx + self.vx * dt, self.cy + self.vy * dt
        return cx - self.w / 2.0, cy - self.h / 2.0, cx + self.w / 2.0, cy + self.h / 2.0

    def snapshot(self, now_s: float) -> Track:
        box = self.detection.box if self.matched or self.stationary else self.predicted(now_s)
        return Track(
            id=self.id, label=self.label, box=box, score=self.score, max_score=self.max_score, hits=self.hits,
            first_seen_s=self.first_seen_s, last_seen_s=self.last_seen_s, confirmed=self.confirmed,
            stationary=self.stationary, matched=self.matched, velocity=(self.vx, self.vy),
            history=tuple(self.history), detection=self.detection, missed_since_s=self.miss_since_s)


class Tracker:
    """Tracks the detections of one camera. See the module docstring for the model and the lifecycle."""

    def __init__(
        self,
        *,
        min_hits: int = 2,
        confirm_window_s: float = 1.0,
        max_age_s: float = 1.5,
        max_distance: float = 1.0,
        max_size_ratio: float = 2.0,
        duplicate_iou: float = 0.7,
        alpha: float = 0.8,
        beta: float = 0.3,
        size_alpha: float = 0.5,
        stationary_after_s: float = 5.0,
        stationary_frac: float = 0.1,
        history_len: int = 64,
        first_id: int = 1,
        max_unseen_s: float | None = None,
    ) -> None:
        if min_hits < 1:
            raise ValueError(f"min_hits must be at least 1, got {min_hits}")
        if confirm_window_s <= 0 or max_age_s < 0 or stationary_after_s <= 0:
            raise ValueError("confirm_window_s and stationary_after_s must be positive, max_age_s not negative")
        if max_distance <= 0 or max_size_ratio < 1 or history_len < 1 or first_id < 1:
            raise ValueError("max_distance > 0, max_size_ratio >= 1, history_len >= 1 and first_id >= 1 needed")
        if not (0 < alpha <= 1 and 0 <= beta <= 2 and 0 < size_alpha <= 1):
            raise ValueError("alpha and size_alpha must be in (0, 1], beta in [0, 2]")
        if max_unseen_s is not None and max_unseen_s <= max_age_s:
            raise ValueError(f"max_unseen_s must exceed max_age_s ({max_age_s}), got {max_unseen_s}")
        self._max_unseen_s = max_unseen_s
        self._min_hits = min_hits
        self._confirm_window_s = confirm_window_s
        self._max_age_s = max_age_s
        self._max_distance = max_distance
        self._log_size_ratio = float(np.log(max_size_ratio))
        self._duplicate_iou = duplicate_iou
        self._alpha, self._beta, self._size_alpha = alpha, beta, size_alpha
        self._stationary_after_s = stationary_after_s
        self._stationary_frac = stationary_frac
        self._history_len = history_len
        self._next_id = first_id
        self._states: list[_State] = []
        self._last_now_s: float | None = None
        self._frame_size: tuple[int, int] | None = None

    @property
    def next_id(self) -> int:
        """The id the next confirmed track will get (persist it to never reuse ids after a restart)."""
        return self._next_id

    def __len__(self) -> int:
        return len(self._states)

    def due_for_detection(self, now_s: float, recheck_every_s: float, moving_recheck_s: float = 0.0) -> list[Box]:
        """Predicted boxes (at ``now_s``) of the tracks the detector should look at this tick: every
        tentative track, each confirmed moving track whose last check is ``moving_recheck_s`` old (0: every
        tick), and each stationary track whose last check is ``recheck_every_s`` old; any track whose last
        check failed; never a track predicted outside the frame (the last ``frame_size`` given to
        :meth:`update`): nothing there can be looked at. Sorted by track (confirmed ids first, then tentative
        by age)."""
        out: list[Box] = []
        fs = self._frame_size
        for s in self._ordered():
            if s.stationary and s.miss_since_s is None and now_s - s.last_checked_s < recheck_every_s:
                continue
            if (s.confirmed and not s.stationary and s.miss_since_s is None
                    and now_s - s.last_checked_s < moving_recheck_s):
                continue
            box = s.predicted(now_s)
            if fs is not None and not (0 <= (box[0] + box[2]) / 2 <= fs[0] and 0 <= (box[1] + box[3]) / 2 <= fs[1]):
                continue
            out.append(box)
        return out

    def update(self, detections: Sequence[Detection], now_s: float, *,
               covered: Sequence[Box] | None = None, frame_size: tuple[int, int] | None = None) -> TrackUpdate:
        """Feed one detection tick's detections (frame pixels) at ``now_s`` (monotonic seconds, never going
        back). ``covered``: the regions the detector ran on (``None`` = the whole frame). ``frame_size``:
        ``(width, height)``; a track predicted outside it counts as looked for (see the module docstring)."""
        if self._last_now_s is not None and now_s < self._last_now_s:
            raise ValueError(f"time went back: {now_s} after {self._last_now_s}")
        self._last_now_s = now_s
        if frame_size is not None:
            self._frame_size = frame_size
        for s in self._states:
            s.matched = False
        by_label: dict[str, list[int]] = {}
        for i, d in enumerate(detections):
            if all(math.isfinite(v) for v in d.box):  # a decoder bug's NaN box must not poison every track's filter
                by_label.setdefault(d.label, []).append(i)
        used = [False] * len(detections)
        born: list[_State] = []
        for label, det_idx in by_label.items():
            dets = [detections[i] for i in det_idx]
            boxes = np.array([d.box for d in dets], dtype=np.float64).reshape(-1, 4)
            matched_boxes: list[int] = []
            for confirmed in (True, False):
                cands = [s for s in self._states if s.label == label and s.confirmed is confirmed and not s.matched]
                free = [j for j in range(len(dets)) if not used[det_idx[j]]]
                if not cands or not free:
                    continue
                pairs = self._match(cands, boxes[free], now_s)
                for ti, fj in pairs:
                    j = free[fj]
                    used[det_idx[j]] = True
                    matched_boxes.append(j)
                    self._hit(cands[ti], dets[j], now_s)
            leftovers = [j for j in range(len(dets)) if not used[det_idx[j]]]
            if leftovers and matched_boxes:
                dup = _iou_matrix(boxes[leftovers], boxes[matched_boxes]).max(axis=1) >= self._duplicate_iou
                leftovers = [j for j, d in zip(leftovers, dup.tolist(), strict=True) if not d]
            for j in sorted(leftovers, key=lambda k: -dets[k].score):
                born.append(_State(dets[j], now_s, self._history_len))
        regions = None if covered is None else np.array(covered, dtype=np.float64).reshape(-1, 4)
        new: list[Track] = []
        ended: list[Track] = []
        keep: list[_State] = []
        for s in self._states:
            looked_in_vain = not s.matched and self._miss(s, now_s, regions, frame_size)
            if s.confirmed and ((looked_in_vain and s.miss_since_s is not None
                                 and now_s - s.miss_since_s >= self._max_age_s)
                                or (self._max_unseen_s is not None
                                    and now_s - s.last_seen_s >= self._max_unseen_s)):
                ended.append(s.snapshot(now_s))
                continue
            if not s.confirmed and now_s - s.last_seen_s > self._confirm_window_s:
                continue
            if not s.confirmed and s.matched and self._enough_hits(s, now_s):
                s.confirmed = True
                s.id = self._next_id
                self._next_id += 1
                new.append(s.snapshot(now_s))
            keep.append(s)
        for s in born:
            if self._enough_hits(s, now_s):  # min_hits == 1
                s.confirmed = True
                s.id = self._next_id
                self._next_id += 1
                new.append(s.snapshot(now_s))
            keep.append(s)
        self._states = keep
        ordered = self._ordered()
        return TrackUpdate(
            tracks=tuple(s.snapshot(now_s) for s in ordered if s.confirmed),
            new=tuple(new),
            ended=tuple(ended),
            tentative=tuple(s.snapshot(now_s) for s in ordered if not s.confirmed))

    def tracks(self, now_s: float) -> list[Track]:
        """Snapshots of every live confirmed track (sorted by id)."""
        return [s.snapshot(now_s) for s in self._ordered() if s.confirmed]

    # -- internals --------------------------------------------------------------------------------------

    def _ordered(self) -> list[_State]:
        return sorted(self._states, key=lambda s: (not s.confirmed, s.id, s.first_seen_s))

    def _enough_hits(self, s: _State, now_s: float) -> bool:
        recent = sum(1 for t in s.hit_times if now_s - t <= self._confirm_window_s)
        return recent >= self._min_hits

    def _match(self, cands: list[_State], boxes: _F, now_s: float) -> list[tuple[int, int]]:
        pred = np.array([s.predicted(now_s) for s in cands], dtype=np.float64)
        iou = _iou_matrix(pred, boxes)
        pw, ph = pred[:, 2] - pred[:, 0], pred[:, 3] - pred[:, 1]
        dw = np.maximum(boxes[:, 2] - boxes[:, 0], 1e-3)
        dh = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-3)
        pcx, pcy = (pred[:, 0] + pred[:, 2]) / 2, (pred[:, 1] + pred[:, 3]) / 2
        dcx, dcy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        scale = np.maximum((pw + ph) / 2.0, 1e-3)[:, None]
        dist = np.hypot(pcx[:, None] - dcx[None, :], pcy[:, None] - dcy[None, :]) / scale
        size_ok = (np.abs(np.log(dw[None, :] / pw[:, None])) <= self._log_size_ratio) & (
            np.abs(np.log(dh[None, :] / ph[:, None])) <= self._log_size_ratio)
        cost = np.where(size_ok & (dist <= self._max_distance), (1.0 - iou) + dist, np.inf)
        return _greedy(cost)

    def _hit(self, s: _State, det: Detection, now_s: float) -> None:
        x1, y1, x2, y2 = det.box
        zx, zy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
        dt = now_s - s.t
        if dt > 0:
            if s.hits == 1:
                # The first two points give the velocity outright; the filter refines it from there.
                s.vx, s.vy = (zx - s.cx) / dt, (zy - s.cy) / dt
                s.cx, s.cy = zx, zy
            else:
                px, py = s.cx + s.vx * dt, s.cy + s.vy * dt
                rx, ry = zx - px, zy - py
                s.cx, s.cy = px + self._alpha * rx, py + self._alpha * ry
                s.vx += self._beta * rx / dt
                s.vy += self._beta * ry / dt
        else:
            s.cx, s.cy = zx, zy
        s.w += self._size_alpha * (max(x2 - x1, 1e-3) - s.w)
        s.h += self._size_alpha * (max(y2 - y1, 1e-3) - s.h)
        s.t = now_s
        s.detection = det
        s.score = det.score
        s.max_score = max(s.max_score, det.score)
        s.hits += 1
        s.hit_times.append(now_s)
        s.last_seen_s = s.last_checked_s = now_s
        s.miss_since_s = None
        s.matched = True
        s.history.append((now_s, zx, zy))
        self._update_stationary(s, zx, zy, now_s)

    def _update_stationary(self, s: _State, zx: float, zy: float, now_s: float) -> None:
        limit = self._stationary_frac * (s.w + s.h) / 2.0
        if math.hypot(zx - s.anchor[0], zy - s.anchor[1]) > limit:
            s.anchor = (zx, zy)
            s.anchor_since_s = now_s
            s.stationary = False
        elif s.confirmed and now_s - s.anchor_since_s >= self._stationary_after_s:
            s.stationary = True
        if s.stationary:
            s.vx = s.vy = 0.0

    def _miss(self, s: _State, now_s: float, regions: _F | None, frame_size: tuple[int, int] | None) -> bool:
        """The track got no detection this tick. Whether it was looked for (only then is the miss held
        against it); a prediction outside the frame counts as looked for: it can never be seen there."""
        if regions is not None:
            cx, cy = s.cx + s.vx * (now_s - s.t), s.cy + s.vy * (now_s - s.t)
            off_frame = frame_size is not None and not (0 <= cx <= frame_size[0] and 0 <= cy <= frame_size[1])
            inside = bool(np.any((regions[:, 0] <= cx) & (cx <= regions[:, 2])
                                 & (regions[:, 1] <= cy) & (cy <= regions[:, 3])))
            if not inside and not off_frame:
                return False
        s.last_checked_s = now_s
        if s.miss_since_s is None:
            s.miss_since_s = now_s
        return True


def _iou_matrix(a: _F, b: _F) -> _F:
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (m, 4)."""
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _greedy(cost: _F) -> list[tuple[int, int]]:
    """Pairs (row, column) taken cheapest first, each row and column at most once, infinite costs never."""
    finite = np.isfinite(cost)
    if not finite.any():
        return []
    rows, cols = np.nonzero(finite)
    order = np.lexsort((cols, rows, cost[rows, cols]))  # ties broken by position: deterministic
    used_r: set[int] = set()
    used_c: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for k in order.tolist():
        r, c = int(rows[k]), int(cols[k])
        if r in used_r or c in used_c:
            continue
        used_r.add(r)
        used_c.add(c)
        pairs.append((r, c))
    return pairs


__all__ = ["Track", "TrackUpdate", "Tracker"]
