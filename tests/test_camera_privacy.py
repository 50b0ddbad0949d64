"""Faces blurred in what leaves the box: the real CenterFace model through the real inference engine.

The astronaut's face is found, blurred so that CenterFace no longer finds it even at a threshold far below
the redactor's own (a light blur, by contrast, leaves it findable: the check can fail), and nothing outside
the enlarged face box changes. A snapshot kept unblurred on the box reaches a real HTTPS server on loopback
blurred, through the uploader; a redactor whose engine is stopped refuses the upload and nothing is sent.
On the pedestrian clip the tiles find the far faces the whole-picture pass misses.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.camera.evidence import EvidenceStore
from edgeagent.drivers.camera.privacy import (
    PRIVACY_MODEL,
    BlurMethod,
    FaceBlur,
    RedactionError,
    blur_boxes,
    enlarge,
    privacy_manifest,
    tile_grid,
)
from edgeagent.drivers.camera.upload import Uploader, UploadError
from edgeagent.models.engine import InferenceEngine
from edgeagent.models.manifest import load_manifests
from edgeagent.models.types import Box, Detection, ModelError
from tests.media import clip_frames, image
from tests.peers import TLSFiles, make_pki

MANIFESTS = load_manifests()
SHIPPED = MANIFESTS["centerface"]
PROBE = "centerface-probe"
PROBE_SCORE = 0.1  # far below anything a real face scores (the astronaut's: 0.93; far pedestrians': 0.25+)
CLIP_FRAMES = list(range(0, 795, 100))
METHODS: list[BlurMethod] = ["pixelate", "gaussian"]


@pytest.fixture(scope="module")
def engine() -> Iterator[InferenceEngine]:
    """One engine for the module (each test runs on its own loop; answers go to the loop that asked): the
    shipped CenterFace, the privacy copy at its default threshold, a probe copy at 0.1 for the checks, and
    NanoDet to say where the people are."""
    eng = InferenceEngine({"centerface": SHIPPED, "nanodet": MANIFESTS["nanodet"],
                           PRIVACY_MODEL: privacy_manifest(SHIPPED),
                           PROBE: privacy_manifest(SHIPPED, min_score=PROBE_SCORE, name=PROBE)}, stuck_after_s=60)
    asyncio.run(eng.__aenter__())
    try:
        yield eng
    finally:
        asyncio.run(eng.__aexit__(None, None, None))


def probe(engine: InferenceEngine) -> FaceBlur:
    """Both passes at the probe's threshold: what a check of redacted output looks for."""
    return FaceBlur(engine, model=PROBE, min_score=PROBE_SCORE)


def _overlap(a: Box, b: tuple[int, int, int, int]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h


def decode(jpeg: bytes) -> np.ndarray:
    found = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert found is not None, "not a JPEG"
    return np.asarray(found, dtype=np.uint8)


def _sharpness(patch: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(patch, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var())


async def _astronaut_face(engine: InferenceEngine) -> Detection:
    [faces] = await engine.infer("centerface", [image("astronaut.png")])
    assert len(faces) == 1 and faces[0].score > 0.8
    return faces[0]


# --- the astronaut -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
async def test_the_astronaut_face_is_blurred_past_finding_and_nothing_else_changes(engine: InferenceEngine,
                                                                                    method: BlurMethod) -> None:
    img = image("astronaut.png")
    before = img.copy()
    face = await _astronaut_face(engine)
    blur = FaceBlur(engine, method=method)
    found = await blur.faces(img)
    assert len(found) == 1, f"the redactor found {found}"
    assert blur.tiles(512, 512) == [], "a 512 px picture is seen whole (the tiles would magnify it little more)"
    out = await blur.redact(img)
    assert np.array_equal(img, before), "the input picture was modified"
    assert out.shape == img.shape and out.dtype == np.uint8
    h, w = img.shape[:2]
    box = enlarge(found[0].box, blur.margin, w, h)
    assert box is not None
    x1, y1, x2, y2 = box
    # The face is gone: nothing at 0.1 where it was, and nothing anywhere the redactor itself would blur
    # (a second redaction would change nothing).
    after = await probe(engine).faces(out)
    assert not [d for d in after if _overlap(d.box, box) > 0], f"a face is still found where it was: {after}"
    assert not [d for d in after if d.score >= blur.min_score], after
    # Inside: changed and without detail; outside the enlarged box: every pixel as it was.
    fx1, fy1, fx2, fy2 = (round(v) for v in face.box)
    inside_diff = np.abs(out[fy1:fy2, fx1:fx2].astype(int) - img[fy1:fy2, fx1:fx2].astype(int))
    assert inside_diff.mean() > 8
    assert _sharpness(out[fy1:fy2, fx1:fx2]) < _sharpness(img[fy1:fy2, fx1:fx2]) / 10
    mask = np.ones((h, w), bool)
    mask[y1:y2, x1:x2] = False
    assert np.array_equal(out[mask], img[mask]), "pixels outside the face box changed"
    assert blur.stats()["redacted"] == 1 and blur.stats()["faces"] == 1


async def test_a_light_blur_leaves_the_face_findable(engine: InferenceEngine) -> None:
    """The check above can fail: a gaussian of sigma 2 over the same box, the kind of blur that can be partly
    undone, still leaves a face for the probe."""
    img = image("astronaut.png")
    face = await _astronaut_face(engine)
    box = enlarge(face.box, 0.4, img.shape[1], img.shape[0])
    assert box is not None
    x1, y1, x2, y2 = box
    light = img.copy()
    light[y1:y2, x1:x2] = cv2.GaussianBlur(img[y1:y2, x1:x2], (0, 0), 2.0)
    assert [d for d in await probe(engine).faces(light) if _overlap(d.box, box) > 0]


def test_the_blur_keeps_only_the_grid_of_cell_means() -> None:
    """Two different faces with the same cell means give the same bytes: what is not in the grid is gone."""
    face = cv2.resize(image("astronaut.png")[60:180, 176:272], (80, 80), interpolation=cv2.INTER_AREA)
    base = np.clip(face, 40, 215).astype(np.uint8)
    yy, xx = np.mgrid[0:80, 0:80]
    # +-30 in a checkerboard of 1 px squares: zero sum in every 10x10 cell of an 8-cell grid
    pattern = np.where((yy + xx) % 2 == 0, 30, -30)[..., None]
    other = (base.astype(int) + pattern).astype(np.uint8)
    assert np.abs(other.astype(int) - base.astype(int)).mean() == 30
    canvas_a = np.full((120, 120, 3), 90, np.uint8)
    canvas_b = canvas_a.copy()
    canvas_a[20:100, 20:100] = base
    canvas_b[20:100, 20:100] = other
    for method in METHODS:
        a = blur_boxes(canvas_a, [(20, 20, 100, 100)], method=method, cells=8)
        b = blur_boxes(canvas_b, [(20, 20, 100, 100)], method=method, cells=8)
        assert np.array_equal(a, b), method
        assert np.array_equal(a[:20], canvas_a[:20]) and np.array_equal(a[:, 100:], canvas_a[:, 100:])


# --- geometry --------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 4000), h=st.integers(1, 3000), tile=st.integers(32, 1024), frac=st.floats(0, 0.49))
def test_tiles_cover_the_picture_and_overlap_as_asked(w: int, h: int, tile: int, frac: float) -> None:
    overlap = int(tile * frac)
    tiles = tile_grid(w, h, tile, overlap)
    covered = np.zeros((h, w), bool)
    for x1, y1, x2, y2 in tiles:
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert x2 - x1 <= tile and y2 - y1 <= tile
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    xs = sorted({(t[0], t[2]) for t in tiles})
    ys = sorted({(t[1], t[3]) for t in tiles})
    for spans in (xs, ys):
        for (_a1, a2), (b1, _b2) in itertools.pairwise(spans):
            assert a2 - b1 >= overlap


def test_boxes_grow_by_the_margin_and_stay_in_the_picture() -> None:
    assert enlarge((100.0, 100.0, 200.0, 150.0), 0.25, 640, 480) == (75, 87, 225, 163)
    assert enlarge((5.5, 5.5, 20.2, 20.2), 0.5, 22, 640) == (0, 0, 22, 28)
    assert enlarge((0.0, 0.0, 0.5, 0.5), 0.0, 10, 10) == (0, 0, 2, 2)  # at least a pixel each side
    assert enlarge((float("nan"), 0.0, 5.0, 5.0), 0.4, 10, 10) is None
    assert enlarge((50.0, 50.0, 60.0, 60.0), 0.1, 10, 10) is None


def test_a_model_that_drops_faces_the_blur_needs_is_refused(engine: InferenceEngine) -> None:
    with pytest.raises(ModelError, match="privacy_manifest"):
        FaceBlur(engine, model="centerface")  # the shipped threshold (0.5) is above the default 0.3
    with pytest.raises(ModelError, match="no face model"):
        FaceBlur(engine, model="yolo")
    with pytest.raises(ModelError, match="cannot find faces"):
        FaceBlur(engine, model="nanodet")
    with pytest.raises(ModelError, match="cannot find faces"):
        privacy_manifest(MANIFESTS["nanodet"])
    assert FaceBlur(engine, model="centerface", min_score=0.5).min_score == 0.5


# --- far faces --------------------------------------------------------------------------------------------------


async def test_tiles_find_the_far_faces_the_whole_picture_misses(engine: InferenceEngine) -> None:
    """The pedestrians' faces are 6 to 11 px wide: the whole-picture pass (768x576 fitted to 640x480) finds
    few, the magnified tiles most. Measured over these 8 frames: 5 faces whole, 22 with tiles, 21 of them on
    the head of a person NanoDet finds (the other: a sign scoring 0.31), so the tiles map back right."""
    blur = FaceBlur(engine)
    frames = clip_frames(CLIP_FRAMES)
    with_tiles = [await blur.faces(f) for f in frames]
    whole = [await blur.faces(f, tiles=False) for f in frames]
    assert sum(map(len, with_tiles)) >= 2 * max(1, sum(map(len, whole)))
    assert all(len(t) >= len(o) for t, o in zip(with_tiles, whole, strict=True))
    on_heads = 0
    for f, faces in zip(frames, with_tiles, strict=True):
        [found] = await engine.infer("nanodet", [f])
        people = [d.box for d in found if d.label == "person"]
        for d in faces:
            cx, cy = (d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2
            on_heads += any(p[0] <= cx <= p[2] and p[1] - 5 <= cy <= p[1] + 0.4 * (p[3] - p[1]) for p in people)
    assert on_heads >= 0.8 * sum(map(len, with_tiles))
    # Redacted: changed in every enlarged face box, untouched away from the faces (the blur covers every
    # detection of both passes, so a tile's duplicate of a face may widen it by a little).
    f, faces = frames[0], with_tiles[0]
    out = await blur.redact(f)
    mask = np.ones(f.shape[:2], bool)
    for d in faces:
        box, near = enlarge(d.box, blur.margin, 768, 576), enlarge(d.box, blur.margin + 1.0, 768, 576)
        assert box is not None and near is not None
        x1, y1, x2, y2 = box
        assert not np.array_equal(out[y1:y2, x1:x2], f[y1:y2, x1:x2])
        mask[near[1]:near[3], near[0]:near[2]] = False
    assert faces and np.array_equal(out[mask], f[mask])


async def test_in_a_large_picture_the_tiles_find_small_faces_and_a_face_across_a_seam(engine: InferenceEngine
                                                                                     ) -> None:
    """1920x1080: the astronaut's head at 3x (a face of about 285 x 350 px) lying across tile seams, so no tile
    holds it whole (the whole-picture pass, at 640x360, finds it), and three copies of the astronaut at 15 to
    25 % (faces 14 to 23 px wide, 5 to 8 px at the whole pass's scale, too small for it; the tiles magnify
    them 1.43x). Measured: the tiles find the three at 0.80 to 0.83, the whole picture none at 0.5."""
    ast = image("astronaut.png")
    face = await _astronaut_face(engine)
    fx1, fy1, fx2, fy2 = face.box
    canvas = np.full((1080, 1920, 3), 128, np.uint8)
    big = cv2.resize(ast, None, fx=3.0, fy=3.0, interpolation=cv2.INTER_LINEAR)[80:640, 400:950]
    canvas[50:610, 369:919] = big
    expected = [(round(369 - 400 + fx1 * 3), round(50 - 80 + fy1 * 3), round(369 - 400 + fx2 * 3),
                 round(50 - 80 + fy2 * 3))]
    for scale, (x, y) in ((0.25, (1200, 700)), (0.2, (1600, 300)), (0.15, (900, 850))):
        small = cv2.resize(ast, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        canvas[y:y + small.shape[0], x:x + small.shape[1]] = small
        expected.append((round(x + fx1 * scale), round(y + fy1 * scale), round(x + fx2 * scale),
                         round(y + fy2 * scale)))
    blur = FaceBlur(engine)
    bx1, by1, bx2, by2 = expected[0]
    assert not [t for t in blur.tiles(1920, 1080) if t[0] <= bx1 and t[1] <= by1 and bx2 <= t[2] and by2 <= t[3]]

    def found_in(dets: list[Detection], box: tuple[int, int, int, int], score: float) -> bool:
        return any(d.score >= score and box[0] <= (d.box[0] + d.box[2]) / 2 <= box[2]
                   and box[1] <= (d.box[1] + d.box[3]) / 2 <= box[3] for d in dets)

    with_tiles = await blur.faces(canvas)
    whole = await blur.faces(canvas, tiles=False)
    assert all(found_in(with_tiles, box, 0.5) for box in expected), with_tiles
    assert found_in(whole, expected[0], 0.5)
    assert sum(found_in(whole, box, 0.5) for box in expected[1:]) < 3
    out = await blur.redact(canvas)
    after = await probe(engine).faces(out)
    assert not [d for d in after if _overlap(d.box, expected[0]) > 0], after
    assert not [d for d in after if d.score >= 0.5], after


# --- the upload ---------------------------------------------------------------------------------------------


@dataclass
class PutSink:
    """A real HTTPS server on 127.0.0.1 keeping the bodies of the PUTs it receives."""

    tls: TLSFiles
    bodies: list[bytes] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    async def _put(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        return web.Response(status=200)

    async def __aenter__(self) -> PutSink:
        app = web.Application()
        app.router.add_route("PUT", "/{tail:.*}", self._put)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls.server_cert, self.tls.server_key)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def url(self, path: str = "/bucket/cam1/snap.jpg") -> str:
        return f"https://127.0.0.1:{self.port}{path}?X-Amz-Signature=abc123"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EvidenceStore]:
    async with EvidenceStore(tmp_path / "evidence", max_bytes=50_000_000, retention_s=86_400) as s:
        yield s


async def test_an_uploaded_snapshot_has_no_face_left(engine: InferenceEngine, store: EvidenceStore,
                                                     tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    img = image("astronaut.png")
    att = await store.save_snapshot("cam1", img)  # kept as seen, face and all
    kept_path = store.get(att.sha256)
    assert kept_path is not None
    kept = kept_path.read_bytes()
    kept_img = decode(kept)
    face = await _astronaut_face(engine)
    [kept_faces] = await engine.infer("centerface", [kept_img])
    assert len(kept_faces) == 1, "the kept snapshot should still show the face"
    blur = FaceBlur(engine)
    up = Uploader(ca_file=pki.ca, allow_private_hosts=True, redact=blur.redact, retries=0)
    async with PutSink(pki) as peer:
        result = await up.upload(store, att.sha256, peer.url())
    assert len(peer.bodies) == 1
    body = peer.bodies[0]
    assert result.to_dict()["redacted"] is True and result.uploaded_sha256 == hashlib.sha256(body).hexdigest()
    assert body != kept and kept_path.read_bytes() == kept, "the kept evidence changed"
    sent = decode(body)
    assert sent.shape == img.shape
    after = await probe(engine).faces(sent)
    assert not [d for d in after if d.score >= blur.min_score], f"faces in what was uploaded: {after}"
    region = enlarge(face.box, blur.margin, 512, 512)
    assert region is not None
    assert not [d for d in after if _overlap(d.box, region) > 0], f"the face is findable in the upload: {after}"
    # Far from the face, the upload is the kept picture (up to the JPEG re-encoding).
    far = (slice(300, 512), slice(300, 512))
    assert np.abs(sent[far].astype(int) - kept_img[far].astype(int)).mean() < 3


async def test_no_detector_no_upload(store: EvidenceStore, tmp_path: Path) -> None:
    """Fail closed: a redactor whose engine is stopped raises, the uploader refuses, the server gets nothing."""
    pki = make_pki(tmp_path / "pki")
    att = await store.save_snapshot("cam1", image("astronaut.png"))
    clip = tmp_path / "c.mp4"
    clip.write_bytes(b"\0" * 2000)
    clip_att = await store.add_clip(clip, "cam1")
    stopped = InferenceEngine({PRIVACY_MODEL: privacy_manifest(SHIPPED)})
    async with stopped:
        blur = FaceBlur(stopped)
    with pytest.raises(RedactionError, match="nothing was sent"):
        await blur.redact(image("astronaut.png"))
    up = Uploader(ca_file=pki.ca, allow_private_hosts=True, redact=blur.redact, retries=0)
    async with PutSink(pki) as peer:
        with pytest.raises(UploadError, match="could not be redacted") as err:
            await up.upload(store, att.sha256, peer.url())
        assert err.value.code == "failed"
        # A clip cannot be blurred here, so it is held back too.
        with pytest.raises(UploadError, match="upload_unredacted_clips"):
            await up.upload(store, clip_att.sha256, peer.url("/bucket/cam1/c.mp4"))
    assert peer.bodies == []
    assert up.stats()["uploaded"] == 0 and blur.stats()["failed"] == 2


async def test_the_thread_safe_redactor_refuses_what_it_cannot_do(engine: InferenceEngine) -> None:
    blur = FaceBlur(engine)
    sync = blur.threadsafe()
    with pytest.raises(RedactionError, match="own event loop"):
        sync(image("astronaut.png"))  # on the loop's thread it would wait for itself
    with pytest.raises(RedactionError, match="uint8 BGR"):
        await asyncio.to_thread(sync, np.zeros((10, 10), np.float32))
    out = await asyncio.to_thread(sync, image("astronaut.png"))
    assert out.shape == (512, 512, 3)
