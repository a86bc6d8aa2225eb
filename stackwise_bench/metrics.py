"""Evaluation: one pass over a loader under ``torch.inference_mode``, every classification metric.

Everything comes from one confusion matrix accumulated on the device, plus a
top-k hit count. This replaces torchmetrics (same definitions, checked against
it in tests/test_startup.py) because ``import torchmetrics`` costs ~1.7 s per
process here and drags in transformers, scikit-learn and torch._dynamo: more
than half of ``import torch`` again, paid by every run and every sweep worker.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


@torch.inference_mode()
def evaluate(model, loader, num_classes: int, autocast_ctx, device: torch.device, full: bool = False) -> dict:
    """Loss and accuracies (in percent) over ``loader``.

    Always ``loss``, ``top1``, ``num_samples`` and ``infer_img_s`` (images per second of
    the whole pass, measured under inference_mode: no autograd bookkeeping at all).
    With ``full`` also ``top5``, macro F1/precision/recall, ``per_class_top1`` and the
    ``confusion_matrix`` (rows: true class, columns: predicted).
    """
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    topk_hits = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen = 0
    kept_logits, kept_targets = [], []
    _sync(device)
    t0 = time.perf_counter()
    for x, y in loader.epoch(0):
        with autocast_ctx():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
        if full:
            topk_hits += (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum()
            kept_logits.append(logits)
            kept_targets.append(y)
        seen += y.numel()
    _sync(device)
    elapsed = time.perf_counter() - t0
    model.train(was_training)
    out = {"loss": float(loss_sum) / max(1, seen), "num_samples": seen, "infer_img_s": seen / max(elapsed, 1e-9)}
    cm = confusion.view(num_classes, num_classes).cpu()
    out["top1"] = 100.0 * int(cm.trace()) / max(1, seen)
    if full:
        out.update(_torchmetrics_report(torch.cat(kept_logits), torch.cat(kept_targets), num_classes))
    return out


def _torchmetrics_report(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    """The reported test metrics, computed by torchmetrics (imported here, at test time only, so
    start-up and per-epoch validation don't pay its ~1.7 s import)."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy, multiclass_confusion_matrix, multiclass_f1_score,
        multiclass_precision, multiclass_recall,
    )

    c = num_classes
    pct = lambda t: 100.0 * float(t)
    return {
        "top1": pct(multiclass_accuracy(logits, y, c, average="micro")),
        "top5": pct(multiclass_accuracy(logits, y, c, top_k=min(5, c), average="micro")),
        "f1_macro": pct(multiclass_f1_score(logits, y, c, average="macro")),
        "precision_macro": pct(multiclass_precision(logits, y, c, average="macro")),
        "recall_macro": pct(multiclass_recall(logits, y, c, average="macro")),
        "per_class_top1": [round(100.0 * v, 4) for v in multiclass_accuracy(logits, y, c, average=None).tolist()],
        "confusion_matrix": multiclass_confusion_matrix(logits, y, c).tolist(),
    }


def classification_report(cm: torch.Tensor) -> dict:
    """Macro precision/recall/F1 and per-class accuracy (percent) from a confusion matrix.

    torchmetrics' definitions: a 0/0 ratio counts as 0, and the macro means skip
    classes that occur neither as a target nor as a prediction.
    """
    cm = cm.double()
    tp = cm.diagonal()
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, actual)
    f1 = _ratio(2 * tp, predicted + actual)
    present = (predicted + actual) > 0

    def macro(v: torch.Tensor) -> float:
        return 100.0 * float(v[present].mean()) if bool(present.any()) else 0.0

    return {
        "f1_macro": macro(f1),
        "precision_macro": macro(precision),
        "recall_macro": macro(recall),
        "per_class_top1": [round(100.0 * v, 4) for v in recall.tolist()],
    }


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
