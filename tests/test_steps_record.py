"""steps.jsonl: the training steps' loss, learning rate and gradient norm in the run folder (step 1 and every
``trainer.log_every_n_steps``-th), with or without trackers; fenced and trimmed on resume like metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stackwise_bench.analysis import collect_runs
from stackwise_bench.analysis.read.collect import collect_steps
from stackwise_bench.runs.record import STEPS, RunRecord
from stackwise_bench.training.observers import StepRows
from stackwise_bench.training.parts import Fit, StepInfo

from conftest import compose, read_metrics


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def step_row(step: int) -> dict:
    return {"step": step, "epoch": 1 + step // 10, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": 0.5}


# ---- the record --------------------------------------------------------------------------------------------------
def test_steps_are_written_without_trackers_and_fenced(tmp_path):
    fenced = {"on": False}

    def fence():
        if fenced["on"]:
            raise RuntimeError("lease lost")

    record = RunRecord(tmp_path / "run", fence=fence)
    assert record.wants_steps  # no tracker attached: steps.jsonl still takes the rows
    for s in (1, 2, 4):
        record.log_step(step_row(s))
    assert read_jsonl(tmp_path / "run" / STEPS) == [step_row(s) for s in (1, 2, 4)]
    fenced["on"] = True
    with pytest.raises(RuntimeError):
        record.log_step(step_row(6))
    assert len(read_jsonl(tmp_path / "run" / STEPS)) == 3


def test_a_resume_trims_steps_to_the_checkpoint_and_a_restart_removes_them(tmp_path):
    record = RunRecord(tmp_path / "run")
    for s in (1, 2, 4, 6, 8):
        record.log_step(step_row(s))
    with open(tmp_path / "run" / STEPS, "a") as f:
        f.write('{"step": 10, "lo')  # a torn last line of a killed process
    record.trim_to_checkpoint({"progress": {"history": [], "global_step": 5}})
    assert read_jsonl(tmp_path / "run" / STEPS) == [step_row(s) for s in (1, 2, 4)]
    record.restart_logs()
    assert not (tmp_path / "run" / STEPS).exists()


def test_collect_steps_reads_back_one_row_per_step(tmp_path):
    from analysis_helpers import finished_run

    run_dir = finished_run(tmp_path, "a", seed=1, top1=80.0)
    rows = [step_row(s) for s in (1, 2, 4)] + [{**step_row(4), "lr": 2e-3}]  # a re-logged step: the last line
    (run_dir / STEPS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    finished_run(tmp_path, "old", seed=2, top1=80.0)  # recorded before steps.jsonl: no rows
    steps = collect_steps(collect_runs(tmp_path))
    assert steps["run_dir"].nunique() == 1
    assert steps["step"].tolist() == [1, 2, 4] and steps["lr"].tolist() == [1e-3, 1e-3, 2e-3]
    assert "seed" in steps


# ---- the step part -------------------------------------------------------------------------------------------------
class Sink:
    wants_steps = True

    def __init__(self):
        self.rows = []

    def log_step(self, row):
        self.rows.append(row)


def test_step_rows_log_step_one_and_every_nth_with_the_rate_the_step_used():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    part, sink = StepRows(every_n_steps=3), Sink()
    part.attach(Fit(model, optimizer, sink))
    assert [s for s in range(1, 11) if part.needs_grads(s) and part.wants_norm(s)] == [1, 3, 6, 9]
    for step in range(1, 11):
        optimizer.param_groups[0]["lr"] = 0.1 * step
        info = StepInfo(step=step, epoch=(step - 1) // 5, loss=torch.tensor(1.0 / step), grad_norm=torch.tensor(2.0))
        part.after_backward(info)
        optimizer.param_groups[0]["lr"] = -1.0  # the scheduler moves on before after_step
        part.after_step(info)
    assert [r["step"] for r in sink.rows] == [1, 3, 6, 9]
    assert [r["epoch"] for r in sink.rows] == [1, 1, 2, 2]  # 1-based, as metrics.jsonl counts epochs
    assert [r["lr"] for r in sink.rows] == pytest.approx([0.1, 0.3, 0.6, 0.9])
    assert [r["loss"] for r in sink.rows] == pytest.approx([1.0, 1 / 3, 1 / 6, 1 / 9])
    assert all(r["grad_norm"] == 2.0 for r in sink.rows)
    quiet = StepRows(every_n_steps=3)
    quiet.attach(Fit(model, optimizer, object()))  # a sink that takes no steps
    assert not any(quiet.needs_grads(s) for s in range(1, 11))


# ---- in training ---------------------------------------------------------------------------------------------------
STEPS_PER_EPOCH = 230 // 32  # the tiny synthetic set: 256 images minus 10% validation, drop_last
OVERRIDES = ["trainer.max_epochs=3", "trainer.log_every_n_steps=3", "monitors=none", "scheduler.warmup_epochs=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from stackwise_bench.train import run

    run_dir = tmp_path_factory.mktemp("steps") / "full"
    summary = run(compose(OVERRIDES), run_dir)
    return run_dir, summary


@pytest.mark.slow
def test_a_run_records_its_steps_and_the_schedule_per_step(uninterrupted):
    run_dir, summary = uninterrupted
    rows = read_jsonl(run_dir / STEPS)
    total = summary["train"]["steps"]
    assert [r["step"] for r in rows] == [1, *range(3, total + 1, 3)]
    assert [r["epoch"] for r in rows] == [math.ceil(r["step"] / STEPS_PER_EPOCH) for r in rows]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    lrs = [r["lr"] for r in rows]
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) - 1  # a warmup up to the peak, then the cosine down
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))
    # The epoch's lr in metrics.jsonl is the rate after its last step: between the logged steps around it.
    assert len(read_metrics(run_dir)) == 3


@pytest.mark.slow
def test_a_resumed_runs_steps_equal_an_uninterrupted_runs(uninterrupted, tmp_path, monkeypatch):
    """Killed mid-epoch 2, resumed: steps.jsonl (and metrics.jsonl) equal the uninterrupted run's, bit for bit."""
    from test_observability import interrupt_at_step

    from stackwise_bench.train import run

    full_dir, _ = uninterrupted
    run_dir = tmp_path / "killed"
    interrupt_at_step(monkeypatch, STEPS_PER_EPOCH + 4)
    assert run(compose(OVERRIDES), run_dir)["status"] == "interrupted"
    monkeypatch.undo()
    killed = read_jsonl(run_dir / STEPS)
    assert killed[-1]["step"] <= STEPS_PER_EPOCH + 4
    assert run(compose([*OVERRIDES, "trainer.resume=true"]), run_dir)["status"] == "completed"
    assert read_jsonl(run_dir / STEPS) == read_jsonl(full_dir / STEPS)
    timing = ("_time_s", "_img_s")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith(timing)} for r in rows]  # noqa: E731
    assert strip(read_metrics(run_dir)) == strip(read_metrics(full_dir))
