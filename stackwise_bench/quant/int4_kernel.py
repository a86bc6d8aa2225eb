"""Packed int4 weight-only matmuls for merged group-quantized layers: the tinygemm kernels torchao's int4
weight-only quantization dispatches to (``aten._weight_int4pack_mm`` on CUDA, ``..._for_cpu`` on a CPU).

:class:`~stackwise_bench.quant.qalora.GroupQuantLinear` computes ``F.linear(x, scale * (q - zero))`` with the
weight dequantized once: the reference path, exact, any device. :func:`pack_int4` swaps each 4-bit one for an
:class:`Int4PackedLinear` that keeps the codes packed two per byte and multiplies with them directly. tinygemm
dequantizes as ``(q - 8) * scale + offset``, so a group's ``(scale, zero)`` becomes ``(scale, scale * (8 - zero))``:
the same weights. On a CPU the kernel runs in the input's dtype (float32 there: agreement with the reference to
float rounding, tested); on CUDA tinygemm needs bfloat16 activations, scales and offsets (so outputs agree to
bfloat16 rounding; ``tests/test_int4_kernel.py``'s GPU test). ``scripts/benchmark.py --only int4`` times both
paths on the same merged model: on the 2-core dev VM the CPU kernel runs at 0.04x the reference (MKL's fp32 GEMM
on the dequantized weight wins at every batch), so nothing here packs by itself: :func:`pack_int4` is a
deployment step to take on a GPU, where tinygemm is what torchao's int4 weight-only models run on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INNER_K_TILES = 2  # tinygemm's k tiling (2, 4 or 8); 2 needs in_features % 32 == 0, the loosest
GROUP_SIZES = (32, 64, 128, 256)  # what tinygemm supports


def kernel_supported(layer: nn.Module, device: torch.device) -> str | None:
    """Why ``layer`` (a GroupQuantLinear) cannot use the packed kernel on ``device``, or None when it can."""
    if getattr(layer, "bits", None) != 4:
        return "the kernel is int4 only"
    if layer.group_size not in GROUP_SIZES:
        return f"group_size {layer.group_size} is not one of {GROUP_SIZES}"
    if layer.in_features % (INNER_K_TILES * 16):
        return f"in_features {layer.in_features} is not a multiple of {INNER_K_TILES * 16}"
    op = "_weight_int4pack_mm" if device.type == "cuda" else "_weight_int4pack_mm_for_cpu"
    if device.type not in ("cpu", "cuda") or not hasattr(torch.ops.aten, op):
        return f"this torch has no {op} for {device.type}"
    return None


class Int4PackedLinear(nn.Module):
    """A 4-bit group-quantized Linear multiplied by tinygemm from its packed codes."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits, self.group_size = 4, layer.group_size
        device = layer.qweight.device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        codes = layer.qweight.to(torch.int32)
        if device.type == "cuda":  # two codes per byte, high nibble first (torchao's packing for tinygemm)
            packed = torch.ops.aten._convert_weight_to_int4pack(
                (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), INNER_K_TILES
            )
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES)
        self.register_buffer("packed", packed)
        scale, zero = layer.scale.float(), layer.zero.float()
        offset = scale * (8 - zero)  # (q - 8) * scale + offset == scale * (q - zero)
        self.register_buffer("scales_and_zeros", torch.stack([scale.T, offset.T], dim=-1).contiguous().to(self.dtype))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(self.dtype).contiguous()
        if flat.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 packed, g={self.group_size}"


def pack_int4(model: nn.Module) -> dict:
    """Swap every 4-bit GroupQuantLinear of a merged model for an :class:`Int4PackedLinear`, in place.

    Returns ``{"packed": [names], "skipped": {name: why}}``; a layer the kernel cannot take keeps the reference path.
    """
    from stackwise_bench.quant.groupwise import GroupQuantLinear

    packed, skipped = [], {}
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, GroupQuantLinear):
            continue
        why = kernel_supported(layer, layer.qweight.device)
        if why is not None:
            skipped[name] = why
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Int4PackedLinear(layer))
        packed.append(name)
    return {"packed": packed, "skipped": skipped}


def reference_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a GroupQuantLinear computes, for comparisons: ``F.linear(x, scale * (q - zero), bias)``."""
    return F.linear(x, layer.weight_dq.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))
