"""Put the FlagOS kernels in place of the native operators, FlagGems-style.

Two mechanisms, both through `torch.library`, chosen per operator:
- operators PyTorch has (`aten::rms_norm`, `aten::_softmax`) get our kernel as their implementation for the device's
  dispatch key, so unmodified model code (`F.rms_norm`, `torch.softmax`) runs our kernels;
- the fused serving operators PyTorch lacks (residual add + norm, SwiGLU gate, rotary, MoE router and combine) are
  defined as `torch.ops.flagos.*`, which the serving engine calls in place of its own fused ops.
`USE_FLAGGEMS=1` (the variable FlagScale's serve path reads) turns this on through `enable_from_env()`;
`replaced()` lists what is in place. Inference only: the replacements define no backward.
"""

from __future__ import annotations

import os
import warnings

import torch

from kernels.fused_add_rms_norm import fused_add_rms_norm
from kernels.moe_sum import moe_sum
from kernels.rms_norm import rms_norm
from kernels.rotary_embedding import rotary_embedding
from kernels.silu_and_mul import silu_and_mul
from kernels.softmax import softmax
from kernels.topk_softmax import topk_softmax

ENV_SWITCH = "USE_FLAGGEMS"

FLAGOS_SCHEMAS = {
    "fused_add_rms_norm": "fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
    "silu_and_mul": "silu_and_mul(Tensor x) -> Tensor",
    "rotary_embedding": "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, int head_size, "
                        "Tensor cos_sin) -> ()",
    "topk_softmax": "topk_softmax(Tensor gating_output, int topk, bool renormalize) -> (Tensor, Tensor)",
    "moe_sum": "moe_sum(Tensor x, Tensor? topk_weights) -> Tensor",
}

_state: dict[str, object] = {"aten": None, "flagos_impl": None, "replaced": []}
_flagos_defs: list[torch.library.Library] = []


def _aten_rms_norm(x, normalized_shape, weight=None, eps=None):
    if len(normalized_shape) != 1 or weight is None:
        raise ValueError("the FlagOS rms_norm normalises the last dimension with a weight; "
                         f"got normalized_shape={list(normalized_shape)}, weight={'set' if weight is not None else None}")
    return rms_norm(x, weight, 1e-6 if eps is None else eps)


def _aten_softmax(x, dim, half_to_float):
    result = softmax(x, dim)
    return result.float() if half_to_float else result


def _rotary_in_place(positions, query, key, head_size, cos_sin):
    rotary_embedding(positions, query, key, head_size, cos_sin)


FLAGOS_IMPLS = {
    "fused_add_rms_norm": fused_add_rms_norm,
    "silu_and_mul": silu_and_mul,
    "rotary_embedding": _rotary_in_place,
    "topk_softmax": topk_softmax,
    "moe_sum": moe_sum,
}
ATEN_IMPLS = {"rms_norm": _aten_rms_norm, "_softmax": _aten_softmax}


def default_dispatch_key() -> str:
    return "CUDA" if torch.cuda.is_available() else "CPU"


def enable(dispatch_key: str | None = None) -> list[str]:
    """Install every replacement for `dispatch_key` (default: CUDA when present, else CPU); return what is in place."""
    key = dispatch_key or default_dispatch_key()
    disable()
    if not _flagos_defs:
        definitions = torch.library.Library("flagos", "DEF")
        for schema in FLAGOS_SCHEMAS.values():
            definitions.define(schema)
        _flagos_defs.append(definitions)
    aten = torch.library.Library("aten", "IMPL")
    flagos_impl = torch.library.Library("flagos", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Overriding a previously registered kernel": intended
        for name, fn in ATEN_IMPLS.items():
            aten.impl(name, fn, key)
    for name, fn in FLAGOS_IMPLS.items():
        flagos_impl.impl(name, fn, key)
    _state.update(aten=aten, flagos_impl=flagos_impl,
                  replaced=[f"aten::{n} ({key})" for n in ATEN_IMPLS] + [f"flagos::{n} ({key})" for n in FLAGOS_IMPLS])
    return replaced()


def disable() -> None:
    """Give the native operators back (the `flagos::` definitions stay, without implementations)."""
    for lib in ("aten", "flagos_impl"):
        library = _state[lib]
        if library is not None:
            library._destroy()  # the public API has no unregister; this is what torch's own tests use
        _state[lib] = None
    _state["replaced"] = []


def replaced() -> list[str]:
    return list(_state["replaced"])  # type: ignore[arg-type]


def enable_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """Enable when USE_FLAGGEMS is 1/true/yes, as FlagScale's serve path does; return what is in place."""
    value = (environ if environ is not None else os.environ).get(ENV_SWITCH, "")
    return enable() if value.strip().lower() in ("1", "true", "yes") else []
