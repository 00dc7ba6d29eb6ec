"""Where the Dask graph runs: a local ``dask.distributed`` cluster sized to the machine, or an existing one.

* Local (default): one worker *process* per CPU core pair, one thread each (the stages release the GIL in
  OpenSlide, numpy and torch, but torch's own intra-op threads oversubscribe shared cores badly, so each
  worker gets ``threads_per_worker`` torch threads and no more). When CUDA devices are present, one extra
  worker per GPU advertises the resource ``GPU=1`` and only it runs scoring tasks: one task per GPU. The
  CPU workers see no GPU (``CUDA_VISIBLE_DEVICES=""``): their stages run on the CPU (stain normalization
  with its compiled CPU kernel) instead of each opening a CUDA context on the scoring GPU; they advertise the
  resource ``CPU``, which every other task requires, so no preprocessing queues on a GPU worker.
* ``--scheduler tcp://HOST:PORT``: the same graph on an existing cluster. Scoring tasks ask for the
  ``GPU`` resource only when some worker advertises it (``dask worker --resources GPU=1``). Every worker
  must see the slide files, the output folder and the checkpoint under the same paths (a shared
  filesystem), as with any distributed file-based pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import dask

log = logging.getLogger(__name__)

#: The worker resource that marks a GPU; scoring tasks require one unit of it where any worker has it.
GPU_RESOURCE = "GPU"
#: The resource of the CPU workers of a cluster with GPU workers: the other tasks (preprocess, aggregate, overlay,
#: export) require it there, so they never queue on a GPU worker ahead of its scoring.
CPU_RESOURCE = "CPU"

#: Environment of local worker processes. Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` to return
#: memory to the OS sooner; any fixed value turns off glibc's dynamic mmap threshold, so every torch batch
#: buffer is mmap'ed and page-faulted afresh: scoring ran 2.5x slower (measured, 1 thread, batch 64: 134 vs
#: 337 tiles/s). Unset it (None unsets a pre-spawn variable); memory stays bounded by the fixed batch size.
WORKER_ENVIRONMENT = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


@dataclass(frozen=True)
class ClusterInfo:
    """What the graph runs on: scheduler address, worker count, whether scoring is pinned to GPU workers."""

    address: str
    n_workers: int
    gpu_workers: int
    local: bool
    cpu_workers_marked: bool = False
    #: each worker's thread pools (:func:`wsi_ad.threads.current`), by worker address, for the run's report
    worker_threads: dict | None = None

    @property
    def score_resources(self) -> dict | None:
        """Resources a scoring task asks for (``{"GPU": 1}`` where GPU workers exist, else none)."""
        return {GPU_RESOURCE: 1} if self.gpu_workers else None

    @property
    def cpu_resources(self) -> dict | None:
        """Resources the other tasks ask for: ``{"CPU": 1}`` where the CPU workers advertise it (the local cluster
        with GPUs; ``dask worker --resources CPU=1`` on your own), else none (any worker)."""
        return {CPU_RESOURCE: 1} if self.cpu_workers_marked else None


def default_workers() -> tuple[int, int]:
    """(workers, threads per worker) for a local cluster on this machine: one single-threaded worker per
    core, at most 8 (slides are independent, so processes scale; memory grows with workers)."""
    from wsi_ad.threads import available_cores

    return max(1, min(8, available_cores())), 1


def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _set_worker_threads(threads: int, quiet: bool) -> dict:
    """Run on every worker at start: size its torch, numba and BLAS threads to its share of the cores
    (:func:`wsi_ad.threads.configure`, see the module docstring); unless verbose, keep the library's warnings off
    the console (each result carries its slide's warnings). Returns the worker's thread pools."""
    from wsi_ad.threads import configure

    if quiet:
        logging.getLogger("wsi_ad").setLevel(logging.ERROR)
    return configure(max(1, threads))


@contextlib.contextmanager
def connect(scheduler: str | None = None, *, workers: int | None = None, threads_per_worker: int | None = None,
            use_gpu: bool = True) -> Iterator[tuple[object, ClusterInfo]]:
    """Yield ``(distributed.Client, ClusterInfo)``: a new local cluster (closed on exit) or a client of the
    cluster at ``scheduler`` (left running on exit)."""
    from distributed import Client

    from wsi_ad.threads import current as current_threads

    quiet = not logging.getLogger("wsi_ad").isEnabledFor(logging.INFO)
    if quiet:                                       # -v shows Dask's own INFO messages
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if scheduler:
        client = Client(scheduler, timeout="20s")
        try:
            info = client.scheduler_info()["workers"]
            gpu = sum(1 for w in info.values() if w.get("resources", {}).get(GPU_RESOURCE, 0) >= 1)
            cpu = any(w.get("resources", {}).get(CPU_RESOURCE, 0) >= 1 for w in info.values())
            yield client, ClusterInfo(scheduler, len(info), gpu, local=False, cpu_workers_marked=cpu,
                                      worker_threads=client.run(current_threads))
        finally:
            client.close()
        return

    default_n, default_t = default_workers()
    n_workers = workers or default_n
    threads = threads_per_worker or default_t
    gpus = _cuda_devices() if use_gpu else 0
    options = {"dashboard_address": None, "silence_logs": logging.ERROR}
    with dask.config.set(WORKER_ENVIRONMENT):
        cluster = _local_cluster(n_workers, threads, gpus, options)
    client = Client(cluster)
    try:
        pools = client.run(_set_worker_threads, threads, quiet)
        yield client, ClusterInfo(cluster.scheduler_address, len(client.scheduler_info()["workers"]), gpus, local=True,
                                  cpu_workers_marked=gpus > 0, worker_threads=pools)
    finally:
        client.close()
        cluster.close()


def visible_gpu(index: int) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that shows a worker the ``index``-th GPU this process sees: the
    ``index``-th entry of this process's own ``CUDA_VISIBLE_DEVICES`` when set (``2,3`` -> GPU 2 for index 0, not
    GPU 0), else ``index``."""
    own = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return own[index] if index < len(own) else str(index)


def _local_cluster(n_workers: int, threads: int, gpus: int, options: dict):
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    if gpus == 0:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True, **options)
    else:
        worker_specs = {f"cpu-{i}": {"cls": Nanny, "options": {"nthreads": threads, "silence_logs": logging.ERROR,
                                                               "resources": {CPU_RESOURCE: threads},
                                                               "env": {"CUDA_VISIBLE_DEVICES": ""}}}
                        for i in range(n_workers)}
        for gpu in range(gpus):
            worker_specs[f"gpu-{gpu}"] = {"cls": Nanny, "options": {
                "nthreads": 1, "resources": {GPU_RESOURCE: 1}, "silence_logs": logging.ERROR,
                "env": {"CUDA_VISIBLE_DEVICES": visible_gpu(gpu)}}}
        cluster = SpecCluster(workers=worker_specs, silence_logs=logging.ERROR,
                              scheduler={"cls": Scheduler, "options": {"dashboard_address": None}})
    return cluster
