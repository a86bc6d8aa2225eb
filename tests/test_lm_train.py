"""Causal language models through the training entrypoint: model=gpt_micro dataset=shakespeare, in-process on the
real composed config (tiny windows and batches), and once through the command line."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.knobs import check_config
from stackwise_bench.train import run

from conftest import ROOT, compose, read_metrics, read_summary

TIMING_KEYS = {"epoch_time_s", "train_token_s", "eval_time_s"}
STEPS = 4  # dataset.steps_per_epoch


def tiny(cache, *extra: str) -> list[str]:
    """gpt_micro on the plays' bytes: windows of 16 tokens, 4 per batch, 4 steps per epoch, 3 epochs."""
    return [
        "model=gpt_micro",
        "dataset=shakespeare",
        "trainer.max_epochs=3",
        f"dataset.steps_per_epoch={STEPS}",
        "trainer.batch_size=4",
        "dataset.seq_len=16",
        "dataset.val_tokens=512",
        "dataset.test_tokens=1024",
        f"dataset.cache_dir={cache}",
        "trainer.threads=1",
        *extra,
    ]


def numbers(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokens")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("lm") / "baseline"
    cfg = compose(tiny(cache))
    return cfg, run_dir, run(cfg, run_dir)


@pytest.mark.slow
def test_pinned_validation_loss_and_run_record(lm_run):
    _, run_dir, summary = lm_run
    assert summary == read_summary(run_dir) and summary["status"] == "completed"
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["step"] for r in rows] == [4, 8, 12]
    # pinned on a CPU with one thread (fp32, deterministic kernels): any change to the data, the windows, the model
    # or the loop moves it
    assert rows[0]["val_loss"] == pytest.approx(4.610062, abs=1e-5)
    for r in rows:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2))  # bytes: one token per byte
        assert r["train_token_s"] > 0 and r["flops"] > 0
    train, test = summary["train"], summary["test"]
    assert train["token_s"] > 0 and train["steps"] == 3 * STEPS
    assert train["flops"] == pytest.approx(train["flops_per_token"] * 3 * STEPS * 4 * 16)
    assert train["flops_per_token"] == 6 * (834304 - 64 * 128) + 12 * 4 * 4 * 32 * 16  # 6N + 12·L·H·Q·T
    assert test["tokens"] == 1023 and test["bytes"] == 1023  # dataset.test_tokens ids: every one but the first a target
    split = json.loads((run_dir / "split.json").read_text())
    assert split["corpus"] == "shakespeare" and len(split["corpus_sha256"]) == len(split["tokenizer_sha256"]) == 64
    assert not set(split["splits"]["train"]) & (set(split["splits"]["val"]) | set(split["splits"]["test"]))
    assert summary["data"]["tokenizer"]["name"] == "byte" and summary["params"]["depth"] == 4


@pytest.mark.slow
def test_bits_per_byte_are_total_nats_over_ln2_bytes(lm_run):
    test = lm_run[2]["test"]
    assert test["bpb"] == pytest.approx(test["nats"] / (math.log(2) * test["bytes"]), rel=1e-12)
    assert test["loss"] == pytest.approx(test["nats"] / test["tokens"], rel=1e-12)
    assert test["ppl"] == pytest.approx(math.exp(test["loss"]), rel=1e-12)


@pytest.mark.slow
def test_task_record_is_lower_is_better_and_best_is_the_lowest_loss(lm_run):
    from stackwise_bench.analysis.pipeline import analyze_runs

    _, run_dir, summary = lm_run
    task = summary["task"]
    assert task["name"] == "causal_lm" and task["metric"] == "loss" and task["unit"] == "token"
    assert task["directions"] == {"loss": "min", "ppl": "min", "bpb": "min", "word_ppl": "min"}
    assert task["ranges"]["loss"] == {"low": 0, "high": None}
    rows = read_metrics(run_dir)
    best = min(rows, key=lambda r: r["val_loss"])
    assert summary["train"]["best_epoch"] == best["epoch"] == summary["test"]["checkpoint_epoch"]
    assert summary["train"]["best_val_loss"] == best["val_loss"]
    analysis = analyze_runs(run_dir)
    assert analysis.metric == "test.loss" and analysis.direction == "min"
    assert {"test.ppl", "test.bpb"} <= set(analysis.summary["metric"])  # shown beside the loss


@pytest.mark.slow
def test_rerun_is_bit_identical(lm_run, tmp_path):
    cfg, first_dir, summary = lm_run
    again = run(cfg, tmp_path / "again")
    assert numbers(read_metrics(tmp_path / "again")) == numbers(read_metrics(first_dir))
    assert again["test"]["nats"] == summary["test"]["nats"]


@pytest.mark.slow
def test_accumulated_micro_batches_train_the_same_steps(lm_run, tmp_path, cache):
    """trainer.accumulate=2 runs each batch of 4 windows as 2 micro-batches of 2: the same steps, FLOPs and LR
    schedule, and the same losses up to float rounding (gpt_micro has no batch statistics)."""
    _, first_dir, summary = lm_run
    again = run(compose(tiny(cache, "trainer.accumulate=2")), tmp_path / "accumulated")
    rows, base = read_metrics(tmp_path / "accumulated"), read_metrics(first_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in base] and again["train"]["flops"] == summary["train"][
        "flops"
    ]
    assert [r["lr"] for r in rows] == [r["lr"] for r in base]
    for key in ("train_loss", "val_loss"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in base], rel=1e-5)
    assert again["test"]["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-5)


@pytest.mark.slow
def test_interrupt_and_resume_matches_uninterrupted(lm_run, tmp_path, monkeypatch, cache):
    """SIGINT at step 3 of epoch 2: last.pt holds the windows' generator; the resume draws the batches the
    uninterrupted run drew, and ends on its numbers bit for bit."""
    _, full_dir, full = lm_run
    calls = {"n": 0}
    original_step = torch.optim.lr_scheduler.LambdaLR.step

    def step_then_signal(self, *args, **kwargs):
        original_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1 + STEPS + 3:  # LambdaLR steps once when it is built
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step_then_signal)
    run_dir = tmp_path / "cut"
    assert run(compose(tiny(cache)), run_dir)["status"] == "interrupted"
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1 and state["progress"]["step"] == 3
    assert state["windows"]["drawn"] == STEPS + 3
    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", original_step)
    resumed = run(compose(tiny(cache, "trainer.resume=true")), run_dir)
    assert resumed["status"] == "completed" and resumed["run"]["resumed"]
    assert numbers(read_metrics(run_dir)) == numbers(read_metrics(full_dir))
    assert resumed["test"]["nats"] == full["test"]["nats"]


@pytest.mark.slow
def test_a_token_budget_trains_the_steps_it_buys_with_the_schedule_spanning_them(tmp_path, cache):
    """dataset.train_tokens=1000 at 4 x 16 tokens a step buys ceil(1000 / 64) = 16 steps: four epochs of 4 steps
    (trainer.max_epochs=3 is not used), the LR at the end of its schedule; the depth-time arm grows within them
    and the matched classical arm spends what it spends."""
    summary = run(compose(tiny(cache, "dataset.train_tokens=1000")), tmp_path / "budget")
    rows = read_metrics(tmp_path / "budget")
    assert [r["step"] for r in rows] == [4, 8, 12, 16] and summary["train"]["steps"] == 16
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0 at its last step
    odd = run(compose(tiny(cache, "dataset.train_tokens=900")), tmp_path / "odd")  # 15 steps: the last epoch partial
    assert [r["step"] for r in read_metrics(tmp_path / "odd")] == [4, 8, 12, 15] and odd["train"]["steps"] == 15
    grown = run(compose(tiny(cache, "dataset.train_tokens=900", "regime=depth_time")), tmp_path / "grown")
    matched = run(compose(tiny(cache, "dataset.train_tokens=900", "regime=classical_matched")), tmp_path / "matched")
    assert grown["train"]["steps"] == 15 and [r["depth"] for r in read_metrics(tmp_path / "grown")][-1] == 4
    step_cost = matched["train"]["flops_per_token"] * 4 * 16
    assert matched["train"]["flops"] <= grown["train"]["flops"] < matched["train"]["flops"] + step_cost
    with pytest.raises(ConfigError, match="dataset.train_tokens=900 sets this run's budget in tokens, and"):
        check_config(compose(tiny(cache, "dataset.train_tokens=900", "trainer.max_flops=1e9")))


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_continues_bit_for_bit(tmp_path, cache):
    """kill -9 once the first epoch's row is written (the run is then inside epoch 2: no handler runs, nothing is
    saved); the resume starts from epoch 1's last.pt, whose windows generator redraws epoch 2's batches."""
    import time

    args = tiny(cache, "dataset.steps_per_epoch=40", "monitors=none")  # composed alike here (tiny=False) and there
    run_dir = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "stackwise_bench.train", *args, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip():
        assert time.monotonic() < deadline and proc.poll() is None, "the run ended before its first epoch was seen"
        time.sleep(0.01)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert len(read_metrics(run_dir)) < 3 and read_summary(run_dir)["status"] == "running"  # killed mid-run
    resumed = run(compose([*args, "trainer.resume=true"], tiny=False), run_dir)
    reference = run(compose(args, tiny=False), tmp_path / "reference")
    assert resumed["status"] == reference["status"] == "completed" and resumed["run"]["resumed"]
    assert numbers(read_metrics(run_dir)) == numbers(read_metrics(tmp_path / "reference"))
    assert resumed["test"]["nats"] == reference["test"]["nats"]


@pytest.mark.slow
def test_resume_on_another_tokenizer_is_refused(lm_run, tmp_path, cache):
    import shutil

    _, full_dir, _ = lm_run
    run_dir = shutil.copytree(full_dir, tmp_path / "copy")
    (run_dir / "summary.json").write_text(json.dumps({**read_summary(run_dir), "status": "interrupted"}))
    split = json.loads((run_dir / "split.json").read_text())
    split["tokenizer_sha256"] = split["sha256"] = "0" * 64  # as if it had been trained on other ids
    (run_dir / "split.json").write_text(json.dumps(split))
    with pytest.raises(ConfigError, match="the data changed since this run started"):
        run(compose(tiny(cache, "trainer.resume=true")), run_dir)


@pytest.mark.slow
def test_depth_time_grows_gpt_micro(tmp_path, cache):
    summary = run(compose(tiny(cache, "regime=depth_time")), tmp_path / "grow")
    assert [r["depth"] for r in read_metrics(tmp_path / "grow")] == [1, 2, 4]
    assert summary["test"]["checkpoint_depth"] == 4 and summary["params"]["depth"] == 4


@pytest.mark.slow
def test_lora_on_gpt_micro_adapts_the_family_targets(tmp_path, cache):
    summary = run(compose(tiny(cache, "lora.rank=8", "trainer.max_epochs=1")), tmp_path / "lora")
    assert summary["status"] == "completed"
    assert summary["adapter"] == {"method": "lora", "rank": 8, "targets": ["c_attn"], "layers": 4}
    assert summary["params"]["trainable"] == 4 * 8 * (128 + 3 * 128) == summary["params"]["lora"]
    adapters, n = summary["params"]["lora"], 834304 - 64 * 128 + summary["params"]["lora"]  # less the positions
    assert summary["train"]["flops_per_token"] == 4 * n + 2 * adapters + 12 * 4 * 4 * 32 * 16  # frozen: no 6N


@pytest.mark.parametrize(
    "overrides, refusal",
    [
        (["model=resnet8", "dataset=shakespeare"], "model=resnet8 is an image model and dataset.corpus=shakespeare"),
        (["model=gpt_micro", "dataset=digits"], "model=gpt_micro is a language model and dataset digits holds images"),
        (["model=gpt_micro", "dataset=shakespeare", "dataset.seq_len=65"], "beyond model=gpt_micro's context of 64"),
        (
            ["model=gpt_micro", "dataset=shakespeare", "model.vocab_size=100"],
            "model.vocab_size=100 is smaller than the 256 ids of dataset.tokenizer=byte",
        ),
        (["model=gpt_micro", "dataset=text"], r"dataset.root=\?\?\? must be set"),
        (["model=gpt_micro", "dataset=shakespeare", "precision=fp8"], "precision=fp8 is not wired for language models"),
        (
            ["model=gpt_micro", "dataset=shakespeare", "lora.rank=8", "lora.method=qalora"],
            "lora.method=qalora quantizes image models' layers",
        ),
        (["model=gpt_micro", "dataset=shakespeare", "trainer.batch_size=4", "trainer.accumulate=5"], "accumulate=5"),
        (
            ["model=gpt_micro", "dataset=shakespeare", "lora.rank=4", "lora.method=oft"],
            "lora.method=oft has no adapter in peft for GPT-2's Conv1D projections",
        ),
    ],
)
def test_bad_input_is_refused_in_one_sentence(overrides, refusal):
    with pytest.raises(ConfigError, match=refusal) as err:
        check_config(compose(overrides))
    assert str(err.value).replace("e.g. ", "").count(". ") == 0 and str(err.value).endswith(".")


def test_refusals_come_before_any_tokenizing(tmp_path):
    """A vocabulary the built model lacks is refused by the run before the token cache is touched."""
    cfg = compose(tiny(tmp_path / "cache", "model.vocab_size=100"))
    with pytest.raises(ConfigError, match="model.vocab_size=100 is smaller"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_command_line_run(tmp_path):
    run_dir = tmp_path / "cli"
    args = [
        "model=gpt_micro",
        "dataset=shakespeare",
        "trainer.max_epochs=1",
        "dataset.steps_per_epoch=2",
        "trainer.batch_size=2",
        "dataset.seq_len=16",
        "dataset.val_tokens=256",
        "dataset.test_tokens=256",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "monitors=none",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "stackwise_bench.train", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["task"]["metric"] == "loss"
    assert {"loss", "ppl", "bpb"} <= set(summary["test"]) and summary["train"]["flops_per_token"] > 0
