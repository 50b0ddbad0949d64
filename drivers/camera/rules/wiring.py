"""Building the falls and thrown-object runners of a camera from its config (called by the camera service)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeagent.kernel.errors import ConfigError

if TYPE_CHECKING:
    from edgeagent.drivers.camera.config import CameraDevice
    from edgeagent.drivers.camera.rules.fall_runner import FallObserver
    from edgeagent.drivers.camera.rules.thrown_runner import ThrownRunner
    from edgeagent.drivers.camera.service import CameraService


def fall_observer(cam: CameraDevice, service: CameraService) -> FallObserver | None:
    """The camera's fall observer, or None without a ``falls:`` section. ConfigError for a missing model."""
    cfg = cam.falls
    if cfg is None:
        return None
    from edgeagent.drivers.camera.rules.fall_runner import FallObserver, FallSettings  # noqa: PLC0415

    for key, model in (("pose_model", cfg.pose_model), ("head_model", cfg.head_model)):
        if model not in service.manifests:
            raise ConfigError(f"{cam.id}: falls.{key}: no model manifest {model!r} "
                              f"(known: {', '.join(sorted(service.manifests))})")
    zones = {z.name: tuple(z.points) for z in cam.zones}
    settings = FallSettings(spec=cfg.spec(), place=cfg.place or cam.name or cam.id, resident=cfg.resident,
                            zones=tuple(zones[n] for n in cfg.zones), pose_model=cfg.pose_model,
                            head_model=cfg.head_model, pose_fps=cfg.pose_fps, max_people=cfg.max_people)
    return FallObserver(cam.id, settings, engine=service.engine, alarms=service.ctx.alarms,
                        evidence=service.evidence if cam.snapshots else None)


def thrown_runner(cam: CameraDevice, service: CameraService) -> ThrownRunner | None:
    """The camera's thrown-object path, or None without a ``thrown:`` section."""
    cfg = cam.thrown
    if cfg is None:
        return None
    from edgeagent.drivers.camera.rules.thrown_runner import ThrownRunner, ThrownSettings  # noqa: PLC0415

    settings = ThrownSettings(spec=cfg.facade(), params=cfg.params(), place=cfg.place or cam.name or cam.id,
                              clip_pre_s=cfg.clip_pre_s, clip_post_s=cfg.clip_post_s,
                              clip_max_bytes=service.section.evidence.buffer_bytes_per_camera,
                              max_frames=cfg.max_frames)
    return ThrownRunner(cam.id, settings, alarms=service.ctx.alarms, evidence=service.evidence)
