"""One located-error formatter (edgeagent/kernel/config/yamlerr.py) for the config file and device profiles:
each keeps what the other did better. Before, the two copies had drifted: the config file named no allowed
keys under a map of sections (a bus under modbus.buses), and a profile did not say to quote a number where
text belongs (both failed on the old copies)."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeagent.capabilities import validate_doc
from edgeagent.drivers.modbus.profile import ProfileError, parse_profile
from edgeagent.kernel.config import yamlerr
from edgeagent.kernel.config.schema import parse_yaml
from edgeagent.kernel.errors import ConfigError

CONFIG = """\
version: 1
site_id: s1
gateway_id: g1
modbus:
  buses:
    shed: {kind: tcp, host: 10.0.0.9, prot: 502}
"""

PROFILE = """\
model: m
vendor: v
description: d
registers:
  - {name: a, table: holding, address: 0, unit: 5}
"""


def test_config_unknown_key_in_a_map_of_sections_says_what_is_allowed() -> None:
    with pytest.raises(ConfigError) as err:
        validate_doc(parse_yaml(CONFIG, "c.yaml"), "c.yaml")
    assert "c.yaml:6:39: modbus.buses.shed.prot: unknown key (did you mean 'port'?" in str(err.value), err.value


def test_profile_number_where_text_belongs_says_to_quote_it() -> None:
    with pytest.raises(ProfileError) as err:
        parse_profile(PROFILE, "p.yaml")
    assert "p.yaml:5:43: registers[0].unit: must be text; YAML read 5 as a number: put it in quotes" in str(err.value)


class _Sensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["sensor"]
    interval_s: float = Field(gt=0)


class _Relay(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["relay"]
    channels: dict[str, int] = Field(default_factory=dict)


class _Root(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    devices: list[_Sensor | _Relay] = Field(default_factory=list)


def _errors(text: str) -> str:
    doc = parse_yaml(text, "x.yaml")
    with pytest.raises(ValidationError) as exc:
        _Root.model_validate(dict(doc))
    return yamlerr.format_errors("x.yaml", doc, exc.value, root=_Root)


def test_union_members_are_told_apart_by_the_document_without_a_tag() -> None:
    # A plain union (no discriminator): pydantic reports under each member's name; the walk still finds the
    # device's own model from its 'type' key, and skips the member names in the key path.
    out = _errors("name: n\ndevices:\n  - {type: relay, chanels: {a: 1}}\n")
    assert "x.yaml:3:19: devices[0].chanels: unknown key (did you mean 'channels'?" in out, out
    located = yamlerr.locate(parse_yaml("devices:\n  - {type: relay}\n", "y"), ("devices", 0, "_Relay", "channels"),
                             _Root)
    assert located == ((2, 5), "devices[0].channels")


def test_a_missing_key_below_a_missing_section_keeps_its_whole_path() -> None:
    doc = parse_yaml("name: n\n", "x.yaml")
    assert yamlerr.locate(doc, ("devices", 0, "interval_s"), _Root) == ((1, 1), "devices[0].interval_s")


def test_issues_are_ordered_by_place_and_reported_once() -> None:
    doc = parse_yaml("name: n\ndevices:\n  - {type: sensor, interval_s: 1}\n", "x.yaml")
    issues = [(("devices", 0, "interval_s"), "too slow"), (("name",), "taken"), (("name",), "taken")]
    assert yamlerr.format_issues("x.yaml", doc, issues, _Root).splitlines() == [
        "x.yaml:1:1: name: taken", "x.yaml:3:20: devices[0].interval_s: too slow"]
