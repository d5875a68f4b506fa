"""The operator-consistency table as markdown; torch-free so the orchestration layer can render it too."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def consistency_markdown(rows: Iterable[Any]) -> str:
    """Rows with op, dtype, shape, max_abs_err, max_rel_err, atol, rtol, passed (dataclass or pydantic)."""
    lines = ["| op | dtype | shape | max abs err | max rel err | atol | rtol | pass |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.op} | {r.dtype} | {r.shape} | {r.max_abs_err:.3g} | {r.max_rel_err:.3g} | {r.atol:.3g} | "
              f"{r.rtol:.3g} | {'yes' if r.passed else 'NO'} |" for r in rows]
    return "\n".join(lines) + "\n"
