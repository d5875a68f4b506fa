"""The optional serving-throughput gate: FlagOS output tokens/s against native at every measured concurrency."""

from __future__ import annotations

from flows.evaluate.gate import Verdict
from flows.evaluate.perf import PerfPoint, measure_serving
from flows.evaluate.stage import throughput_verdict


def points(*rates: float) -> list[PerfPoint]:
    return [PerfPoint(concurrency=c, requests=8, output_tokens_per_s=r, ttft_median_s=0.1, errors=0)
            for c, r in zip((1, 4), rates)]


def test_reported_only_unless_the_suite_sets_a_ratio():
    assert throughput_verdict(None, {"native": points(100, 300), "flagos": points(10, 10)}) is None


def test_every_concurrency_must_reach_the_ratio():
    assert throughput_verdict(0.8, {"native": points(100, 300), "flagos": points(85, 240)}) == Verdict.PASS
    assert throughput_verdict(0.8, {"native": points(100, 300), "flagos": points(85, 239)}) == Verdict.FAIL


def test_without_a_measured_native_stack_the_ratio_cannot_be_shown():
    assert throughput_verdict(0.8, {"flagos": points(85, 240)}) == Verdict.INCONCLUSIVE


def test_a_level_where_nothing_could_be_counted_is_not_measured_and_decides_nothing():
    silent = PerfPoint(concurrency=4, requests=8, output_tokens_per_s=0.0, ttft_median_s=0.1, errors=0,
                       not_measured="the endpoint streamed no content chunks (it may not stream)")
    assert throughput_verdict(0.8, {"native": points(100), "flagos": [silent]}) == Verdict.INCONCLUSIVE
    assert throughput_verdict(None, {"native": points(100), "flagos": [silent]}) is None


def test_an_endpoint_that_does_not_stream_is_reported_not_measured():
    """A stand-in for an OpenAI server that ignores `stream: true` and answers one JSON body (as some gateways
    do): the client sees no chunks, so there is nothing to count; that must not read as 0 tokens/s measured."""
    import http.server

    from tests.loopback import send_json, start

    class NonStreaming(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            send_json(self, 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello there"}}]})

    server = start(NonStreaming)
    try:
        [point] = measure_serving(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", (2,), requests_per_level=2)
    finally:
        server.shutdown()
    assert point.errors == 0 and point.output_tokens_per_s == 0
    assert point.not_measured == ("the endpoint streamed no content chunks (it may not stream), so no tokens could "
                                  "be counted")
