"""Real peers for tests: a mosquitto broker on a free loopback port, a CA with server and client
certificates, a subscriber that collects messages, and a platform signing key."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.01)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@dataclass
class TLSFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_pki(directory: Path) -> TLSFiles:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and an unrelated CA."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        path.chmod(0o600)

    def ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        k = key()
        subj = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subj).issuer_name(subj).public_key(k.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
                .sign(k, hashes.SHA256()))
        return k, cert

    def leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, server: bool
             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        k = key()
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(ca_cert.subject).public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                            critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                                critical=False)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                                critical=False)
        return k, b.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = ca("edgeagent test CA")
    _, other_cert = ca("some other CA")
    s_key, s_cert = leaf(ca_key, ca_cert, "localhost", server=True)
    c_key, c_cert = leaf(ca_key, ca_cert, "gw-1", server=False)
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                     directory / "client.pem", directory / "client.key", directory / "other-ca.pem")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.other_ca.write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(s_cert.public_bytes(serialization.Encoding.PEM))
    files.client_cert.write_bytes(c_cert.public_bytes(serialization.Encoding.PEM))
    write_key(s_key, files.server_key)
    write_key(c_key, files.client_key)
    return files


class Amqtt:
    """amqtt: a pure-Python broker that speaks MQTT 3.1.1 only (an MQTT 5 CONNECT gets no answer)."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = workdir / "amqtt.yaml"
        self.conf.write_text(
            f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
        self.log = workdir / "amqtt.log"
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Amqtt:
        exe = Path(sys.executable).with_name("amqtt")
        if not exe.exists():
            raise RuntimeError("amqtt is not installed in this environment: pip install -e '.[dev]'")
        self.proc = subprocess.Popen([str(exe), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))
        wait_port(self.port, timeout_s=15)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Mosquitto:
    """A private mosquitto on a free loopback port that a test can stop, kill and restart."""

    def __init__(self, workdir: Path, *, tls: TLSFiles | None = None, require_cert: bool = False,
                 passwords: dict[str, str] | None = None, persistence: bool = False,
                 port: int | None = None) -> None:
        if not Path(MOSQUITTO).exists():
            raise RuntimeError("mosquitto is not installed: apt-get install mosquitto")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        lines = ["user root", f"listener {self.port} 127.0.0.1", "log_dest stderr", "log_type error",
                 "log_type warning", "max_queued_messages 0", "max_inflight_messages 0"]
        if persistence:
            lines += ["persistence true", f"persistence_location {self.dir}/"]
        if passwords:
            pw_file = self.dir / "passwords"
            pw_file.write_text("")
            for user, pw in passwords.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw_file), user, pw], check=True,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw_file}"]
        else:
            lines += ["allow_anonymous true"]
        if tls is not None:
            lines += [f"cafile {tls.ca}", f"certfile {tls.server_cert}", f"keyfile {tls.server_key}",
                      "tls_version tlsv1.2"]
            if require_cert:
                lines += ["require_certificate true"]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.url = f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "mosquitto.log", "ab"))
        try:
            wait_port(self.port)
        except TimeoutError:
            self.stop()
            log = (self.dir / "mosquitto.log").read_text()
            raise RuntimeError(f"mosquitto did not start: {log}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Collector:
    """A real MQTT subscriber (paho, its own network thread) that records what the cloud would see."""

    port: int
    topic: str = "#"
    persistent: bool = False
    mqtt311: bool = False
    # For a TLS broker: trust its CA and present the test client certificate (accepted with or without
    # require_certificate). For a password broker: username and password.
    tls: TLSFiles | None = field(default=None, kw_only=True)
    username: str | None = field(default=None, kw_only=True)
    password: str | None = field(default=None, kw_only=True)
    events: list[dict[str, object]] = field(default_factory=list)
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: paho.Client | None = None
    _subscribed: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Collector:
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                        protocol=paho.MQTTv311 if self.mqtt311 else paho.MQTTv5,
                        client_id=f"collector-{time.monotonic_ns()}")
        props = None
        if self.persistent:
            # A persistent session: messages published while the collector reconnects are queued for it.
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        c.on_connect = lambda cl, *_a: cl.subscribe(self.topic, qos=1)
        c.on_subscribe = lambda *_a: self._subscribed.set()
        c.on_message = self._on_message
        c.reconnect_delay_set(0.05, 0.2)
        if self.tls is not None:
            c.tls_set(ca_certs=str(self.tls.ca), certfile=str(self.tls.client_cert),
                      keyfile=str(self.tls.client_key))
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        if self.mqtt311:
            c.connect_async("127.0.0.1", self.port, keepalive=10)
        else:
            c.connect_async("127.0.0.1", self.port, keepalive=10, clean_start=not self.persistent,
                            properties=props)
        c.loop_start()
        self._client = c
        if not self._subscribed.wait(10):
            self.stop()
            raise TimeoutError("collector did not subscribe")
        return self

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            if "/events/" in msg.topic:
                self.events.extend(orjson.loads(msg.payload)["events"])

    def stop(self) -> None:
        if self._client is not None:
            # DISCONNECT first: it wakes the network thread, so loop_stop() need not wait out its select().
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def wait_for(self, predicate: object, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(self):  # type: ignore[operator]
                    return True
            time.sleep(0.02)
        return False

    def seqs(self) -> list[int]:
        with self._lock:
            return [int(e["seq"]) for e in self.events]  # type: ignore[call-overload]
