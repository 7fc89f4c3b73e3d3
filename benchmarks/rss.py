"""Memory of a whole run: the peak of the *summed* RSS over a process and every process it starts
(flow process, training child, a temporary Prefect server), sampled at >= 10 Hz, plus each process's own peak.

A run's largest single process understates what the machine needs when two of them live side by side
(loraflow's flow process next to its training child); `wait4`'s `ru_maxrss` reports only that one.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil


class TreeSampler:
    """Samples `pid` and its descendants every 1/`hz` s in a thread, from `start()` to `stop()`."""

    def __init__(self, pid: int, hz: float = 20.0) -> None:
        self.root, self.period = psutil.Process(pid), 1.0 / hz
        self.peak_sum = 0
        self.own: dict[int, dict[str, Any]] = {}  # pid -> {"name", "cmd", "peak"}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._began = self._ended = 0.0

    def _sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for proc in procs:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue  # ended between listing and reading
            total += rss
            seen = self.own.get(proc.pid)
            if seen is None:
                try:  # it may end between its memory and these (the RSS read still counts)
                    name, cmd = proc.name(), " ".join(proc.cmdline()[:4])
                except psutil.Error:
                    name, cmd = "?", "?"
                seen = self.own[proc.pid] = {"name": name, "cmd": cmd[:160], "peak": 0}
            seen["peak"] = max(seen["peak"], rss)
        self.peak_sum = max(self.peak_sum, total)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def start(self) -> "TreeSampler":
        self._began = time.time()
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self._ended = time.time()
        span = max(self._ended - self._began, 1e-9)
        mb = 1 / 2**20
        return {
            "peak_rss_sum_mb": round(self.peak_sum * mb, 1),
            "sample_hz": round(self.samples / span, 1),
            "processes": sorted(({"pid": pid, "name": p["name"], "cmd": p["cmd"], "peak_rss_mb": round(p["peak"] * mb, 1)}
                                 for pid, p in self.own.items()), key=lambda p: -p["peak_rss_mb"]),
        }
