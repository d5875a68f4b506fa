"""The evaluation client against a real llama.cpp OpenAI server, and the gate over what it recorded."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

from flows.evaluate.benchmarks import load_definitions, load_items
from flows.evaluate.client import ask_stack, read_results, write_results
from flows.evaluate.gate import GateError, Verdict, gate_results, holm
from tests.conftest import PROJECT_DIR, free_port
from tests.evaluate.conftest import llama_server, requantized

ARITHMETIC = load_definitions(PROJECT_DIR / "benchmarks.yaml").benchmarks["arithmetic"]


@pytest.fixture(scope="module")
def native(smollm2_gguf: Path):
    with llama_server(smollm2_gguf) as base_url:
        yield base_url


def test_every_item_is_recorded_and_the_stack_is_deterministic(native: str, tmp_path: Path):
    items = load_items("arithmetic", ARITHMETIC, limit=30)
    first = ask_stack(native, "smollm2", items, ARITHMETIC)
    second = ask_stack(native, "smollm2", items, ARITHMETIC, concurrency=1)
    assert [r.id for r in first] == [i.id for i in items]
    assert [r.response for r in first] == [r.response for r in second]  # greedy + fixed seed: same text again
    assert all(r.prompt_hash == i.prompt_hash and r.completion_tokens > 0 and r.error is None for r, i in zip(first, items))
    accuracy = sum(r.correct for r in first) / len(first)
    assert 0.05 < accuracy < 0.95  # a real model on a task it can partly do
    path = write_results(first, tmp_path / "native.jsonl")
    assert read_results(path) == first
    gate = gate_results("arithmetic", first, second, 3.0)
    assert gate.agreement == 1.0 and gate.native_only == gate.flagos_only == 0
    # identical answers on 30 items cannot show a 3 pp equivalence: too few items, never a vacuous PASS
    assert gate.verdict == Verdict.INCONCLUSIVE and gate.reason.startswith("too few items to decide at this margin")


def test_truncated_or_unreadable_answers_are_scored_wrong_not_raised(native: str):
    mmlu = load_definitions(PROJECT_DIR / "benchmarks.yaml").benchmarks["mmlu"]
    items = load_items("mmlu", mmlu, limit=5)
    results = ask_stack(native, "smollm2", items, mmlu.model_copy(update={"max_tokens": 1}))
    assert len(results) == 5 and all(r.finish_reason == "length" for r in results)
    assert all(r.correct == (r.parsed == i.gold) for r, i in zip(results, items))


def test_an_unreachable_stack_gives_recorded_errors():
    items = load_items("arithmetic", ARITHMETIC, limit=3)
    results = ask_stack(f"http://127.0.0.1:{free_port()}/v1", "smollm2", items, ARITHMETIC, retries=0, timeout_s=5)
    assert all(r.error and r.error.startswith("APIConnectionError") and not r.correct for r in results)


def test_results_asked_with_other_prompts_are_refused(native: str):
    items = load_items("arithmetic", ARITHMETIC, limit=2)
    results = ask_stack(native, "smollm2", items, ARITHMETIC)
    altered = [results[0].model_copy(update={"prompt_hash": "0" * 16}), results[1]]
    with pytest.raises(GateError, match="1 item\\(s\\) were asked with different prompts"):
        gate_results("arithmetic", results, altered, 3.0)


@pytest.mark.e2e
def test_a_broken_stack_fails_and_a_mildly_different_one_passes(smollm2_gguf: Path):
    """1,000 arithmetic items, the suite's 3 pp margin, Holm across the suite: Q4_1 against its Q8_0 requantisation
    (a realistic numeric change) must PASS, against Q2_K (a broken stack) must FAIL. The three servers answer at
    once (one thread each). Measured 2026-11-29 on the dev VM: Q4_1 33.0%, Q8_0 33.2% (drop -0.2 pp, bounds
    [-1.5, +1.1], agreement 0.82) -> PASS."""
    items = load_items("arithmetic", ARITHMETIC)
    with ExitStack() as servers:
        urls = {name: servers.enter_context(llama_server(path)) for name, path in (
            ("Q4_1", smollm2_gguf), ("Q8_0", requantized(smollm2_gguf, "Q8_0")), ("Q2_K", requantized(smollm2_gguf, "Q2_K")))}
        with ThreadPoolExecutor(len(urls)) as pool:
            answers = dict(zip(urls, pool.map(lambda url: ask_stack(url, "smollm2", items, ARITHMETIC), urls.values())))
    gates = holm([gate_results(name, answers["Q4_1"], answers[name], 3.0) for name in ("Q8_0", "Q2_K")])
    for gate in gates:
        print(f"{gate.benchmark}: native {gate.native_accuracy:.3f} flagos {gate.flagos_accuracy:.3f} drop "
              f"{gate.drop:+.4f} interval [{gate.ci_low:+.4f}, {gate.ci_high:+.4f}] McNemar p {gate.mcnemar_p:.3g} "
              f"agreement {gate.agreement:.3f} -> {gate.verdict.value}")
    assert [g.verdict for g in gates] == [Verdict.PASS, Verdict.FAIL]
    assert all(not r.error for stack in answers.values() for r in stack)
