"""LoRA through peft, and the parameter counts every run records.

peft (which pulls in transformers, ~2-4 s) is imported only when rank > 0, so a
full fine-tuning run never pays for it.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence

from torch import nn

from stackwise_bench.errors import ConfigError


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.1,
    target_modules: Sequence[str] = ("qkv",),
    head: str | None = "head",
) -> nn.Module:
    """Wrap ``model`` with LoRA adapters; ``rank=0`` means full fine-tuning.

    Args:
        model: The classifier; with rank > 0 it is modified in place (peft swaps the target layers).
        rank: LoRA rank r; 0 returns ``model`` unchanged with every parameter trainable.
        alpha: LoRA alpha; None means 2 * rank (scaling alpha / r = 2).
        dropout: Dropout on the LoRA branch input, in [0, 1).
        target_modules: Module names (or name suffixes, as peft matches them) that get adapters.
        head: The classification head, trained in full next to the adapters; None freezes it.

    Returns:
        A ``peft.PeftModel`` (rank > 0): ``forward(x)`` and ``state_dict`` work as on the model itself.
        The trainer resumes by rebuilding model + ``apply_lora`` and loading the state_dict, so the
        wrapper's ``base_model.model.`` key prefix is stable across runs with the same rank.

    Raises:
        ConfigError: Invalid rank/alpha/dropout, or target/head names the model does not have.
    """
    _validate(rank, alpha, dropout)
    if rank == 0:
        return model
    targets = [target_modules] if isinstance(target_modules, str) else [str(t) for t in target_modules]
    names = [n for n, _ in model.named_modules() if n]
    if not targets or not any(_matches(n, t) for n in names for t in targets):
        raise ConfigError(
            f"lora.target_modules={targets} matches no module of this model; it has: "
            f"{', '.join(_layer_names(model))}; set lora.target_modules to some of these or lora.rank=0."
        )
    if head is not None and not any(_matches(n, head) for n in names):
        raise ConfigError(
            f"lora.head={head} names no module of this model; it has: {', '.join(_layer_names(model))}; "
            "set lora.head to the classifier's name or null."
        )

    from peft import LoraConfig, get_peft_model  # lazy on purpose, see the module docstring

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=[head] if head is not None else None,
    )
    return get_peft_model(model, config)


def _validate(rank, alpha, dropout) -> None:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
        raise ConfigError(
            f"lora.rank={rank} must be a non-negative integer (0 = full fine-tuning); use e.g. lora.rank=8."
        )
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0):
        raise ConfigError(
            f"lora.alpha={alpha} must be a positive number or null (null = 2 * rank); use e.g. lora.alpha=16."
        )
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ConfigError(f"lora.dropout={dropout} must be a number in [0, 1); use e.g. lora.dropout=0.1.")


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of names: the full name, or its tail after a dot.
    return name == target or name.endswith("." + target)


def _layer_names(model: nn.Module, limit: int = 16) -> list[str]:
    """Linear/Conv layer names, shortened to distinct suffixes when there are many (e.g. 12 ViT blocks)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    if len(names) <= limit:
        return names
    # Last component, or last two where the last is an index (downsample.0): still valid peft targets.
    short = [".".join(n.split(".")[-2:]) if re.fullmatch(r"\d+", n.split(".")[-1]) else n.split(".")[-1] for n in names]
    return list(dict.fromkeys(short))


def count_parameters(model: nn.Module) -> dict:
    """Parameter counts and in-memory size.

    Returns:
        ``total`` and ``trainable`` parameters, ``lora`` (elements of tensors named ``lora_*``),
        ``size_mb`` (bytes of all parameters and buffers / 2**20).
    """
    params = list(model.named_parameters())
    tensors = [p for _, p in params] + list(model.buffers())
    return {
        "total": sum(p.numel() for _, p in params),
        "trainable": sum(p.numel() for _, p in params if p.requires_grad),
        "lora": sum(p.numel() for n, p in params if "lora_" in n),
        "size_mb": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
    }
