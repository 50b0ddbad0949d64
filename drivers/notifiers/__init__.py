"""Alarm notifiers that work with the internet down, and the hub that fans messages out to them.

One module per seam (config in :mod:`edgeagent.kernel.alarms.notify_config`), each notifier implementing
:class:`edgeagent.kernel.alarms.notify.Notifier`:

- :mod:`.mqtt`: :class:`MqttNotifier`, JSON on a topic of the box's local broker (a guard-room panel subscribes);
- :mod:`.webhook`: :class:`WebhookNotifier`, the same JSON POSTed over HTTP(S), optionally HMAC-signed with a
  timestamp and a key id (``X-Edgeagent-Signature: t=<unix s>,kid=<key id>,v1=<hex HMAC-SHA256 of "<t>." + body>``;
  a receiver refuses stale and replayed calls, see :mod:`.webhook`);
- :mod:`.sms`: :class:`SmsModemNotifier`, an SMS through a GSM/LTE modem spoken to with AT commands on a serial port;
- :mod:`.hub`: :class:`NotifierHub`, what the alarm runtime calls (fan-out, retries, bounded pending deliveries);
- :mod:`.registry`: the ``type`` of a notifier's config -> how to build it; :mod:`.common`: the shared JSON body.

Failures come out as :class:`~edgeagent.kernel.alarms.notify.NotifyError`, cause kept; ``permanent`` says that a retry
cannot help (a 4xx answer, a number the network rejects, a wrong SIM PIN).

Logging: a phone number shows only its last 4 digits, message bodies never show at info level or above, and a
webhook URL shows without its user info and query string.

Everything public is re-exported here, so ``from edgeagent.drivers.notifiers import NotifierHub`` keeps working.
"""

from edgeagent.drivers.notifiers.common import Now, mask_number, payload
from edgeagent.drivers.notifiers.hub import HubStats, NotifierHub, Outcome
from edgeagent.drivers.notifiers.mqtt import MqttNotifier, Publish
from edgeagent.drivers.notifiers.registry import NOTIFIER_TYPES, AnyNotifierConfig, Builder
from edgeagent.drivers.notifiers.sms import (
    CMS_PERMANENT,
    CMS_TRANSIENT,
    CTRL_Z,
    ESC,
    UCS2_MAX_CHARS,
    SmsModemNotifier,
    SmsText,
    encode_sms,
)
from edgeagent.drivers.notifiers.webhook import (
    SIGNATURE_HEADER,
    SIGNATURE_TOLERANCE_S,
    WebhookNotifier,
    key_id_of,
    signature,
    verify_signature,
)

__all__ = [
    "CMS_PERMANENT",
    "CMS_TRANSIENT",
    "CTRL_Z",
    "ESC",
    "NOTIFIER_TYPES",
    "SIGNATURE_HEADER",
    "SIGNATURE_TOLERANCE_S",
    "UCS2_MAX_CHARS",
    "AnyNotifierConfig",
    "Builder",
    "HubStats",
    "MqttNotifier",
    "NotifierHub",
    "Now",
    "Outcome",
    "Publish",
    "SmsModemNotifier",
    "SmsText",
    "WebhookNotifier",
    "encode_sms",
    "key_id_of",
    "mask_number",
    "payload",
    "signature",
    "verify_signature",
]
