"""The machine-level cache for expensive, content-addressed build inputs (the llama.cpp wheel, the wheelhouse, the
Debian base tarball). It lives outside the clone (XDG cache) so CI's fresh clone on the same machine reuses it;
every entry is keyed by what produced it, written to a temporary name and renamed, so it is complete or absent.
Correctness never depends on it: a new machine rebuilds each entry."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("FLAGRELEASE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flagrelease")
    return Path(base)


def entry_key(kind: str, recipe: dict[str, object]) -> str:
    digest = hashlib.sha256(json.dumps({"kind": kind, **recipe}, sort_keys=True).encode()).hexdigest()
    return f"{kind}-{digest[:16]}"


def complete_entry(key: str) -> Path | None:
    """The entry's folder if a previous build finished it."""
    path = cache_root() / key
    return path if (path / ".complete").exists() else None


def staging_entry(key: str) -> Path:
    """A fresh folder to build the entry in; `publish_entry` makes it the entry."""
    staging = cache_root() / f".{key}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_entry(key: str, staging: Path, recipe: dict[str, object]) -> Path:
    (staging / ".complete").write_text(json.dumps(recipe, sort_keys=True, indent=1) + "\n")
    final = cache_root() / key
    try:
        staging.rename(final)
    except OSError:  # another process finished the same entry first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return final
