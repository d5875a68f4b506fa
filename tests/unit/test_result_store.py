"""Stored per-item results: reused only under the same key and stack, complete or not at all, and a reference from
another release refused with the differing key fields named."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.evaluate.client import ItemResult
from flows.evaluate.operators import OperatorCount, OperatorUse
from flows.evaluate.perf import PerfPoint
from flows.evaluate.store import ReferenceUnavailable, ResultKey, ResultStore, Stack

KEY = ResultKey(model="qwen3-30b-a3b", revision="abc123", suite="flagrelease-five", suite_version=1,
                benchmarks_version=1, benchmark="gpqa", generation={"max_tokens": 16, "temperature": 0.6, "top_p": 0.95},
                prompts="f" * 64)
NATIVE = Stack(role="native", release="qwen3-nvidia", served_by="registry/x@sha256:1 {\"USE_FLAGGEMS\": \"0\"}")
FLAGOS = Stack(role="flagos", release="qwen3-nvidia", served_by="registry/x@sha256:1 {\"USE_FLAGGEMS\": \"1\"}")

USE = OperatorUse(engine="vllm", versions={"torch": "2.13.0"}, device="cpu", mode="native", flagos=False,
                  fault=None, operators=[OperatorCount(name="rms_norm", sha256="0" * 64, enabled=False, bound_to=[],
                                                       not_used=None, calls=0)])


def results(n: int, repeats: int = 1) -> list[ItemResult]:
    return [ItemResult(id=f"gpqa-{i}", repeat=r, prompt_hash=f"{i:016x}", response="A", parsed="A", correct=i % 2 == 0,
                       latency_s=0.1, completion_tokens=1, finish_reason="stop") for r in range(repeats) for i in range(n)]


def test_results_come_back_only_for_their_key_and_stack(tmp_path: Path):
    store = ResultStore(tmp_path)
    store.save(KEY, NATIVE, results(5, repeats=2), USE)
    assert store.load(KEY, NATIVE) == (results(5, repeats=2), USE)
    assert store.load(KEY, FLAGOS) is None
    assert store.load(KEY.model_copy(update={"revision": "def456"}), NATIVE) is None


def test_results_whose_file_is_cut_short_are_not_reused(tmp_path: Path):
    store = ResultStore(tmp_path)
    path = store.save(KEY, NATIVE, results(5))
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))
    assert store.load(KEY, NATIVE) is None


def test_another_releases_native_results_serve_as_the_reference(tmp_path: Path):
    store = ResultStore(tmp_path)
    store.save(KEY, FLAGOS, results(4))  # the FlagOS side of that release is never a reference
    with pytest.raises(ReferenceUnavailable, match="no stored native results of qwen3-30b-a3b from release 'qwen3-nvidia'"):
        store.reference(KEY, "qwen3-nvidia")
    store.save(KEY, NATIVE, results(4), USE)
    stack, stored, use = store.reference(KEY, "qwen3-nvidia")
    assert stack == NATIVE and stored == results(4) and use == USE


def test_a_reference_under_another_key_is_refused_showing_both_keys(tmp_path: Path):
    store = ResultStore(tmp_path)
    store.save(KEY, NATIVE, results(4))
    needed = KEY.model_copy(update={"suite_version": 2, "generation": {**KEY.generation, "max_tokens": 32}})
    with pytest.raises(ReferenceUnavailable) as refused:
        store.reference(needed, "qwen3-nvidia")
    message = str(refused.value)
    assert "suite_version: stored 1, needed 2" in message
    assert "generation: stored {'max_tokens': 16, 'temperature': 0.6, 'top_p': 0.95}, needed {'max_tokens': 32" in message
    assert "revision" not in message  # only the fields that differ


def test_perf_points_are_kept_per_stack(tmp_path: Path):
    store = ResultStore(tmp_path)
    points = [PerfPoint(concurrency=1, requests=8, input_tokens=32, output_tokens=16, output_tokens_per_s=50.0,
                        total_tokens_per_s=150.0, ttft_median_s=0.2, tpot_median_s=0.02, errors=0)]
    store.save_perf(NATIVE, points)
    assert store.load_perf(NATIVE) == points and store.load_perf(FLAGOS) is None
