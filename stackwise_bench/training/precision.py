"""Mixed precision in one table: a dtype per name, an autocast context, a GradScaler.

nanoGPT style: no class hierarchy. fp16 needs loss scaling (small gradients
flush to zero in float16); bf16 has fp32's exponent range and does not.
"""

from __future__ import annotations

import contextlib

import torch

from stackwise_bench.errors import ConfigError

# fp8: torchao's Float8Linear layers (quant/fp8.py) inside bf16 autocast for everything else.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an unavailable device is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.device={device} but no CUDA device is visible here; "
            "use trainer.device=cpu or trainer.device=auto."
        )
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"trainer.device={device} is not supported; use cpu, cuda, cuda:N or auto.")
    return dev


def check_precision(name: str, device: torch.device) -> None:
    """Refuse, before training, a precision the device cannot run.

    The check runs one tiny autocast forward/backward on the device, so it
    answers for this exact build of torch and this exact device.
    """
    if name not in DTYPES:
        raise ConfigError(f"precision={name} is not one of {sorted(DTYPES)}; use e.g. precision=bf16.")
    if name == "fp32":
        return
    if name == "fp8":
        from stackwise_bench.quant.fp8 import check_support

        check_support(device)  # FP8 tensor cores (compute capability 8.9+) and torchao, or one sentence
    if device.type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "precision=bf16 needs a GPU with bfloat16 support (compute capability 8.0+), and "
            f"{torch.cuda.get_device_name(device)} has none; use precision=fp16 or fp32."
        )
    try:
        _probe(name, device)
    except Exception as exc:  # the probe's own failure is the answer
        raise ConfigError(
            f"precision={name} cannot run on device {device} with torch {torch.__version__} "
            f"({type(exc).__name__}: {exc}); use precision=fp32 or another device."
        ) from exc


def _probe(name: str, device: torch.device) -> None:
    layer = torch.nn.Linear(8, 8).to(device)
    scaler = make_scaler(name, device)
    with autocast(name, device):
        out = layer(torch.randn(4, 8, device=device))
    loss = out.float().square().mean()
    scaler.scale(loss).backward()
    if not torch.isfinite(layer.weight.grad).all():
        raise RuntimeError("non-finite gradient from the autocast probe")


def autocast(name: str, device: torch.device):
    """The autocast context for ``name`` (a no-op for fp32)."""
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[name])


def make_scaler(name: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling only for fp16; disabled (a pass-through) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=name == "fp16")
