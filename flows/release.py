"""The `release` flow: one <chip + model> release, stage by stage. Each stage is a thin task over a plain module."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.build.image import ImageRef, build_release_image, ensure_local_image, existing_image
from flows.connections import docker_client, registry_client, registry_for
from flows.errors import FlagReleaseError
from flows.evaluate.container import stack_volumes
from flows.evaluate.perf import image_bench
from flows.evaluate.stage import (Endpoint, Evaluation, EvaluationFailed, EvaluationReport, evaluate, image_sources,
                                  write_report)
from flows.evaluate.store import ResultStore
from flows.files import write_model
from flows.kernel_artifacts import KernelArtifacts, check_and_compile, consistency_report, recorded_operators
from flows.matrix import NATIVE_REFERENCE, Model, load_matrix
from flows.plan import Plan, resolve, write_plan
from flows.publish.release import ReleaseRecord
from flows.publish.results import import_published, native_results
from flows.publish.stage import publish
from flows.reports import evaluation_markdown, evaluation_table, plan_markdown
from flows.settings import Settings
from flows.weights.derived import Derivation, image_command
from flows.weights.manifest import WeightsManifest, prepare_weights
from flows.weights.progress import periodic_progress


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
    path = write_model(settings.release_dir(plan.release, plan.fingerprint) / "kernels.json", artifacts)
    logger.info("%d operator checks passed on %s", len(artifacts.consistency), artifacts.device)
    if artifacts.aot_targets:
        logger.info("AOT cache for %s: %d kernels (%s) in %s", ", ".join(artifacts.aot_targets), artifacts.aot_kernels,
                    "reused" if artifacts.aot_reused else "compiled", artifacts.aot_cache_dir)
    create_markdown_artifact(key=f"kernels-{plan.release}", markdown=consistency_report(artifacts),
                             description=f"Operator consistency and AOT cache for {plan.release} ({path})")
    return artifacts


@task(name="find-image", cache_policy=NO_CACHE)
def find_image(plan: Plan, settings: Settings) -> ImageRef | None:
    """One registry request: is this fingerprint already built and pushed? Then kernels and build have nothing to do."""
    image = existing_image(plan, registry_for(plan)[0])
    if image is not None:
        get_run_logger().info("%s is already in the registry as %s: skipping kernels and build", image.by_tag, image.digest)
        record_image(plan, image, settings)
    return image


def record_image(plan: Plan, image: ImageRef, settings: Settings) -> None:
    """image.json beside the plan, and the image artifact for the UI."""
    write_model(settings.release_dir(plan.release, plan.fingerprint) / "image.json", image)
    create_markdown_artifact(key=f"image-{plan.release}", description=f"Image of {plan.release}", markdown=(
        f"# Image: `{plan.release}`\n\n| | |\n|---|---|\n| by digest | `{image.by_digest}` |\n"
        f"| version tag | `{image.by_tag}` |\n| built now | {'yes' if image.built else 'no (fingerprint already pushed)'} |\n"))


@task(name="build", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=[10],
      retry_condition_fn=lambda task, run, state: not isinstance(state.result(raise_on_failure=False), FlagReleaseError))
def build_stage(plan: Plan, kernels: KernelArtifacts, settings: Settings) -> ImageRef:
    """Build and push the FlagOS image for the chip (streaming the build log here)."""
    logger = get_run_logger()
    registry, auth = registry_for(plan)
    outputs = settings.release_dir(plan.release, plan.fingerprint)
    image = build_release_image(plan, kernels, docker_client(settings), registry, outputs / "context",
                                settings.project_dir, auth, logger.info)
    record_image(plan, image, settings)
    return image


@task(name="weights", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=[30],
      retry_condition_fn=lambda task, run, state: not isinstance(state.result(raise_on_failure=False), FlagReleaseError))
def weights_stage(plan: Plan, image: ImageRef, settings: Settings) -> WeightsManifest:
    """Fetch the weights (a derived model's: made by the image from its verified base), prove every byte and the
    structure, and record the verified manifest."""
    logger = get_run_logger()

    def verified(name: str, model: Model, derivation: Derivation | None = None) -> tuple[WeightsManifest, int]:
        return prepare_weights(name, model, plan.revision, settings.weights_dir, settings.project_dir,
                               settings.state_dir, settings.reverify, logger.info,
                               progress=lambda total: periodic_progress(total, logger.info), derivation=derivation)

    derivation = None
    if plan.base is not None:
        base, _ = verified(plan.base.name, plan.base.model)
        logger.info("base weights %s verified; the weights of %s are made from them by the release image",
                    plan.base.name, plan.model_name)
        client = docker_client(settings)
        ensure_local_image(client, image, registry_for(plan)[1], logger.info)
        derivation = Derivation(Path(base.folder), plan.base.model.gguf_file, image_command(client, image.by_digest))
    manifest, hashed = verified(plan.model_name, plan.model, derivation)
    logger.info("weights verified: %d files, %.1f MiB, %s parameters (%s active), %s; %.1f MiB hashed this run",
                len(manifest.files), manifest.total_bytes / 2**20, f"{manifest.total_params:,}",
                f"{manifest.active_params:,}", manifest.dtype, hashed / 2**20)
    write_model(settings.release_dir(plan.release, plan.fingerprint) / "weights.json", manifest)
    rows = "\n".join(f"| `{f.path}` | {f.size:,} | `{f.sha256}` |" for f in manifest.files)
    create_markdown_artifact(key=f"weights-{plan.release}", description=f"Verified weights of {plan.release}", markdown=(
        f"# Weights: `{plan.model_name}`\n\nSource `{manifest.source}` at `{manifest.revision}`, checked against "
        f"{manifest.expected_from}. {manifest.total_params:,} parameters ({manifest.active_params:,} active), "
        f"{manifest.dtype}.\n\n| file | bytes | sha256 |\n|---|---|---|\n{rows}\n"))
    return manifest


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_stage(plan: Plan, image: ImageRef, weights: WeightsManifest, settings: Settings) -> EvaluationReport:
    """Serve the FlagOS stack and the reference, gate every benchmark item by item; fail unless every gated one passed."""
    logger = get_run_logger()
    outputs = settings.release_dir(plan.release, plan.fingerprint)
    endpoints = [Endpoint(url, name) if url else None for url, name in
                 ((settings.candidate_url, settings.candidate_name), (settings.reference_url, settings.reference_name))]
    candidate, reference = image_sources(plan, image.by_digest, Path(weights.folder), *endpoints,
                                         settings.engine_cache_dir, settings.candidate_env, settings.engine_cpus)
    needs_engine = candidate.serve is not None or (reference is not None and reference.serve is not None)
    client = None
    if needs_engine:
        client = docker_client(settings)
        ensure_local_image(client, image, registry_for(plan)[1], logger.info)
    store = ResultStore(settings.state_dir / "evaluations")
    if reference is None:  # another release's native results: those it published travel with its image
        fetch_reference_results(plan, store, settings, logger)
    evaluation = Evaluation(plan=plan, benchmarks_file=settings.project_dir / "benchmarks.yaml",
                            store=store, candidate=candidate,
                            reference=reference, operators=recorded_operators(outputs),
                            concurrency=settings.eval_concurrency, bisect_timeout_s=settings.bisect_timeout_s,
                            bench=image_bench(client, image.by_digest, stack_volumes(
                                Path(weights.folder), settings.engine_cache_dir, "ro")) if client else None)
    report = evaluate(evaluation, client, logger.info, settings.serve_timeout_s)
    path = write_report(report, outputs)
    create_table_artifact(key=f"evaluation-{plan.release}", table=evaluation_table(report),
                          description=f"Consistency of {plan.release}: {report.verdict.value} ({path})")
    create_markdown_artifact(key=f"evaluation-report-{plan.release}", markdown=evaluation_markdown(report),
                             description=f"Consistency report of {plan.release}")
    if not report.passed:
        raise EvaluationFailed(f"{plan.release} is not published: {report.failure_reason()} (report: {path})")
    logger.info("every gated benchmark passed; report written to %s", path)
    return report


def fetch_reference_results(plan: Plan, store: ResultStore, settings: Settings, logger) -> None:
    """Add the reference release's published native results to this host's store (it may run on another host)."""
    matrix = load_matrix(settings.matrix, settings.images_dir)
    registry, _ = registry_client(settings.repository_for(matrix.release(plan.reference).repository))
    try:
        import_published(registry, store, plan.reference, plan.model_name, logger.info)
    except FlagReleaseError as exc:  # the stored results (if any) still serve; the store names what is missing
        logger.warning("native results of %s not fetched from %s: %s", plan.reference, registry.repository, exc)


@task(name="publish", cache_policy=NO_CACHE)
def publish_stage(plan: Plan, image: ImageRef, weights: WeightsManifest, evaluation: EvaluationReport,
                  settings: Settings) -> ReleaseRecord:
    """Attach the card, report and kernels manifest to the image digest, push hub cards, move `latest` last."""
    logger = get_run_logger()
    outputs = settings.release_dir(plan.release, plan.fingerprint)
    native = None
    if plan.reference == NATIVE_REFERENCE:
        native = native_results(ResultStore(settings.state_dir / "evaluations"), plan.release, plan.model_name,
                                plan.suite_name, plan.suite.version, evaluation.revision)
    record, hubs, card_path, changed = publish(
        plan, load_matrix(settings.matrix, settings.images_dir), image, weights, evaluation, registry_for(plan)[0],
        outputs, settings.project_dir, settings.hub_org, logger.info, native)
    for hub in hubs:
        (logger.info if hub.published else logger.warning)("%s %s: %s", hub.hub, hub.repo, hub.detail)
    create_markdown_artifact(key=f"card-{plan.release}", markdown=card_path.read_text(),
                             description=f"Model card of {plan.release} ({card_path})")
    if changed:
        logger.info("published %s as %s:latest; card %s", image.by_digest, image.repository, card_path)
    return record


@flow(name="release", flow_run_name="{release_name}")
def release(release_name: str = "smollm2-cpu") -> dict[str, str]:
    """Release one entry of the matrix. Stages: resolve, kernels, build, weights, evaluate, publish."""
    settings = Settings()
    plan = resolve_stage(release_name, settings)
    image = find_image(plan, settings)
    if image is None:
        kernels = kernels_stage(plan, settings)
        image = build_stage(plan, kernels, settings)
    weights = weights_stage(plan, image, settings)
    evaluation = evaluate_stage(plan, image, weights, settings)
    publish_stage(plan, image, weights, evaluation, settings)
    outputs = settings.release_dir(plan.release, plan.fingerprint)
    return {"release": plan.release, "fingerprint": plan.fingerprint, "image": image.by_digest,
            "weights": weights.folder, "evaluation": evaluation.verdict.value, "card": str(outputs / "README.md"),
            "outputs": str(outputs)}
