"""Keep FlagScale's server in the foreground, as a container's command must.

`flagscale serve <name> <config>` starts the engine in the background and returns: its runner writes a script that
runs `nohup bash -c "$cmd" >> <exp_dir>/serve_logs/host_0_localhost.output & echo $! > <exp_dir>/serve_logs/pids/
host_0_localhost.pid` (FlagScale's runner_serve.py). As the image's CMD the container would end at once and take the
engine with it. This runs the serve step, then follows the engine's output on stdout and ends when the engine does
(exit 1: a server that stops is a failure); SIGTERM (`docker stop`) is passed on to the engine. The stack's
switches are checked first, so a bad one ends the container with one line (exit 2) before FlagScale starts.

    python3 -m engine.foreground <serve name> <config.yaml>
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from engine.operators import EngineError, switches_from_env

SERVE_LOGS = "serve_logs"
PID_FILE = Path("pids") / "host_0_localhost.pid"
OUTPUT_FILE = "host_0_localhost.output"
POLL_S = 1.0


def serve_logs(config: Path) -> Path:
    """Where FlagScale's runner keeps the engine's pid and output: <experiment.exp_dir>/serve_logs."""
    exp_dir = Path(yaml.safe_load(config.read_text())["experiment"]["exp_dir"])
    return (exp_dir if exp_dir.is_absolute() else Path.cwd() / exp_dir) / SERVE_LOGS


def alive(pid: int) -> bool:
    """Whether the engine still runs. As the container's PID 1 this process inherits the engine once FlagScale's
    shell exits, so an ended engine is reaped here (a zombie would still answer `kill -0`)."""
    try:
        ended, _ = os.waitpid(pid, os.WNOHANG)
        if ended == pid:
            return False
    except ChildProcessError:  # not our child: the kernel's answer is enough
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(pid: int) -> None:
    """Pass `docker stop` on: to the engine's whole process group when it has its own, else to the engine."""
    try:
        group = os.getpgid(pid)
        if group != os.getpgid(0):
            os.killpg(group, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def follow(pid: int, output: Path, out=sys.stdout) -> None:
    """Copy the engine's output as it grows until the engine's process is gone."""
    position = 0
    while True:
        running = alive(pid)
        if output.exists():
            with output.open("rb") as handle:
                handle.seek(position)
                chunk = handle.read()
                position += len(chunk)
            if chunk:
                out.write(chunk.decode(errors="replace"))
                out.flush()
        if not running:
            return
        time.sleep(POLL_S)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python3 -m engine.foreground <serve name> <config.yaml>", file=sys.stderr)
        return 2
    name, config = argv[0], Path(argv[1])
    try:
        switches_from_env(os.environ)
    except EngineError as exc:
        print(f"flagos-engine: error: {exc}", file=sys.stderr)
        return 2
    started = subprocess.run(["flagscale", "serve", name, str(config)])
    if started.returncode != 0:
        return started.returncode
    logs = serve_logs(config)
    pid = int((logs / PID_FILE).read_text().strip())
    signal.signal(signal.SIGTERM, lambda signum, frame: stop(pid))
    follow(pid, logs / OUTPUT_FILE)
    print(f"the engine (pid {pid}) started by `flagscale serve {name}` has exited", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
