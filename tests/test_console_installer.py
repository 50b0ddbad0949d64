"""The console's installer pages in a real browser (Playwright driving /usr/bin/chromium): a camera playing a
real clip through the daemon's camera pipeline; the installer draws a zone and a line on its snapshot and saves
them to the config file through the CLI's comment-keeping editor; a bad drawing is refused with the reason and
the file left as it was; a guard may not configure; the checks (doctor) run from the page."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page

from edgeagent.app import Daemon
from edgeagent.capabilities import load_config
from edgeagent.cli.console_cmd import ConfigTools
from edgeagent.console.accounts import AccountStore
from edgeagent.console.server import USERS_PATH
from edgeagent.demo import DEMO_CLIP
from tests.browser import chromium
from tests.helpers import config_head, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

PASSWORDS = {"installer-ma": "install-pass-1", "guard-li": "guard-pass-1"}


def config_text(state: Path) -> str:
    return "# Site: Guohuai compound, gate 2 (keep this header)\n" + config_head(state) + f"""\
console:
  host: 127.0.0.1   # loopback in the test; the LAN address on a box
  port: 0
cameras:
  privacy: {{enabled: false}}   # nothing leaves the box in this test
devices:
  # The path camera, mounted above the bike shed.
  - type: camera
    id: cam-path
    name: Campus path
    rtsp: {{detect_url: "{DEMO_CLIP.as_uri()}"}}
    detect: {{fps: 2, classes: [person, bicycle, car]}}
    lines:
      - {{name: middle, a: [0.05, 0.55], b: [0.95, 0.55]}}   # the path's middle
# end of devices: more cameras go above this line
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


async def login(browser: Browser, url: str, user: str) -> Page:
    ctx = await browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    page = await ctx.new_page()
    await page.goto(url + "/")
    await page.fill("#login-user", user)
    await page.fill("#login-pass", PASSWORDS[user])
    await page.click("#login button[type=submit]")
    await page.wait_for_selector("#tabs:not([hidden])")
    return page


async def click_at(page: Page, x: float, y: float) -> None:
    canvas = page.locator("#inst-canvas")
    await canvas.scroll_into_view_if_needed()
    box = await canvas.bounding_box()
    assert box is not None
    await canvas.click(position={"x": x * box["width"], "y": y * box["height"]})


async def test_zone_and_line_drawn_on_the_snapshot_land_in_the_config_with_its_comments(
        browser: Browser, tmp_path: Path) -> None:
    cfg = tmp_path / "edgeagent.yaml"
    cfg.write_text(config_text(tmp_path / "state"))
    store = AccountStore(tmp_path / "state" / USERS_PATH)
    for user, role in (("installer-ma", "installer"), ("guard-li", "guard")):
        store.add(user, role, PASSWORDS[user])
    shots = tmp_path / "screenshots"
    shots.mkdir()
    daemon = Daemon(load_config(cfg), config_dir=tmp_path, console_tools=ConfigTools(cfg))
    seen: list[Any] = []
    daemon.sink.observe(lambda e, _s: seen.append(e))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(shutdown_trigger=stop.wait))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 30)
        assert daemon.console is not None and daemon.console.url is not None
        runner = daemon.capability("cameras").service.runners["cam-path"]  # type: ignore[union-attr]
        assert await wait_until(lambda: runner.pipeline.latest_frame is not None, 30), "no frame from the clip"
        url = daemon.console.url

        # A guard sees no installer tab and may not save.
        guard = await login(browser, url, "guard-li")
        assert await guard.is_hidden('#tabs [data-tab="installer"]')
        status = await guard.evaluate("""async () => {
            const s = await (await fetch('/api/session')).json();
            const r = await fetch('/api/cameras/cam-path/shapes', {method: 'POST', headers: {
                'Content-Type': 'application/json', 'X-CSRF-Token': s.csrf},
                body: JSON.stringify({kind: 'zone', shape: {name: 'x', points: [[0, 0], [1, 0], [1, 1]]}})});
            return r.status; }""")
        assert status == 403
        await guard.click('#tabs [data-tab="cameras"]')
        await guard.wait_for_selector('[data-camera="cam-path"][data-drawn="1"]', timeout=15_000)
        await guard.screenshot(path=str(shots / "cameras.png"), full_page=True)

        page = await login(browser, url, "installer-ma")
        await page.click('#tabs [data-tab="installer"]')
        await page.wait_for_selector('#inst-canvas[data-loaded="1"]', timeout=15_000)
        before = cfg.read_text()
        # A zone with two points is refused with the reason; the file is untouched.
        await page.fill("#inst-name", "bike-shed")
        for x, y in ((0.1, 0.7), (0.4, 0.7)):
            await click_at(page, x, y)
        await page.click("#inst-save")
        await page.wait_for_selector("#inst-result.error", timeout=10_000)
        assert "points" in (await page.inner_text("#inst-result"))
        assert await page.get_attribute("#inst-canvas", "data-points") == "2"
        assert cfg.read_text() == before
        # The zone: four corners.
        await page.click("#inst-clear")
        for x, y in ((0.1, 0.7), (0.4, 0.7), (0.45, 0.95), (0.05, 0.95)):
            await click_at(page, x, y)
        assert await page.get_attribute("#inst-canvas", "data-points") == "4"
        await page.screenshot(path=str(shots / "installer-zone-drawn.png"), full_page=True)
        await page.click("#inst-save")
        await page.wait_for_selector("#inst-result.ok", timeout=10_000)
        # A line.
        await page.select_option("#inst-kind", "line")
        await page.fill("#inst-name", "shed-door")
        await click_at(page, 0.6, 0.3)
        await click_at(page, 0.9, 0.35)
        middle_before = runner.pipeline._rules.line_counts("middle")
        await page.click("#inst-save")
        await page.wait_for_selector("#inst-result.ok", timeout=10_000)
        await page.screenshot(path=str(shots / "installer-saved.png"), full_page=True)
        # Both apply to the running camera at once (no rule on it names its zones), and the page says so in
        # its language; the line that was not redrawn keeps its counts.
        assert await page.get_attribute("#inst-result", "data-applied") == "1"
        assert "已立即生效" in await page.inner_text("#inst-result")
        assert [z.name for z in runner.cam.zones] == ["bike-shed"]
        assert [ln.name for ln in runner.cam.lines] == ["middle", "shed-door"]
        assert runner.pipeline._rules.occupancy("bike-shed") is not None
        assert runner.pipeline._rules.line_counts("shed-door") == {"in": 0, "out": 0}
        assert all(v >= middle_before[k] for k, v in runner.pipeline._rules.line_counts("middle").items())

        text = cfg.read_text()
        for comment in ("# Site: Guohuai compound, gate 2 (keep this header)",
                        "# loopback in the test; the LAN address on a box", "# nothing leaves the box in this test",
                        "# The path camera, mounted above the bike shed.", "# the path's middle",
                        "# end of devices: more cameras go above this line"):
            assert comment in text, f"comment lost: {comment}\n{text}"
        assert text.rstrip().endswith("# end of devices: more cameras go above this line"), text
        cam = next(d for d in load_config(cfg).devices if d.id == "cam-path")
        zone = next(z for z in cam.zones if z.name == "bike-shed")  # type: ignore[attr-defined]
        want = [(0.1, 0.7), (0.4, 0.7), (0.45, 0.95), (0.05, 0.95)]
        assert len(zone.points) == 4
        assert all(abs(p[0] - w[0]) < 0.02 and abs(p[1] - w[1]) < 0.02 for p, w in zip(zone.points, want, strict=True))
        line = next(ln for ln in cam.lines if ln.name == "shed-door")  # type: ignore[attr-defined]
        assert abs(line.a[0] - 0.6) < 0.02 and abs(line.b[1] - 0.35) < 0.02
        assert [ln.name for ln in cam.lines] == ["middle", "shed-door"]  # type: ignore[attr-defined]
        audits = [(e.data["user"], e.data["action"], e.data["outcome"]) for e in seen if e.type == "console.audit"]
        assert ("installer-ma", "config.zone", "ok") in audits and ("installer-ma", "config.line", "ok") in audits
        assert ("guard-li", "config.shape", "refused") in audits

        # The checks, from the page.
        await page.click("#doctor-run")
        await page.wait_for_selector("#doctor tbody tr td.ok", timeout=60_000)
        first = await page.inner_text("#doctor tbody tr:first-child")
        assert first.startswith("config") and "valid" in first, first
        await page.screenshot(path=str(shots / "installer-doctor.png"), full_page=True)
        for p in (page, guard):
            await p.context.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
