"""The FlagOS stack's cost through the engine on this machine, as a ratio against the native stack measured in the
same run: the same image path (`flagscale serve` -> vLLM, eager) with USE_FLAGGEMS 1 vs 0, the cpu suite's
arithmetic prompts sent at once, generated tokens/s and start-to-ready seconds of each stack; then vLLM's own
serving benchmark (`vllm bench serve`, as the evaluate stage runs it) at each of --concurrencies.

    python -m flows.evaluate.engine_bench [--items 64] [--concurrencies 1,4,16] [--model PATH] [--json FILE]

--model is a GGUF file (default: the SmolLM2 GGUF the weights stage put in ~/.cache/flagrelease) or a safetensors
folder (e.g. the up-cycled MoE's weights folder). Results in BENCHMARKS.md. Needs `.venv-engine` (`flagrelease
prepare`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flows.build.cache import cache_root
from flows.build.wheels import ENGINE_VENV
from flows.evaluate.benchmarks import load_definitions, load_items
from flows.evaluate.client import ask_stack
from flows.evaluate.local import local_engine
from flows.evaluate.perf import local_bench, measure_serving
from flows.matrix import load_matrix
from flows.settings import PROJECT_DIR

SERVED_NAME = "smollm2-135m-flagos"


def stack(model: Path, flagos: bool, items: int, concurrencies: tuple[int, ...]) -> dict[str, object]:
    definition = load_definitions(PROJECT_DIR / "benchmarks.yaml").benchmarks["arithmetic"]
    questions = load_items("arithmetic", definition, items)
    serve = load_matrix(PROJECT_DIR / "releases.yaml").chips["cpu"].serve
    started = time.perf_counter()
    folder, gguf_file = (model.parent, model.name) if model.is_file() else (model, None)
    with local_engine(folder, SERVED_NAME, {"USE_FLAGGEMS": "1" if flagos else "0"}, cache_root() / "engine",
                      serve, gguf_file=gguf_file) as url:
        ready_s = time.perf_counter() - started
        ask_stack(url, SERVED_NAME, questions[:4], definition, concurrency=4)  # warm-up: first calls, first batch
        began = time.perf_counter()
        results = ask_stack(url, SERVED_NAME, questions, definition, concurrency=items)
        elapsed = time.perf_counter() - began
        served = measure_serving(local_bench(PROJECT_DIR / ENGINE_VENV / "bin" / "vllm"), url, concurrencies)
    tokens = sum(r.completion_tokens for r in results)
    return {"ready_s": round(ready_s, 1), "items_per_s": round(items / elapsed, 3),
            "generated_tokens_per_s": round(tokens / elapsed, 2), "generated_tokens": tokens,
            "errors": sum(r.error is not None for r in results), "vllm_bench_serve": [p.model_dump() for p in served]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.evaluate.engine_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=64, help="prompts sent at once (the client's default concurrency)")
    found = sorted((cache_root() / "test-weights").rglob("*Q4_1.gguf")) + sorted(
        (cache_root() / "weights").rglob("*Q4_1.gguf"))
    parser.add_argument("--model", type=Path, default=found[0] if found else None,
                        help="a GGUF file or a safetensors folder (default: the SmolLM2 GGUF)")
    parser.add_argument("--concurrencies", default="1,4,16", help="levels of `vllm bench serve`, comma-separated")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    concurrencies = tuple(int(level) for level in args.concurrencies.split(","))
    if args.model is None or not args.model.exists():
        parser.error("no model found; give --model, a GGUF file or a safetensors folder (the weights stage puts "
                     "SmolLM2's GGUF in ~/.cache/flagrelease)")
    native = stack(args.model, False, args.items, concurrencies)
    flagos = stack(args.model, True, args.items, concurrencies)
    ratio = flagos["generated_tokens_per_s"] / native["generated_tokens_per_s"]
    by_level = {p["concurrency"]: p["output_tokens_per_s"] for p in native["vllm_bench_serve"] if not p["not_measured"]}
    result = {"model": str(args.model), "items": args.items, "native": native, "flagos": flagos, "flagos_over_native_tokens_per_s": round(ratio, 3),
              "vllm_bench_serve_output_ratio": {str(p["concurrency"]): round(p["output_tokens_per_s"] /
                                                                             by_level[p["concurrency"]], 3)
                                                for p in flagos["vllm_bench_serve"]
                                                if not p["not_measured"] and p["concurrency"] in by_level}}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
