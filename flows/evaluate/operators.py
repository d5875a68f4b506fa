"""What each stack's engine says about our operators, read before and after it answers a benchmark: the proof that
the FlagOS stack ran our kernels and the native stack ran none of them.

The engine's plugin (engine/report.py) serves `GET /flagos/operators`: per operator, whether it is switched on,
which vLLM layer it is bound to, its kernel's source hash and a call counter, summed over the worker processes
that ran the model. A stack that serves no such report cannot show what
it ran, so it is refused as either side of a comparison."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import requests
from pydantic import BaseModel, ConfigDict

from flows.errors import FlagReleaseError

REPORT_PATH = "/flagos/operators"


class StackRefused(FlagReleaseError):
    """A stack that is not what its role says (a FlagOS stack that ran none of our operators, a native stack that
    ran some, or an endpoint that cannot tell)."""


class OperatorCount(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    sha256: str
    enabled: bool
    bound_to: list[str]
    not_used: str | None
    calls: int


class OperatorUse(BaseModel):
    """One stack's engine and how often each of our operators ran while it answered."""

    model_config = ConfigDict(frozen=True)

    engine: str
    versions: dict[str, str]
    device: str
    mode: str  # native | compiled | interpreted: how our kernels ran
    execution: str = "unknown"  # eager | compiled graphs: how vLLM ran the model (recorded since the vLLM engine)
    flagos: bool
    fault: str | None
    operators: list[OperatorCount]

    @property
    def calls(self) -> int:
        return sum(o.calls for o in self.operators)

    def plus(self, other: "OperatorUse") -> "OperatorUse":
        """Counts over two spans of the same engine configuration (e.g. more repeats asked later)."""
        earlier = {o.name: o.calls for o in other.operators}
        return self.model_copy(update={"operators": [o.model_copy(update={"calls": o.calls + earlier.get(o.name, 0)})
                                                     for o in self.operators]})


def operator_report(base_url: str, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The engine's report, or None when the endpoint serves none (another engine, or an old image)."""
    root = base_url.removesuffix("/").removesuffix("/v1")
    try:
        response = requests.get(root + REPORT_PATH, timeout=timeout_s)
    except requests.RequestException:
        return None
    if response.status_code != 200:
        return None
    try:
        report = response.json()
    except ValueError:
        return None
    return report if isinstance(report, dict) and "operators" in report else None


def check_switch(role: str, report: dict[str, Any] | None) -> None:
    """Before any request: the FlagOS stack must have our operators on, the native stack none."""
    if report is None:
        raise StackRefused(f"the {role} stack serves no operator report ({REPORT_PATH}): it cannot show which of "
                           "our kernels it runs, so it is not compared")
    if role == "flagos" and not report.get("flagos"):
        raise StackRefused("the flagos stack has none of our operators switched on (is USE_FLAGGEMS=1 in the "
                           "chip's flagos_env?); comparing it with native would compare native with itself")
    if role != "flagos" and report.get("flagos"):
        on = [o["name"] for o in report["operators"] if o.get("enabled")]
        raise StackRefused(f"the {role} stack has our operators switched on ({', '.join(on)}); the reference must "
                           "run none of them (USE_FLAGGEMS=0 in the chip's native_env)")


def usage(before: dict[str, Any], after: dict[str, Any] | None, role: str) -> OperatorUse:
    """Calls made between the two reports, refused when they contradict the stack's role."""
    if after is None:
        raise StackRefused(f"the {role} stack stopped serving its operator report during the benchmark")
    start = {o["name"]: o["calls"] for o in before["operators"]}
    use = OperatorUse(engine=after.get("engine", "unknown"), versions=after.get("versions", {}),
                      device=after.get("device", "unknown"), mode=after.get("mode", "unknown"),
                      execution=after.get("execution", "unknown"),
                      flagos=bool(after.get("flagos")), fault=after.get("fault"),
                      operators=[OperatorCount(name=o["name"], sha256=o["sha256"], enabled=o["enabled"],
                                               bound_to=o["bound_to"], not_used=o.get("not_used"),
                                               calls=o["calls"] - start.get(o["name"], 0))
                                 for o in after["operators"]])
    if role == "flagos":
        idle = [o.name for o in use.operators if o.bound_to and o.calls == 0]
        if idle:
            raise StackRefused(f"the flagos stack never ran {', '.join(idle)} although the engine bound them into "
                               "the model: the comparison would not cover them")
    elif use.calls:
        ran = [f"{o.name} x{o.calls}" for o in use.operators if o.calls]
        raise StackRefused(f"the {role} stack ran our operators ({', '.join(ran)}); the reference must run none")
    return use


def served_identity(report: dict[str, Any] | None) -> str | None:
    """What an endpoint serves, from its report with the counters left out: its image build, checkpoint and every
    switch, so a restart with another image, model, operator set or fault is another stack. None when the report
    names neither a build nor a checkpoint (nothing to key answers by)."""
    if report is None or not (report.get("build") or report.get("checkpoint")):
        return None
    fixed = {key: value for key, value in report.items() if key != "operators"}
    fixed["operators"] = [{k: v for k, v in row.items() if k not in ("calls", "errors")}
                          for row in report.get("operators", [])]
    digest = hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]
    build = report.get("build") or {}
    on = [o["name"] for o in fixed["operators"] if o.get("enabled")]
    parts = [f"build {build['fingerprint'][:12]}" if build.get("fingerprint") else "no image build",
             f"checkpoint {str(report.get('checkpoint'))[:12]}",
             f"our operators {'on (' + ', '.join(on) + ')' if on else 'off'}"]
    if report.get("fault"):
        parts.append(f"fault {report['fault']}")
    return f"endpoint serving {'; '.join(parts)} [{digest}]"
