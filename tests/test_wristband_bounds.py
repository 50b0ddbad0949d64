"""Issue 8 items 2 and 3 against a real mosquitto: guard-room acks carry identity and scope, and the
wristband input is bounded before it reads (packet size, floods, session ids, TLS).

The rig is the one of test_wristband_service (input → alarm runtime → real outbox); floods and big
messages come from mosquitto_pub in its own process, as a gateway on the LAN would send them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import subprocess
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.drivers.wristband.capability import client_id_for
from edgeagent.transport.mqtt import MqttSession, SessionParams
from tests.peers import Mosquitto, make_pki
from tests.test_wristband_service import BAND_A, BAND_B, gateway, rig, until

ACK = "edgeagent/local/alarms/ack"


def client(port: int, client_id: str = "", *, clean: bool = True) -> paho.Client:
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id or
                    f"test-{time.monotonic_ns()}", clean_session=clean)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def publish(c: paho.Client, topic: str, payload: bytes | str) -> None:
    c.publish(topic, payload, qos=1).wait_for_publish(5)


def close(c: paho.Client) -> None:
    c.disconnect()
    c.loop_stop()


# --- item 2: acknowledgements carry an identity and a scope --------------------------------------------

async def test_a_panel_acks_on_its_own_topic_and_can_neither_resolve_nor_use_the_bare_topic(
        tmp_path: Path, broker: Mosquitto) -> None:
    async with rig(tmp_path, broker.port) as r:
        with gateway(broker.port) as gw:
            await asyncio.to_thread(gw.send, BAND_A, "sos")
            await asyncio.to_thread(gw.send, BAND_B, "sos")
            await until(lambda: len(r.alarms.engine.active()) == 2)
        sos_a, sos_b = (a.id for a in r.alarms.engine.active())
        panel = await asyncio.to_thread(client, broker.port)
        try:
            # The old form: anonymous, on the bare topic. Refused and counted.
            await asyncio.to_thread(publish, panel, ACK, orjson.dumps({"alarm_id": sos_a, "by": "guard Li"}))
            await until(lambda: r.service.counters["rejected:ack_without_panel"] == 1)
            # A panel cannot resolve, even on its own topic (the silenced-SOS attack of the issue).
            await asyncio.to_thread(publish, panel, f"{ACK}/panel-a", orjson.dumps(
                {"alarm_id": sos_a, "action": "resolve", "by": "guard Li", "note": "ok"}))
            await until(lambda: r.service.counters["rejected:panel_resolve"] == 1)
            # A guard name with terminal escape codes is refused, nothing recorded.
            await asyncio.to_thread(publish, panel, f"{ACK}/panel-a", orjson.dumps(
                {"alarm_id": sos_a, "by": "\x1b[2Jguard"}))
            await until(lambda: r.service.counters["rejected:guard_ack"] == 1)
            assert all(a.state.unacknowledged for a in r.alarms.engine.active())
            assert not r.alarm_events("alarm.acknowledged") and not r.alarm_events("alarm.resolved")
            # The real thing: the panel's account names the topic; the guard is recorded next to it.
            await asyncio.to_thread(publish, panel, f"{ACK}/panel-a", orjson.dumps(
                {"alarm_id": sos_a, "by": "guard Li"}))
            await asyncio.to_thread(publish, panel, f"{ACK}/panel-b", orjson.dumps({"alarm_id": sos_b}))
            await until(lambda: len(r.alarm_events("alarm.acknowledged")) == 2)
        finally:
            await asyncio.to_thread(close, panel)
        acks = {e.data["alarm_id"]: e.data for e in r.alarm_events("alarm.acknowledged")}
        assert (acks[sos_a]["by"], acks[sos_a]["caller"], acks[sos_a]["via"]) == (
            "guard Li", "panel:panel-a", "local_mqtt")
        assert (acks[sos_b]["by"], acks[sos_b]["caller"]) == ("panel-b", "panel:panel-b")
        assert len(r.alarms.engine.active()) == 2  # acknowledged, never resolved by a panel


# --- item 3: bounded inputs --------------------------------------------------------------------------------

@pytest.mark.parametrize("per_gateway", [True, False], ids=["connection-per-gateway", "one-wildcard-connection"])
async def test_a_flood_from_one_wristband_folds_and_another_residents_sos_is_raised_at_once(
        tmp_path: Path, broker: Mosquitto, capsys: pytest.CaptureFixture[str], per_gateway: bool) -> None:
    """60,000 SOS presses from one band through gateway gw-a (mosquitto_pub, full speed); during the
    flood another resident's SOS through gw-b is raised about at once, and the flood is one alarm.
    With a connection per gateway (``gateways``) and with the one wildcard connection (the fallback)."""
    flood_n = 60_000
    lines = tmp_path / "flood.txt"
    lines.write_text('{"event": "sos", "worn": true}\n' * flood_n)
    inputs = [{"decoder": "ble-json", **({"gateways": ["gw-a", "gw-b"]} if per_gateway else {})}]
    async with rig(tmp_path, broker.port, inputs=inputs) as r:
        assert set(r.service.snapshot()["connections"]) == ({"main", "gw-a", "gw-b"} if per_gateway else {"main"})
        started = time.monotonic()
        flood = subprocess.Popen(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                                  "-i", "flooder", "-t", f"iot/gw-a/{BAND_A}/data", "-l"],
                                 stdin=lines.open("rb"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            # The flood is under way: its alarm is raised and presses are folding into it.
            await until(lambda: any(a.resident_id == "r-1" and a.count >= 500 for a in r.alarms.engine.active()),
                        60)
            victim = await asyncio.to_thread(client, broker.port, "ble-gw-b")
            try:
                sent = time.monotonic()
                await asyncio.to_thread(victim.publish, f"iot/gw-b/{BAND_B}/data",
                                        json.dumps({"event": "sos", "worn": True}), 1)
                await until(lambda: any(a.resident_id == "r-2" for a in r.alarms.engine.active()), 60)
                latency_s = time.monotonic() - sent
                # How much of the flood had been read when the other resident's alarm stood (an ordering
                # figure, not a time: a loaded machine slows both alike).
                flood_read_at_raise = r.service.counters["readings"]
            finally:
                await asyncio.to_thread(close, victim)
            flooding = flood.poll() is None
            await asyncio.to_thread(flood.wait, 120)
            flood_s = time.monotonic() - started
            assert flood.returncode == 0, flood.stderr.read() if flood.stderr else ""
            await until(lambda: r.service.counters["readings"] >= flood_n + 1, 120)
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait()
        sos = [a for a in r.alarms.engine.active() if a.resident_id == "r-1"]
        raised = [e for e in r.alarm_events() if e.data["resident_id"] == "r-1"]
        with capsys.disabled():
            how = "connection per gateway" if per_gateway else "one connection"
            print(f"\nflood ({how}): {flood_n} SOS presses folded into {len(sos)} alarm (count {sos[0].count}) in "
                  f"{flood_s:.1f} s; another resident's SOS raised {latency_s * 1000:.0f} ms after it was sent, "
                  f"{flood_read_at_raise} presses read by then"
                  f"{' while the flood was still arriving' if flooding else ''}")
        assert len(sos) == 1 and len(raised) == 1 and sos[0].count == flood_n
        # The other resident's SOS is raised during the flood, not after it (the issue measured 47 s, after
        # the whole flood). Through one connection it waits behind what the broker has queued for that
        # connection (a bounded queue: about a second here); a connection per gateway takes the broker's
        # queue out of its way. Checked as an order (how much of the flood was read by then), not as a time
        # a loaded machine could miss: a wall-clock bound here failed at load 7-9 (17.4 s).
        share = flood_read_at_raise / flood_n
        assert share < (0.5 if per_gateway else 0.9), (
            f"another resident's SOS was raised only after {share:.0%} of the flood had been read "
            f"({latency_s:.2f} s after it was sent)")
        # The folded count is saved by the alarm ticker (the daemon runs it), not once per press.
        ticker = asyncio.create_task(r.alarms.run())
        try:
            saved: list[Any] = []
            for _ in range(100):
                saved = (await r.store.kv_get("alarms") or {}).get("alarms", [])
                if any(a["resident_id"] == "r-1" and a["count"] == flood_n for a in saved):
                    break
                await asyncio.sleep(0.1)
            assert any(a["resident_id"] == "r-1" and a["count"] == flood_n for a in saved), saved
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker


async def test_a_10_mb_publish_never_reaches_the_daemons_memory(tmp_path: Path, broker: Mosquitto) -> None:
    """The test's broker has no max_packet_size of its own: only the input's CONNECT (Maximum Packet
    Size) keeps the message away. Both publishers are other processes, so what is traced is the input."""
    big = tmp_path / "big.bin"
    big.write_bytes(b"{" + b" " * (10 * 1024 * 1024) + b"}")

    def pub(*args: str) -> None:
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                        "-t", f"iot/gw-1/{BAND_A}/data", *args], check=True, timeout=60)

    async with rig(tmp_path, broker.port) as r:
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            await asyncio.to_thread(pub, "-f", str(big))
            # Then a reading on the same topic: once it is handled, the big one was dropped before it.
            await asyncio.to_thread(pub, "-m", json.dumps({"hr": 70}))
            await until(lambda: r.service.counters["readings"] == 1, 30)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    grew_mb = (peak - base) / 1e6
    print(f"10 MB publish: peak traced memory grew by {grew_mb:.2f} MB")
    assert grew_mb < 2, f"the input's memory grew by {grew_mb:.1f} MB for a 10 MB publish"
    assert r.service.counters["rejected:too_large"] == 0  # not even read to be refused


async def test_a_client_with_the_old_fixed_client_id_gets_nothing(tmp_path: Path, broker: Mosquitto) -> None:
    """The daemon's session is persistent; with the old fixed id a second client took it over (and the
    residents' readings with it). The id is now unique per install and kept across restarts."""
    cid = client_id_for("gw-1", tmp_path / "state")
    assert cid.startswith("edgeagent-gw-1-wristbands-") and cid != "edgeagent-gw-1-wristbands"
    assert client_id_for("gw-1", tmp_path / "state") == cid  # the same after a restart
    assert client_id_for("gw-1", tmp_path / "other-install") != cid
    received: list[str] = []
    intruder = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="edgeagent-gw-1-wristbands",
                           clean_session=False)
    intruder.on_message = lambda _c, _u, m: received.append(m.topic)
    async with rig(tmp_path, broker.port, client_id=cid) as r:
        await asyncio.to_thread(intruder.connect, "127.0.0.1", broker.port)
        intruder.loop_start()
        try:
            with gateway(broker.port) as gw:
                for _ in range(30):
                    await asyncio.to_thread(gw.send, BAND_A)
                await until(lambda: r.service.counters["readings"] == 30)
            await asyncio.sleep(0.5)  # anything the broker was going to send the intruder has come
        finally:
            intruder.disconnect()
            intruder.loop_stop()
        assert r.service.connected.is_set()
    assert received == []


async def test_mqtts_really_uses_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with Mosquitto(tmp_path / "tls-broker", tls=pki) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        async with rig(tmp_path, broker.port, broker=url, tls={"ca_file": str(pki.ca)}) as r:
            session = r.service.session
            assert session is not None and isinstance(session._sock, ssl.SSLSocket)
            tls_gw = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="ble-gw-tls")
            tls_gw.tls_set(ca_certs=str(pki.ca))
            await asyncio.to_thread(tls_gw.connect, "127.0.0.1", broker.port)
            tls_gw.loop_start()
            try:
                await asyncio.to_thread(lambda: tls_gw.publish(
                    f"iot/gw-1/{BAND_A}/data", json.dumps({"event": "sos"}), qos=1).wait_for_publish(5))
                await until(r.alarm_events)
            finally:
                tls_gw.disconnect()
                tls_gw.loop_stop()


async def test_a_cancelled_publish_raises_cancelled_even_when_its_connection_fails_in_the_same_step(
        tmp_path: Path, broker: Mosquitto) -> None:
    """Python 3.11's wait_for returned the torn-down publish's UplinkError instead of CancelledError when
    the cancel and the teardown came in the same loop step: a caller catching UplinkError ran on."""
    async with MqttSession(SessionParams("127.0.0.1", broker.port, f"t-{time.monotonic_ns()}")) as session:
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)  # no PUBACK can come
        try:
            task = asyncio.create_task(session.publish("t/x", b"1", qos=1))
            await asyncio.sleep(0.05)
            assert not task.done()
            task.cancel()
            session.abort()  # fails the pending PUBACK future in the same step
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            broker.proc.send_signal(signal.SIGCONT)
