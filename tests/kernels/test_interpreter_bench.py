"""The interpreter benchmark's arithmetic: the calls it charges per step and the ceiling it derives from a native
TPOT (a generated engine_bench result), on one real, interpreted measurement of every operator."""

from __future__ import annotations

import json
from pathlib import Path

from kernels import interpreter_bench


def test_calls_per_step_follow_vllms_llama_layers():
    assert interpreter_bench.calls_per_step(30) == {"rms_norm": 1, "fused_add_rms_norm": 60, "silu_and_mul": 30,
                                                    "rotary_embedding": 30}


def test_the_ceiling_replaces_the_operators_torch_time_in_the_native_step(tmp_path: Path):
    engine_bench = tmp_path / "engine_bench.json"
    engine_bench.write_text(json.dumps({"native": {"vllm_bench_serve": [
        {"concurrency": 1, "tpot_median_s": 0.020, "not_measured": None},
        {"concurrency": 4, "tpot_median_s": 9.9, "not_measured": "client failed"}]}}))
    out = tmp_path / "result.json"
    assert interpreter_bench.main(["--tokens", "1", "--repeats", "1", "--engine-bench", str(engine_bench),
                                   "--json", str(out)]) == 0
    [step] = json.loads(out.read_text())["steps"]
    assert {op["op"] for op in step["ops"]} == set(interpreter_bench.calls_per_step(30))
    assert all(op["interpreted_ms"] > 0 and op["torch_ms"] > 0 for op in step["ops"])
    assert step["interpreted_step_ms"] == sum(op["interpreted_ms"] * op["calls_per_step"] for op in step["ops"])
    assert step["native_tpot_ms"] == 20.0
    assert step["flagos_over_native_ceiling"] == 20.0 / (20.0 - step["torch_step_ms"] + step["interpreted_step_ms"])
