"""Benchmark of wsi_ad.stain against StainTools' Vahadane (the reference implementation, SPAMS).

    .venv/bin/pip install -e '.[fidelity]'      # staintools + spams-bin (GPL-3.0, benchmark only)
    .venv/bin/python benchmarks/bench_stain.py [--out benchmarks/results/stain.json]

Prints JSON (and writes it to --out): fit time per real slide; transform tiles/s on 256x256 tiles, ours
(CPU, 1 and 2 threads) vs StainTools' ``StainNormalizer("vahadane")`` (one run each, medians of per-call times); fidelity: stain
matrix cosines ours vs StainTools on the same pixels, MAE between the two normalized outputs, MAE to the
unshifted source of a stain-shifted copy normalized back, and the error of our closed-form concentrations
against SPAMS' lasso. Writes ``stain_side_by_side.png`` (source, ours, StainTools, target). Without
staintools installed, the StainTools parts are skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi_ad import stain as st  # noqa: E402
from wsi_ad.slide import open_slide  # noqa: E402
from wsi_ad.tissue import mask_slide  # noqa: E402

DATA = Path(os.environ.get("WSI_AD_TEST_DATA", REPO.parent / "shared" / "data")) / "slides"
SLIDES = {"cmu-1-small-region": (DATA / "cmu-1-small-region.svs", None),
          "tcga-cr-7395": (DATA / "tcga-cr-7395-01a-01-ts1.svs", 0.5)}
TILE = 256


def _timeit(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _tissue_tiles(rgb: np.ndarray, n: int, min_fraction: float = 0.6) -> list[np.ndarray]:
    keep = st.tissue_pixels(rgb)
    tiles = []
    for y in range(0, rgb.shape[0] - TILE + 1, TILE):
        for x in range(0, rgb.shape[1] - TILE + 1, TILE):
            if keep[y:y + TILE, x:x + TILE].mean() >= min_fraction:
                tiles.append(rgb[y:y + TILE, x:x + TILE].copy())
    step = max(1, len(tiles) // n)
    return tiles[::step][:n]


def _shift_stain(rgb: np.ndarray, fit: st.StainFit) -> np.ndarray:
    """A stain-shifted copy: concentrations under ``fit`` re-rendered with other stain vectors and
    strengths (bluer, stronger haematoxylin; paler, more orange eosin); the residual OD is kept."""
    od = st.rgb_to_od(rgb).astype(np.float64)
    conc = st.concentrations(od, fit.stain_matrix, 0.0)
    residual = od - conc @ fit.stain_matrix
    shifted = st._unit_rows(np.array([[0.48, 0.78, 0.40], [0.12, 0.90, 0.42]]))
    od2 = (conc * np.array([1.3, 0.7])) @ shifted + residual
    return np.clip(np.rint(255 * np.exp(-np.maximum(od2, 0))), 0, 255).astype(np.uint8)


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _cos(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [round(float(v), 5) for v in (st._unit_rows(a) * st._unit_rows(b)).sum(axis=1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "stain.json"))
    parser.add_argument("--png", default=str(REPO / "benchmarks" / "results" / "stain_side_by_side.png"))
    parser.add_argument("--staintools-tiles", type=int, default=8, help="tiles timed through StainTools")
    args = parser.parse_args()
    try:
        import spams
        import staintools  # noqa: F401
        have_staintools = True
    except ImportError as exc:
        have_staintools = False
        print(f"staintools/spams not installed ({exc}): skipping the StainTools comparison; install them with "
              f"`pip install -e '.[fidelity]'`", file=sys.stderr)

    params = st.StainParams()
    report: dict = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "params": params.to_dict(), "default_target": st.DEFAULT_TARGET.to_dict(), "slides": {},
    }

    # -- fit per slide --------------------------------------------------------------------------------
    fits, regions = {}, {}
    for name, (path, mpp) in SLIDES.items():
        with open_slide(path, mpp=mpp) as slide:
            t_mask, (mask, _) = _timeit(lambda slide=slide: mask_slide(slide), 1)
            t_fit, fit = _timeit(lambda slide=slide, mask=mask: st.fit_slide_stain(slide, mask, params=params), 3)
            w0, h0 = slide.dimensions
            regions[name] = slide.read_region((0, 0), (min(w0, int(2048 * 0.5 / slide.mpp_x)),) * 2, 0.5)[:2048, :2048]
            if name == "cmu-1-small-region":  # the whole slide at 0.5 µm/px, for the transform's tiles
                whole = slide.read_region((0, 0), (w0, h0), 0.5)
        fits[name] = fit
        report["slides"][name] = {"fit_s_median_of_3": round(t_fit, 3), "tissue_mask_s": round(t_mask, 3),
                                  "fit": fit.to_dict()}

    # -- transform speed ------------------------------------------------------------------------------
    # Every 256x256 tile of the whole CMU-1 slide at 0.5 µm/px with >= 30 % tissue, in one batch, on the
    # CPU with one thread (as in the pipeline: one single-threaded worker per core) and with two.
    source = fits["cmu-1-small-region"]
    tiles = _tissue_tiles(whole, 10_000, min_fraction=0.3)
    batch = np.stack(tiles)
    t0 = time.perf_counter()
    st.StainNormalizer(source, device="cpu")(batch[:1, :1, :1])
    kernel_load_s = time.perf_counter() - t0
    speeds = {}
    for threads in (1, 2):
        normalizer = st.StainNormalizer(source, device="cpu", threads=threads)
        t_batch, _ = _timeit(lambda normalizer=normalizer: normalizer(batch), 7)
        speeds[f"{threads}_thread{'s' if threads > 1 else ''}"] = len(batch) / t_batch
    big = regions["cmu-1-small-region"]
    t_big, _ = _timeit(lambda: st.StainNormalizer(source, device="cpu")(big), 7)
    report["transform"] = {
        "device": "cpu", "tile_px": TILE, "tiles": len(batch), "kernel_load_s": round(kernel_load_s, 3),
        "statistic": "median of 7",
        "ours_tiles_per_s": {k: round(v, 1) for k, v in speeds.items()},
        "ours_megapixels_per_s": {k: round(v * TILE * TILE / 1e6, 1) for k, v in speeds.items()},
        "ours_region_2048x2048_1_thread_s": round(t_big, 4),
    }

    # -- closed-form concentrations vs lasso -------------------------------------------------------------
    od = st.rgb_to_od(np.concatenate([t.reshape(-1, 3) for t in tiles[:8]])).astype(np.float64)
    ours_c = st.concentrations(od, source.stain_matrix, params.concentration_lambda)
    ls = np.maximum(od @ np.linalg.pinv(source.stain_matrix), 0.0)  # least squares + clipping, for reference
    conc_report = {"pixels": len(od)}
    if have_staintools:
        lasso = spams.lasso(X=np.asfortranarray(od.T), D=np.asfortranarray(source.stain_matrix.T), mode=2,
                            lambda1=params.concentration_lambda, pos=True).toarray().T
        conc_report.update({
            "closed_form_vs_spams_lasso_max_abs": float(np.abs(ours_c - lasso).max()),
            "closed_form_vs_spams_lasso_mean_abs": float(np.abs(ours_c - lasso).mean()),
            "lstsq_clip_vs_spams_lasso_max_abs": float(np.abs(ls - lasso).max()),
            "lstsq_clip_vs_spams_lasso_mean_abs": float(np.abs(ls - lasso).mean()),
            "mean_concentration": float(lasso.mean()),
        })
    report["concentrations_od_units"] = conc_report

    # -- fidelity: stain-shifted copy normalized back ------------------------------------------------
    target_img = regions["cmu-1-small-region"]
    target = st.fit_stain(target_img, params=params)
    shifted_img = _shift_stain(target_img, target)
    shifted_fit = st.fit_stain(shifted_img, params=params)
    ours_img = st.StainNormalizer(shifted_fit, target)(shifted_img)
    fid: dict = {
        "image": "cmu-1-small-region 2048x2048 at 0.5 um/px; shifted copy re-rendered with other H/E vectors "
                 "and strengths (x1.3 H, x0.7 E)",
        "target_fit": target.to_dict(), "shifted_fit": shifted_fit.to_dict(),
        "mae_shifted_vs_source_before": round(_mae(shifted_img, target_img), 3),
        "mae_ours_vs_source": round(_mae(ours_img, target_img), 3),
    }
    st_img = None
    if have_staintools:
        from staintools import StainNormalizer as StNormalizer
        from staintools.stain_extraction.vahadane_stain_extractor import VahadaneStainExtractor

        # stain matrices fitted on the same pixels (whole 2048 image and per tile), both slides
        cos = {}
        for name, img in regions.items():
            ref = VahadaneStainExtractor.get_stain_matrix(img.copy())
            ours = st._vahadane_matrix(st.rgb_to_od(img[st.tissue_pixels(img)]), params)
            per_tile = []
            for tile in _tissue_tiles(img, 6):
                per_tile.append(_cos(st._vahadane_matrix(st.rgb_to_od(tile[st.tissue_pixels(tile)]), params),
                                     VahadaneStainExtractor.get_stain_matrix(tile.copy())))
            cos[name] = {"region_2048": _cos(ours, ref), "tiles_256_H_E": per_tile,
                         "ours_he_cosine": round(float(ours[0] @ ours[1]), 4),
                         "staintools_he_cosine": round(float(ref[0] @ ref[1]), 4)}
        fid["stain_matrix_cosine_ours_vs_staintools"] = cos

        normalizer_st = StNormalizer(method="vahadane")
        t0 = time.perf_counter()
        normalizer_st.fit(target_img.copy())
        fid["staintools_target_fit_s"] = round(time.perf_counter() - t0, 3)
        # StainTools normalizes tile by tile (its transform refits the tile's stain matrix each time)
        shifted_tiles = [shifted_img[y:y + TILE, x:x + TILE] for y in range(0, 2048, TILE)
                         for x in range(0, 2048, TILE)]
        times, outs = [], []
        for tile in shifted_tiles:
            if len(times) >= args.staintools_tiles:
                outs.append(None)
                continue
            t0 = time.perf_counter()
            try:
                outs.append(normalizer_st.transform(tile.copy()))
            except Exception as exc:  # StainTools raises on tiles without tissue
                outs.append(tile.copy())
                print(f"staintools failed on a tile: {exc}", file=sys.stderr)
            times.append(time.perf_counter() - t0)
        st_tile_s = statistics.median(times)
        # whole image through StainTools in one call, for the output comparison
        t0 = time.perf_counter()
        st_img = normalizer_st.transform(shifted_img.copy())
        fid["staintools_2048_region_transform_s"] = round(time.perf_counter() - t0, 3)
        ours_tile_img = st.StainNormalizer(shifted_fit, st.fit_stain(target_img, params=params))(
            np.stack(shifted_tiles[:args.staintools_tiles]))
        fid["mae_staintools_vs_source"] = round(_mae(st_img, target_img), 3)
        fid["mae_ours_vs_staintools_output"] = round(_mae(ours_img, st_img), 3)
        fid["mae_ours_vs_staintools_output_per_tile_mode"] = round(
            float(np.mean([_mae(a, b) for a, b in zip(ours_tile_img, outs, strict=False) if b is not None])), 3)
        report["transform"].update({
            "staintools_tiles_timed": len(times), "staintools_s_per_tile_median": round(st_tile_s, 4),
            "staintools_tiles_per_s": round(1.0 / st_tile_s, 3),
            "staintools_threads": "SPAMS' default numThreads=-1: every core",
            "speedup_ours_vs_staintools": {k: round(v * st_tile_s, 0) for k, v in speeds.items()},
        })
    else:
        report["transform"]["staintools"] = "skipped: staintools not installed"
    report["fidelity"] = fid

    # -- side-by-side picture -------------------------------------------------------------------------
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        crop = (slice(512, 1280), slice(256, 1024))
        panels = [("source (stain-shifted)", shifted_img), ("ours", ours_img),
                  ("StainTools Vahadane", st_img), ("target (original)", target_img)]
        panels = [(t, p) for t, p in panels if p is not None]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6))
        for ax, (title, img) in zip(axes, panels, strict=True):
            ax.imshow(img[crop])
            ax.set_title(title)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(args.png, dpi=90)
        report["side_by_side_png"] = os.path.relpath(args.png, REPO)
    except Exception as exc:  # pragma: no cover - a picture is optional
        print(f"side-by-side PNG not written: {exc}", file=sys.stderr)

    text = json.dumps(report, indent=1)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
