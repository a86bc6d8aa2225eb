"""Readers of the machine's power, energy, temperature and clock sensors, for the hardware monitor.

Three optional sources, read once a sample by the monitor's background thread:

- the GPU through NVML (``import pynvml``, the module of the nvidia-ml-py package): power, energy, temperature,
  SM clock, utilisation and the reasons the driver holds the clocks down (:class:`NvmlGpu`, :func:`open_gpu`);
- the CPU's frequency (psutil, :func:`cpu_freq_reader`) and temperature (sysfs thermal zones or hwmon,
  :class:`CpuTemperature`);
- the CPU packages' energy counters (RAPL under ``/sys/class/powercap``, :class:`Rapl`).

What a machine does not expose reads as ``None``, never 0: 0 W or 0 J would be a measurement. A reading the
hardware refuses for good (not supported, no permission, no such function) is not tried again, so a sample stays
a handful of cheap calls. Times are handed in (seconds since the monitor started) instead of read here, so energy
integration can be tested without a clock; the sysfs root is a parameter, so RAPL and thermal zones can be tested
on a fake tree.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

# NVML clock-event ("throttle") reason bits -> names. gpu_idle is left out of what the monitor reports: an idle
# GPU lowering its clocks is not a limit on the run.
CLOCK_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}
IGNORED_REASONS = frozenset({"gpu_idle"})
# The reasons that mean "too hot" (resources.thermal_throttled); power caps and brakes are reported, not counted.
THERMAL_REASONS = frozenset({"sw_thermal_slowdown", "hw_thermal_slowdown"})

# NVML errors that mean "this machine cannot", as opposed to a hiccup worth retrying at the next sample.
_NVML_PERMANENT = ("NVMLError_NotSupported", "NVMLError_FunctionNotFound", "NVMLError_NoPermission")

# Thermal-zone types and hwmon chip names that measure the CPU (acpitz, wifi, nvme, gpu... do not).
_CPU_ZONE_MARKS = ("x86_pkg_temp", "coretemp", "cpu", "soc", "k10temp", "zenpower", "package")
_CPU_HWMON = frozenset({"coretemp", "k10temp", "zenpower", "cpu_thermal", "cpu-thermal", "soc_thermal"})


class Unsupported(Exception):
    """A reader found that the machine does not expose what it reads."""


class Reading:
    """One sensor call yielding ``None`` when it fails, and never called again once it fails for good.

    ``calls`` are alternatives tried in order (a newer API first, then the one older drivers have); an exception in
    ``permanent`` (or :class:`Unsupported`, or ``AttributeError`` for a function the bindings lack) drops the call
    for the rest of the run, any other exception only costs this sample.
    """

    def __init__(self, *calls: Callable, permanent: tuple[type[BaseException], ...] = ()):
        self._calls = list(calls)
        self._permanent = (Unsupported, AttributeError, *permanent)

    def __call__(self):
        while self._calls:
            try:
                return self._calls[0]()
            except self._permanent:
                self._calls.pop(0)
            except Exception:
                return None
        return None


def switched_off() -> None:
    """The reading of a sensor that is switched off."""
    return None


# ------------------------------------------------------------------------------------------- energy accounting


class CounterEnergy:
    """Joules since the first reading of a cumulative hardware energy counter.

    ``unit_j`` converts the counter's unit (NVML: mJ, RAPL: uJ). A counter that wraps at ``wrap`` (RAPL's
    ``max_energy_range_uj``) is unwrapped; a decrease with no known range (a reset) loses that one interval.
    Deltas are summed sample by sample, so several wraps over a long run are all counted.
    """

    def __init__(self, first: int, unit_j: float, wrap: int | None = None):
        self._last, self._unit, self._wrap = first, unit_j, wrap
        self._total = 0

    def update(self, value: int) -> float:
        delta = value - self._last
        if delta < 0:
            delta = delta + self._wrap if self._wrap else 0
        self._total += delta
        self._last = value
        return self._total * self._unit


class PowerIntegral:
    """Joules from power samples by the trapezoid rule, for GPUs without an energy counter.

    A failed power reading is bridged: the next interval runs from the last good sample. With fewer than two good
    samples there is no energy to report (``None``), not 0.
    """

    def __init__(self):
        self._last: tuple[float, float] | None = None
        self._joules = 0.0
        self._points = 0

    def add(self, t: float, watts: float | None) -> float | None:
        if watts is not None:
            if self._last is not None:
                t0, w0 = self._last
                self._joules += (w0 + watts) / 2 * (t - t0)
            self._last = (t, watts)
            self._points += 1
        return self.joules

    @property
    def joules(self) -> float | None:
        return self._joules if self._points >= 2 else None


# -------------------------------------------------------------------------------------------------------- NVML

_nvml_lock = threading.Lock()
_nvml_state = None  # None: not tried yet; False: unavailable in this process; else the initialised module


def load_nvml():
    """The initialised ``pynvml`` module, or ``None`` without the library or a driver; ``nvmlInit`` runs once."""
    global _nvml_state
    with _nvml_lock:
        if _nvml_state is None:
            _nvml_state = _init_nvml()
        return _nvml_state or None


def _init_nvml():
    try:
        import pynvml
    except ImportError:
        log.info("GPU power, energy and temperature are not recorded: nvidia-ml-py (import pynvml) is not installed")
        return False
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / ...: no NVIDIA driver here
        log.info("GPU power, energy and temperature are not recorded: NVML is unavailable (%s)", exc)
        return False
    return pynvml


def _torch_props(index: int):
    """torch's properties of CUDA device ``index`` (PCI ids, UUID), or ``None`` where torch has no CUDA."""
    import sys

    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_properties(index)
    except Exception:
        pass
    return None


def nvml_handle(nvml, index: int, props=None):
    """The NVML handle of torch's CUDA device ``index``.

    NVML numbers every GPU of the machine and ignores ``CUDA_VISIBLE_DEVICES``, torch numbers the visible ones, so
    the device is found by its PCI bus id, else its UUID (both from torch's ``props``), else by mapping ``index``
    through ``CUDA_VISIBLE_DEVICES`` (entries that are NVML indices or UUIDs), else as the same index.
    """
    tries: list[Callable] = []
    if props is not None:
        domain, bus, device = (getattr(props, k, None) for k in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
        if None not in (domain, bus, device):
            tries.append(lambda: nvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{device:02x}.0"))
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid:  # torch prints the bare UUID, NVML wants it prefixed
            uuid = uuid if uuid[:4] in ("GPU-", "MIG-") else f"GPU-{uuid}"
            tries.append(lambda: nvml.nvmlDeviceGetHandleByUUID(uuid))
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible):
        entry = visible[index]
        if entry.isdigit():
            tries.append(lambda: nvml.nvmlDeviceGetHandleByIndex(int(entry)))
        else:
            tries.append(lambda: nvml.nvmlDeviceGetHandleByUUID(entry))
    tries.append(lambda: nvml.nvmlDeviceGetHandleByIndex(index))
    for attempt in tries:
        try:
            return attempt()
        except Exception:
            continue
    return None


def open_gpu(index: int, power: bool = True, thermal: bool = True, nvml=None, props=None) -> NvmlGpu | None:
    """The NVML readers of torch's CUDA device ``index``, or ``None`` without NVML or a matching device."""
    nvml = nvml if nvml is not None else load_nvml()
    if nvml is None:
        return None
    handle = nvml_handle(nvml, index, props if props is not None else _torch_props(index))
    if handle is None:
        log.info("GPU power and temperature are not recorded: NVML has no device matching cuda:%d", index)
        return None
    return NvmlGpu(nvml, handle, power=power, thermal=thermal)


def decode_clock_reasons(mask: int) -> list[str]:
    """The names of the reasons set in an NVML clock-event bitmask, sorted, without ``gpu_idle``."""
    bits = [1 << i for i in range(mask.bit_length()) if mask >> i & 1]
    names = {CLOCK_REASONS.get(bit, f"unknown_0x{bit:x}") for bit in bits}
    return sorted(names - IGNORED_REASONS)


class NvmlGpu:
    """One NVML device's readings, and its energy since :meth:`start`.

    Energy comes from the driver's cumulative counter (``nvmlDeviceGetTotalEnergyConsumption``, Volta and later)
    where it exists, else from integrating the power samples; :attr:`energy_source` says which.
    """

    def __init__(self, nvml, handle, power: bool = True, thermal: bool = True):
        permanent = tuple(getattr(nvml, name) for name in _NVML_PERMANENT if hasattr(nvml, name))

        def reading(*calls):
            return Reading(*calls, permanent=permanent)

        h = handle
        self._power = reading(lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0) if power else switched_off
        self._energy_mj = reading(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(h)) if power else switched_off
        self._util = reading(lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu)
        if thermal:
            self._temp = reading(lambda: nvml.nvmlDeviceGetTemperature(h, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)))
            self._sm_clock = reading(lambda: nvml.nvmlDeviceGetClockInfo(h, getattr(nvml, "NVML_CLOCK_SM", 1)))
            self._reasons = reading(
                lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(h),
                lambda: nvml.nvmlDeviceGetCurrentClocksThrottleReasons(h),  # drivers before 535
            )
        else:
            self._temp = self._sm_clock = self._reasons = switched_off
        self._counter: CounterEnergy | None = None
        self._integral = PowerIntegral()

    def start(self, t: float) -> None:
        """Take the energy baseline at ``t`` (seconds since the monitor started)."""
        first = self._energy_mj()
        self._counter = CounterEnergy(first, 1e-3) if first is not None else None
        self._integral = PowerIntegral()
        if self._counter is None:
            self._integral.add(t, self._power())

    @property
    def energy_source(self) -> str | None:
        if self._counter is not None:
            return "nvml_total_energy"
        return "nvml_power_integrated" if self._integral.joules is not None else None

    def read(self, t: float) -> dict:
        """One sample: ``gpu_power_w``, ``gpu_energy_j`` (since :meth:`start`), ``gpu_temp_c``,
        ``gpu_sm_clock_mhz``, ``gpu_util`` and ``gpu_throttle`` (reason names; ``None`` where not reported)."""
        watts = self._power()
        if self._counter is not None:
            mj = self._energy_mj()
            energy = self._counter.update(mj) if mj is not None else None
        else:
            energy = self._integral.add(t, watts)
        mask = self._reasons()
        return {
            "gpu_power_w": None if watts is None else round(watts, 3),
            "gpu_energy_j": None if energy is None else round(energy, 3),
            "gpu_temp_c": self._temp(),
            "gpu_sm_clock_mhz": self._sm_clock(),
            "gpu_util": self._util(),
            "gpu_throttle": None if mask is None else decode_clock_reasons(int(mask)),
        }


# --------------------------------------------------------------------------------------------------------- CPU


def _read_int(path: Path) -> int:
    """One integer sysfs file (the one place files are read, so tests can refuse a path)."""
    return int(path.read_text().strip())


def cpu_freq_reader() -> Callable[[], float | None]:
    """psutil's current CPU frequency (MHz, mean over cores); ``None`` where the OS reports none (or 0)."""

    def read() -> float:
        freq = psutil.cpu_freq()
        if freq is None or not freq.current or freq.current <= 0:
            raise Unsupported
        return round(freq.current, 1)

    return Reading(read, permanent=(NotImplementedError, OSError))


class CpuTemperature:
    """The hottest CPU sensor, in °C.

    Sources, first found wins: sysfs thermal zones whose type names the CPU (x86_pkg_temp, cpu-thermal, soc...),
    hwmon chips of CPUs (coretemp, k10temp, zenpower), psutil's ``sensors_temperatures`` (other OSes). Readings of
    0 or below are a disabled sensor, not a temperature, and are skipped; a sensor file that fails is dropped.
    """

    def __init__(self, files: list[Path] | None = None, psutil_keys: list[str] | None = None):
        self._files = list(files or [])
        self._psutil_keys = list(psutil_keys or [])

    @classmethod
    def open(cls, sysfs: str | os.PathLike = "/sys") -> CpuTemperature | None:
        root = Path(sysfs)
        zones = []
        for zone in sorted(root.glob("class/thermal/thermal_zone*")):
            try:
                kind = (zone / "type").read_text().strip().lower()
            except OSError:
                continue
            if any(mark in kind for mark in _CPU_ZONE_MARKS) and (zone / "temp").exists():
                zones.append(zone / "temp")
        if zones:
            return cls(files=zones)
        inputs = []
        for chip in sorted(root.glob("class/hwmon/hwmon*")):
            try:
                name = (chip / "name").read_text().strip().lower()
            except OSError:
                continue
            if name in _CPU_HWMON:
                inputs.extend(sorted(chip.glob("temp*_input")))
        if inputs:
            return cls(files=inputs)
        try:
            found = psutil.sensors_temperatures()
        except Exception:  # AttributeError where psutil has no sensors on this OS
            found = {}
        keys = [k for k in found if k.lower() in _CPU_HWMON]
        return cls(psutil_keys=keys) if keys else None

    def read(self) -> float | None:
        values = []
        for path in list(self._files):
            try:
                milli = _read_int(path)
            except (OSError, ValueError):
                self._files.remove(path)
                continue
            if milli > 0:
                values.append(milli / 1000)
        if self._psutil_keys:
            try:
                found = psutil.sensors_temperatures()
            except Exception:
                found = {}
            values.extend(e.current for k in self._psutil_keys for e in found.get(k, []) if e.current and e.current > 0)
        return round(max(values), 1) if values else None


class Rapl:
    """CPU package energy (J since :meth:`open`) from RAPL, summed over the packages (sockets).

    Reads ``class/powercap/intel-rapl:N/energy_uj`` (AMD exposes its packages there too); sub-domains
    (``intel-rapl:N:M``: cores, uncore, DRAM) and ``intel-rapl-mmio`` duplicates are not added. Since Linux 5.10
    ``energy_uj`` is root-only: where any package cannot be read there is no CPU energy (a partial sum would
    mislead). Counters wrap at ``max_energy_range_uj``.
    """

    def __init__(self, files: list[Path], counters: list[CounterEnergy]):
        self._files, self._counters = files, counters

    @classmethod
    def open(cls, sysfs: str | os.PathLike = "/sys") -> Rapl | None:
        domains = []
        for domain in sorted(Path(sysfs).glob("class/powercap/intel-rapl:*")):
            if domain.name.count(":") != 1:
                continue
            try:
                name = (domain / "name").read_text().strip()
            except OSError:
                name = "package"
            if name.startswith("package"):
                domains.append(domain)
        if not domains:
            return None
        files, counters = [], []
        for domain in domains:
            try:
                first = _read_int(domain / "energy_uj")
            except (OSError, ValueError) as exc:
                log.info("CPU energy is not recorded: %s is unreadable (%s)", domain / "energy_uj", exc)
                return None
            try:
                wrap = _read_int(domain / "max_energy_range_uj")
            except (OSError, ValueError):
                wrap = None
            files.append(domain / "energy_uj")
            counters.append(CounterEnergy(first, 1e-6, wrap))
        return cls(files, counters)

    def read(self) -> float | None:
        """Joules since :meth:`open`; ``None`` for a sample where a counter could not be read."""
        try:
            values = [_read_int(f) for f in self._files]
        except (OSError, ValueError):
            return None
        return round(sum(c.update(v) for c, v in zip(self._counters, values, strict=True)), 3)
