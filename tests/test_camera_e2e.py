"""The camera capability inside the real daemon: the pedestrian clip through the whole pipeline (stream,
motion gating, the shared NanoDet worker, tracker, zones and lines) into durable events with snapshots."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeagent.app import Daemon
from edgeagent.capabilities import Config
from edgeagent.kernel.config.schema import parse_yaml, validate_doc
from edgeagent.kernel.errors import CommandRejected
from tests.helpers import camera_doc, running_daemon, wait_until

CLIP = Path(__file__).resolve().parents[1] / "drivers" / "sim" / "media" / "pedestrians.mp4"


def camera_config(tmp_path: Path, url: str, extra: str = "", *, evidence: str = "") -> str:
    # The path across the middle of the picture: most walkers cross y=0.55 between x=0.05 and 0.95.
    return camera_doc(tmp_path, f"""  - type: camera
    id: cam-path
    rtsp: {{detect_url: "{url}"}}
    detect: {{fps: 5, classes: [person, car]}}
    zones:
      - {{name: path, points: [[0.0, 0.4], [1.0, 0.4], [1.0, 1.0], [0.0, 1.0]], classes: [person]}}
    lines:
      - {{name: middle, a: [0.05, 0.55], b: [0.95, 0.55], a_to_b: south, b_to_a: north, classes: [person]}}
{extra}""", evidence=evidence)


async def test_the_clip_yields_tracked_people_zone_entries_and_line_crossings(tmp_path: Path) -> None:
    text = camera_config(tmp_path, CLIP.as_uri())
    cfg = validate_doc(parse_yaml(text, "c.yaml"), "c.yaml", Config)
    daemon = Daemon(cfg)
    async with running_daemon(daemon) as run:
        assert await wait_until(lambda: len(run.of("camera.line.crossed")) >= 2
                                and len(run.of("camera.zone")) >= 2, 90), \
            {t: len(run.of(t)) for t in ("camera.object", "camera.zone", "camera.line.crossed")}
        objects = run.of("camera.object", "cam-path")
        people = [e for e in objects if e.data["label"] == "person"]
        assert people, "no person tracked"
        ids = [e.data["track_id"] for e in objects]
        assert len(ids) == len(set(ids)), "one event per appearance, not per frame"
        entered = [e for e in run.of("camera.zone") if e.data["kind"] == "enter"]
        assert entered and all(e.data["zone"] == "path" and e.data["label"] == "person" for e in entered)
        crossings = run.of("camera.line.crossed")
        assert {e.data["direction"] for e in crossings} <= {"south", "north"}
        assert all(e.data["source"] == "edge" and e.data["line"] == "middle" for e in crossings)
        # Snapshots: attached by sha256, the file on the box hashes to it and decodes as a JPEG.
        with_snapshot = [e for e in objects if e.attachments]
        assert with_snapshot
        att = with_snapshot[0].attachments[0]
        cap = next(c for c in daemon.capabilities if c.name == "cameras")
        path = cap.service.evidence.get(att.sha256)  # type: ignore[attr-defined]
        assert path is not None
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == att.sha256 and att.media_type == "image/jpeg"
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
        st = await daemon.status()
        cam = st["cameras"]["cameras"]["cam-path"]
        assert cam["online"] is True
        assert cam["stream"]["decoded"] > 0 and cam["pipeline"]["detector_runs"] > 0
        # /metrics: the stream and pipeline figures per camera
        from prometheus_client import generate_latest

        from edgeagent.kernel.runtime.metrics import REGISTRY
        text = generate_latest(REGISTRY).decode()
        assert 'edgeagent_camera_online{camera="cam-path"} 1.0' in text
        assert 'edgeagent_camera_frames_decoded_total{camera="cam-path"}' in text
        assert "edgeagent_camera_detector_latency_p99_ms" in text
        # the local snapshot action the CLI uses (the daemon holds the camera's one session)
        snap = await daemon._local_actions()["camera.snapshot"]({"camera": "cam-path"}, "installer")
        image = cv2.imdecode(np.frombuffer(base64.b64decode(snap["jpeg_b64"]), np.uint8), cv2.IMREAD_COLOR)
        assert image.shape[:2] == (576, 768)
        # zones and lines applied to the running camera (what the console's installer page does after saving)
        shapes = daemon._local_actions()["camera.shapes"]
        done = await shapes({"camera": "cam-path", "zones": [{"name": "shed", "points": [[0.1, 0.6], [0.4, 0.6],
                                                                                          [0.4, 0.9]]}],
                             "lines": []}, "installer")
        assert done == {"camera": "cam-path", "zones": ["shed"], "lines": []}
        runner = cap.service.runners["cam-path"]  # type: ignore[attr-defined]
        assert [z.name for z in runner.pipeline.cam.zones] == ["shed"]
        assert runner.pipeline._rules.occupancy("shed") == {}
        for bad in ({"camera": "cam-path", "zones": [{"name": "x", "points": [[0, 0], [1, 1]]}]},
                    {"camera": "nope"}, {"camera": "cam-path", "zones": [{"name": "x", "points": [[0, 0]]}] * 2},
                    {"camera": "cam-path", "zones": "lobby"}):
            with pytest.raises(CommandRejected) as caught:
                await shapes(bad, "installer")
            assert caught.value.code == "bad_args", caught.value
        assert [z.name for z in runner.pipeline.cam.zones] == ["shed"]  # nothing changed by the refusals
    from prometheus_client import generate_latest

    from edgeagent.kernel.runtime.metrics import REGISTRY
    assert "edgeagent_camera_online{" not in generate_latest(REGISTRY).decode(), "a stopped daemon's cameras leave"


async def test_rtsp_camera_with_credentials_clips_and_offline_online_once(tmp_path: Path) -> None:
    """Over a real RTSP server asking for a password (Digest): events flow, a zone entry gets a clip cut
    from the encoded-packet buffer without re-encoding, and a killed server gives one device.offline and,
    once it is back, one device.online."""
    import av

    from tests.rtsp_peer import RtspServer, busy_clip

    secret = tmp_path / "cam.pass"
    secret.write_text("s3cret-Pw\n")
    with RtspServer(busy_clip(), credentials={0: ("viewer", "s3cret-Pw")}) as server:
        extra = f"""    username: viewer
    password: {{file: {secret}}}
    clips: true
"""
        text = camera_config(tmp_path, server.url, extra, evidence="clip_pre_s: 2, clip_post_s: 1")
        cfg = validate_doc(parse_yaml(text, "c.yaml"), "c.yaml", Config)
        daemon = Daemon(cfg)
        async with running_daemon(daemon) as run:
            assert await wait_until(lambda: run.of("camera.clip", "cam-path"), 90), \
                {t: len(run.of(t)) for t in ("camera.object", "camera.zone", "device.offline")}
            clip = run.of("camera.clip", "cam-path")[0]
            ids = {e.id for e in run.seen}
            assert clip.data["for_event"] in ids
            assert clip.data["codec"] == "h264" and clip.data["frames"] > 5
            cap = next(c for c in daemon.capabilities if c.name == "cameras")
            path = cap.service.evidence.get(clip.attachments[0].sha256)  # type: ignore[attr-defined]
            assert path is not None and clip.attachments[0].kind == "clip"
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                assert stream.codec_context.name == "h264"
                frames = sum(1 for _ in container.decode(stream))
            assert frames == clip.data["frames"]
            assert not run.of("device.offline", "cam-path")
            server.kill()
            assert await wait_until(lambda: run.of("device.offline", "cam-path"), 20)
            server.restart()
            assert await wait_until(lambda: run.of("device.online", "cam-path"), 60)
            assert len(run.of("device.offline", "cam-path")) == 1
            assert len(run.of("device.online", "cam-path")) == 1
            st = await daemon.status()
            stream_st = st["cameras"]["cameras"]["cam-path"]["stream"]
            assert stream_st["reconnects"] >= 1
            assert "s3cret" not in str(st)


async def test_onvif_camera_streams_reports_its_inputs_and_drives_its_relay(tmp_path: Path) -> None:
    """An ONVIF camera (the project's SOAP fixture) whose stream URI is a real RTSP server: the daemon finds
    the stream through ONVIF, turns the camera's digital input (a gate call button) into camera.input with
    its configured name, drives the camera's relay as a named output, and never unsubscribes on stop."""
    from tests.onvif_peer import OnvifFixture, Switches
    from tests.rtsp_peer import RtspServer, busy_clip

    secret = tmp_path / "cam.pass"
    secret.write_text("s3cret-pw")
    with RtspServer(busy_clip(), mounts=2) as server:
        async with OnvifFixture(Switches(stream_uri=server.url_for(0))) as fixture:
            text = camera_doc(tmp_path, f"""  - type: camera
    id: cam-gate
    username: admin
    password: {{file: {secret}}}
    onvif:
      host: 127.0.0.1
      port: {fixture.port}
      inputs: {{DigitalInputToken_1: call_button}}
      relays: {{barrier: RelayOutputToken_1}}
""")
            cfg = validate_doc(parse_yaml(text, "c.yaml"), "c.yaml", Config)
            daemon = Daemon(cfg)
            async with running_daemon(daemon) as run:
                cap = next(c for c in daemon.capabilities if c.name == "cameras")
                runner = cap.service.runners["cam-gate"]  # type: ignore[attr-defined]
                assert await wait_until(lambda: runner.online is True and runner.onvif is not None
                                        and fixture.calls["PullMessages"] >= 1, 30)
                fixture.push_digital_input(True)
                assert await wait_until(lambda: run.of("camera.input", "cam-gate"), 15)
                ev = run.of("camera.input", "cam-gate")[0]
                assert ev.data["input"] == "call_button" and ev.data["active"] is True
                await daemon.outputs.set("cam-gate.barrier", True)
                assert fixture.relays["RelayOutputToken_1"] == "active"
                await daemon.outputs.set("cam-gate.barrier", False)
                assert fixture.relays["RelayOutputToken_1"] == "inactive"
                # A PTZ preset as a (signed) cloud command's handler.
                spec = daemon.router.get("camera.ptz_preset")
                assert spec is not None
                assert await spec.handler({"camera": "cam-gate", "preset": "Parking"}) == {
                    "camera": "cam-gate", "preset": "Parking"}
                assert fixture.preset_log and fixture.preset_log[-1][1] in ("2", "Parking")
                # The camera reboots and comes back with another stream address: followed.
                first_source = runner.source
                fixture.sw.stream_uri = server.url_for(1)
                fixture.reboot()
                assert await wait_until(lambda: runner.source is not None and runner.source is not first_source
                                        and runner.source.url.endswith("/cam1") and runner.online is True, 60)
            assert fixture.calls["Unsubscribe"] == 0


def pattern_clip(path: Path, width: int = 1280, height: int = 720, seconds: int = 6) -> Path:
    """A short H.264 MPEG-TS test pattern at the main stream's size (ffmpeg's testsrc, keyframe every 10)."""
    import subprocess

    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc=size={width}x{height}:rate=10:duration={seconds}", "-c:v", "libx264",
                    "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "10", "-f", "mpegts", str(path)],
                   check=True, timeout=120)
    return path


async def test_onvif_camera_keeps_main_stream_evidence(tmp_path: Path) -> None:
    """Detection on the sub-stream, evidence from the main one: the snapshot is the camera's own main-stream
    JPEG (boxes scaled onto it) and the clip is cut from the main stream's packets, at its resolution."""
    import av

    from tests.onvif_peer import OnvifFixture, Switches
    from tests.rtsp_peer import RtspServer, busy_clip

    secret = tmp_path / "cam.pass"
    secret.write_text("s3cret-pw")
    main_jpeg = cv2.imencode(".jpg", np.full((1080, 1920, 3), 90, np.uint8))[1].tobytes()
    with RtspServer([busy_clip(), pattern_clip(tmp_path / "main.ts")], mounts=2) as server:
        switches = Switches(stream_uris={"sub": server.url_for(0), "main265": server.url_for(1)},
                            snapshot=main_jpeg)
        async with OnvifFixture(switches) as fixture:
            text = camera_doc(tmp_path, f"""  - type: camera
    id: cam-path
    username: admin
    password: {{file: {secret}}}
    onvif: {{host: 127.0.0.1, port: {fixture.port}}}
    detect: {{classes: [person]}}
    clips: true
    zones:
      - {{name: path, points: [[0.0, 0.4], [1.0, 0.4], [1.0, 1.0], [0.0, 1.0]]}}
""", evidence="clip_pre_s: 2, clip_post_s: 1")
            cfg = validate_doc(parse_yaml(text, "c.yaml"), "c.yaml", Config)
            daemon = Daemon(cfg)
            async with running_daemon(daemon) as run:
                assert await wait_until(lambda: run.of("camera.clip", "cam-path"), 90)
                cap = next(c for c in daemon.capabilities if c.name == "cameras")
                store = cap.service.evidence  # type: ignore[attr-defined]
                clip = run.of("camera.clip", "cam-path")[0]
                with av.open(str(store.get(clip.attachments[0].sha256))) as container:
                    stream = container.streams.video[0]
                    assert (stream.codec_context.width, stream.codec_context.height) == (1280, 720)
                snaps = [e for e in run.of("camera.object", "cam-path") if e.attachments]
                assert snaps
                data = store.get(snaps[0].attachments[0].sha256).read_bytes()
                image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
                assert image.shape[:2] == (1080, 1920)
                assert fixture.calls["snapshot"] >= 1  # fetched over HTTP Digest from the camera


async def test_the_upload_command_in_the_daemon_sends_faces_blurred(tmp_path: Path) -> None:
    """Privacy is on by default: the platform's camera.upload_evidence, run by the daemon, sends a kept
    snapshot of the astronaut with the face blurred (checked by running the face detector on what arrived),
    while the copy kept on the box stays as it was."""
    from tests.media import image
    from tests.peers import make_pki
    from tests.test_camera_privacy import PutSink

    pki = make_pki(tmp_path / "pki")
    text = camera_config(tmp_path, CLIP.as_uri(),
                         evidence=f"upload_ca_file: {pki.ca}, allow_private_upload_hosts: true")
    cfg = validate_doc(parse_yaml(text, "c.yaml"), "c.yaml", Config)
    daemon = Daemon(cfg)
    async with running_daemon(daemon) as run:
        cap = next(c for c in daemon.capabilities if c.name == "cameras")
        service = cap.service  # type: ignore[attr-defined]
        att = await service.evidence.save_snapshot("cam-path", image("astronaut.png"))
        spec = daemon.router.get("camera.upload_evidence")
        assert spec is not None
        async with PutSink(pki) as peer:
            answer = await spec.handler({"sha256": att.sha256, "url": peer.url()})
        assert answer["redacted"] is True and len(peer.bodies) == 1
        sent = cv2.imdecode(np.frombuffer(peer.bodies[0], np.uint8), cv2.IMREAD_COLOR)
        [faces] = await service.engine.infer("centerface", [sent])
        assert faces == [], faces
        [kept] = await service.engine.infer("centerface", [cv2.imread(str(service.evidence.get(att.sha256)))])
        assert len(kept) == 1
        assert await wait_until(lambda: run.of("camera.evidence.uploaded"), 10)
        assert (await daemon.status())["cameras"]["privacy"]["redacted"] >= 1
