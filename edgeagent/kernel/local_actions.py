"""The daemon's own local control actions (the ``edgeagent`` CLI through the control socket) and the
platform's ``alarm.handle`` command: outputs and alarms, which belong to no one capability.
Capabilities add their own actions (gates, charger resets) through their ``local_actions()``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from edgeagent.kernel.alarms.engine import (
    MAX_BY_CHARS,
    MAX_NOTE_CHARS,
    AlarmError,
    AlarmInputError,
    check_text,
)
from edgeagent.kernel.alarms.runtime import AlarmNotDurable, AlarmRuntime
from edgeagent.kernel.capability import LocalAction, validate_args
from edgeagent.kernel.errors import CommandRejected
from edgeagent.kernel.pipeline.commands import CommandSpec
from edgeagent.kernel.runtime.outputs import Outputs

log = logging.getLogger(__name__)


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalOutputArgs(_Args):
    name: str
    action: Literal["on", "off", "pulse"]
    seconds: float = Field(default=5.0, gt=0, le=3600)


def _text(name: str, max_chars: int) -> AfterValidator:
    # The engine checks again; checking here too refuses bad text before any alarm lookup, with the reason.
    def check(v: str) -> str:
        try:
            return check_text(name, v, max_chars)
        except AlarmInputError as exc:
            raise ValueError(str(exc)) from None
    return AfterValidator(check)


By = Annotated[str, _text("by", MAX_BY_CHARS)]
Note = Annotated[str, _text("note", MAX_NOTE_CHARS)]


class LocalAlarmArgs(_Args):
    alarm_id: str = Field(max_length=64)
    action: Literal["ack", "resolve"] = "ack"
    by: By | None = Field(default=None, description="who is taking it on (default: the calling user, who is "
                          "recorded as the caller either way)")
    note: Note | None = None


class CloudAlarmArgs(_Args):
    alarm_id: str = Field(max_length=64)
    action: Literal["ack", "resolve"] = "ack"
    by: By = Field(description="the operator on the platform")
    note: Note | None = None


NOT_STORED = "acknowledged, not yet stored"


async def _handle_alarm(alarms: AlarmRuntime, alarm_id: str, action: str, by: str, via: str,
                        note: str | None, caller: str | None) -> dict[str, Any]:
    """Ack or resolve; AlarmNotDurable (it took effect, but its event or state is not on disk yet: a full
    disk) is an answer, not a failure: the siren is off and notifications stopped, which the caller must
    hear, and the runtime stores the event again with its next operation."""
    try:
        if action == "resolve":
            await alarms.resolve(alarm_id, by, via, note, caller=caller)
        else:
            await alarms.ack(alarm_id, by, via, caller=caller)
    except AlarmNotDurable as exc:
        log.error("alarm %s %s by %s took effect but is not stored yet: %s", alarm_id, action, by, exc)
        done = "resolved" if action == "resolve" else "acknowledged"
        return {"stored": False, "message": NOT_STORED.replace("acknowledged", done)}
    except AlarmInputError as exc:
        raise CommandRejected("bad_args", str(exc)) from exc
    except AlarmError as exc:
        raise CommandRejected("failed", str(exc)) from exc
    return {"stored": True}


def core_local_actions(outputs: Outputs, alarms: AlarmRuntime) -> dict[str, LocalAction]:
    async def output(args: Mapping[str, Any], who: str) -> Mapping[str, Any]:
        a = validate_args(LocalOutputArgs, args)
        try:
            if a.action == "pulse":
                await outputs.pulse(a.name, a.seconds)
            else:
                await outputs.set(a.name, a.action == "on")
        except KeyError as exc:
            raise CommandRejected("bad_args", str(exc.args[0])) from exc
        log.info("output %s %s by %s", a.name, a.action, who)
        return {"output": a.name, "action": a.action}

    async def alarms_list(_args: Mapping[str, Any], _who: str) -> Mapping[str, Any]:
        return {"alarms": [al.to_json() for al in alarms.engine.active()]}

    return {"output": output, "alarms": alarms_list, "alarm": alarm_action(alarms, "cli")}


def alarm_action(alarms: AlarmRuntime, via: str) -> LocalAction:
    """Ack or resolve as a local action; ``via`` says which local door it came through (the CLI's control
    socket, the guard-room console), ``who`` is the authenticated caller."""

    async def alarm_ack(args: Mapping[str, Any], who: str) -> Mapping[str, Any]:
        a = validate_args(LocalAlarmArgs, args)
        # [--by next to the caller] --by names who is taking it on; the socket's peer (who) is recorded too.
        by = a.by or who
        outcome = await _handle_alarm(alarms, a.alarm_id, a.action, by, via, a.note, who)
        return {"alarm_id": a.alarm_id, "action": a.action, "by": by, "caller": who, **outcome}

    return alarm_ack


def alarm_command(alarms: AlarmRuntime) -> CommandSpec:
    async def handle(args: Mapping[str, Any]) -> Mapping[str, Any]:
        a = CloudAlarmArgs.model_validate(dict(args))
        outcome = await _handle_alarm(alarms, a.alarm_id, a.action, a.by, "cloud", a.note, None)
        return {"alarm_id": a.alarm_id, "action": a.action, **outcome}

    return CommandSpec("alarm.handle", handle, CloudAlarmArgs, "acknowledge or resolve an alarm from the platform")
