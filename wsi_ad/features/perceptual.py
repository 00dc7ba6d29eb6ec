"""Relative perceptual L1: the DPA (and PIAD) training loss and, per sample, their anomaly score.

Shvetsova et al., "Anomaly Detection with Deep Perceptual Autoencoders" (official code
ninatu/anomaly_detection). For an image x and its reconstruction x̃, with f̂ the frozen backbone's features
standardized per channel (``(f - mean_c) / std_c``)::

    L(x, x̃) = mean |f̂(x) - f̂(x̃)| / mean |f̂(x)|        (means over C, H, W; one value per sample)

The denominator is detached (it only rescales each sample). Unitless; 0 for a perfect reconstruction.

The per-channel statistics come from one of two places: the fixed ImageNet statistics the official code
ships for VGG-19 (:func:`imagenet_feature_stats`, the paper setting), or measured on the normal training
tiles before training (:func:`feature_stats`).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import numpy as np
import torch
from torch import nn

from wsi_ad.features.backbones import BackboneError, FeatureExtractor

#: Backbones whose ImageNet feature statistics ship with wsi-ad (``wsi_ad/features/data``, see NOTICE.md there).
IMAGENET_STATS_FILES = {"vgg19": "vgg19_imagenet_feature_stats.npz"}


def layers_by_size(layers) -> dict[int, str] | None:
    """A config's ``layers`` ({input size px: layer name}; YAML may give the sizes as strings) with int sizes, or
    None when unset or empty. Raises :class:`~wsi_ad.config.ConfigError` for anything else."""
    from wsi_ad.config import ConfigError

    if layers is None:
        return None
    if not isinstance(layers, dict):
        raise ConfigError(f"layers must be a mapping of input size to layer name, got {layers!r}")
    try:
        return {int(k): str(v) for k, v in layers.items()} or None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"layers keys must be input sizes in px, got {list(layers)}") from exc


def check_perceptual_settings(backbone: str, layers: dict[int, str] | None, feature_stats: str) -> None:
    """Raise :class:`~wsi_ad.config.ConfigError` naming the first invalid perceptual-loss setting of a detector's
    config section: an unknown backbone, a layer it does not have, or ``feature_stats`` other than ``imagenet``
    (only for backbones whose ImageNet statistics ship, :data:`IMAGENET_STATS_FILES`) and ``train``."""
    from wsi_ad.config import ConfigError
    from wsi_ad.features.backbones import LAYER_NAMES, list_backbones

    if backbone not in list_backbones():
        raise ConfigError(f"unknown backbone {backbone!r}; choose one of {', '.join(list_backbones())}")
    if layers:
        bad = sorted({v for v in layers.values() if v not in LAYER_NAMES[backbone]})
        if bad:
            raise ConfigError(f"layers: {bad} not layers of {backbone} (choose from {list(LAYER_NAMES[backbone])})")
    if feature_stats not in ("imagenet", "train"):
        raise ConfigError(f"feature_stats must be imagenet or train, got {feature_stats!r}")
    if feature_stats == "imagenet" and backbone not in IMAGENET_STATS_FILES:
        raise ConfigError(f"feature_stats: imagenet needs a backbone with shipped ImageNet statistics "
                          f"({', '.join(sorted(IMAGENET_STATS_FILES))}); {backbone} has none: use train")


def relative_l1(target_features: torch.Tensor, recon_features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, C, H, W) standardized features of x and x̃ -> (B,) mean|f̂(x) - f̂(x̃)| / mean|f̂(x)| (denominator detached)."""
    dims = tuple(range(1, target_features.ndim))
    num = (target_features - recon_features).abs().mean(dim=dims)
    den = target_features.abs().mean(dim=dims).detach()
    return num / (den + eps)


class PerceptualLoss(nn.Module):
    """Relative perceptual L1 with per-channel feature standardization, one set of statistics per input size.

    ``stats``: ``{size: (mean, std)}`` with (C,) float tensors for the feature layer of that size (see
    :func:`feature_stats`). ``forward(x, recon)`` -> (B,) float32 losses, x and recon (B, 3, S, S) in [-1, 1].
    ``target_features(x)`` can be computed once and passed as ``target=`` (scoring computes each input's
    features once).
    """

    def __init__(self, extractor: FeatureExtractor, stats: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.extractor = extractor
        self.sizes = sorted(int(s) for s in stats)
        for size, (mean, std) in stats.items():
            self.register_buffer(f"mean_{int(size)}", mean.detach().float().view(1, -1, 1, 1).clone())
            self.register_buffer(f"std_{int(size)}", std.detach().float().clamp_min(1e-6).view(1, -1, 1, 1).clone())

    def stats_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The statistics as a checkpoint entry: ``{"<px>": {"mean": (C,), "std": (C,)}}``, float32 on the CPU
        (read back with :meth:`stats_from_state`)."""
        return {str(s): {"mean": getattr(self, f"mean_{s}").view(-1).cpu(), "std": getattr(self, f"std_{s}").view(-1).cpu()}
                for s in self.sizes}

    @staticmethod
    def stats_from_state(state: dict[str, dict[str, torch.Tensor]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``stats`` for the constructor from a :meth:`stats_state` entry."""
        return {int(s): (v["mean"], v["std"]) for s, v in state.items()}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> standardized float32 features (B, C, h, w) of the layer for S px."""
        size = int(x.shape[-1])
        if size not in self.sizes:
            raise ValueError(f"no feature statistics for {size} px inputs (have {self.sizes})")
        f = self.extractor(x, size).float()
        return (f - getattr(self, f"mean_{size}")) / getattr(self, f"std_{size}")

    def forward(self, x: torch.Tensor, recon: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        if target is None:
            with torch.no_grad():
                target = self.features(x)
        return relative_l1(target, self.features(recon))


def perceptual_scores(perceptual: PerceptualLoss, tiles: torch.Tensor, recon: torch.Tensor,
                      pixel_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The anomaly score of the DPA and PIAD: (B,) float32 relative perceptual L1 of each tile (B, 3, S, S) and
    its reconstruction, each input's features computed once; with ``pixel_maps`` also (B, h, w) float32 maps,
    per feature cell the channel mean of |f̂(x) − f̂(x̃)| over the tile's mean |f̂(x)|, so that a map's mean is
    the tile's score (the official code's pixel-wise reduction, at the feature layer's resolution rather than
    upsampled)."""
    target = perceptual.features(tiles)
    recon_features = perceptual.features(recon)
    score = relative_l1(target, recon_features).float()
    pmap = None
    if pixel_maps:
        den = target.abs().mean(dim=(1, 2, 3)).float()
        pmap = (target - recon_features).abs().mean(dim=1).float() / (den + 1e-8).view(-1, 1, 1)
    return score, pmap


@torch.no_grad()
def feature_stats(extractor: FeatureExtractor, images: torch.Tensor, size: int,
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std, (C,) float32 each, of ``extractor``'s features for ``size`` px inputs over
    ``images`` (N, 3, size, size) in [-1, 1] (pooled over images and spatial positions)."""
    total = total_sq = None
    count = 0
    for start in range(0, images.shape[0], batch_size):
        f = extractor(images[start : start + batch_size], size).double()
        s = f.sum(dim=(0, 2, 3))
        sq = (f * f).sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += f.shape[0] * f.shape[2] * f.shape[3]
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0)
    return mean.float().cpu(), var.sqrt().float().cpu()


@cache
def _imagenet_stats_file(backbone: str) -> dict[str, np.ndarray]:
    name = IMAGENET_STATS_FILES.get(backbone)
    if name is None:
        raise BackboneError(f"no ImageNet feature statistics ship for backbone {backbone!r} (only for "
                            f"{', '.join(sorted(IMAGENET_STATS_FILES))}); use feature_stats: train")
    with resources.files("wsi_ad.features").joinpath("data", name).open("rb") as fh, np.load(fh) as npz:
        return {k: npz[k] for k in npz.files}


def imagenet_feature_stats(backbone: str, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation, (C,) float32 each, of ``backbone``'s ``layer`` features on
    ImageNet: the fixed statistics of the official DPA code (ninatu/anomaly_detection,
    ``vgg19_ILSVRC2012_object_detection_mean_var.pt``), shipped inside the package.

    Raises :class:`~wsi_ad.features.backbones.BackboneError` when none ship for that backbone or layer."""
    stats = _imagenet_stats_file(backbone)
    if f"{layer}.mean" not in stats:
        have = sorted({k.split(".")[0] for k in stats})
        raise BackboneError(f"no ImageNet feature statistics for {backbone} layer {layer!r} (have {', '.join(have)})")
    return torch.from_numpy(stats[f"{layer}.mean"].copy()), torch.from_numpy(stats[f"{layer}.std"].copy())
