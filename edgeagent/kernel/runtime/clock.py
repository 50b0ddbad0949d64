"""Wall clock with synchronisation state, for boxes that have no real-time clock.

Until the kernel reports the clock synchronised (NTP/chrony/timesyncd clear ``STA_UNSYNC``), event
times are marked unsynced and carry the monotonic time; the outbox corrects them when sync arrives.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from edgeagent.kernel.pipeline.events import ClockStamp

log = logging.getLogger(__name__)

_TIME_ERROR = 5  # adjtimex() return value while the clock is not synchronised


def read_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        # Not Linux: a per-process id still ties monotonic stamps to one clock epoch.
        return f"proc-{uuid.uuid4()}"


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # The running program's own symbols include libc's; no ldconfig lookup (a subprocess) needed.
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def kernel_clock_synced() -> bool:
    """True when the kernel says the clock is synchronised (adjtimex() is not TIME_ERROR).

    A zeroed buffer larger than ``struct timex`` has ``modes = 0``, which only reads state. One
    system call: cheap enough for the event loop's heartbeat.
    """
    libc = _libc()
    adjtimex = getattr(libc, "adjtimex", None)
    if adjtimex is None:
        return True  # not Linux: cannot tell, so trust the clock rather than mark every event
    buf = ctypes.create_string_buffer(512)
    state = adjtimex(buf)
    if state < 0:
        # A seccomp filter (systemd's ProtectClock=) refuses even reading: say so once, trust the clock.
        log.warning("adjtimex() refused (errno %d); treating the clock as synchronised", ctypes.get_errno())
        return True
    return bool(state != _TIME_ERROR)


SyncMode = Literal["auto", "synced", "unsynced"]


class Clock:
    """Stamps events; knows whether the wall clock can be trusted."""

    def __init__(
        self,
        mode: SyncMode = "auto",
        *,
        wall: Callable[[], float] = time.time,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        sync_probe: Callable[[], bool] = kernel_clock_synced,
        boot_id: str | None = None,
    ) -> None:
        self._mode = mode
        self._wall = wall
        self._mono = monotonic_ns
        self._probe = sync_probe
        self.boot_id = boot_id or read_boot_id()
        self._synced = self._initial_sync()

    def _initial_sync(self) -> bool:
        if self._mode == "synced":
            return True
        if self._mode == "unsynced":
            return False
        return self._probe()

    @property
    def synced(self) -> bool:
        return self._synced

    def poll(self) -> bool:
        """Re-check sync state; returns True exactly when the clock just became synchronised."""
        if self._synced or self._mode == "unsynced":
            return False
        if self._probe():
            self._synced = True
            return True
        return False

    def mark_synced(self) -> None:
        """For tests and the 'unsynced' mode's manual end: treat the clock as synchronised from now."""
        self._synced = True

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._wall(), tz=UTC)

    def monotonic_ns(self) -> int:
        return self._mono()

    def stamp(self) -> ClockStamp:
        return ClockStamp(wall=self.now(), monotonic_ns=self._mono(), boot_id=self.boot_id,
                          synced=self._synced)

    def corrected_wall(self, monotonic_ns: int) -> datetime:
        """Wall time of a past monotonic instant, from the (now trusted) clock."""
        delta_s = (self._mono() - monotonic_ns) / 1e9
        return datetime.fromtimestamp(self._wall() - delta_s, tz=UTC)
