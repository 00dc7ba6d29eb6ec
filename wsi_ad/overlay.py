"""Heatmap overlays: a slide thumbnail with its anomaly heatmap, annotation outlines and a colour bar.

One colour scale for a whole run (:func:`cohort_scale`): the same score gets the same colour on every
slide, so a normal slide looks cool and a tumour slide hot. Per-slide normalization would stretch a normal
slide's noise over the whole colour map and make it look as alarming as a metastasis; it is not offered.

Geometry: heatmap cell ``(r, c)`` covers level-0 ``[ox + c*sx, ox + c*sx + tx) x [oy + r*sy, oy + r*sy + ty)``
(``s`` = ``Heatmap.level0_per_cell``, ``t`` = ``Heatmap.tile0``, ``o`` = ``Heatmap.origin_level0``). A thumbnail
pixel ``(i, j)`` covers level-0 ``[j*px, (j+1)*px) x [i*py, (i+1)*py)`` with ``(px, py)`` = level-0 pixels per
thumbnail pixel (:func:`level0_per_thumbnail_px`, exact: slide size / thumbnail size) and shows the cell that
holds its centre; where the tiles overlap, the cell whose stride box holds it. Cells without a score (NaN,
off tissue) are transparent, and so is everything outside the tissue mask when one is given.

Memory is bounded by the thumbnail: the slide is read through :meth:`Slide.thumbnail` (block by block) and
every array here has the thumbnail's size (the default thumbnail's longest side is at most 2000 px).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from wsi_ad.atomic import write_png_atomic
from wsi_ad.errors import WsiAdError
from wsi_ad.heatmap import Heatmap
from wsi_ad.slide import Slide, open_slide
from wsi_ad.tissue import TissueMask

#: Longest side (px) of an automatic overlay thumbnail.
DEFAULT_MAX_SIDE = 2000
#: Outline colours (RGB) of annotation kinds.
OUTLINE_COLORS = {"tumor": (0, 200, 0), "exclusion": (0, 90, 255)}
#: Units shown on the colour bar by default.
DEFAULT_UNITS = "anomaly score (unitless)"


class OverlayError(WsiAdError):
    """Bad input to an overlay: an empty cohort, a degenerate scale, a heatmap of another slide."""


@dataclass(frozen=True)
class ScoreScale:
    """A fixed colour scale: ``vmin`` maps to the colour map's first colour, ``vmax`` to its last; scores
    outside are clipped. ``units`` is the colour bar's label."""

    vmin: float
    vmax: float
    units: str = DEFAULT_UNITS

    def __post_init__(self):
        vmin, vmax = float(self.vmin), float(self.vmax)
        if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmax <= vmin:
            raise OverlayError(f"a score scale needs finite vmin < vmax, got {self.vmin!r}, {self.vmax!r}")
        object.__setattr__(self, "vmin", vmin)
        object.__setattr__(self, "vmax", vmax)

    def normalize(self, values: np.ndarray) -> np.ndarray:
        """Scores -> float32 in [0, 1] (clipped); NaN stays NaN."""
        values = np.asarray(values, dtype=np.float32)
        return np.clip((values - self.vmin) / (self.vmax - self.vmin), 0.0, 1.0)

    def to_dict(self) -> dict:
        return {"vmin": self.vmin, "vmax": self.vmax, "units": self.units}


def cohort_scale(score_arrays: Iterable[np.ndarray | Heatmap], low_pct: float = 1.0, high_pct: float = 99.0,
                 units: str = DEFAULT_UNITS) -> ScoreScale:
    """ONE colour scale for every slide of a run: the ``low_pct`` / ``high_pct`` percentiles of all their
    finite scores pooled together (tile-score arrays or :class:`Heatmap` objects; NaN ignored).

    Raises:
        OverlayError: no finite score at all, or percentiles outside [0, 100] / not increasing.
    """
    if not (0.0 <= low_pct < high_pct <= 100.0):
        raise OverlayError(f"percentiles must satisfy 0 <= low_pct < high_pct <= 100, got {low_pct}, {high_pct}")
    parts = []
    for item in score_arrays:
        values = np.asarray(item.values if isinstance(item, Heatmap) else item, dtype=np.float64).ravel()
        parts.append(values[np.isfinite(values)])
    pooled = np.concatenate(parts) if parts else np.zeros(0)
    if not len(pooled):
        raise OverlayError("cannot make a colour scale: the cohort has no finite scores")
    vmin, vmax = (float(v) for v in np.percentile(pooled, [low_pct, high_pct]))
    if vmax <= vmin:                                   # constant scores: a scale around them
        pad = max(abs(vmin) * 1e-3, 1e-6)
        vmin, vmax = vmin - pad, vmax + pad
    return ScoreScale(vmin, vmax, units)


# -- geometry --------------------------------------------------------------------------------------

def auto_thumbnail_mpp(slide: Slide, max_side: int = DEFAULT_MAX_SIDE) -> float:
    """The µm/px at which the slide's longest side is at most ``max_side`` thumbnail pixels (never finer than
    level 0)."""
    width0, height0 = slide.dimensions
    extent_um = max(width0 * slide.mpp_x, height0 * slide.mpp_y)
    return max(extent_um / max_side * (1.0 + 1e-9), min(slide.mpp_x, slide.mpp_y))


def level0_per_thumbnail_px(slide_dimensions: tuple[int, int], thumbnail_size: tuple[int, int]) -> tuple[float, float]:
    """(x, y) level-0 pixels per thumbnail pixel: slide (width, height) / thumbnail (width, height), exactly
    the mapping :meth:`Slide.thumbnail` resamples with."""
    return slide_dimensions[0] / thumbnail_size[0], slide_dimensions[1] / thumbnail_size[1]


def cell_index_maps(heatmap: Heatmap, size: tuple[int, int], level0_per_px: tuple[float, float],
                    origin: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Which heatmap row each thumbnail row shows and which column each thumbnail column shows.

    ``size`` is the thumbnail (width, height); ``origin`` the level-0 (x, y) of its top-left corner (not 0 for
    one tile of a deep-zoom pyramid). Returns ``(row_of_y (height,), col_of_x (width,))`` int64, -1 where the
    pixel centre lies in no cell (outside the grid, or in a gap between tiles).
    """
    def axis(n: int, per_px: float, start: float, grid_origin: float, stride: float, tile: float,
             cells: int) -> np.ndarray:
        centre = (np.arange(n, dtype=np.float64) + 0.5) * per_px + start - grid_origin
        index = np.floor(centre / stride).astype(np.int64)
        inside = (index >= 0) & (index < cells) & (centre - index * stride < tile)
        return np.where(inside, index, -1)

    rows, cols = heatmap.shape
    col_of_x = axis(size[0], level0_per_px[0], origin[0], heatmap.origin_level0[0], heatmap.level0_per_cell[0],
                    heatmap.tile0[0], cols)
    row_of_y = axis(size[1], level0_per_px[1], origin[1], heatmap.origin_level0[1], heatmap.level0_per_cell[1],
                    heatmap.tile0[1], rows)
    return row_of_y, col_of_x


def heatmap_on_thumbnail(heatmap: Heatmap, size: tuple[int, int], level0_per_px: tuple[float, float],
                         origin: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The heatmap resampled (nearest cell) onto an image of ``size`` = (width, height) whose top-left is level-0
    ``origin``: (height, width) float32 scores, NaN where no cell or no score."""
    row_of_y, col_of_x = cell_index_maps(heatmap, size, level0_per_px, origin)
    padded = np.full((heatmap.shape[0] + 1, heatmap.shape[1] + 1), np.nan, dtype=np.float32)
    padded[:-1, :-1] = heatmap.values
    return padded[row_of_y[:, None], col_of_x[None, :]]        # index -1 hits the NaN padding


def tissue_on_thumbnail(mask: TissueMask, size: tuple[int, int], level0_per_px: tuple[float, float],
                        slide_mpp: tuple[float, float], origin: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """A tissue mask resampled (nearest) onto an image of ``size`` = (width, height) whose top-left is level-0
    ``origin``: (height, width) bool."""
    per_mask_x, per_mask_y = mask.mpp / slide_mpp[0], mask.mpp / slide_mpp[1]
    h_m, w_m = mask.mask.shape
    cx = np.floor(((np.arange(size[0]) + 0.5) * level0_per_px[0] + origin[0]) / per_mask_x).astype(np.int64)
    cy = np.floor(((np.arange(size[1]) + 0.5) * level0_per_px[1] + origin[1]) / per_mask_y).astype(np.int64)
    ok_x, ok_y = (cx >= 0) & (cx < w_m), (cy >= 0) & (cy < h_m)
    out = np.asarray(mask.mask, dtype=bool)[np.clip(cy, 0, h_m - 1)[:, None], np.clip(cx, 0, w_m - 1)[None, :]]
    return out & ok_y[:, None] & ok_x[None, :]


# -- drawing ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def colormap_lut(cmap: str = "inferno") -> np.ndarray:
    """(256, 3) uint8 RGB lookup table of a matplotlib colour map (index = round(normalized score * 255));
    read-only (cached: every deep-zoom tile of the viewer asks for it)."""
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as exc:
        raise OverlayError(f"unknown colour map {cmap!r}") from exc
    lut = np.round(colormap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def draw_outlines(image: np.ndarray, annotations: Sequence, level0_per_px: tuple[float, float],
                  width: int | None = None, origin: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Draw annotation outlines (tumour green, exclusion blue) on an (H, W, 3) or (H, W, 4) uint8 image whose
    top-left is level-0 ``origin``; returns a new array (outlines opaque on an RGBA image).

    Vertices are level-0 (x, y); pixel (i, j) covers level-0 ``[ox + j*px, ox + (j+1)*px)``, so a vertex lands
    at ``(x - ox) / px - 0.5`` in PIL's pixel-centre coordinates.
    """
    if width is None:
        width = max(1, round(max(image.shape[:2]) / 700))
    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    opaque = (255,) if canvas.mode == "RGBA" else ()
    for annotation in annotations:
        xy = np.asarray(annotation.vertices, dtype=np.float64)
        if len(xy) < 2:
            continue
        points = [((x - origin[0]) / level0_per_px[0] - 0.5, (y - origin[1]) / level0_per_px[1] - 0.5) for x, y in xy]
        draw.line(points + points[:1], fill=OUTLINE_COLORS.get(annotation.kind, (255, 255, 0)) + opaque, width=width,
                  joint="curve")
    return np.asarray(canvas)


def colorbar_panel(scale: ScoreScale, height: int, cmap: str = "inferno") -> np.ndarray:
    """An (H, W, 3) uint8 colour bar panel (matplotlib, Agg): the colour map from ``vmin`` to ``vmax`` with
    their values, intermediate ticks and ``scale.units`` as label. ``height`` >= 240 px is used as given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colorbar import ColorbarBase
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    height = max(240, int(height))
    dpi = 100
    font = float(np.clip(height / 45, 7, 14))
    width = int(round(font * 19))
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.06, 0.04, 0.1, 0.92))
    bar = ColorbarBase(ax, cmap=colormap_name_checked(cmap), norm=Normalize(scale.vmin, scale.vmax),
                       orientation="vertical")
    ticks = np.linspace(scale.vmin, scale.vmax, 5)
    labels = [f"{v:.3g}" for v in ticks]
    labels[0], labels[-1] = f"≤{labels[0]} (vmin)", f"≥{labels[-1]} (vmax)"
    bar.set_ticks(ticks, labels=labels, fontsize=font)
    bar.set_label(scale.units, fontsize=font)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def colormap_name_checked(cmap: str) -> str:
    colormap_lut(cmap)                                 # raises OverlayError on an unknown name
    return cmap


def compose_overlay(thumbnail: np.ndarray, heatmap: Heatmap, scale: ScoreScale, level0_per_px: tuple[float, float], *,
                    tissue: np.ndarray | None = None, annotations: Sequence | None = None, alpha: float = 0.5,
                    cmap: str = "inferno", colorbar: bool = True) -> np.ndarray:
    """Blend a heatmap over a thumbnail (the arrays-only core of :func:`render_overlay`).

    Args:
        thumbnail: (H, W, 3) uint8 RGB.
        heatmap: the slide's heatmap.
        scale: the cohort's colour scale.
        level0_per_px: (x, y) level-0 pixels per thumbnail pixel.
        tissue: optional (H, W) bool; the heatmap is shown only on True pixels.
        annotations: optional :class:`~wsi_ad.annotations.Annotation` list whose outlines are drawn.
        alpha: opacity of the heatmap colours (0: invisible, 1: opaque).
        colorbar: append a colour-bar panel at the right (the slide stays at ``[0:H, 0:W]``).

    Returns:
        (max(H, panel height), W [+ panel width], 3) uint8; the slide part is ``out[:H, :W]``.
    """
    thumbnail = np.asarray(thumbnail)
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or thumbnail.dtype != np.uint8:
        raise OverlayError(f"thumbnail must be (H, W, 3) uint8, got {thumbnail.shape} {thumbnail.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise OverlayError(f"alpha must be in [0, 1], got {alpha}")
    h, w = thumbnail.shape[:2]
    lut = colormap_lut(cmap)
    values = heatmap_on_thumbnail(heatmap, (w, h), level0_per_px)
    show = np.isfinite(values)
    if tissue is not None:
        tissue = np.asarray(tissue, dtype=bool)
        if tissue.shape != (h, w):
            raise OverlayError(f"tissue mask of shape {tissue.shape} does not match the thumbnail {(h, w)}")
        show &= tissue
    image = thumbnail.copy()
    index = np.round(scale.normalize(values[show]) * 255).astype(np.intp)
    blended = (1.0 - alpha) * thumbnail[show].astype(np.float32) + alpha * lut[index].astype(np.float32)
    image[show] = np.round(blended).astype(np.uint8)
    del values, show
    if annotations:
        image = draw_outlines(image, annotations, level0_per_px)
    if not colorbar:
        return image
    panel = colorbar_panel(scale, h, cmap)
    out = np.full((max(h, panel.shape[0]), w + panel.shape[1], 3), 255, dtype=np.uint8)
    out[:h, :w] = image
    out[:panel.shape[0], w:] = panel
    return out


def render_overlay(slide: Slide | str | os.PathLike, heatmap: Heatmap, scale: ScoreScale, *,
                   tissue_mask: TissueMask | None = None, annotations: Sequence | None = None,
                   thumbnail_mpp: float | None = None, alpha: float = 0.5, cmap: str = "inferno",
                   colorbar: bool = True, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """The slide's thumbnail with its heatmap, tissue mask, annotation outlines and a colour bar.

    Args:
        slide: the open slide (or its path) the heatmap was computed on.
        heatmap: its heatmap (:func:`wsi_ad.heatmap.load_heatmap`).
        scale: the run's colour scale (:func:`cohort_scale`): the same for every slide.
        tissue_mask: optional tissue mask (``preprocess.load_tissue_mask``); heat is drawn on tissue only.
        annotations: optional annotations (``annotations.read_asap_xml``); tumour outlines green,
            exclusion outlines blue.
        thumbnail_mpp: µm/px of the thumbnail; default: the slide's longest side at most ``max_side`` px.
        alpha: heatmap opacity in [0, 1].
        cmap: a matplotlib colour map name.
        colorbar: append the colour bar (score units, vmin/vmax) at the right.

    Returns:
        (H, W, 3) uint8 RGB; the thumbnail occupies the top-left ``thumbnail size`` pixels.

    Memory: the thumbnail and a few arrays of its size, whatever the slide size.
    """
    own = not isinstance(slide, Slide)
    slide = open_slide(slide) if own else slide
    try:
        for mine, theirs in ((heatmap.mpp_x, slide.mpp_x), (heatmap.mpp_y, slide.mpp_y)):
            if abs(mine - theirs) > 0.01 * theirs:
                raise OverlayError(f"heatmap at {mine:.4f} µm/px does not belong to slide {slide.slide_id} "
                                   f"({theirs:.4f} µm/px)")
        mpp = float(thumbnail_mpp) if thumbnail_mpp is not None else auto_thumbnail_mpp(slide, max_side)
        if not mpp > 0:
            raise OverlayError(f"thumbnail_mpp must be positive, got {thumbnail_mpp}")
        thumbnail = slide.thumbnail(mpp)
        size = (thumbnail.shape[1], thumbnail.shape[0])
        per_px = level0_per_thumbnail_px(slide.dimensions, size)
        tissue = None
        if tissue_mask is not None:
            if not isinstance(tissue_mask, TissueMask):
                raise OverlayError(f"tissue_mask must be a TissueMask, got {type(tissue_mask).__name__}")
            tissue = tissue_on_thumbnail(tissue_mask, size, per_px, (slide.mpp_x, slide.mpp_y))
        return compose_overlay(thumbnail, heatmap, scale, per_px, tissue=tissue, annotations=annotations,
                               alpha=alpha, cmap=cmap, colorbar=colorbar)
    finally:
        if own:
            slide.close()


def write_overlay(path: str | os.PathLike, slide: Slide | str | os.PathLike, heatmap: Heatmap, scale: ScoreScale,
                  **kwargs) -> Path:
    """Render (:func:`render_overlay`, same keyword arguments) and write the overlay as PNG, atomically."""
    return write_png_atomic(path, render_overlay(slide, heatmap, scale, **kwargs))


# -- deep-zoom layers (``wsi-ad view``) ---------------------------------------------------------------
# Each renders one image of ``size`` = (width, height) pixels whose top-left is level-0 ``origin`` (x, y), at
# ``level0_per_px`` level-0 pixels per image pixel: one tile of a deep-zoom pyramid laid over the slide's own.
# Transparent where the layer has nothing to show, so the slide stays visible below.

def heatmap_layer(heatmap: Heatmap, scale: ScoreScale, origin: tuple[float, float], size: tuple[int, int],
                  level0_per_px: tuple[float, float], *, tissue_mask: TissueMask | None = None,
                  cmap: str = "inferno") -> np.ndarray:
    """The heatmap on the cohort colour scale as (height, width, 4) uint8 RGBA: opaque colour where a scored cell
    covers the pixel centre (and, with ``tissue_mask``, the mask says tissue, as on the overlays), transparent
    elsewhere. The viewer sets the opacity. Same cell geometry as :func:`heatmap_on_thumbnail`."""
    values = heatmap_on_thumbnail(heatmap, size, level0_per_px, origin)
    show = np.isfinite(values)
    if tissue_mask is not None:
        show &= tissue_on_thumbnail(tissue_mask, size, level0_per_px, (heatmap.mpp_x, heatmap.mpp_y), origin)
    out = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    index = np.round(scale.normalize(values[show]) * 255).astype(np.intp)
    out[show, :3] = colormap_lut(cmap)[index]
    out[show, 3] = 255
    return out


def tissue_layer(mask: TissueMask, slide_mpp: tuple[float, float], origin: tuple[float, float], size: tuple[int, int],
                 level0_per_px: tuple[float, float], color: tuple[int, int, int, int] = (0, 170, 255, 90)
                 ) -> np.ndarray:
    """The tissue mask as (height, width, 4) uint8 RGBA: ``color`` (translucent) on tissue, transparent off it."""
    tissue = tissue_on_thumbnail(mask, size, level0_per_px, slide_mpp, origin)
    out = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    out[tissue] = color
    return out


def outline_layer(annotations: Sequence, origin: tuple[float, float], size: tuple[int, int],
                  level0_per_px: tuple[float, float], width: int = 2) -> np.ndarray:
    """Annotation outlines (tumour green, exclusion blue), ``width`` image pixels wide whatever the zoom, on a
    transparent (height, width, 4) uint8 RGBA image."""
    blank = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    return draw_outlines(blank, annotations, level0_per_px, width=width, origin=origin)
