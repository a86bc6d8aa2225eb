"""What a checkpoint holds and how a resumed run gets it back: enough to continue bit for bit.

A checkpoint is the model, optimizer, scheduler and scaler state, the RNG state and a
:class:`Progress`; the trainer hands it to its ``sink``, which decides where it is written.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from stackwise_bench.errors import ConfigError, short_error
from stackwise_bench.training.distributed import SINGLE

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Progress:
    """Everything about where training stands that is not a tensor; saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # steps done inside the current epoch (>0 only for a mid-epoch interrupt)
    global_step: int = 0
    best_val_top1: float = -1.0  # the task's headline metric at the best epoch (the name predates the task seam)
    best_val_loss: float = float("inf")
    best_score: list | None = None  # the task's score of the best validation (larger wins); None before one
    best_epoch: int = 0
    bad_evals: int = 0  # evaluations since the best one, for early stopping
    history: list = dataclasses.field(default_factory=list)
    partial: dict = dataclasses.field(default_factory=dict)  # running sums of an interrupted epoch
    compute: dict | None = None  # training FLOPs so far (Compute.state)

    def best_step(self) -> int:
        """The global step at which the best epoch ended (0 when its row does not say)."""
        row = next((r for r in self.history if r.get("epoch") == self.best_epoch), {})
        return row.get("step", 0)

    def forget_best(self) -> None:
        """No best epoch: the next evaluation that may become best.pt does (patience starts over)."""
        fresh = Progress()
        self.best_score, self.best_epoch, self.bad_evals = None, 0, 0
        self.best_val_top1, self.best_val_loss = fresh.best_val_top1, fresh.best_val_loss


def migrate(state: dict) -> dict:
    """A checkpoint written before the step parts, in today's layout (its tensors untouched).

    The diagnostics' interval moved from ``progress`` to the part's own key; the best epoch's score was kept as
    ``best_val_top1``/``best_val_loss`` only (every run was image classification then: top-1, ties to the loss).
    """
    if not isinstance(state.get("progress"), dict):  # not a trainer's checkpoint: loading it says so
        return state
    progress = dict(state["progress"])
    if "diagnostics" in progress:
        state = {**state, "diagnostics": state.get("diagnostics", progress.pop("diagnostics"))}
    if "best_score" not in progress and progress.get("best_epoch"):
        progress["best_score"] = [progress["best_val_top1"], -progress["best_val_loss"]]
    return {**state, "progress": progress}


def checkpoint_state(model, optimizer, scheduler, scaler, progress: Progress, device: torch.device, group=SINGLE):
    """Everything a resume needs, as one dict for ``sink.save_checkpoint``: in the single-process format on
    several devices too (``group``: :mod:`.distributed`), with each rank's RNG state."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if group.size > 1:  # dropout draws differ per rank: a resume on as many ranks gives each its own back
        rng["ranks"] = group.gather(rng["torch"])
    return {
        "model": group.model_state(model),
        "optimizer": group.optimizer_state(model, optimizer),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
        "progress": dataclasses.asdict(progress),
    }


def restore_checkpoint(
    model, optimizer, scheduler, scaler, sink, device: torch.device, prepare=None, group=SINGLE
) -> Progress:
    """Loads the sink's ``last`` checkpoint into the objects in place; a fresh Progress when there is none yet.

    ``prepare(state, model, optimizer, scheduler)`` runs before the states are loaded: a depth-as-time regime
    grows the fresh model and optimizer to the shape the checkpoint holds, and the step parts take their states.
    """
    path = sink.checkpoint_path("last")
    if not sink.has_checkpoint("last"):
        log.info("trainer.resume: no %s yet, starting from scratch", path)
        sink.restart_logs()  # the logs and best.pt of an attempt that saved no last.pt
        return Progress()
    state = migrate(sink.load_checkpoint("last", map_location=device))  # one sentence: damaged, another run's
    try:
        if prepare is not None:
            prepare(state, model, optimizer, scheduler)
        group.load_model(model, state["model"])
        group.load_optimizer(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        progress = Progress(**state["progress"])
        torch.set_rng_state(own_rng(state["rng"], group).cpu())
        if "cuda" in state["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    except Exception as exc:
        raise ConfigError(
            f"trainer.resume=true: {path} does not match this model and config ({short_error(exc, 200)}); "
            "delete it to start the run over from epoch 1, or resume in the run folder that wrote it."
        ) from exc
    sink.trim_to_checkpoint(state)  # metrics and hardware samples written after this checkpoint would repeat
    log.info("resumed from %s at epoch %d step %d", path, progress.epoch, progress.step)
    return progress


def own_rng(rng: dict, group) -> torch.Tensor:
    """This rank's CPU RNG state from a checkpoint's ``rng``: its own where the checkpoint has one per rank of a
    group this size; else rank 0's, and the other ranks draw from a seed of their own (:func:`rank_seed`)."""
    ranks = rng.get("ranks")
    if group.size > 1 and ranks is not None and len(ranks) == group.size:
        return ranks[group.rank]
    if group.rank:
        return torch.Generator().manual_seed(rank_seed(int(rng["torch"][:8].sum()), group.rank)).get_state()
    return rng["torch"]


def rank_seed(seed: int, rank: int) -> int:
    """The global RNG seed of ``rank`` > 0: its dropout masks are not rank 0's (every rank builds the model from
    the run's seed first, so the weights start equal)."""
    return (int(seed) * 1_000_003 + rank) % 2**63
