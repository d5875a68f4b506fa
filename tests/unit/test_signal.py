"""The finer consistency signal: identical replies and where differing ones part, against native vs native."""

from __future__ import annotations

from flows.evaluate.client import ItemResult
from flows.evaluate.gate import Verdict
from flows.evaluate.signal import agreement, consistency_signal, first_divergence


def replies(texts: list[str]) -> list[ItemResult]:
    return [ItemResult(id=f"q{i}", prompt_hash=f"h{i}", response=text, parsed="", correct=False, latency_s=0.1,
                       completion_tokens=4, finish_reason="stop") for i, text in enumerate(texts)]


def test_the_first_diverging_position_counts_words_and_marks():
    assert first_divergence("7 + 5 = 12.", "7 + 5 = 13.") == 4
    assert first_divergence("The answer is 12", "The answer is 12, because") == 4  # one is a prefix of the other
    assert first_divergence("same", "same") == 1


def test_identical_share_and_median_divergence():
    native = replies(["12", "The sum is 30.", "A", "B because"])
    flagos = replies(["12", "The sum is 31.", "A", "C because"])
    seen = agreement(native, flagos)
    assert seen.identical == 0.5 and seen.first_divergence == 1.5  # positions 3 and 0
    assert agreement(native, native).first_divergence is None


def test_the_signal_is_reported_against_the_baseline_and_gated_only_when_the_suite_asks():
    native = replies([f"answer {i}" for i in range(100)])
    drifted = replies([f"answer {i}" if i >= 20 else f"answer {i}!" for i in range(100)])
    again = replies([f"answer {i}" if i >= 2 else f"answer {i}." for i in range(100)])
    reported = consistency_signal(native, drifted, again, None)
    assert reported.verdict is None and round(reported.identical_drop, 2) == 0.18
    assert reported.flagos.identical == 0.8 and reported.baseline.identical == 0.98
    assert consistency_signal(native, drifted, again, 10.0).verdict == Verdict.FAIL
    assert consistency_signal(native, drifted, again, 20.0).verdict == Verdict.PASS
    assert consistency_signal(native, drifted, None, 20.0).verdict == Verdict.INCONCLUSIVE
    assert reported.p_value < 1e-3  # 18 replies differ from native only on the FlagOS side, none only on the baseline
