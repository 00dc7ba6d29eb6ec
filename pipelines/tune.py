"""``wsi-ad tune``: weakly-supervised hyperparameter selection (argument parsing and reporting only; the work
is :func:`wsi_ad.tuning.tune`).

``pipelines/cli.py`` wires them as the ``tune`` subcommand::

    tune = sub.add_parser("tune", help=...)
    add_tune_arguments(tune)
    tune.set_defaults(handler=run_tune)
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from wsi_ad.config import Config


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``tune`` subcommand's arguments to ``parser``."""
    parser.add_argument("normal", type=Path, nargs="+", metavar="NORMAL_STORES_OR_DIRS",
                        help="normal slide stores (*.zarr) or folders of them (the --out of `wsi-ad process`); "
                             "one store per slide, split into folds by slide")
    parser.add_argument("--anomalies", type=Path, nargs="+", metavar="TUMOR_STORES_DIRS_OR_IMAGES",
                        help="stores of a few annotated tumour slides (training slides, never trained on): "
                             "their tiles entirely inside the tumour annotations are the validation anomalies; or "
                             "PNG/JPEG tumour tiles (files or folders of them, --anomaly-mpp, no --annotations) "
                             "(required unless --selection unsupervised)")
    parser.add_argument("--anomaly-mpp", type=float, metavar="UM_PER_PX",
                        help="µm/px of anomaly tile images, to resize them to each candidate's magnification "
                             "(default: taken as at that magnification)")
    parser.add_argument("--annotations", type=Path, metavar="XML_DIR",
                        help="folder of ASAP XML annotations named <slide_id>.xml (Camelyon16 lesion_annotations)")
    parser.add_argument("--selection", choices=("weakly-supervised", "unsupervised"), default="weakly-supervised",
                        help="weakly-supervised (default): best tile AUC of the anomalies vs held-out normals; "
                             "unsupervised: lowest mean score (reconstruction loss) of held-out normal tiles, no "
                             "anomalies (the DPA paper's Table 2 row 1)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: tune_results.json, best_config.yaml and runs/ (checkpoints; a re-run "
                             "reuses finished work)")
    parser.add_argument("--base-config", type=Path,
                        help="YAML config or packaged name the candidates modify (default: the paper's setting, "
                             "configs/camelyon16_paper.yaml; configs/demo_cpu.yaml for a CPU-sized search)")
    parser.add_argument("--space", type=Path,
                        help="search-space YAML or packaged name (default: configs/tune_space.yaml, the built-in space; "
                             "schema in "
                             "wsi_ad/tuning.py)")
    parser.add_argument("--folds", type=_positive_int, default=3,
                        help="K of the cross-validation by slide (default 3; reduced to the number of slides "
                             "when there are fewer)")
    parser.add_argument("--max-candidates", type=_positive_int,
                        help="at most this many candidates (overrides the space's max_candidates)")
    parser.add_argument("--max-anomaly-tiles", type=_positive_int, default=64,
                        help="cap of validation anomaly tiles, all tumour slides together (default 64)")
    parser.add_argument("--max-normal-tiles", type=_positive_int, default=4096,
                        help="cap of held-out normal tiles scored per fold (default 4096)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds, tile samples and random search")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"),
                        help="training and scoring device (default: the base config's, cuda when available)")


def _params_text(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def format_table(candidates: list[dict], best: dict | None) -> str:
    """The candidates as a text table: number, parameters, mean AUC ± std over folds (or, in an unsupervised
    selection, the held-out normals' mean score), seconds, status."""
    width = max([len("parameters")] + [len(_params_text(c["params"])) for c in candidates])
    unsupervised = best is not None and best.get("selection") == "unsupervised"
    criterion = "normal score" if unsupervised else "AUC mean ± std"
    lines = [f"{'#':>3}  {'parameters':<{width}}  {criterion:>15}  {'seconds':>8}  status"]
    for c in candidates:
        if unsupervised:
            auc = f"{c['normal_score_mean']:.6g}" if c.get("normal_score_mean") is not None else "-"
        else:
            auc = f"{c['auc_mean']:.4f} ± {c['auc_std']:.4f}" if c["auc_mean"] is not None else "-"
        seconds = f"{c['seconds']:.1f}" if c["status"] == "ok" else "-"
        status = c["status"] if c["status"] == "ok" else f"{c['status']}: {c['reason']}"
        if best is not None and c["index"] == best["index"]:
            status += "  <- best"
        lines.append(f"{c['index'] + 1:>3}  {_params_text(c['params']):<{width}}  {auc:>15}  {seconds:>8}  {status}")
    return "\n".join(lines)


def run_tune(args: argparse.Namespace) -> int:
    """Run ``wsi-ad tune``; returns the exit status (0: a winner was chosen). Raises
    :class:`wsi_ad.errors.WsiAdError` on bad input, which the CLI prints as one line."""
    from wsi_ad.tuning import load_space, tune

    base = Config.from_yaml(args.base_config) if args.base_config else Config()
    space = load_space(args.space, detector=base.detector)

    def echo(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = tune(args.normal, args.anomalies, args.annotations, args.out, base_config=base, space=space,
                  folds=args.folds, max_candidates=args.max_candidates, max_anomaly_tiles=args.max_anomaly_tiles,
                  max_normal_tiles=args.max_normal_tiles, seed=args.seed, device=args.device, echo=echo,
                  selection=args.selection, anomaly_mpp=args.anomaly_mpp)
    print(format_table(result.candidates, result.best))
    for note in result.notes:
        print(f"note: {note}")
    best = result.best
    value = (f"mean normal score {best['normal_score_mean']:.6g}" if best["selection"] == "unsupervised"
             else f"AUC {best['auc_mean']:.4f} ± {best['auc_std']:.4f}")
    print(f"\nbest: candidate {best['index'] + 1} ({best['id']}) {_params_text(best['params'])}: "
          f"{value} over {len(result.folds)} folds")
    print(f"results: {result.results_path}")
    print(f"config:  {result.best_config_path}")
    command = ["wsi-ad", "train", *map(str, args.normal), "--out", str(Path(args.out) / "model.pt"),
               "--config", str(result.best_config_path)]
    print("train the final model on all normal slides with:\n  " + shlex.join(command))
    return 0
