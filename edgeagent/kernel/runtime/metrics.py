"""Prometheus metrics of the daemon, in one registry (served on /metrics by the health endpoint)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_ACCEPTED = Counter("edgeagent_events_accepted_total", "Events made durable in the outbox",
                          ["priority"], registry=REGISTRY)
EVENTS_REJECTED = Counter("edgeagent_events_rejected_total", "Events the outbox refused or dropped at intake",
                          ["priority", "reason"], registry=REGISTRY)
EVENTS_PUBLISHED = Counter("edgeagent_events_published_total", "Events acknowledged by the cloud broker",
                           ["priority"], registry=REGISTRY)
BATCHES_PUBLISHED = Counter("edgeagent_uplink_batches_total", "MQTT messages acknowledged by the broker",
                            registry=REGISTRY)
UPLINK_CONNECTED = Gauge("edgeagent_uplink_connected", "1 while connected to the cloud broker",
                         registry=REGISTRY)
UPLINK_CONNECTS = Counter("edgeagent_uplink_connects_total", "Successful connections to the cloud broker",
                          registry=REGISTRY)
UPLINK_FAILURES = Counter("edgeagent_uplink_failures_total", "Failed or lost connections", ["kind"],
                          registry=REGISTRY)
OUTBOX_UNSENT = Gauge("edgeagent_outbox_unsent", "Unsent events in the outbox", ["priority"], registry=REGISTRY)
OUTBOX_UNSENT_BYTES = Gauge("edgeagent_outbox_unsent_bytes", "Bytes of unsent events", ["priority"],
                            registry=REGISTRY)
OUTBOX_OLDEST_AGE = Gauge("edgeagent_outbox_oldest_unsent_age_seconds", "Age of the oldest unsent event",
                          ["priority"], registry=REGISTRY)
OUTBOX_EVICTED = Gauge("edgeagent_outbox_evicted_total", "Events evicted over the backlog cap (all time)",
                       registry=REGISTRY)
COMMANDS = Counter("edgeagent_commands_total", "Cloud commands by outcome", ["status"], registry=REGISTRY)
TASK_RESTARTS = Counter("edgeagent_task_restarts_total", "Supervised task restarts", ["task"],
                        registry=REGISTRY)
TASK_FAILED = Gauge("edgeagent_task_failed", "1 when a supervised task gave up", ["task"], registry=REGISTRY)
LOOP_LAG = Gauge("edgeagent_loop_lag_seconds", "Event-loop lag measured by the heartbeat", registry=REGISTRY)
WRISTBAND_REJECTED = Counter("edgeagent_wristband_rejected_total",
                             "Wristband payloads (or batch entries) rejected by the decoders", ["reason"],
                             registry=REGISTRY)
