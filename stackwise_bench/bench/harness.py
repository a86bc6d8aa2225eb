"""The benchmark's measuring: budgets, interleaved arms and their ratios, a step clock, and the two training arms.

Shared machines drift, so no figure compares absolute seconds from different moments: each repetition runs every
arm once, in alternating order (A B, B A, ...), and a figure reports the median over repetitions of the
per-repetition ratio, with the min-max range next to it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stackwise_bench.configs import CONF_DIR


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much of each figure to run: the full budget or ``--quick``'s."""

    reps: int  # interleaved repetitions of every comparison
    steps: dict  # model -> optimizer steps per training arm (one epoch)
    batch: dict  # model -> batch size (both arms use it)
    warmup_steps: int  # leading steps not timed (kernel selection, allocator, compile)
    pipeline_images: int  # images per timed pass of a data pipeline at 224 px (x4 at 32 px)
    startup_reps: int
    sweep_reps: int
    sweep_epochs: int  # trainer.max_epochs of each tiny sweep job
    sweep_default_epochs: int  # trainer.max_epochs of each default-sized (compute-bound) sweep job
    compile: bool  # measure torch.compile (slow to compile on a CPU)
    # --devices: the device counts of the devices figure (empty: 1, 2, 4, ... up to the machine's). Not compared:
    # a figure that tells the quick budget from the full one by equality (lm.size_of) still does.
    devices: tuple = dataclasses.field(default=(), compare=False)


# Speed differs more between two runs of the same loop (allocation, placement, neighbours) than
# between steps of one run, so the budget buys many repetitions. Each arm still runs ~3 s: with
# resnet8 arms of 14 steps (0.7 s) one neighbour's burst swung a repetition's ratio 0.6-1.4.
BUDGETS = {
    "full": Budget(
        reps=11,
        steps={"resnet8": 60, "vit_tiny_p4": 8, "deit_tiny": 30},
        batch={"resnet8": 64, "vit_tiny_p4": 32, "deit_tiny": 64},
        warmup_steps=2,
        pipeline_images=4096,
        startup_reps=7,
        sweep_reps=2,
        sweep_epochs=20,
        sweep_default_epochs=5,
        compile=True,
    ),
    "quick": Budget(
        reps=5,
        steps={"resnet8": 20, "vit_tiny_p4": 5, "deit_tiny": 12},
        batch={"resnet8": 64, "vit_tiny_p4": 16, "deit_tiny": 64},
        warmup_steps=1,
        pipeline_images=1024,
        startup_reps=3,
        sweep_reps=1,
        sweep_epochs=6,
        sweep_default_epochs=2,
        compile=False,
    ),
}


def interleaved(reps: int, arms: dict, warmup: bool = False) -> dict[str, list[float]]:
    """Call every arm once per repetition, reversing the order each time so drift hits all arms alike.

    ``warmup`` first calls every arm once untimed (rep -1): the first run in a process pays for
    kernel selection and allocator growth that later runs of either arm reuse.
    """
    for name in arms if warmup else ():
        arms[name](-1)
    samples = {name: [] for name in arms}
    for rep in range(reps):
        for name in list(arms) if rep % 2 == 0 else list(arms)[::-1]:
            samples[name].append(arms[name](rep))
    return samples


def compare(samples: dict, a: str, b: str) -> dict:
    """Medians of arms ``a`` and ``b`` and the median (min, max) over repetitions of the ratio a/b."""
    ratios = [x / y for x, y in zip(samples[a], samples[b])]
    return {
        "a": a,
        "b": b,
        "a_median": statistics.median(samples[a]),
        "b_median": statistics.median(samples[b]),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "samples": samples,
    }


class StepClock:
    """Time between consecutive optimizer steps, for any loop (torch's global optimizer-step hook).

    Both arms of a training comparison are timed by this same clock, from the outside. On a
    GPU the marks are CUDA events, so they time the device, not how far ahead Python queued.
    """

    def __init__(self, device: torch.device):
        self.device, self.marks = device, []

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.handle = register_optimizer_step_post_hook(self._mark)
        return self

    def _mark(self, *_):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def __exit__(self, *exc):
        self.handle.remove()

    def img_s(self, batch: int, warmup: int, mean: bool = False) -> float:
        """``batch`` / the median step interval after ``warmup`` steps: robust to bursts of load on a shared machine.

        ``mean``: the mean interval instead, for costs paid on some steps only (a diagnostics logging step
        every 50), which the median would hide.
        """
        pairs = list(zip(self.marks, self.marks[1:]))[warmup:]
        if not pairs:
            raise RuntimeError(f"only {len(self.marks)} optimizer steps: raise the budget's steps above warm-up + 1")
        average = statistics.fmean if mean else statistics.median
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return batch / average([a.elapsed_time(b) / 1e3 for a, b in pairs])
        return batch / average([b - a for a, b in pairs])


def compose(overrides: list[str]):
    """The run config, as ``python -m stackwise_bench.train <overrides>`` composes it (the installed conf tree)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def train_overrides(model: str, precision: str, b: Budget, *extra: str) -> list[str]:
    """One epoch of about ``b.steps`` steps on a synthetic CIFAR-shaped set (10 classes, 32 px), no augmentation."""
    batch, steps = b.batch[model], b.steps[model]
    num_train = max(math.ceil(batch * steps / 0.9) + 10, 60)  # 10% goes to validation: >= 1 per class
    return [
        f"model={model}",
        f"precision={precision}",
        "model.pretrained=false",
        "augmentation=none",
        "dataset=synthetic",
        "dataset.num_classes=10",
        f"dataset.num_train={num_train}",
        f"dataset.num_test={batch}",
        f"trainer.batch_size={batch}",
        f"trainer.eval_batch_size={batch}",
        "trainer.max_epochs=1",
        "trainer.progress=log",
        *extra,
    ]


def framework_img_s(
    overrides: list[str], run_dir: Path, b: Budget, rows: list | None = None, mean: bool = False
) -> float:
    """``stackwise_bench.train.run`` on the composed config, as ``python -m stackwise_bench.train`` runs it."""
    from stackwise_bench.train import run
    from stackwise_bench.training.precision import resolve_device

    cfg = compose(overrides)
    with StepClock(resolve_device(cfg.trainer.device)) as clock:
        run(cfg, run_dir)
    if rows is not None:
        rows += [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return clock.img_s(cfg.trainer.batch_size, b.warmup_steps, mean=mean)


def bare_img_s(overrides: list[str], b: Budget) -> float:
    """A hand-written loop over the same data, model, batch, precision and recipe, timed by the same clock.

    What anyone would write: the uint8 set on the device, a permutation per epoch, normalise,
    AdamW over ``model.parameters()``, grad-norm clip, cosine LR per step. No logging, no metrics.
    """
    from stackwise_bench.build import instantiate
    from stackwise_bench.nn.models import create_model, is_convnet
    from stackwise_bench.training.precision import autocast, resolve_device

    cfg = compose(overrides)
    device = resolve_device(cfg.trainer.device)
    data = instantiate(cfg.dataset)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, data.num_classes, img_size=cfg.model.img_size).to(device)
    fmt = torch.channels_last if cfg.trainer.channels_last and is_convnet(model) else torch.contiguous_format
    model.to(memory_format=fmt)
    # fused: what optimizer.implementation=auto picks, so this figure is about the loop, not the kernel
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay, fused=True
    )
    x, y = data.train_x.to(device), data.train_y.to(device)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    batch, size = cfg.trainer.batch_size, cfg.model.img_size
    steps = len(x) // batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    with StepClock(device) as clock:
        perm = torch.randperm(len(x), device=device)
        for step in range(steps):
            idx = perm[step * batch : (step + 1) * batch]
            xb = ((x[idx].float() / 255 - mean) / std).contiguous(memory_format=fmt)
            if size != xb.shape[-1]:
                xb = F.interpolate(xb, size=(size, size), mode="bilinear", align_corners=False)
            with autocast(cfg.precision.name, device):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
            opt.step()
            sched.step()
    return clock.img_s(batch, b.warmup_steps)


def instantiate_model(cfg):
    """The model of a composed config, with a 10-class head."""
    from stackwise_bench.build import instantiate

    return instantiate(cfg.model, num_classes=10)
