"""The registry of capabilities, and the config model assembled from it.

Adding a capability (cameras, say) is one line in :data:`CAPABILITIES`: its spec brings its config
section, its device types, its cross-checks, its ``device add`` probes and its ``doctor`` checks
(see :mod:`edgeagent.kernel.capability` for the interface). The daemon, ``config validate``,
``device add`` and ``doctor`` all read this list and nothing else.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import Field, create_model
from ruamel.yaml.comments import CommentedMap

from edgeagent.drivers.camera.capability import SPEC as CAMERAS
from edgeagent.drivers.modbus.capability import SPEC as MODBUS
from edgeagent.drivers.sim.capability import SPEC as SIM
from edgeagent.drivers.wristband.capability import SPEC as WRISTBANDS
from edgeagent.kernel.capability import CapabilitySpec, DoctorCheck, Probe
from edgeagent.kernel.config import schema
from edgeagent.kernel.config.schema import CoreConfig, DeviceBase, Issue

# The explicit registry, in start-up order.
CAPABILITIES: tuple[CapabilitySpec[Any], ...] = (
    SIM,
    MODBUS,
    WRISTBANDS,
    CAMERAS,
)


class _AssembledConfig(CoreConfig):
    """The core sections plus every capability's; cross-checks include each capability's own."""

    specs: ClassVar[tuple[CapabilitySpec[Any], ...]] = ()

    def cross_checks(self) -> list[Issue]:
        issues = super().cross_checks()
        kinds = {kind.name for spec in type(self).specs for kind in spec.alarm_kinds}
        issues.extend(schema.alarm_kind_issues(self.alarms, kinds))
        for spec in type(self).specs:
            if spec.cross_checks is not None:
                issues.extend(spec.cross_checks(spec.section_of(self), spec.devices_of(self), self))
        return issues


def assemble(specs: Sequence[CapabilitySpec[Any]]) -> type[CoreConfig]:
    """The whole file's model: core sections, one section per capability that has one, and ``devices``
    as the discriminated union of every capability's device types (each type claimed by one capability)."""
    owner: dict[str, str] = {}
    classes: list[type[DeviceBase]] = []
    fields: dict[str, Any] = {}
    for spec in specs:
        for cls in spec.device_types:
            tag_field = cls.model_fields.get("type")
            tags = typing.get_args(tag_field.annotation) if tag_field is not None else ()
            if not tags:
                raise TypeError(f"{spec.name}: device class {cls.__name__} has no 'type: Literal[...]' field")
            for tag in tags:
                if tag in owner:
                    raise TypeError(f"device type {tag!r} is claimed by both {owner[tag]!r} and {spec.name!r}")
                owner[str(tag)] = spec.name
            classes.append(cls)
        if spec.section is not None and spec.section_model is not None:
            if spec.section in CoreConfig.model_fields or spec.section in fields:
                raise TypeError(f"{spec.name}: config section {spec.section!r} is already taken")
            if spec.optional:
                fields[spec.section] = (spec.section_model | None, None)
            else:
                fields[spec.section] = (spec.section_model, Field(default_factory=spec.section_model))
    if classes:
        union: Any = classes[0] if len(classes) == 1 else typing.Union[tuple(classes)]  # noqa: UP007 - runtime union
        item: Any = Annotated[union, Field(discriminator="type")]
        fields["devices"] = (list[item], Field(default_factory=list))
    else:
        fields["devices"] = (list[DeviceBase], Field(default_factory=list, max_length=0))
    model = create_model("Config", __base__=_AssembledConfig, __module__=__name__, **fields)
    model.specs = tuple(specs)
    return model


if TYPE_CHECKING:
    Config = CoreConfig
else:
    Config = assemble(CAPABILITIES)
DEVICE_TYPES: dict[str, type[DeviceBase]] = Config.device_types()
PROBES: dict[str, Probe] = {tag: probe for spec in CAPABILITIES for tag, probe in spec.probes.items()}


def validate_doc(doc: CommentedMap, path: Path | str) -> CoreConfig:
    return schema.validate_doc(doc, path, Config)


def load_config(path: Path) -> CoreConfig:
    """Read and validate the file against the assembled model; failures are located ConfigErrors."""
    return schema.load_config(path, Config)


def spec_for(name: str) -> CapabilitySpec[Any]:
    for spec in CAPABILITIES:
        if spec.name == name:
            return spec
    raise KeyError(name)


def doctor_checks(cfg: CoreConfig) -> list[DoctorCheck]:
    """Every capability's own ``doctor`` checks; a broken check is reported, the others still run."""
    checks: list[DoctorCheck] = []
    for spec in CAPABILITIES:
        if spec.doctor is None:
            continue
        try:
            checks.extend(spec.doctor(spec.section_of(cfg), cfg))
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the rest
            checks.append(DoctorCheck(spec.name, "fail", f"the check itself failed: {type(exc).__name__}: {exc}"))
    return checks
