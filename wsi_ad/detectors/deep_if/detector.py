"""Deep IF — pooled features of a frozen ImageNet CNN and an Isolation Forest — as a
:class:`~wsi_ad.detectors.base.Detector`.

Ouardini et al., "Towards Practical Unsupervised Anomaly Detection on Retinal Images" (MICCAI DART/MIL3ID 2019); the
DPA paper's strongest baseline on Camelyon16 (87.6 ± 1.5 tile AUC, 90.6 ± 0.3 with weakly-supervised selection), as
its official code runs it (``ninatu/anomaly_detection`` ``deep_if/``; ``shared/METHODS.md`` §5).

Features: each ``image_size`` px tile (the official 64 px centre crop of a 10x tile) is resized bilinearly to
``input_px`` px (official: 299, PIL bilinear) and fed to a frozen ImageNet backbone; the outputs of several of its
layers are averaged over space and concatenated (the official ``concat`` mode). Fit (no training steps): a
scikit-learn ``IsolationForest`` with its defaults (100 trees, ``max_samples`` min(256, n), all features, no
bootstrap), seeded with ``train.seed`` (the official code seeds NumPy's global generator), on the vectors of all
training tiles (streamed from the pool's sources in order, never augmented; a seeded random ``fit_tiles`` of them when
there are more). Score: ``-score_samples`` of the forest, in (0, 1] (Liu et al.'s 2^(-mean path length / c(256));
higher = more anomalous), the official AUC's ranking.

The forest is checkpointed as tensors (:mod:`~wsi_ad.detectors.deep_if.forest`: the trees' node arrays) and scored
from them in torch, equal to scikit-learn's ``score_samples`` (tested): a checkpoint loads with
``torch.load(weights_only=True)``, holds no training features, and scores without scikit-learn or a refit (which
would take as long as the fit and tie the model to one scikit-learn version's random streams). Features are computed
in float32 even under the scorer's bf16 autocast: the trees' thresholds are sharp, and bf16 features (3 significant
digits) would move tiles across them.

Per-pixel maps: none (``score_batch`` returns None maps; ``--pixel-maps`` is refused): a tile's score is one path
length through trees on a pooled vector; it has no spatial layout to spread it over.

Departures: InceptionResNetV2 (the official ``pretrainedmodels`` network) is not available offline, so the backbone
is one wsi-ad ships: ``efficientnet_lite0`` (ImageNet, Apache-2.0), whose four feature layers (block 2, 4, 7, 10:
24 + 40 + 80 + 112 = 256 dims, strides 4 to 16) stand in for the official eleven (5,680 dims, strides 2 to 32);
``resnet18`` (layer1 to layer4, 960 dims) or ``vgg19`` with their weight files. The resize is torch's bilinear
(``align_corners=False``, the same weights as PIL's when enlarging; antialiased when shrinking, as PIL).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from wsi_ad.detectors.base import Detector
from wsi_ad.detectors.deep_if.config import DeepIFConfig
from wsi_ad.detectors.deep_if.forest import ForestScorer, forest_state
from wsi_ad.features.backbones import build_multilayer
from wsi_ad.tile_pool import to_tensor

#: Tiles read from a source at a time while gathering the training features.
READ_TILES = 1024
#: Backbone passes hold at most this many input pixels (64 tiles at 299 px: ~0.6 GB of activations at peak on the
#: CPU); larger batches are split.
CHUNK_PIXELS = 64 * 299 * 299


class DeepIF(Detector):
    """A frozen multi-layer backbone (:attr:`backbone`) and an Isolation Forest (:attr:`forest`, a
    :class:`~wsi_ad.detectors.deep_if.forest.ForestScorer`, None before :meth:`fit`)."""

    name = "deep_if"
    summary = "Deep IF: pooled multi-layer ImageNet CNN features + scikit-learn Isolation Forest (fit-only)"
    paper = ("Ouardini et al., Towards Practical Unsupervised Anomaly Detection on Retinal Images (DART 2019); "
             "the DPA paper's baseline, official code ninatu/anomaly_detection (deep_if/)")
    config_class = DeepIFConfig
    score_units = "Isolation Forest anomaly score -score_samples, in (0, 1] (0.5: an average path length)"
    map_reduction = ""
    search_parameters: ClassVar[dict[str, str]] = {"input_px": "input_px", "n_estimators": "n_estimators",
                                                   "max_samples": "max_samples", "backbone": "backbone"}

    def __init__(self, config, device="cpu"):
        super().__init__(config, device)
        s: DeepIFConfig = config.section
        self.section = s
        self.backbone = build_multilayer(s.backbone, s.feature_layers, weights=s.backbone_weights,
                                         download=s.download_weights).to(self.device)
        self.forest: ForestScorer | None = None
        self._state: dict[str, Any] | None = None

    # -- features -------------------------------------------------------------------------------------

    @torch.no_grad()
    def features(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float in [-1, 1] -> (B, D) float32: the tiles resized to ``input_px`` and the spatial means of
        the backbone's feature layers, concatenated in the order of ``layers``; float32 whatever the autocast."""
        px = self.section.input_px
        chunk = max(1, CHUNK_PIXELS // (px * px))
        parts = []
        with torch.autocast(self.device.type, enabled=False):
            for start in range(0, len(tiles), chunk):
                x = tiles[start:start + chunk].float()
                if x.shape[-1] != px or x.shape[-2] != px:
                    x = F.interpolate(x, size=(px, px), mode="bilinear", align_corners=False,
                                      antialias=px < max(x.shape[-2:]))
                maps = self.backbone(x)
                parts.append(torch.cat([m.float().mean(dim=(2, 3)) for m in maps.values()], dim=1))
        return torch.cat(parts)

    def _training_tiles(self, pool) -> Iterator[np.ndarray]:
        """(n, S, S, 3) uint8 blocks of the training tiles, source by source in order: all of them, or a seeded random
        ``fit_tiles`` of them when the pool holds more."""
        seed, cap = self.config.train.seed, self.section.fit_tiles
        keep = None
        if pool.total > cap:
            keep = np.zeros(pool.total, dtype=bool)
            keep[np.random.default_rng([seed, 0xD1F]).choice(pool.total, size=cap, replace=False)] = True
        offset = 0
        for index, source in enumerate(pool.sources):
            n = len(source)
            for start in range(0, n, READ_TILES):
                stop = min(start + READ_TILES, n)
                chosen = None if keep is None else keep[offset + start:offset + stop]
                if chosen is not None and not chosen.any():
                    continue
                tiles = source.read(start, stop, np.random.default_rng([seed, 0xD1F, index, start]))
                yield tiles if chosen is None else tiles[chosen]
            offset += n

    # -- fit ------------------------------------------------------------------------------------------

    def fit(self, pool) -> None:
        """Gather the features of the training tiles (module docstring) in batches of ``train.batch_size`` and fit
        the Isolation Forest on them. :class:`~wsi_ad.tile_pool.DataError` with fewer than 2 tiles."""
        from sklearn.ensemble import IsolationForest

        from wsi_ad.tile_pool import DataError

        batch = self.config.train.batch_size
        features = []
        for tiles in self._training_tiles(pool):
            for start in range(0, len(tiles), batch):
                features.append(self.features(to_tensor(tiles[start:start + batch], self.device)).cpu())
        data = torch.cat(features).numpy() if features else np.zeros((0, 0), np.float32)
        if len(data) < 2:
            raise DataError(f"Deep IF needs at least 2 training tiles, got {len(data)}")
        s = self.section
        forest = IsolationForest(n_estimators=s.n_estimators, max_samples="auto" if s.max_samples is None else
                                 min(s.max_samples, len(data)), random_state=self.config.train.seed)
        forest.fit(data)
        self._set_forest(forest_state(forest))

    def _set_forest(self, state: dict[str, Any]) -> None:
        self._state = state
        self.forest = ForestScorer(state, self.device)

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._state is None:
            raise RuntimeError("Deep IF has no forest yet: fit() it on training tiles first")
        return {"forest": dict(self._state)}

    def load_state_dict(self, state: dict[str, Any], training_state: dict[str, Any] | None = None) -> None:
        self._set_forest(dict(state["forest"]))

    # -- scoring --------------------------------------------------------------------------------------

    def score_batch(self, tiles: torch.Tensor, pixel_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, S, S) -> ((B,) float32 ``-score_samples`` of the tiles' features, None): Deep IF gives no maps."""
        if self.forest is None:
            raise RuntimeError("Deep IF has no forest yet: fit() it on training tiles first")
        return self.forest.score(self.features(tiles)).float(), None
