"""Training end to end on synthetic slide stores: loss goes down, checkpoints resume, the CLI entry works,
scores come out per tile."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.path import Path as PolygonPath
from PIL import Image

from pipelines.process import process_paths
from pipelines.train import add_train_arguments, config_from_args, run_train
from wsi_ad.config import Config
from wsi_ad.detectors.checkpoint import load_checkpoint
from wsi_ad.detectors.loop import train
from wsi_ad.detectors.scorer import load_scorer, score_store
from wsi_ad.preprocess import PreprocessConfig
from wsi_ad.store import SlideStore
from wsi_ad.synth import synthesize_slide
from wsi_ad.tile_pool import DataError, TilePool, discover_sources

REPO_ROOT = Path(__file__).resolve().parents[1]

#: A tiny 32 px model (crops of the 64 px stores' tiles): seconds per run on 2 CPU cores.
TINY = {
    "detector": "dpa",
    "dpa": {"architecture": "shallow", "image_size": 32, "latent_size": 8, "latent_channels": 4, "channels": [8, 8, 8],
            "backbone": "efficientnet_lite0", "feature_stats": "train", "stats_tiles": 128,
            "iterations": {"stab16": 10, "trns32": 6, "stab32": 6}},
    "data": {"buffer_tiles": 4096},
    "train": {"batch_size": 16, "checkpoint_every": 5, "log_every": 5},
}


def _tiny(dpa=None, **train) -> Config:
    data = json.loads(json.dumps(TINY))
    data["dpa"].update(dpa or {})
    data["train"].update(train)
    return Config.from_dict(data)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """A normal and a tumour synthetic slide (8192 px, 0.243 µm/px; one 0.8 mm lesion) tiled into stores at 10x, 64 px."""
    root = tmp_path_factory.mktemp("train_data")
    normal = synthesize_slide(root / "slides" / "normal_001.tif", width_px=8192, seed=11, tumor=False)
    tumor = synthesize_slide(root / "slides" / "tumor_001.tif", width_px=8192, seed=12, tumor=True,
                             lesion_sizes_mm=[0.8])
    process_paths([normal.path], root / "normal", PreprocessConfig(), echo=lambda *a: None)
    process_paths([tumor.path], root / "tumor", PreprocessConfig(), echo=lambda *a: None)
    return {"normal": root / "normal", "tumor_store": root / "tumor" / "tumor_001.zarr", "tumor": tumor}


def test_a_few_dozen_iterations_lower_the_loss(slides, tmp_path):
    config = _tiny({"progressive": False, "flat_iterations": 24}, log_every=6)
    result = train([slides["normal"]], tmp_path / "m.pt", config, progress=False, echo=lambda *a: None)
    history = load_checkpoint(result.checkpoint)["history"]
    assert history["iteration"] == [6, 12, 18, 24] and result.complete
    assert history["loss"][-1] < 0.9 * history["loss"][0]
    assert (tmp_path / "m.loss.csv").read_text().startswith("iteration,phase,tiles_per_s,loss,alpha")
    assert (tmp_path / "m.loss.png").stat().st_size > 1000


@pytest.mark.parametrize("architecture", ["residual18", "shallow"])
def test_interrupted_run_resumes_at_its_iteration_and_matches_an_uninterrupted_one(slides, tmp_path, architecture):
    # 12 iterations in three phases, stopped inside the fade-in phase (Adam state saved mid-phase)
    phases = {"stab16": 4, "trns32": 4, "stab32": 4}
    config = _tiny({"iterations": phases, "architecture": architecture}, batch_size=8)
    full = train([slides["normal"]], tmp_path / "full.pt", config, progress=False, echo=lambda *a: None)
    part = train([slides["normal"]], tmp_path / "part.pt", config, progress=False, echo=lambda *a: None, stop_after=6)
    assert not part.complete and load_checkpoint(tmp_path / "part.pt")["iteration"] == 6
    assert load_checkpoint(tmp_path / "part.pt")["training_state"]["optimizer"] is not None
    resumed = train([slides["normal"]], tmp_path / "part.pt", config, progress=False, echo=lambda *a: None)
    assert resumed.resumed_from == 6 and resumed.iterations == 12 and resumed.complete
    a, b = load_checkpoint(tmp_path / "full.pt"), load_checkpoint(tmp_path / "part.pt")
    assert a["detector"] == b["detector"] == "dpa"
    for key in a["state"]["autoencoder"]:
        torch.testing.assert_close(a["state"]["autoencoder"][key], b["state"]["autoencoder"][key], rtol=0, atol=0)
    assert a["history"]["iteration"] == b["history"]["iteration"]
    assert full.model_id == resumed.model_id
    # a complete checkpoint is not retrained; a different configuration is refused
    again = train([slides["normal"]], tmp_path / "part.pt", config, progress=False, echo=lambda *a: None)
    assert again.resumed_from == 12
    with pytest.raises(Exception, match="different configuration.*train.batch_size"):
        train([slides["normal"]], tmp_path / "part.pt", _tiny({"iterations": phases, "architecture": architecture},
                                                              batch_size=4), progress=False, echo=lambda *a: None)


def test_killed_cli_run_continues_from_its_last_checkpoint(slides, tmp_path):
    out = tmp_path / "k.pt"
    cfg = tmp_path / "tiny.yaml"
    data = json.loads(json.dumps(TINY))
    data["dpa"].update(iterations={"stab16": 400, "trns32": 6, "stab32": 6})
    data["train"].update(checkpoint_every=5)
    cfg.write_text(json.dumps(data))  # JSON is YAML
    cmd = [sys.executable, "-m", "pipelines.cli", "train", str(slides["normal"]), "--out", str(out), "--config", str(cfg),
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while time.time() < deadline and not out.exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert out.exists(), proc.stderr.read().decode()
    saved = load_checkpoint(out)["iteration"]
    assert 5 <= saved < 412 and saved % 5 == 0
    # re-run with fewer stab16 iterations is a different config: resume with the same file instead, stopping early
    config = Config.from_yaml(cfg)
    resumed = train([slides["normal"]], out, config, progress=False, echo=lambda *a: None, stop_after=saved + 5)
    assert resumed.resumed_from == saved and resumed.iterations == saved + 5


def test_train_arguments_and_run_train(slides, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args([str(slides["normal"]), "--out", str(tmp_path / "c.pt"), "--config",
                              str(REPO_ROOT / "configs" / "demo_cpu.yaml"), "--set", "dpa.flat_iterations=3",
                              "--batch-size", "4", "--no-progress"])
    config = config_from_args(args)
    assert not config.section.progressive and config.section.flat_iterations == 3 and config.train.batch_size == 4
    assert config.section.backbone == "efficientnet_lite0"
    assert run_train(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["complete"] and report["iterations"] == 3 and Path(report["loss_csv"]).exists()
    assert report["detector"] == "dpa" and report["model_id"].startswith("dpa-")
    # the paper setting (vgg19) with a weight file that is not there
    args = parser.parse_args([str(slides["normal"]), "--out", str(tmp_path / "v.pt"), "--detector", "dpa",
                              "--backbone-weights", str(tmp_path / "nope.pth")])
    with pytest.raises(Exception, match="vgg19 weights file not found"):
        run_train(args)
    for bad, match in ((["--set", "dpa.flat_iterations"], "SECTION.KEY=VALUE"), (["--set", "nope.x=1"], "no config section"),
                       (["--set", "dpa.colour=red"], "unknown key.*colour"), (["--detector", "nope"], "unknown detector"),
                       (["--detector", "other", "--config", str(REPO_ROOT / "configs" / "demo_cpu.yaml")],
                        "configures 'dpa'")):
        with pytest.raises(Exception, match=match):
            config_from_args(parser.parse_args([str(slides["normal"]), "--out", str(tmp_path / "x.pt"), *bad]))


def test_python_dash_c_entry_reports_bad_input_as_one_line(tmp_path):
    code = ("import argparse, sys; from pipelines.train import add_train_arguments, run_train; "
            "p = argparse.ArgumentParser(); add_train_arguments(p); "
            f"sys.exit(run_train(p.parse_args([{str(tmp_path)!r}, '--out', {str(tmp_path / 'x.pt')!r}])))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no slide stores" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", str(tmp_path), "--out", str(tmp_path / "x.pt")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no slide stores" in proc.stderr


def test_image_folder_tiles_are_cropped_and_resized(tmp_path):
    good = tmp_path / "train" / "good"
    good.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (100, 120, 3), dtype=np.uint8)).save(good / f"{i}.png")
    sources = discover_sources([tmp_path / "train"], "10x", 64)
    pool = TilePool(sources, buffer_tiles=64, seed=1)
    batch = pool.batch(0, 8)
    assert batch.shape == (8, 64, 64, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(pool.batch(3, 8), TilePool(sources, 64, seed=1).batch(3, 8))
    resized = discover_sources([good], "10x", 64, image_mpp=0.5)[0]  # 20x images shrink 2x, then enlarge to 64
    assert resized.read(0, 2, rng).shape == (2, 64, 64, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no slide stores"):
        discover_sources([tmp_path / "empty"], "10x", 64)


def test_scoring_api_shapes_batch_size_independence_and_size_checks(slides, tmp_path):
    """Scoring API on a tiny trained model: shapes, dtype, the same scores whatever the batch size, size checks.
    (Tumour separation is test_demo_model_scores_tumour_tiles_higher's.)"""
    config = _tiny()
    train([slides["normal"]], tmp_path / "s.pt", config, progress=False, echo=lambda *a: None)
    scorer = load_scorer(tmp_path / "s.pt", device="cpu")
    assert scorer.image_size == 32 and scorer.model_id.startswith("dpa-")
    tiles = SlideStore.open(slides["tumor_store"]).require("tiles")
    crops = np.asarray(tiles["10x"][:40, 16:48, 16:48])
    scores = scorer.score(crops, batch_size=16)
    assert scores.shape == (40,) and scores.dtype == np.float32 and np.isfinite(scores).all()
    np.testing.assert_allclose(scorer.score(crops[:7]), scores[:7], rtol=1e-5)  # batch-size independent
    with pytest.raises(ValueError, match="must be"):
        scorer.score(np.asarray(tiles["10x"][:2]))
    with pytest.raises(Exception, match="must be"):
        score_store(slides["tumor_store"], scorer)      # 64 px store tiles, 32 px model


def test_demo_model_scores_tumour_tiles_higher(slides, tmp_path):
    """The demo setting (configs/demo_cpu.yaml), trained on one normal slide, ranks the tumour tiles of
    another slide above its normal tiles: tile AUC > 0.9 (tiles whose 256 px level-0 footprint lies
    inside the lesion polygon vs tiles that do not touch it; partly-tumour border tiles are left out)."""
    from sklearn.metrics import roc_auc_score

    config = Config.from_yaml(REPO_ROOT / "configs" / "demo_cpu.yaml")
    config.train.checkpoint_every = 10_000
    t0 = time.perf_counter()
    train([slides["normal"]], tmp_path / "d.pt", config, progress=False, echo=lambda *a: None)
    seconds = time.perf_counter() - t0
    scorer = load_scorer(tmp_path / "d.pt", device="cpu")
    store = SlideStore.open(slides["tumor_store"])
    coords = np.asarray(store.require("tiles")["coords"])
    polygon = PolygonPath(slides["tumor"].annotations[0].vertices)
    corners = np.stack([polygon.contains_points(coords + [dx, dy]) for dx in (0, 255) for dy in (0, 255)])
    inside, outside = corners.all(axis=0), ~corners.any(axis=0)
    assert inside.sum() >= 20 and outside.sum() >= 100
    scores = score_store(store, scorer)
    keep = inside | outside
    auc = roc_auc_score(inside[keep], scores[keep])
    assert auc > 0.9, (auc, seconds)     # training time is benchmarks/bench_train.py's, not a test's


def test_hidden_files_and_folders_are_never_data(slides, tmp_path, capsys):
    """An anomalib folder with macOS AppleDouble companions (``._x.png``: not images) beside every tile and a
    ``.ipynb_checkpoints/`` folder: train, evaluate tiles, normalize-tiles and slide discovery skip them."""
    from pipelines.cli import main
    from wsi_ad.scoring import find_image_tiles
    from wsi_ad.slide import find_slides
    from wsi_ad.store import stores_in

    tiles = np.asarray(SlideStore.open(slides["tumor_store"]).require("tiles")["10x"][:12])   # real H&E renders
    for k, split in enumerate(("train/good", "test/good", "test/bad")):
        folder = tmp_path / "tiles" / split
        (folder / ".ipynb_checkpoints").mkdir(parents=True)
        for i in range(4):
            tile = tiles[4 * k + i].copy()
            if split == "test/bad":
                tile[..., 1] = 255
            Image.fromarray(tile).save(folder / f"n_{i:03d}.png")
            (folder / f"._n_{i:03d}.png").write_bytes(b"\0\5\26\7" + bytes(4092))       # AppleDouble header
        Image.fromarray(tile).save(folder / ".ipynb_checkpoints" / "n_000-checkpoint.png")
    root = tmp_path / "tiles"
    assert len(find_image_tiles(root / "train")) == 4
    assert len(discover_sources([root / "train" / "good"], "10x", 32)[0]) == 4
    (tmp_path / "slides" / ".hidden").mkdir(parents=True)
    (tmp_path / "slides" / "._a.svs").write_bytes(bytes(4096))
    (tmp_path / "slides" / ".hidden" / "b.svs").write_bytes(bytes(4096))
    assert find_slides([tmp_path / "slides"]) == []
    (tmp_path / "stores" / ".x.zarr").mkdir(parents=True)
    assert stores_in(tmp_path / "stores") == []
    model = Path(__file__).resolve().parent / "data" / "dpa_checkpoint_format1.pt"     # a 32 px model
    assert main(["evaluate", "tiles", str(root), "--model", str(model), "--out", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["splits"]["test"]["n_good"] == 4 and results["splits"]["test"]["n_anomalous"] == 4
    assert main(["normalize-tiles", str(root), str(tmp_path / "norm")]) == 0
    assert sorted(p.name for p in (tmp_path / "norm" / "train" / "good").iterdir()
                  if p.suffix == ".png") == [f"n_{i:03d}.png" for i in range(4)]
