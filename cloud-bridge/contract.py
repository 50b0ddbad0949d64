"""The published cloud contract, generated from the event registry.

Everything the gateway puts on the wire, and every command it accepts, is described by files under
``cloud-bridge/contract/``: one JSON Schema (draft 2020-12) per event type, schemas for the batch,
status and command messages, and an AsyncAPI 3.0.0 document for the MQTT topic tree. The files are
generated from :data:`edgeagent.kernel.pipeline.event_types.REGISTRY` and the constants below, never edited
by hand::

    python -m edgeagent.cloud_bridge.contract --write   # regenerate
    python -m edgeagent.cloud_bridge.contract --check   # exit 1 if the committed files are stale

The validation helpers (:func:`validator_for`, :func:`validate_envelope`, ...) read the committed
files, so tests check the code against what is actually published. They need ``jsonschema``, which
is a development dependency; generating the files does not.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ruamel.yaml import YAML
from ruamel.yaml.scalarstring import LiteralScalarString

from edgeagent.kernel.pipeline.commands import COMMAND_ERROR_CODES, MAX_COMMAND_BYTES, SIGNING_PREFIX
from edgeagent.kernel.pipeline.event_types import REGISTRY
from edgeagent.kernel.pipeline.events import ENVELOPE_VERSION, EventRegistry, EventType, Priority

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator, FormatChecker  # type: ignore[import-untyped, unused-ignore]

CONTRACT_DIR = Path(__file__).resolve().parent / "contract"
SCHEMAS_SUBDIR = "schemas"
ASYNCAPI_FILE = "asyncapi.yaml"

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# An identifier, not a location: the reserved ".invalid" TLD says nothing is served there. Files
# refer to each other by relative references, which resolve against these ids.
SCHEMA_ID_BASE = "https://edgeagent.invalid/contract/v1/schemas/"
GENERATED_NOTE = (
    "Generated from the edgeagent event registry by "
    "'python -m edgeagent.cloud_bridge.contract --write'; do not edit by hand."
)

DEFAULT_TOPIC_PREFIX = "edgeagent/v1"
COMMAND_SIGNATURE_CONTEXT = SIGNING_PREFIX.decode("ascii")
COMMAND_MAX_BYTES = MAX_COMMAND_BYTES
COMMAND_STATUSES = ("executed", "failed", "rejected")

BATCH_SCHEMA_FILE = "batch.json"
STATUS_SCHEMA_FILE = "status.json"
COMMAND_REQUEST_SCHEMA_FILE = "command-request.json"
COMMAND_BODY_SCHEMA_FILE = "command-body.json"
COMMAND_RESULT_SCHEMA_FILE = "command-result.json"
FIXED_SCHEMA_FILES = (
    BATCH_SCHEMA_FILE, STATUS_SCHEMA_FILE, COMMAND_REQUEST_SCHEMA_FILE, COMMAND_BODY_SCHEMA_FILE,
    COMMAND_RESULT_SCHEMA_FILE,
)

ULID_PATTERN = r"^[0-9A-HJKMNP-TV-Z]{26}$"
UTC_MS_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"
RFC3339_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$"
)
# Site and gateway ids are MQTT topic levels: no separator, no wildcard.
TOPIC_LEVEL_PATTERN = r"^[^/+#]+$"
DOTTED_NAME_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$"
SHA256_HEX_PATTERN = r"^[0-9a-f]{64}$"
MEDIA_TYPE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$"
# Standard base64 of a 64-byte Ed25519 signature: 86 symbols and two pad characters.
ED25519_SIG_B64_PATTERN = r"^[A-Za-z0-9+/]{86}==$"

_DATA_DEFS_PREFIX = "data."
_LOCAL_DEFS_REF = "#/$defs/"

JsonObject = dict[str, Any]


# --- small schema pieces ---------------------------------------------------------------------------

def schema_file_for(type_name: str) -> str:
    """File name (under ``schemas/``) of one event type's envelope schema."""
    return f"{type_name}.json"


def _schema_header(file_name: str, title: str, description: str) -> JsonObject:
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": SCHEMA_ID_BASE + file_name,
        "$comment": GENERATED_NOTE,
        "title": title,
        "description": description,
    }


def _version_field() -> JsonObject:
    return {"type": "integer", "const": ENVELOPE_VERSION, "description": "Contract version."}


def _non_empty(description: str) -> JsonObject:
    return {"type": "string", "minLength": 1, "description": description}


def _topic_level(description: str) -> JsonObject:
    return {"type": "string", "minLength": 1, "pattern": TOPIC_LEVEL_PATTERN, "description": description}


def _rfc3339(description: str) -> JsonObject:
    return {"type": "string", "format": "date-time", "pattern": RFC3339_PATTERN, "description": description}


def _attachment_schema() -> JsonObject:
    return {
        "type": "object",
        "description": "A reference to content kept at the edge (snapshot, clip); never the bytes.",
        "required": ["kind", "sha256", "media_type", "size_bytes"],
        "additionalProperties": False,
        "properties": {
            "kind": _non_empty("What the attachment is, e.g. 'snapshot'."),
            "sha256": {"type": "string", "pattern": SHA256_HEX_PATTERN,
                       "description": "SHA-256 of the content, 64 lower-case hex digits."},
            "media_type": {"type": "string", "pattern": MEDIA_TYPE_PATTERN,
                           "description": "Media type of the content, e.g. 'image/jpeg'."},
            "size_bytes": {"type": "integer", "minimum": 0, "description": "Size of the content."},
        },
    }


def _clock_schema() -> JsonObject:
    return {
        "type": "object",
        "description": (
            "Present when the event was stamped before the gateway clock was synchronised. With "
            "'corrected' true the gateway has since rewritten occurred_at itself (clock_synced is then "
            "true); otherwise the cloud corrects it from the gateway.clock.synced event of the same "
            "boot_id: occurred_at = wall_at_sync - (monotonic_ms at sync - clock.monotonic_ms)."
        ),
        "required": ["boot_id", "monotonic_ms"],
        "additionalProperties": False,
        "properties": {
            "boot_id": _non_empty("Boot of the gateway whose monotonic clock stamped the event."),
            "monotonic_ms": {"type": "integer", "minimum": 0,
                             "description": "Monotonic clock (ms since boot) when the event occurred."},
            "corrected": {"type": "boolean",
                          "description": "True once the gateway corrected occurred_at before sending."},
        },
    }


def _rewrite_local_refs(node: Any, prefix: str) -> Any:
    """Copy a schema, pointing every local ``#/$defs/X`` reference at ``#/$defs/<prefix>X``."""
    if isinstance(node, dict):
        out: JsonObject = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(_LOCAL_DEFS_REF):
                out[key] = _LOCAL_DEFS_REF + prefix + value[len(_LOCAL_DEFS_REF):]
            else:
                out[key] = _rewrite_local_refs(value, prefix)
        return out
    if isinstance(node, list):
        return [_rewrite_local_refs(item, prefix) for item in node]
    return node


def data_schema(event_type: EventType) -> tuple[JsonObject, JsonObject]:
    """The pydantic schema of ``data`` and its definitions, hoisted for the envelope's ``$defs``.

    Pydantic puts nested models (and the model itself, when recursive) under ``$defs`` of its own
    root. Embedded under ``properties.data`` those references would no longer resolve, so the
    definitions move to the envelope root under a ``data.`` prefix and the references follow.
    """
    raw = event_type.data_model.model_json_schema()
    defs = raw.pop("$defs", {})
    schema = _rewrite_local_refs(raw, _DATA_DEFS_PREFIX)
    hoisted = {_DATA_DEFS_PREFIX + name: _rewrite_local_refs(sub, _DATA_DEFS_PREFIX)
               for name, sub in defs.items()}
    return schema, hoisted


# --- event schemas ---------------------------------------------------------------------------------

_ENVELOPE_REQUIRED = (
    "v", "id", "seq", "type", "priority", "site_id", "gateway_id", "device_id", "occurred_at",
    "clock_synced", "data", "attachments",
)


def _type_description(event_type: EventType) -> str:
    parts = [event_type.description, f"Priority class: {event_type.priority.label}."]
    if event_type.priority is Priority.ALARM:
        parts.append("Alarms leave the gateway first and are never evicted or coalesced.")
    if event_type.coalesce_field is not None:
        parts.append(
            f"While backlogged, readings of the same (device_id, data.{event_type.coalesce_field}) are "
            "coalesced into one; see 'coalesced'."
        )
    if event_type.pinned:
        parts.append("Never evicted.")
    return " ".join(parts)


def envelope_schema(event_type: EventType) -> JsonObject:
    """JSON Schema of the full envelope (``Event.envelope``) of one event type."""
    data, data_defs = data_schema(event_type)
    properties: JsonObject = {
        "v": _version_field(),
        "id": {"type": "string", "pattern": ULID_PATTERN,
               "description": "ULID of the event, unique per gateway; consumers deduplicate by it."},
        "seq": {"type": "integer", "minimum": 1,
                "description": "Per-gateway sequence number, monotonic across restarts; a gap not "
                "explained by an outbox.evicted event means lost data."},
        "type": {"type": "string", "const": event_type.name, "description": "Event type."},
        "priority": {"type": "string", "const": event_type.priority.label,
                     "description": "Priority class; also the last level of the topic."},
        "site_id": _topic_level("Site (compound) the gateway belongs to."),
        "gateway_id": _topic_level("Gateway that produced the event."),
        "device_id": _non_empty("Device the event is about; the gateway itself for gateway events."),
        "occurred_at": {"type": "string", "format": "date-time", "pattern": UTC_MS_PATTERN,
                        "description": "When it happened: RFC 3339, UTC, millisecond precision. Only "
                        "trustworthy when clock_synced is true."},
        "clock_synced": {"type": "boolean",
                         "description": "Whether the gateway clock was synchronised for occurred_at."},
        "clock": {"$ref": "#/$defs/clock"},
        "data": data,
        "attachments": {"type": "array", "items": {"$ref": "#/$defs/attachment"},
                        "description": "References to content kept on the gateway."},
    }
    if event_type.priority is Priority.TELEMETRY:
        properties["coalesced"] = {
            "type": "integer", "minimum": 2,
            "description": "Number of readings folded into this one while the gateway was backlogged. "
            "It carries the newest value and time but keeps the seq and id of the first reading.",
        }
    schema = _schema_header(schema_file_for(event_type.name), event_type.name, _type_description(event_type))
    schema.update({
        "type": "object",
        "required": list(_ENVELOPE_REQUIRED),
        "additionalProperties": False,
        "properties": properties,
        # An unsynchronised stamp must carry what is needed to correct it.
        "if": {"properties": {"clock_synced": {"const": False}}, "required": ["clock_synced"]},
        "then": {"required": ["clock"]},
        "$defs": {"attachment": _attachment_schema(), "clock": _clock_schema(), **data_defs},
    })
    return schema


def batch_schema(registry: EventRegistry = REGISTRY) -> JsonObject:
    """JSON Schema of one MQTT event message: 1..N envelopes of one priority class."""
    schema = _schema_header(
        BATCH_SCHEMA_FILE, "Event batch",
        "One MQTT message on {prefix}/{site_id}/{gateway_id}/events/{priority}: one or more events of a "
        "single priority class (the one named in the topic), in ascending seq order.",
    )
    one_class = [
        {"items": {"properties": {"priority": {"const": p.label}}}} for p in Priority
    ]
    schema.update({
        "type": "object",
        "required": ["v", "events"],
        "additionalProperties": False,
        "properties": {
            "v": _version_field(),
            "events": {
                "type": "array",
                "minItems": 1,
                "description": "Events of one priority class in ascending seq order. An event may be "
                "sent again (same id) when its acknowledgement was lost.",
                "items": {"oneOf": [{"$ref": schema_file_for(t.name)} for t in registry]},
                "anyOf": one_class,
            },
        },
    })
    return schema


# --- status and command schemas --------------------------------------------------------------------

def status_schema() -> JsonObject:
    schema = _schema_header(
        STATUS_SCHEMA_FILE, "Gateway status",
        "Retained message on {prefix}/{site_id}/{gateway_id}/status. The gateway publishes 'online' when "
        "it connects and 'offline' when it stops; the broker publishes the MQTT Last Will (state "
        "'offline', reason 'connection lost', 'at' = when the session began) when the connection is "
        "lost.",
    )
    schema.update({
        "type": "object",
        "required": ["v", "state", "reason", "site_id", "gateway_id", "version", "at"],
        "additionalProperties": False,
        "properties": {
            "v": _version_field(),
            "state": {"type": "string", "enum": ["online", "offline"]},
            "reason": {"type": "string", "description": "Why the state changed."},
            "site_id": _topic_level("Site of the gateway."),
            "gateway_id": _topic_level("The gateway."),
            "version": _non_empty("edgeagent version running on the gateway."),
            "at": _rfc3339("When the state was published; for the Last Will, when the session began."),
        },
    })
    return schema


def command_request_schema() -> JsonObject:
    schema = _schema_header(
        COMMAND_REQUEST_SCHEMA_FILE, "Signed command request",
        f"Message on {{prefix}}/{{site_id}}/{{gateway_id}}/cmd/req, at most {COMMAND_MAX_BYTES} bytes. "
        f"'sig' is the standard base64 of the Ed25519 signature over the UTF-8 bytes of "
        f"{COMMAND_SIGNATURE_CONTEXT!r} followed by 'body', made with the key named by 'kid'.",
    )
    schema.update({
        "type": "object",
        "required": ["v", "kid", "body", "sig"],
        "additionalProperties": False,
        "properties": {
            "v": _version_field(),
            "kid": {"type": "string", "minLength": 1, "maxLength": 64,
                    "description": "Id of the platform signing key."},
            "body": {
                "type": "string", "minLength": 2, "maxLength": COMMAND_MAX_BYTES,
                "description": "The command as JSON text; signed exactly as sent.",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": COMMAND_BODY_SCHEMA_FILE},
            },
            "sig": {"type": "string", "pattern": ED25519_SIG_B64_PATTERN,
                    "description": "Standard base64 (with padding) of the 64-byte Ed25519 signature."},
        },
    })
    return schema


def command_body_schema() -> JsonObject:
    schema = _schema_header(
        COMMAND_BODY_SCHEMA_FILE, "Command body",
        "The signed JSON text carried in a command request's 'body'. The gateway rejects it when it is "
        "for another gateway, not yet valid, expired, valid for too long, or its nonce was seen before.",
    )
    schema.update({
        "type": "object",
        "required": ["id", "site_id", "gateway_id", "command", "args", "issued_at", "expires_at", "nonce",
                     "issuer"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": 64,
                   "description": "Command id, echoed as command_id in the result."},
            "site_id": _topic_level("Site the command is for."),
            "gateway_id": _topic_level("Gateway the command is for; must be the receiving gateway."),
            "command": {"type": "string", "pattern": DOTTED_NAME_PATTERN,
                        "description": "Dotted command name, e.g. 'gate.open'."},
            "args": {"type": "object", "description": "Arguments of the command."},
            "issued_at": _rfc3339("When the platform issued the command."),
            "expires_at": _rfc3339("After this instant the gateway rejects the command."),
            "nonce": {"type": "string", "minLength": 16, "maxLength": 128,
                      "description": "Single-use value; a repeated nonce is rejected as a replay."},
            "issuer": {"type": "string", "minLength": 1, "maxLength": 128,
                       "description": "Who issued the command (user or service), for the audit trail."},
        },
    })
    return schema


def command_result_schema() -> JsonObject:
    schema = _schema_header(
        COMMAND_RESULT_SCHEMA_FILE, "Command result",
        "Message on the request's MQTT 5 response topic (which must start with "
        "{prefix}/{site_id}/{gateway_id}/cmd/res), else on {prefix}/{site_id}/{gateway_id}/cmd/res; "
        "the request's correlation data is echoed.",
    )
    error = {
        "type": "object",
        "required": ["code", "message"],
        "additionalProperties": False,
        "properties": {
            "code": {"type": "string", "enum": list(COMMAND_ERROR_CODES)},
            "message": {"type": "string", "description": "Human-readable detail, without secrets."},
        },
    }
    schema.update({
        "type": "object",
        "required": ["v", "command_id", "ok", "status", "result", "error", "at"],
        "additionalProperties": False,
        "properties": {
            "v": _version_field(),
            "command_id": {"type": ["string", "null"],
                           "description": "Id from the command body; null when it could not be read."},
            "ok": {"type": "boolean", "description": "True exactly when the command was executed."},
            "status": {"type": "string", "enum": list(COMMAND_STATUSES)},
            "result": {"type": ["object", "null"], "description": "What the command returned, if anything."},
            "error": {"oneOf": [{"type": "null"}, {"$ref": "#/$defs/error"}]},
            "at": _rfc3339("When the result was produced."),
        },
        "if": {"properties": {"ok": {"const": True}}, "required": ["ok"]},
        "then": {"properties": {"status": {"const": "executed"}, "error": {"type": "null"}}},
        "else": {"properties": {"status": {"enum": ["failed", "rejected"]}, "error": {"type": "object"}}},
        "$defs": {"error": error},
    })
    return schema


# --- AsyncAPI ----------------------------------------------------------------------------------------

_MQTT_BINDING_VERSION = "0.2.0"


def _ref(pointer: str) -> JsonObject:
    return {"$ref": pointer}


def _mqtt_operation(*, retain: bool) -> JsonObject:
    return {"mqtt": {"qos": 1, "retain": retain, "bindingVersion": _MQTT_BINDING_VERSION}}


def _example_request_body() -> str:
    body = {
        "id": "cmd-0001", "site_id": "site-1", "gateway_id": "gw-1", "command": "gate.open",
        "args": {"gate": "main"}, "issued_at": "2025-01-01T12:00:00.000Z",
        "expires_at": "2025-01-01T12:01:00.000Z", "nonce": "6f1c2a9e0b7d4c35a8e1",
        "issuer": "guard-desk",
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def message_examples() -> dict[str, list[tuple[str, JsonObject]]]:
    """Example payloads per AsyncAPI message, keyed by the schema file they must satisfy."""
    return {
        STATUS_SCHEMA_FILE: [
            ("online", {"v": 1, "state": "online", "reason": "started", "site_id": "site-1",
                        "gateway_id": "gw-1", "version": "0.1.0", "at": "2025-01-01T12:00:00.000Z"}),
            ("lastWill", {"v": 1, "state": "offline", "reason": "connection lost", "site_id": "site-1",
                          "gateway_id": "gw-1", "version": "0.1.0", "at": "2025-01-01T12:00:00.000Z"}),
        ],
        COMMAND_REQUEST_SCHEMA_FILE: [
            ("gateOpen", {"v": 1, "kid": "platform-2025", "body": _example_request_body(),
                          "sig": "A" * 86 + "=="}),
        ],
        COMMAND_RESULT_SCHEMA_FILE: [
            ("executed", {"v": 1, "command_id": "cmd-0001", "ok": True, "status": "executed",
                          "result": {"opened": True}, "error": None, "at": "2025-01-01T12:00:00.412Z"}),
            ("replay", {"v": 1, "command_id": "cmd-0001", "ok": False, "status": "rejected",
                        "result": None, "error": {"code": "replay", "message": "nonce already used"},
                        "at": "2025-01-01T12:00:05.020Z"}),
        ],
    }


def _examples(file_name: str, names: Sequence[str] | None = None) -> list[JsonObject]:
    return [{"name": name, "summary": "Illustrative values.", "payload": payload}
            for name, payload in message_examples()[file_name] if names is None or name in names]


_INFO_DESCRIPTION = """\
MQTT interface between an edgeagent gateway and the cloud platform, described from the gateway's
side. Payloads are JSON; their schemas (JSON Schema draft 2020-12) are the files under ./schemas/,
generated from the gateway's event registry.
"""

_EVENTS_DESCRIPTION = """\
The gateway publishes its events here, QoS 1, not retained. One MQTT message carries 1..N events of
ONE priority class (the last topic level) in ascending seq order.

Delivery is at least once. An event whose PUBACK did not arrive is sent again with the same id, so
consumers deduplicate by id. seq is per gateway, monotonic and survives restarts, so a consumer can
detect gaps; gaps are explained by outbox.evicted events, which report the evicted seq ranges (the
backlog cap evicts telemetry first, then ordinary events, never alarms). Classes are independent:
alarms leave the gateway before events and events before telemetry, so seq is ordered within a
class, not across classes.
"""

_STATUS_DESCRIPTION = """\
Retained, QoS 1. The gateway publishes state 'online' after connecting and 'offline' before an
orderly stop. The same topic carries the MQTT Last Will, set when the session begins: state
'offline', reason 'connection lost', 'at' = when that session began.
"""

_CMD_REQ_DESCRIPTION = f"""\
The platform sends signed commands here, QoS 1; at most {COMMAND_MAX_BYTES} bytes per message.
'body' is JSON text (see command-body.json) and 'sig' the standard base64 of the Ed25519 signature
over the UTF-8 bytes of "edgeagent-cmd-v1\\n" + body. With MQTT 5 the request's response topic
(which must start with {{prefix}}/{{site_id}}/{{gateway_id}}/cmd/res) and correlation data are
honoured.
"""

_CMD_RES_DESCRIPTION = """\
The gateway answers every command request here (or on the request's response topic), QoS 1, with
the correlation data of the request. Rejections carry an error code and execute nothing.
"""


def asyncapi_document(registry: EventRegistry = REGISTRY) -> JsonObject:
    """The AsyncAPI 3.0.0 description of the topic tree, from the gateway's point of view."""
    schemas_dir = f"./{SCHEMAS_SUBDIR}/"

    def params(*names: str) -> JsonObject:
        return {name: _ref(f"#/components/parameters/{name}") for name in names}

    gateway = ("prefix", "site_id", "gateway_id")
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "edgeagent cloud contract",
            "version": f"{ENVELOPE_VERSION}.0.0",
            "description": LiteralScalarString(_INFO_DESCRIPTION),
        },
        "defaultContentType": "application/json",
        "channels": {
            "events": {
                "address": "{prefix}/{site_id}/{gateway_id}/events/{priority}",
                "title": "Events",
                "description": LiteralScalarString(_EVENTS_DESCRIPTION),
                "parameters": params(*gateway, "priority"),
                "messages": {"eventBatch": _ref("#/components/messages/eventBatch")},
            },
            "status": {
                "address": "{prefix}/{site_id}/{gateway_id}/status",
                "title": "Gateway status",
                "description": LiteralScalarString(_STATUS_DESCRIPTION),
                "parameters": params(*gateway),
                "messages": {
                    "gatewayStatus": _ref("#/components/messages/gatewayStatus"),
                    "lastWill": _ref("#/components/messages/lastWill"),
                },
            },
            "commandRequests": {
                "address": "{prefix}/{site_id}/{gateway_id}/cmd/req",
                "title": "Command requests",
                "description": LiteralScalarString(_CMD_REQ_DESCRIPTION),
                "parameters": params(*gateway),
                "messages": {"commandRequest": _ref("#/components/messages/commandRequest")},
            },
            "commandResults": {
                "address": "{prefix}/{site_id}/{gateway_id}/cmd/res",
                "title": "Command results",
                "description": LiteralScalarString(_CMD_RES_DESCRIPTION),
                "parameters": params(*gateway),
                "messages": {"commandResult": _ref("#/components/messages/commandResult")},
            },
        },
        "operations": {
            "sendEvents": {
                "action": "send",
                "summary": "Publish batches of events, one priority class per message.",
                "channel": _ref("#/channels/events"),
                "messages": [_ref("#/channels/events/messages/eventBatch")],
                "bindings": _mqtt_operation(retain=False),
            },
            "sendStatus": {
                "action": "send",
                "summary": "Publish the retained online/offline state (and register it as Last Will).",
                "channel": _ref("#/channels/status"),
                "messages": [_ref("#/channels/status/messages/gatewayStatus"),
                             _ref("#/channels/status/messages/lastWill")],
                "bindings": _mqtt_operation(retain=True),
            },
            "receiveCommands": {
                "action": "receive",
                "summary": "Receive signed command requests from the platform.",
                "channel": _ref("#/channels/commandRequests"),
                "messages": [_ref("#/channels/commandRequests/messages/commandRequest")],
                "bindings": _mqtt_operation(retain=False),
                "reply": {
                    "channel": _ref("#/channels/commandResults"),
                    "messages": [_ref("#/channels/commandResults/messages/commandResult")],
                },
            },
            "sendCommandResults": {
                "action": "send",
                "summary": "Publish the outcome of each command request.",
                "channel": _ref("#/channels/commandResults"),
                "messages": [_ref("#/channels/commandResults/messages/commandResult")],
                "bindings": _mqtt_operation(retain=False),
            },
        },
        "components": {
            "parameters": {
                "prefix": {"default": DEFAULT_TOPIC_PREFIX,
                           "description": "Topic prefix configured on the gateway; may contain '/'."},
                "site_id": {"description": "Site id of the gateway (one topic level)."},
                "gateway_id": {"description": "Gateway id (one topic level)."},
                "priority": {"enum": [p.label for p in Priority],
                             "description": "Priority class of every event in the message."},
            },
            "messages": {
                "eventBatch": {
                    "name": "eventBatch",
                    "title": "Event batch",
                    "contentType": "application/json",
                    "payload": _ref(schemas_dir + BATCH_SCHEMA_FILE),
                },
                "gatewayStatus": {
                    "name": "gatewayStatus",
                    "title": "Gateway status",
                    "contentType": "application/json",
                    "payload": _ref(schemas_dir + STATUS_SCHEMA_FILE),
                    "examples": _examples(STATUS_SCHEMA_FILE, ["online"]),
                },
                "lastWill": {
                    "name": "lastWill",
                    "title": "Last Will",
                    "summary": "Published by the broker when the gateway's connection is lost.",
                    "contentType": "application/json",
                    "payload": _ref(schemas_dir + STATUS_SCHEMA_FILE),
                    "examples": _examples(STATUS_SCHEMA_FILE, ["lastWill"]),
                },
                "commandRequest": {
                    "name": "commandRequest",
                    "title": "Signed command request",
                    "contentType": "application/json",
                    "payload": _ref(schemas_dir + COMMAND_REQUEST_SCHEMA_FILE),
                    "bindings": {"mqtt": {
                        "responseTopic": {
                            "type": "string",
                            "description": "MQTT 5 response topic; must start with "
                            "{prefix}/{site_id}/{gateway_id}/cmd/res.",
                        },
                        "correlationData": {"description": "Opaque bytes, echoed on the result."},
                        "bindingVersion": _MQTT_BINDING_VERSION,
                    }},
                    "examples": _examples(COMMAND_REQUEST_SCHEMA_FILE),
                },
                "commandResult": {
                    "name": "commandResult",
                    "title": "Command result",
                    "contentType": "application/json",
                    "payload": _ref(schemas_dir + COMMAND_RESULT_SCHEMA_FILE),
                    "bindings": {"mqtt": {
                        "correlationData": {"description": "The request's correlation data, if it had any."},
                        "bindingVersion": _MQTT_BINDING_VERSION,
                    }},
                    "examples": _examples(COMMAND_RESULT_SCHEMA_FILE),
                },
            },
            "schemas": {
                "commandBody": _ref(schemas_dir + COMMAND_BODY_SCHEMA_FILE),
                **{t.name: _ref(schemas_dir + schema_file_for(t.name)) for t in registry},
            },
        },
    }


# --- rendering, writing, checking ------------------------------------------------------------------

def _dump_json(schema: JsonObject) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _dump_yaml(document: JsonObject) -> str:
    yaml = YAML(typ="rt")
    yaml.width = 4096  # no folding of long plain scalars
    yaml.representer.ignore_aliases = lambda _data: True
    yaml.representer.add_representer(
        type(None), lambda rep, _data: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    yaml.indent(mapping=2, sequence=4, offset=2)
    buf = io.StringIO()
    buf.write(f"# {GENERATED_NOTE}\n")
    yaml.dump(document, buf)
    return buf.getvalue()


def render_contract(registry: EventRegistry = REGISTRY) -> dict[str, str]:
    """Every contract file: path relative to the contract directory (POSIX) -> text."""
    files: dict[str, str] = {}
    for event_type in registry:
        rel = f"{SCHEMAS_SUBDIR}/{schema_file_for(event_type.name)}"
        files[rel] = _dump_json(envelope_schema(event_type))
    fixed = {
        BATCH_SCHEMA_FILE: batch_schema(registry),
        STATUS_SCHEMA_FILE: status_schema(),
        COMMAND_REQUEST_SCHEMA_FILE: command_request_schema(),
        COMMAND_BODY_SCHEMA_FILE: command_body_schema(),
        COMMAND_RESULT_SCHEMA_FILE: command_result_schema(),
    }
    clash = set(fixed) & {schema_file_for(t.name) for t in registry}
    if clash:
        raise ValueError(f"event type schema file names clash with fixed schemas: {sorted(clash)}")
    for name, schema in fixed.items():
        files[f"{SCHEMAS_SUBDIR}/{name}"] = _dump_json(schema)
    files[ASYNCAPI_FILE] = _dump_yaml(asyncapi_document(registry))
    return dict(sorted(files.items()))


def _orphans(directory: Path, expected: Mapping[str, str]) -> Iterator[str]:
    """Schema files present on disk that the code no longer generates (e.g. a removed type)."""
    schemas = directory / SCHEMAS_SUBDIR
    if not schemas.is_dir():
        return
    for path in sorted(schemas.glob("*.json")):
        rel = f"{SCHEMAS_SUBDIR}/{path.name}"
        if rel not in expected:
            yield rel


def stale_files(directory: Path = CONTRACT_DIR, registry: EventRegistry = REGISTRY) -> list[str]:
    """Contract files that are missing, differ from what the code generates, or are obsolete."""
    expected = render_contract(registry)
    stale = []
    for rel, text in expected.items():
        path = directory / rel
        if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
            stale.append(rel)
    stale.extend(_orphans(directory, expected))
    return sorted(stale)


def write_contract(directory: Path = CONTRACT_DIR, registry: EventRegistry = REGISTRY) -> list[str]:
    """(Re)generate the contract files; returns those written or removed."""
    expected = render_contract(registry)
    changed = []
    for rel, text in expected.items():
        path = directory / rel
        data = text.encode("utf-8")
        if path.is_file() and path.read_bytes() == data:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        changed.append(rel)
    for rel in list(_orphans(directory, expected)):
        (directory / rel).unlink()
        changed.append(rel)
    _load_schemas.cache_clear()
    return sorted(changed)


# --- validation (needs jsonschema, a development dependency) ---------------------------------------

_RFC3339_RE = re.compile(RFC3339_PATTERN)
_DOTTED_NAME_RE = re.compile(DOTTED_NAME_PATTERN)


def is_rfc3339(value: object) -> bool:
    """The ``date-time`` format check: RFC 3339 syntax and a real calendar instant."""
    if not isinstance(value, str):
        return True  # formats only constrain strings
    if not _RFC3339_RE.match(value):
        return False
    # RFC 3339 allows a leap second; datetime does not, so check the instant a second earlier.
    candidate = value[:17] + "59" + value[19:] if value[17:19] == "60" else value
    try:
        datetime.fromisoformat(candidate)
    except ValueError:
        return False
    return True


def format_checker() -> FormatChecker:
    """jsonschema's format checker with ``date-time`` checked even without optional packages."""
    from jsonschema import FormatChecker  # noqa: PLC0415 - development dependency

    checker = FormatChecker()
    checker.checks("date-time")(is_rfc3339)
    return checker


@functools.cache
def _load_schemas(directory: Path) -> tuple[dict[str, JsonObject], Any]:
    from referencing import Registry, Resource  # noqa: PLC0415 - comes with jsonschema

    schemas: dict[str, JsonObject] = {}
    for path in sorted((directory / SCHEMAS_SUBDIR).glob("*.json")):
        schemas[path.name] = json.loads(path.read_text(encoding="utf-8"))
    if not schemas:
        raise FileNotFoundError(f"no contract schemas under {directory / SCHEMAS_SUBDIR}; run --write")
    resources = [(s["$id"], Resource.from_contents(s)) for s in schemas.values()]
    return schemas, Registry().with_resources(resources)


def schema_validator(file_name: str, directory: Path = CONTRACT_DIR) -> Draft202012Validator:
    """A validator for one committed schema file (``schemas/<file_name>``), references resolved."""
    from jsonschema import Draft202012Validator  # noqa: PLC0415 - development dependency

    schemas, registry = _load_schemas(directory)
    try:
        schema = schemas[file_name]
    except KeyError:
        raise LookupError(f"no contract schema {file_name!r} in {directory / SCHEMAS_SUBDIR}") from None
    return Draft202012Validator(schema, registry=registry, format_checker=format_checker())


def validator_for(type_name: str, directory: Path = CONTRACT_DIR) -> Draft202012Validator:
    """A validator for the envelope of one event type."""
    return schema_validator(schema_file_for(type_name), directory)


def validate_envelope(envelope: Mapping[str, Any], directory: Path = CONTRACT_DIR) -> None:
    """Raise ``jsonschema.ValidationError`` unless the envelope fits the schema of its own type."""
    from jsonschema import ValidationError  # noqa: PLC0415 - development dependency

    type_name = envelope.get("type")
    schemas, _ = _load_schemas(directory)
    # Event types are dotted names, so the batch, status and command schemas never match one.
    if not isinstance(type_name, str) or not _DOTTED_NAME_RE.match(type_name) \
            or schema_file_for(type_name) not in schemas:
        raise ValidationError(f"unknown event type {type_name!r}")
    validator_for(type_name, directory).validate(envelope)


def validate_batch(message: Mapping[str, Any], directory: Path = CONTRACT_DIR) -> None:
    schema_validator(BATCH_SCHEMA_FILE, directory).validate(message)


def validate_status(message: Mapping[str, Any], directory: Path = CONTRACT_DIR) -> None:
    schema_validator(STATUS_SCHEMA_FILE, directory).validate(message)


def validate_command_request(message: Mapping[str, Any], directory: Path = CONTRACT_DIR) -> None:
    """Check the request and the command in its body (the signature needs keys, so it is not checked)."""
    from jsonschema import ValidationError  # noqa: PLC0415 - development dependency

    schema_validator(COMMAND_REQUEST_SCHEMA_FILE, directory).validate(message)
    try:
        body = json.loads(message["body"])
    except ValueError as exc:
        raise ValidationError(f"command body is not JSON: {exc}") from exc
    schema_validator(COMMAND_BODY_SCHEMA_FILE, directory).validate(body)


def validate_command_result(message: Mapping[str, Any], directory: Path = CONTRACT_DIR) -> None:
    schema_validator(COMMAND_RESULT_SCHEMA_FILE, directory).validate(message)


# --- command line ----------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgeagent.cloud_bridge.contract",
        description="Generate or check the published cloud contract (cloud-bridge/contract/).",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the contract files")
    mode.add_argument("--check", action="store_true", help="exit 1 if the committed files are stale")
    parser.add_argument("--dir", type=Path, default=CONTRACT_DIR, help="contract directory")
    args = parser.parse_args(argv)
    directory: Path = args.dir
    if args.write:
        changed = write_contract(directory)
        for rel in changed:
            print(f"wrote {directory / rel}" if (directory / rel).exists() else f"removed {directory / rel}")
        print(f"{len(changed)} file(s) changed in {directory}")
        return 0
    stale = stale_files(directory)
    if stale:
        for rel in stale:
            print(f"stale: {directory / rel}", file=sys.stderr)
        print("the contract is out of date; run: python -m edgeagent.cloud_bridge.contract --write",
              file=sys.stderr)
        return 1
    print(f"contract up to date ({len(render_contract())} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
