"""What goes wrong in the field, with the camera capability running in the real daemon: a camera with the
wrong password, one that accepts a connection and never answers, a stream of corrupt data, and a model file
that is not what its manifest says. Each gets a clear error; nothing crashes and the good camera keeps
producing events meanwhile."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from edgeagent.app import Daemon
from edgeagent.capabilities import Config
from edgeagent.kernel.config.schema import parse_yaml, validate_doc
from edgeagent.kernel.errors import ConfigError
from tests.helpers import camera_doc, running_daemon, wait_until
from tests.media import MODELS
from tests.onvif_peer import SilentServer
from tests.rtsp_peer import RtspServer, busy_clip

CLIP = Path(__file__).resolve().parents[1] / "drivers" / "sim" / "media" / "pedestrians.mp4"


def corrupt_copy(src: Path, dst: Path, *, seed: int = 7) -> Path:
    """The clip with 2% of its 188-byte transport packets overwritten by noise (a flaky link)."""
    data = bytearray(src.read_bytes())
    rng = random.Random(seed)
    packets = len(data) // 188
    for i in rng.sample(range(10, packets), packets // 50):
        data[i * 188 + 4:(i + 1) * 188] = rng.randbytes(184)
    dst.write_bytes(bytes(data))
    return dst


async def test_bad_cameras_get_clear_errors_and_the_good_one_carries_on(tmp_path: Path) -> None:
    secret = tmp_path / "wrong.pass"
    secret.write_text("not-the-password")
    corrupt = corrupt_copy(busy_clip(), tmp_path / "corrupt.ts")
    with RtspServer(busy_clip(), credentials={0: ("viewer", "right-password")}) as server:
        async with SilentServer() as silent:
            cams = f"""  - {{type: camera, id: cam-good, rtsp: {{detect_url: "{CLIP.as_uri()}"}}}}
  - type: camera
    id: cam-wrongpw
    username: viewer
    password: {{file: {secret}}}
    rtsp: {{detect_url: "{server.url}"}}
  - {{type: camera, id: cam-silent, rtsp: {{detect_url: "rtsp://127.0.0.1:{silent.port}/live", open_timeout_s: 1.5}}}}
  - {{type: camera, id: cam-corrupt, rtsp: {{detect_url: "{corrupt.as_uri()}"}}}}
"""
            cfg = validate_doc(parse_yaml(camera_doc(tmp_path, cams), "c.yaml"), "c.yaml", Config)
            daemon = Daemon(cfg)
            async with running_daemon(daemon) as run:
                cap = next(c for c in daemon.capabilities if c.name == "cameras")
                runners = cap.service.runners  # type: ignore[attr-defined]
                assert await wait_until(lambda: len(run.of("camera.object", "cam-good")) >= 5, 60)
                assert await wait_until(lambda: runners["cam-wrongpw"].online is False
                                        and runners["cam-silent"].online is False, 30)
                st = (await daemon.status())["cameras"]["cameras"]
                wrong = str(st["cam-wrongpw"]["error"]).lower()
                assert "401" in wrong or "auth" in wrong or "credential" in wrong, wrong
                silent_err = str(st["cam-silent"]["error"]).lower()
                assert "timed out" in silent_err or "timeout" in silent_err or "no answer" in silent_err, silent_err
                assert "not-the-password" not in str(st)
                # The corrupt stream decodes around its damage (errors counted) and still yields people.
                assert await wait_until(lambda: run.of("camera.object", "cam-corrupt"), 60)
                assert st["cam-corrupt"]["online"] is True
                # One offline event each for the two dead cameras, not one per retry.
                assert len(run.of("device.offline", "cam-wrongpw")) == 1
                assert len(run.of("device.offline", "cam-silent")) == 1
                # Nothing crashed: no camera task was given up.
                tasks = {t["name"]: t for t in (await daemon.status())["tasks"]}
                assert tasks["device:cam-good"]["state"] != "failed"
                assert tasks["device:cam-corrupt"]["state"] != "failed"
                before = len(run.of("camera.object", "cam-good"))
                assert await wait_until(lambda: len(run.of("camera.object", "cam-good")) > before, 60)


async def test_a_model_file_that_is_not_what_its_manifest_says_refuses_to_start(tmp_path: Path) -> None:
    site = tmp_path / "site-models"
    site.mkdir()
    (site / "nanodet.yaml").write_text((MODELS / "nanodet.yaml").read_text())
    shutil.copy(MODELS / "clp_det.onnx", site / "nanodet.onnx")
    cams = f"""  - {{type: camera, id: cam-good, rtsp: {{detect_url: "{CLIP.as_uri()}"}}}}
"""
    text = camera_doc(tmp_path, cams, cameras=f"  model_dirs: [{site}]\n")
    cfg = validate_doc(parse_yaml(text, "c.yaml"), "c.yaml", Config)
    daemon = Daemon(cfg)
    with pytest.raises(ConfigError, match=r"nanodet.*sha256"):
        async with running_daemon(daemon, exit_code=None):
            pass
