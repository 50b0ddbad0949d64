"""Shared pieces of the CLI: where the config is, loading it with a friendly error, output helpers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from edgeagent.capabilities import load_config
from edgeagent.kernel.config.schema import Config
from edgeagent.kernel.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/edgeagent/edgeagent.yaml")

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def default_config_path() -> Path:
    return Path(os.environ.get("EDGEAGENT_CONFIG", str(DEFAULT_CONFIG)))


ConfigOption = typer.Option(
    None, "--config", "-c", help="config file (default: $EDGEAGENT_CONFIG or /etc/edgeagent/edgeagent.yaml)",
    show_default=False)
JsonOption = typer.Option(False, "--json", help="machine-readable output")


def config_path(path: Path | None) -> Path:
    return path if path is not None else default_config_path()


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def load_or_exit(path: Path | None) -> tuple[Path, Config]:
    p = config_path(path)
    try:
        return p, load_config(p)
    except ConfigError as exc:
        err_console.print("[bold red]config error[/]")
        err_console.print(str(exc), soft_wrap=True, markup=False)
        raise typer.Exit(2) from None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
