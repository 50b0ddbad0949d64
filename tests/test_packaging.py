"""The distribution: the wheel holds every package of the source tree under `edgeagent` with its data files,
installs with its dependencies into a fresh virtualenv and runs from there (`--version`, `config validate`,
the demo); `systemd/install.sh --root` installs it into a scratch root whose daemon starts and stops cleanly;
the editable install imports the mapped packages (cloud-bridge/, drivers/, ...) too.

No network: the wheel is built with `pip wheel --no-build-isolation` (the dev extras bring a setuptools new
enough for pyproject.toml) from a clean copy of the tree. A fresh virtualenv gets the wheel alone
(`--no-deps --no-index`) and sees the dependencies already installed in this one through a path line
(`deps.pth`): a plain path, so this environment's editable install of edgeagent (activated by a .pth file
of its own, which only a site directory's scan would run) stays invisible. That the wheel declares every
dependency it needs is checked against its own metadata (`Requires-Dist`), each requirement satisfied.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL_SH = ROOT / "systemd" / "install.sh"
# Import name -> source folder (edgeagent.cloud_bridge -> cloud-bridge, ...), as pyproject.toml maps them.
PACKAGE_DIRS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
    "package-dir"]
# Folders with an __init__.py that are not part of the distribution.
NOT_SHIPPED = {"tests"}
PROBE = ("import edgeagent.cloud_bridge.uplink, edgeagent.drivers.sim.devices, edgeagent.models, "
         "edgeagent.app, edgeagent.cloud_bridge.contract as c; import pathlib, sys; "
         "print(pathlib.Path(c.__file__).parent / 'contract')")


def _skipped(top: bool, name: str) -> bool:
    """Not source: caches, virtualenvs, build output, VCS data."""
    return (name == "__pycache__" or name.endswith(".egg-info")
            or (top and (name.startswith(".") or name in {"build", "dist", "state"})))


def source_packages() -> dict[str, Path]:
    """Every folder of the tree holding an __init__.py, by the dotted name it must have in the wheel."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not _skipped(here == ROOT, d))
        if "__init__.py" not in filenames or here == ROOT:
            continue
        rel = here.relative_to(ROOT)
        if rel.parts[0] in NOT_SHIPPED:
            continue
        # The longest mapped folder containing this one gives the import name's prefix.
        mapped = [(name, Path(folder)) for name, folder in PACKAGE_DIRS.items()
                  if rel == Path(folder) or Path(folder) in rel.parents]
        assert mapped, (f"{rel}/ has an __init__.py but is under no package-dir of pyproject.toml: it would "
                        "not be installed (map it, or add it to NOT_SHIPPED here)")
        name, folder = max(mapped, key=lambda m: len(m[1].parts))
        found[".".join((name, *rel.relative_to(folder).parts))] = here
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a process that must see only the fresh install, never this checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "EDGEAGENT_CONFIG"}}
    env.update(COLUMNS="200", **extra)
    return env


def run(args: list[str | Path], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    # A clean copy: setuptools would also pack whatever an earlier build left in the checkout's build/lib.
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=lambda d, names: {n for n in names if _skipped(Path(d) == ROOT, n)},
                    symlinks=True)
    r = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
             "-w", work / "dist", src], cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    (work / "dist" / "build.log").write_text(r.stderr)
    return next((work / "dist").glob("edgeagent-*.whl"))


def venv_with_deps(venv: Path) -> Path:
    """A new virtualenv whose only package is none yet, with this environment's dependencies on its path."""
    r = run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent)
    assert r.returncode == 0, r.stderr
    r = run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=venv.parent)
    assert r.returncode == 0, r.stderr
    deps = sysconfig.get_paths()["purelib"]
    Path(r.stdout.strip(), "deps.pth").write_text(deps + "\n")
    return venv


REQUIREMENTS_MET = """
import importlib.metadata as md, sys
from packaging.requirements import Requirement
missing = []
for line in md.requires("edgeagent") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(f"{req} (not installed)")
        continue
    if not req.specifier.contains(have, prereleases=True):
        missing.append(f"{req} (have {have})")
print("\\n".join(missing))
sys.exit(1 if missing else 0)
"""


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv (not seeing this one's edgeagent) with the wheel; dependencies as described above."""
    venv = venv_with_deps(tmp_path_factory.mktemp("fresh") / "venv")
    r = run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps",
             "--no-index", wheel], cwd=venv.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    return venv


# Imports every module of the installed package, then names each third-party distribution it loaded that
# is not in the closure of edgeagent's declared requirements: something a real install would lack.
UNDECLARED = """
import importlib, importlib.metadata as md, pkgutil, sys, sysconfig
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon
own = set(sys.modules)  # this check's own imports
import edgeagent
for info in pkgutil.walk_packages(edgeagent.__path__, "edgeagent."):
    if not info.name.endswith("__main__"):  # that one runs the command
        importlib.import_module(info.name)
closure, todo = set(), ["edgeagent"]
while todo:
    name = canon(todo.pop())
    if name in closure:
        continue
    closure.add(name)
    for line in md.requires(name) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
owners = md.packages_distributions()
stdlib = sysconfig.get_paths()["stdlib"]
# Imported by a dependency only when it happens to be installed (httpx, which onvif-zeep-async uses, loads
# click for its optional command line if click is there): not a requirement of ours.
optional = {"click"}
bad = set()
for name, mod in list(sys.modules.items()):
    if name in own:
        continue
    path = getattr(mod, "__file__", None) or ""
    top = mod.__name__.split(".")[0]
    if not path or path.startswith(stdlib) or top in sys.stdlib_module_names or top == "edgeagent" or top in optional:
        continue
    dists = {canon(d) for d in owners.get(top, [])}
    if dists and not dists & closure:
        bad.add(f"{top} ({', '.join(sorted(dists))})")
print("\\n".join(sorted(bad)))
sys.exit(1 if bad else 0)
"""


def test_wheel_declares_what_it_needs(fresh_venv: Path, tmp_path: Path) -> None:
    r = run([fresh_venv / "bin" / "python", "-c", REQUIREMENTS_MET], cwd=tmp_path)
    assert r.returncode == 0, f"requirements of the wheel not met: {r.stdout}{r.stderr}"
    r = run([fresh_venv / "bin" / "python", "-c", UNDECLARED], cwd=tmp_path)
    assert r.returncode == 0, f"the wheel's code imports what it does not declare: {r.stdout}{r.stderr}"


def test_wheel_builds_without_a_setuptools_warning(wheel: Path) -> None:
    # pip shows the build backend's warnings (deprecations, "Package would be ignored", ...) as
    # BuildBackendWarning, even with -q.
    log = (wheel.parent / "build.log").read_text()
    assert not re.search(r"BuildBackendWarning|\w+Warning:", log), log


def test_wheel_holds_every_package_of_the_tree(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names if not n.startswith("edgeagent-")}
    assert top == {"edgeagent"}, f"top-level names other than edgeagent: {top}"
    packages = source_packages()
    for required in ("edgeagent", "edgeagent.cli", "edgeagent.transport", "edgeagent.kernel",
                     "edgeagent.drivers.modbus", "edgeagent.cloud_bridge"):
        assert required in packages, required  # the walk itself finds them
    for name, folder in packages.items():
        where = name.replace(".", "/")
        assert f"{where}/__init__.py" in names, f"{folder} (package {name}) is missing from the wheel"
        for module in folder.glob("*.py"):
            assert f"{where}/{module.name}" in names, f"{module} is missing from the wheel"
    data = ["edgeagent/py.typed", "edgeagent/cloud_bridge/contract/asyncapi.yaml",
            "edgeagent/cloud_bridge/contract/schemas/batch.json"]
    data += [f"edgeagent/drivers/modbus/profiles/{p.name}" for p in (ROOT / "drivers/modbus/profiles").glob("*.yaml")]
    data += [f"edgeagent/cloud_bridge/contract/schemas/{p.name}"
             for p in (ROOT / "cloud-bridge/contract/schemas").glob("*.json")]
    data += [f"edgeagent/console/static/{p.name}" for p in (ROOT / "edgeagent/console/static").iterdir()]
    assert len(data) > 5
    for required in data:
        assert required in names, required
    metadata = zipfile.ZipFile(wheel).read("edgeagent-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "aiomqtt" not in metadata  # nothing imports it


def test_wheel_in_a_fresh_venv_runs_version_validate_and_the_demo(fresh_venv: Path, tmp_path: Path) -> None:
    py, exe = fresh_venv / "bin" / "python", fresh_venv / "bin" / "edgeagent"
    # The code comes from the fresh venv, not from this checkout or its editable install.
    r = run([py, "-c", PROBE + "; import edgeagent.cli, edgeagent.transport; print(edgeagent.cli.__file__)"],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert all(line.startswith(str(fresh_venv)) for line in r.stdout.split()), r.stdout

    r = run([exe, "--version"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "edgeagent 0.1.0"

    r = run([exe, "config", "validate", "--config", ROOT / "config" / "example.yaml"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "valid" in r.stdout
    config = tmp_path / "site.yaml"
    r = run([exe, "init", "--site-id", "site-p", "--gateway-id", "gw-p", "--config", config], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run([exe, "config", "validate", "--config", config], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "site site-p, gateway gw-p" in r.stdout

    # The demo: the daemon, its drivers, the Modbus profiles and the contract, all from the wheel.
    r = run([exe, "demo", "--seconds", "4"], cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert re.search(r"#\d+\s+event\s+gateway\.started", r.stdout), r.stdout[-3000:]
    assert re.search(r"#\d+\s+telemetry\s+sensor\.reading", r.stdout), r.stdout[-3000:]
    accepted = re.search(r"summary: accepted .*?\b(\d+) event\b", r.stdout)  # classes with none are left out
    assert accepted and int(accepted.group(1)) > 0, r.stdout[-1000:]


# --- systemd/install.sh --root ---------------------------------------------------------------------------

class NotifySocket:
    """Stands in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, what: str, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
        """Whether `what` arrives (give up early once the process is gone and nothing is queued)."""
        deadline = time.monotonic() + timeout_s
        self.sock.settimeout(0.2)
        while what not in self.messages and time.monotonic() < deadline:
            try:
                self.messages += self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                if proc.poll() is not None:
                    break
        return what in self.messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """For unix sockets, whose paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="ea-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_install_sh_into_a_scratch_root_and_run_the_daemon(wheel: Path, tmp_path: Path, short_dir: Path) -> None:
    def install(*args: str | Path) -> subprocess.CompletedProcess[str]:
        # Any interpreter may build the venv under --root (the service's ProtectHome= check is skipped).
        # No network: the script's pip installs the wheel alone, into the venv made below (kept as it is).
        return run(["bash", INSTALL_SH, *args], cwd=tmp_path, PYTHON=sys.executable, PIP_NO_DEPS="1",
                   PIP_NO_INDEX="1")

    root = tmp_path / "root"
    assert install("--root", root, "--enable", "--site-id", "s", "--gateway-id", "g", wheel).returncode == 2
    assert install("--root").returncode == 2
    assert not root.exists()

    real_paths = [Path("/opt/edgeagent"), Path("/etc/edgeagent"), Path("/etc/modules-load.d/edgeagent.conf"),
                  Path("/usr/local/lib/systemd/system/edgeagent.service")]
    existed = {p: p.exists() for p in real_paths}
    (root / "opt/edgeagent").mkdir(parents=True)
    venv_with_deps(root / "opt/edgeagent/venv")  # this environment's pip comes with the dependencies
    r = install("--root", root, "--site-id", "site-r", "--gateway-id", "gw-r", wheel)
    assert r.returncode == 0, r.stdout + r.stderr
    for skipped in ("systemd-sysusers", "systemd-tmpfiles", "modprobe", "chown", "systemctl daemon-reload"):
        assert re.search(rf"==> skipping {skipped}.*\(--root\)", r.stdout), (skipped, r.stdout)
    assert {p: p.exists() for p in real_paths} == existed, "install.sh --root wrote outside its root"

    for f in ("usr/local/lib/systemd/system/edgeagent.service", "usr/local/lib/sysusers.d/edgeagent.conf",
              "usr/local/lib/tmpfiles.d/edgeagent.conf", "etc/modules-load.d/edgeagent.conf"):
        assert (root / f).is_file(), f
    config = root / "etc/edgeagent/edgeagent.yaml"
    assert config.stat().st_mode & 0o777 == 0o640
    assert (root / "etc/edgeagent/credentials").stat().st_mode & 0o777 == 0o700
    exe = root / "opt/edgeagent/venv/bin/edgeagent"

    r = run([exe, "--version"], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "edgeagent 0.1.0", r.stdout + r.stderr
    r = run([exe, "config", "validate", "--config", config], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "site site-r, gateway gw-r" in r.stdout

    # Run the installed config, with the uplink pointed at a closed local port and health on a free one.
    text = config.read_text()
    for default in ("broker: mqtts://platform.example:8883", "port: 9108"):
        assert default in text, default
    health_port = free_port()
    run_config = tmp_path / "run.yaml"
    run_config.write_text(text.replace("broker: mqtts://platform.example:8883", f"broker: mqtt://127.0.0.1:{free_port()}")
                          .replace("port: 9108", f"port: {health_port}"))
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text("not-used\n")
    (short_dir / "run").mkdir()
    notify = NotifySocket(short_dir / "notify")
    log = tmp_path / "daemon.log"
    # What systemd would hand over: state, runtime and credential directories, the notify socket.
    env = clean_env(STATE_DIRECTORY=str(tmp_path / "state"), RUNTIME_DIRECTORY=str(short_dir / "run"),
                    CREDENTIALS_DIRECTORY=str(credentials), NOTIFY_SOCKET=str(notify.path))
    with log.open("wb") as out:
        proc = subprocess.Popen([str(exe), "run", "--config", str(run_config)], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        ready = notify.wait_for("READY=1", proc, 120)
        assert ready, f"no READY=1 (exit code {proc.poll()}):\n{log.read_text()[-3000:]}"
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=10) as resp:
            assert resp.status == 200
        assert (tmp_path / "state" / "outbox.db").exists()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
        output = log.read_text()
        assert rc == 0, output[-3000:]
        assert notify.wait_for("STOPPING=1", proc, 10), notify.messages
        assert "Traceback" not in output, output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


# --- the editable install --------------------------------------------------------------------------------

def test_editable_install_imports_mapped_packages(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == ROOT / "cloud-bridge" / "contract"


def test_no_top_level_drivers_or_models_module(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", "import drivers"], capture_output=True, cwd=tmp_path, check=False)
    assert r.returncode != 0
    r = subprocess.run([sys.executable, "-c", "import models"], capture_output=True, cwd=tmp_path, check=False)
    assert r.returncode != 0
