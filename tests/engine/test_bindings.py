"""Our kernels bound into real transformers models (small configs made here, random weights): the FlagOS model
computes what the native one does, every bound operator is counted, a broken integration is visible in the logits,
and what cannot be bound is refused by name."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from engine.operators import OPERATORS, EngineError, Operators, install
from engine.server import operators_from_env

LLAMA = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, hidden_act="silu")
QWEN3_MOE = Qwen3MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                           num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=97, max_position_embeddings=64,
                           decoder_sparse_step=1, mlp_only_layers=[1])  # layer 1 dense: both MLP kinds are bound


@pytest.fixture
def bound() -> Iterator[list]:
    """Install through this list; every installation is undone after the test (transformers is process-global)."""
    done: list = []
    yield done
    for installed in reversed(done):
        installed.undo()


def logits(model_class, config, ops: Operators | None, bound: list, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    model = model_class(config).eval()
    if ops is not None:
        bound.append(install(config.architectures[0] if config.architectures else model_class.__name__, ops,
                             config.to_dict()))
    tokens = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("model_class, config, expected", [
    (LlamaForCausalLM, LLAMA, {"rms_norm", "silu_and_mul", "rotary_embedding"}),
    (Qwen3MoeForCausalLM, QWEN3_MOE, {"rms_norm", "silu_and_mul", "rotary_embedding", "topk_softmax", "moe_sum"}),
], ids=["llama", "qwen3-moe"])
def test_the_flagos_model_matches_native_and_every_bound_operator_runs(bound, model_class, config, expected):
    native = logits(model_class, config, None, bound)
    ops = Operators(set(OPERATORS), mode="interpreted")
    flagos = logits(model_class, config, ops, bound)
    torch.testing.assert_close(flagos, native, rtol=1e-4, atol=1e-4)
    ran = {name for name, stat in ops.stats.items() if stat.calls}
    assert ran == expected
    report = ops.report()
    assert report["flagos"] and all(len(row["sha256"]) == 64 for row in report["operators"])
    not_used = {row["name"]: row["not_used"] for row in report["operators"] if row["not_used"]}
    assert set(not_used) == set(OPERATORS) - expected and all(not_used.values())


@pytest.mark.parametrize("fault", ["gate-up-swapped", "norm-eps-x1e4", "norm-eps-x100"])
def test_a_broken_integration_changes_what_the_model_computes(bound, fault: str):
    native = logits(LlamaForCausalLM, LLAMA, None, bound)
    broken = logits(LlamaForCausalLM, LLAMA, Operators(set(OPERATORS), fault=fault), bound)
    assert (broken - native).abs().max() > 1e-2  # 100x the tolerance the correct integration meets


def test_only_the_chosen_operators_are_switched(bound):
    ops = operators_from_env({"USE_FLAGGEMS": "1", "FLAGOS_OPS": "rms_norm"})
    native = logits(LlamaForCausalLM, LLAMA, None, bound)
    flagos = logits(LlamaForCausalLM, LLAMA, ops, bound)
    torch.testing.assert_close(flagos, native, rtol=1e-4, atol=1e-4)
    assert {name for name, stat in ops.stats.items() if stat.calls} == {"rms_norm"}


def test_the_native_stack_switches_nothing_and_imports_no_kernel(bound):
    ops = operators_from_env({"USE_FLAGGEMS": "0"})
    assert not ops.report()["flagos"] and ops._kernels == {}
    logits(LlamaForCausalLM, LLAMA, ops, bound)
    assert all(stat.calls == 0 for stat in ops.stats.values())


@pytest.mark.parametrize("environ, message", [
    ({"USE_FLAGGEMS": "yes please"}, r"USE_FLAGGEMS='yes please' is not a switch; allowed: 0, 1, true, false"),
    ({"USE_FLAGGEMS": "1", "FLAGOS_OPS": "rms_norm,flash_attn"}, r"unknown operator\(s\) \['flash_attn'\]"),
    ({"USE_FLAGGEMS": "1", "FLAGOS_FAULT": "everything"}, r"FLAGOS_FAULT='everything' is not a known fault"),
])
def test_a_switch_the_engine_cannot_honour_is_named(environ, message):
    with pytest.raises(EngineError, match=message):
        operators_from_env(environ)


def test_an_architecture_without_bindings_is_refused_naming_what_it_cannot_switch():
    with pytest.raises(EngineError, match=r"'GPT2LMHeadModel' has no FlagOS bindings .* cannot switch rms_norm, "):
        install("GPT2LMHeadModel", Operators(set(OPERATORS)), {})


def test_a_model_whose_activation_the_adapter_does_not_compute_is_refused(bound):
    with pytest.raises(EngineError, match=r"LlamaMLP cannot run silu_and_mul: config hidden_act is 'gelu'"):
        install("LlamaForCausalLM", Operators(set(OPERATORS)), {**LLAMA.to_dict(), "hidden_act": "gelu"})
    native = logits(LlamaForCausalLM, LLAMA, None, bound)  # the refusal left transformers as it was
    torch.manual_seed(0)
    assert torch.equal(native, logits(LlamaForCausalLM, LLAMA, None, bound))


def test_a_kernel_that_raises_fails_the_call_and_is_counted(bound):
    ops = Operators({"rms_norm"})
    with pytest.raises(ValueError, match="weight has dtype"):
        ops.call("rms_norm", torch.ones(2, 8), torch.ones(8, dtype=torch.float16), 1e-6)
    assert ops.stats["rms_norm"].errors == 1 and ops.stats["rms_norm"].calls == 0


def test_the_engine_serves_the_named_gguf_and_refuses_a_folder_it_cannot_pick_from(tmp_path):
    from engine.checkpoint import servable

    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"y")
    with pytest.raises(EngineError, match=r"exactly one \.gguf file; found a\.gguf, b\.gguf"):
        servable(tmp_path, tmp_path / "cache", print)
    with pytest.raises(EngineError, match=r"has no c\.gguf \(the serve configuration's gguf_file\)"):
        servable(tmp_path, tmp_path / "cache", print, "c.gguf")
