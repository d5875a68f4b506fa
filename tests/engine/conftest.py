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
def engine_server(gguf: Path, environment: dict[str, str]) -> Iterator[str]:
    """Serve this GGUF (its folder may hold other files, e.g. the evaluate tests' requantised copies)."""
    with local_engine(gguf.parent, SERVED_NAME, environment, cache_root() / "engine" / "checkpoints",
                      gguf_file=gguf.name) as url:
        yield url
