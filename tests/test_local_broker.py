"""The box's own mosquitto as ``edgeagent broker setup`` leaves it, against a real mosquitto started on the
generated files (on free loopback ports), with paho clients as the BLE gateways, panels and the daemon.

mosquitto silently drops a publish its ACL refuses, so a refusal is seen at a subscriber: the publisher
sends the refused messages, then one it may send, on the same connection; once that last one has arrived at
the daemon's subscription (in order: one publisher, one subscriber, QoS 1), the refused ones never will.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.cli.broker import audit as audit_files
from edgeagent.cli.broker import topics_from_config
from edgeagent.drivers.broker import files as bf
from edgeagent.drivers.wristband import decoders
from tests.helpers import cli
from tests.peers import MOSQUITTO, free_port, wait_port

TIMEOUT_S = 20.0  # a bound for a failing run only; nothing waits for it when things work

# --- a box: Debian's layout under a temporary root -------------------------------------------------------

@dataclass
class Box:
    root: Path
    local_port: int
    lan_port: int
    passwords: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def paths(self) -> bf.BrokerPaths:
        return bf.BrokerPaths(self.root)

    def write_main_conf(self) -> None:
        # Debian's /etc/mosquitto/mosquitto.conf, moved under the root. `user root` is for the tests only:
        # they run as root, and mosquitto would otherwise drop to the user mosquitto, which cannot read the
        # test's files (a real install gives them to mosquitto).
        self.paths.main_conf.parent.mkdir(parents=True, exist_ok=True)
        (self.root / "var/lib/mosquitto").mkdir(parents=True, exist_ok=True)
        self.paths.main_conf.write_text(
            "user root\n"
            f"pid_file {self.root}/run/mosquitto.pid\n"
            "persistence true\n"
            f"persistence_location {self.root}/var/lib/mosquitto/\n"
            f"log_dest file {self.root}/mosquitto.log\n"
            f"include_dir {self.paths.conf.parent}\n")
        (self.root / "run").mkdir(exist_ok=True)

    def setup(self, *extra: str) -> Any:
        return cli("broker", "setup", "--root", self.root, "--lan-address", "127.0.0.1",
                   "--lan-port", str(self.lan_port), "--local-port", str(self.local_port),
                   "--config", self.root / "no-config.yaml", *extra)

    def add(self, name: str, role: str) -> dict[str, Any]:
        import json

        r = cli("broker", "add-client", name, "--role", role, "--root", self.root,
                "--config", self.root / "no-config.yaml", "--json")
        assert r.exit_code == 0, r.output
        info: dict[str, Any] = json.loads(r.stdout)
        self.passwords[name] = info["password"]
        return info

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.paths.main_conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.local_port)
        wait_port(self.lan_port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # a clean stop: mosquitto writes its persistence file
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        p = self.root / "mosquitto.log"
        return p.read_text() if p.exists() else ""


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    b = Box(tmp_path_factory.mktemp("box"), free_port(), free_port())
    b.write_main_conf()
    r = b.setup()
    assert r.exit_code == 0, r.output
    b.passwords[bf.DAEMON_USER] = b.paths.credential.read_text().strip()
    for name, role in (("gw-1", "ble-gateway"), ("gw-2", "ble-gateway"), ("panel-a", "panel"),
                       ("lora-1", "lora")):
        b.add(name, role)
    b.start()
    try:
        yield b
    finally:
        b.stop()


# --- clients ---------------------------------------------------------------------------------------------

class Client:
    """A paho client (MQTT 3.1.1, as most gateways speak) whose connection outcome and messages a test reads."""

    def __init__(self, port: int, user: str | None = None, password: str | None = None, *,
                 ca: Path | None = None, client_id: str | None = None, clean: bool = True,
                 subscribe: tuple[str, ...] = ()) -> None:
        self.connected = threading.Event()
        self.closed = threading.Event()
        self.subscribed = threading.Event()
        self.refused: Any = None
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subs = subscribe
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{time.monotonic_ns()}",
                        protocol=paho.MQTTv311, clean_session=clean)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *_a: self.closed.set()
        c.on_subscribe = lambda *_a: self.subscribed.set()
        c.on_message = self._on_message
        if user is not None:
            c.username_pw_set(user, password)
        if ca is not None:
            c.tls_set(ca_certs=str(ca))
        self.c = c
        try:
            c.connect("127.0.0.1", port, keepalive=30)
        except (OSError, ssl.SSLError):
            self.closed.set()
            return
        c.loop_start()

    def _on_connect(self, cl: paho.Client, _u: object, _f: object, rc: Any, _p: object) -> None:
        if rc.is_failure:
            self.refused = rc
            self.closed.set()
            return
        if self._subs:
            cl.subscribe([(t, 1) for t in self._subs])
        self.connected.set()

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def wait_ready(self) -> Client:
        assert self.connected.wait(TIMEOUT_S), f"not connected (refused: {self.refused})"
        if self._subs:
            assert self.subscribed.wait(TIMEOUT_S)
        return self

    def wait_closed(self) -> bool:
        return self.closed.wait(TIMEOUT_S)

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain)

    def got(self, topic: str, payload: bytes | None = None) -> bool:
        with self._lock:
            return any(t == topic and (payload is None or p == payload) for t, p in self.messages)

    def topics(self) -> set[str]:
        with self._lock:
            return {t for t, _ in self.messages}

    def wait_for(self, topic: str, payload: bytes | None = None) -> bool:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if self.got(topic, payload):
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def login(box: Box, made: list[Client], name: str | None, **kw: Any) -> Client:
    c = Client(box.local_port, name, box.passwords.get(name) if name else None, **kw)
    made.append(c)
    return c


DAEMON_TOPICS = ("iot/+/+/data", "iot/+/status", "ble/+/adv", "application/+/device/+/event/up",
                 "edgeagent/local/alarms/ack/+", "edgeagent/local/alarms/#")


def daemon(box: Box, made: list[Client]) -> Client:
    return login(box, made, bf.DAEMON_USER, subscribe=DAEMON_TOPICS).wait_ready()


def refused_then_marker(sender: Client, watcher: Client, refused: list[str], marker: str) -> None:
    """Send every refused topic, then the marker; once the marker is in, nothing refused may be."""
    for t in refused:
        sender.publish(t, b"must not arrive")
    sender.publish(marker, b"marker")
    assert watcher.wait_for(marker, b"marker"), "the allowed message did not arrive"
    leaked = watcher.topics() & set(refused)
    assert not leaked, f"the broker let these through: {leaked}"


# --- against the running broker ----------------------------------------------------------------------------

def test_anonymous_and_wrong_password_are_refused(box: Box, clients: list[Client]) -> None:
    anon = login(box, clients, None)
    assert anon.wait_closed() and anon.refused is not None, "an anonymous client was let in"
    wrong = Client(box.local_port, "gw-1", "not-the-password")
    clients.append(wrong)
    assert wrong.wait_closed() and wrong.refused is not None
    # The LAN listener too (over TLS, so only the login is in question).
    anon_lan = Client(box.lan_port, ca=box.paths.ca_cert)
    clients.append(anon_lan)
    assert anon_lan.wait_closed() and anon_lan.refused is not None


def test_ble_gateway_publishes_only_its_own_uplink(box: Box, clients: list[Client]) -> None:
    d = daemon(box, clients)
    gw = login(box, clients, "gw-1").wait_ready()
    refused = ["iot/gw-2/aabbccddeeff/data",  # another gateway's readings
               "iot/gw-2/status",
               "ble/gw-2/adv",
               "edgeagent/local/alarms/ack/panel-a",  # an acknowledgement
               "edgeagent/local/alarms/ack",  # the old, anonymous ack topic
               "edgeagent/local/alarms",  # the guard room
               "edgeagent/local/alarms/01HZZZZZZZZZZZZZZZZZZZZZZZ",
               "application/1/device/0011223344556677/event/up"]  # a LoRa uplink
    gw.publish("ble/gw-1/adv", b"02011a")
    refused_then_marker(gw, d, refused, "iot/gw-1/aabbccddeeff/data")
    assert d.got("ble/gw-1/adv")


def test_panel_acknowledges_only_in_its_own_name(box: Box, clients: list[Client]) -> None:
    d = daemon(box, clients)
    panel = login(box, clients, "panel-a").wait_ready()
    refused_then_marker(panel, d, ["edgeagent/local/alarms/ack/panel-b",  # another panel's name
                                   "edgeagent/local/alarms/ack",
                                   "edgeagent/local/alarms",  # the guard-room state: the daemon's alone
                                   "edgeagent/local/alarms/01HZZZZZZZZZZZZZZZZZZZZZZZ",
                                   "iot/panel-a/aabbccddeeff/data"],  # posing as a BLE gateway
                        "edgeagent/local/alarms/ack/panel-a")


def test_lora_account_writes_application_topics_only(box: Box, clients: list[Client]) -> None:
    d = daemon(box, clients)
    lora = login(box, clients, "lora-1").wait_ready()
    refused_then_marker(lora, d, ["iot/gw-1/aabbccddeeff/data", "edgeagent/local/alarms/ack/lora-1",
                                  "edgeagent/local/alarms"],
                        "application/1/device/0011223344556677/event/up")


def test_daemon_writes_the_guard_topic_and_panels_read_it(box: Box, clients: list[Client]) -> None:
    d = daemon(box, clients)
    panel = login(box, clients, "panel-a", subscribe=("edgeagent/local/alarms/#",)).wait_ready()
    d.publish("edgeagent/local/alarms/01HAAAAAAAAAAAAAAAAAAAAAAA", b'{"state": "raised"}', retain=True)
    assert panel.wait_for("edgeagent/local/alarms/01HAAAAAAAAAAAAAAAAAAAAAAA", b'{"state": "raised"}')
    d.publish("edgeagent/local/alarms/01HAAAAAAAAAAAAAAAAAAAAAAA", b"", retain=True)  # clear the retained state


def test_lan_listener_speaks_tls_only(box: Box, clients: list[Client], tmp_path: Path) -> None:
    # Plain MQTT to the LAN port: the broker waits for a TLS hello and drops the connection.
    plain = Client(box.lan_port, "gw-1", box.passwords["gw-1"])
    clients.append(plain)
    assert plain.wait_closed()
    assert not plain.connected.is_set()
    # TLS trusting the CA made at setup, host name checked against 127.0.0.1 in the certificate: in.
    tls = Client(box.lan_port, "gw-1", box.passwords["gw-1"], ca=box.paths.ca_cert)
    clients.append(tls)
    tls.wait_ready()
    # TLS trusting some other CA: the handshake fails (a device that pinned our CA cannot be fooled either).
    other_root = tmp_path / "other"
    other = bf.make_ca(bf.new_key(), "someone else", _now())
    other_root.write_bytes(bf.cert_pem(other))
    with socket.create_connection(("127.0.0.1", box.lan_port), timeout=TIMEOUT_S) as raw:
        ctx = ssl.create_default_context(cafile=str(other_root))
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    # And the certificate is the one whose fingerprint setup printed.
    served = ssl.get_server_certificate(("127.0.0.1", box.lan_port))
    cert = x509.load_pem_x509_certificate(served.encode())
    assert cert.issuer == x509.load_pem_x509_certificate(box.paths.ca_cert.read_bytes()).subject
    assert "127.0.0.1" in bf.cert_names(cert)


def test_oversized_publish_is_refused_and_the_largest_legitimate_one_passes(box: Box, clients: list[Client]
                                                                            ) -> None:
    d = daemon(box, clients)
    gw = login(box, clients, "gw-1").wait_ready()
    biggest = b"[" + b" " * (decoders.MAX_PAYLOAD_BYTES - 2) + b"]"  # what a decoder still reads
    gw.publish("iot/gw-1/aabbccddeeff/data", biggest)
    assert d.wait_for("iot/gw-1/aabbccddeeff/data", biggest)
    gw.publish("iot/gw-1/ffeeddccbbaa/data", b"x" * (10 * 1024 * 1024))
    assert gw.wait_closed(), "the broker kept a client that sent 10 MB"
    gw.close()
    again = login(box, clients, "gw-1").wait_ready()
    again.publish("iot/gw-1/status", b"marker")
    assert d.wait_for("iot/gw-1/status", b"marker")
    assert not d.got("iot/gw-1/ffeeddccbbaa/data"), "the 10 MB message reached the daemon"
    assert "max_packet_size" in box.paths.conf.read_text()


def test_client_added_while_running_is_let_in_and_a_removed_one_is_not(box: Box, clients: list[Client]) -> None:
    box.add("panel-b", "panel")  # SIGHUP through the pid file: no restart
    connected = login(box, clients, "panel-b").wait_ready()
    r = cli("broker", "remove", "panel-b", "--root", box.root, "--config", box.root / "no-config.yaml")
    assert r.exit_code == 0, r.output
    assert connected.wait_closed(), "the removed account's connection stayed up"
    gone = login(box, clients, "panel-b")
    assert gone.wait_closed() and gone.refused is not None
    assert "panel-b" not in bf.passwd_users(box.paths.passwd.read_text())
    assert "panel-b" not in {c.name for c in bf.parse_acl_clients(box.paths.acl.read_text())}


def test_queued_message_survives_a_broker_restart(box: Box, clients: list[Client]) -> None:
    # The daemon's persistent session: subscribed, then away.
    first = login(box, clients, bf.DAEMON_USER, client_id="edgeagent-persist", clean=False,
                  subscribe=("iot/+/+/data",)).wait_ready()
    first.close()
    gw = login(box, clients, "gw-1").wait_ready()
    gw.publish("iot/gw-1/aabbccddeeff/data", b'{"event": "sos"}')
    gw.c.loop_stop()  # no more traffic from it; the PUBACK for the publish came on its network thread
    # The broker's restart: a clean stop writes the queue to its persistence file, the start reads it.
    box.stop()
    box.start()
    back = login(box, clients, bf.DAEMON_USER, client_id="edgeagent-persist", clean=False).wait_ready()
    assert back.wait_for("iot/gw-1/aabbccddeeff/data", b'{"event": "sos"}'), box.log()


# --- setup itself ----------------------------------------------------------------------------------------------

def _now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC)


def test_setup_is_idempotent_and_keeps_the_ca_and_the_daemon_password(tmp_path: Path) -> None:
    b = Box(tmp_path, free_port(), free_port())
    b.write_main_conf()
    assert b.setup().exit_code == 0
    watched = [b.paths.conf, b.paths.acl, b.paths.passwd, b.paths.ca_cert, b.paths.ca_key, b.paths.lan_cert,
               b.paths.lan_key, b.paths.credential]
    before = {p: p.read_bytes() for p in watched}
    b.add("gw-9", "ble-gateway")
    before[b.paths.acl] = b.paths.acl.read_bytes()
    before[b.paths.passwd] = b.paths.passwd.read_bytes()
    r = b.setup()
    assert r.exit_code == 0, r.output
    assert "already up to date" in r.stdout
    assert {p: p.read_bytes() for p in watched} == before  # accounts, CA and certificate kept
    # Modes: secrets for their owner only; certificates and the config readable.
    modes = {p: p.stat().st_mode & 0o777 for p in watched}
    assert modes[b.paths.credential] == modes[b.paths.passwd] == modes[b.paths.acl] == 0o600
    assert modes[b.paths.ca_key] == modes[b.paths.lan_key] == 0o600
    assert modes[b.paths.lan_cert] == modes[b.paths.ca_cert] == modes[b.paths.conf] == 0o644
    assert b.paths.credential.parent.stat().st_mode & 0o777 == 0o700
    # Debian's mosquitto.conf already sets persistence_location; a second value would stop mosquitto.
    assert "\npersistence_location" not in b.paths.conf.read_text()
    # A new LAN address: the certificate is re-issued by the same CA, so devices that pinned it still trust it.
    r = cli("broker", "setup", "--root", b.root, "--lan-address", "127.0.0.2", "--config", b.root / "x.yaml")
    assert r.exit_code == 0, r.output
    assert b.paths.ca_cert.read_bytes() == before[b.paths.ca_cert]
    assert "127.0.0.2" in bf.cert_names(x509.load_pem_x509_certificate(b.paths.lan_cert.read_bytes()))


def test_add_client_refuses_bad_names_roles_and_duplicates(tmp_path: Path) -> None:
    b = Box(tmp_path, free_port(), free_port())
    b.write_main_conf()
    assert b.setup().exit_code == 0
    for name, role in (("gw/1", "ble-gateway"), ("gw+", "ble-gateway"), ("a:b", "panel"), ("#", "panel"),
                       ("gw-1", "daemon"), ("gw-1", "admin"), ("edgeagent", "panel")):
        r = cli("broker", "add-client", name, "--role", role, "--root", b.root, "--config", b.root / "x.yaml")
        assert r.exit_code == 2, (name, role, r.output)
    b.add("gw-1", "ble-gateway")
    r = cli("broker", "add-client", "gw-1", "--role", "panel", "--root", b.root, "--config", b.root / "x.yaml")
    assert r.exit_code == 1 and "exists" in r.output
    old = b.passwords["gw-1"]
    r = cli("broker", "add-client", "gw-1", "--role", "ble-gateway", "--new-password", "--root", b.root,
            "--config", b.root / "x.yaml")
    assert r.exit_code == 0, r.output
    assert old not in r.stdout and "password" in r.stdout
    # No password ever reaches a file in clear, and none is passed on a command line (checked by reading
    # the only place one could end up besides the hash: the password file itself).
    assert old not in b.paths.passwd.read_text()


def test_acl_follows_the_config_topics(tmp_path: Path) -> None:
    cfg = tmp_path / "edgeagent.yaml"
    r = cli("init", "--site-id", "s1", "--gateway-id", "g1", "--broker", "mqtt://127.0.0.1:1",
            "--state-dir", tmp_path / "state", "--config", cfg)
    assert r.exit_code == 0, r.output
    cfg.write_text(cfg.read_text() + (
        "wristbands:\n"
        "  inputs: [{decoder: ble-json}, {decoder: chirpstack-v4, topics: [application/7/device/+/event/up]}]\n"
        "  guard_topic: site/guard\n"
        "  ack_topic: site/guard-ack\n"
        "notifiers:\n"
        "  guard-room: {type: mqtt, topic: 'site/notify/{target}', targets: [night-shift]}\n"))
    topics, source = topics_from_config(cfg)
    assert source == str(cfg)
    assert topics.inputs == ("iot/+/+/data", "iot/+/status", "application/7/device/+/event/up")
    acl = bf.render_acl([bf.Client("edgeagent", "daemon"), bf.Client("p1", "panel")], topics)
    assert "user p1\ntopic write site/guard-ack/p1\ntopic read site/guard/#\ntopic read site/notify/+\n" in acl
    assert "topic readwrite site/guard/#\ntopic write site/notify/+\n" in acl
    assert "topic read site/guard-ack/+\n" in acl
    assert "ble/+/adv" not in acl  # the daemon reads only its inputs


# --- pure parts -------------------------------------------------------------------------------------------

def test_packet_limit_covers_the_decoders_largest_message() -> None:
    assert decoders.MAX_PAYLOAD_BYTES == bf.MAX_PAYLOAD_BYTES
    # payload + fixed header (5) + topic length (2) + a long legitimate topic + MQTT 5 properties
    assert bf.MAX_PAYLOAD_BYTES + 5 + 2 + len("iot/" + "g" * 64 + "/" + "0" * 32 + "/data") <= bf.MAX_PACKET_BYTES


names = st.from_regex(bf.NAME_RE, fullmatch=True)


@given(st.lists(st.tuples(names, st.sampled_from(bf.ROLES)), unique_by=lambda t: t[0], max_size=20))
def test_acl_records_every_account_and_role(accounts: list[tuple[str, bf.Role]]) -> None:
    clients = [bf.Client(n, r) for n, r in accounts]
    text = bf.render_acl(clients, bf.Topics(inputs=("iot/+/+/data",)))
    assert sorted(bf.parse_acl_clients(text), key=lambda c: c.name) == sorted(clients, key=lambda c: c.name)
    lines = text.splitlines()
    # Grants follow a `user` line, never before the first one (that would be for anonymous clients), and
    # no pattern line (it would apply to every account).
    first_user = next((i for i, ln in enumerate(lines) if ln.startswith("user ")), len(lines))
    assert not any(ln.startswith("topic ") for ln in lines[:first_user])
    assert not any(ln.startswith("pattern") for ln in lines)


@given(st.text(max_size=300))
def test_conf_parser_and_audit_take_any_text(text: str) -> None:
    directives = bf.parse_conf(text, "x.conf")
    assert all(d.key and not d.key.startswith("#") for d in directives)
    bf.audit(directives)  # finds, or not: never raises


def _audit(text: str) -> list[str]:
    return [f"{f.severity}: {f.text}" for f in bf.audit(bf.parse_conf(text, "m.conf"))]


def test_audit_flags_what_lets_the_lan_in() -> None:
    safe = ("per_listener_settings false\nallow_anonymous false\npassword_file /p\nacl_file /a\n"
            "max_packet_size 66560\nset_tcp_nodelay true\nlistener 1883 127.0.0.1\n"
            "listener 8883\ncertfile /c\nkeyfile /k\n")
    assert _audit(safe) == []
    assert any("allow_anonymous true" in f for f in _audit(safe + "allow_anonymous true\n"))
    assert any("no acl_file" in f for f in _audit(safe.replace("acl_file /a\n", "")))
    assert any("no password_file" in f for f in _audit(safe.replace("password_file /p\n", "")))
    clear_lan = _audit(safe + "listener 1884 0.0.0.0\n")
    assert any(f.startswith("fail: listener 1884") and "not TLS" in f for f in clear_lan)
    assert any("listener 1885 on every interface" in f for f in _audit(safe + "listener 1885\n"))
    # per_listener_settings true: the global settings apply to no listener, so each one lacks them.
    per = _audit("per_listener_settings true\n" + safe.replace("per_listener_settings false\n", ""))
    assert any("per_listener_settings true" in f for f in per)
    assert any("no acl_file on listener 8883" in f for f in per)
    assert any("no password_file on listener 1883" in f for f in per)
    ok_per = ("per_listener_settings true\nlistener 8883\ncertfile /c\nkeyfile /k\nallow_anonymous false\n"
              "password_file /p\nacl_file /a\nmax_packet_size 1\nset_tcp_nodelay true\n")
    assert [f for f in _audit(ok_per) if f.startswith("fail")] == []
    assert any("no listener" in f for f in _audit("allow_anonymous false\n"))


def test_audit_of_what_setup_writes_is_clean_and_follows_include_dir(tmp_path: Path) -> None:
    b = Box(tmp_path, free_port(), free_port())
    b.write_main_conf()
    assert b.setup().exit_code == 0
    findings, directives = audit_files(b.paths)
    assert findings == []
    assert any(d.key == "acl_file" for d in directives)  # read through the main file's include_dir
    # A main file that does not include conf.d: our drop-in is never read.
    b.paths.main_conf.write_text(b.paths.main_conf.read_text().replace("include_dir", "#include_dir"))
    findings, _ = audit_files(b.paths)
    assert any("include_dir" in f.text for f in findings)
    # A missing ACL file is named.
    b.paths.main_conf.write_text(b.paths.main_conf.read_text().replace("#include_dir", "include_dir"))
    os.unlink(b.paths.acl)
    findings, _ = audit_files(b.paths)
    assert any("does not exist" in f.text and "acl" in f.text for f in findings)


def test_doctor_flags_an_open_local_broker_until_setup(tmp_path: Path) -> None:
    from edgeagent.capabilities import load_config
    from edgeagent.cli.support import check_local_broker

    cfg_path = tmp_path / "edgeagent.yaml"
    r = cli("init", "--site-id", "s1", "--gateway-id", "g1", "--broker", "mqtt://127.0.0.1:1",
            "--state-dir", tmp_path / "state", "--config", cfg_path)
    assert r.exit_code == 0, r.output
    cfg_path.write_text(cfg_path.read_text() + "wristbands:\n  inputs: [{decoder: ble-json}]\n")
    cfg = load_config(cfg_path)
    b = Box(tmp_path / "root", free_port(), free_port())
    assert check_local_broker(cfg, b.root).status == "fail"  # no mosquitto config at all
    b.write_main_conf()
    # What a quick manual install often leaves: every interface, anyone welcome.
    b.paths.conf.parent.mkdir(parents=True, exist_ok=True)
    old = b.paths.conf.parent / "local.conf"
    old.write_text("listener 1883\nallow_anonymous true\n")
    check = check_local_broker(cfg, b.root)
    assert check.status == "fail"
    for words in ("allow_anonymous true", "no password_file", "no acl_file", "listener 1883 on every interface"):
        assert words in check.detail, (words, check.detail)
    old.unlink()
    assert b.setup().exit_code == 0
    check = check_local_broker(cfg, b.root)
    assert check.status == "ok", check.detail
