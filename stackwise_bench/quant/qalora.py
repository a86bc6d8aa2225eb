"""Quantization-aware LoRA (QA-LoRA) and a QLoRA-style baseline on a group-wise integer base, in plain torch.

peft's ``use_qalora`` does nothing on a plain ``nn.Linear``, so both methods are implemented here.

Frozen base (both methods). Each targeted Linear's weight is quantized group-wise and asymmetrically along
its input dimension: each output row is cut into groups of ``group_size`` consecutive inputs, and per
(row, group) ``scale`` and zero point ``zero`` give ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)``
(uint8 codes) and ``w~ = scale * (q - zero)`` (float32). As in :mod:`stackwise_bench.quant.intq`, the
group's min/max are widened to include 0, ``scale`` is rounded *up* to an fp16 value (so every
``|w - w~| <= scale / 2``), ``zero`` is an integer, and a constant group gets ``scale = |c|`` (1 for 0)
and the zero point that puts ``c`` one code from it (no division by zero). ``scale`` and ``zero`` are
float32 tensors holding fp16 values. Codes, scales, zero points and the (frozen) bias are in the
``state_dict``; the dequantized weight is cached in a non-persistent buffer that loading refreshes.

QLoRA (Dettmers et al. 2023, here with a uniform integer grid instead of NF4): the adapter sees the
full input, ``y = W~ x + s * B A x``. Merging gives a high-precision ``W~ + s B A`` that lies off the
integer grid; deploying it as integers means quantizing it again, which loses part of what was learned.

QA-LoRA (Xu et al. 2023, "QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models",
arXiv 2309.14717): the adapter sees the input *average-pooled over each quantization group*,
``y = W~ x + s * B A pool(x)`` with ``A`` of shape ``(rank, in / group_size)``. Its update to the
weight, ``s * (B A)[o, g] / group_size`` for every input ``j`` of group ``g``, is then constant within
each (row, group), exactly like a shift of that group's zero point:
``scale * (q - zero) + d = scale * (q - z')`` with ``z' = zero - s (B A) / (group_size * scale)``.
:func:`merge_quantized_lora` folds the adapter into the zero points (rounded to fp16), the codes and
scales stay as they are, and the merged model is still an integer-grid model, with no high-precision
side path and no second quantization.

The merged layers are :class:`~stackwise_bench.quant.groupwise.GroupQuantLinear` (codes, scale, zero, bias;
forward is ``F.linear`` with the cached dequantized weight): the reference path, CPU and tests.
:func:`stackwise_bench.quant.int4_kernel.pack_int4` moves 4-bit ones onto the tinygemm kernels torchao's int4
weight-only models run on (uint4 codes, per-group scales and floating-point offsets, so QA-LoRA's fractional zero
points fit: ``(q - 8) * scale + offset`` with ``offset = scale * (8 - z)``).

Usage: ``apply_quantized_lora`` before the optimizer is built (it freezes everything but the adapters and
the head); a model carries these layers when :func:`has_quantized_lora` is true; evaluation calls
:func:`merge_quantized_lora` on the trained model (or a deepcopy) and evaluates the result. Keep the model
in float32 and use autocast for mixed precision: ``model.to(torch.bfloat16)`` would round the stored fp16
scales and zero points (the forward already casts the cached weight to the input's dtype).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.lora import _layer_names
from stackwise_bench.quant.groupwise import (  # noqa: F401  (re-exported: the quantizer is part of this API)
    _FP16_MAX,
    GroupQuantLinear,
    _GroupQuantBase,
    dequantize_groups,
    packed_weight_bytes,
    quantize_groups,
)
from stackwise_bench.values import is_int, is_number

METHODS = ("qalora", "qlora")
BITS = (4, 8)
GROUP_SIZE = 32
FP32_BYTES = 4  # a weight of a plain nn.Linear (QLoRA merged without requantization)


# --------------------------------------------------------------------------------------------------------------
# Layers


class _QuantLoRABase(_GroupQuantBase):
    method = ""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float, bits: int, group_size: int):
        qweight, scale, zero = quantize_groups(linear.weight, bits, group_size)
        super().__init__(qweight, scale, zero, linear.bias, bits, group_size)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        device = linear.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self._adapter_in(), device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as LoRA (and nn.Linear) initialise A
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    pooled = False  # QA-LoRA: the adapter sees each quantization group's mean input

    def _adapter_in(self) -> int:
        return self.in_features // self.group_size if self.pooled else self.in_features

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pooled:
            return x
        return x.unflatten(-1, (self.in_features // self.group_size, self.group_size)).mean(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_dropout(self._adapter_input(x))
        a = self.lora_A if h.dtype == self.lora_A.dtype else self.lora_A.to(h.dtype)
        b = self.lora_B if h.dtype == self.lora_B.dtype else self.lora_B.to(h.dtype)
        return self._base(x) + F.linear(F.linear(h, a), b) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The adapter's update to the ``(out, in)`` weight, float32 (QA-LoRA's is constant per group)."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``w~ + delta``: the high-precision weight this layer computes with (dropout off)."""
        delta = self.delta_weight()
        if delta.shape[1] != self.in_features:  # QA-LoRA: each group's column applies to its group_size inputs
            delta = delta.repeat_interleave(self.group_size, dim=1) / self.group_size
        return self.weight_dq + delta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


class QALoRALinear(_QuantLoRABase):
    """QA-LoRA: frozen group-quantized base plus an adapter on the group-averaged input (``A``: rank x in/g)."""

    method = "qalora"
    pooled = True


class QLoRALinear(_QuantLoRABase):
    """QLoRA-style baseline: frozen group-quantized base plus an adapter on the full input (``A``: rank x in)."""

    method = "qlora"


_LAYERS = {"qalora": QALoRALinear, "qlora": QLoRALinear}


# --------------------------------------------------------------------------------------------------------------
# Apply, count, merge


def apply_quantized_lora(
    model: nn.Module,
    method: str,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = ("qkv",),
    head: str | None = "head",
    bits: int = 4,
    group_size: int = GROUP_SIZE,
) -> nn.Module:
    """Swap each targeted ``nn.Linear`` for a :class:`QALoRALinear` / :class:`QLoRALinear` in place.

    Everything is checked before anything changes: a refusal leaves ``model`` as it was.

    Args:
        model: The classifier, modified in place.
        method: ``"qalora"`` or ``"qlora"``.
        rank: Adapter rank r, a positive integer.
        alpha: LoRA alpha; None means 2 * rank (scaling alpha / r).
        dropout: Dropout on the adapter's input (after QA-LoRA's pooling), in [0, 1).
        target_modules: A ``str`` is a regex that must ``re.fullmatch`` a module's full name; a list/tuple
            holds names, matched when a module's name equals one or ends with ``"." + name`` (peft's rules).
        head: The classifier, trained in full (matched like a target name); None freezes it.
        bits: Code width of the frozen base, 4 or 8.
        group_size: Inputs per quantization group; must divide every targeted layer's ``in_features``.

    Returns:
        ``model``, with every parameter frozen except ``lora_A`` / ``lora_B`` and the head's.

    Raises:
        ConfigError: one sentence naming the bad key (``lora.method``, ``lora.rank``, ``lora.alpha``,
            ``lora.dropout``, ``lora.<method>.bits``, ``lora.<method>.group_size``, ``lora.target_modules``,
            ``lora.head``) and what to do.
    """
    if method not in METHODS:
        raise ConfigError(f"lora.method={method} is not a quantized LoRA method; use one of {', '.join(METHODS)}.")
    _validate(method, rank, alpha, dropout, bits, group_size)
    targets = _select_targets(model, target_modules)
    head_names = _select_head(model, head, targets)
    _check_group_size(method, group_size, targets)

    scaling_alpha = float(alpha) if alpha is not None else 2.0 * rank
    for name, linear in targets:
        layer = _LAYERS[method](linear, rank, scaling_alpha, float(dropout), bits, group_size)
        layer.train(linear.training)
        _set_module(model, name, layer)

    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    for name in head_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return model


def has_quantized_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries unmerged QA-LoRA / QLoRA layers (what :func:`merge_quantized_lora` merges)."""
    return any(isinstance(m, _QuantLoRABase) for m in model.modules())


def adapter_parameters(model: nn.Module) -> int:
    """Trainable elements of the adapters (parameters named ``lora_*``)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)


@torch.no_grad()
def merge_quantized_lora(model: nn.Module, requantize: bool = True) -> dict:
    """Fold each adapter into its base, in place, leaving deployable layers.

    QA-LoRA: the adapter moves into the zero points, ``z' = zero - s (B A) / (group_size * scale)`` rounded
    to fp16 (float32 storage); codes and scales are unchanged and the result is a :class:`GroupQuantLinear`
    on the integer grid (``requantize`` does not apply). QLoRA: ``w = w~ + s B A`` in float32; with
    ``requantize=True`` it is quantized again (same bits and group size) into a :class:`GroupQuantLinear`,
    else it becomes a plain ``nn.Linear`` (off the grid).

    Returns:
        ``{"method", "bits", "group_size", "layers", "weight_bytes", "on_grid"}``. ``weight_bytes`` is the packed
        size of the merged layers' weights: codes at ``bits`` each (``ceil(numel * bits / 8)`` per layer) plus
        2 bytes (fp16) per scale and 2 per zero point; 4 bytes per weight for an ``nn.Linear``. Biases are
        excluded. ``method``, ``bits`` and ``group_size`` are a list when the model mixes several.

    Raises:
        ConfigError: when the model has no QA-LoRA / QLoRA layer.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantLoRABase)]
    if not found:
        raise ConfigError(
            "merge_quantized_lora found no QALoRALinear or QLoRALinear layer in this model; "
            "merge only a model trained with lora.method=qalora or qlora (see has_quantized_lora)."
        )
    total, on_grid = 0, True
    for name, layer in found:
        merged = _merge_layer(name, layer, requantize)
        merged.train(layer.training)
        _set_module(model, name, merged)
        if isinstance(merged, GroupQuantLinear):
            total += merged.weight_bytes()
        else:
            total += FP32_BYTES * merged.weight.numel()
            on_grid = False

    def one(values):
        values = sorted(set(values))
        return values[0] if len(values) == 1 else values

    return {
        "method": one(layer.method for _, layer in found),
        "bits": one(layer.bits for _, layer in found),
        "group_size": one(layer.group_size for _, layer in found),
        "layers": len(found),
        "weight_bytes": total,
        "on_grid": on_grid,
    }


def _merge_layer(name: str, layer: _QuantLoRABase, requantize: bool) -> nn.Module:
    device = layer.qweight.device
    if isinstance(layer, QALoRALinear):
        shift = layer.delta_weight() / (layer.group_size * layer.scale)
        zero = layer.zero - shift
        if not bool((zero.abs() <= _FP16_MAX).all()):
            raise ValueError(
                f"{name}: a merged zero point exceeds the fp16 range (|z'| > 65504): the adapter is huge "
                "compared with that group's scale; check the training (e.g. lower the learning rate)."
            )
        zero = zero.half().float()  # stored as fp16
        return GroupQuantLinear(layer.qweight, layer.scale, zero, layer.bias, layer.bits, layer.group_size).to(device)
    w = layer.merged_weight()
    if requantize:
        qweight, scale, zero = quantize_groups(w, layer.bits, layer.group_size)
        return GroupQuantLinear(qweight, scale, zero, layer.bias, layer.bits, layer.group_size).to(device)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=device)
    linear.weight.copy_(w)
    if layer.bias is not None:
        linear.bias.copy_(layer.bias)
    linear.requires_grad_(False)
    return linear


# --------------------------------------------------------------------------------------------------------------
# Checks


def _validate(method, rank, alpha, dropout, bits, group_size) -> None:
    if not is_int(rank) or rank < 1:
        raise ConfigError(
            f"lora.rank={rank} must be a positive integer for lora.method={method}; use e.g. lora.rank=8."
        )
    if alpha is not None and (not is_number(alpha) or not alpha > 0):
        raise ConfigError(
            f"lora.alpha={alpha} must be a positive number or null (null = 2 * rank); use e.g. lora.alpha=16."
        )
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise ConfigError(f"lora.dropout={dropout} must be a number in [0, 1); use e.g. lora.dropout=0.1.")
    if not is_int(bits) or bits not in BITS:
        raise ConfigError(
            f"lora.{method}.bits={bits} is not supported (the frozen base is stored as 4- or 8-bit codes); "
            f"use lora.{method}.bits=4 or 8."
        )
    if not is_int(group_size) or group_size < 1:
        raise ConfigError(
            f"lora.{method}.group_size={group_size} must be a positive integer (inputs per scale and zero point); "
            f"use e.g. lora.{method}.group_size={GROUP_SIZE}."
        )


def _select_targets(model: nn.Module, target_modules) -> list[tuple[str, nn.Linear]]:
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        shown = target_modules

        def matches(name: str) -> bool:
            return pattern.fullmatch(name) is not None

    else:
        names = [str(t) for t in target_modules]
        shown = names

        def matches(name: str) -> bool:
            return any(name == t or name.endswith("." + t) for t in names)

    chosen = [(n, m) for n, m in model.named_modules() if n and matches(n)]
    if not chosen:
        raise ConfigError(
            f"lora.target_modules={shown} matches no module of this model; it has: "
            f"{', '.join(_layer_names(model))}; set lora.target_modules to some of these."
        )
    modules = dict(model.named_modules())
    for name, module in chosen:
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"lora.target_modules={shown} matches {name}, a {type(module).__name__}, but quantized LoRA "
                "replaces only nn.Linear layers; narrow lora.target_modules (a regex string is matched against "
                "full module names) so that it selects only Linear layers."
            )
        parent = modules[name.rpartition(".")[0]]
        if isinstance(parent, nn.MultiheadAttention):
            raise ConfigError(
                f"lora.target_modules={shown} matches {name}, the output projection of an nn.MultiheadAttention "
                "(which reads its weight directly, not through the layer); leave it out of lora.target_modules."
            )
    return chosen


def _select_head(model: nn.Module, head: str | None, targets) -> list[str]:
    if head is None:
        return []
    names = [n for n, _ in model.named_modules() if n and (n == head or n.endswith("." + head))]
    if not names:
        raise ConfigError(
            f"lora.head={head} names no module of this model; it has: {', '.join(_layer_names(model))}; "
            "set lora.head to the classifier's name or null."
        )
    targeted = {n for n, _ in targets}
    clash = [n for n in names if any(t == n or t.startswith(n + ".") for t in targeted)]
    if clash:
        raise ConfigError(
            f"lora.head={head} ({clash[0]}) is also selected by lora.target_modules, but the head is trained "
            "in full, not quantized; take it out of lora.target_modules or set lora.head=null."
        )
    return names


def _check_group_size(method: str, group_size: int, targets) -> None:
    bad = [(n, m.in_features) for n, m in targets if m.in_features % group_size]
    if not bad:
        return
    common = math.gcd(*(m.in_features for _, m in targets))
    fits = [d for d in range(1, common + 1) if common % d == 0]
    suggestion = max([d for d in fits if d <= group_size], default=common)
    name, in_features = bad[0]
    raise ConfigError(
        f"lora.{method}.group_size={group_size} must divide the in_features of every targeted layer "
        f"(QA-LoRA pools the input per group), and {name} has in_features={in_features}; "
        f"use lora.{method}.group_size={suggestion}, which divides them all."
    )


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
