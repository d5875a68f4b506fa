"""The GPU image's command (engine/foreground.py) keeps FlagScale's backgrounded server in the foreground. FlagScale
is not installable here, so `flagscale` is a stand-in written by the test that does what FlagScale 0.8's serve
runner does: append the engine's output to <exp_dir>/serve_logs/host_0_localhost.output, write its pid to
<exp_dir>/serve_logs/pids/host_0_localhost.pid, and return at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT_DIR

STANDIN = '''#!{python}
"""Stand-in for `flagscale serve` (tests only): background the engine as FlagScale's runner does, then return."""
import os, subprocess, sys, yaml
if os.environ.get("STANDIN_FAIL"):
    sys.exit(int(os.environ["STANDIN_FAIL"]))
logs = os.path.join(yaml.safe_load(open(sys.argv[3]))["experiment"]["exp_dir"], "serve_logs")
os.makedirs(os.path.join(logs, "pids"), exist_ok=True)
output = open(os.path.join(logs, "host_0_localhost.output"), "a")
engine = subprocess.Popen(["sh", "-c", "echo serving on 8000; sleep " + os.environ["STANDIN_SECONDS"]],
                          stdout=output, stderr=output, start_new_session=True)
open(os.path.join(logs, "pids", "host_0_localhost.pid"), "w").write(str(engine.pid))
'''


@pytest.fixture
def flagscale(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "flagscale").write_text(STANDIN.format(python=sys.executable))
    (bin_dir / "flagscale").chmod(0o755)
    (tmp_path / "vllm.yaml").write_text("experiment:\n  exp_dir: outputs/qwen3\n")
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(PROJECT_DIR)}


def foreground(env: dict[str, str], cwd: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.foreground", "qwen3", str(cwd / "vllm.yaml")], cwd=cwd,
                            env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_command_lasts_as_long_as_the_engine_and_shows_its_output(flagscale: dict[str, str], tmp_path: Path):
    started = time.monotonic()
    process = foreground(flagscale, tmp_path, STANDIN_SECONDS="3")
    out, err = process.communicate(timeout=30)
    assert time.monotonic() - started >= 3  # not the instant `flagscale serve` itself returned
    assert process.returncode == 1 and "serving on 8000" in out and "has exited" in err


def test_docker_stop_reaches_the_engine(flagscale: dict[str, str], tmp_path: Path):
    process = foreground(flagscale, tmp_path, STANDIN_SECONDS="120")
    assert process.stdout.readline().strip() == "serving on 8000"
    pid = int((tmp_path / "outputs" / "qwen3" / "serve_logs" / "pids" / "host_0_localhost.pid").read_text())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 1
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the engine's whole group (its shell and the sleep it runs) is gone


def test_a_serve_step_that_fails_is_the_command_s_failure(flagscale: dict[str, str], tmp_path: Path):
    process = foreground(flagscale, tmp_path, STANDIN_FAIL="3", STANDIN_SECONDS="1")
    process.communicate(timeout=30)
    assert process.returncode == 3
