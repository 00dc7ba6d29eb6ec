"""``residual18``: the Camelyon16 autoencoder of the Deep Perceptual Autoencoder (DPA), grown progressively.

Paper: Shvetsova (Tuluptceva) et al., "Anomaly Detection with Deep Perceptual Autoencoders"
(arXiv 2020; IEEE Access 2021). Official code: github.com/ninatu/anomaly_detection (commit 6fa35f3), network type
``residual18`` (``dpa/pg_encoders.py`` and ``dpa/pg_decoders.py``). This is our own re-implementation of that
network, following ``shared/METHODS.md`` sections 2.1, 3.1 and 3.3.

Shapes: images are (B, 3, S, S) float tensors (float32 in practice) scaled to [-1, 1], with S one of
:attr:`Residual18Autoencoder.sizes` (e.g. 16, 32, 64); the code ``z`` is (B, latent_channels, latent_size,
latent_size) (4 x 8 x 8 for Camelyon16) with no activation; reconstructions have the input's shape and are
linear (unbounded, no tanh).

Building blocks (pre-activation, LeakyReLU slope 0.2, zero padding, no normalisation layers):

- plain block: act -> conv3x3 -> act -> conv3x3, plus the input (through a 1x1 conv only when widths differ);
- down block: the same with a 2x2 average pool after the first act, the skip path pooled as well;
- up block: the same with a nearest-neighbour x2 upsampling after the first act, the skip path upsampled as well.

Encoder at size S: from-RGB(S) = conv3x3(3 -> w_S) + two plain blocks; then for every r from S down to
2 * latent_size a stage (down block w_r -> w_{r/2}, plain block); then the latent block (plain block
w_latent -> latent_channels). Decoder: latent block (plain block latent_channels -> w_latent); for every r from
2 * latent_size up to S a stage (up block w_{r/2} -> w_r, plain block); to-RGB(S) = act + conv3x3(w_S -> 3).
Widths w_r = ``config.width(r)``. With ``AutoencoderConfig()`` (64 px, latent 4 x 8 x 8, widths 4) the 64-px net
has 2,776 encoder and 2,183 decoder parameters. Checked once against the official module classes (Camelyon16
config, weights copied across): the same outputs, bit for bit, in every stable and transition phase.

Progressive growing: ``forward(x, size, alpha)``. With ``alpha < 1`` the size-``size`` parts fade in: the
encoder blends ``(1 - alpha) * from_rgb[size/2](avgpool(x)) + alpha * down[size](from_rgb[size](x))`` before the
lower stages; the decoder blends ``(1 - alpha) * upsample(to_rgb[size/2](h)) + alpha * to_rgb[size](up[size](h))``
after them. ``alpha = 0`` is exactly the ``size/2`` network run on the pooled image and upsampled; ``alpha = 1``
is the grown network alone.

Initialisation: every Conv2d weight Kaiming-normal (mode fan_out, leaky_relu, a = 0.2, i.e. std
sqrt(2 / 1.04) / sqrt(out_channels * k * k)); biases keep PyTorch's default.

Departures from the official code:

- The fade-in weight is a plain float argument here. The official code keeps it inside a ``FadeinLayer`` as a
  one-element ``nn.Parameter`` with ``requires_grad=False`` (set by ``set_progress``, clipped to [0, 1]). It is
  therefore counted by ``sum(p.numel() for p in net.parameters())`` and stored in the checkpoints: that is why
  METHODS 3.1 gives the transition networks one parameter more than the sum of their layers (2,889 / 1,703 at
  the transition to 32 px, 3,481 / 2,295 at 64 px) where :meth:`Residual18Autoencoder.parameter_count` gives
  2,888 / 1,702 and 3,480 / 2,294. We neither store nor clip alpha.
- The official code builds one ``nn.Sequential`` per phase (stable/transition x resolution) that share their
  blocks; here the heads and stages live in ``ModuleDict``s keyed by resolution, so state-dict keys differ and
  official checkpoints do not load as they are.
- The official decoder's first block is built width -> width and ignores the latent channel count (it only works
  when they are equal, as in the Camelyon16 config); here it maps latent_channels -> w_latent, with a 1x1 skip
  conv when the two differ.
- The official encoder and decoder take separate width lists (the decoder's listed from the latent upwards);
  here one ``config.channels`` (indexed by resolution) sets both, i.e. the decoder mirrors the encoder. The two
  agree for the Camelyon16 widths (all 4).
- The official code also builds a stable network at the latent resolution (from-RGB(8) + latent block), which
  no Camelyon16 schedule uses; this one runs from ``2 * latent_size`` up.
- The official convs are first Xavier-initialised, then overwritten with Kaiming-normal; the same distribution
  results but the random stream differs, so equal seeds do not give equal weights.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_ad.detectors.dpa.networks import AutoencoderConfig, ProgressiveAutoencoder

LEAKY_SLOPE = 0.2


def _act() -> nn.Module:
    return nn.LeakyReLU(LEAKY_SLOPE)


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class PlainBlock(nn.Module):
    """(B, cin, H, W) -> (B, cout, H', W'): skip(x) + conv3x3(act(conv3x3(resample(act(x))))).

    H' = H here; :class:`DownBlock` and :class:`UpBlock` halve / double it. The skip path is the same resampling
    followed by a 1x1 conv when cin != cout."""

    def _resample(self) -> list[nn.Module]:
        return []

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.main = nn.Sequential(_act(), *self._resample(), _conv3x3(cin, cout), _act(), _conv3x3(cout, cout))
        width = [] if cin == cout else [nn.Conv2d(cin, cout, 1)]
        skip = [*self._resample(), *width]
        self.skip = nn.Sequential(*skip) if skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.main(x)


class DownBlock(PlainBlock):
    """Plain block with a 2x2 average pool (stride 2) after the first activation and on the skip path."""

    def _resample(self) -> list[nn.Module]:
        return [nn.AvgPool2d(2)]


class UpBlock(PlainBlock):
    """Plain block with a nearest-neighbour x2 upsampling after the first activation and on the skip path."""

    def _resample(self) -> list[nn.Module]:
        return [nn.Upsample(scale_factor=2, mode="nearest")]


class Residual18Autoencoder(ProgressiveAutoencoder):
    """The DPA ``residual18`` encoder/decoder, grown from ``2 * latent_size`` px to ``image_size`` px.

    ``encode(x, size, alpha)``: (B, 3, size, size) -> (B, latent_channels, latent_size, latent_size).
    ``decode(z, size, alpha)``: the inverse shapes. ``forward`` = decode(encode(x)). See the module docstring.
    """

    def __init__(self, config: AutoencoderConfig = AutoencoderConfig()):
        super().__init__()
        self.config = config
        w = config.width
        grown = config.resolutions[:-1]  # e.g. (64, 32, 16): sizes the network runs at
        lat = config.latent_size
        self.from_rgb = nn.ModuleDict(
            {str(r): nn.Sequential(_conv3x3(3, w(r)), PlainBlock(w(r), w(r)), PlainBlock(w(r), w(r))) for r in grown}
        )
        self.down = nn.ModuleDict(
            {str(r): nn.Sequential(DownBlock(w(r), w(r // 2)), PlainBlock(w(r // 2), w(r // 2))) for r in grown}
        )
        self.to_latent = PlainBlock(w(lat), config.latent_channels)
        self.from_latent = PlainBlock(config.latent_channels, w(lat))
        self.up = nn.ModuleDict({str(r): nn.Sequential(UpBlock(w(r // 2), w(r)), PlainBlock(w(r), w(r))) for r in grown})
        self.to_rgb = nn.ModuleDict({str(r): nn.Sequential(_act(), _conv3x3(w(r), 3)) for r in grown})
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE, mode="fan_out", nonlinearity="leaky_relu")

    def _down(self, size: int, h: torch.Tensor) -> torch.Tensor:
        return self.down[str(size)](h)

    def _up(self, size: int, h: torch.Tensor) -> torch.Tensor:
        return self.up[str(size)](h)

    def modules_in_use(self, size: int, transition: bool = False) -> tuple[list[nn.Module], list[nn.Module]]:
        """(encoder modules, decoder modules) that run at ``size``; with ``transition`` also the size/2 heads."""
        self._check(size, 0.0 if transition else 1.0)
        stages = self._stages(size)
        heads = [size, size // 2] if transition else [size]
        encoder = [self.from_rgb[str(r)] for r in heads] + [self.down[str(r)] for r in stages] + [self.to_latent]
        decoder = [self.from_latent] + [self.up[str(r)] for r in reversed(stages)] + [self.to_rgb[str(r)] for r in heads]
        return encoder, decoder

    def parameter_count(self, size: int, transition: bool = False) -> tuple[int, int]:
        """(encoder, decoder) parameter counts of the modules in use at ``size`` (see :meth:`modules_in_use`).

        The fade-in weight is not a parameter here; the official code's is (one more in each transition count)."""
        return tuple(sum(p.numel() for m in part for p in m.parameters()) for part in self.modules_in_use(size, transition))


class Residual18Critic(nn.Module):
    """The image critic of the DPA's adversarial ablation (official ``ddis`` of
    ``configs/dpa/camelyon16/final/wo_pg_with_adversarial``: a ``residual18`` encoder with one output): (B, 3, S, S)
    -> (B,) unbounded scores.

    ``widths`` at S, S/2, ..., 4 px (S = 4 x 2**(len(widths) - 1)): from-RGB = conv3x3 and two plain blocks at S px,
    one down block + plain block per halving down to 4 x 4, then LeakyReLU and a 4x4 valid conv to one channel;
    Kaiming-normal convs as the autoencoder. With the official widths (4 everywhere, S = 64) it has 3,137 parameters,
    the count measured on the official module (``shared/METHODS.md`` §3.7)."""

    def __init__(self, widths: list[int] | tuple[int, ...]):
        super().__init__()
        w = [int(x) for x in widths]
        self.image_size = 4 * 2 ** (len(w) - 1)
        self.from_rgb = nn.Sequential(_conv3x3(3, w[0]), PlainBlock(w[0], w[0]), PlainBlock(w[0], w[0]))
        self.down = nn.Sequential(*[nn.Sequential(DownBlock(a, b), PlainBlock(b, b)) for a, b in zip(w[:-1], w[1:],
                                                                                                       strict=True)])
        self.head = nn.Sequential(_act(), nn.Conv2d(w[-1], 1, 4))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.from_rgb(x))).flatten()
