"""Falls in common areas: the pure decision core between the pose model, the temporal fall head and the alarm.

Per person track, each pose (MoveNet's 17 keypoints, ``(x, y, score)`` in frame pixels) goes into a
:class:`~edgeagent.models.decoders.fall.FallWindow` (4 s on an 8 fps grid, normalized to a square around the
person). The head itself is run by the caller; this core says which windows to run and judges what comes
back. No I/O, no clock of its own: times are monotonic seconds passed in.

How the caller drives it, per detection tick of a camera::

    events = rule.update(person_tracks, poses, frame_w, frame_h, now)   # poses: track id -> [17, 3]
    ready = rule.windows_ready()                                        # [(track id, [32, 60] features)]
    if ready:                                                           # one batch for every person
        probs = run_head(np.stack([f for _, f in ready]))               # [people, 4] softmax
        for (tid, _), p in zip(ready, probs):
            events += rule.on_probabilities(tid, p, now)

Run the pose model on every person track matched this tick and on every stationary one (its box is the
detector's last), and pass those poses: a window that gets no pose for ``max_gap_s`` starts over, and a
person lying still is exactly the track the detector stops re-checking. A pose for a track that is only
coasting (its box a prediction) is ignored (counted): the crop would be cut around where the person was
expected, and mid-fall that is where they no longer are.

The head runs at its own rate, not per frame: a window is offered once it is full
(:attr:`FallWindow.ready`, 4 s of poses) and then again when its newest pose is ``head_every_s`` newer
than at its last run, so a 25 fps camera costs no more head runs than a 5 fps one. A window handed out
counts as run (an engine that refused the batch skips that reading, as it skips frames). The head's
input is a tensor (``pose_history``, ``people x 32 x 60``): one request per tick for every ready person.

Decisions (what the head's notes in :mod:`~edgeagent.models.decoders.fall` say to do):

* only the **fallen** probability is a fall signal. "descending" is read by walking sideways and by bending
  over (.94 and .98 on this head), so it is ignored;
* **confirmation over time**: at least ``min_high`` of a person's last ``window`` head outputs read fallen at
  ``threshold`` or more, the newest included, spanning at least ``min_fallen_s`` (so a burst of outputs
  cannot stand in for time), and the person's newest pose is **low**: its keypoints (those scoring at
  least ``keypoint_score``) are wider than tall, or no taller than ``low_share`` of the tallest upright pose
  of the person in the last ``upright_memory_s``. The head keys on the transition (a person who has lain
  still for 4 s reads "normal" again), so confirmation must come within the ~3 s the fall stays in its
  window: with the defaults it comes 1-1.5 s after the fall;
* one :class:`FallConfirmed` per fall episode; the episode ends with :class:`FallCleared`: ``'recovered'``
  when the person's pose has been **up** (taller than ``up_aspect`` times its width, and at least
  ``up_share`` of the upright height remembered at the fall) for ``recover_s``; ``'track_ended'`` when the
  track is gone (no longer passed to :meth:`FallRule.update`) and no new track took it over within
  ``handover_s``; ``'dropped'`` when the person was dropped for the cap. Only ``'recovered'`` says the person
  is up: the alarm lifecycle should resolve on that alone and leave the others to a person;
* **handover**: a fall changes a person's box from tall to wide within half a second, and the tracker
  (which refuses to match boxes whose width or height changes more than twofold) stops matching the
  standing person's track, lets it coast and starts a new track for the lying person (seen on a synthetic
  fall at 5 and 10 detections a second: two and three tracks; at 25 none, the steps are small enough); the
  new window would hold only lying still, which the head reads "normal", and the fall is missed. So a new
  person track takes over the state (window, outputs, episode) of a person track that is coasting (neither
  matched nor stationary) or ended, last matched at most ``handover_s`` before and before the new track
  was first seen, whose last detected box's centre lies within that box's longer side of the new box's
  centre (the nearest such); the old track id is then retired (ignored until the tracker ends it). A
  stationary track never gives its state away: a helper kneeling beside a person lying still must not take
  over their fall. An ended track's state is kept while it could still be taken over, then its episode
  ends as ``'track_ended'``;
* bounded: at most ``max_people`` people are held (those ended and waiting for a taker included); a new
  one beyond that drops an ended one first, else the one with the oldest pose (people in a confirmed fall
  last), counted in ``dropped``.

Poses with fewer than ``min_keypoints`` keypoints scoring ``keypoint_score`` are not pushed (counted): an
occluded person's few keypoints make a shape the head was not trained on. Such a gap longer than
``max_gap_s`` restarts the window (FallWindow's policy).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from edgeagent.drivers.camera.tracker import Track
from edgeagent.models.decoders.fall import (
    DEFAULT_MAX_GAP_S,
    FALL_CLASSES,
    N_KEYPOINTS,
    FallWindow,
    fall_features,
)
from edgeagent.models.types import Box

FloatArray = npt.NDArray[np.float32]
ClearReason = Literal["recovered", "track_ended", "dropped"]

FALLEN = FALL_CLASSES.index("fallen")
_UPRIGHT_MAX = 1024
_TIME_EPS_S = 1e-6  # tick times are sums of floats: 0.8 - 0.2 counts as the 0.6 s it stands for


@dataclass(frozen=True, slots=True)
class FallSpec:
    """One camera's fall rule settings. Times in seconds, shares of a person's height."""

    person_label: str = "person"
    """The detector label of people; other tracks are ignored."""
    threshold: float = 0.7
    """Fallen probability an output must reach to count (the head reads a fall .85-.98, everyday motions
    at most .03)."""
    window: int = 5
    """Head outputs kept per person."""
    min_high: int = 3
    """Outputs at ``threshold`` or more among the last ``window`` needed to confirm."""
    min_fallen_s: float = 0.3
    """Seconds the counted outputs must span at least (rate-independent: at 8 runs a second three outputs
    span only 0.25 s)."""
    head_every_s: float = 0.2
    """Least pose time between two head runs of one window: 5 runs a second, the usual detection rate."""
    keypoint_score: float = 0.2
    """Keypoint score that counts a keypoint as seen (for the pose gate and the low / up shape)."""
    min_keypoints: int = 6
    """Seen keypoints a pose needs to be pushed."""
    low_share: float = 0.6
    """A pose no taller than this share of the upright height is low (a person lying toward the camera)."""
    up_share: float = 0.8
    """A pose at least this share of the upright height (and taller than wide) is up again."""
    up_aspect: float = 1.2
    """Keypoint height over width a pose needs to be up (a standing person's is about 3)."""
    recover_s: float = 2.0
    """Seconds a fallen person must be up before the fall is cleared as recovered."""
    upright_memory_s: float = 10.0
    """Seconds of upright poses remembered for a person's standing height."""
    handover_s: float = 1.0
    """Seconds an ended track's state waits for a new track to take it over."""
    max_people: int = 16
    """People followed at once per camera (windows cost ~8 KB each; the cap bounds the head's batch)."""
    reference: Literal["person", "frame"] = "person"
    """FallWindow's reference rectangle (the person square; see its notes)."""
    max_gap_s: float = DEFAULT_MAX_GAP_S
    """FallWindow's gap that restarts a window."""

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 1 <= self.min_high <= self.window:
            raise ValueError(f"need 1 <= min_high <= window, got {self.min_high} and {self.window}")
        if not 0.0 <= self.keypoint_score <= 1.0 or not 1 <= self.min_keypoints <= N_KEYPOINTS:
            raise ValueError("keypoint_score must be in 0..1 and min_keypoints in 1..17")
        if not 0.0 < self.low_share < self.up_share or self.up_aspect <= 0:
            raise ValueError("need 0 < low_share < up_share and up_aspect > 0")
        for name in ("min_fallen_s", "head_every_s", "recover_s", "upright_memory_s", "handover_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {v}")
        if self.max_people < 1 or not (math.isfinite(self.max_gap_s) and self.max_gap_s > 0):
            raise ValueError("max_people must be at least 1 and max_gap_s positive")
        if self.reference not in ("person", "frame"):
            raise ValueError(f"reference is 'person' or 'frame', got {self.reference!r}")


@dataclass(frozen=True, slots=True)
class FallConfirmed:
    """A fall, once per episode. ``probs``: the confirming output (normal, descending, fallen, recovering);
    ``box``: the person's track box (frame pixels); ``since_s``: the first of the counted fallen outputs."""

    track_id: int
    probs: tuple[float, ...]
    box: Box
    since_s: float
    at_s: float


@dataclass(frozen=True, slots=True)
class FallCleared:
    """A confirmed fall's episode ended (see the module docstring: only ``'recovered'`` means the person is
    up). ``fallen_s``: seconds from the confirmation."""

    track_id: int
    reason: ClearReason
    at_s: float
    fallen_s: float


FallEvent = FallConfirmed | FallCleared


@dataclass(slots=True)
class _Person:
    window: FallWindow
    box: Box  # the track's box as last passed
    seen_box: Box  # the last detected box (a coasting track's box is a prediction)
    last_seen_s: float  # the track's last match
    last_pose_s: float
    outputs: deque[tuple[float, float]]
    # (time, keypoint height) of upright poses for upright_memory_s (bounded in count too: a 30 fps camera)
    upright: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=_UPRIGHT_MAX))
    head_pose_s: float | None = None  # newest pose time of the window at its last head run
    matched: bool = True
    stationary: bool = False
    low: bool = False
    confirmed_s: float | None = None
    upright_at_fall: float | None = None
    up_since_s: float | None = None
    ended: bool = False  # the track is no longer passed (kept while a new track could take it over)

    def track(self, t: Track) -> None:
        self.box, self.seen_box, self.last_seen_s = t.box, t.detection.box, t.last_seen_s
        self.matched, self.stationary, self.ended = t.matched, t.stationary, False


class FallRule:
    """Fall decisions for the people of one camera (see the module docstring)."""

    def __init__(self, spec: FallSpec | None = None) -> None:
        self.spec = spec or FallSpec()
        self._people: dict[int, _Person] = {}
        self._retired: set[int] = set()
        self._last_now_s: float | None = None
        self._counts = {"confirmed": 0, "recovered": 0, "track_ended": 0, "dropped": 0, "handovers": 0,
                        "poor_poses": 0, "bad_poses": 0, "coasting_poses": 0, "head_windows": 0,
                        "late_outputs": 0}

    def stats(self) -> dict[str, int]:
        """Counters, and the people followed now (``people``; ``ended`` of them kept for a handover)."""
        ended = sum(1 for p in self._people.values() if p.ended)
        return {**self._counts, "people": len(self._people) - ended, "ended": ended}

    def falling(self) -> list[int]:
        """Track ids in a confirmed fall now."""
        return sorted(tid for tid, p in self._people.items() if p.confirmed_s is not None and not p.ended)

    def update(self, tracks: Sequence[Track], poses: Mapping[int, npt.ArrayLike], frame_w: int, frame_h: int,
               now_s: float) -> list[FallEvent]:
        """One detection tick: every live confirmed track (non-person ones are ignored; a person not passed is
        taken as ended) and the poses found this tick by track id, at ``now_s``."""
        if frame_w <= 0 or frame_h <= 0:
            raise ValueError(f"frame size must be positive, got {frame_w}x{frame_h}")
        if not math.isfinite(now_s) or (self._last_now_s is not None and now_s < self._last_now_s):
            raise ValueError(f"time must be finite and never go back: {now_s} after {self._last_now_s}")
        self._last_now_s = now_s
        events: list[FallEvent] = []
        live = {t.id: t for t in tracks if t.confirmed and t.label == self.spec.person_label}
        self._retired &= set(live)
        fresh: list[Track] = []
        for tid, t in live.items():
            if tid in self._retired:
                continue
            person = self._people.get(tid)
            if person is None:
                fresh.append(t)
            else:
                person.track(t)
        for tid, p in self._people.items():
            if tid not in live:
                p.ended = True
        for t in sorted(fresh, key=lambda t: t.id):
            person = self._take_over(t, now_s) or self._admit(t, frame_w, frame_h, now_s, events)
            person.track(t)
        for tid in [k for k, p in self._people.items() if p.ended and now_s - p.last_seen_s > self.spec.handover_s]:
            events += self._drop(tid, "track_ended", now_s)
        for tid, keypoints in poses.items():
            person = self._people.get(tid)
            if person is None or person.ended or tid in self._retired:
                continue
            if not (person.matched or person.stationary):
                self._counts["coasting_poses"] += 1
                continue
            events += self._push(tid, person, keypoints, now_s)
        return events

    def windows_ready(self) -> list[tuple[int, FloatArray]]:
        """The windows due for a head run now: ``(track id, [32, 60] features)``; marked as run."""
        out: list[tuple[int, FloatArray]] = []
        for tid, p in sorted(self._people.items()):
            last = p.window.last_t_s
            if p.ended or not p.window.ready or last is None:
                continue
            if p.head_pose_s is not None and last - p.head_pose_s < self.spec.head_every_s - _TIME_EPS_S:
                continue
            p.head_pose_s = last
            out.append((tid, fall_features(p.window)))
        self._counts["head_windows"] += len(out)
        return out

    def on_probabilities(self, track_id: int, probs: npt.ArrayLike, now_s: float) -> list[FallEvent]:
        """The head's output for a window :meth:`windows_ready` handed out (softmax over normal, descending,
        fallen, recovering). A person gone since is ignored (counted). ValueError for a malformed row."""
        row = np.asarray(probs, dtype=np.float64).reshape(-1)
        if row.shape != (len(FALL_CLASSES),) or not np.isfinite(row).all():
            raise ValueError(f"expected {len(FALL_CLASSES)} finite probabilities, got {row.tolist()}")
        person = self._people.get(track_id)
        if person is None or person.ended:
            self._counts["late_outputs"] += 1
            return []
        person.outputs.append((now_s, float(row[FALLEN])))
        if person.confirmed_s is not None or row[FALLEN] < self.spec.threshold:
            return []
        high = [t for t, p in person.outputs if p >= self.spec.threshold]
        if len(high) < self.spec.min_high or now_s - high[0] < self.spec.min_fallen_s - _TIME_EPS_S or not person.low:
            return []
        person.confirmed_s = now_s
        person.upright_at_fall = max((h for _, h in person.upright), default=None)
        person.up_since_s = None
        self._counts["confirmed"] += 1
        x1, y1, x2, y2 = person.box
        box = (float(x1), float(y1), float(x2), float(y2))
        return [FallConfirmed(track_id, tuple(float(v) for v in row), box, high[0], now_s)]

    # -- internals --------------------------------------------------------------------------------------

    def _take_over(self, t: Track, now_s: float) -> _Person | None:
        """The state of a coasting or ended person track that ``t`` continues (see the module docstring)."""
        cx, cy = (t.box[0] + t.box[2]) / 2.0, (t.box[1] + t.box[3]) / 2.0
        best: tuple[float, int] | None = None
        for tid, p in self._people.items():
            if not p.ended and (p.matched or p.stationary):
                continue
            if now_s - p.last_seen_s > self.spec.handover_s or t.first_seen_s <= p.last_seen_s:
                continue
            x1, y1, x2, y2 = p.seen_box
            d = math.hypot(cx - (x1 + x2) / 2.0, cy - (y1 + y2) / 2.0)
            if d <= max(x2 - x1, y2 - y1) and (best is None or d < best[0]):
                best = (d, tid)
        if best is None:
            return None
        old = best[1]
        person = self._people.pop(old)
        if not person.ended:  # still passed by the tracker, coasting until it ends it
            self._retired.add(old)
        self._people[t.id] = person
        self._counts["handovers"] += 1
        return person

    def _admit(self, t: Track, frame_w: int, frame_h: int, now_s: float, events: list[FallEvent]) -> _Person:
        if len(self._people) >= self.spec.max_people:
            # ended tracks first (they only wait for a taker), then people not in a fall, oldest pose first
            victim, p = min(self._people.items(),
                            key=lambda kp: (not kp[1].ended, kp[1].confirmed_s is not None, kp[1].last_pose_s, kp[0]))
            events += self._drop(victim, "track_ended" if p.ended else "dropped", now_s)
        person = _Person(window=FallWindow(frame_w, frame_h, reference=self.spec.reference,
                                           max_gap_s=self.spec.max_gap_s),
                         box=t.box, seen_box=t.detection.box, last_seen_s=t.last_seen_s, last_pose_s=now_s,
                         outputs=deque(maxlen=self.spec.window))
        self._people[t.id] = person
        return person

    def _drop(self, tid: int, reason: ClearReason, now_s: float) -> list[FallEvent]:
        person = self._people.pop(tid)
        if reason == "dropped":
            self._counts["dropped"] += 1
        if person.confirmed_s is None:
            return []
        if reason == "track_ended":
            self._counts["track_ended"] += 1
        return [FallCleared(tid, reason, now_s, now_s - person.confirmed_s)]

    def _push(self, tid: int, person: _Person, keypoints: npt.ArrayLike, now_s: float) -> list[FallEvent]:
        kp = np.asarray(keypoints, dtype=np.float64)
        if kp.shape != (N_KEYPOINTS, 3) or not np.isfinite(kp).all():
            self._counts["bad_poses"] += 1
            return []
        seen = kp[kp[:, 2] >= self.spec.keypoint_score, :2]
        if len(seen) < self.spec.min_keypoints:
            self._counts["poor_poses"] += 1
            return []
        person.window.push(kp, now_s)
        person.last_pose_s = now_s
        width, height = np.ptp(seen, axis=0).tolist()
        s = self.spec
        while person.upright and now_s - person.upright[0][0] > s.upright_memory_s:
            person.upright.popleft()
        tallest = max((h for _, h in person.upright), default=None)
        person.low = height < width or (tallest is not None and height <= s.low_share * tallest)
        ref = person.upright_at_fall if person.confirmed_s is not None else tallest
        up = height >= s.up_aspect * width and (ref is None or height >= s.up_share * ref)
        if height >= s.up_aspect * width:
            person.upright.append((now_s, height))
        if person.confirmed_s is None:
            return []
        if not up:
            person.up_since_s = None
            return []
        if person.up_since_s is None:
            person.up_since_s = now_s
        if now_s - person.up_since_s < s.recover_s - _TIME_EPS_S:
            return []
        fallen_s = now_s - person.confirmed_s
        person.confirmed_s = None
        person.upright_at_fall = None
        person.up_since_s = None
        person.outputs.clear()
        self._counts["recovered"] += 1
        return [FallCleared(tid, "recovered", now_s, fallen_s)]


__all__ = ["ClearReason", "FallCleared", "FallConfirmed", "FallEvent", "FallRule", "FallSpec"]
