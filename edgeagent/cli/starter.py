"""The commented starter config that ``edgeagent init`` writes for a site."""

from __future__ import annotations

from edgeagent.kernel.config.schema import CONFIG_VERSION

_TEMPLATE = """\
# edgeagent configuration for site {site_id}, gateway {gateway_id}.
# Check it with `edgeagent config validate`; see it with secrets hidden with `edgeagent config show`.
# Secrets are never written here: give them as {{credential: NAME}} (systemd LoadCredential=),
# {{file: PATH}} or {{env: NAME}}.
version: {version}

# The compound, as the district platform knows it, and this box within it.
site_id: {site_id}
gateway_id: {gateway_id}

# Outbox and local state. Under systemd, $STATE_DIRECTORY (/var/lib/edgeagent) takes precedence.
state_dir: {state_dir}
log_level: info

clock:
  # auto: ask the kernel whether NTP has synchronised the clock (a Pi has no RTC); events raised
  # before that are marked and their times corrected once it is.
  sync: auto

outbox:
  cap_mb: 256          # unsent backlog cap: telemetry is evicted first, then events, never alarms
  history_mb: 16       # sent events kept for `edgeagent events list`
  min_free_mb: 64      # disk space left for the system
  durability: full     # full: survives power loss; normal: survives a crash of the daemon only

# The district platform's MQTT broker. Remove this section to run without an uplink.
uplink:
  broker: {broker}
  topic_prefix: edgeagent/v1
  protocol: auto       # MQTT 5, falling back to 3.1.1 when the broker refuses it
  keepalive_s: 30
{auth}
commands:
  enabled: true
  # The platform's Ed25519 public keys by key id (PEM or base64 of the raw 32 bytes). Without a key,
  # every command from the cloud is rejected.
  public_keys: {{}}
  #   platform-2026: /etc/edgeagent/platform-2026.pub
  max_ttl_s: 600

health:
  host: 127.0.0.1      # /healthz, /metrics, /status; keep on loopback
  port: 9108

# Modbus buses: an RS-485 line on a USB adapter, or a TCP connection to a device or to a DTU that
# carries RTU frames over TCP. Add with `edgeagent modbus bus add ID --kind rtu --serial /dev/ttyUSB0`.
# modbus:
#   buses:
#     shed-485: {{kind: rtu, serial_port: /dev/ttyUSB0, baudrate: 9600}}
#     gate-dtu: {{kind: rtu_over_tcp, host: 192.168.10.20, port: 502}}

# Devices on this gateway. Add with `edgeagent device add TYPE --id ID` (Modbus devices with
# `edgeagent modbus add gate|charger|relay`, which tests the device first), remove with
# `edgeagent device remove ID`. Examples:
#   - {{type: modbus.gate, id: car-gate, bus: gate-dtu, unit_id: 1}}
#   - {{type: modbus.charger, id: shed-a, bus: shed-485, unit_id: 2,
#      safety: {{max_current_a: 3.5, max_temperature_c: 65, full_after_s: 1800}}}}
#   - {{type: modbus.relay, id: guard-io, bus: shed-485, unit_id: 3, channels: {{1: siren, 2: strobe}}}}
devices: []
"""

_AUTH_TLS = """\
  username: {gateway_id}
  password: {{credential: mqtt-password}}
  # tls:
  #   ca_file: /etc/edgeagent/platform-ca.pem
  #   cert_file: /etc/edgeagent/client.pem        # mutual TLS
  #   key: {{credential: mqtt-client-key}}
"""

_AUTH_NONE = """\
  # username: {gateway_id}
  # password: {{credential: mqtt-password}}
"""


def starter_config(site_id: str, gateway_id: str, broker: str, state_dir: str, with_auth: bool = True) -> str:
    auth = (_AUTH_TLS if with_auth else _AUTH_NONE).format(gateway_id=gateway_id)
    return _TEMPLATE.format(version=CONFIG_VERSION, site_id=site_id, gateway_id=gateway_id, broker=broker,
                            state_dir=state_dir, auth=auth)
