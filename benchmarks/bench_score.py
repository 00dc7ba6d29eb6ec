"""Scoring throughput of the store-level scoring stage (:func:`wsi_ad.scoring.run_score_stage`): tiles/s at
several batch sizes (medians of --repeat runs), the share of time spent waiting for tiles from zarr vs
computing, and float32 vs bf16 autocast (tiles/s and the Spearman rank correlation of their scores).
Prints JSON and writes benchmarks/results/score_<device>.json.

Models: the demo-like small model (``--model CKPT``, e.g. a checkpoint trained with configs/demo_cpu.yaml;
without it, that configuration with untrained autoencoder weights: the speed does not depend on the
weights, the bf16 ranking check is then on an untrained model), and the paper's vgg19 model (untrained
autoencoder, feature statistics measured on the tiles) only when the vgg19 ImageNet weights are on disk.
On cuda (when present): the same, plus pinned vs pageable host memory.

    .venv/bin/python benchmarks/bench_score.py [--tiles 512] [--repeat 3] [--store STORE.zarr] [--model CKPT]

Without ``--store`` a synthetic tumour slide is made and tiled first (about a minute on 2 cores). The
benchmark store holds ``--tiles`` tiles: the source store's tiles repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from wsi_ad.config import Config
from wsi_ad.detectors import build
from wsi_ad.detectors.scorer import Scorer, load_scorer
from wsi_ad.features.backbones import BackboneError, backbone_spec, resolve_weights
from wsi_ad.scoring import run_score_stage, score_stage_name
from wsi_ad.store import SlideStore

ROOT = Path(__file__).resolve().parents[1]


def make_source_store(workdir: Path) -> Path:
    from pipelines.process import process_paths
    from wsi_ad.preprocess import PreprocessConfig
    from wsi_ad.synth import synthesize_slide

    slide = synthesize_slide(workdir / "slides" / "tumor_103.tif", width_px=8192, seed=103, tumor=True,
                             lesion_sizes_mm=[0.8, 0.4])
    process_paths([slide.path], workdir / "stores", PreprocessConfig(), echo=lambda *a: None)
    return workdir / "stores" / "tumor_103.zarr"


def make_bench_store(source: Path, workdir: Path, n_tiles: int, magnification: str = "10x",
                     source_codecs: bool = False) -> SlideStore:
    """A copy of ``source`` whose tiles stage holds ``n_tiles`` tiles (its own, repeated), in chunks of 64 tiles
    compressed with zarr's default codec (zstd), or with ``source_codecs`` those of the source's tile array (the
    pipeline's stores: uncompressed by default), so that reading them costs what it costs in the pipeline."""
    target = workdir / "bench.zarr"
    shutil.copytree(source, target)
    store = SlideStore.open(target, mode="r+")
    source_array = store.require("tiles")[magnification]
    codecs = ({"compressors": source_array.compressors, "serializer": source_array.serializer,
               "filters": source_array.filters} if source_codecs else {})
    tiles = np.asarray(source_array[:])
    index = np.arange(n_tiles) % len(tiles)
    coords = np.asarray(store.root["tiles/coords"][:])[index]
    with store.write_stage("tiles", f"bench-{n_tiles}", n_tiles=n_tiles) as group:
        group.create_array("coords", data=coords)
        group.create_array("grid", data=np.asarray(store.root["tiles/grid"][:])[index])
        group.create_array("tissue_fraction", data=np.ones(n_tiles, np.float32))
        array = group.create_array(magnification, data=tiles[index], chunks=(64, *tiles.shape[1:]), **codecs)
        array.attrs.update(dict(store.root[f"tiles/{magnification}"].attrs))
    return store


def untrained_scorer(config: Config, tiles: np.ndarray, device: torch.device) -> Scorer:
    """A Scorer of ``config``'s detector with seeded, untrained weights, fitted on ``tiles`` (its feature
    statistics, when measured; timing does not depend on the weights)."""
    torch.manual_seed(0)
    detector = build(config, "cpu")
    with torch.no_grad():
        detector.fit(types.SimpleNamespace(sample=lambda n: tiles[:n]))
    payload = {"detector": config.detector, "config": config.to_dict(), "state": detector.state_dict()}
    return Scorer(payload, device=device)


def timed_run(store: SlideStore, scorer: Scorer, batch_size: int, pin_memory: bool | None = None):
    stage = score_stage_name(scorer.model_id)
    store.invalidate(stage)
    shutil.rmtree(store.path / stage, ignore_errors=True)
    scores, computed = run_score_stage(store, scorer, batch_size=batch_size, pin_memory=pin_memory)
    assert computed
    return scores, store.stages[stage]


def bench_model(name: str, store: SlideStore, scorer: Scorer, batch_sizes: list[int], repeat: int) -> dict:
    n = store.stages["tiles"]["n_tiles"]
    timed_run(store, scorer, batch_sizes[0])                        # warm-up (allocator, oneDNN kernels)
    per_batch = {}
    for bs in batch_sizes:
        runs = [timed_run(store, scorer, bs)[1] for _ in range(repeat)]
        waits = [r["data_wait_s"] / max(r["data_wait_s"] + r["compute_s"], 1e-9) for r in runs]
        per_batch[str(bs)] = {
            "tiles_per_s_median": round(statistics.median(r["tiles_per_s"] for r in runs), 1),
            "tiles_per_s_runs": [r["tiles_per_s"] for r in runs],
            "seconds_median": round(statistics.median(r["seconds"] for r in runs), 3),
            "data_wait_share_median": round(statistics.median(waits), 4),
            "compute_s_median": round(statistics.median(r["compute_s"] for r in runs), 3),
            "data_wait_s_median": round(statistics.median(r["data_wait_s"] for r in runs), 4),
        }
    result = {"model": name, "model_id": scorer.model_id, "n_tiles": n, "map_shape": list(scorer.map_shape),
              "batch_sizes": per_batch}
    result["precision"] = compare_precision(store, scorer, max(batch_sizes), repeat)
    if scorer.device.type == "cuda":
        result["pinned_memory"] = {
            str(pin): round(statistics.median(timed_run(store, scorer, max(batch_sizes), pin)[1]["tiles_per_s"]
                                              for _ in range(repeat)), 1)
            for pin in (True, False)}
    return result


def compare_precision(store: SlideStore, scorer: Scorer, batch_size: int, repeat: int) -> dict:
    from scipy.stats import pearsonr, spearmanr

    default = scorer.precision
    out: dict = {"batch_size": batch_size}
    scores = {}
    for precision in ("fp32", "bf16"):
        scorer.set_precision(precision)
        runs = [timed_run(store, scorer, batch_size) for _ in range(max(1, min(repeat, 2)))]
        scores[precision] = runs[0][0]
        out[f"{precision}_tiles_per_s_median"] = round(statistics.median(m["tiles_per_s"] for _, m in runs), 1)
    scorer.set_precision(default)
    a, b = scores["fp32"].astype(np.float64), scores["bf16"].astype(np.float64)
    out["spearman_bf16_vs_fp32"] = round(float(spearmanr(a, b).statistic), 5)
    out["pearson_bf16_vs_fp32"] = round(float(pearsonr(a, b).statistic), 5)
    out["max_relative_difference"] = round(float(np.max(np.abs(b - a) / np.maximum(np.abs(a), 1e-12))), 5)
    out["median_relative_difference"] = round(float(np.median(np.abs(b - a) / np.maximum(np.abs(a), 1e-12))), 5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", type=int, default=512, help="tiles in the benchmark store")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per setting (medians reported)")
    parser.add_argument("--batch-sizes", default="64,128,256")
    parser.add_argument("--store", type=Path, help="slide store whose 10x tiles to use (default: a synthetic one)")
    parser.add_argument("--model", type=Path, help="demo-like checkpoint (default: configs/demo_cpu.yaml untrained)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/score_<device>.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    started = time.perf_counter()
    results: dict = {
        "device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "n_tiles": args.tiles, "repeat": args.repeat,
        "note": "tiles/s of run_score_stage over a store (zarr read in a prefetch thread + model); "
                "data_wait_share = time blocked waiting for the next batch / (that + compute); "
                "the CPU is shared with other jobs, see loadavg",
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_score_") as tmp:
        workdir = Path(tmp)
        source = args.store or make_source_store(workdir / "src")
        store = make_bench_store(source, workdir, args.tiles)
        tiles = np.asarray(store.root["tiles/10x"][:256])
        if args.model:
            demo = load_scorer(args.model, device=device)
            demo_name = f"demo-like checkpoint {args.model.name} (trained)"
        else:
            demo = untrained_scorer(Config.from_yaml(ROOT / "configs" / "demo_cpu.yaml"), tiles, device)
            demo_name = "configs/demo_cpu.yaml (untrained autoencoder)"
        results["models"]["demo"] = bench_model(demo_name, store, demo, batch_sizes, args.repeat)
        try:
            resolve_weights(backbone_spec("vgg19"))
        except BackboneError as exc:
            results["models"]["vgg19_paper"] = {"skipped": "no weights", "reason": str(exc)}
        else:
            paper = untrained_scorer(Config(), tiles, device)     # Config(): the paper's Camelyon16 setting
            results["models"]["vgg19_paper"] = bench_model("paper vgg19 (untrained autoencoder)", store, paper,
                                                           batch_sizes, args.repeat)
    results["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    results["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(results, indent=2)
    print(text)
    out = args.out or ROOT / "benchmarks" / "results" / f"score_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
