"""Keys no config has: a misspelt ``+trainer.max_epoch=3`` is refused by name, with the closest real key.

Hydra refuses an unknown key given without ``+`` and suggests adding one; with ``+`` it appends the key, and the
target it reaches (the Trainer, a loader) would fail with a ``TypeError`` traceback once the run is built. The keys
that exist are the tables' (``KNOBS`` and ``EXEMPT`` name every leaf of every shipped option,
``tests/test_knobs.py``), so any other leaf is a typo, except where the config forwards what it is given:

* ``model.*``: a timm model's extra keyword arguments (``model.qkv_bias=false``); ``create_model`` refuses the
  ones its model does not take, in one sentence;
* a node of the user's own (``+monitors.mine._target_=my.Monitor``): its keys are its target's.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping

from omegaconf import DictConfig, OmegaConf

from stackwise_bench.knobs.specs import show

FORWARDED = ("model.",)  # keys handed on as keyword arguments, checked by what receives them


def unknown_key(
    cfg: DictConfig | Mapping, known: Mapping | set, targets: Mapping | set, skip: tuple[str, ...] = ("hydra",)
) -> str | None:
    """The refusal of the first leaf of ``cfg`` that is not in ``known``, or None.

    Args:
        targets: The dotted keys of the ``_target_`` leaves of the shipped options: a node whose ``_target_`` is
            elsewhere is the user's own, and its keys are not checked.
        skip: Top-level nodes that are not knobs of this app (``hydra``: Hydra's own).
    """
    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    for key, value in _leaves(tree, "", targets):
        if key in known or key.startswith(FORWARDED) or key.split(".")[0] in skip or _is_node(key, known):
            continue  # _is_node: a config node set to a value (monitors.hardware=null), refused by its own rule
        group = key.rpartition(".")[0]
        where = f"a key of {group}" if group else "a config key"
        close = closest(key, known)
        if close:
            return f"{key}={show(value)} is not {where} (did you mean {close}?); use e.g. {close}={show(value)}."
        return f"{key}={show(value)} is not {where}, and none is close to it; remove it."
    return None


def closest(key: str, known: Mapping | set) -> str | None:
    """The known key nearest to ``key`` (same group first), or None where none is close."""
    group = key.rpartition(".")[0]
    siblings = [k for k in known if k.rpartition(".")[0] == group]
    for pool in (siblings, list(known)):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.75)
        if match:
            return match[0]
    return None


def _leaves(node, prefix: str, targets) -> Iterator[tuple[str, object]]:
    """``(dotted key, value)`` of every leaf; a list is one leaf, a user's own ``_target_`` node is skipped."""
    if not isinstance(node, Mapping):
        yield prefix[:-1], node
        return
    if "_target_" in node and f"{prefix}_target_" not in targets:
        return
    for key, value in node.items():
        yield from _leaves(value, f"{prefix}{key}.", targets)


def _is_node(key: str, known) -> bool:
    return any(k.startswith(f"{key}.") for k in known)
