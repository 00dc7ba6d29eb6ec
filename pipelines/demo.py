"""``wsi-ad demo``: the main job end to end on an embedded default, a small synthetic Camelyon16-like dataset.

1. synthesize the dataset in the official layout (``OUT/data``: training normal/tumour slides, testing
   slides, ASAP XML, ``reference.csv``);
2. preprocess the normal training slides (tissue mask, stain normalization, 64 px tiles at 10x) on a local
   Dask cluster (``OUT/train_stores``);
3. fit the feature-kNN detector (PatchCore) on their tiles (``configs/knn_cpu.yaml``: the offline efficientnet_lite0
   backbone, seconds on 2 CPU cores) → ``OUT/model.pt``. Of the CPU settings it ranks REAL Camelyon16 metastases
   best (``benchmarks/results/real_patches.json``; the DPA's CPU setting, ``configs/demo_cpu.yaml``, is near chance
   there and needs its paper setting on a GPU; README "Real tissue");
4. run ``wsi-ad process`` on the testing slides with that model, the lesion annotations and the reference
   labels → ``OUT/run``: stores, heatmaps, overlays, ``report.html`` with the slide-level ROC AUC.

Every step resumes: a second ``wsi-ad demo --out`` on the same folder reuses what is there.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from pipelines.process import BatchConfig, run_batch
from wsi_ad.atomic import write_text_atomic
from wsi_ad.config import Config
from wsi_ad.synth import synthesize_dataset

#: Demo dataset size: small enough for a 2-core laptop, big enough to hold 4+ pyramid levels.
DEMO_SLIDE_SIZE_PX = 12288
#: The demo's model configuration: the packaged ``knn_cpu`` (``wsi_ad/configs/knn_cpu.yaml``).
DEMO_CONFIG = "knn_cpu"


def demo_config() -> Config:
    """The demo's model configuration (the packaged ``knn_cpu``)."""
    return Config.from_yaml(DEMO_CONFIG)


def run_demo(out: str | Path, *, seed: int = 0, workers: int | None = None, echo=print) -> dict:
    """Run the demo into ``out``; returns the summary also written to ``out/summary.json``."""
    from wsi_ad.detectors.checkpoint import CheckpointError
    from wsi_ad.detectors.loop import train

    out = Path(out)
    started = time.perf_counter()
    data = out / "data"
    recipe = {"n_normal": 2, "n_tumor": 1, "n_test": 4, "size_px": DEMO_SLIDE_SIZE_PX, "seed": seed}
    stamp = data / "demo_dataset.json"
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        echo(f"1/4 Reusing the synthetic dataset in {data}")
    else:
        echo(f"1/4 Synthesizing a Camelyon16-like dataset in {data} ...")
        for stale in (data, out / "train_stores", out / "run"):     # another recipe, or an interrupted one:
            shutil.rmtree(stale, ignore_errors=True)                 # everything made from it starts afresh
        for stale in out.glob("model.*"):
            stale.unlink()
        synthesize_dataset(data, **recipe)
        write_text_atomic(stamp, json.dumps(recipe))
    timings = {"synth": time.perf_counter() - started}

    echo("2/4 Preprocessing the normal training slides (tissue mask, stain normalization, tiles) ...")
    step = time.perf_counter()
    prepared = run_batch([data / "training" / "normal"], out / "train_stores", BatchConfig(), workers=workers,
                         echo=lambda line: echo("    " + line))
    timings["preprocess_training"] = time.perf_counter() - step

    echo("3/4 Fitting the feature-kNN detector (PatchCore) on their tiles (configs/knn_cpu.yaml) ...")
    step = time.perf_counter()
    try:
        trained = train([out / "train_stores"], out / "model.pt", demo_config(), progress=False,
                        echo=lambda line: echo("    " + line))
    except CheckpointError as exc:  # e.g. a model.pt of an earlier wsi-ad with other settings: the demo's own output
        echo(f"    {exc}: training afresh")
        trained = train([out / "train_stores"], out / "model.pt", demo_config(), progress=False, overwrite=True,
                        echo=lambda line: echo("    " + line))
    timings["train"] = time.perf_counter() - step

    echo("4/4 Processing the test slides: tiles, scores, heatmaps, overlays, report ...")
    step = time.perf_counter()
    batch = BatchConfig(model=trained.checkpoint, annotations_dir=data / "testing" / "lesion_annotations",
                        labels=data / "testing" / "reference.csv")
    result = run_batch([data / "testing" / "images"], out / "run", batch, workers=workers,
                       echo=lambda line: echo("    " + line))
    timings["process_testing"] = time.perf_counter() - step

    auc = (result.metrics or {}).get("auc")
    summary = {
        "data": str(data), "model": str(trained.checkpoint), "model_id": trained.model_id,
        "train_final_loss": trained.final_loss, "training_slides_failed": prepared.n_failed,
        "report": str(result.report_html), "slide_auc": auc,
        "slides": [{key: r.get(key) for key in ("slide_id", "status", "slide_score", "n_tiles", "error")}
                   for r in result.results],
        "seconds": {key: round(value, 1) for key, value in timings.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    labels = {row["slide_id"]: row.get("label") for row in json.loads(result.report_json.read_text())["slides"]}
    echo("")
    echo(f"{'slide':<12} {'label':<7} {'slide score':>11} {'tiles':>6}")
    for row in summary["slides"]:
        score = f"{row['slide_score']:.4f}" if row["slide_score"] is not None else "-"
        echo(f"{row['slide_id']:<12} {labels.get(row['slide_id']) or '?':<7} {score:>11} {row['n_tiles'] or 0:>6}")
    echo("")
    echo(f"Slide-level ROC AUC on the synthetic test slides: {auc:.3f}" if auc is not None
         else "Slide-level ROC AUC: not defined (one class only)")
    echo(f"Report: {result.report_html}   ({summary['total_seconds']:.0f} s in all)")
    command = sys.argv[0] if Path(sys.argv[0]).name == "wsi-ad" else "wsi-ad"     # .venv/bin/wsi-ad after `make demo`
    echo(f"Look at it in the browser (deep zoom, heatmap, hotspots): {shlex.quote(command)} view "
         f"{shlex.quote(str(out / 'run'))}")
    return summary
