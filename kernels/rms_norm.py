"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension (Qwen3: hidden 2048, q/k norm 128)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (Launch, LaunchPolicies, LaunchPolicy, as_rows, check_tensor, next_power_of_2, output,
                             warps_for)

PRODUCTION_COLS = (2048, 128)  # hidden size; per-head q/k norm
# H200 sweep: one 2048-wide row, 4 warps, is fastest
POLICIES = LaunchPolicies(compiled=LaunchPolicy(target_elements=2048))


@triton.jit(do_not_specialize=["n_rows", "eps"])
def rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_rows, n_cols, x_row_stride, y_row_stride, eps,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """BLOCK_M rows per program; the whole row in one tile; fp32 math, one rounding on store."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64 * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = x * inv_rms[:, None] * w
    tl.store(y_ptr + rows64 * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def launch(n_rows: int, n_cols: int, args: tuple = (), policy: LaunchPolicy | None = None) -> Launch:
    block_n = next_power_of_2(n_cols)
    block_m = (policy or POLICIES.for_kernel(rms_norm_kernel)).rows_per_program(block_n, n_rows)
    return Launch(rms_norm_kernel, grid=(triton.cdiv(n_rows, block_m),),
                  constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps_for(block_m * block_n), args=args)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None) -> torch.Tensor:
    """Any leading shape; the last dim is normalised. Non-contiguous rows are read in place."""
    check_tensor("x", x)
    check_tensor("weight", weight, dtypes=(x.dtype,), ndim=1, last_dim=x.shape[-1], device=x.device)
    x2 = as_rows(x)
    y = output("out", out, tuple(x.shape), x.dtype, x.device).view(x2.shape)
    if x2.numel():
        n_rows, n_cols = x2.shape
        launch(n_rows, n_cols).run(x2, weight, y, n_rows, n_cols, x2.stride(0), y.stride(0), eps)
    return y.view(x.shape)


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def production_launches(dtype: torch.dtype) -> list[Launch]:
    return [launch(4096, cols, args=(dtype, dtype, dtype, 4096, cols, cols, cols, 1e-6)) for cols in PRODUCTION_COLS]
