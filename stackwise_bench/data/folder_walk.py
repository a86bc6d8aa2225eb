"""The walk of an image folder's class folders: links followed, each real folder and file read once.

Symbolic links are followed wherever they point (a class folder or the root may live elsewhere, as on clusters),
with three rules so that a link never multiplies or mislabels images:

- a folder or file reached twice within one class folder (a loop such as ``cat/again -> .``, a second name for an
  image) is read once, under its real location when the walk reaches that too;
- a link that leads to the root, to a folder holding it, to a ``train/``/``val/``/``test/`` folder or to another
  class folder is refused in one sentence naming the link: its images would be counted again under this class;
- a folder or image reached from two class folders (or two splits) is refused, naming both paths.

A link that leads to nothing (its target is gone, or a loop of links) is a bad file: :class:`FolderWalk` lists it
in ``broken`` and the loader refuses it, or leaves it out with ``dataset.skip_bad=true``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from stackwise_bench.data.image_cache import EXTENSIONS
from stackwise_bench.errors import ConfigError


class FolderWalk:
    """The class folders of one image folder, walked one by one with what earlier walks saw (to refuse overlaps)."""

    def __init__(self, folder: Path, root_setting: str, exclude: Path | None = None) -> None:
        self.folder, self.setting = folder, root_setting
        self.real_root = os.path.realpath(folder)
        self.skip = os.path.realpath(exclude) if exclude is not None else None
        self.reserved: dict[tuple[int, int], str] = {}  # the root, its split and class folders -> what they are
        self.folders: dict[tuple[int, int], tuple[str, str]] = {}  # folder walked -> (class folder, path it had)
        self.files: dict[str, tuple[str, str, bool]] = {}  # real path -> (class folder, path, reached by a link)
        self.broken: list[dict] = []  # {"path", "error"} of links that lead to nothing
        self._class: tuple[str, tuple[int, int], str] = ("", (0, 0), "")  # the class folder walked: path, id, real
        self._found: dict[str, str] = {}  # real path -> path, of the images of the class folder walked
        self.reserve(folder, "the image folder itself")

    def reserve(self, path: Path, what: str) -> None:
        """Mark ``path`` (the root, a split folder, a class folder) as one no link inside a class folder may reach."""
        ident, real = self._identity(path), os.path.realpath(path)
        if ident in self.reserved:
            raise ConfigError(
                f"dataset.root={self.setting}: {self._rel(path)} is {self.reserved[ident]} under another name (a "
                "link); give each class and split a folder of its own."
            )
        if self.reserved and _holds(real, self.real_root):
            raise ConfigError(
                f"dataset.root={self.setting}: {self._rel(path)} leads to {real}, a folder that holds the image "
                "folder; give each class and split a folder of its own."
            )
        self.reserved[ident] = what

    def images(self, class_dir: Path) -> tuple[list[str], int]:
        """Relative paths (posix, sorted) of the images under ``class_dir``, and the count of other files."""
        where, own = self._rel(class_dir), self._identity(class_dir)
        self._class, self._found = (where, own, os.path.realpath(class_dir)), {}
        self.folders[own] = (where, where)
        stack, ignored = [(class_dir, None)], 0
        while stack:
            path, via = stack.pop()  # via: the first link on the way to this folder, None where there is none
            real_dir, prefix = os.path.realpath(path), self._rel(path)
            for entry in self._entries(path):
                rel, link = f"{prefix}/{entry.name}", entry.is_symlink()
                if link and not self._resolves(entry.path, rel):
                    continue
                if entry.is_dir():
                    through = via or (rel if link else None)
                    if self._enter(Path(entry.path), rel, through):
                        stack.append((Path(entry.path), through))
                elif entry.name.lower().endswith(EXTENSIONS):
                    real = os.path.realpath(entry.path) if link else f"{real_dir}/{entry.name}"
                    self._add_file(real, rel, link or via is not None, where)
                else:
                    ignored += 1
        return sorted(self._found.values()), ignored

    def _entries(self, path: Path) -> list[os.DirEntry]:
        try:
            with os.scandir(path) as entries:
                return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as exc:
            raise ConfigError(
                f"dataset.root={self.setting}: the folder {self._rel(path)} cannot be read ({exc.strerror or exc}); "
                "fix its permissions, or move it out of the image folder."
            ) from exc

    def _resolves(self, path: str, rel: str) -> bool:
        """Whether the link at ``path`` leads to something; if not, it is listed in ``broken``."""
        try:
            os.stat(path)
            return True
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                why = "a link that cannot be followed (a loop of links)"
            elif exc.errno == errno.ENOENT:
                why = f"a link to {os.readlink(path)}, which does not exist"
            else:
                why = f"a link to {os.readlink(path)}, which cannot be read ({exc.strerror})"
            self.broken.append({"path": rel, "error": why})
            return False

    def _enter(self, path: Path, rel: str, via: str | None) -> bool:
        """Whether to walk the folder at ``path`` (``via`` the link that led there): False for one this class folder
        walked already; refused where it leads elsewhere in the image folder or is another class folder's."""
        where, own, class_real = self._class
        real = os.path.realpath(path)
        if self.skip is not None and real == self.skip:
            return False
        ident = self._identity(path)
        if ident in self.reserved and ident != own:
            self._refuse_link(via or rel, f"{self.reserved[ident]} ({real})", where)
        if via is not None and _holds(real, self.real_root):
            self._refuse_link(via, f"{real}, a folder that holds the image folder", where)
        if via is not None and ident != own and _holds(real, class_real):
            self._refuse_link(via, f"{real}, a folder that holds the class folder {where}", where)
        if ident not in self.folders:
            self.folders[ident] = (where, rel)
            return True
        other, first = self.folders[ident]
        if other != where:
            raise ConfigError(
                f"dataset.root={self.setting}: {rel} and {first} are the same folder ({real}, reached through a link), "
                f"so its images would be in two class folders or splits; remove the link."
            )
        return False  # a loop, or a second way to a folder of this class: read once

    def _add_file(self, real: str, rel: str, by_link: bool, where: str) -> None:
        found = self.files.get(real)
        if found is None or (found[0] == where and found[2] and not by_link):
            self.files[real] = (where, rel, by_link)  # the real location wins over a link to it
            self._found[real] = rel
        elif found[0] != where:
            raise ConfigError(
                f"dataset.root={self.setting}: {rel} and {found[1]} are the same image file ({real}, reached through a "
                "link), so it would be in two class folders or splits; remove the link."
            )

    def _refuse_link(self, link: str, what: str, where: str) -> None:
        raise ConfigError(
            f"dataset.root={self.setting}: the link {link} leads to {what}, so images of other classes or splits would "
            f"be counted again as {where}; remove the link, or replace it by the images it should add."
        )

    def _identity(self, path: Path) -> tuple[int, int]:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ConfigError(
                f"dataset.root={self.setting}: {self._rel(path)} cannot be read ({exc.strerror or exc}); fix its "
                "permissions, or move it out of the image folder."
            ) from exc
        return st.st_dev, st.st_ino

    def _rel(self, path: Path) -> str:
        rel = Path(path).relative_to(self.folder).as_posix()
        return rel if rel != "." else str(self.folder)


def _holds(outer: str, inner: str) -> bool:
    """Whether the real path ``outer`` is ``inner`` or a folder above it."""
    return os.path.commonpath([outer, inner]) == outer
