"""Build contexts rendered from the plan: Dockerfiles for every chip (structure + hadolint), serve configurations,
labels, wheels with hashes, and StrictUndefined rendering."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from flows.build.context import (FLAGOS_HOME, TRITON_CACHE, TemplateError, assemble_context, render,
                                 render_dockerfile, render_serve_config)
from flows.kernel_artifacts import KernelArtifacts
from kernels.report import OpResult
from flows.matrix import load_matrix
from flows.plan import resolve
from flows.settings import Settings
from tests.conftest import PROJECT_DIR

HADOLINT = Path(sys.executable).parent / "hadolint"


def plan_of(release: str, root: Path = PROJECT_DIR):
    settings = Settings(project_dir=root, matrix=root / "releases.yaml", images_dir=root / "images",
                        state_dir=root / ".state-test", offline=True)
    return resolve(load_matrix(settings.matrix, settings.images_dir), release, settings)


def instructions(text: str) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as folder:
        parser = DockerfileParser(path=folder)
        parser.content = text
        return [(i["instruction"], i["value"]) for i in parser.structure if i["instruction"] != "COMMENT"]


def kernels() -> KernelArtifacts:
    row = OpResult(op="rms_norm", dtype="bfloat16", shape="16x2048", max_abs_err=0.01, max_rel_err=0.003,
                        atol=1e-4, rtol=0.016, passed=True)
    return KernelArtifacts(device="cpu (Triton interpreter)", consistency=[row], aot_targets=[], aot_cache_dir=None,
                           aot_manifest=None, aot_kernels=0, aot_reused=False)


@pytest.mark.parametrize("release", ["qwen3-iluvatar", "qwen3-nvidia", "smollm2-cpu"])
def test_every_chip_dockerfile_renders_and_passes_hadolint(release: str, tmp_path: Path):
    plan = plan_of(release)
    dockerfile = render_dockerfile(plan, plan.chip.base_image or "local/flagrelease-base-cpu:test", PROJECT_DIR,
                                   wheels=plan.chip.base_debootstrap is not None)
    (tmp_path / "Dockerfile").write_text(dockerfile)
    # DL3013 (pin pip versions): the requirements file pins every wheel by version and hash
    lint = subprocess.run([str(HADOLINT), "--ignore", "DL3013", "--failure-threshold", "warning",
                           str(tmp_path / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "{{" not in dockerfile and "}}" not in dockerfile


def test_gpu_images_compile_the_kernels_in_a_builder_stage_at_the_runtime_path():
    for release, target in (("qwen3-iluvatar", "--target corex:ivcore20"), ("qwen3-nvidia", "--target cuda:80 --target cuda:90")):
        plan = plan_of(release)
        steps = instructions(render_dockerfile(plan, plan.chip.base_image, PROJECT_DIR, wheels=False))
        assert steps[0] == ("FROM", f"{plan.chip.base_image} AS kernels")
        assert ("RUN", f"python3 -m kernels.aot {target} --out {TRITON_CACHE}") in steps
        assert ("COPY", f"--from=kernels {FLAGOS_HOME}/ {FLAGOS_HOME}/") in steps
        assert not any(value.startswith("wheels/") for kind, value in steps if kind == "COPY")  # the vendor's vLLM
        env = " ".join(value for kind, value in steps if kind == "ENV")
        assert f"TRITON_CACHE_DIR={TRITON_CACHE}" in env and "USE_FLAGGEMS" not in env


def test_every_image_runs_flagscale_serve_with_our_plugin_registered():
    """One Dockerfile for every chip: the plugin's entry point and the claims checked at build time, and FlagScale's
    serve step kept in the foreground as the command (tests/unit/test_foreground.py)."""
    for release, name in (("smollm2-cpu", "llama"), ("qwen3-iluvatar", "qwen3"), ("qwen3-nvidia", "qwen3")):
        plan = plan_of(release)
        steps = instructions(render_dockerfile(plan, "base:1", PROJECT_DIR, wheels=False))
        assert ("RUN", "python3 -m engine.dist_info --plugin && python3 -m engine.claims claims.json") in steps
        assert ("COPY", f"engine/ {FLAGOS_HOME}/engine/") in steps
        assert steps[-1] == ("CMD", f'["python3", "-m", "engine.foreground", "{name}", "{FLAGOS_HOME}/serve/vllm.yaml"]')


def test_cpu_image_orders_layers_from_heavy_to_light():
    plan = plan_of("smollm2-cpu")
    steps = [kind + " " + value.split()[0]
             for kind, value in instructions(render_dockerfile(plan, "base:1", PROJECT_DIR, wheels=True))]
    assert (steps.index("COPY wheels/") < steps.index("RUN python3") < steps.index("COPY kernels/")
            < steps.index("COPY engine/") < steps.index("COPY serve/"))


def test_the_cpu_image_runs_the_kernels_with_the_interpreter_and_no_switch_of_its_own():
    steps = instructions(render_dockerfile(plan_of("smollm2-cpu"), "base:1", PROJECT_DIR, wheels=True))
    env = " ".join(value for kind, value in steps if kind == "ENV")
    assert "TRITON_INTERPRET=1" in env and "USE_FLAGGEMS" not in env  # the container's environment picks the stack
    install = next(value for kind, value in steps if kind == "RUN" and "pip install" in value)
    assert "--no-deps" in install and "--require-hashes" in install and "--no-index" in install


def test_serve_configurations_carry_the_served_name_port_and_mounted_weights():
    document = yaml.safe_load(render_serve_config(plan_of("smollm2-cpu"), PROJECT_DIR))
    engine = document["serve"][0]["engine_args"]
    assert engine["served_model_name"] == "smollm2-135m-flagos" and engine["port"] == 8000
    assert engine["host"] == "0.0.0.0" and engine["dtype"] == "float32" and engine["enforce_eager"] is True
    assert engine["middleware"] == "engine.report.operator_route"
    assert engine["worker_extension_cls"] == "engine.report.OperatorReportExtension"
    # the verified GGUF is converted once into the engine's cache and served from the link it points there
    assert document["experiment"]["cmds"]["before_start"] == (
        "python3 -m engine.checkpoint /models /var/cache/flagos/checkpoints /var/cache/flagos/serving/smollm2-135m-flagos"
        " --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf")
    assert engine["model"] == "/var/cache/flagos/serving/smollm2-135m-flagos"
    assert document["experiment"]["envs"] == {"VLLM_CPU_KVCACHE_SPACE": "2", "TORCHDYNAMO_DISABLE": "1"}
    document = yaml.safe_load(render_serve_config(plan_of("qwen3-iluvatar"), PROJECT_DIR))
    engine = document["serve"][0]["engine_args"]
    assert engine["served_model_name"] == "qwen3-30b-a3b-flagos" and engine["port"] == 8000
    assert engine["model"] == "/models" and engine["tensor_parallel_size"] == 1  # the path the weights are mounted at
    assert "cmds" not in document["experiment"] and "envs" not in document["experiment"]  # nothing overrides USE_FLAGGEMS


def test_a_missing_template_variable_names_it(tmp_path: Path):
    (tmp_path / "x.j2").write_text("FROM {{ base_image }}\nLABEL a={{ not_given }}\n")
    with pytest.raises(TemplateError, match=r"x.j2: 'not_given' is undefined"):
        render(tmp_path, "x.j2", base_image="debian")


def test_context_has_hashed_wheels_kernels_manifest_and_labels(tmp_path: Path):
    wheel = tmp_path / "demo_pkg-1.2.3-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")
    plan = plan_of("smollm2-cpu")
    context = assemble_context(plan, kernels(), "base:1", [wheel], tmp_path / "ctx", PROJECT_DIR)
    requirements = (context.path / "wheels" / "requirements.txt").read_text()
    assert requirements.startswith("demo_pkg==1.2.3 --hash=sha256:")
    assert sorted(p.name for p in (context.path / "kernels").iterdir()) == sorted(p.name for p in (PROJECT_DIR / "kernels").glob("*.py"))
    assert {"plugin.py", "layers.py", "operators.py", "report.py", "foreground.py"} <= {p.name for p in (context.path / "engine").iterdir()}
    manifest = json.loads((context.path / "flagos" / "kernels-manifest.json").read_text())
    assert manifest["consistency"][0]["op"] == "rms_norm" and manifest["aot"] is None
    build = json.loads((context.path / "flagos" / "build.json").read_text())  # what the engine reports serving
    assert build == {"release": "smollm2-cpu", "chip": "cpu", "model": "smollm2-135m-instruct",
                     "model_revision": plan.revision.fingerprint_value, "fingerprint": plan.fingerprint}
    labels = context.labels
    assert labels["flagrelease.fingerprint"] == plan.fingerprint
    assert labels["org.opencontainers.image.version"] == plan.short_fingerprint == context.version
    assert labels["org.opencontainers.image.title"] == "SmolLM2-135M-Instruct-CPU-FlagOS"
    assert labels["org.opencontainers.image.licenses"] == "apache-2.0"
    assert labels["flagrelease.tool.triton"] == "3.7.1" and labels["flagrelease.tool.vllm"] == "0.32.0"
    assert labels["flagrelease.kernels-manifest"].startswith(f"{FLAGOS_HOME}/kernels-manifest.json@sha256:")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", labels["org.opencontainers.image.created"])
    again = assemble_context(plan, kernels(), "base:1", [wheel], tmp_path / "ctx2", PROJECT_DIR)
    assert again.labels == labels  # the commit's time, not the build's: the same inputs label the same image
    assert json.loads((context.path / "flagos" / "claims.json").read_text()) == plan.chip.versions


def test_a_version_claim_the_environment_does_not_hold_is_named():
    from engine.claims import unmet

    assert unmet({"pydantic": "2.14.4", "torch": "2.13.0"}) == []  # a local build label (+cpu) holds its release
    assert unmet({"pydantic": "2.14.5", "flaggems": "5.0.2"}) == ["flaggems 5.0.2 claimed, not installed found",
                                                                 "pydantic 2.14.5 claimed, 2.14.4 found"]


def test_the_installed_environment_splits_into_balanced_layers_that_hold_every_file_once(tmp_path: Path):
    """flows/build/split_layers.py as the image build runs it: every file lands in exactly one layer at its own
    path, a package stays whole, and the layers' sizes are about equal."""
    root = tmp_path / "environment"
    packages = root / "usr/local/lib/python3.11/dist-packages"
    sizes = {"torch": 9000, "triton": 8000, "vllm": 6000, "numpy": 3000, "six.py": 100}
    for name, size in sizes.items():
        path = packages / name / "sub" / "data.bin" if "." not in name else packages / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/vllm").write_text("#!/usr/bin/python3\n")
    before = {p.relative_to(root) for p in root.rglob("*") if p.is_file()}
    out = tmp_path / "layers"
    done = subprocess.run([sys.executable, str(PROJECT_DIR / "flows/build/split_layers.py"), str(root), str(out), "3"],
                          capture_output=True, text=True, check=True)
    layers = [{p.relative_to(out / str(i)) for p in (out / str(i)).rglob("*") if p.is_file()} for i in range(3)]
    assert sorted(before) == sorted(path for layer in layers for path in layer)  # every file once, path kept
    for name in ("torch", "triton", "vllm", "numpy"):  # each package whole in one layer
        assert sum(any(p.parts[5:6] == (name,) for p in layer) for layer in layers) == 1
    totals = [sum((out / str(i) / p).stat().st_size for p in layer) for i, layer in enumerate(layers)]
    assert max(totals) <= 9100 and min(totals) >= 6000, totals  # greedy: torch | triton | vllm + numpy + the rest
    assert "environment layers (MB)" in done.stdout
