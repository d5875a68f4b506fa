"""The statistical gate on synthetic per-item results with known flip rates, plus exact checks of its parts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from flows.evaluate.gate import GateError, Verdict, holm_fail, mcnemar_exact, paired_gate, suite_verdict


def stacks(n: int, accuracy: float, lose: float, gain: float, seed: int) -> tuple[dict[str, float], dict[str, float]]:
    """A native stack at `accuracy`; the candidate loses `lose` of its right answers and gains `gain` of its wrong ones."""
    rng = np.random.default_rng(seed)
    native = rng.random(n) < accuracy
    flips = rng.random(n)
    candidate = np.where(native, flips >= lose, flips < gain)
    return ({str(i): float(v) for i, v in enumerate(native)}, {str(i): float(v) for i, v in enumerate(candidate)})


def test_identical_stacks_pass_with_a_zero_interval():
    native, _ = stacks(400, 0.38, 0, 0, seed=1)
    gate = paired_gate("arithmetic", native, dict(native), 3.0)
    assert (gate.drop, gate.ci_low, gate.ci_high, gate.mcnemar_p) == (0.0, 0.0, 0.0, 1.0)
    assert gate.verdict == Verdict.PASS and gate.native_only == gate.flagos_only == 0


def test_equal_stacks_with_symmetric_noise_pass_at_the_stated_rate():
    """True drop 0 with 12% of items flipping (6% each way), n = 2000, margin 3 pp: the paired SE is ~0.8 pp, so a
    one-sided 95% bound should PASS ~98% of runs and FAIL essentially never (the false-FAIL rate is under alpha)."""
    outcomes = [paired_gate("mmlu", *stacks(2000, 0.6, 0.1, 0.15, seed), margin_pp=3.0, resamples=1000, seed=seed).verdict
                for seed in range(100)]
    assert outcomes.count(Verdict.FAIL) == 0
    assert outcomes.count(Verdict.PASS) >= 95


def test_a_drop_of_twice_the_margin_fails():
    native, flagos = stacks(2000, 0.5, lose=0.12, gain=0.0, seed=7)  # 12% of 50% right -> ~6 pp drop
    gate = paired_gate("gsm8k", native, flagos, 3.0)
    assert 0.05 < gate.drop < 0.07 and gate.ci_low > 0.03 and gate.verdict == Verdict.FAIL
    assert gate.mcnemar_p < 1e-6 and gate.flagos_only == 0


def test_too_few_items_is_inconclusive_never_pass():
    native, flagos = stacks(30, 0.5, lose=0.1, gain=0.05, seed=3)
    gate = paired_gate("aime", native, flagos, 5.0)
    assert gate.ci_low < gate.margin < gate.ci_high and gate.verdict == Verdict.INCONCLUSIVE


def test_mcnemar_is_the_exact_binomial_on_discordant_pairs():
    assert mcnemar_exact(12, 3) == pytest.approx(binomtest(12, 15, 0.5).pvalue)
    assert mcnemar_exact(0, 0) == 1.0
    native = {str(i): 1.0 for i in range(12)} | {str(i): 0.0 for i in range(12, 15)} | {str(i): 1.0 for i in range(15, 40)}
    flagos = {str(i): 0.0 for i in range(12)} | {str(i): 1.0 for i in range(12, 15)} | {str(i): 1.0 for i in range(15, 40)}
    gate = paired_gate("gpqa", native, flagos, 5.0)
    assert (gate.native_only, gate.flagos_only) == (12, 3) and gate.mcnemar_p == pytest.approx(mcnemar_exact(12, 3))


def test_repeated_samples_use_means_and_skip_mcnemar():
    native = {str(i): v for i, v in enumerate([0.75, 0.5, 1.0, 0.25] * 50)}
    gate = paired_gate("aime", native, {k: max(0.0, v - 0.25) for k, v in native.items()}, 5.0)
    assert gate.mcnemar_p is None and gate.drop == pytest.approx(0.25) and gate.verdict == Verdict.FAIL


def test_answer_agreement_is_reported():
    native = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}
    gate = paired_gate("mmlu", native, dict(native), 1.5, native_answers={"a": "A", "b": "C", "c": "B", "d": "D"},
                       flagos_answers={"a": "A", "b": "D", "c": "B", "d": "A"})
    assert gate.agreement == 0.5


def test_different_items_are_refused():
    with pytest.raises(GateError, match="not scored on the same items \\(1 only on the native side, 0 only on the FlagOS side\\)"):
        paired_gate("mmlu", {"a": 1.0, "b": 0.0}, {"a": 1.0}, 1.5)


def test_holm_turns_a_significant_drop_over_the_margin_into_fail_and_the_suite_follows():
    inconclusive = paired_gate("gpqa", *stacks(200, 0.6, lose=0.08, gain=0.0, seed=11), margin_pp=5.0)
    passing = paired_gate("mmlu", *stacks(2000, 0.6, 0.0, 0.0, seed=12), margin_pp=1.5)
    assert inconclusive.verdict == Verdict.INCONCLUSIVE and inconclusive.drop > inconclusive.margin
    adjusted = holm_fail([inconclusive, passing])
    assert [g.verdict for g in adjusted] == [Verdict.FAIL, Verdict.PASS]
    assert suite_verdict(adjusted, {"gpqa", "mmlu"}) == Verdict.FAIL
    assert suite_verdict([passing], {"mmlu"}) == Verdict.PASS
    assert suite_verdict([inconclusive], {"gpqa"}) == Verdict.INCONCLUSIVE
    assert suite_verdict([inconclusive], set()) == Verdict.INCONCLUSIVE  # nothing gated proves nothing
