"""The Deep Perceptual Autoencoder (DPA) as a :class:`~wsi_ad.detectors.base.Detector`.

Shvetsova (Tuluptceva) et al., "Anomaly Detection with Deep Perceptual Autoencoders" (arXiv 2020; IEEE
Access 2021); official code ninatu/anomaly_detection (``dpa``). An autoencoder is trained on normal tiles
with the relative perceptual L1 loss only (frozen VGG-19 features at relu4_2 for 64 px inputs, relu3_2 for
16 and 32 px, standardized per channel), grown progressively 16 -> 32 -> 64 px with one Adam per phase; a
tile's anomaly score is the same relative perceptual L1 between the tile and its reconstruction.

The paper setting (``configs/camelyon16_paper.yaml``, the :class:`~wsi_ad.detectors.dpa.config.DPAConfig`
defaults): the official ``residual18`` network (widths 4, latent 4 x 8 x 8), fixed ImageNet feature
statistics, 64 px tiles at 10x, batch 128, lr 1e-3, 20k/20k/20k/20k/8,666 iterations, fp32. Where ours
departs from the official code:

- The input tiles are our pipeline's (Vahadane-normalized once per slide, resized from the slide's pyramid,
  no JPEG round trips); the paper's were 768 px blocks normalized one by one, saved as JPEG three times.
- Augmentation is drawn afresh every iteration (the official progressive config caches one random crop
  and flip per tile for the whole run; its non-progressive configs redraw them as we do).
- ``train.amp`` (bf16 autocast on cuda) is an option, off by default; the paper trained in fp32.
- ``feature_stats: train`` (statistics measured on the training tiles) and the ``shallow`` network are
  ours: the CPU demo's setting, and what checkpoints written before the detector interface hold.

Ablations of the paper's Table 2 (``shared/METHODS.md`` §3.7; configs ``configs/dpa_ablation_*.yaml``): the pixel-L1
autoencoder (``loss: l1``: loss and score the mean |x - x̃|, no backbone), + a pixel L1 term (``l1_weight``: in the
loss and the score, as the official evaluation), + a WGAN-GP image critic (``adversarial_weight``: in the loss
only; critic loss of :func:`~wsi_ad.detectors.piad.losses.critic_loss` with λ 1, g 10, γ 1, ν 0.001 on training
tiles vs their reconstructions, ``n_critic`` critic steps per autoencoder step, each on its own batch), without
progressive growing (``progressive: false``). The unsupervised selection is ``wsi-ad tune --selection unsupervised``.

State (checkpointed): ``autoencoder`` (state dict) and ``feature_stats`` (``{"<px>": {"mean": (C,), "std":
(C,)}}`` per loss input size; absent with ``loss: l1``); training state: the Adam state of the current phase and
the step it was saved at (and the critic with its Adam state in the adversarial ablation).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from wsi_ad.detectors.base import Detector
from wsi_ad.detectors.dpa.config import DPAConfig
from wsi_ad.detectors.dpa.networks import build_autoencoder
from wsi_ad.detectors.dpa.schedule import Phase, flat_phases, loss_sizes, phase_loss, progressive_phases, resize_batch
from wsi_ad.detectors.piad.losses import critic_loss, generator_adversarial
from wsi_ad.features.backbones import build_backbone
from wsi_ad.features.perceptual import PerceptualLoss, feature_stats, imagenet_feature_stats, perceptual_scores
from wsi_ad.tile_pool import to_tensor

#: Map cells of the pixel-L1 autoencoder (``loss: l1``) are this many px.
L1_MAP_CELL_PX = 8

#: How each architecture resizes training inputs to a progressive phase's size (see schedule.resize_batch).
_RESIZE = {"residual18": "bilinear", "shallow": "area"}


def phases_of(section: DPAConfig) -> list[Phase]:
    """The training schedule of a DPA config section."""
    if section.progressive:
        return progressive_phases(section.iterations, section.start_size, section.image_size)
    return flat_phases(section.flat_iterations, section.image_size)


class DPA(Detector):
    """Deep Perceptual Autoencoder: an autoencoder (:attr:`autoencoder`) and a relative perceptual L1
    (:attr:`perceptual`, a frozen backbone with per-channel statistics) as loss and score."""

    name = "dpa"
    summary = "Deep Perceptual Autoencoder: residual autoencoder, relative perceptual L1 loss and score, progressive growing"
    paper = ("Shvetsova et al., Anomaly Detection with Deep Perceptual Autoencoders (2020); "
             "official code ninatu/anomaly_detection")
    config_class = DPAConfig
    random_salt = 0xD9A
    score_units = "relative perceptual L1 (unitless, higher = more anomalous)"
    map_reduction = ("per feature cell: channel mean of |f(x) - f(recon)| / the tile's mean |f(x)| "
                     "(map mean = tile score)")
    search_parameters: ClassVar[dict[str, str]] = {
        "architecture": "architecture", "latent_size": "latent_size", "latent_channels": "latent_channels",
        "image_size": "image_size", "channels": "channels", "lr": "lr", "iterations": "iterations",
        "layer": "layers", "backbone": "backbone", "feature_stats": "feature_stats", "loss": "loss",
        "l1_weight": "l1_weight", "adversarial_weight": "adversarial_weight",
    }
    #: The search space of ``wsi-ad tune`` for the paper setting (equal to configs/tune_space.yaml).
    default_search_space: ClassVar[dict[str, Any]] = {
        "mode": "random", "max_candidates": 8, "seed": 0,
        "space": {"latent_size": [4, 8], "channels": [4, 8], "lr": [0.001, 0.0003], "iterations": [44333, 88666],
                  "layer": ["relu4_2", "relu3_2"], "magnification": ["10x", "20x"]},
    }

    def __init__(self, config, device="cpu"):
        super().__init__(config, device)
        section: DPAConfig = config.section
        self.section = section
        self.phases = phases_of(section)
        self.sizes = loss_sizes(self.phases)
        self.autoencoder = build_autoencoder(section.architecture, section.autoencoder_config())
        if section.loss == "l1":          # the ablations' scores are not the relative perceptual L1 alone
            self.score_units = "mean absolute pixel difference on [-1, 1] (higher = more anomalous)"
        elif section.l1_weight > 0:
            self.score_units = (f"relative perceptual L1 + {section.l1_weight:g} x mean absolute pixel difference "
                                "(higher = more anomalous)")
        self.perceptual: PerceptualLoss | None = None
        self._extractor = None
        if section.loss == "perceptual":
            self._extractor = build_backbone(section.backbone, self.sizes, weights=section.backbone_weights,
                                             download=section.download_weights, layers=section.layers).to(self.device)
        self.autoencoder.to(self.device)
        self.critic = self.critic_optimizer = None
        if section.adversarial_weight > 0:
            from wsi_ad.detectors.dpa.residual import Residual18Critic

            self.critic = Residual18Critic(section.critic_channels).to(self.device)
            self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=section.critic_lr)
        self.channels_last = self.device.type == "cuda" and config.train.channels_last
        self.optimizer: torch.optim.Optimizer | None = None
        self._optimizer_phase: int | None = None   # the phase the optimizer belongs to
        self._steps_done = 0
        self._starts = []
        start = 0
        for phase in self.phases:
            self._starts.append(start)
            start += phase.iterations

    # -- what it expects ------------------------------------------------------------------------------

    @classmethod
    def num_steps_of(cls, config) -> int:
        return sum(p.iterations for p in phases_of(config.section))

    @property
    def batches_per_step(self) -> int:
        """``n_critic`` critic batches and one autoencoder batch in the adversarial ablation, else 1."""
        return self.section.n_critic + 1 if self.critic is not None else 1

    @classmethod
    def apply_search_params(cls, section: dict[str, Any], params) -> dict[str, Any]:
        """As the base, plus the shorthands of :mod:`wsi_ad.tuning`: ``channels`` an int (that width at every
        level), ``iterations`` an int (the total: ``flat_iterations``, or the progressive phases scaled to
        it), ``layer`` a layer name (the feature layer at ``image_size``)."""
        from wsi_ad.config import ConfigError

        plain = {k: v for k, v in params.items() if k not in ("channels", "iterations", "layer")}
        changes_backbone = plain.get("backbone", section["backbone"]) != section["backbone"]
        section = super().apply_search_params(section, plain)
        if changes_backbone:
            section["layers"] = None  # the base config's layer names belong to its own backbone
        if "channels" in params:
            value = params["channels"]
            if isinstance(value, int) and not isinstance(value, bool):
                value = [value] * _levels(section["image_size"], section["latent_size"])
            if not isinstance(value, list):
                raise ConfigError(f"channels must be an int (every level) or a list of widths, got {value!r}")
            section["channels"] = list(value)
        if "iterations" in params:
            value = params["iterations"]
            if isinstance(value, dict):
                section["iterations"] = {str(k): int(v) for k, v in value.items()}
            elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                if section["progressive"]:
                    section["iterations"] = _scaled_iterations(section["iterations"], value)
                else:
                    section["flat_iterations"] = value
            else:
                raise ConfigError(f"iterations must be a non-negative int (total) or a mapping of phase -> iterations, "
                                  f"got {value!r}")
        if "layer" in params:
            value = params["layer"]
            if isinstance(value, dict):
                section["layers"] = {int(k): str(v) for k, v in value.items()}
            else:
                section["layers"] = {**(section["layers"] or {}), int(section["image_size"]): str(value)}
        return section

    # -- training -------------------------------------------------------------------------------------

    def _phase_index(self, step: int) -> int:
        index = 0
        for i, start in enumerate(self._starts):
            if step >= start and self.phases[i].iterations:
                index = i
        return index

    def phase(self, step: int) -> str:
        return self.phases[self._phase_index(step)].name if self.phases else ""

    def checkpoint_steps(self) -> set[int]:
        return {start + p.iterations for start, p in zip(self._starts, self.phases, strict=True) if p.iterations}

    def fit(self, pool) -> None:
        """Feature statistics per loss input size: the shipped ImageNet ones, or measured on
        ``stats_tiles`` normal tiles (``feature_stats: train``); nothing for the pixel-L1 autoencoder."""
        if self._extractor is None:
            return
        if self.section.feature_stats == "imagenet":
            stats = {s: imagenet_feature_stats(self.section.backbone, self._extractor.layer_of[s]) for s in self.sizes}
        else:
            images = to_tensor(pool.sample(self.section.stats_tiles), self.device)
            mode = _RESIZE[self.section.architecture]
            stats = {s: feature_stats(self._extractor, resize_batch(images, s, mode), s) for s in self.sizes}
        self._set_stats(stats)

    def _set_stats(self, stats: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.perceptual = PerceptualLoss(self._extractor, stats).to(self.device)
        if self.channels_last:
            self.autoencoder.to(memory_format=torch.channels_last)
            self.perceptual.to(memory_format=torch.channels_last)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.autoencoder.parameters(), lr=self.section.lr, betas=tuple(self.section.betas))

    def reconstruction_loss(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """(B,) loss of each tile's reconstruction, also its score: relative perceptual L1 (+ ``l1_weight`` x the
        mean absolute pixel difference), or that pixel L1 alone (``loss: l1``)."""
        s = self.section
        if self.perceptual is None:
            return (x - recon).abs().mean(dim=(1, 2, 3))
        loss = self.perceptual(x, recon)
        if s.l1_weight > 0:
            loss = loss + s.l1_weight * (x - recon).abs().mean(dim=(1, 2, 3))
        return loss

    def train_step(self, tiles: torch.Tensor, step: int) -> dict[str, float]:
        index = self._phase_index(step)
        if self._optimizer_phase != index:  # a new phase: a fresh Adam, as the official code
            self.optimizer, self._optimizer_phase = self._new_optimizer(), index
        phase = self.phases[index]
        alpha = phase.alpha(step - self._starts[index])
        if self.channels_last:
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        values: dict[str, float] = {}
        if self.critic is not None:             # the adversarial ablation: non-progressive, alpha = 1
            *critic_batches, tiles = tiles.chunk(self.batches_per_step)
            values = self._critic_steps(critic_batches, self.step_generator(step))
            with self.autocast():
                recon = self.autoencoder(tiles, phase.size, 1.0)
                rec = self.reconstruction_loss(tiles, recon).mean()
                adversarial = generator_adversarial(self.critic, recon)
                loss = rec + self.section.adversarial_weight * adversarial
            values.update(reconstruction=float(rec.detach()), adversarial=float(adversarial.detach()))
        else:
            with self.autocast():
                loss = phase_loss(self.autoencoder, self.reconstruction_loss, tiles, phase.size, alpha,
                                  _RESIZE[self.section.architecture]).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._steps_done = step + 1
        return {"loss": float(loss.detach()), "alpha": alpha, **values}

    def _critic_steps(self, batches, rng: torch.Generator) -> dict[str, float]:
        """One critic update per batch: training tiles as real, their reconstructions as fake."""
        total: dict[str, float] = {}
        for x in batches:
            with torch.no_grad(), self.autocast():
                recon = self.autoencoder(x, self.section.image_size, 1.0)
            with self.autocast():
                loss, parts = critic_loss(self.critic, x, recon.float(), generator=rng)
            self.critic_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.critic_optimizer.step()
            for key, value in {"critic_loss": float(loss.detach()), **parts}.items():
                total[key] = total.get(key, 0.0) + value / len(batches)
        return total

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {"autoencoder": {k: v.detach().cpu() for k, v in self.autoencoder.state_dict().items()}}
        if self.perceptual is not None:
            state["feature_stats"] = self.perceptual.stats_state()
        return state

    def training_state_dict(self) -> dict[str, Any] | None:
        """The Adam state of the current phase and the steps done when it was taken (None before training); the
        critic and its Adam state in the adversarial ablation."""
        if self.optimizer is None:
            return None
        state = {"optimizer": self.optimizer.state_dict(), "step": self._steps_done}
        if self.critic is not None:
            state["critic"] = {k: v.detach().cpu() for k, v in self.critic.state_dict().items()}
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], training_state: dict[str, Any] | None = None) -> None:
        self.autoencoder.load_state_dict(state["autoencoder"])
        if self._extractor is not None:
            self._set_stats(PerceptualLoss.stats_from_state(state["feature_stats"]))
        if training_state and self.critic is not None and "critic" in training_state:
            self.critic.load_state_dict(training_state["critic"])
            self.critic_optimizer.load_state_dict(training_state["critic_optimizer"])
        self.optimizer, self._optimizer_phase = None, None
        if training_state and training_state.get("optimizer") and int(training_state["step"]) > 0:
            step = self._steps_done = int(training_state["step"])
            index = self._phase_index(step - 1)
            if step < self._starts[index] + self.phases[index].iterations:  # saved mid-phase
                self.optimizer, self._optimizer_phase = self._new_optimizer(), index
                self.optimizer.load_state_dict(training_state["optimizer"])

    # -- scoring --------------------------------------------------------------------------------------

    def score_batch(self, tiles: torch.Tensor, pixel_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Relative perceptual L1 of each tile's reconstruction at full size (alpha = 1) and, with
        ``pixel_maps``, its per-feature-cell map (:func:`~wsi_ad.features.perceptual.perceptual_scores`); with
        ``l1_weight`` plus that weight x the pixel L1 (in the map: pooled to the feature cells, so the map's mean
        stays the score); with ``loss: l1`` the pixel L1 and its 8 px cell means."""
        if self.channels_last:
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        recon = self.autoencoder(tiles, self.section.image_size, 1.0)
        pixel = (tiles - recon).abs().mean(dim=1).float()
        if self.perceptual is None:
            maps = F.avg_pool2d(pixel[:, None], L1_MAP_CELL_PX)[:, 0] if pixel_maps else None
            return pixel.mean(dim=(1, 2)), maps
        score, maps = perceptual_scores(self.perceptual, tiles, recon, pixel_maps)
        weight = self.section.l1_weight
        if weight > 0:
            score = score + weight * pixel.mean(dim=(1, 2))
            if maps is not None:
                maps = maps + weight * F.adaptive_avg_pool2d(pixel[:, None], maps.shape[-2:])[:, 0]
        return score, maps


def _levels(image_size: int, latent_size: int) -> int:
    """Number of resolution levels (widths in ``channels``) from input to bottleneck."""
    from wsi_ad.config import ConfigError

    image_size, latent_size = int(image_size), int(latent_size)
    ratio = image_size // latent_size if latent_size >= 1 and image_size % latent_size == 0 else 0
    if ratio < 1 or ratio & (ratio - 1):
        raise ConfigError(f"image_size / latent_size must be a power of two, got {image_size}/{latent_size}")
    return ratio.bit_length()


def _scaled_iterations(phases: dict[str, int], total: int) -> dict[str, int]:
    """``phases`` (name -> iterations) scaled proportionally to sum to ``total`` (rounding on the last phase)."""
    from wsi_ad.config import ConfigError

    names = list(phases)
    base = sum(int(v) for v in phases.values())
    if base <= 0:
        raise ConfigError("iterations: the base config's iterations sum to 0; give a mapping instead")
    out = {k: int(round(int(phases[k]) * total / base)) for k in names}
    last = [k for k in names if int(phases[k]) > 0][-1]
    out[last] = max(0, out[last] + total - sum(out.values()))
    return out
