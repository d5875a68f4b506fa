"""The evaluate stage's reading of the engines' operator reports: which stacks it refuses, before and after asking."""

from __future__ import annotations

import pytest

from flows.evaluate.operators import StackRefused, check_switch, served_identity, usage


def report(flagos: bool, calls: dict[str, int], bound: tuple[str, ...] = ("rms_norm", "silu_and_mul")) -> dict:
    return {"engine": "vllm", "versions": {"torch": "2.13.0"}, "device": "cpu",
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


def identified(flagos: bool, calls: dict[str, int], **changes) -> dict:
    return {**report(flagos, calls), "build": {"fingerprint": "f1" * 32}, "checkpoint": "c" * 64, **changes}


def test_an_endpoint_is_identified_by_what_it_serves_not_by_its_counters():
    served = served_identity(identified(True, {}))
    assert served == served_identity(identified(True, {"rms_norm": 700, "silu_and_mul": 350}))  # after answering
    assert served.startswith("endpoint serving build f1f1f1f1f1f1; checkpoint cccccccccccc; our operators on "
                             "(rms_norm, silu_and_mul, moe_sum) [")
    others = [identified(False, {}), identified(True, {}, fault="gate-up-swapped"),
              identified(True, {}, checkpoint="d" * 64), identified(True, {}, build={"fingerprint": "f2" * 32}),
              identified(True, {}, versions={"torch": "2.11.0"})]
    identities = {served_identity(other) for other in others}
    assert len(identities) == len(others) and served not in identities
    assert "fault gate-up-swapped" in served_identity(others[1])


def test_an_endpoint_that_names_neither_build_nor_checkpoint_has_no_identity():
    assert served_identity(None) is None
    assert served_identity(report(True, {})) is None
    assert served_identity(identified(True, {}, build=None)) is not None  # a source-checkout engine: its checkpoint
