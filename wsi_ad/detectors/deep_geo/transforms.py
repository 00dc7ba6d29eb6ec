"""The 72 geometric transformations of Deep GEO (Golan & El-Yaniv 2018, as the official code builds them:
``ninatu/anomaly_detection`` ``deep_geo/transformations.py``, ``shared/METHODS.md`` §6), as pixel index maps.

Transformation ``i`` is the ``i``-th of every combination, in this order (the last one varying fastest), of a
horizontal flip {no, yes}, a shift ``tx`` in {0, -t, +t}, a shift ``ty`` in {0, -t, +t} and a counter-clockwise
rotation by {0, 90, 180, 270}°: ``i = 36 flip + 12 tx_index + 4 ty_index + k``. They are applied in the official
order: flip the columns (NumPy's ``fliplr``), shift (Keras' ``apply_affine_transform(tx, ty, fill_mode="reflect")``:
output pixel (r, c) is input pixel (r + tx, c + ty), positions outside the image reflected about its edge,
``d c b a | a b c d | d c b a``), rotate (NumPy's ``rot90`` on the rows and columns).

Every step moves whole pixels (integer shifts with Keras' bilinear interpolation land exactly on pixels), so a
transformation is one index map: output pixel p takes input pixel ``index[i, p]``. Flips and rotations are
permutations (invertible); a shift by t px discards t rows (columns) and fills them with a mirror of the rows next to
the edge, so transformations with a shift are not invertible on the whole tile (they are on the kept part). The 72
maps are distinct. Depending on the Keras version, ``tx`` moves rows (as here) or columns; either way the set of 72
transformations is the same and only their numbering changes, which a classifier trained from scratch does not see.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

#: Number of transformations.
NUM_TRANSFORMS = 72


def transform_parameters(shift_px: int) -> list[tuple[bool, int, int, int]]:
    """(flip, tx px, ty px, quarter turns) of each transformation, in index order (module docstring)."""
    shifts = (0, -shift_px, shift_px)
    return [(bool(flip), tx, ty, k) for flip, tx, ty, k in itertools.product((False, True), shifts, shifts, range(4))]


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Positions reflected about the image edges (half-sample symmetric: -1 -> 0, size -> size - 1), for offsets of
    at most ``size`` px outside."""
    index = np.where(index < 0, -index - 1, index)
    return np.where(index >= size, 2 * size - 1 - index, index)


def index_maps(size: int, shift_px: int) -> np.ndarray:
    """(72, size * size) int64: for each transformation, the flat input pixel of each flat output pixel of a
    ``size`` x ``size`` image. ValueError when the shift is not below the size."""
    if not 0 <= shift_px < size:
        raise ValueError(f"shift_px must be in [0, {size}) for {size} px images, got {shift_px}")
    base = np.arange(size * size, dtype=np.int64).reshape(size, size)
    line = np.arange(size)
    maps = []
    for flip, tx, ty, k in transform_parameters(shift_px):
        index = base[:, ::-1] if flip else base
        if tx or ty:
            index = index[_reflect(line + tx, size)][:, _reflect(line + ty, size)]
        maps.append(np.rot90(index, k).reshape(-1))
    return np.stack(maps)


def apply_transforms(x: torch.Tensor, maps: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Transform each image of ``x`` (B, C, S, S) by its transformation ``which`` (B,) int64, with ``maps`` the
    :func:`index_maps` of S px on ``x``'s device: (B, C, S, S), a copy."""
    b, c, h, w = x.shape
    index = maps[which].unsqueeze(1).expand(b, c, h * w)
    return torch.gather(x.reshape(b, c, h * w), 2, index).reshape(b, c, h, w)


def all_transforms(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Every transformation of every image of ``x`` (B, C, S, S): (B * 72, C, S, S), image by image, each image's
    72 copies in index order."""
    which = torch.arange(len(maps), device=x.device).repeat(len(x))
    return apply_transforms(x.repeat_interleave(len(maps), dim=0), maps, which)
