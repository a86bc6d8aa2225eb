"""Depth growth ("depth as time"): grow a model's block stacks in place and say where each new weight came from.

Supported models: timm ``VisionTransformer``s (ViT, DeiT), whose one growing container is ``model.blocks``,
:class:`~stackwise_bench.nn.resnet.CifarResNet`, whose containers are ``stage1..stage3``, and transformers' causal
language models GPT-2 (``transformer.h``) and LLaMA (``model.layers``), whose KV-cache layer indices and config depth
are renumbered after every change (:mod:`stackwise_bench.nn.lm_growth`). A ResNet's depth is its
blocks per stage; every stage grows alike, and block 0 of a stage (the one that may change shape) is never
copied, moved or duplicated: the layouts below apply to the stride-1 blocks after it.

Layouts, for k old blocks ``B0..Bk-1`` (A, B, C, ... below) grown by m = n_new - n_old new ones (primed):

- ``append``: new blocks go on top, next to the head, copying the last m blocks of the old stack repeated as
  often as needed (Gong et al. 2019 stacking): k -> 2k gives ``A B C A' B' C'``; m < k copies the last m in
  order (3 -> 5: ``A B C B' C'``); m > k cycles (2 -> 6: ``A B A' B' A' B'``; 3 -> 7: ``A B C C' A' B' C'``).
- ``prepend``: new blocks go below the old ones, next to the input (in a ResNet stage: right after block 0),
  copying the first m blocks of the repeated stack: 3 -> 5 gives ``A' B' A B C``; 2 -> 6 ``A' B' A' B' A B``.
- ``interleave``: each new block sits right after its source. Every old block gets m // k copies; the
  m % k = r left over go to the blocks at the evenly spaced, centred indices ``(2j+1)*k // (2r)``, j < r:
  2 -> 4 gives ``A A' B B'``; 3 -> 5 ``A A' B C C'`` (blocks 0 and 2); 2 -> 3 ``A B B'``; 4 -> 5 duplicates
  block 2; 2 -> 6 ``A A' A' B B' B'``.

Inits of a new block:

- ``copy``: a deep copy of its source, weights and buffers (BatchNorm running statistics) alike.
- ``identity``: the source's structure with fresh weights (as ``random``), then the last layer of each residual
  branch zeroed, so the network computes the same function at the growth step: a ViT block's ``attn.proj`` and
  ``mlp.fc2`` (weight and bias; a layer scale keeps its init value), a ``BasicBlock``'s ``bn2`` weight and bias
  (its output is then ``relu(x + 0) = x``, as ``x >= 0`` after the previous ReLU), a GPT-2 block's ``attn.c_proj``
  and ``mlp.c_proj``, a LLaMA block's ``self_attn.o_proj`` and ``mlp.down_proj``.
- ``random``: fresh weights the way the family initialises them: a ViT through timm's own init function for
  the model's ``weight_init_mode`` (plus the ``fix_init`` rescale by the new block's index when set); a ResNet
  block with kaiming-normal (fan_out) convs and BatchNorm at weight 1, bias 0, fresh running statistics; a GPT-2 or
  LLaMA block through the model's own ``_init_weights`` at the grown depth (GPT-2's residual projections at
  ``initializer_range / sqrt(2 * new depth)``).

Fresh weights are drawn on the CPU in float32 from a seed taken from ``generator`` (the global RNG when None;
with a generator the global RNG is left untouched), then copied onto the source's device, dtype and memory
format: the same generator seed gives the same weights on any device. In a ResNet stage holding only block 0
there is nothing to copy (``copy`` is refused); identity/random blocks are then built as fresh stride-1
``BasicBlock``s after block 0, with block 0's drop-path rate.

Every new block keeps its source's drop-path rate (ViT ``drop_path1``/``drop_path2``, ``BasicBlock.drop_path``),
so a linearly increasing stochastic-depth schedule is no longer monotonic after growth. New blocks carry no
module hooks and no gradients; they are in their source's train/eval mode and ``requires_grad`` state.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn import lm_growth
from stackwise_bench.nn.bert import encoder_layers, is_bert
from stackwise_bench.nn.resnet import BasicBlock, CifarResNet
from stackwise_bench.nn.stacking import INITS, MODES, Growth, _check_choice, growth_sources
from stackwise_bench.nn.stacking import clone_block as _clone
from stackwise_bench.values import is_int


def _family(model: nn.Module) -> str:
    if isinstance(model, CifarResNet):
        return "resnet"
    is_vit = any(c.__name__ == "VisionTransformer" and c.__module__.startswith("timm.") for c in type(model).__mro__)
    if is_vit and isinstance(getattr(model, "blocks", None), nn.Sequential):
        return "vit"
    if is_bert(model) and type(model).__module__.startswith("transformers."):
        return "bert"  # its growth is nn/bert_growth.py's (post-LayerNorm blocks: another identity init)
    family = lm_growth.lm_family(model)  # gpt2 / llama; None for a model not from transformers
    if family is not None:
        return family
    raise ConfigError(
        f"model: depth growth supports timm VisionTransformer/DeiT models and CifarResNet, not "
        f"{type(model).__name__}; use e.g. model=vit_micro_p4 or model=resnet14 (the raw model, before any wrapper)."
    )


def block_lists(model: nn.Module) -> list[nn.Sequential]:
    """The containers that grow: ``[model.blocks]`` for a timm ViT, ``[stage1, stage2, stage3]`` for CifarResNet,
    ``[transformer.h]`` for GPT-2, ``[model.layers]`` for LLaMA."""
    family = _family(model)
    if family == "vit":
        return [model.blocks]
    if family in lm_growth.LM_FAMILIES:
        return [lm_growth.lm_blocks(model)]
    if family == "bert":
        return [encoder_layers(model)]
    return [model.stage1, model.stage2, model.stage3]


def depth_of(model: nn.Module) -> int:
    """``len(model.blocks)`` for a ViT; blocks per stage for a CifarResNet; the block list's length for an LM."""
    return len(block_lists(model)[0])


def _fixed(model: nn.Module) -> int:
    """Blocks at the bottom of each container that never move or serve as sources (a ResNet stage's block 0)."""
    return 1 if _family(model) == "resnet" else 0


def _check_depth(model: nn.Module, depth) -> None:
    if not is_int(depth) or depth < 1:
        raise ConfigError(f"regime.stacks: depth {depth!r} is not a positive integer; use e.g. regime.stacks=[2,4].")


def truncate(model: nn.Module, depth: int) -> None:
    """Keep the first ``depth`` blocks of each container (the starting stack), in place."""
    _check_depth(model, depth)
    n = depth_of(model)
    if _family(model) == "bert" and depth <= n:
        from stackwise_bench.nn.bert_growth import truncate_bert  # lazy: bert_growth builds on this module

        return truncate_bert(model, depth)
    if depth > n:
        raise ConfigError(
            f"regime.stacks: cannot start {type(model).__name__} at depth {depth}, it has only {n}; "
            f"start at most at {n} (raise the model's depth instead)."
        )
    for container in block_lists(model):
        _replace(container, list(container)[:depth])
    _sync_feature_info(model)
    _sync_lm(model)


def match_depth(model: nn.Module, state: dict) -> None:
    """Truncate ``model`` to the depth a checkpoint's ``state`` dict holds (a depth-as-time ``best.pt`` saved
    before a growth); a no-op for a model that does not grow or a state of its own depth. Block names are
    positional (``blocks.0`` ...), so the shallower model takes the checkpoint's weights as they were."""
    try:
        containers = block_lists(model)
    except ConfigError:
        return
    names = dict(model.named_modules())
    prefix = next(name for name, module in names.items() if module is containers[0]) + "."
    held = {int(k[len(prefix) :].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    if held and max(held) + 1 < depth_of(model):
        truncate(model, max(held) + 1)


def grow(model: nn.Module, depth: int, mode: str, init: str, generator: torch.Generator | None = None) -> Growth:
    """Grow every container of ``model`` in place to ``depth`` blocks.

    Args:
        model: A timm ViT/DeiT, a CifarResNet, a GPT2LMHeadModel or a LlamaForCausalLM (unwrapped: not compiled,
            not DDP, not a peft model).
        depth: The new depth (>= the current one; equal is a no-op).
        mode: ``append``, ``prepend`` or ``interleave``: where the new blocks go.
        init: ``copy``, ``identity`` or ``random``: how they are initialised.
        generator: Draws identity/random weights reproducibly; None uses the global RNG.

    Returns:
        A :class:`Growth`: which new parameters were copied from which, the old -> new names, the new names.

    Raises:
        ConfigError: Unsupported model, unknown mode/init, a smaller depth, or nothing to copy. The model is
            unchanged when it raises.
    """
    family, containers = _family(model), block_lists(model)
    if family == "bert":
        from stackwise_bench.nn.bert_growth import grow_bert  # lazy: bert_growth builds on this module

        return grow_bert(model, depth, mode, init, generator)
    _check_choice(mode, MODES, "regime.building_mode")
    _check_choice(init, INITS, "regime.init")
    _check_depth(model, depth)
    n, fixed, name = depth_of(model), _fixed(model), type(model).__name__
    if depth < n:
        raise ConfigError(
            f"regime.stacks: cannot grow {name} to depth {depth}, it already has {n}; list depths in increasing order."
        )
    if init == "copy" and depth > n and n <= fixed:
        raise ConfigError(
            f"regime.init=copy: {name} has only block 0 per stage, which is never copied; "
            "use regime.init=identity or random, or start from depth 2."
        )
    if family == "vit" and init == "identity" and not all(_branch_ends(b) for b in model.blocks):
        raise ConfigError(
            f"regime.init=identity: the blocks of {name} lack attn.proj or mlp.fc2 to zero; use regime.init=copy."
        )
    if family in lm_growth.LM_FAMILIES:
        lm_growth.check_growable(model)
        lm_growth.set_depth(model, depth)  # first: the family's init reads the depth (GPT-2's residual scale)
    before = {id(p): k for k, p in model.named_parameters()}
    sources: list[tuple[nn.Module, nn.Module]] = []
    for container in containers:
        head, body = list(container)[:fixed], list(container)[fixed:]
        layout = growth_sources(len(body), depth - fixed, mode) if body else [(None, True)] * (depth - n)
        grown = list(head)
        for src, is_new in layout:
            if not is_new:
                grown.append(body[src])
                continue
            block = _clone(body[src]) if src is not None else _plain_block(head[0])
            if init == "copy":
                sources.append((block, body[src]))
            else:
                _reinit(model, family, block, init, len(grown), generator)
            grown.append(block)
        _replace(container, grown)
    _sync_feature_info(model)
    _sync_lm(model)
    after = {id(p): k for k, p in model.named_parameters()}
    copied = {
        after[id(p)]: after[id(s)] for block, src in sources for p, s in zip(block.parameters(), src.parameters())
    }
    return Growth(copied, {k: after[i] for i, k in before.items()}, [k for i, k in after.items() if i not in before])


def _replace(container: nn.Sequential, blocks: list[nn.Module]) -> None:
    """Refill ``container`` (the same object, so references to it stay valid) with ``blocks``, named 0, 1, ..."""
    container._modules.clear()
    for i, block in enumerate(blocks):
        container.add_module(str(i), block)


def _sync_feature_info(model: nn.Module) -> None:
    """timm lists one ``feature_info`` entry per ViT block (``blocks.{i}``); keep it in step with the depth."""
    info = getattr(model, "feature_info", None)
    if _family(model) == "vit" and isinstance(info, list) and info and info[0].get("module") == "blocks.0":
        model.feature_info = [dict(info[0], module=f"blocks.{i}") for i in range(len(model.blocks))]


def _sync_lm(model: nn.Module) -> None:
    """A language model's config depth, KV-cache layer indices, block configs and hooks (nn/lm_growth.py)."""
    if _family(model) in lm_growth.LM_FAMILIES:
        lm_growth.sync_blocks(model)


def _last_layers(family: str, block: nn.Module) -> tuple[nn.Module, ...]:
    """The layers an identity init zeroes: the last of each residual branch (a BasicBlock's ``bn2``)."""
    if family == "vit":
        return block.attn.proj, block.mlp.fc2
    return (block.bn2,) if family == "resnet" else lm_growth.branch_ends(family, block)


def _branch_ends(block: nn.Module) -> bool:
    return isinstance(getattr(getattr(block, "attn", None), "proj", None), nn.Linear) and isinstance(
        getattr(getattr(block, "mlp", None), "fc2", None), nn.Linear
    )


def _plain_block(first: BasicBlock) -> BasicBlock:
    """A stride-1 BasicBlock to follow ``first`` (a stage's block 0), on its device, dtype and memory format."""
    weight = first.conv2.weight
    block = BasicBlock(weight.shape[0], weight.shape[0], 1, first.drop_path).to(weight.device, weight.dtype)
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        block = block.to(memory_format=torch.channels_last)
    return block.train(first.training)


def _reinit(model: nn.Module, family: str, block: nn.Module, init: str, index: int, generator) -> None:
    """Give ``block`` (the new block at ``index`` of its container) fresh weights; zero its branches for identity."""
    device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(2**62, (1,), generator=generator, device=device))
    work = copy.deepcopy(block).float().cpu()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's stays as it was
        if family == "vit":
            from timm.models import named_apply  # lazy: timm costs seconds to import (see nn/models.py)
            from timm.models.vision_transformer import get_init_weights_vit

            named_apply(get_init_weights_vit(getattr(model, "weight_init_mode", "")), work, name=f"blocks.{index}")
            if getattr(model, "fix_init", False):  # timm's rescale of each block's branch outputs by its index
                for layer in (work.attn.proj, work.mlp.fc2):
                    layer.weight.div_(math.sqrt(2.0 * (index + 1)))
        elif family in lm_growth.LM_FAMILIES:
            lm_growth.init_block(model, work)
        else:
            for m in work.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    m.reset_parameters()
        if init == "identity":
            for layer in _last_layers(family, work):
                for p in (layer.weight, layer.bias):
                    if p is not None:
                        p.zero_()
        block.load_state_dict(work.state_dict())  # copies into block's own tensors: its device, dtype, format
