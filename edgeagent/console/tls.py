"""The console's HTTPS certificate: the one the installer supplies, or a self-signed one made once.

A guard-room PC on the LAN reaches the box by its address; no public CA can sign for that, so the box makes
its own certificate at first start (ECDSA P-256, ten years, the bound address and ``localhost`` as names) and
keeps it in its state directory (key mode 0600). The browser asks once to trust it; its SHA-256 fingerprint
is logged and printed by ``edgeagent console cert`` so the installer can compare it with what the browser
shows. A site with its own CA gives ``console.tls.cert_file`` and ``key_file`` instead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
VALID_DAYS = 3650


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data``: a temp file in the same directory with ``mode``, fsync, rename (the
    console's certificate, key and sessions file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def make_self_signed(folder: Path, common_name: str, hosts: list[str]) -> tuple[Path, Path]:
    """Write a new key and self-signed certificate for ``hosts`` (addresses or names) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        if host in ("", "0.0.0.0", "::"):  # noqa: S104 - a wildcard bind is not a name to certify
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeagent console")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = folder / KEY_FILE, folder / CERT_FILE
    write_atomically(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), 0o600)
    write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    # Made by root's CLI (``edgeagent console cert``) in the daemon's state directory: the daemon's account must
    # read the key, so everything made here belongs to whoever owns the state directory (folder's grandparent).
    owner = folder.parent.parent.stat()
    for path in (folder.parent, folder, key_path, cert_path):
        with contextlib.suppress(PermissionError):
            os.chown(path, owner.st_uid, owner.st_gid)
    return cert_path, key_path


def fingerprint(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def ensure_certificate(folder: Path, common_name: str, hosts: list[str]) -> tuple[Path, Path, bool]:
    """The self-signed pair in ``folder``, made if missing; (cert, key, made_now)."""
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path, False
    cert_path, key_path = make_self_signed(folder, common_name, hosts)
    return cert_path, key_path, True


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    return ctx
