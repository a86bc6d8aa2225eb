"""GLUE examples as BERT inputs, and their batches.

A single sentence becomes ``[CLS] a [SEP]`` with segment ids 0; a pair ``[CLS] a [SEP] b [SEP]``, segment 0 up to
and including the first ``[SEP]`` and 1 after, as BERT's fine-tuning does. Sequences longer than ``seq_len`` are cut
token by token from the longer sentence (a tie: from the second), transformers' ``longest_first`` truncation.
Positions past the sequence hold ``[PAD]`` with attention mask 0. The special ids are those reserved past the
tokenizer's vocabulary (:mod:`.special_tokens`).

:class:`GlueBatches` serves the encoded rows: training batches in an order seeded from ``(seed, epoch)`` only (a
resumed run sees the batches the uninterrupted one did), evaluation batches in file order; each batch is cut to its
longest row (the attention mask makes the padding inert), so short sentences cost short sequences.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from stackwise_bench.data.loader import _derive_seed
from stackwise_bench.data.text.special_tokens import SpecialTokens
from stackwise_bench.errors import ConfigError


def truncated_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """The lengths ``longest_first`` truncation keeps of a pair within ``budget`` tokens (cut from the longer one
    token by token, from the second on a tie), computed in closed form."""
    excess = len_a + len_b - budget
    if excess <= 0:
        return len_a, len_b
    gap = abs(len_a - len_b)
    if excess <= gap:
        return (len_a - excess, len_b) if len_a > len_b else (len_a, len_b - excess)
    even, rest = min(len_a, len_b), excess - gap  # both cut to the shorter's length, then in turns, second first
    return even - rest // 2, even - (rest + 1) // 2


def encode_examples(examples: Sequence, tokenizer, special: SpecialTokens, seq_len: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``token_type_ids``, ``attention_mask`` (int64 ``[n, seq_len]``) and ``labels`` (int64, or
    float32 for a regression) of GLUE examples (``text_a``, ``text_b`` or None, ``label``)."""
    pair = any(e.text_b is not None for e in examples)
    if not isinstance(seq_len, int) or seq_len < (4 if pair else 3):
        raise ConfigError(
            f"dataset.seq_len={seq_len!r} leaves no room for a sentence besides [CLS] and [SEP]; use e.g. "
            "dataset.seq_len=128."
        )
    n = len(examples)
    ids = np.full((n, seq_len), special.pad, dtype=np.int64)
    segments = np.zeros((n, seq_len), dtype=np.int64)
    firsts = tokenizer.encode_batch([e.text_a for e in examples])
    seconds = tokenizer.encode_batch([e.text_b or "" for e in examples]) if pair else [[]] * n
    for row, (a, b, example) in enumerate(zip(firsts, seconds, examples)):
        has_b = example.text_b is not None
        la, lb = truncated_lengths(len(a), len(b) if has_b else 0, seq_len - (3 if has_b else 2))
        seq = [special.cls, *a[:la], special.sep]
        if has_b:
            segments[row, len(seq) : len(seq) + lb + 1] = 1
            seq += [*b[:lb], special.sep]
        ids[row, : len(seq)] = seq
    labels = [e.label for e in examples]
    dtype = torch.float32 if any(isinstance(v, float) for v in labels) else torch.int64
    return {
        "input_ids": torch.from_numpy(ids),
        "token_type_ids": torch.from_numpy(segments),
        "attention_mask": torch.from_numpy((ids != special.pad).astype(np.int64)),
        "labels": torch.tensor(labels, dtype=dtype),
    }


class GlueBatches:
    """Batches of encoded GLUE rows (dicts of tensors on ``device``); ``groups`` names the test parts a row belongs
    to (MNLI's matched and mismatched: ``group`` in each batch is the part's index in ``groups``)."""

    def __init__(
        self,
        encoded: dict[str, torch.Tensor],
        batch_size: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        groups: Sequence[str] = ("all",),
        group: torch.Tensor | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"trainer.batch_size={batch_size!r} must be a positive integer; use e.g. 32.")
        self.data, self.batch_size, self.seed, self.device = encoded, batch_size, seed, device
        self.n = len(encoded["labels"])
        self.seq_len = encoded["input_ids"].shape[1]
        self.groups = tuple(groups)
        self.group = group if group is not None else torch.zeros(self.n, dtype=torch.int64)

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The rows of ``epoch``, shuffled from ``(seed, epoch)`` only."""
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(_derive_seed(self.seed, epoch, 0)))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches ``start_step .. len - 1`` of ``epoch`` (the last one may be smaller)."""
        rows = self.order(int(epoch))
        for step in range(int(start_step), len(self)):
            yield self._batch(rows[step * self.batch_size : (step + 1) * self.batch_size])

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every row once, in file order (evaluation)."""
        for first in range(0, self.n, self.batch_size):
            yield self._batch(torch.arange(first, min(first + self.batch_size, self.n)))

    def _batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        width = int(self.data["attention_mask"][rows].sum(1).max())
        batch = {k: v[rows, :width] if v.ndim == 2 else v[rows] for k, v in self.data.items()}
        batch["group"] = self.group[rows]
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def glue_test_batches(
    parts: dict[str, Sequence], tokenizer, special: SpecialTokens, seq_len: int, batch_size: int, device="cpu"
) -> GlueBatches:
    """One evaluation loader over a task's test parts (``{"dev": rows}``, or MNLI's ``matched`` and ``mismatched``),
    each row tagged with its part."""
    names = list(parts)
    rows = [example for name in names for example in parts[name]]
    group = torch.tensor([i for i, name in enumerate(names) for _ in parts[name]], dtype=torch.int64)
    encoded = encode_examples(rows, tokenizer, special, seq_len)
    return GlueBatches(encoded, batch_size, device=device, groups=names, group=group)
