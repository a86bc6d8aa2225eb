"""trainer.ema: the weight average is the textbook EMA, is validated each epoch, picks best.pt, resumes bit for bit."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.evaluation import evaluate_checkpoint
from stackwise_bench.train import run
from stackwise_bench.training.ema import WeightAverage

from conftest import compose, read_metrics, read_summary

TIMING_KEYS = {"epoch_time_s", "train_img_s", "eval_time_s"}
# The whole DeiT recipe on the tiny run: RandAugment, mixup/CutMix (soft targets, label smoothing) and the EMA.
# 160 images: 144 to train on, 4 steps of 32 per epoch, 2 epochs.
RECIPE = [
    "dataset.num_train=160",
    "augmentation=deit",
    "trainer.label_smoothing=0.1",
    "trainer.ema=0.8",
    "trainer.best_weights=ema",
    "monitors=none",
]


def numbers(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.parametrize("warmup_power", [None, 0.75])
def test_average_equals_a_hand_computed_ema(warmup_power):
    """k optimizer steps of a Linear + BatchNorm net; the EMA recomputed in a plain loop over the state dicts."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    decay = 0.9
    average = WeightAverage(model, decay, warmup_power)
    hand = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 8):
        loss = model(torch.randn(16, 4)).square().mean()  # train mode: BatchNorm's running stats move too
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        average.update(model, step)
        d = 0.0 if step == 1 else decay if warmup_power is None else min(decay, 1 - step**-warmup_power)
        for key, value in model.state_dict().items():
            hand[key] = d * hand[key] + (1 - d) * value if value.is_floating_point() else value.clone()
    ema = average.module.state_dict()
    assert ema.keys() == hand.keys()
    for key in hand:
        torch.testing.assert_close(ema[key], hand[key], rtol=1e-6, atol=1e-7, msg=key)
    assert int(ema["1.num_batches_tracked"]) == 7  # integer buffers are copied, not averaged
    assert not torch.equal(ema["0.weight"], model.state_dict()["0.weight"])


@pytest.mark.slow
def test_bad_settings_are_config_errors():
    """The knobs are checked in one place (stackwise_bench/knobs), before anything is built."""
    from stackwise_bench.knobs import check_config

    with pytest.raises(ConfigError, match=r"^trainer\.ema=1\.5 must be a number in \(0, 1\)"):
        check_config(compose(["trainer.ema=1.5"]))
    with pytest.raises(ConfigError, match=r"^trainer\.ema_warmup_power=-1 must be a positive number"):
        check_config(compose(["trainer.ema=0.9", "trainer.ema_warmup_power=-1"]))
    with pytest.raises(ConfigError, match=r"^trainer\.best_weights=ema .* trainer\.ema=null keeps none"):
        check_config(compose(["trainer.best_weights=ema"]))


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ema") / "full"
    summary = run(compose(RECIPE), run_dir)
    return run_dir, summary


@pytest.mark.slow
def test_a_run_validates_the_average_and_keeps_it_in_best_pt(recipe_run):
    run_dir, summary = recipe_run
    rows = read_metrics(run_dir)
    assert summary["status"] == "completed" and summary["train"]["best_weights"] == "ema"
    assert all(0 <= r["val_top1_ema"] <= 100 and r["val_loss_ema"] > 0 for r in rows)
    assert summary["train"]["best_val_top1"] == max(r["val_top1_ema"] for r in rows)  # chosen on the average
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert best["model"].keys() == best["raw_model"].keys() == best["ema"]["model"].keys()
    assert all(torch.equal(best["model"][k], best["ema"]["model"][k]) for k in best["model"])
    assert not all(torch.equal(best["model"][k], best["raw_model"][k]) for k in best["model"])
    assert last["ema"] is not None and "raw_model" not in last  # last.pt: the trained weights + the average
    # the test phase and evaluate read best.pt's model, the average, with no change of their own
    assert evaluate_checkpoint(run_dir)["test"]["top1"] == summary["test"]["top1"]


@pytest.mark.slow
def test_kill_and_resume_with_the_recipe_is_bit_identical(recipe_run, tmp_path, monkeypatch):
    """SIGINT at step 2 of epoch 2: last.pt holds the average; the resumed run mixes, augments, averages and
    tests exactly as the uninterrupted one."""
    full_dir, full = recipe_run
    calls = {"n": 0}
    original_step = torch.optim.lr_scheduler.LambdaLR.step

    def step_then_signal(self, *args, **kwargs):
        original_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1 + 4 + 2:  # LambdaLR steps once when built; 4 steps per epoch
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step_then_signal)
    run_dir = tmp_path / "killed"
    assert run(compose(RECIPE), run_dir)["status"] == "interrupted"
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (1, 2) and state["ema"] is not None
    monkeypatch.undo()
    resumed = run(compose([*RECIPE, "trainer.resume=true"]), run_dir)
    assert resumed["status"] == "completed" and resumed["run"]["resumed"]
    assert numbers(read_metrics(run_dir)) == numbers(read_metrics(full_dir))
    assert resumed["test"]["confusion_matrix"] == full["test"]["confusion_matrix"]


def test_ema_with_a_growing_model_is_refused_before_training(tmp_path):
    cfg = compose(["model=vit_micro_p4", "regime=depth_time", "trainer.ema=0.99", "monitors=none"])
    with pytest.raises(ConfigError, match=r"^trainer\.ema=0\.99 averages a fixed set of weights"):
        run(cfg, tmp_path / "r")
    assert read_summary(tmp_path / "r")["error"]["reason"] == "config"
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
