"""The paired consistency gate: per benchmark, the drop in accuracy (native minus FlagOS) over the same items, a
two-sided interval of it, and a four-way verdict. One sign convention everywhere: a positive drop means FlagOS
scored lower.

- PASS: equivalence shown. The 90% two-sided interval of the drop lies inside (-margin, +margin): two one-sided
  tests at 5% (TOST), each benchmark on its own (intersection-union, so no multiplicity correction is needed).
- FAIL: FlagOS is worse beyond the margin. The one-sided test of "drop <= margin" rejects after Holm's correction
  across the suite; the test is against the margin, not against 0, so a significant but small drop is no FAIL.
- DIFFERS: FlagOS is better beyond the margin (the mirror test, Holm-corrected). Not consistent either: a kernel
  bug rarely helps a model, a broken reference often does.
- INCONCLUSIVE: none of these, or the comparison measures nothing: the reference does not beat chance by the
  margin, or its replies could not be read on too many items. FlagOS replies unreadable on too many items never
  PASS either, but they FAIL when the drop is significant (a broken stack often writes garbage).

The interval is the Wald interval of a paired mean with Agresti and Min's pseudo-counts (half a sample discordant
each way, one concordant) and Student's t with n - 1 degrees of freedom: exact agreement on n single-sample items
gives a half-width of t / (n + 2), never a zero-width interval, so identical answers PASS only with enough items.
Per-item scores are in [0, 1] (the mean of an item's repeats); items are the units, so repeats of an item never
count as independent evidence. The detectable drop is the true drop this run would tell apart from none with 80%
power at one-sided 5%: (t(0.95) + t(0.80)) x SE.

A sampled benchmark may be looked at several times (more repeats while INCONCLUSIVE, see `repeat_schedule`);
each look spends ALPHA / looks (Bonferroni), so stopping at the first decisive look does not inflate the error
rates (measured without it: 10.5% PASS for GPQA at a true drop of exactly the margin).
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy.stats import binomtest, t as student_t

from flows.errors import FlagReleaseError

ALPHA = 0.05
POWER = 0.80
MAX_UNREADABLE = 0.2


class GateError(FlagReleaseError):
    pass


class Verdict(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    DIFFERS = "DIFFERS"
    INCONCLUSIVE = "INCONCLUSIVE"


class BenchmarkGate(BaseModel):
    model_config = ConfigDict(frozen=True)

    benchmark: str
    items: int
    repeats: int
    native_accuracy: float
    flagos_accuracy: float
    drop: float  # native - flagos, as a fraction
    ci_low: float  # 90% two-sided interval of the drop (each end a one-sided 95% bound)
    ci_high: float
    p_worse: float  # one-sided p of "drop <= margin", before Holm
    p_better: float  # one-sided p of "drop >= -margin", before Holm
    mcnemar_p: float | None  # exact McNemar of any difference at all (binary scores only); shown, not gated on
    native_only: int  # items only the native stack got right (binary scores)
    flagos_only: int
    agreement: float | None  # share of answers whose extracted values are identical
    native_unreadable: float  # share of answers the extractor could not read
    flagos_unreadable: float
    max_unreadable: float = MAX_UNREADABLE
    chance: float
    margin: float
    looks: int = 1  # how many times the schedule may look at this benchmark; each look at ALPHA / looks
    detectable_drop: float
    items_needed: int | None  # items at which the detectable drop would reach the margin (when it exceeds it)
    verdict: Verdict
    reason: str | None = None  # why INCONCLUSIVE, in words

    @property
    def vacuous(self) -> bool:
        """A comparison that measures nothing: no test of it may decide."""
        return self.reason is not None and self.reason.startswith("measures nothing")


def paired_gate(benchmark: str, native: dict[str, float], flagos: dict[str, float], margin_pp: float, *,
                repeats: int = 1, looks: int = 1, chance: float = 0.0, unreadable: tuple[float, float] = (0.0, 0.0),
                max_unreadable: float = MAX_UNREADABLE, native_answers: dict[str, str] | None = None,
                flagos_answers: dict[str, str] | None = None) -> BenchmarkGate:
    """Gate one benchmark from per-item scores of both stacks (same item ids on both sides), as a suite of one;
    `holm` re-decides FAIL and DIFFERS across a suite. The p-values are Bonferroni-adjusted for `looks`."""
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
    n = len(diff)
    # Agresti-Min: pseudo-samples of weight 1/2 at +1 and at -1 and 1 at 0, an item being `repeats` samples
    pseudo = 2 / repeats
    centre = float(diff.sum()) / (n + pseudo)
    variance = (float((diff ** 2).sum()) + pseudo / 2) / (n + pseudo) - centre ** 2
    se = math.sqrt(max(variance, 0.0) / (n + pseudo))
    quantile = student_t(df=max(n - 1, 1))
    t_alpha = float(quantile.ppf(1 - ALPHA / looks))
    margin = margin_pp / 100
    binary = bool(np.all(np.isin(ref, (0.0, 1.0))) and np.all(np.isin(cand, (0.0, 1.0))))
    native_only = int(np.sum((ref == 1) & (cand == 0))) if binary else 0
    flagos_only = int(np.sum((ref == 0) & (cand == 1))) if binary else 0
    agreement = None
    if native_answers is not None and flagos_answers is not None and native_answers:
        agreement = float(np.mean([native_answers[k] == flagos_answers.get(k) for k in sorted(native_answers)]))
    detectable = (t_alpha + float(quantile.ppf(POWER))) * se
    gate = BenchmarkGate(
        benchmark=benchmark, items=n, repeats=repeats, native_accuracy=float(ref.mean()),
        flagos_accuracy=float(cand.mean()), drop=float(diff.mean()), ci_low=centre - t_alpha * se,
        ci_high=centre + t_alpha * se, p_worse=min(1.0, looks * float(quantile.sf((centre - margin) / se))),
        p_better=min(1.0, looks * float(quantile.cdf((centre + margin) / se))),
        mcnemar_p=mcnemar_exact(native_only, flagos_only) if binary else None, native_only=native_only,
        flagos_only=flagos_only, agreement=agreement, native_unreadable=unreadable[0], flagos_unreadable=unreadable[1],
        max_unreadable=max_unreadable, chance=chance, margin=margin, looks=looks, detectable_drop=detectable,
        items_needed=math.ceil((n + pseudo) * (detectable / margin) ** 2) if detectable > margin else None,
        verdict=Verdict.INCONCLUSIVE, reason=_vacuous(float(ref.mean()), chance, margin, unreadable[0], max_unreadable))
    return _decide(gate, gate.p_worse, gate.p_better)


def _vacuous(native_accuracy: float, chance: float, margin: float, native_unreadable: float,
             max_unreadable: float) -> str | None:
    if native_unreadable > max_unreadable:
        return (f"measures nothing: {native_unreadable:.0%} of the native stack's answers could not be read (at most "
                f"{max_unreadable:.0%} allowed); check max_tokens and the model's reply format")
    if native_accuracy <= chance + margin:
        return (f"measures nothing for this model: the native stack scores {native_accuracy:.3f}, not above chance "
                f"({chance:.3f}) by the margin ({margin * 100:.1f} pp)")
    return None


def _decide(gate: BenchmarkGate, p_worse: float, p_better: float) -> BenchmarkGate:
    """The verdict from the interval and the (Holm-adjusted) one-sided p-values."""
    if gate.vacuous:
        return gate.model_copy(update={"verdict": Verdict.INCONCLUSIVE})
    if gate.flagos_unreadable > gate.max_unreadable:
        if p_worse < ALPHA:
            return gate.model_copy(update={"verdict": Verdict.FAIL, "reason": None})
        return gate.model_copy(update={"verdict": Verdict.INCONCLUSIVE, "reason": (
            f"{gate.flagos_unreadable:.0%} of the FlagOS stack's answers could not be read (at most "
            f"{gate.max_unreadable:.0%} allowed), so it is not shown consistent")})
    reason = None
    if -gate.margin < gate.ci_low and gate.ci_high < gate.margin:
        verdict = Verdict.PASS
    elif p_worse < ALPHA:
        verdict = Verdict.FAIL
    elif p_better < ALPHA:
        verdict = Verdict.DIFFERS
    else:
        verdict = Verdict.INCONCLUSIVE
        if gate.items_needed is not None:
            reason = (f"too few items to decide at this margin: the run could detect a drop of "
                      f"{gate.detectable_drop * 100:.1f} pp, the margin is {gate.margin * 100:.1f} pp; about "
                      f"{gate.items_needed:,} items would")
        else:
            reason = (f"the interval [{gate.ci_low * 100:+.2f}, {gate.ci_high * 100:+.2f}] pp straddles the margin "
                      f"({gate.margin * 100:.1f} pp)")
    return gate.model_copy(update={"verdict": verdict, "reason": reason})


def repeat_schedule(repeats: int, cap: int | None, sampled: bool) -> list[int]:
    """The repeat counts a benchmark is gated at, in order, while it stays INCONCLUSIVE: doubling up to the cap
    for a sampled benchmark; one look for a greedy one (its repeats would answer alike)."""
    schedule = [repeats]
    while sampled and cap is not None and schedule[-1] < cap:
        schedule.append(min(cap, schedule[-1] * 2))
    return schedule


def mcnemar_exact(native_only: int, flagos_only: int) -> float:
    """Two-sided exact McNemar: a binomial test of the discordant pairs against 1/2."""
    discordant = native_only + flagos_only
    return 1.0 if discordant == 0 else float(binomtest(native_only, discordant, 0.5).pvalue)


def holm_adjusted(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def holm(gates: list[BenchmarkGate]) -> list[BenchmarkGate]:
    """Re-decide every gate with FAIL and DIFFERS tested across the suite (Holm, one family each), so a suite of
    many benchmarks does not FAIL more often than a single one; comparisons that measure nothing are not tested."""
    tested = [g for g in gates if not g.vacuous]
    worse = dict(zip((g.benchmark for g in tested), holm_adjusted([g.p_worse for g in tested])))
    better = dict(zip((g.benchmark for g in tested), holm_adjusted([g.p_better for g in tested])))
    return [g if g.vacuous else _decide(g, worse[g.benchmark], better[g.benchmark]) for g in gates]


def suite_verdict(verdicts: list[Verdict]) -> Verdict:
    """Over the gated benchmarks' verdicts: FAIL when any failed; else DIFFERS when any differs; PASS only when
    every one passed; else INCONCLUSIVE (nothing gated proves nothing)."""
    for decisive in (Verdict.FAIL, Verdict.DIFFERS):
        if decisive in verdicts:
            return decisive
    return Verdict.PASS if verdicts and all(v == Verdict.PASS for v in verdicts) else Verdict.INCONCLUSIVE


def gate_results(benchmark: str, native: list, flagos: list, margin_pp: float, *, looks: int = 1, chance: float = 0.0,
                 max_unreadable: float = MAX_UNREADABLE) -> BenchmarkGate:
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
    repeats = len({repeat for _, repeat in native_by_key})
    return paired_gate(benchmark, item_means(native), item_means(flagos), margin_pp, repeats=repeats, looks=looks,
                       chance=chance,
                       unreadable=(_unreadable(native), _unreadable(flagos)), max_unreadable=max_unreadable,
                       native_answers={f"{i}#{k}": r.parsed for (i, k), r in native_by_key.items()},
                       flagos_answers={f"{i}#{k}": r.parsed for (i, k), r in flagos_by_key.items()})


def _unreadable(results: list) -> float:
    return sum(r.parsed == "" for r in results) / len(results) if results else 0.0


def item_means(results: list) -> dict[str, float]:
    scores: dict[str, list[float]] = {}
    for result in results:
        scores.setdefault(result.id, []).append(float(result.correct))
    return {item: sum(values) / len(values) for item, values in scores.items()}
