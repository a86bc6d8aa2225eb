"""Depth growth of a BERT encoder (``bert.encoder.layer``), with the modes and inits of :mod:`.growth`.

The layouts (``append``, ``prepend``, ``interleave``) are :func:`~stackwise_bench.nn.growth.growth_sources`'s and
the result is the same :class:`~stackwise_bench.nn.growth.Growth` record, so a regime treats both alike. The inits:

- ``copy``: a deep copy of the source block (progressive stacking of BERT, Gong et al. 2019, is ``append`` +
  ``copy`` from depth k to 2k).
- ``random``: fresh weights through the model's own ``_init_weights`` (N(0, 0.02), LayerNorm at 1 and 0).
- ``identity``: as ``random``, then the last layer of each residual branch (``attention.output.dense`` and
  ``output.dense``, weight and bias) zeroed. BERT is post-LayerNorm: a new block then computes
  ``LN(LN(x + 0) + 0)``, i.e. it *standardises* its input (per token, to mean 0 and variance 1, LayerNorm eps
  1e-12) instead of passing it on. That is the identity exactly when the input is already standardised: the block
  below ends in a LayerNorm, so whenever that LayerNorm's weight is 1 and bias 0 (every freshly built BERT) the
  function is unchanged. After training has moved those affine parameters it is close to, not exactly, the
  identity: no zeroing of a post-LN block can undo the LayerNorm that follows its residual sum.

After every change the config's depth, each attention module's ``layer_idx`` and ``config`` and transformers'
output-capturing hooks are put back in step, as :func:`~stackwise_bench.nn.lm_growth.sync_blocks` does for decoders.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn import lm_growth
from stackwise_bench.nn.bert import encoder_layers
from stackwise_bench.nn.stacking import INITS, MODES, Growth, growth_sources
from stackwise_bench.nn.stacking import clone_block as _clone
from stackwise_bench.values import is_int


def branch_ends(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The last layer of each residual branch of a ``BertLayer``: the attention's output and the feed-forward's."""
    return block.attention.output.dense, block.output.dense


def grow_bert(model: nn.Module, depth: int, mode: str, init: str, generator: torch.Generator | None = None) -> Growth:
    """Grow ``model``'s encoder (a raw ``BertForMaskedLM`` / ``BertForSequenceClassification``) in place to ``depth``.

    Args:
        model: The BERT to grow (not a peft wrapper, not compiled).
        depth: The new number of blocks (>= the current one; equal is a no-op).
        mode: ``append``, ``prepend`` or ``interleave``: where the new blocks go.
        init: ``copy``, ``identity`` or ``random`` (module docstring).
        generator: Draws fresh weights reproducibly; None uses the global RNG (which a generator leaves untouched).

    Returns:
        The :class:`~stackwise_bench.nn.growth.Growth`: copied parameters, old -> new names, new names.

    Raises:
        ConfigError: Not a BERT, an unknown mode or init, or a smaller depth; the model is then unchanged.
    """
    layers = encoder_layers(model)
    for value, choices, key in ((mode, MODES, "regime.building_mode"), (init, INITS, "regime.init")):
        if value not in choices:
            raise ConfigError(f"{key}={value} is not one of {', '.join(choices)}; use e.g. {key}={choices[0]}.")
    n = len(layers)
    if not is_int(depth) or depth < n:
        raise ConfigError(
            f"regime.stacks: cannot grow {type(model).__name__} from {n} blocks to {depth!r}; list increasing depths."
        )
    model.config.num_hidden_layers = depth  # first: the init may read the depth
    before = {id(p): k for k, p in model.named_parameters()}
    old, grown, sources = list(layers), [], []
    for src, is_new in growth_sources(n, depth, mode):
        if not is_new:
            grown.append(old[src])
            continue
        block = _clone(old[src])
        if init == "copy":
            sources.append((block, old[src]))
        else:
            _reinit(model, block, init, generator)
        grown.append(block)
    _refill(layers, grown)
    sync_layers(model)
    after = {id(p): k for k, p in model.named_parameters()}
    copied = {
        after[id(p)]: after[id(s)] for block, src in sources for p, s in zip(block.parameters(), src.parameters())
    }
    return Growth(copied, {k: after[i] for i, k in before.items()}, [k for i, k in after.items() if i not in before])


def truncate_bert(model: nn.Module, depth: int) -> None:
    """Keep the first ``depth`` encoder blocks (the starting stack of a depth-as-time run), in place."""
    layers = encoder_layers(model)
    if not is_int(depth) or not 1 <= depth <= len(layers):
        raise ConfigError(
            f"regime.stacks: cannot start {type(model).__name__} at depth {depth!r}; use 1 to {len(layers)} blocks."
        )
    _refill(layers, list(layers)[:depth])
    sync_layers(model)


def sync_layers(model: nn.Module) -> None:
    """After the block list changed: the config's depth, every block's ``layer_idx`` and ``config``, and the
    output-capturing hooks transformers installs once per model (reinstalled on the next call)."""
    layers = encoder_layers(model)
    config = model.config
    config.num_hidden_layers = len(layers)
    for index, block in enumerate(layers):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = index
            if getattr(m, "config", None) is not None and m.config is not config:
                m.config = config
    for m in model.modules():
        for key, hook in list(m._forward_hooks.items()):
            if getattr(hook, "__name__", "") == lm_growth._HOOK:
                del m._forward_hooks[key]
                m._forward_hooks_with_kwargs.pop(key, None)
                m._forward_hooks_always_called.pop(key, None)
        if getattr(m, "_output_capturing_hooks_installed", False):
            m._output_capturing_hooks_installed = False


def _refill(layers: nn.ModuleList, blocks: list[nn.Module]) -> None:
    """Refill the same ModuleList object (references to it stay valid), named 0, 1, ..."""
    layers._modules.clear()
    for i, block in enumerate(blocks):
        layers.add_module(str(i), block)


def _reinit(model: nn.Module, block: nn.Module, init: str, generator) -> None:
    """Fresh weights for ``block`` drawn on the CPU in float32 from a seed taken from ``generator`` (the same seed
    gives the same weights on any device); the branch ends zeroed for ``identity``."""
    device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(2**62, (1,), generator=generator, device=device))
    work = copy.deepcopy(block).float().cpu()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.default_generator.manual_seed(seed)
        lm_growth.init_block(model, work)
        if init == "identity":
            for layer in branch_ends(work):
                layer.weight.zero_()
                layer.bias.zero_()
        block.load_state_dict(work.state_dict())  # into block's own tensors: its device and dtype
