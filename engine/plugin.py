"""Our vLLM plugin: the `vllm.general_plugins` entry point, which vLLM runs in each of its processes (API server,
EngineCore and every worker that runs the model).

In each process it reads the switches (`USE_FLAGGEMS`, `FLAGOS_OPS`, `FLAGOS_FAULT`) from that process's own
environment, so what the operator report says is what the process that ran the model was asked. With our
operators on it registers our layer classes (engine/layers.py) and checks, once the model is built, that every
layer doing one of our switched-on operators runs ours. A setting it cannot honour ends the process with one line
naming it (exit 2): in the API server that is before anything serves."""

from __future__ import annotations

import os
import sys
from typing import Any

from engine.operators import EngineError, Operators, switches_from_env

NOT_USED = {  # why an operator of ours that is switched on may have no layer in a model
    "topk_softmax": "the model has no MoE layer (no router)",
    "moe_sum": "the model has no MoE layer (no expert combine)",
    "softmax": "attention runs in vLLM's attention backend; no layer calls a separate softmax",
    "fused_add_rms_norm": "the model adds no residual inside its norms",
}
_operators: Operators | None = None
_execution = "unknown"


def current() -> Operators:
    if _operators is None:
        raise EngineError("the FlagOS plugin was not loaded in this process (vllm.general_plugins entry point)")
    return _operators


def execution() -> str:
    """How vLLM runs the model in this process: eager, or compiled graphs (where only opaque ops count per call)."""
    return _execution


def register() -> None:
    global _operators
    if _operators is not None:
        return
    try:
        switches = switches_from_env(os.environ)
    except EngineError as exc:
        print(f"flagos-engine: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    mode = "native"
    if switches.flagos:
        import triton

        # what Triton decided when it read TRITON_INTERPRET, not what the environment is believed to say
        mode = "interpreted" if triton.knobs.runtime.interpret else "compiled"
    _operators = Operators(switches, mode=mode)
    _watch_model_loading()
    if not switches.flagos:
        return
    from engine.layers import LAYERS, needed_layers
    from vllm.model_executor.custom_op import CustomOp

    for layer_name in needed_layers(switches.enabled):
        CustomOp.register_oot(LAYERS[layer_name], name=layer_name)


def _watch_model_loading() -> None:
    """Wrap vLLM's model loader: once the model is built, record the execution mode and refuse a model with a layer
    that does one of our switched-on operators but is not ours (a subclass vLLM does not replace)."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.load_model

    def load_model(self, vllm_config, model_config, *args: Any, **kwargs: Any):
        global _execution
        _execution = "eager" if model_config.enforce_eager else "compiled graphs"
        model = original(self, vllm_config, model_config, *args, **kwargs)
        if _operators is not None and _operators.switches.flagos:
            from engine.layers import unbound_layers

            refused = unbound_layers(model, _operators.switches.enabled)
            if refused:
                raise EngineError("cannot bind " + "; ".join(refused) + ": keep the operator native "
                                  "(FLAGOS_OPS / the chip's native_ops) or add its layer to engine/layers.py")
            for name in _operators.switches.enabled:
                stat = _operators.stats[name]
                if not stat.bound_to:
                    stat.not_used = NOT_USED.get(name, "no layer of this model calls it")
        return model

    BaseModelLoader.load_model = load_model
