"""Benchmark: IGD's robustness claim on tiles — detectors trained on normal tiles contaminated with known tumour
tiles, side by side.

Usage::

    python benchmarks/bench_contamination.py [--work DIR] [--out benchmarks/results/contamination_cpu.json]
        [--config NAME=CONFIG.yaml ...] [--fractions 0 0.05 0.10] [--seeds 0 1 2]

The data of ``bench_detectors.py`` (2 normal training slides; a test set of 2 normal and 3 tumour slides, 8192 px
at 0.243 µm/px, both stain "hospitals", 64 px tiles at 10x, stain-normalized) plus 2 annotated tumour training
slides (lesions of 1.0 and 0.8 mm, never tested on) whose tiles inside a lesion are the contamination pool. For
every fraction f, detector config and seed, the detector is trained on the normal training tiles with f of the
training pool made of tumour tiles drawn from that pool (``data.contaminate`` = f,
:func:`wsi_ad.tile_pool.contamination_sources`; the same draw for every detector at a given seed), then the
tile-level ROC AUC on the test slides is computed (tumour tiles inside a lesion vs every tile of the normal test
slides). Reported per detector and fraction: AUC per seed, their median, training seconds, and the drop of the
median from the uncontaminated one. Prints JSON and writes it to ``--out``. Default configs: the DPA's
``configs/demo_cpu.yaml`` and IGD's ``configs/igd_cpu.yaml``. Chen et al. (AAAI 2022, Table 7) report IGD's mean
AUC at 1/5/10 % contamination: CIFAR-10 0.825/0.819/0.812, MVTec AD 0.936/0.932/0.936.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_detectors import SIZE_PX, TEST_NORMAL, TEST_TUMOR, TRAIN, evaluate, make_data, named_configs, write_report  # noqa: E402

from pipelines.process import process_paths  # noqa: E402
from wsi_ad.annotations import write_asap_xml  # noqa: E402
from wsi_ad.config import Config  # noqa: E402
from wsi_ad.detectors import get  # noqa: E402
from wsi_ad.detectors.loop import train  # noqa: E402
from wsi_ad.preprocess import PreprocessConfig  # noqa: E402
from wsi_ad.synth import synthesize_slide  # noqa: E402

#: Annotated tumour training slides: the contamination pool (seed, stain, lesion diameters in mm).
TRAIN_TUMOR = [(431, "A", [1.0]), (432, "B", [0.8])]
DEFAULT_CONFIGS = {"dpa": REPO / "configs" / "demo_cpu.yaml", "igd": REPO / "configs" / "igd_cpu.yaml"}


def make_contamination_pool(work: Path) -> tuple[list[Path], Path]:
    """The tumour training stores and their annotation folder (made once, reused)."""
    slides = []
    for seed, stain, lesions in TRAIN_TUMOR:
        path = work / "train_tumor" / f"tumor_{seed}.tif"
        if not path.exists():
            s = synthesize_slide(path, width_px=SIZE_PX, seed=seed, tumor=True, lesion_sizes_mm=lesions, stain=stain)
            write_asap_xml(path.with_suffix(".xml"), s.annotations)
        slides.append(path)
    process_paths(slides, work / "train_tumor_stores", PreprocessConfig(), echo=lambda *a: None)
    return [work / "train_tumor_stores" / f"{p.stem}.zarr" for p in slides], work / "train_tumor"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="keep slides, stores and models here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "contamination_cpu.json")
    parser.add_argument("--config", action="append", metavar="NAME=YAML",
                        help="a detector config to compare (repeatable; default: dpa and igd CPU settings)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.05, 0.10],
                        help="tumour fractions of the training pool (default: 0 0.05 0.10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    args = parser.parse_args()
    configs = named_configs(args.config, DEFAULT_CONFIGS)
    with tempfile.TemporaryDirectory() as temp:
        work = args.work or Path(temp)
        started = time.perf_counter()
        data = make_data(work)
        tumor_stores, annotations = make_contamination_pool(work)
        prepare_s = time.perf_counter() - started
        detectors: dict[str, dict] = {}
        metrics: dict = {}
        for name, path in configs.items():
            base = Config.from_yaml(path).to_dict()
            by_fraction = {}
            for fraction in args.fractions:
                runs = []
                for seed in args.seeds:
                    config = Config.from_dict({**base, "data": {**base["data"], "contaminate": fraction},
                                               "train": {**base["train"], "seed": seed}})
                    model = work / "models" / f"{name}_c{fraction:g}_seed{seed}.pt"
                    model.parent.mkdir(parents=True, exist_ok=True)
                    t0 = time.perf_counter()
                    result = train(data["train"], model, config, progress=False, echo=lambda *a: None, overwrite=True,
                                   contaminate_from=tumor_stores if fraction > 0 else None,
                                   annotations=annotations if fraction > 0 else None)
                    seconds = time.perf_counter() - t0
                    record = result.contamination or {}
                    metrics = evaluate(model, data)
                    runs.append({"seed": seed, "tile_auc": round(metrics["auc"], 4), "train_seconds": round(seconds, 1),
                                 "tumor_tiles_in_training": record.get("tumor_tiles", 0),
                                 "normal_tiles_in_training": record.get("normal_tiles")})
                    print(f"{name} contamination {fraction:g} seed {seed}: tile AUC {metrics['auc']:.4f}, "
                          f"trained in {seconds:.0f} s", file=sys.stderr)
                by_fraction[f"{fraction:g}"] = {
                    "runs": runs, "tile_auc_median": statistics.median(r["tile_auc"] for r in runs),
                    "train_seconds_median": round(statistics.median(r["train_seconds"] for r in runs), 1)}
            clean = by_fraction.get("0", {}).get("tile_auc_median")
            for entry in by_fraction.values():
                entry["median_change_from_clean"] = None if clean is None else round(entry["tile_auc_median"] - clean, 4)
            detector = get(base["detector"])
            detectors[name] = {"detector": base["detector"],
                               "config": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
                               "paper": detector.paper, "iterations": detector.num_steps_of(Config.from_dict(base)),
                               "contamination": by_fraction}
    report = {
        "benchmark": "bench_contamination",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "data": {"train_normal_slides": len(TRAIN), "train_tumor_slides_for_contamination": len(TRAIN_TUMOR),
                 "test_normal_slides": len(TEST_NORMAL), "test_tumor_slides": len(TEST_TUMOR), "slide_px": SIZE_PX,
                 "mpp": 0.243, "tiles": "64 px at 10x, stain-normalized",
                 "n_tumor_test_tiles": metrics.get("n_tumor_tiles"), "n_normal_test_tiles": metrics.get("n_normal_tiles"),
                 "protocol": "training pool = normal training tiles + the fraction's share of tumour tiles (inside a "
                             "lesion of the 2 annotated tumour training slides); tile ROC AUC: tumour tiles fully "
                             "inside a lesion vs every tile of the normal test slides"},
        "fractions": args.fractions, "seeds": args.seeds,
        "prepare_seconds": round(prepare_s, 1),
        "detectors": detectors,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
