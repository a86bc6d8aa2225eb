"""Which modules of a classifier are its head: what FP8 training and FP8 quantization both leave alone."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

HEAD_NAMES = ("head", "head_dist")  # timm's classifier names (DeiT's distilled variant has two)


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """The classifier's module name(s): timm's ``pretrained_cfg["classifier"]``, else :data:`HEAD_NAMES`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # through peft's wrapper
    classifier = (getattr(inner, "pretrained_cfg", None) or {}).get("classifier")
    if classifier is None:
        return HEAD_NAMES
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def is_head(name: str, head: str | Sequence[str]) -> bool:
    """Whether module ``name`` is, or sits inside, a classifier named in ``head``.

    Whole dotted components only: ``head`` matches ``base_model.model.head.modules_to_save.default``
    (peft's trained copy), not ``heads`` or ``pre_head``.
    """
    heads = (head,) if isinstance(head, str) else head
    return any(f".{h}." in f".{name}." for h in heads)
