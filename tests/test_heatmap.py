"""Aggregation of tile scores into heatmaps and slide scores, overlays and exports (wsi_ad.heatmap, wsi_ad.overlay,
wsi_ad.export), on the session's synthetic tumour and normal slides scored by the small trained model."""

from __future__ import annotations

import json
import math
import shutil

import h5py
import numpy as np
import pytest
import zarr
from PIL import Image

from wsi_ad.annotations import polygon_mask, rasterize_annotations, read_asap_xml
from wsi_ad.errors import WsiAdError
from wsi_ad.export import export_clam_h5, export_geojson, export_heatmap_ngff, heatmap_regions
from wsi_ad.heatmap import (
    DEFAULT_REDUCER,
    Heatmap,
    HeatmapError,
    heatmap_slide_score,
    interior_cells,
    load_heatmap,
    run_heatmap_stage,
    slide_score,
    smooth_heatmap,
    tile_grid,
)
from wsi_ad.overlay import (
    OverlayError,
    ScoreScale,
    auto_thumbnail_mpp,
    cohort_scale,
    colormap_lut,
    compose_overlay,
    heatmap_on_thumbnail,
    level0_per_thumbnail_px,
    render_overlay,
    tissue_on_thumbnail,
    write_overlay,
)
from wsi_ad.preprocess import load_tissue_mask
from wsi_ad.slide import open_slide
from wsi_ad.store import SlideStore, StoreError, config_hash

#: Thumbnail resolution used by the alignment tests: 32 level-0 px per thumbnail px on the 0.243 µm/px slides,
#: so one 256 px tile-grid cell is exactly 8 thumbnail pixels.
THUMB_MPP = 0.243 * 32


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scored(scored_setting, tmp_path_factory):
    """Copies of the session's two stores, scored by the small model (``scores/<model_id>``, the scoring
    stage's contract), with their heatmap stages run with the defaults."""
    from wsi_ad.detectors.scorer import load_scorer, score_store

    root = tmp_path_factory.mktemp("heatmap_stores")
    scorer = load_scorer(scored_setting["model"], device="cpu")
    out = {"model_id": scorer.model_id, "annotations": read_asap_xml(scored_setting["tumor_xml"]),
           "tumor_slide": scored_setting["tumor"].path, "normal_slide": scored_setting["normal"].path}
    for kind in ("tumor", "normal"):
        path = root / scored_setting[f"{kind}_store"].name
        shutil.copytree(scored_setting[f"{kind}_store"], path)
        store = SlideStore.open(path, mode="r+")
        scores = score_store(store, scorer)
        with store.write_stage(f"scores/{scorer.model_id}", config_hash({"model": scorer.model_id}),
                               n_tiles=len(scores)) as group:
            group.create_array("scores", data=scores)
        out[f"{kind}_store"] = store
        out[f"{kind}_scores"] = scores
        out[f"{kind}_heatmap"] = run_heatmap_stage(store, scorer.model_id)
    return out


def _tumour_cells(heatmap: Heatmap, annotations, *, overlapping: bool) -> np.ndarray:
    """(rows, cols) bool: cells whose centre lies in a tumour polygon, or (``overlapping``) any part of which does."""
    sub = 8 if overlapping else 1
    rows, cols = heatmap.shape
    fine = rasterize_annotations(annotations, (rows * sub, cols * sub), downsample=heatmap.level0_per_cell[0] / sub)
    return fine.reshape(rows, sub, cols, sub).any(axis=(1, 3))


def _inverse_lut(image: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """Normalized score in [0, 1] of each pixel painted with an exact colour-map colour (alpha 1), else NaN."""
    lut = colormap_lut(cmap).astype(np.int64)
    keys = (lut[:, 0] << 16) | (lut[:, 1] << 8) | lut[:, 2]
    pixels = image.astype(np.int64)
    codes = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    order = np.argsort(keys)
    pos = np.clip(np.searchsorted(keys[order], codes), 0, len(keys) - 1)
    found = keys[order][pos] == codes
    return np.where(found, order[pos] / 255.0, np.nan)


# -- pure functions on hand-made arrays -------------------------------------------------------------

def test_tile_grid_places_scores_and_leaves_nan_off_tissue():
    grid = np.array([[0, 1], [2, 3], [1, 0]], dtype=np.int32)
    values = tile_grid(grid, np.array([0.5, 2.0, 1.0], dtype=np.float32), (3, 4))
    assert values.dtype == np.float32 and values.shape == (3, 4)
    assert values[0, 1] == 0.5 and values[2, 3] == 2.0 and values[1, 0] == 1.0
    assert np.isnan(values).sum() == 12 - 3
    with pytest.raises(HeatmapError, match="outside"):
        tile_grid(np.array([[3, 0]]), np.array([1.0]), (3, 4))
    with pytest.raises(HeatmapError, match="more than once"):
        tile_grid(np.array([[1, 1], [1, 1]]), np.array([1.0, 2.0]), (3, 4))
    with pytest.raises(HeatmapError, match=r"\(N,\)"):
        tile_grid(grid, np.array([1.0]), (3, 4))


def test_reducers_on_hand_made_scores():
    scores = np.array([[0.1, 0.2, np.nan], [0.9, 0.4, 0.3], [np.nan, 0.8, 0.5]])
    assert slide_score(scores, "max") == pytest.approx(0.9)
    assert slide_score(scores, "topk_mean", k=2) == pytest.approx(0.85)
    assert slide_score(scores, "topk_mean", k=100) == pytest.approx(np.nanmean(scores))     # fewer than k: all
    assert slide_score(scores, "percentile", q=50) == pytest.approx(0.4)
    assert slide_score(scores, "percentile", q=100) == pytest.approx(0.9)
    assert slide_score(scores, "fraction_above", threshold=0.5) == pytest.approx(3 / 7)     # >=: 0.9, 0.8, 0.5
    assert math.isnan(slide_score(np.full(4, np.nan), "max"))                             # no tissue: no score
    assert slide_score(scores) == slide_score(scores, DEFAULT_REDUCER)
    with pytest.raises(HeatmapError, match="unknown reducer"):
        slide_score(scores, "mean_of_everything")
    with pytest.raises(HeatmapError, match="threshold"):
        slide_score(scores, "fraction_above")
    with pytest.raises(HeatmapError, match="k >= 1"):
        slide_score(scores, "topk_mean", k=0)
    assert issubclass(HeatmapError, WsiAdError)


def test_slide_score_leaves_the_tissue_rim_out():
    values = np.full((7, 7), np.nan, dtype=np.float32)
    values[1:6, 1:6] = 0.1                                     # 5 x 5 tissue
    values[1, 3] = 9.0                                         # a hot tile on the edge
    values[3, 3] = 0.5                                         # a warm tile in the middle
    np.testing.assert_array_equal(interior_cells(values, 1), np.pad(np.ones((3, 3), bool), 2))
    assert interior_cells(values, 2).sum() == 1 and interior_cells(values, 0).sum() == 25
    assert heatmap_slide_score(values, "max", edge_cells=0) == pytest.approx(9.0)
    assert heatmap_slide_score(values, "max", edge_cells=1) == pytest.approx(0.5)
    thin = np.full((3, 3), np.nan, dtype=np.float32)
    thin[1, :] = [0.2, 0.7, 0.3]                               # no interior at all: every cell counts
    assert heatmap_slide_score(thin, "max", edge_cells=2) == pytest.approx(0.7)
    with pytest.raises(HeatmapError, match="edge_cells"):
        interior_cells(values, -1)


def test_smoothing_is_nan_aware_and_in_micrometres():
    values = np.full((20, 20), 2.0, dtype=np.float32)
    values[:, :5] = np.nan                                     # off tissue
    smoothed = smooth_heatmap(values, 100.0, (62.2, 62.2))
    assert np.isnan(smoothed[:, :5]).all()                     # NaN stays NaN, is not filled
    np.testing.assert_allclose(smoothed[:, 5:], 2.0, rtol=1e-5)  # and does not pull the edge down
    spike = np.zeros((21, 21), dtype=np.float32)
    spike[10, 10] = 1.0
    narrow = smooth_heatmap(spike, 50.0, (62.2, 62.2))
    wide = smooth_heatmap(spike, 50.0, (31.1, 31.1))           # same µm on a finer grid: more cells wide
    assert wide[10, 10] < narrow[10, 10]
    assert narrow.sum() == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(HeatmapError, match="positive"):
        smooth_heatmap(values, -1.0, (62.2, 62.2))


def test_score_scale_and_cohort_scale():
    scale = cohort_scale([np.arange(100.0), np.array([np.nan, 1000.0])], low_pct=0, high_pct=100)
    assert (scale.vmin, scale.vmax) == (0.0, 1000.0)
    np.testing.assert_allclose(scale.normalize(np.array([-5.0, 500.0, 2000.0])), [0.0, 0.5, 1.0])
    assert cohort_scale([np.full(5, 3.0)]).vmin < 3.0 < cohort_scale([np.full(5, 3.0)]).vmax
    with pytest.raises(OverlayError):
        cohort_scale([np.full(3, np.nan)])
    with pytest.raises(OverlayError):
        ScoreScale(1.0, 1.0)


# -- the store stage --------------------------------------------------------------------------------

def test_heatmap_stage_layout_and_resume(scored):
    store, model_id = scored["tumor_store"], scored["model_id"]
    heatmap = scored["tumor_heatmap"]
    tiles = store.require("tiles")
    geometry = tiles.attrs["geometry"]
    assert heatmap.shape == tuple(geometry["grid_shape"])
    assert np.count_nonzero(np.isfinite(heatmap.values)) == tiles["grid"].shape[0]
    np.testing.assert_array_equal(heatmap.values[tuple(tiles["grid"][:].T)], scored["tumor_scores"])
    assert heatmap.level0_per_cell == tuple(geometry["stride0"]) and heatmap.tile0 == tuple(geometry["tile0"])
    assert heatmap.um_per_cell == pytest.approx((256 * 0.243, 256 * 0.243))
    assert heatmap.slide_score == pytest.approx(heatmap_slide_score(heatmap.values))
    assert heatmap.reducer_params["edge_cells"] == 2 and heatmap.reducer_params["k"] == 3
    group = store.require(f"heatmap/{model_id}")
    attrs = dict(group.attrs)
    for key in ("um_per_cell", "level0_per_cell", "origin_level0", "tile0", "slide_score", "reducer"):
        assert key in attrs
    assert attrs["reducer"] == DEFAULT_REDUCER and attrs["origin_level0"] == [0.0, 0.0]
    assert "cmap" not in attrs and "colormap" not in attrs
    loaded = load_heatmap(store.path, model_id)
    np.testing.assert_array_equal(loaded.values, heatmap.values)
    assert loaded.slide_score == pytest.approx(heatmap.slide_score)
    # Same settings: skipped; other settings: recomputed.
    marker = store.stages[f"heatmap/{model_id}"]
    run_heatmap_stage(store, model_id)
    assert store.stages[f"heatmap/{model_id}"] == marker
    smoothed = run_heatmap_stage(store, model_id, smoothing_um=100.0, reducer="max")
    assert store.stages[f"heatmap/{model_id}"]["config_hash"] != marker["config_hash"]
    assert smoothed.smoothing_um == 100.0 and smoothed.reducer == "max"
    assert np.array_equal(np.isnan(smoothed.values), np.isnan(heatmap.values))
    run_heatmap_stage(store, model_id)                          # back to the defaults for the other tests
    with pytest.raises(StoreError, match="scores/no-such-model"):
        run_heatmap_stage(store, "no-such-model")
    with pytest.raises(HeatmapError):
        run_heatmap_stage(store, model_id, reducer="fraction_above")


def test_tumour_slide_scores_above_normal_slide(scored):
    # Measured with the defaults (top-3 mean, 2-cell rim left out): 0.81 vs 0.67; over every cell the
    # normal slide's tissue-edge tiles win (top-3 mean 0.83 vs 0.86), which is why the rim is left out.
    tumour, normal = scored["tumor_heatmap"].slide_score, scored["normal_heatmap"].slide_score
    assert tumour > normal + 0.05, (tumour, normal)


def test_hottest_cells_fall_inside_the_tumour_polygons(scored):
    heatmap, annotations = scored["tumor_heatmap"], scored["annotations"]
    scored_cells = np.isfinite(heatmap.values)
    inside = _tumour_cells(heatmap, annotations, overlapping=False) & scored_cells
    touching = _tumour_cells(heatmap, annotations, overlapping=True) & scored_cells
    k = int(inside.sum())
    assert k >= 20                                             # 0.8 mm + 0.4 mm lesions: ~ 100 cells
    values = np.where(scored_cells, heatmap.values, -np.inf).ravel()
    top = np.argsort(values)[::-1][:k]
    strict = inside.ravel()[top].mean()
    loose = touching.ravel()[top].mean()
    # Measured with the session's small model: of the k = 96 hottest of 239 scored cells, 0.83 have their centre
    # in a polygon and 0.86 overlap one (chance: k / scored cells = 0.4).
    assert strict >= 0.7, f"only {strict:.2f} of the {k} hottest cells lie inside the tumour polygons"
    assert loose >= 0.72, f"only {loose:.2f} of the {k} hottest cells touch the tumour polygons"


# -- coordinates ------------------------------------------------------------------------------------

def test_coordinates_round_trip_tile_cell_thumbnail_geojson(scored, tmp_path):
    store, heatmap = scored["tumor_store"], scored["tumor_heatmap"]
    tiles = store.require("tiles")
    grid, coords = tiles["grid"][:], tiles["coords"][:]
    # tile -> cell -> level-0: the tile's own top-left, exactly; tile centre -> cell: its own cell.
    x, y = heatmap.cell_to_level0(grid[:, 0], grid[:, 1])
    np.testing.assert_array_equal(np.round(np.stack([x, y], axis=1)).astype(np.int64), coords)
    rows, cols = heatmap.level0_to_cell(coords[:, 0] + heatmap.tile0[0] / 2, coords[:, 1] + heatmap.tile0[1] / 2)
    np.testing.assert_array_equal(np.stack([rows, cols], axis=1), grid)
    # One hot cell: the overlay paints exactly its thumbnail pixels and the GeoJSON polygon is exactly its tile.
    i = len(grid) // 2
    r, c = (int(v) for v in grid[i])
    values = np.full(heatmap.shape, np.nan, dtype=np.float32)
    values[r, c] = 1.0
    single = Heatmap(values, heatmap.level0_per_cell, heatmap.tile0, heatmap.mpp_x, heatmap.mpp_y, model_id="one")
    with open_slide(scored["tumor_slide"]) as slide:
        for thumb_mpp in (THUMB_MPP, 5.0):
            thumbnail = slide.thumbnail(thumb_mpp)
            size = (thumbnail.shape[1], thumbnail.shape[0])
            px, py = level0_per_thumbnail_px(slide.dimensions, size)
            painted = compose_overlay(np.zeros_like(thumbnail), single, ScoreScale(0.0, 1.0), (px, py), alpha=1.0,
                                      colorbar=False)
            hot = np.argwhere(painted.any(axis=2))
            x0, y0, x1, y1 = coords[i, 0], coords[i, 1], coords[i, 0] + heatmap.tile0[0], coords[i, 1] + heatmap.tile0[1]
            # thumbnail pixels whose centre (j + 0.5) * px lies in [x0, x1)
            j0, j1 = math.ceil(x0 / px - 0.5), math.ceil(x1 / px - 0.5)
            i0, i1 = math.ceil(y0 / py - 0.5), math.ceil(y1 / py - 0.5)
            assert (hot.min(axis=0).tolist(), hot.max(axis=0).tolist()) == ([i0, j0], [i1 - 1, j1 - 1])
            assert len(hot) == (i1 - i0) * (j1 - j0)
            if thumb_mpp == THUMB_MPP:
                assert (px, py) == (32.0, 32.0) and (i0, j0, i1 - i0, j1 - j0) == (8 * r, 8 * c, 8, 8)
    collection = export_geojson(single, tmp_path / "one.geojson", threshold=0.5)
    assert len(collection["features"]) == 1
    ring = np.array(collection["features"][0]["geometry"]["coordinates"][0])
    corners = {(float(x0), float(y0)), (float(x1), float(y0)), (float(x1), float(y1)), (float(x0), float(y1))}
    assert {tuple(p) for p in ring.tolist()} == corners and len(ring) == 5


# -- overlays ---------------------------------------------------------------------------------------

def test_overlay_tumour_hot_normal_cool_with_one_cohort_scale(scored):
    scale = cohort_scale([scored["tumor_heatmap"], scored["normal_heatmap"]])
    painted = {}
    for kind in ("tumor", "normal"):
        image = render_overlay(scored[f"{kind}_slide"], scored[f"{kind}_heatmap"], scale, thumbnail_mpp=THUMB_MPP,
                               alpha=1.0, colorbar=False)
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        painted[kind] = _inverse_lut(image)
    tumour = rasterize_annotations(scored["annotations"], (256, 256), downsample=32.0)
    on_tissue = np.isfinite(painted["tumor"])
    inside = np.nanmean(painted["tumor"][tumour & on_tissue])
    outside = np.nanmean(painted["tumor"][~tumour & on_tissue])
    normal = np.nanmean(painted["normal"])
    # Measured: inside 0.71, outside 0.33, normal slide 0.25 of the colour scale.
    assert inside - outside > 0.25 and inside - normal > 0.3, (inside, outside, normal)
    assert abs(outside - normal) < 0.2


def test_overlay_with_tissue_annotations_and_colorbar(scored, tmp_path):
    store, heatmap = scored["tumor_store"], scored["tumor_heatmap"]
    scale = cohort_scale([scored["tumor_heatmap"], scored["normal_heatmap"]])
    mask = load_tissue_mask(store)
    with open_slide(scored["tumor_slide"]) as slide:
        auto = auto_thumbnail_mpp(slide)
        assert max(round(d * slide.mpp / auto) for d in slide.dimensions) <= 2000
        path = write_overlay(tmp_path / "tumor.png", slide, heatmap, scale, tissue_mask=mask,
                             annotations=scored["annotations"], thumbnail_mpp=THUMB_MPP)
        plain = render_overlay(slide, heatmap, scale, thumbnail_mpp=THUMB_MPP, colorbar=False)
        masked = render_overlay(slide, heatmap, scale, thumbnail_mpp=THUMB_MPP, colorbar=False, tissue_mask=mask)
        thumbnail = slide.thumbnail(THUMB_MPP)
        tissue = tissue_on_thumbnail(mask, (256, 256), (32.0, 32.0), (slide.mpp_x, slide.mpp_y))
        with pytest.raises(OverlayError, match="does not belong"):
            render_overlay(slide, Heatmap(heatmap.values, heatmap.level0_per_cell, heatmap.tile0, 0.5, 0.5), scale)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] >= 256 and image.shape[1] > 256 + 60              # slide + colour bar panel
    slide_part = image[:256, :256]
    green = (slide_part[..., 1] > 150) & (slide_part[..., 0] < 60) & (slide_part[..., 2] < 60)
    assert green.sum() > 50                                                  # tumour outlines drawn
    # outside the tissue mask the thumbnail shows through: heat only on tissue, and less of it than unmasked
    painted_plain, painted_masked = (plain != thumbnail).any(axis=2), (masked != thumbnail).any(axis=2)
    assert painted_masked.sum() > 0.5 * painted_plain.sum()
    assert not (painted_masked & ~tissue).any() and (painted_plain & ~tissue).any()
    panel = image[:, 256:]
    assert (panel < 100).any() and panel.std() > 10                          # bar and text are there


# -- exports ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_heatmap_ngff_metadata(scored, tmp_path, version):
    store, heatmap, model_id = scored["tumor_store"], scored["tumor_heatmap"], scored["model_id"]
    path = export_heatmap_ngff(store, tmp_path / "heatmap.ome.zarr", model_id=model_id, ngff_version=version)
    root = zarr.open_group(path, mode="r")
    assert root.metadata.zarr_format == (2 if version == "0.4" else 3)
    attrs = dict(root.attrs)
    if version == "0.4":
        multiscale = attrs["multiscales"][0]
        assert multiscale["version"] == "0.4" and (path / ".zattrs").exists()
    else:
        assert attrs["ome"]["version"] == "0.5"
        multiscale = attrs["ome"]["multiscales"][0]
        assert root["0"].metadata.dimension_names == ("y", "x")
    assert [a["name"] for a in multiscale["axes"]] == ["y", "x"]
    assert all(a["type"] == "space" and a["unit"] == "micrometer" for a in multiscale["axes"])
    dataset = multiscale["datasets"][0]
    scale, translation = dataset["coordinateTransformations"]
    assert scale["type"] == "scale" and translation["type"] == "translation"
    assert scale["scale"] == pytest.approx([heatmap.um_per_cell[1], heatmap.um_per_cell[0]])
    values = root[dataset["path"]][:]
    np.testing.assert_array_equal(values, heatmap.values)          # NaN in the same places (array_equal nan-equal)
    # napari (pixel-centre convention): the slide shown with scale = mpp puts level-0 corner coordinate x at
    # (x - 0.5) * mpp µm; each cell's world position must be its tile's centre there.
    tiles = store.require("tiles")
    grid, coords = tiles["grid"][:], tiles["coords"][:]
    world = np.asarray(translation["translation"]) + grid * np.asarray(scale["scale"])
    centre_um = (coords[:, ::-1] + np.asarray(heatmap.tile0[::-1]) / 2 - 0.5) * np.array([heatmap.mpp_y, heatmap.mpp_x])
    np.testing.assert_allclose(world, centre_um, atol=1e-6)
    assert attrs["wsi_ad"]["slide_score"] == pytest.approx(heatmap.slide_score)


def test_geojson_regions_sit_on_the_tumour(scored, tmp_path):
    heatmap, annotations = scored["tumor_heatmap"], scored["annotations"]
    finite = heatmap.values[np.isfinite(heatmap.values)]
    threshold = float(np.percentile(finite, 95))
    path = tmp_path / "regions.geojson"
    export_geojson(heatmap, path, threshold)
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection" and collection["features"]
    boxes = np.array([a.bbox for a in annotations])
    x_min, y_min = boxes[:, :2].min(axis=0) - heatmap.tile0[0]          # one cell of slack around the lesions
    x_max, y_max = boxes[:, 2:].max(axis=0) + heatmap.tile0[0]
    biggest = max(collection["features"], key=lambda f: f["properties"]["area_um2"])
    for feature in collection["features"]:
        props = feature["properties"]
        assert props["objectType"] == "annotation" and props["classification"]["name"] == "Tumor"
        assert len(props["classification"]["color"]) == 3
        assert props["max_score"] >= props["mean_score"] >= threshold and props["area_um2"] > 0
        assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
    ring = np.array(biggest["geometry"]["coordinates"][0])
    assert (ring[:, 0] >= x_min).all() and (ring[:, 0] <= x_max).all()
    assert (ring[:, 1] >= y_min).all() and (ring[:, 1] <= y_max).all()
    # vertices on cell edges (multiples of the stride), area = cells x cell area
    assert np.allclose(ring / np.asarray(heatmap.level0_per_cell), np.round(ring / np.asarray(heatmap.level0_per_cell)))
    region = heatmap_regions(heatmap, threshold)[0]
    assert region["area_um2"] == pytest.approx(region["n_cells"] * np.prod(heatmap.um_per_cell))
    # most of the hot area lies on tumour
    cells_in = polygon_mask(annotations[0].vertices, heatmap.shape, heatmap.level0_per_cell[0])
    for ann in annotations[1:]:
        cells_in |= polygon_mask(ann.vertices, heatmap.shape, heatmap.level0_per_cell[0])
    hot = np.isfinite(heatmap.values) & (heatmap.values >= threshold)
    assert (cells_in & hot).sum() / hot.sum() >= 0.5
    with pytest.raises(WsiAdError, match="threshold"):
        export_geojson(heatmap, path, float("nan"))


def test_clam_h5_carries_the_scores(scored, tmp_path):
    store, model_id = scored["tumor_store"], scored["model_id"]
    with open_slide(scored["tumor_slide"]) as slide:
        with_scores = export_clam_h5(store, slide, tmp_path / "with.h5", model_id=model_id)
        without = export_clam_h5(store, slide, tmp_path / "without.h5")
    with h5py.File(with_scores, "r") as h5:
        np.testing.assert_array_equal(h5["coords"][:], store.require("tiles")["coords"][:])
        np.testing.assert_array_equal(h5["scores"][:], scored["tumor_scores"])
        assert h5["scores"].dtype == np.float32 and h5["scores"].attrs["model_id"] == model_id
        assert h5["coords"].attrs["patch_size"] == 64
    with h5py.File(without, "r") as h5:
        assert "scores" not in h5 and "coords" in h5


# -- hotspots and deep-zoom layers (wsi-ad view) ---------------------------------------------------------

def _bumps_heatmap() -> Heatmap:
    """A 40 x 60 grid of 256 px cells at 0.243 µm/px (62 µm a cell) with two Gaussian bumps, a weaker
    neighbour next to the strong one, and an off-tissue band."""
    rows, cols = np.mgrid[0:40, 0:60]
    values = (2.0 * np.exp(-((rows - 10) ** 2 + (cols - 12) ** 2) / 8.0)
              + 1.0 * np.exp(-((rows - 30) ** 2 + (cols - 45) ** 2) / 8.0)
              + 0.9 * np.exp(-((rows - 10) ** 2 + (cols - 15) ** 2) / 0.5))
    values[:, 25:30] = np.nan
    return Heatmap(values=values.astype(np.float32), level0_per_cell=(256, 256), tile0=(256, 256), mpp_x=0.243,
                   mpp_y=0.243, origin_level0=(100.0, 50.0))


def test_hotspots_are_separated_local_maxima_highest_first():
    from wsi_ad.heatmap import hotspots

    heatmap = _bumps_heatmap()
    spots = hotspots(heatmap, 5)
    # the peak at (10, 15) lies 3 cells (187 µm) from the stronger one: the same lesion, not a hotspot of its own
    assert [(s["row"], s["col"]) for s in spots[:2]] == [(10, 12), (30, 45)]
    assert spots[0]["rank"] == 1 and spots[0]["score"] == pytest.approx(float(np.nanmax(heatmap.values)))
    assert (spots[0]["x"], spots[0]["y"]) == (100.0 + 12 * 256, 50.0 + 10 * 256)
    assert (spots[0]["centre_x"], spots[0]["centre_y"]) == (100.0 + 12 * 256 + 128, 50.0 + 10 * 256 + 128)
    assert [s["score"] for s in spots] == sorted((s["score"] for s in spots), reverse=True)
    assert all(math.isfinite(s["score"]) for s in spots)
    close = hotspots(heatmap, 5, min_separation_um=0.0)          # every strict local maximum
    assert (10, 15) in [(s["row"], s["col"]) for s in close]
    assert hotspots(Heatmap(values=np.full((3, 3), np.nan, np.float32), level0_per_cell=(256, 256),
                            tile0=(256, 256), mpp_x=0.243, mpp_y=0.243)) == []
    flat = hotspots(Heatmap(values=np.ones((3, 3), np.float32), level0_per_cell=(256, 256), tile0=(256, 256),
                            mpp_x=0.243, mpp_y=0.243))
    assert [(s["row"], s["col"]) for s in flat] == [(0, 0)]
    with pytest.raises(HeatmapError):
        hotspots(heatmap, 0)


def test_a_layer_tile_is_the_matching_crop_of_the_layer_drawn_whole(scored):
    """The ``origin`` of the deep-zoom layer functions: a tile drawn on its own equals the same pixels of the whole
    image (heatmap with its tissue mask, tissue mask, outlines)."""
    from wsi_ad.overlay import heatmap_layer, outline_layer, tissue_layer

    heatmap, store = scored["tumor_heatmap"], scored["tumor_store"]
    mask = load_tissue_mask(store)
    scale = ScoreScale(float(np.nanmin(heatmap.values)), float(np.nanmax(heatmap.values)))
    per_px, whole_size = (8.0, 8.0), (1024, 1024)          # the 8192 px slide at 1/8
    mpp = (heatmap.mpp_x, heatmap.mpp_y)
    whole = {"heatmap": heatmap_layer(heatmap, scale, (0, 0), whole_size, per_px, tissue_mask=mask),
             "tissue": tissue_layer(mask, mpp, (0, 0), whole_size, per_px),
             "outlines": outline_layer(scored["annotations"], (0, 0), whole_size, per_px)}
    x0, y0, w, h = 384, 512, 256, 200
    origin = (x0 * 8.0, y0 * 8.0)
    tile = {"heatmap": heatmap_layer(heatmap, scale, origin, (w, h), per_px, tissue_mask=mask),
            "tissue": tissue_layer(mask, mpp, origin, (w, h), per_px),
            "outlines": outline_layer(scored["annotations"], origin, (w, h), per_px)}
    for name in whole:
        assert tile[name].shape == (h, w, 4)
        crop = whole[name][y0:y0 + h, x0:x0 + w]
        if name == "outlines":          # PIL's wide lines are not shift-exact where they enter the image: a few pixels
            assert (tile[name] != crop).any(axis=-1).mean() < 1e-3
        else:
            np.testing.assert_array_equal(tile[name], crop, err_msg=name)
    assert (whole["heatmap"][..., 3] == 255).any() and (whole["heatmap"][..., 3] == 0).any()
    assert (whole["outlines"][..., 3] == 255).any()
    # the heatmap layer shows heat where the thumbnail overlay does
    expected = np.isfinite(heatmap_on_thumbnail(heatmap, whole_size, per_px)) & tissue_on_thumbnail(
        mask, whole_size, per_px, mpp)
    np.testing.assert_array_equal(whole["heatmap"][..., 3] == 255, expected)
