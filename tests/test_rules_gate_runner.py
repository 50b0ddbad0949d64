"""The car gate's I/O shell (GateRunner) driven tick by tick as the pipeline drives it, with a controlled clock:
the real plate detector and reader on the shared engine read a synthetic resident's car, the barrier is an
output that records when it is told to open. Covers what the daemon tests meet only by chance: the tracker
splitting one car into two tracks after the first was decided (one open per car), the same car back after the
window, an open that failed being tried again by the car's next track, and reads failing (a model missing from
the engine, an inference timeout) without a wrong decision, logged once, the gate working again after."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from edgeagent.drivers.camera.config import CameraDevice
from edgeagent.drivers.camera.rules.gate_runner import GateRunner
from edgeagent.drivers.camera.rules.plate_list import PlateList
from edgeagent.drivers.camera.tracker import Track
from edgeagent.kernel.pipeline.events import Attachment
from edgeagent.kernel.runtime.outputs import Outputs
from edgeagent.models.engine import InferenceEngine
from edgeagent.models.manifest import load_manifests
from edgeagent.models.types import Detection, InferenceTimeout, ModelError
from tests import synth_plates as sp
from tests.helpers import wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

RESIDENT = "京AF0236"
TICK_S = 0.2


@pytest.fixture(scope="module")
def car() -> np.ndarray:
    return sp.car_with_plate(RESIDENT, sp.Wear(blur_px=0.4), np.random.default_rng(3)).image


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[InferenceEngine]:
    manifests = load_manifests()
    async with InferenceEngine({k: manifests[k] for k in ("clp_det", "clp_v2_c_rec")}, threads=1) as eng:
        yield eng


@pytest.fixture
def plates(tmp_path: Path) -> Iterator[PlateList]:
    with PlateList(tmp_path / "plates.db") as listed:
        listed.add(RESIDENT, ref="3-1-502", reason="resident")
        yield listed


@dataclass
class Barrier:
    """The barrier's open input: when it was switched on (the runner's clock); ``fail`` the next N switches."""

    now: list[float]
    opened: list[float] = field(default_factory=list)
    fail: int = 0

    async def set(self, on: bool) -> None:
        if not on:
            return
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionError("relay does not answer")
        self.opened.append(self.now[0])


@dataclass
class Events:
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def emit(self, type_name: str, device_id: str, data: Any, attachments: tuple[Attachment, ...] = ()) -> None:
        self.seen.append((type_name, dict(data)))


@dataclass
class Lane:
    runner: GateRunner
    barrier: Barrier
    events: Events
    now: list[float]
    image: np.ndarray

    async def drive(self, track_id: int, done: Any, *, ticks: int = 40) -> None:
        """``track_id`` stands in the zone, a tick every TICK_S of the runner's clock, until ``done()``
        (each tick waits for the plate read it started, so the votes do not depend on the machine's speed)."""
        h, w = self.image.shape[:2]
        box = (0.0, 0.0, float(w), float(h) - 2.0)  # its bottom-centre inside the zone
        for _ in range(ticks):
            if done():
                return
            self.now[0] += TICK_S
            track = Track(id=track_id, label="car", box=box, score=0.9, max_score=0.9, hits=5,
                          first_seen_s=0.0, last_seen_s=self.now[0], confirmed=True, stationary=True, matched=True,
                          velocity=(0.0, 0.0), history=(), detection=Detection("car", 0.9, box))
            self.runner.on_tick(_Frame(self.image), [track], [], self.now[0])
            assert await wait_until(lambda: self.runner.stats()["reads_in_flight"] == 0
                                    and self.runner.stats()["ops_queued"] == 0, 30)
            await asyncio.sleep(0.01)  # the voting worker's decision and its task
        assert done(), self.runner.stats()

    def leave(self, seconds: float = 2.0) -> None:
        """No vehicle in the zone for ``seconds``: the runner ends the tracks it followed."""
        for _ in range(round(seconds / TICK_S)):
            self.now[0] += TICK_S
            self.runner.on_tick(_Frame(self.image), [], [], self.now[0])


@dataclass(frozen=True)
class _Frame:
    image: np.ndarray


@dataclass
class FailingEngine:
    """The real engine, except that the next calls for ``model`` raise the errors in ``errors``, one each."""

    engine: InferenceEngine
    model: str
    errors: list[Exception] = field(default_factory=list)

    async def infer(self, model: str, images: Sequence[np.ndarray], *, camera: str = "") -> list[list[Detection]]:
        if model == self.model and self.errors:
            raise self.errors.pop(0)
        return await self.engine.infer(model, images, camera=camera)


@contextlib.asynccontextmanager
async def open_lane(engine: Any, plates: PlateList, car: np.ndarray, *,
                    second_opinion: str | None = None) -> AsyncIterator[Lane]:
    cam = CameraDevice.model_validate({
        "type": "camera", "id": "gate-cam", "rtsp": {"detect_url": "rtsp://127.0.0.1/none"},
        "zones": [{"name": "lane", "points": [[0, 0], [1, 0], [1, 1], [0, 1]]}],
        "gate": {"zone": "lane", "open": "barrier", "second_opinion": second_opinion, "relay_pulse_s": 0.05}})
    assert cam.gate is not None
    now = [1000.0]
    barrier, events, outputs = Barrier(now), Events(), Outputs()
    outputs.register("barrier", barrier)
    runner = GateRunner(cam, cam.gate, engine=engine, sink=events, evidence=None, lookup=plates.find, actions={},
                        outputs=outputs, wall=lambda: datetime.now(UTC), clock=lambda: now[0])
    worker = asyncio.create_task(runner.run())
    try:
        yield Lane(runner, barrier, events, now, car)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        await runner.aclose()
        await outputs.close()


@pytest_asyncio.fixture(loop_scope="module")
async def lane(engine: InferenceEngine, plates: PlateList, car: np.ndarray) -> AsyncIterator[Lane]:
    async with open_lane(engine, plates, car) as opened:
        yield opened


async def test_a_car_split_into_two_tracks_opens_the_gate_once_and_again_after_the_window(lane: Lane) -> None:
    runner, barrier = lane.runner, lane.barrier
    await lane.drive(1, lambda: runner.counts["opens"] == 1)
    assert await wait_until(lambda: len(barrier.opened) == 1, 5)
    opened_s = barrier.opened[0]
    # The tracker lost the car (decided already, so no handover) and gave it a new track where it stands.
    await lane.drive(2, lambda: runner.counts["open_repeats"] == 1)
    assert barrier.opened == [opened_s] and runner.counts["opens"] == 1
    assert runner.stats()["open_repeats"] == 1 and runner.stats()["opened_recently"] == 1
    assert [t for t, _ in lane.events.seen] == ["gate.commanded"]  # the repeat is neither commanded nor announced
    assert RESIDENT not in str(lane.events.seen)
    # The car leaves and comes back once the window is over: a new arrival, the gate opens again.
    lane.leave()
    lane.now[0] = opened_s + runner.reopen_window_s() + TICK_S
    await lane.drive(3, lambda: runner.counts["opens"] == 2)
    assert await wait_until(lambda: len(barrier.opened) == 2, 5)
    assert runner.counts["open_repeats"] == 1 and runner.counts["open_failed"] == 0


async def test_an_open_that_failed_is_tried_again_by_the_cars_next_track(lane: Lane) -> None:
    runner, barrier = lane.runner, lane.barrier
    barrier.fail = 1
    await lane.drive(1, lambda: runner.counts["open_failed"] == 1)
    assert barrier.opened == [] and runner.stats()["opened_recently"] == 0
    await lane.drive(2, lambda: runner.counts["opens"] == 2)
    assert await wait_until(lambda: len(barrier.opened) == 1, 5)
    assert runner.counts["open_repeats"] == 0
    outcomes = [d["outcome"] for t, d in lane.events.seen if t == "gate.commanded"]
    assert outcomes == ["failed", "executed"]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.endswith("gate_runner") and r.levelno >= logging.WARNING]


async def test_reads_that_fail_decide_nothing_are_counted_and_logged_once_and_the_gate_recovers(
        engine: InferenceEngine, plates: PlateList, car: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "edgeagent.drivers.camera.rules.gate_runner")
    failing = FailingEngine(engine, "clp_v2_c_rec", [
        *(ModelError("no model 'clp_v2_c_rec' in this engine") for _ in range(4)),
        *(InferenceTimeout("clp_v2_c_rec: the worker was stuck; it was restarted") for _ in range(3))])
    async with open_lane(failing, plates, car) as lane:
        runner = lane.runner
        # The plate reader fails on every read: the car stands in the lane with no vote, no decision of any kind.
        await lane.drive(1, lambda: not failing.errors)
        assert runner.counts["reads_failed"] == 7 and runner.counts["reads"] == 0
        st = runner.stats()
        assert st["read_failures"] == {"model": 4, "timeout": 3} and st["reads_failing"] is True
        assert (runner.counts["opens"], runner.counts["visitors"], runner.counts["undecided"]) == (0, 0, 0)
        assert lane.barrier.opened == [] and lane.events.seen == [] and st["voting"] == 1
        (warning,) = _warnings(caplog)  # one line for the episode, not one per tick
        assert "plate read failed (model: no model 'clp_v2_c_rec' in this engine)" in warning
        # The reader works again: the same car's reads vote and the gate opens for it, once.
        await lane.drive(1, lambda: runner.counts["opens"] == 1)
        assert await wait_until(lambda: len(lane.barrier.opened) == 1, 5)
        st = runner.stats()
        assert st["reads_failing"] is False and st["read_failures"] == {"model": 4, "timeout": 3}
        assert _warnings(caplog)[1:] == ["gate-cam: plate read works again after 7 failure(s)"]
        assert runner.counts["task_errors"] == 0 and runner.counts["reads"] >= 3


async def test_a_second_opinion_the_engine_lacks_leaves_the_plate_reader_to_open(
        engine: InferenceEngine, plates: PlateList, car: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    """The field fault: the rule names ppocr_rec, the engine has no such model (ModelError on every call)."""
    caplog.set_level(logging.DEBUG, "edgeagent.drivers.camera.rules.gate_runner")
    async with open_lane(engine, plates, car, second_opinion="ppocr_rec") as lane:
        runner = lane.runner
        await lane.drive(1, lambda: runner.counts["opens"] == 1)
        assert await wait_until(lambda: len(lane.barrier.opened) == 1, 5)
        failed = runner.counts["second_opinion_failed"]
        assert failed >= 3 and runner.stats()["second_opinion_failures"] == {"model": failed}
        assert runner.counts["second_opinions"] == 0 and runner.counts["reads_failed"] == 0
        assert runner.counts["task_errors"] == 0
        (warning,) = _warnings(caplog)
        assert warning.startswith("gate-cam: second opinion failed (model: no model 'ppocr_rec' in this engine")
