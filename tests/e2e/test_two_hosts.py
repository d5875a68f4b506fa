"""Two chip hosts, one Prefect: the production topology on one machine. A Prefect server on PostgreSQL (Debian's
postgresql, a private cluster), one registry, and two process workers on two work pools, each with its own
checkout and state folder; they share only Prefect and the registry. The reference release (`smollm2-cpu`,
compared with its own native stack) runs on host A; the dependent one (`smollm2-cpu-b` on pool `cpu-b`, compared
with smollm2-cpu's native answers) on host B, which has none of A's state: its reference comes from the registry,
as the artifact smollm2-cpu published on its image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from flows.build.cache import cache_root
from flows.evaluate.store import StoredResults
from flows.publish.release import MOVING_TAG, attached_record
from flows.registry import RegistryClient, Repository
from flows.services import Services, child_env, terminate
from flows.settings import Settings
from tests.conftest import PROJECT_DIR, free_port
from tests.evaluate.conftest import smollm2_gguf  # noqa: F401 (fixture: the SmolLM2 GGUF in the machine's test weights)

BIN = Path(sys.executable).parent
CHECKOUT = ("flows", "engine", "kernels", "images", "templates", "locks", "releases.yaml", "benchmarks.yaml",
            "pyproject.toml")
DEPENDENT = "smollm2-cpu-b"
ITEMS = 60
TOKEN_ITEMS = 8  # scored token by token on host A, found again on host B: a few show that the scores travel


def postgres_tool(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        pytest.fail("PostgreSQL is not installed: bash scripts/setup.sh --for-tests installs Debian's postgresql")
    return str(found[-1])


def as_postgres(argv: list[str]) -> list[str]:
    """initdb and the server refuse to run as root."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="module")
def postgres() -> Iterator[tuple[str, int]]:
    """A private PostgreSQL cluster on a free loopback port; yields the Prefect database URL and the port."""
    root = Path(tempfile.mkdtemp(prefix="flagrelease-pg-"))  # outside pytest's root-only temp folders
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    port, data = free_port(), root / "data"
    subprocess.run(as_postgres([postgres_tool("initdb"), "-D", str(data), "-U", "flagrelease", "--auth=trust"]),
                   check=True, capture_output=True)
    subprocess.run(as_postgres([postgres_tool("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
                                f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"]), check=True,
                   capture_output=True)
    try:
        subprocess.run([postgres_tool("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "flagrelease", "prefect"],
                       check=True, capture_output=True)
        yield f"postgresql+asyncpg://flagrelease@127.0.0.1:{port}/prefect", port
    finally:
        subprocess.run(as_postgres([postgres_tool("pg_ctl"), "-D", str(data), "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def checkout(root: Path) -> Path:
    """A host's own copy of the project, with a second cpu pool and a release on it that pairs with smollm2-cpu."""
    root.mkdir(parents=True)
    for name in CHECKOUT:
        source = PROJECT_DIR / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    profile = (root / "images" / "cpu" / "chip.yaml").read_text()
    (root / "images" / "cpu-b").mkdir()
    (root / "images" / "cpu-b" / "chip.yaml").write_text(
        profile.replace("name: cpu\n", "name: cpu-b\n").replace("work_pool: cpu\n", "work_pool: cpu-b\n"))
    matrix = yaml.safe_load((root / "releases.yaml").read_text())
    matrix["chips"].append("cpu-b")
    matrix["suites"]["cpu-smoke"]["benchmarks"]["arithmetic"].update(limit=ITEMS, token_items=TOKEN_ITEMS)
    matrix["releases"][DEPENDENT] = {"chip": "cpu-b", "model": "smollm2-135m-instruct", "schedule": {"cron": "0 1 * * *"},
                                     "repository": "127.0.0.1:5000/flagrelease/smollm2-135m-cpu-b",
                                     "suite": "cpu-smoke", "reference": "smollm2-cpu"}
    (root / "releases.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))
    rendered = subprocess.run([sys.executable, "-m", "flows.cli", "deployments", "render"], cwd=root, check=True,
                              capture_output=True, text=True, env=clean_env())
    (root / "prefect.yaml").write_text(rendered.stdout)
    return root


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("FLAGRELEASE_", "PREFECT_"))}


def host(project: Path, server: Settings) -> Settings:
    return Settings(project_dir=project, matrix=project / "releases.yaml", images_dir=project / "images",
                    state_dir=project.parent / "state", prefect_port=server.prefect_port,
                    registry_port=server.registry_port, registry_override=f"127.0.0.1:{server.registry_port}",
                    offline=True, weights_dir=cache_root() / "test-weights")


def on_host(settings: Settings, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=settings.project_dir, env={**clean_env(), **child_env(settings)},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def topology(postgres: tuple[str, int], tmp_path_factory: pytest.TempPathFactory,
             smollm2_gguf: Path) -> Iterator[tuple[Settings, Settings, Settings]]:  # noqa: F811 (the fixture)
    root = tmp_path_factory.mktemp("two-hosts")
    server = Settings(state_dir=root / "server", prefect_port=free_port(), registry_port=free_port(), offline=True,
                      prefect_database_url=postgres[0])
    services = Services(server)
    started = services.up(("docker", "registry", "prefect"))
    a, b = host(checkout(root / "host-a" / "checkout"), server), host(checkout(root / "host-b" / "checkout"), server)
    workers = []
    try:
        for settings, pool in ((a, "cpu"), (b, "cpu-b")):
            deployed = on_host(settings, sys.executable, "-m", "flows.cli", "deploy", "--pool", pool)
            assert deployed.returncode == 0, deployed.stderr
            log = (settings.project_dir.parent / "worker.log").open("w")
            workers.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name",
                                             f"{pool}-host"], cwd=settings.project_dir, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**clean_env(), **child_env(settings)}))
        yield server, a, b
    finally:
        for worker in workers:
            terminate(worker.pid, timeout_s=20)
        services.down(tuple(s.name for s in started if s.state == "started"))


def native_records(settings: Settings) -> list[StoredResults]:
    return [StoredResults.model_validate_json(p.read_text())
            for p in sorted((settings.state_dir / "evaluations").rglob("*.json")) if p.parent.name == "arithmetic"]


def flow_runs_in_postgres(port: int) -> int:
    counted = subprocess.run([postgres_tool("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "flagrelease", "-d",
                              "prefect", "-tAc", "select count(*) from flow_run where state_type = 'COMPLETED'"],
                             check=True, capture_output=True, text=True)
    return int(counted.stdout.strip())


def test_the_dependent_release_on_another_host_pairs_with_the_reference_from_the_registry(topology, postgres):
    server, a, b = topology
    for settings, pool in ((a, "cpu"), (b, "cpu-b")):
        name = "smollm2-cpu" if pool == "cpu" else DEPENDENT
        deployment = requests.get(f"{server.prefect_api_url}/deployments/name/release/{name}", timeout=10).json()
        assert deployment.get("work_pool_name") == pool, deployment
        assert str(settings.project_dir) in json.dumps(deployment["pull_steps"])  # runs from that host's checkout

    for release in ("smollm2-cpu", DEPENDENT):
        watched = on_host(a, str(BIN / "prefect"), "deployment", "run", f"release/{release}", "--watch",
                          "--watch-timeout", "1500", timeout=1600)
        assert watched.returncode == 0, f"{release}: {watched.stdout[-3000:]}{watched.stderr[-2000:]}"

    reference_stacks = {r.stack for r in native_records(a) if r.stack.role == "native"}
    fetched = [r for r in native_records(b) if r.stack.role == "native"]
    assert fetched and {r.stack for r in fetched} <= reference_stacks  # host B ran no native stack of its own
    assert all(r.stack.release == "smollm2-cpu" for r in fetched)
    assert not [r for r in native_records(a) if r.stack.release == DEPENDENT]  # nothing of B reached A's state
    [report_path] = (b.state_dir / "releases" / DEPENDENT).glob("*/evaluation.json")
    report = json.loads(report_path.read_text())
    assert report["reference"] == "stored results of smollm2-cpu" and report["verdict"] == "PASS"
    assert report["outcomes"][0]["gate"]["items"] == ITEMS

    registry = RegistryClient(Repository.parse(f"127.0.0.1:{server.registry_port}/flagrelease/smollm2-135m-cpu-b"))
    published = registry.manifest_digest(MOVING_TAG)
    assert published is not None and attached_record(registry, published).verdict == "PASS"
    assert flow_runs_in_postgres(postgres[1]) >= 2  # the runs are recorded in the PostgreSQL database
