"""Benchmark: which feature statistics separate tumour from normal tiles better in the DPA's perceptual
loss, the fixed ImageNet ones of the official code (``feature_stats: imagenet``, the paper setting) or
statistics measured on the normal training tiles (``feature_stats: train``).

Usage::

    python benchmarks/bench_feature_stats.py [--backbone-weights vgg19-dcbb9e9d.pth] [--iterations 400]
        [--seeds 0,1,2] [--batch-size 32] [--work DIR] [--out benchmarks/results/feature_stats_<device>.json]

Synthesizes three slides (8192 px at 0.243 µm/px): a normal training slide, a held-out normal slide and a
tumour slide with one 0.8 mm lesion; tiles them (64 px at 10x, stain-normalized). For each setting and
seed it trains the paper's DPA (residual18, VGG-19 relu4_2, lr 1e-3) on the training slide with a flat
schedule of ``--iterations`` iterations (the only change from the paper: far shorter than its 34,666), and
reports two tile ROC AUCs (tumour = tiles wholly inside the lesion):

* ``auc_vs_heldout_normal``: tumour tiles vs every tile of the held-out normal slide;
* ``auc_vs_same_slide``: tumour tiles vs the tumour slide's tiles that touch no lesion.

Medians over the seeds are quoted. Needs the VGG-19 ImageNet weights (torch hub cache or
``--backbone-weights``; nothing is downloaded): without them it says so and writes nothing. On 2 CPU cores
one run of 400 iterations takes several minutes; on a GPU, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.process import process_paths  # noqa: E402
from wsi_ad.annotations import write_asap_xml  # noqa: E402
from wsi_ad.atomic import write_text_atomic  # noqa: E402
from wsi_ad.config import Config  # noqa: E402
from wsi_ad.detectors.loop import train  # noqa: E402
from wsi_ad.detectors.scorer import load_scorer, score_store  # noqa: E402
from wsi_ad.features.backbones import BackboneError, backbone_spec, resolve_weights  # noqa: E402
from wsi_ad.metrics import roc_auc, tile_labels  # noqa: E402
from wsi_ad.preprocess import PreprocessConfig  # noqa: E402
from wsi_ad.store import SlideStore  # noqa: E402
from wsi_ad.synth import synthesize_slide  # noqa: E402


def prepare(work: Path) -> dict:
    """The three tiled slides (reused when ``work`` already holds them)."""
    quiet = {"echo": lambda *a: None}
    paths = {"train": work / "train" / "normal_201.zarr", "normal": work / "test" / "normal_202.zarr",
             "tumor": work / "test" / "tumor_203.zarr"}
    tumor = synthesize_slide(work / "slides" / "tumor_203.tif", width_px=8192, seed=203, tumor=True,
                             lesion_sizes_mm=[0.8]) if not paths["tumor"].exists() else None
    if tumor is not None:
        write_asap_xml(work / "slides" / "tumor_203.xml", tumor.annotations)
        train_slide = synthesize_slide(work / "slides" / "normal_201.tif", width_px=8192, seed=201, tumor=False)
        normal = synthesize_slide(work / "slides" / "normal_202.tif", width_px=8192, seed=202, tumor=False)
        process_paths([train_slide.path], work / "train", PreprocessConfig(), **quiet)
        process_paths([normal.path, tumor.path], work / "test", PreprocessConfig(), **quiet)
    return paths


def evaluate(checkpoint: Path, paths: dict, xml: Path) -> dict:
    from wsi_ad.annotations import read_asap_xml

    scorer = load_scorer(checkpoint)
    tumor_store = SlideStore.open(paths["tumor"])
    tiles = tumor_store.require("tiles")
    labels = tile_labels(np.asarray(tiles["coords"][:]), tuple(tiles.attrs["geometry"]["tile0"]), read_asap_xml(xml))
    tumor_scores = score_store(tumor_store, scorer)
    normal_scores = score_store(paths["normal"], scorer)
    inside, outside = tumor_scores[labels == 1], tumor_scores[labels == 0]
    both = lambda neg, pos: roc_auc(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])  # noqa: E731
    return {"auc_vs_heldout_normal": round(both(normal_scores, inside), 4), "auc_vs_same_slide": round(both(outside, inside), 4),
            "n_tumor_tiles": int(len(inside)), "n_heldout_normal_tiles": int(len(normal_scores)),
            "n_same_slide_normal_tiles": int(len(outside))}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone-weights", type=Path, help="VGG-19 ImageNet weights (default: the torch hub cache)")
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work", type=Path, help="keep slides, stores and checkpoints here (reused by a re-run)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    try:
        weights = resolve_weights(backbone_spec("vgg19"), args.backbone_weights)
    except BackboneError as exc:
        print(f"not measured: {exc}", file=sys.stderr)
        return 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_feature_stats_") as tmp:
        work = args.work or Path(tmp)
        paths = prepare(work)
        runs: dict[str, list[dict]] = {"imagenet": [], "train": []}
        for setting in runs:
            for seed in seeds:
                config = Config.from_dict({"detector": "dpa", "dpa": {
                    "feature_stats": setting, "progressive": False, "flat_iterations": args.iterations,
                    "backbone_weights": str(weights)}, "train": {"batch_size": args.batch_size, "seed": seed}})
                checkpoint = work / "models" / f"{setting}_seed{seed}.pt"
                t0 = time.perf_counter()
                train([paths["train"]], checkpoint, config, progress=False, echo=lambda *a: None)
                record = {"seed": seed, "train_seconds": round(time.perf_counter() - t0, 1),
                          **evaluate(checkpoint, paths, work / "slides" / "tumor_203.xml")}
                runs[setting].append(record)
                print(setting, json.dumps(record), file=sys.stderr, flush=True)
    summary = {setting: {key: statistics.median(r[key] for r in records)
                         for key in ("auc_vs_heldout_normal", "auc_vs_same_slide")} for setting, records in runs.items()}
    results = {
        "benchmark": "DPA feature statistics: ImageNet (official code) vs measured on the training tiles",
        "device": device, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "iterations": args.iterations, "batch_size": args.batch_size, "seeds": seeds,
        "config": "paper DPA (residual18, vgg19 relu4_2, lr 1e-3), flat schedule of `iterations` iterations",
        "median_over_seeds": summary, "runs": runs, "seconds": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(results, indent=2)
    print(text)
    write_text_atomic(args.out or REPO / "benchmarks" / "results" / f"feature_stats_{device}.json", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
