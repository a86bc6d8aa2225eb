"""The training loop: epochs of steps, validation, early stopping, checkpoints, resume.

The trainer knows nothing about Hydra or files. It emits per-epoch metric dicts
and checkpoint states to a ``sink`` (the run record) and returns a
:class:`FitResult`; ``train.run`` decides what to do with it. Where and how it
computes (device, precision, seed, threads, layout) is its :class:`Runtime`.

Batch mixing (``augmentation.mixup_alpha``/``cutmix_alpha``) runs here, in the step, not in the loader: it
needs the labels and changes the loss. Its generator is seeded from ``(seed, epoch, step)`` like the loader's
augmentation, so a resumed run mixes as the uninterrupted one did. With mixing on, the loss is the
cross-entropy against soft targets (``trainer.label_smoothing`` folded in, as timm's Mixup does), and
``train_top1`` counts a prediction right when it is the *dominant label* of its sample: the label with the
larger weight in the mixed target (the sample's own when lambda >= 0.5, else its partner's).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time

import torch
import torch.nn.functional as F

from stackwise_bench.data.mixup import step_generator
from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.growth import match_depth
from stackwise_bench.training.checkpointing import Progress, checkpoint_state, restore_checkpoint
from stackwise_bench.training.compute import Compute, current_depth
from stackwise_bench.training.diagnostics import Diagnostics
from stackwise_bench.training.ema import WeightAverage
from stackwise_bench.training.metrics import evaluate
from stackwise_bench.training.precision import synchronize
from stackwise_bench.training.regime import Classical
from stackwise_bench.training.reporting import log_epoch, progress_bar, train_summary, update_bar
from stackwise_bench.training.runtime import Runtime
from stackwise_bench.training.stop import StopSignal

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    reason = "diverged"  # the run record's error.reason and the sweep's failure table


@dataclasses.dataclass
class FitResult:
    status: str
    train: dict
    test: dict
    resources: dict


def global_norm(model) -> torch.Tensor:
    """The L2 norm of all gradients together (what clip_grad_norm_ returns), for steps that do not clip."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def base_lr(optimizer) -> float:
    """The learning rate before per-layer scaling (``optimizer.layer_decay``): group 0's over its ``lr_scale``."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


class Trainer:
    """Trains one model; the loop's knobs come from ``conf/trainer/*.yaml``, the rest from ``runtime``.

    ``ema`` (a decay, None = off): a weight average updated after every optimizer step (:mod:`.ema`) and
    validated beside the trained weights each evaluation (``val_loss_ema``, ``val_top1_ema``); it is in every
    checkpoint. ``ema_warmup_power``: timm's decay warmup (None = the constant decay). ``best_weights="ema"``:
    best.pt, early stopping and ``best_val_top1`` follow the average's ``val_top1``, and best.pt's ``model``
    is the average (the test phase and ``evaluate`` see it) with the trained weights as ``raw_model``.
    ``train_top1`` with batch mixing: against the dominant label (module docstring).
    """

    def __init__(
        self,
        runtime: Runtime,
        max_epochs: int = 15,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        grad_clip: float | None = 1.0,
        early_stopping_patience: int | None = 5,
        eval_every: int = 1,
        label_smoothing: float = 0.0,
        resume: bool = False,
        progress: str = "auto",
        log_every_n_steps: int = 20,
        max_flops: float | None = None,
        ema: float | None = None,
        ema_warmup_power: float | None = None,
        best_weights: str | None = None,
    ):
        for key, value in (
            ("max_epochs", max_epochs),
            ("batch_size", batch_size),
            ("eval_batch_size", 1 if eval_batch_size is None else eval_batch_size),
            ("eval_every", eval_every),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"trainer.{key}={value} must be a positive integer.")
        if grad_clip is not None and (
            isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float)) or not grad_clip >= 0
        ):
            raise ConfigError(
                f"trainer.grad_clip={grad_clip} must be a non-negative number, or null (0 and null "
                "disable clipping); use e.g. trainer.grad_clip=1.0."
            )
        if max_flops is not None and (
            isinstance(max_flops, bool) or not isinstance(max_flops, (int, float)) or not 0 < max_flops < math.inf
        ):
            raise ConfigError(
                f"trainer.max_flops={max_flops} must be a positive number of training FLOPs, or null (train by "
                "trainer.max_epochs); use e.g. trainer.max_flops=1e12."
            )
        if progress not in ("auto", "bar", "log"):
            raise ConfigError(f"trainer.progress={progress} is not known; use auto, bar or log.")
        if best_weights not in (None, "raw", "ema"):
            raise ConfigError(f"trainer.best_weights={best_weights} is not known; use raw, ema or null (= raw).")
        if best_weights == "ema" and ema is None:
            raise ConfigError(
                "trainer.best_weights=ema picks best.pt by the weight average's validation, and trainer.ema=null "
                "keeps none; set trainer.ema=0.999 or trainer.best_weights=raw."
            )
        self.runtime, self.device = runtime, runtime.device
        self.max_epochs, self.batch_size = max_epochs, batch_size
        self.eval_batch_size = runtime.eval_batch_size(eval_batch_size, batch_size)
        self.grad_clip, self.patience, self.eval_every = grad_clip, early_stopping_patience, eval_every
        self.label_smoothing, self.resume = label_smoothing, resume
        self.log_every_n_steps = log_every_n_steps
        self.show_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        self.amp = runtime.autocast
        self._compile_pending = runtime.compile  # the first compiled step of this process includes compilation
        self.max_flops, self.max_steps = max_flops, None  # max_steps: set by plan() from the FLOP budget
        self.compute = Compute(runtime.device, runtime.precision)
        self.adapter = None  # fit's adapter (AdaLoRA's schedule), or None
        self.ema_decay, self.ema_warmup_power = ema, ema_warmup_power
        self.best_on_ema = best_weights == "ema"  # best.pt, early stopping and best_val_top1 follow the EMA
        self.ema = None  # fit's WeightAverage, or None

    def plan(self, model, loader, regime=None) -> int:
        """The steps this run will take (the schedule's length): epochs x steps, or what a FLOP budget buys
        (``trainer.max_flops``, or ``regime=classical_matched``'s): then ``max_epochs`` becomes the epochs the
        budget spans (the last one partial) and training stops at the budget's step (:meth:`Compute.plan`)."""
        self.image_shape = loader.image_shape
        total, self.max_steps, self.max_flops = self.compute.plan(
            self.max_flops, regime, model, self.image_shape, self.batch_size, len(loader), self.max_epochs
        )
        if self.max_steps is not None:
            self.max_epochs = math.ceil(self.max_steps / len(loader))
        return total

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        model,
        loaders,
        optimizer,
        scheduler,
        sink,
        monitors=(),
        stop: StopSignal | None = None,
        diagnostics: Diagnostics | None = None,
        regime=None,
        adapter=None,
    ) -> FitResult:
        """Train ``model`` on ``loaders.train``, validate on ``loaders.val``, test the best on ``loaders.test``.

        ``stop`` (held by ``train.run`` for the whole run) asks to stop at the next step, in validation or in
        the test phase: the result is then ``interrupted`` with ``last.pt`` saved where training stood.
        ``diagnostics`` (None: none) measures gradients, weights and activations on its logging steps; its rows
        go to ``sink.log_diagnostics``. Where the sink ``wants_steps`` (a tracker is attached), every
        ``log_every_n_steps``-th step's loss, learning rate and grad norm go to ``sink.log_step``.
        ``regime`` (None: classical) may grow the model at planned steps (:mod:`~stackwise_bench.training.regime`).
        ``adapter`` (None: none) is a PEFT method's part of the loop (:mod:`~stackwise_bench.training.adapters`):
        a penalty added to the loss, a call after every optimizer step, state in every checkpoint.
        """
        if stop is None:
            with StopSignal() as own:
                return self.fit(
                    model,
                    loaders,
                    optimizer,
                    scheduler,
                    sink,
                    monitors,
                    stop=own,
                    diagnostics=diagnostics,
                    regime=regime,
                    adapter=adapter,
                )
        self.regime = regime if regime is not None else Classical()
        self.adapter = adapter
        self.num_classes = loaders.num_classes
        self.diagnostics, self.images = diagnostics, 0
        self._check_regime(optimizer)
        # Copied before diagnostics hook the model (the copy would carry the hooks); updated after every step.
        self.ema = WeightAverage(model, self.ema_decay, self.ema_warmup_power) if self.ema_decay is not None else None
        augment = getattr(loaders.train, "augment", None)
        self.mixing = getattr(augment, "mixing", None)  # the augmentation's batch mixing, applied in the step
        hook_guards = None  # dynamo's setting while activation hooks need it (a joblib worker runs the next job)
        if diagnostics is not None:
            diagnostics.attach(model)
            if self.runtime.compile and diagnostics.activations:  # else dynamo skips hooks added after compiling
                hook_guards = torch._dynamo.config.skip_nnmodule_hook_guards
                torch._dynamo.config.skip_nnmodule_hook_guards = False
        scaler = self.runtime.scaler()
        if self.runtime.wants_channels_last(model):
            model.to(memory_format=torch.channels_last)  # in place: the optimizer keeps its parameters
            if self.ema is not None:
                self.ema.module.to(memory_format=torch.channels_last)
        forward = torch.compile(model) if self.runtime.compile else model
        progress = (
            restore_checkpoint(model, optimizer, scheduler, scaler, sink, self.device, self._prepare_resume)
            if self.resume
            else Progress()
        )

        if diagnostics is not None:
            diagnostics.restore(progress.diagnostics)
        self.compute.restore(progress.compute)
        self.image_shape = loaders.train.image_shape

        def save_last() -> None:
            if diagnostics is not None:
                progress.diagnostics = diagnostics.state()
            progress.compute = self.compute.state()
            sink.save_checkpoint("last", self._checkpoint(model, optimizer, scheduler, scaler, progress))

        status = "early_stopped" if self._patience_spent(progress) else "completed"  # a resume after the last epoch
        self.raw_model = model
        for monitor in monitors:
            monitor.start(sink)
        try:
            while progress.epoch < self.max_epochs and status == "completed":
                row = self._train_epoch(
                    forward, loaders.train, optimizer, scheduler, scaler, progress, stop, save_last, sink
                )
                if row is None:  # a signal arrived: last.pt holds this step
                    status = "interrupted"
                    break
                improved = self._validate(forward, loaders.val, progress, row)
                progress.history.append(row)
                save_last()  # before the row: a kill in between resumes from here and rewrites the row from history
                if improved:
                    best = self._checkpoint(model, optimizer, scheduler, scaler, progress, best=True)
                    sink.save_checkpoint("best", best)
                sink.log_epoch(row)
                log_epoch(row, self.max_epochs)
                if stop.requested:  # arrived during validation: the epoch is saved whole, stop here
                    status = "interrupted"
                elif self._patience_spent(progress):
                    status = "early_stopped"
                    log.info(
                        "early stopping: val_top1 (ties broken by val_loss) has not improved for %d evaluations",
                        progress.bad_evals,
                    )
        finally:
            if hook_guards is not None:
                torch._dynamo.config.skip_nnmodule_hook_guards = hook_guards
            resources = {}
            for monitor in monitors:
                resources.update(monitor.stop())
        resources["images"] = self.images  # this attempt's; train.run_resources makes energy per image of the run
        if diagnostics is not None and status != "interrupted":  # the trained weights, layer by layer
            sink.log_diagnostics({**diagnostics.final_weights(model), "step": progress.global_step})
        test = {} if status == "interrupted" else self._test(model, forward, loaders.test, sink, stop)
        if test is None:  # stopped during the test phase: training is saved whole; a resume runs the test
            status, test = "interrupted", {}
        train = train_summary(progress, status) | self.regime.describe()
        if self.ema is not None:
            train["best_weights"] = "ema" if self.best_on_ema else "raw"  # whose val_top1 best_val_top1 is
        train.update(self.compute.summary(train["time_s"] - train["compile_time_s"]))  # the timed training seconds
        return FitResult(status, train, test, resources)

    def _checkpoint(self, model, optimizer, scheduler, scaler, progress: Progress, best: bool = False) -> dict:
        """A checkpoint; ``best`` with ``trainer.best_weights=ema``: ``model`` is the weight average (what
        ``_test``, ``evaluate`` and ``rebuild`` load), and the trained weights are kept as ``raw_model``."""
        state = {
            **checkpoint_state(model, optimizer, scheduler, scaler, progress, self.device),
            "regime": self.regime.state_dict(),
            "adapter": self.adapter.state_dict() if self.adapter is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }
        if best and self.best_on_ema:
            state["raw_model"], state["model"] = state["model"], state["ema"]["model"]
        return state

    def _check_regime(self, optimizer) -> None:
        """Refuse what a growing model (``regime=depth_time``) cannot keep: a weight average of a fixed set of
        tensors, and per-layer learning rates that its regrouping of the optimizer would drop."""
        if isinstance(self.regime, Classical):
            return
        if self.ema_decay is not None:
            raise ConfigError(
                f"trainer.ema={self.ema_decay} averages a fixed set of weights, and regime={self.regime.name} grows "
                "the model during training; set trainer.ema=null or use regime=classical."
            )
        scales = [g["lr_scale"] for g in optimizer.param_groups if "lr_scale" in g]
        if scales:
            raise ConfigError(
                f"optimizer.layer_decay sets per-layer learning rates (scales {min(scales):g}..{max(scales):g}), "
                f"which regime={self.regime.name} regroups away when it grows the model; set "
                "optimizer.layer_decay=null or use regime=classical."
            )

    def _prepare_resume(self, state: dict, model, optimizer, scheduler) -> None:
        """Before a checkpoint is loaded: grow the fresh (first-stack) model to the stage the checkpoint holds,
        and give the adapter's loop state (AdaLoRA's importance scores) and the weight average back."""
        if self.adapter is not None and state.get("adapter") is not None:
            self.adapter.load_state_dict(state["adapter"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError("it holds no weight average (trainer.ema was off when it was written)")
            self.ema.load_state_dict(state["ema"])
        if state.get("regime"):
            self.regime.load_state_dict(state["regime"])
            self.regime.replay(state["regime"]["stage"], model, optimizer, scheduler)
            if self.diagnostics is not None:
                self.diagnostics.attach(model)

    def _grow_if_due(self, optimizer, scheduler, progress: Progress) -> None:
        """Grow the model at a planned step (pricing the images trained so far at the old depth first), and
        apply the regime's LR rewarm on the steps after a growth."""
        due = self.regime.stage_at(progress.global_step) != self.regime.stage
        if not due and not getattr(self.regime, "lr_rewarm_steps", 0):
            return
        if due:
            self.compute.flush(self.raw_model, self.image_shape)
        grown = self.regime.before_step(progress.global_step, self.raw_model, optimizer, scheduler)
        if grown is None:
            return
        if self.diagnostics is not None:
            self.diagnostics.attach(self.raw_model)
        log.info(
            "step %d: grew to depth %d (stage %d, %d new parameter tensors)",
            progress.global_step,
            grown["depth"],
            grown["stage"],
            grown["new_params"],
        )

    def _patience_spent(self, progress: Progress) -> bool:
        return bool(self.patience) and progress.bad_evals >= self.patience

    # -------------------------------------------------------------- epochs
    def _train_epoch(self, model, loader, optimizer, scheduler, scaler, progress, stop, save_last, sink) -> dict | None:
        model.train()
        # Running sums of this epoch; an interrupted epoch's come back from its checkpoint. compile_*: the
        # first compiled step of a process, which includes compilation (timed apart, out of train_img_s).
        sums = {
            "loss": 0.0,
            "correct": 0,
            "seen": 0,
            "time_s": 0.0,
            "compile_s": 0.0,
            "compile_imgs": 0,
            **progress.partial,
        }
        loss_sum = torch.tensor(sums["loss"], device=self.device, dtype=torch.float64)
        correct = torch.tensor(sums["correct"], device=self.device)
        seen = sums["seen"]
        bar = progress_bar(len(loader), progress, self.max_epochs) if self.show_bar else None
        diag, steps_wanted, adapter = self.diagnostics, getattr(sink, "wants_steps", False), self.adapter
        synchronize(self.device)
        t0 = time.perf_counter()
        for x, y in loader.epoch(progress.epoch, start_step=progress.step):
            self._grow_if_due(optimizer, scheduler, progress)
            step = progress.global_step + 1  # the number of the step about to run
            probing = diag is not None and diag.due(step)
            if probing:
                diag.before_forward()
            logits, loss, y = self._forward_loss(model, x, y, loader.seed, progress)
            objective = loss if adapter is None else loss + adapter.penalty()  # the reported loss stays the CE
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(objective).backward()
            reporting = steps_wanted and step % self.log_every_n_steps == 0  # a tracker wants this step's row
            if self.grad_clip or probing or reporting or adapter is not None:
                scaler.unscale_(optimizer)  # true gradients (scaler.step would unscale them anyway)
            if probing:  # per-layer and global norms of the gradients as backward left them: before clipping
                diag.after_backward(step)
            norm = None  # the global grad norm before clipping: free where clipping computes it
            if self.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            elif reporting:
                norm = global_norm(model)
            if diag is not None and not probing:
                diag.after_backward(step, grad_norm=norm)
            lr = base_lr(optimizer) if reporting else None  # this step's rate (the scheduler moves it)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if self.ema is not None:
                self.ema.update(self.raw_model, progress.global_step + 1)
            if adapter is not None:  # AdaLoRA: reallocate ranks from this step's gradients, before they are cleared
                ranks = adapter.after_step(step, progress.epoch)
                if ranks is not None:
                    sink.log_diagnostics(ranks)
            if probing:
                sink.log_diagnostics(diag.after_step(step, progress.epoch))
            if reporting:
                grad = None if norm is None else float(norm)
                sink.log_step({"step": step, "loss": float(loss.detach()), "lr": lr, "grad_norm": grad})
            loss_sum += loss.detach().double() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            self.images += y.numel()
            self.compute.step(y.numel())
            progress.step += 1
            progress.global_step += 1
            if self._compile_pending:
                synchronize(self.device)
                sums["compile_s"] += time.perf_counter() - t0
                sums["compile_imgs"] += y.numel()
                self._compile_pending = False
            if bar is not None and progress.step % self.log_every_n_steps == 0:
                update_bar(bar, progress.step, loss_sum, correct, seen, sums["time_s"] + time.perf_counter() - t0)
            if stop.requested or stop.save_now:  # save this step: to stop, or because a scheduler may kill us
                synchronize(self.device)
                progress.partial = {
                    **sums,
                    "loss": float(loss_sum),
                    "correct": int(correct),
                    "seen": seen,
                    "time_s": sums["time_s"] + time.perf_counter() - t0,
                }
                save_last()
                progress.partial, stop.save_now = {}, False
                if stop.requested:
                    return None
            if self.max_steps is not None and progress.global_step >= self.max_steps:
                break  # the FLOP budget is spent: this (last) epoch ends here
        synchronize(self.device)
        train_time = sums["time_s"] + time.perf_counter() - t0
        if bar is not None:
            bar.close()
        train_loss = float(loss_sum) / max(1, seen)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"training loss is {train_loss} in epoch {progress.epoch + 1}; {self._divergence_fix()}."
            )
        progress.epoch += 1
        progress.step, progress.partial = 0, {}
        timed_s = max(train_time - sums["compile_s"], 1e-9)
        flops = self.compute.flush(self.raw_model, self.image_shape)  # measured after the timed steps
        return {
            "epoch": progress.epoch,
            "step": progress.global_step,
            "flops": flops,  # cumulative training FLOPs (forward + backward) at the end of this epoch
            "depth": current_depth(self.raw_model),
            "lr": base_lr(optimizer),
            "train_loss": train_loss,
            "train_top1": 100.0 * int(correct) / max(1, seen),
            "epoch_time_s": train_time,
            "compile_time_s": sums["compile_s"],
            "train_img_s": (seen - sums["compile_imgs"]) / timed_s,
        }

    def _forward_loss(self, model, x, y, seed: int, progress: Progress) -> tuple:
        """``(logits, loss, labels)`` of a step; with batch mixing on, ``x`` is mixed first, the loss is against
        the soft targets and ``labels`` are the dominant ones (what ``train_top1`` counts against)."""
        if self.mixing is None:
            with self.amp():
                logits = model(x)
            return logits, F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing), y
        generator = step_generator(seed, progress.epoch, progress.step)
        x, targets, y = self.mixing(x, y, self.num_classes, self.label_smoothing, generator)
        with self.amp():
            logits = model(x)
        return logits, F.cross_entropy(logits.float(), targets), y

    def _divergence_fix(self) -> str:
        """What to try against a NaN/inf loss, for this run's precision."""
        fix = "lower optimizer.lr"
        if not self.grad_clip:
            fix += " or set trainer.grad_clip=1.0"
        other = {"fp16": "precision=bf16 or fp32", "bf16": "precision=fp32", "fp8": "precision=bf16"}
        if self.runtime.precision in other:
            fix += f" or use {other[self.runtime.precision]}"
        return fix

    def _validate(self, model, loader, progress, row) -> bool:
        """Adds val_* (and with ``trainer.ema`` val_*_ema) to ``row``; returns True when this is the best epoch so
        far, by the raw weights' validation or, with ``trainer.best_weights=ema``, the average's."""
        due = progress.epoch % self.eval_every == 0 or progress.epoch == self.max_epochs
        if not due:
            row.update(val_loss=None, val_top1=None, eval_time_s=0.0)
            if self.ema is not None:
                row.update(val_loss_ema=None, val_top1_ema=None)
            return False
        t0 = time.perf_counter()
        val = evaluate(model, loader, self.num_classes, self.amp, self.device)
        row.update(val_loss=val["loss"], val_top1=val["top1"])
        if self.ema is not None:
            averaged = evaluate(self.ema.module, loader, self.num_classes, self.amp, self.device)
            row.update(val_loss_ema=averaged["loss"], val_top1_ema=averaged["top1"])
            val = averaged if self.best_on_ema else val
        row["eval_time_s"] = time.perf_counter() - t0
        if (val["top1"], -val["loss"]) > (progress.best_val_top1, -progress.best_val_loss):
            progress.best_val_top1, progress.best_val_loss = val["top1"], val["loss"]
            progress.best_epoch, progress.bad_evals = progress.epoch, 0
            return True
        progress.bad_evals += 1
        return False

    def _test(self, model, forward, loader, sink, stop) -> dict | None:
        """Full metrics on the test split with the best checkpoint's weights; None when ``stop`` cut it short."""
        best = sink.load_checkpoint("best", map_location=self.device)
        match_depth(model, best["model"])  # a depth-as-time best.pt from before a growth holds fewer blocks
        model.load_state_dict(best["model"])
        test = evaluate(forward, loader, self.num_classes, self.amp, self.device, full=True, stop=stop)
        if test is None:
            return None
        test["checkpoint_epoch"] = best["progress"]["epoch"]
        log.info(
            "test: top1 %.2f%%  top5 %.2f%%  f1_macro %.2f  (best epoch %d)",
            test["top1"],
            test["top5"],
            test["f1_macro"],
            test["checkpoint_epoch"],
        )
        return test
