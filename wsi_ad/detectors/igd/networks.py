"""IGD's networks: decoders and critics of the global (whole tile) and local (patch) models, and the encoder head.

Chen, Tian, Pang, Carneiro, "Deep One-Class Classification via Interpolated Gaussian Descriptor" (AAAI 2022);
official code tianyu0207/IGD at commit 1ce9952 (``p256/mvtec_module.py``: ``twoin1Generator256``,
``VisualDiscriminator256``; ``p32/mvtec_module.py``: ``VisualGenerator``, ``VisualDiscriminator``). Our own
re-implementation following ``shared/METHODS.md`` §7.2, built from the WGAN-GP residual blocks the official code
uses (pre-activation: norm -> ReLU -> conv3x3 -> norm -> ReLU -> conv3x3, 1x1 shortcut with the same resampling).

Shapes (S = tile px, P = patch px, D = latent size; widths listed per resolution):

- :class:`GlobalDecoder`: (B, D) -> (B, 3, S, S), linear output. Linear to w_4 x 4 x 4; nearest x2 + conv3x3
  (w_4 -> w_8); one :class:`UpBlock` per doubling to S/2; batch norm, ReLU, nearest x2 + conv5x5 to RGB.
  Widths at 4, 8, ..., S/2 px; the official 256 px decoder's are 512, 512, 512, 256, 128, 64.
- :class:`LocalDecoder`: (B, D) -> (B, 3, P, P), linear output. Linear to w_4 x 4 x 4; one up block per doubling
  to P; batch norm, ReLU, conv3x3 to RGB. Widths at 4, ..., P px (official, P = 32: 512, 256, 128, 64).
- :class:`GlobalCritic`: (B, 3, S, S) -> (B,), unbounded. conv5x5 stride 2 (3 -> w_{S/2}); one :class:`DownBlock`
  (layer norm) per halving to 8 px; conv3x3 stride 2 to 4 px; linear to one value. Widths at S/2, ..., 8, 4 px
  (official 256 px: 64, 128, 256, 512, 512, 512).
- :class:`LocalCritic`: (B, 3, P, P) -> (B,) in (0, 1). conv3x3 (3 -> w_P); one down block per halving to 4 px;
  linear; sigmoid. Widths at P, ..., 4 px (official: 64, 128, 256, 512).

The official "UpSampleConv" (the input repeated 4 times along channels, then depth-to-space) is a nearest x2
upsampling followed by the conv; here it is written as that. Layer norms normalise over (C, H, W) with an
elementwise affine, as the official ``nn.LayerNorm([C, H, W])``. Weights keep PyTorch's default initialisation, as
the official code (its ``weights_init`` is never applied).
"""

from __future__ import annotations

import torch
from torch import nn


def _upsample() -> nn.Module:
    return nn.Upsample(scale_factor=2, mode="nearest")


class UpBlock(nn.Module):
    """(B, cin, H, W) -> (B, cout, 2H, 2W): nearest x2 + conv1x1 shortcut, plus batch norm -> ReLU -> nearest x2 ->
    conv3x3 (no bias) -> batch norm -> ReLU -> conv3x3."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.shortcut = nn.Sequential(_upsample(), nn.Conv2d(cin, cout, 1))
        self.main = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), _upsample(), nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(cout), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.main(x)


class DownBlock(nn.Module):
    """(B, cin, H, W) -> (B, cout, H/2, W/2): 2x2 mean pool + conv1x1 shortcut, plus layer norm -> ReLU -> conv3x3
    (cin -> cin, no bias) -> layer norm -> ReLU -> conv3x3 (cin -> cout) -> 2x2 mean pool. ``size`` = H = W."""

    def __init__(self, cin: int, cout: int, size: int):
        super().__init__()
        self.shortcut = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(cin, cout, 1))
        self.main = nn.Sequential(nn.LayerNorm([cin, size, size]), nn.ReLU(), nn.Conv2d(cin, cin, 3, padding=1, bias=False),
                                  nn.LayerNorm([cin, size, size]), nn.ReLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                  nn.AvgPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.main(x)


def _check(x: torch.Tensor, size: int) -> None:
    if x.shape[-2:] != (size, size):
        raise ValueError(f"expected {size} x {size} px inputs, got {tuple(x.shape[-2:])}")


class GlobalDecoder(nn.Module):
    """(B, latent_dim) -> (B, 3, S, S); ``widths`` at 4, 8, ..., S/2 px (at least two)."""

    def __init__(self, latent_dim: int, widths: list[int]):
        super().__init__()
        w = [int(v) for v in widths]
        self.image_size = 4 * 2 ** len(w)
        self.fc = nn.Linear(int(latent_dim), w[0] * 16)
        self.up = nn.Sequential(_upsample(), nn.Conv2d(w[0], w[1], 3, padding=1),
                                *[UpBlock(a, b) for a, b in zip(w[1:-1], w[2:], strict=True)])
        self.to_rgb = nn.Sequential(nn.BatchNorm2d(w[-1]), nn.ReLU(), _upsample(), nn.Conv2d(w[-1], 3, 5, padding=2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_rgb(self.up(self.fc(z).view(z.shape[0], -1, 4, 4)))


class LocalDecoder(nn.Module):
    """(B, latent_dim) -> (B, 3, P, P); ``widths`` at 4, 8, ..., P px."""

    def __init__(self, latent_dim: int, widths: list[int]):
        super().__init__()
        w = [int(v) for v in widths]
        self.image_size = 4 * 2 ** (len(w) - 1)
        self.fc = nn.Linear(int(latent_dim), w[0] * 16)
        self.up = nn.Sequential(*[UpBlock(a, b) for a, b in zip(w[:-1], w[1:], strict=True)])
        self.to_rgb = nn.Sequential(nn.BatchNorm2d(w[-1]), nn.ReLU(), nn.Conv2d(w[-1], 3, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_rgb(self.up(self.fc(z).view(z.shape[0], -1, 4, 4)))


class GlobalCritic(nn.Module):
    """(B, 3, S, S) -> (B,) unbounded; ``widths`` at S/2, ..., 8, 4 px (at least two)."""

    def __init__(self, widths: list[int]):
        super().__init__()
        w = [int(v) for v in widths]
        self.image_size = 4 * 2 ** len(w)
        sizes = [self.image_size // 2 ** (i + 1) for i in range(len(w))]
        self.from_rgb = nn.Conv2d(3, w[0], 5, stride=2, padding=2)
        self.down = nn.Sequential(*[DownBlock(a, b, s) for a, b, s in zip(w[:-2], w[1:-1], sizes, strict=False)],
                                  nn.Conv2d(w[-2], w[-1], 3, stride=2, padding=1))
        self.fc = nn.Linear(w[-1] * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check(x, self.image_size)
        return self.fc(self.down(self.from_rgb(x)).flatten(1)).view(-1)


class LocalCritic(nn.Module):
    """(B, 3, P, P) -> (B,) in (0, 1); ``widths`` at P, ..., 4 px."""

    def __init__(self, widths: list[int]):
        super().__init__()
        w = [int(v) for v in widths]
        self.image_size = 4 * 2 ** (len(w) - 1)
        sizes = [self.image_size // 2 ** i for i in range(len(w))]
        self.from_rgb = nn.Conv2d(3, w[0], 3, padding=1)
        self.down = nn.Sequential(*[DownBlock(a, b, s) for a, b, s in zip(w[:-1], w[1:], sizes, strict=False)])
        self.fc = nn.Linear(w[-1] * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check(x, self.image_size)
        return torch.sigmoid(self.fc(self.down(self.from_rgb(x)).flatten(1))).view(-1)


def parameter_count(module: nn.Module) -> int:
    """Trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
