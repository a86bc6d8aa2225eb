"""The token cache: built once and reused, atomic, keyed by corpus and tokenizer, uint16/uint32, with the bytes and
words of every split (bits per byte and word-level perplexity checked on a hand-built corpus)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from stackwise_bench.data.text import measures, token_cache
from stackwise_bench.data.text.corpora import SPLITS, load_text, load_wikitext103
from stackwise_bench.data.text.tokenizers import ByteTokenizer, gpt2_tokenizer
from stackwise_bench.errors import ConfigError

# Three files, one per split (3 files: one each); "é" and "🤖" make bytes differ from characters.
FILES = {"a.txt": "To be, or not to be\nthat is the question\n", "b.txt": "café 🤖\n", "c.txt": "x y z\n\nw"}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    for name, text in FILES.items():
        (root / name).write_text(text, encoding="utf-8")
    return load_text(root, val_fraction=0.3, test_fraction=0.3, split_seed=0)


class Counting(ByteTokenizer):
    """The byte tokenizer, counting the texts it is asked to encode (and failing on demand)."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def encode_batch(self, texts):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("killed mid-way")
        return super().encode_batch(texts)


def test_ids_bytes_and_words_of_every_split(corpus, tmp_path):
    cache = token_cache.open_or_build(corpus, ByteTokenizer(), tmp_path / "cache")
    assert cache.built
    for split in SPLITS:
        text = corpus.text(split)
        got = cache.splits[split]
        assert got.tokens.dtype == np.uint16
        assert got.tokens.tolist() == list(text.encode())  # byte ids are the bytes
        assert got.n_bytes == len(text.encode()) and got.n_tokens == len(text.encode())
        lines = text.count("\n") + (0 if text.endswith("\n") else 1)
        assert got.n_words == len(text.split()) + lines
    # files: nanoGPT's raw ids, with the counts in the manifest
    manifest = json.loads((cache.path / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] == cache.splits["train"].n_tokens
    raw = np.fromfile(cache.path / "val.bin", dtype=np.uint16)
    assert raw.tolist() == cache.splits["val"].tokens.tolist()
    assert not list(cache.path.parent.glob(".build-*"))


def test_the_cache_is_built_once_and_reused(corpus, tmp_path):
    tok = Counting()
    first = token_cache.open_or_build(corpus, tok, tmp_path)
    calls = tok.calls
    assert first.built and calls >= 3
    again = token_cache.open_or_build(corpus, tok, tmp_path)
    assert not again.built and tok.calls == calls  # not tokenized again
    assert again.path == first.path and again.splits["train"].tokens.tolist() == first.splits["train"].tokens.tolist()


def test_the_key_follows_the_corpus_and_the_tokenizer(corpus, tmp_path):
    byte = token_cache.open_or_build(corpus, ByteTokenizer(), tmp_path)
    gpt2 = token_cache.open_or_build(corpus, gpt2_tokenizer(), tmp_path)
    assert byte.key != gpt2.key and byte.path != gpt2.path
    tok = gpt2_tokenizer()
    for split in SPLITS:  # GPT-2 ids, bytes per token from the same byte count
        assert gpt2.splits[split].tokens.tolist() == tok.encode(corpus.text(split))
        assert gpt2.splits[split].n_bytes == byte.splits[split].n_bytes
        assert int(tok.token_bytes()[gpt2.splits[split].tokens].sum()) == gpt2.splits[split].n_bytes
    root = corpus.splits["train"][0].path.parent
    (root / "a.txt").write_text("To be, or not to be\n")  # a changed file is another corpus: another entry
    changed = token_cache.open_or_build(load_text(root, 0.3, 0.3, split_seed=0), ByteTokenizer(), tmp_path)
    assert changed.built and changed.key != byte.key


def test_a_failed_build_leaves_no_entry_and_no_partial_file(corpus, tmp_path):
    with pytest.raises(RuntimeError, match="killed mid-way"):
        token_cache.open_or_build(corpus, Counting(fail_after=1), tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    assert token_cache.open_or_build(corpus, Counting(), tmp_path / "cache").built  # and the next call builds it whole


def test_a_killed_build_is_cleaned_up_by_the_next_one(corpus, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    left = tmp_path / f".build-tokens-x-{pid}-1-0123abcd"
    left.mkdir()
    (left / "owner.json").write_text(json.dumps({"host": os.uname().nodename, "pid": pid}))
    (left / "train.bin").write_bytes(b"\0" * 10)
    token_cache.open_or_build(corpus, ByteTokenizer(), tmp_path)
    assert not left.exists()


def test_a_damaged_entry_is_rebuilt(corpus, tmp_path):
    first = token_cache.open_or_build(corpus, ByteTokenizer(), tmp_path)
    with open(first.path / "train.bin", "r+b") as f:
        f.truncate(3)  # a half-copied file
    again = token_cache.open_or_build(corpus, ByteTokenizer(), tmp_path)
    assert again.built and again.splits["train"].tokens.tolist() == list(corpus.text("train").encode())


class Wide(ByteTokenizer):
    vocab_size = 70_000
    sha256 = "wide"

    def encode_batch(self, texts):
        return [np.frombuffer(t.encode(), dtype=np.uint8).astype(np.int64) + 65_000 for t in texts]


def test_ids_beyond_uint16_are_stored_as_uint32(corpus, tmp_path):
    assert token_cache.token_dtype(65_536) == np.uint16 and token_cache.token_dtype(65_537) == np.uint32
    cache = token_cache.open_or_build(corpus, Wide(), tmp_path)
    assert cache.splits["train"].tokens.dtype == np.uint32
    assert cache.splits["train"].tokens.tolist() == [b + 65_000 for b in corpus.text("train").encode()]


def test_an_unwritable_cache_folder_is_refused(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(
        ConfigError,
        match=r"^dataset\.cache_dir=.*file/cache cannot be written \(.*\); point "
        r"dataset\.cache_dir at a writable folder \(the token ids and trained tokenizers are cached",
    ):
        token_cache.open_or_build(corpus, ByteTokenizer(), blocker / "cache")


def test_bits_per_byte_and_word_perplexity_on_a_hand_built_corpus(tmp_path):
    """A uniform model over GPT-2's 50,257 ids: nats are known exactly, so each measure is too."""
    root = tmp_path / "wt"
    root.mkdir()
    texts = {"train": "a b\n", "valid": " = Title = \n \n Café au lait , 🤖 . \n", "test": "one two three\n"}
    for name, text in texts.items():
        (root / f"wiki.{name}.raw").write_text(text, encoding="utf-8")
    corpus = load_wikitext103(root)
    val = token_cache.open_or_build(corpus, gpt2_tokenizer(), tmp_path / "cache").splits["val"]
    text = texts["valid"]
    # by hand: 12 + 2 + 25 = 39 UTF-8 bytes ("é" 2, "🤖" 4);
    # words: "=", "Title", "=", "Café", "au", "lait", ",", "🤖", "." and one <eos> for each of the 3 lines
    assert val.n_bytes == len(text.encode()) == 39
    assert val.n_words == 9 + 3
    total = val.n_tokens * math.log(50_257)
    assert measures.bits_per_byte(total, val.n_bytes) == pytest.approx(val.n_tokens * math.log2(50_257) / 39)
    assert measures.word_perplexity(total, val.n_words) == pytest.approx(50_257 ** (val.n_tokens / 12))
    assert measures.perplexity(total, val.n_tokens) == pytest.approx(50_257)
    assert val.bytes_per_token == pytest.approx(39 / val.n_tokens)
