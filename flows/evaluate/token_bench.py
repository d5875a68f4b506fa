"""Calibration of the token-level gate on this machine: the native stack answers the cpu suite's arithmetic items,
then the native stack (again), the correct FlagOS stack and FlagOS stacks with injected faults each score those
replies with prompt logprobs; printed per stack: accuracy, and top-1 agreement, mean and p99 |delta logprob| and
mean KL against the native scoring. Also the scoring pass's cost against the answering pass.

    python -m flows.evaluate.token_bench MODEL [--gguf-file NAME] [--items 200] [--fault F ...] [--json FILE]

MODEL is a folder vLLM serves (a safetensors checkpoint, or a folder holding the GGUF named by --gguf-file).
Results and the thresholds chosen from them in BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flows.build.cache import cache_root
from flows.evaluate.benchmarks import load_definitions, load_items
from flows.evaluate.client import ask_stack
from flows.evaluate.local import local_engine
from flows.evaluate.logprobs import score_replies, token_agreement
from flows.matrix import load_matrix
from flows.settings import PROJECT_DIR

SERVED_NAME = "calibration"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.evaluate.token_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--gguf-file")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--fault", action="append", default=[], help="a FLAGOS_FAULT to score (repeatable)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    definition = load_definitions(PROJECT_DIR / "benchmarks.yaml").benchmarks["arithmetic"]
    items = load_items("arithmetic", definition, args.items)
    serve = load_matrix(PROJECT_DIR / "releases.yaml").chips["cpu"].serve

    def served(environment: dict[str, str]):
        return local_engine(args.model, SERVED_NAME, environment, cache_root() / "engine", serve,
                            gguf_file=args.gguf_file)

    result: dict = {"model": str(args.model), "items": args.items, "stacks": {}}
    with served({"USE_FLAGGEMS": "0"}) as url:
        began = time.perf_counter()
        answers = ask_stack(url, SERVED_NAME, items, definition, concurrency=64)
        result["native_answer_s"] = round(time.perf_counter() - began, 1)
        replies = {r.id: r.response for r in answers}
        began = time.perf_counter()
        native = score_replies(url, SERVED_NAME, items, replies)
        result["native_score_s"] = round(time.perf_counter() - began, 1)
        again = score_replies(url, SERVED_NAME, items, replies)
    result["native_accuracy"] = sum(r.correct for r in answers) / len(answers)
    result["stacks"]["native again"] = token_agreement(native, again).model_dump()
    for fault in [None, *args.fault]:
        environment = {"USE_FLAGGEMS": "1", **({"FLAGOS_FAULT": fault} if fault else {})}
        with served(environment) as url:
            began = time.perf_counter()
            flagos_answers = ask_stack(url, SERVED_NAME, items, definition, concurrency=64)
            answer_s = time.perf_counter() - began
            began = time.perf_counter()
            scores = score_replies(url, SERVED_NAME, items, replies)
            score_s = time.perf_counter() - began
        result["stacks"][fault or "flagos"] = {
            **token_agreement(native, scores).model_dump(),
            "accuracy": sum(r.correct for r in flagos_answers) / len(flagos_answers),
            "identical_replies": sum(a.response == replies[a.id] for a in flagos_answers) / len(flagos_answers),
            "answer_s": round(answer_s, 1), "score_s": round(score_s, 1)}
        print(fault or "flagos", json.dumps(result["stacks"][fault or "flagos"]), flush=True)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
