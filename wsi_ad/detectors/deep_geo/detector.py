"""Deep GEO — geometric-transformation classification — as a :class:`~wsi_ad.detectors.base.Detector`.

Golan & El-Yaniv, "Deep Anomaly Detection Using Geometric Transformations" (NeurIPS 2018); a baseline of the DPA paper
(Camelyon16 tile AUC 52.4 ± 11.1), as its official Keras port runs it (``ninatu/anomaly_detection`` ``deep_geo/``;
``shared/METHODS.md`` §6).

A Wide ResNet (:mod:`~wsi_ad.detectors.deep_geo.networks`; WRN-16-8 for Camelyon16) learns to tell which of 72
geometric transformations (:mod:`~wsi_ad.detectors.deep_geo.transforms`: flip x shift x rotation, t = 16 px on
64 px tiles) a normal tile went through: cross-entropy on the transformation's index, Adam 1e-3 with Keras' defaults
and the official L2 penalty 2.5e-4 on every weight. After the last step, one Dirichlet per transformation t is
fitted (maximum likelihood, :mod:`~wsi_ad.detectors.deep_geo.dirichlet`) to the softmax outputs of the training tiles
transformed by t, with the network in inference mode. Score of a tile x (``score: dirichlet``, the official one):
anomaly = -(1/72) Σ_t Σ_k (α_{t,k} - 1) ln(p_k(T_t x) + 1e-6) — a tile whose transformed copies the classifier
cannot place as confidently as normal tiles scores high. ``score: log_probability``: -(1/72) Σ_t ln p_t(T_t x),
the same score with every α_t fixed at 1 plus a one-hot on t (a simplification in the spirit of the paper's simple
score; no fit). The 72 forward passes per tile are batched (:data:`SCORE_IMAGES` images at a time). The Dirichlet
parameters are part of :meth:`~DeepGEO.state_dict`: scoring needs no training tiles.

Departures from the official code, and why:

- No materialised 72x dataset (7,612 x 72 tiles of 64 px in float32: ~27 GB): each step takes a batch of
  ``train.batch_size`` tiles from the shared pool and gives each a transformation drawn uniformly from a generator
  seeded by (``train.seed``, step), so a resumed run repeats them; ``iterations`` counts these batches (the official
  3 epochs of 7,612 x 72 samples at batch 128 = 12,846 steps). The official epochs visit every (tile, transformation)
  pair exactly once each; sampling visits them equally often on average.
- The Dirichlet fit uses ``dirichlet_tiles`` tiles of the pool's first buffer (:meth:`~wsi_ad.tile_pool.TilePool.sample`;
  8,192 holds all of the 7,612 Camelyon16 training tiles) and the log-probabilities come from ``log_softmax`` (finite
  where a float32 softmax underflows to 0 and the official ``np.log`` gives -inf).
- Adam's epsilon sits outside the bias correction in torch (inside in Keras): a difference of order 1e-7 in the step.
- The transformations act on the tiles as the loop serves them: ``data.flips`` and ``data.rot90`` must be false
  (random flips and rotations would make the classes they define ambiguous; refused at construction). The official
  code trains on the centre crop, unflipped.
- Scores are computed in float32 even under the scorer's bf16 autocast (the α-weighted log-probabilities of the fitted
  Dirichlets are sensitive to the small probabilities bf16 rounds); training follows ``train.amp``.
- ``input_px`` (not in the official code; null in the paper setting) shrinks the tiles before everything else, for
  the CPU setting: 32 px images with 8 px shifts are the original CIFAR-10 geometry at a quarter of the cost.
- Per-pixel maps: none (``score_batch`` returns None maps): the score is one classification per transformed tile.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from wsi_ad.config import ConfigError
from wsi_ad.detectors.base import Detector
from wsi_ad.detectors.deep_geo.config import DeepGEOConfig
from wsi_ad.detectors.deep_geo.dirichlet import fit_dirichlet
from wsi_ad.detectors.deep_geo.networks import WideResNet
from wsi_ad.detectors.deep_geo.transforms import NUM_TRANSFORMS, all_transforms, apply_transforms, index_maps
from wsi_ad.tile_pool import to_tensor

#: Transformed images per forward pass when scoring and fitting the Dirichlets (16 tiles x 72).
SCORE_IMAGES = 16 * NUM_TRANSFORMS
#: Added to the probabilities before their log in the Dirichlet score (the official constant).
PROB_EPS = 1e-6


class DeepGEO(Detector):
    """The transformation classifier (:attr:`net`) and, once trained, the Dirichlet parameters :attr:`alpha`
    (72 transformations x 72 classes, float64; None before the fit or with ``score: log_probability``)."""

    name = "deep_geo"
    summary = "Deep GEO: Wide ResNet classifying 72 geometric transformations, Dirichlet normality score"
    paper = ("Golan & El-Yaniv, Deep Anomaly Detection Using Geometric Transformations (NeurIPS 2018); the DPA "
             "paper's baseline, official code ninatu/anomaly_detection (deep_geo/)")
    config_class = DeepGEOConfig
    score_units = ("negative Dirichlet normality of the 72 transformed copies' softmax outputs (unitless, "
                   "higher = more anomalous)")
    map_reduction = ""
    search_parameters: ClassVar[dict[str, str]] = {"widen": "widen", "depth": "depth", "lr": "lr",
                                                   "iterations": "iterations", "shift_px": "shift_px"}

    def __init__(self, config, device="cpu"):
        super().__init__(config, device)
        if config.data.flips or config.data.rot90:
            raise ConfigError("deep_geo: data.flips and data.rot90 must be false: the detector classifies flips and "
                              "rotations of the tiles it is given")
        s: DeepGEOConfig = config.section
        self.section = s
        self.net = WideResNet(s.depth, s.widen, NUM_TRANSFORMS, s.network_px, s.dropout).to(self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=s.lr, betas=(0.9, 0.999), eps=1e-7,
                                          weight_decay=2.0 * s.l2)
        self.maps = torch.from_numpy(index_maps(s.network_px, s.shift_px)).to(self.device)
        self.alpha: torch.Tensor | None = None
        self._pool = None
        self._steps_done = 0

    def resize(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 3, P, P), P = ``input_px`` (bilinear, antialiased when shrinking); the tiles
        themselves when ``input_px`` is null or S."""
        px = self.section.network_px
        if tiles.shape[-1] == px and tiles.shape[-2] == px:
            return tiles
        return F.interpolate(tiles, size=(px, px), mode="bilinear", align_corners=False,
                             antialias=px < max(tiles.shape[-2:]))

    # -- training -------------------------------------------------------------------------------------

    def transforms_of_step(self, step: int, n: int) -> torch.Tensor:
        """The (n,) int64 transformation indices of step ``step``: uniform, from a generator seeded by
        (``train.seed``, ``step``)."""
        rng = np.random.default_rng([self.config.train.seed, 0x6E0, step])
        return torch.from_numpy(rng.integers(0, NUM_TRANSFORMS, n)).to(self.device)

    def before_step(self, pool, step: int) -> None:
        """Keep the pool: the last :meth:`train_step` fits the Dirichlets on its tiles."""
        self._pool = pool

    def train_step(self, tiles: torch.Tensor, step: int) -> dict[str, float]:
        which = self.transforms_of_step(step, len(tiles))
        x = apply_transforms(self.resize(tiles), self.maps, which)
        with self.autocast():
            logits = self.net(x)
            loss = F.cross_entropy(logits.float(), which)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._steps_done = step + 1
        values = {"loss": float(loss.detach()), "accuracy": float((logits.argmax(1) == which).float().mean())}
        if step == self.num_steps - 1 and self.section.score == "dirichlet":
            if self._pool is None:
                raise RuntimeError("deep_geo: the last step needs the training pool (before_step was not called)")
            self.fit_dirichlets(self._pool.sample(self.section.dirichlet_tiles))
        return values

    @torch.no_grad()
    def transformed_log_probs(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 72, 72) float32: log-softmax of the classifier (inference mode, float32) on each of
        the 72 transformations (dim 1) of each tile, over the 72 classes (dim 2)."""
        training = self.net.training
        self.net.eval()
        per_chunk = max(1, SCORE_IMAGES // NUM_TRANSFORMS)
        parts = []
        try:
            with torch.autocast(self.device.type, enabled=False):
                for start in range(0, len(tiles), per_chunk):
                    chunk = self.resize(tiles[start:start + per_chunk].float())
                    logits = self.net(all_transforms(chunk, self.maps)).float()
                    parts.append(F.log_softmax(logits, dim=1).view(len(chunk), NUM_TRANSFORMS, NUM_TRANSFORMS))
        finally:
            self.net.train(training)
        return torch.cat(parts)

    def fit_dirichlets(self, tiles: np.ndarray) -> None:
        """Fit :attr:`alpha` on (N, S, S, 3) uint8 training tiles: per transformation, the Dirichlet MLE of the
        softmax outputs of the tiles transformed by it (streamed: only their means and mean logs are kept)."""
        total = torch.zeros(NUM_TRANSFORMS, NUM_TRANSFORMS, dtype=torch.float64)
        total_log = torch.zeros_like(total)
        batch = self.config.train.batch_size
        for start in range(0, len(tiles), batch):
            log_p = self.transformed_log_probs(to_tensor(tiles[start:start + batch], self.device)).double().cpu()
            total += log_p.exp().sum(0)
            total_log += log_p.sum(0)
        n = len(tiles)
        mean, mean_log = (total / n).numpy(), (total_log / n).numpy()
        self.alpha = torch.from_numpy(np.stack([fit_dirichlet(mean[t], mean_log[t]) for t in range(NUM_TRANSFORMS)]))

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {"net": {k: v.detach().cpu() for k, v in self.net.state_dict().items()}}
        if self.alpha is not None:
            state["alpha"] = self.alpha.clone()
        return state

    def training_state_dict(self) -> dict[str, Any] | None:
        return None if self._steps_done == 0 else {"optimizer": self.optimizer.state_dict(), "step": self._steps_done}

    def load_state_dict(self, state: dict[str, Any], training_state: dict[str, Any] | None = None) -> None:
        self.net.load_state_dict(state["net"])
        alpha = state.get("alpha")
        self.alpha = None if alpha is None else alpha.to(torch.float64).cpu()
        if training_state:
            self.optimizer.load_state_dict(training_state["optimizer"])
            self._steps_done = int(training_state["step"])

    # -- scoring --------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_batch(self, tiles: torch.Tensor, pixel_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, S, S) -> ((B,) float32 anomaly scores, None): minus the Dirichlet normality (or the mean
        log-probability of the right transformation) over the 72 transformed copies; Deep GEO gives no maps.
        RuntimeError for a ``dirichlet`` model whose training did not reach its last step (no fit yet)."""
        log_p = self.transformed_log_probs(tiles)
        if self.section.score == "log_probability":
            return -torch.diagonal(log_p, dim1=1, dim2=2).double().mean(1).float(), None
        if self.alpha is None:
            raise RuntimeError("deep_geo: no Dirichlet parameters yet (they are fitted after the last training step)")
        alpha = self.alpha.to(self.device)
        terms = (alpha - 1.0) * torch.log(log_p.exp().double() + PROB_EPS)           # (B, 72, 72)
        return -(terms.sum(dim=(1, 2)) / NUM_TRANSFORMS).float(), None
