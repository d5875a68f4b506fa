"""The engine as users and the evaluate stage meet it: one process per stack over the OpenAI API, the operator
report proving which of our kernels ran (and that the native stack ran none), and settings it cannot honour
refused at start-up with one line."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from flows.evaluate.benchmarks import load_definitions, load_items
from flows.evaluate.client import ask_stack
from flows.evaluate.operators import StackRefused, check_switch, operator_report, served_identity, usage
from tests.conftest import PROJECT_DIR
from tests.engine.conftest import SERVED_NAME, engine_server

ITEMS = 16


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
        assert served_identity(operator_report(flagos_url)) == served_identity(flagos_report)  # counters moved only
        with pytest.raises(StackRefused, match="the native stack has our operators switched on"):
            check_switch("native", operator_report(flagos_url))
    assert [m["id"] for m in listed["data"]] == [SERVED_NAME]
    assert not any(r.error for r in native + flagos)
    assert native_use.calls == 0 and not native_use.flagos and native_use.mode == "native"
    ran = {o.name: o.calls for o in flagos_use.operators if o.calls}
    assert set(ran) == {"rms_norm", "silu_and_mul", "rotary_embedding"} and flagos_use.mode == "interpreted"
    assert ran["rms_norm"] == 2 * ran["silu_and_mul"] + ran["silu_and_mul"] // 30  # 2 per layer + the final norm
    assert flagos_use.versions["transformers"] == "5.22.2" and flagos_use.engine == "transformers-serve"
    # what each endpoint serves: no image build here (a source checkout), the GGUF's sha256, the switches
    assert flagos_report["build"] is None and flagos_report["checkpoint"] == hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert native_identity != served_identity(flagos_report) and "our operators off" in native_identity
    identical = sum(a.response == b.response for a, b in zip(native, flagos))
    assert identical >= ITEMS * 3 // 4, [(a.response, b.response) for a, b in zip(native, flagos)]


def test_a_broken_integration_answers_differently(smollm2_gguf: Path, arithmetic):
    with engine_server(smollm2_gguf, {"USE_FLAGGEMS": "1", "FLAGOS_FAULT": "gate-up-swapped"}) as url:
        broken, use = answers(url, arithmetic, "flagos")
    assert use.fault == "gate-up-swapped"
    assert sum(r.correct for r in broken) == 0  # the model no longer does arithmetic at all


@pytest.mark.parametrize("environment, model_dir, message", [
    ({"USE_FLAGGEMS": "on"}, None, "USE_FLAGGEMS='on' is not a switch; allowed: 0, 1, true, false"),
    ({"USE_FLAGGEMS": "1"}, "empty", "must hold a transformers checkpoint (config.json) or exactly one .gguf file"),
])
def test_a_setting_the_engine_cannot_honour_stops_it_with_one_line(tmp_path: Path, smollm2_gguf: Path,
                                                                   environment, model_dir, message):
    folder = tmp_path if model_dir == "empty" else smollm2_gguf.parent
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"port": 8000, "served_name": SERVED_NAME, "model_dir": str(folder)}))
    result = subprocess.run([sys.executable, "-m", "engine", "--config", str(config)], cwd=PROJECT_DIR,
                            env={"PATH": "/usr/bin:/bin", **environment}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
