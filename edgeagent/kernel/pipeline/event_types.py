"""The registry of every event type edgeagent can emit, with the schema of each one's ``data``.

This is the source of the published contract: ``cloud-bridge/contract/`` is generated from it
(``python -m edgeagent.cloud_bridge.contract``) and a test fails when the two disagree.
Later capabilities add their types here, one entry each.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from edgeagent.kernel.pipeline.events import EventData, EventRegistry, EventType, Priority

REGISTRY = EventRegistry()


# --- the gateway itself -------------------------------------------------------------------------

class GatewayStarted(EventData):
    version: str = Field(description="edgeagent version")
    boot_id: str = Field(description="Linux boot id; changes on every boot of the box")
    recovered_unsent: int = Field(ge=0, description="events found unsent in the outbox at start")
    outbox_reset: bool = Field(
        default=False,
        description="the outbox database was damaged and set aside; seq restarted at 1 with this event")


class GatewayStopped(EventData):
    reason: str = Field(description="why the daemon stopped, e.g. 'SIGTERM'")
    unsent: int = Field(ge=0, description="events still in the outbox, sent after the next start")


class ClockSynced(EventData):
    boot_id: str = Field(description="boot whose monotonic clock the correction applies to")
    monotonic_ms: int = Field(description="monotonic clock (ms since boot) at the moment of sync")
    wall_at_sync: str = Field(description="UTC wall time at that moment, RFC 3339 ms")
    corrected_unsent: int = Field(ge=0, description="unsent events whose times were corrected in place")
    sent_uncorrected: int = Field(
        ge=0,
        description="events already sent with clock_synced=false; the cloud corrects them with "
        "occurred_at = wall_at_sync - (monotonic_ms - event.clock.monotonic_ms)",
    )


class OutboxEvicted(EventData):
    evicted_telemetry: int = Field(ge=0, description="telemetry events evicted since the last report")
    evicted_event: int = Field(ge=0, description="ordinary events evicted since the last report")
    first_seq: int = Field(description="lowest seq evicted in this report")
    last_seq: int = Field(description="highest seq evicted in this report")
    total_evicted: int = Field(ge=0, description="all events evicted since the outbox was created")
    cap_bytes: int = Field(ge=0, description="configured backlog cap")


class OutboxDeadLettered(EventData):
    count: int = Field(ge=1, description="events dead-lettered since the last report")
    alarms: int = Field(ge=0, description="how many of them were alarms")
    first_seq: int = Field(description="lowest seq dead-lettered in this report")
    last_seq: int = Field(description="highest seq dead-lettered in this report")
    seqs: list[int] = Field(
        max_length=100,
        description="their seqs in order, the first 100 only when there are more (first_seq..last_seq "
        "spans them all, but other events in that range may have been sent)")
    types: list[str] = Field(max_length=20, description="their event types (the first 20 distinct ones)")
    reason: str = Field(max_length=200, description="why the broker refused them, as given last (truncated)")
    total_dead_lettered: int = Field(ge=0, description="all events dead-lettered since the outbox was created")


class DeviceFault(EventData):
    task: str = Field(description="supervised task (driver) that gave up")
    error: str = Field(description="last error, without secrets")
    restarts: int = Field(ge=0, description="restarts within the intensity window before giving up")


class DeviceOnline(EventData):
    reason: str | None = Field(default=None, description="what brought it back, if known")


class DeviceOffline(EventData):
    reason: str = Field(description="why the device is considered offline")


class CommandAudit(EventData):
    command_id: str = Field(description="id from the command request")
    command: str = Field(description="command name, e.g. 'gate.open'")
    outcome: Literal["executed", "failed", "rejected"]
    error: str | None = Field(default=None, description="why it failed or was rejected")
    issuer: str | None = Field(default=None, description="who the signed command names as issuer")


# --- simulated and generic sources ---------------------------------------------------------------

class SensorReading(EventData):
    metric: str = Field(description="what is measured, e.g. 'temperature'")
    value: float
    unit: str = Field(description="unit symbol, e.g. 'degC', 'V', '%'")


class ContactChanged(EventData):
    state: Literal["open", "closed"]
    contact: str = Field(description="which contact on the device, e.g. 'door'")


class PanicPressed(EventData):
    location: str = Field(description="where the button is, e.g. 'guard-room'")
    presses: int = Field(ge=1, default=1)


GATEWAY_STARTED = REGISTRY.register(EventType(
    "gateway.started", Priority.EVENT, GatewayStarted, "The daemon started and opened its outbox."))
GATEWAY_STOPPED = REGISTRY.register(EventType(
    "gateway.stopped", Priority.EVENT, GatewayStopped, "The daemon is stopping in an orderly way."))
CLOCK_SYNCED = REGISTRY.register(EventType(
    "gateway.clock.synced", Priority.EVENT, ClockSynced,
    "The wall clock became synchronised; earlier times were corrected."))
OUTBOX_EVICTED = REGISTRY.register(EventType(
    "outbox.evicted", Priority.EVENT, OutboxEvicted,
    "The backlog cap was reached and events were evicted (telemetry first, never alarms).",
    pinned=True))
OUTBOX_DEAD_LETTERED = REGISTRY.register(EventType(
    "outbox.dead_lettered", Priority.EVENT, OutboxDeadLettered,
    "The broker refused events for good (e.g. bigger than its maximum packet size); they were set aside, "
    "kept on the gateway for inspection (`edgeagent events dead-letters`) and will not be sent. Their seqs "
    "are a gap the platform should not wait for.",
    pinned=True))
DEVICE_FAULT = REGISTRY.register(EventType(
    "device.fault", Priority.EVENT, DeviceFault,
    "A driver failed repeatedly and was stopped; the rest of the gateway keeps running."))
DEVICE_ONLINE = REGISTRY.register(EventType(
    "device.online", Priority.EVENT, DeviceOnline, "A device answers again."))
DEVICE_OFFLINE = REGISTRY.register(EventType(
    "device.offline", Priority.EVENT, DeviceOffline, "A device stopped answering."))
COMMAND_AUDIT = REGISTRY.register(EventType(
    "command.audit", Priority.EVENT, CommandAudit,
    "A command from the cloud was executed, failed, or was rejected."))
SENSOR_READING = REGISTRY.register(EventType(
    "sensor.reading", Priority.TELEMETRY, SensorReading, "A measured value.", coalesce_field="metric"))
CONTACT_CHANGED = REGISTRY.register(EventType(
    "contact.changed", Priority.EVENT, ContactChanged, "A dry contact (door, cabinet) opened or closed."))
PANIC_PRESSED = REGISTRY.register(EventType(
    "panic.pressed", Priority.ALARM, PanicPressed, "A fixed panic button was pressed."))


# --- device points (Modbus profiles and other register-mapped devices) ------------------------------
#
# A device profile (drivers/modbus/profiles/*.yaml) names, for a change of one of its values, which of
# these types to raise; all share one schema, so a new device model needs a profile, not code. A new
# *kind* of event is a contract change and is added here, where the contract is generated from.

class PointEvent(EventData):
    point: str = Field(description="the value's name in the device profile, e.g. 'port3_temperature'")
    port: int | None = Field(default=None, ge=1, description="port or channel number, for per-port values")
    value: bool | int | float | str | dict[str, bool] = Field(description="the new value (a state name, for states)")
    previous: bool | int | float | str | dict[str, bool] | None = Field(
        default=None, description="the value before, if one was known")
    unit: str | None = Field(default=None, description="unit of value, e.g. 'degC'")
    trigger: str = Field(description="what raised it: change, rising, falling, enter, leave, above, below")
    threshold: float | None = Field(default=None, description="for above/below: the threshold crossed")


def _point_types(names: str, priority: Priority, description: str) -> None:
    for name in names.split():
        REGISTRY.register(EventType(name, priority, PointEvent, description))


_point_types("gate.opened gate.closed gate.held", Priority.EVENT, "The barrier gate's arm reached a position.")
_point_types("gate.state_changed gate.mode_changed gate.fault_code_changed gate.beam_changed",
             Priority.EVENT, "A barrier gate value changed.")
_point_types("gate.vehicle_present gate.vehicle_left", Priority.EVENT,
             "The gate's ground loop saw a vehicle arrive or leave.")
_point_types("gate.fault gate.arm_broken gate.over_temperature", Priority.EVENT,
             "The barrier gate reports a fault.")
_point_types("charger.port_state_changed charger.port_switched charger.port_faults_changed charger.port_full "
             "charger.station_alarms_changed charger.mains_changed charger.cabinet_door_changed "
             "charger.station_restored charger.smoke_cleared",
             Priority.EVENT, "An e-bike charging station value changed.")
_point_types("charger.port_fault charger.port_over_current charger.port_over_temperature charger.port_relay_welded "
             "charger.smoke_detected charger.cabinet_over_temperature charger.rcd_tripped charger.station_cut",
             Priority.ALARM, "An e-bike charging station reports a hazard (fire risk): alarm priority.")
_point_types("io.input_changed io.relay_changed", Priority.EVENT, "A relay/IO module's input or output changed.")


class GateCommanded(EventData):
    command: str = Field(description="open, close, hold_open, release, ...")
    reason: str = Field(description="plate_match, guard_room, cloud_command, visitor, ...")
    by: str = Field(description="who asked: 'platform', an operator name, 'plate:<id>'")
    via: str = Field(description="cloud, cli, local, console")
    outcome: Literal["executed", "failed"]
    latency_ms: float = Field(ge=0, description="from the request to the write being acknowledged")
    note: str | None = None
    error: str | None = None


GATE_COMMANDED = REGISTRY.register(EventType(
    "gate.commanded", Priority.EVENT, GateCommanded,
    "A barrier gate was commanded (opened for a plate, by the guard room or the platform): the audit record."))


class GateVisitor(EventData):
    plate: str | None = Field(default=None, max_length=16, description="the plate as voted over the vehicle's frames "
                              "(None when too little was read to vote); a visitor's plate, never a resident's")
    confidence: float = Field(ge=0, le=1, description="the voted plate's weakest position's mean character score")
    agreement: float = Field(ge=0, le=1, description="the voted plate's share of the reads (1: all agree)")
    reason: str = Field(max_length=32, description="why it did not open: not_in_list, entry_expired, "
                        "entry_not_yet_valid, low_confidence, too_few_reads, reads_disagree, bad_format")
    track_id: int = Field(ge=0, description="the vehicle's track on the camera")
    zone: str = Field(max_length=64, description="the camera's gate zone")
    reads: int = Field(ge=0, description="plate reads that voted")
    votes: int = Field(ge=0, description="reads of exactly the voted plate")
    gate: str = Field(max_length=130, description="the gate this camera opens (a gate device id or an output)")


class GateCall(EventData):
    gate: str = Field(max_length=130, description="the gate this camera opens (a gate device id or an output)")
    source: str = Field(max_length=32, description="where the press was seen: 'camera' (its digital input)")
    zone: str | None = Field(default=None, max_length=64, description="the camera's gate zone")


GATE_VISITOR = REGISTRY.register(EventType(
    "gate.visitor", Priority.EVENT, GateVisitor,
    "A vehicle at the car gate whose plate did not open it (not a resident's, out of its dates, or not read "
    "surely enough): for the guard room, with a snapshot in the envelope's attachments. The device is the "
    "gate camera."))
GATE_CALL = REGISTRY.register(EventType(
    "gate.call", Priority.EVENT, GateCall,
    "A driver pressed the car gate's call button: the guard console rings (and may open remotely). The device "
    "is the camera or gate that saw the press."))


# --- e-bike charging shed safety (drivers/modbus/charger.py) ----------------------------------------
#
# Local rules that act without the cloud: a hazard cuts a port (or the whole station) at once and the
# alarm follows; sessions are reported so the platform sees who charged how long and how much.

PortCutReason = Literal["over_current", "over_temperature", "lockout_enforced"]
StationCutReason = Literal["smoke", "relay_welded", "cut_failed", "lockout_enforced"]
SessionEndReason = Literal["unplugged", "full", "cutoff", "station_off", "switched_off", "unknown"]


class ChargerPortCutoff(EventData):
    """The port stays cut (locked out) until the lockout is reset after the cause was inspected."""

    port: int = Field(ge=1, description="port that was cut")
    reason: PortCutReason = Field(
        description="over_current / over_temperature: a reading above the limit (or the charger's own fault bit); "
        "lockout_enforced: a locked-out port was found switched on and was cut again")
    value: float | None = Field(
        default=None, description="the reading that tripped the rule; null for a fault bit reported by the charger")
    limit: float | None = Field(default=None, description="the configured limit the value exceeded")
    unit: str | None = Field(default=None, description="unit of value and limit, e.g. 'A', 'degC'")
    reaction_ms: float | None = Field(
        default=None, ge=0,
        description="time from the reading arriving at the gateway to the cut being written; null if the write "
        "failed (it is retried at the next reading)")
    cut_error: str | None = Field(default=None, description="why writing the cut failed, if it did")


class ChargerStationCutoff(EventData):
    reason: StationCutReason = Field(
        description="smoke: the smoke input is on; relay_welded: a port relay reports welded contacts and cannot "
        "open; cut_failed: a cut port still draws current or reads switched on; lockout_enforced: the locked-out "
        "station was found switched on and was cut again")
    port: int | None = Field(default=None, ge=1, description="the port whose fault caused the cut, if any")
    value: float | bool | None = Field(default=None, description="the reading that tripped the rule, if any")
    limit: float | None = Field(default=None, description="the configured limit the value exceeded, if any")
    unit: str | None = Field(default=None, description="unit of value and limit")
    reaction_ms: float | None = Field(
        default=None, ge=0,
        description="time from the reading arriving at the gateway to the main contactor being opened; null if "
        "the write failed (it is retried at the next reading)")
    cut_error: str | None = Field(default=None, description="why writing the cut failed, if it did")


class ChargerLockoutReset(EventData):
    port: int | None = Field(ge=1, description="port whose lockout was cleared; null for the whole station")
    by: str = Field(min_length=1, description="who cleared it (operator or account id)")
    via: Literal["cloud", "cli", "local"] = Field(description="where the reset came from")
    cleared_reason: str | None = Field(default=None, description="why it had been locked out, if known")


class ChargingSessionStarted(EventData):
    port: int = Field(ge=1)
    session_id: str = Field(min_length=1, description="id of the session (a ULID), repeated when it ends")
    energy_kwh_at_start: float | None = Field(
        default=None, description="the port's energy counter when the session started; null if not read yet")


class ChargingSessionEnded(EventData):
    port: int = Field(ge=1)
    session_id: str = Field(min_length=1, description="id from charging.session.started")
    energy_kwh: float = Field(
        ge=0, description="energy delivered in the session (counter resets and wraps accounted, never negative)")
    duration_s: float = Field(ge=0, description="session length; time the gateway was down is not counted")
    reason: SessionEndReason = Field(
        description="unplugged: no current for a while; full: cut as a full battery; cutoff: cut for a hazard; "
        "station_off: the station's main contactor opened; switched_off: the port relay was switched off by the "
        "charger or an operator; unknown: found ended after a gateway restart")


class ChargerPortFullCutoff(EventData):
    port: int = Field(ge=1)
    session_id: str = Field(min_length=1, description="the session that was ended")
    current_a: float = Field(description="the port's current when it was cut")
    limit_a: float = Field(description="below this current a battery counts as full")
    after_s: float = Field(ge=0, description="how long the current had stayed below the limit")
    reaction_ms: float | None = Field(default=None, ge=0, description="time from the reading to the cut written")
    cut_error: str | None = Field(default=None, description="why writing the cut failed, if it did")


CHARGER_PORT_CUTOFF = REGISTRY.register(EventType(
    "charger.port.cutoff", Priority.ALARM, ChargerPortCutoff,
    "The gateway cut a charging port for a hazard (fire risk) and locked it out."))
CHARGER_STATION_CUTOFF = REGISTRY.register(EventType(
    "charger.station.cutoff", Priority.ALARM, ChargerStationCutoff,
    "The gateway opened a charging station's main contactor for a hazard and locked the station out."))
CHARGER_LOCKOUT_RESET = REGISTRY.register(EventType(
    "charger.lockout.reset", Priority.EVENT, ChargerLockoutReset,
    "A charging port's (or station's) lockout was cleared after the hazard was gone."))
CHARGING_SESSION_STARTED = REGISTRY.register(EventType(
    "charging.session.started", Priority.EVENT, ChargingSessionStarted, "A charging port started drawing current."))
CHARGING_SESSION_ENDED = REGISTRY.register(EventType(
    "charging.session.ended", Priority.EVENT, ChargingSessionEnded, "A charging session ended."))
CHARGER_PORT_FULL_CUTOFF = REGISTRY.register(EventType(
    "charger.port.full_cutoff", Priority.EVENT, ChargerPortFullCutoff,
    "The gateway cut a port whose battery was full (low current for a long time); not a lockout."))


# --- alarms: one lifecycle for every capability (edgeagent/kernel/alarms/engine.py) ---------------------------
#
# One alarm's life: raised → notified → (escalated, once per level) → acknowledged → resolved. Each step is
# one event, emitted exactly once, at alarm priority. An alarm is about a resident (``resident_id``: a
# wristband's SOS) or a place (``place``: a lift car, the car gate, a façade, a charging shed), never both.
# Events carry the resident's id; the name only when the site enables ``include_names`` (names, rooms and
# thresholds otherwise stay in the local config). Kinds are declared by capabilities
# (``CapabilitySpec.alarm_kinds``); the contract fixes their form and lists the ones shipped
# (:data:`DOCUMENTED_ALARM_KINDS`, kept equal to the declared ones by tests/test_contract.py).

ALARM_KIND_PATTERN = r"^[a-z][a-z0-9_]{0,47}$"
ALARM_PLACE_PATTERN = r"^[^\x00-\x1f\x7f]{1,64}$"
AlarmSeverity = Literal["critical", "high", "medium", "low"]
# auto: the capability saw the condition end (the e-bike left the car); rule: a local rule closed it (a
# safety timeout released a door hold); the others are people: cli, a guard-room panel (local_mqtt), the
# platform, the guard-room console (console).
AlarmVia = Literal["cli", "local_mqtt", "cloud", "auto", "rule", "console"]
AlarmDetail = bool | int | float | str

#: Every alarm kind shipped, as declared by its capability: ``(subject, what it means)``.
DOCUMENTED_ALARM_KINDS: dict[str, tuple[str, str]] = {
    # wristbands (drivers/wristband)
    "sos": ("resident", "SOS button pressed"),
    "fall": ("resident", "fall detected by the wristband"),
    "heart_rate_high": ("resident", "heart rate above the resident's threshold"),
    "heart_rate_low": ("resident", "heart rate below the resident's threshold"),
    "spo2_low": ("resident", "blood oxygen below the resident's threshold"),
    "removed": ("resident", "wristband taken off"),
    "low_battery": ("resident", "wristband battery low"),
    "no_signal": ("resident", "wristband not heard from for the configured time"),
    "left_compound": ("resident", "seen by a gateway outside the compound's zones"),
    # e-bike chargers (drivers/modbus)
    "charger_cutoff": ("place", "a charger port or station was cut off for a hazard (over-current, "
                                "over-temperature, smoke)"),
    # cameras (drivers/camera)
    "ebike_in_lift": ("place", "an e-bike in a lift car"),
    "video_fall": ("place", "a person's fall seen by a camera in a common area"),
    "thrown_object": ("place", "an object thrown from height, seen by a façade camera"),
}


def _kinds_doc() -> str:
    listed = "; ".join(f"{name} ({subject}): {text}" for name, (subject, text) in DOCUMENTED_ALARM_KINDS.items())
    return f"the kind of alarm, declared by the capability that raises it. Shipped kinds: {listed}"


class AlarmEventBase(EventData):
    # Exactly one subject, in the published schema too (None values are left out of the wire form).
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={
        "oneOf": [{"required": ["resident_id"]}, {"required": ["place"]}]})

    alarm_id: str = Field(min_length=1, description="id of the alarm (a ULID), the same in all of its events")
    kind: str = Field(pattern=ALARM_KIND_PATTERN, description=_kinds_doc())
    severity: AlarmSeverity = Field(description="severity configured for the kind")
    resident_id: str | None = Field(
        default=None, min_length=1,
        description="the resident's id in the site's local config (resident alarms; absent for place alarms)")
    place: str | None = Field(
        default=None, pattern=ALARM_PLACE_PATTERN,
        description="the place the alarm is about, as the site names it, e.g. 'lift-2 car' (place alarms; "
        "absent for resident alarms)")
    device_id: str = Field(min_length=1, description="device that raised the alarm first (a wristband, a camera, "
                           "a charger)")
    name: str | None = Field(
        default=None, description="the resident's name; present only when the site enables include_names")
    count: int = Field(ge=1, description="raises folded into this alarm so far (a storm of presses counts each)")
    level: int = Field(ge=0, description="escalation level reached, 0 being the first (e.g. the guard room)")
    raised_at: str = Field(description="when the alarm was first raised, UTC RFC 3339 ms")

    @model_validator(mode="after")
    def _one_subject(self) -> AlarmEventBase:
        if (self.resident_id is None) == (self.place is None):
            raise ValueError("an alarm event carries exactly one of resident_id and place")
        return self


class AlarmRaised(AlarmEventBase):
    details: dict[str, AlarmDetail] = Field(
        default_factory=dict, description="what the detector saw, e.g. {'heart_rate': 142, 'threshold': 120}; "
        "evidence (a snapshot) is in the envelope's attachments")


class AlarmNotified(AlarmEventBase):
    level_name: str = Field(description="name of the escalation level notified, e.g. 'guard_room'")
    targets: list[str] = Field(min_length=1, description="notifier targets the first notification went to")


class AlarmEscalated(AlarmEventBase):
    level_name: str = Field(description="name of the level reached, e.g. 'grid_worker'")
    targets: list[str] = Field(
        min_length=1, description="targets notified from now on (this level's and every lower level's)")
    after_s: float = Field(ge=0, description="time from the first raise to this escalation")


class AlarmAcknowledged(AlarmEventBase):
    by: str = Field(min_length=1, max_length=64, description="who acknowledged, as they gave it (a guard's or "
                    "operator's name): printable text, at most 64 characters")
    via: AlarmVia = Field(description="where the acknowledgement came from (local_mqtt: a guard-room panel)")
    caller: str | None = Field(
        default=None, max_length=64,
        description="the authenticated account that sent it, recorded next to 'by': the local user "
        "('name (uid)') for the CLI, 'panel:<account>' for a guard-room panel; absent from the platform")
    notifications: int = Field(ge=0, description="notification rounds sent before the acknowledgement")
    response_s: float = Field(ge=0, description="time from the first raise to the acknowledgement")


class AlarmResolved(AlarmEventBase):
    by: str = Field(min_length=1, max_length=64, description="who resolved it, as they gave it: printable "
                    "text, at most 64 characters")
    via: AlarmVia = Field(description="where the resolution came from (never a guard-room panel)")
    caller: str | None = Field(
        default=None, max_length=64,
        description="the authenticated account that sent it, recorded next to 'by' (see alarm.acknowledged)")
    note: str | None = Field(default=None, max_length=500,
                             description="what was found or done, as entered: printable text, at most 500 characters")
    acknowledged: bool = Field(description="whether it had been acknowledged before it was resolved")
    notifications: int = Field(ge=0, description="notification rounds sent over the alarm's life")
    duration_s: float = Field(ge=0, description="time from the first raise to the resolution")


ALARM_RAISED = REGISTRY.register(EventType(
    "alarm.raised", Priority.ALARM, AlarmRaised,
    "An alarm was raised about a resident or a place (repeats within the fold window are counted, not raised "
    "again); evidence such as a snapshot is referenced in the envelope's attachments."))
ALARM_NOTIFIED = REGISTRY.register(EventType(
    "alarm.notified", Priority.ALARM, AlarmNotified,
    "The first notification of an alarm went out to its first escalation level."))
ALARM_ESCALATED = REGISTRY.register(EventType(
    "alarm.escalated", Priority.ALARM, AlarmEscalated,
    "An alarm was not acknowledged in time and reached the next escalation level."))
ALARM_ACKNOWLEDGED = REGISTRY.register(EventType(
    "alarm.acknowledged", Priority.ALARM, AlarmAcknowledged,
    "Someone acknowledged an alarm: notifications stop and the siren is switched off."))
ALARM_RESOLVED = REGISTRY.register(EventType(
    "alarm.resolved", Priority.ALARM, AlarmResolved, "An alarm was closed."))


class WristbandVitals(EventData):
    resident_id: str = Field(description="the wearer (names stay on the box)")
    zone: str | None = Field(default=None, description="'inside' or 'outside', from the BLE gateway that heard it")
    heart_rate_bpm: int | None = Field(default=None, ge=0, le=300)
    spo2_pct: int | None = Field(default=None, ge=0, le=100)
    battery_pct: int | None = Field(default=None, ge=0, le=100)
    worn: bool | None = None
    rssi_dbm: int | None = None


WRISTBAND_VITALS = REGISTRY.register(EventType(
    "wristband.vitals", Priority.TELEMETRY, WristbandVitals,
    "The latest readings of a wristband (coalesced per band while the uplink is down).",
    coalesce_field="resident_id"))


# --- cameras (drivers/camera/) ------------------------------------------------------------------------
#
# Boxes and points are normalized to the frame (0..1 of its width and height), so they mean the same on the
# detection sub-stream and on the main stream's snapshot. A snapshot or clip travels as an attachment
# (sha256 and size); its bytes stay on the box until the platform asks for them (camera.upload_evidence).

NormBox = tuple[float, float, float, float]


class CameraObject(EventData):
    track_id: int = Field(ge=1, description="the camera's track: one event per appearance, not per frame")
    label: str = Field(max_length=64, description="the model's class, e.g. 'person', 'car', 'motorcycle'")
    score: float = Field(ge=0, le=1, description="best detector score of the track so far")
    box: NormBox = Field(description="x1, y1, x2, y2 normalized to the frame")
    model: str = Field(max_length=64, description="the detector's manifest name")
    zones: list[str] = Field(default_factory=list, max_length=32, description="zones the object is in")


class CameraZoneEvent(EventData):
    zone: str = Field(max_length=64)
    kind: Literal["enter", "leave", "loiter"]
    track_id: int = Field(ge=1)
    label: str = Field(max_length=64)
    score: float = Field(ge=0, le=1)
    box: NormBox = Field(description="x1, y1, x2, y2 normalized to the frame")
    occupancy: int = Field(ge=0, description="objects of this class in the zone after this change")
    dwell_s: float | None = Field(default=None, ge=0, description="leave and loiter: time in the zone so far")
    reason: str | None = Field(default=None, max_length=32, description="leave: 'exit' or 'lost' (track ended)")


class CameraZoneOccupancy(EventData):
    zone: str = Field(max_length=64)
    counts: dict[str, int] = Field(description="objects in the zone by class, after the change")


class CameraLineCrossed(EventData):
    line: str = Field(max_length=64)
    direction: str = Field(max_length=32, description="the configured name of the direction, e.g. 'in'")
    track_id: int | None = Field(default=None, ge=1, description="the box's track; None when the camera reported it")
    label: str | None = Field(default=None, max_length=64)
    score: float | None = Field(default=None, ge=0, le=1)
    counts: dict[str, int] = Field(default_factory=dict, description="crossings per direction since start")
    source: Literal["edge", "camera"] = Field(description="edge: this box's tracker; camera: the camera's own rule")


class CameraSignal(EventData):
    """What a camera itself reports over ONVIF, normalized."""

    active: bool | None = Field(description="the state after the change (None: a one-shot report)")
    source: dict[str, str] = Field(default_factory=dict, description="the camera's tokens: video source, input, rule")
    topic: str = Field(max_length=256, description="the ONVIF topic, for the record")
    camera_time: str | None = Field(default=None, description="the camera's time of the change, clock-corrected")


class CameraInput(CameraSignal):
    input: str = Field(max_length=64, description="the input's configured name (or its token), e.g. 'call_button'")


class EvidenceUploaded(EventData):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    kind: Literal["snapshot", "clip"]
    size_bytes: int = Field(ge=0)
    status: int = Field(description="the upload server's HTTP status")
    elapsed_ms: float = Field(ge=0)


CAMERA_OBJECT = REGISTRY.register(EventType(
    "camera.object", Priority.EVENT, CameraObject,
    "An object appeared in a camera's view (once per track, with a snapshot attachment)."))
CAMERA_ZONE = REGISTRY.register(EventType(
    "camera.zone", Priority.EVENT, CameraZoneEvent,
    "An object entered, left or loitered in a configured zone."))
CAMERA_ZONE_OCCUPANCY = REGISTRY.register(EventType(
    "camera.zone.occupancy", Priority.TELEMETRY, CameraZoneOccupancy,
    "How many objects of each class are in a zone (on change; coalesced per zone while the uplink is down).",
    coalesce_field="zone"))
CAMERA_LINE_CROSSED = REGISTRY.register(EventType(
    "camera.line.crossed", Priority.EVENT, CameraLineCrossed,
    "An object crossed a configured line in a direction (the box's tracker or the camera's own rule)."))
CAMERA_MOTION = REGISTRY.register(EventType(
    "camera.motion", Priority.EVENT, CameraSignal, "The camera's own motion detector changed state (ONVIF)."))
CAMERA_TAMPER = REGISTRY.register(EventType(
    "camera.tamper", Priority.EVENT, CameraSignal,
    "The camera reports tampering: covered, moved, defocused, or its scene changed (ONVIF)."))
CAMERA_INPUT = REGISTRY.register(EventType(
    "camera.input", Priority.EVENT, CameraInput,
    "A digital input of the camera changed (a gate's call button, a door contact) (ONVIF)."))
CAMERA_EVIDENCE_UPLOADED = REGISTRY.register(EventType(
    "camera.evidence.uploaded", Priority.EVENT, EvidenceUploaded,
    "A snapshot or clip was uploaded to the URL the platform gave (camera.upload_evidence)."))


class CameraClip(EventData):
    for_event: str = Field(max_length=40, description="id of the event the clip is evidence for")
    pre_s: float = Field(ge=0, description="seconds of video before that event (from the keyframe before it)")
    duration_s: float = Field(ge=0)
    frames: int = Field(ge=0)
    codec: str = Field(max_length=32, description="as the camera sent it: the clip is not re-encoded")
    truncated: bool = Field(description="cut short by the size cap")


CAMERA_CLIP = REGISTRY.register(EventType(
    "camera.clip", Priority.EVENT, CameraClip,
    "A clip around an earlier camera event was kept on the box (attachment kind 'clip'; upload on request)."))


# --- the guard-room console (edgeagent/console) ------------------------------------------------------------

class ConsoleAudit(EventData):
    user: str = Field(max_length=64, description="the console account (as typed, for a refused login)")
    role: Literal["viewer", "guard", "installer"] | None = Field(
        default=None, description="its role (absent for a login that did not succeed)")
    action: str = Field(max_length=64, description="login, logout, alarm.ack, alarm.resolve, gate.open, "
                        "config.zone, config.line, doctor")
    target: str = Field(max_length=128, description="what it acted on: an alarm id, a gate, camera/zone")
    outcome: Literal["ok", "refused", "failed"] = Field(
        description="refused: not allowed (role, rate limit, wrong password); failed: allowed but it did not work")
    detail: str | None = Field(default=None, max_length=300, description="why it was refused or failed")
    remote: str | None = Field(default=None, max_length=64, description="the browser's address")


CONSOLE_AUDIT = REGISTRY.register(EventType(
    "console.audit", Priority.EVENT, ConsoleAudit,
    "Something done in the guard-room console, or refused there: logins, alarm acknowledgements, opening the "
    "gate, config changes."))
