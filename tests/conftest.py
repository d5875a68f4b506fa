"""Test tiers: `unit` (no services), `services` (real engine/registry/Prefect started by the tests), `e2e`, `faults`.

Everything a test starts runs on free loopback ports with throwaway state, so a developer's running services and
the tests never meet. Prefect is isolated before anything imports it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="flagrelease-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
for _name in [n for n in os.environ if n.startswith("FLAGRELEASE_")]:
    del os.environ[_name]

# FLAGRELEASE_TEST_LANES=2 bash scripts/test.sh runs the suite in lanes (pytest-xdist workers gw0, gw1, one test
# file at a time each; not the default, docs/tests.md). A vLLM
# CPU worker binds the machine's first core unless told otherwise, so each lane's engines get a core of their own:
# the release containers through the setting, the engines the tests start locally through vLLM's variable.
_LANE = os.environ.get("PYTEST_XDIST_WORKER")
if _LANE is not None:
    _CORE = str(int(_LANE.removeprefix("gw")) % (os.cpu_count() or 1))
    os.environ["FLAGRELEASE_ENGINE_CPUS"] = _CORE
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _CORE

import torch  # noqa: E402  (after the environment above; Triton reads TRITON_INTERPRET when kernels are decorated)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run under Triton's interpreter on a CPU box

from flows.settings import Settings  # noqa: E402  (after the Prefect environment above)

PROJECT_DIR = Path(__file__).resolve().parent.parent
TIER_BY_FOLDER = {"unit": "unit", "kernels": "unit", "weights": "unit", "engine": "services", "evaluate": "services",
                  "services": "services",
                  "e2e": "e2e", "faults": "faults"}
# The longest files, longest first (docs/tests.md has their times): in lanes they start first, so the lanes end
# together instead of one waiting on a long file picked up last.
LONGEST_FILES = ("faults/test_faults.py", "e2e/test_deployments.py", "e2e/test_two_hosts.py", "evaluate/test_stage.py",
                 "engine/test_server.py", "services/test_build.py")


def in_lanes(config: pytest.Config) -> bool:
    """The controller of lanes (-n N), or one of its lanes (xdist clears -n in the workers)."""
    return bool(getattr(config.option, "numprocesses", None)) or hasattr(config, "workerinput")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with the tier of its folder, so `-m unit` runs the fast tier; in lanes, longest files first."""
    for item in items:
        folder = _test_path(item).parts[0]
        if folder in TIER_BY_FOLDER:
            item.add_marker(getattr(pytest.mark, TIER_BY_FOLDER[folder]))
    if in_lanes(config):
        def rank(item: pytest.Item) -> int:
            path = _test_path(item).as_posix()
            return LONGEST_FILES.index(path) if path in LONGEST_FILES else len(LONGEST_FILES)
        items.sort(key=rank)  # stable: every file keeps its own order


def _test_path(item: pytest.Item) -> Path:
    return Path(str(item.fspath)).relative_to(PROJECT_DIR / "tests")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def _stop_lanes(signum: int, timeout_s: float = 180.0) -> None:
    """The lanes' controller passes the signal on and waits until no lane has a process of its own left (their
    finalizers have stopped what they started): a lane killed with the controller would leave its services running."""
    lanes = _children(os.getpid())
    for pid in lanes:
        os.kill(pid, signum)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_children(pid) for pid in lanes):
        time.sleep(0.5)


def _interrupt(signum, frame):
    if _LANE is None and _SESSION.get("lanes"):
        _stop_lanes(signum)
    raise KeyboardInterrupt(f"signal {signum}")


# A terminated test run (a CI timeout, `kill`) ends like Ctrl-C: pytest runs the fixtures' finalizers, so the
# engines, containers and services the tests started are stopped, not left running.
signal.signal(signal.SIGTERM, _interrupt)

TIER_SECONDS: dict[str, float] = {}
_SESSION: dict[str, object] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    """Start the clock; in lanes, the controller starts the machine's Docker Engine before any lane does, so no
    lane starts it and then stops it under the other."""
    _SESSION["started"] = time.monotonic()
    if in_lanes(session.config) and not hasattr(session.config, "workerinput"):
        _SESSION["lanes"] = True
        from flows.services import Services

        services = Services(Settings(state_dir=Path(_PREFECT_HOME) / "lanes"))
        _SESSION["docker"] = (services, services.up(("docker",))[0].state == "started")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add each phase's time (setup, call, teardown) to its test's tier."""
    tier = next((name for name in ("unit", "services", "e2e", "faults") if name in report.keywords), "other")
    TIER_SECONDS[tier] = TIER_SECONDS.get(tier, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    """One line at the end with each tier's time, so a slow tier shows in every CI log."""
    if TIER_SECONDS:
        minutes = lambda seconds: f"{seconds / 60:.1f} min"  # noqa: E731
        lanes = terminalreporter.config.option.numprocesses if in_lanes(terminalreporter.config) else 1
        terminalreporter.write_line("tier times: " + ", ".join(
            f"{tier} {minutes(seconds)}" for tier, seconds in TIER_SECONDS.items()) +
            f"; all tests {minutes(sum(TIER_SECONDS.values()))} in {lanes} lane(s), "
            f"{minutes(time.monotonic() - _SESSION['started'])} wall")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if "docker" in _SESSION:
        services, started = _SESSION.pop("docker")
        if started:
            services.down(("docker",))
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_services(state_dir: Path, names: tuple[str, ...], expected_deployments: tuple[str, ...] = ()) -> Iterator[Settings]:
    """Settings on free loopback ports whose releases push to this test's own registry, with the named services
    started for the block and stopped after (only those the block started)."""
    from flows.services import Services

    port = free_port()
    settings = Settings(state_dir=state_dir, prefect_port=free_port(), registry_port=port, offline=True,
                        registry_override=f"127.0.0.1:{port}")
    services = Services(settings, expected_deployments=list(expected_deployments))
    started = services.up(names)
    try:
        yield settings
    finally:
        services.down(tuple(s.name for s in started if s.state == "started"))
        shutil.rmtree(state_dir / "registry", ignore_errors=True)  # GBs of image layers nobody reads again


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """A copy of everything that feeds a release fingerprint, safe to edit."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("releases.yaml", "pyproject.toml"):
        shutil.copy(PROJECT_DIR / name, root / name)
    for name in ("images", "templates", "kernels", "engine", "locks"):
        shutil.copytree(PROJECT_DIR / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root
