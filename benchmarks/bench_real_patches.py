"""Benchmark: every registered detector's CPU setting on REAL Camelyon16 tissue, beside the feature-kNN anchor.

Usage::

    python benchmarks/bench_real_patches.py [--data ../shared/data/patches/camelyon16_l0_256] [--work DIR]
        [--rows dpa,knn,...] [--variants 10x-norm,10x-raw,40x-norm,40x-raw] [--config NAME=CONFIG.yaml ...]
        [--variant-rows VARIANT=ROW,ROW ...] [--seeds 1] [--select] [--out benchmarks/results/real_patches.json]

The data are the 1,058 real Camelyon16 patches of ``shared/data/patches/camelyon16_l0_256`` (256 px JPEG read at
level 0, about 0.243 µm/px; slide-disjoint; README inside). They are laid out once in ``WORK/data/<raw|norm>/``
(symbolic links to the files), raw and stain-normalised as ``wsi-ad normalize-tiles`` does (one Vahadane fit per
source slide): ``norm`` to the pipeline's reference stain (:data:`wsi_ad.stain.DEFAULT_TARGET`, what every slide is
normalised to), ``normtrain`` to a target fitted on the training patches:

- ``train/good``: the 500 normal training patches (5 normal slides);
- ``test/good``: the 499 normal test patches (4 other normal slides);
- ``test/tumor``: the tumour patches of every tumour slide but the selection slides (:data:`SELECTION_SLIDES`);
- ``select/``: the weakly-supervised selection set, never tested on: ``train/good`` without the held-out normal
  slide :data:`SELECTION_NORMAL` (what candidates train on), and ``test/good`` = that slide's patches,
  ``test/tumor`` = the selection slides' tumour patches (what candidates are ranked by).

A variant is a magnification (``10x``: the patches resized by 4 to 64 px, the DPA paper's input; ``40x``: their
native resolution, each model's input cropped from it, the centre crop when scored; ``cfg``: the row config's own
``data.magnification``) and the raw or normalised
pixels. Every row is a config (:data:`pipelines.compare.CONFIGS` ``cpu`` by detector name, or ``--config``) with
``data.magnification`` set to the variant's and ``data.image_mpp`` to 0.243; each is trained by
:func:`pipelines.compare.run_one` (a finished model in ``WORK`` is reused) and scored on ``test/``. Reported per row:
tile ROC AUC against all test normals and against the normals of the tumour slides' scanner group only (group A:
``labels.csv`` ``scanner_group``; every tumour patch is from group A, so a detector could separate scanners rather
than tissue), each with a stratified 95 % bootstrap interval (2,000 resamples), and the ``knn`` row's AUC of the same
variant and seed beside it (the anchor; run first).

``--select``: the weakly-supervised protocol of the DPA paper (§2.3) on real tiles instead of the full run: each
``--config`` row is a candidate, trained on ``select/train/good`` and ranked by its AUC on ``select/test``; prints
and records the ranking (the shipped CPU configs were chosen this way; see the README).

Writes the report to ``--out`` (JSON) and the table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from pipelines.compare import CONFIG_DIR, CONFIGS, _FolderData, run_one  # noqa: E402
from wsi_ad.atomic import write_text_atomic  # noqa: E402
from wsi_ad.config import Config  # noqa: E402
from wsi_ad.metrics import bootstrap_auc_ci, roc_auc  # noqa: E402

#: The patches: under ``$WSI_AD_TEST_DATA`` when set (as the tests), else ``../shared/data`` beside the repository.
DEFAULT_DATA = Path(os.environ.get("WSI_AD_TEST_DATA") or REPO.parent / "shared" / "data") / "patches" / "camelyon16_l0_256"
#: µm/px of the patches (Camelyon16 level 0, the figure PCam's authors give).
PATCH_MPP = 0.243
#: Tumour slides whose patches select hyperparameters (weakly-supervised validation anomalies); never tested on.
SELECTION_SLIDES = ("tumor_042", "tumor_051")
#: Normal training slide held out as the selection's validation normals (scanner group A, as the tumours).
SELECTION_NORMAL = "normal_097"
VARIANTS = ("10x-norm", "10x-normtrain", "10x-raw", "40x-norm", "40x-raw")
ANCHOR = "knn"
FILE_SLIDE = re.compile(r"^(.*)_x\d+_y\d+")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() and Path(os.readlink(dst)) != src.resolve():
        dst.unlink()
    if not dst.is_symlink():
        os.symlink(src.resolve(), dst)


def layout(data: Path, work: Path) -> dict:
    """Lay out ``WORK/data/<raw|norm|normtrain>`` (module docstring); returns ``{file name: labels.csv row}``."""
    from wsi_ad.stain import DEFAULT_TARGET
    from wsi_ad.tile_stain import normalize_tile_folder

    with open(data / "labels.csv", newline="", encoding="utf-8") as f:
        labels = {row["file"].rsplit("/", 1)[-1]: row for row in csv.DictReader(f)}
    roots = {"raw": data}
    for kind, target in (("norm", DEFAULT_TARGET), ("normtrain", None)):
        roots[kind] = work / f"normalized-{kind}"
        result = normalize_tile_folder(data, roots[kind], target=target, group_pattern=FILE_SLIDE.pattern, workers=2)
        if result.failures:
            raise SystemExit(f"stain normalisation failed for {len(result.failures)} patches: {result.failures}")
    for kind, root in roots.items():
        out = work / "data" / kind
        for path in sorted(root.rglob("*.jpg")):
            row = labels[path.name]
            split, label, slide = row["split"], row["label"], row["slide"]
            target = "good" if label == "good" else "tumor"
            if split == "train":
                _link(path, out / "train" / target / path.name)
                if slide != SELECTION_NORMAL:
                    _link(path, out / "select" / "train" / target / path.name)
                else:
                    _link(path, out / "select" / "test" / target / path.name)
            elif slide in SELECTION_SLIDES:
                _link(path, out / "select" / "test" / target / path.name)
            else:
                _link(path, out / "test" / target / path.name)
    return labels


def _config(path: Path, magnification: str) -> Config:
    """The row's config at the variant's magnification (``cfg``: the config's own) and the patches' µm/px."""
    base = Config.from_yaml(path)
    magnification = base.data.magnification if magnification == "cfg" else magnification
    return replace(base, data=replace(base.data, magnification=magnification, image_mpp=PATCH_MPP))


def _aucs(scores_csv: Path, labels: dict) -> dict:
    """Tile AUC (all normals; scanner group A normals only), each with its bootstrap interval."""
    with open(scores_csv, newline="", encoding="utf-8") as f:
        rows = [(Path(r["path"]).name, int(r["label"]), float(r["score"])) for r in csv.DictReader(f)]
    out = {"n_tumor": sum(y for _, y, _ in rows), "n_normal": sum(1 - y for _, y, _ in rows)}
    for key, keep in (("all", lambda name: True), ("same_scanner", lambda name: labels[name]["scanner_group"] == "A")):
        sub = [(y, s) for name, y, s in rows if y == 1 or keep(name)]
        y, s = [v[0] for v in sub], [v[1] for v in sub]
        out[f"auc_{key}"] = round(roc_auc(y, s), 4)
        out[f"ci_{key}"] = [round(v, 4) for v in bootstrap_auc_ci(y, s, n_boot=2000, seed=0)]
        out[f"n_normal_{key}"] = len(y) - sum(y)
    # median score of each class, to see which way a detector ranks (an AUC below 0.5 is an inversion)
    scores = np.array([s for _, _, s in rows])
    ys = np.array([y for _, y, _ in rows])
    out["median_score_tumor"] = float(np.median(scores[ys == 1]))
    out["median_score_normal"] = float(np.median(scores[ys == 0]))
    return out


def run_row(name: str, config: Config, variant: str, root: Path, work: Path, seed: int, labels: dict, echo,
            source: str | None = None) -> dict:
    """Train (or reuse) ``config`` with seed + ``seed`` on ``root/train/good`` into
    ``work/runs/<variant>/<name>/seed<k>-<candidate id>/`` (a changed config trains into a new folder), score
    ``root/test`` and return the row's record (AUCs of :func:`_aucs`, timings, ``run``: the run folder)."""
    from wsi_ad.tuning import candidate_id

    config = replace(config, train=replace(config.train, seed=config.train.seed + seed, device="cpu"))
    run = work / "runs" / variant / name / f"seed{config.train.seed}-{candidate_id(config)}"
    record = run_one(config, _FolderData(root), run, "cpu", lambda line: None)
    out = {"row": name, "config": source, "detector": config.detector, "variant": variant, "run": str(run),
           "seed": config.train.seed, "train_seconds": record["train_seconds"], "iterations": record["iterations"],
           "score_tiles_per_s": record["score_tiles_per_s"], "reused": record["reused"]}
    out.update(_aucs(run / "tiles" / "scores_test.csv", labels))
    echo(f"{variant} {name} seed {out['seed']}: AUC {out['auc_all']:.3f} [{out['ci_all'][0]:.3f}, {out['ci_all'][1]:.3f}]"
         f", same scanner {out['auc_same_scanner']:.3f}; trained in {out['train_seconds']:.0f} s"
         + (" (reused)" if out["reused"] else ""))
    return out


def table(results: list[dict]) -> str:
    anchor = {(r["variant"], r["seed"]): r["auc_all"] for r in results if r["row"] == ANCHOR}
    lines = ["| variant | row | detector | tile AUC (95 % CI) | same-scanner AUC (95 % CI) | kNN anchor | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        a = anchor.get((r["variant"], r["seed"]))
        lines.append(f"| {r['variant']} | {r['row']} | {r['detector']} | {r['auc_all']:.3f} ({r['ci_all'][0]:.3f}-"
                     f"{r['ci_all'][1]:.3f}) | {r['auc_same_scanner']:.3f} ({r['ci_same_scanner'][0]:.3f}-"
                     f"{r['ci_same_scanner'][1]:.3f}) | {'–' if a is None else f'{a:.3f}'} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the patches (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsi-ad-bench-real"),
                        help="work folder: laid-out data and models, reused by a re-run (default: %(default)s)")
    parser.add_argument("--rows", default=",".join(CONFIGS["cpu"]),
                        help="detectors (their cpu configs), comma-separated; '' for only --config rows "
                             "(default: %(default)s)")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=CONFIG.yaml", help="another row")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="MAGNIFICATION-PIXELS, MAGNIFICATION one of 10x, 20x, 40x, cfg (the config's own), PIXELS "
                             "one of raw, norm, normtrain (default: %(default)s)")
    parser.add_argument("--variant-rows", action="append", default=[], metavar="VARIANT=ROW,ROW",
                        help="the rows run for that variant (default: every row)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per row (default: %(default)s)")
    parser.add_argument("--select", action="store_true", help="rank the --config rows on the selection set")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "real_patches.json",
                        help="report JSON, the table beside it as .md; not written when no row succeeded "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    unknown = [name for name in filter(None, args.rows.split(",")) if name not in CONFIGS["cpu"]]
    if unknown:
        parser.error(f"--rows: no CPU config for {', '.join(unknown)} (known: {', '.join(CONFIGS['cpu'])})")
    for variant in filter(None, args.variants.split(",")):
        magnification, _, kind = variant.partition("-")
        if magnification not in ("10x", "20x", "40x", "cfg") or kind not in ("raw", "norm", "normtrain"):
            parser.error(f"--variants: {variant!r} is not MAGNIFICATION-PIXELS (e.g. 10x-norm)")
    for spec in args.config:
        if "=" not in spec or not Path(spec.partition("=")[2]).is_file():
            parser.error(f"--config {spec}: expected NAME=CONFIG.yaml with an existing file")
    if not (args.data / "labels.csv").is_file():
        print(f"{args.data}: the real patches are missing (labels.csv not found)", file=sys.stderr)
        return 2
    import torch

    rows = {name: CONFIG_DIR / CONFIGS["cpu"][name] for name in filter(None, args.rows.split(","))}
    if ANCHOR in rows:
        rows = {ANCHOR: rows.pop(ANCHOR), **rows}
    for spec in args.config:
        name, _, path = spec.partition("=")
        rows[name] = Path(path)
    variants = [v for v in args.variants.split(",") if v]
    only = {v: set(names.split(",")) for v, _, names in (spec.partition("=") for spec in args.variant_rows)}
    labels = layout(args.data, args.work)
    results = []
    for variant in variants:
        kind = variant.split("-")[1]
        root = args.work / "data" / kind / ("select" if args.select else "")
        for seed in range(args.seeds):
            for name, path in rows.items():
                if variant in only and name not in only[variant]:
                    continue
                try:
                    config = _config(path, variant.split("-")[0])
                    results.append(run_row(name, config, variant, root, args.work / ("select" if args.select else ""),
                                           seed, labels, print, source=str(path)))
                except Exception as exc:  # noqa: BLE001 - a failed row is recorded, the table goes on
                    print(f"{variant} {name}: FAILED ({type(exc).__name__}: {exc})")
                    results.append({"row": name, "variant": variant, "seed": seed, "error": str(exc)})
    ok = [r for r in results if "error" not in r]
    if not ok:
        print("no row succeeded: nothing written", file=sys.stderr)
        return 1
    report = {
        "benchmark": "bench_real_patches" + (" --select" if args.select else ""),
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "data": {"path": str(args.data), "patch_mpp": PATCH_MPP, "selection_slides": SELECTION_SLIDES,
                 "selection_normal": SELECTION_NORMAL},
        "results": results,
    }
    if args.select:
        report["ranking"] = sorted(({"row": r["row"], "variant": r["variant"], "auc": r["auc_all"]} for r in ok),
                                   key=lambda r: -r["auc"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=2, default=str))
    md = table(ok)
    write_text_atomic(args.out.with_suffix(".md"), md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
