"""Our operators as the serving engine calls them: switched on per operator, counted per call, and bound into a
model architecture's modeling code from `architectures.yaml` (data, not branches).

Every call of one of our kernels goes through `Operators.call`, which counts it (and counts the error when the
kernel raises, then re-raises: a failing kernel fails the request, it never falls back to the native op)."""

from __future__ import annotations

import hashlib
import importlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
ARCHITECTURES_FILE = Path(__file__).resolve().parent / "architectures.yaml"
OPS_VARIABLE = "FLAGOS_OPS"  # comma-separated subset of our operators to switch on (default: all)
OPERATORS = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "topk_softmax", "moe_sum", "softmax")
# Deliberately broken integrations for the must-fail control (tests/faults): the kernels stay as committed, the
# engine calls them wrongly. Never set in a release; the operator report shows it whenever it is.
GATE_UP_SWAPPED = "gate-up-swapped"
NORM_EPS_SCALES = {"norm-eps-x1e4": 1e4, "norm-eps-x100": 1e2}  # gross; mild (invisible to accuracy at 1,000 items)
FAULTS = {
    GATE_UP_SWAPPED: "the SwiGLU input is passed as [up, gate] instead of [gate, up]",
    **{name: f"RMSNorm is called with the model's epsilon x {scale:g}" for name, scale in NORM_EPS_SCALES.items()},
}


class EngineError(Exception):
    """A configuration the engine refuses to start with; the message names the setting and what is allowed."""


class Binding(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    operators: list[str] = Field(min_length=1)
    class_name: str | None = Field(default=None, alias="class")
    function: str | None = None
    adapter: str
    requires: dict[str, str] = Field(default_factory=dict, description="model config values the adapter assumes")

    @model_validator(mode="after")
    def _one_target(self) -> "Binding":
        if (self.class_name is None) == (self.function is None):
            raise ValueError("set exactly one of class or function")
        unknown = set(self.operators) - set(OPERATORS)
        if unknown:
            raise ValueError(f"unknown operator(s) {sorted(unknown)}; ours are {', '.join(OPERATORS)}")
        return self

    @property
    def target(self) -> str:
        return self.class_name or self.function  # type: ignore[return-value]


class Architecture(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    module: str
    bindings: list[Binding]
    not_used: dict[str, str] = Field(default_factory=dict)


def load_architectures(path: Path = ARCHITECTURES_FILE) -> dict[str, Architecture]:
    raw = yaml.safe_load(path.read_text())["architectures"]
    return {name: Architecture.model_validate(spec) for name, spec in raw.items()}


def kernel_source(name: str) -> Path:
    return KERNELS_DIR / f"{name}.py"


@dataclass
class OperatorStat:
    name: str
    sha256: str
    enabled: bool
    bound_to: list[str] = field(default_factory=list)
    not_used: str | None = None
    calls: int = 0
    errors: int = 0


class Operators:
    """The operators of one engine process: which are on, where they are bound, how often each ran."""

    def __init__(self, enabled: set[str], fault: str | None = None, mode: str = "native"):
        unknown = enabled - set(OPERATORS)
        if unknown:
            raise EngineError(f"FLAGOS_OPS names unknown operator(s) {sorted(unknown)}; allowed: {', '.join(OPERATORS)}")
        if fault is not None and fault not in FAULTS:
            raise EngineError(f"FLAGOS_FAULT={fault!r} is not a known fault; allowed: {', '.join(FAULTS)}")
        self.fault = fault
        self.mode = mode
        self._lock = threading.Lock()
        self._kernels: dict[str, Callable[..., Any]] = {}
        self.stats = {name: OperatorStat(name, hashlib.sha256(kernel_source(name).read_bytes()).hexdigest(),
                                         name in enabled) for name in OPERATORS}
        for name in sorted(enabled):
            self._kernels[name] = getattr(importlib.import_module(f"kernels.{name}"), name)

    def enabled(self, name: str) -> bool:
        return self.stats[name].enabled

    def call(self, name: str, *args: Any) -> Any:
        """Run our kernel `name`, counted; the native reference when that operator is switched off here."""
        if not self.stats[name].enabled:
            return importlib.import_module(f"kernels.{name}").reference(*args)
        try:
            result = self._kernels[name](*args)
        except Exception:
            with self._lock:
                self.stats[name].errors += 1
            raise
        with self._lock:
            self.stats[name].calls += 1
        return result

    def report(self) -> dict[str, Any]:
        with self._lock:
            rows = [dict(vars(stat)) for stat in self.stats.values()]
        return {"flagos": any(stat["enabled"] for stat in rows), "mode": self.mode, "fault": self.fault,
                "fault_description": FAULTS.get(self.fault or ""), "operators": rows}


@dataclass
class Installed:
    """What `install` replaced, so a test process can put transformers back (an engine process never does)."""

    replaced: list[tuple[Any, str, Any]] = field(default_factory=list)

    def undo(self) -> None:
        for owner, attribute, original in reversed(self.replaced):
            setattr(owner, attribute, original)
        self.replaced.clear()


def install(architecture: str, operators: Operators, model_config: dict[str, Any],
            architectures: dict[str, Architecture] | None = None) -> Installed:
    """Bind every switched-on operator into `architecture`'s modeling code, or refuse naming what cannot be bound."""
    from engine import adapters

    table = architectures if architectures is not None else load_architectures()
    wanted = [name for name in OPERATORS if operators.enabled(name)]
    installed = Installed()
    if not wanted:
        return installed
    spec = table.get(architecture)
    if spec is None:
        raise EngineError(f"architecture {architecture!r} has no FlagOS bindings (engine/architectures.yaml knows "
                          f"{', '.join(sorted(table))}); cannot switch {', '.join(wanted)}")
    module = importlib.import_module(spec.module)
    for binding in spec.bindings:
        if not any(operators.enabled(name) for name in binding.operators):
            continue
        wrong = {key: (model_config.get(key), value) for key, value in binding.requires.items()
                 if str(model_config.get(key)) != value}
        if wrong:
            installed.undo()
            raise EngineError(f"{architecture}: {binding.target} cannot run {', '.join(binding.operators)}: "
                              + "; ".join(f"config {k} is {have!r}, the adapter needs {need!r}"
                                          for k, (have, need) in wrong.items()))
        if binding.class_name:
            owner, attribute = getattr(module, binding.class_name), "forward"
        else:
            owner, attribute = module, binding.function
        original = getattr(owner, attribute)
        setattr(owner, attribute, getattr(adapters, binding.adapter)(operators))
        installed.replaced.append((owner, attribute, original))
        for name in binding.operators:
            if operators.enabled(name):
                operators.stats[name].bound_to.append(f"{spec.module}.{binding.target}")
    unbound = [name for name in wanted if not operators.stats[name].bound_to and name not in spec.not_used]
    if unbound:
        installed.undo()
        raise EngineError(f"{architecture}: no binding for {', '.join(unbound)} (engine/architectures.yaml); "
                          "switch them off with FLAGOS_OPS or add a binding")
    for name in wanted:
        if not operators.stats[name].bound_to:
            operators.stats[name].not_used = spec.not_used[name]
    return installed
