"""Collect the image files that `cifar-onnx classify` was given, in sorted path order.

Folders are walked (recursively by default) following symbolic links. Every folder
is entered once, under the first path that reaches it in sorted order, so a link loop
ends the walk instead of repeating it.
"""

import dataclasses
import os
import stat
from pathlib import Path

# Extensions of the formats Pillow decodes and that photos come in, matched case-insensitively.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
})


@dataclasses.dataclass
class CollectedPaths:
    """The files to classify and what the walk left out."""

    images: list  # Paths, sorted by their components, without duplicates
    unreadable: dict  # Path -> reason, for folders that could not be listed and explicit non-files
    skipped_hidden: int = 0  # names starting with "." inside a folder (a hidden folder counts once)
    skipped_other: int = 0  # other extensions, special files, folders reached again, subfolders when not recursive

    @property
    def skipped(self):
        """The total number of entries left out."""
        return self.skipped_hidden + self.skipped_other


def collect_image_paths(paths, recursive=True):
    """Return the image files named by `paths` (files and folders) as CollectedPaths.

    A file named directly is always collected, whatever its name, so it gets a row.
    Inside folders, only regular files with an IMAGE_EXTENSIONS suffix are collected.
    """
    collected = CollectedPaths(images=[], unreadable={})
    found = set()
    visited_folders = set()
    for path in map(Path, paths):
        if path.is_dir():
            _walk_folder(path, recursive, collected, found, visited_folders)
        elif path.is_file():
            found.add(path)
        elif path.exists():
            collected.unreadable[path] = "not a regular file"
        else:
            found.add(path)  # a dangling link or a path that vanished: decoding reports it
    collected.images = sorted(found)
    return collected


def _walk_folder(folder, recursive, collected, found, visited_folders):
    try:
        folder_stat = folder.stat()
    except OSError as error:
        collected.unreadable[folder] = f"cannot open folder: {error.strerror or error}"
        return
    key = (folder_stat.st_dev, folder_stat.st_ino)
    if key in visited_folders:
        collected.skipped_other += 1  # a link loop, or a folder reached twice
        return
    visited_folders.add(key)

    try:
        with os.scandir(folder) as entries:
            names = sorted(entry.name for entry in entries)
    except OSError as error:
        collected.unreadable[folder] = f"cannot list folder: {error.strerror or error}"
        return

    for name in names:
        path = folder / name
        if name.startswith("."):
            collected.skipped_hidden += 1
            continue
        try:
            mode = path.stat().st_mode  # follows links
        except OSError:
            mode = None  # a dangling link: judged by its name, decoding reports it
        if mode is not None and stat.S_ISDIR(mode):
            if recursive:
                _walk_folder(path, recursive, collected, found, visited_folders)
            else:
                collected.skipped_other += 1
        elif path.suffix.lower() in IMAGE_EXTENSIONS and (mode is None or stat.S_ISREG(mode)):
            found.add(path)
        else:
            collected.skipped_other += 1
