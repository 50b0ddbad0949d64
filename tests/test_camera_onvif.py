"""OnvifCamera against two real peers: ipycam (a virtual camera from PyPI, in its own venv and process)
and the project's SOAP fixture (tests/onvif_peer.py); choose_streams property-tested."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.camera.onvif.client import (
    CameraAuthError,
    CameraProtocolError,
    CameraUnavailable,
    OnvifCamera,
    StreamProfile,
    choose_streams,
    redact_url,
)
from tests.onvif_peer import IpycamPeer, OnvifFixture, SilentServer, Switches

PASSWORD = "s3cret-pw"


def fixture_camera(fx: OnvifFixture, **kw: object) -> OnvifCamera:
    return OnvifCamera("127.0.0.1", fx.port, fx.sw.username, fx.sw.password, name="fx", connect_timeout_s=5,
                       request_timeout_s=5, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ipycam() -> Iterator[IpycamPeer]:
    with IpycamPeer() as peer:
        yield peer


# ------------------------------------------------------------------------------------------ ipycam

async def test_ipycam_device_profiles_uris_snapshot(ipycam: IpycamPeer) -> None:
    started = time.monotonic()
    async with OnvifCamera("127.0.0.1", ipycam.port, ipycam.username, ipycam.password, name="ipycam") as cam:
        connect_s = time.monotonic() - started
        assert cam.device_info is not None
        assert (cam.device_info.manufacturer, cam.device_info.model) == ("PythonCam", "VirtualCam-1")
        assert cam.device_info.serial == "PY-000001" and cam.device_info.firmware
        assert abs(cam.clock_offset.total_seconds()) < 2
        by_token = {p.token: p for p in cam.profiles}
        assert set(by_token) == {"Profile_Main", "Profile_Sub"}
        main, sub = by_token["Profile_Main"], by_token["Profile_Sub"]
        assert (main.media, main.encoding, main.width, main.height, main.fps) == (1, "H264", 1280, 720, 5.0)
        assert (sub.width, sub.height) == (640, 360)
        # ipycam's quirk: GetStreamUri picks the sub stream by finding "Sub" in the request text.
        assert main.stream_uri == f"rtsp://127.0.0.1:{ipycam.port + 1}/video_main"
        assert sub.stream_uri == f"rtsp://127.0.0.1:{ipycam.port + 1}/video_sub"
        assert main.snapshot_uri == f"http://127.0.0.1:{ipycam.port}/snapshot.jpg"
        detect, record = cam.streams()
        assert (detect.token, record.token) == ("Profile_Sub", "Profile_Main")
        jpeg = await cam.snapshot()  # HTTP Basic (ipycam's web surface): retried after the Digest-less 401
        assert jpeg[:2] == b"\xff\xd8" and len(jpeg) > 1000
    print(f"ipycam connect {connect_s * 1000:.0f} ms")


async def test_ipycam_ptz_presets_quirk_is_a_clear_protocol_error(ipycam: IpycamPeer) -> None:
    # ipycam answers GetPresets with undeclared namespace prefixes (ptz:, tptz:): not XML a client can read.
    async with OnvifCamera("127.0.0.1", ipycam.port, ipycam.username, ipycam.password, name="ipycam") as cam:
        with pytest.raises(CameraProtocolError, match="GetPresets"):
            await cam.ptz_presets()
        with pytest.raises(CameraProtocolError, match="GetRelayOutputs"):  # no DeviceIO at all
            await cam.relay_outputs()


async def test_ipycam_wrong_password_is_an_auth_error(ipycam: IpycamPeer) -> None:
    with pytest.raises(CameraAuthError, match="refused the credentials"):
        async with OnvifCamera("127.0.0.1", ipycam.port, ipycam.username, "not-the-password", name="ipycam"):
            pass


# ------------------------------------------------------------------------------------------ fixture

async def test_fixture_media2_profiles_relays_ptz() -> None:
    async with OnvifFixture() as fx, fixture_camera(fx, relay_names={"barrier": "RelayOutputToken_1"}) as cam:
        assert cam.device_info is not None and cam.device_info.model == "FX-100"
        tokens = {p.token: p for p in cam.profiles}
        assert set(tokens) == {"main", "sub", "third", "main265"}
        assert all(p.media == 2 for p in cam.profiles)
        assert tokens["main265"].encoding == "H265"  # only Media2 can describe it
        detect, record = cam.streams()
        assert (detect.token, record.token) == ("sub", "main265")
        assert detect.stream_uri is not None and detect.stream_uri.endswith("/Streaming/sub?boot=1")
        assert cam.streams(detect_token="third").detect.token == "third"
        # Snapshot from the main stream, over HTTP Digest (the fixture demands it on /snapshot).
        assert (await cam.snapshot()).startswith(b"\xff\xd8")
        assert fx.calls["snapshot"] >= 2  # the Digest challenge, then the answer
        # DeviceIO relays as named outputs (the deviceio service also demands HTTP Digest).
        relays = {r.name: r for r in await cam.relay_outputs()}
        assert relays["barrier"].token == "RelayOutputToken_1" and relays["barrier"].delay_s == 2.0
        assert relays["barrier"].mode == "Monostable" and "RelayOutputToken_2" in relays
        await cam.set_relay("barrier", True)
        await cam.set_relay("RelayOutputToken_2", False)
        assert fx.relay_log == [("RelayOutputToken_1", "active"), ("RelayOutputToken_2", "inactive")]
        # PTZ presets as actions, by name or token.
        assert [(p.token, p.name) for p in await cam.ptz_presets()] == [("1", "Gate"), ("2", "Parking")]
        assert (await cam.goto_preset("Parking")).token == "2"
        assert (await cam.goto_preset("1")).name == "Gate"
        assert fx.preset_log == [("main265", "2"), ("main265", "1")]
        with pytest.raises(CameraProtocolError, match="no PTZ preset 'Roof'"):
            await cam.goto_preset("Roof")
        assert fx.wsse_failures == 0 and fx.digest_failures == 0


async def test_fixture_media1_only_camera() -> None:
    async with OnvifFixture(Switches(media2=False)) as fx, fixture_camera(fx) as cam:
        assert {p.token for p in cam.profiles} == {"main", "sub", "third"}
        assert all(p.media == 1 and p.stream_uri and p.snapshot_uri for p in cam.profiles)
        main = next(p for p in cam.profiles if p.token == "main")
        assert (main.width, main.height, main.fps, main.video_source) == (1920, 1080, 25.0, "VideoSourceConfig_1")
        assert fx.calls["GetStreamUri"] == 3 and fx.calls["GetSnapshotUri"] == 3


async def test_digest_only_camera_and_ws_security_only_client() -> None:
    async with OnvifFixture(Switches(digest_everywhere=True)) as fx:
        async with fixture_camera(fx, auth="digest") as cam:
            assert cam.device_info is not None and len(cam.profiles) == 4
        assert fx.digest_failures == 0
        with pytest.raises(CameraAuthError):
            async with fixture_camera(fx, auth="ws-security"):
                pass


async def test_clock_skew_works_with_offset_and_fails_clearly_without() -> None:
    async with OnvifFixture(Switches(clock_skew_s=30)) as fx:
        async with fixture_camera(fx) as cam:
            assert 28 <= cam.clock_offset.total_seconds() <= 31
            assert len(cam.profiles) == 4
        with pytest.raises(CameraAuthError) as err:
            async with fixture_camera(fx, apply_clock_offset=False):
                pass
        message = str(err.value)
        assert "30 s ahead" in message and "apply_clock_offset" in message


async def test_wrong_credentials_never_leak_the_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with OnvifFixture() as fx:
        cam = OnvifCamera("127.0.0.1", fx.port, "admin", "Wr0ng-pass!", name="fx", connect_timeout_s=5)
        with pytest.raises(CameraAuthError) as err:
            await cam.connect()
        async with fixture_camera(fx) as ok:  # and a good session, logged at DEBUG
            await ok.relay_outputs()
            await ok.snapshot()
    for text in (str(err.value), repr(cam), caplog.text):
        assert "Wr0ng-pass!" not in text and PASSWORD not in text
    assert "refused the credentials" in str(err.value)


async def test_camera_that_never_answers_is_unavailable_within_the_timeout() -> None:
    async with SilentServer() as silent:
        cam = OnvifCamera("127.0.0.1", silent.port, "admin", PASSWORD, name="mute", connect_timeout_s=1.5)
        started = time.monotonic()
        with pytest.raises(CameraUnavailable, match=r"no answer within 1\.5 s"):
            await cam.connect()
        assert time.monotonic() - started < 5  # bounded by the timeout, not the library's 90 s
        assert silent.accepted >= 1 and not cam.connected


async def test_nothing_listening_is_unavailable() -> None:
    async with SilentServer() as s:
        port = s.port
    with pytest.raises(CameraUnavailable, match="cannot connect"):
        await OnvifCamera("127.0.0.1", port, "admin", PASSWORD, connect_timeout_s=3).connect()


async def test_snapshot_size_cap() -> None:
    big = b"\xff\xd8" + b"\0" * 3_000_000
    async with OnvifFixture(Switches(snapshot=big)) as fx, fixture_camera(fx, snapshot_max_bytes=1_000_000) as cam:
        with pytest.raises(CameraProtocolError, match="1000000-byte cap"):
            await cam.snapshot()
        assert len(await cam.snapshot(max_bytes=4_000_000)) == len(big)


def test_redact_url() -> None:
    assert redact_url("rtsp://admin:pw@10.0.0.5:554/s") == "rtsp://admin:***@10.0.0.5:554/s"
    assert redact_url("http://10.0.0.5/x") == "http://10.0.0.5/x"


# ------------------------------------------------------------------------------------------ choose_streams

CODECS = ["H264", "H265", "JPEG", "MPEG4"]


@st.composite
def profile_lists(draw: st.DrawFn) -> list[StreamProfile]:
    n = draw(st.integers(1, 6))
    tokens = draw(st.lists(st.text("abcdefgh_0123", min_size=1, max_size=6), min_size=n, max_size=n, unique=True))
    return [StreamProfile(token=t, name=t, media=draw(st.sampled_from([1, 2])), encoding=draw(st.sampled_from(CODECS)),
                          width=draw(st.integers(0, 4096)), height=draw(st.integers(0, 2160)),
                          fps=draw(st.none() | st.floats(1, 60))) for t in tokens]


@settings(max_examples=300, deadline=None)
@given(profile_lists(), st.integers(160, 1920), st.randoms(use_true_random=False))
def test_choose_streams_properties(profiles: list[StreamProfile], min_width: int, rnd: object) -> None:
    video = [p for p in profiles if p.width > 0 and p.height > 0]
    if not video:
        with pytest.raises(CameraProtocolError):
            choose_streams(profiles, detect_min_width=min_width)
        return
    choice = choose_streams(profiles, detect_min_width=min_width)
    assert choice.detect in video and choice.record in video
    wide = [p for p in video if p.width >= min_width]
    if wide:  # the smallest profile wide enough for the detector
        assert choice.detect.width >= min_width
        assert choice.detect.area == min(p.area for p in wide)
    else:  # nothing wide enough: the widest there is
        assert choice.detect.area == max(p.area for p in video)
    h26x = [p for p in video if p.encoding in ("H264", "H265")] or video
    assert choice.record.area == max(p.area for p in h26x)
    assert choice.record.area >= choice.detect.area or choice.record.encoding in ("H264", "H265")
    shuffled = list(profiles)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert choose_streams(shuffled, detect_min_width=min_width) == choice  # independent of the camera's order
    pinned = choose_streams(profiles, detect_token=video[-1].token, record_token=video[0].token)
    assert (pinned.detect, pinned.record) == (video[-1], video[0])


def test_choose_streams_unknown_token_names_the_choices() -> None:
    p = StreamProfile(token="a", name="a", media=1, encoding="H264", width=640, height=480)
    with pytest.raises(CameraProtocolError, match=r"'b' is not on the camera \(it has: a\)"):
        choose_streams([p], detect_token="b")
