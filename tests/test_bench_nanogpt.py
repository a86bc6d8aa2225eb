"""The nanoGPT figure (stackwise_bench/bench/lm.py): nanoGPT's own train.py and stackwise_bench.train on one token
file, one shape and one recipe, timed by one clock and scored by one judge.

No speed or loss is asserted: the figure's numbers come from running the benchmark, not from tests.
"""

from __future__ import annotations

import hashlib
import math
import statistics

import pytest
import torch
from scipy import stats

from stackwise_bench.bench import harness, lm
from stackwise_bench.bench.figures import FIGURES

# A few steps: 12 updates (nanoGPT does 13), an evaluation every 6, one seed; the judge reads 4,096 val ids.
TINY = lm.LMSize(
    steps=12,
    seeds=(1,),
    eval_interval=6,
    warmup=2,
    eval_iters=2,
    judge_tokens=4096,
    project_extra=("dataset.val_tokens=2048", "monitors=none", "diagnostics=none"),
)
# karpathy/nanoGPT at 3adf61e154c3fe3fca428ad6bc3818b27a3b8291, vendored unchanged
NANOGPT_SHA256 = {
    "LICENSE": "a59ec5cdb1c1e447e5266a014b3e7ded511f8d6e5a08931e931c87490ff821fe",
    "configurator.py": "5cc23aca26b4ab3c0d9e5f82740f4781f9444f42718c15abcee70d93c5aabe8f",
    "model.py": "7c01703240dbec5d554527dc666e35b3df8391d0b117fddc07afcf325a21d11c",
    "train.py": "413bd97b40bb400a2a0d01230e2946f056c263ebac1b7281c2367d964a123085",
}


def test_registered_and_vendored_unchanged_with_its_licence():
    assert FIGURES["nanogpt"] is lm.fig_nanogpt
    for name, digest in NANOGPT_SHA256.items():
        assert hashlib.sha256((lm.NANOGPT_DIR / name).read_bytes()).hexdigest() == digest, name
    assert "MIT License" in (lm.NANOGPT_DIR / "LICENSE").read_text()


def test_project_overrides_compose_to_nanogpts_recipe(tmp_path):
    setup = {"device": "cpu", "nanogpt": [], "project": []}
    argv = lm.project_argv(lm.SIZES["full"], setup, tmp_path, tmp_path / "run", seed=3)
    cfg = harness.compose([a for a in argv if not a.startswith("hydra.")])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.context) == (4, 4, 128, 64)
    assert cfg.model.nanogpt is True and cfg.model.dropout == 0.0 and cfg.dataset.tokenizer == "byte"
    assert (cfg.dataset.seq_len, cfg.trainer.batch_size, cfg.trainer.grad_clip) == (64, 12, 1.0)
    assert cfg.dataset.steps_per_epoch * cfg.trainer.max_epochs == 2000 and cfg.trainer.early_stopping_patience is None
    assert list(cfg.optimizer.betas) == [0.9, 0.99] and (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (1e-3, 0.1)
    assert cfg.scheduler.warmup_epochs * cfg.dataset.steps_per_epoch == 100
    assert cfg.scheduler.min_lr_ratio == pytest.approx(0.1) and cfg.seed == 3
    nano = lm.nanogpt_argv(lm.SIZES["full"], setup, "out")
    assert {"--max_iters=2000", "--lr_decay_iters=2000", "--warmup_iters=100", "--bias=True", "--beta2=0.99"} <= set(
        nano
    )


def test_step_seconds_leave_out_the_first_five_steps_and_evaluations():
    # 17 updates: interval i runs from the end of update i + 1 to the end of update i + 2. Updates 2-5 are slow
    # (not timed), and so are the intervals after 6 and 12 updates, which hold an evaluation.
    slow = {0: 100.0, 1: 100.0, 2: 100.0, 3: 100.0, 5: 50.0, 11: 60.0}
    intervals = [slow.get(i, float(i)) for i in range(16)]
    median, timed = lm.step_seconds({"side": "x", "intervals_s": intervals, "evals_after": [0, 6, 12]})
    assert timed == 10 and median == statistics.median([4, 6, 7, 8, 9, 10, 12, 13, 14, 15])


def test_welch_interval_agrees_with_scipy():
    a, b = [2.10, 2.14, 2.12], [2.11, 2.16, 2.19]
    test = lm.welch(a, b)
    t = stats.ttest_ind(a, b, equal_var=False)
    lo, hi = t.confidence_interval(0.95)
    assert test["ci"] == pytest.approx([lo, hi]) and test["within_noise"] == (t.pvalue > 0.05)
    assert lm.welch([1.0], [2.0])["ci"] is None
    assert lm.welch([2.10, 2.14], [2.11, 2.16])["within_noise"] is None  # 2 seeds a side: no verdict


@pytest.mark.slow
def test_both_sides_train_on_the_same_token_file(tmp_path):
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    speed, loss = lm.fig_nanogpt(harness.BUDGETS["quick"], work, size=TINY, cache_dir=cache)
    files = lm.token_files(cache)
    ours, theirs = speed["runs"]["stackwise"], speed["runs"]["nanoGPT"]
    assert len(ours) == len(theirs) == 1
    ours, theirs = ours[0], theirs[0]
    # both ran: the project 12 updates, nanoGPT max_iters + 1, and the same judge scored both after 12
    assert ours["updates"] == 12 and theirs["updates"] == 13
    assert ours["val_targets"] == theirs["val_targets"] == 4095 and ours["params"] == theirs["params"] == 834304
    # the same files, by path and by content
    cached = [str((files["entry"] / f"{s}.bin").resolve()) for s in ("train", "val")]
    assert ours["read"] == theirs["read"] == cached
    for s in ("train", "val"):
        assert hashlib.sha256((files["entry"] / f"{s}.bin").read_bytes()).hexdigest() == files[f"{s}_sha256"]
    # the rows are computed from the runs
    for run in (ours, theirs):
        assert run["timed_steps"] >= 1 and run["step_ms"] > 0 and math.isfinite(run["val_loss"])
        assert run["own_val_loss"] is not None and math.isfinite(run["own_val_loss"])
    tokens = lm.SHAPE["batch_size"] * lm.SHAPE["block_size"]
    assert speed["a_median"] == pytest.approx(tokens / (ours["step_ms"] / 1e3))
    assert speed["b_median"] == pytest.approx(tokens / (theirs["step_ms"] / 1e3))
    assert speed["ratio"] == pytest.approx(speed["a_median"] / speed["b_median"]) and speed["goal"] == ">= 1.0"
    assert (loss["a_median"], loss["b_median"]) == (ours["val_loss"], theirs["val_loss"])
    assert loss["loss_diff"] == pytest.approx(ours["val_loss"] - theirs["val_loss"])
    assert loss["within_seed_noise"] is None  # one seed a side: no interval
    assert speed["differences"] == loss["differences"] == list(lm.DIFFERENCES)
    assert ours["threads"] == theirs["threads"] == torch.get_num_threads()
