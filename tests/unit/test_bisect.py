"""Culprit bisection over synthetic stacks whose broken operators are known: the passes it makes, the culprit it
names, and what it says when no single operator explains the departure or the time cap is reached."""

from __future__ import annotations

import math

import pytest

from flows.evaluate.bisect import (MAX_DISCORDANT, SAMPLE_OF_AGREEING, Measure, accuracy_measure, bisect_culprits,
                                   diagnosis_items, max_passes)

SEVEN = ["rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "topk_softmax", "moe_sum", "softmax"]


def scored(n: int = 200, broken_below: int = 120) -> tuple[dict[str, float], dict[str, float]]:
    """Native right on every third item; the broken FlagOS stack loses every native-right item below `broken_below`."""
    native = {f"q{i}": float(i % 3 == 0) for i in range(n)}
    flagos = {k: (0.0 if int(k[1:]) < broken_below else v) for k, v in native.items()}
    return native, flagos


class Stack:
    """Answers like FlagOS when every operator of `broken` is switched on, like native otherwise."""

    def __init__(self, broken: set[str], native, flagos, needs_all: bool = True):
        self.broken, self.native, self.flagos, self.needs_all, self.calls = broken, native, flagos, needs_all, []

    def __call__(self, subset: list[str], items: list[str]):
        self.calls.append(list(subset))
        on = set(subset) & self.broken
        breaks = on == self.broken if self.needs_all else bool(on)
        source = self.flagos if breaks else self.native
        return {i: source[i] for i in items}, len(items)


@pytest.mark.parametrize("culprit", SEVEN)
def test_a_single_culprit_among_seven_is_named_within_log2_plus_one_passes(culprit: str):
    native, flagos = scored()
    stack = Stack({culprit}, native, flagos)
    lines: list[str] = []
    diagnosis = bisect_culprits("arithmetic", SEVEN, accuracy_measure(native, flagos, stack), 600, (400, 100.0),
                                lines.append)
    assert diagnosis.culprits == [culprit] and diagnosis.conclusion.startswith(f"{culprit} alone reproduces the failure")
    assert len(diagnosis.probes) <= max_passes(7) == math.ceil(math.log2(7)) + 1 == 4
    assert [p.operators for p in diagnosis.probes] == stack.calls and [culprit] in stack.calls  # confirmed alone
    assert diagnosis.requests == len(stack.calls) * len(diagnosis_items(native, flagos))
    assert any("reproduces the failure" in line for line in lines)


def test_the_diagnosis_items_are_the_discordant_ones_plus_a_fixed_sample():
    native, flagos = scored(broken_below=60)  # 20 discordant: all of them
    items = diagnosis_items(native, flagos)
    discordant = [i for i in native if native[i] != flagos[i]]
    assert set(discordant) <= set(items) and len(items) == len(discordant) + SAMPLE_OF_AGREEING
    assert items == diagnosis_items(native, flagos)  # the same sample every time
    many_native, many_flagos = scored(3000, broken_below=3000)  # 1,000 discordant: a fixed sample of them
    capped = diagnosis_items(many_native, many_flagos)
    assert len(capped) == MAX_DISCORDANT + SAMPLE_OF_AGREEING and capped == diagnosis_items(many_native, many_flagos)


def test_a_drop_that_needs_two_operators_is_not_pinned_on_one():
    native, flagos = scored()
    stack = Stack({"rms_norm", "softmax"}, native, flagos)
    diagnosis = bisect_culprits("arithmetic", SEVEN, accuracy_measure(native, flagos, stack), 600, (400, 100.0),
                                lambda line: None)
    assert diagnosis.culprits == [] and diagnosis.conclusion.startswith("no single operator reproduces the failure alone")


def test_no_pass_starts_after_the_time_cap():
    native, flagos = scored()
    stack = Stack({"moe_sum"}, native, flagos)
    diagnosis = bisect_culprits("arithmetic", SEVEN, accuracy_measure(native, flagos, stack), -1, (400, 100.0),
                                lambda line: None)
    assert stack.calls == [] and diagnosis.culprits == []
    assert diagnosis.conclusion.startswith("stopped at the time cap") and "the culprit is among rms_norm" in diagnosis.conclusion


def test_three_bound_operators_take_at_most_three_passes():
    native, flagos = scored()
    for culprit in ("rms_norm", "silu_and_mul", "rotary_embedding"):
        stack = Stack({culprit}, native, flagos)
        diagnosis = bisect_culprits("arithmetic", ["rms_norm", "silu_and_mul", "rotary_embedding"],
                                    accuracy_measure(native, flagos, stack), 600, (400, 100.0), lambda line: None)
        assert diagnosis.culprits == [culprit] and len(diagnosis.probes) <= 3


def test_a_stack_that_does_not_score_lower_is_not_bisected():
    native, _ = scored()
    stack = Stack({"rms_norm"}, native, native)
    diagnosis = bisect_culprits("arithmetic", SEVEN, accuracy_measure(native, dict(native), stack), 600, (400, 100.0),
                                lambda line: None)
    assert stack.calls == [] and diagnosis.conclusion.startswith("nothing to bisect")


def token_measure(broken: set[str], asked: list[list[str]]) -> Measure:
    """The token signal's shape: native scored twice departs by a small floor, FlagOS far above it, and a subset
    departs like FlagOS when it switches on a broken operator, else like native (the floor)."""
    def departure(subset: list[str]) -> tuple[float, int]:
        asked.append(list(subset))
        return (2e-2 if set(subset) & broken else 3e-6), 16
    return Measure(name="mean |delta logprob|", items=16, floor=2e-6, flagos=2.1e-2, departure=departure)


def test_the_token_measure_names_the_operator_above_the_native_floor():
    asked: list[list[str]] = []
    diagnosis = bisect_culprits("arithmetic", ["rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding"],
                                token_measure({"fused_add_rms_norm"}, asked), 600, (128, 60.0), lambda line: None)
    assert diagnosis.culprits == ["fused_add_rms_norm"] and len(asked) <= 3 and asked[-1] == ["fused_add_rms_norm"]
    assert diagnosis.floor == 2e-6 and diagnosis.requests == 16 * len(asked)
    assert diagnosis.conclusion.startswith("fused_add_rms_norm alone reproduces the failure (mean |delta logprob|")


def test_a_token_departure_no_larger_than_the_native_floor_is_not_bisected():
    asked: list[list[str]] = []
    measure = token_measure({"rms_norm"}, asked)
    quiet = Measure(name=measure.name, items=16, floor=2e-6, flagos=2e-6, departure=measure.departure)
    diagnosis = bisect_culprits("arithmetic", SEVEN, quiet, 600, (128, 60.0), lambda line: None)
    assert asked == [] and diagnosis.culprits == [] and diagnosis.conclusion.startswith("nothing to bisect")
