"""Config of the wristband capability: the ``wristbands`` section (local broker, inputs, residents)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from edgeagent.kernel.config.base import SecretField, Strict
from edgeagent.kernel.config.schema import ID_PATTERN, PERSONAL, BrokerClientConfig


class ResidentConfig(Strict):
    """A resident who wears a wristband. Names and rooms stay on the box (events carry the id)."""

    id: str = Field(pattern=ID_PATTERN, description="the resident's id, as the platform knows them")
    name: str | None = Field(default=None, max_length=64, description="local only, unless alarms.include_names",
                             json_schema_extra={PERSONAL: True})
    room: str | None = Field(default=None, max_length=64, description="local only", json_schema_extra={PERSONAL: True})
    devices: list[Annotated[str, Field(pattern=r"^[0-9a-f]{8,32}$")]] = Field(
        min_length=1, description="wristband ids: BLE MAC or LoRaWAN devEui, lower-case hex without separators")
    heart_rate_low: int = Field(default=45, ge=20, le=120)
    heart_rate_high: int = Field(default=130, ge=60, le=250)
    spo2_low: int = Field(default=90, ge=50, le=99)
    low_battery_pct: int = Field(default=15, ge=0, le=100)

    @model_validator(mode="after")
    def _range(self) -> ResidentConfig:
        if self.heart_rate_low >= self.heart_rate_high:
            raise ValueError("heart_rate_low must be below heart_rate_high")
        return self


#: A BLE gateway id as it appears in its topics (and is its broker account): one topic level, no wildcards.
GATEWAY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"


class WristbandInputConfig(Strict):
    decoder: Literal["ble-json", "ble-adv-hex", "chirpstack-v4"] = Field(description="the gateway's format")
    topics: list[str] | None = Field(default=None, description="topic filters; the decoder's usual ones if unset")
    gateways: list[Annotated[str, Field(pattern=GATEWAY_ID_PATTERN)]] | None = Field(
        default=None, min_length=1,
        description="BLE gateway ids (their broker usernames): each gets its own connection subscribing only "
        "its own topics, so a flooding gateway cannot delay the others; unset: one wildcard subscription")

    @model_validator(mode="after")
    def _gateways(self) -> WristbandInputConfig:
        if self.gateways is not None:
            if self.decoder == "chirpstack-v4":
                raise ValueError("gateways: a ChirpStack server is one source; list gateways only for BLE decoders")
            if self.topics is not None:
                raise ValueError("give either topics or gateways, not both (gateways derive their own topics)")
            if len(set(self.gateways)) != len(self.gateways):
                raise ValueError("gateways: an id is listed twice")
        return self


class WristbandTlsConfig(Strict):
    """TLS to the local broker (``mqtts://``): the CA that signed its LAN certificate."""

    ca_file: Path | None = Field(default=None, description="CA certificate (PEM); the system's CAs if unset")
    cert_file: Path | None = Field(default=None, description="client certificate, for a broker that wants one")
    key_file: Path | None = None


class WristbandsConfig(BrokerClientConfig):
    """Wristband readings from BLE gateways or LoRaWAN, through the box's own MQTT broker."""

    enabled: bool = True
    broker: str = Field(default="mqtt://127.0.0.1:1883", description="the local broker the BLE/LoRa gateways use")
    username: str | None = None
    password: SecretField | None = None
    inputs: list[WristbandInputConfig] = Field(min_length=1)
    residents: list[ResidentConfig] = Field(default_factory=list)
    zones: dict[str, Literal["inside", "outside"]] = Field(
        default_factory=dict,
        description="BLE gateway id -> where it is; a band heard 'outside' has left the compound")
    no_signal_after_s: float = Field(default=900, gt=0, le=86_400)
    guard_topic: str = Field(default="edgeagent/local/alarms", description="alarm states for guard-room panels")
    ack_topic: str = Field(default="edgeagent/local/alarms/ack",
                           description='a guard-room panel publishes {"alarm_id": ..., "by": ...} to '
                           "<ack_topic>/<its broker username>; the broker's ACL lets it write only that")
    tls: WristbandTlsConfig | None = Field(default=None, description="for mqtts:// (port 8883 by default)")


    def cross_checks(self) -> list[tuple[tuple[int | str, ...], str]]:
        issues: list[tuple[tuple[int | str, ...], str]] = []
        owner: dict[str, str] = {}
        ids: set[str] = set()
        for i, r in enumerate(self.residents):
            if r.id in ids:
                issues.append((("wristbands", "residents", i, "id"), f"resident {r.id!r} is listed twice"))
            ids.add(r.id)
            for j, dev in enumerate(r.devices):
                if dev in owner:
                    issues.append((("wristbands", "residents", i, "devices", j),
                                   f"wristband {dev} is already worn by {owner[dev]!r}"))
                owner.setdefault(dev, r.id)
        return issues
