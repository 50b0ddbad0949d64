"""The guard-room console in a real browser: Playwright driving Debian's chromium (/usr/bin/chromium) against
the real daemon, with a real local mosquitto for the wristbands and a pymodbus server for the relay module
(channel 1: the siren) and the car gate. One browser and one daemon for the whole module.

What is checked: a wristband SOS appears as a card; a viewer sees it but cannot acknowledge; a request without
a session changes nothing; a cross-site form post is refused; the guard acknowledges in the page, the siren
relay switches off and alarm.acknowledged records the guard with via=console; the gate opens from the page;
failed logins are limited. Screenshots of each page are saved under the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import paho.mqtt.client as paho
import pytest
import pytest_asyncio
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion
from playwright.async_api import Browser, BrowserContext, Page

from edgeagent.app import Daemon
from edgeagent.capabilities import load_config
from edgeagent.cli.console_cmd import ConfigTools
from edgeagent.console.accounts import AccountStore
from edgeagent.console.security import COOKIE
from edgeagent.console.server import USERS_PATH
from edgeagent.drivers.camera.rules.plate_list import PlateList, plates_path
from edgeagent.drivers.modbus.profile import shipped_profile
from edgeagent.drivers.modbus.sim import ProfileSimulator, gate_mechanics
from edgeagent.kernel.pipeline.events import Attachment
from tests.browser import chromium
from tests.helpers import config_head, wait_until
from tests.peers import Mosquitto, free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

BAND = "aabbccddeeff"
PASSWORDS = {"guard-li": "guard-pass-1", "viewer-wu": "viewer-pass-1", "installer-ma": "install-pass-1"}


def write_config(path: Path, state: Path, local_port: int, modbus_port: int) -> None:
    path.write_text(config_head(state) + f"""\
console: {{host: 127.0.0.1, port: 0}}   # the guard room's screen
modbus:
  buses:
    lan: {{kind: tcp, host: 127.0.0.1, port: {modbus_port}, timeout_s: 0.3}}
devices:
  - {{type: modbus.gate, id: car-gate, bus: lan, unit_id: 1, poll_interval_s: 0.2}}
  - {{type: modbus.relay, id: guard-io, bus: lan, unit_id: 3, channels: {{1: siren}}, poll_interval_s: 0.2}}
wristbands:
  broker: mqtt://127.0.0.1:{local_port}
  inputs: [{{decoder: ble-json}}]
  zones: {{gw-north: inside}}
  residents:
    - {{id: r-0012, name: Wang Ayi, room: 3-2-501, devices: ["{BAND}"]}}
notifiers:
  guard-panel: {{type: mqtt, topic: "compound/notify/{{target}}", targets: [guard_room, grid_worker, family]}}
""")


@dataclass
class Env:
    daemon: Daemon
    url: str
    browser: Browser
    sim: ProfileSimulator
    seen: list[Any]
    band: Any
    shots: Path
    contexts: list[BrowserContext] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    async def page(self, user: str | None) -> Page:
        ctx = await self.browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
        self.contexts.append(ctx)
        page = await ctx.new_page()
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("request", lambda req: self.requests.append(req.url))
        await page.goto(self.url + "/")
        if user is not None:
            await page.fill("#login-user", user)
            await page.fill("#login-pass", PASSWORDS[user])
            await page.click("#login button[type=submit]")
            await page.wait_for_selector("#tabs:not([hidden])")
            assert await page.is_hidden("#login")
        return page

    def of(self, t: str) -> list[Any]:
        return [e for e in self.seen if e.type == t]


def send_sos(client: Any, seq: int) -> None:
    doc = {"event": "sos", "hr": 72, "spo2": 97, "bat": 80, "worn": True, "seq": seq}
    client.publish(f"iot/gw-north/{BAND}/data", json.dumps(doc), qos=1).wait_for_publish(5)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("console")
    broker = Mosquitto(tmp / "broker")
    broker.start()
    modbus_port = free_port()
    sim = ProfileSimulator({1: shipped_profile("barrier-gate-generic"), 3: shipped_profile("relay-io-8ch")},
                           port=modbus_port)
    sim[1].on_write.append(gate_mechanics)
    cfg = tmp / "edgeagent.yaml"
    write_config(cfg, tmp / "state", broker.port, modbus_port)
    # The guard's account through the CLI, as an installer makes it; the viewer's directly.
    r = subprocess.run([sys.executable, "-m", "edgeagent", "console", "add-user", "guard-li", "--role", "guard",
                        "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "EDGEAGENT_CONSOLE_PASSWORD": PASSWORDS["guard-li"]})
    assert r.returncode == 0, r.stderr
    users = tmp / "state" / USERS_PATH
    assert users.stat().st_mode & 0o777 == 0o600 and PASSWORDS["guard-li"] not in users.read_text()
    AccountStore(users).add("viewer-wu", "viewer", PASSWORDS["viewer-wu"])
    AccountStore(users).add("installer-ma", "installer", PASSWORDS["installer-ma"])
    with PlateList(plates_path(tmp / "state")) as plates:
        plates.add("川A12345", ref="3-2-501", reason="resident")
    band = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="ble-gw-north")
    band.connect("127.0.0.1", broker.port)
    band.loop_start()
    try:
        async with sim, chromium() as browser:
            daemon = Daemon(load_config(cfg), config_dir=tmp, console_tools=ConfigTools(cfg))
            seen: list[Any] = []
            daemon.sink.observe(lambda e, _s: seen.append(e))
            stop = asyncio.Event()
            task = asyncio.create_task(daemon.run(shutdown_trigger=stop.wait))
            try:
                await asyncio.wait_for(daemon.ready.wait(), 15)
                await asyncio.wait_for(daemon.wristbands.connected.wait(), 10)
                assert daemon.console is not None and daemon.console.url is not None
                shots = tmp / "screenshots"
                shots.mkdir()
                e = Env(daemon, daemon.console.url, browser, sim, seen, band, shots)
                yield e
                for ctx in e.contexts:
                    await ctx.close()
                assert not e.page_errors, e.page_errors
                # Every asset and call from the box itself (the internet may be down): no CDN, no font service.
                assert e.requests and all(u.startswith(e.url + "/") for u in e.requests), \
                    sorted({u for u in e.requests if not u.startswith(e.url + "/")})
            finally:
                await browser.close()
                stop.set()
                await asyncio.wait_for(task, 30)
    finally:
        band.loop_stop()
        band.disconnect()
        broker.stop()


async def test_sos_on_the_console_viewer_refused_guard_acknowledges_and_the_siren_stops(env: Env) -> None:
    guard = await env.page("guard-li")
    viewer = await env.page("viewer-wu")
    await guard.screenshot(path=str(env.shots / "alarms-empty.png"))
    t0 = time.monotonic()
    await asyncio.to_thread(send_sos, env.band, 1)
    card = await guard.wait_for_selector(".card.alarm", timeout=10_000)
    print(f"SOS to card visible: {(time.monotonic() - t0) * 1000:.0f} ms", env.daemon.console.feed.stats(),
          await guard.evaluate("document.getElementById('conn').className"))
    assert card is not None
    text = await card.inner_text()
    assert "SOS" in text and "Wang Ayi" in text and "r-0012" in text
    assert await wait_until(lambda: env.sim[3].get("ch1_relay") is True, 5), "the siren did not sound"
    alarm = env.daemon.alarms.engine.active()[0]
    assert await guard.evaluate("document.body.dataset.sounding") == "1"
    await guard.screenshot(path=str(env.shots / "alarms-sos.png"), full_page=True)

    # The viewer sees the card without buttons, and the API refuses the viewer's acknowledgement.
    await viewer.wait_for_selector(f'.card.alarm[data-alarm="{alarm.id}"]', timeout=10_000)
    assert await viewer.query_selector(".card.alarm button.ack") is None
    status = await viewer.evaluate("""async (id) => {
        const s = await (await fetch('/api/session')).json();
        const r = await fetch('/api/alarms/' + id + '/ack', {method: 'POST', body: '{}',
            headers: {'Content-Type': 'application/json', 'X-CSRF-Token': s.csrf}});
        return r.status; }""", alarm.id)
    assert status == 403
    others = await viewer.evaluate("""async () => {
        const s = await (await fetch('/api/session')).json();
        const post = (u) => fetch(u, {method: 'POST', body: '{}',
            headers: {'Content-Type': 'application/json', 'X-CSRF-Token': s.csrf}}).then((r) => r.status);
        return [await post('/api/gates/car-gate/open'), await post('/api/devices/car-gate/test'),
                (await fetch('/api/doctor')).status]; }""")
    assert others == [403, 403, 403]
    await viewer.screenshot(path=str(env.shots / "alarms-viewer.png"))

    cookie = next(c for c in await guard.context.cookies() if c["name"] == COOKIE)
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    # No session: nothing changes (right Origin, no cookie); a session without its CSRF token: refused too.
    async with aiohttp.ClientSession() as http:
        r1 = await http.post(f"{env.url}/api/alarms/{alarm.id}/ack", json={}, ssl=False,
                             headers={"Origin": env.url})
        cookies = await guard.context.cookies()
        token = next(c["value"] for c in cookies if c["name"] == COOKIE)
        r2 = await http.post(f"{env.url}/api/alarms/{alarm.id}/ack", json={}, ssl=False,
                             headers={"Origin": env.url, "Cookie": f"{COOKIE}={token}"})
        r3 = await http.post(f"{env.url}/api/gates/car-gate/open", json={}, ssl=False,
                             headers={"Origin": env.url})
        r4 = await http.get(f"{env.url}/api/state", ssl=False)
        assert (r1.status, r2.status, r3.status, r4.status) == (401, 403, 401, 401)
        assert "default-src 'none'" in r4.headers["Content-Security-Policy"]
        js = await http.get(f"{env.url}/static/app.js", ssl=False)  # public, small, sent again only when changed
        assert js.status == 200 and "script-src 'self'" in js.headers["Content-Security-Policy"]
        again = await http.get(f"{env.url}/static/app.js", ssl=False, headers={"If-None-Match": js.headers["ETag"]})
        assert again.status == 304
    # A form posted from another site, in the guard's own (logged-in) browser: refused.
    evil = web.Application()

    async def form(_r: web.Request) -> web.Response:
        return web.Response(text=f'<form method="post" action="{env.url}/api/alarms/{alarm.id}/ack">'
                                 '<input name="x" value="1"><button id="go">win a prize</button></form>',
                            content_type="text/html")

    evil.router.add_get("/", form)
    runner = web.AppRunner(evil)
    await runner.setup()
    evil_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", evil_port).start()
    try:
        attacker = await guard.context.new_page()
        await attacker.goto(f"http://127.0.0.1:{evil_port}/")
        async with attacker.expect_navigation() as nav:
            await attacker.click("#go")
        resp = await nav.value
        assert resp is not None and resp.status == 403
        await attacker.close()
    finally:
        await runner.cleanup()
    assert not env.of("alarm.acknowledged")
    assert env.daemon.alarms.engine.get(alarm.id).acknowledged_by is None

    # A state reply re-renders the cards (on a busy box every few hundred ms): an unchanged card keeps its
    # element, so a press is not lost to a card replaced under the pointer.
    ack = await guard.wait_for_selector(f'.card.alarm[data-alarm="{alarm.id}"] button.ack')
    assert ack is not None
    await guard.evaluate("refresh()")
    assert await ack.evaluate("b => b.isConnected")
    # The guard acknowledges in the page: the siren stops, the event names the guard, via the console.
    await guard.click(f'.card.alarm[data-alarm="{alarm.id}"] button.ack')
    assert await wait_until(lambda: env.of("alarm.acknowledged"), 10)
    ack = env.of("alarm.acknowledged")[0].data
    assert (ack["by"], ack["via"], ack["caller"]) == ("guard-li", "console", "console:guard-li")
    assert await wait_until(lambda: env.sim[3].get("ch1_relay") is False, 5), "the siren is still on"
    await guard.wait_for_selector(f'.card.alarm.acked[data-alarm="{alarm.id}"]', timeout=5_000)
    assert await guard.evaluate("document.body.dataset.sounding") == "0"
    await guard.screenshot(path=str(env.shots / "alarms-acknowledged.png"))
    audits = [(e.data["user"], e.data["action"], e.data["outcome"]) for e in env.of("console.audit")]
    assert ("guard-li", "alarm.ack", "ok") in audits and ("viewer-wu", "alarm.ack", "refused") in audits
    assert ("guard-li", "login", "ok") in audits
    await guard.click(f'.card.alarm[data-alarm="{alarm.id}"] button.resolve')
    await guard.wait_for_selector("#no-alarms:not([hidden])", timeout=5_000)
    assert env.of("alarm.resolved")[-1].data["via"] == "console"


def plate_jpeg(folder: Path) -> Attachment:
    """A synthetic car front with a Chinese plate, kept as evidence the way the camera keeps it."""
    from tests.synth_plates import render_plate

    image = render_plate("京AF0236", scale=2.0)
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    raw = data.tobytes()
    sha = hashlib.sha256(raw).hexdigest()
    (folder / "snapshots").mkdir(parents=True, exist_ok=True)
    (folder / "snapshots" / f"{sha}.jpg").write_bytes(raw)
    return Attachment("snapshot", sha, "image/jpeg", len(raw))


async def test_gate_visitor_call_open_devices_and_english(env: Env) -> None:
    guard = await env.page("guard-li")
    guard.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
    await guard.click('#tabs [data-tab="gate"]')
    # A visitor's car whose plate did not open the gate, then the driver presses the call button.
    snap = plate_jpeg(env.daemon.state_dir / "evidence")
    await env.daemon.sink.emit("gate.visitor", "cam-gate", {
        "plate": "京AF0236", "confidence": 0.91, "agreement": 1.0, "reason": "not_in_list", "track_id": 7,
        "zone": "gate-lane", "reads": 5, "votes": 5, "gate": "car-gate"}, (snap,))
    await env.daemon.sink.emit("gate.call", "cam-gate", {"gate": "car-gate", "source": "camera", "zone": "gate-lane"})
    card = await guard.wait_for_selector('.card[data-event="gate.visitor"]', timeout=10_000)
    assert card is not None and "京AF0236" in await card.inner_text() and "91%" in await card.inner_text()
    img = await guard.wait_for_selector('.card[data-event="gate.visitor"] img', timeout=5_000)
    assert img is not None and await img.evaluate("i => i.complete && i.naturalWidth > 0")
    await guard.wait_for_selector('.card.ringing[data-event="gate.call"]', timeout=5_000)
    assert await guard.evaluate("document.body.dataset.sounding") == "1"
    await guard.screenshot(path=str(env.shots / "gate-call.png"), full_page=True)
    row = await guard.wait_for_selector("#plates tbody tr", timeout=5_000)
    assert row is not None and "川A12345" in await row.inner_text() and "3-2-501" in await row.inner_text()
    # A state reply re-renders the cards but keeps the unchanged ones (the button being pressed stays put), and
    # a reply the busy box was slow to send does not move the screen's estimate of the box's clock (which says
    # whether a call still rings): the quickest reply's estimate is kept.
    button = await guard.wait_for_selector('.card.ringing[data-event="gate.call"] button.open-for')
    assert button is not None
    await guard.evaluate("refresh()")
    assert await button.evaluate("b => b.isConnected")
    skew = await guard.evaluate("S.clockSkewMs")

    async def slow(route: Any) -> None:
        reply = await route.fetch()
        await asyncio.sleep(3.0)
        await route.fulfill(response=reply)

    await guard.route("**/api/state", slow)
    await guard.evaluate("refresh()")
    await guard.unroute("**/api/state", slow)
    assert await guard.evaluate("S.clockSkewMs") == skew
    # The guard answers the call and opens the gate from the ringing card.
    await guard.click('.card.ringing[data-event="gate.call"] button.open-for')
    assert await wait_until(lambda: ("open_trigger", True) in env.sim[1].writes, 10)
    assert await wait_until(lambda: env.of("gate.commanded"), 5)
    assert (env.of("gate.commanded")[-1].data["by"], env.of("gate.commanded")[-1].data["via"]) == \
        ("console:guard-li", "console")
    opened = await guard.wait_for_selector('.card[data-event="gate.commanded"]', timeout=5_000)
    assert opened is not None and "访客放行" in await opened.inner_text()
    assert await wait_until(lambda: any(e.data["action"] == "gate.open" and e.data["outcome"] == "ok"
                                        for e in env.of("console.audit")), 5)
    assert await guard.evaluate("document.body.dataset.sounding") == "0"  # answered
    await guard.screenshot(path=str(env.shots / "gate.png"), full_page=True)
    await guard.click('#tabs [data-tab="devices"]')
    row = await guard.wait_for_selector('#devices tr[data-device="guard-io"]', timeout=5_000)
    assert row is not None and "在线" in await row.inner_text()
    assert await guard.inner_text('#capabilities details[data-cap="wristbands"] summary') == "wristbands"
    await guard.screenshot(path=str(env.shots / "devices.png"), full_page=True)
    await guard.click("#lang")
    assert await guard.inner_text('#tabs [data-tab="devices"]') == "Devices"
    assert "online" in await (await guard.wait_for_selector('#devices tr[data-device="guard-io"]')).inner_text()
    # A phone's width: the page still fits (no horizontal scrolling).
    await guard.set_viewport_size({"width": 390, "height": 844})
    assert await guard.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    await guard.screenshot(path=str(env.shots / "devices-phone-en.png"), full_page=True)


async def test_a_place_alarm_with_its_snapshot_and_a_removed_account(env: Env) -> None:
    guard = await env.page("guard-li")
    viewer = await env.page("viewer-wu")
    snap = plate_jpeg(env.daemon.state_dir / "evidence")  # any JPEG kept as evidence will do
    alarm = await env.daemon.alarms.raise_("ebike_in_lift", "lift-2 car", "cam-lift-2", place=True,
                                           attachments=(snap,))
    card = await guard.wait_for_selector(f'.card.alarm[data-alarm="{alarm.id}"]', timeout=10_000)
    assert card is not None and "lift-2 car" in await card.inner_text()
    img = await guard.wait_for_selector(f'.card.alarm[data-alarm="{alarm.id}"] img', timeout=5_000)
    assert img is not None and await img.evaluate("i => i.complete && i.naturalWidth > 0")
    await guard.screenshot(path=str(env.shots / "alarms-place.png"), full_page=True)
    await guard.click(f'.card.alarm[data-alarm="{alarm.id}"] button.resolve')
    await guard.wait_for_selector(f'.card.alarm[data-alarm="{alarm.id}"]', state="detached", timeout=5_000)
    assert env.of("alarm.resolved")[-1].data["place"] == "lift-2 car"
    # An account removed on the box: its open screen stops seeing at its next request.
    AccountStore(env.daemon.state_dir / USERS_PATH).remove("viewer-wu")
    assert await viewer.evaluate("async () => (await fetch('/api/state')).status") == 401
    await viewer.evaluate("refresh()")
    await viewer.wait_for_selector("#login:not([hidden])", timeout=5_000)
    AccountStore(env.daemon.state_dir / USERS_PATH).add("viewer-wu", "viewer", PASSWORDS["viewer-wu"])
    # A new password (same role) ends the guard's open sessions too.
    AccountStore(env.daemon.state_dir / USERS_PATH).add("guard-li", "guard", PASSWORDS["guard-li"], replace=True)
    assert await guard.evaluate("async () => (await fetch('/api/state')).status") == 401


async def test_installer_tests_a_device(env: Env) -> None:
    page = await env.page("installer-ma")
    await page.click('#tabs [data-tab="installer"]')
    await page.click('#device-tests tr[data-device="car-gate"] button.test')
    cell = await page.wait_for_selector('#device-tests tr[data-device="car-gate"] td.out.ok', timeout=15_000)
    assert cell is not None and await cell.inner_text()
    await page.click('#device-tests tr[data-device="guard-io"] button.test')
    await page.wait_for_selector('#device-tests tr[data-device="guard-io"] td.out.ok', timeout=15_000)
    await page.screenshot(path=str(env.shots / "installer-device-tests.png"), full_page=True)
    assert any(e.data["action"] == "device.test" and e.data["target"] == "car-gate" and e.data["outcome"] == "ok"
               for e in env.of("console.audit"))


async def test_failed_logins_are_limited(env: Env) -> None:
    async with aiohttp.ClientSession() as http:
        codes = []
        for _ in range(6):
            r = await http.post(f"{env.url}/api/login", json={"user": "guard-li", "password": "wrong-guess"},
                                ssl=False, headers={"Origin": env.url})
            codes.append(r.status)
        assert codes == [401] * 5 + [429]
        # Even the right password waits now (the limit counts this address and this name).
        r = await http.post(f"{env.url}/api/login", json={"user": "guard-li", "password": PASSWORDS["guard-li"]},
                            ssl=False, headers={"Origin": env.url})
        assert r.status == 429 and "Retry-After" in r.headers
    from prometheus_client import generate_latest

    from edgeagent.kernel.runtime.metrics import REGISTRY

    scraped = generate_latest(REGISTRY).decode()
    assert "edgeagent_console_logins_rate_limited_total 2.0" in scraped, scraped
    assert "edgeagent_console_screens_dropped_total 0.0" in scraped
    async with aiohttp.ClientSession() as http:
        # A password typed into the name field: refused, and the typed text is in no event.
        r = await http.post(f"{env.url}/api/login", json={"user": "Pw-typed-as-name-77", "password": "x"},
                            ssl=False, headers={"Origin": env.url})
        assert r.status in (401, 429)
    refused = [e for e in env.of("console.audit") if e.data["action"] == "login" and e.data["outcome"] == "refused"]
    assert len(refused) >= 8 and all("wrong-guess" not in json.dumps(dict(e.data)) for e in refused)
    assert all("Pw-typed-as-name-77" not in json.dumps(dict(e.data)) for e in env.of("console.audit"))
    assert refused[-1].data["user"] == "(not an account)" and refused[-1].data["target"] == "(not an account)"
