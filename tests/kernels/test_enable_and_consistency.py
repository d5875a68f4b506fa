import pytest
import torch

from kernels import enable as flagos
from kernels.consistency import CASES, check
from kernels.report import consistency_markdown
from kernels.rms_norm import rms_norm
from kernels.silu_and_mul import silu_and_mul
from kernels.softmax import softmax
from tests.kernels.conftest import DEVICE


@pytest.fixture
def enabled():
    replaced = flagos.enable(dispatch_key="CUDA" if DEVICE.type == "cuda" else "CPU")
    yield replaced
    flagos.disable()


def test_enable_routes_native_ops_to_our_kernels_and_lists_them(enabled):
    key = "CUDA" if DEVICE.type == "cuda" else "CPU"
    assert f"aten::rms_norm ({key})" in enabled and f"aten::_softmax ({key})" in enabled
    assert {f"flagos::{op} ({key})" for op in ("silu_and_mul", "fused_add_rms_norm", "rotary_embedding",
                                              "topk_softmax", "moe_sum")} <= set(enabled)
    x, w = torch.randn(9, 256, device=DEVICE), torch.rand(256, device=DEVICE)
    # bit-identical to calling our kernel directly: the native op is no longer the one running
    assert torch.equal(torch.nn.functional.rms_norm(x, (256,), w, 1e-6), rms_norm(x, w, 1e-6))
    assert torch.equal(torch.softmax(x, dim=-1), softmax(x))
    gate = torch.randn(5, 64, device=DEVICE)
    assert torch.equal(torch.ops.flagos.silu_and_mul(gate), silu_and_mul(gate))
    assert flagos.replaced() == enabled


def test_disable_gives_the_native_ops_back():
    flagos.enable(dispatch_key="CUDA" if DEVICE.type == "cuda" else "CPU")
    flagos.disable()
    assert flagos.replaced() == []
    x = torch.randn(4, 64, device=DEVICE)
    calls = []
    original = flagos.ATEN_IMPLS["_softmax"]
    flagos.ATEN_IMPLS["_softmax"] = lambda *a: calls.append(a) or original(*a)
    try:
        torch.softmax(x, dim=-1)
    finally:
        flagos.ATEN_IMPLS["_softmax"] = original
    assert calls == []


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("yes", True), ("0", False), ("", False)])
def test_use_flaggems_switch(value, expected):
    try:
        assert bool(flagos.enable_from_env({"USE_FLAGGEMS": value})) is expected
    finally:
        flagos.disable()


def test_consistency_table_covers_every_op_and_passes():
    rows = check(DEVICE, tokens=32, seed=1234)
    assert {r.op for r in rows} == set(CASES)
    assert {r.dtype for r in rows} == {"bfloat16", "float16", "float32"}
    failed = [r for r in rows if not r.passed]
    assert failed == []
    table = consistency_markdown(rows)
    assert table.count("\n") == len(rows) + 2 and "| rms_norm | bfloat16 | 32x2048 |" in table


def test_consistency_check_catches_a_wrong_kernel(monkeypatch):
    from kernels import silu_and_mul as module

    real = module.silu_and_mul
    monkeypatch.setattr(module, "silu_and_mul", lambda x: real(x) * 1.05)  # a 5% error, past even bf16's tolerance
    rows = [r for r in check(DEVICE, tokens=8, seed=7) if r.op == "silu_and_mul"]
    assert rows and not any(r.passed for r in rows)
