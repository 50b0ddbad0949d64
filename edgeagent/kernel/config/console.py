"""The ``console:`` section: the guard-room console the daemon serves (``edgeagent.console``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from edgeagent.kernel.config.base import Strict


class ConsoleTLSConfig(Strict):
    cert_file: Path | None = Field(default=None, description="PEM certificate (chain); default: a self-signed one "
                                   "made at first start in <state_dir>/console/tls")
    key_file: Path | None = Field(default=None, description="its PEM private key (readable by the daemon only)")
    hosts: list[str] = Field(default_factory=list, max_length=16,
                             description="extra names or addresses the self-signed certificate covers")

    @model_validator(mode="after")
    def _pair(self) -> ConsoleTLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file, or neither (a self-signed pair is made)")
        return self


class ConsoleConfig(Strict):
    """The guard room's and the installer's web page, served by the daemon over HTTPS with local accounts
    (``edgeagent console add-user``)."""

    enabled: bool = True
    host: str = Field(default="127.0.0.1", description="address to listen on; the installer sets the LAN address "
                      "of the guard-room network (loopback: this box only)")
    port: int = Field(default=8443, ge=0, le=65535)
    tls: ConsoleTLSConfig = ConsoleTLSConfig()
    session_idle_s: float = Field(default=12 * 3600, gt=60, le=7 * 86_400,
                                  description="a session unused this long ends (a guard's shift)")
