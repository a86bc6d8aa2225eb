"""Masked language modelling (BERT pretraining) through the trainer's task seam (:mod:`.tasks`) on the windows of the
text datasets (``data/text/dataset.py``: batches ``(x, y)`` of int64 ``[batch, seq_len]``; ``y`` is not used).

A window becomes one BERT sequence of exactly ``seq_len`` ids, ``[CLS] x[:seq_len - 2] [SEP]``, with the special
ids reserved past the tokenizer's vocabulary (:mod:`stackwise_bench.data.text.special_tokens`: pad = V, cls = V+1,
sep = V+2, mask = V+3; the model holds V+4 ids). Masking is Devlin et al. (2019)'s, as transformers'
``DataCollatorForLanguageModeling`` draws it: each non-special position is chosen with probability 0.15
(independently, so the share is 15% in expectation), and of the chosen 80% become ``[MASK]``, 10% a random text id
(from ``[0, V)``: never a special id) and 10% stay; the labels are the original ids there and -100 elsewhere. A
batch where no position was chosen gets its one position with the smallest draw, so the loss is always defined.

Every draw comes from a CPU generator seeded from ``(seed, epoch, step)`` (as batch mixing's ``step_generator``, on
a stream of its own), so a resumed run masks exactly as the uninterrupted one; evaluation masks batch ``i`` with a
generator seeded from ``(seed, i)`` on another stream, so every validation of a run scores the same masks.

Metrics: ``loss``, the cross-entropy in nats per masked token (the headline, lower is better), ``acc`` the share of
masked tokens predicted exactly (percent) and ``ppl`` = exp(loss). Throughput is counted in sequence tokens.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from stackwise_bench.data.loader import _derive_seed
from stackwise_bench.data.text.special_tokens import SpecialTokens
from stackwise_bench.runs.contract import MASKED_LM
from stackwise_bench.training.lm_task import WindowsPart
from stackwise_bench.training.precision import synchronize
from stackwise_bench.training.tasks import Output

MASK_STREAM, EVAL_STREAM = 3, 4  # the loader uses words 0 and 1, batch mixing 2: masking gets streams of its own
MASK_PROB, MASK_TOKEN_SHARE, RANDOM_TOKEN_SHARE = 0.15, 0.8, 0.1  # Devlin et al. 2019, section 3.1


def mask_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The CPU generator of the masking of ``step`` of ``epoch``: reproducible without replaying earlier steps."""
    return torch.Generator().manual_seed(_derive_seed(seed, epoch, MASK_STREAM, step))


def bert_sequences(x: torch.Tensor, special: SpecialTokens) -> torch.Tensor:
    """``[CLS] x[:, :T-2] [SEP]`` per row of a ``[batch, T]`` window batch: sequences of the windows' length T."""
    if x.shape[1] < 3:
        raise ValueError(f"a BERT sequence needs 3 positions or more, not {x.shape[1]}")
    rows = x.shape[0]
    cls = torch.full((rows, 1), special.cls, dtype=x.dtype, device=x.device)
    sep = torch.full((rows, 1), special.sep, dtype=x.dtype, device=x.device)
    return torch.cat([cls, x[:, : x.shape[1] - 2], sep], dim=1)


def mask_tokens(
    ids: torch.Tensor, special: SpecialTokens, generator: torch.Generator, mask_prob: float = MASK_PROB
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of ``ids`` (module docstring): ``(inputs, labels)``, labels -100 where nothing is predicted.

    Every draw is made for every position on the CPU, whatever is chosen, so the stream never shifts with the data;
    the results are moved to ``ids``'s device.
    """
    cpu = ids.detach().cpu()
    choose = torch.rand(cpu.shape, generator=generator)
    kind = torch.rand(cpu.shape, generator=generator)
    random_ids = torch.randint(special.text_vocab, cpu.shape, generator=generator, dtype=cpu.dtype)
    candidate = ~torch.isin(cpu, torch.tensor(special.ids, dtype=cpu.dtype))
    chosen = candidate & (choose < mask_prob)
    if not chosen.any() and candidate.any():  # one masked token at least: the mean loss needs a target
        flat = torch.where(candidate, choose, torch.full_like(choose, 2.0)).flatten().argmin()
        chosen.view(-1)[flat] = True
    labels = torch.where(chosen, cpu, torch.full_like(cpu, -100))
    inputs = torch.where(chosen & (kind < MASK_TOKEN_SHARE), torch.full_like(cpu, special.mask), cpu)
    replaced = chosen & (kind >= MASK_TOKEN_SHARE) & (kind < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE)
    inputs = torch.where(replaced, random_ids, inputs)
    return inputs.to(ids.device), labels.to(ids.device)


def mlm_logits(model, inputs: torch.Tensor) -> torch.Tensor:
    """The vocabulary logits ``[batch, seq, vocab]`` of a transformers masked LM (or a peft wrapper of one)."""
    out = model(input_ids=inputs)
    return out.logits if hasattr(out, "logits") else out


class MaskedLM:
    """Windows of text masked as BERT's pretraining: loss per masked token, accuracy on them, perplexity."""

    name, unit, metric = (MASKED_LM[k] for k in ("name", "unit", "metric"))
    directions = MASKED_LM["directions"]
    tallies = ("masked", "correct", "nats")

    def __init__(self, special: SpecialTokens, autocast, device, seed: int = 0, mask_prob: float = MASK_PROB):
        self.special, self.amp, self.seed, self.mask_prob = special, autocast, seed, mask_prob
        self.device = torch.device(device)
        self.last: dict | None = None

    def batches(self, loader, epoch: int, start_step: int):
        """The windows of ``epoch`` from ``start_step`` on, masked whole (one generator per step): on several devices
        each rank trains on its slice of the masks one process draws."""
        for step, (x, _) in enumerate(loader.batches(epoch, start_step), start=start_step):
            sequences = bert_sequences(x, self.special)
            yield mask_tokens(sequences, self.special, mask_generator(self.seed, epoch, step), self.mask_prob)

    def sample_shape(self, loader) -> tuple:
        """A sample is a token of a ``seq_len`` sequence: what its FLOPs depend on is ``seq_len``."""
        return (loader.seq_len,)

    def flops_per_sample(self, model, shape: tuple) -> float:
        from stackwise_bench.nn.bert import flops_per_token

        return float(flops_per_token(model, shape[0]))

    def _forward(self, model, x: torch.Tensor, generator: torch.Generator):
        inputs, labels = mask_tokens(bert_sequences(x, self.special), self.special, generator, self.mask_prob)
        with self.amp():
            logits = mlm_logits(model, inputs)
        return logits.float(), labels

    def objective(self, model, batch, epoch: int, step: int) -> Output:
        inputs, labels = batch  # masked by :meth:`batches`
        with self.amp():
            logits = mlm_logits(model, inputs).float()
        if bool((labels != -100).any()):
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        else:  # a rank's slice (several devices) without a masked token: nothing to learn from, not a NaN
            loss = logits.sum() * 0.0
        return Output(loss, inputs.numel(), _tally(logits.detach(), labels))

    def train_metrics(self, tallies: dict[str, Any], seen: int) -> dict:
        masked = max(1, int(tallies["masked"]))
        return {"acc": 100.0 * int(tallies["correct"]) / masked, "ppl": math.exp(float(tallies["nats"]) / masked)}

    @torch.inference_mode()
    def evaluate(self, model, loader, full: bool = False, stop=None) -> dict | None:
        """Masked-token loss, accuracy and perplexity over ``loader``'s windows (rows shorter than 3 are skipped),
        with the same masks at every call; None when ``stop`` cut the pass short."""
        was_training = model.training
        model.eval()
        sums = {"masked": 0, "correct": 0, "nats": 0.0}
        synchronize(self.device)
        t0, tokens = time.perf_counter(), 0
        try:
            for i, (x, _) in enumerate(loader.batches()):
                if x.shape[1] < 3:
                    continue
                gen = torch.Generator().manual_seed(_derive_seed(self.seed, EVAL_STREAM, i))
                logits, labels = self._forward(model, x, gen)
                for key, value in _tally(logits, labels).items():
                    sums[key] += value.item()
                tokens += x.numel()
                if stop is not None and stop.requested:
                    return None
            synchronize(self.device)
        finally:
            model.train(was_training)
        masked = max(1, sums["masked"])
        loss = sums["nats"] / masked
        out = {"loss": loss, "ppl": math.exp(loss), "acc": 100.0 * sums["correct"] / masked}
        out |= {
            "masked": sums["masked"],
            "tokens": tokens,
            "infer_token_s": tokens / max(time.perf_counter() - t0, 1e-9),
        }
        self.last = out
        return out

    def score(self, metrics: dict) -> tuple:
        """The lower masked-token loss wins."""
        return (-metrics["loss"],)

    def describe(self, test: dict) -> str:
        return f"masked loss {test['loss']:.4f} nats/token  ppl {test['ppl']:.3f}  acc {test['acc']:.2f}%"

    def record(self) -> dict:
        """summary.json's ``task`` section: the metrics' directions and ranges, and the reserved special ids."""
        return {
            "name": self.name,
            "unit": self.unit,
            "metric": self.metric,
            "directions": dict(self.directions),
            "ranges": {k: dict(v) for k, v in MASKED_LM["ranges"].items()},
            "special_tokens": self.special.describe(),
            "mask_prob": self.mask_prob,
        }


def _tally(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masked positions, exact predictions among them, and their summed nats (float64)."""
    where = labels != -100
    picked, targets = logits[where], labels[where]
    nats = F.cross_entropy(picked, targets, reduction="sum").double()
    return {"masked": where.sum(), "correct": (picked.argmax(-1) == targets).sum(), "nats": nats}


class MaskedWindowsPart(WindowsPart):
    """:class:`~stackwise_bench.training.lm_task.WindowsPart` for masked LM: the training windows' generator in every
    checkpoint, and ``val_ppl``/``val_acc`` (masked-token perplexity and accuracy) in each epoch's row."""

    def validate(self, evaluate, row: dict) -> None:
        last = self.task.last if evaluate is not None else None
        row.update(val_ppl=last["ppl"] if last else None, val_acc=last["acc"] if last else None)
        return None
