"""The kernels stage as the release flow runs it: consistency in a child process under the interpreter, the AOT
cache for the chip's targets, reuse when the kernel inputs did not change, and a failed check that stops it."""

from pathlib import Path

import pytest

from flows.kernel_artifacts import KernelCheckFailed, check_and_compile, consistency_report, kernels_key
from flows.matrix import load_matrix
from flows.plan import resolve
from flows.settings import Settings


def plan_for(root: Path, release: str):
    settings = Settings(project_dir=root, matrix=root / "releases.yaml", images_dir=root / "images",
                        state_dir=root / ".state", offline=True)
    return resolve(load_matrix(settings.matrix, settings.images_dir), release, settings), settings


def test_nvidia_release_gets_a_cache_for_its_targets_and_reuses_it(project_copy: Path):
    plan, settings = plan_for(project_copy, "qwen3-nvidia")
    first = check_and_compile(plan, settings.state_dir, project_copy)
    assert first.passed and len(first.consistency) == 30
    assert first.aot_targets == ["cuda:80", "cuda:90"] and not first.aot_reused
    assert first.aot_kernels == 2 * 27 and Path(first.aot_manifest).is_file()
    assert Path(first.aot_cache_dir).name == kernels_key(plan)[:16]
    second = check_and_compile(plan, settings.state_dir, project_copy)
    assert second.aot_reused and second.aot_manifest == first.aot_manifest
    assert "AOT cache for cuda:80, cuda:90: 54 kernels, reused" in consistency_report(second)


def test_cpu_release_checks_consistency_without_an_aot_cache(project_copy: Path):
    plan, settings = plan_for(project_copy, "smollm2-cpu")
    artifacts = check_and_compile(plan, settings.state_dir, project_copy)
    assert artifacts.passed and artifacts.aot_targets == [] and artifacts.aot_cache_dir is None
    assert "| moe_sum | bfloat16 |" in consistency_report(artifacts)


def test_a_wrong_kernel_fails_the_stage_and_names_the_op(project_copy: Path):
    source = project_copy / "kernels" / "silu_and_mul.py"
    source.write_text(source.read_text().replace("out = gate / (1.0 + tl.exp(-gate)) * up",
                                                 "out = gate / (1.0 + tl.exp(-gate)) * up * 1.05"))
    plan, settings = plan_for(project_copy, "smollm2-cpu")
    with pytest.raises(KernelCheckFailed, match=r"operator\(s\) disagree with their reference: silu_and_mul/bfloat16"):
        check_and_compile(plan, settings.state_dir, project_copy)
