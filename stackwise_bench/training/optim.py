"""Optimizers with decoupled parameter groups, and per-step LR schedules."""

from __future__ import annotations

import math

import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.values import is_number

# Embeddings that ViTs learn as free tensors: decaying them towards zero hurts (DeiT, timm).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether ``param`` gets weight decay: weight matrices/kernels, not norms, biases or learned embeddings."""
    return param.ndim > 1 and not any(key in name for key in NO_DECAY_NAMES)


def base_lr(optimizer) -> float:
    """The learning rate before per-layer scaling (``optimizer.layer_decay``): group 0's over its ``lr_scale``."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def global_norm(model) -> torch.Tensor:
    """The L2 norm of all gradients together (what clip_grad_norm_ returns), for steps that do not clip."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters: weight decay on weight matrices/kernels only.

    Norm weights and biases (1-D tensors) and position/class embeddings get no
    decay, as in timm and DeiT.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def layer_decay_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float, lr: float) -> list[dict]:
    """:func:`param_groups` split further by depth, each group's learning rate scaled by ``lr_scale``.

    timm's ``param_groups_layer_decay`` (BEiT's recipe) numbers the layers with the model's ``group_matcher``
    (a ViT: embeddings 0, block ``i`` at ``i + 1``, the final norm and head last = L) and gives layer ``l`` the
    scale ``layer_decay ** (L - l)``; weight decay follows :func:`decays` (handed to timm as its no-decay list).
    Each group's ``lr`` is ``lr * lr_scale`` at construction, because our scheduler (a LambdaLR) multiplies
    each group's initial rate and, unlike timm's schedulers, does not read ``lr_scale`` itself.
    """
    from timm.optim import param_groups_layer_decay

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the timm model inside
    if not callable(getattr(inner, "group_matcher", None)):
        raise ConfigError(
            f"optimizer.layer_decay={layer_decay} needs a model timm can number by layer (a timm ViT has a "
            f"group_matcher), and {type(inner).__name__} has none; set optimizer.layer_decay=null."
        )
    no_decay = [name for name, p in inner.named_parameters() if not decays(name, p)]
    groups = param_groups_layer_decay(inner, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return groups


def build_optimizer(
    model: torch.nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = True,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    implementation: str = "auto",
    layer_decay: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW or SGD over :func:`param_groups` (with ``layer_decay``, :func:`layer_decay_groups`).

    ``implementation``: ``auto`` uses torch's fused kernel (one pass per parameter
    tensor) on CUDA and CPU, the devices that have it; ``foreach``/``fused``/``loop``
    force one. On 2 CPU cores an AdamW step over ViT-Tiny's 5.5M parameters takes
    ~5 ms fused, ~15 ms loop and ~23 ms foreach (scripts/benchmark.py).
    """
    if not lr or lr <= 0:
        raise ConfigError(f"optimizer.lr={lr} must be a positive number; use e.g. optimizer.lr=1e-3.")
    if layer_decay is not None and (not is_number(layer_decay) or not 0 < layer_decay <= 1):
        raise ConfigError(
            f"optimizer.layer_decay={layer_decay} must be a number in (0, 1], or null (off); "
            "use e.g. optimizer.layer_decay=0.75."
        )
    if layer_decay is None:
        groups = param_groups(model, weight_decay)
    else:
        groups = layer_decay_groups(model, weight_decay, float(layer_decay), lr)
    if not groups:
        raise ConfigError("the model has no trainable parameters; check lora.rank and lora.head.")
    if implementation not in ("auto", "fused", "foreach", "loop"):
        raise ConfigError(f"optimizer.implementation={implementation} is not known; use auto, fused, foreach or loop.")
    if name == "adamw":
        cls, kwargs = torch.optim.AdamW, {"lr": lr, "betas": tuple(betas), "eps": eps}
    elif name == "sgd":
        cls, kwargs = torch.optim.SGD, {"lr": lr, "momentum": momentum, "nesterov": nesterov and momentum > 0}
    else:
        raise ConfigError(f"optimizer.name={name} is not known; use optimizer=adamw or optimizer=sgd.")
    if implementation == "auto":
        try:
            return cls(groups, fused=True, **kwargs)
        except RuntimeError:  # a device without fused kernels (or torch < 2.4 on CPU)
            return cls(groups, foreach=True, **kwargs)
    impl = {"fused": True} if implementation == "fused" else {"foreach": implementation == "foreach"}
    return cls(groups, **impl, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    steps_per_epoch: int,
    max_epochs: int,
    warmup_epochs: float = 0.0,
    min_lr_ratio: float = 0.0,
    total_steps: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule: linear warmup, then cosine decay to ``min_lr_ratio`` or constant.

    ``total_steps`` (the trainer's plan, e.g. what ``trainer.max_flops`` buys) replaces
    ``steps_per_epoch * max_epochs`` as the length the cosine reaches its floor at.
    """
    total = max(1, total_steps if total_steps is not None else steps_per_epoch * max_epochs)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if name not in ("cosine", "constant"):
        raise ConfigError(f"scheduler.name={name} is not known; use scheduler=cosine or scheduler=constant.")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
