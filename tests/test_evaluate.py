"""``wsi-ad evaluate``: the Camelyon16 protocol end to end on a tiny synthetic dataset (training, scoring, slide
AUC, tile AUC, FROC, results table) and the tile-folder benchmark on an anomalib Folder layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from sklearn.metrics import roc_auc_score

from pipelines.camelyon16 import REFERENCE_RESULTS, Camelyon16Layout, run_camelyon16
from pipelines.cli import main
from wsi_ad.annotations import Annotation, read_asap_xml, write_asap_xml
from wsi_ad.config import Config
from wsi_ad.detectors.checkpoint import load_checkpoint
from wsi_ad.errors import WsiAdError
from wsi_ad.heatmap import heatmap_slide_score, load_heatmap
from wsi_ad.metrics import tile_labels
from wsi_ad.scoring import load_scores
from wsi_ad.store import SlideStore

#: The small 64 px model of the conftest, trained only briefly: the protocol's plumbing is under test here.
BRIEF = {
    "detector": "dpa",
    "dpa": {"architecture": "shallow", "image_size": 64, "latent_size": 8, "latent_channels": 4, "channels": [8, 8, 8, 8],
            "backbone": "efficientnet_lite0", "layers": {64: "block7"}, "feature_stats": "train", "stats_tiles": 128,
            "progressive": False, "flat_iterations": 40, "lr": 0.003},
    "data": {"buffer_tiles": 4096},
    "train": {"batch_size": 16, "checkpoint_every": 20, "log_every": 10},
}


def test_camelyon16_protocol_on_a_synthetic_dataset_and_its_rerun(synth_dataset, tmp_path):
    lines: list[str] = []
    run = tmp_path / "run"
    results = run_camelyon16(synth_dataset.root, run, config=Config.from_dict(BRIEF), tiles_per_slide=200,
                             workers=2, echo=lines.append)
    saved = json.loads((run / "results.json").read_text())
    assert saved["slide"]["overall"]["n_tumor"] == 1 and saved["slide"]["overall"]["n_normal"] == 1
    # every metric is recomputed here from what the run stored: the scores and tiles of each test slide's store,
    # its lesions from the ASAP XML (sklearn's AUC, tiles fully inside a lesion against every normal-slide tile)
    report = json.loads((run / "testing" / "report.json").read_text())
    labels = {r[0].lower(): r[1] for r in csv.reader((synth_dataset.root / "testing" / "reference.csv").open())}
    positives, negatives, slide_scores = [], [], {}
    slide_ids = [row["slide_id"] for row in report["slides"]]
    for row in report["slides"]:
        store = SlideStore.open(row["store"])
        scores = load_scores(store, row["model_id"])
        tiles = store.require("tiles")
        slide_scores[labels[row["slide_id"].lower()]] = row["slide_score"]
        if labels[row["slide_id"].lower()] == "Tumor":
            xml = synth_dataset.root / "testing" / "lesion_annotations" / f"{row['slide_id'].lower()}.xml"
            inside = tile_labels(np.asarray(tiles["coords"][:]), tuple(tiles.attrs["geometry"]["tile0"]),
                                 read_asap_xml(xml))
            positives.append(scores[inside == 1])
        else:
            negatives.append(scores)
    pos, neg = np.concatenate(positives), np.concatenate(negatives)
    assert saved["slide"]["overall"]["auc"] == float(slide_scores["Tumor"] > slide_scores["Normal"])
    tile = saved["tile"]
    assert (tile["n_tumor_tiles"], tile["n_normal_tiles"]) == (pos.size, neg.size) and pos.size >= 5
    assert tile["auc"] == pytest.approx(roc_auc_score(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos, neg]))
    froc = saved["froc"]
    assert froc["n_lesions"] >= 1 and len(froc["sensitivities"]) == 6
    assert froc["score"] == pytest.approx(np.mean(froc["sensitivities"]))
    # synthetic slides are scanned at 0.243 µm/px: the official FROC (0.243 µm/px for every slide) is the same
    assert saved["froc_official"]["score"] == froc["score"] and saved["froc_official"]["protocol"].startswith("official")
    table = (run / "results.md").read_text()
    for ref in REFERENCE_RESULTS:                                     # the published numbers beside ours
        assert f"{ref['value']:.3f}" in table
    assert "tile-level ROC AUC" in "\n".join(lines) and f"{tile['auc']:.3f}" in table
    assert results["model_id"] and (run / "model.pt").exists()
    assert (run / "testing" / "overlays").is_dir() and (run / "testing" / "report.html").exists()

    # each reducer's slide AUC, from the stored tile scores
    tumour_score, normal_score = ({r["slide_id"]: r for r in report["slides"]}[sid] for sid in (
        next(s for s in slide_ids if labels[s.lower()] == "Tumor"), next(s for s in slide_ids if labels[s.lower()] == "Normal")))
    heatmaps = {row["slide_id"]: load_heatmap(row["store"], row["model_id"]) for row in report["slides"]}
    top = {sid: heatmap_slide_score(h.values, "max") for sid, h in heatmaps.items()}
    assert saved["slide_reducers"]["max"] == float(top[tumour_score["slide_id"]] > top[normal_score["slide_id"]])
    assert set(saved["slide_reducers"]) == {"max", "topk_mean", "percentile"} and saved["slide_rf"] is None
    # the run's own reducer gives the run's slide AUC (same cells, same scores)
    assert saved["slide_reducers"][report["slides"][0]["reducer"]] == saved["slide"]["overall"]["auc"]

    # evaluating the trained model again reuses every finished stage and gives the same numbers; with the random
    # forest it also scores the two training slides and classifies the test slides from their heatmaps
    again = run_camelyon16(synth_dataset.root, run, model=run / "model.pt", workers=1, echo=lambda line: None,
                           slide_classifier="rf")
    report = json.loads((run / "testing" / "report.json").read_text())
    assert all(row["stages_run"] == [] for row in report["slides"])
    assert again["tile"]["auc"] == tile["auc"] and again["froc"]["score"] == froc["score"]
    rf = again["slide_rf"]
    assert rf["n_training_slides"] == {"normal": 1, "tumor": 1} and len(rf["feature_importances"]) == 28
    p = {sid.lower(): v for sid, v in rf["probabilities"].items()}
    tumour_p = p[tumour_score["slide_id"].lower()]
    normal_p = p[normal_score["slide_id"].lower()]
    assert 0.0 <= normal_p <= 1.0 and 0.0 <= tumour_p <= 1.0
    assert rf["auc"] == (1.0 if tumour_p > normal_p else 0.5 if tumour_p == normal_p else 0.0)
    assert rf["thresholds"][0] < rf["thresholds"][1]
    assert "random forest on 28 heatmap features" in (run / "results.md").read_text()


def _square(cx: float, cy: float, side_um: float, mpp: float = 0.243) -> Annotation:
    half = side_um / mpp / 2
    vertices = np.array([[cx - half, cy - half], [cx + half, cy - half], [cx + half, cy + half], [cx - half, cy + half]])
    return Annotation(name="Annotation 0", group="_0", kind="tumor", shape_type="Polygon", vertices=vertices)


def test_camelyon16_results_are_always_written_and_every_reference_slide_counts(scored_setting, tmp_path, capsys):
    """Issue 14, item 5. First the only tumour test slide has one lesion of 39 µm, smaller than a tile (62 µm at
    10x) and an isolated-tumour-cell cluster for the FROC: tile AUC and FROC are undefined, said so with the
    reason, and the results are written. Then the reference grows by slides that failed (a corrupt file with a
    1 mm lesion), are absent (no file) or have no tissue (blank glass): each is listed and counts."""
    data, run = tmp_path / "c16", tmp_path / "run"
    images, xmls = data / "testing" / "images", data / "testing" / "lesion_annotations"
    images.mkdir(parents=True)
    xmls.mkdir(parents=True)
    (images / "test_001.tif").symlink_to(scored_setting["normal"].path)
    (images / "test_002.tif").symlink_to(scored_setting["tumor"].path)
    cx, cy = scored_setting["tumor"].annotations[0].vertices.mean(axis=0)
    write_asap_xml(xmls / "test_002.xml", [_square(cx, cy, 39.0)])
    (data / "testing" / "reference.csv").write_text("Test_001,Normal,None,None\nTest_002,Tumor,IDC,Micro\n")
    argv = ["evaluate", "camelyon16", "--data", str(data), "--run", str(run), "--model", str(scored_setting["model"]),
            "--workers", "1", "--device", "cpu"]
    assert main(argv) == 0
    saved = json.loads((run / "results.json").read_text())
    assert saved["slide"]["auc"] in (0.0, 1.0) and saved["slide"]["complete"] is True
    tile, froc = saved["tile"], saved["froc"]
    assert tile["auc"] is None and tile["n_tumor_tiles"] == 0 and tile["n_normal_tiles"] > 100
    assert "needs tumour and normal tiles" in tile["note"]
    assert froc["score"] is None and "at least one lesion" in froc["note"] and froc["n_slides"] == 2
    assert [e["status"] for e in saved["slides"]] == ["scored", "scored"]
    assert saved["slides"][1]["n_lesions"] == 0 and saved["slides"][1]["n_itc"] == 1
    table = (run / "results.md").read_text()
    assert "| tile-level ROC AUC (all-tiles protocol) | undefined |" in table
    assert "| FROC score (per-slide µm/px) | undefined |" in table
    assert "| FROC score (official: 0.243 µm/px) | undefined |" in table
    assert saved["froc_official"]["score"] is None and saved["froc"]["protocol"].startswith("per-slide")
    assert "- tile-level ROC AUC (all-tiles protocol) undefined: tile AUC needs tumour and normal tiles" in table
    assert "undefined" in capsys.readouterr().out
    assert "isolated-tumour-cell cluster(s)" in froc["note"]

    # the whole reference is the denominator
    (images / "test_003.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 64)        # corrupt: fails alone
    write_asap_xml(xmls / "test_003.xml", [_square(20000.0, 20000.0, 1000.0)])      # a 1 mm lesion on it
    tifffile.imwrite(images / "test_005.tif", np.full((4096, 4096, 3), 243, np.uint8), tile=(256, 256),
                     photometric="rgb", compression="deflate", resolution=(1e4 / 0.243, 1e4 / 0.243),
                     resolutionunit="CENTIMETER")                                       # blank glass: no tiles
    (images / "test_006.tif").symlink_to(scored_setting["tumor"].path)              # a tumour row without XML
    with (data / "testing" / "reference.csv").open("a") as f:
        f.write("Test_003,Tumor,IDC,Macro\nTest_004,Normal,None,None\nTest_005,Normal,None,None\n"
                "Test_006,Tumor,IDC,Micro\n")
    assert main(argv) == 0
    saved = json.loads((run / "results.json").read_text())
    slides = {e["slide_id"]: e for e in saved["slides"]}
    assert {sid: e["status"] for sid, e in slides.items()} == {
        "Test_001": "scored", "Test_002": "scored", "Test_003": "failed", "Test_004": "not found",
        "Test_005": "no tiles", "Test_006": "scored"}
    assert "lesions are unknown, it is left out of the FROC and the tile AUC" in slides["Test_006"]["note"]
    assert "no tissue" in slides["Test_005"]["note"] and "not a slide format" in slides["Test_003"]["note"]
    slide = saved["slide"]
    assert slide["missing"] == ["Test_003", "Test_004", "Test_005"] and slide["missing_counted_as"] == "wrong"
    assert (slide["overall"]["n_tumor"], slide["overall"]["n_normal"]) == (3, 3)
    # 9 tumour-normal pairs; only scored tumours (Test_002, Test_006) over the scored normal Test_001 can be right
    right = sum(slides[t]["slide_score"] > slides["Test_001"]["slide_score"] for t in ("Test_002", "Test_006"))
    assert slide["auc"] == pytest.approx(right / 9)
    assert slide["scored_only"]["auc"] == pytest.approx(right / 2)
    froc = saved["froc"]
    assert froc["n_lesions"] == 1 and froc["n_detected_lesions"] == 0 and froc["score"] == 0.0
    assert froc["n_slides"] == 5 and froc["missing"] == ["Test_003", "Test_004", "Test_005"]
    assert froc["not_evaluable"] == ["Test_006"]                # its detections do not make the FROC undefined
    assert slides["Test_003"]["n_lesions"] == 1 and "annotations alone" in slides["Test_003"]["note"]
    assert saved["tile"]["auc"] is None and saved["tile"]["slides_without_tiles"] == ["Test_003", "Test_004", "Test_005"]
    table = (run / "results.md").read_text()
    assert "Reference slides not in every metric (4 of 6)" in table
    assert "| Test_004 | Normal | not found |" in table and "3 unscored counted wrong" in table


def _write_pngs(folder, tiles) -> None:
    folder.mkdir(parents=True)
    for i, tile in enumerate(tiles):
        Image.fromarray(tile).save(folder / f"{i:04d}.png")


def test_evaluate_tiles_on_an_anomalib_folder_layout(scored_setting, tmp_path, capsys, monkeypatch):
    normal = SlideStore.open(scored_setting["normal_store"]).require("tiles")
    tumor = SlideStore.open(scored_setting["tumor_store"]).require("tiles")
    labels = tile_labels(np.asarray(tumor["coords"][:]), tuple(tumor.attrs["geometry"]["tile0"]),
                         read_asap_xml(scored_setting["tumor_xml"]))
    inside = np.flatnonzero(labels == 1)[:30]
    assert len(inside) >= 20
    root = tmp_path / "folder_dataset"
    _write_pngs(root / "train" / "good", np.asarray(normal["10x"][:5]))
    _write_pngs(root / "test" / "good", np.asarray(normal["10x"][100:160]))
    _write_pngs(root / "test" / "Ungood", np.asarray(tumor["10x"].oindex[inside]))

    assert main(["evaluate", "tiles", str(root), "--model", str(scored_setting["model"]), "--out",
                 str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    test = results["splits"]["test"]
    assert test["n_good"] == 60 and test["n_anomalous"] == len(inside) and test["anomalous_folders"] == ["Ungood"]
    assert test["auc"] > 0.7 and f"{test['auc']:.4f}" in out
    with open(tmp_path / "eval" / "scores_test.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 60 + len(inside) and {r["label"] for r in rows} == {"0", "1"}
    assert (tmp_path / "eval" / "roc_test.png").stat().st_size > 5000

    # issue 22: without --out the results go to the current directory, never into the (here read-only) dataset
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        assert main(["evaluate", "tiles", str(root), "--model", str(scored_setting["model"])]) == 0
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    assert f"results go to {work / 'folder_dataset-wsi-ad-eval'}" in capsys.readouterr().out
    again = json.loads((work / "folder_dataset-wsi-ad-eval" / "results.json").read_text())
    assert again["splits"]["test"]["auc"] == test["auc"]
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    monkeypatch.chdir(root)                         # run from inside the dataset: it asks for --out, writes nothing
    assert main(["evaluate", "tiles", ".", "--model", str(scored_setting["model"])]) == 2
    assert "inside the dataset" in capsys.readouterr().err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert main(["evaluate", "tiles", str(tmp_path / "nope"), "--model", str(scored_setting["model"])]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")           # --out that cannot be a folder: refused before any scoring
    assert main(["evaluate", "tiles", str(root), "--model", str(scored_setting["model"]), "--out",
                 str(tmp_path / "a_file" / "eval")]) == 2
    assert "--out" in capsys.readouterr().err


def test_evaluate_tiles_refuses_a_folder_without_the_layout(scored_setting, tmp_path, capsys):
    (tmp_path / "test" / "good").mkdir(parents=True)
    assert main(["evaluate", "tiles", str(tmp_path), "--model", str(scored_setting["model"])]) == 2
    assert "not an anomalib Folder dataset" in capsys.readouterr().err


def test_camelyon16_without_test_slides_still_writes_results_and_a_bad_reference_fails_first(scored_setting, tmp_path):
    data = tmp_path / "c16"
    (data / "testing" / "images").mkdir(parents=True)
    (data / "testing" / "lesion_annotations").mkdir()
    reference = data / "testing" / "reference.csv"
    reference.write_text("Test_001,Normal,None,None\nTest_002,Tumor,IDC,Macro\n")
    results = run_camelyon16(data, tmp_path / "run", model=scored_setting["model"], echo=lambda line: None)
    assert [e["status"] for e in results["slides"]] == ["not found", "not found"]
    assert results["slide"]["auc"] == 0.0 and (tmp_path / "run" / "results.md").exists()
    reference.write_text("Test_001,Normal,None,None\nTest_030,Tumor,,\n")          # no metastasis category
    (data / "testing" / "images" / "test_001.tif").symlink_to(scored_setting["normal"].path)
    with pytest.raises(WsiAdError, match="line 2"):
        run_camelyon16(data, tmp_path / "run2", model=scored_setting["model"], echo=lambda line: None)
    assert not (tmp_path / "run2" / "testing").exists()                           # nothing was processed


def test_dpa_paper_protocol_on_a_synthetic_dataset(paper_layout, tmp_path, shared_data_if_present):
    """Issue 19, its done-when: `evaluate camelyon16 --protocol dpa-paper --seeds 2 --tune` end to end. The paper's
    blocks are built by its rules (<= 50 random 768 px tissue blocks of the 768 px grid a slide, as the official
    lists; tumour blocks fully inside the lesion); hyperparameters are selected on blocks as the paper's cv_folds
    (validation anomalies: blocks inside the lesion of a tumour training slide; normal blocks split by slide, the
    leak guard); two seeds train on 64 px crops of the 192 px training blocks; results.md reports the tile AUC as
    mean ± std, the slide AUC of each reducer and of the random forest and FROC in both modes, each naming its
    protocol, beside the published values."""
    import re

    import yaml

    from pipelines.dpa_protocol import select_on_blocks
    from wsi_ad.annotations import read_asap_xml as read_xml

    data, run = paper_layout, tmp_path / "run"
    xmls = data / "testing" / "lesion_annotations"
    space = tmp_path / "space.yaml"
    space.write_text("mode: grid\nmax_candidates: 2\nspace:\n  lr: [0.003, 0.001]\n")
    config = tmp_path / "brief.yaml"
    config.write_text(yaml.safe_dump(BRIEF))
    assert main(["evaluate", "camelyon16", "--data", str(data), "--run", str(run), "--config", str(config),
                 "--protocol", "dpa-paper", "--seeds", "2", "--tune", "--tune-space", str(space),
                 "--slide-classifier", "rf", "--workers", "1"]) == 0
    results = json.loads((run / "results.json").read_text())

    # the selection ran on blocks, two folds (two normal training slides), each validating on a slide it never
    # trained on and on the tumour training slide's lesion blocks
    selection = results["hyperparameter_selection"]
    assert selection["selection"] == "weakly-supervised" and selection["protocol"] == "dpa-paper"
    assert selection["tumor_slides"] == ["tumor_104"] and selection["anomaly_tiles"] > 0
    tuned = json.loads(Path(selection["results"]).read_text())
    assert len(tuned["folds"]) == 2
    for fold in tuned["folds"]:
        assert len(fold["validation"]) == 1 and not set(fold["train"]) & set(fold["validation"])
        assert fold["anomaly_slides"] == ["tumor_104"] and fold["anomaly_tiles"] == selection["anomaly_tiles"] // 2
    lesion = read_xml(data / "training" / "lesion_annotations" / "tumor_104.xml")
    for png in (run / "dpa_paper" / "selection" / "tumor").glob("*.png"):
        x, y = map(int, re.match(r"^tumor_104_x(\d+)_y(\d+)\.png$", png.name).groups())
        assert tile_labels(np.array([[x, y]]), (768, 768), lesion)[0] == 1
    candidates = tuned["candidates"]
    assert {c["params"]["lr"] for c in candidates} == {0.003, 0.001} and all(len(c["aucs"]) == 2 for c in candidates)
    winner = max(candidates, key=lambda c: (c["auc_mean"], -c["auc_std"], -c["seconds"]))     # ties: steadier, faster
    assert selection["best"]["params"]["lr"] == winner["params"]["lr"]
    assert Config.from_yaml(selection["best_config"]).section.lr == selection["best"]["params"]["lr"]

    paper = results["tile_dpa_paper"]
    blocks = run / "dpa_paper" / "blocks"
    names = {split: sorted(p.name for p in (blocks / split).glob("*.png")) for split in ("train/good", "test/good",
                                                                                          "test/tumor")}
    assert paper["n_tumor_tiles"] == len(names["test/tumor"]) > 0 and paper["n_normal_tiles"] == len(names["test/good"])
    assert "paper's rules" in paper["blocks"]["source"] and results["protocol"] == "dpa-paper"
    for split, files in names.items():
        per_slide = {}
        for name in files:
            per_slide[name.rsplit("_x", 1)[0]] = per_slide.get(name.rsplit("_x", 1)[0], 0) + 1
        assert max(per_slide.values()) <= 50, split
    # every tumour block lies inside the lesion, every normal test block comes from a normal test slide
    labels = {"test_001": "Normal", "test_002": "Tumor"}
    for name in names["test/tumor"]:
        slide, x, y = re.match(r"^(.*)_x(\d+)_y(\d+)", name).groups()
        lesion = read_xml(xmls / f"{slide}.xml")
        assert tile_labels(np.array([[int(x), int(y)]]), (768, 768), lesion)[0] == 1
    assert {labels[n.rsplit("_x", 1)[0]] for n in names["test/good"]} == {"Normal"}
    assert Image.open(blocks / "test/good" / names["test/good"][0]).size == (192, 192)
    assert paper["n_seeds"] == 2 and len(paper["aucs"]) == 2
    assert paper["auc_mean"] == pytest.approx(np.mean(paper["aucs"])) and paper["auc_std"] == pytest.approx(
        np.std(paper["aucs"]))
    # the seeds trained the selected configuration
    seed_lrs = {Config.from_dict(load_checkpoint(c)["config"]).section.lr for c in paper["checkpoints"]}
    assert seed_lrs == {selection["best"]["params"]["lr"]}
    table = (run / "results.md").read_text()
    assert f"| tile-level ROC AUC (dpa-paper protocol) | {paper['auc_mean']:.3f} ± {paper['auc_std']:.3f} |" in table
    assert "| 0.934 |" in table.split("(dpa-paper protocol)")[1].split("\n")[0]       # the paper's value beside it
    assert "| tile-level ROC AUC (all-tiles protocol) |" in table and "FROC score (official: 0.243 µm/px)" in table
    assert "FROC score (per-slide µm/px)" in table and "| slide AUC, random forest on 28 heatmap features |" in table
    for reducer in results["slide_reducers"]:
        if not reducer.endswith("_note"):
            assert f"| slide AUC, reducer `{reducer}` |" in table
    assert "Hyperparameters: weakly-supervised selection on the dpa-paper blocks, 2 folds" in table
    assert ("read it as coarse" in table) == (paper["n_tumor_tiles"] < 30)
    # the slide-level metrics come from the first seed's model, scoring the whole test slides
    assert Path(results["model"]) == Path(paper["checkpoints"][0]) and results["slide"]["overall"]["n_tumor"] == 1

    # the paper's other criterion on the same blocks: the lowest mean score of the held-out normal blocks, no tumour
    # slide read; a re-run of the search reuses every finished fold
    lines: list[str] = []
    one = tmp_path / "one.yaml"
    one.write_text("mode: grid\nspace:\n  lr: [0.003]\n")
    chosen, unsupervised = select_on_blocks(Camelyon16Layout(data), tmp_path / "unsup", Config.from_dict(BRIEF),
                                            space=one, selection="unsupervised",
                                            blocks=(blocks, paper["blocks"]), echo=lines.append)
    assert unsupervised["tumor_slides"] == [] and unsupervised["anomaly_tiles"] == 0
    assert unsupervised["best"]["auc_mean"] is None and unsupervised["best"]["normal_score_mean"] > 0
    assert chosen.section.lr == 0.003 and (tmp_path / "unsup" / "tune" / "best_config.yaml").is_file()
    select_on_blocks(Camelyon16Layout(data), tmp_path / "unsup", Config.from_dict(BRIEF), space=one,
                     selection="unsupervised", blocks=(blocks, paper["blocks"]), echo=lines.append)
    assert sum("reused" in line for line in lines) == 2

    # the official lists name real Camelyon16 slides, none of which is in a synthetic dataset: a clear error
    if shared_data_if_present is not None:
        with pytest.raises(WsiAdError, match="no training block could be made .* not the slide the list names"):
            run_camelyon16(data, tmp_path / "official", config=Config.from_dict(BRIEF),
                           protocol="dpa-paper", dpa_split=shared_data_if_present / "camelyon16" / "dpa_split",
                           workers=1, echo=lambda line: None)
    with pytest.raises(WsiAdError, match="belong to --protocol dpa-paper"):
        run_camelyon16(data, tmp_path / "x", seeds=2, echo=lambda line: None)


def test_selection_space_keeps_only_the_magnifications_the_stores_hold(scored_setting):
    """Issue 19: a tune space asking for 10x and 20x on stores tiled at 10x only runs the 10x candidates and says
    so (before, the 20x candidates were skipped one by one in the tune log only); none held is an error."""
    from pipelines.camelyon16 import _held_magnifications
    from wsi_ad.tuning import SearchSpace

    stores = [scored_setting["normal_store"], scored_setting["tumor_store"]]
    held = sorted(set(SlideStore.open(stores[0]).require("tiles").keys()) & {"10x", "20x", "5x"})
    assert held == ["10x"]
    space = SearchSpace.from_dict({"space": {"magnification": ["10x", "20x"], "lr": [0.001, 0.0005]}})
    kept, dropped = _held_magnifications(space, stores)
    assert kept.params == {"magnification": ["10x"], "lr": [0.001, 0.0005]} and dropped == ["20x"]
    with pytest.raises(WsiAdError, match=r"magnifications \['20x'\] are in none of the stores"):
        _held_magnifications(SearchSpace.from_dict({"space": {"magnification": ["20x"]}}), stores)


def test_dpa_paper_without_tumour_blocks_still_writes_every_other_metric(synth_dataset, tmp_path):
    """On slides whose lesions hold no whole 768 px grid block (the session's small synthetic dataset), the dpa-paper
    tile AUC is undefined with the reason, and the slide AUC, all-tiles tile AUC and FROC are measured and written
    with a model trained on all tiles, as the all-tiles protocol does."""
    run = tmp_path / "run"
    results = run_camelyon16(synth_dataset.root, run, config=Config.from_dict(BRIEF), protocol="dpa-paper",
                             workers=1, echo=lambda line: None)
    paper = results["tile_dpa_paper"]
    assert paper["auc_mean"] is None and paper["n_tumor_tiles"] == 0 and paper["n_normal_tiles"] > 0
    assert "no tumour test block" in paper["note"] and "768 px grid" in paper["note"]
    assert results["slide"]["overall"]["auc"] in (0.0, 1.0) and results["tile"]["auc"] is not None
    table = (run / "results.md").read_text()
    assert "| tile-level ROC AUC (dpa-paper protocol) | undefined |" in table
    assert "- tile-level ROC AUC (dpa-paper protocol) undefined: no tumour test block" in table
    assert Path(results["model"]) == run / "model.pt"
