"""``wsi-ad score``: score every tile of slide stores (or folders of image tiles) with a trained model.

Argument parsing and reporting only; the work is :func:`wsi_ad.scoring.run_score_stage` (stores) and
:func:`wsi_ad.scoring.score_image_folder` (``--tiles``). ``pipelines/cli.py`` wires them::

    score = sub.add_parser("score", help=...)
    add_score_arguments(score)
    score.set_defaults(handler=run_score)

Each store runs alone: a store that cannot be scored is reported on one line with its reason and the
others go on; the exit status is then 1. ``--export geojson,ngff,h5`` writes the exports beside each store
(:func:`wsi_ad.export.export_store`), as ``wsi-ad process`` does. Scores already in a store for the same model and tiles are
reused; a run interrupted part-way continues from its last finished chunk.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from wsi_ad.errors import WsiAdError
from wsi_ad.store import SlideStore, is_store_path, stores_in


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
                        help="skip overlays, and heatmaps and slide scores unless --export needs them (default: "
                             "written for every scored store, on one colour scale, as "
                             "<stores folder>/overlays/<slide_id>.png)")
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
    failed (each failure printed on one line). Raises :class:`WsiAdError` on bad arguments or an unusable
    model, which the CLI prints as one line."""
    from wsi_ad.detectors.scorer import load_scorer

    if args.tiles and args.csv is None:
        raise WsiAdError("--tiles needs --csv OUT.csv (where the tile scores go)")
    if not args.tiles and (args.csv is not None or args.image_mpp is not None):
        raise WsiAdError("--csv and --image-mpp apply to --tiles only")
    args.exports = export_formats(args, scored=True)
    if args.tiles and args.exports:
        raise WsiAdError("--export applies to slide stores, not to --tiles")
    device = None if args.device == "auto" else args.device
    if device == "cuda":
        from wsi_ad.device import select_device

        select_device("cuda")                          # one-line error when CUDA is absent
    scorer = load_scorer(args.model, device=device, backbone_weights=args.backbone_weights)
    if args.batch_size is None:
        from wsi_ad.scoring import default_batch_size

        args.batch_size = default_batch_size(scorer.device)
    print(f"model {scorer.model_id} ({scorer.magnification}, {scorer.image_size} px, {scorer.units}) on {scorer.device} "
          f"({scorer.precision})", file=sys.stderr)
    if args.tiles:
        return _score_tiles(args, scorer)
    return _score_stores(args, scorer)


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


def _score_stores(args: argparse.Namespace, scorer) -> int:
    from wsi_ad.scoring import run_score_stage, score_stage_name

    stores, bad = find_stores(args.paths)
    failed = len(bad)
    scored: list[dict] = []
    for path, reason in bad:
        print(f"{path}: failed: {reason}")
    for path in stores:
        started = time.perf_counter()
        try:
            store = SlideStore.open(path, mode="r+")
            bar = _progress_bar(path.stem)
            try:
                scores, computed = run_score_stage(store, scorer, batch_size=args.batch_size,
                                                   pixel_maps=args.pixel_maps, progress=bar)
            finally:
                if bar is not None:
                    bar.close()
        except WsiAdError as exc:
            failed += 1
            print(f"{path.stem}: failed: {exc}")
            continue
        except OSError as exc:                       # unreadable chunk, disk full, permission denied
            failed += 1
            print(f"{path.stem}: failed: {exc.filename or path}: {exc.strerror or exc}")
            continue
        seconds = time.perf_counter() - started
        marker = store.stages.get(score_stage_name(scorer.model_id), {})
        rate = marker.get("tiles_per_s")              # of the run that scored them (reused: an earlier one)
        resumed = marker.get("resumed_tiles", 0) if computed else 0
        how = ("scored" + (f" (resumed after {resumed} tiles)" if resumed else "")) if computed else "reused"
        print(f"{store.root.attrs.get('slide_id', path.stem)}  {len(scores)} tiles  {seconds:.1f} s  "
              f"{rate or 0:.0f} tiles/s  {how}  {_percentiles(scores)}")
        scored.append({"slide": store.root.attrs["source"]["path"], "slide_id": store.root.attrs["slide_id"],
                       "store": str(path), "model_id": scorer.model_id if len(scores) else None,  # no tiles: no heatmap
                       "n_tiles": len(scores), "status": "ok", "timings": {}, "warnings": []})
    if scored and (args.exports or not args.no_overlays):
        failed += _heatmaps_overlays_exports(scored, args)
    return 1 if failed else 0


def _heatmaps_overlays_exports(scored: list[dict], args: argparse.Namespace) -> int:
    """Heatmap and slide score of every scored store, then (unless ``--no-overlays``) overlays on one colour
    scale for all of them, in ``<store folder>/overlays``, and the ``--export`` formats beside each store;
    returns the number of stores that failed here (each printed)."""
    from pipelines.tasks import aggregate_slide, cohort_scale_of, export_slide, geojson_threshold, overlay_slide

    results = [aggregate_slide(r) for r in scored]
    scale = cohort_scale_of(results)
    if scale is not None:
        print(f"cohort colour scale {scale.vmin:.4g} – {scale.vmax:.4g} over {len(results)} slides")
    threshold = geojson_threshold(args.geojson_threshold, scale)
    failed = 0
    for result in results:
        if not args.no_overlays:
            result = overlay_slide(result, scale, Path(result["store"]).parent, annotations_dir=args.annotations)
        if args.exports and result["status"] == "ok":
            attrs = SlideStore.open(result["store"]).root.attrs
            mpp = attrs.get("mpp_x") if attrs.get("mpp_source") == "override" else None
            result = export_slide(result, args.exports, threshold=threshold, mpp=mpp)
        if result["status"] == "failed":
            failed += 1
            print(f"{result['slide_id']}: failed at {result['failed_task']}: {result['error']}")
            continue
        facts = [f"slide score {result['slide_score']:.4g} ({result['reducer']})" if result.get("slide_score") is not None
                 else "no slide score (no tiles)"]
        if result.get("overlay_png"):
            facts.append(f"overlay {result['overlay_png']}")
        written = result.get("exports_written") or []
        facts += [f"{fmt} {path}{'' if fmt in written else ' (reused)'}" for fmt, path in result.get("exports", {}).items()]
        facts += [f"warning: {w}" for w in result.get("warnings", [])]
        print(f"{result['slide_id']}  " + "  ".join(facts))
    return failed


class _Bar:
    """``progress(done, total)`` adapter for a tqdm bar on stderr (only when stderr is a terminal)."""

    def __init__(self, name: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=name, unit="tile", dynamic_ncols=True, leave=False)

    def __call__(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _progress_bar(name: str) -> _Bar | None:
    return _Bar(name) if sys.stderr.isatty() else None
