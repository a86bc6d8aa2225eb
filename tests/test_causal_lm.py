"""Causal language models (stackwise_bench.nn.causal_lm): sizes, options, loading, LoRA targets, FLOPs per token."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.causal_lm import (
    GPT2_VOCAB,
    SIZES,
    build_causal_lm,
    build_named,
    flops_per_token,
    load_causal_lm,
    lora_targets,
)

transformers = pytest.importorskip("transformers")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize(
    "name, count",
    [("gpt2_small", 124_439_808), ("gpt2_medium", 354_823_168), ("gpt2_large", 774_030_080)],
)
def test_gpt2_sizes_have_the_published_parameter_counts(name, count):
    model = build_named(name, device="meta")
    assert n_params(model) == count
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.n_positions == 1024 and model.config.vocab_size == GPT2_VOCAB
    assert model.config.eos_token_id == GPT2_VOCAB - 1  # <|endoftext|>
    # nanoGPT's 123.69M for small: the same count less the position embeddings
    assert name != "gpt2_small" or n_params(model) - 1024 * 768 == 123_653_376


@pytest.mark.parametrize("name", sorted(SIZES))
def test_every_size_builds_tied_with_sdpa(name):
    size = SIZES[name]
    model = build_named(name, vocab_size=256, device="meta")
    cls = transformers.GPT2LMHeadModel if size["family"] == "gpt2" else transformers.LlamaForCausalLM
    assert type(model) is cls and model.config._attn_implementation == "sdpa"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.num_hidden_layers == size["n_layer"] and model.config.hidden_size == size["n_embd"]
    assert model.config.num_attention_heads == size["n_head"]
    context = model.config.n_positions if size["family"] == "gpt2" else model.config.max_position_embeddings
    assert context == size["context"]


def test_gpt_micro_is_nanogpts_cpu_recipe():
    assert SIZES["gpt_micro"] == {"family": "gpt2", "n_layer": 4, "n_embd": 128, "n_head": 4, "context": 64}


def test_nanogpt_alignment():
    torch.manual_seed(0)
    model = build_named("gpt_micro", vocab_size=256, nanogpt=True)
    config = model.config
    assert config.activation_function == "gelu"  # exact GELU, not GPT-2's tanh form
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.0, 0.0, 0.0)
    assert config.layer_norm_epsilon == 1e-5 and config.initializer_range == 0.02
    block = model.transformer.h[0]
    assert all(m.bias is not None for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj))
    residual = 0.02 / math.sqrt(2 * 4)
    for layer, std in ((block.attn.c_attn, 0.02), (block.mlp.c_fc, 0.02), (block.attn.c_proj, residual)):
        assert layer.weight.std().item() == pytest.approx(std, rel=0.05)
        assert not layer.bias.any()
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    x = torch.linspace(-3, 3, 61)
    torch.testing.assert_close(block.mlp.act(x), nn.functional.gelu(x))
    assert build_named("gpt_micro", vocab_size=256, device="meta").config.activation_function == "gelu_new"


def test_llama_options():
    model = build_causal_lm("llama", 2, 64, 4, 100, 32, n_kv_head=2, rope_theta=500000.0, device="meta")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.k_proj.out_features == 2 * 16 and attn.q_proj.out_features == 64  # grouped-query attention
    assert mlp.gate_proj.out_features == 256  # LLaMA's rule: 2/3 of 4 * 64 = 170, rounded up to 256
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    assert model.config.rms_norm_eps == 1e-5 and model.config.tie_word_embeddings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"family": "bert"},
            "model.family=bert is not a language-model family; use one of gpt2, llama.",
        ),
        (
            {"n_layer": 0},
            "model.n_layer=0 must be a positive integer; use e.g. model.n_layer=4.",
        ),
        (
            {"n_head": 3},
            "model.n_embd=64 is not a multiple of model.n_head=3; pick a width that the heads divide.",
        ),
        (
            {"vocab_size": 1},
            "model.vocab_size=1 must be an integer of 2 or more; take it from the tokenizer.",
        ),
        (
            {"dropout": 1.0},
            "model.dropout=1.0 must be in [0, 1); use e.g. model.dropout=0.0.",
        ),
        (
            {"nanogpt": True, "dropout": 0.1},
            "model.nanogpt=true fixes model.activation=gelu, model.dropout=0, model.norm_eps=1e-5 and "
            "model.init_std=0.02; drop those overrides or set model.nanogpt=false.",
        ),
        (
            {"nanogpt": True, "activation": "relu"},
            "model.nanogpt=true fixes model.activation=gelu, model.dropout=0, model.norm_eps=1e-5 and "
            "model.init_std=0.02; drop those overrides or set model.nanogpt=false.",
        ),
        (
            {"eos_token_id": 64},
            "model.eos_token_id=64 is not a token of the 64-token vocabulary; take it from the tokenizer or set it "
            "to null.",
        ),
        (
            {"family": "llama", "nanogpt": True},
            "model.nanogpt and model.activation apply to family=gpt2 only; drop them for family=llama.",
        ),
        (
            {"family": "llama", "n_kv_head": 3},
            "model.n_kv_head=3 must divide model.n_head=4; use e.g. model.n_kv_head=4.",
        ),
        (
            {"family": "llama", "n_embd": 36},
            "model.n_embd=36 over model.n_head=4 gives an odd head width, which rotary positions cannot split in "
            "pairs; pick an even n_embd / n_head.",
        ),
    ],
    ids=[
        "family",
        "depth",
        "heads",
        "vocab",
        "dropout",
        "nanogpt_dropout",
        "nanogpt_activation",
        "eos",
        "nanogpt_llama",
        "kv_heads",
        "odd_rope",
    ],  # fmt: skip
)
def test_refusals(kwargs, message):
    args = {"family": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 64, "context": 16}
    with pytest.raises(ConfigError) as err:
        build_causal_lm(**(args | kwargs), device="meta")
    assert str(err.value) == message


def test_unknown_size_is_refused():
    with pytest.raises(ConfigError, match=r"^model.name=gpt9 is not a language-model size; use one of gpt_micro, "):
        build_named("gpt9")


@pytest.mark.parametrize("name", ["gpt_micro", "llama_micro"])
def test_a_local_save_pretrained_folder_round_trips(name, tmp_path):
    torch.manual_seed(0)
    model = build_named(name, vocab_size=64, n_layer=2)
    model.save_pretrained(tmp_path)
    loaded = build_named(name, vocab_size=64, n_layer=2, checkpoint_path=tmp_path)
    assert type(loaded) is type(model) and loaded.training and loaded.config._attn_implementation == "sdpa"
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert next(loaded.parameters()).dtype == torch.float32
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.eval()(x).logits, model.eval()(x).logits, rtol=0, atol=0)
    assert load_causal_lm(str(tmp_path)).state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ConfigError) as err:
        build_named(name, vocab_size=256, n_layer=2, checkpoint_path=tmp_path)
    assert str(err.value) == (
        f"model.checkpoint_path={tmp_path} holds a model with vocab_size=64, not model.vocab_size=256; set those "
        "keys to the saved values or point it at a matching folder."
    )


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2"])
def test_a_hub_name_is_refused_with_how_to_point_at_a_local_copy(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # so no folder of that name can exist
    with pytest.raises(ConfigError) as err:
        build_named("gpt2_small", checkpoint_path=name)
    assert str(err.value) == (
        f"model.checkpoint_path={name} is not a local folder and hub models are never downloaded (runs are "
        f"offline); download it where there is network (`hf download {name} --local-dir DIR`, or "
        "save_pretrained(DIR)), copy DIR here and set model.checkpoint_path=DIR."
    )


def test_folders_that_are_not_checkpoints_are_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_causal_lm(tmp_path / "missing" / "dir")
    assert str(err.value) == (
        f"model.checkpoint_path={tmp_path / 'missing' / 'dir'} is not a folder; point it at a folder written by "
        "save_pretrained."
    )
    with pytest.raises(ConfigError) as err:
        load_causal_lm(tmp_path)
    assert str(err.value) == (
        f"model.checkpoint_path={tmp_path} holds no config.json; point it at a folder written by save_pretrained."
    )
    transformers.BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_causal_lm(tmp_path)
    assert str(err.value) == (
        f"model.checkpoint_path={tmp_path} holds a BERT encoder, which has no causal language-model head to train, "
        "sample or export as one; train it with model=bert_micro (or bert_tiny, bert_base, bert_large)."
    )


@pytest.mark.parametrize("name, targets", [("gpt_micro", ["c_attn"]), ("llama_micro", ["q_proj", "v_proj"])])
def test_lora_targets_train_only_adapters(name, targets):
    peft = pytest.importorskip("peft")
    model = build_named(name, vocab_size=64, n_layer=2)
    assert lora_targets(model) == lora_targets(SIZES[name]["family"]) == targets
    with pytest.warns(UserWarning, match="fan_in_fan_out") if name == "gpt_micro" else contextlib.nullcontext():
        lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets))
    trainable = {k: p.numel() for k, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    per_layer = 4 * (128 + 3 * 128) if name == "gpt_micro" else 2 * 4 * (128 + 128)  # rank * (in + out) each
    assert sum(trainable.values()) == 2 * per_layer


@pytest.mark.parametrize(
    "name, kwargs",
    [("gpt_micro", {}), ("llama_micro", {}), ("llama_micro", {"n_kv_head": 2})],
    ids=["gpt2", "llama", "llama_gqa"],
)
def test_flops_per_token_agrees_with_torchs_flop_counter(name, kwargs):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_named(name, vocab_size=512, **kwargs)
    x = torch.randint(0, 512, (2, 64))
    # the math backend: torch's FlopCounterMode has no formula for the CPU flash kernel and would miss attention
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, labels=x).loss.backward()  # one training step's forward and backward
    measured = counter.get_total_flops() / x.numel()
    assert flops_per_token(model, 64) == pytest.approx(measured, rel=0.02)
    attention = 12 * 4 * 128 * 64  # 12 * L * H * Q * T, H * Q = width
    assert flops_per_token(model, 64) - attention != pytest.approx(measured, rel=0.02)  # 6N alone is 7% low


def test_frozen_weights_are_priced_without_their_gradients():
    """A LoRA model: 4N + 2·N_trainable + attention, close to what torch's FLOP counter measures (which also skips
    the first block's input gradient, a few percent here), and well below 6N."""
    peft = pytest.importorskip("peft")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    full = flops_per_token(build_named("gpt_micro", vocab_size=512), 64)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        model = peft.get_peft_model(
            build_named("gpt_micro", vocab_size=512), peft.LoraConfig(r=4, target_modules=["c_attn"])
        )
    x = torch.randint(0, 512, (2, 64))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(input_ids=x, labels=x).loss.backward()
    measured = counter.get_total_flops() / x.numel()
    priced = flops_per_token(model, 64)
    n = sum(p.numel() for p in model.parameters()) - 64 * 128  # less the position embeddings
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert priced == 4 * n + 2 * adapters + 12 * 4 * 128 * 64
    assert priced == pytest.approx(measured, rel=0.05) and priced < 0.8 * (full + 6 * adapters)


def test_flops_per_token_counts_nanogpts_n():
    model = build_named("gpt2_small", device="meta")
    n = 124_439_808 - 1024 * 768  # nanoGPT's get_num_params(): all but the position embeddings
    assert flops_per_token(model, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    untied = build_causal_lm("llama", 2, 64, 4, 100, 32, device="meta")
    untied.lm_head.weight = nn.Parameter(torch.empty(100, 64, device="meta"))  # untied: the lookup does no matmul
    assert flops_per_token(untied, 32) == 6 * (n_params(untied) - 100 * 64) + 12 * 2 * 4 * 16 * 32
    with pytest.raises(ConfigError, match=r"^seq_len=0 must be a positive integer;"):
        flops_per_token(model, 0)
