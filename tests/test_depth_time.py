"""regime=depth_time end to end: growth at the planned step, FLOPs at each depth's rate, kill + resume after a
growth, a best.pt from before a growth (older runs) loading into the grown model, and the refusals."""

from __future__ import annotations

import os
import re
import signal

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from stackwise_bench.build import build_model
from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.growth import depth_of, match_depth, truncate
from stackwise_bench.train import run

from conftest import compose, read_metrics

BATCH = 32
STEPS_PER_EPOCH = 230 // BATCH  # the tiny synthetic set: 256 images minus 10% validation, drop_last
GROW = ["model=resnet14", "regime=depth_time", "regime.init=identity", "trainer.max_epochs=3"]
TIMING_KEYS = {"epoch_time_s", "train_img_s", "eval_time_s"}


def numbers(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def rate(cfg, depth: int) -> float:
    """FLOPs of one 32-px image, forward + backward, at ``depth`` blocks per stage: counted here by hand."""
    model, _, _ = build_model(cfg, 4)
    truncate(model, depth)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.zeros(4, dtype=torch.long)).backward()
    return counter.get_total_flops() / 4


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "grown"
    summary = run(compose(GROW), run_dir)
    return run_dir, summary, read_metrics(run_dir)


@pytest.mark.slow
def test_the_model_grows_at_the_planned_step_and_flops_follow_each_depth(grown_run):
    _, summary, rows = grown_run
    total = 3 * STEPS_PER_EPOCH
    grow_at = int(0.5 * total + 0.5)  # boundaries [0.5] of 21 steps: step 11, in epoch 2
    assert summary["status"] == "completed"
    assert summary["train"]["regime"] == "depth_time" and summary["train"]["growth_steps"] == [grow_at]
    assert [r["depth"] for r in rows] == [1, 2, 2]  # the depth at each epoch's end
    cfg = compose(GROW)
    shallow, deep = rate(cfg, 1), rate(cfg, 2)
    expected = [e * STEPS_PER_EPOCH * BATCH * shallow for e in (1,)] + [
        (grow_at * shallow + (e * STEPS_PER_EPOCH - grow_at) * deep) * BATCH for e in (2, 3)
    ]
    assert [r["flops"] for r in rows] == pytest.approx(expected)
    full = rate(cfg, 2) * total * BATCH
    assert summary["train"]["flops"] < 0.8 * full  # the point of growing: less compute than classical training
    assert summary["params"]["total"] == sum(p.numel() for p in build_model(cfg, 4)[0].parameters())
    assert summary["test"]["checkpoint_depth"] == 2 and summary["test"]["checkpoint_epoch"] in (2, 3)  # final depth
    assert summary["test"]["checkpoint_params"]["total"] == summary["params"]["total"]


@pytest.mark.slow
def test_kill_after_a_growth_then_resume_matches_the_uninterrupted_run(grown_run, tmp_path, monkeypatch):
    full_dir, full_summary, _ = grown_run
    calls = {"n": 0}
    original = torch.optim.lr_scheduler.LambdaLR.step

    def step_then_signal(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1 + 13:  # LambdaLR steps once when built; step 13 is after the growth at step 11
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step_then_signal)
    run_dir = tmp_path / "killed"
    assert run(compose(GROW), run_dir)["status"] == "interrupted"
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["regime"]["stage"] == 1 and state["progress"]["global_step"] == 13
    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", original)
    resumed = run(compose([*GROW, "trainer.resume=true"]), run_dir)
    assert resumed["status"] == "completed"
    assert numbers(read_metrics(run_dir)) == numbers(read_metrics(full_dir))
    assert resumed["test"]["confusion_matrix"] == full_summary["test"]["confusion_matrix"]


def test_a_checkpoint_from_before_a_growth_loads_into_the_grown_model():
    cfg = compose(["model=resnet14"])
    shallow, _, _ = build_model(cfg, 4)
    truncate(shallow, 1)
    grown, _, _ = build_model(cfg, 4)
    match_depth(grown, shallow.state_dict())
    assert depth_of(grown) == 1
    grown.load_state_dict(shallow.state_dict())  # strict: every key matches
    deep, _, _ = build_model(cfg, 4)
    match_depth(deep, deep.state_dict())
    assert depth_of(deep) == 2  # a state of its own depth changes nothing


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model=vit_micro_p4", "regime=depth_time", "lora.rank=4"],
            r"regime=depth_time grows the model's blocks during training, and lora.rank=4 freezes them",
        ),
        (["model=resnet14", "regime=depth_time", "trainer.compile=true"], r"use trainer.compile=false"),
        (
            ["model=resnet14", "regime=depth_time", "regime.init=identity", "trainer.max_flops=1e12"],
            r"trainer.max_flops applies to regime=classical",
        ),
        (["model=resnet14", "regime=depth_time", "regime.stacks=[1,3]"], r"regime.stacks"),
        (
            ["model=resnet14", "regime=depth_time", "regime.boundaries=[0.5,0.7]"],
            r"^regime.boundaries=\[0.5, 0.7\] has 2 entries but regime.stacks=\[1, 2\] \(derived from the model's "
            r"depth 2; set regime.stacks to choose\) needs 1",
        ),
    ],
)
def test_combinations_that_make_no_sense_are_refused_in_one_sentence(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        run(compose(overrides), tmp_path / "r")
    text = str(err.value)
    assert re.search(message, text), text
    assert text.count(". ") <= 1 and "\n" not in text


QUICK = [  # scripts/depth_time.sh's QUICK=1 form, 3 epochs
    "experiment=depth_time",
    "dataset=digits",
    "model=vit_micro_p4",
    "model.depth=4",
    "regime.stacks=[1,2,4]",
    "trainer.max_epochs=3",
    "trainer.batch_size=64",
    "optimizer.lr=3e-3",
    "scheduler.warmup_epochs=1",
]


@pytest.mark.slow
def test_the_preset_trains_in_its_quick_form_and_the_matched_arm_spends_the_same_flops(tmp_path):
    grown = run(compose([*QUICK, "regime=depth_time_interleave"]), tmp_path / "grown")
    matched = run(compose([*QUICK, "regime=classical_matched"]), tmp_path / "matched")
    assert grown["status"] == matched["status"] == "completed"
    assert [r["depth"] for r in read_metrics(tmp_path / "grown")] == [1, 2, 4]  # growths at steps 20 and 40 of 60
    assert grown["train"]["growth_steps"] == [20, 40]
    assert [r["depth"] for r in read_metrics(tmp_path / "matched")] == [4, 4]  # full depth, fewer steps
    step_cost = matched["train"]["flops_per_img"] * 64
    assert matched["train"]["flops"] <= grown["train"]["flops"] < matched["train"]["flops"] + step_cost
    assert read_metrics(tmp_path / "matched")[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # its schedule ended


@pytest.mark.slow
def test_evaluate_rebuilds_the_grown_network_and_reproduces_the_test_metrics(grown_run):
    from stackwise_bench.evaluation import evaluate_checkpoint

    run_dir, summary, _ = grown_run
    again = evaluate_checkpoint(run_dir)
    assert again["status"] == "completed"
    assert again["test"]["top1"] == summary["test"]["top1"] and again["test"]["matches_recorded"] is True


@pytest.mark.slow
def test_kill_9_during_a_depth_time_run_then_resume_gives_the_uninterrupted_metrics(tmp_path):
    """SIGKILL leaves the last epoch's checkpoint (stage 0 here, or 1); the resume regrows to it and, where the
    kill came before the growth, grows again at the same step: the same numbers as a run never killed."""
    import subprocess
    import sys
    import time

    from conftest import ROOT, TINY

    tiny = [o for o in TINY if not o.startswith("monitors")]
    args = [*tiny, *GROW, "dataset.num_train=1024", "trainer.threads=1", "monitors=none"]  # 28 steps an epoch
    run_dir = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stackwise_bench.train", *args, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip():
        assert time.monotonic() < deadline and proc.poll() is None, "the run ended before its first epoch was seen"
        time.sleep(0.02)
    proc.kill()  # kill -9: no handler runs, nothing is saved beyond the epoch's checkpoint
    proc.wait(timeout=60)
    resumed = run(compose([*args, "trainer.resume=true"], tiny=False), run_dir)
    reference = run(compose(args, tiny=False), tmp_path / "reference")
    assert resumed["status"] == reference["status"] == "completed"
    assert numbers(read_metrics(run_dir)) == numbers(read_metrics(tmp_path / "reference"))
    assert [r["depth"] for r in read_metrics(run_dir)] == [1, 2, 2]
    assert resumed["test"]["confusion_matrix"] == reference["test"]["confusion_matrix"]


@pytest.mark.slow
def test_the_lr_rewarms_over_the_steps_after_a_growth(tmp_path, monkeypatch):
    """regime.lr_rewarm_steps=4: the LR each optimizer step uses is 1/4, 2/4, 3/4 of the schedule's from the growth
    on, then the schedule's own (compared with the same run without rewarm: the schedule does not depend on it)."""
    used = []
    original = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    run(compose(GROW), tmp_path / "plain")
    plain, used[:] = list(used), []
    run(compose([*GROW, "regime.lr_rewarm_steps=4"]), tmp_path / "rewarm")
    grow_at = int(0.5 * 3 * STEPS_PER_EPOCH + 0.5)  # the optimizer step with index grow_at runs right after growth
    ratios = [r / p for r, p in zip(used, plain)]
    assert ratios[:grow_at] == pytest.approx([1.0] * grow_at)
    assert ratios[grow_at : grow_at + 4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert ratios[grow_at + 4 :] == pytest.approx([1.0] * (len(plain) - grow_at - 4))
