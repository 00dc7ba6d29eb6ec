"""Diagnosis: why the DPA's CPU setting ranks real Camelyon16 tumour tiles below normal ones, and what changes it.

Usage::

    python benchmarks/diag_dpa_real.py [--data ../shared/data/patches/camelyon16_l0_256] [--work DIR]
        [--variants demo_cpu,block4,...] [--select] [--out benchmarks/results/dpa_real_diagnosis.json]

On the real patches laid out by ``benchmarks/bench_real_patches.py`` (same ``--work``, same test tiles: 499 normal,
the tumour tiles of every tumour slide but the selection slides), trains ``configs/demo_cpu.yaml`` and one change of
it per variant (:data:`VARIANTS`: feature layer, magnification, iterations, training tiles, stain normalisation),
then splits each model's score, the relative perceptual L1 ``mean|f(x) - f(x̃)| / mean|f(x)|`` (features
standardised with the training tiles' statistics), into its numerator and denominator and reports, for each, the
median on tumour and on normal tiles and the tile ROC AUC it would have alone (tumour = positive), beside the pixel L1
of the same reconstructions. An AUC below 0.5 is an inversion: tumour scored as MORE normal.

Writes ``--out`` (JSON) and the table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_real_patches import DEFAULT_DATA, FILE_SLIDE, PATCH_MPP, _config, layout, run_row  # noqa: E402

from wsi_ad.atomic import write_text_atomic  # noqa: E402
from wsi_ad.metrics import roc_auc  # noqa: E402
from wsi_ad.tuning import apply_params  # noqa: E402

BASE = REPO / "configs" / "demo_cpu.yaml"
#: name -> (config changes of demo_cpu.yaml as ``section.key``, data kind, training tiles per slide or None).
VARIANTS = {
    "demo_cpu": ({}, "norm", None),
    "raw": ({}, "raw", None),
    "block4": ({"dpa.layers": {64: "block4"}}, "norm", None),
    "block10": ({"dpa.layers": {64: "block10"}}, "norm", None),
    "20x": ({"data.magnification": "20x"}, "norm", None),
    "40x": ({"data.magnification": "40x"}, "norm", None),
    "iter1600": ({"dpa.flat_iterations": 1600}, "norm", None),
    "train100": ({}, "norm", 20),
}


def _subset(root: Path, per_slide: int) -> Path:
    """``root`` with ``train/good`` cut to the first ``per_slide`` patches of each slide (links), same test."""
    out = root.parent / f"{root.name}-train{per_slide}"
    taken: dict[str, int] = {}
    for path in sorted((root / "train" / "good").iterdir()):
        slide = FILE_SLIDE.match(path.name).group(1)
        if taken.get(slide, 0) < per_slide:
            taken[slide] = taken.get(slide, 0) + 1
            dst = out / "train" / "good" / path.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.symlink(os.readlink(path), dst)
    for split in ("good", "tumor"):
        dst = out / "test" / split
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((root / "test" / split).resolve(), dst)
    return out


@torch.no_grad()
def score_parts(model: Path, test: Path) -> dict:
    """Per test tile: numerator, denominator and ratio of the relative perceptual L1, and the pixel L1."""
    from wsi_ad.detectors.scorer import load_scorer
    from wsi_ad.features.perceptual import relative_l1
    from wsi_ad.scoring import _CenterCrop, find_image_tiles
    from wsi_ad.slide import magnification_to_mpp
    from wsi_ad.tile_pool import ImageFolderSource, to_tensor

    scorer = load_scorer(model, device="cpu")
    detector = scorer.detector
    files = find_image_tiles([test / "good", test / "tumor"])   # (folders may be links: rglob does not follow them)
    source = ImageFolderSource(files, scorer.image_size, PATCH_MPP / magnification_to_mpp(scorer.magnification))
    tiles = to_tensor(source.read(0, len(files), _CenterCrop()))
    parts = {"numerator": [], "denominator": [], "ratio": [], "pixel_l1": []}
    for start in range(0, len(files), 128):
        x = tiles[start:start + 128]
        recon = detector.autoencoder(x, detector.section.image_size, 1.0)
        target, rec = detector.perceptual.features(x), detector.perceptual.features(recon)
        dims = (1, 2, 3)
        parts["numerator"].append((target - rec).abs().mean(dim=dims))
        parts["denominator"].append(target.abs().mean(dim=dims))
        parts["ratio"].append(relative_l1(target, rec))
        parts["pixel_l1"].append((x - recon).abs().mean(dim=dims))
    labels = np.array([0 if f.parent.name == "good" else 1 for f in files])
    out = {}
    for key, values in parts.items():
        v = torch.cat(values).numpy()
        out[key] = {"auc": round(roc_auc(labels, v), 4), "median_tumor": float(np.median(v[labels == 1])),
                    "median_normal": float(np.median(v[labels == 0]))}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsi-ad-bench-real"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--select", action="store_true",
                        help="on the selection set instead (bench_real_patches.py --select): the variants ranked by the "
                             "weakly-supervised protocol")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dpa_real_diagnosis.json")
    args = parser.parse_args(argv)
    unknown = [name for name in filter(None, args.variants.split(",")) if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if not (args.data / "labels.csv").is_file():
        print(f"{args.data}: the real patches are missing (labels.csv not found)", file=sys.stderr)
        return 2
    labels = layout(args.data, args.work)
    rows = []
    for name in filter(None, args.variants.split(",")):
        changes, kind, per_slide = VARIANTS[name]
        root = args.work / "data" / kind / ("select" if args.select else "")
        if per_slide:
            root = _subset(root, per_slide)
        config = apply_params(_config(BASE, "cfg"), changes)
        record = run_row(f"dpa-{name}", config, f"diag-{kind}", root, args.work / ("select" if args.select else ""), 0,
                         labels, print, source=str(BASE))
        record["changes"] = changes
        record["parts"] = score_parts(Path(record["run"]) / "model.pt", root / "test")
        print("   " + ", ".join(f"{k} AUC {v['auc']:.3f} (median tumour {v['median_tumor']:.3g}, normal "
                                  f"{v['median_normal']:.3g})" for k, v in record["parts"].items()))
        rows.append(record)
    report = {"benchmark": "diag_dpa_real" + (" --select" if args.select else ""),
              "date": datetime.date.today().isoformat(), "base": str(BASE),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads()},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=2, default=str))
    lines = ["| variant | score AUC | numerator AUC | denominator AUC | pixel L1 AUC | numerator median T / N | "
             "denominator median T / N |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["parts"]
        lines.append(f"| {r['row']} | {r['auc_all']:.3f} | {p['numerator']['auc']:.3f} | {p['denominator']['auc']:.3f}"
                     f" | {p['pixel_l1']['auc']:.3f} | {p['numerator']['median_tumor']:.3g} / "
                     f"{p['numerator']['median_normal']:.3g} | {p['denominator']['median_tumor']:.3g} / "
                     f"{p['denominator']['median_normal']:.3g} |")
    write_text_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
