"""Typed configuration of a detector and its training, loaded from YAML.

A config names its detector and holds that detector's own section (named after it), plus the two sections
every detector shares; unknown keys are an error (a typo must not silently fall back to a default)::

    detector: dpa                 # a registered detector (wsi-ad detectors lists them)
    dpa:      {...}               # the detector's own section: its networks, losses, optimizers, schedule
    data:     {magnification: 10x, image_mpp: null, buffer_tiles: 65536, tiles_per_slide: null,
               flips: true, rot90: false, contaminate: 0.0}
    train:    {batch_size: 128, seed: 0, checkpoint_every: 1000, log_every: 50, device: auto,
               amp: false, channels_last: true}

The detector's section is a dataclass of the detector's :attr:`~wsi_ad.detectors.base.Detector.config_class`
(see its docstring); a missing ``detector`` key means ``dpa``. Files written before the detector interface
(sections ``model``/``backbone``/``data``/``train``, the DPA only) are read as the DPA with the ``shallow``
network they were trained with and feature statistics measured on the training tiles
(:func:`upgrade_legacy`).

Shipped configs live inside the package (``wsi_ad/configs/``; the repository's ``configs/`` is a link to that
folder) and are found by name wherever wsi-ad is installed: ``--config camelyon16_paper`` is
``wsi_ad/configs/camelyon16_paper.yaml`` (:func:`config_path`; ``wsi-ad configs`` lists them). See
``camelyon16_paper`` and ``demo_cpu``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from wsi_ad.errors import WsiAdError

DEFAULT_DETECTOR = "dpa"


class ConfigError(WsiAdError):
    """A configuration file or value is invalid. The message names the key."""


CONFIG_SUFFIXES = (".yaml", ".yml")


def packaged_config_dir() -> Path:
    """The folder of the configs shipped inside the package (``wsi_ad/configs``)."""
    return Path(str(resources.files("wsi_ad").joinpath("configs")))


def packaged_configs() -> dict[str, Path]:
    """Every shipped config by name: its path below :func:`packaged_config_dir` without the ``.yaml`` suffix
    (``camelyon16_paper``, ``ablations/dpa_adv_0.1_cpu``), sorted, subfolders last."""
    root = packaged_config_dir()
    found = {path.relative_to(root).with_suffix("").as_posix(): path
             for path in root.rglob("*") if path.suffix in CONFIG_SUFFIXES and path.is_file()}
    return dict(sorted(found.items(), key=lambda item: ("/" in item[0], item[0])))   # folders last


def config_path(name_or_path: str | os.PathLike) -> Path:
    """The YAML file a ``--config`` / ``--space`` argument means: an existing file as given, else the packaged config
    of that name (``camelyon16_paper``, ``camelyon16_paper.yaml``, or ``configs/camelyon16_paper.yaml`` as the
    README writes it, so the same command works outside a source checkout).

    Raises:
        ConfigError: neither a file nor a packaged name (the message lists the names).
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if not str(name_or_path).strip():
        raise ConfigError("an empty config name: give a YAML file or a packaged name (`wsi-ad configs` lists them)")
    name = path.as_posix()
    if name.startswith("configs/"):
        name = name[len("configs/"):]
    for suffix in CONFIG_SUFFIXES:
        name = name.removesuffix(suffix)
    shipped = packaged_configs()
    if name in shipped:
        return shipped[name]
    if path.is_dir():
        raise ConfigError(f"{name_or_path}: a folder, not a config file (give a YAML file or a packaged name)")
    raise ConfigError(f"{name_or_path}: no such file, and no packaged config of that name (packaged: "
                      f"{', '.join(shipped)}; `wsi-ad configs` describes them)")


def config_summary(path: str | os.PathLike, width: int = 110) -> str:
    """The first sentence of a config file's leading comment block, on one line of at most ``width`` characters."""
    lines = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
    text = " ".join(line for line in lines if line)
    sentence = re.split(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\.\s+(?=[A-Z(`])", text)[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[:width - 1].rstrip() + "…"


def read_yaml(path: str | os.PathLike, error: type[WsiAdError] = WsiAdError, what: str = "file") -> Any:
    """The parsed content of a YAML file; an unreadable file or invalid YAML raises ``error`` naming the path
    and ``what`` it was meant to be."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not a YAML {what} (not UTF-8 text: {exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise error(f"{path}: invalid YAML: {exc}") from exc


@dataclass
class DataSection:
    """Training tiles, for every detector."""

    magnification: str = "10x"    # which tiles/<mag> array of the slide stores
    image_mpp: float | None = None  # µm/px of image-folder tiles; resized to the magnification when set
    buffer_tiles: int = 65536     # tiles held in memory at once (refilled from random store chunks)
    tiles_per_slide: int | None = None  # train on a seeded random sample of at most this many tiles per store
    flips: bool = True            # random horizontal and vertical flips
    rot90: bool = False           # random 90° rotations
    #: fraction of the training pool made of known tumour tiles (a contamination experiment, see
    #: :func:`wsi_ad.tile_pool.contamination_sources`); 0 = normal tiles only
    contaminate: float = 0.0

    def validate(self) -> None:
        if self.buffer_tiles < 1:
            raise ConfigError(f"data.buffer_tiles must be >= 1, got {self.buffer_tiles}")
        if self.image_mpp is not None and not self.image_mpp > 0:
            raise ConfigError(f"data.image_mpp must be a positive µm/px (or null), got {self.image_mpp}")
        if self.tiles_per_slide is not None and self.tiles_per_slide < 1:
            raise ConfigError(f"data.tiles_per_slide must be >= 1 (or null for all), got {self.tiles_per_slide}")
        if not 0.0 <= self.contaminate < 1.0:
            raise ConfigError(f"data.contaminate must be a fraction in [0, 1), got {self.contaminate}")


@dataclass
class TrainSection:
    """The shared training loop (:mod:`wsi_ad.detectors.loop`): batches, seed, checkpoints, device."""

    batch_size: int = 128
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 50
    device: str = "auto"          # auto (cuda when available), cuda, cpu
    amp: bool = False             # bf16 autocast on cuda (the papers trained in fp32)
    channels_last: bool = True    # on cuda

    def validate(self) -> None:
        if self.batch_size < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("train: batch_size, checkpoint_every and log_every must be positive")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"train.device must be auto, cuda or cpu, got {self.device!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked against the annotation ``tp`` (bool, int, float, str, list[...], dict[..., ...],
    ``X | None``) and converted where that is lossless: an int or a numeric string (YAML reads ``1e-3`` as
    a string) for a float, a numeric string for an int key. Raises :class:`ConfigError` naming ``name``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return {coerce(k, args[0], f"{name} key"): coerce(v, args[1], f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if tp in (int, float) and isinstance(value, str):
        try:
            value = float(value) if tp is float else int(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a number ({_type_name(tp)}), got {value!r}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")


def _section_from_dict(section_cls: type, values: Any, name: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config section {name!r} must be a mapping")
    known = {g.name for g in dataclasses.fields(section_cls)}
    bad = set(values) - known
    if bad:
        raise ConfigError(f"unknown key(s) {sorted(bad)} in config section {name!r}; expected {sorted(known)}")
    hints = typing.get_type_hints(section_cls)
    values = {key: coerce(value, hints.get(key, Any), f"{name}.{key}") for key, value in values.items()}
    try:
        return section_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from exc


@dataclass
class Config:
    """``detector`` (a registered name), ``section`` (that detector's config dataclass), ``data``, ``train``."""

    detector: str = DEFAULT_DETECTOR
    section: Any = None
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self):
        if self.section is None:
            self.section = detector_class(self.detector).config_class()

    def to_dict(self) -> dict[str, Any]:
        return {"detector": self.detector, self.detector: dataclasses.asdict(self.section),
                "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Config:
        data = upgrade_legacy(dict(data or {}))
        detector = data.pop("detector", DEFAULT_DETECTOR)
        if not isinstance(detector, str):
            raise ConfigError(f"detector must be a name, got {detector!r}")
        detector_cls = detector_class(detector)
        unknown = set(data) - {detector, "data", "train"}
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; expected {detector!r} (the detector's "
                              "own section), 'data' and 'train'")
        config = cls(detector=detector,
                     section=_section_from_dict(detector_cls.config_class, data.get(detector), detector),
                     data=_section_from_dict(DataSection, data.get("data"), "data"),
                     train=_section_from_dict(TrainSection, data.get("train"), "train"))
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Config:
        """A config from a YAML file, or a packaged config by name (:func:`config_path`)."""
        path = config_path(path)
        data = read_yaml(path, ConfigError, "config")
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid key (the detector checks its own section)."""
        self.data.validate()
        self.train.validate()
        try:
            self.section.validate()
        except ConfigError as exc:
            raise ConfigError(f"{self.detector}: {exc}") from exc

    def set_backbone_weights(self, path: str | os.PathLike | None = None, download: bool = False) -> None:
        """Point the detector's pretrained backbone at a weight file and/or allow downloading its weights
        (runtime settings: they change where weights come from, not what is computed). Raises
        :class:`ConfigError` when the detector has no pretrained backbone."""
        for key, value in (("backbone_weights", str(path) if path is not None else None), ("download_weights", download)):
            if value in (None, False):
                continue
            if not hasattr(self.section, key):
                raise ConfigError(f"detector {self.detector!r} has no pretrained backbone ({key} does not apply)")
            setattr(self.section, key, value)


def detector_class(name: str):
    """The registered detector class ``name``; :class:`ConfigError` listing the choices when unknown."""
    from wsi_ad.detectors import UnknownDetectorError, get

    try:
        return get(name)
    except UnknownDetectorError as exc:
        raise ConfigError(str(exc)) from None


#: Keys that change how a run is carried out but not what it computes; a resumed run may change them.
#: ``(section, key)``, where section ``"detector"`` means the detector's own section.
RUNTIME_KEYS = {("train", "checkpoint_every"), ("train", "log_every"), ("train", "device"),
                ("detector", "backbone_weights"), ("detector", "download_weights")}


#: Keys added after models were trained and stored, with the value every earlier model had: left out of the
#: identity at that value, so the model ids (``scores/<model_id>`` in slide stores) of earlier models stay valid.
ADDED_KEYS = {("data", "contaminate"): 0.0, ("dpa", "loss"): "perceptual", ("dpa", "l1_weight"): 0.0,
              ("dpa", "adversarial_weight"): 0.0, ("dpa", "critic_channels"): [4, 4, 4, 4, 4], ("dpa", "n_critic"): 2,
              ("dpa", "critic_lr"): 0.0002}


def training_identity(config: Config) -> dict[str, Any]:
    """The config without its runtime-only keys (and :data:`ADDED_KEYS` at their earlier value): two runs with
    equal identities compute the same model."""
    data = config.to_dict()
    for section, key in RUNTIME_KEYS:
        data[config.detector if section == "detector" else section].pop(key, None)
    for (section, key), earlier in ADDED_KEYS.items():
        if key in data.get(section, {}) and data[section][key] == earlier:
            del data[section][key]
    return data


def upgrade_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict written before the detector interface (sections ``model``/``backbone``/``data``/``train``,
    always the DPA) in today's form (see :func:`wsi_ad.detectors.dpa.config.upgrade_legacy`); any other dict
    unchanged."""
    if "detector" in data or not ({"model", "backbone"} & set(data)):
        return data
    from wsi_ad.detectors.dpa.config import upgrade_legacy as upgrade

    return upgrade(data)
