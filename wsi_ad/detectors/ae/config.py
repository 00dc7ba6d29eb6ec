"""The plain autoencoder baseline's config section (``ae:`` in a config YAML): Bergmann et al.'s convolutional
autoencoder with an L2 or SSIM loss (``shared/METHODS.md`` §9), on 64 px tiles."""

from __future__ import annotations

from dataclasses import dataclass

from wsi_ad.config import ConfigError


@dataclass
class AEConfig:
    """Network, loss, score and optimisation of the autoencoder baseline.

    ``image_size`` px tiles (a multiple of 16) go through the encoder of Bergmann et al. (4x4 stride-2 and 3x3
    convolutions, LeakyReLU 0.2) down to ``image_size / 16`` px and a valid convolution to a ``latent_dim`` code;
    the decoder mirrors it with transposed convolutions, linear output. ``loss``: ``l2`` (squared error per pixel)
    or ``ssim`` (1 - SSIM per pixel, Gaussian window of ``ssim_sigma`` px, on tiles mapped to [0, 1]). Score: the
    ``score_reduction`` (``mean`` or ``max``) of the per-pixel residual map of that loss. Adam ``lr``,
    ``weight_decay``, ``iterations`` steps.
    """

    image_size: int = 64
    latent_dim: int = 100
    loss: str = "l2"
    ssim_sigma: float = 1.5
    score_reduction: str = "mean"
    iterations: int = 20000
    lr: float = 2e-4
    weight_decay: float = 1e-5

    def validate(self) -> None:
        """Raise :class:`~wsi_ad.config.ConfigError` naming the first invalid key."""
        if self.image_size < 16 or self.image_size % 16:
            raise ConfigError(f"image_size must be a multiple of 16 (four stride-2 layers), got {self.image_size}")
        if self.loss not in ("l2", "ssim"):
            raise ConfigError(f"loss must be l2 or ssim, got {self.loss!r}")
        if self.score_reduction not in ("mean", "max"):
            raise ConfigError(f"score_reduction must be mean or max, got {self.score_reduction!r}")
        if self.latent_dim < 1 or self.iterations < 0 or self.lr <= 0 or self.weight_decay < 0 or self.ssim_sigma <= 0:
            raise ConfigError("latent_dim must be >= 1, iterations >= 0, lr and ssim_sigma positive, weight_decay >= 0")
