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
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

from engine.operators import GATE_UP_SWAPPED, MOE_NOT_RENORMALIZED, NORM_EPS_SCALES, EngineError, Operators

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


def _swiglu_input(operators: Operators, x: torch.Tensor) -> torch.Tensor:
    """[gate | up] as vLLM lays it out, or [up | gate] under the gate-up-swapped fault."""
    if operators.fault != GATE_UP_SWAPPED:
        return x
    gate, up = x.chunk(2, dim=-1)
    return torch.cat((up, gate), dim=-1)


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
        return operators.call("silu_and_mul", _swiglu_input(operators, x))


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


MOE_OPERATORS = ("topk_softmax", "silu_and_mul", "moe_sum")


class FlagOSFusedMoEMethod(UnquantizedFusedMoEMethod):
    """The experts of an unquantized MoE layer (Mixtral, Qwen3-MoE): router top-k -> `topk_softmax`, the experts'
    activation over every routed (token, slot) row at once -> `silu_and_mul`, the weighted combine -> `moe_sum`.

    It takes the router logits itself (a monolithic method), so vLLM's router and fused-experts kernel never run;
    the expert projections are plain matmuls over the rows each expert got. An operator of the three switched off
    by FLAGOS_OPS is computed here with torch's softmax/top-k, silu and sum (vLLM's CPU path fuses them into its
    own kernels, which a per-operator switch cannot split)."""

    @property
    def is_monolithic(self) -> bool:
        return True

    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        FusedMoEMethodBase.process_weights_after_loading(self, layer)  # keeps w13 [E, 2I, H] and w2 [E, H, I] as loaded
        operators = _operators()
        unsupported = {
            "scoring_func": layer.scoring_func != "softmax", "use_grouped_topk": layer.use_grouped_topk,
            "custom_routing_function": layer.custom_routing_function is not None,
            "e_score_correction_bias": layer.e_score_correction_bias is not None,
            "routed_scaling_factor": layer.routed_scaling_factor != 1.0,
            "apply_router_weight_on_input": layer.apply_router_weight_on_input,
            "expert_map (expert parallelism)": layer.expert_map is not None, "has_bias": self.moe.has_bias,
            "activation": getattr(layer.activation, "value", layer.activation) != "silu"}
        refused = [name for name, differs in unsupported.items() if differs]
        if refused:
            raise EngineError(f"topk_softmax, silu_and_mul and moe_sum cannot be bound to this MoE layer: it uses "
                              f"{', '.join(refused)}, which our MoE binding does not compute; keep them native "
                              "(FLAGOS_OPS / the chip's native_ops)")
        for name in MOE_OPERATORS:
            if operators.enabled(name):
                operators.bind(name, "vllm FusedMoE (unquantized experts)")

    def apply_monolithic(self, layer: RoutedExperts, x: torch.Tensor, router_logits: torch.Tensor,
                         input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] == 0:  # a step with no tokens for this rank: nothing to route
            return x.new_empty(x.shape)
        operators = _operators()
        weights, ids = self._route(operators, router_logits, layer.top_k, layer.renormalize)
        tokens, top_k = ids.shape
        flat = ids.flatten().long()
        order = torch.argsort(flat, stable=True)  # (token, slot) rows grouped by expert
        rows_of = torch.bincount(flat, minlength=layer.w13_weight.shape[0]).tolist()
        source = x[order // top_k]
        gate_up = torch.empty(source.shape[0], layer.w13_weight.shape[1], dtype=x.dtype, device=x.device)
        self._per_expert(rows_of, source, layer.w13_weight, gate_up)
        if operators.enabled("silu_and_mul"):
            activated = operators.call("silu_and_mul", _swiglu_input(operators, gate_up))
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            activated = torch.nn.functional.silu(gate) * up
        down = torch.empty(source.shape[0], layer.w2_weight.shape[1], dtype=x.dtype, device=x.device)
        self._per_expert(rows_of, activated, layer.w2_weight, down)
        slots = torch.empty_like(down)
        slots[order] = down
        slots = slots.view(tokens, top_k, -1)
        if operators.enabled("moe_sum"):
            return operators.call("moe_sum", slots, weights)
        return (slots * weights.to(slots.dtype)[..., None]).sum(dim=1)

    @staticmethod
    def _route(operators: Operators, logits: torch.Tensor, top_k: int, renormalize: bool):
        if operators.enabled("topk_softmax"):  # the fault is in our binding: with the operator native it is gone
            return operators.call("topk_softmax", logits, top_k,
                                  renormalize and operators.fault != MOE_NOT_RENORMALIZED)
        weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids.to(torch.int32)

    @staticmethod
    def _per_expert(rows_of: list[int], inputs: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
        """out[rows of expert e] = inputs[rows of expert e] @ weight[e]^T, expert by expert (rows grouped by expert)."""
        start = 0
        for expert, rows in enumerate(rows_of):
            if rows:
                torch.matmul(inputs[start:start + rows], weight[expert].t(), out=out[start:start + rows])
                start += rows


# vLLM layer name -> (our class, the operators it runs)
LAYERS = {"RMSNorm": FlagOSRMSNorm, "SiluAndMul": FlagOSSiluAndMul, "RotaryEmbedding": FlagOSRotaryEmbedding,
          "UnquantizedFusedMoEMethod": FlagOSFusedMoEMethod}
LAYER_OPERATORS = {"RMSNorm": ("rms_norm", "fused_add_rms_norm"), "SiluAndMul": ("silu_and_mul",),
                   "RotaryEmbedding": ("rotary_embedding",), "UnquantizedFusedMoEMethod": MOE_OPERATORS}


def needed_layers(enabled: frozenset[str]) -> list[str]:
    """The vLLM layers to replace for the switched-on operators."""
    return [layer for layer, names in LAYER_OPERATORS.items() if enabled & set(names)]


def _operators_of_foreign(module: torch.nn.Module) -> tuple[str, ...]:
    """Which of our operators a layer that is not ours computes: RMSNorm variants vLLM does not replace by name
    (GemmaRMSNorm, gated norms), rotary variants (Llama-3 scaling, YaRN, M-RoPE), and MoE experts run by another
    method (quantized experts)."""
    if isinstance(module, (FlagOSRMSNorm, FlagOSRotaryEmbedding, FlagOSSiluAndMul)):
        return ()
    name = type(module).__name__
    if name.endswith("RMSNorm") or name.startswith("RMSNorm"):
        return ("rms_norm",)
    if isinstance(module, RotaryEmbeddingBase):
        return ("rotary_embedding",)
    if isinstance(module, RoutedExperts) and not isinstance(module.quant_method, FlagOSFusedMoEMethod):
        return MOE_OPERATORS
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
