"""Gradient accumulation (``trainer.accumulate``): one step's batch as consecutive micro-batches.

``trainer.batch_size`` stays the batch a step trains on (what the learning rate, the schedule and the FLOP ledger
are planned for); ``trainer.accumulate`` only says in how many pieces its forward and backward passes run, so a
recipe keeps its meaning on a smaller device. Each micro-batch's loss is weighted by its share of the samples, so
the accumulated gradients are the whole batch's mean up to float rounding. Batch statistics (BatchNorm) and batch
mixing's partners are per micro-batch, as in every accumulating trainer; ``diagnostics.activations`` records the
last micro-batch's activations of a logging step.
"""

from __future__ import annotations

import dataclasses

import torch


def micro_batches(batch: tuple, n: int) -> list[tuple]:
    """``batch``'s tensors cut into ``n`` consecutive micro-batches along the sample axis (fewer when the batch
    has fewer samples; the first ones one sample longer when ``n`` does not divide it)."""
    n = min(n, len(batch[0]))
    return list(zip(*(torch.tensor_split(t, n) for t in batch), strict=True))


def merge_outputs(outs: list):
    """Micro-batches' task outputs as the whole batch's: the sample-weighted mean loss (detached: its gradients
    are already accumulated), the summed samples and tallies."""
    samples = sum(o.samples for o in outs)
    loss = sum(o.loss.detach() * (o.samples / samples) for o in outs)
    tallies = {k: sum(o.tallies[k] for o in outs) for k in outs[0].tallies}
    return dataclasses.replace(outs[0], loss=loss, samples=samples, tallies=tallies)
