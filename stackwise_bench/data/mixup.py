"""Mixup and CutMix of a whole batch with soft targets, as timm's ``Mixup(mode="batch", correct_lam=True)``.

Each step draws one lambda (and, for CutMix, one box) and pairs sample ``i`` with sample ``B-1-i`` (the batch
flipped), as timm does. timm's class draws from numpy's global RNG; here every draw comes from a generator seeded
from ``(seed, epoch, step)`` (:func:`step_generator`), so a resumed run mixes exactly as an uninterrupted one.
The soft targets are timm's own :func:`timm.data.mixup.mixup_target`, label smoothing folded in.

The trainer applies it, not the loader: mixing needs the labels, and the loss and the training accuracy that
follow are the trainer's (``training/trainer.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from stackwise_bench.data.loader import _derive_seed, _one_thread_on_cpu
from stackwise_bench.errors import ConfigError

STREAM = 2  # the loader seeds its order with word 0 and its augmentation with word 1: mixing gets its own stream


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The CPU generator of the mixing of ``step`` of ``epoch``: reproducible without replaying earlier steps."""
    return torch.Generator().manual_seed(_derive_seed(seed, epoch, STREAM, step))


class Mixup:
    """Per-batch mixup or CutMix (timm's knobs and semantics).

    Args:
        mixup_alpha: Beta(alpha, alpha) of mixup's lambda; 0 = no mixup.
        cutmix_alpha: Beta(alpha, alpha) of CutMix's lambda; 0 = no CutMix.
        prob: Probability that a batch is mixed at all (else its targets are the plain, smoothed labels).
        switch_prob: With both on, the probability that a mixed batch uses CutMix rather than mixup.
    """

    def __init__(
        self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0, switch_prob: float = 0.5
    ):
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)

    def __repr__(self) -> str:
        return (
            f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, "
            f"switch_prob={self.switch_prob})"
        )

    def draw(self, shape, generator: torch.Generator) -> tuple[float, tuple[int, int, int, int] | None]:
        """``(lam, box)`` of one batch of images ``shape``: ``box`` = (top, bottom, left, right) for CutMix, else
        None; a CutMix lambda is corrected to ``1 - box area / image area`` (timm's ``correct_lam``).

        Every draw is made whatever the knobs (the stream never shifts): apply, switch, the Beta seed, the centre.
        """
        mixed = torch.rand((), generator=generator).item() < self.prob
        switch = torch.rand((), generator=generator).item() < self.switch_prob
        beta_seed = int(torch.randint(2**62, (), generator=generator))
        h, w = shape[-2:]
        cy, cx = int(torch.randint(h, (), generator=generator)), int(torch.randint(w, (), generator=generator))
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or switch)
        if not mixed or (self.mixup_alpha <= 0 and self.cutmix_alpha <= 0):
            return 1.0, None
        # torch has no generator-driven Beta sampler: numpy's, seeded from the step's generator
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = float(np.random.Generator(np.random.PCG64(beta_seed)).beta(alpha, alpha))
        if not cutmix:
            return lam, None
        # timm's rand_bbox: a box of sides sqrt(1 - lam) x the image's, centred uniformly, clipped to the image
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        top, bottom = min(max(cy - cut_h // 2, 0), h), min(max(cy + (cut_h + 1) // 2, 0), h)
        left, right = min(max(cx - cut_w // 2, 0), w), min(max(cx + (cut_w + 1) // 2, 0), w)
        return 1.0 - (bottom - top) * (right - left) / (h * w), (top, bottom, left, right)

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, smoothing: float, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mix a batch: ``(mixed x, soft targets [B, num_classes], dominant labels)``.

        The soft target of sample ``i`` is ``lam * smooth(y[i]) + (1 - lam) * smooth(y[B-1-i])``: each row sums to
        one. The dominant label is the one with the larger weight: ``y[i]`` when ``lam >= 0.5``, else its partner's.
        """
        from timm.data.mixup import mixup_target

        lam, box = self.draw(x.shape, generator)
        with _one_thread_on_cpu(x.device):  # a few small ops: on a busy CPU, threads wait on each other (loader.py)
            if box is not None:
                top, bottom, left, right = box
                x = x.clone()
                x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
            elif lam != 1.0:
                x = x * lam + x.flip(0) * (1.0 - lam)
        targets = mixup_target(y, num_classes, lam=lam, smoothing=smoothing)
        return x, targets, y if lam >= 0.5 else y.flip(0)


def build_mixing(
    mixup_alpha: float | None, cutmix_alpha: float | None, prob: float | None, switch_prob: float | None
) -> Mixup | None:
    """The ``augmentation.mixup_alpha``/``cutmix_alpha``/``mix_prob``/``switch_prob`` knobs as a Mixup, or None
    when both alphas are 0 or null (nulls take timm's defaults: prob 1, switch_prob 0.5)."""
    for key, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if value is not None and not 0 <= value < math.inf:
            raise ConfigError(
                f"augmentation.{key}={value} must be a non-negative number (0 and null = off); use e.g. 0.8."
            )
    for key, value in (("mix_prob", prob), ("switch_prob", switch_prob)):
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"augmentation.{key}={value} must be a probability in [0, 1]; use e.g. 0.5.")
    if not (mixup_alpha or cutmix_alpha):
        return None
    return Mixup(
        mixup_alpha or 0.0,
        cutmix_alpha or 0.0,
        1.0 if prob is None else prob,
        0.5 if switch_prob is None else switch_prob,
    )
