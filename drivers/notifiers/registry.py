"""Which notifier each ``type`` of the ``notifiers`` config section builds (an explicit registry)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from edgeagent.drivers.notifiers.mqtt import MqttNotifier, Publish
from edgeagent.drivers.notifiers.sms import SmsModemNotifier
from edgeagent.drivers.notifiers.webhook import WebhookNotifier
from edgeagent.kernel.alarms.notify import Notifier
from edgeagent.kernel.alarms.notify_config import MqttNotifierConfig, SmsNotifierConfig, WebhookNotifierConfig
from edgeagent.kernel.errors import ConfigError

AnyNotifierConfig = MqttNotifierConfig | WebhookNotifierConfig | SmsNotifierConfig

Builder = Callable[[str, Any, Publish | None, Mapping[str, str] | None], tuple[Notifier, int]]


def _build_mqtt(name: str, cfg: MqttNotifierConfig, publish: Publish | None,
                _environ: Mapping[str, str] | None) -> tuple[Notifier, int]:
    if publish is None:
        raise ConfigError(f"notifiers.{name}: an mqtt notifier needs the local broker, and none is configured")
    return MqttNotifier(publish, cfg, name=name), MqttNotifier.concurrency


def _build_webhook(name: str, cfg: WebhookNotifierConfig, _publish: Publish | None,
                   environ: Mapping[str, str] | None) -> tuple[Notifier, int]:
    return WebhookNotifier(cfg, name=name, environ=environ), WebhookNotifier.concurrency


def _build_sms(name: str, cfg: SmsNotifierConfig, _publish: Publish | None,
               environ: Mapping[str, str] | None) -> tuple[Notifier, int]:
    return SmsModemNotifier(cfg, name=name, environ=environ), SmsModemNotifier.concurrency


NOTIFIER_TYPES: Final[dict[str, Builder]] = {
    "mqtt": _build_mqtt,
    "webhook": _build_webhook,
    "sms": _build_sms,
}
