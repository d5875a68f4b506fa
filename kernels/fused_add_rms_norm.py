"""Residual add + RMSNorm in one pass: s = x + residual (rounded to the dtype, as the native stack stores it),
y = rms_norm(s) * weight. Returns (y, s)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (Launch, LaunchPolicies, LaunchPolicy, as_rows, check_tensor, next_power_of_2, output,
                             warps_for)

PRODUCTION_COLS = 2048
# H200 sweep: one 2048-wide row, 4 warps, is fastest
POLICIES = LaunchPolicies(compiled=LaunchPolicy(target_elements=2048))


@triton.jit(do_not_specialize=["n_rows", "eps"])
def fused_add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, n_rows, n_cols, x_row_stride, r_row_stride,
                              out_row_stride, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64 * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + rows64 * r_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + rows64 * out_row_stride + cols, s, mask=mask)
    s = s.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(s * s, axis=1) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows64 * out_row_stride + cols, (s * inv_rms[:, None] * w).to(y_ptr.dtype.element_ty), mask=mask)


def launch(n_rows: int, n_cols: int, args: tuple = (), policy: LaunchPolicy | None = None) -> Launch:
    block_n = next_power_of_2(n_cols)
    block_m = (policy or POLICIES.for_kernel(fused_add_rms_norm_kernel)).rows_per_program(block_n, n_rows)
    return Launch(fused_add_rms_norm_kernel, grid=(triton.cdiv(n_rows, block_m),),
                  constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps_for(block_m * block_n), args=args)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                       out: torch.Tensor | None = None,
                       residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("x", x)
    check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_tensor("weight", weight, dtypes=(x.dtype,), ndim=1, last_dim=x.shape[-1], device=x.device)
    x2, r2 = as_rows(x), as_rows(residual)
    y = output("out", out, tuple(x.shape), x.dtype, x.device).view(x2.shape)
    s = output("residual_out", residual_out, tuple(x.shape), x.dtype, x.device).view(x2.shape)
    if x2.numel():
        n_rows, n_cols = x2.shape
        launch(n_rows, n_cols).run(x2, r2, weight, y, s, n_rows, n_cols, x2.stride(0), r2.stride(0), y.stride(0), eps)
    return y.view(x.shape), s.view(x.shape)


def reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
              eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    return s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps) * weight, s


def production_launches(dtype: torch.dtype) -> list[Launch]:
    n = PRODUCTION_COLS
    return [launch(4096, n, args=(dtype, dtype, dtype, dtype, dtype, 4096, n, n, n, n, 1e-6))]
