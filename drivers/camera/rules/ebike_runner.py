"""The e-bike lift blocker in the running daemon: the I/O shell around
:class:`~edgeagent.drivers.camera.rules.ebike.EbikeLiftRule`.

An :class:`EbikeRunner` follows one lift car camera's tracks (a pipeline ``TickObserver``) and carries out the
core's actions:

* ``HoldDoor`` and ``Announce`` switch the configured outputs (a relay module's channel over Modbus, a
  camera's relay) through :meth:`Outputs.request <edgeagent.kernel.runtime.outputs.Outputs.request>`, which
  returns at once; the output's own lane writes it in the background, so the door relay is commanded on the
  loop turn of the confirming frame (well within the 1 s budget; ``bench/rules.py`` measures it);
* ``RaiseAlarm`` raises an ``ebike_in_lift`` alarm about the car (a *place* alarm of the shared lifecycle:
  notified, escalated, acknowledged, resolved like a wristband's) with a snapshot of the confirming frame;
* ``ResolveAlarm`` resolves it: ``left`` (the bike was seen to go: via ``auto``), ``timeout`` (via ``rule``)
  or ``guard_release``.

A guard acknowledging the alarm (the CLI, a guard-room panel, the platform's signed ``alarm.handle``) releases
the lift: the runner listens to the alarm lifecycle's changes and calls the core's ``release``, which switches
door and announcement off and resolves the alarm.

Timers: the core must be ticked when no frame comes (a camera that stops must not hold a door past
``max_hold_s``); :meth:`EbikeRunner.run` does it at the core's next deadline, at least every second.

Alarm operations run one at a time on a worker fed by a bounded queue (``MAX_ALARM_OPS``): the lifecycle's
change listeners are called under its lock, so the acknowledgement is queued, never awaited there. A full
queue (it holds a few operations per bike episode, so only a wedged lifecycle fills it) drops the operation,
logs it and counts it in ``alarm_ops_dropped``: the outputs have been switched already either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np

from edgeagent.drivers.camera.config import CameraDevice, EbikeLiftConfig
from edgeagent.drivers.camera.rules.ebike import (
    Announce,
    EbikeAction,
    EbikeLiftRule,
    EbikeLiftSpec,
    HoldDoor,
    RaiseAlarm,
    ResolveAlarm,
)
from edgeagent.drivers.camera.tracker import Track
from edgeagent.kernel.pipeline.events import Attachment
from edgeagent.kernel.runtime.outputs import Outputs
from edgeagent.models.types import Detection

log = logging.getLogger(__name__)

ALARM_KIND: Final = "ebike_in_lift"  # declared in the camera capability's spec (EBIKE_ALARM_KIND)
MAX_ALARM_OPS: Final = 32
IDLE_TICK_S: Final = 1.0
RESTORED_GRACE_S: Final = 15.0  # after a restart: time for the stream to come back and see a bike still there


class Evidence(Protocol):
    async def save_snapshot(self, camera: str, image: np.ndarray, detections: Sequence[Detection]) -> Attachment: ...


class FrameLike(Protocol):
    @property
    def image(self) -> np.ndarray: ...


def lift_spec(cam: CameraDevice, rule: EbikeLiftConfig) -> EbikeLiftSpec:
    zone = next(tuple(z.points) for z in cam.zones if z.name == rule.zone)
    return EbikeLiftSpec(zone=zone, classes=frozenset(rule.classes), site_class=rule.site_class,
                         min_score=rule.min_score, min_area_frac=rule.min_area, min_span_frac=rule.min_span,
                         dwell_s=rule.dwell_s, clear_s=rule.clear_s, max_hold_s=rule.max_hold_s,
                         alarm_timeout_s=rule.alarm_timeout_s, rearm_s=rule.rearm_s)


@dataclass(frozen=True, slots=True)
class _Op:
    action: RaiseAlarm | ResolveAlarm | None = None
    image: np.ndarray | None = None
    acked_by: str | None = None  # a guard acknowledged the open alarm
    alarm_id: str | None = None
    restored_id: str | None = None  # an alarm from before a restart, no bike seen since
    resolved: bool = False  # the acknowledgement was a resolution: nothing left to resolve


class EbikeRunner:
    """One lift car camera's e-bike rule (see the module docstring). ``alarms`` is the shared alarm runtime
    (``CapabilityContext.alarms``)."""

    def __init__(self, cam: CameraDevice, rule: EbikeLiftConfig, *, outputs: Outputs, alarms: Any,
                 evidence: Evidence | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.cam = cam
        self.rule = rule
        self.place = rule.place or cam.name or cam.id
        self.core = EbikeLiftRule(lift_spec(cam, rule))
        self._outputs = outputs
        self._alarms = alarms
        self._evidence = evidence
        self._clock = clock
        self._ops: asyncio.Queue[_Op] = asyncio.Queue(MAX_ALARM_OPS)
        self._wake = asyncio.Event()
        self._missing: set[str] = set()
        self._last_s = -1e18
        self.restored_grace_s = RESTORED_GRACE_S
        self.alarm_id: str | None = None  # the lifecycle's id of the open alarm, once raised
        self.last_switch: dict[str, tuple[bool, float]] = {}  # output -> (on, monotonic time requested)
        self.counts: dict[str, int] = dict.fromkeys(
            ("holds", "releases", "announces", "alarms_raised", "alarms_resolved", "alarm_failures",
             "alarm_ops_dropped", "guard_releases"), 0)

    # --- the pipeline's tick (on the loop: returns at once) ------------------------------------------------

    def on_tick(self, frame: FrameLike, tracks: Sequence[Track], ended: Sequence[Track], now: float) -> None:
        del ended  # a track not passed is ended for the core
        h, w = frame.image.shape[:2]
        self._apply(self.core.update(tracks, w, h, self._now(now)), frame.image)
        self._wake.set()  # a new deadline, perhaps

    def _now(self, t: float) -> float:
        """The core's time never goes back: a frame's time is taken before its detection is awaited, so the
        timer task may have ticked the core a little later than the next frame's time."""
        self._last_s = max(t, self._last_s)
        return self._last_s

    def _apply(self, actions: Sequence[EbikeAction], image: np.ndarray | None = None) -> None:
        for a in actions:
            if isinstance(a, HoldDoor):
                self.counts["holds" if a.on else "releases"] += 1
                self._switch(self.rule.door_hold, a.on)
                if a.on:
                    log.info("%s: e-bike in the lift car: door held, announcing", self.cam.id)
                else:
                    log.info("%s: door hold released (%s)", self.cam.id, a.reason)
            elif isinstance(a, Announce):
                if a.on:
                    self.counts["announces"] += 1
                if self.rule.announce:
                    self._switch(self.rule.announce, a.on)
            else:
                self._queue(_Op(action=a, image=image if isinstance(a, RaiseAlarm) else None))

    def _switch(self, name: str, on: bool) -> None:
        if name not in self._outputs:
            if name not in self._missing:
                self._missing.add(name)
                log.error("%s: output %r is not available (its device is not configured or not running)",
                          self.cam.id, name)
            return
        self._outputs.request(name, on)
        self.last_switch[name] = (on, time.monotonic())

    def _queue(self, op: _Op) -> None:
        try:
            self._ops.put_nowait(op)
        except asyncio.QueueFull:
            self.counts["alarm_ops_dropped"] += 1
            log.error("%s: alarm operation dropped: %d waiting already", self.cam.id, MAX_ALARM_OPS)

    # --- the guard's acknowledgement ----------------------------------------------------------------------

    async def on_alarm(self, alarm: Any) -> None:
        """A change of any alarm (the lifecycle's listener; called under its lock: only queues)."""
        if self.alarm_id is None or getattr(alarm, "id", None) != self.alarm_id or not self.core.alarm_open:
            return
        if not alarm.active:  # a person resolved it outright (this rule's own resolves clear alarm_id first)
            self._queue(_Op(acked_by=str(alarm.resolved_by or "guard"), alarm_id=alarm.id, resolved=True))
        elif alarm.acknowledged_at is not None:
            self._queue(_Op(acked_by=str(alarm.acknowledged_by or "guard"), alarm_id=alarm.id))

    # --- the tasks ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """The core's timers and the alarm operations (one task for the camera's lifetime).

        On start (the daemon's, or this task's restart) the outputs are switched off: a relay module keeps its
        state, and a door held by a process that died must not stay held ([restart]). An ``ebike_in_lift``
        alarm about this car restored from before is left to the rule for ``restored_grace_s``: a bike seen
        again folds into it (the same alarm) and resolves it as usual; any other still open then is resolved as
        gone."""
        self._switch(self.rule.door_hold, False)
        if self.rule.announce:
            self._switch(self.rule.announce, False)
        # The daemon restores saved alarms after its tasks start: look once the grace is over.
        grace_until: float | None = self._clock() + self.restored_grace_s
        worker = asyncio.ensure_future(self._alarm_worker())
        try:
            while True:
                if grace_until is not None and self._clock() >= grace_until:
                    grace_until = None
                    for alarm in self._alarms.active(ALARM_KIND, self.place):
                        if alarm.id != self.alarm_id:
                            self._queue(_Op(restored_id=alarm.id))
                deadline = self.core.next_deadline_s()
                now = self._clock()
                wait = IDLE_TICK_S if deadline is None else max(0.0, min(IDLE_TICK_S, deadline - now))
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                if worker.done():
                    worker.result()  # its failure goes to the supervisor
                self._apply(self.core.tick(self._now(self._clock())))
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def _alarm_worker(self) -> None:
        while True:
            op = await self._ops.get()
            if op.restored_id is not None:
                await self._resolve_alarm(op.restored_id, "e-bike rule", "auto",
                                          "no e-bike was seen in the car after the restart")
                continue
            if op.acked_by is not None:
                if op.alarm_id == self.alarm_id and self.core.alarm_open:
                    self.counts["guard_releases"] += 1
                    log.info("%s: %s acknowledged the e-bike alarm: lift released", self.cam.id, op.acked_by)
                    if op.resolved:
                        self.alarm_id = None
                    for a in self.core.release(self._now(self._clock()), by=op.acked_by):
                        if isinstance(a, ResolveAlarm):
                            await self._resolve(a)  # nothing to do when it was resolved already
                        else:
                            self._apply([a])
                continue
            if isinstance(op.action, RaiseAlarm):
                await self._raise(op.action, op.image)
            elif isinstance(op.action, ResolveAlarm):
                await self._resolve(op.action)

    async def _raise(self, a: RaiseAlarm, image: np.ndarray | None) -> None:
        atts: tuple[Attachment, ...] = ()
        if image is not None and self._evidence is not None and self.cam.snapshots:
            try:
                atts = (await self._evidence.save_snapshot(
                    self.cam.id, image, [Detection(label=a.label, score=a.score, box=a.box, model="")]),)
            except Exception as exc:  # noqa: BLE001 - the alarm goes without its snapshot
                log.warning("%s: e-bike snapshot not kept: %s", self.cam.id, exc)
        details = {"camera": self.cam.id, "zone": self.rule.zone, "track_id": a.track_id, "label": a.label,
                   "score": round(a.score, 3), "door_hold": self.rule.door_hold}
        try:
            alarm = await self._alarms.raise_(ALARM_KIND, self.place, self.cam.id, details, place=True,
                                              attachments=atts)
        except Exception as exc:  # noqa: BLE001 - the door is held whatever the lifecycle does
            self.counts["alarm_failures"] += 1
            log.error("%s: the e-bike alarm could not be raised (the door hold is on regardless): %s",
                      self.cam.id, exc)
            # Not stored but raised locally (a full disk): it is active, and this rule must still resolve it.
            active = self._alarms.active(ALARM_KIND, self.place)
            self.alarm_id = active[-1].id if active else None
            return
        self.counts["alarms_raised"] += 1
        self.alarm_id = getattr(alarm, "id", None)

    async def _resolve(self, a: ResolveAlarm) -> None:
        alarm_id, self.alarm_id = self.alarm_id, None
        if alarm_id is None:
            return
        if a.reason == "left":
            by, via, note = "e-bike rule", "auto", "the e-bike left the lift car"
        elif a.reason == "timeout":
            by, via, note = "e-bike rule", "rule", "nobody was seen to take the e-bike out before the timeout"
        else:
            by, via, note = (a.by or "guard")[:64], "rule", "the guard's acknowledgement released the lift"
        await self._resolve_alarm(alarm_id, by, via, note)

    async def _resolve_alarm(self, alarm_id: str, by: str, via: str, note: str) -> None:
        try:
            await self._alarms.resolve(alarm_id, by, via, note)
        except Exception as exc:  # noqa: BLE001 - logged; the lifecycle keeps it open for a person to close
            self.counts["alarm_failures"] += 1
            log.error("%s: the e-bike alarm %s could not be resolved: %s", self.cam.id, alarm_id, exc)
            return
        self.counts["alarms_resolved"] += 1

    def stats(self) -> dict[str, Any]:
        return {**self.counts, **self.core.stats(), "alarm_open": self.core.alarm_open,
                "door_held": self.core.door_held, "alarm_ops_queued": self._ops.qsize()}
