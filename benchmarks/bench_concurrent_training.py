"""Two trainings on the same cores: do they share them (about 2x the time of one) or fight (10-30x)?

Issue 22 found two torch processes on 2 cores taking 5 s per iteration instead of 0.15 s. Each process takes every
core's threads (torch's default, and ``wsi-ad``'s: :func:`wsi_ad.threads.configure`); what decides between sharing
and fighting is how GNU OpenMP's idle threads wait. This runs the same short training (``small_cpu``, the tests'
small DPA, or ``--config``; ``--iterations`` iterations on one synthetic slide's tiles), each in its own process
with torch's default threads, alone and two at a time, under each OpenMP wait policy:

* ``default``: ``OMP_WAIT_POLICY`` unset, GNU OpenMP's own (spin a while, then sleep): what every process did before;
* ``PASSIVE``: what ``wsi-ad`` now sets at start-up unless the user set a policy;
* ``ACTIVE``: spin always;
* ``spin 10k``, ``spin 1k``: GNU OpenMP's default policy with a short spin (``GOMP_SPINCOUNT`` 10,000 or 1,000
  instead of 300,000).

Runs interleave (alone, pair; policy by policy) ``--repeat`` times; medians of the training seconds (measured inside
each process, imports excluded). Prints JSON and writes ``benchmarks/results/concurrent_training.json``.

    python benchmarks/bench_concurrent_training.py [--iterations 40] [--repeat 3] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "concurrent_training.json"
#: OpenMP settings compared: name -> environment variables (unset: GNU OpenMP's own defaults).
POLICIES = {"default": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
            "spin 10k": {"GOMP_SPINCOUNT": "10000"}, "spin 1k": {"GOMP_SPINCOUNT": "1000"}}


def _child(store: str, out: str, iterations: int, config_name: str) -> None:
    """One training, timed inside the process (imports excluded); prints ``{"seconds": ...}``."""
    import torch

    from wsi_ad.config import Config
    from wsi_ad.detectors.loop import train

    config = Config.from_yaml(config_name)
    config.train.checkpoint_every = 10 ** 6
    started = time.perf_counter()
    train([store], out, config, progress=False, echo=lambda *a: None, stop_after=iterations, overwrite=True)
    print(json.dumps({"seconds": time.perf_counter() - started, "torch_threads": torch.get_num_threads(),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}))


def _run(n: int, policy: str, store: Path, work: Path, iterations: int, config: str) -> list[float]:
    """``n`` trainings at once under ``policy``; the training seconds of each."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(store), str(work / f"m{i}.pt"), str(iterations),
                               config],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
             for i in range(n)]
    seconds = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"training failed: {err[-2000:]}")
        seconds.append(json.loads(out.strip().splitlines()[-1])["seconds"])
    return seconds


def _store(cache: Path) -> Path:
    from pipelines.process import process_paths
    from wsi_ad.preprocess import PreprocessConfig
    from wsi_ad.synth import synthesize_slide

    store = cache / "stores" / "normal_900.zarr"
    if not store.is_dir():
        slide = synthesize_slide(cache / "normal_900.tif", width_px=8192, seed=900, tumor=False)
        process_paths([slide.path], cache / "stores", PreprocessConfig(), echo=lambda *a: None)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--config", default="small_cpu", help="packaged config name or YAML (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", type=Path, help="folder for the synthetic slide and its store (default: a temp dir)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: all: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write the results file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        store = _store(cache)
        chosen = [p for p in args.policies.split(",") if p]
        unknown = set(chosen) - set(POLICIES)
        if unknown:
            parser.error(f"unknown --policies {sorted(unknown)}")
        runs: dict[str, dict[str, list[float]]] = {p: {"alone": [], "pair": []} for p in chosen}
        for _ in range(args.repeat):
            for policy in chosen:
                runs[policy]["alone"] += _run(1, policy, store, Path(tmp), args.iterations, args.config)
                runs[policy]["pair"] += _run(2, policy, store, Path(tmp), args.iterations, args.config)
    result = {
        "what": f"seconds of one short training ({args.config}, {args.iterations} iterations) alone and with a second one "
                "at once, each process with torch's default threads, by OpenMP wait policy; medians",
        "cores": len(os.sched_getaffinity(0)), "config": args.config, "iterations": args.iterations, "repeat": args.repeat,
        "policies": {},
    }
    for policy, times in runs.items():
        alone, pair = statistics.median(times["alone"]), statistics.median(times["pair"])
        result["policies"][policy] = {"environment": POLICIES[policy], "alone_s": round(alone, 2), "pair_s": round(pair, 2),
                                      "pair_over_alone": round(pair / alone, 2),
                                      "s_per_iteration_alone": round(alone / args.iterations, 3),
                                      "s_per_iteration_pair": round(pair / args.iterations, 3),
                                      "runs": {k: [round(v, 2) for v in vs] for k, vs in times.items()}}
    print(json.dumps(result, indent=2))
    if not args.no_write:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
