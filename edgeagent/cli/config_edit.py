"""Editing the config file in place with its comments kept: the pieces ``edgeagent device``, ``edgeagent
modbus bus add``, ``edgeagent console enable`` and the console's zone editor share.

The document is loaded round-trip (:func:`edgeagent.kernel.config.schema.parse_yaml`), changed, dumped
with :func:`dump`, compared by content (``yamlerr.to_builtin``) after a re-read, and written with
:func:`write_atomically`.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken

from edgeagent.kernel.config.schema import yaml_rt
from edgeagent.kernel.errors import ConfigError

# --- keeping comments where they belong --------------------------------------------------------------
# ruamel attaches the full-line comments that follow a node to the last key inside it (together with
# that key's end-of-line comment, in one token). Appending after, or deleting, the last item would
# otherwise move or drop the comments that follow a block; these helpers move such lines.

Slot = tuple[Any, Any, int]


def is_block(node: Any) -> bool:
    """True for a non-empty mapping or list written in block style (one item a line)."""
    return (isinstance(node, CommentedMap | CommentedSeq) and len(node) > 0
            and node.fa.flow_style() is not True)


def last_slot(node: Any) -> Slot | None:
    """Where the comment after the last line of ``node`` is kept: (container, key, position)."""
    if isinstance(node, CommentedMap) and len(node) > 0:
        key = list(node.keys())[-1]
        return (last_slot(node[key]) if is_block(node[key]) else None) or (node, key, 2)
    if isinstance(node, CommentedSeq) and len(node) > 0:
        idx = len(node) - 1
        return (last_slot(node[idx]) if is_block(node[idx]) else None) or (node, idx, 0)
    return None


def take_lines(slot: Slot | None) -> str:
    """Detach the full comment lines kept in ``slot``; an end-of-line comment stays."""
    if slot is None:
        return ""
    container, key, pos = slot
    entry = container.ca.items.get(key)
    if not entry or entry[pos] is None:
        return ""
    token = entry[pos]
    eol, _, rest = str(token.value).partition("\n")
    if not rest:
        return ""
    if eol:
        token.value = eol + "\n"
    else:
        entry[pos] = None
    return rest


def put_lines(slot: Slot | None, text: str) -> None:
    """Add full comment lines after what ``slot`` belongs to."""
    if slot is None or not text:
        return
    container, key, pos = slot
    entry = container.ca.items.setdefault(key, [None, None, None, None])
    token = entry[pos]
    if token is None:
        entry[pos] = CommentToken("\n" + text, CommentMark(0))
    else:
        value = str(token.value)
        token.value = (value if value.endswith("\n") else value + "\n") + text


# --- text in, text out -------------------------------------------------------------------------------

def dump(doc: CommentedMap) -> str:
    """The round-trip document as YAML text, comments included."""
    buf = io.StringIO()
    yaml_rt().dump(doc, buf)
    return buf.getvalue()


def write_atomically(path: Path, text: str, expected_old: str) -> None:
    """Replace ``path`` with ``text``: temp file in the same directory, fsync, rename; mode kept.

    Refuses (ConfigError) when the file changed since it was read, rather than losing that edit.
    """
    target = path.resolve()  # edit the file a symlink points to, keep the link
    st = target.stat()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(st.st_mode & 0o7777)
        with contextlib.suppress(OSError):  # only root may give the file to another owner
            os.chown(tmp, st.st_uid, st.st_gid)
        if target.read_text(encoding="utf-8") != expected_old:
            raise ConfigError(  # noqa: TRY301 - the temp file is removed below
                f"{path} changed while it was being edited; nothing written, try again")
        tmp.replace(target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
