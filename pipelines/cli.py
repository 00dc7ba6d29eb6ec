"""The ``wsi-ad`` command line: argument parsing and progress display only; the work lives in
``wsi_ad`` (library) and ``pipelines`` (orchestration).

Errors on bad input (:class:`wsi_ad.errors.WsiAdError`) are printed as one line, without a traceback,
and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipelines.compare import add_compare_arguments, run_compare
from pipelines.evaluate import add_evaluate_arguments
from pipelines.score import add_export_arguments, add_score_arguments, export_formats, run_score
from pipelines.train import add_train_arguments, run_detectors, run_train
from pipelines.tune import add_tune_arguments, run_tune
from wsi_ad import __version__
from wsi_ad.errors import WsiAdError

log = logging.getLogger("wsi_ad")

COMPARE_GPU_HELP = """\
examples:
  wsi-ad synth DATA --normal 2 --tumor 2 --test 6 --size 8192    # or the real Camelyon16, laid out the same way
  wsi-ad compare --data DATA --out CMP --seeds 3                 # every detector's CPU setting (minutes each)
  wsi-ad compare --data DATA --out CMP --detectors dpa,knn --config dpa_adv_0.1=configs/ablations/dpa_adv_0.1_cpu.yaml

paper scale, on a GPU machine (hours per detector and seed; VGG-19 / ResNet-18 ImageNet weights must be in the torch
hub cache, e.g. run `wsi-ad train --download-weights` once where there is network, or name the files in the
configs' backbone_weights):
  wsi-ad compare --data CAMELYON16 --out CMP --configs paper --seeds 3 --device cuda [--tune]
A run that stops (preempted job, time limit) resumes where it stopped when started again with the same --out.
"""



def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 0-65535 (0: any free port), got {value}")
    return value


def _mpp(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of µm/px, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-ad",
        description="Find metastases in whole-slide images by anomaly detection (wsi-ad detectors lists the detectors).",
    )
    parser.add_argument("--version", action="version", version=f"wsi-ad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages (INFO)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch / numba / BLAS threads of this process (default: every core it may run on; a "
                             "Dask worker gets its share). Set once at start-up, with passive OpenMP waiting, so two "
                             "runs on the same cores share them instead of slowing each other 10x")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="run the whole job on a small synthetic Camelyon16-like dataset")
    demo.add_argument("--out", type=Path, default=Path("wsi-ad-demo"), help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data (default: %(default)s)")
    demo.set_defaults(handler=_cmd_demo)

    synth = sub.add_parser("synth", help="write synthetic Camelyon16-like slides, annotations and reference.csv")
    synth.add_argument("out", type=Path, help="output folder, laid out like the official dataset")
    synth.add_argument("--normal", type=_positive_int, default=2, help="normal training slides (default: %(default)s)")
    synth.add_argument("--tumor", type=_positive_int, default=2, help="tumour training slides (default: %(default)s)")
    synth.add_argument("--test", type=_positive_int, default=2, help="test slides, tumour and normal (default: %(default)s)")
    synth.add_argument("--size", type=int, default=16384,
                       help="level-0 width and height in pixels at 0.243 µm/px (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default: %(default)s)")
    synth.add_argument("--tissue", choices=("simple", "lymph-node"), default=None,
                       help="how tissue is drawn: 'simple' (the original look: lymphocytes on stroma, dark tumour "
                            "nuclei) or 'lymph-node' (adds capsule, follicles, sinuses, fat, vessels and blood, blur; "
                            "tumour nuclei larger and paler, not darker) (default: wsi_ad.synth.DEFAULT_TISSUE, simple)")
    synth.set_defaults(handler=_cmd_synth)

    process = sub.add_parser("process", help="tissue-mask and tile slides (files or folders) into zarr stores")
    process.add_argument("slides", type=Path, nargs="+", help="slide files or folders of slides")
    process.add_argument("--out", type=Path, required=True, help="output folder: one <slide_id>.zarr per slide")
    process.add_argument("--mpp", type=_mpp, help="level-0 µm/px for slides without resolution metadata "
                                                   "(overrides the files' metadata)")
    process.add_argument("--magnifications", default="10x",
                         help="comma-separated magnifications to extract, same footprint at each "
                              "(default: %(default)s; e.g. 10x,20x,40x)")
    process.add_argument("--tile-px", type=int, default=64,
                         help="tile size in pixels at the coarsest magnification (default: %(default)s)")
    process.add_argument("--stride-px", type=int, help="grid step in pixels at the coarsest magnification "
                                                        "(default: the tile size)")
    process.add_argument("--tile-um", type=float, help="tile size in µm (overrides --tile-px)")
    process.add_argument("--min-tissue", type=float, default=0.5,
                         help="minimum tissue fraction of a tile's footprint (default: %(default)s)")
    process.add_argument("--mask-mpp", type=_mpp, default=8.0,
                         help="µm/px of the thumbnail the tissue mask is computed on (default: %(default)s)")
    process.add_argument("--compression", choices=("none", "zstd", "jpeg"), default="none",
                         help="tile pixel compression (default: %(default)s, lossless; jpeg for small stores)")
    process.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (default: %(default)s)")
    process.add_argument("--no-stain-norm", action="store_true",
                         help="store tiles as scanned, without Vahadane stain normalization")
    process.add_argument("--stain-target", metavar="IMAGE_SLIDE_OR_JSON[:X,Y,W,H]",
                         help="fit the normalization target on an image file, a whole slide's tissue, or a "
                              "level-0 region of a slide, or read it from a stain-fit JSON (default: the "
                              "shipped H&E reference)")
    add_export_arguments(process)
    process.add_argument("--model", type=Path, help="checkpoint of `wsi-ad train`: also score every tile, make "
                                                     "heatmaps, slide scores and overlays")
    process.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                         help="where tiles are scored (default: %(default)s, a GPU worker when there is one)")
    process.add_argument("--batch-size", type=int, help="tiles per scoring batch (default: 64 on the CPU, 256 on CUDA)")
    process.add_argument("--backbone-weights", type=Path, help="backbone weight file, for checkpoints whose "
                                                               "backbone has no installed weights (vgg19)")
    process.add_argument("--annotations", type=Path, metavar="DIR",
                         help="folder of <slide_id>.xml ASAP annotations to outline on the overlays")
    process.add_argument("--labels", type=Path, metavar="CSV",
                         help="slide labels (Camelyon16 reference.csv format): ROC curve and AUC in the report")
    process.add_argument("--scheduler", metavar="ADDRESS",
                         help="run on an existing dask.distributed cluster (e.g. tcp://10.0.0.5:8786) instead "
                              "of a local one; workers must see the same paths")
    process.add_argument("--workers", type=int, help="local cluster: worker processes (default: one per core)")
    process.add_argument("--threads-per-worker", type=int, help="local cluster: threads per worker (default: 1)")
    process.add_argument("--fail-fast", action="store_true", help="stop at the first slide that fails")
    process.set_defaults(handler=_cmd_process)

    train = sub.add_parser("train", help="train an anomaly detector (default: the DPA) on normal tiles")
    add_train_arguments(train)
    train.set_defaults(handler=run_train)

    detectors = sub.add_parser("detectors", help="list the registered anomaly detectors, one line each")
    detectors.add_argument("--verbose", "-v", action="store_true",
                           help="also the paper, score units, config section defaults and search parameters")
    detectors.set_defaults(handler=run_detectors)

    score = sub.add_parser("score", help="score every tile of slide stores (or tile folders) with a trained model")
    add_score_arguments(score)
    score.set_defaults(handler=run_score)

    tune = sub.add_parser("tune", help="weakly-supervised hyperparameter selection (a few anomalies of one kind)")
    add_tune_arguments(tune)
    tune.set_defaults(handler=run_tune)

    compare = sub.add_parser(
        "compare", help="several detectors on the same tiles, several seeds, one table (compare.md, ROC plot)",
        description="Train every detector (its shipped cpu or paper config, or --config NAME=YAML rows) on the same "
                    "normal tiles, score the same test tiles, N seeds each, and write OUT/compare.md, compare.json and "
                    "roc.png: tile AUC mean ± std (slide AUC and FROC for slides), training time, scoring tiles/s and "
                    "the DPA paper's published value beside each row that has one. A failing row is recorded in "
                    "the table; a re-run reuses finished models and resumes interrupted ones.",
        epilog=COMPARE_GPU_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_compare_arguments(compare)
    compare.set_defaults(handler=run_compare)

    evaluate = sub.add_parser("evaluate", help="Camelyon16 protocol (slide AUC, tile AUC, FROC) or tile-folder AUC")
    add_evaluate_arguments(evaluate)

    norm = sub.add_parser(
        "normalize-tiles", help="stain-normalize a folder of PNG/JPEG tiles, as slides are when tiled",
        description="Stain-normalize every PNG/JPEG tile under SRC into OUT (same tree, names and formats): each "
                    "tile with its own fitted stain matrix (or one per source slide with --group-pattern), to a "
                    "target fitted on the training tiles. Train and evaluate on OUT afterwards. A re-run skips "
                    "finished tiles; OUT/stain_normalization.json records the target and every tile's fit.")
    norm.add_argument("src", type=Path, help="folder of tiles, searched recursively (e.g. an anomalib Folder dataset)")
    norm.add_argument("out", type=Path, help="output folder: the same tree and file names, normalized")
    norm.add_argument("--stain-target", metavar="IMAGE_SLIDE_OR_JSON[:X,Y,W,H]|reference",
                      help="the stain to normalize to (default: the target OUT records from an earlier run, else one "
                           "fitted on SRC/train/good, else on every tile of SRC); 'reference': the stain "
                           "`wsi-ad process` normalizes slides to (use it for a model trained on slides, and where "
                           "the training tiles are mostly lymphocytes: their fitted eosin vector "
                           "comes out nearly parallel to haematoxylin and turns pink stroma purple); another folder's "
                           "stain_normalization.json reuses its target")
    norm.add_argument("--group-pattern", metavar="REGEX",
                      help="regular expression on file names whose first group names the source slide: one stain "
                           "fit per slide (pooled over its tiles) instead of one per tile")
    norm.add_argument("--workers", type=int, default=1, help="processes (default: %(default)s)")
    norm.set_defaults(handler=_cmd_normalize_tiles)

    view = sub.add_parser(
        "view", help="serve a run as a local web page: deep zoom of the slides with heatmap, outlines, hotspots",
        description="Serve RUN_DIR (the --out of `wsi-ad process --model` or `wsi-ad score`) as a local web page: "
                    "the slide list (sortable) with the ROC curve when the run had labels, and per slide a deep-zoom "
                    "view of the real slide pixels with the heatmap (cohort colour scale, adjustable opacity), the "
                    "tissue mask and the lesion outlines as layers, and its hotspots. Reads only what the run wrote "
                    "and the slide files; a missing slide file shows its stored thumbnail. No authentication: it "
                    "listens on this machine only (127.0.0.1) unless --host says otherwise.")
    view.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run folder (holds report.json)")
    view.add_argument("--port", type=_port, default=8000, help="TCP port (default: %(default)s; 0: any free port)")
    view.add_argument("--host", default=None,
                      help="address to listen on (default: 127.0.0.1, this machine only); another address serves the "
                           "slides to anyone who can reach it, without authentication, and prints a warning")
    view.add_argument("--hotspots", type=_at_least_one, default=10,
                      help="hotspots listed per slide (default: %(default)s)")
    view.add_argument("--annotations", type=Path, default=None,
                      help="folder of <slide_id>.xml ASAP lesion outlines (default: the run's own --annotations)")
    view.add_argument("--slides", type=Path, default=None, metavar="DIR",
                      help="where slide files that moved since the run are now (found by file name)")
    view.set_defaults(handler=_cmd_view)

    configs = sub.add_parser(
        "configs", help="list the packaged configs, one line each (use them by name: --config camelyon16_paper)",
        description="The configs shipped inside the package (wsi_ad/configs/): detector settings (*_cpu for 2 CPU "
                    "cores, *_paper for the papers' settings on a GPU), the DPA's ablations and the tuning search "
                    "spaces. Every --config / --space / --tune-space takes a name of this list or a YAML path.")
    configs.add_argument("--path", action="store_true", help="print each config's file path instead of its summary")
    configs.set_defaults(handler=_cmd_configs)

    info = sub.add_parser("info", help="print a slide's resolution, levels and where its µm/px came from")
    info.add_argument("slides", type=Path, nargs="+", help="slide files")
    info.add_argument("--mpp", type=_mpp, help="level-0 µm/px, overriding the file's metadata")
    info.set_defaults(handler=_cmd_info)

    return parser


def _cmd_synth(args: argparse.Namespace) -> int:
    from wsi_ad.synth import synthesize_dataset

    try:
        dataset = synthesize_dataset(args.out, n_normal=args.normal, n_tumor=args.tumor, n_test=args.test,
                                     size_px=args.size, seed=args.seed,
                                     **({} if args.tissue is None else {"tissue": args.tissue}))
    except ValueError as exc:               # a slide too small for its tissue or lesions: one line, not a traceback
        raise WsiAdError(f"synth: {exc}") from exc
    print(dataset.describe())
    return 0


def _cmd_process(args: argparse.Namespace) -> int:
    from pipelines.process import BatchConfig, run_batch
    from wsi_ad.preprocess import PreprocessConfig
    from wsi_ad.stain import DEFAULT_TARGET, StainParams
    from wsi_ad.tiling import TilingParams, parse_magnifications
    from wsi_ad.tissue import TissueParams

    try:
        stain_target = _stain_target(args.stain_target) if args.stain_target and not args.no_stain_norm else None
        config = PreprocessConfig(
            tissue=TissueParams(mask_mpp=args.mask_mpp),
            tiling=TilingParams(magnifications=parse_magnifications(args.magnifications), tile_px=args.tile_px,
                                stride_px=args.stride_px, tile_um=args.tile_um,
                                min_tissue_fraction=args.min_tissue),
            compression=args.compression, jpeg_quality=args.jpeg_quality,
            stain=None if args.no_stain_norm else StainParams(),
            stain_target=stain_target or DEFAULT_TARGET)
    except ValueError as exc:
        raise WsiAdError(f"bad settings: {exc}") from exc
    if args.model is not None:
        config = _tiling_for_model(args.model, config)
    for flag, path in (("--annotations", args.annotations), ("--labels", args.labels)):
        if path is not None and not path.exists():
            raise WsiAdError(f"{flag} {path}: not found")
    exports = export_formats(args, scored=args.model is not None)
    batch = BatchConfig(preprocess=config, mpp=args.mpp, exports=exports, geojson_threshold=args.geojson_threshold,
                        model=args.model,
                        device=args.device, batch_size=args.batch_size,
                        backbone_weights=str(args.backbone_weights) if args.backbone_weights else None,
                        annotations_dir=args.annotations, labels=args.labels, fail_fast=args.fail_fast)
    result = run_batch(args.slides, args.out, batch, scheduler=args.scheduler, workers=args.workers,
                       threads_per_worker=args.threads_per_worker)
    if result.metrics and result.metrics.get("auc") is not None:
        print(f"slide-level ROC AUC {result.metrics['auc']:.3f}")
    return 1 if result.n_failed else 0


def _tiling_for_model(model: Path, config):
    """The preprocessing settings with the model's magnification added, checked against its tile size."""
    import dataclasses

    from wsi_ad.config import Config
    from wsi_ad.detectors import input_spec
    from wsi_ad.detectors.checkpoint import load_checkpoint
    from wsi_ad.slide import magnification_to_mpp

    spec = input_spec(Config.from_dict(load_checkpoint(model)["config"]))  # CheckpointError (a WsiAdError) if unusable
    tiling = config.tiling
    magnification, size = spec.magnification, spec.tile_px
    if magnification not in tiling.magnifications:
        tiling = dataclasses.replace(tiling, magnifications=(*tiling.magnifications, magnification))
    coarsest = max(tiling.magnifications, key=magnification_to_mpp)
    tile_px = round(tiling.tile_px * magnification_to_mpp(coarsest) / magnification_to_mpp(magnification))
    if tiling.tile_um is None and tile_px != size:
        raise WsiAdError(f"--model {model} scores {size} px tiles at {magnification}, but the tiling makes "
                         f"{tile_px} px tiles there; use --tile-px {size} (at {coarsest})")
    return dataclasses.replace(config, tiling=tiling)


def _stain_target(spec: str):
    """``PATH`` or ``PATH:X,Y,W,H`` (level-0 region of a slide) -> the fitted target, with its method logged;
    a ``.json`` file (a stain fit, or a normalized tile folder's record) -> the target it holds; ``reference`` ->
    the pipeline's reference stain (:data:`wsi_ad.stain.DEFAULT_TARGET`, what slides are normalized to)."""
    from wsi_ad.stain import DEFAULT_TARGET, fit_target
    from wsi_ad.tile_stain import load_target

    if spec == "reference":
        return DEFAULT_TARGET
    if spec.lower().endswith(".json"):
        if not Path(spec).is_file():
            raise WsiAdError(f"--stain-target {spec}: file not found")
        return load_target(spec)
    path, region = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and tail.count(",") == 3:
        try:
            region = tuple(int(v) for v in tail.split(","))
        except ValueError as exc:
            raise WsiAdError(f"--stain-target region must be X,Y,W,H in level-0 pixels, got {tail!r}") from exc
        path = head
    if not Path(path).exists():
        raise WsiAdError(f"--stain-target {path}: file not found")
    target = fit_target(path, region=region)
    if target.method != "vahadane":
        log.warning("stain target %s: %s fit (%s)", spec, target.method, "; ".join(target.warnings))
    return target


def _cmd_normalize_tiles(args: argparse.Namespace) -> int:
    import re

    from wsi_ad.tile_stain import normalize_tile_folder

    if args.group_pattern:
        try:
            re.compile(args.group_pattern)
        except re.error as exc:
            raise WsiAdError(f"--group-pattern {args.group_pattern!r}: not a regular expression ({exc})") from exc
    if args.workers < 1:
        raise WsiAdError(f"--workers must be >= 1, got {args.workers}")
    target = _stain_target(args.stain_target) if args.stain_target else None
    result = normalize_tile_folder(args.src, args.out, target=target, group_pattern=args.group_pattern,
                                   workers=args.workers, echo=print)
    for rel, reason in result.failures.items():
        print(f"failed: {rel}: {reason}", file=sys.stderr)
    return 1 if result.failures else 0


def _cmd_info(args: argparse.Namespace) -> int:
    from wsi_ad.slide import open_slide

    failed = 0
    for path in args.slides:
        try:
            with open_slide(path, mpp=args.mpp) as slide:
                print(json.dumps(slide.summary(), indent=2))
        except WsiAdError as exc:
            print(f"wsi-ad: error: {exc}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def _cmd_view(args: argparse.Namespace) -> int:
    from pipelines.viewer import serve

    serve(args.run_dir, host=args.host if args.host is not None else "127.0.0.1", port=args.port,
          n_hotspots=args.hotspots, annotations_dir=args.annotations, slides_dir=args.slides)
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from wsi_ad.config import config_summary, packaged_configs

    shipped = packaged_configs()
    width = max(map(len, shipped))
    for name, path in shipped.items():
        print(f"{name:<{width}}  {path if args.path else config_summary(path)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    run_demo(args.out, seed=args.seed)
    return 0


#: Commands that compute with torch / numba / the BLAS: their threads are sized at start-up (--threads).
COMPUTE_COMMANDS = frozenset({"demo", "process", "train", "score", "tune", "compare", "evaluate", "normalize-tiles"})


def main(argv: Sequence[str] | None = None) -> int:
    from wsi_ad.threads import available_cores, configure, set_wait_policy

    set_wait_policy()                       # before anything loads torch's OpenMP runtime
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.threads is not None and args.threads > available_cores():
        print(f"wsi-ad: warning: --threads {args.threads} is more than the {available_cores()} cores this process may "
              "run on: the threads will share them", file=sys.stderr)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command in COMPUTE_COMMANDS:
        log.info("threads: %s", configure(args.threads))
    try:
        return args.handler(args)
    except WsiAdError as exc:
        print(f"wsi-ad: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wsi-ad: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:          # the reader of our output left (`wsi-ad configs | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
