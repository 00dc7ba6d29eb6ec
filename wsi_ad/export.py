"""Exports of a slide store for the tools pathologists and ML engineers already use.

* :func:`export_clam_h5`: tile coordinates (and scores) as a CLAM-style ``.h5``;
* :func:`export_heatmap_ngff`: a heatmap as an OME-Zarr image (NGFF 0.4 on zarr v2, or 0.5 on zarr v3)
  with a physical scale in micrometres, so napari (napari-ome-zarr) overlays it on the slide;
* :func:`export_geojson`: connected high-score regions as a GeoJSON ``FeatureCollection`` of polygons in
  level-0 pixels, which QuPath imports as annotations (File > Import objects, or drag and drop);
* :func:`export_store`: the formats a user asks for (``--export geojson,ngff,h5``), each written beside the
  store (:func:`export_path`) and skipped when the file on disk was made from the same stages, model and
  threshold (a stamp inside each file, :func:`read_export_stamp`), so a re-run redoes only what changed.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zarr

from wsi_ad.atomic import atomic_path, write_text_atomic
from wsi_ad.errors import WsiAdError
from wsi_ad.slide import Slide
from wsi_ad.store import SlideStore

#: NGFF versions :func:`export_heatmap_ngff` writes (0.4: zarr v2, read by every napari-ome-zarr; 0.5: zarr v3).
NGFF_VERSIONS = ("0.4", "0.5")
#: Classification name and RGB colour of exported high-score regions.
GEOJSON_CLASS = "Tumor"
GEOJSON_COLOR = (200, 0, 0)
#: ``--export`` formats: folder (beside the store) and file suffix of each.
EXPORT_FORMATS: dict[str, tuple[str, str]] = {"geojson": ("geojson", ".geojson"), "ngff": ("ngff", ".ome.zarr"),
                                              "h5": ("h5", ".h5")}
#: Formats made from a model's heatmap (``h5`` holds the tile coordinates, and the scores when there are some).
HEATMAP_FORMATS = frozenset({"geojson", "ngff"})
#: Where each export keeps its stamp: h5 root attribute, NGFF ``wsi_ad`` attribute key, GeoJSON foreign member.
STAMP_KEY = "wsi_ad_export"


class ExportError(WsiAdError):
    """An export cannot be made: bad arguments or a store lacking what the export needs."""


def export_clam_h5(store: SlideStore, slide: Slide, path: str | os.PathLike, model_id: str | None = None, *,
                   stamp: dict | None = None) -> Path:
    """Write the tile coordinates as a CLAM-style ``.h5`` file, atomically.

    Dataset ``coords``: (N, 2) int64 level-0 top-left (x, y), as CLAM's ``create_patches_fp.py`` writes.
    Its attributes follow CLAM: ``patch_level`` (the pyramid level that serves the coarsest extracted
    magnification), ``patch_size`` (the tile footprint in that level's pixels), ``downsample``,
    ``level_dim``, ``name``; plus ``patch_size_level0`` and ``mpp`` (µm/px of that magnification).

    With ``model_id``, dataset ``scores`` ((N,) float32, the same order as ``coords``) holds the tile
    anomaly scores of the store's ``scores/<model_id>`` stage (attribute ``model_id``). ``stamp`` (JSON) goes
    to the root attribute ``wsi_ad_export`` (:func:`export_store`).
    """
    tiles = store.require("tiles")
    geometry = tiles.attrs["geometry"]
    coarsest_mpp = geometry["mpp"][-1]
    level = slide.level_for_mpp(coarsest_mpp)
    downsample = slide.level_downsamples[level]
    tile0_x = geometry["tile0"][0]
    coords_array = np.asarray(tiles["coords"][:], dtype=np.int64)
    scores = None
    if model_id is not None:
        from wsi_ad.heatmap import load_scores

        scores = load_scores(store, model_id)
        if len(scores) != len(coords_array):
            raise ExportError(f"{store.path}: {len(scores)} scores for {len(coords_array)} tiles")
    path = Path(path)
    with atomic_path(path) as temp:
        with h5py.File(temp, "w") as h5:
            if stamp is not None:
                h5.attrs[STAMP_KEY] = json.dumps(stamp)
            coords = h5.create_dataset("coords", data=coords_array)
            coords.attrs["patch_level"] = level
            coords.attrs["patch_size"] = int(round(tile0_x / downsample[0]))
            coords.attrs["downsample"] = np.asarray(downsample, dtype=np.float64)
            coords.attrs["level_dim"] = np.asarray(slide.level_dimensions[level], dtype=np.int64)
            coords.attrs["name"] = slide.slide_id
            coords.attrs["patch_size_level0"] = float(tile0_x)
            coords.attrs["mpp"] = float(coarsest_mpp)
            if scores is not None:
                dataset = h5.create_dataset("scores", data=scores.astype(np.float32))
                dataset.attrs["model_id"] = model_id
    return path


def _heatmap_of(source, model_id: str | None):
    from wsi_ad.heatmap import Heatmap, load_heatmap

    if isinstance(source, Heatmap):
        return source
    if model_id is None:
        raise ExportError("exporting a heatmap from a store needs the model_id")
    return load_heatmap(source, model_id)


def ngff_transformations(heatmap) -> list[dict[str, Any]]:
    """The NGFF ``coordinateTransformations`` of a heatmap's only resolution level, axes (y, x) in µm.

    ``scale`` is µm per cell. ``translation`` puts cell (0, 0)'s *centre* where it lies on the slide, in the
    pixel-centre convention NGFF viewers (napari) use: a level-0 image shown with scale ``mpp`` has pixel
    ``j`` centred at ``j * mpp`` µm, i.e. level-0 corner coordinate ``x`` sits at ``(x - 0.5) * mpp``; the
    cell centre's corner coordinate is ``origin + tile0 / 2``, so translation = ``(origin + tile0/2 - 0.5) * mpp``.
    """
    um_x, um_y = heatmap.um_per_cell
    tx = (heatmap.origin_level0[0] + heatmap.tile0[0] / 2.0 - 0.5) * heatmap.mpp_x
    ty = (heatmap.origin_level0[1] + heatmap.tile0[1] / 2.0 - 0.5) * heatmap.mpp_y
    return [{"type": "scale", "scale": [um_y, um_x]}, {"type": "translation", "translation": [ty, tx]}]


def export_heatmap_ngff(source, path: str | os.PathLike, *, model_id: str | None = None,
                        ngff_version: str = "0.4", name: str | None = None, stamp: dict | None = None) -> Path:
    """Write a heatmap as a single-scale OME-Zarr image, atomically.

    Args:
        source: a :class:`~wsi_ad.heatmap.Heatmap`, or a slide store (or its path) with ``model_id``.
        path: the ``.zarr`` (or ``.ome.zarr``) directory to write.
        model_id: the model whose ``heatmap/<model_id>`` stage to export (store sources only).
        ngff_version: ``"0.4"`` (zarr v2, ``.zattrs``; what every napari-ome-zarr version reads, the default)
            or ``"0.5"`` (zarr v3, attributes under ``"ome"``, ``dimension_names`` y, x).
        name: the image name (default: ``heatmap <model_id>``).
        stamp: JSON facts stored under ``wsi_ad.wsi_ad_export`` (:func:`export_store`).

    Layout: array ``0``, (rows, cols) float32, NaN off tissue; ``multiscales`` with axes ``y``, ``x``
    (type space, unit micrometer) and :func:`ngff_transformations` (µm per cell, cell-centre offset), so that
    napari shows it aligned on the slide when the slide is shown in µm (scale = level-0 µm/px). The
    heatmap's own attributes (level-0 geometry, slide score, reducer) are under ``wsi_ad``.
    """
    if ngff_version not in NGFF_VERSIONS:
        raise ExportError(f"ngff_version must be one of {NGFF_VERSIONS}, got {ngff_version!r}")
    heatmap = _heatmap_of(source, model_id)
    values = np.asarray(heatmap.values, dtype=np.float32)
    multiscale: dict[str, Any] = {
        "name": name or f"heatmap {heatmap.model_id}".strip(),
        "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": ngff_transformations(heatmap)}],
        "type": "nearest",
        "metadata": {"description": "wsi-ad anomaly heatmap, one value per tile-grid cell; NaN: no tile"},
    }
    chunks = tuple(max(1, min(1024, n)) for n in values.shape)
    ours = heatmap.attributes() | ({STAMP_KEY: stamp} if stamp is not None else {})
    path = Path(path)
    with atomic_path(path) as temp:
        if ngff_version == "0.4":
            root = zarr.open_group(temp, mode="w", zarr_format=2)
            root.create_array("0", data=values, chunks=chunks, fill_value=np.nan)
            root.attrs.update({"multiscales": [{"version": "0.4", **multiscale}], "wsi_ad": ours})
        else:
            root = zarr.open_group(temp, mode="w", zarr_format=3)
            root.create_array("0", data=values, chunks=chunks, fill_value=np.nan, dimension_names=("y", "x"))
            root.attrs.update({"ome": {"version": "0.5", "multiscales": [multiscale]}, "wsi_ad": ours})
    return path


def heatmap_regions(heatmap, threshold: float) -> list[dict[str, Any]]:
    """Connected regions of cells with value >= ``threshold`` (4-connected) as polygons in level-0 px.

    Each region is the union of its cells' stride boxes (the tile footprints when tiles neither overlap nor
    leave gaps, the default): vertices lie exactly on cell edges, ``origin + k * level0_per_cell``, collinear
    vertices removed, holes kept. Returns ``[{"geometry": shapely geometry, "max_score", "mean_score",
    "n_cells", "area_um2"}]``, highest ``max_score`` first.
    """
    import scipy.ndimage as ndi
    import shapely

    if threshold is None or not math.isfinite(float(threshold)):
        raise ExportError(f"threshold must be a finite score, got {threshold!r}")
    values = np.asarray(heatmap.values, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        hot = np.isfinite(values) & (values >= float(threshold))
    labels, n = ndi.label(hot)
    sx, sy = heatmap.level0_per_cell
    ox, oy = heatmap.origin_level0
    regions = []
    for index, window in enumerate(ndi.find_objects(labels), start=1):
        if window is None:
            continue
        rr, cc = np.nonzero(labels[window] == index)
        rr, cc = rr + window[0].start, cc + window[1].start
        cells = shapely.box(cc, rr, cc + 1, rr + 1)
        geometry = shapely.simplify(shapely.coverage_union_all(cells), 0.0)
        geometry = shapely.transform(geometry, lambda xy: np.array([ox, oy]) + xy * np.array([sx, sy]))
        scores = values[rr, cc].astype(np.float64)
        regions.append({"geometry": geometry, "max_score": float(scores.max()), "mean_score": float(scores.mean()),
                        "n_cells": int(len(rr)), "area_um2": float(geometry.area * heatmap.mpp_x * heatmap.mpp_y)})
    regions.sort(key=lambda r: r["max_score"], reverse=True)
    return regions


def export_geojson(heatmap, path: str | os.PathLike, threshold: float, *, classification: str = GEOJSON_CLASS,
                   color: tuple[int, int, int] = GEOJSON_COLOR, stamp: dict | None = None) -> dict[str, Any]:
    """Write the connected regions of cells >= ``threshold`` as a GeoJSON FeatureCollection, atomically.

    Coordinates are level-0 pixels (x right, y down), as QuPath expects for image objects. Each feature is
    a Polygon (MultiPolygon if a region's union needs it) with properties ``objectType: "annotation"``,
    ``classification: {name, color}`` (RGB list), ``name``, ``max_score``, ``mean_score``, ``area_um2``,
    ``n_cells`` and the same numbers as QuPath ``measurements``. See :func:`heatmap_regions`. ``stamp`` goes to
    the foreign member ``wsi_ad_export`` of the collection (RFC 7946 §6.1; readers ignore it). Returns the
    FeatureCollection (as written).
    """
    import shapely

    features = []
    for i, region in enumerate(heatmap_regions(heatmap, threshold)):
        numbers = {"max_score": region["max_score"], "mean_score": region["mean_score"], "area_um2": region["area_um2"]}
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"wsi-ad/{heatmap.model_id}/{threshold!r}/{i}")),
            "geometry": json.loads(shapely.to_geojson(region["geometry"])),
            "properties": {
                "objectType": "annotation",
                "name": f"{classification} {i + 1} (max {region['max_score']:.3g})",
                "classification": {"name": classification, "color": [int(v) for v in color]},
                "isLocked": False,
                **numbers,
                "n_cells": region["n_cells"],
                "measurements": numbers,
            },
        })
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if stamp is not None:
        collection[STAMP_KEY] = stamp
    write_text_atomic(path, json.dumps(collection))
    return collection


# -- the exports a run asks for ----------------------------------------------------------------------------------

def parse_export_formats(text: str | None) -> tuple[str, ...]:
    """``"geojson,ngff,h5"`` -> ``("geojson", "ngff", "h5")`` (order kept, repeats dropped, case and spaces
    ignored). Raises ``ExportError`` naming an unknown format and the known ones."""
    formats: list[str] = []
    for part in (text or "").split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name not in EXPORT_FORMATS:
            raise ExportError(f"unknown export format {part.strip()!r}; choose from {', '.join(EXPORT_FORMATS)}")
        if name not in formats:
            formats.append(name)
    return tuple(formats)


def export_path(folder: str | os.PathLike, slide_id: str, fmt: str) -> Path:
    """Where format ``fmt`` of slide ``slide_id`` goes in ``folder`` (the folder of its store):
    ``h5/<slide_id>.h5``, ``geojson/<slide_id>.geojson``, ``ngff/<slide_id>.ome.zarr``."""
    sub, suffix = EXPORT_FORMATS[fmt]
    return Path(folder) / sub / f"{slide_id}{suffix}"


def export_stamp(store: SlideStore, fmt: str, *, model_id: str | None = None, threshold: float | None = None) -> dict:
    """What an export of ``fmt`` is made from: the store's slide id, the completion (settings hash and time) of
    each stage it reads, the model and, for GeoJSON, the threshold. Equal stamps mean an identical export."""
    stages = store.stages
    names = ["tiles"]
    if model_id is not None:
        names.append(f"scores/{model_id}")
        if fmt in HEATMAP_FORMATS:
            names.append(f"heatmap/{model_id}")
    stamp: dict[str, Any] = {"format": fmt, "slide_id": store.root.attrs.get("slide_id"), "model_id": model_id,
                             "stages": {n: [stages.get(n, {}).get("config_hash"), stages.get(n, {}).get("completed_at")]
                                        for n in names}}
    if fmt == "geojson":
        stamp["threshold"] = float(threshold) if threshold is not None else None
    return stamp


def read_export_stamp(path: str | os.PathLike, fmt: str) -> dict | None:
    """The stamp stored in an export file written by :func:`export_store`, or None (no file, another tool's
    file, or unreadable: then it is simply written again)."""
    path = Path(path)
    try:
        if fmt == "h5":
            with h5py.File(path, "r") as h5:
                value = h5.attrs.get(STAMP_KEY)
            return json.loads(value) if value is not None else None
        if fmt == "ngff":
            return dict(zarr.open_group(path, mode="r").attrs.get("wsi_ad", {})).get(STAMP_KEY)
        return json.loads(path.read_text(encoding="utf-8")).get(STAMP_KEY)
    except (OSError, ValueError, KeyError, AttributeError, zarr.errors.BaseZarrError):
        return None


def export_store(store: SlideStore, formats: tuple[str, ...] | list[str], folder: str | os.PathLike, *,
                 model_id: str | None = None, threshold: float | None = None, slide: Slide | None = None,
                 ngff_version: str = "0.4") -> dict[str, dict[str, Any]]:
    """Write each of ``formats`` for one slide store into ``folder`` (:func:`export_path`), atomically.

    ``geojson`` and ``ngff`` export the ``heatmap/<model_id>`` stage (GeoJSON: the regions >= ``threshold``,
    in the model's score units); ``h5`` the tile coordinates, with the ``scores/<model_id>`` stage when
    ``model_id`` is given, and needs the open ``slide`` (CLAM records pyramid levels). An export whose file
    already holds the same :func:`export_stamp` is kept as it is. Returns ``{format: {"path": str,
    "written": bool}}``. Raises ``ExportError`` for a format that lacks what it needs (no model, no
    threshold, no slide) and ``StoreError`` for a store without the stage it reads.
    """
    from wsi_ad.heatmap import load_heatmap

    done: dict[str, dict[str, Any]] = {}
    slide_id = store.root.attrs.get("slide_id") or Path(store.path).stem
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}")
        if fmt in HEATMAP_FORMATS and model_id is None:
            raise ExportError(f"the {fmt} export is made from a model's heatmap: score the slide first (--model)")
        if fmt == "geojson" and (threshold is None or not math.isfinite(float(threshold))):
            raise ExportError(f"the geojson export needs a finite score threshold, got {threshold!r}")
        if fmt == "h5" and slide is None:
            raise ExportError("the h5 export needs the open slide (CLAM records its pyramid levels)")
        path = export_path(folder, slide_id, fmt)
        stamp = export_stamp(store, fmt, model_id=model_id, threshold=threshold)
        written = read_export_stamp(path, fmt) != stamp
        if written:
            if fmt == "h5":
                export_clam_h5(store, slide, path, model_id, stamp=stamp)
            elif fmt == "ngff":
                export_heatmap_ngff(load_heatmap(store, model_id), path, ngff_version=ngff_version,
                                    name=f"{slide_id} heatmap {model_id}", stamp=stamp)
            else:
                export_geojson(load_heatmap(store, model_id), path, float(threshold), stamp=stamp)
        done[fmt] = {"path": str(path), "written": written}
    return done
