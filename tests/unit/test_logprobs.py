"""The token-level signal: agreement of two scorings position by position, the chip's calibrated gate on it, a gate
that cannot be measured never passing, and the matrix refusing a gated suite on a chip without thresholds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from flows.errors import MatrixError
from flows.evaluate.gate import Verdict
from flows.evaluate.bisect import Diagnosis, Probe
from flows.evaluate.logprobs import (ItemScores, Position, departure, text_hash, token_agreement, token_signal,
                                     token_signal_not_measured)
from flows.matrix import TokenThresholds, load_matrix
from flows.plan import resolve
from flows.reports import evaluation_markdown
from flows.settings import Settings
from tests.unit.test_card import MATRIX, report_for

THRESHOLDS = TokenThresholds(dtype="float32", min_top1=0.99, max_mean_abs_delta=0.01, max_mean_kl=0.001,
                             calibration="test thresholds, chosen by hand for these cases")


def position(chosen: str, **top: float) -> Position:
    return Position(logprob=top[chosen], top=top)


def scores(rows: list[list[Position]], reply: str = "r") -> list[ItemScores]:
    return [ItemScores(id=f"q{i}", text_hash=text_hash(f"q{i}", reply), positions=row) for i, row in enumerate(rows)]


def test_identical_scorings_agree_fully_and_a_shifted_one_is_measured():
    same = scores([[position("a", a=-0.1, b=-2.5), position("b", a=-3.0, b=-0.05)]] * 3)
    exact = token_agreement(same, same)
    assert (exact.positions, exact.top1, exact.mean_abs_delta, exact.mean_kl) == (6, 1.0, 0.0, 0.0)
    # every position's top-1 flips from a to b on the other side: the scored token's logprob moves by 1.9
    flipped = scores([[position("a", a=-2.0, b=-0.2), position("b", a=-3.0, b=-0.05)]] * 3)
    seen = token_agreement(same, flipped)
    assert seen.top1 == 0.5 and math.isclose(seen.mean_abs_delta, 1.9 / 2) and seen.p99_abs_delta == pytest.approx(1.9)
    expected_kl = math.exp(-0.1) * (-0.1 + 2.0) + math.exp(-2.5) * (-2.5 + 0.2)  # over the reference's top-k
    assert seen.mean_kl == pytest.approx(expected_kl / 2)


def test_items_scored_on_different_texts_are_not_compared():
    mine = scores([[position("a", a=-0.1, b=-2.5)]])
    other = scores([[position("b", a=-2.0, b=-0.2)]], reply="another reply")
    assert token_agreement(mine, other).positions == 0


def test_the_gate_fails_on_any_crossed_threshold_and_names_it():
    native = scores([[position("a", a=-0.1, b=-2.5)]] * 10)
    close = scores([[position("a", a=-0.1001, b=-2.5)]] * 10)
    drifted = scores([[position("a", a=-0.2, b=-2.4)]] * 10)
    assert token_signal(native, close, native, THRESHOLDS).verdict == Verdict.PASS
    failed = token_signal(native, drifted, native, THRESHOLDS)
    assert failed.verdict == Verdict.FAIL and failed.exceeded() == ["mean |delta logprob| 0.1 > 0.01",
                                                                    f"mean KL {failed.flagos.mean_kl:.4g} > 0.001"]
    assert failed.crossed() == ["mean_abs_delta", "mean_kl"]
    assert departure(failed.flagos, "mean_abs_delta") == pytest.approx(0.1) and departure(failed.flagos, "top1") == 0
    assert token_signal(native, drifted, native, None).verdict is None  # reported, not gated
    assert token_signal(native, scores([], "x"), native, THRESHOLDS).verdict == Verdict.INCONCLUSIVE


def test_a_gate_without_its_signal_is_inconclusive_never_pass():
    signal = token_signal_not_measured("the server returned no prompt_logprobs", THRESHOLDS)
    assert signal.verdict == Verdict.INCONCLUSIVE and signal.flagos is None
    assert token_signal_not_measured("reason", None).verdict is None


def test_a_gated_suite_on_a_chip_without_thresholds_is_refused_naming_the_field(project_copy: Path):
    matrix = project_copy / "releases.yaml"
    matrix.write_text(matrix.read_text().replace("token_gate: false}", "token_gate: true}"))
    profile = project_copy / "images" / "cpu" / "chip.yaml"
    chip = yaml.safe_load(profile.read_text())
    chip.pop("token_gate", None)
    profile.write_text(yaml.safe_dump(chip))
    with pytest.raises(MatrixError) as caught:
        load_matrix(matrix)
    assert "suites.cpu-smoke.benchmarks.arithmetic.token_gate: is on, but release 'smollm2-cpu' runs on chip 'cpu'" \
        in str(caught.value) and "no token_gate thresholds for serve.dtype 'float32'" in str(caught.value)
    chip["token_gate"] = {**THRESHOLDS.model_dump(), "dtype": "bfloat16"}
    profile.write_text(yaml.safe_dump(chip))
    with pytest.raises(MatrixError, match="token_gate.dtype is 'bfloat16' but the chip serves serve.dtype 'float32'"):
        load_matrix(matrix)


def test_a_server_without_prompt_logprobs_is_not_scored():
    """An OpenAI-compatible server that tokenizes (as vLLM does) but ignores `prompt_logprobs`, as servers other
    than vLLM do: the scoring names what is missing instead of comparing nothing."""
    import json
    from http.server import BaseHTTPRequestHandler

    from flows.evaluate.benchmarks import Item
    from flows.evaluate.logprobs import NotScored, score_replies
    from tests.loopback import send_json, start

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                send_json(self, 200, {"count": 3, "tokens": [1, 2, 3, 4, 5][:3 + len(body["messages"]) - 1]})
            else:
                send_json(self, 200, {"id": "c", "object": "text_completion", "created": 0, "model": "m",
                                      "choices": [{"index": 0, "text": "x", "finish_reason": "length",
                                                   "logprobs": None}]})

    server = start(Handler)
    try:
        item = Item(id="q0", prompt="1+1?", gold="2")
        with pytest.raises(NotScored, match="no prompt_logprobs for every prompt token"):
            score_replies(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", [item], {"q0": "2"})
    finally:
        server.shutdown()


def test_a_token_level_fail_fails_the_benchmark_and_the_report_names_the_bisected_culprit():
    native = scores([[position("a", a=-0.1, b=-2.5)]] * 10)
    failed = token_signal(native, scores([[position("a", a=-0.2, b=-2.4)]] * 10), native, THRESHOLDS)
    diagnosis = Diagnosis(benchmark="arithmetic", measure="mean |delta logprob| against the native scoring",
                          operators=["rms_norm", "fused_add_rms_norm"], items=10, floor=0.0, flagos=0.1,
                          probes=[Probe(operators=["rms_norm"], departure=0.001, reproduces=False, requests=10,
                                        seconds=30.0),
                                  Probe(operators=["fused_add_rms_norm"], departure=0.09, reproduces=True, requests=10,
                                        seconds=31.0)],
                          culprits=["fused_add_rms_norm"], conclusion="fused_add_rms_norm alone reproduces the failure",
                          original_requests=120, original_seconds=200.0, remedy="keep it native")
    report = report_for(resolve(MATRIX, "smollm2-cpu", Settings(offline=True)), {"arithmetic": 0.0})
    [passed] = report.outcomes
    outcome = passed.model_copy(update={"tokens": failed, "diagnosis": diagnosis})
    assert passed.verdict == Verdict.PASS and outcome.verdict == Verdict.FAIL  # accuracy alone would have passed
    assert outcome.explanation.startswith("token by token FlagOS departs from native beyond the chip's calibrated")
    assert "culprit: fused_add_rms_norm alone reproduces the failure; keep it native" in outcome.explanation
    markdown = evaluation_markdown(report.model_copy(update={"outcomes": [outcome]}))
    assert "| operators switched on | mean \\|delta logprob\\| against the native scoring |" in markdown
    assert "| fused_add_rms_norm | 0.09 | yes | 10 | 31 |" in markdown


def test_the_report_gives_what_scoring_cost_beside_answering_and_nothing_for_stored_results():
    native = scores([[position("a", a=-0.1, b=-2.5)]] * 10)
    measured = token_signal(native, native, native, THRESHOLDS)
    report = report_for(resolve(MATRIX, "smollm2-cpu", Settings(offline=True)), {"arithmetic": 0.0})
    [outcome] = report.outcomes
    costly = outcome.model_copy(update={"tokens": measured.model_copy(update={"scoring_s": 41.0, "answering_s": 100.0})})
    markdown = evaluation_markdown(report.model_copy(update={"outcomes": [costly]}))
    assert "- arithmetic: scoring took 41 s, 0.41x the 100 s the stacks took to answer." in markdown
    reused = outcome.model_copy(update={"tokens": measured})  # every answer and score came from the store
    assert "scoring took" not in evaluation_markdown(report.model_copy(update={"outcomes": [reused]}))
