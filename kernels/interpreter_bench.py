"""What our kernels cost under Triton's CPU interpreter in one decode step of the cpu release's model, against
torch eager doing the same work beside them, and the FlagOS / native throughput that cost allows at best.

The cpu chip runs our kernels interpreted (no Triton compiler targets a CPU here). Issue 20 asked the launch
policy to keep the FlagOS stack within 4x of native; this measures whether any policy can: at decode every call is
already one program instance (`fit_rows`), so what is left is the interpreter's fixed cost per call.

    python -m kernels.interpreter_bench --engine-bench benchmarks/dev-vm-2026-12-06/engine_bench-dense.json

A benchmark, not a test: it prints numbers; BENCHMARKS.md keeps them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported: they are decorated at import

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kernels import fused_add_rms_norm, rms_norm, rotary_embedding, silu_and_mul
from kernels._common import LaunchPolicy

# SmolLM2-135M-Instruct (the cpu release's model; config.json of HuggingFaceTB/SmolLM2-135M-Instruct)
HIDDEN, INTERMEDIATE, Q_HEADS, KV_HEADS, HEAD, LAYERS, MAX_POSITION = 576, 1536, 9, 3, 64, 30, 8192
MODULES = {"rms_norm": rms_norm, "fused_add_rms_norm": fused_add_rms_norm, "silu_and_mul": silu_and_mul,
           "rotary_embedding": rotary_embedding}


@dataclass(frozen=True)
class OpCost:
    op: str
    tokens: int
    calls_per_step: int
    interpreted_ms: float
    torch_ms: float
    compiled_policy_ms: float  # the same kernel under the interpreter with the GPU launch policy (row per program)


def calls_per_step(layers: int) -> dict[str, int]:
    """vLLM's Llama per forward step: layer 0's input norm has no residual yet (rms_norm); every other norm adds
    the residual (fused_add_rms_norm: 2 per layer less that one, plus the final norm); one SwiGLU and one rotary
    embedding per layer. The operator report of a served stack shows these counts in the same proportion."""
    return {"rms_norm": 1, "fused_add_rms_norm": 2 * layers, "silu_and_mul": layers, "rotary_embedding": layers}


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def _cases(tokens: int) -> dict[str, tuple[Callable[[], Any], Callable[[], Any], Callable[[LaunchPolicy], Any]]]:
    """Per op: our kernel, torch eager on the same inputs, and our kernel launched with a given policy."""
    x, residual, weight = torch.randn(tokens, HIDDEN), torch.randn(tokens, HIDDEN), torch.randn(HIDDEN)
    gate_up = torch.randn(tokens, 2 * INTERMEDIATE)
    qkv = torch.randn(tokens, (Q_HEADS + 2 * KV_HEADS) * HEAD)
    query, key = qkv[:, :Q_HEADS * HEAD], qkv[:, Q_HEADS * HEAD:(Q_HEADS + KV_HEADS) * HEAD]
    positions, cos_sin = torch.arange(tokens), rotary_embedding.cos_sin_cache(MAX_POSITION, HEAD)
    y, out = torch.empty_like(x), torch.empty(tokens, INTERMEDIATE)
    return {
        "rms_norm": (lambda: rms_norm.rms_norm(x, weight), lambda: rms_norm.reference(x, weight),
                     lambda p: rms_norm.launch(tokens, HIDDEN, policy=p).run(x, weight, y, tokens, HIDDEN, HIDDEN,
                                                                             HIDDEN, 1e-6)),
        "fused_add_rms_norm": (lambda: fused_add_rms_norm.fused_add_rms_norm(x, residual, weight),
                               lambda: fused_add_rms_norm.reference(x, residual, weight),
                               lambda p: fused_add_rms_norm.launch(tokens, HIDDEN, policy=p).run(
                                   x, residual, weight, y, torch.empty_like(x), tokens, HIDDEN, HIDDEN, HIDDEN, HIDDEN,
                                   1e-6)),
        "silu_and_mul": (lambda: silu_and_mul.silu_and_mul(gate_up), lambda: silu_and_mul.reference(gate_up),
                         lambda p: silu_and_mul.launch(tokens, INTERMEDIATE, policy=p).run(
                             gate_up, out, tokens, INTERMEDIATE, 2 * INTERMEDIATE, INTERMEDIATE)),
        "rotary_embedding": (lambda: rotary_embedding.rotary_embedding(positions, query, key, HEAD, cos_sin),
                             lambda: rotary_embedding.reference(positions, query, key, HEAD, cos_sin),
                             lambda p: rotary_embedding.launch(tokens, Q_HEADS, KV_HEADS, HEAD, HEAD, policy=p).run(
                                 positions, query, key, cos_sin, tokens, query.stride(0), key.stride(0),
                                 cos_sin.stride(0))),
    }


def measure(tokens: int, repeats: int) -> list[OpCost]:
    counts = calls_per_step(LAYERS)
    costs = []
    for op, (ours, eager, with_policy) in _cases(tokens).items():
        compiled_policy = MODULES[op].POLICIES.compiled
        costs.append(OpCost(op, tokens, counts[op], median_ms(ours, repeats), median_ms(eager, repeats),
                            median_ms(lambda: with_policy(compiled_policy), repeats)))
    return costs


def step_ms(costs: list[OpCost], field: str) -> float:
    return sum(getattr(c, field) * c.calls_per_step for c in costs)


def native_tpot_ms(engine_bench: Path, concurrency: int) -> float:
    """The native stack's median time per output token at `concurrency`, from `flows.evaluate.engine_bench`."""
    points = json.loads(engine_bench.read_text())["native"]["vllm_bench_serve"]
    [point] = [p for p in points if p["concurrency"] == concurrency and not p["not_measured"]]
    return point["tpot_median_s"] * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Our kernels under Triton's CPU interpreter, per decode step.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64], help="tokens in the step (batch)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--engine-bench", type=Path, help="an engine_bench JSON: its native TPOT gives the ceiling")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if os.environ["TRITON_INTERPRET"] != "1":
        parser.error("TRITON_INTERPRET must be 1: this measures the interpreter")
    torch.set_num_threads(1)  # the interpreter's numpy runs on one thread: torch eager beside it on one as well
    results: dict[str, Any] = {"layers": LAYERS, "steps": []}
    print("| tokens | op | calls/step | interpreted ms | torch eager ms | ratio | GPU policy, interpreted ms |")
    print("|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        costs = measure(tokens, args.repeats)
        for c in costs:
            print(f"| {tokens} | {c.op} | {c.calls_per_step} | {c.interpreted_ms:.2f} | {c.torch_ms:.3f} | "
                  f"{c.interpreted_ms / c.torch_ms:.0f}x | {c.compiled_policy_ms:.2f} |")
        step = {"tokens": tokens, "ops": [asdict(c) for c in costs],
                "interpreted_step_ms": step_ms(costs, "interpreted_ms"), "torch_step_ms": step_ms(costs, "torch_ms")}
        if args.engine_bench and tokens in (1, 4, 16):
            native = native_tpot_ms(args.engine_bench, tokens)
            step["native_tpot_ms"] = native
            # the best FlagOS can do: native's step with these ops' torch time replaced by their interpreted time
            step["flagos_over_native_ceiling"] = native / (native - step["torch_step_ms"] + step["interpreted_step_ms"])
        results["steps"].append(step)
    for step in results["steps"]:
        line = (f"{step['tokens']} token(s) per step: our {sum(calls_per_step(LAYERS).values())} calls "
                f"{step['interpreted_step_ms']:.0f} ms interpreted, {step['torch_step_ms']:.1f} ms in torch eager")
        if "native_tpot_ms" in step:
            line += (f"; native TPOT {step['native_tpot_ms']:.1f} ms -> FlagOS / native at most "
                     f"{step['flagos_over_native_ceiling']:.3f}")
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
