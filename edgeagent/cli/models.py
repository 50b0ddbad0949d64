"""``edgeagent models list|verify``: the ONNX models the box can use (shipped and the site's own)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from edgeagent.cli.common import ConfigOption, JsonOption, config_path, console, fail, print_json

app = typer.Typer(no_args_is_help=True, help="ONNX models: the shipped ones and the site's own (by manifest).")


def _site_dirs(config: Path | None, extra: list[Path] | None) -> list[Path]:
    """The config's cameras.model_dirs (when a config file is there), then --dir folders."""
    dirs: list[Path] = []
    path = config_path(config)
    if path.exists():
        from edgeagent.capabilities import load_config  # noqa: PLC0415
        from edgeagent.drivers.camera.config import CamerasConfig  # noqa: PLC0415
        from edgeagent.kernel.errors import ConfigError  # noqa: PLC0415

        try:
            cfg = load_config(path)
        except ConfigError as exc:
            fail(escape(str(exc)))
        section = getattr(cfg, "cameras", None)
        if isinstance(section, CamerasConfig):
            dirs.extend(section.model_dirs)
    dirs.extend(extra or [])
    return dirs


DirOption = typer.Option(None, "--dir", help="another manifest folder (repeat for more)")


@app.command("list")
def list_cmd(config: Path | None = ConfigOption, dirs: list[Path] | None = DirOption,
             as_json: bool = JsonOption) -> None:
    """Every model by name: task, input, decoder, licence, file."""
    from edgeagent.models.manifest import list_models  # noqa: PLC0415
    from edgeagent.models.types import ModelError  # noqa: PLC0415

    try:
        rows = list_models(_site_dirs(config, dirs))
    except ModelError as exc:
        fail(escape(str(exc)))
    if as_json:
        print_json(rows)
        return
    t = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("name", "task", "input", "decoder", "labels", "licence"):
        t.add_column(col, no_wrap=col != "licence", overflow="ellipsis", max_width=None if col != "licence" else 24)
    for r in rows:
        t.add_row(*(escape(str(r.get(k, ""))) for k in ("name", "task", "input", "decoder", "labels", "licence")))
    console.print(t)


@app.command("verify")
def verify_cmd(config: Path | None = ConfigOption, dirs: list[Path] | None = DirOption,
               as_json: bool = JsonOption) -> None:
    """Check every model file against its manifest's sha256 (exit 1 if one fails)."""
    from edgeagent.models.manifest import verify_models  # noqa: PLC0415

    results = verify_models(_site_dirs(config, dirs))
    if as_json:
        print_json([{"name": n, "ok": ok, "detail": d} for n, ok, d in results])
    else:
        for name, ok, detail in results:
            mark = "[green]ok[/]" if ok else "[red]FAIL[/]"
            console.print(f"{mark} {escape(name)}: {escape(detail)}")
    if not all(ok for _, ok, _ in results):
        raise typer.Exit(1)
