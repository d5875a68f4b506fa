"""The evaluate stage as plain code: ask the FlagOS stack and the reference stack every benchmark of the suite, gate
each benchmark item by item, and write the report the publish stage and the card read.

Stacks: the candidate is the release image with the chip's FlagOS environment (`flagos_env`, less the operators
the chip keeps native) or an endpoint URL given for chip hosts;
the reference is the same image with `native_env` (reference `native`), an endpoint URL, or the stored native
results of another release (e.g. `qwen3-nvidia`). Only one container is served at a time (two copies of a large
model rarely fit one accelerator). Results are stored per stack and key, so a re-run asks only what is missing.
A sampled benchmark that ends INCONCLUSIVE is asked again with twice the repeats, up to its cap.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import docker
from pydantic import BaseModel, ConfigDict

from engine.operators import OPS_VARIABLE
from flows.evaluate.benchmarks import BenchmarkDefinition, DatasetUnavailable, Item, load_definitions, load_items
from flows.evaluate.client import ItemResult, ask_stack
from flows.evaluate.container import ServeRequest, served
from flows.evaluate.bisect import Diagnosis, Measure, accuracy_measure, bisect_culprits
from flows.evaluate.gate import BenchmarkGate, Verdict, gate_results, holm, item_means, repeat_schedule, suite_verdict
from flows.evaluate.logprobs import (METRIC_NAMES, ItemScores, NotScored, TokenSignal, departure, score_replies,
                                     token_agreement, token_signal, token_signal_not_measured)
from flows.evaluate.operators import OperatorUse, StackRefused, check_switch, operator_report, served_identity, usage
from flows.evaluate.perf import METHOD, BenchRunner, PerfPoint, measure_serving
from flows.evaluate.signal import Signal, consistency_signal
from flows.evaluate.store import (ReferenceUnavailable, ResultKey, ResultStore, Stack, prompts_digest, scored_replies,
                                  stack_description)
from flows.errors import FlagReleaseError
from flows.files import write_model
from flows.matrix import NATIVE_REFERENCE, Benchmark
from flows.plan import Plan
from kernels.report import OpResult

REPORT_SCHEMA_VERSION = 2


class EvaluationFailed(FlagReleaseError):
    pass


class StackFailed(FlagReleaseError):
    """Requests still failing after the client's retries: a broken or flaky stack, never a score."""


class BenchmarkOutcome(BaseModel):
    """One benchmark of the suite: its gate, or why it could not be evaluated (which is never a PASS)."""

    model_config = ConfigDict(frozen=True)

    benchmark: str
    gated: bool
    repeats: int
    gate: BenchmarkGate | None
    unavailable: str | None = None
    note: str | None = None
    operators: dict[str, OperatorUse] = {}  # role -> what its engine ran while answering this benchmark
    stacks: dict[str, str] = {}  # role -> what answered (image digest + environment, or what the endpoint serves)
    signal: Signal | None = None  # identical replies and where they part, beside native vs native
    tokens: TokenSignal | None = None  # both stacks scoring the native replies token by token, beside native vs native
    diagnosis: Diagnosis | None = None  # the culprit bisection of a FAIL

    @property
    def verdict(self) -> Verdict:
        """The gate's verdict, unless the suite gates the finer signal and it failed (FAIL) or could not be shown
        (a PASS becomes INCONCLUSIVE)."""
        if self.gate is None:
            return Verdict.INCONCLUSIVE
        finer = [self.signal.verdict if self.signal else None, self.tokens.verdict if self.tokens else None]
        if Verdict.FAIL in finer:
            return Verdict.FAIL
        if Verdict.INCONCLUSIVE in finer and self.gate.verdict == Verdict.PASS:
            return Verdict.INCONCLUSIVE
        return self.gate.verdict

    @property
    def explanation(self) -> str | None:
        """Why the verdict is not PASS, in words (None on PASS)."""
        if self.gate is None:
            return self.unavailable
        gate = self.gate
        found = ""
        if self.diagnosis is not None:
            found = f"; culprit: {self.diagnosis.conclusion}"
            found += f"; {self.diagnosis.remedy}" if self.diagnosis.remedy else ""
        if self.signal is not None and self.signal.verdict == Verdict.FAIL:
            return (f"identical replies fell {self.signal.identical_drop * 100:.1f} pp below native vs native "
                    f"(the suite allows {self.signal.max_identical_drop_pp} pp)")
        if self.tokens is not None and self.tokens.verdict == Verdict.FAIL:
            return (f"token by token FlagOS departs from native beyond the chip's calibrated token_gate: "
                    f"{'; '.join(self.tokens.exceeded())}{found}")
        if self.signal is not None and self.signal.verdict == Verdict.INCONCLUSIVE and gate.verdict == Verdict.PASS:
            return "the suite gates identical replies, but no native-vs-native baseline was run"
        if self.tokens is not None and self.tokens.verdict == Verdict.INCONCLUSIVE and gate.verdict == Verdict.PASS:
            return f"the token-level gate is on, but the signal was not measured: {self.tokens.not_measured}"
        if gate.verdict == Verdict.FAIL:
            return (f"FlagOS is worse by {gate.drop * 100:.2f} pp, beyond the {gate.margin * 100:.1f} pp margin "
                    f"(interval [{gate.ci_low * 100:+.2f}, {gate.ci_high * 100:+.2f}] pp){found}")
        if gate.verdict == Verdict.DIFFERS:
            return (f"FlagOS is better by {-gate.drop * 100:.2f} pp, beyond the {gate.margin * 100:.1f} pp margin: "
                    "the stacks differ (check the reference)")
        return gate.reason


class StackPerf(BaseModel):
    model_config = ConfigDict(frozen=True)

    stack: str
    points: list[PerfPoint]


def publishable(publish_when_better: bool) -> tuple[Verdict, ...]:
    """The verdicts a gated benchmark may end with for the release to publish."""
    return (Verdict.PASS, Verdict.DIFFERS) if publish_when_better else (Verdict.PASS,)


class EvaluationReport(BaseModel):
    """What the evaluate stage proved; read by the publish stage and rendered into the card."""

    model_config = ConfigDict(frozen=True)

    schema_version: int = REPORT_SCHEMA_VERSION
    release: str
    fingerprint: str
    model: str
    revision: str
    suite: str
    suite_version: int
    candidate: str
    reference: str
    outcomes: list[BenchmarkOutcome]
    verdict: Verdict
    perf: list[StackPerf]
    perf_verdict: Verdict | None
    operators: list[OpResult]
    publish_when_better: bool = False  # the suite's opt-in: DIFFERS (FlagOS better beyond the margin) may publish
    thinking: str | None = None  # the suite's thinking mode for a thinking model: "disabled" or "enabled"

    def perf_by_stack(self) -> dict[str, list[PerfPoint]]:
        return {s.stack: s.points for s in self.perf}

    def operator_use(self, role: str) -> OperatorUse | None:
        """One stack's operator calls summed over the suite, with its engine (None: it answered nothing here)."""
        uses = [o.operators[role] for o in self.outcomes if role in o.operators]
        total = uses[0] if uses else None
        for use in uses[1:]:
            total = total.plus(use)
        return total

    @property
    def passed(self) -> bool:
        return self.verdict in publishable(self.publish_when_better) and self.perf_verdict in (None, Verdict.PASS)

    def failure_reason(self) -> str:
        reasons = [f"{o.benchmark}: {o.verdict.value}" + (f" ({o.explanation})" if o.explanation else "")
                   for o in self.outcomes if o.gated and o.verdict != Verdict.PASS
                   and not (o.verdict == Verdict.DIFFERS and self.publish_when_better)]
        if self.perf_verdict == Verdict.FAIL:
            reasons.append("serving throughput below the suite's ratio (FAIL)")
        elif self.perf_verdict == Verdict.INCONCLUSIVE:
            reasons.append("serving throughput ratio not shown (INCONCLUSIVE: "
                           + ("; ".join(f"{s.stack}: {p.not_measured}" for s in self.perf for p in s.points
                                        if p.not_measured) or "no native stack measured here") + ")")
        return "; ".join(reasons)


@dataclass(frozen=True)
class Endpoint:
    """An already-running stack: its OpenAI base URL and, for an engine that reports no identity, the name the
    engineer gives to what it serves (answers are stored under that name)."""

    url: str
    named: str | None = None


@dataclass(frozen=True)
class StackSource:
    """How to reach one side: an endpoint given by the user, or the image served here with an environment."""

    stack: Stack
    url: str | None = None
    named: str | None = None
    serve: ServeRequest | None = None


ANSWERING, SCORING = "answering", "token scoring"  # what `Stacks.seconds` counts


@dataclass
class Stacks:
    """Serves at most one container at a time; `url(source)` stops the other side first."""

    client: docker.DockerClient | None
    log: Callable[[str], None]
    timeout_s: float
    asked: int = 0  # requests sent in this run (answers reused from the store are not counted)
    seconds: dict[str, float] = field(default_factory=dict)  # time spent asking in this run, by what was asked
    _exits: ExitStack = field(default_factory=ExitStack)
    _current: tuple[str, str] | None = None

    @contextmanager
    def timing(self, kind: str) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.monotonic() - began

    def stack(self, source: StackSource) -> Stack:
        """Which stack answers for `source`: an image by its digest and environment; an endpoint by what it
        reports serving now (a restart with another image or switch is another stack), or by the name the
        engineer gave it; never by its URL alone."""
        if source.url is None:
            return source.stack
        if source.named is not None:
            return source.stack.model_copy(update={"served_by": f"endpoint named {source.named!r} by the engineer"})
        report = operator_report(source.url)
        identity = served_identity(report)
        if identity is None:
            variable = f"FLAGRELEASE_{'CANDIDATE' if source.stack.role == 'flagos' else 'REFERENCE'}_NAME"
            what = ("serves no operator report (/flagos/operators): nothing shows which of our kernels it runs or "
                    "what it serves" if report is None else "reports no identity (no build or checkpoint in "
                    "/flagos/operators)")
            raise StackRefused(f"the {source.stack.role} endpoint {source.url} {what}, so its answers could not be "
                               f"told from another stack's at the same URL; name what it serves in {variable}")
        return source.stack.model_copy(update={"served_by": identity})

    def url(self, source: StackSource) -> str:
        if source.url is not None:
            return source.url
        if self._current and self._current[0] == source.serve.name:
            return self._current[1]
        self.close()
        url = self._exits.enter_context(served(self.client, source.serve, self.log, self.timeout_s))
        self._current = (source.serve.name, url)
        return url

    def close(self) -> None:
        self._exits.close()
        self._exits = ExitStack()
        self._current = None


@dataclass(frozen=True)
class Evaluation:
    """Everything the stage needs, resolved by the flow from the plan, the image and the settings."""

    plan: Plan
    benchmarks_file: Path
    store: ResultStore
    candidate: StackSource
    reference: StackSource | None  # None: stored native results of the release named in plan.reference
    operators: list[OpResult]
    concurrency: int = 4
    perf_concurrencies: tuple[int, ...] = (4,)  # interpreted kernels pay ~1 s a decode step: keep it short
    bench: BenchRunner | None = None  # vLLM's serving benchmark client (None: performance is not measured)
    # Off only where the stacks are not FlagOS engines by design (the gate's quantisation controls in tests)
    verify_operators: bool = True
    bisect_timeout_s: float = 3600.0  # no bisection pass starts after this


def served_source(role: str, release: str, request: ServeRequest) -> StackSource:
    """A stack served here from an image, identified by the image's digest (the same image behind another
    registry is the same stack) and its environment."""
    content = request.image.rpartition("@")[2]
    return StackSource(Stack(role=role, release=release, served_by=stack_description(content, request.environment)),
                       serve=request)


def image_sources(plan: Plan, image: str, weights: Path, candidate_endpoint: Endpoint | None,
                  reference_endpoint: Endpoint | None, cache: Path | None = None,
                  candidate_env: dict[str, str] | None = None,
                  cpus: str | None = None) -> tuple[StackSource, StackSource | None]:
    """The two sides of a release's comparison, as the matrix and the settings describe them; `candidate_env`
    adds to the FlagOS container's environment (diagnosis), which is part of the stack's identity; `cpus` only
    binds the engines' model workers to host cores."""
    serve = plan.chip.serve
    name = f"flagrelease-eval-{plan.release}-{plan.short_fingerprint}"

    def side(role: str, environment: dict[str, str], endpoint: Endpoint | None) -> StackSource:
        if endpoint is not None:
            return StackSource(Stack(role=role, release=plan.release, served_by=endpoint.url), url=endpoint.url,
                               named=endpoint.named)
        return served_source(role, plan.release, ServeRequest(
            image=image, name=f"{name}-{role}", weights=weights, port=serve.port, flags=plan.chip.docker_run_flags,
            environment=environment, cache=cache, cpus=cpus))

    candidate = side("flagos", {**serve.flagos_environment, **(candidate_env or {})}, candidate_endpoint)
    if reference_endpoint is None and plan.reference != NATIVE_REFERENCE:
        return candidate, None
    return candidate, side("native", serve.native_env, reference_endpoint)


def evaluate(evaluation: Evaluation, client: docker.DockerClient | None, log: Callable[[str], None],
             serve_timeout_s: float = 300.0) -> EvaluationReport:
    """Every benchmark of the plan's suite, gated; the containers served here are always removed."""
    plan = evaluation.plan
    stacks = Stacks(client, log, serve_timeout_s)
    definitions = load_definitions(evaluation.benchmarks_file)
    outcomes: list[BenchmarkOutcome] = []
    evidence: dict[str, Evidence] = {}
    perf: dict[str, list[PerfPoint]] = {}
    measured: set[str] = set()

    def measure_perf(source: StackSource | None) -> None:
        """Once per stack, while it is served if possible (a container start costs most of a minute here)."""
        if source is None or source.stack.role in measured:
            return
        measured.add(source.stack.role)
        try:
            perf[source.stack.role] = _perf(evaluation, stacks, source, log)
        except StackRefused as exc:
            log(f"serving performance of the {source.stack.role} stack not measured: {exc}")

    try:
        for name, benchmark in plan.suite.benchmarks.items():
            definition = definitions.benchmarks[name].for_suite(plan.suite.thinking, plan.suite.thinking_max_tokens)
            outcome, evidence[name] = _evaluate_one(evaluation, stacks, name, benchmark, definition,
                                                    definitions.version, log, measure_perf)
            outcomes.append(outcome)
        gates = {g.benchmark: g for g in holm([o.gate for o in outcomes if o.gate is not None])}
        outcomes = [o.model_copy(update={"gate": gates.get(o.benchmark)}) for o in outcomes]
        accepted = publishable(plan.suite.publish_when_better)
        blocked = [o.benchmark for o in outcomes if o.gated and o.verdict not in accepted]
        if blocked:  # nothing publishes: spare the benchmark client's minute
            log(f"serving performance of the flagos stack not measured: {', '.join(blocked)} did not pass, so "
                "nothing publishes")
        else:
            measure_perf(evaluation.candidate)
        measure_perf(evaluation.reference)
        outcomes = [_diagnosed(evaluation, stacks, o, evidence[o.benchmark], log)
                    if o.gated and o.verdict == Verdict.FAIL and evidence.get(o.benchmark) else o for o in outcomes]
    finally:
        stacks.close()
    verdict = suite_verdict([o.verdict for o in outcomes if o.gated])
    return EvaluationReport(
        release=plan.release, fingerprint=plan.fingerprint, model=plan.model_name, revision=_revision(plan),
        suite=plan.suite_name, suite_version=plan.suite.version, candidate=evaluation.candidate.stack.served_by,
        reference=evaluation.reference.stack.served_by if evaluation.reference else f"stored results of {plan.reference}",
        outcomes=outcomes, verdict=verdict, perf=[StackPerf(stack=role, points=points) for role, points in perf.items()],
        perf_verdict=throughput_verdict(plan.suite.perf_min_ratio, perf), operators=evaluation.operators,
        publish_when_better=plan.suite.publish_when_better, thinking=plan.suite.thinking)


def _revision(plan: Plan) -> str:
    return plan.revision.resolved or f"{plan.revision.requested} (unpinned)"


@dataclass(frozen=True)
class Evidence:
    """What one benchmark's verdict rests on, kept for the culprit bisection of a FAIL."""

    key: ResultKey
    items: list[Item]
    definition: BenchmarkDefinition
    repeats: int
    reference: list[ItemResult]
    candidate: list[ItemResult]
    candidate_use: OperatorUse | None
    requests: int  # asked of both stacks in this run (0 when every answer came from the store)
    seconds: float
    tokens: _TokenScorer


def _evaluate_one(evaluation: Evaluation, stacks: Stacks, name: str, benchmark: Benchmark,
                  definition: BenchmarkDefinition, benchmarks_version: int, log: Callable[[str], None],
                  measure_perf: Callable[[StackSource | None], None]
                  ) -> tuple[BenchmarkOutcome, Evidence | None]:
    plan = evaluation.plan
    try:
        items = load_items(name, definition, benchmark.limit)
    except DatasetUnavailable as exc:
        log(f"{name}: {exc}")
        return BenchmarkOutcome(benchmark=name, gated=benchmark.gated, repeats=0, gate=None, unavailable=str(exc)), None
    key = ResultKey(model=plan.model_name, revision=_revision(plan), suite=plan.suite_name,
                    suite_version=plan.suite.version, benchmarks_version=benchmarks_version, benchmark=name,
                    generation=definition.generation, prompts=prompts_digest([i.prompt_hash for i in items]))
    schedule = repeat_schedule(benchmark.repeats, benchmark.max_repeats, definition.temperature > 0)
    note = None
    asked_before, spent_before, started = stacks.asked, dict(stacks.seconds), time.monotonic()
    for look, repeats in enumerate(schedule):
        try:
            candidate_stack = stacks.stack(evaluation.candidate)
            reference, reference_use, reference_stack, native_again = _reference_results(
                evaluation, stacks, candidate_stack, key, items, definition, repeats, log)
            scorer = _TokenScorer(evaluation, stacks, key, items[:benchmark.token_items], reference, log)
            scorer.native_scores(reference_stack)
            measure_perf(evaluation.reference)  # while the native stack is served, not after a restart
            candidate, candidate_use = _results(evaluation, stacks, evaluation.candidate, candidate_stack, key, items,
                                                definition, repeats, log)
        except (ReferenceUnavailable, StackFailed, StackRefused) as exc:
            log(str(exc))
            return BenchmarkOutcome(benchmark=name, gated=benchmark.gated, repeats=repeats, gate=None,
                                    unavailable=str(exc)), None
        gate = gate_results(name, reference, candidate, benchmark.margin_pp, looks=len(schedule),
                            chance=definition.chance, max_unreadable=benchmark.max_unreadable)
        log(f"{name}: native {gate.native_accuracy:.3f}, FlagOS {gate.flagos_accuracy:.3f}; drop (native minus FlagOS) "
            f"{gate.drop * 100:+.2f} pp, interval [{gate.ci_low * 100:+.2f}, {gate.ci_high * 100:+.2f}], margin "
            f"+/-{benchmark.margin_pp} pp, detectable {gate.detectable_drop * 100:.1f} pp -> {gate.verdict.value} "
            f"({len(items)} items x {repeats}){f': {gate.reason}' if gate.reason else ''}")
        if gate.verdict != Verdict.INCONCLUSIVE or gate.vacuous:
            break
        if look + 1 < len(schedule):
            log(f"{name}: INCONCLUSIVE, asking again with {schedule[look + 1]} repeats (cap {schedule[-1]})")
        elif len(schedule) > 1:
            note = f"still INCONCLUSIVE at the repeat cap ({repeats})"
        elif (benchmark.max_repeats or 0) > repeats:
            note = "greedy decoding: more repeats would give the same answers; more items are needed"
    signal = consistency_signal(reference, candidate, native_again, benchmark.max_identical_drop_pp)
    baseline = (f"{signal.baseline.identical:.1%} native vs native" if signal.baseline else "no native-vs-native run")
    log(f"{name}: identical replies {signal.flagos.identical:.1%} FlagOS vs native ({baseline})"
        + (f" -> {signal.verdict.value}" if signal.verdict else ""))
    tokens = scorer.signal(candidate_stack, evaluation.plan.chip.token_gate if benchmark.token_gate else None)
    answering, scoring = (round(stacks.seconds.get(kind, 0.0) - spent_before.get(kind, 0.0), 1)
                          for kind in (ANSWERING, SCORING))
    if scoring and answering:
        log(f"{name}: scoring token by token took {scoring:.0f} s, {scoring / answering:.2f}x the {answering:.0f} s "
            f"the stacks took to answer")
    tokens = tokens.model_copy(update={"scoring_s": scoring, "answering_s": answering})
    uses = {role: use for role, use in (("native", reference_use), ("flagos", candidate_use)) if use is not None}
    outcome = BenchmarkOutcome(benchmark=name, gated=benchmark.gated, repeats=repeats, gate=gate, note=note,
                               operators=uses, signal=signal, tokens=tokens,
                               stacks={"native": reference_stack.served_by, "flagos": candidate_stack.served_by})
    return outcome, Evidence(key=key, items=items, definition=definition, repeats=repeats, reference=reference,
                             candidate=candidate, candidate_use=candidate_use, requests=stacks.asked - asked_before,
                             seconds=time.monotonic() - started, tokens=scorer)


Answers = tuple[list[ItemResult], OperatorUse | None]


class _TokenScorer:
    """One benchmark's token-level signal: the native replies (repeat 0) to the first `token_items` items scored on
    the native stack twice while it is served (or, for stored native results of another release, the scores stored
    with them), then on the FlagOS stack; each scoring stored beside the answers, so a re-run asks nothing again."""

    def __init__(self, evaluation: Evaluation, stacks: Stacks, key: ResultKey, items: list[Item],
                 reference: list[ItemResult], log: Callable[[str], None]):
        self.evaluation, self.stacks, self.key, self.log = evaluation, stacks, key, log
        self.replies = scored_replies(reference)
        self.items = [item for item in items if item.id in self.replies]
        self.native: tuple[list[ItemScores], list[ItemScores] | None] | None = None
        self.problem: str | None = None

    def _scores(self, source: StackSource, stack: Stack) -> list[ItemScores]:
        stored = self.evaluation.store.load_scores(self.key, stack, self.replies)
        if stored is not None:
            return stored
        self.log(f"{self.key.benchmark}: the {source.stack.role} stack scores {len(self.items)} native replies "
                 "token by token (prompt logprobs)")
        url = self.stacks.url(source)
        with self.stacks.timing(SCORING):
            scores = score_replies(url, self.evaluation.plan.model.served_name, self.items, self.replies,
                                   concurrency=self.evaluation.concurrency)
        self.evaluation.store.save_scores(self.key, stack, self.replies, scores)
        return scores

    def native_scores(self, stack: Stack) -> None:
        if self.problem is not None or self.native is not None:
            return
        if self.evaluation.reference is None:  # another release's native results: its scores travel with them
            stored = self.evaluation.store.load_scores(self.key, stack, self.replies)
            if stored is None:
                self.problem = (f"the stored native results of {stack.release} carry no token scores of these "
                                f"replies; re-run `flagrelease run {stack.release}`")
            else:
                self.native = (stored, self.evaluation.store.load_scores(self.key, stack.second_run(), self.replies))
            return
        try:
            self.native = (self._scores(self.evaluation.reference, stack),
                           self._scores(self.evaluation.reference, stack.second_run()))
        except NotScored as exc:
            self.problem = f"the native stack returned no token scores: {exc}"

    def signal(self, candidate: Stack, thresholds) -> TokenSignal:
        if self.problem is None and self.native is not None:
            try:
                flagos = self._scores(self.evaluation.candidate, candidate)
            except NotScored as exc:
                self.problem = f"the FlagOS stack returned no token scores: {exc}"
            else:
                signal = token_signal(self.native[0], flagos, self.native[1], thresholds)
                seen, floor = signal.flagos, signal.baseline
                self.log(f"{self.key.benchmark}: token by token over {seen.positions} scored tokens: top-1 agreement "
                         f"{seen.top1:.4f} FlagOS vs native"
                         + (f" ({floor.top1:.4f} native vs native), mean |delta logprob| {seen.mean_abs_delta:.3g} "
                            f"({floor.mean_abs_delta:.3g}), mean KL {seen.mean_kl:.3g} ({floor.mean_kl:.3g})" if floor
                            else f", mean |delta logprob| {seen.mean_abs_delta:.3g}, mean KL {seen.mean_kl:.3g}")
                         + (f" -> {signal.verdict.value}" if signal.verdict else ""))
                return signal
        reason = self.problem or "the native stack was not scored"
        self.log(f"{self.key.benchmark}: token-level signal not measured: {reason}")
        return token_signal_not_measured(reason, thresholds)

    def measure(self, signal: TokenSignal, serve: Callable[[list[str]], StackSource]) -> Measure:
        """The bisection's measure for a token-level FAIL: the first crossed metric of each subset stack's scoring
        of the same replies against the native scoring."""
        metric = signal.crossed()[0]

        def subset_departure(subset: list[str]) -> tuple[float, int]:
            source = serve(subset)
            return departure(token_agreement(self.native[0], self._scores(source, source.stack)), metric), len(self.items)

        return Measure(name=f"{METRIC_NAMES[metric]} against the native scoring", items=len(self.items),
                       floor=departure(signal.baseline, metric) if signal.baseline else 0.0,
                       flagos=departure(signal.flagos, metric), departure=subset_departure)


def _refuse_same(reference: Stack, candidate: Stack) -> None:
    if reference.served_by == candidate.served_by:
        raise StackRefused(f"the native and the FlagOS stack are the same stack ({candidate.served_by}): the "
                           "comparison would prove nothing; refused before any request")


def _reference_results(evaluation: Evaluation, stacks: Stacks, candidate: Stack, key: ResultKey, items: list[Item],
                       definition: BenchmarkDefinition, repeats: int, log: Callable[[str], None]
                       ) -> tuple[list[ItemResult], OperatorUse | None, Stack, list[ItemResult] | None]:
    """The reference side (served here or at an endpoint, else the stored native results of another release),
    refused when it is the candidate itself, and its second run when the suite asks for the baseline."""
    baseline = evaluation.plan.suite.signal_baseline
    if evaluation.reference is not None:
        stack = stacks.stack(evaluation.reference)
        _refuse_same(stack, candidate)
        results, use = _results(evaluation, stacks, evaluation.reference, stack, key, items, definition, repeats, log)
        again = None
        if baseline:
            log(f"{key.benchmark}: the native stack again, for the native-vs-native baseline")
            again = _results(evaluation, stacks, evaluation.reference, stack.second_run(), key, items, definition,
                             repeats, log)[0]
        return results, use, stack, again
    stack, stored, use = evaluation.store.reference(key, evaluation.plan.reference)
    _refuse_same(stack, candidate)
    have = {r.repeat for r in stored}
    if not set(range(repeats)) <= have:
        raise ReferenceUnavailable(f"{key.benchmark}: the stored native results from {stack.release!r} have "
                                   f"{len(have)} repeat(s); {repeats} are needed. Re-run `flagrelease run {stack.release}`")
    if evaluation.verify_operators and (use is None or use.flagos or use.calls):
        raise StackRefused(f"{key.benchmark}: the stored native results from {stack.release!r} do not show a native "
                           f"stack (operator report: {'none' if use is None else f'{use.calls} calls of ours'}); "
                           f"re-run `flagrelease run {stack.release}`")
    log(f"{key.benchmark}: native results from {stack.release} ({stack.served_by})")
    second = evaluation.store.load(key, stack.second_run()) if baseline else None
    again = [r for r in second[0] if r.repeat < repeats] if second else None
    if again is not None and {r.repeat for r in again} != set(range(repeats)):
        again = None
    return [r for r in stored if r.repeat < repeats], use, stack, again


def _results(evaluation: Evaluation, stacks: Stacks, source: StackSource, stack: Stack, key: ResultKey,
             items: list[Item], definition: BenchmarkDefinition, repeats: int, log: Callable[[str], None]) -> Answers:
    """This side's results for repeats 0..repeats-1: stored ones reused, the missing ones asked and stored, each
    span of asking bracketed by the engine's operator report (checked against the stack's role)."""
    role = stack.role
    stored, use = evaluation.store.load(key, stack) or ([], None)
    if evaluation.verify_operators and use is None:
        stored = []  # answers without an operator report prove nothing about what ran: ask again
    missing = sorted(set(range(repeats)) - {r.repeat for r in stored})
    if missing:
        url = stacks.url(source)
        before = None
        if evaluation.verify_operators:
            before = operator_report(url)
            check_switch(role, before)
        log(f"{key.benchmark}: asking the {role} stack {len(items)} items x {len(missing)} repeat(s)")
        with stacks.timing(ANSWERING):
            asked = ask_stack(url, evaluation.plan.model.served_name, items, definition, repeats=missing,
                              concurrency=evaluation.concurrency,
                              progress=lambda done, total, rate: log(f"{key.benchmark}: {role} stack {done}/{total} "
                                                                     f"items, {rate:.1f} items/s"))
        errors = [r for r in asked if r.error]
        if errors:
            raise StackFailed(f"{key.benchmark}: {len(errors)} of {len(asked)} request(s) to the {role} "
                              f"stack failed after retries (first: {errors[0].error}); its answers are not stored "
                              "and the benchmark cannot be gated")
        if evaluation.verify_operators:
            span = usage(before, operator_report(url), role)
            use = span if use is None else span.plus(use)
            log(f"{key.benchmark}: {role} stack ran our operators {use.calls} times "
                f"({', '.join(f'{o.name} {o.calls}' for o in use.operators if o.calls) or 'none'})")
        stacks.asked += len(asked)
        stored = stored + asked
        evaluation.store.save(key, stack, stored, use)
    else:
        log(f"{key.benchmark}: {role} results reused from the store ({len(stored)} answers)")
    return [r for r in stored if r.repeat < repeats], use


def _diagnosed(evaluation: Evaluation, stacks: Stacks, outcome: BenchmarkOutcome, evidence: Evidence,
               log: Callable[[str], None]) -> BenchmarkOutcome:
    """A FAILed benchmark with its culprit bisection: the image served again with subsets of the operators the
    FlagOS stack ran, measured on what failed (accuracy over the diagnosis items, or the token signal over the
    scored items). The verdict stays FAIL whatever the bisection finds."""
    candidate = evaluation.candidate
    ran = [o.name for o in evidence.candidate_use.operators if o.calls] if evidence.candidate_use else []
    accuracy_failed = outcome.gate is not None and outcome.gate.verdict == Verdict.FAIL
    tokens_failed = outcome.tokens is not None and outcome.tokens.verdict == Verdict.FAIL
    why = None
    if candidate.serve is None:
        why = "the candidate is an endpoint, so its operators cannot be switched from here"
    elif not ran:
        why = "the FlagOS stack's operator report shows no calls"
    elif not (accuracy_failed or tokens_failed):
        why = "neither accuracy nor the token signal failed (the identical-reply signal did), and it bisects neither"
    if why is not None:
        return outcome.model_copy(update={"note": f"no culprit bisection: {why}"})
    by_id = {item.id: item for item in evidence.items}
    probes = itertools.count(1)

    def serve(subset: list[str]) -> StackSource:
        request = dataclasses.replace(candidate.serve, name=f"{candidate.serve.name}-bisect-{next(probes)}",
                                      environment={**candidate.serve.environment, OPS_VARIABLE: ",".join(subset)})
        return served_source("flagos", evaluation.plan.release, request)

    def ask(subset: list[str], ids: list[str]) -> tuple[dict[str, float], int]:
        items = [by_id[i] for i in ids]
        key = evidence.key.model_copy(update={"prompts": prompts_digest([i.prompt_hash for i in items])})
        source = serve(subset)
        before = stacks.asked
        results, _ = _results(evaluation, stacks, source, source.stack, key, items, evidence.definition,
                              evidence.repeats, log)
        return item_means(results), stacks.asked - before

    measure = (accuracy_measure(item_means(evidence.reference), item_means(evidence.candidate), ask) if accuracy_failed
               else evidence.tokens.measure(outcome.tokens, serve))
    log(f"{outcome.benchmark}: FAIL; bisecting {', '.join(ran)} on the {measure.name} to find the operator that "
        "causes it")
    try:
        diagnosis = bisect_culprits(outcome.benchmark, ran, measure, evaluation.bisect_timeout_s,
                                    (evidence.requests, evidence.seconds), log)
    except (FlagReleaseError, NotScored) as exc:  # a pass's stack refused, failed to serve or to answer: FAIL stands
        log(f"{outcome.benchmark}: culprit bisection stopped: {exc}")
        return outcome.model_copy(update={"note": f"culprit bisection stopped: {exc}"})
    log(f"{outcome.benchmark}: {diagnosis.conclusion} ({diagnosis.requests} extra requests, {diagnosis.seconds:.0f} s)")
    chip = evaluation.plan.chip.name
    remedy = None
    if diagnosis.culprits:
        remedy = (f"to keep {diagnosis.culprits[0]} native on this chip, add under `serve:` in images/{chip}/chip.yaml: "
                  f"`native_ops: {{{diagnosis.culprits[0]}: \"fails {outcome.benchmark} in {evaluation.plan.release} "
                  "(bisected)\"}`")
    return outcome.model_copy(update={"diagnosis": diagnosis.model_copy(update={"remedy": remedy})})


def _perf(evaluation: Evaluation, stacks: Stacks, source: StackSource, log: Callable[[str], None]) -> list[PerfPoint]:
    stack = stacks.stack(source)
    stored = evaluation.store.load_perf(stack)
    if stored is not None:
        return stored
    points = measure_serving(evaluation.bench, stacks.url(source), evaluation.perf_concurrencies)
    for point in points:
        if point.not_measured:
            log(f"{stack.role} serving at concurrency {point.concurrency}: not measured ({point.not_measured})")
            continue
        log(f"{stack.role} serving at concurrency {point.concurrency} ({METHOD}, {point.requests} requests of "
            f"{point.input_tokens} + {point.output_tokens} tokens): {point.output_tokens_per_s:.1f} output tokens/s, "
            f"{point.total_tokens_per_s:.1f} total tokens/s, TTFT median {point.ttft_median_s * 1000:.0f} ms, "
            f"TPOT median {point.tpot_median_s * 1000:.0f} ms, {point.errors} error(s)")
    if not any(point.not_measured for point in points):
        evaluation.store.save_perf(stack, points)  # a failed measurement is tried again next run
    return points


def throughput_verdict(min_ratio: float | None, perf: dict[str, list[PerfPoint]]) -> Verdict | None:
    if min_ratio is None:
        return None
    if "native" not in perf or "flagos" not in perf:
        return Verdict.INCONCLUSIVE  # no native stack measured here: the ratio cannot be shown
    if any(p.not_measured for points in perf.values() for p in points):
        return Verdict.INCONCLUSIVE
    native = {p.concurrency: p.output_tokens_per_s for p in perf["native"]}
    ok = all(p.output_tokens_per_s >= min_ratio * native[p.concurrency] for p in perf["flagos"])
    return Verdict.PASS if ok else Verdict.FAIL


def write_report(report: EvaluationReport, release_dir: Path) -> Path:
    return write_model(release_dir / "evaluation.json", report)

