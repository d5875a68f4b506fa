"""MoE router: softmax over the experts, the top-k experts per token, weights renormalised to sum to 1
(Qwen3-30B-A3B: 128 experts, top-8, norm_topk_prob). Returns (weights fp32 [T, k], expert ids int32 [T, k])."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import Launch, LaunchPolicies, LaunchPolicy, check_tensor, next_power_of_2, output

PRODUCTION = {"num_experts": 128, "topk": 8}
POLICIES = LaunchPolicies(compiled=LaunchPolicy(target_elements=2048, max_rows=16))


@triton.jit(do_not_specialize=["n_tokens"])
def topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, n_tokens, n_experts, logits_row_stride,
                        TOPK: tl.constexpr, BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """k rounds of (max, first argmax, knock out) over an fp32 softmax tile; ties go to the lowest expert id."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    experts = tl.arange(0, BLOCK_E)[None, :]
    mask = (tokens < n_tokens) & (experts < n_experts)
    logits = tl.load(logits_ptr + tokens.to(tl.int64) * logits_row_stride + experts, mask=mask,
                     other=-float("inf")).to(tl.float32)
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(row_max == -float("inf"), 0.0, row_max)  # padding rows stay finite
    probs = tl.where(mask, tl.exp(logits - row_max[:, None]), 0.0)
    probs = probs / tl.maximum(tl.sum(probs, axis=1), 1e-30)[:, None]
    slots = tl.arange(0, BLOCK_K)[None, :]
    chosen_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    chosen_id = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    remaining = tl.where(mask, probs, -1.0)
    for k in tl.static_range(TOPK):
        best = tl.max(remaining, axis=1)
        best_id = tl.min(tl.where(remaining == best[:, None], experts, BLOCK_E), axis=1)
        chosen_w = tl.where(slots == k, best[:, None], chosen_w)
        chosen_id = tl.where(slots == k, best_id[:, None], chosen_id)
        remaining = tl.where(experts == best_id[:, None], -1.0, remaining)
    if RENORMALIZE:
        chosen_w = chosen_w / tl.maximum(tl.sum(chosen_w, axis=1), 1e-30)[:, None]
    out_mask = (tokens < n_tokens) & (slots < TOPK)
    out_offs = tokens.to(tl.int64) * TOPK + slots
    tl.store(weights_ptr + out_offs, chosen_w, mask=out_mask)
    tl.store(ids_ptr + out_offs, chosen_id, mask=out_mask)


def launch(n_tokens: int, n_experts: int, topk: int, renormalize: bool, args: tuple = (),
           policy: LaunchPolicy | None = None) -> Launch:
    block_e = next_power_of_2(n_experts)
    block_t = (policy or POLICIES.for_kernel(topk_softmax_kernel)).rows_per_program(block_e, n_tokens)
    return Launch(topk_softmax_kernel, grid=(triton.cdiv(n_tokens, block_t),), num_warps=4, args=args,
                  constexprs={"TOPK": topk, "BLOCK_K": next_power_of_2(topk), "RENORMALIZE": renormalize,
                              "BLOCK_T": block_t, "BLOCK_E": block_e})


def topk_softmax(gating_output: torch.Tensor, topk: int, renormalize: bool = True,
                 weights_out: torch.Tensor | None = None,
                 ids_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("gating_output", gating_output, ndim=2)
    n_tokens, n_experts = gating_output.shape
    if not 1 <= topk <= n_experts:
        raise ValueError(f"topk must be between 1 and the number of experts ({n_experts}), got {topk}")
    if n_experts > 1024:
        raise ValueError(f"gating_output has {n_experts} experts; at most 1024 are supported")
    logits = gating_output if gating_output.stride(-1) == 1 else gating_output.contiguous()
    weights = output("weights_out", weights_out, (n_tokens, topk), torch.float32, logits.device)
    ids = output("ids_out", ids_out, (n_tokens, topk), torch.int32, logits.device)
    if n_tokens:
        launch(n_tokens, n_experts, topk, renormalize).run(logits, weights, ids, n_tokens, n_experts, logits.stride(0))
    return weights, ids


def reference(gating_output: torch.Tensor, topk: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(gating_output.to(torch.float64), dim=-1)
    weights, ids = torch.topk(probs, topk, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def production_launches(dtype: torch.dtype) -> list[Launch]:
    e, k = PRODUCTION["num_experts"], PRODUCTION["topk"]
    return [launch(4096, e, k, True, args=(dtype, torch.float32, torch.int32, 4096, e, e))]
