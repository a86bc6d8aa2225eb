"""The devices figure (issue 27): one run on 1, 2, ... devices through ``python -m stackwise_bench.train
trainer.devices=N``, its img/s (or tokens/s) as a ratio to the same run on 1 device.

Every arm is the real entrypoint in a process of its own and a run folder of its own under the scratch folder, at
the same global batch (``trainer.batch_size``; each of N ranks takes batch/N), the same epochs and the same steps.
What each arm reports is read back from its run folder:

- **Speed**: the median over the epochs after the first of ``metrics.jsonl``'s ``train_img_s`` (``train_token_s``
  for a language model): the first epoch pays for allocator growth and first calls (1 device: 0.8k img/s in the
  first epoch, 16k in the second). ``summary.json``'s ``train`` speed (every epoch) is kept next to it.
- **The path**: ``summary.json``'s ``env.world_size``, ``env.backend`` and ``env.strategy``: an arm whose run did not
  report N ranks fails the figure.
- **Equivalence**: the feature promises the same run on N devices; the row holds the largest |difference| between
  the N-device run and the 1-device run of the same repetition over every ``metrics.jsonl`` row's ``train_loss`` and
  ``val_loss`` (goal: <= :data:`LOSS_TOLERANCE`).

Arms are interleaved as every figure's (``harness.interleaved``): a row's ratio is the median over repetitions of
the per-repetition ratio, with its min-max. On a CPU the ranks are processes over gloo that share the machine's
cores: ``trainer.threads`` gives 1 device and N devices the same total threads (N ranks x threads/N), so the ratio
measures what splitting the same cores into ranks costs, and the figure proves the path only. On GPUs (NCCL, one
GPU a rank) it is the real scaling figure.

Runtime on 2 shared CPU cores (2026-12-08): ``--quick`` (vit_micro_p4, 1 repetition of 1, 2 ddp, 2 fsdp) 25 s at a
load average of 1.2; full (3 repetitions, gpt_micro too) 229 s. Ratios measured then (full): vit_micro_p4 ddp 0.56
[0.45-0.74], fsdp 0.23; gpt_micro ddp 0.92 [0.89-0.94], fsdp 0.49; every max|dloss| below 2e-7. Under load a
2-thread 1-device run can collapse (302 img/s instead of 18k at a load average of 3-4 on 2 cores, a ratio of 20):
read the report's load averages before reading a CPU ratio.

    python -m stackwise_bench.bench --quick --only devices              # CPU: 1 and 2 processes, vit_micro_p4
    python -m stackwise_bench.bench --only devices --devices 1,2,4,8    # GPUs: deit_tiny img/s, gpt_micro tok/s
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

from stackwise_bench.bench.harness import BUDGETS, Budget, compare, interleaved
from stackwise_bench.bench.processes import timed_process

LOSS_TOLERANCE = 1e-4  # the promise: the N-device run's losses are the 1-device run's (measured: 1e-8 to 1e-6)
CPU_CAP = 4  # CPU processes at most (and never above the cores): the CPU figure proves the path, it stays short
FSDP_PREFIXES = ("vit_", "deit_", "gpt_", "llama_")  # models FSDP shards block by block (not the ResNets)
LOSS_KEYS = ("train_loss", "val_loss")
# speed keys: metrics.jsonl's per epoch, summary.json's train section's over the run
SPEED_KEYS = {"img/s": (("train_img_s",), ("img_s",)), "tok/s": (("train_token_s", "train_tokens_s"), ("token_s",))}


@dataclasses.dataclass(frozen=True)
class DeviceSize:
    """How much of the figure to run."""

    reps: int  # interleaved repetitions of every arm
    epochs: int  # trainer.max_epochs of every run; the first is not timed
    lm: bool  # also gpt_micro's tokens/s
    fsdp: bool  # also trainer.strategy=fsdp for the models FSDP supports


SIZES = {
    "full": DeviceSize(reps=3, epochs=6, lm=True, fsdp=True),
    "quick": DeviceSize(reps=1, epochs=4, lm=False, fsdp=True),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model's runs: its overrides, its global batch and its speed's unit."""

    model: str
    batch: int
    unit: str  # img/s | tok/s
    overrides: tuple


def size_of(b: Budget) -> DeviceSize:
    return SIZES["quick" if b == BUDGETS["quick"] else "full"]


def workloads(s: DeviceSize, cuda: bool) -> list[Workload]:
    """CPU: vit_micro_p4 on digits (its native 8 px), batch 64, 20 steps an epoch; gpt_micro batch 12 (x 64 tokens).
    GPU: deit_tiny at 224 px on a synthetic CIFAR-shaped set, batch 256, bf16; gpt_micro batch 64, bf16."""
    steps = 20  # per epoch, both kinds
    if cuda:
        batch = 256  # keeps a datacenter GPU busy on 1 device (as the gpu figure's), 32 a rank on 8
        image = Workload("deit_tiny", batch, "img/s", (
            "model.pretrained=false", "precision=bf16", "dataset=synthetic", "dataset.num_classes=10",
            f"dataset.num_train={math.ceil(batch * steps / 0.9)}", f"dataset.num_test={batch}",
            "augmentation=none", f"trainer.eval_batch_size={batch}",
        ))  # fmt: skip
    else:
        image = Workload("vit_micro_p4", 64, "img/s", ())  # digits: ~1.3k training images, 20 steps of 64
    lm_batch = 64 if cuda else 12  # 12 x 64 tokens: nanoGPT's CPU "baby GPT"
    lm = Workload("gpt_micro", lm_batch, "tok/s", (
        "dataset=shakespeare", "dataset.tokenizer=byte", f"dataset.steps_per_epoch={steps}",
        "dataset.val_tokens=4096", "dataset.test_tokens=4096", *(("precision=bf16",) if cuda else ()),
    ))  # fmt: skip
    return [image, lm] if s.lm else [image]


def device_counts(b: Budget, cuda: bool, batch: int) -> list[int]:
    """``--devices`` (1 added), or 1, 2, 4, ... up to the GPUs (and their count), or up to the cores capped at
    :data:`CPU_CAP` (at least 2: the CPU figure is the path's proof); only counts that divide the global batch."""
    if b.devices:
        counts = sorted({1, *b.devices})
        bad = [n for n in counts if batch % n]
        if bad:
            raise ValueError(f"--devices {','.join(map(str, bad))}: the global batch {batch} must divide evenly")
        return counts
    have = torch.cuda.device_count() if cuda else max(2, min(cpu_cores(), CPU_CAP))
    counts = [2**k for k in range(have.bit_length()) if 2**k <= have]
    return sorted({*counts, have} if cuda and batch % have == 0 else set(counts))


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def arm_names(model: str, counts: list[int], fsdp: bool) -> dict[str, tuple[int, str | None]]:
    """Arm name -> (devices, strategy): "1", then "N ddp" (and "N fsdp" where the model supports it) per N > 1."""
    arms = {"1": (1, None)}
    for n in counts[1:]:
        arms[f"{n} ddp"] = (n, "ddp")
        if fsdp and model.startswith(FSDP_PREFIXES):
            arms[f"{n} fsdp"] = (n, "fsdp")
    return arms


def run_arm(w: Workload, n: int, strategy: str | None, threads: int | None, epochs: int, run_dir: Path) -> dict:
    """One run of ``python -m stackwise_bench.train`` on ``n`` devices; what its run folder says."""
    cmd = [
        sys.executable, "-m", "stackwise_bench.train", f"model={w.model}", *w.overrides,
        f"trainer.batch_size={w.batch}", f"trainer.max_epochs={epochs}", "trainer.early_stopping_patience=null",
        "trainer.progress=log", f"trainer.devices={n}", *([f"trainer.strategy={strategy}"] if strategy else []),
        *([f"trainer.threads={threads}"] if threads else []), f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    wall = timed_process(cmd, run_dir.parent, timeout=1800)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    env = summary.get("env") or {}
    got = (env.get("world_size", 1), env.get("strategy") if n > 1 else None)
    if summary.get("status") != "completed" or got != (n, strategy):
        raise RuntimeError(
            f"{run_dir.name}: status {summary.get('status')}, env.world_size/strategy {got} instead of "
            f"({n}, {strategy}): the run did not train on the devices asked for"
        )
    return {
        "speed": epoch_speed(rows, w.unit),
        "summary_speed": _first(summary.get("train") or {}, SPEED_KEYS[w.unit][1]),
        "world_size": env.get("world_size", 1),
        "backend": env.get("backend"),
        "strategy": env.get("strategy"),
        "threads_per_rank": env.get("threads"),
        "losses": [{"step": r.get("step"), **{k: r[k] for k in LOSS_KEYS if k in r}} for r in rows],
        "wall_s": wall,
    }


def _first(row: dict, keys: tuple) -> float | None:
    return next((row[k] for k in keys if row.get(k) is not None), None)


def epoch_speed(rows: list[dict], unit: str) -> float:
    """The median speed of the epochs after the first (the first pays for first calls and allocator growth)."""
    speeds = [v for r in rows if (v := _first(r, SPEED_KEYS[unit][0])) is not None]
    if len(speeds) < 2:
        raise RuntimeError(f"{len(speeds)} epochs with a training speed: the figure needs 2 or more")
    return statistics.median(speeds[1:])


def max_loss_delta(runs: list[dict], base: list[dict]) -> float:
    """The largest |N-device - 1-device| over every metrics row's train_loss and val_loss, repetition by
    repetition (inf where the runs logged different steps or losses)."""
    worst = 0.0
    for run, ref in zip(runs, base):
        a, b = ({r["step"]: r for r in x["losses"]} for x in (run, ref))
        pairs = [(a[s][k], b[s].get(k)) for s in a if s in b for k in LOSS_KEYS if k in a[s]]
        if set(a) != set(b) or not pairs or any(y is None for _, y in pairs):
            return math.inf
        worst = max(worst, *(abs(x - y) for x, y in pairs))
    return worst


def fig_devices(b: Budget, work: Path, size: DeviceSize | None = None) -> list[dict]:
    """img/s (and tokens/s) on N devices ÷ on 1, same global batch and steps, one row per N and strategy."""
    s, cuda = size or size_of(b), torch.cuda.is_available()
    out = []
    for w in workloads(s, cuda):
        counts = device_counts(b, cuda, w.batch)
        if len(counts) < 2:
            out.append({"figure": "devices", "skipped": True,
                        "setting": f"{w.model}: {counts[-1]} device on this machine, nothing to scale"})  # fmt: skip
            continue
        arms = arm_names(w.model, counts, s.fsdp)
        total = None if cuda else max(counts)  # CPU: the same threads in all, split between the ranks
        samples, runs = measure(w, s, arms, total, work)
        out += [row(w, s, name, arms[name], samples, runs, total) for name in list(arms)[1:]]
    return out


def measure(w: Workload, s: DeviceSize, arms: dict, total: int | None, work: Path) -> tuple[dict, dict]:
    """Every arm ``s.reps`` times, interleaved: the speeds by arm, and each run's record by arm."""
    runs: dict[str, list[dict]] = {name: [] for name in arms}

    def arm(name: str, rep: int) -> float:
        n, strategy = arms[name]
        threads = max(1, total // n) if total else None
        run_dir = work / f"devices-{w.model}-{name.replace(' ', '-')}-{rep}"
        runs[name].append(run_arm(w, n, strategy, threads, s.epochs, run_dir))
        return runs[name][-1]["speed"]

    return interleaved(s.reps, {name: (lambda r, name=name: arm(name, r)) for name in arms}), runs


def row(w: Workload, s: DeviceSize, name: str, arm: tuple, samples: dict, runs: dict, total: int | None) -> dict:
    """The row of arm ``name`` against the 1-device arm."""
    n, strategy = arm
    first, base = runs[name][0], runs["1"][0]
    delta = max_loss_delta(runs[name], runs["1"])
    agree = delta <= LOSS_TOLERANCE
    where = (
        f"CPU, {total} threads in all ({max(1, total // n)}/rank vs {total}): path only, the ranks share the cores"
        if total
        else f"{torch.cuda.get_device_name()}, one GPU a rank"
    )
    return {
        "figure": "devices",
        "setting": (
            f"{w.model} {w.unit}, {n} {strategy} / 1 device ({first['backend']}, world_size {first['world_size']}): "
            f"batch {w.batch}, {s.epochs - 1} of {s.epochs} epochs timed; max|dloss| {delta:.1e} "
            f"(<= {LOSS_TOLERANCE:.0e}: {'yes' if agree else 'NO'}); {where}"
        ),
        "unit": w.unit,
        "goal": "",
        **compare(samples, name, "1"),
        "model": w.model,
        "devices": n,
        "world_size": first["world_size"],
        "backend": first["backend"],
        "strategy": first["strategy"],
        "base_world_size": base["world_size"],
        "global_batch": w.batch,
        "epochs": s.epochs,
        "threads_per_rank": first["threads_per_rank"],
        "base_threads": base["threads_per_rank"],
        "total_threads": total,
        "max_abs_loss_delta": delta,
        "loss_tolerance": LOSS_TOLERANCE,
        "losses_agree": agree,
        "proves_path_only": total is not None,
        "note": "CPU: ranks are gloo processes sharing the same cores: this proves the path, not scaling"
        if total
        else "GPU: NCCL, one GPU a rank",
        "runs": {k: runs[k] for k in ("1", name)},
    }
