"""Post-training quantization of weights: FP8 here, integer formats in :mod:`stackwise_bench.quant.intq`.

:func:`quantize_model` dispatches on the format name: ``fp8_e4m3`` / ``fp8_e5m2`` below, ``int8`` (per-channel
symmetric) and ``int4`` (group-wise asymmetric) in :mod:`~stackwise_bench.quant.intq`; every format reports the
same keys (weight bytes from the real packed sizes, compression, relative weight error, worst layer).

FP8: per-output-channel weight scaling, saturation, a real float8 cast.

Each Linear/Conv weight is scaled per output channel so its largest magnitude lands
in the top binade of the format, clamped to the format's max (saturation: a plain cast
turns overflow into inf in e5m2, and into NaN or fmax in e4m3fn depending on torch's
version and device), cast to the real
``torch.float8_*`` dtype and cast back. What the model then computes with is exactly
what an FP8 deployment would hold: an FP8 value times a per-channel scale.

The scales are powers of two (largest ``2**k`` with ``amax * 2**k <= fmax``, found with
``frexp``, not ``log2``), chosen over ``fmax / amax`` because scaling by ``2**k`` is exact
in floating point: no weight can overflow through rounding, the dequantized weight
times its scale is exactly an FP8 value, and quantizing twice changes nothing. The
cost is at most one binade of headroom at the bottom of the range; FP8's relative
precision is the same in every binade, so normal values round identically.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.knobs.rules import GROUP_SIZE_DEFAULT, int_activations_problem
from stackwise_bench.nn.heads import classifier_names, is_head
from stackwise_bench.quant import intq

FORMATS = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}  # the FP8 ones
ALL_FORMATS = (*FORMATS, *intq.INT_FORMATS)
QUANTIZED_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
SCALE_BYTES = 1  # a power-of-two scale is stored as its int8 exponent (like MX formats' E8M0 scales)
_MAX_EXP = 126  # keeps 2**k a normal float32 both ways


def check_format(name: str) -> str:
    """``name`` if it is a post-training format (:data:`ALL_FORMATS`); ConfigError (one sentence) otherwise."""
    if name not in ALL_FORMATS:
        raise ConfigError(
            f"quantize={name} is not a supported format; use quantize=fp8_e4m3, fp8_e5m2, int8 or int4 "
            "(or quantize=null to evaluate the checkpoint as trained)."
        )
    return name


def format_dtype(name: str) -> torch.dtype:
    """``fp8_e4m3`` / ``fp8_e5m2`` -> the torch dtype; ConfigError for anything else (int formats have no dtype)."""
    check_format(name)
    if name not in FORMATS:
        raise ConfigError(f"quantize={name} is not an FP8 format; use quantize=fp8_e4m3 or quantize=fp8_e5m2.")
    return FORMATS[name]


def pow2_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest ``2**k`` with ``amax * 2**k <= finfo(dtype).max``, elementwise (1 where ``amax`` is 0)."""
    amax = amax.float()
    fmax_m, fmax_e = torch.frexp(torch.tensor(torch.finfo(dtype).max, dtype=torch.float32, device=amax.device))
    m, e = torch.frexp(amax)  # amax = m * 2**e with m in [0.5, 1)
    k = fmax_e - e - (m > fmax_m).to(e.dtype)
    k = torch.where(amax > 0, k, torch.zeros_like(k)).clamp(-_MAX_EXP, _MAX_EXP)
    return torch.ldexp(torch.ones_like(amax), k)


def fake_quantize(x: torch.Tensor, dtype: torch.dtype, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``x`` to FP8 and back: returns ``(x_q, scale)`` with ``x_q * scale`` exactly FP8-representable.

    Args:
        x: A weight (``per_channel``: one scale per slice along dim 0, the output channels) or an activation.
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        per_channel: One scale per output channel; False: one scale for the whole tensor.
    """
    xf = x.detach().float()
    if per_channel and xf.ndim > 1:
        amax = xf.abs().amax(dim=tuple(range(1, xf.ndim)), keepdim=True)
    else:
        amax = xf.abs().amax()
    scale = pow2_scale(amax, dtype)
    fmax = torch.finfo(dtype).max
    q = (xf * scale).clamp_(-fmax, fmax).to(dtype)  # clamp = saturation; a NaN weight stays NaN
    return (q.float() / scale).to(x.dtype), scale


def quantize_model(
    model: nn.Module,
    fmt: str,
    keep_head: bool = True,
    activations: bool = False,
    head: Sequence[str] | None = None,
    group_size: int = GROUP_SIZE_DEFAULT,
) -> tuple[nn.Module, dict]:
    """Quantize the weights of every Linear/Conv layer to ``fmt`` in place (LoRA adapters merged first).

    Args:
        model: A classifier, or a peft model (merged into its base model, so each deployed
            weight ``W + BA`` is quantized once).
        fmt: ``fp8_e4m3``, ``fp8_e5m2``, ``int8`` or ``int4`` (:data:`ALL_FORMATS`).
        keep_head: Leave the classifier head in its trained precision.
        activations: Also quantize each quantized layer's input, dynamically, per tensor (forward pre-hooks;
            FP8 formats only: integer quantization here is weight-only).
        head: Classifier module name(s); default: timm's ``pretrained_cfg`` or ``head``.
        group_size: ``int4``'s weights per scale and zero point (ignored by the other formats).

    Returns:
        ``(model, report)``: the model to evaluate (the merged base model for peft) and a dict with
        the format, the layer names, the weight bytes before/after (the packed sizes: codes, scales and
        zero points) and the weight error.

    Raises:
        ConfigError: An unknown format, ``activations`` with an integer format, a bad ``group_size``.
    """
    check_format(fmt)
    if fmt in FORMATS:
        dtype = FORMATS[fmt]
        fields = {
            "dtype": str(dtype),
            "bits": torch.finfo(dtype).bits,
            "fmax": torch.finfo(dtype).max,
            "granularity": "per_output_channel",
            "scale": "power_of_two",
        }

        def quantize_weight(w: torch.Tensor) -> tuple[float, float]:
            return _quantize_weight(w, lambda x: fake_quantize(x, dtype)[0])

        def stored_bytes(w: torch.Tensor) -> int:
            return w.numel() * torch.finfo(dtype).bits // 8 + w.shape[0] * SCALE_BYTES

    else:
        if activations:
            raise ConfigError(int_activations_problem("", fmt))
        if fmt == "int4":
            group_size = intq.check_group_size(group_size)
        fields = intq.report_fields(fmt, group_size)

        def quantize_weight(w: torch.Tensor) -> tuple[float, float]:
            return _quantize_weight(w, lambda x: intq.fake_quantize_int(x, fmt, group_size))

        def stored_bytes(w: torch.Tensor) -> int:
            return intq.packed_bytes(w.shape, fmt, group_size)

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    heads = tuple(head) if head is not None else classifier_names(model)
    done, kept, errors = [], [], {}
    before = after = 0
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZED_TYPES):
            continue
        if keep_head and is_head(name, heads):
            kept.append(name)
            continue
        w = module.weight
        before += w.numel() * w.element_size()
        after += stored_bytes(w)
        errors[name] = quantize_weight(w)
        if activations:
            module.register_forward_pre_hook(_input_quantizer(dtype))
        done.append(name)
    if not done:
        raise ConfigError(
            f"quantize={fmt}: this model has no Linear/Conv layer outside the head to quantize; "
            "set keep_head=false to quantize the head as well."
        )
    err_sq, ref_sq = sum(e for e, _ in errors.values()), sum(r for _, r in errors.values())
    rel = {n: (e / r) ** 0.5 if r > 0 else 0.0 for n, (e, r) in errors.items()}
    worst = max(rel, key=rel.get)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    report = {
        "format": fmt,
        **fields,
        "keep_head": keep_head,
        "activations": "dynamic_per_tensor" if activations else None,
        "layers": done,
        "num_layers": len(done),
        "kept_high_precision": kept,
        "weight_bytes_before": total,
        "weight_bytes_after": total - before + after,
        "quantized_weight_bytes_before": before,
        "quantized_weight_bytes_after": after,
        "compression": total / (total - before + after),
        "weight_rel_error": (err_sq / ref_sq) ** 0.5 if ref_sq > 0 else 0.0,
        "worst_layer": worst,
        "worst_layer_rel_error": rel[worst],
    }
    return model, report


@torch.no_grad()
def _quantize_weight(w: torch.Tensor, round_trip) -> tuple[float, float]:
    """Replace ``w`` by ``round_trip(w)`` in place; returns (squared error, squared norm) for the report."""
    q = round_trip(w)
    err, ref = float((q.float() - w.float()).square().sum()), float(w.float().square().sum())
    w.copy_(q)
    return err, ref


def _input_quantizer(dtype: torch.dtype):
    def hook(module, args):
        if not args or not torch.is_tensor(args[0]) or not args[0].is_floating_point():
            return None
        return (fake_quantize(args[0], dtype, per_channel=False)[0], *args[1:])

    return hook


def degradation(before: dict, after: dict) -> dict:
    """Points lost from ``before`` to ``after`` (metrics dicts; positive = worse), overall and per class."""
    per_class = [round(b - a, 4) for b, a in zip(before["per_class_top1"], after["per_class_top1"])]
    worst = max(range(len(per_class)), key=per_class.__getitem__)
    return {
        "top1_points": before["top1"] - after["top1"],
        "top5_points": before["top5"] - after["top5"],
        "f1_macro_points": before["f1_macro"] - after["f1_macro"],
        "loss_increase": after["loss"] - before["loss"],
        "per_class_top1_points": per_class,
        "worst_class": worst,
        "worst_class_points": per_class[worst],
        "classes_worse": sum(p > 0 for p in per_class),
        "classes_better": sum(p < 0 for p in per_class),
    }
