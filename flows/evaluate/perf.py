"""Serving performance next to accuracy: output tokens/s and time to first token at a few concurrencies.

Streaming chat requests with a fixed prompt set and `max_tokens`; output tokens are counted one per content chunk
(vLLM streams a token per chunk; `stream_options` is not sent, so any OpenAI server that streams can be measured).
Not gated by default; a suite's `perf_min_ratio` gates every concurrency on FlagOS/native throughput. A level
where nothing could be counted says why ("not measured"), never 0 tokens/s as if measured.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import openai
from pydantic import BaseModel, ConfigDict

PROMPTS = ("Write a short story about a lighthouse keeper.", "Explain how a bicycle stays upright.",
           "Describe the water cycle to a child.", "List some uses of copper and why.")


class PerfPoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    concurrency: int
    requests: int
    output_tokens_per_s: float
    ttft_median_s: float | None  # None when no request succeeded
    errors: int
    not_measured: str | None = None  # why no throughput could be measured (then output_tokens_per_s is 0)


async def _measure(base_url: str, model: str, concurrency: int, requests_per_level: int, max_tokens: int) -> PerfPoint:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=300)
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> tuple[float, int] | None:
        async with gate:
            started = time.perf_counter()
            first, tokens = None, 0
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
                    max_tokens=max_tokens, temperature=0.0, stream=True)
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter() - started
                        tokens += 1
            except openai.OpenAIError:
                return None
            return (first if first is not None else time.perf_counter() - started), tokens

    try:
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one(i) for i in range(requests_per_level)))
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
    done = [o for o in outcomes if o is not None]
    streamed = sum(tokens for _, tokens in done)
    not_measured = None
    if not done:
        not_measured = f"all {requests_per_level} streaming requests failed"
    elif streamed == 0:
        not_measured = "the endpoint streamed no content chunks (it may not stream), so no tokens could be counted"
    return PerfPoint(concurrency=concurrency, requests=requests_per_level,
                     output_tokens_per_s=sum(tokens for _, tokens in done) / elapsed,
                     ttft_median_s=statistics.median(ttft for ttft, _ in done) if done else None,
                     errors=len(outcomes) - len(done), not_measured=not_measured)


def measure_serving(base_url: str, model: str, concurrencies: tuple[int, ...] = (4,), requests_per_level: int = 4,
                    max_tokens: int = 16) -> list[PerfPoint]:
    return [asyncio.run(_measure(base_url, model, c, requests_per_level, max_tokens)) for c in concurrencies]
