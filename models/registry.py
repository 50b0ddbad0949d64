"""The decoder registry: a manifest's ``decoder`` name → the function that turns a model's raw outputs into
:class:`~edgeagent.models.types.Detection` lists.

The registry is an explicit table (no discovery at import time): :data:`DECODER_PATHS` names, for every
decoder, the module and the attribute that implement it. Modules are imported on first use, so

- the plate, pose and fall decoders (``decoders/plates.py``, ``decoders/pose.py``, ``decoders/fall.py``) are
  listed before they exist; a manifest naming one loads, and using it fails with a clear :class:`ModelError`
  until the module lands;
- the camera pipeline's process never imports decoder code it does not run (decoders run in the inference
  worker).

A decoder is any callable of the :class:`Decoder` shape. It may carry a ``params_model`` attribute (a pydantic
model class): the manifest's ``decoder_params`` are then validated against it when the manifest is read (a
typo in a parameter is a located error in the YAML file, not a surprise at the first frame).

Contract every decoder keeps (tests/test_models_detect.py checks it with random outputs): it returns one
list per image of the batch, each detection's box inside that image (``0 <= x1 < x2 <= width``), or raises
:class:`ModelError` when the outputs are not what the manifest describes. Nothing else escapes.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Final, Protocol

from pydantic import BaseModel

from edgeagent.models.types import Detection, ModelError

if TYPE_CHECKING:
    import numpy as np

    from edgeagent.models.manifest import ModelManifest
    from edgeagent.models.preprocess import PreMeta

__all__ = ["DECODERS", "DECODER_PATHS", "Decoder", "get_decoder", "params_model"]


class Decoder(Protocol):
    def __call__(self, outputs: dict[str, np.ndarray], meta: PreMeta, manifest: ModelManifest
                 ) -> list[list[Detection]]:
        """One list of detections per image in the batch, in the ORIGINAL image's pixels (undo the resize
        with ``meta``). ``outputs``: output name -> array (batch first), in the model's output order."""
        ...


_PKG: Final = "edgeagent.models.decoders"

# name -> (module, attribute). The attribute is looked up as written; for the modules another hand writes
# (plates, pose, fall) a module-level ``DECODERS`` dict holding the name is accepted too.
DECODER_PATHS: Final[Mapping[str, tuple[str, str]]] = {
    "nanodet": (f"{_PKG}.nanodet", "decode"),
    "centerface": (f"{_PKG}.centerface", "decode"),
    "yolo": (f"{_PKG}.yolo", "decode"),
    "clp_det": (f"{_PKG}.plates", "decode_clp_det"),
    "ctc_plate": (f"{_PKG}.plates", "decode_ctc_plate"),
    "movenet_multipose": (f"{_PKG}.pose", "decode_movenet_multipose"),
    "fall_head": (f"{_PKG}.fall", "decode_fall_head"),
}

_cache: dict[str, Decoder] = {}


def get_decoder(name: str) -> Decoder:
    """The decoder called ``name``; :class:`ModelError` if no such decoder, or if its module is missing."""
    found = _cache.get(name)
    if found is not None:
        return found
    try:
        module_name, attr = DECODER_PATHS[name]
    except KeyError:
        raise ModelError(f"unknown decoder {name!r} (known: {', '.join(sorted(DECODER_PATHS))})") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # the decoder's own import failed: a broken install, say which
            raise ModelError(f"decoder {name!r}: importing {module_name} failed: {exc}") from exc
        raise ModelError(f"decoder {name!r} is not available in this version ({module_name} is missing)") from None
    decoder = getattr(module, attr, None)
    if decoder is None:
        table = getattr(module, "DECODERS", None)
        decoder = table.get(name) if isinstance(table, Mapping) else None
    if decoder is None or not callable(decoder):
        raise ModelError(f"decoder {name!r}: {module_name} has no {attr} (nor DECODERS[{name!r}])")
    _cache[name] = decoder
    return decoder  # type: ignore[no-any-return]  # checked callable above; its shape is the module's promise


def params_model(name: str) -> type[BaseModel] | None:
    """The pydantic model a decoder's parameters must fit, if it declares one."""
    model = getattr(get_decoder(name), "params_model", None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


class _LazyDecoders(Mapping[str, Decoder]):
    """``DECODERS[name]`` imports the decoder on first use; iterating lists every registered name."""

    def __getitem__(self, name: str) -> Decoder:
        if name not in DECODER_PATHS:
            raise KeyError(name)
        return get_decoder(name)

    def __iter__(self) -> Iterator[str]:
        return iter(DECODER_PATHS)

    def __len__(self) -> int:
        return len(DECODER_PATHS)


DECODERS: Final[Mapping[str, Decoder]] = _LazyDecoders()
