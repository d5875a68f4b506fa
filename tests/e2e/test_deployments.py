"""End to end through a real Prefect server and the served deployments, as a release engineer drives them:
`prefect deployment run release/<name> --watch`, the nightly rebuild, and the UI in headless Chromium."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from flows.deployments import deployment_specs
from flows.matrix import load_matrix
from flows.services import Services, child_env
from flows.settings import Settings
from flows.uicheck import check_page, chromium
from tests.conftest import PROJECT_DIR, free_port

MATRIX = load_matrix(PROJECT_DIR / "releases.yaml")
EXPECTED = [f"{spec.flow}/{spec.name}" for spec in deployment_specs(MATRIX)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A Prefect server and the `serve` process, on free ports with a throwaway state folder."""
    settings = Settings(state_dir=tmp_path_factory.mktemp("e2e") / "state", prefect_port=free_port(),
                        registry_port=free_port(), offline=True)
    services = Services(settings, expected_deployments=EXPECTED)
    services.up(("prefect", "deployments"))
    yield settings
    services.down(("prefect", "deployments"))


def prefect(settings: Settings, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **child_env(settings)}
    tool = str(Path(sys.executable).parent / "prefect")
    return subprocess.run([tool, *args], env=env, capture_output=True, text=True, timeout=timeout)


def api(settings: Settings, method: str, path: str, **body) -> object:
    response = requests.request(method, f"{settings.prefect_api_url}{path}", json=body or None, timeout=10)
    response.raise_for_status()
    return response.json()


def test_every_release_is_a_deployment_with_its_schedule_and_parameters(stack: Settings):
    for name, rel in MATRIX.spec.releases.items():
        deployment = api(stack, "GET", f"/deployments/name/release/{name}")
        [schedule] = deployment["schedules"]
        assert schedule["schedule"]["cron"] == rel.schedule.cron
        assert schedule["schedule"]["timezone"] == rel.schedule.timezone
        assert schedule["active"] is True
        assert deployment["parameters"] == {"release_name": name}
        assert f"chip:{rel.chip}" in deployment["tags"]
        assert deployment["status"] == "READY"
    nightly = api(stack, "GET", "/deployments/name/rebuild/nightly")
    assert nightly["schedules"][0]["schedule"]["cron"] == MATRIX.spec.rebuild.schedule.cron


@pytest.mark.parametrize("release", ["smollm2-cpu", "qwen3-iluvatar"])
def test_deployment_run_watch_completes_and_publishes_the_plan(stack: Settings, release: str):
    result = prefect(stack, "deployment", "run", f"release/{release}", "--watch", "--watch-timeout", "240")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Completed" in result.stdout
    [plan_file] = (stack.releases_dir / release).glob("*/plan.json")
    plan = json.loads(plan_file.read_text())
    assert plan["release"] == release and plan_file.parent.name == plan["fingerprint"]
    kernels = json.loads((plan_file.parent / "kernels.json").read_text())
    assert kernels["consistency"] and all(row["passed"] for row in kernels["consistency"])
    [artifact] = api(stack, "POST", "/artifacts/latest/filter", artifacts={"key": {"any_": [f"plan-{release}"]}})
    assert plan["fingerprint"] in artifact["data"]
    assert f"# Release plan: `{release}`" in artifact["data"]
    [kernels_artifact] = api(stack, "POST", "/artifacts/latest/filter", artifacts={"key": {"any_": [f"kernels-{release}"]}})
    assert "| rms_norm | bfloat16 |" in kernels_artifact["data"]


def test_a_failing_release_makes_watch_exit_non_zero(stack: Settings):
    result = prefect(stack, "deployment", "run", "release/smollm2-cpu", "-p", "release_name=no-such-release",
                     "--watch", "--watch-timeout", "240")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Failed" in result.stdout
    [run] = api(stack, "POST", "/flow_runs/filter", flow_runs={"name": {"any_": ["no-such-release"]}})
    assert run["state"]["type"] == "FAILED"
    assert "unknown release 'no-such-release'" in run["state"]["message"]


def test_nightly_rebuild_runs_every_release_deployment(stack: Settings):
    result = prefect(stack, "deployment", "run", "rebuild/nightly", "--watch", "--watch-timeout", "400", timeout=500)
    assert result.returncode == 0, result.stdout + result.stderr
    [artifact] = api(stack, "POST", "/artifacts/latest/filter", artifacts={"key": {"any_": ["rebuild"]}})
    rows = json.loads(artifact["data"])
    assert {r["release"]: r["state"] for r in rows} == {name: "Completed" for name in MATRIX.spec.releases}
    for row in rows:  # each row links a real child flow run of the release deployment
        child = api(stack, "GET", f"/flow_runs/{row['flow_run']}")
        assert child["state"]["type"] == "COMPLETED" and child["parameters"] == {"release_name": row["release"]}


@pytest.mark.skipif(chromium() is None, reason="chromium not installed (bash scripts/setup.sh --with-browser)")
def test_prefect_ui_lists_every_release_deployment_with_its_schedule(stack: Settings, tmp_path: Path):
    check = check_page(f"{stack.prefect_ui_url}/deployments", tmp_path / "deployments.png",
                       expect=[*MATRIX.spec.releases, "nightly", "every day"])
    assert check.missing == []
    assert check.screenshot.stat().st_size > 20_000  # a rendered page, not a blank one
