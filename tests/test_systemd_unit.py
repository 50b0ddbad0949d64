"""The systemd packaging in systemd/: the unit passes `systemd-analyze verify` without a warning,
keeps its key settings, the sysusers/tmpfiles entries apply cleanly to a scratch root, and the
installer is valid, lint-clean shell.

No systemd needs to run as PID 1: `verify` and `security --offline` read unit files, and
sysusers/tmpfiles work on a directory given with --root.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = ROOT / "systemd"
UNIT = SYSTEMD_DIR / "edgeagent.service"
SYSUSERS = SYSTEMD_DIR / "edgeagent.sysusers"
TMPFILES = SYSTEMD_DIR / "edgeagent.tmpfiles"
INSTALL_SH = SYSTEMD_DIR / "install.sh"

DAEMON = "/opt/edgeagent/venv/bin/edgeagent"
CREDENTIAL_DIR = "/etc/edgeagent/credentials"

# Quiet, uncoloured, unpaged output from the systemd tools, whatever the caller's terminal is.
SYSTEMD_ENV = {
    **os.environ,
    "SYSTEMD_LOG_LEVEL": "info",
    "SYSTEMD_LOG_COLOR": "0",
    "SYSTEMD_LOG_TARGET": "console",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}


def _systemd_tool(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/bin/{name}") if Path(p).exists()), None)
    if found is None:
        pytest.fail(f"{name} is not installed; the systemd unit cannot be checked without it: "
                    "apt-get install systemd")
    return found


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                          env=SYSTEMD_ENV, cwd=cwd)


def _directives(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values in file order. Comments, blank lines and line joins as systemd has them."""
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        out[(section, key.strip())].append(value.strip())
    return out


def _one(d: dict[tuple[str, str], list[str]], section: str, key: str) -> str:
    values = d.get((section, key), [])
    assert len(values) == 1, f"[{section}] {key}= should be set exactly once, found {values}"
    return values[0]


def _runnable_copy(dest: Path) -> Path:
    """The unit, changed only where this machine differs from a gateway: ExecStart= names an
    executable that exists here, and the credential sources are scratch files."""
    exe = ROOT / ".venv" / "bin" / "edgeagent"
    if not os.access(exe, os.X_OK):
        exe = Path(sys.executable)
    creds = dest / "credentials"
    creds.mkdir()
    for name in ("mqtt-password", "mqtt-client-key"):
        (creds / name).write_text("not-a-secret\n")
    text = UNIT.read_text()
    assert f"ExecStart={DAEMON} " in text
    text = text.replace(f"ExecStart={DAEMON} ", f"ExecStart={exe} ")
    text = text.replace(f":{CREDENTIAL_DIR}/", f":{creds}/")
    unit = dest / UNIT.name
    unit.write_text(text)
    return unit


def _lines_about(output: str, unit: Path) -> list[str]:
    """Lines of systemd-analyze output that concern our unit (not unrelated units on this host)."""
    return [ln for ln in output.splitlines() if unit.name in ln or str(unit.parent) in ln]


def _verify(unit: Path) -> tuple[int, list[str]]:
    tool = _systemd_tool("systemd-analyze")
    # --recursive-errors=no: a broken unit elsewhere on the host (say mosquitto.service, which
    # ours is ordered after) must not fail this test; only our own unit's lines are judged.
    proc = _run([tool, "verify", "--recursive-errors=no", str(unit)], cwd=unit.parent)
    return proc.returncode, _lines_about(proc.stdout + proc.stderr, unit)


# --- the unit ------------------------------------------------------------------------------------

def test_unit_passes_systemd_analyze_verify_without_warnings(tmp_path: Path) -> None:
    unit = _runnable_copy(tmp_path)
    rc, complaints = _verify(unit)
    assert rc == 0, complaints
    assert complaints == [], "systemd-analyze verify complained:\n" + "\n".join(complaints)


def test_verify_check_does_catch_a_bad_line(tmp_path: Path) -> None:
    """Guard for the test above: verify exits 0 on unknown keys and bad values, so the test relies
    on reading its output. Make sure such a line really shows up there."""
    unit = _runnable_copy(tmp_path)
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nWatchdogSecs=30\n", 1))
    _, complaints = _verify(unit)
    assert any("WatchdogSecs" in ln for ln in complaints), complaints


def test_unit_sandbox_exposure_stays_low(tmp_path: Path) -> None:
    unit = _runnable_copy(tmp_path)
    tool = _systemd_tool("systemd-analyze")
    # The threshold is on a 0-100 scale: 30 is an exposure of 3.0 (it is about 2.3 today).
    # Loosening the sandbox past that should be a deliberate change of this number.
    proc = _run([tool, "security", "--offline=true", "--threshold=30", "--no-pager", str(unit)],
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr


def test_unit_key_settings() -> None:
    d = _directives(UNIT.read_text())
    svc = "Service"

    assert _one(d, svc, "ExecStart") == f"{DAEMON} run --config /etc/edgeagent/edgeagent.yaml"
    # sd_notify protocol and watchdog
    assert _one(d, svc, "Type") == "notify"
    assert _one(d, svc, "NotifyAccess") == "main"
    assert _one(d, svc, "WatchdogSec") == "30"
    assert _one(d, svc, "Restart") == "on-failure"
    assert _one(d, svc, "RestartSec") == "5"
    # the daemon flushes for ~10 s on SIGTERM; the stop timeout must leave room for that
    assert int(_one(d, svc, "TimeoutStopSec")) >= 20
    assert _one(d, svc, "KillMode") == "mixed"
    assert ("Unit", "StartLimitIntervalSec") in d
    assert ("Unit", "StartLimitBurst") in d
    assert (svc, "StartLimitIntervalSec") not in d, "StartLimit*= belong in [Unit]"

    # identity: a static user (stable owner of /var/lib/edgeagent), serial ports via dialout
    assert _one(d, svc, "User") == "edgeagent"
    assert _one(d, svc, "Group") == "edgeagent"
    assert (svc, "DynamicUser") not in d
    assert _one(d, svc, "SupplementaryGroups") == "dialout"
    assert _one(d, svc, "StateDirectory") == "edgeagent"
    assert _one(d, svc, "ConfigurationDirectory") == "edgeagent"
    assert _one(d, svc, "RuntimeDirectory") == "edgeagent"
    assert d[(svc, "Environment")] == ["PYTHONUNBUFFERED=1", "MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=131072"]

    # credentials: all loaded from /etc/edgeagent/credentials, all with a fallback so that
    # a missing file does not stop the start (systemd 252 semantics, see the unit)
    loads = d[(svc, "LoadCredential")]
    assert sorted(loads) == sorted([
        f"mqtt-password:{CREDENTIAL_DIR}/mqtt-password",
        f"mqtt-client-key:{CREDENTIAL_DIR}/mqtt-client-key",
        f"local-mqtt-password:{CREDENTIAL_DIR}/local-mqtt-password",
    ])
    fallbacks = {v.split(":", 1)[0]: v.split(":", 1)[1] for v in d[(svc, "SetCredential")]}
    assert set(fallbacks) == {"mqtt-password", "mqtt-client-key", "local-mqtt-password"}
    assert all(v == r"\n" for v in fallbacks.values()), "fallbacks must carry no data"

    # hardening
    expect = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "PrivateDevices": "no",
        "DevicePolicy": "closed",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectHostname": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "UMask": "0027",
    }
    for key, value in expect.items():
        assert _one(d, svc, key) == value, key
    assert sorted(d[(svc, "DeviceAllow")]) == sorted(
        f"char-{cls} rw" for cls in ("ttyUSB", "ttyACM", "ttyAMA", "ttyS"))
    filters = d[(svc, "SystemCallFilter")]
    assert "@system-service" in filters
    # the daemon reads the clock sync state with adjtimex(modes=0); glibc issues clock_adjtime
    allowed = " ".join(filters).split()
    assert {"adjtimex", "clock_adjtime", "clock_adjtime64"} <= set(allowed)
    # left out on purpose (reasons in the unit): must not creep back in without a look at those
    assert (svc, "ProtectClock") not in d
    assert (svc, "MemoryDenyWriteExecute") not in d
    assert _one(d, "Install", "WantedBy") == "multi-user.target"


# --- sysusers and tmpfiles -------------------------------------------------------------------------

def _scratch_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for src, sub in ((SYSUSERS, "sysusers.d"), (TMPFILES, "tmpfiles.d")):
        d = root / "usr/local/lib" / sub
        d.mkdir(parents=True)
        shutil.copy(src, d / "edgeagent.conf")
    return root


def test_sysusers_creates_user_in_dialout(tmp_path: Path) -> None:
    root = _scratch_root(tmp_path)
    tool = _systemd_tool("systemd-sysusers")
    proc = _run([tool, f"--root={root}"])
    assert proc.returncode == 0, proc.stderr
    assert "edgeagent.conf" not in proc.stderr, proc.stderr  # no complaint about our file
    passwd = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines()}
    user = passwd["edgeagent"]
    assert user[5] == "/var/lib/edgeagent"
    assert user[6] == "/usr/sbin/nologin"
    assert int(user[2]) < 1000, "a system user"
    groups = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/group").read_text().splitlines()}
    assert "edgeagent" in groups
    assert "edgeagent" in groups["dialout"][3].split(",")


def test_tmpfiles_make_credentials_root_only(tmp_path: Path) -> None:
    root = _scratch_root(tmp_path)
    creds = root / "etc/edgeagent/credentials"
    creds.mkdir(parents=True, mode=0o755)
    (creds / "mqtt-password").write_text("x\n")
    (creds / "mqtt-password").chmod(0o644)
    tool = _systemd_tool("systemd-tmpfiles")
    proc = _run([tool, f"--root={root}", "--create"])
    # Syntax problems are reported with the file name; as non-root only chown is refused.
    assert "edgeagent.conf" not in proc.stderr, proc.stderr
    if os.geteuid() != 0:
        return
    assert proc.returncode == 0, proc.stderr
    for path, mode in ((root / "etc/edgeagent", 0o755), (creds, 0o700), (creds / "mqtt-password", 0o600)):
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == mode, path
        assert (st.st_uid, st.st_gid) == (0, 0), path


# --- installer ---------------------------------------------------------------------------------

def test_install_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(INSTALL_SH)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert os.access(INSTALL_SH, os.X_OK), "install.sh should be executable"
    assert INSTALL_SH.read_text().splitlines()[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in INSTALL_SH.read_text()


def test_install_script_passes_shellcheck_when_available() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        # Not installed here (apt-get install shellcheck): this one check is not made.
        return
    proc = subprocess.run([shellcheck, "--shell=bash", str(INSTALL_SH)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_install_script_usage_and_argument_errors(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(INSTALL_SH), *args], capture_output=True, text=True,
                              timeout=60, check=False)

    helped = run("--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith("Usage: ")
    for flag in ("--site-id", "--gateway-id", "--enable"):
        assert flag in helped.stdout

    assert run().returncode == 2                      # no SOURCE
    assert run("--no-such-option", "x.whl").returncode == 2
    assert run("--site-id").returncode == 2           # flag without its value
    assert run("a.whl", "b.whl").returncode == 2
    # A missing SOURCE is refused before anything on the machine is changed (as root or not).
    missing = run(str(tmp_path / "edgeagent-0.0.0-py3-none-any.whl"))
    assert missing.returncode == 1
    assert "not found" in missing.stderr or "root" in missing.stderr
