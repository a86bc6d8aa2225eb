"""An exponential moving average of the weights (``trainer.ema``): timm's ``ModelEmaV3`` plus its checkpoint state.

timm's class keeps the averaged copy (parameters and floating buffers; integer buffers are copied) and the decay
schedule; this wrapper adds what a bit-identical resume needs, which timm's ``state_dict`` leaves out: the private
generator of its stochastic rounding (used only for bfloat16 weights).
"""

from __future__ import annotations

import torch

from stackwise_bench.errors import ConfigError


class WeightAverage:
    """The EMA of ``model``'s state: ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    ``update(model, step)`` with the optimizer step just taken (1, 2, ...): as timm's train.py, step 1 copies the
    weights (decay 0) and step ``s > 1`` uses ``decay``, or with ``warmup_power`` timm's ramp
    ``min(decay, 1 - s ** -warmup_power)``, which keeps an early average from remembering the first steps'
    weights for long in a short run.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup_power: float | None = None):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise ConfigError(
                f"trainer.ema={decay} must be a decay in (0, 1), or null (off); use e.g. trainer.ema=0.999."
            )
        warmup = warmup_power is not None
        if warmup and (
            isinstance(warmup_power, bool) or not isinstance(warmup_power, (int, float)) or warmup_power <= 0
        ):
            raise ConfigError(
                f"trainer.ema_warmup_power={warmup_power} must be a positive number, or null (no warmup); "
                "use e.g. trainer.ema_warmup_power=0.75."
            )
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
