"""What the model engine hands back, shared by the decoders, the camera pipeline and the rules.

Coordinates are always pixels of the image the caller passed in (a whole frame, or a region of it
that the engine maps back), ``x1 < x2``, ``y1 < y2``, floats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes; 0 when either is empty or inverted."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Detection:
    """One object a detector found.

    ``label`` is the manifest's label for ``class_id``; ``points`` holds landmarks or keypoints where the
    model gives them (CenterFace's 5 face points, a plate's 4 corners in the order the decoder documents,
    MoveNet's 17 keypoints as ``(x, y, score)``); ``text`` is what a reader read.
    """

    label: str
    score: float
    box: Box
    class_id: int = 0
    points: tuple[tuple[float, float, float], ...] = ()
    text: str | None = None
    model: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    def shifted(self, dx: float, dy: float, scale_x: float = 1.0, scale_y: float = 1.0) -> Detection:
        """The same detection in another image's pixels: ``x' = x * scale_x + dx``."""
        x1, y1, x2, y2 = self.box
        return Detection(
            label=self.label, score=self.score, class_id=self.class_id, text=self.text, model=self.model,
            box=(x1 * scale_x + dx, y1 * scale_y + dy, x2 * scale_x + dx, y2 * scale_y + dy),
            points=tuple((x * scale_x + dx, y * scale_y + dy, s) for x, y, s in self.points),
            extra=dict(self.extra))


class ModelError(Exception):
    """A model cannot be used: its manifest is wrong, its file is missing or altered, or it fails to load.
    The message names the manifest and says what to do."""


class InferenceError(Exception):
    """One inference failed (the engine is busy, the worker died or got stuck, the input was unusable).
    The caller skips this detection tick; the engine carries on."""


class EngineBusy(InferenceError):
    """The engine's bounded queue is full; the request was refused (and counted) without waiting."""


class InferenceTimeout(InferenceError):
    """The inference did not finish in time; the watchdog restarted the worker."""
