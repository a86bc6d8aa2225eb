"""GLUE fine-tuning through the trainer's task seam (:mod:`.tasks`): a BERT classifier (or regressor, STS-B) on one
task's sentence pairs (``data/text/glue_batches.py``: batches are dicts of ``input_ids``, ``token_type_ids``,
``attention_mask``, ``labels``, ``group``).

The loss is the cross-entropy of the labels, or the mean squared error of STS-B's scores (one output). The metrics
are GLUE's (:mod:`.glue_metrics`, computed with torchmetrics over the whole split), the headline is the task's first
(CoLA ``mcc``, MRPC ``f1``, STS-B ``pearson``, ...); best.pt is the highest headline, ties to the lower loss. The
throughput unit is a sequence; its FLOPs are priced at the full ``seq_len`` (batches are cut to their longest row,
so that is an upper bound).

Every evaluation keeps its predictions (:attr:`GlueTask.predictions`); :meth:`GlueTask.write_predictions` saves
them as JSON lines, one per row in file order, for inspection or a GLUE submission.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stackwise_bench.errors import ConfigError
from stackwise_bench.runs.contract import GLUE
from stackwise_bench.training.glue_metrics import TASK_METRICS, grouped_metrics
from stackwise_bench.training.precision import synchronize
from stackwise_bench.training.tasks import Output


def classifier_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[batch, num_labels]`` of a transformers sequence classifier (or a peft wrapper of one)."""
    out = model(
        input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"], attention_mask=batch["attention_mask"]
    )
    return out.logits if hasattr(out, "logits") else out


class GlueTask:
    """One GLUE task: cross-entropy (MSE for STS-B), GLUE's metrics for it, sequences/s."""

    name, unit = GLUE["name"], GLUE["unit"]

    def __init__(self, task: str, num_labels: int, autocast, device):
        if task not in TASK_METRICS:
            raise ConfigError(f"dataset.task={task} is not a GLUE task; use one of {', '.join(TASK_METRICS)}.")
        self.task, self.num_labels, self.amp, self.device = task, num_labels, autocast, torch.device(device)
        self.regression = num_labels == 1
        self.metric = TASK_METRICS[task][0]
        self.tallies = () if self.regression else ("correct",)
        names = ("loss", "score", *TASK_METRICS[task]) + (("acc_matched", "acc_mismatched") if task == "mnli" else ())
        self.directions = {k: GLUE["directions"][k] for k in names}
        self.predictions: dict[str, Any] | None = None
        self.last: dict | None = None

    def batches(self, loader, epoch: int, start_step: int):
        return loader.epoch(epoch, start_step)

    def sample_shape(self, loader) -> tuple:
        return (loader.seq_len,)

    def flops_per_sample(self, model, shape: tuple) -> float:
        """Training FLOPs of one sequence of ``shape[0]`` tokens (per-token price x tokens)."""
        from stackwise_bench.nn.bert import flops_per_token

        return float(flops_per_token(model, shape[0]) * shape[0])

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.regression:
            return F.mse_loss(logits[:, 0], labels.float(), reduction=reduction)
        return F.cross_entropy(logits, labels, reduction=reduction)

    def objective(self, model, batch, epoch: int, step: int) -> Output:
        with self.amp():
            logits = classifier_logits(model, batch).float()
        labels = batch["labels"]
        tallies = {} if self.regression else {"correct": (logits.detach().argmax(1) == labels).sum()}
        return Output(self._loss(logits, labels), labels.shape[0], tallies)

    def train_metrics(self, tallies: dict[str, Any], seen: int) -> dict:
        return {} if self.regression else {"acc": 100.0 * int(tallies["correct"]) / max(1, seen)}

    @torch.inference_mode()
    def evaluate(self, model, loader, full: bool = False, stop=None) -> dict | None:
        """The loss and the task's GLUE metrics over ``loader`` (per part for MNLI's test); None when stopped."""
        was_training = model.training
        model.eval()
        preds, targets, groups, loss = [], [], [], torch.zeros((), dtype=torch.float64, device=self.device)
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            for batch in loader.batches():
                with self.amp():
                    logits = classifier_logits(model, batch).float()
                loss += self._loss(logits, batch["labels"], "sum").double()
                preds.append(logits[:, 0] if self.regression else logits.argmax(1))
                targets.append(batch["labels"])
                groups.append(batch["group"])
                if stop is not None and stop.requested:
                    return None
            synchronize(self.device)
        finally:
            model.train(was_training)
        elapsed = time.perf_counter() - t0
        pred, target, group = (torch.cat(t).cpu() for t in (preds, targets, groups))
        self.predictions = {"pred": pred, "target": target, "group": group, "groups": tuple(loader.groups)}
        out = {"loss": float(loss) / max(1, len(target))}
        out |= grouped_metrics(self.task, pred, target, group, tuple(loader.groups), max(2, self.num_labels))
        out |= {"num_samples": len(target), f"infer_{self.unit}_s": len(target) / max(elapsed, 1e-9)}
        self.last = out
        return out

    def prediction_rows(self) -> list[dict]:
        """The latest evaluation's predictions, one dict per row in file order: row, part, pred, label."""
        if self.predictions is None:
            raise RuntimeError("no evaluation has run yet: nothing to write")
        kept = self.predictions
        rows = zip(kept["pred"].tolist(), kept["target"].tolist(), kept["group"].tolist())
        return [{"row": i, "part": kept["groups"][g], "pred": p, "label": t} for i, (p, t, g) in enumerate(rows)]

    def write_predictions(self, path: str | Path) -> Path:
        """:meth:`prediction_rows` as JSON lines at ``path``."""
        path = Path(path)
        path.write_text("".join(json.dumps(row) + "\n" for row in self.prediction_rows()))
        return path

    def score(self, metrics: dict) -> tuple:
        """The higher headline metric wins; ties (small dev sets tie often) go to the lower loss."""
        return (metrics[self.metric], -metrics["loss"])

    def describe(self, test: dict) -> str:
        shown = [k for k in test if k in self.directions and k != "loss"]
        return f"{self.task}: " + "  ".join(f"{k} {test[k]:.2f}" for k in shown) + f"  loss {test['loss']:.4f}"

    def record(self) -> dict:
        """summary.json's ``task`` section: the GLUE task, its headline, directions and ranges."""
        return {
            "name": self.name,
            "glue_task": self.task,
            "unit": self.unit,
            "metric": self.metric,
            "directions": dict(self.directions),
            "ranges": {k: dict(GLUE["ranges"][k]) for k in self.directions},
        }
