"""The statistical gate on synthetic per-item results with known flip rates, plus exact checks of its parts: four
verdicts, no vacuous PASS, power on the page, Holm across the suite."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest
from scipy.stats import t as student_t

from flows.evaluate.client import ItemResult
from flows.evaluate.gate import (GateError, Verdict, gate_results, holm, holm_adjusted, mcnemar_exact, paired_gate,
                                 repeat_schedule, suite_verdict)


def stacks(n: int, accuracy: float, lose: float, gain: float, seed: int) -> tuple[dict[str, float], dict[str, float]]:
    """A native stack at `accuracy`; the candidate loses `lose` of its right answers and gains `gain` of its wrong ones."""
    rng = np.random.default_rng(seed)
    native = rng.random(n) < accuracy
    flips = rng.random(n)
    candidate = np.where(native, flips >= lose, flips < gain)
    return ({str(i): float(v) for i, v in enumerate(native)}, {str(i): float(v) for i, v in enumerate(candidate)})


def table(n: int, right_both: int, native_only: int, flagos_only: int) -> tuple[dict[str, float], dict[str, float]]:
    """Per-item scores with exactly these cell counts (the rest wrong on both)."""
    cells = [(1.0, 1.0)] * right_both + [(1.0, 0.0)] * native_only + [(0.0, 1.0)] * flagos_only
    cells += [(0.0, 0.0)] * (n - len(cells))
    return {str(i): a for i, (a, _) in enumerate(cells)}, {str(i): b for i, (_, b) in enumerate(cells)}


def test_identical_answers_pass_only_with_enough_items_and_say_how_many():
    native, _ = stacks(200, 0.38, 0, 0, seed=1)
    gate = paired_gate("arithmetic", native, dict(native), 3.0)
    assert gate.drop == 0.0 and gate.ci_high == pytest.approx(student_t(199).ppf(0.95) / 202) and gate.ci_low == -gate.ci_high
    assert gate.verdict == Verdict.PASS and gate.mcnemar_p == 1.0 and gate.items_needed is None

    small = dict(list(native.items())[:30])
    few = paired_gate("arithmetic", small, dict(small), 3.0)
    assert few.verdict == Verdict.INCONCLUSIVE and few.detectable_drop > few.margin
    assert few.reason.startswith("too few items to decide at this margin") and f"about {few.items_needed:,} items" in few.reason
    enough = {str(i): float(i % 3 == 0) for i in range(few.items_needed)}
    assert paired_gate("arithmetic", enough, dict(enough), 3.0).detectable_drop <= 0.03 + 1e-9


def test_equal_stacks_with_symmetric_noise_pass_and_never_fail():
    """True drop 0 with ~10% of items flipping each way, n = 2000, margin 3 pp: SE ~0.9 pp, so the 90% interval
    sits inside +/-3 pp in nearly every run and a significant drop beyond the margin essentially never."""
    outcomes = [paired_gate("mmlu", *stacks(2000, 0.6, 0.1, 0.15, seed), margin_pp=3.0).verdict for seed in range(400)]
    assert outcomes.count(Verdict.FAIL) == 0 and outcomes.count(Verdict.DIFFERS) == 0
    assert outcomes.count(Verdict.PASS) >= 0.95 * 400  # measured 97% (drop sd 0.83 pp, PASS needs |drop| < 1.7 pp)


def test_a_drop_of_exactly_the_margin_passes_at_most_at_the_nominal_rate():
    """Equivalence at its boundary: 7 pp discordant one way and 4 the other at n = 1000 is a true 3 pp drop; PASS
    must come out in about 5% of runs (seeded: the count is fixed)."""
    rng = np.random.default_rng(5)
    passes = 0
    for _ in range(400):
        cells = rng.choice(4, size=1000, p=[0.40, 0.07, 0.04, 0.49])  # both right, native only, FlagOS only, neither
        native = {str(i): float(c in (0, 1)) for i, c in enumerate(cells)}
        flagos = {str(i): float(c in (0, 2)) for i, c in enumerate(cells)}
        passes += paired_gate("gsm8k", native, flagos, 3.0).verdict == Verdict.PASS
    assert passes / 400 <= 0.07


def test_a_drop_of_twice_the_margin_fails():
    native, flagos = stacks(2000, 0.5, lose=0.12, gain=0.0, seed=7)  # 12% of 50% right -> ~6 pp drop
    gate = paired_gate("gsm8k", native, flagos, 3.0)
    assert 0.05 < gate.drop < 0.07 and gate.ci_low > 0.03 and gate.verdict == Verdict.FAIL
    assert gate.p_worse < 1e-3 and gate.flagos_only == 0


def test_a_stack_far_better_than_native_differs_instead_of_passing():
    """The seed card's MMLU row: native 0.669, FlagOS 0.758 over 14,042 items (our old gate called it PASS)."""
    n = 14_042
    native, flagos = table(n, right_both=9_000, native_only=394, flagos_only=1_644)
    gate = paired_gate("mmlu", native, flagos, 1.5, chance=0.25)
    assert (round(gate.native_accuracy, 3), round(gate.flagos_accuracy, 3)) == (0.669, 0.758)
    assert gate.drop == pytest.approx(-0.089, abs=5e-4) and gate.ci_high < -gate.margin
    assert gate.verdict == Verdict.DIFFERS and gate.p_better < 1e-6
    assert suite_verdict([gate.verdict]) == Verdict.DIFFERS


def test_a_significant_difference_with_a_drop_barely_over_the_margin_is_no_fail():
    """7/0 discordant of 200 is a 3.5 pp point drop that McNemar calls significant (p 0.016); whether the true drop
    exceeds 3 pp is not shown, so the gate must not FAIL (the old McNemar branch did)."""
    native, flagos = table(200, right_both=60, native_only=7, flagos_only=0)
    gate = paired_gate("arithmetic", native, flagos, 3.0)
    assert gate.drop == pytest.approx(0.035) and gate.mcnemar_p < 0.05
    assert gate.p_worse > 0.05 and gate.verdict == Verdict.INCONCLUSIVE


@pytest.mark.parametrize("accuracy,chance", [(0.175, 0.25), (0.26, 0.25), (0.0, 0.0), (0.02, 0.0)])
def test_a_reference_that_does_not_beat_chance_by_the_margin_measures_nothing(accuracy: float, chance: float):
    n = 4000
    native = {str(i): float(i < accuracy * n) for i in range(n)}
    gate = paired_gate("mmlu", native, dict(native), 3.0, chance=chance)
    assert gate.verdict == Verdict.INCONCLUSIVE and gate.vacuous
    assert gate.reason.startswith("measures nothing for this model") and f"chance ({chance:.3f})" in gate.reason
    assert holm([gate])[0].verdict == Verdict.INCONCLUSIVE  # no test across the suite revives it


def result(item: int, parsed: str, correct: bool, repeat: int = 0) -> ItemResult:
    return ItemResult(id=f"q{item}", repeat=repeat, prompt_hash=f"h{item}", response=parsed or "<think>", parsed=parsed,
                      correct=correct, latency_s=0.1, completion_tokens=8, finish_reason="length")


def test_answers_the_extractor_cannot_read_make_the_benchmark_measure_nothing():
    """Qwen3 thinking at max_tokens 8: most replies end inside <think>; identical on both sides, yet no PASS."""
    native = [result(i, "B" if i % 4 == 0 else "", i % 4 == 0) for i in range(400)]
    gate = gate_results("mmlu", native, list(native), 1.5, chance=0.25)
    assert gate.native_unreadable == gate.flagos_unreadable == 0.75
    assert gate.verdict == Verdict.INCONCLUSIVE and "75% of the native stack's answers could not be read" in gate.reason
    readable = [result(i, "B" if i % 2 else "C", i % 2 == 1) for i in range(400)]
    assert gate_results("mmlu", readable, list(readable), 3.0, chance=0.25).verdict == Verdict.PASS


def test_a_flagos_stack_writing_garbage_fails_and_never_passes():
    """Native readable and right on half the items; FlagOS unreadable on 30%: identical scores would PASS if the
    replies were readable, but unreadable replies never PASS; once they also cost accuracy, the gate FAILs."""
    native = [result(i, "B" if i % 2 else "C", i % 2 == 1) for i in range(400)]
    quiet = [result(i, "" if i % 10 < 3 and i % 2 == 0 else r.parsed, r.correct) for i, r in enumerate(native)]
    gate = gate_results("mmlu", native, quiet, 3.0, chance=0.25)
    assert gate.flagos_unreadable == 0.2 and gate.verdict == Verdict.PASS  # at the 20% allowed
    garbled = [result(i, "" if i % 10 < 6 else r.parsed, r.correct and i % 10 >= 6) for i, r in enumerate(native)]
    broken = gate_results("mmlu", native, garbled, 3.0, chance=0.25)
    assert broken.flagos_unreadable == 0.6 and not broken.vacuous and broken.verdict == Verdict.FAIL
    same_scores = [result(i, "" if i % 10 < 6 and i % 2 == 0 else r.parsed, r.correct) for i, r in enumerate(native)]
    hidden = gate_results("mmlu", native, same_scores, 3.0, chance=0.25)
    assert hidden.flagos_unreadable == 0.3 and hidden.verdict == Verdict.INCONCLUSIVE
    assert hidden.reason.startswith("30% of the FlagOS stack's answers could not be read")


def test_holm_adjusts_across_the_suite():
    assert holm_adjusted([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjusted([0.2, 0.001]) == pytest.approx([0.2, 0.002])
    # alone, each drop is significantly beyond the margin at 5%; across a suite of three, only the strongest
    gates = [paired_gate(name, *table(400, 150, native_only=k, flagos_only=0), 3.0) for name, k in
             (("gpqa", 20), ("aime", 21), ("mmlu", 40))]
    assert [g.verdict for g in gates] == [Verdict.FAIL, Verdict.FAIL, Verdict.FAIL]
    p_values = [g.p_worse for g in gates]
    assert 0.025 < min(p_values[:2]) and max(p_values[:2]) < 0.05 and p_values[2] < 1e-4  # x2 after mmlu: > 5%
    adjusted = holm(gates)
    assert [g.verdict for g in adjusted] == [Verdict.INCONCLUSIVE, Verdict.INCONCLUSIVE, Verdict.FAIL]
    assert suite_verdict([g.verdict for g in adjusted]) == Verdict.FAIL


def test_suite_verdicts():
    passing = paired_gate("mmlu", *stacks(2000, 0.6, 0.0, 0.0, seed=12), margin_pp=1.5)
    few = paired_gate("gpqa", *stacks(40, 0.6, 0.1, 0.1, seed=13), margin_pp=5.0)
    better = paired_gate("aime", *table(400, 100, native_only=0, flagos_only=60), 5.0)
    assert (passing.verdict, few.verdict, better.verdict) == (Verdict.PASS, Verdict.INCONCLUSIVE, Verdict.DIFFERS)
    assert suite_verdict([passing.verdict]) == Verdict.PASS
    assert suite_verdict([passing.verdict, few.verdict]) == Verdict.INCONCLUSIVE
    assert suite_verdict([passing.verdict, better.verdict, few.verdict]) == Verdict.DIFFERS
    assert suite_verdict([Verdict.DIFFERS, Verdict.FAIL]) == Verdict.FAIL
    assert suite_verdict([]) == Verdict.INCONCLUSIVE  # nothing gated proves nothing


def test_mcnemar_is_the_exact_binomial_on_discordant_pairs():
    assert mcnemar_exact(12, 3) == pytest.approx(binomtest(12, 15, 0.5).pvalue)
    assert mcnemar_exact(0, 0) == 1.0
    gate = paired_gate("gpqa", *table(40, 25, native_only=12, flagos_only=3), 5.0)
    assert (gate.native_only, gate.flagos_only) == (12, 3) and gate.mcnemar_p == pytest.approx(mcnemar_exact(12, 3))


def test_the_interval_is_agresti_min_on_the_paired_difference_with_students_t():
    """Half a sample discordant each way and one concordant added: centre (b - c) / (n + 2), variance
    ((b + c + 1) / (n + 2) - centre^2) / (n + 2); t with n - 1 degrees of freedom."""
    gate = paired_gate("gsm8k", *table(100, 40, native_only=9, flagos_only=3), 3.0)
    centre = 6 / 102
    se = math.sqrt((13 / 102 - centre ** 2) / 102)
    t95, t80 = student_t(99).ppf(0.95), student_t(99).ppf(0.80)
    assert (gate.ci_low, gate.ci_high) == pytest.approx((centre - t95 * se, centre + t95 * se))
    assert gate.drop == pytest.approx(0.06) and gate.detectable_drop == pytest.approx((t95 + t80) * se)


def test_repeats_shrink_the_pseudo_counts_to_half_a_sample():
    """30 items x 64 identical samples is 1,920 agreeing answers: the guard against a zero-width interval is half a
    sample each way, not half an item, so a suite like AIME can PASS on repeats."""
    native = {str(i): (i % 8) / 8 for i in range(30)}
    gate = paired_gate("aime", native, dict(native), 5.0, repeats=64)
    assert gate.ci_high == pytest.approx(student_t(29).ppf(0.95) * math.sqrt((1 / 64) / (30 + 2 / 64)) / math.sqrt(30 + 2 / 64))
    assert gate.verdict == Verdict.PASS


def test_repeated_samples_use_item_means_and_skip_mcnemar():
    native = {str(i): v for i, v in enumerate([0.75, 0.5, 1.0, 0.25] * 50)}
    gate = paired_gate("aime", native, {k: max(0.0, v - 0.25) for k, v in native.items()}, 5.0, repeats=4)
    assert gate.mcnemar_p is None and gate.drop == pytest.approx(0.25) and gate.verdict == Verdict.FAIL
    assert gate.repeats == 4 and gate.items == 200


def test_answer_agreement_is_reported():
    native = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}
    gate = paired_gate("mmlu", native, dict(native), 1.5, native_answers={"a": "A", "b": "C", "c": "B", "d": "D"},
                       flagos_answers={"a": "A", "b": "D", "c": "B", "d": "A"})
    assert gate.agreement == 0.5


def test_different_items_are_refused():
    with pytest.raises(GateError, match="not scored on the same items \\(1 only on the native side, 0 only on the FlagOS side\\)"):
        paired_gate("mmlu", {"a": 1.0, "b": 0.0}, {"a": 1.0}, 1.5)


def test_each_look_of_a_repeat_schedule_spends_a_share_of_alpha():
    """Looked at up to 3 times (8 -> 16 -> 32 repeats), each look is tested at 5% / 3: a wider interval and p-values
    three times the single look's, so stopping at the first decisive look keeps the error rates."""
    native, flagos = table(200, 60, native_only=12, flagos_only=4)
    once, thrice = paired_gate("gpqa", native, flagos, 5.0), paired_gate("gpqa", native, flagos, 5.0, looks=3)
    widening = student_t(199).ppf(1 - 0.05 / 3) / student_t(199).ppf(0.95)
    assert (thrice.ci_high - thrice.ci_low) == pytest.approx((once.ci_high - once.ci_low) * widening)
    assert thrice.p_worse == pytest.approx(min(1.0, 3 * once.p_worse)) and thrice.looks == 3
    assert [len(repeat_schedule(8, 32, True)), len(repeat_schedule(8, 32, False))] == [3, 1]
