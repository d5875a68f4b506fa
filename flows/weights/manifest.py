"""Fetch, verify and record: the verified-weights manifest the later stages and the card consume.

Order: fetch -> structure (headers only) -> sha256 of every file against the expected hashes (the model's lock
file `locks/<model>.json`, else what the hub published) -> manifest beside the weights. A file whose hash is wrong is fetched once more; still
wrong, the stage fails naming it. A re-run whose files still have the recorded size and mtime re-hashes nothing
unless asked (`reverify`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flows.errors import FlagReleaseError
from flows.files import write_model
from flows.matrix import Model
from flows.revisions import PinnedRevision
from flows.weights.checkpoint import verify_structure
from flows.weights.hashing import sha256_files
from flows.weights.sources import downloaded_digests, ensure_space, fetch, hub_expectations, weights_folder

MANIFEST_NAME = ".flagrelease-weights.json"


class WeightsMismatch(FlagReleaseError):
    def __init__(self, files: dict[str, str]):
        self.files = files
        super().__init__("weights differ from what they should be: " + "; ".join(f"{n}: {p}" for n, p in files.items()))


class FileRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    sha256: str
    mtime_ns: int


class WeightsManifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    source: str
    revision: str
    folder: str
    format: str
    files: list[FileRecord]
    total_params: int
    active_params: int
    dtype: str
    expected_from: str
    verified_at: datetime

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def load_lock(project_dir: Path, model_name: str) -> dict[str, dict[str, object]] | None:
    path = project_dir / "locks" / f"{model_name}.json"
    return json.loads(path.read_text())["files"] if path.exists() else None


ProgressFactory = Callable[[int], Callable[[int], None]]  # total bytes -> callback taking bytes done since last call


def prepare_weights(model_name: str, model: Model, revision: PinnedRevision, weights_dir: Path, project_dir: Path,
                    reverify: bool, log: Callable[[str], None],
                    progress: ProgressFactory | None = None) -> tuple[WeightsManifest, int]:
    """Return the verified manifest and the bytes hashed for it (0 when a verified manifest was reused)."""
    folder = weights_folder(weights_dir, model_name, model, revision)
    lock = load_lock(project_dir, model_name)
    if lock:
        ensure_space(folder, {name: int(entry["size"]) for name, entry in lock.items()})
    fetch(model, revision, folder, None, log)
    expected, expected_from = (lock, f"locks/{model_name}.json") if lock else (hub_expectations(folder), "hub metadata")
    try:
        return _verify(model_name, model, revision, folder, expected, expected_from, reverify, log, progress)
    except WeightsMismatch as first:
        log(f"{first}; fetching {', '.join(first.files)} once more from the source")
        fetch(model, revision, folder, sorted(first.files), log)
        return _verify(model_name, model, revision, folder, expected, expected_from, True, log, progress)


def _verify(model_name: str, model: Model, revision: PinnedRevision, folder: Path, lock: dict | None,
            expected_from: str, reverify: bool, log: Callable[[str], None],
            progress: ProgressFactory | None) -> tuple[WeightsManifest, int]:
    resized = {name: f"{(folder / name).stat().st_size} bytes, expected {entry['size']}"
               for name, entry in (lock or {}).items()
               if (folder / name).exists() and (folder / name).stat().st_size != entry["size"]}
    if resized:  # a cut-short file cannot be parsed; it is a transfer fault to fetch again, not a bad checkpoint
        raise WeightsMismatch(resized)
    structure = verify_structure(folder, model)
    paths = [folder / name for name in structure.files]
    previous = _read_manifest(folder)
    if previous is not None and not reverify and _unchanged(previous, paths):
        log(f"{len(paths)} files unchanged since {previous.verified_at:%Y-%m-%d %H:%M} UTC: not re-hashed")
        return previous, 0
    # hashes taken while downloading count when the file has not changed since (reverify ignores them)
    known = {} if reverify else downloaded_digests(folder)
    digests = {p: str(known[p.name]["sha256"]) for p in paths
               if p.name in known and _same_file(p, known[p.name]["size"], known[p.name]["mtime_ns"])}
    to_hash = [p for p in paths if p not in digests]
    total = sum(p.stat().st_size for p in to_hash)
    log(f"hashing {len(to_hash)} files, {total / 2**20:,.0f} MiB ({len(digests)} hashed while downloading)")
    hashed, read = sha256_files(to_hash, progress=progress(total) if progress else None)
    digests.update(hashed)
    wrong = {}
    for path in paths:
        expected = (lock or {}).get(path.name)
        if expected is None:
            continue
        if path.stat().st_size != expected["size"]:
            wrong[path.name] = f"{path.stat().st_size} bytes, expected {expected['size']}"
        elif digests[path] != expected["sha256"]:
            wrong[path.name] = f"sha256 {digests[path][:16]}..., expected {str(expected['sha256'])[:16]}..."
    missing = sorted(set(lock or {}) - {p.name for p in paths})
    wrong.update({name: "missing" for name in missing})
    if wrong:
        raise WeightsMismatch(wrong)
    manifest = WeightsManifest(
        model=model_name, source=f"{model.source.hub}:{model.source.repo}", revision=revision.fingerprint_value,
        folder=str(folder), format=model.format, dtype=structure.dtype, total_params=structure.total_params,
        active_params=structure.active_params, verified_at=datetime.now(timezone.utc),
        expected_from=expected_from if lock else "nothing to check against: hashes recorded as found",
        files=[FileRecord(path=p.name, size=p.stat().st_size, sha256=digests[p], mtime_ns=p.stat().st_mtime_ns)
               for p in paths])
    write_model(folder / MANIFEST_NAME, manifest)
    return manifest, read


def _read_manifest(folder: Path) -> WeightsManifest | None:
    try:
        return WeightsManifest.model_validate_json((folder / MANIFEST_NAME).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _unchanged(manifest: WeightsManifest, paths: list[Path]) -> bool:
    recorded = {f.path: f for f in manifest.files}
    return set(recorded) == {p.name for p in paths} and all(
        _same_file(p, recorded[p.name].size, recorded[p.name].mtime_ns) for p in paths)


def _same_file(path: Path, size: object, mtime_ns: object) -> bool:
    """The file still has the size and modification time it had when it was hashed."""
    status = path.stat()
    return status.st_size == size and status.st_mtime_ns == mtime_ns
