"""The engine as users and the evaluate stage meet it: `flagscale serve` -> vLLM with our plugin, one process tree
per stack over the OpenAI API; the operator report, gathered from the worker that ran the model, proving which of
our kernels ran (and that the native stack ran none); the switches reaching that worker; and settings the engine
cannot honour refused at start-up with one line."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import requests

from flows.build.wheels import ENGINE_VENV
from flows.evaluate.benchmarks import load_definitions, load_items
from flows.evaluate.client import ask_stack
from flows.evaluate.operators import StackRefused, check_switch, operator_report, served_identity, usage
from tests.conftest import PROJECT_DIR
from tests.engine.conftest import SERVED_NAME, engine_server, plain_vllm

ITEMS = 16
LAYERS = 30  # SmolLM2-135M


@pytest.fixture(scope="module")
def arithmetic():
    definition = load_definitions(PROJECT_DIR / "benchmarks.yaml").benchmarks["arithmetic"]
    return definition, load_items("arithmetic", definition, ITEMS)


def answers(url: str, arithmetic, role: str):
    definition, items = arithmetic
    before = operator_report(url)
    check_switch(role, before)
    results = ask_stack(url, SERVED_NAME, items, definition, concurrency=ITEMS)
    return results, usage(before, operator_report(url), role)


def test_both_stacks_answer_alike_and_only_the_flagos_stack_runs_our_kernels(smollm2_gguf: Path, arithmetic):
    with engine_server(smollm2_gguf, {"USE_FLAGGEMS": "0"}) as native_url:
        listed = requests.get(f"{native_url}/models", timeout=5).json()
        native_identity = served_identity(operator_report(native_url))
        native, native_use = answers(native_url, arithmetic, "native")
    with engine_server(smollm2_gguf, {"USE_FLAGGEMS": "1"}) as flagos_url:
        flagos_report = operator_report(flagos_url)
        flagos, flagos_use = answers(flagos_url, arithmetic, "flagos")
        after = operator_report(flagos_url)
        assert served_identity(after) == served_identity(flagos_report)  # only the counters moved
        with pytest.raises(StackRefused, match="the native stack has our operators switched on"):
            check_switch("native", after)
    assert [m["id"] for m in listed["data"]] == [SERVED_NAME]
    assert not any(r.error for r in native + flagos)
    assert native_use.calls == 0 and not native_use.flagos and native_use.mode == "native"
    ran = {o.name: o.calls for o in flagos_use.operators if o.calls}
    assert set(ran) == {"rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding"}
    # per forward step: the first layer's norm without a residual, every other norm fused with its residual add
    steps = ran["rms_norm"]
    assert ran["fused_add_rms_norm"] == 2 * LAYERS * steps and ran["silu_and_mul"] == ran["rotary_embedding"] == LAYERS * steps
    assert flagos_use.mode == "interpreted" and flagos_use.engine == "vllm"
    assert flagos_use.versions["vllm"] == "0.32.0+cpu" and flagos_use.versions["flagscale"] == "0.8.0"
    # the counts and switches come from the worker that ran the model, not from the API server
    assert after["execution"] == "eager" and after["api_server_pid"] not in after["processes"]
    assert after["switches"]["USE_FLAGGEMS"] == "1"
    # what each endpoint serves: no image build here (a source checkout), the GGUF's sha256, the switches
    assert flagos_report["build"] is None
    assert flagos_report["checkpoint"] == hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert native_identity != served_identity(flagos_report) and "our operators off" in native_identity
    identical = sum(a.response == b.response for a, b in zip(native, flagos))
    assert identical >= ITEMS * 3 // 4, [(a.response, b.response) for a, b in zip(native, flagos)]


def test_each_switch_reaches_the_worker_and_a_broken_integration_answers_differently(smollm2_gguf: Path, arithmetic):
    environment = {"USE_FLAGGEMS": "1", "FLAGOS_OPS": "silu_and_mul", "FLAGOS_FAULT": "gate-up-swapped"}
    with engine_server(smollm2_gguf, environment) as url:
        broken, use = answers(url, arithmetic, "flagos")
        report = operator_report(url)
    assert report["switches"] == environment and report["api_server_pid"] not in report["processes"]
    assert use.fault == "gate-up-swapped"
    assert {o.name for o in use.operators if o.enabled} == {"silu_and_mul"}
    assert {o.name for o in use.operators if o.calls} == {"silu_and_mul"}  # the others ran vLLM's native path
    assert sum(r.correct for r in broken) == 0  # the model no longer does arithmetic at all


def test_an_engine_without_our_report_is_refused(smollm2_gguf: Path):
    with plain_vllm(smollm2_gguf) as url:
        assert requests.get(f"{url}/models", timeout=5).status_code == 200
        with pytest.raises(StackRefused, match="serves no operator report"):
            check_switch("flagos", operator_report(url))


@pytest.mark.parametrize("environment, message", [
    ({"USE_FLAGGEMS": "on"}, "USE_FLAGGEMS='on' is not a switch; allowed: 0, 1, true, false"),
    ({"USE_FLAGGEMS": "1", "FLAGOS_OPS": "rms_norm,gelu"}, "FLAGOS_OPS names unknown operator(s) ['gelu']"),
    ({"USE_FLAGGEMS": "1", "FLAGOS_FAULT": "slow"}, "FLAGOS_FAULT='slow' is not a known fault"),
])
def test_a_switch_the_engine_cannot_honour_stops_it_with_one_line(tmp_path: Path, environment, message):
    """Both where the image starts (the foreground step, before FlagScale) and inside vLLM (the plugin, before
    anything serves), for anyone running `vllm serve` with our plugin directly."""
    engine_bin = PROJECT_DIR / ENGINE_VENV / "bin"
    env = {"PATH": f"{engine_bin}:/usr/bin:/bin", "PYTHONPATH": str(PROJECT_DIR), **environment}
    config = tmp_path / "vllm.yaml"
    config.write_text("experiment: {exp_dir: never}\n")
    started = subprocess.run([str(engine_bin / "python"), "-m", "engine.foreground", "llama", str(config)],
                             env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 2 and message in started.stderr and "Traceback" not in started.stderr
    assert not (tmp_path / "never").exists()
    if environment.get("USE_FLAGGEMS") == "on":  # once through vLLM itself (~10 s)
        served = subprocess.run([str(engine_bin / "vllm"), "serve", str(tmp_path)], env={**os.environ, **env},
                                capture_output=True, text=True, timeout=300)
        assert served.returncode == 2 and message in served.stderr and "Traceback" not in served.stderr
