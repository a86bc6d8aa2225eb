"""Batches of token windows from a split's memmap: random for training (nanoGPT's), random or exact for evaluation.

A window is ``seq_len + 1`` consecutive ids: inputs ``x = w[:-1]`` and targets ``y = w[1:]``, so every row has
``seq_len`` targets. Training draws window starts uniformly from ``[0, n - seq_len)`` with a generator of its own,
whose state is part of the checkpoint: a resumed run draws the very batches an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from stackwise_bench.errors import ConfigError


def check_windows(n_tokens: int, seq_len: int, batch_size: int, split: str = "train") -> None:
    """Refuse a ``seq_len`` the split cannot fill or a batch smaller than one sequence, in one sentence."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(
            f"trainer.batch_size={batch_size} is smaller than one sequence: a batch holds whole windows of "
            "dataset.seq_len tokens; use e.g. trainer.batch_size=12."
        )
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"dataset.seq_len={seq_len} must be a positive integer; use e.g. dataset.seq_len=256.")
    if seq_len + 1 > n_tokens:
        raise ConfigError(
            f"dataset.seq_len={seq_len} is beyond the {split} split's {n_tokens} tokens (a window needs seq_len + 1 "
            "for its targets); lower dataset.seq_len or use a larger corpus."
        )


def sequences_per_batch(batch_tokens: int, seq_len: int) -> int:
    """How many windows of ``seq_len`` a batch of ``batch_tokens`` tokens holds (a batch size given in tokens)."""
    if batch_tokens < seq_len:
        raise ConfigError(
            f"trainer.batch_tokens={batch_tokens} is smaller than one sequence of dataset.seq_len={seq_len} tokens; "
            f"raise it to a multiple of {seq_len}."
        )
    return batch_tokens // seq_len


def _to_device(w: np.ndarray, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(w.astype(np.int64))
    if torch.device(device).type == "cuda":  # nanoGPT's: pinned, then an asynchronous copy
        t = t.pin_memory().to(device, non_blocking=True)
    return t[:, :-1], t[:, 1:]


class RandomWindows:
    """nanoGPT's ``get_batch``: ``batch_size`` random, overlapping windows per call, starts drawn with
    ``torch.randint(n - seq_len, (batch_size,))`` from a generator seeded with ``seed``.

    ``state_dict()`` / ``load_state_dict()`` save and restore the generator (and the count of batches drawn), so
    the batches after a resume are those the uninterrupted run draws.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        split: str = "train",
    ):
        check_windows(len(tokens), seq_len, batch_size, split)
        self.tokens, self.seq_len, self.batch_size, self.device = tokens, seq_len, batch_size, device
        self.generator = torch.Generator().manual_seed(int(seed))
        self.drawn = 0
        self._offsets = np.arange(seq_len + 1)

    def starts(self) -> torch.Tensor:
        """The next batch's window starts (int64 ``[batch_size]``); advances the generator."""
        self.drawn += 1
        return torch.randint(len(self.tokens) - self.seq_len, (self.batch_size,), generator=self.generator)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: int64 ``[batch_size, seq_len]`` inputs and their next-token targets."""
        rows = self.starts().numpy()[:, None] + self._offsets
        return _to_device(np.asarray(self.tokens[rows]), self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        """The generator's state and the batches drawn (a uint8 tensor and an int: ``weights_only`` loads them)."""
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.drawn = int(state["drawn"])


def random_eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    eval_iters: int,
    seed: int,
    device: torch.device | str = "cpu",
    split: str = "val",
):
    """nanoGPT's estimate: ``eval_iters`` random batches, whose mean loss is the reported one.

    The windows come from a generator seeded with ``seed`` at each call, so every evaluation of a run (and every
    arm of a study with the same seed) scores the same windows: the curve's noise is the model's, not the draw's.
    """
    if eval_iters < 1:
        raise ConfigError(f"trainer.eval_iters={eval_iters} must be at least 1; use e.g. trainer.eval_iters=200.")
    windows = RandomWindows(tokens, seq_len, batch_size, seed, device, split)
    for _ in range(eval_iters):
        yield windows.next()


def contiguous_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, device: torch.device | str = "cpu", split: str = "val"
):
    """The exact way: non-overlapping windows covering the split, in order, so every id but the first is a
    target exactly once (total nats over the split's targets, for perplexity and bits per byte).

    Full windows come ``batch_size`` at a time (the last batch may hold fewer); the ``(n - 1) % seq_len`` targets
    left over come last, as one row of that length.
    """
    check_windows(len(tokens), seq_len, batch_size, split)
    n_targets = len(tokens) - 1
    full = n_targets // seq_len
    offsets = np.arange(seq_len + 1)
    for first in range(0, full, batch_size):
        starts = np.arange(first, min(first + batch_size, full)) * seq_len
        yield _to_device(np.asarray(tokens[starts[:, None] + offsets]), device)
    rest = n_targets - full * seq_len
    if rest:
        yield _to_device(np.asarray(tokens[full * seq_len :])[None, :], device)


def count_contiguous_batches(n_tokens: int, seq_len: int, batch_size: int) -> int:
    """How many batches :func:`contiguous_batches` yields (for progress and budgets)."""
    full = (n_tokens - 1) // seq_len
    return -(-full // batch_size) + (1 if (n_tokens - 1) % seq_len else 0)
