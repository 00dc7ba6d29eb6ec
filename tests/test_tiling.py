"""Tile grid over the tissue and multi-magnification extraction into the slide store."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath

from pipelines.process import process_paths
from wsi_ad.export import export_clam_h5
from wsi_ad.preprocess import PreprocessConfig, run_tiles_stage, run_tissue_stage
from wsi_ad.slide import open_slide
from wsi_ad.store import SlideStore
from wsi_ad.synth import synthesize_slide
from wsi_ad.tiling import TilingParams, resolve_geometry

MULTI = PreprocessConfig(tiling=TilingParams(magnifications=("10x", "20x")))


@pytest.fixture(scope="module")
def tumor_slide(tmp_path_factory):
    """An 8192 px (2 mm) synthetic Camelyon-like slide at 0.243 µm/px with one 0.55 mm lesion."""
    path = tmp_path_factory.mktemp("tiling") / "tumor_901.tif"
    return synthesize_slide(path, width_px=8192, seed=906, lesion_sizes_mm=[0.55])


@pytest.fixture(scope="module")
def tumor_store(tumor_slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiling_out")
    with open_slide(tumor_slide.path) as slide:
        store = SlideStore.for_slide(out, slide)
        mask, _ = run_tissue_stage(slide, store, MULTI, qc_path=out / "qc.png")
        run_tiles_stage(slide, store, mask, MULTI)
    return store


def test_camelyon_10x_is_the_native_4x_level_and_64px_tiles_cover_62um(tumor_slide):
    with open_slide(tumor_slide.path) as slide:
        geometry = resolve_geometry(slide, TilingParams())
        assert geometry.mpp == pytest.approx((0.972,))
        assert geometry.tile_px == (64,) and geometry.tile0 == pytest.approx((256.0, 256.0))
        assert geometry.tile0[0] * slide.mpp_x == pytest.approx(62.2, abs=0.1)      # µm
        three = resolve_geometry(slide, TilingParams(magnifications=("10x", "20x", "40x")))
        assert three.magnifications == ("40x", "20x", "10x")
        assert three.tile_px == (256, 128, 64) and three.factors == (1, 2, 4)
        assert three.tile0 == geometry.tile0
        assert resolve_geometry(slide, TilingParams(tile_um=124.4)).tile_px == (128,)
        with pytest.raises(ValueError, match="integer downsampling"):
            resolve_geometry(slide, TilingParams(magnifications=("10x", "15x")))


def test_store_layout(tumor_store):
    tiles = tumor_store.root["tiles"]
    n = tiles["coords"].shape[0]
    assert n > 100
    assert tiles["coords"].dtype == np.int64 and tiles["coords"].shape == (n, 2)
    assert tiles["grid"].dtype == np.int32 and tiles["grid"].shape == (n, 2)
    assert tiles["tissue_fraction"].shape == (n,) and tiles["tissue_fraction"][:].min() >= 0.5
    assert tiles["10x"].shape == (n, 64, 64, 3) and tiles["10x"].dtype == np.uint8
    assert tiles["20x"].shape == (n, 128, 128, 3)
    assert tiles["10x"].chunks[0] == 64 and tiles["20x"].chunks[0] == 16      # ~768 KiB chunks
    assert tiles["10x"].attrs["mpp"] == pytest.approx(0.972)
    assert (tumor_store.path / "tiles" / "10x" / "c.0.0.0.0").is_file()     # chunk files side by side
    # Coordinates are the grid times the level-0 stride.
    np.testing.assert_array_equal(tiles["coords"][:], tiles["grid"][:][:, ::-1] * 256)
    assert tumor_store.is_complete("tissue") and tumor_store.is_complete("tiles")


def test_10x_and_20x_show_the_same_place(tumor_store, tumor_slide):
    tiles = tumor_store.root["tiles"]
    x10, x20 = tiles["10x"][:50].astype(float), tiles["20x"][:50].astype(float)
    down = x20.reshape(50, 64, 2, 64, 2, 3).mean(axis=(2, 4))
    assert np.abs(x10 - down).max() <= 1.0
    # And each is what the slide shows at those coordinates.
    with open_slide(tumor_slide.path) as slide:
        for i in (0, 17, 49):
            x, y = tiles["coords"][i]
            np.testing.assert_array_equal(tiles["20x"][i], slide.read_region((x, y), (128, 128), 0.5))


def test_every_tile_inside_a_tumour_polygon_is_found_by_its_coordinates(tumor_store, tumor_slide):
    tiles = tumor_store.root["tiles"]
    coords = {tuple(c) for c in tiles["coords"][:].tolist()}
    polygon = PolygonPath(tumor_slide.annotations[0].vertices)
    xs, ys = np.meshgrid(np.arange(0, 8192 - 255, 256), np.arange(0, 8192 - 255, 256))
    corners = [(0, 0), (255, 0), (0, 255), (255, 255)]
    inside = np.ones(xs.size, bool)
    for dx, dy in corners:
        inside &= polygon.contains_points(np.stack([xs.ravel() + dx, ys.ravel() + dy], 1))
    expected = set(zip(xs.ravel()[inside].tolist(), ys.ravel()[inside].tolist(), strict=True))
    assert len(expected) > 20
    assert expected <= coords
    # Tumour tiles look different: larger, paler nuclei make them less dark than lymphocyte-dense tissue.
    is_tumor = np.array([tuple(c) in expected for c in tiles["coords"][:].tolist()])
    pixels = tiles["10x"][:].astype(float)
    assert pixels[is_tumor].mean() != pytest.approx(pixels[~is_tumor].mean(), abs=2.0)


def test_no_tile_on_white_glass(shared_slides, tmp_path):
    results = process_paths([shared_slides / "cmu-1-small-region.svs"], tmp_path, PreprocessConfig(),
                            echo=lambda *a: None)
    assert results[0]["status"] == "ok" and results[0]["n_tiles"] > 50
    tiles = SlideStore.open(tmp_path / "cmu-1-small-region.zarr").root["tiles/10x"][:]
    white = (tiles.min(axis=-1) > 215).mean(axis=(1, 2))       # fraction of white pixels per tile
    assert white.max() < 0.75 and np.median(white) < 0.2


def test_coordinate_round_trip_tile_to_level0_box_to_thumbnail(tumor_store, tumor_slide):
    tiles = tumor_store.root["tiles"]
    mpp = 3.888                                           # thumbnail at 1/16 of level 0: 16 px per tile
    with open_slide(tumor_slide.path) as slide:
        thumb = slide.thumbnail(mpp)
        per_px = mpp / slide.mpp_x
    for i in (3, 40, 90):
        x, y = tiles["coords"][i]
        c0, r0 = int(round(x / per_px)), int(round(y / per_px))
        side = int(round(256 / per_px))
        from_thumb = thumb[r0:r0 + side, c0:c0 + side].astype(float)
        from_tile = tiles["10x"][i].astype(float).reshape(side, 4, side, 4, 3).mean(axis=(1, 3))
        assert np.abs(from_thumb - from_tile).mean() < 6.0


def test_rerun_skips_and_changed_settings_recompute(tumor_store, tumor_slide):
    with open_slide(tumor_slide.path) as slide:
        store = SlideStore.for_slide(tumor_store.path.parent, slide)
        from wsi_ad.preprocess import load_tissue_mask
        mask = load_tissue_mask(store)
        n, ran = run_tiles_stage(slide, store, mask, MULTI)
        assert not ran and n == tumor_store.root["tiles/coords"].shape[0]
        stride = PreprocessConfig(tiling=TilingParams(magnifications=("10x",), min_tissue_fraction=0.9))
        n2, ran2 = run_tiles_stage(slide, store, mask, stride)
        assert ran2 and 0 < n2 < n
        assert "20x" not in store.root["tiles"]
        n3, ran3 = run_tiles_stage(slide, store, mask, MULTI)     # back: recomputed, same tiles
        assert ran3 and n3 == n


@pytest.mark.parametrize("compression, max_error", [("zstd", 0.0), ("jpeg", 8.0)])
def test_compression_options(tumor_slide, tmp_path, compression, max_error):
    config = PreprocessConfig(compression=compression)
    plain = process_paths([tumor_slide.path], tmp_path / "plain", PreprocessConfig(), echo=lambda *a: None)
    packed = process_paths([tumor_slide.path], tmp_path / "packed", config, echo=lambda *a: None)
    assert plain[0]["n_tiles"] == packed[0]["n_tiles"]
    a = SlideStore.open(tmp_path / "plain" / "tumor_901.zarr").root["tiles/10x"][:].astype(float)
    b = SlideStore.open(tmp_path / "packed" / "tumor_901.zarr").root["tiles/10x"][:].astype(float)
    assert np.abs(a - b).mean() <= max_error


def test_clam_h5_export(tumor_store, tumor_slide, tmp_path):
    with open_slide(tumor_slide.path) as slide:
        path = export_clam_h5(tumor_store, slide, tmp_path / "tumor_901.h5")
    with h5py.File(path, "r") as h5:
        np.testing.assert_array_equal(h5["coords"][:], tumor_store.root["tiles/coords"][:])
        assert h5["coords"].attrs["patch_level"] == 2          # the 0.972 µm/px level, as in Camelyon16
        assert h5["coords"].attrs["patch_size"] == 64
        assert h5["coords"].attrs["patch_size_level0"] == 256


def test_process_command_isolates_bad_slides(shared_slides, tumor_slide, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "process", str(tumor_slide.path),
         str(shared_slides / "broken.svs"), str(shared_slides / "unreadable.svs"),
         str(shared_slides / "fluorescence-tritc.ndpi"), "--out", str(tmp_path), "--export-h5"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    # progress lines: "[k/n slides] <slide_id> <stage> ..."
    lines = {tuple(line.split()[2:4]): line for line in result.stdout.splitlines() if "slides]" in line}
    assert "tiles" in lines["tumor_901", "preprocess"] and "h5 written" in lines["tumor_901", "export"]
    assert "FAILED" in lines["broken", "preprocess"] and "FAILED" in lines["unreadable", "preprocess"]
    assert "fluorescence" in lines["fluorescence-tritc", "preprocess"]   # no H&E tissue: a warning, not a crash
    assert (tmp_path / "tumor_901.zarr").is_dir() and (tmp_path / "h5" / "tumor_901.h5").exists()
    assert (tmp_path / "qc" / "tumor_901.tissue.png").exists()
    assert "2 of 4 slides done, 2 failed" in result.stdout


def test_a_killed_process_run_resumes_to_the_same_store(tumor_slide, tmp_path):
    """kill -9 the command while it tiles; the store is never half-valid and a re-run completes it."""
    import json
    import signal
    import time

    command = [sys.executable, "-m", "pipelines.cli", "process", str(tumor_slide.path),
               "--magnifications", "10x,20x,40x"]
    reference = tmp_path / "reference"
    subprocess.run([*command, "--out", str(reference)], check=True, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    root_meta = out / "tumor_901.zarr" / "zarr.json"
    proc = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if list((out / "tumor_901.zarr").glob(".tiles.*.tmp/40x/c.*")):
            break                                   # tiles stage under way: chunks being written
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)

    stages = json.loads(root_meta.read_text())["attributes"]["stages"]
    store = SlideStore.open(out / "tumor_901.zarr")
    if "tiles" in stages:                           # finished before the kill: then it is complete
        assert store.root["tiles/40x"].shape[0] == stages["tiles"]["n_tiles"]
    else:
        assert not (out / "tumor_901.zarr" / "tiles").exists() or not store.is_complete("tiles")

    rerun = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert not list((out / "tumor_901.zarr").glob(".*.tmp"))
    done = SlideStore.open(out / "tumor_901.zarr").root["tiles"]
    expected = SlideStore.open(reference / "tumor_901.zarr").root["tiles"]
    for name in ("coords", "grid", "tissue_fraction", "10x", "20x", "40x"):
        np.testing.assert_array_equal(done[name][:], expected[name][:])


def test_stain_normalization_runs_once_per_region_before_downsampling(tumor_slide, tmp_path):
    results = process_paths([tumor_slide.path], tmp_path, MULTI, echo=lambda *a: None)
    assert results[0]["status"] == "ok" and results[0]["stain_method"] in ("vahadane", "macenko")
    store = SlideStore.open(tmp_path / "tumor_901.zarr")
    stain = store.require("stain").attrs
    assert np.array(stain["fit"]["stain_matrix"]).shape == (2, 3)
    assert stain["target"] == MULTI.stain_target.to_dict()
    tiles = store.root["tiles"]
    assert tiles.attrs["stain_normalized"] is True
    x10, x20 = tiles["10x"][:40].astype(float), tiles["20x"][:40].astype(float)
    assert np.abs(x10 - x20.reshape(40, 64, 2, 64, 2, 3).mean(axis=(2, 4))).max() <= 1.0
    with open_slide(tumor_slide.path) as slide:
        x, y = tiles["coords"][5]
        raw = slide.read_region((x, y), (128, 128), 0.5).astype(float)
    assert np.abs(raw - x20[5]).mean() > 2.0                      # normalization changed the colours
    unnormalized = PreprocessConfig(tiling=MULTI.tiling, stain=None)
    assert unnormalized.tiles_hash() != MULTI.tiles_hash()


def test_process_stain_options(tumor_slide, shared_slides, tmp_path):
    from pipelines.cli import main
    from wsi_ad.stain import fit_target

    assert main(["process", str(tumor_slide.path), "--out", str(tmp_path / "raw"), "--no-stain-norm"]) == 0
    raw = SlideStore.open(tmp_path / "raw" / "tumor_901.zarr")
    assert raw.root["tiles"].attrs["stain_normalized"] is False and not raw.is_complete("stain")

    target_spec = f"{shared_slides / 'cmu-1-small-region.svs'}:0,0,2000,2000"
    assert main(["process", str(tumor_slide.path), "--out", str(tmp_path / "own"), "--stain-target", target_spec]) == 0
    own = SlideStore.open(tmp_path / "own" / "tumor_901.zarr")
    expected = fit_target(shared_slides / "cmu-1-small-region.svs", region=(0, 0, 2000, 2000)).to_dict()
    assert own.require("stain").attrs["target"] == expected
    assert main(["process", str(tumor_slide.path), "--out", str(tmp_path / "x"), "--stain-target", "/no/such.png"]) == 2
