"""Per-tile anomaly scores from a trained checkpoint of any detector (inference only: the training loop is
never imported here).

A :class:`Scorer` holds the checkpoint's detector in eval mode and feeds it uint8 tiles as (B, 3, S, S)
float32 in [-1, 1]. Runs on cuda (bf16 autocast, the detector's channels_last) when available, else on
the CPU (float32; bf16 autocast on request, :meth:`Scorer.set_precision`). Optionally per-pixel maps, at
the detector's map resolution (:attr:`Scorer.map_shape`).

Store-level scoring (resumable, prefetched) lives in :mod:`wsi_ad.scoring`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from wsi_ad.detectors.checkpoint import detector_from_payload, load_checkpoint, model_id
from wsi_ad.tile_pool import to_tensor


class Scorer:
    """A trained detector ready to score tiles. Build with :func:`load_scorer`.

    Attributes: ``detector`` (the :class:`~wsi_ad.detectors.base.Detector`), ``config``, ``model_id``
    (``<detector>-<hash>``, names ``scores/<model_id>``), ``image_size`` (px the tiles must have),
    ``magnification`` (the training tiles' magnification), ``units`` (what a score means), ``device``,
    ``checkpoint`` (the file it was loaded from, when known), ``precision`` (``"fp32"`` or ``"bf16"``).
    """

    def __init__(self, payload: dict, device: str | torch.device | None = None,
                 backbone_weights: str | os.PathLike | None = None, amp: bool = True,
                 checkpoint: str | os.PathLike | None = None):
        self.detector, self.config = detector_from_payload(payload, device, backbone_weights)
        self.model_id = model_id(payload)
        spec = self.detector.input_spec
        self.image_size = spec.tile_px
        self.magnification = spec.magnification
        self.units = self.detector.score_units
        self.device = self.detector.device
        self.checkpoint = str(checkpoint) if checkpoint is not None else None
        self._map_shape: tuple[int, int] | None = None
        self.set_precision("bf16" if self.device.type == "cuda" and amp else "fp32")

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
    def map_shape(self) -> tuple[int, int]:
        """(h, w) of a per-pixel map of one ``image_size`` px tile, each cell covering ``image_size / w`` px."""
        if self._map_shape is None:
            with self.inference():
                self._map_shape = self.detector.map_shape
        return self._map_shape

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """No gradients and, on the CPU, denormals flushed to zero (~4x faster on tiny convolutions) for the
        duration; :meth:`score` uses it, callers of :meth:`score_batch` should."""
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
        ``(scores, maps)``, maps (N, h, w) float32 (:attr:`map_shape`). ValueError for tiles of another shape."""
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[1:] != (self.image_size, self.image_size, 3) or tiles.dtype != np.uint8:
            raise ValueError(f"tiles must be (N, {self.image_size}, {self.image_size}, 3) uint8, got {tiles.shape} {tiles.dtype}")
        out = np.empty(len(tiles), dtype=np.float32)
        maps = np.empty((len(tiles), *self.map_shape), dtype=np.float32) if pixel_maps else None
        with self.inference():
            for start in range(0, len(tiles), batch_size):
                score, pmap = self._forward(to_tensor(tiles[start : start + batch_size], self.device), pixel_maps)
                out[start : start + len(score)] = score.cpu().numpy()
                if maps is not None:
                    maps[start : start + len(score)] = pmap.cpu().numpy()
        return (out, maps) if pixel_maps else out

    def score_batch(self, tiles: torch.Tensor, pixel_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One batch: (B, S, S, 3) uint8 tensor, on any device (a pinned CPU tensor is copied to the GPU
        without blocking) -> ((B,) float32 scores, (B, h, w) float32 maps or None), on ``device``.
        Call inside :meth:`inference`."""
        x = tiles.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return self._forward(x, pixel_maps)

    def _forward(self, x: torch.Tensor, pixel_maps: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self._autocast():
            score, pmap = self.detector.score_batch(x, pixel_maps)
        return score.float(), (pmap.float() if pmap is not None else None)


def load_scorer(path: str | os.PathLike, device: str | torch.device | None = None,
                backbone_weights: str | os.PathLike | None = None) -> Scorer:
    """Load a checkpoint written by ``wsi-ad train`` (complete or not, any detector) as a :class:`Scorer`.
    Raises :class:`~wsi_ad.detectors.checkpoint.CheckpointError` for an unusable file."""
    return Scorer(load_checkpoint(path), device=device, backbone_weights=backbone_weights, checkpoint=Path(path).resolve())


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
