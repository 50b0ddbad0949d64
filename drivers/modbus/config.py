"""Config of the Modbus capability: the ``modbus.buses`` section and the Modbus device types."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from edgeagent.kernel.config.base import Strict
from edgeagent.kernel.config.schema import ID_PATTERN, DeviceBase

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
    buses: dict[Annotated[str, Field(pattern=ID_PATTERN)], ModbusBusConfig] = Field(
        default_factory=dict, description="Modbus buses by id: a serial line, or a TCP connection to a device or DTU")




class ModbusDeviceBase(DeviceBase):
    bus: str = Field(pattern=ID_PATTERN, description="id of a bus under modbus.buses")
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


ModbusDeviceConfig = ModbusGateConfig | ModbusChargerConfig | ModbusRelayConfig | ModbusGenericConfig
DEVICE_CLASSES: tuple[type[ModbusDeviceBase], ...] = (ModbusGateConfig, ModbusChargerConfig, ModbusRelayConfig,
                                                      ModbusGenericConfig)
