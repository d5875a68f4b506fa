"""Each kernel's launch policy per execution mode: the interpreter's few large programs and the compiled policy's
many small ones compute the same result, and the interpreter policy launches fewer programs."""

import pytest
import torch

from kernels import moe_sum, rms_norm, rotary_embedding, silu_and_mul
from kernels._common import INTERPRETED, LaunchPolicy
from tests.kernels.conftest import DEVICE


def grid_size(launch) -> int:
    size = 1
    for dim in launch.grid:
        size *= dim
    return size


@pytest.mark.parametrize("rows", [1, 5, 130])
def test_both_policies_compute_the_same_rms_norm_and_silu_and_mul(rows: int):
    x, w = torch.randn(rows, 576, device=DEVICE), torch.randn(576, device=DEVICE)
    g = torch.randn(rows, 3072, device=DEVICE)
    outputs = []
    for name, policies in (("rms_norm", rms_norm.POLICIES), ("silu_and_mul", silu_and_mul.POLICIES)):
        for policy in (policies.compiled, INTERPRETED):
            if name == "rms_norm":
                out = torch.empty_like(x)
                rms_norm.launch(rows, 576, policy=policy).run(x, w, out, rows, 576, 576, 576, 1e-6)
            else:
                out = torch.empty(rows, 1536, device=DEVICE)
                silu_and_mul.launch(rows, 1536, policy=policy).run(g, out, rows, 1536, 3072, 1536)
            outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    torch.testing.assert_close(outputs[0], rms_norm.reference(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[2], outputs[3], rtol=0, atol=0)
    torch.testing.assert_close(outputs[2], silu_and_mul.reference(g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 7, 70])
def test_rotary_token_blocks_rotate_like_one_token_per_program(tokens: int):
    positions = torch.randint(0, 64, (tokens,), device=DEVICE)
    table = rotary_embedding.cos_sin_cache(64, 64, theta=1e4, device=DEVICE)
    q, k = torch.randn(tokens, 9 * 64, device=DEVICE), torch.randn(tokens, 3 * 64, device=DEVICE)
    expected = rotary_embedding.reference(positions, q, k, 64, table)
    for policy in (rotary_embedding.POLICIES.compiled, INTERPRETED, LaunchPolicy(target_elements=1 << 10, max_rows=2)):
        q2, k2 = q.clone(), k.clone()
        rotary_embedding.launch(tokens, 9, 3, 64, 64, policy=policy).run(positions, q2, k2, table, tokens, 576, 192, 64)
        torch.testing.assert_close((q2, k2), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 9, 300])
def test_moe_sum_token_blocks_combine_like_one_token_per_program(tokens: int):
    x, w = torch.randn(tokens, 2, 576, device=DEVICE), torch.rand(tokens, 2, device=DEVICE)
    for weights in (w, None):
        results = []
        for policy in (moe_sum.POLICIES.compiled, INTERPRETED, LaunchPolicy(target_elements=256, max_rows=4)):
            out = torch.empty(tokens, 576, device=DEVICE)
            moe_sum.launch(tokens, 2, 576, weights is not None, policy=policy).run(
                x, out if weights is None else weights, out, tokens, 576, 2 * 576, 576, 576)
            results.append(out)
        torch.testing.assert_close(results[0], moe_sum.reference(x, weights), rtol=1e-5, atol=1e-5)
        assert all(torch.equal(results[0], other) for other in results[1:])


def test_the_interpreter_policy_launches_fewer_programs_and_fits_its_rows():
    assert grid_size(rms_norm.launch(32, 576, policy=INTERPRETED)) == 1
    assert grid_size(rms_norm.launch(32, 576, policy=rms_norm.POLICIES.compiled)) == 16
    assert rms_norm.launch(3, 576, policy=INTERPRETED).constexprs["BLOCK_M"] == 4  # shrunk to the rows there are
    assert grid_size(silu_and_mul.launch(32, 1536, policy=INTERPRETED)) == 1
    assert grid_size(moe_sum.launch(4000, 2, 576, True, policy=INTERPRETED)) == 4  # was 4,000: one per token
    assert grid_size(moe_sum.launch(4000, 2, 576, True, policy=moe_sum.POLICIES.compiled)) == 4000
    assert grid_size(rotary_embedding.launch(64, 9, 3, 64, 64, policy=INTERPRETED)) == 1
    assert grid_size(rotary_embedding.launch(64, 9, 3, 64, 64, policy=rotary_embedding.POLICIES.compiled)) == 64
    # compiled constants never depend on the batch size: one binary serves every row count (AOT cache keys)
    assert (rms_norm.launch(3, 576, policy=rms_norm.POLICIES.compiled).constexprs
            == rms_norm.launch(3000, 576, policy=rms_norm.POLICIES.compiled).constexprs)
