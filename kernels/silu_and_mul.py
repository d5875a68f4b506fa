"""SwiGLU gate: out = silu(x[..., :d]) * x[..., d:] for x [..., 2d] (Qwen3-30B-A3B experts: d = 768)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import Launch, LaunchPolicies, LaunchPolicy, as_rows, check_tensor, next_power_of_2, output

PRODUCTION_D = 768
# H200 sweep (d = 768): one row per program in a 1024-wide tile beat exact 256-wide tiles over more rows
POLICIES = LaunchPolicies(compiled=LaunchPolicy(target_elements=1024))


@triton.jit(do_not_specialize=["n_rows"])
def silu_and_mul_kernel(x_ptr, out_ptr, n_rows, d, x_row_stride, out_row_stride,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    mask = (rows < n_rows) & (cols < d)
    rows64 = rows.to(tl.int64)
    gate = tl.load(x_ptr + rows64 * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + rows64 * x_row_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + rows64 * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def launch(n_rows: int, d: int, args: tuple = (), policy: LaunchPolicy | None = None) -> Launch:
    policy = policy or POLICIES.for_kernel(silu_and_mul_kernel)
    block_d = min(next_power_of_2(d), policy.target_elements)
    block_m = policy.rows_per_program(block_d, n_rows)
    return Launch(silu_and_mul_kernel, grid=(triton.cdiv(n_rows, block_m), triton.cdiv(d, block_d)),
                  constexprs={"BLOCK_M": block_m, "BLOCK_D": block_d}, num_warps=4, args=args)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    check_tensor("x", x)
    if x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dimension [..., 2*d], got shape {tuple(x.shape)}")
    x2 = as_rows(x)
    d = x2.shape[-1] // 2
    result = output("out", out, (*x.shape[:-1], d), x.dtype, x.device)
    flat = result.view(x2.shape[0], d)
    if flat.numel():
        launch(x2.shape[0], d).run(x2, flat, x2.shape[0], d, x2.stride(0), flat.stride(0))
    return result


def reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def production_launches(dtype: torch.dtype) -> list[Launch]:
    d = PRODUCTION_D
    return [launch(4096, d, args=(dtype, dtype, 4096, d, 2 * d, d))]
