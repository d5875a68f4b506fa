"""The CLI as a user meets it: a real subprocess, exit codes, one-paragraph errors and never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_DIR, free_port


def flagrelease(*args: str, env: dict[str, str] | None = None, cwd: Path = PROJECT_DIR) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLAGRELEASE_", "PREFECT_API_URL"))}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def state(tmp_path: Path) -> dict[str, str]:
    return {"FLAGRELEASE_STATE_DIR": str(tmp_path / "state"), "FLAGRELEASE_OFFLINE": "true",
            "FLAGRELEASE_PREFECT_PORT": str(free_port())}


def test_list_shows_every_release(state: dict[str, str]):
    result = flagrelease("list", env=state)
    assert result.returncode == 0, result.stderr
    for name in ("qwen3-iluvatar", "qwen3-nvidia", "smollm2-cpu"):
        assert name in result.stdout


def test_unknown_release_exits_2_with_the_known_releases(state: dict[str, str]):
    for command in (["plan", "qwen3-iluvator"], ["run", "qwen3-iluvator"]):
        result = flagrelease(*command, env=state)
        assert result.returncode == 2
        assert "unknown release 'qwen3-iluvator'; known releases: qwen3-iluvatar, qwen3-nvidia, smollm2-cpu" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_malformed_matrix_exits_2_naming_file_and_line(tmp_path: Path, state: dict[str, str]):
    bad = tmp_path / "releases.yaml"
    bad.write_text("chips: [cpu]\nmodels:\n  x: {display_name: X\n")
    result = flagrelease("--matrix", str(bad), "validate", env=state)
    assert result.returncode == 2
    assert f"{bad} is invalid" in result.stderr and "line 4: not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_problem_on_line_100_keeps_its_line_number(tmp_path: Path, state: dict[str, str]):
    """Rich reads ":100:" as an emoji code; the error must still say `releases.yaml:100:`."""
    shutil.copytree(PROJECT_DIR / "images", tmp_path / "images")
    lines = (PROJECT_DIR / "releases.yaml").read_text().splitlines()
    lines = ["#"] * (99 - lines.index("chips: [cpu, nvidia, iluvatar]")) + lines
    lines[99] = "chips: [cpu, nvidia, iluvatar, 7]"
    (tmp_path / "releases.yaml").write_text("\n".join(lines) + "\n")
    result = flagrelease("--matrix", str(tmp_path / "releases.yaml"), "validate", env=state)
    assert result.returncode == 2 and "releases.yaml:100: chips" in result.stderr, result.stderr


def test_plan_writes_the_plan_and_prints_the_fingerprint(state: dict[str, str]):
    result = flagrelease("plan", "smollm2-cpu", env=state)
    assert result.returncode == 0, result.stderr
    fingerprint = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("fingerprint"))
    plan = Path(state["FLAGRELEASE_STATE_DIR"]) / "releases" / "smollm2-cpu" / fingerprint / "plan.json"
    assert plan.is_file()
    assert "unpinned (offline mode: hub not contacted)" in result.stdout


def test_run_without_a_prefect_server_says_how_to_start_it(state: dict[str, str]):
    for quiet in ([], ["--quiet"]):
        result = flagrelease("run", "smollm2-cpu", *quiet, env=state)
        assert result.returncode == 1
        assert "Prefect server is not available" in result.stderr
        assert "flagrelease services up" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("variable, value, field", [("FLAGRELEASE_PREFECT_PORT", "eighty", "prefect_port"),
                                                     ("FLAGRELEASE_ENGINE_CPUS", "cores 0 and 1", "engine_cpus")])
def test_bad_setting_is_named(state: dict[str, str], variable: str, value: str, field: str):
    result = flagrelease("list", env={**state, variable: value})
    assert result.returncode == 2
    assert f"invalid FLAGRELEASE_* setting: {field}" in result.stderr and "Traceback" not in result.stderr


def test_unknown_service_is_bad_input(state: dict[str, str]):
    result = flagrelease("services", "status", "postgres", env=state)
    assert result.returncode == 2
    assert "unknown service 'postgres'; known services: docker, registry, prefect, deployments" in result.stderr


def test_committed_prefect_yaml_matches_the_matrix(state: dict[str, str]):
    result = flagrelease("deployments", "check", env=state)
    assert result.returncode == 0, result.stderr


def test_drifted_prefect_yaml_is_reported(tmp_path: Path, state: dict[str, str]):
    matrix = tmp_path / "releases.yaml"
    matrix.write_text((PROJECT_DIR / "releases.yaml").read_text().replace('cron: "0 1 * * *"', 'cron: "0 5 * * *"'))
    env = {**state, "FLAGRELEASE_IMAGES_DIR": str(PROJECT_DIR / "images")}
    result = flagrelease("--matrix", str(matrix), "deployments", "check", env=env)
    assert result.returncode == 2
    assert "prefect.yaml is out of date" in result.stderr and "flagrelease deployments render > prefect.yaml" in result.stderr
    rendered = flagrelease("--matrix", str(matrix), "deployments", "render", env=env)
    assert "cron: 0 5 * * *" in rendered.stdout


def test_help_lists_every_command():
    result = flagrelease("--help")
    assert result.returncode == 0
    for command in ("list", "validate", "plan", "weights", "lock", "run", "serve", "deploy", "deployments", "services"):
        assert command in result.stdout


def test_lock_refuses_an_unknown_model_and_an_existing_lock(state: dict[str, str]):
    unknown = flagrelease("lock", "smollm3", env=state)
    assert unknown.returncode == 2 and "unknown model 'smollm3'; the matrix has:" in unknown.stderr
    kept = flagrelease("lock", "smollm2-135m-instruct", env=state)
    assert kept.returncode == 2 and "locks/smollm2-135m-instruct.json already exists; pass --replace" in kept.stderr
    assert "Traceback" not in unknown.stderr + kept.stderr


def test_weights_of_a_derived_model_are_left_to_its_release(state: dict[str, str]):
    """Only a release run has the image that makes them: the command says so instead of failing on a missing one."""
    result = flagrelease("weights", "smollm2-moe-cpu", env=state)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "are made by its release image from smollm2-135m-instruct's: `flagrelease run smollm2-moe-cpu`" in result.stderr


def test_a_matrix_elsewhere_reads_the_chip_profiles_beside_it(tmp_path: Path, state: dict[str, str]):
    import shutil

    shutil.copy(PROJECT_DIR / "releases.yaml", tmp_path / "releases.yaml")
    shutil.copytree(PROJECT_DIR / "images", tmp_path / "images")
    profile = tmp_path / "images" / "iluvatar" / "chip.yaml"
    profile.write_text(profile.read_text().replace('["corex:ivcore20"]', '["corex:ivcore99"]'))
    result = flagrelease("--matrix", str(tmp_path / "releases.yaml"), "validate", env=state)
    assert result.returncode == 2, result.stdout
    assert str(profile) in result.stderr and "unknown AOT target(s) ['corex:ivcore99']" in result.stderr
    assert flagrelease("validate", env=state).returncode == 0  # this checkout's own profiles are untouched


def test_deploy_of_an_unknown_pool_is_refused_before_prefect_is_touched(state: dict[str, str]):
    result = flagrelease("deploy", "--pool", "gpu9", env=state)
    assert result.returncode == 2 and "no deployment runs on work pool 'gpu9'; pools: control, cpu, iluvatar, nvidia" in result.stderr
