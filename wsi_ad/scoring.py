"""The scoring stage: every tile of a slide store scored by a trained detector, into ``scores/<model_id>``.

Layout written into the slide's store::

    scores/<model_id>/
      attrs        model_id, magnification, checkpoint (path), units, device, dtype, chunk_tiles,
                   batch_size, n_tiles, config_hash, tiles_config_hash, resume_key
      scores       (N,) float32, tile i of ``tiles/<magnification>`` (same order as ``tiles/coords``),
                   chunked by ``chunk_tiles`` tiles (default 2048)
      done         (n_chunks,) bool: chunk k of ``scores`` (tiles k*chunk_tiles ...) is written
      pixel_maps   optional, (N, h, w) float16 per-feature-cell maps (see :mod:`wsi_ad.detectors.scorer`);
                   attrs give the cell size in µm and in level-0 pixels

Scores are the relative perceptual L1 of each tile's reconstruction: unitless, higher = more anomalous.

Streaming: tiles are read from zarr in fixed batches by a background thread (one batch ahead of the
model, a bounded queue; on cuda into pinned host buffers copied without blocking), so memory does not
grow with the slide and reading overlaps computing.

Resume, chunk by chunk: the stage's group is written in place (:meth:`SlideStore.resumable_stage`) under a
resume key (configuration hash, chunk size, pixel maps on/off, precision). After each chunk's scores (and
maps) are written, its ``done`` flag is set; every zarr chunk file is written with a temporary file and a
rename, so a run killed at any point (even ``kill -9``) leaves whole chunks and flags. A re-run with the
same key scores only the chunks not yet done (batches never straddle chunks, so with the same batch size
they are the same batches) and gives the very scores of an uninterrupted run; another key starts afresh
(a different batch size may resume: tile scores do not depend on the batch beyond float rounding). The
stage is marked complete in the root attributes only when every chunk is done. Its configuration hash
covers the model id, the magnification and the tiles stage's hash, so re-tiling a slide (or another
model) invalidates its scores; a complete stage with the same hash is reused.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from wsi_ad.atomic import write_text_atomic
from wsi_ad.detectors.scorer import Scorer
from wsi_ad.errors import WsiAdError
from wsi_ad.files import visible_files
from wsi_ad.heatmap import load_scores  # noqa: F401  (re-exported: the stage's reader, torch-free, lives there)
from wsi_ad.store import SlideStore, StoreError, config_hash
from wsi_ad.tile_pool import IMAGE_SUFFIXES, DataError, ImageFolderSource

#: Bump when the scores' meaning changes, to invalidate stored scores.
SCORE_STAGE_VERSION = 1
#: Tiles per chunk of ``scores`` (and of ``pixel_maps``): the unit of resume, and of the pipeline's scoring tasks.
#: 2048 rather than 4096: a big slide's tasks balance better over the workers (benchmarks/bench_pipeline.py,
#: 2 CPU workers, a 61k px slide and three 16k: overlap 1.88 / 1.91 with 2048, 1.73 / 1.74 with 4096, runs
#: interleaved). A stage interrupted with another chunk size is scored afresh; complete ones are reused.
SCORE_CHUNK_TILES = 2048

Progress = Callable[[int, int], None]


class ScoringError(WsiAdError):
    """Tiles cannot be scored with this model (wrong size or magnification, no such tiles)."""


def default_batch_size(device: torch.device | str) -> int:
    """Tiles per batch by device: 64 on the CPU (measured fastest there: 414 tiles/s vs 213 at 256 for the
    demo model on 2 cores, ``benchmarks/results/score_cpu.json``), 256 on CUDA."""
    return 256 if torch.device(device).type == "cuda" else 64


def score_stage_name(model_id: str) -> str:
    """``scores/<model_id>``."""
    return f"scores/{model_id}"


def score_config_hash(store: SlideStore, scorer: Scorer) -> str:
    """The scoring stage's configuration hash: model id, magnification and the tiles stage's own hash."""
    tiles = store.stages.get("tiles")
    if tiles is None:
        store.require("tiles")                                 # raises the usual "stage not run" error
    return config_hash({"version": SCORE_STAGE_VERSION, "model_id": scorer.model_id,
                        "magnification": scorer.magnification, "tiles": tiles["config_hash"]})


def _tile_array(store: SlideStore, scorer: Scorer) -> zarr.Array:
    tiles = store.require("tiles")
    mag = scorer.magnification
    if mag not in tiles:
        has = sorted(k for k in tiles.keys() if k.endswith("x"))
        raise ScoringError(f"{store.path}: no tiles at {mag}, the model's magnification (the store has {has}); "
                           f"re-run `wsi-ad process --magnifications {mag}`")
    array = tiles[mag]
    if tuple(array.shape[1:]) != (scorer.image_size, scorer.image_size, 3):
        raise ScoringError(f"{store.path}: tiles/{mag} are {array.shape[1]} px, the model takes "
                           f"{scorer.image_size} px tiles (re-tile with --tile-px {scorer.image_size})")
    return array


def run_score_stage(store: SlideStore, scorer: Scorer, *, batch_size: int = 256, pixel_maps: bool = False,
                    progress: Progress | None = None, chunk_tiles: int = SCORE_CHUNK_TILES,
                    pin_memory: bool | None = None) -> tuple[np.ndarray, bool]:
    """Score every tile of ``tiles/<scorer.magnification>`` into ``scores/<model_id>`` (resumable), in this
    process: :func:`plan_score_stage`, :func:`score_chunks` of every chunk to do, :func:`complete_score_stage`.

    Args:
        store: the slide's store, opened writable (``mode="r+"``), with a complete ``tiles`` stage whose
            tiles are ``scorer.image_size`` px.
        scorer: the trained model (:func:`wsi_ad.detectors.scorer.load_scorer`).
        batch_size: tiles per model batch; batches never straddle chunks.
        pixel_maps: also store ``pixel_maps`` (N, h, w) float16, one value per feature cell.
        progress: called as ``progress(done_tiles, total_tiles)`` once at the start (``done_tiles`` = tiles
            kept from an interrupted run) and after every batch.
        chunk_tiles: tiles per ``scores`` chunk, the unit of resume (a resumed run must use the same).
        pin_memory: read batches into pinned host memory, copied to the GPU without blocking (default:
            on cuda; off on the CPU, where it does nothing useful).

    Returns ``(scores, computed)``: (N,) float32 scores in tile order, and whether anything was scored
    (``False``: a complete stage of the same configuration was reused). The stage marker records
    ``n_tiles``, ``seconds``, ``tiles_per_s`` (tiles scored by this run per second), ``device``,
    ``dtype``, ``resumed_tiles``, and the seconds spent waiting for data vs computing.
    """
    if batch_size < 1 or chunk_tiles < 1:
        raise ScoringError(f"batch_size and chunk_tiles must be >= 1, got {batch_size} and {chunk_tiles}")
    started = time.perf_counter()
    plan = plan_score_stage(store, scorer, chunk_tiles=chunk_tiles, pixel_maps=pixel_maps)
    if plan.complete:
        return load_scores(store, scorer.model_id), False
    if progress is not None:
        progress(plan.resumed_tiles, plan.n_tiles)
    stats = score_chunks(store, scorer, plan, plan.todo, batch_size=batch_size, pin_memory=pin_memory,
                         progress=None if progress is None else
                         (lambda done: progress(plan.resumed_tiles + done, plan.n_tiles)))
    return complete_score_stage(store, scorer, plan, [stats], batch_size=batch_size,
                                seconds=time.perf_counter() - started), True


@dataclass(frozen=True)
class ScorePlan:
    """The scoring stage of one store, opened for writing (:func:`plan_score_stage`): ``n_tiles``, ``chunk_tiles``
    and ``n_chunks`` of ``scores``, the chunks still ``todo`` (chunk k holds tiles k * chunk_tiles ...), the
    tiles kept from an interrupted run (``resumed_tiles``), the stage's ``resume_key`` (what every writer checks)
    and ``digest`` (configuration hash); ``complete``: a finished stage of the same configuration is reused
    (nothing to do). JSON-ready through :meth:`to_dict`, so a scheduler can hand it to other processes."""

    stage: str
    digest: str
    resume_key: dict
    n_tiles: int
    chunk_tiles: int
    n_chunks: int
    todo: tuple[int, ...]
    resumed_tiles: int
    pixel_maps: bool
    dtype: str
    complete: bool = False

    def to_dict(self) -> dict:
        return {**self.__dict__, "todo": list(self.todo)}

    @classmethod
    def from_dict(cls, data: dict) -> ScorePlan:
        return cls(**{**data, "todo": tuple(data["todo"])})

    def ranges(self, chunks_per_range: int) -> list[tuple[int, ...]]:
        """The chunks to do, in runs of at most ``chunks_per_range`` consecutive chunks (contiguous tile ranges)."""
        runs: list[list[int]] = []
        for k in self.todo:
            if runs and runs[-1][-1] == k - 1 and len(runs[-1]) < chunks_per_range:
                runs[-1].append(k)
            else:
                runs.append([k])
        return [tuple(r) for r in runs]


def plan_score_stage(store: SlideStore, scorer: Scorer, *, chunk_tiles: int = SCORE_CHUNK_TILES,
                     pixel_maps: bool = False) -> ScorePlan:
    """Open ``scores/<model_id>`` for writing: reuse a complete stage of the same configuration
    (``complete=True``), resume an interrupted one of the same resume key, or create its arrays; returns which
    chunks are left. Run it once per stage, before any :func:`score_chunks` of it (it withdraws the stage's
    completion mark and removes the temporary files of a killed writer). Raises :class:`ScoringError` for tiles
    the model cannot take, :class:`StoreError` for a read-only store."""
    if chunk_tiles < 1:
        raise ScoringError(f"chunk_tiles must be >= 1, got {chunk_tiles}")
    stage = score_stage_name(scorer.model_id)
    digest = score_config_hash(store, scorer)
    dtype = "bfloat16 autocast" if scorer.precision == "bf16" else "float32"
    array = _tile_array(store, scorer)
    n = int(array.shape[0])
    n_chunks = -(-n // chunk_tiles)
    key = {"config_hash": digest, "chunk_tiles": chunk_tiles, "pixel_maps": bool(pixel_maps), "dtype": dtype,
           "n_tiles": n}
    if store.is_complete(stage, digest) and (not pixel_maps or store.stages[stage].get("pixel_maps")):
        return ScorePlan(stage, digest, key, n, chunk_tiles, n_chunks, (), n, bool(pixel_maps), dtype, complete=True)
    if store.root.read_only:
        raise StoreError(f"{store.path}: opened read-only; open it with mode='r+' to write {stage}")
    group, resumed = store.resumable_stage(stage, key)
    if not (resumed and {"scores", "done"} <= set(group.keys()) and (not pixel_maps or "pixel_maps" in group)):
        _create_arrays(store, group, scorer, n, n_chunks, chunk_tiles, pixel_maps, array)
    done = np.asarray(group["done"][:], dtype=bool)
    todo = tuple(k for k in range(n_chunks) if not done[k])
    resumed_tiles = n - sum(min(chunk_tiles, n - k * chunk_tiles) for k in todo)
    key = dict(group.attrs["resume_key"])              # as stored (JSON round trip): what writers compare
    return ScorePlan(stage, digest, key, n, chunk_tiles, n_chunks, todo, resumed_tiles, bool(pixel_maps), dtype)


def score_chunks(store: SlideStore, scorer: Scorer, plan: ScorePlan, chunks: Sequence[int], *, batch_size: int = 256,
                 pin_memory: bool | None = None, progress: Callable[[int], None] | None = None) -> dict:
    """Score the tiles of ``chunks`` (indices of ``plan``'s chunks) and write each chunk, then its done flag.
    Several processes may score disjoint chunks of one stage at once: every chunk, and every flag, is its own
    zarr chunk file, written with a temporary file and a rename. ``progress(tiles scored by this call)`` after
    every batch. Returns {"tiles", "seconds", "data_wait_s", "compute_s", "device"}. Raises :class:`StoreError`
    when the stage's resume key is no longer ``plan``'s (another run re-planned it)."""
    if batch_size < 1:
        raise ScoringError(f"batch_size must be >= 1, got {batch_size}")
    started = time.perf_counter()
    try:
        group = zarr.open_group(store.path / plan.stage, mode="r+")
        same = dict(group.attrs).get("resume_key") == plan.resume_key
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError):
        same = False
    if not same:
        raise StoreError(f"{store.path}: {plan.stage} was re-planned by another run while this one scored it; "
                         "score the slide again")
    array = _tile_array(store, scorer)
    n, chunk_tiles = plan.n_tiles, plan.chunk_tiles
    scores_arr, done_arr = group["scores"], group["done"]
    maps_arr = group["pixel_maps"] if plan.pixel_maps else None
    batches = [(k, b, min(b + batch_size, (k + 1) * chunk_tiles, n))
               for k in chunks for b in range(k * chunk_tiles, min((k + 1) * chunk_tiles, n), batch_size)]
    wait_s = compute_s = 0.0
    scored = 0
    pin = scorer.device.type == "cuda" if pin_memory is None else bool(pin_memory)
    chunk_scores: dict[int, np.ndarray] = {}
    chunk_maps: dict[int, np.ndarray] = {}
    with scorer.inference(), _Prefetcher(array, [(b, e) for _, b, e in batches], batch_size, pin) as prefetch:
        for k, begin, end in batches:
            t0 = time.perf_counter()
            tiles, release = prefetch.next()
            t1 = time.perf_counter()
            score, pmap = scorer.score_batch(tiles, plan.pixel_maps)
            score = score.cpu().numpy()                       # synchronizes: the pinned buffer is free again
            pmap = pmap.cpu().numpy() if pmap is not None else None
            release()
            compute_s += time.perf_counter() - t1
            wait_s += t1 - t0
            chunk_begin = k * chunk_tiles
            chunk_len = min(chunk_tiles, n - chunk_begin)
            if k not in chunk_scores:
                chunk_scores[k] = np.empty(chunk_len, np.float32)
                if pmap is not None:
                    chunk_maps[k] = np.empty((chunk_len, *pmap.shape[1:]), np.float16)
            chunk_scores[k][begin - chunk_begin:end - chunk_begin] = score
            if pmap is not None:
                chunk_maps[k][begin - chunk_begin:end - chunk_begin] = pmap
            scored += end - begin
            if end == chunk_begin + chunk_len:                # the chunk is whole: write it, then its flag
                scores_arr[chunk_begin:end] = chunk_scores.pop(k)
                if maps_arr is not None:
                    maps_arr[chunk_begin:end] = chunk_maps.pop(k)
                done_arr[k] = True
            if progress is not None:
                progress(scored)
    return {"tiles": scored, "seconds": round(time.perf_counter() - started, 3), "data_wait_s": round(wait_s, 3),
            "compute_s": round(compute_s, 3), "device": str(scorer.device)}


def complete_score_stage(store: SlideStore, scorer: Scorer, plan: ScorePlan, stats: Sequence[dict], *,
                         batch_size: int, seconds: float) -> np.ndarray:
    """Mark ``plan``'s stage complete once every chunk's done flag is set, recording ``stats`` (the
    :func:`score_chunks` records of this run, summed; ``tiles_per_s``: tiles scored by this run over ``seconds``,
    its wall time); returns the (N,) float32 scores. Raises :class:`StoreError` naming the chunks still missing."""
    group = zarr.open_group(store.path / plan.stage, mode="r+")
    done = np.asarray(group["done"][:], dtype=bool)
    if not done.all():
        missing = np.flatnonzero(~done).tolist()
        raise StoreError(f"{store.path}: {plan.stage}: chunk(s) {missing[:10]} of {plan.n_chunks} not scored")
    new_tiles = int(sum(s["tiles"] for s in stats))
    devices = sorted({s["device"] for s in stats}) or [str(scorer.device)]
    group.attrs.update({
        "model_id": scorer.model_id, "magnification": scorer.magnification, "checkpoint": scorer.checkpoint,
        "units": scorer.units, "device": ", ".join(devices), "dtype": plan.dtype, "chunk_tiles": plan.chunk_tiles,
        "batch_size": batch_size, "n_tiles": plan.n_tiles, "config_hash": plan.digest,
        "tiles_config_hash": store.stages["tiles"]["config_hash"], "tile_order": "as tiles/coords",
    })
    store.mark_complete(plan.stage, plan.digest, n_tiles=plan.n_tiles, seconds=round(seconds, 3),
                        tiles_per_s=round(new_tiles / seconds, 1) if seconds > 0 else None,
                        device=", ".join(devices), dtype=plan.dtype, pixel_maps=plan.pixel_maps,
                        batch_size=batch_size, resumed_tiles=plan.resumed_tiles, tasks=len(stats),
                        data_wait_s=round(sum(s["data_wait_s"] for s in stats), 3),
                        compute_s=round(sum(s["compute_s"] for s in stats), 3))
    return np.asarray(group["scores"][:], dtype=np.float32)


def _create_arrays(store: SlideStore, group: zarr.Group, scorer: Scorer, n: int, n_chunks: int, chunk_tiles: int,
                   pixel_maps: bool, tiles: zarr.Array):
    for name in ("scores", "done", "pixel_maps"):
        if name in group:
            del group[name]
    scores = group.create_array("scores", shape=(n,), dtype=np.float32, chunks=(max(1, min(chunk_tiles, n)),),
                                fill_value=np.nan)
    scores.attrs.update({"units": scorer.units})
    # Flags are written after the chunk they stand for; one flag per zarr chunk, so no flag write rewrites
    # another's (each chunk file is replaced atomically by zarr).
    done = group.create_array("done", shape=(n_chunks,), dtype=bool, chunks=(1,), fill_value=False)
    maps = None
    if pixel_maps:
        h, w = scorer.map_shape
        maps = group.create_array("pixel_maps", shape=(n, h, w), dtype=np.float16,
                                  chunks=(max(1, min(chunk_tiles, n)), h, w), fill_value=np.nan)
        mpp = float(tiles.attrs.get("mpp", 0.0)) or None
        cell_um = mpp * scorer.image_size / w if mpp else None
        slide_mpp = store.root.attrs.get("mpp_x")
        maps.attrs.update({
            "reduction": scorer.detector.map_reduction,
            "units": scorer.units, "cells": [h, w], "cell_px": scorer.image_size / w,
            "cell_um": cell_um,
            "cell_level0_px": cell_um / slide_mpp if cell_um and slide_mpp else None,
            "layout": "(tile, row, col); row 0 at the tile's top (level-0 y grows with row)",
        })
    return scores, done, maps


class _Prefetcher:
    """Reads the batches ``ranges`` ((begin, end) tile indices) of a zarr tile array in a background thread,
    at most ``depth`` batches ahead. ``next()`` -> (uint8 tensor (B, S, S, 3), release); call ``release()``
    once the batch's data has been used (on cuda: its pinned buffer goes back to the pool)."""

    def __init__(self, array: zarr.Array, ranges: Sequence[tuple[int, int]], batch_size: int, pin: bool,
                 depth: int = 2):
        self.array = array
        self.ranges = list(ranges)
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.free: queue.Queue = queue.Queue()
        self.pin = pin
        self.stop = threading.Event()
        if pin and self.ranges:
            for _ in range(depth + 1):
                self.free.put(torch.empty((batch_size, *array.shape[1:]), dtype=torch.uint8).pin_memory())
        self.thread = threading.Thread(target=self._run, name="score-prefetch", daemon=True)

    def __enter__(self) -> _Prefetcher:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        while self.thread.is_alive():
            try:                                     # unblock a producer waiting on a full queue
                self.ready.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for begin, end in self.ranges:
                if self.stop.is_set():
                    return
                block = np.asarray(self.array[begin:end])
                if self.pin:
                    buffer = None
                    while buffer is None and not self.stop.is_set():
                        try:
                            buffer = self.free.get(timeout=0.1)
                        except queue.Empty:
                            continue
                    if buffer is None:
                        return
                    buffer[: end - begin].numpy()[...] = block
                    item = (buffer[: end - begin], buffer)
                else:
                    item = (torch.from_numpy(block), None)
                if not self._put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(exc)

    def next(self):
        item = self.ready.get()
        if isinstance(item, BaseException):
            raise item
        tensor, buffer = item
        return tensor, (lambda: self.free.put(buffer)) if buffer is not None else (lambda: None)


def load_pixel_maps(store: SlideStore, model_id: str) -> np.ndarray:
    """(N, h, w) float16 pixel maps of a complete ``scores/<model_id>`` stage run with ``pixel_maps=True``;
    :class:`StoreError` otherwise. Cell size: ``group["pixel_maps"].attrs["cell_um"]`` µm."""
    group = store.require(score_stage_name(model_id))
    if "pixel_maps" not in group:
        raise StoreError(f"{store.path}: scores/{model_id} has no pixel maps (score with pixel_maps=True)")
    return np.asarray(group["pixel_maps"][:])


# -- folders of image tiles --------------------------------------------------------------------------


class _CenterCrop:
    """Stands in for the random generator of :class:`ImageFolderSource` so that images larger than the
    model input are cropped at their centre (deterministic) instead of at random."""

    @staticmethod
    def integers(low: int, high: int) -> int:
        return low + (high - 1 - low) // 2


def find_image_tiles(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """PNG/JPEG files named by ``paths`` (files, or folders searched recursively, hidden files and folders
    skipped: :func:`wsi_ad.files.visible_files`), each folder's sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: not a PNG/JPEG tile")
            files.append(path)
            continue
        found = visible_files(path, IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"{path}: no PNG/JPEG tiles found")
        files += found
    return files


def score_image_folder(paths_or_folder: str | os.PathLike | Iterable[str | os.PathLike], scorer: Scorer, *,
                       batch_size: int = 256, image_mpp: float | None = None) -> list[tuple[Path, float]]:
    """Score PNG/JPEG tiles (files or folders, searched recursively): ``[(path, score), ...]`` in file order.

    Images are loaded as for training (:class:`wsi_ad.tile_pool.ImageFolderSource`): resized by
    ``image_mpp`` (their µm/px) over the model magnification's µm/px when given, enlarged when smaller
    than the model input, and cropped to ``scorer.image_size`` px, here at the centre. Memory holds one
    batch of images at a time.
    """
    from wsi_ad.slide import magnification_to_mpp

    files = find_image_tiles(paths_or_folder)
    if image_mpp is not None and not image_mpp > 0:
        raise DataError(f"image_mpp must be a positive µm/px, got {image_mpp}")
    scale = image_mpp / magnification_to_mpp(scorer.magnification) if image_mpp else None
    source = ImageFolderSource(files, scorer.image_size, scale)
    rows: list[tuple[Path, float]] = []
    for start in range(0, len(files), batch_size):
        stop = min(start + batch_size, len(files))
        scores = scorer.score(source.read(start, stop, _CenterCrop()), batch_size=batch_size)
        rows += [(f, float(s)) for f, s in zip(files[start:stop], scores, strict=True)]
    return rows


def write_scores_csv(path: str | os.PathLike, rows: Iterable[tuple], columns: Sequence[str] = ("path", "score")) -> Path:
    """Write rows under the header ``columns`` (default ``path,score``) to ``path`` atomically. The last
    value of each row is the score, written with 9 significant digits; the others as text."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(columns))
    for *fields, score in rows:
        writer.writerow([*map(str, fields), f"{float(score):.9g}"])
    return write_text_atomic(path, buffer.getvalue())
