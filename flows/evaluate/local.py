"""The engine as local processes on a loopback port (tests, benchmarks, chip hosts without Docker), started the way
the image starts it: `python -m engine.foreground <name> <config>` -> `flagscale serve` -> vLLM with our plugin,
in `.venv-engine` (the cpu image's wheels) with this checkout's engine code."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from engine.operators import STACK_VARIABLES
from flows.build.context import BACKEND_ENV, serve_config_text
from flows.build.wheels import ENGINE_VENV
from flows.matrix import ServeSpec

PROJECT_DIR = Path(__file__).resolve().parent.parent.parent
SERVE_NAME = "llama"  # FlagScale's name for the serve step; the served model name is what clients ask for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_engine(model_dir: Path, served_name: str, environment: dict[str, str], cache_dir: Path, serve: ServeSpec,
                 gguf_file: str | None = None, timeout_s: float = 300.0) -> Iterator[str]:
    """Serve `model_dir` until the block ends; yields the OpenAI base URL once /v1/models answers."""
    engine_bin = PROJECT_DIR / ENGINE_VENV / "bin"
    if not (engine_bin / "flagscale").exists():
        raise RuntimeError(f"{engine_bin} has no flagscale: run `flagrelease prepare` (scripts/setup.sh) first")
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="flagos-engine-"))
    config = folder / "vllm.yaml"
    config.write_text(serve_config_text(PROJECT_DIR, serve, served_name, SERVE_NAME, gguf_file, host="127.0.0.1",
                                        port=port, model_mount=str(model_dir), cache_dir=str(cache_dir),
                                        exp_dir=str(folder / "run")))
    env = {key: value for key, value in os.environ.items() if key not in STACK_VARIABLES and key != "VIRTUAL_ENV"}
    env.update({**BACKEND_ENV["interpreter"], "PATH": f"{engine_bin}:{env.get('PATH', '')}",
                "PYTHONPATH": str(PROJECT_DIR), "HF_HUB_OFFLINE": "1", **environment})
    log_path = folder / "engine.log"
    with log_path.open("w") as log:  # a pipe would fill and block the server
        process = subprocess.Popen([str(engine_bin / "python"), "-m", "engine.foreground", SERVE_NAME, str(config)],
                                   cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(process, port, log_path, timeout_s)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the foreground step (it passes it to the engine), then nothing of the session may remain."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_ready(process: subprocess.Popen, port: int, log: Path, timeout_s: float) -> None:
    """Until the server on `port` answers /v1/models; its exit or the deadline raises with the log's tail."""
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
