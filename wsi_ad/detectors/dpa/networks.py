"""The DPA's autoencoder architectures, built by name from one :class:`AutoencoderConfig`.

``residual18`` (:mod:`~wsi_ad.detectors.dpa.residual`): the official Camelyon16 network of the DPA code
(ninatu/anomaly_detection, ``residual18``), the paper setting. ``shallow``
(:mod:`~wsi_ad.detectors.dpa.shallow`): the lighter net of wsi-ad before the detector interface (one residual
block per resolution), kept for the CPU demo and for checkpoints written before it.

Both take (B, 3, S, S) float images in [-1, 1] and return reconstructions of the same shape, and grow
progressively: ``forward(x, size, alpha)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture. ``channels[i]``: width at ``image_size / 2**i`` px (from the input down to the latent)."""

    image_size: int = 64
    latent_size: int = 8
    latent_channels: int = 4
    channels: tuple[int, ...] = (4, 4, 4, 4)

    def __post_init__(self):
        n_down = math.log2(self.image_size / self.latent_size)
        if n_down < 1 or n_down != int(n_down):
            raise ValueError(
                f"image_size / latent_size must be a power of two >= 2, got {self.image_size} / {self.latent_size}"
            )
        if len(self.channels) != int(n_down) + 1:
            raise ValueError(
                f"channels needs {int(n_down) + 1} widths (one per resolution {self.resolutions}), got {list(self.channels)}"
            )

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Resolutions from the input down to the bottleneck, e.g. (64, 32, 16, 8)."""
        n_down = int(math.log2(self.image_size / self.latent_size))
        return tuple(self.image_size >> i for i in range(n_down + 1))

    def width(self, size: int) -> int:
        return self.channels[self.resolutions.index(size)]


ARCHITECTURES = ("residual18", "shallow")


def build_autoencoder(architecture: str, config: AutoencoderConfig) -> nn.Module:
    """The progressive autoencoder ``architecture`` (one of :data:`ARCHITECTURES`) of ``config``'s shape.

    Raises ValueError for an unknown architecture."""
    if architecture == "residual18":
        from wsi_ad.detectors.dpa.residual import Residual18Autoencoder

        return Residual18Autoencoder(config)
    if architecture == "shallow":
        from wsi_ad.detectors.dpa.shallow import ProgressiveAutoencoder

        return ProgressiveAutoencoder(config)
    raise ValueError(f"unknown DPA architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
