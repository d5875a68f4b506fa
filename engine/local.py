"""The engine as a local process on a loopback port (tests, benchmarks, chip hosts without Docker): the same
`python -m engine` the image runs, with the environment that picks the stack."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

PROJECT_DIR = Path(__file__).resolve().parent.parent
STACK_VARIABLES = ("USE_FLAGGEMS", "FLAGOS_OPS", "FLAGOS_FAULT")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_engine(model_dir: Path, served_name: str, environment: dict[str, str], cache_dir: Path,
                 timeout_s: float = 240.0, **config: object) -> Iterator[str]:
    """Serve `model_dir` until the block ends; yields the OpenAI base URL once /v1/models answers."""
    port = _free_port()
    folder = Path(tempfile.mkdtemp(prefix="flagos-engine-"))
    (folder / "serve.json").write_text(json.dumps({
        "host": "127.0.0.1", "port": port, "served_name": served_name, "model_dir": str(model_dir),
        "cache_dir": str(cache_dir), "device": "cpu", "dtype": "float32", "cb_max_batch_tokens": 2048,
        "cb_max_memory_percent": 0.1, **config}))
    env = {key: value for key, value in os.environ.items() if key not in STACK_VARIABLES}
    with (folder / "engine.log").open("w") as log:  # a pipe would fill and block the server
        process = subprocess.Popen([sys.executable, "-m", "engine", "--config", str(folder / "serve.json")],
                                   cwd=PROJECT_DIR, env={**env, **environment}, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(process, port, folder / "engine.log", timeout_s)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(process: subprocess.Popen, port: int, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the engine exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the engine did not answer /v1/models within {timeout_s:.0f} s; log: {log}")
