"""Device profiles as data, loaded with located errors; the public face of the profile modules.

:func:`load_profile` / :func:`parse_profile` read a profile file (the format is drawn in
:mod:`edgeagent.drivers.modbus.profile_model`) and report each problem with its place in the file, as the
config loader does::

    gate.yaml:31:7: registers[4].address: holding 10..11 ('mode') overlaps 'command' (registers[3], holding 11)

:func:`shipped_profiles` gives the profiles shipped in ``profiles/``. The model's and the planner's public
names are re-exported here, so ``edgeagent.drivers.modbus.profile`` stays the one import for callers.
"""

from __future__ import annotations

import difflib
import functools
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType, UnionType
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    Tag,
    ValidationError,
)
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from edgeagent.drivers.modbus.plan import (
    BIT_TABLES,
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    TABLES,
    Readable,
    ReadBlock,
    Slice,
    Table,
    plan_reads,
)
from edgeagent.drivers.modbus.profile_model import (
    _EVENT_RE,
    _NAME_RE,
    MAX_PAUSE_S,
    WRITABLE_TABLES,
    ArgDef,
    ArgRef,
    CommandDef,
    CommandError,
    Defaults,
    EventTrigger,
    Loc,
    OnChange,
    OnEdge,
    OnState,
    OnThreshold,
    Pause,
    PauseStep,
    Point,
    PointValue,
    Ports,
    Profile,
    ProfileError,
    ProfileIssues,
    ReadLimits,
    RegisterDef,
    Telemetry,
    Write,
    WriteStep,
)
from edgeagent.kernel.config.schema import parse_yaml
from edgeagent.kernel.errors import ConfigError

__all__ = [
    "BIT_TABLES",
    "MAX_PAUSE_S",
    "MAX_READ_BITS",
    "MAX_READ_REGISTERS",
    "TABLES",
    "WRITABLE_TABLES",
    "ArgDef",
    "ArgRef",
    "CommandDef",
    "CommandError",
    "Defaults",
    "EventTrigger",
    "OnChange",
    "OnEdge",
    "OnState",
    "OnThreshold",
    "Pause",
    "PauseStep",
    "Point",
    "PointValue",
    "Ports",
    "Profile",
    "ProfileError",
    "ProfileIssues",
    "ReadBlock",
    "ReadLimits",
    "Readable",
    "RegisterDef",
    "Slice",
    "Table",
    "Telemetry",
    "Write",
    "WriteStep",
    "load_profile",
    "parse_profile",
    "plan_reads",
    "shipped_profile",
    "shipped_profiles",
]


# --- loading with located errors -----------------------------------------------------------------------

def load_profile(path: Path | str) -> Profile:
    """Read and validate a profile file; every failure is a :class:`ProfileError` with a location."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{p}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ProfileError(f"{p}: cannot read: {exc.strerror}") from None
    return parse_profile(text, p)


def parse_profile(text: str, path: Path | str = "<profile>") -> Profile:
    """Validate profile text; ``path`` only names the source in error messages."""
    if all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()):
        raise ProfileError(f"{path}: the profile is empty")
    try:
        doc = parse_yaml(text, path)
    except ProfileError:
        raise
    except ConfigError as exc:
        raise ProfileError(str(exc)) from None
    try:
        return Profile.model_validate(_to_builtin(doc))
    except ValidationError as exc:
        raise ProfileError(_format_errors(path, doc, exc)) from None


_PROFILES_PACKAGE: Final = "edgeagent.drivers.modbus"


@functools.cache
def shipped_profiles() -> Mapping[str, Profile]:
    """The profiles shipped in ``profiles/*.yaml``, by model name (read once)."""
    folder = resources.files(_PROFILES_PACKAGE).joinpath("profiles")
    found: dict[str, Profile] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        prof = parse_profile(entry.read_text(encoding="utf-8"), str(entry))
        if prof.model in found:
            raise ProfileError(f"{entry}: model {prof.model!r} is shipped twice")
        found[prof.model] = prof
    return MappingProxyType(found)


def shipped_profile(model: str) -> Profile:
    profiles = shipped_profiles()
    try:
        return profiles[model]
    except KeyError:
        raise ProfileError(f"no shipped Modbus profile {model!r} (shipped: {', '.join(sorted(profiles))})") from None


def _to_builtin(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {str(k): _to_builtin(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_to_builtin(v) for v in node]
    return node


def _child(node: Any, part: int | str) -> tuple[Any, tuple[int, int] | None] | None:
    """The child of a YAML node and its (line, column), 1-based; None if absent."""
    if isinstance(node, CommentedMap) and isinstance(part, str):
        key = next((k for k in node if str(k) == part), None)  # YAML int keys (states) match '3'
        if key is None:
            return None
        ln, col = node.lc.key(key)
        return node[key], (ln + 1, col + 1)
    if isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
        ln, col = node.lc.item(part)
        return node[part], (ln + 1, col + 1)
    return None


def _locate(doc: Any, loc: Loc) -> tuple[tuple[int, int], str]:
    """(line, column) of the deepest node of ``loc`` in the document, and ``loc`` as written there
    (``registers[3].events[0].bit``), skipping the union tags pydantic adds to locations."""
    node, pos, dotted = doc, (1, 1), ""
    for n, part in enumerate(loc):
        found = _child(node, part)
        if found is None:
            # A union tag pydantic puts in the location ('rising', 'write_step', 'literal'), or the '[key]'
            # marker: below a scalar always, below a mapping when more follows.
            if isinstance(part, str) and (not isinstance(node, CommentedMap | CommentedSeq) or n < len(loc) - 1):
                continue
            if part != "[key]":
                dotted += f"[{part}]" if isinstance(part, int) else ("." if dotted else "") + str(part)
            break
        node, pos = found[0], (found[1] or pos)
        dotted += f"[{part}]" if isinstance(part, int) else ("." if dotted else "") + str(part)
    return pos, dotted or "(top level)"


def _unwrap(ann: Any) -> Any:
    while True:
        origin = typing.get_origin(ann)
        if origin is Annotated:
            ann = typing.get_args(ann)[0]
            continue
        if origin in (typing.Union, UnionType):
            members = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(members) == 1:
                ann = members[0]
                continue
        return ann


def _tag(member: Any) -> str | None:
    if typing.get_origin(member) is Annotated:
        return next((m.tag for m in typing.get_args(member)[1:] if isinstance(m, Tag)), None)
    return None


def _step_into(ann: Any, part: int | str) -> Any:
    ann = _unwrap(ann)
    origin = typing.get_origin(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        field = ann.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field is not None else None
    if origin is list and isinstance(part, int):
        return typing.get_args(ann)[0]
    if origin is dict and isinstance(part, str):
        return typing.get_args(ann)[1]
    if origin in (typing.Union, UnionType):
        for member in typing.get_args(ann):
            model = _unwrap(member)
            if part == _tag(member):
                return model
            if isinstance(model, type) and issubclass(model, BaseModel):
                for f in model.model_fields.values():
                    if typing.get_origin(f.annotation) is Literal and part in typing.get_args(f.annotation):
                        return model
    return None


def _unknown_key(loc: Loc) -> str:
    """'unknown key', with the keys allowed there and the closest one to what was written."""
    ann: Any = Profile
    for part in loc[:-1]:
        ann = _step_into(ann, part)
        if ann is None:
            return "unknown key"
    model = _unwrap(ann)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return "unknown key"
    allowed = sorted(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}allowed here: {', '.join(allowed)})"


def _plain(err: Mapping[str, Any]) -> str:
    kind = str(err["type"])
    msg = str(err["msg"])
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind == "extra_forbidden":
        return _unknown_key(tuple(err["loc"]))
    if kind == "missing":
        return "required key is missing"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a section of keys (got {type(got).__name__} {got!r})"
    if kind == "list_type":
        return f"must be a list (got {type(got).__name__})"
    if kind == "union_tag_invalid":
        return f"{ctx.get('discriminator')} cannot be {ctx.get('tag')!r} (expected one of {ctx.get('expected_tags')})"
    if kind == "union_tag_not_found":
        return f"needs a {ctx.get('discriminator')} key"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = {"greater_than_equal": "at least", "greater_than": "more than",
                 "less_than_equal": "at most", "less_than": "less than"}[kind]
        return f"must be {bound} {next(iter(ctx.values()), '?')} (got {got!r})"
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern") == _NAME_RE:
            return f"{got!r} is not a snake_case name (lower-case letters and digits joined by '_')"
        if ctx.get("pattern") == _EVENT_RE:
            return f"{got!r} is not an event type (dotted lower-case, e.g. gate.state_changed)"
        return f"{got!r} is not allowed here (must match {ctx.get('pattern')})"
    if kind == "literal_error":
        return f"{got!r} is not one of {ctx.get('expected')}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s)"
    if kind.endswith(("_type", "_parsing")) and not isinstance(got, dict | list):
        return f"{msg[0].lower()}{msg[1:]} (got {type(got).__name__} {got!r})"
    return msg.removeprefix("Value error, ")


def _format_errors(path: Path | str, doc: Any, exc: ValidationError) -> str:
    located: list[tuple[tuple[int, int], str]] = []
    for err in exc.errors(include_url=False):
        base: Loc = tuple(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        found = ([(base + loc, msg) for loc, msg in cause.issues] if isinstance(cause, ProfileIssues)
                 else [(base, _plain(err))])
        for loc, msg in found:
            pos, dotted = _locate(doc, loc)
            located.append((pos, f"{path}:{pos[0]}:{pos[1]}: {dotted}: {msg}"))
    seen: set[str] = set()
    lines = []
    for _pos, line in sorted(located, key=lambda x: x[0]):
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)
