"""Cameras as a capability: one shared inference engine, and per camera its stream (one RTSP session shared
inside the box), its detection pipeline, its ONVIF events and relays; the evidence store and the upload
command; health in ``status``, ``/metrics`` and ``doctor``.

Heavy libraries (onnxruntime, PyAV, onvif) load only when the capability is built: the CLI reads the spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.drivers.camera.config import CameraDevice, CamerasConfig
from edgeagent.drivers.camera.rules.alarm_kinds import CAMERA_RULE_ALARM_KINDS
from edgeagent.kernel.alarms.kinds import AlarmKindSpec, KindPolicy
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
        issues += _rule_checks(i, cam, cfg, manifests, labels)
        named: list[tuple[str, int, list[str] | None]] = [("zones", j, z.classes) for j, z in enumerate(cam.zones)]
        named += [("lines", j, ln.classes) for j, ln in enumerate(cam.lines)]
        for kind, j, item_classes in named:
            for cls in item_classes or ():
                if cls not in cam.detect.classes:
                    issues.append((("devices", i, kind, j, "classes"),
                                   f"{cls!r} is not among this camera's detect.classes, so it is never tracked"))
    return issues


def known_outputs(cfg: CoreConfig) -> set[str]:
    """The named outputs the config makes: Modbus relay channels (bare and '<device>.<name>'), cameras' relays."""
    names: set[str] = set()
    for dev in cfg.devices:
        if getattr(dev, "type", "") == "modbus.relay":
            for name in getattr(dev, "channels", {}).values():
                names |= {name, f"{dev.id}.{name}"}
        elif isinstance(dev, CameraDevice) and dev.onvif is not None:
            names |= {f"{dev.id}.{name}" for name in dev.onvif.relays}
    return names


def _rule_checks(i: int, cam: CameraDevice, cfg: CoreConfig, manifests: Mapping[str, Any],
                 labels: set[str]) -> list[Issue]:
    """The car gate's and the e-bike rule's references: what opens the gate, the outputs, the models, the
    site's e-bike class."""
    issues: list[Issue] = []
    outputs = known_outputs(cfg)
    gates = {d.id for d in cfg.devices if getattr(d, "type", "") == "modbus.gate"}
    if cam.gate is not None:
        g = cam.gate
        if g.open not in gates and g.open not in outputs:
            issues.append((("devices", i, "gate", "open"),
                           f"{g.open!r} is neither a Modbus gate (gates: {', '.join(sorted(gates)) or 'none'}) "
                           f"nor a named output (outputs: {', '.join(sorted(outputs)) or 'none'})"))
        for key, model in (("plate_detector", g.plate_detector), ("plate_reader", g.plate_reader),
                           ("second_opinion", g.second_opinion)):
            if model is not None and model not in manifests:
                issues.append((("devices", i, "gate", key),
                               f"no model manifest {model!r} (known: {', '.join(sorted(manifests))})"))
    if cam.ebike_lift is not None:
        e = cam.ebike_lift
        for key, name in (("door_hold", e.door_hold), ("announce", e.announce)):
            if name is not None and name not in outputs:
                issues.append((("devices", i, "ebike_lift", key),
                               f"no output {name!r} (a Modbus relay channel's name, or a camera relay "
                               f"'<camera>.<name>'; outputs: {', '.join(sorted(outputs)) or 'none'})"))
        if e.site_class and labels and e.site_class not in labels:
            issues.append((("devices", i, "ebike_lift", "site_class"),
                           f"the detector does not know {e.site_class!r}: set detect.model to the site's model"))
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


# The e-bike lift rule's alarm (drivers/camera/rules/ebike_runner.py). High, not critical: nobody is hurt yet,
# and the door hold and the announcement act on their own; the guard room is told at once and again every
# minute until someone acknowledges, the main ladder's next level after 3 minutes.
EBIKE_ALARM_KIND = AlarmKindSpec("ebike_in_lift", "E-bike in a lift car (camera)",
                                 KindPolicy("high", repeat_s=60, escalate_after_s=(180,)), subject="place")

SPEC: CapabilitySpec[CamerasConfig] = CapabilitySpec(
    name="cameras", build=_build, section="cameras", section_model=CamerasConfig, optional=True,
    device_types=(CameraDevice,), cross_checks=_cross_checks, doctor=_doctor,
    alarm_kinds=(*CAMERA_RULE_ALARM_KINDS, EBIKE_ALARM_KIND))
