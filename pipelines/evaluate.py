"""``wsi-ad evaluate``: ``camelyon16`` (the paper's protocol on a slide dataset, :mod:`pipelines.camelyon16`) and
``tiles`` (a folder of image tiles in the anomalib Folder layout, e.g. the BMAD Camelyon16 subset).

Folder layout of ``evaluate tiles``::

    DIR/train/good/*.png           normal training tiles (what ``wsi-ad train DIR/train/good`` learns)
    DIR/test/good/*.png            normal test tiles (label 0)
    DIR/test/<other>/*.png         anomalous test tiles (label 1), e.g. ``test/Ungood``
    DIR/valid/good, valid/<other>  optional validation split, evaluated the same way

Stain-normalize the folder first (``wsi-ad normalize-tiles DIR OUT``, :mod:`wsi_ad.tile_stain`), train on
``OUT/train/good`` and evaluate ``OUT``: patches from different hospitals differ more by stain than by tissue.

Published reference for BMAD's Camelyon16 subset: best image AUROC about 0.78 (MKD).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wsi_ad.atomic import writable_folder, write_text_atomic
from wsi_ad.errors import WsiAdError

BMAD_BEST_AUROC = 0.78


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``evaluate`` subcommand with its two targets, ``camelyon16`` and ``tiles``."""
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)

    c16 = targets.add_parser("camelyon16", help="the paper's protocol on a dataset laid out like Camelyon16",
                             description=_first_paragraph("pipelines.camelyon16"),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    c16.add_argument("--data", type=Path, required=True, help="dataset root (training/, testing/ as the official release)")
    c16.add_argument("--run", type=Path, required=True, help="output folder; a re-run reuses what is finished")
    c16.add_argument("--model", type=Path, help="evaluate this checkpoint on the test slides (no selection, no training)")
    c16.add_argument("--config", type=Path,
                     help="training configuration: YAML file or packaged name, `wsi-ad configs` (default: the paper's; "
                                                 "configs/demo_cpu.yaml for a CPU-sized run)")
    c16.add_argument("--tune", action="store_true", help="select hyperparameters on a few tumour training slides first")
    c16.add_argument("--tune-space", type=Path,
                     help="search space YAML or packaged name for --tune (default: configs/tune_space.yaml)")
    c16.add_argument("--tune-slides", type=int, default=2,
                     help="tumour training slides used by --tune; with --protocol dpa-paper, a fold (three folds, as "
                          "the paper's; the official folds' slides with --dpa-split) (default: %(default)s)")
    c16.add_argument("--tune-selection", choices=("weakly-supervised", "unsupervised"), default="weakly-supervised",
                     help="--tune criterion: the tile AUC of tumour tiles of --tune-slides tumour training slides "
                          "(drawn with the config's seed), or unsupervised: the lowest score of held-out normal tiles, "
                          "no tumour slide used (the DPA paper's two protocols) (default: %(default)s)")
    c16.add_argument("--tune-tiles", type=int,
                     help="--tune: at most N validation tumour tiles in all (default: 64); with --protocol dpa-paper, "
                          "at most N validation tumour blocks a fold (default: all, up to 50 a slide, as the official "
                          "folds' 100)")
    c16.add_argument("--tiles-per-slide", type=int, help="train on at most N random tiles per normal slide (default: all)")
    c16.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="scoring device")
    c16.add_argument("--protocol", choices=("all-tiles", "dpa-paper"), default="all-tiles",
                     help="how the tile AUC is measured: all-tiles (every tile inside a lesion vs every tile of the "
                          "normal test slides) or dpa-paper (the DPA paper's blocks: <= 50 of 768 px at 40x a slide, "
                          "192 px at 10x, 64 px crops; the model is trained on the training blocks) "
                          "(default: %(default)s)")
    c16.add_argument("--dpa-split", type=Path, metavar="DIR",
                     help="the official block lists of the DPA paper (e.g. shared/data/camelyon16/dpa_split) for "
                          "--protocol dpa-paper; default: lists built by the paper's rules from the dataset")
    c16.add_argument("--seeds", type=int, default=1,
                     help="--protocol dpa-paper: trainings with seeds seed .. seed + N - 1, tile AUC mean ± std "
                          "(default: %(default)s)")
    c16.add_argument("--slide-classifier", choices=("none", "rf"), default="none",
                     help="rf: also score the training slides and classify the test slides with a random forest on "
                          "28 heatmap features, as the Camelyon16 winner (reported beside the reducers; default: "
                          "%(default)s)")
    c16.add_argument("--workers", type=int, help="local cluster worker processes (default: one per core)")
    c16.add_argument("--scheduler", metavar="ADDRESS", help="run on an existing dask.distributed cluster")
    c16.set_defaults(handler=run_evaluate_camelyon16)

    tiles = targets.add_parser("tiles", help="tile AUC on a folder of tiles in the anomalib Folder layout")
    tiles.add_argument("dir", type=Path, help="dataset root with test/good and test/<anomalous> (e.g. test/Ungood)")
    tiles.add_argument("--model", type=Path, required=True, help="checkpoint of `wsi-ad train`")
    tiles.add_argument("--out", type=Path, help="where scores CSV, ROC plot and results JSON go (default: "
                       "./<DIR's name>-wsi-ad-eval in the current directory: never inside the dataset, which may be "
                       "read-only or shared)")
    tiles.add_argument("--image-mpp", type=float, help="µm/px of the tiles, to resize them to the model's magnification")
    tiles.add_argument("--batch-size", type=int, help="tiles per batch (default: 64 on the CPU, 256 on CUDA)")
    tiles.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="scoring device")
    tiles.add_argument("--backbone-weights", type=Path, help="backbone weight file (vgg19 checkpoints)")
    tiles.set_defaults(handler=run_evaluate_tiles)


def _first_paragraph(module: str) -> str:
    import importlib

    return (importlib.import_module(module).__doc__ or "").strip()


def run_evaluate_camelyon16(args: argparse.Namespace) -> int:
    from pipelines.camelyon16 import run_camelyon16
    from wsi_ad.config import Config

    config = Config.from_yaml(args.config) if args.config else None
    if args.model is not None and not args.model.is_file():
        raise WsiAdError(f"--model {args.model}: checkpoint not found")
    run_camelyon16(args.data, args.run, model=args.model, config=config, tune=args.tune, tune_space=args.tune_space,
                   tune_slides=args.tune_slides, tiles_per_slide=args.tiles_per_slide, device=args.device,
                   workers=args.workers, scheduler=args.scheduler,
                   slide_classifier=None if args.slide_classifier == "none" else args.slide_classifier,
                   protocol=args.protocol, seeds=args.seeds, dpa_split=args.dpa_split,
                   tune_selection=args.tune_selection, tune_tiles=args.tune_tiles)
    return 0


# -- tile folders -----------------------------------------------------------------------------------------------

def folder_splits(root: Path) -> dict[str, dict[str, list[Path]]]:
    """``{"test": {"good": [dirs], "anomalous": [dirs]}, "valid": {...}}`` of an anomalib Folder dataset."""
    root = Path(root)
    splits = {}
    for split in ("test", "valid"):
        folder = root / split
        if not folder.is_dir():
            continue
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        good = [p for p in subdirs if p.name.lower() == "good"]
        bad = [p for p in subdirs if p.name.lower() != "good"]
        if good and bad:
            splits[split] = {"good": good, "anomalous": bad}
    if "test" not in splits:
        raise WsiAdError(f"{root}: not an anomalib Folder dataset (needs test/good and an anomalous folder "
                         "such as test/Ungood)")
    return splits


def default_tiles_out(root: str | Path) -> Path:
    """Where ``evaluate tiles`` writes without ``--out``: ``./<dataset folder name>-wsi-ad-eval``. Raises WsiAdError
    when the current directory lies inside the dataset (the results would go into it)."""
    root, here = Path(root).resolve(), Path.cwd().resolve()
    if here == root or root in here.parents:
        raise WsiAdError(f"the current directory {here} is inside the dataset {root}: give --out (results never go "
                         "into the dataset by default)")
    return here / f"{root.name or 'tiles'}-wsi-ad-eval"


def evaluate_tiles(root: str | Path, model: str | Path, out: str | Path | None = None, *, batch_size: int | None = None,
                   device: str = "auto", image_mpp: float | None = None, backbone_weights: str | None = None,
                   echo=print) -> dict:
    """Score every test (and validation) tile and compute the tile-level ROC AUC; writes ``scores_<split>.csv``
    (path, label, score), ``roc_<split>.png`` and ``results.json`` into ``out`` (default: ``<root's name>-wsi-ad-eval``
    in the current directory, never inside the dataset). Returns the results."""
    from pipelines.report import plot_roc
    from wsi_ad.detectors.scorer import load_scorer
    from wsi_ad.metrics import roc_auc, roc_points
    from wsi_ad.scoring import default_batch_size, score_image_folder, write_scores_csv

    root = Path(root)
    if not root.is_dir():
        raise WsiAdError(f"{root}: no such folder")
    splits = folder_splits(root)
    out = writable_folder(Path(out) if out is not None else default_tiles_out(root), "--out")
    echo(f"evaluating {root} with {model}; results go to {out}")
    scorer = load_scorer(model, device=None if device == "auto" else device, backbone_weights=backbone_weights)
    batch_size = batch_size or default_batch_size(scorer.device)
    results: dict = {"dataset": str(root), "model": str(model), "model_id": scorer.model_id, "splits": {},
                     "published_best_auroc_bmad_camelyon16": BMAD_BEST_AUROC}
    for split, folders in splits.items():
        rows = []
        for label, key in ((0, "good"), (1, "anomalous")):
            for folder in folders[key]:
                rows += [(path, label, score) for path, score in
                         score_image_folder(folder, scorer, batch_size=batch_size, image_mpp=image_mpp)]
        labels = [label for _, label, _ in rows]
        scores = [score for _, _, score in rows]
        auc = roc_auc(labels, scores)
        csv_path = write_scores_csv(out / f"scores_{split}.csv", rows, columns=("path", "label", "score"))
        roc = roc_points(labels, scores)
        png = plot_roc(out / f"roc_{split}.png", roc["fpr"], roc["tpr"], label=f"wsi-ad, AUC {auc:.3f}",
                       title=f"Tile-level ROC ({split})", xlabel="false positive rate (good tiles)",
                       ylabel="true positive rate (anomalous tiles)")
        results["splits"][split] = {"auc": auc, "n_good": labels.count(0), "n_anomalous": labels.count(1),
                                    "anomalous_folders": [p.name for p in folders["anomalous"]],
                                    "scores_csv": str(csv_path), "roc_png": str(png)}
        echo(f"{split}: tile ROC AUC {auc:.4f} ({labels.count(0)} good vs {labels.count(1)} anomalous tiles; "
             f"best published on BMAD Camelyon16 ≈ {BMAD_BEST_AUROC})")
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    echo(f"scores, ROC curves and results.json in {out}")
    return results


def run_evaluate_tiles(args: argparse.Namespace) -> int:
    evaluate_tiles(args.dir, args.model, args.out, batch_size=args.batch_size, device=args.device,
                   image_mpp=args.image_mpp, backbone_weights=str(args.backbone_weights) if args.backbone_weights else None,
                   echo=lambda line: print(line, file=sys.stdout))
    return 0
