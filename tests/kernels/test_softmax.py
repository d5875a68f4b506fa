import pytest
import torch

from kernels.softmax import reference, softmax
from tests.kernels.conftest import DEVICE, DTYPES, assert_close, poisoned


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 128), (37, 128), (5, 123, 123), (3, 10000), (2, 4097)])
def test_softmax_matches_float64_reference(shape, dtype, seed):
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 4
    out = poisoned(shape, dtype)
    result = softmax(x, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_close(result, reference(x.double()), dtype, seed=seed)


@pytest.mark.parametrize("dim", [0, 1, -3])
def test_softmax_over_other_dims(dim, seed):
    x = torch.randn(6, 9, 11, device=DEVICE)
    assert_close(softmax(x, dim=dim), reference(x.double(), dim=dim), torch.float32, seed=seed)


def test_masked_rows_of_minus_infinity_stay_finite(seed):
    x = torch.randn(4, 300, device=DEVICE)
    x[:, 100:] = float("-inf")
    assert_close(softmax(x), reference(x.double()), torch.float32, seed=seed)


def test_bad_dim_is_rejected():
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\] for x of shape \(2, 3\), got 2"):
        softmax(torch.randn(2, 3, device=DEVICE), dim=2)
