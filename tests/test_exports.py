"""``--export geojson,ngff,h5`` on ``wsi-ad process`` and ``wsi-ad score`` (issue 14, item 6): every export is
reachable from the command line, written beside the store, listed in the report, kept on a re-run that changes
nothing, and read back the way the tools it is for read it: the GeoJSON as QuPath imports objects (a
FeatureCollection of Polygons in level-0 px with a classification and measurements), the heatmap with the
OME-Zarr reference reader (``ome-zarr``, what napari-ome-zarr uses), the h5 with h5py as CLAM does."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from pipelines.cli import main
from wsi_ad.heatmap import load_heatmap
from wsi_ad.scoring import load_scores
from wsi_ad.store import SlideStore


def _mtimes(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_geojson(path, heatmap, threshold, level0_size):
    """Read ``path`` as QuPath's GeoJSON import does and check it against the heatmap cells >= ``threshold``."""
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection" and collection["features"]
    total_area = 0.0
    for feature in collection["features"]:
        assert feature["type"] == "Feature"
        geometry = feature["geometry"]
        assert geometry["type"] in ("Polygon", "MultiPolygon")
        props = feature["properties"]
        assert props["objectType"] == "annotation"                      # QuPath: an annotation, not a detection
        assert props["classification"]["name"] == "Tumor" and len(props["classification"]["color"]) == 3
        assert set(props["measurements"]) == {"max_score", "mean_score", "area_um2"}
        assert all(isinstance(v, float) for v in props["measurements"].values())
        assert props["measurements"]["max_score"] >= threshold
        polygon = shape(geometry)
        assert polygon.is_valid and polygon.area > 0
        x0, y0, x1, y1 = polygon.bounds                                  # level-0 px, on the slide
        assert 0 <= x0 < x1 <= level0_size[0] and 0 <= y0 < y1 <= level0_size[1]
        # vertices lie on the heatmap's cell edges: origin + k * cell size (level-0 px)
        xy = shapely.get_coordinates(polygon)
        cells = (xy - np.asarray(heatmap.origin_level0)) / np.asarray(heatmap.level0_per_cell)
        np.testing.assert_allclose(cells, np.round(cells), atol=1e-6)
        total_area += polygon.area
    # the regions cover exactly the cells at or above the threshold
    with np.errstate(invalid="ignore"):
        n_hot = int(np.sum(np.isfinite(heatmap.values) & (heatmap.values >= threshold)))
    cell_area = heatmap.level0_per_cell[0] * heatmap.level0_per_cell[1]
    assert total_area == pytest.approx(n_hot * cell_area)
    return collection


def _check_ngff(path, heatmap):
    """Open ``path`` with the OME-Zarr reader and check axes, units, scale and values."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    location = parse_url(str(path), mode="r")
    assert location is not None, f"{path}: ome-zarr does not recognise it as OME-Zarr"
    nodes = list(Reader(location)())
    image = next(node for node in nodes if node.load(Multiscales))
    axes = image.metadata["axes"]
    assert [a["name"] for a in axes] == ["y", "x"]
    assert all(a["type"] == "space" and a["unit"] == "micrometer" for a in axes)
    transforms = image.metadata["coordinateTransformations"][0]
    scale = next(t["scale"] for t in transforms if t["type"] == "scale")
    translation = next(t["translation"] for t in transforms if t["type"] == "translation")
    um_x, um_y = heatmap.um_per_cell
    assert scale == pytest.approx([um_y, um_x])
    # one cell = one tile stride: 256 level-0 px at 0.243 µm/px for 64 px tiles at 10x
    assert um_x == pytest.approx(heatmap.level0_per_cell[0] * heatmap.mpp_x)
    # cell (0, 0)'s centre sits where it lies on the slide (pixel-centre convention)
    assert translation[1] == pytest.approx((heatmap.origin_level0[0] + heatmap.tile0[0] / 2 - 0.5) * heatmap.mpp_x)
    values = np.asarray(image.data[0])
    np.testing.assert_array_equal(values, heatmap.values.astype(np.float32))


def test_process_exports_every_format_beside_the_store_lists_them_and_resumes(scored_setting, tmp_path, capsys):
    folder, out = tmp_path / "slides", tmp_path / "out"
    folder.mkdir()
    for key in ("normal", "tumor"):
        os.symlink(scored_setting[key].path, folder / scored_setting[key].path.name)
    argv = ["process", str(folder), "--out", str(out), "--model", str(scored_setting["model"]), "--workers", "2",
            "--export", "geojson,ngff", "--export-h5"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    html = (out / "report.html").read_text()
    for row in report["slides"]:
        sid = row["slide_id"]
        assert row["exports"] == {"geojson": str(out / "geojson" / f"{sid}.geojson"),
                                  "ngff": str(out / "ngff" / f"{sid}.ome.zarr"), "h5": str(out / "h5" / f"{sid}.h5")}
        assert f"href='geojson/{sid}.geojson'" in html and f"href='ngff/{sid}.ome.zarr'" in html
    scores = np.concatenate([load_scores(SlideStore.open(out / f"{k}.zarr"), report["slides"][0]["model_id"])
                             for k in ("normal_102", "tumor_103")])
    threshold = float(np.percentile(scores, 99))                # the default: the top of the colour scale
    for key in ("normal", "tumor"):
        sid = scored_setting[key].path.stem
        store = SlideStore.open(out / f"{sid}.zarr")
        model_id = report["slides"][0]["model_id"]
        heatmap = load_heatmap(store, model_id)
        if np.nanmax(heatmap.values) >= threshold:
            collection = _check_geojson(out / "geojson" / f"{sid}.geojson", heatmap, threshold,
                                        scored_setting[key].level_dimensions[0])
            assert collection["wsi_ad_export"]["threshold"] == pytest.approx(threshold)
        _check_ngff(out / "ngff" / f"{sid}.ome.zarr", heatmap)
        with h5py.File(out / "h5" / f"{sid}.h5", "r") as h5:             # CLAM's reading
            np.testing.assert_array_equal(h5["coords"][:], store.root["tiles/coords"][:])
            np.testing.assert_array_equal(h5["scores"][:], load_scores(store, model_id))
            assert h5["scores"].attrs["model_id"] == model_id
    assert not [p for p in out.rglob("*.tmp")]                        # atomic: no temporaries left
    capsys.readouterr()

    # a re-run changes nothing and says so
    before = _mtimes(out / "geojson") | _mtimes(out / "ngff") | _mtimes(out / "h5")
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " export " in line]
    assert len(lines) == 2 and all("geojson reused, ngff reused, h5 reused" in line for line in lines)
    assert _mtimes(out / "geojson") | _mtimes(out / "ngff") | _mtimes(out / "h5") == before

    # a new threshold rewrites the GeoJSON only
    lowest = float(np.percentile(scores, 50))
    assert main([*argv, "--geojson-threshold", str(lowest)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " export " in line]
    assert all("geojson written, ngff reused, h5 reused" in line for line in lines)
    tumor_store = SlideStore.open(out / "tumor_103.zarr")
    _check_geojson(out / "geojson" / "tumor_103.geojson", load_heatmap(tumor_store, report["slides"][0]["model_id"]),
                   lowest, scored_setting["tumor"].level_dimensions[0])


def test_score_exports_beside_the_stores(scored_setting, tmp_path, capsys):
    stores = tmp_path / "stores"
    shutil.copytree(scored_setting["stores_dir"], stores)
    assert main(["score", str(stores), "--model", str(scored_setting["model"]), "--no-overlays",
                 "--export", "ngff,h5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert not (stores / "overlays").exists()
    for sid in ("normal_102", "tumor_103"):
        store = SlideStore.open(stores / f"{sid}.zarr")
        model_id = next(name.split("/")[1] for name in store.stages if name.startswith("heatmap/"))
        _check_ngff(stores / "ngff" / f"{sid}.ome.zarr", load_heatmap(store, model_id))
        with h5py.File(stores / "h5" / f"{sid}.h5", "r") as h5:
            np.testing.assert_array_equal(h5["scores"][:], load_scores(store, model_id))
        assert f"ngff {stores / 'ngff' / f'{sid}.ome.zarr'}" in out
    assert main(["score", str(stores), "--model", str(scored_setting["model"]), "--no-overlays",
                 "--export", "ngff,h5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("ngff reused, h5 reused") == 2 and out.count("(reused)") == 4


@pytest.mark.parametrize(("args", "message"), [
    (["--export", "geojson"], "--export geojson is made from the heatmaps: add --model"),
    (["--export", "h5,pdf"], "unknown export format 'pdf'; choose from geojson, ngff, h5"),
    (["--export-h5", "--geojson-threshold", "1"], "--geojson-threshold applies to --export geojson only"),
])
def test_export_arguments_that_cannot_work_are_refused_before_any_work(args, message, scored_setting, tmp_path,
                                                                       capsys):
    assert main(["process", str(scored_setting["normal"].path), "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
