"""Performance figures of stackwise_bench, each a ratio measured side by side in one run.

    python scripts/benchmark.py               # full budget (~15 min on 2 CPU cores)
    python scripts/benchmark.py --quick       # the same figures on a smaller budget (~3 min)
    python scripts/benchmark.py --only overhead,pipeline --out bench.json

Prints a table and writes a JSON of every figure (every sample, not only the
medians) to ``--out``. Shared machines drift, so no figure compares absolute
seconds from different moments: each repetition runs every arm once, in
alternating order (A B, B A, ...), and the table reports the median over
repetitions of the per-repetition ratio, with the min-max range next to it.

Figures (goals from issue 5 for a 2-core CPU machine):
  overhead   training img/s of stackwise_bench.train.run ÷ a bare PyTorch loop: same model,
             data, batch, precision, threads and recipe (AdamW, grad clip, cosine LR)   >= 0.97
  pipeline   BatchLoader + BatchAugment ÷ torchvision per-sample PIL DataLoader (2 workers),
             crop + flip + normalise, CIFAR-shaped data                            >= 6x (32 px), >= 2.5x (224 px)
  imagefolder  dataset=imagefolder on synthetic 320x240 JPEGs in 10 class folders (Budget.pipeline_images): the
             cached uint8 memmap through BatchLoader + BatchAugment ÷ torchvision ImageFolder + DataLoader (2 workers,
             per-sample resize, crop, flip, normalise), at 32 and 224 px          >= 5x (32 px);
             and the one-off cache build (s per 1,000 images) ÷ one ImageFolder epoch
  startup    launch -> first optimizer step of the default run ÷ `python -c "import torch"`   <= 1.8
  sweep      4 tiny jobs: wall time with hydra.launcher.n_jobs=1 ÷ with n_jobs=2         >= 1.7
             (also 4 default-sized jobs, and the ceiling a 2-thread job leaves them)
  diagnostics  training img/s (mean step, so the logging steps count) with diagnostics=basic and full
             ÷ diagnostics=none, at their default every_n_steps=50                       basic >= 0.98
  knobs      what channels_last, torch.compile, foreach/fused AdamW, the larger eval batch,
             inference_mode and (GPU) host-resident data with non-blocking copies buy
  deit_augment  augmentation=deit (RandAugment n2 m9 mstd0.5, erasing, mixup/CutMix) ÷ basic: batched pipeline
             img/s at 32 px, the trainer's mixing included
  peft       training img/s of every lora.method ÷ LoRA's at the same rank (8), vit_tiny_p4 with its default targets
             (every block's qkv), AdamW, the method's own loop work (AdaLoRA's penalty and reallocation) included
  int4       a merged QA-LoRA vit_tiny_p4 (every block Linear on the 4-bit grid), batch 1: forward img/s with the
             packed int4 tinygemm kernel (stackwise_bench.quant.int4_kernel) ÷ the dequantized reference path, on
             the CPU and on CUDA where there is one (bfloat16 there)
  gpu        (CUDA only) deit_tiny at 224 and resnet8 at 32: img/s and MFU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from stackwise_bench.training.flops import PEAK_TFLOPS, peak_flops  # noqa: E402, F401  (PEAK_TFLOPS: re-exported)
from stackwise_bench.training.flops import train_flops_per_image as model_train_flops_per_image  # noqa: E402
from stackwise_bench.training.precision import synchronize  # noqa: E402

FIGURES = (
    "overhead",
    "diagnostics",
    "pipeline",
    "imagefolder",
    "startup",
    "sweep",
    "knobs",
    "deit_augment",
    "peft",
    "int4",
    "gpu",
)


@dataclasses.dataclass(frozen=True)
class Budget:
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

# ---------------------------------------------------------------------------------- measuring


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
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
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


# ------------------------------------------------------------------------------------ figures


def fig_overhead(b: Budget, work: Path) -> list[dict]:
    out = []
    for model in ("resnet8", "vit_tiny_p4"):
        for precision in ("fp32", "bf16"):
            ov = train_overrides(model, precision, b)
            reps = 2 * b.reps if model == "resnet8" else b.reps  # cheap runs, with the widest run-to-run spread
            s = interleaved(
                reps,
                {
                    "framework": lambda r: framework_img_s(ov, work / f"ov-{model}-{precision}-{r}", b),
                    "bare": lambda r: bare_img_s(ov, b),
                },
                warmup=True,
            )
            out.append(
                {
                    "figure": "overhead",
                    "setting": f"train img/s, framework / bare loop: {model} {precision} batch {b.batch[model]}",
                    "unit": "img/s",
                    "goal": ">= 0.97",
                    **compare(s, "framework", "bare"),
                }
            )
    return out


def fig_diagnostics(b: Budget, work: Path) -> list[dict]:
    """diagnostics=basic and full against none: whole runs side by side, and the diagnostics' own work per step.

    The whole-run rows time epochs long enough for several logging steps (at the default every 50) by their mean
    step, so the logging steps count. On a shared 2-core machine one arm swings by several percent between
    repetitions, more than the cost being measured; the isolated rows time just what diagnostics add (the
    per-step running norm, and a logging step's hooks, norms and host transfer) against a training step of the
    same model, median of many, in the same process.
    """
    out = []
    for model, batch in (("resnet8", 64), ("vit_micro_p4", 64)):
        steps = {"resnet8": 200, "vit_micro_p4": 600}[model] if b.reps > 3 else 100
        g = dataclasses.replace(b, steps={**b.steps, model: steps}, batch={**b.batch, model: batch})
        ovs = {d: train_overrides(model, "fp32", g, f"diagnostics={d}", "monitors=none") for d in DIAGNOSTICS}
        reps = max(3, b.reps // 2)  # 3 arms of >= 100 steps each: the full budget's 11 would take ~10 minutes
        s = interleaved(
            reps,
            {d: (lambda r, d=d: framework_img_s(ovs[d], work / f"diag-{model}-{d}-{r}", g, mean=True)) for d in ovs},
            warmup=True,
        )
        for level in ("basic", "full"):
            out.append(
                {
                    "figure": "diagnostics",
                    "setting": f"train img/s, diagnostics={level} / none: {model} fp32 batch {batch}, {steps} steps",
                    "unit": "img/s",
                    "goal": ">= 0.98" if level == "basic" else "",
                    **compare(s, level, "none"),
                }
            )
        out += _diagnostics_isolated(model, batch)
    return out


def _diagnostics_isolated(model_name: str, batch: int, every: int = 50) -> list[dict]:
    """Step time ÷ (step time + what diagnostics add per step at ``every``), from medians of many timings."""
    from stackwise_bench.training.diagnostics import Diagnostics

    cfg = compose([f"model={model_name}", "model.pretrained=false"])
    model = instantiate_model(cfg)
    size = cfg.model.img_size
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    opt = torch.optim.AdamW(model.parameters())

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return norm

    def median_ms(fn, n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    def paired_extra_ms(fn, base, n):
        """Median over ``n`` back-to-back pairs of (time of ``fn`` - time of ``base``): drift cancels in each pair."""
        extra = []
        for _ in range(n):
            t0 = time.perf_counter()
            base()
            t1 = time.perf_counter()
            fn()
            extra.append((time.perf_counter() - t1) - (t1 - t0))
        return max(statistics.median(extra) * 1e3, 0.0)

    norm = step()
    step_ms = median_ms(step, 60)
    rows = []
    for level, knobs in (("basic", {}), ("full", {"weights": True, "activations": True})):
        quiet, logging = Diagnostics(every_n_steps=every, **knobs), Diagnostics(every_n_steps=1, **knobs)
        quiet.attach(model)
        logging.attach(model)

        def logging_step(diag=logging):
            diag.before_forward()
            model(x)
            diag.after_backward(1)
            diag.after_step(1, 0)

        per_step = median_ms(lambda diag=quiet: diag.after_backward(1, grad_norm=norm), 2000)  # not a logging step
        quiet.after_step(every, 0)  # empties its interval
        per_log = paired_extra_ms(logging_step, lambda: model(x), 60)
        added = per_step + per_log / every
        rows.append(
            {
                "figure": "diagnostics",
                "setting": f"isolated: step ÷ (step + diagnostics={level} per step at every {every}): {model_name}",
                "unit": "ms",
                "goal": ">= 0.98" if level == "basic" else "",
                "a_median": step_ms,
                "b_median": step_ms + added,
                "ratio": step_ms / (step_ms + added),
                "ratio_min": step_ms / (step_ms + added),
                "ratio_max": step_ms / (step_ms + added),
                "logging_step_ms": per_log,
                "per_step_ms": per_step,
            }
        )
    return rows


def instantiate_model(cfg):
    from stackwise_bench.build import instantiate

    return instantiate(cfg.model, num_classes=10)


DIAGNOSTICS = ("none", "basic", "full")


class PILSet(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 HWC row -> PIL image -> transform."""

    def __init__(self, x_hwc, y, transform):
        self.x, self.y, self.transform = x_hwc, y, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def torch_loader_img_s(loader, device: torch.device) -> float:
    """img/s of one pass over a torch DataLoader, each batch copied to ``device`` (the reference pipelines)."""
    synchronize(device)
    t0 = time.perf_counter()
    seen = 0
    for xb, yb in loader:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        seen += len(yb)
    synchronize(device)
    return seen / (time.perf_counter() - t0)


def fig_pipeline(b: Budget, work: Path) -> list[dict]:
    from torchvision import transforms as T

    from stackwise_bench.data import BatchLoader
    from stackwise_bench.data.augment import BatchAugment
    from stackwise_bench.training.precision import resolve_device

    device = resolve_device("auto")
    batch = 128
    gen = torch.Generator().manual_seed(0)
    x_all = torch.randint(0, 256, (4 * b.pipeline_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y_all = torch.randint(0, 10, (len(x_all),), generator=gen)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    out = []
    for size in (32, 224):
        n = len(x_all) if size == 32 else b.pipeline_images  # 224 px batches cost ~50x more: fewer of them
        x, y = x_all[:n], y_all[:n]
        ours = BatchLoader(
            x,
            y,
            batch,
            device=device,
            out_size=size,
            mean=mean,
            std=std,
            augment=BatchAugment(),
            shuffle=True,
            drop_last=True,
        )
        tf = [T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip()]
        tf += [T.Resize(size)] if size != 32 else []
        tf += [T.ToTensor(), T.Normalize(mean, std)]
        ds = PILSet(x.permute(0, 2, 3, 1).contiguous().numpy(), y.numpy(), T.Compose(tf))
        # persistent workers, timed after a warm-up pass: worker start-up is not counted against torchvision
        ref = torch.utils.data.DataLoader(
            ds,
            batch_size=batch,
            shuffle=True,
            num_workers=2,
            drop_last=True,
            persistent_workers=True,
            pin_memory=device.type == "cuda",
        )

        def ours_pass(epoch):
            synchronize(device)
            t0 = time.perf_counter()
            seen = sum(len(yb) for _, yb in ours.epoch(epoch))
            synchronize(device)
            return seen / (time.perf_counter() - t0)

        def ref_pass(_, loader=ref):
            return torch_loader_img_s(loader, device)

        ours_pass(0), ref_pass(0)  # warm-up: workers, allocator, kernels
        s = interleaved(b.reps, {"batched": lambda r: ours_pass(r + 1), "torchvision": ref_pass})
        del ref_pass, ref  # shuts the persistent workers down before the next size
        out.append(
            {
                "figure": "pipeline",
                "setting": f"img/s, batched / torchvision PIL: crop+flip"
                f"{'+resize' if size != 32 else ''}+normalise to {size} px, batch {batch}",
                "unit": "img/s",
                "goal": ">= 6" if size == 32 else ">= 2.5",
                **compare(s, "batched", "torchvision"),
            }
        )
    return out


def _write_jpegs(root: Path, counts: dict, classes: int, size: tuple[int, int] = (240, 320)) -> int:
    """Photo-like JPEGs (a smooth random colour field plus noise, quality 90) in ``root/<part>/c<k>/``."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    written = 0
    for part, count in counts.items():
        for i in range(count):
            field = F.interpolate(torch.rand(1, 3, 6, 8, generator=gen) * 255, size=size, mode="bilinear")
            noise = torch.randint(-12, 13, field.shape, generator=gen)
            pixels = (field + noise).clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
            folder = root / part / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
            written += 1
    return written


def fig_imagefolder(b: Budget, work: Path) -> list[dict]:
    import shutil

    from torchvision import datasets
    from torchvision import transforms as T

    from stackwise_bench.data import BatchLoader, load_imagefolder
    from stackwise_bench.data.augment import BatchAugment
    from stackwise_bench.data.imagefolder import _cpus
    from stackwise_bench.training.precision import resolve_device

    device = resolve_device("auto")
    classes, threads = 10, _cpus()
    out = []
    for size in (32, 224):
        # Each reference image costs a JPEG decode and a resize every epoch: 224 px gets a quarter of the images.
        n = b.pipeline_images if size == 32 else b.pipeline_images // 4
        root = work / f"imagefolder-{size}"
        files = _write_jpegs(root, {"train": n, "val": max(classes, n // 10), "test": max(classes, n // 10)}, classes)
        batch = min(128, n // 2)  # drop_last: a tiny budget still gets batches
        data = load_imagefolder(str(root), img_size=size, cache_dir=str(work / f"cache-{size}"))
        ours = BatchLoader(
            data.train_x,  # a view of the memory-mapped cache (train/ is one run of it)
            data.train_y,
            batch,
            device=device,
            mean=data.mean,
            std=data.std,
            augment=BatchAugment(crop_padding=4, flip=True),
            shuffle=True,
            drop_last=True,
        )
        epochs = 8 if size == 32 else 1  # a 32 px epoch of the cache takes a few ms: time several
        tf = T.Compose(
            [
                T.Resize(size),  # the cache's resize (shorter side, antialiased) and center crop, per sample
                T.CenterCrop(size),
                T.RandomCrop(size, padding=4, padding_mode="reflect"),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(data.mean, data.std),
            ]
        )
        ref = torch.utils.data.DataLoader(
            datasets.ImageFolder(str(root / "train"), transform=tf),
            batch_size=batch,
            shuffle=True,
            num_workers=2,
            drop_last=True,
            persistent_workers=True,
            pin_memory=device.type == "cuda",
        )

        def cached_pass(rep):
            synchronize(device)
            t0 = time.perf_counter()
            seen = sum(len(yb) for e in range(epochs) for _, yb in ours.epoch((rep + 1) * epochs + e))
            synchronize(device)
            return seen / (time.perf_counter() - t0)

        def ref_pass(_, loader=ref):
            return torch_loader_img_s(loader, device)

        def build_pass(rep):  # the first run's cost: scan, decode and cache every file, open the splits
            cache = work / f"build-{size}-{rep}"
            t0 = time.perf_counter()
            load_imagefolder(str(root), img_size=size, cache_dir=str(cache))
            seconds = time.perf_counter() - t0
            shutil.rmtree(cache)
            return files / seconds

        cached_pass(-1), ref_pass(-1)  # warm-up: workers, allocator, page cache
        s = interleaved(b.reps, {"cached": cached_pass, "imagefolder": ref_pass, "build": build_pass})
        del ref_pass, ref  # shuts the persistent workers down before the next size
        out.append(
            {
                "figure": "imagefolder",
                "setting": f"img/s, cache+BatchLoader / ImageFolder+DataLoader(2 workers), JPEG->{size} px, b{batch}",
                "unit": "img/s",
                "goal": ">= 5" if size == 32 else "",
                **compare(s, "cached", "imagefolder"),
            }
        )
        per_1k = 1000 / statistics.median(s["build"])
        out.append(
            {
                "figure": "imagefolder",
                "setting": f"cache build img/s ({per_1k:.2f} s/1k JPEGs, {threads} threads, ->{size} px) / an "
                "ImageFolder epoch",
                "unit": "img/s",
                "goal": "",
                "build_s_per_1k": per_1k,
                "files": files,
                **compare(s, "build", "imagefolder"),
            }
        )
    return out


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


def timed_process(cmd: list[str], **kw) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)[:200]} failed:\n{done.stderr[-2000:]}")
    return elapsed


def fig_startup(b: Budget, work: Path) -> list[dict]:
    py = sys.executable
    arms = {
        "default run": lambda r: timed_process([py, "-c", STARTUP_FIRST_STEP, f"hydra.run.dir={work}/startup-{r}"]),
        "import torch": lambda r: timed_process([py, "-c", "import torch"]),
        "bare first step": lambda r: timed_process([py, "-c", BARE_FIRST_STEP]),
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


def fig_sweep(b: Budget, work: Path) -> list[dict]:
    def sweep(name: str, job: list[str], epochs: int):
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
                timeout=1800,
            )
            done = [json.loads(p.read_text())["status"] for p in sweep_dir.glob("*/summary.json")]
            if sorted(done) != ["completed"] * 4:
                raise RuntimeError(f"sweep with n_jobs={n_jobs} finished {done} instead of 4 completed jobs")
            return seconds

        return {"n_jobs=2": lambda r: arm(2, r), "n_jobs=1": lambda r: arm(1, r)}

    s = interleaved(b.sweep_reps, sweep("tiny", TINY_SWEEP_JOB, b.sweep_epochs))
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
    s = interleaved(1, sweep("default", SWEEP_JOB, b.sweep_default_epochs))
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


def fig_knobs(b: Budget, work: Path) -> list[dict]:
    from stackwise_bench.training.precision import resolve_device

    device = resolve_device("auto")
    out = []
    for precision in ("fp32", "bf16"):
        ov = train_overrides("resnet8", precision, b)
        s = interleaved(
            b.reps,
            {
                "on": lambda r: framework_img_s(
                    [*ov, "trainer.channels_last=true"], work / f"cl-on-{precision}-{r}", b
                ),
                "off": lambda r: framework_img_s(
                    [*ov, "trainer.channels_last=false"], work / f"cl-off-{precision}-{r}", b
                ),
            },
            warmup=True,
        )
        out.append(
            {
                "figure": "knobs",
                "setting": f"trainer.channels_last on / off: resnet8 {precision} train img/s",
                "unit": "img/s",
                "goal": "",
                **compare(s, "on", "off"),
            }
        )
    if "data_on_device" in compose([]).trainer and device.type == "cuda":
        ov = train_overrides("resnet8", "bf16", b)
        s = interleaved(
            b.reps,
            {
                "host": lambda r: framework_img_s([*ov, "trainer.data_on_device=false"], work / f"host-{r}", b),
                "device": lambda r: framework_img_s([*ov, "trainer.data_on_device=true"], work / f"dev-{r}", b),
            },
            warmup=True,
        )
        out.append(
            {
                "figure": "knobs",
                "setting": "data in pinned host memory + non_blocking copies / on device: resnet8 bf16 train img/s",
                "unit": "img/s",
                "goal": "",
                **compare(s, "host", "device"),
            }
        )
    if b.compile:
        out.append(_compile_knob(b, work))
    out += [_adamw_knob(b, device), *_inference_knobs(b, device)]
    return out


def _compile_knob(b: Budget, work: Path, model: str = "resnet8", precision: str = "fp32", reps: int = 3) -> dict:
    ov = train_overrides(model, precision, b)
    compile_s = []

    def compiled(r):
        rows = []
        img_s = framework_img_s([*ov, "trainer.compile=true"], work / f"compile-{model}-{precision}-{r}", b, rows)
        compile_s.append(rows[0]["compile_time_s"])  # the first step, compilation included (out of train_img_s)
        return img_s

    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-cache")  # the first compile starts cold
    try:
        s = interleaved(
            reps,
            {"compile": compiled, "eager": lambda r: framework_img_s(ov, work / f"eager-{model}-{precision}-{r}", b)},
        )
    finally:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR") if saved is None else os.environ.update(TORCHINDUCTOR_CACHE_DIR=saved)
    return {
        "figure": "knobs",
        "setting": f"trainer.compile on / off: {model} {precision} steady train img/s",
        "unit": "img/s",
        "goal": "",
        **compare(s, "compile", "eager"),
        "compile_s": compile_s[0],
        "compile_s_each": compile_s,
    }


def _adamw_knob(b: Budget, device: torch.device, model: str = "vit_tiny_p4") -> dict:
    """One AdamW step over a model's parameters (5.5M for vit_tiny_p4), per optimizer.implementation."""
    from stackwise_bench.nn.models import create_model

    params = [p.detach().to(device).requires_grad_() for p in create_model(model, 10).parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    impls = {"foreach": {"foreach": True}, "loop": {"foreach": False}, "fused": {"fused": True}}
    optims = {name: torch.optim.AdamW(params, lr=1e-4, **kw) for name, kw in impls.items()}

    def step_ms(name):
        def arm(_):
            optims[name].step()  # warm: state exists after the first call
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(5):
                optims[name].step()
            synchronize(device)
            return (time.perf_counter() - t0) / 5 * 1e3

        return arm

    s = interleaved(b.reps, {name: step_ms(name) for name in impls})
    default = "foreach" if device.type == "cuda" else "loop"  # what torch.optim picks when not told
    row = {
        "figure": "knobs",
        "setting": f"AdamW step ms on {model}, torch default ({default}) / fused (= auto)",
        "unit": "ms",
        "goal": "",
        **compare(s, default, "fused"),
    }
    row["foreach_ms"] = statistics.median(s["foreach"])
    return row


def _inference_knobs(b: Budget, device: torch.device) -> list[dict]:
    """evaluate() at the train batch vs trainer.eval_batch_size, and inference_mode vs no_grad."""
    from stackwise_bench.data import BatchLoader
    from stackwise_bench.nn.models import create_model
    from stackwise_bench.training.metrics import evaluate

    model = create_model("resnet8", 10).to(device, memory_format=torch.channels_last).eval()
    n, reps = 2 * b.pipeline_images, min(b.reps, 5)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (n,))
    loaders = {bs: BatchLoader(x, y, bs, device=device, channels_last=True) for bs in (64, 512)}

    def eval_img_s(bs):
        return lambda _: evaluate(model, loaders[bs], 10, contextlib.nullcontext, device)["infer_img_s"]

    evaluate(model, loaders[512], 10, contextlib.nullcontext, device)  # warm-up
    s = interleaved(reps, {"512": eval_img_s(512), "64": eval_img_s(64)})
    auto = "512" if device.type == "cuda" else "the training batch"
    rows = [
        {
            "figure": "knobs",
            "setting": f"eval batch 512 / 64: resnet8 fp32 evaluate() img/s (null picks {auto})",
            "unit": "img/s",
            "goal": "",
            **compare(s, "512", "64"),
        }
    ]
    batches = [xb for xb, _ in loaders[512].epoch(0)]

    def forward_img_s(mode):
        def arm(_):
            synchronize(device)
            t0 = time.perf_counter()
            with mode():
                for xb in batches:
                    model(xb)
            synchronize(device)
            return n / (time.perf_counter() - t0)

        return arm

    s = interleaved(
        reps, {"inference_mode": forward_img_s(torch.inference_mode), "no_grad": forward_img_s(torch.no_grad)}
    )
    rows.append(
        {
            "figure": "knobs",
            "setting": "torch.inference_mode / no_grad: resnet8 fp32 forward img/s, batch 512",
            "unit": "img/s",
            "goal": "",
            **compare(s, "inference_mode", "no_grad"),
        }
    )
    return rows


def fig_deit_augment(b: Budget, work: Path) -> list[dict]:
    """augmentation=deit ÷ basic: batched pipeline img/s at 32 px (uint8 -> augment -> normalise), with deit's
    per-batch mixup/CutMix applied after the loader as the trainer applies it."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from stackwise_bench.data import BatchLoader
    from stackwise_bench.data.mixup import step_generator
    from stackwise_bench.training.precision import resolve_device

    device = resolve_device("auto")
    batch, classes = 128, 10
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4 * b.pipeline_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, classes, (len(x),), generator=gen)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)

    def arm(option: str):
        augment = instantiate(OmegaConf.load(ROOT / "conf" / "augmentation" / f"{option}.yaml"))
        loader = BatchLoader(
            x, y, batch, device=device, mean=mean, std=std, augment=augment, shuffle=True, drop_last=True
        )

        def one_pass(rep):
            epoch = rep + 1  # rep -1 is the warm-up pass
            synchronize(device)
            t0 = time.perf_counter()
            seen = 0
            for step, (xb, yb) in enumerate(loader.epoch(epoch)):
                if augment.mixing is not None:  # the trainer mixes every batch the loader yields
                    xb, _, _ = augment.mixing(xb, yb, classes, 0.1, step_generator(0, epoch, step))
                seen += len(yb)
            synchronize(device)
            return seen / (time.perf_counter() - t0)

        return one_pass

    s = interleaved(b.reps, {"deit": arm("deit"), "basic": arm("basic")}, warmup=True)
    return [
        {
            "figure": "deit_augment",
            "setting": f"img/s, augmentation=deit (RandAugment n2 m9 mstd0.5 + erasing + mixup/CutMix) / basic "
            f"(crop+flip), normalise, 32 px, batch {batch}",
            "unit": "img/s",
            "goal": "",
            **compare(s, "deit", "basic"),
        }
    ]


PEFT_METHODS = ("lora", "dora", "rslora", "pissa", "adalora", "loha", "lokr", "ia3", "vera", "oft", "qalora", "qlora")


def fig_peft(b: Budget, work: Path) -> list[dict]:
    """Training step throughput of each PEFT method relative to LoRA, all arms interleaved in one process."""
    from stackwise_bench.build import adapt
    from stackwise_bench.nn.models import create_model
    from stackwise_bench.training.adapters import adapter_schedule

    model_name, batch, steps = "vit_tiny_p4", b.batch["vit_tiny_p4"], b.steps["vit_tiny_p4"]
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    arms = {}
    for method in PEFT_METHODS:
        cfg = compose([f"model={model_name}", f"lora.method={method}", "lora.rank=8", "lora.adalora.tinit=0"])
        torch.manual_seed(0)
        model = adapt(create_model(model_name, 10), cfg, total_steps=10_000)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        schedule = adapter_schedule(model, method, {"tinit": 0, "tfinal": 0})
        if schedule is not None:
            schedule.plan(10_000)
        counter = {"step": 0}

        def arm(_, model=model, opt=opt, schedule=schedule, counter=counter):
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = F.cross_entropy(model(x), y)
                if schedule is not None:
                    loss = loss + schedule.penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                counter["step"] += 1
                if schedule is not None:
                    schedule.after_step(counter["step"], 0)
            return steps * batch / (time.perf_counter() - t0)

        arms[method] = arm
    s = interleaved(min(b.reps, 5), arms, warmup=True)
    return [
        {
            "figure": "peft",
            "setting": f"lora.method={m} / lora: {model_name} rank 8 training img/s, batch {batch}, fp32",
            "unit": "img/s",
            "goal": "",
            **compare(s, m, "lora"),
        }
        for m in PEFT_METHODS
        if m != "lora"
    ]


def fig_int4(b: Budget, work: Path) -> list[dict]:
    """Merged QA-LoRA model: the packed int4 kernel vs the reference (dequantized weight, F.linear) forward."""
    import copy

    from stackwise_bench.nn.models import create_model
    from stackwise_bench.quant.int4_kernel import pack_int4
    from stackwise_bench.quant.qalora import apply_quantized_lora, merge_quantized_lora

    rows = []
    for device in [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else []):
        torch.manual_seed(0)
        model = create_model("vit_tiny_p4", 10)
        targets = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"  # every Linear of every block
        apply_quantized_lora(model, "qalora", 8, target_modules=targets, bits=4, group_size=32)
        merge_quantized_lora(model)
        model = model.to(device).eval()
        packed = copy.deepcopy(model)
        report = pack_int4(packed)
        batch = 1  # latency, where weight-only kernels are meant to pay: the weights dominate the memory traffic
        x = torch.randn(batch, 3, 32, 32, device=device)
        autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

        def img_s(net):
            def arm(_):
                synchronize(device)
                t0 = time.perf_counter()
                with torch.inference_mode(), autocast:
                    for _ in range(3):
                        net(x)
                synchronize(device)
                return 3 * batch / (time.perf_counter() - t0)

            return arm

        s = interleaved(b.reps, {"int4_packed": img_s(packed), "reference": img_s(model)}, warmup=True)
        precision = "bf16 autocast" if device.type == "cuda" else "fp32"
        rows.append(
            {
                "figure": "int4",
                "setting": f"packed int4 / reference: merged QA-LoRA vit_tiny_p4 forward img/s, batch {batch}, "
                f"{device.type} {precision} ({len(report['packed'])} layers packed)",
                "unit": "img/s",
                "goal": "",
                **compare(s, "int4_packed", "reference"),
            }
        )
    return rows


def train_flops_per_image(model_name: str, img_size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one image (stackwise_bench.training.flops: matmuls, convs, attention)."""
    from stackwise_bench.nn.models import create_model

    model = create_model(model_name, 10, img_size=img_size).to(device)
    return model_train_flops_per_image(model, (3, img_size, img_size), num_classes=10, batch=4)


def fig_gpu(b: Budget, work: Path) -> list[dict]:
    """deit_tiny at 224 and resnet8 at 32 (bf16 / fp32, MFU against the bf16 tensor-core peak), compile, FP8."""
    if not torch.cuda.is_available():
        return [
            {
                "figure": "gpu",
                "setting": "no CUDA device on this machine: deit_tiny/MFU figures skipped",
                "skipped": True,
            }
        ]
    device = torch.device("cuda")
    # Batches that keep a datacenter GPU busy (the CPU budget's 64 would measure kernel launches).
    g = dataclasses.replace(
        b,
        batch={**b.batch, "deit_tiny": 256, "resnet8": 512},
        steps={**b.steps, "deit_tiny": max(b.steps["deit_tiny"], 20), "resnet8": 30},
    )
    peak = peak_flops(torch.cuda.get_device_name(device), "bf16")
    reps = min(b.reps, 3)  # scripts/gpu_check.sh has 8 minutes for the tests and every GPU row
    out = []
    for model, size in (("deit_tiny", 224), ("resnet8", 32)):
        flops = train_flops_per_image(model, size, device)
        ovs = {p: train_overrides(model, p, g) for p in ("bf16", "fp32")}
        s = interleaved(
            reps, {p: (lambda r, p=p: framework_img_s(ovs[p], work / f"gpu-{model}-{p}-{r}", g)) for p in ovs}
        )
        row = {
            "figure": "gpu",
            "setting": f"{model} at {size} px, batch {g.batch[model]}: train img/s bf16 / fp32",
            "unit": "img/s",
            "goal": "",
            **compare(s, "bf16", "fp32"),
            "train_flops_per_image": flops,
            "gpu": torch.cuda.get_device_name(device),
            "peak_bf16_tflops": peak / 1e12 if peak else None,
        }
        for p in ovs:  # both against the bf16 peak: what the chip could do, not what fp32 could
            row[f"mfu_{p}"] = statistics.median(s[p]) * flops / peak if peak else None
        out.append(row)
    out.append({**_compile_knob(g, work, "deit_tiny", "bf16", reps=2), "figure": "gpu"})
    if tuple(torch.cuda.get_device_capability(device)) >= (8, 9) and importlib.util.find_spec("torchao"):
        ovs = {p: train_overrides("deit_tiny", p, g, "trainer.compile=true") for p in ("fp8", "bf16")}
        s = interleaved(2, {p: (lambda r, p=p: framework_img_s(ovs[p], work / f"gpu-fp8-{p}-{r}", g)) for p in ovs})
        out.append(
            {
                "figure": "gpu",
                "setting": f"precision=fp8 / bf16: deit_tiny at 224, batch {g.batch['deit_tiny']}, "
                "compiled, train img/s",
                "unit": "img/s",
                "goal": "",
                **compare(s, "fp8", "bf16"),
            }
        )
    else:
        out.append(
            {
                "figure": "gpu",
                "setting": "precision=fp8: needs compute capability 8.9+ and torchao: skipped",
                "skipped": True,
            }
        )
    return out


# ------------------------------------------------------------------------------------- report


def met(row: dict) -> str:
    goal = row.get("goal") or ""
    if not goal or "ratio" not in row:
        return ""
    op, value = goal.split()
    ok = row["ratio"] >= float(value) if op == ">=" else row["ratio"] <= float(value)
    return "yes" if ok else "NO"


def cell(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


def table(rows: list[dict]) -> str:
    lines = [f"{'figure':<9} {'setting':<84} {'A':>13} {'B':>13} {'A/B':>6} {'[min-max]':>13} {'goal':>7} {'met':>3}"]
    for r in rows:
        if "error" in r or r.get("skipped"):
            lines.append(f"{r['figure']:<9} {r.get('error') or r['setting']}")
            continue
        extra = "".join(f"; {k} {v:.1%}" for k, v in r.items() if k.startswith("mfu_") and v is not None)
        extra += f"; 1st compile {r['compile_s']:.0f} s" if "compile_s" in r else ""
        lines.append(
            f"{r['figure']:<9} {r['setting'] + extra:<84} {cell(r['a_median'], r['unit']):>13} "
            f"{cell(r['b_median'], r['unit']):>13} {r['ratio']:>6.2f} "
            f"{'[' + format(r['ratio_min'], '.2f') + '-' + format(r['ratio_max'], '.2f') + ']':>13} "
            f"{r['goal']:>7} {met(r):>3}"
        )
    return "\n".join(lines)


def machine() -> dict:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller budget: the same figures in a few minutes")
    parser.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    parser.add_argument("--out", default=None, help="JSON path (default multirun/benchmark/<full|quick>.json)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's, all cores)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = _loadavg()
    if load and load[0] > (os.cpu_count() or 1):
        print(
            f"warning: load average {load[0]} exceeds the {os.cpu_count()} cores: other work competes with every "
            "figure (ratios stay paired, but multi-threaded arms suffer more)",
            file=sys.stderr,
        )
    mode = "quick" if args.quick else "full"
    budget = BUDGETS[mode]
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = sorted(set(only) - set(FIGURES))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: not a figure; choose from {','.join(FIGURES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "mode": mode,
        "budget": dataclasses.asdict(budget),
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": _loadavg(),
        "rows": [],
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stackwise-bench-") as tmp:
        for name in only:
            t0 = time.perf_counter()
            try:
                rows = globals()[f"fig_{name}"](budget, Path(tmp))
            except Exception as exc:  # one broken figure must not cost the others
                rows = [{"figure": name, "error": f"{name} failed: {type(exc).__name__}: {str(exc).strip()[:300]}"}]
            for row in rows:
                row["figure_seconds"] = time.perf_counter() - t0
            report["rows"] += rows
            print(table(rows).split("\n", 1)[1], file=sys.stderr, flush=True)
    report.update(seconds=time.perf_counter() - started, loadavg_end=_loadavg())
    out = Path(args.out or ROOT / "multirun" / "benchmark" / f"{mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    print(
        f"\n{mode} benchmark on {m['gpu'] or m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads, "
        f"torch {m['torch']}; load average {report['loadavg_start']} -> {report['loadavg_end']}; "
        f"{report['seconds']:.0f} s\n"
    )
    print(table(report["rows"]))
    print(f"\nA/B: median over repetitions of the per-repetition ratio (arms interleaved). JSON: {out}")
    return report["rows"]


def _loadavg() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


if __name__ == "__main__":
    main()
