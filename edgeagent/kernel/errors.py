"""The few exception types of each boundary. Adapters translate library errors into these, keeping
the cause (``raise X from exc``); nothing returns None to mean failure."""

from __future__ import annotations


class EdgeagentError(Exception):
    """Base of every error edgeagent raises on purpose."""


class ConfigError(EdgeagentError):
    """The configuration file is missing, unreadable or invalid. The message is for an installer."""


class SecretError(ConfigError):
    """A secret reference cannot be resolved. The message names the reference, never the value."""


class OutboxError(EdgeagentError):
    """The outbox could not do what was asked; the event is not accepted."""


class OutboxClosedError(OutboxError):
    """The outbox is closed (the daemon is stopping)."""


class OutboxCorruptError(OutboxError):
    """The outbox database file is damaged (failed its integrity check or is not SQLite)."""


class OutboxFullError(OutboxError):
    """The disk is full even after evicting what may be evicted."""


class UplinkError(EdgeagentError):
    """The cloud uplink failed (connection refused, TLS, authentication, broker gone)."""


class UplinkAuthError(UplinkError):
    """The broker refused our credentials or certificate. Retrying will not help until fixed."""


class DeviceUnavailable(EdgeagentError):
    """A device does not answer (timeout, connection refused, unplugged)."""


class DeviceProtocolError(EdgeagentError):
    """A device answered with something we cannot use (exception response, garbage, wrong length)."""


class CommandRejected(EdgeagentError):
    """A cloud command failed verification or cannot run. ``code`` is stable, for the platform."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
