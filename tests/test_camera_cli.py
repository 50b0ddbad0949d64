"""The installer's camera commands against real peers: ``models list|verify``, ``camera detect`` on real
images, ``camera add`` against an ONVIF camera whose stream is a real RTSP server (tested before anything is
written, comments kept), ``camera snapshot`` straight from the camera, and ``doctor``'s live camera lines."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import cv2

from edgeagent.app import Daemon
from edgeagent.capabilities import load_config
from tests.helpers import cli, config_head, running_daemon, starter_config, wait_until
from tests.media import MODELS, media
from tests.onvif_peer import OnvifFixture, Switches
from tests.rtsp_peer import RtspServer, busy_clip


def test_models_list_and_verify_and_a_tampered_site_model(tmp_path: Path) -> None:
    r = cli("models", "list", "--json", "--config", tmp_path / "none.yaml")
    assert r.exit_code == 0, r.output
    names = {row["name"] for row in json.loads(r.output)}
    assert {"nanodet", "centerface", "clp_det", "clp_v2_c_rec", "movenet-multipose", "nfd-fall"} <= names
    r = cli("models", "verify", "--config", tmp_path / "none.yaml")
    assert r.exit_code == 0, r.output
    # A site folder overriding nanodet with a file that is not what its manifest says.
    site = tmp_path / "site-models"
    site.mkdir()
    (site / "nanodet.yaml").write_text((MODELS / "nanodet.yaml").read_text())
    shutil.copy(MODELS / "clp_det.onnx", site / "nanodet.onnx")
    r = cli("models", "verify", "--dir", site, "--config", tmp_path / "none.yaml")
    assert r.exit_code == 1
    assert "nanodet" in r.output and "sha256" in r.output


def test_detect_on_a_file_prints_every_class_or_the_ones_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "dog-boxes.jpg"
    r = cli("camera", "detect", media("dog.jpg"), "--json", "-o", out, "--config", tmp_path / "none.yaml")
    assert r.exit_code == 0, r.output
    found = json.loads(r.stdout)
    labels = {d["label"] for d in found}
    assert {"bicycle", "truck"} <= labels, found
    h, w = cv2.imread(str(media("dog.jpg"))).shape[:2]
    for d in found:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and 0 < d["score"] <= 1
    assert cv2.imread(str(out)) is not None
    r = cli("camera", "detect", media("dog.jpg"), "--json", "--classes", "bicycle", "--config", tmp_path / "n.yaml")
    assert {d["label"] for d in json.loads(r.stdout)} == {"bicycle"}
    r = cli("camera", "detect", media("motorcycle_left.png"), "--json", "--config", tmp_path / "n.yaml")
    assert "motorcycle" in {d["label"] for d in json.loads(r.stdout)}


def test_add_tests_the_camera_before_writing_and_snapshot_reads_it(tmp_path: Path) -> None:
    path = starter_config(tmp_path)
    text = path.read_text()
    path.write_text(text.rstrip("\n") + "\n# cameras go below (installer's note)\n")
    good = tmp_path / "cam.pass"
    good.write_text("s3cret-pw\n")
    bad = tmp_path / "wrong.pass"
    bad.write_text("nope\n")

    async def scenario() -> None:
        with RtspServer(busy_clip()) as server:
            async with OnvifFixture(Switches(stream_uri=server.url)) as fixture:
                before = path.read_text()
                r = await asyncio.to_thread(cli, "camera", "add", "127.0.0.1", "--port", str(fixture.port),
                                            "--id", "cam-gate", "--password-file", bad, "--config", path)
                assert r.exit_code == 1 and "nothing was written" in r.output
                assert path.read_text() == before
                snap = tmp_path / "first.jpg"
                r = await asyncio.to_thread(cli, "camera", "add", "127.0.0.1", "--port", str(fixture.port),
                                            "--id", "cam-gate", "--name", "Car gate", "--password-file", good,
                                            "--snapshot", snap, "--config", path)
                assert r.exit_code == 0, r.output
                assert "sub" in r.output and "detect" in r.output
                assert cv2.imread(str(snap)).shape[:2] == (576, 768)
                after = path.read_text()
                assert "# cameras go below (installer's note)" in after and "s3cret" not in after
                cfg = load_config(path)
                cam = next(d for d in cfg.devices if d.id == "cam-gate")
                assert cam.onvif.profile == "sub" and cam.onvif.record_profile == "main265"  # type: ignore[attr-defined]
                out = tmp_path / "now.jpg"
                r = await asyncio.to_thread(cli, "camera", "snapshot", "cam-gate", "-o", out, "--config", path)
                assert r.exit_code == 0, r.output
                assert cv2.imread(str(out)).shape[:2] == (576, 768)

    asyncio.run(scenario())


async def test_doctor_shows_each_camera_stream_live(tmp_path: Path) -> None:
    clip = Path(__file__).resolve().parents[1] / "drivers" / "sim" / "media" / "pedestrians.mp4"
    path = tmp_path / "c.yaml"
    path.write_text(config_head(tmp_path / "state", site_id="s", gateway_id="g", health="{port: 0}") + f"""\
devices:
  - {{type: camera, id: cam-path, rtsp: {{detect_url: "{clip.as_uri()}"}}}}
  - {{type: camera, id: cam-dead, rtsp: {{detect_url: "rtsp://127.0.0.1:9/nothing", open_timeout_s: 1}}}}
""")
    daemon = Daemon(load_config(path))
    async with running_daemon(daemon):
        cap = next(c for c in daemon.capabilities if c.name == "cameras")
        assert await wait_until(lambda: cap.service.runners["cam-path"].online is True, 30)  # type: ignore[attr-defined]
        r = await asyncio.to_thread(cli, "doctor", "--json", "--config", path)
        checks = {c["check"]: c for c in json.loads(r.stdout)["checks"]}
        assert checks["camera cam-path"]["status"] == "ok" and "fps in" in checks["camera cam-path"]["detail"]
        assert checks["camera cam-dead"]["status"] == "fail"
        assert checks["model nanodet"]["status"] == "ok"
