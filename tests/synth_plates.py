"""Synthetic Chinese licence plates for the car-gate tests and the rules bench.

No package carries photographs of Chinese plates, so the tests draw them: a blue plate (province character,
issuing-office letter, a dot, 5 alphanumerics: ``京A·F0236``) or a green new-energy plate (8 characters,
``粤B·D12345``), laid out after GA 36-2018 (440 x 140 mm blue, 480 x 140 mm green, one pixel a millimetre at
``scale=1``), then worn the way a gate camera sees it: dirt, a perspective and a size on the car, blur, low
light. :func:`car_with_plate` warps the plate onto the rear of the car in ``licenseplate_motion.jpg`` (the
media folder, see ``../shared/media/PROVENANCE.md``), where that photo's own plate is.

Chinese characters need a CJK font: Debian's ``fonts-wqy-zenhei`` (or ``fonts-wqy-microhei``). Without one
:func:`cjk_font_path` raises :class:`MissingFontError` naming the package; without Pillow, :func:`render_plate`
raises ImportError naming it. Everything random comes from the ``numpy.random.Generator`` passed in, so a seed
gives the same image on every machine with the same font.

Usage (a look at what the tests see)::

    .venv/bin/python -m tests.synth_plates out.png 京AF0236 --blur 1.5 --perspective 0.1 --dirt 0.3
"""

from __future__ import annotations

import argparse
import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import cv2
import numpy as np
import numpy.typing as npt

from tests.media import image as media_image

Image = npt.NDArray[np.uint8]
PlateKind = Literal["blue", "green"]

FONT_PACKAGES: Final = ("fonts-wqy-zenhei", "fonts-wqy-microhei")
FONT_PATHS: Final = (
    Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"),
    Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),
)
CAR_IMAGE: Final = "licenseplate_motion.jpg"
# Where the photo's own plate is, in PLATE_CORNER_ORDER (bottom-right, bottom-left, top-left, top-right): the
# place synth_car_with_plate.png put the 京A plate, found there by the plate detector at x 224-364, y 240-281.
CAR_PLATE_QUAD: Final = ((364.0, 281.0), (224.0, 281.0), (224.0, 240.0), (364.0, 240.0))

PROVINCES: Final = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
LETTERS: Final = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # never I or O
DIGITS: Final = "0123456789"

# GA 36-2018 layouts in millimetres: plate size, character box, gap between characters, the wider gap after
# the second character (where the dot sits), left margin.
_LAYOUT: Final = {
    "blue": {"size": (440, 140), "char": (45, 90), "gap": 12.0, "dot_gap": 34.0, "left": 15.5},
    "green": {"size": (480, 140), "char": (43, 90), "gap": 9.0, "dot_gap": 49.0, "left": 15.5},
}
_BLUE_BG: Final = (180, 72, 12)  # BGR
_WHITE: Final = (245, 245, 245)
_BLACK: Final = (25, 25, 25)


class MissingFontError(RuntimeError):
    """No CJK font to draw the province character with."""


@dataclass(frozen=True, slots=True)
class Wear:
    """How worn the plate looks. Each is 0 for a clean plate.

    ``blur_px``: Gaussian sigma in pixels of the final image (focus and motion softness).
    ``perspective``: corner jitter as a fraction of the plate's height on the car, plus a tilt up to
    ``perspective * 15`` degrees (a camera off the lane's axis).
    ``low_light``: 0..1, darkens (down to 15 % brightness at 1) and adds sensor noise that grows as it darkens.
    ``dirt``: 0..1, how much of the plate mud blotches cover (about a third at 1).
    ``width_px``: the plate's width on the car in pixels (the photo's own plate is 140).
    """

    blur_px: float = 0.0
    perspective: float = 0.0
    low_light: float = 0.0
    dirt: float = 0.0
    width_px: float = 140.0


@dataclass(frozen=True, slots=True)
class SynthCar:
    """A car image with a plate on it: ``quad`` the plate's corners in PLATE_CORNER_ORDER (image pixels)."""

    image: Image
    text: str
    quad: npt.NDArray[np.float32]


def cjk_font_path(candidates: Sequence[Path] = FONT_PATHS) -> Path:
    """The first CJK font found; MissingFontError naming the Debian package otherwise."""
    for path in candidates:
        if path.is_file():
            return path
    raise MissingFontError(
        f"no CJK font for the plates' Chinese characters (looked for {', '.join(str(p) for p in candidates)}): "
        f"install Debian's {FONT_PACKAGES[0]} (apt-get install {FONT_PACKAGES[0]}) or {FONT_PACKAGES[1]}")


def _pil() -> tuple[Any, Any, Any]:
    try:
        pil_image = importlib.import_module("PIL.Image")
        pil_draw = importlib.import_module("PIL.ImageDraw")
        pil_font = importlib.import_module("PIL.ImageFont")
    except ImportError as exc:
        raise ImportError("the synthetic plates need Pillow (pip install pillow; the project's dev extra)") from exc
    return pil_image, pil_draw, pil_font


@functools.lru_cache(maxsize=256)
def _glyph(char: str, font_path: Path) -> Image:
    """The character's ink as a grey mask (0..255), cropped to its ink box."""
    pil_image, pil_draw, pil_font = _pil()
    font = pil_font.truetype(str(font_path), 160, index=0)
    canvas = pil_image.new("L", (260, 260), 0)
    pil_draw.Draw(canvas).text((40, 20), char, font=font, fill=255)
    mask = np.asarray(canvas, dtype=np.uint8)
    ys, xs = np.nonzero(mask > 40)
    if ys.size == 0:
        raise MissingFontError(f"{font_path} has no glyph for {char!r}")
    return np.ascontiguousarray(mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1])


def plate_kind(text: str) -> PlateKind:
    """Blue for 7 characters, green (new energy) for 8."""
    if len(text) == 7:
        return "blue"
    if len(text) == 8:
        return "green"
    raise ValueError(f"a plate has 7 (blue) or 8 (green) characters, got {text!r}")


def render_plate(text: str, *, scale: float = 1.0, font_path: Path | None = None) -> Image:
    """The flat plate for ``text`` (no separator: the dot is drawn), BGR, ``scale`` pixels a millimetre."""
    kind = plate_kind(text)
    font = font_path or cjk_font_path()
    layout = _LAYOUT[kind]
    (pw, ph), (cw, ch) = layout["size"], layout["char"]
    hi = 4  # draw at 4 px/mm and shrink: smooth edges at any scale
    w, h = int(pw * hi), int(ph * hi)
    if kind == "blue":
        plate = np.empty((h, w, 3), np.uint8)
        plate[:] = _BLUE_BG
        ink: tuple[int, int, int] = _WHITE
        cv2.rectangle(plate, (3 * hi, 3 * hi), (w - 3 * hi, h - 3 * hi), _WHITE, 2 * hi, cv2.LINE_AA)
    else:
        # new-energy plates fade from a pale green at the top to green at the bottom
        top, bottom = np.asarray((228, 246, 232), np.float32), np.asarray((88, 196, 60), np.float32)
        t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        plate = np.broadcast_to(top + (bottom - top) * t, (h, w, 3)).astype(np.uint8).copy()
        ink = _BLACK
        cv2.rectangle(plate, (3 * hi, 3 * hi), (w - 3 * hi, h - 3 * hi), (40, 40, 40), hi, cv2.LINE_AA)
    x = float(layout["left"])
    y0 = (ph - ch) / 2.0
    for i, char in enumerate(text):
        _stamp(plate, _glyph(char, font), x * hi, y0 * hi, cw * hi, ch * hi, ink, wide=i == 0)
        x += cw
        if i == 1:
            centre = (int((x + layout["dot_gap"] / 2) * hi), int(ph / 2 * hi))
            cv2.circle(plate, centre, int(5 * hi), ink, -1, cv2.LINE_AA)
            x += layout["dot_gap"]
        else:
            x += layout["gap"]
    size = (max(1, round(pw * scale)), max(1, round(ph * scale)))
    return np.asarray(cv2.resize(plate, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def _stamp(plate: Image, glyph: Image, x: float, y: float, box_w: float, box_h: float,
           ink: tuple[int, int, int], *, wide: bool) -> None:
    """Fit the glyph into the character box (full height; narrow glyphs keep their shape, wide ones are
    condensed as the plate font is), centred, and paint it in ``ink``."""
    gh, gw = glyph.shape
    height = box_h
    width = box_w if wide else min(box_w, gw * box_h / gh)
    if (not wide) and gw * box_h / gh < box_w * 0.35:
        width = box_w * 0.35  # "1" stays a stroke, not a hairline
    gw2, gh2 = max(1, round(width)), max(1, round(height))
    alpha = cv2.resize(glyph, (gw2, gh2), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    x0 = round(x + (box_w - gw2) / 2)
    y0 = round(y)
    region = plate[y0: y0 + gh2, x0: x0 + gw2].astype(np.float32)
    a = alpha[: region.shape[0], : region.shape[1], None]
    region = region * (1 - a) + np.asarray(ink, np.float32) * a
    plate[y0: y0 + gh2, x0: x0 + gw2] = region.astype(np.uint8)


def add_dirt(plate: Image, amount: float, rng: np.random.Generator) -> Image:
    """Mud blotches over about ``amount / 3`` of the plate (soft-edged, brown to grey, half see-through)."""
    if amount <= 0:
        return plate.copy()
    h, w = plate.shape[:2]
    mask = np.zeros((h, w), np.float32)
    target = min(1.0, amount) / 3.0
    while float((mask > 0.3).mean()) < target:
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(w // 40 + 1, w // 10 + 2)), int(rng.integers(h // 12 + 1, h // 4 + 2)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0.5, 0.85)), -1)
    mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, h / 40))[..., None]
    mud = np.asarray((rng.uniform(30, 70), rng.uniform(60, 95), rng.uniform(80, 120)), np.float32)
    out = plate.astype(np.float32) * (1 - mask) + mud * mask
    return np.clip(out, 0, 255).astype(np.uint8)


def darken(image: Image, amount: float, rng: np.random.Generator) -> Image:
    """Low light: brightness down to ``1 - 0.85 * amount`` (and a gamma lift a camera's auto-exposure
    gives), with Gaussian sensor noise of sigma up to 10 grey levels."""
    if amount <= 0:
        return image.copy()
    amount = min(1.0, amount)
    x = image.astype(np.float32) / 255.0
    x = (x ** (1.0 + 0.4 * amount)) * (1.0 - 0.85 * amount)
    x = x * 255.0 + rng.normal(0.0, 10.0 * amount, x.shape).astype(np.float32)
    return np.clip(x, 0, 255).astype(np.uint8)


def blur(image: Image, sigma_px: float) -> Image:
    if sigma_px <= 0:
        return image.copy()
    return np.asarray(cv2.GaussianBlur(image, (0, 0), sigma_px), dtype=np.uint8)


def plate_quad(wear: Wear, rng: np.random.Generator, *, aspect: float) -> npt.NDArray[np.float32]:
    """Where the plate goes on the car: the photo's plate site, resized to ``wear.width_px`` (``aspect`` the
    plate's width / height), tilted and with its corners jittered by ``wear.perspective``."""
    base = np.asarray(CAR_PLATE_QUAD, np.float32)
    centre = base.mean(axis=0)
    w = wear.width_px
    h = w / aspect
    quad = np.asarray([[w / 2, h / 2], [-w / 2, h / 2], [-w / 2, -h / 2], [w / 2, -h / 2]], np.float32)
    if wear.perspective > 0:
        angle = np.deg2rad(rng.uniform(-15, 15) * wear.perspective)
        rot = np.asarray([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
        quad = quad @ rot.T
        quad += rng.uniform(-1, 1, quad.shape).astype(np.float32) * wear.perspective * h
    return (quad + centre).astype(np.float32)


def car_with_plate(text: str, wear: Wear = Wear(), rng: np.random.Generator | None = None, *,
                   car: Image | None = None, font_path: Path | None = None) -> SynthCar:
    """The plate for ``text`` worn by ``wear`` on the car of ``licenseplate_motion.jpg`` (or ``car``).
    Dirt is on the plate; perspective and size where it is put; blur and low light over the whole frame."""
    rng = rng if rng is not None else np.random.default_rng(0)
    scene = (car if car is not None else _car()).copy()
    plate = add_dirt(render_plate(text, scale=1.0, font_path=font_path), wear.dirt, rng)
    ph, pw = plate.shape[:2]
    quad = plate_quad(wear, rng, aspect=pw / ph)
    src = np.asarray([[pw - 1, ph - 1], [0, ph - 1], [0, 0], [pw - 1, 0]], np.float32)
    matrix = cv2.getPerspectiveTransform(src, quad)
    size = (scene.shape[1], scene.shape[0])
    warped = cv2.warpPerspective(plate, matrix, size, flags=cv2.INTER_AREA)
    cover = cv2.warpPerspective(np.full((ph, pw), 255, np.uint8), matrix, size, flags=cv2.INTER_AREA)
    a = cover.astype(np.float32)[..., None] / 255.0
    scene = (scene.astype(np.float32) * (1 - a) + warped.astype(np.float32) * a).astype(np.uint8)
    scene = darken(blur(scene, wear.blur_px), wear.low_light, rng)
    return SynthCar(image=scene, text=text, quad=quad)


@functools.lru_cache(maxsize=1)
def _car_cached() -> Image:
    car = media_image(CAR_IMAGE)
    car.setflags(write=False)
    return car


def _car() -> Image:
    return _car_cached()


def random_plate(rng: np.random.Generator, kind: PlateKind = "blue") -> str:
    """A plate text that passes ``plate_format_ok``: blue ``省A12345``-like (letters and digits mixed), or
    green small-car ``省AD12345``-like (D or F, a letter or digit, 4 digits)."""
    province = PROVINCES[int(rng.integers(len(PROVINCES)))]
    office = LETTERS[int(rng.integers(len(LETTERS)))]
    if kind == "blue":
        alnum = LETTERS + DIGITS * 3  # digits are commoner on real plates
        return province + office + "".join(alnum[int(rng.integers(len(alnum)))] for _ in range(5))
    first = "DF"[int(rng.integers(2))]
    second = (LETTERS + DIGITS)[int(rng.integers(len(LETTERS) + len(DIGITS)))]
    return province + office + first + second + "".join(DIGITS[int(rng.integers(10))] for _ in range(4))


def random_wear(rng: np.random.Generator, *, level: float = 1.0) -> Wear:
    """A random mix of the four kinds of wear, each up to ``level`` of its hardest setting used by the
    bench: blur sigma 1.6 px, perspective 0.25, low light 0.7, dirt 0.35, plate 100-160 px wide."""
    return Wear(blur_px=float(rng.uniform(0, 1.6 * level)), perspective=float(rng.uniform(0, 0.25 * level)),
                low_light=float(rng.uniform(0, 0.7 * level)), dirt=float(rng.uniform(0, 0.35 * level)),
                width_px=float(rng.uniform(160 - 60 * level, 160)))


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="draw a synthetic Chinese plate on the car photo")
    parser.add_argument("out", type=Path)
    parser.add_argument("text")
    parser.add_argument("--blur", type=float, default=0.0)
    parser.add_argument("--perspective", type=float, default=0.0)
    parser.add_argument("--low-light", type=float, default=0.0)
    parser.add_argument("--dirt", type=float, default=0.0)
    parser.add_argument("--width", type=float, default=140.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flat", action="store_true", help="the plate alone, not on the car")
    args = parser.parse_args(argv)
    if args.flat:
        cv2.imwrite(str(args.out), render_plate(args.text))
        return
    wear = Wear(args.blur, args.perspective, args.low_light, args.dirt, args.width)
    cv2.imwrite(str(args.out), car_with_plate(args.text, wear, np.random.default_rng(args.seed)).image)


if __name__ == "__main__":
    _main()
