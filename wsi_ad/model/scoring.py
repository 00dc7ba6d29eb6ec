"""Per-tile anomaly scores from a trained checkpoint: the relative perceptual L1 of each tile's reconstruction.

The score is the training loss at full size (alpha = 1), per tile, unitless (higher = more anomalous).
Each input's backbone features are computed once per tile. Runs on cuda (bf16 autocast, channels_last)
when available, else on the CPU (float32; bf16 autocast on request, :meth:`Scorer.set_precision`).

Optionally per-pixel maps (the paper's pixel-wise reduction): per feature cell, the channel mean of
|f̂(x) − f̂(x̃)| divided by the tile's mean |f̂(x)|, so that a map's mean is the tile's score. A map has the
feature layer's resolution (:attr:`Scorer.feature_shape`), e.g. 4 x 4 cells of 16 x 16 input px each for
efficientnet_lite0 block 7 at 64 px, 8 x 8 cells of 8 px for vgg19 relu4_2.

Store-level scoring (resumable, prefetched) lives in :mod:`wsi_ad.scoring`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from wsi_ad.config import Config
from wsi_ad.model.autoencoder import ProgressiveAutoencoder
from wsi_ad.model.backbones import build_backbone
from wsi_ad.model.checkpoint import load_checkpoint, model_id
from wsi_ad.model.data import to_tensor
from wsi_ad.model.perceptual import PerceptualLoss, relative_l1


class Scorer:
    """A trained DPA ready to score tiles. Build with :func:`load_scorer`.

    Attributes: ``model_id`` (stable id for ``scores/<model_id>``), ``image_size`` (px the tiles must
    have), ``magnification`` (the training tiles' magnification), ``device``, ``checkpoint`` (the file it
    was loaded from, when known), ``precision`` (``"fp32"`` or ``"bf16"`` autocast).
    """

    def __init__(self, payload: dict, device: str | torch.device | None = None,
                 backbone_weights: str | os.PathLike | None = None, download: bool = False, amp: bool = True,
                 checkpoint: str | os.PathLike | None = None):
        from wsi_ad.model.trainer import autoencoder_config, select_device

        self.config = Config.from_dict(payload["config"])
        self.model_id = model_id(payload)
        self.image_size = self.config.model.image_size
        self.magnification = self.config.data.magnification
        self.device = select_device("auto") if device is None else torch.device(device)
        cuda = self.device.type == "cuda"
        self.model = ProgressiveAutoencoder(autoencoder_config(self.config))
        self.model.load_state_dict(payload["model"])
        size = self.image_size
        stats = payload["feature_stats"][str(size)]
        extractor = build_backbone(self.config.backbone.name, (size,),
                                   weights=backbone_weights or self.config.backbone.weights, download=download,
                                   layers=self.config.backbone.layers)
        self.loss = PerceptualLoss(extractor, {size: (stats["mean"], stats["std"])})
        self.model.eval().to(self.device)
        self.loss.eval().to(self.device)
        self.channels_last = cuda
        if cuda:
            self.model.to(memory_format=torch.channels_last)
            self.loss.to(memory_format=torch.channels_last)
        self.checkpoint = str(checkpoint) if checkpoint is not None else None
        self._feature_shape: tuple[int, int, int] | None = None
        self.set_precision("bf16" if cuda and amp else "fp32")

    def set_precision(self, precision: str) -> None:
        """``"fp32"`` (float32 throughout) or ``"bf16"`` (bfloat16 autocast on this device: the default on
        cuda; on the CPU for comparison only, see benchmarks/bench_score.py). Scores are float32 either way."""
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision
        if precision == "bf16":
            device_type = self.device.type
            self._autocast = lambda: torch.autocast(device_type, dtype=torch.bfloat16)
        else:
            self._autocast = contextlib.nullcontext

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the backbone feature map of one ``image_size`` px tile: a pixel map is (h, w), each
        cell covering ``image_size / w`` input px."""
        if self._feature_shape is None:
            with torch.no_grad():
                x = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
                self._feature_shape = tuple(int(v) for v in self.loss.features(x).shape[1:])
        return self._feature_shape

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """No gradients and, on the CPU, denormals flushed to zero (see trainer: ~4x faster on tiny convs)
        for the duration; :meth:`score` uses it, callers of :meth:`score_batch` should."""
        flush = self.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            with torch.no_grad():
                yield
        finally:
            if flush:
                torch.set_flush_denormal(False)

    def score(self, tiles: np.ndarray, batch_size: int = 256, pixel_maps: bool = False
              ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """(N, S, S, 3) uint8 tiles (S = ``image_size``) -> (N,) float32 anomaly scores; with ``pixel_maps``
        ``(scores, maps)``, maps (N, h, w) float32 at the feature map's resolution (mean of a map = score)."""
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[1:] != (self.image_size, self.image_size, 3) or tiles.dtype != np.uint8:
            raise ValueError(f"tiles must be (N, {self.image_size}, {self.image_size}, 3) uint8, got {tiles.shape} {tiles.dtype}")
        out = np.empty(len(tiles), dtype=np.float32)
        maps = np.empty((len(tiles), *self.feature_shape[1:]), dtype=np.float32) if pixel_maps else None
        with self.inference():
            self._score_into(tiles, out, batch_size, maps)
        return (out, maps) if pixel_maps else out

    def _score_into(self, tiles: np.ndarray, out: np.ndarray, batch_size: int, maps: np.ndarray | None = None) -> None:
        for start in range(0, len(tiles), batch_size):
            x = to_tensor(tiles[start : start + batch_size], self.device)
            score, pmap = self._forward(x, maps is not None)
            out[start : start + len(x)] = score.cpu().numpy()
            if maps is not None:
                maps[start : start + len(x)] = pmap.cpu().numpy()

    def score_batch(self, tiles: torch.Tensor, pixel_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One batch: (B, S, S, 3) uint8 tensor, on any device (a pinned CPU tensor is copied to the GPU
        without blocking) -> ((B,) float32 scores, (B, h, w) float32 maps or None), on ``device``.
        Call inside :meth:`inference`."""
        x = tiles.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return self._forward(x, pixel_maps)

    def _forward(self, x: torch.Tensor, pixel_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, S, S) in [-1, 1] on ``device`` -> float32 scores (B,) and, optionally, maps (B, h, w)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            target = self.loss.features(x)            # the input's features, once per tile
            recon = self.model(x, self.image_size, 1.0)
            recon_features = self.loss.features(recon)
            score = relative_l1(target, recon_features).float()
            pmap = None
            if pixel_maps:
                den = target.abs().mean(dim=(1, 2, 3)).float()
                pmap = (target - recon_features).abs().mean(dim=1).float() / (den + 1e-8).view(-1, 1, 1)
        return score, pmap


def load_scorer(path: str | os.PathLike, device: str | torch.device | None = None,
                backbone_weights: str | os.PathLike | None = None, download: bool = False) -> Scorer:
    """Load a checkpoint written by ``wsi-ad train`` (complete or not) as a :class:`Scorer`."""
    return Scorer(load_checkpoint(path), device=device, backbone_weights=backbone_weights, download=download,
                  checkpoint=Path(path).resolve())


def iter_store_batches(store, magnification: str, batch_size: int = 512) -> Iterator[tuple[int, np.ndarray]]:
    """(start index, (n, S, S, 3) uint8) batches of a slide store's ``tiles/<magnification>``, in order."""
    from wsi_ad.store import SlideStore

    if not isinstance(store, SlideStore):
        store = SlideStore.open(store)
    array = store.require("tiles")[magnification]
    for start in range(0, array.shape[0], batch_size):
        yield start, np.asarray(array[start : start + batch_size])


def score_store(store, scorer: Scorer, magnification: str | None = None, batch_size: int = 512) -> np.ndarray:
    """(N,) float32 scores of every tile of a slide store (path or ``SlideStore``), streamed in fixed batches
    of ``batch_size`` tiles (memory does not grow with the slide). ``magnification`` defaults to the
    training magnification."""
    magnification = magnification or scorer.magnification
    parts = [scorer.score(tiles, batch_size=batch_size) for _, tiles in iter_store_batches(store, magnification, batch_size)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
