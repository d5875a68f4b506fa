"""Adapters from transformers' modeling conventions to our kernels' signatures, one per binding kind in
`architectures.yaml`. Each takes the `Operators` of the process and returns the replacement forward/function,
with the signature of the one it replaces; every kernel call goes through `Operators.call`."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from engine.operators import GATE_UP_SWAPPED, NORM_EPS_SCALES, Operators


def rms_norm_module(ops: Operators) -> Callable[..., Any]:
    """`<Model>RMSNorm.forward(hidden_states)`: weight and epsilon are the module's own."""
    eps_scale = NORM_EPS_SCALES.get(ops.fault or "", 1.0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return ops.call("rms_norm", hidden_states, self.weight, self.variance_epsilon * eps_scale)

    return forward


def _gate_up(ops: Operators, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU input as our kernel reads it: [gate, up] along the last dimension."""
    return torch.cat((up, gate) if ops.fault == GATE_UP_SWAPPED else (gate, up), dim=-1)


def gated_mlp(ops: Operators) -> Callable[..., Any]:
    """`<Model>MLP.forward(x) = down(silu(gate(x)) * up(x))` with the activation and product in one kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.call("silu_and_mul", _gate_up(ops, self.gate_proj(x), self.up_proj(x))))

    return forward


def rotary_pos_emb(ops: Operators) -> Callable[..., Any]:
    """`apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`: q/k [b, heads, s, d] (unsqueeze_dim 1) or [b, s, heads, d]
    (2); cos/sin [b, s, rot] with both halves equal (neox). Our kernel takes token-major heads and a per-position
    [cos half | sin half] table, so each token gets its own row of that table."""

    def apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
        batch, seq = q.shape[0], q.shape[3 - unsqueeze_dim]
        tokens, rot = batch * seq, cos.shape[-1]
        half = rot // 2
        halves = torch.cat((cos[..., :half], sin[..., :half]), dim=-1).expand(batch, seq, rot)  # cos may be batch 1
        table = halves.reshape(tokens, rot).to(q.dtype).contiguous()
        positions = torch.arange(tokens, device=q.device)

        def token_major(x: torch.Tensor) -> torch.Tensor:
            heads_last = x.transpose(1, 2) if unsqueeze_dim == 1 else x
            return heads_last.reshape(tokens, x.shape[unsqueeze_dim], x.shape[-1]).contiguous()

        def model_major(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            shaped = x.view(batch, seq, like.shape[unsqueeze_dim], like.shape[-1])
            return shaped.transpose(1, 2) if unsqueeze_dim == 1 else shaped

        q_rows, k_rows = token_major(q), token_major(k)
        ops.call("rotary_embedding", positions, q_rows, k_rows, q.shape[-1], table)
        return model_major(q_rows, q), model_major(k_rows, k)

    return apply


def topk_router(ops: Operators) -> Callable[..., Any]:
    """`<Model>TopKRouter.forward(hidden) -> (logits, top-k weights, expert ids)`: softmax + top-k (+ renormalise)."""

    def forward(self, hidden_states: torch.Tensor):
        logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        weights, ids = ops.call("topk_softmax", logits, self.top_k, bool(self.norm_topk_prob))
        return logits, weights.to(logits.dtype), ids.long()

    return forward


def experts_combine(ops: Operators) -> Callable[..., Any]:
    """`<Model>Experts.forward(hidden, top_k_index, top_k_weights)` over fused [gate; up] expert weights: each
    expert's SwiGLU in our kernel, then the weighted sum over each token's top-k outputs in our combine kernel."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        per_slot = hidden_states.new_zeros(*top_k_index.shape, hidden_states.shape[-1])
        for expert in torch.unique(top_k_index).tolist():
            if expert >= self.num_experts:  # the padding id some routers use
                continue
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            activated = ops.call("silu_and_mul", _gate_up(ops, gate, up))
            per_slot[token_idx, slot] = F.linear(activated, self.down_proj[expert])
        return ops.call("moe_sum", per_slot, top_k_weights.to(torch.float32)).to(hidden_states.dtype)

    return forward
