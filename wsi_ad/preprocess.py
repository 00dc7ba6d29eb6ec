"""The preprocessing stages of one slide, as plain functions over a :class:`~wsi_ad.store.SlideStore`:

* ``tissue``: Otsu tissue mask on a thumbnail (``tissue/mask``, bool, at ``mask_mpp`` µm/px) and a QC PNG;
* ``stain``: the slide's Vahadane stain matrix fitted on tissue pixels sampled over the whole slide
  (``stain`` attrs: ``fit`` and the ``target`` it is normalized to);
* ``tiles``: the tile grid over the tissue and the tile pixels at every magnification
  (``tiles/coords``, ``tiles/grid``, ``tiles/tissue_fraction``, ``tiles/<mag>``), stain-normalized: each
  read region is normalized once, then downsampled for the coarser magnifications.

Each stage is skipped when the store already holds it for the same configuration (its hash includes the
hashes of the stages it depends on), and recomputed when the configuration changed. Orchestration (Dask,
folders of slides, progress) lives in ``pipelines``; nothing here knows about it.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from wsi_ad.atomic import write_png_atomic
from wsi_ad.codecs import JpegCodec
from wsi_ad.slide import Slide
from wsi_ad.stain import DEFAULT_TARGET, StainFit, StainNormalizer, StainParams, fit_slide_stain
from wsi_ad.store import SlideStore, config_hash
from wsi_ad.tiling import RegionTiles, TileGrid, TilingParams, crop_tiles, plan_tiles, read_tile_regions
from wsi_ad.tissue import TissueMask, TissueParams, mask_slide, qc_image

log = logging.getLogger(__name__)

#: Bump when the tissue or tile algorithms change in a way that should invalidate stored results.
TISSUE_STAGE_VERSION = 1
STAIN_STAGE_VERSION = 1
TILES_STAGE_VERSION = 1

#: Compression of ``tiles/<mag>``. Measured on 64x64 H&E tiles (benchmarks/results/tile_store_layout.json):
#: zstd shrinks them ~1.1x but streams 2-3x slower, so the default stores them uncompressed (lossless);
#: JPEG is the way to small stores.
COMPRESSIONS = ("none", "zstd", "jpeg")

#: Bytes of tile pixels per zarr chunk: 64 tiles of 64x64 RGB. Measured: 64-tile chunks stream ~110k
#: tiles/s and read 1000 random single tiles in ~1 s; 256-tile chunks stream faster but random reads are
#: slower, 16-tile chunks the reverse; sharded 1-tile chunks were 30x slower to stream.
CHUNK_BYTES = 64 * 64 * 64 * 3

#: Chunk files of the tiles stage's arrays sit side by side in the array's folder (``40x/c.12.0.0.0``), not
#: one folder per index (``40x/c/12/0/0/0``, zarr's default): three folders fewer per chunk to create, and
#: to delete when the stage is recomputed, which on ext4 cost more than writing the chunks (re-tiling the
#: 25k px benchmark slide: 0.29 s of 0.95 s went to deleting the previous stage's folders). zarr reads
#: either layout from the array's metadata, so stores written before stay readable.
TILES_CHUNK_KEYS = {"name": "default", "separator": "."}


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of the tissue and tiles stages.

    Attributes:
        tissue: tissue-mask settings.
        tiling: tile-grid settings.
        compression: ``"none"`` (default, lossless), ``"zstd"`` (lossless) or ``"jpeg"``.
        jpeg_quality: JPEG quality (1-100) when ``compression="jpeg"``.
        stain: stain-fit settings; ``None`` turns stain normalization off.
        stain_target: the stain every slide is normalized to (default: the shipped reference).
    """

    tissue: TissueParams = field(default_factory=TissueParams)
    tiling: TilingParams = field(default_factory=TilingParams)
    compression: str = "none"
    jpeg_quality: int = 90
    stain: StainParams | None = field(default_factory=StainParams)
    stain_target: StainFit = DEFAULT_TARGET

    def __post_init__(self):
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")

    def tissue_hash(self) -> str:
        return config_hash({"version": TISSUE_STAGE_VERSION, "tissue": self.tissue.to_dict()})

    def stain_hash(self) -> str | None:
        if self.stain is None:
            return None
        return config_hash({"version": STAIN_STAGE_VERSION, "tissue": self.tissue_hash(),
                            "stain": self.stain.to_dict()})

    def tiles_hash(self) -> str:
        return config_hash({"version": TILES_STAGE_VERSION, "tissue": self.tissue_hash(),
                            "stain": self.stain_hash(),
                            "stain_target": self.stain_target.to_dict() if self.stain is not None else None,
                            "tiling": self.tiling.to_dict(), "compression": self.compression,
                            "jpeg_quality": self.jpeg_quality if self.compression == "jpeg" else None})


def run_tissue_stage(slide: Slide, store: SlideStore, config: PreprocessConfig,
                     qc_path: str | Path | None = None) -> tuple[TissueMask, bool]:
    """Compute (or load, when already stored with the same settings) the slide's tissue mask.

    Writes ``tissue/mask`` and its attributes (threshold, µm/px, areas, warnings), and a QC PNG (the
    thumbnail with the mask outline) to ``qc_path`` when given. Returns ``(mask, computed)``.
    """
    digest = config.tissue_hash()
    if store.is_complete("tissue", digest) and (qc_path is None or Path(qc_path).exists()):
        return load_tissue_mask(store), False
    started = time.perf_counter()
    mask, thumbnail = mask_slide(slide, config.tissue)
    with store.write_stage("tissue", digest, started=started, tissue_area_mm2=round(mask.tissue_area_mm2, 4),
                           warnings=list(mask.warnings)) as group:
        group.create_array("mask", data=mask.mask, chunks=(1024, 1024))
        group.attrs.update(mask.summary())
    if qc_path is not None:
        write_png_atomic(qc_path, qc_image(thumbnail, mask))
    return mask, True


def load_tissue_mask(store: SlideStore) -> TissueMask:
    """The :class:`TissueMask` held by a store's completed ``tissue`` stage."""
    group = store.require("tissue")
    attrs = dict(group.attrs)
    nan = float("nan")
    return TissueMask(mask=group["mask"][:], mpp=attrs["mask_mpp"],
                      threshold=nan if attrs["threshold"] is None else attrs["threshold"],
                      params=TissueParams.from_dict(attrs["params"]),
                      otsu_threshold=nan if attrs["otsu_threshold"] is None else attrs["otsu_threshold"],
                      pen_fraction=attrs["pen_fraction"], dark_fraction=attrs["dark_fraction"],
                      warnings=list(attrs["warnings"]))


def run_stain_stage(slide: Slide, store: SlideStore, mask: TissueMask, config: PreprocessConfig
                    ) -> tuple[StainFit | None, bool]:
    """Fit (or load, when stored with the same settings) the slide's stain matrix; ``(None, False)`` when
    stain normalization is off. A slide without H&E tissue gets a recorded fallback fit (Macenko or
    identity) and its warnings, never an error. Returns ``(fit, computed)``.
    """
    digest = config.stain_hash()
    if digest is None:
        return None, False
    if store.is_complete("stain", digest):
        return StainFit.from_dict(store.root["stain"].attrs["fit"]), False
    started = time.perf_counter()
    fit = fit_slide_stain(slide, mask, params=config.stain)
    with store.write_stage("stain", digest, started=started, method=fit.method, warnings=list(fit.warnings)) as group:
        group.attrs.update({"fit": fit.to_dict(), "target": config.stain_target.to_dict(),
                            "params": config.stain.to_dict()})
    return fit, True


def run_tiles_stage(slide: Slide, store: SlideStore, mask: TissueMask, config: PreprocessConfig,
                    stain: StainFit | None = None, transform=None) -> tuple[int, bool]:
    """Extract every tissue tile at every magnification into the store (unless already there).

    Args:
        slide: the open slide.
        store: the slide's store.
        mask: its tissue mask.
        config: settings; the stage is skipped when the store holds tiles made with the same ones.
        stain: the slide's stain fit (from :func:`run_stain_stage`); when given, every read region is
            normalized to ``config.stain_target`` once, before the coarser magnifications are derived.
        transform: another (H, W, 3) uint8 -> same function per read region, instead of ``stain``.

    Returns ``(number of tiles, computed)``.
    """
    digest = config.tiles_hash()
    if store.is_complete("tiles", digest):
        return int(store.stages["tiles"]["n_tiles"]), False
    if stain is not None and transform is None:
        transform = StainNormalizer(stain, config.stain_target)
    started = time.perf_counter()
    tiles = plan_tiles(slide, config.tiling,
                       lambda boxes: mask.tissue_fraction(boxes, (slide.mpp_x, slide.mpp_y)))
    geometry = tiles.geometry
    # The first regions are read while the stage's arrays are created.
    with (read_tile_regions(slide, tiles, transform) as regions,
          store.write_stage("tiles", digest, started=started, n_tiles=len(tiles)) as group):
        for name in ("coords", "grid", "tissue_fraction"):
            group.create_array(name, data=getattr(tiles, name), chunk_key_encoding=TILES_CHUNK_KEYS)
        writers = {}
        for name, tile_px, mpp in zip(geometry.magnifications, geometry.tile_px, geometry.mpp, strict=True):
            array = _create_tile_array(group, name, len(tiles), tile_px, config)
            array.attrs.update({"mpp": mpp, "magnification": name, "tile_px": tile_px})
            writers[name] = _ChunkedWriter(array)
        for _indices, block in regions:
            for name, region in block.items():
                writers[name].append_region(region)
        for writer in writers.values():
            writer.close()
        group.attrs.update(_tiles_attributes(tiles, config, time.perf_counter() - started))
    return len(tiles), True


def _tiles_attributes(tiles: TileGrid, config: PreprocessConfig, seconds: float) -> dict:
    geometry = tiles.geometry
    return {
        "coordinate_space": "level-0 pixels, top-left (x, y)",
        "geometry": geometry.to_dict(),
        "tiling": config.tiling.to_dict(),
        "compression": config.compression,
        "stain_normalized": config.stain is not None,
        "n_tiles": len(tiles),
        "seconds": round(seconds, 3),
        # CLAM-style description: footprint in level-0 pixels.
        "patch_size_level0": [round(v, 4) for v in geometry.tile0],
    }


def _create_tile_array(group: zarr.Group, name: str, n_tiles: int, tile_px: int,
                       config: PreprocessConfig) -> zarr.Array:
    tiles_per_chunk = max(1, CHUNK_BYTES // (tile_px * tile_px * 3))
    kwargs: dict = {"compressors": None}
    if config.compression == "zstd":
        kwargs["compressors"] = [ZstdCodec(level=1)]
    elif config.compression == "jpeg":
        kwargs["serializer"] = JpegCodec(quality=config.jpeg_quality)
    # write_empty_chunks=True skips zarr's per-chunk "all fill value?" scan, which made writes 6x slower
    # (a tile chunk is never empty).
    return group.create_array(name, shape=(n_tiles, tile_px, tile_px, 3), dtype=np.uint8,
                              chunks=(tiles_per_chunk, tile_px, tile_px, 3),
                              chunk_key_encoding=TILES_CHUNK_KEYS, config={"write_empty_chunks": True}, **kwargs)


class _ChunkedWriter:
    """Cuts each region's tiles straight into a chunk buffer and writes whole chunks: writing tile by tile
    would rewrite each chunk many times.

    Full chunks are written by one background thread while the caller reads the next region (OpenSlide
    releases the GIL while it decodes), with at most ``max_pending`` chunks in flight to bound memory.
    Chunk buffers are recycled once written (fresh buffers cost a page fault per 4 KiB on first touch).
    """

    def __init__(self, array: zarr.Array, max_pending: int = 2):
        self.array = array
        self.chunk = array.chunks[0]
        self.max_pending = max_pending
        self.pending: list[tuple[Future, np.ndarray]] = []
        self.free: list[np.ndarray] = []
        self.buffer = self._take_buffer()
        self.filled = 0
        self.written = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-writer")

    def _take_buffer(self) -> np.ndarray:
        if self.free:
            return self.free.pop()
        return np.empty((self.chunk, *self.array.shape[1:]), dtype=self.array.dtype)

    def _wait_oldest(self) -> None:
        future, buffer = self.pending.pop(0)
        future.result()                             # re-raises a failed write here
        self.free.append(buffer)

    def append_region(self, region: RegionTiles) -> None:
        """Cut a region's tiles straight into the chunk buffer (one copy of the pixels, not two)."""
        start, offsets = 0, region.offsets_rc
        while start < len(offsets):
            take = min(self.chunk - self.filled, len(offsets) - start)
            crop_tiles(region.image, offsets[start:start + take], region.tile_px,
                       out=self.buffer[self.filled:self.filled + take])
            self.filled += take
            start += take
            if self.filled == self.chunk:
                self._flush()

    def _flush(self) -> None:
        if not self.filled:
            return
        while len(self.pending) >= self.max_pending:
            self._wait_oldest()
        begin, end = self.written, self.written + self.filled
        future = self.pool.submit(self.array.__setitem__, slice(begin, end), self.buffer[:self.filled])
        self.pending.append((future, self.buffer))
        self.written, self.filled = end, 0
        self.buffer = self._take_buffer()

    def close(self) -> None:
        try:
            self._flush()
            while self.pending:
                self._wait_oldest()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.written != self.array.shape[0]:
            raise RuntimeError(f"wrote {self.written} tiles into an array of {self.array.shape[0]}")
