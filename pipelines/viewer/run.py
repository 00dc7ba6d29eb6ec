"""What ``wsi-ad view`` shows of a run: its report, and per slide the deep-zoom pyramids of the slide and of the
layers drawn over it (heatmap, tissue mask, lesion outlines), its hotspots and its stored thumbnail.

Reads only what the run wrote (``report.json``, the slide stores, ``qc/`` thumbnails, ``roc.png``) and the slide
files the stores point to; never re-scores. Tiles are cached (LRU) once rendered.

Geometry: every pyramid is a Deep Zoom Image (DZI) of the slide's full level-0 size, so the slide's own pyramid
(OpenSlide's :class:`openslide.deepzoom.DeepZoomGenerator`, ``limit_bounds=False``) and the layers' pyramids line
up pixel for pixel in the browser. Deep-zoom level ``L`` of a ``W x H`` level-0 slide has
``ceil(W / 2**(max_level - L))`` columns of pixels, ``max_level = ceil(log2(max(W, H)))`` (the DZI rule that
OpenSeadragon and OpenSlide both follow); a layer tile's pixel ``(i, j)`` covers level-0
``[origin + j * d, origin + (j + 1) * d)`` with ``d = 2**(max_level - L)``.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsi_ad.errors import WsiAdError
from wsi_ad.store import STORE_SUFFIX, SlideStore, qc_png_path

#: Edge of a slide tile (px) and its overlap, OpenSlide's deep-zoom defaults (254 + 2 x 1 = 256 px images).
SLIDE_TILE_PX, SLIDE_TILE_OVERLAP = 254, 1
#: Edge of a layer tile (px); layers have no overlap (they are drawn, not resampled).
LAYER_TILE_PX = 256
#: JPEG quality of slide tiles (OpenSlide's deep-zoom example server uses 75).
SLIDE_TILE_QUALITY = 80
#: The layers drawn over the slide.
LAYERS = ("heatmap", "tissue", "outlines")
#: Outline width (screen px) of the lesion outlines at every zoom.
OUTLINE_WIDTH_PX = 2


class ViewerError(WsiAdError):
    """A folder that is not a run of ``wsi-ad process`` / ``wsi-ad score``, or a request for something it lacks."""


def dzi_max_level(width: int, height: int) -> int:
    """The highest deep-zoom level of a ``width x height`` image: ``ceil(log2(max(width, height)))``."""
    return max(0, math.ceil(math.log2(max(width, height, 1))))


def dzi_level_size(width: int, height: int, level: int) -> tuple[int, int]:
    """(width, height) in pixels of deep-zoom ``level`` (``0 <= level <= dzi_max_level``)."""
    scale = 2 ** (dzi_max_level(width, height) - level)
    return max(1, math.ceil(width / scale)), max(1, math.ceil(height / scale))


def dzi_xml(width: int, height: int, tile_px: int, overlap: int, fmt: str) -> str:
    """The Deep Zoom Image descriptor of a ``width x height`` (level-0 px) pyramid."""
    return ('<?xml version="1.0" encoding="UTF-8"?>'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" Overlap="{overlap}" '
            f'TileSize="{tile_px}"><Size Width="{width}" Height="{height}"/></Image>')


def png_bytes(rgba: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@dataclass
class SlideView:
    """One slide of the run as the viewer shows it (built once, on first request)."""

    slide_id: str
    row: dict
    width: int                                   #: level-0 px
    height: int                                  #: level-0 px
    mpp: tuple[float, float] | None              #: level-0 µm/px (x, y)
    slide_path: Path | None                      #: the slide file, None when it is missing
    store: Path | None
    heatmap: Any = None                          #: wsi_ad.heatmap.Heatmap or None
    tissue_mask: Any = None                      #: wsi_ad.tissue.TissueMask or None
    annotations: list = field(default_factory=list)
    annotation_file: Path | None = None
    thumbnail: Path | None = None                #: the stored thumbnail (QC PNG) shown when the slide is missing
    thumbnail_size: tuple[int, int] | None = None  #: (width, height) px of the stored thumbnail
    thumbnail_level0_per_px: tuple[float, float] | None = None
    hotspots: list[dict] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


class RunView:
    """A run folder (``OUT`` of ``wsi-ad process --model`` or ``wsi-ad score``) opened for viewing.

    Args:
        run_dir: the folder holding ``report.json``.
        annotations_dir: folder of ``<slide_id>.xml`` lesion outlines; default: the run's ``--annotations``.
        slides_dir: where to look (by file name) for slide files that are no longer where the run found them.
        n_hotspots: hotspots listed per slide (:func:`wsi_ad.heatmap.hotspots`).
        tile_cache: tiles kept in memory (each cache: slide tiles, layer tiles).

    Raises:
        ViewerError: ``run_dir`` missing, without ``report.json`` or with one that is not a wsi-ad run report; an
            ``annotations_dir`` or ``slides_dir`` given that is not a folder.
    """

    def __init__(self, run_dir: str | os.PathLike, *, annotations_dir: str | os.PathLike | None = None,
                 slides_dir: str | os.PathLike | None = None, n_hotspots: int = 10, tile_cache: int = 4096):
        run_dir = Path(run_dir)
        if run_dir.name == "report.json" and run_dir.is_file():       # the report itself named
            run_dir = run_dir.parent
        if not run_dir.is_dir():
            raise ViewerError(f"{run_dir}: no such folder (give the --out folder of `wsi-ad process --model` or "
                              "`wsi-ad score`)")
        self.run_dir = run_dir
        path = self.run_dir / "report.json"
        if not path.is_file():
            raise ViewerError(f"{self.run_dir}: no report.json, so not a wsi-ad run folder (the --out of "
                              "`wsi-ad process --model` or `wsi-ad score`)")
        try:
            self.report = json.loads(path.read_text(encoding="utf-8"))
            rows = self.report["slides"]
            if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("slide_id"), str)
                                                     for r in rows):
                raise TypeError("'slides' must be a list of rows, each with a slide_id")
        except (ValueError, KeyError, TypeError) as exc:
            raise ViewerError(f"{path}: not a wsi-ad run report ({exc})") from exc
        self.rows = {row["slide_id"]: row for row in rows}
        for name, folder in (("--annotations", annotations_dir), ("--slides", slides_dir)):
            if folder is not None and not Path(folder).is_dir():
                raise ViewerError(f"{name} {folder}: no such folder")
        chosen = annotations_dir if annotations_dir is not None else self.report.get("annotations_dir")
        self.annotations_dir = Path(chosen) if chosen else None
        self.slides_dir = Path(slides_dir) if slides_dir is not None else None
        self.n_hotspots = int(n_hotspots)
        self._lock = threading.Lock()
        self._slides: dict[str, SlideView] = {}
        self._scale = None
        self.slide_tile = functools.lru_cache(maxsize=tile_cache)(self._slide_tile)
        self.layer_tile = functools.lru_cache(maxsize=tile_cache)(self._layer_tile)
        self._deepzoom = functools.lru_cache(maxsize=16)(self._open_deepzoom)

    # -- the run -------------------------------------------------------------------------------------

    @property
    def scale(self):
        """The run's cohort colour scale (:class:`~wsi_ad.overlay.ScoreScale`): as the run recorded it, else (runs
        made before it was recorded) from the overlays' sidecars, else pooled again from the stored scores; None
        when nothing was scored."""
        if self._scale is None:
            self._scale = self._find_scale()
        return self._scale

    def _find_scale(self):
        from wsi_ad.overlay import ScoreScale, cohort_scale

        recorded = self.report.get("scale")
        if recorded:
            return ScoreScale(**recorded)
        for row in self.rows.values():
            sidecar = Path(row["overlay"]).with_suffix(".json") if row.get("overlay") else None
            if sidecar is not None and sidecar.is_file():
                vmin, vmax = json.loads(sidecar.read_text())["scale"]
                return ScoreScale(vmin, vmax)
        heatmaps = [view.heatmap for sid in self.rows if (view := self.slide(sid)).heatmap is not None]
        return cohort_scale(heatmaps) if heatmaps else None

    def slide_ids(self) -> list[str]:
        return list(self.rows)

    def row(self, slide_id: str) -> dict:
        try:
            return self.rows[slide_id]
        except KeyError:
            raise ViewerError(f"no slide {slide_id!r} in this run") from None

    # -- one slide -----------------------------------------------------------------------------------

    def slide(self, slide_id: str) -> SlideView:
        """The :class:`SlideView` of ``slide_id`` (loaded once). Raises ViewerError for a slide not in the run."""
        row = self.row(slide_id)
        with self._lock:
            if slide_id not in self._slides:
                self._slides[slide_id] = self._load(row)
            return self._slides[slide_id]

    def _store_path(self, row: dict) -> Path | None:
        """The slide's store: in this run folder when it is there (a moved or copied run reads its own stores), else
        where the report says (``wsi-ad score`` leaves the stores where they were)."""
        for candidate in (self.run_dir / f"{row['slide_id']}{STORE_SUFFIX}", row.get("store")):
            if candidate and Path(candidate).is_dir():
                return Path(candidate)
        return None

    def _slide_file(self, row: dict, notices: list[str]) -> tuple[Path | None, tuple[int, int] | None]:
        """The slide file and its level-0 (width, height) if OpenSlide can open it (else ``(None, None)``, with a
        notice saying why)."""
        import openslide

        recorded = Path(row["slide"]) if row.get("slide") else None
        path = recorded if recorded is not None and recorded.is_file() else None
        if path is None and recorded is not None and self.slides_dir is not None:
            moved = self.slides_dir / recorded.name
            path = moved if moved.is_file() else None
        if path is None:
            where = f" or in {self.slides_dir}" if self.slides_dir is not None else " (--slides DIR says where it is now)"
            notices.append(f"the slide file is missing ({row.get('slide')}: moved or deleted{where}): showing the "
                           "stored thumbnail (the tissue-mask QC image; its green line is the tissue outline) instead "
                           "of the slide's own pixels")
            return None, None
        try:
            with openslide.OpenSlide(str(path)) as osr:
                return path, osr.dimensions
        except (openslide.OpenSlideError, OSError) as exc:
            notices.append(f"OpenSlide cannot read the slide file {path} ({exc or type(exc).__name__})")
            return None, None

    def _load(self, row: dict) -> SlideView:
        sid = row["slide_id"]
        notices = []
        if row.get("status") == "failed":
            notices.append(f"this slide failed at {row.get('failed_task')}: {row.get('error')}")
        notices.extend(f"warning: {w}" for w in row.get("warnings") or [])
        store_path, store, attrs = self._store_path(row), None, {}
        if store_path is not None:
            try:
                store = SlideStore.open(store_path)
                attrs = dict(store.root.attrs)
            except Exception as exc:      # a damaged store (zarr / JSON errors): say so, show what else there is
                store = None
                notices.append(f"the slide store {store_path} cannot be read ({type(exc).__name__}: {exc})")
            out = Path(self.report["out"]).resolve() if self.report.get("out") else None
            if out is not None and out != self.run_dir.resolve() and store_path.resolve().parent == out:
                notices.append(f"this slide's store is not in {self.run_dir}: read from {store_path}, in the folder "
                               "the run was written to")
        elif row.get("status") == "ok":
            notices.append(f"the slide store is missing ({row.get('store')}): no heatmap, mask or hotspots")
        width, height = (attrs.get("level_dimensions") or [[row.get("width"), row.get("height")]])[0]
        mpp = (attrs["mpp_x"], attrs["mpp_y"]) if attrs.get("mpp_x") else (
            (row["mpp"], row["mpp"]) if row.get("mpp") else None)
        slide_path, file_dimensions = self._slide_file(row, notices)
        source = attrs.get("source") or {}
        if slide_path is not None and source.get("size") is not None:
            size = os.stat(slide_path).st_size
            if size != source["size"]:
                notices.append(f"the slide file {slide_path} changed since it was processed (size {size} bytes, was "
                               f"{source['size']}): the heatmap may not match it")
        if file_dimensions is not None and not (width and height):       # no store: the file's own size
            width, height = file_dimensions
        view = SlideView(sid, row, int(width or 0), int(height or 0), mpp, slide_path, store_path, notices=notices)
        if store is not None:
            self._load_stages(view, store)
        self._load_thumbnail(view)
        self._load_annotations(view)
        if not view.width or not view.height:
            notices.append("nothing to show: neither a readable slide store nor a readable slide file")
        return view

    def _load_stages(self, view: SlideView, store: SlideStore) -> None:
        """The heatmap (and its hotspots) and the tissue mask, each on its own: a damaged one gets a notice."""
        from wsi_ad.heatmap import hotspots, load_heatmap
        from wsi_ad.preprocess import load_tissue_mask

        row, notices = view.row, view.notices
        try:
            if row.get("model_id") and store.is_complete(f"heatmap/{row['model_id']}"):
                view.heatmap = load_heatmap(store, row["model_id"])
                view.hotspots = hotspots(view.heatmap, self.n_hotspots)
            elif row.get("status") == "ok":
                why = ("the slide has no tiles" if row.get("n_tiles") == 0 else "the slide was not scored in this run")
                notices.append(f"no heatmap: {why}")
        except Exception as exc:
            view.heatmap, view.hotspots = None, []
            notices.append(f"the heatmap cannot be read from the store ({type(exc).__name__}: {exc})")
        try:
            if store.is_complete("tissue"):
                view.tissue_mask = load_tissue_mask(store)
        except Exception as exc:
            notices.append(f"the tissue mask cannot be read from the store ({type(exc).__name__}: {exc})")

    def _load_thumbnail(self, view: SlideView) -> None:
        candidates = [view.row.get("thumbnail")]
        if view.store is not None:
            candidates.append(qc_png_path(view.store.parent, view.slide_id))
        for candidate in candidates:
            if candidate and Path(candidate).is_file():
                view.thumbnail = Path(candidate)
                break
        if view.thumbnail is None or not view.width:
            return
        with Image.open(view.thumbnail) as image:
            size = view.thumbnail_size = image.size
        if view.tissue_mask is not None and view.mpp is not None:   # the QC image is the mask's grid
            view.thumbnail_level0_per_px = (view.tissue_mask.mpp / view.mpp[0], view.tissue_mask.mpp / view.mpp[1])
        else:
            view.thumbnail_level0_per_px = (view.width / size[0], view.height / size[1])

    def _load_annotations(self, view: SlideView) -> None:
        if self.annotations_dir is None:
            return
        if not self.annotations_dir.is_dir():
            view.notices.append(f"the annotation folder {self.annotations_dir} is missing: no lesion outlines shown "
                                "(--annotations DIR says where it is now)")
            return
        from wsi_ad.annotations import AnnotationError, annotation_file, read_asap_xml

        try:
            xml = annotation_file(self.annotations_dir, view.slide_id)
            if xml is not None:
                view.annotations = read_asap_xml(xml)
                view.annotation_file = xml
        except AnnotationError as exc:
            view.notices.append(f"lesion outlines not shown: {exc}")

    # -- tiles ---------------------------------------------------------------------------------------

    def _open_deepzoom(self, slide_id: str):
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        view = self.slide(slide_id)
        if view.slide_path is None:
            raise ViewerError(f"slide {slide_id}: the slide file is missing")
        try:
            osr = openslide.OpenSlide(str(view.slide_path))
        except (openslide.OpenSlideError, OSError) as exc:
            raise ViewerError(f"slide {slide_id}: OpenSlide cannot read {view.slide_path} ({exc})") from exc
        return DeepZoomGenerator(osr, tile_size=SLIDE_TILE_PX, overlap=SLIDE_TILE_OVERLAP, limit_bounds=False)

    def slide_dzi(self, slide_id: str) -> str:
        """The DZI descriptor of the slide's own pixels (raises ViewerError when the slide file is missing)."""
        return self._deepzoom(slide_id).get_dzi("jpeg")

    def _slide_tile(self, slide_id: str, level: int, col: int, row: int) -> bytes:
        """JPEG bytes of one deep-zoom tile of the slide (OpenSlide's generator). Raises ViewerError for a tile
        outside the pyramid."""
        deepzoom = self._deepzoom(slide_id)
        try:
            tile = deepzoom.get_tile(level, (col, row))
        except ValueError as exc:
            raise ViewerError(f"slide {slide_id}: no tile {level}/{col}_{row} ({exc})") from exc
        buffer = io.BytesIO()
        tile.convert("RGB").save(buffer, format="JPEG", quality=SLIDE_TILE_QUALITY)
        return buffer.getvalue()

    def layer_dzi(self, slide_id: str, layer: str) -> str:
        view = self._layer_view(slide_id, layer)
        return dzi_xml(view.width, view.height, LAYER_TILE_PX, 0, "png")

    def _layer_view(self, slide_id: str, layer: str) -> SlideView:
        if layer not in LAYERS:
            raise ViewerError(f"no layer {layer!r} (layers: {', '.join(LAYERS)})")
        view = self.slide(slide_id)
        present = {"heatmap": view.heatmap is not None and self.scale is not None,
                   "tissue": view.tissue_mask is not None and view.mpp is not None,
                   "outlines": bool(view.annotations)}
        if not present[layer] or not view.width:
            raise ViewerError(f"slide {slide_id} has no {layer} layer")
        return view

    def _layer_tile(self, slide_id: str, layer: str, level: int, col: int, row: int) -> bytes:
        """PNG bytes (RGBA, transparent where the layer shows nothing) of one deep-zoom tile of a layer, drawn from
        the stored heatmap / mask / annotations (:mod:`wsi_ad.overlay`'s layer functions). Raises ViewerError for
        a layer the slide lacks or a tile outside the pyramid."""
        from wsi_ad.overlay import heatmap_layer, outline_layer, tissue_layer

        view = self._layer_view(slide_id, layer)
        max_level = dzi_max_level(view.width, view.height)
        if not 0 <= level <= max_level:
            raise ViewerError(f"slide {slide_id}: no deep-zoom level {level} (0-{max_level})")
        level_w, level_h = dzi_level_size(view.width, view.height, level)
        x0, y0 = col * LAYER_TILE_PX, row * LAYER_TILE_PX
        if col < 0 or row < 0 or x0 >= level_w or y0 >= level_h:
            raise ViewerError(f"slide {slide_id}: no tile {level}/{col}_{row}")
        size = (min(LAYER_TILE_PX, level_w - x0), min(LAYER_TILE_PX, level_h - y0))
        d = float(2 ** (max_level - level))
        origin, per_px = (x0 * d, y0 * d), (d, d)
        if layer == "heatmap":
            rgba = heatmap_layer(view.heatmap, self.scale, origin, size, per_px, tissue_mask=view.tissue_mask)
        elif layer == "tissue":
            rgba = tissue_layer(view.tissue_mask, view.mpp, origin, size, per_px)
        else:
            rgba = outline_layer(view.annotations, origin, size, per_px, width=OUTLINE_WIDTH_PX)
        return png_bytes(rgba)

    def layers_of(self, slide_id: str) -> list[str]:
        """The layers slide ``slide_id`` has."""
        out = []
        for layer in LAYERS:
            try:
                self._layer_view(slide_id, layer)
                out.append(layer)
            except ViewerError:
                pass
        return out
