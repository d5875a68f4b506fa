"""File helpers for outputs that must never be seen half-written."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel


def write_atomic(path: Path, text: str) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename over `path` (all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_model(path: Path, model: BaseModel) -> Path:
    """A pydantic model as indented JSON, written atomically."""
    return write_atomic(path, model.model_dump_json(indent=2) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_hashes(root: Path, prefix: str, suffixes: tuple[str, ...], exclude_dirs: frozenset[str] = frozenset()) -> dict[str, str]:
    """sha256 of every file under `root` whose name ends with one of `suffixes`, keyed `<prefix>/<relative path>`."""
    hashes: dict[str, str] = {}
    if not root.is_dir():
        return hashes
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and path.name.endswith(suffixes) and not exclude_dirs.intersection(relative.parts[:-1]):
            hashes[f"{prefix}/{relative.as_posix()}"] = sha256_file(path)
    return hashes
