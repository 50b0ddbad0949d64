"""The shared inference engine: one worker for every camera, off the event loop, a bounded queue, batching,
and a watchdog that restarts a stuck inference.

Shape::

    camera tasks ──infer()──► pending deque (bounded) ──► dispatcher thread ══socket══► worker PROCESS
         ▲   (EngineBusy at once when full)                 │  watchdog: no answer        onnxruntime sessions,
         └──────── future settled on the loop ◄─────────────┘  in time → kill, restart    preprocess, decode

Why a process and not a thread. A stuck inference is a native onnxruntime call (a pathological input, a
driver hang in an execution provider, a model with a runaway Loop): a thread running it cannot be
interrupted, so the only watchdog a thread allows is "give up waiting and leak the thread with its cores".
A process can be killed and restarted; the requests it held fail with :class:`InferenceTimeout` and the next
ones run on a fresh worker. The price is the hop: images go over a socket pair pickled with protocol 5, their
pixel buffers out of band (no copy into the pickle), and detections come back. Measured on the 2-core
development box (NanoDet, 2 threads, other work running beside it; paired runs, medians): a whole 768x576
frame took 0.9-3.6 ms longer through the worker than preprocess + run + decode in-process (~23 ms), a 416x416
crop 0.5-1.7 ms longer; the camera process spends 0.6-1.4 ms of CPU per request (loop, dispatcher thread,
pickling). Preprocessing and decoding run in the worker too, so the camera process only ships uint8 pixels
and gets small detection lists back. The worker is started as ``python -c`` on a socket pair (see
:class:`_Worker` for why not multiprocessing's spawn); start to ready takes ~0.5 s, each model loads on its
first request (NanoDet ~0.3 s), and a worker holding NanoDet has ~180 MB resident.

Queue policy: at most ``queue_size`` requests wait; a request beyond that is refused at once with
:class:`EngineBusy` and counted (``refused``). Frames are perishable: the caller skips this detection tick
rather than queueing stale work. A request is one call of :meth:`InferenceEngine.infer` (all the regions of
one frame), however many images it holds.

Staleness: a request may say how long it is worth waiting (``max_wait_s``: the camera pipeline's detection
ticks pass 0.3 s, a bit more than one tick at 5 fps). When its turn comes later than that, it is not run: it
fails with :class:`EngineBusy` and is counted (``stale``, per camera too), and the worker's time goes to
requests that are still current. A queue bound alone does not do this: with one request per camera and as
many cameras as places in the queue, nothing is ever refused while every answer comes 250-400 ms late (the
benchmark at 8 cameras). Requests without ``max_wait_s`` wait as long as the queue makes them.

Batching: requests for the same model waiting together are sent as one batch when the manifest's
``max_batch`` is above 1 (up to ``max_batch`` images); a model with ``max_batch: 1`` gets one request per
round trip so one camera's request never waits behind another's. Measured on this 2-core CPU (2 threads),
batching pays only for small inputs: per 416x416 crop, CenterFace 13.0-13.7 ms one by one against
13.8-14.3 ms in a batch of 4, the plate detector 7.1-7.4 against 6.9-7.2 ms (no gain: the cores are already
busy); per 160x160 crop 2.0-2.3 against 1.9 ms (CenterFace, batch of 8) and 1.5-1.6 against 1.1 ms (plate
detector). NanoDet's file has its batch axis fixed at 1 and cannot batch. Grouping still saves a round trip
per request and pays more on accelerators.

Watchdog: the dispatcher waits for each answer at most ``stuck_after_s`` per chunk of ``max_batch`` images
(plus ``load_timeout_s`` when the worker loads the model for that request first: sessions are created on
first use, so models no camera uses cost no memory). Past that the worker is killed and restarted
(``restarts``), the requests in flight fail with :class:`InferenceTimeout` (``timeouts``). A worker that dies
(a crash in native code) is restarted the same way; its requests fail with :class:`InferenceError`.

Idle onnxruntime threads do not spin-wait for the next run (its default): at 5 NanoDet runs a second that
spinning doubled the CPU per run (~70 against ~36 ms) on this box, CPU the cameras' decoding needs.

Execution providers: ``cpu`` (default), ``auto`` (the first present of TensorRT, CUDA, ROCm, MIGraphX,
OpenVINO, CoreML, DirectML, QNN, with CPU as fallback for unsupported nodes), or a provider's name (``cuda``
or ``CUDAExecutionProvider``). An unknown name is a :class:`ModelError` at construction, a provider this
onnxruntime build lacks one at start (:meth:`__aenter__`), naming the ones it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from types import TracebackType
from typing import Any, Final

import numpy as np

from edgeagent.models.manifest import ImageInput, ModelManifest, TensorInput, verify
from edgeagent.models.types import Box, Detection, EngineBusy, InferenceError, InferenceTimeout, ModelError

__all__ = ["PROVIDER_ALIASES", "InferenceEngine", "merge_region_detections", "resolve_providers"]

_log = logging.getLogger(__name__)

CPU: Final = "CPUExecutionProvider"
PROVIDER_ALIASES: Final[Mapping[str, str]] = {
    "cpu": CPU, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider", "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider",
    "directml": "DmlExecutionProvider", "dml": "DmlExecutionProvider", "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider", "acl": "ACLExecutionProvider", "armnn": "ArmNNExecutionProvider",
    "cann": "CANNExecutionProvider", "vitisai": "VitisAIExecutionProvider",
}
_AUTO_ORDER: Final = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                      "MIGraphXExecutionProvider", "OpenVINOExecutionProvider", "CoreMLExecutionProvider",
                      "DmlExecutionProvider", "QNNExecutionProvider")
_ONNX_TYPES: Final = {"float32": "tensor(float)", "int32": "tensor(int32)", "uint8": "tensor(uint8)"}
_LATENCY_WINDOW: Final = 512
START_TIMEOUT_S: Final = 60.0
RESTART_BACKOFF_S: Final = 5.0
# Region merge: a detection cut by a crop's inner edge is dropped when at least this share of it lies in a
# detection of the same label that is not cut (the same object seen whole from another region).
_CUT_CONTAINED: Final = 0.6
_EDGE_PX: Final = 2.0


def _check_provider_name(provider: str) -> str:
    if provider == "auto":
        return provider
    name = PROVIDER_ALIASES.get(provider.lower(), provider)
    if name not in PROVIDER_ALIASES.values() and not name.endswith("ExecutionProvider"):
        raise ModelError(f"unknown execution provider {provider!r}: use auto, "
                         f"{', '.join(sorted(set(PROVIDER_ALIASES)))} or an onnxruntime provider name")
    return name


def resolve_providers(provider: str, available: Sequence[str]) -> list[str]:
    """The onnxruntime provider list for a setting, given what this onnxruntime build has."""
    name = _check_provider_name(provider)
    if name == "auto":
        best = next((p for p in _AUTO_ORDER if p in available), None)
        return [best, CPU] if best is not None else [CPU]
    if name not in available:
        raise ModelError(f"execution provider {provider!r} ({name}) is not available in this onnxruntime "
                         f"(it has: {', '.join(available)}); install the onnxruntime build for it "
                         "(e.g. onnxruntime-gpu for CUDA) or set the provider to cpu or auto")
    return [name] if name == CPU else [name, CPU]


# --- the wire: pickle protocol 5, array buffers out of band ----------------------------------------------

def _send(conn: Connection, obj: object) -> None:
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    conn.send_bytes(struct.pack("!I", len(buffers)) + head)
    for buf in buffers:
        conn.send_bytes(buf.raw())


def _recv(conn: Connection) -> Any:
    first = conn.recv_bytes()
    (count,) = struct.unpack_from("!I", first)
    buffers = [conn.recv_bytes() for _ in range(count)]
    return pickle.loads(memoryview(first)[4:], buffers=buffers)  # noqa: S301  # our own worker, our own pipe


# --- the worker process ------------------------------------------------------------------------------------

class _Session:
    """One model in the worker: its onnxruntime session, checked against the manifest, and its decoder."""

    def __init__(self, manifest: ModelManifest, providers: list[str], threads: int) -> None:
        import onnxruntime as ort  # noqa: PLC0415 - the worker process only

        from edgeagent.models import registry  # noqa: PLC0415

        self.manifest = manifest
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # converted files warn about harmless things on every load
        # Idle intra-op threads spin-wait for the next run by default: measured on this 2-core box, NanoDet at
        # 5 runs a second cost ~70 ms of CPU per run spinning against ~36 ms not, for no latency gain.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # onnxruntime keeps a memory plan per input shape it has seen; a dynamic model run at every crop's own
        # size (the cameras' regions) grew the worker by ~17 MB over 100 shapes (a slope in the soak), and the
        # plans saved nothing measurable (NanoDet 416x416 and 256x192, with and without).
        opts.enable_mem_pattern = not (isinstance(manifest.input, ImageInput) and manifest.input.dynamic)
        try:
            self.session = ort.InferenceSession(str(manifest.path), opts, providers=providers)
        except Exception as exc:  # noqa: BLE001  # onnxruntime raises its own unexported types
            raise ModelError(f"{manifest.where}: onnxruntime cannot load {manifest.path.name}: {exc}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{manifest.where}: the model has {len(inputs)} inputs; the engine feeds one")
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._check_input(inputs[0].shape, inputs[0].type)
        self.decoder = registry.get_decoder(manifest.decoder)

    def _check_input(self, shape: list[Any], onnx_type: str) -> None:
        m = self.manifest
        spec = m.input
        want_type = _ONNX_TYPES[spec.dtype]
        problems = []
        if onnx_type != want_type:
            problems.append(f"it takes {onnx_type}, the manifest says {spec.dtype}")
        batch = shape[0] if shape else None
        if isinstance(batch, int) and m.max_batch > batch:
            problems.append(f"its batch axis is fixed at {batch}, the manifest says max_batch {m.max_batch}")
        if isinstance(spec, TensorInput):
            if len(shape) != len(spec.shape) + 1:
                problems.append(f"its input is {shape}, the manifest says a batch of {spec.shape}")
            else:
                for got, want in zip(shape[1:], spec.shape, strict=True):
                    if isinstance(got, int) and want not in (-1, got):
                        problems.append(f"its input is {shape}, the manifest says a batch of {spec.shape}")
                        break
        elif len(shape) != 4:
            problems.append(f"its input is {shape}, not an image batch")
        else:
            h, w, c = (shape[2], shape[3], shape[1]) if spec.layout == "NCHW" else (shape[1], shape[2], shape[3])
            if isinstance(c, int) and c != 3:
                problems.append(f"its input is {shape}: {c} channels where {spec.layout} puts 3")
            fixed = [d for d in (h, w) if isinstance(d, int)]
            if spec.dynamic and fixed:
                problems.append(f"its input is {shape} (fixed size), the manifest says dynamic")
            wrong_h = isinstance(h, int) and h != spec.height
            wrong_w = isinstance(w, int) and w != spec.width
            if not spec.dynamic and (wrong_h or wrong_w):
                problems.append(f"its input is {shape}, the manifest says {spec.width}x{spec.height}")
        if problems:
            raise ModelError(f"{m.where}: {m.path.name} does not match its manifest: {'; '.join(problems)}")

    def run(self, items: Sequence[np.ndarray], sizes: Sequence[tuple[int, int] | None] | None = None
            ) -> list[list[Detection]]:
        from edgeagent.models.preprocess import prepare  # noqa: PLC0415

        m = self.manifest
        out: list[list[Detection]] = []
        for start in range(0, len(items), m.max_batch):
            chunk = items[start:start + m.max_batch]
            tensor, meta = prepare(chunk, m, sizes[start:start + m.max_batch] if sizes is not None else None)
            raw = self.session.run(None, {self.input_name: tensor})
            found = self.decoder(dict(zip(self.output_names, raw, strict=True)), meta, m)
            if len(found) != len(chunk):
                raise ModelError(f"{m.where}: decoder {m.decoder!r} gave {len(found)} results for {len(chunk)} images")
            out.extend(found)
        return out


def _session(sessions: dict[str, _Session], failed: dict[str, str], manifests: dict[str, ModelManifest], model: str,
             providers: list[str], threads: int) -> _Session:
    """The model's session, created on first use; a model that failed to load fails the same way again."""
    if model in failed:
        raise ModelError(failed[model])
    session = sessions.get(model)
    if session is None:
        try:
            session = sessions[model] = _Session(manifests[model], providers, threads)
        except ModelError as exc:
            failed[model] = str(exc)
            raise
    return session


def _worker_main(conn: Connection, manifests: dict[str, ModelManifest], provider: str, threads: int) -> None:
    """The worker process: answers ("run", id, model, items, sizes) with ("ok", id, detections, ms) or ("fail",
    id, message) until ("stop",) or the pipe closes. ``sizes``: None, or the input size asked for per item."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent stops us in order
    import cv2  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415  # the worker's imports, not the camera process's

    cv2.setNumThreads(1)  # the sessions' threads use the cores; resizes are small
    try:
        providers = resolve_providers(provider, ort.get_available_providers())
    except ModelError as exc:
        _send(conn, ("load_error", str(exc)))
        return
    _send(conn, ("ready", providers))
    sessions: dict[str, _Session] = {}
    failed: dict[str, str] = {}
    while True:
        try:
            msg = _recv(conn)
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        _kind, batch_id, model, items, sizes = msg
        started = time.perf_counter()
        try:
            found = _session(sessions, failed, manifests, model, providers, threads).run(items, sizes)
        except Exception as exc:  # noqa: BLE001  # whatever one batch raises goes back to its callers
            _send(conn, ("fail", batch_id, f"{type(exc).__name__}: {exc}"))
            continue
        _send(conn, ("ok", batch_id, found, (time.perf_counter() - started) * 1000.0))


class _Worker:
    """The parent's handle on one worker process (used by the dispatcher thread, and at start).

    Started as ``python -c`` with one end of a socket pair rather than through multiprocessing's ``spawn``:
    spawn re-runs the parent's main script in the child (a script without a ``__main__`` guard, a benchmark,
    would start itself again), and this way nothing of the parent is imported but this module.
    """

    def __init__(self, manifests: dict[str, ModelManifest], provider: str, threads: int) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:
            self.process = subprocess.Popen(  # noqa: S603  # our own interpreter and module, no shell
                [sys.executable, "-c", f"from {__name__} import _worker_entry; _worker_entry({theirs.fileno()})"],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
        except OSError as exc:
            ours.close()
            raise ModelError(f"cannot start the inference worker: {exc}") from exc
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.loaded: set[str] = set()
        self.providers: list[str] = []
        try:
            _send(self.conn, (manifests, provider, threads))
        except OSError as exc:
            self.kill()
            raise ModelError(f"the inference worker exited while starting: {exc}") from exc

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_s: float) -> None:
        if not wait([self.conn], timeout_s):
            self.kill()
            raise ModelError(f"the inference worker did not start within {timeout_s:.0f} s")
        try:
            msg = _recv(self.conn)
        except (EOFError, OSError):
            code = self.kill()
            raise ModelError(f"the inference worker exited while starting (exit code {code})") from None
        if msg[0] != "ready":
            self.kill()
            raise ModelError(str(msg[1]))
        self.providers = list(msg[1])

    def kill(self) -> int | None:
        """Kill the process (if still there) and reap it; its exit code."""
        with contextlib.suppress(OSError):
            self.process.kill()
        code = self.reap(5.0)
        self.close()
        return code

    def stop(self, timeout_s: float = 2.0) -> None:
        with contextlib.suppress(OSError, ValueError):
            _send(self.conn, ("stop",))
        if self.reap(timeout_s) is None:
            self.kill()
        self.close()

    def reap(self, timeout_s: float) -> int | None:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()


def _worker_entry(fd: int) -> None:
    """The worker process's start: read its settings from the parent, then serve."""
    conn = Connection(fd)
    try:
        manifests, provider, threads = _recv(conn)
    except (EOFError, OSError):
        return
    _worker_main(conn, manifests, provider, threads)


# --- the engine (the camera process's side) -------------------------------------------------------------

@dataclass(slots=True, eq=False)
class _Request:
    model: str
    items: list[np.ndarray]
    future: asyncio.Future[list[list[Detection]]]
    loop: asyncio.AbstractEventLoop
    camera: str
    submitted: float
    max_wait_s: float | None = None
    sizes: list[tuple[int, int] | None] | None = None  # per item, for a dynamic model (InferenceEngine.infer)
    cancelled: bool = False


@dataclass(slots=True)
class _ModelStats:
    requests: int = 0
    images: int = 0
    batches: int = 0
    errors: int = 0
    timeouts: int = 0
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_WINDOW))
    compute_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_WINDOW))


@dataclass(slots=True)
class _CameraStats:
    requests: int = 0
    refused: int = 0
    stale: int = 0


def _pct(values: deque[float], q: float) -> float | None:
    return round(float(np.percentile(np.fromiter(values, dtype=np.float64), q)), 2) if values else None


class InferenceEngine:
    """One inference worker shared by every camera (see the module docstring for the policies).

    Use as ``async with InferenceEngine(manifests) as engine: await engine.infer("nanodet", [frame])``.
    Images are uint8 BGR ``HxWx3``; they must not be changed until :meth:`infer` returns.
    """

    def __init__(self, manifests: Mapping[str, ModelManifest], *, provider: str = "cpu", threads: int = 2,
                 queue_size: int = 8, stuck_after_s: float = 10.0, load_timeout_s: float = 30.0) -> None:
        if threads < 1 or queue_size < 1 or stuck_after_s <= 0 or load_timeout_s <= 0:
            raise ValueError("threads and queue_size must be at least 1, the timeouts more than 0")
        _check_provider_name(provider)
        self._manifests = dict(manifests)
        self._provider = provider
        self._threads = threads
        self._queue_size = queue_size
        self._stuck_after_s = stuck_after_s
        self._load_timeout_s = load_timeout_s
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._in_flight = 0
        self._stopping = False
        self._running = False
        self._worker: _Worker | None = None
        self._down_reason = ""
        self._retry_at = 0.0
        self._thread: threading.Thread | None = None
        self._wake_r: Connection | None = None
        self._wake_w: Connection | None = None
        self._batch_id = 0
        self._refused = 0
        self._stale = 0
        self._timeouts = 0
        self._restarts = 0
        self._crashes = 0
        self._models: dict[str, _ModelStats] = {name: _ModelStats() for name in self._manifests}
        self._cameras: dict[str, _CameraStats] = {}

    @property
    def models(self) -> Mapping[str, ModelManifest]:
        return self._manifests

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def __aenter__(self) -> InferenceEngine:
        if self._running:
            raise RuntimeError("the inference engine is already running")
        await asyncio.to_thread(self._verify_all)
        worker = await asyncio.to_thread(self._start_worker)
        self._worker = worker
        self._wake_r, self._wake_w = Pipe(duplex=False)
        self._stopping = False
        self._running = True
        self._thread = threading.Thread(target=self._dispatch, name="edgeagent-inference-dispatch", daemon=True)
        self._thread.start()
        _log.info("inference engine started (pid %s, providers %s, %d model(s))", worker.pid,
                  ",".join(worker.providers), len(self._manifests))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self._running:
            return
        self._running = False
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send_bytes(b"stop")
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        for conn in (self._wake_r, self._wake_w):
            if conn is not None:
                conn.close()
        self._wake_r = self._wake_w = None

    def _verify_all(self) -> None:
        for manifest in self._manifests.values():
            verify(manifest)

    def _start_worker(self) -> _Worker:
        worker = _Worker(self._manifests, self._provider, self._threads)
        worker.wait_ready(START_TIMEOUT_S)
        return worker

    # --- requests ------------------------------------------------------------------------------------------

    async def infer(self, model: str, images: Sequence[np.ndarray], *, camera: str = "",
                    max_wait_s: float | None = None,
                    sizes: Sequence[tuple[int, int] | None] | None = None) -> list[list[Detection]]:
        """Detections per image, in that image's pixels. Raises :class:`EngineBusy` at once when the queue is
        full, or when the request's turn came more than ``max_wait_s`` after it was made (stale, not run);
        :class:`InferenceTimeout` when the watchdog restarted the worker, :class:`InferenceError` for any other
        failure of this request; :class:`ModelError` for a model the engine was not given. ``sizes`` (a dynamic
        model only; None per image: as its manifest says) is the input size to run each image at."""
        manifest = self._manifests.get(model)
        if manifest is None:
            raise ModelError(f"no model {model!r} in this engine (it has: {', '.join(sorted(self._manifests))})")
        if not self._running:
            raise InferenceError("the inference engine is not running")
        items = list(images)
        _check_items(items, manifest)
        if not items:
            return []
        wanted = _check_sizes(sizes, len(items), manifest)
        loop = asyncio.get_running_loop()
        if max_wait_s is not None and max_wait_s <= 0:
            raise ValueError(f"max_wait_s must be positive, got {max_wait_s}")
        request = _Request(model, items, loop.create_future(), loop, camera, time.monotonic(), max_wait_s, wanted)
        with self._cond:
            cam = self._cameras.setdefault(camera, _CameraStats())
            cam.requests += 1
            if len(self._pending) >= self._queue_size:
                self._refused += 1
                cam.refused += 1
                raise EngineBusy(f"inference queue full ({len(self._pending)} waiting): {model} for "
                                 f"{camera or 'a caller'} refused; skip this tick")
            self._pending.append(request)
            self._cond.notify()
        try:
            return await request.future
        except asyncio.CancelledError:
            request.cancelled = True
            raise
        finally:
            # A failed request's error holds this frame (its traceback), the frame the request, the request
            # its future and the future the error: a cycle that kept the caller's images (a camera frame, ~2
            # MB) until the next full garbage collection. Without the request in the frame, reference counting
            # frees them as soon as the caller is done with the error.
            del request, items

    async def detect_regions(self, model: str, frame: np.ndarray, regions: Sequence[Box], *, camera: str = "",
                             max_wait_s: float | None = None, scale: float | None = None) -> list[Detection]:
        """Run ``model`` on each region of ``frame`` (clipped to it; empty ones skipped) in one request, map the
        detections to frame pixels and merge what several regions saw (:func:`merge_region_detections`).

        ``scale`` (a dynamic model; ignored by a fixed-size one): each region is run at its own size times
        ``scale`` (aspect kept, sides rounded to the model's ``multiple_of``) and never at more input pixels
        than the manifest's ``width`` x ``height``, so a region costs what its pixels cost. None: every region
        is fitted to the model as its manifest says (a whole frame is stretched, the way it was trained)."""
        if frame.ndim < 2:
            raise InferenceError(f"a frame must be HxWx3, not of shape {frame.shape}")
        fh, fw = frame.shape[:2]
        crops: list[np.ndarray] = []
        boxes: list[tuple[int, int, int, int]] = []
        for x1, y1, x2, y2 in regions:
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                continue
            ix1, iy1 = max(0, math.floor(x1)), max(0, math.floor(y1))
            ix2, iy2 = min(fw, math.ceil(x2)), min(fh, math.ceil(y2))
            if ix2 - ix1 < 2 or iy2 - iy1 < 2:
                continue
            crops.append(frame[iy1:iy2, ix1:ix2])
            boxes.append((ix1, iy1, ix2, iy2))
        if not crops:
            return []
        spec = self._manifests[model].input if model in self._manifests else None
        sizes: list[tuple[int, int] | None] | None = None
        if scale is not None and isinstance(spec, ImageInput) and spec.dynamic:
            sizes = [scaled_input(spec, c.shape[1], c.shape[0], scale) for c in crops]
        found = await self.infer(model, crops, camera=camera, max_wait_s=max_wait_s, sizes=sizes)
        per_region = [[d.shifted(bx[0], bx[1]) for d in dets] for dets, bx in zip(found, boxes, strict=True)]
        return merge_region_detections(per_region, boxes, fw, fh, self._manifests[model].thresholds.nms_iou)

    # --- the dispatcher thread ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        try:
            while True:
                group = self._next_group()
                if group is None:
                    break
                try:
                    self._run_group(group)
                finally:
                    with self._cond:
                        self._in_flight = 0
        finally:
            with self._cond:
                left = list(self._pending)
                self._pending.clear()
            for request in left:
                _settle(request, exc=InferenceError("the inference engine stopped"))
            if self._worker is not None:
                self._worker.stop()
                self._worker = None

    def _next_group(self) -> list[_Request] | None:
        with self._cond:
            while True:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                first = self._pending.popleft()
                if not first.cancelled and not self._stale_now(first):
                    break
                # Refused or cancelled: not held here (with its images) while waiting for the next request.
                del first
            group = [first]
            limit = self._manifests[first.model].max_batch
            total = len(first.items)
            if limit > 1 and total < limit:
                for request in list(self._pending):
                    if request.cancelled or self._stale_now(request):
                        with contextlib.suppress(ValueError):
                            self._pending.remove(request)
                        continue
                    if request.model == first.model and total + len(request.items) <= limit:
                        self._pending.remove(request)
                        group.append(request)
                        total += len(request.items)
            self._in_flight = len(group)
            return group

    def _stale_now(self, request: _Request) -> bool:
        """Under ``self._cond``: a request whose turn came too late is refused (settled, counted) here."""
        if request.max_wait_s is None:
            return False
        waited = time.monotonic() - request.submitted
        if waited <= request.max_wait_s:
            return False
        self._stale += 1
        self._cameras.setdefault(request.camera, _CameraStats()).stale += 1
        _settle(request, exc=EngineBusy(f"{request.model} for {request.camera or 'a caller'}: waited "
                                        f"{waited * 1000:.0f} ms, more than its {request.max_wait_s * 1000:.0f} ms: "
                                        "not run (stale); skip this tick"))
        return True

    def _run_group(self, group: list[_Request]) -> None:
        model = group[0].model
        worker = self._worker
        if worker is None:
            worker = self._restart(f"worker down ({self._down_reason})")
            if worker is None:
                self._fail(group, InferenceError(f"the inference worker is down: {self._down_reason}"))
                return
        manifest = self._manifests[model]
        items = [im for request in group for im in request.items]
        sizes: list[tuple[int, int] | None] | None = None
        if any(request.sizes is not None for request in group):
            sizes = [size for request in group
                     for size in (request.sizes if request.sizes is not None else [None] * len(request.items))]
        chunks = math.ceil(len(items) / manifest.max_batch)
        budget = self._stuck_after_s * chunks + (0.0 if model in worker.loaded else self._load_timeout_s)
        self._batch_id += 1
        batch_id = self._batch_id
        try:
            _send(worker.conn, ("run", batch_id, model, items, sizes))
        except (OSError, ValueError):
            self._lost_worker(group, "the inference worker died (its pipe broke)")
            return
        wake = self._wake_r
        waiting_on: list[Any] = [worker.conn] + ([wake] if wake is not None else [])
        ready = wait(waiting_on, budget)
        if wake is not None and wake in ready and worker.conn not in ready:
            self._fail(group, InferenceError("the inference engine stopped"))
            return
        if not ready:
            with self._cond:
                self._timeouts += len(group)
                self._models[model].timeouts += len(group)
            _log.warning("inference of %s stuck for %.1f s: killing the worker (pid %s) and starting another",
                         model, budget, worker.pid)
            self._worker = None
            worker.kill()
            self._fail(group, InferenceTimeout(f"{model}: no answer within {budget:.1f} s; the inference worker "
                                               "was restarted"))
            self._restart("stuck")
            return
        try:
            reply = _recv(worker.conn)
        except (EOFError, OSError):
            self._lost_worker(group, "the inference worker died")
            return
        if reply[0] == "ok" and reply[1] == batch_id:
            worker.loaded.add(model)
            self._succeed(group, reply[2], float(reply[3]))
        elif reply[0] == "fail" and reply[1] == batch_id:
            with self._cond:
                self._models[model].errors += len(group)
            self._fail(group, InferenceError(f"{model}: {reply[2]}"))
        else:
            self._lost_worker(group, f"the inference worker answered out of turn ({reply[0]!r})")

    def _lost_worker(self, group: list[_Request], what: str) -> None:
        worker = self._worker
        self._worker = None
        code = None
        if worker is not None:
            code = worker.reap(1.0)  # a dead worker has an exit code to report
            worker.kill()
        how = "still running" if code is None else f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        with self._cond:
            self._crashes += 1
            self._models[group[0].model].errors += len(group)
        _log.error("%s (%s) running %s; starting another", what, how, group[0].model)
        self._fail(group, InferenceError(f"{group[0].model}: {what} ({how}); it was restarted"))
        self._restart("died")

    def _restart(self, why: str) -> _Worker | None:
        now = time.monotonic()
        if now < self._retry_at:
            return None
        with self._cond:
            self._restarts += 1
        try:
            worker = self._start_worker()
        except ModelError as exc:
            self._down_reason = str(exc)
            self._retry_at = time.monotonic() + RESTART_BACKOFF_S
            _log.error("the inference worker cannot start (%s): %s; retrying in %.0f s", why, exc, RESTART_BACKOFF_S)
            return None
        self._worker = worker
        self._down_reason = ""
        return worker

    def _succeed(self, group: list[_Request], found: list[list[Detection]], compute_ms: float) -> None:
        now = time.monotonic()
        model = group[0].model
        with self._cond:
            self._in_flight = 0
            stats = self._models[model]
            stats.batches += 1
            stats.compute_ms.append(compute_ms)
            for request in group:
                stats.requests += 1
                stats.images += len(request.items)
                stats.latency_ms.append((now - request.submitted) * 1000.0)
        start = 0
        for request in group:
            n = len(request.items)
            _settle(request, result=found[start:start + n])
            start += n

    def _fail(self, group: list[_Request], exc: InferenceError) -> None:
        with self._cond:
            self._in_flight = 0
        for request in group:
            _settle(request, exc=exc)

    # --- figures --------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Queue depth, refusals, timeouts, restarts, and per model the request count and latency (end to end,
        queueing included; ``compute`` is the worker's own time for a batch)."""
        with self._cond:
            worker = self._worker
            return {
                "running": self._running,
                "worker_pid": worker.pid if worker is not None else None,
                "providers": list(worker.providers) if worker is not None else [],
                "queue_depth": len(self._pending),
                "queue_size": self._queue_size,
                "in_flight": self._in_flight,
                "refused": self._refused,
                "stale": self._stale,
                "timeouts": self._timeouts,
                "restarts": self._restarts,
                "crashes": self._crashes,
                "models": {
                    name: {"requests": s.requests, "images": s.images, "batches": s.batches, "errors": s.errors,
                           "timeouts": s.timeouts, "p50_ms": _pct(s.latency_ms, 50), "p99_ms": _pct(s.latency_ms, 99),
                           "compute_p50_ms": _pct(s.compute_ms, 50)}
                    for name, s in self._models.items() if s.requests or s.errors or s.timeouts},
                "cameras": {cam: {"requests": c.requests, "refused": c.refused, "stale": c.stale}
                            for cam, c in self._cameras.items()},
            }


def _settle(request: _Request, *, result: list[list[Detection]] | None = None,
            exc: BaseException | None = None) -> None:
    def apply() -> None:
        if request.future.done():
            return
        if exc is not None:
            request.future.set_exception(exc)
        else:
            request.future.set_result(result if result is not None else [])

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        request.loop.call_soon_threadsafe(apply)


def scaled_input(spec: ImageInput, w: int, h: int, scale: float) -> tuple[int, int]:
    """The input size for a ``w`` x ``h`` image run at ``scale`` on a dynamic model: each side times
    ``scale``, rounded to ``multiple_of``, shrunk (aspect kept) to at most the manifest's ``width`` x
    ``height`` pixels in all: a region never costs more than the model's nominal input."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale}")
    tw, th = w * scale, h * scale
    budget = spec.width * spec.height
    if tw * th > budget:
        shrink = math.sqrt(budget / (tw * th))
        tw, th = tw * shrink, th * shrink
    m = spec.multiple_of
    return max(m, round(tw / m) * m), max(m, round(th / m) * m)


def _check_sizes(sizes: Sequence[tuple[int, int] | None] | None, count: int, manifest: ModelManifest
                 ) -> list[tuple[int, int] | None] | None:
    if sizes is None:
        return None
    wanted = list(sizes)
    spec = manifest.input
    if len(wanted) != count:
        raise InferenceError(f"{len(wanted)} input sizes for {count} images")
    if not isinstance(spec, ImageInput) or not spec.dynamic:
        if any(size is not None for size in wanted):
            raise InferenceError(f"{manifest.name} takes one input size; it cannot be run at another")
        return None
    m = spec.multiple_of
    for size in wanted:
        if size is not None and (len(size) != 2 or any(not isinstance(v, int) or v < m or v % m or v > 8192
                                                       for v in size)):
            raise InferenceError(f"an input size must be two multiples of {m} (at most 8192), not {size}")
    return wanted


def _check_items(items: list[np.ndarray], manifest: ModelManifest) -> None:
    """Cheap checks on the loop, so one bad image fails its own request, not a whole batch in the worker."""
    for k, item in enumerate(items):
        if not isinstance(item, np.ndarray):
            raise InferenceError(f"item {k} is a {type(item).__name__}, not a numpy array")
        if isinstance(manifest.input, ImageInput):
            if item.dtype != np.uint8 or item.ndim not in (2, 3) or item.shape[0] < 1 or item.shape[1] < 1 or (
                    item.ndim == 3 and item.shape[2] not in (3, 4)):
                raise InferenceError(f"image {k}: expected uint8 HxWx3 (BGR), got {item.dtype} {item.shape}")
        elif item.ndim != len(manifest.input.shape):
            raise InferenceError(f"sample {k}: expected shape {manifest.input.shape}, got {item.shape}")


def _overlap(a: Box, b: Box) -> tuple[float, float, float]:
    """(intersection, area a, area b)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    return w * h, area_a, area_b


def merge_region_detections(per_region: Sequence[Sequence[Detection]], regions: Sequence[tuple[int, int, int, int]],
                            frame_w: int, frame_h: int, iou: float) -> list[Detection]:
    """Merge detections (already in frame pixels) that several overlapping regions found.

    A detection touching an inner edge of its region (an edge that is not the frame's) may show only part of
    an object that another region saw whole: such "cut" detections rank after whole ones. Then, per label,
    best first: a detection overlapping a kept one by more than ``iou`` is dropped (NMS), and a cut one mostly
    inside a kept one is dropped too.
    """
    ranked: list[tuple[bool, Detection]] = []
    for dets, (rx1, ry1, rx2, ry2) in zip(per_region, regions, strict=True):
        for d in dets:
            x1, y1, x2, y2 = d.box
            cut = ((rx1 > 0 and x1 - rx1 < _EDGE_PX) or (ry1 > 0 and y1 - ry1 < _EDGE_PX)
                   or (rx2 < frame_w and rx2 - x2 < _EDGE_PX) or (ry2 < frame_h and ry2 - y2 < _EDGE_PX))
            ranked.append((cut, d))
    ranked.sort(key=lambda cd: (cd[0], -cd[1].score))
    kept: list[tuple[bool, Detection]] = []
    for cut, d in ranked:
        duplicate = False
        for _kept_cut, k in kept:
            if k.label != d.label:
                continue
            inter, area_d, area_k = _overlap(d.box, k.box)
            union = area_d + area_k - inter
            if (union > 0 and inter / union > iou) or (cut and area_d > 0 and inter / area_d >= _CUT_CONTAINED):
                duplicate = True
                break
        if not duplicate:
            kept.append((cut, d))
    return [d for _cut, d in kept]
