"""Markdown reports for the Prefect UI, rendered from templates/reports/ with StrictUndefined."""

from __future__ import annotations

from pathlib import Path

import jinja2

from flows.evaluate.operators import OperatorUse
from flows.evaluate.perf import perf_markdown
from flows.evaluate.stage import EvaluationReport
from flows.plan import Plan
from kernels.report import consistency_markdown
from flows.settings import PROJECT_DIR

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(PROJECT_DIR / "templates" / "reports"),
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
)


def plan_markdown(plan: Plan, plan_path: Path) -> str:
    return _ENV.get_template("plan.md.j2").render(plan=plan, plan_path=plan_path)


def evaluation_markdown(report: EvaluationReport) -> str:
    return _ENV.get_template("evaluation.md.j2").render(report=report, operators_table=consistency_markdown(report.operators),
                                                        perf_table=perf_markdown(report.perf_by_stack()))


def evaluation_table(report: EvaluationReport) -> list[dict[str, str]]:
    """The Prefect table artifact: one row per benchmark."""
    rows = []
    for outcome in report.outcomes:
        gate = outcome.gate
        rows.append({
            "benchmark": outcome.benchmark,
            "items x repeats": f"{gate.items} x {gate.repeats}" if gate else "n/a",
            "native": f"{gate.native_accuracy:.3f}" if gate else "n/a",
            "FlagOS": f"{gate.flagos_accuracy:.3f}" if gate else "n/a",
            "drop (pp, native - FlagOS)": f"{gate.drop * 100:+.2f}" if gate else "n/a",
            "90% interval of drop (pp)": f"[{gate.ci_low * 100:+.2f}, {gate.ci_high * 100:+.2f}]" if gate else "n/a",
            "margin (pp)": f"+/-{gate.margin * 100:.1f}" if gate else "n/a",
            "detectable drop (pp)": f"{gate.detectable_drop * 100:.1f}" if gate else "n/a",
            "verdict": outcome.verdict.value + ("" if outcome.gated else " (not gated)"),
            "why": outcome.explanation or "",
            "identical replies (FlagOS / native-native)": _identical(outcome),
            "culprit": ", ".join(outcome.diagnosis.culprits) or outcome.diagnosis.conclusion if outcome.diagnosis else "",
            "FlagOS operator calls": _calls(outcome.operators.get("flagos")),
            "native operator calls": _calls(outcome.operators.get("native")),
        })
    return rows


def _identical(outcome) -> str:
    signal = outcome.signal
    if signal is None:
        return "n/a"
    baseline = f"{signal.baseline.identical:.1%}" if signal.baseline else "not run"
    return f"{signal.flagos.identical:.1%} / {baseline}"


def _calls(use: OperatorUse | None) -> str:
    if use is None:
        return "no report"
    ran = [f"{o.name} {o.calls}" for o in use.operators if o.calls]
    return ", ".join(ran) if ran else "none"
