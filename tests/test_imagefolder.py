"""dataset=imagefolder: users' own image folders, decoded once into a uint8 memmap cache.

Each test writes a tiny folder (PNG, JPEG, WebP; a grey and an RGBA image; non-square sizes) with PIL.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from stackwise_bench.data import BatchLoader, ImageData, image_cache, load_imagefolder
from stackwise_bench.data import imagefolder as imagefolder_module
from stackwise_bench.data.imagefolder import scan_folder
from stackwise_bench.errors import ConfigError

from conftest import CONF, compose, read_summary

# torchvision 0.29 deprecates torchvision.io's decoders (for TorchCodec); the reference below uses them too
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

CLASSES = ["Ant", "mole", "zebra"]  # sorted; written in another order below
PER_CLASS = 10


def _pattern(rng, h: int, w: int, mode: str = "RGB") -> Image.Image:
    base = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)  # a smooth colour pattern plus noise
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR), dtype=np.int16)
    img = np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    out = Image.fromarray(img)
    return out.convert(mode) if mode != "RGB" else out


def write_class(folder: Path, name: str, n: int, rng) -> None:
    """``n`` images of one class: a square PNG, grey and RGBA PNGs, JPEGs (one .JPG), a WebP, a nested PNG."""
    d = folder / name
    d.mkdir(parents=True)
    for i in range(n):
        h, w = 30 + 2 * i, 44 - i  # non-square: the shorter side is resized, the long one cropped
        if i == 0:
            _pattern(rng, 32, 32).save(d / "a_square.png")  # already 32x32: cached as it is
        elif i == 1:
            _pattern(rng, h, w, "L").save(d / "grey.png")
        elif i == 2:
            _pattern(rng, h, w, "RGBA").save(d / "alpha.png")
        elif i == 3:
            _pattern(rng, h, w).save(d / "photo.webp", quality=90)
        elif i == 4:
            (d / "sub").mkdir()
            _pattern(rng, h, w).save(d / "sub" / "deep.png")
        elif i == 5:
            _pattern(rng, h, w).save(d / "UPPER.JPG", format="JPEG", quality=90)
        else:
            _pattern(rng, h, w).save(d / f"img{i}.jpg", quality=90)
    (d / "notes.txt").write_text("not an image")  # ignored: extension
    (d / ".hidden.jpg").write_bytes(b"not even an image")  # ignored: a dot file (macOS ._ forks, .DS_Store)


def write_folder(root: Path, layout: str = "classes", bad: int = 0, per_class: int = PER_CLASS, seed: int = 0):
    """``root/<class>/...``, or ``root/{train,val,test}/<class>/...``; ``bad`` corrupt files in the first class."""
    rng = np.random.default_rng(seed)
    parts = {"classes": {"": per_class}, "split": {"train": per_class, "val": 3, "test": 4}}[layout]
    for part, n in parts.items():
        for name in reversed(CLASSES):
            write_class(root / part, name, n, rng)
    for i in range(bad):
        (root / next(iter(parts)) / CLASSES[0] / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff truncated")
    return root


def reference(path: Path, size: int = 32) -> torch.Tensor:
    """What a file must be in the cache, decoded and resized here independently of the cache code."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF

    img = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    return TF.center_crop(TF.resize(img, [size], antialias=True), [size, size])


@pytest.fixture
def decodes(monkeypatch):
    """The files the cache decodes, counted (thread-safe)."""
    seen, lock, decode = [], threading.Lock(), image_cache.decode_file

    def counting(path, size):
        with lock:
            seen.append(Path(path).name)
        return decode(path, size)

    monkeypatch.setattr(image_cache, "decode_file", counting)
    return seen


def rows(data: ImageData, root: Path):
    """(tensor, label, file) of every image of every split, the file found through split.json's cache rows."""
    files = scan_folder(root, str(root)).rel_paths
    for x, y, key in ((data.train_x, data.train_y, "train_idx"), (data.val_x, data.val_y, "val_idx")):
        yield from zip(x, y, (files[i] for i in data.split[key]))
    yield from zip(data.test_x, data.test_y, (files[i] for i in data.split["test_idx"]))


# --- decoding and the cache ------------------------------------------------------------------------------------------


def test_cached_pixels_equal_the_decoded_files(tmp_path):
    root = write_folder(tmp_path / "imgs")
    data = load_imagefolder(str(root))
    assert data.classes == CLASSES and data.name == "imagefolder"
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape[1:] == (3, 32, 32)
    seen = 0
    for x, y, rel in rows(data, root):
        assert torch.equal(x, reference(root / rel)), rel
        assert rel.split("/")[0] == data.classes[y]
        name = Path(rel).name
        if name == "a_square.png":  # no resize at 32x32: PIL's own pixels, exactly
            assert np.array_equal(x.permute(1, 2, 0).numpy(), np.asarray(Image.open(root / rel)))
        elif name == "grey.png":  # replicated to RGB
            assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
        seen += 1
    assert seen == len(CLASSES) * PER_CLASS  # the .txt and the dot file are not images
    assert data.split["num_train"] + data.split["num_val"] + data.split["num_test"] == seen
    rgba = Image.open(root / "mole" / "alpha.png")
    cropped = reference(root / "mole" / "alpha.png")
    assert rgba.mode == "RGBA" and cropped.shape == (3, 32, 32)  # the alpha channel dropped


def test_the_cache_is_built_once_and_reused(tmp_path, decodes):
    root = write_folder(tmp_path / "imgs")
    first = load_imagefolder(str(root))
    assert len(decodes) == len(CLASSES) * PER_CLASS and first.notes["cache"]["built"] is True
    second = load_imagefolder(str(root))
    assert len(decodes) == len(CLASSES) * PER_CLASS  # the second load decoded nothing
    assert second.notes["cache"]["built"] is False and second.notes["cache"]["key"] == first.notes["cache"]["key"]
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert (first.mean, first.std, first.split) == (second.mean, second.std, second.split)
    entries = [p for p in (root / ".stackwise_cache").iterdir() if not p.name.startswith(".")]
    assert [p.name[:5] for p in entries] == ["32px-"] and (entries[0] / "images.npy").is_file()
    load_imagefolder(str(root), img_size=16)  # another size is another cache
    assert len(decodes) == 2 * len(CLASSES) * PER_CLASS


def test_a_changed_or_added_file_rebuilds_the_cache(tmp_path, decodes):
    root = write_folder(tmp_path / "imgs")
    before = load_imagefolder(str(root), cache_dir=str(tmp_path / "cache"))
    target = root / "zebra" / "img7.jpg"
    stat = target.stat()
    _pattern(np.random.default_rng(99), 40, 40).save(target, quality=90)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    n = len(decodes)
    after = load_imagefolder(str(root), cache_dir=str(tmp_path / "cache"))
    assert len(decodes) == 2 * n and after.notes["cache"]["key"] != before.notes["cache"]["key"]
    changed = [x for x, _, rel in rows(after, root) if rel == "zebra/img7.jpg"]
    assert torch.equal(changed[0], reference(target))
    _pattern(np.random.default_rng(7), 33, 33).save(root / "mole" / "new.png")
    added = load_imagefolder(str(root), cache_dir=str(tmp_path / "cache"))
    assert len(decodes) == 3 * n + 1 and added.notes["num_files"] == n + 1
    (root / "mole" / "new.png").unlink()
    assert (
        load_imagefolder(str(root), cache_dir=str(tmp_path / "cache")).notes["cache"]["key"]
        == (
            after.notes["cache"]["key"]  # back to the files of `after`: its cache, no decoding
        )
    )
    assert len(decodes) == 3 * n + 1


def test_concurrent_builds_leave_one_valid_cache(tmp_path, decodes, monkeypatch):
    """Two builders at once without the lock (a file system without flock): both decode, one entry is kept."""
    root = write_folder(tmp_path / "imgs")
    both_building = threading.Barrier(2, timeout=30)
    decode = image_cache.decode_file

    def meet_then_decode(path, size):
        if threading.current_thread().name.endswith("_0") and not getattr(local, "met", False):
            local.met = True
            both_building.wait()  # each builder's first file: both are inside their build now
        return decode(path, size)

    local = threading.local()
    monkeypatch.setattr(image_cache, "decode_file", meet_then_decode)
    monkeypatch.setattr(image_cache, "cache_lock", lambda path, what: contextlib.nullcontext())
    results, errors = [None, None], []

    def build(i):
        try:
            results[i] = load_imagefolder(str(root), workers=1)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(decodes) == 2 * len(CLASSES) * PER_CLASS  # both built
    cache = root / ".stackwise_cache"
    assert [p.name[:5] for p in cache.iterdir() if not p.name.startswith(".")] == ["32px-"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".build-")]  # the loser cleaned up
    again = load_imagefolder(str(root))
    assert again.notes["cache"]["built"] is False and len(decodes) == 2 * len(CLASSES) * PER_CLASS
    for r in results:
        assert torch.equal(r.train_x, again.train_x) and torch.equal(r.test_x, again.test_x)


def test_concurrent_builds_with_the_lock_decode_once(tmp_path, decodes):
    root = write_folder(tmp_path / "imgs")
    results = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, load_imagefolder(str(root)))) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(decodes) == len(CLASSES) * PER_CLASS  # the second waited for the first, then mapped its cache
    assert sorted(r.notes["cache"]["built"] for r in results) == [False, True]
    assert torch.equal(results[0].train_x, results[1].train_x)


# --- bad files -------------------------------------------------------------------------------------------------------


def test_a_corrupt_file_is_refused_in_one_sentence(tmp_path):
    root = write_folder(tmp_path / "imgs", bad=1)
    with pytest.raises(ConfigError) as info:
        load_imagefolder(str(root))
    assert str(info.value) == (
        f"dataset.root={root}: 1 image file could not be decoded (Ant/broken0.jpg); delete or replace it, or set "
        "dataset.skip_bad=true to leave it out."
    )
    four = write_folder(tmp_path / "four", bad=4)
    with pytest.raises(ConfigError) as info:
        load_imagefolder(str(four))
    assert str(info.value) == (
        f"dataset.root={four}: 4 image files could not be decoded (Ant/broken0.jpg, Ant/broken1.jpg, "
        "Ant/broken2.jpg, ...); delete or replace them, or set dataset.skip_bad=true to leave them out."
    )


def test_skip_bad_leaves_corrupt_files_out_and_says_which(tmp_path, decodes):
    root = write_folder(tmp_path / "imgs", bad=2)
    with pytest.raises(ConfigError):
        load_imagefolder(str(root))
    n = len(decodes)
    data = load_imagefolder(str(root), skip_bad=True)
    assert decodes[n:] == ["broken0.jpg", "broken1.jpg"]  # the refused load built the cache; only they are retried
    skipped = data.notes["skipped"]
    assert skipped["count"] == 2 and [f["path"] for f in skipped["files"]] == ["Ant/broken0.jpg", "Ant/broken1.jpg"]
    assert all(f["error"] for f in skipped["files"]) and data.split["skipped"] == 2
    assert len(data.train_y) + len(data.val_y) + len(data.test_y) == len(CLASSES) * PER_CLASS
    assert all("broken" not in rel for _, _, rel in rows(data, root))


def test_a_file_that_decodes_again_is_recovered_without_a_rebuild(tmp_path, monkeypatch, decodes):
    """A file unreadable while the cache was built (a permission fixed with chmod keeps size and mtime, so the key)."""
    root = write_folder(tmp_path / "imgs")
    decode = image_cache.decode_file

    def unreadable(path, size):
        if Path(path).name == "img8.jpg" and Path(path).parent.name == "mole":
            raise RuntimeError("read_file, /x/read_write_file.cpp:78, [Errno 13] Permission denied: 'img8.jpg'")
        return decode(path, size)

    monkeypatch.setattr(image_cache, "decode_file", unreadable)
    with pytest.raises(ConfigError, match=r"1 image file could not be decoded \(mole/img8\.jpg\)"):
        load_imagefolder(str(root))
    monkeypatch.setattr(image_cache, "decode_file", decode)
    n = len(decodes)
    data = load_imagefolder(str(root))  # readable again: decoded now, the cache patched in place
    assert data.notes["skipped"]["count"] == 0 and data.notes["cache"]["built"] is False and decodes[n:] == ["img8.jpg"]
    assert [x for x, _, rel in rows(data, root) if rel == "mole/img8.jpg"][0].equal(reference(root / "mole/img8.jpg"))
    monkeypatch.setattr(image_cache, "decode_file", lambda *a: pytest.fail("decoded again"))
    assert load_imagefolder(str(root)).notes["skipped"]["count"] == 0  # the manifest was updated


def test_a_link_that_leads_to_nothing_is_a_bad_file_named_by_path(tmp_path):
    root = write_folder(tmp_path / "imgs")
    (root / "mole" / "gone.jpg").symlink_to(tmp_path / "moved" / "gone.jpg")
    with pytest.raises(ConfigError) as info:
        load_imagefolder(str(root))
    assert str(info.value) == (
        f"dataset.root={root}: mole/gone.jpg is a link to {tmp_path / 'moved' / 'gone.jpg'}, which does not exist; "
        "fix or delete the link, or set dataset.skip_bad=true to leave it out."
    )
    assert not (root / ".stackwise_cache").exists()  # refused before any decoding
    data = load_imagefolder(str(root), skip_bad=True)
    assert data.notes["skipped"] == {
        "count": 1,
        "files": [
            {"path": "mole/gone.jpg", "error": f"a link to {tmp_path / 'moved' / 'gone.jpg'}, which does not exist"}
        ],
    }
    assert len(data.train_y) + len(data.val_y) + len(data.test_y) == len(CLASSES) * PER_CLASS


# --- links -----------------------------------------------------------------------------------------------------------


def test_links_are_followed_and_each_file_is_counted_once(tmp_path):
    """A class folder that lives elsewhere (a cluster's data disk) works; a loop inside it and a second name for an
    image add nothing, so no image is in two splits."""
    root = write_folder(tmp_path / "imgs")
    (tmp_path / "disk").mkdir()
    (root / "zebra").rename(tmp_path / "disk" / "zebra")
    (root / "zebra").symlink_to(tmp_path / "disk" / "zebra")
    (root / "Ant" / "again").symlink_to(".")  # ln -s . Ant/again: followed 40 levels deep before
    (root / "zebra" / "sub" / "up").symlink_to("..")
    (root / "mole" / "0_copy.jpg").symlink_to("img7.jpg")  # sorts first: the real file keeps its own name
    linked_root = tmp_path / "linked"
    linked_root.symlink_to(root)
    data = load_imagefolder(str(linked_root))
    files = scan_folder(linked_root, str(linked_root)).rel_paths
    assert data.notes["num_files"] == len(files) == len(CLASSES) * PER_CLASS
    assert "mole/img7.jpg" in files and not [f for f in files if "again" in f or "/up/" in f or "copy" in f]
    real = [
        os.path.realpath(linked_root / files[i])
        for key in ("train_idx", "val_idx", "test_idx")
        for i in data.split[key]
    ]
    assert len(real) == len(set(real)) == len(files)  # every real image once, in one split
    for x, _, rel in rows(data, linked_root):
        assert torch.equal(x, reference(linked_root / rel)), rel


def test_a_link_out_of_its_class_folder_is_refused(tmp_path):
    """A link to the root, to another class folder or to one of its images would label other classes' images as
    this one (top-1 98% beside a macro F1 of 33% before)."""
    root = write_folder(tmp_path / "imgs")
    cases = [
        (root / "Ant" / "up", "..", f"the link Ant/up leads to the image folder itself ({root})"),
        (
            root / "Ant" / "sub" / "moles",
            "../../mole",
            f"the link Ant/sub/moles leads to the class folder mole ({root / 'mole'})",
        ),
        (
            root / "Ant" / "top",
            str(tmp_path),
            f"the link Ant/top leads to {tmp_path}, a folder that holds the image folder",
        ),
    ]
    for link, target, says in cases:
        link.symlink_to(target)
        with pytest.raises(ConfigError) as info:
            load_imagefolder(str(root))
        assert str(info.value) == (
            f"dataset.root={root}: {says}, so images of other classes or splits would be counted again as Ant; remove "
            "the link, or replace it by the images it should add."
        )
        link.unlink()
    (root / "Ant" / "zz.jpg").symlink_to("../mole/img7.jpg")
    with pytest.raises(ConfigError) as info:
        load_imagefolder(str(root))
    assert str(info.value) == (
        f"dataset.root={root}: mole/img7.jpg and Ant/zz.jpg are the same image file ({root / 'mole' / 'img7.jpg'}, "
        "reached through a link), so it would be in two class folders or splits; remove the link."
    )
    assert not (root / ".stackwise_cache").exists()


def test_a_dead_builders_leftover_is_removed_by_the_next_build(tmp_path, caplog):
    """kill -9 mid-build left its .build-* folder forever; a live builder's, or another host's, is left alone."""
    import socket
    import subprocess
    import sys

    root = write_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now

    def leftover(pid: int, owner: dict | None, tag: str) -> Path:
        folder = cache / f".build-32px-{'0' * 24}-{pid}-140000000000-{tag * 8}"  # as _build names them
        folder.mkdir(parents=True)
        (folder / "images.npy").write_bytes(b"\0" * 4096)  # a half-written cache
        if owner is not None:
            (folder / "owner.json").write_text(json.dumps(owner))
        return folder

    here = socket.gethostname()
    killed = leftover(dead.pid, {"host": here, "pid": dead.pid}, "a")
    older = leftover(dead.pid, None, "b")  # no owner.json (an earlier version): the pid in its name
    live = leftover(os.getpid(), {"host": here, "pid": os.getpid()}, "c")
    remote = leftover(dead.pid, {"host": f"not-{here}", "pid": dead.pid}, "d")
    with caplog.at_level("INFO", logger="stackwise_bench.data"):
        data = load_imagefolder(str(root), cache_dir=str(cache))
    assert data.notes["cache"]["built"] is True
    assert not killed.exists() and not older.exists() and live.exists() and remote.exists()
    assert f"removing {killed}, left by a build (pid {dead.pid}) that ended before it finished" in caplog.text
    assert not (Path(data.notes["cache"]["path"]) / "owner.json").exists()  # the finished entry holds no owner


@pytest.mark.parametrize(
    "damage",
    [
        ("manifest.json", lambda p: p.write_text("[1]\n"), "manifest.json is not a version 1 cache manifest"),
        ("images.npy", lambda p: p.write_bytes(b""), "images.npy cannot be read: No data left in file"),
        (
            "images.npy",
            lambda p: np.savez(p.with_suffix(""), x=np.zeros(3)) or p.with_suffix(".npz").replace(p),
            "images.npy is not a single array",
        ),
        ("labels.npy", lambda p: np.save(p, np.load(p)[::-1].copy()), "labels.npy does not match the class folders"),
    ],
    ids=["manifest-not-a-dict", "images-empty", "images-npz", "labels-other"],
)
def test_a_damaged_cache_entry_is_rebuilt_and_named(tmp_path, caplog, damage):
    name, spoil, says = damage
    root = write_folder(tmp_path / "imgs")
    first = load_imagefolder(str(root))
    entry = Path(first.notes["cache"]["path"])
    shutil.copyfile(entry / name, entry / "copy")
    (entry / "copy").replace(entry / name)  # spoil a new file: truncating the one `first` maps would be a SIGBUS
    spoil(entry / name)
    with caplog.at_level("WARNING", logger="stackwise_bench.data"):
        again = load_imagefolder(str(root))
    assert f"the image cache {entry} is damaged ({says}" in caplog.text
    assert again.notes["cache"]["built"] is True  # rebuilt, not a traceback, nor wrong labels
    for a, b in ((first.train_x, again.train_x), (first.train_y, again.train_y), (first.test_y, again.test_y)):
        assert torch.equal(a, b)
    assert not [p for p in entry.parent.iterdir() if p.name.startswith((".damaged-", ".build-"))]


def test_damaged_derived_files_of_an_entry_are_computed_again(tmp_path, monkeypatch):
    """A split's statistics file and a subset file of the cache, garbage or empty: recomputed, not a traceback."""
    root = write_folder(tmp_path / "imgs")
    monkeypatch.setattr(imagefolder_module, "ram_budget", lambda: 0)
    first = load_imagefolder(str(root))
    entry = Path(first.notes["cache"]["path"])
    for stats in entry.glob("stats-*.json"):
        stats.write_text('{"mean": "abc", "std": "xyz"}')
    for subset in (entry / "subsets").glob("*.npy"):
        subset.unlink()  # then a new, empty file: truncating the one `first` maps would be a SIGBUS
        subset.write_bytes(b"")
    again = load_imagefolder(str(root))
    assert (again.mean, again.std) == (first.mean, first.std) and torch.equal(again.train_x, first.train_x)


# --- layouts and splits ----------------------------------------------------------------------------------------------


def test_single_folder_is_split_with_class_shares_kept(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=20)
    data = load_imagefolder(str(root), val_fraction=0.1, test_fraction=0.2)
    assert data.notes["layout"] == "class folders" and data.split["val_from"] == "val_fraction"
    for y, per_class in ((data.test_y, 4), (data.val_y, 2), (data.train_y, 14)):  # 20 -> 4 test; 16 -> 2 val
        assert torch.bincount(y, minlength=3).tolist() == [per_class] * 3
    assert not set(data.split["train_idx"]) & set(data.split["val_idx"])
    assert not set(data.split["train_idx"] + data.split["val_idx"]) & set(data.split["test_idx"])
    other = load_imagefolder(str(root), split_seed=1)
    assert other.split["test_idx"] == data.split["test_idx"]  # the test split never follows split_seed
    assert other.split["val_idx"] != data.split["val_idx"]
    small = load_imagefolder(str(root), train_size=6)
    assert torch.bincount(small.train_y).tolist() == [2, 2, 2] and set(small.split["train_idx"]) <= set(
        data.split["train_idx"]
    )


def test_train_val_test_folders_are_used_as_they_are(tmp_path):
    root = write_folder(tmp_path / "imgs", layout="split")
    data = load_imagefolder(str(root))
    assert data.classes == CLASSES and data.notes["layout"] == "train/val/test"
    assert (data.split["val_from"], data.split["test_from"]) == ("folder", "folder")
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (30, 9, 12)
    assert data.notes["cache"]["splits_in"] == "view"  # contiguous runs of the cache: nothing copied
    for _, y, rel in rows(data, root):
        part, cls = rel.split("/")[:2]
        assert data.classes[y] == cls
    assert {rel.split("/")[0] for _, _, rel in rows(data, root)} == {"train", "val", "test"}
    shutil.rmtree(root / "test")  # without test/: carved out of train/ (val/ still used)
    carved = load_imagefolder(str(root), test_fraction=0.2)
    assert (carved.split["test_from"], len(carved.test_y), len(carved.val_y)) == ("test_fraction", 6, 9)


def test_layout_refusals(tmp_path):
    root = write_folder(tmp_path / "split", layout="split", per_class=2)
    (root / "val" / "whale").mkdir()
    _pattern(np.random.default_rng(0), 32, 32).save(root / "val" / "whale" / "w.png")
    with pytest.raises(ConfigError) as info:
        load_imagefolder(str(root))
    assert str(info.value) == (
        f"dataset.root={root}: val/whale is a class that train/ does not have; add train/whale with training "
        "images, or remove val/whale."
    )
    only_val = tmp_path / "only_val"
    write_class(only_val / "val", "cat", 2, np.random.default_rng(0))
    with pytest.raises(ConfigError) as info:
        load_imagefolder(str(only_val))
    assert str(info.value) == (
        f"dataset.root={only_val} has val/ but no train/ folder; put the training images in {only_val}/train/<class>/,"
        " or use one folder per class without val/ and test/."
    )
    one = tmp_path / "one"
    write_class(one, "cat", 3, np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"has one class folder \(cat\) and a classifier needs two or more"):
        load_imagefolder(str(one))
    (one / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"the class folder empty has no \.jpg, \.jpeg, \.png or \.webp images"):
        load_imagefolder(str(one))
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(ConfigError, match=r"has no class folders with \.jpg, \.jpeg, \.png or \.webp images"):
        load_imagefolder(str(nothing))


def test_root_refusals(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_imagefolder(None)
    assert str(info.value) == (
        "dataset.root=null: dataset=imagefolder needs the folder of your images; set dataset.root=/path/to/images "
        "(laid out as <root>/<class>/<image> or <root>/train/<class>/<image>)."
    )
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError) as info:
        load_imagefolder(str(missing))
    assert str(info.value) == (
        f"dataset.root={missing} is not a folder ({missing.resolve()} does not exist); set dataset.root to the "
        "folder of your images, laid out as <root>/<class>/<image> or <root>/train/<class>/<image>."
    )
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"is not a folder \(.*file is a file\)"):
        load_imagefolder(str(tmp_path / "file"))


def test_unwritable_cache_dir_is_refused(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    with pytest.raises(ConfigError) as info:
        load_imagefolder(str(root), cache_dir=str(tmp_path / "blocker" / "cache"))
    message = str(info.value)
    assert message.startswith(f"dataset.cache_dir={tmp_path / 'blocker' / 'cache'} cannot be written (")
    assert message.endswith("); point dataset.cache_dir at a writable folder (the decoded images are cached there).")


# --- memory ----------------------------------------------------------------------------------------------------------


def test_splits_larger_than_ram_are_gathered_into_mapped_files(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "imgs")
    in_ram = load_imagefolder(str(root))
    assert in_ram.notes["cache"]["splits_in"] == "ram"
    monkeypatch.setattr(imagefolder_module, "ram_budget", lambda: 0)
    on_disk = load_imagefolder(str(root))
    assert on_disk.notes["cache"]["splits_in"] == "disk"
    subsets = Path(on_disk.notes["cache"]["path"]) / "subsets"
    assert len(list(subsets.glob("*.npy"))) == 3  # train, val and test are each scattered rows of the cache
    for a, b in ((in_ram.train_x, on_disk.train_x), (in_ram.val_x, on_disk.val_x), (in_ram.test_x, on_disk.test_x)):
        assert torch.equal(a, b)
    assert (in_ram.mean, in_ram.std) == (on_disk.mean, on_disk.std)


def test_a_mapped_set_trains_through_the_batch_loader(tmp_path, monkeypatch):
    """A memory-mapped training set (a view of the cache) feeds BatchLoader like an in-memory one, bit for bit."""
    root = write_folder(tmp_path / "imgs", layout="split")
    data = load_imagefolder(str(root))
    assert data.notes["cache"]["splits_in"] == "view"
    mapped = BatchLoader(data.train_x, data.train_y, 8, mean=data.mean, std=data.std, shuffle=True, seed=3)
    plain = BatchLoader(data.train_x.clone(), data.train_y, 8, mean=data.mean, std=data.std, shuffle=True, seed=3)
    assert mapped.x.data_ptr() == data.train_x.data_ptr()  # not copied
    for (xa, ya), (xb, yb) in zip(mapped.epoch(1), plain.epoch(1)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.gpu
def test_a_mapped_set_stays_on_the_host_with_data_on_device_false(tmp_path):
    root = write_folder(tmp_path / "imgs", layout="split")
    data = load_imagefolder(str(root))
    host = BatchLoader(data.train_x, data.train_y, 8, device="cuda", on_device=False, shuffle=True)
    assert host.x.data_ptr() == data.train_x.data_ptr()  # neither pinned nor copied whole
    device = BatchLoader(data.train_x, data.train_y, 8, device="cuda", shuffle=True)
    for (xa, ya), (xb, yb) in zip(host.epoch(0), device.epoch(0)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --- config and a run ------------------------------------------------------------------------------------------------


def test_yaml_keys_bind_to_the_loader():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "dataset" / "imagefolder.yaml"))
    assert cfg.pop("_target_") == "stackwise_bench.data.load_imagefolder"
    inspect.signature(load_imagefolder).bind(**cfg)
    assert cfg["root"] is None and cfg["cache_dir"] is None and cfg["skip_bad"] is False


def test_a_run_trains_on_the_folder_and_records_it(tmp_path):
    from stackwise_bench.train import run

    root = write_folder(tmp_path / "imgs", bad=1)
    overrides = ["dataset=imagefolder", f"dataset.root={root}", "dataset.skip_bad=true", "trainer.max_epochs=1"]
    summary = run(compose([*overrides, "trainer.batch_size=8", "monitors=none"]), tmp_path / "run")
    assert summary["status"] == "completed", summary.get("error")
    assert len(summary["test"]["confusion_matrix"]) == len(CLASSES)
    assert '"layout": "class folders"' in (tmp_path / "run" / "split.json").read_text()
    assert summary["data"]["classes"] == sorted(CLASSES)  # the confusion matrix's labels
    assert summary["data"]["skipped"]["count"] == 1  # skip_bad: left out, and said so in the record
    refused = tmp_path / "refused"
    with pytest.raises(ConfigError, match=r"^dataset\.root=null: dataset=imagefolder needs the folder"):
        run(compose(["dataset=imagefolder", "trainer.max_epochs=1"]), refused)
    assert read_summary(refused)["error"]["reason"] == "config"


@pytest.mark.slow
def test_a_resume_after_a_class_folder_was_added_says_which(tmp_path, monkeypatch):
    """Refused before, as a "corrupt" last.pt (its classifier has 3 outputs): now it names the class folder."""
    import signal

    from test_train import signal_at_step

    from stackwise_bench.train import run

    root = write_folder(tmp_path / "imgs")
    overrides = ["dataset=imagefolder", f"dataset.root={root}", "trainer.max_epochs=2", "trainer.batch_size=8"]
    signal_at_step(monkeypatch, signal.SIGINT, at=2)
    assert run(compose(overrides), tmp_path / "run")["status"] == "interrupted"
    split = (tmp_path / "run" / "split.json").read_text()
    write_class(root, "whale", PER_CLASS, np.random.default_rng(5))
    with pytest.raises(ConfigError) as info:
        run(compose([*overrides, "trainer.resume=true"]), tmp_path / "run")
    assert "class folder added: whale (the model was built for 3 classes: Ant, mole, zebra)" in str(info.value)
    assert (tmp_path / "run" / "split.json").read_text() == split
