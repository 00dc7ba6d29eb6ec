"""PIAD's four networks: encoder, generator, image critic and latent critic (``residual9``, latent 1 x 1).

Tuluptceva et al., "Perceptual Image Anomaly Detection" (ACPR 2019); official code ninatu/anomaly_detection
(``dpa/pg_encoders.py``, ``dpa/pg_decoders.py`` type ``residual9`` at their stable full-resolution network,
``piad/latent_dis.py``). Our own re-implementation following ``shared/METHODS.md`` §2.1 and §4.1, built from
the DPA's pre-activation blocks (:mod:`wsi_ad.detectors.dpa.residual`; LeakyReLU 0.2, zero padding, no
normalisation layer).

Shapes (S = image size, a power of two; widths listed per resolution, S ... 4 px down or 4 ... S px up):

- :class:`Residual9Encoder` (the encoder E, and the image critic with ``out_channels=1``): (B, 3, S, S) ->
  (B, out_channels, 1, 1). From-RGB = conv3x3(3 -> w_S) + plain block; one down block per halving
  (w_r -> w_{r/2}) down to 4 x 4; then LeakyReLU + conv4x4 without padding (w_4 -> out_channels).
- :class:`Residual9Generator` (G): (B, latent_dim, 1, 1) -> (B, 3, S, S), linear output (no tanh). LeakyReLU +
  conv4x4 with padding 3 (latent_dim -> w_4) makes the 4 x 4 map; one up block per doubling; LeakyReLU +
  conv3x3 (w_S -> 3).
- :class:`LatentCritic`: (B, latent_dim, 1, 1) -> (B, 1, 1, 1), 1x1 convs latent_dim -> 1024 -> 1024 -> 1 with
  LeakyReLU 0.2 between them.

Initialisation, the official distributions: every conv of E, G and the image critic Kaiming-normal (fan_out,
leaky_relu, a = 0.2), biases PyTorch's default; the latent critic's convs Xavier-uniform with the LeakyReLU
gain (gain 1 for the last, linear one). The official convs are first Xavier-initialised, then overwritten, so
equal seeds do not give equal weights. With the Camelyon16 widths the parameter counts are those METHODS §4.1
measured on the official modules: 3,453,952 / 2,854,147 / 899,073 / 1,313,793 (pinned by the tests).
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_ad.detectors.dpa.residual import LEAKY_SLOPE, DownBlock, PlainBlock, UpBlock


def _kaiming(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE, mode="fan_out", nonlinearity="leaky_relu")
    return module


class Residual9Encoder(nn.Module):
    """(B, 3, S, S) -> (B, out_channels, 1, 1); ``widths`` at S, S/2, ..., 4 px (see the module docstring)."""

    def __init__(self, widths: list[int] | tuple[int, ...], out_channels: int):
        super().__init__()
        widths = [int(w) for w in widths]
        self.image_size = 4 * 2 ** (len(widths) - 1)
        self.from_rgb = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1), PlainBlock(widths[0], widths[0]))
        self.down = nn.Sequential(*[DownBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)])
        self.head = nn.Sequential(nn.LeakyReLU(LEAKY_SLOPE), nn.Conv2d(widths[-1], int(out_channels), 4))
        _kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"expected {self.image_size} x {self.image_size} px inputs, got {tuple(x.shape[-2:])}")
        return self.head(self.down(self.from_rgb(x)))


class Residual9Generator(nn.Module):
    """(B, latent_dim, 1, 1) -> (B, 3, S, S); ``widths`` at 4, 8, ..., S px (see the module docstring)."""

    def __init__(self, latent_dim: int, widths: list[int] | tuple[int, ...]):
        super().__init__()
        widths = [int(w) for w in widths]
        self.latent_dim = int(latent_dim)
        self.image_size = 4 * 2 ** (len(widths) - 1)
        self.from_latent = nn.Sequential(nn.LeakyReLU(LEAKY_SLOPE), nn.Conv2d(self.latent_dim, widths[0], 4, padding=3))
        self.up = nn.Sequential(*[UpBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)])
        self.to_rgb = nn.Sequential(nn.LeakyReLU(LEAKY_SLOPE), nn.Conv2d(widths[-1], 3, 3, padding=1))
        _kaiming(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_rgb(self.up(self.from_latent(z.reshape(z.shape[0], self.latent_dim, 1, 1))))


class LatentCritic(nn.Module):
    """(B, latent_dim, 1, 1) -> (B, 1, 1, 1): 1x1 convs through ``hidden`` widths, LeakyReLU between them."""

    def __init__(self, latent_dim: int, hidden: list[int] | tuple[int, ...] = (1024, 1024)):
        super().__init__()
        dims = [int(latent_dim), *map(int, hidden)]
        layers: list[nn.Module] = []
        gain = nn.init.calculate_gain("leaky_relu", LEAKY_SLOPE)
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            conv = nn.Conv2d(a, b, 1)
            nn.init.xavier_uniform_(conv.weight, gain=gain)
            layers += [conv, nn.LeakyReLU(LEAKY_SLOPE)]
        last = nn.Conv2d(dims[-1], 1, 1)
        nn.init.xavier_uniform_(last.weight, gain=1.0)
        self.latent_dim = int(latent_dim)
        self.net = nn.Sequential(*layers, last)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], self.latent_dim, 1, 1))


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
