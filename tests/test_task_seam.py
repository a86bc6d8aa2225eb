"""A second task joins without touching the loop: regression on synthetic vectors, trained by the unchanged
Trainer through the task seam (:mod:`stackwise_bench.training.tasks`), recorded with its metric's direction."""

from __future__ import annotations

import json
import math

import torch

from stackwise_bench.runs.record import RunRecord
from stackwise_bench.training.parts import StepInfo, StepPart
from stackwise_bench.training.tasks import Output
from stackwise_bench.training.trainer import Trainer

from conftest import read_metrics


class VectorLoader:
    """Batches of (x, y) with y = x @ w + noise: a fixed order per epoch, seeded from it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def epoch(self, epoch: int, start_step: int = 0):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(epoch))
        order = order if self.shuffle else torch.arange(len(self.x))
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


class Regression:
    """The toy task: mean squared error, lower is better; its unit is a sample."""

    name, unit, metric = "regression", "sample", "mse"
    directions = {"loss": "min", "mse": "min"}
    tallies = ("squared_error",)

    def batches(self, loader, epoch, start_step):
        return loader.epoch(epoch, start_step)

    def sample_shape(self, loader):
        return tuple(loader.x.shape[1:])

    def objective(self, model, batch, epoch, step) -> Output:
        x, y = batch
        pred = model(x).squeeze(-1)
        loss = torch.nn.functional.mse_loss(pred, y)
        return Output(loss, len(y), {"squared_error": (pred.detach() - y).square().sum()})

    def train_metrics(self, tallies, seen):
        return {"mse": float(tallies["squared_error"]) / max(1, seen)}

    @torch.no_grad()
    def evaluate(self, model, loader, full=False, stop=None):
        se, n = 0.0, 0
        for x, y in loader.epoch(0):
            se += float((model(x).squeeze(-1) - y).square().sum())
            n += len(y)
        return {"loss": se / n, "mse": se / n}

    def score(self, metrics):
        return (-metrics["mse"],)

    def describe(self, test):
        return f"mse {test['mse']:.4f}"

    def record(self):
        return {"name": self.name, "unit": self.unit, "metric": self.metric, "directions": dict(self.directions)}


class Loaders:
    def __init__(self, train, val, test):
        self.train, self.val, self.test = train, val, test


class CountSteps(StepPart):
    """A part that only counts: its hooks run in the loop's order, and its state travels in the checkpoint."""

    key = "count"

    def __init__(self):
        self.seen: list[str] = []
        self.steps = 0

    def before_forward(self, step):
        self.seen.append("before_forward")

    def after_backward(self, info: StepInfo):
        self.seen.append("after_backward")

    def after_step(self, info: StepInfo):
        self.seen.append("after_step")
        self.steps += 1

    def state(self):
        return {"steps": self.steps}

    def summary(self):
        return {"count": {"steps": self.steps}}


def test_a_regression_task_trains_through_the_unchanged_trainer(tmp_path):
    from stackwise_bench.training.runtime import Runtime

    torch.manual_seed(0)
    w = torch.randn(8)
    x = torch.randn(320, 8)
    y = x @ w + 0.01 * torch.randn(320)
    loaders = Loaders(
        VectorLoader(x[:256], y[:256], 32, True),
        VectorLoader(x[256:288], y[256:288], 32, False),
        VectorLoader(x[288:], y[288:], 32, False),
    )
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = Trainer(Runtime(torch.device("cpu")), max_epochs=4, batch_size=32, grad_clip=None, progress="log")
    record = RunRecord(tmp_path / "run")
    record.start(run={"seed": 0, "overrides": [], "fingerprint": "toy"}, config={"seed": 0})
    counter = CountSteps()

    result = trainer.fit(model, loaders, optimizer, scheduler, sink=record, task=Regression(), parts=[counter])

    rows = read_metrics(tmp_path / "run") if (tmp_path / "run" / "metrics.jsonl").exists() else []
    assert result.status == "completed" and len(rows) == 4
    mses = [r["val_mse"] for r in rows]
    assert mses == sorted(mses, reverse=True) and mses[-1] < 0.05 * mses[0]  # lower is better, and it falls
    assert {"train_mse", "train_sample_s", "val_loss"} <= set(rows[0]) and "train_top1" not in rows[0]
    assert result.train["best_val_mse"] == min(mses) and result.train["best_epoch"] == 4
    with torch.no_grad():  # the test phase ran best.pt (epoch 4, the last): the model as it ended
        mse = float((model(x[288:]).squeeze(-1) - y[288:]).square().mean())
    assert math.isclose(result.test["mse"], mse, rel_tol=1e-5)
    assert result.sections["task"]["directions"]["mse"] == "min" and result.sections["count"] == {"steps": 32}
    assert counter.seen[:3] == ["before_forward", "after_backward", "after_step"]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["count"] == {"steps": 32} and last["progress"]["best_score"] == [-min(mses)]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1

    # What the analysis reads of it: the task's own metric and direction, from the record (not from a name).
    from stackwise_bench.analysis import collect_runs
    from stackwise_bench.analysis.read.directions import direction_of, task_metrics

    record.finish(result.status, train=result.train, test=result.test, **result.sections)
    runs = collect_runs([tmp_path])
    assert runs.loc[0, "status"] == "completed" and runs.loc[0, "test.mse"] == result.test["mse"]
    assert direction_of(runs, "test.mse") == "min" and direction_of(runs, "train.best_val_mse") == "min"
    assert task_metrics(runs) == ["mse"]
