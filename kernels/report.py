"""The operator-consistency row and table; torch-free so the orchestration layer can read and render them too."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class OpResult:
    op: str
    dtype: str
    shape: str
    max_abs_err: float
    max_rel_err: float
    atol: float
    rtol: float
    passed: bool


def consistency_markdown(rows: Iterable[OpResult]) -> str:
    lines = ["| op | dtype | shape | max abs err | max rel err | atol | rtol | pass |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.op} | {r.dtype} | {r.shape} | {r.max_abs_err:.3g} | {r.max_rel_err:.3g} | {r.atol:.3g} | "
              f"{r.rtol:.3g} | {'yes' if r.passed else 'NO'} |" for r in rows]
    return "\n".join(lines) + "\n"
