"""One frame from a camera, for the installer's CLI (``camera add``, ``camera snapshot``, ``camera detect``)
when the daemon is not running. With the daemon running the CLI asks it instead: cameras refuse extra RTSP
sessions, so the box keeps one per camera."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

import av
import cv2
import numpy as np

from edgeagent.drivers.camera.config import CameraDevice
from edgeagent.kernel.errors import DeviceUnavailable


def read_image(path: Path) -> np.ndarray:
    """A still image (JPEG, PNG, ...) or the first frame of a video file, as BGR."""
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is not None:
        return image
    return _first_frame(str(path), {}, 10.0, what=str(path))


def _first_frame(url: str, options: dict[str, str], timeout_s: float, *, what: str) -> np.ndarray:
    try:
        container = av.open(url, options=options, timeout=(timeout_s, timeout_s))
    except av.FFmpegError as exc:
        raise DeviceUnavailable(f"{what}: cannot open: {exc.strerror or type(exc).__name__}") from None
    try:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            return np.ascontiguousarray(frame.to_ndarray(format="bgr24"))
    except (av.FFmpegError, IndexError) as exc:
        raise DeviceUnavailable(f"{what}: no video frame: {exc}") from None
    finally:
        container.close()
    raise DeviceUnavailable(f"{what}: the stream ended before a frame")


async def grab_frame(url: str, *, timeout_s: float = 10.0, what: str = "camera") -> np.ndarray:
    """The first decodable frame of an RTSP URL (TCP) or a file, read in a worker thread."""
    options = {"rtsp_transport": "tcp"} if urlsplit(url).scheme.startswith("rtsp") else {}
    return await asyncio.to_thread(_first_frame, url, options, timeout_s, what=what)


async def camera_frame(cam: CameraDevice, *, timeout_s: float = 10.0) -> np.ndarray:
    """A frame of a configured camera: its detection stream (through ONVIF when no URL is configured)."""
    from edgeagent.drivers.camera.service import detect_url, with_credentials  # noqa: PLC0415

    url = await detect_url(cam)
    password = cam.password.resolve().get_secret_value() if cam.password is not None else None
    path = urlsplit(url).path if url.startswith("file:") else None
    if path is not None:
        return await asyncio.to_thread(read_image, Path(path))
    return await grab_frame(with_credentials(url, cam.username, password), timeout_s=timeout_s, what=cam.id)
