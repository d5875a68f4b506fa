"""Name the operator that broke a release: when a benchmark FAILs, ask its discordant items (up to 32 of them) plus
a fixed sample of the rest again with subsets of our operators switched on, halving the candidates each pass.

A subset reproduces the drop when its own drop on those items (native accuracy minus the subset's) is at least half
the full FlagOS stack's drop there: with the culprit switched on the stack answers like FlagOS, without it like
native. One subset is tested per level (a single culprit is in the other half when this one does not reproduce),
then the last operator standing is confirmed on its own: ceil(log2(ops)) + 1 passes at most, each over the
diagnosis items only, and no pass starts after the time cap. When the confirmation fails the drop needs more than
one operator (or was noise), and the report says so instead of naming one.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, computed_field

SAMPLE_OF_AGREEING = 8
MAX_DISCORDANT = 32  # a drop that FAILed shows on 32 of its items; more would only lengthen every pass
SAMPLE_SEED = 1234
REPRODUCES_SHARE = 0.5


class Probe(BaseModel):
    """One pass: the operators switched on, and how they scored on the diagnosis items."""

    model_config = ConfigDict(frozen=True)

    operators: list[str]
    accuracy: float
    drop: float  # native minus this subset, on the diagnosis items
    reproduces: bool
    requests: int
    seconds: float


class Diagnosis(BaseModel):
    model_config = ConfigDict(frozen=True)

    benchmark: str
    operators: list[str]  # the operators the FlagOS stack ran, in the order bisected
    items: int  # diagnosis items: every discordant one plus a fixed sample of the rest
    native_accuracy: float  # on the diagnosis items
    flagos_accuracy: float
    probes: list[Probe]
    culprits: list[str]
    conclusion: str
    original_requests: int  # what the benchmark's evaluation asked of both stacks in this run, for the cost ratio
    original_seconds: float
    remedy: str | None = None  # the chip-profile line that keeps the culprit native

    @computed_field
    @property
    def requests(self) -> int:
        return sum(p.requests for p in self.probes)

    @computed_field
    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.probes)


def diagnosis_items(native: dict[str, float], flagos: dict[str, float], sample: int = SAMPLE_OF_AGREEING,
                    most_discordant: int = MAX_DISCORDANT) -> list[str]:
    """The items the stacks scored differently (a fixed sample of `most_discordant` when there are more), plus a
    fixed sample of the others (so a subset that breaks items FlagOS got right shows too), in item order."""
    discordant = sorted(i for i in native if native[i] != flagos[i])
    agreeing = sorted(i for i in native if native[i] == flagos[i])
    rng = random.Random(SAMPLE_SEED)
    chosen = set(rng.sample(discordant, min(most_discordant, len(discordant))))
    chosen |= set(rng.sample(agreeing, min(sample, len(agreeing))))
    return [i for i in native if i in chosen]


def max_passes(operators: int) -> int:
    return math.ceil(math.log2(operators)) + 1 if operators > 1 else 1


def bisect_culprits(benchmark: str, operators: Sequence[str], native: dict[str, float], flagos: dict[str, float],
                    ask: Callable[[list[str], list[str]], tuple[dict[str, float], int]], deadline_s: float,
                    original: tuple[int, float], log: Callable[[str], None]) -> Diagnosis:
    """Bisect `operators` (those the FlagOS stack ran) over the diagnosis items of a failed benchmark.

    `ask(subset, items)` serves the stack with exactly `subset` switched on and returns its per-item scores on
    `items` and the requests it made."""
    items = diagnosis_items(native, flagos)
    native_accuracy = sum(native[i] for i in items) / len(items)
    flagos_accuracy = sum(flagos[i] for i in items) / len(items)
    full_drop = native_accuracy - flagos_accuracy
    if full_drop <= 0:
        return _diagnosis(benchmark, operators, items, native_accuracy, flagos_accuracy, [], [],
                          "nothing to bisect: the FlagOS stack does not score lower than native on these items",
                          original)
    started = time.monotonic()
    probes: list[Probe] = []

    def probe(subset: list[str]) -> Probe | None:
        if time.monotonic() - started > deadline_s:
            return None
        began = time.monotonic()
        scores, requests = ask(subset, items)
        accuracy = sum(scores[i] for i in items) / len(items)
        drop = native_accuracy - accuracy
        result = Probe(operators=subset, accuracy=accuracy, drop=drop, reproduces=drop >= REPRODUCES_SHARE * full_drop,
                       requests=requests, seconds=time.monotonic() - began)
        log(f"{benchmark}: bisection with {', '.join(subset)} on: accuracy {accuracy:.3f} on {len(items)} items "
            f"(native {native_accuracy:.3f}, FlagOS {flagos_accuracy:.3f}) -> "
            f"{'reproduces' if result.reproduces else 'does not reproduce'} the drop")
        probes.append(result)
        return result

    candidates = list(operators)
    tested_alone = None
    while len(candidates) > 1:
        half = candidates[:len(candidates) // 2]
        result = probe(half)
        if result is None:
            return _diagnosis(benchmark, operators, items, native_accuracy, flagos_accuracy, probes, [],
                              f"stopped at the time cap ({deadline_s:.0f} s) after {len(probes)} pass(es); the "
                              f"culprit is among {', '.join(candidates)}", original)
        candidates = half if result.reproduces else candidates[len(candidates) // 2:]
        tested_alone = result if result.reproduces and len(half) == 1 else None
    confirmation = tested_alone or probe(candidates)
    if confirmation is None:
        return _diagnosis(benchmark, operators, items, native_accuracy, flagos_accuracy, probes, [],
                          f"stopped at the time cap ({deadline_s:.0f} s) before confirming {candidates[0]}", original)
    if confirmation.reproduces:
        return _diagnosis(benchmark, operators, items, native_accuracy, flagos_accuracy, probes, candidates,
                          f"{candidates[0]} alone reproduces the drop ({confirmation.accuracy:.3f} against native "
                          f"{native_accuracy:.3f} and FlagOS {flagos_accuracy:.3f} on the diagnosis items)", original)
    return _diagnosis(benchmark, operators, items, native_accuracy, flagos_accuracy, probes, [],
                      "no single operator reproduces the drop alone: it needs several of "
                      f"{', '.join(operators)} together, or the drop was noise", original)


def _diagnosis(benchmark, operators, items, native_accuracy, flagos_accuracy, probes, culprits, conclusion,
               original: tuple[int, float]) -> Diagnosis:
    return Diagnosis(benchmark=benchmark, operators=list(operators), items=len(items), native_accuracy=native_accuracy,
                     flagos_accuracy=flagos_accuracy, probes=probes, culprits=culprits, conclusion=conclusion,
                     original_requests=original[0], original_seconds=original[1])
