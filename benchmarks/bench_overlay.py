"""Benchmark: peak memory and time of rendering the heatmap overlay of a 100k x 100k px slide.

Usage::

    python benchmarks/bench_overlay.py [--size 100000] [--work DIR] [--out benchmarks/results/overlay_memory.json]

Synthesizing a realistic 100k px slide takes ~15 minutes, so this writes a cheap one instead: a pyramidal,
JPEG-tiled (256 px, YCbCr 4:2:0, quality 80), Aperio-described BigTIFF at 0.25 µm/px whose level-0 tiles are
a few pre-encoded variants (white glass, textured pink tissue) laid out by a coarse mask of elliptical
tissue islands (one mask cell = one 256 px tile = one tile-grid cell of 64 px at 10x); tiles on island
borders are composed and encoded one by one, and every coarser level (downsample 2) is built the same way
from the mask, so the thumbnail shows the islands. A synthetic heatmap on the slide's 10x tile grid (NaN
off tissue, a few hot lesions) goes with it.

The overlay (automatic thumbnail of at most 2000 px, tumour outlines, colour bar) is rendered in a fresh
subprocess whose resident set size is sampled every 20 ms with psutil and cross-checked with
``getrusage(RUSAGE_CHILDREN).ru_maxrss``. The same is done for a smaller reference slide (``--reference-size``,
25k px): the two peaks should be about equal, since everything scales with the thumbnail, not the slide.
Prints JSON and writes it to ``--out``; about 15 s (writing the 1.3 GB slide takes ~5 s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MPP = 0.25
TILE = 256
JPEG_LEVEL = 80


def tissue_mask_cells(n_rows: int, n_cols: int) -> np.ndarray:
    """(rows, cols) bool: tissue islands (ellipses) on a grid of one cell per 256 level-0 px."""
    yy, xx = np.mgrid[0:n_rows, 0:n_cols].astype(np.float64)
    yy, xx = (yy + 0.5) / n_rows, (xx + 0.5) / n_cols
    mask = np.zeros((n_rows, n_cols), dtype=bool)
    for cy, cx, ry, rx in ((0.3, 0.3, 0.22, 0.17), (0.62, 0.68, 0.25, 0.2), (0.78, 0.25, 0.12, 0.15)):
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return mask


def _variants(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    background = np.full((TILE, TILE, 3), 242, dtype=np.uint8)
    tissues = []
    for _ in range(4):
        base = np.array([222, 160, 196], dtype=np.float64) + rng.normal(0, 6, 3)
        noise = rng.normal(0, 14, (TILE // 4, TILE // 4, 1)).repeat(4, 0).repeat(4, 1)
        dots = (rng.random((TILE, TILE, 1)) < 0.01) * -110.0
        tissues.append(np.clip(base + noise + dots, 0, 255).astype(np.uint8))
    return background, tissues


def write_slide(path: Path, size: int, workers: int = 2) -> dict:
    """Write the cheap pyramidal slide (see the module docstring); returns its description."""
    import imagecodecs
    import tifffile

    rng = np.random.default_rng(0)
    n_cells = math.ceil(size / TILE)
    mask = tissue_mask_cells(n_cells, n_cells)
    background, tissues = _variants(rng)
    encode = lambda tile: imagecodecs.jpeg_encode(tile, level=JPEG_LEVEL, colorspace="RGB",  # noqa: E731
                                                  outcolorspace="YCBCR", subsampling=(2, 2))
    bg_bytes, tissue_bytes = encode(background), [encode(t) for t in tissues]
    dims = []
    level_size = size
    while True:
        dims.append(level_size)
        if level_size <= 1024:
            break
        level_size = math.ceil(level_size / 2)
    encoded = {"pre_encoded_uniform": 0, "composed": 0}

    def tiles(level: int):
        cells = 2**level                                     # mask cells per level tile edge
        n = math.ceil(dims[level] / TILE)
        for ty in range(n):
            for tx in range(n):
                block = mask[ty * cells:(ty + 1) * cells, tx * cells:(tx + 1) * cells]
                variant = (ty * 7919 + tx * 104729 + level) % len(tissues)
                if block.size == 0 or not block.any():
                    encoded["pre_encoded_uniform"] += 1
                    yield bg_bytes
                elif block.all() and block.shape == (cells, cells):
                    encoded["pre_encoded_uniform"] += 1
                    yield tissue_bytes[variant]
                else:
                    full = np.zeros((cells, cells), dtype=bool)
                    full[:block.shape[0], :block.shape[1]] = block
                    px = TILE // cells
                    pixels = full.repeat(px, 0).repeat(px, 1)[..., None]
                    encoded["composed"] += 1
                    yield encode(np.where(pixels, tissues[variant], background))

    header = "Aperio Image Library v12.0.0 \r\n"
    px_per_cm = 1e4 / MPP
    started = time.perf_counter()
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for level, dim in enumerate(dims):
            desc = f"{header}{size}x{size} [0,0 {size}x{size}] ({TILE}x{TILE}) JPEG/RGB Q={JPEG_LEVEL}"
            desc += f"|AppMag = 40|MPP = {MPP}" if level == 0 else f" -> {dim}x{dim}"
            tw.write(tiles(level), shape=(dim, dim, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="jpeg", subfiletype=0, metadata=None, description=desc,
                     resolution=(px_per_cm / 2**level, px_per_cm / 2**level), resolutionunit="CENTIMETER",
                     software="wsi-ad bench_overlay")
    return {"size_px": [size, size], "mpp": MPP, "levels": [[d, d] for d in dims],
            "file_mb": round(path.stat().st_size / 2**20, 1),
            "write_seconds": round(time.perf_counter() - started, 1), "tiles": encoded,
            "tissue_fraction": round(float(mask.mean()), 3)}


def synthetic_heatmap(size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(rows, cols) float32 scores on the 10x grid (256 level-0 px cells), NaN off tissue, and lesion polygons."""
    n = math.ceil(size / TILE)
    rows = cols = int(math.floor((size - TILE) / TILE + 1e-9)) + 1
    mask = tissue_mask_cells(n, n)[:rows, :cols]
    rng = np.random.default_rng(1)
    values = rng.gamma(4.0, 0.05, (rows, cols)).astype(np.float32)
    polygons = []
    for cy, cx, r in ((0.3, 0.3, 0.03), (0.6, 0.7, 0.05)):
        yy, xx = np.mgrid[0:rows, 0:cols]
        lesion = (yy / rows - cy) ** 2 + (xx / cols - cx) ** 2 <= r * r
        values[lesion] += 0.8
        angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        polygons.append(np.stack([(cx + r * np.cos(angles)) * cols * TILE, (cy + r * np.sin(angles)) * rows * TILE], axis=1))
    values[~mask] = np.nan
    return values, polygons


def render_child(slide_path: Path, heatmap_path: Path, png: Path) -> dict:
    """Runs in the fresh subprocess: render and write the overlay, measure time and RSS."""
    import matplotlib  # noqa: F401  (imported up front so the import is not counted as rendering memory)
    import psutil
    from peak_rss import PeakRss

    from wsi_ad.annotations import Annotation
    from wsi_ad.heatmap import Heatmap
    from wsi_ad.overlay import auto_thumbnail_mpp, cohort_scale, write_overlay
    from wsi_ad.slide import open_slide

    data = np.load(heatmap_path)
    values = data["values"]
    polygons = [data[f"polygon{i}"] for i in range(int(data["n_polygons"]))]
    annotations = [Annotation(f"lesion {i}", "_0", "tumor", "Polygon", p) for i, p in enumerate(polygons)]
    rss_before = psutil.Process().memory_info().rss
    with open_slide(slide_path) as slide, PeakRss(interval_s=0.02) as peak:
        heatmap = Heatmap(values, (TILE, TILE), (TILE, TILE), slide.mpp_x, slide.mpp_y, model_id="bench")
        scale = cohort_scale([heatmap])
        mpp = auto_thumbnail_mpp(slide)
        started = time.perf_counter()
        write_overlay(png, slide, heatmap, scale, annotations=annotations)
        seconds = time.perf_counter() - started
        level = slide.level_for_mpp(mpp, tolerance=0.0)
        level_dims = slide.level_dimensions[level]
        thumb = (round(slide.dimensions[0] * slide.mpp_x / mpp), round(slide.dimensions[1] * slide.mpp_y / mpp))
    from PIL import Image

    with Image.open(png) as image:
        overlay_size = list(image.size)
    return {"seconds": round(seconds, 2), "thumbnail_mpp": round(mpp, 4), "thumbnail_size": list(thumb),
            "overlay_png_size": overlay_size, "read_level": level, "read_level_size": list(level_dims),
            "heatmap_shape": list(values.shape), "rss_before_mb": round(rss_before / 2**20, 1),
            "peak_rss_mb": round(peak.peak / 2**20, 1), "peak_rss_increase_mb": round((peak.peak - rss_before) / 2**20, 1),
            "ru_maxrss_self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_size(work: Path, size: int) -> dict:
    """Write (or reuse) the ``size`` px slide and its heatmap in ``work``, render in a fresh subprocess."""
    slide_path = work / f"overlay_{size}.svs"
    if slide_path.exists():
        slide_info = {"size_px": [size, size], "file_mb": round(slide_path.stat().st_size / 2**20, 1), "reused": True}
    else:
        slide_info = write_slide(slide_path, size)
    values, polygons = synthetic_heatmap(size)
    heatmap_path = work / f"heatmap_{size}.npz"
    np.savez(heatmap_path, values=values, n_polygons=len(polygons), **{f"polygon{i}": p for i, p in enumerate(polygons)})
    png = work / f"overlay_{size}.png"
    child = subprocess.run([sys.executable, __file__, "--child", str(slide_path), str(heatmap_path), str(png)],
                           capture_output=True, text=True, check=True)
    render = json.loads(child.stdout.strip().splitlines()[-1])
    return {"slide": slide_info, "render": render}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--reference-size", type=int, default=25_000,
                        help="also render a slide of this size, to show that memory does not grow with the slide (0: skip)")
    parser.add_argument("--work", type=Path, default=None, help="keep the slide here (reused by a later run)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "overlay_memory.json")
    parser.add_argument("--child", nargs=3, metavar=("SLIDE", "HEATMAP", "PNG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(render_child(*map(Path, args.child))))
        return
    from wsi_ad.atomic import write_text_atomic

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-overlay-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs = {}
        for size in [args.size] + ([args.reference_size] if args.reference_size else []):
            runs[size] = run_size(work, size)
    main_run = runs.pop(args.size)
    children_maxrss_mb = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    report = {
        "benchmark": "overlay_memory",
        "what": "render_overlay + PNG write of a 100k x 100k px slide in a fresh process (auto thumbnail <= 2000 px, "
                "tumour outlines, colour bar)",
        "slide": main_run["slide"],
        "render": main_run["render"],
        "reference": [{"size_px": r["slide"]["size_px"], "file_mb": r["slide"]["file_mb"],
                       "thumbnail_size": r["render"]["thumbnail_size"], "seconds": r["render"]["seconds"],
                       "peak_rss_mb": r["render"]["peak_rss_mb"]} for r in runs.values()],
        "ru_maxrss_largest_child_mb": children_maxrss_mb,
        "total_seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg": [round(v, 2) for v in os.getloadavg()],
                    "date": datetime.datetime.now().isoformat(timespec="seconds")},
    }
    text = json.dumps(report, indent=2)
    write_text_atomic(args.out, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
