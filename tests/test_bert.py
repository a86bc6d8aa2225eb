"""BERT encoders (stackwise_bench.nn.bert) and their depth growth (stackwise_bench.nn.bert_growth): the published
shapes and parameter counts, loading a save_pretrained folder, FLOPs per token, growth by every mode and init."""

from __future__ import annotations

import pytest
import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.bert import (
    BERT_VOCAB,
    SIZES,
    build_bert_classifier,
    build_bert_mlm,
    encoder_layers,
    flops_per_token,
)
from stackwise_bench.nn.bert_growth import grow_bert, truncate_bert
from stackwise_bench.nn.growth import MODES, growth_sources

transformers = pytest.importorskip("transformers")

VOCAB = 97


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight once


def encoder_count(vocab: int, positions: int, hidden: int, layers: int, inter: int) -> int:
    """Embeddings (token, position, 2 segments, LayerNorm) and the blocks, from the shapes alone."""
    embeddings = (vocab + positions + 2) * hidden + 2 * hidden
    attention = 4 * (hidden * hidden + hidden) + 2 * hidden  # q, k, v, output; LayerNorm
    feed_forward = hidden * inter + inter + inter * hidden + hidden + 2 * hidden
    return embeddings + layers * (attention + feed_forward)


def mlm_count(vocab, positions, hidden, layers, inter) -> int:
    """The encoder without pooler, plus the MLM head: transform (dense + LayerNorm) and the output bias (its weight is
    the token embeddings)."""
    return encoder_count(vocab, positions, hidden, layers, inter) + hidden * hidden + hidden + 2 * hidden + vocab


def shape_of(name: str) -> dict:
    s = SIZES[name]
    return {"hidden": s["hidden"], "layers": s["n_layer"], "inter": s["intermediate"], "positions": s["positions"]}


def test_bert_base_mlm_has_the_published_parameter_count():
    model = build_bert_mlm("bert_base", device="meta")
    assert n_params(model) == 109_514_298
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert type(model) is transformers.BertForMaskedLM and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "name, shape",
    [
        ("bert_tiny", (2, 128, 2, 512)),
        ("bert_base", (12, 768, 12, 3072)),
        ("bert_large", (24, 1024, 16, 4096)),
        ("bert_micro", (2, 64, 2, 256)),
    ],
)
def test_sizes_have_the_published_shapes_and_the_counts_their_shapes_give(name, shape):
    model = build_bert_mlm(name, device="meta")
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == shape
    assert c.vocab_size == BERT_VOCAB and c.layer_norm_eps == 1e-12 and c.hidden_act == "gelu"
    assert c.max_position_embeddings == (128 if name == "bert_micro" else 512)
    s = shape_of(name)
    assert n_params(model) == mlm_count(BERT_VOCAB, s["positions"], s["hidden"], s["layers"], s["inter"])


@pytest.mark.parametrize("labels", [1, 2, 3])
def test_classifier_counts_pooler_and_head_and_regresses_with_one_label(labels):
    model = build_bert_classifier("bert_tiny", labels, vocab_size=VOCAB, max_positions=64, device="meta")
    pooler, head = 128 * 128 + 128, 128 * labels + labels
    assert n_params(model) == encoder_count(VOCAB, 64, 128, 2, 512) + pooler + head
    assert model.config.problem_type == ("regression" if labels == 1 else "single_label_classification")


def test_bad_options_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="model.name=bert_huge"):
        build_bert_mlm("bert_huge")
    with pytest.raises(ConfigError, match="model.num_labels=0"):
        build_bert_classifier("bert_micro", 0)
    with pytest.raises(ConfigError, match="model.pad_token_id=300"):
        build_bert_mlm("bert_micro", vocab_size=VOCAB, pad_token_id=300)


def test_a_saved_folder_loads_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_bert_mlm("bert_micro", vocab_size=VOCAB, dropout=0.0).eval()
    model.save_pretrained(tmp_path / "mlm")
    x = torch.randint(0, VOCAB, (2, 9))
    loaded = build_bert_mlm("bert_micro", checkpoint_path=tmp_path / "mlm")
    assert loaded.training  # as a built model
    torch.testing.assert_close(loaded.eval()(input_ids=x).logits, model(input_ids=x).logits)
    classifier = build_bert_classifier("bert_micro", 3, checkpoint_path=tmp_path / "mlm")  # the fine-tune start
    assert classifier.config.num_labels == 3
    torch.testing.assert_close(
        classifier.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight
    )


def test_a_missing_or_foreign_folder_is_refused_naming_checkpoint_path(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.checkpoint_path=.*nowhere"):
        build_bert_mlm("bert_micro", checkpoint_path=tmp_path / "nowhere")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt")
    with pytest.raises(ConfigError, match=r"model\.checkpoint_path=.*gpt2 model, not a BERT"):
        build_bert_classifier("bert_micro", 2, checkpoint_path=tmp_path / "gpt")


def test_flops_per_token_is_6n_plus_the_attention_term():
    mlm = build_bert_mlm("bert_base", device="meta")
    n = n_params(mlm) - 512 * 768 - 2 * 768  # less the position and segment tables (lookups)
    assert flops_per_token(mlm, 128) == 6 * n + 12 * 12 * 12 * 64 * 128
    classifier = build_bert_classifier("bert_base", 2, device="meta")
    n = n_params(classifier) - (BERT_VOCAB + 512 + 2) * 768  # untied: the token table is a lookup too
    assert flops_per_token(classifier, 64) == 6 * n + 12 * 12 * 12 * 64 * 64


def test_flops_per_token_agrees_with_pytorchs_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = build_bert_mlm("bert_tiny", vocab_size=4096, dropout=0.0)
    x = torch.randint(0, 4096, (1, 128))
    # the math backend: FlopCounterMode has no formula for the CPU flash kernel and would miss the attention
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(input_ids=x).logits.sum().backward()
    assert counter.get_total_flops() / 128 == pytest.approx(flops_per_token(model, 128), rel=0.02)


# ---- growth ------------------------------------------------------------------------------------------------------


def micro(seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    model = build_bert_mlm("bert_micro", vocab_size=VOCAB, dropout=0.0)
    truncate_bert(model, layers)
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", MODES)
def test_identity_growth_keeps_the_logits(mode):
    model = micro()
    before = model(input_ids=tokens()).logits
    growth = grow_bert(model, 5, mode, "identity", torch.Generator().manual_seed(3))
    assert len(encoder_layers(model)) == model.config.num_hidden_layers == 5
    torch.testing.assert_close(model(input_ids=tokens()).logits, before)
    new_blocks = {int(name.split(".")[3]) for name in growth.new}
    assert len(new_blocks) == 3 and all(not model.bert.encoder.layer[i].output.dense.weight.any() for i in new_blocks)


def test_identity_growth_standardises_its_input_after_training_moved_the_layernorms():
    """Post-LayerNorm: a zeroed block computes LN(LN(x)) = (x - mean) / std, the identity only on standardised x."""
    model = micro()
    with torch.no_grad():
        for p in model.bert.encoder.layer[1].output.LayerNorm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    below = model(input_ids=tokens(), output_hidden_states=True).hidden_states[-1]
    grow_bert(model, 3, "append", "identity", torch.Generator().manual_seed(3))
    after = model(input_ids=tokens(), output_hidden_states=True).hidden_states[-1]
    standardised = torch.nn.functional.layer_norm(below, below.shape[-1:], eps=1e-12)
    torch.testing.assert_close(after, torch.nn.functional.layer_norm(standardised, below.shape[-1:], eps=1e-12))
    assert not torch.allclose(after, below, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_copy_growth_stacks_the_sources_layout(mode):
    model = micro()
    old = [block.state_dict() for block in model.bert.encoder.layer]
    growth = grow_bert(model, 4, mode, "copy")
    layers = encoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers == 4
    for block, (src, _) in zip(layers, growth_sources(2, 4, mode)):
        for key, value in block.state_dict().items():
            torch.testing.assert_close(value, old[src][key], rtol=0, atol=0)
    assert len(growth.copied) == len(growth.new) == 2 * len(old[0])  # every new parameter has a source
    assert [m.layer_idx for m in model.modules() if hasattr(m, "layer_idx")] == [0, 1, 2, 3]
    assert model(input_ids=tokens()).logits.shape == (2, 12, VOCAB)


def test_random_growth_is_reproducible_and_leaves_the_global_rng():
    a, b = micro(), micro()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    grow_bert(a, 3, "append", "random", torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    grow_bert(b, 3, "append", "random", torch.Generator().manual_seed(7))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert a.bert.encoder.layer[2].output.dense.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_growth_refusals_leave_the_model_unchanged():
    model = micro(layers=2)
    with pytest.raises(ConfigError, match="regime.building_mode=sideways"):
        grow_bert(model, 4, "sideways", "copy")
    with pytest.raises(ConfigError, match="regime.init=zero"):
        grow_bert(model, 4, "append", "zero")
    with pytest.raises(ConfigError, match="regime.stacks"):
        grow_bert(model, 1, "append", "copy")
    assert len(encoder_layers(model)) == model.config.num_hidden_layers == 2
    with pytest.raises(ConfigError, match="not a transformers BERT"):
        encoder_layers(torch.nn.Linear(2, 2))
