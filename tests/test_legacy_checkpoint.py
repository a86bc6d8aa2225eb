"""A run folder written by an older stackwise_bench still resumes, bit for bit.

``tests/fixtures/legacy_run_523d609`` is a run interrupted in its second epoch by the code at git 523d609 (before
checkpoints were bound to their run and before the trainer's step parts): its ``last.pt`` keeps that version's keys.
``expected.json`` holds what the same run gave uninterrupted, made by that code too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stackwise_bench.train import run

from conftest import compose, read_metrics

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run_523d609"
OVERRIDES = ["trainer.max_epochs=3", "monitors=none", "trainer.threads=1"]
TIMING_KEYS = {"epoch_time_s", "train_img_s", "eval_time_s"}


def numbers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.slow
def test_a_checkpoint_from_before_the_binding_resumes_bit_for_bit(tmp_path):
    run_dir = tmp_path / "legacy"
    shutil.copytree(FIXTURE, run_dir, ignore=shutil.ignore_patterns("expected.json"))
    expected = json.loads((FIXTURE / "expected.json").read_text())

    summary = run(compose([*OVERRIDES, "trainer.resume=true"]), run_dir, overrides=OVERRIDES)

    assert summary["status"] == "completed" and summary["run"]["resumed"]
    assert numbers(read_metrics(run_dir)) == numbers(expected["metrics"])
    assert summary["test"]["top1"] == expected["test"]["top1"]
    assert summary["test"]["confusion_matrix"] == expected["test"]["confusion_matrix"]
