"""Benchmark: which slide-level reducer separates tumour from normal slides best.

Usage::

    python benchmarks/bench_reducers.py [--work DIR] [--out benchmarks/results/slide_reducers.json]

Synthesizes 5 normal and 5 tumour slides (8192 px at 0.243 µm/px; lesions 0.25-1.0 mm; both stain
"hospitals"; pen ink on two normal slides) and one normal training slide, tiles them (64 px at 10x,
stain-normalized), trains the tests' small CPU model on the training slide, scores every tile, writes the
scores into each store (``scores/<model_id>``) and builds every slide's heatmap. Then every reducer of
:func:`wsi_ad.heatmap.slide_score` (several k / q / thresholds, with and without smoothing) is evaluated by

* ``auc``: slide-level ROC AUC, tumour vs normal (Mann-Whitney U / (n_t n_n));
* ``gap_std``: ``(min tumour - max normal) / std(normal slide scores)``: positive when every tumour slide
  ranks above every normal one, and larger the more room there is between them;
* ``dprime``: ``(mean tumour - mean normal) / pooled std``.

Each reducer is applied to the whole heatmap (``edge_cells=0``) and to its interior, the tissue rim of 1 or
2 cells left out (``edge_cells``; tissue-edge tiles score high on normal slides), with and without a 100 µm
Gaussian smoothing.

``fraction_above`` thresholds are calibrated on the *training* slide's tile scores (held-out normal
tissue), never on the evaluated slides. Prints JSON and writes it to ``--out``. Takes about 5 minutes on
2 CPU cores; with ``--work DIR`` the slides, stores and model are kept and reused by a later run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.process import process_paths  # noqa: E402
from wsi_ad.atomic import write_text_atomic  # noqa: E402
from wsi_ad.config import Config  # noqa: E402
from wsi_ad.detectors.loop import train  # noqa: E402
from wsi_ad.detectors.scorer import load_scorer, score_store  # noqa: E402
from wsi_ad.heatmap import heatmap_slide_score, smooth_heatmap, tile_grid  # noqa: E402
from wsi_ad.metrics import roc_auc  # noqa: E402
from wsi_ad.preprocess import PreprocessConfig  # noqa: E402
from wsi_ad.store import SlideStore, config_hash  # noqa: E402
from wsi_ad.synth import synthesize_slide  # noqa: E402

#: The tests' small model.
SMALL_MODEL_CONFIG = REPO / "configs" / "small_cpu.yaml"

SIZE_PX = 8192
NORMAL = [(311, "A", False), (312, "B", False), (313, "A", True), (314, "B", True), (315, "A", False)]
TUMOR = [(321, "A", [0.25]), (322, "B", [0.35]), (323, "A", [0.5]), (324, "B", [0.8, 0.4]), (325, "B", [1.0])]


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of ``pos`` above ``neg`` (ties count half)."""
    pos, neg = np.asarray(pos, dtype=float).ravel(), np.asarray(neg, dtype=float).ravel()
    return roc_auc(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos, neg])


def separation(tumor: list[float], normal: list[float]) -> dict:
    t, n = np.asarray(tumor), np.asarray(normal)
    sd_n = float(n.std(ddof=1)) or 1e-12
    pooled = float(np.sqrt((t.var(ddof=1) + n.var(ddof=1)) / 2)) or 1e-12
    return {"auc": round(auc(t, n), 4), "gap_std": round(float((t.min() - n.max()) / sd_n), 3),
            "dprime": round(float((t.mean() - n.mean()) / pooled), 3),
            "tumor": [round(float(v), 5) for v in t], "normal": [round(float(v), 5) for v in n]}


def prepare(work: Path) -> tuple[dict[str, dict], np.ndarray, str]:
    """Slides, stores, model and scores (reused when already in ``work``)."""
    slides = {}
    train_path = work / "train" / "normal_301.tif"
    if not train_path.exists():
        synthesize_slide(train_path, width_px=SIZE_PX, seed=301, tumor=False)
    for seed, stain, pen in NORMAL:
        path = work / "slides" / f"normal_{seed}.tif"
        if not path.exists():
            synthesize_slide(path, width_px=SIZE_PX, seed=seed, tumor=False, stain=stain, pen_marks=pen)
        slides[path.stem] = {"path": path, "tumor": False, "stain": stain, "pen_marks": pen, "lesions_mm": []}
    for seed, stain, sizes in TUMOR:
        path = work / "slides" / f"tumor_{seed}.tif"
        if not path.exists():
            synthesize_slide(path, width_px=SIZE_PX, seed=seed, lesion_sizes_mm=sizes, stain=stain)
        slides[path.stem] = {"path": path, "tumor": True, "stain": stain, "pen_marks": False, "lesions_mm": sizes}
    quiet = {"echo": lambda *a: None}
    process_paths([train_path], work / "train_stores", PreprocessConfig(), **quiet)
    process_paths([s["path"] for s in slides.values()], work / "stores", PreprocessConfig(), **quiet)
    ckpt = work / "model.pt"
    if not ckpt.exists():
        train([work / "train_stores"], ckpt, Config.from_yaml(SMALL_MODEL_CONFIG), progress=False, **quiet)
    scorer = load_scorer(ckpt)
    train_scores = score_store(work / "train_stores" / "normal_301.zarr", scorer)
    for slide_id, info in slides.items():
        store = SlideStore.open(work / "stores" / f"{slide_id}.zarr", mode="r+")
        stage = f"scores/{scorer.model_id}"
        digest = config_hash({"model": scorer.model_id, "bench": "reducers"})
        if not store.is_complete(stage, digest):
            scores = score_store(store, scorer)
            with store.write_stage(stage, digest, n_tiles=len(scores)) as group:
                group.create_array("scores", data=scores)
        info["store"] = store
    return slides, train_scores, scorer.model_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="keep slides/stores/model here (reused)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "slide_reducers.json")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-reducers-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        slides, train_scores, model_id = prepare(work)
        prepared_s = time.perf_counter() - started
        heatmaps = {}
        for slide_id, info in slides.items():
            store = info["store"]
            tiles = store.require("tiles")
            geometry = tiles.attrs["geometry"]
            scores = np.asarray(store.require(f"scores/{model_id}")["scores"][:])
            values = tile_grid(tiles["grid"][:], scores, tuple(geometry["grid_shape"]))
            um = (geometry["stride0"][0] * store.root.attrs["mpp_x"], geometry["stride0"][1] * store.root.attrs["mpp_y"])
            heatmaps[slide_id] = {None: values, 100.0: smooth_heatmap(values, 100.0, um)}
            info["n_tiles"] = int(len(scores))
        thresholds = {f"p{p}": float(np.percentile(train_scores, p)) for p in (99, 99.5)}
        candidates = [("max", {})]
        candidates += [("topk_mean", {"k": k}) for k in (3, 5, 10, 25, 50)]
        candidates += [("percentile", {"q": q}) for q in (95.0, 99.0, 99.5)]
        candidates += [("fraction_above", {"threshold": t, "calibration": name}) for name, t in thresholds.items()]
        results = []
        for edge_cells in (0, 1, 2):
            for smoothing in (None, 100.0):
                for reducer, params in candidates:
                    kwargs = {key: v for key, v in params.items() if key != "calibration"}
                    kwargs["edge_cells"] = edge_cells
                    scores = {s: heatmap_slide_score(heatmaps[s][smoothing], reducer, **kwargs) for s in slides}
                    tumor = [v for s, v in scores.items() if slides[s]["tumor"]]
                    normal = [v for s, v in scores.items() if not slides[s]["tumor"]]
                    results.append({"reducer": reducer, "params": params, "edge_cells": edge_cells,
                                    "smoothing_um": smoothing, **separation(tumor, normal)})
        ranked = sorted(results, key=lambda r: (r["auc"], r["gap_std"], r["dprime"]), reverse=True)
        threshold_free = [r for r in ranked if r["reducer"] != "fraction_above"]
        report = {
            "benchmark": "slide_reducers",
            "what": "separation of tumour vs normal synthetic slides by each slide-level reducer",
            "slides": {s: {k: v for k, v in info.items() if k not in ("store", "path")} for s, info in slides.items()},
            "size_px": SIZE_PX,
            "model": {"id": model_id, "config": str(SMALL_MODEL_CONFIG.relative_to(REPO)),
                  "trained_on": "one normal slide (seed 301)"},
            "train_tile_score_percentiles": {k: round(v, 5) for k, v in thresholds.items()},
            "results": results,
            "best_overall": ranked[0],
            "best_threshold_free": threshold_free[0],
            "ranking": [f"{r['reducer']} {r['params']} edge_cells={r['edge_cells']} smoothing_um={r['smoothing_um']}: "
                        f"auc {r['auc']}, gap_std {r['gap_std']}, dprime {r['dprime']}" for r in ranked],
            "seconds": round(time.perf_counter() - started, 1),
            "prepare_seconds": round(prepared_s, 1),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                        "load_avg": [round(v, 2) for v in os.getloadavg()],
                        "date": datetime.datetime.now().isoformat(timespec="seconds")},
        }
        for info in slides.values():
            info.pop("store", None)
    text = json.dumps(report, indent=2)
    write_text_atomic(args.out, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
