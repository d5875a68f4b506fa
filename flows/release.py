"""The `release` flow: one <chip + model> release, stage by stage. Each stage is a thin task over a plain module."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.matrix import load_matrix
from flows.plan import Plan, resolve, write_plan
from flows.reports import plan_markdown
from flows.settings import Settings


@task(name="resolve", cache_policy=NO_CACHE)
def resolve_stage(release_name: str, settings: Settings) -> Plan:
    """Load the matrix entry, pin every input and compute the fingerprint; publish the plan for the UI."""
    logger = get_run_logger()
    plan = resolve(load_matrix(settings.matrix, settings.images_dir), release_name, settings)
    path = write_plan(plan, settings.plans_dir)
    if plan.revision.pinned:
        logger.info("model revision %s pinned to %s", plan.revision.requested, plan.revision.resolved)
    else:
        logger.warning("model revision %s is unpinned: %s", plan.revision.requested, plan.revision.note)
    logger.info("fingerprint %s over %d inputs; plan written to %s", plan.fingerprint, len(plan.inputs), path)
    create_markdown_artifact(key=f"plan-{plan.release}", markdown=plan_markdown(plan, path),
                             description=f"Release plan for {plan.release}")
    return plan


@flow(name="release", flow_run_name="{release_name}")
def release(release_name: str = "smollm2-cpu") -> dict[str, str]:
    """Release one entry of the matrix. Stages: resolve (more stages join as they are built)."""
    settings = Settings()
    plan = resolve_stage(release_name, settings)
    return {"release": plan.release, "fingerprint": plan.fingerprint,
            "plan": str(settings.plans_dir / plan.release / f"{plan.fingerprint}.json")}
