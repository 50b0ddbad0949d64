"""A real RTSP server on loopback for the camera tests and benchmarks, and the clips it serves.

The server is Debian's gst-rtsp-server driven by this very file run under Debian's ``/usr/bin/python3``
(a venv Python cannot import ``gi``; the ``__main__`` part below imports only the standard library and ``gi``).
Each mount ``/camN`` is a ``udpsrc`` pipeline fed over RTP by ``ffmpeg -re -stream_loop -1 -c copy``:
serving a file straight from gst (``multifilesrc loop=true``) fails every PLAY, and a feeder process gives the
tests their failure switches. **One client per mount at a time**, like a camera that allows one session:
each client gets its own pipeline on the mount's UDP port (a shared pipeline answered 503 to a client that
came while the previous one's was being torn down, about every other time), and with two at once the newer
one takes the packets: the older one sees a freeze.

* ``kill()``: the server dies (SIGKILL); the feeders keep sending into closed UDP ports (harmless);
* ``restart()``: a new server on the SAME TCP port, so the camera URL does not change;
* ``freeze()``: the feeders are stopped (SIGSTOP): the RTSP connection stays open and no data flows, the
  case where OpenCV's defaults take about 90 s to notice. ``freeze(server=True)`` stops the server process
  instead (requests then go unanswered too). ``resume()`` continues them; note that ``ffmpeg -re`` then
  sends the paused seconds in a burst to catch up with the wall clock, as a camera's buffer would.

Clips (converted once and cached per user under ``~/.cache/edgeagent-tests``, keyed by the source's sha256
and size and the recipe; written to a temporary name and renamed, so parallel runs never see half a file):

* ``busy_clip()``: the campus clip (``vtest.avi``, 768x576) as H.264 in MPEG-TS, 10 fps, a keyframe every
  10 frames (clips and reopening wait at most a second for a keyframe);
* ``quiet_clip()``: the clip's background (per-pixel median of frames across the clip, which removes the
  walkers) as a still scene with gaussian sensor noise on every frame and a slow brightness ramp (down and
  back up, so the loop has no jump), for the "quiet scene costs almost nothing" benchmark.

A TS file, not MP4: looping an MP4 through ``h264_mp4toannexb`` breaks at the first loop (media/PROVENANCE.md).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
SYSTEM_PYTHON = "/usr/bin/python3"
FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"
DEBIAN_PACKAGES = ("ffmpeg python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-plugins-base "
                   "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav")
BUSY_RECIPE = "h264-crf23-g10-fps10-v1"
QUIET_RECIPE = "quiet-median-noise2.5-ramp8pct-30s-h264-crf26-g10-v1"
CLIP_FPS = 10
CLIP_SIZE = (768, 576)


class PeerUnavailable(RuntimeError):
    """The system tools the RTSP peer needs are missing; the message names the Debian packages."""


# --- clips -------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    d = base / "edgeagent-tests"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _source_key(source: Path) -> str:
    h = hashlib.sha256()
    with source.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{h.hexdigest()[:16]}-{source.stat().st_size}"


@contextlib.contextmanager
def _atomic_target(final: Path) -> Iterator[Path]:
    """A temporary path beside ``final``; renamed over it when the block succeeds, removed when it fails."""
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.", suffix=final.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o644)  # a cache other tools (and other users of a shared HOME) may read
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _need_ffmpeg() -> None:
    if not os.access(FFMPEG, os.X_OK):
        raise PeerUnavailable(f"ffmpeg is missing; install the RTSP test peer's packages: apt-get install "
                              f"{DEBIAN_PACKAGES}")


def busy_clip(source: Path | None = None) -> Path:
    """``source`` (default: the shared ``vtest.avi``) as H.264 MPEG-TS, 10 fps, GOP 10; cached."""
    _need_ffmpeg()
    source = source or MEDIA / "vtest.avi"
    final = cache_dir() / f"busy-{_source_key(source)}-{BUSY_RECIPE}.ts"
    if final.exists():
        return final
    with _atomic_target(final) as tmp:
        r = subprocess.run(
            [FFMPEG, "-hide_banner", "-loglevel", "error", "-y", "-i", str(source), "-an", "-c:v", "libx264",
             "-preset", "veryfast", "-tune", "zerolatency", "-profile:v", "main", "-pix_fmt", "yuv420p",
             "-crf", "23", "-r", str(CLIP_FPS), "-g", "10", "-keyint_min", "10", "-sc_threshold", "0",
             "-f", "mpegts", str(tmp)], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"ffmpeg could not convert {source}: {r.stderr.strip()[-500:]}")
    return final


def quiet_clip(source: Path | None = None, *, seconds: float = 30.0) -> Path:
    """A still scene made from ``source``'s background: gaussian noise (sigma 2.5 grey levels) on each frame
    and a brightness ramp down 8% and back over the clip; H.264 MPEG-TS like ``busy_clip``; cached."""
    # venv only: this file also runs under Debian's python3 for the server
    import av
    import numpy as np

    _need_ffmpeg()
    source = source or MEDIA / "vtest.avi"
    final = cache_dir() / f"quiet-{_source_key(source)}-{QUIET_RECIPE}-{seconds:g}s.ts"
    if final.exists():
        return final
    with av.open(str(source)) as src:
        stream = src.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in src.decode(stream)]
    # Every 8th frame across the whole clip: walkers are somewhere else in most of them, so the median
    # is the empty path with the parked van and car.
    sample = np.stack(frames[::8])
    background = np.median(sample, axis=0).astype(np.float32)
    height, width = background.shape[:2]
    count = round(seconds * CLIP_FPS)
    rng = np.random.default_rng(20240611)
    with _atomic_target(final) as tmp, av.open(str(tmp), "w", format="mpegts") as out:
        vs = out.add_stream("libx264", rate=CLIP_FPS)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        vs.options = {"preset": "veryfast", "tune": "zerolatency", "crf": "26", "g": "10",
                      "keyint_min": "10", "sc_threshold": "0"}
        for i in range(count):
            phase = i / max(1, count - 1)
            gain = 1.0 - 0.08 * (1.0 - abs(2.0 * phase - 1.0))  # 1.0 → 0.92 → 1.0
            noise = rng.standard_normal((height, width, 1), dtype=np.float32) * 2.5
            img = np.clip(background * gain + noise, 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
    return final


# --- the server ----------------------------------------------------------------------------------------------

def check_tools() -> None:
    """Raise PeerUnavailable naming the Debian packages when gst-rtsp-server or ffmpeg are missing."""
    _need_ffmpeg()
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "import sys; sys.exit(0 if all(Gst.ElementFactory.find(n) for n in "
             "('udpsrc', 'rtph264depay', 'rtph264pay')) else 3)")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        raise PeerUnavailable(f"{SYSTEM_PYTHON} is missing; the RTSP test server needs Debian's python3 with "
                              f"gst-rtsp-server: apt-get install {DEBIAN_PACKAGES}")
    r = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise PeerUnavailable(f"gst-rtsp-server is not usable from {SYSTEM_PYTHON} "
                              f"({(r.stderr.strip().splitlines() or ['missing gst elements'])[-1]}); "
                              f"apt-get install {DEBIAN_PACKAGES}")


def free_udp_pairs(count: int) -> list[int]:
    """``count`` even UDP ports P with P+1 free as well (ffmpeg's RTP muxer sends RTCP to P+1)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            held.append(a)
            if port % 2 or port >= 65535:
                continue
            b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                b.close()
                continue
            held.append(b)
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def read_first_frame(url: str, timeout_s: float = 10.0) -> tuple[int, int]:
    """Open ``url`` with PyAV and decode one frame; returns its (width, height). Retries until ``timeout_s``."""
    import av

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with av.open(url, options={"rtsp_transport": "tcp", "analyzeduration": "200000",
                                       "probesize": "100000"}, timeout=(3.0, 3.0)) as c:
                for frame in c.decode(c.streams.video[0]):
                    return frame.width, frame.height
        except av.error.FFmpegError as exc:
            last = exc
        time.sleep(0.1)
    shown = url.split("@", 1)[-1] if "@" in url else url
    raise TimeoutError(f"no frame from ...{shown} within {timeout_s:g} s: "
                       f"{type(last).__name__ if last else ''} {getattr(last, 'strerror', '')}")


class RtspServer:
    """gst-rtsp-server on 127.0.0.1 with ``mounts`` mounts (``/cam0`` ...), mount i looping
    ``clips[i % len(clips)]`` at 10 fps, the mounts in ``credentials`` protected by a user and password.
    A context manager; start-up waits until the port answers and a first frame can be read from every mount
    (raises with the server's stderr when it cannot)."""

    def __init__(self, clips: Path | Sequence[Path], *, mounts: int = 1, workdir: Path | None = None,
                 startup_timeout_s: float = 20.0, credentials: Mapping[int, tuple[str, str]] | None = None) -> None:
        self.clips = [clips] if isinstance(clips, Path) else list(clips)
        if not self.clips or mounts < 1:
            raise ValueError("at least one clip and one mount")
        self.mounts = mounts
        # mount index -> (user, password): that mount asks for them (Digest, as most cameras do);
        # the others stay open.
        self.credentials = dict(credentials or {})
        self.startup_timeout_s = startup_timeout_s
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="rtsp-peer-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.udp_ports: list[int] = []
        self.server: subprocess.Popen[bytes] | None = None
        self.feeders: list[subprocess.Popen[bytes]] = []
        self._starts = 0

    # URLs
    @property
    def url(self) -> str:
        return self.url_for(0)

    @property
    def urls(self) -> list[str]:
        return [self.url_for(i) for i in range(self.mounts)]

    def url_for(self, mount: int, *, userinfo: str = "") -> str:
        at = f"{userinfo}@" if userinfo else ""
        return f"rtsp://{at}127.0.0.1:{self.port}/cam{mount}"

    # life cycle
    def __enter__(self) -> RtspServer:
        check_tools()
        try:
            self.udp_ports = free_udp_pairs(self.mounts)
            self._start_server(self.port)
            self._start_feeders()
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for p in [*self.feeders, *([self.server] if self.server else [])]:
            _end(p)
        self.feeders = []
        self.server = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _start_server(self, port: int) -> None:
        self._starts += 1
        out = self.workdir / f"server-{self._starts}.out"
        err = self.workdir / f"server-{self._starts}.err"
        args = [SYSTEM_PYTHON, str(Path(__file__).resolve()), "serve", "--port", str(port)]
        for i, udp in enumerate(self.udp_ports):
            args += ["--mount", f"/cam{i}={udp}"]
        env = dict(os.environ)
        for i, (user, password) in self.credentials.items():
            args += ["--auth", f"/cam{i}={user}"]
            env[f"RTSP_PEER_PASSWORD_{i}"] = password  # not on the command line, where ps shows it
        with out.open("wb") as o, err.open("wb") as e:
            self.server = subprocess.Popen(args, stdout=o, stderr=e, stdin=subprocess.DEVNULL,
                                           start_new_session=True, env=env)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            text = out.read_text(errors="replace")
            if text.startswith("PORT "):
                line = text.splitlines()[0]
                self.port = int(line.split()[1])
                return
            if self.server.poll() is not None:
                break
            time.sleep(0.02)
        stderr = err.read_text(errors="replace").strip()[-800:]
        code = self.server.poll()
        _end(self.server)
        self.server = None
        raise RuntimeError(f"the RTSP server did not start (exit code {code}, port {port or 'any'}): {stderr}")

    def _start_feeders(self) -> None:
        for c, clip in enumerate(self.clips):
            outputs: list[str] = []
            for i, udp in enumerate(self.udp_ports):
                if i % len(self.clips) == c:
                    outputs += ["-map", "0:v:0", "-c", "copy", "-f", "rtp", f"rtp://127.0.0.1:{udp}"]
            if not outputs:
                continue
            log = (self.workdir / f"feeder-{c}.log").open("ab")
            with log:
                self.feeders.append(subprocess.Popen(
                    [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1",
                     "-i", str(clip), *outputs], stdout=subprocess.DEVNULL, stderr=log, start_new_session=True))

    def _wait_port(self, deadline: float) -> None:
        while True:
            with socket.socket() as s:
                s.settimeout(0.2)
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the RTSP server does not answer on 127.0.0.1:{self.port}")
            time.sleep(0.02)

    def wait_ready(self, *, all_mounts: bool = True) -> None:
        """The port answers and a frame can be read from every mount (or the first): call it only while no
        other client is on those mounts."""
        deadline = time.monotonic() + self.startup_timeout_s
        self._wait_port(deadline)
        for feeder in self.feeders:
            if feeder.poll() is not None:
                raise RuntimeError(f"an ffmpeg feeder exited ({feeder.returncode}): {self._tail('feeder-*.log')}")
        remaining = max(1.0, deadline - time.monotonic())
        indexes = list(range(self.mounts if all_mounts else 1))

        def probe(i: int) -> tuple[int, int]:
            user_pw = self.credentials.get(i)
            userinfo = ":".join(quote(x, safe="") for x in user_pw) if user_pw else ""
            return read_first_frame(self.url_for(i, userinfo=userinfo), remaining)

        # Every mount at once: each waits up to a GOP for its first keyframe.
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(indexes))) as pool:
            futures = {i: pool.submit(probe, i) for i in indexes}
            for i, fut in futures.items():
                try:
                    size = fut.result()
                except TimeoutError as exc:
                    raise RuntimeError(f"{exc}; server: {self._tail('server-*.err')}") from exc
                if size != CLIP_SIZE and self.clips[i % len(self.clips)].name.startswith(("busy-", "quiet-")):
                    raise RuntimeError(f"mount {i} serves {size}, expected {CLIP_SIZE}")

    def _tail(self, pattern: str) -> str:
        texts = [p.read_text(errors="replace") for p in sorted(self.workdir.glob(pattern))]
        return "".join(texts).strip()[-600:] or "(nothing logged)"

    # failure switches
    def kill(self) -> None:
        """SIGKILL the server; the port is free until ``restart()``."""
        if self.server is not None:
            self.server.kill()
            self.server.wait(5)
            self.server = None

    def restart(self) -> None:
        """A new server process on the same TCP port (the URLs stay valid); frozen feeders are resumed.
        Returns when the port answers: no frame is read here, since a client of the test (a source
        reconnecting) may be on a mount already and the mount serves one client at a time."""
        self.kill()
        self.resume()
        deadline = time.monotonic() + self.startup_timeout_s
        while True:  # the old socket may linger a moment after SIGKILL
            try:
                self._start_server(self.port)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._wait_port(deadline)

    def freeze(self, *, server: bool = False) -> None:
        """Stop the data while every RTSP connection stays open: SIGSTOP the feeders (or the server)."""
        for p in [self.server] if server else self.feeders:
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGSTOP)

    def resume(self) -> None:
        for p in [*self.feeders, *([self.server] if self.server else [])]:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)


def _end(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        p.terminate()
    try:
        p.wait(3)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(3)


# --- the gst side, run as `/usr/bin/python3 tests/rtsp_peer.py serve --port 0 --mount /cam0=UDPPORT ...` ----

def _serve(argv: list[str]) -> int:  # pragma: no cover - runs under Debian's python
    import argparse

    import gi  # type: ignore[import-not-found]  # Debian's python3-gi, not in the venv

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtsp", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # type: ignore[import-not-found]

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", default="0")
    ap.add_argument("--mount", action="append", default=[], help="PATH=UDPPORT")
    ap.add_argument("--auth", action="append", default=[],
                    help="PATH=USER: that mount needs USER with the password in $RTSP_PEER_PASSWORD_<n>")
    args = ap.parse_args(argv)
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    # One thread per client instead of the default single one: with it, four cameras opening at once took
    # about 4 s each (every DESCRIBE/SETUP waited behind the others' media preparation).
    server.get_thread_pool().set_max_threads(64)
    mounts = server.get_mount_points()
    caps = "application/x-rtp,media=video,clock-rate=90000,encoding-name=H264,payload=96"
    protected = dict(spec.split("=", 1) for spec in args.auth)
    if protected:
        # Server-wide auth: a default token lets anonymous clients into the open mounts; each protected
        # mount admits only its own user's role.
        auth = GstRtspServer.RTSPAuth()
        anonymous = GstRtspServer.RTSPToken()
        anonymous.set_string("media.factory.role", "anonymous")
        auth.set_default_token(anonymous)
        for path, user in protected.items():
            password = os.environ[f"RTSP_PEER_PASSWORD_{path.removeprefix('/cam')}"]
            token = GstRtspServer.RTSPToken()
            token.set_string("media.factory.role", f"role-{user}")
            auth.add_digest(user, password, token)
        # Digest, as most cameras ask (through GI the method flags cannot be combined with Basic).
        auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
        server.set_auth(auth)
    for spec in args.mount:
        path, udp = spec.split("=", 1)
        factory = GstRtspServer.RTSPMediaFactory()
        if protected:
            # Anonymous clients may see a protected mount but not construct it: the construct check is what
            # answers 401 with a challenge (a failed access check answers 404, hiding the mount).
            roles = [f"role-{protected[path]}, media.factory.access=(boolean)true, "
                     "media.factory.construct=(boolean)true",
                     "anonymous, media.factory.access=(boolean)true, media.factory.construct=(boolean)false"] \
                if path in protected else \
                ["anonymous, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"]
            for role in roles:
                factory.add_role_from_structure(Gst.Structure.from_string(role)[0])
        # No h264parse in between: with it every IDR came out twice. config-interval=1 repeats SPS/PPS
        # before each IDR, as cameras do, so a client joining mid-stream decodes from the next keyframe.
        factory.set_launch(f'( udpsrc address=127.0.0.1 port={int(udp)} caps="{caps}" '
                           f'! rtph264depay ! rtph264pay name=pay0 pt=96 config-interval=1 )')
        # Not shared: with one shared pipeline, a client connecting while the previous one's pipeline was
        # still being torn down got "503 Service Unavailable" about every other time. Hence one client per
        # mount at a time (a second one's udpsrc would share the port and take part of the packets).
        factory.set_shared(False)
        mounts.add_factory(path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 2
    print(f"PORT {server.get_bound_port()}", flush=True)
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)
    loop.run()
    return 0


def main(argv: list[str]) -> int:  # pragma: no cover
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    if argv[:1] == ["clips"]:
        print(busy_clip())
        print(quiet_clip())
        return 0
    print("usage: rtsp_peer.py serve --port 0 --mount /cam0=UDPPORT ... | clips", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
