"""What a model's files should be: the lock file (`locks/<model>.json`, the offline pin) or, without one, the listing
the hub published at the pinned commit. Never nothing: a folder with neither is refused, and `flagrelease lock
<model>` records a lock from a folder the engineer vouches for.

A lock is `{"model", "source", "files": {path: {"size", "sha256"}}}`. A hub listing gives the sha256 where the hub
publishes one (ModelScope for every file, Hugging Face for LFS files) and otherwise the git blob id (sha1 of
`blob <size>\\0<bytes>`, Hugging Face's `blobId` of small files), so every listed file is checked by a hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.errors import BadInput
from flows.files import write_atomic
from flows.weights.hashing import sha256_files

HEX64, HEX40 = r"^[0-9a-f]{64}$", r"^[0-9a-f]{40}$"
IGNORED_PARTS = (".cache",)  # huggingface_hub's download metadata inside a local_dir
IGNORED_PREFIX = ".flagrelease-"  # this project's records of a fetch
IGNORED_SUFFIX = ".partial"  # a download still in progress


class LockInvalid(BadInput):
    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}; expected {{\"files\": {{\"<path>\": {{\"size\": <bytes>, "
                         f"\"sha256\": \"<64 hex>\"}}}}}}")


class NothingToVerifyAgainst(BadInput):
    pass


class ExpectedFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(ge=0)
    sha256: str | None = Field(default=None, pattern=HEX64)
    git_sha1: str | None = Field(default=None, pattern=HEX40)

    @model_validator(mode="after")
    def _has_a_hash(self) -> ExpectedFile:
        if self.sha256 is None and self.git_sha1 is None:
            raise ValueError("needs sha256 (or, from a hub listing, the git blob id)")
        return self


class Expected(BaseModel):
    """Every file the folder must hold, where that list came from, and a digest of it (a changed lock or listing
    invalidates a verified manifest)."""

    model_config = ConfigDict(frozen=True)

    source: str
    files: dict[str, ExpectedFile]

    @property
    def digest(self) -> str:
        canonical = json.dumps({n: f.model_dump() for n, f in sorted(self.files.items())}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


class _LockEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")

    size: int = Field(ge=0)
    sha256: str = Field(pattern=HEX64)


class _Lock(BaseModel):
    model_config = ConfigDict(extra="ignore")

    files: dict[str, _LockEntry] = Field(min_length=1)


def lock_path(project_dir: Path, model_name: str) -> Path:
    return project_dir / "locks" / f"{model_name}.json"


def load_lock(project_dir: Path, model_name: str) -> Expected | None:
    path = lock_path(project_dir, model_name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LockInvalid(path, f"not valid JSON ({exc})") from None
    try:
        lock = _Lock.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the top level"
        raise LockInvalid(path, f"{where}: {first['msg']}") from None
    return Expected(source=f"locks/{model_name}.json",
                    files={name: ExpectedFile(size=e.size, sha256=e.sha256) for name, e in lock.files.items()})


def hub_listing(recorded: dict | None, where: str) -> Expected | None:
    """The expectations a fetch recorded from the hub's listing (None when the source publishes none)."""
    if not recorded:
        return None
    return Expected(source=where, files={name: ExpectedFile.model_validate(entry) for name, entry in recorded.items()})


def folder_files(folder: Path) -> list[str]:
    """The model's files in `folder`, as paths relative to it: everything but fetch bookkeeping."""
    names = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if (path.is_file() and not relative.name.startswith(IGNORED_PREFIX) and not relative.name.endswith(IGNORED_SUFFIX)
                and not set(relative.parts) & set(IGNORED_PARTS)):
            names.append(relative.as_posix())
    return sorted(names)


def git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def record_lock(model_name: str, source: str, folder: Path, project_dir: Path, replace: bool,
                check_structure: Callable[[Path], object]) -> tuple[Path, int]:
    """Hash every file of a folder the engineer vouches for into `locks/<model>.json`. The folder must already be the
    declared model (`check_structure`); an existing lock is kept unless `replace`."""
    path = lock_path(project_dir, model_name)
    if path.exists() and not replace:
        raise BadInput(f"{path} already exists; pass --replace to record it again from {folder}")
    if not folder.is_dir():
        raise BadInput(f"weights folder {folder} does not exist: fetch the weights first (`flagrelease weights`)")
    check_structure(folder)
    names = folder_files(folder)
    digests, _ = sha256_files([folder / n for n in names])
    files = {n: {"size": (folder / n).stat().st_size, "sha256": digests[folder / n]} for n in names}
    write_atomic(path, json.dumps({"model": model_name, "source": source, "files": files}, indent=2) + "\n")
    return path, len(files)
