"""Located errors for YAML files validated by pydantic: where an error sits in the round-trip (ruamel)
document, the key path as the file writes it, and the problem in plain words. One implementation for every
YAML file edgeagent reads (the config file, Modbus device profiles), so their messages cannot drift apart::

    /etc/edgeagent/edgeagent.yaml:14:3: uplink.keepalive_s: must be at least 5 (got 0)
    gate.yaml:31:7: registers[4].address: holding 10..11 ('mode') overlaps 'command' (registers[3], holding 11)

Locations are walked in the document and in the model's annotations side by side. The annotations tell a
union tag pydantic puts into a location (``devices[0]`` → ``'modbus.gate'`` → ``bus``) from a key that is not
in the file (a missing one), and which model owns a key, so an unknown key gets the keys allowed there and
the closest one ("did you mean 'port'?"), in nested sections, lists, maps of sections and unions alike.
"""

from __future__ import annotations

import collections.abc
import difflib
import re
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Tag, ValidationError
from ruamel.yaml.comments import CommentedMap, CommentedSeq

Loc = tuple[int | str, ...]
Issue = tuple[Loc, str]
Pos = tuple[int, int]

_HIDDEN = "<hidden>"
_BOUNDS = {"greater_than_equal": "at least", "greater_than": "more than", "less_than_equal": "at most",
           "less_than": "less than"}


class LocatedIssues(ValueError):
    """Several problems found by one validator, each with its location relative to the validated model;
    :func:`format_errors` reports each at its own place in the file."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        self.issues = list(issues)
        first = self.issues[0][1] if self.issues else "invalid"
        more = f" (and {len(self.issues) - 1} more)" if len(self.issues) > 1 else ""
        super().__init__(first + more)


# --- the file -----------------------------------------------------------------------------------------

def read_text_file(path: Path, error: Callable[[str], Exception], missing: str = "no such file") -> str:
    """A YAML file's text; every failure raised as ``error(message)`` naming the file, in the same words for
    every kind of file (``missing`` says what to do when it does not exist)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None


# --- the document ------------------------------------------------------------------------------------

def child(node: Any, part: int | str) -> tuple[Any, Pos] | None:
    """The child of a YAML node and its (line, column), 1-based; None if absent."""
    if isinstance(node, CommentedMap) and isinstance(part, str):
        key = next((k for k in node if str(k) == part), None)  # YAML int keys (a profile's states) match '3'
        if key is None:
            return None
        ln, col = node.lc.key(key)
        return node[key], (ln + 1, col + 1)
    if isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
        ln, col = node.lc.item(part)
        return node[part], (ln + 1, col + 1)
    return None


# --- the model's annotations ---------------------------------------------------------------------------

def _unwrap(ann: Any) -> Any:
    """Without Annotated[...] and without ``| None``."""
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


def _is_union(ann: Any) -> bool:
    return typing.get_origin(ann) in (typing.Union, UnionType)


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _tag(member: Any) -> str | None:
    if typing.get_origin(member) is Annotated:
        return next((m.tag for m in typing.get_args(member)[1:] if isinstance(m, Tag)), None)
    return None


def _literals(model: type[BaseModel]) -> Iterable[tuple[str, tuple[Any, ...]]]:
    for name, f in model.model_fields.items():
        if typing.get_origin(f.annotation) is Literal:
            yield name, typing.get_args(f.annotation)


def _union_member(ann: Any, part: int | str) -> Any:
    """The member a union tag in a location stands for (a ``Tag`` or a discriminator's literal), or None."""
    ann = _unwrap(ann)
    if not _is_union(ann):
        return None
    for member in typing.get_args(ann):
        model = _unwrap(member)
        if part == _tag(member) or (_is_model(model) and part == model.__name__):  # plain unions: the class
            return model
        if _is_model(model) and any(part in values for _name, values in _literals(model)):
            return model
    return None


def _by_document(ann: Any, node: Any) -> Any:
    """A union's member picked by the document itself (its discriminator key, e.g. a device's ``type``)."""
    ann = _unwrap(ann)
    if not _is_union(ann) or not isinstance(node, Mapping):
        return ann
    picked = [m for m in map(_unwrap, typing.get_args(ann))
              if _is_model(m) and any(node.get(name) in values for name, values in _literals(m) if name in node)]
    return picked[0] if len(picked) == 1 else ann


def _step_into(ann: Any, part: int | str) -> Any:
    """The annotation of ``part`` below ``ann``, or None when it cannot be told."""
    ann = _unwrap(ann)
    if _is_model(ann):
        field = ann.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field is not None else None
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin in (list, tuple, collections.abc.Sequence) and isinstance(part, int) and args:
        return args[0]
    if origin in (dict, collections.abc.Mapping) and isinstance(part, str) and len(args) == 2:
        return args[1]
    return None


def _is_field(ann: Any, part: int | str) -> bool:
    ann = _unwrap(ann)
    return _is_model(ann) and isinstance(part, str) and part in ann.model_fields


# --- locations -------------------------------------------------------------------------------------------

def _walk(doc: Any, loc: Loc, root: Any) -> tuple[Pos, str, Any, Any]:
    """(position, key path as written, annotation, node) at the end of ``loc``."""
    node, pos, dotted, ann = doc, (1, 1), "", root

    def add(part: int | str) -> None:
        nonlocal dotted
        dotted += f"[{part}]" if isinstance(part, int) else ("." if dotted else "") + str(part)

    for n, part in enumerate(loc):
        if part == "[key]":  # pydantic's marker for a bad mapping key: the key is the part before it
            continue
        found = child(node, part)
        if found is not None:
            parent = node
            node, pos = found
            add(part)
            ann = _step_into(_by_document(ann, parent), part) if ann is not None else None
            continue
        member = _union_member(ann, part) if ann is not None else None
        if member is not None:  # a union tag pydantic put into the location
            ann = member
            continue
        if ann is not None and _is_field(_by_document(ann, node), part):  # a key that is not in the file
            add(part)
            ann = _step_into(_by_document(ann, node), part)
            node = None
            continue
        if ann is None and node is not None and isinstance(part, str) and (
                not isinstance(node, CommentedMap | CommentedSeq) or n < len(loc) - 1):
            continue  # nothing to ask: a name not in the file, with more below it, is taken for a union tag
        add(part)
        ann = _step_into(ann, part) if ann is not None else None
        node = None
    return pos, dotted or "(top level)", ann, node


def locate(doc: Any, loc: Loc, root: Any = None) -> tuple[Pos, str]:
    """(line, column), 1-based, of the deepest node of ``loc`` present in the document, and ``loc`` as the
    file writes it (``registers[3].events[0].bit``, ``devices[2].bus``). ``root`` is the validated model."""
    pos, dotted, _ann, _node = _walk(doc, loc, root)
    return pos, dotted


def model_at(root: Any, loc: Loc, doc: Any) -> type[BaseModel] | None:
    """The model that owns the last key of ``loc`` (to list the keys it allows), or None."""
    _pos, _dotted, ann, node = _walk(doc, loc[:-1], root)
    model = _by_document(ann, node) if ann is not None else None
    return model if _is_model(model) else None


def unknown_key(root: Any, loc: Loc, doc: Any) -> str:
    """'unknown key', with the keys allowed there and the closest one to what was written."""
    model = model_at(root, loc, doc) if loc else None
    if model is None:
        return "unknown key"
    allowed = sorted(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}allowed here: {', '.join(allowed)})"


# --- plain words -----------------------------------------------------------------------------------------

def plain(err: Mapping[str, Any], *, root: Any = None, doc: Any = None, patterns: Mapping[str, str] | None = None,
          tag_invalid: Callable[[Mapping[str, Any]], str] | None = None, tag_missing: str | None = None,
          hide: re.Pattern[str] | None = None) -> str:
    """One pydantic error in plain words. ``patterns`` maps a regex to a message (``{got!r}`` is the value);
    ``tag_invalid`` / ``tag_missing`` word a union's bad or missing tag; a location with a part matching
    ``hide`` never echoes the value (a secret may sit there)."""
    kind = str(err["type"])
    msg = str(err["msg"])
    ctx = err.get("ctx") or {}
    got = err.get("input")
    hidden = hide is not None and any(isinstance(p, str) and hide.search(p) for p in err["loc"])
    shown = f" (got {type(got).__name__} {got!r})" if not hidden else ""
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a section of keys{shown}"
    if kind == "string_type" and isinstance(got, int | float) and not isinstance(got, bool) and not hidden:
        return f"must be text; YAML read {got!r} as a number: put it in quotes"
    if kind == "list_type":
        return f"must be a list (got {type(got).__name__})"
    if kind == "extra_forbidden":
        return unknown_key(root, tuple(err["loc"]), doc) if root is not None else "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        if tag_invalid is not None:
            return tag_invalid(ctx)
        return f"{ctx.get('discriminator')} cannot be {ctx.get('tag')!r} (expected one of {ctx.get('expected_tags')})"
    if kind == "union_tag_not_found":
        return tag_missing or f"needs a {ctx.get('discriminator')} key"
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind]} {next(iter(ctx.values()), '?')}" + (f" (got {got!r})" if not hidden else "")
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern"))
        shown_value = _HIDDEN if hidden else repr(got)
        if patterns and pattern in patterns:
            return patterns[pattern].format(got=shown_value)
        return f"{shown_value} is not allowed here (must match {pattern})"
    if kind == "literal_error":
        return f"{_HIDDEN if hidden else repr(got)} is not one of {ctx.get('expected')}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s)"
    if kind.endswith(("_type", "_parsing")):
        lowered = f"{msg[0].lower()}{msg[1:]}" if msg else msg
        return lowered + ("" if isinstance(got, dict | list) else shown)
    return msg.removeprefix("Value error, ")


# --- whole messages --------------------------------------------------------------------------------------

def _lines(path: Path | str, doc: Any, issues: Iterable[Issue], root: Any) -> list[tuple[Pos, str]]:
    out = []
    for loc, message in issues:
        pos, dotted = locate(doc, loc, root)
        out.append((pos, f"{path}:{pos[0]}:{pos[1]}: {dotted}: {message}"))
    return out


def _join(located: list[tuple[Pos, str]]) -> str:
    """In file order, each line once (a union's members can report the same thing twice)."""
    seen: set[str] = set()
    lines = []
    for _pos, line in sorted(located, key=lambda x: x[0]):
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)


def format_issues(path: Path | str, doc: Any, issues: Iterable[Issue], root: Any = None) -> str:
    """Problems found after validation (cross-checks), each as ``path:line:col: key.path: message``."""
    return _join(_lines(path, doc, issues, root))


def format_errors(path: Path | str, doc: Any, exc: ValidationError, *, root: Any,
                  **words: Any) -> str:
    """Every error of a validation, located; ``words`` go to :func:`plain`. A validator that raised
    :class:`LocatedIssues` has each of its issues reported at its own place."""
    located: list[tuple[Pos, str]] = []
    for err in exc.errors(include_url=False):
        base: Loc = tuple(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, LocatedIssues):
            located += _lines(path, doc, ((base + loc, message) for loc, message in cause.issues), root)
        else:
            located += _lines(path, doc, [(base, plain(err, root=root, doc=doc, **words))], root)
    return _join(located)


def to_builtin(node: Any) -> Any:
    """A parsed (round-trip) YAML node as plain dicts (string keys) and lists: what pydantic validates, and
    what two documents are compared by when only their content matters."""
    if isinstance(node, Mapping):
        return {str(k): to_builtin(v) for k, v in node.items()}
    if isinstance(node, list):
        return [to_builtin(v) for v in node]
    return node


__all__ = ["Issue", "Loc", "LocatedIssues", "child", "format_errors", "format_issues", "locate", "model_at",
           "plain", "to_builtin", "unknown_key"]
