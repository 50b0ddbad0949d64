"""``edgeagent device``: list, add and remove devices in the config file.

``add`` and ``remove`` edit the file in place and keep its comments and layout: the document is
loaded round-trip, only the ``devices`` list changes, the whole result is validated before anything
is written, and the file is replaced atomically with its mode kept. The daemon reads the file at
start, so a change takes effect with ``systemctl restart edgeagent``.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import typer
from rich.markup import escape
from rich.table import Table
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, YAMLError
from ruamel.yaml.tokens import CommentToken

from edgeagent.capabilities import DEVICE_TYPES, PROBES, validate_doc
from edgeagent.cli.common import (
    ConfigOption,
    JsonOption,
    config_path,
    console,
    fail,
    load_or_exit,
    print_json,
)
from edgeagent.cli.config_edit import dump, is_block, last_slot, put_lines, take_lines, write_atomically
from edgeagent.kernel.capability import ProbeContext
from edgeagent.kernel.config import yamlerr
from edgeagent.kernel.config.schema import Config, DeviceBase, parse_yaml
from edgeagent.kernel.errors import ConfigError, EdgeagentError

app = typer.Typer(no_args_is_help=True, help="List, add and remove devices in the config file.")

# "Test before configure": each capability's spec brings the probes of its device types
# (edgeagent.capabilities.PROBES); ``device add`` runs the device's probe before it writes anything.


_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED = {"type", "id"}


# --- keeping comments where they belong --------------------------------------------------------------
# The shared moves are in edgeagent.cli.config_edit; these two are for the devices list alone: the
# comment lines between ``devices:`` and its first item.


def _take_pre(doc: CommentedMap, key: str) -> str:
    """Detach the comment lines between ``key:`` and the first item of its block list."""
    entry = doc.ca.items.get(key)
    if not entry or not entry[3]:
        return ""
    tokens = entry[3]
    entry[3] = None
    value = doc[key]
    if isinstance(value, CommentedSeq) and value.ca.comment:
        value.ca.comment = None
    return "".join(" " * (t.column or 0) + str(t.value) for t in tokens)


def _put_pre(doc: CommentedMap, key: str, text: str) -> None:
    """Add comment lines before the first item of the block list at ``key``."""
    if not text:
        return
    seq = doc[key]
    if not isinstance(seq, CommentedSeq):
        return
    indent = len(text) - len(text.lstrip(" "))
    token = CommentToken(text[indent:], CommentMark(indent))
    # The parser shares this list with the key's entry in the parent; the emitter reads the list's.
    if seq.ca.comment and seq.ca.comment[1]:
        seq.ca.comment[1].append(token)
    else:
        seq.ca.comment = [None, [token]]


# --- list ------------------------------------------------------------------------------------------

@app.command("list")
def list_devices(config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """List the configured devices with their settings (defaults filled in)."""
    path, cfg = load_or_exit(config)
    devices = [d.model_dump(mode="json") for d in cfg.devices]
    if as_json:
        print_json(devices)
        return
    if not devices:
        console.print(f"no devices in {escape(str(path))}; add one with [bold]edgeagent device add "
                      f"TYPE --id ID[/] (types: {', '.join(sorted(DEVICE_TYPES))})")
        return
    t = Table(title=f"{len(devices)} devices in {escape(str(path))}", title_justify="left", box=None,
              header_style="bold", pad_edge=False)
    for col in ("id", "type", "enabled", "name"):
        t.add_column(col, no_wrap=True)
    t.add_column("settings", ratio=1)
    for d in devices:
        rest = {k: v for k, v in d.items() if k not in ("id", "type", "enabled", "name")}
        t.add_row(escape(d["id"]), escape(d["type"]), "yes" if d["enabled"] else "[yellow]no[/]",
                  escape(d.get("name") or ""), escape(" ".join(f"{k}={v}" for k, v in rest.items())))
    console.print(t)


# --- add / remove ----------------------------------------------------------------------------------

def _wants_text(model: type[DeviceBase] | None, key: str) -> bool:
    """True for a text setting, whose value is taken as written (``--set contact=1`` is "1")."""
    field = model.model_fields.get(key) if model is not None else None
    if field is None:
        return False
    ann = field.annotation
    members = get_args(ann) if get_origin(ann) in (Union, UnionType) else (ann,)
    return [m for m in members if m is not type(None)] == [str]


def parse_set(items: list[str], model: type[DeviceBase] | None = None) -> dict[str, Any]:
    """``key=value`` pairs; values are YAML scalars (``5`` is a number, ``true`` a bool, ``a b`` text),
    except for text settings of ``model``, which keep the value as written."""
    scalar = YAML(typ="safe", pure=True)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.match(key):
            raise typer.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="'--set'")
        if key in _RESERVED:
            raise typer.BadParameter(f"{key!r} is given with its own option (TYPE, --id)",
                                     param_hint="'--set'")
        if _wants_text(model, key):
            out[key] = raw
            continue
        try:
            value = scalar.load(raw) if raw.strip() else ""
        except YAMLError:
            value = raw  # not valid YAML (e.g. an unbalanced quote): take the text as it is
        if isinstance(value, dict | list):
            raise typer.BadParameter(f"{key}: only single values (text, numbers, true/false) can be set",
                                     param_hint="'--set'")
        out[key] = value
    return out


def _device_ids(seq: Any) -> list[str]:
    if not isinstance(seq, list):
        return []
    return [str(d.get("id")) for d in seq if isinstance(d, dict)]


def _block_seq(items: list[Any]) -> CommentedSeq:
    seq = CommentedSeq(items)
    seq.fa.set_block_style()
    return seq


def _empty_flow_seq() -> CommentedSeq:
    seq = CommentedSeq()
    seq.fa.set_flow_style()
    return seq


def load_doc(path: Path) -> tuple[str, CommentedMap]:
    """The config file's text and its round-trip document (exits with a plain message when unreadable).
    With :func:`validate_edit` and :func:`commit_edit`, the edit cycle ``edgeagent modbus bus add`` shares."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        fail(escape(f"{path}: no such file; create one with 'edgeagent init --config {path}'"))
    except (OSError, UnicodeDecodeError) as exc:
        fail(escape(f"{path}: cannot read: {exc}"))
    try:
        return text, parse_yaml(text, path)
    except ConfigError as exc:
        fail(escape(str(exc)))


def _show_diff(path: Path, old: str, new: str) -> None:
    lines = difflib.unified_diff(old.splitlines(), new.splitlines(), str(path), str(path), n=1, lineterm="")
    for line in lines:
        if line.startswith(("---", "+++")):
            continue
        style = {"+": "green", "-": "red", "@": "cyan"}.get(line[:1], "dim")
        console.print(f"[{style}]{escape(line)}[/]", soft_wrap=True)


def validate_edit(path: Path, doc: CommentedMap) -> tuple[str, Config]:
    """The text to write for ``doc`` and the config it makes, validated as a whole (exits on errors)."""
    new_text = dump(doc)
    try:
        reread = parse_yaml(new_text, path)
        cfg = validate_doc(reread, path)
    except ConfigError as exc:
        fail(escape(f"{path} left unchanged:\n{exc}"))
    if yamlerr.to_builtin(reread) != yamlerr.to_builtin(doc):  # a safety net for the comment moves above
        fail(escape(f"{path} left unchanged: the edited YAML does not read back the same (a bug; "
                    "please edit the file by hand)"))
    return new_text, cfg


def commit_edit(path: Path, old_text: str, new_text: str, summary: str) -> None:
    """Write the edited file atomically (refused when it changed meanwhile), print the summary and the diff."""
    if dump(parse_yaml(old_text, path)) != old_text:
        console.print("[yellow]note:[/] the YAML writer also normalised the layout of other lines; "
                      "see the diff")
    try:
        write_atomically(path, new_text, old_text)
    except (OSError, ConfigError) as exc:
        fail(escape(f"cannot write {path}: {exc}"))
    console.print(summary)
    _show_diff(path, old_text, new_text)
    console.print("[dim]restart the daemon to apply: systemctl restart edgeagent[/]")


@app.command("add")
def add_device(
    dev_type: str = typer.Argument(..., metavar="TYPE", help=f"one of: {', '.join(sorted(DEVICE_TYPES))}"),
    *,
    dev_id: str = typer.Option(..., "--id", help="device id, unique on this gateway"),
    name: str | None = typer.Option(None, "--name", help="human label, local only"),
    settings: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="a setting of this device type; repeat for more")] = None,
    no_probe: bool = typer.Option(False, "--no-probe",
                                  help="skip the connection test for device types that have one"),
    config: Path | None = ConfigOption,
) -> None:
    """Add a device to the config file (comments and layout are kept)."""
    if dev_type not in DEVICE_TYPES:
        fail(escape(f"unknown device type {dev_type!r}; known types: {', '.join(sorted(DEVICE_TYPES))}"))
    values = parse_set(settings or [], DEVICE_TYPES[dev_type])
    add_to_config(config_path(config), dev_type, dev_id, values, name=name, probe=not no_probe)


def add_to_config(path: Path, dev_type: str, dev_id: str, values: dict[str, Any], *, name: str | None = None,
                  probe: bool = True) -> None:
    """Append a device to the config file at ``path``, keeping comments and layout: validate the whole
    result, run the type's probe (unless ``probe`` is false), then write. Exits with a message on any
    failure, leaving the file as it was."""
    old_text, doc = load_doc(path)
    existing = doc.get("devices")
    if dev_id in _device_ids(existing):
        fail(escape(f"a device with id {dev_id!r} is already in {path}; remove it first or pick another id"))

    entry = CommentedMap()
    entry["type"] = dev_type
    entry["id"] = dev_id
    if name is not None:
        entry["name"] = name
    for key, value in values.items():
        entry[key] = value
    # Comment lines that follow the list stay after it (below the new device).
    after = "" if "devices" not in doc or is_block(existing) else take_lines((doc, "devices", 2))
    if isinstance(existing, CommentedSeq) and len(existing) > 0:
        after += take_lines(last_slot(existing))
        existing.fa.set_block_style()
        existing.append(entry)
        put_lines(last_slot(existing), after)
    else:
        # Missing, null or an empty flow list (`devices: []`): a block list in its place.
        doc["devices"] = _block_seq([entry])
        put_lines(last_slot(doc["devices"]), after)

    new_text, cfg = validate_edit(path, doc)
    device = next((d for d in cfg.devices if d.id == dev_id), None)
    check = PROBES.get(dev_type)
    if check is not None and probe and device is not None:
        console.print(f"testing {escape(dev_type)} device {escape(dev_id)}...")
        try:
            detail = check(device, ProbeContext(cfg, path))
        except (EdgeagentError, OSError, TimeoutError) as exc:
            fail(escape(f"the device does not answer as configured, {path} left unchanged: {exc}\n"
                        "(fix the settings, or add it anyway with --no-probe)"))
        console.print(f"[green]ok[/] {escape(detail or '')}")
    commit_edit(path, old_text, new_text, f"added {escape(dev_type)} device [bold]{escape(dev_id)}[/] "
                                 f"to {escape(str(path))}")


@app.command("remove")
def remove_device(
    dev_id: str = typer.Argument(..., metavar="ID", help="id of the device to remove"),
    config: Path | None = ConfigOption,
) -> None:
    """Remove a device from the config file (comments and layout are kept)."""
    path = config_path(config)
    old_text, doc = load_doc(path)
    existing = doc.get("devices")
    ids = _device_ids(existing)
    if dev_id not in ids:
        known = ", ".join(ids) if ids else "none"
        fail(escape(f"no device {dev_id!r} in {path} (devices: {known})"))
    assert isinstance(existing, CommentedSeq)
    index = next(i for i, d in enumerate(existing) if isinstance(d, dict) and str(d.get("id")) == dev_id)
    dev_type = existing[index].get("type", "?")
    # Comment lines after the removed device were about what follows it: they stay in place.
    after = take_lines(last_slot(existing[index]))
    del existing[index]
    if len(existing) == 0:
        before = _take_pre(doc, "devices")
        doc["devices"] = _empty_flow_seq()
        put_lines((doc, "devices", 2), before + after)
    elif index > 0:
        put_lines(last_slot(existing[index - 1]), after)
    else:
        _put_pre(doc, "devices", after)
    new_text, _ = validate_edit(path, doc)
    commit_edit(path, old_text, new_text, f"removed {escape(str(dev_type))} device [bold]{escape(dev_id)}[/] "
                                 f"from {escape(str(path))}")
