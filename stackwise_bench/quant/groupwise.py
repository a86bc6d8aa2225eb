"""Group-wise asymmetric integer weights: the quantizer and the deployable layer QA-LoRA and QLoRA merge into.

Each output row of a Linear weight is cut into groups of ``group_size`` consecutive inputs; per (row, group) a
``scale`` and a zero point ``zero`` give codes ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)`` (uint8) and
weights ``scale * (q - zero)`` (float32). As in :mod:`stackwise_bench.quant.intq`, the group's min/max are widened
to include 0, ``scale`` is rounded *up* to an fp16 value (so every ``|w - w~| <= scale / 2``), ``zero`` is an
integer, and a constant group gets ``scale = |c|`` (1 for 0) and the zero point that puts ``c`` one code from it.
:class:`GroupQuantLinear` holds codes, scales, zero points and a frozen bias (all in the ``state_dict``) and caches
the dequantized weight in a non-persistent buffer that loading refreshes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stackwise_bench.quant.intq import fp16_ceil

SCALE_BYTES = 2  # one fp16 scale per group
ZERO_BYTES = 2  # one fp16 zero point per group (QA-LoRA's merged zero points are not integers)
_FP16_MAX = 65504.0


# --------------------------------------------------------------------------------------------------------------
# Group-wise quantization


def quantize_groups(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric quantization of a Linear weight along its input dimension.

    Args:
        w: ``(out, in)`` weight; ``in`` must be a multiple of ``group_size``.
        bits: Code width, 4 or 8 (codes ``0 .. 2**bits - 1``).
        group_size: Consecutive inputs per (row, group).

    Returns:
        ``(qweight, scale, zero)``: uint8 codes ``(out, in)``; float32 ``scale`` (fp16 values, > 0) and
        ``zero`` (integers in ``[0, 2**bits - 1]``), both ``(out, in / group_size)``. For bits=4 this is
        exactly :func:`stackwise_bench.quant.intq.quantize_int4`.
    """
    levels = 2**bits - 1
    x = w.detach().float()
    out, n = x.shape
    g = x.reshape(out, n // group_size, group_size)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    constant = hi == lo
    lo0, hi0 = lo.clamp(max=0), hi.clamp(min=0)  # 0 inside the range: the zero point is a code
    c_scale = lo.abs().clamp(max=_FP16_MAX).half().float()  # constant group: |c| to fp16 (c one step from z)
    scale = torch.where(
        constant, torch.where(c_scale > 0, c_scale, torch.ones_like(c_scale)), fp16_ceil((hi0 - lo0) / levels)
    )
    zero = torch.round(-lo0 / scale).clamp_(0, levels)
    zero = torch.where(constant, (lo < 0).float(), zero)  # c < 0: z = 1, q = 0; c > 0: z = 0, q = 1; c = 0: 0
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp_(0, levels)
    return q.reshape(out, n).to(torch.uint8), scale, zero


def dequantize_groups(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero)`` per (row, group) in float32, as ``(out, in)``."""
    out, n = qweight.shape
    groups = scale.shape[1]
    q = qweight.reshape(out, groups, n // groups).float()
    return (scale.float()[..., None] * (q - zero.float()[..., None])).reshape(out, n)


def packed_weight_bytes(numel: int, groups: int, bits: int) -> int:
    """Bytes of one group-quantized weight: codes packed at ``bits`` each, an fp16 scale and zero per group."""
    return math.ceil(numel * bits / 8) + (SCALE_BYTES + ZERO_BYTES) * groups


# --------------------------------------------------------------------------------------------------------------
# Layers


class _GroupQuantBase(nn.Module):
    """Codes, scales, zero points and a frozen bias (persistent), plus the cached dequantized weight."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int,
    ):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.bits, self.group_size = bits, group_size
        self.register_buffer("qweight", qweight.to(torch.uint8).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", zero.float().contiguous())
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("weight_dq", dequantize_groups(self.qweight, self.scale, self.zero), persistent=False)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the cached dequantized weight from ``qweight``, ``scale`` and ``zero``."""
        self.weight_dq = dequantize_groups(self.qweight, self.scale, self.zero)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refresh()  # the codes/scales/zeros may have changed: the cache must follow

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_dq if x.dtype == self.weight_dq.dtype else self.weight_dq.to(x.dtype)
        b = self.bias if self.bias is None or x.dtype == self.bias.dtype else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def weight_bytes(self) -> int:
        """Packed bytes of this layer's weight (codes, fp16 scales and zero points; bias excluded)."""
        return packed_weight_bytes(self.qweight.numel(), self.scale.numel(), self.bits)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


class GroupQuantLinear(_GroupQuantBase):
    """A deployable group-quantized Linear: ``F.linear(x, scale * (q - zero), bias)``, weight dequantized once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._base(x)
