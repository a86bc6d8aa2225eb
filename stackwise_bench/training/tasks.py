"""What is learned: a task gives the loop its batches, its objective, its metrics and its throughput unit.

The trainer knows no task by name. A task (duck-typed; :class:`ImageClassification` is the one shipped)
has::

    name, unit                   recorded in summary.json's ``task``; ``train_<unit>_s`` is the speed column
    metric                       the headline validation metric (``val_<metric>``, ``best_val_<metric>``)
    directions                   every metric it reports -> "max" (higher is better) or "min"
    tallies                      names of the per-step counts summed over an epoch (``correct``)
    batches(loader, epoch, start_step)    the training batches of an epoch, from a step on
    sample_shape(loader)         the shape of one sample (what FLOPs are priced per)
    objective(model, batch, epoch, step) -> Output: the loss to train on, the samples, the tallies
    train_metrics(tallies, seen) -> {metric: value}: the epoch's training metrics from its sums
    evaluate(model, loader, full, stop) -> metrics (None when stopped); ``loss`` and ``metric`` always
    score(metrics)               a tuple, larger is better: how best.pt is chosen
    describe(test)               the test phase's log line

Batch mixing (``augmentation.mixup_alpha``/``cutmix_alpha``) is part of the classification objective: it needs the
labels and changes the loss. Its generator is seeded from ``(seed, epoch, step)`` like the loader's augmentation,
so a resumed run mixes as the uninterrupted one did. With mixing on, the loss is the cross-entropy against soft
targets (``trainer.label_smoothing`` folded in, as timm's Mixup does), and ``train_top1`` counts a prediction
right when it is the *dominant label* of its sample: the label with the larger weight in the mixed target (the
sample's own when lambda >= 0.5, else its partner's).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from stackwise_bench.data.mixup import step_generator
from stackwise_bench.runs.contract import IMAGE_CLASSIFICATION
from stackwise_bench.training.metrics import evaluate


@dataclasses.dataclass
class Output:
    """One training step's result: the loss to train on, the samples it covered, the task's tallies."""

    loss: torch.Tensor
    samples: int
    tallies: dict[str, torch.Tensor]


class ImageClassification:
    """Images and class labels: cross-entropy, top-1 (top-5, macro F1, a confusion matrix at test), images/s."""

    name, unit, metric = (IMAGE_CLASSIFICATION[k] for k in ("name", "unit", "metric"))
    directions = IMAGE_CLASSIFICATION["directions"]
    tallies = ("correct",)

    def __init__(self, num_classes: int, autocast, device, label_smoothing: float = 0.0, mixing=None, seed: int = 0):
        self.num_classes, self.amp, self.device = num_classes, autocast, device
        self.label_smoothing, self.mixing, self.seed = label_smoothing, mixing, seed

    def batches(self, loader, epoch: int, start_step: int):
        return loader.epoch(epoch, start_step=start_step)

    def sample_shape(self, loader) -> tuple:
        return loader.image_shape

    def objective(self, model, batch, epoch: int, step: int) -> Output:
        """The step's loss; with batch mixing, against the soft targets, tallied against the dominant labels."""
        x, y = batch
        if self.mixing is None:
            targets = y
            smoothing = self.label_smoothing
        else:
            x, targets, y = self.mixing(
                x, y, self.num_classes, self.label_smoothing, step_generator(self.seed, epoch, step)
            )
            smoothing = 0.0  # folded into the soft targets
        with self.amp():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
        return Output(loss, y.numel(), {"correct": (logits.detach().argmax(1) == y).sum()})

    def train_metrics(self, tallies: dict[str, Any], seen: int) -> dict:
        return {"top1": 100.0 * int(tallies["correct"]) / max(1, seen)}

    def evaluate(self, model, loader, full: bool = False, stop=None) -> dict | None:
        return evaluate(model, loader, self.num_classes, self.amp, self.device, full=full, stop=stop)

    def score(self, metrics: dict) -> tuple:
        """Higher top-1 wins; ties (small validation sets tie often) go to the lower loss."""
        return (metrics["top1"], -metrics["loss"])

    def describe(self, test: dict) -> str:
        return f"top1 {test['top1']:.2f}%  top5 {test['top5']:.2f}%  f1_macro {test['f1_macro']:.2f}"

    def record(self) -> dict:
        """summary.json's ``task`` section: what the analysis reads each metric's direction from."""
        return {"name": self.name, "unit": self.unit, "metric": self.metric, "directions": dict(self.directions)}
