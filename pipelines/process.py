"""``wsi-ad process``: the main job, a Dask graph over a folder of slides.

Per slide, a chain of tasks (:mod:`pipelines.tasks`): preprocess (open → tissue mask → stain fit → tiles +
normalization) → score (with ``--model``: a plan task, then one task per chunk of 2,048 tiles on any worker with
the scoring resource, a GPU worker when there is one, then a finish task) → aggregate (heatmap, slide score);
then, once every slide is scored, one colour scale for the whole cohort and an overlay per slide; then the
report. :func:`score_stores` (``wsi-ad score``) runs the same graph on stores made earlier, from the score on.
Slides run in parallel on a local ``dask.distributed`` cluster sized to the machine, or on an existing cluster
(``--scheduler``); the library (:mod:`wsi_ad`) knows nothing of Dask.

* **Resume**: every stage is skipped when the slide's store already holds it for the same settings (and the
  same source file size/mtime), so a re-run after ``kill -9`` redoes only what was unfinished.
* **Failure isolation**: a slide that cannot be opened, read or processed fails alone, with its task and
  reason in ``OUT/failures.json`` and the report; a worker that dies on a slide (a reader crash) fails that
  slide only. ``fail_fast`` stops at the first failure instead.
* **Outputs** in OUT: ``<slide_id>.zarr`` stores, ``qc/``, ``overlays/``, ``report.json``, ``report.html``,
  ``failures.json``, ``wsi-ad.log``; with ``exports``, ``h5/``, ``geojson/`` and ``ngff/`` beside the stores
  (:func:`wsi_ad.export.export_store`).

:func:`process_paths` runs only the preprocessing, in this process, one slide after the other: the
library-level convenience the tests and small scripts use.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.tasks import (
    SCORE_TASK_CHUNKS,
    aggregate_slide,
    cohort_scale_of,
    export_slide,
    finish_scoring,
    geojson_threshold,
    new_result,
    open_store,
    overlay_slide,
    plan_scoring,
    preprocess_slide,
    score_range,
    score_ranges,
)
from wsi_ad.atomic import writable_folder, write_text_atomic
from wsi_ad.errors import WsiAdError
from wsi_ad.metrics import normalize_slide_id
from wsi_ad.preprocess import PreprocessConfig
from wsi_ad.slide import find_slides, slide_id_of

log = logging.getLogger(__name__)
#: The run's own log (progress lines, failures) that goes to ``OUT/wsi-ad.log``, not to the console twice.
run_log = logging.getLogger("wsi_ad.run")
run_log.propagate = False
run_log.setLevel(logging.INFO)

LOG_NAME = "wsi-ad.log"


@dataclass(frozen=True)
class BatchConfig:
    """Everything ``wsi-ad process`` does to each slide.

    Attributes:
        preprocess: tissue, stain and tiling settings.
        mpp: level-0 µm/px for slides without resolution metadata (overrides the files').
        exports: formats to write beside each store (``geojson``, ``ngff``, ``h5``: see
            :data:`wsi_ad.export.EXPORT_FORMATS`); ``geojson`` and ``ngff`` need ``model``.
        geojson_threshold: score at or above which heatmap cells form the GeoJSON regions (None: the top of
            the run's colour scale, the 99th percentile of all its tile scores).
        model: checkpoint to score tiles with (None: preprocessing only).
        device: ``auto`` / ``cuda`` / ``cpu`` for scoring.
        batch_size: tiles per scoring batch (None: 64 on the CPU, 256 on CUDA).
        backbone_weights: backbone weight file for checkpoints whose backbone needs one.
        reducer: slide-score reducer (None: the library default).
        smoothing_um: heatmap smoothing (µm; None: off).
        annotations_dir: folder of ``<slide_id>.xml`` ASAP annotations outlined on the overlays.
        labels: reference CSV (Camelyon16 ``reference.csv`` format) for the report's ROC curve and AUC.
        fail_fast: stop at the first failed slide.
        score_task_chunks: a slide's tiles are scored in tasks of this many chunks
            (:data:`pipelines.tasks.SCORE_TASK_CHUNKS`).
        score_chunk_tiles: tiles per chunk of the stored scores, the unit of resume (None:
            :data:`wsi_ad.scoring.SCORE_CHUNK_TILES`, 2,048).
        pixel_maps: also store the per-feature-cell maps of every tile.
        overlays: draw each scored slide's overlay (``OUT/overlays``).
    """

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    mpp: float | None = None
    exports: tuple[str, ...] = ()
    geojson_threshold: float | None = None
    model: Path | None = None
    device: str = "auto"
    batch_size: int | None = None
    backbone_weights: str | None = None
    reducer: str | None = None
    smoothing_um: float | None = None
    annotations_dir: Path | None = None
    labels: Path | None = None
    fail_fast: bool = False
    score_task_chunks: int = SCORE_TASK_CHUNKS
    score_chunk_tiles: int | None = None
    pixel_maps: bool = False
    overlays: bool = True


def discover(paths: Iterable[str | Path]) -> list[Path]:
    """Slide files of ``paths`` (files, or folders searched by the extensions OpenSlide reads), as the user
    named them (symlinks are not resolved: a slide's id is its given name, :func:`wsi_ad.slide.slide_id_of`);
    refuses none found, and, before any work, ids that collide as later stages compare them (case-insensitively):
    they would share one store."""
    paths = list(paths)
    slides = find_slides(paths)
    if not slides:
        raise WsiAdError(f"no slide files found in {', '.join(map(str, paths))}")
    by_id: dict[str, list[Path]] = {}
    for slide in slides:
        by_id.setdefault(normalize_slide_id(slide_id_of(slide)), []).append(slide)
    clashes = ["; ".join(str(p) for p in group) for group in by_id.values() if len(group) > 1]
    if clashes:
        raise WsiAdError(f"slides share an id (the file name without extension, compared case-insensitively): "
                         f"{' | '.join(clashes)}; rename them or process them into different --out folders")
    return [slide.absolute() for slide in slides]


def process_paths(paths: Iterable[str | Path], out: str | Path, config: PreprocessConfig, *,
                  mpp: float | None = None, exports: tuple[str, ...] = (), echo=print) -> list[dict]:
    """Preprocess every slide named by ``paths`` in this process, one after the other (no Dask, no scoring);
    ``exports`` may name ``h5`` only (the tile coordinates; the other formats need scores).

    Returns one result per slide (see :func:`pipelines.tasks.preprocess_slide`); bad slides fail alone.
    """
    out = Path(out)
    slides = discover(paths)
    out = writable_folder(out, "--out")
    results = []
    echo(f"{'slide':<28} {'status':<7} {'tissue mm²':>10} {'tiles':>7} {'s':>7}  note")
    for path in slides:
        result = export_slide(preprocess_slide(path, out, config, mpp=mpp), tuple(exports), mpp=mpp)
        results.append(result)
        echo(_summary_line(result))
    failed = sum(r["status"] == "failed" for r in results)
    echo(f"\n{len(results) - failed} of {len(results)} slides done, {failed} failed; stores in {out}")
    return results


# -- the Dask batch -------------------------------------------------------------------------------------------

@dataclass
class BatchResult:
    """What a batch run produced: one result per slide (in discovery order), the report's paths, metrics."""

    results: list[dict]
    report_json: Path
    report_html: Path
    failures_json: Path
    metrics: dict | None
    seconds: float

    @property
    def n_failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.results)


def run_batch(paths: Sequence[str | Path], out: str | Path, batch: BatchConfig, *, scheduler: str | None = None,
              workers: int | None = None, threads_per_worker: int | None = None,
              echo: Callable[[str], None] = print) -> BatchResult:
    """Run every slide of ``paths`` through the per-slide chain on a Dask cluster; write the report.

    ``scheduler``: address of an existing ``dask.distributed`` scheduler (default: a local cluster of
    ``workers`` processes with ``threads_per_worker`` threads, sized to the machine when not given).
    """
    slides = discover(paths)
    return _execute(slides, "slides", out, batch, scheduler=scheduler, workers=workers,
                    threads_per_worker=threads_per_worker, echo=echo)


def score_stores(stores: Sequence[str | Path], out: str | Path, batch: BatchConfig, *, scheduler: str | None = None,
                 workers: int | None = None, threads_per_worker: int | None = None,
                 echo: Callable[[str], None] = print) -> BatchResult:
    """``wsi-ad score``: the scoring part of the chain (:func:`run_batch` without preprocessing) on slide stores
    made earlier, on the same Dask graph: each store opened (:func:`pipelines.tasks.open_store`), scored in tile
    ranges, aggregated; then the cohort colour scale, overlays (unless ``batch.overlays`` is off) and exports into
    ``out``, with the same progress lines, report (``out/report.json``, ``report.html``, ``failures.json``) and
    failure handling. ``batch.model`` is required. Raises ``WsiAdError`` for no store or two stores of one slide id."""
    if batch.model is None:
        raise WsiAdError("score_stores needs a model (BatchConfig.model)")
    stores = [Path(p).absolute() for p in stores]
    if not stores:
        raise WsiAdError("no slide stores to score")
    by_id: dict[str, list[Path]] = {}
    for store in stores:
        by_id.setdefault(normalize_slide_id(slide_id_of(store)), []).append(store)
    clashes = ["; ".join(str(p) for p in group) for group in by_id.values() if len(group) > 1]
    if clashes:
        raise WsiAdError(f"stores of the same slide id: {' | '.join(clashes)}; score them into different --out folders")
    return _execute(stores, "stores", out, batch, scheduler=scheduler, workers=workers,
                    threads_per_worker=threads_per_worker, echo=echo)


def _execute(items: list[Path], kind: str, out: str | Path, batch: BatchConfig, *, scheduler: str | None,
             workers: int | None, threads_per_worker: int | None, echo: Callable[[str], None]) -> BatchResult:
    """The graph over ``items`` (slide files, or ``kind="stores"``: slide stores), then the report."""
    import dask
    import distributed  # noqa: F401  (loads its config defaults first: the override below must not hide them)

    from pipelines.cluster import connect
    from pipelines.report import write_report

    started = time.perf_counter()
    out = writable_folder(out, "--out")
    if batch.model is not None and not Path(batch.model).is_file():
        raise WsiAdError(f"--model {batch.model}: checkpoint not found")
    handler = _attach_log_file(out / LOG_NAME)
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": 1}), \
                connect(scheduler, workers=workers, threads_per_worker=threads_per_worker,
                        use_gpu=batch.device != "cpu") as (client, info):
            where = info.address if not info.local else f"local cluster, {info.n_workers} workers"
            gpu = f", {info.gpu_workers} GPU worker(s) for scoring" if info.gpu_workers else ""
            _say(echo, f"{len(items)} {'stores' if kind == 'stores' else 'slides'} → {out} ({where}{gpu})")
            results, scale = _run_graph(client, info, items, out, batch, echo, kind)
        from wsi_ad.threads import current

        metrics = write_report(out, results, labels=batch.labels, model=batch.model,
                               seconds=time.perf_counter() - started, scale=scale,
                               annotations_dir=batch.annotations_dir,
                               threads={"main": current(), "workers": info.worker_threads})
    finally:
        run_log.removeHandler(handler)
        handler.close()
    failures = [{key: r.get(key) for key in ("slide", "slide_id", "failed_task", "error")}
                for r in results if r["status"] == "failed"]
    write_text_atomic(out / "failures.json", json.dumps(failures, indent=2))
    seconds = time.perf_counter() - started
    done = len(results) - len(failures)
    _say(echo, f"{done} of {len(results)} slides done, {len(failures)} failed in {seconds:.1f} s; "
               f"report: {out / 'report.html'}")
    return BatchResult(results, out / "report.json", out / "report.html", out / "failures.json", metrics, seconds)


def _run_graph(client, info, slides: list[Path], out: Path, batch: BatchConfig, echo, kind: str = "slides"
               ) -> tuple[list[dict], object]:
    """Every slide's final result (in ``slides`` order) and the run's cohort colour scale (None without a model or
    when it could not be computed)."""
    from distributed import as_completed

    run_id = uuid.uuid4().hex[:6]
    model = str(Path(batch.model).resolve()) if batch.model is not None else None
    chains: dict[str, object] = {}          # slide id -> last future of its chain
    task_of: dict[str, tuple[str, str]] = {}   # future key -> (slide id, task)
    submitted = []

    def submit(func, *args, task: str, sid: str, resources=None, part: str = "", **kwargs):
        future = client.submit(func, *args, key=f"{task}-{sid}{part}-{run_id}", resources=resources, pure=False,
                               **kwargs)
        task_of[future.key] = (sid, task)
        submitted.append(future)
        return future

    scoring = {"device": batch.device, "backbone_weights": batch.backbone_weights}

    def follow(sid: str, task: str, future, result: dict) -> list:
        """After a slide's score plan: its score ranges (any scoring worker), the finish, the aggregate."""
        if task != "score-plan":
            return []
        ranges = [submit(score_range, future, model, chunks, task="score-range", sid=sid, part=f"-{chunks[0]}",
                         resources=info.score_resources, batch_size=batch.batch_size, **scoring)
                  for chunks in score_ranges(result, batch.score_task_chunks)]
        done = submit(finish_scoring, future, ranges, model, task="score", sid=sid, resources=info.score_resources,
                      batch_size=batch.batch_size, **scoring)
        chains[sid] = submit(aggregate_slide, done, task="aggregate", sid=sid, resources=info.cpu_resources,
                             reducer=batch.reducer, smoothing_um=batch.smoothing_um)
        return [*ranges, done, chains[sid]]

    for path in slides:
        sid = slide_id_of(path)
        if kind == "stores":
            future = submit(open_store, str(path), task="open", sid=sid, resources=info.cpu_resources)
        else:
            future = submit(preprocess_slide, str(path), out.resolve(), batch.preprocess, task="preprocess",
                            sid=sid, resources=info.cpu_resources, mpp=batch.mpp)
        if model is not None:       # the score ranges follow once the plan knows the slide's chunks (``follow``)
            future = submit(plan_scoring, future, model, task="score-plan", sid=sid, resources=info.score_resources,
                            chunk_tiles=batch.score_chunk_tiles, pixel_maps=batch.pixel_maps, **scoring)
        elif batch.exports:
            future = submit(export_slide, future, batch.exports, task="export", sid=sid, resources=info.cpu_resources,
                            mpp=batch.mpp)
        chains[sid] = future

    final = _watch(client, as_completed(submitted), task_of, chains, slides, batch, echo,
                   follow if model is not None else None)
    results = [final[slide_id_of(path)] for path in slides]
    scale = None
    if model is not None and not (batch.fail_fast and any(r["status"] == "failed" for r in results)):
        try:
            scale = client.submit(cohort_scale_of, results, key=f"cohort-scale-{run_id}", pure=False,
                                  resources=info.cpu_resources).result()
        except (WsiAdError, OSError) as exc:     # no overlays then; every slide's scores are in its store
            scale = None
            _say(echo, f"no overlays: the cohort colour scale failed ({exc})")
        if scale is not None:
            scored = sum(1 for r in results if r["status"] == "ok" and r.get("model_id"))
            _say(echo, f"cohort colour scale: {scale.vmin:.4g} – {scale.vmax:.4g} ({scored} scored slides)")
        last, first = {}, len(submitted)          # each slide's last task; the tasks of this second phase
        threshold = geojson_threshold(batch.geojson_threshold, scale)
        for path, result in zip(slides, results, strict=True):
            sid = slide_id_of(path)
            last[sid] = result
            if result["status"] == "failed":     # reported once, where it failed
                continue
            if batch.overlays:
                last[sid] = submit(overlay_slide, result, scale, out.resolve(), task="overlay", sid=sid,
                                   resources=info.cpu_resources, annotations_dir=batch.annotations_dir, mpp=batch.mpp)
            if batch.exports:
                last[sid] = submit(export_slide, last[sid], batch.exports, task="export", sid=sid,
                                   resources=info.cpu_resources, threshold=threshold, mpp=batch.mpp)
        if len(submitted) > first:
            pending = {sid: f for sid, f in last.items() if not isinstance(f, dict)}
            final = _watch(client, as_completed(submitted[first:]), task_of, pending, slides, batch, echo)
            results = [final[sid] if sid in pending else last[sid] for sid in map(slide_id_of, slides)]
    return results, scale


#: Tasks without a progress line of their own (the scoring step's plan and ranges: its finish has one).
QUIET_TASKS = frozenset({"score-plan", "score-range"})


def _watch(client, futures, task_of, chains, slides, batch: BatchConfig, echo, follow=None) -> dict[str, dict]:
    """Follow tasks as they finish (progress lines); returns each slide's final result. A task that errs
    (a worker died on the slide) fails its slide; with ``fail_fast`` the rest is cancelled. ``follow(slide id,
    task, future, result)``: the tasks to add once a task is done (they join ``futures``, an ``as_completed``);
    it may move the slide's chain end (``chains``)."""
    finals: dict[str, dict] = {}
    n_slides = len(chains)
    slide_paths = {slide_id_of(p): p for p in slides}
    for future in futures:
        sid, task = task_of[future.key]
        if future.status == "error":
            exc = future.exception()
            result = new_result(slide_paths[sid])
            result.update(status="failed", failed_task=task,
                          error=f"worker lost while processing this slide ({type(exc).__name__}: {exc})")
        elif future.status == "cancelled":
            result = new_result(slide_paths[sid])
            result.update(status="failed", failed_task=task, error="cancelled (--fail-fast)")
        else:
            result = future.result()
        if sid in finals:               # a later task of a slide that already failed: nothing new to say
            continue
        if follow is not None and result["status"] == "ok":
            for added in follow(sid, task, future, result):
                futures.add(added)
        if chains[sid].key == future.key or result["status"] == "failed":
            finals[sid] = result
        if task not in QUIET_TASKS or result["status"] == "failed":
            _say(echo, _progress_line(len(finals), n_slides, sid, task, result))
        if result.get("traceback"):
            run_log.error("%s: %s", sid, result["traceback"])
        if result["status"] == "failed" and batch.fail_fast:
            for other in chains.values():
                other.cancel()
            _say(echo, f"--fail-fast: stopping after {sid} failed")
            break
    for sid, future in chains.items():         # cancelled or never reported
        if sid not in finals:
            result = new_result(slide_paths[sid])
            result.update(status="failed", failed_task=task_of[future.key][1], error="cancelled (--fail-fast)")
            finals[sid] = result
    return finals


def _progress_line(done: int, total: int, sid: str, task: str, result: dict) -> str:
    seconds = result.get("timings", {}).get(task)
    head = f"[{done:>{len(str(total))}}/{total} slides] {sid:<24} {task:<10}"
    if result["status"] == "failed":
        return f"{head} FAILED at {result.get('failed_task')}: {result.get('error')}"
    facts = []
    if task == "open":
        facts.append(f"{result.get('n_tiles', 0)} tiles")
    elif task == "preprocess":
        facts.append(f"{result.get('n_tiles', 0)} tiles, {result.get('tissue_area_mm2', 0):.2f} mm² tissue")
        facts.append("reused" if not result.get("stages_run") else "ran " + "+".join(result["stages_run"]))
        facts.extend(f"warning: {w}" for w in result.get("warnings", [])[:2])
    elif task == "score":
        if result.get("tiles_per_s"):
            tasks = result.get("score_tasks") or 1
            facts.append(f"{result['tiles_per_s']:.0f} tiles/s on {result.get('score_device')}"
                         + (f", {tasks} tasks on {result.get('score_worker')}" if tasks > 1 else ""))
        elif result.get("model_id"):
            facts.append("reused")
    elif task == "aggregate" and result.get("slide_score") is not None:
        facts.append(f"slide score {result['slide_score']:.4g} ({result.get('reducer')})")
    elif task == "export" and result.get("exports"):
        written = result.get("exports_written") or []
        facts.append(", ".join(f"{fmt} {'written' if fmt in written else 'reused'}" for fmt in result["exports"]))
    if seconds is not None:
        facts.append(f"{seconds:.1f} s")
    return f"{head} {'; '.join(facts)}"


def _say(echo, line: str) -> None:
    echo(line)
    run_log.info(line)


def _attach_log_file(path: Path) -> logging.Handler:
    """Write this run's progress lines (and failures' tracebacks) to ``path``; appended, so a re-run
    continues the same log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    run_log.addHandler(handler)
    return handler


def _summary_line(result: dict) -> str:
    if result["status"] == "failed":
        return f"{result['slide_id']:<28} {'FAILED':<7} {'':>10} {'':>7} {result['seconds']:>7.1f}  {result['error']}"
    reused = "" if result["stages_run"] else "reused"
    note = "; ".join(result["warnings"]) or reused
    return (f"{result['slide_id']:<28} {'ok':<7} {result['tissue_area_mm2']:>10.2f} {result['n_tiles']:>7} "
            f"{result['seconds']:>7.1f}  {note}")
