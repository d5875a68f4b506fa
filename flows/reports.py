"""Markdown reports for the Prefect UI, rendered from templates/reports/ with StrictUndefined."""

from __future__ import annotations

from pathlib import Path

import jinja2

from flows.plan import Plan
from flows.settings import PROJECT_DIR

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(PROJECT_DIR / "templates" / "reports"),
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
)


def plan_markdown(plan: Plan, plan_path: Path) -> str:
    return _ENV.get_template("plan.md.j2").render(plan=plan, plan_path=plan_path)
