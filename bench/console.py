"""Guard-room console benchmark: an SOS to its card visible in a real browser, the cost of connected screens,
and the alarm page's first render.

Run from the repository root::

    .venv/bin/python bench/console.py              # 50 alarms with 4 cameras running; 5 screens idle for 30 s
    .venv/bin/python bench/console.py --quick      # 20 alarms, 2 cameras, 10 s windows

Setup (as tests/test_console.py, with the daemon in its own process, ``python -m edgeagent run``, so that its
CPU and memory are its own): a private mosquitto on a free loopback port (the wristband input), a pymodbus
relay module (channel 1: the siren), ``--residents`` residents with a band each, the console on a free port,
and chromium driven by Playwright (``/usr/bin/chromium``, headless) in this process.

1. **SOS to card visible**, with ``--cameras`` cameras playing the campus clip through the whole camera
   pipeline (5 fps detection each, the shared engine): a MutationObserver in the guard's page stamps
   ``Date.now()`` when a card for a resident appears; this process stamps ``time.time()`` right before the
   band's publish (same clock). One SOS at a time, each by a new resident (a new alarm, never a fold), the
   next once the card is visible (at least ``--interval`` later).
2. **First render**: a new tab of the logged-in guard loads the page until the first alarm card is drawn
   (the active alarms of phase 1 are there), ``--renders`` times; the median is reported.
3. **Idle cost of screens**: a second daemon without cameras (the screens' cost, not the cameras'), nothing
   happening; the daemon process's CPU (utime + stime from /proc) over ``--window`` seconds with no screen,
   then with 5 logged-in screens on the alarm page (each holding its event stream, refreshing its state every
   10 s); the difference, as % of one core. RSS is the daemon's VmRSS with the 5 screens (its engine worker is
   another process and is not counted; the no-camera daemon has none).

Ends with exactly one line:
``RESULT visible_p50_ms=N visible_p99_ms=N idle_cpu_pct_5_screens=R rss_mb=N first_render_ms=N``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from playwright.async_api import Browser, BrowserContext, Page

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeagent.console.accounts import AccountStore  # noqa: E402
from edgeagent.console.server import USERS_PATH  # noqa: E402
from edgeagent.demo import DEMO_CLIP  # noqa: E402
from edgeagent.drivers.modbus.profile import shipped_profile  # noqa: E402
from edgeagent.drivers.modbus.sim import ProfileSimulator  # noqa: E402
from tests.browser import chromium  # noqa: E402
from tests.peers import Mosquitto, free_port, wait_port  # noqa: E402

PASSWORD = "bench-pass-1"
TICKS = os.sysconf("SC_CLK_TCK")
OBSERVER = """() => {
  window.__seen = {};
  new MutationObserver(() => {
    for (const c of document.querySelectorAll('.card.alarm .subject')) {
      const k = c.textContent;
      if (!(k in window.__seen)) window.__seen[k] = Date.now();
    }
  }).observe(document.getElementById('alarm-cards'), {childList: true, subtree: true});
}"""


def band_id(i: int) -> str:
    return f"aabbcc{i:06x}"


def write_config(path: Path, state: Path, local_port: int, modbus_port: int, console_port: int, residents: int,
                 cameras: int, health_port: int) -> None:
    lines = [
        "version: 1", "site_id: bench", "gateway_id: gw-bench", f"state_dir: {state}", "log_level: warning",
        "clock: {sync: synced}", f"health: {{host: 127.0.0.1, port: {health_port}}}",
        f"console: {{host: 127.0.0.1, port: {console_port}}}",
        "modbus:", "  buses:", f"    lan: {{kind: tcp, host: 127.0.0.1, port: {modbus_port}, timeout_s: 0.3}}",
        "cameras: {privacy: {enabled: false}}",
        "devices:",
        "  - {type: modbus.relay, id: guard-io, bus: lan, unit_id: 3, channels: {1: siren}, poll_interval_s: 1}",
    ]
    lines += [f'  - {{type: camera, id: cam-{i}, rtsp: {{detect_url: "{DEMO_CLIP.as_uri()}"}}, '
              "detect: {fps: 5, classes: [person, bicycle, car]}}" for i in range(cameras)]
    lines += ["wristbands:", f"  broker: mqtt://127.0.0.1:{local_port}", "  inputs: [{decoder: ble-json}]",
              "  zones: {gw-north: inside}", "  residents:"]
    lines += [f'    - {{id: r-{i:04d}, name: "Resident {i}", devices: ["{band_id(i)}"]}}' for i in range(residents)]
    lines += ["notifiers:", '  panel: {type: mqtt, topic: "bench/notify/{target}", '
              "targets: [guard_room, grid_worker, family]}"]
    path.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def daemon_process(cfg: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    log = open(cfg.parent / "daemon.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)], stdout=log,
                            stderr=log, cwd=ROOT)
    try:
        wait_port(port, 60)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def logged_in(browser: Browser, url: str) -> tuple[BrowserContext, Page]:
    ctx = await browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
    page = await ctx.new_page()
    await page.goto(url + "/")
    await page.fill("#login-user", "guard")
    await page.fill("#login-pass", PASSWORD)
    await page.click("#login button[type=submit]")
    await page.wait_for_selector("#tabs:not([hidden])")
    await page.wait_for_selector("#conn.on", timeout=15_000)
    return ctx, page




def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def phase_latency(args: argparse.Namespace, work: Path, browser: Browser) -> tuple[list[float], list[float]]:
    broker = Mosquitto(work / "broker")
    broker.start()
    modbus_port, console_port = free_port(), free_port()
    cfg = work / "latency.yaml"
    health_port = free_port()
    write_config(cfg, work / "state-latency", broker.port, modbus_port, console_port, args.alarms, args.cameras,
                 health_port)
    AccountStore(work / "state-latency" / USERS_PATH).add("guard", "guard", PASSWORD, replace=True)
    band = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="ble-gw-north")
    band.connect("127.0.0.1", broker.port)
    band.loop_start()
    url = f"https://127.0.0.1:{console_port}"
    visible: list[float] = []
    renders: list[float] = []
    try:
        async with ProfileSimulator({3: shipped_profile("relay-io-8ch")}, port=modbus_port), \
                contextlib.AsyncExitStack() as stack:
            stack.enter_context(daemon_process(cfg, console_port))
            ctx, page = await logged_in(browser, url)
            stack.push_async_callback(ctx.close)
            await asyncio.sleep(args.warmup)  # the cameras' sessions open, the engine warms up
            await page.evaluate(OBSERVER)
            for i in range(args.alarms):
                doc = {"event": "sos", "hr": 72, "spo2": 97, "bat": 80, "worn": True, "seq": i + 1}
                t0 = time.time() * 1000
                band.publish(f"iot/gw-north/{band_id(i)}/data", json.dumps(doc), qos=1).wait_for_publish(5)
                key = f"Resident {i} · r-{i:04d}"
                # Polled through evaluate (the page's CSP forbids the eval wait_for_function needs); the stamp
                # itself is taken in the page when the card appears.
                deadline = time.monotonic() + 30
                while (seen := await page.evaluate("k => window.__seen[k]", key)) is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no card for {key}")
                    await asyncio.sleep(0.02)
                visible.append(float(seen) - t0)
                await asyncio.sleep(args.interval)
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics", timeout=10) as resp:
                print("console counters after the alarms:", ", ".join(
                    line.replace("edgeagent_console_", "") for line in resp.read().decode().splitlines()
                    if line.startswith("edgeagent_console_")))
            for _ in range(args.renders):
                tab = await ctx.new_page()
                t0 = time.perf_counter()
                await tab.goto(url + "/")
                await tab.wait_for_selector(".card.alarm", timeout=30_000)
                renders.append((time.perf_counter() - t0) * 1000)
                await tab.close()
    finally:
        band.loop_stop()
        band.disconnect()
        broker.stop()
    return visible, renders


async def phase_idle(args: argparse.Namespace, work: Path, browser: Browser) -> tuple[float, float, float, float]:
    broker = Mosquitto(work / "broker-idle")
    broker.start()
    modbus_port, console_port = free_port(), free_port()
    cfg = work / "idle.yaml"
    write_config(cfg, work / "state-idle", broker.port, modbus_port, console_port, 5, 0, free_port())
    AccountStore(work / "state-idle" / USERS_PATH).add("guard", "guard", PASSWORD, replace=True)
    url = f"https://127.0.0.1:{console_port}"
    try:
        async with ProfileSimulator({3: shipped_profile("relay-io-8ch")}, port=modbus_port), \
                contextlib.AsyncExitStack() as stack:
            proc = stack.enter_context(daemon_process(cfg, console_port))
            await asyncio.sleep(5)  # start-up done
            c0, t0 = cpu_s(proc.pid), time.monotonic()
            await asyncio.sleep(args.window)
            base = (cpu_s(proc.pid) - c0) / (time.monotonic() - t0) * 100
            for _ in range(5):
                ctx, _page = await logged_in(browser, url)
                stack.push_async_callback(ctx.close)
            await asyncio.sleep(3)
            c0, t0 = cpu_s(proc.pid), time.monotonic()
            await asyncio.sleep(args.window)
            screens = (cpu_s(proc.pid) - c0) / (time.monotonic() - t0) * 100
            return base, screens, screens - base, rss_mb(proc.pid)
    finally:
        broker.stop()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alarms", type=int, default=50)
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--interval", type=float, default=0.3, help="pause after each card is visible (s)")
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--renders", type=int, default=5)
    ap.add_argument("--window", type=float, default=30.0, help="CPU measuring window (s)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.alarms, args.cameras, args.window, args.warmup, args.renders = 20, 2, 10.0, 5.0, 3
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        work = Path(tmp)
        async with chromium() as browser:
            visible, renders = await phase_latency(args, work, browser)
            base, screens, delta, rss = await phase_idle(args, work, browser)
    print(f"SOS to card visible, {len(visible)} alarms, {args.cameras} cameras: p50 {pct(visible, 0.5):.0f} ms, "
          f"p90 {pct(visible, 0.9):.0f} ms, p99 {pct(visible, 0.99):.0f} ms, max {max(visible):.0f} ms")
    print(f"first render of the alarm page ({args.alarms} cards): "
          f"{', '.join(f'{r:.0f}' for r in renders)} ms (median {statistics.median(renders):.0f})")
    print(f"daemon CPU, idle, no cameras: {base:.2f} % of a core without screens, {screens:.2f} % with 5 screens "
          f"(difference {delta:.2f} %); RSS with 5 screens {rss:.0f} MB")
    print(f"RESULT visible_p50_ms={pct(visible, 0.5):.0f} visible_p99_ms={pct(visible, 0.99):.0f} "
          f"idle_cpu_pct_5_screens={delta:.2f} rss_mb={rss:.0f} first_render_ms={statistics.median(renders):.0f}")


if __name__ == "__main__":
    asyncio.run(main())
