"""An exponential moving average of the weights (``trainer.ema``): timm's ``ModelEmaV3`` plus its checkpoint state,
and :class:`AveragePart`, its part of the training step.

timm's class keeps the averaged copy (parameters and floating buffers; integer buffers are copied) and the decay
schedule; this wrapper adds what a bit-identical resume needs, which timm's ``state_dict`` leaves out: the private
generator of its stochastic rounding (used only for bfloat16 weights).
"""

from __future__ import annotations

import torch

from stackwise_bench.training.parts import Fit, StepInfo, StepPart


class WeightAverage:
    """The EMA of ``model``'s state: ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    ``update(model, step)`` with the optimizer step just taken (1, 2, ...): as timm's train.py, step 1 copies the
    weights (decay 0) and step ``s > 1`` uses ``decay``, or with ``warmup_power`` timm's ramp
    ``min(decay, 1 - s ** -warmup_power)``, which keeps an early average from remembering the first steps'
    weights for long in a short run.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup_power: float | None = None):
        warmup = warmup_power is not None  # decay and warmup_power are checked with the other knobs (knobs/)
        from timm.utils import ModelEmaV3  # here: timm costs seconds to import, and a run without EMA needs none

        self.ema = ModelEmaV3(model, decay=float(decay), use_warmup=warmup, warmup_power=warmup_power or 2 / 3)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model (always in eval mode)."""
        return self.ema.module

    def update(self, model: torch.nn.Module, step: int) -> None:
        self.ema.update(model, step=step)

    def state_dict(self) -> dict:
        generator = getattr(self.ema, "_sr_generator", None)
        return {"model": self.module.state_dict(), "rounding": generator.get_state() if generator else None}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        generator = getattr(self.ema, "_sr_generator", None)
        if generator is not None and state.get("rounding") is not None:
            generator.set_state(state["rounding"].cpu())


class AveragePart(StepPart):
    """``trainer.ema`` in the loop: the average is made when training starts (a copy of the model as it then is,
    its memory layout included), updated after every optimizer step, validated beside the trained weights each
    evaluation (``val_loss_ema``, ``val_<metric>_ema``) and kept in every checkpoint.

    ``best_on_ema`` (``trainer.best_weights=ema``): best.pt, early stopping and ``best_val_<metric>`` follow the
    average's validation, and best.pt's ``model`` is the average (the test phase and ``evaluate`` see it) with the
    trained weights as ``raw_model``. A model that grows during training cannot be averaged (knobs/ refuses it).
    """

    key = "ema"

    def __init__(self, decay: float, warmup_power: float | None = None, best_on_ema: bool = False):
        self.decay, self.warmup_power, self.best_on_ema = decay, warmup_power, best_on_ema
        self.average: WeightAverage | None = None

    def attach(self, fit: Fit) -> None:
        if self.average is None:  # once: the diagnostics' hooks live on the trained model only
            self.model = fit.model
            self.average = WeightAverage(fit.model, self.decay, self.warmup_power)

    def after_step(self, info: StepInfo) -> None:
        self.average.update(self.model, info.step)

    def validate(self, evaluate, row: dict) -> dict | None:
        keys = [k.removeprefix("val_") for k in row if k.startswith("val_") and not k.endswith("_ema")]
        if evaluate is None:  # no validation this epoch
            row.update({f"val_{k}_ema": None for k in keys})
            return None
        averaged = evaluate(self.average.module)
        row.update({f"val_{k}_ema": averaged[k] for k in keys})
        return averaged if self.best_on_ema else None

    def best_checkpoint(self, state: dict) -> dict:
        if self.best_on_ema:
            state = {**state, "raw_model": state["model"], "model": state["ema"]["model"]}
        return state

    def state(self) -> dict:
        return self.average.state_dict()

    def restore(self, state: dict | None) -> None:
        if state is None:
            raise ValueError("it holds no weight average (trainer.ema was off when it was written)")
        self.average.load_state_dict(state)

    def summary(self) -> dict:
        return {"train": {"best_weights": "ema" if self.best_on_ema else "raw"}}  # whose val metric best_val_* is
