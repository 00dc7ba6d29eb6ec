"""Benchmark: exact nearest-neighbour search for the kNN detector's memory bank, faiss-cpu against torch, on this
machine's CPU.

Usage::

    python benchmarks/bench_knn_search.py [--banks 10000 100000] [--dims 64] [--queries 16384] [--repeats 5]
        [--out benchmarks/results/knn_search.json]

For every bank size K and feature dimension D: a random float32 bank (K, D) and M random queries (M, D) (normal,
seeded); the nearest bank row of every query (k = 1, what the detector asks for every patch of a batch) found by

- ``faiss_flat_l2``: faiss-cpu ``IndexFlatL2`` (built once, outside the timing; exact squared L2 distances; faiss's
  own OpenMP threads, as many as torch's);
- ``torch_blocks``: :func:`wsi_ad.detectors.knn.memory.nearest` (the detector's search: ``addmm`` blocks of
  at most ``SEARCH_BLOCK`` distances, min per block, the chosen distances recomputed exactly);
- ``torch_cdist``: ``torch.cdist`` + ``min`` over chunks of 4096 queries (the plain torch reference; needs a
  (4096, K) block).

The runs alternate (faiss, torch blocks, torch cdist, faiss, ...) ``--repeats`` times after one warm-up each, so
that a load change on the machine hits all alike; reported: every time, the median seconds and queries per second,
and whether the three agree on the neighbour of every query (up to float32 near-ties: index agreement and the
largest distance difference). Needs ``faiss-cpu`` installed (``pip install faiss-cpu``; not a dependency of wsi-ad).
Prints JSON and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi_ad.atomic import write_text_atomic  # noqa: E402
from wsi_ad.detectors.knn.memory import QUERY_ROWS, SEARCH_BLOCK, nearest  # noqa: E402


def cdist_min(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    dists, idx = [], []
    for start in range(0, len(queries), chunk):
        d, i = torch.cdist(queries[start : start + chunk], bank).min(1)
        dists.append(d)
        idx.append(i)
    return torch.cat(dists), torch.cat(idx)


def run_case(bank_size: int, dim: int, n_queries: int, repeats: int, seed: int = 0) -> dict:
    import faiss

    rng = np.random.default_rng([seed, bank_size, dim])
    bank = rng.standard_normal((bank_size, dim), dtype=np.float32)
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    index = faiss.IndexFlatL2(dim)
    index.add(bank)
    bank_t, queries_t = torch.from_numpy(bank), torch.from_numpy(queries)
    norms = bank_t.pow(2).sum(1)

    methods = {
        "faiss_flat_l2": lambda: index.search(queries, 1),
        "torch_blocks": lambda: nearest(queries_t, bank_t, 1, norms),
        "torch_cdist": lambda: cdist_min(queries_t, bank_t),
    }
    results = {name: fn() for name, fn in methods.items()}     # warm-up, and the answers to compare
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    faiss_d = np.sqrt(np.maximum(results["faiss_flat_l2"][0][:, 0], 0))
    faiss_i = results["faiss_flat_l2"][1][:, 0]
    agreement = {}
    for name in ("torch_blocks", "torch_cdist"):
        d, i = results[name]
        d, i = d.reshape(-1).numpy(), i.reshape(-1).numpy()
        agreement[name] = {"same_index_fraction": float(np.mean(i == faiss_i)),
                           "max_abs_distance_difference": float(np.max(np.abs(d - faiss_d)))}
    out = {"bank": bank_size, "dim": dim, "queries": n_queries, "repeats": repeats,
           "seconds": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
           "median_seconds": {name: round(statistics.median(ts), 4) for name, ts in times.items()},
           "queries_per_second": {name: round(n_queries / statistics.median(ts)) for name, ts in times.items()},
           "agreement_with_faiss": agreement}
    fastest = min(out["median_seconds"], key=out["median_seconds"].get)
    out["fastest"] = fastest
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--banks", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--dims", type=int, nargs="+", default=[64])
    parser.add_argument("--queries", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "knn_search.json")
    args = parser.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    cases = [run_case(k, d, args.queries, args.repeats) for d in args.dims for k in args.banks]
    report = {
        "benchmark": "bench_knn_search",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "faiss": faiss.__version__, "threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads()},
        "torch_blocks": {"SEARCH_BLOCK": SEARCH_BLOCK, "QUERY_ROWS": QUERY_ROWS},
        "command": "python benchmarks/bench_knn_search.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cases": cases,
    }
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
