"""Benchmark: synthesize one tumour slide (default 50000 x 50000 px) and report time, memory and size as JSON.

Usage::

    python benchmarks/bench_synth.py [--size 50000] [--seed 0] [--out DIR] [--workers N] [--tissue simple|lymph-node]

Prints one JSON object to stdout: wall time (s), peak RSS of the process (MB, sampled with psutil
every 50 ms and cross-checked with ``resource.getrusage``), output file size, level count and
dimensions, and the machine (CPU count, Python, platform, date). Without ``--out`` the slide is
written to a temporary directory that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil
from peak_rss import PeakRss  # benchmarks/peak_rss.py, beside this script

from wsi_ad.synth import synthesize_slide


def run(size: int, seed: int, out_dir: Path, workers: int | None, tissue: str = "simple") -> dict:
    """Synthesize one ``size`` x ``size`` tumour slide in ``out_dir`` and return the measurements."""
    path = out_dir / f"bench_{size}.tif"
    rss_before = psutil.Process().memory_info().rss
    load_before = os.getloadavg()[0]
    with PeakRss() as rss:
        start = time.perf_counter()
        slide = synthesize_slide(path, width_px=size, seed=seed, tumor=True, pen_marks=True, workers=workers,
                                 tissue=tissue)
        wall = time.perf_counter() - start
    return {
        "benchmark": "synthesize_slide",
        "size_px": [size, size],
        "seed": seed,
        "tissue": tissue,
        "wall_s": round(wall, 2),
        "megapixels_per_s": round(size * size / 1e6 / wall, 2),
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "file_bytes": path.stat().st_size,
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "level_count": len(slide.level_dimensions),
        "level_dimensions": slide.level_dimensions,
        "lesions": len(slide.annotations),
        "largest_lesion_mm": round(slide.largest_lesion_mm, 3),
        "metastasis": slide.metastasis,
        "workers": workers or min(4, os.cpu_count() or 1),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            # 1-minute load average before and after: other work on the machine slows this benchmark
            "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=50000, help="slide edge in level-0 px (default 50000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the slide in this directory")
    parser.add_argument("--workers", type=int, default=None, help="threads (default: CPU count, at most 4)")
    parser.add_argument("--tissue", default="simple", help="tissue mode (wsi_ad.synth.TISSUE_MODES; default: %(default)s)")
    args = parser.parse_args(argv)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        result = run(args.size, args.seed, args.out, args.workers, args.tissue)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
            result = run(args.size, args.seed, Path(tmp), args.workers, args.tissue)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
