"""Device profiles as data, loaded with located errors; the public face of the profile modules.

:func:`load_profile` / :func:`parse_profile` read a profile file (the format is drawn in
:mod:`edgeagent.drivers.modbus.profile_model`) and report each problem with its place in the file, as the
config loader does::

    gate.yaml:31:7: registers[4].address: holding 10..11 ('mode') overlaps 'command' (registers[3], holding 11)

:func:`shipped_profiles` gives the profiles shipped in ``profiles/``. The model's and the planner's public
names are re-exported here, so ``edgeagent.drivers.modbus.profile`` stays the one import for callers.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from pydantic import (
    ValidationError,
)

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
from edgeagent.kernel.config import yamlerr
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
    return parse_profile(yamlerr.read_text_file(p, ProfileError), p)


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
        return Profile.model_validate(yamlerr.to_builtin(doc))
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


# How profiles word what the shared formatter (edgeagent.kernel.config.yamlerr) leaves open.
_PATTERNS: Final = {
    _NAME_RE: "{got} is not a snake_case name (lower-case letters and digits joined by '_')",
    _EVENT_RE: "{got} is not an event type (dotted lower-case, e.g. gate.state_changed)",
}


def _format_errors(path: Path | str, doc: Any, exc: ValidationError) -> str:
    return yamlerr.format_errors(path, doc, exc, root=Profile, patterns=_PATTERNS)
