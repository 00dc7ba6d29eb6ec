"""``wsi-ad tune``: weakly-supervised hyperparameter selection with K folds split by slide, on synthetic slides.

The tiny search trains 2 candidates x 3 folds of a 32 px model for a few iterations each (seconds per run on
2 CPU cores) on four synthetic slides: three normal, one tumour with its ASAP XML.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.cli import main
from pipelines.tune import add_tune_arguments, run_tune
from wsi_ad.config import Config, ConfigError
from wsi_ad.errors import WsiAdError
from wsi_ad.tuning import (
    Fold,
    FoldLeakError,
    SearchSpace,
    TuneError,
    anomaly_tiles,
    apply_params,
    check_disjoint,
    default_space,
    evaluate_fold,
    load_space,
    normal_sample,
    slide_folds,
    tune,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

#: A tiny 32 px model (centre/random crops of the 64 px store tiles), a few iterations: seconds per fold.
TINY_BASE = {
    "detector": "dpa",
    "dpa": {"architecture": "shallow", "image_size": 32, "latent_size": 8, "latent_channels": 4, "channels": [8, 8, 8],
            "backbone": "efficientnet_lite0", "feature_stats": "train", "stats_tiles": 32, "progressive": False,
            "flat_iterations": 6, "lr": 0.003},
    "data": {"buffer_tiles": 4096},
    "train": {"batch_size": 8, "checkpoint_every": 100, "log_every": 3, "device": "cpu"},
}
#: Two real candidates (block 2 and block 7 features) and two at 20x, which the stores lack (skipped).
TINY_SPACE = {"mode": "grid", "max_candidates": 4, "space": {"layer": ["block2", "block7"], "magnification": ["10x", "20x"]}}
CAPS = {"max_anomaly_tiles": 16, "max_normal_tiles": 48}


@contextlib.contextmanager
def one_torch_thread():
    """Train with one torch thread: on a 2-core machine shared with other jobs, two spinning OpenMP threads
    make the tiny models' runs 5x slower (measured: 12 s vs 1.9 s per fold)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """Three normal synthetic slides (8192 px at 0.243 µm/px) and a tumour slide (a 0.8 mm and a 0.4 mm
    lesion, ASAP XML in its own folder), tiled into stores (64 px at 10x): normals in two folders."""
    from pipelines.process import process_paths
    from wsi_ad.annotations import write_asap_xml
    from wsi_ad.preprocess import PreprocessConfig
    from wsi_ad.synth import synthesize_slide

    root = tmp_path_factory.mktemp("tune_setting")
    quiet = {"echo": lambda *a: None}
    normals = [synthesize_slide(root / "slides" / f"normal_{seed}.tif", width_px=8192, seed=seed, tumor=False)
               for seed in (101, 102, 104)]
    tumor = synthesize_slide(root / "slides" / "tumor_103.tif", width_px=8192, seed=103, tumor=True,
                             lesion_sizes_mm=[0.8, 0.4])
    write_asap_xml(root / "xml" / "tumor_103.xml", tumor.annotations)
    process_paths([normals[0].path], root / "normal_a", PreprocessConfig(), **quiet)
    process_paths([s.path for s in normals[1:]], root / "normal_b", PreprocessConfig(), **quiet)
    process_paths([tumor.path], root / "tumor", PreprocessConfig(), **quiet)
    stores = [root / "normal_a" / "normal_101.zarr", root / "normal_b" / "normal_102.zarr",
              root / "normal_b" / "normal_104.zarr"]
    assert all(p.is_dir() for p in stores)
    return {"normals": stores, "normal_dirs": [root / "normal_a", root / "normal_b"],
            "tumor_store": root / "tumor" / "tumor_103.zarr", "xml_dir": root / "xml", "root": root}


@pytest.fixture(scope="module")
def search(setting, tmp_path_factory):
    """One tiny real search (library call), timed; returns the result and where it went."""
    import time

    out = tmp_path_factory.mktemp("tune_out")
    lines: list[str] = []
    t0 = time.perf_counter()
    with one_torch_thread():
        result = tune(setting["normals"], [setting["tumor_store"]], setting["xml_dir"], out,
                      base_config=Config.from_dict(TINY_BASE), space=SearchSpace.from_dict(TINY_SPACE), folds=3,
                      seed=0, echo=lines.append, **CAPS)
    return {"result": result, "out": out, "lines": lines, "seconds": time.perf_counter() - t0}


# -- folds ----------------------------------------------------------------------------------------------------

def test_folds_are_slide_disjoint_and_validate_every_slide_once():
    stores = [Path(f"/data/stores/normal_{i:03d}.zarr") for i in range(7)]
    folds = slide_folds(stores, k=3, seed=5)
    assert len(folds) == 3 and [f.index for f in folds] == [0, 1, 2]
    validated = [p for f in folds for p in f.validation]
    assert sorted(validated) == sorted(stores)                       # every slide validated exactly once
    for fold in folds:
        assert not set(fold.train) & set(fold.validation)
        assert set(fold.train) | set(fold.validation) == set(stores)
    assert sorted(len(f.validation) for f in folds) == [2, 2, 3]
    assert slide_folds(stores, k=3, seed=5) == folds                   # deterministic by seed
    assert slide_folds(stores, k=3, seed=6) != folds
    loo = slide_folds(stores[:2], k=3)                                  # fewer slides than k: leave one out
    assert len(loo) == 2 and all(len(f.validation) == 1 for f in loo)
    with pytest.raises(TuneError, match="at least 2 normal slide stores"):
        slide_folds(stores[:1], k=3)
    with pytest.raises(TuneError, match="more than once"):
        slide_folds([stores[0], stores[1], stores[0]], k=2)
    with pytest.raises(TuneError, match="folds must be >= 2"):
        slide_folds(stores, k=1)


def test_held_out_fold_never_shares_a_slide_with_training(setting, tmp_path):
    a, b, c = setting["normals"]
    check_disjoint([a, b], [c])                                       # disjoint: fine
    with pytest.raises(FoldLeakError, match="shares a slide"):
        check_disjoint([a, b], [b])
    copy = tmp_path / "elsewhere" / b.name                             # the same slide under another path
    shutil.copytree(b, copy)
    with pytest.raises(FoldLeakError, match="slide_id:normal_102|source:"):
        check_disjoint([a, b], [copy])
    # the guard sits in the fold evaluation itself: a leaking fold is refused before anything is trained
    leaking = Fold(0, train=(a, b), validation=(copy,))
    run_dir = tmp_path / "runs"
    with pytest.raises(FoldLeakError):
        evaluate_fold(Config.from_dict(TINY_BASE), leaking, normal_sample([copy], 8, 0),
                      normal_sample([a], 8, 0), run_dir)
    with pytest.raises(FoldLeakError):   # held-out normal tiles sampled from a training store
        evaluate_fold(Config.from_dict(TINY_BASE), Fold(0, train=(a,), validation=(b,)), normal_sample([a], 8, 0),
                      normal_sample([c], 8, 0), run_dir)
    with pytest.raises(FoldLeakError, match="outside fold 0"):
        evaluate_fold(Config.from_dict(TINY_BASE), Fold(0, train=(a,), validation=(b,)), normal_sample([c], 8, 0),
                      normal_sample([c], 8, 0), run_dir)
    assert not list(run_dir.rglob("*.pt"))
    # a tumour slide passed as normal too is refused by tune()
    with pytest.raises(FoldLeakError, match="anomaly store"):
        tune([a, b, setting["tumor_store"]], [setting["tumor_store"]], setting["xml_dir"], tmp_path / "t",
             base_config=Config.from_dict(TINY_BASE), space=SearchSpace.from_dict(TINY_SPACE), echo=lambda *x: None)


# -- search space ---------------------------------------------------------------------------------------------

def test_search_space_grid_random_and_parameters():
    space = SearchSpace.from_dict({"mode": "grid", "max_candidates": 4,
                                   "space": {"lr": [0.001, 0.003], "latent_size": [4, 8]}})
    assert space.candidates() == [{"lr": 0.001, "latent_size": 4}, {"lr": 0.001, "latent_size": 8},
                                  {"lr": 0.003, "latent_size": 4}, {"lr": 0.003, "latent_size": 8}]
    with pytest.raises(TuneError, match="more than max_candidates=3"):
        space.candidates(max_candidates=3)
    default = load_space()
    assert default.size == 64
    picks = default.candidates(max_candidates=5)
    assert len(picks) == 5 and len({json.dumps(p) for p in picks}) == 5   # distinct
    assert picks == default.candidates(max_candidates=5)                  # seeded
    assert picks != default.candidates(max_candidates=5, seed=1)
    assert yaml.safe_load((REPO_ROOT / "configs" / "tune_space.yaml").read_text()) == default_space("dpa")
    for bad, message in (({"space": {"nonsense": [1]}}, "unknown parameter"), ({"space": {"lr": 0.1}}, "non-empty list"),
                         ({"mode": "bayes", "space": {"lr": [1]}}, "mode"), ({"spaces": {}}, "unknown key")):
        with pytest.raises(TuneError, match=message):
            SearchSpace.from_dict(bad)

    paper = Config()   # progressive, 64 px, vgg19
    config = apply_params(paper, {"latent_size": 4, "channels": 8, "iterations": 44333, "layer": "relu3_2",
                                  "magnification": "20x", "train.batch_size": 64})
    assert config.section.channels == [8] * 5                            # 64 -> 4 px: five levels
    assert sum(config.section.iterations.values()) == 44333 and config.section.iterations["stab16"] == 10000
    assert config.section.layers == {64: "relu3_2"} and config.data.magnification == "20x"
    assert config.train.batch_size == 64 and paper.train.batch_size == 128    # the base is untouched
    flat = apply_params(Config.from_dict(TINY_BASE), {"iterations": 20, "lr": 0.01, "batch_size": 4, "dpa.stats_tiles": 16})
    assert flat.section.flat_iterations == 20 and flat.section.lr == 0.01
    assert flat.train.batch_size == 4 and flat.section.stats_tiles == 16
    # a backbone change drops the base's layer names (they belong to its backbone)
    lite = apply_params(paper, {"backbone": "efficientnet_lite0", "feature_stats": "train"})
    assert lite.section.backbone == "efficientnet_lite0" and lite.section.layers is None
    with pytest.raises(ConfigError, match="no config section 'model'"):
        apply_params(paper, {"model.latent_size": 4})
    with pytest.raises(ConfigError, match="not layers of vgg19"):
        apply_params(paper, {"layer": "block7"})
    with pytest.raises(ConfigError):
        apply_params(paper, {"latent_size": 4, "channels": [4, 4, 4, 4]})    # four widths for five levels


# -- anomalies ------------------------------------------------------------------------------------------------

def test_anomaly_tiles_lie_inside_the_tumour_and_are_capped(setting, tmp_path):
    from wsi_ad.annotations import read_asap_xml
    from wsi_ad.metrics import tile_labels
    from wsi_ad.store import SlideStore

    selection = anomaly_tiles([setting["tumor_store"]], setting["xml_dir"], max_tiles=10, seed=3)
    (entry,) = selection.summary
    assert entry["slide_id"] == "tumor_103" and entry["tumor_tiles"] > 10 and entry["selected"] == 10
    tiles = SlideStore.open(setting["tumor_store"]).require("tiles")
    labels = tile_labels(np.asarray(tiles["coords"][:]), tuple(tiles.attrs["geometry"]["tile0"]),
                         read_asap_xml(setting["xml_dir"] / "tumor_103.xml"))
    assert (labels[selection.sample.indices[0]] == 1).all()
    assert selection.sample.tiles("10x", 32).shape == (10, 32, 32, 3)
    assert anomaly_tiles([setting["tumor_store"]], setting["xml_dir"], 10, 3).sample.key() == selection.sample.key()
    (tmp_path / "xml").mkdir()
    with pytest.raises(TuneError, match="no annotation file tumor_103.xml for tumour slide tumor_103"):
        anomaly_tiles([setting["tumor_store"]], tmp_path / "xml")


# -- the search -----------------------------------------------------------------------------------------------

def test_tiny_search_writes_results_and_a_trainable_best_config(search, setting):
    result, out = search["result"], search["out"]
    document = json.loads((out / "tune_results.json").read_text())
    statuses = [c["status"] for c in document["candidates"]]
    assert statuses == ["ok", "skipped", "ok", "skipped"]
    for skipped in (document["candidates"][1], document["candidates"][3]):
        assert "tiles/20x missing" in skipped["reason"]
    ids = {"normal_101", "normal_102", "normal_104"}
    assert sorted(s for f in document["folds"] for s in f["validation"]) == sorted(ids)   # each validated once
    for fold in document["folds"]:
        assert not set(fold["train"]) & set(fold["validation"]) and set(fold["train"]) | set(fold["validation"]) == ids
    for c in (document["candidates"][0], document["candidates"][2]):
        assert len(c["folds"]) == 3
        aucs = [f["auc"] for f in c["folds"]]
        assert all(0.0 <= a <= 1.0 for a in aucs)
        assert c["auc_mean"] == pytest.approx(np.mean(aucs)) and c["auc_std"] == pytest.approx(np.std(aucs))
        for f in c["folds"]:
            assert f["n_anomaly"] == 16 and 0 < f["n_normal"] <= 48 and f["seconds"] > 0 and not f["reused"]
            assert not set(f["train_slides"]) & set(f["validation_slides"])
            assert Path(f["checkpoint"]).is_file()
    assert document["anomalies"]["tiles"] == 16
    best = document["best"]
    assert best == result.best and best["index"] in (0, 2)
    assert best["auc_mean"] == max(document["candidates"][i]["auc_mean"] for i in (0, 2))

    # best_config.yaml: a full config that `wsi-ad train --config` reads unchanged
    best_path = out / "best_config.yaml"
    config = Config.from_yaml(best_path)
    assert config.section.image_size == 32 and config.section.layers == {32: ["block2", "block7"][best["index"] // 2]}
    assert config.train.device == "cpu"                                  # the base config's, not a runtime override
    from pipelines.train import add_train_arguments, config_from_args, run_train

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args([str(setting["normals"][0]), "--out", str(out / "final.pt"), "--config", str(best_path),
                              "--set", "dpa.flat_iterations=2", "--no-progress"])
    assert config_from_args(args).to_dict() == {**config.to_dict(), "dpa": {**config.to_dict()["dpa"], "flat_iterations": 2}}
    with one_torch_thread():
        assert run_train(args) == 0 and (out / "final.pt").is_file()


def test_cli_rerun_reuses_finished_work_and_prints_the_winner(search, setting, capsys):
    out = search["out"]
    checkpoints = sorted(out.glob("runs/*/*.pt"))
    assert len(checkpoints) == 6
    mtimes = [p.stat().st_mtime_ns for p in checkpoints]
    base, space = out / "base.yaml", out / "space.yaml"
    base.write_text(json.dumps(TINY_BASE))                              # JSON is YAML
    space.write_text(yaml.safe_dump(TINY_SPACE))
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    # two folders of stores and a store again: the same three normal slides, in another order
    normal_args = [str(setting["normal_dirs"][1]), str(setting["normals"][1]), str(setting["normal_dirs"][0])]
    args = parser.parse_args([*normal_args, "--anomalies", str(setting["tumor_store"]),
                              "--annotations", str(setting["xml_dir"]), "--out", str(out), "--base-config", str(base),
                              "--space", str(space), "--max-anomaly-tiles", "16", "--max-normal-tiles", "48"])
    assert run_tune(args) == 0
    captured = capsys.readouterr()
    assert [p.stat().st_mtime_ns for p in checkpoints] == mtimes        # nothing retrained
    document = json.loads((out / "tune_results.json").read_text())
    assert all(f["reused"] for c in document["candidates"] if c["status"] == "ok" for f in c["folds"])
    assert document["best"]["id"] == search["result"].best["id"]
    assert "<- best" in captured.out and "AUC mean ± std" in captured.out
    assert "wsi-ad train" in captured.out and "best_config.yaml" in captured.out
    assert "skipped: tiles/20x missing" in captured.out


def test_unsupervised_selection_picks_the_lowest_normal_score_without_anomalies(setting, tmp_path, capsys):
    base, space = tmp_path / "base.yaml", tmp_path / "space.yaml"
    base.write_text(json.dumps(TINY_BASE))
    space.write_text(yaml.safe_dump({"mode": "grid", "space": {"layer": ["block2", "block7"]}}))
    common = [*map(str, setting["normals"]), "--out", str(tmp_path / "u"), "--base-config", str(base),
              "--space", str(space), "--max-normal-tiles", "48"]
    assert main(["tune", *common]) == 2                                    # weakly-supervised needs anomalies
    assert "--selection unsupervised needs neither" in capsys.readouterr().err
    with one_torch_thread():
        assert main(["--threads", "1", "tune", *common, "--selection", "unsupervised"]) == 0
    out = capsys.readouterr().out
    document = json.loads((tmp_path / "u" / "tune_results.json").read_text())
    assert document["settings"]["selection"] == "unsupervised" and document["anomalies"] is None
    candidates = document["candidates"]
    assert all(f["auc"] is None and f["n_anomaly"] == 0 for c in candidates for f in c["folds"])
    means = [c["normal_score_mean"] for c in candidates]
    assert means == [pytest.approx(np.mean([f["normal_score_mean"] for f in c["folds"]])) for c in candidates]
    assert document["best"]["index"] == int(np.argmin(means)) and document["best"]["selection"] == "unsupervised"
    assert "normal score" in out and "mean normal score" in out
    assert "unsupervised selection" in (tmp_path / "u" / "best_config.yaml").read_text().split("\n")[0]


def test_fewer_slides_than_folds_and_failing_candidates_are_recorded(setting, tmp_path):
    space = SearchSpace.from_dict({"mode": "grid", "space": {"layer": ["block7"]}})
    with one_torch_thread():
        result = tune(setting["normals"][:2], [setting["tumor_store"]], setting["xml_dir"], tmp_path / "two",
                      base_config=Config.from_dict(TINY_BASE), space=space, folds=3, echo=lambda *a: None, **CAPS)
    assert len(result.folds) == 2 and "folds reduced from 3 to 2" in result.notes[0]
    document = json.loads(result.results_path.read_text())
    assert document["settings"]["folds_requested"] == 3 and document["settings"]["folds"] == 2
    assert len(document["candidates"][0]["aucs"]) == 2 and document["notes"] == result.notes
    # every candidate failing on bad input (here: a missing backbone weight file) is recorded, then refused
    broken = Config.from_dict({**TINY_BASE, "dpa": {**TINY_BASE["dpa"], "backbone_weights": str(tmp_path / "no.pth")}})
    space = SearchSpace.from_dict({"mode": "grid", "space": {"layer": ["block7", "block4"]}})
    with pytest.raises(TuneError, match="no candidate could be evaluated"):
        tune(setting["normals"], [setting["tumor_store"]], setting["xml_dir"], tmp_path / "broken", base_config=broken,
             space=space, echo=lambda *a: None, **CAPS)
    document = json.loads((tmp_path / "broken" / "tune_results.json").read_text())
    assert [c["status"] for c in document["candidates"]] == ["failed", "failed"] and document["best"] is None
    assert "weights file not found" in document["candidates"][0]["reason"]


def test_bad_input_is_one_clear_line(setting, tmp_path, capsys):
    args = [str(setting["normals"][0]), "--anomalies", str(setting["tumor_store"]), "--annotations", str(tmp_path),
            "--out", str(tmp_path / "o")]
    assert main(["tune", *args]) == 2                                              # one normal slide: no folds
    assert "at least 2 normal slide stores" in capsys.readouterr().err
    assert main(["tune", str(tmp_path / "nope"), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert "no such store or folder" in err and err.strip().count("\n") == 0
    bad_space = tmp_path / "space.yaml"
    bad_space.write_text("space: {latent: [4]}\n")
    assert main(["tune", *args, "--space", str(bad_space)]) == 2
    assert "unknown parameter 'latent'" in capsys.readouterr().err
    assert issubclass(TuneError, WsiAdError) and issubclass(FoldLeakError, TuneError)


@pytest.mark.parametrize("space, base", [("tune_space.yaml", "camelyon16_paper.yaml"), ("tune_space_cpu.yaml", "demo_cpu.yaml")])
def test_every_candidate_of_the_shipped_spaces_is_a_valid_config(space, base):
    configs = REPO_ROOT / "configs"
    base_config = Config.from_yaml(configs / base)
    candidates = load_space(configs / space).candidates()
    assert candidates
    for params in candidates:
        apply_params(base_config, params).validate()


def test_anomalies_as_a_folder_of_tile_images_give_the_same_selection(search, setting, tmp_path, capsys):
    """Issue 19: `tune --anomalies FOLDER` of PNG tumour tiles (no annotations) validates exactly as the same tiles
    read from the annotated tumour store: the same AUC per fold and candidate, the same winner."""
    from PIL import Image

    from wsi_ad.tuning import read_tiles

    picked = anomaly_tiles([setting["tumor_store"]], setting["xml_dir"], CAPS["max_anomaly_tiles"], seed=0).sample
    tiles = read_tiles(picked.stores[0], picked.indices[0], "10x", 64)
    folder = tmp_path / "tumour_tiles"
    folder.mkdir()
    for i, tile in enumerate(tiles):
        Image.fromarray(tile).save(folder / f"tumor_103_{i:03d}.png")
    base, space = tmp_path / "base.yaml", tmp_path / "space.yaml"
    base.write_text(json.dumps(TINY_BASE))
    space.write_text(yaml.safe_dump(TINY_SPACE))
    with one_torch_thread():
        assert main(["--threads", "1", "tune", *map(str, setting["normals"]), "--anomalies", str(folder),
                     "--out", str(tmp_path / "img"),
                     "--base-config", str(base), "--space", str(space), "--max-normal-tiles", "48",
                     "--max-anomaly-tiles", str(CAPS["max_anomaly_tiles"])]) == 0
    document = json.loads((tmp_path / "img" / "tune_results.json").read_text())
    assert document["settings"]["anomaly_images"] == [str(folder)] and document["settings"]["anomaly_stores"] == []
    assert "image files" in capsys.readouterr().err
    from_stores = {c["index"]: [f["auc"] for f in c["folds"]] for c in search["result"].candidates if c["status"] == "ok"}
    from_images = {c["index"]: [f["auc"] for f in c["folds"]] for c in document["candidates"] if c["status"] == "ok"}
    assert from_images.keys() == from_stores.keys() and len(from_images) == 2
    for index, aucs in from_images.items():
        assert aucs == pytest.approx(from_stores[index], abs=1e-6)
    assert document["best"]["index"] == search["result"].best["index"]


def test_anomaly_images_bad_input_is_refused_up_front(setting, tmp_path, capsys):
    """A missing --anomalies path, stores mixed with images, and an unreadable tile each give one clear line before
    any candidate is trained (an unreadable tile used to fail every candidate)."""
    folder = tmp_path / "tiles"
    folder.mkdir()
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    common = [*map(str, setting["normals"]), "--out", str(tmp_path / "o")]
    assert main(["tune", *common, "--anomalies", str(tmp_path / "nowhere")]) == 2
    assert "--anomalies " + str(tmp_path / "nowhere") + ": no such file or folder" in capsys.readouterr().err
    assert main(["tune", *common, "--anomalies", str(folder), str(setting["tumor_store"])]) == 2
    assert "either slide stores (with --annotations) or tumour tile images, not both" in capsys.readouterr().err
    assert main(["tune", *common, "--anomalies", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "b.png" in err and "cannot read image" in err and not (tmp_path / "o" / "runs").exists()


def test_image_folds_refuse_a_validation_slide_they_train_on(tmp_path):
    """The leak guard of folds of image tiles (the dpa-paper blocks) compares the slide names the fold gives:
    a normal or anomaly validation tile of a training slide is refused before any training, and so are a space
    varying the magnification of tiles that have one and a weakly-supervised fold without anomalies."""
    from PIL import Image

    from wsi_ad.tuning import ImageFold, ImageTileSample, tune_image_folds

    tile = tmp_path / "normal_001_x0_y0.png"
    Image.fromarray(np.full((192, 192, 3), 200, np.uint8)).save(tile)
    normals, anomalies = ImageTileSample([tile]), ImageTileSample([tile])
    leaking = ImageFold(0, (tmp_path,), normals, anomalies, frozenset({"normal_001", "normal_002"}),
                        frozenset({"normal_002"}), frozenset({"tumor_001"}))
    with pytest.raises(FoldLeakError, match="fold 0: normal validation tiles from slide.s. normal_002"):
        tune_image_folds([leaking], tmp_path / "t", echo=lambda line: None)
    tumour_leak = ImageFold(0, (tmp_path,), normals, anomalies, frozenset({"normal_001"}), frozenset({"normal_002"}),
                            frozenset({"normal_001"}))
    with pytest.raises(FoldLeakError, match="anomaly tiles from slide.s. normal_001"):
        evaluate_fold(Config.from_dict(TINY_BASE), tumour_leak, normals, anomalies, tmp_path / "runs")
    fine = ImageFold(0, (tmp_path,), normals, None, frozenset({"normal_001"}), frozenset({"normal_002"}))
    with pytest.raises(TuneError, match="needs anomaly tiles in every fold"):
        tune_image_folds([fine], tmp_path / "t", echo=lambda line: None)
    with pytest.raises(TuneError, match="cannot vary 'magnification'"):
        tune_image_folds([fine], tmp_path / "t", selection="unsupervised",
                         space=SearchSpace.from_dict({"space": {"magnification": ["10x", "20x"]}}),
                         echo=lambda line: None)
    assert not (tmp_path / "runs").exists()
