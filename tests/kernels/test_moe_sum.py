import pytest
import torch

from kernels.moe_sum import moe_sum, reference
from tests.kernels.conftest import DEVICE, DTYPES, assert_close, poisoned


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,topk,hidden", [(1, 8, 2048), (23, 8, 2048), (6, 3, 1000), (2, 1, 17)])
@pytest.mark.parametrize("weighted", [False, True])
def test_moe_sum_matches_float64_reference(tokens, topk, hidden, weighted, dtype, seed):
    x = torch.randn(tokens, topk, hidden, dtype=dtype, device=DEVICE)
    w = torch.rand(tokens, topk, dtype=torch.float32, device=DEVICE) if weighted else None
    out = poisoned((tokens, hidden), dtype)
    result = moe_sum(x, w, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_close(result, reference(x.double(), None if w is None else w.double()), dtype, reduce_size=topk, seed=seed)


def test_non_contiguous_expert_outputs(seed):
    x = torch.randn(10, 8, 4096, device=DEVICE)[:, :, ::2]
    assert_close(moe_sum(x), reference(x.double()), torch.float32, reduce_size=8, seed=seed)


def test_weights_must_match_tokens_and_topk():
    with pytest.raises(ValueError, match=r"topk_weights must be \[4, 8\], got \(4, 7\)"):
        moe_sum(torch.randn(4, 8, 16, device=DEVICE), torch.rand(4, 7, device=DEVICE))
