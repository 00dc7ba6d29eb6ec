"""Per-tile anomaly scores → a 2-D heatmap on the tile grid, and one score per slide.

Geometry (all coordinates level-0 pixels, top-left, x then y, unless a name says otherwise):

* heatmap cell ``(row, col)`` is tile-grid cell ``(row, col)`` of the store's ``tiles/grid``; its top-left is
  ``origin_level0 + (col * level0_per_cell[0], row * level0_per_cell[1])`` (``level0_per_cell`` is the
  grid's ``stride0``, possibly fractional) and it covers ``tile0`` level-0 pixels (x, y) from there;
* cells without a tile (off tissue) are NaN;
* one cell is ``um_per_cell = level0_per_cell * (mpp_x, mpp_y)`` micrometres.

Slide-level score (:func:`slide_score`): ``"max"``, ``"topk_mean"`` (mean of the ``k`` highest cells),
``"percentile"`` (the ``q``-th percentile of the cells) or ``"fraction_above"`` (fraction of cells >=
``threshold``), taken by :func:`heatmap_slide_score` over the heatmap's interior: the tissue rim of
``edge_cells`` cells is left out.

The defaults (``topk_mean``, ``k = 3``, ``edge_cells = 2``) were chosen by measurement
(``benchmarks/bench_reducers.py`` -> ``benchmarks/results/slide_reducers.json``): 5 normal and 5 tumour
synthetic slides (8192 px at 0.243 µm/px; lesions of 0.25-1.0 mm; both stain "hospitals"; pen ink on two
normal slides), scored by the tests' small CPU model; every reducer with k in {3, 5, 10, 25, 50}, q in
{95, 99, 99.5}, thresholds calibrated on a held-out normal slide, rims of 0/1/2 cells, and with/without a
100 µm smoothing; separation = slide AUC and the gap ``(min tumour - max normal) / std(normal)``.

* The rim matters most. Tile scores anti-correlate with the tile's tissue fraction (r = -0.3 to -0.7):
  tissue-edge tiles are the highest-scoring tiles of normal slides. Over all cells no reducer exceeds AUC
  0.88 (``max``: 0.80; ``topk_mean`` k=5: 0.68); leaving a 1-cell rim out gives AUC 0.92-1.0, a 2-cell
  rim (~125 µm at 10x) 0.96-1.0.
* On the interior, ``topk_mean`` with a small k separates best (k=3: AUC 1.0, gap +0.57 std; k=5: 1.0,
  +0.42); ``max`` is driven by one outlier tile (AUC 0.96, gap -0.43); a high percentile dilutes a 0.25 mm
  lesion (~8 of ~290 tiles) into the normal tail (q=99: AUC 1.0, gap +0.03); ``fraction_above`` depends on a
  per-model threshold calibration and separated worst (AUC <= 0.64); smoothing (100 µm) did not help.
* Caveat: metastases often start in the subcapsular sinus, at the tissue edge. The rim is left out of the
  *slide score* only (the heatmap, overlays and exports keep every cell); on real slides re-measure, or
  pass ``edge_cells=0``.

Smoothing (:func:`smooth_heatmap`, off by default) is a NaN-aware Gaussian whose sigma is given in µm, so it
means the same at any tile size and scan resolution.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from wsi_ad.errors import WsiAdError
from wsi_ad.store import SlideStore, config_hash

#: Bump when the heatmap computation changes in a way that should invalidate stored heatmaps.
HEATMAP_STAGE_VERSION = 1

#: Slide-level reducers (see the module docstring).
REDUCERS = ("max", "topk_mean", "percentile", "fraction_above")
#: Default reducer, chosen by measurement (module docstring; benchmarks/results/slide_reducers.json).
DEFAULT_REDUCER = "topk_mean"
#: Default k of ``topk_mean`` (cells), measured with the reducer.
DEFAULT_K = 3
#: Default q of ``percentile`` (percent).
DEFAULT_Q = 99.0
#: Default rim of tissue (in cells) left out of the slide score: tissue-edge tiles score high on normal tissue.
DEFAULT_EDGE_CELLS = 2

#: What the heatmap values are, when the score stage does not say.
SCORE_UNITS = "anomaly score (unitless)"


class HeatmapError(WsiAdError):
    """Bad input to the heatmap stage: mismatched arrays, an unknown reducer, a missing scores stage."""


# -- tile scores -> grid ---------------------------------------------------------------------------

def tile_grid(grid: np.ndarray, scores: np.ndarray, grid_shape: tuple[int, int]) -> np.ndarray:
    """Place per-tile ``scores`` on the tile grid.

    Args:
        grid: (N, 2) integer (row, col) of each tile (``tiles/grid``).
        scores: (N,) scores in the same order.
        grid_shape: (rows, cols) of the full grid (``TileGeometry.grid_shape``).

    Returns:
        (rows, cols) float32, ``scores[i]`` at ``grid[i]``, NaN where there is no tile.

    Raises:
        HeatmapError: mismatched lengths, cells outside the grid, or a cell given twice.
    """
    grid = np.asarray(grid)
    scores = np.asarray(scores)
    rows, cols = (int(v) for v in grid_shape)
    if rows < 0 or cols < 0:
        raise HeatmapError(f"grid_shape must be non-negative, got {grid_shape}")
    if grid.ndim != 2 or grid.shape[1] != 2:
        raise HeatmapError(f"grid must be (N, 2) row/col, got shape {grid.shape}")
    if scores.ndim != 1 or len(scores) != len(grid):
        raise HeatmapError(f"scores must be (N,) with N = {len(grid)} tiles, got shape {scores.shape}")
    if grid.size and not np.issubdtype(grid.dtype, np.integer):
        raise HeatmapError(f"grid must hold integers, got {grid.dtype}")
    out = np.full((rows, cols), np.nan, dtype=np.float32)
    if not len(grid):
        return out
    r, c = grid[:, 0].astype(np.int64), grid[:, 1].astype(np.int64)
    outside = (r < 0) | (r >= rows) | (c < 0) | (c >= cols)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise HeatmapError(f"{int(outside.sum())} tiles lie outside the {rows} x {cols} grid "
                           f"(first: tile {i} at row {r[i]}, col {c[i]})")
    flat = r * cols + c
    if len(np.unique(flat)) != len(flat):
        raise HeatmapError("the tile grid names the same cell more than once")
    out.ravel()[flat] = scores.astype(np.float32)
    return out


# -- smoothing -------------------------------------------------------------------------------------

def smooth_heatmap(values: np.ndarray, sigma_um: float, um_per_cell: tuple[float, float]) -> np.ndarray:
    """NaN-aware Gaussian smoothing of a heatmap with a sigma in micrometres.

    Each cell becomes the Gaussian-weighted mean of the *valid* (finite) cells around it
    (normalized convolution: ``G*(v·m) / G*m``), so off-tissue cells neither pull scores down nor get
    filled: NaN cells stay NaN. ``um_per_cell`` is (x, y) µm per cell; ``sigma_um`` > 0.
    """
    if not (isinstance(sigma_um, int | float) and math.isfinite(sigma_um) and sigma_um > 0):
        raise HeatmapError(f"smoothing sigma must be a positive number of µm, got {sigma_um!r}")
    values = np.asarray(values, dtype=np.float32)
    valid = np.isfinite(values)
    sigma = (sigma_um / um_per_cell[1], sigma_um / um_per_cell[0])     # (rows, cols) in cells
    weight = ndi.gaussian_filter(valid.astype(np.float64), sigma, mode="constant", cval=0.0)
    total = ndi.gaussian_filter(np.where(valid, values, 0.0).astype(np.float64), sigma, mode="constant", cval=0.0)
    out = np.full(values.shape, np.nan, dtype=np.float32)
    ok = valid & (weight > 1e-12)
    out[ok] = (total[ok] / weight[ok]).astype(np.float32)
    return out


# -- slide-level score -----------------------------------------------------------------------------

def _check_reducer(reducer: str, k: int, q: float, threshold: float | None) -> None:
    if reducer not in REDUCERS:
        raise HeatmapError(f"unknown reducer {reducer!r}; choose one of {', '.join(REDUCERS)}")
    if reducer == "topk_mean" and (not isinstance(k, int | np.integer) or k < 1):
        raise HeatmapError(f"topk_mean needs an integer k >= 1, got {k!r}")
    if reducer == "percentile" and not (isinstance(q, int | float) and 0.0 <= q <= 100.0):
        raise HeatmapError(f"percentile needs q in [0, 100], got {q!r}")
    if reducer == "fraction_above" and (threshold is None or not math.isfinite(float(threshold))):
        raise HeatmapError("fraction_above needs a finite threshold (e.g. a high percentile of normal tile scores)")


def reducer_params(reducer: str, k: int = DEFAULT_K, q: float = DEFAULT_Q,
                   threshold: float | None = None) -> dict[str, Any]:
    """The parameters that matter for ``reducer`` (JSON-ready), e.g. ``{"k": 5}`` for ``topk_mean``."""
    _check_reducer(reducer, k, q, threshold)
    return {"max": {}, "topk_mean": {"k": int(k)}, "percentile": {"q": float(q)},
            "fraction_above": {"threshold": None if threshold is None else float(threshold)}}[reducer]


def slide_score(scores: np.ndarray, reducer: str = DEFAULT_REDUCER, *, k: int = DEFAULT_K, q: float = DEFAULT_Q,
                threshold: float | None = None) -> float:
    """One score per slide from its tile (or heatmap cell) scores; NaN values are ignored.

    Args:
        scores: any-shape array of scores (e.g. (N,) tile scores or a 2-D heatmap with NaN off tissue).
        reducer: ``"max"``, ``"topk_mean"`` (mean of the ``k`` highest; all of them when fewer),
            ``"percentile"`` (``q``-th percentile, linear interpolation) or ``"fraction_above"`` (fraction
            of scores >= ``threshold``, in [0, 1]).

    Returns:
        The slide score (same units as ``scores``; a fraction for ``fraction_above``); NaN when there
        are no finite scores (a slide without tissue tiles).
    """
    _check_reducer(reducer, k, q, threshold)
    values = np.asarray(scores, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan")
    if reducer == "max":
        return float(values.max())
    if reducer == "topk_mean":
        k = min(int(k), len(values))
        return float(np.partition(values, len(values) - k)[len(values) - k:].mean())
    if reducer == "percentile":
        return float(np.percentile(values, q))
    return float(np.count_nonzero(values >= float(threshold)) / len(values))


def interior_cells(values: np.ndarray, edge_cells: int = DEFAULT_EDGE_CELLS) -> np.ndarray:
    """(rows, cols) bool: scored cells at least ``edge_cells`` cells (4-connected steps) away from any unscored
    cell or the grid border, i.e. the scored area eroded by ``edge_cells``; all scored cells when 0."""
    if not isinstance(edge_cells, int | np.integer) or edge_cells < 0:
        raise HeatmapError(f"edge_cells must be an integer >= 0, got {edge_cells!r}")
    valid = np.isfinite(np.asarray(values))
    if edge_cells == 0 or not valid.any():
        return valid
    return ndi.binary_erosion(valid, iterations=int(edge_cells), border_value=0)


def heatmap_slide_score(values: np.ndarray, reducer: str = DEFAULT_REDUCER, *, k: int = DEFAULT_K, q: float = DEFAULT_Q,
                        threshold: float | None = None, edge_cells: int = DEFAULT_EDGE_CELLS) -> float:
    """:func:`slide_score` of a 2-D heatmap over its :func:`interior_cells` (the tissue rim of ``edge_cells``
    cells left out); over all scored cells when the tissue is too thin to have an interior."""
    values = np.asarray(values, dtype=np.float32)
    interior = interior_cells(values, edge_cells)
    chosen = values[interior] if interior.any() else values
    return slide_score(chosen, reducer, k=k, q=q, threshold=threshold)


# -- the heatmap -----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Heatmap:
    """A slide's tile scores on the tile grid, with its place on the slide.

    Attributes:
        values: (rows, cols) float32 scores, NaN where there is no tile (off tissue).
        level0_per_cell: (x, y) level-0 pixels between neighbouring cells (the grid's ``stride0``).
        tile0: (x, y) level-0 pixels covered by one cell (the tile footprint; equal to the stride unless
            the tiles overlap or leave gaps).
        mpp_x, mpp_y: level-0 µm/px of the slide.
        origin_level0: level-0 (x, y) of cell (0, 0)'s top-left corner.
        model_id: the model whose scores these are.
        slide_score: the slide-level score (NaN when not computed or no tiles).
        reducer: the reducer that made ``slide_score``; ``reducer_params`` its parameters.
        smoothing_um: Gaussian sigma (µm) applied to ``values``, or None.
        units: what the values are.
    """

    values: np.ndarray
    level0_per_cell: tuple[float, float]
    tile0: tuple[float, float]
    mpp_x: float
    mpp_y: float
    origin_level0: tuple[float, float] = (0.0, 0.0)
    model_id: str = ""
    slide_score: float = float("nan")
    reducer: str = ""
    reducer_params: Mapping[str, Any] = field(default_factory=dict)
    smoothing_um: float | None = None
    units: str = SCORE_UNITS

    def __post_init__(self):
        values = np.asarray(self.values, dtype=np.float32)
        if values.ndim != 2:
            raise HeatmapError(f"heatmap values must be 2-D, got shape {values.shape}")
        object.__setattr__(self, "values", values)
        for name in ("level0_per_cell", "tile0", "origin_level0"):
            pair = tuple(float(v) for v in getattr(self, name))
            if len(pair) != 2 or not all(math.isfinite(v) for v in pair):
                raise HeatmapError(f"{name} must be two finite numbers (x, y), got {getattr(self, name)!r}")
            object.__setattr__(self, name, pair)
        if min(self.level0_per_cell) <= 0 or min(self.tile0) <= 0 or min(self.mpp_x, self.mpp_y) <= 0:
            raise HeatmapError("level0_per_cell, tile0 and mpp must be positive")

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the grid."""
        return self.values.shape  # type: ignore[return-value]

    @property
    def um_per_cell(self) -> tuple[float, float]:
        """(x, y) micrometres between neighbouring cells."""
        return self.level0_per_cell[0] * self.mpp_x, self.level0_per_cell[1] * self.mpp_y

    @property
    def tile_um(self) -> tuple[float, float]:
        """(x, y) micrometres covered by one cell."""
        return self.tile0[0] * self.mpp_x, self.tile0[1] * self.mpp_y

    def cell_to_level0(self, rows, cols) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 (x, y) of the top-left corners of cells (rows, cols) (arrays or scalars; float64, exact)."""
        rows = np.asarray(rows, dtype=np.float64)
        cols = np.asarray(cols, dtype=np.float64)
        return (self.origin_level0[0] + cols * self.level0_per_cell[0],
                self.origin_level0[1] + rows * self.level0_per_cell[1])

    def level0_to_cell(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) int64 of the cells whose stride box ``[corner, corner + level0_per_cell)`` holds the
        level-0 points (x, y). Points outside the grid give indices outside ``[0, shape)``; with
        non-overlapping tiles (the default) the stride box is the tile footprint."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        cols = np.floor((x - self.origin_level0[0]) / self.level0_per_cell[0]).astype(np.int64)
        rows = np.floor((y - self.origin_level0[1]) / self.level0_per_cell[1]).astype(np.int64)
        return rows, cols

    def attributes(self) -> dict[str, Any]:
        """JSON-ready description (no values): geometry in level-0 px and µm, score and reducer."""
        return {
            "coordinate_space": "level-0 pixels, top-left (x, y)",
            "shape": list(self.shape),
            "level0_per_cell": list(self.level0_per_cell),
            "um_per_cell": list(self.um_per_cell),
            "origin_level0": list(self.origin_level0),
            "tile0": list(self.tile0),
            "mpp_x": self.mpp_x,
            "mpp_y": self.mpp_y,
            "model_id": self.model_id,
            "slide_score": _json_float(self.slide_score),
            "reducer": self.reducer,
            "reducer_params": dict(self.reducer_params),
            "smoothing_um": self.smoothing_um,
            "units": self.units,
            "off_tissue": "NaN",
        }


#: Least distance (µm) between two hotspots of :func:`hotspots`: about one 10x field of a 256 px tile, so that
#: neighbouring cells of one lesion count as one hotspot.
DEFAULT_HOTSPOT_SEPARATION_UM = 250.0


def hotspots(heatmap: Heatmap, n: int = 10, *, min_separation_um: float = DEFAULT_HOTSPOT_SEPARATION_UM,
             edge_cells: int = DEFAULT_EDGE_CELLS) -> list[dict[str, Any]]:
    """The ``n`` highest local maxima ("hotspots") of a heatmap, highest first, at least ``min_separation_um``
    apart (scikit-image's ``peak_local_max``; a cell only counts as a peak when it is the highest within that
    distance, so a large lesion gives one hotspot, not its ``n`` hottest neighbouring cells).

    Every scored cell is a candidate, the tissue rim included (metastases often start in the subcapsular
    sinus); ``interior`` says whether the cell lies in the interior the slide score is taken over
    (:func:`interior_cells` with ``edge_cells``).

    Returns one dict a hotspot: ``rank`` (1 = highest), ``score`` (the cell's value), ``row``, ``col`` (cell),
    ``x``, ``y`` (level-0 px, top-left of the cell's tile), ``width``, ``height`` (level-0 px, the tile
    footprint), ``centre_x``, ``centre_y`` (level-0 px) and ``interior``. Empty when no cell is scored.

    Raises:
        HeatmapError: ``n`` < 1 or ``min_separation_um`` < 0.
    """
    from skimage.feature import peak_local_max

    if not isinstance(n, int | np.integer) or n < 1:
        raise HeatmapError(f"n must be an integer >= 1, got {n!r}")
    if not min_separation_um >= 0:
        raise HeatmapError(f"min_separation_um must be >= 0, got {min_separation_um!r}")
    values = heatmap.values
    scored = np.isfinite(values)
    if not scored.any():
        return []
    filled = np.where(scored, values, np.nanmin(values) - 1.0).astype(np.float64)
    distance = max(1, int(round(min_separation_um / min(heatmap.um_per_cell))))
    peaks = peak_local_max(filled, min_distance=distance, num_peaks=int(n), exclude_border=False)
    peaks = [(r, c) for r, c in peaks if scored[r, c]]
    if not peaks:                          # a flat heatmap has no strict maximum: its first highest cell
        peaks = [np.unravel_index(int(np.nanargmax(values)), values.shape)]
    peaks.sort(key=lambda rc: (-float(values[rc[0], rc[1]]), rc[0], rc[1]))
    interior = interior_cells(values, edge_cells)
    out = []
    for rank, (row, col) in enumerate(peaks[:n], start=1):
        x, y = heatmap.cell_to_level0(row, col)
        out.append({"rank": rank, "score": float(values[row, col]), "row": int(row), "col": int(col),
                    "x": float(x), "y": float(y), "width": heatmap.tile0[0], "height": heatmap.tile0[1],
                    "centre_x": float(x) + heatmap.tile0[0] / 2, "centre_y": float(y) + heatmap.tile0[1] / 2,
                    "interior": bool(interior[row, col])})
    return out


def _json_float(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


# -- the store stage -------------------------------------------------------------------------------

def _as_store(store: SlideStore | str | os.PathLike, mode: str) -> SlideStore:
    return store if isinstance(store, SlideStore) else SlideStore.open(store, mode=mode)


def _check_model_id(model_id: str) -> None:
    if not isinstance(model_id, str) or not model_id or "/" in model_id or model_id.startswith("."):
        raise HeatmapError(f"model_id must be a non-empty name without '/', got {model_id!r}")


def heatmap_stage_name(model_id: str) -> str:
    """``heatmap/<model_id>``."""
    _check_model_id(model_id)
    return f"heatmap/{model_id}"


def load_scores(store: SlideStore | str | os.PathLike, model_id: str) -> np.ndarray:
    """(N,) float32 tile scores of ``scores/<model_id>``, checked against the number of tiles."""
    store = _as_store(store, "r")
    _check_model_id(model_id)
    group = store.require(f"scores/{model_id}")
    if "scores" not in group:
        raise HeatmapError(f"{store.path}: stage 'scores/{model_id}' holds no 'scores' array")
    scores = np.asarray(group["scores"][:], dtype=np.float32)
    n_tiles = store.require("tiles")["grid"].shape[0]
    if scores.shape != (n_tiles,):
        raise HeatmapError(f"{store.path}: scores/{model_id} has shape {scores.shape} but the store has {n_tiles} tiles")
    return scores


def heatmap_from_store(store: SlideStore | str | os.PathLike, model_id: str, *, smoothing_um: float | None = None,
                       reducer: str = DEFAULT_REDUCER, k: int = DEFAULT_K, q: float = DEFAULT_Q,
                       threshold: float | None = None, edge_cells: int = DEFAULT_EDGE_CELLS) -> Heatmap:
    """Build (without writing anything) the heatmap of ``scores/<model_id>``; see :func:`run_heatmap_stage`."""
    store = _as_store(store, "r")
    params = {**reducer_params(reducer, k, q, threshold), "edge_cells": edge_cells}
    interior_cells(np.zeros((1, 1)), edge_cells)                     # validates edge_cells
    if smoothing_um is not None and not (isinstance(smoothing_um, int | float) and smoothing_um > 0):
        raise HeatmapError(f"smoothing_um must be a positive number or None, got {smoothing_um!r}")
    scores = load_scores(store, model_id)
    tiles = store.require("tiles")
    geometry = tiles.attrs["geometry"]
    values = tile_grid(tiles["grid"][:], scores, tuple(geometry["grid_shape"]))
    mpp_x, mpp_y = float(store.root.attrs["mpp_x"]), float(store.root.attrs["mpp_y"])
    stride0 = tuple(float(v) for v in geometry["stride0"])
    if smoothing_um is not None:
        values = smooth_heatmap(values, float(smoothing_um), (stride0[0] * mpp_x, stride0[1] * mpp_y))
    score = heatmap_slide_score(values, reducer, k=k, q=q, threshold=threshold, edge_cells=edge_cells)
    return Heatmap(values=values, level0_per_cell=stride0, tile0=tuple(geometry["tile0"]), mpp_x=mpp_x, mpp_y=mpp_y,
                   model_id=model_id, slide_score=score, reducer=reducer, reducer_params=params,
                   units=store.require(f"scores/{model_id}")["scores"].attrs.get("units", SCORE_UNITS),
                   smoothing_um=None if smoothing_um is None else float(smoothing_um))


def heatmap_config_hash(store: SlideStore, model_id: str, *, smoothing_um: float | None, reducer: str,
                        params: Mapping[str, Any]) -> str:
    """Hash of the heatmap stage's settings and of the scores and tiles stages it is made from."""
    stages = store.stages
    return config_hash({"version": HEATMAP_STAGE_VERSION,
                        "scores": stages.get(f"scores/{model_id}", {}).get("config_hash"),
                        "tiles": stages.get("tiles", {}).get("config_hash"),
                        "smoothing_um": smoothing_um, "reducer": reducer, "reducer_params": dict(params)})


def run_heatmap_stage(store: SlideStore | str | os.PathLike, model_id: str, *, smoothing_um: float | None = None,
                      reducer: str = DEFAULT_REDUCER, k: int = DEFAULT_K, q: float = DEFAULT_Q,
                      threshold: float | None = None, edge_cells: int = DEFAULT_EDGE_CELLS) -> Heatmap:
    """Aggregate ``scores/<model_id>`` into stage ``heatmap/<model_id>`` (skipped when already done alike).

    Writes array ``heatmap`` ((rows, cols) float32, NaN off tissue) and attributes ``um_per_cell``,
    ``level0_per_cell``, ``origin_level0``, ``tile0`` (level-0 px), ``slide_score``, ``reducer``,
    ``reducer_params``, ``smoothing_um``, ``units`` (no colour map: rendering is the overlay's job). The
    stage's configuration hash covers these settings and the scores and tiles stages' hashes, so new
    scores recompute the heatmap. Returns the :class:`Heatmap`.

    Args:
        store: a slide store (or its path) holding ``tiles`` and ``scores/<model_id>``.
        model_id: the model whose scores to aggregate.
        smoothing_um: Gaussian sigma in µm (:func:`smooth_heatmap`), or None (default) for none.
        reducer, k, q, threshold: the slide-level score (:func:`slide_score`).
        edge_cells: rim of tissue, in cells, left out of the slide score (:func:`heatmap_slide_score`); the
            heatmap itself keeps every cell.
    """
    store = _as_store(store, "r+")
    stage = heatmap_stage_name(model_id)
    params = {**reducer_params(reducer, k, q, threshold), "edge_cells": edge_cells}
    interior_cells(np.zeros((1, 1)), edge_cells)
    smoothing = None if smoothing_um is None else float(smoothing_um)
    store.require(f"scores/{model_id}")
    digest = heatmap_config_hash(store, model_id, smoothing_um=smoothing, reducer=reducer, params=params)
    if store.is_complete(stage, digest):
        return load_heatmap(store, model_id)
    started = time.perf_counter()
    heatmap = heatmap_from_store(store, model_id, smoothing_um=smoothing, reducer=reducer, k=k, q=q,
                                 threshold=threshold, edge_cells=edge_cells)
    with store.write_stage(stage, digest, started=started, slide_score=_json_float(heatmap.slide_score),
                           reducer=reducer) as group:
        group.create_array("heatmap", data=heatmap.values, fill_value=np.nan)
        group.attrs.update(heatmap.attributes())
    return heatmap


def load_heatmap(store: SlideStore | str | os.PathLike, model_id: str) -> Heatmap:
    """The :class:`Heatmap` of a store's completed ``heatmap/<model_id>`` stage."""
    store = _as_store(store, "r")
    group = store.require(heatmap_stage_name(model_id))
    a = dict(group.attrs)
    score = a.get("slide_score")
    return Heatmap(values=group["heatmap"][:], level0_per_cell=tuple(a["level0_per_cell"]), tile0=tuple(a["tile0"]),
                   mpp_x=float(a["mpp_x"]), mpp_y=float(a["mpp_y"]), origin_level0=tuple(a["origin_level0"]),
                   model_id=a.get("model_id", model_id), slide_score=float("nan") if score is None else float(score),
                   reducer=a.get("reducer", ""), reducer_params=dict(a.get("reducer_params", {})),
                   smoothing_um=a.get("smoothing_um"), units=a.get("units", SCORE_UNITS))
