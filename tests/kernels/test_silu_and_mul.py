import pytest
import torch

from kernels.silu_and_mul import silu_and_mul, reference
from tests.kernels.conftest import DEVICE, DTYPES, assert_close, poisoned


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1536), (33, 1536), (5, 7, 246), (2, 2)])
def test_silu_and_mul_matches_float64_reference(shape, dtype, seed):
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 3
    out = poisoned((*shape[:-1], shape[-1] // 2), dtype)
    result = silu_and_mul(x, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_close(result, reference(x.double()), dtype, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_non_contiguous_rows(dtype, seed):
    x = torch.randn(40, 2000, dtype=dtype, device=DEVICE)[::3, :1536]
    assert_close(silu_and_mul(x), reference(x.double()), dtype, seed=seed)


def test_odd_last_dimension_is_rejected():
    with pytest.raises(ValueError, match=r"x must have an even last dimension \[..., 2\*d\], got shape \(3, 5\)"):
        silu_and_mul(torch.randn(3, 5, device=DEVICE))
