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

import torch  # noqa: E402  (after the environment above; Triton reads TRITON_INTERPRET when kernels are decorated)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run under Triton's interpreter on a CPU box

from flows.settings import Settings  # noqa: E402  (after the Prefect environment above)

PROJECT_DIR = Path(__file__).resolve().parent.parent
TIER_BY_FOLDER = {"unit": "unit", "kernels": "unit", "weights": "unit", "engine": "services", "evaluate": "services",
                  "services": "services",
                  "e2e": "e2e", "faults": "faults"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with the tier of its folder, so `-m unit` runs the fast tier."""
    for item in items:
        folder = Path(str(item.fspath)).relative_to(PROJECT_DIR / "tests").parts[0]
        if folder in TIER_BY_FOLDER:
            item.add_marker(getattr(pytest.mark, TIER_BY_FOLDER[folder]))


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# A terminated test run (a CI timeout, `kill`) ends like Ctrl-C: pytest runs the fixtures' finalizers, so the
# engines, containers and services the tests started are stopped, not left running.
signal.signal(signal.SIGTERM, _interrupt)

TIER_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add each phase's time (setup, call, teardown) to its test's tier."""
    tier = next((name for name in ("unit", "services", "e2e", "faults") if name in report.keywords), "other")
    TIER_SECONDS[tier] = TIER_SECONDS.get(tier, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    """One line at the end with each tier's time, so a slow tier shows in every CI log."""
    if TIER_SECONDS:
        minutes = lambda seconds: f"{seconds / 60:.1f} min"  # noqa: E731
        terminalreporter.write_line("tier times: " + ", ".join(
            f"{tier} {minutes(seconds)}" for tier, seconds in TIER_SECONDS.items()) +
            f"; all tests {minutes(sum(TIER_SECONDS.values()))}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
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
