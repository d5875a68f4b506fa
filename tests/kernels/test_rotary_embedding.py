import pytest
import torch

from kernels.rotary_embedding import cos_sin_cache, reference, rotary_embedding
from tests.kernels.conftest import DEVICE, DTYPES, assert_close


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,q_heads,kv_heads,head_size,rot_dim", [
    (1, 32, 4, 128, 128), (13, 32, 4, 128, 128), (9, 6, 2, 64, 32), (5, 3, 3, 128, 96)])
def test_rotary_matches_float64_reference(tokens, q_heads, kv_heads, head_size, rot_dim, dtype, seed):
    cache = cos_sin_cache(4096, rot_dim, theta=1e6, device=DEVICE)
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE)
    q = torch.randn(tokens, q_heads * head_size, dtype=dtype, device=DEVICE)
    k = torch.randn(tokens, kv_heads, head_size, dtype=dtype, device=DEVICE)
    q_ref, k_ref = reference(positions, q.double(), k.double(), head_size, cache.double())
    q_out, k_out = rotary_embedding(positions, q, k, head_size, cache)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()  # in place
    assert_close(q, q_ref, dtype, seed=seed)
    assert_close(k, k_ref, dtype, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_slices_of_a_fused_qkv_tensor(dtype, seed):
    head, q_heads, kv_heads = 128, 32, 4
    qkv = torch.randn(7, (q_heads + 2 * kv_heads) * head, dtype=dtype, device=DEVICE)
    q, k, v = qkv.split([q_heads * head, kv_heads * head, kv_heads * head], dim=-1)
    v_before = v.clone()
    cache = cos_sin_cache(2048, head, device=DEVICE)
    positions = torch.arange(100, 107, device=DEVICE)
    q_ref, k_ref = reference(positions, q.double(), k.double(), head, cache.double())
    rotary_embedding(positions, q, k, head, cache)
    assert_close(q, q_ref, dtype, seed=seed)
    assert_close(k, k_ref, dtype, seed=seed)
    assert torch.equal(v, v_before)  # the values next to them are untouched


def test_bad_arguments_name_the_argument():
    cache = cos_sin_cache(16, 64, device=DEVICE)
    q, k = torch.randn(2, 256, device=DEVICE), torch.randn(2, 128, device=DEVICE)
    with pytest.raises(ValueError, match="query has 2 tokens but positions has 3"):
        rotary_embedding(torch.arange(3, device=DEVICE), q, k, 64, cache)
    with pytest.raises(ValueError, match="positions has dtype torch.float32"):
        rotary_embedding(torch.zeros(2, device=DEVICE), q, k, 64, cache)
    with pytest.raises(ValueError, match=r"key must be \[tokens, heads\*64\]"):
        rotary_embedding(torch.arange(2, device=DEVICE), q, torch.randn(2, 100, device=DEVICE), 64, cache)
    with pytest.raises(ValueError, match="cos_sin must be"):
        rotary_embedding(torch.arange(2, device=DEVICE), q, k, 64, cos_sin_cache(16, 128, device=DEVICE))
    with pytest.raises(ValueError, match="query must have contiguous heads"):
        rotary_embedding(torch.arange(2, device=DEVICE), torch.randn(256, 2, device=DEVICE).t(), k, 64, cache)
