"""The daemon's own local control actions (the ``edgeagent`` CLI through the control socket) and the
platform's ``alarm.handle`` command: outputs and alarms, which belong to no one capability.
Capabilities add their own actions (gates, charger resets) through their ``local_actions()``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeagent.kernel.alarms.engine import AlarmError
from edgeagent.kernel.alarms.runtime import AlarmRuntime
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


class LocalAlarmArgs(_Args):
    alarm_id: str
    action: Literal["ack", "resolve"] = "ack"
    by: str | None = Field(default=None, max_length=64, description="who (default: the calling user)")
    note: str | None = Field(default=None, max_length=500)


class CloudAlarmArgs(_Args):
    alarm_id: str
    action: Literal["ack", "resolve"] = "ack"
    by: str = Field(min_length=1, max_length=64, description="the operator on the platform")
    note: str | None = Field(default=None, max_length=500)


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

    async def alarm_ack(args: Mapping[str, Any], who: str) -> Mapping[str, Any]:
        a = validate_args(LocalAlarmArgs, args)
        try:
            if a.action == "resolve":
                await alarms.resolve(a.alarm_id, a.by or who, "cli", a.note)
            else:
                await alarms.ack(a.alarm_id, a.by or who, "cli")
        except AlarmError as exc:
            raise CommandRejected("failed", str(exc)) from exc
        return {"alarm_id": a.alarm_id, "action": a.action, "by": a.by or who}

    return {"output": output, "alarms": alarms_list, "alarm": alarm_ack}


def alarm_command(alarms: AlarmRuntime) -> CommandSpec:
    async def handle(args: Mapping[str, Any]) -> Mapping[str, Any]:
        a = CloudAlarmArgs.model_validate(dict(args))
        try:
            if a.action == "resolve":
                await alarms.resolve(a.alarm_id, a.by, "cloud", a.note)
            else:
                await alarms.ack(a.alarm_id, a.by, "cloud")
        except AlarmError as exc:
            raise CommandRejected("failed", str(exc)) from exc
        return {"alarm_id": a.alarm_id, "action": a.action}

    return CommandSpec("alarm.handle", handle, CloudAlarmArgs, "acknowledge or resolve an alarm from the platform")
