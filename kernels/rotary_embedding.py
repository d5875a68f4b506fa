"""Rotary position embedding, neox style (Qwen3: head_dim 128, rope theta 1e6), applied in place to query and key.

For each token t at position p and each head: with c, s = cos_sin_cache[p] halves and x1, x2 the two halves of the
first `rot_dim` features, x1' = x1*c - x2*s and x2' = x2*c + x1*s. Features past `rot_dim` (partial rotary) are
untouched. query/key may be slices of a fused qkv tensor: only the last (head) dims must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import Launch, LaunchPolicies, LaunchPolicy, check_tensor, next_power_of_2

PRODUCTION = {"num_q_heads": 32, "num_kv_heads": 4, "head_size": 128, "rot_dim": 128, "theta": 1e6}
# compiled: one token per program (all of its heads in one [head, half] tile)
POLICIES = LaunchPolicies(compiled=LaunchPolicy(target_elements=1, max_rows=1))


@triton.jit
def _rotate_heads(base_ptr, token_stride, tokens, token_mask, cos, sin, half_offs, half_mask,
                  NUM_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[None, :, None]
    mask = token_mask & (heads < NUM_HEADS) & half_mask
    first = base_ptr + tokens.to(tl.int64) * token_stride + heads * HEAD_SIZE + half_offs
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(base_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_tokens"])
def rotary_embedding_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, n_tokens, q_token_stride, k_token_stride, cache_stride,
                            NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr,
                            HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                            BLOCK_HK: tl.constexpr, BLOCK_T: tl.constexpr):
    """BLOCK_T tokens per program (tiles [token, head, half]): every query head and every key head of each."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]
    token_mask = tokens < n_tokens
    position = tl.load(pos_ptr + tokens, mask=token_mask, other=0).to(tl.int64)
    half_offs = tl.arange(0, BLOCK_HALF)[None, None, :]
    half_mask = half_offs < HALF
    cs_mask = token_mask & half_mask
    cos = tl.load(cache_ptr + position * cache_stride + half_offs, mask=cs_mask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + position * cache_stride + HALF + half_offs, mask=cs_mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_token_stride, tokens, token_mask, cos, sin, half_offs, half_mask, NUM_Q_HEADS, HEAD_SIZE,
                  HALF, BLOCK_HQ)
    _rotate_heads(k_ptr, k_token_stride, tokens, token_mask, cos, sin, half_offs, half_mask, NUM_K_HEADS, HEAD_SIZE,
                  HALF, BLOCK_HK)


def launch(n_tokens: int, num_q_heads: int, num_k_heads: int, head_size: int, rot_dim: int, args: tuple = (),
           policy: LaunchPolicy | None = None) -> Launch:
    half = rot_dim // 2
    block_half, block_hq = next_power_of_2(half), next_power_of_2(num_q_heads)
    block_t = (policy or POLICIES.for_kernel(rotary_embedding_kernel)).rows_per_program(block_hq * block_half, n_tokens)
    return Launch(rotary_embedding_kernel, grid=(triton.cdiv(n_tokens, block_t),), args=args,
                  num_warps=4 if num_q_heads * half <= 2048 else 8,
                  constexprs={"NUM_Q_HEADS": num_q_heads, "NUM_K_HEADS": num_k_heads, "HEAD_SIZE": head_size,
                              "HALF": half, "BLOCK_HALF": block_half, "BLOCK_HQ": block_hq,
                              "BLOCK_HK": next_power_of_2(num_k_heads), "BLOCK_T": block_t})


def cos_sin_cache(max_position: int, rot_dim: int, theta: float = 1e6, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """[max_position, rot_dim]: cos of every frequency in the first half, sin in the second (vLLM's layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype=dtype, device=device)


def _heads_view(name: str, tensor: torch.Tensor, n_tokens: int, head_size: int) -> int:
    """Check [tokens, heads*head_size] or [tokens, heads, head_size] with contiguous heads; return the head count."""
    check_tensor(name, tensor, min_ndim=2)
    if tensor.shape[0] != n_tokens:
        raise ValueError(f"{name} has {tensor.shape[0]} tokens but positions has {n_tokens}")
    features = tensor.shape[1] * (tensor.shape[2] if tensor.dim() == 3 else 1)
    if tensor.dim() > 3 or features % head_size or (tensor.dim() == 3 and tensor.shape[2] != head_size):
        raise ValueError(f"{name} must be [tokens, heads*{head_size}] or [tokens, heads, {head_size}], "
                         f"got shape {tuple(tensor.shape)}")
    if tensor.stride(-1) != 1 or (tensor.dim() == 3 and tensor.stride(1) != head_size):
        raise ValueError(f"{name} must have contiguous heads (strides (*, {head_size}, 1) or (*, 1)), "
                         f"got strides {tensor.stride()}")
    return features // head_size


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_size: int,
                     cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate `query` and `key` in place (as vLLM's op does) and return them."""
    check_tensor("positions", positions, dtypes=(torch.int64, torch.int32), ndim=1)
    n_tokens = positions.shape[0]
    num_q = _heads_view("query", query, n_tokens, head_size)
    num_k = _heads_view("key", key, n_tokens, head_size)
    if key.dtype != query.dtype:
        raise ValueError(f"key has dtype {key.dtype}; it must match query's {query.dtype}")
    check_tensor("cos_sin", cos_sin, ndim=2, device=query.device)
    rot_dim = cos_sin.shape[1]
    if rot_dim % 2 or rot_dim > head_size or cos_sin.stride(-1) != 1:
        raise ValueError(f"cos_sin must be [max_position, rot_dim] with an even rot_dim <= head_size {head_size} "
                         f"and contiguous rows, got shape {tuple(cos_sin.shape)}")
    for name, tensor in (("positions", positions), ("query", query), ("key", key)):
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device}; it must be on {query.device}")
    if n_tokens:
        launch(n_tokens, num_q, num_k, head_size, rot_dim).run(
            positions, query, key, cos_sin, n_tokens, query.stride(0), key.stride(0), cos_sin.stride(0))
    return query, key


def reference(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_size: int,
              cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place, in the inputs' dtype (pass float64 tensors for the float64 reference)."""
    rot_dim = cos_sin.shape[1]
    cos, sin = cos_sin[positions].to(query.dtype).chunk(2, dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        heads = x.reshape(x.shape[0], -1, head_size)
        x1, x2, rest = heads[..., : rot_dim // 2], heads[..., rot_dim // 2: rot_dim], heads[..., rot_dim:]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1).reshape(x.shape)

    return rotate(query), rotate(key)


def production_launches(dtype: torch.dtype) -> list[Launch]:
    p = PRODUCTION
    q_stride, k_stride = p["num_q_heads"] * p["head_size"], p["num_kv_heads"] * p["head_size"]
    return [launch(4096, p["num_q_heads"], p["num_kv_heads"], p["head_size"], p["rot_dim"],
                   args=(torch.int64, dtype, dtype, torch.float32, 4096, q_stride, k_stride, p["rot_dim"]))]
