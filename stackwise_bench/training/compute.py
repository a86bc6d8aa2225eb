"""A run's training compute: FLOPs per image measured once per architecture, summed over the images trained.

``train.flops`` counts the forward and backward passes of training steps only (not validation or test), the
convention of compute-budget papers. The count per image comes from :class:`~.flops.FlopMeter`
(``FlopCounterMode`` on a throwaway copy), so it is measured when first needed and again only when the
architecture changes (a depth-as-time growth, a frozen stack). Images are counted per step; they are turned into
FLOPs at the rate of the architecture they were trained on (:meth:`Compute.flush` before the model changes).

``trainer.max_flops`` turns a FLOP budget into a number of steps before training starts (:meth:`budget_steps`),
so the learning-rate schedule spans the budget: a classical run at 59% of the compute gets its whole warmup and
cosine over that 59%, not a full-length schedule cut short (Kaddour et al., 2023).
"""

from __future__ import annotations

import logging
import math

import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.training.flops import FlopMeter, mfu, peak_flops

log = logging.getLogger(__name__)


class Compute:
    """Training FLOPs of one run; ``state()``/``restore()`` carry the total across a resume."""

    def __init__(self, device: torch.device, precision: str):
        self.device, self.precision = device, precision
        self.meter = FlopMeter()
        self.total = 0.0  # FLOPs of the images already priced
        self.images = 0  # every image trained (priced or pending)
        self.pending = 0  # images trained since the last flush, at the current architecture's rate
        self.failed = ""  # why FLOPs could not be counted (then the run records none)
        self.rate = None  # a task's own FLOPs per sample, rate(model, sample_shape); None: counted by tracing
        self.per_row = 1  # samples per row of a batch (a language model's tokens per window)

    def priced_by(self, rate, per_row: int = 1) -> None:
        """Price samples with a task's ``rate(model, sample_shape)`` (a causal LM's FLOPs per token) instead of
        tracing a step, and count ``per_row`` samples per row of a ``trainer.batch_size`` batch."""
        self.rate, self.per_row = rate, per_row

    def per_image(self, model, input_shape) -> float | None:
        """Training FLOPs of one image on ``model`` as it is now; None (warned once) when counting fails."""
        if self.failed:
            return None
        try:
            if self.rate is not None:
                return self.rate(_unwrap(model), tuple(input_shape))
            return self.meter.per_image(_unwrap(model), tuple(input_shape))
        except Exception as exc:  # an op FlopCounterMode cannot trace must not cost the run
            self.failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
            log.warning("training FLOPs are not counted for this model (%s)", self.failed)
            return None

    def step(self, images: int) -> None:
        self.pending += images
        self.images += images

    def flush(self, model, input_shape) -> float | None:
        """Price the pending images at ``model``'s rate; call before the architecture changes and to read totals."""
        if self.pending:
            rate = self.per_image(model, input_shape)
            self.total = math.nan if rate is None else self.total + self.pending * rate
            self.pending = 0
        return None if self.failed else self.total

    def plan(
        self, max_flops, regime, model, input_shape, batch_size: int, steps_per_epoch: int, max_epochs: int, steps=None
    ):
        """``(total steps, the step to stop at or None, the FLOP budget or None)`` of a run.

        The budget is ``max_flops``, or, for ``regime=classical_matched``, what its depth-time schedule spends over
        ``max_epochs`` (:meth:`depth_time_flops`); a depth-time run trains by epochs and takes no budget.
        ``steps`` (a token budget's, ``dataset.train_tokens``) replaces ``max_epochs x steps_per_epoch`` throughout.
        """
        batch_size = batch_size * self.per_row  # samples per step
        planned = steps if steps is not None else max_epochs * steps_per_epoch
        if steps is not None and max_flops is not None:
            raise ConfigError(
                "dataset.train_tokens sets this run's budget in tokens, and trainer.max_flops another in FLOPs; "
                "keep one of them."
            )
        if getattr(regime, "matched", None) is not None:
            if max_flops is not None:
                raise ConfigError(
                    "regime.match=true sets this classical run's FLOP budget (what depth_time spends with its stacks), "
                    "and trainer.max_flops sets another; keep one of them."
                )
            max_flops = self.depth_time_flops(model, regime.matched, planned, batch_size, input_shape)
        if max_flops is None:
            return planned, steps, None
        if regime is not None and regime.name != "classical":
            raise ConfigError(
                f"trainer.max_flops applies to regime=classical; a regime={regime.name} run trains by "
                "trainer.max_epochs (its FLOPs are recorded): give its train.flops to the classical arm's "
                "trainer.max_flops, or drop trainer.max_flops."
            )
        steps = self.budget_steps(max_flops, model, input_shape, batch_size)
        log.info(
            "a budget of %.3g training FLOPs: %d steps of %d images (%.2f epochs); trainer.max_epochs=%d is not used",
            max_flops,
            steps,
            batch_size,
            steps / steps_per_epoch,
            max_epochs,
        )
        return steps, steps, max_flops

    def budget_steps(self, max_flops: float, model, input_shape, batch_size: int) -> int:
        """Steps of ``batch_size`` images that fit in ``max_flops`` at ``model``'s rate (one architecture)."""
        rate = self.per_image(model, input_shape)
        if rate is None:
            raise ConfigError(
                f"trainer.max_flops={max_flops:g} needs the model's FLOPs, which could not be counted "
                f"({self.failed}); set trainer.max_flops=null and train by trainer.max_epochs."
            )
        steps = int(max_flops // (rate * batch_size))
        if steps < 1:
            raise ConfigError(
                f"trainer.max_flops={max_flops:g} is less than one step ({rate * batch_size:.3g} FLOPs at "
                f"batch {batch_size}); raise trainer.max_flops."
            )
        return steps

    def depth_time_flops(self, model, depth_time, total_steps: int, batch_size: int, input_shape) -> float:
        """The training FLOPs of a depth-time run of ``total_steps`` (its stages at their depths' rates, rackwise):
        the budget of the classical arm matched to it. Each depth is counted on a truncated copy of ``model``."""
        import copy

        from stackwise_bench.nn.growth import truncate

        growth = [0, *depth_time.plan(total_steps), total_steps]
        total = 0.0
        for stage, depth in enumerate(depth_time.stacks):
            shallow = copy.deepcopy(_unwrap(model))
            truncate(shallow, depth)
            rate = self.per_image(shallow, input_shape)
            if rate is None:
                raise ConfigError(
                    f"regime.match=true needs the model's FLOPs, which could not be counted "
                    f"({self.failed}); set regime.match=false and trainer.max_flops by hand."
                )
            total += (growth[stage + 1] - growth[stage]) * batch_size * rate
        log.info("matched to depth_time %s: a budget of %.4g training FLOPs", depth_time.stacks, total)
        return total

    def summary(self, train_seconds: float, unit: str = "img") -> dict:
        """``train.flops``, ``train.flops_per_<unit>`` and ``train.mfu`` (where the device's peak is known)."""
        if self.failed or not self.images:
            return {"flops": None, f"flops_per_{unit}": None, "mfu": None}
        peak = None
        if self.device.type == "cuda":
            peak = peak_flops(torch.cuda.get_device_name(self.device), _peak_precision(self.precision))
        return {
            "flops": self.total,
            f"flops_per_{unit}": self.total / self.images,
            "mfu": mfu(self.total, train_seconds, peak),
        }

    def state(self) -> dict:
        return {"total": self.total, "images": self.images, "pending": self.pending, "failed": self.failed}

    def restore(self, state: dict | None) -> None:
        if state:
            self.total, self.images = float(state["total"]), int(state["images"])
            self.pending, self.failed = int(state["pending"]), str(state.get("failed", ""))


def _peak_precision(precision: str) -> str:
    """The peak a run is measured against: its own tensor-core format; fp8 against bf16 (no fp8 row yet)."""
    return {"fp16": "fp16", "bf16": "bf16", "fp8": "bf16"}.get(precision, "fp32")


def _unwrap(model):
    """The module FLOPs are counted on: a compiled model's original."""
    return getattr(model, "_orig_mod", model)


def current_depth(model) -> int | None:
    """Blocks of a timm ViT, blocks per stage of a CIFAR ResNet; None for other models (e.g. a peft wrapper)."""
    from stackwise_bench.nn.growth import depth_of

    try:
        return depth_of(_unwrap(model))
    except ConfigError:
        return None
