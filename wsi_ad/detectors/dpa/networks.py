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

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture. ``channels[i]``: width at ``image_size / 2**i`` px (from the input down to the latent)."""

    image_size: int = 64
    latent_size: int = 8
    latent_channels: int = 4
    channels: tuple[int, ...] = (4, 4, 4, 4)

    def __post_init__(self):
        if min(self.image_size, self.latent_size, self.latent_channels, *self.channels) < 1:
            raise ValueError(f"image_size, latent_size, latent_channels and channels must be >= 1, got {self}")
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


class ProgressiveAutoencoder(nn.Module):
    """What both architectures share: the heads and blocks keyed by resolution (``from_rgb``, ``down``,
    ``to_latent``, ``from_latent``, ``up``, ``to_rgb``) and the progressive forward pass.

    ``encode(x, size, alpha)``: (B, 3, size, size) -> (B, latent_channels, latent_size, latent_size);
    ``decode(z, size, alpha)``: the inverse shapes; ``forward`` = decode(encode(x)). With ``alpha < 1`` the
    size-``size`` parts fade in: the encoder blends ``(1 - alpha) * from_rgb[size/2](avgpool(x)) + alpha *
    down(size, from_rgb[size](x))`` before the lower resolutions, the decoder ``(1 - alpha) *
    upsample(to_rgb[size/2](h)) + alpha * to_rgb[size](up(size, h))`` after them. Subclasses build the
    modules and say what one resolution step down (:meth:`_down`, to half the size) and up (:meth:`_up`,
    to twice the size) is.
    """

    config: AutoencoderConfig

    def _down(self, size: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _up(self, size: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def sizes(self) -> tuple[int, ...]:
        """Sizes (px) the network can run at, smallest first, e.g. (16, 32, 64)."""
        return tuple(sorted(self.config.resolutions[:-1]))

    def _check(self, size: int, alpha: float) -> None:
        if size not in self.sizes:
            raise ValueError(f"size must be one of {self.sizes}, got {size}")
        if alpha < 1 and size == self.sizes[0]:
            raise ValueError(f"the smallest size {size} has no previous resolution to fade from (alpha must be 1)")

    def _stages(self, size: int) -> list[int]:
        """Resolutions from ``size`` down to ``2 * latent_size``."""
        out, s = [], size
        while s > self.config.latent_size:
            out.append(s)
            s //= 2
        return out

    def encode(self, x: torch.Tensor, size: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        size = int(x.shape[-1]) if size is None else size
        self._check(size, alpha)
        h = self._down(size, self.from_rgb[str(size)](x))
        if alpha < 1:
            low = self.from_rgb[str(size // 2)](F.avg_pool2d(x, 2))
            h = (1 - alpha) * low + alpha * h
        for r in self._stages(size // 2):
            h = self._down(r, h)
        return self.to_latent(h)

    def decode(self, z: torch.Tensor, size: int, alpha: float = 1.0) -> torch.Tensor:
        self._check(size, alpha)
        h = self.from_latent(z)
        for r in reversed(self._stages(size // 2)):
            h = self._up(r, h)
        high = self.to_rgb[str(size)](self._up(size, h))
        if alpha < 1:
            low = F.interpolate(self.to_rgb[str(size // 2)](h), scale_factor=2, mode="nearest")
            return (1 - alpha) * low + alpha * high
        return high

    def forward(self, x: torch.Tensor, size: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        """(B, 3, size, size) in [-1, 1] -> reconstruction, same shape (unbounded, linear output)."""
        size = int(x.shape[-1]) if size is None else size
        return self.decode(self.encode(x, size, alpha), size, alpha)


ARCHITECTURES = ("residual18", "shallow")


def build_autoencoder(architecture: str, config: AutoencoderConfig) -> nn.Module:
    """The progressive autoencoder ``architecture`` (one of :data:`ARCHITECTURES`) of ``config``'s shape.

    Raises ValueError for an unknown architecture."""
    if architecture == "residual18":
        from wsi_ad.detectors.dpa.residual import Residual18Autoencoder

        return Residual18Autoencoder(config)
    if architecture == "shallow":
        from wsi_ad.detectors.dpa.shallow import ShallowAutoencoder

        return ShallowAutoencoder(config)
    raise ValueError(f"unknown DPA architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
