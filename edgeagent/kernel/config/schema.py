"""The one configuration file: YAML, validated strictly, versioned, secrets only by reference.

Errors name the file, the line, the key and the problem in plain words, e.g.::

    /etc/edgeagent/edgeagent.yaml:14:3: uplink.keepalive_s: must be at least 5 (got 0)

Secrets never sit in the file: a secret field takes ``{credential: NAME}`` (a systemd credential,
read from ``$CREDENTIALS_DIRECTORY``), ``{file: PATH}`` or ``{env: NAME}``.
"""

from __future__ import annotations

import difflib
import io
import re
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from edgeagent.kernel.alarms.notify_config import NotifiersSection
from edgeagent.kernel.config.base import (
    SecretField,
    SecretRef,
    Strict,
    _no_clear_secret,
)
from edgeagent.kernel.errors import ConfigError

CONFIG_VERSION = 1
__all__ = ["CONFIG_VERSION", "Config", "ConfigError", "SecretRef", "load_config", "parse_yaml", "redacted",
           "validate_doc"]
_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


# --- sections -----------------------------------------------------------------------------------

class ClockConfig(Strict):
    sync: Literal["auto", "synced", "unsynced"] = Field(
        default="auto",
        description="'auto' asks the kernel whether NTP has synchronised the clock; events before that "
        "are marked and corrected later. 'synced' trusts the clock (boxes with an RTC).")


class OutboxSection(Strict):
    cap_mb: float = Field(default=256, gt=0, le=1_000_000,
                          description="backlog cap; beyond it telemetry, then events, are evicted (never alarms)")
    history_mb: float = Field(default=16, ge=0, description="sent events kept for 'events list'")
    min_free_mb: float = Field(default=64, ge=0, description="disk space kept free for the system")
    durability: Literal["full", "normal"] = Field(
        default="full", description="'full' survives power loss (one fsync per group commit); "
        "'normal' survives a crash of the daemon only")


class RetryConfig(Strict):
    first_max_s: float = Field(default=1.0, gt=0, le=60, description="random delay before the first retry")
    short_cap_s: float = Field(default=4.0, gt=0, le=600,
                               description="backoff cap during the first minute of an outage")
    long_cap_s: float = Field(default=60.0, gt=0, le=3600, description="backoff cap after that")
    short_window_s: float = Field(default=60.0, ge=0, le=3600)


class TLSConfig(Strict):
    ca_file: Path | None = Field(default=None, description="CA bundle for the broker; system CAs if unset")
    cert_file: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    key: SecretField | None = Field(default=None, description="client private key, by reference")

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert_file is None) != (self.key is None):
            raise ValueError("mutual TLS needs both 'cert_file' and 'key'")
        return self

    @field_validator("key", mode="before")
    @classmethod
    def _key_ref(cls, v: Any) -> Any:
        return _no_clear_secret(v)


class UplinkConfig(Strict):
    enabled: bool = True
    broker: str = Field(description="mqtt://HOST:PORT or mqtts://HOST:PORT (TLS)")
    client_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    topic_prefix: str = Field(default="edgeagent/v1", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto", description="'auto' tries MQTT 5 and falls back to 3.1.1 if the broker refuses it")
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    connect_timeout_s: float = Field(default=10, gt=0, le=120)
    username: str | None = None
    password: SecretField | None = None
    tls: TLSConfig | None = None
    # 1000 events (~300 KB) per message: at 500 the uplink fell behind a 28k events/s intake on a busy
    # 2-core box (bench/RESULTS.md). Lower batch_max_bytes for brokers with a small packet limit.
    batch_max_events: int = Field(default=1000, ge=1, le=10_000)
    batch_max_bytes: int = Field(default=512 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_inflight_batches: int = Field(default=8, ge=1, le=1000)
    flush_on_stop_s: float = Field(default=10, ge=0, le=300)
    retry: RetryConfig = RetryConfig()

    @field_validator("password", mode="before")
    @classmethod
    def _password_ref(cls, v: Any) -> Any:
        return _no_clear_secret(v)

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        return check_broker_url(v)

    @property
    def host(self) -> str:
        host = urlsplit(self.broker).hostname
        assert host is not None
        return host

    @property
    def port(self) -> int:
        parts = urlsplit(self.broker)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def uses_tls(self) -> bool:
        return urlsplit(self.broker).scheme == "mqtts" or self.tls is not None


def check_broker_url(v: str) -> str:
    """An MQTT broker URL without credentials in it (shared by the uplink and the local broker)."""
    parts = urlsplit(v)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"{v!r} is not a broker URL (expected mqtt://HOST:PORT or mqtts://HOST:PORT)")
    if parts.username or parts.password:
        raise ValueError("put no credentials in the broker URL; use 'username' and 'password'")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"{v!r} has an invalid port") from exc
    return v


class CommandsConfig(Strict):
    enabled: bool = True
    public_keys: dict[str, Path] = Field(
        default_factory=dict,
        description="the platform's Ed25519 public keys (PEM or raw base64 files) by key id; "
        "no keys means every command is rejected")
    max_ttl_s: int = Field(default=600, ge=1, le=86_400)
    clock_skew_s: int = Field(default=30, ge=0, le=3600)
    max_concurrent: int = Field(default=4, ge=1, le=64)


class HealthConfig(Strict):
    enabled: bool = True
    host: str = Field(default="127.0.0.1", description="keep on loopback unless a firewall guards it")
    port: int = Field(default=9108, ge=0, le=65535)


class SupervisorConfig(Strict):
    restart_intensity: int = Field(default=5, ge=1, le=1000, description="restarts allowed per window")
    restart_window_s: float = Field(default=60, gt=0)
    backoff_cap_s: float = Field(default=30, gt=0)
    shutdown_timeout_s: float = Field(default=20, gt=0, le=600)


# --- Modbus buses ------------------------------------------------------------------------------------

_RTU_GAP_CHARS = 3.5
_RTU_FAST_GAP_S = 0.00175  # fixed gap above 19200 baud (Modbus over serial line V1.02, 2.5.1.1)
_RTU_FAST_BAUD = 19200
_MAX_ADU_CHARS = 256


class ModbusBusConfig(Strict):
    """One bus. ``kind`` picks the transport; the serial fields also describe the RS-485 side of an
    RTU-over-TCP converter (they set the inter-frame gap there)."""

    kind: Literal["tcp", "rtu", "rtu_over_tcp"] = Field(
        description="tcp: Modbus TCP; rtu: a serial line; rtu_over_tcp: RTU frames through a TCP converter/DTU")
    name: str | None = Field(default=None, max_length=64, description="for logs; derived from the address if unset")
    host: str | None = Field(default=None, description="tcp and rtu_over_tcp: server or converter address")
    port: int = Field(default=502, ge=1, le=65535, description="tcp and rtu_over_tcp: TCP port")
    serial_port: str | None = Field(default=None, description="rtu: serial device, e.g. /dev/ttyUSB0")
    baudrate: int = Field(default=9600, ge=300, le=4_000_000)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    timeout_s: float | None = Field(
        default=None, gt=0, le=30,
        description="wait for an answer; default 1 s on TCP, else 0.5 s or more at low baud rates (+0.5 s via TCP)")
    connect_timeout_s: float = Field(default=3.0, gt=0, le=60)
    retries: int = Field(default=1, ge=0, le=5,
                         description="tries after a timeout (polls and commands to healthy units)")
    inter_frame_gap_s: float | None = Field(
        default=None, ge=0, le=1,
        description="silence between frames; default 3.5 characters (1.75 ms above 19200 baud)")
    max_pending_polls: int = Field(default=64, ge=1, le=100_000, description="polls waiting beyond this are refused")
    offline_after_failures: int = Field(default=2, ge=1, le=100, description="failed requests in a row before offline")
    backoff_base_s: float = Field(default=1.0, gt=0, le=60)
    backoff_cap_s: float = Field(default=30.0, gt=0, le=3600)
    reconnect_base_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_cap_s: float = Field(default=10.0, gt=0, le=3600)
    drop_after_silent: int = Field(
        default=5, ge=1, le=1000, description="TCP: reconnect after this many unanswered frames in a row")
    broadcast_turnaround_s: float = Field(default=0.1, ge=0, le=5, description="RTU: quiet time after a broadcast")

    @model_validator(mode="after")
    def _address_fits_kind(self) -> ModbusBusConfig:
        if self.kind == "rtu":
            if not self.serial_port:
                raise ValueError("an rtu bus needs 'serial_port' (e.g. /dev/ttyUSB0)")
            if self.host is not None:
                raise ValueError("'host' is for tcp and rtu_over_tcp buses; an rtu bus has 'serial_port'")
        else:
            if not self.host:
                raise ValueError(f"a {self.kind} bus needs 'host'")
            if self.serial_port is not None:
                raise ValueError(f"'serial_port' is for rtu buses, not {self.kind}")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "rtu":
            return f"rtu {self.serial_port}"
        return f"{self.kind.replace('_', '-')} {self.host}:{self.port}"

    @property
    def rtu_framing(self) -> bool:
        return self.kind != "tcp"

    @property
    def char_time_s(self) -> float:
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return bits / self.baudrate

    @property
    def frame_gap_s(self) -> float:
        """Silence kept between the end of one exchange and the next frame."""
        if self.inter_frame_gap_s is not None:
            return self.inter_frame_gap_s
        if not self.rtu_framing:
            return 0.0
        if self.baudrate > _RTU_FAST_BAUD:
            return _RTU_FAST_GAP_S
        return _RTU_GAP_CHARS * self.char_time_s

    @property
    def response_timeout_s(self) -> float:
        if self.timeout_s is not None:
            return self.timeout_s
        if self.kind == "tcp":
            return 1.0
        # Leave room for the longest frame each way at the line's speed (0.27 s per frame at 9600 8N1).
        serial = max(0.5, 0.2 + 2 * _MAX_ADU_CHARS * self.char_time_s)
        return serial if self.kind == "rtu" else serial + 0.5


class ModbusSection(Strict):
    buses: dict[Annotated[str, Field(pattern=_ID_RE)], ModbusBusConfig] = Field(
        default_factory=dict, description="Modbus buses by id: a serial line, or a TCP connection to a device or DTU")


# --- wristbands and alarms -------------------------------------------------------------------------

class ResidentConfig(Strict):
    """A resident who wears a wristband. Names and rooms stay on the box (events carry the id)."""

    id: str = Field(pattern=_ID_RE, description="the resident's id, as the platform knows them")
    name: str | None = Field(default=None, max_length=64, description="local only, unless alarms.include_names")
    room: str | None = Field(default=None, max_length=64, description="local only")
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


class WristbandInputConfig(Strict):
    decoder: Literal["ble-json", "ble-adv-hex", "chirpstack-v4"] = Field(description="the gateway's format")
    topics: list[str] | None = Field(default=None, description="topic filters; the decoder's usual ones if unset")


class WristbandsConfig(Strict):
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
                           description='guard-room buttons publish {"alarm_id": ..., "by": ...} here')

    @field_validator("password", mode="before")
    @classmethod
    def _password_ref(cls, v: Any) -> Any:
        return _no_clear_secret(v)

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        return check_broker_url(v)

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


class AlarmLevelConfig(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    targets: list[str] = Field(min_length=1, description="notifier targets, e.g. guard_room")


class AlarmPolicyConfig(Strict):
    severity: Literal["critical", "high", "medium", "low"]
    outputs: list[str] = Field(default_factory=list, description="outputs on until acknowledged, e.g. [siren]")
    repeat_s: float = Field(default=60, gt=0)
    escalate_after_s: list[float] = Field(default_factory=list, description="times of levels 1, 2, ...")
    fold_window_s: float | None = Field(default=None, gt=0)


class AlarmsSection(Strict):
    levels: list[AlarmLevelConfig] = Field(
        default_factory=lambda: [AlarmLevelConfig(name="guard_room", targets=["guard_room"]),
                                 AlarmLevelConfig(name="grid_worker", targets=["grid_worker"]),
                                 AlarmLevelConfig(name="family", targets=["family"])],
        description="escalation ladder, first level first")
    fold_window_s: float = Field(default=120, gt=0, description="repeats within this fold into one alarm")
    output_pulse_s: float | None = Field(default=None, gt=0, description="pulse outputs instead of keeping them on")
    include_names: bool = Field(default=False, description="put residents' names in events to the cloud")
    message_names: bool = Field(default=False, description="put residents' names in notifications")
    policies: dict[Literal["sos", "fall", "heart_rate_high", "heart_rate_low", "spo2_low", "removed",
                           "low_battery", "no_signal", "left_compound"], AlarmPolicyConfig] = Field(
        default_factory=dict, description="per-kind overrides of the shipped policies")


# --- devices (one config class per driver type, joined by a discriminated union) ----------------

class DeviceBase(Strict):
    id: str = Field(pattern=_ID_RE, description="device id, unique on this gateway")
    enabled: bool = True
    name: str | None = Field(default=None, description="human label, local only")


class SimSensorConfig(DeviceBase):
    type: Literal["sim.sensor"]
    metric: str = Field(default="temperature", pattern=r"^[a-z][a-z0-9_]*$")
    unit: str = "degC"
    base: float = 25.0
    amplitude: float = Field(default=5.0, ge=0)
    interval_s: float = Field(default=1.0, gt=0, le=86_400)


class SimContactConfig(DeviceBase):
    type: Literal["sim.contact"]
    contact: str = "door"
    mean_interval_s: float = Field(default=5.0, gt=0)


class SimPanicConfig(DeviceBase):
    type: Literal["sim.panic"]
    location: str = "guard-room"
    mean_interval_s: float = Field(default=30.0, gt=0)


class ModbusDeviceBase(DeviceBase):
    bus: str = Field(pattern=_ID_RE, description="id of a bus under modbus.buses")
    unit_id: int = Field(ge=1, le=247, description="Modbus unit (slave) id on that bus")
    profile: str = Field(description="a shipped device model (see 'edgeagent modbus profiles') or a profile file path")
    poll_interval_s: float | None = Field(default=None, gt=0, le=86_400,
                                          description="poll at least this often (overrides the profile's default)")


class ModbusGateConfig(ModbusDeviceBase):
    """A car barrier gate."""

    type: Literal["modbus.gate"]
    profile: str = "barrier-gate-generic"


class ChargerSafetyConfig(Strict):
    """Local cut-offs of an e-bike charging station; they act without the cloud."""

    max_current_a: float = Field(default=3.5, gt=0, le=100, description="a port above this is cut and locked out")
    max_temperature_c: float = Field(default=65.0, gt=0, le=200,
                                     description="a port above this is cut and locked out")
    cut_on_smoke: bool = Field(default=True, description="the smoke input cuts the whole station")
    full_current_a: float = Field(default=0.15, ge=0, le=10,
                                  description="a charging port drawing less than this is considered full")
    full_after_s: float = Field(default=1800, gt=0, le=86_400,
                                description="a full battery left on charge this long is cut")
    temperature_hysteresis_c: float = Field(default=5.0, ge=0, le=50,
                                            description="a lockout may be reset below max_temperature_c minus this")
    idle_current_a: float = Field(default=0.05, gt=0, le=10, description="above this (relay on) a session starts")
    unplugged_after_s: float = Field(default=120, gt=0, le=86_400, description="no current this long ends a session")
    cut_verify_s: float = Field(default=10, gt=0, le=600,
                                description="a cut port still on after this long: the whole station is cut")

    @model_validator(mode="after")
    def _ordered(self) -> ChargerSafetyConfig:
        if not self.idle_current_a < self.full_current_a < self.max_current_a:
            raise ValueError("need idle_current_a < full_current_a < max_current_a "
                             f"(got {self.idle_current_a}, {self.full_current_a}, {self.max_current_a})")
        return self


class ModbusChargerConfig(ModbusDeviceBase):
    """A multi-port e-bike charging station."""

    type: Literal["modbus.charger"]
    profile: str = "ebike-charger-8port"
    safety: ChargerSafetyConfig = ChargerSafetyConfig()


class ModbusRelayConfig(ModbusDeviceBase):
    """A relay/IO module driving sirens, strobes, door-hold contacts."""

    type: Literal["modbus.relay"]
    profile: str = "relay-io-8ch"
    channels: dict[Annotated[int, Field(ge=1, le=64)], Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]] = Field(
        default_factory=dict, description="names for output channels, e.g. {1: siren, 2: strobe}")


class ModbusGenericConfig(ModbusDeviceBase):
    """Any other Modbus device described by a profile."""

    type: Literal["modbus.device"]


DeviceConfig = Annotated[
    SimSensorConfig | SimContactConfig | SimPanicConfig | ModbusGateConfig | ModbusChargerConfig
    | ModbusRelayConfig | ModbusGenericConfig,
    Field(discriminator="type"),
]
DEVICE_TYPES: dict[str, type[DeviceBase]] = {
    "sim.sensor": SimSensorConfig,
    "sim.contact": SimContactConfig,
    "sim.panic": SimPanicConfig,
    "modbus.gate": ModbusGateConfig,
    "modbus.charger": ModbusChargerConfig,
    "modbus.relay": ModbusRelayConfig,
    "modbus.device": ModbusGenericConfig,
}


class Config(Strict):
    """The whole file."""

    version: int = Field(description=f"config schema version; this edgeagent writes {CONFIG_VERSION}")
    site_id: str = Field(pattern=_ID_RE, description="the compound, as the platform knows it")
    gateway_id: str = Field(pattern=_ID_RE, description="this box, unique within the site")
    state_dir: Path = Field(default=Path("/var/lib/edgeagent"),
                            description="outbox and local state; $STATE_DIRECTORY overrides under systemd")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    clock: ClockConfig = ClockConfig()
    outbox: OutboxSection = OutboxSection()
    uplink: UplinkConfig | None = None
    commands: CommandsConfig = CommandsConfig()
    health: HealthConfig = HealthConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    modbus: ModbusSection = ModbusSection()
    wristbands: WristbandsConfig | None = None
    alarms: AlarmsSection = AlarmsSection()
    notifiers: NotifiersSection = Field(
        default_factory=dict, description="how alarm notifications reach people: mqtt, webhook, sms")
    devices: list[DeviceConfig] = Field(default_factory=list)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v > CONFIG_VERSION:
            raise ValueError(f"version {v} is newer than this edgeagent understands ({CONFIG_VERSION}); "
                             "upgrade edgeagent")
        if v < CONFIG_VERSION:
            raise ValueError(f"version {v} is old; run 'edgeagent config migrate'")
        return v

    def cross_checks(self) -> list[tuple[tuple[int | str, ...], str]]:
        """Checks that span sections, each with the location of the offending key."""
        issues: list[tuple[tuple[int | str, ...], str]] = []
        seen: set[str] = set()
        units: dict[tuple[str, int], str] = {}
        for i, dev in enumerate(self.devices):
            if dev.id in seen:
                issues.append((("devices", i, "id"), f"device id {dev.id!r} is used twice"))
            seen.add(dev.id)
            if isinstance(dev, ModbusDeviceBase):
                if dev.bus not in self.modbus.buses:
                    known = ", ".join(sorted(self.modbus.buses)) or "none defined"
                    issues.append((("devices", i, "bus"), f"no bus {dev.bus!r} under modbus.buses (known: {known})"))
                elif (dev.bus, dev.unit_id) in units:
                    issues.append((("devices", i, "unit_id"), f"unit id {dev.unit_id} on bus {dev.bus!r} is already "
                                   f"device {units[(dev.bus, dev.unit_id)]!r}"))
                units.setdefault((dev.bus, dev.unit_id), dev.id)
        if self.wristbands is not None:
            issues.extend(self.wristbands.cross_checks())
        return issues


# --- migrations -----------------------------------------------------------------------------------

Migration = Callable[[CommentedMap], None]
# MIGRATIONS[n] turns a version-n document into version n+1, in place (comments are kept).
# Version 1 is the first released schema; a later schema adds its step here.
MIGRATIONS: dict[int, Migration] = {}


def migrate(doc: CommentedMap, migrations: Mapping[int, Migration] | None = None,
            target: int = CONFIG_VERSION) -> list[int]:
    """Apply migrations until ``doc`` is at ``target``; returns the versions it passed through."""
    steps = MIGRATIONS if migrations is None else migrations
    version = doc.get("version")
    if not isinstance(version, int):
        raise ConfigError("the config has no integer 'version'; cannot migrate")
    passed = []
    while version < target:
        step = steps.get(version)
        if step is None:
            raise ConfigError(f"no migration from config version {version}")
        step(doc)
        version += 1
        doc["version"] = version
        passed.append(version)
    return passed


# --- loading with located errors ------------------------------------------------------------------

def yaml_rt() -> YAML:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 110
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def _locate(doc: Any, loc: tuple[int | str, ...]) -> tuple[int, int] | None:
    """(line, column), 1-based, of the deepest node of ``loc`` that exists in the YAML document."""
    node = doc
    pos: tuple[int, int] | None = None
    for part in loc:
        if isinstance(node, CommentedMap) and isinstance(part, str) and part in node:
            ln, col = node.lc.key(part)
            pos = (ln + 1, col + 1)
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            ln, col = node.lc.item(part)
            pos = (ln + 1, col + 1)
            node = node[part]
        elif isinstance(node, CommentedMap) and isinstance(part, str):
            # A tag of a union member (e.g. 'sim.sensor') sits between list item and key: skip it.
            continue
        else:
            break
    if pos is None and isinstance(doc, CommentedMap):
        pos = (1, 1)
    return pos


def _dotted(loc: tuple[int | str, ...], doc: Any) -> str:
    out = ""
    node = doc
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
        else:
            if isinstance(node, Mapping) and part not in node and part in DEVICE_TYPES:
                continue  # the discriminator tag pydantic adds for unions
            out += ("." if out else "") + part
            node = node.get(part) if isinstance(node, Mapping) else None
    return out or "(top level)"


def _model_at(loc: tuple[int | str, ...], doc: Any) -> type[BaseModel] | None:
    """The config model that owns the last key of ``loc`` (to list the keys it allows)."""
    model: type[BaseModel] | None = Config
    node = doc
    for part in loc[:-1]:
        if model is None:
            return None
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            if isinstance(node, Mapping) and node.get("type") in DEVICE_TYPES:
                model = DEVICE_TYPES[str(node["type"])]
            continue
        if part in DEVICE_TYPES and not (isinstance(node, Mapping) and part in node):
            continue  # the union tag pydantic puts in the location
        field = model.model_fields.get(part)
        if field is None:
            return None
        node = node.get(part) if isinstance(node, Mapping) else None
        candidates = [a for a in typing.get_args(field.annotation) or (field.annotation,)
                      if isinstance(a, type) and issubclass(a, BaseModel)]
        # A list of devices: the item's own `type` picks the model at the next (index) step.
        model = candidates[0] if candidates else (DeviceBase if part == "devices" else None)
    return model


def _unknown_key(loc: tuple[int | str, ...], doc: Any) -> str:
    key = str(loc[-1]) if loc else "?"
    model = _model_at(loc, doc)
    if model is None:
        return "unknown key"
    allowed = sorted(model.model_fields)
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}allowed here: {', '.join(allowed)})"


def _plain(err: Mapping[str, Any], doc: Any = None) -> str:
    kind = err["type"]
    msg = str(err["msg"])
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if any(isinstance(p, str) and _SECRETISH.search(p) for p in err["loc"]):
        got = "<hidden>"  # never echo what sits where a secret belongs
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a section of keys (got {type(got).__name__} {got!r})" if got != "<hidden>" \
            else "must be a section of keys"
    if kind == "string_type" and isinstance(got, int | float) and not isinstance(got, bool):
        return f"must be text; YAML read {got!r} as a number: put it in quotes"
    if kind == "list_type":
        return f"must be a list (got {type(got).__name__})"
    if kind == "extra_forbidden":
        return _unknown_key(tuple(err["loc"]), doc)
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        return f"unknown device type {ctx.get('tag')!r} (known: {', '.join(sorted(DEVICE_TYPES))})"
    if kind == "union_tag_not_found":
        return "a device needs a 'type' key"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = {"greater_than_equal": "at least", "greater_than": "more than",
                 "less_than_equal": "at most", "less_than": "less than"}[kind]
        limit = next(iter(ctx.values()), "?")
        return f"must be {bound} {limit} (got {got!r})"
    if kind == "string_pattern_mismatch":
        return f"{got!r} is not allowed here (must match {ctx.get('pattern')})"
    if kind == "literal_error":
        return f"{got!r} is not one of {ctx.get('expected')}"
    if kind.endswith(("_type", "_parsing")):
        return f"{msg.lower()} (got {type(got).__name__} {got!r})" if not isinstance(got, dict) else msg.lower()
    return msg.removeprefix("Value error, ")


def _format_errors(path: Path | str, doc: Any, exc: ValidationError) -> str:
    located = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        pos = _locate(doc, loc)
        where = f"{path}:{pos[0]}:{pos[1]}" if pos else str(path)
        located.append((pos or (0, 0), f"{where}: {_dotted(loc, doc)}: {_plain(err, doc)}"))
    return "\n".join(line for _pos, line in sorted(located, key=lambda x: x[0]))


def parse_yaml(text: str, path: Path | str) -> CommentedMap:
    try:
        doc = yaml_rt().load(io.StringIO(text))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {exc.problem or exc.context}") from exc
    except YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if doc is None:
        raise ConfigError(f"{path}: the file is empty; start from 'edgeagent init'")
    if not isinstance(doc, CommentedMap):
        raise ConfigError(f"{path}:1:1: the top level must be a mapping of keys, not {type(doc).__name__}")
    return doc


def validate_doc(doc: CommentedMap, path: Path | str) -> Config:
    try:
        cfg = Config.model_validate(_to_builtin(doc))
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, doc, exc)) from None
    issues = cfg.cross_checks()
    if issues:
        lines = []
        for loc, msg in issues:
            pos = _locate(doc, loc)
            where = f"{path}:{pos[0]}:{pos[1]}" if pos else str(path)
            lines.append(f"{where}: {_dotted(loc, doc)}: {msg}")
        raise ConfigError("\n".join(lines))
    return cfg


def load_config(path: Path) -> Config:
    """Read and validate the file; every failure is a :class:`ConfigError` with a location."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; create one with 'edgeagent init --config {path}'") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return validate_doc(parse_yaml(text, path), path)


def _to_builtin(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {str(k): _to_builtin(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_to_builtin(v) for v in node]
    return node


# --- showing config without secrets ----------------------------------------------------------------

_SECRETISH = re.compile(r"pass|secret|token|key$|private", re.IGNORECASE)


def redacted(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data, safe to print: secrets show only where they come from."""
    data = cfg.model_dump(mode="json")

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for k, v in node.items():
                if isinstance(v, dict) and set(v) <= {"credential", "file", "env"} and v:
                    out[k] = {kk: vv for kk, vv in v.items() if vv is not None} | {"value": "<redacted>"}
                elif _SECRETISH.search(k) and isinstance(v, str) and k != "public_keys":
                    out[k] = "<redacted>"
                else:
                    out[k] = walk(v)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    result: dict[str, Any] = walk(data)
    # Personal data stays on the box too: residents' names and rooms, phone numbers for SMS.
    for resident in (result.get("wristbands") or {}).get("residents", []):
        for key in ("name", "room"):
            if resident.get(key):
                resident[key] = "<redacted>"
    for notifier in (result.get("notifiers") or {}).values():
        if isinstance(notifier, dict) and isinstance(notifier.get("numbers"), dict):
            notifier["numbers"] = dict.fromkeys(notifier["numbers"], "<redacted>")
    return result
