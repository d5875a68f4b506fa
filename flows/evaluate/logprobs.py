"""Consistency token by token: both stacks score the same text, the reference stack's reply appended to the prompt,
with vLLM's `prompt_logprobs` (one prefill per item, no generation, so no divergence cascade), and the scored
tokens' log-probabilities are compared position by position.

Per scored token: whether the two stacks' most likely next token is the same (top-1 agreement), the difference of
the log-probability each gives the token that is there (|delta logprob|), and a KL estimate over the reference's
top-k (a token missing from the other side's top-k is given that side's lowest top-k log-probability, so the
estimate is a lower bound on what it hides). A second scoring on the reference stack gives the same numbers for the
native stack against itself: the floor the FlagOS numbers are read against."""

from __future__ import annotations

import asyncio
import hashlib
import math

import httpx
import openai
from pydantic import BaseModel, ConfigDict

from flows.evaluate.benchmarks import Item
from flows.evaluate.gate import Verdict
from flows.matrix import TokenThresholds

TOP_K = 5


class Position(BaseModel):
    """One scored token: the log-probability of the token that is there, and the top-k (token id -> logprob)."""

    model_config = ConfigDict(frozen=True)

    logprob: float
    top: dict[str, float]


class ItemScores(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    text_hash: str  # what was scored: the prompt and the reply appended to it
    positions: list[Position]


class NotScored(Exception):
    """The server does not return prompt logprobs (or not in vLLM's shape); the message says what it returned."""


class TokenAgreement(BaseModel):
    model_config = ConfigDict(frozen=True)

    positions: int
    top1: float  # share of scored tokens where both stacks' most likely token is the same
    mean_abs_delta: float  # mean |logprob difference| of the scored token
    p99_abs_delta: float
    mean_kl: float  # mean per-token KL(reference || other) estimate over the reference's top-k


def text_hash(prompt: str, reply: str) -> str:
    return hashlib.sha256(f"{prompt}\x00{reply}".encode()).hexdigest()


def _position(entry: dict | None, token_id: int) -> Position:
    if not isinstance(entry, dict):
        raise NotScored(f"a prompt_logprobs entry is {type(entry).__name__}, not a mapping of token ids")
    top = {token: float(value["logprob"]) for token, value in entry.items()}
    if str(token_id) not in top:
        raise NotScored(f"a prompt_logprobs entry lacks the scored token {token_id}")
    return Position(logprob=top[str(token_id)], top=top)


async def _tokenize(http: httpx.AsyncClient, body: dict, attempts: int = 3) -> httpx.Response:
    """POST /tokenize, retried as the OpenAI client retries the scoring itself: a dropped connection (a proxy's
    full backlog, a restart) is no answer, and tokenizing is idempotent."""
    for attempt in range(attempts - 1):
        try:
            return await http.post("/tokenize", json=body)
        except httpx.TransportError:
            await asyncio.sleep(0.5 * 2 ** attempt)
    return await http.post("/tokenize", json=body)


async def _score_all(base_url: str, model: str, items: list[Item], replies: dict[str, str], concurrency: int,
                     timeout_s: float) -> list[ItemScores]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=3, timeout=timeout_s)
    http = httpx.AsyncClient(base_url=base_url.rsplit("/v1", 1)[0], timeout=timeout_s)
    gate = asyncio.Semaphore(concurrency)

    async def score(item: Item) -> ItemScores:
        reply = replies[item.id]
        async with gate:
            prefix = await _tokenize(http, {"model": model, "add_generation_prompt": True,
                                            "messages": [{"role": "user", "content": item.prompt}]})
            whole = await _tokenize(http, {"model": model, "continue_final_message": True,
                                           "add_generation_prompt": False,
                                           "messages": [{"role": "user", "content": item.prompt},
                                                        {"role": "assistant", "content": reply}]})
            for response in (prefix, whole):
                if response.status_code != 200:
                    raise NotScored(f"POST /tokenize answered {response.status_code}: {response.text[:200]}")
            tokens = whole.json()["tokens"]
            start = prefix.json()["count"]
            scored = await client.completions.create(model=model, prompt=tokens, max_tokens=1, temperature=0.0,
                                                     extra_body={"prompt_logprobs": TOP_K})
        entries = (scored.model_extra or {}).get("prompt_logprobs")
        if entries is None and scored.choices:
            entries = (scored.choices[0].model_extra or {}).get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(tokens):
            raise NotScored("the completion carries no prompt_logprobs for every prompt token (vLLM's "
                            f"`prompt_logprobs` request field); got {type(entries).__name__}")
        positions = [_position(entries[i], tokens[i]) for i in range(max(start, 1), len(tokens))]
        return ItemScores(id=item.id, text_hash=text_hash(item.prompt, reply), positions=positions)

    try:
        return list(await asyncio.gather(*(score(item) for item in items)))
    except (openai.OpenAIError, httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
        raise NotScored(f"{type(exc).__name__}: {exc}") from None
    finally:
        await client.close()
        await http.aclose()


def score_replies(base_url: str, model: str, items: list[Item], replies: dict[str, str], concurrency: int = 16,
                  timeout_s: float = 300.0) -> list[ItemScores]:
    """Each item's prompt with `replies[item.id]` appended, scored by the stack at `base_url`, token by token."""
    return asyncio.run(_score_all(base_url, model, items, replies, concurrency, timeout_s))


def _kl(reference: Position, other: Position) -> float:
    floor = min(other.top.values())
    total = sum(math.exp(lp) * (lp - other.top.get(token, floor)) for token, lp in reference.top.items())
    return max(total, 0.0)


def _top1(position: Position) -> str:
    return max(position.top.items(), key=lambda item: (item[1], item[0]))[0]


def token_agreement(reference: list[ItemScores], other: list[ItemScores]) -> TokenAgreement:
    """The two scorings of the same texts, position by position (items scored on different texts are skipped)."""
    theirs = {s.id: s for s in other}
    deltas: list[float] = []
    same_top1 = 0
    kl = 0.0
    for mine in reference:
        counterpart = theirs.get(mine.id)
        if counterpart is None or counterpart.text_hash != mine.text_hash:
            continue
        for a, b in zip(mine.positions, counterpart.positions):
            deltas.append(abs(a.logprob - b.logprob))
            same_top1 += _top1(a) == _top1(b)
            kl += _kl(a, b)
    if not deltas:
        return TokenAgreement(positions=0, top1=0.0, mean_abs_delta=0.0, p99_abs_delta=0.0, mean_kl=0.0)
    ordered = sorted(deltas)
    return TokenAgreement(positions=len(deltas), top1=same_top1 / len(deltas), mean_abs_delta=sum(deltas) / len(deltas),
                          p99_abs_delta=ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)],
                          mean_kl=kl / len(deltas))


class TokenSignal(BaseModel):
    """FlagOS against native token by token, beside native against itself; gated when the chip has thresholds."""

    model_config = ConfigDict(frozen=True)

    flagos: TokenAgreement | None = None
    baseline: TokenAgreement | None = None
    not_measured: str | None = None
    thresholds: TokenThresholds | None = None
    verdict: Verdict | None = None
    # seconds this run spent scoring (every stack) and answering (both stacks): what the signal costs beside what it
    # checks; 0 where the store had them
    scoring_s: float = 0.0
    answering_s: float = 0.0

    def crossed(self) -> list[str]:
        """The metrics (TokenAgreement field names) on which the FlagOS numbers cross the thresholds."""
        if self.flagos is None or self.thresholds is None:
            return []
        limits, seen = self.thresholds, self.flagos
        return [metric for metric, crossed in (("top1", seen.top1 < limits.min_top1),
                                               ("mean_abs_delta", seen.mean_abs_delta > limits.max_mean_abs_delta),
                                               ("mean_kl", seen.mean_kl > limits.max_mean_kl)) if crossed]

    def exceeded(self) -> list[str]:
        """The thresholds the FlagOS numbers cross, in words."""
        crossed = self.crossed()
        if not crossed:
            return []
        limits, seen = self.thresholds, self.flagos
        words = {"top1": f"top-1 agreement {seen.top1:.4f} < {limits.min_top1}",
                 "mean_abs_delta": f"mean |delta logprob| {seen.mean_abs_delta:.4g} > {limits.max_mean_abs_delta}",
                 "mean_kl": f"mean KL {seen.mean_kl:.4g} > {limits.max_mean_kl}"}
        return [words[metric] for metric in crossed]


METRIC_NAMES = {"top1": "top-1 disagreement", "mean_abs_delta": "mean |delta logprob|", "mean_kl": "mean KL"}


def departure(agreement: TokenAgreement, metric: str) -> float:
    """How far the scoring departs from the reference on `metric`, larger is further (top-1 as disagreement)."""
    return 1.0 - agreement.top1 if metric == "top1" else getattr(agreement, metric)


def token_signal(reference: list[ItemScores], flagos: list[ItemScores], again: list[ItemScores] | None,
                 thresholds: TokenThresholds | None) -> TokenSignal:
    signal = TokenSignal(flagos=token_agreement(reference, flagos),
                         baseline=token_agreement(reference, again) if again is not None else None,
                         thresholds=thresholds)
    if thresholds is None:
        return signal
    if signal.flagos.positions == 0:
        return signal.model_copy(update={"verdict": Verdict.INCONCLUSIVE,
                                         "not_measured": "no scored token is shared by both stacks' scorings"})
    return signal.model_copy(update={"verdict": Verdict.FAIL if signal.exceeded() else Verdict.PASS})


def token_signal_not_measured(reason: str, thresholds: TokenThresholds | None) -> TokenSignal:
    """A gate that needs the token signal and cannot have it is INCONCLUSIVE, never PASS."""
    return TokenSignal(not_measured=reason, thresholds=thresholds,
                       verdict=Verdict.INCONCLUSIVE if thresholds is not None else None)
