"""The one tolerance table (FlagGems' RESOLUTION): rtol by dtype, atol 1e-4 times the reduction length, integers
exact. Tests, the consistency check and the benchmark's correctness gate all compare through `compare()`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

RTOL = {torch.float32: 1.3e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
ATOL_PER_REDUCED_ELEMENT = 1e-4


@dataclass(frozen=True)
class Comparison:
    max_abs_err: float
    max_rel_err: float
    atol: float
    rtol: float
    passed: bool
    detail: str


def tolerance(dtype: torch.dtype, reduce_size: int = 1) -> tuple[float, float]:
    """(atol, rtol) for outputs of `dtype` that reduce over `reduce_size` inputs; integers must match exactly."""
    if not dtype.is_floating_point:
        return 0.0, 0.0
    return ATOL_PER_REDUCED_ELEMENT * reduce_size, RTOL[dtype]


def compare(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, reduce_size: int = 1) -> Comparison:
    """Compare a kernel's output with a (float64) reference; `detail` names the first mismatching index."""
    atol, rtol = tolerance(dtype, reduce_size)
    a, e = actual.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        return Comparison(float("inf"), float("inf"), atol, rtol, False, f"shape {tuple(a.shape)} != {tuple(e.shape)}")
    diff = (a - e).abs()
    finite = torch.isfinite(a) == torch.isfinite(e)
    bad = (diff > atol + rtol * e.abs()) | ~finite | a.isnan()
    max_abs = float(diff[finite].max()) if diff.numel() and finite.any() else 0.0
    rel = diff / e.abs().clamp_min(1e-12)
    max_rel = float(rel[finite].max()) if rel.numel() and finite.any() else 0.0
    if not bad.any():
        return Comparison(max_abs, max_rel, atol, rtol, True, "ok")
    index = tuple(int(i) for i in bad.nonzero()[0])
    detail = (f"{int(bad.sum())} of {bad.numel()} elements differ; first at {index}: "
              f"got {a[index].item():.6g}, expected {e[index].item():.6g}")
    return Comparison(max_abs, max_rel, atol, rtol, False, detail)
