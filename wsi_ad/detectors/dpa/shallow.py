"""The progressive-growing residual autoencoder of the Deep Perceptual Autoencoder (DPA).

Pre-activation residual blocks (LeakyReLU 0.2 -> conv3x3 -> LeakyReLU 0.2 -> conv3x3, plus a 1x1
shortcut when the width changes), no normalization layers, average-pool downsampling, nearest-neighbour
upsampling, a linear spatial bottleneck and a linear RGB output. Images are (B, 3, S, S) float in
[-1, 1].

Resolutions run from ``image_size`` down to ``latent_size`` by factors of 2; ``channels[i]`` is the width
at resolution ``image_size / 2**i`` (so ``len(channels) == log2(image_size / latent_size) + 1``). The
Camelyon16 setting: 64 px in, three downsamplings to an 8x8 bottleneck of 4 channels, 4 channels
everywhere (``channels=(4, 4, 4, 4)``, ``latent_channels=4``).

Progressive growing: ``forward(x, size, alpha)`` runs the network at ``size`` px (any power of two
between ``2 * latent_size`` and ``image_size``). For ``alpha < 1`` the newest (``size``) blocks are faded
in, as in progressive GANs: the encoder mixes ``down[size](from_rgb[size](x))`` with
``from_rgb[size/2](avgpool(x))`` and the decoder ``to_rgb[size](up[size](h))`` with
``upsample(to_rgb[size/2](h))``. ``alpha = 0`` is exactly the ``size/2`` network applied to the halved image
and upsampled; ``alpha = 1`` is the grown network alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsi_ad.detectors.dpa.networks import AutoencoderConfig, ProgressiveAutoencoder


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


class PreActResBlock(nn.Module):
    """(B, cin, H, W) -> (B, cout, H, W): x + conv(act(conv(act(x)))), 1x1 shortcut when cin != cout."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(_act(), nn.Conv2d(cin, cout, 3, padding=1), _act(), nn.Conv2d(cout, cout, 3, padding=1))
        self.shortcut = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.body(x)


class ShallowAutoencoder(ProgressiveAutoencoder):
    """Encoder/decoder grown from ``2 * latent_size`` px up to ``image_size`` px (see the module docstring).

    ``encode(x, size, alpha)``: (B, 3, size, size) -> (B, latent_channels, latent_size, latent_size).
    ``decode(z, size, alpha)``: the inverse shapes. ``forward`` = decode(encode(x)).
    """

    def __init__(self, config: AutoencoderConfig = AutoencoderConfig()):
        super().__init__()
        self.config = config
        res = config.resolutions  # e.g. (64, 32, 16, 8)
        grown = res[:-1]  # sizes the network can run at
        self.from_rgb = nn.ModuleDict({str(s): nn.Conv2d(3, config.width(s), 1) for s in grown})
        self.down = nn.ModuleDict({str(s): PreActResBlock(config.width(s), config.width(s // 2)) for s in grown})
        self.to_latent = nn.Sequential(_act(), nn.Conv2d(config.width(config.latent_size), config.latent_channels, 3, padding=1))
        self.from_latent = nn.Conv2d(config.latent_channels, config.width(config.latent_size), 3, padding=1)
        self.up = nn.ModuleDict({str(s): PreActResBlock(config.width(s // 2), config.width(s)) for s in grown})
        self.to_rgb = nn.ModuleDict({str(s): nn.Sequential(_act(), nn.Conv2d(config.width(s), 3, 1)) for s in grown})

    def _down(self, size: int, h: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.down[str(size)](h), 2)

    def _up(self, size: int, h: torch.Tensor) -> torch.Tensor:
        return self.up[str(size)](F.interpolate(h, scale_factor=2, mode="nearest"))
