"""Model manifests: what a model file is, where it came from, and how to feed it and read its outputs.

Every model sits beside a YAML manifest (``models/nanodet.yaml`` beside ``models/nanodet.onnx``). The shipped
``models/`` folder is read first, then each site folder in order; a later manifest with the same ``name``
replaces an earlier one, so a site swaps a shipped model or adds its own (fire and smoke, an e-bike class)
without code::

    name: fire                      # what camera config refers to
    file: fire.onnx                 # relative to this manifest
    sha256: 3f1c...                 # checked (streamed) before the model is loaded
    licence: proprietary (ACME Ltd) # kept with the model; shown by 'edgeagent models list'
    source: ACME fire v2, exported with ultralytics 8.3
    task: detect
    input: {width: 640, height: 640, layout: NCHW, dtype: float32, colour: RGB, scale: 0.00392156862745098,
            resize: letterbox}
    decoder: yolo                   # a name in edgeagent.models.registry.DECODER_PATHS
    decoder_params: {format: v8}
    labels: [fire, smoke]           # or {file: labels.txt}, one per line
    thresholds: {score: 0.4, nms_iou: 0.5}
    max_batch: 1

Reading is strict (unknown keys refused, types not coerced) and every problem is a :class:`ModelError` whose
message names the file, line and key (``fire.yaml:9:3: input.layout: 'NCWH' is not one of ...``), the same
shape as config errors. :func:`verify` checks that the file exists and hashes to the manifest's sha256; the
engine verifies every model it is given before starting. :func:`list_models` and :func:`verify_models`
give the rows of ``edgeagent models list|verify``.

Input sizes. A fixed input (``width`` x ``height``) is filled by ``resize: stretch`` (aspect not kept) or
``letterbox`` (aspect kept, centred, padded with ``pad_value``). ``dynamic: true`` means the model takes any
size: the image keeps its aspect, is scaled to fit within ``width`` x ``height``, and each side is rounded up
to ``multiple_of`` (the padding at right and bottom); with ``resize: stretch`` a dynamic model is run like a
fixed one (the image stretched to ``width`` x ``height``, the way such models are trained) unless the caller
asks for an input size (the camera pipeline's crops at ``detect.scale``: see ``InferenceEngine.detect_regions``).
``upscale: false`` leaves smaller images at their own size (letterbox and dynamic): on a dynamic model a small
crop then costs what its pixels cost.
Normalization is ``(pixel - mean) / std`` on the channels in ``colour`` order; ``scale: s`` is shorthand for
``std: 1/s``. Integer inputs take raw pixels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from ruamel.yaml.comments import CommentedMap

from edgeagent.kernel.config import yamlerr
from edgeagent.kernel.config.schema import parse_yaml
from edgeagent.kernel.errors import ConfigError
from edgeagent.models import registry
from edgeagent.models.types import ModelError

__all__ = ["SHIPPED_DIR", "ImageInput", "LabelsFile", "ModelManifest", "TensorInput", "Thresholds", "file_sha256",
           "list_models", "load_manifest", "load_manifests", "parse_manifest", "verify", "verify_models"]

SHIPPED_DIR: Final = Path(__file__).resolve().parent
_NAME_RE: Final = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_SHA_RE: Final = r"^[0-9a-f]{64}$"
_PATTERNS: Final = {
    _NAME_RE: "{got} is not a model name (lower-case letters, digits, '_', '.', '-'; at most 64)",
    _SHA_RE: "{got} is not a sha256 (64 lower-case hex digits; 'sha256sum FILE' prints it)",
}
_HASH_CHUNK: Final = 1 << 20
_MAX_LABELS_BYTES: Final = 4 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ImageInput(_Strict):
    """An image input (see the module docstring for sizes and normalization)."""

    kind: Literal["image"] = "image"
    width: int = Field(ge=1, le=8192, description="model input width; with dynamic, the most it is scaled to")
    height: int = Field(ge=1, le=8192)
    dynamic: bool = Field(default=False, description="the model takes any size; see multiple_of")
    multiple_of: int = Field(default=1, ge=1, le=256, description="dynamic sides are rounded up to this")
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "int32", "uint8"] = "float32"
    colour: Literal["BGR", "RGB"] = "BGR"
    mean: list[float] = Field(default=[0.0, 0.0, 0.0], min_length=3, max_length=3)
    std: list[float] | None = Field(default=None, min_length=3, max_length=3)
    scale: float | None = Field(default=None, gt=0)
    resize: Literal["letterbox", "stretch"] = "letterbox"
    pad_value: int = Field(default=114, ge=0, le=255, description="pixel value of letterbox padding")
    upscale: bool = Field(default=True, description="scale images smaller than the input up (letterbox and "
                          "dynamic); false runs them at their own size, cheaper on a dynamic model")

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"every std must be more than 0 (got {v})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ImageInput:
        issues: list[yamlerr.Issue] = []
        if self.std is not None and self.scale is not None:
            issues.append((("scale",), "give std or scale, not both (scale s means std 1/s)"))
        if self.dtype != "float32" and (self.std is not None or self.scale is not None or any(self.mean)):
            issues.append((("dtype",), f"a {self.dtype} input takes raw pixels: drop mean, std and scale"))
        if self.resize == "stretch" and not self.upscale:
            issues.append((("upscale",), "a stretched input always fills the size: use resize: letterbox"))
        if not self.dynamic and self.multiple_of != 1:
            issues.append((("multiple_of",), "multiple_of applies to dynamic inputs only (add dynamic: true)"))
        if self.dynamic and (self.width % self.multiple_of or self.height % self.multiple_of):
            issues.append((("width",), f"width and height must be multiples of multiple_of ({self.multiple_of})"))
        if issues:
            raise yamlerr.LocatedIssues(issues)
        return self

    @property
    def divisor(self) -> tuple[float, float, float]:
        """What each channel is divided by after the mean is taken off."""
        if self.std is not None:
            return (self.std[0], self.std[1], self.std[2])
        if self.scale is not None:
            return (1.0 / self.scale,) * 3
        return (1.0, 1.0, 1.0)


class TensorInput(_Strict):
    """A non-image input (a pose sequence for the fall head): each item the caller passes is one sample of
    ``shape`` (the batch axis not included; -1 for any length); items are stacked into a batch."""

    kind: Literal["tensor"]
    shape: list[int] = Field(min_length=1, max_length=6)
    dtype: Literal["float32", "int32", "uint8"] = "float32"

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(d == 0 or d < -1 for d in v):
            raise ValueError(f"each dimension is a positive size or -1 for any (got {v})")
        return v


def _input_kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return str(value.get("kind", "image"))
    return str(getattr(value, "kind", "image"))


InputSpec = Annotated[Annotated[ImageInput, Tag("image")] | Annotated[TensorInput, Tag("tensor")],
                      Discriminator(_input_kind)]


class Thresholds(_Strict):
    score: float = Field(default=0.35, ge=0, le=1, description="detections below this are dropped")
    nms_iou: float = Field(default=0.5, ge=0, le=1, description="overlap above which the weaker box of a class goes")


class LabelsFile(_Strict):
    file: str = Field(min_length=1, description="one label per line, relative to the manifest")


class ModelManifest(_Strict):
    """One model. ``path`` and ``labels_list`` are resolved against the manifest's folder when read."""

    name: str = Field(pattern=_NAME_RE)
    file: str = Field(min_length=1, description="the model file, relative to the manifest")
    sha256: str = Field(pattern=_SHA_RE, description="lower-case hex of the file's SHA-256")
    licence: str = Field(min_length=1)
    source: str = Field(min_length=1, description="where the file came from (package, version, path)")
    conversion: str | None = Field(default=None, description="what was changed from the source file, and how")
    task: Literal["detect", "face", "plate", "plate_text", "pose", "fall", "classify"]
    input: InputSpec
    decoder: str
    decoder_params: dict[str, Any] = Field(default_factory=dict)
    labels: list[str] | LabelsFile
    thresholds: Thresholds = Field(default_factory=Thresholds)
    max_batch: int = Field(default=1, ge=1, le=256, description="images per inference the model accepts")
    int8: str | None = Field(default=None, description="note on an int8 variant (none ships without a "
                             "golden test keeping >= 95% of the float model's detections)")

    _dir: Path = PrivateAttr(default=SHIPPED_DIR)
    _manifest_path: Path | None = PrivateAttr(default=None)
    _labels: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("file")
    @classmethod
    def _relative(cls, v: str) -> str:
        if Path(v).is_absolute():
            raise ValueError(f"{v!r} must be relative to the manifest's folder")
        return v

    @field_validator("decoder")
    @classmethod
    def _known_decoder(cls, v: str) -> str:
        if v not in registry.DECODER_PATHS:
            raise ValueError(f"unknown decoder {v!r} (known: {', '.join(sorted(registry.DECODER_PATHS))})")
        return v

    @field_validator("labels")
    @classmethod
    def _some_labels(cls, v: list[str] | LabelsFile) -> list[str] | LabelsFile:
        if isinstance(v, list) and not v:
            raise ValueError("needs at least one label")
        return v

    @property
    def path(self) -> Path:
        """The model file."""
        return self._dir / self.file

    @property
    def manifest_path(self) -> Path | None:
        return self._manifest_path

    @property
    def labels_list(self) -> tuple[str, ...]:
        return self._labels

    def label(self, class_id: int) -> str:
        """The label of a class index (``class_<n>`` past the end of the list, never an IndexError)."""
        return self._labels[class_id] if 0 <= class_id < len(self._labels) else f"class_{class_id}"

    @property
    def where(self) -> str:
        """How messages name this manifest."""
        return str(self._manifest_path) if self._manifest_path is not None else f"model {self.name!r}"


# --- reading ---------------------------------------------------------------------------------------------

def _located(path: Path | str, doc: CommentedMap, loc: yamlerr.Loc, message: str) -> ModelError:
    return ModelError(yamlerr.format_issues(path, doc, [(loc, message)], root=ModelManifest))


def _read_labels(manifest: ModelManifest, folder: Path, path: Path | str, doc: CommentedMap) -> tuple[str, ...]:
    if isinstance(manifest.labels, list):
        return tuple(manifest.labels)
    file = folder / manifest.labels.file
    try:
        data = file.read_bytes()[:_MAX_LABELS_BYTES + 1]
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise _located(path, doc, ("labels", "file"), f"no such file {file}") from None
    except UnicodeDecodeError as exc:
        raise _located(path, doc, ("labels", "file"), f"{file} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise _located(path, doc, ("labels", "file"), f"cannot read {file}: {exc.strerror}") from None
    if len(data) > _MAX_LABELS_BYTES:
        raise _located(path, doc, ("labels", "file"), f"{file} is larger than {_MAX_LABELS_BYTES} bytes")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise _located(path, doc, ("labels", "file"), f"{file} holds no labels")
    return labels


def _check_params(manifest: ModelManifest, path: Path | str, doc: CommentedMap) -> None:
    """Validate ``decoder_params`` when the decoder declares a model for them. A decoder whose module is not
    installed is reported by :func:`verify`, not here, so listing models still works."""
    try:
        model = registry.params_model(manifest.decoder)
    except ModelError:
        return
    if model is None:
        return
    try:
        model.model_validate(manifest.decoder_params)
    except ValidationError as exc:
        node = doc.get("decoder_params")
        issues = [(("decoder_params", *err["loc"]), yamlerr.plain(err, root=model, doc=node))
                  for err in exc.errors(include_url=False)]
        raise ModelError(yamlerr.format_issues(path, doc, issues, root=ModelManifest)) from None


def parse_manifest(text: str, path: Path | str = "<manifest>", folder: Path | None = None) -> ModelManifest:
    """Validate manifest text; ``path`` names it in messages, ``folder`` resolves ``file`` (default: the
    folder of ``path``)."""
    folder = folder if folder is not None else Path(path).parent
    if all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()):
        raise ModelError(f"{path}: the manifest is empty (see models/nanodet.yaml for one)")
    try:
        doc = parse_yaml(text, path)
    except ConfigError as exc:
        raise ModelError(str(exc)) from None
    try:
        manifest = ModelManifest.model_validate(yamlerr.to_builtin(doc))
    except ValidationError as exc:
        raise ModelError(yamlerr.format_errors(path, doc, exc, root=ModelManifest, patterns=_PATTERNS)) from None
    manifest._dir = folder  # private attributes are how pydantic keeps non-field state
    manifest._manifest_path = Path(path)
    manifest._labels = _read_labels(manifest, folder, path, doc)
    _check_params(manifest, path, doc)
    return manifest


def load_manifest(path: Path | str) -> ModelManifest:
    """Read one manifest file; every failure is a :class:`ModelError` naming the file."""
    p = Path(path)
    text = yamlerr.read_text_file(p, ModelError, "no such manifest file")
    return parse_manifest(text, p, p.resolve().parent)


def _manifest_files(dirs: Iterable[Path | str], shipped: bool) -> list[Path]:
    folders = ([SHIPPED_DIR] if shipped else []) + [Path(d) for d in dirs]
    files: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            raise ModelError(f"{folder}: model folder does not exist (check the models directory setting)")
        files += sorted(folder.glob("*.yaml"))
    return files


def load_manifests(dirs: Iterable[Path | str] = (), *, shipped: bool = True) -> dict[str, ModelManifest]:
    """Every manifest in the shipped ``models/`` folder (unless ``shipped`` is false), then in each of ``dirs``
    in order; a later folder's manifest replaces an earlier one of the same name. Two manifests of one name in
    one folder are an error. The first broken manifest raises :class:`ModelError`."""
    found: dict[str, ModelManifest] = {}
    seen_in: dict[str, Path] = {}
    for file in _manifest_files(dirs, shipped):
        manifest = load_manifest(file)
        earlier = seen_in.get(manifest.name)
        if earlier is not None and earlier.parent == file.parent:
            raise ModelError(f"{file}: model {manifest.name!r} is also defined in {earlier.name}; names must be "
                             "unique within a folder")
        found[manifest.name] = manifest
        seen_in[manifest.name] = file
    return found


# --- verifying ---------------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MB pieces (models run to hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(manifest: ModelManifest) -> None:
    """Check that the model file exists, hashes to the manifest's sha256 and that its decoder is installed;
    :class:`ModelError` with what to do otherwise."""
    where = manifest.where
    path = manifest.path
    if not path.is_file():
        raise ModelError(f"{where}: model {manifest.name!r}: the file {path} does not exist; put the model file "
                         "beside its manifest or correct 'file'")
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise ModelError(f"{where}: model {manifest.name!r}: cannot read {path}: {exc.strerror}") from None
    if actual != manifest.sha256:
        raise ModelError(
            f"{where}: model {manifest.name!r}: {path.name} has sha256 {actual[:16]}..., the manifest expects "
            f"{manifest.sha256[:16]}...; the file is damaged or not the one the manifest describes: restore "
            f"the original file, or if the model was replaced on purpose, set sha256: {actual} in the manifest")
    try:
        registry.get_decoder(manifest.decoder)
    except ModelError as exc:
        raise ModelError(f"{where}: model {manifest.name!r}: {exc}") from None


# --- for 'edgeagent models list|verify' ---------------------------------------------------------------------

def _describe_input(manifest: ModelManifest) -> str:
    spec = manifest.input
    if isinstance(spec, TensorInput):
        return f"tensor {'x'.join('N' if d < 0 else str(d) for d in spec.shape)} {spec.dtype}"
    size = f"{spec.width}x{spec.height}"
    if spec.dynamic:
        # stretch: that size for a whole image, any (crops at detect.scale); letterbox: scaled to fit within it
        size = f"{size} or any /{spec.multiple_of}" if spec.resize == "stretch" else \
            f"up to {size} /{spec.multiple_of}"
    return f"{size} {spec.layout} {spec.dtype} {spec.colour} {spec.resize}"


def list_models(dirs: Iterable[Path | str] = ()) -> list[dict[str, Any]]:
    """One row per usable model name (shipped, then site folders overriding), for a table or JSON.
    A broken manifest raises :class:`ModelError` (``verify_models`` reports each instead)."""
    rows = []
    for manifest in load_manifests(dirs).values():
        rows.append({
            "name": manifest.name, "task": manifest.task, "file": str(manifest.path), "decoder": manifest.decoder,
            "input": _describe_input(manifest), "labels": len(manifest.labels_list),
            "max_batch": manifest.max_batch, "licence": manifest.licence, "source": manifest.source,
            "sha256": manifest.sha256, "manifest": str(manifest.manifest_path),
            "shipped": manifest.manifest_path is not None and manifest.manifest_path.parent.resolve() == SHIPPED_DIR,
        })
    return rows


def verify_models(dirs: Iterable[Path | str] = ()) -> list[tuple[str, bool, str]]:
    """``(name, ok, detail)`` for every manifest file (a broken one is named by its file), after site
    overrides: a shipped model a site replaced is checked in its site version only."""
    results: dict[str, tuple[str, bool, str]] = {}
    try:
        files = _manifest_files(dirs, shipped=True)
    except ModelError as exc:
        return [("(models folder)", False, str(exc))]
    for file in files:
        try:
            manifest = load_manifest(file)
        except ModelError as exc:
            results[f"file:{file}"] = (file.name, False, str(exc))
            continue
        try:
            verify(manifest)
        except ModelError as exc:
            results[manifest.name] = (manifest.name, False, str(exc))
            continue
        results[manifest.name] = (manifest.name, True, f"{manifest.path.name} sha256 {manifest.sha256[:16]}... ok")
    return list(results.values())
