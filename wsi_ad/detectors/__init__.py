"""The anomaly detectors behind one interface (:class:`~wsi_ad.detectors.base.Detector`), and their registry.

``register(cls)`` adds a detector class under its ``name``; ``get(name)`` returns it; ``build(config)``
makes one from a config; ``load(checkpoint)`` rebuilds a trained one from a checkpoint file (which names
its detector, as a zarr array names its codecs). Built-in detectors are imported on first use. Detectors
of other packages register themselves when imported: either the package declares an entry point in the
group ``wsi_ad.detectors`` (``name = "package.module"``), or the environment variable
``WSI_AD_DETECTORS`` lists modules to import (comma-separated; Dask workers started from that
environment import them too).

Built-in: ``dpa`` (:mod:`wsi_ad.detectors.dpa`), ``piad`` (:mod:`wsi_ad.detectors.piad`), ``igd``
(:mod:`wsi_ad.detectors.igd`), ``ae`` (:mod:`wsi_ad.detectors.ae`), ``deep_if`` (:mod:`wsi_ad.detectors.deep_if`),
``deep_geo`` (:mod:`wsi_ad.detectors.deep_geo`), ``knn`` (:mod:`wsi_ad.detectors.knn`),
``fanogan`` (:mod:`wsi_ad.detectors.fanogan`).
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

import torch

from wsi_ad.detectors.base import Detector, InputSpec
from wsi_ad.errors import WsiAdError

if TYPE_CHECKING:
    from wsi_ad.config import Config

#: Built-in detectors: name -> module that registers it when imported.
BUILTIN = {"dpa": "wsi_ad.detectors.dpa", "piad": "wsi_ad.detectors.piad", "igd": "wsi_ad.detectors.igd",
           "ae": "wsi_ad.detectors.ae", "deep_if": "wsi_ad.detectors.deep_if", "deep_geo": "wsi_ad.detectors.deep_geo",
           "knn": "wsi_ad.detectors.knn", "fanogan": "wsi_ad.detectors.fanogan"}
ENTRY_POINT_GROUP = "wsi_ad.detectors"
ENV_VAR = "WSI_AD_DETECTORS"

_REGISTRY: dict[str, type[Detector]] = {}
_plugins_loaded = False


class UnknownDetectorError(WsiAdError):
    """No detector is registered under the name asked for."""


def register(cls: type[Detector]) -> type[Detector]:
    """Register detector class ``cls`` under ``cls.name`` (usable as a class decorator). Registering another
    class under a taken name is a ValueError; re-registering the same class (a re-import) is allowed."""
    if not (isinstance(cls, type) and issubclass(cls, Detector)):
        raise TypeError(f"{cls!r} is not a Detector subclass")
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"a detector needs a name that is an identifier (it names its config section), got {cls.name!r}")
    if cls.name in ("data", "train", "detector"):
        raise ValueError(f"detector name {cls.name!r} is reserved for a shared config section")
    old = _REGISTRY.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"detector {cls.name!r} is already registered as {old.__module__}.{old.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in BUILTIN.values():
        importlib.import_module(module)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
    for module in filter(None, (m.strip() for m in os.environ.get(ENV_VAR, "").split(","))):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a broken plugin (syntax error, failing import, name clash)
            raise UnknownDetectorError(f"{ENV_VAR} names module {module!r}, which cannot be imported: "
                                       f"{type(exc).__name__}: {exc}") from exc


def names() -> list[str]:
    """The registered detector names, sorted."""
    _load_plugins()
    return sorted(_REGISTRY)


def get(name: str) -> type[Detector]:
    """The detector class registered as ``name``; :class:`UnknownDetectorError` listing the choices."""
    _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownDetectorError(f"unknown detector {name!r}; registered: {', '.join(sorted(_REGISTRY))} "
                                   f"(others register through the {ENTRY_POINT_GROUP!r} entry point group or "
                                   f"${ENV_VAR})") from None


def build(config: Config, device: torch.device | str = "cpu") -> Detector:
    """A new, untrained detector of ``config`` on ``device`` (networks initialised from torch's global RNG)."""
    return get(config.detector)(config, device)


def input_spec(config: Config) -> InputSpec:
    """The tiles a detector of ``config`` expects (px and magnification), without building it."""
    return get(config.detector).input_spec_of(config)


def load(checkpoint, device: torch.device | str | None = None, backbone_weights=None) -> Detector:
    """The trained detector of a checkpoint file (complete or not), in eval mode, on ``device`` (default:
    cuda when available). ``backbone_weights``: a pretrained backbone weight file overriding the config's
    source. Raises :class:`~wsi_ad.detectors.checkpoint.CheckpointError` for an unusable file."""
    from wsi_ad.detectors.checkpoint import detector_from_payload, load_checkpoint

    return detector_from_payload(load_checkpoint(checkpoint), device, backbone_weights)[0]


__all__ = ["BUILTIN", "Detector", "InputSpec", "UnknownDetectorError", "build", "get", "input_spec", "load", "names",
           "register"]
