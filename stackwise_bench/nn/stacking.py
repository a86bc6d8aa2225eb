"""What every depth growth shares (image models, decoders, encoders): the modes and inits, the layout of a grown
stack, what a growth did, and a hook-free copy of a block. Its own module so that the family-specific growths
(:mod:`.growth`, :mod:`.bert_growth`) build on it without importing each other."""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field

from torch import nn

from stackwise_bench.errors import ConfigError

MODES = ("append", "prepend", "interleave")
INITS = ("copy", "identity", "random")


@dataclass(frozen=True)
class Growth:
    """What :func:`grow` did, in ``model.named_parameters()`` names.

    Attributes:
        copied: ``{new parameter: source parameter}``, both names after growth, for every parameter of a block
            made with ``init=copy`` (its optimizer state can be copied from the source's); empty otherwise.
        renamed: ``{name before growth: name after growth}`` for every parameter that existed before growth,
            unchanged names included (a total map: remap the optimizer state / any name-keyed table through it).
        new: names of the new blocks' parameters, in model order (the ones to add to the optimizer).
    """

    copied: dict[str, str] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)


def growth_sources(n_old: int, n_new: int, mode: str) -> list[tuple[int, bool]]:
    """The grown stack as ``(source_index, is_new)`` per block, bottom to top (layouts: module docstring).

    An old block appears once as ``(i, False)``; a new block as ``(i, True)`` where ``i`` is the old block it
    is made from. ``n_old >= 1``; ``n_new >= n_old``.
    """
    _check_choice(mode, MODES, "regime.building_mode")
    if n_old < 1 or n_new < n_old:
        raise ConfigError(
            f"regime.stacks: cannot grow {n_old} blocks to {n_new}; start from 1 block or more and do not shrink."
        )
    k, m = n_old, n_new - n_old
    old = [(i, False) for i in range(k)]
    if mode == "append":
        return old + [((k - m + j) % k, True) for j in range(m)]
    if mode == "prepend":
        return [(j % k, True) for j in range(m)] + old
    q, r = divmod(m, k)
    extra = {(2 * j + 1) * k // (2 * r) for j in range(r)}
    return [e for i in range(k) for e in [(i, False)] + [(i, True)] * (q + (i in extra))]


def _check_choice(value, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value} is not one of {', '.join(choices)}; use e.g. {key}={choices[0]}.")


def clone_block(block: nn.Module) -> nn.Module:
    """A deep copy of ``block`` without its module hooks (they belong to the source) and without gradients."""
    memo = {
        id(v): OrderedDict()
        for m in block.modules()
        for k, v in vars(m).items()
        if "hooks" in k and isinstance(v, dict)
    }
    new = copy.deepcopy(block, memo)
    for p in new.parameters():
        p.grad = None
    return new
