"""A tile grid over the tissue, and extraction of the same footprint at every requested magnification.

Geometry (all coordinates level-0 pixels, top-left, x then y):

* Magnifications are names (``"10x"``, ``"20x"``, ``"40x"``) whose nominal resolutions must be integer
  multiples of the finest one's (10x/20x/40x: factors 4, 2, 1).
* The finest requested magnification is read from the slide at its *effective* resolution
  (:meth:`wsi_ad.slide.Slide.effective_mpp`: a pyramid level within 5 % is used as it is, so "10x" on a
  0.243 µm/px Camelyon16 slide is its native 0.972 µm/px level). Coarser magnifications are made from the
  same pixels by exact area averaging over factor x factor blocks: every magnification of a tile shows
  precisely the same footprint.
* ``tile_px``/``stride_px`` are given at the *coarsest* requested magnification (the paper's 64 px at
  10x; with 10x and 20x requested, tiles are 64 px at 10x and 128 px at 20x), or physically with
  ``tile_um``/``stride_um``.
* Grid cell (row, col) has its top-left at ``(round(col * stride0), round(row * stride0))`` where
  ``stride0`` is the stride in (possibly fractional) level-0 pixels; its footprint is ``tile0`` level-0
  pixels square.

Extraction reads one region per block of ``region_tiles`` x ``region_tiles`` grid cells (only the bounding
box of the block's selected tiles), once, at the finest magnification; each region goes through an
optional ``transform`` (stain normalization) once, and is then downsampled for the coarser magnifications.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image

from wsi_ad.slide import Slide, magnification_to_mpp


@dataclass(frozen=True)
class TilingParams:
    """Settings of the tile grid and extraction.

    Attributes:
        magnifications: names of the magnifications to extract, e.g. ``("10x",)`` or ``("10x", "20x")``.
        tile_px: tile width and height in pixels at the coarsest requested magnification.
        stride_px: grid step in pixels at the coarsest magnification (None: ``tile_px``, no overlap).
        tile_um: tile size in µm; when set, overrides ``tile_px``.
        stride_um: grid step in µm; when set, overrides ``stride_px``.
        min_tissue_fraction: keep a tile when at least this fraction of its footprint is tissue.
        region_tiles: grid cells per side of one read region (bigger: fewer, larger reads).
    """

    magnifications: tuple[str, ...] = ("10x",)
    tile_px: int = 64
    stride_px: int | None = None
    tile_um: float | None = None
    stride_um: float | None = None
    min_tissue_fraction: float = 0.5
    region_tiles: int = 16

    def __post_init__(self):
        if not self.magnifications:
            raise ValueError("at least one magnification is needed")
        object.__setattr__(self, "magnifications", tuple(self.magnifications))
        for name in self.magnifications:
            magnification_to_mpp(name)          # raises ValueError on a bad name
        if len(set(self.magnifications)) != len(self.magnifications):
            raise ValueError(f"magnifications repeat: {self.magnifications}")
        if self.tile_px < 1 or (self.stride_px is not None and self.stride_px < 1):
            raise ValueError("tile_px and stride_px must be >= 1")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ValueError(f"min_tissue_fraction must be in [0, 1], got {self.min_tissue_fraction}")
        if self.region_tiles < 1:
            raise ValueError("region_tiles must be >= 1")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["magnifications"] = list(self.magnifications)
        return values


@dataclass(frozen=True)
class TileGeometry:
    """The resolved grid for one slide.

    Attributes:
        magnifications: names, finest first.
        factors: integer downsampling of each magnification relative to the finest (finest: 1).
        mpp: effective µm/px of each magnification as extracted.
        tile_px: tile size in pixels at each magnification.
        stride_px: grid step in pixels at each magnification.
        tile0: tile footprint in level-0 pixels (x, y; may be fractional).
        stride0: grid step in level-0 pixels (x, y; may be fractional).
        grid_shape: (rows, cols) of the full grid over the slide.
    """

    magnifications: tuple[str, ...]
    factors: tuple[int, ...]
    mpp: tuple[float, ...]
    tile_px: tuple[int, ...]
    stride_px: tuple[int, ...]
    tile0: tuple[float, float]
    stride0: tuple[float, float]
    grid_shape: tuple[int, int]

    def cell_origins(self, grid: np.ndarray) -> np.ndarray:
        """(N, 2) int64 level-0 top-left (x, y) of grid cells given as (N, 2) (row, col)."""
        grid = np.asarray(grid)
        x = np.round(grid[:, 1] * self.stride0[0]).astype(np.int64)
        y = np.round(grid[:, 0] * self.stride0[1]).astype(np.int64)
        return np.stack([x, y], axis=1)

    def boxes(self, grid: np.ndarray) -> np.ndarray:
        """(N, 4) float level-0 boxes (x, y, w, h) of grid cells; x, y exact (not rounded)."""
        grid = np.asarray(grid, dtype=np.float64)
        n = len(grid)
        return np.stack([grid[:, 1] * self.stride0[0], grid[:, 0] * self.stride0[1],
                         np.full(n, self.tile0[0]), np.full(n, self.tile0[1])], axis=1)

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def resolve_geometry(slide: Slide, params: TilingParams) -> TileGeometry:
    """Resolve the tile grid of ``params`` on ``slide`` (see the module docstring)."""
    nominal = {name: magnification_to_mpp(name) for name in params.magnifications}
    order = sorted(params.magnifications, key=lambda name: nominal[name])      # finest first
    finest, coarsest = order[0], order[-1]
    factors = []
    for name in order:
        ratio = nominal[name] / nominal[finest]
        if abs(ratio - round(ratio)) > 1e-6:
            raise ValueError(f"magnification {name} is not an integer downsampling of {finest} "
                             f"({ratio:.3f}); choose magnifications like 10x, 20x, 40x")
        factors.append(int(round(ratio)))
    if any(factors[-1] % f for f in factors):
        raise ValueError(f"magnifications {order} must each divide the coarsest evenly (factors {factors})")
    finest_mpp = slide.effective_mpp(nominal[finest])
    coarse_factor = factors[-1]
    coarse_mpp = finest_mpp * coarse_factor
    tile_coarse = int(round(params.tile_um / coarse_mpp)) if params.tile_um else params.tile_px
    if params.stride_um:
        stride_coarse = int(round(params.stride_um / coarse_mpp))
    else:
        stride_coarse = params.stride_px or tile_coarse
    if tile_coarse < 1 or stride_coarse < 1:
        raise ValueError(f"tile of {tile_coarse} px / stride of {stride_coarse} px at {coarsest} is empty")
    tile_finest, stride_finest = tile_coarse * coarse_factor, stride_coarse * coarse_factor
    tile0 = (tile_finest * finest_mpp / slide.mpp_x, tile_finest * finest_mpp / slide.mpp_y)
    stride0 = (stride_finest * finest_mpp / slide.mpp_x, stride_finest * finest_mpp / slide.mpp_y)
    width0, height0 = slide.dimensions
    cols = max(0, int(math.floor((width0 - tile0[0]) / stride0[0] + 1e-9)) + 1) if width0 >= tile0[0] else 0
    rows = max(0, int(math.floor((height0 - tile0[1]) / stride0[1] + 1e-9)) + 1) if height0 >= tile0[1] else 0
    return TileGeometry(
        magnifications=tuple(order),
        factors=tuple(factors),
        mpp=tuple(finest_mpp * f for f in factors),
        tile_px=tuple(tile_finest // f for f in factors),
        stride_px=tuple(stride_finest // f for f in factors),
        tile0=tile0,
        stride0=stride0,
        grid_shape=(rows, cols),
    )


@dataclass
class TileGrid:
    """The tiles kept on one slide, in extraction order.

    Attributes:
        geometry: the resolved grid.
        grid: (N, 2) int32 (row, col) of each kept tile.
        coords: (N, 2) int64 level-0 top-left (x, y) of each kept tile.
        tissue_fraction: (N,) float32 tissue fraction of each kept tile's footprint.
        blocks: indices of the tiles read together from one region, one array per region, in order.
    """

    geometry: TileGeometry
    grid: np.ndarray
    coords: np.ndarray
    tissue_fraction: np.ndarray
    blocks: list[np.ndarray] = field(repr=False, default_factory=list)

    def __len__(self) -> int:
        return len(self.grid)


def plan_tiles(slide: Slide, params: TilingParams, tissue_fraction_of: Callable[[np.ndarray], np.ndarray]
               ) -> TileGrid:
    """Choose the tiles to extract: every grid cell whose tissue fraction is >= ``min_tissue_fraction``.

    Args:
        slide: the open slide.
        params: tiling settings.
        tissue_fraction_of: maps (N, 4) level-0 boxes (x, y, w, h) to their tissue fractions, e.g.
            ``TissueMask.tissue_fraction`` bound to the slide's µm/px.

    Tiles are ordered block by block (blocks of ``region_tiles`` x ``region_tiles`` cells, row-major),
    row-major within a block: the order they are read in, so consecutive tiles are neighbours on disk.
    """
    geometry = resolve_geometry(slide, params)
    rows, cols = geometry.grid_shape
    rr, cc = np.mgrid[0:rows, 0:cols]
    all_cells = np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.int32)
    if len(all_cells):
        fractions = np.asarray(tissue_fraction_of(geometry.boxes(all_cells)), dtype=np.float32)
    else:
        fractions = np.zeros(0, dtype=np.float32)
    keep = fractions >= params.min_tissue_fraction
    if params.min_tissue_fraction == 0.0:
        keep &= fractions > 0.0
    cells, fractions = all_cells[keep], fractions[keep]
    block = params.region_tiles
    order = np.lexsort((cells[:, 1], cells[:, 0], cells[:, 1] // block, cells[:, 0] // block))
    cells, fractions = cells[order], fractions[order]
    block_ids = (cells[:, 0] // block) * (cols // block + 1) + cells[:, 1] // block
    boundaries = np.flatnonzero(np.diff(block_ids)) + 1 if len(cells) else np.zeros(0, dtype=int)
    blocks = np.split(np.arange(len(cells)), boundaries) if len(cells) else []
    return TileGrid(geometry=geometry, grid=cells, coords=geometry.cell_origins(cells),
                    tissue_fraction=fractions, blocks=blocks)


RegionTransform = Callable[[np.ndarray], np.ndarray]


class RegionTiles(NamedTuple):
    """The tiles of one read region at one magnification, not cut yet: ``crop_tiles(*region_tiles)``."""

    image: np.ndarray          # (H, W, 3) uint8, the region at this magnification
    offsets_rc: np.ndarray     # (n, 2) top-left (row, col) pixel of each tile in ``image``
    tile_px: int


@contextlib.contextmanager
def read_tile_regions(slide: Slide, tiles: TileGrid, transform: RegionTransform | None = None, *,
                      prefetch: int = 2) -> Iterator[Iterator[tuple[np.ndarray, dict[str, RegionTiles]]]]:
    """Start reading ``tiles``' regions at once, in a background thread; give an iterator of
    ``(indices, {magnification: RegionTiles})``, block by block in ``tiles`` order.

    One region is read per block (the bounding box of its tiles) at the finest magnification, passed once
    through ``transform`` (e.g. stain normalization; (H, W, 3) uint8 -> same), and area-downsampled for
    every coarser magnification. Up to ``prefetch`` regions are read ahead (OpenSlide releases the GIL
    while it decodes), from entering the context on: reading overlaps what the caller does before it
    iterates (e.g. creating its output arrays), then the transform and the caller's writes. The caller
    cuts the tiles (:func:`crop_tiles`), e.g. straight into its own buffer.
    """
    geometry = tiles.geometry
    mpp = magnification_to_mpp(geometry.magnifications[0])
    stride_f, tile_f = geometry.stride_px[0], geometry.tile_px[0]

    def read(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cells = tiles.grid[indices]
        (r0, c0), (r1, c1) = cells.min(axis=0), cells.max(axis=0)
        size = (int((c1 - c0) * stride_f + tile_f), int((r1 - r0) * stride_f + tile_f))
        region = slide.read_region((c0 * geometry.stride0[0], r0 * geometry.stride0[1]), size, mpp)
        return indices, cells - [r0, c0], region

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="region-reader") as pool:
        blocks = iter(tiles.blocks)
        ahead = deque(pool.submit(read, b) for b in itertools.islice(blocks, max(1, prefetch)))

        def regions() -> Iterator[tuple[np.ndarray, dict[str, RegionTiles]]]:
            while ahead:
                indices, cells, region = ahead.popleft().result()
                following = next(blocks, None)
                if following is not None:
                    ahead.append(pool.submit(read, following))
                if transform is not None:
                    region = transform(region)
                out: dict[str, RegionTiles] = {}
                for name, factor, stride, tile in zip(geometry.magnifications, geometry.factors,
                                                      geometry.stride_px, geometry.tile_px, strict=True):
                    scaled = region if factor == 1 else downsample(region, factor)
                    out[name] = RegionTiles(scaled, cells * stride, tile)
                yield indices, out

        yield regions()


def iter_tile_blocks(slide: Slide, tiles: TileGrid, transform: RegionTransform | None = None, *,
                     prefetch: int = 2) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yield ``(indices, {magnification: (n, h, w, 3) uint8})`` block by block, in ``tiles`` order: the
    tiles of :func:`read_tile_regions`, cut."""
    with read_tile_regions(slide, tiles, transform, prefetch=prefetch) as regions:
        for indices, block in regions:
            yield indices, {name: crop_tiles(*region) for name, region in block.items()}


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Area-average (H, W, 3) uint8 by an integer ``factor`` (H and W multiples of it)."""
    h, w = image.shape[:2]
    if h % factor or w % factor:
        raise ValueError(f"image {w}x{h} is not a multiple of the factor {factor}")
    return np.asarray(Image.fromarray(image).reduce(factor))


def crop_tiles(image: np.ndarray, offsets_rc: np.ndarray, tile_px: int, out: np.ndarray | None = None
               ) -> np.ndarray:
    """Cut (n, tile_px, tile_px, 3) tiles out of ``image`` at top-left (row, col) pixel ``offsets_rc``, into
    ``out`` when given (an (n, tile_px, tile_px, 3) array of ``image``'s dtype), else a new array."""
    if out is None:
        out = np.empty((len(offsets_rc), tile_px, tile_px, image.shape[2]), dtype=image.dtype)
    for i, (row, col) in enumerate(np.asarray(offsets_rc, dtype=np.int64)):
        out[i] = image[row:row + tile_px, col:col + tile_px]
    return out


def parse_magnifications(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"10x,20x"`` -> ``("10x", "20x")`` (validated)."""
    names = [part.strip() for part in (text.split(",") if isinstance(text, str) else text) if part.strip()]
    for name in names:
        magnification_to_mpp(name)
    return tuple(name.lower() for name in names)
