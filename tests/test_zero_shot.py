"""Zero-shot evaluation of a causal LM (stackwise_bench.lm_zero_shot) on LAMBADA, HellaSwag and PIQA files built
here: every score equals a hand computation of the log-likelihoods (one full forward pass per candidate)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from stackwise_bench.data.text.tokenizers import ByteTokenizer
from stackwise_bench.errors import ConfigError
from stackwise_bench.lm_zero_shot import (
    encode_pair,
    lambada,
    loglikelihoods,
    multiple_choice,
    read_hellaswag,
    read_piqa,
    zero_shot,
)
from stackwise_bench.nn.causal_lm import build_named

pytest.importorskip("transformers")

TOK = ByteTokenizer()
WINDOW = 64  # gpt_micro's context


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_named("gpt_micro", vocab_size=256).eval()


def hand_ll(model, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log-softmax over the continuation's bytes, from one forward pass of the last WINDOW + 1 bytes."""
    ctx, cont = list(context.encode()), list(continuation.encode())
    ids = (ctx + cont)[-(WINDOW + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0]
    logprobs = torch.log_softmax(logits.double(), -1)[-len(cont) :]
    target = torch.tensor(cont)
    return float(logprobs[torch.arange(len(cont)), target].sum()), bool((logprobs.argmax(-1) == target).all())


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lambada_accuracy_and_perplexity_are_the_last_words(model, tmp_path):
    texts = ["the cat sat on the mat", "a b", "she said hello to her old friend", "x" * 90 + " yy"]  # last: truncated
    path = write_jsonl(tmp_path / "lambada.jsonl", [{"text": t} for t in texts])
    got = lambada(model, TOK, path, batch_size=2)
    hand = [hand_ll(model, t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1]) for t in texts]
    assert got["n"] == 4
    assert got["ppl"] == pytest.approx(math.exp(-sum(ll for ll, _ in hand) / 4), rel=1e-5)
    assert got["acc"] == pytest.approx(100 * sum(g for _, g in hand) / 4)


def test_the_models_own_greedy_bytes_count_as_right(model):
    ids = list(b"once upon a time")
    with torch.no_grad():
        for _ in range(3):  # the model's own greedy continuation: a target it must get right
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    ctx, cont = ids[:-3], ids[-3:]
    wrong = cont[:2] + [(cont[2] + 1) % 256]
    (ll, greedy), (_, greedy_wrong) = loglikelihoods(model, [(ctx, cont), (ctx, wrong)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
    assert greedy and not greedy_wrong
    assert ll == pytest.approx(sum(float(logprobs[p - 1, ids[p]]) for p in range(len(ctx), len(ids))), rel=1e-5)


def test_hellaswag_picks_by_loglikelihood_and_by_loglikelihood_per_character(model, tmp_path):
    rows, hand_rows = [], []
    for i in range(6):
        endings = [f"ending number {j} of row {i}" + "!" * (3 * j) for j in range(4)]
        ctx_a, ctx_b = "a man is standing " + "near the water " * (i % 3) * 2, "then he"  # rows 2, 5: truncated
        query = f"Walking: {ctx_a} {ctx_b.capitalize()}"
        lls = [hand_ll(model, query, " " + e)[0] for e in endings]
        best = max(range(4), key=lambda j: (lls[j], -j))
        best_norm = max(range(4), key=lambda j: (lls[j] / len(endings[j]), -j))
        gold = best if i % 2 == 0 else (best + 1) % 4  # right on the even rows, wrong on the odd ones
        hand_rows.append((gold == best, gold == best_norm))
        rows.append({"ind": i, "activity_label": "Walking", "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": "unused",
                     "endings": endings, "label": gold, "split": "val"})  # fmt: skip
    path = write_jsonl(tmp_path / "hellaswag.jsonl", rows)
    assert read_hellaswag(path)[0][0] == "Walking: a man is standing Then he"
    got = zero_shot(model, TOK, "hellaswag", path)
    assert got["acc"] == pytest.approx(50.0)
    assert got["acc_norm"] == pytest.approx(100 * sum(n for _, n in hand_rows) / 6)


def test_hellaswag_cleans_wikihow_markup_and_reads_ctx_alone(tmp_path):
    rows = [
        {"activity_label": "Home", "ctx_a": "Clean the sink. [title] Rinse it.", "ctx_b": "you", "endings": ["a [b] c"],
         "label": 0},
        {"ctx": "Only a context", "endings": ["x", "y"], "label": "1"},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "h.jsonl", rows)
    (q0, e0, _), (q1, _, g1) = read_hellaswag(path)
    assert q0 == "Home: Clean the sink.. Rinse it. You" and e0 == ["a c"]
    assert q1 == "Only a context" and g1 == 1


def test_piqa_reads_labels_from_the_lst_file_or_the_rows(model, tmp_path):
    goals = [("open a jar", "twist the lid", "hit it with a spoon"), ("dry socks", "put them in the sun", "wet them")]
    path = write_jsonl(
        tmp_path / "valid.jsonl", [{"id": str(i), "goal": g, "sol1": a, "sol2": b} for i, (g, a, b) in enumerate(goals)]
    )
    hand = []
    for goal, a, b in goals:
        query = f"Question: {goal}\nAnswer:"
        hand.append([hand_ll(model, query, " " + s)[0] for s in (a, b)])
    labels = [0 if h[0] >= h[1] else 1 for h in hand]
    (tmp_path / "valid-labels.lst").write_text(f"{labels[0]}\n{1 - labels[1]}\n")
    got = zero_shot(model, TOK, "piqa", path, tmp_path / "valid-labels.lst")
    assert got["acc"] == pytest.approx(50.0) and got["n"] == 2
    norm = [max((0, 1), key=lambda j: (h[j] / len(goals[i][1 + j]), -j)) for i, h in enumerate(hand)]
    assert got["acc_norm"] == pytest.approx(100 * ((norm[0] == labels[0]) + (norm[1] == 1 - labels[1])) / 2)
    inline = write_jsonl(
        tmp_path / "inline.jsonl",
        [{"goal": g, "sol1": a, "sol2": b, "label": y} for (g, a, b), y in zip(goals, labels)],
    )
    assert multiple_choice(model, TOK, read_piqa(inline))["acc"] == pytest.approx(100.0)
    (tmp_path / "short.lst").write_text("0\n")
    with pytest.raises(ConfigError, match=r"has 2 rows but its labels file .* has 1 lines"):
        read_piqa(path, tmp_path / "short.lst")
    with pytest.raises(ConfigError, match=r"zero_shot.labels=.*nowhere.lst is not a file"):
        read_piqa(path, tmp_path / "nowhere.lst")
    with pytest.raises(ConfigError, match=r"rows without a label"):
        read_piqa(path)


def test_a_continuation_longer_than_the_window_is_scored_in_windows(model):
    ctx, cont = list(b"ab"), list(range(60, 60 + 70))  # 70 continuation tokens > the 64-token window
    ids = ctx + cont
    ((ll, _),) = loglikelihoods(model, [(ctx, cont)])
    with torch.no_grad():
        last = torch.log_softmax(model(torch.tensor([ids[-65:-1]])).logits[0].double(), -1)  # targets 8..71
        first = torch.log_softmax(model(torch.tensor([ids[:7]])).logits[0].double(), -1)  # targets 2..7
    want = sum(float(last[p - 8, ids[p]]) for p in range(8, 72)) + sum(float(first[p - 1, ids[p]]) for p in range(2, 8))
    assert ll == pytest.approx(want, rel=1e-5)


def test_bad_files_and_rows_are_refused_in_one_sentence(model, tmp_path):
    with pytest.raises(ConfigError, match=r"row 2 has no word before its last one"):
        lambada(model, TOK, write_jsonl(tmp_path / "one_word.jsonl", [{"text": "a b"}, {"text": "alone"}]))
    with pytest.raises(ConfigError, match=r"zero_shot.path=.*missing.jsonl is not a file"):
        lambada(model, TOK, tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"line 2 is not a JSON object with text"):
        lambada(model, TOK, bad)
    with pytest.raises(ConfigError, match=r"label 7, not one of 0..1"):
        read_piqa(write_jsonl(tmp_path / "p.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 7}]))
    with pytest.raises(ConfigError, match=r"zero_shot.task=mmlu is not a zero-shot task"):
        zero_shot(model, TOK, "mmlu", bad)


def test_pairs_encode_as_the_harness_does():
    assert encode_pair(TOK, "ab", " cd") == ([97, 98], [32, 99, 100])
    assert F.log_softmax(torch.zeros(4), -1).exp().sum() == pytest.approx(1.0)
