"""The per-slide chain of ``wsi-ad process`` as plain functions: the tasks of the Dask graph.

Each function takes the previous task's *result* (a JSON-ready dict), does its work through the library
(which writes the slide's store stages and skips those already there), and returns the result updated.
None of them raises for bad input: a slide that fails gets ``status: "failed"``, the ``failed_task`` and a
one-line ``error``, and every later task passes it through untouched, so one broken slide never stops the
batch. Task timings are collected in ``result["timings"]`` (seconds, wall time of each task); the store
stages a task wrote are listed in ``result["stages_run"]``.

Words: a *task* is a node of the Dask graph (this module); a *stage* is a group of a slide store
(``tissue``, ``tiles``, ``scores/<model_id>``, ...); a *phase* is a part of a detector's training schedule.

Order: :func:`preprocess_slide` (open, tissue mask, stain fit, tiles + normalization) →
:func:`plan_scoring`, :func:`score_range` tasks over contiguous tile ranges, :func:`finish_scoring` (every tile, on
the GPU when the worker has one; one big slide spread over every scoring worker) → :func:`aggregate_slide` (heatmap grid
and slide score) → :func:`overlay_slide` (heatmap over the thumbnail, on the cohort's colour scale) →
:func:`export_slide` (the ``--export`` formats, beside the store).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from wsi_ad.atomic import write_text_atomic
from wsi_ad.errors import WsiAdError
from wsi_ad.preprocess import PreprocessConfig, run_stain_stage, run_tiles_stage, run_tissue_stage
from wsi_ad.slide import open_slide, slide_id_of
from wsi_ad.store import SlideStore, qc_png_path

log = logging.getLogger(__name__)


def _task(name: str, since: str | None = None) -> Callable:
    """Decorator: skip failed inputs, time the task, and turn any error into a failed result. ``since``: a key of
    the result holding a ``time.time()`` stamp; the task's timing is then the wall time since it (a step made of
    several tasks, e.g. scoring: plan, ranges, finish)."""

    def wrap(func: Callable) -> Callable:
        @functools.wraps(func)
        def run(result: dict, *args, **kwargs) -> dict:
            if result.get("status") == "failed":
                return result
            result = dict(result, timings=dict(result.get("timings", {})))
            started = time.perf_counter()
            try:
                func(result, *args, **kwargs)
            except WsiAdError as exc:
                _fail(result, name, str(exc))
            except OSError as exc:          # disk full, permission denied: name the path
                _fail(result, name, f"{exc.filename or result.get('slide')}: {exc.strerror or exc}")
            except MemoryError:
                _fail(result, name, "out of memory")
            except Exception as exc:        # a bug, or a file that breaks a reader: this slide fails alone
                _fail(result, name, f"unexpected {type(exc).__name__}: {exc}")
                result["traceback"] = traceback.format_exc()
            if since and result.get(since) is not None:
                result["timings"][name] = round(time.time() - result[since], 3)
            else:
                result["timings"][name] = round(time.perf_counter() - started, 3)
            return result
        return run
    return wrap


def _fail(result: dict, task: str, error: str) -> None:
    result.update(status="failed", failed_task=task, error=error)


def new_result(path: str | Path) -> dict:
    """The initial result of a slide: its path and id (the file name without extension)."""
    path = Path(path)
    return {"slide": str(path), "slide_id": slide_id_of(path), "status": "ok", "timings": {}, "warnings": []}


@_task("preprocess")
def _preprocess(result: dict, out: Path, config: PreprocessConfig, mpp: float | None) -> None:
    with open_slide(result["slide"], mpp=mpp) as slide:
        store = SlideStore.for_slide(out, slide)
        qc_path = qc_png_path(out, slide.slide_id)
        mask, tissue_ran = run_tissue_stage(slide, store, config, qc_path=qc_path)
        stain, stain_ran = run_stain_stage(slide, store, mask, config)
        n_tiles, tiles_ran = run_tiles_stage(slide, store, mask, config, stain=stain)
        result.update({
            "store": str(store.path),
            "qc_png": str(qc_path),
            "mpp": slide.mpp,
            "width": slide.dimensions[0],
            "height": slide.dimensions[1],
            "tissue_area_mm2": round(mask.tissue_area_mm2, 4),
            "n_tiles": n_tiles,
            "stain_method": stain.method if stain is not None else None,
            "stages_run": [name for name, ran in (("tissue", tissue_ran), ("stain", stain_ran),
                                                  ("tiles", tiles_ran)) if ran],
            "warnings": result["warnings"] + list(mask.warnings) + (list(stain.warnings) if stain is not None else []),
        })
        if n_tiles == 0:
            result["warnings"].append("no tiles: no tissue region reaches the minimum tissue fraction")


def preprocess_slide(path: str | Path, out: str | Path, config: PreprocessConfig, *,
                     mpp: float | None = None) -> dict:
    """Open, tissue-mask, stain-fit and tile one slide into ``<out>/<slide_id>.zarr``; never raises for bad input.

    Returns a JSON-ready result: ``status`` ``"ok"`` or ``"failed"`` (with ``failed_task`` and ``error``),
    the store path, tissue area in mm², tile count, which stages ran (``stages_run``; empty when every
    stage was reused), warnings, ``timings`` and ``seconds``.
    """
    started = time.perf_counter()
    result = _preprocess(new_result(path), Path(out), config, mpp)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


@_task("open")
def _open_store(result: dict) -> None:
    store = SlideStore.open(result["store"])
    attrs = store.root.attrs
    tiles = store.require("tiles")
    source = attrs.get("source") or {}
    qc = qc_png_path(Path(result["store"]).parent, result["slide_id"])
    width, height = (attrs.get("level_dimensions") or [[None, None]])[0]
    result.update({
        "slide": source.get("path") or result["slide"], "n_tiles": int(tiles["coords"].shape[0]),
        "mpp": attrs.get("mpp_x"), "width": width, "height": height,
        "mpp_override": attrs.get("mpp_x") if attrs.get("mpp_source") == "override" else None,
        "qc_png": str(qc) if qc.is_file() else None, "stages_run": [],
    })


def open_store(path: str | Path) -> dict:
    """The result of a slide store made earlier (``wsi-ad process --out``), as :func:`preprocess_slide` gives it
    (store, slide file, tile count, µm/px), for the scoring chain of ``wsi-ad score``; never raises for bad
    input (a folder that is no slide store, a store without tiles: ``status: "failed"``)."""
    result = new_result(path)
    result["store"] = str(Path(path).absolute())
    return _open_store(result)


# -- scoring ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _cached_scorer(model: str, mtime_ns: int, device: str, backbone_weights: str | None):
    """One Scorer per (checkpoint file version, device) per worker process: loading it costs seconds."""
    from wsi_ad.detectors.scorer import load_scorer

    return load_scorer(model, device=None if device == "auto" else device, backbone_weights=backbone_weights)


def get_scorer(model: str | Path, device: str = "auto", backbone_weights: str | None = None):
    """The worker's cached :class:`~wsi_ad.detectors.scorer.Scorer` for checkpoint ``model``."""
    model = str(Path(model).resolve())
    return _cached_scorer(model, os.stat(model).st_mtime_ns, device, backbone_weights)


#: A slide's tiles are scored in tasks of this many chunks of ``wsi_ad.scoring.SCORE_CHUNK_TILES`` (2,048) tiles,
#: so one big slide spreads over every worker with the scoring resource (benchmarks/bench_pipeline.py).
SCORE_TASK_CHUNKS = 1


@_task("score-plan")
def plan_scoring(result: dict, model: str | Path, *, device: str = "auto", backbone_weights: str | None = None,
                 chunk_tiles: int | None = None, pixel_maps: bool = False) -> None:
    """Open the slide's ``scores/<model_id>`` stage (:func:`wsi_ad.scoring.plan_score_stage`: reuse, resume or
    create it; ``chunk_tiles`` per chunk, default :data:`wsi_ad.scoring.SCORE_CHUNK_TILES`; ``pixel_maps``: also
    the per-cell maps) and put the plan in ``result["score_plan"]`` (None for a slide without tiles); the chunks it
    leaves are scored by :func:`score_range` tasks, on any worker with the scoring resource, and
    :func:`finish_scoring` marks the stage complete."""
    from wsi_ad.scoring import SCORE_CHUNK_TILES, plan_score_stage

    result["score_started"] = time.time()
    if not result.get("n_tiles"):
        result.update(model_id=None, score_plan=None)
        return
    scorer = get_scorer(model, device, backbone_weights)
    plan = plan_score_stage(SlideStore.open(result["store"], mode="r+"), scorer,
                            chunk_tiles=chunk_tiles or SCORE_CHUNK_TILES, pixel_maps=pixel_maps)
    result.update(model_id=scorer.model_id, score_plan=plan.to_dict())


def score_ranges(result: dict, chunks_per_task: int = SCORE_TASK_CHUNKS) -> list[tuple[int, ...]]:
    """The chunk runs of the slide's score plan, one :func:`score_range` task each (none: nothing to score)."""
    from wsi_ad.scoring import ScorePlan

    plan = result.get("score_plan")
    if result.get("status") != "ok" or not plan:
        return []
    return ScorePlan.from_dict(plan).ranges(chunks_per_task)


@_task("score-range")
def score_range(result: dict, model: str | Path, chunks: tuple[int, ...], *, device: str = "auto",
                batch_size: int | None = None, backbone_weights: str | None = None) -> None:
    """Score ``chunks`` of the slide's score plan (:func:`wsi_ad.scoring.score_chunks`); their figures go to
    ``result["range"]``."""
    from wsi_ad.scoring import ScorePlan, default_batch_size, score_chunks

    scorer = get_scorer(model, device, backbone_weights)
    stats = score_chunks(SlideStore.open(result["store"], mode="r+"), scorer, ScorePlan.from_dict(result["score_plan"]),
                         chunks, batch_size=batch_size or default_batch_size(scorer.device))
    result["range"] = {**stats, "chunks": list(chunks), "worker": _worker_name()}


@_task("score", since="score_started")
def finish_scoring(result: dict, ranges: list[dict], model: str | Path, *, device: str = "auto",
                   batch_size: int | None = None, backbone_weights: str | None = None) -> None:
    """Once every :func:`score_range` of the slide is done: mark its scoring stage complete
    (:func:`wsi_ad.scoring.complete_score_stage`) and record how it was scored (``tiles_per_s``: tiles scored over
    the wall time from the plan to now, ``score_tasks``, ``score_worker``; ``timings["score"]``: that wall time,
    ``timings["score-range"]``: the ranges' own seconds, summed). A failed range fails the slide with its error."""
    from wsi_ad.scoring import ScorePlan, complete_score_stage, default_batch_size

    failed = next((r for r in ranges if r.get("status") == "failed"), None)
    if failed is not None:
        result["traceback"] = failed.get("traceback")
        raise WsiAdError(failed.get("error", "a scoring task failed"))
    if not result.get("score_plan"):
        return                                          # no tiles: no scores
    plan = ScorePlan.from_dict(result["score_plan"])
    scorer = get_scorer(model, device, backbone_weights)
    if plan.complete:
        result.update(scored=False, score_device=str(scorer.device), tiles_per_s=None, score_tasks=0)
        return
    batch = batch_size or default_batch_size(scorer.device)
    seconds = time.time() - result["score_started"]
    complete_score_stage(SlideStore.open(result["store"], mode="r+"), scorer, plan, [r["range"] for r in ranges],
                         batch_size=batch, seconds=seconds)
    tiles = sum(r["range"]["tiles"] for r in ranges)
    result["timings"]["score-range"] = round(sum(r["timings"].get("score-range", 0.0) for r in ranges), 3)
    workers = sorted({str(r["range"]["worker"]) for r in ranges if r["range"].get("worker") is not None})
    result.update(scored=True, score_tasks=len(ranges), score_worker=", ".join(workers) or None,
                  score_device=", ".join(sorted({r["range"]["device"] for r in ranges})),
                  tiles_per_s=round(tiles / seconds, 1) if seconds > 0 else None)
    result["stages_run"] = result.get("stages_run", []) + [plan.stage]


def _worker_name() -> str | None:
    """The Dask worker running this task (None outside a worker): the report shows where scoring ran."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return None


@_task("aggregate")
def aggregate_slide(result: dict, *, reducer: str | None = None, smoothing_um: float | None = None) -> None:
    """Tile scores → heatmap grid and slide score (stage ``heatmap/<model_id>``)."""
    from wsi_ad.heatmap import DEFAULT_REDUCER, run_heatmap_stage

    if not result.get("model_id"):
        result["slide_score"] = None
        return
    store = SlideStore.open(result["store"], mode="r+")
    heatmap = run_heatmap_stage(store, result["model_id"], reducer=reducer or DEFAULT_REDUCER,
                                smoothing_um=smoothing_um)
    result.update({"slide_score": float(heatmap.slide_score), "reducer": heatmap.reducer})


def cohort_scale_of(results: list[dict]):
    """One colour scale for every slide of the run (from all scored tiles pooled), or None if nothing was scored."""
    from wsi_ad.overlay import cohort_scale
    from wsi_ad.scoring import load_scores

    arrays, units = [], None
    for result in results:
        if result.get("status") == "ok" and result.get("model_id"):
            store = SlideStore.open(result["store"])
            arrays.append(load_scores(store, result["model_id"]))
            units = units or store.require(f"scores/{result['model_id']}")["scores"].attrs.get("units")
    if not arrays:
        return None
    return cohort_scale(arrays, units=units) if units else cohort_scale(arrays)


def geojson_threshold(explicit: float | None, scale) -> float | None:
    """The score at or above which heatmap cells form GeoJSON regions: ``explicit`` (``--geojson-threshold``), else
    the top of the run's colour scale ``scale`` (the 99th percentile of all its tile scores); None without both."""
    if explicit is not None:
        return float(explicit)
    return float(scale.vmax) if scale is not None else None


@_task("overlay")
def overlay_slide(result: dict, scale, out: Path, *, annotations_dir: Path | None = None,
                  mpp: float | None = None) -> None:
    """Write ``<out>/overlays/<slide_id>.png``: the heatmap over the thumbnail on the cohort scale ``scale``.

    Skipped when the PNG exists and its sidecar JSON records the same model, heatmap and scale. With
    ``annotations_dir``, ``<slide_id>.xml`` there (ASAP XML, :func:`wsi_ad.annotations.annotation_file`) is
    outlined.
    """
    from wsi_ad.heatmap import load_heatmap
    from wsi_ad.overlay import write_overlay
    from wsi_ad.preprocess import load_tissue_mask

    if scale is None or not result.get("model_id"):
        return
    store = SlideStore.open(result["store"])
    png = out / "overlays" / f"{result['slide_id']}.png"
    xml = None
    if annotations_dir:
        from wsi_ad.annotations import AnnotationError, annotation_file

        try:
            xml = annotation_file(annotations_dir, result["slide_id"])
        except AnnotationError as exc:  # two candidates: outline neither rather than guess
            result["warnings"] = [*result.get("warnings", []), f"overlay drawn without lesion outlines: {exc}"]
    stamp = {"model_id": result["model_id"], "heatmap": store.stages[f"heatmap/{result['model_id']}"]["config_hash"],
             "scale": [float(scale.vmin), float(scale.vmax)], "annotations": str(xml) if xml else None}
    sidecar = png.with_suffix(".json")
    result["overlay_png"] = str(png)
    if png.exists() and sidecar.exists() and json.loads(sidecar.read_text()) == stamp:
        return
    annotations = None
    if xml is not None:
        from wsi_ad.annotations import AnnotationError, read_asap_xml

        try:
            annotations = read_asap_xml(xml)
        except AnnotationError as exc:  # a drawing problem: the overlay goes without outlines, the slide stays ok
            result["warnings"] = [*result.get("warnings", []), f"overlay drawn without lesion outlines: {exc}"]
    with open_slide(result["slide"], mpp=mpp if mpp is not None else result.get("mpp_override")) as slide:
        write_overlay(png, slide, load_heatmap(store, result["model_id"]), scale,
                      tissue_mask=load_tissue_mask(store), annotations=annotations)
    write_text_atomic(sidecar, json.dumps(stamp))


@_task("export")
def export_slide(result: dict, formats: tuple[str, ...], *, threshold: float | None = None,
                 mpp: float | None = None) -> None:
    """Write the ``formats`` exports (``geojson``, ``ngff``, ``h5``) of the slide beside its store, in the
    store's folder (:func:`wsi_ad.export.export_store`: atomic, and kept when the file on disk was made from
    the same stages, model and GeoJSON ``threshold``). ``result["exports"]`` maps each format to its path,
    ``result["exports_written"]`` lists those written by this run. A slide without scored tiles gets the
    coordinates export only, and a warning for the heatmap formats it cannot have."""
    from contextlib import nullcontext

    from wsi_ad.export import HEATMAP_FORMATS, export_store

    if not formats or not result.get("store"):
        return
    wanted = list(formats)
    if not result.get("model_id"):
        lacking = [f for f in wanted if f in HEATMAP_FORMATS]
        if lacking:
            result["warnings"] = [*result.get("warnings", []),
                                  f"no {'/'.join(lacking)} export: the slide has no scored tiles"]
        wanted = [f for f in wanted if f not in HEATMAP_FORMATS]
    if not wanted:
        return
    store = SlideStore.open(result["store"])
    mpp = mpp if mpp is not None else result.get("mpp_override")
    with (open_slide(result["slide"], mpp=mpp) if "h5" in wanted else nullcontext()) as slide:
        done = export_store(store, wanted, Path(result["store"]).parent, model_id=result.get("model_id"),
                            threshold=threshold, slide=slide)
    result["exports"] = {fmt: info["path"] for fmt, info in done.items()}
    result["exports_written"] = [fmt for fmt, info in done.items() if info["written"]]
