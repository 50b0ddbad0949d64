from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.kernel.pipeline.event_types import REGISTRY
from edgeagent.kernel.pipeline.events import EventFactory
from edgeagent.kernel.runtime.clock import Clock
from tests.peers import Mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as b:
        yield b


@pytest.fixture
def factory() -> EventFactory:
    return EventFactory(REGISTRY, "site-1", "gw-1", Clock(mode="synced"))


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads behind (an outbox not closed, a client not stopped)."""
    before = set(threading.enumerate())
    yield
    deadline = 50
    leaked: list[threading.Thread] = []
    for _ in range(deadline):
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()
                  and not t.name.startswith(("asyncio_", "ThreadPoolExecutor"))]
        if not leaked:
            break
        threading.Event().wait(0.1)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two serial ends joined by socat: (server end, bus end)."""
    socat = shutil.which("socat") or "/usr/bin/socat"
    if not os.access(socat, os.X_OK):
        pytest.fail("socat is needed for the RTU tests: apt-get install socat")
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    proc = subprocess.Popen([socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not (a.exists() and b.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"socat did not create the pty pair (exit code {proc.poll()})")
            time.sleep(0.01)
        yield str(a), str(b)
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.fail(f"this test mounts a 24 MB tmpfs and needs root (CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
