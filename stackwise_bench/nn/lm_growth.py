"""What depth growth (:mod:`stackwise_bench.nn.growth`) needs to know about transformers' causal language models.

Two families grow: GPT-2 (``GPT2LMHeadModel``, blocks in ``transformer.h``) and LLaMA (``LlamaForCausalLM``,
blocks in ``model.layers``). Both keep state outside the block list that a grown list must agree with:

- each attention module's ``layer_idx``, its slot in the KV cache: after a copy the indices read ``[0, 1, 1]``, two
  layers write one cache slot and ``generate(use_cache=True)`` silently differs from ``use_cache=False``;
- the config's depth (``n_layer`` / ``num_hidden_layers``): LLaMA runs only ``layers[:num_hidden_layers]`` (new
  blocks would be skipped), the cache is sized from it, GPT-2's init scales residual projections by it;
- a cloned block's ``config`` attribute, a deep copy that would no longer follow ``model.config`` (the attention
  implementation is read from it at every call);
- transformers' output-capturing hooks (``output_hidden_states``), installed once per model on every block.

:func:`sync_blocks` puts all four back in step after the list changed. Nothing here imports transformers: a model is
recognised by its class's module and ``config.model_type``, so the vision path never pays for the import.
"""

from __future__ import annotations

from torch import nn

from stackwise_bench.errors import ConfigError

LM_FAMILIES = ("gpt2", "llama")
_HOOK = "output_capturing_hook"  # transformers.utils.output_capturing's hook function, reinstalled after growth


def lm_family(model: nn.Module) -> str | None:
    """``gpt2`` or ``llama`` for a model whose blocks can grow; None for a model that is not from transformers.

    Raises:
        ConfigError: A transformers model of another kind (a base model without the LM head, BERT, ...).
    """
    if not type(model).__module__.startswith("transformers."):
        return None
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind == "gpt2" and isinstance(getattr(getattr(model, "transformer", None), "h", None), nn.ModuleList):
        return "gpt2"
    if kind == "llama" and isinstance(getattr(getattr(model, "model", None), "layers", None), nn.ModuleList):
        return "llama"
    raise ConfigError(
        f"model: depth growth supports transformers' GPT2LMHeadModel and LlamaForCausalLM, not {type(model).__name__}; "
        "use e.g. model=gpt_micro or model=llama_micro (the raw model, before any peft wrapper)."
    )


def lm_blocks(model: nn.Module) -> nn.ModuleList:
    """The block list that grows: GPT-2's ``transformer.h``, LLaMA's ``model.layers``."""
    return model.transformer.h if lm_family(model) == "gpt2" else model.model.layers


def branch_ends(family: str, block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The last layer of each residual branch of ``block``: zeroed, the block computes the identity."""
    if family == "gpt2":
        return block.attn.c_proj, block.mlp.c_proj
    return block.self_attn.o_proj, block.mlp.down_proj


def check_growable(model: nn.Module) -> None:
    """Refuse what renumbering cannot keep: a GPT-2 whose attention scale depends on the layer index, mixed layer
    types (sliding and full attention)."""
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise ConfigError(
            "model: a GPT-2 with scale_attn_by_inverse_layer_idx=true cannot grow, since renumbering the layers would "
            "rescale the old blocks' attention; build it with scale_attn_by_inverse_layer_idx=false."
        )
    types = getattr(model.config, "layer_types", None)
    if isinstance(types, list) and len(set(types)) > 1:
        raise ConfigError(
            f"model: a language model with mixed layer_types ({', '.join(sorted(set(types)))}) cannot grow, since "
            "the new layers' types are undefined; build it with one layer type."
        )


def set_depth(model: nn.Module, depth: int) -> None:
    """Write ``depth`` into the config (``n_layer`` for GPT-2, ``num_hidden_layers`` for LLaMA; one attribute)."""
    model.config.num_hidden_layers = depth  # GPT2Config maps num_hidden_layers onto n_layer


def init_block(model: nn.Module, block: nn.Module) -> None:
    """Fresh weights for ``block`` the way its family initialises them (``model._init_weights``, children first as
    ``post_init`` does, so GPT-2's residual projections end at 0.02/sqrt(2 * config depth)), from the global RNG."""
    for p in block.parameters():
        if hasattr(p, "_is_hf_initialized"):  # transformers' init functions skip tensors flagged as loaded
            del p._is_hf_initialized
    for m in block.modules():
        if hasattr(m, "_is_hf_initialized"):
            del m._is_hf_initialized
    block.apply(model._init_weights)


def sync_blocks(model: nn.Module) -> None:
    """After the block list changed: set the config's depth, renumber every layer's KV-cache index, point every
    block's ``config`` at the model's, and let transformers reinstall its output-capturing hooks on the next call."""
    blocks = lm_blocks(model)
    set_depth(model, len(blocks))
    config = model.config
    for index, block in enumerate(blocks):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = index
            if getattr(m, "config", None) is not None and m.config is not config:
                m.config = config
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(set(types)) == 1:  # uniform per-layer types follow the depth
        config.layer_types = types[:1] * len(blocks)
    for m in model.modules():
        for key, hook in list(m._forward_hooks.items()):
            if getattr(hook, "__name__", "") == _HOOK:
                del m._forward_hooks[key]
                m._forward_hooks_with_kwargs.pop(key, None)
                m._forward_hooks_always_called.pop(key, None)
        if getattr(m, "_output_capturing_hooks_installed", False):
            m._output_capturing_hooks_installed = False
