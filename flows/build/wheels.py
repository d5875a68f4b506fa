"""The image wheelhouse, downloaded on the host once per machine: pyproject's `kernels` and `engine` extras with
their dependencies for the image's Python (installed offline inside `docker build`, where the package index is
unreachable over TLS; see ../shared/notes/cpu-image.md), plus what installs without its dependencies, minus the
distributions the engine must not get. The same wheels make `.venv-engine`, where tests and benchmarks run the
engine here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from flows.build.cache import complete_entry, entry_key, publish_entry, staging_entry
from flows.errors import FlagReleaseError
from flows.plan import engine_install_rules, image_requirements

TARGET_PYTHON = ("3.11", "cp311")  # Debian bookworm's python3
# Debian bookworm's glibc is 2.36: every manylinux tag up to it runs there
PLATFORMS = (*(f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)), "manylinux2014_x86_64", "any")


class WheelBuildFailed(FlagReleaseError):
    pass


def distribution_name(wheel: Path) -> str:
    """A wheel's distribution, normalised (PEP 503): `torch_audio-2.0-...whl` -> `torch-audio`."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def image_wheelhouse(project_dir: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Every wheel the image installs (each with --no-deps: this list is the whole resolved environment)."""
    rules = engine_install_rules(project_dir)
    pins = [f"{name}=={version}" for name, version in image_requirements(project_dir).items()]
    recipe = {"requirements": sorted(pins), "no_deps": sorted(rules.no_deps), "built_here": sorted(rules.built_here),
              "python": TARGET_PYTHON[0]}
    key = entry_key("image-wheelhouse", recipe)
    done = complete_entry(key)
    if done is None:
        log(f"downloading {len(pins)} pinned requirements and their dependencies for Python {TARGET_PYTHON[0]} "
            "(image wheelhouse, once per machine)")
        staging = staging_entry(key)
        _pip(["wheel", "--no-deps", "--no-cache-dir", "-w", str(staging), *rules.built_here], dict(os.environ),
             "building the source-only wheels")
        platform = ["--only-binary=:all:", "--python-version", TARGET_PYTHON[0], "--implementation", "cp",
                    *[arg for name in PLATFORMS for arg in ("--platform", name)], "--find-links", str(staging),
                    "-d", str(staging)]
        resolved = [pin for pin in pins if pin not in rules.no_deps + rules.built_here]
        _pip(["download", *platform, *resolved], dict(os.environ), "downloading the image wheelhouse")
        _pip(["download", "--no-deps", *platform, *rules.no_deps], dict(os.environ), "downloading the no-deps wheels")
        done = publish_entry(key, staging, recipe)
    skipped = {re.sub(r"[-_.]+", "-", name).lower() for name in rules.excluded}
    return sorted(wheel for wheel in done.glob("*.whl") if distribution_name(wheel) not in skipped)


ENGINE_VENV = ".venv-engine"


def engine_environment(project_dir: Path, log: Callable[[str], None] = print) -> Path:
    """`.venv-engine` in the checkout: exactly the image's wheels (installed --no-deps from the wheelhouse), plus
    the package metadata our plugin and vLLM's command need (engine/dist_info.py). The engine code itself is read
    from the checkout (PYTHONPATH), as the image reads it from /opt/flagos. Returns its python."""
    venv = project_dir / ENGINE_VENV
    python = venv / "bin" / "python"
    wheels = image_wheelhouse(project_dir, log)
    stamp = venv / ".flagrelease-wheels"
    wanted = "\n".join(wheel.name for wheel in wheels) + "\n"
    if python.exists() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    log(f"installing the engine's {len(wheels)} wheels into {ENGINE_VENV} (the image's environment)")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip(["install", "-q", "--no-index", "--no-deps", *map(str, wheels)], dict(os.environ),
         f"installing the engine into {ENGINE_VENV}", python)
    result = subprocess.run([str(python), "-m", "engine.dist_info", "--plugin"], cwd=project_dir, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(project_dir)})
    if result.returncode != 0:
        raise WheelBuildFailed(f"writing the engine's package metadata failed: {result.stderr[-2000:]}")
    stamp.write_text(wanted)
    return python


def _pip(args: list[str], env: dict[str, str], what: str, python: Path | None = None) -> None:
    result = subprocess.run([str(python or sys.executable), "-m", "pip", "--disable-pip-version-check", *args], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise WheelBuildFailed(f"{what} failed (pip exit {result.returncode}):\n{(result.stderr or result.stdout)[-3000:]}")
