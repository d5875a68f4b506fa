"""vLLM's own serving benchmark client (`vllm bench serve` of `.venv-engine`) against endpoints that cannot be
measured fairly: what it reports must be "not measured" with the reason, never a rate."""

from __future__ import annotations

import http.server
from pathlib import Path

from flows.build.wheels import ENGINE_VENV
from flows.evaluate.perf import local_bench, measure_serving
from tests.conftest import PROJECT_DIR
from tests.engine.conftest import ENGINE_CACHE, converted
from tests.loopback import send_json, start


def test_an_endpoint_that_ignores_streaming_and_max_tokens_is_not_measured(smollm2_gguf: Path):
    """A stand-in for an OpenAI server that ignores `stream: true` and answers one short JSON body (as some gateways
    do). It lists its model with the `root` vLLM reports, a real tokenizer, so the client gets as far as asking."""
    tokenizer = converted(smollm2_gguf, ENGINE_CACHE / "serving" / "perf-stand-in")
    asked: list[str] = []

    class NonStreaming(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            send_json(self, 200, {"object": "list", "data": [{"id": "m", "object": "model", "root": str(tokenizer)}]})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            if self.path == "/tokenize":  # the random dataset checks its prompts' lengths with the server
                send_json(self, 404, {"error": "not found"})
                return
            asked.append(body)
            send_json(self, 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello there"}}]})

    server = start(NonStreaming)
    try:
        [point] = measure_serving(local_bench(PROJECT_DIR / ENGINE_VENV / "bin" / "vllm"),
                                  f"http://127.0.0.1:{server.server_address[1]}/v1", (2,), requests_per_level=2)
    finally:
        server.shutdown()
    assert len(asked) == 2 and all('"ignore_eos": true' in body for body in asked)
    assert point.output_tokens_per_s == 0 and point.not_measured is not None
    assert point.not_measured.startswith(("all 2 benchmark requests failed", "2 requests produced")), point.not_measured
