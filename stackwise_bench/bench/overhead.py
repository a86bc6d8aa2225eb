"""What the framework adds to a training step: the overhead and diagnostics figures."""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stackwise_bench.bench.harness import (
    Budget,
    bare_img_s,
    compare,
    compose,
    framework_img_s,
    instantiate_model,
    interleaved,
    train_overrides,
)

DIAGNOSTICS = ("none", "basic", "full")


def fig_overhead(b: Budget, work: Path) -> list[dict]:
    """Train img/s of ``stackwise_bench.train.run`` ÷ a bare PyTorch loop, resnet8 and vit_tiny_p4, fp32 and bf16."""
    out = []
    for model in ("resnet8", "vit_tiny_p4"):
        for precision in ("fp32", "bf16"):
            ov = train_overrides(model, precision, b)
            reps = 2 * b.reps if model == "resnet8" else b.reps  # cheap runs, with the widest run-to-run spread
            s = interleaved(
                reps,
                {
                    "framework": lambda r, ov=ov, run=f"ov-{model}-{precision}": framework_img_s(
                        ov, work / f"{run}-{r}", b
                    ),
                    "bare": lambda r, ov=ov: bare_img_s(ov, b),
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
            {
                d: (
                    lambda r, ov=ovs[d], run=f"diag-{model}-{d}", g=g: framework_img_s(
                        ov, work / f"{run}-{r}", g, mean=True
                    )
                )
                for d in ovs
            },
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


def median_ms(fn, n: int) -> float:
    """Median milliseconds of ``n`` calls of ``fn``."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def paired_extra_ms(fn, base, n: int) -> float:
    """Median over ``n`` back-to-back pairs of (time of ``fn`` - time of ``base``): drift cancels in each pair."""
    extra = []
    for _ in range(n):
        t0 = time.perf_counter()
        base()
        t1 = time.perf_counter()
        fn()
        extra.append((time.perf_counter() - t1) - (t1 - t0))
    return max(statistics.median(extra) * 1e3, 0.0)
