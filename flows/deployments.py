"""Deployments from the matrix, in both styles.

- `serve`: one long-running process on one machine serves every release deployment and the nightly rebuild.
- `prefect.yaml`: production; one process work pool per chip, so the chip's hosts run
  `prefect worker start --pool <chip>` and pick up only their releases. The file is generated from the matrix
  (`flagrelease deployments render`) and a test keeps the committed copy in step with it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

import yaml

from flows.errors import BadInput
from flows.matrix import ReleaseMatrix, Schedule

RELEASE_ENTRYPOINT = "flows/release.py:release"
REBUILD_ENTRYPOINT = "flows/rebuild.py:rebuild"
REBUILD_DEPLOYMENT = "nightly"
CONTROL_POOL = "control"  # runs the rebuild fan-out; it only waits on the chip pools


@dataclass(frozen=True)
class DeploymentSpec:
    flow: str
    name: str
    entrypoint: str
    schedule: Schedule
    parameters: dict[str, object]
    tags: tuple[str, ...]
    work_pool: str
    description: str
    concurrency_limit: int = 1  # a second run of the same release waits for the first (then finds it published)


def deployment_specs(matrix: ReleaseMatrix) -> list[DeploymentSpec]:
    specs = [
        DeploymentSpec(
            flow="release", name=name, entrypoint=RELEASE_ENTRYPOINT, schedule=rel.schedule,
            parameters={"release_name": name}, tags=("release", f"chip:{rel.chip}", f"model:{rel.model}"),
            work_pool=matrix.chips[rel.chip].work_pool,
            description=f"Release {matrix.spec.models[rel.model].display_name} on {matrix.chips[rel.chip].accelerator}",
        )
        for name, rel in matrix.spec.releases.items()
    ]
    specs.append(DeploymentSpec(
        flow="rebuild", name=REBUILD_DEPLOYMENT, entrypoint=REBUILD_ENTRYPOINT, schedule=matrix.spec.rebuild.schedule,
        parameters={}, tags=("rebuild",), work_pool=CONTROL_POOL,
        description="Nightly rebuild of every release in the matrix",
    ))
    return specs


def work_pools(matrix: ReleaseMatrix) -> list[str]:
    return sorted({CONTROL_POOL, *(chip.work_pool for chip in matrix.chips.values())})


def serve_deployments(matrix: ReleaseMatrix, limit: int | None = None) -> None:
    """Serve every deployment from this process until it is stopped (SIGTERM pauses the schedules)."""
    from prefect import serve
    from prefect.client.schemas.schedules import CronSchedule

    from flows.rebuild import rebuild
    from flows.release import release

    flows = {"release": release, "rebuild": rebuild}
    runner_deployments = [
        flows[spec.flow].to_deployment(
            name=spec.name, parameters=spec.parameters, tags=list(spec.tags), description=spec.description,
            schedule=CronSchedule(cron=spec.schedule.cron, timezone=spec.schedule.timezone),
            paused=not spec.schedule.active, concurrency_limit=spec.concurrency_limit,
        )
        for spec in deployment_specs(matrix)
    ]
    serve(*runner_deployments, limit=limit)


def render_prefect_yaml(matrix: ReleaseMatrix, prefect_version: str) -> str:
    document = {
        "name": "flagrelease",
        "prefect-version": prefect_version,
        "build": None,
        "push": None,
        "deployments": [
            {
                "name": spec.name,
                "entrypoint": spec.entrypoint,
                "description": spec.description,
                "tags": list(spec.tags),
                "parameters": spec.parameters,
                "schedules": [{"cron": spec.schedule.cron, "timezone": spec.schedule.timezone, "active": spec.schedule.active}],
                "work_pool": {"name": spec.work_pool},
                "concurrency_limit": spec.concurrency_limit,
            }
            for spec in deployment_specs(matrix)
        ],
    }
    header = ("# Generated from releases.yaml by `flagrelease deployments render`; do not edit by hand.\n"
              "# Production style: one process work pool per chip. `flagrelease deploy` creates the pools and runs\n"
              "# `prefect deploy --all`; each chip host then runs `prefect worker start --pool <chip>` from a checkout\n"
              "# of this repository at the same path (no pull step: the deploy records its working directory).\n")
    return header + yaml.safe_dump(document, sort_keys=False, width=120)


def apply_prefect_yaml(matrix: ReleaseMatrix, project_dir: str, env: dict[str, str], pool: str | None = None) -> None:
    """Create the missing work pools and register the deployments of prefect.yaml with the server: all of them, or
    those of one pool (a chip host whose checkout lives at its own path registers its pool's deployments itself, so
    the runs execute from that checkout)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    from flows.services import venv_tool

    if pool is None:
        chosen = ["--all"]
    else:
        names = [spec.name for spec in deployment_specs(matrix) if spec.work_pool == pool]
        if not names:
            raise BadInput(f"no deployment runs on work pool {pool!r}; pools: {', '.join(work_pools(matrix))}")
        chosen = [argument for name in names for argument in ("--name", name)]
    with get_client(sync_client=True) as client:
        for name in work_pools(matrix):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
    subprocess.run([venv_tool("prefect"), "--no-prompt", "deploy", *chosen], cwd=project_dir, env=env, check=True,
                   capture_output=True, text=True)
