"""``wsi-ad evaluate``: the Camelyon16 protocol end to end on a tiny synthetic dataset (training, scoring, slide
AUC, tile AUC, FROC, results table) and the tile-folder benchmark on an anomalib Folder layout."""

from __future__ import annotations

import csv
import json

import numpy as np
from PIL import Image

from pipelines.camelyon16 import REFERENCE_RESULTS, run_camelyon16
from pipelines.cli import main
from wsi_ad.annotations import read_asap_xml
from wsi_ad.config import Config
from wsi_ad.metrics import tile_labels
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
    assert saved["slide"]["overall"]["auc"] in (0.0, 1.0)          # one slide of each class
    tile = saved["tile"]
    assert 0.0 <= tile["auc"] <= 1.0 and tile["n_tumor_tiles"] >= 5 and tile["n_normal_tiles"] > 100
    froc = saved["froc"]
    assert froc["n_lesions"] >= 1 and 0.0 <= froc["score"] <= 1.0 and len(froc["sensitivities"]) == 6
    table = (run / "results.md").read_text()
    for ref in REFERENCE_RESULTS:                                     # the published numbers beside ours
        assert f"{ref['value']:.3f}" in table
    assert "tile-level ROC AUC" in "\n".join(lines) and f"{tile['auc']:.3f}" in table
    assert results["model_id"] and (run / "model.pt").exists()
    assert (run / "testing" / "overlays").is_dir() and (run / "testing" / "report.html").exists()

    # evaluating the trained model again reuses every finished stage and gives the same numbers
    again = run_camelyon16(synth_dataset.root, run, model=run / "model.pt", workers=1, echo=lambda line: None)
    report = json.loads((run / "testing" / "report.json").read_text())
    assert all(row["stages_run"] == [] for row in report["slides"])
    assert again["tile"]["auc"] == tile["auc"] and again["froc"]["score"] == froc["score"]


def _write_pngs(folder, tiles) -> None:
    folder.mkdir(parents=True)
    for i, tile in enumerate(tiles):
        Image.fromarray(tile).save(folder / f"{i:04d}.png")


def test_evaluate_tiles_on_an_anomalib_folder_layout(scored_setting, tmp_path, capsys):
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


def test_evaluate_tiles_refuses_a_folder_without_the_layout(scored_setting, tmp_path, capsys):
    (tmp_path / "test" / "good").mkdir(parents=True)
    assert main(["evaluate", "tiles", str(tmp_path), "--model", str(scored_setting["model"])]) == 2
    assert "not an anomalib Folder dataset" in capsys.readouterr().err
