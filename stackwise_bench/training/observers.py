"""Step parts that only watch training: the diagnostics' measurements and the training step rows.

Neither changes what is trained (tests/test_diagnostics.py and tests/test_loggers.py prove it): they ask for
true gradients or a gradient norm on their steps, and write rows through the run record.
"""

from __future__ import annotations

import torch

from stackwise_bench.training.diagnostics import Diagnostics
from stackwise_bench.training.optim import base_lr
from stackwise_bench.training.parts import Fit, StepInfo, StepPart


class DiagnosticsPart(StepPart):
    """:class:`~.diagnostics.Diagnostics` in the loop: gradients, weights and activations on its logging steps,
    the global gradient norm on every step; its interval so far is in every checkpoint.

    ``compiled``: the forward is ``torch.compile``'d, so activation hooks need dynamo's hook guards while the run
    lasts (a joblib worker runs the next job in the same process: the setting is put back at the end).
    """

    key = "diagnostics"

    def __init__(self, diagnostics: Diagnostics, compiled: bool = False):
        self.diag, self.compiled = diagnostics, compiled
        self._hook_guards = None

    def attach(self, fit: Fit) -> None:
        self.sink = fit.sink
        self.diag.attach(fit.model)
        if self.compiled and self.diag.activations and self._hook_guards is None:  # else dynamo skips late hooks
            self._hook_guards = torch._dynamo.config.skip_nnmodule_hook_guards
            torch._dynamo.config.skip_nnmodule_hook_guards = False

    def needs_grads(self, step: int) -> bool:
        return self.diag.due(step)

    def before_forward(self, step: int) -> None:
        if self.diag.due(step):
            self.diag.before_forward()

    def after_backward(self, info: StepInfo) -> None:
        if self.diag.due(info.step):  # per-layer and global norms of the gradients as backward left them
            self.diag.after_backward(info.step)
        else:  # the norm clipping measures anyway (None without clipping)
            self.diag.after_backward(info.step, grad_norm=info.grad_norm)

    def after_step(self, info: StepInfo) -> None:
        if self.diag.due(info.step):
            self.sink.log_diagnostics(self.diag.after_step(info.step, info.epoch))

    def state(self):
        return self.diag.state()

    def restore(self, state) -> None:
        self.diag.restore(state)

    def finish(self, status: str, model, step: int) -> None:
        self.sink.log_diagnostics({**self.diag.final_weights(model), "step": step})  # the trained weights

    def close(self) -> None:
        if self._hook_guards is not None:
            torch._dynamo.config.skip_nnmodule_hook_guards = self._hook_guards
            self._hook_guards = None


class StepRows(StepPart):
    """The training step rows: step 1's and every ``every_n_steps``-th step's loss, learning rate and gradient norm
    to the run record (``sink.log_step``: ``steps.jsonl`` and the trackers' ``train/*``).

    Step 1 is logged so a warmup is visible from its start. The norm is measured on those steps even without
    clipping; reading the gradients changes nothing that is trained (tests/test_steps_record.py).
    A sink without ``wants_steps`` (a test's stand-in) gets no rows.
    """

    def __init__(self, every_n_steps: int = 20):
        self.every_n_steps = every_n_steps
        self.on, self.lr = False, None

    def attach(self, fit: Fit) -> None:
        self.sink, self.optimizer = fit.sink, fit.optimizer
        self.on = bool(getattr(fit.sink, "wants_steps", False))

    def due(self, step: int) -> bool:
        """Whether step ``step`` (1-based, global) is logged."""
        return self.on and (step == 1 or step % self.every_n_steps == 0)

    needs_grads = due  # the norm of the true (unscaled) gradients
    wants_norm = due

    def after_backward(self, info: StepInfo) -> None:
        self.lr = base_lr(self.optimizer) if self.due(info.step) else None  # before the scheduler moves it

    def after_step(self, info: StepInfo) -> None:
        if self.due(info.step):
            grad = None if info.grad_norm is None else float(info.grad_norm)
            row = {"step": info.step, "epoch": info.epoch + 1, "loss": float(info.loss), "lr": self.lr}
            self.sink.log_step({**row, "grad_norm": grad})
