"""The console's parts without a browser: accounts and password hashes, the login limit, sessions, the live
feed's overflow policy, the self-signed certificate, and the config editor's zone replacement."""

from __future__ import annotations

import asyncio
import ipaddress
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.cli.console_cmd import ConfigTools
from edgeagent.console import tls
from edgeagent.console.accounts import AccountError, AccountStore, hash_password, verify_password
from edgeagent.console.feed import CLIENT_QUEUE, MAX_CLIENTS, Feed
from edgeagent.console.security import LoginLimiter, Sessions
from edgeagent.kernel.pipeline.events import EventFactory

CHEAP = hash_password("correct horse", n=2**4)  # a low cost keeps the property test fast; the format is the same


def test_hash_and_verify() -> None:
    stored = hash_password("correct horse battery")
    assert stored.startswith("scrypt$16384$8$1$") and "correct" not in stored
    assert verify_password("correct horse battery", stored)
    assert not verify_password("correct horse batterY", stored)
    assert hash_password("correct horse battery") != stored  # salted


@settings(max_examples=60, deadline=None)
@given(password=st.text(max_size=300), stored=st.one_of(st.just(CHEAP), st.text(max_size=120)))
def test_verify_never_raises_on_what_a_browser_or_a_damaged_file_gives(password: str, stored: str) -> None:
    assert verify_password(password, stored) == (stored == CHEAP and password == "correct horse")


def test_account_store(tmp_path: Path) -> None:
    store = AccountStore(tmp_path / "state" / "console" / "users.json")
    (tmp_path / "state").mkdir()
    store.add("guard-li", "guard", "secret-pass")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert "secret-pass" not in store.path.read_text()
    assert store.get("guard-li") is not None and store.get("guard-li").may("alarm")  # type: ignore[union-attr]
    with pytest.raises(AccountError, match="exists"):
        store.add("guard-li", "installer", "other-pass")
    store.add("guard-li", "viewer", "other-pass", replace=True)
    assert not store.get("guard-li").may("alarm")  # type: ignore[union-attr]
    for name, role, pw in (("bad name", "guard", "password1"), ("ok", "admin", "password1"), ("ok", "guard", "short")):
        with pytest.raises(AccountError):
            store.add(name, role, pw)
    store.remove("guard-li")
    assert store.load() == {}
    store.path.write_text("{not json")
    with pytest.raises(AccountError, match="not a readable accounts file"):
        store.load()


def test_login_limiter_counts_per_key_and_stays_bounded() -> None:
    lim = LoginLimiter(max_failures=3, max_tracked=4)
    keys = ["ip:10.0.0.5", "user:guard-li"]
    for _ in range(3):
        assert lim.retry_after(keys) == 0
        lim.failed(keys)
    assert lim.retry_after(keys) > 0 and lim.refused == 1
    assert lim.retry_after(["ip:10.0.0.6", "user:viewer"]) == 0  # others are not affected
    lim.succeeded(["user:guard-li"])
    assert lim.retry_after(["user:guard-li"]) == 0 and lim.retry_after(["ip:10.0.0.5"]) > 0
    for i in range(10):
        lim.failed([f"ip:10.1.0.{i}"])
    assert lim.forgotten >= 6


def test_sessions_are_bounded() -> None:
    sessions = Sessions(max_sessions=3)
    made = [sessions.create(f"u{i}", "guard", "127.0.0.1") for i in range(5)]
    assert len(sessions) == 3 and sessions.evicted == 2
    assert sessions.get(made[0].token) is None and sessions.get(made[4].token) is not None
    assert sessions.get(None) is None and sessions.get("forged") is None
    assert sessions.end_user("u4") == 1


async def test_a_slow_screen_is_dropped_and_counted_the_others_keep_up(factory: EventFactory) -> None:
    feed = Feed()
    slow, quick = feed.connect("slow"), feed.connect("quick")
    assert slow is not None and quick is not None
    for i in range(CLIENT_QUEUE + 10):
        feed.on_event(factory.make("gateway.stopped", "gw-1", {"reason": "test", "unsent": i}), i)
        quick.queue.get_nowait()  # the quick screen drains as it goes
    assert slow.dropped.is_set() and feed.dropped_clients == 1 and feed.clients == 1
    feed.on_event(factory.make("sensor.reading", "s-1", {"metric": "t", "value": 1.0, "unit": "degC"}), 0)
    assert feed.skipped_telemetry == 1 and quick.queue.empty()
    more = [feed.connect("x") for _ in range(MAX_CLIENTS)]
    assert more[-1] is None and feed.clients == MAX_CLIENTS and feed.refused_clients == 1
    await asyncio.sleep(0)


def test_self_signed_certificate(tmp_path: Path) -> None:
    cert, key, made = tls.ensure_certificate(tmp_path / "tls", "gw-1", ["192.168.10.5", "guard-pc.local"])
    assert made and stat.S_IMODE(key.stat().st_mode) == 0o600
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("192.168.10.5") in san.get_values_for_type(x509.IPAddress)
    assert "guard-pc.local" in san.get_values_for_type(x509.DNSName)
    assert tls.ensure_certificate(tmp_path / "tls", "gw-1", [])[2] is False  # kept, not made again
    tls.server_context(cert, key)
    assert len(tls.fingerprint(cert).split(":")) == 32


def test_redrawn_zone_keeps_its_other_settings_and_flow_lists_stay_flow(tmp_path: Path) -> None:
    cfg = tmp_path / "edgeagent.yaml"
    cfg.write_text("""\
version: 1
site_id: site-1
gateway_id: gw-1
state_dir: /tmp/unused
devices:
  - type: camera   # the gate camera
    id: cam-gate
    rtsp: {detect_url: "rtsp://192.0.2.10/sub"}
    zones:
      - {name: gate-lane, points: [[0.2, 0.5], [0.8, 0.5], [0.9, 1.0]], classes: [car], loiter_s: 60}  # lane
      - {name: kerb, points: [[0.0, 0.8], [0.1, 0.8], [0.1, 1.0]]}
# trailing comment
""")
    tools = ConfigTools(cfg)
    out = tools.save_shape("cam-gate", "zone", {"name": "gate-lane", "points": [[0.1, 0.4], [0.9, 0.4], [0.9, 1.0]]})
    text = cfg.read_text()
    assert "{name: gate-lane, points: [[0.1, 0.4], [0.9, 0.4], [0.9, 1.0]], classes: [car], loiter_s: 60}" in text
    assert "# lane" in text and "# the gate camera" in text and text.endswith("# trailing comment\n")
    assert [z["name"] for z in out["camera"]["zones"]] == ["gate-lane", "kerb"]
    tools.save_shape("cam-gate", "zone", {"name": "island", "points": [[0.4, 0.4], [0.6, 0.4], [0.5, 0.6]]})
    assert "  - {name: island, points: [[0.4, 0.4], [0.6, 0.4], [0.5, 0.6]]}\n# trailing comment\n" in cfg.read_text()
    before = cfg.read_text()
    for camera, shape in (("cam-gate", {"name": "Bad Name", "points": [[0, 0], [1, 0], [1, 1]]}),
                          ("cam-gate", {"name": "out", "points": [[0, 0], [2, 0], [1, 1]]}),
                          ("cam-none", {"name": "x", "points": [[0, 0], [1, 0], [1, 1]]})):
        with pytest.raises(ValueError, match=r"not saved|no camera"):
            tools.save_shape(camera, "zone", shape)
    assert cfg.read_text() == before


_coord = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.text(max_size=4),
                   st.none())
_shape = st.fixed_dictionaries({
    "name": st.one_of(st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True), st.text(max_size=12), st.integers()),
    "points": st.one_of(st.lists(st.lists(_coord, min_size=0, max_size=3), max_size=6), st.text(max_size=5)),
    "a": st.lists(_coord, max_size=3), "b": st.lists(_coord, max_size=3)})


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["zone", "line", "circle"]), shape=_shape)
def test_whatever_a_browser_sends_as_a_shape_is_saved_valid_or_refused_with_the_file_intact(
        tmp_path_factory: pytest.TempPathFactory, kind: str, shape: dict[str, object]) -> None:
    cfg = tmp_path_factory.mktemp("shape") / "edgeagent.yaml"
    cfg.write_text("version: 1  # keep\nsite_id: s\ngateway_id: g\nstate_dir: /tmp/unused\ndevices:\n"
                   "  - {type: camera, id: cam, rtsp: {detect_url: 'rtsp://192.0.2.1/s'}}  # the camera\n")
    before = cfg.read_text()
    try:
        ConfigTools(cfg).save_shape("cam", kind, shape)
    except ValueError:
        assert cfg.read_text() == before
        return
    text = cfg.read_text()
    assert "# keep" in text and "# the camera" in text
    from edgeagent.capabilities import load_config

    load_config(cfg)  # what was written is a valid config


def test_console_enable_writes_the_section_keeping_comments_and_certifies_the_address(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgeagent.cli import app

    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "edgeagent.yaml"
    cfg.write_text(f"version: 1  # v\nsite_id: s\ngateway_id: g\nstate_dir: {state}\n# the end\n")

    def cli(*args: str) -> Any:  # in this process: the CLI's own code, without an interpreter's start-up
        return CliRunner().invoke(app, ["console", *args, "--config", str(cfg)], env={"COLUMNS": "200"})

    r = cli("enable", "--host", "192.168.10.2")
    assert r.exit_code == 0, r.output
    text = cfg.read_text()
    assert "# v" in text and text.endswith("# the end\n") and "console:\n  host: 192.168.10.2\n  port: 8443\n" in text
    cert = x509.load_pem_x509_certificate((state / "console" / "tls" / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("192.168.10.2") in san.get_values_for_type(x509.IPAddress)
    r = cli("enable", "--host", "10.0.0.7", "--port", "9443")  # moved: the certificate follows
    assert r.exit_code == 0 and "made a self-signed certificate" in r.stdout, r.output
    assert "host: 10.0.0.7" in cfg.read_text() and "port: 9443" in cfg.read_text()
    r = cli("enable", "--host", "guard-pc")
    assert r.exit_code == 1 and "not an IP address" in r.stderr


async def test_a_console_whose_certificate_cannot_be_read_leaves_the_daemon_running(tmp_path: Path) -> None:
    from edgeagent.app import Daemon
    from edgeagent.capabilities import Config
    from tests.helpers import running_daemon

    cfg = Config.model_validate({
        "version": 1, "site_id": "s", "gateway_id": "g", "state_dir": str(tmp_path / "state"),
        "clock": {"sync": "synced"}, "health": {"enabled": False},
        "console": {"port": 0, "tls": {"cert_file": str(tmp_path / "missing.pem"),
                                       "key_file": str(tmp_path / "missing.key")}}})
    daemon = Daemon(cfg)
    async with running_daemon(daemon) as run:
        assert daemon.console is not None and daemon.console.url is None
        assert daemon.healthy()[0]
        await daemon.alarms.raise_("sos", "r-1", "band-1")  # the alarms work without the console
        assert run.of("alarm.raised")


def test_sessions_outlive_a_restart_with_nothing_on_disk_a_cookie_can_be_made_from(tmp_path: Path) -> None:
    path = tmp_path / "state" / "console" / "sessions.json"
    before = Sessions()
    li = before.create("guard-li", "guard", "10.0.0.9", CHEAP)
    wang = before.create("viewer-wang", "viewer", "10.0.0.8", CHEAP)
    before.end(wang.token)
    before.save(path)
    assert not before.changed
    text = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert li.token not in text and li.csrf not in text and CHEAP not in text and "viewer-wang" not in text

    after = Sessions()
    assert after.load(path) == (1, 0)
    assert after.get(wang.token) is None and after.get("forged") is None
    assert not (after.changed or after.touched)
    again = after.get(li.token)
    # A use is only "touched" (written at most every SESSIONS_SEEN_SAVE_S: the live feed uses sessions every few
    # seconds, and a box's SD card is not written every second for it); a login or logout is "changed".
    assert after.touched and not after.changed
    assert again is not None and (again.user, again.role, again.remote) == ("guard-li", "guard", "10.0.0.9")
    assert again.csrf == li.csrf and again.credential == li.credential and again.token == li.token
    assert after.end_user("guard-li") == 1 and len(after) == 0


def test_sessions_past_their_limits_or_from_the_future_are_not_carried_over(tmp_path: Path) -> None:
    import json
    import time

    path = tmp_path / "sessions.json"
    s = Sessions()
    for name in ("idle", "old", "future", "fresh"):
        s.create(name, "guard", "127.0.0.1", CHEAP)
    doc = json.loads(s.dump())
    wall = time.time()
    for rec in doc["sessions"]:
        rec["seen"], rec["created"] = {"idle": (wall - 13 * 3600, wall - 13 * 3600),
                                       "old": (wall - 60, wall - 25 * 3600),
                                       "future": (wall + 600, wall + 600),
                                       "fresh": (wall - 5, wall - 3600)}[rec["user"]]
    path.write_text(json.dumps(doc))
    back = Sessions()
    assert back.load(path) == (1, 3)
    assert [x.user for x in back.active()] == ["fresh"]


@settings(max_examples=150, deadline=None)
@given(doc=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["version", "sessions", "key", "user", "role", "remote", "credential", "created", "seen"]),
        inner, max_size=9), max_leaves=30))
def test_whatever_the_sessions_file_holds_loading_never_raises_anything_but_value_error(
        tmp_path_factory: pytest.TempPathFactory, doc: Any) -> None:
    import json

    path = tmp_path_factory.mktemp("s") / "sessions.json"
    path.write_text(json.dumps({"version": 1, "sessions": [doc, doc]} if isinstance(doc, dict) else doc))
    s = Sessions()
    try:
        kept, dropped = s.load(path)
    except ValueError:
        assert len(s) == 0
    else:
        assert kept + dropped >= 0 and len(s) == kept
        assert all(x.token == "" and x.csrf == "" for x in s.active())  # usable only with the cookie's token


def test_an_unreadable_sessions_file_is_refused_plainly(tmp_path: Path) -> None:
    path = tmp_path / "sessions.json"
    for junk in (b"", b"{not json", b"\xff\xfe", b'{"version": 9, "sessions": []}', b"[]"):
        path.write_bytes(junk)
        with pytest.raises(ValueError, match=r"sessions file|cannot read"):
            Sessions().load(path)
    assert Sessions().load(tmp_path / "missing.json") == (0, 0)


async def test_a_guard_stays_logged_in_across_a_daemon_restart_until_the_account_changes(tmp_path: Path) -> None:
    import aiohttp

    from edgeagent.app import Daemon
    from edgeagent.capabilities import Config
    from edgeagent.console.security import COOKIE
    from tests.helpers import running_daemon

    state = tmp_path / "state"
    state.mkdir()
    accounts = AccountStore(state / "console" / "users.json")
    accounts.add("guard-li", "guard", "night-shift-7")
    cfg = Config.model_validate({
        "version": 1, "site_id": "s", "gateway_id": "g", "state_dir": str(state),
        "clock": {"sync": "synced"}, "health": {"enabled": False}, "console": {"port": 0}})

    async def call(method: str, path: str, cookie: str = "", csrf: str = "", body: Any = None) -> tuple[int, Any]:
        daemon = running.daemon
        assert daemon.console is not None and daemon.console.url is not None
        url = daemon.console.url
        headers = {"Origin": url, **({"Cookie": f"{COOKIE}={cookie}"} if cookie else {}),
                   **({"X-CSRF-Token": csrf} if csrf else {})}
        async with aiohttp.ClientSession() as http, http.request(
                method, f"{url}{path}", json=body if method == "POST" else None, headers=headers, ssl=False) as r:
            data = await r.json()
            if path == "/api/login" and r.status == 200:
                data["cookie"] = r.cookies[COOKIE].value
            return r.status, data

    async with running_daemon(Daemon(cfg)) as running:
        status, login = await call("POST", "/api/login", body={"user": "guard-li", "password": "night-shift-7"})
        assert status == 200, login
        cookie, csrf = login["cookie"], login["csrf"]
        assert (await call("GET", "/api/session", cookie))[0] == 200
    saved = (state / "console" / "sessions.json").read_text()
    assert cookie not in saved and csrf not in saved

    async with running_daemon(Daemon(cfg)) as running:  # the watchdog's restart, an installer's change
        status, again = await call("GET", "/api/session", cookie)
        assert status == 200 and (again["user"], again["csrf"]) == ("guard-li", csrf), again
        assert (await call("GET", "/api/session", "forged-token"))[0] == 401
        # The CSRF token from before the restart still counts (the page keeps it): a POST goes through.
        status, out = await call("POST", "/api/logout", cookie, csrf, {})
        assert status == 200, out
        assert (await call("GET", "/api/session", cookie))[0] == 401

    async with running_daemon(Daemon(cfg)) as running:
        assert (await call("GET", "/api/session", cookie))[0] == 401  # a logout is remembered too
        status, login = await call("POST", "/api/login", body={"user": "guard-li", "password": "night-shift-7"})
        assert status == 200
    accounts.add("guard-li", "guard", "new-password-8", replace=True)  # changed while the daemon was down
    async with running_daemon(Daemon(cfg)) as running:
        assert (await call("GET", "/api/session", login["cookie"]))[0] == 401
