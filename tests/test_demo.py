"""The README's first command: the demo runs the real daemon end to end and exits cleanly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.peers import Amqtt, Collector, Mosquitto


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeagent", "demo", *args], capture_output=True, text=True,
                          timeout=90, env={"COLUMNS": "200", "PATH": "/usr/sbin:/usr/bin:/bin"})


def test_demo_with_its_private_broker_shows_events_and_commands() -> None:
    r = run_demo("--seconds", "14")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "gateway.started" in out and "sensor.reading" in out
    # The Modbus part: the platform opens the gate for a visitor, and an overheating charging port is cut.
    assert re.search(r"gate\.commanded\s+car-gate\s+command=open reason=visitor by=platform via=cloud "
                     r"outcome=executed", out), out[-3000:]
    assert "gate.opened" in out
    # The car gate's camera: the resident's plate opens the gate by itself; the visitor's is announced.
    assert re.search(r"gate\.commanded\s+car-gate\s+command=open reason=plate_match by=rule:plate:cam-gate#\d+ "
                     r"via=local outcome=executed", out), out[-3000:]
    assert re.search(r"gate\.visitor\s+cam-gate\s+plate=苏E5A2B8 .*reason=not_in_list", out), out[-3000:]
    # The lift's camera: the e-bike holds the door (relay) and raises an alarm about the lift car.
    assert re.search(r"alarm\.raised\s+cam-lift2\s+alarm_id=\w+ kind=ebike_in_lift", out)
    assert "lift 2 → door hold relay ON" in out
    assert re.search(r"alarm\s+charger\.port\.cutoff\s+shed-a-charger\s+port=3 reason=over_temperature", out)
    # Wristbands: an SOS (pressed three times: one alarm) and a fall sound the siren; the guard
    # acknowledges both from the CLI and the siren goes off.
    assert re.search(r"alarm\.raised\s+c0ffee000012\s+alarm_id=\w+ kind=sos", out)
    assert re.search(r"alarm\.raised\s+c0ffee000031\s+alarm_id=\w+ kind=fall", out)
    assert re.search(r"alarm\.acknowledged\s+c0ffee000012\s+.*count=3 .*by=guard Li via=cli", out)
    assert "guard room → siren is on" in out and "guard room → siren is off" in out
    assert re.search(r"command cmd-\w+: executed", out)
    assert "rejected (replay)" in out
    accepted = re.search(r"summary: accepted (.*)", out)
    received = re.search(r"the platform received (.*)", out)
    assert accepted and received and accepted.group(1) == received.group(1), out[-500:]
    assert "Traceback" not in r.stderr


def test_demo_forwards_to_a_given_broker(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "b") as broker:
        col = Collector(broker.port, topic="edgeagent/v1/demo-site/demo-gw/#").start()
        try:
            r = run_demo("--seconds", "5", "--broker", broker.url)
            assert r.returncode == 0, r.stderr
            assert col.wait_for(lambda c: any(e["type"] == "gateway.stopped" for e in c.events), 10)
            types = {e["type"] for e in col.events}
            assert {"gateway.started", "sensor.reading", "gateway.stopped"} <= types
        finally:
            col.stop()


def test_demo_forwards_to_a_broker_that_speaks_only_mqtt311(tmp_path: Path) -> None:
    """amqtt leaves an MQTT 5 CONNECT unanswered: the simulated platform and the gateway fall back to
    3.1.1 (before: the demo crashed on an assert, its platform had no fallback)."""
    with Amqtt(tmp_path / "amqtt") as broker:
        col = Collector(broker.port, topic="edgeagent/v1/demo-site/demo-gw/#", mqtt311=True).start()
        try:
            r = run_demo("--seconds", "12", "--broker", broker.url)
            assert r.returncode == 0, r.stderr
            assert "Traceback" not in r.stderr and "AssertionError" not in r.stdout + r.stderr, r.stderr[-3000:]
            assert col.wait_for(lambda c: any(e["type"] == "gateway.stopped" for e in c.events), 10)
            assert {"gateway.started", "gate.commanded"} <= {e["type"] for e in col.events}
            # The platform's signed commands went through a 3.1.1 broker and were answered.
            assert re.search(r"command cmd-\w+: executed", r.stdout), r.stdout[-3000:]
        finally:
            col.stop()
