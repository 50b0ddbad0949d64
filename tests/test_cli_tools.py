"""The operator tools: ``device add/list/remove``, ``events list/tail``, ``doctor`` and ``diagnose``."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeagent.capabilities import Config, load_config
from edgeagent.cli import devices
from edgeagent.cli.support import check_tls, scrub
from edgeagent.kernel.errors import DeviceUnavailable
from edgeagent.kernel.pipeline.event_types import REGISTRY
from edgeagent.kernel.pipeline.events import Event, EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from edgeagent.kernel.runtime.clock import Clock
from tests.helpers import cli, starter_config

SECRET = "S3cret-Planted-9f2c-xyzzy"
USER_COMMENT = "# site note from the installer: keep me exactly as I am"
EOF_COMMENT = "# end-of-file note: also keep me"


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return starter_config(tmp_path)


@pytest.fixture
def commented_cfg(cfg: Path) -> Path:
    """The starter config with comments of the installer's own, one inline, one at the very end."""
    text = cfg.read_text()
    assert "log_level: info\n" in text and "  keepalive_s: 30\n" in text
    text = text.replace("log_level: info\n", f"log_level: info\n{USER_COMMENT}\n")
    text = text.replace("  keepalive_s: 30\n", "  keepalive_s: 30   # tuned on site\n")
    cfg.write_text(text + EOF_COMMENT + "\n")
    cfg.chmod(0o640)
    return cfg


# --- device add / list / remove ---------------------------------------------------------------------

def test_device_add_list_remove_keep_everything_but_the_devices_block(commented_cfg: Path) -> None:
    original = commented_cfg.read_text()
    lines = original.splitlines()
    at = lines.index("devices: []")

    r = cli("device", "add", "sim.sensor", "--id", "t1", "--name", "Boiler room",
            "--set", "interval_s=2.5", "--set", "amplitude=0", "--config", commented_cfg)
    assert r.exit_code == 0, r.output
    assert "added" in r.stdout and "t1" in r.stdout
    r = cli("device", "add", "sim.contact", "--id", "door-1", "--set", "contact=1", "-c", commented_cfg)
    assert r.exit_code == 0, r.output

    new_lines = commented_cfg.read_text().splitlines()
    assert new_lines[:at] == lines[:at]  # every line before the block, byte for byte
    assert new_lines[at:] == [
        "devices:",
        "  - type: sim.sensor",
        "    id: t1",
        "    name: Boiler room",
        "    interval_s: 2.5",
        "    amplitude: 0",
        "  - type: sim.contact",
        "    id: door-1",
        "    contact: '1'",  # a text setting keeps the text it was given
        EOF_COMMENT,
    ]
    assert USER_COMMENT in new_lines and "  keepalive_s: 30   # tuned on site" in new_lines
    assert commented_cfg.stat().st_mode & 0o777 == 0o640

    loaded = load_config(commented_cfg)
    assert [(d.id, d.type) for d in loaded.devices] == [("t1", "sim.sensor"), ("door-1", "sim.contact")]
    assert loaded.devices[0].interval_s == 2.5  # type: ignore[union-attr]

    r = cli("device", "list", "--json", "-c", commented_cfg)
    assert r.exit_code == 0
    listed = json.loads(r.stdout)
    assert [d["id"] for d in listed] == ["t1", "door-1"]
    assert listed[0]["name"] == "Boiler room" and listed[1]["contact"] == "1"
    r = cli("device", "list", "-c", commented_cfg)
    assert "door-1" in r.stdout and "sim.sensor" in r.stdout

    r = cli("device", "remove", "t1", "-c", commented_cfg)
    assert r.exit_code == 0, r.output
    assert "removed" in r.stdout
    assert [d.id for d in load_config(commented_cfg).devices] == ["door-1"]
    r = cli("device", "remove", "door-1", "-c", commented_cfg)
    assert r.exit_code == 0, r.output
    assert commented_cfg.read_text() == original  # back to the very same bytes
    assert commented_cfg.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in commented_cfg.parent.iterdir()) == ["c.yaml"]  # no temp files left


@pytest.mark.parametrize(("setting", "words"), [
    ("interval_s=abc", ["devices[0].interval_s", "number"]),
    ("colour=red", ["devices[0].colour", "unknown key"]),
    ("amplitude=-1", ["devices[0].amplitude", "at least 0"]),
])
def test_bad_setting_leaves_the_file_untouched_and_names_the_key(
        commented_cfg: Path, setting: str, words: list[str]) -> None:
    before = commented_cfg.read_bytes()
    r = cli("device", "add", "sim.sensor", "--id", "t1", "--set", setting, "-c", commented_cfg)
    assert r.exit_code == 1
    for word in words:
        assert word in r.stderr
    assert "left unchanged" in r.stderr
    assert f"{commented_cfg}:" in r.stderr  # located: file:line:column
    assert commented_cfg.read_bytes() == before
    assert sorted(p.name for p in commented_cfg.parent.iterdir()) == ["c.yaml"]


def test_duplicate_id_and_unknown_type_are_refused(commented_cfg: Path) -> None:
    assert cli("device", "add", "sim.panic", "--id", "p1", "-c", commented_cfg).exit_code == 0
    after_first = commented_cfg.read_bytes()
    r = cli("device", "add", "sim.sensor", "--id", "p1", "-c", commented_cfg)
    assert r.exit_code == 1
    assert "'p1'" in r.stderr and "already" in r.stderr
    assert commented_cfg.read_bytes() == after_first

    r = cli("device", "add", "sim.teapot", "--id", "x", "-c", commented_cfg)
    assert r.exit_code == 1
    assert "sim.teapot" in r.stderr
    for known in ("sim.contact", "sim.panic", "sim.sensor"):
        assert known in r.stderr
    r = cli("device", "remove", "nope", "-c", commented_cfg)
    assert r.exit_code == 1 and "p1" in r.stderr
    assert commented_cfg.read_bytes() == after_first


def test_set_values_are_yaml_scalars(cfg: Path) -> None:
    r = cli("device", "add", "sim.contact", "--id", "c1", "--set", "enabled=false",
            "--set", "mean_interval_s=1e1", "-c", cfg)
    assert r.exit_code == 0, r.output
    dev = load_config(cfg).devices[0]
    assert dev.enabled is False
    assert dev.mean_interval_s == 10.0  # type: ignore[union-attr]


def test_comments_between_devices_stay_in_place(cfg: Path) -> None:
    text = cfg.read_text().replace("devices: []\n", (
        "devices:\n"
        "  - type: sim.sensor\n"
        "    id: a\n"
        "  # the gate contact, fitted 2026\n"
        "  - type: sim.contact\n"
        "    id: b\n"
        "# after the list\n"))
    cfg.write_text(text)
    assert cli("device", "add", "sim.panic", "--id", "c", "-c", cfg).exit_code == 0
    tail = cfg.read_text().split("devices:\n")[1]
    assert tail.endswith("    id: c\n# after the list\n")
    assert cli("device", "remove", "a", "-c", cfg).exit_code == 0
    assert cli("device", "remove", "c", "-c", cfg).exit_code == 0
    tail = cfg.read_text().split("devices:\n")[1]
    assert "# the gate contact, fitted 2026\n" in tail
    assert tail.index("# the gate contact") < tail.index("id: b") < tail.index("# after the list")


# --- events list / tail -----------------------------------------------------------------------------

def _events(now: float) -> list[Event]:
    """Three hours ago: a reading; now: door open/closed, a panic and a reading."""
    old = EventFactory(REGISTRY, "s1", "g1", Clock(mode="synced", wall=lambda: now - 3 * 3600))
    new = EventFactory(REGISTRY, "s1", "g1", Clock(mode="synced", wall=lambda: now))
    return [
        old.make("sensor.reading", "t1", {"metric": "temperature", "value": 21.5, "unit": "degC"}),
        new.make("contact.changed", "door-1", {"state": "open", "contact": "door"}),
        new.make("contact.changed", "door-1", {"state": "closed", "contact": "door"}),
        new.make("panic.pressed", "p1", {"location": "guard-room"}),
        new.make("contact.changed", "gate-2", {"state": "open", "contact": "gate"}),
    ]


def _outbox(cfg: Path) -> Outbox:
    return Outbox(OutboxConfig(path=load_config(cfg).state_dir / "outbox.db"))


async def _fill(cfg: Path) -> None:
    async with _outbox(cfg) as ob:
        await ob.put_many(_events(time.time()))
        batch = await ob.lease(10, 1 << 20)  # the panic alarm leaves first: mark it sent
        assert batch is not None and len(batch) == 1
        await ob.ack_nowait(batch)
        await ob.flush()


@pytest.fixture
def filled(cfg: Path) -> Path:
    asyncio.run(_fill(cfg))
    return cfg


def _list(cfg: Path, *args: str) -> list[dict[str, Any]]:
    r = cli("events", "list", "--json", "-c", cfg, *args)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert isinstance(data, list)
    return data


def test_events_list_filters_and_json(filled: Path) -> None:
    every = _list(filled)
    assert [e["seq"] for e in every] == [1, 2, 3, 4, 5]
    assert {e["type"] for e in every} == {"sensor.reading", "contact.changed", "panic.pressed"}
    panic = next(e for e in every if e["type"] == "panic.pressed")
    assert panic["_sent_at"] is not None and panic["priority"] == "alarm"
    assert panic["site_id"] == "s1" and panic["data"] == {"location": "guard-room", "presses": 1}
    assert [e["seq"] for e in _list(filled, "--type", "contact")] == [2, 3, 5]
    assert _list(filled, "--type", "cont") == []  # whole dotted segments only
    assert [e["seq"] for e in _list(filled, "--type", "cont.", "--device", "door-1")] == []
    assert [e["seq"] for e in _list(filled, "--device", "door-1")] == [2, 3]
    assert [e["seq"] for e in _list(filled, "--unsent")] == [1, 2, 3, 5]
    assert [e["seq"] for e in _list(filled, "--since", "1h")] == [2, 3, 4, 5]
    assert [e["seq"] for e in _list(filled, "--since", "4h")] == [1, 2, 3, 4, 5]
    assert [e["seq"] for e in _list(filled, "--since", "2000-01-01T00:00:00Z")] == [1, 2, 3, 4, 5]
    assert _list(filled, "--since", "2999-01-01T00:00:00") == []
    assert [e["seq"] for e in _list(filled, "--limit", "2")] == [4, 5]

    r = cli("events", "list", "-c", filled, "--since", "yesterday-ish")
    assert r.exit_code == 2 and "--since" in r.output

    r = cli("events", "list", "-c", filled)
    assert r.exit_code == 0, r.output
    assert "contact.changed" in r.stdout and "unsent" in r.stdout and "state=open" in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 100


def test_events_list_reads_without_creating_files(filled: Path) -> None:
    state = load_config(filled).state_dir
    before = sorted(p.name for p in state.iterdir())
    assert "outbox.db-wal" not in before and "outbox.db-shm" not in before  # stopped cleanly
    _list(filled)
    assert cli("events", "tail", "--max-seconds", "0", "-c", filled).exit_code == 0
    assert cli("doctor", "--json", "-c", filled).exit_code == 1
    # A -shm file made by root next to the database would lock out the daemon's own user.
    assert sorted(p.name for p in state.iterdir()) == before


def test_events_list_without_outbox(cfg: Path) -> None:
    r = cli("events", "list", "-c", cfg)
    assert r.exit_code == 1
    assert "no outbox yet" in r.stderr and "has the daemon run" in r.stderr


def test_events_tail_of_a_stopped_outbox(filled: Path) -> None:
    r = cli("events", "tail", "--json", "--from-seq", "2", "--max-seconds", "0", "-c", filled)
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["seq"] for line in r.stdout.splitlines()] == [2, 3, 4, 5]
    r = cli("events", "tail", "--json", "--max-seconds", "0", "-c", filled)  # only what comes next
    assert r.exit_code == 0 and r.stdout == ""
    r = cli("events", "tail", "--from-seq", "1", "--type", "panic", "--max-seconds", "0", "-c", filled)
    assert r.exit_code == 0
    assert "panic.pressed" in r.stdout and "contact.changed" not in r.stdout


async def test_events_tail_follows_a_running_outbox(filled: Path) -> None:
    async with _outbox(filled) as ob:  # the "daemon" holds the database open (WAL) throughout
        proc = subprocess.Popen(
            [sys.executable, "-c", "from edgeagent.cli import main; main()", "events", "tail", "--json",
             "--from-seq", "6", "--type", "contact", "--max-seconds", "5", "-c", str(filled)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            await asyncio.sleep(1.0)
            f = EventFactory(REGISTRY, "s1", "g1", Clock(mode="synced"))
            await ob.put(f.make("contact.changed", "door-9", {"state": "open", "contact": "door"}))
            await ob.put(f.make("panic.pressed", "p1", {"location": "lobby"}))
            await asyncio.sleep(1.0)
            await ob.put(f.make("contact.changed", "door-9", {"state": "closed", "contact": "door"}))
            out, err = await asyncio.to_thread(proc.communicate, timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [(e["seq"], e["device_id"], e["data"]["state"]) for e in got] == [
        (6, "door-9", "open"), (8, "door-9", "closed")]


def test_events_tail_stops_cleanly_on_ctrl_c(filled: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from edgeagent.cli import main; main()", "events", "tail", "--from-seq", "4",
         "-c", str(filled)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "panic.pressed" in proc.stdout.readline()  # flushed at once, even into a pipe
        assert "contact.changed" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "Traceback" not in err and "following" in err and out == ""


# --- doctor -----------------------------------------------------------------------------------------

def _checks(stdout: str) -> dict[str, dict[str, str]]:
    report = json.loads(stdout)
    return {c["check"]: c for c in report["checks"]}


def test_doctor_reports_a_closed_broker_port(cfg: Path) -> None:
    r = cli("doctor", "--json", "-c", cfg)
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert report["ok"] is False and report["summary"]["fail"] >= 1
    checks = _checks(r.stdout)
    assert checks["config"]["status"] == "ok"
    assert checks["broker"]["status"] == "fail"
    assert "127.0.0.1:1" in checks["broker"]["detail"]
    assert checks["outbox"]["status"] == "ok" and "none yet" in checks["outbox"]["detail"]
    assert checks["state dir"]["status"] == "ok"
    assert checks["disk space"]["status"] in ("ok", "warn")
    assert checks["clock"]["status"] in ("ok", "warn")
    assert checks["daemon"]["status"] == "warn"

    r = cli("doctor", "-c", cfg)
    assert r.exit_code == 1
    assert "broker" in r.stdout and "fail" in r.stdout


def test_doctor_checks_outbox_integrity_and_counts(filled: Path) -> None:
    checks = _checks(cli("doctor", "--json", "-c", filled).stdout)
    assert checks["outbox"]["status"] == "ok"
    assert "integrity ok" in checks["outbox"]["detail"]
    assert "alarm 0, event 3, telemetry 1" in checks["outbox"]["detail"]

    db = load_config(filled).state_dir / "outbox.db"
    db.write_bytes(b"this is not a database" * 100)
    checks = _checks(cli("doctor", "--json", "-c", filled).stdout)
    assert checks["outbox"]["status"] == "fail"


def test_doctor_with_a_broken_config(cfg: Path) -> None:
    cfg.write_text(cfg.read_text().replace("keepalive_s: 30", "keepalive_s: 0"))
    r = cli("doctor", "--json", "-c", cfg)
    assert r.exit_code == 1
    checks = _checks(r.stdout)
    assert checks["config"]["status"] == "fail" and "uplink.keepalive_s" in checks["config"]["detail"]


# --- diagnose ---------------------------------------------------------------------------------------

class _FakeDaemon(BaseHTTPRequestHandler):
    """/healthz and a /status whose last error (wrongly) quotes the password."""

    def do_GET(self) -> None:
        if self.path == "/healthz":
            body: dict[str, Any] = {"ok": True, "detail": "ok"}
        elif self.path == "/status":
            body = {"version": "test", "uplink": {"state": "backoff",
                                                  "last_error": f"broker said: bad password {SECRET!r}"}}
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_daemon(cfg: Path) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeDaemon)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    state = load_config(cfg).state_dir
    state.mkdir(parents=True, exist_ok=True)
    runtime = {"pid": os.getpid(), "started_at": "x", "health_url": url}
    (state / "runtime.json").write_text(json.dumps(runtime))
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


def _with_password(cfg: Path) -> None:
    secret_file = cfg.parent / "mqtt-password"
    secret_file.write_text(SECRET + "\n")
    text = cfg.read_text()
    assert "  # password: {credential: mqtt-password}\n" in text
    text = text.replace("  # username: g1\n", "  username: g1\n")
    text = text.replace("  # password: {credential: mqtt-password}\n",
                        f"  password: {{file: {secret_file}}}\n")
    cfg.write_text(text)


MEMBERS = {"config.redacted.json", "versions.json", "doctor.json", "status.json", "outbox.json",
           "journal.txt"}


def test_diagnose_archive_holds_no_secret(filled: Path, fake_daemon: str, tmp_path: Path) -> None:
    _with_password(filled)
    # Plant the secret where collection does pick it up: a device's name ends up in the config dump.
    assert cli("device", "add", "sim.panic", "--id", "p9", "--name", SECRET, "-c", filled).exit_code == 0
    out = tmp_path / "diag.tar.gz"
    r = cli("diagnose", "-c", filled, "-o", out)
    assert r.exit_code == 0, r.output
    assert str(out) in r.stdout.replace("\n", "")

    with tarfile.open(out) as tar:
        assert set(tar.getnames()) == MEMBERS
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    needles = [SECRET.encode(), json.dumps(SECRET).encode()[1:-1], SECRET[:16].encode()]
    for name, data in files.items():
        for needle in needles:
            assert needle not in data, f"secret found in {name}"
    with tarfile.open(out) as tar, tar.extractfile("status.json") as fh:  # type: ignore[union-attr]
        assert fh.read() == files["status.json"]

    config = json.loads(files["config.redacted.json"])
    assert config["uplink"]["password"]["value"] == "<redacted>"
    assert config["devices"][0]["name"] == "<redacted>"  # the planted copy was scrubbed
    status = json.loads(files["status.json"])
    assert "<redacted>" in status["uplink"]["last_error"]
    doctor = {c["check"]: c for c in json.loads(files["doctor.json"])["checks"]}
    assert doctor["secret uplink.password"]["status"] == "ok"
    assert doctor["daemon"]["status"] == "ok"
    assert doctor["broker"]["status"] == "fail"
    versions = json.loads(files["versions.json"])
    assert versions["python"] and versions["edgeagent"]
    assert "cryptography" in versions["packages"] and "paho-mqtt" in versions["packages"]
    outbox = json.loads(files["outbox.json"])
    assert outbox["classes"]["event"]["unsent"] == 3 and outbox["classes"]["alarm"]["unsent"] == 0
    assert outbox["next_seq"] == 6 and outbox["classes"]["telemetry"]["oldest_unsent_created"]
    assert files["journal.txt"]


def test_diagnose_default_name_and_missing_daemon(cfg: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    r = cli("diagnose", "-c", cfg)
    assert r.exit_code == 0, r.output
    [archive] = list(work.iterdir())
    assert archive.name.startswith("edgeagent-diagnose-g1-") and archive.name.endswith("Z.tar.gz")
    assert archive.stat().st_mode & 0o777 == 0o600
    with tarfile.open(archive) as tar:
        assert set(tar.getnames()) == MEMBERS
        status = json.load(tar.extractfile("status.json"))  # type: ignore[arg-type]
        outbox = json.load(tar.extractfile("outbox.json"))  # type: ignore[arg-type]
    assert "error" in status and "error" in outbox


def test_scrub_catches_escaped_and_partial_forms() -> None:
    body = "MC4CAQAwBQYDK2VwBCIEIAbcdefghijklmnopqrstuvwxyz0123"
    pem = f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----"
    text = json.dumps({"a": 'pa"ss\\word', "b": f"line {body}"})
    out = scrub(text.encode(), ['pa"ss\\word', pem])
    assert b"word" not in out and b"MC4CAQ" not in out
    assert out.count(b"<redacted>") == 2


# --- device probes and TLS checks ---------------------------------------------------------------------

def test_device_add_runs_the_types_probe_before_writing(commented_cfg: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    def unreachable(dev: Any, _ctx: Any) -> str:
        seen.append(dev)
        raise DeviceUnavailable("no answer from 10.0.0.9:502 within 3 s")

    monkeypatch.setitem(devices.PROBES, "sim.contact", unreachable)
    before = commented_cfg.read_bytes()
    r = cli("device", "add", "sim.contact", "--id", "gate", "--set", "contact=gate", "-c", commented_cfg)
    assert r.exit_code == 1
    assert "no answer from 10.0.0.9:502" in r.stderr and "--no-probe" in r.stderr
    assert commented_cfg.read_bytes() == before
    assert [(d.id, d.contact) for d in seen] == [("gate", "gate")]  # the validated device config

    r = cli("device", "add", "sim.contact", "--id", "gate", "--no-probe", "-c", commented_cfg)
    assert r.exit_code == 0, r.output
    monkeypatch.setitem(devices.PROBES, "sim.panic", lambda dev, _ctx: "model XY-1, firmware 2.3")
    r = cli("device", "add", "sim.panic", "--id", "p2", "-c", commented_cfg)
    assert r.exit_code == 0 and "model XY-1" in r.stdout
    assert [d.id for d in load_config(commented_cfg).devices] == ["gate", "p2"]


def _cert_and_key(tmp: Path, name: str, days: float) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=400)).not_valid_after(now + dt.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_checks(tmp_path: Path) -> None:
    good_cert, good_key = _cert_and_key(tmp_path, "good", 365)
    soon_cert, _ = _cert_and_key(tmp_path, "soon", 10)
    old_cert, _ = _cert_and_key(tmp_path, "old", -1)
    (tmp_path / "junk.pem").write_text("not a certificate")

    def run(ca: Path, cert: Path, key: Path) -> dict[str, tuple[str, str]]:
        cfg = Config.model_validate({
            "version": 1, "site_id": "s1", "gateway_id": "g1",
            "uplink": {"broker": "mqtts://127.0.0.1:8883",
                       "tls": {"ca_file": str(ca), "cert_file": str(cert), "key": {"file": str(key)}}}})
        return {c.name: (c.status, c.detail) for c in check_tls(cfg, {})}

    ok = run(good_cert, good_cert, good_key)
    assert ok["tls ca"][0] == "ok" and "1 certificate" in ok["tls ca"][1]
    assert ok["tls client cert"][0] == "ok" and "CN=good" in ok["tls client cert"][1]
    assert ok["tls client key"] == ("ok", f"file {str(good_key)!r} loads and matches the certificate")
    assert "PRIVATE" not in json.dumps(ok)

    soon = run(good_cert, soon_cert, good_key)
    assert soon["tls client cert"][0] == "warn" and "days" in soon["tls client cert"][1]
    assert soon["tls client key"][0] == "fail" and "does not match" in soon["tls client key"][1]
    assert run(good_cert, old_cert, good_key)["tls client cert"][0] == "fail"
    bad = run(tmp_path / "junk.pem", tmp_path / "missing.pem", tmp_path / "junk.pem")
    assert bad["tls ca"][0] == "fail" and bad["tls client cert"][0] == "fail"
    assert bad["tls client key"][0] == "fail"


def test_doctor_by_hand_with_a_systemd_credential(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cfg.write_text(cfg.read_text().replace("  # password: {credential: mqtt-password}\n",
                                           "  password: {credential: mqtt-password}\n"))
    r = cli("doctor", "--json", "-c", cfg)
    assert r.exit_code == 1
    checks = _checks(r.stdout)
    assert checks["secret uplink.password"]["status"] == "warn"
    assert "only visible to the service" in checks["secret uplink.password"]["detail"]
    # Without the password it still tries the port, which is closed.
    assert checks["broker"]["status"] == "fail" and "cannot connect" in checks["broker"]["detail"]


def test_config_validate_names_missing_referenced_files_and_strict_fails(tmp_path: Path) -> None:
    key = tmp_path / "platform.pub"
    key.write_text("not checked here")
    path = tmp_path / "c.yaml"
    path.write_text(f"""version: 1
site_id: s1
gateway_id: g1
state_dir: {tmp_path / 'state'}
uplink:
  broker: mqtts://127.0.0.1:8883
  username: gw
  password: {{file: {tmp_path / 'creds' / 'mqtt-password'}}}
  tls: {{ca_file: {tmp_path / 'ca.pem'}}}
commands:
  public_keys: {{k1: {key}, k2: {tmp_path / 'gone.pub'}}}
""")
    r = cli("config", "validate", "-c", path)
    assert r.exit_code == 0, r.output
    assert "valid" in r.stdout and "3 referenced file(s) missing" in r.stdout
    err = r.stderr
    assert f"warning: uplink.password (secret file): {tmp_path / 'creds' / 'mqtt-password'} does not exist" in err
    assert f"uplink.tls.ca_file: {tmp_path / 'ca.pem'} does not exist" in err
    assert "commands.public_keys.k2" in err and "k1" not in err
    r = cli("config", "validate", "--strict", "-c", path)
    assert r.exit_code == 1 and "error: uplink.password" in r.stderr
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "mqtt-password").write_text("s3cret-value")
    (tmp_path / "ca.pem").write_text("-")
    (tmp_path / "gone.pub").write_text("-")
    r = cli("config", "validate", "--strict", "-c", path)
    assert r.exit_code == 0 and "missing" not in r.output and "s3cret-value" not in r.output


# --- issue 8: secrets, clear text, files root must not trust -------------------------------------------

def test_scrub_does_not_reveal_a_short_secret_by_position() -> None:
    """A 3-character secret was replaced wherever the letters occurred ("c<redacted>fig"), which showed
    what it was; now short secrets go only where they stand as a whole value, long ones everywhere."""
    text = b'{"password": "abc", "note": "the abc config is xabcx"}\nuser=abc&x=1\nrepr: \'abc\''
    out = scrub(text, ["abc"])
    assert out == (b'{"password": "<redacted>", "note": "the abc config is xabcx"}\nuser=<redacted>&x=1\n'
                   b"repr: '<redacted>'")
    long_secret = "S3cret-Planted-9f2c"
    assert scrub(f"x{long_secret}y".encode(), [long_secret]) == b"x<redacted>y"


def test_doctor_warns_of_secrets_in_clear_text(tmp_path: Path) -> None:
    from edgeagent.cli.support import check_plaintext, resolvable_secrets

    cfg = Config.model_validate({
        "version": 1, "site_id": "s1", "gateway_id": "g1",
        "uplink": {"broker": "mqtt://192.0.2.10:1883", "username": "gw", "allow_plaintext": True,
                   "password": {"env": "P"}},
        "notifiers": {
            "office": {"type": "webhook", "url": "http://192.0.2.20/hook?token=Tk-77aa99bb", "targets": ["g"]},
            "bearer": {"type": "webhook", "url": "http://192.0.2.21/hook", "targets": ["g"],
                       "authorization": {"env": "A"}},
            "tls": {"type": "webhook", "url": "https://hooks.example/h?token=Tk-77aa99bb", "targets": ["g"]},
            "local": {"type": "webhook", "url": "http://127.0.0.1:8080/h?token=Tk-77aa99bb", "targets": ["g"]},
        }})
    checks = {c.name: c for c in check_plaintext(cfg)}
    assert checks["clear text uplink.broker"].status == "warn"
    assert "allow_plaintext" in checks["clear text uplink.broker"].detail
    assert checks["clear text notifiers.office.url"].status == "warn"
    assert "token in the URL's query" in checks["clear text notifiers.office.url"].detail
    assert checks["clear text notifiers.bearer.url"].status == "warn"
    assert "authorization" in checks["clear text notifiers.bearer.url"].detail
    assert "clear text notifiers.tls.url" not in checks
    assert checks["clear text notifiers.local.url"].status == "ok"
    assert not any("Tk-77aa99bb" in c.detail for c in checks.values())
    assert "Tk-77aa99bb" in resolvable_secrets(cfg, {})  # scrubbed from a diagnose bundle too


def test_webhook_token_is_hidden_by_config_show_and_diagnose(cfg: Path, tmp_path: Path) -> None:
    token = "Tk-Q8w7e6r5t4y3"
    cfg.write_text(cfg.read_text() + f"""
notifiers:
  office:
    type: webhook
    url: https://hooks.example/edgeagent?token={token}
    targets: [guard_room]
""")
    r = cli("config", "show", "--json", "-c", cfg)
    assert r.exit_code == 0, r.output
    assert token not in r.stdout
    assert json.loads(r.stdout)["notifiers"]["office"]["url"].endswith("?token=<redacted>")
    out = tmp_path / "diag.tar.gz"
    assert cli("diagnose", "-c", cfg, "-o", out).exit_code == 0
    with tarfile.open(out) as tar:
        for m in tar.getmembers():
            assert token.encode() not in tar.extractfile(m).read(), m.name  # type: ignore[union-attr]


def test_init_neither_follows_a_planted_link_nor_loosens_the_mode(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    etc = tmp_path / "etc"
    etc.mkdir()
    path = etc / "c.yaml"
    # Before: init wrote 'c.yaml.tmp' through whatever was there, then renamed it.
    (etc / "c.yaml.tmp").symlink_to(victim)
    args = ("init", "--site-id", "s1", "--gateway-id", "g1", "--broker", "mqtt://127.0.0.1:1",
            "--state-dir", tmp_path / "state", "--config", path)
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert victim.read_text() == "root's file\n"
    assert path.stat().st_mode & 0o777 == 0o640  # a new config: not world-readable (was 0644 by umask)
    path.chmod(0o600)
    assert cli(*args, "--force").exit_code == 0
    assert path.stat().st_mode & 0o777 == 0o600  # kept, not loosened
    assert sorted(p.name for p in etc.iterdir()) == ["c.yaml", "c.yaml.tmp"]  # no temp files left

    link = etc / "linked.yaml"
    link.symlink_to(victim)
    r = cli(*args[:-1], link, "--force")
    assert r.exit_code == 1 and "symbolic link" in r.stderr
    assert victim.read_text() == "root's file\n"


def test_config_migrate_neither_follows_a_planted_link_nor_loosens_the_mode(
        cfg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeagent.kernel.config import schema

    monkeypatch.setitem(schema.MIGRATIONS, 0, lambda _doc: None)  # a version 0 -> 1 step
    cfg.write_text(cfg.read_text().replace("version: 1\n", "version: 0\n"))
    cfg.chmod(0o600)
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    backup = cfg.with_name(cfg.name + ".v0.bak")
    backup.symlink_to(victim)  # before: the backup was written through it
    r = cli("config", "migrate", "-c", cfg)
    assert r.exit_code == 1 and "symbolic link" in r.stderr
    assert victim.read_text() == "root's file\n"
    assert "version: 0\n" in cfg.read_text()  # left unchanged

    backup.unlink()
    r = cli("config", "migrate", "-c", cfg)
    assert r.exit_code == 0, r.output
    assert "version: 1\n" in cfg.read_text() and "version: 0\n" in backup.read_text()
    assert cfg.stat().st_mode & 0o777 == 0o600 and backup.stat().st_mode & 0o777 == 0o600  # before: 0644

    linked = tmp_path / "linked.yaml"
    linked.symlink_to(backup)
    r = cli("config", "migrate", "--dry-run", "-c", linked)
    assert r.exit_code == 1 and "symbolic link" in r.stderr


def test_status_ignores_a_runtime_file_pointing_elsewhere(cfg: Path, tmp_path: Path) -> None:
    """runtime.json is the daemon account's to write; root's CLI used its health URL as given, so
    ``file://...#`` made root read (and print) any file. Now only a loopback HTTP URL from it is used."""
    secret = tmp_path / "root-only.json"
    secret.write_text(json.dumps({"stolen": "root-only data"}))
    state = load_config(cfg).state_dir
    state.mkdir(parents=True, exist_ok=True)
    (state / "runtime.json").write_text(json.dumps({"pid": os.getpid(), "health_url": f"file://{secret}#"}))
    r = cli("status", "--json", "-c", cfg)
    assert "root-only data" not in r.output
    assert r.exit_code == 1 and "127.0.0.1:9108" in r.stderr  # the configured address instead


def test_runtime_values_root_may_trust(tmp_path: Path) -> None:
    import socket

    from edgeagent.cli.common import trusted_control_socket, trusted_health_url

    assert trusted_health_url("http://127.0.0.1:9108") == "http://127.0.0.1:9108"
    assert trusted_health_url("http://[::1]:9108/") == "http://[::1]:9108"
    for bad in ("file:///etc/shadow#", "http://192.0.2.1:9108", "https://127.0.0.1:9108", "http://127.0.0.1",
                "http://127.0.0.1:9108/admin", "http://u:p@127.0.0.1:9108", "http://127.0.0.1:9108?x=1", 42, None):
        assert trusted_health_url(bad) is None, bad

    state = tmp_path / "s"
    state.mkdir()
    sock_path = state / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(sock_path))
        env = {"RUNTIME_DIRECTORY": str(tmp_path / "run")}
        assert trusted_control_socket(str(sock_path), state, env) == str(sock_path)
        other = tmp_path / "elsewhere.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s2:
            s2.bind(str(other))
            assert trusted_control_socket(str(other), state, env) is None  # not where the daemon puts it
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "control.sock").symlink_to(sock_path)
        assert trusted_control_socket(str(tmp_path / "run" / "control.sock"), state, env) is None  # a link
