"""Camera figures on ``/metrics``: read from the running streams and pipelines when Prometheus scrapes, so
nothing is counted twice and a removed camera leaves no stale series."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# (metric suffix, help, where in a camera's status, counter?)
_FIGURES: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    ("online", "1 while the camera's stream delivers frames", ("online",), False),
    ("fps_in", "Frames per second arriving from the camera", ("stream", "fps_in"), False),
    ("frames_decoded", "Frames decoded", ("stream", "decoded"), True),
    ("frames_skipped", "Frames not decoded to images (above the detection rate)", ("stream", "skipped"), True),
    ("frames_dropped", "Decoded frames dropped because the pipeline was busy", ("stream", "dropped"), True),
    ("reconnects", "Stream reconnections", ("stream", "reconnects"), True),
    ("reconnects_last_hour", "Stream reconnections in the last hour", ("stream", "reconnects_last_hour"), False),
    ("freezes", "Frozen streams detected (no frame for frozen_after_s) and reopened", ("stream", "freezes"), True),
    ("last_frame_age_seconds", "Age of the newest frame", ("stream", "last_frame_age_s"), False),
    ("detector_runs", "Detector runs (motion-gated)", ("pipeline", "detector_runs"), True),
    ("detection_skipped_busy", "Detection ticks skipped: the shared engine was full",
     ("pipeline", "skipped_busy"), True),
    ("quiet_ticks", "Detection ticks with nothing to look at (no inference)", ("pipeline", "quiet_ticks"), True),
    ("detector_latency_p99_ms", "Detector latency p99 (recent)", ("pipeline", "detector_ms_p99"), False),
    ("frame_to_event_p99_ms", "Frame to durable event p99 (recent)", ("pipeline", "frame_to_event_ms_p99"), False),
    ("tracks", "Live tracks", ("pipeline", "tracks"), False),
)


def _dig(status: Mapping[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = status
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    if isinstance(node, bool):
        return 1.0 if node else 0.0
    return float(node) if isinstance(node, int | float) else None


class CameraCollector(Collector):
    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        st = self._status()
        cams: Mapping[str, Any] = st.get("cameras") or {}
        for suffix, help_text, path, counter in _FIGURES:
            name = f"edgeagent_camera_{suffix}"
            family: Any = (CounterMetricFamily(name, help_text, labels=["camera"]) if counter
                           else GaugeMetricFamily(name, help_text, labels=["camera"]))
            for cid, cam in sorted(cams.items()):
                value = _dig(cam, path)
                if value is not None:
                    family.add_metric([cid], value)
            yield family
        engine: Mapping[str, Any] = st.get("engine") or {}
        for key, help_text in (("refused", "Inference requests refused (queue full)"),
                               ("timeouts", "Inferences the watchdog gave up on"),
                               ("restarts", "Inference worker restarts")):
            value = engine.get(key)
            if isinstance(value, int | float):
                c = CounterMetricFamily(f"edgeagent_inference_{key}", help_text)
                c.add_metric([], float(value))
                yield c
        depth = engine.get("queue_depth")
        if isinstance(depth, int | float):
            g = GaugeMetricFamily("edgeagent_inference_queue_depth", "Inference requests waiting")
            g.add_metric([], float(depth))
            yield g
