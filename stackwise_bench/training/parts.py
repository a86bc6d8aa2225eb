"""What may join a training step: the :class:`StepPart` protocol, and :class:`Parts`, the loop's list of them.

The loop (:mod:`stackwise_bench.training.trainer`) knows no part by name. It calls the list's hooks at fixed
points of every step, and every hook does nothing unless a part overrides it::

    attach(fit)                         fit start, after a resume's replay, after a growth: the model as it is now
    needs_grads(step) / wants_norm(step)  this step's gradients unscaled / its global gradient norm measured
    before_forward(step)
    penalty()                           an extra loss term (None: none)
    after_backward(info)                before clipping; ``info.grad_norm`` is the unclipped norm when measured
    after_step(info)                    after the optimizer and scheduler steps
    validate(evaluate, row)             beside each validation; may return the metrics best.pt is chosen by
    best_checkpoint(state)              may rewrite best.pt's state (the weight average as its model)
    state() / restore(state)            the part's share of a checkpoint, under its ``key``
    finish(status, model, step)         once training ended (not after an interrupt): last rows
    summary()                           the part's sections of summary.json
    close()                             always, at the end of fit: undo process-wide settings

The parts of a run (diagnostics, AdaLoRA's schedule, the weight average, the trackers' step rows) are built by
:func:`stackwise_bench.build.build_run`; the FLOP ledger, the epoch meter and the stop are plain helpers of the
loop. The depth-as-time regime keeps its own protocol (:mod:`.regime`): it changes the model and the optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Fit:
    """What a part may use during one ``fit``: the model being trained (not its compiled wrapper), the
    optimizer, and the run record (``sink``: ``log_step``, ``log_diagnostics``, ``wants_steps``)."""

    model: Any
    optimizer: Any
    sink: Any


@dataclasses.dataclass
class StepInfo:
    """One training step as the hooks see it."""

    step: int  # the 1-based global step being run
    epoch: int  # epochs completed before it
    loss: Any = None  # the task's loss (a detached tensor), without the parts' penalties
    grad_norm: Any = None  # the global gradient norm before clipping, where measured this step


class StepPart:
    """A no-op part: override the hooks a part needs (module docstring). ``key``: its checkpoint entry."""

    key: str = ""

    def attach(self, fit: Fit) -> None:
        pass

    def needs_grads(self, step: int) -> bool:
        return False

    def wants_norm(self, step: int) -> bool:
        return False

    def before_forward(self, step: int) -> None:
        pass

    def penalty(self) -> Any:
        return None

    def after_backward(self, info: StepInfo) -> None:
        pass

    def after_step(self, info: StepInfo) -> None:
        pass

    def validate(self, evaluate: Callable, row: dict) -> dict | None:
        return None

    def best_checkpoint(self, state: dict) -> dict:
        return state

    def state(self) -> Any:
        return None

    def restore(self, state: Any) -> None:
        pass

    def finish(self, status: str, model, step: int) -> None:
        pass

    def summary(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class Parts:
    """The parts of one run, called in their order (the order their rows reach the record)."""

    def __init__(self, parts: list[StepPart] | None = None):
        self.parts = [p for p in parts or [] if p is not None]

    def __iter__(self):
        return iter(self.parts)

    def attach(self, fit: Fit) -> None:
        for part in self.parts:
            part.attach(fit)

    def needs_grads(self, step: int) -> bool:
        return any(part.needs_grads(step) for part in self.parts)

    def wants_norm(self, step: int) -> bool:
        return any(part.wants_norm(step) for part in self.parts)

    def before_forward(self, step: int) -> None:
        for part in self.parts:
            part.before_forward(step)

    def objective(self, loss):
        """``loss`` plus every part's penalty (``loss`` itself when no part adds one)."""
        for part in self.parts:
            term = part.penalty()
            if term is not None:
                loss = loss + term
        return loss

    def after_backward(self, info: StepInfo) -> None:
        for part in self.parts:
            part.after_backward(info)

    def after_step(self, info: StepInfo) -> None:
        for part in self.parts:
            part.after_step(info)

    def validate(self, evaluate: Callable, row: dict) -> dict | None:
        """Every part's validation into ``row``; the metrics best.pt is chosen by, where a part names them."""
        chosen = None
        for part in self.parts:
            chosen = part.validate(evaluate, row) or chosen
        return chosen

    def best_checkpoint(self, state: dict) -> dict:
        for part in self.parts:
            state = part.best_checkpoint(state)
        return state

    def state(self) -> dict:
        return {part.key: part.state() for part in self.parts if part.key}

    def restore(self, state: dict) -> None:
        for part in self.parts:
            if part.key:
                part.restore(state.get(part.key))

    def finish(self, status: str, model, step: int) -> None:
        for part in self.parts:
            part.finish(status, model, step)

    def summary(self) -> dict:
        sections: dict = {}
        for part in self.parts:
            sections.update(part.summary())
        return sections

    def close(self) -> None:
        for part in self.parts:
            part.close()
