"""The `rebuild` flow: the nightly fan-out that runs every release deployment of the matrix and reports the lot."""

from __future__ import annotations

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.task_runners import ThreadPoolTaskRunner

from flows.errors import UnknownRelease
from flows.matrix import load_matrix, reference_waves
from flows.settings import Settings

RELEASE_FLOW = "release"


class ReleaseRunFailed(Exception):
    pass


@task(name="run-release", cache_policy=NO_CACHE)
def run_release_deployment(release_name: str, timeout_s: int) -> dict[str, str]:
    """Run `release/<name>` on whichever process serves it (the chip's work pool) and wait for its end."""
    run = run_deployment(f"{RELEASE_FLOW}/{release_name}", timeout=timeout_s, as_subflow=True)
    state = run.state
    outcome = {"release": release_name, "flow_run": str(run.id), "state": state.name if state else "unknown"}
    if state is None or not state.is_completed():
        raise ReleaseRunFailed(f"release/{release_name} ended {outcome['state']} (flow run {run.id})")
    return outcome


@flow(name="rebuild", task_runner=ThreadPoolTaskRunner(max_workers=4))
def rebuild(releases: list[str] | None = None, timeout_s: int = 6 * 3600) -> list[dict[str, str]]:
    """Run every release of the matrix (or the given subset), references before the releases that pair with them;
    fail if any of them failed."""
    settings = Settings()
    matrix = load_matrix(settings.matrix, settings.images_dir)
    names = releases or list(matrix.spec.releases)
    unknown = [n for n in names if n not in matrix.spec.releases]
    if unknown:
        raise UnknownRelease(unknown[0], list(matrix.spec.releases))
    rows = []
    for wave in reference_waves(matrix.spec, names):  # a dependent release after the reference it pairs with
        futures = run_release_deployment.map(wave, unmapped(timeout_s))
        for name, future in zip(wave, futures):
            result = future.result(raise_on_failure=False)
            rows.append(result if isinstance(result, dict) else {"release": name, "flow_run": "", "state": f"Failed: {result}"})
    create_table_artifact(key="rebuild", table=rows, description="Nightly rebuild: one row per release")
    failed = [r["release"] for r in rows if r["state"] != "Completed"]
    if failed:
        get_run_logger().error("releases that did not complete: %s", ", ".join(failed))
        raise ReleaseRunFailed(f"{len(failed)} of {len(rows)} releases failed: {', '.join(failed)}")
    return rows
