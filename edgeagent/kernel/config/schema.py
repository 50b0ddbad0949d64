"""The one configuration file: YAML, validated strictly, versioned, secrets only by reference.

Errors name the file, the line, the key and the problem in plain words, e.g.::

    /etc/edgeagent/edgeagent.yaml:14:3: uplink.keepalive_s: must be at least 5 (got 0)

Secrets never sit in the file: a secret field takes ``{credential: NAME}`` (a systemd credential,
read from ``$CREDENTIALS_DIRECTORY``), ``{file: PATH}`` or ``{env: NAME}``.
"""

from __future__ import annotations

import io
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from edgeagent.kernel.alarms.notify_config import NotifiersSection
from edgeagent.kernel.config import yamlerr
from edgeagent.kernel.config.base import (
    SecretField,
    SecretRef,
    Strict,
    _no_clear_secret,
    is_loopback_host,
    redact_url,
)
from edgeagent.kernel.config.console import ConsoleConfig
from edgeagent.kernel.errors import ConfigError
from edgeagent.kernel.pipeline.event_types import ALARM_KIND_PATTERN

CONFIG_VERSION = 1
__all__ = ["CONFIG_VERSION", "Config", "ConfigError", "CoreConfig", "SecretRef", "load_config", "parse_yaml",
           "redacted", "validate_doc"]
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Issue = tuple[tuple[int | str, ...], str]
ConfigT = TypeVar("ConfigT", bound="CoreConfig")


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


class BrokerClientConfig(Strict):
    """What every MQTT client section checks (the uplink, the local broker's wristband input): a broker URL
    without credentials in it, and a password only by reference."""

    @field_validator("password", mode="before", check_fields=False)
    @classmethod
    def _password_ref(cls, v: Any) -> Any:
        return _no_clear_secret(v)

    @field_validator("broker", check_fields=False)
    @classmethod
    def _broker_url(cls, v: str) -> str:
        return check_broker_url(v)


class UplinkConfig(BrokerClientConfig):
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
    allow_plaintext: bool = Field(
        default=False, description="accept a password over plain mqtt:// to a broker off this box (it travels "
        "in clear text); without it such a config is refused")
    # 1000 events (~300 KB) per message: at 500 the uplink fell behind a 28k events/s intake on a busy
    # 2-core box (bench/RESULTS.md). Lower batch_max_bytes for brokers with a small packet limit.
    batch_max_events: int = Field(default=1000, ge=1, le=10_000)
    batch_max_bytes: int = Field(default=512 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_inflight_batches: int = Field(default=8, ge=1, le=1000)
    flush_on_stop_s: float = Field(default=10, ge=0, le=300)
    retry: RetryConfig = RetryConfig()


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

    @property
    def password_in_clear(self) -> bool:
        """A password would cross a network in clear text: plain MQTT, a password, a broker off this box."""
        return self.password is not None and not self.uses_tls and not is_loopback_host(self.host)


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
    restart_intensity: int = Field(default=5, ge=1, le=1000,
                                   description="a device task failing more often than this per window is given up")
    restart_window_s: float = Field(default=60, gt=0)
    backoff_cap_s: float = Field(default=30, gt=0)
    retry_failed_after_s: float = Field(default=300, gt=0, le=86_400,
                                        description="a given-up device task is started again after this long")
    critical_unhealthy_after_s: float = Field(
        default=10, gt=0, le=3600,
        description="health (and the systemd watchdog) turns false once a critical task has failed this long")
    critical_give_up_after_s: float = Field(
        default=30, gt=0, le=3600,
        description="a critical task (uplink, alarms, alarm inputs) still failing after this long ends the "
        "daemon with a non-zero exit, for systemd to restart it; keep it below "
        "critical_unhealthy_after_s + WatchdogSec so that the stop is orderly")
    stable_after_s: float = Field(default=30, gt=0, le=3600,
                                  description="a task that ran this long since its last failure has recovered")
    shutdown_timeout_s: float = Field(default=20, gt=0, le=600)


# --- alarms -------------------------------------------------------------------------------------------

class AlarmLevelConfig(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    targets: list[str] = Field(min_length=1, description="notifier targets, e.g. guard_room")


class AlarmPolicyConfig(Strict):
    """Replaces a kind's shipped policy as a whole (every key not given takes the default below)."""

    severity: Literal["critical", "high", "medium", "low"]
    outputs: list[str] = Field(default_factory=list, description="outputs on until acknowledged, e.g. [siren] "
                               "or a lift's [lift2_door_hold, lift2_voice]")
    repeat_s: float = Field(default=60, gt=0)
    escalate_after_s: list[float] = Field(default_factory=list, description="times of levels 1, 2, ...")
    fold_window_s: float | None = Field(default=None, gt=0)
    ladder: str | None = Field(
        default=None, pattern=r"^[a-z][a-z0-9_]*$",
        description="escalation ladder (a name under alarms.ladders); absent: alarms.levels, the resident "
        "escalation the wristbands use (so a camera's video_fall is linked to it by leaving this out and "
        "giving escalate_after_s)")


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
    ladders: dict[Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")],
                  Annotated[list[AlarmLevelConfig], Field(min_length=1)]] = Field(
        default_factory=dict, description="other escalation ladders by name, e.g. guard_only: [{name: guard_room, "
        "targets: [guard_room]}], for policies that name one")
    policies: dict[Annotated[str, StringConstraints(pattern=ALARM_KIND_PATTERN)], AlarmPolicyConfig] = Field(
        default_factory=dict, description="per-kind replacements of the shipped policies; a kind is any "
        "alarm kind a capability declares (sos, fall, ..., charger_cutoff, ebike_in_lift, video_fall, ...)")

    def ladder_issues(self) -> list[Issue]:
        """Policies naming a ladder that is not there, and more escalation times than a ladder has levels."""
        issues: list[Issue] = []
        for kind, policy in self.policies.items():
            ladder = self.levels if policy.ladder is None else self.ladders.get(policy.ladder)
            if ladder is None:
                issues.append((("alarms", "policies", kind, "ladder"),
                               f"no escalation ladder {policy.ladder!r} under alarms.ladders (there are: "
                               f"{', '.join(sorted(self.ladders)) or 'none'})"))
            elif len(policy.escalate_after_s) > len(ladder) - 1:
                issues.append((("alarms", "policies", kind, "escalate_after_s"),
                               f"{len(policy.escalate_after_s)} escalation times but the ladder has only "
                               f"{len(ladder) - 1} level(s) above the first"))
        return issues


def alarm_kind_issues(section: AlarmsSection, kinds: typing.Collection[str]) -> list[Issue]:
    """``alarms.policies`` keys that no capability declares as an alarm kind, each located at its key."""
    known = ", ".join(sorted(kinds)) or "none"
    return [(("alarms", "policies", kind), f"unknown alarm kind {kind!r}: no capability raises it (known kinds: "
             f"{known})") for kind in section.policies if kind not in kinds]


# --- devices (each capability has its config classes, joined by a discriminated union) -----------

class DeviceBase(Strict):
    """What every device entry has; each capability's device classes add ``type: Literal[...]`` and their keys."""

    id: str = Field(pattern=ID_PATTERN, description="device id, unique on this gateway")
    enabled: bool = True
    name: str | None = Field(default=None, description="human label, local only")


class CoreConfig(Strict):
    """The sections every gateway has. The whole file's model is assembled at the app layer
    (``edgeagent.capabilities``): this plus each capability's section and device types."""

    version: int = Field(description=f"config schema version; this edgeagent writes {CONFIG_VERSION}")
    site_id: str = Field(pattern=ID_PATTERN, description="the compound, as the platform knows it")
    gateway_id: str = Field(pattern=ID_PATTERN, description="this box, unique within the site")
    state_dir: Path = Field(default=Path("/var/lib/edgeagent"),
                            description="outbox and local state; $STATE_DIRECTORY overrides under systemd")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    clock: ClockConfig = ClockConfig()
    outbox: OutboxSection = OutboxSection()
    uplink: UplinkConfig | None = None
    commands: CommandsConfig = CommandsConfig()
    health: HealthConfig = HealthConfig()
    console: ConsoleConfig | None = Field(default=None, description="the guard-room console (HTTPS, local "
                                          "accounts); absent: none")
    supervisor: SupervisorConfig = SupervisorConfig()
    alarms: AlarmsSection = AlarmsSection()
    notifiers: NotifiersSection = Field(
        default_factory=dict, description="how alarm notifications reach people: mqtt, webhook, sms")
    # The assembled model replaces this with the discriminated union of every capability's device types.
    devices: Sequence[DeviceBase] = Field(default_factory=list)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v > CONFIG_VERSION:
            raise ValueError(f"version {v} is newer than this edgeagent understands ({CONFIG_VERSION}); "
                             "upgrade edgeagent")
        if v < CONFIG_VERSION:
            raise ValueError(f"version {v} is old; run 'edgeagent config migrate'")
        return v

    def cross_checks(self) -> list[Issue]:
        """Checks that span sections, each with the location of the offending key."""
        issues: list[Issue] = []
        up = self.uplink
        if up is not None and up.enabled and up.password_in_clear and not up.allow_plaintext:
            # Checked here rather than on UplinkConfig itself so the error is located at the broker key.
            issues.append((("uplink", "broker"),
                           f"{up.broker} is plain MQTT and uplink.password would cross the network in clear "
                           "text: use mqtts:// (or a 'tls' section), or set 'uplink.allow_plaintext: true' to "
                           "accept that"))
        issues.extend(self.alarms.ladder_issues())
        seen: set[str] = set()
        for i, dev in enumerate(self.devices):
            if dev.id in seen:
                issues.append((("devices", i, "id"), f"device id {dev.id!r} is used twice"))
            seen.add(dev.id)
        return issues

    @classmethod
    def device_types(cls) -> dict[str, type[DeviceBase]]:
        """The device config classes this model accepts, by their ``type`` tag."""
        found: dict[str, type[DeviceBase]] = {}
        field = cls.model_fields["devices"]
        todo = list(typing.get_args(field.annotation))
        while todo:
            arg = todo.pop()
            if isinstance(arg, type) and issubclass(arg, DeviceBase):
                tag_field = arg.model_fields.get("type")
                for tag in typing.get_args(tag_field.annotation) if tag_field is not None else ():
                    found[str(tag)] = arg
            else:
                todo.extend(typing.get_args(arg))
        return found


Config = CoreConfig  # the static type of a loaded config; its sections beyond the core are read by capabilities


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
    return yamlerr.locate(doc, loc)[0]


def _dotted(loc: tuple[int | str, ...], doc: Any, root: type[CoreConfig]) -> str:
    """``loc`` as the file writes it (``devices[2].bus``), without the union tags pydantic adds."""
    return yamlerr.locate(doc, loc, root)[1]


def _model_at(loc: tuple[int | str, ...], doc: Any, root: type[CoreConfig]) -> type[BaseModel] | None:
    """The config model that owns the last key of ``loc`` (to list the keys it allows)."""
    return yamlerr.model_at(root, loc, doc)


def _unknown_key(loc: tuple[int | str, ...], doc: Any, root: type[CoreConfig]) -> str:
    return yamlerr.unknown_key(root, loc, doc)


def _words(model: type[CoreConfig]) -> dict[str, Any]:
    """How the config words what the shared formatter leaves open: device types, and secrets never echoed."""
    def unknown_type(ctx: Mapping[str, Any]) -> str:
        return f"unknown device type {ctx.get('tag')!r} (known: {', '.join(sorted(model.device_types()))})"

    return {"tag_invalid": unknown_type, "tag_missing": "a device needs a 'type' key", "hide": _SECRETISH}


def _plain(err: Mapping[str, Any], doc: Any, model: type[CoreConfig]) -> str:
    return yamlerr.plain(err, root=model, doc=doc, **_words(model))


def _format_errors(path: Path | str, doc: Any, exc: ValidationError, model: type[CoreConfig]) -> str:
    return yamlerr.format_errors(path, doc, exc, root=model, **_words(model))


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


def validate_doc(doc: CommentedMap, path: Path | str, model: type[ConfigT]) -> ConfigT:
    """Validate a parsed document against ``model`` (the assembled config model of the app layer)."""
    try:
        cfg = model.model_validate(yamlerr.to_builtin(doc))
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, doc, exc, model)) from None
    issues = cfg.cross_checks()
    if issues:
        lines = []
        for loc, msg in issues:
            pos = _locate(doc, loc)
            where = f"{path}:{pos[0]}:{pos[1]}" if pos else str(path)
            lines.append(f"{where}: {_dotted(loc, doc, model)}: {msg}")
        raise ConfigError("\n".join(lines))
    return cfg


def load_config(path: Path, model: type[ConfigT]) -> ConfigT:
    """Read and validate the file; every failure is a :class:`ConfigError` with a location."""
    text = yamlerr.read_text_file(path, ConfigError,
                                  f"no such file; create one with 'edgeagent init --config {path}'")
    return validate_doc(parse_yaml(text, path), path, model)


# --- showing config without secrets ----------------------------------------------------------------

_SECRETISH = re.compile(r"pass|secret|token|key$|private", re.IGNORECASE)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


PERSONAL = "personal"  # json_schema_extra marker of a field holding personal data


def _redact_personal(data: Any, model: Any) -> None:
    """Replace the values of fields marked ``json_schema_extra={"personal": True}``, walking nested models."""
    if isinstance(data, list):
        for item in data:
            _redact_personal(item, model)
        return
    if not isinstance(data, dict):
        return
    models = [m for m in (typing.get_args(model) or (model,)) if isinstance(m, type) and issubclass(m, BaseModel)]
    if not models and typing.get_args(model):
        for arg in typing.get_args(model):
            _redact_personal(data, arg)
        return
    for m in models:
        for name, field in m.model_fields.items():
            if name not in data:
                continue
            extra = field.json_schema_extra
            if isinstance(extra, dict) and extra.get(PERSONAL) and data[name]:
                data[name] = "<redacted>"
            else:
                _redact_personal(data[name], field.annotation)


def redacted(cfg: CoreConfig) -> dict[str, Any]:
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
                elif isinstance(v, str) and _URL.match(v):
                    out[k] = redact_url(v)  # a webhook's token in the query, user info
                else:
                    out[k] = walk(v)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    result: dict[str, Any] = walk(data)
    # Personal data stays on the box too: keys a config model marks as personal (residents' names and
    # rooms, ...) and phone numbers for SMS.
    _redact_personal(result, type(cfg))
    for notifier in (result.get("notifiers") or {}).values():
        if isinstance(notifier, dict) and isinstance(notifier.get("numbers"), dict):
            notifier["numbers"] = dict.fromkeys(notifier["numbers"], "<redacted>")
    return result
