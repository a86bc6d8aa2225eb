"""Causal language modelling through the trainer's task seam (:mod:`.tasks`): next-token loss, perplexity, bits per
byte, tokens per second.

An "epoch" is ``dataset.steps_per_epoch`` steps of random windows (nanoGPT's ``eval_interval``): the loop
validates after each, on exact contiguous windows of the validation split, and the test phase scores the test
split the same way. The headline metric is the loss in nats per token, lower is better (``score`` is its
negation, so best.pt and early stopping take the lowest). FLOPs are priced per token with nanoGPT's formula
(:func:`~stackwise_bench.nn.causal_lm.flops_per_token`), not counted by tracing.

:class:`WindowsPart` is the step part that carries the training windows' generator in every checkpoint (so a
resume draws the batches the uninterrupted run draws) and adds ``val_ppl``/``val_bpb`` to each epoch's row.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from stackwise_bench.data.text.measures import bits_per_byte, perplexity, word_perplexity
from stackwise_bench.runs.contract import CAUSAL_LM
from stackwise_bench.training.parts import StepPart
from stackwise_bench.training.precision import synchronize
from stackwise_bench.training.tasks import Output


def logits_of(model, x: torch.Tensor) -> torch.Tensor:
    """The next-token logits of a transformers causal LM (or a peft wrapper of one), ``[batch, seq, vocab]``."""
    out = model(input_ids=x, use_cache=False)
    return out.logits if hasattr(out, "logits") else out


class CausalLM:
    """Token windows and their next tokens: cross-entropy in nats per token, perplexity, bits per byte, tokens/s."""

    name, unit, metric = (CAUSAL_LM[k] for k in ("name", "unit", "metric"))
    directions = CAUSAL_LM["directions"]
    tallies = ()  # the loop's loss sum is the nats: perplexity is exp(train_loss)

    def __init__(self, autocast, device):
        self.amp, self.device = autocast, device
        self.last: dict | None = None  # the latest evaluation's metrics (WindowsPart puts them in the row)

    def batches(self, loader, epoch: int, start_step: int):
        return loader.batches(epoch, start_step)

    def sample_shape(self, loader) -> tuple:
        """A sample is a token of a ``seq_len`` window: what its FLOPs depend on is ``seq_len``."""
        return (loader.seq_len,)

    def flops_per_sample(self, model, shape: tuple) -> float:
        """Training FLOPs per token (forward + backward) at window length ``shape[0]``: 6N + 12·L·H·Q·T."""
        from stackwise_bench.nn.causal_lm import flops_per_token

        return float(flops_per_token(model, shape[0]))

    def objective(self, model, batch, epoch: int, step: int) -> Output:
        x, y = batch
        with self.amp():
            logits = logits_of(model, x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        return Output(loss, y.numel(), {})

    def train_metrics(self, tallies: dict[str, Any], seen: int) -> dict:
        return {}  # train_loss, the loop's own, is the headline metric's training value

    @torch.inference_mode()
    def evaluate(self, model, loader, full: bool = False, stop=None) -> dict | None:
        """Total nats over every target of ``loader``'s windows: loss per token, perplexity, bits per byte (and
        WikiText's word-level perplexity over a whole split); None when ``stop`` cut the pass short."""
        was_training = model.training
        model.eval()
        nats = torch.zeros((), dtype=torch.float64, device=self.device)
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            for x, y in loader.batches():
                with self.amp():
                    logits = logits_of(model, x)
                nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
                if stop is not None and stop.requested:
                    return None
            synchronize(self.device)
        finally:
            model.train(was_training)
        elapsed = time.perf_counter() - t0
        total, n = float(nats), loader.n_targets
        out = {
            "loss": total / n,
            "ppl": perplexity(total, n),
            "bpb": bits_per_byte(total, loader.n_bytes),
            "nats": total,
            "tokens": n,
            "bytes": loader.n_bytes,
            "infer_token_s": n / max(elapsed, 1e-9),
        }
        if full and loader.n_words:
            out["word_ppl"] = word_perplexity(total, loader.n_words)
        self.last = out
        return out

    def score(self, metrics: dict) -> tuple:
        """The lower validation loss wins."""
        return (-metrics["loss"],)

    def describe(self, test: dict) -> str:
        return f"loss {test['loss']:.4f} nats/token  ppl {test['ppl']:.3f}  bpb {test['bpb']:.4f}"

    def record(self) -> dict:
        """summary.json's ``task`` section: the metrics' directions and ranges, for the analysis."""
        return {
            "name": self.name,
            "unit": self.unit,
            "metric": self.metric,
            "directions": dict(self.directions),
            "ranges": {k: dict(v) for k, v in CAUSAL_LM["ranges"].items()},
        }


class WindowsPart(StepPart):
    """The training windows' generator in every checkpoint (``windows``), and ``val_ppl``/``val_bpb`` in the row.

    It must come first among the parts: a weight average's validation runs after it and would be the task's
    latest evaluation otherwise.
    """

    key = "windows"

    def __init__(self, loader, task: CausalLM):
        self.loader, self.task = loader, task

    def state(self) -> dict:
        return self.loader.state_dict()

    def restore(self, state) -> None:
        if state:  # absent from a checkpoint written without it: TrainWindows replays the generator instead
            self.loader.load_state_dict(state)

    def validate(self, evaluate, row: dict) -> None:
        last = self.task.last if evaluate is not None else None
        row.update(val_ppl=last["ppl"] if last else None, val_bpb=last["bpb"] if last else None)
        return None
