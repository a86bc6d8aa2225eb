"""GLUE's metrics, as its leaderboard reports them (Wang et al. 2019, table 1), computed with torchmetrics.

CoLA: Matthews correlation; MRPC and QQP: F1 of the positive class and accuracy; STS-B: Pearson and Spearman
correlation; SST-2, MNLI (matched and mismatched), QNLI, RTE, WNLI: accuracy. All are reported x 100, as GLUE does.
A task's ``score`` is the mean of its metrics (GLUE's per-task number; MNLI's: of matched and mismatched accuracy
when both are there). The first metric of a task is its headline (``val_<metric>``, how best.pt is chosen).

torchmetrics is imported inside the functions: importing it costs seconds (training/metrics.py).
"""

from __future__ import annotations

import torch

# Each task's metrics, headline first.
TASK_METRICS = {
    "cola": ("mcc",),
    "sst2": ("acc",),
    "mrpc": ("f1", "acc"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("f1", "acc"),
    "mnli": ("acc",),
    "qnli": ("acc",),
    "rte": ("acc",),
    "wnli": ("acc",),
}


def glue_metric(name: str, preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """One metric x 100 of predicted labels (or scores, for STS-B) against the true ones."""
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef
    from torchmetrics.functional.classification import binary_f1_score, binary_matthews_corrcoef, multiclass_accuracy

    if name == "pearson":
        value = pearson_corrcoef(preds.double(), target.double())
    elif name == "spearman":
        value = spearman_corrcoef(preds.double(), target.double())
    elif name == "mcc":
        value = binary_matthews_corrcoef(preds, target)
    elif name == "f1":
        value = binary_f1_score(preds, target)
    elif name == "acc":
        value = multiclass_accuracy(preds, target, num_classes=max(2, num_classes), average="micro")
    else:
        raise ValueError(f"{name} is not a GLUE metric")
    return 100.0 * float(value)


def task_metrics(task: str, preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    """The task's metrics (:data:`TASK_METRICS`) over all rows given, and their mean as ``score``."""
    out = {name: glue_metric(name, preds, target, num_classes) for name in TASK_METRICS[task]}
    out["score"] = sum(out.values()) / len(out)
    return out


def grouped_metrics(
    task: str, preds: torch.Tensor, target: torch.Tensor, group: torch.Tensor, groups: tuple[str, ...], classes: int
) -> dict[str, float]:
    """Metrics of an evaluation loader's rows: one group (a dev file, or the validation slice) gives the task's
    metrics; several (MNLI's matched and mismatched devs) give each group's metrics suffixed with its name, the first
    group's also unsuffixed (the headline: MNLI-m), and ``score`` the mean over the groups."""
    if len(groups) == 1:
        return task_metrics(task, preds, target, classes)
    out: dict[str, float] = {}
    scores = []
    for index, name in enumerate(groups):
        where = group == index
        part = task_metrics(task, preds[where], target[where], classes)
        scores.append(part.pop("score"))
        out |= {f"{key}_{name}": value for key, value in part.items()}
        if index == 0:
            out |= part
    out["score"] = sum(scores) / len(scores)
    return out
