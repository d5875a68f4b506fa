"""Client-overhead benchmark: evaluation throughput of `ask_stack` against raw concurrent requests to the same
server, at concurrency 1, 4 and 8, in one run.

    python -m flows.evaluate.bench [--gguf PATH] [--items 48] [--threads 2]

Baseline: the same chat requests posted with a bare `httpx.AsyncClient` (no retries, no parsing, no records).
Ours: `flows.evaluate.client.ask_stack` (the openai client, retries, answer extraction, per-item records).
Goal: ours >= 95% of the baseline's items/s at every concurrency. The server is llama.cpp's OpenAI server serving
the SmolLM2 GGUF (a machine-cache copy is found when --gguf is not given); each level runs baseline and ours
alternately, twice, and keeps the faster of each.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import requests

from flows.build.cache import cache_root
from flows.evaluate.benchmarks import load_definitions, load_items
from flows.evaluate.client import SEED, ask_stack
from flows.settings import PROJECT_DIR

ALIAS = "smollm2"


async def _raw(base_url: str, prompts: list[str], max_tokens: int, concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(prompt: str) -> None:
            async with gate:
                response = await client.post(f"{base_url}/chat/completions", json={
                    "model": ALIAS, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0,
                    "top_p": 1.0, "max_tokens": max_tokens, "seed": SEED})
                response.raise_for_status()
        await asyncio.gather(*(one(p) for p in prompts))


def _server(gguf: Path, port: int, threads: int, log) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", ALIAS,
                                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads",
                                str(threads), "--seed", "1234"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).ok:
                return process
        except requests.RequestException:
            time.sleep(0.5)
    process.terminate()
    raise SystemExit("llama.cpp server did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=18091)
    args = parser.parse_args(argv)
    gguf = args.gguf or next(iter(sorted((cache_root() / "test-weights").rglob("*.Q4_1.gguf"))), None)
    if gguf is None:
        raise SystemExit("no SmolLM2 GGUF found: pass --gguf or run the evaluate tests once")
    definition = load_definitions(PROJECT_DIR / "benchmarks.yaml").benchmarks["arithmetic"]
    items = load_items("arithmetic", definition, limit=args.items)
    base_url = f"http://127.0.0.1:{args.port}/v1"
    with tempfile.TemporaryFile() as log:
        server = _server(gguf, args.port, args.threads, log)
        try:
            asyncio.run(_raw(base_url, [i.prompt for i in items[:4]], definition.max_tokens, 1))  # warm up
            print(f"{args.items} arithmetic items, llama.cpp server ({args.threads} threads), {gguf.name}")
            print(f"{'concurrency':>11} {'raw items/s':>12} {'ask_stack items/s':>18} {'ratio':>6}")
            for concurrency in (1, 4, 8):
                raw, ours = [], []
                for _ in range(2):
                    started = time.perf_counter()
                    asyncio.run(_raw(base_url, [i.prompt for i in items], definition.max_tokens, concurrency))
                    raw.append(len(items) / (time.perf_counter() - started))
                    started = time.perf_counter()
                    results = ask_stack(base_url, ALIAS, items, definition, concurrency=concurrency)
                    ours.append(len(items) / (time.perf_counter() - started))
                    assert not any(r.error for r in results), "requests failed during the benchmark"
                print(f"{concurrency:>11} {max(raw):>12.2f} {max(ours):>18.2f} {max(ours) / max(raw):>6.3f}")
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
