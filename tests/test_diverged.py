"""A run whose loss or weights become NaN/inf ends failed/diverged, in strict JSON, and the analysis lists it apart."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stackwise_bench.analysis import analyze_runs, write_report
from stackwise_bench.runs.job import FAILURE_EXIT
from stackwise_bench.runs.record import RunRecord
from stackwise_bench.train import run
from stackwise_bench.training.divergence import TrainingDiverged, check_weights
from stackwise_bench.training.trainer import Trainer

from analysis_helpers import finished_run
from conftest import TINY_DATA

# One training step, at a learning rate no weight survives: the step's own loss is finite (it is computed
# before the update), so the training loss never shows it; the validation and test losses are NaN.
LAST_STEP_BLOWS_UP = [
    *TINY_DATA,
    "dataset.num_train=64",  # 56 training images after the validation split: one batch of 56, one step
    "trainer.batch_size=56",
    "trainer.max_epochs=1",
    "optimizer.lr=1e30",
    "trainer.device=cpu",
    "trainer.threads=1",
    "monitors=none",
]


def strict(text: str):
    """JSON as strict readers (jq, JavaScript) parse it: a bare NaN or Infinity is an error."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
def test_a_run_that_diverges_at_its_last_step_is_failed_in_one_sentence(tmp_path):
    """Before: exit 0, status completed, bare NaN in summary.json and metrics.jsonl, analyze averaged its 25%."""
    from test_cli import train  # the real entrypoint, in a subprocess

    run_dir = tmp_path / "study" / "diverged"
    out = train([*LAST_STEP_BLOWS_UP, f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == FAILURE_EXIT["diverged"], out.stderr[-3000:]
    assert FAILURE_EXIT["diverged"] not in (0, 1, 2)  # not success, a crash or bad input
    shown = out.stdout + out.stderr
    assert "Traceback" not in shown
    said = [line for line in shown.splitlines() if "ERROR" in line]
    assert len(said) == 1 and said[0].endswith(
        "diverged: the validation loss is nan after epoch 1 (step 1); lower optimizer.lr."
    )

    for path in run_dir.rglob("*.json*"):  # summary.json, split.json, and any log the run began
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            strict(line)
    summary = strict((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"]["reason"] == "diverged"
    assert summary["error"]["message"].startswith("the validation loss is nan")

    good = finished_run(tmp_path / "study", "good", seed=1, top1=90.0)  # the same cell, a run that trained
    a = analyze_runs(tmp_path / "study", group_by=[])
    assert list(a.diverged["run_dir"]) == [str(run_dir)] and not a.runs.set_index("run_dir")["diverged"][str(good)]
    top1 = a.summary[a.summary["metric"] == "test.top1"].iloc[0]
    assert (top1["n"], top1["mean"], top1["n_diverged"]) == (1, 90.0, 1)
    md = (write_report(a, tmp_path / "analysis", plots=False) / "report.md").read_text()
    diverged = md[md.index("## Diverged runs") :]
    assert str(run_dir) in diverged.split("\n## ")[0] and "1 run diverged" in md


def test_an_old_completed_record_holding_nan_is_diverged_in_the_analysis(tmp_path):
    """Records written before this check say completed beside a bare NaN: never averaged into their cell."""
    study = tmp_path / "study"
    for seed, top1 in ((1, 90.0), (2, 92.0)):
        finished_run(study, f"s{seed}", seed=seed, top1=top1)
    old = finished_run(study, "s3", seed=3, top1=25.0)
    summary = json.loads((old / "summary.json").read_text())
    summary["test"]["loss"] = summary["train"]["final_val_loss"] = math.nan
    (old / "summary.json").write_text(json.dumps(summary))  # as the old writer did: a bare NaN

    a = analyze_runs(study, group_by=[])
    row = a.runs.set_index("run_dir").loc[str(old)]
    assert row["diverged"] and row["status"] == "failed"
    assert row["error.reason"] == "diverged" and "recorded completed" in row["error.message"]
    top1 = a.summary[a.summary["metric"] == "test.top1"].iloc[0]
    assert (top1["n"], top1["mean"]) == (2, 91.0)
    out = write_report(a, tmp_path / "analysis", plots=False)
    md = (out / "report.md").read_text()
    assert "## Diverged runs" in md and "1 of them diverged" in md and "1 unfinished (1 diverged)" in md
    assert "## Runs not included (not finished)" not in md  # nothing else was left out
    assert (out / "runs.csv").read_text().splitlines()[0].startswith("run_dir,status,diverged,")


@pytest.mark.slow
def test_last_epoch_diverging_after_a_finite_best_pt_is_still_diverged(tmp_path, cfg_factory, monkeypatch):
    """best.pt (epoch 1) is finite and would test fine: the run diverged all the same, and says where."""
    real = Trainer._train_epoch

    def last_step_overflows(self, *args, **kwargs):
        row = real(self, *args, **kwargs)
        if row is not None and row["epoch"] == self.max_epochs:  # the last update overflowed every weight
            with torch.no_grad():
                for p in self.raw_model.parameters():
                    p.fill_(math.inf)
        return row

    monkeypatch.setattr(Trainer, "_train_epoch", last_step_overflows)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as err:
        run(cfg_factory(["trainer.max_epochs=2", "monitors=none"]), run_dir)
    assert str(err.value).startswith("the validation loss is nan after epoch 2 (step ")
    summary = strict((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"]["reason"] == "diverged" and "test" not in summary
    for name in ("best", "last"):  # both from epoch 1: nothing non-finite was saved
        state = torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)
        assert state["progress"]["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_non_finite_weights_are_named():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    check_weights(model, "after epoch 1 (step 1)", "lower optimizer.lr")  # finite: nothing to say
    model[1].running_var[0] = math.inf  # a normalisation statistic counts too
    with pytest.raises(TrainingDiverged, match=r"\(1\.running_var\) after epoch 1 \(step 1\); lower optimizer\.lr\.$"):
        check_weights(model, "after epoch 1 (step 1)", "lower optimizer.lr")


def test_the_record_writes_strict_json(tmp_path):
    """NaN, infinities and numpy/torch numbers in any section or row: null or plain numbers, never bare NaN."""
    record = RunRecord(tmp_path / "run")
    record.start(train={"final_val_loss": math.nan, "lr": np.float32(0.5), "loss": torch.tensor(math.inf)})
    record.log_epoch({"epoch": 1, "val_loss": np.float64("nan"), "top": np.array([1.0, -math.inf])})
    record.write_split({"sha256": "x", "weights": torch.tensor([0.5, math.nan])})
    summary = strict((record.dir / "summary.json").read_text())
    assert summary["train"] == {"final_val_loss": None, "lr": 0.5, "loss": None}
    assert strict((record.dir / "metrics.jsonl").read_text()) == {"epoch": 1, "val_loss": None, "top": [1.0, None]}
    assert strict((record.dir / "split.json").read_text())["weights"] == [0.5, None]
