"""PIAD, Perceptual Image Anomaly Detection, as a :class:`~wsi_ad.detectors.base.Detector`.

Tuluptceva, Bakker, Fedulova, Konushin, "Perceptual Image Anomaly Detection" (ACPR 2019, LNCS 12046); official
code ninatu/anomaly_detection (``piad``), reported beside the DPA on Camelyon16 (DPA paper, Table 1: 85.4 ± 2.0
tile ROC AUC with default hyperparameters, 89.5 ± 0.6 with weakly-supervised selection). ``shared/METHODS.md`` §4.

An encoder E maps a tile to a 1 x 1 latent code with prior N(0, I) and a generator G maps codes back to tiles
(:mod:`~wsi_ad.detectors.piad.networks`). An image critic compares real tiles with G(z), z ~ N(0, I); a latent
critic compares prior samples with E(x) (WGAN-GP with a norm penalty, :mod:`~wsi_ad.detectors.piad.losses`).
Each training step makes ``n_critic`` critic updates, each on a fresh batch and fresh z and updating both critics,
then one encoder+generator update: the gradient of the relative perceptual L1 between x and G(E(x)) (the DPA's
loss, :mod:`wsi_ad.features.perceptual`) is scaled by the encoder's and the generator's reconstruction weights
(re-balanced by gradient norms every ``grad_norm_every`` steps, logged as ``rec_weight_encoder`` /
``rec_weight_generator``), then the two adversarial gradients are added unweighted, and one Adam step is taken.
Score: the relative perceptual L1 between x and G(E(x)), as the official code (the paper's "closest generated
image" is G(E(x)); no latent optimisation).

The paper setting (``configs/piad_camelyon16_paper.yaml``, the :class:`~wsi_ad.detectors.piad.config.PIADConfig`
defaults): 64 px tiles at 10x, latent 256, widths of METHODS §4.1, VGG-19 relu4_2 with the fixed ImageNet
statistics, batch 32, 2 critic steps per generator step, Adam 2e-4 / 5e-4 with betas (0.5, 0.99), 100,000
iterations. Where ours departs from the official code:

- Random numbers (z and the gradient-penalty interpolation weights) come from a generator seeded by
  (``train.seed``, step), so a resumed run repeats them; the official code draws from the global stream.
- The reconstruction weights are measured with ``torch.autograd.grad`` on the weights of one network at a time
  instead of ``backward`` + ``zero_grad``: the same norms without side effects on the other gradients.
- Critic parameters are frozen during the encoder+generator update (the official code computes their gradients
  and discards them at the critics' next ``zero_grad``): the same update, less work.
- The divergence guard is the official one (rec, image and latent adversarial losses above ``loss_limit``,
  10^6, signed); a non-finite loss stops any detector's training (:mod:`~wsi_ad.detectors.loop`).
- Training is fp32 whatever ``train.amp`` says (bf16 and the gradient penalty's double backward do not mix
  well); the official code trained in fp32 as well.
- ``feature_stats: train`` (the CPU setting) and other backbones than VGG-19 are ours, as for the DPA.

State (checkpointed; what scoring needs): ``encoder``, ``generator``, ``feature_stats``. Training state: both
critics, the three Adam states, the gradient-norm history and the current reconstruction weights.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from wsi_ad.detectors.base import Detector, TrainingDivergedError
from wsi_ad.detectors.piad.config import PIADConfig
from wsi_ad.detectors.piad.losses import GradientNormBalancer, critic_loss, generator_adversarial, weight_gradient_norms
from wsi_ad.detectors.piad.networks import LatentCritic, Residual9Encoder, Residual9Generator
from wsi_ad.features.backbones import build_backbone
from wsi_ad.features.perceptual import PerceptualLoss, feature_stats, imagenet_feature_stats, perceptual_scores
from wsi_ad.tile_pool import to_tensor


class PIAD(Detector):
    """Encoder (:attr:`encoder`), generator (:attr:`generator`), image and latent critics, and the relative
    perceptual L1 (:attr:`perceptual`) as reconstruction loss and score."""

    name = "piad"
    summary = ("Perceptual Image Anomaly Detection: encoder + generator, image and latent WGAN-GP critics, "
               "gradient-norm-balanced perceptual reconstruction")
    paper = ("Tuluptceva et al., Perceptual Image Anomaly Detection (ACPR 2019); "
             "official code ninatu/anomaly_detection")
    config_class = PIADConfig
    random_salt = 0x91AD
    score_units = "relative perceptual L1 (unitless, higher = more anomalous)"
    map_reduction = ("per feature cell: channel mean of |f(x) - f(G(E(x)))| / the tile's mean |f(x)| "
                     "(map mean = tile score)")
    search_parameters: ClassVar[dict[str, str]] = {
        "latent_dim": "latent_dim", "encoder_channels": "encoder_channels", "generator_channels": "generator_channels",
        "lr": "lr", "critic_lr": "critic_lr", "iterations": "iterations", "n_critic": "n_critic",
        "backbone": "backbone", "feature_stats": "feature_stats", "layer": "layers",
    }
    #: ``wsi-ad tune``'s default space: the two settings of the official code (METHODS §4.1, §4.4) crossed with
    #: the magnifications the DPA paper allowed.
    default_search_space: ClassVar[dict[str, Any]] = {
        "mode": "grid",
        "space": {"latent_dim": [128, 256], "iterations": [13000, 100000], "magnification": ["10x", "20x"]},
    }

    def __init__(self, config, device="cpu"):
        super().__init__(config, device)
        section: PIADConfig = config.section
        self.section = section
        size = section.image_size
        self.encoder = Residual9Encoder(section.encoder_channels, section.latent_dim).to(self.device)
        self.generator = Residual9Generator(section.latent_dim, section.generator_channels).to(self.device)
        self.image_critic = Residual9Encoder(section.critic_channels, 1).to(self.device)
        self.latent_critic = LatentCritic(section.latent_dim, section.latent_critic_channels).to(self.device)
        self._extractor = build_backbone(section.backbone, (size,), weights=section.backbone_weights,
                                         download=section.download_weights, layers=section.layers).to(self.device)
        self.perceptual: PerceptualLoss | None = None
        betas = tuple(section.betas)
        self.optimizer = torch.optim.Adam([*self.encoder.parameters(), *self.generator.parameters()],
                                          lr=section.lr, betas=betas)
        self.image_critic_optimizer = torch.optim.Adam(self.image_critic.parameters(), lr=section.critic_lr, betas=betas)
        self.latent_critic_optimizer = torch.optim.Adam(self.latent_critic.parameters(), lr=section.critic_lr,
                                                        betas=betas)
        self.balancer = GradientNormBalancer(section.grad_norm_history, section.grad_norm_alpha)
        self.rec_weights = {"encoder": 1.0, "generator": 1.0}
        self._steps_done = 0

    # -- what it expects ------------------------------------------------------------------------------

    @property
    def batches_per_step(self) -> int:
        return self.section.n_critic + 1

    @classmethod
    def apply_search_params(cls, section: dict[str, Any], params) -> dict[str, Any]:
        """As the base, plus: ``layer`` a layer name (the feature layer at ``image_size``); on the paper's widths, a
        ``latent_dim`` of 128 without widths takes the weakly-supervised setting's widths (METHODS §4.1); other
        base widths are kept."""
        plain = {k: v for k, v in params.items() if k != "layer"}
        section = super().apply_search_params(section, plain)
        if "layer" in params:
            section["layers"] = {**(section.get("layers") or {}), int(section["image_size"]): str(params["layer"])}
        paper = section.get("encoder_channels") == [32, 64, 128, 256, 256] and \
            section.get("generator_channels") == [256, 256, 128, 64, 32]
        if paper and int(section.get("latent_dim", 256)) == 128 and int(section.get("image_size", 64)) == 64:
            if "encoder_channels" not in params:
                section["encoder_channels"] = [32, 64, 128, 128, 128]
            if "generator_channels" not in params:
                section["generator_channels"] = [128, 128, 128, 64, 32]
        return section

    # -- training -------------------------------------------------------------------------------------

    def fit(self, pool) -> None:
        """Feature statistics of the perceptual loss: the shipped ImageNet ones, or measured on ``stats_tiles``
        normal tiles (``feature_stats: train``)."""
        size = self.section.image_size
        if self.section.feature_stats == "imagenet":
            stats = {size: imagenet_feature_stats(self.section.backbone, self._extractor.layer_of[size])}
        else:
            stats = {size: feature_stats(self._extractor, to_tensor(pool.sample(self.section.stats_tiles), self.device),
                                         size)}
        self.perceptual = PerceptualLoss(self._extractor, stats).to(self.device)

    def _prior(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.section.latent_dim, 1, 1, generator=rng, device=self.device)

    def _critic_step(self, x: torch.Tensor, rng: torch.Generator) -> dict[str, float]:
        s = self.section
        z = self._prior(x.shape[0], rng)
        with torch.no_grad():
            fake_x, fake_z = self.generator(z), self.encoder(x)
        losses = {}
        for name, critic, optimizer, real, fake in (
                ("image_critic", self.image_critic, self.image_critic_optimizer, x, fake_x),
                ("latent_critic", self.latent_critic, self.latent_critic_optimizer, z, fake_z)):
            loss, parts = critic_loss(critic, real, fake, generator=rng, wasserstein_weight=s.wasserstein_weight,
                                      gradient_penalty=s.gradient_penalty, gp_target=s.gp_target,
                                      norm_penalty=s.norm_penalty)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses[f"{name}_loss"] = float(loss.detach())
            losses.update({f"{name}_{part}": value for part, value in parts.items()})
        return losses

    def train_step(self, tiles: torch.Tensor, step: int) -> dict[str, float]:
        s = self.section
        batches = tiles.chunk(self.batches_per_step)
        rng = self.step_generator(step)
        critic_losses: dict[str, float] = {}
        for x in batches[:-1]:
            critic_losses = self._critic_step(x, rng)        # the last update's losses are logged, as officially
        x = batches[-1]
        z = self._prior(x.shape[0], rng)
        for critic in (self.image_critic, self.latent_critic):
            critic.requires_grad_(False)
        try:
            fake_x = self.generator(z)
            fake_z = self.encoder(x)
            recon = self.generator(fake_z)
            image_adv = generator_adversarial(self.image_critic, fake_x)
            latent_adv = generator_adversarial(self.latent_critic, fake_z)
            rec = self.perceptual(x, recon).mean()
            if (step + 1) % s.grad_norm_every == 0:
                self._rebalance(latent_adv, image_adv, rec)
            values = {"rec_loss": float(rec.detach()), "image_adv_loss": float(image_adv.detach()),
                      "latent_adv_loss": float(latent_adv.detach())}
            exploded = {k: v for k, v in values.items() if v > s.loss_limit}   # the official guard: these three, signed
            if exploded:
                raise TrainingDivergedError(", ".join(f"{k} = {v:.4g}" for k, v in exploded.items())
                                            + f" above loss_limit {s.loss_limit:g} (the official code's guard)")
            self.optimizer.zero_grad(set_to_none=True)
            rec.backward(retain_graph=True)
            for name, module in (("encoder", self.encoder), ("generator", self.generator)):
                for p in module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(self.rec_weights[name])
            (latent_adv + image_adv).backward()
            self.optimizer.step()
        finally:
            for critic in (self.image_critic, self.latent_critic):
                critic.requires_grad_(True)
        self._steps_done = step + 1
        with torch.no_grad():                     # mode collapse shows as generated tiles all alike
            diversity = float(fake_x.std(dim=0, correction=0).mean() / x.std(dim=0, correction=0).mean().clamp_min(1e-8))
        return {**values, **critic_losses, "rec_weight_encoder": self.rec_weights["encoder"],
                "rec_weight_generator": self.rec_weights["generator"], "generated_diversity": diversity}

    def _rebalance(self, latent_adv: torch.Tensor, image_adv: torch.Tensor, rec: torch.Tensor) -> None:
        """Record the gradient norms of each loss alone and set the reconstruction weights (METHODS §4.3)."""
        for name, module, adversarial in (("encoder", self.encoder, latent_adv), ("generator", self.generator, image_adv)):
            self.balancer.record(name, "adv", weight_gradient_norms(adversarial, module))
            self.balancer.record(name, "rec", weight_gradient_norms(rec, module))
            self.rec_weights[name] = self.balancer.weight(name)

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"encoder": {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()},
                "generator": {k: v.detach().cpu() for k, v in self.generator.state_dict().items()},
                "feature_stats": self.perceptual.stats_state()}

    def training_state_dict(self) -> dict[str, Any] | None:
        if self._steps_done == 0:
            return None
        return {"image_critic": {k: v.detach().cpu() for k, v in self.image_critic.state_dict().items()},
                "latent_critic": {k: v.detach().cpu() for k, v in self.latent_critic.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "image_critic_optimizer": self.image_critic_optimizer.state_dict(),
                "latent_critic_optimizer": self.latent_critic_optimizer.state_dict(),
                "balancer": self.balancer.state_dict(), "rec_weights": dict(self.rec_weights),
                "step": self._steps_done}

    def load_state_dict(self, state: dict[str, Any], training_state: dict[str, Any] | None = None) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.generator.load_state_dict(state["generator"])
        self.perceptual = PerceptualLoss(self._extractor, PerceptualLoss.stats_from_state(state["feature_stats"])
                                         ).to(self.device)
        if training_state:
            self.image_critic.load_state_dict(training_state["image_critic"])
            self.latent_critic.load_state_dict(training_state["latent_critic"])
            self.optimizer.load_state_dict(training_state["optimizer"])
            self.image_critic_optimizer.load_state_dict(training_state["image_critic_optimizer"])
            self.latent_critic_optimizer.load_state_dict(training_state["latent_critic_optimizer"])
            self.balancer.load_state_dict(training_state["balancer"])
            self.rec_weights = {k: float(v) for k, v in training_state["rec_weights"].items()}
            self._steps_done = int(training_state["step"])

    # -- scoring --------------------------------------------------------------------------------------

    def score_batch(self, tiles: torch.Tensor, pixel_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Relative perceptual L1 between each tile and G(E(tile)) and, with ``pixel_maps``, its per-feature-cell
        map (:func:`~wsi_ad.features.perceptual.perceptual_scores`)."""
        return perceptual_scores(self.perceptual, tiles, self.generator(self.encoder(tiles)), pixel_maps)
