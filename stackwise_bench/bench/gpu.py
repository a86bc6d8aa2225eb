"""The CUDA figures: img/s and MFU of deit_tiny and resnet8, compile, and FP8 against bf16."""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
from pathlib import Path

import torch

from stackwise_bench.bench.harness import Budget, compare, framework_img_s, interleaved, train_overrides
from stackwise_bench.bench.knobs import compile_knob
from stackwise_bench.training.flops import peak_flops, train_flops_per_image


def fig_gpu(b: Budget, work: Path) -> list[dict]:
    """deit_tiny at 224 and resnet8 at 32 (bf16 / fp32, MFU against the bf16 tensor-core peak), compile, FP8."""
    from stackwise_bench.nn.models import create_model

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
        net = create_model(model, 10, img_size=size).to(device)
        flops = train_flops_per_image(net, (3, size, size), num_classes=10, batch=4)
        del net
        ovs = {p: train_overrides(model, p, g) for p in ("bf16", "fp32")}
        s = interleaved(
            reps,
            {
                p: (lambda r, ov=ovs[p], run=f"gpu-{model}-{p}": framework_img_s(ov, work / f"{run}-{r}", g))
                for p in ovs
            },
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
    out.append({**compile_knob(g, work, "deit_tiny", "bf16", reps=2), "figure": "gpu"})
    out.append(_fp8_row(g, work, device))
    return out


def _fp8_row(g: Budget, work: Path, device: torch.device) -> dict:
    """precision=fp8 ÷ bf16 on compiled deit_tiny at 224 (a skipped row before compute capability 8.9 or torchao)."""
    if tuple(torch.cuda.get_device_capability(device)) < (8, 9) or not importlib.util.find_spec("torchao"):
        return {
            "figure": "gpu",
            "setting": "precision=fp8: needs compute capability 8.9+ and torchao: skipped",
            "skipped": True,
        }
    ovs = {p: train_overrides("deit_tiny", p, g, "trainer.compile=true") for p in ("fp8", "bf16")}
    s = interleaved(2, {p: (lambda r, p=p: framework_img_s(ovs[p], work / f"gpu-fp8-{p}-{r}", g)) for p in ovs})
    return {
        "figure": "gpu",
        "setting": f"precision=fp8 / bf16: deit_tiny at 224, batch {g.batch['deit_tiny']}, compiled, train img/s",
        "unit": "img/s",
        "goal": "",
        **compare(s, "fp8", "bf16"),
    }
