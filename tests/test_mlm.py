"""Masked language modelling (stackwise_bench.training.mlm_task) on the text datasets' windows: BERT's 15% and
80/10/10 masking, bit-reproducible per (seed, epoch, step), the task protocol, and a short training that learns."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stackwise_bench.data.text.dataset import EvalWindows, TrainWindows
from stackwise_bench.data.text.special_tokens import SpecialTokens, special_tokens_for
from stackwise_bench.data.text.tokenizers import ByteTokenizer
from stackwise_bench.nn.bert import build_bert_mlm, flops_per_token
from stackwise_bench.runs.contract import MASKED_LM
from stackwise_bench.training.mlm_task import MaskedLM, bert_sequences, mask_generator, mask_tokens
from stackwise_bench.training.tasks import Output

pytest.importorskip("transformers")

SPECIAL = special_tokens_for(ByteTokenizer())
SEQ, BATCH = 64, 16
WORDS = "the king and queen walk to a castle by sea where old men sing of war love gold bread and wine".split()


def byte_text(n_words: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    text = " ".join(rng.choice(WORDS, n_words)) + "."
    return np.frombuffer(text.encode(), dtype=np.uint8).copy()


@pytest.fixture(scope="module")
def loaders():
    train = TrainWindows(byte_text(6000, 0), SEQ, BATCH, steps_per_epoch=20, seed=0, device="cpu")
    tokens = byte_text(800, 1)
    split = SimpleNamespace(tokens=tokens, n_tokens=len(tokens), name="val", n_words=None)
    val = EvalWindows(split, ByteTokenizer(), SEQ, 32, "cpu")
    return train, val


def test_special_ids_are_reserved_past_the_tokenizer():
    assert SPECIAL == SpecialTokens(256)
    assert (SPECIAL.pad, SPECIAL.cls, SPECIAL.sep, SPECIAL.mask, SPECIAL.vocab_size) == (256, 257, 258, 259, 260)


def test_sequences_are_cls_window_sep_of_the_windows_length():
    x = torch.arange(10).repeat(2, 1)
    seq = bert_sequences(x, SPECIAL)
    assert seq.shape == (2, 10) and seq[0].tolist() == [257, *range(8), 258]


def test_masking_shares_are_berts():
    ids = bert_sequences(torch.randint(0, 256, (512, 128), generator=torch.Generator().manual_seed(0)), SPECIAL)
    inputs, labels = mask_tokens(ids, SPECIAL, mask_generator(0, 0, 0))
    chosen = labels != -100
    candidates = ~torch.isin(ids, torch.tensor(SPECIAL.ids))
    assert not (chosen & ~candidates).any()  # [CLS] and [SEP] are never targets
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert chosen.sum() / candidates.sum() == pytest.approx(0.15, abs=0.004)
    n = chosen.sum()
    masked = (inputs[chosen] == SPECIAL.mask).sum() / n
    kept = (inputs[chosen] == ids[chosen]).sum() / n
    replaced = ((inputs[chosen] != ids[chosen]) & (inputs[chosen] != SPECIAL.mask)).sum() / n
    assert masked == pytest.approx(0.8, abs=0.01)
    # a random id equals the original one time in 256: it then counts as kept
    assert replaced == pytest.approx(0.1 * 255 / 256, abs=0.008)
    assert kept == pytest.approx(0.1 + 0.1 / 256, abs=0.008)
    assert inputs.max() <= SPECIAL.mask and (inputs[inputs != ids] < 256).sum() == (replaced * n).round()


def test_masks_are_reproducible_per_seed_epoch_and_step():
    ids = bert_sequences(torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0)), SPECIAL)

    def draw(seed, epoch, step):
        return mask_tokens(ids, SPECIAL, mask_generator(seed, epoch, step))

    for a, b in zip(draw(1, 2, 3), draw(1, 2, 3)):
        assert torch.equal(a, b)
    base = draw(1, 2, 3)[1]
    for other in (draw(1, 2, 4), draw(1, 3, 3), draw(2, 2, 3)):
        assert not torch.equal(other[1], base)


def test_a_batch_always_has_one_target():
    ids = bert_sequences(torch.randint(0, 256, (2, 8)), SPECIAL)
    _, labels = mask_tokens(ids, SPECIAL, mask_generator(0, 0, 0), mask_prob=0.0)
    assert (labels != -100).sum() == 1


def test_the_task_follows_the_protocol(loaders):
    train, val = loaders
    torch.manual_seed(0)
    model = build_bert_mlm("bert_micro", vocab_size=SPECIAL.vocab_size, pad_token_id=SPECIAL.pad, dropout=0.0)
    task = MaskedLM(SPECIAL, contextlib.nullcontext, "cpu", seed=0)
    batch = next(iter(task.batches(train, 0, 0)))
    out = task.objective(model, batch, 0, 0)
    assert isinstance(out, Output) and out.samples == BATCH * SEQ and set(out.tallies) == set(task.tallies)
    assert out.loss.item() == pytest.approx(float(out.tallies["nats"]) / int(out.tallies["masked"]), rel=1e-5)
    first, second = task.evaluate(model, val), task.evaluate(model, val)
    assert first["loss"] == second["loss"] and first["masked"] == second["masked"] > 0  # the same eval masks
    assert first["ppl"] == pytest.approx(math.exp(first["loss"]))
    assert task.score(first) == (-first["loss"],)
    assert task.record()["directions"] == MASKED_LM["directions"] == {"loss": "min", "ppl": "min", "acc": "max"}
    assert task.flops_per_sample(model, task.sample_shape(train)) == flops_per_token(model, SEQ)


def test_twenty_steps_of_bert_micro_lower_the_masked_loss(loaders):
    train, val = loaders
    torch.manual_seed(0)
    model = build_bert_mlm("bert_micro", vocab_size=SPECIAL.vocab_size, pad_token_id=SPECIAL.pad, dropout=0.0)
    task = MaskedLM(SPECIAL, contextlib.nullcontext, "cpu", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    before = task.evaluate(model, val)
    sums = {name: 0 for name in task.tallies}
    for step, batch in enumerate(task.batches(train, 0, 0)):
        out = task.objective(model, batch, 0, step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        for name, value in out.tallies.items():
            sums[name] += value.item()
    assert step == 19
    after = task.evaluate(model, val)
    assert after["loss"] < before["loss"] - 1.0, (before, after)
    assert after["acc"] > before["acc"]
    assert 0 <= task.train_metrics(sums, 20 * BATCH * SEQ)["acc"] <= 100
