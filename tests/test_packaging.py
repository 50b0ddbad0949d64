"""The distribution: every import name lives under `edgeagent`, the wheel carries the contract files,
and both the wheel and the editable install import the mapped packages (cloud-bridge/, drivers/, ...)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import edgeagent.cloud_bridge.uplink, edgeagent.drivers.sim.devices, edgeagent.models, "
         "edgeagent.app, edgeagent.cloud_bridge.contract as c; import pathlib, sys; "
         "print(pathlib.Path(c.__file__).parent / 'contract')")


def test_wheel_layout_and_import(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(out.glob("edgeagent-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("edgeagent-")}
    assert top == {"edgeagent"}, f"top-level names other than edgeagent: {top}"
    for required in ("edgeagent/cloud_bridge/uplink.py", "edgeagent/drivers/sim/devices.py",
                     "edgeagent/cloud_bridge/contract/asyncapi.yaml",
                     "edgeagent/cloud_bridge/contract/schemas/batch.json", "edgeagent/py.typed"):
        assert required in names, required
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True)
    # Run from an empty directory with only the wheel's files ahead of the dependencies.
    r = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {PROBE}"],
                       capture_output=True, text=True, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stderr
    assert str(target) in r.stdout and Path(r.stdout.strip(), "asyncapi.yaml").exists()


def test_editable_install_imports_mapped_packages(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == ROOT / "cloud-bridge" / "contract"


def test_no_top_level_drivers_or_models_module(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", "import drivers"], capture_output=True, cwd=tmp_path, check=False)
    assert r.returncode != 0
    r = subprocess.run([sys.executable, "-c", "import models"], capture_output=True, cwd=tmp_path, check=False)
    assert r.returncode != 0
