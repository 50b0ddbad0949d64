"""The composition root: builds everything from the config, wires it, runs it, stops it in order.

Nothing else constructs drivers. Start-up: outbox (recovering whatever was unsent) → uplink →
drivers → health → READY=1. Shutdown (SIGTERM or the injected trigger), time-boxed: stop intake
(drivers) → commit the outbox → let the uplink drain for ``flush_on_stop_s`` → offline status →
disconnect → close the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeagent import __version__
from edgeagent.cloud_bridge.uplink import Uplink
from edgeagent.control import SOCKET_NAME, ControlServer
from edgeagent.drivers.modbus.service import ModbusService
from edgeagent.drivers.notifiers import NotifierHub
from edgeagent.drivers.sim.devices import SimContact, SimPanic, SimSensor
from edgeagent.drivers.wristband.service import WristbandService
from edgeagent.health import HealthServer
from edgeagent.kernel.alarms.engine import AlarmConfig, AlarmEngine, AlarmError, AlarmKind, EscalationLevel, KindPolicy
from edgeagent.kernel.alarms.notify_config import unserved
from edgeagent.kernel.alarms.runtime import AlarmRuntime
from edgeagent.kernel.config.schema import Config, DeviceBase
from edgeagent.kernel.errors import CommandRejected, OutboxError, UplinkError
from edgeagent.kernel.pipeline.commands import (
    CommandResult,
    CommandRouter,
    CommandService,
    CommandSpec,
    load_public_key,
)
from edgeagent.kernel.pipeline.event_types import (
    CLOCK_SYNCED,
    COMMAND_AUDIT,
    DEVICE_FAULT,
    GATEWAY_STARTED,
    GATEWAY_STOPPED,
    OUTBOX_EVICTED,
    REGISTRY,
)
from edgeagent.kernel.pipeline.events import Event, EventFactory, utc_ms
from edgeagent.kernel.pipeline.outbox import EvictionReport, Outbox, OutboxConfig, OutboxStats
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.kernel.runtime import metrics
from edgeagent.kernel.runtime.clock import Clock
from edgeagent.kernel.runtime.outputs import Outputs
from edgeagent.kernel.runtime.sdnotify import Notifier
from edgeagent.kernel.runtime.supervisor import Supervisor, TaskInfo

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
CLOCK_POLL_S = 10.0
EVICTION_REPORT_MIN_S = 5.0
# The outbox is judged stuck when events wait and nothing was committed for this long.
COMMIT_STALL_S = 30.0
LOOP_LAG_LIMIT_S = 5.0
RUNTIME_FILE = "runtime.json"
ArgsT = TypeVar("ArgsT", bound=BaseModel)


class Driver(Protocol):
    async def run(self) -> None: ...


DriverFactory = Callable[[Any, EventSink], Driver]
# The explicit registry of driver implementations, by config ``type``.
DRIVERS: dict[str, DriverFactory] = {
    "sim.sensor": SimSensor,
    "sim.contact": SimContact,
    "sim.panic": SimPanic,
}


class _LocalArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalGateArgs(_LocalArgs):
    device_id: str
    command: Literal["open", "close", "hold_open", "release"] = "open"
    reason: Literal["plate_match", "guard_room", "cloud_command", "visitor"] = "guard_room"
    note: str | None = Field(default=None, max_length=200)


class LocalResetArgs(_LocalArgs):
    device_id: str
    port: int | None = Field(default=None, ge=1, le=64)


class LocalAlarmArgs(_LocalArgs):
    alarm_id: str
    action: Literal["ack", "resolve"] = "ack"
    by: str | None = Field(default=None, max_length=64, description="who (default: the calling user)")
    note: str | None = Field(default=None, max_length=500)


class CloudAlarmArgs(_LocalArgs):
    alarm_id: str
    action: Literal["ack", "resolve"] = "ack"
    by: str = Field(min_length=1, max_length=64, description="the operator on the platform")
    note: str | None = Field(default=None, max_length=500)


def alarm_config(cfg: Config) -> AlarmConfig:
    a = cfg.alarms
    return AlarmConfig(
        levels=tuple(EscalationLevel(lv.name, tuple(lv.targets)) for lv in a.levels),
        policies={AlarmKind(kind): KindPolicy(p.severity, tuple(p.outputs), p.repeat_s, tuple(p.escalate_after_s),
                                              p.fold_window_s) for kind, p in a.policies.items()},
        fold_window_s=a.fold_window_s, output_pulse_s=a.output_pulse_s, include_names=a.include_names,
        message_names=a.message_names)


class LocalOutputArgs(_LocalArgs):
    name: str
    action: Literal["on", "off", "pulse"]
    seconds: float = Field(default=5.0, gt=0, le=3600)


def _validate(model: type[ArgsT], args: Mapping[str, Any]) -> ArgsT:
    try:
        return model.model_validate(dict(args))
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        raise CommandRejected("bad_args", f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def echo_to(stream: TextIO) -> Callable[[Event, int], None]:
    """An observer that writes each durable event's envelope as one JSON line."""

    def observer(event: Event, seq: int) -> None:
        stream.write(event.to_json(seq).decode() + "\n")
        stream.flush()

    return observer


def state_dir_for(cfg: Config, environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    override = env.get("STATE_DIRECTORY")
    return Path(override.split(":")[0]) if override else cfg.state_dir


@dataclass
class Progress:
    """What the watchdog judges liveness by."""

    loop_lag_s: float = 0.0
    last_beat: float = 0.0


class Daemon:
    def __init__(
        self,
        cfg: Config,
        *,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
        environ: Mapping[str, str] | None = None,
        config_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock or Clock(cfg.clock.sync)
        self.notifier = notifier or Notifier()
        self.state_dir = state_dir_for(cfg, environ)
        self.factory = EventFactory(REGISTRY, cfg.site_id, cfg.gateway_id, self.clock)
        self.outbox = Outbox(
            OutboxConfig(
                path=self.state_dir / "outbox.db",
                cap_bytes=int(cfg.outbox.cap_mb * 1024 * 1024),
                history_bytes=int(cfg.outbox.history_mb * 1024 * 1024),
                min_free_bytes=int(cfg.outbox.min_free_mb * 1024 * 1024),
                durability=cfg.outbox.durability,
                on_corrupt="quarantine",
            ),
            on_evicted=self._on_evicted,
        )
        self.sink = EventSink(self.factory, self.outbox)
        self.router = CommandRouter()
        self.outputs = Outputs()
        # Builds nothing yet, but resolves every device profile now: a bad one is a config error.
        self.modbus = ModbusService(cfg, self.sink, state=self.outbox, config_dir=config_dir)
        names = {r.id: r.name for r in (cfg.wristbands.residents if cfg.wristbands else []) if r.name}
        self.alarms = AlarmRuntime(AlarmEngine(alarm_config(cfg), names=names.get), sink=self.sink,
                                   state=self.outbox, outputs=self.outputs, notifiers=None, clock=self.clock)
        self.wristbands: WristbandService | None = None
        if cfg.wristbands is not None and cfg.wristbands.enabled:
            self.wristbands = WristbandService(cfg.wristbands, self.sink, self.alarms,
                                               client_id=f"edgeagent-{cfg.gateway_id}-wristbands")
            self.alarms.listen(self.wristbands.publish_change)
        self.uplink: Uplink | None = None
        self.supervisor: Supervisor | None = None
        self.health: HealthServer | None = None
        self.notifiers: NotifierHub | None = None
        self.control: ControlServer | None = None
        self.progress = Progress()
        self.started_mono = time.monotonic()
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._stop_reason = "stop requested"
        self._evictions = EvictionReport()
        self._eviction_total = 0
        self._eviction_task: asyncio.Task[None] | None = None
        self._last_stats: OutboxStats | None = None
        self._driver_names: list[str] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._register_builtin_commands()

    # --- control -----------------------------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        self._stop_reason = reason
        self._stop.set()

    def _notifier_hub(self) -> NotifierHub:
        targets = {t for lv in self.cfg.alarms.levels for t in lv.targets}
        missing = unserved(self.cfg.notifiers, targets)
        if missing and self.cfg.wristbands is not None:
            log.warning("alarm targets with no notifier: %s (only the guard-room topic and outputs will tell "
                        "anyone); add them under 'notifiers'", ", ".join(sorted(missing)))
        return NotifierHub.from_config(self.cfg.notifiers, publish=self._publish_local)

    async def _publish_local(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """The box's own broker, for MQTT notifiers (through the wristband input's connection)."""
        session = self.wristbands.session if self.wristbands is not None else None
        if session is None:
            raise UplinkError("the local broker is not connected")
        await session.publish(topic, payload, qos=qos, retain=retain)

    def register_command(self, spec: CommandSpec) -> None:
        self.router.register(spec)

    async def run(self, shutdown_trigger: Callable[[], Awaitable[object]] | None = None) -> None:
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        if shutdown_trigger is None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
                    installed.append(sig)
        try:
            async with self.outbox, self.modbus, self._notifier_hub() as hub, asyncio.TaskGroup() as tg:
                self.notifiers = hub
                self.alarms.set_notifiers(hub)
                await self._start(tg)
                trigger = asyncio.ensure_future(shutdown_trigger()) if shutdown_trigger else None
                stopper = asyncio.ensure_future(self._stop.wait())
                waiters = [w for w in (trigger, stopper) if w is not None]
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                if trigger is not None and trigger.done() and not self._stop.is_set():
                    self._stop_reason = "shutdown trigger"
                await self._shutdown(tg)
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            self._remove_runtime_file()

    # --- start-up ----------------------------------------------------------------------------------

    async def _start(self, tg: asyncio.TaskGroup) -> None:
        cfg = self.cfg
        log.info("edgeagent %s starting: site %s, gateway %s, state in %s", __version__, cfg.site_id,
                 cfg.gateway_id, self.state_dir)
        if self.outbox.recovered_unsent:
            log.info("outbox: %d unsent events recovered from the last run", self.outbox.recovered_unsent)
        if not self.clock.synced:
            log.warning("clock not synchronised yet: event times are marked and corrected once it is")
        self.supervisor = Supervisor(
            tg, intensity=cfg.supervisor.restart_intensity, window_s=cfg.supervisor.restart_window_s,
            backoff_cap_s=cfg.supervisor.backoff_cap_s, on_give_up=self._on_give_up)
        await self.sink.emit(GATEWAY_STARTED.name, cfg.gateway_id, {
            "version": __version__, "boot_id": self.clock.boot_id,
            "recovered_unsent": self.outbox.recovered_unsent, "outbox_reset": self.outbox.quarantined is not None})
        if cfg.uplink is not None and cfg.uplink.enabled:
            commands = self._command_service() if cfg.commands.enabled else None
            self.uplink = Uplink(cfg.uplink, site_id=cfg.site_id, gateway_id=cfg.gateway_id, outbox=self.outbox,
                                 version=__version__, commands=commands)
            self.supervisor.start("uplink", self.uplink.run)
        else:
            log.warning("no uplink configured: events stay in the outbox")
        for dev in cfg.devices:
            if dev.enabled and dev.type in DRIVERS:
                self._start_driver(dev)
        self.modbus.register_commands(self.router)
        self.modbus.register_outputs(self.outputs)
        await self.alarms.restore()  # alarms active before a restart sound and notify again
        self.supervisor.start("alarms", self.alarms.run)
        if self.wristbands is not None:
            self.supervisor.start("wristbands", self.wristbands.run)
        for name, run in self.modbus.driver_tasks():
            self._driver_names.append(name)
            self.supervisor.start(name, run)
        if cfg.health.enabled:
            self.health = HealthServer(cfg.health.host, cfg.health.port, self)
            await self.health.start()
        runtime_dir = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        self.control = ControlServer(Path(runtime_dir or self.state_dir) / SOCKET_NAME, self._local_actions())
        await self.control.start()
        self._heartbeat_task = tg.create_task(self._heartbeat(), name="heartbeat")
        self._write_runtime_file()
        # Start-up objects live for the whole run: keep them out of the collector, whose full passes
        # otherwise pause the loop for ~40 ms (measured in bench/alarm_latency.py).
        gc.collect()
        gc.freeze()
        self.ready.set()
        self.notifier.ready()
        self.notifier.status(f"running; {len(self._driver_names)} drivers")

    def _start_driver(self, dev: DeviceBase) -> None:
        assert self.supervisor is not None
        factory = DRIVERS[dev.type]  # type: ignore[attr-defined]  # every DeviceConfig member has `type`
        driver = factory(dev, self.sink)
        name = f"device:{dev.id}"
        self._driver_names.append(name)
        self.supervisor.start(name, driver.run)

    def _command_service(self) -> CommandService:
        keys = {kid: load_public_key(path) for kid, path in self.cfg.commands.public_keys.items()}
        if not keys:
            log.warning("commands: no platform public key configured; every command will be rejected")
        return CommandService(
            site_id=self.cfg.site_id, gateway_id=self.cfg.gateway_id, keys=keys, router=self.router,
            claim_nonce=self.outbox.claim_nonce, now=self.clock.now, clock_synced=lambda: self.clock.synced,
            audit=self._audit_command, max_ttl_s=self.cfg.commands.max_ttl_s,
            clock_skew_s=self.cfg.commands.clock_skew_s, max_concurrent=self.cfg.commands.max_concurrent)

    def _local_actions(self) -> dict[str, Any]:
        """What the CLI may do through the control socket; the caller's user is recorded as ``by``."""

        async def gate(args: Mapping[str, Any], who: str) -> Mapping[str, Any]:
            a = _validate(LocalGateArgs, args)
            return await self.modbus.gate(a.device_id, a.command, reason=a.reason, by=who, via="cli", note=a.note)

        async def charger_reset(args: Mapping[str, Any], who: str) -> Mapping[str, Any]:
            a = _validate(LocalResetArgs, args)
            return await self.modbus.reset_lockout(a.device_id, a.port, by=who, via="cli")

        async def output(args: Mapping[str, Any], who: str) -> Mapping[str, Any]:
            a = _validate(LocalOutputArgs, args)
            try:
                if a.action == "pulse":
                    await self.outputs.pulse(a.name, a.seconds)
                else:
                    await self.outputs.set(a.name, a.action == "on")
            except KeyError as exc:
                raise CommandRejected("bad_args", str(exc.args[0])) from exc
            log.info("output %s %s by %s", a.name, a.action, who)
            return {"output": a.name, "action": a.action}

        async def alarms_list(_args: Mapping[str, Any], _who: str) -> Mapping[str, Any]:
            return {"alarms": [a.to_json() for a in self.alarms.engine.active()]}

        async def alarm_ack(args: Mapping[str, Any], who: str) -> Mapping[str, Any]:
            a = _validate(LocalAlarmArgs, args)
            try:
                if a.action == "resolve":
                    await self.alarms.resolve(a.alarm_id, a.by or who, "cli", a.note)
                else:
                    await self.alarms.ack(a.alarm_id, a.by or who, "cli")
            except AlarmError as exc:
                raise CommandRejected("failed", str(exc)) from exc
            return {"alarm_id": a.alarm_id, "action": a.action, "by": a.by or who}

        return {"gate": gate, "charger-reset": charger_reset, "output": output, "alarms": alarms_list,
                "alarm": alarm_ack}

    def _register_builtin_commands(self) -> None:
        async def ping(_args: Mapping[str, Any]) -> Mapping[str, Any]:
            return {"pong": True, "version": __version__, "at": utc_ms(self.clock.now())}

        async def status(_args: Mapping[str, Any]) -> Mapping[str, Any]:
            return await self.status()

        async def alarm_cmd(args: Mapping[str, Any]) -> Mapping[str, Any]:
            a = CloudAlarmArgs.model_validate(dict(args))
            try:
                if a.action == "resolve":
                    await self.alarms.resolve(a.alarm_id, a.by, "cloud", a.note)
                else:
                    await self.alarms.ack(a.alarm_id, a.by, "cloud")
            except AlarmError as exc:
                raise CommandRejected("failed", str(exc)) from exc
            return {"alarm_id": a.alarm_id, "action": a.action}

        self.router.register(CommandSpec("alarm.handle", alarm_cmd, CloudAlarmArgs,
                                         "acknowledge or resolve an alarm from the platform"))
        self.router.register(CommandSpec("gateway.ping", ping, description="liveness check"))
        self.router.register(CommandSpec("gateway.status", status, description="the status snapshot"))

    async def _audit_command(self, result: CommandResult) -> None:
        try:
            await self.sink.emit(COMMAND_AUDIT.name, self.cfg.gateway_id, {
                "command_id": result.command_id or "?", "command": result.command or "?",
                "outcome": result.status, "error": None if result.error_code is None
                else f"{result.error_code}: {result.error_message}", "issuer": result.issuer})
        except OutboxError as exc:
            log.error("command audit not stored: %s", exc)

    async def _on_give_up(self, info: TaskInfo) -> None:
        device_id = info.name.split(":", 1)[1] if ":" in info.name else self.cfg.gateway_id
        await self.sink.emit(DEVICE_FAULT.name, device_id, {
            "task": info.name, "error": info.last_error or "?", "restarts": info.restarts})

    # --- eviction reports, clock, heartbeat --------------------------------------------------------

    def _on_evicted(self, report: EvictionReport, total: int) -> None:
        ev = self._evictions
        ev.telemetry += report.telemetry
        ev.event += report.event
        if report.first_seq is not None:
            ev.first_seq = report.first_seq if ev.first_seq is None else min(ev.first_seq, report.first_seq)
        if report.last_seq is not None:
            ev.last_seq = report.last_seq if ev.last_seq is None else max(ev.last_seq, report.last_seq)
        self._eviction_total = total
        log.warning("outbox over its cap: evicted %d telemetry and %d events", report.telemetry, report.event)
        if self._eviction_task is None or self._eviction_task.done():
            self._eviction_task = asyncio.get_running_loop().create_task(self._report_evictions())

    async def _report_evictions(self) -> None:
        # Coalesce a burst of evictions into one report, at most every EVICTION_REPORT_MIN_S.
        await asyncio.sleep(0 if self._stop.is_set() else EVICTION_REPORT_MIN_S)
        ev, self._evictions = self._evictions, EvictionReport()
        if not ev:
            return
        with contextlib.suppress(OutboxError):
            await self.sink.emit(OUTBOX_EVICTED.name, self.cfg.gateway_id, {
                "evicted_telemetry": ev.telemetry, "evicted_event": ev.event,
                "first_seq": ev.first_seq or 0, "last_seq": ev.last_seq or 0,
                "total_evicted": self._eviction_total, "cap_bytes": int(self.cfg.outbox.cap_mb * 1024 * 1024)})

    async def _on_clock_synced(self) -> None:
        now_mono = self.clock.monotonic_ns()
        wall = self.clock.now()
        corrected, sent = await self.outbox.correct_clock(
            self.clock.boot_id, lambda mono: utc_ms(self.clock.corrected_wall(mono)))
        log.info("clock synchronised; corrected %d unsent event times (%d were sent uncorrected)", corrected, sent)
        await self.sink.emit(CLOCK_SYNCED.name, self.cfg.gateway_id, {
            "boot_id": self.clock.boot_id, "monotonic_ms": now_mono // 1_000_000, "wall_at_sync": utc_ms(wall),
            "corrected_unsent": corrected, "sent_uncorrected": sent})

    async def _heartbeat(self) -> None:
        """Loop lag, outbox progress, gauges, clock sync; WATCHDOG=1 only while all is well."""
        loop = asyncio.get_running_loop()
        last_clock_poll = 0.0
        beats = 0
        while True:
            t0 = loop.time()
            await asyncio.sleep(HEARTBEAT_S)
            lag = max(0.0, loop.time() - t0 - HEARTBEAT_S)
            self.progress.loop_lag_s = lag
            self.progress.last_beat = time.monotonic()
            metrics.LOOP_LAG.set(lag)
            beats += 1
            if time.monotonic() - last_clock_poll >= CLOCK_POLL_S:
                last_clock_poll = time.monotonic()
                if self.clock.poll():
                    with contextlib.suppress(OutboxError):
                        await self._on_clock_synced()
            if beats % 5 == 0 or self._last_stats is None:
                with contextlib.suppress(OutboxError):
                    self._last_stats = await asyncio.wait_for(self.outbox.stats(), 10)
                    self._export_gauges(self._last_stats)
            healthy, why = self.healthy()
            if healthy:
                self.notifier.watchdog()
            elif beats % 10 == 0:
                log.error("watchdog withheld: %s", why)

    def healthy(self) -> tuple[bool, str]:
        if not self.outbox.alive:
            return False, "outbox database thread is not running"
        if self.progress.loop_lag_s > LOOP_LAG_LIMIT_S:
            return False, f"event loop lagging {self.progress.loop_lag_s:.1f} s"
        stats = self._last_stats
        if (stats is not None and self.outbox.pending_events > 0 and stats.last_commit_age_s is not None
                and stats.last_commit_age_s > COMMIT_STALL_S):
            return False, f"no outbox commit for {stats.last_commit_age_s:.0f} s with events waiting"
        if self.progress.last_beat and time.monotonic() - self.progress.last_beat > 10 * HEARTBEAT_S:
            return False, "heartbeat stalled"
        return True, "ok"

    @staticmethod
    def _export_gauges(stats: OutboxStats) -> None:
        for label, cs in stats.classes.items():
            metrics.OUTBOX_UNSENT.labels(label).set(cs.unsent)
            metrics.OUTBOX_UNSENT_BYTES.labels(label).set(cs.unsent_bytes)
            metrics.OUTBOX_OLDEST_AGE.labels(label).set(cs.oldest_unsent_age_s or 0)
        metrics.OUTBOX_EVICTED.set(stats.evicted_total)

    async def status(self) -> dict[str, Any]:
        stats = await self.outbox.stats()
        healthy, why = self.healthy()
        return {
            "version": __version__, "site_id": self.cfg.site_id, "gateway_id": self.cfg.gateway_id,
            "pid": os.getpid(), "uptime_s": round(time.monotonic() - self.started_mono, 1),
            "healthy": healthy, "health_detail": why, "clock_synced": self.clock.synced,
            "loop_lag_ms": round(self.progress.loop_lag_s * 1000, 1),
            "uplink": self.uplink.snapshot() if self.uplink is not None else {"state": "disabled"},
            "outbox": {
                "path": str(self.outbox.path), "db_bytes": stats.db_bytes, "next_seq": stats.next_seq,
                "evicted_total": stats.evicted_total, "coalesced_total": stats.coalesced_total,
                "intake_dropped_total": stats.intake_dropped_total, "history_rows": stats.history_rows,
                "classes": {k: {"unsent": v.unsent, "unsent_bytes": v.unsent_bytes,
                                "oldest_unsent_age_s": None if v.oldest_unsent_age_s is None
                                else round(v.oldest_unsent_age_s, 1)} for k, v in stats.classes.items()},
            },
            "tasks": self.supervisor.snapshot() if self.supervisor is not None else [],
            "devices": self.modbus.snapshot(),
            "alarms": [{"id": al.id, "kind": al.kind.value, "state": al.state.value, "resident_id": al.resident_id,
                        "count": al.count, "level": al.level} for al in self.alarms.engine.active()],
            "wristbands": dict(self.wristbands.snapshot()) if self.wristbands is not None else None,
            "notifiers": self.notifiers.snapshot() if self.notifiers is not None else None,
        }

    # --- shutdown ------------------------------------------------------------------------------------

    async def _shutdown(self, tg: asyncio.TaskGroup) -> None:
        del tg
        reason = self._stop_reason
        log.info("stopping (%s)", reason)
        self.notifier.stopping()
        budget = self.cfg.supervisor.shutdown_timeout_s
        try:
            await asyncio.wait_for(self._orderly_stop(reason), budget)
        except TimeoutError:
            log.error("orderly shutdown took longer than %.0f s; cancelling what is left", budget)
        if self.supervisor is not None:
            await self.supervisor.stop_all()
        if self.health is not None:
            await self.health.stop()
        if self.control is not None:
            await self.control.stop()
        await self.outputs.close()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()

    async def _orderly_stop(self, reason: str) -> None:
        sup = self.supervisor
        assert sup is not None
        await sup.stop_all(self._driver_names)  # 1. stop intake
        if self._eviction_task is not None and not self._eviction_task.done():
            self._eviction_task.cancel()
            await self._report_evictions()
        try:
            stats = await self.outbox.stats()
            unsent = sum(c.unsent for c in stats.classes.values())
            await self.sink.emit(GATEWAY_STOPPED.name, self.cfg.gateway_id, {"reason": reason, "unsent": unsent})
            await self.outbox.flush()  # 2. everything accepted is committed
        except OutboxError as exc:
            log.error("outbox unusable during shutdown: %s", exc)
        if self.uplink is not None and self.cfg.uplink is not None:  # 3. bounded drain, offline, disconnect
            drain = self.cfg.uplink.flush_on_stop_s
            await self.uplink.stop(drain)
            if not await sup.wait("uplink", drain + 5):
                log.warning("uplink did not finish within %.0f s; closing it", drain + 5)

    # --- runtime file for the CLI ------------------------------------------------------------------

    def _write_runtime_file(self) -> None:
        info = {"pid": os.getpid(), "started_at": utc_ms(self.clock.now()),
                "health_url": self.health.url if self.health is not None else None,
                "control_socket": str(self.control.path) if self.control is not None else None}
        path = self.state_dir / RUNTIME_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info), encoding="utf-8")
        tmp.replace(path)

    def _remove_runtime_file(self) -> None:
        path = self.state_dir / RUNTIME_FILE
        with contextlib.suppress(OSError):
            info = json.loads(path.read_text(encoding="utf-8"))
            if info.get("pid") == os.getpid():
                path.unlink()
