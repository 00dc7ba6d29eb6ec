"""``wsi-ad score``: score every tile of slide stores (or folders of image tiles) with a trained model.

Slide stores run through the same Dask graph as ``wsi-ad process --model`` (:func:`pipelines.process.score_stores`:
a local cluster, or ``--scheduler``): each store opened, scored in tasks over tile ranges on the workers with
the scoring resource, aggregated into its heatmap and slide score; then one colour scale for all of them,
overlays (``OUT/overlays``, unless ``--no-overlays``) and the ``--export`` formats beside each store; the same
progress lines, report (``OUT/report.json``, ``report.html``, ``failures.json``, ``wsi-ad.log``) and failure
handling: a store that cannot be scored fails alone, with its reason, and the exit status is then 1. ``OUT`` is
``--out``, by default the stores' folder. Scores already in a store for the same model and tiles are reused; a
run interrupted part-way continues from its last finished chunk. ``--tiles`` scores folders of image tiles in this
process (:func:`wsi_ad.scoring.score_image_folder`) into a CSV. ``pipelines/cli.py`` wires it::

    score = sub.add_parser("score", help=...)
    add_score_arguments(score)
    score.set_defaults(handler=run_score)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from wsi_ad.errors import WsiAdError
from wsi_ad.store import is_store_path, stores_in


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``score`` subcommand's arguments to ``parser``."""
    parser.add_argument("paths", type=Path, nargs="+", metavar="STORE_OR_DIR",
                        help="slide stores (*.zarr) or folders of stores (the --out of `wsi-ad process`); "
                             "with --tiles, PNG/JPEG tiles or folders of them")
    parser.add_argument("--model", type=Path, required=True, help="checkpoint written by `wsi-ad train`")
    parser.add_argument("--batch-size", type=_positive, help="tiles per batch (default: 64 on the CPU, 256 on CUDA)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="default: cuda when available (bf16 autocast), else cpu (float32)")
    parser.add_argument("--pixel-maps", action="store_true",
                        help="also store per-feature-cell anomaly maps (scores/<model_id>/pixel_maps, float16)")
    parser.add_argument("--backbone-weights", type=Path,
                        help="pretrained backbone weight file (default: the backbone's registered source)")
    parser.add_argument("--no-overlays", action="store_true",
                        help="skip the overlays (default: one per scored store, on one colour scale, as "
                             "OUT/overlays/<slide_id>.png)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="folder of the report (report.html, report.json, failures.json, wsi-ad.log) and the "
                             "overlays (default: the stores' folder, when they share one)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="run on an existing dask.distributed cluster (e.g. tcp://10.0.0.5:8786) instead of a "
                             "local one; workers must see the same paths")
    parser.add_argument("--workers", type=_positive, help="local cluster: worker processes (default: one per core)")
    parser.add_argument("--annotations", type=Path, metavar="DIR",
                        help="folder of <slide_id>.xml ASAP annotations to outline on the overlays")
    parser.add_argument("--tiles", action="store_true",
                        help="the paths are PNG/JPEG tiles or folders of them; writes --csv")
    parser.add_argument("--csv", type=Path, help="with --tiles: output CSV (path,score), required")
    parser.add_argument("--image-mpp", type=float,
                        help="with --tiles: µm/px of the images, to resize them to the model's magnification")
    add_export_arguments(parser)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """``--export``, ``--export-h5`` and ``--geojson-threshold``, the same on ``process`` and ``score``."""
    parser.add_argument("--export", metavar="FORMATS", default="",
                        help="comma-separated exports written beside each store, in its folder: geojson "
                             "(geojson/<slide_id>.geojson, high-score regions as QuPath annotations in level-0 px), "
                             "ngff (ngff/<slide_id>.ome.zarr, the heatmap as OME-NGFF in µm for napari), h5 "
                             "(h5/<slide_id>.h5, CLAM-style tile coordinates and scores); geojson and ngff need "
                             "scores; a re-run rewrites only what changed")
    parser.add_argument("--export-h5", action="store_true", help="the same as --export h5")
    parser.add_argument("--geojson-threshold", type=float, metavar="SCORE",
                        help="heatmap cells at or above SCORE form the GeoJSON regions (default: the top of the "
                             "run's colour scale, the 99th percentile of all its tile scores)")


def export_formats(args: argparse.Namespace, *, scored: bool) -> tuple[str, ...]:
    """The formats ``--export`` / ``--export-h5`` ask for; raises ``WsiAdError`` for an unknown format, for
    heatmap formats without scores and for ``--geojson-threshold`` without ``--export geojson``."""
    from wsi_ad.export import HEATMAP_FORMATS, parse_export_formats

    formats = parse_export_formats(args.export)
    if args.export_h5 and "h5" not in formats:
        formats += ("h5",)
    lacking = [f for f in formats if f in HEATMAP_FORMATS]
    if lacking and not scored:
        raise WsiAdError(f"--export {','.join(lacking)} is made from the heatmaps: add --model to score the tiles")
    if args.geojson_threshold is not None and "geojson" not in formats:
        raise WsiAdError("--geojson-threshold applies to --export geojson only")
    if args.geojson_threshold is not None and not np.isfinite(args.geojson_threshold):
        raise WsiAdError(f"--geojson-threshold must be a finite score, got {args.geojson_threshold}")
    return formats


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value



def find_stores(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Stores named by ``paths`` (stores, or folders holding ``*.zarr`` stores) and the paths that name
    none, with the reason: ``(stores, [(path, reason), ...])``."""
    stores: list[Path] = []
    bad: list[tuple[Path, str]] = []
    for path in paths:
        if not path.exists():
            bad.append((path, "no such file or folder"))
        elif is_store_path(path):
            stores.append(path)
        elif path.is_dir():
            found = stores_in(path)
            if found:
                stores += found
            else:
                bad.append((path, "no slide stores (*.zarr) in this folder"))
        else:
            bad.append((path, "not a slide store (*.zarr) or a folder of stores"))
    return stores, bad


def _percentiles(scores: np.ndarray) -> str:
    if not len(scores):
        return "no tiles"
    p5, p50, p95 = np.percentile(scores, [5, 50, 95])
    return f"p5 {p5:.4f}  p50 {p50:.4f}  p95 {p95:.4f}  max {float(scores.max()):.4f}"


def run_score(args: argparse.Namespace) -> int:
    """Run ``wsi-ad score``; returns 0 when every store (or the tile folder) was scored, 1 when some store
    failed (each failure reported with its reason). Raises :class:`WsiAdError` on bad arguments or an unusable
    model, which the CLI prints as one line."""
    from wsi_ad.detectors.checkpoint import load_checkpoint

    if args.tiles and args.csv is None:
        raise WsiAdError("--tiles needs --csv OUT.csv (where the tile scores go)")
    if not args.tiles and (args.csv is not None or args.image_mpp is not None):
        raise WsiAdError("--csv and --image-mpp apply to --tiles only")
    if args.tiles and (args.out is not None or args.scheduler is not None or args.workers is not None):
        raise WsiAdError("--out, --scheduler and --workers apply to slide stores, not to --tiles")
    args.exports = export_formats(args, scored=True)
    if args.tiles and args.exports:
        raise WsiAdError("--export applies to slide stores, not to --tiles")
    if args.device == "cuda":
        from wsi_ad.device import select_device

        select_device("cuda")                          # one-line error when CUDA is absent
    if args.tiles:
        from wsi_ad.detectors.scorer import load_scorer

        device = None if args.device == "auto" else args.device
        scorer = load_scorer(args.model, device=device, backbone_weights=args.backbone_weights)
        if args.batch_size is None:
            from wsi_ad.scoring import default_batch_size

            args.batch_size = default_batch_size(scorer.device)
        print(f"model {scorer.model_id} ({scorer.magnification}, {scorer.image_size} px, {scorer.units}) on "
              f"{scorer.device} ({scorer.precision})", file=sys.stderr)
        return _score_tiles(args, scorer)
    load_checkpoint(args.model)                        # an unusable checkpoint is one line now, not one per store
    return _score_stores(args)


def _score_tiles(args: argparse.Namespace, scorer) -> int:
    from wsi_ad.scoring import score_image_folder, write_scores_csv

    started = time.perf_counter()
    rows = score_image_folder(args.paths, scorer, batch_size=args.batch_size, image_mpp=args.image_mpp)
    seconds = time.perf_counter() - started
    write_scores_csv(args.csv, rows)
    scores = np.array([s for _, s in rows], dtype=np.float32)
    print(f"{len(rows)} tiles  {seconds:.1f} s  {len(rows) / max(seconds, 1e-9):.0f} tiles/s  scored  "
          f"{_percentiles(scores)}  -> {args.csv}")
    return 0


def _score_stores(args: argparse.Namespace) -> int:
    from pipelines.process import BatchConfig, score_stores

    stores, bad = find_stores(args.paths)
    for path, reason in bad:
        print(f"{path}: failed: {reason}")
    if not stores:
        return 1
    out = args.out
    if out is None:
        folders = sorted({p.absolute().parent for p in stores})
        if len(folders) > 1:
            raise WsiAdError(f"the stores are in {len(folders)} folders ({', '.join(map(str, folders[:3]))}...): "
                             "give --out DIR for the report and the overlays")
        out = folders[0]
    batch = BatchConfig(model=args.model, device=args.device, batch_size=args.batch_size,
                        backbone_weights=str(args.backbone_weights) if args.backbone_weights else None,
                        annotations_dir=args.annotations, exports=args.exports,
                        geojson_threshold=args.geojson_threshold, pixel_maps=args.pixel_maps,
                        overlays=not args.no_overlays)
    result = score_stores(stores, out, batch, scheduler=args.scheduler, workers=args.workers)
    for row in result.results:
        if row["status"] == "ok":
            print(f"{row['slide_id']}  {row.get('n_tiles', 0)} tiles  " + (
                f"slide score {row['slide_score']:.4g} ({row['reducer']})" if row.get("slide_score") is not None
                else "no slide score (no tiles)") + (f"  overlay {row['overlay_png']}" if row.get("overlay_png") else "")
                + "".join(f"  {fmt} {path}{'' if fmt in (row.get('exports_written') or []) else ' (reused)'}"
                          for fmt, path in (row.get("exports") or {}).items()))
    return 1 if result.n_failed or bad else 0
