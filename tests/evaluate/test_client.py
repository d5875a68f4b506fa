"""The evaluation client against the real engine (vLLM with our plugin, started by `flagscale serve`), and the gate
over what it recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.evaluate.benchmarks import load_definitions, load_items
from flows.evaluate.client import ask_stack, read_results, write_results
from flows.evaluate.gate import GateError, Verdict, gate_results
from tests.conftest import PROJECT_DIR, free_port
from tests.engine.conftest import SERVED_NAME, engine_server

ARITHMETIC = load_definitions(PROJECT_DIR / "benchmarks.yaml").benchmarks["arithmetic"]


@pytest.fixture(scope="module")
def native(smollm2_gguf: Path):
    with engine_server(smollm2_gguf, {"USE_FLAGGEMS": "0"}) as base_url:
        yield base_url


def test_every_item_is_recorded_and_the_stack_is_deterministic(native: str, tmp_path: Path):
    items = load_items("arithmetic", ARITHMETIC, limit=30)
    first = ask_stack(native, SERVED_NAME, items, ARITHMETIC)
    second = ask_stack(native, SERVED_NAME, items, ARITHMETIC, concurrency=1)
    assert [r.id for r in first] == [i.id for i in items]
    # greedy: the same text again, up to the odd near-tie that another batch composition tips (fp32 sums in
    # another order); never more than a few items
    identical = sum(a.response == b.response for a, b in zip(first, second))
    assert identical >= len(items) - 2, [(a.response, b.response) for a, b in zip(first, second)]
    assert all(r.prompt_hash == i.prompt_hash and r.completion_tokens > 0 and r.error is None for r, i in zip(first, items))
    accuracy = sum(r.correct for r in first) / len(first)
    assert 0.05 < accuracy < 0.95  # a real model on a task it can partly do
    path = write_results(first, tmp_path / "native.jsonl")
    assert read_results(path) == first
    gate = gate_results("arithmetic", first, second, 3.0)
    assert gate.agreement >= 0.9
    # (nearly) identical answers on 30 items cannot show a 3 pp equivalence: too few items, never a vacuous PASS
    assert gate.verdict == Verdict.INCONCLUSIVE and gate.reason.startswith("too few items to decide at this margin")


def test_truncated_or_unreadable_answers_are_scored_wrong_not_raised(native: str):
    mmlu = load_definitions(PROJECT_DIR / "benchmarks.yaml").benchmarks["mmlu"]
    items = load_items("mmlu", mmlu, limit=5)
    results = ask_stack(native, SERVED_NAME, items, mmlu.model_copy(update={"max_tokens": 1}))
    assert len(results) == 5 and all(r.finish_reason == "length" for r in results)
    assert all(r.correct == (r.parsed == i.gold) for r, i in zip(results, items))


def test_an_unreachable_stack_gives_recorded_errors():
    items = load_items("arithmetic", ARITHMETIC, limit=3)
    results = ask_stack(f"http://127.0.0.1:{free_port()}/v1", SERVED_NAME, items, ARITHMETIC, retries=0, timeout_s=5)
    assert all(r.error and r.error.startswith("APIConnectionError") and not r.correct for r in results)


def test_results_asked_with_other_prompts_are_refused(native: str):
    items = load_items("arithmetic", ARITHMETIC, limit=2)
    results = ask_stack(native, SERVED_NAME, items, ARITHMETIC)
    altered = [results[0].model_copy(update={"prompt_hash": "0" * 16}), results[1]]
    with pytest.raises(GateError, match="1 item\\(s\\) were asked with different prompts"):
        gate_results("arithmetic", results, altered, 3.0)
