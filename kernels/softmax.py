"""Softmax over the last dimension (other dims are moved last), fp32 accumulation. Rows up to 8192 wide take one
tile per row; wider rows (e.g. a 151,936-token vocabulary) take an online two-pass loop."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (Launch, LaunchPolicies, LaunchPolicy, as_rows, check_tensor, next_power_of_2, output,
                             warps_for)

SINGLE_TILE_MAX = 8192
POLICIES = LaunchPolicies(compiled=LaunchPolicy(target_elements=4096))
LOOP_BLOCK = 4096
PRODUCTION_COLS = (128, 151936)  # router logits; Qwen3 vocabulary


@triton.jit(do_not_specialize=["n_rows"])
def softmax_tile_kernel(x_ptr, y_ptr, n_rows, n_cols, x_row_stride, y_row_stride,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64 * x_row_stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
    row_max = tl.max(x, axis=1)
    row_max = tl.where(row_max == -float("inf"), 0.0, row_max)
    e = tl.where(mask, tl.exp(x - row_max[:, None]), 0.0)
    total = tl.sum(e, axis=1)
    y = e / tl.where(total == 0.0, 1.0, total)[:, None]  # only padding rows sum to 0
    tl.store(y_ptr + rows64 * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def softmax_loop_kernel(x_ptr, y_ptr, n_rows, n_cols, x_row_stride, y_row_stride, BLOCK_N: tl.constexpr):
    """Pass 1 keeps a running max and a rescaled running sum; pass 2 writes exp(x - max) / sum."""
    row = tl.program_id(0).to(tl.int64)
    running_max = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, x)
        safe = tl.where(new_max == -float("inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe) + tl.exp(x - safe)
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    total = tl.sum(running_sum * tl.exp(running_max - row_max), axis=0)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        tl.store(y_ptr + row * y_row_stride + cols, (tl.exp(x - row_max) / total).to(y_ptr.dtype.element_ty),
                 mask=cols < n_cols)


def launch(n_rows: int, n_cols: int, args: tuple = (), policy: LaunchPolicy | None = None) -> Launch:
    block_n = next_power_of_2(n_cols)
    if block_n <= SINGLE_TILE_MAX:
        block_m = (policy or POLICIES.for_kernel(softmax_tile_kernel)).rows_per_program(block_n, n_rows)
        return Launch(softmax_tile_kernel, grid=(triton.cdiv(n_rows, block_m),), args=args,
                      constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps_for(block_m * block_n))
    return Launch(softmax_loop_kernel, grid=(n_rows,), constexprs={"BLOCK_N": LOOP_BLOCK}, num_warps=8, args=args)


def softmax(x: torch.Tensor, dim: int = -1, out: torch.Tensor | None = None) -> torch.Tensor:
    """`out`, when given, receives the result (last-dim softmax only)."""
    check_tensor("x", x)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}, got {dim}")
    if dim % x.dim() != x.dim() - 1:
        if out is not None:
            raise ValueError("out is supported only for softmax over the last dimension")
        return softmax(x.movedim(dim, -1)).movedim(-1, dim)
    x2 = as_rows(x)
    result = output("out", out, tuple(x.shape), x.dtype, x.device)
    y = result.view(x2.shape)
    if y.numel():
        n_rows, n_cols = x2.shape
        launch(n_rows, n_cols).run(x2, y, n_rows, n_cols, x2.stride(0), y.stride(0))
    return result


def reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.softmax(x, dim=dim)


def production_launches(dtype: torch.dtype) -> list[Launch]:
    return [launch(4096, cols, args=(dtype, dtype, 4096, cols, cols, cols)) for cols in PRODUCTION_COLS]
