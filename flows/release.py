"""The `release` flow: one <chip + model> release, stage by stage. Each stage is a thin task over a plain module."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.kernel_artifacts import KernelArtifacts, check_and_compile, consistency_report, write_artifacts
from flows.matrix import load_matrix
from flows.plan import Plan, resolve, write_plan
from flows.reports import plan_markdown
from flows.settings import Settings


@task(name="resolve", cache_policy=NO_CACHE)
def resolve_stage(release_name: str, settings: Settings) -> Plan:
    """Load the matrix entry, pin every input and compute the fingerprint; publish the plan for the UI."""
    logger = get_run_logger()
    plan = resolve(load_matrix(settings.matrix, settings.images_dir), release_name, settings)
    path = write_plan(plan, settings.release_dir(plan.release, plan.fingerprint))
    if plan.revision.pinned:
        logger.info("model revision %s pinned to %s", plan.revision.requested, plan.revision.resolved)
    else:
        logger.warning("model revision %s is unpinned: %s", plan.revision.requested, plan.revision.note)
    logger.info("fingerprint %s over %d inputs; plan written to %s", plan.fingerprint, len(plan.inputs), path)
    create_markdown_artifact(key=f"plan-{plan.release}", markdown=plan_markdown(plan, path),
                             description=f"Release plan for {plan.release}")
    return plan


@task(name="kernels", cache_policy=NO_CACHE)
def kernels_stage(plan: Plan, settings: Settings) -> KernelArtifacts:
    """Check every kernel against its reference and compile them ahead of time for the chip's targets."""
    logger = get_run_logger()
    artifacts = check_and_compile(plan, settings.state_dir, settings.project_dir)
    path = write_artifacts(artifacts, settings.release_dir(plan.release, plan.fingerprint) / "kernels.json")
    logger.info("%d operator checks passed on %s", len(artifacts.consistency), artifacts.device)
    if artifacts.aot_targets:
        logger.info("AOT cache for %s: %d kernels (%s) in %s", ", ".join(artifacts.aot_targets), artifacts.aot_kernels,
                    "reused" if artifacts.aot_reused else "compiled", artifacts.aot_cache_dir)
    create_markdown_artifact(key=f"kernels-{plan.release}", markdown=consistency_report(artifacts),
                             description=f"Operator consistency and AOT cache for {plan.release} ({path})")
    return artifacts


@flow(name="release", flow_run_name="{release_name}")
def release(release_name: str = "smollm2-cpu") -> dict[str, str]:
    """Release one entry of the matrix. Stages: resolve, kernels (more stages join as they are built)."""
    settings = Settings()
    plan = resolve_stage(release_name, settings)
    kernels_stage(plan, settings)
    return {"release": plan.release, "fingerprint": plan.fingerprint,
            "outputs": str(settings.release_dir(plan.release, plan.fingerprint))}
