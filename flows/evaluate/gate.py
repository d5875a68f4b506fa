"""The paired consistency gate: per benchmark, the drop in accuracy (native minus FlagOS) over the same items,
its paired-bootstrap confidence interval, the exact McNemar test, and a three-way verdict.

PASS when the one-sided 95% upper bound of the drop is below the benchmark's margin (non-inferiority shown);
FAIL when the lower bound is above it, or when McNemar rejects equality (Holm-adjusted across the suite) and the
drop exceeds the margin; INCONCLUSIVE otherwise: add items or repeats, never pass silently.
Scores per item are in [0, 1]: 0/1 for one sample, the mean over k repeats otherwise (McNemar is then n/a).
"""

from __future__ import annotations

from enum import Enum

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy.stats import binomtest, bootstrap

from flows.errors import FlagReleaseError

ALPHA = 0.05
RESAMPLES = 10_000


class GateError(FlagReleaseError):
    pass


class Verdict(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"


class BenchmarkGate(BaseModel):
    model_config = ConfigDict(frozen=True)

    benchmark: str
    items: int
    native_accuracy: float
    flagos_accuracy: float
    drop: float  # native - flagos, as a fraction
    ci_low: float  # one-sided 95% lower bound of the drop
    ci_high: float  # one-sided 95% upper bound of the drop
    mcnemar_p: float | None
    native_only: int  # items only the native stack got right (binary scores)
    flagos_only: int
    agreement: float | None  # share of items whose extracted answers are identical
    margin: float
    verdict: Verdict


def paired_gate(benchmark: str, native: dict[str, float], flagos: dict[str, float], margin_pp: float, *,
                native_answers: dict[str, str] | None = None, flagos_answers: dict[str, str] | None = None,
                resamples: int = RESAMPLES, seed: int = 1234) -> BenchmarkGate:
    """Gate one benchmark from per-item scores of both stacks (same item ids on both sides)."""
    if set(native) != set(flagos):
        only_native, only_flagos = len(set(native) - set(flagos)), len(set(flagos) - set(native))
        raise GateError(f"{benchmark}: the stacks were not scored on the same items ({only_native} only on the native "
                        f"side, {only_flagos} only on the FlagOS side); refusing to compare")
    if not native:
        raise GateError(f"{benchmark}: no items to compare")
    ids = sorted(native)
    ref = np.array([native[i] for i in ids], dtype=float)
    cand = np.array([flagos[i] for i in ids], dtype=float)
    diff = ref - cand
    drop = float(diff.mean())
    if np.all(diff == diff[0]):  # no variation: the bootstrap distribution is a single point
        low = high = drop
    else:
        interval = bootstrap((diff,), np.mean, n_resamples=resamples, confidence_level=1 - 2 * ALPHA,
                             method="percentile", random_state=np.random.default_rng(seed), batch=250).confidence_interval
        low, high = float(interval.low), float(interval.high)
    binary = bool(np.all(np.isin(ref, (0.0, 1.0))) and np.all(np.isin(cand, (0.0, 1.0))))
    native_only = int(np.sum((ref == 1) & (cand == 0))) if binary else 0
    flagos_only = int(np.sum((ref == 0) & (cand == 1))) if binary else 0
    p_value = mcnemar_exact(native_only, flagos_only) if binary else None
    agreement = None
    if native_answers is not None and flagos_answers is not None:
        keys = sorted(native_answers)
        agreement = float(np.mean([native_answers[k] == flagos_answers.get(k) for k in keys])) if keys else None
    margin = margin_pp / 100
    verdict = Verdict.PASS if high < margin else Verdict.FAIL if low > margin else Verdict.INCONCLUSIVE
    return BenchmarkGate(benchmark=benchmark, items=len(ids), native_accuracy=float(ref.mean()),
                         flagos_accuracy=float(cand.mean()), drop=drop, ci_low=low, ci_high=high, mcnemar_p=p_value,
                         native_only=native_only, flagos_only=flagos_only, agreement=agreement, margin=margin,
                         verdict=verdict)


def mcnemar_exact(native_only: int, flagos_only: int) -> float:
    """Two-sided exact McNemar: a binomial test of the discordant pairs against 1/2."""
    discordant = native_only + flagos_only
    return 1.0 if discordant == 0 else float(binomtest(native_only, discordant, 0.5).pvalue)


def holm_fail(gates: list[BenchmarkGate]) -> list[BenchmarkGate]:
    """Turn INCONCLUSIVE into FAIL where McNemar rejects after Holm's correction across the suite and the drop
    exceeds the margin; PASS and FAIL stand (intersection-union: PASS needs no correction)."""
    tested = sorted((g for g in gates if g.mcnemar_p is not None), key=lambda g: g.mcnemar_p)
    rejected: set[str] = set()
    for rank, gate in enumerate(tested):
        if gate.mcnemar_p * (len(tested) - rank) >= ALPHA:
            break
        rejected.add(gate.benchmark)
    return [g.model_copy(update={"verdict": Verdict.FAIL})
            if g.verdict == Verdict.INCONCLUSIVE and g.benchmark in rejected and g.drop > g.margin else g
            for g in gates]


def suite_verdict(gates: list[BenchmarkGate], gated: set[str]) -> Verdict:
    """PASS only when every gated benchmark passed; FAIL when any failed; else INCONCLUSIVE."""
    verdicts = [g.verdict for g in gates if g.benchmark in gated]
    if Verdict.FAIL in verdicts:
        return Verdict.FAIL
    return Verdict.PASS if verdicts and all(v == Verdict.PASS for v in verdicts) else Verdict.INCONCLUSIVE


def gate_results(benchmark: str, native: list, flagos: list, margin_pp: float) -> BenchmarkGate:
    """Gate two stacks' recorded results (flows.evaluate.client.ItemResult): each item scores the mean of its
    repeats. Items asked with different prompts are refused, since the comparison would not be paired."""
    native_by_key = {(r.id, r.repeat): r for r in native}
    flagos_by_key = {(r.id, r.repeat): r for r in flagos}
    differing = [key for key in native_by_key.keys() & flagos_by_key.keys()
                 if native_by_key[key].prompt_hash != flagos_by_key[key].prompt_hash]
    if differing:
        raise GateError(f"{benchmark}: {len(differing)} item(s) were asked with different prompts on the two stacks "
                        f"(e.g. {differing[0][0]}); re-run both with the same suite version")
    if native_by_key.keys() != flagos_by_key.keys():
        raise GateError(f"{benchmark}: the stacks were asked different items or repeats "
                        f"({len(native_by_key.keys() - flagos_by_key.keys())} only on the native side, "
                        f"{len(flagos_by_key.keys() - native_by_key.keys())} only on the FlagOS side); refusing to compare")
    return paired_gate(benchmark, _item_means(native), _item_means(flagos), margin_pp,
                       native_answers={f"{i}#{k}": r.parsed for (i, k), r in native_by_key.items()},
                       flagos_answers={f"{i}#{k}": r.parsed for (i, k), r in flagos_by_key.items()})


def _item_means(results: list) -> dict[str, float]:
    scores: dict[str, list[float]] = {}
    for result in results:
        scores.setdefault(result.id, []).append(float(result.correct))
    return {item: sum(values) / len(values) for item, values in scores.items()}
