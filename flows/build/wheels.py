"""Wheels downloaded or built on the host once per machine: the image wheelhouse (the `kernels` and `engine`
extras of pyproject.toml for the image's Python, installed offline inside `docker build`, where the package index
is unreachable over TLS; see ../shared/notes/cpu-image.md), and llama.cpp's server for this environment only (the
evaluate tests' quantised control stacks; no image ships it)."""

from __future__ import annotations

import os
from collections.abc import Callable
import subprocess
import sys
from pathlib import Path

from flows.build.cache import complete_entry, entry_key, publish_entry, staging_entry
from flows.errors import FlagReleaseError
from flows.plan import image_requirements

LLAMA_CPP = "llama-cpp-python==0.3.36"
# Portable: the default build tunes for the build machine's CPU and dies with SIGILL on others.
LLAMA_CPP_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
# What `python -m llama_cpp.server` imports, pinned; numpy/jinja2/diskcache/typing-extensions are llama-cpp's own.
SERVER_REQUIREMENTS = (
    "fastapi==0.150.0", "uvicorn==0.54.0", "sse-starlette==3.7.0", "starlette-context==0.5.1",
    "pydantic-settings==2.16.3", "pydantic==2.14.4", "numpy==2.4.6", "jinja2==3.1.6", "diskcache==5.6.3",
    "typing-extensions==4.16.0", "pyyaml==6.0.4",
)
TARGET_PYTHON = ("3.11", "cp311")  # Debian bookworm's python3


class WheelBuildFailed(FlagReleaseError):
    pass


def llama_cpp_wheel(log: Callable[[str], None] = print) -> Path:
    """The portable llama-cpp-python wheel, built once per machine (~5-8 min on 2 cores)."""
    recipe = {"requirement": LLAMA_CPP, "cmake_args": LLAMA_CPP_CMAKE_ARGS}
    key = entry_key("llama-cpp-wheel", recipe)
    done = complete_entry(key)
    if done is None:
        log(f"building {LLAMA_CPP} with CMAKE_ARGS='{LLAMA_CPP_CMAKE_ARGS}' (once per machine, several minutes)")
        staging = staging_entry(key)
        env = {**os.environ, "CMAKE_ARGS": LLAMA_CPP_CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        _pip(["wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python", "-w", str(staging), LLAMA_CPP],
             env, "building the llama-cpp-python wheel")
        done = publish_entry(key, staging, recipe)
    [wheel] = done.glob("llama_cpp_python-*.whl")
    return wheel


def server_wheelhouse(log: Callable[[str], None] = print) -> Path:
    """llama.cpp's server requirements, for this environment's Python, downloaded once per requirement set."""
    return _wheelhouse("server-wheelhouse", list(SERVER_REQUIREMENTS), log)


def image_wheelhouse(project_dir: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Every wheel the image installs: pyproject's image extras and their dependencies, for the image's Python."""
    pins = [f"{name}=={version}" for name, version in image_requirements(project_dir).items()]
    return sorted(_wheelhouse("image-wheelhouse", pins, log).glob("*.whl"))


def _wheelhouse(kind: str, requirements: list[str], log: Callable[[str], None]) -> Path:
    recipe = {"requirements": sorted(requirements), "python": TARGET_PYTHON[0]}
    key = entry_key(kind, recipe)
    done = complete_entry(key)
    if done is None:
        log(f"downloading {len(requirements)} pinned requirements and their dependencies for Python "
            f"{TARGET_PYTHON[0]} ({kind}, once per machine)")
        staging = staging_entry(key)
        _pip(["download", "--only-binary=:all:", "--python-version", TARGET_PYTHON[0], "--implementation", "cp",
              "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
              "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", str(staging), *requirements],
             dict(os.environ), f"downloading the {kind}")
        done = publish_entry(key, staging, recipe)
    return done


def _pip(args: list[str], env: dict[str, str], what: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise WheelBuildFailed(f"{what} failed (pip exit {result.returncode}):\n{(result.stderr or result.stdout)[-3000:]}")


def install_server_here(log: Callable[[str], None] = print) -> None:
    """Install llama.cpp's OpenAI server into this Python environment (portable wheel, pinned requirements): the
    evaluate tests serve quantised copies of the model with it as control stacks for the gate."""
    wheel = llama_cpp_wheel(log)
    names = [requirement.split("==")[0] for requirement in SERVER_REQUIREMENTS]
    _pip(["install", "-q", "--no-index", "--find-links", str(wheel.parent), "--find-links", str(server_wheelhouse(log)),
          LLAMA_CPP, *names], dict(os.environ), "installing llama.cpp's server into this environment")
