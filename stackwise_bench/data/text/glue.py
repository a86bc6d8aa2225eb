"""GLUE (Wang et al. 2019) from a local copy: the original release's folders of TSVs, or a folder that HF
``datasets``' ``save_to_disk`` wrote (read only when ``datasets`` is installed; it is no dependency).

The original layout is ``<root>/<Task>/train.tsv`` and ``dev.tsv`` (MNLI: ``dev_matched.tsv`` and
``dev_mismatched.tsv``), read with ``csv.QUOTE_NONE`` as GLUE's own scripts do (its sentences hold bare quotes).
Each task's columns (:data:`TASKS`) are the release's: CoLA has no header and four columns (source, label,
original label, sentence); the others have a header, read by name (MRPC ``Quality``/``#1 String``/``#2 String``,
STS-B ``sentence1``/``sentence2``/``score``, QQP ``question1``/``question2``/``is_duplicate``, MNLI
``sentence1``/``sentence2``/``gold_label``, ...). QQP's train file has a few rows with missing fields, which
transformers' ``QqpProcessor`` skips: so does this reader (their count is returned); any other short row is refused.

Labels are the indices of HF ``datasets``' GLUE label names (MNLI entailment 0, neutral 1, contradiction 2; QNLI
and RTE entailment 0, not_entailment 1), so both sources agree; STS-B's score is a float in [0, 5].

GLUE's test labels are hidden, so :func:`glue_splits` makes dev the test split and a seeded slice of train the
validation split, and says which rows it took (``split.json``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stackwise_bench.errors import ConfigError


@dataclass(frozen=True)
class GlueSpec:
    """One task's files and columns: header names (None for CoLA's positions), labels, where its test split is."""

    folder: str
    text_a: str | int
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...]  # the label texts in index order; () for a regression
    tests: tuple[tuple[str, str], ...] = (("dev", "dev.tsv"),)  # (name, file) of the test split's parts
    hf: tuple[str, str | None] = ("sentence", None)  # HF datasets' text columns
    skip_short: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1


_NLI = ("entailment", "not_entailment")
TASKS = {
    "cola": GlueSpec("CoLA", 3, None, 1, ("0", "1")),
    "sst2": GlueSpec("SST-2", "sentence", None, "label", ("0", "1")),
    "mrpc": GlueSpec("MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), hf=("sentence1", "sentence2")),
    "stsb": GlueSpec("STS-B", "sentence1", "sentence2", "score", (), hf=("sentence1", "sentence2")),
    "qqp": GlueSpec(
        "QQP", "question1", "question2", "is_duplicate", ("0", "1"), hf=("question1", "question2"), skip_short=True
    ),
    "mnli": GlueSpec(
        "MNLI",
        "sentence1",
        "sentence2",
        "gold_label",
        ("entailment", "neutral", "contradiction"),
        tests=(("matched", "dev_matched.tsv"), ("mismatched", "dev_mismatched.tsv")),
        hf=("premise", "hypothesis"),
    ),  # fmt: skip
    "qnli": GlueSpec("QNLI", "question", "sentence", "label", _NLI, hf=("question", "sentence")),
    "rte": GlueSpec("RTE", "sentence1", "sentence2", "label", _NLI, hf=("sentence1", "sentence2")),
    "wnli": GlueSpec("WNLI", "sentence1", "sentence2", "label", ("0", "1"), hf=("sentence1", "sentence2")),
}
_HF_SPLITS = {"dev": "validation", "matched": "validation_matched", "mismatched": "validation_mismatched"}


@dataclass(frozen=True)
class GlueExample:
    text_a: str
    text_b: str | None
    label: int | float


@dataclass
class GlueSplits:
    """A task's train and validation rows, its test parts (``{"dev": ...}``; MNLI's matched and mismatched), and
    the ``split.json`` record of where each came from."""

    task: str
    train: list[GlueExample]
    val: list[GlueExample]
    tests: dict[str, list[GlueExample]]
    record: dict


def glue_spec(task: str) -> GlueSpec:
    """The spec of ``task`` (lower case: ``cola``, ``sst2``, ``mrpc``, ``stsb``, ``qqp``, ``mnli``, ...)."""
    if task not in TASKS:
        raise ConfigError(f"dataset.task={task} is not a GLUE task; use one of {', '.join(TASKS)}.")
    return TASKS[task]


def read_glue(root: str | Path, task: str) -> tuple[dict[str, list[GlueExample]], dict]:
    """Every split of ``task`` under ``root``: ``({"train": ..., "dev": ...}, source)``; ``source`` names the files
    and their sha256 (or the saved dataset's fingerprints) and the short rows skipped."""
    spec = glue_spec(task)
    folder = Path(root).expanduser() / spec.folder
    if (folder / "dataset_dict.json").is_file():
        return _read_saved(folder, spec, task)
    files = [("train", "train.tsv"), *spec.tests]
    missing = [name for _, name in files if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"dataset.root={root}: {folder} lacks {', '.join(missing)} (GLUE's {spec.folder} folder holds "
            f"{', '.join(name for _, name in files)}); point dataset.root at the folder that holds {spec.folder}/."
        )
    splits, source = {}, {"format": "tsv", "files": {}, "skipped": {}}
    for split, name in files:
        splits[split], skipped = read_tsv(folder / name, spec)
        source["files"][name] = _sha256(folder / name)
        source["skipped"][name] = skipped
    return splits, source


def read_tsv(path: Path, spec: GlueSpec) -> tuple[list[GlueExample], int]:
    """The examples of one GLUE TSV and the count of short rows skipped (QQP's only)."""
    csv.field_size_limit(sys.maxsize)  # a few GLUE fields exceed csv's default limit of 131,072 characters
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ConfigError(f"dataset.root: {path} is empty; point dataset.root at a complete GLUE copy.")
    if isinstance(spec.label, int):  # CoLA: no header, fixed positions
        first_data, cols = 0, (spec.text_a, spec.text_b, spec.label)
        if len(rows[0]) != 4 or rows[0][1] not in spec.labels:
            raise ConfigError(
                f"dataset.root: {path} does not look like {spec.folder}'s train/dev files (no header, 4 columns: "
                f"source, label, original label, sentence), its first row has {len(rows[0])} columns; use the "
                "original GLUE files."
            )
    else:
        first_data, cols = 1, _header_columns(path, rows[0], spec)
    width = max(c for c in cols if c is not None) + 1
    examples, skipped = [], 0
    for line, row in enumerate(rows[first_data:], start=first_data + 1):
        if len(row) < width:
            if spec.skip_short:
                skipped += 1
                continue
            raise ConfigError(
                f"dataset.root: {path} line {line} has {len(row)} columns where {spec.folder} needs {width}; "
                "use the original GLUE files (read without quoting)."
            )
        text_b = row[cols[1]] if cols[1] is not None else None
        examples.append(GlueExample(row[cols[0]], text_b, _label(row[cols[2]], spec, path, line)))
    return examples, skipped


def glue_splits(root: str | Path, task: str, val_fraction: float = 0.1, seed: int = 0) -> GlueSplits:
    """Train, validation and test rows of ``task``: dev (MNLI: both devs) is the test split, since GLUE's test labels
    are hidden, and a seeded ``val_fraction`` of train (a numpy ``default_rng(seed)`` permutation's first rows) is
    the validation split. ``record`` (for ``split.json``) lists the validation rows' train indices and the files'
    sha256, and a ``sha256`` over both (a resume on other data or another slice is refused by it)."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(
            f"dataset.val_fraction={val_fraction!r} must be in (0, 1); use e.g. dataset.val_fraction=0.1."
        )
    splits, source = read_glue(root, task)
    train = splits["train"]
    n_val = max(1, round(len(train) * val_fraction))
    if n_val >= len(train):
        raise ConfigError(
            f"dataset.val_fraction={val_fraction} leaves no training rows of {task}'s {len(train)}; lower it."
        )
    order = np.random.default_rng(seed).permutation(len(train))
    val_rows = np.sort(order[:n_val])
    keep = np.ones(len(train), dtype=bool)
    keep[val_rows] = False
    record = {"task": task, "source": source, "val_from": "train", "val_seed": int(seed)}
    record |= {"val_fraction": float(val_fraction), "val_indices": [int(i) for i in val_rows]}
    record["test_from"] = {name: _HF_SPLITS[name] if source["format"] == "hf" else file for name, file in _tests(task)}
    record["sha256"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    tests = {name: splits[name] for name, _ in _tests(task)}
    return GlueSplits(task, [e for e, k in zip(train, keep) if k], [train[i] for i in val_rows], tests, record)


def _tests(task: str) -> tuple[tuple[str, str], ...]:
    return TASKS[task].tests


def _header_columns(path: Path, header: list[str], spec: GlueSpec) -> tuple[int, int | None, int]:
    wanted = [spec.text_a, spec.text_b, spec.label]
    missing = [name for name in wanted if name is not None and name not in header]
    if missing:
        raise ConfigError(
            f"dataset.root: {path}'s header ({' | '.join(header[:12])}) lacks {', '.join(missing)}, which "
            f"{spec.folder} needs; use the original GLUE files."
        )
    if spec.label == "gold_label" or spec.label == "score":
        label = len(header) - 1 - header[::-1].index(spec.label)  # the last column of that name
    else:
        label = header.index(spec.label)
    return header.index(spec.text_a), (header.index(spec.text_b) if spec.text_b else None), label


def _label(text: str, spec: GlueSpec, path: Path, line: int) -> int | float:
    text = text.strip()
    if not spec.labels:
        try:
            return float(text)
        except ValueError:
            pass
    elif text in spec.labels:
        return spec.labels.index(text)
    want = "a number" if not spec.labels else " or ".join(spec.labels)
    raise ConfigError(
        f"dataset.root: {path} line {line} has label {text!r} where {spec.folder} has {want}; "
        "use the original GLUE files."
    )


def _read_saved(folder: Path, spec: GlueSpec, task: str) -> tuple[dict, dict]:
    """A ``DatasetDict.save_to_disk`` folder: HF's split and column names, labels already indices."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"dataset.root: {folder} was written by HF datasets' save_to_disk, which needs the datasets package; "
            "pip install datasets, or point dataset.root at GLUE's original TSV folders."
        ) from None
    saved = datasets.load_from_disk(str(folder))
    wanted = {"train": "train", **{name: _HF_SPLITS[name] for name, _ in spec.tests}}
    missing = [hf for hf in wanted.values() if hf not in saved]
    if missing:
        raise ConfigError(f"dataset.root: {folder} holds no {', '.join(missing)} split; save the whole GLUE task.")
    a, b = spec.hf
    splits = {
        name: [GlueExample(r[a], r[b] if b else None, r["label"]) for r in saved[hf]] for name, hf in wanted.items()
    }
    source = {"format": "hf", "fingerprints": {hf: saved[hf]._fingerprint for hf in wanted.values()}}
    return splits, source


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
