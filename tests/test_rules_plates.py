"""The car gate's plate core: synthetic plates read by the shipped detector and reader, the voting of a track's
reads into one decision (resident opens, visitor does not, expired does not, misreads never open another
plate: hypothesis), and the residents' list store (SQLite, CSV import, a reader while a writer writes)."""

from __future__ import annotations

import codecs
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeagent.drivers.camera.rules.plate_list import (
    PlateList,
    PlateListError,
    parse_plate,
    parse_when,
    plates_path,
)
from edgeagent.drivers.camera.rules.plates import (
    GateDecision,
    PlateEntry,
    PlateGate,
    PlateObservation,
    PlateVoteConfig,
    PlateVoter,
    normalize_plate,
)
from edgeagent.models.decoders import plates as decoders
from tests import synth_plates as sp
from tests.media import MODELS

CHARSET = decoders.load_charset(MODELS / "clp_dict.txt")
AT = datetime(2025, 6, 1, 4, 0, tzinfo=UTC)  # noon in Beijing
CFG = PlateVoteConfig()
A = "京AF0236"
B = "京AF0286"  # one character from A: the misread the voting must not act on


# --- the real reader on synthetic plates ------------------------------------------------------------------


def _session(name: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(MODELS / name), sess_options=options, providers=["CPUExecutionProvider"])


class Reader:
    """The shipped plate detector and reader, as the gate runs them: the best plate in a frame, warped and
    read, with every character's score."""

    def __init__(self) -> None:
        self.det = _session("clp_det.onnx")
        self.rec = _session("clp_v2_c_rec.onnx")
        self.det_in = self.det.get_inputs()[0].name
        self.det_out = [o.name for o in self.det.get_outputs()]
        self.rec_in = self.rec.get_inputs()[0].name

    def detector(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.det_out, self.det.run(None, {self.det_in: x}), strict=True))

    def reader(self, x: np.ndarray) -> list[Any]:
        return list(self.rec.run(None, {self.rec_in: x}))

    def read_crop(self, crop: np.ndarray) -> decoders.PlateRead:
        return decoders.ctc_greedy_decode(self.reader(decoders.plate_reader_input([crop]))[0], CHARSET)[0]

    def read_frame(self, image: np.ndarray) -> decoders.PlateRead | None:
        h, w = image.shape[:2]
        found = decoders.decode_clp_arrays(*decoders.split_clp_outputs(self.detector(decoders.clp_det_input(image))),
                                           h, w)[0]
        if found.scores.size == 0:
            return None
        return self.read_crop(decoders.warp_plate(image, found.corners[0]))


@pytest.fixture(scope="module")
def reader() -> Reader:
    return Reader()


@pytest.mark.parametrize("text", ["京AF0236", "沪KR9035", "苏E5A2B8", "鲁QF7788", "渝C7X3K9", "京AD54321",
                                  "浙BD12345", "粤BD12345"])
def test_flat_plates_read_correctly(reader: Reader, text: str) -> None:
    plate = sp.render_plate(text)
    assert plate.shape == ((140, 440, 3) if len(text) == 7 else (140, 480, 3))
    read = reader.read_crop(decoders.warp_plate(plate, decoders.image_corners(plate)))
    assert read.text == text
    assert read.confidence > 0.9
    assert decoders.plate_format_ok(text)


@pytest.mark.parametrize("text", ["沪KR9035", "苏E5A2B8", "鲁QF7788", "闽D88888", "闽CFE5613"])
def test_plates_on_the_car_found_and_read(reader: Reader, text: str) -> None:
    car = sp.car_with_plate(text, sp.Wear(blur_px=0.5, perspective=0.08), np.random.default_rng(1))
    found = [d for d in decoders.read_plates(reader.detector, reader.reader, car.image, CHARSET) if d.text]
    assert len(found) == 1
    assert found[0].text == text
    assert found[0].extra["text_score"] > 0.75
    # found where it was put
    x1, y1, x2, y2 = found[0].box
    qx, qy = car.quad[:, 0], car.quad[:, 1]
    assert abs(x1 - qx.min()) < 10 and abs(x2 - qx.max()) < 10 and abs(y1 - qy.min()) < 10 and abs(y2 - qy.max()) < 10


@pytest.mark.parametrize("wear", [sp.Wear(blur_px=1.0), sp.Wear(perspective=0.15), sp.Wear(low_light=0.5),
                                  sp.Wear(dirt=0.2)], ids=["blur", "perspective", "low_light", "dirt"])
@pytest.mark.parametrize("text", ["苏E5A2B8", "鲁QF7788"])
def test_each_kind_of_wear_changes_the_image_and_stays_readable(reader: Reader, text: str, wear: sp.Wear) -> None:
    clean = sp.car_with_plate(text, sp.Wear(), np.random.default_rng(1))
    worn = sp.car_with_plate(text, wear, np.random.default_rng(1)).image
    x1, y1 = (int(v) - 10 for v in clean.quad.min(axis=0))
    x2, y2 = (int(v) + 10 for v in clean.quad.max(axis=0))
    changed = np.abs(worn[y1:y2, x1:x2].astype(np.int16) - clean.image[y1:y2, x1:x2].astype(np.int16))
    assert float(changed.mean()) > 3.0  # the plate looks different
    read = reader.read_frame(worn)
    assert read is not None and read.text == text


def test_renderer_names_the_font_package_when_the_font_is_missing(tmp_path: Path) -> None:
    with pytest.raises(sp.MissingFontError, match="fonts-wqy-zenhei"):
        sp.cjk_font_path([tmp_path / "no-such-font.ttc"])
    with pytest.raises(ValueError, match=r"7 .* or 8"):
        sp.render_plate("京AF023")


def test_random_plates_have_the_plate_format() -> None:
    rng = np.random.default_rng(0)
    for kind in ("blue", "green"):
        for _ in range(200):
            assert decoders.plate_format_ok(sp.random_plate(rng, kind))  # type: ignore[arg-type]


def _approach(reader: Reader, text: str, *, frames: int = 10, blur: float = 0.4, seed: int = 0
              ) -> list[decoders.PlateRead | None]:
    """A car approaching the gate camera: the plate growing from 100 to 160 px wide, a little blur."""
    reads = []
    for f in range(frames):
        wear = sp.Wear(blur_px=blur, perspective=0.05, width_px=100 + 60 * f / max(1, frames - 1))
        reads.append(reader.read_frame(sp.car_with_plate(text, wear, np.random.default_rng(seed + f)).image))
    return reads


def _drive(voter: PlateVoter, reads: Sequence[decoders.PlateRead | None], *, dt: float = 0.2,
           at: datetime = AT) -> GateDecision:
    for i, read in enumerate(reads):
        decision = voter.feed(i * dt, at, PlateObservation.from_read(read) if read is not None else None)
        if decision is not None:
            return decision
    decision = voter.end(len(reads) * dt, at)
    assert decision is not None
    return decision


def test_resident_car_opens_the_gate(reader: Reader, tmp_path: Path) -> None:
    with PlateList(plates_path(tmp_path)) as listed:
        listed.add("京A·F0236", ref="3-1-502", reason="resident")
        decision = _drive(PlateVoter(7, CFG, listed.find, started_s=0.0), _approach(reader, A))
    assert decision.decision == "open" and decision.reason == "plate_match"
    assert decision.plate == A and decision.track_id == 7
    assert decision.entry is not None and decision.entry.ref == "3-1-502"
    assert decision.votes >= CFG.min_frames and decision.confidence >= CFG.min_confidence
    assert decision.frames < 10  # decided while the car approached, not at the end of its track


def test_visitor_car_does_not_open(reader: Reader, tmp_path: Path) -> None:
    with PlateList(plates_path(tmp_path)) as listed:
        listed.add(A, ref="3-1-502")
        decision = _drive(PlateVoter(8, CFG, listed.find, started_s=0.0), _approach(reader, "苏E5A2B8"))
    assert decision.decision == "visitor" and decision.reason == "not_in_list"
    assert decision.plate == "苏E5A2B8" and decision.entry is None
    assert decision.latency_s >= CFG.visitor_wait_s  # a visitor is declared only after the wait


def test_expired_and_future_entries_do_not_open(reader: Reader, tmp_path: Path) -> None:
    reads = _approach(reader, A)
    with PlateList(plates_path(tmp_path)) as listed:
        listed.add(A, reason="delivery contract", valid_from=AT - timedelta(days=30),
                   valid_until=AT - timedelta(days=1))
        expired = _drive(PlateVoter(1, CFG, listed.find, started_s=0.0), reads)
        listed.add(A, reason="delivery contract", valid_from=AT + timedelta(hours=1))
        future = _drive(PlateVoter(2, CFG, listed.find, started_s=0.0), reads)
        listed.add(A, reason="delivery contract", valid_from=AT - timedelta(hours=1),
                   valid_until=AT + timedelta(hours=1))
        valid = _drive(PlateVoter(3, CFG, listed.find, started_s=0.0), reads)
    assert (expired.decision, expired.reason, expired.plate) == ("visitor", "entry_expired", A)
    assert expired.entry is not None and expired.entry.reason == "delivery contract"
    assert (future.decision, future.reason) == ("visitor", "entry_not_yet_valid")
    assert (valid.decision, valid.plate) == ("open", A)


def test_lookalike_visitor_misread_as_a_listed_plate_does_not_open(reader: Reader) -> None:
    """The reader reads 赣 as 皖 on a small, blurred plate, confidently at times: a visitor 赣J4SQFJ must not
    open the gate for the resident 皖J4SQFJ."""
    visitor, resident = "赣J4SQFJ", "皖J4SQFJ"
    reads = []
    for f in range(12):
        wear = sp.Wear(blur_px=1.2, perspective=0.05, width_px=90 + 70 * f / 11)
        reads.append(reader.read_frame(sp.car_with_plate(visitor, wear, np.random.default_rng(f)).image))
    misreads = [r for r in reads if r is not None and r.text == resident and r.confidence >= CFG.min_read_confidence]
    assert len(misreads) >= CFG.min_frames  # the danger is real in these frames
    decision = _drive(PlateVoter(1, CFG, lambda p: PlateEntry(p) if p == resident else None, started_s=0.0), reads)
    assert decision.decision != "open"


# --- the voting, pure -------------------------------------------------------------------------------------


def obs(text: str, conf: float = 0.98, scores: Sequence[float] | None = None) -> PlateObservation:
    return PlateObservation(text, conf, tuple(scores) if scores is not None else ())


def listing(*entries: PlateEntry | str) -> Callable[[str], PlateEntry | None]:
    table = {e.plate if isinstance(e, PlateEntry) else e: e if isinstance(e, PlateEntry) else PlateEntry(e)
             for e in entries}
    return table.get


def feed_all(voter: PlateVoter, reads: Iterable[PlateObservation | None], *, dt: float = 0.2, t0: float = 0.0,
             at: datetime = AT, second: Sequence[PlateObservation | None] | None = None) -> list[GateDecision]:
    out = []
    for i, read in enumerate(reads):
        d = voter.feed(t0 + i * dt, at, read, second[i] if second is not None else None)
        if d is not None:
            out.append(d)
    return out


def test_normalize_plate() -> None:
    assert normalize_plate("京a·f0236") == A
    assert normalize_plate("京Ａ　Ｆ０２３６") == A  # full-width letters, digits and space
    assert normalize_plate(" 京-A.F 02_36 ") == A
    assert normalize_plate("粤b・d12345") == "粤BD12345"
    assert normalize_plate("") == ""


def test_resident_opens_on_the_frame_the_evidence_is_enough() -> None:
    voter = PlateVoter(1, CFG, listing(A), started_s=10.0)
    decisions = feed_all(voter, [obs(A)] * 6, t0=10.0)
    assert len(decisions) == 1
    d = decisions[0]
    assert (d.decision, d.reason, d.plate, d.votes, d.frames) == ("open", "plate_match", A, 3, 3)
    assert d.latency_s == pytest.approx(0.4) and d.agreement == pytest.approx(1.0)
    assert voter.ignored == 3 and voter.end(20.0, AT) is None  # one decision per track


def test_visitor_waits_then_is_declared_with_the_plate() -> None:
    voter = PlateVoter(1, CFG, listing(A), started_s=0.0)
    decisions = feed_all(voter, [obs("苏E5A2B8")] * 20, dt=0.25)
    assert len(decisions) == 1
    d = decisions[0]
    assert (d.decision, d.reason, d.plate, d.entry) == ("visitor", "not_in_list", "苏E5A2B8", None)
    assert d.decided_s == pytest.approx(CFG.visitor_wait_s)


def test_a_resident_read_wrongly_at_first_still_opens() -> None:
    """Far away the reader reads another (unlisted) plate; closer it reads the resident's: the visitor wait
    keeps the early misread from deciding."""
    voter = PlateVoter(1, CFG, listing(A), started_s=0.0)
    decisions = feed_all(voter, [obs(B)] * 3 + [obs(A)] * 12, dt=0.1)
    assert [d.decision for d in decisions] == ["open"] and decisions[0].plate == A


def test_low_confidence_never_opens() -> None:
    # every read below min_read_confidence: nothing votes, the track ends undecided
    voter = PlateVoter(1, CFG, listing(A), started_s=0.0)
    assert feed_all(voter, [obs(A, CFG.min_read_confidence - 0.05)] * 30, dt=0.01) == []
    d = voter.end(1.0, AT)
    assert d is not None and (d.decision, d.reason, d.plate) == ("undecided", "unreadable", None)
    # reads that vote but a plate confidence below min_confidence: a visitor call, never an open
    voter = PlateVoter(2, CFG, listing(A), started_s=0.0)
    assert feed_all(voter, [obs(A, (CFG.min_read_confidence + CFG.min_confidence) / 2)] * 30, dt=0.01) == []
    d = voter.end(1.0, AT)
    assert d is not None and (d.decision, d.reason, d.plate) == ("visitor", "low_confidence", A)
    assert d.entry is not None  # the guard sees whose plate it may be
    # one doubtful province character is enough to withhold the open
    voter = PlateVoter(3, CFG, listing(A), started_s=0.0)
    assert feed_all(voter, [obs(A, 0.9, [0.9] + [1.0] * 6)] * 10, dt=0.01) == []
    d = voter.end(1.0, AT)
    assert d is not None and (d.decision, d.reason) == ("visitor", "low_confidence")


def test_no_plate_at_all_is_undecided_and_a_timeout_decides() -> None:
    voter = PlateVoter(1, CFG, listing(A), started_s=0.0)
    decisions = feed_all(voter, [None] * 200, dt=0.1)
    assert len(decisions) == 1
    d = decisions[0]
    assert (d.decision, d.reason, d.frames) == ("undecided", "no_plate", 101)
    assert d.decided_s == pytest.approx(CFG.decide_after_s)


def test_a_plate_no_frame_read_whole_never_opens() -> None:
    """Each frame misreads a different character: the per-position vote spells A, but no frame read A."""
    variants = [A[:i] + ("8" if A[i] != "8" else "9") + A[i + 1:] for i in range(2, 7)]
    voter = PlateVoter(1, CFG, listing(A, *variants), started_s=0.0)
    reads = [obs(v) for v in variants for _ in range(1)] * 2
    decisions = feed_all(voter, reads, dt=0.01)
    d = decisions[0] if decisions else voter.end(1.0, AT)
    assert d is not None and d.decision == "visitor" and d.votes < CFG.min_frames


def test_reads_of_another_length_count_against_the_plate() -> None:
    green = "粤BD12345"
    # a few reads dropped a character: the 8-character plate still wins and opens
    voter = PlateVoter(1, CFG, listing(green), started_s=0.0)
    decisions = feed_all(voter, [obs(green), obs("粤B12345"), obs(green), obs(green), obs(green)], dt=0.1)
    assert [(d.decision, d.plate) for d in decisions] == [("open", green)]
    # as many 7-character reads as 8: no length wins clearly, nothing opens
    voter = PlateVoter(2, CFG, listing(green, "粤B12345"), started_s=0.0)
    decisions = feed_all(voter, [obs(green), obs("粤B12345")] * 6, dt=0.1)
    d = decisions[0] if decisions else voter.end(2.0, AT)
    assert d is not None and d.decision == "visitor" and d.reason == "reads_disagree"


def test_second_opinion_confirms_or_blocks() -> None:
    # the general reader reads the plate with its separator: normalized, it agrees
    voter = PlateVoter(1, CFG, listing(A), started_s=0.0)
    decisions = feed_all(voter, [obs(A)] * 3, second=[obs("京A·F0236", 0.9)] * 3)
    assert decisions[0].decision == "open" and decisions[0].reads == 6
    # the general reader reads another plate every time: agreement falls below the bar, no open
    voter = PlateVoter(2, CFG, listing(A), started_s=0.0)
    decisions = feed_all(voter, [obs(A)] * 6, second=[obs(B, 0.99)] * 6)
    d = decisions[0] if decisions else voter.end(2.0, AT)
    assert d is not None and d.decision == "visitor" and d.reason == "reads_disagree"
    # its reads never count as the plate reader's frames
    voter = PlateVoter(3, CFG, listing(A), started_s=0.0)
    decisions = feed_all(voter, [obs(A)] * 2 + [None] * 5, second=[obs(A)] * 7)
    assert decisions == [] or decisions[0].decision != "open"


def test_observation_from_a_reader_detection() -> None:
    from edgeagent.models.types import Detection

    box = (0.0, 0.0, 128.0, 32.0)
    plain = PlateObservation.from_detection(Detection("plate_text", 0.91, box, text=A))
    assert plain == PlateObservation(A, 0.91)
    scored = PlateObservation.from_detection(Detection(
        "plate", 0.99, box, text=A, extra={"text_score": 0.9, **{f"char_score_{i}": 0.9 + i / 100 for i in range(7)}}))
    assert scored is not None and scored.confidence == 0.9 and scored.char_scores[6] == pytest.approx(0.96)
    assert PlateObservation.from_detection(Detection("plate", 0.99, box)) is None
    read = decoders.PlateRead(A, 0.9, (0.9,) * 7)
    assert PlateObservation.from_read(read) == PlateObservation(A, 0.9, (0.9,) * 7)


def test_bad_reads_are_ignored_not_fatal() -> None:
    voter = PlateVoter(1, CFG, listing(A), started_s=0.0)
    bad = [obs(A, 0.98, [0.9] * 3), obs("京AF02", 0.99), obs("京AF0236XYZ", 0.99), obs(A, float("nan")),
           obs(A, 1.5), obs("", 0.0)]
    assert feed_all(voter, bad) == []
    assert voter.tally().plate is None
    assert [d.decision for d in feed_all(voter, [obs(A)] * 3, t0=2.0)] == ["open"]


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="min_agreement"):
        PlateVoteConfig(min_agreement=0.5)
    with pytest.raises(ValueError, match="min_frames"):
        PlateVoteConfig(min_frames=0)
    with pytest.raises(ValueError, match="min_confidence"):
        PlateVoteConfig(min_confidence=1.2)


def test_gate_one_decision_per_track_ends_ticks_and_evicts() -> None:
    gate = PlateGate(CFG, listing(A), max_tracks=2)
    out: list[GateDecision] = []
    for i in range(3):
        out += gate.feed(1, i * 0.1, AT, obs(A))
        out += gate.feed(2, i * 0.1, AT, None)
    assert [(d.track_id, d.decision) for d in out] == [(1, "open")]
    assert gate.feed(1, 1.0, AT, obs(A)) == []  # decided: a late frame of the same track starts nothing
    assert gate.active() == [2]
    out = gate.feed(3, 1.0, AT, obs("苏E5A2B8"))
    assert out == [] and gate.active() == [2, 3]
    out = gate.feed(4, 1.1, AT, None)  # a third live track: the oldest (2) is decided to make room
    assert [(d.track_id, d.decision, d.reason) for d in out] == [(2, "undecided", "no_plate")]
    assert gate.evicted == 1
    assert [(d.track_id, d.decision) for d in gate.end(3, 1.2, AT)] == [(3, "visitor")]
    assert gate.end(3, 1.3, AT) == []
    assert [(d.track_id, d.decision) for d in gate.tick(1.1 + CFG.decide_after_s, AT)] == [(4, "undecided")]
    assert gate.active() == []


# --- hypothesis: misreads never open for another listed plate ---------------------------------------------

_ALNUM = sp.LETTERS + sp.DIGITS


@st.composite
def plate_pairs(draw: st.DrawFn) -> tuple[str, str]:
    """A plate A and a listed plate B that differs from it in 1 or 2 characters (province included)."""
    a = draw(st.sampled_from(sp.PROVINCES)) + draw(st.sampled_from(sp.LETTERS)) + "".join(
        draw(st.lists(st.sampled_from(_ALNUM), min_size=5, max_size=5)))
    b = list(a)
    for pos in draw(st.sets(st.integers(0, 6), min_size=1, max_size=2)):
        pool = sp.PROVINCES if pos == 0 else sp.LETTERS if pos == 1 else _ALNUM
        b[pos] = draw(st.sampled_from([c for c in pool if c != a[pos]]))
    return a, "".join(b)


def _scores(draw: st.DrawFn, lo: float, hi: float) -> list[float]:
    return draw(st.lists(st.floats(lo, hi), min_size=7, max_size=7))


def _variant(draw: st.DrawFn, a: str, b: str) -> str:
    """A with one character misread as something that is neither A's nor B's character there."""
    pos = draw(st.integers(2, 6))
    return a[:pos] + draw(st.sampled_from([c for c in _ALNUM if c not in (a[pos], b[pos])])) + a[pos + 1:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), pair=plate_pairs(), a_listed=st.booleans())
def test_fewer_than_min_frames_misreads_never_open_in_any_order(data: st.DataObject, pair: tuple[str, str],
                                                                a_listed: bool) -> None:
    a, b = pair
    draw = data.draw
    reads = [obs(a, 0.0, _scores(draw, 0.7, 1.0)) for _ in range(draw(st.integers(0, 15)))]
    reads += [obs(b, 0.0, _scores(draw, 0.7, 1.0)) for _ in range(draw(st.integers(1, CFG.min_frames - 1)))]
    reads += [obs(_variant(draw, a, b), 0.0, _scores(draw, 0.7, 1.0)) for _ in range(draw(st.integers(0, 4)))]
    reads += [obs(b, 0.0, _scores(draw, 0.0, 0.69)) for _ in range(draw(st.integers(0, 10)))]  # never vote
    reads = draw(st.permutations(reads))
    reads = [PlateObservation(r.text, min(r.char_scores), r.char_scores) for r in reads]
    voter = PlateVoter(1, CFG, listing(*([a, b] if a_listed else [b])), started_s=0.0)
    decisions = feed_all(voter, reads, dt=draw(st.sampled_from([0.05, 0.2, 1.0])))
    decisions += [d for d in [voter.end(100.0, AT)] if d is not None]
    assert len(decisions) == 1
    assert not (decisions[0].decision == "open" and decisions[0].plate == b)
    if decisions[0].decision == "open":
        assert a_listed and decisions[0].plate == a


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), pair=plate_pairs(), a_listed=st.booleans())
def test_a_minority_of_misreads_never_opens_and_a_clear_majority_opens(data: st.DataObject, pair: tuple[str, str],
                                                                       a_listed: bool) -> None:
    """Reads mostly of A, with misreads of B (listed) among them: B may be read as often as half of A's reads
    at every moment (so any number of times), and never opens. When A is listed and the misreads are at most a
    quarter of A's reads, A opens."""
    a, b = pair
    draw = data.draw
    reads: list[PlateObservation] = []
    n_a = n_b = n_other = 0
    for kind in draw(st.lists(st.sampled_from(["a", "b", "variant", "noise"]), min_size=3, max_size=40)):
        if kind == "a":
            reads.append(obs(a, 0.0, _scores(draw, 0.96, 1.0)))
            n_a += 1
        elif kind == "b" and 2 * (n_b + 1) <= n_a:  # B never more than half of A's reads so far
            reads.append(obs(b, 0.0, _scores(draw, 0.7, 1.0)))
            n_b += 1
        elif kind == "variant" and 2 * (n_other + 1) <= n_a:
            reads.append(obs(_variant(draw, a, b), 0.0, _scores(draw, 0.7, 1.0)))
            n_other += 1
        elif kind == "noise":  # B read doubtfully: never votes
            reads.append(obs(b, 0.0, _scores(draw, 0.0, 0.69)))
    reads = [PlateObservation(r.text, min(r.char_scores), r.char_scores) for r in reads]
    voter = PlateVoter(1, CFG, listing(*([a, b] if a_listed else [b])), started_s=0.0)
    decisions = feed_all(voter, reads, dt=0.1)
    decisions += [d for d in [voter.end(100.0, AT)] if d is not None]
    assert len(decisions) == 1
    d = decisions[0]
    assert not (d.decision == "open" and d.plate == b)
    clear = n_a >= CFG.min_frames and 4 * (n_b + n_other) <= n_a
    if a_listed and clear:
        assert (d.decision, d.plate) == ("open", a)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_open_was_read_whole_often_and_dominated(data: st.DataObject) -> None:
    """Random reads of four listed plates that share most characters: whatever opens was read whole, with
    every character at least min_read_confidence, min_frames times, and at least twice as often as any other
    plate of its length up to the decision."""
    draw = data.draw
    pool = ["京AF0236", "京AF0286", "皖AF0236", "京AF0266", "粤BD12345"]
    voter = PlateVoter(1, CFG, listing(*pool), started_s=0.0)
    seen: list[PlateObservation] = []
    decision = None
    for i in range(draw(st.integers(1, 40))):
        text = draw(st.sampled_from(pool))
        scores = tuple(draw(st.lists(st.floats(0.5, 1.0), min_size=len(text), max_size=len(text))))
        read = PlateObservation(text, min(scores), scores)
        seen.append(read)
        decision = voter.feed(i * 0.1, AT, read)
        if decision is not None:
            break
    if decision is None or decision.decision != "open":
        return
    voting = [r for r in seen if r.confidence >= CFG.min_read_confidence]
    count = {p: sum(1 for r in voting if r.text == p) for p in pool}
    assert decision.plate is not None
    assert count[decision.plate] >= CFG.min_frames
    for other in pool:
        if other != decision.plate and len(other) == len(decision.plate):
            assert count[decision.plate] >= 2 * count[other]


# --- the residents' list ----------------------------------------------------------------------------------

CST = timezone(timedelta(hours=8))


def test_list_add_find_lookup_remove_and_normalization(tmp_path: Path) -> None:
    with PlateList(tmp_path / "plates.db") as pl:
        entry, new = pl.add("京a·f0236", ref="3-1-502", added_by="guard", now=AT)
        assert new and entry.plate == A and entry.added_at == AT
        entry, new = pl.add("京Ａ Ｆ０２３６", ref="3-1-503", reason="staff", now=AT)  # same plate: an update
        assert not new and pl.count() == 1
        found = pl.find(" 京A-F0236 ")
        assert found is not None and (found.ref, found.reason, found.added_by) == ("3-1-503", "staff", "")
        assert pl.lookup(A, AT) == found
        assert pl.find("京AF0237") is None
        assert pl.remove("京A·F0236") and not pl.remove(A)
        assert pl.entries() == []


def test_list_refuses_what_is_not_a_plate(tmp_path: Path) -> None:
    with PlateList(tmp_path / "plates.db") as pl:
        with pytest.raises(PlateListError, match="I and O"):
            pl.add("京AO0236")
        with pytest.raises(PlateListError, match="6 characters"):
            pl.add("京AF023")
        with pytest.raises(PlateListError, match="province"):
            pl.add("AAF02366")
        with pytest.raises(PlateListError, match="not after"):
            pl.add(A, valid_from=AT, valid_until=AT)
        with pytest.raises(PlateListError, match="control"):
            pl.add(A, ref="a\nb")
        assert pl.count() == 0


def test_validity_dates(tmp_path: Path) -> None:
    start = parse_when("2025-06-01", tz=CST)
    end = parse_when("2025/06/30", end=True, tz=CST)  # the whole of the 30th, Beijing time
    assert start == datetime(2025, 5, 31, 16, tzinfo=UTC)
    assert end == datetime(2025, 6, 30, 16, tzinfo=UTC)
    assert parse_when("2025-06-30 18:00", end=True, tz=CST) == datetime(2025, 6, 30, 10, tzinfo=UTC)
    assert parse_when("2025-06-30T18:00+00:00", tz=CST) == datetime(2025, 6, 30, 18, tzinfo=UTC)
    assert parse_when("") is None
    with pytest.raises(PlateListError, match="not a date"):
        parse_when("30.06.2025")
    with PlateList(tmp_path / "plates.db") as pl:
        pl.add(A, valid_from=start, valid_until=end)
        assert pl.lookup(A, start - timedelta(seconds=1)) is None
        assert pl.lookup(A, start) is not None
        assert pl.lookup(A, end - timedelta(seconds=1)) is not None
        assert pl.lookup(A, end) is None
        entry = pl.find(A)
        assert entry is not None and entry.validity(end) == "expired"
        assert entry.validity(start - timedelta(days=1)) == "not_yet_valid"


CSV_OK = """plate,ref,valid_from,valid_until,reason
京A·F0236,3-1-502,,,resident
# a comment line
粤BD12345,3-2-101,2025-01-01,2025-12-31,delivery contract

苏E5A2B8,,,,
"""


def test_import_csv_all_rows(tmp_path: Path) -> None:
    path = tmp_path / "plates.csv"
    path.write_text(CSV_OK, encoding="utf-8")
    with PlateList(tmp_path / "plates.db") as pl:
        result = pl.import_csv(path, added_by="office", tz=CST, now=AT)
        assert (result.added, result.updated, result.removed, result.rows) == (3, 0, 0, 3)
        entry = pl.find("粤BD12345")
        assert entry is not None and entry.reason == "delivery contract" and entry.ref == "3-2-101"
        assert entry.valid_until == datetime(2025, 12, 31, 16, tzinfo=UTC)
        other = pl.find("苏E5A2B8")
        assert other is not None and other.reason == "resident" and other.added_by == "office"
        # again, with one plate changed: updates, adds nothing
        result = pl.import_csv(CSV_OK.replace("3-1-502", "3-1-999"), tz=CST)
        assert (result.added, result.updated) == (0, 3)
        assert pl.find(A) is not None and pl.find(A).ref == "3-1-999"  # type: ignore[union-attr]
        # replace: the file is the whole list
        result = pl.import_csv("plate\n苏E5A2B8\n沪KR9035\n", replace=True)
        assert (result.added, result.updated, result.removed) == (1, 1, 2)
        assert [e.plate for e in pl.entries()] == ["沪KR9035", "苏E5A2B8"]


def test_import_csv_bad_rows_name_their_lines_and_import_nothing(tmp_path: Path) -> None:
    with PlateList(tmp_path / "plates.db") as pl:
        pl.add("沪KR9035")
        bad = CSV_OK + "京AO0236,x\n苏E5A2B8,again\n鲁QF7788,,someday\n"
        with pytest.raises(PlateListError) as caught:
            pl.import_csv(bad, tz=CST)
        message = str(caught.value)
        assert "3 bad row(s), nothing imported" in message
        assert "line 7: '京AO0236' is not a mainland Chinese plate" in message
        assert "line 8: plate 苏E5A2B8 is also on line 6" in message
        assert "line 9: 'someday' is not a date" in message
        assert [e.plate for e in pl.entries()] == ["沪KR9035"]
        with pytest.raises(PlateListError, match="header"):
            pl.import_csv("plate,unit\n京AF0236,1\n")
        with pytest.raises(PlateListError, match="line 2: 3 cells"):
            pl.import_csv("plate,ref\n京AF0236,1,2\n")
        with pytest.raises(PlateListError, match="no header"):
            pl.import_csv("\n\n")
        assert pl.count() == 1


def test_import_csv_encodings(tmp_path: Path) -> None:
    with PlateList(tmp_path / "plates.db") as pl:
        (tmp_path / "bom.csv").write_bytes(codecs.BOM_UTF8 + "plate,ref\n京AF0236,三号楼\n".encode())
        (tmp_path / "gbk.csv").write_bytes("plate,ref\n粤BD12345,二号楼\n".encode("gb18030"))
        pl.import_csv(tmp_path / "bom.csv")
        pl.import_csv(tmp_path / "gbk.csv")
        assert [(e.plate, e.ref) for e in pl.entries()] == [("京AF0236", "三号楼"), ("粤BD12345", "二号楼")]
        with pytest.raises(PlateListError, match="cannot read"):
            pl.import_csv(tmp_path / "missing.csv")


def test_list_cap(tmp_path: Path) -> None:
    with PlateList(tmp_path / "plates.db", max_entries=2) as pl:
        pl.add("京AF0236")
        pl.add("沪KR9035")
        pl.add("沪KR9035", ref="update is fine")
        with pytest.raises(PlateListError, match="full"):
            pl.add("苏E5A2B8")
        with pytest.raises(PlateListError, match="cap of 2"):
            pl.import_csv("plate\n苏E5A2B8\n")
        assert pl.import_csv("plate\n苏E5A2B8\n鲁QF7788\n", replace=True).removed == 2
        assert pl.count() == 2


def test_reader_sees_a_write_whole_and_is_never_blocked(tmp_path: Path) -> None:
    path = tmp_path / "plates.db"
    with PlateList(path) as daemon_side:
        daemon_side.add(A)
        # another process holds a write transaction (the CLI half-way through an import)
        writer = sqlite3.connect(str(path), isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("DELETE FROM plates")
        writer.execute("INSERT INTO plates (plate, added_at) VALUES ('沪KR9035', '2025-06-01T00:00:00+00:00')")
        assert daemon_side.find(A) is not None  # reads the committed list, without waiting
        assert daemon_side.find("沪KR9035") is None
        writer.execute("COMMIT")
        writer.close()
        assert daemon_side.find(A) is None and daemon_side.find("沪KR9035") is not None


def test_concurrent_reader_while_importing(tmp_path: Path) -> None:
    path = tmp_path / "plates.db"
    rng = np.random.default_rng(3)
    texts = sorted({sp.random_plate(rng) for _ in range(3000)})
    csv_text = "plate\n" + "\n".join(texts) + "\n"
    counts: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    with PlateList(path) as daemon_side:
        daemon_side.add("京AF0236")
        base = daemon_side.count()

        def read_loop() -> None:
            try:
                while not stop.is_set():
                    counts.append(daemon_side.count())
                    daemon_side.lookup(texts[-1], AT)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=read_loop)
        thread.start()
        try:
            with PlateList(path) as cli_side:
                for _ in range(3):
                    cli_side.import_csv(csv_text, replace=False)
                    cli_side.import_csv("plate\n京AF0236\n", replace=True)
        finally:
            stop.set()
            thread.join(30)
        assert not errors
        assert counts and set(counts) <= {base, base + len(set(texts) - {"京AF0236"})}


def test_list_file_is_private_and_links_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "plates.db"
    PlateList(path).close()
    assert os.stat(path).st_mode & 0o777 == 0o640
    link = tmp_path / "link.db"
    link.symlink_to(path)
    with pytest.raises(PlateListError, match="symbolic link"):
        PlateList(link)


def test_parse_plate_normalizes() -> None:
    assert parse_plate("粤ｂ·ｄ１２３４５") == "粤BD12345"
