"""Operator consistency: every FlagOS kernel against its plain-PyTorch reference (float64) on one device, over fresh
random inputs at Qwen3-30B-A3B production shapes. The evaluate stage puts this table in the release report and
the model card.

    python -m kernels.consistency --device cuda --tokens 4096
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import asdict

import torch

from kernels import fused_add_rms_norm, moe_sum, rms_norm, rotary_embedding, silu_and_mul, softmax, topk_softmax
from kernels.report import OpResult, consistency_markdown
from kernels.tolerance import compare

HIDDEN, HEAD, Q_HEADS, KV_HEADS, EXPERTS, TOPK, EXPERT_INTERMEDIATE = 2048, 128, 32, 4, 128, 8, 768


Case = Callable[[torch.dtype, int, torch.device], list[tuple[torch.Tensor, torch.Tensor, int, tuple]]]


def _rms_norm(dtype, tokens, device):
    x = torch.randn(tokens, HIDDEN, dtype=dtype, device=device)
    w = torch.rand(HIDDEN, dtype=dtype, device=device) + 0.5
    return [(rms_norm.rms_norm(x, w), rms_norm.reference(x.double(), w.double()), 1, tuple(x.shape))]


def _fused_add_rms_norm(dtype, tokens, device):
    x, r = (torch.randn(tokens, HIDDEN, dtype=dtype, device=device) for _ in range(2))
    w = torch.rand(HIDDEN, dtype=dtype, device=device) + 0.5
    y, s = fused_add_rms_norm.fused_add_rms_norm(x, r, w)
    summed = (x + r).double()  # stored in the model dtype before the norm, as the native stack does
    y_ref = rms_norm.reference(summed, w.double())
    return [(y, y_ref, 1, tuple(x.shape)), (s, x.double() + r.double(), 2, tuple(x.shape))]


def _silu_and_mul(dtype, tokens, device):
    x = torch.randn(tokens * TOPK // 4, 2 * EXPERT_INTERMEDIATE, dtype=dtype, device=device)
    return [(silu_and_mul.silu_and_mul(x), silu_and_mul.reference(x.double()), 1, tuple(x.shape))]


def _rotary_embedding(dtype, tokens, device):
    cache = rotary_embedding.cos_sin_cache(32768, HEAD, theta=1e6, device=device)
    positions = torch.randint(0, 32768, (tokens,), device=device)
    q = torch.randn(tokens, Q_HEADS * HEAD, dtype=dtype, device=device)
    k = torch.randn(tokens, KV_HEADS * HEAD, dtype=dtype, device=device)
    q_ref, k_ref = rotary_embedding.reference(positions, q.double(), k.double(), HEAD, cache.double())
    rotary_embedding.rotary_embedding(positions, q, k, HEAD, cache)
    return [(q, q_ref, 1, tuple(q.shape)), (k, k_ref, 1, tuple(k.shape))]


def _topk_softmax(dtype, tokens, device):
    logits = torch.randn(tokens, EXPERTS, dtype=dtype, device=device)
    weights, ids = topk_softmax.topk_softmax(logits, TOPK, True)
    probs = torch.softmax(logits.double(), dim=-1)
    chosen = probs.gather(1, ids.long())
    chosen = chosen / chosen.sum(-1, keepdim=True)
    ref_weights, _ = topk_softmax.reference(logits.double(), TOPK, True)
    # ties in low precision may choose another id of equal probability: compare probabilities, not ids
    return [(weights, ref_weights, 1, tuple(logits.shape)), (chosen, ref_weights, 1, tuple(logits.shape))]


def _moe_sum(dtype, tokens, device):
    x = torch.randn(max(1, tokens // 4), TOPK, HIDDEN, dtype=dtype, device=device)
    return [(moe_sum.moe_sum(x), moe_sum.reference(x.double()), TOPK, tuple(x.shape))]


def _softmax(dtype, tokens, device):
    x = torch.randn(tokens, EXPERTS, dtype=dtype, device=device) * 3
    return [(softmax.softmax(x), softmax.reference(x.double()), 1, tuple(x.shape))]


CASES: dict[str, Case] = {
    "rms_norm": _rms_norm, "fused_add_rms_norm": _fused_add_rms_norm, "silu_and_mul": _silu_and_mul,
    "rotary_embedding": _rotary_embedding, "topk_softmax": _topk_softmax, "moe_sum": _moe_sum, "softmax": _softmax,
}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check(device: str | torch.device = "cpu", tokens: int = 64, dtypes: tuple[torch.dtype, ...] = DTYPES,
          seed: int | None = None) -> list[OpResult]:
    """One row per (op, dtype, output). `seed=None` draws fresh inputs; pass a seed to replay a run."""
    device = torch.device(device)
    torch.manual_seed(seed if seed is not None else secrets.randbits(31))
    rows = []
    for op, case in CASES.items():
        for dtype in dtypes:
            for actual, expected, reduce_size, shape in case(dtype, tokens, device):
                result = compare(actual, expected, torch.float32 if actual.dtype == torch.float32 else dtype, reduce_size)
                rows.append(OpResult(op=op, dtype=str(dtype).removeprefix("torch."), shape="x".join(map(str, shape)),
                                     max_abs_err=result.max_abs_err, max_rel_err=result.max_rel_err,
                                     atol=result.atol, rtol=result.rtol, passed=result.passed))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Operator consistency of the FlagOS kernels against PyTorch.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a markdown table")
    parser.add_argument("--seed", type=int, default=None, help="replay these inputs (default: fresh ones)")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("error: on a CPU the kernels run under Triton's interpreter: run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    rows = check(args.device, args.tokens, seed=args.seed)
    print(json.dumps([asdict(r) for r in rows], indent=1) if args.json else consistency_markdown(rows), end="")
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
