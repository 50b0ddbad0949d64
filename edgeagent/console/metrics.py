"""The console's figures on ``/metrics`` (``edgeagent_console_*``), read from the running console when Prometheus
scrapes: connected screens, screens dropped for falling behind, refused streams, sessions, refused logins, audit
events that could not be stored."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# (metric suffix, help, key in ConsoleServer.stats(), counter?)
_FIGURES: tuple[tuple[str, str, str, bool], ...] = (
    ("screens", "Screens connected to the live feed", "clients", False),
    ("screens_dropped", "Screens dropped for falling CLIENT_QUEUE messages behind", "dropped_clients", True),
    ("screens_refused", "Live feed connections refused (MAX_CLIENTS reached)", "refused_clients", True),
    ("feed_messages", "Messages put on the live feed", "messages", True),
    ("sessions", "Logged-in sessions", "sessions", False),
    ("sessions_evicted", "Sessions ended because MAX_SESSIONS was reached", "sessions_evicted", True),
    ("sessions_save_failed", "Failed writes of the sessions file (kept across restarts)", "sessions_save_failed",
     True),
    ("logins_rate_limited", "Login attempts refused by the login limit", "logins_refused", True),
    ("audit_not_stored", "console.audit events the outbox did not take", "audit_failed", True),
)


class ConsoleCollector(Collector):
    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        st = self._stats()
        for suffix, help_text, key, counter in _FIGURES:
            name = f"edgeagent_console_{suffix}"
            family: Any = CounterMetricFamily(name, help_text) if counter else GaugeMetricFamily(name, help_text)
            family.add_metric([], float(st.get(key, 0)))
            yield family
