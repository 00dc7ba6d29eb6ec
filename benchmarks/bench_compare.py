"""Benchmark: ``wsi-ad compare`` on synthetic slides, every registered detector's CPU setting and the DPA's CPU
ablations, 3 seeds, on this machine.

Usage::

    python benchmarks/bench_compare.py [--work DIR] [--seeds 3] [--rows dpa,knn,...]
        [--out benchmarks/results/compare_synthetic.json]

Builds a Camelyon16-like folder (``WORK/data``) from the slides of ``benchmarks/bench_detectors.py`` (8192 px at
0.243 µm/px, both stain "hospitals"): 2 normal training slides, 1 tumour training slide (0.8 mm lesion; only for
``--tune``), and 5 test slides, 2 normal and 3 tumour (lesions 0.8 + 0.4, 1.0 and 0.5 mm), with ASAP XML and
``reference.csv``; ``wsi-ad synth`` draws smaller lesions at this slide size, which leave too few tumour tiles for
the tile AUC. Then runs :func:`pipelines.compare.compare` into ``WORK/compare`` with one row per detector
(:data:`pipelines.compare.CONFIGS` ``cpu``) and one per ``configs/ablations/*_cpu.yaml``, and copies its
``compare.json`` / ``compare.md`` / ``roc.png`` to ``--out`` (and the same name with ``.md`` / ``.png``). A re-run
with the same ``--work`` reuses every finished model, so the final table comes from one compare run that may have
been resumed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.compare import CONFIGS, compare  # noqa: E402
from wsi_ad.annotations import write_asap_xml  # noqa: E402
from wsi_ad.atomic import write_text_atomic  # noqa: E402
from wsi_ad.synth import synthesize_slide  # noqa: E402

SIZE_PX = 8192
TRAIN_NORMAL = [(401, "A"), (402, "B")]
TRAIN_TUMOR = [(431, "B", [0.8])]
#: (seed, stain, lesion sizes in mm or None for a normal slide), in test-slide order.
TEST = [(411, "A", None), (421, "A", [0.8, 0.4]), (412, "B", None), (422, "B", [1.0]), (423, "A", [0.5])]


def make_dataset(root: Path) -> Path:
    """The Camelyon16-like folder (module docstring), reused when complete."""
    stamp = root / "dataset.json"
    recipe = {"size_px": SIZE_PX, "train_normal": TRAIN_NORMAL, "train_tumor": TRAIN_TUMOR, "test": TEST}
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(recipe)):
        return root
    shutil.rmtree(root, ignore_errors=True)
    for i, (seed, stain) in enumerate(TRAIN_NORMAL, start=1):
        synthesize_slide(root / "training/normal" / f"normal_{i:03d}.tif", width_px=SIZE_PX, seed=seed, tumor=False,
                         stain=stain)
    for i, (seed, stain, lesions) in enumerate(TRAIN_TUMOR, start=1):
        slide = synthesize_slide(root / "training/tumor" / f"tumor_{i:03d}.tif", width_px=SIZE_PX, seed=seed,
                                 lesion_sizes_mm=lesions, stain=stain)
        write_asap_xml(root / "training/lesion_annotations" / f"tumor_{i:03d}.xml", slide.annotations)
    rows = []
    for i, (seed, stain, lesions) in enumerate(TEST, start=1):
        slide = synthesize_slide(root / "testing/images" / f"test_{i:03d}.tif", width_px=SIZE_PX, seed=seed,
                                 tumor=bool(lesions), lesion_sizes_mm=lesions, stain=stain)
        if lesions:
            write_asap_xml(root / "testing/lesion_annotations" / f"test_{i:03d}.xml", slide.annotations)
            rows.append(f"Test_{i:03d},Tumor,IDC,{'Macro' if max(lesions) > 2 else 'Micro'}")
        else:
            rows.append(f"Test_{i:03d},Normal,,")
    write_text_atomic(root / "testing/reference.csv", "\n".join(rows) + "\n")
    write_text_atomic(stamp, json.dumps(recipe))
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsi-ad-bench-compare"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: every detector and ablation)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compare_synthetic.json")
    args = parser.parse_args()

    data = make_dataset(args.work / "data")
    rows = {name: REPO / "configs" / file for name, file in CONFIGS["cpu"].items()}
    rows.update({p.stem.removesuffix("_cpu"): p for p in sorted((REPO / "configs" / "ablations").glob("*_cpu.yaml"))})
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
        rows = {name: rows[name] for name in wanted}
    report = compare(data, args.work / "compare", rows, seeds=args.seeds, device="cpu")
    report["benchmark"] = "bench_compare"
    report["created"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    import torch

    report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                         "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    report["dataset"] = {"slide_px": SIZE_PX, "mpp": 0.243, "train_normal": len(TRAIN_NORMAL),
                         "test": [{"seed": s, "stain": st, "lesions_mm": les} for s, st, les in TEST]}
    for row in report["rows"]:                      # paths of this machine's work folder are not results
        for run in row["runs"]:
            run.pop("checkpoint", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=1, default=str))
    shutil.copyfile(args.work / "compare" / "compare.md", args.out.with_suffix(".md"))
    if (args.work / "compare" / "roc.png").is_file():
        shutil.copyfile(args.work / "compare" / "roc.png", args.out.with_suffix(".png"))
    print(json.dumps({row["name"]: row["summary"].get("tile_auc") for row in report["rows"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
