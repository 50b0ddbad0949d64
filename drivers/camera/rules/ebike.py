"""E-bikes in a lift car: the pure decision core of a "lift blocker".

Lithium e-bike batteries carried into lifts and homes cause fires; a lift blocker sees the bike in the car,
holds the doors open through a relay on the lift controller's door-hold input and announces until the bike
is wheeled out. This core makes those decisions for ONE car camera: confirmed track snapshots
(:class:`~edgeagent.drivers.camera.tracker.Track`), the frame size and the monotonic time in, frozen
actions out (:data:`EbikeAction`). No I/O, no clock of its own.

What counts as an e-bike (COCO has no such class): a track labelled ``bicycle`` or ``motorcycle`` (Chinese
e-bikes are step-through mopeds, read mostly as motorcycles), or the site model's own e-bike class when one
is configured (``site_class``). People never count, alone or not: a person wheeling a bike in is two tracks
(the tracker associates per label) and the bike's track triggers.

Confirmation (every condition, on the same track):

* an **observation** is an update in which the track was matched by a detection (``Track.matched``). Ticks
  on which the track was not looked at do not count either way: the camera pipeline re-detects a standing
  object only every other tick at 5 fps, and a stationary one every 5 s, so counting ticks would read a bike
  standing still as a bike that flickers;
* an observation is **good** when the box's bottom-centre (the wheels on the floor, as in
  :mod:`~edgeagent.drivers.camera.zones`) lies inside the car zone and the box is plausible for a bike: score
  at least ``min_score``, area at least ``min_area_frac`` of the frame, its longer extent at least
  ``min_span_frac`` of the frame (across or down), width over height within ``min_aspect`` ..
  ``max_aspect``. Prams and wheelchairs are not in COCO and are sometimes read as bicycles; they are about
  half an e-bike's length (0.8-1 m against 1.6-1.8 m), so in a car 1.4-2 m deep an e-bike fills a much
  larger part of the frame: size is the gate that separates them, aspect only removes boxes no bike makes
  (a tall sliver, a flat strip). Both are per site: measure a bike and a pram in the car and set them;
* **consistency**: at least ``min_good`` of the track's last ``window`` observations were good, the
  confirming one included (the relay follows a frame, never a timer);
* **dwell**: ``dwell_s`` since the first good observation of the track's current run (a run ends when none
  of its last ``window`` observations is good). With the defaults at 5 detections a second: the tracker
  confirms a track at its 2nd detection, the rule needs 4 good observations spanning 0.6 s: the alarm comes
  on the 5th detection frame of the bike, 0.8 s after the first; one-frame flickers never confirm (the
  tracker does not even report them), nor do short ones (3 observations).

The confirming update returns, in this order, ``HoldDoor(True)``, ``Announce(True)`` and ``RaiseAlarm``:
the door relay is the safety action and goes first; the core adds no delay beyond the dwell, so the 1 s
budget from the confirming frame to the relay is the caller's (inference, one relay write).

One **episode** per car (one alarm open at a time): bikes entering while an alarm is open join it; the door
stays held while any bike-like track (class and zone only: a bike half hidden by its rider on the way out
is still there) is seen in the car, matched or stationary, and is released ``clear_s`` after the last such
sighting (hysteresis): ``HoldDoor(False)``, ``Announce(False)``, ``ResolveAlarm('left')``.

Timeouts and release:

* ``max_hold_s`` after the hold began the door is released whatever the camera sees (a lift held open is a
  lift the fire service and everyone else cannot use, and the lift's own controller may sound and force the
  doors closed anyway). The alarm **stays open** and the announcement goes on: the bike is still in the car
  and will ride to some floor; the guard room needs the open alarm and its evidence to follow it up, and
  resolving it would tell the alarm lifecycle the hazard is gone when it is not. The door is not held again
  in the same episode (a hold, a one-tick release and another hold would defeat the bound).
* ``alarm_timeout_s`` after the alarm was raised (``None``: never) the announcement stops and the alarm
  resolves with ``'timeout'``. Nobody moved the bike in that time despite the announcement and the
  escalation the lifecycle ran; and a "bike" that never moves may be a poster on the car wall. The reason
  says nobody saw it leave.
* :meth:`EbikeLiftRule.release` (a guard) releases door and announcement and resolves with
  ``'guard_release'``.

Re-trigger policy: one alarm per presence. After a guard release the bikes that were in the car are
**suppressed** for ``rearm_s`` (a bike still standing there after that raises a new alarm: the guard
released the lift, not the rule); after a timeout they are suppressed until they leave. A suppressed
object is one of the tracks that were in the car, or a new track whose first good box overlaps one of
their boxes by ``same_object_iou`` (the tracker lost the standing bike and found it again under a new id);
suppression ends when none of them has been seen for ``clear_s``. A new arrival is first seen somewhere
else (at the door), so it triggers at once.

Timers: :meth:`EbikeLiftRule.update` checks them, and :meth:`EbikeLiftRule.tick` checks only them. The
caller must call ``tick`` at :meth:`EbikeLiftRule.next_deadline_s` (or every second) so that a camera that
stops delivering frames cannot hold a door past ``max_hold_s``.

What it cannot see (say so to the property manager): a battery carried in a bag, a box or a hand (the
usual way batteries go up to be charged at home); a bike folded, covered or wrapped so the detector does not
read it as one; a bike hidden behind people in a full car; an e-scooter or a balance board (not bicycle or
motorcycle); a bike parked in a blind corner outside the zone. A large child's bicycle or a cargo trolley
read as a bicycle may trigger it. Vision is one layer; battery rules and charging sheds are the others.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from edgeagent.drivers.camera.tracker import Track
from edgeagent.models.types import Box, box_iou

Point = tuple[float, float]
ResolveReason = Literal["left", "timeout", "guard_release"]
ActionReason = Literal["confirmed", "left", "max_hold", "timeout", "guard_release"]

BIKE_CLASSES: Final = frozenset({"bicycle", "motorcycle"})
_TIME_EPS_S: Final = 1e-6


@dataclass(frozen=True, slots=True)
class EbikeLiftSpec:
    """One lift car's rule settings. Sizes are fractions of the frame, times seconds."""

    zone: tuple[Point, ...]
    """The car's floor as seen by the camera, normalized (0..1) polygon; a box counts where its bottom-centre
    is. Leave out the open door's view of the landing, or a bike waiting outside would hold the lift."""
    classes: frozenset[str] = BIKE_CLASSES
    """Detector labels taken for a bike (COCO has no e-bike class)."""
    site_class: str | None = None
    """The e-bike class of a site's own model, added to ``classes``."""
    min_score: float = 0.45
    """Detection score an observation needs (the shipped detector's floor is 0.35; the margin keeps its
    weakest guesses out)."""
    min_area_frac: float = 0.06
    """Box area over the frame's: an e-bike in a car 1.4-2 m deep fills far more; a pram much less."""
    min_span_frac: float = 0.3
    """The box's longer extent over the frame's in the same direction: a 1.7 m bike spans most of a car."""
    min_aspect: float = 0.35
    """Lowest box width / height: a bike seen end-on from a ceiling corner is narrow but not a sliver."""
    max_aspect: float = 3.0
    """Highest box width / height: side-on from above a bike is about 1.5-2.5 times as wide as high."""
    window: int = 5
    """Observations kept per track (consistency is judged over these)."""
    min_good: int = 3
    """Good observations among the last ``window`` a track needs to confirm."""
    dwell_s: float = 0.6
    """Seconds from a track's first good observation (of its current run) to the earliest confirmation."""
    clear_s: float = 2.0
    """Seconds without any bike-like sighting in the car before the episode ends as ``'left'`` (and before a
    suppressed object counts as gone)."""
    max_hold_s: float = 120.0
    """Longest door hold in seconds (fire code: set it to what the lift contractor and fire plan allow)."""
    alarm_timeout_s: float | None = 600.0
    """Seconds after the alarm when it resolves as ``'timeout'`` and the announcement stops (None: never)."""
    rearm_s: float = 60.0
    """Seconds a guard release suppresses the bikes that were in the car."""
    same_object_iou: float = 0.5
    """IoU of a new track's first good box with a suppressed object's box that makes it the same object."""

    def __post_init__(self) -> None:
        pts = tuple((float(p[0]), float(p[1])) for p in self.zone)
        if len(pts) < 3 or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for p in pts for v in p):
            raise ValueError(f"zone: at least 3 points with x and y in 0..1 (normalized), got {list(self.zone)}")
        object.__setattr__(self, "zone", pts)
        if not self.labels:
            raise ValueError("classes: at least one bike class is needed")
        if not 0.0 <= self.min_score <= 1.0 or not 0.0 <= self.min_area_frac <= 1.0:
            raise ValueError("min_score and min_area_frac must be in 0..1")
        if not 0.0 <= self.min_span_frac <= 1.0 or not 0.0 < self.min_aspect <= self.max_aspect:
            raise ValueError("min_span_frac must be in 0..1 and 0 < min_aspect <= max_aspect")
        if not 1 <= self.min_good <= self.window:
            raise ValueError(f"need 1 <= min_good <= window, got {self.min_good} and {self.window}")
        for name in ("dwell_s", "clear_s", "rearm_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {v}")
        if not (math.isfinite(self.max_hold_s) and self.max_hold_s > 0):
            raise ValueError(f"max_hold_s must be positive, got {self.max_hold_s}")
        if self.alarm_timeout_s is not None and not (math.isfinite(self.alarm_timeout_s)
                                                     and self.alarm_timeout_s >= self.max_hold_s):
            raise ValueError("alarm_timeout_s must be at least max_hold_s (the door goes first) or None")
        if not 0.0 < self.same_object_iou <= 1.0:
            raise ValueError("same_object_iou must be in (0, 1]")

    @property
    def labels(self) -> frozenset[str]:
        """Every label taken for a bike."""
        return self.classes | {self.site_class} if self.site_class else self.classes


# --- actions ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HoldDoor:
    """Set the door-hold relay: ``on`` holds the car's doors open."""

    on: bool
    reason: ActionReason = "confirmed"


@dataclass(frozen=True, slots=True)
class Announce:
    """Start or stop the car's voice message or siren."""

    on: bool
    reason: ActionReason = "confirmed"


@dataclass(frozen=True, slots=True)
class RaiseAlarm:
    """An e-bike is confirmed in the car. ``box`` (frame pixels), ``score`` and ``label`` are the confirming
    observation's; ``since_s`` is when the track's good run began (where evidence clips should start)."""

    track_id: int
    label: str
    score: float
    box: Box
    since_s: float = 0.0
    at_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ResolveAlarm:
    """The open alarm ends. ``track_id`` is the one the alarm was raised for; ``by`` who released it (guard
    release only). Only ``'left'`` means the bike was seen to go."""

    reason: ResolveReason
    track_id: int = 0
    at_s: float = 0.0
    by: str | None = None


EbikeAction = HoldDoor | Announce | RaiseAlarm | ResolveAlarm


# --- state -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Evidence:
    """One bike-like track's recent observations."""

    good: deque[bool]
    run_since_s: float | None = None
    first_box: Box | None = None


@dataclass(slots=True)
class _Episode:
    """The open alarm of the car."""

    track_id: int
    raised_s: float
    last_present_s: float
    door_since_s: float | None
    announcing: bool = True
    boxes: dict[int, Box] = field(default_factory=dict)


@dataclass(slots=True)
class _Suppressed:
    """Bikes a resolved alarm was about, kept from raising another until they go (or ``until_s``)."""

    ids: set[int]
    boxes: list[Box]
    last_seen_s: float
    until_s: float | None


class EbikeLiftRule:
    """The lift-blocker decisions of one car camera (see the module docstring for the policies)."""

    def __init__(self, spec: EbikeLiftSpec) -> None:
        self.spec = spec
        self._labels = spec.labels
        self._evidence: dict[int, _Evidence] = {}
        self._episode: _Episode | None = None
        self._suppressed: list[_Suppressed] = []
        self._last_now_s: float | None = None
        self._scaled_for: tuple[int, int] | None = None
        self._polygon: list[Point] = []
        self._counts = {"alarms": 0, "left": 0, "timeout": 0, "guard_release": 0, "max_hold": 0,
                        "suppressed_confirmations": 0}

    # -- state seen from outside ------------------------------------------------------------------------

    @property
    def alarm_open(self) -> bool:
        return self._episode is not None

    @property
    def door_held(self) -> bool:
        return self._episode is not None and self._episode.door_since_s is not None

    @property
    def announcing(self) -> bool:
        return self._episode is not None and self._episode.announcing

    def next_deadline_s(self) -> float | None:
        """When :meth:`tick` next has something to do (door hold or alarm timeout), None when nothing is due."""
        ep = self._episode
        if ep is None:
            return None
        times = []
        if ep.door_since_s is not None:
            times.append(ep.door_since_s + self.spec.max_hold_s)
        if self.spec.alarm_timeout_s is not None:
            times.append(ep.raised_s + self.spec.alarm_timeout_s)
        return min(times) if times else None

    def stats(self) -> dict[str, int]:
        """Counters: alarms raised, how they ended, door holds cut by ``max_hold_s``, confirmations of
        suppressed objects that did not raise; and the tracks and suppressed objects held now."""
        return {**self._counts, "tracks": len(self._evidence), "suppressed": len(self._suppressed)}

    # -- inputs -----------------------------------------------------------------------------------------

    def update(self, tracks: Sequence[Track], frame_w: int, frame_h: int, now_s: float) -> list[EbikeAction]:
        """One detection tick: every live confirmed track of the car camera (any class; a track not passed is
        taken as ended) at ``now_s`` monotonic seconds, never going back."""
        if frame_w <= 0 or frame_h <= 0:
            raise ValueError(f"frame size must be positive, got {frame_w}x{frame_h}")
        self._clock(now_s)
        actions = self._timers(now_s)
        self._scale(frame_w, frame_h)
        frame_area = float(frame_w * frame_h)
        bikes = [t for t in tracks if t.confirmed and t.label in self._labels]
        present: list[Track] = []
        confirming: list[Track] = []
        for t in bikes:
            inside = self._inside(t.box)
            if inside and (t.matched or t.stationary):
                present.append(t)
            ev = self._evidence.get(t.id)
            if ev is None:
                ev = self._evidence[t.id] = _Evidence(deque(maxlen=self.spec.window))
            if not t.matched:
                continue
            good = inside and self._plausible(t, frame_w, frame_h, frame_area)
            ev.good.append(good)
            if not any(ev.good):
                ev.run_since_s, ev.first_box = None, None
            elif good and ev.run_since_s is None:
                ev.run_since_s, ev.first_box = now_s, t.box
            if (good and ev.run_since_s is not None and sum(ev.good) >= self.spec.min_good
                    and _elapsed(now_s, ev.run_since_s, self.spec.dwell_s)):
                confirming.append(t)
        live = {t.id for t in bikes}
        for tid in [k for k in self._evidence if k not in live]:
            del self._evidence[tid]
        self._update_suppressed(bikes, present, now_s)
        ep = self._episode
        if ep is not None:
            for t in present:
                ep.last_present_s = now_s
                ep.boxes[t.id] = t.box
            if _elapsed(now_s, ep.last_present_s, self.spec.clear_s):
                actions += self._resolve("left", now_s)
            return actions
        candidates = [t for t in confirming if not self._is_suppressed(t.id)]
        self._counts["suppressed_confirmations"] += len(confirming) - len(candidates)
        if candidates:
            best = max(candidates, key=lambda t: (t.score, -t.id))
            since = self._evidence[best.id].run_since_s
            self._episode = _Episode(track_id=best.id, raised_s=now_s, last_present_s=now_s, door_since_s=now_s,
                                     boxes={t.id: t.box for t in present})
            self._counts["alarms"] += 1
            actions += [HoldDoor(True, "confirmed"), Announce(True, "confirmed"),
                        RaiseAlarm(best.id, best.label, float(best.score), _floats(best.box),
                                   since_s=now_s if since is None else since, at_s=now_s)]
        return actions

    def tick(self, now_s: float) -> list[EbikeAction]:
        """Only the timers (door hold, alarm timeout), for when no frame comes."""
        self._clock(now_s)
        return self._timers(now_s)

    def release(self, now_s: float, by: str) -> list[EbikeAction]:
        """A guard releases the lift: door and announcement off, the alarm resolved, the bikes in the car
        suppressed for ``rearm_s``. Nothing when no alarm is open."""
        self._clock(now_s)
        actions = self._timers(now_s)
        if self._episode is None:
            return actions
        return actions + self._resolve("guard_release", now_s, by=by)

    # -- internals --------------------------------------------------------------------------------------

    def _clock(self, now_s: float) -> None:
        if not math.isfinite(now_s):
            raise ValueError(f"time must be finite, got {now_s}")
        if self._last_now_s is not None and now_s < self._last_now_s:
            raise ValueError(f"time went back: {now_s} after {self._last_now_s}")
        self._last_now_s = now_s

    def _timers(self, now_s: float) -> list[EbikeAction]:
        ep = self._episode
        if ep is None:
            return []
        timeout = self.spec.alarm_timeout_s
        if timeout is not None and _elapsed(now_s, ep.raised_s, timeout):
            return self._resolve("timeout", now_s)
        if ep.door_since_s is not None and _elapsed(now_s, ep.door_since_s, self.spec.max_hold_s):
            ep.door_since_s = None
            self._counts["max_hold"] += 1
            return [HoldDoor(False, "max_hold")]
        return []

    def _resolve(self, reason: ResolveReason, now_s: float, *, by: str | None = None) -> list[EbikeAction]:
        ep = self._episode
        assert ep is not None
        self._episode = None
        self._counts[reason] += 1
        out: list[EbikeAction] = []
        if ep.door_since_s is not None:
            out.append(HoldDoor(False, reason))
        if ep.announcing:
            out.append(Announce(False, reason))
        out.append(ResolveAlarm(reason, ep.track_id, now_s, by))
        if reason != "left" and ep.boxes:
            until = now_s + self.spec.rearm_s if reason == "guard_release" else None
            self._suppressed.append(_Suppressed(set(ep.boxes), list(ep.boxes.values()), now_s, until))
        return out

    def _update_suppressed(self, bikes: list[Track], present: list[Track], now_s: float) -> None:
        if not self._suppressed:
            return
        present_ids = {t.id for t in present}
        keep: list[_Suppressed] = []
        for sup in self._suppressed:
            for t in bikes:
                if t.id in sup.ids:
                    continue
                ev = self._evidence.get(t.id)
                if ev is not None and ev.first_box is not None and any(
                        box_iou(ev.first_box, b) >= self.spec.same_object_iou for b in sup.boxes):
                    sup.ids.add(t.id)
            seen = [t for t in bikes if t.id in sup.ids and t.id in present_ids]
            if seen:
                sup.last_seen_s = now_s
                sup.boxes = [t.box for t in seen]
            if sup.until_s is not None and _elapsed(now_s, sup.until_s, 0.0):
                continue
            if _elapsed(now_s, sup.last_seen_s, self.spec.clear_s):
                continue
            keep.append(sup)
        self._suppressed = keep

    def _is_suppressed(self, track_id: int) -> bool:
        return any(track_id in sup.ids for sup in self._suppressed)

    def _plausible(self, t: Track, frame_w: int, frame_h: int, frame_area: float) -> bool:
        s = self.spec
        w, h = t.box[2] - t.box[0], t.box[3] - t.box[1]
        if not (w > 0 and h > 0) or t.score < s.min_score:
            return False
        if w * h < s.min_area_frac * frame_area or max(w / frame_w, h / frame_h) < s.min_span_frac:
            return False
        return s.min_aspect <= w / h <= s.max_aspect

    def _scale(self, frame_w: int, frame_h: int) -> None:
        if self._scaled_for != (frame_w, frame_h):
            self._polygon = [(x * frame_w, y * frame_h) for x, y in self.spec.zone]
            self._scaled_for = (frame_w, frame_h)

    def _inside(self, box: Box) -> bool:
        """Even-odd test of the box's bottom-centre against the car polygon."""
        px, py = (box[0] + box[2]) / 2.0, box[3]
        if not (math.isfinite(px) and math.isfinite(py)):
            return False
        inside = False
        poly = self._polygon
        for (x1, y1), (x2, y2) in zip(poly, poly[1:] + poly[:1], strict=True):
            if (y1 > py) != (y2 > py) and px < x1 + (py - y1) * (x2 - x1) / (y2 - y1):
                inside = not inside
        return inside


def _elapsed(now_s: float, since_s: float, span_s: float) -> bool:
    """Whether ``span_s`` has passed since ``since_s``, to the microsecond: tick times are sums of floats, and
    0.8 - 0.2 must count as the 0.6 s it stands for (a deadline from next_deadline_s() likewise)."""
    return now_s - since_s >= span_s - _TIME_EPS_S


def _floats(box: Box) -> Box:
    """Plain floats (a box built from numpy scalars would carry them into events)."""
    return float(box[0]), float(box[1]), float(box[2]), float(box[3])



__all__ = [
    "BIKE_CLASSES",
    "Announce",
    "EbikeAction",
    "EbikeLiftRule",
    "EbikeLiftSpec",
    "HoldDoor",
    "RaiseAlarm",
    "ResolveAlarm",
    "ResolveReason",
]
