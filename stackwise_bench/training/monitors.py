"""Background monitors: sample the machine while the trainer runs.

A monitor has ``start(sink)`` and ``stop() -> dict``; samples go to
``sink.log_hardware`` (the run record), the dict returned by ``stop`` lands in
``summary.json["resources"]``. Sampling runs in a daemon thread that sleeps
between samples, so the training loop never waits on it.

Every row has every key of :data:`ROW_KEYS` (``None`` where the machine does not
expose the reading), so ``hardware.jsonl`` has one schema on every machine. The
power, temperature and clock readers live in :mod:`.sensors`.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import psutil

from stackwise_bench.training import sensors

log = logging.getLogger(__name__)

# The keys of every hardware.jsonl row (the record adds ``time``, unix seconds).
ROW_KEYS = (
    "t",  # seconds since the monitor started
    "cpu_percent",  # this process, % of one core
    "rss_mb",  # this process's resident memory
    "gpu_mem_mb",  # torch's allocated CUDA memory
    "gpu_util",  # GPU utilisation % (NVML)
    "gpu_power_w",  # GPU board power draw
    "gpu_energy_j",  # GPU energy since the monitor started
    "gpu_temp_c",  # GPU core temperature
    "gpu_sm_clock_mhz",  # GPU SM clock
    "gpu_throttle",  # names of the reasons the driver holds the GPU clocks down ([] = none)
    "cpu_freq_mhz",  # mean current CPU frequency
    "cpu_temp_c",  # hottest CPU sensor
    "cpu_energy_j",  # CPU package energy (RAPL) since the monitor started
)


class HardwareMonitor:
    """Samples the process (CPU %, RSS), the GPU (memory, utilisation, power, energy, temperature, clocks,
    throttling) and the CPU (frequency, temperature, RAPL energy) every ``interval_s``.

    ``power`` switches the power/energy readers (NVML, RAPL), ``thermal`` the temperature, clock and throttle
    readers; what is off or absent is ``None``. ``sysfs`` is where thermal zones and RAPL are looked up.
    """

    def __init__(
        self, interval_s: float = 1.0, gpu: bool = True, power: bool = True, thermal: bool = True, sysfs: str = "/sys"
    ):
        self.interval_s = interval_s
        self.gpu = gpu
        self.power = power
        self.thermal = thermal
        self.sysfs = sysfs
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
        self._open_sensors()
        self._stop.clear()
        self._samples = []
        self._thread = threading.Thread(target=self._loop, name="hardware-monitor", daemon=True)
        self._thread.start()

    def _open_sensors(self) -> None:
        """Find the readers once, so a sample only reads; baselines for energy are taken here (t = 0)."""
        index = _cuda_index() if self.gpu else None
        self._gpu = None if index is None else _opened(sensors.open_gpu, index, power=self.power, thermal=self.thermal)
        if self._gpu is not None:
            self._gpu.start(0.0)
        # without NVML (ROCm, a missing library) torch may still know the utilisation
        self._torch_util = sensors.Reading(_torch_utilization) if self._cuda and self._gpu is None else None
        self._rapl = _opened(sensors.Rapl.open, self.sysfs) if self.power else None
        self._cpu_temp = _opened(sensors.CpuTemperature.open, self.sysfs) if self.thermal else None
        self._cpu_freq = sensors.cpu_freq_reader() if self.thermal else sensors.switched_off

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        t = time.perf_counter() - self._t0
        row = dict.fromkeys(ROW_KEYS)
        row["t"] = round(t, 3)
        row["cpu_percent"] = self._proc.cpu_percent(None)
        row["rss_mb"] = round(self._proc.memory_info().rss / 2**20, 1)
        if self._cuda:
            import torch

            row["gpu_mem_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        if self._gpu is not None:
            row.update(self._gpu.read(t))
        elif self._torch_util is not None:
            row["gpu_util"] = self._torch_util()
        row["cpu_freq_mhz"] = self._cpu_freq()
        row["cpu_temp_c"] = self._cpu_temp.read() if self._cpu_temp is not None else None
        row["cpu_energy_j"] = self._rapl.read() if self._rapl is not None else None
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
        out.update(self._power_summary())
        return out

    def _power_summary(self) -> dict:
        """Energy, power, temperature and throttling over the run; ``None`` for what was never read."""
        gpu_j, cpu_j = _last(self._samples, "gpu_energy_j"), _last(self._samples, "cpu_energy_j")
        power = _seen(self._samples, "gpu_power_w")
        gpu_temp, cpu_temp = _seen(self._samples, "gpu_temp_c"), _seen(self._samples, "cpu_temp_c")
        reported = [s["gpu_throttle"] for s in self._samples if s["gpu_throttle"] is not None]
        reasons = sorted({name for names in reported for name in names})
        return {
            "energy_j": None if gpu_j is None and cpu_j is None else round((gpu_j or 0.0) + (cpu_j or 0.0), 3),
            "gpu_energy_j": gpu_j,
            "cpu_energy_j": cpu_j,
            "energy_source": {
                "gpu": self._gpu.energy_source if self._gpu is not None and gpu_j is not None else None,
                "cpu": "rapl" if cpu_j is not None else None,
            },
            "power_mean_w": round(sum(power) / len(power), 3) if power else None,
            "power_max_w": max(power, default=None),
            "temp_max_c": max(gpu_temp + cpu_temp, default=None),
            "gpu_temp_max_c": max(gpu_temp, default=None),
            "cpu_temp_max_c": max(cpu_temp, default=None),
            "thermal_throttled": bool(sensors.THERMAL_REASONS & set(reasons)) if reported else None,
            "throttle_reasons": reasons if reported else None,
        }


def _opened(open_sensor, *args, **kwargs):
    """A sensor, or ``None`` if finding it fails in a way nobody foresaw: a sensor never costs the run."""
    try:
        return open_sensor(*args, **kwargs)
    except Exception as exc:
        log.warning(
            "hardware monitor: %s failed (%s: %s); its readings are null",
            open_sensor.__qualname__,
            type(exc).__name__,
            exc,
        )
        return None


def _seen(rows: list[dict], key: str) -> list:
    return [r[key] for r in rows if r[key] is not None]


def _last(rows: list[dict], key: str):
    """The latest reading of a cumulative quantity (energy since start), or ``None`` if it was never read."""
    values = _seen(rows, key)
    return values[-1] if values else None


def _cuda_ready() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def _cuda_index() -> int | None:
    """torch's current CUDA device while this process trains on CUDA, else ``None`` (no GPU is read)."""
    if not _cuda_ready():
        return None
    import torch

    return torch.cuda.current_device()


def _torch_utilization():
    import torch

    return torch.cuda.utilization()
