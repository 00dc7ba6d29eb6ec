"""Exports of a slide store for the tools pathologists and ML engineers already use.

* :func:`export_clam_h5`: tile coordinates (and scores) as a CLAM-style ``.h5``;
* :func:`export_heatmap_ngff`: a heatmap as an OME-Zarr image (NGFF 0.4 on zarr v2, or 0.5 on zarr v3)
  with a physical scale in micrometres, so napari (napari-ome-zarr) overlays it on the slide;
* :func:`export_geojson`: connected high-score regions as a GeoJSON ``FeatureCollection`` of polygons in
  level-0 pixels, which QuPath imports as annotations (File > Import objects, or drag and drop).
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


class ExportError(WsiAdError):
    """An export cannot be made: bad arguments or a store lacking what the export needs."""


def export_clam_h5(store: SlideStore, slide: Slide, path: str | os.PathLike, model_id: str | None = None) -> Path:
    """Write the tile coordinates as a CLAM-style ``.h5`` file, atomically.

    Dataset ``coords``: (N, 2) int64 level-0 top-left (x, y), as CLAM's ``create_patches_fp.py`` writes.
    Its attributes follow CLAM: ``patch_level`` (the pyramid level that serves the coarsest extracted
    magnification), ``patch_size`` (the tile footprint in that level's pixels), ``downsample``,
    ``level_dim``, ``name``; plus ``patch_size_level0`` and ``mpp`` (µm/px of that magnification).

    With ``model_id``, dataset ``scores`` ((N,) float32, the same order as ``coords``) holds the tile
    anomaly scores of the store's ``scores/<model_id>`` stage (attribute ``model_id``).
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
                        ngff_version: str = "0.4", name: str | None = None) -> Path:
    """Write a heatmap as a single-scale OME-Zarr image, atomically.

    Args:
        source: a :class:`~wsi_ad.heatmap.Heatmap`, or a slide store (or its path) with ``model_id``.
        path: the ``.zarr`` (or ``.ome.zarr``) directory to write.
        model_id: the model whose ``heatmap/<model_id>`` stage to export (store sources only).
        ngff_version: ``"0.4"`` (zarr v2, ``.zattrs``; what every napari-ome-zarr version reads, the default)
            or ``"0.5"`` (zarr v3, attributes under ``"ome"``, ``dimension_names`` y, x).
        name: the image name (default: ``heatmap <model_id>``).

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
    path = Path(path)
    with atomic_path(path) as temp:
        if ngff_version == "0.4":
            root = zarr.open_group(temp, mode="w", zarr_format=2)
            root.create_array("0", data=values, chunks=chunks, fill_value=np.nan)
            root.attrs.update({"multiscales": [{"version": "0.4", **multiscale}], "wsi_ad": heatmap.attributes()})
        else:
            root = zarr.open_group(temp, mode="w", zarr_format=3)
            root.create_array("0", data=values, chunks=chunks, fill_value=np.nan, dimension_names=("y", "x"))
            root.attrs.update({"ome": {"version": "0.5", "multiscales": [multiscale]}, "wsi_ad": heatmap.attributes()})
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
                   color: tuple[int, int, int] = GEOJSON_COLOR) -> dict[str, Any]:
    """Write the connected regions of cells >= ``threshold`` as a GeoJSON FeatureCollection, atomically.

    Coordinates are level-0 pixels (x right, y down), as QuPath expects for image objects. Each feature is
    a Polygon (MultiPolygon if a region's union needs it) with properties ``objectType: "annotation"``,
    ``classification: {name, color}`` (RGB list), ``name``, ``max_score``, ``mean_score``, ``area_um2``,
    ``n_cells`` and the same numbers as QuPath ``measurements``. See :func:`heatmap_regions`. Returns the
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
    collection = {"type": "FeatureCollection", "features": features}
    write_text_atomic(path, json.dumps(collection))
    return collection
