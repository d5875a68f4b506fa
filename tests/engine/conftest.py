"""The engine as a real server process on a free loopback port, serving the SmolLM2 GGUF of its package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from flows.build.cache import cache_root
from tests.conftest import PROJECT_DIR, free_port
from tests.evaluate.conftest import smollm2_gguf  # noqa: F401  (the fixture, shared with the evaluate tests)

SERVED_NAME = "smollm2-135m-flagos"


@contextmanager
def engine_server(model_dir: Path, environment: dict[str, str], timeout_s: float = 240.0) -> Iterator[str]:
    """`python -m engine` with this environment; yields its OpenAI base URL once /v1/models answers."""
    port = free_port()
    config = Path(tempfile.mkdtemp(prefix="flagos-engine-test-")) / "serve.json"
    config.write_text(json.dumps({"host": "127.0.0.1", "port": port, "served_name": SERVED_NAME,
                                  "model_dir": str(model_dir), "cache_dir": str(cache_root() / "engine" / "checkpoints"),
                                  "device": "cpu", "dtype": "float32"}))
    env = {key: value for key, value in os.environ.items() if key not in ("USE_FLAGGEMS", "FLAGOS_OPS", "FLAGOS_FAULT")}
    log = config.with_name("engine.log").open("w")  # a pipe would fill and block the server
    process = subprocess.Popen([sys.executable, "-m", "engine", "--config", str(config)], cwd=PROJECT_DIR,
                               env={**env, **environment}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"engine exited {process.returncode}: {config.with_name('engine.log').read_text()[-3000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine not ready after {timeout_s:.0f} s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
