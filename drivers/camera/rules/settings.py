"""Config of the falls and thrown-object rules on a camera (``falls:`` and ``thrown:`` under a camera device),
and their translation into the pure cores' specs.

``falls``: poses of the people in the camera's named ``zones`` (none: the whole frame) into the fall head;
a confirmed fall raises ``video_fall`` about ``place`` (default: the camera's name or id), escalated on the
site's main ladder (the resident escalation the wristbands use) unless ``alarms.policies.video_fall`` says
otherwise; where the site links the area to a resident (one living alone on that landing), ``resident`` names
them in the alarm's details.

``thrown``: the façade (its window grid's quad, floors and columns) this camera looks up at; every frame of
the stream goes through the thrown-object detector (see :mod:`.thrown` for what each number does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field, model_validator

from edgeagent.kernel.config.base import Strict

if TYPE_CHECKING:  # the cores pull in numpy and OpenCV: not at config load
    from edgeagent.drivers.camera.rules.falls import FallSpec
    from edgeagent.drivers.camera.rules.thrown import FacadeSpec, ThrownParams

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
QuadPoint = Annotated[tuple[float, float], Field(description="x, y normalized to the frame (-0.5..1.5)")]


class FallsConfig(Strict):
    """Falls in a common area seen by this camera."""

    zones: list[str] = Field(default_factory=list, max_length=64,
                             description="names of this camera's zones where falls count (none: the whole frame)")
    place: str | None = Field(default=None, min_length=1, max_length=64,
                              description="the place in alarms (default: the camera's name or id)")
    resident: str | None = Field(default=None, min_length=1, max_length=64,
                                 description="a resident linked to this area, named in the alarm's details")
    threshold: float = Field(default=0.7, gt=0, le=1, description="fallen probability a head output must reach")
    min_high: int = Field(default=3, ge=1, le=5, description="outputs at threshold among the last 5 to confirm")
    recover_s: float = Field(default=2.0, ge=0, le=60, description="up this long: the fall episode ends")
    pose_fps: float = Field(default=8.0, gt=0, le=30, description="poses per second per person at most")
    max_people: int = Field(default=6, ge=1, le=16, description="people posed per tick (the largest first)")
    pose_model: str = Field(default="movenet-multipose", description="pose model manifest")
    head_model: str = Field(default="nfd-fall", description="temporal fall head manifest")

    def spec(self) -> FallSpec:
        from edgeagent.drivers.camera.rules.falls import FallSpec  # noqa: PLC0415

        return FallSpec(threshold=self.threshold, min_high=self.min_high, recover_s=self.recover_s)


class ThrownConfig(Strict):
    """Objects thrown from height: the façade this camera looks up at."""

    quad: tuple[QuadPoint, QuadPoint, QuadPoint, QuadPoint] = Field(
        description="the window grid's corners: top-left, top-right, bottom-right, bottom-left, normalized")
    floors: int = Field(ge=1, le=300, description="rows of the grid (floors in view)")
    columns: int = Field(ge=1, le=500, description="columns of the grid (windows across)")
    bottom_floor: int = Field(default=1, ge=-20, le=300, description="floor number of the lowest row in view")
    floor_height_m: float = Field(default=3.0, ge=0.5, le=20)
    column_width_m: float = Field(default=3.0, ge=0.1, le=50)
    roi: tuple[float, float, float, float] | None = Field(
        default=None, description="x1, y1, x2, y2 to watch, normalized (default: the quad grown by roi_margin)")
    roi_margin: float = Field(default=0.15, ge=0, le=2)
    place: str | None = Field(default=None, min_length=1, max_length=64,
                              description="the place in alarms (default: the camera's name or id)")
    threshold: int = Field(default=18, ge=1, le=254, description="grey levels of change from the background")
    downscale: int = Field(default=1, ge=1, le=8, description="shrink the region first (1080p: 2)")
    min_fall_floors: float = Field(default=1.0, gt=0, le=10, description="descent needed to alarm, in floors")
    clip_pre_s: float = Field(default=4.0, ge=0, le=10, description="clip seconds before the decision")
    clip_post_s: float = Field(default=2.0, ge=0, le=5, description="clip seconds after (the alarm waits for it)")
    max_frames: int = Field(default=25, ge=2, le=250, description="full-rate frames queued; oldest dropped")

    @model_validator(mode="after")
    def _facade(self) -> ThrownConfig:
        self.facade()  # ValueError with the reason
        return self

    def facade(self) -> FacadeSpec:
        from edgeagent.drivers.camera.rules.thrown import FacadeSpec  # noqa: PLC0415

        return FacadeSpec(quad=self.quad, floors=self.floors, columns=self.columns, bottom_floor=self.bottom_floor,
                          floor_height_m=self.floor_height_m, column_width_m=self.column_width_m, roi=self.roi,
                          roi_margin=self.roi_margin)

    def params(self) -> ThrownParams:
        from edgeagent.drivers.camera.rules.thrown import ThrownParams  # noqa: PLC0415

        return ThrownParams(threshold=self.threshold, downscale=self.downscale, min_fall_floors=self.min_fall_floors)
