"""Fresh random inputs every run, reproducible on demand: each test's seed comes from a per-session seed
(printed in the header; set KERNEL_TEST_SEED to replay a run) and the test's own id."""

from __future__ import annotations

import hashlib
import os
import secrets

import pytest
import torch

SESSION_SEED = int(os.environ.get("KERNEL_TEST_SEED", secrets.randbits(31)))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pytest_report_header() -> str:
    return f"kernel tests: device {DEVICE}, KERNEL_TEST_SEED={SESSION_SEED}"


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    value = (SESSION_SEED + int(hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8], 16)) % 2**31
    torch.manual_seed(value)
    return value


def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An output buffer full of NaN (or -1 for integers): any element the kernel forgets to write fails."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    return torch.full(shape, -1, dtype=dtype, device=DEVICE)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, reduce_size: int = 1,
                 seed: int | None = None) -> None:
    from kernels.tolerance import compare

    result = compare(actual, expected, dtype, reduce_size)
    assert result.passed, f"{result.detail} (max abs {result.max_abs_err:.3g}, atol {result.atol:.3g}, " \
                          f"rtol {result.rtol:.3g}, seed {seed}, KERNEL_TEST_SEED={SESSION_SEED})"
