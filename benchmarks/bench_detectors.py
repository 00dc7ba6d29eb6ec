"""Benchmark: detectors side by side on the same synthetic tiles, each with its CPU setting.

Usage::

    python benchmarks/bench_detectors.py [--work DIR] [--out benchmarks/results/detectors_cpu.json]
        [--config NAME=CONFIG.yaml ...] [--seeds 0 1 2]

Synthesizes 2 normal training slides and a test set of 2 normal and 3 tumour slides (8192 px at 0.243 µm/px,
both stain "hospitals", lesions 0.4-1.0 mm), tiles them (64 px at 10x, stain-normalized), then for every
detector config and seed: trains it on the normal training slides (timed, on this machine's CPU) and
computes the paper's tile-level ROC AUC on the test slides (:func:`wsi_ad.metrics.tile_auc`: tumour tiles
whose footprint lies inside a lesion vs every tile of the normal test slides). Every detector sees the same
tiles. Reported per detector: AUC per seed and their median, training seconds per seed and their median,
iterations, tiles seen. Prints JSON and writes it to ``--out``. Default configs: the DPA's
``configs/demo_cpu.yaml`` and PIAD's ``configs/piad_cpu.yaml``. With ``--work DIR`` the slides and stores are
kept and reused by a later run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.process import process_paths  # noqa: E402
from wsi_ad.annotations import read_asap_xml, write_asap_xml  # noqa: E402
from wsi_ad.atomic import write_text_atomic  # noqa: E402
from wsi_ad.config import Config  # noqa: E402
from wsi_ad.detectors import get  # noqa: E402
from wsi_ad.detectors.loop import train  # noqa: E402
from wsi_ad.detectors.scorer import load_scorer, score_store  # noqa: E402
from wsi_ad.metrics import tile_auc, tile_labels  # noqa: E402
from wsi_ad.preprocess import PreprocessConfig  # noqa: E402
from wsi_ad.store import SlideStore  # noqa: E402
from wsi_ad.synth import synthesize_slide  # noqa: E402

SIZE_PX = 8192
TRAIN = [(401, "A"), (402, "B")]
TEST_NORMAL = [(411, "A"), (412, "B")]
TEST_TUMOR = [(421, "A", [0.8, 0.4]), (422, "B", [1.0]), (423, "A", [0.5])]
DEFAULT_CONFIGS = {"dpa": REPO / "configs" / "demo_cpu.yaml", "piad": REPO / "configs" / "piad_cpu.yaml"}


def make_data(work: Path) -> dict:
    """Slides and stores (reused when present): {"train": [store], "normal": [store], "tumor": [(store, xml)]}."""
    def slide(folder: str, name: str, seed: int, stain: str, lesions=None):
        path = work / folder / f"{name}.tif"
        if not path.exists():
            s = synthesize_slide(path, width_px=SIZE_PX, seed=seed, tumor=bool(lesions), lesion_sizes_mm=lesions,
                                 stain=stain)
            if lesions:
                write_asap_xml(path.with_suffix(".xml"), s.annotations)
        return path

    train_slides = [slide("train", f"normal_{s}", s, st) for s, st in TRAIN]
    normal = [slide("test", f"normal_{s}", s, st) for s, st in TEST_NORMAL]
    tumor = [slide("test", f"tumor_{s}", s, st, lesions) for s, st, lesions in TEST_TUMOR]
    quiet = {"echo": lambda *a: None}
    process_paths(train_slides, work / "train_stores", PreprocessConfig(), **quiet)
    process_paths(normal + tumor, work / "test_stores", PreprocessConfig(), **quiet)
    return {"train": [work / "train_stores" / f"{p.stem}.zarr" for p in train_slides],
            "normal": [work / "test_stores" / f"{p.stem}.zarr" for p in normal],
            "tumor": [(work / "test_stores" / f"{p.stem}.zarr", p.with_suffix(".xml")) for p in tumor]}


def evaluate(model: Path, data: dict) -> dict:
    """Tile AUC of ``model`` on the test stores, with the tile counts."""
    scorer = load_scorer(model)
    normal = {p.stem: score_store(SlideStore.open(p), scorer) for p in data["normal"]}
    tumor = {}
    for path, xml in data["tumor"]:
        store = SlideStore.open(path)
        tiles = store.require("tiles")
        labels = tile_labels(np.asarray(tiles["coords"][:]), tuple(tiles.attrs["geometry"]["tile0"]), read_asap_xml(xml))
        tumor[path.stem] = (score_store(store, scorer), labels)
    return tile_auc(tumor, normal)


def named_configs(items: list[str] | None, defaults: dict[str, Path]) -> dict[str, Path]:
    """``--config NAME=YAML`` arguments as {name: path}; ``defaults`` when none were given."""
    if not items:
        return dict(defaults)
    return {name: Path(path) for name, path in (item.split("=", 1) for item in items)}


def write_report(report: dict, out: Path) -> None:
    """Print ``report`` as JSON and write it to ``out`` atomically."""
    text = json.dumps(report, indent=2)
    write_text_atomic(out, text + "\n")
    print(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="keep slides, stores and models here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "detectors_cpu.json")
    parser.add_argument("--config", action="append", metavar="NAME=YAML",
                        help="a detector config to compare (repeatable; default: dpa and piad CPU settings)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    args = parser.parse_args()
    configs = named_configs(args.config, DEFAULT_CONFIGS)
    with tempfile.TemporaryDirectory() as temp:
        work = args.work or Path(temp)
        started = time.perf_counter()
        data = make_data(work)
        prepare_s = time.perf_counter() - started
        detectors = {}
        for name, path in configs.items():
            base = Config.from_yaml(path)
            runs = []
            for seed in args.seeds:
                config = Config.from_dict({**base.to_dict(), "train": {**base.to_dict()["train"], "seed": seed}})
                model = work / "models" / f"{name}_seed{seed}.pt"
                model.parent.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                result = train(data["train"], model, config, progress=False, echo=lambda *a: None, overwrite=True)
                seconds = time.perf_counter() - t0
                metrics = evaluate(model, data)
                runs.append({"seed": seed, "tile_auc": round(metrics["auc"], 4), "train_seconds": round(seconds, 1),
                             "final_loss": result.final_loss})
                print(f"{name} seed {seed}: tile AUC {metrics['auc']:.4f}, trained in {seconds:.0f} s", file=sys.stderr)
            detector = get(base.detector)
            detectors[name] = {
                "detector": base.detector, "config": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
                "paper": detector.paper, "iterations": detector.num_steps_of(base),
                "batch_size": base.train.batch_size,
                "runs": runs,
                "tile_auc_median": statistics.median(r["tile_auc"] for r in runs),
                "train_seconds_median": round(statistics.median(r["train_seconds"] for r in runs), 1),
                "n_tumor_tiles": metrics["n_tumor_tiles"], "n_normal_tiles": metrics["n_normal_tiles"],
            }
    report = {
        "benchmark": "bench_detectors",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "data": {"train_slides": len(TRAIN), "test_normal_slides": len(TEST_NORMAL), "test_tumor_slides": len(TEST_TUMOR),
                 "slide_px": SIZE_PX, "mpp": 0.243, "tiles": "64 px at 10x, stain-normalized",
                 "protocol": "tile ROC AUC: tumour tiles fully inside a lesion vs every tile of the normal test slides"},
        "prepare_seconds": round(prepare_s, 1),
        "detectors": detectors,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
