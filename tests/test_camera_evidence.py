"""Evidence on the box and its upload on request.

The store: JPEGs with the boxes drawn, content-addressed, written atomically off the loop, under a size cap
and retention, a full disk refused clearly (a real 24 MB tmpfs). The upload: a real HTTPS server on loopback
(aiohttp, a CA and server certificate made here with ``cryptography``) receiving the PUT, and the signed
``camera.upload_evidence`` command through the real command service.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import threading
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeagent.drivers.camera.evidence import (
    TMP_PREFIX,
    EvidenceBusy,
    EvidenceDiskFull,
    EvidenceError,
    EvidenceStore,
    EvidenceTooLarge,
    draw_boxes,
    in_thread,
)
from edgeagent.drivers.camera.upload import (
    PrivateAddressError,
    Uploader,
    UploadError,
    UploadRefused,
    _PublicOnlyResolver,
    check_upload_headers,
    check_upload_url,
    upload_command,
)
from edgeagent.kernel.pipeline.commands import CommandRouter, CommandService, sign_command
from edgeagent.kernel.pipeline.events import Event, EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.models.types import Detection
from tests.peers import TLSFiles, make_pki

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
SIG = "sig" + secrets.token_hex(16)
QUERY = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
         f"&X-Amz-Expires=600&X-Amz-SignedHeaders=host&X-Amz-Signature={SIG}")
GREY = 128


def person_image() -> np.ndarray:
    image = cv2.imread(str(MEDIA / "person.jpg"), cv2.IMREAD_COLOR)
    assert image is not None, f"test media missing: {MEDIA / 'person.jpg'}"
    return np.asarray(image, dtype=np.uint8)


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EvidenceStore]:
    async with EvidenceStore(tmp_path / "evidence", max_bytes=50_000_000, retention_s=86_400) as s:
        yield s


# --- drawing and saving ---------------------------------------------------------------------------------------


def test_draw_boxes_draws_labels_and_never_touches_the_input() -> None:
    image = np.full((576, 768, 3), GREY, np.uint8)
    before = image.copy()
    det = Detection("person", 0.87, (200.0, 150.0, 400.0, 450.0), extra={"track_id": 7.0})
    out = draw_boxes(image, [det], zones={"gate": [(0.05, 0.05), (0.2, 0.05), (0.2, 0.2)]},
                     lines={"door": ((0.1, 0.9), (0.9, 0.9))})
    assert np.array_equal(image, before), "the input image was modified"
    assert out.shape == image.shape and out.dtype == np.uint8
    # The border is drawn on all four sides, the inside is left alone.
    for y, x in ((150, 300), (450, 300), (300, 200), (300, 400)):
        assert np.abs(out[y, x].astype(int) - GREY).max() > 60, (y, x)
    assert np.array_equal(out[300, 300], image[300, 300])
    # The label plate sits above the box, with text in it (two colours: plate and ink).
    plate = out[120:150, 200:330].reshape(-1, 3)
    assert len({tuple(p) for p in plate}) > 2
    # Grey input is accepted; garbage is a clear error, not a crash.
    assert draw_boxes(np.full((100, 100), 10, np.uint8), [det]).shape == (100, 100, 3)
    with pytest.raises(EvidenceError):
        draw_boxes(np.zeros((10, 10, 3), np.float32), [det])
    nan = Detection("person", float("nan"), (float("nan"), 0.0, 10.0, 10.0))
    assert np.array_equal(draw_boxes(image, [nan]), image)


async def test_snapshot_is_a_jpeg_with_boxes_named_by_its_sha256(store: EvidenceStore) -> None:
    image = np.full((576, 768, 3), GREY, np.uint8)
    det = Detection("car", 0.66, (100.0, 100.0, 300.0, 250.0))
    att = await store.save_snapshot("cam1", image, [det], event_id="01EVENT")
    path = store.get(att.sha256)
    assert path is not None and path.name == f"{att.sha256}.jpg" and path.parent.name == "snapshots"
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == att.sha256
    assert (att.kind, att.media_type, att.size_bytes) == ("snapshot", "image/jpeg", len(data))
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert back.shape == image.shape
    assert np.abs(back[250, 200].astype(int) - GREY).max() > 60, "the bottom border is not in the JPEG"
    assert np.abs(back[175, 300].astype(int) - GREY).max() > 60, "the right border is not in the JPEG"
    assert np.abs(back[175, 200].astype(int) - GREY).max() < 8, "the inside of the box changed"
    # The same bytes again: one file, both events referenced.
    again = await store.save_snapshot("cam1", image, [det], event_id="01OTHER")
    assert again == att
    entry = store.entry(att.sha256)
    assert entry is not None and entry.event_ids == ["01EVENT", "01OTHER"] and entry.camera == "cam1"
    assert store.stats()["saved"] == 1 and store.stats()["deduplicated"] == 1
    assert await store.add_reference(att.sha256, "01THIRD")
    assert not await store.add_reference("0" * 64, "01THIRD")


async def test_saving_runs_off_the_loop_while_a_ticker_keeps_running(store: EvidenceStore) -> None:
    """The redactor runs where the encoding runs; it waits for the ticker to advance. Were the save done on the
    loop, the ticker could not tick and the wait would run out."""
    ticks = 0
    advanced = threading.Event()
    seen: list[tuple[bool, bool]] = []

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            if ticks >= 20:
                advanced.set()
            await asyncio.sleep(0.001)

    def redact(img: np.ndarray) -> np.ndarray:
        seen.append((threading.current_thread() is not threading.main_thread(), advanced.wait(10)))
        return img

    task = asyncio.create_task(ticker())
    try:
        att = await store.save_snapshot("cam1", noise(1080, 1920, 1), [], redact=redact)
    finally:
        task.cancel()
    assert seen == [(True, True)]
    assert store.get(att.sha256) is not None


async def test_redactor_at_save_time_is_applied_and_its_failure_is_an_evidence_error(store: EvidenceStore) -> None:
    image = np.full((64, 64, 3), 200, np.uint8)
    att = await store.save_snapshot("cam1", image, redact=np.zeros_like)
    path = store.get(att.sha256)
    assert path is not None
    back = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert int(back.max()) < 10
    assert image.min() == 200

    def broken(img: np.ndarray) -> np.ndarray:
        raise RuntimeError("face model gone")

    with pytest.raises(EvidenceError, match="redactor failed"):
        await store.save_snapshot("cam1", image, redact=broken)
    assert store.stats()["failed"] == 1


async def test_size_cap_evicts_the_oldest_first(tmp_path: Path) -> None:
    images = [noise(240, 320, seed) for seed in range(6)]
    async with EvidenceStore(tmp_path / "probe", max_bytes=10**9, retention_s=60) as probe:
        one = (await probe.save_snapshot("c", images[0])).size_bytes
    cap = int(one * 3.5)
    async with EvidenceStore(tmp_path / "ev", max_bytes=cap, retention_s=86_400) as s:
        atts = [await s.save_snapshot("c", img) for img in images]
        kept = [a for a in atts if s.get(a.sha256) is not None]
        assert kept == atts[-3:], "not the newest three kept"
        stats = s.stats()
        assert stats["bytes"] <= cap and stats["evicted"] == 3 and stats["files"] == 3
        assert sum(1 for _ in (tmp_path / "ev" / "snapshots").iterdir()) == 3
        with pytest.raises(EvidenceTooLarge):
            await s.save_snapshot("c", noise(1080, 1920, 99))
    # Reopened with a smaller cap: the cap applies at once, oldest first.
    async with EvidenceStore(tmp_path / "ev", max_bytes=int(one * 1.5), retention_s=86_400) as s:
        assert [a for a in atts if s.get(a.sha256) is not None] == atts[-1:]


async def test_retention_expires_old_files(tmp_path: Path) -> None:
    now = [1_000_000.0]
    async with EvidenceStore(tmp_path / "ev", max_bytes=10**9, retention_s=3600, clock=lambda: now[0]) as s:
        old = await s.save_snapshot("c", noise(50, 50, 1))
        now[0] += 3000
        new = await s.save_snapshot("c", noise(50, 50, 2))
        assert await s.prune(now[0]) == 0
        assert await s.prune(now[0] + 601) == 1
        assert s.get(old.sha256) is None and s.get(new.sha256) is not None
        assert s.stats()["expired"] == 1
        assert not (tmp_path / "ev" / "snapshots" / f"{old.sha256}.jpg").exists()
    # The index remembers creation times across a restart.
    async with EvidenceStore(tmp_path / "ev", max_bytes=10**9, retention_s=3600) as s:
        assert await s.prune(now[0] + 3601) == 1
        assert s.stats()["files"] == 0


async def test_an_interrupted_write_leaves_nothing_visible_and_is_cleaned_at_start(tmp_path: Path) -> None:
    root = tmp_path / "ev"
    async with EvidenceStore(root, max_bytes=10**9, retention_s=3600) as s:
        att = await s.save_snapshot("cam7", noise(60, 80, 3), event_id="01A")
    partial = root / "snapshots" / f"{TMP_PREFIX}deadbeef.jpg"
    partial.write_bytes(b"\xff\xd8 half a jpeg")
    (root / "clips" / f"{TMP_PREFIX}cafe.mp4").write_bytes(b"half a clip")
    async with EvidenceStore(root, max_bytes=10**9, retention_s=3600) as s:
        assert not partial.exists()
        assert [p.name for p in (root / "clips").iterdir()] == []
        assert s.stats()["tmp_cleaned"] == 2 and s.stats()["files"] == 1
        entry = s.entry(att.sha256)
        assert entry is not None and entry.camera == "cam7" and entry.event_ids == ["01A"]
    # The index is lost: the files are the truth and are adopted back.
    for p in root.glob("index.sqlite3*"):
        p.unlink()
    async with EvidenceStore(root, max_bytes=10**9, retention_s=3600) as s:
        assert s.get(att.sha256) is not None and s.stats()["bytes"] == att.size_bytes
    # A damaged index is moved aside and rebuilt.
    (root / "index.sqlite3").write_bytes(b"this is not a database" * 100)
    async with EvidenceStore(root, max_bytes=10**9, retention_s=3600) as s:
        assert s.get(att.sha256) is not None
    assert list(root.glob("index.sqlite3.damaged-*"))


async def test_clip_is_moved_in_by_its_hash(tmp_path: Path, store: EvidenceStore) -> None:
    src = tmp_path / "clip-123.mp4"
    data = os.urandom(300_000)
    src.write_bytes(data)
    att = await store.add_clip(src, "cam2", event_id="01CLIP")
    assert not src.exists()
    path = store.get(att.sha256)
    assert path is not None and path.parent.name == "clips" and path.read_bytes() == data
    assert (att.kind, att.media_type, att.sha256) == ("clip", "video/mp4", hashlib.sha256(data).hexdigest())
    bad = tmp_path / "clip.avi"
    bad.write_bytes(b"x")
    with pytest.raises(EvidenceError, match="a clip must be one of"):
        await store.add_clip(bad, "cam2")
    with pytest.raises(EvidenceError, match="cannot read the clip"):
        await store.add_clip(tmp_path / "gone.mp4", "cam2")


def _fill(mnt: Path, leave_bytes: int) -> Path:
    """Fill the disk (unbuffered: closing must not flush into ENOSPC), then free ``leave_bytes``."""
    filler = mnt / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    vfs = os.statvfs(mnt)
    free = vfs.f_bavail * vfs.f_frsize
    os.truncate(filler, max(0, filler.stat().st_size - (leave_bytes - free)))
    return filler


async def test_full_disk_is_a_clear_error_then_room_is_made_from_old_evidence(small_disk: Path) -> None:
    root = small_disk / "ev"
    async with EvidenceStore(root, max_bytes=10**9, retention_s=3600) as s:
        filler = _fill(small_disk, 64 * 1024)
        with pytest.raises(EvidenceDiskFull, match="disk full"):
            await s.save_snapshot("cam1", noise(1080, 1920, 5))
        stats = s.stats()
        assert stats["disk_full"] == 1 and stats["failed"] == 1 and stats["files"] == 0
        assert not list((root / "snapshots").iterdir()), "a partial file was left behind"
        filler.unlink()
        # Older evidence, then a full disk again: the oldest is evicted to make room for the new one.
        old = [await s.save_snapshot("cam1", noise(1080, 1920, seed)) for seed in (10, 11, 12)]
        _fill(small_disk, 64 * 1024)
        new = await s.save_snapshot("cam1", noise(1080, 1920, 13))
        assert s.get(new.sha256) is not None and s.get(old[0].sha256) is None
        assert s.get(old[-1].sha256) is not None
        assert s.stats()["evicted"] >= 1 and s.stats()["disk_full"] == 1
        assert not [p for p in (root / "snapshots").iterdir() if p.name.startswith(TMP_PREFIX)]


async def test_encoding_queue_is_bounded(tmp_path: Path) -> None:
    release = threading.Event()

    def slow(img: np.ndarray) -> np.ndarray:
        release.wait(10)
        return img

    async with EvidenceStore(tmp_path / "ev", max_bytes=10**9, retention_s=60, max_pending=1) as s:
        first = asyncio.create_task(s.save_snapshot("c", noise(20, 20, 1), redact=slow))
        second = asyncio.create_task(s.save_snapshot("c", noise(20, 20, 2)))
        await asyncio.sleep(0)
        with pytest.raises(EvidenceBusy):
            await s.save_snapshot("c", noise(20, 20, 3))
        release.set()
        await asyncio.gather(first, second)
        assert s.stats()["busy"] == 1 and s.stats()["saved"] == 2


# --- the HTTPS peer -----------------------------------------------------------------------------------------


@dataclass
class Put:
    raw_path: str
    headers: dict[str, str]
    size: int
    sha256: str
    body: bytes


@dataclass
class HttpsPeer:
    """A real HTTPS server on 127.0.0.1. ``script`` says what each PUT gets: a status, or "hang" (the body
    is read, no answer comes until the test ends)."""

    tls: TLSFiles
    script: list[int | str] = field(default_factory=list)
    error_body: bytes = b""
    keep_bytes: int = 2_000_000
    puts: list[Put] = field(default_factory=list)
    port: int = 0
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        kept: list[bytes] = []
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
            if size <= self.keep_bytes:
                kept.append(chunk)
        self.puts.append(Put(request.raw_path, dict(request.headers), size, digest.hexdigest(), b"".join(kept)))
        action = self.script.pop(0) if self.script else 200
        if action == "hang":
            await self._release.wait()
            return web.Response(status=200)
        assert isinstance(action, int)
        return web.Response(status=action, body=self.error_body if action >= 300 else b"")

    async def __aenter__(self) -> HttpsPeer:
        app = web.Application()
        app.router.add_route("PUT", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)  # the access log would print the signature
        await self._runner.setup()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls.server_cert, self.tls.server_key)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        assert self._runner is not None
        await self._runner.cleanup()

    def url(self, path: str = "/bucket/cam1/evidence.jpg", host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{path}?{QUERY}"


@pytest.fixture
def pki(tmp_path: Path) -> TLSFiles:
    return make_pki(tmp_path / "pki")


def uploader(pki: TLSFiles, **kw: Any) -> Uploader:
    opts: dict[str, Any] = {"ca_file": pki.ca, "allow_private_hosts": True, "backoff_s": 0.01,
                            "backoff_max_s": 0.05, "read_timeout_s": 5.0, "connect_timeout_s": 5.0}
    return Uploader(**(opts | kw))


async def test_put_delivers_identical_bytes_with_length_and_type(pki: TLSFiles, store: EvidenceStore) -> None:
    att = await store.save_snapshot("cam1", person_image(), [Detection("person", 0.9, (180, 90, 280, 370))])
    path = store.get(att.sha256)
    assert path is not None
    async with HttpsPeer(pki) as peer:
        up = uploader(pki)
        result = await up.upload(store, att.sha256, peer.url(), headers={"x-amz-meta-event": "01EV"})
        assert len(peer.puts) == 1
        put = peer.puts[0]
        assert put.body == path.read_bytes() and put.sha256 == att.sha256 and put.size == att.size_bytes
        assert put.headers["Content-Type"] == "image/jpeg"
        assert put.headers["Content-Length"] == str(att.size_bytes)
        assert "Transfer-Encoding" not in put.headers
        assert put.headers["x-amz-meta-event"] == "01EV"
        assert put.raw_path == f"/bucket/cam1/evidence.jpg?{QUERY}", "the signed URL was re-quoted"
        assert result.to_dict() | {"elapsed_ms": 0} == {
            "sha256": att.sha256, "kind": "snapshot", "bytes": att.size_bytes, "status": 200, "elapsed_ms": 0,
            "attempts": 1}
        # A Content-Type the URL was signed with is sent as given.
        await up.upload(store, att.sha256, peer.url(), headers={"content-type": "application/octet-stream"})
        assert peer.puts[1].headers["Content-Type"] == "application/octet-stream"
    assert up.stats()["uploaded"] == 2 and up.stats()["bytes"] == 2 * att.size_bytes


async def test_refusals_before_any_request(pki: TLSFiles, store: EvidenceStore) -> None:
    att = await store.save_snapshot("cam1", noise(40, 40, 1))
    async with HttpsPeer(pki) as peer:
        up = uploader(pki)
        cases = [
            (att.sha256, peer.url().replace("https://", "http://"), {}, "only https"),
            ("a" * 64, peer.url(), {}, "no evidence"),
            (att.sha256, peer.url(), {"Authorization": "Bearer x"}, "not allowed"),
            (att.sha256, peer.url(), {"x-amz-meta-a": "line\r\nInjected: 1"}, "printable ASCII"),
        ]
        for sha, url, headers, why in cases:
            with pytest.raises(UploadError, match=why) as info:
                await up.upload(store, sha, url, headers=headers)
            assert info.value.code == "bad_args"
        with pytest.raises(UploadError, match="expired"):
            await up.upload(store, att.sha256, peer.url(), expires_at=datetime.now(UTC) - timedelta(seconds=1))
        # Without the flag, loopback and private hosts are refused, literal or named.
        strict = uploader(pki, allow_private_hosts=False)
        for url in (peer.url(), peer.url(host="localhost"), peer.url(host="[::1]"), peer.url(host="2130706433"),
                    peer.url(host="10.1.2.3"), peer.url(host="169.254.169.254")):
            with pytest.raises(UploadError, match=r"non-public|this box") as info:
                await strict.upload(store, att.sha256, url)
            assert info.value.code == "bad_args"
        assert peer.puts == []


async def test_names_are_checked_again_when_resolved() -> None:
    resolver = _PublicOnlyResolver()
    with pytest.raises(PrivateAddressError, match="non-public"):
        await resolver.resolve("localhost", 443)
    await resolver.close()


async def test_5xx_is_retried_until_it_works(pki: TLSFiles, store: EvidenceStore) -> None:
    att = await store.save_snapshot("cam1", noise(120, 160, 2))
    async with HttpsPeer(pki, script=[500, 503, 200]) as peer:
        up = uploader(pki, retries=3)
        result = await up.upload(store, att.sha256, peer.url())
        assert result.attempts == 3 and result.status == 200
        assert [p.sha256 for p in peer.puts] == [att.sha256] * 3, "a retry did not send the whole file again"
        assert up.stats()["retries"] == 2


async def test_4xx_is_final_with_a_clear_error(pki: TLSFiles, store: EvidenceStore) -> None:
    att = await store.save_snapshot("cam1", noise(120, 160, 3))
    body = (b"<?xml version='1.0'?><Error><Code>SignatureDoesNotMatch</Code><StringToSign>AWS4 "
            + SIG.encode() + b"</StringToSign></Error>")
    async with HttpsPeer(pki, script=[403], error_body=body) as peer:
        with pytest.raises(UploadError) as info:
            await uploader(pki, retries=3).upload(store, att.sha256, peer.url())
        assert len(peer.puts) == 1
    msg = info.value.message
    assert info.value.code == "failed"
    assert "HTTP 403" in msg and "SignatureDoesNotMatch" in msg and "/bucket/cam1/evidence.jpg" in msg
    assert SIG not in msg and "StringToSign" not in msg and "X-Amz" not in msg


async def test_a_server_that_never_answers_times_out(pki: TLSFiles, store: EvidenceStore) -> None:
    att = await store.save_snapshot("cam1", noise(120, 160, 4))
    async with HttpsPeer(pki, script=["hang", "hang"]) as peer:
        with pytest.raises(UploadError, match=r"no answer from https://127\.0\.0\.1:\d+/bucket.* within 0\.3 s"
                           r".*after 2 attempts") as info:
            await uploader(pki, read_timeout_s=0.3, retries=1).upload(store, att.sha256, peer.url())
        assert info.value.code == "failed" and len(peer.puts) == 2


async def test_a_server_that_never_completes_tls_times_out(pki: TLSFiles, store: EvidenceStore) -> None:
    att = await store.save_snapshot("cam1", noise(120, 160, 5))
    stop = asyncio.Event()
    accepted = 0

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await stop.wait()
        w.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(UploadError, match=r"no connection to .* within 0\.3 s"):
            await uploader(pki, connect_timeout_s=0.3, retries=0).upload(
                store, att.sha256, f"https://127.0.0.1:{port}/b/o.jpg?{QUERY}")
        assert accepted == 1
    finally:
        stop.set()
        server.close()
        await server.wait_closed()


async def test_tls_is_verified(pki: TLSFiles, store: EvidenceStore) -> None:
    att = await store.save_snapshot("cam1", noise(40, 40, 6))
    async with HttpsPeer(pki) as peer:
        for up in (uploader(pki, ca_file=None), uploader(pki, ca_file=pki.other_ca)):
            with pytest.raises(UploadError, match=r"certificate .* not trusted") as info:
                await up.upload(store, att.sha256, peer.url())
            assert info.value.code == "failed" and up.stats()["retries"] == 0
        assert peer.puts == []


async def test_the_signature_is_never_logged(pki: TLSFiles, store: EvidenceStore,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    att = await store.save_snapshot("cam1", noise(120, 160, 7))
    errors: list[str] = []
    async with HttpsPeer(pki, script=[500, 200, 404, "hang", "hang"]) as peer:
        up = uploader(pki, read_timeout_s=0.3, retries=1)
        await up.upload(store, att.sha256, peer.url())
        for _ in range(2):
            with pytest.raises(UploadError) as info:
                await up.upload(store, att.sha256, peer.url())
            errors.append(info.value.message)
        strict = uploader(pki, allow_private_hosts=False)
        with pytest.raises(UploadError) as info:
            await strict.upload(store, att.sha256, peer.url())
        errors.append(info.value.message)
    assert "retrying" in caplog.text and "uploaded" in caplog.text
    for text in [caplog.text, *errors]:
        assert SIG not in text and "X-Amz-Credential" not in text and "AKIAEXAMPLE" not in text


async def test_upload_streams_from_disk(pki: TLSFiles, tmp_path: Path, store: EvidenceStore) -> None:
    src = tmp_path / "big.mp4"
    with open(src, "wb") as f:
        for _ in range(16):
            f.write(os.urandom(1 << 20))
    att = await store.add_clip(src, "cam1")
    async with HttpsPeer(pki, keep_bytes=0) as peer:
        up = uploader(pki)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            result = await up.upload(store, att.sha256, peer.url("/b/clip.mp4"))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        put = peer.puts[0]
        assert put.sha256 == att.sha256 and put.size == 16 << 20 and result.bytes == 16 << 20
        assert put.headers["Content-Type"] == "video/mp4" and put.headers["Content-Length"] == str(16 << 20)
    assert peak < 4 << 20, f"the upload held {peak} bytes at once: the file was read into memory"


async def test_concurrency_is_bounded_and_overflow_is_refused(pki: TLSFiles, store: EvidenceStore) -> None:
    att = await store.save_snapshot("cam1", noise(40, 40, 8))
    async with HttpsPeer(pki, script=["hang"]) as peer:
        up = uploader(pki, max_concurrent=1, max_waiting=1)
        first = asyncio.create_task(up.upload(store, att.sha256, peer.url()))
        second = asyncio.create_task(up.upload(store, att.sha256, peer.url()))
        for _ in range(500):
            if len(peer.puts) == 1 and up.stats()["waiting"] == 1:
                break
            await asyncio.sleep(0.01)
        assert up.stats()["active"] == 1 and up.stats()["waiting"] == 1
        with pytest.raises(UploadError) as info:
            await up.upload(store, att.sha256, peer.url())
        assert info.value.code == "busy" and up.stats()["busy"] == 1
        peer._release.set()
        results = await asyncio.gather(first, second)
        assert [r.status for r in results] == [200, 200] and len(peer.puts) == 2


async def test_uploads_go_through_the_redactor_and_clips_are_held_back(pki: TLSFiles, tmp_path: Path,
                                                                        store: EvidenceStore) -> None:
    image = np.full((120, 160, 3), 220, np.uint8)
    att = await store.save_snapshot("cam1", image)
    path = store.get(att.sha256)
    assert path is not None
    kept = path.read_bytes()
    clip = tmp_path / "c.mp4"
    clip.write_bytes(os.urandom(1000))
    clip_att = await store.add_clip(clip, "cam1")
    async with HttpsPeer(pki) as peer:
        up = uploader(pki, redact=in_thread(np.zeros_like))
        result = await up.upload(store, att.sha256, peer.url())
        sent = cv2.imdecode(np.frombuffer(peer.puts[0].body, np.uint8), cv2.IMREAD_COLOR)
        assert int(sent.max()) < 10, "the uploaded snapshot was not redacted"
        assert path.read_bytes() == kept, "the kept evidence changed"
        d = result.to_dict()
        assert d["redacted"] is True and d["uploaded_sha256"] == peer.puts[0].sha256 != att.sha256
        with pytest.raises(UploadError, match="upload_unredacted_clips"):
            await up.upload(store, clip_att.sha256, peer.url("/b/c.mp4"))
        allowed = uploader(pki, redact=in_thread(lambda img: img), upload_unredacted_clips=True)
        assert (await allowed.upload(store, clip_att.sha256, peer.url("/b/c.mp4"))).bytes == 1000


# --- the signed command ---------------------------------------------------------------------------------------


@dataclass
class Commands:
    service: CommandService
    key: Ed25519PrivateKey
    events: list[Event]

    async def send(self, args: dict[str, Any]) -> Any:
        now = datetime.now(UTC)
        body = {"id": secrets.token_hex(8), "site_id": "site-1", "gateway_id": "gw-1",
                "command": "camera.upload_evidence", "args": args, "issued_at": now.isoformat(),
                "expires_at": (now + timedelta(minutes=5)).isoformat(), "nonce": secrets.token_hex(16),
                "issuer": "platform-test"}
        return await self.service.handle(sign_command(self.key, "k1", body))


@pytest.fixture
async def commands(tmp_path: Path, pki: TLSFiles, store: EvidenceStore,
                   factory: EventFactory) -> AsyncIterator[Commands]:
    outbox = Outbox(OutboxConfig(tmp_path / "outbox.db"))
    await outbox.open()
    sink = EventSink(factory, outbox)
    events: list[Event] = []
    sink.observe(lambda e, _seq: events.append(e))
    router = CommandRouter()
    router.register(upload_command(store, uploader(pki), sink))
    nonces: set[str] = set()

    async def claim(nonce: str, _issued_ms: int, _horizon_ms: int) -> str:
        if nonce in nonces:
            return "replay"
        nonces.add(nonce)
        return "claimed"

    async def audit(_result: Any) -> None:
        return None

    key = Ed25519PrivateKey.generate()
    service = CommandService(site_id="site-1", gateway_id="gw-1", keys={"k1": key.public_key()}, router=router,
                             now=lambda: datetime.now(UTC), clock_synced=lambda: True, audit=audit,
                             claim_command=claim)
    try:
        yield Commands(service, key, events)
    finally:
        await outbox.close()


async def test_signed_command_uploads_answers_and_records_an_event(pki: TLSFiles, store: EvidenceStore,
                                                                   commands: Commands) -> None:
    att = await store.save_snapshot("cam3", person_image())
    async with HttpsPeer(pki) as peer:
        res = await commands.send({"sha256": att.sha256, "url": peer.url(),
                                   "headers": {"Content-Type": "image/jpeg"},
                                   "expires_at": (datetime.now(UTC) + timedelta(minutes=10)).isoformat()})
        assert res.ok, res.error_message
        assert res.result["sha256"] == att.sha256 and res.result["bytes"] == att.size_bytes
        assert res.result["status"] == 200 and res.result["elapsed_ms"] >= 0
        assert peer.puts[0].sha256 == att.sha256
        ev = [e for e in commands.events if e.type == "camera.evidence.uploaded"]
        assert len(ev) == 1 and ev[0].device_id == "cam3" and ev[0].data["sha256"] == att.sha256
        # Refused in the command's own checks: http, a header off the list, an unknown hash.
        for args, status in (({"sha256": att.sha256, "url": peer.url().replace("https:", "http:")}, "rejected"),
                             ({"sha256": att.sha256, "url": peer.url(), "headers": {"Cookie": "a=b"}}, "rejected"),
                             ({"sha256": "b" * 64, "url": peer.url()}, "failed")):
            res = await commands.send(args)
            assert (res.ok, res.status, res.error_code) == (False, status, "bad_args"), res.error_message
            assert SIG not in (res.error_message or "")
        assert len(peer.puts) == 1


# --- the validator, fuzzed --------------------------------------------------------------------------------------


def _public(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host.lower().rstrip(".") != "localhost" and not host.lower().rstrip(".").endswith(".localhost")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_private or ip.is_multicast or ip.is_reserved or ip.is_loopback
                                 or ip.is_link_local or ip.is_unspecified)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
                 st.from_regex(r"\A[a-zA-Z]{0,6}://[^/?#]{0,40}(/[^?#]{0,20})?(\?.{0,20})?(#.*)?\Z")))
def test_any_string_is_refused_cleanly_or_is_a_safe_https_url(text: str) -> None:
    try:
        url = check_upload_url(text)
    except UploadRefused:
        return
    parts = urlsplit(url)
    assert parts.scheme.lower() == "https" and parts.hostname and "@" not in parts.netloc
    assert _public(parts.hostname)


_HOSTS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
    st.sampled_from(["localhost", "LOCALHOST.", "a.localhost", "bucket.s3.amazonaws.com",
                     "oss-cn-hangzhou.aliyuncs.com", "example.com.", "127.1", "0x7f.0.0.1", "2130706433",
                     "10.0.0.1", "0.0.0.0"]),
)


@settings(max_examples=400, deadline=None)
@given(scheme=st.sampled_from(["https", "HTTPS", "http", "ftp", "file", "javascript"]), host=_HOSTS,
       port=st.one_of(st.none(), st.integers(1, 65535)),
       path=st.from_regex(r"\A(/[A-Za-z0-9._~%-]{0,12}){0,3}\Z"),
       allow_private=st.booleans())
def test_only_https_to_allowed_hosts_passes(scheme: str, host: str, port: int | None, path: str,
                                            allow_private: bool) -> None:
    url = f"{scheme}://{host}{f':{port}' if port else ''}{path}?{QUERY}"
    bare = host.strip("[]")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(bare)
    except ValueError:
        ip = None
    if ip is None:
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(bare.rstrip("."))) if bare.rstrip(".")[-1].isdigit() or \
                bare.lower().startswith("0x") else None
        except OSError:
            ip = None
    if ip is not None and isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip is not None and allow_private:
        expected_host_ok = not (ip.is_unspecified or ip.is_multicast or ip.is_reserved)
    elif ip is not None:
        expected_host_ok = _public(str(ip))
    else:
        expected_host_ok = allow_private or _public(bare)
    expected = scheme.lower() == "https" and expected_host_ok
    try:
        check_upload_url(url, allow_private_hosts=allow_private)
    except UploadRefused as exc:
        assert not expected, f"{url} refused: {exc}"
        assert SIG not in str(exc)
    else:
        assert expected, f"{url} passed"


@given(st.dictionaries(st.text(max_size=30), st.text(max_size=40), max_size=20))
def test_headers_pass_only_when_every_name_is_allowed_and_values_are_clean(headers: dict[str, str]) -> None:
    try:
        out = check_upload_headers(headers)
    except UploadRefused as exc:
        # The message may name a header but never echo a value (it can be a signature). A value that is also
        # part of the fixed wording or of a name ({'': 'name'}) is no leak: compare with the message the same
        # headers give with every value blanked out.
        try:
            check_upload_headers({k: "\x01" * len(v) for k, v in headers.items()})
            fixed = ""
        except UploadRefused as blank:
            fixed = str(blank)
        for value in headers.values():
            if len(value) > 3 and value not in fixed:
                assert value not in str(exc)
        return
    assert out == headers
    for name, value in out.items():
        low = name.lower()
        assert low in {"content-type", "content-md5", "content-disposition", "content-encoding", "content-language",
                       "cache-control", "expires"} or low.startswith(("x-amz-", "x-oss-", "x-cos-", "x-obs-",
                                                                      "x-goog-", "x-ms-"))
        assert "\r" not in value and "\n" not in value and value == value.strip() and value


def test_allow_listed_headers_pass() -> None:
    h = {"Content-Type": "image/jpeg", "x-amz-security-token": "FQoG/abc==", "x-oss-meta-site": "s1",
         "Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg=="}
    assert check_upload_headers(h) == h

    secret = "tok-" + SIG
    with pytest.raises(UploadRefused) as info:
        check_upload_headers({"x-amz-security-token": secret + "\r\nHost: evil"})
    assert SIG not in str(info.value)


async def test_a_store_nobody_opened_opens_on_first_use(tmp_path: Path) -> None:
    s = EvidenceStore(tmp_path / "ev", max_bytes=10**9, retention_s=60)
    try:
        att = await s.save_snapshot("cam1", noise(30, 30, 1))
        assert s.get(att.sha256) is not None
    finally:
        await s.aclose()
