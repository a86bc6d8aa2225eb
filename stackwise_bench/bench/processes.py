"""Whole processes: the default run's start-up and sweeps with one or two jobs at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from stackwise_bench.bench.harness import Budget, compare, framework_img_s, interleaved

STARTUP_FIRST_STEP = """
import os, runpy, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
register_optimizer_step_post_hook(lambda *a, **k: os._exit(0))  # leave right after the first optimizer step
sys.argv = ["stackwise_bench.train", *sys.argv[1:]]
runpy.run_module("stackwise_bench.train", run_name="__main__", alter_sys=True)
"""

BARE_FIRST_STEP = """
import torch, torch.nn.functional as F
from stackwise_bench.nn.models import create_model
model = create_model("resnet8", 10)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
F.cross_entropy(model(torch.randn(64, 3, 32, 32)), torch.randint(0, 10, (64,))).backward()
opt.step()
"""


def timed_process(cmd: list[str], cwd: Path, **kw) -> float:
    """Wall seconds of ``cmd`` run in ``cwd``; RuntimeError with its stderr's tail when it fails.

    ``cwd`` is the benchmark's scratch folder, not a clone: the process imports the installed stackwise_bench,
    as the benchmark itself does, and nothing it writes by a relative path lands in the user's folder.
    """
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)[:200]} failed:\n{done.stderr[-2000:]}")
    return elapsed


def fig_startup(b: Budget, work: Path) -> list[dict]:
    """Launch to the default run's first optimizer step ÷ ``python -c "import torch"``, and a bare script's floor."""
    py = sys.executable
    arms = {
        "default run": lambda r: timed_process(
            [py, "-c", STARTUP_FIRST_STEP, f"hydra.run.dir={work}/startup-{r}"], work
        ),
        "import torch": lambda r: timed_process([py, "-c", "import torch"], work),
        "bare first step": lambda r: timed_process([py, "-c", BARE_FIRST_STEP], work),
    }
    s = interleaved(b.startup_reps, arms)
    return [
        {
            "figure": "startup",
            "setting": "default run to 1st optimizer step / import torch",
            "unit": "s",
            "goal": "<= 1.8",
            **compare(s, "default run", "import torch"),
        },
        {
            "figure": "startup",
            "setting": "floor: bare script (resnet8, AdamW) to 1st step / import torch",
            "unit": "s",
            "goal": "",
            **compare(s, "bare first step", "import torch"),
        },
    ]


SWEEP_JOB = ["trainer.progress=log"]  # the default run (resnet8 on digits)
# A tiny job: the default recipe on digits at its native 8 px, batch 16, every epoch run (no early
# stop). Steps this small are dominated by per-op overhead, so a second intra-op thread buys
# nothing: what a seed/LR sweep of small models looks like. Each process also pays ~8 s of
# imports (torch, torch._dynamo, torchmetrics) that no n_jobs can share, so shorter jobs gain less
# (10 epochs: 1.58x in the run of 2026-11-21).
TINY_SWEEP_JOB = [
    *SWEEP_JOB,
    "dataset.img_size=8",
    "model.img_size=8",
    "trainer.batch_size=16",
    "trainer.early_stopping_patience=null",
]


def _sweep_arms(work: Path, name: str, job: list[str], epochs: int) -> dict:
    """The two arms of a sweep comparison: wall seconds of ``--multirun seed=1,2,3,4`` with n_jobs 2 and 1."""

    def arm(n_jobs: int, rep: int) -> float:
        sweep_dir = work / f"sweep-{name}-n{n_jobs}-{rep}"
        seconds = timed_process(
            [
                sys.executable,
                "-m",
                "stackwise_bench.train",
                "--multirun",
                "seed=1,2,3,4",
                f"trainer.max_epochs={epochs}",
                *job,
                f"hydra.launcher.n_jobs={n_jobs}",
                f"hydra.sweep.dir={sweep_dir}",
            ],
            work,
            timeout=1800,
        )
        done = [json.loads(p.read_text())["status"] for p in sweep_dir.glob("*/summary.json")]
        if sorted(done) != ["completed"] * 4:
            raise RuntimeError(f"sweep with n_jobs={n_jobs} finished {done} instead of 4 completed jobs")
        return seconds

    return {"n_jobs=2": lambda r: arm(2, r), "n_jobs=1": lambda r: arm(1, r)}


def fig_sweep(b: Budget, work: Path) -> list[dict]:
    """4 jobs' wall time with hydra.launcher.n_jobs=1 ÷ n_jobs=2, tiny and default-sized, and one job's ceiling."""

    s = interleaved(b.sweep_reps, _sweep_arms(work, "tiny", TINY_SWEEP_JOB, b.sweep_epochs))
    rows = [
        {
            "figure": "sweep",
            "setting": f"wall s, n_jobs=1 / n_jobs=2: 4 tiny jobs x {b.sweep_epochs} epochs "
            "(resnet8, digits 8 px, batch 16)",
            "unit": "s",
            "goal": ">= 1.7",
            **compare(s, "n_jobs=1", "n_jobs=2"),
        }
    ]
    s = interleaved(1, _sweep_arms(work, "default", SWEEP_JOB, b.sweep_default_epochs))
    rows.append(
        {
            "figure": "sweep",
            "setting": f"wall s, n_jobs=1 / n_jobs=2: 4 default jobs x {b.sweep_default_epochs} "
            "epochs (resnet8, digits 32 px, batch 64)",
            "unit": "s",
            "goal": "",
            **compare(s, "n_jobs=1", "n_jobs=2"),
        }
    )
    # Why the default job gains less: one job already spreads over every core. Two 1-thread jobs beat
    # one all-thread job by at most cores / (what the extra threads give one job).
    cores, job = torch.get_num_threads(), [*SWEEP_JOB, "trainer.max_epochs=1", "monitors=none"]
    if cores > 1:
        s = interleaved(
            min(b.reps, 5),
            {
                "all": lambda r: framework_img_s([*job, f"trainer.threads={cores}"], work / f"threads-all-{r}", b),
                "one": lambda r: framework_img_s([*job, "trainer.threads=1"], work / f"threads-one-{r}", b),
            },
            warmup=True,
        )
        torch.set_num_threads(cores)
        rows.append(
            {
                "figure": "sweep",
                "setting": f"ceiling for default jobs: one job's train img/s, {cores} threads / 1 "
                f"(n_jobs={cores} gains at most {cores} / this)",
                "unit": "img/s",
                "goal": "",
                **compare(s, "all", "one"),
            }
        )
    return rows
