"""What a depth-as-time run is tested with: the best validation epoch at its final depth (issue 25).

The validation score is forced to fall after each growth (a patched ``evaluate`` that ranks shallower networks
higher), so the policy that picked best.pt before, the best validation over all epochs, would test the 1-block
network of epoch 1; the runs here must test, record and count the final 4-block one.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from stackwise_bench.build import build_model
from stackwise_bench.nn.growth import depth_of
from stackwise_bench.train import run
from stackwise_bench.training.checkpointing import Progress
from stackwise_bench.training.regime import TESTED, Classical, DepthTime
from stackwise_bench.training.tasks import ImageClassification

from conftest import compose, read_metrics

# vit_micro_p4 at depth 4 on digits: stacks derived [1, 2, 4] over equal thirds; 20 steps an epoch at batch 64,
# 80 steps in 4 epochs, growths at steps 27 and 53: epochs 1 and 2 end at depths 1 and 2, epochs 3 and 4 at 4.
GROW = [
    "dataset=digits",
    "model=vit_micro_p4",
    "model.depth=4",
    "regime=depth_time",
    "trainer.max_epochs=4",
    "trainer.batch_size=64",
    "trainer.early_stopping_patience=1",  # the old loop stopped after epoch 2 (epoch 1 best, epoch 2 worse)
    "optimizer.lr=3e-3",
    "scheduler.warmup_epochs=1",
    "monitors=none",
]
FINAL = 4


@pytest.fixture
def falling_validation(monkeypatch):
    """Validation top-1 of ``100 - 10 x depth``: every growth makes it worse (the loss stays the model's own, so
    ties among the final-depth epochs go to the lower loss). ``interrupt`` sends SIGINT during the validation call
    of that number (1-based) or, with "test", during the test phase."""
    real = ImageClassification.evaluate
    calls = {"val": 0, "interrupt": None}

    def evaluate(self, model, loader, full=False, stop=None):
        if full:
            if calls["interrupt"] == "test":
                calls["interrupt"] = None
                os.kill(os.getpid(), signal.SIGINT)
            return real(self, model, loader, full=True, stop=stop)
        calls["val"] += 1
        if calls["val"] == calls["interrupt"]:
            os.kill(os.getpid(), signal.SIGINT)
        metrics = real(self, model, loader)
        return {**metrics, "top1": 100.0 - 10 * depth_of(getattr(model, "_orig_mod", model))}

    monkeypatch.setattr(ImageClassification, "evaluate", evaluate)
    return calls


def final_model_count() -> int:
    """The configured 4-block model's parameters, built here (not grown)."""
    model, _, _ = build_model(compose(GROW), 10)
    assert depth_of(model) == FINAL
    return sum(p.numel() for p in model.parameters())


def best_final_epoch(rows: list[dict]) -> int:
    """The epoch the policy must pick, from metrics.jsonl: the best (top-1, then lower loss) at the final depth."""
    final = [r for r in rows if r["depth"] == FINAL]
    return max(final, key=lambda r: (r["val_top1"], -r["val_loss"]))["epoch"]


def check_tested_at_final_depth(run_dir, summary) -> None:
    rows = read_metrics(run_dir)
    assert [r["depth"] for r in rows] == [1, 2, 4, 4]
    assert rows[0]["val_top1"] > rows[-1]["val_top1"]  # the best validation overall is before the last growth
    expected = best_final_epoch(rows)
    test, total = summary["test"], final_model_count()
    assert summary["train"]["best_epoch"] == test["checkpoint_epoch"] == expected
    assert test["checkpoint_depth"] == FINAL and test["checkpoint_policy"] == TESTED
    assert test["checkpoint_params"] == {"total": total, "trainable": total}
    assert summary["params"]["total"] == summary["params"]["trainable"] == total and summary["params"]["depth"] == 4
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["progress"]["epoch"] == expected
    assert {int(k.split(".")[1]) for k in best["model"] if k.startswith("blocks.")} == set(range(FINAL))
    assert sum(v.numel() for k, v in best["model"].items()) == total  # timm's ViT keeps no buffers


@pytest.mark.slow
def test_a_run_whose_best_validation_is_before_the_last_growth_is_tested_at_its_final_depth(
    tmp_path, falling_validation
):
    summary = run(compose(GROW), tmp_path / "grown")
    # patience counts final-depth evaluations only: the run trains its whole budget, whatever epoch 2 scored
    assert summary["status"] in ("completed", "early_stopped") and summary["train"]["epochs_run"] == 4
    check_tested_at_final_depth(tmp_path / "grown", summary)


def make_best_stale(run_dir) -> None:
    """What a checkpoint of the code before this policy held: epoch 1 (depth 1) as the best, patience spent on it."""
    path = run_dir / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    first = state["progress"]["history"][0]
    state["progress"].update(best_epoch=1, best_score=[first["val_top1"], -first["val_loss"]], bad_evals=1)
    state["progress"].update(best_val_top1=first["val_top1"], best_val_loss=first["val_loss"])
    torch.save(state, path)


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", [3, "test"], ids=["after_epoch_3", "in_the_test_phase"])
def test_a_resumed_checkpoint_whose_best_is_before_the_last_growth_chooses_again(
    tmp_path, falling_validation, interrupt
):
    """Interrupted after epoch 3 (one final-depth epoch left to train), or in the test phase (none left: the last
    epoch becomes best.pt), with last.pt rewritten to name epoch 1 as best: the resume tests a 4-block network."""
    falling_validation["interrupt"] = interrupt
    run_dir = tmp_path / "resumed"
    assert run(compose(GROW), run_dir)["status"] == "interrupted"
    make_best_stale(run_dir)
    summary = run(compose([*GROW, "trainer.resume=true"]), run_dir)
    assert summary["status"] in ("completed", "early_stopped") and summary["train"]["epochs_run"] == 4
    check_tested_at_final_depth(run_dir, summary)
    if interrupt == "test":
        assert summary["test"]["checkpoint_epoch"] == 4  # the only final-depth weights left to test


# ------------------------------------------------------------------------------------ the policy, unit by unit


def test_only_steps_after_the_last_growth_are_at_the_final_depth():
    regime = DepthTime([1, 2, 4], [0.25, 0.5])
    regime.plan(12)  # growths before steps 4 and 7 (after 3 and 6 steps done)
    assert [regime.at_final_depth(s) for s in range(13)] == [False] * 7 + [True] * 6
    assert all(Classical().at_final_depth(s) for s in range(13))
    single = DepthTime([4], [])
    single.plan(12)
    assert single.at_final_depth(0)  # nothing to grow: every epoch is final
    assert Classical.tested == DepthTime.tested == TESTED


def test_forgetting_the_best_starts_the_choice_over():
    progress = Progress(epoch=3, best_epoch=1, best_score=[90.0, -0.5], best_val_top1=90.0, best_val_loss=0.5)
    progress.bad_evals, progress.history = 2, [{"epoch": 1, "step": 20}, {"epoch": 2, "step": 40}]
    assert progress.best_step() == 20
    progress.forget_best()
    fresh = Progress()
    assert (progress.best_epoch, progress.best_score, progress.bad_evals) == (0, None, 0)
    assert (progress.best_val_top1, progress.best_val_loss) == (fresh.best_val_top1, fresh.best_val_loss)
    assert progress.epoch == 3 and len(progress.history) == 2  # where training stands is kept
