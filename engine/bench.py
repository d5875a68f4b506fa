"""The FlagOS stack's cost on this machine, as ratios against baselines measured in the same run:

- items/s of the FlagOS stack / the native stack (the same engine and model, `USE_FLAGGEMS` 1 vs 0), on the cpu
  suite's arithmetic prompts sent at once (continuous batching);
- per kernel, under Triton's interpreter: the interpreter launch policy against the compiled (GPU) policy.

`python -m engine.bench [--items 200] [--gguf PATH]`; results in BENCHMARKS.md. Needs the SmolLM2 GGUF (the
weights stage puts it in ~/.cache/flagrelease/weights or test-weights)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch  # noqa: E402

from engine.local import local_engine  # noqa: E402
from flows.build.cache import cache_root  # noqa: E402
from flows.evaluate.benchmarks import load_definitions, load_items  # noqa: E402
from flows.evaluate.client import ask_stack  # noqa: E402

PROJECT_DIR = Path(__file__).resolve().parent.parent
SERVED_NAME = "smollm2-135m-flagos"


def stack_rate(gguf: Path, flagos: bool, items: int) -> tuple[float, list[str]]:
    definition = load_definitions(PROJECT_DIR / "benchmarks.yaml").benchmarks["arithmetic"]
    questions = load_items("arithmetic", definition, items)
    with local_engine(gguf.parent, SERVED_NAME, {"USE_FLAGGEMS": "1" if flagos else "0"},
                      cache_root() / "engine" / "checkpoints", gguf_file=gguf.name) as url:
        ask_stack(url, SERVED_NAME, questions[:4], definition, concurrency=4)  # warm-up (first batch, first calls)
        started = time.perf_counter()
        results = ask_stack(url, SERVED_NAME, questions, definition, concurrency=items)
        elapsed = time.perf_counter() - started
    return items / elapsed, [r.response for r in results]


def kernel_policies() -> list[tuple[str, float, float]]:
    """Seconds per call under the compiled policy and under the interpreter's, on decode-step shapes of SmolLM2."""
    from kernels import rms_norm, rotary_embedding, silu_and_mul

    x, w, gate_up = torch.randn(64, 576), torch.randn(576), torch.randn(64, 3072)
    q, k, table, positions = torch.randn(64, 576), torch.randn(64, 192), torch.randn(64, 64), torch.arange(64)
    cases = [
        ("rms_norm [64, 576]", rms_norm.POLICIES, lambda policy: rms_norm.launch(64, 576, policy=policy),
         (x, w, torch.empty_like(x), 64, 576, 576, 576, 1e-6)),
        ("silu_and_mul [64, 3072]", silu_and_mul.POLICIES, lambda policy: silu_and_mul.launch(64, 1536, policy=policy),
         (gate_up, torch.empty(64, 1536), 64, 1536, 3072, 1536)),
        ("rotary [64 tokens, 9+3 heads x 64]", rotary_embedding.POLICIES,
         lambda policy: rotary_embedding.launch(64, 9, 3, 64, 64, policy=policy),
         (positions, q, k, table, 64, 576, 192, 64)),
    ]
    rows = []
    for name, policies, make, args in cases:
        timings = []
        for policy in (policies.compiled, policies.interpreted):
            launch = make(policy)
            launch.run(*args)
            started = time.perf_counter()
            for _ in range(5):
                launch.run(*args)
            timings.append((time.perf_counter() - started) / 5)
        rows.append((name, *timings))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--gguf", type=Path, default=next((cache_root() / "test-weights").rglob("*.gguf"), None))
    args = parser.parse_args()
    print("kernel under the interpreter        compiled policy  interpreter policy  speed-up")
    for name, compiled, interpreted in kernel_policies():
        print(f"{name:<36} {compiled * 1e3:>12.1f} ms {interpreted * 1e3:>15.1f} ms {compiled / interpreted:>8.1f}x")
    native, native_answers = stack_rate(args.gguf, False, args.items)
    flagos, flagos_answers = stack_rate(args.gguf, True, args.items)
    same = sum(a == b for a, b in zip(native_answers, flagos_answers))
    print(f"{args.items} arithmetic items at once: native {native:.2f} items/s, FlagOS {flagos:.2f} items/s, "
          f"ratio {flagos / native:.2f}; identical answers {same}/{args.items}")


if __name__ == "__main__":
    main()
