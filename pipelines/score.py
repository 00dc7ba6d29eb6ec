"""``wsi-ad score``: score every tile of slide stores (or folders of image tiles) with a trained model.

Argument parsing and reporting only; the work is :func:`wsi_ad.scoring.run_score_stage` (stores) and
:func:`wsi_ad.scoring.score_image_folder` (``--tiles``). ``pipelines/cli.py`` wires them::

    score = sub.add_parser("score", help=...)
    add_score_arguments(score)
    score.set_defaults(handler=run_score)

Each store runs alone: a store that cannot be scored is reported on one line with its reason and the
others go on; the exit status is then 1. Scores already in a store for the same model and tiles are
reused; a run interrupted part-way continues from its last finished chunk.
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
                        help="skip heatmaps, slide scores and overlays (default: written for every scored store, "
                             "on one colour scale, as <stores folder>/overlays/<slide_id>.png)")
    parser.add_argument("--annotations", type=Path, metavar="DIR",
                        help="folder of <slide_id>.xml ASAP annotations to outline on the overlays")
    parser.add_argument("--tiles", action="store_true",
                        help="the paths are PNG/JPEG tiles or folders of them; writes --csv")
    parser.add_argument("--csv", type=Path, help="with --tiles: output CSV (path,score), required")
    parser.add_argument("--image-mpp", type=float,
                        help="with --tiles: µm/px of the images, to resize them to the model's magnification")


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
    from wsi_ad.store import SlideStore

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
                       "store": str(path), "model_id": scorer.model_id, "status": "ok", "timings": {}})
    if scored and not args.no_overlays:
        failed += _overlays(scored, args.annotations)
    return 1 if failed else 0


def _overlays(scored: list[dict], annotations: Path | None) -> int:
    """Heatmap and slide score of every scored store, then overlays on one colour scale for all of them, in
    ``<store folder>/overlays``; returns the number of stores that failed here (each printed)."""
    from pipelines.tasks import aggregate_slide, cohort_scale_of, overlay_slide

    results = [aggregate_slide(r) for r in scored]
    scale = cohort_scale_of(results)
    if scale is not None:
        print(f"cohort colour scale {scale.vmin:.4g} – {scale.vmax:.4g} over {len(results)} slides")
    failed = 0
    for result in results:
        if result["status"] == "ok":
            result = overlay_slide(result, scale, Path(result["store"]).parent, annotations_dir=annotations)
        if result["status"] == "failed":
            failed += 1
            print(f"{result['slide_id']}: failed at {result['failed_task']}: {result['error']}")
        else:
            print(f"{result['slide_id']}  slide score {result['slide_score']:.4g} ({result['reducer']})  "
                  f"overlay {result.get('overlay_png')}")
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
