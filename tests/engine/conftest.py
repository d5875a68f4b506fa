"""The engine as a real server process on a free loopback port, serving the SmolLM2 GGUF of its package."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.local import local_engine
from flows.build.cache import cache_root
from tests.evaluate.conftest import smollm2_gguf  # noqa: F401  (the fixture, shared with the evaluate tests)

SERVED_NAME = "smollm2-135m-flagos"


@contextmanager
def engine_server(model_dir: Path, environment: dict[str, str]) -> Iterator[str]:
    with local_engine(model_dir, SERVED_NAME, environment, cache_root() / "engine" / "checkpoints") as url:
        yield url
