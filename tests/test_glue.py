"""GLUE (stackwise_bench.data.text.glue, glue_batches; training.glue_task, glue_metrics): the original folders' column
layouts, the refusals, the splits, sentence-pair encoding, and a short fine-tune whose reported metrics equal
scikit-learn's and scipy's on its saved predictions."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from stackwise_bench.data.text.glue import TASKS, glue_splits, read_glue
from stackwise_bench.data.text.glue_batches import GlueBatches, encode_examples, glue_test_batches, truncated_lengths
from stackwise_bench.data.text.special_tokens import special_tokens_for
from stackwise_bench.data.text.tokenizers import ByteTokenizer
from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.contract import GLUE
from stackwise_bench.training.glue_metrics import TASK_METRICS, grouped_metrics, task_metrics
from stackwise_bench.training.glue_task import GlueTask

TOKENIZER = ByteTokenizer()
SPECIAL = special_tokens_for(TOKENIZER)
STSB_HEADER = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()
MNLI_TRAIN = (
    "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse sentence2_parse "
    "sentence1 sentence2 label1 gold_label"
).split()
MNLI_DEV = MNLI_TRAIN[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
NLI = ("entailment", "neutral", "contradiction")


def write_tsv(path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def sentence(rng, label) -> str:
    """A sentence whose label a tiny model can learn: label 1 sentences are made of x's, label 0 of o's."""
    return ("x" if label else "o") * int(rng.integers(3, 12)) + ' "quoted'  # a bare quote: QUOTE_NONE is needed


def make_glue(root, n_train=64, n_dev=24, seed=0):
    """Tiny GLUE folders in the original layout: CoLA, MRPC, STS-B, MNLI."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("dev", n_dev)):
        labels = rng.integers(0, 2, n)
        write_tsv(root / "CoLA" / f"{split}.tsv", [("gj04", y, "" if y else "*", sentence(rng, y)) for y in labels])
        rows = [(y, 100 + i, 200 + i, sentence(rng, y), sentence(rng, y)) for i, y in enumerate(labels)]
        write_tsv(root / "MRPC" / f"{split}.tsv", rows, ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"])
        scores = rng.uniform(0, 5, n).round(3)
        rows = [
            (i, "main-news", "x", 2012, i, "none", "none", "x" * int(s * 3 + 1), "o", s) for i, s in enumerate(scores)
        ]
        write_tsv(root / "STS-B" / f"{split}.tsv", rows, STSB_HEADER)
    for name, n, header in (
        ("train", n_train, MNLI_TRAIN),
        ("dev_matched", n_dev, MNLI_DEV),
        ("dev_mismatched", 10, MNLI_DEV),
    ):
        labels = rng.integers(0, 3, n)
        extra = [NLI[y] for y in labels] if header is MNLI_TRAIN else None
        rows = [
            (i, i, f"{i}e", "fiction", "(", "(", "(", "(", f"premise {i}", f"hypothesis {i}")
            + ((extra[i],) if extra else (NLI[y],) * 5)
            + (NLI[y],)
            for i, y in enumerate(labels)
        ]
        write_tsv(root / "MNLI" / f"{name}.tsv", rows, header)
    return root


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory):
    return make_glue(tmp_path_factory.mktemp("glue"))


def test_each_layout_is_read_by_its_columns(glue_root):
    splits, source = read_glue(glue_root, "cola")
    assert len(splits["train"]) == 64 and splits["train"][0].text_b is None
    assert splits["train"][0].text_a.endswith(' "quoted') and splits["train"][0].label in (0, 1)
    assert set(source["files"]) == {"train.tsv", "dev.tsv"}
    mrpc = read_glue(glue_root, "mrpc")[0]["dev"]
    assert mrpc[0].text_b is not None and mrpc[0].label in (0, 1)
    stsb = read_glue(glue_root, "stsb")[0]["train"][0]
    assert isinstance(stsb.label, float) and stsb.text_b == "o" and len(stsb.text_a) == int(stsb.label * 3 + 1)
    mnli = read_glue(glue_root, "mnli")[0]
    assert set(mnli) == {"train", "matched", "mismatched"} and len(mnli["mismatched"]) == 10
    assert mnli["matched"][3].text_a == "premise 3" and mnli["matched"][3].label in (0, 1, 2)
    assert TASKS["mnli"].labels == NLI  # HF datasets' label order


def test_splits_take_dev_as_test_and_a_seeded_train_slice_as_validation(glue_root):
    a = glue_splits(glue_root, "cola", val_fraction=0.25, seed=3)
    all_train = read_glue(glue_root, "cola")[0]["train"]
    rows = a.record["val_indices"]
    assert len(rows) == 16 and len(a.train) == 48 and a.val == [all_train[i] for i in rows]
    assert a.tests["dev"] == read_glue(glue_root, "cola")[0]["dev"] and a.record["test_from"] == {"dev": "dev.tsv"}
    assert glue_splits(glue_root, "cola", 0.25, 3).record == a.record
    assert glue_splits(glue_root, "cola", 0.25, 4).record["sha256"] != a.record["sha256"]
    assert set(glue_splits(glue_root, "mnli").tests) == {"matched", "mismatched"}


def test_refusals_name_the_key_and_the_fix(glue_root, tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.task=imdb is not a GLUE task; use one of cola, sst2"):
        read_glue(glue_root, "imdb")
    with pytest.raises(ConfigError, match=r"lacks train.tsv, dev.tsv .*RTE"):
        read_glue(tmp_path, "rte")
    write_tsv(tmp_path / "MRPC" / "train.tsv", [(1, 2, 3, "a", "b")], ["Quality", "id1", "id2", "s1", "s2"])
    write_tsv(tmp_path / "MRPC" / "dev.tsv", [(1, 2, 3, "a", "b")], ["Quality", "id1", "id2", "s1", "s2"])
    with pytest.raises(ConfigError, match=r"header .* lacks #1 String, #2 String"):
        read_glue(tmp_path, "mrpc")
    write_tsv(tmp_path / "CoLA" / "train.tsv", [("index", "sentence"), (0, "a sentence")])
    write_tsv(tmp_path / "CoLA" / "dev.tsv", [("gj04", 1, "", "ok")])
    with pytest.raises(ConfigError, match=r"no header, 4 columns"):
        read_glue(tmp_path, "cola")
    write_tsv(tmp_path / "STS-B" / "train.tsv", [(*range(9), "high")], STSB_HEADER)
    write_tsv(tmp_path / "STS-B" / "dev.tsv", [tuple(range(10))], STSB_HEADER)
    with pytest.raises(ConfigError, match=r"line 2 has label 'high' where STS-B has a number"):
        read_glue(tmp_path, "stsb")


def test_qqp_skips_its_short_rows_and_other_tasks_refuse_them(tmp_path):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write_tsv(tmp_path / "QQP" / "train.tsv", [(1, 1, 2, "a?", "b?", 1), (2, 3, 4, "c?")], header)
    write_tsv(tmp_path / "QQP" / "dev.tsv", [(1, 1, 2, "a?", "b?", 0)], header)
    splits, source = read_glue(tmp_path, "qqp")
    assert len(splits["train"]) == 1 and source["skipped"]["train.tsv"] == 1
    write_tsv(
        tmp_path / "RTE" / "train.tsv",
        [(0, "a", "b", "entailment"), (1, "a")],
        ["index", "sentence1", "sentence2", "label"],
    )
    write_tsv(
        tmp_path / "RTE" / "dev.tsv", [(0, "a", "b", "not_entailment")], ["index", "sentence1", "sentence2", "label"]
    )
    with pytest.raises(ConfigError, match=r"line 3 has 2 columns where RTE needs 4"):
        read_glue(tmp_path, "rte")


def test_pairs_encode_with_segments_and_longest_first_truncation():
    from stackwise_bench.data.text.glue import GlueExample

    enc = encode_examples([GlueExample("abc", "de", 1), GlueExample("abcdefghij", "xyz", 0)], TOKENIZER, SPECIAL, 10)
    c, s, p = SPECIAL.cls, SPECIAL.sep, SPECIAL.pad
    assert enc["input_ids"][0].tolist() == [c, 97, 98, 99, s, 100, 101, s, p, p]
    assert enc["token_type_ids"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    assert enc["attention_mask"][0].tolist() == [1] * 8 + [0, 0]
    assert enc["input_ids"][1].tolist() == [c, *b"abcd", s, *b"xyz", s]  # the longer sentence was cut
    for la in range(12):  # the closed form against transformers' token-by-token rule
        for lb in range(12):
            a, b = la, lb
            while a + b > 9:
                a, b = (a - 1, b) if a > b else (a, b - 1)
            assert truncated_lengths(la, lb, 9) == (a, b)


@pytest.mark.parametrize("task", ["cola", "mrpc", "qqp", "sst2", "mnli"])
def test_classification_metrics_equal_sklearn(task):
    rng = np.random.default_rng(0)
    classes = 3 if task == "mnli" else 2
    target, preds = rng.integers(0, classes, 200), rng.integers(0, classes, 200)
    preds[:120] = target[:120]  # better than chance
    got = task_metrics(task, torch.tensor(preds), torch.tensor(target), classes)
    want = {
        "mcc": matthews_corrcoef(target, preds),
        "acc": accuracy_score(target, preds),
        "f1": f1_score(target, preds) if classes == 2 else None,
    }
    for name in TASK_METRICS[task]:
        assert got[name] == pytest.approx(100 * want[name], abs=1e-4)
    assert got["score"] == pytest.approx(np.mean([got[n] for n in TASK_METRICS[task]]))


def test_regression_metrics_equal_scipy_and_mnli_reports_both_devs():
    rng = np.random.default_rng(1)
    target = rng.uniform(0, 5, 100)
    preds = target + rng.normal(0, 1.5, 100)
    got = task_metrics("stsb", torch.tensor(preds), torch.tensor(target), 1)
    assert got["pearson"] == pytest.approx(100 * pearsonr(preds, target)[0], abs=1e-6)
    assert got["spearman"] == pytest.approx(100 * spearmanr(preds, target)[0], abs=1e-6)
    labels, guesses = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 0, 0, 0, 0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    out = grouped_metrics("mnli", guesses, labels, group, ("matched", "mismatched"), 3)
    assert out["acc_matched"] == out["acc"] == pytest.approx(200 / 3) and out["acc_mismatched"] == pytest.approx(
        100 / 3
    )
    assert out["score"] == pytest.approx(50.0)
    assert all(GLUE["directions"][k] == ("min" if k == "loss" else "max") for k in GLUE["directions"])


def fine_tune(root, task: str, steps: int = 24):
    from stackwise_bench.nn.bert import build_bert_classifier

    splits = glue_splits(root, task, val_fraction=0.25, seed=0)
    labels = TASKS[task].num_labels
    train = GlueBatches(encode_examples(splits.train, TOKENIZER, SPECIAL, 32), 16, seed=0)
    test = glue_test_batches(splits.tests, TOKENIZER, SPECIAL, 32, 16)
    torch.manual_seed(0)
    model = build_bert_classifier(
        "bert_micro", labels, vocab_size=SPECIAL.vocab_size, pad_token_id=SPECIAL.pad, dropout=0.0
    )
    glue = GlueTask(task, labels, contextlib.nullcontext, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step = 0
    while step < steps:
        for batch in glue.batches(train, step // len(train), 0):
            out = glue.objective(model, batch, 0, step)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            step += 1
    return glue, model, test


@pytest.mark.parametrize("task", ["cola", "mrpc", "stsb"])
def test_a_short_fine_tune_reports_the_metrics_of_its_saved_predictions(glue_root, tmp_path, task):
    glue, model, test = fine_tune(glue_root, task)
    metrics = glue.evaluate(model, test, full=True)
    rows = [
        json.loads(line) for line in glue.write_predictions(tmp_path / "predictions.jsonl").read_text().splitlines()
    ]
    assert [r["row"] for r in rows] == list(range(24)) and {r["part"] for r in rows} == {"dev"}
    pred, label = np.array([r["pred"] for r in rows]), np.array([r["label"] for r in rows])
    if task == "stsb":
        assert metrics["pearson"] == pytest.approx(100 * pearsonr(pred, label)[0], abs=1e-4)
        assert metrics["spearman"] == pytest.approx(100 * spearmanr(pred, label)[0], abs=1e-4)
        assert metrics["loss"] == pytest.approx(np.mean((pred - label) ** 2), rel=1e-4)
        assert metrics["pearson"] > 50  # the score is the first sentence's length: learnt
    else:
        assert len(set(pred.tolist())) == 2  # not a constant guess: the metrics below are not trivial
        assert metrics["acc" if task == "mrpc" else "mcc"] > 50
        if task == "cola":
            assert metrics["mcc"] == pytest.approx(100 * matthews_corrcoef(label, pred), abs=1e-4)
        else:
            assert metrics["f1"] == pytest.approx(100 * f1_score(label, pred), abs=1e-4)
            assert metrics["acc"] == pytest.approx(100 * accuracy_score(label, pred), abs=1e-4)
    assert glue.score(metrics)[0] == metrics[TASK_METRICS[task][0]]
    assert glue.record()["directions"]["loss"] == "min" and glue.record()["metric"] == TASK_METRICS[task][0]


def test_mnli_evaluates_matched_and_mismatched(glue_root):
    glue, model, test = fine_tune(glue_root, "mnli", steps=2)
    metrics = glue.evaluate(model, test)
    assert test.groups == ("matched", "mismatched") and metrics["num_samples"] == 34
    assert {"acc", "acc_matched", "acc_mismatched", "score"} <= set(metrics)
    assert "matched" in glue.describe(metrics)
