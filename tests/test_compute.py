"""Training compute in every run (FLOPs per epoch and in the summary) and the FLOP budget trainer.max_flops."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from stackwise_bench.build import build_model
from stackwise_bench.train import run

from conftest import compose, read_metrics

BATCH = 32
STEPS_PER_EPOCH = 230 // BATCH  # the tiny synthetic set: 256 images minus 10% validation, drop_last


def flops_by_hand(cfg) -> float:
    """Forward + backward FLOPs of one 32-px image on the configured model, counted here with FlopCounterMode."""
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, 4)
    x = torch.randn(4, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
    return counter.get_total_flops() / 4


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    """resnet8 on the tiny set with a budget of 10.5 steps' FLOPs: 10 steps, i.e. one epoch and 3 steps."""
    per_img = flops_by_hand(compose())
    budget = 10.5 * per_img * BATCH
    overrides = [f"trainer.max_flops={budget!r}", "trainer.max_epochs=50", "trainer.early_stopping_patience=null"]
    run_dir = tmp_path_factory.mktemp("runs") / "budget"
    summary = run(compose(overrides), run_dir)
    return per_img, budget, summary, read_metrics(run_dir)


@pytest.mark.slow
def test_every_epoch_row_and_the_summary_carry_training_flops(tmp_path):
    per_img = flops_by_hand(compose())
    summary = run(compose(), tmp_path / "r")
    rows = read_metrics(tmp_path / "r")
    assert [r["flops"] for r in rows] == pytest.approx([e * STEPS_PER_EPOCH * BATCH * per_img for e in (1, 2)])
    assert [r["depth"] for r in rows] == [1, 1]  # resnet8: one block per stage
    assert summary["train"]["flops"] == pytest.approx(2 * STEPS_PER_EPOCH * BATCH * per_img)
    assert summary["train"]["flops_per_img"] == pytest.approx(per_img)
    assert summary["train"]["mfu"] is None  # no known peak for a CPU


@pytest.mark.slow
def test_a_flop_budget_ends_training_at_its_step_with_the_schedule_at_its_floor(budget_run):
    per_img, budget, summary, rows = budget_run
    steps = int(budget // (per_img * BATCH))
    assert steps == 10 and summary["train"]["steps"] == steps and summary["status"] == "completed"
    assert [r["step"] for r in rows] == [STEPS_PER_EPOCH, steps]  # the last epoch is partial
    spent = summary["train"]["flops"]
    assert spent <= budget < spent + per_img * BATCH  # within one step of the budget
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reached min_lr_ratio=0 at the budget's step
    assert rows[0]["lr"] > 0


def test_a_budget_below_one_step_is_refused_in_one_sentence(tmp_path):
    from stackwise_bench.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        run(compose(["trainer.max_flops=1000.0"]), tmp_path / "r")
    message = str(err.value)
    assert re.fullmatch(r"trainer\.max_flops=1000 is less than one step \(\S+ FLOPs at batch 32\); raise .*\.", message)
