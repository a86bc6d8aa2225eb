"""Evaluation: one pass over a loader under ``torch.inference_mode``.

Per-epoch validation needs only the loss and top-1, counted on the device. The
reported test metrics (``full=True``) come from torchmetrics, imported only then:
``import torchmetrics`` pulls in scipy.signal, transformers and matplotlib (~2.4 s),
which start-up and every validation pass would otherwise pay.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from stackwise_bench.training.precision import synchronize


@torch.inference_mode()
def evaluate(
    model, loader, num_classes: int, autocast_ctx, device: torch.device, full: bool = False, stop=None
) -> dict | None:
    """Loss and accuracies (in percent) over ``loader``; None when ``stop.requested`` cut the pass short.

    Always ``loss``, ``top1``, ``num_samples`` and ``infer_img_s`` (images per second of
    the whole pass, measured under inference_mode: no autograd bookkeeping at all).
    With ``full`` also ``top5``, macro F1/precision/recall, ``per_class_top1`` and the
    ``confusion_matrix`` (rows: true class, columns: predicted).
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen = 0
    kept_logits, kept_targets = [], []
    synchronize(device)
    t0 = time.perf_counter()
    for x, y in loader.epoch(0):
        with autocast_ctx():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        if full:
            kept_logits.append(logits)
            kept_targets.append(y)
        seen += y.numel()
        if stop is not None and stop.requested:
            model.train(was_training)
            return None
    synchronize(device)
    elapsed = time.perf_counter() - t0
    model.train(was_training)
    out = {
        "loss": float(loss_sum) / max(1, seen),
        "num_samples": seen,
        "infer_img_s": seen / max(elapsed, 1e-9),
        "top1": 100.0 * int(correct) / max(1, seen),
    }
    if full:
        out.update(_torchmetrics_report(torch.cat(kept_logits), torch.cat(kept_targets), num_classes))
    return out


def _torchmetrics_report(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    """The reported test metrics, computed by torchmetrics (imported here, at test time only)."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    c = num_classes

    def pct(t) -> float:
        return 100.0 * float(t)

    return {
        "top1": pct(multiclass_accuracy(logits, y, c, average="micro")),
        "top5": pct(multiclass_accuracy(logits, y, c, top_k=min(5, c), average="micro")),
        "f1_macro": pct(multiclass_f1_score(logits, y, c, average="macro")),
        "precision_macro": pct(multiclass_precision(logits, y, c, average="macro")),
        "recall_macro": pct(multiclass_recall(logits, y, c, average="macro")),
        "per_class_top1": [round(100.0 * v, 4) for v in multiclass_accuracy(logits, y, c, average=None).tolist()],
        "confusion_matrix": multiclass_confusion_matrix(logits, y, c).tolist(),
    }
