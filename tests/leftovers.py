"""What a test run left running: the engines, services and containers the suite starts, that were not running
before it. `scripts/test.sh` takes a snapshot before pytest and checks after it, so a run that leaves a vLLM
engine, a Prefect server, a registry, a PostgreSQL cluster, a Docker Engine or an evaluation container behind
fails, naming each (pid and command line, or container name).

    python -m tests.leftovers snapshot FILE
    python -m tests.leftovers check FILE
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# the command lines of what the suite starts (tests/conftest.py, flows/services.py, the engine's processes, whose
# titles vLLM sets, e.g. "VLLM::EngineCore"), compared in lower case
STARTED_BY_TESTS = ("vllm", "flagscale", "prefect", "docker-registry", "registry serve", "postgres", "dockerd",
                    "containerd", "chromium", "engine.foreground")


def processes() -> dict[str, str]:
    """pid -> command line of every running process whose command line names something the suite starts."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # ended while we looked
            continue
        if any(name in text.lower() for name in STARTED_BY_TESTS) and "tests.leftovers" not in text:
            found[cmdline.parent.name] = text
    return found


def containers() -> dict[str, str]:
    """id -> name of the containers our stages label (evaluation stacks, benchmark clients), if Docker answers."""
    try:
        listed = subprocess.run(["docker", "ps", "-a", "--filter", "label=flagrelease.role", "--format",
                                 "{{.ID}} {{.Names}}"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if listed.returncode != 0:  # no Docker Engine running: no containers either
        return {}
    return dict(line.split(" ", 1) for line in listed.stdout.splitlines() if " " in line)


def snapshot(path: Path) -> None:
    path.write_text(json.dumps({"processes": processes(), "containers": containers()}))


def check(path: Path, grace_s: float = 15.0) -> list[str]:
    """One line per process or container running now that was not running at the snapshot; one still ending
    (stopped by a finalizer a moment ago) gets `grace_s` to go."""
    before = json.loads(path.read_text())
    deadline = time.monotonic() + grace_s
    while True:
        left = [f"process {pid}: {line[:200]}" for pid, line in sorted(processes().items())
                if before["processes"].get(pid) != line]  # a pid alone may have been reused
        left += [f"container {name} ({cid})" for cid, name in sorted(containers().items())
                 if cid not in before["containers"]]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.leftovers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["snapshot", "check"])
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.action == "snapshot":
        snapshot(args.file)
        return 0
    left = check(args.file)
    for line in left:
        print(f"test.sh: left running after the tests: {line}", file=sys.stderr)
    print(f"test.sh: left running after the tests: {len(left) or 'nothing'}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
