"""f-AnoGAN's three networks: the WGAN-GP generator G and critic D, and the encoder E (residual, 64 px).

Schlegl et al., "f-AnoGAN" (Medical Image Analysis 2019): the released code builds on the 64 x 64 residual
networks of Gulrajani et al.'s WGAN-GP ("Improved Training of Wasserstein GANs", 2017). Our own
re-implementation from ``shared/METHODS.md`` §8; widths are listed per resolution (S = image size, a power of two):

- :class:`Generator`: (B, latent_dim) -> (B, 3, S, S) in (-1, 1). Linear latent_dim -> w_4 x 4 x 4; one
  :class:`UpBlock` per doubling (w_r -> w_2r, BatchNorm); BatchNorm, ReLU, conv3x3 (w_S -> 3), tanh. The paper's
  widths (DIM 64): 512, 512, 256, 128, 64 at 4 ... 64 px.
- :class:`Critic`: (B, 3, S, S) -> (B, 1). conv3x3 (3 -> w_S); one :class:`DownBlock` per halving (w_r -> w_{r/2},
  layer normalisation); the 4 x 4 map flattened is the feature vector f(x) (:meth:`Critic.features`, 16 w_4
  values: 8,192 at the paper's widths); Linear -> 1. Paper widths 64, 128, 256, 512, 512 at 64 ... 4 px.
- :class:`Encoder`: (B, 3, S, S) -> (B, latent_dim): the critic's topology with BatchNorm instead of layer
  normalisation and a linear layer to latent_dim, no output squashing.

Residual blocks (pre-activation, the sum of a shortcut and a main path, no scaling):

- :class:`UpBlock` (cin -> cout, 2x larger): main = norm, ReLU, 2x upsampling + conv3x3 (cin -> cout), norm, ReLU,
  conv3x3 (cout -> cout); shortcut = 2x upsampling + conv1x1 (cin -> cout).
- :class:`DownBlock` (cin -> cout, 2x smaller): main = norm, ReLU, conv3x3 (cin -> cin), norm, ReLU, conv3x3
  (cin -> cout) + 2x2 mean pool; shortcut = 2x2 mean pool + conv1x1 (cin -> cout).

Upsampling is nearest-neighbour: the released code's depth-to-space upsampling of the input tiled four times
along the channels is the same operation. The critic's "layer normalisation" normalises each sample over channels
and pixels together with a per-channel scale and offset, which is :class:`torch.nn.GroupNorm` with one group.
Departures: RGB input and output (3 channels; the paper's images were grayscale); PyTorch's default
initialisation (the released code's He/Glorot-uniform choices are not reproduced).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"normalisation must be batch or layer, got {kind!r}")


class UpBlock(nn.Module):
    """(B, cin, H, W) -> (B, cout, 2H, 2W), BatchNorm (module docstring)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))
        h = self.conv1(F.interpolate(F.relu(self.norm1(x)), scale_factor=2, mode="nearest"))
        return shortcut + self.conv2(F.relu(self.norm2(h)))


class DownBlock(nn.Module):
    """(B, cin, H, W) -> (B, cout, H/2, W/2); ``norm`` ``layer`` (critic) or ``batch`` (encoder)."""

    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__()
        self.norm1, self.conv1 = _norm(norm, cin), nn.Conv2d(cin, cin, 3, padding=1)
        self.norm2, self.conv2 = _norm(norm, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(F.avg_pool2d(x, 2))
        h = self.conv1(F.relu(self.norm1(x)))
        return shortcut + F.avg_pool2d(self.conv2(F.relu(self.norm2(h))), 2)


def _image_size(widths: list[int]) -> int:
    return 4 * 2 ** (len(widths) - 1)


class Generator(nn.Module):
    """(B, latent_dim) (or (B, latent_dim, 1, 1)) -> (B, 3, S, S) in (-1, 1); ``widths`` at 4, 8, ..., S px."""

    def __init__(self, latent_dim: int, widths: list[int] | tuple[int, ...]):
        super().__init__()
        widths = [int(w) for w in widths]
        self.latent_dim, self.image_size, self.base = int(latent_dim), _image_size(widths), widths[0]
        self.input = nn.Linear(self.latent_dim, 16 * widths[0])
        self.up = nn.Sequential(*[UpBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)])
        self.output = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(), nn.Conv2d(widths[-1], 3, 3, padding=1),
                                    nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.input(z.reshape(z.shape[0], self.latent_dim)).view(z.shape[0], self.base, 4, 4)
        return self.output(self.up(h))


class _DownNetwork(nn.Module):
    """conv3x3 (3 -> widths[0]) then a :class:`DownBlock` per halving down to 4 x 4; ``trunk`` gives the flattened
    (B, 16 widths[-1]) map."""

    def __init__(self, widths: list[int] | tuple[int, ...], norm: str):
        super().__init__()
        widths = [int(w) for w in widths]
        self.image_size = _image_size(widths)
        self.feature_dim = 16 * widths[-1]
        self.input = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down = nn.Sequential(*[DownBlock(a, b, norm) for a, b in zip(widths[:-1], widths[1:], strict=True)])

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"expected {self.image_size} x {self.image_size} px inputs, got {tuple(x.shape[-2:])}")
        return self.down(self.input(x)).flatten(1)


class Critic(_DownNetwork):
    """(B, 3, S, S) -> (B, 1) critic values; :meth:`features` gives f(x), (B, 16 widths[-1])."""

    def __init__(self, widths: list[int] | tuple[int, ...]):
        super().__init__(widths, "layer")
        self.head = nn.Linear(self.feature_dim, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class Encoder(_DownNetwork):
    """(B, 3, S, S) -> (B, latent_dim) codes (no squashing); ``widths`` at S, S/2, ..., 4 px, BatchNorm."""

    def __init__(self, widths: list[int] | tuple[int, ...], latent_dim: int):
        super().__init__(widths, "batch")
        self.head = nn.Linear(self.feature_dim, int(latent_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
