"""One fault per case, injected into a real run of the `smollm2-cpu` release, then the invariants: no `latest` on an
image that failed its gate or was not fully pushed, every pushed tag's blobs complete, the verified-weights
manifest complete or absent. Cases run in order: the first leaves a registry holding the built image but no
release (its storage is the snapshot later cases start from), so no case pays for a second image build."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import docker
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prefect.client.orchestration import get_client

from flows.publish.release import referrers
from flows.registry import RegistryClient, Repository
from flows.services import Services
from tests.conftest import PROJECT_DIR
from tests.engine.conftest import engine_server, plain_vllm
from tests.faults.conftest import (REPOSITORY, SMALL_SUITE_ITEMS, Bench, Proxy, blobs_complete, keep_only_native_results,
                                   latest_digest, record, run_with_fault, weights_manifest_state, weights_manifests)
from tests.unit.test_matrix import JUNK, committed, leaf_paths, setter, write

SNAPSHOT: dict[str, Path] = {}
MOE_RELEASE = "smollm2-moe-cpu"
MOE_REPOSITORY = "flagrelease/smollm2-moe-cpu"


def image_digest(bench: Bench) -> str:
    [image_file] = bench.state.glob("releases/smollm2-cpu/*/image.json")
    return json.loads(image_file.read_text())["digest"]


def evaluation_of(bench: Bench, release: str = "smollm2-cpu") -> dict:
    [report] = bench.state.glob(f"releases/{release}/*/evaluation.json")
    return json.loads(report.read_text())


def test_a_candidate_that_cannot_show_our_kernels_ran_is_refused(bench: Bench, smollm2_gguf: Path):
    """vLLM without our plugin's report answering as the FlagOS endpoint: it serves no operator report, so nothing
    shows our kernels ran; the run fails before the candidate is asked, the report is written, nothing moves."""
    registry = bench.registry("refused", None)
    host = f"127.0.0.1:{registry.registry_port}"
    with plain_vllm(smollm2_gguf) as other_engine:
        state = bench.run(host, FLAGRELEASE_CANDIDATE_URL=other_engine)
    report = evaluation_of(bench)
    [outcome] = report["outcomes"]
    assert state.is_failed() and "the flagos endpoint" in state.message and "serves no operator report" in state.message
    assert outcome["gate"] is None and report["verdict"] == "INCONCLUSIVE" and latest_digest(host) is None
    record("candidate is not a FlagOS engine (plain vLLM URL)", "refused before it is asked, nothing published",
           f"{state.type.value}; report {report['verdict']}; latest {latest_digest(host)}", blobs_complete(host))
    SNAPSHOT["built"] = registry.state_dir / "registry" / "data"  # the image pushed, no release published


def test_a_broken_integration_fails_the_gate_and_publishes_nothing(bench: Bench):
    """The FlagOS stack of the real image with the engine passing [up, gate] to our SwiGLU kernel: the committed
    kernels are untouched (the kernels stage passed them), the integration is wrong, the gate must FAIL, and the
    bisection must name silu_and_mul (the operator whose integration is broken) with the line that keeps it native."""
    registry = bench.registry("integration", SNAPSHOT["built"])
    host = f"127.0.0.1:{registry.registry_port}"
    state = bench.run(host, FLAGRELEASE_CANDIDATE_ENV=json.dumps({"FLAGOS_FAULT": "gate-up-swapped"}))
    report = evaluation_of(bench)
    [outcome] = report["outcomes"]
    flagos = outcome["operators"]["flagos"]
    kernels = json.loads(next(bench.state.glob("releases/smollm2-cpu/*/kernels.json")).read_text())
    assert all(row["passed"] for row in kernels["consistency"])  # the kernels themselves are correct
    assert state.is_failed() and "is not published: arithmetic: FAIL" in state.message
    assert outcome["gate"]["verdict"] == "FAIL" and latest_digest(host) is None
    assert flagos["fault"] == "gate-up-swapped" and sum(o["calls"] for o in flagos["operators"]) > 0
    assert "flagos" not in {s["stack"] for s in report["perf"]}  # a FAIL publishes nothing: no time spent timing it
    diagnosis = outcome["diagnosis"]
    assert diagnosis["culprits"] == ["silu_and_mul"] and len(diagnosis["probes"]) <= 3
    assert diagnosis["probes"][-1]["operators"] == ["silu_and_mul"] and diagnosis["probes"][-1]["reproduces"]
    assert "culprit: silu_and_mul alone reproduces the failure" in state.message
    assert "native_ops: {silu_and_mul:" in state.message and "images/cpu/chip.yaml" in state.message
    extra = f"{diagnosis['requests']} requests in {sum(p['seconds'] for p in diagnosis['probes']):.0f} s"
    record("broken integration (gate/up swapped)", "gate FAIL, culprit named, nothing published",
           f"{state.type.value}; FlagOS {outcome['gate']['flagos_accuracy']:.3f} vs native "
           f"{outcome['gate']['native_accuracy']:.3f}; bisection: {', '.join(diagnosis['culprits'])} ({extra}, "
           f"evaluation {diagnosis['original_requests']} in {diagnosis['original_seconds']:.0f} s)", blobs_complete(host))


def test_a_mild_fault_accuracy_cannot_see_fails_the_token_gate_with_its_culprit(bench: Bench):
    """RMSNorm called with epsilon x 100 (both norm operators): the answers barely move, so accuracy on the small
    suite cannot FAIL it, but token by token the FlagOS stack departs from native far beyond the chip's calibrated
    token_gate. The run must FAIL on the token signal, publish nothing, and the bisection on the token signal must
    name one of the two norm operators (each alone reproduces it; the report says which it confirmed)."""
    registry = bench.registry("mild", SNAPSHOT["built"])
    host = f"127.0.0.1:{registry.registry_port}"
    state = bench.run(host, FLAGRELEASE_CANDIDATE_ENV=json.dumps({"FLAGOS_FAULT": "norm-eps-x100"}))
    report = evaluation_of(bench)
    [outcome] = report["outcomes"]
    tokens, diagnosis = outcome["tokens"], outcome["diagnosis"]
    assert state.is_failed() and "is not published: arithmetic: FAIL" in state.message and latest_digest(host) is None
    assert outcome["gate"]["verdict"] != "FAIL" and tokens["verdict"] == "FAIL"  # accuracy alone would not stop it
    assert outcome["operators"]["flagos"]["fault"] == "norm-eps-x100"
    assert tokens["flagos"]["mean_abs_delta"] > tokens["thresholds"]["max_mean_abs_delta"]
    assert tokens["baseline"]["mean_abs_delta"] <= tokens["thresholds"]["max_mean_abs_delta"]  # native vs native
    assert diagnosis["measure"].startswith("mean |delta logprob|") and len(diagnosis["probes"]) <= 3
    assert diagnosis["culprits"] in (["rms_norm"], ["fused_add_rms_norm"]) and diagnosis["probes"][-1]["reproduces"]
    assert f"culprit: {diagnosis['culprits'][0]} alone reproduces the failure" in state.message
    record("mild fault (RMSNorm epsilon x 100)", "token gate FAIL, culprit named, nothing published",
           f"{state.type.value}; accuracy {outcome['gate']['verdict']} (FlagOS {outcome['gate']['flagos_accuracy']:.3f} "
           f"vs {outcome['gate']['native_accuracy']:.3f}); mean |delta logprob| {tokens['flagos']['mean_abs_delta']:.3g} "
           f"vs native floor {tokens['baseline']['mean_abs_delta']:.3g}; bisection: {diagnosis['culprits'][0]} "
           f"({diagnosis['requests']} requests in {diagnosis['seconds']:.0f} s)", blobs_complete(host))


def test_an_moe_router_fault_fails_and_the_router_is_named(bench: Bench):
    """The MoE release (SmolLM2 up-cycled, its weights made by its own image) with our router binding not
    renormalising the top-2 weights the model asks for: the kernels are correct, the integration is not. The run
    must FAIL, publish nothing, and the bisection must name topk_softmax, the operator whose binding is wrong."""
    registry = bench.registry("moe", SNAPSHOT["built"])  # the dense image's layers: the MoE image shares most
    host = f"127.0.0.1:{registry.registry_port}"
    state = bench.run(host, MOE_RELEASE, FLAGRELEASE_CANDIDATE_ENV=json.dumps({"FLAGOS_FAULT": "moe-not-renormalized"}))
    report = evaluation_of(bench, MOE_RELEASE)
    [outcome] = report["outcomes"]
    flagos, diagnosis, tokens = outcome["operators"]["flagos"], outcome["diagnosis"], outcome["tokens"]
    calls = {o["name"]: o["calls"] for o in flagos["operators"]}
    assert state.is_failed() and "is not published: arithmetic: FAIL" in state.message
    assert latest_digest(host, MOE_REPOSITORY) is None and flagos["fault"] == "moe-not-renormalized"
    assert calls["topk_softmax"] > 0 and calls["topk_softmax"] == calls["moe_sum"] == calls["silu_and_mul"]
    assert "FAIL" in (outcome["gate"]["verdict"], tokens["verdict"])
    assert diagnosis["culprits"] == ["topk_softmax"] and diagnosis["probes"][-1]["reproduces"]
    assert "culprit: topk_softmax alone reproduces the failure" in state.message
    record("MoE router fault (top-k weights not renormalised)", "FAIL, culprit named, nothing published",
           f"{state.type.value}; accuracy {outcome['gate']['verdict']} (FlagOS {outcome['gate']['flagos_accuracy']:.3f} "
           f"vs {outcome['gate']['native_accuracy']:.3f}); tokens {tokens['verdict']} (mean |delta logprob| "
           f"{tokens['flagos']['mean_abs_delta']:.3g}); bisection: {diagnosis['culprits'][0]} "
           f"({diagnosis['requests']} requests in {diagnosis['seconds']:.0f} s)", blobs_complete(host, MOE_REPOSITORY))


def test_the_registry_stopped_during_the_image_push(bench: Bench):
    """A registry without the image: the run builds and starts pushing; the registry stops as the first layer
    upload begins. The build task fails (after its one retry) naming the push; after a restart the re-run pushes
    and publishes."""
    registry = bench.registry("push")
    host = f"127.0.0.1:{registry.registry_port}"
    services = Services(registry)
    uploads = registry.state_dir / "registry" / "data" / "docker" / "registry" / "v2" / "repositories"

    def stop_on_first_upload() -> bool:
        if not any(uploads.glob("*/*/_uploads/*")):
            return False
        services.down(("registry",))
        return True

    state, stopped = run_with_fault(bench, host, stop_on_first_upload, poll_s=0.05)
    services.up(("registry",))
    assert stopped and state.is_failed() and "push" in state.message.lower()
    assert latest_digest(host) is None
    rerun = bench.run(host)
    assert rerun.is_completed() and latest_digest(host) == image_digest(bench)
    record("registry stopped during the image push", "build Failed naming the push; re-run pushes, publishes",
           f"{state.message[:70]}...; re-run {rerun.type.value}", blobs_complete(host))


def test_the_candidate_container_killed_during_evaluation(bench: Bench):
    registry = bench.registry("killed", SNAPSHOT["built"])
    host = f"127.0.0.1:{registry.registry_port}"
    engine = docker.from_env()

    stored = bench.state / "evaluations"
    keep_only_native_results(stored)  # nothing of the candidate to reuse: it must be asked, and die while asked

    def kill_candidate() -> bool:
        for container in engine.containers.list(filters={"label": "flagrelease.role=evaluation"}):
            if container.name.endswith("-flagos") and b"POST /v1/chat/completions" in container.logs():
                container.kill()
                return True
        return False

    state, killed = run_with_fault(bench, host, kill_candidate)
    assert killed and state.is_failed() and latest_digest(host) is None
    assert not engine.containers.list(all=True, filters={"label": "flagrelease.role=evaluation"})  # always removed
    records = [json.loads(p.read_text()) for p in stored.rglob("*.json") if p.parent.name != "perf"]
    assert {r["stack"]["role"] for r in records} == {"native"}  # it died with items unanswered: nothing of it kept
    rerun = bench.run(host)
    assert rerun.is_completed() and latest_digest(host) == image_digest(bench)
    record("candidate container killed mid-evaluation", "run Failed, nothing published; re-run publishes",
           f"{state.type.value}: {state.message[:70]}...; re-run {rerun.type.value}", blobs_complete(host))


def test_the_registry_answering_5xx_for_a_while(bench: Bench):
    registry = bench.registry("flaky", SNAPSHOT["built"])
    proxy = Proxy(f"http://127.0.0.1:{registry.registry_port}", fail_first=3)
    host = f"127.0.0.1:{proxy.port}"
    try:
        state = bench.run(host)
    finally:
        proxy.close()
    direct = f"127.0.0.1:{registry.registry_port}"
    assert state.is_completed() and latest_digest(direct) == image_digest(bench)
    record("registry 5xx for the first 3 requests", "retried with backoff; run completes",
           f"{state.type.value}; {proxy.seen} requests through the proxy", blobs_complete(direct))


def test_an_endpoint_answering_garbage_for_some_items(bench: Bench, smollm2_gguf: Path):
    """A FlagOS engine (its operator report passes through) behind a proxy that garbles one answer in four."""
    registry = bench.registry("garbage", SNAPSHOT["built"])
    host = f"127.0.0.1:{registry.registry_port}"
    counter = {"n": 0}

    def garble(path: str, body: bytes) -> bytes:
        if "chat/completions" not in path:
            return body
        counter["n"] += 1
        if counter["n"] % 4:
            return body
        reply = json.loads(body)
        reply["choices"][0]["message"]["content"] = "\x00 ### garbage ###"
        return json.dumps(reply).encode()

    with engine_server(smollm2_gguf, {"USE_FLAGGEMS": "1"}) as healthy:
        proxy = Proxy(healthy.removesuffix("/v1"), rewrite=garble)
        try:
            state = bench.run(host, FLAGRELEASE_CANDIDATE_URL=f"http://127.0.0.1:{proxy.port}/v1")
        finally:
            proxy.close()
    verdict = evaluation_of(bench)["verdict"]
    assert counter["n"] >= SMALL_SUITE_ITEMS and state.is_failed() and verdict != "PASS" and latest_digest(host) is None
    record("endpoint garbles 1 answer in 4", "not PASS, nothing published",
           f"{state.type.value}; verdict {verdict}", blobs_complete(host))


def test_a_candidate_replaced_behind_the_same_url_is_asked_again_not_reused(bench: Bench, smollm2_gguf: Path):
    """A chip host keeps the candidate's URL while the engine behind it changes (here a proxy's target moves from a
    healthy FlagOS engine to one with gate and up swapped). Answers are keyed by what the endpoint reports serving,
    so the second run asks the new stack and FAILs instead of reusing the first stack's answers. Its own state
    folder with only the image's native answers: the garbage case stored answers under the healthy engine's
    identity (the proxy is invisible to it)."""
    registry = bench.registry("same-url", SNAPSHOT["built"])
    host = f"127.0.0.1:{registry.registry_port}"
    own = dataclasses.replace(bench, state=bench.root / "state-same-url")
    shutil.copytree(bench.state / "evaluations", own.state / "evaluations")
    keep_only_native_results(own.state / "evaluations")
    with engine_server(smollm2_gguf, {"USE_FLAGGEMS": "1"}) as healthy:
        proxy = Proxy(healthy.removesuffix("/v1"))
        url = f"http://127.0.0.1:{proxy.port}/v1"
        try:
            first = own.run(host, FLAGRELEASE_CANDIDATE_URL=url)
            first_report = evaluation_of(own)
            with engine_server(smollm2_gguf, {"USE_FLAGGEMS": "1", "FLAGOS_FAULT": "gate-up-swapped"}) as broken:
                proxy.target = broken.removesuffix("/v1")
                second = own.run(host, FLAGRELEASE_CANDIDATE_URL=url)
        finally:
            proxy.close()
    second_report = evaluation_of(own)
    [before], [after] = first_report["outcomes"], second_report["outcomes"]
    assert first.is_completed() and first_report["verdict"] == "PASS"
    assert second.is_failed() and second_report["verdict"] == "FAIL" and latest_digest(host) == image_digest(own)
    assert "fault gate-up-swapped" in after["stacks"]["flagos"] and before["stacks"]["flagos"] != after["stacks"]["flagos"]
    assert before["stacks"]["native"] == after["stacks"]["native"]  # the image stack: reused, as it should be
    record("candidate replaced behind the same URL", "asked again, FAIL, latest stays on the passed image",
           f"{second.type.value}; verdict {first_report['verdict']} -> {second_report['verdict']}", blobs_complete(host))


def test_the_flow_killed_in_the_middle_of_publish_then_rerun(bench: Bench):
    registry = bench.registry("sigkill", SNAPSHOT["built"])
    host = f"127.0.0.1:{registry.registry_port}"
    env = {**os.environ, **bench.environment(host), "PREFECT_LOGGING_LEVEL": "INFO"}
    # its own session: the ephemeral Prefect server it starts would outlive a SIGKILLed parent (no atexit runs)
    process = subprocess.Popen([sys.executable, "-c", "from flows.release import release; release('smollm2-cpu')"],
                               cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if "attached README.md" in line:
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=60)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever the killed flow left running ends with it
        except ProcessLookupError:
            pass
    assert process.returncode == -signal.SIGKILL, "".join(seen[-20:])
    assert latest_digest(host) is None  # killed before the tag moved
    digest = image_digest(bench)
    rerun = bench.run(host)
    client = RegistryClient(Repository.parse(f"{host}/{REPOSITORY}"))
    records = [d for d in referrers(client, digest) if d["artifactType"].endswith("record.v1+json")]
    assert rerun.is_completed() and latest_digest(host) == digest and len(records) == 1
    record("flow SIGKILLed mid-publish, re-run", "re-run completes: one record, latest moved once",
           f"killed after the card was attached; re-run {rerun.type.value}, {len(records)} record",
           blobs_complete(host))


def test_flipped_and_truncated_weights_are_fetched_again(bench: Bench):
    registry = bench.registry("weights", SNAPSHOT["built"])
    host = f"127.0.0.1:{registry.registry_port}"
    manifest_path = weights_manifests(bench.state)[0]
    manifest = json.loads(manifest_path.read_text())
    gguf = Path(manifest["folder"]) / manifest["files"][0]["path"]
    observed = []
    for fault in ("flip", "truncate"):
        data = bytearray(gguf.read_bytes())
        if fault == "flip":
            data[len(data) // 2] ^= 0x01
            gguf.write_bytes(bytes(data))
        else:
            gguf.write_bytes(bytes(data[: len(data) // 2]))
        state = bench.run(host)
        assert state.is_completed(), state.message
        assert json.loads(manifest_path.read_text())["files"][0]["sha256"] == manifest["files"][0]["sha256"]
        observed.append(f"{fault}: {state.type.value}")
    assert latest_digest(host) == image_digest(bench)
    record("weights: one flipped byte, then truncated", "detected, fetched again, run completes",
           "; ".join(observed), f"manifest {weights_manifest_state(bench.state)}")


def test_no_latest_tag_ever_points_at_a_failed_or_partial_image(bench: Bench):
    """Across every registry the cases used: `latest` is either absent or an image whose release record says PASS."""
    checked = 0
    for settings in (s.settings for s in bench.started):
        host = f"127.0.0.1:{settings.registry_port}"
        digest = latest_digest(host)
        if digest is None:
            continue
        client = RegistryClient(Repository.parse(f"{host}/{REPOSITORY}"))
        [record_descriptor] = [d for d in referrers(client, digest) if d["artifactType"].endswith("record.v1+json")]
        body, _, _ = client.manifest(record_descriptor["digest"])
        verdict = json.loads(client.blob(json.loads(body)["layers"][0]["digest"]))["verdict"]
        assert verdict == "PASS" and blobs_complete(host).startswith("yes")
        checked += 1
    assert checked >= 3
    record("invariant over every case's registry", "latest only on a PASSed, complete image",
           f"{checked} registries with latest, all PASS", "yes")


def test_credentials_never_leave_the_environment(bench: Bench):
    """Registry password and hub token set to unique markers: after the run (which stops at the unreachable hub, as
    it must), the markers are in no Prefect log or artifact, no image label or layer, no file under the state
    folders (card, release record, evaluation, registry storage)."""
    marker_password, marker_token = "pw-MARKER-7f3a9c1e", "hf-MARKER-2b8d4e6f"
    credentials = {"FLAGRELEASE_REGISTRY_USER": "release-bot", "FLAGRELEASE_REGISTRY_PASSWORD": marker_password}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in credentials.items():
            patch.setenv(key, value)
        registry = bench.registry("secrets", SNAPSHOT["built"])  # htpasswd from the environment
        host = f"127.0.0.1:{registry.registry_port}"
        state = bench.run(host, HF_TOKEN=marker_token, HF_ENDPOINT="http://127.0.0.1:9", **credentials)
    assert state.is_failed() and "huggingface: publishing the card" in state.message
    assert latest_digest(host) is None  # a hub failure moves no tag

    async def prefect_texts() -> list[str]:
        texts: list[str] = []
        async with get_client() as client:
            for read in (client.read_logs, client.read_artifacts, client.read_flow_runs):
                offset = 0
                while page := await read(limit=200, offset=offset):  # the API serves at most 200 per page
                    texts += [str(item.model_dump()) for item in page]
                    offset += len(page)
        return texts

    texts = asyncio.run(prefect_texts())
    leaks = [f"prefect: {text[:60]}" for text in texts if marker_password in text or marker_token in text]
    engine = docker.from_env()
    digest = image_digest(bench)
    [image] = [i for i in engine.images.list(filters={"label": "flagrelease.release=smollm2-cpu"})
               if any(d.endswith(digest) for d in i.attrs.get("RepoDigests") or [])]
    labels = json.dumps(image.labels)
    layers = b"".join(image.save())
    leaks += ["image labels"] * (marker_password in labels or marker_token in labels)
    leaks += ["image layers"] * (marker_password.encode() in layers or marker_token.encode() in layers)
    for folder in (bench.state, bench.root / "registries"):
        for path in folder.rglob("*"):
            if path.is_file() and (marker_password.encode() in (data := path.read_bytes()) or marker_token.encode() in data):
                leaks.append(str(path))
    assert len(texts) > 50 and leaks == []
    record("credentials set to markers", "marker in no log, artifact, label, layer or file",
           f"{len(texts)} Prefect texts, image layers and state files scanned: {len(leaks)} leaks", "yes")



MALFORMED: list[tuple[int, str]] = []


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_malformed_matrix_is_a_named_error_at_the_command_line(data: st.DataObject, tmp_path: Path):
    """`flagrelease validate` on a matrix with one value replaced by junk, as a user would run it."""
    matrix = committed()
    path = data.draw(st.sampled_from([leaf for leaf in leaf_paths(matrix) if leaf]))
    setter(path, data.draw(JUNK))(matrix)
    target = write(tmp_path, matrix)
    env = {**os.environ, "FLAGRELEASE_MATRIX": str(target), "FLAGRELEASE_IMAGES_DIR": str(PROJECT_DIR / "images")}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "validate"], env=env, capture_output=True, text=True,
                          timeout=120)
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    assert done.returncode in (0, 2), output  # junk can be valid (a string where a string goes)
    if done.returncode == 2:
        assert "releases.yaml:" in output or "chip.yaml" in output
    MALFORMED.append((done.returncode, output.strip().splitlines()[-1][:60] if output.strip() else ""))


def test_the_malformed_matrix_row():
    refused = sum(code == 2 for code, _ in MALFORMED)
    assert MALFORMED and refused >= 1
    record("malformed matrix (hypothesis, CLI)", "exit 2 naming file:line:field, never a traceback",
           f"{len(MALFORMED)} generated: {refused} refused with a named error, {len(MALFORMED) - refused} valid", "yes")
