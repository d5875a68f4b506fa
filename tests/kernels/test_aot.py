"""The ahead-of-time compile on a CPU-only box: a real cubin for every kernel's production signature."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.aot import BACKEND_PLUGIN, MANIFEST, OP_MODULES, TARGETS
from tests.conftest import PROJECT_DIR


def aot(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    return subprocess.run([sys.executable, "-m", "kernels.aot", *args], cwd=PROJECT_DIR, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cuda90(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("aot") / "triton-cache"
    result = aot("--target", "cuda:90", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_every_kernel_has_a_cubin_for_cuda_90_with_its_hashes(cuda90: Path):
    manifest = json.loads((cuda90 / MANIFEST).read_text())
    assert manifest["targets"] == ["cuda:90"] and manifest["cache_dir"] == str(cuda90)
    modules = {entry["module"].removeprefix("kernels.") for entry in manifest["kernels"]}
    assert modules == set(OP_MODULES)
    for entry in manifest["kernels"]:
        assert entry["target"] == "cuda:90"
        assert entry["signature"] and entry["constexprs"] and entry["num_warps"] in (1, 2, 4, 8, 16)
        cubins = [name for name in entry["files"] if name.endswith(".cubin")]
        assert cubins == [f"{entry['kernel']}.cubin"]
        [folder] = [p for p in cuda90.iterdir() if (p / cubins[0]).exists() and
                    hashlib.sha256((p / cubins[0]).read_bytes()).hexdigest() == entry["files"][cubins[0]]]
        metadata = json.loads((folder / f"{entry['kernel']}.json").read_text())
        assert metadata["hash"] == entry["cache_key"]
        assert metadata["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}
        assert (folder / cubins[0]).read_bytes()[:4] == b"\x7fELF"


def test_production_dtypes_are_all_compiled(cuda90: Path):
    manifest = json.loads((cuda90 / MANIFEST).read_text())
    rms = {entry["signature"]["x_ptr"] for entry in manifest["kernels"] if entry["kernel"] == "rms_norm_kernel"}
    assert rms == {"*bf16", "*fp16"}
    router = {entry["signature"]["logits_ptr"] for entry in manifest["kernels"] if entry["kernel"] == "topk_softmax_kernel"}
    assert router == {"*bf16", "*fp16", "*fp32"}


def test_a_second_run_reproduces_the_same_cache_keys(cuda90: Path):
    before = json.loads((cuda90 / MANIFEST).read_text())
    result = aot("--target", "cuda:90", "--out", str(cuda90))
    assert result.returncode == 0, result.stderr
    after = json.loads((cuda90 / MANIFEST).read_text())
    assert [e["cache_key"] for e in after["kernels"]] == [e["cache_key"] for e in before["kernels"]]


def test_unknown_target_exits_2_with_the_known_ones(tmp_path: Path):
    result = aot("--target", "cuda:75", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "unknown target 'cuda:75'; known targets: cuda:80, cuda:90, hip:gfx942" in result.stderr
    assert not list(tmp_path.iterdir())


# Facts from FlagTree's corex backend (third_party/iluvatar/backend/compiler.py): `parse_options` turns the target's
# arch into f"sm{arch}" and `_parse_arch` accepts only ^sm(\d+)$; `sm_arch_from_capability` maps 71 to ivcore11 and
# 80 to ivcore20; FlagTree's own tests build GPUTarget("corex", capability, 64); the plugin folder is `iluvatar`.
FLAGTREE_ARCH = re.compile(r"^sm(\d+)$")
FLAGTREE_CAPABILITY = {71: "ivcore11", 80: "ivcore20"}


def test_the_iluvatar_target_is_the_one_flagtree_parses():
    from triton.backends.compiler import GPUTarget

    backend, arch, warp_size = TARGETS["corex:ivcore20"]
    target = GPUTarget(backend, arch, warp_size)
    match = FLAGTREE_ARCH.fullmatch(f"sm{target.arch}")
    assert match and FLAGTREE_CAPABILITY[int(match.group(1))] == "ivcore20"
    assert (target.backend, target.warp_size, BACKEND_PLUGIN["corex"]) == ("corex", 64, "iluvatar")


def test_a_corex_target_without_flagtree_says_which_triton_can_compile_it(tmp_path: Path):
    result = aot("--target", "corex:ivcore20", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "this Triton has no corex backend" in result.stderr and "FlagTree" in result.stderr
