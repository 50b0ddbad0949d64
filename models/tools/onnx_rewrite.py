"""The command line the model rewriting tools share: read the original file, check it is the one the tool was
written for (sha256), rewrite it, check the result, write it and print its sha256 for the manifest."""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import onnx


def run(argv: list[str] | None, *, description: str, original_help: str, original_sha256: str,
        convert: Callable[[onnx.ModelProto], onnx.ModelProto],
        check: Callable[[bytes, bytes], str | None] | None = None) -> int:
    """``check(original, converted)`` returns why the result is wrong, or None."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("original", type=Path, help=original_help)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    data = args.original.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != original_sha256:
        print(f"{args.original}: sha256 {digest[:16]}..., expected {original_sha256[:16]}... ({original_help})",
              file=sys.stderr)
        return 1
    out = convert(onnx.load_from_string(data)).SerializeToString(deterministic=True)
    problem = check(data, out) if check is not None else None
    if problem is not None:
        print(f"not written: {problem}", file=sys.stderr)
        return 1
    args.output.write_bytes(out)
    print(f"{args.output}: sha256 {hashlib.sha256(out).hexdigest()}")
    return 0
