"""Benchmark the FlagOS kernels on a GPU against torch eager and FlagGems, and check that an AOT-built cache
makes every first launch a cache hit. A benchmark, not a test: it prints numbers; kernels/BENCHMARKS.md keeps them.

    python -m kernels.bench --tokens 1 128 4096 16384 65536 --dtypes bfloat16 float16 --json results.json
    python -m kernels.bench --aot-check /tmp/flagos-cache      # AOT with no GPU visible, then count compilations

Timing (per the device notes): triton.testing.do_bench median after warm-up, inputs rotated over enough copies to
exceed the L2 cache, bandwidth = the bytes each op must move / time, against a device-to-device copy measured in
the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kernels import fused_add_rms_norm, moe_sum, rms_norm, rotary_embedding, silu_and_mul, softmax, topk_softmax

HIDDEN, HEAD, Q_HEADS, KV_HEADS, EXPERTS, TOPK, INTER, SOFTMAX_COLS = 2048, 128, 32, 4, 128, 8, 768, 4096
L2_BYTES_TO_BEAT = 256 * 2**20


@dataclass(frozen=True)
class Case:
    op: str
    shape: Callable[[int], str]
    inputs: Callable[[int, torch.dtype], tuple]
    bytes_moved: Callable[[int, torch.dtype], int]
    ours: Callable[..., Any]
    torch_eager: Callable[..., Any]
    flaggems: Callable[..., Any] | None


@dataclass(frozen=True)
class Row:
    op: str
    dtype: str
    tokens: int
    shape: str
    ours_us: float
    torch_us: float
    flaggems_us: float | None
    ours_gbps: float
    copy_fraction: float
    vs_torch: float
    vs_flaggems: float | None


def _eager_rms(x, w, eps=1e-6):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _eager_topk(logits):
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, TOPK, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


def _cases(gems: Any) -> list[Case]:
    dev = "cuda"

    def size(dtype: torch.dtype) -> int:
        return torch.empty((), dtype=dtype).element_size()

    def rope_inputs(t, dtype):
        cache = rotary_embedding.cos_sin_cache(32768, HEAD, theta=1e6, device=dev)
        return (torch.randint(0, 32768, (t,), device=dev), torch.randn(t, Q_HEADS * HEAD, dtype=dtype, device=dev),
                torch.randn(t, KV_HEADS * HEAD, dtype=dtype, device=dev), cache)

    def gems_rope(pos, q, k, cache):
        half = HEAD // 2
        return gems.apply_rotary_pos_emb(q.view(-1, Q_HEADS, HEAD), k.view(-1, KV_HEADS, HEAD), cache[:, :half],
                                         cache[:, half:], pos, rotary_interleaved=False, inplace=True)

    def gems_topk(logits):
        t = logits.shape[0]
        w = torch.empty(t, TOPK, dtype=torch.float32, device=dev)
        ids = torch.empty(t, TOPK, dtype=torch.int32, device=dev)
        gems.topk_softmax(w, ids, torch.empty_like(ids), logits, True)
        return w, ids

    def gems_moe_sum(x):
        out = torch.empty(x.shape[0], x.shape[2], dtype=x.dtype, device=dev)
        gems.moe_sum(x, out)
        return out

    routed = lambda t: max(1, t * TOPK // 4)  # noqa: E731  (tokens routed to one device's experts)
    combined = lambda t: max(1, t // 4)  # noqa: E731
    return [
        Case("rms_norm", lambda t: f"{t}x{HIDDEN}",
             lambda t, d: (torch.randn(t, HIDDEN, dtype=d, device=dev), torch.rand(HIDDEN, dtype=d, device=dev)),
             lambda t, d: 2 * t * HIDDEN * size(d),
             lambda x, w: rms_norm.rms_norm(x, w), _eager_rms,
             (lambda x, w: gems.rms_norm(x, [HIDDEN], w, 1e-6)) if gems else None),
        Case("fused_add_rms_norm", lambda t: f"{t}x{HIDDEN}",
             lambda t, d: (torch.randn(t, HIDDEN, dtype=d, device=dev), torch.randn(t, HIDDEN, dtype=d, device=dev),
                           torch.rand(HIDDEN, dtype=d, device=dev)),
             lambda t, d: 4 * t * HIDDEN * size(d),
             lambda x, r, w: fused_add_rms_norm.fused_add_rms_norm(x, r, w),
             lambda x, r, w: (_eager_rms(x + r, w), x + r),
             (lambda x, r, w: gems.fused_add_rms_norm(x, r, [HIDDEN], w, 1e-6)) if gems else None),
        Case("silu_and_mul", lambda t: f"{routed(t)}x{2 * INTER}",
             lambda t, d: (torch.randn(routed(t), 2 * INTER, dtype=d, device=dev),),
             lambda t, d: 3 * routed(t) * INTER * size(d),
             silu_and_mul.silu_and_mul,
             lambda x: torch.nn.functional.silu(x[:, :INTER]) * x[:, INTER:],
             (lambda x: gems.silu_and_mul(x[:, :INTER], x[:, INTER:])) if gems else None),
        Case("rotary_embedding", lambda t: f"q {t}x{Q_HEADS}x{HEAD}, k {t}x{KV_HEADS}x{HEAD}", rope_inputs,
             lambda t, d: 2 * t * (Q_HEADS + KV_HEADS) * HEAD * size(d) + t * (8 + HEAD * 4),
             lambda p, q, k, c: rotary_embedding.rotary_embedding(p, q, k, HEAD, c),
             lambda p, q, k, c: rotary_embedding.reference(p, q, k, HEAD, c),
             gems_rope if gems else None),
        Case("topk_softmax", lambda t: f"{t}x{EXPERTS} fp32, top-{TOPK}",
             lambda t, d: (torch.randn(t, EXPERTS, dtype=torch.float32, device=dev),),
             lambda t, d: t * EXPERTS * 4 + t * TOPK * 8,
             lambda x: topk_softmax.topk_softmax(x, TOPK, True), _eager_topk,
             gems_topk if gems else None),
        Case("moe_sum", lambda t: f"{combined(t)}x{TOPK}x{HIDDEN}",
             lambda t, d: (torch.randn(combined(t), TOPK, HIDDEN, dtype=d, device=dev),),
             lambda t, d: (TOPK + 1) * combined(t) * HIDDEN * size(d),
             moe_sum.moe_sum, lambda x: x.sum(dim=1), gems_moe_sum if gems else None),
        Case("softmax", lambda t: f"{t}x{SOFTMAX_COLS}",
             lambda t, d: (torch.randn(t, SOFTMAX_COLS, dtype=d, device=dev),),
             lambda t, d: 2 * t * SOFTMAX_COLS * size(d),
             softmax.softmax, lambda x: torch.softmax(x, dim=-1),
             (lambda x: gems.softmax(x, -1)) if gems else None),
    ]


def _time_us(fn: Callable[..., Any], input_sets: list[tuple], graph: bool) -> float:
    """Median device time per call. `graph`: calls captured in a CUDA graph and replayed, so the launch cost on the
    host is left out, as in a serving engine's decode step; otherwise CUDA events around each eager call."""
    from triton.testing import do_bench, do_bench_cudagraph

    cycle = itertools.cycle(input_sets)
    call = lambda: fn(*next(cycle))  # noqa: E731
    if graph:
        call()  # first calls (autotuning, lazy compilation) stay out of the capture
        try:
            return do_bench_cudagraph(call, rep=200, return_mode="median") * 1e3
        except RuntimeError as exc:  # an op that syncs with the host cannot be captured: say so, time it eagerly
            print(f"  graph capture failed ({str(exc).splitlines()[0][:80]}); timed with events", file=sys.stderr)
            torch.cuda.synchronize()
    return do_bench(call, warmup=100, rep=400, return_mode="median") * 1e3


def copy_bandwidth_gbps() -> float:
    from triton.testing import do_bench

    src = torch.randn(2**30 // 2, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9


def run(tokens: list[int], dtypes: list[torch.dtype], copy_gbps: float, graph: bool,
        ops: list[str] | None = None) -> list[Row]:
    try:
        import flag_gems as gems
    except Exception as exc:  # FlagGems imports only where it finds a GPU it knows; the column is then empty
        print(f"flag_gems not available ({type(exc).__name__}: {exc}); its column stays empty", file=sys.stderr)
        gems = None
    rows = []
    for case in _cases(gems):
        if ops and case.op not in ops:
            continue
        for dtype in dtypes:
            for t in tokens:
                one_set = case.bytes_moved(t, dtype)
                copies = max(1, min(32, L2_BYTES_TO_BEAT // max(one_set, 1)))
                sets = [case.inputs(t, dtype) for _ in range(copies)]
                ours = _time_us(case.ours, sets, graph)
                eager = _time_us(case.torch_eager, sets, graph)
                flag = _time_us(case.flaggems, sets, graph) if case.flaggems else None
                gbps = case.bytes_moved(t, dtype) / (ours * 1e-6) / 1e9
                rows.append(Row(case.op, str(dtype).removeprefix("torch."), t, case.shape(t), ours, eager, flag, gbps,
                                gbps / copy_gbps, eager / ours, (flag / ours) if flag else None))
                print(f"{case.op:20s} {rows[-1].dtype:9s} T={t:6d} ours {ours:9.2f} us  torch {eager:9.2f} us  "
                      f"gems {flag if flag else float('nan'):9.2f} us  {gbps:7.0f} GB/s ({100 * gbps / copy_gbps:5.1f}% of copy)",
                      flush=True)
                del sets
                torch.cuda.empty_cache()
    return rows


def markdown(rows: list[Row], copy_gbps: float) -> str:
    lines = [f"Device-to-device copy: {copy_gbps:,.0f} GB/s (read + write).", "",
             "| op | dtype | tokens | shape | ours µs | torch µs | FlagGems µs | ours GB/s | % of copy | vs torch | vs FlagGems |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gems = f"{r.flaggems_us:.2f}" if r.flaggems_us else "n/a"
        ratio = f"{r.vs_flaggems:.2f}x" if r.vs_flaggems else "n/a"
        lines.append(f"| {r.op} | {r.dtype} | {r.tokens} | {r.shape} | {r.ours_us:.2f} | {r.torch_us:.2f} | {gems} | "
                     f"{r.ours_gbps:,.0f} | {100 * r.copy_fraction:.1f} | {r.vs_torch:.2f}x | {ratio} |")
    return "\n".join(lines) + "\n"


def aot_check(cache_dir: Path) -> dict[str, int]:
    """Build the cache with no GPU visible (as an image build does), then launch every production signature on
    the GPU in a fresh process and count the kernels Triton had to compile (the goal is zero)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_CACHE_DIR", None)
    subprocess.run([sys.executable, "-m", "kernels.aot", "--target", "cuda:90", "--out", str(cache_dir)], env=env,
                   check=True)
    probe = subprocess.run([sys.executable, "-m", "kernels.bench", "--launch-all"], check=True, capture_output=True,
                           text=True, env={**os.environ, "TRITON_CACHE_DIR": str(cache_dir)})
    return json.loads(probe.stdout.strip().splitlines()[-1])


def launch_all() -> dict[str, int]:
    """Every AOT production signature (see each module's production_launches) through the real wrappers, at token
    counts of every specialisation class; kernel compilations are the cache folders with a cubin that appear during
    the run (cache hits never write)."""
    cache = Path(os.environ["TRITON_CACHE_DIR"])
    dev = "cuda"

    def kernel_dirs() -> set[str]:
        return {p.parent.name for p in cache.glob("*/*.cubin")}

    def randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, device=dev)

    before = kernel_dirs()
    launches = 0
    for t in (1, 7, 4096):
        for dtype in (torch.bfloat16, torch.float16):
            rms_norm.rms_norm(randn(t, HIDDEN, dtype=dtype), randn(HIDDEN, dtype=dtype))
            rms_norm.rms_norm(randn(t * Q_HEADS, HEAD, dtype=dtype), randn(HEAD, dtype=dtype))
            fused_add_rms_norm.fused_add_rms_norm(randn(t, HIDDEN, dtype=dtype), randn(t, HIDDEN, dtype=dtype),
                                                  randn(HIDDEN, dtype=dtype))
            silu_and_mul.silu_and_mul(randn(t, 2 * INTER, dtype=dtype))
            rotary_embedding.rotary_embedding(torch.randint(0, 4096, (t,), device=dev), randn(t, Q_HEADS * HEAD, dtype=dtype),
                                              randn(t, KV_HEADS * HEAD, dtype=dtype), HEAD,
                                              rotary_embedding.cos_sin_cache(4096, HEAD, device=dev))
            moe_sum.moe_sum(randn(t, TOPK, HIDDEN, dtype=dtype))
            moe_sum.moe_sum(randn(t, TOPK, HIDDEN, dtype=dtype), torch.rand(t, TOPK, device=dev))
            launches += 7
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            topk_softmax.topk_softmax(randn(t, EXPERTS, dtype=dtype), TOPK, True)
            softmax.softmax(randn(t, EXPERTS, dtype=dtype))
            softmax.softmax(randn(2, 151936, dtype=dtype))
            launches += 3
    torch.cuda.synchronize()
    return {"launches": launches, "compiled": len(kernel_dirs() - before), "cached_kernels": len(before)}


def sweep(copy_gbps: float) -> list[dict[str, Any]]:
    """Time launch-configuration variants of the memory-bound kernels at large token counts (bf16), to choose the
    defaults in each module's launch(). Prints one line per variant."""
    import triton
    from triton.testing import do_bench

    from kernels._common import Launch

    dev, dtype, results = "cuda", torch.bfloat16, []
    for t in (16384, 65536):
        x, r = (torch.randn(t, HIDDEN, dtype=dtype, device=dev) for _ in range(2))
        w, y, s_out = torch.rand(HIDDEN, dtype=dtype, device=dev), torch.empty_like(x), torch.empty_like(x)
        g = torch.randn(t * 2, 2 * INTER, dtype=dtype, device=dev)
        g_out = torch.empty(t * 2, INTER, dtype=dtype, device=dev)
        e = torch.randn(t // 4, TOPK, HIDDEN, dtype=dtype, device=dev)
        e_out = torch.empty(t // 4, HIDDEN, dtype=dtype, device=dev)
        variants = []
        for block_m, warps in itertools.product((1, 2, 4, 8), (2, 4, 8, 16)):
            variants.append(("rms_norm", 4 * t * HIDDEN, f"BLOCK_M={block_m} warps={warps}",
                             Launch(rms_norm.rms_norm_kernel, (triton.cdiv(t, block_m),),
                                    {"BLOCK_M": block_m, "BLOCK_N": HIDDEN}, warps),
                             (x, w, y, t, HIDDEN, HIDDEN, HIDDEN, 1e-6)))
            variants.append(("fused_add_rms_norm", 8 * t * HIDDEN, f"BLOCK_M={block_m} warps={warps}",
                             Launch(fused_add_rms_norm.fused_add_rms_norm_kernel, (triton.cdiv(t, block_m),),
                                    {"BLOCK_M": block_m, "BLOCK_N": HIDDEN}, warps),
                             (x, r, w, y, s_out, t, HIDDEN, HIDDEN, HIDDEN, HIDDEN, 1e-6)))
        for block_m, block_d, warps in itertools.product((1, 4, 8, 16), (256, 1024), (4, 8)):
            variants.append(("silu_and_mul", 6 * t * 2 * INTER, f"BLOCK_M={block_m} BLOCK_D={block_d} warps={warps}",
                             Launch(silu_and_mul.silu_and_mul_kernel,
                                    (triton.cdiv(2 * t, block_m), triton.cdiv(INTER, block_d)),
                                    {"BLOCK_M": block_m, "BLOCK_D": block_d}, warps),
                             (g, g_out, 2 * t, INTER, 2 * INTER, INTER)))
        for block_h, warps in itertools.product((256, 512, 1024, 2048), (1, 2, 4, 8)):
            variants.append(("moe_sum", 2 * (TOPK + 1) * (t // 4) * HIDDEN, f"BLOCK_H={block_h} warps={warps}",
                             Launch(moe_sum.moe_sum_kernel, (t // 4, triton.cdiv(HIDDEN, block_h)),
                                    {"TOPK": TOPK, "WEIGHTED": False, "BLOCK_H": block_h}, warps),
                             (e, e_out, e_out, t // 4, HIDDEN, TOPK * HIDDEN, HIDDEN, HIDDEN)))
        for op, nbytes, config, launch, args in variants:
            us = do_bench(lambda: launch.run(*args), warmup=50, rep=200, return_mode="median") * 1e3
            fraction = nbytes / (us * 1e-6) / 1e9 / copy_gbps
            results.append({"op": op, "tokens": t, "config": config, "us": us, "copy_fraction": fraction})
            print(f"sweep {op:20s} T={t:6d} {config:36s} {us:9.2f} us {100 * fraction:5.1f}% of copy", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the FlagOS kernels (needs a CUDA GPU).")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 4096, 16384, 65536])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--ops", nargs="+", help="only these operators (default: all)")
    parser.add_argument("--aot-check", type=Path, metavar="CACHE_DIR", help="run the zero-compile check instead")
    parser.add_argument("--launch-all", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sweep", action="store_true", help="time launch-configuration variants instead")
    parser.add_argument("--timer", choices=["graph", "events"], default="graph",
                        help="graph: CUDA-graph replay, device time only (default); events: eager calls, host launch cost included")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.launch_all:
        print(json.dumps(launch_all()))
        return 0
    if args.aot_check:
        result = aot_check(args.aot_check)
        print(f"AOT zero-compile check: {result['launches']} launches, {result['compiled']} compiled at run time, "
              f"{result['cached_kernels']} kernels in the AOT cache")
        return 0 if result["compiled"] == 0 else 1
    copy_gbps = copy_bandwidth_gbps()
    if args.sweep:
        best: dict[tuple[str, int], dict[str, Any]] = {}
        for result in sweep(copy_gbps):
            key = (result["op"], result["tokens"])
            if key not in best or result["us"] < best[key]["us"]:
                best[key] = result
        for (op, t), result in sorted(best.items()):
            print(f"best {op:20s} T={t:6d} {result['config']:36s} {100 * result['copy_fraction']:5.1f}% of copy")
        return 0
    rows = run(args.tokens, [getattr(torch, d) for d in args.dtypes], copy_gbps, graph=args.timer == "graph", ops=args.ops)
    table = markdown(rows, copy_gbps)
    if args.json:
        import triton

        args.json.write_text(json.dumps({"copy_gbps": copy_gbps, "device": torch.cuda.get_device_name(),
                                         "timer": args.timer, "torch": torch.__version__, "triton": triton.__version__,
                                         "rows": [asdict(r) for r in rows]}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
