"""Benchmark: how easy the synthetic tissue is for the feature kNN, per tissue mode, beside the real-patch figure.

Usage::

    python benchmarks/bench_synth_realism.py [--modes simple,lymph-node] [--work DIR] [--seed 0]
        [--out benchmarks/results/synth_realism.json] [--montage montage.png]

For each tissue mode (:data:`wsi_ad.synth.TISSUE_MODES`) a small cohort is rendered as the real patch set of
``shared/data/patches/camelyon16_l0_256`` is laid out (anomalib Folder: ``train/good``, ``test/good``,
``test/tumor``): 256 x 256 px tiles at level 0 (0.243 µm/px, about 62 µm), JPEG quality 80 as the synthetic TIFF's
level 0, taken at random from the tissue of 5 normal training slides (100 tiles each; slide scenes of 8192 px,
stains alternating between the two hospitals), 3 other normal slides (100 each) and from inside the lesions
(>= 90 % of the tile) of 3 tumour slides (12288 px, one 0.8 mm lesion; 50 each). The scenes are rendered window
by window with :func:`wsi_ad.synth.render_region` (what ``synthesize_slide`` writes as level 0, without the TIFF).
A normal tile needs >= 50 % tissue in the coarse tissue field, so tissue edges are included as in CLAM's patches.

The kNN (``configs/knn_cpu.yaml``: PatchCore on EfficientNet-Lite0 block7+10 features of 64 px tiles at 10x, fit
only) is fitted on ``train/good`` by :func:`pipelines.compare.run_one` (``data.image_mpp`` 0.243, as the real-patch
benchmark) and its tile ROC AUC measured on ``test`` (with a stratified bootstrap 95 % interval). The real figure
on the Camelyon16 patches is 0.755 (benchmarks/results/real_patches.json).

Also reported per mode: the per-nucleus haematoxylin ratio tumour / normal: nuclei segmented on the colour
deconvolution's haematoxylin channel (skimage ``rgb2hed``, Gaussian sigma 2, each tile's Otsu threshold, holes filled,
components of >= 30 px), each nucleus's mean haematoxylin, the median over the tumour tiles' nuclei divided by the
median over the normal test tiles' nuclei (the simple mode's tumour nuclei are ~1.8x darker; the real ratio is
below 1: carcinoma nuclei are vesicular); and the median nucleus area (µm²) of each class.

Writes the JSON report to ``--out`` (and prints it) and a montage (real normal / real tumour, then each mode's
normal and tumour tiles, all at 0.243 µm/px) to ``--montage``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from wsi_ad.atomic import write_text_atomic  # noqa: E402
from wsi_ad.synth import (  # noqa: E402
    CAMELYON_MPP,
    FIELD_DS,
    HOSPITAL_STAINS,
    TISSUE_MODES,
    _build_scene,
    _lesion_mask,
    render_region,
    sample_field,
)

DEFAULT_PATCHES = Path(os.environ.get("WSI_AD_TEST_DATA") or REPO.parent / "shared" / "data") / "patches" / "camelyon16_l0_256"
TILE = 256  # level-0 px, as the real patches
JPEG_QUALITY = 80
#: (slide seeds, tiles per slide) of each split; the seeds are offset by --seed.
TRAIN_NORMAL = (tuple(range(1, 6)), 100)
TEST_NORMAL = (tuple(range(11, 14)), 100)
TEST_TUMOR = (tuple(range(21, 24)), 50)
NORMAL_SIZE, TUMOR_SIZE, LESION_MM = 8192, 12288, 0.8
REAL_KNN_AUC = 0.755


def _scene(seed: int, tumor: bool, tissue: str):
    size = TUMOR_SIZE if tumor else NORMAL_SIZE
    return _build_scene(size, size, seed, 1 if tumor else 0, [LESION_MM] if tumor else None,
                        HOSPITAL_STAINS["AB"[seed % 2]], False, CAMELYON_MPP, tissue)


def sample_tiles(scene, n: int, tumor: bool, rng: np.random.Generator) -> list[tuple[int, int, np.ndarray]]:
    """``n`` random tiles (x, y, (256, 256, 3) uint8) of the scene: in tissue (>= 50 %) or inside a lesion (>= 90 %)."""
    out, tries, seen = [], 0, set()
    cells = (scene.width - TILE) // 128
    while len(out) < n:
        tries += 1
        if tries > 200 * n:
            raise RuntimeError(f"seed {scene.seed}: found only {len(out)} of {n} tiles")
        x, y = (int(v) * 128 for v in rng.integers(0, cells, 2))
        if (x, y) in seen:
            continue
        seen.add((x, y))
        lesion = _lesion_mask(scene, x, y, TILE, TILE)
        if tumor:
            if lesion is None or lesion.mean() < 0.9:
                continue
        else:
            if lesion is not None or sample_field(scene.tissue_field, FIELD_DS, x, y, 8, 8, step=32).mean() < 0.5:
                continue
        out.append((x, y, render_region(scene, x, y, TILE, TILE)))
    return out


def write_cohort(root: Path, tissue: str, seed: int) -> dict[str, list[np.ndarray]]:
    """Render the cohort of ``tissue`` into ``root`` (anomalib Folder layout); returns the tiles per split."""
    rng = np.random.default_rng([seed, 0x5EA1])
    tiles: dict[str, list[np.ndarray]] = {}
    for split, (seeds, per_slide), tumor in (("train/good", TRAIN_NORMAL, False), ("test/good", TEST_NORMAL, False),
                                            ("test/tumor", TEST_TUMOR, True)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        tiles[split] = []
        for s in seeds:
            scene = _scene(seed * 1000 + s, tumor, tissue)
            for x, y, tile in sample_tiles(scene, per_slide, tumor, rng):
                Image.fromarray(tile).save(folder / f"s{scene.seed}_x{x:06d}_y{y:06d}.jpg", quality=JPEG_QUALITY)
                tiles[split].append(tile)
    return tiles


def nucleus_stats(tiles: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(mean haematoxylin, area in px) of every segmented nucleus of the tiles (module docstring)."""
    import scipy.ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    means, areas = [], []
    for tile in tiles:
        h = rgb2hed(tile)[..., 0]
        smooth = ndi.gaussian_filter(h, 2)
        if smooth.max() - smooth.min() < 1e-3:
            continue
        nuclei = ndi.binary_fill_holes(smooth > threshold_otsu(smooth))
        labels, n = ndi.label(nuclei)
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        area = ndi.sum_labels(np.ones_like(h), labels, idx)
        mean = ndi.mean(h, labels, idx)
        keep = area >= 30
        means.append(mean[keep])
        areas.append(area[keep])
    return np.concatenate(means), np.concatenate(areas)


def knn_auc(root: Path, work: Path) -> dict:
    """Fit the CPU kNN on ``root/train/good`` and return its tile AUC on ``root/test`` (with a bootstrap interval)."""
    import csv

    from pipelines.compare import CONFIG_DIR, _FolderData, run_one
    from wsi_ad.config import Config
    from wsi_ad.metrics import bootstrap_auc_ci, roc_auc

    base = Config.from_yaml(CONFIG_DIR / "knn_cpu.yaml")
    config = replace(base, data=replace(base.data, magnification="10x", image_mpp=CAMELYON_MPP),
                     train=replace(base.train, device="cpu"))
    started = time.perf_counter()
    record = run_one(config, _FolderData(root), work, "cpu", lambda line: None)
    with open(work / "tiles" / "scores_test.csv", newline="", encoding="utf-8") as f:
        rows = [(int(r["label"]), float(r["score"])) for r in csv.DictReader(f)]
    y, s = [r[0] for r in rows], [r[1] for r in rows]
    return {"tile_auc": round(roc_auc(y, s), 4), "ci95": [round(v, 4) for v in bootstrap_auc_ci(y, s, n_boot=2000, seed=0)],
            "n_tumor": sum(y), "n_normal": len(y) - sum(y), "fit_and_score_s": round(time.perf_counter() - started, 1),
            "reused": record["reused"]}


def _row(tiles: list[np.ndarray], n: int, size: int) -> Image.Image:
    row = Image.new("RGB", (n * size, size), "white")
    for i, tile in enumerate(tiles[:n]):
        row.paste(Image.fromarray(tile).resize((size, size), Image.Resampling.LANCZOS), (i * size, 0))
    return row


def montage(path: Path, rows: list[tuple[str, list[np.ndarray]]], n: int = 8, size: int = 192) -> Path:
    """Rows of ``n`` tiles (shown at ``size`` px, all the same µm/px) with a label above each."""
    label_h = 18
    img = Image.new("RGB", (n * size, len(rows) * (size + label_h)), "white")
    draw = ImageDraw.Draw(img)
    for k, (label, tiles) in enumerate(rows):
        top = k * (size + label_h)
        draw.text((4, top + 3), label, fill=(0, 0, 0))
        img.paste(_row(tiles, n, size), (0, top + label_h))
    img.save(path)
    return path


def _showcase(tissue: str, seed: int) -> list[np.ndarray]:
    """Normal tiles of the lymph-node mode that show its structures (one per zone where found), then plain ones."""
    from wsi_ad.synth import _ln_zone

    scene = _build_scene(16384, 16384, seed * 1000 + 7, 0, None, HOSPITAL_STAINS["A"], False, CAMELYON_MPP, tissue)
    st = 64
    n = scene.width // st
    tissue_frac = sample_field(scene.tissue_field, FIELD_DS, 0, 0, n, n, step=st)
    out = []
    for name in ("capsule", "fat", "lumen", "haem", "gc", "sinus", "blur"):
        z = _ln_zone(scene, name, 0, 0, n, n, step=st)
        cand = np.argwhere((z > (0.5 if name == "capsule" else 0.95)) & (tissue_frac > (0.3 if name == "capsule" else 0.7)))
        if len(cand):
            y, x = cand[len(cand) // 2] * st
            x0, y0 = max(0, int(x) // 128 * 128 - 128), max(0, int(y) // 128 * 128 - 128)
            out.append(render_region(scene, x0, y0, TILE, TILE))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(TISSUE_MODES), help="tissue modes (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsi-ad-bench-synth-realism"),
                        help="tiles and models (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="offset of the slide seeds (default: %(default)s)")
    parser.add_argument("--patches", type=Path, default=DEFAULT_PATCHES,
                        help="the real patches, for the montage (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "synth_realism.json",
                        help="report JSON (default: %(default)s)")
    parser.add_argument("--montage", type=Path, default=None, help="montage PNG (default: beside --out)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in TISSUE_MODES]
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(TISSUE_MODES)})")
    report: dict = {"benchmark": "synth_realism", "detector_config": "configs/knn_cpu.yaml", "real_knn_tile_auc": REAL_KNN_AUC,
                    "cohort": {"train_normal_slides": len(TRAIN_NORMAL[0]), "train_tiles": len(TRAIN_NORMAL[0]) * TRAIN_NORMAL[1],
                               "test_normal_tiles": len(TEST_NORMAL[0]) * TEST_NORMAL[1],
                               "test_tumor_tiles": len(TEST_TUMOR[0]) * TEST_TUMOR[1], "tile_px": TILE,
                               "mpp": CAMELYON_MPP, "seed": args.seed},
                    "modes": {}}
    rows: list[tuple[str, list[np.ndarray]]] = []
    if args.patches.is_dir():
        for split, label in (("train/good", "real normal"), ("test/tumor", "real tumour")):
            files = sorted((args.patches / split).glob("*.jpg"))
            pick = np.random.default_rng(3).choice(len(files), size=min(8, len(files)), replace=False)
            rows.append((f"{label} (Camelyon16, 0.243 um/px)", [np.asarray(Image.open(files[i]).convert("RGB")) for i in pick]))
    area_um2 = CAMELYON_MPP**2
    for mode in modes:
        root = args.work / mode / "data"
        started = time.perf_counter()
        tiles = write_cohort(root, mode, args.seed)
        render_s = time.perf_counter() - started
        result = knn_auc(root, args.work / mode / "run")
        tumour_h, tumour_a = nucleus_stats(tiles["test/tumor"][:60])
        normal_h, normal_a = nucleus_stats(tiles["test/good"][:60])
        result.update({
            "render_s": round(render_s, 1),
            "nucleus_h_ratio_tumor_normal": round(float(np.median(tumour_h) / np.median(normal_h)), 3),
            "nucleus_h_median": {"tumor": round(float(np.median(tumour_h)), 4), "normal": round(float(np.median(normal_h)), 4)},
            "nucleus_area_um2_median": {"tumor": round(float(np.median(tumour_a)) * area_um2, 1),
                                        "normal": round(float(np.median(normal_a)) * area_um2, 1)},
            "n_nuclei": {"tumor": int(len(tumour_h)), "normal": int(len(normal_h))},
        })
        report["modes"][mode] = result
        print(f"{mode}: kNN tile AUC {result['tile_auc']:.3f} {result['ci95']}, nucleus H ratio "
              f"{result['nucleus_h_ratio_tumor_normal']:.2f}", file=sys.stderr)
        normal_show = (_showcase(mode, args.seed)[:5] if mode == "lymph-node" else []) + tiles["test/good"]
        rows.append((f"synthetic {mode}: normal", normal_show))
        rows.append((f"synthetic {mode}: tumour", tiles["test/tumor"][::7]))
    report["machine"] = {"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()}
    report["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, text + "\n")
    montage(args.montage or args.out.with_suffix(".png"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
