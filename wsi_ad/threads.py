"""The threads this process computes with: torch's intra-op pool, numba's parallel loops and the BLAS, sized once at
start-up to the cores the process owns.

Two processes that each take every core's threads (two trainings, or a training beside the Dask pipeline) fight
over the cores. What made that fight 10-30x slower rather than 2x is OpenMP's *active* waiting: GNU OpenMP (torch's
on Linux) lets each idle pool thread spin between parallel regions, so every small op of one process waits for
threads that the other process's spinning threads keep off the cores. :func:`configure` therefore also makes the
waiting passive (``OMP_WAIT_POLICY=PASSIVE``, unless the user set it), which must happen before torch loads its
OpenMP runtime: the command line calls it first thing, and Dask's worker processes inherit the setting.

Measured (``python benchmarks/bench_concurrent_training.py``, ``benchmarks/results/concurrent_training.json``: 40
iterations of ``small_cpu`` on 2 cores, medians of 3): GNU OpenMP's default, alone 5.4 s, two at once 31.6 s each
(5.8x; 21-41 s); passive, alone 7.0 s, two at once 13.6 s (1.9x its alone, 2.5x the default alone). With the DPA's
CPU setting (``--config demo_cpu --iterations 20``, one run): default 3.5 s alone and 48.4 s two at once (14x);
passive 4.4 s and 7.6 s. The price: a lone run of these small CPU models is about 30 % slower with passive waiting.
A lone run on a dedicated machine can take it back with ``OMP_WAIT_POLICY=ACTIVE`` (alone 5.5 s, but two at once
24 s) in its environment: a policy the user set is kept.
"""

from __future__ import annotations

import os

#: The OpenMP wait policy set unless the environment already has one (see the module docstring).
DEFAULT_OMP_WAIT_POLICY = "PASSIVE"


#: What :func:`configure` set in this process (None before it ran).
_configured: int | None = None


def default_threads() -> int:
    """The threads a process takes when not told: ``OMP_NUM_THREADS`` when the user set it to a positive integer,
    else :func:`available_cores`."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return available_cores()


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a batch system's allocation), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def set_wait_policy() -> str:
    """Set ``OMP_WAIT_POLICY`` to :data:`DEFAULT_OMP_WAIT_POLICY` unless it is set; returns the value in force.
    Takes effect only for OpenMP runtimes loaded after the call (torch imported later, child processes)."""
    return os.environ.setdefault("OMP_WAIT_POLICY", DEFAULT_OMP_WAIT_POLICY)


def configure(threads: int | None = None) -> dict:
    """Size this process's torch, numba and BLAS thread pools to ``threads`` (None: :func:`default_threads`) and
    make OpenMP's waiting passive (:func:`set_wait_policy`). Call once, at start-up. Returns what was set, for the
    run's report: ``{"threads", "torch", "numba", "blas", "omp_wait_policy"}``.

    Raises:
        ValueError: ``threads`` < 1.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    global _configured
    policy = set_wait_policy()
    n = int(threads or default_threads())
    _configured = n
    import torch

    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:      # pragma: no cover - numba is a dependency
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n, user_api="blas")
    except ImportError:      # pragma: no cover - scikit-learn brings threadpoolctl
        pass
    return {**current(), "threads": n, "omp_wait_policy": policy}


def current() -> dict:
    """The thread pools of this process as they are now (same keys as :func:`configure`)."""
    import torch

    info = {"threads": _configured, "torch": torch.get_num_threads(), "numba": None, "blas": None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    try:
        import numba

        info["numba"] = numba.get_num_threads()
    except ImportError:      # pragma: no cover
        pass
    try:
        from threadpoolctl import threadpool_info

        pools = [pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"]
        info["blas"] = max(pools) if pools else None
    except ImportError:      # pragma: no cover
        pass
    return info
