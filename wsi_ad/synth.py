"""Synthetic Camelyon16-like whole-slide images: pyramidal TIFFs of H&E lymph-node tissue with metastases.

The real Camelyon16 slides are not available to this project, so tests and the demo run on slides made
here. A slide is a procedural scene: a few irregular tissue islands on white glass, stained by
Beer-Lambert H&E physics (per-slide stain vectors and concentrations, two "hospitals"), with dense
small dark lymphocyte nuclei, fibrous eosin stroma, optional pen marks, and tumour lesions of large,
dark (hyperchromatic), pleomorphic, crowded nuclei with nucleoli in nests. Each lesion is a polygon
(level-0 pixels) that is written to an ASAP XML file; the tumour morphology fills exactly that polygon,
so the annotations are the truth.

Everything is rendered from the slide's seed by pure functions of the level-0 window (nuclei come
from a hash of (seed, grid cell), smooth textures from hashed lattice noise), so tiles agree at their
borders and a slide of any size streams: level 0 is rendered band by band (256 rows), written through
tifffile's tile iterator, and block-averaged on the fly into the coarser levels, which are kept in raw
temporary files (not in memory, not memory-mapped) and written as later pages. Peak memory is a few
bands, independent of the slide's height and linear in its width (a 256-row band of a 50k px wide
slide is 38 MB; a 50k x 50k slide peaks at about 300 MB).

File layout (what OpenSlide and tiffslide expect of an Aperio SVS): page 0 is level 0 (tiled,
JPEG), page 1 a stripped thumbnail, pages 2.. the coarser levels (tiled, downsample 2 per level, as in Camelyon16's TIFFs);
NewSubfileType 0 on every page; an Aperio ImageDescription (``AppMag = 40|MPP = 0.243``) so that
OpenSlide reports ``openslide.mpp-x`` and ``openslide.objective-power``; TIFF resolution tags in
pixels per centimetre consistent with the mpp.

Units: level-0 pixels for coordinates and sizes unless a name says ``_um`` (micrometres) or ``_mm``.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import tifffile
from PIL import Image
from skimage.measure import points_in_poly

from wsi_ad.annotations import Annotation, fill_polygon, polygon_mask, write_asap_xml
from wsi_ad.atomic import atomic_path, write_text_atomic

#: Level-0 resolution of the Camelyon16 scanners (µm/px) and their objective power.
CAMELYON_MPP = 0.243
OBJECTIVE_POWER = 40
#: A metastasis whose largest lesion's major axis exceeds this (mm) is "Macro", else "Micro".
MACRO_THRESHOLD_MM = 2.0
#: TIFF tile edge (px) and JPEG quality of every level.
TIFF_TILE = 256
JPEG_QUALITY = 80
#: Width of a rendering window (level-0 px); level 0 is rendered in bands of BAND_ROWS rows.
RENDER_BLOCK = 512
#: Rows of a level-0 band (one TIFF tile row); must be a multiple of PYRAMID_FACTOR ** (levels - 1).
BAND_ROWS = 256
#: Downsample between consecutive pyramid levels.
PYRAMID_FACTOR = 2
#: Downsample (level-0 px per pixel) of the coarse in-memory fields (tissue, pen ink).
FIELD_DS = 32
#: Largest edge (px) of the stripped thumbnail page.
THUMBNAIL_MAX = 1024
#: Bytes of raw tiles tifffile gathers per parallel compression pass (its default, 512 MB, would dominate memory).
TIFF_BUFFER_BYTES = 16 * 2**20

_APERIO_HEADER = "Aperio Image Library v12.0.0 \r\n"

#: How the tissue is drawn. ``"simple"``: crowded lymphocytes on pink stroma; tumour of large, dark (hyperchromatic)
#: nuclei (the original look; every figure before the ``lymph-node`` mode was made with it). ``"lymph-node"``: the
#: same lymphoid background with the rare structures of a real node (fibrous capsule at the tissue's edges, lymphoid
#: follicles with germinal centres, sinuses, adipose tissue, vessels and haemorrhage with red blood cells,
#: out-of-focus patches), and tumour that differs from lymphocytes by nuclear size, vesicular chromatin with a
#: nucleolus and cohesion rather than by darkness (see :func:`_normal_tissue_ln`, :func:`_tumor_tissue_ln`).
TISSUE_MODES = ("simple", "lymph-node")
DEFAULT_TISSUE = "simple"


# --------------------------------------------------------------------------------------------------
# Stains
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stain:
    """Beer-Lambert stain model of one slide: I = 255 * exp(-(c_H * od_h + c_E * od_e + background_od)).

    ``od_h``/``od_e`` are unit optical-density vectors (R, G, B) of haematoxylin and eosin;
    ``scale_h``/``scale_e`` multiply every concentration (staining strength); ``background_od`` is
    the optical density of bare glass (about RGB 245).
    """

    name: str
    od_h: tuple[float, float, float]
    od_e: tuple[float, float, float]
    scale_h: float
    scale_e: float
    background_od: tuple[float, float, float]


#: Two "hospitals" with visibly different staining (stain vectors and strengths).
HOSPITAL_STAINS: dict[str, Stain] = {
    "A": Stain("A", (0.65, 0.70, 0.29), (0.07, 0.99, 0.11), 1.0, 1.0, (0.028, 0.032, 0.024)),
    "B": Stain("B", (0.54, 0.76, 0.36), (0.16, 0.93, 0.33), 1.25, 0.75, (0.035, 0.030, 0.040)),
}

#: Optical density (R, G, B) of the pen inks.
INK_OD: dict[str, tuple[float, float, float]] = {
    "green": (1.10, 0.25, 0.75),
    "blue": (1.00, 0.65, 0.12),
    "red": (0.10, 1.05, 0.85),
}


def _unit(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def jitter_stain(stain: Stain, rng: np.random.Generator, amount: float = 0.05) -> Stain:
    """A per-slide variant of ``stain``: stain vectors perturbed by about ``amount`` and strengths by ±10 %."""
    od_h = _unit(np.clip(_unit(stain.od_h) + rng.normal(0, amount, 3), 0.01, None))
    od_e = _unit(np.clip(_unit(stain.od_e) + rng.normal(0, amount, 3), 0.01, None))
    return Stain(
        stain.name,
        tuple(float(x) for x in od_h),
        tuple(float(x) for x in od_e),
        float(stain.scale_h * rng.uniform(0.9, 1.1)),
        float(stain.scale_e * rng.uniform(0.9, 1.1)),
        stain.background_od,
    )


# --------------------------------------------------------------------------------------------------
# Deterministic hashing and noise (pure functions of the seed and level-0 coordinates)
# --------------------------------------------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _hash_u01(seed: int, salt: int, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float64 per (iy, ix) integer pair (broadcast), a pure function of (seed, salt, iy, ix)."""
    iy = np.atleast_1d(np.asarray(iy, dtype=np.int64)).astype(np.uint64)
    ix = np.atleast_1d(np.asarray(ix, dtype=np.int64)).astype(np.uint64)
    with np.errstate(over="ignore"):
        base = _mix64(np.array([(seed & 0xFFFFFFFF) * 0x10001 + salt], dtype=np.uint64) * _GOLD)
        h = _mix64(base + iy * _GOLD)
        h = _mix64(h ^ (ix * _M1 + _GOLD))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _axis_weights(start: float, n: int, step: float, spacing: float, smooth: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Lattice cell index (relative to the first one used) and interpolation weight of ``n`` samples.

    Samples are at level-0 positions ``start + (i + 0.5) * step``; lattice points at ``k * spacing``
    (value noise) or at cell centres. Returns (relative indices, weights, absolute index of the first).
    """
    u = (start + (np.arange(n) + 0.5) * step) / spacing
    i0 = np.floor(u)
    w = u - i0
    if smooth:
        w = w * w * (3.0 - 2.0 * w)
    first = int(i0.min())
    return (i0 - first).astype(np.intp), w.astype(np.float32), first


def _separable_lerp(v: np.ndarray, ry: np.ndarray, wy: np.ndarray, rx: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of lattice values ``v`` at rows ``ry + wy`` and columns ``rx + wx`` (separable)."""
    v = v.astype(np.float32, copy=False)
    a = v[:, rx] * (1 - wx) + v[:, rx + 1] * wx
    return a[ry] * (1 - wy)[:, None] + a[ry + 1] * wy[:, None]


def value_noise(seed: int, salt: int, x0: float, y0: float, w: int, h: int, spacing: float, step: float = 1.0) -> np.ndarray:
    """Smooth value noise in [0, 1], (h, w) float32, sampled at level-0 (x0 + (j + 0.5) step, y0 + (i + 0.5) step).

    ``spacing`` is the lattice period in level-0 px (the size of the noise's blobs). The same level-0
    point gives the same value whatever window it is sampled in.
    """
    ry, wy, fy = _axis_weights(y0, h, step, spacing, True)
    rx, wx, fx = _axis_weights(x0, w, step, spacing, True)
    iy = np.arange(fy, fy + int(ry.max()) + 2)
    ix = np.arange(fx, fx + int(rx.max()) + 2)
    lattice = _hash_u01(seed, salt, iy[:, None], ix[None, :])
    return _separable_lerp(lattice, ry, wy, rx, wx)


def sample_field(fld: np.ndarray, field_ds: float, x0: float, y0: float, w: int, h: int, step: float = 1.0) -> np.ndarray:
    """Bilinear sample of a coarse field (pixel (r, c) centred at level-0 ((c + .5) ds, (r + .5) ds)), clamped at its edges."""
    ry, wy, fy = _axis_weights(y0 - field_ds / 2, h, step, field_ds, False)
    rx, wx, fx = _axis_weights(x0 - field_ds / 2, w, step, field_ds, False)
    iy = np.clip(np.arange(fy, fy + int(ry.max()) + 2), 0, fld.shape[0] - 1)
    ix = np.clip(np.arange(fx, fx + int(rx.max()) + 2), 0, fld.shape[1] - 1)
    return _separable_lerp(fld[np.ix_(iy, ix)], ry, wy, rx, wx)


# --------------------------------------------------------------------------------------------------
# Scene: tissue islands, lesions, pen strokes
# --------------------------------------------------------------------------------------------------


def _star_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float, n_vertices: int,
                  roughness: float, elongation: float) -> np.ndarray:
    """Closed smooth random blob around (cx, cy): radius (level-0 px) modulated by low Fourier harmonics."""
    theta = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 8):
        r += rng.uniform(0, roughness) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.45, None)
    x, y = r * np.cos(theta), elongation * r * np.sin(theta)
    phi = rng.uniform(0, np.pi)
    c, s = np.cos(phi), np.sin(phi)
    scale = radius / math.sqrt(elongation)
    return np.c_[cx + scale * (c * x - s * y), cy + scale * (s * x + c * y)]


@dataclass(frozen=True)
class _Island:
    center: tuple[float, float]
    vertices: np.ndarray  # (N, 2) level-0 x, y

    def inner_radius(self) -> float:
        """Smallest distance (level-0 px) from the centre to the boundary."""
        return float(np.hypot(*(self.vertices - np.asarray(self.center)).T).min())


@dataclass(frozen=True)
class _Pen:
    color: str
    field: np.ndarray  # coarse ink density (0..1) at FIELD_DS


@dataclass
class _Scene:
    """Everything the renderer needs; derived from the seed by ``_build_scene``."""

    width: int
    height: int
    seed: int
    mpp: float
    stain: Stain
    islands: list[_Island]
    lesions: list[Annotation]
    tissue_field: np.ndarray  # coarse tissue density at FIELD_DS
    pen: _Pen | None
    lymph_cell: int  # nucleus grid cell (px) of normal tissue
    tumor_cell: int  # nucleus grid cell (px) of tumour
    lymph_radius: float  # semi-major axis of a lymphocyte nucleus (px)
    tumor_radius: tuple[float, float]  # range of tumour nucleus semi-major axes (px)
    background_tiles: list[np.ndarray] = field(default_factory=list)
    tissue: str = "simple"  # one of TISSUE_MODES
    edge_field: np.ndarray | None = None  # "lymph-node": coarse distance (level-0 px) to the tissue's edge, at FIELD_DS


def _grid_cell(size_um: float, mpp: float) -> int:
    """Power-of-two grid cell (16..128 px) closest to ``size_um`` at ``mpp``; divides RENDER_BLOCK."""
    px = size_um / mpp
    return int(np.clip(2 ** round(math.log2(max(px, 1.0))), 16, 128))


def _place_islands(rng: np.random.Generator, width: int, height: int) -> list[_Island]:
    """Up to 2-4 irregular, non-overlapping tissue islands inside the slide (an island that finds no room
    after 200 tries is left out: the count is random anyway, the first, largest one always fits)."""
    n = int(rng.integers(2, 5))
    short = min(width, height)
    islands: list[_Island] = []
    placed: list[tuple[float, float, float]] = []
    for k in range(n):
        for _attempt in range(200):
            radius = short * (rng.uniform(0.24, 0.30) if k == 0 else rng.uniform(0.10, 0.2))
            margin = radius * 1.3 + 0.03 * short
            if 2 * margin >= min(width, height):
                radius *= 0.7
                margin = radius * 1.3 + 0.03 * short
            cx = rng.uniform(margin, width - margin)
            cy = rng.uniform(margin, height - margin)
            if all(math.hypot(cx - px, cy - py) > 1.2 * (radius + pr) for px, py, pr in placed):
                break
        else:
            continue
        verts = _star_polygon(rng, cx, cy, radius, 256, 0.35, rng.uniform(0.65, 1.0))
        islands.append(_Island((cx, cy), verts))
        placed.append((cx, cy, radius))
    return islands


def _lesion_polygon(rng: np.random.Generator, cx: float, cy: float, major_px: float) -> np.ndarray:
    """An irregular lesion outline whose major axis is about ``major_px`` (level-0 px); vertices rounded to 0.1 px."""
    verts = _star_polygon(rng, cx, cy, major_px / 2, 128, 0.6, rng.uniform(0.55, 0.95))
    # rescale so that the Feret diameter is exactly the requested size (up to the 0.1 px rounding)
    d = np.sqrt(((verts[:, None] - verts[None]) ** 2).sum(-1)).max()
    verts = np.array([cx, cy]) + (verts - np.array([cx, cy])) * (major_px / d)
    return np.round(verts, 1)


def _fit_mm(island: _Island, mpp: float) -> float:
    """Largest lesion major axis (mm) that fits comfortably inside ``island``."""
    return island.inner_radius() * 1.2 * mpp / 1000.0


def _max_lesion_mm(islands: list[_Island], mpp: float) -> float:
    """Largest lesion major axis (mm) that fits comfortably inside the biggest island."""
    return max((_fit_mm(i, mpp) for i in islands), default=0.0)


def _place_lesions(rng: np.random.Generator, islands: list[_Island], sizes_mm: Sequence[float | None],
                   mpp: float) -> list[Annotation]:
    """Lesion polygons inside tissue islands, apart from each other.

    ``sizes_mm`` gives each lesion's major axis (mm), or None for a random micro-metastasis size
    (0.3-1.5 mm, as far as the island allows). Islands are tried largest first, then in turn; random
    sizes shrink and centres move inwards as attempts fail; a random-size lesion that finds no room beside
    the lesions already placed is left out. Raises ValueError when a lesion of a given size, or the first
    one, cannot be placed (the slide is too small for it).
    """
    lesions: list[Annotation] = []
    occupied: list[tuple[float, float, float]] = []
    order = sorted(range(len(islands)), key=lambda i: -islands[i].inner_radius())
    n_attempts = 400
    for n, size in enumerate(sizes_mm):
        for attempt in range(n_attempts):
            island = islands[order[(attempt // 20) % len(order)]]
            give = 1.0 - attempt / n_attempts
            if size is None:
                hi = min(1.5, _fit_mm(island, mpp) * (0.3 + 0.7 * give))
                if hi < 0.3:
                    continue
                size_try = float(rng.uniform(0.3, hi))
            else:
                size_try = float(size)
            major_px = size_try * 1000.0 / mpp
            icx, icy = island.center
            reach = max(island.inner_radius() - major_px / 2, 0.0)
            ang = rng.uniform(0, 2 * np.pi)
            dist = reach * math.sqrt(rng.uniform(0, 1)) * 0.8 * give
            cx, cy = icx + dist * math.cos(ang), icy + dist * math.sin(ang)
            verts = _lesion_polygon(rng, cx, cy, major_px)
            # inside the island shrunk by 12 % towards its centre (tissue edges are ragged)
            shrunk = np.asarray(island.center) + (island.vertices - np.asarray(island.center)) * 0.88
            if not points_in_poly(verts, shrunk).all():
                continue
            if any(math.hypot(cx - ox, cy - oy) < (major_px + od) / 2 * 1.15 for ox, oy, od in occupied):
                continue
            lesions.append(Annotation(f"Annotation {n}", "_0", "tumor", "Polygon", verts))
            occupied.append((cx, cy, major_px))
            break
        else:
            if size is None and lesions:  # a random extra micro-metastasis that no longer fits: leave it out
                continue
            what = "a 0.3 mm lesion" if size is None else f"a {size:.2f} mm lesion"
            raise ValueError(
                f"cannot place {what} (lesion {n + 1} of {len(sizes_mm)}) in this slide's tissue (the largest "
                f"that fits is about {_max_lesion_mm(islands, mpp):.2f} mm); use a larger slide or fewer/smaller lesions"
            )
    return lesions


def _random_lesion_sizes(rng: np.random.Generator, n: int, max_mm: float) -> list[float | None]:
    """``n`` lesion sizes (mm, None = random micro size chosen at placement); the first is macro
    (2.2-4 mm) with probability 0.6 when the tissue allows it."""
    sizes: list[float | None] = [None] * n
    if n and max_mm >= 2.3 and rng.uniform() < 0.6:
        sizes[0] = float(rng.uniform(2.2, min(4.0, max_mm)))
    return sizes


def _coarse_shape(width: int, height: int) -> tuple[int, int]:
    return (math.ceil(height / FIELD_DS) + 1, math.ceil(width / FIELD_DS) + 1)


def _tissue_field(islands: list[_Island], width: int, height: int) -> np.ndarray:
    """Coarse (FIELD_DS) tissue density: islands rasterized and blurred to smooth, slightly soft edges."""
    shape = _coarse_shape(width, height)
    mask = np.zeros(shape, dtype=bool)
    for island in islands:
        mask |= polygon_mask(island.vertices, shape, FIELD_DS)
    return ndi.gaussian_filter(mask.astype(np.float32), 1.2)


def _pen_strokes(rng: np.random.Generator, islands: list[_Island], width: int, height: int, mpp: float) -> _Pen:
    """1-3 ink strokes (about 0.6-1.2 mm wide) running along tissue edges, as a coarse density field."""
    shape = _coarse_shape(width, height)
    line = np.zeros(shape, dtype=bool)
    color = str(rng.choice(sorted(INK_OD)))
    n = int(rng.integers(1, 4))
    for _ in range(n):
        island = islands[int(rng.integers(len(islands)))]
        c = np.asarray(island.center)
        start = int(rng.integers(len(island.vertices)))
        span = int(rng.integers(30, 80))
        idx = (start + np.arange(span)) % len(island.vertices)
        offset = rng.uniform(1.05, 1.2)
        pts = (c + (island.vertices[idx] - c) * offset) / FIELD_DS
        wobble = np.cumsum(rng.normal(0, 0.4, size=pts.shape), axis=0)
        pts = pts + wobble
        for (x1, y1), (x2, y2) in zip(pts[:-1], pts[1:], strict=True):
            num = int(max(abs(x2 - x1), abs(y2 - y1))) + 2
            xs = np.clip(np.round(np.linspace(x1, x2, num)).astype(int), 0, shape[1] - 1)
            ys = np.clip(np.round(np.linspace(y1, y2, num)).astype(int), 0, shape[0] - 1)
            line[ys, xs] = True
    dist_px = ndi.distance_transform_edt(~line) * FIELD_DS
    # strokes 0.6-1.2 mm wide, but at most about 6 % of a small slide's side (level-0 px)
    half_width = min(rng.uniform(300.0, 600.0) / mpp, rng.uniform(0.02, 0.035) * min(width, height))
    density = np.clip((half_width - dist_px) / (0.25 * half_width), 0, 1) * rng.uniform(0.55, 0.85)
    return _Pen(color, ndi.gaussian_filter(density.astype(np.float32), 1.0))


def _build_scene(width: int, height: int, seed: int, n_lesions: int, lesion_sizes_mm: Sequence[float] | None,
                 stain: Stain, pen_marks: bool, mpp: float, tissue: str = "simple") -> _Scene:
    """Derive the whole slide (islands, lesions, stain, pen, coarse fields) from ``seed``; ``tissue`` is one of
    :data:`TISSUE_MODES` (it changes only the rendering, not the islands, lesions, stain or pen)."""
    if tissue not in TISSUE_MODES:
        raise ValueError(f"unknown tissue mode {tissue!r} (known: {', '.join(TISSUE_MODES)})")
    rng = np.random.default_rng([seed, 0x5EED])
    islands = _place_islands(rng, width, height)
    if lesion_sizes_mm is None:
        sizes = _random_lesion_sizes(rng, n_lesions, _max_lesion_mm(islands, mpp)) if n_lesions else []
    else:
        sizes = [float(x) for x in lesion_sizes_mm]
    lesions = _place_lesions(rng, islands, sizes, mpp)
    slide_stain = jitter_stain(stain, rng)
    pen = _pen_strokes(rng, islands, width, height, mpp) if pen_marks else None  # last: changes nothing else
    return _Scene(
        width=width,
        height=height,
        seed=seed,
        mpp=mpp,
        stain=slide_stain,
        islands=islands,
        lesions=lesions,
        tissue_field=_tissue_field(islands, width, height),
        pen=pen,
        lymph_cell=_grid_cell(7.8, mpp),
        tumor_cell=_grid_cell(15.6, mpp),
        lymph_radius=3.4 / mpp,
        tumor_radius=(5.2 / mpp, 9.8 / mpp),
        tissue=tissue,
        edge_field=_edge_field(islands, width, height) if tissue == "lymph-node" else None,
    )


def _edge_field(islands: list[_Island], width: int, height: int) -> np.ndarray:
    """Coarse (FIELD_DS) distance in level-0 px from each point inside an island to the island's edge (0 outside)."""
    shape = _coarse_shape(width, height)
    mask = np.zeros(shape, dtype=bool)
    for island in islands:
        mask |= polygon_mask(island.vertices, shape, FIELD_DS)
    return (ndi.distance_transform_edt(mask) * FIELD_DS).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

# salts of the hashed random streams
_S_LYMPH, _S_TUMOR, _S_DENSITY, _S_NEST, _S_FIB_A, _S_FIB_B, _S_EDGE, _S_IRREG, _S_CHROM, _S_STROMA = range(1, 11)
_FAR = 1.0e6  # where absent nuclei are put (level-0 px), so that they never win the nearest-nucleus test


@dataclass(frozen=True)
class _Cells:
    """Per-grid-cell nucleus parameters for cells covering a window plus one cell of margin."""

    cy0: int  # absolute grid row of index 0
    cx0: int
    ny: np.ndarray  # nucleus centre y (level-0 px), _FAR when the cell has none
    nx: np.ndarray
    ca: np.ndarray  # cos(theta) / a
    sa: np.ndarray  # sin(theta) / a
    cb: np.ndarray  # cos(theta) / b
    sb: np.ndarray  # sin(theta) / b
    amp: np.ndarray  # haematoxylin concentration of the nucleus


def _cell_window(s: int, x0: int, y0: int, w: int, h: int) -> tuple[int, int, int, int, np.ndarray, np.ndarray]:
    """The cells (side ``s`` level-0 px) of a grid touching the window (level-0 x0, y0, w, h), one cell wider on
    each side: the first cell's (row, col) ``cy0, cx0``, the counts ``ncy, ncx`` and the row / column indices
    ``iy`` (ncy, 1) and ``ix`` (1, ncx) int64."""
    cy0, cx0 = y0 // s - 1, x0 // s - 1
    ncy, ncx = h // s + 2, w // s + 2
    return cy0, cx0, ncy, ncx, np.arange(cy0, cy0 + ncy)[:, None], np.arange(cx0, cx0 + ncx)[None, :]


def _cell_params(scene: _Scene, kind: str, x0: int, y0: int, w: int, h: int) -> _Cells:
    """Hashed nucleus parameters of every grid cell touching the window (level-0 x0, y0, w, h)."""
    s = scene.lymph_cell if kind == "lymph" else scene.tumor_cell
    salt = _S_LYMPH if kind == "lymph" else _S_TUMOR
    cy0, cx0, ncy, ncx, iy, ix = _cell_window(s, x0, y0, w, h)

    def u(k: int) -> np.ndarray:
        return _hash_u01(scene.seed, salt * 16 + k, iy, ix)

    if kind == "lymph":
        density = value_noise(scene.seed, _S_DENSITY, cx0 * s, cy0 * s, ncx, ncy, 1800.0, step=s)
        present = u(0) < np.clip(0.05 + 1.25 * density, 0.08, 0.93)
        big = u(1) < 0.1  # histiocyte-like larger, paler nuclei
        a = scene.lymph_radius * np.where(big, 1.4, 1.0) * (0.85 + 0.3 * u(2))
        aspect = np.where(big, 1.3 + 0.4 * u(3), 1.0 + 0.3 * u(3))
        amp = np.where(big, 0.55 + 0.2 * u(4), 1.25 + 0.45 * u(4))
    else:
        nest = value_noise(scene.seed, _S_NEST, cx0 * s, cy0 * s, ncx, ncy, 220.0, step=s)
        present = (nest > 0.27) & (u(0) < 0.96)
        lo, hi = scene.tumor_radius
        a = lo + (hi - lo) * u(2) ** 1.3  # pleomorphic: mostly mid-sized, a few giant nuclei
        aspect = 1.05 + 0.55 * u(3)
        amp = 1.6 + 0.8 * u(4)  # hyperchromatic: more haematoxylin than a lymphocyte, varying from cell to cell
    a = np.minimum(a, 0.95 * s)
    b = a / aspect
    # the centre may be anywhere in the cell as long as the nucleus stays within half a cell of it
    lo_c = np.maximum(0.0, a - s / 2)
    hi_c = np.minimum(float(s), 1.5 * s - a)
    ny = (iy * s + lo_c + (hi_c - lo_c) * u(5)).astype(np.float64)
    nx = (ix * s + lo_c + (hi_c - lo_c) * u(6)).astype(np.float64)
    ny = np.where(present, ny, _FAR)
    nx = np.where(present, nx, _FAR)
    theta = np.pi * u(7)
    c, sn = np.cos(theta), np.sin(theta)
    f32 = np.float32
    return _Cells(cy0, cx0, ny, nx, (c / a).astype(f32), (sn / a).astype(f32), (c / b).astype(f32),
                  (sn / b).astype(f32), amp.astype(f32))


def _nearest_nucleus(cells: _Cells, s: int, x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: normalized squared elliptic distance d2 to the nearest nucleus (< 1 inside) and its amplitude.

    Each cell holds at most one nucleus reaching at most half a cell into its neighbours, so a pixel
    in a half-cell sub-block only needs its own cell and the three neighbours on its side (2 x 2).
    Works on (sub-block row, row in sub-block, sub-block col, col in sub-block) arrays, so per-cell
    parameters broadcast without gathers.
    """
    s2 = s // 2
    nby, nbx = h // s2, w // s2
    sub_y, sub_x = np.arange(nby), np.arange(nbx)
    own_y = sub_y // 2 + (y0 // s - cells.cy0)
    own_x = sub_x // 2 + (x0 // s - cells.cx0)
    cand_y = np.stack([own_y, own_y + np.where(sub_y % 2 == 0, -1, 1)], axis=1)
    cand_x = np.stack([own_x, own_x + np.where(sub_x % 2 == 0, -1, 1)], axis=1)
    oy = (y0 + sub_y * s2 + 0.5)[:, None]  # level-0 centre of the first pixel of each sub-block
    ox = (x0 + sub_x * s2 + 0.5)[None, :]
    ly = np.arange(s2, dtype=np.float32)[None, :, None, None]
    lx = np.arange(s2, dtype=np.float32)[None, None, None, :]
    best = np.full((nby, s2, nbx, s2), np.inf, dtype=np.float32)
    amp = np.zeros_like(best)
    for a in range(2):
        for b in range(2):
            gy, gx = cand_y[:, a][:, None], cand_x[:, b][None, :]
            dy = (oy - cells.ny[gy, gx]).astype(np.float32)[:, None, :, None] + ly
            dx = (ox - cells.nx[gy, gx]).astype(np.float32)[:, None, :, None] + lx
            ca, sa = cells.ca[gy, gx][:, None, :, None], cells.sa[gy, gx][:, None, :, None]
            cb, sb = cells.cb[gy, gx][:, None, :, None], cells.sb[gy, gx][:, None, :, None]
            u = dx * ca + dy * sa
            v = dy * cb - dx * sb
            d2 = u * u
            d2 += v * v
            closer = d2 < best
            np.minimum(best, d2, out=best)
            np.copyto(amp, np.broadcast_to(cells.amp[gy, gx][:, None, :, None], amp.shape), where=closer)
    return best.reshape(h, w), amp.reshape(h, w)


def _lesion_mask(scene: _Scene, x0: int, y0: int, w: int, h: int) -> np.ndarray | None:
    """Boolean tumour mask of the window (pixel centres inside a lesion polygon), None when it touches none."""
    mask = None
    for lesion in scene.lesions:
        lx0, ly0, lx1, ly1 = lesion.bbox
        if lx1 < x0 or ly1 < y0 or lx0 > x0 + w or ly0 > y0 + h:
            continue
        m = fill_polygon(lesion.vertices, (h, w), 1.0, (x0, y0))
        mask = m if mask is None else (mask | m)
    return mask if mask is not None and mask.any() else None


def _stroma(scene: _Scene, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Eosin concentration of fibrous stroma: wavy bands (iso-lines of smooth noise) of varying strength."""
    fa = value_noise(scene.seed, _S_FIB_A, x0, y0, w, h, 300.0)
    fb = value_noise(scene.seed, _S_FIB_B, x0, y0, w, h, 24.0)
    fib = np.sin(fa * 45.0 + fb * 2.5)
    strength = value_noise(scene.seed, _S_STROMA, x0, y0, w, h, 400.0)
    return 0.36 + 0.24 * strength + 0.10 * fib + 0.08 * fb


def _normal_tissue(scene: _Scene, x0: int, y0: int, w: int, h: int, irregular: np.ndarray,
                   chromatin: np.ndarray, stroma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c_H, c_E) of lymph-node tissue: crowded small dark lymphocytes on pink fibrous stroma."""
    s = scene.lymph_cell
    cells = _cell_params(scene, "lymph", x0, y0, w, h)
    d2, amp = _nearest_nucleus(cells, s, x0, y0, w, h)
    d2 += 0.25 * irregular
    edge = np.clip((1.0 - d2) * 5.0, 0.0, 1.0)
    c_h = 0.06 + amp * edge * (0.8 + 0.4 * chromatin)
    c_e = stroma * (1.0 - 0.7 * edge)
    return c_h, c_e


def _tumor_tissue(scene: _Scene, x0: int, y0: int, w: int, h: int, irregular: np.ndarray,
                  chromatin: np.ndarray, stroma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c_H, c_E) of metastatic carcinoma: cohesive nests of large (10-20 um), crowded, pleomorphic,
    hyperchromatic nuclei (coarse dark chromatin, a thickened membrane, often a prominent nucleolus) in
    scant amphophilic cytoplasm, separated by thin stroma."""
    s = scene.tumor_cell
    cells = _cell_params(scene, "tumor", x0, y0, w, h)
    d2, amp = _nearest_nucleus(cells, s, x0, y0, w, h)
    d2 += 0.45 * irregular
    nest = value_noise(scene.seed, _S_NEST, x0, y0, w, h, 220.0)
    in_nest = np.clip((nest - 0.22) * 8.0, 0.0, 1.0)
    edge = np.clip((1.0 - d2) * 6.0, 0.0, 1.0)
    rim = np.clip((d2 - 0.6) * 4.0, 0.0, 1.0)
    # about 60 % of the nuclei (those with a high hashed amplitude fraction) show a nucleolus
    nucleolus = np.clip((0.045 - d2) * 30.0, 0.0, 1.0) * (amp > 1.92)
    clumps = np.clip((chromatin - 0.35) * 2.0, 0.0, 1.0)  # coarse chromatin
    nucleus_h = amp * (edge * (0.9 + 0.25 * rim) * (0.8 + 0.45 * clumps) + 0.5 * nucleolus)
    c_h = 0.05 + in_nest * 0.18 + nucleus_h
    cytoplasm = 0.30 + 0.12 * chromatin
    c_e = (stroma * (1.0 - in_nest) + cytoplasm * in_nest) * (1.0 - 0.55 * edge)
    return c_h, c_e


# --------------------------------------------------------------------------------------------------
# The "lymph-node" tissue mode: rare normal structures, vesicular tumour
# --------------------------------------------------------------------------------------------------

# salts of the lymph-node mode's value noise (apart from every stream of the simple mode, which it leaves unchanged)
(_S_FOLL, _S_SINUS, _S_SINUS_PATCH, _S_FAT, _S_VESSEL, _S_HAEM, _S_BLUR, _S_CAPW, _S_CAPWOB, _S_LN_NEST,
 _S_VFILL) = range(101, 112)
# salts of its hashed per-cell streams (hashed with salt * 16 + k, as _cell_params)
_C_LN_LYMPH, _C_LN_RBC, _C_LN_TUMOR, _C_LN_FAT = 40, 41, 42, 43
#: Optical density (R, G, B) of red blood cells (haemoglobin under eosin: orange-red), per unit concentration.
RBC_OD = (0.12, 1.0, 0.85)
#: Side (level-0 px) of the margin around a window within which the lymph-node zones are checked, so that a cell just
#: outside the window (whose nucleus reaches into it) gets the same parameters whichever window renders it.
_LN_CHECK_MARGIN = 128
_LN_CHECK_STEP = 16
#: Zones of the lymph-node mode and the lattice spacing (µm) of the noise each is cut from; see _ln_zone.
_LN_ZONES = ("gc", "mantle", "sinus", "fat", "lumen", "wall", "haem", "blur", "capsule")


def _ln_zone(scene: _Scene, name: str, x0: float, y0: float, w: int, h: int, step: float = 1.0,
             loose: float = 0.0) -> np.ndarray:
    """Weight in [0, 1] of one lymph-node zone, (h, w) float32 sampled at level-0 (x0 + (j + .5) step, y0 + (i + .5) step).

    Zones are thresholded smooth noise (a pure function of the level-0 point, so windows agree), each covering a
    few % of the tissue: ``gc`` germinal centres (~0.2-0.4 mm blobs), ``mantle`` their ring of dense small
    lymphocytes (includes ``gc``), ``sinus`` winding pale channels, ``fat`` adipose patches, ``lumen`` / ``wall`` a
    vessel's lumen (~30-60 µm) and wall, ``haem`` haemorrhage, ``blur`` out-of-focus patches, ``capsule`` the
    fibrous band (10-45 µm) along the tissue's edge. ``loose`` > 0 (the coarse presence check) widens every zone by
    the most the noise can change within ``loose`` level-0 px, so that a zone absent from a loose coarse sample is
    absent from every pixel near it.
    """
    mpp, seed = scene.mpp, scene.seed

    def vn(salt: int, spacing_um: float) -> tuple[np.ndarray, float]:
        sp = spacing_um / mpp
        # smoothstep value noise changes by at most 1.5 per lattice period along each axis
        return value_noise(seed, salt, x0, y0, w, h, sp, step), 1.5 * 2.0 * loose / sp

    if name in ("gc", "mantle"):
        v, m = vn(_S_FOLL, 330.0)
        return np.clip((v - (0.85 if name == "gc" else 0.82) + m) / 0.025, 0.0, 1.0)
    if name == "sinus":
        v, m = vn(_S_SINUS, 150.0)
        patch, mp = vn(_S_SINUS_PATCH, 600.0)
        ridge = np.clip((0.03 + m - np.abs(v - 0.5)) / 0.015, 0.0, 1.0)
        return ridge * np.clip((patch - 0.58 + mp) / 0.04, 0.0, 1.0)
    if name == "fat":
        v, m = vn(_S_FAT, 420.0)
        return np.clip((v - 0.78 + m) / 0.02, 0.0, 1.0)
    if name in ("lumen", "wall"):
        v, m = vn(_S_VESSEL, 100.0)
        lumen = np.clip((v - 0.875 + m) / 0.012, 0.0, 1.0)
        if name == "lumen":
            return lumen
        return np.clip((v - 0.855 + m) / 0.01, 0.0, 1.0) - (0.0 if loose else lumen)
    if name == "haem":
        v, m = vn(_S_HAEM, 260.0)
        return np.clip((v - 0.87 + m) / 0.03, 0.0, 1.0)
    if name == "blur":
        v, m = vn(_S_BLUR, 500.0)
        return np.clip((v - 0.90 + m) / 0.04, 0.0, 1.0)
    if name == "capsule":
        assert scene.edge_field is not None
        d = sample_field(scene.edge_field, FIELD_DS, x0, y0, w, h, step)
        wv, mw = vn(_S_CAPW, 500.0)
        wob, mwob = vn(_S_CAPWOB, 40.0)
        width = (10.0 + 35.0 * wv + 6.0 * (wob - 0.5)) / mpp
        # the distance field moves by at most about one level-0 px per px (two along a diagonal)
        slack = 2.0 * loose + (35.0 * mw + 6.0 * mwob) / mpp / 2.0 if loose else 0.0
        return np.clip((width + slack - d) / (0.25 * width), 0.0, 1.0)
    raise ValueError(name)


def _ln_active(scene: _Scene, x0: int, y0: int, w: int, h: int) -> frozenset[str]:
    """Zones that may be nonzero in the window or within _LN_CHECK_MARGIN of it (a coarse, loose check)."""
    m, st = _LN_CHECK_MARGIN, _LN_CHECK_STEP
    nw, nh = (w + 2 * m) // st, (h + 2 * m) // st
    return frozenset(name for name in _LN_ZONES
                     if _ln_zone(scene, name, x0 - m, y0 - m, nw, nh, st, loose=st).max() > 0.0)


def _ln_zones(scene: _Scene, active: frozenset[str], x0: float, y0: float, w: int, h: int,
              step: float = 1.0) -> dict[str, np.ndarray | float]:
    """Every zone's weight at the samples ((h, w) float32), 0.0 (a scalar) for the zones not in ``active``."""
    return {name: (_ln_zone(scene, name, x0, y0, w, h, step) if name in active else 0.0) for name in _LN_ZONES}


def _ln_lymph_cells(scene: _Scene, active: frozenset[str], x0: int, y0: int, w: int, h: int) -> _Cells:
    """Nucleus parameters of the lymph-node mode's normal tissue on the lymphocyte grid (as :func:`_cell_params`).

    Each cell's nucleus type follows the zones at the cell's centre: small dark round lymphocytes (the bulk; dense
    in a follicle's mantle), pale vesicular histiocytes (more in sinuses), larger pale vesicular centroblasts with a
    nucleolus in germinal centres (4.3-5.7 µm semi-axis, about a small tumour nucleus), sparse elongated dense
    fibroblast / endothelial nuclei in the capsule (along the edge), in vessel walls and in fat; none in a lumen.
    ``amp`` is negative for vesicular nuclei (open chromatin, a rim and a nucleolus when drawn).
    """
    s, mpp = scene.lymph_cell, scene.mpp
    cy0, cx0, ncy, ncx, iy, ix = _cell_window(s, x0, y0, w, h)

    def u(k: int) -> np.ndarray:
        return _hash_u01(scene.seed, _C_LN_LYMPH * 16 + k, iy, ix)

    z = _ln_zones(scene, active, cx0 * s, cy0 * s, ncx, ncy, step=s)
    density = value_noise(scene.seed, _S_DENSITY, cx0 * s, cy0 * s, ncx, ncy, 1800.0, step=s)
    p = np.clip(0.2 + 1.1 * density, 0.25, 0.95)
    gc = np.asarray(z["gc"])
    mantle = np.clip(np.asarray(z["mantle"]) - gc, 0.0, 1.0)
    flat = np.maximum(np.maximum(z["capsule"], z["wall"]), z["fat"])
    for weight, target in ((mantle, 0.95), (gc, 0.85), (z["sinus"], 0.2), (z["capsule"], 0.10), (z["fat"], 0.06),
                           (z["wall"], 0.4), (z["lumen"], 0.0)):
        p = p * (1.0 - weight) + target * weight
    p = p * (1.0 - 0.6 * np.asarray(z["haem"]))
    present = u(0) < p
    centro = u(8) < 0.8 * gc
    fibro = ~centro & (u(8) < flat)
    histio = ~centro & ~fibro & (u(1) < 0.08 + 0.4 * np.asarray(z["sinus"]))
    a = scene.lymph_radius * (0.85 + 0.3 * u(2))
    aspect = 1.0 + 0.3 * u(3)
    amp = 1.25 + 0.45 * u(4)
    a = np.where(histio, 1.45 * a, a)
    aspect = np.where(histio, 1.2 + 0.4 * u(3), aspect)
    amp = np.where(histio, -(0.6 + 0.2 * u(4)), amp)
    a = np.where(centro, (4.3 + 1.4 * u(2)) / mpp, a)
    aspect = np.where(centro, 1.0 + 0.35 * u(3), aspect)
    amp = np.where(centro, -(0.8 + 0.25 * u(4)), amp)
    a = np.where(fibro, (5.0 + 2.0 * u(2)) / mpp, a)
    aspect = np.where(fibro, 3.0 + 2.0 * u(3), aspect)
    amp = np.where(fibro, 1.0 + 0.3 * u(4), amp)
    theta = np.pi * u(7)
    if "capsule" in active:  # fibroblasts of the capsule lie along the tissue's edge (across the distance's gradient)
        e = scene.edge_field
        gx = (sample_field(e, FIELD_DS, cx0 * s + 16, cy0 * s, ncx, ncy, s)
              - sample_field(e, FIELD_DS, cx0 * s - 16, cy0 * s, ncx, ncy, s))
        gy = (sample_field(e, FIELD_DS, cx0 * s, cy0 * s + 16, ncx, ncy, s)
              - sample_field(e, FIELD_DS, cx0 * s, cy0 * s - 16, ncx, ncy, s))
        along = np.arctan2(gy, gx) + np.pi / 2 + 0.3 * (u(9) - 0.5)
        theta = np.where(fibro & (np.asarray(z["capsule"]) > 0.5) & (np.hypot(gx, gy) > 1e-3), along, theta)
    return _make_cells(s, cy0, cx0, iy, ix, present, a, aspect, amp, theta, u(5), u(6))


def _make_cells(s: int, cy0: int, cx0: int, iy: np.ndarray, ix: np.ndarray, present: np.ndarray, a: np.ndarray,
                aspect: np.ndarray, amp: np.ndarray, theta: np.ndarray, uy: np.ndarray, ux: np.ndarray) -> _Cells:
    """Pack per-cell nucleus shapes into :class:`_Cells` (centres placed as :func:`_cell_params` places them)."""
    a = np.minimum(a, 0.95 * s)
    b = a / aspect
    lo_c = np.maximum(0.0, a - s / 2)
    hi_c = np.minimum(float(s), 1.5 * s - a)
    ny = np.where(present, iy * s + lo_c + (hi_c - lo_c) * uy, _FAR).astype(np.float64)
    nx = np.where(present, ix * s + lo_c + (hi_c - lo_c) * ux, _FAR).astype(np.float64)
    c, sn = np.cos(theta), np.sin(theta)
    f32 = np.float32
    shape = np.broadcast_shapes(iy.shape, ix.shape)
    return _Cells(cy0, cx0, np.broadcast_to(ny, shape), np.broadcast_to(nx, shape),
                  np.broadcast_to(c / a, shape).astype(f32), np.broadcast_to(sn / a, shape).astype(f32),
                  np.broadcast_to(c / b, shape).astype(f32), np.broadcast_to(sn / b, shape).astype(f32),
                  np.broadcast_to(amp, shape).astype(f32))


def _ln_rbc_cells(scene: _Scene, active: frozenset[str], x0: int, y0: int, w: int, h: int) -> _Cells:
    """Red blood cells (discs of 3.2-3.8 µm radius, no nucleus) on the lymphocyte grid: packed in a vessel's lumen
    (fewer where the vessel is partly empty), scattered in haemorrhage. ``amp`` is the RBC concentration."""
    s, mpp = scene.lymph_cell, scene.mpp
    cy0, cx0, ncy, ncx, iy, ix = _cell_window(s, x0, y0, w, h)

    def u(k: int) -> np.ndarray:
        return _hash_u01(scene.seed, _C_LN_RBC * 16 + k, iy, ix)

    z = _ln_zones(scene, active, cx0 * s, cy0 * s, ncx, ncy, step=s)
    fill = value_noise(scene.seed, _S_VFILL, cx0 * s, cy0 * s, ncx, ncy, 40.0 / mpp, step=s)
    p = np.maximum(np.asarray(z["lumen"]) * np.clip(0.2 + 1.2 * fill, 0.0, 0.97), 0.55 * np.asarray(z["haem"]))
    present = u(0) < p
    a = (3.2 + 0.6 * u(2)) / mpp
    aspect = 1.0 + 0.25 * u(3)
    amp = 0.75 + 0.3 * u(4)
    return _make_cells(s, cy0, cx0, iy, ix, present, a, aspect, amp, np.pi * u(7), u(5), u(6))


def _adipocyte_membranes(scene: _Scene, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Fat: (h, w) float32 in [0, 1], 1 on the thin (about 1.5 µm) membranes between adipocytes (Voronoi cells of
    hashed points, about 60 µm across), 0 inside their empty vacuoles."""
    g = 60.0 / scene.mpp
    ys = y0 + np.arange(h) + 0.5
    xs = x0 + np.arange(w) + 0.5
    iy, ix = np.floor(ys / g).astype(np.int64), np.floor(xs / g).astype(np.int64)
    ly = np.arange(iy.min() - 1, iy.max() + 2)
    lx = np.arange(ix.min() - 1, ix.max() + 2)
    py = (ly[:, None] + 0.15 + 0.7 * _hash_u01(scene.seed, _C_LN_FAT * 16, ly[:, None], lx[None, :])) * g
    px = (lx[None, :] + 0.15 + 0.7 * _hash_u01(scene.seed, _C_LN_FAT * 16 + 1, ly[:, None], lx[None, :])) * g
    ry, rx = (iy - ly[0])[:, None], (ix - lx[0])[None, :]
    f1 = np.full((h, w), np.inf, dtype=np.float32)
    f2 = np.full((h, w), np.inf, dtype=np.float32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            gy, gx = ry + dy, rx + dx
            d = np.hypot((ys[:, None] - py[gy, gx]).astype(np.float32), (xs[None, :] - px[gy, gx]).astype(np.float32))
            f2 = np.minimum(f2, np.maximum(f1, d))
            f1 = np.minimum(f1, d)
    half = 1.0 / scene.mpp
    return np.clip((2.0 * half - (f2 - f1)) / half, 0.0, 1.0)


def _normal_tissue_ln(scene: _Scene, x0: int, y0: int, w: int, h: int, irregular: np.ndarray,
                      chromatin: np.ndarray, stroma: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(c_H, c_E, c_RBC or None) of the lymph-node mode's normal tissue, each (h, w) float32: the simple mode's
    lymphocytes and stroma plus the zones of :func:`_ln_zone` (follicles with germinal centres, sinuses, fat,
    vessels and haemorrhage with red blood cells, out-of-focus patches, the fibrous capsule)."""
    s = scene.lymph_cell
    active = _ln_active(scene, x0, y0, w, h)
    z = _ln_zones(scene, active, x0, y0, w, h)
    cells = _ln_lymph_cells(scene, active, x0, y0, w, h)
    d2, amp = _nearest_nucleus(cells, s, x0, y0, w, h)
    vesicular = amp < 0
    np.abs(amp, out=amp)
    d2 += np.where(vesicular, 0.12, 0.25) * irregular
    blur = z["blur"]
    if "blur" in active:
        edge = np.clip((1.0 + 0.45 * blur - d2) * (5.0 / (1.0 + 5.0 * blur)), 0.0, 1.0)
        grain = chromatin * (1.0 - blur) + 0.5 * blur
    else:
        edge = np.clip((1.0 - d2) * 5.0, 0.0, 1.0)
        grain = chromatin
    rim = np.clip((d2 - 0.72) * 5.0, 0.0, 1.0)
    nucleolus = np.clip((0.03 - d2) * 50.0, 0.0, 1.0)
    dense_h = 0.8 + 0.4 * grain
    open_h = 0.5 + 0.3 * rim + 0.3 * grain + 0.8 * nucleolus
    c_h = 0.06 + amp * edge * np.where(vesicular, open_h, dense_h)
    # interstitial white spaces between the cells (fixation retraction), a few µm across
    fb = value_noise(scene.seed, _S_FIB_B, x0, y0, w, h, 24.0)
    c_e = stroma * (1.0 - 0.45 * np.clip((fb - 0.7) * 3.3, 0.0, 1.0))
    if "sinus" in active:
        c_e = c_e * (1.0 - 0.55 * z["sinus"])
    if "gc" in active:
        c_e = c_e * (1.0 - z["gc"]) + (0.38 + 0.08 * fb) * z["gc"]  # pale cytoplasm of the germinal centre
    if "capsule" in active:
        cap = z["capsule"]
        d = sample_field(scene.edge_field, FIELD_DS, x0, y0, w, h)
        wave = np.sin(d * (2 * np.pi * scene.mpp / 7.0) + 5.0 * fb + 3.0 * chromatin * 0.3)
        collagen = (0.72 + 0.12 * wave) * (1.0 - 0.75 * np.clip((wave - 0.9) * 10.0, 0.0, 1.0))
        c_e = c_e * (1.0 - cap) + collagen * cap
        c_h = c_h - 0.04 * cap
    if "wall" in active:
        c_e = c_e * (1.0 - z["wall"]) + (0.75 + 0.1 * fb) * z["wall"]
    if "fat" in active:
        fat = z["fat"]
        mem = _adipocyte_membranes(scene, x0, y0, w, h)
        keep = 1.0 - fat * (1.0 - mem)
        c_e = c_e * keep + fat * mem * 0.45
        c_h = c_h * (1.0 - fat * (1.0 - np.clip(1.5 * mem, 0.0, 1.0)))
    if "lumen" in active:
        c_e = c_e * (1.0 - z["lumen"]) + 0.12 * z["lumen"]  # pale plasma
        c_h = c_h * (1.0 - 0.9 * z["lumen"])
    if "blur" in active:
        c_e = c_e * (1.0 - 0.5 * blur) + 0.5 * blur * 0.42
    c_e = c_e * (1.0 - 0.7 * edge)
    c_r = None
    if "lumen" in active or "haem" in active:
        rbc_cells = _ln_rbc_cells(scene, active, x0, y0, w, h)
        rd2, ramp = _nearest_nucleus(rbc_cells, s, x0, y0, w, h)
        disc = np.clip((1.0 - rd2) * 4.0, 0.0, 1.0) * (1.0 - 0.3 * np.clip(1.0 - 3.0 * rd2, 0.0, 1.0))
        c_r = ramp * disc * (1.0 - edge)
        c_e = c_e * (1.0 - 0.8 * disc)
    return c_h, c_e, c_r


def _tumor_tissue_ln(scene: _Scene, x0: int, y0: int, w: int, h: int, irregular: np.ndarray,
                     chromatin: np.ndarray, stroma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c_H, c_E), each (h, w) float32, of the lymph-node mode's metastatic carcinoma: cohesive sheets of large
    (10-18 µm), round-to-oval, pleomorphic nuclei with VESICULAR chromatin (pale, finely granular, a thick nuclear
    membrane and a prominent nucleolus) in ample pale amphophilic cytoplasm, split by thin stromal septa with
    retraction clefts. A nucleus holds no more haematoxylin per pixel than a lymphocyte (it is larger, not darker)."""
    s = scene.tumor_cell
    cy0, cx0, ncy, ncx, iy, ix = _cell_window(s, x0, y0, w, h)

    def u(k: int) -> np.ndarray:
        return _hash_u01(scene.seed, _C_LN_TUMOR * 16 + k, iy, ix)

    nest_sp = 140.0 / scene.mpp
    cell_nest = value_noise(scene.seed, _S_LN_NEST, cx0 * s, cy0 * s, ncx, ncy, nest_sp, step=s)
    present = (cell_nest > 0.12) & (u(0) < 0.97)
    lo, hi = 6.0 / scene.mpp, 9.5 / scene.mpp
    a = lo + (hi - lo) * u(2) ** 1.3
    amp = 0.85 + 0.3 * u(4)
    cells = _make_cells(s, cy0, cx0, iy, ix, present, a, 1.0 + 0.3 * u(3), amp, np.pi * u(7), u(5), u(6))
    d2, amp_px = _nearest_nucleus(cells, s, x0, y0, w, h)
    d2 += 0.2 * irregular
    nest = value_noise(scene.seed, _S_LN_NEST, x0, y0, w, h, nest_sp)
    in_nest = np.clip((nest - 0.07) * 10.0, 0.0, 1.0)
    cleft = np.clip(1.0 - np.abs(nest - 0.082) / 0.005, 0.0, 1.0)  # retraction cleft around a sheet
    edge = np.clip((1.0 - d2) * 6.0, 0.0, 1.0)
    rim = np.clip((d2 - 0.75) * 6.0, 0.0, 1.0)
    # about 80 % of the nuclei (hashed amplitude above 0.91) show a nucleolus
    nucleolus = np.clip((0.025 - d2) * 50.0, 0.0, 1.0) * (amp_px > 0.91)
    nucleus_h = amp_px * edge * (0.5 + 0.5 * chromatin + 0.3 * rim) + 0.6 * nucleolus
    c_h = 0.05 + in_nest * 0.18 + nucleus_h
    fb = value_noise(scene.seed, _S_FIB_B, x0, y0, w, h, 24.0)
    cytoplasm = 0.24 + 0.12 * chromatin + 0.12 * fb
    c_e = (stroma * (1.0 - in_nest) + cytoplasm * in_nest) * (1.0 - 0.45 * edge) + 0.25 * nucleolus
    keep = 1.0 - 0.5 * cleft
    c_h, c_e = c_h * keep, c_e * keep
    # a few tumour-infiltrating lymphocytes (a fifth of the normal lymphocyte grid's nuclei), drawn over the tumour
    lymph = _cell_params(scene, "lymph", x0, y0, w, h)
    gy = np.arange(lymph.cy0, lymph.cy0 + lymph.ny.shape[0])[:, None]
    gx = np.arange(lymph.cx0, lymph.cx0 + lymph.ny.shape[1])[None, :]
    tils = _hash_u01(scene.seed, _C_LN_TUMOR * 16 + 15, gy, gx) < 0.2
    lymph = dataclasses.replace(lymph, ny=np.where(tils, lymph.ny, _FAR), nx=np.where(tils, lymph.nx, _FAR))
    ld2, lamp = _nearest_nucleus(lymph, scene.lymph_cell, x0, y0, w, h)
    ledge = np.clip((1.0 - ld2 - 0.25 * irregular) * 5.0, 0.0, 1.0)
    c_h = c_h * (1.0 - ledge) + (0.06 + lamp * (0.8 + 0.4 * chromatin)) * ledge
    c_e = c_e * (1.0 - 0.7 * ledge)
    return c_h, c_e


def _background_tile(scene: _Scene, variant: int, w: int, h: int) -> np.ndarray:
    """Bare glass: background OD with slight per-pixel noise, (h, w, 3) uint8."""
    rng = np.random.default_rng([scene.seed, 0xB6, variant])
    noise = (rng.random((h, w), dtype=np.float32) - 0.5) * 0.02
    od = np.asarray(scene.stain.background_od, dtype=np.float32)[None, None, :] + noise[..., None]
    return np.round(255.0 * np.exp(-od)).astype(np.uint8)


def render_region(scene: _Scene, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Render the level-0 window (x0, y0, w, h) of the slide as (h, w, 3) uint8 RGB.

    ``x0``, ``y0``, ``w``, ``h`` must be multiples of 128 (the largest nucleus grid cell). The result
    depends only on the scene and the window; tiles of a slide rendered separately join seamlessly
    (except the glass's per-pixel noise, which is drawn per window).
    """
    if any(v % 128 for v in (x0, y0, w, h)):
        raise ValueError(f"render window ({x0}, {y0}, {w}, {h}) must be aligned to 128 level-0 px")
    coarse_tissue = sample_field(scene.tissue_field, FIELD_DS, x0, y0, w // 64, h // 64, step=64)
    pen = None
    if scene.pen is not None:
        coarse_pen = sample_field(scene.pen.field, FIELD_DS, x0, y0, w // 64, h // 64, step=64)
        if coarse_pen.max() > 0.002:
            pen = sample_field(scene.pen.field, FIELD_DS, x0, y0, w, h)
    lesion = _lesion_mask(scene, x0, y0, w, h)
    if coarse_tissue.max() < 0.2 and lesion is None:
        if pen is None and scene.background_tiles and (w, h) == (RENDER_BLOCK, BAND_ROWS):
            variant = int(_hash_u01(scene.seed, 99, np.array(y0), np.array(x0)).item() * len(scene.background_tiles))
            return scene.background_tiles[variant].copy()
        tissue = None
    else:
        tissue = sample_field(scene.tissue_field, FIELD_DS, x0, y0, w, h)
        tissue += 0.5 * (value_noise(scene.seed, _S_EDGE, x0, y0, w, h, 60.0) - 0.5)
        tissue = np.clip((tissue - 0.45) * 8.0, 0.0, 1.0)
        if lesion is not None:
            np.maximum(tissue, lesion, out=tissue)
        if not tissue.any():
            tissue = None

    st = scene.stain
    od = np.empty((h, w, 3), dtype=np.float32)
    rng = np.random.default_rng([scene.seed, 0xA1, y0, x0])
    noise = (rng.random((h, w), dtype=np.float32) - 0.5) * 0.02
    if tissue is not None:
        irregular = value_noise(scene.seed, _S_IRREG, x0, y0, w, h, 7.0) - 0.5
        chromatin = value_noise(scene.seed, _S_CHROM, x0, y0, w, h, 2.5)
        stroma = _stroma(scene, x0, y0, w, h)
        ln = scene.tissue == "lymph-node"
        c_r = None
        if lesion is None or not lesion.all():
            if ln:
                c_h, c_e, c_r = _normal_tissue_ln(scene, x0, y0, w, h, irregular, chromatin, stroma)
            else:
                c_h, c_e = _normal_tissue(scene, x0, y0, w, h, irregular, chromatin, stroma)
        if lesion is not None:
            t_h, t_e = (_tumor_tissue_ln if ln else _tumor_tissue)(scene, x0, y0, w, h, irregular, chromatin, stroma)
            if c_r is not None:
                c_r = np.where(lesion, 0.0, c_r)
            if lesion.all():
                c_h, c_e = t_h, t_e
            else:
                c_h = np.where(lesion, t_h, c_h)
                c_e = np.where(lesion, t_e, c_e)
        c_h *= tissue * st.scale_h
        c_e *= tissue * st.scale_e
        for ch in range(3):
            od[..., ch] = c_h * st.od_h[ch] + c_e * st.od_e[ch] + (st.background_od[ch] + noise)
        if c_r is not None:
            c_r *= tissue * st.scale_e
            for ch in range(3):
                od[..., ch] += c_r * RBC_OD[ch]
    else:
        for ch in range(3):
            od[..., ch] = st.background_od[ch] + noise
    if pen is not None:
        ink = INK_OD[scene.pen.color]
        for ch in range(3):
            od[..., ch] += pen * ink[ch]
    np.negative(od, out=od)
    np.exp(od, out=od)
    od *= 255.0
    return np.rint(od).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Pyramid TIFF writing
# --------------------------------------------------------------------------------------------------


def _level_count(width: int, height: int) -> int:
    """Levels down to one of at most 1024 px: at least 4, at most 9 (a 256-row band halves 8 times).

    Downsample 2 per level, like the Camelyon16 TIFFs, so that 20x (0.486 µm/px) and 10x (0.972 µm/px)
    are native levels of a 0.243 µm/px slide, as they are in the real data.
    """
    n = 1
    while max(width, height) / PYRAMID_FACTOR ** (n - 1) > 1024 and n < 9:
        n += 1
    return max(4, n)


def level_dimensions(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of every pyramid level of a ``width`` x ``height`` slide (downsample 2 per level)."""
    return [
        (math.ceil(width / PYRAMID_FACTOR**k), math.ceil(height / PYRAMID_FACTOR**k))
        for k in range(_level_count(width, height))
    ]


def _downsample(band: np.ndarray) -> np.ndarray:
    """Block mean over PYRAMID_FACTOR x PYRAMID_FACTOR pixels (rounded), uint8 -> uint8."""
    f = PYRAMID_FACTOR
    h, w, c = band.shape
    s = band.reshape(h // f, f, w // f, f, c).sum(axis=(1, 3), dtype=np.uint32)
    return ((s + f * f // 2) // (f * f)).astype(np.uint8)


def _tiles_of_band(band: np.ndarray, width: int) -> Iterator[np.ndarray]:
    """TIFF_TILE x TIFF_TILE tiles of a band (rows multiple of the tile), row-major, up to ``width`` columns."""
    t = TIFF_TILE
    for ty in range(0, band.shape[0], t):
        for tx in range(0, width, t):
            tile = band[ty:ty + t, tx:tx + t]
            if tile.shape[:2] != (t, t):
                full = np.full((t, t, 3), 255, dtype=np.uint8)
                full[: tile.shape[0], : tile.shape[1]] = tile
                tile = full
            yield np.ascontiguousarray(tile)


class _LevelFiles:
    """Coarser pyramid levels accumulated from level-0 bands into raw RGB files in a temporary directory."""

    def __init__(self, tmpdir: Path, dims: list[tuple[int, int]]):
        self.dims = dims
        self.paths = [tmpdir / f"level{k}.rgb" for k in range(len(dims))]
        self.files = {k: open(self.paths[k], "wb") for k in range(1, len(dims))}
        self.rows_written = {k: 0 for k in self.files}

    def add_band(self, band: np.ndarray) -> None:
        """Downsample a level-0 band (BAND_ROWS rows, padded width) into every coarser level."""
        for k in range(1, len(self.dims)):
            band = _downsample(band)
            w_k, h_k = self.dims[k]
            keep = min(band.shape[0], h_k - self.rows_written[k])
            if keep > 0:
                self.files[k].write(np.ascontiguousarray(band[:keep, :w_k]).tobytes())
                self.rows_written[k] += keep

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        for k, rows in self.rows_written.items():
            if rows != self.dims[k][1]:
                raise RuntimeError(f"pyramid level {k} has {rows} rows, expected {self.dims[k][1]}")

    def read_rows(self, k: int, row0: int, n: int) -> np.ndarray:
        """Rows [row0, row0 + n) of level ``k`` as (n, w, 3) uint8 (fewer at the bottom)."""
        w_k, h_k = self.dims[k]
        n = min(n, h_k - row0)
        with open(self.paths[k], "rb") as f:
            f.seek(row0 * w_k * 3)
            data = np.frombuffer(f.read(n * w_k * 3), dtype=np.uint8)
        return data.reshape(n, w_k, 3)

    def tiles(self, k: int) -> Iterator[np.ndarray]:
        """TIFF tiles of level ``k``, row-major."""
        w_k, h_k = self.dims[k]
        for row0 in range(0, h_k, TIFF_TILE):
            rows = self.read_rows(k, row0, TIFF_TILE)
            if rows.shape[0] < TIFF_TILE:
                pad = np.full((TIFF_TILE, w_k, 3), 255, dtype=np.uint8)
                pad[: rows.shape[0]] = rows
                rows = pad
            yield from _tiles_of_band(rows, w_k)


def _render_band(scene: _Scene, by: int, padded_width: int) -> np.ndarray:
    """Level-0 rows [by * BAND_ROWS, (by + 1) * BAND_ROWS) over the padded width, (BAND_ROWS, padded_width, 3) uint8."""
    b = RENDER_BLOCK
    band = np.empty((BAND_ROWS, padded_width, 3), dtype=np.uint8)
    for bx in range(padded_width // b):
        band[:, bx * b:(bx + 1) * b] = render_region(scene, bx * b, by * BAND_ROWS, b, BAND_ROWS)
    return band


def _aperio_description(width: int, height: int, level_w: int, level_h: int, mpp: float, first: bool, kind: str = "",
                        tissue: str = "simple") -> str:
    """Aperio-style ImageDescription: the level-0 page carries AppMag and MPP (OpenSlide's objective power and mpp)
    and, for a tissue mode other than ``simple`` (whose files stay as they were), ``SynthTissue``."""
    base = f"{_APERIO_HEADER}{width}x{height} [0,0 {width}x{height}] ({TIFF_TILE}x{TIFF_TILE})"
    if first:
        extra = "" if tissue == "simple" else f"|SynthTissue = {tissue}"
        return f"{base} JPEG/RGB Q={JPEG_QUALITY}|AppMag = {OBJECTIVE_POWER}|MPP = {mpp:.4g}{extra}"
    return f"{base} -> {level_w}x{level_h} JPEG/RGB Q={JPEG_QUALITY}{kind}"


def _write_pyramid(path: Path, scene: _Scene, workers: int) -> list[tuple[int, int]]:
    """Render and write the slide's pyramidal TIFF to ``path`` (not atomic: the caller renames)."""
    width, height, mpp = scene.width, scene.height, scene.mpp
    dims = level_dimensions(width, height)
    b = RENDER_BLOCK
    padded_width = math.ceil(width / b) * b
    n_bands = math.ceil(height / BAND_ROWS)
    px_per_cm = 1e4 / mpp
    bigtiff = width * height * 3 > 2**31
    scene.background_tiles = [_background_tile(scene, v, b, BAND_ROWS) for v in range(8)]
    common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": JPEG_QUALITY},
                  metadata=None, subfiletype=0, resolutionunit="CENTIMETER", software="wsi-ad synth",
                  buffersize=TIFF_BUFFER_BYTES)
    with tempfile.TemporaryDirectory(prefix=".synth-", dir=path.parent) as tmp:
        levels = _LevelFiles(Path(tmp), dims)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers) if workers > 1 else None

        def level0_tiles() -> Iterator[np.ndarray]:
            if pool is None:
                bands: Iterator[np.ndarray] = (_render_band(scene, by, padded_width) for by in range(n_bands))
            else:
                bands = _prefetch(pool, (lambda by=by: _render_band(scene, by, padded_width) for by in range(n_bands)), workers)
            for band in bands:
                levels.add_band(band)
                yield from _tiles_of_band(band, width)

        try:
            with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
                tw.write(level0_tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE),
                         description=_aperio_description(width, height, width, height, mpp, True, tissue=scene.tissue),
                         resolution=(px_per_cm, px_per_cm), maxworkers=workers, **common)
                levels.close()
                thumb = _thumbnail(levels)
                tw.write(thumb, rowsperstrip=16, description=_aperio_description(
                    width, height, thumb.shape[1], thumb.shape[0], mpp, False, " - thumbnail"),
                    resolution=(px_per_cm * thumb.shape[1] / width, px_per_cm * thumb.shape[0] / height), **common)
                for k in range(1, len(dims)):
                    w_k, h_k = dims[k]
                    res = px_per_cm / PYRAMID_FACTOR**k
                    tw.write(levels.tiles(k), shape=(h_k, w_k, 3), dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE),
                             description=_aperio_description(width, height, w_k, h_k, mpp, False),
                             resolution=(res, res), maxworkers=workers, **common)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return dims


def _prefetch(pool: concurrent.futures.Executor, jobs: Iterator, depth: int) -> Iterator:
    """Run the callables of ``jobs`` in ``pool`` keeping ``depth`` ahead; yield results in order."""
    pending: list[concurrent.futures.Future] = []
    for job in jobs:
        pending.append(pool.submit(job))
        if len(pending) > depth:
            yield pending.pop(0).result()
    while pending:
        yield pending.pop(0).result()


def _thumbnail(levels: _LevelFiles) -> np.ndarray:
    """Thumbnail (longest edge <= THUMBNAIL_MAX) from the coarsest level that is at least that big."""
    k = len(levels.dims) - 1
    while k > 1 and max(levels.dims[k]) < THUMBNAIL_MAX:
        k -= 1
    w_k, h_k = levels.dims[k]
    img = levels.read_rows(k, 0, h_k)
    scale = min(1.0, THUMBNAIL_MAX / max(w_k, h_k))
    size = (max(1, round(w_k * scale)), max(1, round(h_k * scale)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX)) if scale < 1 else img.copy()


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthSlide:
    """A written synthetic slide.

    ``annotations`` are the tumour polygons drawn (level-0 px; empty for a normal slide); ``mpp`` is
    µm/px at level 0; ``level_dimensions`` the (width, height) of every pyramid level.
    """

    path: Path
    annotations: list[Annotation]
    mpp: float
    level_dimensions: list[tuple[int, int]]
    seed: int
    stain: str
    pen_marks: bool
    tissue: str = "simple"

    @property
    def is_tumor(self) -> bool:
        return bool(self.annotations)

    @property
    def largest_lesion_mm(self) -> float:
        """Major axis (mm) of the largest lesion; 0 for a normal slide."""
        return max((a.major_axis_px() for a in self.annotations), default=0.0) * self.mpp / 1000.0

    @property
    def metastasis(self) -> str:
        """Camelyon16 reference category: ``"Macro"`` (> 2 mm), ``"Micro"`` or ``"None"``."""
        if not self.annotations:
            return "None"
        return "Macro" if self.largest_lesion_mm > MACRO_THRESHOLD_MM else "Micro"


def synthesize_slide(
    path: str | os.PathLike,
    *,
    width_px: int = 16384,
    height_px: int | None = None,
    seed: int = 0,
    tumor: bool | int = False,
    lesion_sizes_mm: Sequence[float] | None = None,
    stain: str | Stain = "A",
    pen_marks: bool = False,
    mpp: float = CAMELYON_MPP,
    workers: int | None = None,
    tissue: str = DEFAULT_TISSUE,
) -> SynthSlide:
    """Write one synthetic H&E lymph-node slide as a pyramidal tiled TIFF (Aperio-style) and describe it.

    Args:
        path: output ``.tif``; written atomically (temporary sibling, then rename).
        width_px, height_px: level-0 size in pixels (height defaults to width); at least 2048.
        seed: everything (tissue, lesions, nuclei, stain jitter, noise) derives from it; the same
            arguments give a byte-identical file.
        tumor: False/0 for a normal slide, True for 1-3 lesions, or the number of lesions.
        lesion_sizes_mm: explicit lesion major axes (mm), overriding ``tumor``'s count; a size that
            does not fit in the tissue raises ValueError. Random sizes are micro (0.3-1.5 mm) and, when
            the tissue is big enough, sometimes one macro (> 2 mm).
        stain: a ``HOSPITAL_STAINS`` name (``"A"``, ``"B"``) or a ``Stain``; jittered per slide.
        pen_marks: draw 1-3 ink strokes (green, blue or red) along tissue edges.
        mpp: level-0 resolution in µm/px (written to the Aperio description and the TIFF resolution
            tags; nuclei and lesion sizes in µm/mm are converted with it).
        workers: rendering/compression threads (default: CPU count, at most 4).
        tissue: how the tissue is drawn, one of :data:`TISSUE_MODES`: ``"simple"`` (the original look) or
            ``"lymph-node"`` (rare normal structures, vesicular rather than dark tumour nuclei). It changes only
            the pixels (islands, lesions, stain and pen are the same); recorded in ``SynthSlide.tissue`` and, in the
            level-0 page's Aperio description, as ``SynthTissue`` (OpenSlide: ``aperio.SynthTissue``).

    Returns the ``SynthSlide`` (path, tumour annotations in level-0 px, mpp, level dimensions).
    """
    width = int(width_px)
    height = int(width_px if height_px is None else height_px)
    if min(width, height) < 2048:
        raise ValueError(f"slide size {width}x{height} px is too small (at least 2048 px per side)")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    stain_obj = HOSPITAL_STAINS[stain] if isinstance(stain, str) else stain
    if lesion_sizes_mm is not None:
        n_lesions = len(lesion_sizes_mm)
    else:
        n_lesions = _lesion_count(seed, width, height, mpp) if tumor is True else int(tumor)
    scene = _build_scene(width, height, seed, n_lesions, lesion_sizes_mm, stain_obj, pen_marks, mpp, tissue)
    workers = workers or min(4, os.cpu_count() or 1)
    path = Path(path)
    with atomic_path(path) as temp:
        dims = _write_pyramid(temp, scene, workers)
    return SynthSlide(path, list(scene.lesions), mpp, dims, seed, stain_obj.name, pen_marks, tissue)


def _lesion_count(seed: int, width: int, height: int, mpp: float) -> int:
    """Number of lesions a ``tumor=True`` slide gets: 1-3, at most one per 5 mm² of slide (so they fit)."""
    area_mm2 = width * height * (mpp / 1000.0) ** 2
    n_max = int(np.clip(area_mm2 // 5, 1, 3))
    return int(np.random.default_rng([seed, 0x1E5]).integers(1, n_max + 1))


def render_thumbnail(slide: SynthSlide | str | os.PathLike, max_size: int = 1024) -> np.ndarray:
    """RGB thumbnail (longest edge ``max_size``) of a written slide, read back with OpenSlide."""
    import openslide

    p = slide.path if isinstance(slide, SynthSlide) else Path(slide)
    with openslide.OpenSlide(str(p)) as osr:
        return np.asarray(osr.get_thumbnail((max_size, max_size)).convert("RGB"))


@dataclass(frozen=True)
class SynthDataset:
    """A synthetic dataset laid out like Camelyon16.

    ``test_labels`` maps ``Test_001``-style names to ``"Tumor"``/``"Normal"``; ``slides`` maps file
    stems (``normal_001``, ``tumor_001``, ``test_001``) to their ``SynthSlide``.
    """

    root: Path
    normal: list[Path]
    tumor: list[Path]
    tumor_annotations: list[Path]
    test: list[Path]
    test_annotations: list[Path]
    reference_csv: Path
    test_labels: dict[str, str]
    slides: dict[str, SynthSlide]

    def describe(self) -> str:
        """A few human-readable lines: where it is, how many slides of each kind, the lesions."""
        n_test_tumor = sum(label == "Tumor" for label in self.test_labels.values())
        lines = [f"wrote {self.root}: {len(self.normal)} normal + {len(self.tumor)} tumour training slides, "
                 f"{len(self.test)} test slides ({n_test_tumor} tumour), reference {self.reference_csv}"]
        tissues = sorted({slide.tissue for slide in self.slides.values()})
        if tissues != ["simple"]:
            lines[0] += f" (tissue: {', '.join(tissues)})"
        for stem, slide in sorted(self.slides.items()):
            if slide.is_tumor:
                lines.append(f"  {stem}: {len(slide.annotations)} lesion(s), largest {slide.largest_lesion_mm:.2f} mm "
                             f"({slide.metastasis})")
        return "\n".join(lines)


_PRIMARY_TYPES = ("IDC", "IDC", "IDC", "ILC", "DCIS")


def _test_tumor_flags(n_test: int, rng: np.random.Generator) -> list[bool]:
    """Which test slides have tumour: about 40 %, at least one tumour and one normal when n_test >= 2."""
    if n_test == 0:
        return []
    n_tumor = min(max(1, round(0.4 * n_test)), n_test - 1) if n_test >= 2 else int(rng.uniform() < 0.5)
    flags = [True] * n_tumor + [False] * (n_test - n_tumor)
    rng.shuffle(flags)
    return flags


def synthesize_dataset(
    out_dir: str | os.PathLike,
    *,
    n_normal: int = 2,
    n_tumor: int = 2,
    n_test: int = 2,
    size_px: int = 16384,
    seed: int = 0,
    workers: int | None = None,
    tissue: str = DEFAULT_TISSUE,
) -> SynthDataset:
    """Write a Camelyon16-like dataset of synthetic slides under ``out_dir``.

    Layout (as the official dataset)::

        training/normal/normal_001.tif
        training/tumor/tumor_001.tif
        training/lesion_annotations/tumor_001.xml
        testing/images/test_001.tif
        testing/lesion_annotations/test_001.xml     (tumour test slides only)
        testing/reference.csv                       (no header: Test_001,Tumor,IDC,Macro / Test_002,Normal,IDC,None)

    Slides are ``size_px`` square (level-0 px, 0.243 µm/px), alternate between the two stain
    "hospitals", and some carry pen marks; the test set mixes tumour and normal slides (at least one
    of each when ``n_test >= 2``). Macro/Micro follows the largest lesion (> 2 mm is Macro). Every
    file is written atomically; the same arguments give byte-identical files. ``tissue`` is every slide's tissue
    mode (:data:`TISSUE_MODES`; see :func:`synthesize_slide`).
    """
    root = Path(out_dir)
    rng = np.random.default_rng([seed, 0xDA7A])
    hospitals = sorted(HOSPITAL_STAINS)
    slides: dict[str, SynthSlide] = {}

    def make(stem: str, folder: str, index: int, tumor: bool) -> SynthSlide:
        slide_seed = int(rng.integers(0, 2**31))
        pen = bool(rng.uniform() < 0.35)
        hospital = hospitals[(index + int(tumor)) % len(hospitals)]
        slide = synthesize_slide(root / folder / f"{stem}.tif", width_px=size_px, seed=slide_seed, tumor=tumor,
                                 stain=hospital, pen_marks=pen, workers=workers, tissue=tissue)
        slides[stem] = slide
        return slide

    normal = [make(f"normal_{i + 1:03d}", "training/normal", i, False).path for i in range(n_normal)]
    tumor, tumor_xml = [], []
    for i in range(n_tumor):
        slide = make(f"tumor_{i + 1:03d}", "training/tumor", i, True)
        tumor.append(slide.path)
        tumor_xml.append(write_asap_xml(root / "training/lesion_annotations" / f"tumor_{i + 1:03d}.xml", slide.annotations))
    test, test_xml, labels, rows = [], [], {}, []
    for i, is_tumor in enumerate(_test_tumor_flags(n_test, rng)):
        stem = f"test_{i + 1:03d}"
        slide = make(stem, "testing/images", i, is_tumor)
        test.append(slide.path)
        name = f"Test_{i + 1:03d}"
        labels[name] = "Tumor" if is_tumor else "Normal"
        primary = _PRIMARY_TYPES[int(rng.integers(len(_PRIMARY_TYPES)))]
        if is_tumor:
            test_xml.append(write_asap_xml(root / "testing/lesion_annotations" / f"{stem}.xml", slide.annotations))
            primary = "ILC" if primary == "DCIS" else primary
        rows.append([name, labels[name], primary, slide.metastasis])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    reference = write_text_atomic(root / "testing" / "reference.csv", buf.getvalue())
    return SynthDataset(root, normal, tumor, tumor_xml, test, test_xml, reference, labels, slides)
