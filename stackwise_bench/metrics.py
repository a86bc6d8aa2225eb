"""Evaluation with torchmetrics: one pass over a loader, every classification metric."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def build_metrics(num_classes: int, full: bool, device: torch.device):
    """Top-1 always; with ``full`` also top-5, macro F1/precision/recall, per-class accuracy, confusion."""
    from torchmetrics import MetricCollection
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    metrics = {"top1": MulticlassAccuracy(num_classes, average="micro")}
    if full:
        metrics.update(
            top5=MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            f1_macro=MulticlassF1Score(num_classes, average="macro"),
            precision_macro=MulticlassPrecision(num_classes, average="macro"),
            recall_macro=MulticlassRecall(num_classes, average="macro"),
            per_class_top1=MulticlassAccuracy(num_classes, average=None),
            confusion_matrix=MulticlassConfusionMatrix(num_classes),
        )
    return MetricCollection(metrics).to(device)


@torch.inference_mode()
def evaluate(model, loader, num_classes: int, autocast_ctx, device: torch.device, full: bool = False) -> dict:
    """Loss and accuracies (in percent) over ``loader``; ``infer_img_s`` is measured under inference_mode."""
    was_training = model.training
    model.eval()
    metrics = build_metrics(num_classes, full, device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for x, y in loader.epoch(0):
        with autocast_ctx():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        metrics.update(logits, y)
        seen += y.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    model.train(was_training)
    out = {"loss": float(loss_sum) / max(1, seen), "num_samples": seen, "infer_img_s": seen / max(elapsed, 1e-9)}
    for name, value in metrics.compute().items():
        if name == "confusion_matrix":
            out[name] = value.int().tolist()
        elif value.ndim:
            out[name] = [round(100.0 * v, 4) for v in value.tolist()]
        else:
            out[name] = 100.0 * float(value)
    return out
