"""The optional serving-throughput gate: FlagOS output tokens/s against native at every measured concurrency."""

from __future__ import annotations

from flows.evaluate.gate import Verdict
from flows.evaluate.perf import PerfPoint
from flows.evaluate.stage import throughput_verdict


def points(*rates: float) -> list[PerfPoint]:
    return [PerfPoint(concurrency=c, requests=8, output_tokens_per_s=r, ttft_median_s=0.1, errors=0)
            for c, r in zip((1, 4), rates)]


def test_reported_only_unless_the_suite_sets_a_ratio():
    assert throughput_verdict(None, {"native": points(100, 300), "flagos": points(10, 10)}) is None


def test_every_concurrency_must_reach_the_ratio():
    assert throughput_verdict(0.8, {"native": points(100, 300), "flagos": points(85, 240)}) == Verdict.PASS
    assert throughput_verdict(0.8, {"native": points(100, 300), "flagos": points(85, 239)}) == Verdict.FAIL


def test_without_a_measured_native_stack_the_ratio_cannot_be_shown():
    assert throughput_verdict(0.8, {"flagos": points(85, 240)}) == Verdict.INCONCLUSIVE
