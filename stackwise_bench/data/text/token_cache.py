"""Token ids of a corpus's splits, tokenized once into memmaps keyed by the corpus's and the tokenizer's sha256.

An entry ``<cache_dir>/tokens-<corpus>-<tokenizer>-<key24>/`` holds ``train.bin``, ``val.bin`` and ``test.bin``
(flat uint16 ids when the vocabulary fits, else uint32; nanoGPT's format, so its ``train.py`` can read the same
file) and ``manifest.json``: the key, dtype, and per split the number of tokens, the UTF-8 bytes and the words
(:func:`~stackwise_bench.data.text.corpora.count_words`) of the text they encode. Bits per byte and word-level
perplexity divide a split's total nats by those. Built atomically under a lock (:mod:`.builds`): readers see a
whole entry or none; a damaged entry is set aside and rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stackwise_bench.data.text import builds
from stackwise_bench.data.text.corpora import SPLITS, TextCorpus
from stackwise_bench.data.text.tokenizers import Tokenizer, encode_stream

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the files' layout or what the counts mean changes


@dataclass
class TokenSplit:
    """One split's ids (a read-only memmap) and the size of the text they encode."""

    name: str
    tokens: np.ndarray = field(repr=False)
    n_bytes: int
    n_words: int

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(self.n_tokens, 1)


@dataclass
class TokenCache:
    """An opened entry: ``splits`` by name, the ``manifest``, and whether this call tokenized (``built``)."""

    path: Path
    key: str
    splits: dict[str, TokenSplit]
    manifest: dict = field(repr=False)
    built: bool

    def describe(self) -> dict:
        """What the run record keeps of it (JSON-ready)."""
        return {
            "path": str(self.path),
            "key": self.key,
            "built": self.built,
            "dtype": self.manifest["dtype"],
            "splits": self.manifest["splits"],
        }


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65,536 ids, 0..65,535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def cache_key(corpus: TextCorpus, tokenizer: Tokenizer) -> str:
    return hashlib.sha256(f"tokens v{FORMAT_VERSION} {corpus.sha256} {tokenizer.sha256}".encode()).hexdigest()


def open_or_build(
    corpus: TextCorpus, tokenizer: Tokenizer, cache_dir: str | os.PathLike, setting: str | None = None
) -> TokenCache:
    """The token ids of every split of ``corpus`` under ``tokenizer``: mapped if cached, else tokenized once.

    ``setting`` is how ``dataset.cache_dir`` was given, for the refusal of an unwritable folder.
    """
    key = cache_key(corpus, tokenizer)
    entry = Path(cache_dir).expanduser() / f"tokens-{corpus.name}-{tokenizer.name}-{key[:24]}"
    dtype = token_dtype(tokenizer.vocab_size)
    manifest, built = builds.open_or_build(
        entry,
        lambda folder: _check(folder, key, dtype),
        lambda folder: _fill(folder, key, corpus, tokenizer, dtype),
        "token cache",
        setting or str(cache_dir),
    )
    splits = {
        name: TokenSplit(
            name,
            np.memmap(entry / f"{name}.bin", dtype=dtype, mode="r", shape=(manifest["splits"][name]["tokens"],))
            if manifest["splits"][name]["tokens"]
            else np.zeros(0, dtype=dtype),
            manifest["splits"][name]["bytes"],
            manifest["splits"][name]["words"],
        )
        for name in SPLITS
    }
    return TokenCache(entry, key, splits, manifest, built)


def _fill(folder: Path, key: str, corpus: TextCorpus, tokenizer: Tokenizer, dtype: np.dtype) -> dict:
    started = time.perf_counter()
    counts = {}
    for split in SPLITS:
        log.info("tokenizing the %s %s split with the %s tokenizer", corpus.name, split, tokenizer.name)
        n_tokens = n_bytes = n_words = n_lines = 0
        last = ""
        with open(folder / f"{split}.bin", "wb") as out:
            for chunk, ids in encode_stream(tokenizer, corpus.texts(split)):
                arr = np.asarray(ids)
                if arr.size and (arr.min() < 0 or arr.max() >= tokenizer.vocab_size):
                    raise ValueError(f"the {tokenizer.name} tokenizer gave an id outside 0..{tokenizer.vocab_size - 1}")
                out.write(arr.astype(dtype, copy=False).tobytes())
                n_tokens += arr.size
                n_bytes += len(chunk.encode("utf-8"))
                n_words += len(chunk.split())  # no word spans two chunks: they are cut before whitespace
                n_lines += chunk.count("\n")
                last = chunk[-1:] or last
        n_lines += 1 if last not in ("", "\n") else 0  # a last line without its newline (as count_words has it)
        n_words += n_lines  # WikiText's <eos>, one per line
        if n_bytes != corpus.nbytes(split):
            raise RuntimeError(f"the {split} split read {n_bytes} bytes, not the {corpus.nbytes(split)} it hashed")
        counts[split] = {"tokens": n_tokens, "bytes": n_bytes, "words": n_words}
    seconds = time.perf_counter() - started
    total = sum(c["tokens"] for c in counts.values())
    log.info("tokenized %d tokens in %.1f s (%.0f tokens/s)", total, seconds, total / max(seconds, 1e-9))
    return {
        "format": FORMAT_VERSION,
        "key": key,
        "dtype": dtype.name,
        "corpus": corpus.name,
        "corpus_sha256": corpus.sha256,
        "tokenizer": tokenizer.describe(),
        "splits": counts,
        "build_s": round(seconds, 3),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _check(folder: Path, key: str, dtype: np.dtype) -> dict | str:
    manifest = builds.read_manifest(folder, key, FORMAT_VERSION)
    if isinstance(manifest, str):
        return manifest
    if manifest.get("dtype") != dtype.name:
        return f"manifest.json records dtype {manifest.get('dtype')!r}, not {dtype.name}"
    splits = manifest.get("splits")
    for split in SPLITS:
        counts = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(counts, dict) or not all(
            isinstance(counts.get(k), int) for k in ("tokens", "bytes", "words")
        ):
            return f"manifest.json has no counts for the {split} split"
        try:
            size = (folder / f"{split}.bin").stat().st_size
        except OSError as exc:
            return f"{split}.bin cannot be read: {exc.strerror or exc}"
        if size != counts["tokens"] * dtype.itemsize:
            return f"{split}.bin holds {size} bytes, not the {counts['tokens']} {dtype.name} ids its manifest records"
    return manifest
