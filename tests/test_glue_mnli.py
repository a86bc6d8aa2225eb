"""MNLI through the training entrypoint: bert_micro fine-tuned on a tiny MNLI folder in the release's layout
(train.tsv, dev_matched.tsv, dev_mismatched.tsv; tests/test_glue.py's make_glue) records test acc_matched and
acc_mismatched equal to sklearn's accuracy on its predictions.jsonl, and GLUE's MNLI score as their mean."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score
from test_bert_train import glue
from test_glue import make_glue

from stackwise_bench.train import run

from conftest import compose, read_metrics


@pytest.mark.slow
def test_mnli_fine_tune_records_matched_and_mismatched_accuracy_of_its_predictions(tmp_path):
    root = make_glue(tmp_path / "glue")
    assert {p.name for p in (root / "MNLI").iterdir()} == {"train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"}
    summary = run(compose(glue(root, "mnli", "trainer.max_epochs=2")), tmp_path / "mnli")
    assert summary["status"] == "completed", summary.get("error")
    assert summary["task"]["glue_task"] == "mnli" and summary["task"]["metric"] == "acc"
    rows = [json.loads(line) for line in (tmp_path / "mnli" / "predictions.jsonl").read_text().splitlines()]
    parts = {part: [r for r in rows if r["part"] == part] for part in ("matched", "mismatched")}
    assert len(parts["matched"]) == 24 and len(parts["mismatched"]) == 10 and len(rows) == 34
    test = summary["test"]
    expected = {}
    for part, chosen in parts.items():
        label, pred = np.array([r["label"] for r in chosen]), np.array([r["pred"] for r in chosen])
        assert set(label) <= {0, 1, 2} and set(pred) <= {0, 1, 2}
        expected[part] = 100 * accuracy_score(label, pred)
        assert test[f"acc_{part}"] == pytest.approx(expected[part], abs=1e-3), part
    assert test["acc"] == pytest.approx(expected["matched"], abs=1e-3)  # the headline is MNLI-m
    assert test["score"] == pytest.approx((expected["matched"] + expected["mismatched"]) / 2, abs=1e-3)
    split = json.loads((tmp_path / "mnli" / "split.json").read_text())
    assert split["test_from"] == {"matched": "dev_matched.tsv", "mismatched": "dev_mismatched.tsv"}
    assert len(read_metrics(tmp_path / "mnli")) == 2
