"""Token windows: nanoGPT's random training batches (deterministic, resumable mid-stream), the random and the exact
evaluation batches, and the refusals of a batch smaller than one sequence or a seq_len beyond the split."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from stackwise_bench.data.text import windows
from stackwise_bench.errors import ConfigError

TOKENS = (np.arange(1000) * 7 % 50_000).astype(np.uint16)  # distinct neighbours: a window's place is readable


def nanogpt_batch(data: np.ndarray, block_size: int, batch_size: int, gen: torch.Generator):
    """nanoGPT's get_batch (train.py, commit 3adf61e), with the generator passed in."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen)
    x = torch.stack([torch.from_numpy((data[i : i + block_size]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + block_size]).astype(np.int64)) for i in ix])
    return x, y


def test_random_windows_are_nanogpts_batches():
    got = windows.RandomWindows(TOKENS, seq_len=16, batch_size=5, seed=1337)
    gen = torch.Generator().manual_seed(1337)
    for _ in range(4):
        x, y = got.next()
        ref_x, ref_y = nanogpt_batch(TOKENS, 16, 5, gen)
        assert x.dtype == torch.int64 and x.shape == (5, 16)
        assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_random_windows_are_deterministic_per_seed():
    a = [windows.RandomWindows(TOKENS, 8, 4, seed=3).next()[0] for _ in range(2)]
    b = windows.RandomWindows(TOKENS, 8, 4, seed=4).next()[0]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], b)


def test_a_restored_state_continues_at_the_exact_batch():
    run = windows.RandomWindows(TOKENS, 8, 4, seed=0)
    for _ in range(3):
        run.next()
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)  # as a checkpoint holds it
    expected = [run.next() for _ in range(3)]

    buffer.seek(0)
    resumed = windows.RandomWindows(TOKENS, 8, 4, seed=0)  # a fresh process: same seed, then the saved state
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.drawn == 3
    for (x, y), (ex, ey) in zip((resumed.next() for _ in range(3)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_random_eval_batches_score_the_same_windows_every_time():
    first = [x for x, _ in windows.random_eval_batches(TOKENS, 8, 4, eval_iters=3, seed=7)]
    again = [x for x, _ in windows.random_eval_batches(TOKENS, 8, 4, eval_iters=3, seed=7)]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize("n, seq_len, batch", [(101, 10, 3), (105, 10, 4), (11, 10, 2), (12, 10, 1)])
def test_contiguous_batches_make_every_id_but_the_first_a_target_once(n, seq_len, batch):
    data = TOKENS[:n]
    xs, ys = zip(*windows.contiguous_batches(data, seq_len, batch))
    assert len(xs) == windows.count_contiguous_batches(n, seq_len, batch)
    targets = torch.cat([y.reshape(-1) for y in ys])
    inputs = torch.cat([x.reshape(-1) for x in xs])
    assert targets.tolist() == data[1:].astype(np.int64).tolist()
    assert inputs.tolist() == data[:-1].astype(np.int64).tolist()
    assert all(x.shape[1] == seq_len for x in xs[: (n - 1) // seq_len // batch])


def test_a_batch_smaller_than_one_sequence_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"^trainer\.batch_size=0 is smaller than one sequence: a batch holds whole "
        r"windows of dataset\.seq_len tokens; use e\.g\. trainer\.batch_size=12\.$",
    ):
        windows.RandomWindows(TOKENS, 8, 0, seed=0)
    with pytest.raises(
        ConfigError,
        match=r"^trainer\.batch_tokens=100 is smaller than one sequence of "
        r"dataset\.seq_len=256 tokens; raise it to a multiple of 256\.$",
    ):
        windows.sequences_per_batch(100, 256)
    assert windows.sequences_per_batch(1024, 256) == 4


def test_a_seq_len_beyond_the_split_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"^dataset\.seq_len=1000 is beyond the val split's 1000 tokens \(a window "
        r"needs seq_len \+ 1 for its targets\); lower dataset\.seq_len or use a larger corpus\.$",
    ):
        windows.contiguous_batches(TOKENS, 1000, 2, split="val").__next__()
    windows.RandomWindows(TOKENS, 999, 1, seed=0).next()  # the longest that fits
    with pytest.raises(ConfigError, match=r"^trainer\.eval_iters=0 must be at least 1"):
        next(windows.random_eval_batches(TOKENS, 8, 2, eval_iters=0, seed=0))
