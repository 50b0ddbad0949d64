"""The daemon sets glibc's allocator as the systemd unit does, wherever it is started (kernel/runtime/allocator.py).

Checked by behaviour, in a fresh interpreter: glibc's default mmap threshold rises to the largest mapped block
freed, so after a 1 MB block comes and goes a 512 KiB block is carved from the heap (where it can stay resident
for good); with the threshold fixed at 128 KiB it is mapped, and unmapped when freed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from edgeagent.kernel.runtime import allocator

PROBE = r"""
import ctypes, json, sys
from edgeagent.kernel.runtime import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
applied = allocator.tune() if sys.argv[1] == "tune" else {}
big = libc.malloc(1 << 20)
libc.free(big)
before = libc.mallinfo2().hblks
half = libc.malloc(512 * 1024)
mapped = libc.mallinfo2().hblks - before
libc.free(half)
print(json.dumps({"applied": applied, "mapped": mapped}))
"""


def probe(mode: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=60,
                         check=True)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_tune_fixes_the_mmap_threshold_and_caps_the_arenas() -> None:
    default = probe("none")
    tuned = probe("tune")
    assert default == {"applied": {}, "mapped": 0}  # the threshold rose to 1 MB: the heap took the block
    assert tuned == {"applied": {"MALLOC_ARENA_MAX": allocator.ARENA_MAX,
                                 "MALLOC_MMAP_THRESHOLD_": allocator.MMAP_THRESHOLD}, "mapped": 1}


def test_what_the_environment_chose_is_left_alone() -> None:
    both = {"MALLOC_ARENA_MAX": "4", "MALLOC_MMAP_THRESHOLD_": "65536"}
    assert allocator.tune(both) == {}
    # One chosen: only the other is applied (mallopt may be called again at any time; it only sets limits).
    assert set(allocator.tune({"MALLOC_ARENA_MAX": "4"})) <= {"MALLOC_MMAP_THRESHOLD_"}
