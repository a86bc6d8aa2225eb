"""What the speed knobs buy: channels_last, host-resident data, compile, fused AdamW, eval batch, inference."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path

import torch

from stackwise_bench.bench.harness import Budget, compare, compose, framework_img_s, interleaved, train_overrides
from stackwise_bench.training.precision import synchronize


def fig_knobs(b: Budget, work: Path) -> list[dict]:
    """Each speed knob on ÷ off (or the default ÷ the alternative), one row per knob."""
    from stackwise_bench.training.precision import resolve_device

    device = resolve_device("auto")
    out = []
    for precision in ("fp32", "bf16"):
        ov = train_overrides("resnet8", precision, b)
        s = interleaved(
            b.reps,
            {
                "on": lambda r, ov=ov, precision=precision: framework_img_s(
                    [*ov, "trainer.channels_last=true"], work / f"cl-on-{precision}-{r}", b
                ),
                "off": lambda r, ov=ov, precision=precision: framework_img_s(
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
        out.append(compile_knob(b, work))
    out += [_adamw_knob(b, device), *_inference_knobs(b, device)]
    return out


def compile_knob(b: Budget, work: Path, model: str = "resnet8", precision: str = "fp32", reps: int = 3) -> dict:
    """trainer.compile on ÷ off: steady train img/s, with the first (cold-cache) compile's seconds."""
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
