"""Telling a diverged run: a NaN or infinite loss or weight ends the run ``failed`` with ``error.reason: diverged``.

The trainer checks the training loss of every epoch, the validation loss of every evaluation, the trained
weights at the end and the test loss of ``best.pt``. A run whose last epochs diverged is a diverged run even
where its ``best.pt`` (an earlier epoch) is finite: its test numbers would describe a model the run no
longer has, beside a schedule that blew up.
"""

from __future__ import annotations

import itertools
import math

import torch


class TrainingDiverged(RuntimeError):
    """A training, validation or test loss, or a trained weight, became NaN or infinite."""

    reason = "diverged"  # the run record's error.reason and the sweep's failure table


def check_loss(what: str, loss: float, when: str, fix: str) -> None:
    """Raise :class:`TrainingDiverged` where ``loss`` is NaN or infinite.

    Args:
        what: the loss, as the message names it (``the validation loss``).
        when: where the run stands (``after epoch 2 (step 16)``).
        fix: what to try (:func:`divergence_fix`).
    """
    if not math.isfinite(loss):
        raise TrainingDiverged(f"{what} is {loss} {when}; {fix}.")


def check_weights(model: torch.nn.Module, when: str, fix: str) -> None:
    """Raise :class:`TrainingDiverged` naming the first weight or buffer (norm statistics) that is NaN or infinite."""
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if not tensor.is_floating_point():
            continue
        try:
            finite = bool(torch.isfinite(tensor).all())
        except (NotImplementedError, RuntimeError, TypeError):  # a packed quantized subclass: its outputs are checked
            continue
        if not finite:
            raise TrainingDiverged(f"the trained weights hold NaN or infinite values ({name}) {when}; {fix}.")


def divergence_fix(grad_clip: float | None, precision: str) -> str:
    """What to try against a NaN/inf loss: a lower learning rate, clipping where off, a wider precision."""
    fix = "lower optimizer.lr"
    if not grad_clip:
        fix += " or set trainer.grad_clip=1.0"
    other = {"fp16": "precision=bf16 or fp32", "bf16": "precision=fp32", "fp8": "precision=bf16"}
    if precision in other:
        fix += f" or use {other[precision]}"
    return fix
