"""Wristband decoders: known vectors built from the documented layouts, rejections by code, and
property tests that whatever arrives (bytes, JSON, half-right JSON) decodes or raises DecodeError only."""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.wristband import (
    DECODE_ERROR_CODES,
    DECODERS,
    SUBSCRIPTIONS,
    Decoded,
    DecodeError,
    Deduplicator,
    GatewayStatus,
    Reading,
    Rejected,
)
from edgeagent.drivers.wristband.decoders import (
    WRISTBAND_COMPANY_ID,
    decode_ble_adv_hex,
    decode_ble_json,
    decode_chirpstack_v4,
    parse_ad_structures,
)

NOW = 1_000.0
MAC = "aabbccddeeff"
EUI = "0102030405060708"
UP = f"application/7f0c1a2b-app/device/{EUI}/event/up"


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def codes(fn: Any, topic: str, payload: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        fn(topic, payload, NOW)
    assert info.value.code in DECODE_ERROR_CODES
    return info.value.code


# --- test-side encoders, written from the docstrings -----------------------------------------------------

def adv_frame(*, flags: int = 0x04, hr: int = 72, spo2: int = 97, bat: int = 81, seq: int = 1,
              company: int = WRISTBAND_COMPANY_ID, version: int = 1, checksum: int | None = None) -> bytes:
    """Manufacturer data v1: company u16 LE, ver, flags, hr, spo2, batt, seq u16 LE, sum & 0xFF."""
    body = company.to_bytes(2, "little") + bytes([version, flags, hr, spo2, bat]) + seq.to_bytes(2, "little")
    return body + bytes([sum(body) & 0xFF if checksum is None else checksum])


def ad(ad_type: int, data: bytes) -> bytes:
    return bytes([len(data) + 1, ad_type]) + data


def advert(frame: bytes, *before: bytes) -> str:
    return (b"".join(before) + ad(0x01, b"\x06") + ad(0xFF, frame)).hex().upper()


def chirp_up(*, eui: str = EUI, fcnt: int | None = 42, fport: int | None = 10, data: bytes | None = None,
             rx: list[dict[str, Any]] | None = None) -> bytes:
    doc: dict[str, Any] = {"deduplicationId": "3f1c", "time": "2026-01-01T00:00:00Z",
                           "deviceInfo": {"tenantName": "compound", "deviceName": "band-7", "devEui": eui},
                           "adr": True, "dr": 5, "confirmed": False}
    if fcnt is not None:
        doc["fCnt"] = fcnt
    if fport is not None:
        doc["fPort"] = fport
    if data is not None:
        doc["data"] = base64.b64encode(data).decode()
    if rx is not None:
        doc["rxInfo"] = rx
    return dumps(doc)


def only(items: list[Decoded]) -> Reading:
    assert len(items) == 1
    assert isinstance(items[0], Reading)
    return items[0]


# --- registry -------------------------------------------------------------------------------------------

def test_registry_names_and_subscriptions() -> None:
    assert set(DECODERS) == {"ble-json", "ble-adv-hex", "chirpstack-v4"} == set(SUBSCRIPTIONS)
    for name, decoder in DECODERS.items():
        assert decoder.__doc__ and "Topic" in decoder.__doc__, name


# --- ble-json -------------------------------------------------------------------------------------------

def test_ble_json_full_message() -> None:
    payload = dumps({"hr": 72, "spo2": 97, "bat": 81, "event": "sos", "worn": True, "rssi": -67, "seq": 1234,
                     "fw": "1.2.0", "extra": {"nested": [1, 2]}})
    r = only(decode_ble_json("iot/gw-north/AA:BB:CC:DD:EE:FF/data", payload, NOW))
    assert r == Reading(device=MAC, via="gw-north", received_at=NOW, heart_rate_bpm=72, spo2_pct=97,
                        battery_pct=81, worn=True, sos=True, fall=False, rssi_dbm=-67, gateway_zone="gw-north",
                        sequence=1234, dedup_key=f"{MAC}:1234")


def test_ble_json_partial_and_lenient_numbers() -> None:
    r = only(decode_ble_json("iot/gw1/aa-bb-cc-dd-ee-ff/data", b'{"hr": 72.0, "event": "fall", "rssi": -70.6}', NOW))
    assert (r.device, r.heart_rate_bpm, r.fall, r.sos, r.rssi_dbm) == (MAC, 72, True, False, -71)
    assert (r.spo2_pct, r.battery_pct, r.worn, r.sequence, r.dedup_key) == (None, None, None, None, None)
    empty = only(decode_ble_json("iot/gw1/AABBCCDDEEFF/data", b'{"hr": null, "event": "none"}', NOW))
    assert (empty.heart_rate_bpm, empty.sos, empty.fall) == (None, False, False)


@pytest.mark.parametrize(("topic", "payload", "code"), [
    ("iot/gw1/aabbccddeeff/data", b'{"hr": 19}', "out_of_range"),
    ("iot/gw1/aabbccddeeff/data", b'{"hr": 251}', "out_of_range"),
    ("iot/gw1/aabbccddeeff/data", b'{"spo2": 101}', "out_of_range"),
    ("iot/gw1/aabbccddeeff/data", b'{"spo2": 49}', "out_of_range"),
    ("iot/gw1/aabbccddeeff/data", b'{"bat": -1}', "out_of_range"),
    ("iot/gw1/aabbccddeeff/data", b'{"rssi": -300}', "out_of_range"),
    ("iot/gw1/aabbccddeeff/data", b'{"seq": -1}', "out_of_range"),
    ("iot/gw1/aabbccddeeff/data", b'{"hr": "72"}', "bad_type"),
    ("iot/gw1/aabbccddeeff/data", b'{"hr": true}', "bad_type"),
    ("iot/gw1/aabbccddeeff/data", b'{"hr": 72.5}', "bad_type"),
    ("iot/gw1/aabbccddeeff/data", b'{"worn": "yes"}', "bad_type"),
    ("iot/gw1/aabbccddeeff/data", b'{"event": 1}', "bad_type"),
    ("iot/gw1/aabbccddeeff/data", b'{"event": "panic"}', "unknown_type"),
    ("iot/gw1/aabbccddeeff/data", b"[1, 2]", "bad_type"),
    ("iot/gw1/aabbccddeeff/data", b"{not json", "not_json"),
    ("iot/gw1/aabbccddeeff/data", b"\xff\xfe", "not_json"),
    ("iot/gw1/aabbccddeeff/data", b"", "not_json"),
    ("iot/gw1/not-a-mac/data", b"{}", "bad_id"),
    ("iot/gw 1/aabbccddeeff/data", b"{}", "bad_id"),
    ("iot/gw1/aabbccddeeff/telemetry", b"{}", "bad_topic"),
    ("iot/gw1/aabbccddeeff/data/x", b"{}", "bad_topic"),
    ("iot/gw1/status", b'{"state": "rebooting"}', "unknown_type"),
    ("iot/gw1/status", b'{"up": true}', "missing_field"),
    ("iot/gw1/status", b'{"state": 1}', "bad_type"),
    ("iot/gw1/status", b"maybe", "not_json"),
])
def test_ble_json_rejections(topic: str, payload: bytes, code: str) -> None:
    assert codes(decode_ble_json, topic, payload) == code


@pytest.mark.parametrize(("payload", "online"), [
    (b'{"state": "online", "fw": "2.1"}', True),
    (b'{"state": "offline"}', False),  # the Last Will, retained
    (b"offline", False),                # a bare-word Will
    (b" Online\n", True),
    (b'"offline"', False),
])
def test_ble_gateway_status_and_will(payload: bytes, online: bool) -> None:
    assert decode_ble_json("iot/gw-north/status", payload, NOW) == [GatewayStatus("gw-north", online, NOW)]


def test_ble_status_cleared_retained_message_gives_nothing() -> None:
    assert decode_ble_json("iot/gw-north/status", b"", NOW) == []


# --- ble-adv-hex ----------------------------------------------------------------------------------------

def test_adv_known_vector_from_the_docstring() -> None:
    # flags 0x05 = sos + worn, hr 72, spo2 96, batt 81, seq 0x1234; checksum by hand:
    # FF+FF+01+05+48+60+51+34+12 = 835 -> 835 & 0xFF = 0x43
    adv = "0201060BFFFFFF0105486051341243"
    payload = dumps({"gw": "ignored", "mac": "AA:BB:CC:DD:EE:FF", "rssi": -70, "adv": adv})
    r = only(decode_ble_adv_hex("ble/gw-east/adv", payload, NOW))
    assert r == Reading(device=MAC, via="gw-east", received_at=NOW, heart_rate_bpm=72, spo2_pct=96,
                        battery_pct=81, worn=True, charging=False, sos=True, fall=False, rssi_dbm=-70,
                        gateway_zone="gw-east", sequence=0x1234, dedup_key=f"{MAC}:4660")


def test_adv_batch_of_several_wristbands_skips_unknown_ad_types_and_foreign_devices() -> None:
    name = ad(0x09, b"Band-7")
    service = ad(0x16, b"\xaa\xfe\x10\x00")
    other_maker = ad(0xFF, b"\x4c\x00\x02\x15" + bytes(21))  # someone else's beacon
    batch = [
        {"mac": "112233445501", "rssi": -60, "adv": advert(adv_frame(flags=0x01, seq=7), name, service)},
        {"mac": "112233445502", "rssi": -80, "adv": advert(adv_frame(flags=0x06, hr=0, spo2=0, bat=0xFF, seq=8))},
        {"mac": "A0B1C2D3E4F5", "rssi": -90, "adv": (ad(0x01, b"\x06") + other_maker).hex()},
        {"mac": "112233445503", "adv": advert(adv_frame(flags=0x0C, seq=9), other_maker) + "0000"},  # padding
    ]
    items = decode_ble_adv_hex("ble/gw-east/adv", dumps(batch), NOW)
    assert all(isinstance(i, Reading) for i in items)
    readings = [i for i in items if isinstance(i, Reading)]
    assert [r.device for r in readings] == ["112233445501", "112233445502", "112233445503"]
    sos, fallen, charging = readings
    assert (sos.sos, sos.fall, sos.worn, sos.rssi_dbm, sos.dedup_key) == (True, False, False, -60, "112233445501:7")
    assert (fallen.fall, fallen.worn, fallen.heart_rate_bpm, fallen.spo2_pct, fallen.battery_pct) == (
        True, True, None, None, None)
    assert (charging.worn, charging.charging, charging.rssi_dbm) == (True, True, None)


def test_adv_batch_bad_entries_become_rejections_and_the_sos_still_counts() -> None:
    good = advert(adv_frame(flags=0x01, seq=3))
    batch = [
        {"mac": "112233445501", "adv": advert(adv_frame(checksum=0x00))},
        {"mac": "112233445502", "adv": good[:-6]},          # truncated mid-structure
        {"mac": "112233445503", "adv": good},
        "not an object",
        {"mac": "nope", "adv": good},
        {"mac": "112233445506", "adv": "0G"},
    ]
    items = decode_ble_adv_hex("ble/gw1/adv", dumps(batch), NOW)
    assert [(i.index, i.code, i.device) for i in items if isinstance(i, Rejected)] == [
        (0, "bad_checksum", "112233445501"), (1, "short_frame", "112233445502"), (3, "bad_type", None),
        (4, "bad_id", None), (5, "bad_hex", "112233445506")]
    assert [(i.device, i.sos) for i in items if isinstance(i, Reading)] == [("112233445503", True)]


@pytest.mark.parametrize(("entry", "code"), [
    ({"mac": MAC, "adv": advert(adv_frame(checksum=0x00))}, "bad_checksum"),
    ({"mac": MAC, "adv": advert(adv_frame())[:-2]}, "short_frame"),                 # AD length overruns
    ({"mac": MAC, "adv": (ad(0xFF, adv_frame()[:7])).hex()}, "short_frame"),        # frame itself short
    ({"mac": MAC, "adv": (ad(0xFF, b"\xff\xff")).hex()}, "short_frame"),
    ({"mac": MAC, "adv": (ad(0xFF, adv_frame() + b"\x00")).hex()}, "bad_length"),
    ({"mac": MAC, "adv": advert(adv_frame(version=2))}, "unknown_type"),
    ({"mac": MAC, "adv": advert(adv_frame(hr=10))}, "out_of_range"),
    ({"mac": MAC, "adv": advert(adv_frame(spo2=40))}, "out_of_range"),
    ({"mac": MAC, "adv": advert(adv_frame(bat=101))}, "out_of_range"),
    ({"mac": MAC, "adv": "020"}, "bad_hex"),
    ({"mac": MAC, "adv": "02 01 06"}, "bad_hex"),
    ({"mac": MAC, "adv": 1234}, "bad_type"),
    ({"mac": MAC, "adv": "00" * 256}, "too_large"),
    ({"mac": MAC}, "missing_field"),
    ({"adv": "020106"}, "missing_field"),
    ({"mac": 7, "adv": "020106"}, "bad_type"),
])
def test_adv_single_entry_rejections(entry: dict[str, Any], code: str) -> None:
    assert codes(decode_ble_adv_hex, "ble/gw1/adv", dumps(entry)) == code


def test_adv_topic_and_batch_limits() -> None:
    assert codes(decode_ble_adv_hex, "ble/gw1/data", b"[]") == "bad_topic"
    assert codes(decode_ble_adv_hex, "ble//adv", b"[]") == "bad_id"
    assert codes(decode_ble_adv_hex, "ble/gw1/adv", dumps([{}] * 257)) == "too_large"
    assert codes(decode_ble_adv_hex, "ble/gw1/adv", b"x" * (64 * 1024 + 1)) == "too_large"
    assert decode_ble_adv_hex("ble/gw1/adv", b"[]", NOW) == []


def test_parse_ad_structures() -> None:
    assert parse_ad_structures(bytes.fromhex("020106 03FF4C00 00 FFFF")) == [(0x01, b"\x06"), (0xFF, b"\x4c\x00")]
    assert parse_ad_structures(b"") == []
    with pytest.raises(DecodeError) as info:
        parse_ad_structures(bytes.fromhex("020106 05FF4C"))
    assert info.value.code == "short_frame"


macs = st.binary(min_size=6, max_size=6)
other_ad = st.tuples(st.integers(0, 0xFE), st.binary(max_size=8))


@settings(max_examples=300, deadline=None)
@given(flags=st.integers(0, 255), hr=st.sampled_from([0]) | st.integers(20, 250),
       spo2=st.sampled_from([0]) | st.integers(50, 100), bat=st.integers(0, 100) | st.sampled_from([0xFF]),
       seq=st.integers(0, 0xFFFF), mac=macs, rssi=st.none() | st.integers(-150, 20),
       before=st.lists(other_ad, max_size=3), sep=st.sampled_from(["", ":", "-"]), upper=st.booleans())
def test_adv_encode_then_decode_round_trip(flags: int, hr: int, spo2: int, bat: int, seq: int, mac: bytes,
                                          rssi: int | None, before: list[tuple[int, bytes]], sep: str,
                                          upper: bool) -> None:
    text = sep.join(f"{b:02x}" for b in mac)
    entry: dict[str, Any] = {"mac": text.upper() if upper else text,
                             "adv": advert(adv_frame(flags=flags, hr=hr, spo2=spo2, bat=bat, seq=seq),
                                           *(ad(t, d) for t, d in before))}
    if rssi is not None:
        entry["rssi"] = rssi
    r = only(decode_ble_adv_hex("ble/gw-7/adv", dumps(entry), NOW))
    assert r.device == mac.hex()
    assert (r.sos, r.fall, r.worn, r.charging) == (bool(flags & 1), bool(flags & 2), bool(flags & 4),
                                                   bool(flags & 8))
    assert r.heart_rate_bpm == (hr or None)
    assert r.spo2_pct == (spo2 or None)
    assert r.battery_pct == (None if bat == 0xFF else bat)
    assert (r.sequence, r.dedup_key, r.rssi_dbm, r.via, r.gateway_zone) == (
        seq, f"{mac.hex()}:{seq}", rssi, "gw-7", "gw-7")


# --- chirpstack-v4 --------------------------------------------------------------------------------------

RX = [{"gatewayId": "0080000000000001", "rssi": -110, "snr": -3.5},
      {"gatewayId": "0080000000000002", "rssi": -97, "snr": 7.25, "channel": 2, "context": "AAA="},
      {"gatewayId": "0080000000000003", "rssi": -105, "snr": 1.0}]


def test_chirpstack_status_frame_with_the_loudest_gateway() -> None:
    r = only(decode_chirpstack_v4(UP, chirp_up(data=bytes([0x04, 72, 97, 81]), rx=RX), NOW))
    assert r == Reading(device=EUI, via="lorawan", received_at=NOW, heart_rate_bpm=72, spo2_pct=97,
                        battery_pct=81, worn=True, charging=False, sos=False, fall=False, rssi_dbm=-97,
                        snr_db=7.25, gateway_zone="0080000000000002", sequence=42, dedup_key=f"{EUI}:42")


def test_chirpstack_alarm_frame_and_sentinels() -> None:
    r = only(decode_chirpstack_v4(UP, chirp_up(fport=11, data=bytes([0x03, 0]), rx=RX[:1]), NOW))
    assert (r.sos, r.fall, r.worn, r.heart_rate_bpm, r.battery_pct) == (True, True, False, None, None)
    s = only(decode_chirpstack_v4(UP, chirp_up(data=bytes([0, 0, 0, 0xFF])), NOW))
    assert (s.heart_rate_bpm, s.spo2_pct, s.battery_pct, s.rssi_dbm, s.gateway_zone) == (None, None, None, None, None)


def test_chirpstack_zero_values_omitted_and_sign_of_life() -> None:
    # proto3 JSON leaves out fCnt 0; an uplink without data (or on fPort 0) still says the band is alive.
    r = only(decode_chirpstack_v4(UP, chirp_up(fcnt=None, fport=None), NOW))
    assert (r.sequence, r.dedup_key, r.sos, r.heart_rate_bpm) == (0, f"{EUI}:0", None, None)
    upper = f"application/a/device/{EUI.upper()}/event/up"
    assert only(decode_chirpstack_v4(upper, chirp_up(eui=EUI.upper(), fport=0, data=b"\x01"), NOW)).device == EUI


def test_chirpstack_duplicates_from_several_gateways_share_a_dedup_key() -> None:
    copies = [decode_chirpstack_v4(UP, chirp_up(fport=11, data=b"\x01\x50", rx=[rx]), NOW + i)
              for i, rx in enumerate(RX)]
    readings = [only(c) for c in copies]
    assert {r.dedup_key for r in readings} == {f"{EUI}:42"}
    assert {r.gateway_zone for r in readings} == {rx["gatewayId"] for rx in RX}
    dedup = Deduplicator(ttl_s=60)
    assert [dedup.admit_reading(r) for r in readings] == [True, False, False]
    assert dedup.duplicates == 2
    nxt = only(decode_chirpstack_v4(UP, chirp_up(fcnt=43, fport=11, data=b"\x01\x50"), NOW + 5))
    assert dedup.admit_reading(nxt)


def test_chirpstack_device_status_event() -> None:
    topic = f"application/a/device/{EUI}/event/status"
    doc = {"deviceInfo": {"devEui": EUI}, "margin": 7, "batteryLevel": 55.6}
    assert only(decode_chirpstack_v4(topic, dumps(doc), NOW)) == Reading(EUI, "lorawan", NOW, battery_pct=56)
    doc["externalPowerSource"] = True
    assert only(decode_chirpstack_v4(topic, dumps(doc), NOW)).battery_pct is None
    assert codes(decode_chirpstack_v4, topic, dumps({"deviceInfo": {"devEui": EUI}, "batteryLevel": 120})) \
        == "out_of_range"


@pytest.mark.parametrize(("topic", "payload", "code"), [
    (UP, chirp_up(eui="0102030405060709"), "bad_id"),
    (UP, chirp_up(eui="xyz"), "bad_id"),
    (UP, dumps({"fCnt": 1}), "missing_field"),
    (UP, dumps({"deviceInfo": {}}), "missing_field"),
    (UP, dumps({"deviceInfo": "x"}), "bad_type"),
    (UP, chirp_up(fport=99, data=b"\x00"), "unknown_type"),
    (UP, chirp_up(fport=10, data=b"\x00\x48\x60"), "short_frame"),
    (UP, chirp_up(fport=10, data=b"\x00\x48\x60\x50\x00"), "bad_length"),
    (UP, chirp_up(fport=11, data=b"\x04\x48"), "out_of_range"),
    (UP, chirp_up(fport=10, data=bytes([0, 10, 97, 81])), "out_of_range"),
    (UP, chirp_up(fport=300), "out_of_range"),
    (UP, chirp_up(fcnt=-1), "out_of_range"),
    (UP, chirp_up(rx=[{"gatewayId": "g1", "rssi": "loud"}]), "bad_type"),
    (UP, chirp_up(rx=[{"gatewayId": "g 1"}]), "bad_id"),
    (UP, chirp_up(rx=[{"gatewayId": "g1", "snr": 99.0}]), "out_of_range"),
    (UP, dumps({"deviceInfo": {"devEui": EUI}, "rxInfo": {"gatewayId": "g1"}}), "bad_type"),
    (UP, dumps({"deviceInfo": {"devEui": EUI}, "fPort": 10, "data": "!!!"}), "bad_base64"),
    (UP, dumps({"deviceInfo": {"devEui": EUI}, "fPort": 10, "data": "é"}), "bad_base64"),
    (UP, b"\x00", "not_json"),
    (f"application/a/device/{EUI}/event/bogus", b"{}", "bad_topic"),
    (f"application//device/{EUI}/event/up", b"{}", "bad_topic"),
    (f"application/a/devices/{EUI}/event/up", b"{}", "bad_topic"),
])
def test_chirpstack_rejections(topic: str, payload: bytes, code: str) -> None:
    assert codes(decode_chirpstack_v4, topic, payload) == code


def test_chirpstack_events_without_wristband_data_give_nothing() -> None:
    assert decode_chirpstack_v4(f"application/a/device/{EUI}/event/join", b"anything", NOW) == []
    assert decode_chirpstack_v4(f"application/a/device/{EUI}/event/txack", b"{}", NOW) == []


# --- every decoder: arbitrary bytes and JSON, never a crash ------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=25,
)
segment = st.text(max_size=12) | st.sampled_from(["gw1", MAC, "AA:BB:CC:DD:EE:FF", EUI, "+", ""])
topics = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["iot/gw1/aabbccddeeff/data", "iot/gw1/status", "ble/gw1/adv", UP,
                     f"application/a/device/{EUI}/event/status", f"application/a/device/{EUI}/event/join"]),
    st.builds(lambda g, d: f"iot/{g}/{d}/data", segment, segment),
    st.builds(lambda g: f"iot/{g}/status", segment),
    st.builds(lambda g: f"ble/{g}/adv", segment),
    st.builds(lambda a, d, e: f"application/{a}/device/{d}/event/{e}", segment, segment,
              segment | st.sampled_from(["up", "status"])),
)
decoder_names = st.sampled_from(sorted(DECODERS))


def check(name: str, topic: str, payload: bytes) -> None:
    """Decodes to well-typed items or raises DecodeError with a known code; the same input twice gives the
    same answer (pure)."""
    decoder = DECODERS[name]
    try:
        items = decoder(topic, payload, NOW)
    except DecodeError as exc:
        assert exc.code in DECODE_ERROR_CODES
        with pytest.raises(DecodeError) as again:
            decoder(topic, payload, NOW)
        assert again.value.code == exc.code
        return
    assert isinstance(items, list)
    for item in items:
        assert isinstance(item, Reading | GatewayStatus | Rejected)
        if isinstance(item, Rejected):
            assert item.code in DECODE_ERROR_CODES
        else:
            assert item.received_at == NOW
    assert decoder(topic, payload, NOW) == items


@settings(max_examples=400, deadline=None)
@given(name=decoder_names, topic=topics, payload=st.binary(max_size=300))
def test_arbitrary_bytes_into_every_decoder(name: str, topic: str, payload: bytes) -> None:
    check(name, topic, payload)


@settings(max_examples=400, deadline=None)
@given(name=decoder_names, topic=topics, value=json_values)
def test_arbitrary_json_into_every_decoder(name: str, topic: str, value: Any) -> None:
    check(name, topic, dumps(value))


# Half-right JSON: the keys each decoder reads, with values that are mostly right and sometimes not, so the
# fuzzing reaches the field checks, the binary frames and valid readings rather than stopping at the first
# type check.
def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any] = json_values,
           one_in: int = 4) -> st.SearchStrategy[Any]:
    return st.integers(1, one_in).flatmap(lambda i: bad if i == 1 else good)


byte = st.integers(0, 255)
frames = st.builds(
    adv_frame, flags=byte, hr=mostly(st.integers(20, 250), byte), spo2=mostly(st.integers(50, 100), byte),
    bat=mostly(st.integers(0, 100), byte), seq=st.integers(0, 0xFFFF), version=mostly(st.just(1), byte),
    checksum=mostly(st.none(), byte),
).flatmap(lambda f: mostly(st.just(f), st.sampled_from([f[:-1], f + b"\0", f[:3], f[:1]])))
hexes = mostly(st.builds(lambda f, b: advert(f, *b), frames, st.lists(other_ad.map(lambda t: ad(*t)), max_size=2)),
               st.binary(max_size=40).map(bytes.hex) | st.text(max_size=10) | json_values)
ble_json_docs = st.fixed_dictionaries({}, optional={
    "hr": mostly(st.integers(0, 300)), "spo2": mostly(st.integers(40, 110)), "bat": mostly(st.integers(-5, 105)),
    "event": mostly(st.sampled_from(["none", "sos", "fall", "x"])), "worn": mostly(st.booleans()),
    "rssi": mostly(st.floats(-200, 50)), "seq": mostly(st.integers(-1, 2**32)),
    "state": mostly(st.sampled_from(["online", "offline", "?"]))})
adv_entries = mostly(st.fixed_dictionaries(
    {"mac": mostly(macs.map(bytes.hex)), "adv": hexes},
    optional={"rssi": mostly(st.integers(-200, 50)), "gw": json_values}))
rx_entries = st.fixed_dictionaries({}, optional={
    "gatewayId": mostly(st.sampled_from(["0080000000000001", "0080000000000002", "g 1"]), one_in=10),
    "rssi": mostly(st.integers(-200, 50), one_in=10), "snr": mostly(st.floats(-60, 60), one_in=10)})
dev_euis = mostly(st.sampled_from([EUI, EUI.upper()]), st.sampled_from(["0", f"{EUI[:-1]}9"]) | json_values, 10)
chirp_docs = st.fixed_dictionaries(
    {"deviceInfo": mostly(st.fixed_dictionaries({"devEui": dev_euis}), one_in=10)},
    optional={
        "fCnt": mostly(st.integers(-1, 2**32), one_in=10), "fPort": mostly(st.sampled_from([0, 10, 11, 12, 256])),
        "data": mostly(st.binary(max_size=6).map(lambda b: base64.b64encode(b).decode()), st.text(max_size=8), 10),
        "rxInfo": mostly(st.lists(rx_entries, max_size=3), one_in=10),
        "batteryLevel": mostly(st.floats(-10, 110), one_in=10),
        "batteryLevelUnavailable": mostly(st.booleans(), one_in=10),
        "externalPowerSource": mostly(st.booleans(), one_in=10)})


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_half_right_json_into_every_decoder(data: st.DataObject) -> None:
    name = data.draw(decoder_names)
    doc: Any
    if name == "ble-json":
        topic = data.draw(st.sampled_from(["iot/gw1/AABBCCDDEEFF/data", "iot/gw1/status"]))
        doc = data.draw(ble_json_docs)
    elif name == "ble-adv-hex":
        topic = "ble/gw1/adv"
        doc = data.draw(adv_entries | st.lists(adv_entries, max_size=5))
    else:
        topic = data.draw(st.sampled_from([UP, f"application/a/device/{EUI}/event/status"]))
        doc = data.draw(chirp_docs)
    check(name, topic, dumps(doc))


# --- Deduplicator ---------------------------------------------------------------------------------------

def test_dedup_drops_repeats_within_the_ttl_and_forgets_after_it() -> None:
    d = Deduplicator(ttl_s=10)
    assert d.admit("band", "band:1", 0.0)
    assert not d.admit("band", "band:1", 5.0)
    assert not d.admit("band", "band:1", 9.9)   # a repeat does not extend the TTL ...
    assert d.admit("band", "band:1", 10.0)      # ... so a wrapped counter passes again
    assert d.admit("other", "band:1", 10.0)     # keys are per device
    assert d.duplicates == 2
    assert d.admit_reading(Reading("band", "gw", 11.0))  # no key: always passes


def test_dedup_is_bounded_under_a_flood_of_distinct_keys() -> None:
    d = Deduplicator(ttl_s=1e9, keys_per_device=8, max_devices=16)
    for i in range(10_000):
        assert d.admit(f"dev{i % 16}", f"k{i}", float(i))
        assert len(d) <= 8 * 16
    assert len(d) == 8 * 16
    assert d.evicted == 10_000 - 8 * 16
    for i in range(10_000):  # a new device every time: the idlest device goes
        assert d.admit(f"new{i}", "k", float(i))
        assert len(d) <= 8 * 16
    assert len(d) == 16
    # A flooding device only pushes out its own history.
    quiet = Deduplicator(ttl_s=1e9, keys_per_device=4, max_devices=4)
    assert quiet.admit("calm", "calm:1", 0.0)
    for i in range(1000):
        quiet.admit("noisy", f"noisy:{i}", 1.0)
    assert not quiet.admit("calm", "calm:1", 2.0)


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 30), st.floats(0, 5)), max_size=300))
def test_dedup_properties(ops: list[tuple[int, int, float]]) -> None:
    d = Deduplicator(ttl_s=3, keys_per_device=5, max_devices=4)
    now = 0.0
    for device, key, dt in ops:
        now += dt
        d.admit(f"d{device}", f"k{key}", now)
        assert not d.admit(f"d{device}", f"k{key}", now)  # just seen: a repeat
        assert len(d) <= 5 * 4


def test_dedup_rejects_a_nonsense_bound() -> None:
    with pytest.raises(ValueError, match="positive"):
        Deduplicator(keys_per_device=0)


# --- hostile structure: deep nesting, huge sizes, recursive values (issue 7, item 13) -------------------
#
# Built as JSON *text*: orjson cannot even serialise 1,000 levels, but a gateway (or an attacker on the
# local broker) can publish them. Every decoder must answer with a counted rejection, never RecursionError,
# and a deep entry in a BLE advertisement batch must not hide the valid SOS beside it.

SOS_ENTRY = dumps({"mac": "112233445566", "adv": advert(adv_frame(flags=0x05, seq=9))})


def nest(depth: int, kinds: str = "[", inner: bytes = b"1") -> bytes:
    """``inner`` inside ``depth`` levels of arrays and/or objects (``kinds`` cycles: ``[`` array, ``{`` object)."""
    opens = [b"[" if kinds[i % len(kinds)] == "[" else b'{"k":' for i in range(depth)]
    closes = [b"]" if o == b"[" else b"}" for o in reversed(opens)]
    return b"".join(opens) + inner + b"".join(closes)


# (decoder, topic, template): the deep value goes where %s is; every template is a single document.
DEEP_PLACES: list[tuple[str, str, bytes]] = [
    ("ble-json", f"iot/gw1/{MAC}/data", b"%s"),
    ("ble-json", f"iot/gw1/{MAC}/data", b'{"event": "sos", "hr": %s}'),
    ("ble-json", f"iot/gw1/{MAC}/data", b'{"event": %s}'),
    ("ble-json", f"iot/gw1/{MAC}/data", b'{"event": "sos", "unknown_key": %s}'),
    ("ble-json", "iot/gw1/status", b'{"state": %s}'),
    ("ble-json", "iot/gw1/status", b"%s"),
    ("ble-adv-hex", "ble/gw1/adv", b"%s"),
    ("ble-adv-hex", "ble/gw1/adv", b'{"mac": %s, "adv": "020106"}'),
    ("ble-adv-hex", "ble/gw1/adv", b'{"mac": "112233445566", "adv": "020106", "rssi": %s}'),
    ("chirpstack-v4", UP, b"%s"),
    ("chirpstack-v4", UP, b'{"deviceInfo": %s}'),
    ("chirpstack-v4", UP, b'{"deviceInfo": {"devEui": "' + EUI.encode() + b'"}, "rxInfo": %s}'),
    ("chirpstack-v4", UP, b'{"deviceInfo": {"devEui": "' + EUI.encode() + b'"}, "fCnt": %s}'),
    ("chirpstack-v4", f"application/a/device/{EUI}/event/status",
     b'{"deviceInfo": {"devEui": "' + EUI.encode() + b'"}, "batteryLevel": %s}'),
]
depths = st.sampled_from([1_000, 100_000]) | st.integers(17, 3_000)


def deep_rejection(name: str, topic: str, payload: bytes) -> str:
    """The code the whole message, or else its only batch entry (a top-level array is a BLE batch), was
    rejected with; fails if it decoded to anything else."""
    try:
        items = DECODERS[name](topic, payload, NOW)
    except DecodeError as exc:
        return exc.code
    assert len(items) == 1 and isinstance(items[0], Rejected), items
    return items[0].code
kinds = st.sampled_from(["[", "{", "[{", "{[", "[[{"])


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize(("name", "topic", "template"), DEEP_PLACES)
def test_deep_nesting_is_a_counted_rejection(name: str, topic: str, template: bytes, depth: int) -> None:
    payload = template.replace(b"%s", nest(depth, "[{"))
    assert deep_rejection(name, topic, payload) == ("too_large" if len(payload) > 64 * 1024 else "too_deep")


@settings(max_examples=150, deadline=None)
@given(place=st.sampled_from(DEEP_PLACES), depth=depths, kind=kinds)
def test_deep_nesting_anywhere_in_any_decoder(place: tuple[str, str, bytes], depth: int, kind: str) -> None:
    name, topic, template = place
    payload = template.replace(b"%s", nest(depth, kind))
    check(name, topic, payload)
    assert deep_rejection(name, topic, payload) in ("too_deep", "too_large")


@settings(max_examples=100, deadline=None)
@given(depth=depths, kind=kinds, where=st.sampled_from(["entry", "mac", "adv", "rssi", "extra"]),
       sos_first=st.booleans())
def test_a_deep_batch_entry_never_hides_the_sos_beside_it(depth: int, kind: str, where: str,
                                                          sos_first: bool) -> None:
    deep = nest(depth, kind)
    bad = deep if where == "entry" else {
        "mac": b'{"mac": %s, "adv": "020106"}', "adv": b'{"mac": "aabbccddee01", "adv": %s}',
        "rssi": b'{"mac": "aabbccddee01", "adv": "020106", "rssi": %s}',
        "extra": b'{"mac": "aabbccddee01", "adv": "020106", "note": %s}'}[where].replace(b"%s", deep)
    entries = [SOS_ENTRY, bad] if sos_first else [bad, SOS_ENTRY]
    payload = b"[" + b", ".join(entries) + b"]"
    if len(payload) > 64 * 1024:
        assert codes(decode_ble_adv_hex, "ble/gw1/adv", payload) == "too_large"
        return
    items = decode_ble_adv_hex("ble/gw1/adv", payload, NOW)
    bad_index = 1 if sos_first else 0
    assert [(i.index, i.code) for i in items if isinstance(i, Rejected)] == [(bad_index, "too_deep")]
    assert [(i.device, i.sos) for i in items if isinstance(i, Reading)] == [("112233445566", True)]


@settings(max_examples=30, deadline=None)
@given(name=decoder_names, size=st.integers(64 * 1024 + 1, 4 * 1024 * 1024),
       shape=st.sampled_from(["string", "array", "deep", "spaces"]))
def test_megabyte_payloads_are_too_large_in_every_decoder(name: str, size: int, shape: str) -> None:
    topic = {"ble-json": f"iot/gw1/{MAC}/data", "ble-adv-hex": "ble/gw1/adv", "chirpstack-v4": UP}[name]
    payload = {"string": b'{"pad": "' + b"x" * size + b'"}', "array": b"[" + b"1," * (size // 2) + b"1]",
               "deep": nest(size // 2), "spaces": b" " * size + SOS_ENTRY}[shape]
    assert codes(DECODERS[name], topic, payload) == "too_large"


# Recursive structures: JSON values built recursively (arrays and objects of arrays and objects...), at
# every place a decoder reads, deeper or shallower than the limit; the answer is items or DecodeError.
recursive_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(place=st.sampled_from(DEEP_PLACES), value=recursive_json, wrap=st.integers(0, 40), kind=kinds)
def test_recursive_structures_in_every_decoder(place: tuple[str, str, bytes], value: Any, wrap: int,
                                               kind: str) -> None:
    name, topic, template = place
    text = json.dumps(value).encode()  # stdlib: big integers too (orjson stops at 64 bits), as a gateway may send
    payload = template.replace(b"%s", nest(wrap, kind, text) if wrap else text)
    check(name, topic, payload)
    batch = b"[" + payload + b", " + SOS_ENTRY + b"]"
    if name == "ble-adv-hex":
        items = decode_ble_adv_hex(topic, batch, NOW)
        assert any(isinstance(i, Reading) and i.sos for i in items), "the SOS beside it was lost"
