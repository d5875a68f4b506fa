"""Our operators as the engine calls them: switched on per operator by the process's environment, counted per call.

Every call of one of our kernels goes through `Operators.call`, which counts it (and counts the error when the
kernel raises, then re-raises: a failing kernel fails the request, it never falls back to the native op). The
switches are read in the process that runs the model, so what the report says is what that process did."""

from __future__ import annotations

import hashlib
import importlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
SWITCH = "USE_FLAGGEMS"  # 1/true: the FlagOS stack; 0/false (or unset): the native stack
SWITCH_VALUES = {"1": True, "true": True, "0": False, "false": False}
OPS_VARIABLE = "FLAGOS_OPS"  # comma-separated subset of our operators to switch on (default: all)
FAULT_VARIABLE = "FLAGOS_FAULT"
STACK_VARIABLES = (SWITCH, OPS_VARIABLE, FAULT_VARIABLE)
OPERATORS = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "topk_softmax", "moe_sum", "softmax")
# Deliberately broken integrations for the must-fail controls (tests/faults): the kernels stay as committed, the
# engine calls them wrongly. Never set in a release; the operator report shows it whenever it is.
GATE_UP_SWAPPED = "gate-up-swapped"
NORM_EPS_SCALES = {"norm-eps-x1e4": 1e4, "norm-eps-x100": 1e2}  # gross; mild (invisible to accuracy at 1,000 items)
MOE_NOT_RENORMALIZED = "moe-not-renormalized"
FAULTS = {
    GATE_UP_SWAPPED: "the SwiGLU input is passed as [up, gate] instead of [gate, up]",
    MOE_NOT_RENORMALIZED: "the router's top-k weights are not renormalised to sum to 1 (the model asks for it)",
    **{name: f"RMSNorm is called with the model's epsilon x {scale:g}" for name, scale in NORM_EPS_SCALES.items()},
}


class EngineError(Exception):
    """A configuration the engine refuses to start with; the message names the setting and what is allowed."""


@dataclass(frozen=True)
class Switches:
    """What the environment asks of this process: our operators on or off, which ones, and an injected fault."""

    enabled: frozenset[str]
    fault: str | None = None

    @property
    def flagos(self) -> bool:
        return bool(self.enabled)


def switches_from_env(environ: Mapping[str, str]) -> Switches:
    """The native stack switches nothing on; the FlagOS stack every operator, or the FLAGOS_OPS subset."""
    value = environ.get(SWITCH, "0").strip().lower()
    if value not in SWITCH_VALUES:
        raise EngineError(f"{SWITCH}={environ[SWITCH]!r} is not a switch; allowed: 0, 1, true, false")
    chosen = [name.strip() for name in environ.get(OPS_VARIABLE, "").split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(OPERATORS))
    if unknown:
        raise EngineError(f"{OPS_VARIABLE} names unknown operator(s) {unknown}; allowed: {', '.join(OPERATORS)}")
    fault = environ.get(FAULT_VARIABLE, "").strip() or None
    if fault is not None and fault not in FAULTS:
        raise EngineError(f"{FAULT_VARIABLE}={fault!r} is not a known fault; allowed: {', '.join(FAULTS)}")
    if not SWITCH_VALUES[value]:
        return Switches(frozenset())
    return Switches(frozenset(chosen or OPERATORS), fault)


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

    def __init__(self, switches: Switches, mode: str = "native"):
        self.switches = switches
        self.fault = switches.fault
        self.mode = mode
        self._lock = threading.Lock()
        self._kernels: dict[str, Callable[..., Any]] = {}
        self.stats = {name: OperatorStat(name, hashlib.sha256(kernel_source(name).read_bytes()).hexdigest(),
                                         name in switches.enabled) for name in OPERATORS}
        for name in sorted(switches.enabled):
            self._kernels[name] = getattr(importlib.import_module(f"kernels.{name}"), name)

    def enabled(self, name: str) -> bool:
        return self.stats[name].enabled

    def bind(self, name: str, where: str) -> None:
        """Record that a layer of the model calls `name` (once per layer kind, however many layers)."""
        with self._lock:
            if where not in self.stats[name].bound_to:
                self.stats[name].bound_to.append(where)

    def call(self, name: str, *args: Any) -> Any:
        """Run our kernel `name`, counted; a switched-off operator is never called here (its layer runs native)."""
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
        return {"flagos": self.switches.flagos, "mode": self.mode, "fault": self.fault,
                "fault_description": FAULTS.get(self.fault or ""), "operators": rows}
