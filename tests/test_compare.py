"""``wsi-ad compare`` (issue 17): several detectors trained on the same normal tiles of a synthetic Camelyon16-like
dataset, scored through the slide pipeline, two seeds each, one table; failing rows recorded in the table, never
ending it; a re-run reuses every finished model; an anomalib Folder dataset of real patches as the other input."""

from __future__ import annotations

import json

import pytest
import yaml

from pipelines.cli import main
from pipelines.compare import CONFIG_DIR, CONFIGS, CompareError, parse_rows
from wsi_ad.config import Config

TRAIN = {"batch_size": 8, "checkpoint_every": 50, "log_every": 1, "seed": 4}
AE = {"detector": "ae", "ae": {"latent_dim": 8, "iterations": 3}, "data": {"buffer_tiles": 512}, "train": TRAIN}
PIXEL_L1 = {"detector": "dpa", "dpa": {"architecture": "shallow", "channels": [4, 4, 4, 4], "loss": "l1",
                                       "progressive": False, "flat_iterations": 3},
            "data": {"buffer_tiles": 512}, "train": TRAIN}


def _yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_rows_by_name_and_by_config_and_their_errors(tmp_path):
    for scale in CONFIGS:                                   # every shipped config is there and valid for its detector
        for name, file in CONFIGS[scale].items():
            assert Config.from_yaml(CONFIG_DIR / file).detector == name, file
    mine = _yaml(tmp_path / "x.yaml", AE)
    rows = parse_rows("dpa, ae", "cpu", [f"mine={mine}"])
    assert list(rows) == ["dpa", "ae", "mine"] and rows["dpa"] == CONFIG_DIR / "demo_cpu.yaml"
    with pytest.raises(CompareError, match="--config gone=.*no such file, and no packaged config"):
        parse_rows(None, "cpu", [f"gone={tmp_path / 'gone.yaml'}"])
    packaged = parse_rows(None, "cpu", ["a=small_cpu", "b=configs/ablations/dpa_pg_cpu.yaml"])   # names, as --config
    assert {name: path.resolve() for name, path in packaged.items()} == {
        "a": (CONFIG_DIR / "small_cpu.yaml").resolve(), "b": (CONFIG_DIR / "ablations" / "dpa_pg_cpu.yaml").resolve()}
    for bad in ("../escape", ".hidden", "a/b"):                    # a row name is a folder under OUT/runs
        with pytest.raises(CompareError, match="a row name is letters"):
            parse_rows(None, "cpu", [f"{bad}={mine}"])
    assert parse_rows("igd", "paper", [])["igd"] == CONFIG_DIR / "igd_paper.yaml"
    with pytest.raises(CompareError, match="no shipped cpu config for detector 'nope'.*--config nope=PATH"):
        parse_rows("nope", "cpu", [])
    with pytest.raises(CompareError, match="expected NAME=CONFIG.yaml"):
        parse_rows(None, "cpu", ["justapath.yaml"])
    with pytest.raises(CompareError, match="row 'ae' is given twice"):
        parse_rows("ae", "cpu", [f"ae={mine}"])
    with pytest.raises(CompareError, match="nothing to compare"):
        parse_rows("", "cpu", [])
    # bad --data or --out: one line, exit 2, nothing created
    (tmp_path / "ds" / "train").mkdir(parents=True)
    (tmp_path / "ds" / "test").mkdir()
    assert main(["compare", "--data", str(tmp_path / "ds"), "--out", "/proc/wsi-ad-out", "--config", f"m={mine}"]) == 2
    assert main(["compare", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--config", f"m={mine}"]) == 2
    assert not (tmp_path / "o").exists()


def test_compare_on_synthetic_slides_records_failures_and_resumes(synth_dataset, tmp_path, capsys):
    out = tmp_path / "cmp"
    bad_key = _yaml(tmp_path / "bad.yaml", {**AE, "ae": {**AE["ae"], "no_such_key": 1}})
    no_weights = _yaml(tmp_path / "vgg.yaml", {"detector": "piad", "piad": {"backbone": "vgg19", "iterations": 2},
                                              "train": TRAIN})
    args = ["compare", "--data", str(synth_dataset.root), "--out", str(out), "--seeds", "2", "--device", "cpu",
            "--workers", "1", "--config", f"ae={_yaml(tmp_path / 'ae.yaml', AE)}",
            "--config", f"dpa_pixel_l1={_yaml(tmp_path / 'l1.yaml', PIXEL_L1)}",
            "--config", f"broken={bad_key}", "--config", f"vgg={no_weights}"]
    assert main(args) == 0
    report = json.loads((out / "compare.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["ae", "dpa_pixel_l1", "broken", "vgg"] and report["data"]["kind"] == "slides"
    for name in ("ae", "dpa_pixel_l1"):
        runs = rows[name]["runs"]
        assert [r["seed"] for r in runs] == [4, 5] and all(r["status"] == "ok" for r in runs)
        assert all(0 <= r["tile_auc"] <= 1 and r["n_tumor_tiles"] > 0 and r["score_tiles_per_s"] > 0 for r in runs)
        assert runs[0]["model_id"] != runs[1]["model_id"] and len(runs[0]["roc"]["fpr"]) >= 2
        summary = rows[name]["summary"]
        assert summary["seeds_ok"] == 2 and summary["tile_auc"]["n"] == 2 and summary["slide_auc"]["mean"] is not None
    assert "no_such_key" in rows["broken"]["error"] and rows["broken"]["runs"] == []
    assert all(r["status"] == "failed" and "vgg19" in r["error"] for r in rows["vgg"]["runs"])
    table = (out / "compare.md").read_text()
    assert "| ae | ae |" in table and "| dpa_pixel_l1 | dpa |" in table and "Failures:" in table
    assert "**broken**" in table and "**vgg** seed 4" in table
    assert (out / "roc.png").stat().st_size > 0
    assert "dpa_pixel_l1 seed 5: tile AUC" in capsys.readouterr().out

    assert main(args) == 0                                  # a re-run trains nothing again
    again = {row["name"]: row for row in json.loads((out / "compare.json").read_text())["rows"]}
    assert all(r["reused"] for name in ("ae", "dpa_pixel_l1") for r in again[name]["runs"])
    assert [r["tile_auc"] for r in again["ae"]["runs"]] == [r["tile_auc"] for r in rows["ae"]["runs"]]

    _yaml(tmp_path / "ae.yaml", {**AE, "ae": {**AE["ae"], "lr": 0.001}})   # the row's config changed: no stale reuse
    main(args)
    changed = {row["name"]: row for row in json.loads((out / "compare.json").read_text())["rows"]}
    assert all(r["status"] == "failed" and "different configuration" in r["error"] for r in changed["ae"]["runs"])
    assert all(r["reused"] for r in changed["dpa_pixel_l1"]["runs"])


def test_compare_on_an_anomalib_folder_of_real_patches(shared_data, tmp_path):
    patches = shared_data / "patches" / "camelyon16_l0_256"
    if not (patches / "train" / "good").is_dir():
        pytest.skip(f"real Camelyon16 patches not found in {patches}")
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(patches), "--out", str(out), "--seeds", "1", "--device", "cpu",
                 "--image-mpp", "0.243", "--config", f"ae={_yaml(tmp_path / 'ae.yaml', AE)}"]) == 0
    row = json.loads((out / "compare.json").read_text())["rows"][0]
    run = row["runs"][0]
    assert run["status"] == "ok" and run["n_tumor_tiles"] == 59 and run["n_normal_tiles"] == 499
    assert run["slide_auc"] is None and 0 <= run["tile_auc"] <= 1
    from pipelines.evaluate import evaluate_tiles  # scored at the µm/px it was trained at (10x)

    alone = evaluate_tiles(patches, out / "runs" / "ae" / "seed4" / "model.pt", tmp_path / "alone", device="cpu",
                           image_mpp=0.243, echo=lambda line: None)
    assert run["tile_auc"] == pytest.approx(alone["splits"]["test"]["auc"])
    bad = _yaml(tmp_path / "bad.yaml", {**AE, "ae": {"nope": 1}})
    assert main(["compare", "--data", str(patches), "--out", str(tmp_path / "none"), "--config", f"b={bad}"]) == 1
    assert not list(patches.glob("wsi-ad*"))                # nothing written into the dataset
    assert "slide AUC" not in (out / "compare.md").read_text().split("\n")[0]


def test_compare_with_the_dpa_paper_protocol(paper_layout, tmp_path):
    """Issue 19: `compare --protocol dpa-paper` trains every row on the paper's training blocks of the slides and
    scores the centre crops of its test blocks; with --tune each row also selects on the blocks (the paper's
    cv_folds, split by normal slide) and trains the winner; the table names the protocol; a tile folder is
    refused."""
    import numpy as np

    data = paper_layout
    out = tmp_path / "cmp"
    space = tmp_path / "space.yaml"
    space.write_text("mode: grid\nspace:\n  latent_dim: [8, 4]\n")
    args = ["compare", "--data", str(data), "--out", str(out), "--seeds", "2", "--device", "cpu",
            "--protocol", "dpa-paper", "--config", f"ae={_yaml(tmp_path / 'ae.yaml', AE)}", "--tune",
            "--tune-space", str(space)]
    assert main(args) == 0
    report = json.loads((out / "compare.json").read_text())
    row = report["rows"][0]
    blocks = json.loads((out / "dpa_paper" / "blocks.json").read_text())
    assert report["data"]["protocol"] == "dpa-paper" and report["data"]["kind"] == "tiles"
    assert [r["n_tumor_tiles"] for r in row["runs"]] == [blocks["counts"]["test/tumor"]] * 2
    assert [r["n_normal_tiles"] for r in row["runs"]] == [blocks["counts"]["test/good"]] * 2
    assert row["summary"]["tile_auc"]["mean"] == pytest.approx(np.mean([r["tile_auc"] for r in row["runs"]]))
    assert "tile AUC (dpa-paper protocol)" in (out / "compare.md").read_text().split("\n")[0]
    tuned = row["tuned"]
    assert tuned["selection"]["protocol"] == "dpa-paper" and tuned["selection"]["tumor_slides"] == ["tumor_104"]
    assert tuned["selection"]["best"]["params"]["latent_dim"] in (8, 4)
    assert [r["status"] for r in tuned["runs"]] == ["ok", "ok"]
    assert [r["n_tumor_tiles"] for r in tuned["runs"]] == [blocks["counts"]["test/tumor"]] * 2
    assert "tile AUC (WS)" in (out / "compare.md").read_text().split("\n")[0]
    with pytest.raises(CompareError, match="needs a Camelyon16-like folder of slides"):
        from pipelines.compare import compare

        compare(out / "dpa_paper" / "blocks", tmp_path / "x", {}, protocol="dpa-paper", echo=lambda line: None)
