"""Benchmark: how far do the offline ImageNet features go on REAL Camelyon16 patches? (issue 18's ceiling check)

Usage::

    python benchmarks/bench_real_features.py [--data ../shared/data/patches/camelyon16_l0_256] [--work DIR]
        [--pixels norm] [--out benchmarks/results/real_features.json]

The shipped default detector (the feature kNN, ``configs/knn_cpu.yaml``) reaches a tile AUC of about 0.75 on the real
patches of :mod:`bench_real_patches` (same data layout, same selection and test split; that script prepares it in
``WORK`` and this one reuses it). This script asks whether any simple use of the same frozen EfficientNet-Lite0
ImageNet features (the only ImageNet weights this project ships offline) does much better, and whether more normal
training tiles would help:

1. **Pooled-feature sweep.** Every combination of input (10x = the patches resized to 64 px; 10x enlarged 2x to
   128 px; 20x = 128 px; 20x enlarged 2x; 40x = the native 256 px), feature (the global average of ``block2``,
   ``block4``, ``block7``, ``block10`` or of the classifier head's 1,280-d output) and score (distance to the nearest
   training tile, mean distance to the 5 nearest, Mahalanobis distance to a Gaussian with Ledoit-Wolf shrinkage,
   Rippel et al. 2020). Each candidate is fitted on ``select/train/good`` and ranked by its AUC on ``select/test``
   (the weakly-supervised protocol), and separately fitted on ``train/good`` and measured on ``test/``. Reported:
   the selection-picked candidate's test AUC (the honest figure) and, marked as such, the best test AUC of all
   candidates (an upper bound chosen on the test set, not a result).
2. **Learning curve** of the shipped kNN's patch features (block7 + block10 at 10x; exact nearest neighbour over
   every training patch, tile score = the largest patch distance, i.e. without the coreset and the re-weighting):
   random subsets of 50 to 500 training tiles (3 draws each, seeded), and the full set with its memory bank
   augmented by the 8 flips/rotations of every tile. With the full set, the 8 highest-scoring test normals and the
   8 lowest-scoring test tumours are saved side by side (``<out>_extremes.png``, top and bottom row, 128 px each):
   what the kNN gets wrong.

Writes ``--out`` (JSON) and a short table beside it (``.md``). CPU only; about 15 minutes on 2 cores.
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
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
from bench_real_patches import DEFAULT_DATA, layout  # noqa: E402

from wsi_ad.atomic import write_text_atomic  # noqa: E402
from wsi_ad.metrics import bootstrap_auc_ci, roc_auc  # noqa: E402

SETS = ("train/good", "test/good", "test/tumor", "select/train/good", "select/test/good", "select/test/tumor")
#: (name, resize the 256 px patch to this many px, then enlarge by this factor)
INPUTS = (("10x", 64, 1), ("10x-up2", 64, 2), ("20x", 128, 1), ("20x-up2", 128, 2), ("40x", 256, 1))
LAYERS = ("block2", "block4", "block7", "block10", "head")
SCORES = ("knn1", "knn5", "gaussian")


def load(folder: Path):
    """All images of ``folder`` as a (N, 3, 256, 256) float tensor in [-1, 1]."""
    import torch

    from wsi_ad.images import read_image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"{folder}: no images (run benchmarks/bench_real_patches.py --work on the same folder first)")
    x = torch.from_numpy(np.stack([read_image(p) for p in files])).permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1.0


def resize(x, px: int, up: int):
    import torch.nn.functional as F

    if px != x.shape[-1]:
        x = F.interpolate(x, size=(px, px), mode="area")
    if up > 1:
        x = F.interpolate(x, scale_factor=up, mode="bilinear", align_corners=False)
    return x


def pooled_features(images: dict, px: int, up: int) -> dict:
    """{set: {layer: (N, C) float64}}: every :data:`LAYERS` feature, globally averaged."""
    import torch

    from wsi_ad.features.backbones import build_embedding, build_multilayer

    blocks = build_multilayer("efficientnet_lite0", [layer for layer in LAYERS if layer != "head"])
    head = build_embedding("efficientnet_lite0")
    out = {}
    with torch.no_grad():
        for name, x in images.items():
            parts: dict[str, list] = {layer: [] for layer in LAYERS}
            for i in range(0, len(x), 64):
                batch = resize(x[i:i + 64], px, up)
                for layer, fmap in blocks(batch).items():
                    parts[layer].append(fmap.mean(dim=(2, 3)))
                parts["head"].append(head(batch))
            out[name] = {layer: torch.cat(v).double().numpy() for layer, v in parts.items()}
    return out


def scores(train: np.ndarray, test: np.ndarray, kind: str) -> np.ndarray:
    if kind == "gaussian":
        from sklearn.covariance import LedoitWolf

        return LedoitWolf().fit(train).mahalanobis(test)
    k = int(kind[3:])
    d = np.sqrt(np.maximum(((test ** 2).sum(1)[:, None] + (train ** 2).sum(1)[None] - 2 * test @ train.T), 0))
    return np.sort(d, axis=1)[:, :k].mean(1)


def auc_of(fit: np.ndarray, good: np.ndarray, tumor: np.ndarray, kind: str) -> tuple[float, np.ndarray, np.ndarray]:
    s = np.r_[scores(fit, good, kind), scores(fit, tumor, kind)]
    y = np.r_[np.zeros(len(good)), np.ones(len(tumor))]
    return roc_auc(y, s), y, s


def sweep(images: dict, echo) -> list[dict]:
    rows = []
    for name, px, up in INPUTS:
        feats = pooled_features(images, px, up)
        for layer in LAYERS:
            for kind in SCORES:
                f = {k: v[layer] for k, v in feats.items()}
                sel, _, _ = auc_of(f["select/train/good"], f["select/test/good"], f["select/test/tumor"], kind)
                test, y, s = auc_of(f["train/good"], f["test/good"], f["test/tumor"], kind)
                lo, hi = bootstrap_auc_ci(y, s, n_boot=1000, seed=0)
                rows.append({"input": name, "feature": layer, "score": kind, "selection_auc": round(sel, 4),
                             "test_auc": round(test, 4), "test_ci": [round(lo, 4), round(hi, 4)]})
                echo(f"{name:8s} {layer:8s} {kind:9s} selection {sel:.3f}  test {test:.3f}")
    return rows


def learning_curve(images: dict, echo, montage_path: Path) -> list[dict]:
    import torch

    from wsi_ad.config import Config
    from wsi_ad.detectors.knn.detector import FeatureKNN

    knn = FeatureKNN(Config.from_yaml(REPO / "configs" / "knn_cpu.yaml"))

    def patches(x):
        f = knn.features(resize(x, 64, 1))
        return f.reshape(len(x), -1, f.shape[-1])

    test_good, test_tumor = patches(images["test/good"]), patches(images["test/tumor"])
    y = np.r_[np.zeros(len(test_good)), np.ones(len(test_tumor))]

    def auc_scores(bank):
        return torch.cat([torch.cdist(t.reshape(-1, t.shape[-1]), bank).min(1).values.reshape(len(t), -1).max(1).values
                          for t in (test_good, test_tumor)]).numpy()

    def auc(bank):
        return roc_auc(y, auc_scores(bank))

    def extremes(images, s):
        # what the kNN gets wrong: its 8 highest-scoring test normals (top row), its 8 lowest-scoring tumours (bottom)
        from PIL import Image

        n = len(test_good)
        rows = [images["test/good"][np.argsort(-s[:n])[:8]], images["test/tumor"][np.argsort(s[n:])[:8]]]
        sheet = Image.new("RGB", (8 * 130, 2 * 130), "white")
        for r, tiles in enumerate(rows):
            for c, tile in enumerate(tiles):
                rgb = ((tile.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
                sheet.paste(Image.fromarray(rgb).resize((128, 128), Image.BILINEAR), (c * 130, r * 130))
        path = montage_path
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path.with_suffix(".tmp.png"))
        os.replace(path.with_suffix(".tmp.png"), path)
        echo(f"wrote {path}")

    train = images["train/good"]
    full = patches(train)
    extremes(images, auc_scores(full.reshape(-1, full.shape[-1])))
    rows, rng = [], np.random.default_rng(0)
    for n in (50, 100, 200, 300, 400, 500):
        draws = [rng.choice(len(train), n, replace=False) for _ in range(3 if n < len(train) else 1)]
        values = [auc(full[torch.from_numpy(idx)].reshape(-1, full.shape[-1])) for idx in draws]
        rows.append({"train_tiles": n, "test_auc_median": round(float(np.median(values)), 4),
                     "test_aucs": [round(v, 4) for v in values]})
        echo(f"kNN patch features, {n:3d} training tiles: test AUC median {np.median(values):.3f} {rows[-1]['test_aucs']}")
    views = [torch.rot90(train, k, (2, 3)) for k in range(4)]
    views += [torch.flip(v, (3,)) for v in views]
    bank = torch.cat([patches(v).reshape(-1, full.shape[-1]) for v in views])
    value = auc(bank)
    rows.append({"train_tiles": len(train), "bank": "8 flips/rotations of every tile", "test_auc_median": round(value, 4),
                 "test_aucs": [round(value, 4)]})
    echo(f"kNN patch features, {len(train)} tiles x 8 flips/rotations: test AUC {value:.3f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the real patches (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsi-ad-bench-real"),
                        help="work folder shared with bench_real_patches.py (default: %(default)s)")
    parser.add_argument("--pixels", choices=("raw", "norm", "normtrain"), default="norm",
                        help="raw or stain-normalised patches, as bench_real_patches' variants (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "real_features.json",
                        help="report JSON, a table beside it as .md (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (args.data / "labels.csv").is_file():
        print(f"{args.data}: the real patches are missing (labels.csv not found)", file=sys.stderr)
        return 2
    import torch

    layout(args.data, args.work)
    root = args.work / "data" / args.pixels
    images = {name: load(root / name) for name in SETS}
    print({name: len(x) for name, x in images.items()}, flush=True)
    echo = lambda line: print(line, flush=True)  # noqa: E731
    rows = sweep(images, echo)
    picked = max(rows, key=lambda r: (r["selection_auc"], -rows.index(r)))
    best = max(rows, key=lambda r: r["test_auc"])
    curve = learning_curve(images, echo, args.out.with_name(args.out.stem + "_extremes.png"))
    report = {
        "benchmark": "bench_real_features",
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "data": {"path": str(args.data), "pixels": args.pixels, "n": {name: len(x) for name, x in images.items()}},
        "selection_picked": picked,
        "best_on_test_upper_bound": best,
        "candidates_at_or_above_0.85_on_test": sum(r["test_auc"] >= 0.85 for r in rows),
        "sweep": rows,
        "learning_curve": curve,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=2))
    md = [f"Pooled EfficientNet-Lite0 features, {len(rows)} candidates ({args.pixels} pixels):",
          f"- selection-picked: {picked['input']} {picked['feature']} {picked['score']}: selection "
          f"{picked['selection_auc']:.3f}, test {picked['test_auc']:.3f} ({picked['test_ci'][0]:.3f}-"
          f"{picked['test_ci'][1]:.3f})",
          f"- best on the test set (an upper bound, chosen on the test set): {best['input']} {best['feature']} "
          f"{best['score']}: {best['test_auc']:.3f} ({best['test_ci'][0]:.3f}-{best['test_ci'][1]:.3f})",
          f"- candidates with test AUC >= 0.85: {report['candidates_at_or_above_0.85_on_test']}",
          "", "| kNN training tiles | test AUC (median of draws) |", "|---|---|"]
    md += [f"| {r['train_tiles']}{' x 8 flips/rotations' if 'bank' in r else ''} | {r['test_auc_median']:.3f} |"
           for r in curve]
    write_text_atomic(args.out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
