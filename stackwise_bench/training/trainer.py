"""The training loop: epochs of steps, validation, early stopping, checkpoints, resume.

It knows no file, no Hydra, no task and no part by name: it emits metric dicts and checkpoint states to a ``sink``
(the run record) and returns a :class:`FitResult`. What is learned is its ``task`` (:mod:`.tasks`), what joins a
step its ``parts`` (:mod:`.parts`), where it computes its :class:`Runtime`; the regime (:mod:`.regime`) may grow
the model before a step, and says which epochs may become ``best.pt``: those at the final depth (``tested``), so a
depth-as-time run is tested as the network it ends with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time

import torch

from stackwise_bench.nn.lora import count_parameters
from stackwise_bench.training.accumulate import merge_outputs, micro_batches
from stackwise_bench.training.checkpointing import Progress, checkpoint_state, restore_checkpoint
from stackwise_bench.training.compute import Compute, current_depth
from stackwise_bench.training.distributed import SINGLE, Group, SyncedStop, full_tensor
from stackwise_bench.training.divergence import TrainingDiverged, check_loss, check_weights, divergence_fix  # noqa: F401
from stackwise_bench.training.meter import EpochMeter
from stackwise_bench.training.optim import base_lr, global_norm
from stackwise_bench.training.parts import Fit, Parts, StepInfo
from stackwise_bench.training.regime import Classical
from stackwise_bench.training.reporting import log_epoch, progress_bar, train_summary, update_bar
from stackwise_bench.training.runtime import Runtime
from stackwise_bench.training.stop import StopSignal

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FitResult:
    status: str
    train: dict
    test: dict
    resources: dict
    sections: dict  # the task's and the parts' summary.json sections


class Trainer:
    """Trains one model; the loop's knobs come from ``conf/trainer/*.yaml`` (checked by :mod:`~stackwise_bench.knobs`
    before anything is built), the rest from ``runtime``."""

    def __init__(
        self,
        runtime: Runtime,
        max_epochs: int = 15,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        grad_clip: float | None = 1.0,
        early_stopping_patience: int | None = 5,
        eval_every: int = 1,
        resume: bool = False,
        progress: str = "auto",
        log_every_n_steps: int = 20,
        max_flops: float | None = None,
        accumulate: int = 1,
        group: Group = SINGLE,
    ):
        self.runtime, self.device = runtime, runtime.device
        self.group = group  # the ranks of a run on several devices (:mod:`.distributed`); SINGLE: this process
        self.max_epochs, self.batch_size = max_epochs, batch_size
        self.eval_batch_size = runtime.eval_batch_size(eval_batch_size, batch_size)
        self.grad_clip, self.patience, self.eval_every = grad_clip, early_stopping_patience, eval_every
        self.resume, self.log_every_n_steps = resume, log_every_n_steps
        self.accumulate = accumulate  # micro-batches per step: the same step in less memory (:meth:`_backward`)
        self.show_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        self._compile_pending = runtime.compile  # the first compiled step of this process includes compilation
        self.max_flops, self.max_steps = max_flops, None  # max_steps: set by plan() from the FLOP budget
        self.compute = Compute(runtime.device, runtime.precision)  # the FLOP ledger

    def plan(self, model, loader, regime=None, task=None, steps: int | None = None) -> int:
        """The steps this run will take: epochs x steps, ``steps`` (a token budget's), or what a FLOP budget buys
        (:meth:`Compute.plan`; then ``max_epochs`` becomes the epochs it spans, the last one partial, and training
        stops at its step)."""
        shape = task.sample_shape(loader) if task is not None else loader.image_shape
        total, self.max_steps, self.max_flops = self.compute.plan(
            self.max_flops, regime, model, shape, self.batch_size, len(loader), self.max_epochs, steps
        )
        if self.max_steps is not None:
            self.max_epochs = math.ceil(self.max_steps / len(loader))
        return total

    # ------------------------------------------------------------------ fit
    def fit(self, model, loaders, optimizer, scheduler, sink, task, monitors=(), stop=None, parts=(), regime=None):
        """Train ``model`` on ``loaders.train``, validate on ``loaders.val``, test the best on ``loaders.test``.

        ``stop`` (held by ``train.run`` for the whole run) asks to stop at the next step, in validation or in
        the test phase: the result is then ``interrupted`` with ``last.pt`` saved where training stood.
        """
        with contextlib.nullcontext(stop) if stop is not None else StopSignal() as stop:
            self.task, self.parts, self.scheduler = task, Parts(list(parts)), scheduler
            self.stop = SyncedStop(stop, self.group)  # every rank stops (and saves) at the same step
            self.regime = regime if regime is not None else Classical()
            self.shape, self.scaler, self.raw_model = task.sample_shape(loaders.train), self.runtime.scaler(), model
            if self.runtime.wants_channels_last(model):
                model.to(memory_format=torch.channels_last)  # in place: the optimizer keeps its parameters
            self.fit_ctx = Fit(model, optimizer, sink)
            self.parts.attach(self.fit_ctx)
            try:
                return self._fit(model, loaders, optimizer, scheduler, sink, monitors)
            finally:
                self.parts.close()

    def _fit(self, model, loaders, optimizer, scheduler, sink, monitors) -> FitResult:
        compiled = torch.compile(model) if self.runtime.compile else model
        self.forward = self.group.wrap(compiled)  # the training step's module: DDP's wrapper on several ranks
        forward = self.group.eval_model(compiled)  # evaluation's: each rank scores a slice, the logits gathered
        objects = (model, optimizer, scheduler, self.scaler)
        progress = Progress()
        if self.resume:
            progress = restore_checkpoint(*objects, sink, self.device, self._prepare_resume, self.group)
        self.compute.restore(progress.compute)

        def save_last() -> None:
            progress.compute = self.compute.state()
            sink.save_checkpoint("last", self._checkpoint(progress))

        if self._forget_early_best(progress) and progress.epoch >= self.max_epochs:  # nothing left to choose from:
            self._validate(forward, loaders.val, progress, {})  # the last epoch (the final depth) becomes best.pt
            sink.save_checkpoint("best", self.parts.best_checkpoint(self._checkpoint(progress)))
            save_last()

        status = "early_stopped" if self._patience_spent(progress) else "completed"  # a resume after the last epoch
        self.images = 0  # this attempt's samples
        for monitor in monitors:
            monitor.start(sink)
        try:
            while progress.epoch < self.max_epochs and status == "completed":
                row = self._train_epoch(loaders.train, optimizer, scheduler, progress, save_last, sink)
                if row is None:  # a signal arrived: last.pt holds this step
                    status = "interrupted"
                    break
                improved = self._validate(forward, loaders.val, progress, row)
                progress.history.append(row)
                if improved:  # before last.pt: a last.pt never names a best epoch that best.pt does not hold
                    sink.save_checkpoint("best", self.parts.best_checkpoint(self._checkpoint(progress)))
                save_last()  # before the row: a kill in between resumes from here and rewrites the row from history
                sink.log_epoch(row)
                log_epoch(row, self.max_epochs, self.task.metric, self.task.unit)
                if self.stop.requested:  # arrived during validation: the epoch is saved whole, stop here
                    status = "interrupted"
                elif self._patience_spent(progress):
                    status = "early_stopped"
                    why = "early stopping: val_%s has not improved for %d evaluations"
                    log.info(why, self.task.metric, progress.bad_evals)
        finally:
            resources = {}
            for monitor in monitors:
                resources.update(monitor.stop())
        resources["images"] = self.images  # this attempt's; train.run_resources makes energy per image of the run
        if status != "interrupted":  # a NaN/inf weight makes the run diverged, whatever best.pt holds
            check_weights(model, f"after epoch {progress.epoch} (step {progress.global_step})", self._divergence_fix())
            self.parts.finish(status, model, progress.global_step)
        test = {} if status == "interrupted" else self._test(model, forward, loaders.test, sink)
        if test is None:  # stopped during the test phase: training is saved whole; a resume runs the test
            status, test = "interrupted", {}
        train = train_summary(progress, status, self.task.metric, self.task.unit) | self.regime.describe()
        train.update(self.compute.summary(train["time_s"] - train["compile_time_s"], self.task.unit))
        train.update((sections := self.parts.summary()).pop("train", {}))
        return FitResult(status, train, test, resources, {"task": self.task.record(), **sections})

    def _checkpoint(self, progress: Progress) -> dict:
        objects = (self.raw_model, self.fit_ctx.optimizer, self.scheduler, self.scaler)
        return {
            **checkpoint_state(*objects, progress, self.device, self.group),
            "regime": self.regime.state_dict(),
            **self.parts.state(),
        }

    def _prepare_resume(self, state: dict, model, optimizer, scheduler) -> None:
        """Before a checkpoint is loaded: grow the fresh (first-stack) model to the stage it holds, then give every
        part its state back."""
        if state.get("regime"):
            self.regime.load_state_dict(state["regime"])
            self.regime.replay(state["regime"]["stage"], model, optimizer, scheduler)
            self.parts.attach(self.fit_ctx)  # the model may have grown
        self.parts.restore(state)

    def _grow_if_due(self, optimizer, scheduler, progress: Progress) -> None:
        """Grow the model at a planned step (pricing the samples trained so far at the old depth first), and
        apply the regime's LR rewarm on the steps after a growth."""
        step = progress.global_step
        if not self.regime.acts_at(step):
            return
        if self.regime.grows_at(step):
            self.compute.flush(self.raw_model, self.shape)
        grown = self.regime.before_step(step, self.raw_model, optimizer, scheduler)
        if grown is not None:
            self.parts.attach(self.fit_ctx)
            if self.group.strategy == "ddp":  # DDP's wrapper knows the parameters it was built with: wrap anew
                self.forward = self.group.wrap(getattr(self.forward, "module", self.forward))
            what = (step, grown["depth"], grown["stage"], grown["new_params"])
            log.info("step %d: grew to depth %d (stage %d, %d new parameter tensors)", *what)

    def _forget_early_best(self, progress: Progress) -> bool:
        """A resumed checkpoint of older code may name a best epoch from before the last growth: forget it, so the
        first epoch at the final depth becomes best.pt (``regime.tested``); True when it did."""
        if not progress.best_epoch or self.regime.at_final_depth(progress.best_step()):
            return False
        log.info("trainer.resume: best epoch %d is from before the last growth; choosing again", progress.best_epoch)
        progress.forget_best()
        return True

    def _patience_spent(self, progress: Progress) -> bool:
        return bool(self.patience) and progress.bad_evals >= self.patience

    # -------------------------------------------------------------- epochs
    def _train_epoch(self, loader, optimizer, scheduler, progress, save_last, sink) -> dict | None:
        self.forward.train()
        meter = EpochMeter(self.device, self.task.tallies, self.group.own_partial(progress.partial))
        bar = progress_bar(len(loader), progress, self.max_epochs) if self.show_bar else None
        for batch in self.task.batches(loader, progress.epoch, progress.step):
            self._grow_if_due(optimizer, scheduler, progress)
            info = StepInfo(step=progress.global_step + 1, epoch=progress.epoch)
            self.parts.before_forward(info.step)
            optimizer.zero_grad(set_to_none=True)
            out = self._backward(self.forward, self.group.shard(batch), progress)
            info.grad_norm = self._unclipped_norm(self.raw_model, optimizer, info.step)
            info.loss = self.group.mean(out.loss.detach())  # the whole batch's (each rank holds its slice's)
            self.parts.after_backward(info)
            if self.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(self.raw_model.parameters(), self.grad_clip, info.grad_norm)
            self.scaler.step(optimizer)
            self.scaler.update()
            scheduler.step()
            self.parts.after_step(info)
            meter.add(out.loss, out.samples, out.tallies)
            samples = out.samples * self.group.size  # every rank's slice is as large as this one's
            self.images += samples
            self.compute.step(samples)
            progress.step, progress.global_step = progress.step + 1, progress.global_step + 1
            if self._compile_pending:
                self._compile_pending = meter.compiled(samples)
            if bar is not None and progress.step % self.log_every_n_steps == 0:
                update_bar(bar, progress.step, meter, self.task)
            if self.stop.poll():  # save this step: to stop, or a scheduler may kill us
                progress.partial = self.group.total_partial(meter.partial())
                save_last()
                progress.partial = {}
                if self.stop.saved():  # True: stop here; False: a scheduler's "save now", training goes on
                    return None
            if self.max_steps is not None and progress.global_step >= self.max_steps:
                break  # the FLOP budget is spent: this (last) epoch ends here
        return self._epoch_row(meter, bar, optimizer, progress)

    def _backward(self, model, batch, progress: Progress):
        """The step's gradients: the whole batch at once, or ``trainer.accumulate`` micro-batches whose losses are
        weighted by their share of the samples, so the summed gradients are the whole batch's (up to float rounding;
        batch statistics such as BatchNorm's and batch mixing's partners are per micro-batch)."""
        if self.accumulate == 1:
            out = self.task.objective(model, batch, progress.epoch, progress.step)
            self.scaler.scale(self.parts.objective(out.loss)).backward()
            return out
        outs = []
        chunks = micro_batches(batch, self.accumulate)
        total = sum(len(chunk[0]) for chunk in chunks)
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1  # DDP averages the gradients once, after the last micro-batch
            with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
                out = self.task.objective(model, chunk, progress.epoch, progress.step)
                self.scaler.scale(self.parts.objective(out.loss) * (len(chunk[0]) / total)).backward()
            outs.append(out)
        return merge_outputs(outs)

    def _unclipped_norm(self, model, optimizer, step: int):
        """Unscale the gradients where clipping or a part needs them true; the global norm before clipping, where
        clipping or a part wants it (clipping then uses it: ``clip_grad_norm_`` in two halves, bit for bit)."""
        if self.grad_clip or self.parts.needs_grads(step):
            self.scaler.unscale_(optimizer)  # true gradients (scaler.step would unscale them anyway)
        if self.grad_clip:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            return full_tensor(torch.nn.utils.get_total_norm(grads))  # FSDP's shards: the whole model's norm
        return full_tensor(global_norm(model)) if self.parts.wants_norm(step) else None

    def _epoch_row(self, meter: EpochMeter, bar, optimizer, progress: Progress) -> dict:
        train_time = meter.finish()
        if self.group.size > 1:
            meter.combine(self.group.sum)  # every rank's slices
        if bar is not None:
            bar.close()
        train_loss = meter.mean_loss()
        when = f"in epoch {progress.epoch + 1} (by step {progress.global_step})"
        check_loss("the training loss", train_loss, when, self._divergence_fix())
        progress.epoch += 1
        progress.step, progress.partial = 0, {}
        timed_s = max(train_time - meter.compile_s, 1e-9)
        flops = self.compute.flush(self.raw_model, self.shape)  # measured after the timed steps
        metrics = self.task.train_metrics(meter.tallies, meter.seen)
        return {
            "epoch": progress.epoch,
            "step": progress.global_step,
            "flops": flops,  # cumulative training FLOPs (forward + backward) at the end of this epoch
            "depth": current_depth(self.raw_model),
            "lr": base_lr(optimizer),
            "train_loss": train_loss,
            **{f"train_{name}": value for name, value in metrics.items()},
            "epoch_time_s": train_time,
            "compile_time_s": meter.compile_s,
            f"train_{self.task.unit}_s": (meter.seen - meter.compile_samples) / timed_s,
        }

    def _divergence_fix(self) -> str:
        return divergence_fix(self.grad_clip, self.runtime.precision)

    def _validate(self, model, loader, progress: Progress, row: dict) -> bool:
        """Adds val_* (and each part's, e.g. val_*_ema) to ``row``; True when this is the best epoch so far, by the
        task's score of the validation metrics, or of the metrics a part chooses best.pt by."""
        keys = ("loss", self.task.metric)
        if not (progress.epoch % self.eval_every == 0 or progress.epoch == self.max_epochs):
            row.update({f"val_{k}": None for k in keys}, eval_time_s=0.0)
            self.parts.validate(None, row)
            return False
        t0 = time.perf_counter()
        val = self.task.evaluate(model, loader)
        row.update({f"val_{k}": val[k] for k in keys})
        val = self.parts.validate(lambda m: self.task.evaluate(self.group.eval_model(m), loader), row) or val
        for key in [k for k in row if k.startswith("val_loss")]:  # the model's, and a part's own (val_loss_ema)
            what = "the validation loss" + ("" if key == "val_loss" else f" ({key})")
            check_loss(
                what, row[key], f"after epoch {progress.epoch} (step {progress.global_step})", self._divergence_fix()
            )
        row["eval_time_s"] = time.perf_counter() - t0
        if not self.regime.at_final_depth(progress.global_step):  # not what the run ends with: never best.pt, and
            return False  # no patience spent (the run cannot stop before its last growth)
        score = self.task.score(val)
        if progress.best_score is None or score > tuple(progress.best_score):
            progress.best_score, progress.best_epoch, progress.bad_evals = list(score), progress.epoch, 0
            progress.best_val_top1, progress.best_val_loss = val[self.task.metric], val["loss"]
            return True
        progress.bad_evals += 1
        return False

    def _test(self, model, forward, loader, sink) -> dict | None:
        """Full metrics on the test split with the best checkpoint's weights (at the final depth: ``_validate``);
        None when ``stop`` cut it short. ``checkpoint_*`` say which checkpoint that was and what it holds."""
        best = sink.load_checkpoint("best", map_location=self.device)
        self.group.load_model(model, best["model"])
        test = self.task.evaluate(forward, loader, full=True, stop=self.stop)
        if test is None:
            return None
        counts = count_parameters(model)
        test["checkpoint_epoch"] = best["progress"]["epoch"]
        test["checkpoint_depth"] = current_depth(model)
        test["checkpoint_params"] = {"total": counts["total"], "trainable": counts["trainable"]}
        test["checkpoint_policy"] = self.regime.tested
        when = f"with best.pt (epoch {test['checkpoint_epoch']})"
        check_loss("the test loss", test["loss"], when, self._divergence_fix())
        log.info("test: %s  (best epoch %d)", self.task.describe(test), test["checkpoint_epoch"])
        return test
