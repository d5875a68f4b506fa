"""Runs inside the image build (the environment stage, with the base's python3 and no project code): splits the
installed Python environment into N folders of about equal size, each top-level package whole, so the image gets N
environment layers. `docker push` compresses each layer as one gzip stream on one core: one 3 GB layer keeps one
core busy for minutes while the others wait, N layers are compressed side by side.

    python3 split_layers.py <installed root> <out> <N>     -> <out>/0 .. <out>/N-1, each to be copied onto /

The split depends only on the installed files (sizes, then names), so the same wheels give the same layers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DIRS = ("dist-packages", "site-packages")


def group_of(relative: Path) -> Path:
    """A file's unit of placement: the top-level entry under a package folder, else the folder holding it."""
    parts = relative.parts
    for index, part in enumerate(parts[:-1]):
        if part in PACKAGE_DIRS:
            return Path(*parts[:index + 2])
    return relative.parent


def split(root: Path, out: Path, count: int) -> list[int]:
    sizes: dict[Path, int] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            group = group_of(path.relative_to(root))
            sizes[group] = sizes.get(group, 0) + path.lstat().st_size
    totals = [0] * count
    bins = [out / str(index) for index in range(count)]
    for folder in bins:
        folder.mkdir(parents=True)
    for group, size in sorted(sizes.items(), key=lambda item: (-item[1], str(item[0]))):
        index = totals.index(min(totals))
        totals[index] += size
        source = root / group
        if any(part in PACKAGE_DIRS for part in group.parts[:-1]):
            moves = [source]  # a package, a dist-info folder or a top-level module: whole
        else:  # a folder of loose files (bin/): its files; its subfolders are groups of their own
            moves = sorted(path for path in source.iterdir() if not path.is_dir())
        for path in moves:
            os.renames(path, bins[index] / path.relative_to(root))
    return totals


if __name__ == "__main__":
    totals = split(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
    print("environment layers (MB):", ", ".join(f"{size / 1e6:.0f}" for size in totals))
