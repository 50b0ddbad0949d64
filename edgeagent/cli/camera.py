"""``edgeagent camera``: find cameras, add one (tested before anything is saved), take a snapshot, run the
detector on a camera or a file and see what it finds (boxes, zones and lines drawn)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from edgeagent.cli.common import ConfigOption, JsonOption, config_path, console, err_console, fail, print_json

app = typer.Typer(no_args_is_help=True, help="IP cameras: discover, add, snapshot, detect.")


# --- getting a frame -------------------------------------------------------------------------------

def _camera(config: Path | None, name: str) -> Any:  # noqa: RET503 - fail() does not return
    from edgeagent.cli.common import load_or_exit  # noqa: PLC0415
    from edgeagent.drivers.camera.config import CameraDevice  # noqa: PLC0415

    _, cfg = load_or_exit(config)
    for dev in cfg.devices:
        if isinstance(dev, CameraDevice) and dev.id == name:
            return dev
    known = [d.id for d in cfg.devices if isinstance(d, CameraDevice)]
    fail(escape(f"no camera {name!r} in the config (cameras: {', '.join(known) or 'none'})"))


def _frame_from_daemon(config: Path | None, name: str) -> Any | None:
    """The running daemon's latest frame of the camera (it holds the camera's one RTSP session), or None when
    no daemon runs."""
    import cv2  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from edgeagent.app import RUNTIME_FILE, state_dir_for  # noqa: PLC0415
    from edgeagent.cli import local  # noqa: PLC0415
    from edgeagent.cli.common import load_or_exit, read_runtime  # noqa: PLC0415

    _, cfg = load_or_exit(config)
    if not read_runtime(state_dir_for(cfg), RUNTIME_FILE):
        return None
    result = local.call(config, "camera.snapshot", {"camera": name, "boxes": False})
    data = np.frombuffer(base64.b64decode(result["jpeg_b64"]), dtype=np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def _camera_frame(config: Path | None, name: str) -> Any:
    from edgeagent.drivers.camera.grab import camera_frame  # noqa: PLC0415
    from edgeagent.kernel.errors import EdgeagentError  # noqa: PLC0415

    frame = _frame_from_daemon(config, name)
    if frame is not None:
        return frame
    cam = _camera(config, name)
    try:
        return asyncio.run(camera_frame(cam))
    except EdgeagentError as exc:
        fail(escape(str(exc)))


def _write_jpeg(image: Any, out: Path) -> None:
    import cv2  # noqa: PLC0415

    ext = out.suffix.lower() or ".jpg"
    ok, data = cv2.imencode(ext if ext in (".jpg", ".jpeg", ".png") else ".jpg", image)
    if not ok:
        fail(f"cannot encode the image as {ext}")
    out.write_bytes(data.tobytes())


@app.command("snapshot")
def snapshot(name: str = typer.Argument(..., help="the camera's device id"),
             output: Path = typer.Option(..., "-o", "--output", help="JPEG (or PNG) file to write"),  # noqa: B008
             config: Path | None = ConfigOption) -> None:
    """Save the camera's current picture (from the running daemon's stream, else straight from the camera)."""
    image = _camera_frame(config, name)
    _write_jpeg(image, output)
    h, w = image.shape[:2]
    console.print(f"{escape(str(output))}: {w}x{h}")


@app.command("detect")
def detect(target: str = typer.Argument(..., metavar="NAME|FILE", help="a camera's device id, or an image/video"),
           output: Path | None = typer.Option(None, "-o", "--output", help="write the picture with boxes drawn"),  # noqa: B008
           classes: str | None = typer.Option(None, "--classes", help="comma-separated labels (default: all)"),
           model: str | None = typer.Option(None, "--model", help="detector manifest (default: cameras.detector)"),
           min_score: float | None = typer.Option(None, "--min-score", min=0.0, max=1.0),
           config: Path | None = ConfigOption, as_json: bool = JsonOption) -> None:
    """Run the detector on a camera's current picture or on a file; print what it finds."""
    from edgeagent.drivers.camera.evidence import draw_boxes  # noqa: PLC0415
    from edgeagent.drivers.camera.grab import read_image  # noqa: PLC0415

    cam = None
    path = Path(target)
    if path.exists():
        image = read_image(path)
    else:
        cam = _camera(config, target)
        image = _camera_frame(config, target)
    section = _cameras_section(config)
    name = model or (cam.detect.model if cam is not None and cam.detect.model else None) or section.detector
    found = asyncio.run(_detect(image, name, section))
    wanted = {c.strip() for c in classes.split(",") if c.strip()} if classes else None
    if wanted is not None:
        found = [d for d in found if d.label in wanted]
    if min_score is not None:
        found = [d for d in found if d.score >= min_score]
    found.sort(key=lambda d: -d.score)
    if output is not None:
        zones = {z.name: list(z.points) for z in cam.zones} if cam is not None else None
        lines = {ln.name: (ln.a, ln.b) for ln in cam.lines} if cam is not None else None
        h, w = image.shape[:2]
        drawn = draw_boxes(image, found, zones=_scaled(zones, w, h), lines=_scaled_lines(lines, w, h))
        _write_jpeg(drawn, output)
    rows = [{"label": d.label, "score": round(d.score, 3), "box": [round(v, 1) for v in d.box]} for d in found]
    if as_json:
        print_json(rows)
        return
    t = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("label", "score", "box (x1, y1, x2, y2 px)"):
        t.add_column(col)
    for r in rows:
        t.add_row(escape(r["label"]), f"{r['score']:.2f}", ", ".join(f"{v:.0f}" for v in r["box"]))
    console.print(t)
    err_console.print(f"{len(rows)} detections by {escape(name)}" + (f"; drawn into {output}" if output else ""))


def _scaled(zones: dict[str, list[tuple[float, float]]] | None, w: int, h: int
            ) -> dict[str, list[tuple[float, float]]] | None:
    if zones is None:
        return None
    return {n: [(x * w, y * h) for x, y in pts] for n, pts in zones.items()}


def _scaled_lines(lines: dict[str, tuple[tuple[float, float], tuple[float, float]]] | None, w: int, h: int
                  ) -> dict[str, tuple[tuple[float, float], tuple[float, float]]] | None:
    if lines is None:
        return None
    return {n: ((a[0] * w, a[1] * h), (b[0] * w, b[1] * h)) for n, (a, b) in lines.items()}


def _cameras_section(config: Path | None) -> Any:
    from edgeagent.drivers.camera.config import CamerasConfig  # noqa: PLC0415

    path = config_path(config)
    if not path.exists():
        return CamerasConfig()
    from edgeagent.cli.common import load_or_exit  # noqa: PLC0415

    _, cfg = load_or_exit(config)
    section = getattr(cfg, "cameras", None)
    return section if isinstance(section, CamerasConfig) else CamerasConfig()


async def _detect(image: Any, model: str, section: Any) -> list[Any]:
    from edgeagent.models.engine import InferenceEngine  # noqa: PLC0415
    from edgeagent.models.manifest import load_manifests  # noqa: PLC0415
    from edgeagent.models.types import ModelError  # noqa: PLC0415

    try:
        manifests = load_manifests(section.model_dirs)
        if model not in manifests:
            fail(escape(f"no model {model!r} (known: {', '.join(sorted(manifests))})"))
        async with InferenceEngine({model: manifests[model]}, provider=section.provider,
                                   threads=section.threads) as engine:
            h, w = image.shape[:2]
            return await engine.detect_regions(model, image, [(0, 0, w, h)])
    except ModelError as exc:
        fail(escape(str(exc)))


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return "/" in text


# --- discover and add ------------------------------------------------------------------------------

@app.command("discover")
def discover(targets: list[str] | None = typer.Argument(  # noqa: B008
                 None, metavar="[HOST|HOST:PORT|CIDR]...", help="also probe these directly (unicast)"),
             no_multicast: bool = typer.Option(False, "--no-multicast", help="only the hosts given"),
             http: bool = typer.Option(False, "--http", help="also ask each host's ONVIF device service over HTTP "
                                                             "(cameras that ignore WS-Discovery)"),
             timeout_s: float = typer.Option(3.0, "--timeout", min=0.5, max=60.0),
             as_json: bool = JsonOption) -> None:
    """Find ONVIF cameras: WS-Discovery by multicast on the LAN, plus unicast probes of hosts or subnets."""
    from edgeagent.drivers.camera.onvif.discovery import discover as run_discovery  # noqa: PLC0415

    for t in targets or ():
        if "/" in t and not _is_network(t):
            fail(escape(f"{t!r} is not a subnet (use CIDR, e.g. 192.168.1.0/24)"))
    with err_console.status("probing..."):
        found = asyncio.run(run_discovery(multicast=not no_multicast, unicast=list(targets or ()),
                                          timeout_s=timeout_s, http_probe=http))
    rows = [{"address": c.address, "name": c.name, "hardware": c.hardware, "manufacturer": c.manufacturer,
             "model": c.model, "xaddrs": list(c.xaddrs), "via": c.via, "needs_auth": c.needs_auth} for c in found]
    if as_json:
        print_json(rows)
        return
    if not rows:
        err_console.print("no camera answered" + ("" if targets else "; try unicast: camera discover 192.168.1.0/24"))
        raise typer.Exit(1)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("address", "name", "model", "device service", "found by"):
        table.add_column(col, overflow="fold")
    for c in found:
        model = " ".join(str(x) for x in (c.manufacturer or c.hardware, c.model) if x)
        table.add_row(escape(str(c.address)), escape(str(c.name or "")), escape(model),
                      escape(", ".join(list(c.xaddrs)[:2])), escape(str(c.via)))
    console.print(table)


@app.command("add")
def add(host: str = typer.Argument(..., help="the camera's address"),
        dev_id: str = typer.Option(..., "--id", help="device id, e.g. cam-gate"),
        name: str | None = typer.Option(None, "--name", help="human label, local only"),
        port: int = typer.Option(80, "--port", min=1, max=65535, help="ONVIF (HTTP) port"),
        username: str = typer.Option("admin", "--user"),
        password_file: Path | None = typer.Option(  # noqa: B008
            None, "--password-file", help="file holding the password (stored as a {file: ...} reference)"),
        password_env: str | None = typer.Option(None, "--password-env", help="environment variable holding it"),
        profile: str | None = typer.Option(None, "--profile", help="media profile token for detection"),
        snapshot_out: Path | None = typer.Option(None, "--snapshot", help="save the test snapshot here"),  # noqa: B008
        config: Path | None = ConfigOption) -> None:
    """Connect to the camera, list its profiles, pick the streams and grab a picture, then add it to the config
    (nothing is written unless all of that worked)."""
    from edgeagent.cli.devices import add_to_config  # noqa: PLC0415
    from edgeagent.drivers.camera.grab import grab_frame  # noqa: PLC0415
    from edgeagent.drivers.camera.onvif.client import CameraError, OnvifCamera, choose_streams  # noqa: PLC0415
    from edgeagent.drivers.camera.service import with_credentials  # noqa: PLC0415
    from edgeagent.kernel.errors import EdgeagentError  # noqa: PLC0415

    if password_file is None and password_env is None:
        fail("give the camera's password by reference: --password-file FILE or --password-env NAME")
    try:
        if password_file is not None:
            password = password_file.read_text(encoding="utf-8").strip()
        else:
            import os  # noqa: PLC0415

            password = os.environ.get(password_env or "", "")
            if not password:
                fail(escape(f"${password_env} is empty or not set"))
    except OSError as exc:
        fail(escape(f"cannot read {password_file}: {exc.strerror}"))

    async def probe() -> tuple[Any, Any, Any]:
        async with OnvifCamera(host, port, username, password, name=dev_id) as camera:
            detect, record = choose_streams(camera.profiles, detect_token=profile)
            if not detect.stream_uri:
                raise EdgeagentError(f"profile {detect.token} gives no RTSP URI")
            frame = await grab_frame(with_credentials(detect.stream_uri, username, password), what=dev_id)
            return camera.device_info, (detect, record, camera.profiles), frame

    console.print(f"connecting to {escape(host)}:{port}...")
    try:
        info, (detect, record, profiles), frame = asyncio.run(probe())
    except (CameraError, EdgeagentError) as exc:
        fail(escape(f"{exc}\n(nothing was written)"))
    console.print(f"[green]ok[/] {escape(' '.join(x for x in (info.manufacturer, info.model, info.firmware) if x))}")
    t = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("profile", "encoding", "size", "fps", "use"):
        t.add_column(col)
    for p in profiles:
        use = "detect" if p.token == detect.token else "record" if p.token == record.token else ""
        t.add_row(escape(p.token), escape(str(p.encoding)), f"{p.width}x{p.height}", str(p.fps or ""), use)
    console.print(t)
    h, w = frame.shape[:2]
    console.print(f"[green]ok[/] a {w}x{h} frame decoded from the detection stream")
    if snapshot_out is not None:
        _write_jpeg(frame, snapshot_out)
        console.print(f"snapshot saved to {escape(str(snapshot_out))}")
    secret: dict[str, str] = ({"file": str(password_file.resolve())} if password_file is not None
                              else {"env": password_env or ""})
    values: dict[str, Any] = {"onvif": {"host": host, "port": port, "profile": detect.token,
                                        "record_profile": record.token},
                              "username": username, "password": secret}
    add_to_config(config_path(config), "camera", dev_id, values, name=name, probe=False)
