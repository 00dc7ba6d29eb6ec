"""The DPA's config section (``dpa:`` in a config YAML). The defaults are the paper's Camelyon16 setting,
as the official code (ninatu/anomaly_detection, ``configs/dpa/camelyon16``) runs it; see
``configs/camelyon16_paper.yaml``."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from wsi_ad.config import ConfigError
from wsi_ad.features.perceptual import check_perceptual_settings, layers_by_size

#: The official progressive schedule (``pg`` config): iterations per phase, 88,666 in all.
PAPER_ITERATIONS = {"stab16": 20000, "trns32": 20000, "stab32": 20000, "trns64": 20000, "stab64": 8666}
#: The official non-progressive schedule (``wo_pg`` config): 34,666 iterations at 64 px.
PAPER_FLAT_ITERATIONS = 34666


@dataclass
class DPAConfig:
    """Architecture, perceptual loss, schedule and optimiser of the Deep Perceptual Autoencoder.

    ``architecture``: ``residual18`` (the official network) or ``shallow`` (the lighter net of the CPU demo
    and of checkpoints written before the detector interface). ``channels[i]``: width at
    ``image_size / 2**i`` px, down to ``latent_size``. ``layers`` overrides the backbone's feature layer per
    input size (px), e.g. ``{64: relu4_2}``. ``feature_stats``: ``imagenet`` (the fixed per-channel
    statistics of the official code; VGG-19 only) or ``train`` (measured on ``stats_tiles`` normal training
    tiles before training). ``progressive``: progressive growing from ``start_size`` px with ``iterations``
    per phase; otherwise one phase of ``flat_iterations`` at ``image_size``. Adam with ``lr`` and ``betas``,
    re-created at every phase. ``backbone_weights`` / ``download_weights``: where the backbone's pretrained
    weights come from (runtime settings, not part of the model's identity).

    The ablations of the paper's Table 2 (official ``configs/dpa/camelyon16/final/*``, ``shared/METHODS.md`` §3.7):
    ``loss: l1`` trains and scores with the pixel L1 alone (the ``wo_pg_L1_unsupervised`` autoencoder; no backbone);
    ``l1_weight`` w > 0 adds w x the pixel L1 to the perceptual loss and to the score (``wo_pg_with_L1``);
    ``adversarial_weight`` w > 0 adds w x a WGAN-GP image critic's term to the training loss only (the score stays
    the perceptual one; ``wo_pg_with_adversarial``): a ``residual18`` critic with ``critic_channels`` widths from
    ``image_size`` down to 4 px, ``n_critic`` critic steps (each on its own batch) per autoencoder step, Adam
    ``critic_lr``; non-progressive only, as the official configs.
    """

    architecture: str = "residual18"
    image_size: int = 64          # px, square input at the data magnification
    latent_size: int = 8          # px, spatial size of the bottleneck
    latent_channels: int = 4
    channels: list[int] = field(default_factory=lambda: [4, 4, 4, 4])
    backbone: str = "vgg19"
    layers: dict[int, str] | None = None
    feature_stats: str = "imagenet"
    stats_tiles: int = 4096       # normal tiles for feature_stats: train
    progressive: bool = True
    start_size: int = 16
    iterations: dict[str, int] = field(default_factory=lambda: dict(PAPER_ITERATIONS))
    flat_iterations: int = PAPER_FLAT_ITERATIONS
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    loss: str = "perceptual"
    l1_weight: float = 0.0
    adversarial_weight: float = 0.0
    critic_channels: list[int] = field(default_factory=lambda: [4, 4, 4, 4, 4])
    n_critic: int = 2
    critic_lr: float = 2e-4
    backbone_weights: str | None = None
    download_weights: bool = False

    def __post_init__(self):
        self.layers = layers_by_size(self.layers)  # YAML/JSON may give "64": int sizes
        self.channels = list(self.channels)
        self.critic_channels = list(self.critic_channels)

    def autoencoder_config(self):
        from wsi_ad.detectors.dpa.networks import AutoencoderConfig

        return AutoencoderConfig(self.image_size, self.latent_size, self.latent_channels, tuple(self.channels))

    def validate(self) -> None:
        """Raise :class:`~wsi_ad.config.ConfigError` naming the first invalid key."""
        from wsi_ad.detectors.dpa.networks import ARCHITECTURES

        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        try:
            self.autoencoder_config()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if self.loss not in ("perceptual", "l1"):
            raise ConfigError(f"loss must be perceptual or l1 (the pixel-L1 autoencoder), got {self.loss!r}")
        if self.loss == "perceptual":
            check_perceptual_settings(self.backbone, self.layers, self.feature_stats)
        if self.l1_weight < 0 or self.adversarial_weight < 0:
            raise ConfigError("l1_weight and adversarial_weight must be >= 0")
        if self.loss == "l1" and self.l1_weight > 0:
            raise ConfigError("l1_weight adds a pixel L1 to the perceptual loss; with loss: l1 it is the whole loss "
                              "already (set l1_weight: 0)")
        if self.adversarial_weight > 0:
            if self.progressive:
                raise ConfigError("adversarial_weight needs progressive: false (the official adversarial ablations "
                                  "train one 64 px phase)")
            levels = self.image_size.bit_length() - 2          # image_size, image_size/2, ..., 4 px
            if self.image_size < 8 or self.image_size & (self.image_size - 1) or len(self.critic_channels) != levels:
                raise ConfigError(f"critic_channels needs one width per resolution from image_size {self.image_size} "
                                  f"down to 4 px ({max(levels, 0)}), got {self.critic_channels}")
            if min(self.critic_channels) < 1 or self.n_critic < 1 or self.critic_lr <= 0:
                raise ConfigError("critic_channels must be >= 1, n_critic >= 1 and critic_lr > 0")
        if self.stats_tiles < 1 or self.lr <= 0:
            raise ConfigError("stats_tiles and lr must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.progressive and not (2 * self.latent_size <= self.start_size <= self.image_size):
            raise ConfigError(f"start_size must lie in [{2 * self.latent_size}, {self.image_size}], got {self.start_size}")
        if any(int(v) < 0 for v in self.iterations.values()) or self.flat_iterations < 0:
            raise ConfigError("iterations and flat_iterations must be >= 0")
        if self.progressive:
            from wsi_ad.detectors.dpa.schedule import progressive_phases

            try:
                progressive_phases(self.iterations, self.start_size, self.image_size)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc


_LEGACY_DPA_TRAIN_KEYS = ("progressive", "start_size", "iterations", "flat_iterations", "lr", "betas")


def upgrade_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict of wsi-ad before the detector interface (sections ``model``, ``backbone``, ``data``,
    ``train``; always the DPA) in today's form.

    Those models were the ``shallow`` network with feature statistics measured on the training tiles and
    bf16 autocast on cuda by default; the backbone's ``weights``/``download`` became
    ``backbone_weights``/``download_weights``, and an unset ``flat_iterations`` meant the sum of the
    progressive ``iterations``."""
    data = copy.deepcopy(data)
    dpa: dict[str, Any] = {"architecture": "shallow", "feature_stats": "train"}
    model = data.pop("model", None) or {}
    backbone = data.pop("backbone", None) or {}
    if not isinstance(model, dict) or not isinstance(backbone, dict):
        raise ConfigError("config sections 'model' and 'backbone' must be mappings")
    dpa.update(model)
    renamed = {"name": "backbone", "weights": "backbone_weights", "download": "download_weights", "layers": "layers"}
    for key, value in backbone.items():
        dpa[renamed.get(key, key)] = value
    train = dict(data.get("train") or {})
    for key in _LEGACY_DPA_TRAIN_KEYS:
        if key in train:
            dpa[key] = train.pop(key)
    data_section = dict(data.get("data") or {})
    if "stats_tiles" in data_section:
        dpa["stats_tiles"] = data_section.pop("stats_tiles")
    if dpa.get("flat_iterations") is None:
        dpa["flat_iterations"] = sum(int(v) for v in (dpa.get("iterations") or PAPER_ITERATIONS).values())
    train.setdefault("amp", True)  # the old default: bf16 autocast on cuda
    return {"detector": "dpa", "dpa": dpa, "data": data_section, "train": train, **{
        k: v for k, v in data.items() if k not in ("data", "train")}}


def upgrade_format1(payload: dict[str, Any], checkpoint_format: int) -> dict[str, Any]:
    """A format-1 checkpoint (the DPA before the detector interface) in ``checkpoint_format`` (2, see
    :mod:`wsi_ad.detectors.checkpoint`). Its autoencoder state and
    per-size feature statistics become the DPA's state; its Adam state (present mid-phase) the training
    state of the phase that iteration lies in."""
    config = upgrade_legacy(payload["config"])
    history = dict(payload.get("history") or {})
    if "stage" in history:
        history["phase"] = history.pop("stage")
    training_state = None
    if payload.get("optimizer") is not None:
        training_state = {"optimizer": payload["optimizer"], "step": int(payload["iteration"])}
    return {"format": checkpoint_format, "wsi_ad_version": payload.get("wsi_ad_version", ""), "detector": "dpa",
            "config": config, "state": {"autoencoder": payload["model"], "feature_stats": payload["feature_stats"]},
            "training_state": training_state, "iteration": payload["iteration"], "complete": payload["complete"],
            "history": history}
