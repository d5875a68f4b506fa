"""MoE combine: out[t] = sum_k w[t, k] * x[t, k] over the top-k expert outputs x [T, k, H] (w optional: plain sum,
as vLLM's moe_sum, when the weights were applied earlier). Qwen3-30B-A3B: k = 8, H = 2048."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import Launch, LaunchPolicies, LaunchPolicy, check_tensor, next_power_of_2, output

PRODUCTION = {"topk": 8, "hidden": 2048}
SMALL_BATCH = 256  # below this many tokens the compiled launch uses narrower blocks
# Compiled: one token per program (H200 sweep below). Interpreted: every token in as few programs as fit, since the
# interpreter pays per program instance; one per token made a 4,000-token prefill cost 30 layers x 20 s on CPU.
POLICIES = LaunchPolicies(compiled=LaunchPolicy(target_elements=2048, max_rows=1))


@triton.jit(do_not_specialize=["n_tokens"])
def moe_sum_kernel(x_ptr, w_ptr, out_ptr, n_tokens, hidden, x_token_stride, x_k_stride, out_token_stride,
                   TOPK: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
    rows = tokens < n_tokens
    mask = rows & (cols < hidden)
    tokens64 = tokens.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(TOPK):
        x = tl.load(x_ptr + tokens64 * x_token_stride + k * x_k_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            x = x * tl.load(w_ptr + tokens64 * TOPK + k, mask=rows, other=0.0).to(tl.float32)
        acc += x
    tl.store(out_ptr + tokens64 * out_token_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def launch(n_tokens: int, topk: int, hidden: int, weighted: bool, args: tuple = (),
           policy: LaunchPolicy | None = None) -> Launch:
    policy = policy or POLICIES.for_kernel(moe_sum_kernel)
    block_h = min(next_power_of_2(hidden), policy.target_elements)
    if not policy.fit_rows and n_tokens < SMALL_BATCH:
        # H200: a whole 2048-wide row with 8 warps is fastest for many tokens; for a few, narrower blocks spread the
        # work over more programs
        block_h = min(block_h, 512)
    block_t = policy.rows_per_program(block_h, n_tokens)
    return Launch(moe_sum_kernel, grid=(triton.cdiv(n_tokens, block_t), triton.cdiv(hidden, block_h)),
                  num_warps=8 if block_h >= 2048 else 4, args=args,
                  constexprs={"TOPK": topk, "WEIGHTED": weighted, "BLOCK_T": block_t, "BLOCK_H": block_h})


def moe_sum(x: torch.Tensor, topk_weights: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    check_tensor("x", x, ndim=3)
    n_tokens, topk, hidden = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, ndim=2, device=x.device)
        if tuple(topk_weights.shape) != (n_tokens, topk):
            raise ValueError(f"topk_weights must be [{n_tokens}, {topk}], got {tuple(topk_weights.shape)}")
        topk_weights = topk_weights.contiguous()
    out = output("out", out, (n_tokens, hidden), x.dtype, x.device)
    if out.numel():
        weights = topk_weights if topk_weights is not None else out  # unused pointer when unweighted
        launch(n_tokens, topk, hidden, topk_weights is not None).run(
            x, weights, out, n_tokens, hidden, x.stride(0), x.stride(1), out.stride(0))
    return out


def reference(x: torch.Tensor, topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    if topk_weights is not None:
        x = x * topk_weights.to(x.dtype)[..., None]
    return x.sum(dim=1)


def production_launches(dtype: torch.dtype) -> list[Launch]:
    k, h = PRODUCTION["topk"], PRODUCTION["hidden"]
    # unweighted launches pass `out` as the (unused) weight pointer, so its type is the output dtype
    return [launch(tokens, k, h, weighted, args=(dtype, torch.float32 if weighted else dtype, dtype, tokens, h, k * h, h, h))
            for tokens in (1, 4096) for weighted in (False, True)]
