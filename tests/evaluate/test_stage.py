"""The evaluate stage over real vLLM servers given as endpoint URLs (the chip-host path): the suite gated,
the report rendered, results stored and reused, missing data and a missing reference never passing, and a sampled
benchmark asked again with more repeats while it is inconclusive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.build.wheels import ENGINE_VENV
from flows.evaluate.gate import Verdict
from flows.evaluate.perf import local_bench
from flows.evaluate.stage import Endpoint, Evaluation, evaluate, image_sources
from flows.evaluate.store import ResultStore
from flows.matrix import Benchmark, Suite, load_matrix
from flows.plan import Plan, resolve
from flows.reports import evaluation_markdown, evaluation_table
from flows.settings import Settings
from kernels.report import OpResult
from tests.conftest import PROJECT_DIR, free_port
from tests.engine.conftest import plain_vllm

ITEMS = 90  # identical answers PASS a 3 pp margin from 54 items; the detectable drop is below it from 81
OPERATORS = [OpResult("rms_norm", "bfloat16", "4096x2048", 0.0078, 0.0039, 0.016, 0.016, True)]


def plan_with(suite: dict[str, Benchmark], reference: str = "native") -> Plan:
    plan = resolve(load_matrix(PROJECT_DIR / "releases.yaml"), "smollm2-cpu", Settings(offline=True))
    return plan.model_copy(update={"suite": Suite(version=1, benchmarks=suite), "reference": reference})


def run(plan: Plan, store: Path, candidate: str, reference: str | None, lines: list[str],
        benchmarks_file: Path = PROJECT_DIR / "benchmarks.yaml", verify_operators: bool = False,
        names: tuple[str | None, str | None] = ("control A", "control B"), perf: tuple[int, ...] = ()):
    """The stage over plain vLLM stacks (no plugin report): controls for the gate, not FlagOS engines, so their
    operator reports are not asked for unless `verify_operators` (the release flow always asks). They report no
    identity, so each endpoint is named, as an engineer would name a foreign engine. Serving performance only at
    the `perf` concurrencies (each level starts vLLM's benchmark client: seconds a stack)."""
    candidate_source, reference_source = image_sources(
        plan, "unused", Path("/nonexistent"), Endpoint(candidate, names[0]),
        Endpoint(reference, names[1]) if reference else None)
    evaluation = Evaluation(plan=plan, benchmarks_file=benchmarks_file, store=ResultStore(store),
                            candidate=candidate_source, reference=reference_source, operators=OPERATORS,
                            perf_concurrencies=perf, verify_operators=verify_operators,
                            bench=local_bench(PROJECT_DIR / ENGINE_VENV / "bin" / "vllm"))
    return evaluate(evaluation, None, lines.append)


def test_stacks_that_cannot_show_which_operators_ran_are_refused_before_any_request(two_stacks, tmp_path: Path):
    native, candidate = two_stacks
    lines: list[str] = []
    report = run(plan_with({"arithmetic": Benchmark(margin_pp=3.0, limit=30)}), tmp_path, candidate, native, lines,
                 verify_operators=True)
    [outcome] = report.outcomes
    assert report.verdict == Verdict.INCONCLUSIVE and not report.passed and outcome.gate is None
    assert "the native stack serves no operator report (/flagos/operators)" in outcome.unavailable
    assert not any("asking the" in line for line in lines)  # refused before a single benchmark request
    assert not list(tmp_path.rglob("*.jsonl"))


@pytest.fixture(scope="module")
def two_stacks(smollm2_gguf: Path):
    with plain_vllm(smollm2_gguf) as native, plain_vllm(smollm2_gguf) as candidate:
        yield native, candidate


def test_the_same_stack_passes_renders_and_is_reused_without_asking_again(two_stacks, tmp_path: Path):
    native, candidate = two_stacks
    plan = plan_with({"arithmetic": Benchmark(margin_pp=3.0, limit=ITEMS), "mmlu": Benchmark(margin_pp=3.0, limit=8, gated=False)})
    lines: list[str] = []
    report = run(plan, tmp_path, candidate, native, lines, perf=(2,))
    assert report.verdict == Verdict.PASS and report.passed
    arithmetic, mmlu = report.outcomes
    assert arithmetic.gate.items == ITEMS and arithmetic.gate.drop == 0 and arithmetic.gate.agreement == 1.0
    assert arithmetic.stacks == {"native": "endpoint named 'control B' by the engineer",
                                 "flagos": "endpoint named 'control A' by the engineer"}
    assert mmlu.gated is False and mmlu.gate.items == 8 and mmlu.verdict == Verdict.INCONCLUSIVE
    assert arithmetic.signal.flagos.identical == arithmetic.signal.baseline.identical == 1.0  # native asked twice
    assert arithmetic.signal.verdict is None  # reported, not gated: the suite sets no max_identical_drop_pp
    assert {p.stack for p in report.perf} == {"native", "flagos"}
    assert all(p.output_tokens_per_s > 0 and p.tpot_median_s > 0 and p.errors == 0 and p.not_measured is None
               for s in report.perf for p in s.points)
    markdown = evaluation_markdown(report)
    assert "**PASS**" in markdown and f"| arithmetic | {ITEMS} x 1 |" in markdown and "| rms_norm | bfloat16 |" in markdown
    assert "vllm bench serve" in markdown and "| flagos | 2 | 4 x (32 + 16) |" in markdown  # with its ratio to native
    assert [row["benchmark"] for row in evaluation_table(report)] == ["arithmetic", "mmlu"]
    assert evaluation_table(report)[1]["verdict"].endswith("(not gated)")
    assert any(f"asking the flagos stack {ITEMS} items x 1 repeat(s)" in line for line in lines)

    # the same named stacks: every answer and perf point comes from the store, wherever they are served now
    dead = f"http://127.0.0.1:{free_port()}/v1"
    again: list[str] = []
    store_only = run(plan, tmp_path, dead, native, again, perf=(2,))
    this_run = {"perf": True, "candidate": True, "outcomes": {"__all__": {"tokens": {"scoring_s", "answering_s"}}}}
    assert store_only.model_dump(exclude=this_run) == report.model_dump(exclude=this_run)
    assert arithmetic.tokens.scoring_s > 0 and arithmetic.tokens.answering_s > 0  # what this run's scoring cost
    assert store_only.outcomes[0].tokens.scoring_s == store_only.outcomes[0].tokens.answering_s == 0  # stored: nothing
    assert store_only.perf == report.perf
    assert not any("asking" in line for line in again)
    # another name is another stack: asked again, and a dead endpoint's failed answers are not kept
    renamed = run(plan, tmp_path, dead, native, [], names=("control C", "control B"))
    assert renamed.verdict == Verdict.INCONCLUSIVE and renamed.outcomes[0].gate is None
    assert f"{ITEMS} of {ITEMS} request(s) to the flagos stack failed after retries" in renamed.outcomes[0].unavailable
    records = [json.loads(path.read_text()) for path in tmp_path.rglob("*.json") if "perf" not in path.parts]
    assert records and not any("control C" in record["stack"]["served_by"] for record in records)
    # an endpoint that reports no identity and is not named is refused: its URL alone names nothing
    unnamed = run(plan, tmp_path, candidate, native, [], names=(None, "control B"))
    assert "the flagos endpoint" in unnamed.outcomes[0].unavailable
    assert "serves no operator report" in unnamed.outcomes[0].unavailable
    assert "FLAGRELEASE_CANDIDATE_NAME" in unnamed.outcomes[0].unavailable


def test_the_same_stack_on_both_sides_is_refused_before_any_request(two_stacks, tmp_path: Path):
    native, candidate = two_stacks
    lines: list[str] = []
    report = run(plan_with({"arithmetic": Benchmark(margin_pp=3.0, limit=ITEMS)}), tmp_path, candidate, native, lines,
                 names=("one llama.cpp", "one llama.cpp"))
    [outcome] = report.outcomes
    assert report.verdict == Verdict.INCONCLUSIVE and not report.passed
    assert "the native and the FlagOS stack are the same stack (endpoint named 'one llama.cpp'" in outcome.unavailable
    assert not any("asking the" in line for line in lines) and not list(tmp_path.rglob("*.jsonl"))


def test_missing_data_and_a_missing_reference_never_pass(two_stacks, tmp_path: Path):
    native, candidate = two_stacks
    plan = plan_with({"musr": Benchmark(margin_pp=3.0), "arithmetic": Benchmark(margin_pp=3.0, limit=5)},
                     reference="qwen3-nvidia")
    lines: list[str] = []
    report = run(plan, tmp_path, candidate, None, lines)
    assert report.verdict == Verdict.INCONCLUSIVE and not report.passed
    musr, arithmetic = report.outcomes
    assert "musr: data not available" in musr.unavailable
    assert "no stored native results of smollm2-135m-instruct from release 'qwen3-nvidia'" in arithmetic.unavailable
    reason = report.failure_reason()
    assert "musr: INCONCLUSIVE (musr: data not available" in reason and "arithmetic: INCONCLUSIVE" in reason
    assert report.perf == []  # nothing can publish: neither stack is timed (no native stack is served here)
    assert "data not available" in evaluation_markdown(report)


def test_a_sampled_inconclusive_benchmark_is_asked_again_with_more_repeats(two_stacks, tmp_path: Path):
    """Two stacks sampled at temperature 0.6 on 24 items with a 5 pp margin: one sample per item cannot decide at
    that margin (too few items), so the stage doubles the repeats (seed 1234 + k on both sides) up to the cap."""
    definitions = (PROJECT_DIR / "benchmarks.yaml").read_text().replace(
        "    max_tokens: 12", "    max_tokens: 12\n    temperature: 0.6")
    benchmarks_file = tmp_path / "benchmarks.yaml"
    benchmarks_file.write_text(definitions)
    plan = plan_with({"arithmetic": Benchmark(margin_pp=5.0, limit=24, repeats=1, max_repeats=4)})
    lines: list[str] = []
    native, candidate = two_stacks
    report = run(plan, tmp_path / "store", candidate, native, lines, benchmarks_file)
    [outcome] = report.outcomes
    assert any("INCONCLUSIVE, asking again with 2 repeats (cap 4)" in line for line in lines), "\n".join(lines)
    assert outcome.repeats == 4 or outcome.gate.verdict != Verdict.INCONCLUSIVE
    if outcome.gate.verdict == Verdict.INCONCLUSIVE:
        assert outcome.note == "still INCONCLUSIVE at the repeat cap (4)" and report.verdict != Verdict.PASS
    stored = [json.loads(line) for path in (tmp_path / "store").rglob("*.jsonl") if "scores" not in path.parts
              for line in path.read_text().splitlines()]  # the answers (token scores live in scores/)
    assert {row["repeat"] for row in stored} == set(range(outcome.repeats))
    assert len(stored) == 3 * 24 * outcome.repeats  # native twice (the baseline) and FlagOS, each answer asked once
