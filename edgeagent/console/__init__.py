"""The guard-room console the daemon serves (HTTPS, local accounts): see :mod:`edgeagent.console.server`."""

from edgeagent.console.server import ConsoleContext, ConsoleServer, ConsoleTools

__all__ = ["ConsoleContext", "ConsoleServer", "ConsoleTools"]
