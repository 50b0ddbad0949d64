"""Alarm kinds: what a capability declares about each alarm it can raise, and how one kind is handled.

The alarm lifecycle (:mod:`edgeagent.kernel.alarms.engine`) is a service for every capability. It knows
no kind of its own: each capability lists the kinds it raises in its spec
(``CapabilitySpec.alarm_kinds``), one :class:`AlarmKindSpec` each, and the daemon gathers them with
:func:`collect_kinds` (names unique across capabilities). A kind's spec carries its shipped
:class:`KindPolicy`; the site's ``alarms.policies.<kind>`` replaces it.

A kind is about a **resident** (a wristband SOS: the alarm carries ``resident_id``) or a **place** (an
e-bike in lift car 3, a charging shed, a façade: the alarm carries ``place``). Either way the alarm also
names the device that saw it first (a wristband, a camera, a charger).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

from edgeagent.kernel.pipeline.event_types import ALARM_KIND_PATTERN, AlarmSeverity

SEVERITIES: Final[tuple[str, ...]] = get_args(AlarmSeverity)
SIREN: Final = "siren"
STROBE: Final = "strobe"
_KIND_RE: Final = re.compile(ALARM_KIND_PATTERN)

AlarmSubject = Literal["resident", "place"]


def _positive(owner: str, name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}.{name} must be a positive number (got {value!r})")


@dataclass(frozen=True, slots=True)
class KindPolicy:
    """How one kind of alarm is handled.

    ``outputs``: named outputs (``CapabilityContext.outputs``: a siren, a strobe, a lift's door hold)
    switched on while it is unacknowledged.
    ``repeat_s``: notify again this often until acknowledged.
    ``escalate_after_s``: times after the first raise at which levels 1, 2, ... of its ladder are reached
    (strictly increasing; fewer entries than levels stops the ladder early; empty: the first level only).
    ``fold_window_s``: overrides :attr:`AlarmConfig.fold_window_s` for this kind.
    ``ladder``: the escalation ladder, by name (``alarms.ladders``); None is the site's main ladder
    (``alarms.levels``: the resident escalation the wristbands use).
    """

    severity: AlarmSeverity
    outputs: tuple[str, ...] = ()
    repeat_s: float = 60.0
    escalate_after_s: tuple[float, ...] = ()
    fold_window_s: float | None = None
    ladder: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "escalate_after_s", tuple(self.escalate_after_s))
        if self.severity not in SEVERITIES:
            raise ValueError(f"KindPolicy.severity must be one of {', '.join(SEVERITIES)} (got {self.severity!r})")
        _positive("KindPolicy", "repeat_s", self.repeat_s)
        if self.fold_window_s is not None:
            _positive("KindPolicy", "fold_window_s", self.fold_window_s)
        for t in self.escalate_after_s:
            _positive("KindPolicy", "escalate_after_s", t)
        if any(b <= a for a, b in zip(self.escalate_after_s, self.escalate_after_s[1:], strict=False)):
            raise ValueError(f"KindPolicy.escalate_after_s must be strictly increasing (got {self.escalate_after_s})")
        if not all(self.outputs):
            raise ValueError("KindPolicy.outputs: output names must not be empty")
        if self.ladder is not None and not self.ladder:
            raise ValueError("KindPolicy.ladder must not be empty (None: the main ladder)")

    @property
    def sounds_siren(self) -> bool:
        return SIREN in self.outputs


@dataclass(frozen=True, slots=True)
class AlarmKindSpec:
    """One kind of alarm a capability raises.

    ``name``: the kind in events and config (lower case, digits and ``_``; see ``ALARM_KIND_PATTERN``).
    ``description``: one line for people (the title of its notifications, ``edgeagent alarms``).
    ``subject``: ``"resident"`` (raised with a resident id) or ``"place"`` (raised with a place name).
    ``policy``: the shipped policy (severity, outputs, repeats, escalation, fold window), which the site's
    ``alarms.policies.<name>`` replaces as a whole.
    """

    name: str
    description: str
    policy: KindPolicy
    subject: AlarmSubject = "resident"

    def __post_init__(self) -> None:
        if isinstance(self.name, str):
            object.__setattr__(self, "name", str(self.name))  # a StrEnum member becomes its plain value
        if not isinstance(self.name, str) or not _KIND_RE.match(self.name):
            raise ValueError(f"alarm kind name {self.name!r} must match {ALARM_KIND_PATTERN}")
        if not self.description.strip() or "\n" in self.description:
            raise ValueError(f"alarm kind {self.name!r}: the description must be one non-empty line")
        if self.subject not in get_args(AlarmSubject):
            raise ValueError(f"alarm kind {self.name!r}: subject must be 'resident' or 'place' (got {self.subject!r})")

    @property
    def place(self) -> bool:
        return self.subject == "place"


def collect_kinds(declared: Iterable[tuple[str, Sequence[AlarmKindSpec]]]) -> dict[str, AlarmKindSpec]:
    """The kinds of every capability (``(capability name, its kinds)``), by name; ValueError naming both
    capabilities when two declare the same name."""
    kinds: dict[str, AlarmKindSpec] = {}
    owner: dict[str, str] = {}
    for cap, specs in declared:
        for spec in specs:
            if spec.name in owner:
                raise ValueError(f"alarm kind {spec.name!r} is declared by both {owner[spec.name]!r} and {cap!r}")
            owner[spec.name] = cap
            kinds[spec.name] = spec
    return kinds


def unknown_kinds(names: Iterable[str], kinds: Mapping[str, AlarmKindSpec]) -> list[str]:
    """The names that are no registered kind, in the order given."""
    return [n for n in names if n not in kinds]


def known_list(kinds: Mapping[str, AlarmKindSpec]) -> str:
    return ", ".join(sorted(kinds)) or "none"
