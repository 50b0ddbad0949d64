"""Wristbands as a capability: the local broker input (BLE gateways, LoRaWAN), residents and their
alarms, and the guard-room topic."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from edgeagent.drivers.wristband.config import WristbandsConfig
from edgeagent.drivers.wristband.kinds import WRISTBAND_ALARM_KINDS
from edgeagent.kernel.capability import Capability, CapabilityContext, CapabilitySpec, DoctorCheck, TaskSpec
from edgeagent.kernel.config.schema import CoreConfig, DeviceBase, Issue

if TYPE_CHECKING:  # the CLI reads the spec; paho loads only when the capability is built
    from edgeagent.drivers.wristband.service import WristbandService


class WristbandCapability(Capability):
    name = "wristbands"

    def __init__(self, service: WristbandService) -> None:
        self.service = service

    def tasks(self) -> Sequence[TaskSpec]:
        # An input that raises alarms: while it is down an SOS goes unheard, so it is critical.
        return [TaskSpec("wristbands", self.service.run, critical=True)]

    def status(self) -> Any:
        return dict(self.service.snapshot())

    async def publish_local(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        session = self.service.session
        if session is None:
            return False
        await session.publish(topic, payload, qos=qos, retain=retain)
        return True


def _build(section: WristbandsConfig | None, _devices: Sequence[DeviceBase], ctx: CapabilityContext
           ) -> Capability | None:
    from edgeagent.drivers.wristband.service import WristbandService  # noqa: PLC0415

    if section is None or not section.enabled:
        return None
    ctx.names.update({r.id: r.name for r in section.residents if r.name})
    service = WristbandService(section, ctx.sink, ctx.alarms, client_id=client_id_for(ctx.gateway_id, ctx.state_dir))
    ctx.alarms.listen(service.publish_change)
    return WristbandCapability(service)


CLIENT_ID_FILE = "wristbands-client-id"


def client_id_for(gateway_id: str, state_dir: Path) -> str:
    """``edgeagent-<gateway>-wristbands-<suffix>``, the suffix random once per install and kept in the state
    directory. The session is persistent (the broker keeps its subscriptions and queued alarms for that
    id): with a guessable id any client on the LAN could take it over and receive the residents'
    readings, or a second box with the same gateway id would steal the first one's session."""
    path = state_dir / CLIENT_ID_FILE
    try:
        suffix = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        suffix = ""
    if not (len(suffix) == 16 and all(c in "0123456789abcdef" for c in suffix)):
        suffix = secrets.token_hex(8)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{CLIENT_ID_FILE}.tmp")
        tmp.write_text(suffix + "\n", encoding="ascii")
        tmp.replace(path)
    return f"edgeagent-{gateway_id}-wristbands-{suffix}"


def _cross_checks(section: WristbandsConfig | None, _devices: Sequence[DeviceBase], _cfg: CoreConfig) -> list[Issue]:
    return section.cross_checks() if section is not None else []


def _doctor(section: WristbandsConfig | None, _cfg: CoreConfig) -> list[DoctorCheck]:
    if section is None or not section.enabled:
        return [DoctorCheck("wristband broker", "skip", "wristbands are not configured")]
    url = urlsplit(section.broker)
    host, port = url.hostname or "127.0.0.1", url.port or (8883 if url.scheme == "mqtts" else 1883)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return [DoctorCheck("wristband broker", "fail",
                            f"{host}:{port}: cannot connect ({exc.strerror or exc}); wristband alarms need it")]
    return [DoctorCheck("wristband broker", "ok", f"{host}:{port} accepts connections")]


SPEC: CapabilitySpec[WristbandsConfig] = CapabilitySpec(
    name="wristbands", build=_build, section="wristbands", section_model=WristbandsConfig, optional=True,
    cross_checks=_cross_checks, doctor=_doctor, alarm_kinds=WRISTBAND_ALARM_KINDS)
