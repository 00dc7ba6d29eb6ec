"""IGD, the Interpolated Gaussian Descriptor, as a :class:`~wsi_ad.detectors.base.Detector`.

Chen, Tian, Pang, Carneiro, "Deep One-Class Classification via Interpolated Gaussian Descriptor" (AAAI 2022);
official code tianyu0207/IGD at commit 1ce9952 (``p256/`` global model, ``p32/`` local model,
``multi_scale/inference_det.py`` score). ``shared/METHODS.md`` §7. IGD was not evaluated on Camelyon16 by its
authors; the tile setting here is ours (``configs/igd_paper.yaml``).

Two models, each an encoder (a frozen ImageNet backbone's pooled embedding, then a trainable linear map to a
``latent_dim`` code z), a decoder and a critic (:mod:`~wsi_ad.detectors.igd.networks`): the global model sees whole
tiles, the local model every ``local_patch_px`` patch at stride ``local_stride_px``. A Gaussian anomaly classifier
(GAC) scores a code by ``1 - exp(-|z - c|^2 / sigma2)``; its centre c and spread sigma2 are not learned but
re-estimated from the training tiles' codes (the E-step, :meth:`IGD.before_step`, :mod:`~wsi_ad.detectors.igd.losses`)
before the first step and every ``estep_every`` steps, and held fixed in between. One training step, for each model
on the same tiles (the M-step): encoder+decoder minimise ``rec + gac + inter_weight * E critic(g(a z + (1 - a) z'))^2``
(rec = 0.85 (1 - MS-SSIM) + 0.15 MAE, a ~ U(0, 0.5), z' the batch reversed: decoded interpolations the critic
cannot tell from reconstructions), then the critic regresses a on the (re-decoded) interpolations and 0 on
``x̂ + 0.2 (x - x̂)``. Score, as the official inference: ``0.5 * max over patches (0.9 rec + 0.1 gac) +
0.5 * (0.1 rec + 0.9 gac)`` (local, then global). State: each model's linear map, decoder, c and sigma2.

The paper setting on tiles (``configs/igd_paper.yaml``, the :class:`~wsi_ad.detectors.igd.config.IGDConfig`
defaults): the official networks (parameter counts pinned by the tests) with the global decoder and critic cut to
64 px tiles at 10x (the official widths nearest the image kept: 512/256/128/64 at 4..32 px, critic 64/128/256/256
at 32..4 px), 32 px local patches at stride 16 (the official patch size; 9 patches a tile instead of 225 of a
256 px image), ResNet-18 ImageNet encoder, latent 128, batch 16, Adam 1e-4 with betas (0, 0.9), weight decay 1e-6
on the encoder+decoder, polynomial decay 0.9, 256 epochs of the DPA's 7,612 Camelyon16 training tiles (121,792
iterations) with an E-step every 10 epochs (4,757 iterations). Where the paper and its code differ we follow the
code (METHODS §12): batch 16 not 64, Adam betas (0, 0.9) and the polynomial decay, the critic's fixed γ = 0.2,
sigma2 as a mean squared distance floored at 1 per batch, the weighted score. Where ours departs from the code:

- MS-SSIM comes from torchmetrics on tiles mapped to [0, 1] (data range 1; the MAE on [-1, 1] over 2, the same
  value), not pytorch-msssim on ImageNet-normalised images (range 4.76, signed: SSIM's luminance term breaks down
  near a zero mean, :func:`~wsi_ad.detectors.igd.losses.msssim`), and the decoders reconstruct [-1, 1] tiles. 64 px
  tiles are too small for the official 5-scale, 11 px window: the global loss keeps the 5 scales and their weights
  with the window scaled as the image (σ 1.5 px on 256 px -> 0.375 px, a 3 px window, on 64 px); the local loss
  keeps the official 4 scales and 3 px window on 32 px patches, with σ 0.375 instead of 1.5 (torchmetrics ties the
  window to σ).
- Both encoders use the ImageNet backbone (the official local encoder is a small CNN distilled from ImageNet
  ResNet-18 for MVTec; its ``Encoder_KD_ckpt`` weights exist only as a file in the authors' repository, with no
  licence, and were not distilled on tissue); efficientnet_lite0 (shipped offline) or ResNet-18 (a weight file the
  user names) in both.
- The E-step estimates c and sigma2 from ``estep_tiles`` training tiles (8,192: all of the DPA training set), in
  batches of ``train.batch_size`` tiles, not from every tile; as the official code, the first estimate computes c
  then sigma2, later ones sigma2 (around the old c) then c.
- The global critic regresses each interpolation's own α (the paper); the official global code compares every
  output with every α of the batch (a broadcast bug) and the local one does not.
- The MAE in the local score is |x - x̂| as in the paper; the official inference uses the signed mean (a bug).
- Decoders train with batch norm in training mode: the official scripts leave every network in eval mode after the
  first E-step (so batch norm never normalises with batch statistics), a side effect of their estimators.
- Interpolation coefficients come from a generator seeded by (``train.seed``, step), so a resumed run repeats
  them; training is fp32 whatever ``train.amp`` says. The official scripts report the best test AUC seen during
  training; wsi-ad scores the final model.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from wsi_ad.detectors.base import Detector
from wsi_ad.detectors.igd.config import IGDConfig
from wsi_ad.detectors.igd.losses import estimate_center, estimate_sigma2, gac_loss, reconstruction_loss
from wsi_ad.detectors.igd.networks import GlobalCritic, GlobalDecoder, LocalCritic, LocalDecoder
from wsi_ad.features.backbones import build_embedding
from wsi_ad.tile_pool import to_tensor


class GaussianDescriptor(nn.Module):
    """One scale of IGD without its critic: ``projection`` (the trainable linear map from the frozen embedding to
    the code), ``decoder``, and the E-step buffers ``center`` (latent_dim,) and ``sigma2`` (scalar)."""

    def __init__(self, embed_dim: int, latent_dim: int, decoder: nn.Module):
        super().__init__()
        self.projection = nn.Linear(embed_dim, latent_dim)
        self.decoder = decoder
        self.register_buffer("center", torch.zeros(latent_dim))
        self.register_buffer("sigma2", torch.ones(()))


class IGD(Detector):
    """The global and local Gaussian descriptors (:attr:`models`), their critics (:attr:`critics`) and the frozen
    backbone embedding (:attr:`backbone`) their encoders share."""

    name = "igd"
    summary = ("Interpolated Gaussian Descriptor: frozen ImageNet encoder + Gaussian one-class classifier re-estimated "
               "by E-steps, MS-SSIM/MAE decoder, interpolation critic; global tile + local patch models")
    paper = ("Chen et al., Deep One-Class Classification via Interpolated Gaussian Descriptor (AAAI 2022); "
             "official code tianyu0207/IGD")
    config_class = IGDConfig
    random_salt = 0x16D
    score_units = ("IGD score: weighted MS-SSIM/MAE reconstruction loss and Gaussian-classifier loss "
                   "(unitless, 0 to about 1, higher = more anomalous)")
    map_reduction = ("per local-stride cell: score_local_weight x the highest local-patch score among the patches "
                     "covering it + (1 - score_local_weight) x the tile's global score (map max = tile score); "
                     "without the local model, one cell holding the global score")
    search_parameters: ClassVar[dict[str, str]] = {
        "latent_dim": "latent_dim", "lr": "lr", "iterations": "iterations", "estep_every": "estep_every",
        "inter_weight": "inter_weight", "msssim_weight": "msssim_weight", "local": "local", "backbone": "backbone",
    }
    #: ``wsi-ad tune``'s default space: the paper's latent size and half of it, at the magnifications the DPA paper
    #: allowed (IGD's paper selected nothing: it is unsupervised).
    default_search_space: ClassVar[dict[str, Any]] = {
        "mode": "grid", "space": {"latent_dim": [64, 128], "magnification": ["10x", "20x"]},
    }

    def __init__(self, config, device="cpu"):
        super().__init__(config, device)
        s: IGDConfig = config.section
        self.section = s
        self.backbone = build_embedding(s.backbone, weights=s.backbone_weights, download=s.download_weights).to(self.device)
        dim = self.backbone.dim
        models = {"global": GaussianDescriptor(dim, s.latent_dim, GlobalDecoder(s.latent_dim, s.decoder_channels))}
        critics = {"global": GlobalCritic(s.critic_channels)}
        if s.local:
            models["local"] = GaussianDescriptor(dim, s.latent_dim, LocalDecoder(s.latent_dim, s.local_decoder_channels))
            critics["local"] = LocalCritic(s.local_critic_channels)
        self.models = nn.ModuleDict(models).to(self.device)
        self.critics = nn.ModuleDict(critics).to(self.device)
        betas = tuple(s.betas)
        self.optimizers = {k: torch.optim.Adam(m.parameters(), lr=s.lr, betas=betas, weight_decay=s.weight_decay)
                           for k, m in self.models.items()}
        self.critic_optimizers = {k: torch.optim.Adam(c.parameters(), lr=s.lr, betas=betas) for k, c in self.critics.items()}
        self._steps_done = 0

    # -- what it expects ------------------------------------------------------------------------------

    @property
    def patches_per_tile(self) -> int:
        s = self.section
        return ((s.image_size - s.local_patch_px) // s.local_stride_px + 1) ** 2

    def patches(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B * n * n, 3, P, P): every ``local_patch_px`` patch at stride ``local_stride_px``, tile by
        tile, row by row."""
        p, st = self.section.local_patch_px, self.section.local_stride_px
        grid = tiles.unfold(2, p, st).unfold(3, p, st)                   # (B, 3, n, n, P, P)
        return grid.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, p, p)

    def _inputs(self, scale: str, tiles: torch.Tensor) -> torch.Tensor:
        return tiles if scale == "global" else self.patches(tiles)

    def _scales(self, scale: str) -> int:
        return self.section.msssim_scales if scale == "global" else self.section.local_msssim_scales

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's pooled embedding of (B, 3, H, W) images in [-1, 1]: (B, embed_dim), no gradient."""
        with torch.no_grad():
            return self.backbone(x)

    # -- training -------------------------------------------------------------------------------------

    @torch.no_grad()
    def before_step(self, pool, step: int) -> None:
        """The E-step, before step 0 and every ``estep_every`` steps: c and sigma2 of each model from the codes of
        ``estep_tiles`` training tiles (:meth:`~wsi_ad.tile_pool.TilePool.sample`, the same tiles every time)."""
        s = self.section
        if step % s.estep_every:
            return
        tiles = pool.sample(s.estep_tiles)
        batch = self.config.train.batch_size
        for scale, model in self.models.items():
            codes = torch.cat([model.projection(self.embed(self._inputs(scale, to_tensor(tiles[i:i + batch], self.device))))
                               for i in range(0, len(tiles), batch)])
            per_batch = batch * (1 if scale == "global" else self.patches_per_tile)
            if step == 0:           # the official order: c then sigma2 at the start, sigma2 (old c) then c later
                center = estimate_center(codes, s.center_eps)
                sigma2 = estimate_sigma2(codes, center, per_batch, s.sigma2_floor)
            else:
                sigma2 = estimate_sigma2(codes, model.center, per_batch, s.sigma2_floor)
                center = estimate_center(codes, s.center_eps)
            model.center.copy_(center)
            model.sigma2.copy_(sigma2)

    def train_step(self, tiles: torch.Tensor, step: int) -> dict[str, float]:
        s = self.section
        lr = s.lr * (1.0 - step / max(1, s.iterations)) ** s.lr_decay_power
        for optimizer in (*self.optimizers.values(), *self.critic_optimizers.values()):
            for group in optimizer.param_groups:
                group["lr"] = lr
        rng = self.step_generator(step)
        values: dict[str, float] = {}
        total = 0.0
        for scale in self.models:
            parts = self._scale_step(scale, self._inputs(scale, tiles), rng)
            total += parts.pop("loss")
            values.update({f"{scale}_{k}": v for k, v in parts.items()})
        self._steps_done = step + 1
        return {"loss": total, **values, "lr": lr}

    def _scale_step(self, scale: str, x: torch.Tensor, rng: torch.Generator) -> dict[str, float]:
        s = self.section
        model, critic = self.models[scale], self.critics[scale]
        features = self.embed(x)
        z = model.projection(features)
        recon = model.decoder(z)
        rec = reconstruction_loss(x, recon, self._scales(scale), s.msssim_sigma, s.msssim_weight).mean()
        alpha = torch.rand(x.shape[0], 1, generator=rng, device=self.device) * s.alpha_max
        z_mix = alpha * z + (1.0 - alpha) * z.flip(0)
        critic.requires_grad_(False)
        try:
            inter = critic(model.decoder(z_mix)).pow(2).mean()
        finally:
            critic.requires_grad_(True)
        gac = gac_loss(z, model.center, model.sigma2).mean()
        loss = rec + gac + s.inter_weight * inter
        optimizer = self.optimizers[scale]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():                                  # the critic sees the updated decoder's outputs
            mixed = model.decoder(z_mix.detach())
            recon = model.decoder(model.projection(features))
            blend = recon + s.critic_gamma * (x - recon)
        critic_loss = (critic(mixed) - alpha.view(-1)).pow(2).mean() + critic(blend).pow(2).mean()
        self.critic_optimizers[scale].zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizers[scale].step()
        return {"loss": float(loss.detach()), "rec_loss": float(rec.detach()), "gac_loss": float(gac.detach()),
                "inter_loss": float(inter.detach()), "critic_loss": float(critic_loss.detach()),
                "sigma2": float(model.sigma2)}

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {scale: {k: v.detach().cpu() for k, v in model.state_dict().items()} for scale, model in self.models.items()}

    def training_state_dict(self) -> dict[str, Any] | None:
        if self._steps_done == 0:
            return None
        return {"critics": {k: {n: v.detach().cpu() for n, v in c.state_dict().items()} for k, c in self.critics.items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "critic_optimizers": {k: o.state_dict() for k, o in self.critic_optimizers.items()},
                "step": self._steps_done}

    def load_state_dict(self, state: dict[str, Any], training_state: dict[str, Any] | None = None) -> None:
        if set(state) != set(self.models):
            raise KeyError(f"the state holds the models {sorted(state)}, the config builds {sorted(self.models)}")
        for scale, model in self.models.items():
            model.load_state_dict(state[scale])
        if training_state:
            for scale in self.models:
                self.critics[scale].load_state_dict(training_state["critics"][scale])
                self.optimizers[scale].load_state_dict(training_state["optimizers"][scale])
                self.critic_optimizers[scale].load_state_dict(training_state["critic_optimizers"][scale])
            self._steps_done = int(training_state["step"])

    # -- scoring --------------------------------------------------------------------------------------

    def _terms(self, scale: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction loss, GAC loss) per image of ``x`` under the model ``scale``: two (B,) tensors."""
        model = self.models[scale]
        z = model.projection(self.embed(x))
        rec = reconstruction_loss(x, model.decoder(z), self._scales(scale), self.section.msssim_sigma,
                                  self.section.msssim_weight)
        return rec, gac_loss(z, model.center, model.sigma2)

    def score_batch(self, tiles: torch.Tensor, pixel_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """IGD score per tile (B,) float32 (module docstring) and, with ``pixel_maps``, (B, S/stride, S/stride) maps
        whose cells are ``local_stride_px`` px (:attr:`map_reduction`; 1 x 1 without the local model)."""
        s = self.section
        b = tiles.shape[0]
        rec, gac = self._terms("global", tiles)
        global_score = s.global_rec_weight * rec + (1.0 - s.global_rec_weight) * gac
        if not s.local:
            return global_score.float(), global_score.float().view(b, 1, 1) if pixel_maps else None
        rec, gac = self._terms("local", self.patches(tiles))
        n = round(self.patches_per_tile ** 0.5)
        patch_scores = (s.local_rec_weight * rec + (1.0 - s.local_rec_weight) * gac).view(b, 1, n, n)
        w = s.score_local_weight
        score = w * patch_scores.flatten(1).amax(dim=1) + (1.0 - w) * global_score
        if not pixel_maps:
            return score.float(), None
        k = s.local_patch_px // s.local_stride_px        # patches covering a cell: the k x k before and at it
        padded = F.pad(patch_scores, (k - 1, k - 1, k - 1, k - 1), value=float("-inf"))
        cells = F.max_pool2d(padded, k, stride=1)[:, 0]   # (B, S/stride, S/stride)
        return score.float(), (w * cells + (1.0 - w) * global_score.view(b, 1, 1)).float()
