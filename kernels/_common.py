"""What every operator module shares: argument checks that name the argument, launch configurations that the
run-time wrapper and the ahead-of-time compiler compute the same way, and block-size arithmetic."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the wrapper makes it: grid, compile-time constants, warps.

    `args` are the run-time arguments with tensors replaced by their dtypes, which is what Triton's `warmup`
    accepts; the AOT compiler replays exactly these launches so the cache keys match the first real launch.
    """

    kernel: Any
    grid: tuple[int, ...]
    constexprs: dict[str, int | bool]
    num_warps: int
    args: tuple[Any, ...] = field(default=())

    def run(self, *args: Any) -> None:
        self.kernel[self.grid](*args, **self.constexprs, num_warps=self.num_warps)

    def warmup(self) -> Any:
        return self.kernel.warmup(*self.args, grid=self.grid, **self.constexprs, num_warps=self.num_warps)


def check_tensor(name: str, tensor: object, *, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES, ndim: int | None = None,
                 min_ndim: int = 1, last_dim: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Raise ValueError naming `name` and what is accepted, before anything is launched."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {tensor.dtype}; accepted: {', '.join(str(d) for d in dtypes)}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if tensor.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(tensor.shape)}")
    if last_dim is not None and tensor.shape[-1] != last_dim:
        raise ValueError(f"{name} must have last dimension {last_dim}, got shape {tuple(tensor.shape)}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}; it must be on {device} like the other inputs")
    return tensor


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """View `tensor` as [rows, last dim] with unit stride on the last dim, copying only when no such view exists."""
    flat = tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() != 2 else tensor
    if flat.shape[-1] > 1 and flat.stride(-1) != 1:
        flat = flat.contiguous()
    return flat


@dataclass(frozen=True)
class LaunchPolicy:
    """How much work one program instance gets: about `target_elements` elements, at most `max_rows` rows.

    `fit_rows` shrinks the row block to the rows there are. Compiled kernels keep it off, so their compile-time
    constants (and AOT cache keys) never depend on the batch size; the interpreter compiles nothing and turns it on.
    """

    target_elements: int
    max_rows: int = 64
    fit_rows: bool = False

    def rows_per_program(self, block_cols: int, n_rows: int) -> int:
        rows = max(1, min(self.max_rows, self.target_elements // block_cols))
        return min(rows, next_power_of_2(max(1, n_rows))) if self.fit_rows else rows


INTERPRETED = LaunchPolicy(target_elements=1 << 20, max_rows=1 << 14, fit_rows=True)


@dataclass(frozen=True)
class LaunchPolicies:
    """A kernel's launch policy per execution mode. Compiled, many small programs keep every SM busy; Triton's CPU
    interpreter pays a fixed cost per program instance (~5 ms, notes/h200-real-model.md), so few large ones win."""

    compiled: LaunchPolicy
    interpreted: LaunchPolicy = INTERPRETED

    def for_kernel(self, kernel: Any) -> LaunchPolicy:
        """The policy for the mode `kernel` was decorated in (TRITON_INTERPRET=1 at import: the interpreter)."""
        return self.interpreted if isinstance(kernel, InterpretedFunction) else self.compiled


def warps_for(elements: int) -> int:
    return 4 if elements <= 2048 else 8 if elements <= 8192 else 16


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)


def output(name: str, out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
           device: torch.device) -> torch.Tensor:
    """The caller's contiguous output buffer after checking it, or a new one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_tensor(name, out, dtypes=(dtype,), device=device, min_ndim=0)
    if tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {tuple(shape)} tensor, got shape {tuple(out.shape)} "
                         f"strides {out.stride()}")
    return out
