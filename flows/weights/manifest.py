"""Fetch, verify and record: the verified-weights manifest the later stages and the card consume.

Order: fetch -> what the files should be (the lock, else the hub's listing; never nothing: flows/weights/expected.py)
-> every file of the folder against it: none missing, none unlisted, sizes, hashes (sha256, or the git blob id of a
small hub file), JSON files parse -> the structure (headers only: shards, index, config, parameter counts). Every
problem found is named together (a wrong hash does not hide a missing tensor). A file whose hash is wrong is fetched
once more; still wrong, the stage fails naming it. The manifest lives in the state folder (the weights folder may be a
read-only mount); a re-run reuses it, hashing nothing, while the expectations are the same and every file still has
its recorded size and mtime (`reverify` re-hashes anyway).
"""

from __future__ import annotations

import hashlib
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
from flows.weights.expected import (Expected, NothingToVerifyAgainst, folder_files, git_blob_sha1, hub_listing,
                                    load_lock)
from flows.weights.derived import Derivation
from flows.weights.formats import WeightsInvalid
from flows.weights.hashing import sha256_files
from flows.weights.sources import (can_fetch_again, downloaded_digests, ensure_space, fetch, hub_expectations,
                                   weights_folder)


class WeightsMismatch(FlagReleaseError):
    """Files that are not what the expectations say, and any structural problem found beside them."""

    def __init__(self, files: dict[str, str], structure: list[WeightsInvalid], remedy: str = ""):
        self.files, self.structure = files, structure
        parts = [f"{n}: {p}" for n, p in files.items()] + [str(problem) for problem in structure]
        super().__init__("weights differ from what they should be: " + "; ".join(parts) + (f"; {remedy}" if remedy else ""))


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
    expected_digest: str = ""
    verified_at: datetime

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def manifest_path(state_dir: Path, model_name: str, folder: Path) -> Path:
    """One manifest per model folder, in the state folder (never inside the weights folder)."""
    return state_dir / "weights" / model_name / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}.json"


ProgressFactory = Callable[[int], Callable[[int], None]]  # total bytes -> callback taking bytes done since last call


def prepare_weights(model_name: str, model: Model, revision: PinnedRevision, weights_dir: Path, project_dir: Path,
                    state_dir: Path, reverify: bool, log: Callable[[str], None],
                    progress: ProgressFactory | None = None,
                    derivation: Derivation | None = None) -> tuple[WeightsManifest, int]:
    """Return the verified manifest and the bytes hashed for it (0 when a verified manifest was reused).
    A derived model needs `derivation`: its base's verified weights and the image that makes them."""
    folder = weights_folder(weights_dir, model_name, model, revision)
    lock = load_lock(project_dir, model_name)
    if lock:
        ensure_space(folder, {name: entry.size for name, entry in lock.files.items()})
    fetch(model, revision, folder, None, log, derivation)
    expected = lock or hub_listing(hub_expectations(folder), "hub metadata")
    if expected is None:
        raise NothingToVerifyAgainst(
            f"{model_name}: neither locks/{model_name}.json nor a hub listing says what the files in {folder} should "
            f"be, so nothing would be verified; if you vouch for that folder, record its lock with "
            f"`flagrelease lock {model_name}` and commit it")
    record = manifest_path(state_dir, model_name, folder)
    try:
        return _verify(model_name, model, revision, folder, expected, record, reverify, log, progress)
    except WeightsMismatch as first:
        again = sorted(name for name in first.files if name in expected.files)
        if not again or not can_fetch_again(model):
            raise WeightsMismatch(first.files, first.structure, _remedy(model_name, folder, first.files, again)) from None
        log(f"{first}; fetching {', '.join(again)} once more from the source")
        fetch(model, revision, folder, again, log, derivation)
        return _verify(model_name, model, revision, folder, expected, record, True, log, progress)


def _remedy(model_name: str, folder: Path, wrong: dict[str, str], refetchable: list[str]) -> str:
    remedies = []
    if refetchable:
        remedies.append(f"the local folder {folder} cannot be fetched again: replace them from their origin")
    if len(refetchable) < len(wrong):
        remedies.append(f"if the unlisted files belong to the model, record the lock again from a folder you vouch for "
                        f"(`flagrelease lock {model_name} --replace`), else remove them")
    return "; ".join(remedies)


def _verify(model_name: str, model: Model, revision: PinnedRevision, folder: Path, expected: Expected, record: Path,
            reverify: bool, log: Callable[[str], None], progress: ProgressFactory | None) -> tuple[WeightsManifest, int]:
    paths = {name: folder / name for name in folder_files(folder)}
    previous = _read_manifest(record)
    if (previous is not None and not reverify and previous.expected_digest == expected.digest
            and previous.folder == str(folder) and _unchanged(previous, paths)):
        log(f"{len(paths)} files unchanged since {previous.verified_at:%Y-%m-%d %H:%M} UTC: not re-hashed")
        return previous, 0
    wrong = {name: "missing" for name in sorted(set(expected.files) - set(paths))}
    for name, path in paths.items():
        want, size = expected.files.get(name), path.stat().st_size
        if want is None:
            wrong[name] = f"present but {expected.source} does not list it"
        elif size != want.size:
            wrong[name] = f"{size} bytes, expected {want.size}"
    digests, read = _sha256(folder, {name: path for name, path in paths.items() if name not in wrong}, reverify,
                            log, progress)
    for name, digest in digests.items():
        want = expected.files[name]
        if want.sha256 is not None and digest != want.sha256:
            wrong[name] = f"sha256 {digest[:16]}..., expected {want.sha256[:16]}..."
        elif want.sha256 is None and (blob := git_blob_sha1(paths[name])) != want.git_sha1:
            wrong[name] = f"git blob {blob[:16]}..., expected {want.git_sha1[:16]}..."
    problems = _unparsable_json(paths)
    try:
        structure = verify_structure(folder, model)
    except WeightsInvalid as problem:
        structure, problems = None, [*problems, problem]
    if wrong:
        raise WeightsMismatch(wrong, problems)
    if problems:
        raise problems[0]
    manifest = WeightsManifest(
        model=model_name, source=f"{model.source.hub}:{model.source.repo}", revision=revision.fingerprint_value,
        folder=str(folder), format=model.format, dtype=structure.dtype, total_params=structure.total_params,
        active_params=structure.active_params, verified_at=datetime.now(timezone.utc), expected_from=expected.source,
        expected_digest=expected.digest,
        files=[FileRecord(path=name, size=path.stat().st_size, sha256=digests[name], mtime_ns=path.stat().st_mtime_ns)
               for name, path in paths.items()])
    write_model(record, manifest)
    return manifest, read


def _sha256(folder: Path, paths: dict[str, Path], reverify: bool, log: Callable[[str], None],
            progress: ProgressFactory | None) -> tuple[dict[str, str], int]:
    """sha256 by name; hashes taken while downloading count when the file has not changed since (not on reverify)."""
    known = {} if reverify else downloaded_digests(folder)
    digests = {name: str(known[name]["sha256"]) for name, path in paths.items()
               if name in known and _same_file(path, known[name]["size"], known[name]["mtime_ns"])}
    to_hash = [path for name, path in paths.items() if name not in digests]
    total = sum(p.stat().st_size for p in to_hash)
    log(f"hashing {len(to_hash)} files, {total / 2**20:,.0f} MiB ({len(digests)} hashed while downloading)")
    hashed, read = sha256_files(to_hash, progress=progress(total) if progress else None)
    return {**digests, **{path.relative_to(folder).as_posix(): digest for path, digest in hashed.items()}}, read


def _unparsable_json(paths: dict[str, Path]) -> list[WeightsInvalid]:
    problems = []
    for name, path in paths.items():
        if name.endswith(".json"):
            try:
                json.loads(path.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                problems.append(WeightsInvalid(name, f"not valid JSON ({exc})"))
    return problems


def _read_manifest(path: Path) -> WeightsManifest | None:
    try:
        return WeightsManifest.model_validate_json(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _unchanged(manifest: WeightsManifest, paths: dict[str, Path]) -> bool:
    recorded = {f.path: f for f in manifest.files}
    return set(recorded) == set(paths) and all(
        _same_file(path, recorded[name].size, recorded[name].mtime_ns) for name, path in paths.items())


def _same_file(path: Path, size: object, mtime_ns: object) -> bool:
    """The file still has the size and modification time it had when it was hashed."""
    status = path.stat()
    return status.st_size == size and status.st_mtime_ns == mtime_ns
