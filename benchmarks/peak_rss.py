"""Peak resident memory of this process while a block runs, sampled in a background thread (shared by the
benchmark scripts; run them from the repository root, e.g. ``python benchmarks/bench_overlay.py``)."""

from __future__ import annotations

import threading

import psutil


class PeakRss:
    """``with PeakRss() as rss: ...`` then ``rss.peak``: the largest RSS seen, in bytes, sampled every
    ``interval_s`` seconds and once more at the end."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self.peak = interval_s, 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
