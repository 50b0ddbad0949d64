"""The box's own mosquitto, as text: its config drop-in, its ACL, its LAN certificate, and an audit of any
mosquitto config. Pure functions: no file, no clock, no process is touched here (the caller passes ``now``).

Trust model (README, "The box's own broker"): the broker is the checkpoint. No anonymous client; one account
per device and per panel; what an account may publish follows from its role alone:

    role         publishes                                   reads
    daemon       guard topic and below, notifier topics      wristband input topics, {ack_topic}/+
    ble-gateway  iot/{name}/#, ble/{name}/#                  -
    lora         application/#                               application/+/device/+/command/#
    panel        {ack_topic}/{name}                          guard topic and below, notifier topics

The ACL uses per-user ``topic`` lines, not ``pattern`` lines: mosquitto applies a pattern to every account,
so ``pattern write iot/%u/#`` would also let a panel publish readings as if it were a BLE gateway.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Role = Literal["daemon", "ble-gateway", "lora", "panel"]
ROLES: Final[tuple[Role, ...]] = ("daemon", "ble-gateway", "lora", "panel")
CLIENT_ROLES: Final[tuple[Role, ...]] = ("ble-gateway", "lora", "panel")
DAEMON_USER: Final = "edgeagent"
#: An account name is also a topic level (iot/{name}/..., {ack_topic}/{name}) and a password-file key, so
#: no '/', '+', '#' (topic syntax), no ':' (the password file's separator), no spaces.
NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

#: The largest legitimate message is a BLE gateway's batch: the wristband decoders read at most 64 KiB of
#: payload (``MAX_PAYLOAD_BYTES`` in drivers/wristband/decoders.py, up to 256 readings). 1 KiB more covers
#: the fixed header, the topic (legitimate ones are under 200 bytes) and MQTT 5 properties.
MAX_PAYLOAD_BYTES: Final = 64 * 1024
MAX_PACKET_BYTES: Final = MAX_PAYLOAD_BYTES + 1024
#: Per client, for messages queued while it is away (the daemon during a restart): bounded by count and
#: by bytes, whichever comes first; beyond that mosquitto drops new messages for that client.
MAX_QUEUED_MESSAGES: Final = 10_000
MAX_QUEUED_BYTES: Final = 32 * 1024 * 1024

LOCAL_PORT: Final = 1883
LAN_PORT: Final = 8883

# RSA rather than EC: the cheapest BLE gateways' TLS stacks do not all speak ECDSA, and RSA 2048 is the
# one choice every device we met accepts. The devices pin the CA, so the server certificate can be
# re-issued (a new address) without touching them; hence a CA that outlives the box.
RSA_BITS: Final = 2048
CA_VALID_DAYS: Final = 20 * 365
SERVER_VALID_DAYS: Final = 10 * 365
#: ``broker setup`` re-issues the server certificate when less than this is left.
RENEW_BEFORE_DAYS: Final = 90


# --- where things live ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BrokerPaths:
    """The local broker's files; with ``root`` (``--root DIR``) every path is under DIR, and so are the
    paths written into the config (so a test can run mosquitto on them)."""

    root: Path = Path("/")

    def under(self, path: str) -> Path:
        return self.root / PurePosixPath(path).relative_to("/")

    @property
    def main_conf(self) -> Path:
        return self.under("/etc/mosquitto/mosquitto.conf")

    @property
    def conf(self) -> Path:
        return self.under("/etc/mosquitto/conf.d/edgeagent.conf")

    @property
    def passwd(self) -> Path:
        return self.under("/etc/mosquitto/edgeagent.passwd")

    @property
    def acl(self) -> Path:
        return self.under("/etc/mosquitto/edgeagent.acl")

    @property
    def certs(self) -> Path:
        return self.under("/etc/mosquitto/certs")

    @property
    def lan_cert(self) -> Path:
        return self.certs / "edgeagent-lan.crt"

    @property
    def lan_key(self) -> Path:
        return self.certs / "edgeagent-lan.key"

    @property
    def ca_cert(self) -> Path:
        return self.certs / "edgeagent-ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.certs / "edgeagent-ca.key"

    @property
    def persistence_dir(self) -> Path:
        return self.under("/var/lib/mosquitto")

    @property
    def credential(self) -> Path:
        return self.under("/etc/edgeagent/credentials/local-mqtt-password")


# --- topics and accounts -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Topics:
    """The topics the ACL is made from (taken from the edgeagent config by the caller)."""

    inputs: tuple[str, ...]  # the wristband inputs' subscriptions (the daemon reads them)
    guard_topic: str = "edgeagent/local/alarms"
    ack_topic: str = "edgeagent/local/alarms/ack"
    notifier_topics: tuple[str, ...] = ()  # mqtt notifiers' topics, '{target}' as written in the config

    def __post_init__(self) -> None:
        for t in (self.guard_topic, self.ack_topic, *self.notifier_topics):
            if not t or "+" in t or "#" in t or t.startswith("$") or any(c.isspace() for c in t):
                raise ValueError(f"not a topic to publish to: {t!r}")

    @property
    def notifier_filters(self) -> tuple[str, ...]:
        # One filter per notifier: every target's topic, whatever targets are added later.
        return tuple(dict.fromkeys(t.replace("{target}", "+") for t in self.notifier_topics))


@dataclass(frozen=True)
class Client:
    name: str
    role: Role


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a usable account name: 1-64 letters, digits, '_', '.', '-', "
                         "starting with a letter or digit (it becomes a topic level)")
    return name


def publishes(client: Client, topics: Topics) -> list[str]:
    """Topic filters ``client`` may publish to, in the ACL's order."""
    if client.role == "daemon":
        return [f"{topics.guard_topic}/#", *topics.notifier_filters]
    if client.role == "ble-gateway":
        return [f"iot/{client.name}/#", f"ble/{client.name}/#"]
    if client.role == "lora":
        return ["application/#"]
    return [f"{topics.ack_topic}/{client.name}"]


def reads(client: Client, topics: Topics) -> list[str]:
    """Topic filters ``client`` may subscribe to and receive."""
    if client.role == "daemon":
        # The guard topic too: the daemon may look at what it left retained there.
        return [*dict.fromkeys(topics.inputs), f"{topics.ack_topic}/+", f"{topics.guard_topic}/#"]
    if client.role == "lora":
        # ChirpStack subscribes to downlink commands at start; nobody may publish there, but a refused
        # subscription makes it log an error forever.
        return ["application/+/device/+/command/#"]
    if client.role == "panel":
        return [f"{topics.guard_topic}/#", *topics.notifier_filters]
    return []


_ACL_HEADER = """\
# The edgeagent local broker's ACL. Written by `edgeagent broker setup`, `add-client` and `remove`;
# they rewrite it whole, so change accounts with them rather than here.
# Nothing before the first `user` line: anonymous clients get no access (and the broker refuses
# them anyway). Per-user `topic` lines rather than `pattern` lines: mosquitto applies a pattern to
# every account, so `pattern write iot/%u/#` would also let a panel publish as a BLE gateway.
"""


def render_acl(clients: Iterable[Client], topics: Topics) -> str:
    out = [_ACL_HEADER]
    for c in sorted(clients, key=lambda c: (ROLES.index(c.role), c.name)):
        out.append(f"\n# client {c.name} role {c.role}\nuser {c.name}\n")
        # The same filter may be both read and written (the daemon's guard topic): one readwrite line.
        pub, sub = publishes(c, topics), reads(c, topics)
        for t in dict.fromkeys([*pub, *sub]):
            access = "readwrite" if t in pub and t in sub else "write" if t in pub else "read"
            out.append(f"topic {access} {t}\n")
    return "".join(out)


_ACL_CLIENT_RE = re.compile(r"#\s*client\s+(\S+)\s+role\s+(\S+)\s*")


def parse_acl_clients(text: str) -> list[Client]:
    """The accounts recorded in an ACL written by :func:`render_acl` (a ``# client NAME role ROLE`` line
    before each ``user`` block); other lines are ignored."""
    clients: list[Client] = []
    for line in text.splitlines():
        m = _ACL_CLIENT_RE.fullmatch(line.strip())
        if m and m.group(2) in ROLES and NAME_RE.fullmatch(m.group(1)):
            clients.append(Client(m.group(1), m.group(2)))  # type: ignore[arg-type] # role checked just above
    return clients


def passwd_users(text: str) -> list[str]:
    """User names in a mosquitto password file (``user:hash`` lines)."""
    return [line.split(":", 1)[0] for line in text.splitlines() if ":" in line and not line.startswith("#")]


def passwd_set(text: str, user: str, hashed_line: str) -> str:
    """The password file with ``user``'s line replaced by (or extended with) ``hashed_line``."""
    lines = [ln for ln in text.splitlines() if ln.split(":", 1)[0] != user]
    return "\n".join([*lines, hashed_line]) + "\n"


def passwd_remove(text: str, user: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.split(":", 1)[0] != user]
    return "\n".join(lines) + "\n" if lines else ""


# --- the config drop-in --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfOptions:
    paths: BrokerPaths
    local_port: int = LOCAL_PORT
    lan_port: int = LAN_PORT
    lan_address: str | None = None  # None: every interface
    #: Single-valued options the main mosquitto.conf already sets (Debian's sets persistence_location):
    #: mosquitto refuses a second value, so these are left to it.
    set_elsewhere: frozenset[str] = field(default_factory=frozenset)


def render_conf(opt: ConfOptions) -> str:
    p = opt.paths
    persistence = (f"# persistence_location: set in {p.main_conf} (mosquitto refuses a second value)\n"
                   if "persistence_location" in opt.set_elsewhere
                   else f"persistence_location {p.persistence_dir}/\n")
    lan = f"listener {opt.lan_port}" + (f" {opt.lan_address}" if opt.lan_address else "")
    return f"""\
# The edgeagent local broker: wristband gateways, guard-room panels and the edgeagent daemon.
# Written by `edgeagent broker setup`, which rewrites it on every run (keep your own settings in
# another file of this directory). See the README, "The box's own broker".

# One set of accounts and one ACL for every listener below.
per_listener_settings false
allow_anonymous false
password_file {p.passwd}
acl_file {p.acl}

# The largest legitimate message is a BLE gateway's batch: the decoders read at most
# {MAX_PAYLOAD_BYTES} bytes of payload, and 1 KiB more covers the header, the topic and MQTT 5
# properties. A bigger packet is refused and its sender disconnected before anyone receives it.
max_packet_size {MAX_PACKET_BYTES}
# Alarm messages are small and must leave at once (Nagle's algorithm held them ~40 ms).
set_tcp_nodelay true
# Messages queued for a client that is away (the daemon while it restarts), per client.
max_queued_messages {MAX_QUEUED_MESSAGES}
max_queued_bytes {MAX_QUEUED_BYTES}

# Queued messages and retained alarm states survive a broker restart. Saved at shutdown and every
# 60 s: a power cut loses at most a minute of what was queued, at one small write a minute.
persistence true
{persistence}autosave_interval 60
# A device removed without `edgeagent broker remove` stops holding a queue after 30 days.
persistent_client_expiration 30d

# Loopback, plain: the edgeagent daemon and tools on this box.
listener {opt.local_port} 127.0.0.1

# The compound's LAN, which is not trusted: TLS only, with the certificate made at setup.
{lan}
cafile {p.ca_cert}
certfile {p.lan_cert}
keyfile {p.lan_key}
tls_version tlsv1.2
"""


# --- certificates --------------------------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeagent"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def make_ca(key: rsa.RSAPrivateKey, hostname: str, now: dt.datetime) -> x509.Certificate:
    subject = _name(f"edgeagent local broker CA ({hostname})")
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # a device clock a little behind
            .not_valid_after(now + dt.timedelta(days=CA_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def make_server_cert(ca_key: rsa.RSAPrivateKey, ca_cert: x509.Certificate, key: rsa.RSAPrivateKey,
                     names: Sequence[str], now: dt.datetime) -> x509.Certificate:
    """A server certificate for ``names`` (host names and IP addresses; the first is the CN)."""
    sans: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):
        ip = _ip(n)
        sans.append(x509.IPAddress(ip) if ip is not None else x509.DNSName(n))
    return (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=SERVER_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))


def cert_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {*san.get_values_for_type(x509.DNSName), *(str(i) for i in san.get_values_for_type(x509.IPAddress))}


def server_cert_current(cert: x509.Certificate, ca_cert: x509.Certificate, names: Iterable[str],
                        now: dt.datetime) -> bool:
    """Whether ``cert`` was issued by ``ca_cert``, names every one of ``names`` and has
    :data:`RENEW_BEFORE_DAYS` left: if so, setup keeps it."""
    wanted = {str(_ip(n) or n) for n in names}
    return (cert.issuer == ca_cert.subject and wanted <= cert_names(cert)
            and cert.not_valid_after_utc - now > dt.timedelta(days=RENEW_BEFORE_DAYS))


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate as colon-separated hex, the form devices and openssl show."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --- reading and auditing any mosquitto config ---------------------------------------------------------

@dataclass(frozen=True)
class Directive:
    key: str
    args: tuple[str, ...]
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def parse_conf(text: str, source: str) -> list[Directive]:
    """mosquitto.conf(5) lines: ``key value...``; ``#`` starts a comment line; blank lines are skipped."""
    out: list[Directive] = []
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, posix=True)
        except ValueError:
            words = line.split()
        out.append(Directive(words[0], tuple(words[1:]), source, no))
    return out


Severity = Literal["fail", "warn"]


@dataclass(frozen=True)
class Finding:
    severity: Severity
    text: str


@dataclass
class _Security:
    allow_anonymous: bool | None = None
    password_file: str | None = None
    acl_file: str | None = None
    plugin: bool = False
    where: str = ""


@dataclass
class _Listener:
    port: str
    address: str | None
    where: str
    tls: bool = False
    security: _Security = field(default_factory=_Security)


_LOOPBACK_NAMES: Final = {"localhost", "ip6-localhost"}


def _loopback(address: str | None) -> bool:
    if address is None:
        return False  # every interface
    ip = _ip(address)
    return address in _LOOPBACK_NAMES if ip is None else ip.is_loopback


def audit(directives: Sequence[Directive], exists: Callable[[str], bool] | None = None) -> list[Finding]:
    """What makes a broker config unsafe for an untrusted LAN: anonymous access, no password file, no
    ACL, listeners on the LAN in clear text. With ``per_listener_settings true`` every listener needs its
    own settings, and the global ones then apply to none. ``exists`` tells whether a named password file or
    ACL is there (not checked without it)."""
    per_listener = False
    glob = _Security(where="global")
    listeners: list[_Listener] = []
    default_listener: _Listener | None = None
    current: _Listener | None = None
    findings: list[Finding] = []
    for d in directives:
        arg = d.args[0] if d.args else ""
        if d.key == "per_listener_settings":
            per_listener = arg == "true"
        elif d.key == "listener":
            current = _Listener(arg, d.args[1] if len(d.args) > 1 else None, d.where)
            current.security.where = f"listener {arg} ({d.where})"
            listeners.append(current)
        elif d.key == "port":
            # The old default listener: every interface.
            default_listener = _Listener(arg, None, d.where)
            default_listener.security.where = f"port {arg} ({d.where})"
        elif d.key in {"certfile", "psk_hint"}:
            target = current or default_listener
            if target is not None:
                target.tls = True
        elif d.key in {"allow_anonymous", "password_file", "acl_file", "plugin", "auth_plugin"}:
            sec = glob
            if per_listener:
                target = current or default_listener
                sec = target.security if target is not None else glob
            if d.key == "allow_anonymous":
                sec.allow_anonymous = arg == "true"
            elif d.key == "password_file":
                sec.password_file = arg
            elif d.key == "acl_file":
                sec.acl_file = arg
            else:
                sec.plugin = True
    all_listeners = ([default_listener] if default_listener else []) + listeners
    if not all_listeners:
        findings.append(Finding("warn", "no listener: mosquitto 2 then listens on localhost only, and no "
                                        "gateway or panel on the LAN can reach it"))
    scopes = [lst.security for lst in all_listeners] if per_listener else [glob]
    if per_listener:
        findings.append(Finding("warn", "per_listener_settings true: each listener needs its own "
                                        "allow_anonymous, password_file and acl_file (the global ones apply to "
                                        "none); edgeagent's setup uses false"))
    for sec in scopes:
        label = "" if sec.where == "global" else f" on {sec.where}"
        if sec.allow_anonymous:
            findings.append(Finding("fail", f"allow_anonymous true{label}: anyone on the LAN can publish "
                                            "(silence an SOS, fake an acknowledgement)"))
        if sec.password_file is None and not sec.plugin:
            findings.append(Finding("fail", f"no password_file{label}: no per-device accounts"
                                            + ("" if sec.allow_anonymous is False
                                               else ", and anonymous clients may connect")))
        elif sec.password_file is not None and exists is not None and not exists(sec.password_file):
            findings.append(Finding("fail", f"password_file {sec.password_file}{label} does not exist"))
        if sec.acl_file is None and not sec.plugin:
            findings.append(Finding("fail", f"no acl_file{label}: every account may publish anywhere, the "
                                            "guard-room and acknowledgement topics included"))
        elif sec.acl_file is not None and exists is not None and not exists(sec.acl_file):
            findings.append(Finding("fail", f"acl_file {sec.acl_file}{label} does not exist"))
    for lst in all_listeners:
        if not _loopback(lst.address) and not lst.tls:
            on = lst.address or "every interface"
            findings.append(Finding("fail", f"listener {lst.port} on {on} ({lst.where}) is not TLS: "
                                            "passwords and alarms cross the LAN in clear"))
    keys = {d.key for d in directives}
    if "max_packet_size" not in keys:
        findings.append(Finding("warn", "no max_packet_size: one client can send a message of up to 256 MB"))
    if "set_tcp_nodelay" not in keys:
        findings.append(Finding("warn", "no set_tcp_nodelay true: small alarm messages can wait ~40 ms"))
    return findings
