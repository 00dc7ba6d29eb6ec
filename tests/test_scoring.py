"""The scoring stage on real slide stores with a real (small) trained model: scores per tile into
``scores/<model_id>``, reuse, chunk-by-chunk resume after ``kill -9``, pixel maps, folders of image
tiles, and the ``wsi-ad score`` command line."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from pipelines.score import add_score_arguments, run_score
from wsi_ad.detectors.scorer import load_scorer, score_store
from wsi_ad.errors import WsiAdError
from wsi_ad.scoring import (
    load_pixel_maps,
    load_scores,
    run_score_stage,
    score_image_folder,
    score_stage_name,
    write_scores_csv,
)
from wsi_ad.store import SlideStore, StoreError

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scorer(scored_setting):
    return load_scorer(scored_setting["model"], device="cpu")


def _copy(store: Path, tmp_path: Path) -> SlideStore:
    target = tmp_path / store.name
    shutil.copytree(store, target)
    return SlideStore.open(target, mode="r+")


def test_scores_every_tile_into_the_store_and_reuses_them(scored_setting, scorer, tmp_path):
    store = _copy(scored_setting["tumor_store"], tmp_path)
    n = store.stages["tiles"]["n_tiles"]
    calls = []
    scores, computed = run_score_stage(store, scorer, batch_size=64, progress=lambda d, t: calls.append((d, t)))
    assert computed and scores.shape == (n,) and scores.dtype == np.float32 and np.isfinite(scores).all()
    # The same numbers, in the same (tiles/coords) order, as scoring the tiles directly.
    np.testing.assert_allclose(scores, score_store(scored_setting["tumor_store"], scorer, batch_size=64), rtol=1e-6)
    assert calls[0] == (0, n) and calls[-1] == (n, n)

    stage = score_stage_name(scorer.model_id)
    marker = SlideStore.open(store.path).stages[stage]
    assert marker["n_tiles"] == n and marker["device"] == "cpu" and marker["tiles_per_s"] > 0
    assert marker["seconds"] > 0 and marker["dtype"] == "float32" and marker["resumed_tiles"] == 0
    group = zarr.open_group(store.path / stage, mode="r")
    assert group["scores"].dtype == np.float32 and group["scores"].shape == (n,)
    attrs = dict(group.attrs)
    assert attrs["model_id"] == scorer.model_id and attrs["magnification"] == "10x"
    assert attrs["checkpoint"] == str(Path(scored_setting["model"]).resolve())
    assert attrs["units"] == scorer.units == "relative perceptual L1 (unitless, higher = more anomalous)"
    np.testing.assert_array_equal(load_scores(SlideStore.open(store.path), scorer.model_id), scores)

    # Same model, same tiles: reused without scoring anything.
    again, computed = run_score_stage(store, scorer, batch_size=64, progress=lambda d, t: calls.append("again"))
    assert not computed and "again" not in calls
    np.testing.assert_array_equal(again, scores)

    # Re-tiling (another tiles hash) invalidates the scores.
    stages = store.stages
    stages["tiles"] = {**stages["tiles"], "config_hash": "retiled"}
    store.root.attrs["stages"] = stages
    rescored, computed = run_score_stage(store, scorer, batch_size=64)
    assert computed
    np.testing.assert_array_equal(rescored, scores)


def test_unscored_store_has_no_scores(scored_setting, scorer):
    with pytest.raises(StoreError, match=f"scores/{scorer.model_id}"):
        load_scores(SlideStore.open(scored_setting["normal_store"]), scorer.model_id)


_KILLED_RUN = """
import sys, time
from wsi_ad.detectors.scorer import load_scorer
from wsi_ad.scoring import run_score_stage
from wsi_ad.store import SlideStore
scorer = load_scorer(sys.argv[1], device="cpu")
store = SlideStore.open(sys.argv[2], mode="r+")
# A slow progress consumer (a real one: it sleeps) so that the test can kill the run part-way.
run_score_stage(store, scorer, batch_size=16, chunk_tiles=32, progress=lambda done, total: time.sleep(0.2))
print("finished")
"""


def _done_flags(group_path: Path) -> np.ndarray | None:
    try:
        return np.asarray(zarr.open_array(group_path / "done", mode="r")[:])
    except Exception:  # noqa: BLE001 - not created yet
        return None


def test_killed_run_resumes_from_its_first_unfinished_chunk(scored_setting, scorer, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reference_store = _copy(scored_setting["tumor_store"], tmp_path / "a")
    reference, _ = run_score_stage(reference_store, scorer, batch_size=16, chunk_tiles=32)

    store = _copy(scored_setting["tumor_store"], tmp_path / "b")
    n = store.stages["tiles"]["n_tiles"]
    n_chunks = -(-n // 32)
    assert n_chunks >= 4
    group_path = store.path / score_stage_name(scorer.model_id)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(scored_setting["model"]), str(store.path)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            flags = _done_flags(group_path)
            if flags is not None and flags.any():
                break
            assert proc.poll() is None, f"the run ended before it was killed: {proc.communicate()}"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    flags = _done_flags(group_path)
    finished = int(flags.sum())
    assert 1 <= finished < n_chunks and flags[:finished].all()      # chunks finish in order
    reopened = SlideStore.open(store.path, mode="r+")
    assert score_stage_name(scorer.model_id) not in reopened.stages  # not complete
    with pytest.raises(StoreError):
        load_scores(reopened, scorer.model_id)

    calls = []
    scores, computed = run_score_stage(reopened, scorer, batch_size=16, chunk_tiles=32,
                                       progress=lambda done, total: calls.append(done))
    assert computed
    assert calls[0] == finished * 32                                # the finished chunks are kept ...
    assert calls[-1] == n and len(calls) - 1 == -(-(n - finished * 32) // 16)   # ... and not scored again
    assert reopened.stages[score_stage_name(scorer.model_id)]["resumed_tiles"] == finished * 32
    np.testing.assert_array_equal(scores, reference)                 # identical to the uninterrupted run
    assert not list(group_path.rglob("*.partial"))


def test_pixel_maps_average_to_the_tile_score(scored_setting, scorer, tmp_path):
    store = _copy(scored_setting["normal_store"], tmp_path)
    scores, computed = run_score_stage(store, scorer, batch_size=64, chunk_tiles=64, pixel_maps=True)
    assert computed
    maps = load_pixel_maps(store, scorer.model_id)
    h, w = scorer.map_shape
    assert maps.shape == (len(scores), h, w) and maps.dtype == np.float16 and (maps >= 0).all()
    np.testing.assert_allclose(maps.astype(np.float32).mean(axis=(1, 2)), scores, rtol=2e-3)
    attrs = dict(zarr.open_array(store.path / score_stage_name(scorer.model_id) / "pixel_maps", mode="r").attrs)
    tile_um = 64 * zarr.open_array(store.path / "tiles" / "10x", mode="r").attrs["mpp"]
    assert attrs["cell_um"] == pytest.approx(tile_um / w) and attrs["cells"] == [h, w]
    assert attrs["cell_level0_px"] == pytest.approx(attrs["cell_um"] / store.root.attrs["mpp_x"])

    # The Scorer gives both at once; its scores are those of plain scoring.
    tiles = np.asarray(zarr.open_array(store.path / "tiles" / "10x", mode="r")[:20])
    plain = scorer.score(tiles, batch_size=8)
    both, tile_maps = scorer.score(tiles, batch_size=8, pixel_maps=True)
    np.testing.assert_array_equal(both, plain)
    np.testing.assert_allclose(tile_maps.mean(axis=(1, 2)), plain, rtol=1e-5)

    # Maps asked for later, after a stage without them: recomputed with them.
    other = _copy(scored_setting["tumor_store"], tmp_path / "x")
    run_score_stage(other, scorer, batch_size=64)
    with pytest.raises(StoreError, match="no pixel maps"):
        load_pixel_maps(other, scorer.model_id)
    _, computed = run_score_stage(other, scorer, batch_size=64, pixel_maps=True)
    assert computed and load_pixel_maps(other, scorer.model_id).shape[0] == other.stages["tiles"]["n_tiles"]


def test_folders_of_png_tiles_score_like_the_store(scored_setting, scorer, tmp_path):
    tiles = np.asarray(zarr.open_array(scored_setting["tumor_store"] / "tiles" / "10x", mode="r")[:12])
    folder = tmp_path / "tiles" / "good"
    folder.mkdir(parents=True)
    for i, tile in enumerate(tiles):
        Image.fromarray(tile).save(folder / f"tile_{i:03d}.png")
    rows = score_image_folder(tmp_path / "tiles", scorer, batch_size=5)
    assert [p.name for p, _ in rows] == [f"tile_{i:03d}.png" for i in range(12)]
    np.testing.assert_allclose([s for _, s in rows], scorer.score(tiles, batch_size=5), rtol=1e-6)

    out = write_scores_csv(tmp_path / "scores.csv", rows)
    with open(out, newline="") as f:
        read = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in read] == [p.name for p, _ in rows]
    np.testing.assert_allclose([float(r["score"]) for r in read], [s for _, s in rows], rtol=1e-7)

    (tmp_path / "empty").mkdir()
    with pytest.raises(WsiAdError, match="no PNG/JPEG tiles"):
        score_image_folder(tmp_path / "empty", scorer)
    with pytest.raises(WsiAdError, match="no such file"):
        score_image_folder(tmp_path / "missing", scorer)


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wsi-ad score")
    add_score_arguments(parser)
    return parser.parse_args(argv)


def test_cli_scores_a_folder_of_stores_and_reports_a_bad_one(scored_setting, tmp_path, capsys):
    """Issue 20: `wsi-ad score` runs the Dask graph of `wsi-ad process --model` on the stores (local cluster): the
    same progress lines, report and failure handling; a folder that is no store fails alone."""
    stores = tmp_path / "stores"
    shutil.copytree(scored_setting["stores_dir"], stores)
    model = str(scored_setting["model"])
    assert run_score(_cli([str(stores), "--model", model, "--device", "cpu", "--batch-size", "128",
                           "--workers", "1"])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"2 stores → {stores} (local cluster, 1 workers)")
    for sid in ("normal_102", "tumor_103"):
        assert any(f"] {sid}" in line and " open " in line and " tiles" in line for line in lines)
        assert any(f"] {sid}" in line and " score " in line and "tiles/s on cpu" in line for line in lines)
    assert any(line.startswith("cohort colour scale") for line in lines)
    slide_scores = {line.split()[0]: float(line.split()[5]) for line in lines if line.startswith(("normal_102  ",
                                                                                                  "tumor_103  "))}
    assert slide_scores["tumor_103"] > slide_scores["normal_102"]
    assert (stores / "overlays" / "tumor_103.png").exists() and (stores / "overlays" / "normal_102.png").exists()
    report = json.loads((stores / "report.json").read_text())
    assert [row["status"] for row in report["slides"]] == ["ok", "ok"]
    assert {row["slide_id"]: row["slide_score"] for row in report["slides"]} == pytest.approx(slide_scores, rel=1e-3)

    (stores / "broken.zarr").mkdir()                                # not a store: fails alone
    assert run_score(_cli([str(stores), "--model", model, "--device", "cpu", "--no-overlays", "--workers", "1"])) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("] broken" in line and "FAILED at open" in line and "not a slide store" in line for line in lines)
    assert sum(" score " in line and "reused" in line for line in lines) == 2
    assert [f["slide_id"] for f in json.loads((stores / "failures.json").read_text())] == ["broken"]
    with pytest.raises(WsiAdError, match="apply to slide stores"):
        run_score(_cli([str(stores), "--model", model, "--tiles", "--csv", str(tmp_path / "x.csv"), "--workers", "1"]))

    # --tiles: folders of image tiles into a CSV.
    folder = tmp_path / "pngs"
    folder.mkdir()
    tiles = np.asarray(zarr.open_array(stores / "normal_102.zarr" / "tiles" / "10x", mode="r")[:3])
    for i, tile in enumerate(tiles):
        Image.fromarray(tile).save(folder / f"{i}.png")
    with pytest.raises(WsiAdError, match="--csv"):
        run_score(_cli([str(folder), "--model", model, "--tiles", "--device", "cpu"]))
    assert run_score(_cli([str(folder), "--model", model, "--tiles", "--csv", str(tmp_path / "t.csv"),
                           "--device", "cpu"])) == 0
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 4
