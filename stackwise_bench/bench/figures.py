"""The table of figures: each name ``--only`` accepts, in the order a full run measures them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from stackwise_bench.bench import devices, gpu, knobs, lm, overhead, peft, pipelines, processes
from stackwise_bench.bench.harness import Budget

# A figure takes the budget and a scratch folder (removed after the run) and returns its rows.
Figure = Callable[[Budget, Path], list[dict]]

FIGURES: dict[str, Figure] = {
    "overhead": overhead.fig_overhead,
    "diagnostics": overhead.fig_diagnostics,
    "pipeline": pipelines.fig_pipeline,
    "imagefolder": pipelines.fig_imagefolder,
    "startup": processes.fig_startup,
    "sweep": processes.fig_sweep,
    "knobs": knobs.fig_knobs,
    "deit_augment": pipelines.fig_deit_augment,
    "peft": peft.fig_peft,
    "int4": peft.fig_int4,
    "nanogpt": lm.fig_nanogpt,
    "gpu": gpu.fig_gpu,
    "devices": devices.fig_devices,
}
