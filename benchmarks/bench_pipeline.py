"""End-to-end ``wsi-ad process`` on a local Dask cluster: wall time vs the sum of stage times (overlap),
slides/hour, and peak memory per worker process on a >= 60k x 60k px synthetic slide.

    python benchmarks/bench_pipeline.py [--size 61440] [--small 3] [--workers 2] [--work /tmp/wsi-ad-bench-pipeline]

Synthesizes (once, cached in --work) one big tumour slide and a few small ones, trains a small model briefly
(scoring speed does not depend on how long it trained), then runs the whole per-slide chain (tissue, stain,
tiles, score, heatmap, overlay, report) with the model on a fresh output folder, sampling every worker's RSS
every 0.5 s. Prints JSON and writes ``benchmarks/results/pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=61440, help="level-0 side of the big slide (px)")
    parser.add_argument("--small", type=int, default=3, help="number of 16384 px slides besides it")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsi-ad-bench-pipeline"))
    parser.add_argument("--result", type=Path, default=REPO / "benchmarks" / "results" / "pipeline.json")
    args = parser.parse_args()

    from pipelines.cluster import connect
    from pipelines.process import BatchConfig, run_batch
    from wsi_ad.config import Config
    from wsi_ad.detectors.loop import train
    from wsi_ad.synth import synthesize_slide

    slides_dir = args.work / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    synth_seconds = {}
    wanted = [(f"big_{args.size}", args.size, True)] + [(f"small_{i:02d}", 16384, i % 2 == 1) for i in range(args.small)]
    for name, size, tumor in wanted:
        path = slides_dir / f"{name}.tif"
        if not path.exists():
            started = time.perf_counter()
            synthesize_slide(path, width_px=size, seed=size + len(name), tumor=tumor)
            synth_seconds[name] = round(time.perf_counter() - started, 1)

    model = args.work / "model.pt"
    if not model.exists():
        config = Config.from_yaml(REPO / "configs" / "demo_cpu.yaml")
        config.section.flat_iterations = 50
        run_batch([slides_dir / "small_00.tif"], args.work / "train_stores", BatchConfig(), workers=1, echo=lambda s: None)
        train([args.work / "train_stores"], model, config, progress=False, echo=lambda s: None)

    out = args.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    peaks: dict[str, int] = {}
    with connect(workers=args.workers) as (client, info):
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    for worker, rss in client.run(_rss).items():
                        peaks[worker] = max(peaks.get(worker, 0), rss)
                except Exception:  # noqa: BLE001 - sampling must never stop the benchmark
                    pass
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        result = run_batch([slides_dir], out, BatchConfig(model=model), scheduler=info.address, echo=lambda s: None)
        wall = time.perf_counter() - started
        stop.set()
        sampler.join()

    report = json.loads(result.report_json.read_text())
    slides = []
    for row in report["slides"]:
        tasks = row["task_seconds"]
        slides.append({"slide_id": row["slide_id"], "status": row["status"], "width": row["width"],
                       "n_tiles": row["n_tiles"], "task_seconds": tasks,
                       "sum_of_stage_seconds": round(sum(tasks.values()), 2), "stage_seconds": row["stage_seconds"]})
    stage_sum = sum(s["sum_of_stage_seconds"] for s in slides)
    big = slides[0]
    output = {
        "benchmark": "bench_pipeline",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_at_end": os.getloadavg()},
        "workers": args.workers,
        "slides": slides,
        "wall_seconds": round(wall, 1),
        "sum_of_all_stage_seconds": round(stage_sum, 1),
        "overlap": round(stage_sum / wall, 2),
        "slides_per_hour": round(len(slides) / wall * 3600, 1),
        "tiles_per_second_end_to_end": round(sum(s["n_tiles"] or 0 for s in slides) / wall, 1),
        "big_slide": {"side_px": args.size, "n_tiles": big["n_tiles"], "end_to_end_seconds": big["sum_of_stage_seconds"]},
        "peak_rss_mb_per_worker": {w.rsplit(":", 1)[-1]: round(v / 2**20) for w, v in peaks.items()},
        "synth_seconds": synth_seconds,
        "note": "overlap = sum of every task's time / wall time (ideal: the number of workers); task times include "
                "cluster scheduling but not the cluster start; stage_seconds are the store's own stage markers",
    }
    text = json.dumps(output, indent=2)
    print(text)
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(text + "\n")


if __name__ == "__main__":
    main()
