"""End-to-end ``wsi-ad process`` on a local Dask cluster: wall time vs the sum of task times (overlap),
slides/hour, and peak memory per worker process on a >= 60k x 60k px synthetic slide; then, with
``--memory-sizes``, peak memory per worker for one slide of each size alone (memory flat in slide size).

    python benchmarks/bench_pipeline.py [--size 61440] [--small 3] [--workers 2] [--work /tmp/wsi-ad-bench-pipeline]
                                        [--memory-sizes 25000,50000,100000]

Synthesizes (once, cached in --work; ``mem_<size>.tif`` there is reused, e.g. a link to a slide made by
``bench_tiling.py``) one big tumour slide and a few small ones, trains a small model briefly (scoring speed does
not depend on how long it trained), then runs the whole per-slide chain (tissue, stain, tiles, score in tasks of
2,048-tile chunks spread over the workers, heatmap, overlay, report) with the model on a fresh output folder,
sampling every worker's RSS every 0.5 s. The overlap is the sum of every task's own seconds (preprocess, score
plan, every score range, score finish, aggregate, overlay; not the scoring step's wall span, which overlaps its
ranges) over the wall time: ideally the number of workers. Prints JSON and writes
``benchmarks/results/pipeline.json``.
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
    parser.add_argument("--memory-sizes", default="",
                        help="comma-separated level-0 sides (px): one slide of each alone, peak RSS per worker")
    parser.add_argument("--skip-mix", action="store_true", help="only the --memory-sizes runs")
    parser.add_argument("--score-chunk-tiles", type=int, default=None,
                        help="tiles per stored score chunk, and so per scoring task (default: the library's)")
    args = parser.parse_args()

    from pipelines.process import BatchConfig, run_batch
    from wsi_ad.config import Config
    from wsi_ad.detectors.loop import train
    from wsi_ad.synth import synthesize_slide

    slides_dir = args.work / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    synth_seconds = {}
    wanted = [(f"big_{args.size}", args.size, True)] + [(f"small_{i:02d}", 16384, i % 2 == 1) for i in range(args.small)]
    if args.skip_mix:                       # the model's training slide only
        wanted = [w for w in wanted if w[0] == "small_00"]
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

    output = {
        "benchmark": "bench_pipeline",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "workers": args.workers,
        "score_chunk_tiles": args.score_chunk_tiles,
        "synth_seconds": synth_seconds,
        "note": "overlap = sum of every task's own seconds / wall time (ideal: the number of workers); the scoring "
                "step's wall span ('score') is left out of the sum, its plan, ranges and finish are in; task times "
                "include cluster scheduling but not the cluster start; stage_seconds are the store's own stage "
                "markers",
    }
    if not args.skip_mix:
        wall, report, peaks = _run([slides_dir], args.work / "out", model, args.workers, args.score_chunk_tiles)
        slides = []
        for row in report["slides"]:
            tasks = row["task_seconds"]
            own = {k: v for k, v in tasks.items() if k != "score"}
            slides.append({"slide_id": row["slide_id"], "status": row["status"], "width": row["width"],
                           "n_tiles": row["n_tiles"], "task_seconds": tasks, "score_tasks": row.get("score_tasks"),
                           "score_worker": row.get("score_worker"),
                           "sum_of_task_seconds": round(sum(own.values()), 2), "stage_seconds": row["stage_seconds"]})
        task_sum = sum(s["sum_of_task_seconds"] for s in slides)
        big = next(s for s in slides if s["slide_id"].startswith("big_"))
        output.update({
            "slides": slides,
            "wall_seconds": round(wall, 1),
            "sum_of_all_task_seconds": round(task_sum, 1),
            "overlap": round(task_sum / wall, 2),
            "slides_per_hour": round(len(slides) / wall * 3600, 1),
            "tiles_per_second_end_to_end": round(sum(s["n_tiles"] or 0 for s in slides) / wall, 1),
            "big_slide": {"side_px": args.size, "n_tiles": big["n_tiles"], "score_tasks": big["score_tasks"],
                          "score_workers": big["score_worker"], "score_wall_seconds": big["task_seconds"].get("score")},
            "peak_rss_mb_per_worker": peaks,
        })
    memory = []
    for size in [int(v) for v in args.memory_sizes.split(",") if v.strip()]:
        path = args.work / f"mem_{size}.tif"
        if not path.exists():
            started = time.perf_counter()
            synthesize_slide(path, width_px=size, seed=size, tumor=True)
            synth_seconds[path.stem] = round(time.perf_counter() - started, 1)
        folder = args.work / f"mem_{size}"
        folder.mkdir(exist_ok=True)
        link = folder / path.name
        if not link.exists():
            link.symlink_to(path.resolve())
        wall, report, peaks = _run([folder], args.work / f"out_mem_{size}", model, args.workers, args.score_chunk_tiles)
        row = report["slides"][0]
        memory.append({"side_px": size, "status": row["status"], "n_tiles": row["n_tiles"],
                       "score_tasks": row.get("score_tasks"), "wall_seconds": round(wall, 1),
                       "peak_rss_mb_per_worker": peaks, "peak_rss_mb_max": max(peaks.values()) if peaks else None})
    if memory:
        top = [m["peak_rss_mb_max"] for m in memory if m["peak_rss_mb_max"]]
        output["memory_by_slide_size"] = memory
        output["memory_spread"] = round(max(top) / min(top) - 1, 3) if top else None
    output["machine"]["load_average_at_end"] = os.getloadavg()
    text = json.dumps(output, indent=2)
    print(text)
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(text + "\n")


def _run(paths: list[Path], out: Path, model: Path, workers: int, chunk_tiles: int | None = None
         ) -> tuple[float, dict, dict]:
    """One ``run_batch`` with the model on a fresh ``out``: (wall seconds, report.json, peak RSS MB per worker)."""
    from pipelines.cluster import connect
    from pipelines.process import BatchConfig, run_batch

    shutil.rmtree(out, ignore_errors=True)
    peaks: dict[str, int] = {}
    with connect(workers=workers) as (client, info):
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
        result = run_batch(paths, out, BatchConfig(model=model, score_chunk_tiles=chunk_tiles), scheduler=info.address,
                           echo=lambda s: None)
        wall = time.perf_counter() - started
        stop.set()
        sampler.join()
    report = json.loads(result.report_json.read_text())
    return wall, report, {w.rsplit(":", 1)[-1]: round(v / 2**20) for w, v in peaks.items()}


if __name__ == "__main__":
    main()
