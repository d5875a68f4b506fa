"""Production style: prefect.yaml with one process work pool per chip, applied by `flagrelease deploy`, and a
chip host's `prefect worker start --pool cpu` running the release. Own Prefect server, so the served deployments
of the other module never compete for the same runs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from flows.deployments import work_pools
from flows.matrix import load_matrix
from flows.services import child_env, terminate
from flows.settings import Settings
from tests.conftest import PROJECT_DIR, running_services

MATRIX = load_matrix(PROJECT_DIR / "releases.yaml")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with running_services(tmp_path_factory.mktemp("pools") / "state", ("docker", "registry", "prefect")) as settings:
        yield settings


def run(settings: Settings, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=PROJECT_DIR, env={**os.environ, **child_env(settings)},
                          capture_output=True, text=True, timeout=timeout)


def test_deploy_creates_a_pool_per_chip_and_a_worker_runs_the_release(server: Settings):
    deployed = run(server, str(BIN / "flagrelease"), "deploy")
    assert deployed.returncode == 0, deployed.stderr
    api = server.prefect_api_url
    pools = requests.post(f"{api}/work_pools/filter", json={}, timeout=10).json()
    assert {p["name"] for p in pools} == set(work_pools(MATRIX)) == {"control", "cpu", "iluvatar", "nvidia"}
    for name, rel in MATRIX.spec.releases.items():
        deployment = requests.get(f"{api}/deployments/name/release/{name}", timeout=10).json()
        assert deployment["work_pool_name"] == MATRIX.chips[rel.chip].work_pool
        assert deployment["schedules"][0]["schedule"]["cron"] == rel.schedule.cron

    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--name", "cpu-host-1"],
                              cwd=PROJECT_DIR, env={**os.environ, **child_env(server)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        watched = run(server, str(BIN / "prefect"), "deployment", "run", "release/smollm2-cpu", "--watch",
                      "--watch-timeout", "1500", timeout=1600)
        assert watched.returncode == 0, watched.stdout + watched.stderr
        assert list((server.releases_dir / "smollm2-cpu").glob("*/image.json"))
    finally:
        terminate(worker.pid, timeout_s=20)
