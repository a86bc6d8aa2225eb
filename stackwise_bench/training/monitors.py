"""Background monitors: sample the machine while the trainer runs.

A monitor has ``start(sink)`` and ``stop() -> dict``; samples go to
``sink.log_hardware`` (the run record), the dict returned by ``stop`` lands in
``summary.json["resources"]``. Sampling runs in a daemon thread that sleeps
between samples, so the training loop never waits on it.
"""

from __future__ import annotations

import os
import threading
import time

import psutil


class HardwareMonitor:
    """Samples process CPU %, RSS and (on CUDA) GPU memory/utilisation every ``interval_s``."""

    def __init__(self, interval_s: float = 1.0, gpu: bool = True):
        self.interval_s = interval_s
        self.gpu = gpu
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples: list[dict] = []

    def start(self, sink) -> None:
        self._sink = sink
        self._proc = psutil.Process(os.getpid())
        self._proc.cpu_percent(None)  # the first call only primes the counter
        self._t0 = time.perf_counter()
        self._cuda = self.gpu and _cuda_ready()
        if self._cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._stop.clear()
        self._samples = []
        self._thread = threading.Thread(target=self._loop, name="hardware-monitor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        row = {
            "t": round(time.perf_counter() - self._t0, 3),
            "cpu_percent": self._proc.cpu_percent(None),
            "rss_mb": round(self._proc.memory_info().rss / 2**20, 1),
            "gpu_mem_mb": None,
            "gpu_util": None,
        }
        if self._cuda:
            import torch

            row["gpu_mem_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
            try:
                row["gpu_util"] = torch.cuda.utilization()
            except Exception:  # needs pynvml; memory is still recorded
                pass
        self._samples.append(row)
        self._sink.log_hardware(row)

    def stop(self) -> dict:
        if self._thread is None:
            return {}
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()  # at least one sample, even for runs shorter than the interval
        cpu = [s["cpu_percent"] for s in self._samples]
        rss = [s["rss_mb"] for s in self._samples]
        out = {
            "peak_rss_mb": max(rss),
            "rss_mb_mean": round(sum(rss) / len(rss), 1),
            "cpu_percent_mean": round(sum(cpu) / len(cpu), 1),
            "peak_gpu_mem_mb": None,
            "hardware_samples": len(self._samples),
        }
        if self._cuda:
            import torch

            out["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


def _cuda_ready() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())
