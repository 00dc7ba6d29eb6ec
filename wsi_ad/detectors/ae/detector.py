"""The plain convolutional autoencoder baseline with an L2 or SSIM loss, as a
:class:`~wsi_ad.detectors.base.Detector`.

Bergmann, Löwe, Fauser, Sattlegger, Steger, "Improving Unsupervised Defect Segmentation by Applying Structural
Similarity to Autoencoders" (VISAPP 2019); the survey's autoencoder baseline (``shared/METHODS.md`` §9). No official
code is public; the layer list is the paper's (METHODS marks all but the first three layers as unverified).

Encoder (for S px tiles, S a multiple of 16; the paper's S = 128): conv 4x4/2 32, 4x4/2 32, 3x3/1 32, 4x4/2 64,
3x3/1 64, 4x4/2 128, 3x3/1 64, 3x3/1 32, then an (S/16)x(S/16) valid conv to the ``latent_dim`` code (1 x 1);
LeakyReLU 0.2 after every layer but the code. The decoder mirrors it with transposed convolutions, linear output.
Loss per pixel: squared error (``loss: l2``) or 1 - SSIM (``loss: ssim``: torchmetrics' SSIM, Gaussian window σ 1.5
px = 11 px as the paper, K = (0.01, 0.03), on tiles mapped to [0, 1]). The paper segments by thresholding the
residual map and defines no image score; ours is the map's ``score_reduction`` (``mean``, default, or ``max``).
Adam 2e-4 with weight decay 1e-5 (METHODS: unverified). Departures: 64 px tiles at 10x instead of 128 px images;
random flips of the shared tile pool as augmentation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from wsi_ad.detectors.ae.config import AEConfig
from wsi_ad.detectors.base import Detector

#: (kernel, stride, out channels) of the encoder's layers before the code (the paper's list).
ENCODER_LAYERS = ((4, 2, 32), (4, 2, 32), (3, 1, 32), (4, 2, 64), (3, 1, 64), (4, 2, 128), (3, 1, 64), (3, 1, 32))
#: Map cells are this many px (maps are the residual map's mean per cell).
MAP_CELL_PX = 8


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


class ConvAutoencoder(nn.Module):
    """(B, 3, S, S) -> (B, 3, S, S) through a (B, latent_dim, 1, 1) code (module docstring)."""

    def __init__(self, image_size: int, latent_dim: int):
        super().__init__()
        encoder, cin = [], 3
        for k, stride, cout in ENCODER_LAYERS:
            encoder += [nn.Conv2d(cin, cout, k, stride, padding=(k - stride + 1) // 2), _act()]
            cin = cout
        last = image_size // 16
        self.encoder = nn.Sequential(*encoder, nn.Conv2d(cin, latent_dim, last))
        decoder = [nn.ConvTranspose2d(latent_dim, cin, last), _act()]
        outs = [c for _, _, c in ENCODER_LAYERS[:-1]][::-1] + [3]
        for (k, stride, _), cout in zip(ENCODER_LAYERS[::-1], outs, strict=True):
            decoder += [nn.ConvTranspose2d(cin, cout, k, stride, padding=(k - stride + 1) // 2)]
            decoder += [_act()] if cout != 3 else []
            cin = cout
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Autoencoder(Detector):
    """Bergmann et al.'s convolutional autoencoder (:attr:`net`) with an L2 or SSIM loss; score = the residual map's
    mean (or max)."""

    name = "ae"
    summary = "Plain convolutional autoencoder (Bergmann et al. 2019), L2 or SSIM loss, residual-map score"
    paper = ("Bergmann et al., Improving Unsupervised Defect Segmentation by Applying Structural Similarity to "
             "Autoencoders (VISAPP 2019); no official code")
    config_class = AEConfig
    score_units = "residual per pixel (squared error on [-1, 1], or 1 - SSIM), reduced over the tile"
    map_reduction = f"mean of the per-pixel residual over {MAP_CELL_PX} px cells"
    search_parameters: ClassVar[dict[str, str]] = {"latent_dim": "latent_dim", "loss": "loss", "lr": "lr",
                                                   "iterations": "iterations"}

    def __init__(self, config, device="cpu"):
        super().__init__(config, device)
        s: AEConfig = config.section
        self.section = s
        self.net = ConvAutoencoder(s.image_size, s.latent_dim).to(self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        self._steps_done = 0

    def residual(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """(B, H, W) per-pixel residual: squared error averaged over channels, or 1 - SSIM of the local window."""
        if self.section.loss == "l2":
            return (x - recon).pow(2).mean(dim=1)
        from torchmetrics.functional.image import structural_similarity_index_measure

        with torch.autocast(x.device.type, enabled=False):
            _, full = structural_similarity_index_measure(
                (recon.float() + 1) / 2, (x.float() + 1) / 2, sigma=self.section.ssim_sigma, data_range=1.0,
                reduction="none", return_full_image=True)
        return 1.0 - full.mean(dim=1)

    def train_step(self, tiles: torch.Tensor, step: int) -> dict[str, float]:
        with self.autocast():
            loss = self.residual(tiles, self.net(tiles)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._steps_done = step + 1
        return {"loss": float(loss.detach())}

    def state_dict(self) -> dict[str, Any]:
        return {"net": {k: v.detach().cpu() for k, v in self.net.state_dict().items()}}

    def training_state_dict(self) -> dict[str, Any] | None:
        return None if self._steps_done == 0 else {"optimizer": self.optimizer.state_dict(), "step": self._steps_done}

    def load_state_dict(self, state: dict[str, Any], training_state: dict[str, Any] | None = None) -> None:
        self.net.load_state_dict(state["net"])
        if training_state:
            self.optimizer.load_state_dict(training_state["optimizer"])
            self._steps_done = int(training_state["step"])

    def score_batch(self, tiles: torch.Tensor, pixel_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residual map's mean (or max) per tile (B,) float32; maps (B, S/8, S/8) of its 8 px cell means."""
        residual = self.residual(tiles, self.net(tiles)).float()
        flat = residual.flatten(1)
        score = flat.mean(1) if self.section.score_reduction == "mean" else flat.amax(1)
        maps = F.avg_pool2d(residual[:, None], MAP_CELL_PX)[:, 0] if pixel_maps else None
        return score, maps
