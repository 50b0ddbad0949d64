"""Elderly residents' wristbands (SOS button, fall detection, heart rate, SpO2) over BLE gateways or LoRaWAN.

``decoders`` turns one MQTT message from the box's local broker into typed readings; it is pure (no I/O,
no clock) and imports no MQTT library.
"""

from edgeagent.drivers.wristband.decoders import (
    DECODE_ERROR_CODES,
    DECODERS,
    SUBSCRIPTIONS,
    Decoded,
    DecodeError,
    DecodeErrorCode,
    Decoder,
    Deduplicator,
    GatewayStatus,
    Reading,
    Rejected,
    normalize_eui,
    normalize_mac,
)

__all__ = [
    "DECODERS",
    "DECODE_ERROR_CODES",
    "SUBSCRIPTIONS",
    "DecodeError",
    "DecodeErrorCode",
    "Decoded",
    "Decoder",
    "Deduplicator",
    "GatewayStatus",
    "Reading",
    "Rejected",
    "normalize_eui",
    "normalize_mac",
]
