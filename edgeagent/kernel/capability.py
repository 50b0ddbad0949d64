"""The one interface a capability (Modbus, wristbands, cameras, the simulated devices) plugs in through.

A capability has two halves:

* a :class:`CapabilitySpec`, the static part the app layer lists in its registry
  (``edgeagent.capabilities``): the config section it owns, the device types it claims, the checks
  that span its section and its devices, the ``device add`` probes and the ``doctor`` checks. The
  CLI uses these without a running daemon;
* a :class:`Capability`, built by ``spec.build`` from its section, its devices and a
  :class:`CapabilityContext` (the kernel services it may use). Its lifecycle is an async context
  (``async with capability:`` opens buses and sessions, leaving closes them); inside it, the daemon
  asks it once for its tasks (run under supervision), commands, outputs, local control actions
  and, whenever someone asks, its status.

Every enabled device in the config is claimed by exactly one running capability, or the daemon
refuses the config with the device's location (see ``edgeagent.app``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from edgeagent.kernel.alarms.kinds import AlarmKindSpec
from edgeagent.kernel.alarms.runtime import AlarmRuntime
from edgeagent.kernel.config.schema import CoreConfig, DeviceBase, Issue
from edgeagent.kernel.errors import CommandRejected
from edgeagent.kernel.pipeline.commands import CommandSpec
from edgeagent.kernel.pipeline.sink import EventSink
from edgeagent.kernel.runtime.clock import Clock
from edgeagent.kernel.runtime.outputs import Output, Outputs

SectionT = TypeVar("SectionT", bound=BaseModel)
ArgsT = TypeVar("ArgsT", bound=BaseModel)

# A local control action (the ``edgeagent`` CLI through the control socket): validated arguments in,
# a JSON-able answer out; ``who`` is the calling user, recorded by the action.
LocalAction = Callable[[Mapping[str, Any], str], Awaitable[Mapping[str, Any]]]

# ``who`` of a local action called by a rule on the box rather than a person (see CapabilityContext.local_actions).
RULE_CALLER = "rule:"


def validate_args(model: type[ArgsT], args: Mapping[str, Any]) -> ArgsT:
    """A local action's arguments, or CommandRejected('bad_args') naming the first bad one."""
    try:
        return model.model_validate(dict(args))
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        raise CommandRejected("bad_args", f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A task the daemon runs under supervision.

    ``critical``: the compound is unprotected while it is down (the alarm ticker, an input that raises
    alarms). Health turns false while it fails, and if it cannot recover the daemon stops in order
    and exits non-zero so that systemd restarts it. Other tasks (one device's poller) are restarted
    with backoff, retried on a slow schedule once given up, and reported as ``device.fault``.
    """

    name: str
    run: Callable[[], Awaitable[None]]
    critical: bool = False


@dataclass(frozen=True, slots=True)
class DoctorCheck:
    """One line of ``edgeagent doctor``."""

    name: str
    status: Literal["ok", "warn", "fail", "skip"]
    detail: str


class KeyValue(Protocol):
    async def kv_get(self, key: str) -> Any: ...

    async def kv_put(self, key: str, value: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class CapabilityContext:
    """The kernel services a capability may use; nothing else constructs drivers."""

    site_id: str
    gateway_id: str
    sink: EventSink
    outputs: Outputs
    alarms: AlarmRuntime
    state: KeyValue
    clock: Clock
    state_dir: Path
    config_dir: Path | None = None
    # Display names of alarm subjects (residents), local only: a capability adds the ones it knows.
    names: dict[str, str] = field(default_factory=dict)
    # Every capability's local actions (a Modbus gate's "gate", ...), filled by the daemon once all are known
    # (empty until it starts): how a rule of one capability acts through another. A rule calls an action with
    # ``who`` starting with RULE_CALLER ("rule:<what>"), which the action records as coming from the box itself.
    local_actions: dict[str, LocalAction] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProbeContext:
    """What a ``device add`` probe gets besides the device: the whole config as it would be written."""

    config: CoreConfig
    path: Path


# "Test before configure": returns a short detail (e.g. the model the device reported) or raises an
# EdgeagentError (DeviceUnavailable, DeviceProtocolError, ...) saying what is wrong.
Probe = Callable[[DeviceBase, ProbeContext], str | None]


class Capability:
    """The running half. Subclasses override what they have; the defaults have nothing."""

    name: str = "capability"

    async def __aenter__(self) -> Capability:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    def claimed_devices(self) -> Sequence[str]:
        """Ids of the configured devices this capability runs."""
        return ()

    def tasks(self) -> Sequence[TaskSpec]:
        return ()

    def commands(self) -> Sequence[CommandSpec]:
        """Cloud commands (signed, from the platform)."""
        return ()

    def outputs(self) -> Mapping[str, Output]:
        """Named outputs local rules drive (siren, strobe, door hold); first registration of a name wins."""
        return {}

    def local_actions(self) -> Mapping[str, LocalAction]:
        return {}

    def status(self) -> Any:
        """JSON-able state for ``/status`` and ``edgeagent status`` (None: nothing to show)."""
        return None

    async def publish_local(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """Publish on the box's own broker if this capability holds a session to it; False if it holds none."""
        del topic, payload, qos, retain
        return False


@dataclass(frozen=True)
class CapabilitySpec(Generic[SectionT]):
    """A registry entry. ``section`` names the top-level config key the capability owns (None: it has
    none); ``section_model`` validates it; ``optional`` sections default to None (absent = off).
    ``alarm_kinds``: the kinds of alarm the capability raises through ``CapabilityContext.alarms``
    (names unique across capabilities; the site's ``alarms.policies.<kind>`` overrides each one's policy).
    They are registered whether or not the capability is configured, so saved alarms and config stay valid."""

    name: str
    build: Callable[[SectionT | None, Sequence[DeviceBase], CapabilityContext], Capability | None]
    section: str | None = None
    section_model: type[SectionT] | None = None
    optional: bool = False
    device_types: Sequence[type[DeviceBase]] = ()
    cross_checks: Callable[[SectionT | None, Sequence[DeviceBase], CoreConfig], list[Issue]] | None = None
    probes: Mapping[str, Probe] = field(default_factory=dict)
    doctor: Callable[[SectionT | None, CoreConfig], list[DoctorCheck]] | None = None
    alarm_kinds: Sequence[AlarmKindSpec] = ()

    def section_of(self, cfg: CoreConfig) -> SectionT | None:
        """This capability's section of a loaded config (typed)."""
        if self.section is None or self.section_model is None:
            return None
        value = getattr(cfg, self.section, None)
        if value is None:
            return None
        if not isinstance(value, self.section_model):
            raise TypeError(f"config section {self.section!r} is a {type(value).__name__}, "
                            f"not {self.section_model.__name__}: was the config loaded with the app's model?")
        return value

    def devices_of(self, cfg: CoreConfig) -> list[DeviceBase]:
        kinds = tuple(self.device_types)
        return [d for d in cfg.devices if kinds and isinstance(d, kinds)]
