"""The running camera capability: the shared engine, the evidence store, and one runner per camera.

A runner owns its camera's one RTSP session (cameras refuse extra sessions; the detector pipeline, snapshots
and clips all read from it), resolves its streams through ONVIF when no URL is configured (and again after a
camera reboot), runs the pipeline, and reports the camera online/offline once per transition.
ONVIF events run as a separate task per camera, so a camera whose event service misbehaves still streams.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import cv2
from pydantic import BaseModel, ConfigDict, Field

from edgeagent.drivers.camera.capability import model_dirs
from edgeagent.drivers.camera.config import CameraDevice, CamerasConfig
from edgeagent.drivers.camera.evidence import EvidenceStore
from edgeagent.drivers.camera.metrics import CameraCollector
from edgeagent.drivers.camera.pipeline import CameraPipeline
from edgeagent.drivers.camera.rtsp import RtspSource
from edgeagent.drivers.camera.rules.ebike_runner import EbikeRunner
from edgeagent.drivers.camera.rules.gate_runner import GateRunner
from edgeagent.kernel.capability import (
    Capability,
    CapabilityContext,
    DoctorCheck,
    LocalAction,
    TaskSpec,
    validate_args,
)
from edgeagent.kernel.errors import CommandRejected, ConfigError
from edgeagent.kernel.pipeline.commands import CommandSpec
from edgeagent.kernel.pipeline.event_types import (
    CAMERA_INPUT,
    CAMERA_LINE_CROSSED,
    CAMERA_MOTION,
    CAMERA_TAMPER,
    DEVICE_OFFLINE,
    DEVICE_ONLINE,
)
from edgeagent.kernel.runtime import metrics
from edgeagent.kernel.runtime.outputs import Output
from edgeagent.models.engine import InferenceEngine
from edgeagent.models.manifest import ImageInput, load_manifests, verify
from edgeagent.models.types import ModelError

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 600.0
RESOLVE_BACKOFF_S = (2.0, 60.0)
MAIN_SNAPSHOT_TIMEOUT_S = 2.0  # asking ONVIF for the stream again: first wait, cap


def with_credentials(url: str, username: str | None, password: str | None) -> str:
    """The URL with the camera's credentials in it, for the RTSP library only (never logged)."""
    if not username or url.startswith("file:"):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    auth = quote(username, safe="")
    if password:
        auth += ":" + quote(password, safe="")
    return urlunsplit((parts.scheme, f"{auth}@{host}", parts.path, parts.query, parts.fragment))


def onvif_camera(cam: CameraDevice) -> Any:
    """An (unconnected) OnvifCamera for a configured camera; ``async with`` it to connect."""
    from edgeagent.drivers.camera.onvif.client import OnvifCamera  # noqa: PLC0415

    if cam.onvif is None:
        raise ValueError(f"{cam.id}: no onvif section")
    o = cam.onvif
    password = cam.password.resolve().get_secret_value() if cam.password is not None else ""
    return OnvifCamera(o.host, o.port, cam.username or "", password, name=cam.id, auth=o.auth,
                       connect_timeout_s=o.timeout_s, request_timeout_s=o.timeout_s, relay_names=o.relays)


@dataclass(frozen=True, slots=True)
class Streams:
    """Where a camera's video is: the sub-stream to detect on, and the main stream for clips and snapshots
    (None: the same stream). ``record_profile`` is the ONVIF profile of the main stream (its snapshot URI)."""

    detect: str
    record: str | None = None
    record_profile: Any = None


async def resolve_streams(cam: CameraDevice) -> Streams:
    """The configured URLs, else what ONVIF describes: a sub-stream for detection, the main one for evidence."""
    if cam.rtsp.detect_url is not None:
        main_url = cam.rtsp.record_url if cam.rtsp.record_url != cam.rtsp.detect_url else None
        return Streams(cam.rtsp.detect_url, main_url)
    from edgeagent.drivers.camera.onvif.client import CameraProtocolError, choose_streams  # noqa: PLC0415

    assert cam.onvif is not None  # the config holds ONVIF or a URL
    async with onvif_camera(cam) as camera:
        detect, record = choose_streams(camera.profiles, detect_token=cam.onvif.profile,
                                        record_token=cam.onvif.record_profile)
        if not detect.stream_uri:
            raise CameraProtocolError(f"{cam.id}: profile {detect.token} has no RTSP stream URI")
        main = cam.rtsp.record_url or (record.stream_uri if record.token != detect.token else None)
        return Streams(str(detect.stream_uri), str(main) if main and main != detect.stream_uri else None, record)


async def detect_url(cam: CameraDevice) -> str:
    """The stream to detect on (see resolve_streams)."""
    return (await resolve_streams(cam)).detect


class CameraRunner:
    def __init__(self, cam: CameraDevice, service: CameraService) -> None:
        self.cam = cam
        self._svc = service
        self.source: RtspSource | None = None
        self.pipeline = CameraPipeline(
            cam, detector=service.engine, model=service.model_for(cam), input_size=service.input_size(cam),
            sink=service.ctx.sink, evidence=service.evidence)
        ev = service.section.evidence
        self.pipeline.clip_pre_s, self.pipeline.clip_post_s = ev.clip_pre_s, ev.clip_post_s
        self.pipeline.clip_max_bytes = ev.buffer_bytes_per_camera
        # The community rules that follow this camera's tracks (car gate plates, e-bike in a lift car).
        self.gate, self.ebike = service.rule_runners(cam)
        self.pipeline.observers += [r for r in (self.gate, self.ebike) if r is not None]
        self.online: bool | None = None
        self.onvif: Any = None  # OnvifCamera while connected
        self.stream_error: str | None = None
        self.events_state: dict[str, Any] = {}
        self._events: Any = None
        self._url: str | None = None
        self._record_profile: Any = None
        self.record_source: RtspSource | None = None
        if cam.snapshots_from == "main" and cam.onvif is not None:
            self.pipeline.main_snapshot = self.main_snapshot
        self._reopen = asyncio.Event()
        # Falls and thrown objects (drivers/camera/rules/*_runner.py): a tick observer, a full-rate path.
        from edgeagent.drivers.camera.rules.wiring import fall_observer, thrown_runner  # noqa: PLC0415

        self.falls = fall_observer(cam, service)
        if self.falls is not None:
            self.pipeline.observers.append(self.falls)
        self.thrown = thrown_runner(cam, service)

    def _password(self) -> str | None:
        return self.cam.password.resolve().get_secret_value() if self.cam.password is not None else None

    async def run(self) -> None:
        """The camera's stream and pipeline. An ONVIF camera that cannot be reached (off, wrong credentials)
        is reported offline once and asked again with backoff; the stream reconnects by itself; after a
        camera reboot that changed the stream's address (seen by the events task) the stream is reopened on
        the new one."""
        from edgeagent.kernel.errors import EdgeagentError  # noqa: PLC0415

        backoff_s = RESOLVE_BACKOFF_S[0]
        while True:
            try:
                streams = await resolve_streams(self.cam)
            except EdgeagentError as exc:
                self._on_state(False, f"ONVIF: {exc}")
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, RESOLVE_BACKOFF_S[1])
                continue
            backoff_s = RESOLVE_BACKOFF_S[0]
            url = streams.detect
            self._url, self._record_profile = url, streams.record_profile
            self._reopen.clear()
            password = self._password()
            ev = self._svc.section.evidence
            source = RtspSource(with_credentials(url, self.cam.username, password), name=self.cam.id,
                                open_timeout_s=self.cam.rtsp.open_timeout_s,
                                freeze_after_s=self.cam.rtsp.frozen_after_s, decode_fps=self.cam.detect.fps,
                                packet_buffer_bytes=ev.buffer_bytes_per_camera,
                                loop_file=url.startswith("file:"), on_state=self._on_state)
            # The main stream, for clips only: its packets are buffered, never decoded (a 1080p decode costs
            # several times the sub-stream's). Opened only when clips are wanted; its failures do not make
            # the camera offline (clips then come from the sub-stream).
            record = None
            if streams.record is not None and self.cam.clips:
                record = RtspSource(with_credentials(streams.record, self.cam.username, password),
                                    name=f"{self.cam.id}/main", decode=False,
                                    open_timeout_s=self.cam.rtsp.open_timeout_s,
                                    freeze_after_s=max(self.cam.rtsp.frozen_after_s, 5.0),
                                    packet_buffer_bytes=ev.buffer_bytes_per_camera,
                                    loop_file=streams.record.startswith("file:"))
            self.source, self.record_source = source, record
            self.pipeline.clip_source = record
            if self.thrown is not None:
                self.thrown.attach(source)  # its full-rate tap, before the session opens
            try:
                async with contextlib.AsyncExitStack() as stack:
                    await stack.enter_async_context(source)
                    if record is not None:
                        await stack.enter_async_context(record)
                    pipe = asyncio.create_task(self.pipeline.run(source), name=f"{self.cam.id}:pipeline")
                    reopen = asyncio.create_task(self._reopen.wait())
                    side = [asyncio.create_task(self.thrown.run(source, record), name=f"{self.cam.id}:thrown")] \
                        if self.thrown is not None else []
                    try:
                        done, _ = await asyncio.wait({pipe, reopen, *side}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for task in (pipe, reopen, *side):
                            task.cancel()
                        await asyncio.gather(pipe, reopen, *side, return_exceptions=True)
                    for task in side:
                        if task in done:
                            task.result()  # the thrown-object path ended: its error goes to the supervisor
                    if pipe in done:
                        pipe.result()  # a pipeline error goes to the supervisor
                        return  # the source ended (a file that does not loop)
            finally:
                self.source = self.record_source = None
                self.pipeline.clip_source = None
            log.info("%s: the camera's stream address changed (after a reboot): reopening", self.cam.id)

    async def main_snapshot(self) -> Any:
        """The main stream's picture from the camera's own snapshot URI (sharper than the sub-stream's frame),
        or None when it has none or does not answer in time; the pipeline then uses the detection frame."""
        camera, profile = self.onvif, self._record_profile
        if camera is None or profile is None or not getattr(profile, "snapshot_uri", None):
            return None
        import numpy as np  # noqa: PLC0415

        from edgeagent.kernel.errors import EdgeagentError  # noqa: PLC0415

        try:
            async with asyncio.timeout(MAIN_SNAPSHOT_TIMEOUT_S):
                data = await camera.snapshot(profile)
        except (EdgeagentError, TimeoutError) as exc:
            log.debug("%s: main-stream snapshot failed: %s", self.cam.id, exc)
            return None
        return await asyncio.to_thread(cv2.imdecode, np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)

    def on_reboot(self, profiles: Sequence[Any]) -> None:
        """The events task saw the camera reboot and re-fetched its profiles: follow a changed stream URI."""
        if self.cam.rtsp.detect_url is not None or self.cam.onvif is None:
            return
        from edgeagent.drivers.camera.onvif.client import choose_streams  # noqa: PLC0415
        from edgeagent.kernel.errors import EdgeagentError  # noqa: PLC0415

        try:
            detect, _ = choose_streams(list(profiles), detect_token=self.cam.onvif.profile,
                                       record_token=self.cam.onvif.record_profile)
        except (ValueError, LookupError, EdgeagentError) as exc:
            log.warning("%s: after a reboot, no usable profile: %s", self.cam.id, exc)
            return
        if detect.stream_uri and detect.stream_uri != self._url:
            self._reopen.set()

    def _on_state(self, online: bool, reason: str) -> None:
        previous, self.online = self.online, online
        self.stream_error = None if online else reason
        if previous is None and online:
            return  # the first frame is not news
        if previous == online:
            return
        if online:
            log.info("%s: camera online (%s)", self.cam.id, reason or "frames again")
        else:
            log.warning("%s: camera offline: %s", self.cam.id, reason)
        etype = DEVICE_ONLINE if online else DEVICE_OFFLINE
        self._svc.spawn(self._svc.ctx.sink.emit(etype.name, self.cam.id, {"reason": reason or None}))

    async def events(self) -> None:
        """The camera's own events over ONVIF PullPoint, normalized into camera.* events. The pull loop is
        also the ONVIF side's heartbeat; the stream's frames decide online/offline."""
        from edgeagent.drivers.camera.onvif.events import PullPointEvents  # noqa: PLC0415

        async with onvif_camera(self.cam) as camera:
            self.onvif = camera
            try:
                manager = PullPointEvents(camera, on_fallback=self._on_fallback, on_reboot=self.on_reboot)
                self._events = manager
                async for ev in manager.events():
                    if getattr(ev, "operation", "changed") == "initialized":
                        continue  # the state at subscription time, not a change
                    await self._camera_event(ev)
            finally:
                self.onvif = None
                self._events = None

    def _on_fallback(self, fallback: bool, reason: str) -> None:
        self.events_state = {"fallback_to_box_motion": fallback, "reason": reason}
        if fallback:
            log.warning("%s: camera events unavailable (%s); the box's own motion detection covers it",
                        self.cam.id, reason)

    async def _camera_event(self, ev: Any) -> None:
        data: dict[str, Any] = {"active": ev.active, "source": dict(ev.source), "topic": ev.topic[:256],
                                "camera_time": ev.utc_time.isoformat()}
        sink = self._svc.ctx.sink
        if ev.kind == "motion":
            await sink.emit(CAMERA_MOTION.name, self.cam.id, data)
        elif ev.kind == "tamper":
            await sink.emit(CAMERA_TAMPER.name, self.cam.id, data)
        elif ev.kind == "digital_input":
            token = next((v for k, v in ev.source.items() if "input" in k.lower()), "") or "input"
            assert self.cam.onvif is not None
            data["input"] = self.cam.onvif.inputs.get(token, token)[:64]
            await sink.emit(CAMERA_INPUT.name, self.cam.id, data)
            if self.gate is not None and data["input"] == self.gate.rule.call_input:
                await self.gate.call_button(ev.active, "camera")
        elif ev.kind == "line_crossed" and ev.active is not False:
            await sink.emit(CAMERA_LINE_CROSSED.name, self.cam.id, {
                "line": (ev.rule or "camera")[:64], "direction": "crossed", "source": "camera"})

    def status(self) -> dict[str, Any]:
        src = self.source.stats() if self.source is not None else {}
        events = self._events.status() if self._events is not None else None
        rules = {name: r.stats() for name, r in (("gate", self.gate), ("ebike_lift", self.ebike),
                                                  ("falls", self.falls), ("thrown", self.thrown)) if r is not None}
        return {"online": self.online, "error": self.stream_error, "stream": src,
                "pipeline": self.pipeline.snapshot_state(), "onvif_events": events or self.events_state or None,
                **({"rules": rules} if rules else {})}


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SnapshotArgs(_Args):
    camera: str = Field(max_length=64)
    boxes: bool = True


class ShapesArgs(_Args):
    camera: str = Field(max_length=64)
    zones: list[Any] = Field(default_factory=list, max_length=64)  # as the config file has them
    lines: list[Any] = Field(default_factory=list, max_length=64)


class PtzArgs(_Args):
    camera: str = Field(max_length=64)
    preset: str = Field(max_length=64)


class _RelayOutput:
    """A camera's relay (DeviceIO) as a named output: active on, inactive off."""

    def __init__(self, runner: CameraRunner, token: str) -> None:
        self._runner = runner
        self._token = token

    async def set(self, on: bool) -> None:
        camera = self._runner.onvif
        if camera is None:
            raise RuntimeError(f"{self._runner.cam.id}: not connected over ONVIF")
        await camera.set_relay(self._token, on)


class CameraService:
    def __init__(self, section: CamerasConfig, cams: Sequence[CameraDevice], ctx: CapabilityContext) -> None:
        self.section = section
        self.ctx = ctx
        self.manifests = load_manifests(model_dirs(section))
        pv = section.privacy
        if pv.enabled:
            from edgeagent.drivers.camera.privacy import PRIVACY_MODEL, privacy_manifest  # noqa: PLC0415

            if pv.model not in self.manifests:
                raise ConfigError(f"cameras.privacy.model: no model manifest {pv.model!r} "
                                  f"(known: {', '.join(sorted(self.manifests))})")
            self.manifests[PRIVACY_MODEL] = privacy_manifest(self.manifests[pv.model], min_score=pv.min_score)
        self.engine = InferenceEngine(self.manifests, provider=section.provider, threads=section.threads,
                                      queue_size=section.queue_size, stuck_after_s=section.stuck_after_s)
        self.face_blur: Any = None
        if pv.enabled:
            from edgeagent.drivers.camera.privacy import FaceBlur  # noqa: PLC0415

            self.face_blur = FaceBlur(self.engine, min_score=pv.min_score, margin=pv.margin, method=pv.method,
                                      cells=pv.cells, tile_px=pv.tile_px)
        root = section.evidence.dir or (ctx.state_dir / "evidence")
        self.evidence = EvidenceStore(Path(root), max_bytes=section.evidence.max_bytes,
                                      retention_s=section.evidence.retention_days * 86_400,
                                      jpeg_quality=section.evidence.jpeg_quality)
        self.plates: Any = None  # the residents' plate list, opened when a camera runs the gate rule
        self.runners = {cam.id: CameraRunner(cam, self) for cam in cams}
        self._tasks: set[asyncio.Task[Any]] = set()
        if any(r.ebike is not None for r in self.runners.values()):
            ctx.alarms.listen(self._on_alarm)

    def rule_runners(self, cam: CameraDevice) -> tuple[GateRunner | None, EbikeRunner | None]:
        """The camera's car gate and e-bike rules, as pipeline observers."""
        ctx = self.ctx
        gate = ebike = None
        if cam.gate is not None:
            if self.plates is None:
                from edgeagent.drivers.camera.rules.plate_list import PlateList, plates_path  # noqa: PLC0415

                self.plates = PlateList(plates_path(ctx.state_dir))
            gate = GateRunner(cam, cam.gate, engine=self.engine, sink=ctx.sink, evidence=self.evidence,
                              lookup=self.plates.find, actions=ctx.local_actions, outputs=ctx.outputs,
                              wall=ctx.clock.now)
        if cam.ebike_lift is not None:
            ebike = EbikeRunner(cam, cam.ebike_lift, outputs=ctx.outputs, alarms=ctx.alarms, evidence=self.evidence)
        return gate, ebike

    async def _on_alarm(self, alarm: Any) -> None:
        for runner in self.runners.values():
            if runner.ebike is not None:
                await runner.ebike.on_alarm(alarm)

    def model_for(self, cam: CameraDevice) -> str:
        return cam.detect.model or self.section.detector

    def input_size(self, cam: CameraDevice) -> int:
        inp = self.manifests[self.model_for(cam)].input
        return int(max(inp.width, inp.height)) if isinstance(inp, ImageInput) else 416

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def models_needed(self) -> dict[str, str]:
        """Each model the cameras' detectors and rules run, with the first setting that names it."""
        needed: dict[str, str] = {}
        for r in self.runners.values():
            cam = r.cam
            needed.setdefault(self.model_for(cam), f"camera {cam.id}: detect.model" if cam.detect.model
                              else "cameras.detector")
            if cam.gate is not None:
                for key in ("plate_detector", "plate_reader", "second_opinion"):
                    name = getattr(cam.gate, key)
                    if name is not None:
                        needed.setdefault(name, f"camera {cam.id}: gate.{key}")
        return needed

    async def start(self) -> None:
        # Every model a camera runs is checked before anything starts: a rule whose model is missing or damaged
        # refuses the start with the setting that names it, rather than failing every read once running.
        for name, where in sorted(self.models_needed().items()):
            manifest = self.manifests.get(name)
            if manifest is None:
                raise ModelError(f"{where}: no model manifest {name!r} (known: {', '.join(sorted(self.manifests))})")
            try:
                await asyncio.to_thread(verify, manifest)
            except ModelError as exc:
                raise ModelError(f"{where} names model {name!r}, which cannot run: {exc}") from exc
        await self.evidence.open()
        await self.engine.__aenter__()

    async def stop(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 2.0)
        await self.engine.__aexit__(None, None, None)
        await self.evidence.aclose()
        if self.plates is not None:
            self.plates.close()

    async def prune_loop(self) -> None:
        while True:
            await self.evidence.prune(time.time())
            await asyncio.sleep(PRUNE_EVERY_S)

    def status(self) -> dict[str, Any]:
        return {"engine": self.engine.stats(), "evidence": self.evidence.stats(),
                "privacy": self.face_blur.stats() if self.face_blur is not None else {"enabled": False},
                "cameras": {cid: r.status() for cid, r in self.runners.items()}}


class CameraCapability(Capability):
    name = "cameras"

    def __init__(self, service: CameraService) -> None:
        self.service = service
        self._collector: CameraCollector | None = None

    async def __aenter__(self) -> CameraCapability:
        try:
            await self.service.start()
        except ModelError as exc:
            from edgeagent.kernel.errors import ConfigError  # noqa: PLC0415

            raise ConfigError(str(exc)) from exc
        self._collector = CameraCollector(self.service.status)
        metrics.REGISTRY.register(self._collector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._collector is not None:
            with contextlib.suppress(KeyError):
                metrics.REGISTRY.unregister(self._collector)
            self._collector = None
        await self.service.stop()

    def claimed_devices(self) -> Sequence[str]:
        return list(self.service.runners)

    def tasks(self) -> Sequence[TaskSpec]:
        specs = [TaskSpec("cameras:evidence-prune", self.service.prune_loop)]
        for cid, runner in self.service.runners.items():
            specs.append(TaskSpec(f"device:{cid}", runner.run))
            if runner.cam.onvif is not None and runner.cam.onvif.events:
                specs.append(TaskSpec(f"device:{cid}:events", runner.events))
            if runner.gate is not None:
                specs.append(TaskSpec(f"device:{cid}:gate", runner.gate.run))
            if runner.ebike is not None:
                specs.append(TaskSpec(f"device:{cid}:ebike-lift", runner.ebike.run))
        return specs

    def outputs(self) -> Mapping[str, Output]:
        outs: dict[str, Output] = {}
        for cid, runner in self.service.runners.items():
            if runner.cam.onvif is None:
                continue
            for name, token in runner.cam.onvif.relays.items():
                outs[f"{cid}.{name}"] = _RelayOutput(runner, token)
        return outs

    def commands(self) -> Sequence[CommandSpec]:
        from edgeagent.drivers.camera.upload import Uploader, upload_command  # noqa: PLC0415

        ev = self.service.section.evidence
        pv = self.service.section.privacy
        blur = self.service.face_blur
        uploader = Uploader(ca_file=ev.upload_ca_file, allow_private_hosts=ev.allow_private_upload_hosts,
                            redact=blur.redact if blur is not None else None,
                            upload_unredacted_clips=pv.upload_unredacted_clips)
        return [upload_command(self.service.evidence, uploader, self.service.ctx.sink),
                CommandSpec("camera.ptz_preset", self._ptz_command, PtzArgs, "move a PTZ camera to a preset")]

    async def _ptz_command(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        a = validate_args(PtzArgs, args)
        return await self._goto_preset(a.camera, a.preset)

    async def _goto_preset(self, camera_id: str, preset: str) -> Mapping[str, Any]:
        runner = self.service.runners.get(camera_id)
        if runner is None:
            raise CommandRejected("bad_args", f"no camera {camera_id!r}")
        if runner.onvif is None:
            raise CommandRejected("failed", f"{camera_id}: not connected over ONVIF")
        await runner.onvif.goto_preset(preset)
        return {"camera": camera_id, "preset": preset}

    def local_actions(self) -> Mapping[str, LocalAction]:
        return {"camera.snapshot": self._snapshot_action, "camera.shapes": self._shapes_action}

    async def _shapes_action(self, args: Mapping[str, Any], who: str) -> Mapping[str, Any]:
        """Apply a camera's zones and lines now, as its config entry now has them (the console's installer page
        calls this after saving them). A camera whose community rule (gate, e-bike, falls) names its zones
        applies them at the next start: its rule runner holds them too."""
        a = validate_args(ShapesArgs, args)
        runner = self.service.runners.get(a.camera)
        if runner is None:
            raise CommandRejected("bad_args", f"no camera {a.camera!r}")
        if runner.cam.has_rules:
            raise CommandRejected("failed", f"{a.camera}: its rules use its zones; restart the daemon to apply")
        try:
            cam = CameraDevice.model_validate({**runner.cam.model_dump(), "zones": a.zones, "lines": a.lines})
        except ValueError as exc:
            raise CommandRejected("bad_args", f"{a.camera}: {exc}") from None
        runner.pipeline.set_shapes(cam)
        runner.cam = runner.pipeline.cam
        log.info("%s: zones and lines applied (by %s): %s; %s", a.camera, who,
                 ", ".join(z.name for z in cam.zones) or "no zones", ", ".join(ln.name for ln in cam.lines) or
                 "no lines")
        return {"camera": a.camera, "zones": [z.name for z in cam.zones], "lines": [ln.name for ln in cam.lines]}

    async def _snapshot_action(self, args: Mapping[str, Any], who: str) -> Mapping[str, Any]:
        del who
        a = validate_args(SnapshotArgs, args)
        runner = self.service.runners.get(a.camera)
        if runner is None:
            raise CommandRejected("bad_args", f"no camera {a.camera!r}")
        frame = runner.pipeline.latest_frame
        if frame is None:
            why = runner.stream_error or "starting"
            raise CommandRejected("failed", f"{a.camera}: no frame yet ({why})")
        image = frame.image
        if a.boxes:
            from edgeagent.drivers.camera.evidence import draw_boxes  # noqa: PLC0415

            image = draw_boxes(image, runner.pipeline.stats.last_detections)
        ok, jpeg = await asyncio.to_thread(cv2.imencode, ".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise CommandRejected("failed", "JPEG encoding failed")
        h, w = image.shape[:2]
        return {"camera": a.camera, "width": w, "height": h, "age_s": round(time.monotonic() - frame.mono_s, 3),
                "jpeg_b64": base64.b64encode(jpeg.tobytes()).decode("ascii")}

    def status(self) -> Any:
        return self.service.status()


def doctor_checks(section: CamerasConfig, cams: Sequence[CameraDevice]) -> list[DoctorCheck]:
    """Models present and unaltered, the execution provider available, the evidence folder writable."""
    checks: list[DoctorCheck] = []
    try:
        manifests = load_manifests(model_dirs(section))
    except ModelError as exc:
        return [DoctorCheck("camera models", "fail", str(exc))]
    for name in sorted({c.detect.model or section.detector for c in cams}):
        m = manifests.get(name)
        if m is None:
            checks.append(DoctorCheck(f"model {name}", "fail", "no manifest of that name"))
            continue
        try:
            verify(m)
        except ModelError as exc:
            checks.append(DoctorCheck(f"model {name}", "fail", str(exc)))
        else:
            checks.append(DoctorCheck(f"model {name}", "ok", f"sha256 {m.sha256[:12]}… verified"))
    import onnxruntime  # noqa: PLC0415

    avail = onnxruntime.get_available_providers()
    checks.append(DoctorCheck("inference providers", "ok", ", ".join(avail)))
    if section.evidence.dir is not None:
        d = section.evidence.dir
        ok = d.is_dir() and os.access(d, os.W_OK)
        checks.append(DoctorCheck("evidence folder", "ok" if ok else "warn",
                                  f"{d} {'writable' if ok else 'missing or not writable'}"))
    for cam in cams:
        url = cam.rtsp.detect_url
        if url and url.startswith("file:"):
            path = Path(urlsplit(url).path)
            checks.append(DoctorCheck(f"camera {cam.id}", "ok" if path.is_file() else "fail",
                                      f"recording {path} {'found' if path.is_file() else 'missing'}"))
    return checks
