"""``dataset=imagefolder``: a user's own folder of images, decoded once into a uint8 memmap cache.

Two layouts (class names = the sorted class folder names, as torchvision's ImageFolder):

- ``<root>/train/<class>/...`` with optional ``<root>/val/<class>/...`` and ``<root>/test/<class>/...``;
  a split without its folder is carved out of ``train/`` (``val_fraction``, ``test_fraction``);
- ``<root>/<class>/...``: test and validation are carved out of it, class shares kept.

Files ending in .jpg, .jpeg, .png or .webp (any case) are images, searched recursively inside each class folder;
other files and anything whose name starts with a dot are ignored. Symbolic links are followed (a root or class
folder may live elsewhere) and each real file is counted once: a loop such as ``cat/again -> .`` adds nothing, and
a link that leads to the root, a split folder or another class folder, or an image reached from two class folders,
is refused in one sentence naming the link (:mod:`stackwise_bench.data.folder_walk`). A link that leads to nothing
is a bad file: refused, or left out with ``skip_bad``. The first load decodes every image
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
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stackwise_bench.data import image_cache
from stackwise_bench.data.folder_walk import FolderWalk
from stackwise_bench.data.splits import ImageData, _channel_stats, split_train_val, subset_train
from stackwise_bench.errors import ConfigError
from stackwise_bench.values import is_int, is_number

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
    broken: list[dict] = field(default_factory=list)  # {"path", "error"}: links that lead to nothing


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
    if scan.broken and not skip_bad:  # before any decoding
        raise _broken_links(root, scan.broken)
    key = image_cache.cache_key(folder, scan.rel_paths, size)
    entry = image_cache.open_or_build(
        cache, "null" if cache_dir is None else str(cache_dir), folder, scan.rel_paths, scan.labels, size, threads, key
    )
    skipped = _left_out(root, scan.broken, entry.bad, skip_bad)
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
        "skipped": {"count": len(skipped), "files": skipped[:20]},
    }
    return data


def _broken_links(root_setting: str, broken: list[dict]) -> ConfigError:
    """The refusal of links that lead to nothing (``dataset.skip_bad=false``)."""
    if len(broken) == 1:
        return ConfigError(
            f"dataset.root={root_setting}: {broken[0]['path']} is {broken[0]['error']}; fix or delete the link, or set "
            "dataset.skip_bad=true to leave it out."
        )
    first = ", ".join(b["path"] for b in broken[:3]) + (", ..." if len(broken) > 3 else "")
    return ConfigError(
        f"dataset.root={root_setting}: {len(broken)} links lead to nothing ({first}: their targets do not exist, or "
        "loop); fix or delete them, or set dataset.skip_bad=true to leave them out."
    )


def _left_out(root_setting: str, broken: list[dict], bad: list[dict], skip_bad: bool) -> list[dict]:
    """``{"path", "error"}`` of the files left out (broken links, then files that could not be decoded), said in a
    warning; undecodable files are refused instead without ``dataset.skip_bad``."""
    if bad and not skip_bad:
        first = ", ".join(b["path"] for b in bad[:3]) + (", ..." if len(bad) > 3 else "")
        them = "them" if len(bad) > 1 else "it"
        raise ConfigError(
            f"dataset.root={root_setting}: {len(bad)} image file{'s' if len(bad) > 1 else ''} could not be decoded "
            f"({first}); delete or replace {them}, or set dataset.skip_bad=true to leave {them} out."
        )
    skipped = [{"path": b["path"], "error": b["error"]} for b in [*broken, *bad]]
    if skipped:
        log.warning(
            "dataset.skip_bad=true: leaving out %d file(s) that could not be read or decoded: %s",
            len(skipped),
            "; ".join(f"{b['path']} ({b['error']})" for b in skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
        )
    return skipped


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
    rel_paths, labels, parts, ignored, broken = _walk(folder, root_setting, bases, classes, exclude)
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
        broken,
    )


def _walk(folder: Path, root_setting: str, bases: list[tuple[int, Path]], classes: list[str], exclude: Path | None):
    """(relative paths, labels, parts, count of other files, broken links) of the class folders of ``bases``."""
    index = {name: i for i, name in enumerate(classes)}
    walk = FolderWalk(folder, root_setting, exclude)
    class_dirs = [(part, base, _subdirs(base, exclude)) for part, base in bases]
    for part, base, dirs in class_dirs:  # every split and class folder, before a link can lead a walk into one
        if base != folder:
            walk.reserve(base, f"the {PARTS[part]}/ folder")
        for class_dir in dirs:
            walk.reserve(class_dir, f"the class folder {class_dir.relative_to(folder).as_posix()}")
    rel_paths, labels, parts, ignored = [], [], [], 0
    for part, _, dirs in class_dirs:
        for class_dir in dirs:
            where = class_dir.relative_to(folder).as_posix()
            if class_dir.name not in index:
                raise ConfigError(
                    f"dataset.root={root_setting}: {where} is a class that train/ does not have; add "
                    f"train/{class_dir.name} with training images, or remove {where}."
                )
            found, skipped = walk.images(class_dir)
            ignored += skipped
            if not found and part == 0:
                raise ConfigError(
                    f"dataset.root={root_setting}: the class folder {where} has no {KINDS} images; add some, or "
                    "remove the folder."
                )
            rel_paths += found
            labels += [index[class_dir.name]] * len(found)
            parts += [part] * len(found)
    return rel_paths, labels, parts, ignored, walk.broken


def _subdirs(folder: Path, exclude: Path | None) -> list[Path]:
    skip = exclude.resolve() if exclude is not None else None
    found = []
    with os.scandir(folder) as entries:
        for e in entries:
            if not e.name.startswith(".") and e.is_dir() and (skip is None or Path(e.path).resolve() != skip):
                found.append(Path(e.path))
    return sorted(found, key=lambda p: p.name)


def _cpus() -> int:
    """The CPUs this process may use (a Slurm allocation, a taskset), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------ splits


def _carve(labels: np.ndarray, fraction: float, seed: int, key: str, root_setting: str, example: str):
    """Stratified (kept, carved) positions of ``labels``; the refusal names ``key``."""
    if not is_number(fraction) or not 0.0 < fraction < 1.0:
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
    if not is_int(split_seed) or split_seed < 0:
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
        # which file and label each row is: a resume compares them file by file (splits.check_resumed_split)
        "classes": list(scan.classes),
        "files": list(scan.rel_paths),
        "labels": labels.tolist(),
    }
    (train_x, val_x, test_x), where = _take(entry, [train, val, test])
    mean, std = _train_stats(entry, train, train_x)

    def y(idx):
        return torch.from_numpy(labels[idx].astype(np.int64))

    data = ImageData("imagefolder", train_x, y(train), val_x, y(val), test_x, y(test), scan.classes, mean, std, split)
    return data, where


def _three_numbers(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


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
    found = image_cache.read_json(path) or {}
    if all(_three_numbers(found.get(k)) for k in ("mean", "std")):  # else none yet, or damaged: computed again
        return tuple(found["mean"]), tuple(found["std"])
    chunk = max(1, (1 << 22) // max(1, int(np.prod(train_x.shape[1:]))))  # ~32 MB of float64 per chunk
    mean, std = _channel_stats(train_x, chunk=chunk)
    image_cache.write_json(path, {"mean": list(mean), "std": list(std)})
    return mean, std
