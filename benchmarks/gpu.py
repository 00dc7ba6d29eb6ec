"""GPU benchmark in one command: scoring, training and the end-to-end pipeline on one CUDA device.

Measured on the first visible CUDA device (``CUDA_VISIBLE_DEVICES`` defaults to ``0``, so that one GPU is used
and the pipeline's local cluster starts exactly one GPU worker, :mod:`pipelines.cluster`; that worker gets
``CUDA_VISIBLE_DEVICES=0`` whatever the caller's is: ``pipeline.same_gpu_as_the_rest`` says whether it used the
same GPU as the other parts):

1. **Scoring** (:func:`wsi_ad.scoring.run_score_stage` over a slide store, as ``benchmarks/bench_score.py``, whose
   helpers it uses): tiles/s by batch size, float32 vs bfloat16 autocast (:meth:`Scorer.set_precision`), with and
   without ``train.channels_last``, for the DPA and the knn detector of the ``--configs`` set. The DPA's
   autoencoder has seeded untrained weights (the speed does not depend on them); the knn memory bank is fitted on
   ``--knn-fit-tiles`` training tiles (its exact search costs in proportion to the bank's entries, reported). The
   benchmark store holds the training store's tiles repeated, with the pipeline stores' codecs.
2. The **data-wait share** of scoring: seconds ``run_score_stage`` waited for the next batch of tiles / (those +
   its compute seconds), read back from the stage marker it writes (``data_wait_s``, ``compute_s``).
3. **Training** of every detector of ``pipelines.compare.CONFIGS[--configs]`` (the paper configs by default):
   the training loop itself (:func:`wsi_ad.detectors.loop.train` with ``stop_after``; its own per-step rate,
   logged every step into the checkpoint's history; first phase only), and every phase of the schedule stepped
   directly (the loop's body: batch, augmentation, ``before_step``, ``train_step``, timed with a CUDA
   synchronisation), with the projected time of the full schedule: the fit, plus each phase's iterations
   (``num_steps_of``) x its median seconds per step. Fit-only detectors (no steps): seconds of the fit.
4. The **end-to-end pipeline** (:func:`pipelines.process.run_batch` with a model: the DPA of ``--configs`` after
   the training part's few steps, or ``--model``) on a synthetic ``--slide-px`` square tumour slide (100,000 px; synthesized
   once into ``--cache``) on a local cluster of ``--pipeline-workers`` CPU workers and one GPU worker:
   slides/hour, wall seconds, seconds per task and per store stage, and the scoring's own figures from its stage
   marker.

Every figure is the median of repeated runs, listed beside it (``*_runs``). Units: seconds (``*_s``,
``seconds``), tiles per second, iterations (steps) per second, hours (``projected_hours``), MiB. Backbones: the
ImageNet weight files when on disk, else random weights of the same architecture written into ``--cache`` (the
JSON says which; timing does not depend on the weights).

    benchmarks/gpu.sh [--quick] [--out benchmarks/results/gpu.json] [--cache /tmp/wsi-ad-bench-gpu] [--parts ...]

``--quick`` shrinks everything (a 16,384 px slide, two batch sizes, a few steps): a check in a few minutes. Without
CUDA it prints one JSON line (``{"benchmark": "gpu", "skipped": ...}``) and exits 0, measuring and writing nothing.
``--device cpu --quick`` is a smoke run on the CPU (tiny sizes, the CPU configs, every figure labelled as measured
on the CPU) that exercises the measuring code without a GPU; it writes a file only with ``--out``. Prints the JSON;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# One GPU: the first unless the caller chose (before torch is imported, so that CUDA sees only it).
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")

CONFIG_DIR = REPO / "configs"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu.json"
PARTS = ("score", "train", "pipeline")


@dataclass(frozen=True)
class Settings:
    """Sizes of one mode (``full``, ``quick``, ``smoke``); every field can be overridden on the command line."""

    slide_px: int              # side of the pipeline's synthetic slide, level-0 px (0.243 µm/px)
    train_slide_px: int        # side of the normal slide whose tiles train the detectors and fill the scoring store
    score_tiles: int           # tiles scored per DPA scoring run
    knn_score_tiles: int       # tiles scored per knn scoring run (its exact search is slow)
    knn_fit_tiles: int         # training tiles the knn memory bank of the scoring part is fitted on
    batch_sizes: tuple[int, ...]
    repeat: int                # timed runs per scoring setting and per fit
    warmup_steps: int          # training steps per phase left out of the medians
    steps: int                 # timed training steps per phase (after the warm-up)
    pipeline_repeat: int       # end-to-end runs
    pipeline_workers: int | None  # CPU workers of the pipeline's cluster (None: pipelines.cluster's default)


MODES = {
    "full": Settings(100_000, 32768, 32768, 2048, 2048, (64, 256, 1024), 3, 3, 20, 3, None),
    "quick": Settings(16384, 8192, 4096, 512, 256, (256, 1024), 2, 2, 5, 2, None),
    "smoke": Settings(4096, 4096, 16, 16, 16, (8, 16), 2, 1, 2, 1, 1),
}


def log(message: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _quiet(*_args) -> None:
    return None


def _median(values) -> float:
    return statistics.median(list(values))


def _sig(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits."""
    return float(f"{value:.{digits}g}")


def _rel(path: Path) -> str:
    path = Path(path)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def sync(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously); nothing on the CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device) -> float | None:
    """Peak GPU memory allocated by torch since :func:`reset_peak`, MiB (None on the CPU)."""
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


# -- environment --------------------------------------------------------------------------------------------------

def environment(device) -> dict:
    """What the figures were measured on: GPU name and memory, torch / CUDA / cuDNN versions, TF32 switches (they
    decide what "fp32" runs as on the GPU), driver, CPU, threads."""
    import torch

    env = {
        "measured_on": device.type,
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "gpu": props.name,
            "gpu_memory_mib": round(props.total_memory / 2**20),
            "gpu_compute_capability": f"{props.major}.{props.minor}",
            "gpu_multiprocessors": props.multi_processor_count,
            "gpu_uuid": str(getattr(props, "uuid", "")) or None,
            "cudnn": torch.backends.cudnn.version(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tf32_convolutions": torch.backends.cudnn.allow_tf32,      # torch's default: true ("fp32" convs run TF32)
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "fp32_precision_conv": getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None),
            "fp32_precision_matmul": getattr(torch.backends.cuda.matmul, "fp32_precision", None),
            "driver": _nvidia_smi("driver_version"),
        })
    return env


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


# -- data ---------------------------------------------------------------------------------------------------------

def cached_slide(cache: Path, px: int, tumor: bool) -> tuple[Path, float | None]:
    """A synthetic slide of ``px`` x ``px`` level-0 px in ``cache/slides`` (made once): (path, seconds it took to
    synthesize now, None when it was cached)."""
    from wsi_ad.synth import synthesize_slide

    path = cache / "slides" / f"{'tumor' if tumor else 'normal'}_{px}.tif"
    if path.exists():
        return path, None
    log(f"synthesizing {path} ({px} x {px} px; once, cached)")
    started = time.perf_counter()
    # Random lesions (0.3 mm and up) do not fit in the tissue of a slide under ~2 mm (8,192 px): one 0.2 mm lesion there.
    lesions = [0.2] if tumor and px < 8192 else None
    synthesize_slide(path, width_px=px, seed=7 + px % 1000, tumor=tumor, lesion_sizes_mm=lesions,
                     workers=min(16, os.cpu_count() or 1))
    return path, round(time.perf_counter() - started, 1)


def training_store(cache: Path, px: int) -> tuple[Path, dict]:
    """The preprocessed store of a normal synthetic slide (stages reused when cached): (path, facts)."""
    from pipelines.process import process_paths
    from wsi_ad.preprocess import PreprocessConfig
    from wsi_ad.store import SlideStore

    slide, synth_s = cached_slide(cache, px, tumor=False)
    process_paths([slide], cache / "stores", PreprocessConfig(), echo=_quiet)
    path = cache / "stores" / f"{slide.stem}.zarr"
    n_tiles = SlideStore.open(path).stages["tiles"]["n_tiles"]
    return path, {"slide": str(slide), "side_px": px, "n_tiles": n_tiles, "synth_seconds": synth_s}


def use_weights(config, cache: Path) -> str | None:
    """Point ``config``'s pretrained backbone (if any) at a weight file: the ImageNet one when on disk, else random
    weights of the same architecture (seeded, written into ``cache/weights`` once). Returns what was used."""
    import torch

    from wsi_ad.atomic import atomic_path
    from wsi_ad.features.backbones import BackboneError, backbone_spec, resolve_weights

    section = config.section
    name = getattr(section, "backbone", None)
    if name is None or not hasattr(section, "backbone_weights"):
        return None
    if getattr(section, "loss", "perceptual") == "l1":   # the DPA's pixel-L1 ablation builds no backbone
        return None
    spec = backbone_spec(name)
    try:
        return f"{name}: pretrained ({resolve_weights(spec, section.backbone_weights)})"
    except BackboneError:
        pass
    file = cache / "weights" / f"random_{spec.weights.filename}"
    if not file.exists():
        log(f"{name} ImageNet weights not on this machine: writing random weights of its architecture to {file}")
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        with atomic_path(file) as temp:
            torch.save(spec.architecture().state_dict(), temp)
    config.set_backbone_weights(file)
    return f"{name}: RANDOM weights ({file}; the ImageNet file is not on this machine; timing does not depend on them)"


def paper_configs(configs: str) -> dict[str, Path]:
    from pipelines.compare import CONFIGS

    return {name: CONFIG_DIR / file for name, file in CONFIGS[configs].items()}


def load_config(path: Path, device, cache: Path):
    """The config at ``path`` on ``device`` with a usable backbone weight file: (config, weights description)."""
    from wsi_ad.config import Config

    config = Config.from_yaml(path)
    config.train.device = device.type
    return config, use_weights(config, cache)


def training_pool(config, paths: list[Path]):
    """The training loop's tile pool of ``config`` over ``paths`` (:func:`wsi_ad.detectors.loop.train` builds the
    same)."""
    from wsi_ad.detectors import get
    from wsi_ad.tile_pool import TilePool, discover_sources

    spec = get(config.detector).input_spec_of(config)
    sources = discover_sources(paths, config.data.magnification, spec.tile_px, config.data.image_mpp,
                               tiles_per_slide=config.data.tiles_per_slide, seed=config.train.seed)
    return TilePool(sources, config.data.buffer_tiles, config.train.seed)


# -- 1, 2: scoring ------------------------------------------------------------------------------------------------

def bench_scoring(args, s: Settings, device, cache: Path, work: Path, store_path: Path) -> dict:
    """Scoring tiles/s and data-wait shares of the DPA and knn scorers of ``--configs`` (module docstring)."""
    from benchmarks.bench_score import make_bench_store

    configs = paper_configs(args.configs)
    stores = {}
    result: dict = {
        "what": "run_score_stage over a store of the training slide's tiles repeated (the pipeline's codecs, "
                "64-tile chunks): zarr read in its prefetch thread, model on the device, scores written",
        "batch_sizes": list(s.batch_sizes), "repeat": s.repeat, "models": {}}
    for name, n_tiles in (("dpa", s.score_tiles), ("knn", s.knn_score_tiles)):
        if n_tiles not in stores:
            folder = work / f"score_store_{n_tiles}"
            folder.mkdir(parents=True)
            stores[n_tiles] = make_bench_store(store_path, folder, n_tiles, source_codecs=True)
        log(f"scoring: {name} ({_rel(configs[name])}), {n_tiles} tiles per run")
        try:
            result["models"][name] = bench_scorer(configs[name], stores[n_tiles], store_path, s, device, cache)
        except Exception as exc:  # noqa: BLE001 - one model failing must not lose the rest of the run
            result["models"][name] = {"config": _rel(configs[name]), "error": _error(exc)}
            log(f"scoring {name} failed: {_error(exc)}")
    return result


def bench_scorer(config_path: Path, store, fit_store: Path, s: Settings, device, cache: Path) -> dict:
    """Every (channels_last, precision, batch size) of one scorer: tiles/s, data-wait share, seconds (medians)."""
    import copy

    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from benchmarks.bench_score import timed_run  # one whole scoring stage: (scores, its marker)
    from wsi_ad.detectors import build
    from wsi_ad.detectors.scorer import Scorer
    from wsi_ad.scoring import default_batch_size

    config, weights = load_config(config_path, device, cache)
    if config.detector == "knn":
        config.section.max_fit_tiles = s.knn_fit_tiles
    torch.manual_seed(config.train.seed)
    detector = build(config, device)
    sync(device)
    started = time.perf_counter()
    with torch.no_grad():
        detector.fit(training_pool(config, [fit_store]))
    sync(device)
    fit_s = time.perf_counter() - started
    payload = {"detector": config.detector, "config": config.to_dict(), "state": detector.state_dict()}
    del detector
    out: dict = {"config": _rel(config_path), "detector": config.detector, "backbone_weights": weights,
                 "n_tiles": int(store.stages["tiles"]["n_tiles"]), "fit_seconds": round(fit_s, 3)}
    if config.detector == "knn":
        out.update(bank_entries=int(payload["state"]["bank"].shape[0]), fit_tiles_max=s.knn_fit_tiles,
                   paper_max_bank=config.section.max_bank,
                   note="exact nearest-neighbour search: the time per tile grows with the bank's entries; the "
                        "detector scores in float32 whatever the autocast, and has no channels_last switch")
    else:
        out["autoencoder"] = "untrained (seeded): the speed does not depend on the weights"
    probe = Scorer(payload, device=device)
    switch = getattr(probe.detector, "channels_last", None)
    out["map_shape"] = list(probe.map_shape)
    del probe
    if switch is None:
        layouts: list[bool | None] = [None]
        out["channels_last"] = f"not applicable: the {config.detector} detector has no channels_last switch"
    elif device.type != "cuda":
        layouts = [None]
        out["channels_last"] = "not applicable: the detector applies train.channels_last on cuda only"
    else:
        layouts = [True, False]
        out["channels_last"] = ("train.channels_last true: weights and inputs converted to channels_last; false: "
                                "not converted (the input batch still arrives channels_last-strided from the NHWC "
                                "tiles' permute in Scorer.score_batch)")
    rows, first_scores, peaks = [], {}, {}
    for layout in layouts:
        variant = copy.deepcopy(payload)
        if layout is not None:
            variant["config"]["train"]["channels_last"] = layout
        scorer = Scorer(variant, device=device)
        for precision in ("fp32", "bf16"):
            scorer.set_precision(precision)
            reset_peak(device)
            timed_run(store, scorer, max(s.batch_sizes))              # warm-up: allocator, kernel selection
            for bs in s.batch_sizes:
                runs = [timed_run(store, scorer, bs) for _ in range(s.repeat)]
                if bs == max(s.batch_sizes):
                    first_scores[(layout, precision)] = runs[0][0]
                rows.append(_score_row([m for _, m in runs], precision=precision, channels_last=layout, batch_size=bs))
                log(f"  {config.detector} {precision} channels_last={layout} batch {bs}: "
                    f"{rows[-1]['tiles_per_s_median']} tiles/s, data wait {rows[-1]['data_wait_share_median']:.1%}")
            peaks[f"{precision} channels_last={layout}"] = peak_mib(device)
        del scorer
    out["runs"] = rows
    out["peak_gpu_memory_mib"] = peaks if device.type == "cuda" else None
    agreement = {}
    for layout in layouts:
        a = np.asarray(first_scores[(layout, "fp32")], np.float64)
        b = np.asarray(first_scores[(layout, "bf16")], np.float64)
        agreement[f"channels_last={layout}"] = {
            "spearman": round(float(spearmanr(a, b).statistic), 5) if len(a) > 2 else None,
            "median_relative_difference": round(float(np.median(np.abs(b - a) / np.maximum(np.abs(a), 1e-12))), 6)}
    out["bf16_vs_fp32_scores"] = {**agreement, "note": "scores of each precision's first run at the largest batch "
                                  "size, on this untrained (or random-backbone) model: a check of the numerics, not of a "
                                  "trained model's ranking"}
    best = max(rows, key=lambda r: r["tiles_per_s_median"])
    out["fastest"] = {k: best[k] for k in ("precision", "channels_last", "batch_size", "tiles_per_s_median",
                                          "data_wait_share_median")}
    default = {"precision": "bf16" if device.type == "cuda" else "fp32",
               "channels_last": config.train.channels_last if layouts != [None] else None,
               "batch_size": default_batch_size(device)}
    match = [r for r in rows if all(r[k] == v for k, v in default.items())]
    out["library_default"] = {**default, "tiles_per_s_median": match[0]["tiles_per_s_median"] if match else None,
                              "note": None if match else "the library's default batch size was not among those measured"}
    return out


def _score_row(markers: list[dict], **keys) -> dict:
    shares = [m["data_wait_s"] / max(m["data_wait_s"] + m["compute_s"], 1e-9) for m in markers]
    return {**keys,
            "tiles_per_s_median": round(_median(m["tiles_per_s"] for m in markers), 1),
            "tiles_per_s_runs": [m["tiles_per_s"] for m in markers],
            "seconds_median": round(_median(m["seconds"] for m in markers), 3),
            "data_wait_share_median": round(_median(shares), 4),
            "data_wait_s_median": round(_median(m["data_wait_s"] for m in markers), 3),
            "compute_s_median": round(_median(m["compute_s"] for m in markers), 3)}


# -- 3: training --------------------------------------------------------------------------------------------------

def bench_training(args, s: Settings, device, cache: Path, work: Path, store_path: Path) -> tuple[dict, Path | None]:
    """Training figures of every detector of ``--configs`` (module docstring); also the DPA's checkpoint (after
    the loop's steps), which the pipeline part scores with."""
    configs = paper_configs(args.configs)
    wanted = [d.strip() for d in args.detectors.split(",")] if args.detectors else list(configs)
    unknown = sorted(set(wanted) - set(configs))
    if unknown:
        raise SystemExit(f"--detectors: no {args.configs} config for {', '.join(unknown)} (known: {', '.join(configs)})")
    result: dict = {
        "warmup_steps": s.warmup_steps, "timed_steps_per_phase": s.steps,
        "what": "phases: each part of the schedule stepped directly from its first step (the loop's body, CUDA "
                "synchronised after each step); loop: wsi_ad.detectors.loop.train from step 0 with stop_after, its own "
                "tiles/s logged every step; s_per_step and tiles/s are medians over the steps after the warm-up",
        "projection": "projected_hours = the fit + each phase's iterations x its median seconds per step (direct "
                      "stepping). Work done only at some steps is in it only when timed: IGD's E-step every "
                      "estep_every steps (its cost at step 0 is the first phase's before_step_s_max), Deep GEO's "
                      "Dirichlet fit after its last step, checkpoints (every train.checkpoint_every steps) are not",
        "detectors": {}}
    dpa_model = None
    for name in wanted:
        log(f"training: {name} ({_rel(configs[name])})")
        try:
            row, checkpoint = bench_detector_training(configs[name], s, device, cache, work, store_path)
        except Exception as exc:  # noqa: BLE001 - one detector failing must not lose the rest of the run
            row, checkpoint = {"config": _rel(configs[name]), "error": _error(exc)}, None
            log(f"training {name} failed: {_error(exc)}")
        result["detectors"][name] = row
        if name == "dpa":
            dpa_model = checkpoint
    return result, dpa_model


def phase_segments(detector, total: int) -> list[tuple[int, int, str]]:
    """(first step, steps, phase label) of each part of the schedule: split where the detector checkpoints
    besides ``checkpoint_every`` (its phase ends), as the loop marks its phases."""
    starts = sorted({0} | {b for b in detector.checkpoint_steps() if 0 < b < total})
    ends = [*starts[1:], total]
    return [(a, b - a, detector.phase(a)) for a, b in zip(starts, ends, strict=True) if b > a]


def step_times(detector, pool, config, device, start: int, n: int) -> list[dict]:
    """Run steps ``start .. start + n - 1`` as the training loop's body does (batch of the pool, augmentation,
    ``before_step``, ``train_step``) and time each: seconds in all and of ``before_step`` (CUDA synchronised)."""
    import numpy as np

    from wsi_ad.tile_pool import augment, to_tensor

    tiles_per_step = config.train.batch_size * detector.batches_per_step
    times = []
    for step in range(start, start + n):
        sync(device)
        t0 = time.perf_counter()
        rng = np.random.default_rng([config.train.seed, 17, step])         # the loop's batch of this step
        tiles = augment(pool.batch(step, tiles_per_step), rng, config.data.flips, config.data.rot90)
        t1 = time.perf_counter()
        detector.before_step(pool, step)
        sync(device)
        t2 = time.perf_counter()
        detector.train_step(to_tensor(tiles, device), step)
        sync(device)
        times.append({"seconds": time.perf_counter() - t0, "before_step_s": t2 - t1})
    return times


def bench_detector_training(config_path: Path, s: Settings, device, cache: Path, work: Path,
                            store_path: Path) -> tuple[dict, Path | None]:
    import torch

    from wsi_ad.detectors import build, get
    from wsi_ad.detectors.checkpoint import load_checkpoint
    from wsi_ad.detectors.loop import train

    config, weights = load_config(config_path, device, cache)
    config.train.log_every = 1                    # the loop logs its rate after every step (runtime keys)
    config.train.checkpoint_every = 10**9
    total = get(config.detector).num_steps_of(config)
    row: dict = {"config": _rel(config_path), "detector": config.detector, "backbone_weights": weights,
                 "batch_size": config.train.batch_size, "amp": config.train.amp,
                 "channels_last": config.train.channels_last, "num_steps": total}
    flush = device.type == "cpu" and torch.set_flush_denormal(True)   # as the loop does on the CPU
    try:
        torch.manual_seed(config.train.seed)
        pool = training_pool(config, [store_path])
        reset_peak(device)
        detector = build(config, device)
        fits = []
        for _ in range(s.repeat if total == 0 else 1):
            sync(device)
            started = time.perf_counter()
            detector.fit(pool)
            sync(device)
            fits.append(time.perf_counter() - started)
        row.update(pool_tiles=pool.total, fit_seconds_median=round(_median(fits), 3),
                   fit_seconds_runs=[round(v, 3) for v in fits])
        if total == 0:
            fitted = getattr(detector, "fit_tiles", None) or pool.total
            row.update(fit_only=True, fit_tiles=fitted, fit_tiles_per_s=round(fitted / _median(fits), 1),
                       peak_gpu_memory_mib=peak_mib(device),
                       note="fit-only (no training steps): its time grows with the training tiles (the paper's "
                            "are all normal tiles of the Camelyon16 training slides)")
            return row, None
        detector.train()
        tiles_per_step = config.train.batch_size * detector.batches_per_step
        phases, projected = [], row["fit_seconds_median"]
        for start, length, label in phase_segments(detector, total):
            n = min(length, s.warmup_steps + s.steps)
            times = step_times(detector, pool, config, device, start, n)
            timed = times[s.warmup_steps:] or times
            sec = _median(t["seconds"] for t in timed)
            projected += length * sec
            phases.append({"phase": label, "first_step": start, "iterations": length, "timed_steps": len(timed),
                           "s_per_step_median": _sig(sec), "iterations_per_s": _sig(1 / sec),
                           "tiles_per_s": round(tiles_per_step / sec, 1),
                           "s_per_step_runs": [_sig(t["seconds"]) for t in timed],
                           "first_step_s": round(times[0]["seconds"], 4),
                           "before_step_s_max": round(max(t["before_step_s"] for t in times), 4)})
            log(f"  {config.detector} {label or 'train'} (from step {start}): {phases[-1]['iterations_per_s']} it/s")
        row.update(tiles_per_step=tiles_per_step, phases=phases, peak_gpu_memory_mib=peak_mib(device),
                   projected_hours=_sig(projected / 3600))
        del detector
    finally:
        if flush:
            torch.set_flush_denormal(False)
    # The loop itself, from step 0: its own rate, logged every step (first phase only).
    checkpoint = work / "models" / f"{config.detector}.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    n = min(total, s.warmup_steps + s.steps)
    started = time.perf_counter()
    train([store_path], checkpoint, config, progress=False, echo=_quiet, stop_after=n, overwrite=True)
    wall = time.perf_counter() - started
    rates = [r for r in load_checkpoint(checkpoint)["history"]["tiles_per_s"][s.warmup_steps:n] if r]
    if rates:
        loop_sec = _median(tiles_per_step / r for r in rates)
        row["loop"] = {"steps": n, "timed_steps": len(rates), "phase": phases[0]["phase"],
                       "s_per_step_median": _sig(loop_sec), "iterations_per_s": _sig(1 / loop_sec),
                       "tiles_per_s_median": round(_median(rates), 1), "tiles_per_s_runs": rates,
                       "wall_seconds": round(wall, 2),
                       "vs_direct_first_phase": round(loop_sec / phases[0]["s_per_step_median"], 3),
                       "projected_hours_at_this_rate": _sig((row["fit_seconds_median"] + total * loop_sec) / 3600)
                       if len(phases) == 1 else None,
                       "note": "the loop's own tiles/s (logged every step), from step 0; wall_seconds includes the "
                               "build, fit and checkpoint"}
    return row, checkpoint


# -- 4: end-to-end pipeline ----------------------------------------------------------------------------------------

def _worker_device() -> dict:
    """Run on every worker of the pipeline's cluster: which device it sees."""
    import torch

    info = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpu": None, "gpu_uuid": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_uuid=str(getattr(props, "uuid", "")) or None)
    return info


def pipeline_model(args, device, cache: Path, work: Path, store_path: Path, trained: Path | None) -> tuple[Path, str]:
    """The checkpoint the pipeline scores with: ``--model``, the training part's DPA, or the DPA of ``--configs``
    after one step of the loop."""
    if args.model:
        return args.model, f"{args.model} (--model)"
    if trained is None:
        from wsi_ad.detectors.loop import train

        config, _ = load_config(paper_configs(args.configs)["dpa"], device, cache)
        trained = work / "models" / "pipeline_dpa.pt"
        trained.parent.mkdir(parents=True, exist_ok=True)
        train([store_path], trained, config, progress=False, echo=_quiet, stop_after=1, overwrite=True)
    return trained, f"{_rel(paper_configs(args.configs)['dpa'])} after a few training steps (speed does not depend on them)"


def bench_pipeline(args, s: Settings, device, cache: Path, work: Path, model: Path, model_note: str) -> dict:
    """``run_batch`` on one synthetic slide with a model, ``s.pipeline_repeat`` times (fresh output each time)."""
    import torch
    from distributed import get_task_stream

    from pipelines.cluster import connect, default_workers
    from pipelines.process import BatchConfig, run_batch
    from wsi_ad.store import SlideStore

    if device.type == "cuda" and torch.cuda.device_count() != 1:
        return {"skipped": f"{torch.cuda.device_count()} CUDA devices visible; set CUDA_VISIBLE_DEVICES to one device "
                           "for a run with one GPU worker"}
    slide, synth_s = cached_slide(cache, s.slide_px, tumor=True)
    workers = s.pipeline_workers or default_workers()[0]
    batch = BatchConfig(model=model, device=device.type)
    runs = []
    log(f"pipeline: {slide.name}, {workers} CPU worker(s){' + 1 GPU worker' if device.type == 'cuda' else ''}, "
        f"{s.pipeline_repeat} run(s)")
    with connect(workers=workers, use_gpu=device.type == "cuda") as (client, info):
        for k in range(s.pipeline_repeat):
            out = work / f"pipeline_run{k}"
            with get_task_stream(client) as stream:              # which worker ran each task
                started = time.perf_counter()
                result = run_batch([slide], out, batch, scheduler=info.address, echo=_quiet)
                wall = time.perf_counter() - started
            names = {address: str(w.get("name")) for address, w in client.scheduler_info()["workers"].items()}
            task_workers: dict[str, list[str]] = {}
            for record in stream.data:
                task = str(record["key"]).split("-", 1)[0]
                task_workers.setdefault(task, []).append(names.get(record.get("worker"), str(record.get("worker"))))
            res = result.results[0]
            if res["status"] != "ok":
                return {"error": f"slide failed at {res.get('failed_task')}: {res.get('error')}", "runs": runs}
            row = json.loads(result.report_json.read_text())["slides"][0]
            marker = SlideStore.open(res["store"]).stages.get(f"scores/{res['model_id']}", {})
            runs.append({"wall_seconds": round(wall, 2), "n_tiles": row["n_tiles"], "task_seconds": row["task_seconds"],
                         "stage_seconds": row["stage_seconds"], "score_worker": res.get("score_worker"),
                         "score_device": res.get("score_device"), "score_batch_size": marker.get("batch_size"),
                         "score_tiles_per_s": marker.get("tiles_per_s"), "score_dtype": marker.get("dtype"),
                         "score_data_wait_s": marker.get("data_wait_s"), "score_compute_s": marker.get("compute_s"),
                         "task_workers": task_workers})
            log(f"  run {k + 1}: {wall:.1f} s wall, {row['n_tiles']} tiles")
            shutil.rmtree(out, ignore_errors=True)
        devices = client.run(_worker_device)
    wall = _median(r["wall_seconds"] for r in runs)

    def medians(key: str) -> dict:
        names = sorted({n for r in runs for n, v in (r[key] or {}).items() if v is not None})
        return {n: round(_median(r[key][n] for r in runs if (r[key] or {}).get(n) is not None), 3) for n in names}

    shares = [r["score_data_wait_s"] / max(r["score_data_wait_s"] + r["score_compute_s"], 1e-9) for r in runs
              if r["score_data_wait_s"] is not None and r["score_compute_s"] is not None]
    gpu_workers = {w: d for w, d in devices.items() if d["gpu"]}
    uuid = None
    if device.type == "cuda":
        uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", "")) or None
    same_gpu = ([d["gpu_uuid"] for d in gpu_workers.values()] == [uuid]) if uuid else None
    return {
        "slide": str(slide), "side_px": s.slide_px, "synth_seconds": synth_s, "model": model_note,
        "cpu_workers": workers, "gpu_workers": len(gpu_workers), "gpu_worker_devices": list(gpu_workers.values()),
        "same_gpu_as_the_rest": same_gpu,
        "n_tiles": runs[0]["n_tiles"],
        "wall_seconds_median": round(wall, 2), "wall_seconds_runs": [r["wall_seconds"] for r in runs],
        "slides_per_hour": round(3600 / wall, 1),
        "task_seconds_median": medians("task_seconds"), "stage_seconds_median": medians("stage_seconds"),
        "score_tiles_per_s_median": round(_median(r["score_tiles_per_s"] for r in runs if r["score_tiles_per_s"]), 1)
        if any(r["score_tiles_per_s"] for r in runs) else None,
        "score_data_wait_share_median": round(_median(shares), 4) if shares else None,
        "runs": runs,
        "note": "one slide per run on a fresh output folder (every stage runs); the cluster is started once before the "
                "runs (not timed) and its workers persist, so the first run also pays the scorer's load and the CUDA "
                "start in the GPU worker (see wall_seconds_runs); the slide file may be in the page cache after the "
                "first run",
    }


# -- main ---------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a check in a few minutes")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cuda (auto: cuda when available, else skip); cpu: a smoke run, with --quick only")
    parser.add_argument("--out", type=Path, help=f"JSON result (default on cuda: {_rel(DEFAULT_OUT)}; cpu: none)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi-ad-bench-gpu",
                        help="synthetic slides, their stores and random backbone weights, kept for later runs")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--configs", choices=("paper", "cpu"),
                        help="config set of pipelines.compare.CONFIGS (default: paper; cpu with --device cpu)")
    parser.add_argument("--detectors", help="comma-separated detectors to train (default: every one of the set)")
    parser.add_argument("--model", type=Path, help="checkpoint for the pipeline (default: the set's DPA, briefly trained)")
    parser.add_argument("--batch-sizes", help="scoring batch sizes, comma-separated")
    for name, kind, text in (("repeat", int, "timed runs per scoring setting and per fit"),
                             ("steps", int, "timed training steps per phase"),
                             ("warmup-steps", int, "untimed training steps per phase"),
                             ("score-tiles", int, "tiles per DPA scoring run"),
                             ("knn-score-tiles", int, "tiles per knn scoring run"),
                             ("knn-fit-tiles", int, "training tiles of the scoring part's knn memory bank"),
                             ("slide-px", int, "side of the pipeline's synthetic slide (level-0 px)"),
                             ("train-slide-px", int, "side of the synthetic training slide (level-0 px)"),
                             ("pipeline-repeat", int, "end-to-end runs"),
                             ("pipeline-workers", int, "CPU workers of the pipeline's cluster")):
        parser.add_argument(f"--{name}", type=kind, help=f"{text} (default: by mode)")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = sorted(set(args.parts) - set(PARTS))
    if bad:
        parser.error(f"--parts: unknown {', '.join(bad)} (choose from {', '.join(PARTS)})")
    if args.device == "cpu" and not args.quick:
        parser.error("--device cpu is a smoke run of the measuring code: add --quick")
    return args


def settings_of(args, mode: str) -> Settings:
    s = MODES[mode]
    changes = {field: getattr(args, field) for field in ("repeat", "steps", "warmup_steps", "score_tiles",
                                                          "knn_score_tiles", "knn_fit_tiles", "slide_px",
                                                          "train_slide_px", "pipeline_repeat", "pipeline_workers")
               if getattr(args, field) is not None}
    if args.batch_sizes:
        changes["batch_sizes"] = tuple(int(v) for v in args.batch_sizes.split(","))
    return replace(s, **changes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu", "skipped": f"no CUDA device (torch.cuda.is_available() is false; torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda}); nothing measured or written "
                          "(`--device cpu --quick` smoke-tests the measuring code on the CPU)"}))
        return 0
    device = torch.device("cuda" if args.device != "cpu" else "cpu")
    mode = "smoke" if device.type == "cpu" else ("quick" if args.quick else "full")
    args.configs = args.configs or ("cpu" if device.type == "cpu" else "paper")
    s = settings_of(args, mode)
    started = time.perf_counter()
    cache = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "benchmark": "gpu",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": mode, "device": device.type,
        "configs": args.configs,
        "environment": environment(device),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s).items()},
    }
    if device.type == "cpu":
        results["cpu_smoke"] = ("measured on the CPU with tiny sizes and the CPU configs: a smoke run of the measuring "
                                "code, not GPU figures")
    log(f"mode {mode} on {device.type} ({results['environment'].get('gpu') or 'CPU'}); cache {cache}")
    with tempfile.TemporaryDirectory(prefix="work_", dir=cache) as tmp:
        work = Path(tmp)
        store_path, train_facts = training_store(cache, s.train_slide_px)
        results["training_slide"] = train_facts
        trained = None
        if "score" in args.parts:
            results["scoring"] = bench_scoring(args, s, device, cache, work, store_path)
        if "train" in args.parts:
            results["training"], trained = bench_training(args, s, device, cache, work, store_path)
        if "pipeline" in args.parts:
            try:
                model, note = pipeline_model(args, device, cache, work, store_path, trained)
                results["pipeline"] = bench_pipeline(args, s, device, cache, work, model, note)
            except Exception as exc:  # noqa: BLE001 - keep what was measured
                results["pipeline"] = {"error": _error(exc)}
                log(f"pipeline failed: {_error(exc)}")
    results["environment"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    results["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(results, indent=2)
    print(text)
    out = args.out or (DEFAULT_OUT if device.type == "cuda" else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
