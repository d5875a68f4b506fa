import pytest
import torch

from kernels.fused_add_rms_norm import fused_add_rms_norm, reference as fused_reference
from kernels.rms_norm import rms_norm, reference
from tests.kernels.conftest import DEVICE, DTYPES, assert_close, poisoned

SHAPES = [(1, 2048), (37, 2048), (5, 123, 123), (64, 128), (3, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_float64_reference(shape, dtype, seed):
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    w = torch.rand(shape[-1], dtype=dtype, device=DEVICE) + 0.5
    out = poisoned(shape, dtype)
    result = rms_norm(x, w, eps=1e-6, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_close(result, reference(x.double(), w.double(), 1e-6), dtype, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reads_non_contiguous_rows_in_place(dtype, seed):
    wide = torch.randn(19, 4096, dtype=dtype, device=DEVICE)
    x = wide[:, 1024:3072]  # rows with stride 4096: a slice of a fused projection
    w = torch.rand(2048, dtype=dtype, device=DEVICE)
    assert_close(rms_norm(x, w), reference(x.double(), w.double()), dtype, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2048), (29, 2048), (4, 7, 130)])
def test_fused_add_rms_norm_returns_norm_and_sum(shape, dtype, seed):
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    r = torch.randn(shape, dtype=dtype, device=DEVICE)
    w = torch.rand(shape[-1], dtype=dtype, device=DEVICE) + 0.5
    y, s = fused_add_rms_norm(x, r, w, 1e-6, out=poisoned(shape, dtype), residual_out=poisoned(shape, dtype))
    # the native stack stores the sum in the model dtype before normalising it: so does the reference here
    s_native = (x + r).double()
    y_ref, _ = fused_reference(s_native, torch.zeros_like(s_native), w.double(), 1e-6)
    assert_close(s, (x.double() + r.double()), dtype, reduce_size=2, seed=seed)
    assert_close(y, y_ref, dtype, seed=seed)


def test_bad_arguments_name_the_argument():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="weight must have last dimension 64"):
        rms_norm(x, torch.ones(32, device=DEVICE))
    with pytest.raises(ValueError, match="x has dtype torch.int64"):
        rms_norm(torch.ones(4, 64, dtype=torch.int64, device=DEVICE), torch.ones(64, device=DEVICE))
    with pytest.raises(ValueError, match="weight has dtype torch.float16; accepted: torch.float32"):
        rms_norm(x, torch.ones(64, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match=r"out must be a contiguous \(4, 64\) tensor"):
        rms_norm(x, torch.ones(64, device=DEVICE), out=torch.empty(4, 65, device=DEVICE))
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        fused_add_rms_norm(x, torch.randn(4, 63, device=DEVICE), torch.ones(64, device=DEVICE))
