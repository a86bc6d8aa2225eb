"""Layers and statistics for the diagnostics: which layer a parameter belongs to, activation and norm statistics.

Torch only (no files, no config): :mod:`stackwise_bench.training.diagnostics` groups parameters with
:func:`layer_name` and summarises tensors with :func:`activation_stats` and :func:`norms`.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import torch

# Wrappers whose prefix says nothing about the architecture: peft (PeftModel), torch.compile, DDP.
WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.", "module.")
# Containers whose numeric children are blocks: timm ViT/DeiT/EfficientNet ``blocks``, Swin ``layers``,
# ConvNeXt ``stages``, torchvision/timm ResNet ``layer1``, our CIFAR ResNet ``stage1``, HF ``encoder.layer``.
_BLOCK_CONTAINER = re.compile(r"(blocks?|layers?|stages?|levels?)\d*")
ACTIVATION_STATS = ("mean", "std", "rms", "zero_frac", "ch_rms_max")


def strip_wrappers(name: str) -> tuple[str, str]:
    """Split ``name`` into (wrapper prefix, architecture name): ``base_model.model.blocks.0.x`` -> ``blocks.0.x``."""
    prefix = ""
    while True:
        wrapper = next((p for p in WRAPPER_PREFIXES if name.startswith(p)), None)
        if wrapper is None:
            return prefix, name
        prefix, name = prefix + wrapper, name[len(wrapper) :]


def layer_name(param_name: str) -> str:
    """The layer a parameter belongs to, at stage/block/head granularity.

    After stripping wrapper prefixes (:data:`WRAPPER_PREFIXES`), the name is cut at its first purely
    numeric component: when the component before it is a block container (``blocks``, ``layers``,
    ``stages``, ``stageN``, ``layerN``, ...) the layer runs up to and including the index; otherwise the
    numbers index something inside one layer (``stem.0``, ``downsample.1``) and the layer is the first
    component. Names without numbers give their first component.

    ``blocks.3.attn.qkv.weight`` -> ``blocks.3``; ``stage2.0.conv1.weight`` -> ``stage2.0``;
    ``stages.1.blocks.2.x`` -> ``stages.1``; ``stem.0.weight`` -> ``stem``; ``patch_embed.proj.weight`` ->
    ``patch_embed``; ``cls_token`` -> ``cls_token``; ``base_model.model.head.modules_to_save.default.weight``
    -> ``head``.
    """
    parts = strip_wrappers(param_name)[1].split(".")
    for i, part in enumerate(parts[:-1]):  # the last component is the parameter itself
        if part.isdigit():
            if i > 0 and _BLOCK_CONTAINER.fullmatch(parts[i - 1]):
                return ".".join(parts[: i + 1])
            break
    return parts[0]


def channel_dim(x: torch.Tensor) -> int | None:
    """The channel dimension of an activation by its rank: 1 for NCHW (4-D and up), the last for (B, N, C) and (B, C).

    Decided by shape, never by strides, so a channels_last NCHW tensor still has its channels at dim 1.
    timm's own feature hooks assume NCHW for every output, which for a ViT's (B, N, C) tokens would take
    the token axis for channels; this is why the rank decides here. Models that emit NHWC 4-D tensors
    (timm's Swin stages) would have their width axis reported as channels.
    """
    if x.ndim >= 4:
        return 1
    return x.ndim - 1 if x.ndim >= 2 else None


def activation_stats(x: torch.Tensor) -> torch.Tensor:
    """[mean, std, rms, zero_frac, ch_rms_max] of one activation, float32, on its device (no host sync).

    std is the population std; zero_frac counts exact zeros (dead ReLUs); ch_rms_max is the largest
    per-channel RMS (:func:`channel_dim`), which shows outlier channels that the overall RMS averages away.
    fp16/bf16 activations are accumulated in float32.
    """
    with torch.no_grad():
        x = x.detach().float()
        std, mean = torch.std_mean(x, correction=0)
        sq = x.square()
        rms = sq.mean().sqrt()
        dim = channel_dim(x)
        ch_rms_max = rms if dim is None else sq.mean([d for d in range(x.ndim) if d != dim]).sqrt().max()
        return torch.stack([mean, std, rms, (x == 0).float().mean(), ch_rms_max])


def norms(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """float32 L2 norms of ``tensors``, stacked on ``device``: one ``_foreach_norm`` per device/dtype group."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for idx in groups.values():
        for i, norm in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2, dtype=torch.float32)):
            out[i] = norm.to(device)
    return torch.stack(out) if out else torch.zeros(0, device=device)


def to_float(value: float) -> float | None:
    return value if math.isfinite(value) else None
