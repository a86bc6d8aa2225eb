"""Integer post-training quantization of weights: per-channel symmetric int8 and group-wise asymmetric int4.

A plain torch reference path (CPU or GPU, vectorised: no loop over elements): each weight is
rounded to integer codes and dequantized back, so the model then computes with exactly what an
integer checkpoint would hold, codes times a stored scale.

``int8``: one scale per output channel, ``scale_c = amax_c / 127``, ``q = clamp(round(w / scale), -127, 127)``,
``w' = q * scale`` (amax 0: scale 1, every ``q`` 0).

``int4``: each output channel's row (a Linear's input dimension; a Conv's ``(in, kh, kw)`` flattened)
is cut into groups of ``group_size`` consecutive weights, the last one shorter when the row length
is not a multiple (it is padded with copies of its own last weight to compute the group's min/max,
which leaves them unchanged, and the padding is dropped again: a short group is quantized exactly as
if it stood alone and costs only its real weights' bits). Per group ``scale = (max − min) / 15``,
``z = round(−min / scale)``, ``q = clamp(round(w / scale) + z, 0, 15)``, ``w' = (q − z) * scale``, with
``min``/``max`` widened to include 0 (as GPTQ does): a group of all-positive (or all-negative)
weights would otherwise need ``z < 0`` (or ``> 15``), the 4-bit zero point would be clamped, and the
group's largest weights would saturate. With 0 inside the range ``z`` lies in [0, 15] and 0 is exact.
A constant group (``max == min``) gets ``scale = |c|`` (1 for c = 0) and the zero point that makes
its one code ``±1`` (or 0): it dequantizes to exactly ``c`` when ``c`` is an fp16 value (0, 0.5, a
pruned group...), else to ``c`` rounded to fp16 (the stored scale's precision).

Scales are stored as fp16 and the dequantization uses the stored value: each scale is rounded *up*
to fp16 (never to 0, never past 65504), so the extreme weights still fit the code range and every
round-trip error is at most half a scale. ``codes * scale`` is exact in float32 (a <= 8-bit integer
times an 11-bit fp16 mantissa).

Stored bytes (:func:`packed_bytes`), what ``quantize_model`` reports: int8 ``numel + 2 * channels``;
int4 ``ceil(numel / 2) + 2 * groups + ceil(groups / 2)``: the 4-bit codes and the 4-bit zero points are
each packed two per byte as one continuous stream per tensor (not per row), so a tensor wastes at most
half a byte in each; ``groups = channels * ceil(row_length / group_size)``.
"""

from __future__ import annotations

import math

import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.knobs.rules import GROUP_SIZE_DEFAULT, INT_FORMATS
from stackwise_bench.values import is_int

INT8_MAX = 127  # symmetric range [-127, 127]: -128 is left out so that q and -q are both codes (0 is the centre)
INT4_LEVELS = 15  # unsigned codes 0..15
SCALE_BYTES = 2  # one fp16 scale per channel (int8) or per group (int4)
_FP16_MAX = 65504.0


def check_group_size(group_size) -> int:
    """``group_size`` as an int; ConfigError (one sentence) unless it is a positive integer."""
    if not is_int(group_size) or group_size < 1:
        raise ConfigError(
            f"group_size={group_size} must be a positive integer (int4 weights per scale and zero point); "
            f"use e.g. group_size={GROUP_SIZE_DEFAULT}."
        )
    return group_size


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value ``>= x`` (for ``0 < x <= 65504``; larger ``x`` gives 65504), as float32."""
    x = x.float().clamp(max=_FP16_MAX)
    h = x.half()
    low = h.float() < x  # rounded down: step to the next fp16 up (positive halves order like their bits)
    h = torch.where(low, (h.view(torch.int16) + 1).view(torch.float16), h)
    return h.float()


def rows(w: torch.Tensor) -> torch.Tensor:
    """The weight as ``(out_channels, row_length)``: a Linear's rows, a Conv's ``(in, kh, kw)`` flattened."""
    return w.detach().float().reshape(w.shape[0], -1) if w.ndim > 1 else w.detach().float().reshape(1, -1)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: returns ``(w_q, scale, q)``, ``w_q = q * scale`` in ``w``'s shape and dtype.

    ``scale`` is ``(channels, 1)`` (float32 holding fp16 values), ``q`` the int8 codes as ``(channels, row_length)``.
    """
    x = rows(w)
    amax = x.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, fp16_ceil(amax / INT8_MAX), torch.ones_like(amax))
    q = torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX)
    return (q * scale).reshape(w.shape).to(w.dtype), scale, q.to(torch.int8)


def quantize_int4(
    w: torch.Tensor, group_size: int = GROUP_SIZE_DEFAULT
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4 along each row: returns ``(w_q, scale, zero, q)``.

    ``w_q = (q - zero) * scale`` in ``w``'s shape and dtype; ``scale`` (float32 holding fp16 values) and
    ``zero`` (uint8 in [0, 15]) are ``(channels, groups)``, ``q`` (uint8 in [0, 15]) is ``(channels, row_length)``.
    """
    group_size = check_group_size(group_size)
    x = rows(w)
    c, n = x.shape
    groups = math.ceil(n / group_size)
    pad = groups * group_size - n
    padded = torch.cat([x, x[:, -1:].expand(c, pad)], dim=1) if pad else x  # the last group's own value
    g = padded.reshape(c, groups, group_size)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    constant = hi == lo
    lo0, hi0 = lo.clamp(max=0), hi.clamp(min=0)  # the range includes 0, so the zero point fits 4 bits
    span = (hi0 - lo0) / INT4_LEVELS
    # A constant group's scale is |c| rounded to the nearest fp16 (1 for c = 0): c is then one code step from z.
    c_scale = lo.abs().clamp(max=_FP16_MAX).half().float()
    scale = torch.where(constant, torch.where(c_scale > 0, c_scale, torch.ones_like(c_scale)), fp16_ceil(span))
    zero = torch.round(-lo0 / scale).clamp_(0, INT4_LEVELS)
    zero = torch.where(constant, (lo < 0).float(), zero)  # c < 0: z = 1, q = 0; c > 0: z = 0, q = 1; c = 0: 0
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp_(0, INT4_LEVELS)
    deq = ((q - zero[..., None]) * scale[..., None]).reshape(c, -1)[:, :n]
    codes = q.reshape(c, -1)[:, :n].to(torch.uint8)
    return deq.reshape(w.shape).to(w.dtype), scale, zero.to(torch.uint8), codes


def fake_quantize_int(w: torch.Tensor, fmt: str, group_size: int = GROUP_SIZE_DEFAULT) -> torch.Tensor:
    """``w`` rounded to ``fmt`` (``int8`` / ``int4``) and dequantized, in its own shape and dtype."""
    if fmt not in INT_FORMATS:
        raise ValueError(f"not an integer format: {fmt}")
    if fmt == "int8":
        return quantize_int8(w)[0]
    return quantize_int4(w, group_size)[0]


def packed_bytes(shape: torch.Size | tuple[int, ...], fmt: str, group_size: int = GROUP_SIZE_DEFAULT) -> int:
    """Bytes an integer checkpoint stores for one weight of ``shape`` (codes, scales, zero points; see the module)."""
    channels = shape[0] if len(shape) > 1 else 1
    numel = math.prod(shape)
    if fmt == "int8":
        return numel + SCALE_BYTES * channels
    if fmt == "int4":
        groups = channels * math.ceil(numel // channels / group_size)
        return math.ceil(numel / 2) + SCALE_BYTES * groups + math.ceil(groups / 2)
    raise ValueError(f"not an integer format: {fmt}")


def report_fields(fmt: str, group_size: int = GROUP_SIZE_DEFAULT) -> dict:
    """The format-describing keys of ``quantize_model``'s report for an integer format."""
    if fmt == "int8":
        return {
            "dtype": "int8",
            "bits": 8,
            "qmin": -INT8_MAX,
            "qmax": INT8_MAX,
            "granularity": "per_output_channel",
            "scale": "float16",
            "symmetric": True,
            "zero_point": None,
            "group_size": None,
        }
    return {
        "dtype": "uint4",
        "bits": 4,
        "qmin": 0,
        "qmax": INT4_LEVELS,
        "granularity": f"group_{group_size}",
        "scale": "float16",
        "symmetric": False,
        "zero_point": "uint4",
        "group_size": group_size,
    }
