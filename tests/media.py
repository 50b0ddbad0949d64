"""Where the tests find real media and the shipped models.

CI clones the repository with ``../shared`` beside it (real images and the pedestrian clip, each with its
provenance in ``../shared/media/PROVENANCE.md``); the models ship in the repository's ``models/`` folder.
A missing file fails the test that needs it, with what to do (never a silent skip).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"
MODELS = REPO / "models"
CLIP = MEDIA / "vtest.avi"


def media(name: str) -> Path:
    """A file of ``../shared/media``; FileNotFoundError naming where it should be."""
    path = MEDIA / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the tests need ../shared/media beside the repository "
                                "(see ../shared/media/PROVENANCE.md)")
    return path


def image(name: str) -> np.ndarray:
    """A media image as uint8 BGR."""
    found = cv2.imread(str(media(name)), cv2.IMREAD_COLOR)
    if found is None:
        raise FileNotFoundError(f"{media(name)} cannot be read as an image")
    return np.asarray(found, dtype=np.uint8)


def clip_frames(indexes: list[int], path: Path | None = None) -> list[np.ndarray]:
    """Frames of the pedestrian clip (or ``path``) at the given 0-based indexes, uint8 BGR."""
    cap = cv2.VideoCapture(str(path or media(CLIP.name)))
    try:
        wanted = sorted(set(indexes))
        found: dict[int, np.ndarray] = {}
        k = 0
        while wanted and k <= wanted[-1]:
            ok, frame = cap.read()
            if not ok:
                break
            if k in wanted:
                found[k] = np.asarray(frame, dtype=np.uint8)
            k += 1
    finally:
        cap.release()
    missing = [i for i in indexes if i not in found]
    if missing:
        raise FileNotFoundError(f"{path or CLIP}: frames {missing} could not be read")
    return [found[i] for i in indexes]
