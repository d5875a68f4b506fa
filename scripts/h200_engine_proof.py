"""The FlagOS engine on a GPU, judged by the project's own evaluate stage (run on the lent H200; BENCHMARKS.md).

Four engines of the same image code on one GPU (bf16, kernels compiled by Triton): native (USE_FLAGGEMS=0),
FlagOS (USE_FLAGGEMS=1), a gross broken integration (FLAGOS_FAULT=gate-up-swapped) and a mild one
(FLAGOS_FAULT=norm-eps-x100). The evaluate stage compares each with native over `--items` arithmetic prompts
through their URLs, with the operator checks on and the native stack asked twice (the native-vs-native baseline
of the finer signal, gated here at --max-identical-drop-pp to show what it flags), and the throughput of each
stack is timed on the same prompts at once (continuous batching). Reports go to --out.

    python3 scripts/h200_engine_proof.py --gguf /tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.local import local_engine  # noqa: E402
from flows.evaluate.benchmarks import load_definitions, load_items  # noqa: E402
from flows.evaluate.client import ask_stack  # noqa: E402
from flows.evaluate.stage import Endpoint, Evaluation, evaluate, image_sources  # noqa: E402
from flows.evaluate.store import ResultStore  # noqa: E402
from flows.matrix import Benchmark, Suite, load_matrix  # noqa: E402
from flows.plan import resolve  # noqa: E402
from flows.settings import Settings  # noqa: E402

PROJECT_DIR = Path(__file__).resolve().parent.parent
SERVED_NAME = "smollm2-135m-flagos"
GPU = {"device": "cuda", "dtype": "bfloat16", "cb_max_batch_tokens": 8192, "cb_max_memory_percent": 0.2}
STACKS = {"native": {"USE_FLAGGEMS": "0"}, "flagos": {"USE_FLAGGEMS": "1"},
          "broken": {"USE_FLAGGEMS": "1", "FLAGOS_FAULT": "gate-up-swapped"},
          "mild": {"USE_FLAGGEMS": "1", "FLAGOS_FAULT": "norm-eps-x100"}}


def throughput(url: str, items: list, definition) -> dict[str, float]:
    started = time.perf_counter()
    results = ask_stack(url, SERVED_NAME, items, definition, concurrency=len(items))
    elapsed = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in results)
    return {"seconds": elapsed, "items_per_s": len(items) / elapsed, "output_tokens_per_s": tokens / elapsed,
            "errors": sum(r.error is not None for r in results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--max-identical-drop-pp", type=float, default=8.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    plan = resolve(load_matrix(PROJECT_DIR / "releases.yaml"), "smollm2-cpu", Settings(offline=True))
    plan = plan.model_copy(update={"suite": Suite(version=1, benchmarks={
        "arithmetic": Benchmark(margin_pp=3.0, limit=args.items, max_identical_drop_pp=args.max_identical_drop_pp)})})
    definition = load_definitions(PROJECT_DIR / "benchmarks.yaml").benchmarks["arithmetic"]
    items = load_items("arithmetic", definition, args.items)
    summary: dict[str, object] = {"items": args.items}
    with ExitStack() as stack:
        urls = {name: stack.enter_context(local_engine(args.gguf.parent, SERVED_NAME, env, Path("/tmp/flagos-cache"),
                                                       timeout_s=600, gguf_file=args.gguf.name, **GPU))
                for name, env in STACKS.items()}
        for name, url in urls.items():
            ask_stack(url, SERVED_NAME, items[:64], definition, concurrency=64)  # warm-up: first launches compile
        summary["throughput"] = {name: throughput(url, items, definition) for name, url in urls.items()}
        store = ResultStore(args.out / "store")  # one store: the native answers and their second run are asked once
        for name in ("flagos", "broken", "mild"):
            candidate, reference = image_sources(plan, "unused", Path("/nonexistent"), Endpoint(urls[name]),
                                                 Endpoint(urls["native"]))
            evaluation = Evaluation(plan=plan, benchmarks_file=PROJECT_DIR / "benchmarks.yaml",
                                    store=store, candidate=candidate,
                                    reference=reference, operators=[], concurrency=128, perf_concurrencies=(64,))
            report = evaluate(evaluation, None, print)
            (args.out / f"h200-{name}-vs-native.json").write_text(report.model_dump_json(indent=1))
            gate, signal = report.outcomes[0].gate, report.outcomes[0].signal
            summary[name] = {"verdict": report.verdict.value, "passed": report.passed,
                             "accuracy_verdict": gate.verdict.value if gate else None,
                             "unavailable": report.outcomes[0].unavailable,
                             "signal": signal.model_dump() if signal else None,
                             **({"native": gate.native_accuracy, "flagos": gate.flagos_accuracy, "drop": gate.drop,
                                 "interval": [gate.ci_low, gate.ci_high], "detectable": gate.detectable_drop,
                                 "agreement": gate.agreement, "mcnemar_p": gate.mcnemar_p} if gate else {}),
                             "calls": {role: {o.name: o.calls for o in use.operators if o.calls}
                                       for role in ("flagos", "native") if (use := report.operator_use(role))}}
    (args.out / "h200-summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
