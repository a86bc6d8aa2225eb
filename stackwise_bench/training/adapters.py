"""AdaLoRA's part of the training loop: the rank budget reallocated every step, its penalty, its resumable state.

peft's AdaLoRA (Zhang et al., 2023) only reallocates ranks when ``update_and_allocate(step)`` is called on every
step, after ``optimizer.step()`` and before the gradients are cleared (peft issues #1801, #432, #3373 are runs
whose ranks never changed because nobody called it). Its orthogonality penalty is added by peft only to a
HuggingFace output's ``.loss``, which a timm classifier does not have. And its importance scores (three EMAs per
adapter tensor) live outside the model's ``state_dict``. :class:`AdaLoraSchedule` does those three things for the
training loop, as a step part (:mod:`~stackwise_bench.training.parts`):

- :meth:`plan` sets ``total_step`` to the run's real number of optimizer steps (the trainer's plan: epochs x
  steps, or what a FLOP budget buys; the same on resume) and refuses a ``tinit``/``tfinal`` that leaves no steps
  to prune in;
- :meth:`penalty` is the orthogonality regulariser the trainer adds to the loss;
- :meth:`after_step` calls ``update_and_allocate`` and writes a diagnostics row (``kind: adapter_ranks``, the
  rank of every adapted layer) whenever the allocation changes;
- :meth:`state` / :meth:`restore` carry the importance scores and the rank pattern through a
  checkpoint, so a resumed run allocates exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch

from stackwise_bench.nn.peft_methods import adalora_schedule
from stackwise_bench.training.parts import Fit, StepInfo, StepPart

ADAPTER = "default"  # peft's adapter name


class AdaLoraSchedule(StepPart):
    """Drives a peft AdaLoRA model's rank allocation from the trainer's loop (a :class:`~.parts.StepPart`)."""

    key = "adapter"  # its checkpoint entry

    def __init__(self, model, options: dict):
        self.model = model
        self.options = dict(options or {})
        self.config = model.peft_config[ADAPTER]
        self.allocator = model.base_model.rankallocator
        self._logged: dict | None = None

    # ------------------------------------------------------------------ plan
    def plan(self, total_steps: int) -> None:
        """The schedule's length is the run's: ``total_step``, and ``tinit``/``tfinal`` when they default to shares."""
        tinit, tfinal = adalora_schedule(self.options, total_steps)  # refuses an empty pruning window
        self.config.total_step, self.config.tinit, self.config.tfinal = total_steps, tinit, tfinal

    # ------------------------------------------------------------------ steps
    def attach(self, fit: Fit) -> None:
        self.sink = fit.sink

    def needs_grads(self, step: int) -> bool:
        return True  # update_and_allocate reads the (unscaled) gradients after the optimizer step

    def penalty(self) -> torch.Tensor | float:
        """``orth_reg_weight`` x the mean over adapter factors of ||P Pᵀ − I||_F (A) and ||Qᵀ Q − I||_F (B), as peft."""
        weight = self.config.orth_reg_weight
        if not weight:
            return 0.0
        terms = []
        for name, p in self.model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and ADAPTER in name:
                cov = p @ p.T if "lora_A" in name else p.T @ p
                eye = torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return weight * torch.stack(terms).mean() if terms else 0.0

    def after_step(self, info: StepInfo) -> None:
        """Reallocate after the optimizer step; the ranks row to diagnostics.jsonl when the allocation changed."""
        row = self.reallocate(info.step, info.epoch)
        if row is not None:
            self.sink.log_diagnostics(row)

    def reallocate(self, step: int, epoch: int) -> dict | None:
        """Reallocate after optimizer step number ``step`` (1-based); the ranks row when the allocation changed."""
        self.model.base_model.update_and_allocate(step)
        ranks = self.ranks()
        if ranks == self._logged:
            return None
        self._logged = ranks
        return {
            "kind": "adapter_ranks",
            "step": step,
            "epoch": epoch,
            "rank_budget": sum(ranks.values()),
            "layers": {name: {"rank": r} for name, r in ranks.items()},
        }

    def ranks(self) -> dict[str, int]:
        """Each adapted layer's rank now: the allocator's latest pattern, ``init_r`` before the first one."""
        pattern = self.config.rank_pattern or {}
        out = {}
        for name, module in self.model.named_modules():
            if hasattr(module, "lora_E") and ADAPTER in getattr(module, "lora_E", {}):
                layer = _layer(name)  # the allocator names parameters inside the peft wrapper
                keep = pattern.get(f"{layer}.lora_E.{ADAPTER}", pattern.get(f"{layer}.lora_E"))
                out[layer] = int(sum(keep)) if keep is not None else int(module.r[ADAPTER])
        return out

    # ------------------------------------------------------------------ record
    def summary(self) -> dict:
        """summary.json's ``adapter`` section at the end: the ranks it ended with, and its schedule."""
        ranks = self.ranks()
        return {
            "adapter": {
                "final_ranks": ranks,
                "rank_budget": sum(ranks.values()),
                "init_r": self.config.init_r,
                "target_r": self.config.target_r,
                "total_step": self.config.total_step,
                "tinit": self.config.tinit,
                "tfinal": self.config.tfinal,
            }
        }

    def state(self) -> dict:
        a = self.allocator
        return {
            "ipt": dict(a.ipt),
            "exp_avg_ipt": dict(a.exp_avg_ipt),
            "exp_avg_unc": dict(a.exp_avg_unc),
            "rank_pattern": self.config.rank_pattern,
            "logged": self._logged,
        }

    def restore(self, state: dict | None) -> None:
        if state is None:  # a checkpoint from before the schedule kept a state
            return
        a = self.allocator
        a.ipt, a.exp_avg_ipt, a.exp_avg_unc = dict(state["ipt"]), dict(state["exp_avg_ipt"]), dict(state["exp_avg_unc"])
        self.config.rank_pattern = state["rank_pattern"]
        self._logged = state.get("logged")


def _layer(name: str) -> str:
    """``base_model.model.blocks.0.attn.qkv`` -> ``blocks.0.attn.qkv``."""
    return name.removeprefix("base_model.model.")


def adapter_schedule(model, method: str, options: dict):
    """The loop-side helper a method needs (AdaLoRA's :class:`AdaLoraSchedule`), or None."""
    if method == "adalora" and hasattr(model, "peft_config"):
        return AdaLoraSchedule(model, options)
    return None
