"""The evaluate stage's reading of the engines' operator reports: which stacks it refuses, before and after asking."""

from __future__ import annotations

import pytest

from flows.evaluate.operators import StackRefused, check_switch, usage


def report(flagos: bool, calls: dict[str, int], bound: tuple[str, ...] = ("rms_norm", "silu_and_mul")) -> dict:
    return {"engine": "transformers-serve", "versions": {"torch": "2.13.0"}, "device": "cpu",
            "mode": "interpreted" if flagos else "native", "flagos": flagos, "fault": None,
            "operators": [{"name": name, "sha256": "0" * 64, "enabled": flagos,
                           "bound_to": [f"m.{name}"] if flagos and name in bound else [],
                           "not_used": None, "calls": calls.get(name, 0)}
                          for name in ("rms_norm", "silu_and_mul", "moe_sum")]}


def test_a_flagos_stack_that_ran_every_bound_operator_is_counted_over_the_span():
    use = usage(report(True, {"rms_norm": 10, "silu_and_mul": 5}), report(True, {"rms_norm": 70, "silu_and_mul": 35}),
                "flagos")
    assert {o.name: o.calls for o in use.operators} == {"rms_norm": 60, "silu_and_mul": 30, "moe_sum": 0}
    assert use.calls == 90 and use.plus(use).calls == 180


@pytest.mark.parametrize("role, before, after, message", [
    ("flagos", report(True, {}), report(True, {"rms_norm": 5}), "never ran silu_and_mul although the engine bound"),
    ("flagos", report(True, {}), report(True, {}), "never ran rms_norm, silu_and_mul"),
    ("native", report(False, {}), report(False, {"rms_norm": 3}), r"the native stack ran our operators \(rms_norm x3\)"),
    ("flagos", report(True, {}), None, "stopped serving its operator report"),
])
def test_a_span_that_contradicts_the_stacks_role_is_refused(role, before, after, message):
    with pytest.raises(StackRefused, match=message):
        usage(before, after, role)


@pytest.mark.parametrize("role, seen, message", [
    ("flagos", None, "the flagos stack serves no operator report"),
    ("native", None, "the native stack serves no operator report"),
    ("flagos", report(False, {}), "the flagos stack has none of our operators switched on"),
    ("native", report(True, {}), r"the native stack has our operators switched on \(rms_norm, silu_and_mul, moe_sum\)"),
])
def test_a_stack_whose_switch_contradicts_its_role_is_refused_before_any_request(role, seen, message):
    with pytest.raises(StackRefused, match=message):
        check_switch(role, seen)


def test_stacks_as_their_roles_say_pass_the_switch_check():
    check_switch("flagos", report(True, {}))
    check_switch("native", report(False, {}))
