"""Wristband decoders: pure functions from one MQTT message to typed readings.

A decoder is ``(topic, payload, now) -> list[Reading | GatewayStatus | Rejected]``: no I/O, no clock read
(``now`` is whatever the caller stamps the message with, copied into ``received_at``), no global state.
One message may carry several wristbands (a BLE gateway's batch), so the answer is a list; an empty list
means "valid, but nothing for us" (a retained status cleared, an advertisement from someone else's
device, a ChirpStack join event). Three decoders, by name in :data:`DECODERS`; the topics each expects are
in :data:`SUBSCRIPTIONS` and drawn in its docstring:

    ble-json        iot/{gateway}/{device}/data    JSON per wristband, from a BLE gateway
                    iot/{gateway}/status           the gateway's online/offline state and Last Will
    ble-adv-hex     ble/{gateway}/adv              raw BLE advertisements as hex, one or a batch
    chirpstack-v4   application/{app}/device/{devEui}/event/up|status     LoRaWAN via ChirpStack v4

Failure is a :class:`DecodeError` with a short ``code`` (see :data:`DECODE_ERROR_CODES`) and nothing else:
the caller counts rejections by code. That holds for hostile input too: JSON nested deeper than
:data:`MAX_DEPTH` (no wristband message needs more than 4 levels) is ``too_deep``, and the excerpt of a bad
value in an error's detail never recurses into it, so a payload nested 1,000 levels deep cannot raise
RecursionError out of the error path. A batch is the exception to all-or-nothing: one bad entry becomes a
:class:`Rejected` item in the list (same codes) and the other wristbands in the message still count, so a
neighbour's corrupt frame cannot hide an SOS.

Identity. ``device`` is normalised: a BLE MAC is 12 lower-case hex digits without separators
(``AA:BB:CC:DD:EE:FF`` -> ``aabbccddeeff``), a LoRaWAN DevEUI 16 lower-case hex digits. ``via`` is the BLE
gateway id, or ``"lorawan"``. ``gateway_zone`` is the id of the gateway that located the wristband (the
BLE gateway; for LoRaWAN the one that heard it loudest): the geofence rule maps gateway ids to zones in
config, since a zone is where a gateway is mounted, which only the site knows.

Sentinels. In the binary frames ``0`` means "not measured" for heart rate and SpO2 (a band off the wrist
measures nothing) and ``0xFF`` "unknown" for battery; they decode to ``None``. A measured value outside its
range (heart rate 20..250 bpm, SpO2 50..100 %, battery 0..100 %) rejects the message with ``out_of_range``.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, get_args

import orjson

DecodeErrorCode = Literal[
    "bad_topic",      # the topic is not one this decoder reads
    "too_large",      # payload, batch or advertisement over its cap
    "not_json",       # not UTF-8 JSON
    "bad_type",       # a JSON value of the wrong type (a string where a number belongs)
    "missing_field",  # a required key is absent or null
    "bad_id",         # a MAC, DevEUI or gateway id that is malformed (or disagrees with the topic)
    "out_of_range",   # a number outside its documented range
    "bad_hex",        # advertisement text is not an even count of hex digits
    "bad_base64",     # LoRaWAN data is not base64
    "short_frame",    # a binary frame or AD structure ends early
    "bad_length",     # a binary frame longer than its version defines
    "bad_checksum",   # the frame's checksum byte disagrees
    "unknown_type",   # unknown event name, frame version, fPort or gateway state
    "too_deep",       # JSON nested deeper than MAX_DEPTH
]
DECODE_ERROR_CODES: Final[tuple[DecodeErrorCode, ...]] = get_args(DecodeErrorCode)

MAX_PAYLOAD_BYTES: Final = 64 * 1024
MAX_BATCH: Final = 256
MAX_ADV_BYTES: Final = 255  # an extended advertisement's AdvData in one PDU; legacy ones are 31
MAX_DEPTH: Final = 16  # JSON nesting, counting the outermost array or object as 1

HEART_RATE_RANGE: Final = (20, 250)
SPO2_RANGE: Final = (50, 100)
BATTERY_RANGE: Final = (0, 100)
RSSI_RANGE: Final = (-150, 20)
SNR_RANGE: Final = (-50.0, 50.0)
SEQUENCE_MAX: Final = 2**32 - 1

#: Bluetooth SIG company id carried in the manufacturer data. 0xFFFF is the SIG's value for internal use
#: and tests; a production band uses its maker's assigned id (change this one constant).
WRISTBAND_COMPANY_ID: Final = 0xFFFF
ADV_FRAME_VERSION: Final = 0x01
ADV_FRAME_LEN: Final = 10
AD_TYPE_MANUFACTURER: Final = 0xFF

FLAG_SOS: Final = 0x01
FLAG_FALL: Final = 0x02
FLAG_WORN: Final = 0x04
FLAG_CHARGING: Final = 0x08

FPORT_STATUS: Final = 10
FPORT_ALARM: Final = 11
LORAWAN_VIA: Final = "lorawan"


class DecodeError(ValueError):
    """The message cannot be decoded. ``code`` is one of :data:`DECODE_ERROR_CODES`, for counters;
    ``detail`` is for a log line and never carries more than a short excerpt of the payload."""

    def __init__(self, code: DecodeErrorCode, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code: DecodeErrorCode = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Reading:
    """What one wristband said in one message. Every measurement is optional: ``None`` means the
    message did not say, never "normal". ``dedup_key`` is set when the wire carries a counter; the same
    radio frame heard by several gateways decodes to the same key (the decoder never drops repeats:
    :class:`Deduplicator` does, downstream)."""

    device: str
    via: str
    received_at: float
    heart_rate_bpm: int | None = None
    spo2_pct: int | None = None
    battery_pct: int | None = None
    worn: bool | None = None
    charging: bool | None = None
    sos: bool | None = None
    fall: bool | None = None
    rssi_dbm: int | None = None
    snr_db: float | None = None
    gateway_zone: str | None = None
    sequence: int | None = None
    dedup_key: str | None = None


@dataclass(frozen=True, slots=True)
class GatewayStatus:
    """A BLE gateway said it is online, or its Last Will (or a clean goodbye) said it is offline."""

    gateway: str
    online: bool
    received_at: float


@dataclass(frozen=True, slots=True)
class Rejected:
    """One entry of a batch that could not be decoded (the rest of the batch still counts).
    ``index`` is its position in the batch; ``device`` is set when the entry's id was readable."""

    code: DecodeErrorCode
    detail: str
    index: int
    device: str | None = None


Decoded = Reading | GatewayStatus | Rejected
Decoder = Callable[[str, bytes, float], list[Decoded]]


# --- shared helpers -----------------------------------------------------------------------------------

_MAC_RE: Final = re.compile(r"[0-9a-f]{12}")
_EUI_RE: Final = re.compile(r"[0-9a-f]{16}")
_GATEWAY_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_HEX_RE: Final = re.compile(r"(?:[0-9A-Fa-f]{2})*")


def _excerpt(value: object) -> str:
    """A short, safe description of a bad value for an error's detail. A container is described, never
    rendered (``repr`` of a deeply nested list recurses once per level); a string is cut before ``repr``."""
    if isinstance(value, dict | list):
        return f"<{'object' if isinstance(value, dict) else 'array'} of {len(value)}>"
    if isinstance(value, str):
        text = repr(value[:40])
    elif isinstance(value, bool | float | None):
        text = repr(value)
    elif isinstance(value, int):
        text = repr(value) if abs(value) < 10**30 else "<a huge integer>"
    else:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."


def _depth_exceeds(value: object, limit: int) -> bool:
    """True if ``value`` nests more than ``limit`` arrays/objects deep. Iterative, stops at the first
    level over the limit; visits each node at most once."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: list[object] = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def normalize_mac(raw: object) -> str:
    """``AA:BB:CC:DD:EE:FF``, ``aa-bb-..`` or ``AABBCCDDEEFF`` -> ``aabbccddeeff``."""
    if not isinstance(raw, str):
        raise DecodeError("bad_type", f"a MAC must be a string, not {type(raw).__name__}")
    mac = raw.replace(":", "").replace("-", "").lower()
    if not _MAC_RE.fullmatch(mac):
        raise DecodeError("bad_id", f"not a MAC: {_excerpt(raw)}")
    return mac


def normalize_eui(raw: object) -> str:
    """A LoRaWAN DevEUI in any case, with or without separators -> 16 lower-case hex digits."""
    if not isinstance(raw, str):
        raise DecodeError("bad_type", f"a DevEUI must be a string, not {type(raw).__name__}")
    eui = raw.replace(":", "").replace("-", "").lower()
    if not _EUI_RE.fullmatch(eui):
        raise DecodeError("bad_id", f"not a DevEUI: {_excerpt(raw)}")
    return eui


def _gateway_id(raw: object) -> str:
    """Gateway ids are kept as sent (config matches them exactly) but must look like ids."""
    if not isinstance(raw, str):
        raise DecodeError("bad_type", f"a gateway id must be a string, not {type(raw).__name__}")
    if not _GATEWAY_RE.fullmatch(raw):
        raise DecodeError("bad_id", f"not a gateway id: {_excerpt(raw)}")
    return raw


def _parse(payload: bytes | str) -> object:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        # orjson refuses nesting beyond 1024 levels with this message; anything else is not JSON.
        if "depth" in str(exc) or "recursion" in str(exc):
            raise DecodeError("too_deep", f"nested deeper than {MAX_DEPTH} levels") from exc
        raise DecodeError("not_json", str(exc)[:80]) from exc


def _loads(payload: bytes, *, max_depth: int = MAX_DEPTH) -> object:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise DecodeError("too_large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    doc = _parse(payload)
    if _depth_exceeds(doc, max_depth):
        raise DecodeError("too_deep", f"nested deeper than {max_depth} levels")
    return doc


_TOKEN_RE: Final = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def _split_array(payload: bytes) -> list[bytes]:
    """The texts of a JSON array's top-level elements, found by scanning brackets outside strings; used only
    when the whole array cannot be parsed because one element nests too deep, so the others still decode.
    Raises ``not_json`` when the text is not one array of elements."""
    text = payload.strip()
    if not text.startswith(b"[") or not text.endswith(b"]"):
        raise DecodeError("not_json", "not a JSON array")
    elements: list[bytes] = []
    depth = 0
    start = 1
    for m in _TOKEN_RE.finditer(text):
        tok = m.group()
        if tok in (b"[", b"{"):
            depth += 1
        elif tok in (b"]", b"}"):
            depth -= 1
            if depth == 0:
                if m.end() != len(text):
                    raise DecodeError("not_json", "text after the array")
                elements.append(text[start:m.start()])
        elif tok == b"," and depth == 1:
            elements.append(text[start:m.start()])
            start = m.end()
        if depth < 0:
            raise DecodeError("not_json", "unbalanced brackets")
    if depth != 0:
        raise DecodeError("not_json", "unbalanced brackets")
    if len(elements) == 1 and not elements[0].strip():
        return []
    return elements


def _object(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise DecodeError("bad_type", f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _int(obj: Mapping[str, object], key: str, bounds: tuple[int, int]) -> int | None:
    """An integer field (a float with no fraction counts); absent or null is None."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # is_integer() is False for inf and NaN
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError("bad_type", f"{key} must be a whole number, not {_excerpt(value)}")
    lo, hi = bounds
    if not lo <= value <= hi:
        raise DecodeError("out_of_range", f"{key}={value} outside {lo}..{hi}")
    return value


def _rssi(obj: Mapping[str, object], key: str) -> int | None:
    """RSSI may come as a fraction from some gateways: round it."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DecodeError("bad_type", f"{key} must be a number, not {_excerpt(value)}")
    if not RSSI_RANGE[0] <= value <= RSSI_RANGE[1]:
        raise DecodeError("out_of_range", f"{key}={value} outside {RSSI_RANGE[0]}..{RSSI_RANGE[1]}")
    return round(value)


def _bool(obj: Mapping[str, object], key: str) -> bool | None:
    value = obj.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise DecodeError("bad_type", f"{key} must be true or false, not {_excerpt(value)}")


def _measured(key: str, raw: int, bounds: tuple[int, int], unknown: int) -> int | None:
    """A u8 from a binary frame: the sentinel means not measured, else it must be in range."""
    if raw == unknown:
        return None
    if not bounds[0] <= raw <= bounds[1]:
        raise DecodeError("out_of_range", f"{key}={raw} outside {bounds[0]}..{bounds[1]}")
    return raw


@dataclass(frozen=True, slots=True)
class Flags:
    sos: bool
    fall: bool
    worn: bool
    charging: bool


def _flags(byte: int) -> Flags:
    """The flags byte shared by the BLE and LoRaWAN frames; bits 4..7 are reserved (sent 0, ignored)::

        bit  7 6 5 4 | 3        | 2    | 1    | 0
             reserved | charging | worn | fall | sos
    """
    return Flags(sos=bool(byte & FLAG_SOS), fall=bool(byte & FLAG_FALL), worn=bool(byte & FLAG_WORN),
                  charging=bool(byte & FLAG_CHARGING))


# --- ble-json -----------------------------------------------------------------------------------------

_EVENTS: Final[Mapping[str, tuple[bool, bool]]] = {"none": (False, False), "sos": (True, False),
                                                  "fall": (False, True)}


def decode_ble_json(topic: str, payload: bytes, now: float) -> list[Decoded]:
    """A BLE gateway that publishes one JSON object per wristband, and its own state.

    Topics::

        iot/{gateway}/{device}/data     {device} is the band's MAC (any case, ':' or '-' optional)
        iot/{gateway}/status            the gateway's state; configure its MQTT Last Will here, retained,
                                        with payload {"state": "offline"}

    Data payload (UTF-8 JSON object; keys not listed are ignored, a listed key absent or null means
    "not reported")::

        {
          "hr":       int 20..250      heart rate, bpm
          "spo2":     int 50..100      blood oxygen saturation, %
          "bat":      int 0..100       battery, %
          "event":    "none" | "sos" | "fall"    which event this message reports
          "worn":     bool             on the wrist
          "charging": bool
          "rssi":     number -150..20  dBm as the gateway heard the band (rounded)
          "seq":      int 0..2**32-1   the band's counter, bumped whenever the content changes
        }

        e.g. {"hr": 72, "spo2": 97, "bat": 81, "event": "sos", "worn": true, "rssi": -67, "seq": 1234}

    ``event`` sets both ``sos`` and ``fall`` (``"sos"`` -> sos True, fall False). Whole numbers may be
    written as floats (``72.0``); booleans are not numbers. ``dedup_key`` is ``{device}:{seq}`` when
    ``seq`` is present.

    Status payload: ``{"state": "online" | "offline"}`` (other keys ignored), or the bare word ``online``
    / ``offline`` (as text or a JSON string), which is how many gateways set their Will. An empty payload
    (a retained status being cleared) gives no items.
    """
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == "iot" and parts[2] == "status":
        return _ble_status(_gateway_id(parts[1]), payload, now)
    if len(parts) != 4 or parts[0] != "iot" or parts[3] != "data":
        raise DecodeError("bad_topic", f"expected iot/{{gateway}}/{{device}}/data or iot/{{gateway}}/status: "
                                       f"{_excerpt(topic)}")
    gateway = _gateway_id(parts[1])
    device = normalize_mac(parts[2])
    obj = _object(_loads(payload), "a wristband message")
    event = obj.get("event")
    sos = fall = None
    if event is not None:
        if not isinstance(event, str):
            raise DecodeError("bad_type", f"event must be a string, not {_excerpt(event)}")
        if event not in _EVENTS:
            raise DecodeError("unknown_type", f"event {_excerpt(event)} (known: {', '.join(_EVENTS)})")
        sos, fall = _EVENTS[event]
    seq = _int(obj, "seq", (0, SEQUENCE_MAX))
    return [Reading(
        device=device, via=gateway, received_at=now,
        heart_rate_bpm=_int(obj, "hr", HEART_RATE_RANGE),
        spo2_pct=_int(obj, "spo2", SPO2_RANGE),
        battery_pct=_int(obj, "bat", BATTERY_RANGE),
        worn=_bool(obj, "worn"), charging=_bool(obj, "charging"), sos=sos, fall=fall,
        rssi_dbm=_rssi(obj, "rssi"), gateway_zone=gateway,
        sequence=seq, dedup_key=None if seq is None else f"{device}:{seq}",
    )]


def _ble_status(gateway: str, payload: bytes, now: float) -> list[Decoded]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise DecodeError("too_large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    word = payload.strip().lower()
    if not word:
        return []
    if word in (b"online", b"offline"):
        return [GatewayStatus(gateway=gateway, online=word == b"online", received_at=now)]
    doc = _loads(payload)
    state = doc if isinstance(doc, str) else _object(doc, "a gateway status").get("state")
    if state is None:
        raise DecodeError("missing_field", "state")
    if not isinstance(state, str):
        raise DecodeError("bad_type", f"state must be a string, not {_excerpt(state)}")
    if state.lower() not in ("online", "offline"):
        raise DecodeError("unknown_type", f"gateway state {_excerpt(state)}")
    return [GatewayStatus(gateway=gateway, online=state.lower() == "online", received_at=now)]


# --- ble-adv-hex --------------------------------------------------------------------------------------

def parse_ad_structures(adv: bytes) -> list[tuple[int, bytes]]:
    """Split BLE advertising data into ``(AD type, data)`` pairs, in order.

    Each AD structure is ``[length][type][data: length-1 bytes]``, where ``length`` counts the type byte
    and the data. A length of 0 ends the significant part (the rest is padding, ignored). A structure
    that runs past the end raises ``short_frame``::

        02 01 06 | 03 03 AA FE | 0B FF ...10 bytes... | 00 00
        flags      16-bit UUIDs  manufacturer data      padding
    """
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(adv):
        length = adv[i]
        if length == 0:
            break
        if i + 1 + length > len(adv):
            raise DecodeError("short_frame", f"AD structure at byte {i} needs {length} bytes, "
                                             f"{len(adv) - i - 1} left")
        out.append((adv[i + 1], adv[i + 2:i + 1 + length]))
        i += 1 + length
    return out


@dataclass(frozen=True, slots=True)
class AdvFrame:
    """The wristband's manufacturer-data frame, decoded (see :func:`decode_adv_frame`)."""

    flags: Flags
    heart_rate_bpm: int | None
    spo2_pct: int | None
    battery_pct: int | None
    sequence: int


def adv_checksum(frame: bytes) -> int:
    """Sum of every byte before the checksum (company id included), modulo 256."""
    return sum(frame[:ADV_FRAME_LEN - 1]) & 0xFF


def decode_adv_frame(data: bytes) -> AdvFrame:
    """Decode the manufacturer-specific data (AD type 0xFF) of a wristband advertisement, version 1::

        byte   0    1    2     3      4     5     6      7    8     9
             +----+----+-----+------+-----+-----+------+----+----+------+
             | company | ver |flags | hr  |spo2 | batt |   seq   | csum |
             | id (LE) |0x01 |      | bpm |  %  |  %   | u16 LE  |      |
             +----+----+-----+------+-----+-----+------+----+----+------+
              FF   FF

        company  u16 little-endian, WRISTBAND_COMPANY_ID (0xFFFF)
        ver      0x01; any other version is ``unknown_type`` (its length and checksum may differ)
        flags    bit 0 sos, bit 1 fall, bit 2 worn, bit 3 charging, bits 4..7 reserved (0, ignored)
        hr       0 = not measured, else 20..250
        spo2     0 = not measured, else 50..100
        batt     0xFF = unknown, else 0..100
        seq      bumped whenever the content changes; the band repeats one frame many times
        csum     (sum of bytes 0..8) & 0xFF

    In the advertisement this is one AD structure: ``0B FF`` followed by the 10 bytes above.
    Checks, in order: at least 3 bytes (else ``short_frame``), version, exactly 10 bytes
    (``short_frame`` / ``bad_length``), checksum, ranges.
    """
    if len(data) < 3:
        raise DecodeError("short_frame", f"manufacturer data of {len(data)} bytes")
    if data[2] != ADV_FRAME_VERSION:
        raise DecodeError("unknown_type", f"frame version {data[2]}")
    if len(data) < ADV_FRAME_LEN:
        raise DecodeError("short_frame", f"{len(data)} bytes, version 1 has {ADV_FRAME_LEN}")
    if len(data) > ADV_FRAME_LEN:
        raise DecodeError("bad_length", f"{len(data)} bytes, version 1 has {ADV_FRAME_LEN}")
    if adv_checksum(data) != data[9]:
        raise DecodeError("bad_checksum", f"checksum {data[9]:#04x}, computed {adv_checksum(data):#04x}")
    return AdvFrame(
        flags=_flags(data[3]),
        heart_rate_bpm=_measured("hr", data[4], HEART_RATE_RANGE, 0),
        spo2_pct=_measured("spo2", data[5], SPO2_RANGE, 0),
        battery_pct=_measured("battery", data[6], BATTERY_RANGE, 0xFF),
        sequence=int.from_bytes(data[7:9], "little"),
    )


def _find_wristband_data(adv: bytes) -> bytes | None:
    """The first manufacturer data carrying our company id; None for anyone else's advertisement."""
    for ad_type, data in parse_ad_structures(adv):
        if (ad_type == AD_TYPE_MANUFACTURER and len(data) >= 2
                and int.from_bytes(data[:2], "little") == WRISTBAND_COMPANY_ID):
            return data
    return None


def _adv_entry(gateway: str, entry: object, now: float) -> Reading | None:
    obj = _object(entry, "an advertisement entry")
    if obj.get("mac") is None:
        raise DecodeError("missing_field", "mac")
    device = normalize_mac(obj["mac"])
    text = obj.get("adv")
    if text is None:
        raise DecodeError("missing_field", "adv")
    if not isinstance(text, str):
        raise DecodeError("bad_type", f"adv must be a hex string, not {type(text).__name__}")
    if len(text) > 2 * MAX_ADV_BYTES:
        raise DecodeError("too_large", f"advertisement of {len(text) // 2} bytes > {MAX_ADV_BYTES}")
    if not _HEX_RE.fullmatch(text):
        raise DecodeError("bad_hex", f"adv {_excerpt(text)}")
    rssi = _rssi(obj, "rssi")
    data = _find_wristband_data(bytes.fromhex(text))
    if data is None:
        return None
    frame = decode_adv_frame(data)
    return Reading(
        device=device, via=gateway, received_at=now,
        heart_rate_bpm=frame.heart_rate_bpm, spo2_pct=frame.spo2_pct, battery_pct=frame.battery_pct,
        worn=frame.flags.worn, charging=frame.flags.charging, sos=frame.flags.sos, fall=frame.flags.fall,
        rssi_dbm=rssi, gateway_zone=gateway,
        sequence=frame.sequence, dedup_key=f"{device}:{frame.sequence}",
    )


def decode_ble_adv_hex(topic: str, payload: bytes, now: float) -> list[Decoded]:
    """A BLE gateway that forwards raw advertisements as hex, one at a time or in batches.

    Topic ``ble/{gateway}/adv``. The gateway id comes from the topic, which the broker's ACL can bind to
    the gateway's login; a ``"gw"`` key in the payload is ignored.

    Payload: one entry, or a JSON array of up to 256 entries (keys not listed are ignored)::

        {"mac": "AABBCCDDEEFF", "rssi": -70, "adv": "0201060BFFFFFF01..."}
        [{"mac": ..., "adv": ...}, {"mac": ..., "adv": ...}, ...]

        mac   required  the advertiser's address, any case, ':' or '-' optional
        adv   required  the AdvData as hex (even count of hex digits, at most 255 bytes)
        rssi  optional  dBm, -150..20

    ``adv`` is parsed as AD structures (:func:`parse_ad_structures`); unknown AD types are skipped, and
    the first manufacturer-specific structure (type 0xFF) with company id :data:`WRISTBAND_COMPANY_ID`
    is the wristband frame (:func:`decode_adv_frame`, byte layout there). An advertisement without one
    is some other device the gateway heard and gives no item. ``dedup_key`` is ``{mac}:{seq}``.

    A single entry that fails raises :class:`DecodeError`; in an array, a failing entry becomes a
    :class:`Rejected` at its index and the others decode.
    """
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "ble" or parts[2] != "adv":
        raise DecodeError("bad_topic", f"expected ble/{{gateway}}/adv: {_excerpt(topic)}")
    gateway = _gateway_id(parts[1])
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise DecodeError("too_large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    entries: list[object | DecodeError]
    try:
        doc = _parse(payload)
    except DecodeError as exc:
        if exc.code != "too_deep" or not payload.lstrip().startswith(b"["):
            raise
        # One entry too deep for the parser must not hide the SOS next to it: parse entry by entry.
        texts = _split_array(payload)
        if len(texts) > MAX_BATCH:
            raise DecodeError("too_large", f"batch of {len(texts)} entries > {MAX_BATCH}") from exc
        entries = []
        for text in texts:
            try:
                entries.append(_parse(text))
            except DecodeError as entry_exc:
                entries.append(entry_exc)
    else:
        if not isinstance(doc, list):
            if _depth_exceeds(doc, MAX_DEPTH):
                raise DecodeError("too_deep", f"nested deeper than {MAX_DEPTH} levels")
            reading = _adv_entry(gateway, doc, now)
            return [] if reading is None else [reading]
        if len(doc) > MAX_BATCH:
            raise DecodeError("too_large", f"batch of {len(doc)} entries > {MAX_BATCH}")
        entries = list(doc)
    out: list[Decoded] = []
    for index, entry in enumerate(entries):
        try:
            reading = _batch_entry(gateway, entry, now)
        except DecodeError as exc:
            out.append(Rejected(exc.code, exc.detail, index,
                                None if isinstance(entry, DecodeError) else _entry_device(entry)))
            continue
        if reading is not None:
            out.append(reading)
    return out


def _batch_entry(gateway: str, entry: object, now: float) -> Reading | None:
    if isinstance(entry, DecodeError):  # the entry's own text failed to parse
        raise entry
    if _depth_exceeds(entry, MAX_DEPTH - 1):  # the batch array is the first level
        raise DecodeError("too_deep", f"nested deeper than {MAX_DEPTH} levels")
    return _adv_entry(gateway, entry, now)


def _entry_device(entry: object) -> str | None:
    if not isinstance(entry, dict):
        return None
    try:
        return normalize_mac(entry.get("mac"))
    except DecodeError:
        return None


# --- chirpstack-v4 ------------------------------------------------------------------------------------

# ChirpStack events that are valid but carry nothing a wristband rule reads.
_CHIRPSTACK_IGNORED: Final = frozenset({"join", "ack", "txack", "log", "location", "integration"})


@dataclass(frozen=True, slots=True)
class _Radio:
    rssi_dbm: int | None
    snr_db: float | None
    gateway: str | None


def _best_radio(rx_info: object) -> _Radio:
    """The gateway that heard the uplink loudest (highest RSSI; the first on a tie). Gateways without an
    RSSI only count when none has one."""
    if rx_info is None:
        return _Radio(None, None, None)
    if not isinstance(rx_info, list):
        raise DecodeError("bad_type", "rxInfo must be a list")
    best: _Radio | None = None
    for item in rx_info:
        rx = _object(item, "an rxInfo entry")
        gateway = None if rx.get("gatewayId") is None else _gateway_id(rx["gatewayId"])
        snr = rx.get("snr")
        if snr is not None:
            if isinstance(snr, bool) or not isinstance(snr, int | float) or not math.isfinite(snr):
                raise DecodeError("bad_type", f"snr must be a number, not {_excerpt(snr)}")
            if not SNR_RANGE[0] <= snr <= SNR_RANGE[1]:
                raise DecodeError("out_of_range", f"snr={snr}")
        radio = _Radio(_rssi(rx, "rssi"), None if snr is None else float(snr), gateway)
        if best is None or (radio.rssi_dbm is not None
                            and (best.rssi_dbm is None or radio.rssi_dbm > best.rssi_dbm)):
            best = radio
    return best or _Radio(None, None, None)


def _device_eui(doc: Mapping[str, object], topic_eui: str) -> str:
    info = doc.get("deviceInfo")
    if info is None:
        raise DecodeError("missing_field", "deviceInfo")
    eui_raw = _object(info, "deviceInfo").get("devEui")
    if eui_raw is None:
        raise DecodeError("missing_field", "deviceInfo.devEui")
    eui = normalize_eui(eui_raw)
    if eui != topic_eui:
        raise DecodeError("bad_id", f"devEui {eui} in the payload, {topic_eui} in the topic")
    return eui


def _lorawan_data(doc: Mapping[str, object]) -> bytes:
    data = doc.get("data")
    if data is None:
        return b""
    if not isinstance(data, str):
        raise DecodeError("bad_type", f"data must be a base64 string, not {type(data).__name__}")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII text
        raise DecodeError("bad_base64", f"data {_excerpt(data)}") from exc


def decode_chirpstack_v4(topic: str, payload: bytes, now: float) -> list[Decoded]:
    """LoRaWAN wristbands through ChirpStack v4's MQTT integration (JSON marshaler).

    Topic ``application/{applicationId}/device/{devEui}/event/{event}``; ``up`` and ``status`` decode,
    ``join``, ``ack``, ``txack``, ``log``, ``location`` and ``integration`` give no items.

    ``event/up`` (only these keys are read; ChirpStack's JSON omits zero values, so an absent ``fCnt``
    or ``fPort`` is 0)::

        {
          "deviceInfo": {"devEui": "0102030405060708", ...},   must match the topic's devEui
          "fCnt": 42, "fPort": 10,
          "data": "<base64 FRMPayload>",
          "rxInfo": [{"gatewayId": "00800000a0001234", "rssi": -97, "snr": 7.2}, ...]
        }

    FRMPayload by fPort (no checksum: the LoRaWAN MIC already guards integrity; flags as in
    :func:`_flags`, sentinels as in the module docstring)::

        fPort 10, status, 4 bytes:      fPort 11, alarm, 2 bytes (sent confirmed):
          0  flags                        0  flags     sos and/or fall must be set
          1  hr    bpm, 0 = n/a           1  hr        bpm, 0 = n/a
          2  spo2  %,   0 = n/a
          3  batt  %,   0xFF = unknown

        fPort 0 (MAC commands only) or no data: a sign of life, a reading with no measurement.

    A shorter payload is ``short_frame``, a longer one ``bad_length``, another fPort ``unknown_type``.
    ``rssi_dbm``, ``snr_db`` and ``gateway_zone`` come from the loudest gateway in ``rxInfo``;
    ``sequence`` is fCnt and ``dedup_key`` ``{devEui}:{fCnt}``, the same whichever gateway forwarded it.

    ``event/status`` (the DevStatusAns MAC answer) gives a reading with ``battery_pct`` (batteryLevel,
    rounded) unless ``batteryLevelUnavailable`` or ``externalPowerSource`` is true; no dedup key.
    """
    parts = topic.split("/")
    if len(parts) != 6 or parts[0] != "application" or parts[2] != "device" or parts[4] != "event" \
            or not parts[1]:
        raise DecodeError("bad_topic", f"expected application/{{app}}/device/{{devEui}}/event/{{event}}: "
                                       f"{_excerpt(topic)}")
    topic_eui = normalize_eui(parts[3])
    event = parts[5]
    if event in _CHIRPSTACK_IGNORED:
        return []
    if event not in ("up", "status"):
        raise DecodeError("bad_topic", f"unknown ChirpStack event {_excerpt(event)}")
    doc = _object(_loads(payload), "a ChirpStack event")
    eui = _device_eui(doc, topic_eui)
    if event == "status":
        return [_chirpstack_status(eui, doc, now)]
    f_cnt = _int(doc, "fCnt", (0, SEQUENCE_MAX)) or 0
    f_port = _int(doc, "fPort", (0, 255)) or 0
    data = _lorawan_data(doc)
    radio = _best_radio(doc.get("rxInfo"))
    base = Reading(device=eui, via=LORAWAN_VIA, received_at=now, rssi_dbm=radio.rssi_dbm, snr_db=radio.snr_db,
                   gateway_zone=radio.gateway, sequence=f_cnt, dedup_key=f"{eui}:{f_cnt}")
    if f_port == 0 or not data:
        return [base]
    if f_port == FPORT_STATUS:
        _check_length(data, 4)
        flags = _flags(data[0])
        return [_with(base, flags, hr=data[1],
                      spo2_pct=_measured("spo2", data[2], SPO2_RANGE, 0),
                      battery_pct=_measured("battery", data[3], BATTERY_RANGE, 0xFF))]
    if f_port == FPORT_ALARM:
        _check_length(data, 2)
        flags = _flags(data[0])
        if not (flags.sos or flags.fall):
            raise DecodeError("out_of_range", "an alarm frame with neither sos nor fall set")
        return [_with(base, flags, hr=data[1], spo2_pct=None, battery_pct=None)]
    raise DecodeError("unknown_type", f"fPort {f_port}")


def _check_length(data: bytes, length: int) -> None:
    if len(data) < length:
        raise DecodeError("short_frame", f"{len(data)} bytes, the frame has {length}")
    if len(data) > length:
        raise DecodeError("bad_length", f"{len(data)} bytes, the frame has {length}")


def _with(base: Reading, flags: Flags, *, hr: int, spo2_pct: int | None, battery_pct: int | None) -> Reading:
    return Reading(
        device=base.device, via=base.via, received_at=base.received_at,
        heart_rate_bpm=_measured("hr", hr, HEART_RATE_RANGE, 0), spo2_pct=spo2_pct, battery_pct=battery_pct,
        worn=flags.worn, charging=flags.charging, sos=flags.sos, fall=flags.fall,
        rssi_dbm=base.rssi_dbm, snr_db=base.snr_db, gateway_zone=base.gateway_zone,
        sequence=base.sequence, dedup_key=base.dedup_key,
    )


def _chirpstack_status(eui: str, doc: Mapping[str, object], now: float) -> Reading:
    unavailable = _bool(doc, "batteryLevelUnavailable") or _bool(doc, "externalPowerSource")
    level = doc.get("batteryLevel")
    battery: int | None = None
    if level is not None and not unavailable:
        if isinstance(level, bool) or not isinstance(level, int | float) or not math.isfinite(level):
            raise DecodeError("bad_type", f"batteryLevel must be a number, not {_excerpt(level)}")
        if not BATTERY_RANGE[0] <= level <= BATTERY_RANGE[1]:
            raise DecodeError("out_of_range", f"batteryLevel={level}")
        battery = round(level)
    return Reading(device=eui, via=LORAWAN_VIA, received_at=now, battery_pct=battery)


# --- registry -----------------------------------------------------------------------------------------

DECODERS: Final[dict[str, Decoder]] = {
    "ble-json": decode_ble_json,
    "ble-adv-hex": decode_ble_adv_hex,
    "chirpstack-v4": decode_chirpstack_v4,
}

#: MQTT subscriptions that deliver each decoder's topics (a site may narrow the wildcards).
SUBSCRIPTIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "ble-json": ("iot/+/+/data", "iot/+/status"),
    "ble-adv-hex": ("ble/+/adv",),
    "chirpstack-v4": ("application/+/device/+/event/up", "application/+/device/+/event/status"),
}


# --- dedup --------------------------------------------------------------------------------------------

class Deduplicator:
    """Drops a reading whose ``dedup_key`` was already seen recently: one LoRaWAN uplink forwarded by
    several gateways, one BLE frame re-advertised and heard by several gateways.

    State is a bounded map ``device -> ring of (key, first seen)``, deterministic given ``now`` (pass a
    monotonic time; no clock is read here).

    * A key is remembered for ``ttl_s`` from its first sighting; a repeat does not extend it, so a
      counter that wraps (a u16 sequence) is accepted again once the TTL has passed.
    * Bound: at most ``keys_per_device`` keys per device and ``max_devices`` devices, so at most
      ``keys_per_device * max_devices`` keys in all, whatever arrives.
    * Overflow: the oldest key of that device is forgotten (a device flooding distinct keys only pushes
      out its own history), and past ``max_devices`` the device idle longest is forgotten. Forgetting
      can only let a duplicate through, never drop a new reading: alarms downstream fold repeats.
    * Counters: ``duplicates`` (readings dropped), ``evicted`` (keys forgotten before their TTL).
    """

    def __init__(self, ttl_s: float = 120.0, keys_per_device: int = 64, max_devices: int = 4096) -> None:
        if not (ttl_s > 0 and keys_per_device > 0 and max_devices > 0):
            raise ValueError("ttl_s, keys_per_device and max_devices must be positive")
        self.ttl_s = ttl_s
        self.keys_per_device = keys_per_device
        self.max_devices = max_devices
        self.duplicates = 0
        self.evicted = 0
        self._devices: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()

    def __len__(self) -> int:
        """Keys held now (expired ones are purged lazily, per device, when that device is next seen)."""
        return sum(len(ring) for ring in self._devices.values())

    def admit(self, device: str, key: str, now: float) -> bool:
        """True if ``key`` is new for ``device`` (and remember it); False for a repeat within the TTL."""
        ring = self._devices.get(device)
        if ring is None:
            ring = self._devices[device] = OrderedDict()
            if len(self._devices) > self.max_devices:
                _, dropped = self._devices.popitem(last=False)
                self.evicted += len(dropped)
        else:
            self._devices.move_to_end(device)
            # Insertion order is first-seen order, so expired keys are all at the front.
            while ring and now - next(iter(ring.values())) >= self.ttl_s:
                ring.popitem(last=False)
        if key in ring:
            self.duplicates += 1
            return False
        ring[key] = now
        if len(ring) > self.keys_per_device:
            ring.popitem(last=False)
            self.evicted += 1
        return True

    def admit_reading(self, reading: Reading) -> bool:
        """:meth:`admit` for a reading, at its ``received_at``; a reading without a key always passes."""
        if reading.dedup_key is None:
            return True
        return self.admit(reading.device, reading.dedup_key, reading.received_at)
