"""What every dataset loader returns: :class:`ImageData`, the deterministic train/val split, and the check that a
resumed run's data still gives the split it was trained on."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stackwise_bench.errors import ConfigError, short_error
from stackwise_bench.runs.contract import CHECKPOINTS, SPLIT
from stackwise_bench.runs.identity import SPLIT_FIX, read_split


@dataclass
class ImageData:
    """A dataset split into train / val / test, all uint8 ``[N, 3, H, W]`` CPU tensors.

    ``train_x`` is the training part after validation was carved out; ``mean`` and
    ``std`` are its per-channel statistics in [0, 1]. ``split`` is what goes into
    ``split.json``; its indices refer to the training pool before the carve-out (imagefolder: rows of its cache).
    """

    name: str
    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    val_x: torch.Tensor = field(repr=False)
    val_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    split: dict = field(repr=False)
    # What the loader wants the run record to keep beside the split (JSON-ready; empty for the built-in sets):
    # dataset=imagefolder puts its cache (path, key, built or reused) and the files skipped as undecodable here.
    notes: dict = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_train_val(labels: torch.Tensor, val_fraction: float, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, deterministic split of ``range(len(labels))`` into sorted (train_idx, val_idx).

    Each class contributes ``round(val_fraction * class_size)`` samples to validation,
    chosen by a permutation from a CPU generator seeded with ``split_seed`` only.
    """
    if not 0.0 < val_fraction < 1.0:
        # 0 would leave nothing to pick best.pt and early stopping by: epoch 1 would stay "best" forever.
        raise ConfigError(
            f"dataset.val_fraction={val_fraction} must be in (0, 1): best.pt and early stopping are "
            "chosen on the validation split; use e.g. dataset.val_fraction=0.1."
        )
    if int(split_seed) != split_seed or split_seed < 0:
        raise ConfigError(
            f"dataset.split_seed={split_seed} must be a non-negative integer; use e.g. dataset.split_seed=0."
        )
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    gen = torch.Generator().manual_seed(int(split_seed))
    train_parts, val_parts = [], []
    for cls in torch.unique(labels, sorted=True):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = int(math.floor(val_fraction * len(idx) + 0.5))
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    train_idx = torch.sort(torch.cat(train_parts)).values if train_parts else torch.zeros(0, dtype=torch.long)
    val_idx = torch.sort(torch.cat(val_parts)).values if val_parts else torch.zeros(0, dtype=torch.long)
    if len(val_idx) == 0:
        raise ConfigError(
            f"dataset.val_fraction={val_fraction} leaves no validation sample out of {len(labels)}; "
            "raise dataset.val_fraction or use more training data."
        )
    return train_idx, val_idx


def _channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of a uint8 ``[N, C, H, W]`` tensor in [0, 1], exact integer sums in chunks."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros(x.shape[1], dtype=torch.float64)
    for part in x.split(chunk):
        part = part.to(torch.float64)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = x.numel() / x.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).clamp_min(1e-6).tolist())


def subset_train(
    train_idx: torch.Tensor, labels: torch.Tensor, train_size: int, split_seed: int, name: str
) -> torch.Tensor:
    """The first ``train_size`` of ``train_idx`` in a seeded, class-interleaved order, sorted.

    Each class is permuted (a generator seeded with ``split_seed`` + 1, so the choice never depends on the
    run seed), and its i-th image gets the key (i + ½) / class size: sorting by key deals the classes out in
    proportion, so every subset keeps the class shares, and a smaller subset is part of every larger one
    (a data-scaling study adds images, it never swaps them).
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu()[train_idx]
    n_classes = len(torch.unique(labels))
    if int(train_size) != train_size or not n_classes <= train_size <= len(train_idx):
        raise ConfigError(
            f"dataset.train_size={train_size} must be a whole number between {n_classes} (one image per class) "
            f"and the {len(train_idx)} training images {name} has after validation is carved out; "
            f"use e.g. dataset.train_size={max(n_classes, len(train_idx) // 2)}, or null for all of them."
        )
    gen = torch.Generator().manual_seed(int(split_seed) + 1)
    keys = torch.empty(len(labels), dtype=torch.float64)
    for cls in torch.unique(labels, sorted=True):
        where = torch.nonzero(labels == cls).flatten()
        order = torch.randperm(len(where), generator=gen)
        keys[where[order]] = (torch.arange(len(where), dtype=torch.float64) + 0.5) / len(where)
    chosen = torch.sort(keys, stable=True).indices[: int(train_size)]
    return torch.sort(train_idx[chosen]).values


def build_image_data(
    name, pool_x, pool_y, test_x, test_y, classes, val_fraction, split_seed, train_size: int | None = None
) -> ImageData:
    """Carve validation out of the training pool (then keep ``train_size`` images of the rest, when given) and
    compute train-only statistics."""
    train_idx, val_idx = split_train_val(pool_y, val_fraction, split_seed)
    if train_size is not None:
        train_idx = subset_train(train_idx, pool_y, train_size, split_seed, name)
    lists = {"train_idx": train_idx.tolist(), "val_idx": val_idx.tolist()}
    digest = hashlib.sha256(json.dumps(lists, separators=(",", ":")).encode()).hexdigest()
    split = {
        "val_fraction": float(val_fraction),
        "split_seed": int(split_seed),
        "train_size": None if train_size is None else int(train_size),
        "num_train": len(train_idx),
        "num_val": len(val_idx),
        **lists,
        "sha256": digest,
    }
    train_x = pool_x[train_idx].contiguous()
    mean, std = _channel_stats(train_x)
    return ImageData(
        name,
        train_x,
        pool_y[train_idx].contiguous(),
        pool_x[val_idx].contiguous(),
        pool_y[val_idx].contiguous(),
        test_x.contiguous(),
        test_y.contiguous(),
        list(classes),
        mean,
        std,
        split,
    )


PARTS = ("train_idx", "val_idx", "test_idx")


def check_resumed_split(run_dir: str | Path, split: dict) -> None:
    """Refuse a resume whose data no longer gives the split recorded in the run's ``split.json``.

    A run without ``split.json`` passes: its checkpoint's stamp still carries the split's sha256.

    Raises:
        ConfigError: ``split.json`` is damaged, or the data changed (what changed, with a few paths).
    """
    recorded = read_split(Path(run_dir))
    if recorded is None:
        return
    path = Path(run_dir) / SPLIT
    try:
        changes = split_changes(recorded, split)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ConfigError(
            f"{path} is not a split record this version reads ({short_error(exc)}); {SPLIT_FIX}."
        ) from exc
    if changes:
        raise ConfigError(
            f"trainer.resume=true: the data changed since this run started ({changes}), so it would continue on "
            f"another split than {path} records; restore the data, or delete {Path(run_dir) / CHECKPOINTS / 'last.pt'} "
            "to start the run over on the data as it is now."
        )


def split_changes(old: dict, new: dict) -> str:
    """What differs between a recorded split and the one the data gives now, for a sentence; '' when nothing.

    Splits that list their files (dataset=imagefolder) are compared file by file: added, removed, moved to another
    class folder (relabelled), or into another part (train, val, test); the others by their indices.
    """
    if "files" in old and "files" in new:
        return _file_changes(old, new)
    if old["sha256"] == new["sha256"] and all(old.get(k) == new.get(k) for k in PARTS):
        return ""
    sizes = ", ".join(
        f"{k[:-4]} {len(old.get(k) or [])} -> {len(new.get(k) or [])}" for k in PARTS if k in old or k in new
    )
    return f"its indices changed: sha256 {old['sha256'][:12]}... -> {new['sha256'][:12]}..., images {sizes}"


def _file_changes(old: dict, new: dict) -> str:
    before, after = _placed(old), _placed(new)
    removed = sorted(before.keys() - after.keys())
    added = sorted(after.keys() - before.keys())
    relabelled = _class_moves(removed, added, old.get("layout"))
    gone, came = {a for a, _ in relabelled}, {b for _, b in relabelled}
    removed, added = [p for p in removed if p not in gone], [p for p in added if p not in came]
    reassigned = sorted(p for p in before.keys() & after.keys() if before[p] != after[p])
    changes = []
    if old.get("classes") is not None and old.get("classes") != new.get("classes"):
        changes.append(_class_changes(old["classes"], new.get("classes") or []))
    for what, items in (
        ("relabelled", [f"{a} -> {b}" for a, b in relabelled]),
        ("removed", removed),
        ("added", added),
        ("in another part of the split", reassigned),
    ):
        if items:
            files = f"{len(items)} file{'s' if len(items) > 1 else ''}"
            changes.append(f"{files} {what}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}")
    return "; ".join(changes)


def _class_changes(old: list[str], new: list[str]) -> str:
    """``class folder added: whale (the model was built for 3 classes: ant, mole, zebra)``."""
    said = [
        f"class folder{'s' if len(names) > 1 else ''} {what}: {', '.join(names)}"
        for what, names in (("added", [c for c in new if c not in old]), ("removed", [c for c in old if c not in new]))
        if names
    ]
    return f"{'; '.join(said)} (the model was built for {len(old)} classes: {', '.join(old)})"


def _placed(split: dict) -> dict[str, tuple]:
    """``{file: (class, part)}`` of a split that lists its files (part: train, val, test, or unused)."""
    files, labels, classes = split["files"], split["labels"], split.get("classes")
    if len(files) != len(labels):
        raise ValueError(f"{len(files)} files but {len(labels)} labels")
    part = ["unused"] * len(files)  # skipped as undecodable, or left out by train_size
    for key in PARTS:
        for i in split.get(key) or []:
            part[i] = key[:-4]
    names = [classes[y] for y in labels] if classes else labels
    return dict(zip(files, zip(names, part)))


def _class_moves(removed: list[str], added: list[str], layout: str | None) -> list[tuple[str, str]]:
    """(old, new) paths of files that moved to another class folder: the same path but for the class folder."""
    at = 1 if layout == "train/val/test" else 0  # the class folder's place in a relative path

    def rest(path: str) -> str:
        parts = path.split("/")
        return "/".join(parts[:at] + parts[at + 1 :])

    arrived: dict[str, list[str]] = {}
    for path in added:
        arrived.setdefault(rest(path), []).append(path)
    return [(path, arrived[rest(path)].pop(0)) for path in removed if arrived.get(rest(path))]
