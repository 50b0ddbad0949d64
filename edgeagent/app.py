"""The composition root: builds everything from the config, wires it, runs it, stops it in order.

Nothing else constructs drivers: each capability in the registry (``edgeagent.capabilities``) is
built from its config section and devices, and the daemon runs what it offers (tasks under
supervision, commands, outputs, local actions, status). Start-up: outbox (recovering whatever was
unsent) → capabilities opened → uplink → capability tasks → alarms restored → health and control
→ READY=1. Shutdown (SIGTERM, the injected trigger, or a critical task that cannot recover),
time-boxed: stop intake (device tasks) → commit the outbox → let the uplink drain for
``flush_on_stop_s`` → offline status → disconnect → close the outbox. A critical failure ends
:meth:`Daemon.run` with ``exit_code`` 1, for systemd to restart the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from edgeagent import __version__
from edgeagent.capabilities import CAPABILITIES
from edgeagent.cloud_bridge.uplink import Uplink
from edgeagent.console import ConsoleContext, ConsoleServer, ConsoleTools
from edgeagent.control import SOCKET_NAME, ControlServer
from edgeagent.drivers.notifiers import NotifierHub
from edgeagent.health import HealthServer
from edgeagent.kernel.alarms.engine import AlarmConfig, AlarmEngine, EscalationLevel, KindPolicy
from edgeagent.kernel.alarms.kinds import AlarmKindSpec, collect_kinds
from edgeagent.kernel.alarms.notify_config import unserved
from edgeagent.kernel.alarms.runtime import AlarmRuntime
from edgeagent.kernel.capability import Capability, CapabilityContext, CapabilitySpec, LocalAction
from edgeagent.kernel.config.schema import Config, alarm_kind_issues
from edgeagent.kernel.errors import ConfigError, OutboxError, UplinkError
from edgeagent.kernel.local_actions import alarm_command, core_local_actions
from edgeagent.kernel.pipeline import clock_fix, evictions
from edgeagent.kernel.pipeline.commands import (
    CommandResult,
    CommandRouter,
    CommandService,
    CommandSpec,
    load_public_key,
)
from edgeagent.kernel.pipeline.event_types import (
    COMMAND_AUDIT,
    DEVICE_FAULT,
    GATEWAY_STARTED,
    GATEWAY_STOPPED,
    REGISTRY,
)
from edgeagent.kernel.pipeline.events import Event, EventFactory, utc_ms
from edgeagent.kernel.pipeline.outbox import Outbox, OutboxConfig
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.kernel.runtime.clock import Clock
from edgeagent.kernel.runtime.heartbeat import Heartbeat, export_gauges
from edgeagent.kernel.runtime.outputs import Outputs
from edgeagent.kernel.runtime.sdnotify import Notifier
from edgeagent.kernel.runtime.supervisor import SupervisionPolicy, Supervisor, TaskInfo

log = logging.getLogger(__name__)

RUNTIME_FILE = "runtime.json"
EXIT_CRITICAL_FAILURE = 1
STORAGE_WATCH_S = 1.0
STOP_STATS_TIMEOUT_S = 5.0


def alarm_kinds(capabilities: Sequence[CapabilitySpec[Any]] = CAPABILITIES) -> dict[str, AlarmKindSpec]:
    """Every capability's alarm kinds by name (ValueError when two declare one name)."""
    return collect_kinds((spec.name, spec.alarm_kinds) for spec in capabilities)


def alarm_config(cfg: Config, capabilities: Sequence[CapabilitySpec[Any]] = CAPABILITIES) -> AlarmConfig:
    """The engine's settings: the capabilities' kinds with the site's ``alarms:`` section over them.
    ConfigError (located at the key) for a policy of a kind no capability declares."""
    a = cfg.alarms
    try:
        kinds = alarm_kinds(capabilities)
    except ValueError as exc:  # two capabilities declare one kind
        raise ConfigError(f"alarm kinds: {exc}") from exc
    issues = alarm_kind_issues(a, kinds) + a.ladder_issues()
    if issues:
        raise ConfigError("\n".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in issues))

    def levels(items: Sequence[Any]) -> tuple[EscalationLevel, ...]:
        return tuple(EscalationLevel(lv.name, tuple(lv.targets)) for lv in items)

    try:
        return AlarmConfig(
            levels=levels(a.levels), kinds=kinds, ladders={name: levels(ladder) for name, ladder in a.ladders.items()},
            policies={kind: KindPolicy(p.severity, tuple(p.outputs), p.repeat_s, tuple(p.escalate_after_s),
                                       p.fold_window_s, p.ladder) for kind, p in a.policies.items()},
            fold_window_s=a.fold_window_s, output_pulse_s=a.output_pulse_s, include_names=a.include_names,
            message_names=a.message_names)
    except ValueError as exc:  # e.g. a capability's shipped policy names a ladder this site does not have
        raise ConfigError(f"alarms: {exc}") from exc


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


class Daemon:
    def __init__(
        self,
        cfg: Config,
        *,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
        environ: Mapping[str, str] | None = None,
        config_dir: Path | None = None,
        capabilities: Sequence[CapabilitySpec[Any]] = CAPABILITIES,
        console_tools: ConsoleTools | None = None,
    ) -> None:
        self.cfg = cfg
        self._console_tools = console_tools  # the CLI's config editor and checks, for the console's installer pages
        self.clock = clock or Clock(cfg.clock.sync)
        self.notifier = notifier or Notifier()
        self.state_dir = state_dir_for(cfg, environ)
        self.factory = EventFactory(REGISTRY, cfg.site_id, cfg.gateway_id, self.clock)
        cap_bytes = int(cfg.outbox.cap_mb * 1024 * 1024)
        self.evictions = evictions.EvictionReporter(self._emit, gateway_id=cfg.gateway_id, cap_bytes=cap_bytes,
                                                    min_interval_s=evictions.EVICTION_REPORT_MIN_S)
        self.outbox = Outbox(
            OutboxConfig(
                path=self.state_dir / "outbox.db",
                cap_bytes=cap_bytes,
                history_bytes=int(cfg.outbox.history_mb * 1024 * 1024),
                min_free_bytes=int(cfg.outbox.min_free_mb * 1024 * 1024),
                durability=cfg.outbox.durability,
                on_corrupt="quarantine",
            ),
            on_evicted=self.evictions.on_evicted,
            on_dead_lettered=self.evictions.on_dead_lettered,
        )
        self.sink = EventSink(self.factory, self.outbox)
        self.router = CommandRouter()
        self.outputs = Outputs()
        self._names: dict[str, str] = {}
        self._actions: dict[str, LocalAction] = {}  # every capability's local actions, for rules (see _start)
        self.alarms = AlarmRuntime(AlarmEngine(alarm_config(cfg, capabilities), names=self._names.get), sink=self.sink,
                                   state=self.outbox, outputs=self.outputs, notifiers=None, clock=self.clock)
        ctx = CapabilityContext(site_id=cfg.site_id, gateway_id=cfg.gateway_id, sink=self.sink, outputs=self.outputs,
                                alarms=self.alarms, state=self.outbox, clock=self.clock, state_dir=self.state_dir,
                                config_dir=config_dir, names=self._names, local_actions=self._actions)
        # Built now (nothing runs yet): a bad device profile or section is a config error before start.
        self.capabilities: list[Capability] = []
        self._raises_alarms: list[str] = []  # running capabilities that declare alarm kinds
        for spec in capabilities:
            cap = spec.build(spec.section_of(cfg), spec.devices_of(cfg), ctx)
            if cap is not None:
                self.capabilities.append(cap)
                if spec.alarm_kinds:
                    self._raises_alarms.append(spec.name)
        self._check_claims()
        self.uplink: Uplink | None = None
        self.supervisor: Supervisor | None = None
        self.health: HealthServer | None = None
        self.notifiers: NotifierHub | None = None
        self.control: ControlServer | None = None
        self.console: ConsoleServer | None = None
        self.heartbeat: Heartbeat | None = None
        self.started_mono = time.monotonic()
        self.ready = asyncio.Event()
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._stop_reason = "stop requested"
        self._intake: list[str] = []  # device tasks: stopped first on shutdown
        self.router.register(CommandSpec("gateway.ping", self._ping, description="liveness check"))
        self.router.register(CommandSpec("gateway.status", self._status_cmd, description="the status snapshot"))
        self.router.register(alarm_command(self.alarms))

    def _check_claims(self) -> None:
        """Every enabled device is run by exactly one capability, or the config is refused."""
        claims: dict[str, list[str]] = {}
        for cap in self.capabilities:
            for dev_id in cap.claimed_devices():
                claims.setdefault(dev_id, []).append(cap.name)
        problems = []
        for i, dev in enumerate(self.cfg.devices):
            if not dev.enabled:
                continue
            owners = claims.get(dev.id, [])
            kind = getattr(dev, "type", "?")
            if not owners:
                problems.append(f"devices[{i}] ({dev.id}, type {kind}): no capability runs this device "
                                "(is its section disabled or missing?)")
            elif len(owners) > 1:
                problems.append(f"devices[{i}] ({dev.id}, type {kind}): claimed by {', '.join(owners)}")
        if problems:
            raise ConfigError("\n".join(problems))

    def capability(self, name: str) -> Capability | None:
        return next((c for c in self.capabilities if c.name == name), None)

    @property
    def modbus(self) -> Any:
        """The Modbus service, if Modbus devices are configured (for tests and benchmarks)."""
        cap = self.capability("modbus")
        return getattr(cap, "service", None)

    @property
    def wristbands(self) -> Any:
        cap = self.capability("wristbands")
        return getattr(cap, "service", None)

    # --- control -----------------------------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested", exit_code: int = 0) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
        self.exit_code = max(self.exit_code, exit_code)
        self._stop.set()

    def register_command(self, spec: CommandSpec) -> None:
        self.router.register(spec)

    async def _emit(self, type_name: str, device_id: str, data: Mapping[str, Any]) -> object:
        return await self.sink.emit(type_name, device_id, data)

    def _notifier_hub(self) -> NotifierHub:
        targets = self.alarms.engine.config.all_targets()
        # Targets a capability tells itself (the guard-room topic tells 'guard_room') need no notifier.
        missing = [t for t in unserved(self.cfg.notifiers, targets) if t not in self.alarms.local_targets]
        if missing and self._raises_alarms:  # any capability that can raise one (wristbands, cameras, chargers)
            log.warning("alarm targets with no notifier: %s (alarms of %s; only the guard-room topic and outputs "
                        "will tell anyone); add them under 'notifiers'", ", ".join(sorted(missing)),
                        ", ".join(self._raises_alarms))
        return NotifierHub.from_config(self.cfg.notifiers, publish=self._publish_local)

    async def _publish_local(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """The box's own broker, for MQTT notifiers (through a capability's session to it)."""
        for cap in self.capabilities:
            if await cap.publish_local(topic, payload, qos=qos, retain=retain):
                return
        raise UplinkError("the local broker is not connected")

    async def run(self, shutdown_trigger: Callable[[], Awaitable[object]] | None = None) -> int:
        """Run until stopped; returns the exit code (non-zero after a critical failure)."""
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        if shutdown_trigger is None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
                    installed.append(sig)
        try:
            async with self.outbox, contextlib.AsyncExitStack() as caps:
                for cap in self.capabilities:
                    await caps.enter_async_context(cap)
                async with self._notifier_hub() as hub, asyncio.TaskGroup() as tg:
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
                    await self._shutdown()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            self._remove_runtime_file()
        return self.exit_code

    # --- start-up ----------------------------------------------------------------------------------

    async def _start(self, tg: asyncio.TaskGroup) -> None:
        cfg = self.cfg
        log.info("edgeagent %s starting: site %s, gateway %s, state in %s; capabilities: %s", __version__,
                 cfg.site_id, cfg.gateway_id, self.state_dir, ", ".join(c.name for c in self.capabilities) or "none")
        if self.outbox.recovered_unsent:
            log.info("outbox: %d unsent events recovered from the last run", self.outbox.recovered_unsent)
        if not self.clock.synced:
            log.warning("clock not synchronised yet: event times are marked and corrected once it is")
        s = cfg.supervisor
        sup = self.supervisor = Supervisor(
            tg, policy=SupervisionPolicy(
                intensity=s.restart_intensity, window_s=s.restart_window_s, backoff_cap_s=s.backoff_cap_s,
                retry_failed_after_s=s.retry_failed_after_s, stable_after_s=s.stable_after_s,
                critical_unhealthy_after_s=s.critical_unhealthy_after_s,
                critical_give_up_after_s=s.critical_give_up_after_s),
            on_give_up=self._on_give_up, on_critical_failure=self._on_critical_failure)
        try:
            await self.sink.emit(GATEWAY_STARTED.name, cfg.gateway_id, {
                "version": __version__, "boot_id": self.clock.boot_id,
                "recovered_unsent": self.outbox.recovered_unsent,
                "outbox_reset": self.outbox.quarantined is not None})
        except OutboxError as exc:  # a full disk must not keep the alarms from starting
            log.error("gateway.started not stored: %s", exc)
        if cfg.uplink is not None and cfg.uplink.enabled:
            commands = self._command_service() if cfg.commands.enabled else None
            self.uplink = Uplink(cfg.uplink, site_id=cfg.site_id, gateway_id=cfg.gateway_id, outbox=self.outbox,
                                 version=__version__, commands=commands)
            sup.start("uplink", self.uplink.run, critical=True)
        else:
            log.warning("no uplink configured: events stay in the outbox")
        for cap in self.capabilities:
            for spec in cap.commands():
                self.router.register(spec)
            for name, out in cap.outputs().items():
                if name not in self.outputs:
                    self.outputs.register(name, out)
        self._actions.update(self._local_actions())  # before the tasks: a rule may act at its first frame
        for cap in self.capabilities:
            for task in cap.tasks():
                if not task.critical:
                    self._intake.append(task.name)
                sup.start(task.name, task.run, critical=task.critical)
        await self.alarms.restore()  # alarms active before a restart sound and notify again
        sup.start("alarms", self.alarms.run, critical=True)
        sup.start("storage", self._watch_storage, critical=True)
        sup.start("evictions", self.evictions.run)
        fixer = clock_fix.ClockFixer(self.clock, self.outbox, self._emit, gateway_id=cfg.gateway_id,
                                     poll_s=clock_fix.CLOCK_POLL_S)
        sup.start("clock", fixer.run)
        self.heartbeat = Heartbeat(self.outbox, self.notifier, sup.problem)
        sup.start("heartbeat", self.heartbeat.run)
        if cfg.health.enabled:
            self.health = HealthServer(cfg.health.host, cfg.health.port, self)
            await self.health.start()
        runtime_dir = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        self.control = ControlServer(Path(runtime_dir or self.state_dir) / SOCKET_NAME, dict(self._actions))
        await self.control.start()
        if cfg.console is not None and cfg.console.enabled:
            self.console = ConsoleServer(cfg.console, self._console_context())
            await self.console.start()
        self._write_runtime_file()
        # Start-up objects live for the whole run: keep them out of the collector, whose full passes
        # otherwise pause the loop for ~40 ms (measured in bench/alarm_latency.py).
        gc.collect()
        gc.freeze()
        self.ready.set()
        self.notifier.ready()
        self.notifier.status(f"running; {len(self._intake)} device tasks")

    def _command_service(self) -> CommandService:
        keys = {kid: load_public_key(path) for kid, path in self.cfg.commands.public_keys.items()}
        if not keys:
            log.warning("commands: no platform public key configured; every command will be rejected")
        return CommandService(
            site_id=self.cfg.site_id, gateway_id=self.cfg.gateway_id, keys=keys, router=self.router,
            claim_nonce=self.outbox.claim_nonce, claim_command=self.outbox.claim_command, now=self.clock.now,
            clock_synced=lambda: self.clock.synced,
            audit=self._audit_command, max_ttl_s=self.cfg.commands.max_ttl_s,
            clock_skew_s=self.cfg.commands.clock_skew_s, max_concurrent=self.cfg.commands.max_concurrent)

    def _console_context(self) -> ConsoleContext:
        cams = getattr(self.cfg, "cameras", None)  # where camera evidence is kept, if cameras are configured
        evidence = getattr(getattr(cams, "evidence", None), "dir", None)
        return ConsoleContext(
            site_id=self.cfg.site_id, gateway_id=self.cfg.gateway_id, state_dir=self.state_dir, sink=self.sink,
            alarms=self.alarms, actions=self._actions, status=self.status, devices=self.cfg.devices, names=self._names,
            evidence_dirs=[p for p in (evidence, self.state_dir / "evidence") if p is not None],
            tools=self._console_tools)

    def _local_actions(self) -> dict[str, LocalAction]:
        """What the CLI may do through the control socket; the caller's user is recorded as ``by``."""
        actions = core_local_actions(self.outputs, self.alarms)
        for cap in self.capabilities:
            for name, action in cap.local_actions().items():
                if name in actions:
                    raise ConfigError(f"local action {name!r} of {cap.name} is already taken")
                actions[name] = action
        return actions

    async def _ping(self, _args: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"pong": True, "version": __version__, "at": utc_ms(self.clock.now())}

    async def _status_cmd(self, _args: Mapping[str, Any]) -> Mapping[str, Any]:
        return await self.status()

    async def _audit_command(self, result: CommandResult) -> None:
        try:
            await self.sink.emit(COMMAND_AUDIT.name, self.cfg.gateway_id, {
                "command_id": result.command_id or "?", "command": result.command or "?",
                "outcome": result.status, "error": None if result.error_code is None
                else f"{result.error_code}: {result.error_message}", "issuer": result.issuer})
        except OutboxError as exc:
            log.error("command audit not stored: %s", exc)

    async def _on_give_up(self, info: TaskInfo) -> None:
        # Raising keeps the report pending in the supervisor, which retries it until it is stored.
        device_id = info.name.split(":", 1)[1] if ":" in info.name else self.cfg.gateway_id
        await self.sink.emit(DEVICE_FAULT.name, device_id, {
            "task": info.name, "error": info.last_error or "?", "restarts": info.restarts})

    async def _watch_storage(self) -> None:
        """The outbox as a critical part: while its writes keep failing (an SD card fault), this task
        fails too, so the supervisor's bounds apply: health false after critical_unhealthy_after_s, an
        orderly non-zero exit after critical_give_up_after_s. Alarms keep running locally meanwhile."""
        while True:
            await asyncio.sleep(STORAGE_WATCH_S)
            since = self.outbox.write_failing_since
            if since is not None:
                raise OutboxError(f"outbox writes failing for {time.monotonic() - since:.0f} s")

    def _on_critical_failure(self, info: TaskInfo) -> None:
        self.request_stop(f"critical task {info.name} cannot recover: {info.last_error}", EXIT_CRITICAL_FAILURE)

    # --- health and status -------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        if self.heartbeat is None:
            return (False, "starting") if not self.ready.is_set() else (True, "ok")
        return self.heartbeat.healthy()

    async def status(self) -> dict[str, Any]:
        stats = await self.outbox.stats()
        if self.heartbeat is not None:
            self.heartbeat.last_stats = stats
        export_gauges(stats)
        healthy, why = self.healthy()
        caps = {c.name: c.status() for c in self.capabilities}
        lag = self.heartbeat.progress.loop_lag_s if self.heartbeat is not None else 0.0
        return {
            "version": __version__, "site_id": self.cfg.site_id, "gateway_id": self.cfg.gateway_id,
            "pid": os.getpid(), "uptime_s": round(time.monotonic() - self.started_mono, 1),
            "healthy": healthy, "health_detail": why, "clock_synced": self.clock.synced,
            "loop_lag_ms": round(lag * 1000, 1),
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
            "capabilities": sorted(caps),
            "devices": caps.get("modbus") or [],
            "alarms": [{"id": al.id, "kind": al.kind, "state": al.state.value, "resident_id": al.resident_id,
                        "place": al.place, "device_id": al.device_id,
                        "count": al.count, "level": al.level} for al in self.alarms.engine.active()],
            "alarm_store": {"not_durable": self.alarms.not_durable, "unstored_dropped": self.alarms.unstored_dropped},
            "outputs": self.outputs.snapshot(),
            "wristbands": caps.get("wristbands"),
            "notifiers": self.notifiers.snapshot() if self.notifiers is not None else None,
        } | {name: value for name, value in caps.items() if name not in ("modbus", "wristbands", "sim")}

    # --- shutdown ------------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
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
        if self.console is not None:
            await self.console.stop()
        if self.health is not None:
            await self.health.stop()
        if self.control is not None:
            await self.control.stop()
        await self.outputs.close()

    async def _orderly_stop(self, reason: str) -> None:
        sup = self.supervisor
        assert sup is not None
        await sup.stop_all(self._intake)  # 1. stop intake
        self.sink.flush_telemetry()  # readings gathered for the next batch go in with the rest
        await sup.stop_all(["evictions"])
        if not await self.evictions.flush():
            log.error("evictions not reported before the stop (kept for the next start's log only)")
        try:
            try:
                stats = await asyncio.wait_for(self.outbox.stats(), STOP_STATS_TIMEOUT_S)
                unsent = sum(c.unsent for c in stats.classes.values())
            except (OutboxError, TimeoutError) as exc:  # the stop record matters more than its count
                log.warning("outbox stats unavailable at stop (%s); the last known count is reported", exc)
                last = self.heartbeat.last_stats if self.heartbeat is not None else None
                unsent = sum(c.unsent for c in last.classes.values()) if last is not None else 0
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
        # A fresh temporary name (O_EXCL): a link planted in the state directory is never written through.
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=f".{RUNTIME_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                os.fchmod(fh.fileno(), 0o644)
                fh.write(json.dumps(info))
            Path(tmp).replace(path)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
            raise

    def _remove_runtime_file(self) -> None:
        path = self.state_dir / RUNTIME_FILE
        with contextlib.suppress(OSError):
            info = json.loads(path.read_text(encoding="utf-8"))
            if info.get("pid") == os.getpid():
                path.unlink()
