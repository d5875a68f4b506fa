"""The engine as real local processes on free loopback ports: `flagscale serve` -> vLLM with our plugin (the image's
start path, in .venv-engine), serving the SmolLM2 GGUF of its package; and vLLM as the field ships it, without our
plugin's report, as the engine that cannot show what it ran."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.build.cache import cache_root
from flows.build.wheels import ENGINE_VENV
from flows.evaluate.local import PROJECT_DIR, free_port, local_engine, wait_ready
from flows.matrix import load_matrix
from tests.evaluate.conftest import smollm2_gguf  # noqa: F401  (the fixture, shared with the evaluate tests)

SERVED_NAME = "smollm2-135m-flagos"
ENGINE_CACHE = cache_root() / "engine"


def cpu_serve():
    return load_matrix(PROJECT_DIR / "releases.yaml").chips["cpu"].serve


@contextmanager
def engine_server(gguf: Path, environment: dict[str, str]) -> Iterator[str]:
    """Serve this GGUF as the cpu image would (its folder may hold other files)."""
    with local_engine(gguf.parent, SERVED_NAME, environment, ENGINE_CACHE, cpu_serve(), gguf_file=gguf.name) as url:
        yield url


def converted(gguf: Path, link: Path) -> Path:
    """The GGUF as the safetensors folder vLLM loads (converted once per machine by engine.checkpoint), at `link`."""
    engine_bin = PROJECT_DIR / ENGINE_VENV / "bin"
    subprocess.run([str(engine_bin / "python"), "-m", "engine.checkpoint", str(gguf.parent), str(ENGINE_CACHE / "checkpoints"),
                    str(link), "--gguf-file", gguf.name], cwd=PROJECT_DIR, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)})
    return link


@contextmanager
def plain_vllm(gguf: Path) -> Iterator[str]:
    """`vllm serve` of the same weights with no route of ours: an engine that serves no operator report."""
    engine_bin = PROJECT_DIR / ENGINE_VENV / "bin"
    link = converted(gguf, ENGINE_CACHE / "serving" / "plain-vllm")
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="plain-vllm-", suffix=".log", delete=False)
    process = subprocess.Popen([str(engine_bin / "vllm"), "serve", str(link), "--served-model-name", SERVED_NAME,
                                "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
                                "--max-model-len", "2048"], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_PLUGINS": ""},
                               start_new_session=True)
    try:
        wait_ready(process, port, Path(log.name), 240)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=60)
        Path(log.name).unlink(missing_ok=True)
