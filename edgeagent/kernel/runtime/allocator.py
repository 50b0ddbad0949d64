"""glibc's allocator, set the way a long-running camera daemon needs it, wherever the daemon is started.

Measured in the camera soak (bench/RESULTS.md, run E): with glibc's defaults every thread that allocates under
contention gets its own arena (the RTSP readers, the to_thread pool, the engine's dispatcher), and each arena
keeps what its thread freed: 34-83 MB of freed-but-resident heap at 4 busy cameras. Two settings bring that to
5-14 MB and the process 35-70 MB down:

* at most 2 arenas (``M_ARENA_MAX``);
* a fixed 128 KiB mmap threshold (``M_MMAP_THRESHOLD``): decoded pictures and detector crops (0.1-1.3 MB) are
  mapped and unmapped whole instead of being carved from a heap that cannot give them back. glibc's default
  threshold starts there but rises to the largest block ever freed, after which such blocks stay in the heap.

The systemd unit sets both as environment variables (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``);
:func:`tune` applies them in the process too (``edgeagent run`` from a shell, a container, the benchmarks),
unless the environment already chose. Call it before threads start. Not glibc (musl, macOS): nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

ARENA_MAX = 2
MMAP_THRESHOLD = 128 * 1024

# mallopt's parameter numbers (glibc malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_SETTINGS = (("MALLOC_ARENA_MAX", _M_ARENA_MAX, ARENA_MAX),
             ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def tune(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """Apply the settings the environment has not chosen; returns what was applied (variable name → value).
    Empty when this is not glibc or the environment set both."""
    env = os.environ if environ is None else environ
    wanted = [(name, param, value) for name, param, value in _SETTINGS if name not in env]
    if not wanted:
        return {}
    libc = _libc()
    if libc is None:
        return {}
    applied: dict[str, int] = {}
    for name, param, value in wanted:
        if libc.mallopt(param, value) == 1:  # 1 on success, 0 on error
            applied[name] = value
    return applied


__all__ = ["ARENA_MAX", "MMAP_THRESHOLD", "tune"]
