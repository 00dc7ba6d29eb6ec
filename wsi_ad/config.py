"""Typed configuration of model training, loaded from YAML; the defaults reproduce the paper (Camelyon16).

A YAML file holds any subset of the sections below; unknown keys are an error (a typo must not silently
fall back to a default)::

    model:    {image_size: 64, latent_size: 8, latent_channels: 4, channels: [4, 4, 4, 4]}
    backbone: {name: vgg19, weights: null, download: false, layers: null}
    data:     {magnification: 10x, image_mpp: null, buffer_tiles: 65536, stats_tiles: 4096, tiles_per_slide: null,
               flips: true, rot90: false}
    train:    {progressive: true, start_size: 16, iterations: {stab16: 20000, ...}, flat_iterations: null,
               batch_size: 128, lr: 0.001, betas: [0.9, 0.999], seed: 0, checkpoint_every: 1000,
               log_every: 50, device: auto, amp: true, channels_last: true}

See ``configs/camelyon16_paper.yaml`` and ``configs/demo_cpu.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from wsi_ad.errors import WsiAdError

PAPER_ITERATIONS = {"stab16": 20000, "trns32": 20000, "stab32": 20000, "trns64": 20000, "stab64": 8666}


class ConfigError(WsiAdError):
    """A configuration file or value is invalid. The message names the key."""


def read_yaml(path: str | os.PathLike, error: type[WsiAdError] = WsiAdError, what: str = "file") -> Any:
    """The parsed content of a YAML file; an unreadable file or invalid YAML raises ``error`` naming the path
    and ``what`` it was meant to be."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{path}: invalid YAML: {exc}") from exc


@dataclass
class ModelSection:
    """Autoencoder architecture (see :class:`wsi_ad.model.autoencoder.AutoencoderConfig`)."""

    image_size: int = 64          # px, square input at the data magnification
    latent_size: int = 8          # px, spatial size of the bottleneck
    latent_channels: int = 4
    channels: list[int] = field(default_factory=lambda: [4, 4, 4, 4])  # width at image_size, /2, ..., latent_size


@dataclass
class BackboneSection:
    """Frozen feature extractor of the perceptual loss (see :mod:`wsi_ad.model.backbones`)."""

    name: str = "vgg19"
    weights: str | None = None    # explicit weight file; default: the registry's source
    download: bool = False        # allow downloading missing hub-cache weights
    layers: dict[int, str] | None = None  # feature layer overrides per input size (px), e.g. {64: block7}

    def __post_init__(self):
        if self.layers is not None:  # YAML/JSON may give "64": normalize to int sizes
            if not isinstance(self.layers, dict):
                raise ConfigError(f"backbone.layers must be a mapping of input size to layer name, got {self.layers!r}")
            try:
                self.layers = {int(k): str(v) for k, v in self.layers.items()} or None
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"backbone.layers keys must be input sizes in px, got {list(self.layers)}") from exc


@dataclass
class DataSection:
    """Training tiles."""

    magnification: str = "10x"    # which tiles/<mag> array of the slide stores
    image_mpp: float | None = None  # µm/px of image-folder tiles; resized to the magnification when set
    buffer_tiles: int = 65536     # tiles held in memory at once (refilled from random store chunks)
    stats_tiles: int = 4096       # normal tiles used for the per-channel feature statistics
    tiles_per_slide: int | None = None  # train on a seeded random sample of at most this many tiles per store
    flips: bool = True            # random horizontal and vertical flips
    rot90: bool = False           # random 90° rotations


@dataclass
class TrainSection:
    """Optimisation and schedule. ``iterations`` maps stage names (stab16, trns32, ...) to iterations."""

    progressive: bool = True
    start_size: int = 16
    iterations: dict[str, int] = field(default_factory=lambda: dict(PAPER_ITERATIONS))
    flat_iterations: int | None = None  # --no-progressive: iterations at full size (default: the sum)
    batch_size: int = 128
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 50
    device: str = "auto"          # auto (cuda when available), cuda, cpu
    amp: bool = True              # bf16 autocast on cuda
    channels_last: bool = True    # on cuda


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    backbone: BackboneSection = field(default_factory=BackboneSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Config:
        data = dict(data or {})
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; expected {sorted(sections)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory().__class__
            values = data.get(f.name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"config section {f.name!r} must be a mapping")
            known = {g.name for g in dataclasses.fields(section_cls)}
            bad = set(values) - known
            if bad:
                raise ConfigError(f"unknown key(s) {sorted(bad)} in config section {f.name!r}; expected {sorted(known)}")
            kwargs[f.name] = section_cls(**values)
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Config:
        data = read_yaml(path, ConfigError, "config")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def validate(self) -> None:
        m, t = self.model, self.train
        from wsi_ad.model.autoencoder import AutoencoderConfig

        try:
            AutoencoderConfig(m.image_size, m.latent_size, m.latent_channels, tuple(m.channels))
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from exc
        if t.batch_size < 1 or t.lr <= 0 or t.checkpoint_every < 1 or t.log_every < 1:
            raise ConfigError("train: batch_size, lr, checkpoint_every and log_every must be positive")
        if t.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"train.device must be auto, cuda or cpu, got {t.device!r}")
        if t.progressive and not (2 * m.latent_size <= t.start_size <= m.image_size):
            raise ConfigError(f"train.start_size must lie in [{2 * m.latent_size}, {m.image_size}], got {t.start_size}")
        if self.data.tiles_per_slide is not None and self.data.tiles_per_slide < 1:
            raise ConfigError(f"data.tiles_per_slide must be >= 1 (or null for all), got {self.data.tiles_per_slide}")
        if any(int(v) < 0 for v in t.iterations.values()):
            raise ConfigError("train.iterations must be >= 0")


#: Keys that change how a run is carried out but not what it computes; a resumed run may change them.
RUNTIME_KEYS = {("train", "checkpoint_every"), ("train", "log_every"), ("train", "device"),
                ("backbone", "weights"), ("backbone", "download")}


def training_identity(config: Config) -> dict[str, Any]:
    """The config without its runtime-only keys: two runs with equal identities compute the same model."""
    data = config.to_dict()
    for section, key in RUNTIME_KEYS:
        data[section].pop(key, None)
    return data
