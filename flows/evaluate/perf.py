"""Serving performance next to accuracy, measured by vLLM's own serving benchmark (`vllm bench serve`).

The same client measures both stacks: the vLLM of the release image (or of `.venv-engine` on a host without
Docker), on the host's network, against each stack's OpenAI URL. It reads the served model from `/v1/models`
and loads the tokenizer from the path the server reports (`root`), so it sees the stack's own weights and cache
mounts. Every level asks the same prompts (the random dataset with one seed) for the same number of tokens
(`--ignore-eos`, so a stack that stops early cannot look fast). Not gated by default; a suite's `perf_min_ratio`
gates every concurrency on FlagOS/native output tokens/s. A level the benchmark could not measure says why
("not measured"), never 0 tokens/s as if measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import docker
import requests
from pydantic import BaseModel, ConfigDict

from flows.evaluate.container import run_to_completion

METHOD = "vllm bench serve"
PERF_METHOD_KEY = "vllm-bench-serve"  # names stored measurements
RESULT_FILE = "result.json"
CONTAINER_RESULTS = "/bench-results"
TIMEOUT_S = 900.0
LOG_TAIL = 8  # lines of the benchmark's output quoted when it fails
CLIENT_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_PLUGINS": ""}  # a client, not an engine: no hub, no operator plugin

BenchRunner = Callable[[list[str], Path], tuple[int, str]]
"""Runs `vllm <arguments>` writing its result file into the given host folder; returns the exit code and the
output's tail."""


class PerfPoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    concurrency: int
    requests: int
    input_tokens: int  # per request
    output_tokens: int  # per request (ignore_eos)
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft_median_s: float | None  # None when no request succeeded
    tpot_median_s: float | None
    errors: int
    not_measured: str | None = None  # why no throughput could be measured (then the rates are 0)

    @classmethod
    def unmeasured(cls, reason: str, concurrency: int, requests: int, input_tokens: int, output_tokens: int,
                   errors: int = 0) -> PerfPoint:
        return cls(concurrency=concurrency, requests=requests, input_tokens=input_tokens, output_tokens=output_tokens,
                   output_tokens_per_s=0.0, total_tokens_per_s=0.0, ttft_median_s=None, tpot_median_s=None,
                   errors=errors, not_measured=reason)


def image_bench(client: docker.DockerClient, image: str, volumes: list[str]) -> BenchRunner:
    """The benchmark client of `image`, in a throwaway container on the host network with the stacks' `volumes`
    (read-only), so the tokenizer path a served stack reports resolves here too."""
    def run(arguments: list[str], results: Path) -> tuple[int, str]:
        return run_to_completion(client, image, [*arguments, "--result-dir", CONTAINER_RESULTS],
                                 [*volumes, f"{results}:{CONTAINER_RESULTS}"], "benchmark", TIMEOUT_S, LOG_TAIL,
                                 entrypoint=["vllm"], network_mode="host", environment=CLIENT_ENV)
    return run


def local_bench(vllm: Path) -> BenchRunner:
    """The benchmark client of a local vLLM installation (chip hosts without Docker, the tests' `.venv-engine`)."""
    def run(arguments: list[str], results: Path) -> tuple[int, str]:
        done = subprocess.run([str(vllm), *arguments, "--result-dir", str(results)], capture_output=True, text=True,
                              timeout=TIMEOUT_S, env={**os.environ, **CLIENT_ENV})
        return done.returncode, "\n".join((done.stdout + done.stderr).strip().splitlines()[-LOG_TAIL:])
    return run


def bench_arguments(base_url: str, concurrency: int, requests: int, input_tokens: int, output_tokens: int) -> list[str]:
    return ["bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
            "--base-url", base_url.removesuffix("/").removesuffix("/v1"), "--dataset-name", "random",
            "--random-input-len", str(input_tokens), "--random-output-len", str(output_tokens),
            "--num-prompts", str(requests), "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", "0",
            "--temperature", "0", "--disable-tqdm", "--save-result", "--result-filename", RESULT_FILE]


def point_from_result(result: dict, concurrency: int, requests: int, input_tokens: int, output_tokens: int) -> PerfPoint:
    """One level from the benchmark's saved result (its own field names and units: ms, tokens/s)."""
    completed, failed = int(result["completed"]), int(result["failed"])
    errors = [e for e in result.get("errors", []) if e]
    shape = dict(concurrency=concurrency, requests=requests, input_tokens=input_tokens, output_tokens=output_tokens,
                 errors=failed)
    if completed == 0:
        return PerfPoint.unmeasured(f"all {requests} benchmark requests failed"
                                    + (f": {errors[0].strip().splitlines()[-1][:200]}" if errors else ""), **shape)
    produced = int(result["total_output_tokens"])
    if produced != completed * output_tokens:  # equal work on both stacks, or the rates compare nothing
        return PerfPoint.unmeasured(f"{completed} requests produced {produced} output tokens, not {output_tokens} "
                                    "each: the stack did not honour max_tokens with ignore_eos, so its rate would "
                                    "not compare with the other stack's", **shape)
    return PerfPoint(**shape, output_tokens_per_s=float(result["output_throughput"]),
                     total_tokens_per_s=float(result["total_token_throughput"]),
                     ttft_median_s=float(result["median_ttft_ms"]) / 1000,
                     tpot_median_s=float(result["median_tpot_ms"]) / 1000)


def measure_serving(bench: BenchRunner | None, base_url: str, concurrencies: tuple[int, ...] = (4,),
                    requests_per_level: int = 4, input_tokens: int = 32, output_tokens: int = 16,
                    why_no_bench: str = "no vLLM benchmark client here") -> list[PerfPoint]:
    """Each concurrency measured by `bench` (at least `requests_per_level` requests, and never fewer than the
    concurrency asks for at once)."""
    points = []
    for concurrency in concurrencies:
        count = max(requests_per_level, concurrency)  # not `requests`: the module is caught below
        shape = dict(concurrency=concurrency, requests=count, input_tokens=input_tokens, output_tokens=output_tokens)
        if bench is None:
            points.append(PerfPoint.unmeasured(why_no_bench, **shape))
            continue
        with tempfile.TemporaryDirectory(prefix="flagrelease-bench-") as folder:
            arguments = bench_arguments(base_url, concurrency, count, input_tokens, output_tokens)
            try:
                code, output = bench(arguments, Path(folder))
            except (subprocess.TimeoutExpired, docker.errors.DockerException, requests.RequestException,
                    OSError) as exc:
                code, output = -1, f"{type(exc).__name__}: {exc}"
            result = Path(folder) / RESULT_FILE
            if code != 0 or not result.is_file():
                last = output.strip().splitlines()[-1][:300] if output.strip() else "no output"
                points.append(PerfPoint.unmeasured(f"{METHOD} exited with {code}: {last}", **shape))
                continue
            points.append(point_from_result(json.loads(result.read_text()), **shape))
    return points


def perf_markdown(perf: dict[str, list[PerfPoint]]) -> str:
    """The report's and the card's table: each stack's levels, with FlagOS/native output tokens/s beside FlagOS."""
    native = {p.concurrency: p for p in perf.get("native", []) if not p.not_measured}
    rows = ["| stack | concurrency | requests x (input + output tokens) | output tokens/s | total tokens/s "
            "| TTFT median (ms) | TPOT median (ms) | errors | FlagOS / native output tokens/s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for stack, points in perf.items():
        for p in points:
            shape = f"{p.requests} x ({p.input_tokens} + {p.output_tokens})"
            if p.not_measured:
                rows.append(f"| {stack} | {p.concurrency} | {shape} | not measured: {p.not_measured} | — | — | — | "
                            f"{p.errors} | — |")
                continue
            base = native.get(p.concurrency)
            ratio = f"{p.output_tokens_per_s / base.output_tokens_per_s:.2f}" if stack == "flagos" and base else "—"
            rows.append(f"| {stack} | {p.concurrency} | {shape} | {p.output_tokens_per_s:.1f} | "
                        f"{p.total_tokens_per_s:.1f} | {p.ttft_median_s * 1000:.0f} | {p.tpot_median_s * 1000:.0f} | "
                        f"{p.errors} | {ratio} |")
    return "\n".join(rows) if len(rows) > 2 else "Not measured: no stack was served here."
