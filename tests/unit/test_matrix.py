"""The release matrix and chip profiles: the committed files load, and every kind of mistake is a MatrixError that
names the file, the line and the field path, and says what is allowed."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.errors import MatrixError, UnknownRelease
from flows.matrix import load_matrix

from tests.conftest import PROJECT_DIR

MOE = "smollm2-moe-4x135m-instruct"


def committed() -> dict:
    return yaml.safe_load((PROJECT_DIR / "releases.yaml").read_text())


def write(root: Path, data: dict) -> Path:
    path = root / "releases.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def problems_of(path: Path, images: Path) -> list[str]:
    with pytest.raises(MatrixError) as caught:
        load_matrix(path, images)
    assert caught.value.path == str(path)
    return caught.value.problems


def test_committed_matrix_loads_with_every_release_chip_and_model():
    matrix = load_matrix(PROJECT_DIR / "releases.yaml")
    assert set(matrix.spec.releases) >= {"qwen3-iluvatar", "qwen3-nvidia", "smollm2-cpu"}
    assert set(matrix.chips) == {"iluvatar", "nvidia", "cpu"}
    assert matrix.spec.releases["qwen3-iluvatar"].reference == "qwen3-nvidia"
    assert matrix.chips["iluvatar"].triton.backend == "iluvatar"
    assert "--privileged" in matrix.chips["iluvatar"].docker_run_flags
    assert matrix.spec.models["qwen3-30b-a3b"].source.repo == "Qwen/Qwen3-30B-A3B"


def test_unknown_release_lists_the_known_ones():
    matrix = load_matrix(PROJECT_DIR / "releases.yaml")
    with pytest.raises(UnknownRelease) as caught:
        matrix.release("qwen3-iluvatr")
    assert caught.value.exit_code == 2
    assert "qwen3-iluvatar, qwen3-nvidia, smollm2-cpu" in str(caught.value)


def setter(path: tuple, value: object) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _delete(path: tuple) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


BAD_MATRICES = {
    "unknown top-level key": (setter(("releses",), {}), "releses: unknown key 'releses' (allowed: chips, models, suites, releases, rebuild)"),
    "unknown release key": (setter(("releases", "smollm2-cpu", "image"), "x"), "releases.smollm2-cpu.image: unknown key 'image' (allowed: chip, model, schedule, repository, suite, reference)"),
    "unknown model key": (setter(("models", "qwen3-30b-a3b", "source", "branch"), "x"), "models.qwen3-30b-a3b.source.branch: unknown key 'branch' (allowed: hub, repo, revision, file, upcycle)"),
    "unknown chip": (setter(("releases", "qwen3-iluvatar", "chip"), "iluvatr"), "releases.qwen3-iluvatar.chip: unknown chip 'iluvatr' (allowed: cpu, iluvatar, nvidia)"),
    "unknown model": (setter(("releases", "smollm2-cpu", "model"), "smollm3"), "releases.smollm2-cpu.model: unknown model 'smollm3' (allowed: qwen3-30b-a3b, smollm2-135m-instruct, smollm2-moe-4x135m-instruct)"),
    "unknown suite": (setter(("releases", "smollm2-cpu", "suite"), "tiny"), "releases.smollm2-cpu.suite: unknown suite 'tiny' (allowed: cpu-smoke, flagrelease-five)"),
    "reference to itself": (setter(("releases", "smollm2-cpu", "reference"), "smollm2-cpu"), "releases.smollm2-cpu.reference: 'smollm2-cpu' is not another release (allowed: native)"),
    "reference with another model": (setter(("releases", "smollm2-cpu", "reference"), "qwen3-nvidia"), "serves model 'qwen3-30b-a3b', not 'smollm2-135m-instruct'"),
    "reference of a reference": (setter(("releases", "qwen3-nvidia", "reference"), "qwen3-iluvatar"),
                                 "releases.qwen3-iluvatar.reference: release 'qwen3-nvidia' compares with stored results itself"),
    "bad cron": (setter(("releases", "smollm2-cpu", "schedule", "cron"), "0 25 * * *"), "releases.smollm2-cpu.schedule.cron: '0 25 * * *' is not a 5-field cron expression"),
    "hashed cron": (setter(("releases", "smollm2-cpu", "schedule", "cron"), "H 3 * * *"), "releases.smollm2-cpu.schedule.cron: 'H 3 * * *' is not a 5-field cron expression"),
    "bad time zone": (setter(("rebuild", "schedule", "timezone"), "Mars/Olympus"), "rebuild.schedule.timezone: 'Mars/Olympus' is not an IANA time zone"),
    "missing field": (_delete(("releases", "smollm2-cpu", "repository")), "releases.smollm2-cpu.repository: required key is missing"),
    "bad hub": (setter(("models", "qwen3-30b-a3b", "source", "hub"), "gitee"), "models.qwen3-30b-a3b.source.hub: Input should be 'modelscope', 'huggingface', 'pypi', 'local' or 'derived'"),
    "unknown benchmark": (setter(("suites", "cpu-smoke", "benchmarks", "hellaswag"), {"margin_pp": 1}), "suites.cpu-smoke.benchmarks.hellaswag"),
    "negative margin": (setter(("suites", "cpu-smoke", "benchmarks", "arithmetic", "margin_pp"), -1), "suites.cpu-smoke.benchmarks.arithmetic.margin_pp: Input should be greater than 0"),
    "uppercase release name": (setter(("releases", "Smol"), committed()["releases"]["smollm2-cpu"]), "releases.Smol: name 'Smol' is not allowed"),
    "repository with a tag": (setter(("releases", "smollm2-cpu", "repository"), "127.0.0.1:5000/flagrelease/smol:latest"), "releases.smollm2-cpu.repository: '127.0.0.1:5000/flagrelease/smol:latest' is not '<registry host[:port]>/<path>'"),
    "duplicate chip in list": (setter(("chips",), ["cpu", "nvidia", "iluvatar", "cpu"]), "chips.3: chip 'cpu' is listed twice"),
    "shared repository": (setter(("releases", "qwen3-nvidia", "repository"), "127.0.0.1:5000/flagrelease/qwen3-30b-a3b-iluvatar"), "is already used by release 'qwen3-iluvatar'"),
    "wrong type": (setter(("releases", "smollm2-cpu", "schedule"), "daily"), "releases.smollm2-cpu.schedule: Input should be a valid dictionary"),
    "derived without a recipe": (_delete(("models", MOE, "source", "upcycle")), f"models.{MOE}.source: a derived source needs `upcycle`"),
    "a recipe on downloaded weights": (setter(("models", "smollm2-135m-instruct", "source", "upcycle"), {"experts": 4, "top_k": 2, "seed": 0, "noise": 0.01}),
                                       "models.smollm2-135m-instruct.source: a derived source needs `upcycle` (how its weights are made), and only a derived one has it"),
    "derived from an unknown model": (setter(("models", MOE, "source", "repo"), "smollm3"),
                                      f"models.{MOE}.source.repo: 'smollm3' is not a model of this matrix with weights of its own (allowed: qwen3-30b-a3b, smollm2-135m-instruct)"),
    "top-k above the experts": (setter(("models", MOE, "source", "upcycle", "top_k"), 8), f"models.{MOE}.source.upcycle: top_k (8) is above experts (4)"),
}


@pytest.mark.parametrize("case", sorted(BAD_MATRICES))
def test_bad_matrix_names_file_line_field_and_what_is_allowed(case: str, tmp_path: Path):
    mutate, expected = BAD_MATRICES[case]
    data = committed()
    mutate(data)
    problems = problems_of(write(tmp_path, data), PROJECT_DIR / "images")
    assert any(expected in p for p in problems), problems
    assert all(p.startswith("releases.yaml:") for p in problems), problems
    line = int(problems[0].split(":")[1])  # every problem carries a real line number of the file
    assert 1 <= line <= len((tmp_path / "releases.yaml").read_text().splitlines())


def test_duplicate_release_name_is_rejected_with_both_lines(tmp_path: Path):
    text = (PROJECT_DIR / "releases.yaml").read_text()
    block = text[text.index("  smollm2-cpu:"):text.index("# The nightly")]
    path = tmp_path / "releases.yaml"
    path.write_text(text.replace(block, block + block))
    problems = problems_of(path, PROJECT_DIR / "images")
    first = text[: text.index("  smollm2-cpu:")].count("\n") + 1
    assert problems == [f"line {first + block.count(chr(10))}: duplicate key 'smollm2-cpu' (first defined on line {first})"]


def test_malformed_yaml_names_the_line(tmp_path: Path):
    path = tmp_path / "releases.yaml"
    path.write_text("chips: [cpu\nmodels: {}\n")
    [problem] = problems_of(path, PROJECT_DIR / "images")
    assert problem.startswith("line ") and "not valid YAML" in problem


@pytest.mark.parametrize("text", ["", "- just\n- a list\n", "42\n"])
def test_top_level_must_be_a_mapping(text: str, tmp_path: Path):
    path = tmp_path / "releases.yaml"
    path.write_text(text)
    assert problems_of(path, PROJECT_DIR / "images") == ["the file must hold a YAML mapping at the top level"]


def test_missing_matrix_file(tmp_path: Path):
    assert problems_of(tmp_path / "nope.yaml", PROJECT_DIR / "images") == ["file not found"]


def test_missing_chip_profile_names_the_folder(tmp_path: Path):
    data = committed()
    data["chips"].append("ascend")
    with pytest.raises(MatrixError) as caught:
        load_matrix(write(tmp_path, data), PROJECT_DIR / "images")
    assert caught.value.path.endswith("images/ascend/chip.yaml")
    assert "images/ascend/chip.yaml" in caught.value.problems[0]


def test_chip_profile_errors_name_the_profile(project_copy: Path):
    profile = project_copy / "images" / "nvidia" / "chip.yaml"
    data = yaml.safe_load(profile.read_text())
    data["triton"]["aot_targets"] = ["cuda:90", "cuda:75"]
    data["versions"]["flaggems"] = 2.2
    data["name"] = "nvidia"
    profile.write_text(yaml.safe_dump(data))
    with pytest.raises(MatrixError) as caught:
        load_matrix(project_copy / "releases.yaml")
    assert caught.value.path == str(profile)
    text = "\n".join(caught.value.problems)
    assert "chip.yaml:" in text and "triton.aot_targets: unknown AOT target(s) ['cuda:75']" in text
    assert "versions.flaggems: Input should be a valid string (quote it" in text


def cpu_serve(project_copy: Path, **changes: object) -> Path:
    """The copy's cpu profile with `serve` keys replaced; returns the matrix to load."""
    profile = project_copy / "images" / "cpu" / "chip.yaml"
    data = yaml.safe_load(profile.read_text())
    data["serve"].update(changes)
    profile.write_text(yaml.safe_dump(data))
    return project_copy / "releases.yaml"


def refusal(matrix: Path) -> list[str]:
    with pytest.raises(MatrixError) as caught:
        load_matrix(matrix)
    return caught.value.problems


def test_a_chip_whose_two_stacks_would_run_the_same_code_is_refused(project_copy: Path):
    problems = refusal(cpu_serve(project_copy, flagos_env={"USE_FLAGGEMS": "0"}, native_env={"USE_FLAGGEMS": "0"}))
    assert any("serve: flagos_env and native_env are the same ({'USE_FLAGGEMS': '0'}): the two stacks "
               "would run the same code" in problem for problem in problems), problems


def test_a_chip_keeps_named_operators_native_each_with_its_reason(project_copy: Path):
    matrix = cpu_serve(project_copy, native_ops={"silu_and_mul": "1-2 bf16 ulp of jitter flip greedy near-ties"})
    assert load_matrix(matrix).chips["cpu"].serve.flagos_environment == {
        "USE_FLAGGEMS": "1", "FLAGOS_OPS": "rms_norm,fused_add_rms_norm,rotary_embedding,topk_softmax,moe_sum,softmax"}
    problems = refusal(cpu_serve(project_copy, native_ops={"silu_and_mull": "typo"}))
    assert any("native_ops names unknown operator(s) ['silu_and_mull']; allowed: rms_norm, fused_add_rms_norm, "
               "silu_and_mul" in problem for problem in problems), problems


def test_a_chip_serving_compiled_graphs_or_another_engine_is_refused(project_copy: Path):
    """Compiled graphs would run our operators' Python once while tracing: the report could not count per request."""
    problems = refusal(cpu_serve(project_copy, enforce_eager=False))
    assert any("serve.enforce_eager" in problem and "True" in problem for problem in problems), problems
    problems = refusal(cpu_serve(project_copy, engine="transformers"))  # one engine in the project
    assert any("serve.engine" in problem for problem in problems), problems


def test_chip_profile_name_must_match_its_folder(project_copy: Path):
    profile = project_copy / "images" / "cpu" / "chip.yaml"
    lines = profile.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text == "name: cpu")
    profile.write_text(profile.read_text().replace("name: cpu", "name: cpu2"))
    with pytest.raises(MatrixError) as caught:
        load_matrix(project_copy / "releases.yaml")
    assert caught.value.problems == [f"chip.yaml:{line}: name: is 'cpu2' but the folder is 'cpu'; they must match"]


def leaf_paths(data: object, prefix: tuple = ()) -> list[tuple]:
    if isinstance(data, dict):
        return [leaf for key, value in data.items() for leaf in leaf_paths(value, prefix + (key,))] or [prefix]
    if isinstance(data, list):
        return [leaf for index, value in enumerate(data) for leaf in leaf_paths(value, prefix + (index,))] or [prefix]
    return [prefix]


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_corrupted_value_is_a_matrix_error_never_a_traceback(data: st.DataObject, tmp_path: Path):
    matrix = committed()
    leaves = [leaf for leaf in leaf_paths(matrix) if leaf]
    path = data.draw(st.sampled_from(leaves))
    junk = data.draw(JUNK)
    corrupted = copy.deepcopy(matrix)
    setter(path, junk)(corrupted)
    target = write(tmp_path, corrupted)
    try:
        load_matrix(target, PROJECT_DIR / "images")
    except MatrixError as exc:
        # a problem of the matrix names releases.yaml; a chip name that is valid but has no profile names that file
        assert exc.problems
        assert exc.path.endswith("releases.yaml") or exc.path.endswith("chip.yaml")
        assert all(p.startswith("releases.yaml") for p in exc.problems) or "needs a profile at images/" in exc.problems[0]


def test_thinking_enabled_needs_an_output_budget():
    from flows.matrix import Suite

    with pytest.raises(ValueError, match="thinking: enabled needs thinking_max_tokens"):
        Suite(version=1, thinking="enabled", benchmarks={"mmlu": {"margin_pp": 1.5}})
    assert Suite(version=1, thinking="disabled", benchmarks={"mmlu": {"margin_pp": 1.5}}).thinking == "disabled"


def test_a_rebuild_runs_each_reference_before_the_releases_that_pair_with_it():
    from flows.matrix import load_matrix, reference_waves

    spec = load_matrix(PROJECT_DIR / "releases.yaml").spec
    assert reference_waves(spec, ["qwen3-iluvatar", "qwen3-nvidia", "smollm2-cpu"]) == [
        ["qwen3-nvidia", "smollm2-cpu"], ["qwen3-iluvatar"]]
    assert reference_waves(spec, ["qwen3-iluvatar"]) == [["qwen3-iluvatar"]]  # its reference is not in this run
