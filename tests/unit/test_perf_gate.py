"""The serving-throughput gate (FlagOS output tokens/s against native at every measured concurrency) and how one
level of vLLM's serving benchmark becomes a measured point, or a point that says why it is not one."""

from __future__ import annotations

from pathlib import Path

from flows.evaluate.gate import Verdict
from flows.evaluate.perf import PerfPoint, measure_serving, perf_markdown, point_from_result
from flows.evaluate.stage import throughput_verdict


def points(*rates: float) -> list[PerfPoint]:
    return [PerfPoint(concurrency=c, requests=8, input_tokens=32, output_tokens=16, output_tokens_per_s=r,
                      total_tokens_per_s=3 * r, ttft_median_s=0.1, tpot_median_s=0.02, errors=0)
            for c, r in zip((1, 4), rates)]


def bench_result(completed: int = 8, failed: int = 0, output_tokens: int = 16, errors: list[str] | None = None) -> dict:
    """The fields of `vllm bench serve --save-result` that the stage reads (vLLM 0.32's names and units)."""
    return {"completed": completed, "failed": failed, "total_input_tokens": 32 * completed,
            "total_output_tokens": output_tokens * completed, "output_throughput": 40.0, "total_token_throughput": 120.0,
            "median_ttft_ms": 250.0, "median_tpot_ms": 30.0, "errors": errors or [""] * (completed + failed)}


def test_reported_only_unless_the_suite_sets_a_ratio():
    assert throughput_verdict(None, {"native": points(100, 300), "flagos": points(10, 10)}) is None


def test_every_concurrency_must_reach_the_ratio():
    assert throughput_verdict(0.8, {"native": points(100, 300), "flagos": points(85, 240)}) == Verdict.PASS
    assert throughput_verdict(0.8, {"native": points(100, 300), "flagos": points(85, 239)}) == Verdict.FAIL


def test_without_a_measured_native_stack_the_ratio_cannot_be_shown():
    assert throughput_verdict(0.8, {"flagos": points(85, 240)}) == Verdict.INCONCLUSIVE


def test_a_level_where_nothing_could_be_counted_is_not_measured_and_decides_nothing():
    [silent] = measure_serving(None, "http://127.0.0.1:1/v1", (4,))
    assert silent.not_measured == "no vLLM benchmark client here" and silent.output_tokens_per_s == 0
    assert throughput_verdict(0.8, {"native": points(100), "flagos": [silent]}) == Verdict.INCONCLUSIVE
    assert throughput_verdict(None, {"native": points(100), "flagos": [silent]}) is None


def test_a_benchmark_result_becomes_a_point_in_seconds():
    point = point_from_result(bench_result(), concurrency=4, requests=8, input_tokens=32, output_tokens=16)
    assert (point.output_tokens_per_s, point.total_tokens_per_s, point.errors) == (40.0, 120.0, 0)
    assert (point.ttft_median_s, point.tpot_median_s, point.not_measured) == (0.25, 0.03, None)


def test_unequal_work_or_no_completed_request_is_not_a_measurement():
    short = point_from_result(bench_result(output_tokens=5), concurrency=4, requests=8, input_tokens=32,
                              output_tokens=16)
    assert short.not_measured.startswith("8 requests produced 40 output tokens, not 16 each")
    failed = point_from_result(bench_result(completed=0, failed=8, errors=["Traceback...\nConnection refused"] * 8),
                               concurrency=4, requests=8, input_tokens=32, output_tokens=16)
    assert failed.not_measured == "all 8 benchmark requests failed: Connection refused" and failed.errors == 8


def test_a_client_that_fails_says_how(tmp_path: Path):
    """The runner's exit code and last output line are the reason; nothing is read from a result it did not write."""
    def failing(arguments: list[str], results: Path) -> tuple[int, str]:
        assert arguments[:2] == ["bench", "serve"] and "--ignore-eos" in arguments
        assert arguments[arguments.index("--base-url") + 1] == "http://127.0.0.1:9/x"  # the /v1 suffix removed
        return 1, "Traceback (most recent call last):\nOSError: Can't load tokenizer for '/models'"

    [point] = measure_serving(failing, "http://127.0.0.1:9/x/v1", (2,), requests_per_level=1)
    assert point.requests == 2  # never fewer requests than the level has in flight
    assert point.not_measured == "vllm bench serve exited with 1: OSError: Can't load tokenizer for '/models'"


def test_the_table_gives_the_ratio_beside_flagos():
    table = perf_markdown({"native": points(100.0, 300.0), "flagos": points(85.0, 240.0)})
    assert "| flagos | 4 | 8 x (32 + 16) | 240.0 | 720.0 | 100 | 20 | 0 | 0.80 |" in table
    assert "| native | 1 | 8 x (32 + 16) | 100.0 | 300.0 | 100 | 20 | 0 | — |" in table
    assert perf_markdown({}) == "Not measured: no stack was served here."


def test_a_client_that_times_out_is_not_measured():
    """The Docker SDK's wait raises a requests error when the client runs past its time: a reason, not a crash."""
    import requests

    def stuck(arguments: list[str], results: Path) -> tuple[int, str]:
        raise requests.ReadTimeout("read timed out")

    [point] = measure_serving(stuck, "http://127.0.0.1:9/v1", (4,))
    assert point.not_measured == "vllm bench serve exited with -1: ReadTimeout: read timed out"
