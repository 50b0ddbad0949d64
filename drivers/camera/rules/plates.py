"""Car gate: the plate reads of one vehicle track voted into one decision (open, visitor or undecided).

A pure core: the reads of the plate reader (``clp_v2_c_rec`` through ``models/decoders/plates.py``: text, the
weakest character's score, every character's score) and, where the site runs one, a general text reader's read
of the same crop as a second opinion, fed frame by frame with the monotonic time and the wall-clock time; the
residents' list reached through a ``lookup(plate) -> PlateEntry | None`` callable (the daemon binds it to
:class:`~edgeagent.drivers.camera.rules.plate_list.PlateList`); :class:`GateDecision` s out, **one per track**.

Policies:

* **Normalization** (:func:`normalize_plate`): full-width forms to half-width (NFKC), upper case, everything but
  letters, digits and CJK characters dropped (spaces, ``·``, ``-``, dots), so ``京a·f0236`` is ``京AF0236``.
* **Which reads vote.** A read votes only if its weakest character scores at least ``min_read_confidence``
  and it has 7 (blue) or 8 (green) characters; a low-confidence read never counts toward anything.
* **Voting.** The plate's length is voted first (each read weighs its mean character score; the general
  reader's read ``second_opinion_weight`` of that); then each position among the reads of that length, each
  character weighing its own score. ``agreement`` is the winning length's share of all voting weight times
  the smallest winning share over the positions; ``confidence`` is the smallest, over the positions, of the
  mean score of the characters that won there. Reads of another length (a character dropped or doubled)
  are not aligned into the positions: they only count against the length's share.
* **Opening** needs all of: at least ``min_frames`` *sure* reads of the voted plate (reads by the plate reader
  of exactly that plate, every character scoring at least ``min_confidence`` and the province character,
  the reader's weakest, at least ``min_province_confidence``), ``agreement >= min_agreement``, the plate's
  format (``plate_format_ok``) and a list entry valid at the wall-clock time. So a plate only opens if the
  reader read exactly it, surely, in ``min_frames`` frames *and* it dominates every position of everything
  read so far: characters voted together from different frames (a plate no frame read whole) never open, a
  low-confidence read never counts toward an open, and a few frames misreading a character can neither open
  for that misread nor, while fewer than a third of the right reads, stop the right plate. The decision is
  taken on the frame where this first holds (the gate opens while the car approaches).
* **Visitor.** The same evidence without a valid entry decides ``visitor`` (reason ``not_in_list``,
  ``entry_expired``, ``entry_not_yet_valid``), but not before ``visitor_wait_s`` after the track's first
  voting read: a resident's plate read better as the car comes closer still opens.
* **Track end or timeout** (``end()``, or ``decide_after_s`` after the track's first frame): a plate that meets
  the opening rule opens; otherwise ``visitor`` when some read voted (reason: what was missing,
  ``low_confidence``, ``too_few_reads``, ``reads_disagree``, ``bad_format``, or the entry's state), and
  ``undecided`` when nothing readable was seen (``unreadable`` when reads came but none voted, ``no_plate``).
* **Once per track.** After its decision a voter ignores further reads (counted in ``ignored``).
* **Bounded.** A voter keeps the last ``max_reads`` voting reads (older ones drop: a car parked in the
  zone for minutes is judged on what it looks like now); :class:`PlateGate` holds at most ``max_tracks``
  voters and decides the oldest (as if its track ended) to make room, counting it in ``evicted``.

Residents' plates are personal data: the list and the decisions' ``entry`` stay on the box (the local
guard-room view); what leaves it is the caller's choice (the events that need a plate).
"""

from __future__ import annotations

import unicodedata
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal

from edgeagent.models.decoders.plates import PlateRead, plate_format_ok
from edgeagent.models.types import Detection

Decision = Literal["open", "visitor", "undecided"]
Validity = Literal["valid", "expired", "not_yet_valid"]
Source = Literal["reader", "ocr"]
PlateLookup = Callable[[str], "PlateEntry | None"]

PLATE_LENGTHS: Final = (7, 8)
CHAR_SCORE_KEY: Final = "char_score_"  # Detection.extra keys a reader may fill with per-character scores


def normalize_plate(text: str) -> str:
    """``text`` as the list keeps plates: NFKC (full-width to half-width), upper case, only letters, digits
    and CJK characters (the province character stays)."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).upper() if c.isalnum())


def _normalize_scored(text: str, scores: Sequence[float]) -> tuple[str, tuple[float, ...]]:
    """Normalize character by character, each kept character keeping its own score."""
    chars: list[str] = []
    kept: list[float] = []
    for char, score in zip(text, scores, strict=True):
        for c in normalize_plate(char):
            chars.append(c)
            kept.append(float(score))
    return "".join(chars), tuple(kept)


@dataclass(frozen=True, slots=True)
class PlateEntry:
    """One plate of the residents' list. Times are timezone-aware (UTC as stored); ``valid_from`` /
    ``valid_until`` of None mean no limit; ``valid_until`` is exclusive."""

    plate: str
    ref: str = ""  # the resident or unit this plate belongs to, e.g. "3-1-502"
    reason: str = "resident"  # resident, staff, delivery contract, ...
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    added_by: str = ""
    added_at: datetime | None = None

    def validity(self, at: datetime) -> Validity:
        if self.valid_from is not None and at < self.valid_from:
            return "not_yet_valid"
        if self.valid_until is not None and at >= self.valid_until:
            return "expired"
        return "valid"


@dataclass(frozen=True, slots=True)
class PlateVoteConfig:
    """How one vehicle track's plate reads become a decision (the daemon's config is built from this).

    Figures quoted are from the shipped reader on synthetic plates (``tests/synth_plates.py``) on the car photo,
    12 frames a track 0.2 s apart, the plate growing from 90 to 160 px wide as the car approaches, at light,
    middle and the hardest wear of ``random_wear`` (levels 0.25, 0.5, 1; 150 tracks each); "lookalike" is the
    worst case of a visitor whose plate differs from 30 listed plates only in the province character (the
    reader's weakest: it was trained mostly on 皖 plates and reads other provinces as 皖 under blur).

    Measured with these defaults: residents opened 65, 48 and 21 % of the time at light, middle and hardest
    wear (the others got a visitor call, mostly for a doubtful province character), never for another plate;
    lookalikes opened 0 times in 450; an open came 1.1 to 1.7 s after the track's first frame on average.

    ``min_read_confidence`` (0..1, default 0.6): the weakest character's score a read needs to vote at all.
    Wrong characters scored 0.56 (province) and 0.60 (others) at the median, right ones 0.97 and 1.0; the
    figures above barely move between 0.5 and 0.8.
    ``min_confidence`` (0..1, default 0.8): every character of a read must score this for the read to count
    toward ``min_frames`` (per character it kept 94 % of right characters and 22 % of wrong ones).
    ``min_province_confidence`` (0..1, default 0.95): the same for the province character. Without it
    lookalikes opened 3, 2 and 6 times in 150 (light, middle, hardest wear), at 0.9 1, 0 and 2 times; at 0.95
    never, for residents' opens of 65, 48, 21 % instead of 75, 60, 25 % without it.
    ``min_frames`` (count, default 3): sure reads of the whole plate needed to open or to declare a visitor
    early. A misread has to repeat exactly and surely this often, and dominate, to act. At 2, lookalikes
    opened 1, 0 and 4 times in 150; at 4 residents' opens fell to 59, 42 and 15 %.
    ``min_agreement`` (0..1, default 0.75): the voted plate's share of the votes (length share times the
    smallest position share) needed; above 0.5 so two plates can never both qualify, 0.75 so a minority of
    misreads a third the size of the right reads still lets it open (0.67: one lookalike opened at the
    hardest wear).
    ``visitor_wait_s`` (seconds, default 2.0): a visitor is declared no sooner after the track's first voting
    read (a resident's plate still far away may read as another plate at first); the track's end decides
    at once.
    ``decide_after_s`` (seconds, default 10.0): after the track's first frame the voter decides with what it
    has, even if the track goes on (a car waiting at the barrier must get its visitor call).
    ``second_opinion_weight`` (0..1, default 0.5): a general text reader's read weighs this much of the plate
    reader's (it reads any text, so it is a check, not the judge); its reads never count toward
    ``min_frames``.
    ``max_reads`` (count, default 64): voting reads kept per track, the oldest dropped first.
    """

    min_read_confidence: float = 0.6
    min_confidence: float = 0.8
    min_province_confidence: float = 0.95
    min_frames: int = 3
    min_agreement: float = 0.75
    visitor_wait_s: float = 2.0
    decide_after_s: float = 10.0
    second_opinion_weight: float = 0.5
    max_reads: int = 64

    def __post_init__(self) -> None:
        for name in ("min_read_confidence", "min_confidence", "min_province_confidence", "second_opinion_weight"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {value}")
        if not 0.5 < self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be above 0.5 and at most 1, got {self.min_agreement}")
        if self.min_frames < 1:
            raise ValueError(f"min_frames must be at least 1, got {self.min_frames}")
        if self.max_reads < self.min_frames:
            raise ValueError(f"max_reads ({self.max_reads}) must be at least min_frames ({self.min_frames})")
        if self.visitor_wait_s < 0 or self.decide_after_s <= 0:
            raise ValueError("visitor_wait_s must be >= 0 and decide_after_s > 0")


@dataclass(frozen=True, slots=True)
class PlateObservation:
    """One read of the plate in one frame: ``char_scores`` one per character of ``text`` (empty: every
    character scores ``confidence``, as when only a detection's score is at hand)."""

    text: str
    confidence: float
    char_scores: tuple[float, ...] = ()

    @classmethod
    def from_read(cls, read: PlateRead) -> PlateObservation:
        """From the plate reader's decoded read (``ctc_greedy_decode``)."""
        return cls(read.text, read.confidence, read.char_scores)

    @classmethod
    def from_detection(cls, detection: Detection) -> PlateObservation | None:
        """From a reader's detection (``read_plates``: score the plate's, text score in ``extra``; the
        ``ctc_plate`` decoder: score the text's). Per-character scores are taken from ``extra`` keys
        ``char_score_0``, ``char_score_1``, ... when all are there; without them every character scores the
        read's confidence (its weakest character), which is stricter. None when nothing was read."""
        if not detection.text:
            return None
        score = float(detection.extra.get("text_score", detection.score))
        keys = [f"{CHAR_SCORE_KEY}{i}" for i in range(len(detection.text))]
        if all(k in detection.extra for k in keys):
            return cls(detection.text, score, tuple(float(detection.extra[k]) for k in keys))
        return cls(detection.text, score)


@dataclass(frozen=True, slots=True)
class GateDecision:
    """The one decision for a vehicle track.

    ``plate``: the voted plate (None when nothing voted); ``confidence`` and ``agreement`` as the module
    says; ``votes``: plate reader reads of exactly ``plate``; ``sure``: those sure of every character (what
    ``min_frames`` counts); ``reads``: reads that voted; ``frames``: frames fed for the track (with or without
    a read); ``entry``: the list's entry for ``plate`` when there is one, valid or not (local use only: the
    guard room may see whose plate it resembles); ``decided_s``: the monotonic time of the decision;
    ``latency_s``: from the track's first frame to the decision.
    """

    track_id: int
    plate: str | None
    confidence: float
    agreement: float
    votes: int
    sure: int
    reads: int
    frames: int
    decision: Decision
    reason: str
    entry: PlateEntry | None
    decided_s: float
    latency_s: float


@dataclass(frozen=True, slots=True)
class _Read:
    text: str
    scores: tuple[float, ...]
    source: Source


@dataclass(frozen=True, slots=True)
class Tally:
    """The vote so far (for a status view and the tests)."""

    plate: str | None
    confidence: float
    agreement: float
    votes: int  # plate reader reads of exactly ``plate``
    sure: int  # of those, the ones sure of every character (min_confidence, min_province_confidence)
    reads: int


class PlateVoter:
    """The votes of one vehicle track. Feed every frame of the track (``read`` None when no plate was
    read in it); the first decision comes back once, then None. ``lookup`` is called only when a plate is
    voted (at most once a frame); what it raises goes to the caller."""

    def __init__(self, track_id: int, config: PlateVoteConfig, lookup: PlateLookup, *, started_s: float) -> None:
        self.track_id = track_id
        self.config = config
        self._lookup = lookup
        self.started_s = started_s
        self.first_vote_s: float | None = None
        self.frames = 0
        self.seen_reads = 0  # reads fed, voting or not
        self.ignored = 0
        self.decision: GateDecision | None = None
        self._reads: deque[_Read] = deque(maxlen=config.max_reads)

    # --- input ------------------------------------------------------------------------------------------

    def feed(self, now_s: float, at: datetime, read: PlateObservation | None = None,
             second: PlateObservation | None = None) -> GateDecision | None:
        """One frame of the track: the plate reader's read and the general reader's (either may be None).
        ``now_s`` monotonic seconds, ``at`` the wall-clock time (aware) for the entries' validity."""
        if self.decision is not None:
            self.ignored += 1
            return None
        self.frames += 1
        if read is not None:
            self._add(read, "reader", now_s)
        if second is not None:
            self._add(second, "ocr", now_s)
        tally = self.tally()
        if self._strong(tally) and tally.plate is not None:
            entry = self._lookup(tally.plate)
            if entry is not None and entry.validity(at) == "valid":
                return self._decide("open", "plate_match", tally, entry, now_s)
            waited = self.first_vote_s is not None and now_s - self.first_vote_s >= self.config.visitor_wait_s
            if waited:
                return self._decide("visitor", self._entry_reason(entry, at), tally, entry, now_s)
        if now_s - self.started_s >= self.config.decide_after_s:
            return self.end(now_s, at)
        return None

    def end(self, now_s: float, at: datetime) -> GateDecision | None:
        """The track ended (or timed out): decide with what there is. None if it was decided before."""
        if self.decision is not None:
            return None
        tally = self.tally()
        if tally.plate is None:
            reason = "unreadable" if self.seen_reads else "no_plate"
            return self._decide("undecided", reason, tally, None, now_s)
        entry = self._lookup(tally.plate)
        if self._strong(tally):
            if entry is not None and entry.validity(at) == "valid":
                return self._decide("open", "plate_match", tally, entry, now_s)
            return self._decide("visitor", self._entry_reason(entry, at), tally, entry, now_s)
        return self._decide("visitor", self._weakness(tally), tally, entry, now_s)

    def _add(self, obs: PlateObservation, source: Source, now_s: float) -> None:
        self.seen_reads += 1
        scores = obs.char_scores if obs.char_scores else (obs.confidence,) * len(obs.text)
        if len(scores) != len(obs.text):
            return  # a read whose scores do not match its text cannot be weighed: it does not vote
        text, kept = _normalize_scored(obs.text, scores)
        if len(text) not in PLATE_LENGTHS or not kept:
            return
        weakest = min(kept)
        if not weakest >= self.config.min_read_confidence:  # NaN never votes
            return
        if any(not 0.0 <= s <= 1.0 for s in kept):
            return
        if self.first_vote_s is None:
            self.first_vote_s = now_s
        self._reads.append(_Read(text, kept, source))

    # --- voting -----------------------------------------------------------------------------------------

    def tally(self) -> Tally:
        """The vote over the reads kept so far."""
        reads = list(self._reads)
        if not reads:
            return Tally(None, 0.0, 0.0, 0, 0, 0)
        ocr_w = self.config.second_opinion_weight
        by_length: dict[int, float] = {}
        for r in reads:
            w = (ocr_w if r.source == "ocr" else 1.0) * sum(r.scores) / len(r.scores)
            by_length[len(r.text)] = by_length.get(len(r.text), 0.0) + w
        total = sum(by_length.values())
        # ties: the longer plate (a green plate read with one character dropped is the commoner mistake)
        length = max(by_length, key=lambda k: (by_length[k], k))
        length_share = by_length[length] / total if total > 0 else 0.0
        same = [r for r in reads if len(r.text) == length]
        chars: list[str] = []
        shares: list[float] = []
        confidences: list[float] = []
        for i in range(length):
            weight: dict[str, float] = {}  # character -> sum of source weight x its score
            sources: dict[str, float] = {}  # character -> sum of source weights (for the mean score)
            for r in same:
                src_w = ocr_w if r.source == "ocr" else 1.0
                char = r.text[i]
                weight[char] = weight.get(char, 0.0) + src_w * r.scores[i]
                sources[char] = sources.get(char, 0.0) + src_w
            pos_total = sum(weight.values())
            best = max(weight, key=lambda k: (weight[k], k))
            chars.append(best)
            shares.append(weight[best] / pos_total if pos_total > 0 else 0.0)
            confidences.append(weight[best] / sources[best] if sources[best] > 0 else 0.0)
        plate = "".join(chars)
        whole = [r for r in same if r.source == "reader" and r.text == plate]
        cfg = self.config
        sure = sum(1 for r in whole
                   if r.scores[0] >= cfg.min_province_confidence and min(r.scores) >= cfg.min_confidence)
        return Tally(plate=plate, confidence=min(confidences), agreement=length_share * min(shares), votes=len(whole),
                     sure=sure, reads=len(reads))

    def _strong(self, tally: Tally) -> bool:
        c = self.config
        return (tally.plate is not None and tally.sure >= c.min_frames and tally.agreement >= c.min_agreement
                and plate_format_ok(tally.plate))

    def _weakness(self, tally: Tally) -> str:
        c = self.config
        if tally.agreement < c.min_agreement:
            return "reads_disagree"
        if tally.votes < c.min_frames:
            return "too_few_reads"
        if tally.sure < c.min_frames:
            return "low_confidence"
        return "bad_format"

    @staticmethod
    def _entry_reason(entry: PlateEntry | None, at: datetime) -> str:
        if entry is None:
            return "not_in_list"
        state = entry.validity(at)
        return "entry_expired" if state == "expired" else "entry_not_yet_valid"

    def _decide(self, decision: Decision, reason: str, tally: Tally, entry: PlateEntry | None,
                now_s: float) -> GateDecision:
        self.decision = GateDecision(
            track_id=self.track_id, plate=tally.plate, confidence=tally.confidence, agreement=tally.agreement,
            votes=tally.votes, sure=tally.sure, reads=tally.reads, frames=self.frames, decision=decision, reason=reason,
            entry=entry, decided_s=now_s, latency_s=max(0.0, now_s - self.started_s))
        return self.decision


@dataclass
class PlateGate:
    """The voters of one gate camera's vehicle tracks. ``feed`` every frame of every vehicle track in the
    gate zone, ``end`` a track when the tracker drops it or it leaves the zone, ``tick`` now and then for the
    timeouts of tracks that stopped getting frames. Decisions come back once per track."""

    config: PlateVoteConfig
    lookup: PlateLookup
    max_tracks: int = 32
    evicted: int = 0
    _voters: dict[int, PlateVoter] = field(default_factory=dict)
    _done: deque[int] = field(default_factory=lambda: deque(maxlen=256))

    def feed(self, track_id: int, now_s: float, at: datetime, read: PlateObservation | None = None,
             second: PlateObservation | None = None) -> list[GateDecision]:
        out: list[GateDecision] = []
        voter = self._voters.get(track_id)
        if voter is None:
            if track_id in self._done:
                return out  # decided already: one decision per track
            while len(self._voters) >= self.max_tracks:
                oldest = min(self._voters.values(), key=lambda v: v.started_s)
                out.extend(self._finish(oldest, now_s, at))
                self.evicted += 1
            voter = PlateVoter(track_id, self.config, self.lookup, started_s=now_s)
            self._voters[track_id] = voter
        decision = voter.feed(now_s, at, read, second)
        if decision is not None:
            out.append(decision)
            self._retire(voter)
        return out

    def end(self, track_id: int, now_s: float, at: datetime) -> list[GateDecision]:
        voter = self._voters.get(track_id)
        return [] if voter is None else self._finish(voter, now_s, at)

    def tick(self, now_s: float, at: datetime) -> list[GateDecision]:
        out: list[GateDecision] = []
        for voter in list(self._voters.values()):
            if now_s - voter.started_s >= self.config.decide_after_s:
                out.extend(self._finish(voter, now_s, at))
        return out

    def active(self) -> list[int]:
        return sorted(self._voters)

    def _finish(self, voter: PlateVoter, now_s: float, at: datetime) -> list[GateDecision]:
        decision = voter.end(now_s, at)
        self._retire(voter)
        return [] if decision is None else [decision]

    def _retire(self, voter: PlateVoter) -> None:
        self._voters.pop(voter.track_id, None)
        self._done.append(voter.track_id)
