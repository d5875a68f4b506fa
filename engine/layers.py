"""vLLM's layers with our kernels inside: out-of-tree classes registered under the names of the layers they replace
(`CustomOp.register_oot`), so every model vLLM builds from those layers calls our operators. The binding table is
per vLLM layer, not per model.

Each class runs our kernel on the path vLLM dispatches to on the platform it runs (`forward_cuda`, `forward_cpu`,
`forward_oot`), through the process's counted `Operators`; an operator switched off by `FLAGOS_OPS` runs vLLM's own
native path. A layer our kernel cannot compute, or a configuration in which vLLM would never call our path
(custom ops disabled for compiled graphs), stops the model's construction naming the operator: never a silent
native fallback."""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.custom_op import CustomOp
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

from engine.operators import GATE_UP_SWAPPED, NORM_EPS_SCALES, EngineError, Operators

PLATFORM_METHODS = ("forward_cuda", "forward_cpu", "forward_oot", "forward_xpu")


def _operators() -> Operators:
    from engine.plugin import current

    return current()


def _bound(layer: CustomOp, operators: Operators, names: tuple[str, ...], flagos_forward) -> None:
    """Record where our operators run, or refuse a layer whose calls vLLM would route around our path."""
    dispatched = getattr(layer._forward_method, "__func__", None)
    if dispatched is not flagos_forward:
        raise EngineError(f"vLLM dispatches {type(layer).name} to its native path in this configuration (custom "
                          f"ops disabled, as for compiled graphs), so {', '.join(names)} would never run our kernels; "
                          "serve with enforce_eager or compilation_config custom_ops ['all']")
    for name in names:
        if operators.enabled(name):
            operators.bind(name, f"vllm {type(layer).name}")


def _on_every_platform(cls: type) -> type:
    """Our forward is what vLLM's dispatcher picks on any platform."""
    for method in PLATFORM_METHODS:
        setattr(cls, method, cls.forward_flagos)
    return cls


@_on_every_platform
class FlagOSRMSNorm(RMSNorm):
    """RMSNorm(x) -> `rms_norm`; RMSNorm(x, residual) -> `fused_add_rms_norm` (returns the norm and x + residual)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        operators = _operators()
        if self.variance_size_override is not None or not self.has_weight:
            raise EngineError(f"rms_norm cannot be bound to an RMSNorm without its own weight or with a variance "
                              f"over {self.variance_size_override} of {self.hidden_size} features; keep rms_norm and "
                              "fused_add_rms_norm native (FLAGOS_OPS / the chip's native_ops)")
        _bound(self, operators, ("rms_norm", "fused_add_rms_norm"), FlagOSRMSNorm.forward_flagos)
        self._eps_scale = NORM_EPS_SCALES.get(operators.fault or "", 1.0)

    def forward_flagos(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        operators = _operators()
        name = "rms_norm" if residual is None else "fused_add_rms_norm"
        if not operators.enabled(name):
            return self.forward_native(x, residual)
        eps = self.variance_epsilon * self._eps_scale
        if residual is None:
            return operators.call(name, x, self.weight.data, eps)
        return operators.call(name, x, residual, self.weight.data, eps)


@_on_every_platform
class FlagOSSiluAndMul(SiluAndMul):
    """SiluAndMul(x = [gate | up]) -> `silu_and_mul`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _bound(self, _operators(), ("silu_and_mul",), FlagOSSiluAndMul.forward_flagos)

    def forward_flagos(self, x: torch.Tensor) -> torch.Tensor:
        operators = _operators()
        if not operators.enabled("silu_and_mul"):
            return self.forward_native(x)
        if operators.fault == GATE_UP_SWAPPED:
            gate, up = x.chunk(2, dim=-1)
            x = torch.cat((up, gate), dim=-1)
        return operators.call("silu_and_mul", x)


@_on_every_platform
class FlagOSRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding(positions, query, key), neox style -> `rotary_embedding`, in place on query and key."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        operators = _operators()
        if operators.enabled("rotary_embedding") and not self.is_neox_style:
            raise EngineError("rotary_embedding cannot be bound to this model's RotaryEmbedding: it rotates "
                              "interleaved pairs (GPT-J style) and our kernel rotates halves (neox style); keep "
                              "rotary_embedding native (FLAGOS_OPS / the chip's native_ops)")
        _bound(self, operators, ("rotary_embedding",), FlagOSRotaryEmbedding.forward_flagos)

    def forward_flagos(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None,
                       *rest: Any):
        operators = _operators()
        if not operators.enabled("rotary_embedding"):
            return self.forward_native(positions, query, key, *rest)
        if key is None or rest:
            raise EngineError("rotary_embedding: vLLM called RotaryEmbedding without a key or with offsets, which "
                              "our kernel does not take")
        cache = self._match_cos_sin_cache_dtype(query)
        operators.call("rotary_embedding", positions.flatten(), query, key, self.head_size, cache)
        return query, key


# vLLM layer name -> (our class, the operators it runs)
LAYERS = {"RMSNorm": FlagOSRMSNorm, "SiluAndMul": FlagOSSiluAndMul, "RotaryEmbedding": FlagOSRotaryEmbedding}
LAYER_OPERATORS = {"RMSNorm": ("rms_norm", "fused_add_rms_norm"), "SiluAndMul": ("silu_and_mul",),
                   "RotaryEmbedding": ("rotary_embedding",)}


def needed_layers(enabled: frozenset[str]) -> list[str]:
    """The vLLM layers to replace for the switched-on operators."""
    return [layer for layer, names in LAYER_OPERATORS.items() if enabled & set(names)]


def _operators_of_foreign(module: torch.nn.Module) -> tuple[str, ...]:
    """Which of our operators a layer that is not ours computes: RMSNorm variants vLLM does not replace by name
    (GemmaRMSNorm, gated norms), rotary variants (Llama-3 scaling, YaRN, M-RoPE), and MoE layers, whose router,
    expert activation and combine we do not bind yet."""
    if isinstance(module, (FlagOSRMSNorm, FlagOSRotaryEmbedding, FlagOSSiluAndMul)):
        return ()
    name = type(module).__name__
    if name.endswith("RMSNorm") or name.startswith("RMSNorm"):
        return ("rms_norm",)
    if isinstance(module, RotaryEmbeddingBase):
        return ("rotary_embedding",)
    if name == "FusedMoE":
        return ("topk_softmax", "silu_and_mul", "moe_sum")
    return ()


def unbound_layers(model: torch.nn.Module, enabled: frozenset[str]) -> list[str]:
    """One line per switched-on operator that a layer of `model` computes with vLLM's code instead of ours."""
    found: dict[str, set[str]] = {}
    for module in model.modules():
        for name in _operators_of_foreign(module):
            if name in enabled:
                found.setdefault(name, set()).add(type(module).__name__)
    return [f"{name} (the model's {', '.join(sorted(classes))} is not replaced by our plugin)"
            for name, classes in sorted(found.items())]
