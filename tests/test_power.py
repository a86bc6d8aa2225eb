"""Power, energy, temperature and throttling in the hardware monitor.

The GPU side runs against a fake ``pynvml`` module (this machine has no NVIDIA driver), RAPL and thermal zones
against a fake sysfs tree; the monitor end to end runs once on this machine as it is (unavailable readings must be
``None``, never 0) and once with the fakes. Times are handed to the readers, so nothing here depends on a clock.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from stackwise_bench.training import monitors, sensors
from stackwise_bench.training.monitors import ROW_KEYS, HardwareMonitor

POWER_KEYS = (
    "energy_j",
    "gpu_energy_j",
    "cpu_energy_j",
    "energy_source",
    "power_mean_w",
    "power_max_w",
    "temp_max_c",
    "gpu_temp_max_c",
    "cpu_temp_max_c",
    "thermal_throttled",
    "throttle_reasons",
)
# the GPU readings that the power/thermal knobs switch
SWITCHABLE_GPU_KEYS = ("gpu_power_w", "gpu_energy_j", "gpu_temp_c", "gpu_sm_clock_mhz", "gpu_throttle")
GPU_ROW_KEYS = ("gpu_mem_mb", "gpu_util", *SWITCHABLE_GPU_KEYS)


# ------------------------------------------------------------------------------------------------ fake NVML


class FakeNvml:
    """Just enough of ``pynvml``: each reading is a list of values served one per call (the last one repeats),
    or an exception class that every call raises."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):  # noqa: N801 (pynvml's names)
        pass

    class NVMLError_FunctionNotFound(NVMLError):  # noqa: N801
        pass

    class NVMLError_NoPermission(NVMLError):  # noqa: N801
        pass

    class NVMLError_Unknown(NVMLError):  # noqa: N801
        pass

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, **readings):
        defaults = {
            "power_mw": [150_000],
            "energy_mj": [1_000_000],
            "temp": [61],
            "sm_clock": [1980],
            "util": [97],
            "event_reasons": [0],
            "throttle_reasons": [0],
        }
        self.readings = {**defaults, **readings}
        self.calls: dict[str, int] = {}
        self.devices = {0: "dev0", 1: "dev1"}
        self.bus_ids = {"00000000:41:00.0": "dev1"}

    def _serve(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1
        value = self.readings[name]
        if isinstance(value, type) and issubclass(value, Exception):
            raise value()
        return value[min(self.calls[name], len(value)) - 1]

    def nvmlDeviceGetHandleByIndex(self, i):  # noqa: N802
        return self.devices[i]

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):  # noqa: N802
        if bus_id not in self.bus_ids:
            raise self.NVMLError_Unknown()
        return self.bus_ids[bus_id]

    def nvmlDeviceGetHandleByUUID(self, uuid):  # noqa: N802
        raise self.NVMLError_Unknown()

    def nvmlDeviceGetPowerUsage(self, h):  # noqa: N802
        return self._serve("power_mw")

    def nvmlDeviceGetTotalEnergyConsumption(self, h):  # noqa: N802
        return self._serve("energy_mj")

    def nvmlDeviceGetTemperature(self, h, sensor):  # noqa: N802
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._serve("temp")

    def nvmlDeviceGetClockInfo(self, h, clock):  # noqa: N802
        assert clock == self.NVML_CLOCK_SM
        return self._serve("sm_clock")

    def nvmlDeviceGetUtilizationRates(self, h):  # noqa: N802
        return SimpleNamespace(gpu=self._serve("util"), memory=0)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):  # noqa: N802
        return self._serve("event_reasons")

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):  # noqa: N802
        return self._serve("throttle_reasons")


def fake_gpu(nvml: FakeNvml, **kw) -> sensors.NvmlGpu:
    gpu = sensors.open_gpu(0, nvml=nvml, **kw)
    assert gpu is not None
    return gpu


def test_power_is_converted_from_milliwatts_and_readings_come_through():
    gpu = fake_gpu(FakeNvml(power_mw=[150_500]))
    gpu.start(0.0)
    row = gpu.read(1.0)
    assert row["gpu_power_w"] == 150.5
    assert (row["gpu_temp_c"], row["gpu_sm_clock_mhz"], row["gpu_util"], row["gpu_throttle"]) == (61, 1980, 97, [])


def test_energy_from_the_total_energy_counter_is_the_delta_since_start():
    nvml = FakeNvml(energy_mj=[1_000_000, 1_050_000, 1_200_500])
    gpu = fake_gpu(nvml)
    gpu.start(0.0)
    assert [gpu.read(t)["gpu_energy_j"] for t in (1.0, 2.0)] == [50.0, 200.5]
    assert gpu.energy_source == "nvml_total_energy"


def test_energy_is_integrated_from_power_when_the_counter_is_not_supported():
    nvml = FakeNvml(energy_mj=FakeNvml.NVMLError_NotSupported, power_mw=[100_000, 200_000, 50_000, 80_000])
    gpu = fake_gpu(nvml)
    gpu.start(0.0)  # 100 W at t=0
    rows = [gpu.read(t) for t in (1.0, 3.0, 3.5)]  # 200 W, 50 W, 80 W
    hand = [(100 + 200) / 2 * 1.0]
    hand.append(hand[-1] + (200 + 50) / 2 * 2.0)
    hand.append(hand[-1] + (50 + 80) / 2 * 0.5)
    assert [r["gpu_energy_j"] for r in rows] == pytest.approx(hand)
    assert gpu.energy_source == "nvml_power_integrated"
    assert nvml.calls["energy_mj"] == 1  # unsupported once: never asked again


def test_a_failed_power_sample_is_bridged_and_one_sample_is_no_energy():
    integral = sensors.PowerIntegral()
    assert integral.add(0.0, 10.0) is None  # one point: no interval yet, so no energy (not 0)
    assert integral.add(1.0, None) is None
    assert integral.add(2.0, 30.0) == pytest.approx((10 + 30) / 2 * 2.0)


def test_without_power_or_counter_there_is_no_energy():
    nvml = FakeNvml(energy_mj=FakeNvml.NVMLError_NotSupported, power_mw=FakeNvml.NVMLError_NotSupported)
    gpu = fake_gpu(nvml)
    gpu.start(0.0)
    row = gpu.read(1.0)
    assert row["gpu_power_w"] is None and row["gpu_energy_j"] is None and gpu.energy_source is None


@pytest.mark.parametrize(
    ("mask", "names"),
    [
        (0x0, []),
        (0x1, []),  # gpu_idle is not a limit on the run
        (0x1 | 0x4 | 0x40, ["hw_thermal_slowdown", "sw_power_cap"]),
        (
            0x2 | 0x8 | 0x10 | 0x20 | 0x80 | 0x100,
            [
                "applications_clocks_setting",
                "display_clock_setting",
                "hw_power_brake_slowdown",
                "hw_slowdown",
                "sw_thermal_slowdown",
                "sync_boost",
            ],
        ),  # fmt: skip
        (0x8000, ["unknown_0x8000"]),
    ],
)
def test_clock_event_bitmask_decodes_to_reason_names(mask, names):
    assert sensors.decode_clock_reasons(mask) == names


def test_old_drivers_fall_back_to_the_throttle_reasons_call():
    nvml = FakeNvml(event_reasons=FakeNvml.NVMLError_FunctionNotFound, throttle_reasons=[0x20])
    gpu = fake_gpu(nvml)
    gpu.start(0.0)
    assert [gpu.read(t)["gpu_throttle"] for t in (1.0, 2.0)] == [["sw_thermal_slowdown"]] * 2
    assert nvml.calls["event_reasons"] == 1


def test_not_supported_readings_are_none_and_not_retried():
    nvml = FakeNvml(temp=FakeNvml.NVMLError_NotSupported, event_reasons=FakeNvml.NVMLError_NotSupported,
                    throttle_reasons=FakeNvml.NVMLError_NotSupported)  # fmt: skip
    gpu = fake_gpu(nvml)
    gpu.start(0.0)
    rows = [gpu.read(t) for t in (1.0, 2.0, 3.0)]
    assert all(r["gpu_temp_c"] is None and r["gpu_throttle"] is None for r in rows)
    assert nvml.calls["temp"] == 1 and nvml.calls["event_reasons"] == 1 and nvml.calls["throttle_reasons"] == 1


def test_a_transient_error_costs_one_sample_only():
    nvml = FakeNvml(temp=[61])
    gpu = fake_gpu(nvml)
    gpu.start(0.0)
    nvml.readings["temp"] = FakeNvml.NVMLError_Unknown
    assert gpu.read(1.0)["gpu_temp_c"] is None
    nvml.readings["temp"] = [70]
    nvml.calls["temp"] = 0
    assert gpu.read(2.0)["gpu_temp_c"] == 70


def test_switched_off_readers_are_not_called():
    nvml = FakeNvml()
    gpu = fake_gpu(nvml, power=False, thermal=False)
    gpu.start(0.0)
    row = gpu.read(1.0)
    assert row["gpu_util"] == 97
    assert all(row[k] is None for k in SWITCHABLE_GPU_KEYS)
    assert set(nvml.calls) == {"util"}


def test_the_nvml_device_is_the_torch_device(monkeypatch):
    nvml = FakeNvml()
    props = SimpleNamespace(pci_domain_id=0, pci_bus_id=0x41, pci_device_id=0, uuid="")
    assert sensors.nvml_handle(nvml, 0, props) == "dev1"  # by PCI bus id, whatever the indices say
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert sensors.nvml_handle(nvml, 0) == "dev1"  # torch's cuda:0 is NVML's device 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert sensors.nvml_handle(nvml, 0) == "dev0"


def test_without_the_library_or_driver_there_is_no_gpu(monkeypatch):
    import sys

    monkeypatch.setattr(sensors, "_nvml_state", None)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert sensors.load_nvml() is None and sensors.open_gpu(0) is None
    monkeypatch.setattr(sensors, "_nvml_state", None)
    broken = SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(OSError("NVML Shared Library Not Found")))
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert sensors.load_nvml() is None
    assert sensors.load_nvml() is None  # tried once per process


# ------------------------------------------------------------------------------------------------ fake sysfs


def write(path: Path, text) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{text}\n")


def rapl_tree(root: Path, energies: dict[str, int], wrap: int = 1_000_000_000) -> Path:
    for domain, uj in energies.items():
        write(root / "class/powercap" / domain / "energy_uj", uj)
        write(root / "class/powercap" / domain / "max_energy_range_uj", wrap)
        write(root / "class/powercap" / domain / "name", "core" if domain.count(":") > 1 else "package-0")
    return root


def test_rapl_sums_packages_across_wraparound(tmp_path):
    root = rapl_tree(tmp_path, {"intel-rapl:0": 999_000_000, "intel-rapl:1": 10_000_000, "intel-rapl:0:0": 5})
    write(tmp_path / "class/powercap/intel-rapl-mmio:0/energy_uj", 7)  # the same package again: not added
    write(tmp_path / "class/powercap/intel-rapl-mmio:0/name", "package-0")
    rapl = sensors.Rapl.open(root)
    assert rapl is not None
    domain0, domain1 = (tmp_path / "class/powercap" / d / "energy_uj" for d in ("intel-rapl:0", "intel-rapl:1"))
    write(domain0, 1_000_000)  # wrapped: 1 J to the top, 1 J after it
    write(domain1, 13_000_000)  # 3 J
    write(tmp_path / "class/powercap/intel-rapl:0:0/energy_uj", 999_999_999)  # a sub-domain: not added
    assert rapl.read() == pytest.approx(2.0 + 3.0)
    write(domain0, 501_000_000)  # +500 J
    assert rapl.read() == pytest.approx(505.0)


def test_unreadable_rapl_is_no_cpu_energy(tmp_path, monkeypatch):
    root = rapl_tree(tmp_path, {"intel-rapl:0": 1, "intel-rapl:1": 2})
    real = sensors._read_int

    def refuse(path):
        if path.name == "energy_uj" and path.parent.name == "intel-rapl:1":
            raise PermissionError(13, "Permission denied", str(path))  # root-only since Linux 5.10
        return real(path)

    monkeypatch.setattr(sensors, "_read_int", refuse)
    assert sensors.Rapl.open(root) is None  # one socket of two would be a misleading partial sum
    assert sensors.Rapl.open(tmp_path / "nothing") is None


def test_cpu_temperature_is_the_hottest_cpu_zone(tmp_path):
    for i, (kind, milli) in enumerate(
        [("acpitz", 90_000), ("x86_pkg_temp", 55_000), ("iwlwifi_1", 95_000), ("cpu-thermal", 57_500), ("soc", 0)]
    ):
        write(tmp_path / f"class/thermal/thermal_zone{i}/type", kind)
        write(tmp_path / f"class/thermal/thermal_zone{i}/temp", milli)
    write(tmp_path / "class/hwmon/hwmon0/name", "coretemp")  # zones win: not read
    write(tmp_path / "class/hwmon/hwmon0/temp1_input", 99_000)
    temp = sensors.CpuTemperature.open(tmp_path)
    assert temp is not None and temp.read() == 57.5


def test_cpu_temperature_falls_back_to_hwmon_then_to_nothing(tmp_path, monkeypatch):
    write(tmp_path / "class/hwmon/hwmon0/name", "coretemp")
    write(tmp_path / "class/hwmon/hwmon0/temp1_input", 48_000)
    write(tmp_path / "class/hwmon/hwmon0/temp2_input", 51_000)
    write(tmp_path / "class/hwmon/hwmon1/name", "nvme")
    write(tmp_path / "class/hwmon/hwmon1/temp1_input", 80_000)
    assert sensors.CpuTemperature.open(tmp_path).read() == 51.0
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {}, raising=False)
    assert sensors.CpuTemperature.open(tmp_path / "nothing") is None


# ------------------------------------------------------------------------------------------------ the monitor


class Sink:
    def __init__(self):
        self.rows: list[dict] = []

    def log_hardware(self, row: dict) -> None:
        self.rows.append(row)


def run_monitor(samples: int = 2, **kw) -> tuple[list[dict], dict]:
    """Start, take ``samples`` samples by hand (the thread sleeps an hour), stop: rows and resources."""
    monitor = HardwareMonitor(interval_s=3600, **kw)
    sink = Sink()
    monitor.start(sink)
    for _ in range(samples):
        monitor._sample()
    resources = monitor.stop()
    return sink.rows, resources


def rapl_readable(sysfs: Path = Path("/sys")) -> bool:
    for path in sysfs.glob("class/powercap/intel-rapl:*/energy_uj"):
        try:
            int(path.read_text())
            return True
        except (OSError, ValueError):
            pass
    return False


def any_temperature_exposed(sysfs: Path = Path("/sys")) -> bool:
    """Any thermal zone, hwmon temperature or psutil sensor at all (whether it is the CPU's is the monitor's call)."""
    if any(sysfs.glob("class/thermal/thermal_zone*/temp")) or any(sysfs.glob("class/hwmon/hwmon*/temp*_input")):
        return True
    try:
        return bool(psutil.sensors_temperatures())
    except AttributeError:
        return False


def test_on_this_machine_what_is_not_exposed_is_none_not_zero():
    rows, res = run_monitor()
    assert len(rows) == 3 and all(tuple(r) == ROW_KEYS for r in rows)  # one stable schema
    json.dumps([rows, res], allow_nan=False)  # plain JSON: null, not NaN
    assert all(r[k] is None for r in rows for k in GPU_ROW_KEYS)  # no CUDA in use here
    assert set(POWER_KEYS) <= set(res)
    assert res["gpu_energy_j"] is None and res["energy_source"]["gpu"] is None
    assert res["power_mean_w"] is None and res["power_max_w"] is None and res["gpu_temp_max_c"] is None
    assert res["thermal_throttled"] is None and res["throttle_reasons"] is None
    if rapl_readable():
        assert res["cpu_energy_j"] >= 0 and res["energy_source"]["cpu"] == "rapl"
        assert res["energy_j"] == res["cpu_energy_j"]
    else:
        assert res["cpu_energy_j"] is None and res["energy_j"] is None and res["energy_source"]["cpu"] is None
    if not any_temperature_exposed():
        assert res["cpu_temp_max_c"] is None and res["temp_max_c"] is None
    assert res["temp_max_c"] == res["cpu_temp_max_c"]
    freq = psutil.cpu_freq()
    if freq is None or not freq.current:
        assert all(r["cpu_freq_mhz"] is None for r in rows)
    else:
        assert all(r["cpu_freq_mhz"] > 0 for r in rows)
    assert all(r[k] is None or r[k] > 0 for r in rows for k in ("cpu_temp_c", "cpu_freq_mhz"))


def test_the_monitor_end_to_end_with_a_gpu_and_rapl(tmp_path, monkeypatch):
    nvml = FakeNvml(
        power_mw=[100_000, 200_000, 300_000, 250_000],
        energy_mj=[5_000, 105_000, 305_000, 555_000],
        temp=[60, 70, 84, 80],
        event_reasons=[0x1, 0x4, 0x40 | 0x4, 0x1],
    )
    monkeypatch.setattr(sensors, "load_nvml", lambda: nvml)
    monkeypatch.setattr(monitors, "_cuda_index", lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    rapl_tree(tmp_path, {"intel-rapl:0": 1_000_000})
    write(tmp_path / "class/thermal/thermal_zone0/type", "x86_pkg_temp")
    write(tmp_path / "class/thermal/thermal_zone0/temp", 66_000)
    energy = tmp_path / "class/powercap/intel-rapl:0/energy_uj"

    monitor = HardwareMonitor(interval_s=3600, sysfs=str(tmp_path))
    sink = Sink()
    monitor.start(sink)  # GPU baselines: 5_000 mJ, (power read only when integrating)
    for uj in (11_000_000, 21_000_000):
        write(energy, uj)
        monitor._sample()
    write(energy, 31_000_000)
    res = monitor.stop()
    rows = sink.rows

    assert len(rows) == 3 and all(tuple(r) == ROW_KEYS for r in rows)
    assert [r["gpu_power_w"] for r in rows] == [100.0, 200.0, 300.0]
    assert [r["gpu_energy_j"] for r in rows] == [100.0, 300.0, 550.0]
    assert [r["cpu_energy_j"] for r in rows] == [10.0, 20.0, 30.0]
    assert [r["gpu_throttle"] for r in rows] == [[], ["sw_power_cap"], ["hw_thermal_slowdown", "sw_power_cap"]]
    assert res["gpu_energy_j"] == 550.0 and res["cpu_energy_j"] == 30.0 and res["energy_j"] == 580.0
    assert res["energy_source"] == {"gpu": "nvml_total_energy", "cpu": "rapl"}
    assert res["power_mean_w"] == 200.0 and res["power_max_w"] == 300.0
    assert (res["gpu_temp_max_c"], res["cpu_temp_max_c"], res["temp_max_c"]) == (84, 66.0, 84)
    assert res["thermal_throttled"] is True
    assert res["throttle_reasons"] == ["hw_thermal_slowdown", "sw_power_cap"]
    assert res["peak_rss_mb"] > 0 and res["hardware_samples"] == 3


def test_power_only_throttling_is_not_thermal_and_knobs_switch_readers_off(tmp_path, monkeypatch):
    nvml = FakeNvml(event_reasons=[0x4])
    monkeypatch.setattr(sensors, "load_nvml", lambda: nvml)
    monkeypatch.setattr(monitors, "_cuda_index", lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    rapl_tree(tmp_path, {"intel-rapl:0": 1_000_000})
    _, res = run_monitor(sysfs=str(tmp_path))
    assert res["thermal_throttled"] is False and res["throttle_reasons"] == ["sw_power_cap"]

    rows, res = run_monitor(sysfs=str(tmp_path), power=False, thermal=False)
    assert all(tuple(r) == ROW_KEYS for r in rows)
    assert all(r[k] is None for r in rows for k in (*SWITCHABLE_GPU_KEYS, "cpu_freq_mhz", "cpu_temp_c", "cpu_energy_j"))
    assert all(r["gpu_util"] == 97 for r in rows)
    assert all(res[k] is None for k in POWER_KEYS if k != "energy_source")
    assert res["energy_source"] == {"gpu": None, "cpu": None}


def test_the_default_config_has_the_knobs_on():
    from omegaconf import OmegaConf

    hardware = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/monitors/default.yaml").hardware
    assert (hardware.gpu, hardware.power, hardware.thermal) == (True, True, True)


def test_a_sensor_that_breaks_while_opening_costs_only_its_readings(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("sysfs went away")

    monkeypatch.setattr(sensors.Rapl, "open", broken)
    rows, res = run_monitor(samples=1)
    assert len(rows) == 2 and res["cpu_energy_j"] is None and "sysfs went away" in caplog.text
