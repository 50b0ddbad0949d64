"""The uplink over TLS, mutual TLS and broker passwords, against a real mosquitto.

Each refusal must be plain to an installer: ``last_error`` (and ``probe()``) say what is wrong, the
state is ``auth_failed``, nothing is sent, and the outbox keeps every event for later.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from edgeagent.cloud_bridge.uplink import Uplink, probe
from edgeagent.kernel.errors import SecretError, UplinkAuthError
from edgeagent.kernel.pipeline.events import EventFactory
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from tests.helpers import running_uplink, uplink_config, wait_until
from tests.peers import Collector, Mosquitto, TLSFiles, make_pki

PASSWORD = "pw-Zq81-correct-horse"
WRONG_PASSWORD = "pw-Xv27-wrong-battery"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_pki(tmp_path_factory.mktemp("pki"))


def ca_only(pki: TLSFiles, ca: Path | None = None) -> dict[str, Any]:
    return {"ca_file": str(ca or pki.ca)}


def mutual(pki: TLSFiles) -> dict[str, Any]:
    return {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key": {"file": str(pki.client_key)}}


def door(factory: EventFactory, i: int) -> Any:
    return factory.make("contact.changed", f"door-{i}", {"state": "open", "contact": "door"})


async def deliver(ob: Outbox, up: Uplink, col: Collector, factory: EventFactory, n: int = 5) -> None:
    """Put ``n`` events and wait until the collector has all of them and the outbox marked them sent."""
    for i in range(n):
        await ob.put(door(factory, i))
    assert await wait_until(lambda: len(col.seqs()) >= n, timeout_s=10), \
        f"collector got {col.seqs()}; uplink {up.snapshot()}"
    assert sorted(col.seqs()) == list(range(1, n + 1))
    assert up.state == "connected"
    assert await wait_until(lambda: up.published_events >= n, timeout_s=5)
    stats = await ob.stats()
    assert stats.classes["event"].unsent == 0


async def refused(tmp: Path, url: str, factory: EventFactory, col: Collector, **kw: Any) -> dict[str, object]:
    """Run an uplink that the broker refuses; check nothing leaves the outbox; return its snapshot."""
    ob = Outbox(OutboxConfig(tmp / "outbox.db"))
    await ob.open()
    try:
        for i in range(3):
            await ob.put(door(factory, i))
        before = (await ob.stats()).classes["event"].unsent
        assert before == 3
        async with running_uplink(tmp, url, outbox=ob, **kw) as (_, up):
            assert await wait_until(lambda: up.state == "auth_failed", timeout_s=10), up.snapshot()
            # Keep retrying for a while (the retry delay is at most 0.5 s): still nothing goes out, and the state
            # reads "auth_failed" all along (between attempts and during them), not "connecting".
            attempts = sum(up.connect_attempts.values())
            states = set()
            for _ in range(120):
                states.add(up.state)
                await asyncio.sleep(0.01)
            assert states == {"auth_failed"}, states
            assert sum(up.connect_attempts.values()) > attempts  # it did retry meanwhile
            snap = up.snapshot()
            assert up.published_events == 0
            assert up.connected_since is None
        assert (await ob.stats()).classes["event"].unsent == before
        assert not [t for t, _p, _r in col.messages if "/events/" in t or t.endswith("/status")], col.messages
        return snap
    finally:
        await ob.close()


# --- server TLS -----------------------------------------------------------------------------------

async def test_tls_with_the_test_ca_delivers_events(
        tmp_path: Path, pki: TLSFiles, factory: EventFactory) -> None:
    with Mosquitto(tmp_path / "broker", tls=pki) as broker:
        assert broker.url.startswith("mqtts://")
        col = Collector(broker.port, tls=pki).start()
        try:
            async with running_uplink(tmp_path, broker.url, tls=ca_only(pki)) as (ob, up):
                await deliver(ob, up, col, factory)
                assert up.snapshot()["tls"] is True
                assert up.last_error is None
            assert await probe(uplink_config(broker.url, tls=ca_only(pki)), "probe-1") == "5"
        finally:
            col.stop()


async def test_untrusted_server_certificate_is_refused_and_events_stay(
        tmp_path: Path, pki: TLSFiles, factory: EventFactory) -> None:
    with Mosquitto(tmp_path / "broker", tls=pki) as broker:
        col = Collector(broker.port, tls=pki).start()
        try:
            snap = await refused(tmp_path, broker.url, factory, col, tls=ca_only(pki, pki.other_ca))
        finally:
            col.stop()
        err = str(snap["last_error"])
        assert "certificate not trusted" in err, err
        assert f"127.0.0.1:{broker.port}" in err
        with pytest.raises(UplinkAuthError, match="certificate not trusted"):
            await probe(uplink_config(broker.url, tls=ca_only(pki, pki.other_ca)), "probe-1")


async def test_system_cas_do_not_trust_a_private_broker(tmp_path: Path, pki: TLSFiles) -> None:
    """mqtts:// without a ca_file uses the system CAs, which know nothing of the test CA."""
    with Mosquitto(tmp_path / "broker", tls=pki) as broker, \
            pytest.raises(UplinkAuthError, match="certificate not trusted"):
        await probe(uplink_config(broker.url), "probe-1")


# --- mutual TLS -----------------------------------------------------------------------------------

async def test_mutual_tls_with_client_certificate_delivers_events(
        tmp_path: Path, pki: TLSFiles, factory: EventFactory) -> None:
    with Mosquitto(tmp_path / "broker", tls=pki, require_cert=True) as broker:
        col = Collector(broker.port, tls=pki).start()
        try:
            async with running_uplink(tmp_path, broker.url, tls=mutual(pki)) as (ob, up):
                await deliver(ob, up, col, factory)
            assert await probe(uplink_config(broker.url, tls=mutual(pki)), "probe-1") == "5"
        finally:
            col.stop()


async def test_mutual_tls_without_client_certificate_is_refused_clearly(
        tmp_path: Path, pki: TLSFiles, factory: EventFactory) -> None:
    with Mosquitto(tmp_path / "broker", tls=pki, require_cert=True) as broker:
        col = Collector(broker.port, tls=pki).start()
        try:
            snap = await refused(tmp_path, broker.url, factory, col, tls=ca_only(pki))
        finally:
            col.stop()
        assert snap["state"] == "auth_failed"
        err = str(snap["last_error"])
        assert "TLS" in err and "certificate" in err, err
        with pytest.raises(UplinkAuthError, match=r"TLS.*certificate"):
            await probe(uplink_config(broker.url, tls=ca_only(pki)), "probe-1")


async def test_mutual_tls_key_file_missing_is_a_plain_error(tmp_path: Path, pki: TLSFiles) -> None:
    tls = {**mutual(pki), "key": {"file": str(tmp_path / "absent.key")}}
    with pytest.raises(SecretError, match=r"absent\.key.*cannot be read"):
        await probe(uplink_config("mqtts://127.0.0.1:1", tls=tls), "probe-1")


# --- passwords ------------------------------------------------------------------------------------

def _no_password_in(text: str) -> None:
    assert PASSWORD not in text
    assert WRONG_PASSWORD not in text


async def test_bad_password_is_auth_failed_and_never_shown(
        tmp_path: Path, factory: EventFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bad = tmp_path / "bad-password"
    bad.write_text(WRONG_PASSWORD + "\n")
    with Mosquitto(tmp_path / "broker", passwords={"gw-1": PASSWORD, "cloud": PASSWORD}) as broker:
        col = Collector(broker.port, username="cloud", password=PASSWORD).start()
        try:
            snap = await refused(tmp_path, broker.url, factory, col, username="gw-1",
                                 password={"file": str(bad)})
        finally:
            col.stop()
        assert snap["state"] == "auth_failed"
        err = str(snap["last_error"])
        assert "credentials" in err, err
        with pytest.raises(UplinkAuthError, match="credentials") as info:
            await probe(uplink_config(broker.url, username="gw-1", password={"file": str(bad)}), "probe-1")
        _no_password_in(str(info.value))
        # No username at all on a broker that wants one: refused the same way.
        with pytest.raises(UplinkAuthError, match="credentials"):
            await probe(uplink_config(broker.url), "probe-2")
    _no_password_in(repr(snap))
    _no_password_in(caplog.text)
    assert "credentials" in caplog.text  # the refusal itself is logged


async def test_right_password_delivers_events_and_is_never_shown(
        tmp_path: Path, factory: EventFactory, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("EDGEAGENT_TEST_MQTT_PASSWORD", PASSWORD)
    good = tmp_path / "password"
    good.write_text(PASSWORD + "\n")
    with Mosquitto(tmp_path / "broker", passwords={"gw-1": PASSWORD, "cloud": PASSWORD}) as broker:
        col = Collector(broker.port, username="cloud", password=PASSWORD).start()
        try:
            async with running_uplink(tmp_path, broker.url, username="gw-1",
                                      password={"env": "EDGEAGENT_TEST_MQTT_PASSWORD"}) as (ob, up):
                await deliver(ob, up, col, factory)
                snap = up.snapshot()
            assert await probe(uplink_config(broker.url, username="gw-1", password={"file": str(good)}),
                               "probe-1") == "5"
        finally:
            col.stop()
    _no_password_in(repr(snap))
    _no_password_in(caplog.text)
