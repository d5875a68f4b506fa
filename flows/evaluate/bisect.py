"""Name the operator that broke a release: when a benchmark FAILs, serve the stack again with subsets of our
operators switched on and measure how far each subset departs from native, halving the candidates each pass.

Two measures, after what failed: the accuracy gate bisects on accuracy over its discordant items (up to 32 of
them) plus a fixed sample of the rest (departure: native accuracy minus the subset's); the token-level gate
bisects on the token signal over the items it scored (departure: the crossed metric, e.g. mean |delta logprob|
against the native scoring). A subset reproduces the failure when its departure above native's own floor is at
least half the full FlagOS stack's: with the culprit switched on the stack departs like FlagOS, without it like
native. One subset is tested per level (a single culprit is in the other half when this one does not reproduce),
then the last operator standing is confirmed on its own: ceil(log2(ops)) + 1 passes at most, and no pass starts
after the time cap. When the confirmation fails the departure needs more than one operator (or was noise), and
the report says so instead of naming one.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, computed_field

SAMPLE_OF_AGREEING = 8
MAX_DISCORDANT = 32  # a drop that FAILed shows on 32 of its items; more would only lengthen every pass
SAMPLE_SEED = 1234
REPRODUCES_SHARE = 0.5
ACCURACY_DROP = "accuracy drop (native minus the stack)"


class Probe(BaseModel):
    """One pass: the operators switched on, and how far that stack departed from native on the diagnosis items."""

    model_config = ConfigDict(frozen=True)

    operators: list[str]
    departure: float
    reproduces: bool
    requests: int
    seconds: float


class Diagnosis(BaseModel):
    model_config = ConfigDict(frozen=True)

    benchmark: str
    measure: str  # what a pass measures, in words
    operators: list[str]  # the operators the FlagOS stack ran, in the order bisected
    items: int  # diagnosis items
    floor: float  # native's own departure on them (0 for accuracy; native scored twice for the token signal)
    flagos: float  # the full FlagOS stack's departure on them
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


@dataclass(frozen=True)
class Measure:
    """What the bisection compares: `departure(subset)` serves the stack with exactly `subset` switched on and
    returns how far it departs from native on the diagnosis items, and the requests it took."""

    name: str
    items: int
    floor: float
    flagos: float
    departure: Callable[[list[str]], tuple[float, int]]


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


def accuracy_measure(native: dict[str, float], flagos: dict[str, float],
                     ask: Callable[[list[str], list[str]], tuple[dict[str, float], int]]) -> Measure:
    """The accuracy gate's measure; `ask(subset, items)` returns the subset stack's per-item scores on `items`."""
    items = diagnosis_items(native, flagos)
    native_accuracy = sum(native[i] for i in items) / len(items)

    def departure(subset: list[str]) -> tuple[float, int]:
        scores, requests = ask(subset, items)
        return native_accuracy - sum(scores[i] for i in items) / len(items), requests

    return Measure(name=ACCURACY_DROP, items=len(items), floor=0.0,
                   flagos=native_accuracy - sum(flagos[i] for i in items) / len(items), departure=departure)


def max_passes(operators: int) -> int:
    return math.ceil(math.log2(operators)) + 1 if operators > 1 else 1


def bisect_culprits(benchmark: str, operators: Sequence[str], measure: Measure, deadline_s: float,
                    original: tuple[int, float], log: Callable[[str], None]) -> Diagnosis:
    """Bisect `operators` (those the FlagOS stack ran) on `measure`."""
    full = measure.flagos - measure.floor

    def diagnosis(probes: list[Probe], culprits: list[str], conclusion: str) -> Diagnosis:
        return Diagnosis(benchmark=benchmark, measure=measure.name, operators=list(operators), items=measure.items,
                         floor=measure.floor, flagos=measure.flagos, probes=probes, culprits=culprits,
                         conclusion=conclusion, original_requests=original[0], original_seconds=original[1])

    if full <= 0:
        return diagnosis([], [], f"nothing to bisect: the FlagOS stack departs no further from native than native "
                                 f"itself ({measure.name})")
    started = time.monotonic()
    probes: list[Probe] = []

    def probe(subset: list[str]) -> Probe | None:
        if time.monotonic() - started > deadline_s:
            return None
        began = time.monotonic()
        departure, requests = measure.departure(subset)
        result = Probe(operators=subset, departure=departure,
                       reproduces=departure - measure.floor >= REPRODUCES_SHARE * full, requests=requests,
                       seconds=time.monotonic() - began)
        log(f"{benchmark}: bisection with {', '.join(subset)} on: {measure.name} {departure:.4g} on {measure.items} "
            f"items (FlagOS {measure.flagos:.4g}, native floor {measure.floor:.4g}) -> "
            f"{'reproduces' if result.reproduces else 'does not reproduce'} the failure")
        probes.append(result)
        return result

    candidates = list(operators)
    tested_alone = None
    while len(candidates) > 1:
        half = candidates[:len(candidates) // 2]
        result = probe(half)
        if result is None:
            return diagnosis(probes, [], f"stopped at the time cap ({deadline_s:.0f} s) after {len(probes)} pass(es); "
                                         f"the culprit is among {', '.join(candidates)}")
        candidates = half if result.reproduces else candidates[len(candidates) // 2:]
        tested_alone = result if result.reproduces and len(half) == 1 else None
    confirmation = tested_alone or probe(candidates)
    if confirmation is None:
        return diagnosis(probes, [], f"stopped at the time cap ({deadline_s:.0f} s) before confirming {candidates[0]}")
    if confirmation.reproduces:
        return diagnosis(probes, candidates, f"{candidates[0]} alone reproduces the failure ({measure.name} "
                                             f"{confirmation.departure:.4g} against FlagOS {measure.flagos:.4g} and "
                                             f"native {measure.floor:.4g} on the diagnosis items)")
    return diagnosis(probes, [], "no single operator reproduces the failure alone: it needs several of "
                                 f"{', '.join(operators)} together, or it was noise")
