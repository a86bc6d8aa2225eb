"""A text dataset for a training run: a corpus, its tokenizer, the cached token ids, and the run's window loaders.

``dataset=shakespeare`` / ``dataset=text`` / ``dataset=wikitext103`` instantiate :func:`load_text_dataset`, which
reads the corpus's split and loads the tokenizer, but tokenizes nothing: the token cache is opened (or built) the
first time :attr:`TextData.tokens` is read, so a config the assembly refuses (a vocabulary smaller than the
tokenizer's, a ``seq_len`` beyond the model's context) costs no tokenizing.

The loaders: :class:`TrainWindows`, an "epoch" of ``steps_per_epoch`` random-window batches (nanoGPT's
``eval_interval``) from one generator whose state is part of the checkpoint; :class:`EvalWindows`, the exact
contiguous windows of the validation or test split (or of its first ``max_tokens`` ids).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stackwise_bench.data.text.corpora import load_shakespeare, load_text, load_wikitext103
from stackwise_bench.data.text.token_cache import TokenCache, open_or_build
from stackwise_bench.data.text.tokenizers import Tokenizer, load_tokenizer
from stackwise_bench.data.text.windows import RandomWindows, check_windows, contiguous_batches, count_contiguous_batches
from stackwise_bench.errors import ConfigError

log = logging.getLogger(__name__)

CORPORA = ("shakespeare", "text", "wikitext103")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stackwise_bench`` (``~/.cache/stackwise_bench``): token ids are shared by every run."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stackwise_bench"


@dataclass
class TextData:
    """A corpus under a tokenizer; :attr:`tokens` (the memmaps) is built on first use. ``kind`` tells the assembly
    it is text."""

    name: str
    corpus: object = field(repr=False)
    tokenizer: Tokenizer = field(repr=False)
    seq_len: int
    steps_per_epoch: int
    val_tokens: int | None
    test_tokens: int | None
    cache_dir: Path
    cache_setting: str
    train_tokens: int | None = None  # a training budget in tokens: the steps it buys (:func:`budget_steps`)
    kind: str = "text"
    classes: tuple = ()
    _tokens: TokenCache | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    num_classes = vocab_size  # what image code calls the output size

    @property
    def tokens(self) -> TokenCache:
        if self._tokens is None:
            self._tokens = open_or_build(self.corpus, self.tokenizer, self.cache_dir, self.cache_setting)
        return self._tokens

    @property
    def split(self) -> dict:
        """``split.json``: which documents are in which split, the corpus's and the tokenizer's sha256, and a
        ``sha256`` of both (a resume on another text or another tokenizer is refused by it)."""
        both = hashlib.sha256(f"{self.corpus.sha256} {self.tokenizer.sha256}".encode()).hexdigest()
        return {
            **self.corpus.record,
            "corpus_sha256": self.corpus.sha256,
            "tokenizer": self.tokenizer.describe(),
            "tokenizer_sha256": self.tokenizer.sha256,
            "sha256": both,
        }

    @property
    def notes(self) -> dict:
        """summary.json's ``data`` section beside the name: the tokenizer, the window length and the token cache."""
        return {"tokenizer": self.tokenizer.describe(), "seq_len": self.seq_len, "tokens": self.tokens.describe()}


def load_text_dataset(
    corpus: str,
    tokenizer: str = "byte",
    seq_len: int = 64,
    steps_per_epoch: int = 100,
    val_tokens: int | None = None,
    test_tokens: int | None = None,
    cache_dir: str | None = None,
    root: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    bpe_vocab_size: int = 4096,
    tokenizer_files: str | None = None,
    plays: str = "all",
    train_tokens: int | None = None,
) -> TextData:
    """The corpus ``corpus`` split into train/val/test, and the tokenizer ``tokenizer`` (a BPE is trained on
    the train split and cached in ``cache_dir``). ``plays`` (shakespeare only): ``all``, or the fixed disjoint
    ``pretrain`` / ``finetune`` halves of the plays. ``train_tokens``: the training budget in tokens instead of
    ``trainer.max_epochs`` (the token-scaling axis); the run trains the whole steps it buys, its last epoch partial.

    Raises:
        ConfigError: An unknown corpus, a ``root`` where the corpus needs none or none where it needs one, or
            whatever the corpus and tokenizer loaders refuse (missing files, hashes that fail).
    """
    if corpus not in CORPORA:
        raise ConfigError(f"dataset.corpus={corpus} is not a text corpus; use one of {', '.join(CORPORA)}.")
    if plays != "all" and corpus != "shakespeare":
        raise ConfigError(f"dataset.plays={plays} picks Shakespeare plays, not {corpus} text; leave it at all.")
    if corpus == "shakespeare":
        text = load_shakespeare(val_fraction, test_fraction, split_seed, plays)
    elif root is None:
        raise ConfigError(f"dataset.root=null: dataset.corpus={corpus} reads local files; set dataset.root=DIR.")
    elif corpus == "text":
        text = load_text(root, val_fraction, test_fraction, split_seed)
    else:
        text = load_wikitext103(root)
    where = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    tok = load_tokenizer(tokenizer, corpus=text, vocab_size=bpe_vocab_size, cache_dir=where, files=tokenizer_files)
    return TextData(
        text.name,
        text,
        tok,
        seq_len,
        steps_per_epoch,
        val_tokens,
        test_tokens,
        where,
        str(cache_dir or where),
        train_tokens,
    )


def budget_steps(train_tokens: int, batch_size: int, seq_len: int) -> int:
    """The optimizer steps ``train_tokens`` buys at ``batch_size`` windows of ``seq_len`` targets (rounded up: the
    run trains at least its budget, at most one batch more)."""
    return math.ceil(train_tokens / (batch_size * seq_len))


class TrainWindows:
    """``steps_per_epoch`` batches of ``batch_size`` random windows per "epoch", from one generator seeded with
    the run's seed (:class:`RandomWindows`); ``state_dict`` is the generator's, saved in every checkpoint."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, steps_per_epoch: int, seed: int, device):
        self.windows = RandomWindows(tokens, seq_len, batch_size, seed, device, "train")
        self.seq_len, self.batch_size, self.steps, self.seed = seq_len, batch_size, steps_per_epoch, seed

    def __len__(self) -> int:
        return self.steps

    def batches(self, epoch: int, start_step: int):
        """The batches of ``epoch`` from ``start_step`` on. The generator should stand there already (restored
        from the checkpoint); where it does not (a checkpoint without it), it is replayed from the seed."""
        at = epoch * self.steps + start_step
        if self.windows.drawn != at:
            log.info("replaying the training windows' generator to batch %d", at)
            self.windows.generator.manual_seed(int(self.seed))
            self.windows.drawn = 0
            for _ in range(at):
                self.windows.starts()
        for _ in range(start_step, self.steps):
            yield self.windows.next()

    def state_dict(self) -> dict:
        return self.windows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state)


class EvalWindows:
    """The exact evaluation of a split: contiguous windows over its first ``max_tokens`` ids (None: all), with
    the UTF-8 bytes their targets encode (for bits per byte) and, over a whole split, its words."""

    def __init__(self, split, tokenizer: Tokenizer, seq_len: int, batch_size: int, device, max_tokens=None):
        n = split.n_tokens if max_tokens is None else min(int(max_tokens), split.n_tokens)
        self.tokens, self.seq_len, self.batch_size, self.device = split.tokens[:n], seq_len, batch_size, device
        check_windows(n, seq_len, batch_size, split.name)
        targets = np.asarray(self.tokens[1:])
        self.n_targets = int(targets.size)
        self.n_bytes = int(tokenizer.token_bytes()[targets.astype(np.int64)].sum())
        self.n_words = split.n_words if n == split.n_tokens else None
        self.name = split.name

    def __len__(self) -> int:
        return count_contiguous_batches(len(self.tokens), self.seq_len, self.batch_size)

    def batches(self):
        yield from contiguous_batches(self.tokens, self.seq_len, self.batch_size, self.device, self.name)


def text_loaders(data: TextData, batch_size: int, eval_batch_size: int, seed: int, device) -> tuple:
    """``(train, val, test)`` loaders of a run: random training windows, exact evaluation windows."""
    splits = data.tokens.splits
    train = TrainWindows(splits["train"].tokens, data.seq_len, batch_size, data.steps_per_epoch, seed, device)
    val = EvalWindows(splits["val"], data.tokenizer, data.seq_len, eval_batch_size, device, data.val_tokens)
    test = EvalWindows(splits["test"], data.tokenizer, data.seq_len, eval_batch_size, device, data.test_tokens)
    return train, val, test


__all__ = ["CORPORA", "EvalWindows", "TextData", "TrainWindows", "load_text_dataset", "text_loaders"]
