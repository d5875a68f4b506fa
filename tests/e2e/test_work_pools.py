"""Production style: prefect.yaml with one process work pool per chip, applied by `flagrelease deploy`, and a
chip host's `prefect worker start --pool cpu` joining its pool. Own Prefect server, so the served deployments of
the other module never compete for the same runs. (Workers running releases from their pools, on PostgreSQL, is
test_two_hosts.py: a release run here too would only repeat it at seven minutes a run.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


def test_deploy_creates_a_pool_per_chip_and_a_chip_hosts_worker_joins_its_pool(server: Settings):
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
        deadline, pool = time.monotonic() + 90, {}
        while time.monotonic() < deadline and pool.get("status") != "READY":
            time.sleep(2)
            pool = requests.get(f"{api}/work_pools/cpu", timeout=10).json()
        workers = requests.post(f"{api}/work_pools/cpu/workers/filter", json={}, timeout=10).json()
        assert pool.get("status") == "READY", pool  # a pool is ready once a worker polls it
        assert [(w["name"], w["status"]) for w in workers] == [("cpu-host-1", "ONLINE")]
        others = requests.get(f"{api}/work_pools/nvidia", timeout=10).json()
        assert others["status"] == "NOT_READY"  # no NVIDIA host joined: its releases wait, nobody else takes them
    finally:
        terminate(worker.pid, timeout_s=20)
