"""f-AnoGAN, a WGAN-GP with an encoder trained afterwards, as a :class:`~wsi_ad.detectors.base.Detector`.

Schlegl, Seeböck, Waldstein, Langs, Schmidt-Erfurth, "f-AnoGAN: Fast unsupervised anomaly detection with
generative adversarial networks" (Medical Image Analysis 54, 2019); released code tSchlegl/f-AnoGAN (TensorFlow),
as ``shared/METHODS.md`` §8 describes it. A survey baseline, trained from scratch on normal tiles only.

Training runs in two phases of one detector (:meth:`FAnoGAN.phase`; the loop checkpoints at the boundary):

1. ``gan`` (``gan_iterations`` steps): a WGAN-GP on normal tiles (:mod:`~wsi_ad.detectors.fanogan.networks`). Each
   step makes ``n_critic`` (5) critic updates, each on a fresh batch and fresh z, with the loss
   E D(G(z)) - E D(x) + 10 E(|grad D(x_hat)| - 1)^2 (x_hat = u x + (1 - u) G(z), u ~ U(0, 1) per tile; PIAD's
   :func:`~wsi_ad.detectors.piad.losses.critic_loss` without its norm penalty), then one generator update with
   -E D(G(z)) on fresh z; Adam 1e-4, betas (0, 0.9) for both.
2. ``encoder`` (``encoder_iterations`` steps): G and the critic frozen, the encoder E learns the izi_f loss
   ``mean (x - G(E(x)))^2 + kappa mean (f(x) - f(G(E(x))))^2`` (f: the critic's features, the flattened input of
   its last linear layer; means over the 3 S^2 pixel values and the 16 w_4 features), RMSProp 5e-5.

Score per tile (:meth:`FAnoGAN.izif`): the same izi_f residual, ``mean (x - G(E(x)))^2 + kappa mean (f(x) -
f(G(E(x))))^2`` with kappa = 1, on tiles in [-1, 1]. Per-pixel map: |x - G(E(x))| averaged over the 3 channels and
over 8 px cells, (B, S/8, S/8) float32: the image term only (absolute, not squared, as the paper's localisation
map); the feature term has no spatial layout, so the map's mean is not the score.

The paper setting (``configs/fanogan_paper.yaml``, the :class:`~wsi_ad.detectors.fanogan.config.FAnoGANConfig`
defaults): DIM 64 (generator 512/512/256/128/64 at 4..64 px, critic and encoder 64/128/256/512/512 at 64..4 px),
z in R^128 from N(0, I), batch 64, 5 critic steps per generator step, gradient penalty 10, Adam 1e-4 with betas
(0, 0.9), then 50,000 encoder iterations with RMSProp 5e-5 and kappa 1. Where ours departs from the paper and the
released code:

- RGB tiles (3 input and output channels; the paper's retinal OCT images were grayscale), 64 px tiles at 10x
  (the DPA's Camelyon16 input) instead of 64 px OCT patches.
- Iteration counts: the GAN's is not published (METHODS §14; the released script runs 7 epochs of its own data,
  a few hundred generator steps on Camelyon16's 7,612 normal tiles), so the paper config runs 50,000 generator
  steps, as many as the encoder's; the CPU config runs far fewer of both.
- BatchNorm uses running statistics outside training (G while the encoder trains and when scoring, E when
  scoring), so a tile's score does not depend on the other tiles of its batch; the released code's batch
  normalisation always used the statistics of the current batch.
- The encoder step takes the first of the ``n_critic`` batches the loop hands every step
  (:attr:`FAnoGAN.batches_per_step` is fixed for the whole run) and leaves the others unused.
- RMSProp is torch's with the smoothing constant 0.9 (TensorFlow's default decay) and eps 1e-8 added outside the
  square root (TensorFlow: 1e-10 inside): negligible at these magnitudes.
- Random numbers (z and the gradient-penalty interpolation weights) come from a generator seeded by
  (``train.seed``, step), so a resumed run repeats them; the released code draws from the global stream.
- Training is fp32 whatever ``train.amp`` says (the gradient penalty's double backward and bf16 do not mix well).
- Logged values (one set of names for both phases, because the loop's history wants the same columns in every
  row): ``loss`` (the phase's objective: the last critic loss in ``gan``, the izi_f loss in ``encoder``) and, NaN
  outside their phase, ``critic_wasserstein`` (E D(G(z)) - E D(x)), ``critic_gp``, ``generator_adv``,
  ``izif_image``, ``izif_feature``.

State (checkpointed; what scoring needs): ``generator``, ``critic`` (its features are in the score) and ``encoder``.
Training state: the three optimizer states and the step.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from wsi_ad.detectors.base import Detector
from wsi_ad.detectors.fanogan.config import FAnoGANConfig
from wsi_ad.detectors.fanogan.networks import Critic, Encoder, Generator
from wsi_ad.detectors.piad.losses import critic_loss, generator_adversarial

#: Map cells are this many px (maps are the channel-mean |x - G(E(x))| per cell).
MAP_CELL_PX = 8
#: The values logged in every step (module docstring); those of the other phase are NaN.
LOGGED = ("loss", "critic_wasserstein", "critic_gp", "generator_adv", "izif_image", "izif_feature")


def _cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


class FAnoGAN(Detector):
    """WGAN-GP generator (:attr:`generator`) and critic (:attr:`critic`), then an encoder (:attr:`encoder`) trained
    with the izi_f loss; score = the izi_f residual of the tile."""

    name = "fanogan"
    summary = "f-AnoGAN: WGAN-GP generator and critic, then an izi_f encoder; image + critic-feature residual score"
    paper = ("Schlegl et al., f-AnoGAN: Fast unsupervised anomaly detection with generative adversarial networks "
             "(Medical Image Analysis 2019); released code tSchlegl/f-AnoGAN")
    config_class = FAnoGANConfig
    random_salt = 0xFA09
    score_units = "izi_f residual: image MSE + kappa x critic-feature MSE (tiles in [-1, 1])"
    map_reduction = (f"mean over channels and {MAP_CELL_PX} px cells of |x - G(E(x))| (the image term only; "
                     "its mean is not the tile score)")
    search_parameters: ClassVar[dict[str, str]] = {
        "latent_dim": "latent_dim", "generator_channels": "generator_channels", "critic_channels": "critic_channels",
        "encoder_channels": "encoder_channels", "gan_iterations": "gan_iterations",
        "encoder_iterations": "encoder_iterations", "lr": "lr", "encoder_lr": "encoder_lr", "kappa": "kappa",
        "n_critic": "n_critic",
    }

    def __init__(self, config, device="cpu"):
        super().__init__(config, device)
        s: FAnoGANConfig = config.section
        self.section = s
        self.generator = Generator(s.latent_dim, s.generator_channels).to(self.device)
        self.critic = Critic(s.critic_channels).to(self.device)
        self.encoder = Encoder(s.encoder_channels, s.latent_dim).to(self.device)
        betas = tuple(s.betas)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=s.lr, betas=betas)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=s.lr, betas=betas)
        self.encoder_optimizer = torch.optim.RMSprop(self.encoder.parameters(), lr=s.encoder_lr, alpha=s.rmsprop_alpha)
        self._steps_done = 0

    # -- schedule -------------------------------------------------------------------------------------

    @classmethod
    def num_steps_of(cls, config) -> int:
        return int(config.section.gan_iterations) + int(config.section.encoder_iterations)

    @property
    def batches_per_step(self) -> int:
        """``n_critic``: one fresh batch of real tiles per critic update (the generator update needs none)."""
        return self.section.n_critic

    def phase(self, step: int) -> str:
        return "gan" if step < self.section.gan_iterations else "encoder"

    def checkpoint_steps(self) -> set[int]:
        return {self.section.gan_iterations, self.num_steps}

    # -- training -------------------------------------------------------------------------------------

    def _prior(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """(n, latent_dim) float32 samples of the prior."""
        shape = (n, self.section.latent_dim)
        if self.section.prior == "uniform":
            return torch.rand(shape, generator=rng, device=self.device) * 2 - 1
        return torch.randn(shape, generator=rng, device=self.device)

    def train_step(self, tiles: torch.Tensor, step: int) -> dict[str, float]:
        tiles = tiles.float()
        batches = tiles.chunk(self.batches_per_step)
        values = dict.fromkeys(LOGGED, math.nan)
        if self.phase(step) == "gan":
            values.update(self._gan_step(batches, self.step_generator(step)))
        else:
            values.update(self._encoder_step(batches[0]))
        self._steps_done = step + 1
        return values

    def _gan_step(self, batches: tuple[torch.Tensor, ...], rng: torch.Generator) -> dict[str, float]:
        """A critic update on each batch (fresh z each), then a generator update on a batch of fresh z as large."""
        self.generator.train()
        for x in batches:
            with torch.no_grad():
                fake = self.generator(self._prior(x.shape[0], rng))
            loss, parts = self.critic_objective(x, fake, rng)
            self.critic_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.critic_optimizer.step()
        self.critic.requires_grad_(False)
        try:
            adversarial = generator_adversarial(self.critic, self.generator(self._prior(batches[0].shape[0], rng)))
            self.generator_optimizer.zero_grad(set_to_none=True)
            adversarial.backward()
            self.generator_optimizer.step()
        finally:
            self.critic.requires_grad_(True)
        return {"loss": float(loss.detach()), "critic_wasserstein": parts["wasserstein"], "critic_gp": parts["gp"],
                "generator_adv": float(adversarial.detach())}

    def critic_objective(self, real: torch.Tensor, fake: torch.Tensor, rng: torch.Generator | None
                         ) -> tuple[torch.Tensor, dict[str, float]]:
        """The WGAN-GP critic loss E D(fake) - E D(real) + ``gradient_penalty`` E(|grad D(x_hat)|_2 - 1)^2 on (B, 3, S,
        S) ``real`` and ``fake`` tiles (x_hat: per-tile mixtures with U(0, 1) weights drawn from ``rng``): (scalar
        loss, {"wasserstein": E D(fake) - E D(real), "gp": the weighted penalty, "norm": 0.0})."""
        return critic_loss(self.critic, real, fake, generator=rng, wasserstein_weight=1.0,
                           gradient_penalty=self.section.gradient_penalty, gp_target=1.0, norm_penalty=0.0)

    def _encoder_step(self, x: torch.Tensor) -> dict[str, float]:
        """One RMSProp step of the encoder on the izi_f loss; G and the critic frozen (running statistics)."""
        self.generator.eval()
        self.critic.eval()
        self.encoder.train()
        for frozen in (self.generator, self.critic):
            frozen.requires_grad_(False)
        try:
            image, feature, _ = self.izif(x)
            loss = (image + self.section.kappa * feature).mean()
            self.encoder_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.encoder_optimizer.step()
        finally:
            for frozen in (self.generator, self.critic):
                frozen.requires_grad_(True)
        return {"loss": float(loss.detach()), "izif_image": float(image.detach().mean()),
                "izif_feature": float(feature.detach().mean())}

    def izif(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The two izi_f terms of (B, 3, S, S) tiles x: ((B,) mean (x - G(E(x)))^2 over the 3 S^2 values, (B,) mean
        (f(x) - f(G(E(x))))^2 over the critic's features, (B, 3, S, S) G(E(x))), float32. f(x) carries no gradient."""
        recon = self.generator(self.encoder(x))
        with torch.no_grad():
            real_features = self.critic.features(x)
        image = (x - recon).pow(2).flatten(1).mean(1)
        feature = (real_features - self.critic.features(recon)).pow(2).mean(1)
        return image, feature, recon

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"generator": _cpu(self.generator), "critic": _cpu(self.critic), "encoder": _cpu(self.encoder)}

    def training_state_dict(self) -> dict[str, Any] | None:
        if self._steps_done == 0:
            return None
        return {"generator_optimizer": self.generator_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "encoder_optimizer": self.encoder_optimizer.state_dict(), "step": self._steps_done}

    def load_state_dict(self, state: dict[str, Any], training_state: dict[str, Any] | None = None) -> None:
        self.generator.load_state_dict(state["generator"])
        self.critic.load_state_dict(state["critic"])
        self.encoder.load_state_dict(state["encoder"])
        if training_state:
            self.generator_optimizer.load_state_dict(training_state["generator_optimizer"])
            self.critic_optimizer.load_state_dict(training_state["critic_optimizer"])
            self.encoder_optimizer.load_state_dict(training_state["encoder_optimizer"])
            self._steps_done = int(training_state["step"])

    # -- scoring --------------------------------------------------------------------------------------

    def score_batch(self, tiles: torch.Tensor, pixel_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The izi_f residual per tile, (B,) float32 (``kappa`` from the config); maps (B, S/8, S/8) float32 of the
        channel-mean |x - G(E(x))| per 8 px cell (the image term only), or None."""
        tiles = tiles.float()
        image, feature, recon = self.izif(tiles)
        score = image + self.section.kappa * feature
        maps = F.avg_pool2d((tiles - recon).abs().mean(1, keepdim=True), MAP_CELL_PX)[:, 0] if pixel_maps else None
        return score.float(), maps
