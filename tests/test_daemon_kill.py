"""The daemon SIGKILLed at random moments: every event it accepted still reaches the cloud."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson

from tests.peers import Collector, Mosquitto


def write_config(path: Path, state: Path, broker_url: str, **devices: float) -> None:
    path.write_text(f"""\
version: 1
site_id: site-1
gateway_id: gw-1
state_dir: {state}
clock: {{sync: synced}}
log_level: warning
uplink:
  broker: {broker_url}
  retry: {{first_max_s: 0.1, short_cap_s: 0.3}}
  flush_on_stop_s: 5
health: {{port: 0}}
devices:
  - {{type: sim.contact, id: door-1, mean_interval_s: {devices.get("contact", 0.003)}}}
  - {{type: sim.panic, id: btn-1, mean_interval_s: {devices.get("panic", 0.05)}}}
""")


class DaemonProcess:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.accepted: list[dict[str, object]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "run", "--config", str(self.config), "--echo-events"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                self.accepted.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                # A line cut by SIGKILL was never fully reported: not counted as accepted.
                continue

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        assert self._reader is not None
        self._reader.join(5)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(30)
        assert self._reader is not None
        self._reader.join(5)
        return rc


def test_sigkill_20_times_loses_no_accepted_event(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    col = Collector(broker.port).start()
    cfg = tmp_path / "edgeagent.yaml"
    write_config(cfg, tmp_path / "state", broker.url)
    daemon = DaemonProcess(cfg)
    rng = random.Random(11)
    try:
        for _ in range(20):
            before = len(daemon.accepted)
            daemon.start()
            # Kill at a random moment while it is producing (start-up alone takes ~0.5 s).
            deadline = time.monotonic() + 20
            while len(daemon.accepted) == before and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.8))
            daemon.kill()
        before = len(daemon.accepted)
        daemon.start()
        # An orderly stop of a running daemon: wait until it is up (start-up is slow on a busy machine).
        deadline = time.monotonic() + 30
        while len(daemon.accepted) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        rc = daemon.terminate()
        assert rc == 0
        accepted = {str(e["id"]): int(e["seq"]) for e in daemon.accepted}  # type: ignore[call-overload]
        assert len(accepted) > 1000, f"only {len(accepted)} events were produced"

        def all_arrived(c: Collector) -> bool:
            return accepted.keys() <= {str(e["id"]) for e in c.events}

        assert col.wait_for(all_arrived, timeout_s=30), (
            f"{len(accepted.keys() - {str(e['id']) for e in col.events})} accepted events never arrived")
        # seq is gap-free across all the restarts: everything accepted and started/stopped reports.
        seqs = sorted({int(e["seq"]) for e in col.events})  # type: ignore[call-overload]
        assert seqs == list(range(1, seqs[-1] + 1))
        starts = {str(e["id"]) for e in col.events if e["type"] == "gateway.started"}
        assert len(starts) == 21, "a run's gateway.started never arrived"
        last_status = [json.loads(p) for t, p, r in col.messages if t.endswith("/status")][-1]
        assert last_status["state"] == "offline" and last_status["reason"] == "shutdown"
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
        col.stop()
        broker.stop()
