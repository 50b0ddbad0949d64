"""Config of the camera capability: the ``cameras`` section (the shared detector, evidence) and the
``camera`` device type (ONVIF and/or RTSP, detection, zones and lines).

Zones and lines are in normalized coordinates (0..1 of the frame's width and height): the detection
sub-stream and the main stream have different resolutions but the same picture, so one drawing fits both.
Credentials never sit in a URL: ``username`` and ``password`` (a secret reference) serve ONVIF, the
snapshot URI and RTSP alike; a URL with ``user:pass@`` in it is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from edgeagent.drivers.camera.rules.settings import FallsConfig, ThrownConfig
from edgeagent.kernel.config.base import SecretField, Strict
from edgeagent.kernel.config.schema import DeviceBase

Point = Annotated[tuple[float, float], Field(description="x, y normalized to the frame (0..1)")]
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


def _check_point(p: tuple[float, float]) -> tuple[float, float]:
    if not (0.0 <= p[0] <= 1.0 and 0.0 <= p[1] <= 1.0):
        raise ValueError(f"point {list(p)} is outside the frame: coordinates are normalized, 0..1")
    return p


def _polygon_area(points: list[tuple[float, float]]) -> float:
    s = 0.0
    for i, (x1, y1) in enumerate(points):
        x2, y2 = points[(i + 1) % len(points)]
        s += x1 * y2 - x2 * y1
    return abs(s) / 2


class ZoneConfig(Strict):
    """A polygon on the picture: objects entering, leaving, loitering; occupancy by class."""

    name: str = Field(pattern=NAME_PATTERN, description="unique per camera; appears in events")
    points: list[Point] = Field(min_length=3, max_length=64, description="the polygon's corners, in order")
    classes: list[str] | None = Field(default=None, description="only these labels (default: the camera's classes)")
    min_score: float | None = Field(default=None, ge=0, le=1)
    min_area: float = Field(default=0.0, ge=0, le=1, description="minimum box area, as a fraction of the frame")
    loiter_s: float | None = Field(default=None, gt=0, le=86_400, description="a loiter event after this long inside")
    events: list[Literal["enter", "leave", "loiter", "occupancy"]] = Field(
        default=["enter", "leave", "loiter", "occupancy"], description="which of these to report")

    @field_validator("points")
    @classmethod
    def _points(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        for p in v:
            _check_point(p)
        if _polygon_area(v) < 1e-4:
            raise ValueError("the polygon has (almost) no area: are two of its points the same, or all on a line?")
        return v


class LineConfig(Strict):
    """A segment from ``a`` to ``b``; crossings counted per direction. ``a_to_b`` names the crossing from the
    left of a→b to its right as seen on the picture (y grows downwards): for a horizontal line drawn left to
    right, that is moving downwards in the picture."""

    name: str = Field(pattern=NAME_PATTERN)
    a: Point
    b: Point
    a_to_b: str = Field(default="in", pattern=NAME_PATTERN, description="name of one direction")
    b_to_a: str = Field(default="out", pattern=NAME_PATTERN, description="name of the other")
    classes: list[str] | None = None
    min_score: float | None = Field(default=None, ge=0, le=1)
    min_area: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _segment(self) -> LineConfig:
        _check_point(self.a)
        _check_point(self.b)
        if abs(self.a[0] - self.b[0]) + abs(self.a[1] - self.b[1]) < 0.01:
            raise ValueError("the line's ends a and b are (almost) the same point")
        if self.a_to_b == self.b_to_a:
            raise ValueError("a_to_b and b_to_a must name different directions")
        return self


class OnvifConfig(Strict):
    host: str = Field(min_length=1, max_length=253, description="the camera's address")
    port: int = Field(default=80, ge=1, le=65535, description="its ONVIF (HTTP) port")
    auth: Literal["auto", "digest", "ws-security"] = Field(
        default="auto", description="auto: WS-Security, and HTTP Digest where the camera asks for it")
    events: bool = Field(default=True, description="subscribe to its events (motion, tamper, inputs, line rules)")
    profile: str | None = Field(default=None, description="media profile token for detection (default: chosen)")
    record_profile: str | None = Field(default=None, description="profile for snapshots and clips (default: main)")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="digital input token -> name in events, e.g. {'DI1': 'call_button'}")
    relays: dict[str, str] = Field(
        default_factory=dict,
        description="output name -> the camera's relay token; each becomes the named output '<camera id>.<name>' "
        "rules can drive (a plate camera's own barrier relay)")
    timeout_s: float = Field(default=10.0, gt=0, le=120)


class RtspConfig(Strict):
    detect_url: str | None = Field(default=None, description="stream for detection (default: from ONVIF, sub-stream)")
    record_url: str | None = Field(default=None, description="stream for clips (default: detect_url's)")
    open_timeout_s: float = Field(default=5.0, gt=0, le=60)
    frozen_after_s: float = Field(default=3.0, gt=0, le=60,
                                  description="no frame for this long: the stream is reopened")

    @field_validator("detect_url", "record_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("rtsp", "rtsps", "file"):
            raise ValueError(f"{parts.scheme or 'no scheme'}: use rtsp://, rtsps:// (or file:// for a recording)")
        if parts.password is not None or (parts.username is not None and parts.scheme != "file"):
            raise ValueError("put no credentials in the URL: give the camera's 'username' and 'password' "
                             "(a secret reference) instead")
        return v


class DetectConfig(Strict):
    enabled: bool = True
    fps: float = Field(default=5.0, gt=0, le=30, description="detection ticks per second")
    model: str | None = Field(default=None, description="detector manifest name (default: cameras.detector)")
    classes: list[str] = Field(
        default_factory=lambda: ["person", "bicycle", "car", "motorcycle", "bus", "truck"],
        description="labels to track; the model knows more")
    min_score: float = Field(default=0.4, ge=0, le=1)
    class_min_score: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: {"person": 0.5},
        description="a higher minimum score for some labels (on top of min_score): NanoDet scores traffic cones "
                    "and stones 0.42-0.47 as 'person', people 0.53-0.88")
    min_area: float = Field(default=0.0005, ge=0, le=1, description="minimum box area, fraction of the frame")
    scale: float = Field(
        default=0.75, gt=0.1, le=1.0,
        description="the detector sees its crops of the detection stream at this scale (1.0: every pixel); "
                    "the cost of a run follows the crop's pixels at this scale (models with a dynamic input; "
                    "not on a camera with a gate, ebike_lift or falls rule, which keeps model-size squares). "
                    "Raise it toward 1.0 when the people to find are under ~60 px tall on the detection stream")
    objects_events: bool = Field(default=True, description="a camera.object event per new track")


VEHICLE_CLASSES = ("car", "truck", "bus")
BIKE_CLASSES = ("bicycle", "motorcycle")


class GateRuleConfig(Strict):
    """The car gate: a vehicle track in ``zone`` has its plate read frame by frame (the plate detector and
    reader through the shared engine), voted into one decision per track (see
    :mod:`edgeagent.drivers.camera.rules.plates` for what each setting does and the figures behind the
    defaults); a resident's plate opens ``open``; any other plate is a ``gate.visitor`` event."""

    zone: str = Field(pattern=NAME_PATTERN, description="the camera's zone where a vehicle's plate is read")
    open: str = Field(min_length=1, max_length=130, description="what opens the barrier: a Modbus gate device id "
                      "(its gate.open command), or a named output such as the camera's relay '<camera id>.<name>'")
    relay_pulse_s: float = Field(default=1.0, gt=0, le=30, description="an output is pulsed this long to open")
    classes: list[str] = Field(default_factory=lambda: list(VEHICLE_CLASSES), min_length=1,
                               description="detector labels that are vehicles (added to detect.classes)")
    call_input: str = Field(default="call_button", max_length=64,
                            description="the camera input (onvif.inputs name) that is the driver's call button")
    plate_detector: str = Field(default="clp_det", description="plate detector manifest")
    plate_reader: str = Field(default="clp_v2_c_rec", description="plate reader manifest")
    second_opinion: str | None = Field(
        default="ppocr_rec", description="a general text reader's manifest, read on the same plate crop as a check "
        "(weighs second_opinion_weight of a plate read, never counts toward opening); null: none")
    read_every_s: float = Field(default=0.2, ge=0, le=10, description="at most one plate read per track this often")
    min_read_confidence: float = Field(default=0.6, ge=0, le=1)
    min_confidence: float = Field(default=0.8, ge=0, le=1)
    min_province_confidence: float = Field(default=0.95, ge=0, le=1)
    min_frames: int = Field(default=3, ge=1, le=64)
    min_agreement: float = Field(default=0.75, gt=0.5, le=1)
    visitor_wait_s: float = Field(default=2.0, ge=0, le=120)
    decide_after_s: float = Field(default=10.0, gt=0, le=600)
    second_opinion_weight: float = Field(default=0.5, ge=0, le=1)


class EbikeLiftConfig(Strict):
    """A lift car camera's e-bike rule: a confirmed bike in ``zone`` holds the doors (``door_hold``) and
    announces (``announce``) until it leaves, raising an ``ebike_in_lift`` alarm (see
    :mod:`edgeagent.drivers.camera.rules.ebike` for each setting)."""

    zone: str = Field(pattern=NAME_PATTERN, description="the camera's zone drawn on the car's floor")
    place: str | None = Field(default=None, max_length=64, description="the place in alarms (default: the camera's "
                              "name or id), e.g. 'building 3 lift 2'")
    classes: list[str] = Field(default_factory=lambda: list(BIKE_CLASSES), min_length=1,
                               description="detector labels taken for a bike (added to detect.classes)")
    site_class: str | None = Field(default=None, description="the e-bike class of a site's own model")
    door_hold: str = Field(min_length=1, max_length=130, description="output that holds the car's doors open")
    announce: str | None = Field(default=None, max_length=130, description="output for the voice message or siren")
    min_score: float = Field(default=0.45, ge=0, le=1)
    min_area: float = Field(default=0.06, ge=0, le=1, description="box area over the frame's")
    min_span: float = Field(default=0.3, ge=0, le=1, description="the box's longer side over the frame's")
    dwell_s: float = Field(default=0.6, ge=0, le=60)
    clear_s: float = Field(default=2.0, ge=0, le=300)
    max_hold_s: float = Field(default=120.0, gt=0, le=3600, description="longest door hold (fire safety)")
    alarm_timeout_s: float | None = Field(default=600.0, gt=0, le=86_400)
    rearm_s: float = Field(default=60.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _times(self) -> EbikeLiftConfig:
        if self.alarm_timeout_s is not None and self.alarm_timeout_s < self.max_hold_s:
            raise ValueError("alarm_timeout_s must be at least max_hold_s (the door is released first)")
        return self


class CameraDevice(DeviceBase):
    """An IP camera: ONVIF for its streams, events and relays, or a bare RTSP stream."""

    type: Literal["camera"]
    onvif: OnvifConfig | None = None
    rtsp: RtspConfig = RtspConfig()
    username: str | None = Field(default=None, max_length=128)
    password: SecretField | None = None
    detect: DetectConfig = DetectConfig()
    zones: list[ZoneConfig] = Field(default_factory=list, max_length=64)
    lines: list[LineConfig] = Field(default_factory=list, max_length=64)
    snapshots: bool = Field(default=True, description="keep a snapshot per object/zone/line event")
    snapshots_from: Literal["main", "detect"] = Field(
        default="main", description="main: the camera's own snapshot of its main stream (ONVIF), sharper; "
        "detect: the frame the detector saw. Falls back to detect when the camera has no snapshot URI")
    clips: bool = Field(default=False, description="keep a clip for zone and line events (pre/post buffer)")
    gate: GateRuleConfig | None = Field(default=None, description="the car gate rule (plates)")
    ebike_lift: EbikeLiftConfig | None = Field(default=None, description="the e-bike in a lift car rule")
    falls: FallsConfig | None = Field(default=None, description="falls in a common area (pose + fall head)")
    thrown: ThrownConfig | None = Field(default=None, description="objects thrown from height (a façade camera)")

    @property
    def has_rules(self) -> bool:
        """A camera whose detections drive a community rule (what the detector misses, a rule misses)."""
        return self.gate is not None or self.ebike_lift is not None or self.falls is not None

    @model_validator(mode="after")
    def _source(self) -> CameraDevice:
        if self.onvif is None and self.rtsp.detect_url is None:
            raise ValueError("a camera needs 'onvif' (host, port) or 'rtsp.detect_url'")
        names = [z.name for z in self.zones] + [ln.name for ln in self.lines]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"zone/line names must be unique per camera: {sorted(dup)}")
        return self

    @model_validator(mode="after")
    def _rules(self) -> CameraDevice:
        """A rule's zone exists; the classes a rule needs are tracked (added to detect.classes)."""
        zones = [z.name for z in self.zones]
        needed: list[str] = []
        for key, rule in (("gate", self.gate), ("ebike_lift", self.ebike_lift)):
            if rule is None:
                continue
            if rule.zone not in zones:
                known = ", ".join(zones) or "none"
                raise ValueError(f"{key}.zone: no zone {rule.zone!r} on this camera (zones: {known})")
            needed += rule.classes
        if self.ebike_lift is not None and self.ebike_lift.site_class:
            needed.append(self.ebike_lift.site_class)
        if self.falls is not None:
            for name in self.falls.zones:
                if name not in zones:
                    known = ", ".join(zones) or "none"
                    raise ValueError(f"falls.zones: no zone {name!r} on this camera (zones: {known})")
            needed.append("person")
        missing = [c for c in dict.fromkeys(needed) if c not in self.detect.classes]
        if missing:
            # frozen model: the rules' classes are added to what the detector keeps
            object.__setattr__(self, "detect", self.detect.model_copy(
                update={"classes": [*self.detect.classes, *missing]}))
        return self


class EvidenceConfig(Strict):
    dir: Path | None = Field(default=None, description="default: <state_dir>/evidence")
    max_bytes: int = Field(default=2_000_000_000, ge=10_000_000, description="snapshots and clips together")
    retention_days: float = Field(default=7, gt=0, le=365)
    jpeg_quality: int = Field(default=85, ge=30, le=100)
    clip_pre_s: float = Field(default=5.0, ge=0, le=30)
    clip_post_s: float = Field(default=5.0, ge=0, le=30)
    buffer_bytes_per_camera: int = Field(default=8_000_000, ge=500_000, le=200_000_000,
                                         description="encoded video kept for clips, per camera")
    upload_ca_file: Path | None = Field(default=None, description="CA for upload URLs (default: the system's)")
    allow_private_upload_hosts: bool = Field(
        default=False, description="let upload URLs point at private/loopback addresses (a platform on the LAN)")


class PrivacyConfig(Strict):
    """Faces blurred in every picture that leaves the box (PIPL): CenterFace finds them, over the whole picture
    and magnified tiles; a picture whose faces cannot be found is not sent (fail closed). Evidence kept on the
    box stays sharp for the guard room unless ``blur_on_save``; no face crop or embedding ever leaves."""

    enabled: bool = Field(default=True, description="blur faces in uploads (turn off only where the site may)")
    model: str = Field(default="centerface", description="face detector manifest")
    min_score: float = Field(default=0.3, gt=0, le=1, description="faces found above this are blurred")
    margin: float = Field(default=0.4, ge=0, le=2, description="each face box grown by this share of its size")
    method: Literal["pixelate", "gaussian"] = "pixelate"
    cells: int = Field(default=8, ge=2, le=64, description="a face keeps at most cells x cells colours")
    tile_px: int = Field(default=448, ge=32, le=4096, description="tiles for small far faces (larger: cheaper)")
    upload_unredacted_clips: bool = Field(
        default=False, description="clips cannot be blurred without re-encoding: refused unless this is set")


class CamerasConfig(Strict):
    """The shared detector and the evidence kept on the box."""

    enabled: bool = True
    detector: str = Field(default="nanodet", description="default detector manifest for every camera")
    model_dirs: list[Path] = Field(
        default_factory=list, description="extra manifest folders (a site's own models); later ones override")
    provider: str = Field(default="cpu", description="onnxruntime execution provider: cpu, auto, or a name")
    threads: int = Field(default=2, ge=1, le=64, description="threads per inference")
    queue_size: int = Field(default=8, ge=1, le=256, description="inference requests waiting; more are refused")
    stuck_after_s: float = Field(default=10.0, gt=0, le=300, description="an inference this slow restarts the worker")
    evidence: EvidenceConfig = EvidenceConfig()
    privacy: PrivacyConfig = PrivacyConfig()
