"""PEFT adapters through peft (LoRA and the methods of :mod:`.peft_methods`), and the parameter counts
every run records.

peft (which pulls in transformers, ~2-4 s) is imported only when rank > 0, so a
full fine-tuning run never pays for it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.peft_methods import FIXES, METHODS, QUANTIZED_METHODS, peft_config
from stackwise_bench.values import is_int, is_number

# Per model family: the layers a PEFT method adapts by default (lora.target_modules=null).
FAMILY_TARGETS = (
    r"blocks\.\d+\.attn\.qkv",  # timm ViT/DeiT: the fused q/k/v projection (d -> 3d)
    r"stage\d+\.\d+\.conv[12]",  # CIFAR ResNet: both 3x3 convs of every BasicBlock
)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.1,
    target_modules: str | Sequence[str] | None = None,
    head: str | None = "head",
    method: str = "lora",
    total_steps: int | None = None,
    model_name: str | None = None,
    **options: dict,
) -> nn.Module:
    """Wrap ``model`` with the adapters of a PEFT ``method`` through peft; ``rank=0`` means full fine-tuning.

    Args:
        model: The classifier; with rank > 0 it is modified in place (peft swaps the target layers).
        rank: The adapter rank r (:data:`~.peft_methods.RANKLESS` methods: any r > 0 switches them on);
            0 returns ``model`` unchanged with every parameter trainable.
        alpha: The scaling numerator; None means 2 * rank (LoRA's alpha / r = 2).
        dropout: Dropout on the adapter's input, in [0, 1), for the methods that have one.
        target_modules: A regex that must match a module's full name (peft's rule for a string), or module
            names (or name suffixes); None: the model family's own (:func:`default_targets`).
        head: The classification head, trained in full next to the adapters; None freezes it.
        method: One of :data:`~.peft_methods.PEFT_METHODS` (qalora/qlora are built by
            :mod:`stackwise_bench.quant.qalora`).
        total_steps: The run's optimizer steps (AdaLoRA's schedule); required for ``method="adalora"``.
        model_name: For messages.
        options: Every method's own section of ``conf/lora/default.yaml`` (``adalora={...}``, ...); only
            ``options[method]`` is read.

    Returns:
        A ``peft.PeftModel`` (rank > 0): ``forward(x)`` and ``state_dict`` work as on the model itself.
        The trainer resumes by rebuilding model + ``apply_lora`` and loading the state_dict, so the
        wrapper's ``base_model.model.`` key prefix is stable across runs with the same config.

    Raises:
        ConfigError: Invalid rank/alpha/dropout/method, target/head names the model does not have, or a
            method peft cannot build on this model.
    """
    _validate(rank, alpha, dropout)
    if method not in METHODS:
        raise ConfigError(f"lora.method={method} is not known; use one of {', '.join(METHODS)}.")
    if rank == 0:
        return model
    if method in QUANTIZED_METHODS:
        raise ValueError(f"lora.method={method} is built by stackwise_bench.quant.qalora, not peft")
    targets = resolve_targets(model, target_modules)
    check_head(model, head)
    from peft import get_peft_model  # lazy on purpose, see the module docstring

    if method == "oft":
        _check_oft_blocks(model, targets, (options.get("oft") or {}).get("block_size", 8))
    alpha = alpha if alpha is not None else 2 * rank
    config = peft_config(method, rank, alpha, dropout, targets, head, dict(options.get(method) or {}), total_steps)
    try:
        return get_peft_model(model, config)
    except Exception as exc:  # peft's own words say what it could not adapt
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        fix = FIXES.get(method, "use lora.method=lora, or set lora.target_modules to layers this method adapts")
        raise ConfigError(
            f"lora.method={method} cannot be built on {model_name or type(model).__name__} with "
            f"lora.target_modules={targets!r} (peft: {reason}); {fix}."
        ) from exc


def _check_oft_blocks(model: nn.Module, targets, block_size: int) -> None:
    """OFT rotates each layer's input in blocks of ``block_size``; peft would silently pick another size."""
    sizes = {}
    for name in adapted_layers(model, targets):
        layer = model.get_submodule(name)
        weight = getattr(layer, "weight", None)
        if weight is not None and weight.ndim >= 2:
            sizes[name] = weight[0].numel()  # Linear: in_features; Conv: in_channels * kernel area
    bad = {n: size for n, size in sizes.items() if size % block_size}
    if bad:
        name, size = next(iter(bad.items()))
        divisors = [d for d in range(2, block_size + 1) if all(v % d == 0 for v in sizes.values())]
        hint = f"e.g. lora.oft.block_size={divisors[-1]}" if divisors else "another lora.method"
        raise ConfigError(
            f"lora.oft.block_size={block_size} does not divide the input size {size} of {name} (OFT rotates each "
            f"layer's input in blocks of that size); use a divisor of every adapted layer's input size, {hint}."
        )


def default_targets(model: nn.Module) -> str | None:
    """The adapted layers of a model family, as a regex that cannot hit a patch-embedding conv.

    ViT/DeiT: the fused attention projection ``blocks.<i>.attn.qkv`` (a bare ``proj`` would also match
    ``patch_embed.proj``, a Conv2d). CIFAR ResNet: the two 3x3 convs of every block. None: unknown family.
    """
    names = {n for n, _ in model.named_modules()}
    for pattern in FAMILY_TARGETS:
        if any(re.fullmatch(pattern, n) for n in names):
            return pattern
    return None


def resolve_targets(model: nn.Module, target_modules) -> str | list[str]:
    """The configured targets (a regex or names), or the family's; refused when they match nothing."""
    if target_modules is None:
        targets = default_targets(model)
        if targets is None:
            raise ConfigError(
                f"lora.target_modules=null has no default for {type(model).__name__}; it has: "
                f"{', '.join(_layer_names(model))}; set lora.target_modules to some of these or lora.rank=0."
            )
        return targets
    targets = target_modules if isinstance(target_modules, str) else [str(t) for t in target_modules]
    if not adapted_layers(model, targets):
        shown = targets if isinstance(targets, str) else list(targets)
        raise ConfigError(
            f"lora.target_modules={shown} matches no module of this model; it has: "
            f"{', '.join(_layer_names(model))}; set lora.target_modules to some of these or lora.rank=0."
        )
    return targets


def adapted_layers(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names of the modules ``targets`` selects, by peft's rules (a str: full regex match; a list: name or tail)."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n)]
    return [n for n in names if any(_matches(n, t) for t in targets)]


def check_head(model: nn.Module, head: str | None) -> None:
    if head is not None and not any(_matches(n, head) for n, _ in model.named_modules() if n):
        raise ConfigError(
            f"lora.head={head} names no module of this model; it has: {', '.join(_layer_names(model))}; "
            "set lora.head to the classifier's name or null."
        )


def _validate(rank, alpha, dropout) -> None:
    if not is_int(rank) or rank < 0:
        raise ConfigError(
            f"lora.rank={rank} must be a non-negative integer (0 = full fine-tuning); use e.g. lora.rank=8."
        )
    if alpha is not None and (not is_number(alpha) or not alpha > 0):
        raise ConfigError(
            f"lora.alpha={alpha} must be a positive number or null (null = 2 * rank); use e.g. lora.alpha=16."
        )
    if not is_number(dropout) or not 0 <= dropout < 1:
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


def count_parameters(model: nn.Module, head: str | None = "head") -> dict:
    """Parameter counts and in-memory size.

    Returns:
        ``total`` and ``trainable`` parameters; ``adapter``: the trainable ones outside the head ``head``
        (0 when every parameter trains: full fine-tuning); ``lora`` (elements of tensors named ``lora_*``);
        ``size_mb`` (bytes of all parameters and buffers / 2**20).
    """
    params = list(model.named_parameters())
    tensors = [p for _, p in params] + list(model.buffers())
    trainable = [(n, p) for n, p in params if p.requires_grad]
    adapted = len(trainable) < len(params)
    return {
        "total": sum(p.numel() for _, p in params),
        "trainable": sum(p.numel() for _, p in trainable),
        "adapter": sum(p.numel() for n, p in trainable if head not in n.split(".")) if adapted else 0,
        "lora": sum(p.numel() for n, p in params if "lora_" in n),
        "size_mb": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
    }
