"""Cost of the culprit bisection against the evaluation it follows, on real engines of this machine.

    python -m flows.evaluate.bisect_bench [--items 200] [--fault gate-up-swapped] [--gguf PATH] [--json PATH]

Baseline: the evaluation of one benchmark as the stage runs it for a `native` reference: the native engine asked
every item twice (the answers and the native-vs-native baseline), then the FlagOS engine with the fault, each
engine started for it (SmolLM2 through `python -m engine`, kernels under Triton's interpreter). Then the
bisection (`flows.evaluate.bisect.bisect_culprits`) over the operators the FlagOS engine ran, each pass an engine
started with that subset. Printed: passes, extra requests and seconds, and the ratio to the baseline's seconds.
Goal (issue 15): under 0.5 for a single culprit among our seven operators. SmolLM2 binds three of them, so the
seven-operator cost is projected from the measured cost per pass at ceil(log2 7) + 1 = 4 passes, and labelled so.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from engine.operators import OPS_VARIABLE  # noqa: E402
from flows.build.cache import cache_root  # noqa: E402
from flows.evaluate.benchmarks import load_definitions, load_items  # noqa: E402
from flows.evaluate.bisect import accuracy_measure, bisect_culprits, max_passes  # noqa: E402
from flows.evaluate.client import ask_stack  # noqa: E402
from flows.evaluate.gate import item_means  # noqa: E402
from flows.evaluate.local import local_engine  # noqa: E402
from flows.evaluate.operators import operator_report, usage  # noqa: E402
from flows.matrix import load_matrix  # noqa: E402
from flows.settings import PROJECT_DIR  # noqa: E402

SERVED_NAME = "smollm2-135m-flagos"
CONCURRENCY = 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.evaluate.bisect_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--fault", default="gate-up-swapped")
    found = sorted((cache_root() / "test-weights").rglob("*Q4_1.gguf"))
    parser.add_argument("--gguf", type=Path, default=found[0] if found else None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.gguf is None or not args.gguf.is_file():
        parser.error("no SmolLM2 GGUF found; give --gguf (the weights stage puts it in ~/.cache/flagrelease)")
    definition = load_definitions(PROJECT_DIR / "benchmarks.yaml").benchmarks["arithmetic"]
    items = load_items("arithmetic", definition, args.items)
    by_id = {item.id: item for item in items}
    cache = cache_root() / "engine"
    serve = load_matrix(PROJECT_DIR / "releases.yaml").chips["cpu"].serve

    def serve_and_ask(environment: dict[str, str], asked, times: int = 1):
        with local_engine(args.gguf.parent, SERVED_NAME, environment, cache, serve, gguf_file=args.gguf.name) as url:
            before = operator_report(url)
            runs = [ask_stack(url, SERVED_NAME, asked, definition, concurrency=CONCURRENCY) for _ in range(times)]
            flagos = environment.get("USE_FLAGGEMS") == "1"
            return runs, usage(before, operator_report(url), "flagos") if flagos else None

    started = time.monotonic()
    (native, _again), _ = serve_and_ask({"USE_FLAGGEMS": "0"}, items, times=2)
    [flagos], use = serve_and_ask({"USE_FLAGGEMS": "1", "FLAGOS_FAULT": args.fault}, items)
    baseline_s = time.monotonic() - started
    ran = [o.name for o in use.operators if o.calls]

    def ask(subset: list[str], ids: list[str]):
        environment = {"USE_FLAGGEMS": "1", "FLAGOS_FAULT": args.fault, OPS_VARIABLE: ",".join(subset)}
        [results], _ = serve_and_ask(environment, [by_id[i] for i in ids])
        return item_means(results), len(results)

    measure = accuracy_measure(item_means(native), item_means(flagos), ask)
    diagnosis = bisect_culprits("arithmetic", ran, measure, 3600, (3 * len(items), baseline_s), print)
    per_pass = diagnosis.seconds / len(diagnosis.probes)
    summary = {"items": len(items), "fault": args.fault, "operators_ran": ran, "culprits": diagnosis.culprits,
               "passes": len(diagnosis.probes), "extra_requests": diagnosis.requests,
               "extra_seconds": round(diagnosis.seconds, 1), "baseline_requests": 3 * len(items),
               "baseline_seconds": round(baseline_s, 1), "ratio": round(diagnosis.seconds / baseline_s, 3),
               "projected_ratio_seven_ops": round(max_passes(7) * per_pass / baseline_s, 3),
               "diagnosis": diagnosis.model_dump()}
    print(f"bisection over {', '.join(ran)} with {args.fault}: culprit {diagnosis.culprits or 'none'} in "
          f"{summary['passes']} passes, {summary['extra_requests']} extra requests, {summary['extra_seconds']} s; "
          f"baseline evaluation {summary['baseline_requests']} requests in {summary['baseline_seconds']} s; "
          f"ratio {summary['ratio']} (goal < 0.5); projected for seven operators (4 passes): "
          f"{summary['projected_ratio_seven_ops']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
