"""Tissue masking and tiling on large synthetic slides: wall time, tiles/s, peak RSS, and the ratio of
tiling time to a bare OpenSlide read of the same regions (the physical floor).

For each slide size (default 25k and 50k px square at 0.243 µm/px, 40x) a synthetic tumour slide is
generated once (or reused from --cache), then measured in a fresh subprocess so that peak RSS belongs to
that slide alone:

* mask_s: ``run_tissue_stage`` (thumbnail at 8 µm/px + Otsu mask + QC PNG);
* tiling_s: ``run_tiles_stage`` (grid, one read per region, tiles into zarr), default 64 px at 10x,
  without stain normalization; tiling_normalized_s: the same with Vahadane normalization of every region
  (the default of ``wsi-ad process``); stain_fit_s: ``run_stain_stage`` (the per-slide fit);
  stain_kernel_load_s: loading the compiled CPU stain kernel from numba's disk cache (compiling it on the
  very first run), once per process, before the timed runs;
* floor_s: ``openslide.OpenSlide.read_region`` of exactly the regions tiling reads, converted to numpy,
  nothing else;
* peak_rss_mb: the worker's peak resident memory (psutil sampled every 20 ms) while tiling.

Times are medians of ``--repeat`` interleaved runs (floor, plain, normalized; all see a warm page cache).
Prints JSON. Usage: python benchmarks/bench_tiling.py [--sizes 25000,50000] [--magnifications 10x]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil


class PeakRss:
    """Samples this process's RSS in a thread; ``peak_mb`` is the maximum seen."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def floor_read(slide, tiles) -> float:
    """Seconds to read the same regions as ``iter_tile_blocks`` with bare OpenSlide calls."""
    import openslide

    from wsi_ad.slide import magnification_to_mpp

    geometry = tiles.geometry
    mpp = magnification_to_mpp(geometry.magnifications[0])
    level = slide.level_for_mpp(mpp)
    osr = openslide.OpenSlide(slide.path)
    stride_f, tile_f = geometry.stride_px[0], geometry.tile_px[0]
    started = time.perf_counter()
    for indices in tiles.blocks:
        cells = tiles.grid[indices]
        r0, c0 = cells.min(axis=0)
        r1, c1 = cells.max(axis=0)
        size = (int((c1 - c0) * stride_f + tile_f), int((r1 - r0) * stride_f + tile_f))
        location = (int(round(c0 * geometry.stride0[0])), int(round(r0 * geometry.stride0[1])))
        np.asarray(osr.read_region(location, level, size))
    osr.close()
    return time.perf_counter() - started


def worker(slide_path: str, magnifications: str, out_dir: str, repeat: int = 3) -> dict:
    from wsi_ad.preprocess import PreprocessConfig, run_stain_stage, run_tiles_stage, run_tissue_stage
    from wsi_ad.slide import open_slide
    from wsi_ad.stain import StainNormalizer
    from wsi_ad.store import SlideStore
    from wsi_ad.tiling import TilingParams, parse_magnifications, plan_tiles

    tiling = TilingParams(magnifications=parse_magnifications(magnifications))
    config = PreprocessConfig(tiling=tiling, stain=None)
    normalized = PreprocessConfig(tiling=tiling)
    with open_slide(slide_path) as slide:
        store = SlideStore.for_slide(out_dir, slide)
        rss_start = psutil.Process().memory_info().rss / 2**20
        t0 = time.perf_counter()
        with PeakRss() as mask_rss:
            mask, _ = run_tissue_stage(slide, store, config, qc_path=Path(out_dir) / "qc.png")
        mask_s = time.perf_counter() - t0
        tiles = plan_tiles(slide, config.tiling, lambda b: mask.tissue_fraction(b, (slide.mpp_x, slide.mpp_y)))
        t0 = time.perf_counter()
        stain, _ = run_stain_stage(slide, store, mask, normalized)
        stain_fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()                     # load (or first compile) the numba stain kernel once
        StainNormalizer(stain, normalized.stain_target)(np.full((1, 1, 3), 128, np.uint8))
        kernel_load_s = time.perf_counter() - t0
        times: dict[str, list[float]] = {"floor": [], "plain": [], "normalized": []}
        peaks: dict[str, float] = {"plain": 0.0, "normalized": 0.0}
        for _ in range(repeat):                      # interleaved, so drift hits all three alike
            times["floor"].append(floor_read(slide, tiles))
            for name, cfg, fit in (("plain", config, None), ("normalized", normalized, stain)):
                store.invalidate("tiles")
                t0 = time.perf_counter()
                with PeakRss() as rss:
                    n_tiles, _ = run_tiles_stage(slide, store, mask, cfg, stain=fit)
                times[name].append(time.perf_counter() - t0)
                peaks[name] = max(peaks[name], rss.peak_mb)
        floor_s, tiling_s, tiling_normalized_s = (statistics.median(times[k]) for k in ("floor", "plain", "normalized"))
        return {
            "level0_px": list(slide.dimensions),
            "levels": slide.level_count,
            "magnifications": list(config.tiling.magnifications),
            "tissue_area_mm2": round(mask.tissue_area_mm2, 2),
            "n_tiles": n_tiles,
            "n_regions": len(tiles.blocks),
            "mask_s": round(mask_s, 3),
            "tiling_s": round(tiling_s, 3),
            "tiles_per_s": round(n_tiles / tiling_s, 1),
            "floor_read_s": round(floor_s, 3),
            "repeat": repeat,
            "statistic": "median",
            "runs_s": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
            "tiling_over_floor": round(tiling_s / floor_s, 3),
            "stain_method": stain.method,
            "stain_fit_s": round(stain_fit_s, 3),
            "stain_kernel_load_s": round(kernel_load_s, 3),
            "tiling_normalized_s": round(tiling_normalized_s, 3),
            "normalized_over_plain_tiling": round(tiling_normalized_s / tiling_s, 3),
            "normalized_over_floor": round(tiling_normalized_s / floor_s, 3),
            "rss_at_start_mb": round(rss_start, 1),
            "peak_rss_mask_mb": round(mask_rss.peak_mb, 1),
            "peak_rss_tiling_mb": round(peaks["plain"], 1),
            "peak_rss_tiling_normalized_mb": round(peaks["normalized"], 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="25000,50000", help="level-0 slide sizes (px), comma-separated")
    parser.add_argument("--magnifications", default="10x")
    parser.add_argument("--cache", type=Path, help="folder to keep/reuse the synthetic slides in")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are reported")
    parser.add_argument("--worker", nargs=3, metavar=("SLIDE", "MAGS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, repeat=args.repeat)))
        return

    from wsi_ad.synth import synthesize_slide

    results = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        for size in (int(s) for s in args.sizes.split(",")):
            slide_path = cache / f"bench_{size}_{args.seed}.tif"
            if not slide_path.exists():
                t0 = time.perf_counter()
                synthesize_slide(slide_path, width_px=size, seed=args.seed, tumor=True)
                print(f"synthesized {slide_path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            out_dir = tempfile.mkdtemp(dir=tmp)
            proc = subprocess.run([sys.executable, __file__, "--worker", str(slide_path), args.magnifications,
                                   out_dir, "--repeat", str(args.repeat)], capture_output=True, text=True, check=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps({
        "benchmark": "tissue_mask_and_tiling",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    # 1-minute load average before and after: other work on the machine skews the times
                    "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "slides": results,
    }, indent=2))


if __name__ == "__main__":
    main()
