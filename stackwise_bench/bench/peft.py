"""PEFT methods' training speed against LoRA's, and the packed int4 kernel against its reference."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from stackwise_bench.bench.harness import Budget, compare, compose, interleaved
from stackwise_bench.training.precision import synchronize

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
                    schedule.reallocate(counter["step"], 0)
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
        arms = {
            "int4_packed": _forward_arm(packed, x, device, autocast),
            "reference": _forward_arm(model, x, device, autocast),
        }
        s = interleaved(b.reps, arms, warmup=True)
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


def _forward_arm(net, x: torch.Tensor, device: torch.device, autocast) -> Callable[[int], float]:
    """An arm timing 3 inference forwards of ``net`` on ``x`` under ``autocast``, in img/s."""

    def arm(_):
        synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast:
            for _ in range(3):
                net(x)
        synchronize(device)
        return 3 * len(x) / (time.perf_counter() - t0)

    return arm
