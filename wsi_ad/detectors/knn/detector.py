"""The feature kNN baseline: a memory bank of mid-level ImageNet patch features (PatchCore), as a
:class:`~wsi_ad.detectors.base.Detector`.

Roth, Pemula, Zepeda, Schölkopf, Brox, Gehler, "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022,
arXiv 2106.08265); ``shared/METHODS.md`` §10, values checked there against anomalib's implementation.

Features (:meth:`FeatureKNN.features`): a frozen ImageNet backbone's maps at two mid-level layers from one pass
(:func:`~wsi_ad.features.backbones.build_multilayer`; the paper's WideResNet-50-2 ``layer2`` + ``layer3``, strides 8
and 16), each locally aggregated by a 3x3 average pool (stride 1, padding 1, zero padding counted as anomalib's
``AvgPool2d``), the deeper map bilinearly resized to the shallower grid, concatenated along channels: one D-dim
feature per grid cell ("patch"). Optional channel reduction to ``embed_dim`` by adaptive average pooling per layer
and of the concatenation, as the authors' code (METHODS marks it unverified); off by default, as in anomalib.

Fit (no optimizer, no training steps): the memory bank is the greedy k-center coreset
(:func:`~wsi_ad.detectors.knn.memory.greedy_coreset`, distances on a seeded random projection) of the patch features
of the normal tiles. Score: each patch's Euclidean distance to its nearest bank entry
(:func:`~wsi_ad.detectors.knn.memory.nearest`, exact); the tile score is the largest patch distance s*, re-weighted
as the paper's eq. 7 the way anomalib computes it: with m_test* that patch, m* its nearest bank entry and N_b(m*) the
b = ``reweight_neighbours`` nearest bank entries of m* (m* first), s = (1 - softmax_j(|m_test* - n_j|)_{j = m*}) s*.
b = 1 gives s = s* (the weight of a one-element softmax is 0 otherwise, so b = 1 means "off" rather than the formula).
Maps: the (h, w) grid of patch distances, each cell ``image_size / w`` px of the tile.

Departures, each for a reason:

- Input: 64 px tiles at 10x (the pipeline's tiles), optionally enlarged by ``upsample`` before the backbone, instead
  of 256 px images centre-cropped to 224; efficientnet_lite0 (the only ImageNet weights shipped offline) on the CPU.
  The layer pair is a config choice: PatchCore's mid-level ``block2`` + ``block4`` (strides 4 and 8, a 16 x 16 patch
  grid on a 64 px tile; the class default) or, in ``configs/knn_cpu.yaml``, ``block7`` + ``block10`` (stride 16, a
  4 x 4 grid), which the weakly-supervised selection on real Camelyon16 patches preferred
  (``benchmarks/bench_real_patches.py``); the paper configuration names ``resnet18`` ``layer2`` + ``layer3`` (the
  paper's WideResNet-50-2 is not registered).
- Bounded memory for any number of tiles: the coreset is taken chunk by chunk (``chunk_tiles`` tiles; one chunk =
  exactly the paper's coreset), and the union of the chunks' coresets is reduced again to ``max_bank`` entries when it
  grows past twice that (a merge-and-reduce coreset; the paper holds every patch feature at once).
- The first coreset element is the random start itself (the paper's algorithm; anomalib draws the start but selects
  from the second element on). The random projection is a dense Gaussian one to ``coreset_projection_dim`` (128, the
  authors' default) and is skipped when the features have no more dimensions than that (anomalib: sparse random
  projection, Johnson-Lindenstrauss dimension for eps 0.9, which exceeds 64-d features).
- Scoring runs in float32 even under the scorer's bf16 autocast (the bank was fitted in float32; a distance to a
  bank entry of 0 must stay 0), and maps are the raw patch grid: the paper's bilinear upsampling and Gaussian blur
  (sigma 4 px) are left to the heatmap stage.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from wsi_ad.config import ConfigError
from wsi_ad.detectors.base import Detector
from wsi_ad.detectors.knn.config import KNNConfig
from wsi_ad.detectors.knn.memory import greedy_coreset, nearest
from wsi_ad.errors import WsiAdError
from wsi_ad.features.backbones import build_multilayer
from wsi_ad.tile_pool import BLOCK_TILES, to_tensor


class FeatureKNN(Detector):
    """PatchCore's memory bank (:attr:`bank`, (K, D) float32) of the frozen backbone's (:attr:`backbone`) patch
    features; score = re-weighted largest nearest-neighbour distance of a tile's patches.

    Memory of :meth:`fit`, in bytes, with n = ``chunk_tiles``, P = patches per tile (:attr:`grid` cells), D =
    :attr:`feature_dim`, d = min(D, ``coreset_projection_dim``), r = ``coreset_ratio``, M = ``max_bank``, S =
    ``image_size``: at most n·S²·3 (the chunk's uint8 tiles) + 4·(D + d + 3)·(n·P + 2·M + ⌈r·n·P⌉) + 4·M·D (the
    chunk's features and the union of coresets, each with its projection and three distance vectors while it is
    reduced, and the reduced copy), plus one batch of ``train.batch_size`` tiles through the backbone; independent of
    the number of tiles. E.g. ``configs/knn_cpu.yaml`` (n 1,024, P 16, D 192, d 128, r 0.1, M 10⁶, S 64): 0.04 GB for
    the chunk; the union grows by r·P = 1.6 entries a tile (about 0.5 GB in all at 100k tiles) and is reduced once
    it passes 2M entries (3.4 GB, a pool of about 1.25M tiles). Scoring holds the bank,
    4·K·(D + 1) bytes with K <= M, and 64 MiB distance blocks (:data:`~wsi_ad.detectors.knn.memory.SEARCH_BLOCK`).
    """

    name = "knn"
    summary = ("Feature kNN (PatchCore): coreset memory bank of mid-level ImageNet patch features, "
               "re-weighted largest nearest-neighbour distance")
    paper = ("Roth et al., Towards Total Recall in Industrial Anomaly Detection (CVPR 2022); "
             "official code amazon-science/patchcore-inspection, checked against anomalib's PatchCore")
    config_class = KNNConfig
    score_units = ("Euclidean distance of the tile's most distant patch feature to the memory bank, "
                   "re-weighted by PatchCore's neighbourhood softmax (feature units, >= 0)")
    map_reduction = "per backbone patch: Euclidean distance of its feature to the nearest memory-bank entry"
    search_parameters: ClassVar[dict[str, str]] = {
        "coreset_ratio": "coreset_ratio", "reweight_neighbours": "reweight_neighbours", "upsample": "upsample",
        "backbone": "backbone", "embed_dim": "embed_dim",
    }
    #: ``wsi-ad tune``'s default space: the coreset ratios the paper reports most (1% and 10%) at the magnifications the
    #: DPA paper allowed (PatchCore selected nothing on anomalies: it is unsupervised).
    default_search_space: ClassVar[dict[str, Any]] = {
        "mode": "grid", "space": {"coreset_ratio": [0.01, 0.1], "magnification": ["10x", "20x"]},
    }

    def __init__(self, config, device="cpu"):
        super().__init__(config, device)
        s: KNNConfig = config.section
        self.section = s
        self.backbone = build_multilayer(s.backbone, tuple(s.layers), weights=s.backbone_weights,
                                         download=s.download_weights).to(self.device)
        with torch.no_grad():
            probe = self.features(torch.zeros(1, 3, s.image_size, s.image_size, device=self.device))
        #: (h, w) patch grid of one tile, and the length D of a patch feature.
        self.grid = (int(probe.shape[1]), int(probe.shape[2]))
        self.feature_dim = int(probe.shape[3])
        if s.image_size % self.grid[0] or s.image_size % self.grid[1]:
            raise ConfigError(f"{self.name}: the {self.grid[0]}x{self.grid[1]} patch grid of {s.layers[0]} at upsample "
                              f"{s.upsample} does not tile {s.image_size} px tiles evenly; lower upsample")
        self.bank = torch.zeros(0, self.feature_dim, device=self.device)
        self._bank_norms = torch.zeros(0, device=self.device)
        self.fit_tiles = 0
        self.fit_patches = 0

    # -- features -------------------------------------------------------------------------------------

    @property
    def patches_per_tile(self) -> int:
        return self.grid[0] * self.grid[1]

    def features(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float in [-1, 1] -> (B, h, w, D) float32 patch features (module docstring), no gradient."""
        s = self.section
        with torch.no_grad():
            x = tiles.float()
            if s.upsample > 1:
                x = F.interpolate(x, scale_factor=s.upsample, mode="bilinear", align_corners=False)
            maps = list(self.backbone(x).values())
            shallow = F.avg_pool2d(maps[0].float(), 3, stride=1, padding=1)
            deep = F.avg_pool2d(maps[1].float(), 3, stride=1, padding=1)
            deep = F.interpolate(deep, size=shallow.shape[-2:], mode="bilinear", align_corners=False)
            parts = [shallow.permute(0, 2, 3, 1), deep.permute(0, 2, 3, 1)]            # (B, h, w, C_layer)
            if s.embed_dim is None:
                return torch.cat(parts, dim=3).contiguous()
            b, h, w = parts[0].shape[:3]
            pooled = [F.adaptive_avg_pool1d(p.reshape(-1, 1, p.shape[3]), s.embed_dim) for p in parts]
            joined = F.adaptive_avg_pool1d(torch.cat(pooled, dim=2), s.embed_dim)
            return joined.reshape(b, h, w, s.embed_dim)

    # -- fit ------------------------------------------------------------------------------------------

    def _seed(self, *keys: int) -> int:
        return int(np.random.SeedSequence([int(self.config.train.seed), 0x6B6E6E, *keys]).generate_state(1)[0])

    def _fit_blocks(self, pool) -> list[tuple[int, int, int]]:
        """(source index, start, stop) read blocks of the fit tiles, in source order: every tile of ``pool.sources``,
        or (``max_fit_tiles``) seeded random blocks of :data:`~wsi_ad.tile_pool.BLOCK_TILES` tiles up to that many."""
        blocks = [(i, start, min(start + BLOCK_TILES, len(src))) for i, src in enumerate(pool.sources)
                  for start in range(0, len(src), BLOCK_TILES)]
        limit = self.section.max_fit_tiles
        if limit is None or limit >= sum(stop - start for _, start, stop in blocks):
            return blocks
        rng = np.random.default_rng([int(self.config.train.seed), 0x6B6E6E, 1])
        chosen, count = [], 0
        for b in rng.permutation(len(blocks)):
            i, start, stop = blocks[b]
            stop = min(stop, start + limit - count)
            chosen.append((int(b), (i, start, stop)))
            count += stop - start
            if count >= limit:
                break
        return [block for _, block in sorted(chosen)]

    def _reduce(self, features: torch.Tensor, size: int, key: int) -> torch.Tensor:
        index = greedy_coreset(features, size, self._seed(2, key), self.section.coreset_projection_dim)
        return features[index]

    def fit(self, pool) -> None:
        """Build the memory bank from the normal tiles of ``pool.sources`` (see :class:`KNNConfig` and the class
        docstring for the memory bound): the chunks' patch features in ``train.batch_size`` batches, each chunk's
        coreset of ⌈``coreset_ratio`` x its patches⌉ entries, the union reduced to ``max_bank`` entries. Every random
        choice is a function of ``train.seed``. Raises :class:`~wsi_ad.errors.WsiAdError` when the pool has no tiles."""
        s = self.section
        blocks = self._fit_blocks(pool)
        if not blocks:
            raise WsiAdError("the knn memory bank needs normal tiles; the training pool has none")
        union: list[torch.Tensor] = []        # the chunks' coresets since the last reduction
        reductions, chunks, tiles = 0, 0, 0
        chunk: list[np.ndarray] = []

        def reduce_union() -> None:
            nonlocal reductions
            merged = torch.cat(union)
            union.clear()                       # only the merged copy is held while it is reduced
            union.append(self._reduce(merged, s.max_bank, 1_000_000 + reductions))
            reductions += 1

        def flush() -> None:
            nonlocal chunks
            feats = self._chunk_features(chunk)
            chunk.clear()
            union.append(self._reduce(feats, math.ceil(s.coreset_ratio * len(feats)), chunks))
            del feats
            chunks += 1
            if sum(len(u) for u in union) > 2 * s.max_bank:
                reduce_union()

        for b, (i, start, stop) in enumerate(blocks):
            rng = np.random.default_rng([int(self.config.train.seed), 0x6B6E6E, 3, b])
            part = pool.sources[i].read(start, stop, rng)
            tiles += len(part)
            while len(part):                    # chunks of exactly chunk_tiles tiles (the last one fewer)
                room = s.chunk_tiles - sum(len(c) for c in chunk)
                chunk.append(part[:room])
                part = part[room:]
                if sum(len(c) for c in chunk) == s.chunk_tiles:
                    flush()
        if chunk:
            flush()
        if sum(len(u) for u in union) > s.max_bank:
            reduce_union()
        self._set_bank(torch.cat(union))
        self.fit_tiles, self.fit_patches = tiles, tiles * self.patches_per_tile

    def _chunk_features(self, parts: list[np.ndarray]) -> torch.Tensor:
        """(n·P, D) float32 patch features of the uint8 tiles of ``parts`` ((n_i, S, S, 3) each), computed in batches
        of at most ``train.batch_size`` tiles into one preallocated tensor."""
        batch, per_tile = self.config.train.batch_size, self.patches_per_tile
        out = torch.empty(sum(len(p) for p in parts) * per_tile, self.feature_dim, device=self.device)
        row = 0
        for tiles in parts:
            for j in range(0, len(tiles), batch):
                feats = self.features(to_tensor(tiles[j : j + batch], self.device)).reshape(-1, self.feature_dim)
                out[row : row + len(feats)] = feats
                row += len(feats)
        return out

    def _set_bank(self, bank: torch.Tensor) -> None:
        self.bank = bank.float().contiguous().to(self.device)
        self._bank_norms = self.bank.pow(2).sum(1)

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.detach().cpu().contiguous(), "feature_dim": self.feature_dim,
                "grid": list(self.grid), "fit_tiles": int(self.fit_tiles), "fit_patches": int(self.fit_patches),
                "coreset_seed": int(self.config.train.seed)}

    def load_state_dict(self, state: dict[str, Any], training_state: dict[str, Any] | None = None) -> None:
        bank = state["bank"]
        if bank.ndim != 2 or int(bank.shape[1]) != self.feature_dim:
            raise ValueError(f"memory bank of shape {tuple(bank.shape)}; this config's features are "
                             f"{self.feature_dim}-d")
        self._set_bank(bank)
        self.fit_tiles, self.fit_patches = int(state.get("fit_tiles", 0)), int(state.get("fit_patches", 0))

    # -- scoring --------------------------------------------------------------------------------------

    @property
    def map_shape(self) -> tuple[int, int]:
        return self.grid

    def patch_distances(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h, w, D) features -> ((B, h·w) float32 distance of every patch to its nearest bank entry, (B, h·w)
        int64 that entry's index). :class:`~wsi_ad.errors.WsiAdError` before :meth:`fit` (an empty bank)."""
        if len(self.bank) == 0:
            raise WsiAdError("the knn detector has an empty memory bank (fit it, or load a fitted checkpoint)")
        b = features.shape[0]
        dist, index = nearest(features.reshape(-1, self.feature_dim), self.bank, 1, self._bank_norms)
        return dist.view(b, -1), index.view(b, -1)

    def _neighbourhood(self, entries: torch.Tensor, size: int) -> torch.Tensor:
        """(B, ``size``) int64: bank entries ``entries`` (B,) first, then the nearest other entries of each (the paper's
        N_b(m*); the entry itself is put first even where float32 rounding of the search would tie it with an equal
        row)."""
        _, found = nearest(self.bank[entries], self.bank, size, self._bank_norms)
        candidates = torch.cat([entries[:, None], found], dim=1)                           # (B, size + 1)
        keep = torch.ones_like(candidates, dtype=torch.bool)
        again = found == entries[:, None]
        keep[:, 1:] &= ~again
        keep[:, -1] &= again.any(1)             # not found again: drop the farthest instead
        return candidates[keep].view(len(entries), size)

    def score_batch(self, tiles: torch.Tensor, pixel_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,) float32 re-weighted largest patch distance; maps (B, h, w) float32 patch distances (module
        docstring). Float32 throughout, whatever autocast is active."""
        with torch.autocast(self.device.type, enabled=False):
            features = self.features(tiles)
            flat = features.reshape(len(tiles), -1, self.feature_dim)
            dist, index = self.patch_distances(features)
            s_star, worst = dist.max(1)
            score = s_star
            neighbours = min(self.section.reweight_neighbours, len(self.bank))
            if neighbours > 1:
                rows = torch.arange(len(tiles), device=dist.device)
                m_star = index[rows, worst]
                support = self._neighbourhood(m_star, neighbours)                                  # (B, b), m* first
                test = flat[rows, worst]                                                           # (B, D)
                distances = (test[:, None, :] - self.bank[support]).norm(dim=2)
                score = (1.0 - torch.softmax(distances, dim=1)[:, 0]) * s_star
            maps = dist.view(len(tiles), *self.grid) if pixel_maps else None
        return score.float(), maps
