"""Depth growth of GPT-2 and LLaMA (stackwise_bench.nn.growth with nn.lm_growth): the function kept by identity init,
every block run after a copy, the KV cache's layer indices renumbered, the config depth, reproducible fresh blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.causal_lm import build_causal_lm
from stackwise_bench.nn.growth import MODES, block_lists, depth_of, grow, match_depth, truncate

transformers = pytest.importorskip("transformers")

FAMILIES = ("gpt2", "llama")
VOCAB = 61


def lm(family: str, n_layer: int = 2, seed: int = 0, n_embd: int = 32, **kwargs) -> nn.Module:
    """A tiny model in eval mode with non-trivial norms and biases (so copies and zeroed branches are tested)."""
    torch.manual_seed(seed)
    model = build_causal_lm(family, n_layer, n_embd, 4, VOCAB, 32, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def tokens(n: int = 10, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(1))


def layer_indices(model: nn.Module) -> list[int]:
    return [m.layer_idx for m in model.modules() if type(m).__name__.endswith("Attention")]


def config_depth(model: nn.Module) -> int:
    key = "n_layer" if model.config.model_type == "gpt2" else "num_hidden_layers"
    return getattr(model.config, key)


def greedy(model: nn.Module, use_cache: bool):
    out = model.generate(
        tokens(4, 1), max_new_tokens=12, do_sample=False, use_cache=use_cache, pad_token_id=0,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_growth_keeps_the_logits(family, mode):
    model = lm(family)
    before = model(tokens()).logits
    growth = grow(model, 5, mode, "identity", torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(tokens()).logits, before)
    assert depth_of(model) == config_depth(model) == 5 and layer_indices(model) == [0, 1, 2, 3, 4]
    prefix = "transformer.h." if family == "gpt2" else "model.layers."
    assert growth.new and all(k.startswith(prefix) for k in growth.new)
    assert sum(p.numel() for p in block_lists(model)[0][0].parameters()) * 3 == sum(
        dict(model.named_parameters())[k].numel() for k in growth.new
    )
    model.train()
    model(tokens(), labels=tokens()).loss.backward()  # the zeroed projections still learn
    ends = ("attn.c_proj.weight", "mlp.c_proj.weight") if family == "gpt2" else ("o_proj.weight", "down_proj.weight")
    zeroed = [p for k, p in model.named_parameters() if k in growth.new and k.endswith(ends)]
    assert len(zeroed) == 6 and all(not p.any() and p.grad.abs().sum() > 0 for p in zeroed)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_copy_growth_runs_every_block_as_a_model_built_at_that_depth(family, mode):
    """LLaMA runs only layers[:num_hidden_layers]: without the config's depth the copies would be skipped."""
    model = lm(family)
    before = model(tokens(), output_hidden_states=True).logits  # installs transformers' output hooks
    growth = grow(model, 4, mode, "copy")
    built = lm(family, n_layer=4, seed=1)
    built.load_state_dict(model.state_dict())
    after = model(tokens(), output_hidden_states=True)
    torch.testing.assert_close(after.logits, built(tokens()).logits)
    assert not torch.allclose(after.logits, before, atol=1e-3)
    assert len(after.hidden_states) == 5  # transformers' output hooks reach the new blocks too
    params = dict(model.named_parameters())
    assert growth.copied and all(torch.equal(params[new], params[src]) for new, src in growth.copied.items())
    assert all(m.config is model.config for m in model.modules() if hasattr(m, "layer_idx"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_is_the_same_with_and_without_the_kv_cache_after_growth(family, mode):
    model = lm(family)
    grow(model, 5, mode, "copy")
    assert layer_indices(model) == [0, 1, 2, 3, 4] and config_depth(model) == 5
    cached, cached_logits = greedy(model, use_cache=True)
    plain, plain_logits = greedy(model, use_cache=False)
    assert torch.equal(cached, plain)
    torch.testing.assert_close(cached_logits, plain_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_trap_a_naive_copy_breaks_the_cache(family):
    """The check above can fail: appending a copy without renumbering leaves indices [0, 1, 1] and two layers
    writing one cache slot, and cached generation departs from the uncached one."""
    model = lm(family)
    blocks = block_lists(model)[0]
    blocks.append(copy.deepcopy(blocks[-1]))
    model.config.num_hidden_layers = 3
    assert layer_indices(model) == [0, 1, 1]
    cached_logits, plain_logits = greedy(model, use_cache=True)[1], greedy(model, use_cache=False)[1]
    assert not torch.allclose(cached_logits, plain_logits, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_init_is_the_familys_and_reproducible_from_the_generator(family):
    models = [lm(family, n_embd=128) for _ in range(3)]
    state = torch.get_rng_state()
    for model, seed in zip(models, (7, 7, 8)):
        grow(model, 8, "append", "random", torch.Generator().manual_seed(seed))
    assert torch.equal(torch.get_rng_state(), state)  # a generator leaves the global RNG alone
    same, other = (m.state_dict() for m in models[1:])
    assert all(torch.equal(v, same[k]) for k, v in models[0].state_dict().items())
    assert not torch.equal(models[0].state_dict()[_key(family, 5)], other[_key(family, 5)])
    new = block_lists(models[0])[0][5]
    if family == "gpt2":  # GPT-2's scheme at the grown depth: residual projections at 0.02 / sqrt(2 * 8)
        assert new.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert new.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
        assert not new.attn.c_attn.bias.any() and torch.equal(new.ln_1.weight, torch.ones(128))
    else:
        assert new.self_attn.o_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert new.mlp.down_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.equal(new.input_layernorm.weight, torch.ones(128))


def _key(family: str, block: int) -> str:
    return (
        f"transformer.h.{block}.attn.c_attn.weight" if family == "gpt2" else f"model.layers.{block}.mlp.up_proj.weight"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_truncate_and_match_depth_renumber_too(family):
    model = lm(family, n_layer=4)
    truncate(model, 2)
    assert depth_of(model) == config_depth(model) == 2 and layer_indices(model) == [0, 1]
    shallow = lm(family, n_layer=2, seed=1)
    shallow.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(tokens()).logits, shallow(tokens()).logits)
    grown = lm(family, n_layer=4)
    match_depth(grown, shallow.state_dict())
    assert depth_of(grown) == config_depth(grown) == 2 and layer_indices(grown) == [0, 1]
    assert torch.equal(greedy(grown, True)[0], greedy(grown, False)[0])


def test_refusals_leave_the_model_as_it_was():
    model = lm("gpt2")
    model.config.scale_attn_by_inverse_layer_idx = True
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        grow(model, 4, "append", "copy")
    assert str(err.value) == (
        "model: a GPT-2 with scale_attn_by_inverse_layer_idx=true cannot grow, since renumbering the layers would "
        "rescale the old blocks' attention; build it with scale_attn_by_inverse_layer_idx=false."
    )
    assert depth_of(model) == config_depth(model) == 2 and model.state_dict().keys() == state.keys()
    base = transformers.GPT2Model(model.config)
    with pytest.raises(ConfigError) as err:
        depth_of(base)
    assert str(err.value) == (
        "model: depth growth supports transformers' GPT2LMHeadModel and LlamaForCausalLM, not GPT2Model; "
        "use e.g. model=gpt_micro or model=llama_micro (the raw model, before any peft wrapper)."
    )
