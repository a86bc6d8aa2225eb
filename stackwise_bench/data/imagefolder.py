"""``dataset=imagefolder``: a user's own folder of images, decoded once into a uint8 memmap cache.

Two layouts (class names = the sorted class folder names, as torchvision's ImageFolder):

- ``<root>/train/<class>/...`` with optional ``<root>/val/<class>/...`` and ``<root>/test/<class>/...``;
  a split without its folder is carved out of ``train/`` (``val_fraction``, ``test_fraction``);
- ``<root>/<class>/...``: test and validation are carved out of it, class shares kept.

Files ending in .jpg, .jpeg, .png or .webp (any case) are images, searched recursively inside each class folder;
other files and anything whose name starts with a dot are ignored. The first load decodes every image
(:mod:`stackwise_bench.data.image_cache`); later loads map the cache and decode nothing.

Memory: the returned tensors are views of the memory-mapped cache where a split is one contiguous run of it
(``train/``, ``val/``, ``test/`` folders without skipped files), otherwise gathered into RAM, or, when a split
would not fit in half the available RAM, into a file of the cache that is mapped in turn. A mapped tensor costs
page cache, not process memory: the kernel reads pages as batches touch them and drops them under pressure, so a
set larger than RAM trains with ``trainer.data_on_device=false`` (GPU) or on the CPU, at the speed of the disk
once it no longer fits in the page cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stackwise_bench.data import image_cache
from stackwise_bench.data.splits import ImageData, _channel_stats, split_train_val, subset_train
from stackwise_bench.errors import ConfigError

log = logging.getLogger(__name__)

IMAGEFOLDER_TEST_SEED = 0  # fixed: a carved test split never depends on the run seed or split_seed
LAYOUT = "laid out as <root>/<class>/<image> or <root>/train/<class>/<image>"
KINDS = ".jpg, .jpeg, .png or .webp"
PARTS = ("train", "val", "test")


@dataclass
class Scan:
    """The image files under a root, in cache order: by part (train, val, test), class, then relative path."""

    layout: str  # "train/val/test" or "class folders"
    classes: list[str]
    rel_paths: list[str]
    labels: np.ndarray  # int64, the class index of each file
    parts: np.ndarray  # int8: 0 train (or the one pool), 1 val, 2 test
    present: tuple[bool, bool, bool]  # which of train/, val/, test/ exist
    ignored: int  # files in class folders that are not images (by extension)


def load_imagefolder(
    root: str | None = None,
    img_size: int = 32,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    train_size: int | None = None,
    cache_dir: str | None = None,
    skip_bad: bool = False,
    workers: int | None = None,
) -> ImageData:
    """Images from ``root``, resized (shorter side) and center-cropped to ``img_size``, through the cache.

    Args:
        cache_dir: Where decoded images are cached; None = ``<root>/.stackwise_cache``.
        skip_bad: Leave out files that cannot be decoded (listed in ``ImageData.notes["skipped"]``) instead of
            refusing the folder.
        workers: Decoding threads; None = the CPUs this process may use.
    """
    if root is None:
        raise ConfigError(
            "dataset.root=null: dataset=imagefolder needs the folder of your images; set dataset.root=/path/to/images "
            f"({LAYOUT})."
        )
    if isinstance(img_size, bool) or int(img_size) != img_size or img_size < 1:
        raise ConfigError(f"dataset.img_size={img_size} must be a positive integer; use e.g. dataset.img_size=32.")
    if workers is not None and (isinstance(workers, bool) or int(workers) != workers or workers < 1):
        raise ConfigError(
            f"dataset.workers={workers} must be a positive integer, or null (null = the CPUs this process may use); "
            "use e.g. dataset.workers=8."
        )
    size, threads = int(img_size), int(workers or _cpus())
    folder = Path(root).expanduser()
    if not folder.is_dir():
        why = "is a file" if folder.exists() else "does not exist"
        raise ConfigError(
            f"dataset.root={root} is not a folder ({folder.resolve()} {why}); set dataset.root to the folder of your "
            f"images, {LAYOUT}."
        )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else folder / ".stackwise_cache"
    scan = scan_folder(folder, root, exclude=cache)
    key = image_cache.cache_key(folder, scan.rel_paths, size)
    entry = image_cache.open_or_build(
        cache, "null" if cache_dir is None else str(cache_dir), folder, scan.rel_paths, scan.labels, size, threads, key
    )
    bad = entry.bad
    if bad and not skip_bad:
        first = ", ".join(b["path"] for b in bad[:3]) + (", ..." if len(bad) > 3 else "")
        them = "them" if len(bad) > 1 else "it"
        raise ConfigError(
            f"dataset.root={root}: {len(bad)} image file{'s' if len(bad) > 1 else ''} could not be decoded "
            f"({first}); delete or replace {them}, or set dataset.skip_bad=true to leave {them} out."
        )
    if bad:
        log.warning(
            "dataset.skip_bad=true: leaving out %d image file(s) that could not be decoded: %s",
            len(bad),
            "; ".join(f"{b['path']} ({b['error']})" for b in bad[:5]) + (" ..." if len(bad) > 5 else ""),
        )
    if scan.ignored:
        log.info("ignored %d files in the class folders of %s that are not %s images", scan.ignored, folder, KINDS)
    data, where = _assemble(root, scan, entry, val_fraction, test_fraction, split_seed, train_size)
    data.notes = {
        "root": str(folder.resolve()),
        "layout": scan.layout,
        "img_size": size,
        "num_files": len(scan.rel_paths),
        "cache": {
            "path": str(entry.path.resolve()),
            "key": key,
            "built": entry.built,
            "build_s": entry.manifest.get("build_s") if entry.built else None,
            "splits_in": where,  # view (of the mapped cache), ram, or disk (mapped subset files)
        },
        "skipped": {"count": len(bad), "files": [{"path": b["path"], "error": b["error"]} for b in bad[:20]]},
    }
    return data


def scan_folder(folder: Path, root_setting: str, exclude: Path | None = None) -> Scan:
    """The image files under ``folder`` in either layout, refusing a folder that has neither."""
    dirs = {p.name for p in _subdirs(folder, exclude)}
    present = tuple(part in dirs for part in PARTS)
    if present[0]:
        layout, bases = "train/val/test", [(i, folder / part) for i, part in enumerate(PARTS) if present[i]]
    elif present[1] or present[2]:
        part = "val" if present[1] else "test"
        raise ConfigError(
            f"dataset.root={root_setting} has {part}/ but no train/ folder; put the training images in "
            f"{folder}/train/<class>/, or use one folder per class without val/ and test/."
        )
    else:
        layout, bases = "class folders", [(0, folder)]
    classes = [p.name for p in _subdirs(bases[0][1], exclude)]
    index = {name: i for i, name in enumerate(classes)}
    rel_paths, labels, parts, ignored = [], [], [], 0
    for part, base in bases:
        for class_dir in _subdirs(base, exclude):
            where = class_dir.relative_to(folder).as_posix()
            if class_dir.name not in index:
                raise ConfigError(
                    f"dataset.root={root_setting}: {where} is a class that train/ does not have; add "
                    f"train/{class_dir.name} with training images, or remove {where}."
                )
            found, skipped = _images(class_dir, folder, exclude)
            ignored += skipped
            if not found and part == 0:
                raise ConfigError(
                    f"dataset.root={root_setting}: the class folder {where} has no {KINDS} images; add some, or "
                    "remove the folder."
                )
            rel_paths += found
            labels += [index[class_dir.name]] * len(found)
            parts += [part] * len(found)
    if not rel_paths:
        raise ConfigError(
            f"dataset.root={root_setting} has no class folders with {KINDS} images; point dataset.root at the folder "
            f"of your images, {LAYOUT}."
        )
    if len(classes) < 2:
        raise ConfigError(
            f"dataset.root={root_setting} has one class folder ({classes[0]}) and a classifier needs two or more; "
            f"add a folder per class, {LAYOUT}."
        )
    return Scan(
        layout,
        classes,
        rel_paths,
        np.asarray(labels, dtype=np.int64),
        np.asarray(parts, dtype=np.int8),
        present,  # type: ignore[arg-type]
        ignored,
    )


def _subdirs(folder: Path, exclude: Path | None) -> list[Path]:
    skip = exclude.resolve() if exclude is not None else None
    found = []
    with os.scandir(folder) as entries:
        for e in entries:
            if not e.name.startswith(".") and e.is_dir() and (skip is None or Path(e.path).resolve() != skip):
                found.append(Path(e.path))
    return sorted(found, key=lambda p: p.name)


def _images(class_dir: Path, folder: Path, exclude: Path | None) -> tuple[list[str], int]:
    """Relative paths (posix, sorted) of the images anywhere under ``class_dir``, and the count of other files."""
    skip = exclude.resolve() if exclude is not None else None
    found, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and Path(dirpath, d).resolve() != skip]
        prefix = Path(dirpath).relative_to(folder).as_posix()
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in image_cache.EXTENSIONS:
                found.append(f"{prefix}/{name}")
            else:
                ignored += 1
    return sorted(found), ignored


def _cpus() -> int:
    """The CPUs this process may use (a Slurm allocation, a taskset), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------ splits


def _carve(labels: np.ndarray, fraction: float, seed: int, key: str, root_setting: str, example: str):
    """Stratified (kept, carved) positions of ``labels``; the refusal names ``key``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ConfigError(f"{key}={fraction} must be a number in (0, 1); use e.g. {key}={example}.")
    try:
        kept, carved = split_train_val(torch.from_numpy(labels), fraction, seed)
    except ConfigError as exc:
        if "leaves no" not in str(exc):
            raise
        part = key.split(".")[1].split("_")[0]
        raise ConfigError(
            f"{key}={fraction} leaves no {part} image out of {len(labels)}; raise {key}, or add {root_setting}/"
            f"{part}/<class>/ folders."
        ) from exc
    return kept.numpy(), carved.numpy()


def _assemble(root_setting, scan: Scan, entry, val_fraction, test_fraction, split_seed, train_size):
    """Train/val/test rows of the cache (folders where present, else carved), their tensors and train statistics;
    and where the split tensors live (:func:`_take`)."""
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise ConfigError(
            f"dataset.split_seed={split_seed} must be a non-negative integer; use e.g. dataset.split_seed=0."
        )
    ok = np.ones(len(scan.rel_paths), dtype=bool)
    ok[[b["index"] for b in entry.bad]] = False
    labels = entry.labels
    pool = np.flatnonzero(ok & (scan.parts == 0))
    if scan.present[2]:
        test = np.flatnonzero(ok & (scan.parts == 2))
    else:
        kept, carved = _carve(
            labels[pool], test_fraction, IMAGEFOLDER_TEST_SEED, "dataset.test_fraction", root_setting, "0.2"
        )
        pool, test = pool[kept], pool[carved]
    if scan.present[1]:
        train_rel, val = np.arange(len(pool)), np.flatnonzero(ok & (scan.parts == 1))
    else:
        train_rel, val_rel = _carve(labels[pool], val_fraction, split_seed, "dataset.val_fraction", root_setting, "0.1")
        val = pool[val_rel]
    if train_size is not None:
        chosen = subset_train(
            torch.from_numpy(train_rel), torch.from_numpy(labels[pool]), train_size, split_seed, root_setting
        )
        train_rel = chosen.numpy()
    train = pool[train_rel]
    lists = {"train_idx": train.tolist(), "val_idx": val.tolist()}
    split = {
        "indices": "rows of the imagefolder cache: the files sorted by part (train, val, test), class, path",
        "layout": scan.layout,
        "val_from": "folder" if scan.present[1] else "val_fraction",
        "test_from": "folder" if scan.present[2] else "test_fraction",
        "val_fraction": None if scan.present[1] else float(val_fraction),
        "test_fraction": None if scan.present[2] else float(test_fraction),
        "split_seed": int(split_seed),
        "train_size": None if train_size is None else int(train_size),
        "num_train": len(train),
        "num_val": len(val),
        "num_test": len(test),
        "skipped": len(entry.bad),
        "cache_key": entry.manifest["key"],
        **lists,
        "test_idx": test.tolist(),
        "sha256": hashlib.sha256(json.dumps(lists, separators=(",", ":")).encode()).hexdigest(),
    }
    (train_x, val_x, test_x), where = _take(entry, [train, val, test])
    mean, std = _train_stats(entry, train, train_x)

    def y(idx):
        return torch.from_numpy(labels[idx].astype(np.int64))

    data = ImageData("imagefolder", train_x, y(train), val_x, y(val), test_x, y(test), scan.classes, mean, std, split)
    return data, where


def ram_budget() -> int:
    """Bytes a split gather may take in RAM: half of what is available now (psutil), else 1 GiB."""
    try:
        import psutil

        return int(psutil.virtual_memory().available // 2)
    except Exception:  # psutil missing or failing in a container: stay modest
        return 1 << 30


def _take(entry, parts: list[np.ndarray]) -> tuple[list[torch.Tensor], str]:
    """Each index set as a uint8 tensor: a view of the mapped cache when its rows are one run, else a gather into
    RAM, or into a mapped file of the cache when the gathers would take more than :func:`ram_budget`."""
    images = entry.images
    row = int(np.prod(images.shape[1:]))
    runs = [len(idx) == 0 or int(idx[-1]) - int(idx[0]) + 1 == len(idx) for idx in parts]
    gathered = sum(len(idx) for idx, run in zip(parts, runs) if not run) * row
    to_disk = gathered > ram_budget()
    out = []
    for idx, run in zip(parts, runs):
        if len(idx) == 0:
            arr = np.zeros((0, *images.shape[1:]), dtype=np.uint8)
        elif run:
            arr = images[int(idx[0]) : int(idx[-1]) + 1]
        else:
            arr = None
            if to_disk:
                name = hashlib.sha256(idx.astype(np.int64).tobytes()).hexdigest()[:24]
                arr = image_cache.gather_to_disk(images, idx, entry.path / "subsets" / f"{name}.npy")
            if arr is None:
                arr = images[idx]
        out.append(torch.from_numpy(arr))
    where = "disk" if to_disk else ("ram" if gathered else "view")
    return out, where


def _train_stats(entry, train: np.ndarray, train_x: torch.Tensor):
    """Per-channel mean/std of the training images, read from the cache entry when an earlier run computed them."""
    path = entry.path / f"stats-{hashlib.sha256(train.astype(np.int64).tobytes()).hexdigest()[:24]}.json"
    found = image_cache.read_json(path)
    if found and len(found.get("mean", ())) == 3 and len(found.get("std", ())) == 3:
        return tuple(found["mean"]), tuple(found["std"])
    chunk = max(1, (1 << 22) // max(1, int(np.prod(train_x.shape[1:]))))  # ~32 MB of float64 per chunk
    mean, std = _channel_stats(train_x, chunk=chunk)
    image_cache.write_json(path, {"mean": list(mean), "std": list(std)})
    return mean, std
