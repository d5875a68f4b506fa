"""Ask a served stack every item of a benchmark over the OpenAI API and record each answer.

The `openai` async client with bounded concurrency; its own retries (with backoff) cover 5xx and timeouts; a
request that still fails, or an answer that cannot be read, is scored wrong and recorded, never raised. Generation
is fixed per benchmark; repeat k of an item is asked with seed SEED + k, so both stacks get identical requests.
A `progress` callable hears how far the asking is, at most every PROGRESS_EVERY_S and once at the end.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import openai
from pydantic import BaseModel, ConfigDict

from flows.evaluate.benchmarks import BenchmarkDefinition, Item, extract
from flows.files import write_atomic

SEED = 1234
PROGRESS_EVERY_S = 5.0

Progress = Callable[[int, int, float], None]  # (requests answered, requests in all, answers per second)


class ItemResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    repeat: int = 0
    prompt_hash: str
    response: str
    parsed: str
    correct: bool
    latency_s: float
    completion_tokens: int
    finish_reason: str
    error: str | None = None


async def _ask_all(base_url: str, model: str, items: list[Item], definition: BenchmarkDefinition,
                   repeats: Sequence[int], concurrency: int, retries: int, timeout_s: float,
                   progress: Progress | None) -> list[ItemResult]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=retries, timeout=timeout_s)
    gate = asyncio.Semaphore(concurrency)
    answered = _progress_every(progress, len(items) * len(repeats)) if progress else lambda: None

    async def ask(item: Item, repeat: int) -> ItemResult:
        async with gate:
            started = time.perf_counter()
            try:
                reply = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": item.prompt}], seed=SEED + repeat,
                    temperature=definition.temperature, top_p=definition.top_p, max_tokens=definition.max_tokens,
                    extra_body={"chat_template_kwargs": kwargs} if (kwargs := definition.chat_template_kwargs) else None)
            except openai.OpenAIError as exc:
                return ItemResult(id=item.id, repeat=repeat, prompt_hash=item.prompt_hash, response="", parsed="",
                                  correct=False, latency_s=time.perf_counter() - started, completion_tokens=0,
                                  finish_reason="error", error=f"{type(exc).__name__}: {str(exc)[:200]}")
            choice = reply.choices[0]
            text = choice.message.content or ""
            parsed = extract(definition.answer, text)
            return ItemResult(id=item.id, repeat=repeat, prompt_hash=item.prompt_hash, response=text, parsed=parsed,
                              correct=parsed != "" and parsed == item.gold, latency_s=time.perf_counter() - started,
                              completion_tokens=reply.usage.completion_tokens if reply.usage else 0,
                              finish_reason=choice.finish_reason or "")

    async def counted(item: Item, repeat: int) -> ItemResult:
        result = await ask(item, repeat)
        answered()
        return result

    try:
        return list(await asyncio.gather(*(counted(item, repeat) for repeat in repeats for item in items)))
    finally:
        await client.close()


def _progress_every(progress: Progress, total: int) -> Callable[[], None]:
    """Count answers; tell `progress` at most every PROGRESS_EVERY_S, and at the last one (a log line per answer
    would bury the run's log)."""
    started = last = time.monotonic()
    done = 0

    def answered() -> None:
        nonlocal done, last
        done += 1
        now = time.monotonic()
        if done == total or now - last >= PROGRESS_EVERY_S:
            last = now
            progress(done, total, done / max(now - started, 1e-9))

    return answered


def ask_stack(base_url: str, model: str, items: list[Item], definition: BenchmarkDefinition,
              repeats: Sequence[int] = (0,), concurrency: int = 4, retries: int = 3,
              timeout_s: float = 300.0, progress: Progress | None = None) -> list[ItemResult]:
    """One result per item and repeat, repeat by repeat in item order."""
    return asyncio.run(_ask_all(base_url, model, items, definition, repeats, concurrency, retries, timeout_s,
                                progress))


def write_results(results: list[ItemResult], path: Path) -> Path:
    return write_atomic(path, "".join(json.dumps(r.model_dump()) + "\n" for r in results))


def read_results(path: Path) -> list[ItemResult]:
    return [ItemResult.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]
