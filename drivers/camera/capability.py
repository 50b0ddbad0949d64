"""Cameras as a capability: one shared inference engine, and per camera its stream (one RTSP session shared
inside the box), its detection pipeline, its ONVIF events and relays; the evidence store and the upload
command; health in ``status``, ``/metrics`` and ``doctor``.

Heavy libraries (onnxruntime, PyAV, onvif) load only when the capability is built: the CLI reads the spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgeagent.drivers.camera.config import CameraDevice, CamerasConfig
from edgeagent.drivers.camera.rules.alarm_kinds import CAMERA_RULE_ALARM_KINDS
from edgeagent.drivers.camera.rules.ebike_runner import EBIKE_ALARM_KIND
from edgeagent.kernel.capability import Capability, CapabilityContext, CapabilitySpec, DoctorCheck
from edgeagent.kernel.config.schema import CoreConfig, DeviceBase, Issue

if TYPE_CHECKING:
    from edgeagent.drivers.camera.service import CameraService


def _build(section: CamerasConfig | None, devices: Sequence[DeviceBase], ctx: CapabilityContext
           ) -> Capability | None:
    from edgeagent.drivers.camera.service import CameraCapability, CameraService  # noqa: PLC0415

    cams = [d for d in devices if isinstance(d, CameraDevice) and d.enabled]
    if not cams:
        return None
    section = section or CamerasConfig()
    if not section.enabled:
        return None
    service: CameraService = CameraService(section, cams, ctx)
    return CameraCapability(service)


def _cross_checks(section: CamerasConfig | None, devices: Sequence[DeviceBase], cfg: CoreConfig) -> list[Issue]:
    """Detector names resolve to a manifest; a zone's classes are ones the camera tracks."""
    from edgeagent.models.manifest import load_manifests  # noqa: PLC0415
    from edgeagent.models.types import ModelError  # noqa: PLC0415

    issues: list[Issue] = []
    cams = [(i, d) for i, d in enumerate(cfg.devices) if isinstance(d, CameraDevice)]
    if not cams:
        return issues
    section = section or CamerasConfig()
    try:
        manifests = load_manifests(model_dirs(section))
    except ModelError as exc:
        return [(("cameras", "model_dirs"), str(exc))]
    if section.detector not in manifests:
        issues.append((("cameras", "detector"),
                       f"no model manifest {section.detector!r} (known: {', '.join(sorted(manifests))})"))
    for i, cam in cams:
        if cam.detect.model is not None and cam.detect.model not in manifests:
            issues.append((("devices", i, "detect", "model"),
                           f"no model manifest {cam.detect.model!r} (known: {', '.join(sorted(manifests))})"))
            continue
        manifest = manifests.get(cam.detect.model or section.detector)
        labels = set(manifest.labels_list) if manifest is not None else set()
        if labels:
            for j, cls in enumerate(cam.detect.classes):
                if cls not in labels:
                    issues.append((("devices", i, "detect", "classes", j),
                                   f"the detector does not know {cls!r}"))
        named: list[tuple[str, int, list[str] | None]] = [("zones", j, z.classes) for j, z in enumerate(cam.zones)]
        named += [("lines", j, ln.classes) for j, ln in enumerate(cam.lines)]
        for kind, j, item_classes in named:
            for cls in item_classes or ():
                if cls not in cam.detect.classes:
                    issues.append((("devices", i, kind, j, "classes"),
                                   f"{cls!r} is not among this camera's detect.classes, so it is never tracked"))
    return issues


def model_dirs(section: CamerasConfig) -> list[Path]:
    """The site's manifest folders; the shipped models/ folder is always read first."""
    return list(section.model_dirs)


def _doctor(section: CamerasConfig | None, cfg: CoreConfig) -> list[DoctorCheck]:
    from edgeagent.drivers.camera.service import doctor_checks  # noqa: PLC0415

    cams = [d for d in cfg.devices if isinstance(d, CameraDevice) and d.enabled]
    if not cams:
        return [DoctorCheck("cameras", "skip", "no cameras configured")]
    return doctor_checks(section or CamerasConfig(), cams)


SPEC: CapabilitySpec[CamerasConfig] = CapabilitySpec(
    name="cameras", build=_build, section="cameras", section_model=CamerasConfig, optional=True,
    device_types=(CameraDevice,), cross_checks=_cross_checks, doctor=_doctor,
    alarm_kinds=(*CAMERA_RULE_ALARM_KINDS, EBIKE_ALARM_KIND))
